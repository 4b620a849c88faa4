#include "model.h"

#include "pipeline/hash.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

float model_embed_scale(const model_config *cfg, int bf16_compute) {
    if (!cfg->scale_embeddings) return 1.0f;
    float s = (float)sqrt((double)cfg->hidden);
    return bf16_compute ? bf16_to_f32(f32_to_bf16(s)) : s;
}

// One expected tensor: its name, where its pointer goes and the shape the config implies (d1 = 0 for
// a vector), and the part this rank holds: rows [r0, r0 + nr) and columns [c0, c0 + nc) (a tensor-parallel
// slice; the whole tensor otherwise). dst NULL: the tensor is checked but not held (a bias that only the
// first rank of a group adds).
typedef struct {
    char name[128];
    const float **dst;
    int64_t d0, d1;
    int64_t r0, nr, c0, nc;
} expected_tensor;

typedef struct {
    expected_tensor *items;
    int n, cap;
} expected_list;

static expected_tensor *expect(expected_list *l, const float **dst, int64_t d0, int64_t d1, const char *fmt, int layer) {
    if (l->n == l->cap) l->items = ep_realloc(l->items, sizeof(expected_tensor) * (size_t)(l->cap = l->cap ? 2 * l->cap : 64));
    expected_tensor *e = &l->items[l->n++];
    *e = (expected_tensor){.dst = dst, .d0 = d0, .d1 = d1, .nr = d0, .nc = d1 ? d1 : 1};
    snprintf(e->name, sizeof e->name, fmt, layer);
    return e;
}

// Column-parallel (rows = output features) and row-parallel (columns = input features) slices.
static void rows(expected_tensor *e, int64_t r0, int64_t nr) { e->r0 = r0, e->nr = nr; }
static void cols(expected_tensor *e, int64_t c0, int64_t nc) { e->c0 = c0, e->nc = nc; }
static size_t held_floats(const expected_tensor *e) { return (size_t)e->nr * (size_t)e->nc; }

// The tensor names and shapes of each architecture, as HF saves them.
static void list_expected(model *m, expected_list *l) {
    const model_config *c = &m->cfg;
    int64_t D = c->hidden, Q = (int64_t)c->n_heads * c->head_dim, KV = (int64_t)c->n_kv_heads * c->head_dim,
            I = c->intermediate, hd = c->head_dim;
    // This rank's part (docs/tensor_parallel.md): its query heads' rows of q and columns of o, its KV heads'
    // rows of k and v, its MLP columns' rows of gate/up and columns of down, its block of embedding and lm_head rows;
    // the output biases of the row-parallel o and down projections are added by the group's first rank.
    tp_shard t = model_config_local(c);
    int64_t q0 = t.head0 * hd, nq = t.n_heads * hd, k0 = t.kv_head0 * hd, nk = t.n_kv_heads * hd;
    rows(expect(l, &m->embed, c->vocab_size, D, "model.embed_tokens.weight", 0), t.vocab0, t.n_vocab);
    if (c->arch == ARCH_PHI) {
        expect(l, &m->final_norm, D, 0, "model.final_layernorm.weight", 0);
        expect(l, &m->final_norm_bias, D, 0, "model.final_layernorm.bias", 0);
    } else {
        expect(l, &m->final_norm, D, 0, "model.norm.weight", 0);
    }
    if (!c->tied_embeddings) rows(expect(l, &m->lm_head, c->vocab_size, D, "lm_head.weight", 0), t.vocab0, t.n_vocab);
    if (c->lm_head_bias) rows(expect(l, &m->lm_head_bias, c->vocab_size, 0, "lm_head.bias", 0), t.vocab0, t.n_vocab);
    for (int i = 0; i < c->n_layers; i++) {
        layer_weights *w = &m->layers[i];
        expect(l, &w->attn_norm, D, 0, "model.layers.%d.input_layernorm.weight", i);
        rows(expect(l, &w->wq, Q, D, "model.layers.%d.self_attn.q_proj.weight", i), q0, nq);
        rows(expect(l, &w->wk, KV, D, "model.layers.%d.self_attn.k_proj.weight", i), k0, nk);
        rows(expect(l, &w->wv, KV, D, "model.layers.%d.self_attn.v_proj.weight", i), k0, nk);
        if (c->qkv_bias) {
            rows(expect(l, &w->bq, Q, 0, "model.layers.%d.self_attn.q_proj.bias", i), q0, nq);
            rows(expect(l, &w->bk, KV, 0, "model.layers.%d.self_attn.k_proj.bias", i), k0, nk);
            rows(expect(l, &w->bv, KV, 0, "model.layers.%d.self_attn.v_proj.bias", i), k0, nk);
        }
        int first = t.rank == 0;
        if (c->arch == ARCH_PHI) {
            expect(l, &w->attn_norm_bias, D, 0, "model.layers.%d.input_layernorm.bias", i);
            cols(expect(l, &w->wo, D, Q, "model.layers.%d.self_attn.dense.weight", i), q0, nq);
            expect(l, first ? &w->bo : NULL, D, 0, "model.layers.%d.self_attn.dense.bias", i);
            rows(expect(l, &w->w_up, I, D, "model.layers.%d.mlp.fc1.weight", i), t.inter0, t.n_inter);
            rows(expect(l, &w->b_up, I, 0, "model.layers.%d.mlp.fc1.bias", i), t.inter0, t.n_inter);
            cols(expect(l, &w->w_down, D, I, "model.layers.%d.mlp.fc2.weight", i), t.inter0, t.n_inter);
            expect(l, first ? &w->b_down : NULL, D, 0, "model.layers.%d.mlp.fc2.bias", i);
            continue;
        }
        cols(expect(l, &w->wo, D, Q, "model.layers.%d.self_attn.o_proj.weight", i), q0, nq);
        if (c->o_bias) expect(l, first ? &w->bo : NULL, D, 0, "model.layers.%d.self_attn.o_proj.bias", i);
        rows(expect(l, &w->w_gate, I, D, "model.layers.%d.mlp.gate_proj.weight", i), t.inter0, t.n_inter);
        rows(expect(l, &w->w_up, I, D, "model.layers.%d.mlp.up_proj.weight", i), t.inter0, t.n_inter);
        cols(expect(l, &w->w_down, D, I, "model.layers.%d.mlp.down_proj.weight", i), t.inter0, t.n_inter);
        if (c->mlp_bias) {
            rows(expect(l, &w->b_up, I, 0, "model.layers.%d.mlp.up_proj.bias", i), t.inter0, t.n_inter);
            expect(l, first ? &w->b_down : NULL, D, 0, "model.layers.%d.mlp.down_proj.bias", i);
            rows(expect(l, &w->b_gate, I, 0, "model.layers.%d.mlp.gate_proj.bias", i), t.inter0, t.n_inter);
        }
        if (c->arch == ARCH_GEMMA2) {
            expect(l, &w->attn_post_norm, D, 0, "model.layers.%d.post_attention_layernorm.weight", i);
            expect(l, &w->mlp_norm, D, 0, "model.layers.%d.pre_feedforward_layernorm.weight", i);
            expect(l, &w->mlp_post_norm, D, 0, "model.layers.%d.post_feedforward_layernorm.weight", i);
        } else {
            expect(l, &w->mlp_norm, D, 0, "model.layers.%d.post_attention_layernorm.weight", i);
        }
    }
}

size_t model_held_floats(const model_config *cfg) {
    model m;
    memset(&m, 0, sizeof m);
    m.cfg = *cfg;
    m.layers = ep_calloc((size_t)cfg->n_layers, sizeof(layer_weights));
    expected_list l = {0};
    list_expected(&m, &l);
    size_t n = 0;
    for (int i = 0; i < l.n; i++)
        if (l.items[i].dst) n += held_floats(&l.items[i]);
    free(l.items);
    free(m.layers);
    return n;
}

// Tensors HF checkpoints may carry that the forward pass does not read.
static int ignorable(const model_config *c, const char *name) {
    size_t n = strlen(name);
    const char *inv = "rotary_emb.inv_freq";
    if (n >= strlen(inv) && !strcmp(name + n - strlen(inv), inv)) return 1;
    return c->tied_embeddings && !strcmp(name, "lm_head.weight");
}

// Room for n owned buffers (and one more: inv_freq).
static void owned_init(model *m, int n) {
    m->owned = ep_calloc((size_t)n + 1, sizeof(void *));
    m->owned_bytes = ep_calloc((size_t)n + 1, sizeof(size_t));
}

// Lists buf (bytes long) among m's owned buffers.
static void own(model *m, void *buf, size_t bytes) {
    m->owned[m->n_owned] = buf;
    m->owned_bytes[m->n_owned++] = bytes;
}

// What a host model derives once its weights are bound (or not: then lm_head stays NULL): the tied
// lm_head, the rotary frequencies (owned) and the embedding factor.
static void derive_host_fields(model *m) {
    const model_config *c = &m->cfg;
    if (c->tied_embeddings) m->lm_head = m->embed;  // the same block of rows (a shard's, or all)
    size_t inv_bytes = sizeof(float) * (size_t)(c->rotary_dim / 2);
    m->inv_freq = ep_malloc(inv_bytes ? inv_bytes : 1);
    own(m, m->inv_freq, inv_bytes);
    model_config_inv_freq(c, m->inv_freq);
    m->embed_scale = model_embed_scale(c, 0);
}

// e's tensor in the files, checked against the shape the config implies and the dtypes we convert.
static int find_tensor(const model *m, const expected_tensor *e, const st_tensor **out, ep_error *err) {
    const st_tensor *t = safetensors_find(&m->st, e->name);
    const char *file = m->st.paths[0];
    if (!t) return ep_fail(err, "%s: tensor '%s' is missing (needed by %s)", file, e->name, m->cfg.arch_name);
    file = m->st.paths[t->file];
    int ndim = e->d1 ? 2 : 1;
    if (t->ndim != ndim || t->shape[0] != e->d0 || (ndim == 2 && t->shape[1] != e->d1)) {
        // Room for ST_MAX_DIMS dimensions of up to 2^40 (13 digits) and their separators.
        char got[ST_MAX_DIMS * 16] = "", *p = got;
        for (int d = 0; d < t->ndim && p < got + sizeof got; d++)
            p += snprintf(p, (size_t)(got + sizeof got - p), d ? ", %lld" : "%lld", (long long)t->shape[d]);
        return ep_fail(err, "%s: tensor '%s' has shape [%s], config.json implies [%lld%s%.0lld]", file, e->name, got,
                       (long long)e->d0, ndim == 2 ? ", " : "", (long long)e->d1);
    }
    if (t->dtype != ST_F32 && t->dtype != ST_BF16 && t->dtype != ST_F16)
        return ep_fail(err, "%s: tensor '%s' has dtype %s, expected F32, BF16 or F16", file, e->name, st_dtype_name(t->dtype));
    *out = t;
    return 0;
}

// The slice e holds as it lies in the mapping, when it can be used in place: whole rows of aligned F32.
// NULL otherwise (the slice is converted: read_slice).
static const float *in_place(const st_tensor *t, const expected_tensor *e) {
    int64_t width = e->d1 ? e->d1 : 1;
    const unsigned char *start = t->data + (size_t)(e->r0 * width + e->c0) * sizeof(float);
    if (t->dtype != ST_F32 || e->nc != width || (uintptr_t)start % sizeof(float)) return NULL;
    return (const float *)(const void *)start;
}

// The one place the slicing rules meet the bytes: the slice e holds (rows [r0, r0 + nr), columns
// [c0, c0 + nc)) of t into out, row by row for a column slice, as fp32 values or, with raw set, as the
// BF16 checkpoint's own bits (t must be BF16).
static int read_slice(const st_tensor *t, const expected_tensor *e, int raw, void *out, ep_error *err) {
    int64_t width = e->d1 ? e->d1 : 1;
    size_t esize = st_dtype_size(t->dtype), osize = raw ? sizeof(uint16_t) : sizeof(float);
    const unsigned char *start = t->data + (size_t)(e->r0 * width + e->c0) * esize;
    int contiguous = e->nc == width;
    for (int64_t r = 0; r < (contiguous ? 1 : e->nr); r++) {
        st_tensor part = *t;
        part.data = start + (size_t)(r * width) * esize;
        part.numel = contiguous ? e->nr * e->nc : e->nc;
        part.nbytes = (size_t)part.numel * esize;
        unsigned char *dst = (unsigned char *)out + (size_t)(r * e->nc) * osize;
        if (raw)
            memcpy(dst, part.data, part.nbytes);
        else if (safetensors_read_f32(&part, (float *)(void *)dst, err))
            return -1;
    }
    return 0;
}

// Validates e's tensor and, when weights is set and the rank holds it, points e->dst at its slice: in the
// mapping (aligned F32 rows) or in an owned fp32 copy.
static int bind_tensor(model *m, const expected_tensor *e, int weights, ep_error *err) {
    const st_tensor *t = NULL;
    if (find_tensor(m, e, &t, err)) return -1;
    if (!weights || !e->dst) return 0;
    if ((*e->dst = in_place(t, e))) return 0;
    float *buf = ep_malloc(sizeof(float) * held_floats(e));
    own(m, buf, sizeof(float) * held_floats(e));
    *e->dst = buf;
    return read_slice(t, e, 0, buf, err);
}

// model_load_shard (weights set) or model_open_shard.
static int open_shard(const char *dir, int tp_rank, int tp_size, int weights, model *m, ep_error *err) {
    memset(m, 0, sizeof *m);
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", dir);
    if (model_config_load(path, &m->cfg, err) || hash_file(path, &m->config_hash, err) ||
        model_config_shard(&m->cfg, path, tp_rank, tp_size, &m->cfg.tp, err))
        return -1;
    if (safetensors_open_dir(dir, &m->st, err)) return -1;
    const model_config *c = &m->cfg;
    m->layers = ep_calloc((size_t)c->n_layers, sizeof(layer_weights));
    expected_list l = {0};
    list_expected(m, &l);
    owned_init(m, l.n);
    int rc = 0;
    for (int i = 0; i < l.n && rc == 0; i++) rc = bind_tensor(m, &l.items[i], weights, err);
    // Every tensor in the files must be one we read (or a known leftover): an unexpected name means the
    // config and the weights disagree, e.g. a config that says 2 layers for a 3-layer checkpoint.
    for (int t = 0; t < m->st.n_tensors && rc == 0; t++) {
        const char *name = m->st.tensors[t].name;
        int known = ignorable(c, name);
        for (int i = 0; i < l.n && !known; i++) known = !strcmp(l.items[i].name, name);
        if (!known)
            rc = ep_fail(err, "%s: unexpected tensor '%s' for %s with %d layers (config.json and weights disagree?)",
                         m->st.paths[m->st.tensors[t].file], name, c->arch_name, c->n_layers);
    }
    free(l.items);
    if (rc) {
        model_free(m);
        return -1;
    }
    derive_host_fields(m);
    return 0;
}

int model_load(const char *dir, model *m, ep_error *err) { return open_shard(dir, 0, 1, 1, m, err); }

int model_load_shard(const char *dir, int tp_rank, int tp_size, model *m, ep_error *err) {
    return open_shard(dir, tp_rank, tp_size, 1, m, err);
}

int model_open_shard(const char *dir, int tp_rank, int tp_size, model *m, ep_error *err) {
    return open_shard(dir, tp_rank, tp_size, 0, m, err);
}

int model_holds_weights(const model *m) { return m->embed != NULL; }

size_t model_host_bytes(const model *m) {
    if (m->backend) return 0;  // a device model's buffers live in its backend's memory
    size_t n = 0;
    for (int i = 0; i < m->n_owned; i++) n += m->owned_bytes[i];
    return n;
}

uint64_t model_identity(const model *m) {
    uint64_t h = hash_bytes(HASH_INIT, &m->config_hash, sizeof m->config_hash);
    for (int f = 0; f < m->st.n_files; f++) {
        const unsigned char *bytes = m->st.maps[f];
        uint64_t n = 0;
        for (int i = 7; i >= 0; i--) n = n << 8 | bytes[i];
        h = hash_bytes(h, bytes, (size_t)(8 + n));  // validated at load: the header lies inside the file
    }
    return h;
}

int model_content_identity(const model *m, const char *digest_cache, uint64_t *out, digest_stats *stats, ep_error *err) {
    int n = m->st.n_files;
    uint64_t *digests = ep_calloc((size_t)(n ? n : 1), sizeof *digests);
    int rc = file_digests(digest_cache, n, (const char *const *)m->st.paths, digests, stats, err);
    if (rc == 0) *out = hash_bytes(model_identity(m), digests, sizeof *digests * (size_t)n);
    free(digests);
    return rc;
}

void model_init_random(const model_config *cfg, uint64_t seed, model *m) {
    memset(m, 0, sizeof *m);
    m->cfg = *cfg;
    m->layers = ep_calloc((size_t)cfg->n_layers, sizeof(layer_weights));
    expected_list l = {0};
    list_expected(m, &l);
    owned_init(m, l.n);
    uint64_t x = seed * 6364136223846793005ull + 1442695040888963407ull;
    for (int i = 0; i < l.n; i++) {
        if (!l.items[i].dst) continue;
        size_t n = held_floats(&l.items[i]);
        float *buf = ep_malloc(sizeof(float) * n), base = strstr(l.items[i].name, "norm.weight") ? 1.0f : 0.0f;
        for (size_t j = 0; j < n; j++) {
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            buf[j] = base + (float)((double)(x >> 40) / (double)(1ull << 24) - 0.5) * 0.1f;
        }
        own(m, buf, sizeof(float) * n);
        *l.items[i].dst = buf;
    }
    free(l.items);
    derive_host_fields(m);
}

// The bf16 slot of a matrix weight's pointer; NULL for the embedding and the vectors, which stay fp32.
static const uint16_t **bf16_slot(model *m, const float **dst) {
    if (dst == &m->lm_head) return &m->lm_head_bf16;
    for (int i = 0; i < m->cfg.n_layers; i++) {
        layer_weights *w = &m->layers[i];
        const float **f32[] = {&w->wq, &w->wk, &w->wv, &w->wo, &w->w_gate, &w->w_up, &w->w_down};
        const uint16_t **bf16[] = {&w->wq_bf16,    &w->wk_bf16, &w->wv_bf16,  &w->wo_bf16,
                                   &w->w_gate_bf16, &w->w_up_bf16, &w->w_down_bf16};
        for (size_t j = 0; j < sizeof f32 / sizeof f32[0]; j++)
            if (dst == f32[j]) return bf16[j];
    }
    return NULL;
}

// How a weight is stored on the device: fp32, fp32 values rounded to bf16 (the vectors of a bf16 run) or
// bf16 bits (the matrices of a bf16 run).
typedef enum { AS_F32, AS_BF16_VALUES, AS_BF16 } stored_as;

// The bytes dev stores for e in host memory, ready to upload: the host model's fp32 copy (src, as is for
// AS_F32) or, when m holds no weights (model_open_shard), e's slice from the mapping (in place for
// aligned F32 rows in an fp32 run, else read into the stage). Conversions go through *stage, one buffer
// grown to the largest tensor and reused, so at most one tensor's conversion is on the host at a time.
// A BF16 checkpoint's matrices go up as their own bits in a bf16 run (rounding a bf16 value to bf16 is
// the identity: the same bits as converting to fp32 and back).
static const void *staged(const model *m, const expected_tensor *e, const float *src, stored_as as, void **stage,
                          size_t *cap, size_t *bytes, ep_error *err) {
    size_t n = held_floats(e);
    *bytes = n * (as == AS_BF16 ? sizeof(uint16_t) : sizeof(float));
    if (src && as == AS_F32) return src;
    const st_tensor *t = src ? NULL : safetensors_find(&m->st, e->name);  // present and checked at open
    if (t && as == AS_F32 && (src = in_place(t, e))) return src;  // aligned F32 rows go up from the mapping
    if (*cap < sizeof(float) * n) *stage = ep_realloc(*stage, *cap = sizeof(float) * n);
    if (t) {
        if (as == AS_BF16 && t->dtype == ST_BF16) return read_slice(t, e, 1, *stage, err) ? NULL : *stage;
        if (read_slice(t, e, 0, *stage, err)) return NULL;
        src = *stage;
    }
    // In place when src is the stage: value i is read before anything at or beyond byte 2 i is written
    // (bytes through memcpy, so the compiler sees that source and destination alias).
    const unsigned char *from = (const unsigned char *)src;
    unsigned char *to = *stage;
    for (size_t i = 0; i < n && as != AS_F32; i++) {
        float v;
        memcpy(&v, from + sizeof(float) * i, sizeof v);
        uint16_t b = f32_to_bf16(v);
        if (as == AS_BF16)
            memcpy(to + sizeof b * i, &b, sizeof b);
        else
            v = bf16_to_f32(b), memcpy(to + sizeof v * i, &v, sizeof v);
    }
    return *stage;
}

int model_to_backend(const model *m, const kernel_ops *ops, int bf16, model *dev, ep_error *err) {
    const model_config *c = &m->cfg;
    if (m->backend) return ep_fail(err, "model_to_backend: the model is already a device model");
    if (!model_holds_weights(m) && ops->host_memory && !bf16)
        return ep_fail(err, "model_to_backend: the %s backend computes with the host model's weights, and this one "
                            "holds none (model_open_shard; load it with model_load_shard)", ops->name);
    *dev = *m;
    memset(&dev->st, 0, sizeof dev->st);
    dev->owned = NULL;
    dev->owned_bytes = NULL;
    dev->n_owned = 0;
    dev->backend = NULL;
    dev->staging_bytes = 0;
    dev->layers = ep_malloc(sizeof(layer_weights) * (size_t)c->n_layers);
    memcpy(dev->layers, m->layers, sizeof(layer_weights) * (size_t)c->n_layers);
    if (ops->host_memory && !bf16) return 0;
    // The expected-tensor list names every weight pointer, its shape and the rank's slice; each is replaced
    // by an upload. A bf16 run's tied vocabulary projection is one more: the rank's rows of the embedding.
    expected_list l = {0};
    list_expected(dev, &l);
    tp_shard t = model_config_local(c);
    if (c->tied_embeddings && bf16)
        rows(expect(&l, &dev->lm_head, c->vocab_size, c->hidden, "model.embed_tokens.weight", 0), t.vocab0, t.n_vocab);
    owned_init(dev, l.n);
    dev->backend = ops;
    void *stage = NULL;
    size_t cap = 0;
    int rc = 0;
    for (int i = 0; i < l.n && rc == 0; i++) {
        expected_tensor *e = &l.items[i];
        if (!e->dst) continue;
        const uint16_t **slot = bf16 ? bf16_slot(dev, e->dst) : NULL;
        size_t bytes;
        const void *host = staged(m, e, *e->dst, slot ? AS_BF16 : bf16 ? AS_BF16_VALUES : AS_F32, &stage, &cap, &bytes, err);
        if (!host) {
            rc = -1;
            break;
        }
        void *buf = ops->alloc(bytes ? bytes : 1);
        ops->upload(buf, host, bytes);
        own(dev, buf, bytes);
        if (slot) *slot = buf;
        *e->dst = slot ? NULL : buf;
    }
    free(l.items);
    free(stage);
    dev->staging_bytes = cap;
    if (c->tied_embeddings) dev->lm_head = dev->embed;  // the same block of rows (a shard's, or all)
    if (bf16) dev->embed_scale = model_embed_scale(c, 1);
    size_t inv_bytes = sizeof(float) * (size_t)(c->rotary_dim / 2);
    dev->inv_freq = ops->alloc(inv_bytes ? inv_bytes : sizeof(float));
    if (inv_bytes) ops->upload(dev->inv_freq, m->inv_freq, inv_bytes);
    own(dev, dev->inv_freq, inv_bytes);
    if (ops->host_memory) dev->backend = NULL;  // host memory: the forward pass treats it as a host model
    if (rc) model_backend_free(dev);
    return rc;
}

void model_backend_free(model *dev) {
    // A host model owns buffers only when it is a bf16 copy (host backends allocate with malloc).
    for (int i = 0; i < dev->n_owned; i++) dev->backend ? dev->backend->release(dev->owned[i]) : free(dev->owned[i]);
    free(dev->owned);
    free(dev->owned_bytes);
    free(dev->layers);
    memset(dev, 0, sizeof *dev);
}

void model_free(model *m) {
    for (int i = 0; i < m->n_owned; i++) free(m->owned[i]);
    free(m->owned);
    free(m->owned_bytes);
    free(m->layers);
    safetensors_close(&m->st);
    memset(m, 0, sizeof *m);
}
