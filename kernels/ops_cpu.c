// ops_cpu: the fast host backend. Matrix products through CBLAS (OpenBLAS); everything else in float
// loops the compiler vectorizes, spread over rows with OpenMP where it is available.
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"
#include "kernels/ops_common.h"
#include "pipeline/error.h"

static void *host_alloc(size_t bytes) { return ep_malloc(bytes); }
static void host_release(void *p) { free(p); }
static void host_copy(void *dst, const void *src, size_t bytes) { memcpy(dst, src, bytes); }
static void host_sync(void) {}

static void cpu_matmul(float *out, const float *x, const float *w, const float *bias, int rows, int n_in, int n_out) {
    if (bias) {
        for (int r = 0; r < rows; r++) memcpy(out + (size_t)r * n_out, bias, sizeof(float) * (size_t)n_out);
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, n_out, n_in, 1.0f, x, n_in, w, n_in, bias ? 1.0f : 0.0f,
                out, n_out);
}

static void cpu_rmsnorm(float *out, const float *x, const float *w, float w_offset, int rows, int dim, float eps) {
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * dim;
        float *o = out + (size_t)r * dim;
        float ss = 0;
        for (int i = 0; i < dim; i++) ss += xr[i] * xr[i];
        float inv = 1.0f / sqrtf(ss / (float)dim + eps);
        for (int i = 0; i < dim; i++) o[i] = xr[i] * inv * (w_offset + w[i]);
    }
}

static void cpu_layernorm(float *out, const float *x, const float *w, const float *b, int rows, int dim, float eps) {
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * dim;
        float *o = out + (size_t)r * dim;
        float mean = 0, var = 0;
        for (int i = 0; i < dim; i++) mean += xr[i];
        mean /= (float)dim;
        for (int i = 0; i < dim; i++) var += (xr[i] - mean) * (xr[i] - mean);
        var /= (float)dim;
        float inv = 1.0f / sqrtf(var + eps);
        for (int i = 0; i < dim; i++) o[i] = (xr[i] - mean) * inv * w[i] + b[i];
    }
}

static void cpu_rope(float *x, int stride, const int *pos, const float *inv_freq, int rows, int n_heads, int head_dim,
                     int rot_dim) {
    int half = rot_dim / 2;
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; r++) {
        for (int i = 0; i < half; i++) {
            // The angle is rounded to fp32 before cos/sin, as HF computes it.
            float angle = (float)pos[r] * inv_freq[i];
            float c = cosf(angle), s = sinf(angle);
            for (int h = 0; h < n_heads; h++) {
                float *xh = x + (size_t)r * stride + (size_t)h * head_dim;
                float a = xh[i], b = xh[i + half];
                xh[i] = a * c - b * s;
                xh[i + half] = b * c + a * s;
            }
        }
    }
}

static void cpu_glu(float *out, const float *gate, const float *up, size_t n, act_kind act) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) out[i] = act_f(gate[i], act) * up[i];
}

static void cpu_act(float *x, size_t n, act_kind act) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) x[i] = act_f(x[i], act);
}

static void cpu_softcap(float *x, size_t n, float cap) {
    float inv = 1.0f / cap;
    for (size_t i = 0; i < n; i++) x[i] = cap * tanhf(x[i] * inv);
}

static void cpu_add(float *y, const float *x, size_t n) {
    for (size_t i = 0; i < n; i++) y[i] += x[i];
}

static void cpu_scale(float *y, size_t n, float s) {
    for (size_t i = 0; i < n; i++) y[i] *= s;
}

// Four floats as one GNU vector (an SSE register on any x86-64, NEON on arm64). The dot product keeps
// eight partial sums in two vectors: the scalar loop's single running sum is a chain of dependent adds
// the compiler may not reorder, which held attention at add-latency speed. The result differs from
// the reference's sequential sum only by rounding.
typedef float f32x4 __attribute__((vector_size(16)));

static inline f32x4 load4(const float *p) {
    f32x4 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float dot_f32(const float *a, const float *b, int n) {
    f32x4 acc0 = {0}, acc1 = {0};
    int e = 0;
    for (; e + 8 <= n; e += 8) {
        acc0 += load4(a + e) * load4(b + e);
        acc1 += load4(a + e + 4) * load4(b + e + 4);
    }
    float tail = 0;
    for (; e < n; e++) tail += a[e] * b[e];
    f32x4 acc = acc0 + acc1;
    return (acc[0] + acc[2]) + (acc[1] + acc[3]) + tail;
}

// o[e] += w * v[e]
static inline void axpy_f32(float *o, float w, const float *v, int n) {
    int e = 0;
    for (; e + 4 <= n; e += 4) {
        f32x4 r = load4(o + e) + w * load4(v + e);
        memcpy(o + e, &r, sizeof r);
    }
    for (; e < n; e++) o[e] += w * v[e];
}

// Key/value rows of sender j for query head h reading into position i: a donor's or the current ones.
typedef struct {
    const float *k, *v;
} kv_pair;

static kv_pair pick_kv(const float *k, const float *v, const float *const *donor_k, const float *const *donor_v,
                       const attn_seq *sq, const attn_params *p, const edge_rule_set *rules, int h, int g, int i, int j) {
    size_t off = (size_t)g * p->head_dim;
    if (rules && j < sq->n_typed && i < sq->n_typed) {
        int d = edge_donor(rules, h, sq->types[j], sq->index[j], sq->types[i], sq->index[i]);
        if (d >= 0) {
            size_t row = (size_t)(sq->donor_row + j) * p->kv_stride + off;
            return (kv_pair){donor_k[d] + row, donor_v[d] + row};
        }
    }
    size_t row = (size_t)(sq->kv_row + j) * p->kv_stride + off;
    return (kv_pair){k + row, v + row};
}

// One (sequence, query, head) row of attention; scores is scratch of at least i + 1 floats. With rules
// (and the sequence's types), each sender's key and value come from pick_kv.
static void attend_row(float *o, const float *qv, const float *k, const float *v, const float *const *donor_k,
                       const float *const *donor_v, const attn_seq *sq, int i, int h, const attn_params *p,
                       const edge_rule_set *rules, float *scores) {
    int d = p->head_dim, g = h / (p->n_heads / p->n_kv_heads);
    if (!sq->types) rules = NULL;
    int j0 = p->window > 0 && i - p->window + 1 > 0 ? i - p->window + 1 : 0;
    float mx = -INFINITY;
    for (int j = j0; j <= i; j++) {
        const float *kj = pick_kv(k, v, donor_k, donor_v, sq, p, rules, h, g, i, j).k;
        float dot = dot_f32(qv, kj, d) * p->scale;
        if (p->softcap > 0) dot = p->softcap * tanhf(dot / p->softcap);
        scores[j] = dot;
        if (dot > mx) mx = dot;
    }
    float sum = 0;
    for (int j = j0; j <= i; j++) {
        scores[j] = expf(scores[j] - mx);
        sum += scores[j];
    }
    float inv = 1.0f / sum;
    for (int e = 0; e < d; e++) o[e] = 0;
    for (int j = j0; j <= i; j++) axpy_f32(o, scores[j] * inv, pick_kv(k, v, donor_k, donor_v, sq, p, rules, h, g, i, j).v, d);
}

static void cpu_patched_attention(float *out, const float *q, const float *k, const float *v, int n_donors,
                                  const float *const *donor_k, const float *const *donor_v, const attn_seq *seqs,
                                  int n_seqs, const attn_params *p, const edge_rule_set *rules) {
    int d = p->head_dim;
    int max_keys = 1, total_q = 0;
    for (int s = 0; s < n_seqs; s++) {
        if (seqs[s].q_pos + seqs[s].n_q > max_keys) max_keys = seqs[s].q_pos + seqs[s].n_q;
        total_q += seqs[s].n_q;
    }
    // Flatten (query row, head) so the threads share the work evenly whatever the sequence lengths.
    int *row_seq = ep_malloc(sizeof(int) * (size_t)(total_q > 0 ? total_q : 1));
    int *row_qi = ep_malloc(sizeof(int) * (size_t)(total_q > 0 ? total_q : 1));
    for (int s = 0, r = 0; s < n_seqs; s++)
        for (int qi = 0; qi < seqs[s].n_q; qi++, r++) {
            row_seq[r] = s;
            row_qi[r] = qi;
        }
#pragma omp parallel
    {
        float *scores = ep_malloc(sizeof(float) * (size_t)max_keys);
#pragma omp for schedule(dynamic, 4)
        for (long job = 0; job < (long)total_q * p->n_heads; job++) {
            int r = (int)(job / p->n_heads), h = (int)(job % p->n_heads);
            const attn_seq *sq = &seqs[row_seq[r]];
            int qi = row_qi[r];
            const float *qv = q + (size_t)(sq->q_row + qi) * p->q_stride + (size_t)h * d;
            float *o = out + (size_t)(sq->q_row + qi) * p->q_stride + (size_t)h * d;
            attend_row(o, qv, k, v, donor_k, donor_v, sq, sq->q_pos + qi, h, p, rules, scores);
        }
        free(scores);
    }
    free(row_seq);
    free(row_qi);
    (void)n_donors;
}

static void cpu_attention(float *out, const float *q, const float *k, const float *v, const attn_seq *seqs, int n_seqs,
                          const attn_params *p) {
    cpu_patched_attention(out, q, k, v, 0, NULL, NULL, seqs, n_seqs, p, NULL);
}

static const kernel_ops cpu_table = {
    .name = "cpu",
    .alloc = host_alloc,
    .release = host_release,
    .upload = host_copy,
    .download = host_copy,
    .sync = host_sync,
    .matmul = cpu_matmul,
    .rmsnorm = cpu_rmsnorm,
    .layernorm = cpu_layernorm,
    .rope = cpu_rope,
    .glu = cpu_glu,
    .act = cpu_act,
    .softcap = cpu_softcap,
    .add = cpu_add,
    .scale = cpu_scale,
    .attention = cpu_attention,
    .patched_attention = cpu_patched_attention,
};

const kernel_ops *kernel_ops_cpu(void) { return &cpu_table; }

#ifndef EP_HAVE_CUDA
const kernel_ops *kernel_ops_cuda(void) { return NULL; }
#endif
