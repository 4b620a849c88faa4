// ops_cuda: the CUDA backend of the kernel dispatch table (kernels/ops.h), fp32 activations.
//
// Matrix products go through cuBLAS sgemm with TF32 off (results are compared with the fp32 reference to
// 2e-5), or, for bf16 weights, cublasGemmEx on bf16 tensor cores with fp32 accumulation; every other op is a small kernel written for obvious correctness first: one block per row for
// the norms, one thread per element for the pointwise ops, one block per (query row, head) for
// attention. All tensor pointers are device memory (cudaMalloc, never managed memory); attention's
// sequence table and parameters are host memory and are uploaded per call.
//
// Errors: ops have no error return by contract, so every CUDA and cuBLAS call is checked and a failure
// prints "edgepatch: CUDA error <what> at file:line" and aborts (ops_fatal). kernel_ops_cuda() returns NULL,
// with no output, when no usable GPU is present (no driver, no device, or no kernel image for the
// device); kernel_ops_cuda_unusable() then says why a device that is present could not be used.
//
// Compiled by nvcc as C++; everything the rest of the program sees has C linkage.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "kernels/ops.h"
#include "kernels/ops_common.h"
#include "kernels/alloc.h"
}

// ---------------------------------------------------------------------------------------------------
// Error checks

// The ops return nothing (kernels/ops.h), so a failed CUDA call or an impossible launch ends the process:
// ops_fatal writes the last words (kernels/ops_common.h) and aborts.
static void cuda_check_at(cudaError_t e, const char *what, const char *file, int line) {
    if (e == cudaSuccess) return;
    ops_fatal("edgepatch: CUDA error %s: %s at %s:%d", what, cudaGetErrorString(e), file, line);
}

static void cublas_check_at(cublasStatus_t s, const char *what, const char *file, int line) {
    if (s == CUBLAS_STATUS_SUCCESS) return;
    ops_fatal("edgepatch: CUDA error %s: %s at %s:%d", what, cublasGetStatusString(s), file, line);
}

#define CUDA_CHECK(call) cuda_check_at((call), #call, __FILE__, __LINE__)
#define CUBLAS_CHECK(call) cublas_check_at((call), #call, __FILE__, __LINE__)
// After a kernel launch: catches a bad launch configuration (execution errors surface at the next sync).
#define LAUNCH_CHECK(kernel_name) cuda_check_at(cudaGetLastError(), "launching " kernel_name, __FILE__, __LINE__)

// ---------------------------------------------------------------------------------------------------
// The device context
//
// One cuBLAS handle and one stream for the whole process, created on the first kernel_ops_cuda() call
// and never destroyed (the driver reclaims them at exit). The project's no-global-state rule is about
// run state; this is the process's connection to the device, the same single thing cudart itself keeps
// per process, and the dispatch table's signatures have no context argument to carry it. It is set up
// once under pthread_once; after that it is only read, except attention's upload buffers, so the ops of
// this table are to be called from one host thread at a time (as the single stream orders them anyway).
//
// The stream is a blocking stream (cudaStreamCreate), so it is also ordered with the legacy default
// stream; upload and download still go through it explicitly and wait for it.

typedef struct {
    int usable;              // 1 after a successful init
    char unusable[256];      // why a present device is not usable ("" if none is present, or it is usable)
    cublasHandle_t blas;
    cudaStream_t stream;
    void *attn_rows;         // device buffer of attention row descriptors (int4), grown on demand
    size_t attn_rows_cap;    // in bytes
    void *patch_buf;         // device buffer of patched attention's rules, sequences, types (attn_patch)
    size_t patch_cap;        // in bytes
    void *bf16_x;            // device buffer of matmul_bf16's input rounded to bf16, grown on demand
    size_t bf16_x_cap;       // in bytes
} cuda_context;

static cuda_context ctx;
static pthread_once_t ctx_once = PTHREAD_ONCE_INIT;

// Threads per block for the row and attention kernels: a multiple of the warp size.
enum { ROW_THREADS = 256, ATTN_THREADS = 128, ATTN_CHUNK = 1024, POINTWISE_THREADS = 256 };

// ---------------------------------------------------------------------------------------------------
// Reductions (blockDim.x must be a multiple of 32, at most 1024)

__device__ static float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ static float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Every thread of the block must call these; all get the result. scratch holds 32 floats. The leading
// barrier keeps one call from overwriting scratch while threads still read the previous result.
__device__ static float block_sum(float v, float *scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float t = lane < n_warps ? scratch[lane] : 0.0f;
        t = warp_sum(t);
        if (lane == 0) scratch[0] = t;
    }
    __syncthreads();
    return scratch[0];
}

__device__ static float block_max(float v, float *scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float t = lane < n_warps ? scratch[lane] : -INFINITY;
        t = warp_max(t);
        if (lane == 0) scratch[0] = t;
    }
    __syncthreads();
    return scratch[0];
}

// ---------------------------------------------------------------------------------------------------
// Kernels

// out[r, o] += bias[o]
__global__ static void bias_add_kernel(float *out, const float *bias, int rows, int n_out) {
    size_t n = (size_t)rows * n_out;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += (size_t)gridDim.x * blockDim.x)
        out[idx] += bias[idx % (size_t)n_out];
}

// out[i] = x[i] rounded to bf16 (to nearest, ties to even)
__global__ static void to_bf16_kernel(__nv_bfloat16 *out, const float *x, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16_rn(x[i]);
}

// One block per row.
__global__ static void rmsnorm_kernel(float *out, const float *x, const float *w, float w_offset, int dim, float eps) {
    __shared__ float scratch[32];
    const float *xr = x + (size_t)blockIdx.x * dim;
    float *o = out + (size_t)blockIdx.x * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, scratch);
    float inv = 1.0f / sqrtf(ss / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = xr[i] * inv * (w_offset + w[i]);
}

// One block per row; two passes (mean, then variance about the mean) as the reference does.
__global__ static void layernorm_kernel(float *out, const float *x, const float *w, const float *b, int dim, float eps) {
    __shared__ float scratch[32];
    const float *xr = x + (size_t)blockIdx.x * dim;
    float *o = out + (size_t)blockIdx.x * dim;
    float s = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) s += xr[i];
    float mean = block_sum(s, scratch) / (float)dim;
    float sv = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) sv += (xr[i] - mean) * (xr[i] - mean);
    float var = block_sum(sv, scratch) / (float)dim;
    float inv = 1.0f / sqrtf(var + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = (xr[i] - mean) * inv * w[i] + b[i];
}

// One thread per (row, head, i < half): rotates the pair (i, i + half) of that head.
__global__ static void rope_kernel(float *x, int stride, const int *pos, const float *inv_freq, int rows, int n_heads,
                                   int head_dim, int half) {
    size_t n = (size_t)rows * n_heads * half;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += (size_t)gridDim.x * blockDim.x) {
        int i = (int)(idx % (size_t)half);
        size_t t = idx / (size_t)half;
        int h = (int)(t % (size_t)n_heads);
        int r = (int)(t / (size_t)n_heads);
        // The angle is rounded to fp32 before cos/sin, as HF computes it.
        float angle = (float)pos[r] * inv_freq[i];
        float s, c;
        sincosf(angle, &s, &c);
        float *xh = x + (size_t)r * stride + (size_t)h * head_dim;
        float a = xh[i], b = xh[i + half];
        xh[i] = a * c - b * s;
        xh[i + half] = b * c + a * s;
    }
}

__global__ static void glu_kernel(float *out, const float *gate, const float *up, size_t n, act_kind act) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = act_f(gate[i], act) * up[i];
}

__global__ static void act_kernel(float *x, size_t n, act_kind act) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] = act_f(x[i], act);
}

__global__ static void softcap_kernel(float *x, size_t n, float cap) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] = cap * tanhf(x[i] / cap);
}

__global__ static void add_kernel(float *y, const float *x, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] += x[i];
}

__global__ static void scale_kernel(float *y, size_t n, float s) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] *= s;
}

__global__ static void gather_rows_kernel(float *dst, const float *src, const int *idx, int n, int row_len) {
    size_t total = (size_t)n * row_len;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / (size_t)row_len, c = i % (size_t)row_len;
        dst[i] = idx[r] < 0 ? 0.0f : src[(size_t)idx[r] * row_len + c];
    }
}

// Edge patching for attention_kernel<true> (kernels/edge_rule.h). Everything but the donor pointers
// lives in one device buffer uploaded per call (cuda_patched_attention): the rule set, then one
// descriptor per sequence {donor_row, offset of its types in `ints`, n_typed (0 without types), 0}, then
// the sequences' types and indices (sequence s: types at ints[off ..], indices at ints[off + n_typed ..]).
// The donor pointer arrays travel by value in the kernel's parameters.
enum { ATTN_MAX_DONORS = 16 };

typedef struct {
    const edge_rule_set *rules;  // device
    const int4 *seqs;            // device, indexed by the row descriptor's w
    const int32_t *ints;         // device
    const float *donor_k[ATTN_MAX_DONORS], *donor_v[ATTN_MAX_DONORS];
} attn_patch;

// Which donor the edge sender j -> receiver i of query head h reads (-1: the current keys and values),
// as ref_patched_attention's kv_row decides it: positions at or beyond n_typed are untyped.
__device__ static int patch_source(const attn_patch &patch, int4 sd, int h, int i, int j) {
    const int32_t *types = patch.ints + sd.y, *index = types + sd.z;
    if (i < sd.z && j < sd.z) return edge_donor(patch.rules, h, types[j], index[j], types[i], index[i]);
    return -1;
}

// Attention: one block per (query row, head); blockIdx.x picks the row descriptor, blockIdx.y the head.
// A row descriptor is {q/out row, query position i, kv_row of its sequence, sequence index}. The query sees
// keys j0 .. i (j0 > 0 only with a window), taken in chunks of ATTN_CHUNK with an online softmax: per chunk the
// scores go to shared memory (one warp per key, lanes over head_dim), then the running max, sum and
// output accumulator are rescaled to the new max. The accumulator lives in shared memory, each thread
// owning the entries e = threadIdx.x, threadIdx.x + blockDim.x, ...
//
// PATCHED (patched attention): the warp that scores key j also picks the edge's source with
// patch_source and records it in s_src, so the value pass reads the same row: donor dn's row
// donor_row + j, or the current row kv_row + j. Plain attention (PATCHED false) ignores `patch`.
//
// Dynamic shared memory: q[d], acc[d], score[ATTN_CHUNK], and when PATCHED src[ATTN_CHUNK] (ints).
template <bool PATCHED>
__global__ static void attention_kernel(float *out, const float *q, const float *k, const float *v, const int4 *rows,
                                        int group, int d, int q_stride, int kv_stride, float scale, float softcap,
                                        int window, const attn_patch patch) {
    extern __shared__ float smem[];
    __shared__ float scratch[32];
    float *s_q = smem, *s_acc = smem + d, *s_score = smem + 2 * d;
    int *s_src = (int *)(smem + 2 * d + ATTN_CHUNK);  // used only when PATCHED
    int4 row = rows[blockIdx.x];
    int h = blockIdx.y, g = h / group;
    int i = row.y, kv_row = row.z;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    int4 sd = make_int4(0, 0, 0, 0);  // the sequence's patch descriptor
    if (PATCHED) sd = patch.seqs[row.w];
    int donor_row = sd.x;

    const float *qv = q + (size_t)row.x * q_stride + (size_t)h * d;
    for (int e = threadIdx.x; e < d; e += blockDim.x) {
        s_q[e] = qv[e];
        s_acc[e] = 0.0f;
    }
    __syncthreads();

    int j0 = window > 0 && i - window + 1 > 0 ? i - window + 1 : 0;
    float m = -INFINITY, l = 0.0f;  // running max and sum of exp(score - m); the same in every thread
    for (int c0 = j0; c0 <= i; c0 += ATTN_CHUNK) {
        int cn = i - c0 + 1 < ATTN_CHUNK ? i - c0 + 1 : ATTN_CHUNK;
        for (int jj = warp; jj < cn; jj += n_warps) {
            const float *kj = k + (size_t)(kv_row + c0 + jj) * kv_stride + (size_t)g * d;
            if (PATCHED) {
                int dn = patch_source(patch, sd, h, i, c0 + jj);
                if (dn >= 0) kj = patch.donor_k[dn] + (size_t)(donor_row + c0 + jj) * kv_stride + (size_t)g * d;
                if (lane == 0) s_src[jj] = dn;
            }
            float dot = 0.0f;
            for (int e = lane; e < d; e += 32) dot += s_q[e] * kj[e];
            dot = warp_sum(dot) * scale;
            if (softcap > 0.0f) dot = softcap * tanhf(dot / softcap);
            if (lane == 0) s_score[jj] = dot;
        }
        __syncthreads();
        float cmax = -INFINITY;
        for (int jj = threadIdx.x; jj < cn; jj += blockDim.x) cmax = fmaxf(cmax, s_score[jj]);
        cmax = block_max(cmax, scratch);  // its barriers also order the score writes before the reads below
        float m_new = fmaxf(m, cmax);
        float corr = expf(m - m_new);     // 0 on the first chunk (m = -inf)
        float csum = 0.0f;
        for (int jj = threadIdx.x; jj < cn; jj += blockDim.x) {
            float p = expf(s_score[jj] - m_new);
            s_score[jj] = p;
            csum += p;
        }
        csum = block_sum(csum, scratch);  // its barriers publish the exponentiated scores
        l = l * corr + csum;
        for (int e = threadIdx.x; e < d; e += blockDim.x) {
            float a = 0.0f;
            if (PATCHED) {
                for (int jj = 0; jj < cn; jj++) {
                    int dn = s_src[jj];
                    const float *vj = dn >= 0 ? patch.donor_v[dn] + (size_t)(donor_row + c0 + jj) * kv_stride
                                              : v + (size_t)(kv_row + c0 + jj) * kv_stride;
                    a += s_score[jj] * vj[(size_t)g * d + e];
                }
            } else {
                const float *ve = v + (size_t)(kv_row + c0) * kv_stride + (size_t)g * d + e;
                for (int jj = 0; jj < cn; jj++) a += s_score[jj] * ve[(size_t)jj * kv_stride];
            }
            s_acc[e] = s_acc[e] * corr + a;
        }
        m = m_new;
        __syncthreads();  // all reads of s_score (and s_src) done before the next chunk writes them
    }

    float *o = out + (size_t)row.x * q_stride + (size_t)h * d;
    float inv = 1.0f / l;
    for (int e = threadIdx.x; e < d; e += blockDim.x) o[e] = s_acc[e] * inv;
}

// ---------------------------------------------------------------------------------------------------
// Host-side packing of attention's per-call metadata (tools/cuda_emu runs these as they are)

// One descriptor per query row, flattened over the sequences so the grid needs no search:
// {q/out row, query position, kv_row, sequence index}. rows has room for every query row.
static void attn_rows_fill(int4 *rows, const attn_seq *seqs, int n_seqs) {
    size_t r = 0;
    for (int s = 0; s < n_seqs; s++)
        for (int qi = 0; qi < seqs[s].n_q; qi++, r++)
            rows[r] = make_int4(seqs[s].q_row + qi, seqs[s].q_pos + qi, seqs[s].kv_row, s);
}

// Where the parts of the patch buffer (see attn_patch) start, in bytes.
typedef struct {
    size_t off_seqs, off_ints, bytes, n_ints;
} attn_patch_layout;

static int attn_seq_typed(const attn_seq *sq) { return sq->types && sq->index && sq->n_typed > 0 ? sq->n_typed : 0; }

static attn_patch_layout attn_patch_plan(const attn_seq *seqs, int n_seqs) {
    attn_patch_layout lay;
    lay.n_ints = 0;
    for (int s = 0; s < n_seqs; s++) lay.n_ints += 2 * (size_t)attn_seq_typed(&seqs[s]);
    lay.off_seqs = (sizeof(edge_rule_set) + 15) / 16 * 16;
    lay.off_ints = lay.off_seqs + sizeof(int4) * (size_t)(n_seqs > 0 ? n_seqs : 0);
    lay.bytes = lay.off_ints + sizeof(int32_t) * lay.n_ints;
    return lay;
}

// Fills the host image of the patch buffer (lay.bytes).
static void attn_patch_fill(unsigned char *buf, const attn_patch_layout *lay, const edge_rule_set *rules,
                            const attn_seq *seqs, int n_seqs) {
    memcpy(buf, rules, sizeof(edge_rule_set));
    int4 *sd = (int4 *)(buf + lay->off_seqs);
    int32_t *ints = (int32_t *)(buf + lay->off_ints);
    size_t off = 0;
    for (int s = 0; s < n_seqs; s++) {
        int n = attn_seq_typed(&seqs[s]);
        sd[s] = make_int4(seqs[s].donor_row, (int)off, n, 0);
        if (n > 0) {
            memcpy(ints + off, seqs[s].types, sizeof(int32_t) * (size_t)n);
            memcpy(ints + off + n, seqs[s].index, sizeof(int32_t) * (size_t)n);
        }
        off += 2 * (size_t)n;
    }
}

// The kernel argument for a patch buffer at `dev` (n_donors <= ATTN_MAX_DONORS).
static attn_patch attn_patch_at(const unsigned char *dev, const attn_patch_layout *lay, int n_donors,
                                const float *const *donor_k, const float *const *donor_v) {
    attn_patch patch;
    memset(&patch, 0, sizeof patch);
    patch.rules = (const edge_rule_set *)dev;
    patch.seqs = (const int4 *)(dev + lay->off_seqs);
    patch.ints = (const int32_t *)(dev + lay->off_ints);
    for (int d = 0; d < n_donors; d++) {
        patch.donor_k[d] = donor_k[d];
        patch.donor_v[d] = donor_v[d];
    }
    return patch;
}

// ---------------------------------------------------------------------------------------------------
// Launch helpers

static unsigned pointwise_blocks(size_t n) {
    size_t b = (n + POINTWISE_THREADS - 1) / POINTWISE_THREADS;
    const size_t max_blocks = 65536;  // grid-stride loops cover the rest
    return (unsigned)(b < max_blocks ? b : max_blocks);
}

static size_t attention_smem_bytes(int d, bool patched) {
    return sizeof(float) * (2 * (size_t)d + ATTN_CHUNK) + (patched ? sizeof(int) * ATTN_CHUNK : 0);
}

// ---------------------------------------------------------------------------------------------------
// The table's functions

static void *cuda_alloc(size_t bytes) {
    void *p = NULL;
    CUDA_CHECK(cudaMalloc(&p, bytes));
    return p;
}

static void cuda_release(void *p) { CUDA_CHECK(cudaFree(p)); }

static void cuda_upload(void *dst, const void *host_src, size_t bytes) {
    CUDA_CHECK(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, ctx.stream));
    CUDA_CHECK(cudaStreamSynchronize(ctx.stream));  // the caller may reuse host_src at once
}

static void cuda_download(void *host_dst, const void *src, size_t bytes) {
    CUDA_CHECK(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, ctx.stream));
    CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
}

static void cuda_sync(void) { CUDA_CHECK(cudaStreamSynchronize(ctx.stream)); }

static void cuda_matmul(float *out, const float *x, const float *w, const float *bias, int rows, int n_in, int n_out) {
    if (rows <= 0 || n_out <= 0) return;
    // Row-major out[rows, n_out] = x[rows, n_in] . w[n_out, n_in]^T. Column-major cuBLAS sees each
    // row-major buffer as its transpose: out^T (n_out x rows, ld n_out) = w^T' . x^T', where the w buffer
    // read column-major is the n_in x n_out matrix w^T (so op = T gives w) and the x buffer read
    // column-major is the n_in x rows matrix x^T (op = N). Hence sgemm(T, N, m = n_out, n = rows, k = n_in).
    const float one = 1.0f, zero = 0.0f;
    CUBLAS_CHECK(cublasSgemm(ctx.blas, CUBLAS_OP_T, CUBLAS_OP_N, n_out, rows, n_in, &one, w, n_in, x, n_in, &zero, out,
                             n_out));
    if (bias) {
        bias_add_kernel<<<pointwise_blocks((size_t)rows * n_out), POINTWISE_THREADS, 0, ctx.stream>>>(out, bias, rows,
                                                                                                       n_out);
        LAUNCH_CHECK("bias_add_kernel");
    }
}

static void cuda_rmsnorm(float *out, const float *x, const float *w, float w_offset, int rows, int dim, float eps) {
    if (rows <= 0 || dim <= 0) return;
    rmsnorm_kernel<<<rows, ROW_THREADS, 0, ctx.stream>>>(out, x, w, w_offset, dim, eps);
    LAUNCH_CHECK("rmsnorm_kernel");
}

static void cuda_layernorm(float *out, const float *x, const float *w, const float *b, int rows, int dim, float eps) {
    if (rows <= 0 || dim <= 0) return;
    layernorm_kernel<<<rows, ROW_THREADS, 0, ctx.stream>>>(out, x, w, b, dim, eps);
    LAUNCH_CHECK("layernorm_kernel");
}

static void cuda_rope(float *x, int stride, const int *pos, const float *inv_freq, int rows, int n_heads, int head_dim,
                      int rot_dim) {
    int half = rot_dim / 2;
    size_t n = (size_t)(rows > 0 ? rows : 0) * (size_t)(n_heads > 0 ? n_heads : 0) * (size_t)(half > 0 ? half : 0);
    if (n == 0) return;
    rope_kernel<<<pointwise_blocks(n), POINTWISE_THREADS, 0, ctx.stream>>>(x, stride, pos, inv_freq, rows, n_heads,
                                                                           head_dim, half);
    LAUNCH_CHECK("rope_kernel");
}

static void cuda_glu(float *out, const float *gate, const float *up, size_t n, act_kind act) {
    if (n == 0) return;
    glu_kernel<<<pointwise_blocks(n), POINTWISE_THREADS, 0, ctx.stream>>>(out, gate, up, n, act);
    LAUNCH_CHECK("glu_kernel");
}

static void cuda_act(float *x, size_t n, act_kind act) {
    if (n == 0) return;
    act_kernel<<<pointwise_blocks(n), POINTWISE_THREADS, 0, ctx.stream>>>(x, n, act);
    LAUNCH_CHECK("act_kernel");
}

static void cuda_softcap(float *x, size_t n, float cap) {
    if (n == 0) return;
    softcap_kernel<<<pointwise_blocks(n), POINTWISE_THREADS, 0, ctx.stream>>>(x, n, cap);
    LAUNCH_CHECK("softcap_kernel");
}

static void cuda_add(float *y, const float *x, size_t n) {
    if (n == 0) return;
    add_kernel<<<pointwise_blocks(n), POINTWISE_THREADS, 0, ctx.stream>>>(y, x, n);
    LAUNCH_CHECK("add_kernel");
}

static void cuda_scale(float *y, size_t n, float s) {
    if (n == 0) return;
    scale_kernel<<<pointwise_blocks(n), POINTWISE_THREADS, 0, ctx.stream>>>(y, n, s);
    LAUNCH_CHECK("scale_kernel");
}

// Makes *buf a device buffer of at least `bytes`, growing it (to at least min_bytes) when it is smaller.
static void device_buffer_reserve(void **buf, size_t *cap, size_t bytes, size_t min_bytes) {
    if (bytes <= *cap) return;
    CUDA_CHECK(cudaStreamSynchronize(ctx.stream));  // earlier kernels may still read the old buffer
    CUDA_CHECK(cudaFree(*buf));
    *buf = NULL;
    size_t new_cap = bytes > min_bytes ? bytes : min_bytes;
    CUDA_CHECK(cudaMalloc(buf, new_cap));
    *cap = new_cap;
}

static void cuda_matmul_bf16(float *out, const float *x, const uint16_t *w, const float *bias, int rows, int n_in,
                             int n_out) {
    if (rows <= 0 || n_out <= 0) return;
    size_t nx = (size_t)rows * n_in;
    device_buffer_reserve(&ctx.bf16_x, &ctx.bf16_x_cap, sizeof(__nv_bfloat16) * nx, (size_t)1 << 20);
    __nv_bfloat16 *xb = (__nv_bfloat16 *)ctx.bf16_x;
    to_bf16_kernel<<<pointwise_blocks(nx), POINTWISE_THREADS, 0, ctx.stream>>>(xb, x, nx);
    LAUNCH_CHECK("to_bf16_kernel");
    // The layouts of cuda_matmul, with bf16 inputs, an fp32 output and fp32 accumulation.
    const float one = 1.0f, zero = 0.0f;
    CUBLAS_CHECK(cublasGemmEx(ctx.blas, CUBLAS_OP_T, CUBLAS_OP_N, n_out, rows, n_in, &one, w, CUDA_R_16BF, n_in, xb,
                              CUDA_R_16BF, n_in, &zero, out, CUDA_R_32F, n_out, CUBLAS_COMPUTE_32F,
                              CUBLAS_GEMM_DEFAULT));
    if (bias) {
        bias_add_kernel<<<pointwise_blocks((size_t)rows * n_out), POINTWISE_THREADS, 0, ctx.stream>>>(out, bias, rows,
                                                                                                       n_out);
        LAUNCH_CHECK("bias_add_kernel");
    }
}

// Plain (patch NULL) or patched attention: uploads one descriptor per query row and launches the kernel.
static void attention_launch(float *out, const float *q, const float *k, const float *v, const attn_seq *seqs,
                             int n_seqs, const attn_params *p, const attn_patch *patch) {
    size_t total_q = 0;
    for (int s = 0; s < n_seqs; s++) total_q += seqs[s].n_q > 0 ? (size_t)seqs[s].n_q : 0;
    if (total_q == 0 || p->n_heads <= 0) return;
    if (total_q > 0x7fffffffu || p->n_heads > 65535) {
        ops_fatal("edgepatch: CUDA error attention grid %zu rows x %d heads is too large at %s:%d", total_q,
                  p->n_heads, __FILE__, __LINE__);
    }
    size_t smem = attention_smem_bytes(p->head_dim, patch != NULL);
    if (smem > 48 * 1024) {  // head_dim above ~5000: far beyond any model this serves
        ops_fatal("edgepatch: CUDA error attention head_dim %d needs %zu bytes of shared memory at %s:%d",
                  p->head_dim, smem, __FILE__, __LINE__);
    }

    int4 *host_rows = (int4 *)kernel_malloc(sizeof(int4) * total_q);
    attn_rows_fill(host_rows, seqs, n_seqs);
    device_buffer_reserve(&ctx.attn_rows, &ctx.attn_rows_cap, sizeof(int4) * total_q, sizeof(int4) * 4096);
    // Stream-ordered after earlier kernels that read the buffer; a copy from pageable memory has taken
    // the source by the time it returns, so host_rows can be freed at once.
    CUDA_CHECK(cudaMemcpyAsync(ctx.attn_rows, host_rows, sizeof(int4) * total_q, cudaMemcpyHostToDevice, ctx.stream));
    free(host_rows);

    const int4 *rows = (const int4 *)ctx.attn_rows;
    dim3 grid((unsigned)total_q, (unsigned)p->n_heads);
    int group = p->n_heads / p->n_kv_heads;
    if (patch) {
        attention_kernel<true><<<grid, ATTN_THREADS, smem, ctx.stream>>>(out, q, k, v, rows, group,
                                                                         p->head_dim, p->q_stride, p->kv_stride,
                                                                         p->scale, p->softcap, p->window, *patch);
        LAUNCH_CHECK("attention_kernel<true>");
    } else {
        attn_patch none;
        memset(&none, 0, sizeof none);
        attention_kernel<false><<<grid, ATTN_THREADS, smem, ctx.stream>>>(out, q, k, v, rows, group,
                                                                          p->head_dim, p->q_stride, p->kv_stride,
                                                                          p->scale, p->softcap, p->window, none);
        LAUNCH_CHECK("attention_kernel<false>");
    }
}

static void cuda_attention(float *out, const float *q, const float *k, const float *v, const attn_seq *seqs, int n_seqs,
                           const attn_params *p) {
    attention_launch(out, q, k, v, seqs, n_seqs, p, NULL);
}

static void cuda_patched_attention(float *out, const float *q, const float *k, const float *v, int n_donors,
                                   const float *const *donor_k, const float *const *donor_v, const attn_seq *seqs,
                                   int n_seqs, const attn_params *p, const edge_rule_set *rules) {
    // No rule matches any edge: exactly plain attention (edge_donor returns -1 throughout).
    if (!rules || rules->n <= 0) {
        attention_launch(out, q, k, v, seqs, n_seqs, p, NULL);
        return;
    }
    if (n_donors < 0 || n_donors > ATTN_MAX_DONORS || rules->n > EDGE_MAX_RULES) {
        ops_fatal("edgepatch: CUDA error patched attention with %d donors (max %d), %d rules (max %d) at %s:%d",
                  n_donors, ATTN_MAX_DONORS, rules->n, EDGE_MAX_RULES, __FILE__, __LINE__);
    }
    for (int i = 0; i < rules->n; i++)
        if (rules->rule[i].donor >= n_donors) {
            ops_fatal("edgepatch: CUDA error patched attention rule %d reads donor %d of %d at %s:%d", i,
                      rules->rule[i].donor, n_donors, __FILE__, __LINE__);
        }

    attn_patch_layout lay = attn_patch_plan(seqs, n_seqs);
    if (lay.n_ints > 0x7fffffffu) {
        ops_fatal("edgepatch: CUDA error patched attention with %zu typed positions at %s:%d", lay.n_ints / 2,
                  __FILE__, __LINE__);
    }
    unsigned char *host = (unsigned char *)kernel_calloc(1, lay.bytes);
    attn_patch_fill(host, &lay, rules, seqs, n_seqs);
    device_buffer_reserve(&ctx.patch_buf, &ctx.patch_cap, lay.bytes, 64 * 1024);
    // Stream-ordered like the row descriptors; the host image can go at once.
    CUDA_CHECK(cudaMemcpyAsync(ctx.patch_buf, host, lay.bytes, cudaMemcpyHostToDevice, ctx.stream));
    free(host);
    attn_patch patch = attn_patch_at((const unsigned char *)ctx.patch_buf, &lay, n_donors, donor_k, donor_v);
    attention_launch(out, q, k, v, seqs, n_seqs, p, &patch);
}

static void cuda_copy_rows(float *dst, int dst_stride, const float *src, int src_stride, int rows, int row_len) {
    if (rows <= 0 || row_len <= 0) return;
    CUDA_CHECK(cudaMemcpy2DAsync(dst, sizeof(float) * (size_t)dst_stride, src, sizeof(float) * (size_t)src_stride,
                                 sizeof(float) * (size_t)row_len, (size_t)rows, cudaMemcpyDeviceToDevice, ctx.stream));
}

static void cuda_gather_rows(float *dst, const float *src, const int *idx, int n, int row_len) {
    size_t total = (size_t)(n > 0 ? n : 0) * (size_t)(row_len > 0 ? row_len : 0);
    if (total == 0) return;
    gather_rows_kernel<<<pointwise_blocks(total), POINTWISE_THREADS, 0, ctx.stream>>>(dst, src, idx, n, row_len);
    LAUNCH_CHECK("gather_rows_kernel");
}

static const kernel_ops cuda_table = {
    "cuda",        cuda_alloc, cuda_release, cuda_upload,  cuda_download, cuda_sync,  cuda_matmul, cuda_matmul_bf16,
    cuda_rmsnorm,  cuda_layernorm, cuda_rope, cuda_glu,     cuda_act,     cuda_softcap,  cuda_add,   cuda_scale,  cuda_attention,
    cuda_patched_attention, cuda_copy_rows, cuda_gather_rows, 0,
};

// ---------------------------------------------------------------------------------------------------
// Initialisation

static void cuda_init_once(void) {
    // With no driver cudaGetDeviceCount returns cudaErrorInsufficientDriver and leaves the count
    // unwritten, so it starts at 0.
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count <= 0) {
        (void)cudaGetLastError();  // clear the recorded error so no later check trips over it
        return;
    }
    // A device without a kernel image for this build (compute capability below the built targets) is
    // as good as none.
    cudaFuncAttributes attr;
    cudaError_t e = cudaFuncGetAttributes(&attr, attention_kernel<false>);
    if (e != cudaSuccess) {
        snprintf(ctx.unusable, sizeof ctx.unusable, "CUDA device present but unusable (%s)", cudaGetErrorString(e));
        (void)cudaGetLastError();
        return;
    }
    // Ranks on one node share its GPUs round-robin by local rank (as mpirun and srun set it), so that n
    // ranks on an n-GPU node use every GPU; EP_CUDA_DEVICE names one explicitly.
    const char *names[] = {"EP_CUDA_DEVICE", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "PMIX_LOCAL_RANK"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        const char *v = getenv(names[i]);
        if (v && *v) {
            CUDA_CHECK(cudaSetDevice(atoi(v) % count));
            break;
        }
    }
    cublasStatus_t bs = cublasCreate(&ctx.blas);
    if (bs != CUBLAS_STATUS_SUCCESS) {
        snprintf(ctx.unusable, sizeof ctx.unusable, "cuBLAS unusable (%s)", cublasGetStatusString(bs));
        return;
    }
    CUDA_CHECK(cudaStreamCreate(&ctx.stream));
    CUBLAS_CHECK(cublasSetStream(ctx.blas, ctx.stream));
    // Plain fp32 sgemm: no TF32 tensor cores (and no other reduced-precision shortcut).
    CUBLAS_CHECK(cublasSetMathMode(ctx.blas, CUBLAS_DEFAULT_MATH));
    ctx.usable = 1;
}

extern "C" const kernel_ops *kernel_ops_cuda(void) {
    if (pthread_once(&ctx_once, cuda_init_once) != 0) return NULL;
    return ctx.usable ? &cuda_table : NULL;
}

extern "C" const char *kernel_ops_cuda_unusable(void) {
    if (pthread_once(&ctx_once, cuda_init_once) != 0) return NULL;
    return ctx.unusable[0] ? ctx.unusable : NULL;
}
