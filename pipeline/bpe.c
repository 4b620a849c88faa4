#include "pipeline/bpe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void int_vec_push(int_vec *a, int x) {
    if (a->n == a->cap) {
        a->cap = a->cap ? a->cap * 2 : 64;
        a->v = ep_realloc(a->v, sizeof(int) * a->cap);
    }
    a->v[a->n++] = x;
}

static size_t utf8_char_len(const char *s, size_t left) {
    unsigned char c = (unsigned char)s[0];
    size_t n = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
    if (c >= 0x80 && c < 0xC0) n = 1;  // stray continuation byte: cannot happen on sanitised input
    return n < left ? n : left;
}

static int json_str(json_t *o, const char *key, const char **out) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        *out = NULL;
        return 0;
    }
    if (!json_is_string(v)) return -1;
    *out = json_string_value(v);
    return 0;
}

static int json_flag(json_t *o, const char *key) {
    json_t *v = json_object_get(o, key);
    return v && json_is_true(v);
}

int bpe_load(bpe_model *m, json_t *model, const char *file, ep_error *err) {
    memset(m, 0, sizeof *m);
    m->unk_id = -1;
    for (int i = 0; i < 256; i++) m->byte_ids[i] = -1;
    json_t *dropout = json_object_get(model, "dropout");
    if (dropout && !json_is_null(dropout) && !(json_is_number(dropout) && json_number_value(dropout) == 0.0))
        return ep_fail(err, "%s: model.dropout is not supported (only null)", file);
    const char *prefix, *suffix, *unk;
    if (json_str(model, "continuing_subword_prefix", &prefix) || json_str(model, "end_of_word_suffix", &suffix) ||
        json_str(model, "unk_token", &unk))
        return ep_fail(err, "%s: model: continuing_subword_prefix, end_of_word_suffix and unk_token must be strings or null", file);
    if (prefix && *prefix) return ep_fail(err, "%s: model.continuing_subword_prefix = \"%s\" is not supported (only empty)", file, prefix);
    if (suffix && *suffix) return ep_fail(err, "%s: model.end_of_word_suffix = \"%s\" is not supported (only empty)", file, suffix);
    m->fuse_unk = json_flag(model, "fuse_unk");
    m->byte_fallback = json_flag(model, "byte_fallback");
    m->ignore_merges = json_flag(model, "ignore_merges");

    json_t *vocab = json_object_get(model, "vocab");
    if (!json_is_object(vocab)) return ep_fail(err, "%s: model.vocab is missing or not an object", file);
    strmap_init(&m->vocab, json_object_size(vocab));
    const char *key;
    json_t *val;
    int max_id = -1;
    json_object_foreach(vocab, key, val) {
        // Ids index dense arrays, so they are bounded (real vocabularies are < 300k).
        if (!json_is_integer(val) || json_integer_value(val) < 0 || json_integer_value(val) >= BPE_MAX_ID)
            return ep_fail(err, "%s: model.vocab[\"%s\"] is not an integer id in [0, %d)", file, key, BPE_MAX_ID);
        int id = (int)json_integer_value(val);
        strmap_put(&m->vocab, key, strlen(key), id);
        if (id > max_id) max_id = id;
    }
    m->n_pieces = max_id + 1;
    m->pieces = ep_calloc((size_t)m->n_pieces + 1, sizeof(char *));
    for (size_t i = 0; i < m->vocab.cap; i++) {
        strmap_slot *s = &m->vocab.slots[i];
        if (s->used) m->pieces[s->value] = m->vocab.arena + s->key_off;
    }
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        int id;
        if (strmap_get(&m->vocab, name, 6, &id)) m->byte_ids[b] = id;
    }
    if (unk) {
        if (!strmap_get(&m->vocab, unk, strlen(unk), &m->unk_id)) {
            m->unk_id = -1;
            m->unk_missing = 1;
        }
    }

    json_t *merges = json_object_get(model, "merges");
    if (!json_is_array(merges)) return ep_fail(err, "%s: model.merges is missing or not an array", file);
    pairmap_init(&m->merges, json_array_size(merges));
    size_t rank;
    json_array_foreach(merges, rank, val) {
        // Two spellings: "a b" (split at the first space) and ["a", "b"] (tokenizers >= 0.20).
        const char *a, *b;
        size_t a_len, b_len;
        if (json_is_string(val)) {
            a = json_string_value(val);
            const char *sp = strchr(a, ' ');
            if (!sp) return ep_fail(err, "%s: model.merges[%zu] = \"%s\" is not two pieces separated by a space", file, rank, a);
            a_len = (size_t)(sp - a);
            b = sp + 1;
            b_len = strlen(b);
        } else if (json_is_array(val) && json_array_size(val) == 2 && json_is_string(json_array_get(val, 0)) &&
                   json_is_string(json_array_get(val, 1))) {
            a = json_string_value(json_array_get(val, 0));
            b = json_string_value(json_array_get(val, 1));
            a_len = json_string_length(json_array_get(val, 0));
            b_len = json_string_length(json_array_get(val, 1));
        } else {
            return ep_fail(err, "%s: model.merges[%zu] is neither \"a b\" nor [\"a\", \"b\"]", file, rank);
        }
        int ia, ib, inew;
        char *joined = ep_malloc(a_len + b_len + 1);
        memcpy(joined, a, a_len);
        memcpy(joined + a_len, b, b_len);
        joined[a_len + b_len] = 0;
        int ok_a = strmap_get(&m->vocab, a, a_len, &ia), ok_b = strmap_get(&m->vocab, b, b_len, &ib);
        int ok_new = strmap_get(&m->vocab, joined, a_len + b_len, &inew);
        if (!ok_a || !ok_b || !ok_new) {
            int rc = ep_fail(err, "%s: model.merges[%zu]: piece \"%.*s\" is not in model.vocab", file, rank,
                             !ok_a ? (int)a_len : !ok_b ? (int)b_len : (int)(a_len + b_len), !ok_a ? a : !ok_b ? b : joined);
            free(joined);
            return rc;
        }
        free(joined);
        pairmap_put(&m->merges, (uint64_t)(uint32_t)ia << 32 | (uint32_t)ib, (int)rank, inew);
    }
    return 0;
}

void bpe_free(bpe_model *m) {
    strmap_free(&m->vocab);
    pairmap_free(&m->merges);
    free(m->pieces);
    memset(m, 0, sizeof *m);
}

struct bpe_merge {
    int rank, pos, new_id;
};

void bpe_scratch_free(bpe_scratch *s) {
    free(s->id);
    free(s->prev);
    free(s->next);
    free(s->len);
    free(s->heap);
    memset(s, 0, sizeof *s);
}

// Min-heap on (rank, pos): tokenizers' Merge ordering.
static int merge_before(const struct bpe_merge *x, const struct bpe_merge *y) {
    return x->rank != y->rank ? x->rank < y->rank : x->pos < y->pos;
}

static void heap_push(bpe_scratch *s, struct bpe_merge mg) {
    if (s->heap_n == s->heap_cap) {
        s->heap_cap = s->heap_cap ? s->heap_cap * 2 : 64;
        s->heap = ep_realloc(s->heap, sizeof(struct bpe_merge) * s->heap_cap);
    }
    size_t i = s->heap_n++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!merge_before(&mg, &s->heap[parent])) break;
        s->heap[i] = s->heap[parent];
        i = parent;
    }
    s->heap[i] = mg;
}

static struct bpe_merge heap_pop(bpe_scratch *s) {
    struct bpe_merge top = s->heap[0], last = s->heap[--s->heap_n];
    size_t i = 0, n = s->heap_n;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && merge_before(&s->heap[c + 1], &s->heap[c])) c++;
        if (!merge_before(&s->heap[c], &last)) break;
        s->heap[i] = s->heap[c];
        i = c;
    }
    if (n) s->heap[i] = last;
    return top;
}

static void reserve_symbols(bpe_scratch *s, size_t n) {
    if (n <= s->sym_cap) return;
    size_t cap = s->sym_cap ? s->sym_cap : 64;
    while (cap < n) cap *= 2;
    s->id = ep_realloc(s->id, sizeof(int) * cap);
    s->prev = ep_realloc(s->prev, sizeof(int) * cap);
    s->next = ep_realloc(s->next, sizeof(int) * cap);
    s->len = ep_realloc(s->len, sizeof(int) * cap);
    s->sym_cap = cap;
}

static int lookup_merge(const bpe_model *m, int a, int b, int *rank, int *new_id) {
    return pairmap_get(&m->merges, (uint64_t)(uint32_t)a << 32 | (uint32_t)b, rank, new_id);
}

int bpe_encode_word(const bpe_model *m, const char *word, size_t len, bpe_scratch *s, int_vec *out, ep_error *err) {
    if (len == 0) return 0;
    int id;
    if (m->ignore_merges && strmap_get(&m->vocab, word, len, &id)) {
        int_vec_push(out, id);
        return 0;
    }
    // Symbols: at most one per byte.
    reserve_symbols(s, len);
    int n = 0;
    int unk_pending = 0, unk_len = 0;
#define ADD_SYMBOL(ID, LEN)      \
    do {                         \
        s->id[n] = (ID);         \
        s->len[n] = (LEN);       \
        n++;                     \
    } while (0)
#define FLUSH_UNK()                                   \
    do {                                              \
        if (unk_pending) ADD_SYMBOL(m->unk_id, unk_len); \
        unk_pending = 0;                              \
    } while (0)
    for (size_t i = 0; i < len;) {
        size_t cl = utf8_char_len(word + i, len - i);
        if (strmap_get(&m->vocab, word + i, cl, &id)) {
            FLUSH_UNK();
            ADD_SYMBOL(id, (int)cl);
        } else {
            int done = 0;
            if (m->byte_fallback) {
                int all = 1;
                for (size_t k = 0; k < cl; k++) all &= m->byte_ids[(unsigned char)word[i + k]] >= 0;
                if (all) {
                    FLUSH_UNK();
                    for (size_t k = 0; k < cl; k++) ADD_SYMBOL(m->byte_ids[(unsigned char)word[i + k]], 1);
                    done = 1;
                }
            }
            if (!done) {
                if (m->unk_missing) return ep_fail(err, "tokenizer: model.unk_token is not in model.vocab but the text needs it");
                if (m->unk_id >= 0) {
                    if (unk_pending && m->fuse_unk) {
                        unk_len += (int)cl;
                    } else {
                        FLUSH_UNK();
                        unk_pending = 1;
                        unk_len = (int)cl;
                    }
                }
            }
        }
        i += cl;
    }
    FLUSH_UNK();
#undef ADD_SYMBOL
#undef FLUSH_UNK
    for (int i = 0; i < n; i++) {
        s->prev[i] = i - 1;
        s->next[i] = i + 1 < n ? i + 1 : -1;
    }
    s->heap_n = 0;
    for (int i = 0; i + 1 < n; i++) {
        int rank, new_id;
        if (lookup_merge(m, s->id[i], s->id[i + 1], &rank, &new_id))
            heap_push(s, (struct bpe_merge){rank, i, new_id});
    }
    while (s->heap_n) {
        struct bpe_merge top = heap_pop(s);
        int pos = top.pos;
        if (s->len[pos] == 0 || s->next[pos] < 0) continue;
        int right = s->next[pos];
        int rank, new_id;
        // A queue entry is stale if the pair it was made for has changed since.
        if (!lookup_merge(m, s->id[pos], s->id[right], &rank, &new_id) || new_id != top.new_id) continue;
        s->id[pos] = new_id;
        s->len[pos] += s->len[right];
        s->next[pos] = s->next[right];
        s->len[right] = 0;
        if (s->next[right] >= 0) s->prev[s->next[right]] = pos;
        if (s->prev[pos] >= 0 && lookup_merge(m, s->id[s->prev[pos]], s->id[pos], &rank, &new_id))
            heap_push(s, (struct bpe_merge){rank, s->prev[pos], new_id});
        if (s->next[pos] >= 0 && lookup_merge(m, s->id[pos], s->id[s->next[pos]], &rank, &new_id))
            heap_push(s, (struct bpe_merge){rank, pos, new_id});
    }
    for (int i = 0; i < n; i++)
        if (s->len[i]) int_vec_push(out, s->id[i]);
    return 0;
}
