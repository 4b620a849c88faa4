// strmap: open-addressing hash maps for the tokenizer: byte strings -> int (vocabularies, the per-call
// word cache) and 64-bit keys -> two ints (BPE merge pairs -> rank and merged id).
//
// Contract: keys are arbitrary bytes with an explicit length (NUL allowed); a strmap copies its keys into
// its own arena. Putting an existing key overwrites its value, as a Rust HashMap collect does, so a
// duplicated vocabulary entry or merge keeps the last one. Maps are not synchronised: a map written
// after load is private to one call. Allocation failure exits through ep_malloc.
#ifndef EP_STRMAP_H
#define EP_STRMAP_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint64_t hash;
    uint32_t key_off, key_len;
    int value;
    int used;
} strmap_slot;

typedef struct {
    strmap_slot *slots;
    size_t cap, count;  // cap is a power of two (or 0)
    char *arena;
    size_t arena_len, arena_cap;
} strmap;

void strmap_init(strmap *m, size_t expected);
void strmap_free(strmap *m);
void strmap_clear(strmap *m);
// Returns 1 and stores the value if the key is present, 0 otherwise.
int strmap_get(const strmap *m, const char *key, size_t len, int *value);
void strmap_put(strmap *m, const char *key, size_t len, int value);
// The stored key of a present key (stable until the next put), for callers that keep pointers.
const char *strmap_key(const strmap *m, const char *key, size_t len);

// 16 bytes a slot: merge tables are large (Gemma: 580k pairs) and every lookup is a likely cache miss.
// An empty slot holds PAIRMAP_EMPTY, a key no caller uses (token ids are far below 2^32 - 1).
#define PAIRMAP_EMPTY UINT64_MAX
typedef struct {
    uint64_t key;
    int a, b;
} pairmap_slot;

typedef struct {
    pairmap_slot *slots;
    size_t cap, count;
} pairmap;

void pairmap_init(pairmap *m, size_t expected);
void pairmap_free(pairmap *m);
int pairmap_get(const pairmap *m, uint64_t key, int *a, int *b);
void pairmap_put(pairmap *m, uint64_t key, int a, int b);  // key must not be PAIRMAP_EMPTY

uint64_t strmap_hash(const char *key, size_t len);

// Batch use at load time, which is bound by cache misses: callers hash keys ahead, prefetch their slots,
// and look up or insert with the hash already computed. strmap_hash2 is the hash of the concatenation
// a || b (equal to strmap_hash of the joined bytes), and strmap_get2 looks that concatenation up without
// building it (a BPE merge's result piece).
uint64_t strmap_hash2(const char *a, size_t a_len, const char *b, size_t b_len);
int strmap_get2(const strmap *m, uint64_t hash, const char *a, size_t a_len, const char *b, size_t b_len, int *value);
void strmap_put_hashed(strmap *m, uint64_t hash, const char *key, size_t len, int value);
// Makes room for key_bytes more bytes of keys (each key takes its length + 1) in one allocation.
void strmap_reserve_keys(strmap *m, size_t key_bytes);
void strmap_prefetch(const strmap *m, uint64_t hash);
// The second step: once the slot is cached, prefetch the stored key it points to (for the compare).
void strmap_prefetch_key(const strmap *m, uint64_t hash);
void pairmap_prefetch(const pairmap *m, uint64_t key);

#endif
