// ops: the compute kernels of the forward pass behind one dispatch table.
//
// Each backend (ref: naive loops, the reference every other backend is tested against; cpu: BLAS and
// vectorizable loops; cuda: kernels/ops_cuda.cu when built with CUDA) fills one kernel_ops table.
// All pointers handed to a backend's ops live in that backend's memory (host for ref and cpu, device
// for cuda); buffers are moved with the table's alloc/upload/download/release. Tensors are row-major
// fp32, rows of `dim` floats. Ops never fail (callers validate shapes); they may take small scratch.
// The gradient ops (the second half of the table) are the transposes of the forward ops that the
// attribution backward needs (docs/attribution.md): activation gradients only, never weight gradients,
// fp32 in and out (bf16 only as a weight), sums in fp32 or wider (double in ref).
#ifndef EP_KERNELS_OPS_H
#define EP_KERNELS_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/edge_rule.h"

typedef enum { ACT_SILU = 0, ACT_GELU_TANH = 1 } act_kind;

// One sequence of a batched attention call. Queries are consecutive positions
// q_pos .. q_pos + n_q - 1 stored at rows q_row ..; keys and values of position j are stored at row
// kv_row + j. A query at position i sees keys 0 .. i (causal), restricted to i - j < window when a
// window is set.
// For patched attention a sequence also carries its positions' token types and example indices
// (host memory, n_typed entries; positions beyond are untyped) and the row where its positions start
// in the donors' key/value arrays.
typedef struct {
    int q_row;
    int n_q;
    int q_pos;
    int kv_row;
    const int32_t *types, *index;
    int n_typed;
    int donor_row;
} attn_seq;

typedef struct {
    int n_heads;     // query heads
    int n_kv_heads;  // query head h reads kv head h / (n_heads / n_kv_heads)
    int head_dim;
    int q_stride;    // floats between consecutive rows of q and out (>= n_heads * head_dim)
    int kv_stride;   // floats between consecutive rows of k and v (>= n_kv_heads * head_dim)
    float scale;     // scores = (q . k) * scale
    float softcap;   // > 0: scores = softcap * tanh(scores / softcap), before masking
    int window;      // > 0: sliding window length
} attn_params;

// A unit of the attribution scores (docs/attribution.md), in the numbering of the op's heads (a shard's
// own heads; the caller maps the model's heads to them). Head unit: query head `head`'s output at the
// positions of token type `type`, replaced by donor `donor`'s. Edge unit: the edges A -> B of query head
// `head` with type(A) = sender, type(B) = receiver (A <= B, inside the window, relation any) reading
// donor `donor`'s key and value at A, or as `source` says (kernels/edge_rule.h: kv, k only, v only, or
// removed from B's softmax; 0 = kv).
typedef struct {
    int head, type, donor;
} head_score_unit;

typedef struct {
    int head, sender, receiver, donor;
    int source;  // edge_source: what the unit's intervention substitutes (EDGE_SRC_ZERO reads no donor)
} edge_score_unit;

// One row's next-token figures (kernel_ops.logit_metrics; stages/metrics.h): x the row's n logits, t its
// target token.
typedef struct {
    int argmax;            // the lowest index of the row's largest logit
    int other;             // the token logit_diff subtracts: the given one, else the lowest index of the
                           // largest logit among the tokens != t
    float target_logprob;  // x[t] - max - ln sum_i exp(x_i - max): the sum of exp((double)x_i - max) in double,
                           // the expression in double, rounded to fp32 once
    float logit_diff;      // x[t] - x[other], in fp32
    float log_sum_exp;     // max + ln sum_i exp(x_i - max), the same sum, rounded to fp32
} logit_row_metrics;

typedef struct kernel_ops {
    const char *name;

    void *(*alloc)(size_t bytes);
    void (*release)(void *p);
    void (*upload)(void *dst, const void *host_src, size_t bytes);
    void (*download)(void *host_dst, const void *src, size_t bytes);
    void (*sync)(void);

    // out[rows, n_out] = x[rows, n_in] . w[n_out, n_in]^T (+ bias[n_out] if non-NULL): the layout of a
    // HuggingFace Linear weight.
    void (*matmul)(float *out, const float *x, const float *w, const float *bias, int rows, int n_in, int n_out);
    // The same product with a bf16 weight (raw bf16 bits, same layout): the bf16 Linear of a bf16 run. x is
    // rounded to bf16 (to nearest, ties to even) as it enters the product, products are exact and summed
    // in fp32 or wider (cuBLAS: bf16 tensor cores, CUBLAS_COMPUTE_32F), out stays fp32 (docs/cuda.md).
    void (*matmul_bf16)(float *out, const float *x, const uint16_t *w, const float *bias, int rows, int n_in,
                        int n_out);
    // out = x / sqrt(mean(x^2) + eps) * (w_offset + w), per row; w_offset is 1 for Gemma, 0 for Llama.
    void (*rmsnorm)(float *out, const float *x, const float *w, float w_offset, int rows, int dim, float eps);
    // out = (x - mean) / sqrt(var + eps) * w + b, per row (biased variance, as torch LayerNorm).
    void (*layernorm)(float *out, const float *x, const float *w, const float *b, int rows, int dim, float eps);
    // Rotary embedding in place (HF rotate_half convention) on the first rot_dim dims of every head of
    // every row; row r is at position pos[r]; angle_i = pos * inv_freq[i] for i < rot_dim/2.
    void (*rope)(float *x, int stride, const int *pos, const float *inv_freq, int rows, int n_heads,
                 int head_dim, int rot_dim);
    // out[i] = act(gate[i]) * up[i]
    void (*glu)(float *out, const float *gate, const float *up, size_t n, act_kind act);
    // x[i] = act(x[i])
    void (*act)(float *x, size_t n, act_kind act);
    // x[i] = cap * tanh(x[i] / cap)
    void (*softcap)(float *x, size_t n, float cap);
    // y[i] += x[i]
    void (*add)(float *y, const float *x, size_t n);
    // y[i] *= s
    void (*scale)(float *y, size_t n, float s);
    // Causal (optionally windowed, softcapped) multi-head attention with GQA, softmax in fp32.
    // q, k, v, out are backend memory; seqs and p are host memory (small metadata).
    void (*attention)(float *out, const float *q, const float *k, const float *v, const attn_seq *seqs,
                      int n_seqs, const attn_params *p);
    // The same with edge ablation (kernels/edge_rule.h): the edge A->B of query head h reads donor d's
    // key and/or value at A (donor_k[d] / donor_v[d], row donor_row + A, same strides) as the matching
    // rule's source says (kv: both, k: the donor's key with the current value, v: the current key with
    // the donor's value), else the current ones; an edge whose rule's source is zero is left out of B's
    // softmax, which renormalizes over B's other edges, and a query whose every edge is removed outputs
    // 0. q always comes from the current pass. NULL in backends without it.
    void (*patched_attention)(float *out, const float *q, const float *k, const float *v, int n_donors,
                              const float *const *donor_k, const float *const *donor_v, const attn_seq *seqs,
                              int n_seqs, const attn_params *p, const edge_rule_set *rules);

    // Data movement inside backend memory (both pointers backend memory, never overlapping):
    // row i of dst (dst + i * dst_stride) = row i of src (src + i * src_stride), row_len floats, i < rows.
    void (*copy_rows)(float *dst, int dst_stride, const float *src, int src_stride, int rows, int row_len);
    // Packed row i of dst (dst + i * row_len) = row idx[i] of src (src + idx[i] * row_len), i < n, or
    // zeros where idx[i] < 0 (a vocabulary-parallel shard's embedding rows of other ranks' tokens); idx
    // is backend memory (n ints).
    void (*gather_rows)(float *dst, const float *src, const int *idx, int n, int row_len);

    // ---- Gradient ops. Same memory rules as above: tensors in backend memory, attn_seq / attn_params /
    // rules / units in host memory. `accumulate` 0 overwrites the output, 1 adds to it (the residual
    // stream's gradient is a sum over the blocks that read it). Unless said otherwise an output never
    // aliases an input; the pointwise ones may work in place (each element's inputs are read before its
    // outputs are written).
    //
    // dx[rows, n_in] (+)= dy[rows, n_out] . w[n_out, n_in]: the input gradient of matmul (bias has none).
    void (*linear_back)(float *dx, const float *dy, const float *w, int rows, int n_in, int n_out, int accumulate);
    // The same with matmul_bf16's weight (raw bf16 bits). dy is NOT rounded to bf16: a bf16 run keeps fp32
    // gradients and fp32 accumulation (issue 18), so this is the fp32 gradient of the bf16 model, dy times
    // the exact fp32 values of the bf16 weights (the forward's rounding of x is its own, not transposed:
    // straight through). cpu and cuda widen blocks of weight rows to fp32 and run sgemm; the sum over
    // n_out is then taken block after block (a fixed order, the same for any thread count).
    void (*linear_back_bf16)(float *dx, const float *dy, const uint16_t *w, int rows, int n_in, int n_out,
                             int accumulate);
    // dx (+)= (d rmsnorm(x) / dx)^T dy per row, rmsnorm as above (w_offset 1 for Gemma, 0 for Llama):
    // dx = r g - x r^3 mean(g x), g = dy (w_offset + w), r = (mean(x^2) + eps)^-1/2.
    void (*rmsnorm_back)(float *dx, const float *x, const float *w, float w_offset, const float *dy, int rows, int dim,
                         float eps, int accumulate);
    // dx (+)= (d layernorm(x) / dx)^T dy per row: dx = r (g - mean g - x^ mean(g x^)), g = dy w,
    // x^ = (x - mean) r (the bias has no input gradient).
    void (*layernorm_back)(float *dx, const float *x, const float *w, const float *dy, int rows, int dim, float eps,
                           int accumulate);
    // The transpose of rope, in place on the gradient: the rotation by the negative angle (the same fp32
    // angle pos * inv_freq as the forward, so cos is the same and sin changes sign). Same layout as rope.
    void (*rope_back)(float *dx, int stride, const int *pos, const float *inv_freq, int rows, int n_heads,
                      int head_dim, int rot_dim);
    // dx[i] = dy[i] * act'(x[i]), x the activation's input (exact derivatives of act_f's formulas).
    void (*act_back)(float *dx, const float *x, const float *dy, size_t n, act_kind act);
    // From out = act(gate) * up: dgate[i] = dout[i] * up[i] * act'(gate[i]), dup[i] = dout[i] * act(gate[i]).
    void (*glu_back)(float *dgate, float *dup, const float *gate, const float *up, const float *dout, size_t n,
                     act_kind act);
    // From y = cap tanh(x / cap), given the output y (softcap works in place, so y is what the forward
    // leaves; 1 - tanh^2 = 1 - (y / cap)^2): dx[i] = dy[i] * (1 - (y[i] / cap)^2).
    void (*softcap_back)(float *dx, const float *y, const float *dy, size_t n, float cap);
    // The backward of patched_attention (rules NULL or empty: of attention) for the gradient dout of its
    // output, same layouts and same edge sources (kernels/edge_rule.h). The softmax is recomputed from q
    // and the keys (nothing is saved by the forward): per query i and head h, over the keys j it sees,
    //   s_ij = softcap(scale q_i . k*_j), p_ij = softmax_j(s_ij), g_ij = dout_i . v*_j,
    //   dlogit_ij = p_ij (g_ij - sum_j' p_ij' g_ij') (1 - (s_ij / cap)^2 or 1 without softcap) scale,
    //   dq_i = sum_j dlogit_ij k*_j,  dL/dk*_j += dlogit_ij q_i,  dL/dv*_j += p_ij dout_i,
    // with k*, v* the rows the edge read (the key and the value may come from different sources under a k-
    // or v-only rule); a removed (zeroed) edge is not among the keys i sees (p = dlogit = 0), and a query
    // whose every edge is removed has zero gradients. dq is overwritten (each query row's n_heads *
    // head_dim floats). The key/value gradients are accumulated (the caller zeroes them; GQA sums a
    // group's query heads into its KV head) into the row the edge read, the key's and the value's each
    // to its own source: dk / dv (kv_row + j) for the current pass, donor_dk[d] / donor_dv[d] (donor_row
    // + j) for donor d, or dropped where donor_dk / donor_dv or their entry is NULL (donor passes are
    // constants of the attribution). Assumes the sequences' key and value rows
    // (and donor rows) do not overlap, so no two sequences write one row.
    void (*attention_back)(float *dq, float *dk, float *dv, const float *q, const float *k, const float *v,
                           const float *dout, int n_donors, const float *const *donor_k,
                           const float *const *donor_v, float *const *donor_dk, float *const *donor_dv,
                           const attn_seq *seqs, int n_seqs, const attn_params *p, const edge_rule_set *rules);
    // Head-unit scores before |.| (docs/attribution.md): score[u * n_seqs + s] = sum over the typed
    // positions B (B < n_typed, of the sequence's n_q rows, position q_pos + row) of type units[u].type
    // of (z - z_d) . dz over head units[u].head's head_dim columns, summed in double: z and dz at row
    // q_row + row, z_d = donor_z[donor] at row donor_row + B; row stride p->q_stride. score is backend
    // memory (n_units * n_seqs doubles), overwritten.
    void (*head_scores)(double *score, const float *z, const float *const *donor_z, const float *dz,
                        const attn_seq *seqs, int n_seqs, const attn_params *p, const head_score_unit *units,
                        int n_units);
    // Edge-unit scores before |.|: score[u * n_seqs + s] = sum over the unit's edges A -> B (typed
    // positions, A <= B in the window) of, by the unit's source,
    //   kv:   dlogit_BA q_B . (k_d(A) - k*_A) + p_BA dout_B . (v_d(A) - v*_A)
    //   k:    dlogit_BA q_B . (k_d(A) - k*_A)          v: p_BA dout_B . (v_d(A) - v*_A)
    //   zero: p_BA (sum_A' p_BA' g_BA' - g_BA), g_BA = dout_B . v*_A (the derivative of the loss as the
    //         edge's unnormalized weight exp(s_BA) is scaled by 1 - t, t from 0: docs/attribution.md)
    // in double, with p, dlogit and k*, v* (what the edge read) as in attention_back for these inputs
    // (dout: the attention output's gradient as the attention saw it: zero where a head unit replaced
    // the output), k_d, v_d donor units[u].donor's row donor_row + A. An edge already reading that donor
    // (or already removed) adds 0. Recomputes the softmax like attention_back. score: backend memory,
    // overwritten.
    // k_base, v_base (NULL: k, v): where an edge reads the current pass (its key, its value), the differences
    // are taken from k_base(A), v_base(A) (rows as k, v) instead: k_d(A) - k_base(A), while p and dlogit
    // still come from k, v. EAP-IG scores the gradients of a point on the path with the clean pass's
    // differences. A zeroing unit takes no difference, so the base does not enter its score.
    void (*edge_scores)(double *score, const float *q, const float *k, const float *v, const float *k_base,
                        const float *v_base, const float *dout,
                        int n_donors, const float *const *donor_k, const float *const *donor_v,
                        const attn_seq *seqs, int n_seqs, const attn_params *p, const edge_rule_set *rules,
                        const edge_score_unit *units, int n_units);

    // ---- Metric ops (stages/metrics.h): reductions over what a pass computed, for the patch stage's metrics.
    // Same memory rules: the arrays backend memory, attn_seq / attn_params / rules host memory. Sums in double
    // on every backend (ref, cpu and offset share one host implementation, ops_common.h; cuda reduces in
    // double per block), so the backends differ only by the fp32 scores cuda computes.
    //
    // KL divergence per row, in nats: out[r] = sum_i p_i (log p_i - log q_i) with p = softmax(p_logits row r),
    // q = softmax(q_logits row r), rows of n floats; each log-softmax taken stably as x_i - max - log sum_j
    // exp(x_j - max). KL(p || q): the reference distribution comes first. Identical rows give exactly 0.
    void (*kl_div_rows)(float *out, const float *p_logits, const float *q_logits, int rows, int n);
    // Attention statistics of the query rows of seqs (attention's layout; r counts the query rows over the
    // sequences in order): per row and query head h the attention distribution p_j over the keys j the row
    // sees, weighed exactly as patched_attention weighs them (rules NULL or empty: as attention): the same
    // causal mask, window, scale, softcap and GQA, and a patched edge's score from the key it reads (donor
    // d's at row donor_row + j under a kv or k-only rule; a removed edge is not among the keys; kernels/
    // edge_rule.h). Then (a row whose every edge is removed: entropy 0, every mass 0)
    //   entropy[r * n_heads + h] = -sum_j p_j ln p_j (nats; as ln Z - sum_j p_j (s_j - max), never ln 0),
    //   mass[(r * n_heads + h) * n_types + t] = sum of p_j over the keys j < n_typed with types[j] == t,
    // for t < n_types (at most 16); an untyped key (no types, j >= n_typed, or a type >= n_types) adds to no
    // entry. Values are not read: this is the softmax of the scores only. A head unit replaces a head's output
    // after its attention, so it does not change these numbers.
    void (*attention_row_stats)(float *entropy, float *mass, int n_types, const float *q, const float *k, int n_donors,
                                const float *const *donor_k, const attn_seq *seqs, int n_seqs, const attn_params *p,
                                const edge_rule_set *rules);
    // The next-token figures of rows rows of n logits ([rows][n], backend memory), so a device backend copies
    // back a few numbers per row instead of the rows: out[r] (HOST memory, rows entries; the op waits for
    // its result) for target token target[r] and, when other is non-NULL and other[r] >= 0, the logit
    // difference against other[r] instead of the best other token (target and other host memory, each in
    // [0, n)). n >= 2, every row with a finite logit and no NaN. Ties go to the lowest index (argmax, best
    // other), as stages/metrics.c's loop; the exp sum in double (max subtracted first, so large logits do
    // not overflow and -inf ones add 0), in index order on the host backends (ref, cpu, offset share one
    // host implementation, ops_common.h), per block on cuda, so the backends differ at most by the last
    // bit of the fp32 log-prob and log-sum-exp.
    void (*logit_metrics)(logit_row_metrics *out, const float *logits, const int *target, const int *other, int rows,
                          int n);

    // 1 when backend memory is host memory (ref, cpu): host pointers may be handed to the ops directly
    // and the host may read what they write.
    int host_memory;
} kernel_ops;

const kernel_ops *kernel_ops_ref(void);
// The cpu backend's context is one thread pool per process (kernels/cpu_gemm.h), created on its first
// op and kept to the end: as many threads as OPENBLAS_NUM_THREADS, else OMP_NUM_THREADS, else the CPUs of
// the process's affinity mask say. Work is cut into pieces whose size never depends on that count, so
// every op's bytes are the same for any thread count (docs/distribution.md). Ops may be called from
// several threads at once; a call that finds the pool busy runs in its own thread.
const kernel_ops *kernel_ops_cpu(void);
// NULL when the program was built without CUDA or no usable GPU is present.
const kernel_ops *kernel_ops_cuda(void);
// Why a GPU that is present cannot be used (no kernel image for it in this build, cuBLAS failing to
// start), for the caller to report; NULL when none is present, the build has no CUDA, or it is usable.
const char *kernel_ops_cuda_unusable(void);
// The cpu kernels behind device-style memory (kernels/ops_offset.c): device code paths without a GPU.
const kernel_ops *kernel_ops_offset(void);
// "cpu", "cuda", "offset", or "auto" (cuda when usable, else cpu): NULL for an unknown name or an unusable
// backend (cuda without a GPU).
const kernel_ops *kernel_ops_named(const char *name);

#endif
