// tokenizer: encoding, and the accessors (the loading, added tokens and decoding are its other files:
// pipeline/tokenizer_impl.h).
#include <stdlib.h>
#include <string.h>

#include "pipeline/tokenizer_impl.h"

// Per-call state: scratch buffers and the word cache (words repeat a lot in running text).
typedef struct {
    regex_scratch rs;
    bpe_scratch bs;
    byte_buf clean, normalized;
    span_list raw_spans, norm_spans;
    piece_list pieces, tmp;
    strmap cache;            // word -> index into cache_at
    int_vec cache_ids;       // ids of cached words, back to back
    int_vec cache_at;        // per cached word: start, count
} encode_ctx;

enum { CACHE_MAX_WORD = 256 };

static void ctx_free(encode_ctx *c) {
    regex_scratch_free(&c->rs);
    bpe_scratch_free(&c->bs);
    buf_free(&c->clean);
    buf_free(&c->normalized);
    free(c->raw_spans.v);
    free(c->norm_spans.v);
    piece_list_free(&c->pieces);
    piece_list_free(&c->tmp);
    strmap_free(&c->cache);
    free(c->cache_ids.v);
    free(c->cache_at.v);
}

static int encode_word(const tokenizer *t, encode_ctx *c, const char *w, size_t n, int_vec *out, ep_error *err) {
    int slot;
    if (n <= CACHE_MAX_WORD && strmap_get(&c->cache, w, n, &slot)) {
        int start = c->cache_at.v[2 * slot], count = c->cache_at.v[2 * slot + 1];
        for (int i = 0; i < count; i++) int_vec_push(out, c->cache_ids.v[start + i]);
        return 0;
    }
    size_t before = out->n;
    if (bpe_encode_word(&t->model, w, n, &c->bs, out, err)) return -1;
    if (n <= CACHE_MAX_WORD) {
        int entry = (int)(c->cache_at.n / 2);
        int_vec_push(&c->cache_at, (int)c->cache_ids.n);
        int_vec_push(&c->cache_at, (int)(out->n - before));
        for (size_t i = before; i < out->n; i++) int_vec_push(&c->cache_ids, out->v[i]);
        strmap_put(&c->cache, w, n, entry);
    }
    return 0;
}

static int encode_plain(const tokenizer *t, encode_ctx *c, const char *s, size_t n, int first, int_vec *out, ep_error *err) {
    if (normalizer_apply(&t->norm, s, n, &c->normalized, &c->rs, err)) return -1;
    tokenizer_find_added(t, &t->norm_matcher, c->normalized.p, c->normalized.len, &c->norm_spans, &c->rs);
    for (size_t i = 0; i < c->norm_spans.n; i++) {
        span sp = c->norm_spans.v[i];
        if (sp.token >= 0) {
            int_vec_push(out, t->added[sp.token].id);
            continue;
        }
        if (pretokenizer_apply(&t->pretok, c->normalized.p + sp.s, sp.e - sp.s, first && sp.s == 0, &c->pieces, &c->tmp,
                               &c->rs, err))
            return -1;
        for (size_t k = 0; k < c->pieces.n; k++)
            if (encode_word(t, c, c->pieces.text.p + c->pieces.v[k].off, c->pieces.v[k].len, out, err)) return -1;
    }
    return 0;
}

int tokenizer_encode(const tokenizer *t, const char *text, size_t len, int add_special, int **ids, int *n_ids,
                     ep_error *err) {
    *ids = NULL;
    *n_ids = 0;
    encode_ctx c = {0};
    regex_scratch_init(&c.rs);
    strmap_init(&c.cache, 256);
    int_vec out = {0};
    utf8_sanitize(text ? text : "", text ? len : 0, &c.clean);
    tokenizer_find_added(t, &t->raw_matcher, c.clean.p, c.clean.len, &c.raw_spans, &c.rs);
    int rc = 0;
    for (size_t i = 0; i < c.raw_spans.n && !rc; i++) {
        span sp = c.raw_spans.v[i];
        if (sp.token >= 0) int_vec_push(&out, t->added[sp.token].id);
        else rc = encode_plain(t, &c, c.clean.p + sp.s, sp.e - sp.s, sp.s == 0, &out, err);
    }
    if (!rc && add_special) {
        for (int k = 0; k < t->n_templates; k++) {
            const template_proc *tp = &t->templates[k];
            int_vec applied = {0};
            for (int i = 0; i < tp->n_items; i++) {
                if (tp->items[i] == TPL_SEQUENCE) {
                    for (size_t j = 0; j < out.n; j++) int_vec_push(&applied, out.v[j]);
                } else {
                    for (int j = 0; j < tp->ids_len[tp->items[i]]; j++)
                        int_vec_push(&applied, tp->ids[tp->ids_start[tp->items[i]] + j]);
                }
            }
            free(out.v);
            out = applied;
        }
    }
    ctx_free(&c);
    if (rc) {
        free(out.v);
        return -1;
    }
    *ids = out.v ? out.v : ep_malloc(sizeof(int));
    *n_ids = (int)out.n;
    return 0;
}

// ---- the vocabulary

const char *tokenizer_piece(const tokenizer *t, int id) {
    if (id < 0 || id >= t->n_ids) return NULL;
    if (t->added_of_id[id] >= 0) return t->added[t->added_of_id[id]].content;
    return id < t->model.n_pieces ? t->model.pieces[id] : NULL;
}

int tokenizer_vocab_size(const tokenizer *t) { return t->n_ids; }
int tokenizer_bos_id(const tokenizer *t) { return t->bos_id; }
int tokenizer_eos_id(const tokenizer *t) { return t->eos_id; }
int tokenizer_add_bos(const tokenizer *t) { return t->add_bos; }

int tokenizer_is_special(const tokenizer *t, int id) {
    return id >= 0 && id < t->n_ids && t->added_of_id[id] >= 0 && t->added[t->added_of_id[id]].special;
}
