#include "cache.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline/h5store.h"
#include "pipeline/hash.h"

void cache_identity(const stage_inputs *in, char out[17]) {
    uint64_t h = hash_str(HASH_INIT, "cache");
    h = hash_str(h, in->prompts_hash);
    h = hash_str(h, in->model_hash);
    h = hash_str(h, in->plan_hash);
    hash_hex(h, out);
}

// Rows of one sequence of one layer of a cache <-> a [L, T, dim] array.
static void copy_rows(const kv_cache *c, int which, int seq, int T, float *flat, int to_cache) {
    int dim = which == 2 ? c->z_dim : c->kv_dim;
    for (int l = 0; l < c->n_layers; l++) {
        float *row = which == 0 ? kv_cache_k(c, l, seq, 0) : which == 1 ? kv_cache_v(c, l, seq, 0) : kv_cache_z(c, l, seq, 0);
        float *f = flat + (size_t)l * T * dim;
        if (to_cache) memcpy(row, f, sizeof(float) * (size_t)T * dim);
        else memcpy(f, row, sizeof(float) * (size_t)T * dim);
    }
}

static const char *parts[3] = {"k", "v", "z"};

int cache_stage(stage_inputs *in, int fresh, ep_error *err) {
    char path[4096], identity[17];
    snprintf(path, sizeof path, "%s/cache.h5", in->cfg->output_path);
    cache_identity(in, identity);
    int current = stage_output_current(path, identity, fresh, err);
    if (current < 0) return -1;
    if (current) {
        printf("cache: %s is up to date\n", path);
        return 0;
    }
    const prompt_set *ps = &in->prompts;
    int K = in->plan.n_donors, B = in->cfg->batch_size, rc = 0;
    h5store s;
    if (h5store_create(path, &s, err)) return -1;
    const model_config *c = &in->m.cfg;
    for (int first = 0; first < ps->n_prompts && rc == 0 && K > 0; first += B) {
        int n = first + B <= ps->n_prompts ? B : ps->n_prompts - first;
        prompt_batch pb = stage_batch(in, first, n);
        kv_cache donors[16];
        memset(donors, 0, sizeof donors);
        rc = patch_donor_passes(&in->m, kernel_ops_cpu(), &in->plan, &pb, donors, err);
        for (int i = 0; i < n && rc == 0; i++) {
            int T = pb.lengths[i];
            for (int d = 0; d < K && rc == 0; d++)
                for (int w = 0; w < 3 && rc == 0; w++) {
                    int dim = w == 2 ? donors[d].z_dim : donors[d].kv_dim;
                    float *flat = ep_malloc(sizeof(float) * (size_t)c->n_layers * T * dim);
                    copy_rows(&donors[d], w, i, T, flat, 0);
                    char name[96];
                    snprintf(name, sizeof name, "prompt%d/donor%d/%s", first + i, d, parts[w]);
                    h5shape sh = {3, {c->n_layers, T, dim}};
                    rc = h5store_write_f32(&s, name, &sh, flat, err);
                    free(flat);
                }
        }
        for (int d = 0; d < 16; d++) kv_cache_free(&donors[d]);
        if (rc == 0) printf("cache: prompts %d..%d of %d\n", first, first + n - 1, ps->n_prompts);
    }
    if (rc == 0)
        rc = h5store_set_str(&s, "format", "edgepatch-cache-1", err) || h5store_set_str(&s, "inputs_hash", identity, err) ||
             h5store_set_str(&s, "model_hash", in->model_hash, err) || h5store_set_str(&s, "plan_hash", in->plan_hash, err) ||
             h5store_set_str(&s, "plan", in->plan.name, err) || h5store_set_i64(&s, "n_prompts", ps->n_prompts, err) ||
             h5store_set_i64(&s, "n_donors", K, err);
    if (rc) {
        h5store_abandon(&s);
        return -1;
    }
    if (h5store_commit(&s, err)) return -1;
    printf("cache: %d prompts x %d donors -> %s\n", ps->n_prompts, K, path);
    return 0;
}

int cache_load_batch(const char *path, const stage_inputs *in, int first, int n, kv_cache *donors, ep_error *err) {
    int K = in->plan.n_donors, rc = 0;
    if (K == 0) return 0;
    h5store s;
    char identity[17], *have = NULL;
    cache_identity(in, identity);
    if (h5store_open(path, &s, err)) return -1;
    if (h5store_get_str(&s, "inputs_hash", &have, err) || strcmp(have, identity))
        rc = ep_fail(err, "%s: made from other inputs than this run's; rerun the cache stage", path);
    free(have);
    const model_config *c = &in->m.cfg;
    for (int d = 0; d < K && rc == 0; d++) rc = kv_cache_init(&donors[d], c, n, in->prompts.max_len, 1, err);
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
                int dim = w == 2 ? donors[d].z_dim : donors[d].kv_dim;
                if (rc == 0 && (sh.rank != 3 || sh.dims[0] != c->n_layers || sh.dims[1] != T || sh.dims[2] != dim))
                    rc = ep_fail(err, "%s: dataset %s has the wrong shape for this model and prompt", path, name);
                if (rc == 0) copy_rows(&donors[d], w, i, T, flat, 1);
                free(flat);
            }
        }
    }
    h5store_close(&s);
    return rc;
}
