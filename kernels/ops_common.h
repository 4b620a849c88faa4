// ops_common: scalar helpers shared by every backend (ref, cpu, and the cuda kernels, which compile
// them as __host__ __device__), so all evaluate the activations with the same formulas HuggingFace uses.
#ifndef EP_KERNELS_OPS_COMMON_H
#define EP_KERNELS_OPS_COMMON_H

#include <math.h>

#include "kernels/ops.h"

#ifdef __CUDACC__
#define EP_HOST_DEVICE __host__ __device__
#else
#define EP_HOST_DEVICE
#endif

// The last words of a backend op that cannot go on (a failed CUDA call, an impossible launch; the ops
// return nothing): the message and a newline on stderr, then abort(). The one place kernels/ writes
// to stderr (kernels/ops_fatal.c).
void ops_fatal(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));

// The head-unit score reduction on host memory (kernel_ops.head_scores), shared by ref and cpu: a double
// sum per unit and prompt in a fixed order, cheap beside the passes, so cpu has no faster form of it.
void ops_host_head_scores(double *score, const float *z, const float *const *donor_z, const float *dz,
                          const attn_seq *seqs, int n_seqs, const attn_params *p, const head_score_unit *units,
                          int n_units);

// The metric ops on host memory (kernel_ops.kl_div_rows, attention_row_stats, logit_metrics), shared by ref, cpu and
// offset (through the cpu table): double sums in a fixed order, one row or (row, head) at a time; cheap
// beside the passes (one query row per prompt), so cpu has no faster form of them.
#define OPS_MAX_STAT_TYPES 16
void ops_host_kl_div_rows(float *out, const float *p_logits, const float *q_logits, int rows, int n);
void ops_host_logit_metrics(logit_row_metrics *out, const float *logits, const int *target, const int *other, int rows,
                            int n);
void ops_host_attention_row_stats(float *entropy, float *mass, int n_types, const float *q, const float *k,
                                  int n_donors, const float *const *donor_k, const attn_seq *seqs, int n_seqs,
                                  const attn_params *p, const edge_rule_set *rules);

// gelu_pytorch_tanh / gelu_new: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
EP_HOST_DEVICE static inline float gelu_tanh_f(float x) {
    const float c = 0.7978845608028654f;
    return 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * x * x * x)));
}

EP_HOST_DEVICE static inline float silu_f(float x) { return x / (1.0f + expf(-x)); }

EP_HOST_DEVICE static inline float act_f(float x, act_kind act) { return act == ACT_SILU ? silu_f(x) : gelu_tanh_f(x); }

// The derivative of act_f at x (exact for its formulas), from one exp or tanh.
EP_HOST_DEVICE static inline float act_grad_f(float x, act_kind act) {
    if (act == ACT_SILU) {
        float s = 1.0f / (1.0f + expf(-x));
        return s * (1.0f + x * (1.0f - s));
    }
    const float c = 0.7978845608028654f, k = 0.044715f;
    float t = tanhf(c * (x + k * x * x * x));
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * c * (1.0f + 3.0f * k * x * x);
}

#endif
