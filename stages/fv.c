#include "fv.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pipeline/h5store.h"
#include "pipeline/hash.h"
#include "stages/circuit_file.h"
#include "stages/metrics.h"
#include "stages/prompts.h"
#include "stages/rank.h"

int fv_head_means(const model *m, const kernel_ops *ops, const prompt_batch *pb, const int *heads, int n_heads,
                  float *means, ep_error *err) {
    const model_config *c = &m->cfg;
    int D = c->hidden, rc = 0;
    double *sum = ep_calloc((size_t)n_heads * D, sizeof(double));
    float *dev_out = ops->alloc(sizeof(float) * (size_t)D), *host = ep_malloc(sizeof(float) * (size_t)D);
    for (int i = 0; i < pb->n_seqs && rc == 0; i++) {
        int n = pb->lengths[i], *tokens = ep_malloc(sizeof(int) * (size_t)n);
        for (int t = 0; t < n; t++) tokens[t] = pb->tokens[(size_t)i * pb->max_len + t];
        kv_cache cache;
        rc = kv_cache_init_backend(&cache, c, 1, n, 1, ops, err);
        forward_batch b = {.n_seqs = 1, .n_new = &n, .tokens = tokens};
        if (rc == 0) rc = model_forward(m, ops, &cache, &b, NULL, err);
        for (int h = 0; h < n_heads && rc == 0; h++) {
            int layer = heads[2 * h], head = heads[2 * h + 1];
            rc = model_head_output(m, ops, layer, head, kv_cache_z(&cache, layer, 0, n - 1), 1, dev_out, err);
            if (rc == 0) {
                ops->download(host, dev_out, sizeof(float) * (size_t)D);
                for (int d = 0; d < D; d++) sum[(size_t)h * D + d] += host[d];
            }
        }
        if (cache.len) kv_cache_free(&cache);
        free(tokens);
    }
    for (size_t k = 0; rc == 0 && k < (size_t)n_heads * D; k++) means[k] = (float)(sum[k] / pb->n_seqs);
    ops->release(dev_out);
    free(host), free(sum);
    return rc;
}

int fv_zero_shot(const prompt_batch *pb, int i, int *tokens) {
    const int32_t *tok = pb->tokens + (size_t)i * pb->max_len, *index = pb->index + (size_t)i * pb->max_len;
    int len = pb->lengths[i], query = index[len - 1], n = 0;
    for (int t = 0; t < len; t++)
        if (index[t] == -1 || index[t] == query) tokens[n++] = tok[t];
    return n;
}

int fv_injected_pass(const model *m, const kernel_ops *ops, const int *tokens, int n, int layer, const float *vec,
                     float scale, int max_new, float *last, int *gen, int *n_gen, ep_error *err) {
    const model_config *c = &m->cfg;
    kv_cache cache;
    if (kv_cache_init_backend(&cache, c, 1, n + (max_new > 0 ? max_new : 0), 0, ops, err)) return -1;
    int row = n - 1;
    forward_add add = {.layer = layer, .vec = vec, .scale = scale, .n_rows = 1, .rows = &row};
    forward_batch b = {.n_seqs = 1, .n_new = &n, .tokens = tokens, .n_logit_rows = 1, .logit_rows = &row,
                       .logits = last, .add = layer >= 0 && vec ? &add : NULL};
    int rc = model_forward(m, ops, &cache, &b, NULL, err);
    *n_gen = 0;
    if (rc == 0 && max_new > 0) {
        greedy_opts o = {.max_new_tokens = max_new, .stop_ids = c->eos_ids, .n_stop_ids = c->n_eos};
        rc = greedy_decode(m, ops, &cache, last, &o, gen, n_gen, err);
    }
    kv_cache_free(&cache);
    return rc;
}

int fv_choose_heads(const run_config *cfg, const model_config *mc, const char *run_dir, int **heads, int *n,
                    char from[32], ep_error *err) {
    const run_fv *f = &cfg->fv;
    *heads = NULL, *n = 0;
    if (f->n_heads > 0) {
        *heads = ep_malloc(sizeof(int) * 2 * (size_t)f->n_heads);
        for (int i = 0; i < f->n_heads; i++) (*heads)[2 * i] = f->heads[i][0], (*heads)[2 * i + 1] = f->heads[i][1];
        *n = f->n_heads;
        snprintf(from, 32, "config");
        return 0;
    }
    prune_round r;
    if (prune_round_load(run_dir, 0, &r, err))
        return ep_wrap(err, "%s: field function_vectors.top_k: needs round 0's head scores (the score stage)", cfg->path);
    int rc = 0, k = 0;
    if (r.kind != UNIT_HEAD) {
        rc = ep_fail(err, "%s: field function_vectors.top_k: round 0 scored edge units, not heads (give \"heads\")", cfg->path);
    } else {
        double *score = ep_malloc(sizeof(double) * (size_t)(r.n_units ? r.n_units : 1));
        int *order = ep_malloc(sizeof(int) * (size_t)(r.n_units ? r.n_units : 1)), m = 0, *unit = ep_malloc(sizeof(int) * (size_t)(r.n_units ? r.n_units : 1));
        for (int u = 0; u < r.n_units; u++)
            if (r.units[u].type == TT_LAST && r.units[u].layer < mc->n_layers && r.units[u].head < mc->n_heads)
                score[m] = r.scores[u], unit[m++] = u;
        rank_order(score, m, order);
        k = m < f->top_k ? m : (int)f->top_k;
        *heads = ep_malloc(sizeof(int) * 2 * (size_t)(k ? k : 1));
        for (int i = 0; i < k; i++)
            (*heads)[2 * i] = r.units[unit[order[i]]].layer, (*heads)[2 * i + 1] = r.units[unit[order[i]]].head;
        if (k == 0) rc = ep_fail(err, "%s: field function_vectors.top_k: round 0 has no head unit at `last`", cfg->path);
        free(score), free(order), free(unit);
        snprintf(from, 32, "round 0 %s", r.method);
    }
    prune_round_free(&r);
    if (rc) free(*heads), *heads = NULL;
    else *n = k;
    return rc;
}

// The stage's identity: what its numbers depend on.
static void fv_identity(const stage_inputs *in, const int *heads, int n_heads, const int *layers, int n_layers,
                        char out[17]) {
    const run_fv *f = &in->cfg->fv;
    uint64_t h = hash_str(HASH_INIT, FV_FORMAT);
    h = hash_str(h, in->prompts_hash);
    h = hash_str(h, in->model_hash);
    h = hash_bytes(h, heads, sizeof(int) * 2 * (size_t)n_heads);
    h = hash_bytes(h, layers, sizeof(int) * (size_t)n_layers);
    for (int i = 0; i < f->n_scales; i++) {
        float s = (float)f->scales[i];
        h = hash_bytes(h, &s, sizeof s);
    }
    h = hash_bytes(h, &in->cfg->max_new_tokens, sizeof in->cfg->max_new_tokens);
    hash_hex(h, out);
}

// A zero-shot prompt's metrics under one injection.
static int measure(const stage_inputs *in, const tokenizer *tk, const int *tokens, int n, int p, int layer,
                   const float *vec, float scale, float *last, int *gen, int32_t *correct, int32_t *first, ep_error *err) {
    const prompt_set *ps = &in->prompts;
    int n_gen = 0, max_new = (int)in->cfg->max_new_tokens;
    if (fv_injected_pass(&in->dev, in->ops, tokens, n, layer, vec, scale, max_new, last, gen, &n_gen, err)) return -1;
    prompt_metrics m;
    if (metrics_compute(tk, last, in->m.cfg.vocab_size, ps->targets + (size_t)p * ps->max_target, ps->target_lengths[p],
                        gen, n_gen, &m, err))
        return -1;
    *correct = m.correct, *first = m.first_token_correct;
    return 0;
}

static double mean_i32(const int32_t *v, int n) {
    double s = 0;
    for (int i = 0; i < n; i++) s += v[i];
    return n ? s / n : 0;
}

static int write_output(const char *path, const char *identity, const char *from, int n_heads, const int *heads, int D,
                        const float *means, const float *vec, int nL, const int *layers, int nS, const float *scales,
                        int P, const int32_t *correct, const int32_t *first, const int32_t *base_c, const int32_t *base_f,
                        ep_error *err) {
    h5store s;
    if (h5store_create(path, &s, err)) return -1;
    size_t LS = (size_t)nL * nS;
    double *acc = ep_malloc(sizeof(double) * (LS ? LS : 1)), *facc = ep_malloc(sizeof(double) * (LS ? LS : 1));
    for (size_t k = 0; k < LS; k++) acc[k] = mean_i32(correct + k * P, P), facc[k] = mean_i32(first + k * P, P);
    double base[2] = {mean_i32(base_c, P), mean_i32(base_f, P)};
    int32_t *h32 = ep_malloc(sizeof(int32_t) * 2 * (size_t)n_heads), *l32 = ep_malloc(sizeof(int32_t) * (size_t)nL);
    for (int i = 0; i < 2 * n_heads; i++) h32[i] = heads[i];
    for (int i = 0; i < nL; i++) l32[i] = layers[i];
    h5shape ls = {2, {nL, nS}}, lsp = {3, {nL, nS, P}}, p1 = {1, {P}};
    int rc = h5store_write_i32(&s, "heads", &(h5shape){2, {n_heads, 2}}, h32, err) ||
             h5store_label(&s, "heads", "head,layer_head", err) ||
             h5store_write_f32(&s, "head_means", &(h5shape){2, {n_heads, D}}, means, err) ||
             h5store_label(&s, "head_means", "head,hidden", err) ||
             h5store_write_f32(&s, "vector", &(h5shape){1, {D}}, vec, err) || h5store_label(&s, "vector", "hidden", err) ||
             h5store_write_i32(&s, "layers", &(h5shape){1, {nL}}, l32, err) || h5store_label(&s, "layers", "layer", err) ||
             h5store_write_f32(&s, "scales", &(h5shape){1, {nS}}, scales, err) || h5store_label(&s, "scales", "scale", err) ||
             h5store_write_i32(&s, "correct", &lsp, correct, err) || h5store_label(&s, "correct", "layer,scale,prompt", err) ||
             h5store_write_i32(&s, "first_token_correct", &lsp, first, err) ||
             h5store_label(&s, "first_token_correct", "layer,scale,prompt", err) ||
             h5store_write_f64(&s, "accuracy", &ls, acc, err) || h5store_label(&s, "accuracy", "layer,scale", err) ||
             h5store_write_f64(&s, "first_token_accuracy", &ls, facc, err) ||
             h5store_label(&s, "first_token_accuracy", "layer,scale", err) ||
             h5store_write_i32(&s, "baseline/correct", &p1, base_c, err) || h5store_label(&s, "baseline/correct", "prompt", err) ||
             h5store_write_i32(&s, "baseline/first_token_correct", &p1, base_f, err) ||
             h5store_label(&s, "baseline/first_token_correct", "prompt", err) ||
             h5store_write_f64(&s, "baseline/accuracy", &(h5shape){1, {2}}, base, err) ||
             h5store_label(&s, "baseline/accuracy", "metric", err) ||
             h5store_set_strs_at(&s, "baseline/accuracy", "enum_names", (const char *const[]){"accuracy", "first_token_accuracy"}, 2, err) ||
             h5store_set_str(&s, "format", FV_FORMAT, err) || h5store_set_str(&s, "inputs_hash", identity, err) ||
             h5store_set_str(&s, "heads_from", from, err) || h5store_set_i64(&s, "n_prompts", P, err)
                 ? -1
                 : 0;
    free(acc), free(facc), free(h32), free(l32);
    // Test hook (tests/cli_fv.sh): EDGEPATCH_TEST_KILL_FV=write dies with the data written, not committed.
    const char *kill = getenv("EDGEPATCH_TEST_KILL_FV");
    if (rc == 0 && kill && !strcmp(kill, "write")) raise(SIGKILL);
    if (rc) {
        h5store_abandon(&s);
        return -1;
    }
    return h5store_commit(&s, err);
}

int fv_stage(stage_inputs *in, int fresh, ep_error *err) {
    const run_config *cfg = in->cfg;
    const run_fv *f = &cfg->fv;
    if (!f->on) return 0;
    if (run_config_check_values(cfg, err)) return -1;
    const model_config *c = &in->m.cfg;
    int *heads = NULL, n_heads = 0, nL = f->n_layers ? f->n_layers : c->n_layers, nS = f->n_scales, D = c->hidden,
        P = in->prompts.n_prompts, V = c->vocab_size, rc = 0;
    char from[32], identity[17], path[4200];
    if (fv_choose_heads(cfg, c, cfg->output_path, &heads, &n_heads, from, err)) return -1;
    int *layers = ep_malloc(sizeof(int) * (size_t)nL);
    for (int i = 0; i < nL; i++) layers[i] = f->n_layers ? (int)f->layers[i] : i;
    fv_identity(in, heads, n_heads, layers, nL, identity);
    snprintf(path, sizeof path, "%s/function_vectors.h5", cfg->output_path);
    ep_error why;
    h5store_origin was = fresh ? H5STORE_ABSENT : h5store_made_from_format(path, identity, FV_FORMAT, &why);
    if (was == H5STORE_SAME) {
        ep_log_result(in->log, "fv: up to date (%s)", path);
        free(heads), free(layers);
        return 0;
    }
    // The file is this stage's alone (nothing later reads it but the report): another config's is rebuilt.
    if (was == H5STORE_DAMAGED) ep_logf(in->log, EP_LOG_WARN, "edgepatch: rebuilding %s: %s", path, why.msg);
    if (was == H5STORE_OTHER) ep_logf(in->log, EP_LOG_WARN, "edgepatch: rebuilding %s: made from other inputs", path);
    tokenizer *tk = NULL;
    if (tokenizer_load(in->prompts.tokenizer_path, &tk, err)) {
        free(heads), free(layers);
        return -1;
    }
    prompt_batch pb = stage_batch(in, 0, P);
    float *means = ep_malloc(sizeof(float) * (size_t)n_heads * D), *vec = ep_malloc(sizeof(float) * (size_t)D);
    float *scales = ep_malloc(sizeof(float) * (size_t)nS), *last = ep_malloc(sizeof(float) * (size_t)V);
    int max_new = (int)cfg->max_new_tokens, *gen = ep_malloc(sizeof(int) * (size_t)max_new),
        *tokens = ep_malloc(sizeof(int) * (size_t)(in->prompts.max_len ? in->prompts.max_len : 1));
    size_t LSP = (size_t)nL * nS * P;
    int32_t *correct = ep_calloc(LSP ? LSP : 1, sizeof(int32_t)), *first = ep_calloc(LSP ? LSP : 1, sizeof(int32_t)),
            *base_c = ep_calloc((size_t)P, sizeof(int32_t)), *base_f = ep_calloc((size_t)P, sizeof(int32_t));
    for (int i = 0; i < nS; i++) scales[i] = (float)f->scales[i];
    rc = fv_head_means(&in->dev, in->ops, &pb, heads, n_heads, means, err);
    for (int d = 0; d < D && rc == 0; d++) {  // the function vector: the heads' means summed in head order
        double s = 0;
        for (int h = 0; h < n_heads; h++) s += means[(size_t)h * D + d];
        vec[d] = (float)s;
    }
    for (int p = 0; p < P && rc == 0; p++) {
        int n = fv_zero_shot(&pb, p, tokens);
        rc = measure(in, tk, tokens, n, p, -1, NULL, 0, last, gen, &base_c[p], &base_f[p], err);
        for (int l = 0; l < nL && rc == 0; l++)
            for (int s = 0; s < nS && rc == 0; s++) {
                size_t at = ((size_t)l * nS + s) * P + p;
                rc = measure(in, tk, tokens, n, p, layers[l], vec, scales[s], last, gen, &correct[at], &first[at], err);
            }
    }
    if (rc == 0)
        rc = write_output(path, identity, from, n_heads, heads, D, means, vec, nL, layers, nS, scales, P, correct, first,
                          base_c, base_f, err);
    if (rc == 0) {
        double best = -1;
        int bl = 0, bs = 0;
        for (int l = 0; l < nL; l++)
            for (int s = 0; s < nS; s++) {
                double a = mean_i32(correct + ((size_t)l * nS + s) * P, P);
                if (a > best) best = a, bl = l, bs = s;
            }
        ep_log_result(in->log, "fv: %d heads (%s), %d layers x %d scales over %d zero-shot prompts: accuracy %.3f "
                      "without the vector, best %.3f (layer %d, scale %g) -> %s", n_heads, from, nL, nS, P,
                      mean_i32(base_c, P), best, layers[bl], scales[bs], path);
    }
    tokenizer_free(tk);
    free(heads), free(layers), free(means), free(vec), free(scales), free(last), free(gen), free(tokens);
    free(correct), free(first), free(base_c), free(base_f);
    return rc;
}

void fv_summary_free(fv_summary *v) {
    free(v->layers), free(v->scales), free(v->accuracy), free(v->first), free(v->from);
    memset(v, 0, sizeof *v);
}

int fv_summary_load(const char *run, fv_summary *v, ep_error *err) {
    char path[4200];
    memset(v, 0, sizeof *v);
    snprintf(path, sizeof path, "%s/function_vectors.h5", run);
    if (access(path, F_OK)) return 0;
    h5store s;
    if (h5store_open(path, &s, err)) return -1;
    h5shape a, b, c, d, e, hs;
    double *base = NULL;
    int32_t *heads = NULL;
    int rc = h5store_read_i32(&s, "layers", &a, &v->layers, err) || h5store_read_f32(&s, "scales", &b, &v->scales, err) ||
             h5store_read_f64(&s, "accuracy", &c, &v->accuracy, err) ||
             h5store_read_f64(&s, "first_token_accuracy", &d, &v->first, err) ||
             h5store_read_f64(&s, "baseline/accuracy", &e, &base, err) || h5store_read_i32(&s, "heads", &hs, &heads, err) ||
             h5store_get_str(&s, "heads_from", &v->from, err)
                 ? -1
                 : 0;
    if (rc == 0 && (a.rank != 1 || b.rank != 1 || c.rank != 2 || c.dims[0] != a.dims[0] || c.dims[1] != b.dims[0] ||
                    d.rank != 2 || d.dims[0] != c.dims[0] || d.dims[1] != c.dims[1] || e.rank != 1 || e.dims[0] != 2 ||
                    hs.rank != 2))
        rc = ep_fail(err, "%s: datasets of the wrong shape", path);
    if (rc == 0) {
        v->n_layers = (int)a.dims[0], v->n_scales = (int)b.dims[0], v->n_heads = (int)hs.dims[0];
        v->base[0] = base[0], v->base[1] = base[1];
    }
    free(base), free(heads);
    h5store_close(&s);
    if (rc) fv_summary_free(v);
    return rc ? -1 : 1;
}

void fv_summary_best(const fv_summary *v, int *layer, int *scale) {
    int bl = 0, bs = 0;
    for (int l = 0; l < v->n_layers; l++)
        for (int k = 0; k < v->n_scales; k++)
            if (v->accuracy[l * v->n_scales + k] > v->accuracy[bl * v->n_scales + bs]) bl = l, bs = k;
    *layer = bl, *scale = bs;
}
