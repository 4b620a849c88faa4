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

// Key or value row of sender j for query head h's edge into position i: a donor's or the current one.
static const float *kv_row(const float *cur, const float *const *donor, const attn_seq *sq, const attn_params *p,
                           const edge_rule_set *rules, int h, int i, int j) {
    int g = h / (p->n_heads / p->n_kv_heads), d = -1;
    if (rules && sq->types && i < sq->n_typed && j < sq->n_typed)
        d = edge_donor(rules, h, sq->types[j], sq->index[j], sq->types[i], sq->index[i]);
    if (d >= 0) return donor[d] + (size_t)(sq->donor_row + j) * p->kv_stride + (size_t)g * p->head_dim;
    return cur + (size_t)(sq->kv_row + j) * p->kv_stride + (size_t)g * p->head_dim;
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
                const float *qv = q + (size_t)(sq->q_row + qi) * p->q_stride + (size_t)h * d;
                double mx = -INFINITY;
                for (int j = 0; j <= i; j++) {
                    if (p->window > 0 && i - j >= p->window) {
                        score[j] = -INFINITY;
                        continue;
                    }
                    const float *kv = kv_row(k, donor_k, sq, p, rules, h, i, j);
                    double dot = 0;
                    for (int e = 0; e < d; e++) dot += (double)qv[e] * kv[e];
                    dot *= p->scale;
                    if (p->softcap > 0) dot = p->softcap * tanh(dot / p->softcap);
                    score[j] = dot;
                    if (dot > mx) mx = dot;
                }
                double sum = 0;
                for (int j = 0; j <= i; j++) {
                    score[j] = score[j] == -INFINITY ? 0 : exp(score[j] - mx);
                    sum += score[j];
                }
                float *o = out + (size_t)(sq->q_row + qi) * p->q_stride + (size_t)h * d;
                for (int e = 0; e < d; e++) {
                    double acc = 0;
                    for (int j = 0; j <= i; j++)
                        if (score[j] != 0) acc += score[j] * kv_row(v, donor_v, sq, p, rules, h, i, j)[e];
                    o[e] = (float)(acc / sum);
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
    .host_memory = 1,
};

const kernel_ops *kernel_ops_ref(void) { return &ref_table; }
