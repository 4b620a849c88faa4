// ops_cuda: the CUDA backend of the kernel dispatch table (kernels/ops.h), fp32 activations.
//
// Matrix products go through cuBLAS sgemm with TF32 off (results are compared with the fp32 reference to
// 2e-5), or, for bf16 weights, cublasGemmEx on bf16 tensor cores with fp32 accumulation; every other op is a small kernel written for obvious correctness first: one block per row for
// the norms, one thread per element for the pointwise ops, one block per (query row, head) for
// attention. All tensor pointers are device memory (the stream-ordered pool or cudaMalloc, never managed memory); attention's
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
#include <mma.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "kernels/ops.h"
#include "kernels/ops_common.h"
#include "kernels/alloc.h"
}

using namespace nvcuda;  // wmma (tools/cuda_emu has its own)

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
    void *attn_rows;         // device buffer of attention's attn_tile items (and combine items), grown on demand
    size_t attn_rows_cap;    // in bytes
    void *attn_map;          // device buffer of patched attention's tile map (attn_tile_map_kernel)
    size_t attn_map_cap;     // in bytes
    void *attn_partial;      // device buffer of split-K partial results
    size_t attn_partial_cap; // in bytes
    int attn_smem_max;       // the device's shared memory per block (opt-in), bytes
    int pool;                // 1: alloc/release are stream-ordered (cudaMallocAsync/cudaFreeAsync on `stream`
                             // from the device's default pool); 0: cudaMalloc/cudaFree (EP_CUDA_POOL=0)
    cudaMemPool_t mem_pool;  // that pool (when pool is 1)
    void *patch_buf;         // device buffer of patched attention's rules, sequences, types (attn_patch)
    size_t patch_cap;        // in bytes
    void *bf16_x;            // device buffer of matmul_bf16's input rounded to bf16, grown on demand
    size_t bf16_x_cap;       // in bytes
    void *bf16_w;            // device buffer of linear_back_bf16's widened weight rows, grown on demand
    size_t bf16_w_cap;       // in bytes
    void *grad_meta;         // device buffer of the gradient kernels' metadata (grad_meta_fill)
    size_t grad_meta_cap;    // in bytes
    void *grad_stats;        // device buffer of the attention backward's softmax statistics
    size_t grad_stats_cap;   // in bytes
    void *metrics_buf;       // device buffer of logit_metrics' tokens and results, grown on demand
    size_t metrics_cap;      // in bytes
} cuda_context;

static cuda_context ctx;
static pthread_once_t ctx_once = PTHREAD_ONCE_INIT;

// Threads per block for the row and attention kernels: a multiple of the warp size.
enum { ROW_THREADS = 256, ATTN_THREADS = 128, POINTWISE_THREADS = 256 };

// ---------------------------------------------------------------------------------------------------
// Reductions (blockDim.x must be a multiple of 32, at most 1024)

// float and double (the score reductions accumulate in double).
template <typename T> __device__ static T warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ static float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Every thread of the block must call these; all get the result. scratch holds 32 values of T. The
// leading barrier keeps one call from overwriting scratch while threads still read the previous result.
template <typename T> __device__ static T block_sum(T v, T *scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        T t = lane < n_warps ? scratch[lane] : T(0);
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

// The edge code (kernels/edge_rule.h) of sender j -> receiver i of query head h (EDGE_CLEAN: the current
// keys and values), as ref_patched_attention's ref_source decides it: positions at or beyond n_typed are
// untyped. edge_key_donor / edge_value_donor take it apart; EDGE_REMOVED: the edge is not in the softmax.
__device__ static int patch_source(const attn_patch &patch, int4 sd, int h, int i, int j) {
    const int32_t *types = patch.ints + sd.y, *index = types + sd.z;
    if (i < sd.z && j < sd.z) return edge_lookup(patch.rules, h, types[j], index[j], types[i], index[i]);
    return EDGE_CLEAN;
}

// Attention: a FlashAttention-2-style forward on tensor cores (docs/cuda.md, "Attention").
//
// Work is cut into query tiles. A sequence's query rows are flattened with the query heads of one KV head
// g: tile row r of the sequence is (query position q_pos + r / group, head g * group + r % group), so the
// heads of a GQA group share every K/V tile they read. A tile has ATTN_TILE_Q rows (the last one of a
// sequence fewer); its keys are the union of what its rows see (causal, window), cut into key tiles of
// ATTN_TILE_K positions. One block per attn_tile item (a query tile, a KV head and a key range), four
// warps, warp w owning tile rows 16w .. 16w + 15. Per key tile: K staged in shared memory, S = Q K^T on
// tensor cores, the online softmax in fp32 per row (scale, softcap, causal/window mask), V staged, O +=
// P V on tensor cores; O (unnormalized) and Q live in shared memory, each row's running max and sum in
// the registers of the two lanes that own the row.
//
// Precision: wmma tf32 fragments (m16n16k8) with fp32 accumulation, split three ways (3xTF32: x = big +
// small, both tf32; big*big + big*small + small*big), which keeps about 22 of fp32's 24 bits: one pass of
// tf32 misses test_ops' 2e-5 by far (tools/cuda_emu measures both). Attention is fp32 in fp32 and bf16
// runs alike (docs/cuda.md, "bf16 runs"), so there is one instantiation for both.
//
// Split-K (decoding): a sequence whose rows fit one query tile and whose keys are longer than
// ATTN_SPLIT_KEYS has its key range cut into chunks of ATTN_SPLIT_KEYS keys, one item each; an item with
// split >= 0 writes its unnormalized O, max and sum to the partial buffer instead of out, and
// attn_split_combine_kernel merges the chunks in a fixed order. Whether a sequence is split depends on its
// own shape only (n_q, group, keys), never on the batch or the device.
//
// PATCHED: the edge rules were turned into a tile map before the launch (attn_tile_map_kernel, once per
// call, i.e. per layer): per key tile of an item one int4 {code, key sources, value sources, 0} where
// code is the edge code shared by every visible edge of the tile (kernels/edge_rule.h: EDGE_CLEAN,
// EDGE_REMOVED or a donor code) or ATTN_TILE_MIXED, and the source masks have bit 0 for the current pass
// and bit 1 + d for donor d. The kernel reads each key source's tile once and computes S from it (a mixed
// tile takes each element from the source its code names, codes[r * ATTN_TILE_K + c] from the map), and
// adds P V per value source (a mixed tile's P masked to the elements reading that source). A uniform
// EDGE_REMOVED tile is skipped; a removed element of a mixed tile scores -inf; a row with nothing left
// outputs 0. No edge_lookup runs in this kernel.
enum {
    ATTN_TILE_Q = 64,
    ATTN_TILE_K = 32,
    ATTN_TILE_THREADS = 128,  // 4 warps x 16 rows
    ATTN_MAP_THREADS = 128,
    ATTN_SPLIT_KEYS = 512,    // keys per split-K chunk (a multiple of ATTN_TILE_K)
    ATTN_TILE_MIXED = -3      // tile map code: the tile's edges do not share one code
};

// One block's work. Rows row0 .. row0 + n_rows - 1 of sequence seq's flattened rows for KV head kv_head,
// keys key_lo .. key_hi - 1; map_off: its first key tile in the tile map; split: -1 (write out) or its
// partial slot; n_split: in a combine item, the number of chunks (slots split .. split + n_split - 1).
typedef struct {
    int seq, kv_head, row0, n_rows, key_lo, key_hi, map_off, split, n_split, q_row, q_pos, kv_row;
} attn_tile;

typedef wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> attn_frag_a;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> attn_frag_bt;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> attn_frag_b;
typedef wmma::fragment<wmma::accumulator, 16, 16, 8, float> attn_frag_acc;

// x (loaded) -> big + small, both tf32 (small = the rounding error of big, itself rounded).
template <typename F> __device__ static void tf32_split(F &big, F &small, const F &x) {
    for (int t = 0; t < x.num_elements; t++) {
        float b = wmma::__float_to_tf32(x.x[t]);
        big.x[t] = b;
        small.x[t] = wmma::__float_to_tf32(x.x[t] - b);
    }
}

// acc += a b, 3xTF32 (X3) or one tf32 pass (tools/cuda_emu's precision measurement only).
template <bool X3, typename FA, typename FB>
__device__ static void tf32_mma(attn_frag_acc &acc, const FA &a_big, const FA &a_small, const FB &b_big,
                                const FB &b_small) {
    if (X3) {
        wmma::mma_sync(acc, a_small, b_big, acc);
        wmma::mma_sync(acc, a_big, b_small, acc);
    }
    wmma::mma_sync(acc, a_big, b_big, acc);
}

// Shared memory of attention_tile_kernel, in floats: Q, O (ATTN_TILE_Q x ld), one K/V tile (ATTN_TILE_K x
// ld), S and a scratch tile (ATTN_TILE_Q x (ATTN_TILE_K + 4)); ld = head_dim rounded up to 16, + 4.
__host__ __device__ static int attn_tile_ld(int d) { return (d + 15) / 16 * 16 + 4; }
__host__ __device__ static size_t attn_tile_smem_floats(int d) {
    return (size_t)attn_tile_ld(d) * (2 * ATTN_TILE_Q + ATTN_TILE_K) + 2 * (size_t)ATTN_TILE_Q * (ATTN_TILE_K + 4);
}

// The K or V tile of key positions j0 .. j0 + nk - 1 from source src (0: the current pass, 1 + d: donor d)
// into s_kv, zero beyond nk rows and head_dim columns (zeros, never garbage: 0 * NaN would be NaN).
template <bool PATCHED>
__device__ static void attn_stage_kv(float *s_kv, int ld, int dp, const float *cur, const float *const *donor, int src,
                                     int row_cur, int row_donor, int j0, int nk, int kv_stride, int g, int d) {
    const float *base = !PATCHED || src == 0 ? cur + (size_t)(row_cur + j0) * kv_stride
                                             : donor[src - 1] + (size_t)(row_donor + j0) * kv_stride;
    base += (size_t)g * d;
    for (int idx = threadIdx.x; idx < ATTN_TILE_K * dp; idx += blockDim.x) {
        int c = idx / dp, e = idx - c * dp;
        s_kv[c * ld + e] = c < nk && e < d ? base[(size_t)c * kv_stride + e] : 0.0f;
    }
}

// Where flattened row fr of item t (query position q_pos + fr / group, head kv_head * group + fr % group)
// starts in q and out.
__device__ static size_t attn_tile_row(const attn_tile &t, int fr, int group, int d, int q_stride) {
    return (size_t)(t.q_row + fr / group) * q_stride + (size_t)(t.kv_head * group + fr % group) * d;
}

template <bool PATCHED, bool X3>
__global__ static void attention_tile_kernel(float *out, float *partial, const float *q, const float *k,
                                             const float *v, const attn_tile *tiles, int group, int d, int q_stride,
                                             int kv_stride, float scale, float softcap, int window,
                                             const attn_patch patch, const int4 *map_info,
                                             const signed char *map_codes) {
    extern __shared__ __align__(128) float attn_smem[];
    const attn_tile t = tiles[blockIdx.x];
    const int ld = attn_tile_ld(d), dp = ld - 4, lds = ATTN_TILE_K + 4;
    float *s_q = attn_smem, *s_o = s_q + ATTN_TILE_Q * ld, *s_kv = s_o + ATTN_TILE_Q * ld;
    float *s_s = s_kv + ATTN_TILE_K * ld, *s_t = s_s + ATTN_TILE_Q * lds;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = t.kv_head;
    int donor_row = 0;
    if (PATCHED) donor_row = patch.seqs[t.seq].x;

    for (int idx = threadIdx.x; idx < ATTN_TILE_Q * dp; idx += blockDim.x) {
        int r = idx / dp, e = idx - r * dp, fr = t.row0 + r;
        float x = 0.0f;
        if (r < t.n_rows && e < d)
            x = q[attn_tile_row(t, fr, group, d, q_stride) + e];
        s_q[r * ld + e] = x;
        s_o[r * ld + e] = 0.0f;
    }
    __syncthreads();  // Q and O written before any warp reads them (even when every key tile is skipped)

    // The row this lane works on in the softmax and the epilogue (two lanes per row, half the columns each).
    const int rr = warp * 16 + (lane >> 1), half = lane & 1;
    const int pos = t.q_pos + (t.row0 + rr) / group;  // its query position
    const bool row_ok = rr < t.n_rows;
    float m = -INFINITY, l = 0.0f;  // running max and sum of exp(s - m) of row rr (both lanes)
    float *wq = s_q + warp * 16 * ld, *wo = s_o + warp * 16 * ld, *ws = s_s + warp * 16 * lds, *wt = s_t + warp * 16 * lds;

    const int n_kt = (t.key_hi - t.key_lo + ATTN_TILE_K - 1) / ATTN_TILE_K;
    for (int kt = 0; kt < n_kt; kt++) {
        const int j0 = t.key_lo + kt * ATTN_TILE_K;
        const int nk = t.key_hi - j0 < ATTN_TILE_K ? t.key_hi - j0 : ATTN_TILE_K;
        int code = EDGE_CLEAN, kmask = 1, vmask = 1;
        const signed char *codes = NULL;
        if (PATCHED) {
            int4 info = map_info[t.map_off + kt];  // the same for the whole block: no divergent barriers
            code = info.x, kmask = info.y, vmask = info.z;
            if (code == EDGE_REMOVED) continue;  // every visible edge of the tile removed
            if (code == ATTN_TILE_MIXED) codes = map_codes + (size_t)(t.map_off + kt) * ATTN_TILE_Q * ATTN_TILE_K;
        }
        const bool mixed = PATCHED && codes != NULL;

        // S = Q K^T, once per key source; a mixed tile keeps each element from the source its code names
        for (int src = 0; src <= ATTN_MAX_DONORS; src++) {
            if (!((kmask >> src) & 1)) continue;
            __syncthreads();  // the previous readers of s_kv are done
            attn_stage_kv<PATCHED>(s_kv, ld, dp, k, patch.donor_k, src, t.kv_row, donor_row, j0, nk, kv_stride, g, d);
            __syncthreads();
            attn_frag_acc acc[ATTN_TILE_K / 16];
            for (int n = 0; n < ATTN_TILE_K / 16; n++) wmma::fill_fragment(acc[n], 0.0f);
            for (int kk = 0; kk < dp; kk += 8) {
                attn_frag_a a, ab, as;
                wmma::load_matrix_sync(a, wq + kk, ld);
                tf32_split(ab, as, a);
                for (int n = 0; n < ATTN_TILE_K / 16; n++) {
                    attn_frag_bt b, bb, bs;
                    wmma::load_matrix_sync(b, s_kv + n * 16 * ld + kk, ld);
                    tf32_split(bb, bs, b);
                    tf32_mma<X3>(acc[n], ab, as, bb, bs);
                }
            }
            for (int n = 0; n < ATTN_TILE_K / 16; n++)
                wmma::store_matrix_sync((mixed ? wt : ws) + n * 16, acc[n], lds, wmma::mem_row_major);
            if (mixed) {
                __syncwarp();
                for (int idx = lane; idx < 16 * ATTN_TILE_K; idx += 32) {
                    int r = idx / ATTN_TILE_K, c = idx - r * ATTN_TILE_K;
                    int cd = codes[(warp * 16 + r) * ATTN_TILE_K + c];
                    if (cd != EDGE_REMOVED && edge_key_donor(cd) + 1 == src) ws[r * lds + c] = wt[r * lds + c];
                }
            }
        }
        __syncwarp();

        // online softmax of row rr over this tile's columns half * 16 .. + 15
        float sv[16], mx = -INFINITY;
        for (int c = 0; c < 16; c++) {
            int cc = half * 16 + c, j = j0 + cc;
            bool vis = row_ok && cc < nk && j <= pos && (window <= 0 || pos - j < window);
            if (mixed && vis && codes[rr * ATTN_TILE_K + cc] == EDGE_REMOVED) vis = false;
            float s = ws[(lane >> 1) * lds + cc] * scale;
            if (softcap > 0.0f) s = softcap * tanhf(s / softcap);
            sv[c] = vis ? s : -INFINITY;
            mx = fmaxf(mx, sv[c]);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        float m_new = fmaxf(m, mx);
        // 0 on the first visible tile (m = -inf); 1 while every edge so far is removed (m = m_new = -inf)
        float corr = m_new == -INFINITY ? 1.0f : expf(m - m_new), sum = 0.0f;
        for (int c = 0; c < 16; c++) {
            float p = m_new == -INFINITY ? 0.0f : expf(sv[c] - m_new);
            ws[(lane >> 1) * lds + half * 16 + c] = p;
            sum += p;
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        l = l * corr + sum;
        m = m_new;
        for (int e = half * (dp / 2); e < (half + 1) * (dp / 2); e++) wo[(lane >> 1) * ld + e] *= corr;

        // O += P V, once per value source (a mixed tile's P masked to the elements reading it)
        for (int src = 0; src <= ATTN_MAX_DONORS; src++) {
            if (!((vmask >> src) & 1)) continue;
            __syncthreads();  // s_kv's readers done; every warp's P and rescaled O written
            attn_stage_kv<PATCHED>(s_kv, ld, dp, v, patch.donor_v, src, t.kv_row, donor_row, j0, nk, kv_stride, g, d);
            if (mixed)
                for (int idx = lane; idx < 16 * ATTN_TILE_K; idx += 32) {
                    int r = idx / ATTN_TILE_K, c = idx - r * ATTN_TILE_K;
                    int cd = codes[(warp * 16 + r) * ATTN_TILE_K + c];
                    wt[r * lds + c] = cd != EDGE_REMOVED && edge_value_donor(cd) + 1 == src ? ws[r * lds + c] : 0.0f;
                }
            __syncthreads();
            const float *wp = mixed ? wt : ws;
            attn_frag_a pb[ATTN_TILE_K / 8], ps[ATTN_TILE_K / 8];
            for (int kk = 0; kk < ATTN_TILE_K / 8; kk++) {
                attn_frag_a a;
                wmma::load_matrix_sync(a, wp + kk * 8, lds);
                tf32_split(pb[kk], ps[kk], a);
            }
            for (int n = 0; n < dp; n += 16) {
                attn_frag_acc acc;
                wmma::load_matrix_sync(acc, wo + n, ld, wmma::mem_row_major);
                for (int kk = 0; kk < ATTN_TILE_K / 8; kk++) {
                    attn_frag_b b, bb, bs;
                    wmma::load_matrix_sync(b, s_kv + kk * 8 * ld + n, ld);
                    tf32_split(bb, bs, b);
                    tf32_mma<X3>(acc, pb[kk], ps[kk], bb, bs);
                }
                wmma::store_matrix_sync(wo + n, acc, ld, wmma::mem_row_major);
            }
            __syncwarp();
        }
    }
    __syncwarp();

    if (!row_ok) return;
    const int fr = t.row0 + rr;
    const int e0 = half * (dp / 2), e1 = (half + 1) * (dp / 2) < d ? (half + 1) * (dp / 2) : d;
    if (t.split < 0) {
        float *o = out + attn_tile_row(t, fr, group, d, q_stride);
        float inv = l > 0.0f ? 1.0f / l : 0.0f;  // every edge removed: 0
        for (int e = e0; e < e1; e++) o[e] = wo[(lane >> 1) * ld + e] * inv;
    } else {
        float *o = partial + ((size_t)t.split * ATTN_TILE_Q + rr) * (size_t)(d + 2);
        for (int e = e0; e < e1; e++) o[e] = wo[(lane >> 1) * ld + e];
        if (half == 0) o[d] = m, o[d + 1] = l;
    }
}

// Split-K: one block per combine item (a query tile whose key range was cut into n_split chunks), threads over
// (row, column): the chunks' partial {O, max, sum} merged to the common max, in chunk order.
__global__ static void attn_split_combine_kernel(float *out, const float *partial, const attn_tile *items, int group,
                                                 int d, int q_stride) {
    const attn_tile t = items[blockIdx.x];
    for (int idx = threadIdx.x; idx < t.n_rows * d; idx += blockDim.x) {
        int r = idx / d, e = idx - r * d, fr = t.row0 + r;
        float mx = -INFINITY;
        for (int s = 0; s < t.n_split; s++)
            mx = fmaxf(mx, partial[((size_t)(t.split + s) * ATTN_TILE_Q + r) * (size_t)(d + 2) + d]);
        float sum = 0.0f, acc = 0.0f;
        if (mx > -INFINITY)
            for (int s = 0; s < t.n_split; s++) {
                const float *p = partial + ((size_t)(t.split + s) * ATTN_TILE_Q + r) * (size_t)(d + 2);
                if (p[d] == -INFINITY) continue;  // a chunk with nothing visible (or every edge removed)
                float w = expf(p[d] - mx);
                sum += p[d + 1] * w;
                acc += p[e] * w;
            }
        out[attn_tile_row(t, fr, group, d, q_stride) + e] =
            sum > 0.0f ? acc / sum : 0.0f;
    }
}

template <typename T> __device__ static T warp_reduce_int(T v, int op) {  // op 0: min, 1: max, 2: or
    for (int o = 16; o > 0; o >>= 1) {
        T w = __shfl_xor_sync(0xffffffffu, v, o);
        v = op == 0 ? (w < v ? w : v) : op == 1 ? (w > v ? w : v) : (v | w);
    }
    return v;
}

// The tile map of patched attention: one block per map tile (an item's key tile, found by binary search over
// the items' map_off), one edge code per (tile row, key) from patch_source (the visible edges; others
// EDGE_CLEAN, never read), then the tile's summary {the shared code or ATTN_TILE_MIXED, key source mask,
// value source mask, 0} over its visible edges (a tile with none: {EDGE_CLEAN, 0, 0}).
__global__ static void attn_tile_map_kernel(int4 *info, signed char *codes, const attn_tile *tiles, int n_items,
                                            int group, int window, const attn_patch patch) {
    __shared__ int red[4][32];
    int lo = 0, hi = n_items - 1;
    while (lo < hi) {  // the last item with map_off <= blockIdx.x
        int mid = (lo + hi + 1) / 2;
        if (tiles[mid].map_off <= (int)blockIdx.x) lo = mid;
        else hi = mid - 1;
    }
    const attn_tile t = tiles[lo];
    const int kt = (int)blockIdx.x - t.map_off, j0 = t.key_lo + kt * ATTN_TILE_K;
    const int4 sd = patch.seqs[t.seq];
    signed char *tc = codes + (size_t)blockIdx.x * ATTN_TILE_Q * ATTN_TILE_K;
    int cmin = 0x7fffffff, cmax = -0x7fffffff, kmask = 0, vmask = 0;
    for (int idx = threadIdx.x; idx < ATTN_TILE_Q * ATTN_TILE_K; idx += blockDim.x) {
        int r = idx / ATTN_TILE_K, c = idx - r * ATTN_TILE_K, fr = t.row0 + r, j = j0 + c;
        int i = t.q_pos + fr / group, h = t.kv_head * group + fr % group;
        bool vis = r < t.n_rows && j < t.key_hi && j <= i && (window <= 0 || i - j < window);
        int code = vis ? patch_source(patch, sd, h, i, j) : EDGE_CLEAN;
        tc[idx] = (signed char)code;
        if (!vis) continue;
        cmin = code < cmin ? code : cmin, cmax = code > cmax ? code : cmax;
        if (code != EDGE_REMOVED) kmask |= 1 << (edge_key_donor(code) + 1), vmask |= 1 << (edge_value_donor(code) + 1);
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    cmin = warp_reduce_int(cmin, 0), cmax = warp_reduce_int(cmax, 1);
    kmask = warp_reduce_int(kmask, 2), vmask = warp_reduce_int(vmask, 2);
    if (lane == 0) red[0][warp] = cmin, red[1][warp] = cmax, red[2][warp] = kmask, red[3][warp] = vmask;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); w++) {
            cmin = red[0][w] < cmin ? red[0][w] : cmin, cmax = red[1][w] > cmax ? red[1][w] : cmax;
            kmask |= red[2][w], vmask |= red[3][w];
        }
        int code = cmin > cmax ? EDGE_CLEAN : cmin == cmax ? cmin : ATTN_TILE_MIXED;
        info[blockIdx.x] = make_int4(code, kmask, vmask, 0);
    }
}
// ---------------------------------------------------------------------------------------------------
// Gradient kernels (kernels/ops.h, the gradient ops): as simple as the forward's, one block per row for
// the norms, one thread per element for the pointwise ops; the attention backward in two kernels
// without atomics (so its sums are in a fixed order): one block per (query row, head) for the softmax
// statistics and dq, then one block per (key position, KV head) that gathers dk and dv over the queries
// and query heads that read that key, source by source (current pass, each donor).

// head_dim limit of the attention gradient kernels: each lane keeps head_dim / 32 accumulators.
enum { GRAD_MAX_HD = 256, GRAD_LANE_SLOTS = GRAD_MAX_HD / 32, GRAD_WARPS = ATTN_THREADS / 32 };


// a . b over d floats by one warp; every lane gets the sum.
__device__ static float warp_dot(const float *a, const float *b, int d) {
    float s = 0.0f;
    for (int e = threadIdx.x & 31; e < d; e += 32) s += a[e] * b[e];
    return warp_sum(s);
}

__global__ static void bf16_widen_kernel(float *out, const uint16_t *w, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __uint_as_float((unsigned)w[i] << 16);
}

// One block per row.
__global__ static void rmsnorm_back_kernel(float *dx, const float *x, const float *w, float w_offset, const float *dy,
                                           int dim, float eps, int accumulate) {
    __shared__ float scratch[32];
    const float *xr = x + (size_t)blockIdx.x * dim, *g = dy + (size_t)blockIdx.x * dim;
    float *o = dx + (size_t)blockIdx.x * dim;
    float ss = 0.0f, dot = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        ss += xr[i] * xr[i];
        dot += g[i] * (w_offset + w[i]) * xr[i];
    }
    ss = block_sum(ss, scratch);
    dot = block_sum(dot, scratch);
    float inv = 1.0f / sqrtf(ss / (float)dim + eps), c = dot / (float)dim * inv * inv * inv;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = inv * g[i] * (w_offset + w[i]) - xr[i] * c;
        o[i] = accumulate ? o[i] + v : v;
    }
}

// One block per row: mean and variance as the forward, then mean(g) and mean(g x^).
__global__ static void layernorm_back_kernel(float *dx, const float *x, const float *w, const float *dy, int dim,
                                             float eps, int accumulate) {
    __shared__ float scratch[32];
    const float *xr = x + (size_t)blockIdx.x * dim, *g = dy + (size_t)blockIdx.x * dim;
    float *o = dx + (size_t)blockIdx.x * dim;
    float s = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) s += xr[i];
    float mean = block_sum(s, scratch) / (float)dim;
    float sv = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) sv += (xr[i] - mean) * (xr[i] - mean);
    float inv = 1.0f / sqrtf(block_sum(sv, scratch) / (float)dim + eps);
    float mg = 0.0f, mgx = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float gw = g[i] * w[i];
        mg += gw;
        mgx += gw * (xr[i] - mean) * inv;
    }
    mg = block_sum(mg, scratch) / (float)dim;
    mgx = block_sum(mgx, scratch) / (float)dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = inv * (g[i] * w[i] - mg - (xr[i] - mean) * inv * mgx);
        o[i] = accumulate ? o[i] + v : v;
    }
}

// rope_kernel's threads, rotating by the negative angle.
__global__ static void rope_back_kernel(float *x, int stride, const int *pos, const float *inv_freq, int rows,
                                        int n_heads, int head_dim, int half) {
    size_t n = (size_t)rows * n_heads * half;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += (size_t)gridDim.x * blockDim.x) {
        int i = (int)(idx % (size_t)half);
        size_t t = idx / (size_t)half;
        int h = (int)(t % (size_t)n_heads);
        int r = (int)(t / (size_t)n_heads);
        float angle = (float)pos[r] * inv_freq[i];
        float s, c;
        sincosf(angle, &s, &c);
        float *xh = x + (size_t)r * stride + (size_t)h * head_dim;
        float a = xh[i], b = xh[i + half];
        xh[i] = a * c + b * s;
        xh[i + half] = b * c - a * s;
    }
}

__global__ static void act_back_kernel(float *dx, const float *x, const float *dy, size_t n, act_kind act) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dx[i] = dy[i] * act_grad_f(x[i], act);
}

__global__ static void glu_back_kernel(float *dgate, float *dup, const float *gate, const float *up, const float *dout,
                                       size_t n, act_kind act) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float gt = gate[i], u = up[i], d = dout[i];
        dgate[i] = d * u * act_grad_f(gt, act);
        dup[i] = d * act_f(gt, act);
    }
}

__global__ static void softcap_back_kernel(float *dx, const float *y, const float *dy, size_t n, float cap) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float t = y[i] / cap;
        dx[i] = dy[i] * (1.0f - t * t);
    }
}

// Where the key/value gradients of donor d go (NULL: dropped), by value in the kernel's parameters.
typedef struct {
    float *dk[ATTN_MAX_DONORS], *dv[ATTN_MAX_DONORS];
} attn_grad_targets;

// The edge j -> i of head h (KV head g): its code, and the key and value rows it read (each from its own
// source; EDGE_REMOVED: the rows are the current ones and must not be used).
__device__ static int grad_edge_rows(const attn_patch &patch, bool patched, int4 sd, const float *k, const float *v,
                                     int kv_row, int kv_stride, int g, int d, int h, int i, int j, const float **kj,
                                     const float **vj) {
    int code = patched ? patch_source(patch, sd, h, i, j) : EDGE_CLEAN;
    int kd = edge_key_donor(code), vd = edge_value_donor(code);
    size_t col = (size_t)g * d;
    *kj = kd >= 0 ? patch.donor_k[kd] + (size_t)(sd.x + j) * kv_stride + col : k + (size_t)(kv_row + j) * kv_stride + col;
    *vj = vd >= 0 ? patch.donor_v[vd] + (size_t)(sd.x + j) * kv_stride + col : v + (size_t)(kv_row + j) * kv_stride + col;
    return code;
}

// The softcapped score and its softcap' factor (1 without softcap).
__device__ static float grad_score(float dot, float scale, float softcap, float *capf) {
    float s = dot * scale;
    *capf = 1.0f;
    if (softcap > 0.0f) {
        s = softcap * tanhf(s / softcap);
        *capf = 1.0f - (s / softcap) * (s / softcap);
    }
    return s;
}

// One block per (query row descriptor, head), as attention_kernel's grid (one warp per key, lanes over
// head_dim). Three passes over the keys the query sees, each recomputing the dot products: the max, then
// the sum of exp and D = sum p g (g = dout . v*), then (when dq is non-NULL) dq = sum dlogit k*. Writes
// stats[(row descriptor) * n_heads + h] = {max, 1 / sum, D} for attn_back_key_kernel and the scores.
template <bool PATCHED>
__global__ static void attn_back_query_kernel(float *dq, float *stats, const float *q, const float *k, const float *v,
                                              const float *dout, const int4 *rows, int group, int d, int q_stride,
                                              int kv_stride, float scale, float softcap, int window,
                                              const attn_patch patch) {
    __shared__ float scratch[32];
    __shared__ float s_q[GRAD_MAX_HD], s_o[GRAD_MAX_HD];
    __shared__ float s_red[GRAD_WARPS][GRAD_MAX_HD];
    int4 row = rows[blockIdx.x];
    int h = blockIdx.y, g = h / group, i = row.y, kv_row = row.z;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    int4 sd = make_int4(0, 0, 0, 0);
    if (PATCHED) sd = patch.seqs[row.w];
    const float *qv = q + (size_t)row.x * q_stride + (size_t)h * d, *ov = dout + (size_t)row.x * q_stride + (size_t)h * d;
    for (int e = threadIdx.x; e < d; e += blockDim.x) {
        s_q[e] = qv[e];
        s_o[e] = ov[e];
    }
    __syncthreads();
    int j0 = window > 0 && i - window + 1 > 0 ? i - window + 1 : 0;
    const float *kj, *vj;
    float capf, m = -INFINITY;
    for (int j = j0 + warp; j <= i; j += n_warps) {
        if (grad_edge_rows(patch, PATCHED, sd, k, v, kv_row, kv_stride, g, d, h, i, j, &kj, &vj) == EDGE_REMOVED) continue;
        m = fmaxf(m, grad_score(warp_dot(s_q, kj, d), scale, softcap, &capf));
    }
    m = block_max(m, scratch);
    float l = 0.0f, dsum = 0.0f;  // the same in every lane of a warp: lane 0 stands for the warp below
    for (int j = j0 + warp; j <= i; j += n_warps) {
        if (grad_edge_rows(patch, PATCHED, sd, k, v, kv_row, kv_stride, g, d, h, i, j, &kj, &vj) == EDGE_REMOVED) continue;
        float e = expf(grad_score(warp_dot(s_q, kj, d), scale, softcap, &capf) - m);
        l += e;
        dsum += e * warp_dot(s_o, vj, d);
    }
    l = block_sum(lane == 0 ? l : 0.0f, scratch);
    dsum = block_sum(lane == 0 ? dsum : 0.0f, scratch);
    float inv = l > 0.0f ? 1.0f / l : 0.0f, D = dsum * inv;  // every edge removed: p = 0 throughout
    if (threadIdx.x == 0) {
        float *st = stats + ((size_t)blockIdx.x * gridDim.y + h) * 3;
        st[0] = m, st[1] = inv, st[2] = D;
    }
    if (!dq) return;
    float acc[GRAD_LANE_SLOTS];
#pragma unroll
    for (int c = 0; c < GRAD_LANE_SLOTS; c++) acc[c] = 0.0f;
    for (int j = j0 + warp; j <= i; j += n_warps) {
        if (grad_edge_rows(patch, PATCHED, sd, k, v, kv_row, kv_stride, g, d, h, i, j, &kj, &vj) == EDGE_REMOVED) continue;
        float s = grad_score(warp_dot(s_q, kj, d), scale, softcap, &capf);
        float p = expf(s - m) * inv, dl = p * (warp_dot(s_o, vj, d) - D) * capf * scale;
#pragma unroll
        for (int c = 0; c < GRAD_LANE_SLOTS; c++)
            if (lane + 32 * c < d) acc[c] += dl * kj[lane + 32 * c];
    }
#pragma unroll
    for (int c = 0; c < GRAD_LANE_SLOTS; c++)
        if (lane + 32 * c < d) s_red[warp][lane + 32 * c] = acc[c];
    __syncthreads();
    float *dqv = dq + (size_t)row.x * q_stride + (size_t)h * d;
    for (int e = threadIdx.x; e < d; e += blockDim.x) {
        float t = 0.0f;
        for (int w = 0; w < n_warps; w++) t += s_red[w][e];
        dqv[e] = t;
    }
}

// One block per (key descriptor {sequence, key position j, first row descriptor of the sequence, 0}, KV
// head g). seqd as grad_meta_fill writes it ({q_row, n_q, q_pos, kv_row} at 2 s). For each source (the current pass, then
// each donor that has a target), the warps take the (query head of the group, query i) pairs whose
// edge to j reads its key or its value from that source (both under kv, one under k- or v-only rules),
// recompute p and dlogit from the statistics and the rows the edge read, and the block adds sum dlogit
// q_i (key from this source) and sum p dout_i (value from this source) to the source's row j: one block
// per target row, so no atomics.
template <bool PATCHED>
__global__ static void attn_back_key_kernel(float *dk, float *dv, const attn_grad_targets tg, int n_donors,
                                            const float *stats, const float *q, const float *k, const float *v,
                                            const float *dout, const int4 *keys, const int4 *seqd, int n_heads,
                                            int group, int d, int q_stride, int kv_stride, float scale, float softcap,
                                            int window, const attn_patch patch) {
    __shared__ float s_red[2][GRAD_WARPS][GRAD_MAX_HD];
    int4 kd = keys[blockIdx.x];
    int s = kd.x, j = kd.y, rbase = kd.z, g = blockIdx.y;
    int4 sq = seqd[2 * s];
    int4 sd = make_int4(0, 0, 0, 0);
    if (PATCHED) sd = patch.seqs[s];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    int i_first = j > sq.z ? j : sq.z, i_last = sq.z + sq.y - 1;
    if (window > 0 && j + window - 1 < i_last) i_last = j + window - 1;
    int n_i = i_last - i_first + 1 > 0 ? i_last - i_first + 1 : 0;
    for (int src = -1; src < (PATCHED ? n_donors : 0); src++) {
        float *tk = src < 0 ? dk : tg.dk[src], *tv = src < 0 ? dv : tg.dv[src];
        if ((!tk && !tv) || (src >= 0 && j >= sd.z)) continue;  // no target, or no donor row (untyped)
        size_t col = (size_t)g * d;
        float ak[GRAD_LANE_SLOTS], av[GRAD_LANE_SLOTS];
#pragma unroll
        for (int c = 0; c < GRAD_LANE_SLOTS; c++) ak[c] = av[c] = 0.0f;
        for (int t = warp; t < group * n_i; t += n_warps) {
            int h = g * group + t / n_i, i = i_first + t % n_i, qi = i - sq.z;
            const float *krow, *vrow;
            int code = grad_edge_rows(patch, PATCHED, sd, k, v, sq.w, kv_stride, g, d, h, i, j, &krow, &vrow);
            int to_k = edge_key_donor(code) == src, to_v = edge_value_donor(code) == src;
            if (code == EDGE_REMOVED || (!to_k && !to_v)) continue;
            const float *qv = q + (size_t)(sq.x + qi) * q_stride + (size_t)h * d;
            const float *ov = dout + (size_t)(sq.x + qi) * q_stride + (size_t)h * d;
            const float *st = stats + ((size_t)(rbase + qi) * n_heads + h) * 3;
            float capf, sc = grad_score(warp_dot(qv, krow, d), scale, softcap, &capf);
            float p = expf(sc - st[0]) * st[1], dl = p * (warp_dot(ov, vrow, d) - st[2]) * capf * scale;
            if (!to_k) dl = 0.0f;
            if (!to_v) p = 0.0f;
#pragma unroll
            for (int c = 0; c < GRAD_LANE_SLOTS; c++)
                if (lane + 32 * c < d) {
                    ak[c] += dl * qv[lane + 32 * c];
                    av[c] += p * ov[lane + 32 * c];
                }
        }
#pragma unroll
        for (int c = 0; c < GRAD_LANE_SLOTS; c++)
            if (lane + 32 * c < d) s_red[0][warp][lane + 32 * c] = ak[c], s_red[1][warp][lane + 32 * c] = av[c];
        __syncthreads();
        size_t at = (size_t)(src < 0 ? sq.w + j : sd.x + j) * kv_stride + col;
        for (int e = threadIdx.x; e < d; e += blockDim.x) {
            float sk = 0.0f, sv = 0.0f;
            for (int w = 0; w < n_warps; w++) sk += s_red[0][w][e], sv += s_red[1][w][e];
            if (tk) tk[at + e] += sk;
            if (tv) tv[at + e] += sv;
        }
        __syncthreads();  // s_red is read before the next source writes it
    }
}

// One block per (edge unit {head, sender, receiver, donor + 256 * source}, sequence): a warp per
// (receiver row, sender) pair of the unit, p and dlogit from the statistics, the two differences' dot
// products in double (the terms the unit's source substitutes; zero: p (D - g)).
// seqd holds two int4 per sequence: {q_row, n_q, q_pos, kv_row}, {first row descriptor, 0, 0, 0}.
__global__ static void edge_scores_kernel(double *score, int n_seqs, const float *stats, const float *q, const float *k,
                                          const float *v, const float *k_base, const float *v_base, const float *dout, const int4 *units, const int4 *seqd,
                                          int n_heads, int group, int d, int q_stride, int kv_stride, float scale,
                                          float softcap, int window, const attn_patch patch) {
    __shared__ double s_dred[32];
    int4 un = units[blockIdx.x];
    int s = blockIdx.y, h = un.x, g = h / group, donor = un.w & 255, source = un.w >> 8;
    int4 sq = seqd[2 * s], sb = seqd[2 * s + 1], sd = patch.seqs[s];
    const int32_t *types = patch.ints + sd.y;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5, n_k = sq.z + sq.y;
    double acc = 0.0;
    for (size_t t = warp; t < (size_t)sq.y * n_k; t += n_warps) {
        int qi = (int)(t / n_k), A = (int)(t % n_k), B = sq.z + qi;
        if (B >= sd.z || A > B || (window > 0 && B - A >= window) || types[B] != un.z || types[A] != un.y) continue;
        const float *kj, *vj;
        int code = grad_edge_rows(patch, true, sd, k, v, sq.w, kv_stride, g, d, h, B, A, &kj, &vj);
        if (code == EDGE_REMOVED) continue;
        const float *qv = q + (size_t)(sq.x + qi) * q_stride + (size_t)h * d;
        const float *ov = dout + (size_t)(sq.x + qi) * q_stride + (size_t)h * d;
        const float *st = stats + ((size_t)(sb.x + qi) * n_heads + h) * 3;
        float capf, sc = grad_score(warp_dot(qv, kj, d), scale, softcap, &capf);
        float gj = warp_dot(ov, vj, d), p = expf(sc - st[0]) * st[1], dl = p * (gj - st[2]) * capf * scale;
        if (source == EDGE_SRC_ZERO) {
            if (lane == 0) acc += (double)p * ((double)st[2] - gj);
            continue;
        }
        size_t drow = (size_t)(sd.x + A) * kv_stride + (size_t)g * d;
        const float *kd = patch.donor_k[donor] + drow, *vd = patch.donor_v[donor] + drow;
        // the differences: from the base where the edge reads the current pass (its key and its value each)
        const float *kx = edge_key_donor(code) < 0 && k_base ? k_base + (kj - k) : kj;
        const float *vx = edge_value_donor(code) < 0 && v_base ? v_base + (vj - v) : vj;
        double ek = 0.0, ev = 0.0;
        for (int e = lane; e < d; e += 32) {
            ek += (double)qv[e] * ((double)kd[e] - kx[e]);
            ev += (double)ov[e] * ((double)vd[e] - vx[e]);
        }
        ek = warp_sum(ek);
        ev = warp_sum(ev);
        if (lane == 0) acc += (source == EDGE_SRC_V ? 0.0 : (double)dl * ek) + (source == EDGE_SRC_K ? 0.0 : (double)p * ev);
    }
    acc = block_sum(acc, s_dred);
    if (threadIdx.x == 0) score[(size_t)blockIdx.x * n_seqs + s] = acc;
}

// One block per (head unit {head, type, donor, 0}, sequence): threads over (row, column) pairs, in
// double. The donors' z arrays travel as the patch's donor_k.
__global__ static void head_scores_kernel(double *score, int n_seqs, const float *z, const float *dz, const int4 *units,
                                          const int4 *seqd, int d, int q_stride, const attn_patch patch) {
    __shared__ double s_dred[32];
    int4 un = units[blockIdx.x];
    int s = blockIdx.y;
    int4 sq = seqd[2 * s], sd = patch.seqs[s];
    const int32_t *types = patch.ints + sd.y;
    double acc = 0.0;
    for (size_t t = threadIdx.x; t < (size_t)sq.y * d; t += blockDim.x) {
        int r = (int)(t / d), e = (int)(t % d), B = sq.z + r;
        if (B >= sd.z || types[B] != un.y) continue;
        size_t at = (size_t)(sq.x + r) * q_stride + (size_t)un.x * d + e;
        const float *zd = patch.donor_k[un.z] + (size_t)(sd.x + B) * q_stride + (size_t)un.x * d + e;
        acc += ((double)z[at] - *zd) * dz[at];
    }
    acc = block_sum(acc, s_dred);
    if (threadIdx.x == 0) score[(size_t)blockIdx.x * n_seqs + s] = acc;
}

// ---------------------------------------------------------------------------------------------------
// Metric kernels (kernels/ops.h, the metric ops): sums in double per block, in a fixed order.

// KL divergence of row blockIdx.x (kl_div_rows): the two maxima, then the two sums of exp in double, then
// sum p_i (lp_i - lq_i) in double.
__global__ static void kl_div_rows_kernel(float *out, const float *pl, const float *ql, int n) {
    __shared__ float scratch[32];
    __shared__ double dscratch[32];
    const float *x = pl + (size_t)blockIdx.x * n, *y = ql + (size_t)blockIdx.x * n;
    float mx = -INFINITY, my = -INFINITY;
    for (int i = threadIdx.x; i < n; i += blockDim.x) mx = fmaxf(mx, x[i]), my = fmaxf(my, y[i]);
    mx = block_max(mx, scratch);
    my = block_max(my, scratch);
    double sx = 0.0, sy = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) sx += exp((double)x[i] - mx), sy += exp((double)y[i] - my);
    sx = block_sum(sx, dscratch);
    sy = block_sum(sy, dscratch);
    double lx = (double)mx + log(sx), ly = (double)my + log(sy), kl = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        double lp = (double)x[i] - lx, lq = (double)y[i] - ly;
        kl += exp(lp) * (lp - lq);
    }
    kl = block_sum(kl, dscratch);
    if (threadIdx.x == 0) out[blockIdx.x] = (float)kl;
}

// The lowest of the block's ints (every thread calls it; all get the result), as block_max.
__device__ static int block_min_int(int v, int *scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        int u = __shfl_xor_sync(0xffffffffu, v, o);
        v = u < v ? u : v;
    }
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        int t = lane < n_warps ? scratch[lane] : 0x7fffffff;
        for (int o = 16; o > 0; o >>= 1) {
            int u = __shfl_xor_sync(0xffffffffu, t, o);
            t = u < t ? u : t;
        }
        if (lane == 0) scratch[0] = t;
    }
    __syncthreads();
    return scratch[0];
}

// The next-token figures of row blockIdx.x (logit_metrics): tokens[2 r] the target, tokens[2 r + 1] the
// given other token or -1. The max (block max), the lowest index holding it (block min of the indices);
// the same over the tokens != target unless another token is given; the sum of exp(x - max) in double.
__global__ static void logit_metrics_kernel(logit_row_metrics *out, const float *logits, const int *tokens, int n) {
    __shared__ float scratch[32];
    __shared__ int iscratch[32];
    __shared__ double dscratch[32];
    const float *x = logits + (size_t)blockIdx.x * n;
    int t = tokens[2 * blockIdx.x], given = tokens[2 * blockIdx.x + 1];
    float mx = -INFINITY, mo = -INFINITY;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        mx = fmaxf(mx, x[i]);
        if (i != t) mo = fmaxf(mo, x[i]);
    }
    mx = block_max(mx, scratch);
    mo = block_max(mo, scratch);
    int ix = 0x7fffffff, io = 0x7fffffff;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        if (x[i] == mx && i < ix) ix = i;
        if (i != t && x[i] == mo && i < io) io = i;
    }
    ix = block_min_int(ix, iscratch);
    io = block_min_int(io, iscratch);
    double sum = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) sum += exp((double)x[i] - mx);
    sum = block_sum(sum, dscratch);
    if (threadIdx.x == 0) {
        int o = given >= 0 ? given : io;
        logit_row_metrics m;
        m.argmax = ix;
        m.other = o;
        m.target_logprob = (float)((double)x[t] - (double)mx - log(sum));
        m.logit_diff = x[t] - x[o];
        m.log_sum_exp = (float)((double)mx + log(sum));
        out[blockIdx.x] = m;
    }
}

// One block per (query row descriptor, head), as attention_kernel's grid: a warp per key scores it (fp32, as
// attention_kernel: the same dot product, scale and softcap; a patched edge's key from its donor), lane 0
// keeps the running max; then a second pass rescores each key and adds exp(s - max), exp(s - max) (s - max)
// and the key type's mass in double. entropy[(row descriptor) * n_heads + h], mass[... * n_types + t].
template <bool PATCHED>
__global__ static void attention_row_stats_kernel(float *entropy, float *mass, int n_types, const float *q,
                                                  const float *k, const int4 *rows, int n_heads, int group, int d,
                                                  int q_stride, int kv_stride, float scale, float softcap, int window,
                                                  const attn_patch patch) {
    __shared__ float scratch[32];
    __shared__ double dscratch[32];
    int4 row = rows[blockIdx.x], sd = patch.seqs[row.w];
    int h = blockIdx.y, g = h / group, i = row.y, kv_row = row.z;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    const float *qv = q + (size_t)row.x * q_stride + (size_t)h * d;
    const int32_t *types = patch.ints + sd.y;
    int j0 = window > 0 && i - window + 1 > 0 ? i - window + 1 : 0;
    float mx = -INFINITY;
    for (int pass = 0; pass < 2; pass++) {
        double z = 0.0, zs = 0.0, m[OPS_MAX_STAT_TYPES];
        for (int t = 0; t < OPS_MAX_STAT_TYPES; t++) m[t] = 0.0;
        for (int j = j0 + warp; j <= i; j += n_warps) {
            const float *kj = k + (size_t)(kv_row + j) * kv_stride + (size_t)g * d;
            if (PATCHED) {  // the key the edge reads (kernels/edge_rule.h); a removed edge is no key of the row
                int code = patch_source(patch, sd, h, i, j), dn = edge_key_donor(code);
                if (code == EDGE_REMOVED) continue;  // the whole warp: j is the warp's
                if (dn >= 0) kj = patch.donor_k[dn] + (size_t)(sd.x + j) * kv_stride + (size_t)g * d;
            }
            float dot = 0.0f;
            for (int e = lane; e < d; e += 32) dot += qv[e] * kj[e];
            dot = warp_sum(dot) * scale;
            if (softcap > 0.0f) dot = softcap * tanhf(dot / softcap);
            if (lane != 0) continue;
            if (pass == 0) {
                mx = fmaxf(mx, dot);
                continue;
            }
            double e = exp((double)dot - mx);
            z += e, zs += e * ((double)dot - mx);
            int t = j < sd.z ? types[j] : -1;
            if (t >= 0 && t < n_types && t < OPS_MAX_STAT_TYPES) m[t] += e;
        }
        if (pass == 0) {
            mx = block_max(mx, scratch);
            continue;
        }
        z = block_sum(z, dscratch);
        zs = block_sum(zs, dscratch);
        size_t at = (size_t)blockIdx.x * n_heads + h;
        // every edge removed (z = 0): entropy 0 and no mass, as the row's output is 0
        if (threadIdx.x == 0) entropy[at] = z > 0.0 ? (float)(log(z) - zs / z) : 0.0f;
        for (int t = 0; t < n_types; t++) {
            double mt = block_sum(t < OPS_MAX_STAT_TYPES ? m[t] : 0.0, dscratch);
            if (threadIdx.x == 0) mass[at * n_types + t] = z > 0.0 ? (float)(mt / z) : 0.0f;
        }
    }
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

// The attention_tile_kernel items of a call (see attn_tile): per sequence with queries, its n_q * group
// flattened rows in query tiles of ATTN_TILE_Q, each tile's key range the union of what its rows see, cut
// into split-K chunks of ATTN_SPLIT_KEYS when the sequence has a single tile and more keys than that; one
// item per (tile, chunk, KV head). Combine items: one per split (tile, KV head), with split = its first
// partial slot and n_split its chunks. Counts only when items / combine are NULL.
typedef struct {
    size_t n_items, n_map_tiles, n_partials, n_combine;
} attn_tiles_layout;

static attn_tiles_layout attn_tiles_fill(attn_tile *items, attn_tile *combine, const attn_seq *seqs, int n_seqs,
                                         int group, int n_kv_heads, int window) {
    attn_tiles_layout lay = {0, 0, 0, 0};
    for (int s = 0; s < n_seqs; s++) {
        const attn_seq *sq = &seqs[s];
        if (sq->n_q <= 0) continue;
        int rows = sq->n_q * group;
        for (int r0 = 0; r0 < rows; r0 += ATTN_TILE_Q) {
            int n_rows = rows - r0 < ATTN_TILE_Q ? rows - r0 : ATTN_TILE_Q;
            int p_first = sq->q_pos + r0 / group, p_last = sq->q_pos + (r0 + n_rows - 1) / group;
            int key_lo = window > 0 && p_first - window + 1 > 0 ? p_first - window + 1 : 0, key_hi = p_last + 1;
            int chunk = rows <= ATTN_TILE_Q && key_hi - key_lo > ATTN_SPLIT_KEYS ? ATTN_SPLIT_KEYS : key_hi - key_lo;
            int n_chunks = (key_hi - key_lo + chunk - 1) / chunk;
            for (int g = 0; g < n_kv_heads; g++) {
                attn_tile t = {s, g, r0, n_rows, key_lo, key_hi, 0, -1, 0, sq->q_row, sq->q_pos, sq->kv_row};
                if (n_chunks > 1) {
                    t.split = (int)lay.n_partials, t.n_split = n_chunks;
                    if (combine) combine[lay.n_combine] = t;
                    lay.n_combine++;
                }
                for (int c = 0; c < n_chunks; c++) {
                    attn_tile it = t;
                    it.key_lo = key_lo + c * chunk;
                    it.key_hi = it.key_lo + chunk < key_hi ? it.key_lo + chunk : key_hi;
                    it.map_off = (int)lay.n_map_tiles;
                    it.split = n_chunks > 1 ? (int)lay.n_partials++ : -1;
                    it.n_split = 0;
                    if (items) items[lay.n_items] = it;
                    lay.n_items++;
                    lay.n_map_tiles += (size_t)((it.key_hi - it.key_lo + ATTN_TILE_K - 1) / ATTN_TILE_K);
                }
            }
        }
    }
    return lay;
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

// The per-call metadata of the gradient kernels, one device buffer: the query row descriptors (as
// attn_rows_fill), two int4 per sequence ({q_row, n_q, q_pos, kv_row}, {first row descriptor, 0, 0, 0}), one key
// descriptor per (sequence, key position) {sequence, position, first row descriptor, 0}, then the units.
typedef struct {
    size_t total_q, total_k, off_seqd, off_keys, off_units, bytes;
} grad_meta_layout;

static grad_meta_layout grad_meta_plan(const attn_seq *seqs, int n_seqs, int n_units) {
    grad_meta_layout lay;
    lay.total_q = lay.total_k = 0;
    for (int s = 0; s < n_seqs; s++)
        if (seqs[s].n_q > 0) {
            lay.total_q += (size_t)seqs[s].n_q;
            lay.total_k += (size_t)seqs[s].q_pos + (size_t)seqs[s].n_q;
        }
    lay.off_seqd = sizeof(int4) * lay.total_q;
    lay.off_keys = lay.off_seqd + sizeof(int4) * 2 * (size_t)(n_seqs > 0 ? n_seqs : 0);
    lay.off_units = lay.off_keys + sizeof(int4) * lay.total_k;
    lay.bytes = lay.off_units + sizeof(int4) * (size_t)(n_units > 0 ? n_units : 0);
    return lay;
}

// units: n_units x unit_ints ints (a unit struct's fields, then zeros); a fifth (an edge unit's source)
// goes into the fourth component as + 256 * source.
static void grad_meta_fill(unsigned char *buf, const grad_meta_layout *lay, const attn_seq *seqs, int n_seqs,
                           const int *units, int unit_ints, int n_units) {
    attn_rows_fill((int4 *)buf, seqs, n_seqs);
    int4 *sd = (int4 *)(buf + lay->off_seqd), *kd = (int4 *)(buf + lay->off_keys), *ud = (int4 *)(buf + lay->off_units);
    int base = 0;
    size_t kn = 0;
    for (int s = 0; s < n_seqs; s++) {
        const attn_seq *sq = &seqs[s];
        sd[2 * s] = make_int4(sq->q_row, sq->n_q > 0 ? sq->n_q : 0, sq->q_pos, sq->kv_row);
        sd[2 * s + 1] = make_int4(base, 0, 0, 0);
        if (sq->n_q <= 0) continue;
        for (int j = 0; j < sq->q_pos + sq->n_q; j++) kd[kn++] = make_int4(s, j, base, 0);
        base += sq->n_q;
    }
    for (int u = 0; u < n_units; u++) {
        int f[5] = {0, 0, 0, 0, 0};
        for (int i = 0; i < unit_ints && i < 5; i++) f[i] = units[(size_t)u * unit_ints + i];
        ud[u] = make_int4(f[0], f[1], f[2], f[3] + 256 * f[4]);  // an edge unit's source beside its donor
    }
}

// ---------------------------------------------------------------------------------------------------
// Launch helpers

static unsigned pointwise_blocks(size_t n) {
    size_t b = (n + POINTWISE_THREADS - 1) / POINTWISE_THREADS;
    const size_t max_blocks = 65536;  // grid-stride loops cover the rest
    return (unsigned)(b < max_blocks ? b : max_blocks);
}

// ---------------------------------------------------------------------------------------------------
// The table's functions

// Allocation. With the pool (the default) both are stream-ordered on the compute stream: cudaMallocAsync
// hands out memory of the device's default pool that is ready for every op queued after it, and
// cudaFreeAsync returns it to the pool once the ops queued before it (the buffer's last readers) are done,
// with no device synchronization; the pool's release threshold (cuda_init_once) keeps freed memory
// reserved, so a pass's buffers come from the previous pass's at no cost. Every op, upload and download
// runs on that one stream, so a buffer is never used out of its stream order, and a host read (download)
// waits for the stream. Without the pool (EP_CUDA_POOL=0) plain cudaMalloc / cudaFree, each cudaFree a
// device synchronization: the mode for compute-sanitizer and debugging (docs/cuda.md). Zero bytes: NULL,
// as cudaMalloc gives, and releasing NULL does nothing.
static void *cuda_alloc(size_t bytes) {
    void *p = NULL;
    if (bytes == 0) return NULL;
    if (!ctx.pool) {
        CUDA_CHECK(cudaMalloc(&p, bytes));
        return p;
    }
    cudaError_t e = cudaMallocAsync(&p, bytes, ctx.stream);
    if (e == cudaErrorMemoryAllocation) {
        // The pool keeps what was freed (release threshold): hand the unused part back to the driver once
        // the stream's pending frees are done, then try again before giving up.
        (void)cudaGetLastError();
        CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
        CUDA_CHECK(cudaMemPoolTrimTo(ctx.mem_pool, 0));
        e = cudaMallocAsync(&p, bytes, ctx.stream);
    }
    cuda_check_at(e, "cudaMallocAsync", __FILE__, __LINE__);
    return p;
}

static void cuda_release(void *p) {
    if (!p) return;
    if (ctx.pool) CUDA_CHECK(cudaFreeAsync(p, ctx.stream));
    else CUDA_CHECK(cudaFree(p));
}

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
// The old buffer goes back through cuda_release: stream-ordered after the kernels that still read it
// (pool), or after a synchronization (cudaFree, which synchronizes anyway).
static void device_buffer_reserve(void **buf, size_t *cap, size_t bytes, size_t min_bytes) {
    if (bytes <= *cap) return;
    if (!ctx.pool) CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
    cuda_release(*buf);
    size_t new_cap = bytes > min_bytes ? bytes : min_bytes;
    *buf = cuda_alloc(new_cap);
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

// Plain (patch NULL) or patched attention: uploads the call's attn_tile items (and split-K combine items),
// builds the tile map when patched, launches the tile kernel and, for split sequences, the combine kernel.
static void attention_launch(float *out, const float *q, const float *k, const float *v, const attn_seq *seqs,
                             int n_seqs, const attn_params *p, const attn_patch *patch) {
    if (p->n_heads <= 0 || p->n_kv_heads <= 0) return;
    int group = p->n_heads / p->n_kv_heads, d = p->head_dim;
    attn_tiles_layout lay = attn_tiles_fill(NULL, NULL, seqs, n_seqs, group, p->n_kv_heads, p->window);
    if (lay.n_items == 0) return;
    if (lay.n_items > 0x7fffffffu || lay.n_map_tiles > 0x7fffffffu || lay.n_combine > 0x7fffffffu) {
        ops_fatal("edgepatch: CUDA error attention with %zu query tiles, %zu key tiles is too large at %s:%d",
                  lay.n_items, lay.n_map_tiles, __FILE__, __LINE__);
    }
    size_t smem = sizeof(float) * attn_tile_smem_floats(d);
    if (d <= 0 || smem > (size_t)ctx.attn_smem_max) {  // head_dim above ~290: beyond any model this serves
        ops_fatal("edgepatch: CUDA error attention head_dim %d needs %zu bytes of shared memory (the device has %d) "
                  "at %s:%d", d, smem, ctx.attn_smem_max, __FILE__, __LINE__);
    }

    size_t item_bytes = sizeof(attn_tile) * (lay.n_items + lay.n_combine);
    attn_tile *host = (attn_tile *)kernel_malloc(item_bytes);
    attn_tiles_fill(host, host + lay.n_items, seqs, n_seqs, group, p->n_kv_heads, p->window);
    device_buffer_reserve(&ctx.attn_rows, &ctx.attn_rows_cap, item_bytes, sizeof(attn_tile) * 4096);
    // Stream-ordered after earlier kernels that read the buffer; a copy from pageable memory has taken
    // the source by the time it returns, so the host image can be freed at once.
    CUDA_CHECK(cudaMemcpyAsync(ctx.attn_rows, host, item_bytes, cudaMemcpyHostToDevice, ctx.stream));
    free(host);
    const attn_tile *items = (const attn_tile *)ctx.attn_rows, *combine = items + lay.n_items;

    float *partial = NULL;
    if (lay.n_partials > 0) {
        device_buffer_reserve(&ctx.attn_partial, &ctx.attn_partial_cap,
                              sizeof(float) * lay.n_partials * ATTN_TILE_Q * (size_t)(d + 2), 1 << 20);
        partial = (float *)ctx.attn_partial;
    }
    if (patch) {
        size_t info_bytes = sizeof(int4) * lay.n_map_tiles;
        device_buffer_reserve(&ctx.attn_map, &ctx.attn_map_cap, info_bytes + lay.n_map_tiles * ATTN_TILE_Q * ATTN_TILE_K,
                              1 << 20);
        int4 *info = (int4 *)ctx.attn_map;
        signed char *codes = (signed char *)ctx.attn_map + info_bytes;
        attn_tile_map_kernel<<<(unsigned)lay.n_map_tiles, ATTN_MAP_THREADS, 0, ctx.stream>>>(
            info, codes, items, (int)lay.n_items, group, p->window, *patch);
        LAUNCH_CHECK("attn_tile_map_kernel");
        attention_tile_kernel<true, true><<<(unsigned)lay.n_items, ATTN_TILE_THREADS, smem, ctx.stream>>>(
            out, partial, q, k, v, items, group, d, p->q_stride, p->kv_stride, p->scale, p->softcap, p->window, *patch,
            info, codes);
        LAUNCH_CHECK("attention_tile_kernel<true>");
    } else {
        attn_patch none;
        memset(&none, 0, sizeof none);
        attention_tile_kernel<false, true><<<(unsigned)lay.n_items, ATTN_TILE_THREADS, smem, ctx.stream>>>(
            out, partial, q, k, v, items, group, d, p->q_stride, p->kv_stride, p->scale, p->softcap, p->window, none,
            NULL, NULL);
        LAUNCH_CHECK("attention_tile_kernel<false>");
    }
    if (lay.n_combine > 0) {
        attn_split_combine_kernel<<<(unsigned)lay.n_combine, ROW_THREADS, 0, ctx.stream>>>(out, partial, combine, group,
                                                                                           d, p->q_stride);
        LAUNCH_CHECK("attn_split_combine_kernel");
    }
}

static void cuda_attention(float *out, const float *q, const float *k, const float *v, const attn_seq *seqs, int n_seqs,
                           const attn_params *p) {
    attention_launch(out, q, k, v, seqs, n_seqs, p, NULL);
}

static void cuda_patched_attention(float *out, const float *q, const float *k, const float *v, int n_donors,
                                   const float *const *donor_k, const float *const *donor_v, const attn_seq *seqs,
                                   int n_seqs, const attn_params *p, const edge_rule_set *rules) {
    // No rule matches any edge: exactly plain attention (edge_lookup returns EDGE_CLEAN throughout).
    if (!rules || rules->n <= 0) {
        attention_launch(out, q, k, v, seqs, n_seqs, p, NULL);
        return;
    }
    if (n_donors < 0 || n_donors > ATTN_MAX_DONORS || rules->n > EDGE_MAX_RULES) {
        ops_fatal("edgepatch: CUDA error patched attention with %d donors (max %d), %d rules (max %d) at %s:%d",
                  n_donors, ATTN_MAX_DONORS, rules->n, EDGE_MAX_RULES, __FILE__, __LINE__);
    }
    for (int i = 0; i < rules->n; i++)
        if (rules->rule[i].source != EDGE_SRC_ZERO && rules->rule[i].donor >= n_donors) {
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

// ---- Gradient ops

static void cuda_linear_back(float *dx, const float *dy, const float *w, int rows, int n_in, int n_out, int accumulate) {
    if (rows <= 0 || n_in <= 0) return;
    // Row-major dx[rows, n_in] = dy[rows, n_out] . w[n_out, n_in]; column-major that is dx^T (n_in x rows)
    // = w^T (the w buffer read column-major, ld n_in: op N) . dy^T (the dy buffer, ld n_out: op N).
    const float one = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    CUBLAS_CHECK(cublasSgemm(ctx.blas, CUBLAS_OP_N, CUBLAS_OP_N, n_in, rows, n_out, &one, w, n_in, dy, n_out, &beta, dx,
                             n_in));
}

// Blocks of weight rows widened to fp32 (at most 64 MiB of scratch), each adding its part of the sum
// over n_out with sgemm: dy stays fp32 (kernels/ops.h). Not tensor-core speed: a bf16 x bf16 product
// would need dy rounded to bf16 (or split into two bf16 parts), a later step if the profile asks.
static void cuda_linear_back_bf16(float *dx, const float *dy, const uint16_t *w, int rows, int n_in, int n_out,
                                  int accumulate) {
    if (rows <= 0 || n_in <= 0) return;
    if (n_out <= 0) {
        if (!accumulate) CUDA_CHECK(cudaMemsetAsync(dx, 0, sizeof(float) * (size_t)rows * n_in, ctx.stream));
        return;
    }
    size_t per_row = sizeof(float) * (size_t)n_in, cap_rows = ((size_t)64 << 20) / per_row;
    int block = cap_rows < 1 ? 1 : cap_rows < (size_t)n_out ? (int)cap_rows : n_out;
    device_buffer_reserve(&ctx.bf16_w, &ctx.bf16_w_cap, per_row * (size_t)block, (size_t)1 << 20);
    float *wb = (float *)ctx.bf16_w;
    const float one = 1.0f;
    for (int o0 = 0; o0 < n_out; o0 += block) {
        int nb = n_out - o0 < block ? n_out - o0 : block;
        size_t n = (size_t)nb * n_in;
        bf16_widen_kernel<<<pointwise_blocks(n), POINTWISE_THREADS, 0, ctx.stream>>>(wb, w + (size_t)o0 * n_in, n);
        LAUNCH_CHECK("bf16_widen_kernel");
        const float beta = accumulate || o0 > 0 ? 1.0f : 0.0f;
        CUBLAS_CHECK(cublasSgemm(ctx.blas, CUBLAS_OP_N, CUBLAS_OP_N, n_in, rows, nb, &one, wb, n_in, dy + o0, n_out,
                                 &beta, dx, n_in));
    }
}

static void cuda_rmsnorm_back(float *dx, const float *x, const float *w, float w_offset, const float *dy, int rows,
                              int dim, float eps, int accumulate) {
    if (rows <= 0 || dim <= 0) return;
    rmsnorm_back_kernel<<<rows, ROW_THREADS, 0, ctx.stream>>>(dx, x, w, w_offset, dy, dim, eps, accumulate);
    LAUNCH_CHECK("rmsnorm_back_kernel");
}

static void cuda_layernorm_back(float *dx, const float *x, const float *w, const float *dy, int rows, int dim,
                                float eps, int accumulate) {
    if (rows <= 0 || dim <= 0) return;
    layernorm_back_kernel<<<rows, ROW_THREADS, 0, ctx.stream>>>(dx, x, w, dy, dim, eps, accumulate);
    LAUNCH_CHECK("layernorm_back_kernel");
}

static void cuda_rope_back(float *x, int stride, const int *pos, const float *inv_freq, int rows, int n_heads,
                           int head_dim, int rot_dim) {
    int half = rot_dim / 2;
    size_t n = (size_t)(rows > 0 ? rows : 0) * (size_t)(n_heads > 0 ? n_heads : 0) * (size_t)(half > 0 ? half : 0);
    if (n == 0) return;
    rope_back_kernel<<<pointwise_blocks(n), POINTWISE_THREADS, 0, ctx.stream>>>(x, stride, pos, inv_freq, rows,
                                                                                n_heads, head_dim, half);
    LAUNCH_CHECK("rope_back_kernel");
}

static void cuda_act_back(float *dx, const float *x, const float *dy, size_t n, act_kind act) {
    if (n == 0) return;
    act_back_kernel<<<pointwise_blocks(n), POINTWISE_THREADS, 0, ctx.stream>>>(dx, x, dy, n, act);
    LAUNCH_CHECK("act_back_kernel");
}

static void cuda_glu_back(float *dgate, float *dup, const float *gate, const float *up, const float *dout, size_t n,
                          act_kind act) {
    if (n == 0) return;
    glu_back_kernel<<<pointwise_blocks(n), POINTWISE_THREADS, 0, ctx.stream>>>(dgate, dup, gate, up, dout, n, act);
    LAUNCH_CHECK("glu_back_kernel");
}

static void cuda_softcap_back(float *dx, const float *y, const float *dy, size_t n, float cap) {
    if (n == 0) return;
    softcap_back_kernel<<<pointwise_blocks(n), POINTWISE_THREADS, 0, ctx.stream>>>(dx, y, dy, n, cap);
    LAUNCH_CHECK("softcap_back_kernel");
}

// Uploads the patch buffer (rules, or none: the types alone, for the scores) and returns the kernel
// argument; donor_k / donor_v may be NULL (no donors).
static attn_patch grad_patch_upload(const edge_rule_set *rules, const attn_seq *seqs, int n_seqs, int n_donors,
                                    const float *const *donor_k, const float *const *donor_v) {
    if (n_donors < 0 || n_donors > ATTN_MAX_DONORS || (rules && rules->n > EDGE_MAX_RULES)) {
        ops_fatal("edgepatch: CUDA error gradient op with %d donors (max %d), %d rules (max %d) at %s:%d", n_donors,
                  ATTN_MAX_DONORS, rules ? rules->n : 0, EDGE_MAX_RULES, __FILE__, __LINE__);
    }
    for (int i = 0; rules && i < rules->n; i++)
        if (rules->rule[i].source != EDGE_SRC_ZERO && rules->rule[i].donor >= n_donors) {
            ops_fatal("edgepatch: CUDA error gradient op rule %d reads donor %d of %d at %s:%d", i, rules->rule[i].donor,
                      n_donors, __FILE__, __LINE__);
        }
    attn_patch_layout lay = attn_patch_plan(seqs, n_seqs);
    if (lay.n_ints > 0x7fffffffu) {
        ops_fatal("edgepatch: CUDA error gradient op with %zu typed positions at %s:%d", lay.n_ints / 2, __FILE__,
                  __LINE__);
    }
    unsigned char *host = (unsigned char *)kernel_calloc(1, lay.bytes);
    if (rules) {
        attn_patch_fill(host, &lay, rules, seqs, n_seqs);
    } else {
        edge_rule_set *none = (edge_rule_set *)kernel_calloc(1, sizeof(edge_rule_set));
        attn_patch_fill(host, &lay, none, seqs, n_seqs);
        free(none);
    }
    device_buffer_reserve(&ctx.patch_buf, &ctx.patch_cap, lay.bytes, 64 * 1024);
    CUDA_CHECK(cudaMemcpyAsync(ctx.patch_buf, host, lay.bytes, cudaMemcpyHostToDevice, ctx.stream));
    free(host);
    const float *none_k[ATTN_MAX_DONORS] = {0}, *none_v[ATTN_MAX_DONORS] = {0};
    return attn_patch_at((const unsigned char *)ctx.patch_buf, &lay, n_donors, donor_k ? donor_k : none_k,
                         donor_v ? donor_v : none_v);
}

// Uploads the gradient kernels' metadata (grad_meta_fill) and makes room for the statistics; returns the
// device image.
static const unsigned char *grad_meta_upload(const grad_meta_layout *lay, const attn_seq *seqs, int n_seqs,
                                             const int *units, int unit_ints, int n_units, int n_heads) {
    if (lay->total_q > 0x7fffffffu || lay->total_k > 0x7fffffffu || n_heads > 65535) {
        ops_fatal("edgepatch: CUDA error gradient grid %zu rows, %zu keys x %d heads is too large at %s:%d",
                  lay->total_q, lay->total_k, n_heads, __FILE__, __LINE__);
    }
    unsigned char *host = (unsigned char *)kernel_calloc(1, lay->bytes ? lay->bytes : 1);
    grad_meta_fill(host, lay, seqs, n_seqs, units, unit_ints, n_units);
    device_buffer_reserve(&ctx.grad_meta, &ctx.grad_meta_cap, lay->bytes ? lay->bytes : 1, 64 * 1024);
    CUDA_CHECK(cudaMemcpyAsync(ctx.grad_meta, host, lay->bytes ? lay->bytes : 1, cudaMemcpyHostToDevice, ctx.stream));
    free(host);
    device_buffer_reserve(&ctx.grad_stats, &ctx.grad_stats_cap, sizeof(float) * 3 * (lay->total_q ? lay->total_q : 1) * (size_t)n_heads,
                          64 * 1024);
    return (const unsigned char *)ctx.grad_meta;
}

static void grad_check_head_dim(const attn_params *p) {
    if (p->head_dim > GRAD_MAX_HD) {
        ops_fatal("edgepatch: CUDA error attention gradient with head_dim %d (max %d) at %s:%d", p->head_dim,
                  GRAD_MAX_HD, __FILE__, __LINE__);
    }
}

// The statistics (and dq when non-NULL) of every query row and head.
static void grad_query_pass(float *dq, const float *q, const float *k, const float *v, const float *dout,
                            const unsigned char *meta, const grad_meta_layout *lay, const attn_params *p, bool patched,
                            const attn_patch &patch) {
    if (lay->total_q == 0) return;
    dim3 grid((unsigned)lay->total_q, (unsigned)p->n_heads);
    int group = p->n_heads / p->n_kv_heads;
    const int4 *rows = (const int4 *)meta;
    float *stats = (float *)ctx.grad_stats;
    if (patched) {
        attn_back_query_kernel<true><<<grid, ATTN_THREADS, 0, ctx.stream>>>(dq, stats, q, k, v, dout, rows, group,
                                                                            p->head_dim, p->q_stride, p->kv_stride,
                                                                            p->scale, p->softcap, p->window, patch);
        LAUNCH_CHECK("attn_back_query_kernel<true>");
    } else {
        attn_back_query_kernel<false><<<grid, ATTN_THREADS, 0, ctx.stream>>>(dq, stats, q, k, v, dout, rows, group,
                                                                             p->head_dim, p->q_stride, p->kv_stride,
                                                                             p->scale, p->softcap, p->window, patch);
        LAUNCH_CHECK("attn_back_query_kernel<false>");
    }
}

static void cuda_attention_back(float *dq, float *dk, float *dv, const float *q, const float *k, const float *v,
                                const float *dout, int n_donors, const float *const *donor_k,
                                const float *const *donor_v, float *const *donor_dk, float *const *donor_dv,
                                const attn_seq *seqs, int n_seqs, const attn_params *p, const edge_rule_set *rules) {
    if (n_seqs <= 0 || p->n_heads <= 0) return;
    grad_check_head_dim(p);
    bool patched = rules && rules->n > 0;
    grad_meta_layout lay = grad_meta_plan(seqs, n_seqs, 0);
    if (lay.total_q == 0) return;
    attn_patch patch;
    memset(&patch, 0, sizeof patch);
    if (patched) patch = grad_patch_upload(rules, seqs, n_seqs, n_donors, donor_k, donor_v);
    const unsigned char *meta = grad_meta_upload(&lay, seqs, n_seqs, NULL, 0, 0, p->n_heads);
    grad_query_pass(dq, q, k, v, dout, meta, &lay, p, patched, patch);
    attn_grad_targets tg;
    memset(&tg, 0, sizeof tg);
    for (int d = 0; patched && d < n_donors; d++) {
        tg.dk[d] = donor_dk ? donor_dk[d] : NULL;
        tg.dv[d] = donor_dv ? donor_dv[d] : NULL;
    }
    dim3 grid((unsigned)lay.total_k, (unsigned)p->n_kv_heads);
    int group = p->n_heads / p->n_kv_heads;
    const int4 *keys = (const int4 *)(meta + lay.off_keys), *seqd = (const int4 *)(meta + lay.off_seqd);
    const float *stats = (const float *)ctx.grad_stats;
    if (patched) {
        attn_back_key_kernel<true><<<grid, ATTN_THREADS, 0, ctx.stream>>>(dk, dv, tg, n_donors, stats, q, k, v, dout,
                                                                          keys, seqd, p->n_heads, group, p->head_dim,
                                                                          p->q_stride, p->kv_stride, p->scale,
                                                                          p->softcap, p->window, patch);
        LAUNCH_CHECK("attn_back_key_kernel<true>");
    } else {
        attn_back_key_kernel<false><<<grid, ATTN_THREADS, 0, ctx.stream>>>(dk, dv, tg, 0, stats, q, k, v, dout, keys,
                                                                           seqd, p->n_heads, group, p->head_dim,
                                                                           p->q_stride, p->kv_stride, p->scale,
                                                                           p->softcap, p->window, patch);
        LAUNCH_CHECK("attn_back_key_kernel<false>");
    }
}

static void cuda_edge_scores(double *score, const float *q, const float *k, const float *v, const float *k_base,
                             const float *v_base, const float *dout,
                             int n_donors, const float *const *donor_k, const float *const *donor_v,
                             const attn_seq *seqs, int n_seqs, const attn_params *p, const edge_rule_set *rules,
                             const edge_score_unit *units, int n_units) {
    if (n_seqs <= 0 || n_units <= 0) return;
    grad_check_head_dim(p);
    if (n_units > 65535 * 1024 || n_seqs > 65535) {
        ops_fatal("edgepatch: CUDA error edge scores for %d units x %d sequences at %s:%d", n_units, n_seqs, __FILE__,
                  __LINE__);
    }
    bool patched = rules && rules->n > 0;
    grad_meta_layout lay = grad_meta_plan(seqs, n_seqs, n_units);
    attn_patch patch = grad_patch_upload(patched ? rules : NULL, seqs, n_seqs, n_donors, donor_k, donor_v);
    const unsigned char *meta = grad_meta_upload(&lay, seqs, n_seqs, (const int *)units, (int)(sizeof(edge_score_unit) / sizeof(int)), n_units, p->n_heads);
    grad_query_pass(NULL, q, k, v, dout, meta, &lay, p, patched, patch);
    edge_scores_kernel<<<dim3((unsigned)n_units, (unsigned)n_seqs), ATTN_THREADS, 0, ctx.stream>>>(
        score, n_seqs, (const float *)ctx.grad_stats, q, k, v, k_base, v_base, dout, (const int4 *)(meta + lay.off_units),
        (const int4 *)(meta + lay.off_seqd), p->n_heads, p->n_heads / p->n_kv_heads, p->head_dim, p->q_stride,
        p->kv_stride, p->scale, p->softcap, p->window, patch);
    LAUNCH_CHECK("edge_scores_kernel");
}

static void cuda_head_scores(double *score, const float *z, const float *const *donor_z, const float *dz,
                             const attn_seq *seqs, int n_seqs, const attn_params *p, const head_score_unit *units,
                             int n_units) {
    if (n_seqs <= 0 || n_units <= 0) return;
    if (n_units > 65535 * 1024 || n_seqs > 65535) {
        ops_fatal("edgepatch: CUDA error head scores for %d units x %d sequences at %s:%d", n_units, n_seqs, __FILE__,
                  __LINE__);
    }
    int n_donors = 0;
    for (int u = 0; u < n_units; u++) n_donors = units[u].donor + 1 > n_donors ? units[u].donor + 1 : n_donors;
    grad_meta_layout lay = grad_meta_plan(seqs, n_seqs, n_units);
    attn_patch patch = grad_patch_upload(NULL, seqs, n_seqs, n_donors, donor_z, donor_z);
    const unsigned char *meta = grad_meta_upload(&lay, seqs, n_seqs, (const int *)units, 3, n_units, 1);
    head_scores_kernel<<<dim3((unsigned)n_units, (unsigned)n_seqs), ROW_THREADS, 0, ctx.stream>>>(
        score, n_seqs, z, dz, (const int4 *)(meta + lay.off_units), (const int4 *)(meta + lay.off_seqd), p->head_dim,
        p->q_stride, patch);
    LAUNCH_CHECK("head_scores_kernel");
}

static void cuda_kl_div_rows(float *out, const float *p_logits, const float *q_logits, int rows, int n) {
    if (rows <= 0 || n <= 0) return;
    if (rows > 0x7fffffff / 2) {
        ops_fatal("edgepatch: CUDA error kl_div_rows with %d rows at %s:%d", rows, __FILE__, __LINE__);
    }
    kl_div_rows_kernel<<<(unsigned)rows, ROW_THREADS, 0, ctx.stream>>>(out, p_logits, q_logits, n);
    LAUNCH_CHECK("kl_div_rows_kernel");
}

static void cuda_attention_row_stats(float *entropy, float *mass, int n_types, const float *q, const float *k,
                                     int n_donors, const float *const *donor_k, const attn_seq *seqs, int n_seqs,
                                     const attn_params *p, const edge_rule_set *rules) {
    size_t total_q = 0;
    for (int s = 0; s < n_seqs; s++) total_q += seqs[s].n_q > 0 ? (size_t)seqs[s].n_q : 0;
    if (total_q == 0 || p->n_heads <= 0) return;
    if (total_q > 0x7fffffffu || p->n_heads > 65535 || n_types > OPS_MAX_STAT_TYPES) {
        ops_fatal("edgepatch: CUDA error attention_row_stats %zu rows x %d heads, %d types at %s:%d", total_q,
                  p->n_heads, n_types, __FILE__, __LINE__);
    }
    bool patched = rules && rules->n > 0;
    // The types (for the masses) travel in the patch buffer whether or not any rule patches an edge.
    attn_patch patch = grad_patch_upload(patched ? rules : NULL, seqs, n_seqs, patched ? n_donors : 0,
                                         patched ? donor_k : NULL, patched ? donor_k : NULL);
    int4 *host_rows = (int4 *)kernel_malloc(sizeof(int4) * total_q);
    attn_rows_fill(host_rows, seqs, n_seqs);
    device_buffer_reserve(&ctx.attn_rows, &ctx.attn_rows_cap, sizeof(int4) * total_q, sizeof(int4) * 4096);
    CUDA_CHECK(cudaMemcpyAsync(ctx.attn_rows, host_rows, sizeof(int4) * total_q, cudaMemcpyHostToDevice, ctx.stream));
    free(host_rows);
    const int4 *rows = (const int4 *)ctx.attn_rows;
    dim3 grid((unsigned)total_q, (unsigned)p->n_heads);
    int group = p->n_heads / p->n_kv_heads;
    if (patched) {
        attention_row_stats_kernel<true><<<grid, ATTN_THREADS, 0, ctx.stream>>>(
            entropy, mass, n_types, q, k, rows, p->n_heads, group, p->head_dim, p->q_stride, p->kv_stride, p->scale,
            p->softcap, p->window, patch);
        LAUNCH_CHECK("attention_row_stats_kernel<true>");
    } else {
        attention_row_stats_kernel<false><<<grid, ATTN_THREADS, 0, ctx.stream>>>(
            entropy, mass, n_types, q, k, rows, p->n_heads, group, p->head_dim, p->q_stride, p->kv_stride, p->scale,
            p->softcap, p->window, patch);
        LAUNCH_CHECK("attention_row_stats_kernel<false>");
    }
}

// The tokens go up with the result's space behind them in one scratch buffer (grown on demand); the op
// waits for the copy back, as its contract says (out is host memory).
static void cuda_logit_metrics(logit_row_metrics *out, const float *logits, const int *target, const int *other,
                               int rows, int n) {
    if (rows <= 0) return;
    if (rows > 0x7fffffff / 2 || n <= 0) {
        ops_fatal("edgepatch: CUDA error logit_metrics with %d rows of %d at %s:%d", rows, n, __FILE__, __LINE__);
    }
    size_t tok_bytes = sizeof(int) * 2 * (size_t)rows, off = (tok_bytes + 15) / 16 * 16;
    size_t bytes = off + sizeof(logit_row_metrics) * (size_t)rows;
    int *tokens = (int *)kernel_malloc(tok_bytes);
    for (int r = 0; r < rows; r++) tokens[2 * r] = target[r], tokens[2 * r + 1] = other && other[r] >= 0 ? other[r] : -1;
    device_buffer_reserve(&ctx.metrics_buf, &ctx.metrics_cap, bytes, 4096);
    unsigned char *dev = (unsigned char *)ctx.metrics_buf;
    CUDA_CHECK(cudaMemcpyAsync(dev, tokens, tok_bytes, cudaMemcpyHostToDevice, ctx.stream));
    logit_row_metrics *dout = (logit_row_metrics *)(dev + off);
    logit_metrics_kernel<<<(unsigned)rows, ROW_THREADS, 0, ctx.stream>>>(dout, logits, (const int *)dev, n);
    LAUNCH_CHECK("logit_metrics_kernel");
    CUDA_CHECK(cudaMemcpyAsync(out, dout, sizeof(logit_row_metrics) * (size_t)rows, cudaMemcpyDeviceToHost, ctx.stream));
    CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
    free(tokens);
}

static const kernel_ops cuda_table = {
    "cuda",        cuda_alloc, cuda_release, cuda_upload,  cuda_download, cuda_sync,  cuda_matmul, cuda_matmul_bf16,
    cuda_rmsnorm,  cuda_layernorm, cuda_rope, cuda_glu,     cuda_act,     cuda_softcap,  cuda_add,   cuda_scale,  cuda_attention,
    cuda_patched_attention, cuda_copy_rows, cuda_gather_rows,
    cuda_linear_back, cuda_linear_back_bf16, cuda_rmsnorm_back, cuda_layernorm_back, cuda_rope_back, cuda_act_back,
    cuda_glu_back, cuda_softcap_back, cuda_attention_back, cuda_head_scores, cuda_edge_scores,
    cuda_kl_div_rows, cuda_attention_row_stats, cuda_logit_metrics, 0,
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
    cudaError_t e = cudaFuncGetAttributes(&attr, attention_tile_kernel<false, true>);
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
    int dev = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&ctx.attn_smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    // The stream-ordered pool unless EP_CUDA_POOL=0 or the device (driver) has no memory pools. A release
    // threshold of "everything" keeps freed memory in the pool across synchronizations (the default, 0,
    // hands it back to the driver at every stream synchronization, i.e. every download); cuda_alloc trims
    // the pool and retries when an allocation would otherwise fail.
    const char *pool_env = getenv("EP_CUDA_POOL");
    int pools = 0;
    CUDA_CHECK(cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, dev));
    ctx.pool = pools && !(pool_env && strcmp(pool_env, "0") == 0);
    if (ctx.pool) {
        CUDA_CHECK(cudaDeviceGetDefaultMemPool(&ctx.mem_pool, dev));
        uint64_t keep = UINT64_MAX;
        CUDA_CHECK(cudaMemPoolSetAttribute(ctx.mem_pool, cudaMemPoolAttrReleaseThreshold, &keep));
    }
    // Once, not per launch: the tile kernels may use all of it (attention_launch checks each call's need).
    CUDA_CHECK(cudaFuncSetAttribute(attention_tile_kernel<true, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    ctx.attn_smem_max));
    CUDA_CHECK(cudaFuncSetAttribute(attention_tile_kernel<false, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    ctx.attn_smem_max));
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
