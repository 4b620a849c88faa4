// The forward values come from model_forward (residual stream captured per layer, K/V/z kept in the
// cache); the backward walks the layers from the last to the first, recomputing each layer's inner
// values from its captured input (cheap next to the attention and matmuls it then runs), so only the
// residual stream of the whole pass is held at once. Matrix products through CBLAS, the rest in loops.
#include "backward.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops_common.h"

// dx[rows, n_in] (+)= dy[rows, n_out] . w[n_out, n_in]: the input gradient of a HF Linear.
static void linear_back(float *dx, const float *dy, const float *w, int rows, int n_in, int n_out, int accumulate) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, n_in, n_out, 1.0f, dy, n_out, w, n_in,
                accumulate ? 1.0f : 0.0f, dx, n_in);
}

// dx += d(norm(x))/dx^T dy, per row (w: the norm's weight; RMS with the config's offset, or LayerNorm).
static void norm_back(const model_config *c, float *dx, const float *x, const float *w, const float *dy, int rows) {
    int D = c->hidden;
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * D, *g = dy + (size_t)r * D;
        float *o = dx + (size_t)r * D;
        if (c->norm == NORM_LAYER) {
            double mean = 0, var = 0;
            for (int i = 0; i < D; i++) mean += xr[i];
            mean /= D;
            for (int i = 0; i < D; i++) var += (xr[i] - mean) * (xr[i] - mean);
            var /= D;
            double inv = 1.0 / sqrt(var + c->norm_eps), mg = 0, mgx = 0;
            for (int i = 0; i < D; i++) {
                double gw = (double)g[i] * w[i], xh = (xr[i] - mean) * inv;
                mg += gw, mgx += gw * xh;
            }
            mg /= D, mgx /= D;
            for (int i = 0; i < D; i++) {
                double gw = (double)g[i] * w[i], xh = (xr[i] - mean) * inv;
                o[i] += (float)(inv * (gw - mg - xh * mgx));
            }
        } else {
            double ss = 0, dot = 0;
            for (int i = 0; i < D; i++) {
                ss += (double)xr[i] * xr[i];
                dot += (double)g[i] * (c->norm_weight_offset + w[i]) * xr[i];
            }
            double inv = 1.0 / sqrt(ss / D + c->norm_eps);
            for (int i = 0; i < D; i++)
                o[i] += (float)(inv * g[i] * (c->norm_weight_offset + w[i]) - xr[i] * inv * inv * inv * dot / D);
        }
    }
}

static float act_grad(float x, act_kind act) {
    if (act == ACT_SILU) {
        float s = 1.0f / (1.0f + expf(-x));
        return s * (1.0f + x * (1.0f - s));
    }
    const float c = 0.7978845608028654f, k = 0.044715f;
    float t = tanhf(c * (x + k * x * x * x));
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * c * (1.0f + 3.0f * k * x * x);
}

static void norm_fwd(const kernel_ops *ops, const model_config *c, float *out, const float *x, const float *w,
                     const float *b, int rows) {
    if (c->norm == NORM_LAYER)
        ops->layernorm(out, x, w, b, rows, c->hidden, c->norm_eps);
    else
        ops->rmsnorm(out, x, w, c->norm_weight_offset, rows, c->hidden, c->norm_eps);
}

// One layer's inner values, recomputed from its input.
typedef struct {
    float *xn1, *q, *o, *po, *x1, *xn2, *gate, *up, *mo;  // po: Gemma's post-attention norm of o
    float *dxn, *dq, *dk, *dv, *dza, *dh, *dgate, *dup, *tmp, *tmp2;
} layer_scratch;

static void scratch_init(layer_scratch *s, const model_config *c, int T) {
    size_t t = (size_t)T, D = c->hidden, Q = (size_t)c->n_heads * c->head_dim, KV = (size_t)c->n_kv_heads * c->head_dim,
           NI = c->intermediate;
    float **d[] = {&s->xn1, &s->o, &s->po, &s->x1, &s->xn2, &s->mo, &s->dxn, &s->tmp, &s->tmp2};
    for (size_t i = 0; i < sizeof d / sizeof *d; i++) *d[i] = ep_calloc(t * D, sizeof(float));
    float **q[] = {&s->q, &s->dq, &s->dza};
    for (size_t i = 0; i < sizeof q / sizeof *q; i++) *q[i] = ep_calloc(t * Q, sizeof(float));
    s->dk = ep_calloc(t * KV, sizeof(float));
    s->dv = ep_calloc(t * KV, sizeof(float));
    float **m[] = {&s->gate, &s->up, &s->dh, &s->dgate, &s->dup};
    for (size_t i = 0; i < sizeof m / sizeof *m; i++) *m[i] = ep_calloc(t * NI, sizeof(float));
}

static void scratch_free(layer_scratch *s) {
    float *all[] = {s->xn1, s->q, s->o, s->po, s->x1, s->xn2, s->gate, s->up, s->mo, s->dxn, s->dq, s->dk,
                    s->dv, s->dza, s->dh, s->dgate, s->dup, s->tmp, s->tmp2};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) free(all[i]);
}

// mo = MLP(xn), keeping the pre-activation values in gate (and up).
static void mlp_fwd(const kernel_ops *ops, const model_config *c, const layer_weights *w, layer_scratch *s,
                    const float *xn, int T) {
    size_t n = (size_t)T * c->intermediate;
    float *h = s->dh;  // scratch for the activation output; dh is overwritten by the backward later
    if (c->gated_mlp) {
        ops->matmul(s->gate, xn, w->w_gate, w->b_gate, T, c->hidden, c->intermediate);
        ops->matmul(s->up, xn, w->w_up, w->b_up, T, c->hidden, c->intermediate);
        ops->glu(h, s->gate, s->up, n, c->act);
    } else {
        ops->matmul(s->gate, xn, w->w_up, w->b_up, T, c->hidden, c->intermediate);
        memcpy(h, s->gate, sizeof(float) * n);
        ops->act(h, n, c->act);
    }
    ops->matmul(s->mo, h, w->w_down, w->b_down, T, c->intermediate, c->hidden);
}

// dxn += the MLP's input gradient for output gradient dmo.
static void mlp_back(const model_config *c, const layer_weights *w, layer_scratch *s, const float *dmo, float *dxn,
                     int T) {
    size_t n = (size_t)T * c->intermediate;
    linear_back(s->dh, dmo, w->w_down, T, c->intermediate, c->hidden, 0);
    if (c->gated_mlp) {
        for (size_t i = 0; i < n; i++) {
            s->dgate[i] = s->dh[i] * s->up[i] * act_grad(s->gate[i], c->act);
            s->dup[i] = s->dh[i] * act_f(s->gate[i], c->act);
        }
        linear_back(dxn, s->dgate, w->w_gate, T, c->hidden, c->intermediate, 1);
        linear_back(dxn, s->dup, w->w_up, T, c->hidden, c->intermediate, 1);
    } else {
        for (size_t i = 0; i < n; i++) s->dgate[i] = s->dh[i] * act_grad(s->gate[i], c->act);
        linear_back(dxn, s->dgate, w->w_up, T, c->hidden, c->intermediate, 1);
    }
}

static float dotf(const float *a, const float *b, int n) {
    double s = 0;
    for (int i = 0; i < n; i++) s += (double)a[i] * b[i];
    return (float)s;
}

// Which donor the edge (l, h, A->B) of sequence s reads (-1: the current pass), as the patched kernels decide.
static int edge_source(const grad_tape *t, int l, int h, int s, int B, int A) {
    const forward_patch *p = &t->patch;
    if (!t->patched || !p->layer_rules || p->layer_rules[l].n == 0) return -1;
    if (B >= p->n_typed[s] || A >= p->n_typed[s]) return -1;
    const int32_t *ty = p->types + (size_t)s * p->type_stride, *ix = p->index + (size_t)s * p->type_stride;
    return edge_donor(&p->layer_rules[l], h, ty[A], ix[A], ty[B], ix[B]);
}

// Whether head h's output at (layer l, sequence s, position B) was replaced by a head unit.
static int substituted(const grad_tape *t, int l, int h, int s, int B) {
    const forward_patch *p = &t->patch;
    if (!t->patched || B >= p->n_typed[s]) return 0;
    int type = p->types[(size_t)s * p->type_stride + B];
    for (int u = 0; u < p->n_head_units; u++)
        if (p->head_units[u].layer == l && p->head_units[u].head == h && p->head_units[u].type == type) return 1;
    return 0;
}

static const float *key_read(const grad_tape *t, int l, int s, int A, int donor) {
    return donor >= 0 ? kv_cache_k(t->patch.donors[donor], l, s, A) : kv_cache_k(&t->cache, l, s, A);
}

static const float *value_read(const grad_tape *t, int l, int s, int A, int donor) {
    return donor >= 0 ? kv_cache_v(t->patch.donors[donor], l, s, A) : kv_cache_v(&t->cache, l, s, A);
}

// Attention of layer l, forward (p, sel) and backward: from dza (dL/dz, substituted heads zeroed) to dq and
// to dk, dv of the current pass's keys and values (donor K/V are constants). Fills the tape's p, dlogit, sel.
static void attention_back(grad_tape *t, const model_config *c, int l, const float *q, const float *dza, float *dq,
                           float *dk, float *dv) {
    int H = c->n_heads, hd = c->head_dim, Q = H * hd, KV = c->n_kv_heads * hd, rep = c->n_heads / c->n_kv_heads;
    int window = model_config_layer_window(c, l);
    float scale = c->attn_scale, cap = c->attn_softcap;
    memset(dq, 0, sizeof(float) * (size_t)t->n_rows * Q);
    memset(dk, 0, sizeof(float) * (size_t)t->n_rows * KV);
    memset(dv, 0, sizeof(float) * (size_t)t->n_rows * KV);
    int max_len = 0;
    for (int s = 0; s < t->n_seqs; s++) max_len = t->len[s] > max_len ? t->len[s] : max_len;
    float *g = ep_malloc(sizeof(float) * (size_t)max_len);
    for (int s = 0; s < t->n_seqs; s++) {
        int n = t->len[s], r0 = t->row[s];
        for (int h = 0; h < H; h++) {
            int gh = h / rep;
            size_t blk = (size_t)l * t->att_per_layer + t->att_off[s] + (size_t)h * n * n;
            for (int B = 0; B < n; B++) {
                float *p = t->p + blk + (size_t)B * n, *dl = t->dlogit + blk + (size_t)B * n;
                signed char *sel = t->sel + blk + (size_t)B * n;
                const float *qb = q + (size_t)(r0 + B) * Q + (size_t)h * hd, *dzb = dza + (size_t)(r0 + B) * Q + (size_t)h * hd;
                int j0 = window > 0 && B - window + 1 > 0 ? B - window + 1 : 0;
                float mx = -INFINITY;
                for (int A = j0; A <= B; A++) {
                    int dn = edge_source(t, l, h, s, B, A);
                    sel[A] = (signed char)dn;
                    float x = scale * dotf(qb, key_read(t, l, s, A, dn) + (size_t)gh * hd, hd);
                    if (cap > 0) x = cap * tanhf(x / cap);
                    p[A] = x;  // the (capped) score for now
                    if (x > mx) mx = x;
                }
                double sum = 0;
                for (int A = j0; A <= B; A++) sum += g[A] = expf(p[A] - mx);
                double gsum = 0;
                for (int A = j0; A <= B; A++) {
                    float sc = p[A];
                    p[A] = (float)(g[A] / sum);
                    dl[A] = cap > 0 ? 1.0f - (sc / cap) * (sc / cap) : 1.0f;  // softcap' for now
                    g[A] = dotf(dzb, value_read(t, l, s, A, sel[A]) + (size_t)gh * hd, hd);
                    gsum += (double)p[A] * g[A];
                }
                float *dqb = dq + (size_t)(r0 + B) * Q + (size_t)h * hd;
                for (int A = j0; A <= B; A++) {
                    dl[A] *= (float)(p[A] * (g[A] - gsum)) * scale;
                    const float *ks = key_read(t, l, s, A, sel[A]) + (size_t)gh * hd;
                    for (int i = 0; i < hd; i++) dqb[i] += dl[A] * ks[i];
                    if (sel[A] < 0) {
                        float *dkA = dk + (size_t)(r0 + A) * KV + (size_t)gh * hd, *dvA = dv + (size_t)(r0 + A) * KV + (size_t)gh * hd;
                        for (int i = 0; i < hd; i++) {
                            dkA[i] += dl[A] * qb[i];
                            dvA[i] += p[A] * dzb[i];
                        }
                    }
                }
            }
        }
    }
    free(g);
}

static void batch_rows(const grad_batch *b, int *T, int *n_pred) {
    *T = 0, *n_pred = 0;
    for (int s = 0; s < b->n_seqs; s++) *T += b->len[s], *n_pred += b->n_target[s];
}

static int check_batch(const grad_batch *b, ep_error *err) {
    if (b->n_seqs <= 0) return ep_fail(err, "backward: no sequences");
    for (int s = 0; s < b->n_seqs; s++)
        if (b->n_target[s] < 1 || b->n_target[s] >= b->len[s])
            return ep_fail(err, "backward: sequence %d has %d targets in %d tokens (need 1 <= targets < tokens)", s,
                           b->n_target[s], b->len[s]);
    return 0;
}

// The forward pass: cache filled (with z), residual stream captured, logits at the predicting rows;
// the loss and, when dlogits is non-NULL, dL/dlogits (after the final softcap) there.
static int forward_loss(const model *m, const grad_batch *b, const forward_patch *patch, kv_cache *cache, float *resid,
                        int *rows, double *loss, double *seq_loss, float *dlogits, ep_error *err) {
    const model_config *c = &m->cfg;
    int T, R, V = c->vocab_size, max_len = 0;
    batch_rows(b, &T, &R);
    for (int s = 0; s < b->n_seqs; s++) max_len = b->len[s] > max_len ? b->len[s] : max_len;
    if (kv_cache_init(cache, c, b->n_seqs, max_len, 1, err)) return -1;
    for (int s = 0, r0 = 0, k = 0; s < b->n_seqs; r0 += b->len[s], s++)
        for (int i = 0; i < b->n_target[s]; i++) rows[k++] = r0 + b->len[s] - b->n_target[s] - 1 + i;
    float *logits = ep_malloc(sizeof(float) * (size_t)R * V);
    forward_batch fb = {.n_seqs = b->n_seqs, .n_new = b->len, .tokens = b->tokens, .n_logit_rows = R,
                        .logit_rows = rows, .logits = logits, .resid = resid};
    if (model_forward(m, kernel_ops_cpu(), cache, &fb, patch, err)) {
        free(logits);
        return -1;
    }
    *loss = 0;
    for (int s = 0, k = 0; s < b->n_seqs; s++) {
        double ls = 0, w = 1.0 / ((double)b->n_target[s] * b->n_seqs);
        for (int i = 0; i < b->n_target[s]; i++, k++) {
            const float *y = logits + (size_t)k * V;
            int tgt = b->tokens[rows[k] + 1];
            float mx = y[0];
            for (int v = 1; v < V; v++) mx = y[v] > mx ? y[v] : mx;
            double sum = 0;
            for (int v = 0; v < V; v++) sum += exp((double)y[v] - mx);
            ls += log(sum) + mx - y[tgt];
            if (dlogits) {
                float *d = dlogits + (size_t)k * V;
                for (int v = 0; v < V; v++) {
                    double pr = exp((double)y[v] - mx) / sum;
                    double gy = w * (pr - (v == tgt));
                    if (c->final_softcap > 0) gy *= 1.0 - ((double)y[v] / c->final_softcap) * ((double)y[v] / c->final_softcap);
                    d[v] = (float)gy;
                }
            }
        }
        ls /= b->n_target[s];
        if (seq_loss) seq_loss[s] = ls;
        *loss += ls / b->n_seqs;
    }
    free(logits);
    return 0;
}

int model_loss(const model *m, const grad_batch *b, const forward_patch *patch, double *loss, double *seq_loss,
               ep_error *err) {
    if (check_batch(b, err)) return -1;
    int T, R;
    batch_rows(b, &T, &R);
    int *rows = ep_malloc(sizeof(int) * (size_t)R);
    kv_cache cache;
    int rc = forward_loss(m, b, patch, &cache, NULL, rows, loss, seq_loss, NULL, err);
    kv_cache_free(&cache);
    free(rows);
    return rc;
}

int model_backward(const model *m, const grad_batch *b, const forward_patch *patch, grad_tape *t, ep_error *err) {
    memset(t, 0, sizeof *t);
    if (model_config_local(&m->cfg).size > 1)
        return ep_fail(err, "backward: attribution needs the whole model, not a tensor-parallel shard (use importance "
                            "\"exact\" with tensor_parallel > 1)");
    if (check_batch(b, err)) return -1;
    const model_config *c = &m->cfg;
    const kernel_ops *ops = kernel_ops_cpu();
    int T, R, L = c->n_layers, D = c->hidden, V = c->vocab_size, H = c->n_heads, hd = c->head_dim;
    int Q = H * hd, KV = c->n_kv_heads * hd;
    batch_rows(b, &T, &R);
    t->n_layers = L, t->n_heads = H, t->n_kv_heads = c->n_kv_heads, t->head_dim = hd, t->n_seqs = b->n_seqs;
    t->n_rows = T;
    t->len = ep_malloc(sizeof(int) * (size_t)b->n_seqs);
    t->row = ep_malloc(sizeof(int) * (size_t)b->n_seqs);
    t->att_off = ep_malloc(sizeof(size_t) * (size_t)b->n_seqs);
    t->seq_loss = ep_calloc((size_t)b->n_seqs, sizeof(double));
    for (int s = 0, r = 0; s < b->n_seqs; r += b->len[s], s++) {
        t->len[s] = b->len[s], t->row[s] = r, t->att_off[s] = t->att_per_layer;
        t->att_per_layer += (size_t)H * b->len[s] * b->len[s];
    }
    if (patch) {
        t->patch = *patch;
        t->patched = 1;
    }

    int *rows = ep_malloc(sizeof(int) * (size_t)R), *pos = ep_malloc(sizeof(int) * (size_t)T);
    // The rotary transpose is the rotation by the negative angle: the forward rope op with negated
    // frequencies (pos * -f rounds to exactly -(pos * f), so cos is the same and sin changes sign).
    float *neg_inv_freq = ep_malloc(sizeof(float) * (size_t)(c->rotary_dim / 2));
    for (int i = 0; i < c->rotary_dim / 2; i++) neg_inv_freq[i] = -m->inv_freq[i];
    float *resid = ep_malloc(sizeof(float) * (size_t)(L + 1) * T * D);
    float *dlogits = ep_malloc(sizeof(float) * (size_t)R * V);
    if (forward_loss(m, b, patch, &t->cache, resid, rows, &t->loss, t->seq_loss, dlogits, err)) {
        free(rows), free(pos), free(resid), free(dlogits), free(neg_inv_freq);
        grad_tape_free(t);
        return -1;
    }
    for (int s = 0, r = 0; s < b->n_seqs; s++)
        for (int i = 0; i < b->len[s]; i++) pos[r++] = i;
    t->dz = ep_calloc((size_t)L * T * Q, sizeof(float));
    t->q = ep_calloc((size_t)L * T * Q, sizeof(float));
    t->p = ep_calloc((size_t)L * t->att_per_layer, sizeof(float));
    t->dlogit = ep_calloc((size_t)L * t->att_per_layer, sizeof(float));
    t->sel = ep_malloc((size_t)L * t->att_per_layer);
    memset(t->sel, -1, (size_t)L * t->att_per_layer);

    layer_scratch s;
    scratch_init(&s, c, T);
    float *dx = ep_calloc((size_t)T * D, sizeof(float)), *dx_in = ep_calloc((size_t)T * D, sizeof(float));
    // Final norm and lm_head at the predicting rows only.
    {
        float *xr = ep_malloc(sizeof(float) * (size_t)R * D), *dxn = ep_malloc(sizeof(float) * (size_t)R * D);
        float *dxr = ep_calloc((size_t)R * D, sizeof(float));
        for (int k = 0; k < R; k++) memcpy(xr + (size_t)k * D, resid + ((size_t)L * T + rows[k]) * D, sizeof(float) * D);
        linear_back(dxn, dlogits, m->lm_head, R, D, V, 0);
        norm_back(c, dxr, xr, m->final_norm, dxn, R);
        for (int k = 0; k < R; k++)
            for (int i = 0; i < D; i++) dx[(size_t)rows[k] * D + i] += dxr[(size_t)k * D + i];
        free(xr), free(dxn), free(dxr);
    }
    for (int l = L - 1; l >= 0; l--) {
        const layer_weights *w = &m->layers[l];
        const float *x = resid + (size_t)l * T * D;
        size_t TD = (size_t)T * D;
        // Recompute the layer's inner values.
        norm_fwd(ops, c, s.xn1, x, w->attn_norm, w->attn_norm_bias, T);
        ops->matmul(s.q, s.xn1, w->wq, w->bq, T, D, Q);
        ops->rope(s.q, Q, pos, m->inv_freq, T, H, hd, c->rotary_dim);
        memcpy(t->q + (size_t)l * T * Q, s.q, sizeof(float) * (size_t)T * Q);
        float *z = ep_malloc(sizeof(float) * (size_t)T * Q);
        for (int sq = 0; sq < b->n_seqs; sq++)
            memcpy(z + (size_t)t->row[sq] * Q, kv_cache_z(&t->cache, l, sq, 0), sizeof(float) * (size_t)b->len[sq] * Q);
        ops->matmul(s.o, z, w->wo, w->bo, T, Q, D);
        free(z);
        const float *mlp_in = s.xn1;
        if (c->block != BLOCK_PARALLEL) {
            memcpy(s.x1, x, sizeof(float) * TD);
            if (c->block == BLOCK_SANDWICH_NORM) {
                norm_fwd(ops, c, s.po, s.o, w->attn_post_norm, NULL, T);
                ops->add(s.x1, s.po, TD);
            } else {
                ops->add(s.x1, s.o, TD);
            }
            norm_fwd(ops, c, s.xn2, s.x1, w->mlp_norm, NULL, T);
            mlp_in = s.xn2;
        }
        mlp_fwd(ops, c, w, &s, mlp_in, T);

        // Backward: do (gradient of the attention block's o_proj output) into s.tmp, dxn1 into s.dxn.
        memset(s.dxn, 0, sizeof(float) * TD);
        float *dx1 = s.tmp2;
        if (c->block == BLOCK_PARALLEL) {
            memcpy(s.tmp, dx, sizeof(float) * TD);
            mlp_back(c, w, &s, dx, s.dxn, T);
            memcpy(dx1, dx, sizeof(float) * TD);
        } else {
            const float *dmo = dx;
            if (c->block == BLOCK_SANDWICH_NORM) {
                memset(s.tmp, 0, sizeof(float) * TD);
                norm_back(c, s.tmp, s.mo, w->mlp_post_norm, dx, T);
                dmo = s.tmp;
            }
            memset(s.po, 0, sizeof(float) * TD);  // dxn2
            mlp_back(c, w, &s, dmo, s.po, T);
            memcpy(dx1, dx, sizeof(float) * TD);
            norm_back(c, dx1, s.x1, w->mlp_norm, s.po, T);
            if (c->block == BLOCK_SANDWICH_NORM) {
                memset(s.tmp, 0, sizeof(float) * TD);
                norm_back(c, s.tmp, s.o, w->attn_post_norm, dx1, T);
            } else {
                memcpy(s.tmp, dx1, sizeof(float) * TD);
            }
        }
        // dz = do . W_o, kept; the attention below sees it zeroed where a head unit replaced the output.
        float *dz = t->dz + (size_t)l * T * Q;
        linear_back(dz, s.tmp, w->wo, T, Q, D, 0);
        memcpy(s.dza, dz, sizeof(float) * (size_t)T * Q);
        if (t->patched && t->patch.n_head_units > 0)
            for (int sq = 0; sq < b->n_seqs; sq++)
                for (int B = 0; B < b->len[sq]; B++)
                    for (int h = 0; h < H; h++)
                        if (substituted(t, l, h, sq, B)) memset(s.dza + (size_t)(t->row[sq] + B) * Q + (size_t)h * hd, 0, sizeof(float) * hd);
        attention_back(t, c, l, s.q, s.dza, s.dq, s.dk, s.dv);
        ops->rope(s.dq, Q, pos, neg_inv_freq, T, H, hd, c->rotary_dim);
        ops->rope(s.dk, KV, pos, neg_inv_freq, T, c->n_kv_heads, hd, c->rotary_dim);
        linear_back(s.dxn, s.dq, w->wq, T, D, Q, 1);
        linear_back(s.dxn, s.dk, w->wk, T, D, KV, 1);
        linear_back(s.dxn, s.dv, w->wv, T, D, KV, 1);
        memcpy(dx_in, dx1, sizeof(float) * TD);
        norm_back(c, dx_in, x, w->attn_norm, s.dxn, T);
        float *sw = dx;
        dx = dx_in, dx_in = sw;
    }
    scratch_free(&s);
    free(dx), free(dx_in), free(rows), free(pos), free(resid), free(dlogits), free(neg_inv_freq);
    return 0;
}

void grad_tape_free(grad_tape *t) {
    free(t->len), free(t->row), free(t->att_off), free(t->seq_loss), free(t->dz), free(t->q), free(t->p);
    free(t->dlogit), free(t->sel);
    kv_cache_free(&t->cache);
    memset(t, 0, sizeof *t);
}

const float *grad_tape_dz(const grad_tape *t, int layer, int row) {
    return t->dz + ((size_t)layer * t->n_rows + row) * t->n_heads * t->head_dim;
}

// dL/dz of head h at (l, s, B) as the attention saw it: NULL (zero) where a head unit replaced the output.
static const float *dz_seen(const grad_tape *t, int l, int h, int s, int B) {
    if (substituted(t, l, h, s, B)) return NULL;
    return grad_tape_dz(t, l, t->row[s] + B) + (size_t)h * t->head_dim;
}

void grad_edge_kv(const grad_tape *t, int layer, int head, int seq, int B, int A, float *dk, float *dv) {
    int hd = t->head_dim, n = t->len[seq];
    memset(dk, 0, sizeof(float) * hd);
    memset(dv, 0, sizeof(float) * hd);
    if (A < 0 || A > B || B >= n) return;
    size_t e = (size_t)layer * t->att_per_layer + t->att_off[seq] + ((size_t)head * n + B) * n + A;
    const float *q = t->q + ((size_t)layer * t->n_rows + t->row[seq] + B) * t->n_heads * hd + (size_t)head * hd;
    const float *dz = dz_seen(t, layer, head, seq, B);
    for (int i = 0; i < hd; i++) {
        dk[i] = t->dlogit[e] * q[i];
        dv[i] = dz ? t->p[e] * dz[i] : 0.0f;
    }
}

static int check_donor(const grad_tape *t, int layer, int head, int donor, int need_z, ep_error *err) {
    if (!t->patched || !t->patch.types)
        return ep_fail(err, "scores: the pass ran without donors and token types");
    if (layer < 0 || layer >= t->n_layers || head < 0 || head >= t->n_heads || donor < 0 ||
        donor >= t->patch.n_donors || !t->patch.donors[donor] || (need_z && !t->patch.donors[donor]->z))
        return ep_fail(err, "scores: unit (layer %d, head %d, donor %d) is out of range or its donor is missing%s",
                       layer, head, donor, need_z ? " (or has no head outputs)" : "");
    return 0;
}

static void finish_scores(double *signed_sum, int n, int S, double *score, double *per_seq) {
    for (int u = 0; u < n; u++) {
        score[u] = 0;
        for (int s = 0; s < S; s++) {
            score[u] += fabs(signed_sum[(size_t)u * S + s]) / S;
            if (per_seq) per_seq[(size_t)u * S + s] = signed_sum[(size_t)u * S + s];
        }
    }
}

int grad_head_scores(const grad_tape *t, const head_unit *units, int n, double *score, double *per_seq, ep_error *err) {
    int S = t->n_seqs, hd = t->head_dim;
    for (int u = 0; u < n; u++)
        if (check_donor(t, units[u].layer, units[u].head, units[u].donor, 1, err)) return -1;
    double *sum = ep_calloc((size_t)n * S + 1, sizeof(double));
    for (int u = 0; u < n; u++) {
        const head_unit *hu = &units[u];
        const kv_cache *dn = t->patch.donors[hu->donor];
        for (int s = 0; s < S; s++) {
            const int32_t *ty = t->patch.types + (size_t)s * t->patch.type_stride;
            for (int B = 0; B < t->patch.n_typed[s] && B < t->len[s]; B++) {
                if (ty[B] != hu->type) continue;
                size_t off = (size_t)hu->head * hd;
                const float *zc = kv_cache_z(&t->cache, hu->layer, s, B) + off, *zd = kv_cache_z(dn, hu->layer, s, B) + off;
                const float *g = grad_tape_dz(t, hu->layer, t->row[s] + B) + off;
                double acc = 0;
                for (int i = 0; i < hd; i++) acc += ((double)zc[i] - zd[i]) * g[i];
                sum[(size_t)u * S + s] += acc;
            }
        }
    }
    finish_scores(sum, n, S, score, per_seq);
    free(sum);
    return 0;
}

int grad_edge_scores(const grad_tape *t, const edge_unit *units, int n, double *score, double *per_seq, ep_error *err) {
    int S = t->n_seqs, hd = t->head_dim, rep = t->n_heads / t->n_kv_heads;
    for (int u = 0; u < n; u++)
        if (check_donor(t, units[u].layer, units[u].head, units[u].donor, 0, err)) return -1;
    double *sum = ep_calloc((size_t)n * S + 1, sizeof(double));
    for (int u = 0; u < n; u++) {
        const edge_unit *eu = &units[u];
        int l = eu->layer, h = eu->head, g = h / rep;
        size_t off = (size_t)g * hd;
        const kv_cache *dn = t->patch.donors[eu->donor];
        for (int s = 0; s < S; s++) {
            int len = t->len[s], n_typed = t->patch.n_typed[s] < len ? t->patch.n_typed[s] : len;
            const int32_t *ty = t->patch.types + (size_t)s * t->patch.type_stride;
            double acc = 0;
            for (int B = 0; B < n_typed; B++) {
                if (ty[B] != eu->receiver) continue;
                const float *q = t->q + ((size_t)l * t->n_rows + t->row[s] + B) * t->n_heads * hd + (size_t)h * hd;
                const float *dz = dz_seen(t, l, h, s, B);  // NULL: substituted, the edges into B score 0
                size_t e0 = (size_t)l * t->att_per_layer + t->att_off[s] + ((size_t)h * len + B) * len;
                for (int A = 0; A <= B; A++) {
                    if (ty[A] != eu->sender || (t->p[e0 + A] == 0 && t->dlogit[e0 + A] == 0)) continue;
                    int rd = t->sel[e0 + A];
                    const float *ks = key_read(t, l, s, A, rd) + off, *vs = value_read(t, l, s, A, rd) + off;
                    const float *kd = kv_cache_k(dn, l, s, A) + off, *vd = kv_cache_v(dn, l, s, A) + off;
                    double dk = 0, dv = 0;
                    for (int i = 0; i < hd; i++) {
                        dk += (double)q[i] * ((double)kd[i] - ks[i]);
                        if (dz) dv += (double)dz[i] * ((double)vd[i] - vs[i]);
                    }
                    acc += t->dlogit[e0 + A] * dk + t->p[e0 + A] * dv;
                }
            }
            sum[(size_t)u * S + s] = acc;
        }
    }
    finish_scores(sum, n, S, score, per_seq);
    free(sum);
    return 0;
}
