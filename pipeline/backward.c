// The forward values come from model_forward (residual stream, post-RoPE queries and the attention
// blocks' outputs captured per layer, K/V/z kept in the cache); the backward walks the layers from the
// last to the first, recomputing from these only the norms and the MLP's pre-activations, so the MLP's
// wide intermediate values are never held for the whole pass. Matrix products through the cpu backend's
// cpu_sgemm (kernels/cpu_gemm.h: the bits do not depend on the thread count; the attention per sequence
// and head, as the cpu kernels run it), the rest in loops.
#include "backward.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu_gemm.h"
#include "kernels/ops_common.h"

// dx[rows, n_in] (+)= dy[rows, n_out] . w[n_out, n_in]: the input gradient of a HF Linear.
static void linear_back(float *dx, const float *dy, const float *w, int rows, int n_in, int n_out, int accumulate) {
    cpu_sgemm(0, 0, rows, n_in, n_out, 1.0f, dy, n_out, w, n_in, accumulate ? 1.0f : 0.0f, dx, n_in);
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

// The activation's value and derivative at x, from one exp or tanh.
static float act_and_grad(float x, act_kind act, float *grad) {
    if (act == ACT_SILU) {
        float s = 1.0f / (1.0f + expf(-x));
        *grad = s * (1.0f + x * (1.0f - s));
        return x * s;
    }
    const float c = 0.7978845608028654f, k = 0.044715f;
    float t = tanhf(c * (x + k * x * x * x));
    *grad = 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * c * (1.0f + 3.0f * k * x * x);
    return 0.5f * x * (1.0f + t);
}

static void norm_fwd(const kernel_ops *ops, const model_config *c, float *out, const float *x, const float *w,
                     const float *b, int rows) {
    if (c->norm == NORM_LAYER)
        ops->layernorm(out, x, w, b, rows, c->hidden, c->norm_eps);
    else
        ops->rmsnorm(out, x, w, c->norm_weight_offset, rows, c->hidden, c->norm_eps);
}

// One layer's scratch: the recomputed MLP input and pre-activations, and the gradients.
typedef struct {
    float *xn, *po, *x1, *gate, *up, *mo;  // po: Gemma's post-attention norm of o
    float *dxn, *dq, *dk, *dv, *dza, *dh, *dgate, *dup, *tmp, *tmp2;
} layer_scratch;

// Sized for the rank's heads and MLP columns (the whole model's for a whole model).
static void scratch_init(layer_scratch *s, const model_config *c, int T) {
    tp_shard sh = model_config_local(c);
    size_t t = (size_t)T, D = c->hidden, Q = (size_t)sh.n_heads * c->head_dim, KV = (size_t)sh.n_kv_heads * c->head_dim,
           NI = sh.n_inter;
    float **d[] = {&s->xn, &s->po, &s->x1, &s->mo, &s->dxn, &s->tmp, &s->tmp2};
    for (size_t i = 0; i < sizeof d / sizeof *d; i++) *d[i] = ep_calloc(t * D, sizeof(float));
    float **q[] = {&s->dq, &s->dza};
    for (size_t i = 0; i < sizeof q / sizeof *q; i++) *q[i] = ep_calloc(t * Q, sizeof(float));
    s->dk = ep_calloc(t * KV, sizeof(float));
    s->dv = ep_calloc(t * KV, sizeof(float));
    float **m[] = {&s->gate, &s->up, &s->dh, &s->dgate, &s->dup};
    for (size_t i = 0; i < sizeof m / sizeof *m; i++) *m[i] = ep_calloc(t * NI, sizeof(float));
}

static void scratch_free(layer_scratch *s) {
    float *all[] = {s->xn, s->po, s->x1, s->gate, s->up, s->mo, s->dxn, s->dq, s->dk,
                    s->dv, s->dza, s->dh, s->dgate, s->dup, s->tmp, s->tmp2};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) free(all[i]);
}

// The MLP's pre-activation values from xn in gate (and up), NI columns (a shard's); its output mo only for
// the sandwich block, whose post-norm backward is the only reader of it (a shard's part of the sum, with
// the down projection's bias on the group's first rank only, as in the forward).
static void mlp_fwd(const kernel_ops *ops, const model_config *c, const layer_weights *w, layer_scratch *s,
                    const float *xn, int T, int NI) {
    size_t n = (size_t)T * NI;
    ops->matmul(s->gate, xn, c->gated_mlp ? w->w_gate : w->w_up, c->gated_mlp ? w->b_gate : w->b_up, T, c->hidden, NI);
    if (c->gated_mlp) ops->matmul(s->up, xn, w->w_up, w->b_up, T, c->hidden, NI);
    if (c->block != BLOCK_SANDWICH_NORM) return;
    float *h = s->dh;  // scratch for the activation output; dh is overwritten by the backward later
    if (c->gated_mlp) {
        ops->glu(h, s->gate, s->up, n, c->act);
    } else {
        memcpy(h, s->gate, sizeof(float) * n);
        ops->act(h, n, c->act);
    }
    ops->matmul(s->mo, h, w->w_down, w->b_down, T, NI, c->hidden);
}

// dxn += the MLP's input gradient for output gradient dmo (a shard's NI columns: its part of the sum).
static void mlp_back(const model_config *c, const layer_weights *w, layer_scratch *s, const float *dmo, float *dxn,
                     int T, int NI) {
    size_t n = (size_t)T * NI;
    linear_back(s->dh, dmo, w->w_down, T, NI, c->hidden, 0);
    if (c->gated_mlp) {
        for (size_t i = 0; i < n; i++) {
            float da, a = act_and_grad(s->gate[i], c->act, &da);
            s->dgate[i] = s->dh[i] * s->up[i] * da;
            s->dup[i] = s->dh[i] * a;
        }
        linear_back(dxn, s->dgate, w->w_gate, T, c->hidden, NI, 1);
        linear_back(dxn, s->dup, w->w_up, T, c->hidden, NI, 1);
    } else {
        for (size_t i = 0; i < n; i++) {
            float da;
            act_and_grad(s->gate[i], c->act, &da);
            s->dgate[i] = s->dh[i] * da;
        }
        linear_back(dxn, s->dgate, w->w_up, T, c->hidden, NI, 1);
    }
}

// Which donor the edge (l, h, A->B) of sequence s reads (-1: the current pass), as the patched kernels decide
// (h: the model's head number, as rules and head units name heads).
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

// out[n, :nb] = alpha a[n, hd] . b[nb, hd]^T (row strides lda, ldb; out's rows n floats apart): one
// (sequence, head) block of query-key or gradient-value products, against nb keys or values.
static void outer_block(float *out, const float *a, int lda, const float *b, int ldb, int n, int nb, int hd, float alpha) {
    if (nb > 0) cpu_sgemm(0, 1, n, nb, hd, alpha, a, lda, b, ldb, 0.0f, out, n);
}

// out[n, hd] (+)= m[n, :nb] . b[nb, hd] (transpose_m: m^T . b, m's first nb rows), out and b with row
// strides ldo, ldb; m is n x n.
static void block_times(float *out, int ldo, const float *m, int transpose_m, const float *b, int ldb, int n, int nb,
                        int hd, int accumulate) {
    if (nb > 0)
        cpu_sgemm(transpose_m, 0, n, hd, nb, 1.0f, m, n, b, ldb, accumulate ? 1.0f : 0.0f, out, ldo);
    else if (!accumulate)
        for (int i = 0; i < n; i++) memset(out + (size_t)i * ldo, 0, sizeof(float) * (size_t)hd);
}

// Attention of layer l, forward (p, sel) and backward: from dza (dL/dz, substituted heads zeroed) to dq and
// to dk, dv of the current pass's keys and values (donor K/V are constants). Fills the tape's p, dlogit, sel.
// Per (sequence, head) in BLAS form, as the cpu kernels run the forward: the score and dL/dz . v products
// against the current keys and values and against every donor a rule of the layer reads, the selection,
// softcap, softmax and their transposes per edge, then dq = dlogit K* and dk += dlogit^T q, dv += p^T dz
// summed by source (masked copies of dlogit and p hold one source's edges).
static void attention_back(grad_tape *t, const model_config *c, int l, const float *q, const float *dza, float *dq,
                           float *dk, float *dv) {
    int H = t->n_heads, hd = c->head_dim, Q = H * hd, KV = t->n_kv_heads * hd, rep = t->n_heads / t->n_kv_heads;
    int window = model_config_layer_window(c, l);
    float scale = c->attn_scale, cap = c->attn_softcap;
    const forward_patch *pt = &t->patch;
    int patched = t->patched && pt->layer_rules && pt->layer_rules[l].n > 0;
    int used[16] = {0};  // donors this layer's rules read
    for (int r = 0; patched && r < pt->layer_rules[l].n; r++) {
        int d = pt->layer_rules[l].rule[r].donor;
        if (d >= 0 && d < pt->n_donors) used[d] = 1;
    }
    memset(dk, 0, sizeof(float) * (size_t)t->n_rows * KV);
    memset(dv, 0, sizeof(float) * (size_t)t->n_rows * KV);
    int max_len = 0;
    for (int s = 0; s < t->n_seqs; s++) max_len = t->len[s] > max_len ? t->len[s] : max_len;
    size_t nn = (size_t)max_len * max_len;
    // g: dL/dz . v* per edge; x: per donor, scores and dL/dz . v_donor; msk: one source's share of p or dlogit.
    float *g = ep_malloc(sizeof(float) * nn), *msk = patched ? ep_malloc(sizeof(float) * nn) : NULL;
    float *x = patched ? ep_malloc(sizeof(float) * nn * 2 * (size_t)pt->n_donors) : NULL;
    for (int s = 0; s < t->n_seqs; s++) {
        // Donor keys and values exist for the typed (prompt) positions only, and only those can be read
        // from a donor: the donor products stop there (0 x whatever lies beyond could be NaN).
        int n = t->len[s], r0 = t->row[s], nd = patched && pt->n_typed[s] < n ? pt->n_typed[s] : n;
        const float *K = kv_cache_k(&t->cache, l, s, 0), *V = kv_cache_v(&t->cache, l, s, 0);
        for (int h = 0; h < H; h++) {
            size_t off = (size_t)(h / rep) * hd, blk = (size_t)l * t->att_per_layer + t->att_off[s] + (size_t)h * n * n;
            float *P = t->p + blk, *DL = t->dlogit + blk;
            signed char *SEL = t->sel + blk;
            const float *qh = q + (size_t)r0 * Q + (size_t)h * hd, *dzh = dza + (size_t)r0 * Q + (size_t)h * hd;
            float *dqh = dq + (size_t)r0 * Q + (size_t)h * hd, *dkh = dk + (size_t)r0 * KV + off, *dvh = dv + (size_t)r0 * KV + off;
            outer_block(P, qh, Q, K + off, KV, n, n, hd, scale);
            outer_block(g, dzh, Q, V + off, KV, n, n, hd, 1.0f);
            for (int d = 0; d < pt->n_donors && patched; d++)
                if (used[d]) {
                    outer_block(x + 2 * d * nn, qh, Q, kv_cache_k(pt->donors[d], l, s, 0) + off, KV, n, nd, hd, scale);
                    outer_block(x + (2 * d + 1) * nn, dzh, Q, kv_cache_v(pt->donors[d], l, s, 0) + off, KV, n, nd, hd, 1.0f);
                }
            for (int B = 0; B < n; B++) {
                float *p = P + (size_t)B * n, *dl = DL + (size_t)B * n, *gb = g + (size_t)B * n;
                signed char *sel = SEL + (size_t)B * n;
                int j0 = window > 0 && B - window + 1 > 0 ? B - window + 1 : 0;
                float mx = -INFINITY;
                for (int A = j0; A <= B; A++) {
                    int dn = patched ? edge_source(t, l, t->head0 + h, s, B, A) : -1;
                    float sc = p[A];
                    if (dn >= 0) {
                        sel[A] = (signed char)dn;
                        sc = x[2 * dn * nn + (size_t)B * n + A];
                        gb[A] = x[(2 * dn + 1) * nn + (size_t)B * n + A];
                    }
                    if (cap > 0) sc = cap * tanhf(sc / cap);
                    dl[A] = cap > 0 ? 1.0f - (sc / cap) * (sc / cap) : 1.0f;  // softcap' for now
                    p[A] = sc;
                    if (sc > mx) mx = sc;
                }
                float sum = 0;
                for (int A = j0; A <= B; A++) sum += p[A] = expf(p[A] - mx);
                float inv = 1.0f / sum, gsum = 0;
                for (int A = j0; A <= B; A++) gsum += (p[A] *= inv) * gb[A];
                for (int A = j0; A <= B; A++) dl[A] *= p[A] * (gb[A] - gsum) * scale;
                for (int A = 0; A < j0; A++) p[A] = dl[A] = 0;
                for (int A = B + 1; A < n; A++) p[A] = dl[A] = 0;
            }
            if (!patched) {
                block_times(dqh, Q, DL, 0, K + off, KV, n, n, hd, 0);
                block_times(dkh, KV, DL, 1, qh, Q, n, n, hd, 1);
                block_times(dvh, KV, P, 1, dzh, Q, n, n, hd, 1);
                continue;
            }
            for (int d = -1, first = 1; d < pt->n_donors; d++) {
                if (d >= 0 && !used[d]) continue;
                for (size_t e = 0; e < (size_t)n * n; e++) msk[e] = SEL[e] == d ? DL[e] : 0.0f;
                block_times(dqh, Q, msk, 0, (d < 0 ? K : kv_cache_k(pt->donors[d], l, s, 0)) + off, KV, n, d < 0 ? n : nd, hd, !first);
                first = 0;
                if (d >= 0) continue;
                block_times(dkh, KV, msk, 1, qh, Q, n, n, hd, 1);
                for (size_t e = 0; e < (size_t)n * n; e++) msk[e] = SEL[e] < 0 ? P[e] : 0.0f;
                block_times(dvh, KV, msk, 1, dzh, Q, n, n, hd, 1);
            }
        }
    }
    free(g), free(msk), free(x);
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

// The forward pass: cache filled (with z), keep's resid, q_out and attn_out captured (keep may be NULL),
// logits at the predicting rows; the loss and, when dlogits is non-NULL, dL/dlogits (after the final
// softcap) there.
static int forward_loss(const model *m, const grad_batch *b, const forward_patch *patch, kv_cache *cache,
                        const forward_batch *keep, int *rows, double *loss, double *seq_loss, float *dlogits,
                        ep_error *err) {
    const model_config *c = &m->cfg;
    int T, R, V = c->vocab_size, max_len = 0;
    batch_rows(b, &T, &R);
    for (int s = 0; s < b->n_seqs; s++) max_len = b->len[s] > max_len ? b->len[s] : max_len;
    if (kv_cache_init(cache, c, b->n_seqs, max_len, 1, err)) return -1;
    for (int s = 0, r0 = 0, k = 0; s < b->n_seqs; r0 += b->len[s], s++)
        for (int i = 0; i < b->n_target[s]; i++) rows[k++] = r0 + b->len[s] - b->n_target[s] - 1 + i;
    float *logits = ep_malloc(sizeof(float) * (size_t)R * V);
    forward_batch fb = {.n_seqs = b->n_seqs, .n_new = b->len, .tokens = b->tokens, .n_logit_rows = R,
                        .logit_rows = rows, .logits = logits};
    if (keep) fb.resid = keep->resid, fb.q_out = keep->q_out, fb.attn_out = keep->attn_out;
    if (model_forward(m, kernel_ops_cpu(), cache, &fb, patch, err)) {
        free(logits);
        return -1;
    }
    *loss = 0;
    for (int s = 0, k = 0; s < b->n_seqs; s++) {
        // Each prompt's own loss, summed over the batch: a prompt's gradient never depends on which
        // prompts share its batch (docs/attribution.md: the original's batch mean scaled it by 1/S).
        double ls = 0, w = 1.0 / (double)b->n_target[s];
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
        *loss += ls;
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
    if (check_batch(b, err)) return -1;
    const model_config *c = &m->cfg;
    const kernel_ops *ops = kernel_ops_cpu();
    tp_shard sh = model_config_local(c);
    int T, R, L = c->n_layers, D = c->hidden, V = c->vocab_size, H = sh.n_heads, hd = c->head_dim, NI = sh.n_inter;
    int Q = H * hd, KV = sh.n_kv_heads * hd;
    batch_rows(b, &T, &R);
    t->n_layers = L, t->n_heads = H, t->n_kv_heads = sh.n_kv_heads, t->head_dim = hd, t->n_seqs = b->n_seqs;
    t->head0 = sh.head0, t->model_heads = c->n_heads, t->group = sh.size > 1 ? m->group : NULL;
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
    float *resid = ep_malloc(sizeof(float) * (size_t)(L + 1) * T * D), *attn = ep_malloc(sizeof(float) * (size_t)L * T * D);
    float *dlogits = ep_malloc(sizeof(float) * (size_t)R * V);
    t->q = ep_malloc(sizeof(float) * (size_t)L * T * Q);
    forward_batch keep = {.resid = resid, .q_out = t->q, .attn_out = attn};
    if (forward_loss(m, b, patch, &t->cache, &keep, rows, &t->loss, t->seq_loss, dlogits, err)) {
        free(rows), free(pos), free(resid), free(attn), free(dlogits), free(neg_inv_freq);
        grad_tape_free(t);
        return -1;
    }
    for (int s = 0, r = 0; s < b->n_seqs; s++)
        for (int i = 0; i < b->len[s]; i++) pos[r++] = i;
    t->dz = ep_calloc((size_t)L * T * Q, sizeof(float));
    t->p = ep_calloc((size_t)L * t->att_per_layer, sizeof(float));
    t->dlogit = ep_calloc((size_t)L * t->att_per_layer, sizeof(float));
    t->sel = ep_malloc((size_t)L * t->att_per_layer);
    memset(t->sel, -1, (size_t)L * t->att_per_layer);

    // A shard (docs/tensor_parallel.md): dL/dlogits is whole on every rank (the logits were gathered) and
    // so is every gradient of the residual stream. The row-parallel o and down projections' backward is
    // local; the input gradients of the column-parallel projections (q/k/v, gate/up, the lm_head block)
    // are parts of a sum, summed over the group before the norm they come from (model_group_sum).
    layer_scratch s;
    scratch_init(&s, c, T);
    float *dx = ep_calloc((size_t)T * D, sizeof(float)), *dx_in = ep_calloc((size_t)T * D, sizeof(float));
    // Final norm and lm_head (a vocabulary-parallel shard's rows: its block of dlogits' columns) at the
    // predicting rows only.
    float *xr = ep_malloc(sizeof(float) * (size_t)R * D), *dxn = ep_malloc(sizeof(float) * (size_t)R * D);
    float *dxr = ep_calloc((size_t)R * D, sizeof(float));
    for (int k = 0; k < R; k++) memcpy(xr + (size_t)k * D, resid + ((size_t)L * T + rows[k]) * D, sizeof(float) * D);
    cpu_sgemm(0, 0, R, D, sh.n_vocab, 1.0f, dlogits + sh.vocab0, V, m->lm_head, D, 0.0f, dxn, D);
    int rc = sh.n_vocab < V ? model_group_sum(m, dxn, (size_t)R * D, err) : 0;
    if (rc == 0) {
        norm_back(c, dxr, xr, m->final_norm, dxn, R);
        for (int k = 0; k < R; k++)
            for (int i = 0; i < D; i++) dx[(size_t)rows[k] * D + i] += dxr[(size_t)k * D + i];
    }
    free(xr), free(dxn), free(dxr);
    for (int l = L - 1; l >= 0 && rc == 0; l--) {
        const layer_weights *w = &m->layers[l];
        const float *x = resid + (size_t)l * T * D;
        size_t TD = (size_t)T * D;
        const float *o = attn + (size_t)l * T * D;  // summed over a group (not read by the parallel block)
        // Recompute the MLP's input (into s.xn) and pre-activations.
        if (c->block == BLOCK_PARALLEL) {
            norm_fwd(ops, c, s.xn, x, w->attn_norm, w->attn_norm_bias, T);
        } else {
            memcpy(s.x1, x, sizeof(float) * TD);
            if (c->block == BLOCK_SANDWICH_NORM) {
                norm_fwd(ops, c, s.po, o, w->attn_post_norm, NULL, T);
                ops->add(s.x1, s.po, TD);
            } else {
                ops->add(s.x1, o, TD);
            }
            norm_fwd(ops, c, s.xn, s.x1, w->mlp_norm, NULL, T);
        }
        mlp_fwd(ops, c, w, &s, s.xn, T, NI);
        if (c->block == BLOCK_SANDWICH_NORM && (rc = model_group_sum(m, s.mo, TD, err))) break;

        // Backward: do (gradient of the attention block's o_proj output) into s.tmp, dxn1 into s.dxn.
        memset(s.dxn, 0, sizeof(float) * TD);
        float *dx1 = s.tmp2;
        if (c->block == BLOCK_PARALLEL) {
            memcpy(s.tmp, dx, sizeof(float) * TD);
            mlp_back(c, w, &s, dx, s.dxn, T, NI);
            memcpy(dx1, dx, sizeof(float) * TD);
        } else {
            const float *dmo = dx;
            if (c->block == BLOCK_SANDWICH_NORM) {
                memset(s.tmp, 0, sizeof(float) * TD);
                norm_back(c, s.tmp, s.mo, w->mlp_post_norm, dx, T);
                dmo = s.tmp;
            }
            memset(s.po, 0, sizeof(float) * TD);  // dxn2
            mlp_back(c, w, &s, dmo, s.po, T, NI);
            if ((rc = model_group_sum(m, s.po, TD, err))) break;
            memcpy(dx1, dx, sizeof(float) * TD);
            norm_back(c, dx1, s.x1, w->mlp_norm, s.po, T);
            if (c->block == BLOCK_SANDWICH_NORM) {
                memset(s.tmp, 0, sizeof(float) * TD);
                norm_back(c, s.tmp, o, w->attn_post_norm, dx1, T);
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
                        if (substituted(t, l, t->head0 + h, sq, B))
                            memset(s.dza + (size_t)(t->row[sq] + B) * Q + (size_t)h * hd, 0, sizeof(float) * hd);
        attention_back(t, c, l, t->q + (size_t)l * T * Q, s.dza, s.dq, s.dk, s.dv);
        ops->rope(s.dq, Q, pos, neg_inv_freq, T, H, hd, c->rotary_dim);
        ops->rope(s.dk, KV, pos, neg_inv_freq, T, sh.n_kv_heads, hd, c->rotary_dim);
        // A replicated KV head's dk, dv hold only this rank's query heads' part: the group sum adds the rest.
        linear_back(s.dxn, s.dq, w->wq, T, D, Q, 1);
        linear_back(s.dxn, s.dk, w->wk, T, D, KV, 1);
        linear_back(s.dxn, s.dv, w->wv, T, D, KV, 1);
        if ((rc = model_group_sum(m, s.dxn, TD, err))) break;  // the parallel block: attention and MLP at once
        memcpy(dx_in, dx1, sizeof(float) * TD);
        norm_back(c, dx_in, x, w->attn_norm, s.dxn, T);
        float *sw = dx;
        dx = dx_in, dx_in = sw;
    }
    scratch_free(&s);
    free(dx), free(dx_in), free(rows), free(pos), free(resid), free(attn), free(dlogits), free(neg_inv_freq);
    if (rc) grad_tape_free(t);
    return rc;
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

// dL/dz of the tape's head h at (l, s, B) as the attention saw it: NULL (zero) where a head unit replaced the
// output.
static const float *dz_seen(const grad_tape *t, int l, int h, int s, int B) {
    if (substituted(t, l, t->head0 + h, s, B)) return NULL;
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
    if (layer < 0 || layer >= t->n_layers || head < 0 || head >= t->model_heads || donor < 0 ||
        donor >= t->patch.n_donors || !t->patch.donors[donor] || (need_z && !t->patch.donors[donor]->z))
        return ep_fail(err, "scores: unit (layer %d, head %d, donor %d) is out of range or its donor is missing%s",
                       layer, head, donor, need_z ? " (or has no head outputs)" : "");
    return 0;
}

// A shard scored only the units on its heads (0 for the others): the group's sum gives every rank every
// unit's signed sums (exactly: one rank's value plus zeros), before the absolute value.
static int finish_scores(const grad_tape *t, double *signed_sum, int n, int S, double *score, double *per_seq,
                         ep_error *err) {
    if (t->group && group_sum_f64(t->group, signed_sum, (size_t)n * S, err)) return -1;
    for (int u = 0; u < n; u++) {
        score[u] = 0;
        for (int s = 0; s < S; s++) {
            score[u] += fabs(signed_sum[(size_t)u * S + s]) / S;
            if (per_seq) per_seq[(size_t)u * S + s] = signed_sum[(size_t)u * S + s];
        }
    }
    return 0;
}

int grad_head_scores(const grad_tape *t, const head_unit *units, int n, double *score, double *per_seq, ep_error *err) {
    int S = t->n_seqs, hd = t->head_dim;
    for (int u = 0; u < n; u++)
        if (check_donor(t, units[u].layer, units[u].head, units[u].donor, 1, err)) return -1;
    double *sum = ep_calloc((size_t)n * S + 1, sizeof(double));
    for (int u = 0; u < n; u++) {
        const head_unit *hu = &units[u];
        const kv_cache *dn = t->patch.donors[hu->donor];
        int h = hu->head - t->head0;  // the tape's head
        if (h < 0 || h >= t->n_heads) continue;
        for (int s = 0; s < S; s++) {
            const int32_t *ty = t->patch.types + (size_t)s * t->patch.type_stride;
            for (int B = 0; B < t->patch.n_typed[s] && B < t->len[s]; B++) {
                if (ty[B] != hu->type) continue;
                size_t off = (size_t)h * hd;
                const float *zc = kv_cache_z(&t->cache, hu->layer, s, B) + off, *zd = kv_cache_z(dn, hu->layer, s, B) + off;
                const float *g = grad_tape_dz(t, hu->layer, t->row[s] + B) + off;
                double acc = 0;
                for (int i = 0; i < hd; i++) acc += ((double)zc[i] - zd[i]) * g[i];
                sum[(size_t)u * S + s] += acc;
            }
        }
    }
    int rc = finish_scores(t, sum, n, S, score, per_seq, err);
    free(sum);
    return rc;
}

int grad_edge_scores(const grad_tape *t, const edge_unit *units, int n, double *score, double *per_seq, ep_error *err) {
    int S = t->n_seqs, hd = t->head_dim, rep = t->n_heads / t->n_kv_heads;
    for (int u = 0; u < n; u++)
        if (check_donor(t, units[u].layer, units[u].head, units[u].donor, 0, err)) return -1;
    double *sum = ep_calloc((size_t)n * S + 1, sizeof(double));
    for (int u = 0; u < n; u++) {
        const edge_unit *eu = &units[u];
        int l = eu->layer, h = eu->head - t->head0, g = h / rep;  // h: the tape's head
        if (h < 0 || h >= t->n_heads) continue;
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
    int rc = finish_scores(t, sum, n, S, score, per_seq, err);
    free(sum);
    return rc;
}

// Bytes as the allocators above are asked for them (ep_malloc and kernel_malloc take 1 for 0).
static size_t asked(size_t n) { return n ? n : 1; }
static size_t max_sz(size_t a, size_t b) { return a > b ? a : b; }

int backward_bytes(const model_config *c, const backward_shape *b, backward_memory *out, ep_error *err) {
    memset(out, 0, sizeof *out);
    if (b->n_seqs <= 0 || !b->len || !b->n_target) return ep_fail(err, "backward memory: no sequences");
    if (b->n_threads < 1 || b->n_donors < 0 || b->n_donors > 16 || b->donor_capacity < 0)
        return ep_fail(err, "backward memory: %d threads, %d donors of %d positions", b->n_threads, b->n_donors,
                       b->donor_capacity);
    grad_batch gb = {.n_seqs = b->n_seqs, .len = b->len, .n_target = b->n_target};
    if (check_batch(&gb, err)) return -1;
    tp_shard sh = model_config_local(c);
    size_t S = (size_t)b->n_seqs, L = (size_t)c->n_layers, D = (size_t)c->hidden, V = (size_t)c->vocab_size,
           hd = (size_t)c->head_dim, H = (size_t)sh.n_heads, Q = H * hd, KV = (size_t)sh.n_kv_heads * hd,
           NI = (size_t)sh.n_inter, f = sizeof(float);
    size_t T = 0, R = 0, max_len = 0, att = 0;
    for (int s = 0; s < b->n_seqs; s++) {
        size_t n = (size_t)b->len[s];
        T += n, R += (size_t)b->n_target[s], att += H * n * n;
        max_len = n > max_len ? n : max_len;
    }
    size_t nn = max_len * max_len;

    // The tape: model_backward's t->len, row, att_off, seq_loss; q; dz, p, dlogit, sel; forward_loss's cache
    // (k, v, z of every layer for max_len positions, and its lengths).
    out->tape_meta = S * sizeof(int) * 2 + S * sizeof(size_t) + S * sizeof(double);
    out->tape_q = f * L * T * Q;
    out->tape_dz = f * L * T * Q;
    out->tape_att = 2 * f * L * att;
    out->tape_sel = asked(L * att);
    out->tape_cache = f * L * S * max_len * (2 * KV + Q) + S * sizeof(int);
    out->tape = out->tape_meta + out->tape_q + out->tape_dz + out->tape_att + out->tape_sel + out->tape_cache;

    // model_backward's rows, pos, neg_inv_freq; resid, attn, dlogits.
    out->pass_meta = R * sizeof(int) + T * sizeof(int) + asked(f * (size_t)(c->rotary_dim / 2));
    out->resid = f * (L + 1) * T * D;
    out->attn_out = f * L * T * D;
    out->dlogits = f * R * V;

    // Inside forward_loss: the logits rows, model_forward's step buffers (hidden-wide rows: max(T, R) = T),
    // its host positions and sequences; during the layers a later shard's copy of the rules with, one at
    // a time, the vocabulary-parallel embedding's ids and the cpu attention's per-thread blocks (scores of
    // the current keys and of every donor, and the selection, when patched); after them project_logits'
    // gather buffers of a vocabulary-parallel shard.
    size_t slots = S * H < (size_t)b->n_threads ? S * H : (size_t)b->n_threads;
    size_t nd = b->edge_rules ? (size_t)b->n_donors : 0;
    size_t kernel = slots ? f * nn * (1 + nd) * slots + (b->edge_rules ? nn * slots : 0) : 0;
    int vocab_parallel = sh.n_vocab < c->vocab_size;
    size_t gather = vocab_parallel ? asked(f * R * (size_t)sh.n_vocab) + 2 * f * R * V : 0;
    size_t ids = vocab_parallel ? asked(sizeof(int) * T) : 0;
    size_t step = f * T * (D * 4 + Q * 2 + KV * 2 + NI * 2) + sizeof(int) * T * 3 + sizeof(attn_seq) * S;
    size_t rules = b->edge_rules && sh.head0 > 0 ? sizeof(edge_rule_set) : 0;
    out->forward = f * R * V + step + max_sz(rules + max_sz(ids, kernel), gather);

    // The layer walk: scratch_init's buffers, dx and dx_in; at the lm_head xr, dxn, dxr; per layer
    // attention_back's g, and, when the layer reads donors, msk and one pair of blocks per donor.
    out->scratch = f * T * (D * 7 + Q * 2 + KV * 2 + NI * 5) + 2 * f * T * D;
    out->head = 3 * f * R * D;
    out->attention = f * nn + (b->edge_rules ? f * nn + asked(f * nn * 2 * (size_t)b->n_donors) : 0);

    size_t pass = out->pass_meta + out->resid + out->attn_out + out->dlogits;
    size_t during_forward = out->tape_meta + out->tape_q + out->tape_cache + pass + out->forward;
    size_t during_walk = out->tape + pass + out->scratch + max_sz(out->head, out->attention);
    out->peak = max_sz(during_forward, during_walk);
    size_t per_layer_att = 2 * f * att + att;
    out->per_layer = 2 * f * T * Q + per_layer_att + f * S * max_len * (2 * KV + Q) + 2 * f * T * D;
    // patch_donor_passes' caches: K, V and z for donor_capacity positions, and their lengths.
    out->donors = (size_t)b->n_donors * (f * L * S * (size_t)b->donor_capacity * (2 * KV + Q) + S * sizeof(int));
    return 0;
}
