#include "pipeline/strmap.h"

#include <stdlib.h>
#include <string.h>

#include "pipeline/error.h"

static const uint64_t fnv_offset = 0xcbf29ce484222325ull;

static uint64_t fnv_more(uint64_t h, const char *key, size_t len) {
    for (size_t i = 0; i < len; i++) h = (h ^ (unsigned char)key[i]) * 0x100000001b3ull;
    return h;
}

static uint64_t avalanche(uint64_t h) {
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    return h;
}

uint64_t strmap_hash(const char *key, size_t len) {
    // FNV-1a with a final avalanche: keys are short (tokens, words), so this is as fast as anything.
    return avalanche(fnv_more(fnv_offset, key, len));
}

uint64_t strmap_hash2(const char *a, size_t a_len, const char *b, size_t b_len) {
    return avalanche(fnv_more(fnv_more(fnv_offset, a, a_len), b, b_len));
}

static size_t capacity_for(size_t expected) {
    size_t cap = 16;
    while (cap < expected * 2) cap *= 2;
    return cap;
}

void strmap_init(strmap *m, size_t expected) {
    memset(m, 0, sizeof *m);
    m->cap = capacity_for(expected);
    m->slots = ep_calloc(m->cap, sizeof(strmap_slot));
}

void strmap_free(strmap *m) {
    free(m->slots);
    free(m->arena);
    memset(m, 0, sizeof *m);
}

void strmap_clear(strmap *m) {
    memset(m->slots, 0, m->cap * sizeof(strmap_slot));
    m->count = 0;
    m->arena_len = 0;
}

static size_t find_slot(const strmap *m, const char *key, size_t len, uint64_t h) {
    size_t mask = m->cap - 1, i = (size_t)h & mask;
    for (;;) {
        const strmap_slot *s = &m->slots[i];
        if (!s->used) return i;
        if (s->hash == h && s->key_len == len && !memcmp(m->arena + s->key_off, key, len)) return i;
        i = (i + 1) & mask;
    }
}

int strmap_get(const strmap *m, const char *key, size_t len, int *value) {
    if (!m->cap) return 0;
    size_t i = find_slot(m, key, len, strmap_hash(key, len));
    if (!m->slots[i].used) return 0;
    *value = m->slots[i].value;
    return 1;
}

const char *strmap_key(const strmap *m, const char *key, size_t len) {
    if (!m->cap) return NULL;
    size_t i = find_slot(m, key, len, strmap_hash(key, len));
    return m->slots[i].used ? m->arena + m->slots[i].key_off : NULL;
}

int strmap_get2(const strmap *m, uint64_t h, const char *a, size_t a_len, const char *b, size_t b_len, int *value) {
    if (!m->cap) return 0;
    size_t mask = m->cap - 1, i = (size_t)h & mask, len = a_len + b_len;
    for (;;) {
        const strmap_slot *s = &m->slots[i];
        if (!s->used) return 0;
        if (s->hash == h && s->key_len == len) {
            const char *k = m->arena + s->key_off;
            if (!memcmp(k, a, a_len) && !memcmp(k + a_len, b, b_len)) {
                *value = s->value;
                return 1;
            }
        }
        i = (i + 1) & mask;
    }
}

void strmap_prefetch(const strmap *m, uint64_t h) {
    if (m->cap) __builtin_prefetch(&m->slots[(size_t)h & (m->cap - 1)]);
}

void strmap_prefetch_key(const strmap *m, uint64_t h) {
    if (!m->cap) return;
    const strmap_slot *s = &m->slots[(size_t)h & (m->cap - 1)];
    if (s->used && s->hash == h) __builtin_prefetch(m->arena + s->key_off);
}

void strmap_reserve_keys(strmap *m, size_t key_bytes) {
    if (m->arena_len + key_bytes <= m->arena_cap) return;
    m->arena_cap = m->arena_len + key_bytes;
    m->arena = ep_realloc(m->arena, m->arena_cap);
}

static void grow(strmap *m) {
    strmap_slot *old = m->slots;
    size_t old_cap = m->cap;
    m->cap *= 2;
    m->slots = ep_calloc(m->cap, sizeof(strmap_slot));
    size_t mask = m->cap - 1;
    for (size_t j = 0; j < old_cap; j++) {
        if (!old[j].used) continue;
        size_t i = (size_t)old[j].hash & mask;
        while (m->slots[i].used) i = (i + 1) & mask;
        m->slots[i] = old[j];
    }
    free(old);
}

void strmap_put(strmap *m, const char *key, size_t len, int value) {
    strmap_put_hashed(m, strmap_hash(key, len), key, len, value);
}

void strmap_put_hashed(strmap *m, uint64_t h, const char *key, size_t len, int value) {
    if (!m->cap) strmap_init(m, 16);
    if ((m->count + 1) * 2 > m->cap) grow(m);
    size_t i = find_slot(m, key, len, h);
    strmap_slot *s = &m->slots[i];
    if (s->used) {
        s->value = value;
        return;
    }
    if (m->arena_len + len + 1 > m->arena_cap) {
        while (m->arena_len + len + 1 > m->arena_cap) m->arena_cap = m->arena_cap ? m->arena_cap * 2 : 4096;
        m->arena = ep_realloc(m->arena, m->arena_cap);
    }
    memcpy(m->arena + m->arena_len, key, len);
    m->arena[m->arena_len + len] = 0;  // NUL-terminated so strmap_key can be used as a C string
    s->hash = h;
    s->key_off = (uint32_t)m->arena_len;
    s->key_len = (uint32_t)len;
    s->value = value;
    s->used = 1;
    m->arena_len += len + 1;
    m->count++;
}

static uint64_t mix64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return x;
}

static pairmap_slot *empty_pair_slots(size_t cap) {
    pairmap_slot *slots = ep_malloc(cap * sizeof(pairmap_slot));
    for (size_t i = 0; i < cap; i++) slots[i].key = PAIRMAP_EMPTY;
    return slots;
}

void pairmap_init(pairmap *m, size_t expected) {
    // Load factor up to 2/3 (linear probing stays short) keeps the table small enough to cache better.
    m->cap = 16;
    while (m->cap * 2 < expected * 3) m->cap *= 2;
    m->count = 0;
    m->slots = empty_pair_slots(m->cap);
}

void pairmap_free(pairmap *m) {
    free(m->slots);
    memset(m, 0, sizeof *m);
}

int pairmap_get(const pairmap *m, uint64_t key, int *a, int *b) {
    if (!m->cap) return 0;
    size_t mask = m->cap - 1, i = (size_t)mix64(key) & mask;
    for (;;) {
        const pairmap_slot *s = &m->slots[i];
        if (s->key == key) {
            *a = s->a;
            *b = s->b;
            return 1;
        }
        if (s->key == PAIRMAP_EMPTY) return 0;
        i = (i + 1) & mask;
    }
}

void pairmap_prefetch(const pairmap *m, uint64_t key) {
    if (m->cap) __builtin_prefetch(&m->slots[(size_t)mix64(key) & (m->cap - 1)]);
}

void pairmap_put(pairmap *m, uint64_t key, int a, int b) {
    if (!m->cap) pairmap_init(m, 16);
    if ((m->count + 1) * 3 > m->cap * 2) {
        pairmap_slot *old = m->slots;
        size_t old_cap = m->cap;
        m->cap *= 2;
        m->slots = empty_pair_slots(m->cap);
        for (size_t j = 0; j < old_cap; j++) {
            if (old[j].key == PAIRMAP_EMPTY) continue;
            size_t i = (size_t)mix64(old[j].key) & (m->cap - 1);
            while (m->slots[i].key != PAIRMAP_EMPTY) i = (i + 1) & (m->cap - 1);
            m->slots[i] = old[j];
        }
        free(old);
    }
    size_t mask = m->cap - 1, i = (size_t)mix64(key) & mask;
    while (m->slots[i].key != PAIRMAP_EMPTY && m->slots[i].key != key) i = (i + 1) & mask;
    if (m->slots[i].key == PAIRMAP_EMPTY) m->count++;
    m->slots[i] = (pairmap_slot){.key = key, .a = a, .b = b};
}
