#include "mean_donor.h"

#include <stdlib.h>
#include <string.h>

void mean_sums_init(mean_sums *s, int n_layers, int kv_dim, int z_dim) {
    memset(s, 0, sizeof *s);
    s->n_layers = n_layers, s->kv_dim = kv_dim, s->z_dim = z_dim;
}

void mean_sums_free(mean_sums *s) {
    free(s->keys), free(s->count), free(s->k), free(s->v), free(s->z);
    memset(s, 0, sizeof *s);
}

void mean_table_free(mean_table *t) {
    free(t->keys), free(t->k), free(t->v), free(t->z);
    memset(t, 0, sizeof *t);
}

void mean_keys_of(const prompt_batch *pb, int s, mean_key *keys) {
    const int32_t *ty = pb->types + (size_t)s * pb->max_len, *ix = pb->index + (size_t)s * pb->max_len;
    for (int t = 0; t < pb->lengths[s]; t++) {
        int same = t > 0 && ty[t] == ty[t - 1] && ix[t] == ix[t - 1];
        keys[t] = (mean_key){ty[t], ix[t], same ? keys[t - 1].offset + 1 : 0};
    }
}

static int key_equal(mean_key a, mean_key b) { return a.type == b.type && a.index == b.index && a.offset == b.offset; }

// The group's slot (appended, zeroed, if new).
static int slot_of(mean_sums *s, mean_key key) {
    for (int i = s->n_keys - 1; i >= 0; i--)  // groups come in position order: the recent ones first
        if (key_equal(s->keys[i], key)) return i;
    if (s->n_keys == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 64;
        size_t kv = (size_t)s->cap * s->n_layers * s->kv_dim, z = (size_t)s->cap * s->n_layers * s->z_dim;
        s->keys = ep_realloc(s->keys, sizeof(mean_key) * (size_t)s->cap);
        s->count = ep_realloc(s->count, sizeof(int32_t) * (size_t)s->cap);
        s->k = ep_realloc(s->k, sizeof(double) * kv), s->v = ep_realloc(s->v, sizeof(double) * kv);
        s->z = ep_realloc(s->z, sizeof(double) * z);
    }
    int i = s->n_keys++;
    size_t kv = (size_t)s->n_layers * s->kv_dim, z = (size_t)s->n_layers * s->z_dim;
    s->keys[i] = key, s->count[i] = 0;
    memset(s->k + i * kv, 0, sizeof(double) * kv), memset(s->v + i * kv, 0, sizeof(double) * kv);
    memset(s->z + i * z, 0, sizeof(double) * z);
    return i;
}

int mean_sums_add(mean_sums *s, const kv_cache *clean, const prompt_batch *pb, ep_error *err) {
    if (!clean->z || clean->kv_dim != s->kv_dim || clean->z_dim != s->z_dim || clean->n_layers != s->n_layers)
        return ep_fail(err, "mean donor: the clean cache does not match the model's shape");
    const kernel_ops *ops = clean->backend ? clean->backend : kernel_ops_cpu();
    int L = s->n_layers, kd = s->kv_dim, zd = s->z_dim;
    mean_key *keys = ep_malloc(sizeof(mean_key) * (size_t)(pb->max_len > 0 ? pb->max_len : 1));
    int *slot = ep_malloc(sizeof(int) * (size_t)(pb->max_len > 0 ? pb->max_len : 1));
    float *rk = ep_malloc(sizeof(float) * (size_t)(pb->max_len + 1) * kd), *rv = ep_malloc(sizeof(float) * (size_t)(pb->max_len + 1) * kd);
    float *rz = ep_malloc(sizeof(float) * (size_t)(pb->max_len + 1) * zd);
    for (int q = 0; q < pb->n_seqs; q++) {
        int T = pb->lengths[q];
        mean_keys_of(pb, q, keys);
        for (int t = 0; t < T; t++) {
            slot[t] = slot_of(s, keys[t]);
            s->count[slot[t]]++;
        }
        for (int l = 0; l < L; l++) {
            ops->download(rk, kv_cache_k(clean, l, q, 0), sizeof(float) * (size_t)T * kd);
            ops->download(rv, kv_cache_v(clean, l, q, 0), sizeof(float) * (size_t)T * kd);
            ops->download(rz, kv_cache_z(clean, l, q, 0), sizeof(float) * (size_t)T * zd);
            for (int t = 0; t < T; t++) {
                double *dk = s->k + ((size_t)slot[t] * L + l) * kd, *dv = s->v + ((size_t)slot[t] * L + l) * kd;
                double *dz = s->z + ((size_t)slot[t] * L + l) * zd;
                for (int j = 0; j < kd; j++) dk[j] += rk[(size_t)t * kd + j], dv[j] += rv[(size_t)t * kd + j];
                for (int j = 0; j < zd; j++) dz[j] += rz[(size_t)t * zd + j];
            }
        }
    }
    free(keys), free(slot), free(rk), free(rv), free(rz);
    return 0;
}

void mean_sums_merge(mean_sums *into, const mean_sums *from) {
    size_t kv = (size_t)from->n_layers * from->kv_dim, z = (size_t)from->n_layers * from->z_dim;
    for (int i = 0; i < from->n_keys; i++) {
        int j = slot_of(into, from->keys[i]);
        into->count[j] += from->count[i];
        for (size_t e = 0; e < kv; e++) into->k[j * kv + e] += from->k[i * kv + e], into->v[j * kv + e] += from->v[i * kv + e];
        for (size_t e = 0; e < z; e++) into->z[j * z + e] += from->z[i * z + e];
    }
}

static int key_compare(const void *a, const void *b) {
    const mean_key *x = a, *y = b;
    if (x->type != y->type) return x->type < y->type ? -1 : 1;
    if (x->index != y->index) return x->index < y->index ? -1 : 1;
    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

void mean_table_from_sums(const mean_sums *s, mean_table *t) {
    size_t kv = (size_t)s->n_layers * s->kv_dim, z = (size_t)s->n_layers * s->z_dim, n = (size_t)(s->n_keys ? s->n_keys : 1);
    *t = (mean_table){.n_layers = s->n_layers, .kv_dim = s->kv_dim, .z_dim = s->z_dim, .n_keys = s->n_keys};
    t->keys = ep_malloc(sizeof(mean_key) * n);
    memcpy(t->keys, s->keys, sizeof(mean_key) * (size_t)s->n_keys);
    qsort(t->keys, (size_t)s->n_keys, sizeof(mean_key), key_compare);
    t->k = ep_malloc(sizeof(float) * n * kv), t->v = ep_malloc(sizeof(float) * n * kv), t->z = ep_malloc(sizeof(float) * n * z);
    for (int i = 0; i < s->n_keys; i++) {
        int j = 0;
        while (!key_equal(s->keys[j], t->keys[i])) j++;
        double c = s->count[j];
        for (size_t e = 0; e < kv; e++) t->k[i * kv + e] = (float)(s->k[j * kv + e] / c), t->v[i * kv + e] = (float)(s->v[j * kv + e] / c);
        for (size_t e = 0; e < z; e++) t->z[i * z + e] = (float)(s->z[j * z + e] / c);
    }
}

int mean_table_fill(const mean_table *t, const model_config *c, const kernel_ops *ops, const prompt_batch *pb,
                    kv_cache *donor, ep_error *err) {
    if (kv_cache_init_backend(donor, c, pb->n_seqs, pb->max_len, 1, ops, err)) return -1;
    if (donor->kv_dim != t->kv_dim || donor->z_dim != t->z_dim || donor->n_layers != t->n_layers)
        return ep_fail(err, "mean donor: the table was made for another model shape (or a tensor-parallel shard)");
    const kernel_ops *o = donor->backend ? donor->backend : kernel_ops_cpu();
    int L = t->n_layers, kd = t->kv_dim, zd = t->z_dim;
    size_t cap = (size_t)(pb->max_len > 0 ? pb->max_len : 1);
    mean_key *keys = ep_malloc(sizeof(mean_key) * cap);
    size_t *group = ep_malloc(sizeof(size_t) * cap);
    float *hk = ep_malloc(sizeof(float) * cap * kd), *hv = ep_malloc(sizeof(float) * cap * kd);
    float *hz = ep_malloc(sizeof(float) * cap * zd);
    int rc = 0;
    for (int q = 0; q < pb->n_seqs && rc == 0; q++) {
        int T = pb->lengths[q];
        mean_keys_of(pb, q, keys);
        for (int p = 0; p < T && rc == 0; p++) {
            const mean_key *hit = bsearch(&keys[p], t->keys, (size_t)t->n_keys, sizeof(mean_key), key_compare);
            if (!hit)
                rc = ep_fail(err, "mean donor: no mean for token type %d, example %d, offset %d (prompts not of this run?)",
                             keys[p].type, keys[p].index, keys[p].offset);
            else group[p] = (size_t)(hit - t->keys);
        }
        for (int l = 0; l < L && rc == 0; l++) {  // a sequence's rows of a layer are contiguous: one copy each
            for (int p = 0; p < T; p++) {
                memcpy(hk + (size_t)p * kd, t->k + (group[p] * L + l) * kd, sizeof(float) * (size_t)kd);
                memcpy(hv + (size_t)p * kd, t->v + (group[p] * L + l) * kd, sizeof(float) * (size_t)kd);
                memcpy(hz + (size_t)p * zd, t->z + (group[p] * L + l) * zd, sizeof(float) * (size_t)zd);
            }
            o->upload(kv_cache_k(donor, l, q, 0), hk, sizeof(float) * (size_t)T * kd);
            o->upload(kv_cache_v(donor, l, q, 0), hv, sizeof(float) * (size_t)T * kd);
            o->upload(kv_cache_z(donor, l, q, 0), hz, sizeof(float) * (size_t)T * zd);
        }
        donor->len[q] = T;
    }
    free(keys), free(group), free(hk), free(hv), free(hz);
    return rc;
}
