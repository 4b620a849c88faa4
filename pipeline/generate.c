#include "generate.h"

#include <stdlib.h>
#include <string.h>

int argmax(const float *logits, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (logits[i] > logits[best]) best = i;
    return best;
}

int greedy_decode(const model *m, const kernel_ops *ops, kv_cache *cache, const float *last_logits,
                  const greedy_opts *o, int *out, int *n_out, ep_error *err) {
    int V = m->cfg.vocab_size, S = cache->n_seqs, max_new = o->max_new_tokens;
    for (int s = 0; s < S; s++)
        if (cache->len[s] + max_new - 1 > cache->capacity)
            return ep_fail(err, "generate: sequence %d needs %d positions, the cache has %d", s,
                           cache->len[s] + max_new - 1, cache->capacity);
    int *active = ep_calloc((size_t)S, sizeof(int)), *n_new = ep_calloc((size_t)S, sizeof(int));
    int *tokens = ep_malloc(sizeof(int) * (size_t)S), *rows = ep_malloc(sizeof(int) * (size_t)S);
    float *logits = ep_malloc(sizeof(float) * (size_t)S * V);
    memcpy(logits, last_logits, sizeof(float) * (size_t)S * V);
    int *row_of = ep_malloc(sizeof(int) * (size_t)S);  // sequence -> row of this step's logits
    for (int s = 0; s < S; s++) {
        active[s] = max_new > 0;
        n_out[s] = 0;
        row_of[s] = s;
    }
    int rc = 0;
    for (int step = 0; step < max_new && rc == 0; step++) {
        int T = 0;
        for (int s = 0; s < S; s++) {
            n_new[s] = 0;
            if (!active[s]) continue;
            int tok = argmax(logits + (size_t)row_of[s] * V, V);
            out[(size_t)s * max_new + n_out[s]++] = tok;
            int stop = n_out[s] == max_new;
            for (int i = 0; i < o->n_stop_ids && !stop; i++) stop = tok == o->stop_ids[i];
            if (!stop && o->stop) stop = o->stop(o->stop_ctx, s, out + (size_t)s * max_new, n_out[s]);
            if (stop) {
                active[s] = 0;
                continue;
            }
            n_new[s] = 1;
            tokens[T] = tok;
            rows[T] = T;
            row_of[s] = T++;
        }
        if (T == 0) break;
        forward_batch b = {.n_seqs = S, .n_new = n_new, .tokens = tokens, .n_logit_rows = T, .logit_rows = rows,
                           .logits = logits};
        rc = model_forward(m, ops, cache, &b, NULL, err);
    }
    free(active), free(n_new), free(tokens), free(rows), free(logits), free(row_of);
    return rc;
}

int greedy_generate(const model *m, const kernel_ops *ops, int n_seqs, const int *tokens, const int *lens,
                    const greedy_opts *o, int *out, int *n_out, ep_error *err) {
    int max_len = 0;
    for (int s = 0; s < n_seqs; s++) {
        if (lens[s] <= 0) return ep_fail(err, "generate: prompt %d is empty", s);
        if (lens[s] > max_len) max_len = lens[s];
    }
    kv_cache cache;
    if (kv_cache_init_backend(&cache, &m->cfg, n_seqs, max_len + o->max_new_tokens, 0, ops, err)) return -1;
    int *rows = ep_malloc(sizeof(int) * (size_t)n_seqs);
    for (int s = 0, r = 0; s < n_seqs; s++) rows[s] = (r += lens[s]) - 1;
    float *logits = ep_malloc(sizeof(float) * (size_t)n_seqs * m->cfg.vocab_size);
    forward_batch b = {.n_seqs = n_seqs, .n_new = lens, .tokens = tokens, .n_logit_rows = n_seqs, .logit_rows = rows,
                       .logits = logits};
    int rc = model_forward(m, ops, &cache, &b, NULL, err);
    if (rc == 0) rc = greedy_decode(m, ops, &cache, logits, o, out, n_out, err);
    free(rows);
    free(logits);
    kv_cache_free(&cache);
    return rc;
}
