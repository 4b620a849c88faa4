#include "forward.h"

#include <stdlib.h>
#include <string.h>

int kv_cache_init(kv_cache *c, const model_config *cfg, int n_seqs, int capacity, int with_z, ep_error *err) {
    return kv_cache_init_backend(c, cfg, n_seqs, capacity, with_z, NULL, err);
}

int kv_cache_init_backend(kv_cache *c, const model_config *cfg, int n_seqs, int capacity, int with_z,
                          const kernel_ops *ops, ep_error *err) {
    memset(c, 0, sizeof *c);
    if (n_seqs <= 0 || capacity <= 0) return ep_fail(err, "kv cache: need at least one sequence and one position");
    c->n_layers = cfg->n_layers;
    c->n_seqs = n_seqs;
    c->capacity = capacity;
    tp_shard t = model_config_local(cfg);  // a tensor-parallel shard keeps only its own heads
    c->kv_dim = t.n_kv_heads * cfg->head_dim;
    c->z_dim = t.n_heads * cfg->head_dim;
    size_t n = (size_t)c->n_layers * n_seqs * capacity * c->kv_dim,
           nz = (size_t)c->n_layers * n_seqs * capacity * c->z_dim;
    c->len = ep_calloc((size_t)n_seqs, sizeof(int));
    if (ops && !ops->host_memory) {
        c->backend = ops;
        c->k = ops->alloc(sizeof(float) * (n ? n : 1));
        c->v = ops->alloc(sizeof(float) * (n ? n : 1));
        if (with_z) c->z = ops->alloc(sizeof(float) * (nz ? nz : 1));
        return 0;
    }
    c->k = ep_calloc(n, sizeof(float));
    c->v = ep_calloc(n, sizeof(float));
    if (with_z) c->z = ep_calloc(nz, sizeof(float));
    return 0;
}

void kv_cache_free(kv_cache *c) {
    if (c->backend) {
        c->backend->release(c->k);
        c->backend->release(c->v);
        if (c->z) c->backend->release(c->z);
    } else {
        free(c->k);
        free(c->v);
        free(c->z);
    }
    free(c->len);
    memset(c, 0, sizeof *c);
}

int kv_cache_gather(const model *m, const kv_cache *shard, kv_cache *whole, ep_error *err) {
    model_config cfg = m->cfg;
    tp_shard mine = model_config_local(&cfg);
    cfg.tp = (tp_shard){0};  // the whole model's heads
    const kernel_ops *dev = shard->backend;  // NULL: a host cache
    if (kv_cache_init(whole, &cfg, shard->n_seqs, shard->capacity, shard->z != NULL, err)) return -1;
    memcpy(whole->len, shard->len, sizeof(int) * (size_t)shard->n_seqs);
    size_t rows = (size_t)shard->n_layers * shard->n_seqs * shard->capacity, hd = (size_t)cfg.head_dim;
    int P = mine.size, rc = 0;
    // Every rank's shard ([rank][row][its heads], in the cache's memory, then on the host), then each
    // head's rows from the first rank holding it.
    for (int part = 0; part < 3 && rc == 0; part++) {
        const float *src = part == 0 ? shard->k : part == 1 ? shard->v : shard->z;
        float *dst = part == 0 ? whole->k : part == 1 ? whole->v : whole->z;
        if (!src) continue;
        size_t local = part == 2 ? (size_t)shard->z_dim : (size_t)shard->kv_dim,
               full = part == 2 ? (size_t)whole->z_dim : (size_t)whole->kv_dim, n_all = rows * local * (size_t)P;
        float *all = (float *)src;  // one rank: its shard is the whole
        if (P > 1) {
            all = dev ? dev->alloc(sizeof(float) * n_all) : ep_malloc(sizeof(float) * n_all);
            rc = group_gather_f32(m->group, src, all, rows * local, err);
        }
        float *host = all;
        if (rc == 0 && dev) {
            host = ep_malloc(sizeof(float) * n_all);
            dev->download(host, all, sizeof(float) * n_all);
        }
        for (int r = P - 1; r >= 0 && rc == 0; r--) {  // last to first: a replicated head ends with its first holder's copy
            tp_shard t = {0};
            if (P > 1) model_config_shard(&cfg, "config.json", r, P, &t, NULL);
            size_t off = (size_t)(part == 2 ? t.head0 : t.kv_head0) * hd;
            for (size_t i = 0; i < rows; i++)
                memcpy(dst + i * full + off, host + ((size_t)r * rows + i) * local, sizeof(float) * local);
        }
        if (host != all) free(host);
        if (all != src) {
            if (dev) dev->release(all);
            else free(all);
        }
    }
    if (rc) kv_cache_free(whole);
    return rc;
}

static size_t kv_offset(const kv_cache *c, int layer, int seq, int pos) {
    return (((size_t)layer * c->n_seqs + seq) * c->capacity + pos) * c->kv_dim;
}

float *kv_cache_k(const kv_cache *c, int layer, int seq, int pos) { return c->k + kv_offset(c, layer, seq, pos); }
float *kv_cache_v(const kv_cache *c, int layer, int seq, int pos) { return c->v + kv_offset(c, layer, seq, pos); }

float *kv_cache_z(const kv_cache *c, int layer, int seq, int pos) {
    return c->z + (((size_t)layer * c->n_seqs + seq) * c->capacity + pos) * c->z_dim;
}

int kv_cache_copy_seqs(kv_cache *dst, int dst_seq0, const kv_cache *src, const int *rows, const int *len,
                       int first_layer, int end_layer, ep_error *err) {
    int end = end_layer ? end_layer : src->n_layers;
    if (dst->backend != src->backend || dst->n_layers != src->n_layers || dst->kv_dim != src->kv_dim ||
        dst_seq0 < 0 || dst_seq0 + src->n_seqs > dst->n_seqs || (dst->z && src->z && dst->z_dim != src->z_dim))
        return ep_fail(err, "kv cache copy: the caches do not match (sequences %d + %d of %d)", dst_seq0, src->n_seqs,
                       dst->n_seqs);
    if (first_layer < 0 || first_layer > end || end > src->n_layers)
        return ep_fail(err, "kv cache copy: layers %d..%d of %d", first_layer, end, src->n_layers);
    for (int s = 0; s < src->n_seqs; s++) {
        int n = rows[s], at = len ? len[s] : rows[s];
        if (n < 0 || n > src->capacity || n > dst->capacity || at < 0 || at > dst->capacity)
            return ep_fail(err, "kv cache copy: sequence %d: %d rows (length %d) exceed the capacity %d", s, n, at,
                           dst->capacity < src->capacity ? dst->capacity : src->capacity);
    }
    const kernel_ops *dev = src->backend;
    int with_z = dst->z && src->z;
    for (int l = first_layer; l < end; l++)
        for (int s = 0; s < src->n_seqs; s++) {
            int n = rows[s], d = dst_seq0 + s;
            if (n == 0) continue;
            for (int part = 0; part < 2 + with_z; part++) {
                float *to = part == 0 ? kv_cache_k(dst, l, d, 0) : part == 1 ? kv_cache_v(dst, l, d, 0) : kv_cache_z(dst, l, d, 0);
                const float *from = part == 0 ? kv_cache_k(src, l, s, 0) : part == 1 ? kv_cache_v(src, l, s, 0)
                                                                                      : kv_cache_z(src, l, s, 0);
                int w = part == 2 ? src->z_dim : src->kv_dim;
                if (dev) dev->copy_rows(to, w, from, w, n, w);
                else memcpy(to, from, sizeof(float) * (size_t)n * w);
            }
        }
    for (int s = 0; s < src->n_seqs; s++) dst->len[dst_seq0 + s] = len ? len[s] : rows[s];
    return 0;
}

static int check_patch(const model_config *c, const kv_cache *cache, const forward_patch *p, ep_error *err) {
    if (p->n_donors < 0 || p->n_donors > 16) return ep_fail(err, "patch: %d donors (at most 16)", p->n_donors);
    for (int d = 0; d < p->n_donors; d++) {
        const kv_cache *dc = p->donors[d];
        if (!dc || dc->n_seqs != cache->n_seqs || dc->kv_dim != cache->kv_dim || dc->n_layers != cache->n_layers ||
            dc->backend != cache->backend)
            return ep_fail(err, "patch: donor %d's cache does not match the batch", d);
    }
    if (p->layer_rules)
        for (int l = 0; l < c->n_layers; l++)
            for (int r = 0; r < p->layer_rules[l].n; r++) {
                const edge_rule *e = &p->layer_rules[l].rule[r];
                if (e->source < 0 || e->source >= EDGE_N_SOURCES)
                    return ep_fail(err, "patch: layer %d rule %d has source %d (kv, k, v, zero: 0 .. 3)", l, r, e->source);
                if (e->source != EDGE_SRC_ZERO && (e->donor < -1 || e->donor >= p->n_donors))  // zero reads no donor
                    return ep_fail(err, "patch: layer %d rule %d reads donor %d, %d given", l, r, e->donor, p->n_donors);
            }
    for (int u = 0; u < p->n_head_units; u++) {
        const head_unit *h = &p->head_units[u];
        if (h->layer < 0 || h->layer >= c->n_layers || h->head < 0 || h->head >= c->n_heads || h->donor < 0 ||
            h->donor >= p->n_donors || !p->donors[h->donor]->z)
            return ep_fail(err, "patch: head unit (layer %d, head %d, donor %d) is out of range or its donor has no "
                                "head outputs", h->layer, h->head, h->donor);
    }
    return 0;
}

// Scratch activations for one step of T packed tokens (backend memory, but for the host metadata).
// Row buffers of hidden width hold max(T, n_logit_rows) rows: the logits rows are gathered into o.
typedef struct {
    float *x, *xn, *q, *k, *v, *att, *o, *gate, *up, *mlp;
    int *pos, *idx;  // backend: positions of the rows, then gather indices (tokens or logit rows)
    int *host_pos;
    attn_seq *seqs;
} step_buffers;

static void step_buffers_init(step_buffers *s, const kernel_ops *ops, const model_config *c, int T, int n_logit_rows,
                              int n_seqs) {
    tp_shard sh = model_config_local(c);
    size_t t = (size_t)T, D = (size_t)c->hidden, Q = (size_t)sh.n_heads * c->head_dim,
           KV = (size_t)sh.n_kv_heads * c->head_dim, I = (size_t)sh.n_inter,
           tr = (size_t)(T > n_logit_rows ? T : n_logit_rows);
    s->x = ops->alloc(sizeof(float) * t * D);
    s->xn = ops->alloc(sizeof(float) * tr * D);
    s->q = ops->alloc(sizeof(float) * t * Q);
    s->k = ops->alloc(sizeof(float) * t * KV);
    s->v = ops->alloc(sizeof(float) * t * KV);
    s->att = ops->alloc(sizeof(float) * t * Q);
    s->o = ops->alloc(sizeof(float) * tr * D);
    s->gate = ops->alloc(sizeof(float) * t * I);
    s->up = ops->alloc(sizeof(float) * t * I);
    s->mlp = ops->alloc(sizeof(float) * t * D);
    s->pos = ops->alloc(sizeof(int) * t);
    s->idx = ops->alloc(sizeof(int) * tr);
    s->host_pos = ep_malloc(sizeof(int) * t);
    s->seqs = ep_malloc(sizeof(attn_seq) * (size_t)n_seqs);
}

static void step_buffers_free(step_buffers *s, const kernel_ops *ops) {
    float *f[] = {s->x, s->xn, s->q, s->k, s->v, s->att, s->o, s->gate, s->up, s->mlp};
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++) ops->release(f[i]);
    ops->release(s->pos);
    ops->release(s->idx);
    free(s->host_pos), free(s->seqs);
}

void forward_norm(const kernel_ops *ops, const model_config *c, float *out, const float *x, const float *w,
                  const float *b, int rows) {
    if (c->norm == NORM_LAYER)
        ops->layernorm(out, x, w, b, rows, c->hidden, c->norm_eps);
    else
        ops->rmsnorm(out, x, w, c->norm_weight_offset, rows, c->hidden, c->norm_eps);
}

// out = x . w^T + b with the weight in whichever precision the model holds it (model_to_backend).
static void linear(const kernel_ops *ops, float *out, const float *x, const float *w, const uint16_t *w_bf16,
                   const float *b, int rows, int n_in, int n_out) {
    if (w_bf16)
        ops->matmul_bf16(out, x, w_bf16, b, rows, n_in, n_out);
    else
        ops->matmul(out, x, w, b, rows, n_in, n_out);
}

// mlp = MLP(xn) for T rows (of a shard: its columns' part of the sum, before the group's all-reduce).
static void run_mlp(const kernel_ops *ops, const model_config *c, const layer_weights *w, step_buffers *s, int T) {
    int I = model_config_local(c).n_inter;
    size_t n = (size_t)T * I;
    if (c->gated_mlp) {
        linear(ops, s->gate, s->xn, w->w_gate, w->w_gate_bf16, w->b_gate, T, c->hidden, I);
        linear(ops, s->up, s->xn, w->w_up, w->w_up_bf16, w->b_up, T, c->hidden, I);
        ops->glu(s->gate, s->gate, s->up, n, c->act);
    } else {
        linear(ops, s->gate, s->xn, w->w_up, w->w_up_bf16, w->b_up, T, c->hidden, I);
        ops->act(s->gate, n, c->act);
    }
    linear(ops, s->mlp, s->gate, w->w_down, w->w_down_bf16, w->b_down, T, I, c->hidden);
}

int model_group_sum(const model *m, float *buf, size_t n, ep_error *err) {
    return model_config_local(&m->cfg).size > 1 ? group_sum_f32(m->group, buf, n, err) : 0;
}

void forward_shard_rules(edge_rule_set *dst, const edge_rule_set *src, int head0, int n_heads) {
    dst->n = src->n;
    for (int r = 0; r < src->n; r++) {
        dst->rule[r] = src->rule[r];
        memset(dst->rule[r].heads, 0, sizeof dst->rule[r].heads);
        for (int h = 0; h < n_heads; h++)
            if ((src->rule[r].heads[(head0 + h) >> 6] >> ((head0 + h) & 63)) & 1u)
                dst->rule[r].heads[h >> 6] |= 1ull << (h & 63);
    }
}

// Head units of layer l: a head's output at positions of the unit's type becomes the donor's there. Runs of
// consecutive positions of the type are copied at once. A shard substitutes only its own heads
// [head0, head0 + n_heads).
static void substitute_heads(const kernel_ops *ops, const forward_patch *p, int l, int head_dim, const step_buffers *s,
                             int seq0, int n_seqs, int Q, int head0, int n_heads) {
    for (int u = 0; u < p->n_head_units; u++) {
        const head_unit *h = &p->head_units[u];
        if (h->layer != l || h->head < head0 || h->head >= head0 + n_heads) continue;
        int head = h->head - head0;
        const kv_cache *donor = p->donors[h->donor];
        for (int seq = seq0; seq < seq0 + n_seqs; seq++) {
            const attn_seq *sq = &s->seqs[seq];
            for (int i = 0; i < sq->n_q;) {
                int pos = sq->q_pos + i;
                if (pos >= sq->n_typed || sq->types[pos] != h->type) {
                    i++;
                    continue;
                }
                int n = 1;
                while (i + n < sq->n_q && pos + n < sq->n_typed && sq->types[pos + n] == h->type) n++;
                ops->copy_rows(s->att + (size_t)(sq->q_row + i) * Q + (size_t)head * head_dim, Q,
                               kv_cache_z(donor, l, 0, 0) + ((size_t)sq->donor_row + pos) * donor->z_dim +
                                   (size_t)head * head_dim,
                               donor->z_dim, n, head_dim);
                i += n;
            }
        }
    }
}

// Gathers the rows whose logits are read, then norms and projects only those. A vocabulary-parallel shard
// projects its block of the vocabulary and the group all-gathers the blocks ([rank][row][block]), which are
// put back in vocabulary order on the host. Host backends write the caller's array directly when it is
// the whole vocabulary, and so does any backend asked to keep the logits in its memory
// (logits_in_backend); otherwise a backend buffer is downloaded.
static int project_logits(const model *m, const kernel_ops *ops, step_buffers *s, const forward_batch *b,
                          ep_error *err) {
    const model_config *c = &m->cfg;
    tp_shard sh = model_config_local(c);
    int R = b->n_logit_rows, D = c->hidden, V = c->vocab_size, Vl = sh.n_vocab, parts = V / Vl, rc = 0;
    size_t n_logits = (size_t)R * V, n_local = (size_t)R * Vl;
    int direct = (ops->host_memory || b->logits_in_backend) && parts == 1;
    if (b->logits_in_backend && parts != 1)
        return ep_fail(err, "forward: logits kept in backend memory need the whole vocabulary on one rank");
    float *local = direct ? b->logits : ops->alloc(sizeof(float) * n_local);
    ops->upload(s->idx, b->logit_rows, sizeof(int) * (size_t)R);
    ops->gather_rows(s->o, s->x, s->idx, R, D);
    forward_norm(ops, c, s->xn, s->o, m->final_norm, m->final_norm_bias, R);
    linear(ops, local, s->xn, m->lm_head, m->lm_head_bf16, m->lm_head_bias, R, D, Vl);
    if (c->final_softcap > 0) ops->softcap(local, n_local, c->final_softcap);
    if (direct) return 0;
    if (parts == 1) {
        ops->download(b->logits, local, sizeof(float) * n_logits);
        ops->release(local);
        return 0;
    }
    float *all = ops->alloc(sizeof(float) * n_logits), *host = ep_malloc(sizeof(float) * n_logits);
    ops->sync();
    rc = group_gather_f32(m->group, local, all, n_local, err);
    if (rc == 0) {
        ops->download(host, all, sizeof(float) * n_logits);
        for (int k = 0; k < parts; k++)
            for (int r = 0; r < R; r++)
                memcpy(b->logits + (size_t)r * V + (size_t)k * Vl, host + ((size_t)k * R + r) * Vl, sizeof(float) * Vl);
    }
    free(host);
    ops->release(all);
    ops->release(local);
    return rc;
}

// One captured activation (rows x width floats of backend memory) into the batch's array: host memory is
// downloaded to, a backend tape (capture_backend) is copied to inside the backend.
static void capture(const kernel_ops *ops, const forward_batch *b, float *dst, const float *src, int rows, int width) {
    if (b->capture_backend)
        ops->copy_rows(dst, width, src, width, rows, width);
    else
        ops->download(dst, src, sizeof(float) * (size_t)rows * width);
}

// The scaled embeddings of T tokens into x (backend [T][D]), idx a backend buffer of T ints. A
// vocabulary-parallel shard holds its block of the embedding's rows: another rank's token gives a zero
// row here and the group's sum fills it in (one non-zero term per element: the sum is exact).
static int embed_rows(const model *m, const kernel_ops *ops, const int *tokens, int T, int *idx, float *x, ep_error *err) {
    const model_config *c = &m->cfg;
    tp_shard sh = model_config_local(c);
    int D = c->hidden, rc = 0;
    int parallel = sh.n_vocab < c->vocab_size, *ids = parallel ? ep_malloc(sizeof(int) * (size_t)T) : NULL;
    for (int r = 0; parallel && r < T; r++) {
        int local = tokens[r] - sh.vocab0;
        ids[r] = local >= 0 && local < sh.n_vocab ? local : -1;
    }
    ops->upload(idx, parallel ? ids : tokens, sizeof(int) * (size_t)T);
    free(ids);
    ops->gather_rows(x, m->embed, idx, T, D);
    if (parallel) rc = model_group_sum(m, x, (size_t)T * D, err);
    if (m->embed_scale != 1.0f) ops->scale(x, (size_t)T * D, m->embed_scale);
    return rc;
}

int model_embed(const model *m, const kernel_ops *ops, const int *tokens, int T, float *x, ep_error *err) {
    for (int r = 0; r < T; r++)
        if (tokens[r] < 0 || tokens[r] >= m->cfg.vocab_size)
            return ep_fail(err, "embed: token id %d at row %d is outside the vocabulary of %d", tokens[r], r,
                           m->cfg.vocab_size);
    if (T <= 0) return 0;
    int *idx = ops->alloc(sizeof(int) * (size_t)T);
    int rc = embed_rows(m, ops, tokens, T, idx, x, err);
    ops->release(idx);
    return rc;
}

// The attention statistics of a pass (forward_attn_stats): per layer the op's [n_seqs][heads] arrays in
// backend scratch, copied into the whole pass's arrays at the shard's first head.
typedef struct {
    attn_seq *seqs;        // one query row per sequence
    float *ent, *mass;     // backend [n_seqs][H_local](* n_types): one layer's
    float *all_ent, *all_mass;  // backend [n_seqs][n_layers][n_heads](* n_types)
} stats_buffers;

static int stats_check(const model_config *c, const forward_batch *b, ep_error *err) {
    const forward_attn_stats *a = b->attn_stats;
    if (!a) return 0;
    if (!a->rows || !a->entropy || !a->mass || a->n_types < 1 || a->n_types > 16)
        return ep_fail(err, "forward: attention statistics need rows, outputs and 1..16 types (%d)", a->n_types);
    for (int s = 0; s < b->n_seqs; s++)
        if (a->rows[s] < 0 || a->rows[s] >= b->n_new[s])
            return ep_fail(err, "forward: attention statistics row %d of sequence %d is outside its %d new tokens",
                           a->rows[s], s, b->n_new[s]);
    (void)c;
    return 0;
}

static void stats_init(stats_buffers *st, const kernel_ops *ops, const model_config *c, int n_seqs, int n_types) {
    tp_shard sh = model_config_local(c);
    size_t S = (size_t)n_seqs, all = S * c->n_layers * c->n_heads;
    st->seqs = ep_malloc(sizeof(attn_seq) * S);
    st->ent = ops->alloc(sizeof(float) * S * sh.n_heads);
    st->mass = ops->alloc(sizeof(float) * S * sh.n_heads * n_types);
    st->all_ent = ops->alloc(sizeof(float) * all);
    st->all_mass = ops->alloc(sizeof(float) * all * n_types);
    float *zeros = ep_calloc(all * n_types, sizeof(float));  // layers a partial pass skips, other ranks' heads
    ops->upload(st->all_ent, zeros, sizeof(float) * all);
    ops->upload(st->all_mass, zeros, sizeof(float) * all * n_types);
    free(zeros);
}

static void stats_free(stats_buffers *st, const kernel_ops *ops) {
    free(st->seqs);
    ops->release(st->ent), ops->release(st->mass), ops->release(st->all_ent), ops->release(st->all_mass);
}

// Layer l's statistics of the stats rows, from the step's queries and the layer's keys (and the donors' keys
// the rules read), into the whole pass's arrays.
static void stats_layer(const kernel_ops *ops, const model_config *c, const forward_batch *b, stats_buffers *st,
                        const attn_seq *seqs, const forward_patch *patch, int l, const float *q, const float *k,
                        const float *const *dk, const attn_params *p, const edge_rule_set *rules) {
    const forward_attn_stats *a = b->attn_stats;
    tp_shard sh = model_config_local(c);
    int H = c->n_heads, Hl = sh.n_heads, nt = a->n_types;
    for (int s = 0; s < b->n_seqs; s++) {
        attn_seq sq = seqs[s];
        sq.q_row += a->rows[s], sq.q_pos += a->rows[s], sq.n_q = 1;
        if (!patch) {
            sq.types = a->types ? a->types + (size_t)s * a->type_stride : NULL;
            sq.index = a->index ? a->index + (size_t)s * a->type_stride : NULL;
            sq.n_typed = a->types && a->n_typed ? a->n_typed[s] : 0;
        }
        st->seqs[s] = sq;
    }
    ops->attention_row_stats(st->ent, st->mass, nt, q, k, dk && patch ? patch->n_donors : 0, dk, st->seqs, b->n_seqs, p,
                             rules);
    ops->copy_rows(st->all_ent + (size_t)l * H + sh.head0, c->n_layers * H, st->ent, Hl, b->n_seqs, Hl);
    ops->copy_rows(st->all_mass + ((size_t)l * H + sh.head0) * nt, c->n_layers * H * nt, st->mass, Hl * nt, b->n_seqs,
                   Hl * nt);
}

// The whole pass's statistics to the caller's host arrays (a shard's summed over its group first).
static int stats_finish(const model *m, const kernel_ops *ops, const forward_batch *b, stats_buffers *st,
                        ep_error *err) {
    const model_config *c = &m->cfg;
    const forward_attn_stats *a = b->attn_stats;
    size_t all = (size_t)b->n_seqs * c->n_layers * c->n_heads;
    if (model_group_sum(m, st->all_ent, all, err) || model_group_sum(m, st->all_mass, all * a->n_types, err)) return -1;
    ops->sync();
    ops->download(a->entropy, st->all_ent, sizeof(float) * all);
    ops->download(a->mass, st->all_mass, sizeof(float) * all * a->n_types);
    return 0;
}

// Where a layer step reads and writes: the layer's keys and values (and head outputs) in the cache (row
// kv_row + pos for a run's attn_seq), the parts of the runs with their patches, and what model_forward
// captures (b, st: NULL in model_forward_rows).
typedef struct {
    float *k, *v, *z;  // layer l's blocks
    int kv_dim, z_dim;
    const forward_rows_part *parts;
    int n_parts;
    const forward_batch *b;
    stats_buffers *st;
    edge_rule_set *rules;  // a shard's scratch for its copy of a layer's rules (NULL: a whole model's)
} layer_io;

// One layer on the T rows of s->x (positions s->pos, runs s->seqs[0 .. n_seqs)): the residual stream
// entering layer l in s->x is replaced by the one leaving it; the runs' keys and values are written at
// their rows of the layer's block, then attention reads them (and the rows before, as filled).
static int layer_step(const model *m, const kernel_ops *ops, int l, step_buffers *s, int T, int n_seqs, const layer_io *io,
                      ep_error *err) {
    const model_config *c = &m->cfg;
    tp_shard sh = model_config_local(c);
    const forward_batch *b = io->b;
    int D = c->hidden, H = sh.n_heads, Q = H * c->head_dim, KV = io->kv_dim, rc = 0;
    const layer_weights *w = &m->layers[l];
    float *kl = io->k, *vl = io->v;
    if (b && b->resid) capture(ops, b, b->resid + (size_t)l * T * D, s->x, T, D);
    forward_norm(ops, c, s->xn, s->x, w->attn_norm, w->attn_norm_bias, T);
    linear(ops, s->q, s->xn, w->wq, w->wq_bf16, w->bq, T, D, Q);
    linear(ops, s->k, s->xn, w->wk, w->wk_bf16, w->bk, T, D, KV);
    linear(ops, s->v, s->xn, w->wv, w->wv_bf16, w->bv, T, D, KV);
    ops->rope(s->q, Q, s->pos, m->inv_freq, T, H, c->head_dim, c->rotary_dim);
    ops->rope(s->k, KV, s->pos, m->inv_freq, T, sh.n_kv_heads, c->head_dim, c->rotary_dim);
    if (b && b->q_out) capture(ops, b, b->q_out + (size_t)l * T * Q, s->q, T, Q);
    for (int seq = 0; seq < n_seqs; seq++) {
        const attn_seq *sq = &s->seqs[seq];
        size_t at = (size_t)sq->kv_row + sq->q_pos;
        ops->copy_rows(kl + at * KV, KV, s->k + (size_t)sq->q_row * KV, KV, sq->n_q, KV);
        ops->copy_rows(vl + at * KV, KV, s->v + (size_t)sq->q_row * KV, KV, sq->n_q, KV);
    }
    attn_params p = {.n_heads = H, .n_kv_heads = sh.n_kv_heads, .head_dim = c->head_dim,
                     .q_stride = Q, .kv_stride = KV, .scale = c->attn_scale, .softcap = c->attn_softcap,
                     .window = model_config_layer_window(c, l)};
    for (int part = 0; part < io->n_parts; part++) {
        const forward_patch *patch = io->parts[part].patch;
        const attn_seq *seqs = s->seqs + io->parts[part].first_seq;
        int n = io->parts[part].n_seqs;
        if (n == 0) continue;
        if (patch && patch->layer_rules && patch->layer_rules[l].n > 0) {
            const float *dk[16], *dv[16];
            for (int d = 0; d < patch->n_donors; d++) {
                dk[d] = kv_cache_k(patch->donors[d], l, 0, 0);
                dv[d] = kv_cache_v(patch->donors[d], l, 0, 0);
            }
            if (io->rules) forward_shard_rules(io->rules, &patch->layer_rules[l], sh.head0, H);
            const edge_rule_set *lr = io->rules ? io->rules : &patch->layer_rules[l];
            ops->patched_attention(s->att, s->q, kl, vl, patch->n_donors, dk, dv, seqs, n, &p, lr);
            if (b && b->attn_stats) stats_layer(ops, c, b, io->st, seqs, patch, l, s->q, kl, dk, &p, lr);
        } else {
            ops->attention(s->att, s->q, kl, vl, seqs, n, &p);
            if (b && b->attn_stats) stats_layer(ops, c, b, io->st, seqs, patch, l, s->q, kl, NULL, &p, NULL);
        }
        if (patch) substitute_heads(ops, patch, l, c->head_dim, s, io->parts[part].first_seq, n, Q, sh.head0, H);
    }
    if (io->z)
        for (int seq = 0; seq < n_seqs; seq++) {
            const attn_seq *sq = &s->seqs[seq];
            ops->copy_rows(io->z + ((size_t)sq->kv_row + sq->q_pos) * io->z_dim, io->z_dim,
                           s->att + (size_t)sq->q_row * Q, Q, sq->n_q, Q);
        }
    linear(ops, s->o, s->att, w->wo, w->wo_bf16, w->bo, T, Q, D);

    // A shard's o and down projections give its part of the sum: one all-reduce each (one for both in
    // the parallel block, whose two branches are added anyway).
    size_t n = (size_t)T * D;
    if (c->block != BLOCK_PARALLEL && (rc = model_group_sum(m, s->o, n, err))) return rc;
    if (b && b->attn_out) capture(ops, b, b->attn_out + (size_t)l * T * D, s->o, T, D);
    switch (c->block) {
    case BLOCK_PRE_NORM:
        ops->add(s->x, s->o, n);
        forward_norm(ops, c, s->xn, s->x, w->mlp_norm, NULL, T);
        run_mlp(ops, c, w, s, T);
        if ((rc = model_group_sum(m, s->mlp, n, err))) break;
        ops->add(s->x, s->mlp, n);
        break;
    case BLOCK_SANDWICH_NORM:
        forward_norm(ops, c, s->xn, s->o, w->attn_post_norm, NULL, T);
        ops->add(s->x, s->xn, n);
        forward_norm(ops, c, s->xn, s->x, w->mlp_norm, NULL, T);
        run_mlp(ops, c, w, s, T);
        if ((rc = model_group_sum(m, s->mlp, n, err))) break;
        forward_norm(ops, c, s->xn, s->mlp, w->mlp_post_norm, NULL, T);
        ops->add(s->x, s->xn, n);
        break;
    case BLOCK_PARALLEL:  // attention and MLP both read the one input norm
        run_mlp(ops, c, w, s, T);
        ops->add(s->o, s->mlp, n);
        if ((rc = model_group_sum(m, s->o, n, err))) break;
        ops->add(s->x, s->o, n);
        break;
    }
    return rc;
}

int model_forward(const model *m, const kernel_ops *ops, kv_cache *cache, const forward_batch *b,
                  const forward_patch *patch, ep_error *err) {
    const model_config *c = &m->cfg;
    const kernel_ops *dev = ops->host_memory ? NULL : ops;
    if (m->backend != dev || cache->backend != dev)
        return ep_fail(err, "forward: the %s backend needs the model's weights and the cache in its memory "
                            "(model_to_backend, kv_cache_init_backend)", ops->name);
    tp_shard sh = model_config_local(c);
    if (sh.size > 1 && (!m->group || m->group->size != sh.size || m->group->rank != sh.rank))
        return ep_fail(err, "forward: a tensor-parallel shard (rank %d of %d) needs its group's collectives", sh.rank,
                       sh.size);
    if (patch && check_patch(c, cache, patch, err)) return -1;
    if (b->n_seqs != cache->n_seqs)
        return ep_fail(err, "forward: batch has %d sequences, the cache %d", b->n_seqs, cache->n_seqs);
    int T = 0;
    for (int s = 0; s < b->n_seqs; s++) {
        if (b->n_new[s] < 0 || cache->len[s] + b->n_new[s] > cache->capacity)
            return ep_fail(err, "forward: sequence %d: %d + %d tokens exceed the cache capacity %d", s, cache->len[s],
                           b->n_new[s], cache->capacity);
        T += b->n_new[s];
    }
    for (int r = 0; r < T; r++)
        if (b->tokens[r] < 0 || b->tokens[r] >= c->vocab_size)
            return ep_fail(err, "forward: token id %d at row %d is outside the vocabulary of %d", b->tokens[r], r,
                           c->vocab_size);
    for (int i = 0; i < b->n_logit_rows; i++)
        if (b->logit_rows[i] < 0 || b->logit_rows[i] >= T)
            return ep_fail(err, "forward: logit row %d is outside the %d new tokens", b->logit_rows[i], T);
    int first = b->first_layer, end = b->end_layer ? b->end_layer : c->n_layers;
    if (first < 0 || first > end || end > c->n_layers || (first > 0 && !b->x_in) ||
        (end < c->n_layers && b->n_logit_rows > 0))
        return ep_fail(err, "forward: layers %d..%d of %d (a later start needs x_in; logits need the last layer)", first,
                       end, c->n_layers);
    if (stats_check(c, b, err)) return -1;
    if (b->add) {
        if (b->add->layer < 0 || b->add->layer >= c->n_layers || !b->add->vec || b->add->n_rows < 0 ||
            (b->add->n_rows > 0 && !b->add->rows))
            return ep_fail(err, "forward: added vector: layer %d of %d, %d rows", b->add->layer, c->n_layers,
                           b->add->n_rows);
        for (int i = 0; i < b->add->n_rows; i++)
            if (b->add->rows[i] < 0 || b->add->rows[i] >= T)
                return ep_fail(err, "forward: added vector: row %d is outside the %d new tokens", b->add->rows[i], T);
    }
    if (b->attn_stats && !ops->attention_row_stats)
        return ep_fail(err, "forward: backend %s has no attention statistics", ops->name);
    if (T == 0) return 0;

    step_buffers s;
    step_buffers_init(&s, ops, c, T, b->n_logit_rows, b->n_seqs);
    int D = c->hidden, rc = 0;
    edge_rule_set *rules = patch && patch->layer_rules && sh.head0 > 0 ? ep_malloc(sizeof *rules) : NULL;
    stats_buffers st = {0};
    if (b->attn_stats) stats_init(&st, ops, c, b->n_seqs, b->attn_stats->n_types);
    for (int seq = 0, r = 0; seq < b->n_seqs; seq++) {
        s.seqs[seq] = (attn_seq){.q_row = r, .n_q = b->n_new[seq], .q_pos = cache->len[seq], .kv_row = seq * cache->capacity};
        if (patch) {
            s.seqs[seq].types = patch->types + (size_t)seq * patch->type_stride;
            s.seqs[seq].index = patch->index + (size_t)seq * patch->type_stride;
            s.seqs[seq].n_typed = patch->n_typed[seq];
            s.seqs[seq].donor_row = patch->n_donors > 0 ? seq * patch->donors[0]->capacity : 0;
        }
        for (int i = 0; i < b->n_new[seq]; i++, r++) s.host_pos[r] = cache->len[seq] + i;
    }
    ops->upload(s.pos, s.host_pos, sizeof(int) * (size_t)T);
    if (b->x_in && b->capture_backend) {
        ops->copy_rows(s.x, D, b->x_in, D, T, D);
    } else if (b->x_in) {
        ops->upload(s.x, b->x_in, sizeof(float) * (size_t)T * D);
    } else {
        rc = embed_rows(m, ops, b->tokens, T, s.idx, s.x, err);
    }

    forward_rows_part whole = {.first_seq = 0, .n_seqs = b->n_seqs, .patch = patch};
    layer_io io = {.kv_dim = cache->kv_dim, .z_dim = cache->z_dim, .parts = &whole, .n_parts = 1, .b = b, .st = &st,
                   .rules = rules};
    float *added = NULL;  // the scaled vector of b->add in ops' memory, when this pass runs its layer
    if (b->add && b->add->layer >= first && b->add->layer < end && b->add->n_rows > 0) {
        added = ops->alloc(sizeof(float) * (size_t)D);
        ops->upload(added, b->add->vec, sizeof(float) * (size_t)D);
        ops->scale(added, (size_t)D, b->add->scale);
    }
    for (int l = first; l < end && rc == 0; l++) {
        io.k = kv_cache_k(cache, l, 0, 0), io.v = kv_cache_v(cache, l, 0, 0);
        io.z = cache->z ? kv_cache_z(cache, l, 0, 0) : NULL;
        rc = layer_step(m, ops, l, &s, T, b->n_seqs, &io, err);
        if (rc == 0 && added && l == b->add->layer)
            for (int i = 0; i < b->add->n_rows; i++) ops->add(s.x + (size_t)b->add->rows[i] * D, added, (size_t)D);
    }
    if (added) ops->release(added);
    free(rules);
    if (rc == 0 && b->attn_stats) rc = stats_finish(m, ops, b, &st, err);
    if (b->attn_stats) stats_free(&st, ops);
    if (rc) {
        step_buffers_free(&s, ops);
        return -1;
    }
    if (b->resid) capture(ops, b, b->resid + (size_t)end * T * D, s.x, T, D);
    if (b->x_out) ops->download(b->x_out, s.x, sizeof(float) * (size_t)T * D);
    for (int seq = 0; seq < b->n_seqs; seq++) cache->len[seq] += b->n_new[seq];

    if (b->n_logit_rows > 0) rc = project_logits(m, ops, &s, b, err);
    ops->sync();
    step_buffers_free(&s, ops);
    return rc;
}

int model_forward_rows(const model *m, const kernel_ops *ops, const forward_rows *b, ep_error *err) {
    const model_config *c = &m->cfg;
    const kernel_ops *dev = ops->host_memory ? NULL : ops;
    if (m->backend != dev) return ep_fail(err, "forward rows: the %s backend needs the model in its memory", ops->name);
    tp_shard sh = model_config_local(c);
    if (sh.size > 1 && (!m->group || m->group->size != sh.size || m->group->rank != sh.rank))
        return ep_fail(err, "forward rows: a tensor-parallel shard (rank %d of %d) needs its group's collectives",
                       sh.rank, sh.size);
    if (b->layer < 0 || b->layer >= c->n_layers) return ep_fail(err, "forward rows: layer %d of %d", b->layer, c->n_layers);
    int T = 0, KV = sh.n_kv_heads * c->head_dim, D = c->hidden, rc = 0;
    for (int r = 0; r < b->n_seqs; r++) {
        const attn_seq *q = &b->seqs[r];
        if (q->q_row != T || q->n_q < 1 || q->q_pos < 0 || q->kv_row < 0 || (size_t)q->kv_row + q->q_pos + q->n_q > (size_t)b->n_kv_rows)
            return ep_fail(err, "forward rows: run %d (rows %d + %d at position %d, keys from row %d) is out of order or "
                                "outside the %d key rows", r, q->q_row, q->n_q, q->q_pos, q->kv_row, b->n_kv_rows);
        T += q->n_q;
    }
    if (T != b->n_rows) return ep_fail(err, "forward rows: the runs hold %d rows, %d given", T, b->n_rows);
    for (int i = 0, next = 0; i < b->n_parts; i++) {
        const forward_rows_part *pt = &b->parts[i];
        if (pt->first_seq != next || pt->n_seqs < 0 || next + pt->n_seqs > b->n_seqs)
            return ep_fail(err, "forward rows: part %d (runs %d + %d) does not follow the runs before it", i, pt->first_seq, pt->n_seqs);
        next += pt->n_seqs;
        if (i == b->n_parts - 1 && next != b->n_seqs) return ep_fail(err, "forward rows: the parts cover %d of %d runs", next, b->n_seqs);
        const forward_patch *p = pt->patch;
        if (!p) continue;
        if (p->n_donors < 0 || p->n_donors > 16) return ep_fail(err, "forward rows: %d donors (at most 16)", p->n_donors);
        for (int d = 0; d < p->n_donors; d++)
            if (!p->donors[d] || p->donors[d]->kv_dim != KV || p->donors[d]->n_layers != c->n_layers || p->donors[d]->backend != dev)
                return ep_fail(err, "forward rows: donor %d's cache does not match the model", d);
        if (p->layer_rules && p->layer_rules[b->layer].n > 0 && !ops->patched_attention)
            return ep_fail(err, "forward rows: backend %s has no patched attention", ops->name);
        for (int u = 0; u < p->n_head_units; u++) {
            const head_unit *h = &p->head_units[u];
            if (h->donor < 0 || h->donor >= p->n_donors || !p->donors[h->donor]->z)
                return ep_fail(err, "forward rows: head unit (layer %d, head %d) reads donor %d without head outputs",
                               h->layer, h->head, h->donor);
        }
        for (int r = pt->first_seq; r < pt->first_seq + pt->n_seqs && p->n_donors > 0; r++) {
            const attn_seq *q = &b->seqs[r];
            const kv_cache *d0 = p->donors[0];
            if (q->donor_row < 0 || (size_t)q->donor_row + q->q_pos + q->n_q > (size_t)d0->n_seqs * d0->capacity)
                return ep_fail(err, "forward rows: run %d reads donor rows from %d past the donors' %d", r, q->donor_row,
                               d0->n_seqs * d0->capacity);
        }
    }
    if (T == 0) return 0;
    step_buffers s;
    step_buffers_init(&s, ops, c, T, 0, b->n_seqs);
    memcpy(s.seqs, b->seqs, sizeof(attn_seq) * (size_t)b->n_seqs);
    for (int r = 0; r < b->n_seqs; r++)
        for (int i = 0; i < b->seqs[r].n_q; i++) s.host_pos[b->seqs[r].q_row + i] = b->seqs[r].q_pos + i;
    ops->upload(s.pos, s.host_pos, sizeof(int) * (size_t)T);
    ops->upload(s.x, b->x, sizeof(float) * (size_t)T * D);
    edge_rule_set *rules = sh.head0 > 0 ? ep_malloc(sizeof *rules) : NULL;
    layer_io io = {.k = b->k, .v = b->v, .kv_dim = KV, .parts = b->parts, .n_parts = b->n_parts, .rules = rules};
    rc = layer_step(m, ops, b->layer, &s, T, b->n_seqs, &io, err);
    free(rules);
    if (rc == 0) ops->download(b->x, s.x, sizeof(float) * (size_t)T * D);
    ops->sync();
    step_buffers_free(&s, ops);
    return rc;
}

int model_project_logits(const model *m, const kernel_ops *ops, const float *x, int n, float *logits, ep_error *err) {
    if (n <= 0) return 0;
    step_buffers s;
    step_buffers_init(&s, ops, &m->cfg, n, n, 1);
    int *rows = ep_malloc(sizeof(int) * (size_t)n);
    for (int i = 0; i < n; i++) rows[i] = i;
    ops->upload(s.x, x, sizeof(float) * (size_t)n * m->cfg.hidden);
    forward_batch b = {.n_seqs = 1, .n_logit_rows = n, .logit_rows = rows, .logits = logits};
    int rc = project_logits(m, ops, &s, &b, err);
    ops->sync();
    free(rows);
    step_buffers_free(&s, ops);
    return rc;
}

int model_head_output(const model *m, const kernel_ops *ops, int layer, int head, const float *z, int n, float *out,
                      ep_error *err) {
    const model_config *c = &m->cfg;
    if (model_config_local(c).size > 1) return ep_fail(err, "head output: a tensor-parallel shard holds part of o_proj");
    if (layer < 0 || layer >= c->n_layers || head < 0 || head >= c->n_heads || n < 0)
        return ep_fail(err, "head output: layer %d head %d is outside the model's %d x %d", layer, head, c->n_layers,
                       c->n_heads);
    if (n == 0) return 0;
    int Q = c->n_heads * c->head_dim, hd = c->head_dim;
    size_t nq = (size_t)n * Q;
    float *zeros = ep_calloc(nq, sizeof(float)), *masked = ops->alloc(sizeof(float) * nq);
    ops->upload(masked, zeros, sizeof(float) * nq);
    free(zeros);
    ops->copy_rows(masked + (size_t)head * hd, Q, z + (size_t)head * hd, Q, n, hd);
    const layer_weights *w = &m->layers[layer];
    linear(ops, out, masked, w->wo, w->wo_bf16, NULL, n, Q, c->hidden);
    ops->sync();
    ops->release(masked);
    return 0;
}
