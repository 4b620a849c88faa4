#include "pipeline/bpe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline/pretok.h"
#include "pipeline/tokenizer_json.h"

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

// A string read from the document: its bytes are in the document itself, or (when it had escapes) in a side
// buffer that is still growing, so it is kept as an offset until the buffer stops moving.
typedef struct {
    size_t off;
    uint32_t len;
    uint32_t in_side;
} text_ref;

static text_ref keep_text(const tjson *s, byte_buf *side, const char *str, size_t len) {
    if (str >= s->doc && str + len <= s->doc + s->len) return (text_ref){(size_t)(str - s->doc), (uint32_t)len, 0};
    text_ref r = {side->len, (uint32_t)len, 1};
    buf_append(side, str, len);
    return r;
}

static const char *text_at(const bpe_source *src, const byte_buf *side, text_ref r) {
    return r.in_side ? side->p + r.off : src->doc + r.off;
}

// Lookups and inserts run LOOKAHEAD entries behind the prefetches of their slots: at load, nearly every
// access to a 256k-entry table is a cache miss, and overlapping them is most of the speed.
enum { LOOKAHEAD = 16 };

typedef struct {
    text_ref key;
    int id;
} vocab_entry;

// model.vocab, read from the document text: {"piece": id, ...}.
static int load_vocab(bpe_model *m, const bpe_source *src, const char *file, int *max_id, ep_error *err) {
    if (src->vocab.at == TJSON_ABSENT) return ep_fail(err, "%s: model.vocab is missing or not an object", file);
    tjson s;
    tjson_init(&s, src->doc, src->len, (size_t)src->vocab.at, file);
    if (tjson_peek(&s) != '{') return ep_fail(err, "%s: model.vocab is missing or not an object", file);
    s.pos++;
    // The entries are gathered first so that the map is sized once, exactly as for n entries.
    vocab_entry *list = NULL;
    size_t n = 0, cap = 0;
    byte_buf side = {0};
    *max_id = -1;
    int rc = 0;
    if (tjson_peek(&s) == '}') {
        s.pos++;
    } else {
        for (;;) {
            const char *key;
            size_t key_len;
            if ((rc = tjson_string(&s, &key, &key_len, err)) || (rc = tjson_expect(&s, ':', err))) break;
            int c = tjson_peek(&s);
            int64_t v = -1;
            int is_int = 0;
            if ((c == '-' || (c >= '0' && c <= '9')) && (rc = tjson_number(&s, &v, &is_int, err))) break;
            // Ids index dense arrays, so they are bounded (real vocabularies are < 300k).
            if (!is_int || v < 0 || v >= BPE_MAX_ID) {
                rc = ep_fail(err, "%s: model.vocab[\"%.*s\"] is not an integer id in [0, %d)", file, (int)key_len, key,
                             BPE_MAX_ID);
                break;
            }
            if (n == cap) {
                cap = cap ? cap * 2 : 1024;
                list = ep_realloc(list, sizeof *list * cap);
            }
            list[n++] = (vocab_entry){keep_text(&s, &side, key, key_len), (int)v};
            if ((int)v > *max_id) *max_id = (int)v;
            c = tjson_peek(&s);
            s.pos++;
            if (c == '}') break;
            if (c != ',') {
                s.pos--;
                rc = tjson_fail(&s, err, "expected ',' or '}'");
                break;
            }
        }
    }
    if (!rc) {
        // In file order, so a duplicated piece keeps its last id (as a Rust HashMap collect does).
        strmap_init(&m->vocab, n);
        size_t key_bytes = 0;
        for (size_t i = 0; i < n; i++) key_bytes += list[i].key.len + 1;
        strmap_reserve_keys(&m->vocab, key_bytes);
        uint64_t ring[LOOKAHEAD];
        // Entry i - LOOKAHEAD is inserted, then entry i's hash takes its place in the ring.
        for (size_t i = 0; i < n + LOOKAHEAD; i++) {
            if (i >= LOOKAHEAD) {
                const vocab_entry *e = &list[i - LOOKAHEAD];
                strmap_put_hashed(&m->vocab, ring[i % LOOKAHEAD], text_at(src, &side, e->key), e->key.len, e->id);
            }
            if (i < n) {
                uint64_t h = strmap_hash(text_at(src, &side, list[i].key), list[i].key.len);
                strmap_prefetch(&m->vocab, h);
                ring[i % LOOKAHEAD] = h;
            }
        }
    }
    free(list);
    buf_free(&side);
    tjson_free(&s);
    return rc;
}

typedef struct {
    text_ref a, b;
} merge_text;

// One merge of model.merges: "a b" (split at the first space) or ["a", "b"] (tokenizers >= 0.20).
static int read_merge(tjson *s, byte_buf *side, merge_text *out, const char *file, size_t rank, ep_error *err) {
    int c = tjson_peek(s);
    const char *str;
    size_t len;
    if (c == '"') {
        if (tjson_string(s, &str, &len, err)) return -1;
        const char *sp = memchr(str, ' ', len);
        if (!sp)
            return ep_fail(err, "%s: model.merges[%zu] = \"%.*s\" is not two pieces separated by a space", file, rank,
                           (int)len, str);
        size_t a_len = (size_t)(sp - str);
        out->a = keep_text(s, side, str, a_len);
        out->b = keep_text(s, side, sp + 1, len - a_len - 1);
        return 0;
    }
    if (c == '[') {
        s->pos++;
        if (tjson_peek(s) == '"') {
            if (tjson_string(s, &str, &len, err)) return -1;
            out->a = keep_text(s, side, str, len);  // copied aside if escaped: the next read reuses s->buf
            if (tjson_peek(s) == ',') {
                s->pos++;
                if (tjson_peek(s) == '"') {
                    if (tjson_string(s, &str, &len, err)) return -1;
                    out->b = keep_text(s, side, str, len);
                    if (tjson_peek(s) == ']') {
                        s->pos++;
                        return 0;
                    }
                }
            }
        }
    }
    return ep_fail(err, "%s: model.merges[%zu] is neither \"a b\" nor [\"a\", \"b\"]", file, rank);
}

typedef struct {
    uint64_t ha, hb, hab;
} merge_hashes;

static uint64_t pair_key(int a, int b) { return (uint64_t)(uint32_t)a << 32 | (uint32_t)b; }

// model.merges, read from the document text; each merge's rank is its index.
static int load_merges(bpe_model *m, const bpe_source *src, const char *file, ep_error *err) {
    if (src->merges.at == TJSON_ABSENT) return ep_fail(err, "%s: model.merges is missing or not an array", file);
    tjson s;
    tjson_init(&s, src->doc, src->len, (size_t)src->merges.at, file);
    if (tjson_peek(&s) != '[') return ep_fail(err, "%s: model.merges is missing or not an array", file);
    s.pos++;
    // Gathered first: the pair table is then sized exactly once, and the lookups can be prefetched.
    merge_text *list = NULL;
    size_t n = 0, cap = 0;
    byte_buf side = {0};
    int rc = 0;
    if (tjson_peek(&s) == ']') {
        s.pos++;
    } else {
        for (;;) {
            if (n == cap) {
                cap = cap ? cap * 2 : 1024;
                list = ep_realloc(list, sizeof *list * cap);
            }
            if ((rc = read_merge(&s, &side, &list[n], file, n, err))) break;
            n++;
            int c = tjson_peek(&s);
            s.pos++;
            if (c == ']') break;
            if (c != ',') {
                s.pos--;
                rc = tjson_fail(&s, err, "expected ',' or ']'");
                break;
            }
        }
    }
    tjson_free(&s);
    int *ids = rc ? NULL : ep_malloc(sizeof(int) * 3 * (n + 1));  // a, b, merged per rank
    if (!rc) {
        merge_hashes ring[LOOKAHEAD];
        // Merge i - LOOKAHEAD is looked up, then merge i's hashes take its place in the ring.
        for (size_t i = 0; i < n + LOOKAHEAD && !rc; i++) {
            if (i >= LOOKAHEAD / 2 && i - LOOKAHEAD / 2 < n) {  // halfway: the slots are cached, fetch the keys
                const merge_hashes *h = &ring[(i - LOOKAHEAD / 2) % LOOKAHEAD];
                strmap_prefetch_key(&m->vocab, h->ha);
                strmap_prefetch_key(&m->vocab, h->hb);
                strmap_prefetch_key(&m->vocab, h->hab);
            }
            if (i >= LOOKAHEAD) {
                size_t r = i - LOOKAHEAD;
                const merge_hashes *h = &ring[i % LOOKAHEAD];
                const char *a = text_at(src, &side, list[r].a), *b = text_at(src, &side, list[r].b);
                size_t a_len = list[r].a.len, b_len = list[r].b.len;
                int *id = &ids[3 * r];
                int ok_a = strmap_get2(&m->vocab, h->ha, a, a_len, "", 0, &id[0]);
                int ok_b = strmap_get2(&m->vocab, h->hb, b, b_len, "", 0, &id[1]);
                int ok_ab = strmap_get2(&m->vocab, h->hab, a, a_len, b, b_len, &id[2]);
                if (!ok_a || !ok_b)
                    rc = ep_fail(err, "%s: model.merges[%zu]: piece \"%.*s\" is not in model.vocab", file, r,
                                 !ok_a ? (int)a_len : (int)b_len, !ok_a ? a : b);
                else if (!ok_ab)
                    rc = ep_fail(err, "%s: model.merges[%zu]: piece \"%.*s%.*s\" is not in model.vocab", file, r,
                                 (int)a_len, a, (int)b_len, b);
            }
            if (i < n) {
                const char *a = text_at(src, &side, list[i].a), *b = text_at(src, &side, list[i].b);
                merge_hashes *h = &ring[i % LOOKAHEAD];
                h->ha = strmap_hash(a, list[i].a.len);
                h->hb = strmap_hash(b, list[i].b.len);
                h->hab = strmap_hash2(a, list[i].a.len, b, list[i].b.len);
                strmap_prefetch(&m->vocab, h->ha);
                strmap_prefetch(&m->vocab, h->hb);
                strmap_prefetch(&m->vocab, h->hab);
            }
        }
    }
    if (!rc) {
        pairmap_init(&m->merges, n);
        for (size_t i = 0; i < n + LOOKAHEAD; i++) {
            if (i < n) pairmap_prefetch(&m->merges, pair_key(ids[3 * i], ids[3 * i + 1]));
            if (i < LOOKAHEAD) continue;
            size_t r = i - LOOKAHEAD;
            pairmap_put(&m->merges, pair_key(ids[3 * r], ids[3 * r + 1]), (int)r, ids[3 * r + 2]);
        }
    }
    free(ids);
    free(list);
    buf_free(&side);
    return rc;
}

int bpe_load(bpe_model *m, json_t *model, const bpe_source *src, const char *file, ep_error *err) {
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

    int max_id = -1;
    if (load_vocab(m, src, file, &max_id, err)) return -1;
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
    return load_merges(m, src, file, err);
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
