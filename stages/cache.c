#include "cache.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline/h5store.h"
#include "pipeline/hash.h"
#include "stages/mean_stage.h"

// The config's cache_dtype: 0 for "fp32" (the default), 1 for "bf16" (checked by run_config_parse).
static int cache_bf16(const stage_inputs *in) { return in->cfg->cache_bf16; }

void cache_identity(const stage_inputs *in, char out[17]) {
    uint64_t h = hash_str(HASH_INIT, cache_bf16(in) == 1 ? "cache-bf16" : "cache");
    h = hash_str(h, in->prompts_hash);
    h = hash_str(h, in->model_hash);
    h = hash_str(h, in->plan_hash);
    h = hash_bytes(h, &in->n_cached_donors, sizeof in->n_cached_donors);
    hash_hex(h, out);
}

// Rows of one sequence of one layer of a cache (host or backend memory) <-> a host [L, T, flat_dim] array
// whose columns [col0, col0 + dim) are the cache's (a tensor-parallel shard's cache holds only its heads'
// columns of the stored whole).
static void copy_rows(const kv_cache *c, int which, int seq, int T, float *flat, int flat_dim, int col0, int to_cache) {
    const kernel_ops *ops = c->backend ? c->backend : kernel_ops_cpu();
    int dim = which == 2 ? c->z_dim : c->kv_dim, whole = flat_dim == dim;  // whole rows: one block per layer
    for (int l = 0; l < c->n_layers; l++)
        for (int t = 0; t < (whole ? 1 : T); t++) {
            float *row = which == 0 ? kv_cache_k(c, l, seq, t) : which == 1 ? kv_cache_v(c, l, seq, t) : kv_cache_z(c, l, seq, t);
            float *f = flat + ((size_t)l * T + t) * flat_dim + col0;
            size_t bytes = sizeof(float) * (size_t)dim * (whole ? (size_t)T : 1);
            if (to_cache) ops->upload(row, f, bytes);
            else ops->download(f, row, bytes);
        }
}

static const char *parts[3] = {"k", "v", "z"};
// Stored per head (TransformerLens's [pos, head, d_head] after the layer): the same bytes as the flat
// [layers, T, heads * head_dim] rows, in a 4-D dataspace.
static const char *part_labels[3] = {"layer,position,kv_head,d_head", "layer,position,kv_head,d_head",
                                     "layer,position,head,d_head"};

typedef struct {
    stage_inputs *in;
    char identity[17];
    int bf16;  // store donor activations as bfloat16 (cache_dtype "bf16")
} cache_ctx;

static int cache_prepare(work_stage *ws, int fresh, ep_error *err) {
    cache_ctx *c = ws->ctx;
    return stage_shard_dir_prepare(c->in, "cache", fresh, err);
}

static int cache_item_done(work_stage *ws, int item, ep_error *err) {
    cache_ctx *c = ws->ctx;
    char path[4096], identity[17];
    int first, n;
    stage_item_range(c->in, item, &first, &n);
    stage_item_identity(c->identity, first, n, identity);
    stage_item_path(c->in, "cache", item, path, sizeof path);
    return stage_item_current(path, identity, CACHE_ITEM_FORMAT, c->in->log, err);
}

static int cache_run_item(work_stage *ws, int item, ep_error *err) {
    cache_ctx *cc = ws->ctx;
    stage_inputs *in = cc->in;
    char path[4096], identity[17];
    int first, n, K = in->n_cached_donors, rc = 0;
    stage_item_range(in, item, &first, &n);
    stage_item_identity(cc->identity, first, n, identity);
    stage_item_path(in, "cache", item, path, sizeof path);
    const model_config *c = &in->m.cfg;
    prompt_batch pb = stage_batch(in, first, n);
    kv_cache donors[16];
    memset(donors, 0, sizeof donors);
    ablation_plan plan = in->plan;  // donor 0, a clean pass, for the ablations when the plan reads no donor
    plan.n_donors = K;
    if (K > 0) rc = patch_donor_passes(&in->dev, in->ops, &plan, &pb, donors, err);
    // A tensor-parallel group's leader writes the whole model's keys, values and head outputs (gathered
    // into host caches).
    for (int d = 0; d < K && rc == 0 && c->tp.size > 1; d++) {
        kv_cache whole;
        rc = kv_cache_gather(&in->dev, &donors[d], &whole, err);
        kv_cache_free(&donors[d]);
        donors[d] = whole;
    }
    h5store s;
    if (rc == 0 && !ws->follower && (rc = h5store_create(path, &s, err)) == 0) {
        for (int i = 0; i < n && rc == 0; i++) {
            int T = pb.lengths[i];
            for (int d = 0; d < K && rc == 0; d++)
                for (int w = 0; w < 3 && rc == 0; w++) {
                    int dim = w == 2 ? donors[d].z_dim : donors[d].kv_dim;
                    float *flat = ep_malloc(sizeof(float) * (size_t)c->n_layers * T * dim);
                    copy_rows(&donors[d], w, i, T, flat, dim, 0, 0);
                    char name[96];
                    snprintf(name, sizeof name, "prompt%d/donor%d/%s", first + i, d, parts[w]);
                    h5shape sh = {4, {c->n_layers, T, dim / c->head_dim, c->head_dim}};
                    rc = cc->bf16 ? h5store_write_bf16(&s, name, &sh, flat, err) : h5store_write_f32(&s, name, &sh, flat, err);
                    if (rc == 0) rc = h5store_label(&s, name, part_labels[w], err);
                    free(flat);
                }
        }
        if (rc == 0)
            rc = h5store_set_str(&s, "format", CACHE_ITEM_FORMAT, err) ||
                 h5store_set_str(&s, "inputs_hash", identity, err) || h5store_set_str(&s, "stage_hash", cc->identity, err) ||
                 h5store_set_str(&s, "model_hash", in->model_hash, err) || h5store_set_str(&s, "plan_hash", in->plan_hash, err) ||
                 h5store_set_str(&s, "plan", in->plan.name, err) || h5store_set_i64(&s, "item", item, err) ||
                 h5store_set_i64(&s, "first_prompt", first, err) || h5store_set_i64(&s, "n_prompts", n, err) ||
                 h5store_set_i64(&s, "n_donors", K, err) || h5store_set_str(&s, "dtype", cc->bf16 ? "bf16" : "fp32", err);
        if (rc == 0 && ws->before_commit) ws->before_commit(ws->driver_arg, item);
        if (rc) h5store_abandon(&s);
        else rc = h5store_commit(&s, err);
    }
    for (int d = 0; d < 16; d++) kv_cache_free(&donors[d]);
    return rc;
}

static int cache_finish(work_stage *ws, ep_error *err) {
    cache_ctx *c = ws->ctx;
    if (ws->follower) return 0;
    ep_log_result(ws->log, "cache: %d prompts x %d donors in %d items -> %s/cache.d/", c->in->prompts.n_prompts,
                  c->in->n_cached_donors, ws->n_items, c->in->cfg->output_path);
    return 0;
}

static void cache_release(work_stage *ws) {
    free(ws->ctx);
    ws->ctx = NULL;
}

int cache_work(stage_inputs *in, work_stage *ws, ep_error *err) {
    if (run_config_check_values(in->cfg, err)) return -1;
    cache_ctx *c = ep_calloc(1, sizeof *c);
    c->in = in;
    c->bf16 = cache_bf16(in);
    cache_identity(in, c->identity);
    *ws = (work_stage){.name = "cache", .n_items = stage_n_items(in), .ctx = c, .log = in->log, .prepare = cache_prepare,
                       .item_done = cache_item_done, .run_item = cache_run_item, .finish = cache_finish,
                       .release = cache_release};
    return 0;
}

int cache_stage(stage_inputs *in, int fresh, ep_error *err) {
    if (in->mean_donors && !in->mean && mean_stage(in, fresh, err)) return -1;  // the mean donor's table first
    work_stage ws;
    if (cache_work(in, &ws, err)) return -1;
    int rc = stage_run_items(&ws, fresh, err);
    ws.release(&ws);
    return rc;
}

int cache_load_item(const stage_inputs *in, int item, kv_cache *donors, int *damaged, ep_error *err) {
    int K = in->n_cached_donors, rc = 0, first, n;
    *damaged = 0;
    if (K == 0) return 0;
    char path[4096], stage_id[17], identity[17], *have = NULL;
    stage_item_range(in, item, &first, &n);
    stage_item_path(in, "cache", item, path, sizeof path);
    cache_identity(in, stage_id);
    stage_item_identity(stage_id, first, n, identity);
    h5store s;
    if (h5store_open(path, &s, err)) return *damaged = 1, -1;
    if (h5store_get_str(&s, "inputs_hash", &have, err) || strcmp(have, identity))
        rc = ep_fail(err, "%s: made from other inputs than this run's; rerun the cache stage", path);
    free(have);
    const model_config *c = &in->m.cfg;
    tp_shard t = model_config_local(c);
    int hd = c->head_dim, heads[3] = {c->n_kv_heads, c->n_kv_heads, c->n_heads},
        full[3] = {c->n_kv_heads * hd, c->n_kv_heads * hd, c->n_heads * hd},
        col0[3] = {t.kv_head0 * hd, t.kv_head0 * hd, t.head0 * hd};
    for (int d = 0; d < K && rc == 0; d++)
        rc = kv_cache_init_backend(&donors[d], c, n, in->prompts.max_len, 1, in->ops, err);
    for (int i = 0; i < n && rc == 0; i++) {
        int T = in->prompts.lengths[first + i];
        for (int d = 0; d < K && rc == 0; d++) {
            donors[d].len[i] = T;
            for (int w = 0; w < 3 && rc == 0; w++) {
                char name[96];
                snprintf(name, sizeof name, "prompt%d/donor%d/%s", first + i, d, parts[w]);
                h5shape sh;
                float *flat = NULL;
                rc = h5store_read_f32(&s, name, &sh, &flat, err);
                if (rc) *damaged = 1;
                if (rc == 0 && (sh.rank != 4 || sh.dims[0] != c->n_layers || sh.dims[1] != T || sh.dims[2] != heads[w] ||
                                sh.dims[3] != hd))
                    rc = ep_fail(err, "%s: dataset %s has the wrong shape for this model and prompt", path, name);
                if (rc == 0) copy_rows(&donors[d], w, i, T, flat, full[w], col0[w], 1);
                free(flat);
            }
        }
    }
    h5store_close(&s);
    return rc;
}
