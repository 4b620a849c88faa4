// ops_ref: the reference backend. Plain loops written for clarity, accumulating in double, used only
// by the tests as the yardstick for the cpu and cuda backends.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/bf16.h"
#include "kernels/ops.h"
#include "kernels/ops_common.h"
#include "kernels/alloc.h"

static void *host_alloc(size_t bytes) { return kernel_malloc(bytes); }
static void host_release(void *p) { free(p); }
static void host_copy(void *dst, const void *src, size_t bytes) { memcpy(dst, src, bytes); }
static void host_sync(void) {}

static void ref_matmul(float *out, const float *x, const float *w, const float *bias, int rows, int n_in, int n_out) {
    for (int r = 0; r < rows; r++)
        for (int o = 0; o < n_out; o++) {
            double s = bias ? bias[o] : 0.0;
            for (int i = 0; i < n_in; i++) s += (double)x[(size_t)r * n_in + i] * w[(size_t)o * n_in + i];
            out[(size_t)r * n_out + o] = (float)s;
        }
}

static void ref_matmul_bf16(float *out, const float *x, const uint16_t *w, const float *bias, int rows, int n_in,
                            int n_out) {
    for (int r = 0; r < rows; r++)
        for (int o = 0; o < n_out; o++) {
            double s = bias ? bias[o] : 0.0;
            for (int i = 0; i < n_in; i++)
                s += (double)bf16_round(x[(size_t)r * n_in + i]) * bf16_to_f32(w[(size_t)o * n_in + i]);
            out[(size_t)r * n_out + o] = (float)s;
        }
}

static void ref_rmsnorm(float *out, const float *x, const float *w, float w_offset, int rows, int dim, float eps) {
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * dim;
        double ss = 0;
        for (int i = 0; i < dim; i++) ss += (double)xr[i] * xr[i];
        double inv = 1.0 / sqrt(ss / dim + eps);
        for (int i = 0; i < dim; i++) out[(size_t)r * dim + i] = (float)(xr[i] * inv * (w_offset + w[i]));
    }
}

static void ref_layernorm(float *out, const float *x, const float *w, const float *b, int rows, int dim, float eps) {
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * dim;
        double mean = 0, var = 0;
        for (int i = 0; i < dim; i++) mean += xr[i];
        mean /= dim;
        for (int i = 0; i < dim; i++) var += (xr[i] - mean) * (xr[i] - mean);
        var /= dim;
        double inv = 1.0 / sqrt(var + eps);
        for (int i = 0; i < dim; i++) out[(size_t)r * dim + i] = (float)((xr[i] - mean) * inv * w[i] + b[i]);
    }
}

static void ref_rope(float *x, int stride, const int *pos, const float *inv_freq, int rows, int n_heads, int head_dim,
                     int rot_dim) {
    int half = rot_dim / 2;
    for (int r = 0; r < rows; r++)
        for (int h = 0; h < n_heads; h++) {
            float *xh = x + (size_t)r * stride + (size_t)h * head_dim;
            for (int i = 0; i < half; i++) {
                float angle = (float)pos[r] * inv_freq[i];
                double c = cos(angle), s = sin(angle);
                double a = xh[i], b = xh[i + half];
                xh[i] = (float)(a * c - b * s);
                xh[i + half] = (float)(b * c + a * s);
            }
        }
}

static void ref_glu(float *out, const float *gate, const float *up, size_t n, act_kind act) {
    for (size_t i = 0; i < n; i++) out[i] = act_f(gate[i], act) * up[i];
}

static void ref_act(float *x, size_t n, act_kind act) {
    for (size_t i = 0; i < n; i++) x[i] = act_f(x[i], act);
}

static void ref_softcap(float *x, size_t n, float cap) {
    for (size_t i = 0; i < n; i++) x[i] = (float)(cap * tanh((double)x[i] / cap));
}

static void ref_add(float *y, const float *x, size_t n) {
    for (size_t i = 0; i < n; i++) y[i] += x[i];
}

static void ref_scale(float *y, size_t n, float s) {
    for (size_t i = 0; i < n; i++) y[i] *= s;
}

// The edge code (kernels/edge_rule.h) of sender j -> receiver i of query head h (EDGE_CLEAN: untyped).
static int ref_source(const attn_seq *sq, const edge_rule_set *rules, int h, int i, int j) {
    if (rules && sq->types && i < sq->n_typed && j < sq->n_typed)
        return edge_lookup(rules, h, sq->types[j], sq->index[j], sq->types[i], sq->index[i]);
    return EDGE_CLEAN;
}

// Key (value 0) or value (value 1) row of sender j for query head h's edge into position i: a donor's
// or the current one, as the edge's rule says for that half.
static const float *kv_row(const float *cur, const float *const *donor, const attn_seq *sq, const attn_params *p,
                           const edge_rule_set *rules, int h, int i, int j, int value) {
    int g = h / (p->n_heads / p->n_kv_heads), code = ref_source(sq, rules, h, i, j);
    int d = value ? edge_value_donor(code) : edge_key_donor(code);
    if (d >= 0) return donor[d] + (size_t)(sq->donor_row + j) * p->kv_stride + (size_t)g * p->head_dim;
    return cur + (size_t)(sq->kv_row + j) * p->kv_stride + (size_t)g * p->head_dim;
}

// The scores of one query row and head (double), as attention and its statistics use them, into score[0 .. i]
// (-inf outside the window and for removed edges); returns their max (-inf: every edge removed).
static double ref_row_scores(double *score, const float *q, const float *k, const float *const *donor_k,
                             const attn_seq *sq, const attn_params *p, const edge_rule_set *rules, int qi, int h) {
    int d = p->head_dim, i = sq->q_pos + qi;
    const float *qv = q + (size_t)(sq->q_row + qi) * p->q_stride + (size_t)h * d;
    double mx = -INFINITY;
    for (int j = 0; j <= i; j++) {
        if ((p->window > 0 && i - j >= p->window) || ref_source(sq, rules, h, i, j) == EDGE_REMOVED) {
            score[j] = -INFINITY;
            continue;
        }
        const float *kv = kv_row(k, donor_k, sq, p, rules, h, i, j, 0);
        double dot = 0;
        for (int e = 0; e < d; e++) dot += (double)qv[e] * kv[e];
        dot *= p->scale;
        if (p->softcap > 0) dot = p->softcap * tanh(dot / p->softcap);
        score[j] = dot;
        if (dot > mx) mx = dot;
    }
    return mx;
}

static void ref_patched_attention(float *out, const float *q, const float *k, const float *v, int n_donors,
                                  const float *const *donor_k, const float *const *donor_v, const attn_seq *seqs,
                                  int n_seqs, const attn_params *p, const edge_rule_set *rules) {
    int d = p->head_dim;
    for (int s = 0; s < n_seqs; s++) {
        const attn_seq *sq = &seqs[s];
        int n_keys = sq->q_pos + sq->n_q;
        double *score = kernel_malloc(sizeof(double) * (size_t)n_keys);
        for (int qi = 0; qi < sq->n_q; qi++) {
            int i = sq->q_pos + qi;
            for (int h = 0; h < p->n_heads; h++) {
                double mx = ref_row_scores(score, q, k, donor_k, sq, p, rules, qi, h);
                double sum = 0;
                for (int j = 0; j <= i; j++) {
                    score[j] = score[j] == -INFINITY ? 0 : exp(score[j] - mx);
                    sum += score[j];
                }
                float *o = out + (size_t)(sq->q_row + qi) * p->q_stride + (size_t)h * d;
                for (int e = 0; e < d; e++) {
                    double acc = 0;
                    for (int j = 0; j <= i; j++)
                        if (score[j] != 0) acc += score[j] * kv_row(v, donor_v, sq, p, rules, h, i, j, 1)[e];
                    o[e] = sum > 0 ? (float)(acc / sum) : 0.0f;  // every edge removed: 0
                }
            }
        }
        free(score);
    }
    (void)n_donors;
}

static void ref_attention(float *out, const float *q, const float *k, const float *v, const attn_seq *seqs, int n_seqs,
                          const attn_params *p) {
    ref_patched_attention(out, q, k, v, 0, NULL, NULL, seqs, n_seqs, p, NULL);
}

static void ref_copy_rows(float *dst, int dst_stride, const float *src, int src_stride, int rows, int row_len) {
    for (int r = 0; r < rows; r++)
        memcpy(dst + (size_t)r * dst_stride, src + (size_t)r * src_stride, sizeof(float) * (size_t)row_len);
}

static void ref_gather_rows(float *dst, const float *src, const int *idx, int n, int row_len) {
    for (int i = 0; i < n; i++)
        if (idx[i] < 0)
            memset(dst + (size_t)i * row_len, 0, sizeof(float) * (size_t)row_len);
        else
            memcpy(dst + (size_t)i * row_len, src + (size_t)idx[i] * row_len, sizeof(float) * (size_t)row_len);
}

// ---- Gradient ops: the formulas of kernels/ops.h in double, one element at a time.

static void ref_linear_back(float *dx, const float *dy, const float *w, int rows, int n_in, int n_out, int accumulate) {
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < n_in; i++) {
            double s = accumulate ? dx[(size_t)r * n_in + i] : 0.0;
            for (int o = 0; o < n_out; o++) s += (double)dy[(size_t)r * n_out + o] * w[(size_t)o * n_in + i];
            dx[(size_t)r * n_in + i] = (float)s;
        }
}

static void ref_linear_back_bf16(float *dx, const float *dy, const uint16_t *w, int rows, int n_in, int n_out,
                                 int accumulate) {
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < n_in; i++) {
            double s = accumulate ? dx[(size_t)r * n_in + i] : 0.0;
            for (int o = 0; o < n_out; o++) s += (double)dy[(size_t)r * n_out + o] * bf16_to_f32(w[(size_t)o * n_in + i]);
            dx[(size_t)r * n_in + i] = (float)s;
        }
}

static void ref_rmsnorm_back(float *dx, const float *x, const float *w, float w_offset, const float *dy, int rows,
                             int dim, float eps, int accumulate) {
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * dim, *gr = dy + (size_t)r * dim;
        float *o = dx + (size_t)r * dim;
        double ss = 0, gx = 0;
        for (int i = 0; i < dim; i++) {
            ss += (double)xr[i] * xr[i];
            gx += (double)gr[i] * ((double)w_offset + w[i]) * xr[i];
        }
        double inv = 1.0 / sqrt(ss / dim + eps);
        for (int i = 0; i < dim; i++) {
            double v = inv * gr[i] * ((double)w_offset + w[i]) - (double)xr[i] * inv * inv * inv * gx / dim;
            o[i] = (float)(accumulate ? o[i] + v : v);
        }
    }
}

static void ref_layernorm_back(float *dx, const float *x, const float *w, const float *dy, int rows, int dim,
                               float eps, int accumulate) {
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * dim, *gr = dy + (size_t)r * dim;
        float *o = dx + (size_t)r * dim;
        double mean = 0, var = 0;
        for (int i = 0; i < dim; i++) mean += xr[i];
        mean /= dim;
        for (int i = 0; i < dim; i++) var += (xr[i] - mean) * (xr[i] - mean);
        var /= dim;
        double inv = 1.0 / sqrt(var + eps), mg = 0, mgx = 0;
        for (int i = 0; i < dim; i++) {
            double g = (double)gr[i] * w[i];
            mg += g, mgx += g * (xr[i] - mean) * inv;
        }
        mg /= dim, mgx /= dim;
        for (int i = 0; i < dim; i++) {
            double v = inv * ((double)gr[i] * w[i] - mg - (xr[i] - mean) * inv * mgx);
            o[i] = (float)(accumulate ? o[i] + v : v);
        }
    }
}

static void ref_rope_back(float *x, int stride, const int *pos, const float *inv_freq, int rows, int n_heads,
                          int head_dim, int rot_dim) {
    int half = rot_dim / 2;
    for (int r = 0; r < rows; r++)
        for (int h = 0; h < n_heads; h++) {
            float *xh = x + (size_t)r * stride + (size_t)h * head_dim;
            for (int i = 0; i < half; i++) {
                float angle = (float)pos[r] * inv_freq[i];
                double c = cos(angle), s = sin(angle);
                double a = xh[i], b = xh[i + half];
                xh[i] = (float)(a * c + b * s);
                xh[i + half] = (float)(b * c - a * s);
            }
        }
}

// act and act' in double, the same formulas as act_f.
static double ref_act_d(double x, act_kind act, double *grad) {
    if (act == ACT_SILU) {
        double s = 1.0 / (1.0 + exp(-x));
        *grad = s * (1.0 + x * (1.0 - s));
        return x * s;
    }
    const double c = 0.7978845608028654, k = 0.044715;
    double t = tanh(c * (x + k * x * x * x));
    *grad = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * k * x * x);
    return 0.5 * x * (1.0 + t);
}

static void ref_act_back(float *dx, const float *x, const float *dy, size_t n, act_kind act) {
    for (size_t i = 0; i < n; i++) {
        double g;
        ref_act_d(x[i], act, &g);
        dx[i] = (float)(dy[i] * g);
    }
}

static void ref_glu_back(float *dgate, float *dup, const float *gate, const float *up, const float *dout, size_t n,
                         act_kind act) {
    for (size_t i = 0; i < n; i++) {
        double g, a = ref_act_d(gate[i], act, &g), u = up[i], d = dout[i];
        dgate[i] = (float)(d * u * g);
        dup[i] = (float)(d * a);
    }
}

static void ref_softcap_back(float *dx, const float *y, const float *dy, size_t n, float cap) {
    for (size_t i = 0; i < n; i++) {
        double t = (double)y[i] / cap;
        dx[i] = (float)(dy[i] * (1.0 - t * t));
    }
}

// One (sequence, head) of the attention backward in double: for query row qi and key position j
// (n_k = q_pos + n_q keys), pr = p_ij, dl = dlogit_ij (both 0 where i cannot see j) and src = the source
// the edge's code (EDGE_CLEAN where i cannot see j), each [n_q][n_k]; gg (NULL: not wanted) gets
// g_ij = dout_i . v*_j and gsum (NULL: not wanted, [n_q]) sum_j p_ij g_ij. A removed edge is a key i
// does not see; a row whose every edge is removed has p = dlogit = 0.
static void ref_attn_grad_block(const float *q, const float *k, const float *v, const float *dout,
                                const float *const *donor_k, const float *const *donor_v, const attn_seq *sq, int h,
                                const attn_params *p, const edge_rule_set *rules, double *pr, double *dl, int *src,
                                double *gg, double *gsum_out) {
    int d = p->head_dim, n_k = sq->q_pos + sq->n_q;
    double *g = kernel_malloc(sizeof(double) * (size_t)(n_k > 0 ? n_k : 1));
    for (int qi = 0; qi < sq->n_q; qi++) {
        int i = sq->q_pos + qi;
        double *pi = pr + (size_t)qi * n_k, *di = dl + (size_t)qi * n_k;
        int *si = src + (size_t)qi * n_k;
        const float *qv = q + (size_t)(sq->q_row + qi) * p->q_stride + (size_t)h * d;
        const float *dv = dout + (size_t)(sq->q_row + qi) * p->q_stride + (size_t)h * d;
        double mx = -INFINITY;
        for (int j = 0; j < n_k; j++) {
            pi[j] = di[j] = 0, si[j] = EDGE_CLEAN, g[j] = 0;
            if (j > i || (p->window > 0 && i - j >= p->window)) continue;
            si[j] = ref_source(sq, rules, h, i, j);
            if (si[j] == EDGE_REMOVED) continue;
            const float *kv = kv_row(k, donor_k, sq, p, rules, h, i, j, 0), *vv = kv_row(v, donor_v, sq, p, rules, h, i, j, 1);
            double dot = 0, gd = 0;
            for (int e = 0; e < d; e++) dot += (double)qv[e] * kv[e], gd += (double)dv[e] * vv[e];
            dot *= p->scale;
            if (p->softcap > 0) dot = p->softcap * tanh(dot / p->softcap);
            pi[j] = dot, g[j] = gd;  // pi holds the score until the softmax
            if (dot > mx) mx = dot;
        }
        int j0 = p->window > 0 && i - p->window + 1 > 0 ? i - p->window + 1 : 0;
        double sum = 0, gsum = 0;
        for (int j = j0; j <= i; j++)
            if (si[j] != EDGE_REMOVED) sum += exp(pi[j] - mx);
        for (int j = j0; j <= i; j++) {
            if (si[j] == EDGE_REMOVED) continue;
            double s = pi[j];
            pi[j] = exp(s - mx) / sum;
            gsum += pi[j] * g[j];
            di[j] = p->softcap > 0 ? 1.0 - (s / p->softcap) * (s / p->softcap) : 1.0;  // softcap' for now
        }
        for (int j = j0; j <= i; j++) di[j] *= pi[j] * (g[j] - gsum) * p->scale;
        if (gg)
            for (int j = 0; j < n_k; j++) gg[(size_t)qi * n_k + j] = g[j];
        if (gsum_out) gsum_out[qi] = gsum;
    }
    free(g);
}

static void ref_attention_back(float *dq, float *dk, float *dv, const float *q, const float *k, const float *v,
                               const float *dout, int n_donors, const float *const *donor_k,
                               const float *const *donor_v, float *const *donor_dk, float *const *donor_dv,
                               const attn_seq *seqs, int n_seqs, const attn_params *p, const edge_rule_set *rules) {
    int d = p->head_dim, kvd = p->n_kv_heads * d, rep = p->n_heads / p->n_kv_heads;
    for (int s = 0; s < n_seqs; s++) {
        const attn_seq *sq = &seqs[s];
        int n_q = sq->n_q, n_k = sq->q_pos + n_q;
        if (n_q <= 0) continue;
        size_t blk = (size_t)n_q * n_k, acc_n = (size_t)n_k * kvd;
        double *pr = kernel_malloc(sizeof(double) * blk), *dl = kernel_malloc(sizeof(double) * blk);
        int *src = kernel_malloc(sizeof(int) * blk);
        // Per source (current, then each donor): the sequence's key and value gradients, [n_k][kvd].
        double *ak = kernel_calloc((size_t)(1 + n_donors) * acc_n, sizeof(double));
        double *av = kernel_calloc((size_t)(1 + n_donors) * acc_n, sizeof(double));
        for (int h = 0; h < p->n_heads; h++) {
            int g = h / rep;
            ref_attn_grad_block(q, k, v, dout, donor_k, donor_v, sq, h, p, rules, pr, dl, src, NULL, NULL);
            for (int qi = 0; qi < n_q; qi++) {
                int i = sq->q_pos + qi;
                const float *qv = q + (size_t)(sq->q_row + qi) * p->q_stride + (size_t)h * d;
                const float *dov = dout + (size_t)(sq->q_row + qi) * p->q_stride + (size_t)h * d;
                float *dqv = dq + (size_t)(sq->q_row + qi) * p->q_stride + (size_t)h * d;
                for (int e = 0; e < d; e++) {
                    double a = 0;
                    for (int j = 0; j <= i; j++)
                        if (dl[(size_t)qi * n_k + j] != 0) a += dl[(size_t)qi * n_k + j] * kv_row(k, donor_k, sq, p, rules, h, i, j, 0)[e];
                    dqv[e] = (float)a;
                }
                for (int j = 0; j <= i; j++) {
                    size_t at = (size_t)qi * n_k + j, col = (size_t)j * kvd + (size_t)g * d;
                    size_t rk = (size_t)(1 + edge_key_donor(src[at])) * acc_n + col, rv = (size_t)(1 + edge_value_donor(src[at])) * acc_n + col;
                    for (int e = 0; e < d; e++) {
                        ak[rk + e] += dl[at] * qv[e];
                        av[rv + e] += pr[at] * dov[e];
                    }
                }
            }
        }
        for (int sr = -1; sr < n_donors; sr++) {
            float *tk = sr < 0 ? dk : donor_dk ? donor_dk[sr] : NULL, *tv = sr < 0 ? dv : donor_dv ? donor_dv[sr] : NULL;
            int row0 = sr < 0 ? sq->kv_row : sq->donor_row, n_rows = sr < 0 ? n_k : sq->n_typed < n_k ? sq->n_typed : n_k;
            const double *a_k = ak + (size_t)(1 + sr) * acc_n, *a_v = av + (size_t)(1 + sr) * acc_n;
            for (int j = 0; j < n_rows; j++)
                for (int c = 0; c < kvd; c++) {
                    if (tk) tk[(size_t)(row0 + j) * p->kv_stride + c] += (float)a_k[(size_t)j * kvd + c];
                    if (tv) tv[(size_t)(row0 + j) * p->kv_stride + c] += (float)a_v[(size_t)j * kvd + c];
                }
        }
        free(pr), free(dl), free(src), free(ak), free(av);
    }
}

void ops_host_head_scores(double *score, const float *z, const float *const *donor_z, const float *dz,
                          const attn_seq *seqs, int n_seqs, const attn_params *p, const head_score_unit *units,
                          int n_units) {
    int d = p->head_dim;
    for (int u = 0; u < n_units; u++)
        for (int s = 0; s < n_seqs; s++) {
            const attn_seq *sq = &seqs[s];
            double acc = 0;
            for (int r = 0; r < sq->n_q; r++) {
                int B = sq->q_pos + r;
                if (!sq->types || B >= sq->n_typed || sq->types[B] != units[u].type) continue;
                size_t at = (size_t)(sq->q_row + r) * p->q_stride + (size_t)units[u].head * d;
                const float *zd = donor_z[units[u].donor] + (size_t)(sq->donor_row + B) * p->q_stride + (size_t)units[u].head * d;
                for (int e = 0; e < d; e++) acc += ((double)z[at + e] - zd[e]) * dz[at + e];
            }
            score[(size_t)u * n_seqs + s] = acc;
        }
}

void ops_host_kl_div_rows(float *out, const float *pl, const float *ql, int rows, int n) {
    for (int r = 0; r < rows; r++) {
        const float *x = pl + (size_t)r * n, *y = ql + (size_t)r * n;
        double mx = -INFINITY, my = -INFINITY, sx = 0, sy = 0, kl = 0;
        for (int i = 0; i < n; i++) {
            if (x[i] > mx) mx = x[i];
            if (y[i] > my) my = y[i];
        }
        for (int i = 0; i < n; i++) sx += exp((double)x[i] - mx), sy += exp((double)y[i] - my);
        double lx = mx + log(sx), ly = my + log(sy);
        for (int i = 0; i < n; i++) {
            double lp = (double)x[i] - lx, lq = (double)y[i] - ly;
            kl += exp(lp) * (lp - lq);
        }
        out[r] = (float)kl;
    }
}

void ops_host_logit_metrics(logit_row_metrics *out, const float *logits, const int *target, const int *other, int rows,
                            int n) {
    for (int r = 0; r < rows; r++) {
        const float *x = logits + (size_t)r * n;
        int t = target[r], given = other && other[r] >= 0;
        int best = 0, best_other = t == 0 ? 1 : 0;
        for (int i = 1; i < n; i++)
            if (x[i] > x[best]) best = i;
        for (int i = 0; i < n; i++)
            if (i != t && x[i] > x[best_other]) best_other = i;
        double mx = x[best], sum = 0;
        for (int i = 0; i < n; i++) sum += exp((double)x[i] - mx);
        int o = given ? other[r] : best_other;
        out[r] = (logit_row_metrics){.argmax = best, .other = o, .target_logprob = (float)((double)x[t] - mx - log(sum)),
                                     .logit_diff = x[t] - x[o], .log_sum_exp = (float)(mx + log(sum))};
    }
}

void ops_host_attention_row_stats(float *entropy, float *mass, int n_types, const float *q, const float *k,
                                  int n_donors, const float *const *donor_k, const attn_seq *seqs, int n_seqs,
                                  const attn_params *p, const edge_rule_set *rules) {
    size_t r = 0;
    for (int s = 0; s < n_seqs; s++) {
        const attn_seq *sq = &seqs[s];
        if (sq->n_q <= 0) continue;
        double *score = kernel_malloc(sizeof(double) * (size_t)(sq->q_pos + sq->n_q));
        for (int qi = 0; qi < sq->n_q; qi++, r++) {
            int i = sq->q_pos + qi;
            for (int h = 0; h < p->n_heads; h++) {
                double mx = ref_row_scores(score, q, k, donor_k, sq, p, rules, qi, h), z = 0, zs = 0;
                double m[OPS_MAX_STAT_TYPES] = {0};
                for (int j = 0; j <= i; j++) {
                    if (score[j] == -INFINITY) continue;
                    double e = exp(score[j] - mx);
                    z += e, zs += e * (score[j] - mx);
                    int t = sq->types && j < sq->n_typed ? sq->types[j] : -1;
                    if (t >= 0 && t < n_types && t < OPS_MAX_STAT_TYPES) m[t] += e;
                }
                // every edge removed (z = 0): entropy 0 and no mass, as the row's output is 0
                entropy[r * (size_t)p->n_heads + h] = z > 0 ? (float)(log(z) - zs / z) : 0.0f;
                for (int t = 0; t < n_types; t++)
                    mass[(r * (size_t)p->n_heads + h) * n_types + t] = t < OPS_MAX_STAT_TYPES && z > 0 ? (float)(m[t] / z) : 0.0f;
            }
        }
        free(score);
    }
    (void)n_donors;
}

static void ref_edge_scores(double *score, const float *q, const float *k, const float *v, const float *k_base,
                            const float *v_base, const float *dout,
                            int n_donors, const float *const *donor_k, const float *const *donor_v,
                            const attn_seq *seqs, int n_seqs, const attn_params *p, const edge_rule_set *rules,
                            const edge_score_unit *units, int n_units) {
    int d = p->head_dim, rep = p->n_heads / p->n_kv_heads;
    for (int s = 0; s < n_seqs; s++) {
        const attn_seq *sq = &seqs[s];
        int n_q = sq->n_q, n_k = sq->q_pos + n_q;
        for (int u = 0; u < n_units; u++) score[(size_t)u * n_seqs + s] = 0;
        if (n_q <= 0 || !sq->types) continue;
        size_t blk = (size_t)n_q * n_k;
        double *pr = kernel_malloc(sizeof(double) * blk), *dl = kernel_malloc(sizeof(double) * blk);
        double *gg = kernel_malloc(sizeof(double) * blk), *gsum = kernel_malloc(sizeof(double) * (size_t)n_q);
        int *src = kernel_malloc(sizeof(int) * blk);
        for (int u = 0; u < n_units; u++) {
            const edge_score_unit *eu = &units[u];
            int h = eu->head, g = h / rep;
            ref_attn_grad_block(q, k, v, dout, donor_k, donor_v, sq, h, p, rules, pr, dl, src, gg, gsum);
            double acc = 0;
            for (int qi = 0; qi < n_q; qi++) {
                int B = sq->q_pos + qi;
                if (B >= sq->n_typed || sq->types[B] != eu->receiver) continue;
                const float *qv = q + (size_t)(sq->q_row + qi) * p->q_stride + (size_t)h * d;
                const float *dov = dout + (size_t)(sq->q_row + qi) * p->q_stride + (size_t)h * d;
                for (int A = 0; A <= B; A++) {
                    size_t at = (size_t)qi * n_k + A;
                    if (sq->types[A] != eu->sender || (pr[at] == 0 && dl[at] == 0)) continue;
                    if (eu->source == EDGE_SRC_ZERO) {  // no difference to take: the weight's path (ops.h)
                        acc += pr[at] * (gsum[qi] - gg[at]);
                        continue;
                    }
                    // the differences: from the base where the edge reads the current pass
                    const float *ks = kv_row(k_base ? k_base : k, donor_k, sq, p, rules, h, B, A, 0),
                                *vs = kv_row(v_base ? v_base : v, donor_v, sq, p, rules, h, B, A, 1);
                    size_t drow = (size_t)(sq->donor_row + A) * p->kv_stride + (size_t)g * d;
                    const float *kd = donor_k[eu->donor] + drow, *vd = donor_v[eu->donor] + drow;
                    double ek = 0, ev = 0;
                    for (int e = 0; e < d; e++) {
                        ek += (double)qv[e] * ((double)kd[e] - ks[e]);
                        ev += (double)dov[e] * ((double)vd[e] - vs[e]);
                    }
                    acc += (eu->source == EDGE_SRC_V ? 0 : dl[at] * ek) + (eu->source == EDGE_SRC_K ? 0 : pr[at] * ev);
                }
            }
            score[(size_t)u * n_seqs + s] = acc;
        }
        free(pr), free(dl), free(src), free(gg), free(gsum);
    }
    (void)n_donors;
}

static const kernel_ops ref_table = {
    .name = "ref",
    .alloc = host_alloc,
    .release = host_release,
    .upload = host_copy,
    .download = host_copy,
    .sync = host_sync,
    .matmul = ref_matmul,
    .matmul_bf16 = ref_matmul_bf16,
    .rmsnorm = ref_rmsnorm,
    .layernorm = ref_layernorm,
    .rope = ref_rope,
    .glu = ref_glu,
    .act = ref_act,
    .softcap = ref_softcap,
    .add = ref_add,
    .scale = ref_scale,
    .attention = ref_attention,
    .patched_attention = ref_patched_attention,
    .copy_rows = ref_copy_rows,
    .gather_rows = ref_gather_rows,
    .linear_back = ref_linear_back,
    .linear_back_bf16 = ref_linear_back_bf16,
    .rmsnorm_back = ref_rmsnorm_back,
    .layernorm_back = ref_layernorm_back,
    .rope_back = ref_rope_back,
    .act_back = ref_act_back,
    .glu_back = ref_glu_back,
    .softcap_back = ref_softcap_back,
    .attention_back = ref_attention_back,
    .head_scores = ops_host_head_scores,
    .edge_scores = ref_edge_scores,
    .kl_div_rows = ops_host_kl_div_rows,
    .attention_row_stats = ops_host_attention_row_stats,
    .logit_metrics = ops_host_logit_metrics,
    .host_memory = 1,
};

const kernel_ops *kernel_ops_ref(void) { return &ref_table; }
