#include "mean_stage.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline/h5store.h"
#include "pipeline/hash.h"
#include "stages/mean_donor.h"

typedef struct {
    stage_inputs *in;
    char identity[17];
} mean_ctx;

static void mean_identity(const stage_inputs *in, char out[17]) {
    uint64_t h = hash_str(HASH_INIT, "mean");
    h = hash_str(h, in->prompts_hash);
    h = hash_str(h, in->model_hash);
    hash_hex(h, out);
}

static int n_chunks(const stage_inputs *in) { return (in->prompts.n_prompts + MEAN_CHUNK - 1) / MEAN_CHUNK; }

static void chunk_range(const stage_inputs *in, int item, int *first, int *n) {
    *first = item * MEAN_CHUNK;
    *n = *first + MEAN_CHUNK <= in->prompts.n_prompts ? MEAN_CHUNK : in->prompts.n_prompts - *first;
}

static void chunk_identity(const stage_inputs *in, int item, char out[17]) {
    char stage[17];
    int first, n;
    mean_identity(in, stage);
    chunk_range(in, item, &first, &n);
    stage_item_identity(stage, first, n, out);
}

static int mean_prepare(work_stage *ws, int fresh, ep_error *err) {
    mean_ctx *c = ws->ctx;
    return stage_shard_dir_prepare(c->in, "mean", fresh, err);
}

static int mean_item_done(work_stage *ws, int item, ep_error *err) {
    mean_ctx *c = ws->ctx;
    char path[4096], identity[17];
    chunk_identity(c->in, item, identity);
    stage_item_path(c->in, "mean", item, path, sizeof path);
    return stage_item_current(path, identity, MEAN_ITEM_FORMAT, c->in->log, err);
}

static const char *parts[3] = {"k", "v", "z"};

static int mean_run_item(work_stage *ws, int item, ep_error *err) {
    mean_ctx *mc = ws->ctx;
    stage_inputs *in = mc->in;
    const model_config *c = &in->m.cfg;
    int first, n, rc = 0, kd = c->n_kv_heads * c->head_dim, zd = c->n_heads * c->head_dim;
    chunk_range(in, item, &first, &n);
    mean_sums sums;
    mean_sums_init(&sums, c->n_layers, kd, zd);
    for (int o = 0; o < n && rc == 0; o += MEAN_BATCH) {
        prompt_batch pb = stage_batch(in, first + o, n - o < MEAN_BATCH ? n - o : MEAN_BATCH);
        kv_cache clean;
        memset(&clean, 0, sizeof clean);
        rc = patch_clean_pass(&in->dev, in->ops, &pb, &clean, err);
        if (rc == 0) rc = mean_sums_add(&sums, &clean, &pb, err);
        kv_cache_free(&clean);
    }
    char path[4096], identity[17];
    chunk_identity(in, item, identity);
    stage_item_path(in, "mean", item, path, sizeof path);
    h5store s;
    if (rc == 0 && !ws->follower && (rc = h5store_create(path, &s, err)) == 0) {
        int K = sums.n_keys;
        int32_t *keys = ep_malloc(sizeof(int32_t) * (size_t)(3 * K + 1));
        for (int i = 0; i < K; i++) keys[3 * i] = sums.keys[i].type, keys[3 * i + 1] = sums.keys[i].index, keys[3 * i + 2] = sums.keys[i].offset;
        rc = h5store_write_i32(&s, "keys", &(h5shape){2, {K, 3}}, keys, err) ||
             h5store_label(&s, "keys", "group,type_index_offset", err) ||
             h5store_write_i32(&s, "count", &(h5shape){1, {K}}, sums.count, err) || h5store_label(&s, "count", "group", err);
        free(keys);
        const double *data[3] = {sums.k, sums.v, sums.z};
        for (int w = 0; w < 3 && rc == 0; w++) {
            h5shape sh = {4, {K, c->n_layers, w == 2 ? c->n_heads : c->n_kv_heads, c->head_dim}};
            rc = h5store_write_f64(&s, parts[w], &sh, data[w], err) ||
                 h5store_label(&s, parts[w], w == 2 ? "group,layer,head,d_head" : "group,layer,kv_head,d_head", err);
        }
        char stage[17];
        mean_identity(in, stage);
        if (rc == 0)
            rc = h5store_set_str(&s, "format", MEAN_ITEM_FORMAT, err) || h5store_set_str(&s, "inputs_hash", identity, err) ||
                 h5store_set_str(&s, "stage_hash", stage, err) || h5store_set_str(&s, "model_hash", in->model_hash, err) ||
                 h5store_set_i64(&s, "first_prompt", first, err) || h5store_set_i64(&s, "n_prompts", n, err);
        if (rc == 0 && ws->before_commit) ws->before_commit(ws->driver_arg, item);
        if (rc) h5store_abandon(&s);
        else rc = h5store_commit(&s, err);
    }
    mean_sums_free(&sums);
    return rc;
}

static int mean_finish(work_stage *ws, ep_error *err) {
    (void)err;
    mean_ctx *c = ws->ctx;
    if (!ws->follower)
        ep_log_result(ws->log, "mean donor: %d prompts in %d chunks -> %s/mean.d/", c->in->prompts.n_prompts, ws->n_items,
                      c->in->cfg->output_path);
    return 0;
}

static void mean_release(work_stage *ws) {
    free(ws->ctx);
    ws->ctx = NULL;
}

int mean_stage_work(stage_inputs *in, work_stage *ws, ep_error *err) {
    if (in->m.cfg.tp.size > 1) return ep_fail(err, "the mean donor does not run tensor-parallel yet (tensor_parallel 1)");
    mean_ctx *c = ep_calloc(1, sizeof *c);
    c->in = in;
    mean_identity(in, c->identity);
    *ws = (work_stage){.name = "mean", .n_items = n_chunks(in), .ctx = c, .log = in->log, .prepare = mean_prepare,
                       .item_done = mean_item_done, .run_item = mean_run_item, .finish = mean_finish,
                       .release = mean_release};
    return 0;
}

// Chunk `item`'s sums from its shard.
static int read_chunk(const stage_inputs *in, int item, mean_sums *out, ep_error *err) {
    const model_config *c = &in->m.cfg;
    int kd = c->n_kv_heads * c->head_dim, zd = c->n_heads * c->head_dim;
    char path[4096], identity[17], *have = NULL;
    chunk_identity(in, item, identity);
    stage_item_path(in, "mean", item, path, sizeof path);
    mean_sums_init(out, c->n_layers, kd, zd);
    h5store s;
    if (h5store_open(path, &s, err)) return -1;
    int rc = h5store_get_str(&s, "inputs_hash", &have, err);
    if (rc == 0 && strcmp(have, identity)) rc = ep_fail(err, "%s: made from other inputs than this run's; rerun the stages", path);
    free(have);
    h5shape ks, cs;
    int32_t *keys = NULL, *count = NULL;
    if (rc == 0) rc = h5store_read_i32(&s, "keys", &ks, &keys, err) || h5store_read_i32(&s, "count", &cs, &count, err);
    int K = rc == 0 ? (int)ks.dims[0] : 0;
    if (rc == 0 && (ks.rank != 2 || ks.dims[1] != 3 || cs.rank != 1 || cs.dims[0] != K))
        rc = ep_fail(err, "%s: datasets keys and count disagree", path);
    double *data[3] = {NULL, NULL, NULL};
    for (int w = 0; w < 3 && rc == 0; w++) {
        h5shape sh;
        rc = h5store_read_f64(&s, parts[w], &sh, &data[w], err);
        if (rc == 0 && (sh.rank != 4 || sh.dims[0] != K || sh.dims[1] != c->n_layers ||
                        sh.dims[2] * sh.dims[3] != (w == 2 ? zd : kd)))
            rc = ep_fail(err, "%s: dataset %s has the wrong shape for this model", path, parts[w]);
    }
    h5store_close(&s);
    if (rc == 0) {
        out->n_keys = out->cap = K;
        out->keys = ep_malloc(sizeof(mean_key) * (size_t)(K + 1));
        for (int i = 0; i < K; i++) out->keys[i] = (mean_key){keys[3 * i], keys[3 * i + 1], keys[3 * i + 2]};
        out->count = count, count = NULL;
        out->k = data[0], out->v = data[1], out->z = data[2];
        data[0] = data[1] = data[2] = NULL;
    }
    free(keys), free(count), free(data[0]), free(data[1]), free(data[2]);
    return rc;
}

int mean_stage_load(stage_inputs *in, ep_error *err) {
    const model_config *c = &in->m.cfg;
    mean_sums all;
    mean_sums_init(&all, c->n_layers, c->n_kv_heads * c->head_dim, c->n_heads * c->head_dim);
    int rc = 0;
    for (int item = 0; item < n_chunks(in) && rc == 0; item++) {
        mean_sums chunk;
        rc = read_chunk(in, item, &chunk, err);
        if (rc == 0) mean_sums_merge(&all, &chunk);
        mean_sums_free(&chunk);
    }
    if (rc == 0) {
        if (in->mean) mean_table_free(in->mean);
        else in->mean = ep_calloc(1, sizeof *in->mean);
        mean_table_from_sums(&all, in->mean);
    }
    mean_sums_free(&all);
    return rc;
}

int mean_stage(stage_inputs *in, int fresh, ep_error *err) {
    work_stage ws;
    if (mean_stage_work(in, &ws, err)) return -1;
    int rc = stage_run_items(&ws, fresh, err);
    ws.release(&ws);
    return rc ? rc : mean_stage_load(in, err);
}
