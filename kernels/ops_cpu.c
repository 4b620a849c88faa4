// ops_cpu: the fast host backend. Matrix products, attention included, through cpu_sgemm
// (kernels/cpu_gemm.h: fixed tiles, each one single-threaded OpenBLAS call, spread over the backend's
// thread pool), and attention's (sequence, head) blocks and bf16 weight blocks as tasks of that pool;
// everything else in float loops the compiler vectorizes. How work is cut never depends on the thread
// count, so neither do the results (docs/distribution.md). No OpenMP regions: next to a second
// runtime's pool they spin-waited for the same cores (see docs/benchmarks.md).
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/bf16.h"
#include "kernels/cpu_gemm.h"
#include "kernels/ops.h"
#include "kernels/ops_common.h"
#include "kernels/alloc.h"

static void *host_alloc(size_t bytes) { return kernel_malloc(bytes); }
static void host_release(void *p) { free(p); }
static void host_copy(void *dst, const void *src, size_t bytes) { memcpy(dst, src, bytes); }
static void host_sync(void) {}

static void cpu_matmul(float *out, const float *x, const float *w, const float *bias, int rows, int n_in, int n_out) {
    if (bias) {
        for (int r = 0; r < rows; r++) memcpy(out + (size_t)r * n_out, bias, sizeof(float) * (size_t)n_out);
    }
    cpu_sgemm(0, 1, rows, n_out, n_in, 1.0f, x, n_in, w, n_in, bias ? 1.0f : 0.0f, out, n_out);
}

// bf16 weights stay bf16 in memory (half the footprint of fp32); each block of weight rows is widened
// to fp32 in a scratch buffer and multiplied by sgemm. Products of two bf16 values are exact in fp32, so
// this is the bf16 product with fp32 accumulation, in the BLAS's summation order. The blocks are the
// pool's tasks, each with its thread's scratch.
enum { BF16_BLOCK_ROWS = 256 };

typedef struct {
    float *out, *wb;  // wb: one block of widened weights per thread
    const float *xr, *bias;
    const uint16_t *w;
    int rows, n_in, n_out;
} bf16_job;

static void bf16_block(void *ctx, int task, int worker) {
    const bf16_job *j = ctx;
    int o0 = task * BF16_BLOCK_ROWS, nb = j->n_out - o0 < BF16_BLOCK_ROWS ? j->n_out - o0 : BF16_BLOCK_ROWS;
    float *wb = j->wb + (size_t)worker * BF16_BLOCK_ROWS * (size_t)j->n_in;
    const uint16_t *src = j->w + (size_t)o0 * j->n_in;
    for (size_t i = 0; i < (size_t)nb * j->n_in; i++) wb[i] = bf16_to_f32(src[i]);
    if (j->bias) {
        for (int r = 0; r < j->rows; r++)
            memcpy(j->out + (size_t)r * j->n_out + o0, j->bias + o0, sizeof(float) * (size_t)nb);
    }
    cpu_sgemm(0, 1, j->rows, nb, j->n_in, 1.0f, j->xr, j->n_in, wb, j->n_in, j->bias ? 1.0f : 0.0f, j->out + o0,
              j->n_out);
}

static void cpu_matmul_bf16(float *out, const float *x, const uint16_t *w, const float *bias, int rows, int n_in,
                            int n_out) {
    if (rows <= 0 || n_out <= 0) return;
    size_t nx = (size_t)rows * n_in;
    float *xr = kernel_malloc(sizeof(float) * (nx ? nx : 1));
    for (size_t i = 0; i < nx; i++) xr[i] = bf16_round(x[i]);
    int n_blocks = (n_out + BF16_BLOCK_ROWS - 1) / BF16_BLOCK_ROWS;
    int slots = n_blocks < cpu_threads() ? n_blocks : cpu_threads();
    bf16_job j = {out, kernel_malloc(sizeof(float) * (size_t)slots * BF16_BLOCK_ROWS * (size_t)(n_in ? n_in : 1)), xr, bias, w,
                  rows, n_in, n_out};
    cpu_parallel_for(n_blocks, bf16_block, &j);
    free(j.wb);
    free(xr);
}

static void cpu_rmsnorm(float *out, const float *x, const float *w, float w_offset, int rows, int dim, float eps) {
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
    for (size_t i = 0; i < n; i++) out[i] = act_f(gate[i], act) * up[i];
}

static void cpu_act(float *x, size_t n, act_kind act) {
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

// Attention of one (sequence, head) as two matrix products through BLAS: S = scale * Q K^T over the
// keys the block's queries can see, then the causal (and window) mask and softmax per row in fp32,
// then O = P V. The masked part of S is computed and discarded (at most half of it for a prompt), which
// BLAS's speed repays many times over the per-row dot loops this replaces. scores: n_q * n_k floats.
static void attend_block(float *out, const float *q, const float *k, const float *v, const attn_seq *sq, int h,
                         const attn_params *p, float *scores) {
    int d = p->head_dim, g = h / (p->n_heads / p->n_kv_heads);
    int first = sq->q_pos, last = sq->q_pos + sq->n_q - 1;              // query positions
    int k0 = p->window > 0 && first - p->window + 1 > 0 ? first - p->window + 1 : 0;  // first key any sees
    int n_k = last - k0 + 1;
    const float *qb = q + (size_t)sq->q_row * p->q_stride + (size_t)h * d;
    const float *kb = k + (size_t)(sq->kv_row + k0) * p->kv_stride + (size_t)g * d;
    const float *vb = v + (size_t)(sq->kv_row + k0) * p->kv_stride + (size_t)g * d;
    float *ob = out + (size_t)sq->q_row * p->q_stride + (size_t)h * d;
    cpu_sgemm(0, 1, sq->n_q, n_k, d, p->scale, qb, p->q_stride, kb, p->kv_stride, 0.0f, scores, n_k);
    for (int qi = 0; qi < sq->n_q; qi++) {
        int i = first + qi, j0 = p->window > 0 && i - p->window + 1 > 0 ? i - p->window + 1 : 0;
        float *row = scores + (size_t)qi * n_k;  // row[j - k0] is key position j
        float mx = -INFINITY;
        for (int j = j0; j <= i; j++) {
            float s = row[j - k0];
            if (p->softcap > 0) s = p->softcap * tanhf(s / p->softcap);
            row[j - k0] = s;
            if (s > mx) mx = s;
        }
        float sum = 0;
        for (int j = j0; j <= i; j++) {
            row[j - k0] = expf(row[j - k0] - mx);
            sum += row[j - k0];
        }
        float inv = 1.0f / sum;
        for (int j = k0; j < j0; j++) row[j - k0] = 0;
        for (int j = j0; j <= i; j++) row[j - k0] *= inv;
        for (int j = i + 1; j <= last; j++) row[j - k0] = 0;
    }
    cpu_sgemm(0, 0, sq->n_q, d, n_k, 1.0f, scores, n_k, vb, p->kv_stride, 0.0f, ob, p->q_stride);
}

// One pool task per (sequence, head): each writes its own rows and head columns of out, with its
// thread's scratch (scores: max_block floats per donor and the current pass; sel: max_block bytes).
typedef struct {
    float *out;
    const float *q, *k, *v;
    int n_donors;
    const float *const *donor_k, *const *donor_v;
    const attn_seq *seqs;
    const attn_params *p;
    const edge_rule_set *rules;  // NULL: plain attention
    const int *donor_used;
    size_t max_block;
    float *scores;
    signed char *sel;
} attn_job;

static void attn_task(void *ctx, int task, int worker);

// The largest n_q x n_k block of the sequences (at least 1).
static size_t max_attn_block(const attn_seq *seqs, int n_seqs) {
    size_t max_block = 1;
    for (int s = 0; s < n_seqs; s++) {
        size_t n_k = (size_t)seqs[s].q_pos + (size_t)seqs[s].n_q;
        if ((size_t)seqs[s].n_q * n_k > max_block) max_block = (size_t)seqs[s].n_q * n_k;
    }
    return max_block;
}

static void run_attn(attn_job *j, int n_seqs) {
    int tasks = n_seqs * j->p->n_heads, slots = tasks < cpu_threads() ? tasks : cpu_threads();
    if (slots < 1) return;
    j->scores = kernel_malloc(sizeof(float) * j->max_block * (1 + (size_t)j->n_donors) * (size_t)slots);
    j->sel = j->rules ? kernel_malloc(j->max_block * (size_t)slots) : NULL;
    cpu_parallel_for(tasks, attn_task, j);
    free(j->scores);
    free(j->sel);
}

static void cpu_attention(float *out, const float *q, const float *k, const float *v, const attn_seq *seqs, int n_seqs,
                          const attn_params *p) {
    attn_job j = {.out = out, .q = q, .k = k, .v = v, .seqs = seqs, .p = p, .max_block = max_attn_block(seqs, n_seqs)};
    run_attn(&j, n_seqs);
}

// Patched attention of one (sequence, head), in the same BLAS form: scores against the current keys and
// against each donor's keys that a rule of this layer reads, then per (receiver, sender) the score of the
// key the rules select (kernels/edge_rule.h; a removed edge has none), softmax over the selection, and
// the output as the sum of (probabilities where the current value is selected) x V plus the same per
// donor: the key's and the value's sources are taken apart from the edge code, so a k- or v-only edge
// scores with one source and reads the other's value. scores holds (1 + n_donors) * n_q * n_k floats;
// sel n_q * n_k bytes (edge codes, -2 .. 47).
static void attend_block_patched(float *out, const float *q, const float *k, const float *v, int n_donors,
                                 const float *const *donor_k, const float *const *donor_v, const attn_seq *sq, int h,
                                 const attn_params *p, const edge_rule_set *rules, const int *donor_used, float *scores,
                                 signed char *sel) {
    int d = p->head_dim, g = h / (p->n_heads / p->n_kv_heads);
    int first = sq->q_pos, last = sq->q_pos + sq->n_q - 1;
    int k0 = p->window > 0 && first - p->window + 1 > 0 ? first - p->window + 1 : 0;
    int n_k = last - k0 + 1;
    size_t block = (size_t)sq->n_q * n_k, off = (size_t)g * d;
    // Only typed keys can be read from a donor: the donor products cover keys k0 .. n_typed - 1 and no more
    // (a donor cache holds the prompt's positions only; reading past them would multiply zero probabilities
    // by whatever lies there, and 0 x NaN is NaN).
    int n_kd = sq->n_typed - k0 < 0 ? 0 : sq->n_typed - k0 < n_k ? sq->n_typed - k0 : n_k;
    const float *qb = q + (size_t)sq->q_row * p->q_stride + (size_t)h * d;
    float *ob = out + (size_t)sq->q_row * p->q_stride + (size_t)h * d;
    cpu_sgemm(0, 1, sq->n_q, n_k, d, p->scale, qb, p->q_stride, k + (size_t)(sq->kv_row + k0) * p->kv_stride + off,
              p->kv_stride, 0.0f, scores, n_k);
    for (int dn = 0; dn < n_donors; dn++)
        if (donor_used[dn] && n_kd > 0)
            cpu_sgemm(0, 1, sq->n_q, n_kd, d, p->scale, qb, p->q_stride,
                      donor_k[dn] + (size_t)(sq->donor_row + k0) * p->kv_stride + off, p->kv_stride, 0.0f,
                      scores + (1 + (size_t)dn) * block, n_k);
    for (int qi = 0; qi < sq->n_q; qi++) {
        int i = first + qi, j0 = p->window > 0 && i - p->window + 1 > 0 ? i - p->window + 1 : 0;
        size_t r = (size_t)qi * n_k;
        float mx = -INFINITY;
        float *chosen = scores + r;  // the current scores' row, overwritten by the selected scores
        for (int j = j0; j <= i; j++) {
            int code = i < sq->n_typed && j < sq->n_typed
                           ? edge_lookup(rules, h, sq->types[j], sq->index[j], sq->types[i], sq->index[i])
                           : EDGE_CLEAN;
            sel[r + j - k0] = (signed char)code;
            int dn = edge_key_donor(code);
            float s = dn >= 0 ? scores[(1 + (size_t)dn) * block + r + j - k0] : chosen[j - k0];
            if (p->softcap > 0) s = p->softcap * tanhf(s / p->softcap);
            if (code == EDGE_REMOVED) s = -INFINITY;
            chosen[j - k0] = s;
            if (s > mx) mx = s;
        }
        float sum = 0;
        for (int j = j0; j <= i; j++) sum += chosen[j - k0] = mx == -INFINITY ? 0.0f : expf(chosen[j - k0] - mx);
        float inv = sum > 0 ? 1.0f / sum : 0.0f;  // every edge removed: the row outputs 0
        // Split the probabilities by source: the current row keeps its share, each donor row its own.
        for (int dn = 0; dn < n_donors; dn++)
            if (donor_used[dn]) memset(scores + (1 + (size_t)dn) * block + r, 0, sizeof(float) * (size_t)n_k);
        for (int j = k0; j < n_k + k0; j++) {
            float pr = j >= j0 && j <= i ? chosen[j - k0] * inv : 0.0f;
            int dn = j >= j0 && j <= i ? edge_value_donor(sel[r + j - k0]) : -1;
            if (dn >= 0) {
                scores[(1 + (size_t)dn) * block + r + j - k0] = pr;
                pr = 0;
            }
            chosen[j - k0] = pr;
        }
    }
    cpu_sgemm(0, 0, sq->n_q, d, n_k, 1.0f, scores, n_k, v + (size_t)(sq->kv_row + k0) * p->kv_stride + off,
              p->kv_stride, 0.0f, ob, p->q_stride);
    for (int dn = 0; dn < n_donors; dn++)
        if (donor_used[dn] && n_kd > 0)
            cpu_sgemm(0, 0, sq->n_q, d, n_kd, 1.0f, scores + (1 + (size_t)dn) * block, n_k,
                      donor_v[dn] + (size_t)(sq->donor_row + k0) * p->kv_stride + off, p->kv_stride, 1.0f, ob,
                      p->q_stride);
}

static void attn_task(void *ctx, int task, int worker) {
    const attn_job *j = ctx;
    const attn_seq *sq = &j->seqs[task / j->p->n_heads];
    int h = task % j->p->n_heads;
    if (sq->n_q <= 0) return;
    float *scores = j->scores + j->max_block * (1 + (size_t)j->n_donors) * (size_t)worker;
    if (j->rules && sq->types)
        attend_block_patched(j->out, j->q, j->k, j->v, j->n_donors, j->donor_k, j->donor_v, sq, h, j->p, j->rules,
                             j->donor_used, scores, j->sel + j->max_block * (size_t)worker);
    else
        attend_block(j->out, j->q, j->k, j->v, sq, h, j->p, scores);
}

static void cpu_patched_attention(float *out, const float *q, const float *k, const float *v, int n_donors,
                                  const float *const *donor_k, const float *const *donor_v, const attn_seq *seqs,
                                  int n_seqs, const attn_params *p, const edge_rule_set *rules) {
    int donor_used[16] = {0};
    for (int r = 0; rules && r < rules->n; r++)
        if (rules->rule[r].source != EDGE_SRC_ZERO && rules->rule[r].donor >= 0 && rules->rule[r].donor < 16)
            donor_used[rules->rule[r].donor] = 1;
    attn_job j = {.out = out, .q = q, .k = k, .v = v, .n_donors = n_donors, .donor_k = donor_k, .donor_v = donor_v,
                  .seqs = seqs, .p = p, .rules = rules, .donor_used = donor_used,
                  .max_block = max_attn_block(seqs, n_seqs)};
    run_attn(&j, n_seqs);
}

static void cpu_copy_rows(float *dst, int dst_stride, const float *src, int src_stride, int rows, int row_len) {
    for (int r = 0; r < rows; r++)
        memcpy(dst + (size_t)r * dst_stride, src + (size_t)r * src_stride, sizeof(float) * (size_t)row_len);
}

static void cpu_gather_rows(float *dst, const float *src, const int *idx, int n, int row_len) {
    for (int i = 0; i < n; i++)
        if (idx[i] < 0)
            memset(dst + (size_t)i * row_len, 0, sizeof(float) * (size_t)row_len);
        else
            memcpy(dst + (size_t)i * row_len, src + (size_t)idx[i] * row_len, sizeof(float) * (size_t)row_len);
}

// ---- Gradient ops (kernels/ops.h). Products through cpu_sgemm, the rest in loops; row statistics of the
// norms in double (a row's sums are few and cheap), the rest in fp32.

static void cpu_linear_back(float *dx, const float *dy, const float *w, int rows, int n_in, int n_out, int accumulate) {
    if (rows <= 0 || n_in <= 0) return;
    cpu_sgemm(0, 0, rows, n_in, n_out, 1.0f, dy, n_out, w, n_in, accumulate ? 1.0f : 0.0f, dx, n_in);
}

// Blocks of BF16_BLOCK_ROWS weight rows widened to fp32, one after the other, each adding its part of
// the sum over n_out: the order of the sum depends on the shapes only.
static void cpu_linear_back_bf16(float *dx, const float *dy, const uint16_t *w, int rows, int n_in, int n_out,
                                 int accumulate) {
    if (rows <= 0 || n_in <= 0) return;
    if (n_out <= 0) {
        if (!accumulate) memset(dx, 0, sizeof(float) * (size_t)rows * n_in);
        return;
    }
    float *wb = kernel_malloc(sizeof(float) * BF16_BLOCK_ROWS * (size_t)n_in);
    for (int o0 = 0; o0 < n_out; o0 += BF16_BLOCK_ROWS) {
        int nb = n_out - o0 < BF16_BLOCK_ROWS ? n_out - o0 : BF16_BLOCK_ROWS;
        const uint16_t *src = w + (size_t)o0 * n_in;
        for (size_t i = 0; i < (size_t)nb * n_in; i++) wb[i] = bf16_to_f32(src[i]);
        cpu_sgemm(0, 0, rows, n_in, nb, 1.0f, dy + o0, n_out, wb, n_in, accumulate || o0 > 0 ? 1.0f : 0.0f, dx, n_in);
    }
    free(wb);
}

static void cpu_rmsnorm_back(float *dx, const float *x, const float *w, float w_offset, const float *dy, int rows,
                             int dim, float eps, int accumulate) {
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * dim, *g = dy + (size_t)r * dim;
        float *o = dx + (size_t)r * dim;
        double ss = 0, dot = 0;
        for (int i = 0; i < dim; i++) {
            ss += (double)xr[i] * xr[i];
            dot += (double)g[i] * (w_offset + w[i]) * xr[i];
        }
        float inv = (float)(1.0 / sqrt(ss / dim + eps)), c = (float)(dot / dim) * inv * inv * inv;
        for (int i = 0; i < dim; i++) {
            float v = inv * g[i] * (w_offset + w[i]) - xr[i] * c;
            o[i] = accumulate ? o[i] + v : v;
        }
    }
}

static void cpu_layernorm_back(float *dx, const float *x, const float *w, const float *dy, int rows, int dim,
                               float eps, int accumulate) {
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * dim, *g = dy + (size_t)r * dim;
        float *o = dx + (size_t)r * dim;
        double mean = 0, var = 0;
        for (int i = 0; i < dim; i++) mean += xr[i];
        mean /= dim;
        for (int i = 0; i < dim; i++) var += (xr[i] - mean) * (xr[i] - mean);
        var /= dim;
        double inv = 1.0 / sqrt(var + eps), mg = 0, mgx = 0;
        for (int i = 0; i < dim; i++) {
            double gw = (double)g[i] * w[i];
            mg += gw, mgx += gw * (xr[i] - mean) * inv;
        }
        float fi = (float)inv, fm = (float)mean, fmg = (float)(mg / dim), fmgx = (float)(mgx / dim);
        for (int i = 0; i < dim; i++) {
            float v = fi * (g[i] * w[i] - fmg - (xr[i] - fm) * fi * fmgx);
            o[i] = accumulate ? o[i] + v : v;
        }
    }
}

static void cpu_rope_back(float *x, int stride, const int *pos, const float *inv_freq, int rows, int n_heads,
                          int head_dim, int rot_dim) {
    int half = rot_dim / 2;
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < half; i++) {
            float angle = (float)pos[r] * inv_freq[i];  // the forward's fp32 angle
            float c = cosf(angle), s = sinf(angle);
            for (int h = 0; h < n_heads; h++) {
                float *xh = x + (size_t)r * stride + (size_t)h * head_dim;
                float a = xh[i], b = xh[i + half];
                xh[i] = a * c + b * s;
                xh[i + half] = b * c - a * s;
            }
        }
}

static void cpu_act_back(float *dx, const float *x, const float *dy, size_t n, act_kind act) {
    for (size_t i = 0; i < n; i++) dx[i] = dy[i] * act_grad_f(x[i], act);
}

static void cpu_glu_back(float *dgate, float *dup, const float *gate, const float *up, const float *dout, size_t n,
                         act_kind act) {
    for (size_t i = 0; i < n; i++) {
        float gt = gate[i], u = up[i], d = dout[i];
        dgate[i] = d * u * act_grad_f(gt, act);
        dup[i] = d * act_f(gt, act);
    }
}

static void cpu_softcap_back(float *dx, const float *y, const float *dy, size_t n, float cap) {
    float inv = 1.0f / cap;
    for (size_t i = 0; i < n; i++) {
        float t = y[i] * inv;
        dx[i] = dy[i] * (1.0f - t * t);
    }
}

// The attention backward and the edge scores: pool tasks per (sequence, KV head) and per (sequence, head).
// A (sequence, head) block is n_q queries x n_k = q_pos + n_q keys; scratch per worker: P, DL, G, M
// (block floats each), X (two blocks per donor), SEL (block bytes).
typedef struct {
    float *dq, *dk, *dv;
    float *const *donor_dk, *const *donor_dv;
    const float *q, *k, *v, *dout;
    int n_donors;
    const float *const *donor_k, *const *donor_v;
    const attn_seq *seqs;
    int n_seqs;
    const attn_params *p;
    const edge_rule_set *rules;  // NULL or empty: plain attention
    int donor_used[16];
    double *score;
    const float *k_base, *v_base;  // edge_scores: the current pass's differences from these (NULL: k, v)
    const edge_score_unit *units;
    int n_units;
    size_t max_block;
    float *scratch;
    signed char *sel;
} agrad_job;

static int agrad_patched(const agrad_job *j, const attn_seq *sq) { return j->rules && j->rules->n > 0 && sq->types; }

// Donor keys exist for the typed positions only (a donor cache holds the prompt): the donor products
// stop there.
static int agrad_donor_keys(const attn_seq *sq, int n_k) {
    return sq->n_typed <= 0 ? 0 : sq->n_typed < n_k ? sq->n_typed : n_k;
}

// P (probabilities), DL (dlogit: scale and softcap' included), SEL (edge code, EDGE_CLEAN current) of one
// (sequence, head), 0 where the query cannot see the key (or the edge is removed); G gets g = dout . v*
// of the value each edge read; X is scratch. The scores and dout . v products
// as matrix products against the current keys and values and each donor a rule reads, then the
// selection, softcap and softmax per edge (the forward's order of operations).
static void agrad_block(const agrad_job *j, const attn_seq *sq, int h, float *P, float *DL, signed char *SEL, float *G,
                        float *X) {
    const attn_params *p = j->p;
    int d = p->head_dim, g = h / (p->n_heads / p->n_kv_heads), n_q = sq->n_q, n_k = sq->q_pos + n_q;
    int patched = agrad_patched(j, sq), n_kd = patched ? agrad_donor_keys(sq, n_k) : 0;
    size_t blk = (size_t)n_q * n_k, off = (size_t)g * d;
    const float *qb = j->q + (size_t)sq->q_row * p->q_stride + (size_t)h * d;
    const float *ob = j->dout + (size_t)sq->q_row * p->q_stride + (size_t)h * d;
    cpu_sgemm(0, 1, n_q, n_k, d, p->scale, qb, p->q_stride, j->k + (size_t)sq->kv_row * p->kv_stride + off, p->kv_stride,
              0.0f, P, n_k);
    cpu_sgemm(0, 1, n_q, n_k, d, 1.0f, ob, p->q_stride, j->v + (size_t)sq->kv_row * p->kv_stride + off, p->kv_stride,
              0.0f, G, n_k);
    for (int dn = 0; dn < j->n_donors && patched && n_kd > 0; dn++)
        if (j->donor_used[dn]) {
            size_t drow = (size_t)sq->donor_row * p->kv_stride + off;
            cpu_sgemm(0, 1, n_q, n_kd, d, p->scale, qb, p->q_stride, j->donor_k[dn] + drow, p->kv_stride, 0.0f,
                      X + 2 * (size_t)dn * blk, n_k);
            cpu_sgemm(0, 1, n_q, n_kd, d, 1.0f, ob, p->q_stride, j->donor_v[dn] + drow, p->kv_stride, 0.0f,
                      X + (2 * (size_t)dn + 1) * blk, n_k);
        }
    for (int qi = 0; qi < n_q; qi++) {
        int i = sq->q_pos + qi, j0 = p->window > 0 && i - p->window + 1 > 0 ? i - p->window + 1 : 0;
        size_t r = (size_t)qi * n_k;
        float *pr = P + r, *dl = DL + r, *gb = G + r, mx = -INFINITY;
        signed char *sel = SEL + r;
        for (int a = 0; a < n_k; a++) sel[a] = EDGE_CLEAN;
        for (int a = j0; a <= i; a++) {
            int code = patched && i < sq->n_typed && a < sq->n_typed
                           ? edge_lookup(j->rules, h, sq->types[a], sq->index[a], sq->types[i], sq->index[i])
                           : EDGE_CLEAN;
            int kd = edge_key_donor(code), vd = edge_value_donor(code);
            float sc = pr[a];
            sel[a] = (signed char)code;
            if (kd >= 0) sc = X[2 * (size_t)kd * blk + r + a];
            if (vd >= 0) gb[a] = X[(2 * (size_t)vd + 1) * blk + r + a];
            if (p->softcap > 0) sc = p->softcap * tanhf(sc / p->softcap);
            dl[a] = p->softcap > 0 ? 1.0f - (sc / p->softcap) * (sc / p->softcap) : 1.0f;  // softcap' for now
            if (code == EDGE_REMOVED) sc = -INFINITY, dl[a] = 0;
            pr[a] = sc;
            if (sc > mx) mx = sc;
        }
        float sum = 0;
        for (int a = j0; a <= i; a++) sum += pr[a] = mx == -INFINITY ? 0.0f : expf(pr[a] - mx);
        float inv = sum > 0 ? 1.0f / sum : 0.0f, gsum = 0;  // every edge removed: p = dlogit = 0
        for (int a = j0; a <= i; a++) gsum += (pr[a] *= inv) * gb[a];
        for (int a = j0; a <= i; a++) dl[a] *= pr[a] * (gb[a] - gsum) * p->scale;
        for (int a = 0; a < j0; a++) pr[a] = dl[a] = 0;
        for (int a = i + 1; a < n_k; a++) pr[a] = dl[a] = 0;
    }
}

static float *agrad_scratch(const agrad_job *j, int worker, float **P, float **DL, float **G, float **M, float **X,
                            signed char **SEL) {
    size_t blk = j->max_block, per = (4 + 2 * (size_t)j->n_donors) * blk;
    float *s = j->scratch + per * (size_t)worker;
    *P = s, *DL = s + blk, *G = s + 2 * blk, *M = s + 3 * blk, *X = s + 4 * blk;
    *SEL = j->sel + blk * (size_t)worker;
    return s;
}

// M = where the edge's key (value: 1, its value) source is `source` (-1 current, else a donor), A, else 0.
static void agrad_mask(float *M, const float *A, const signed char *SEL, int source, int value, size_t n) {
    for (size_t e = 0; e < n; e++)
        M[e] = (value ? edge_value_donor(SEL[e]) : edge_key_donor(SEL[e])) == source ? A[e] : 0.0f;
}

static void agrad_task(void *ctx, int task, int worker) {
    const agrad_job *j = ctx;
    const attn_params *p = j->p;
    const attn_seq *sq = &j->seqs[task / p->n_kv_heads];
    int g = task % p->n_kv_heads, rep = p->n_heads / p->n_kv_heads, d = p->head_dim, n_q = sq->n_q;
    int n_k = sq->q_pos + n_q, patched = agrad_patched(j, sq), n_kd = patched ? agrad_donor_keys(sq, n_k) : 0;
    if (n_q <= 0) return;
    float *P, *DL, *G, *M, *X;
    signed char *SEL;
    agrad_scratch(j, worker, &P, &DL, &G, &M, &X, &SEL);
    size_t blk = (size_t)n_q * n_k, off = (size_t)g * d;
    const float *K = j->k + (size_t)sq->kv_row * p->kv_stride + off;
    float *dkb = j->dk + (size_t)sq->kv_row * p->kv_stride + off, *dvb = j->dv + (size_t)sq->kv_row * p->kv_stride + off;
    for (int h = g * rep; h < (g + 1) * rep; h++) {
        agrad_block(j, sq, h, P, DL, SEL, G, X);
        const float *qb = j->q + (size_t)sq->q_row * p->q_stride + (size_t)h * d;
        const float *ob = j->dout + (size_t)sq->q_row * p->q_stride + (size_t)h * d;
        float *dqb = j->dq + (size_t)sq->q_row * p->q_stride + (size_t)h * d;
        if (!patched) {
            cpu_sgemm(0, 0, n_q, d, n_k, 1.0f, DL, n_k, K, p->kv_stride, 0.0f, dqb, p->q_stride);
            cpu_sgemm(1, 0, n_k, d, n_q, 1.0f, DL, n_k, qb, p->q_stride, 1.0f, dkb, p->kv_stride);
            cpu_sgemm(1, 0, n_k, d, n_q, 1.0f, P, n_k, ob, p->q_stride, 1.0f, dvb, p->kv_stride);
            continue;
        }
        // Split by source: masked copies of DL and P, one source at a time.
        agrad_mask(M, DL, SEL, -1, 0, blk);
        cpu_sgemm(0, 0, n_q, d, n_k, 1.0f, M, n_k, K, p->kv_stride, 0.0f, dqb, p->q_stride);
        cpu_sgemm(1, 0, n_k, d, n_q, 1.0f, M, n_k, qb, p->q_stride, 1.0f, dkb, p->kv_stride);
        agrad_mask(M, P, SEL, -1, 1, blk);
        cpu_sgemm(1, 0, n_k, d, n_q, 1.0f, M, n_k, ob, p->q_stride, 1.0f, dvb, p->kv_stride);
        for (int dn = 0; dn < j->n_donors && n_kd > 0; dn++) {
            if (!j->donor_used[dn]) continue;
            size_t drow = (size_t)sq->donor_row * p->kv_stride + off;
            agrad_mask(M, DL, SEL, dn, 0, blk);
            cpu_sgemm(0, 0, n_q, d, n_kd, 1.0f, M, n_k, j->donor_k[dn] + drow, p->kv_stride, 1.0f, dqb, p->q_stride);
            if (j->donor_dk && j->donor_dk[dn])
                cpu_sgemm(1, 0, n_kd, d, n_q, 1.0f, M, n_k, qb, p->q_stride, 1.0f, j->donor_dk[dn] + drow, p->kv_stride);
            if (j->donor_dv && j->donor_dv[dn]) {
                agrad_mask(M, P, SEL, dn, 1, blk);
                cpu_sgemm(1, 0, n_kd, d, n_q, 1.0f, M, n_k, ob, p->q_stride, 1.0f, j->donor_dv[dn] + drow, p->kv_stride);
            }
        }
    }
}

static void agrad_run(agrad_job *j, int n_tasks, cpu_task_fn fn) {
    for (int r = 0; j->rules && r < j->rules->n; r++)
        if (j->rules->rule[r].source != EDGE_SRC_ZERO && j->rules->rule[r].donor >= 0 && j->rules->rule[r].donor < 16)
            j->donor_used[j->rules->rule[r].donor] = 1;
    if (j->n_donors > 16) j->n_donors = 16;
    j->max_block = max_attn_block(j->seqs, j->n_seqs);
    int slots = n_tasks < cpu_threads() ? n_tasks : cpu_threads();
    if (slots < 1) return;
    j->scratch = kernel_malloc(sizeof(float) * j->max_block * (4 + 2 * (size_t)j->n_donors) * (size_t)slots);
    j->sel = kernel_malloc(j->max_block * (size_t)slots);
    cpu_parallel_for(n_tasks, fn, j);
    free(j->scratch);
    free(j->sel);
}

static void cpu_attention_back(float *dq, float *dk, float *dv, const float *q, const float *k, const float *v,
                               const float *dout, int n_donors, const float *const *donor_k,
                               const float *const *donor_v, float *const *donor_dk, float *const *donor_dv,
                               const attn_seq *seqs, int n_seqs, const attn_params *p, const edge_rule_set *rules) {
    agrad_job j = {.dq = dq, .dk = dk, .dv = dv, .donor_dk = donor_dk, .donor_dv = donor_dv, .q = q, .k = k, .v = v,
                   .dout = dout, .n_donors = n_donors, .donor_k = donor_k, .donor_v = donor_v, .seqs = seqs,
                   .n_seqs = n_seqs, .p = p, .rules = rules};
    agrad_run(&j, n_seqs * p->n_kv_heads, agrad_task);
}

// One (sequence, head): the scores of the units on that head (each (unit, sequence) is one task's).
static void escore_task(void *ctx, int task, int worker) {
    const agrad_job *j = ctx;
    const attn_params *p = j->p;
    int s = task / p->n_heads, h = task % p->n_heads, d = p->head_dim, g = h / (p->n_heads / p->n_kv_heads);
    const attn_seq *sq = &j->seqs[s];
    int n_q = sq->n_q, n_k = sq->q_pos + n_q, any = 0;
    for (int u = 0; u < j->n_units; u++)
        if (j->units[u].head == h) j->score[(size_t)u * j->n_seqs + s] = 0, any = 1;
    if (!any || n_q <= 0 || !sq->types) return;
    float *P, *DL, *G, *M, *X;
    signed char *SEL;
    agrad_scratch(j, worker, &P, &DL, &G, &M, &X, &SEL);
    agrad_block(j, sq, h, P, DL, SEL, G, X);
    size_t off = (size_t)g * d;
    for (int u = 0; u < j->n_units; u++) {
        const edge_score_unit *eu = &j->units[u];
        if (eu->head != h) continue;
        double acc = 0;
        for (int qi = 0; qi < n_q; qi++) {
            int B = sq->q_pos + qi;
            if (B >= sq->n_typed || sq->types[B] != eu->receiver) continue;
            const float *qv = j->q + (size_t)(sq->q_row + qi) * p->q_stride + (size_t)h * d;
            const float *ov = j->dout + (size_t)(sq->q_row + qi) * p->q_stride + (size_t)h * d;
            double gs = 0;  // sum_A p g of the row, for a zeroing unit
            for (int A = 0; eu->source == EDGE_SRC_ZERO && A <= B; A++) gs += (double)P[(size_t)qi * n_k + A] * G[(size_t)qi * n_k + A];
            for (int A = 0; A <= B; A++) {
                size_t at = (size_t)qi * n_k + A;
                if (sq->types[A] != eu->sender || (P[at] == 0 && DL[at] == 0)) continue;
                if (eu->source == EDGE_SRC_ZERO) {
                    acc += (double)P[at] * (gs - G[at]);
                    continue;
                }
                int rk = edge_key_donor(SEL[at]), rv = edge_value_donor(SEL[at]);
                size_t cur = (size_t)(sq->kv_row + A) * p->kv_stride + off, drow = (size_t)(sq->donor_row + A) * p->kv_stride + off;
                // the differences: from the base where the edge reads the current pass
                const float *ks = rk >= 0 ? j->donor_k[rk] + drow : (j->k_base ? j->k_base : j->k) + cur,
                            *vs = rv >= 0 ? j->donor_v[rv] + drow : (j->v_base ? j->v_base : j->v) + cur;
                const float *kd = j->donor_k[eu->donor] + drow, *vd = j->donor_v[eu->donor] + drow;
                double ek = 0, ev = 0;
                for (int e = 0; e < d; e++) {
                    ek += (double)qv[e] * ((double)kd[e] - ks[e]);
                    ev += (double)ov[e] * ((double)vd[e] - vs[e]);
                }
                acc += (eu->source == EDGE_SRC_V ? 0 : DL[at] * ek) + (eu->source == EDGE_SRC_K ? 0 : P[at] * ev);
            }
        }
        j->score[(size_t)u * j->n_seqs + s] = acc;
    }
}

static void cpu_edge_scores(double *score, const float *q, const float *k, const float *v, const float *k_base,
                            const float *v_base, const float *dout,
                            int n_donors, const float *const *donor_k, const float *const *donor_v,
                            const attn_seq *seqs, int n_seqs, const attn_params *p, const edge_rule_set *rules,
                            const edge_score_unit *units, int n_units) {
    agrad_job j = {.q = q, .k = k, .v = v, .k_base = k_base, .v_base = v_base, .dout = dout, .n_donors = n_donors, .donor_k = donor_k,
                   .donor_v = donor_v, .seqs = seqs, .n_seqs = n_seqs, .p = p, .rules = rules, .score = score,
                   .units = units, .n_units = n_units};
    agrad_run(&j, n_seqs * p->n_heads, escore_task);
}

static const kernel_ops cpu_table = {
    .name = "cpu",
    .alloc = host_alloc,
    .release = host_release,
    .upload = host_copy,
    .download = host_copy,
    .sync = host_sync,
    .matmul = cpu_matmul,
    .matmul_bf16 = cpu_matmul_bf16,
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
    .copy_rows = cpu_copy_rows,
    .gather_rows = cpu_gather_rows,
    .linear_back = cpu_linear_back,
    .linear_back_bf16 = cpu_linear_back_bf16,
    .rmsnorm_back = cpu_rmsnorm_back,
    .layernorm_back = cpu_layernorm_back,
    .rope_back = cpu_rope_back,
    .act_back = cpu_act_back,
    .glu_back = cpu_glu_back,
    .softcap_back = cpu_softcap_back,
    .attention_back = cpu_attention_back,
    .head_scores = ops_host_head_scores,  // the ref loop: a double sum per unit and prompt, cheap beside the passes
    .edge_scores = cpu_edge_scores,
    .kl_div_rows = ops_host_kl_div_rows,
    .attention_row_stats = ops_host_attention_row_stats,
    .logit_metrics = ops_host_logit_metrics,
    .host_memory = 1,
};

const kernel_ops *kernel_ops_cpu(void) { return &cpu_table; }

#ifndef EP_HAVE_CUDA
const kernel_ops *kernel_ops_cuda(void) { return NULL; }
const char *kernel_ops_cuda_unusable(void) { return NULL; }
#endif
