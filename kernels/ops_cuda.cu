// ops_cuda: the CUDA backend of the kernel dispatch table (kernels/ops.h), fp32 throughout.
//
// Matrix products go through cuBLAS sgemm with TF32 off (results are compared with the fp32 reference to
// 2e-5); every other op is a small kernel written for obvious correctness first: one block per row for
// the norms, one thread per element for the pointwise ops, one block per (query row, head) for
// attention. All tensor pointers are device memory (cudaMalloc, never managed memory); attention's
// sequence table and parameters are host memory and are uploaded per call.
//
// Errors: ops have no error return by contract, so every CUDA and cuBLAS call is checked and a failure
// prints "edgepatch: CUDA error <what> at file:line" and aborts. kernel_ops_cuda() returns NULL, with
// no output, when no usable GPU is present (no driver, no device, or no kernel image for the device).
//
// Compiled by nvcc as C++; everything the rest of the program sees has C linkage.
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

extern "C" {
#include "kernels/ops.h"
#include "kernels/ops_common.h"
#include "pipeline/error.h"
}

// ---------------------------------------------------------------------------------------------------
// Error checks

static void cuda_check_at(cudaError_t e, const char *what, const char *file, int line) {
    if (e == cudaSuccess) return;
    fprintf(stderr, "edgepatch: CUDA error %s: %s at %s:%d\n", what, cudaGetErrorString(e), file, line);
    abort();
}

static void cublas_check_at(cublasStatus_t s, const char *what, const char *file, int line) {
    if (s == CUBLAS_STATUS_SUCCESS) return;
    fprintf(stderr, "edgepatch: CUDA error %s: %s at %s:%d\n", what, cublasGetStatusString(s), file, line);
    abort();
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
// once under pthread_once; after that it is only read, except attention's upload buffer, so the ops of
// this table are to be called from one host thread at a time (as the single stream orders them anyway).
//
// The stream is a blocking stream (cudaStreamCreate), so it is also ordered with the legacy default
// stream; upload and download still go through it explicitly and wait for it.

typedef struct {
    int usable;              // 1 after a successful init
    cublasHandle_t blas;
    cudaStream_t stream;
    int4 *attn_rows;         // device buffer of attention row descriptors, grown on demand
    size_t attn_rows_cap;    // in elements
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

// Attention: one block per (query row, head); blockIdx.x picks the row descriptor, blockIdx.y the head.
// A row descriptor is {q/out row, query position i, kv_row of its sequence, unused}. The query sees keys
// j0 .. i (j0 > 0 only with a window), taken in chunks of ATTN_CHUNK with an online softmax: per chunk the
// scores go to shared memory (one warp per key, lanes over head_dim), then the running max, sum and
// output accumulator are rescaled to the new max. The accumulator lives in shared memory, each thread
// owning the entries e = threadIdx.x, threadIdx.x + blockDim.x, ...
//
// Dynamic shared memory: q[d], acc[d], score[ATTN_CHUNK].
__global__ static void attention_kernel(float *out, const float *q, const float *k, const float *v, const int4 *rows,
                                        int group, int d, int q_stride, int kv_stride, float scale, float softcap,
                                        int window) {
    extern __shared__ float smem[];
    __shared__ float scratch[32];
    float *s_q = smem, *s_acc = smem + d, *s_score = smem + 2 * d;
    int4 row = rows[blockIdx.x];
    int h = blockIdx.y, g = h / group;
    int i = row.y, kv_row = row.z;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;

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
            const float *ve = v + (size_t)(kv_row + c0) * kv_stride + (size_t)g * d + e;
            float a = 0.0f;
            for (int jj = 0; jj < cn; jj++) a += s_score[jj] * ve[(size_t)jj * kv_stride];
            s_acc[e] = s_acc[e] * corr + a;
        }
        m = m_new;
        __syncthreads();  // all reads of s_score done before the next chunk writes it
    }

    float *o = out + (size_t)row.x * q_stride + (size_t)h * d;
    float inv = 1.0f / l;
    for (int e = threadIdx.x; e < d; e += blockDim.x) o[e] = s_acc[e] * inv;
}

// ---------------------------------------------------------------------------------------------------
// Launch helpers

static unsigned pointwise_blocks(size_t n) {
    size_t b = (n + POINTWISE_THREADS - 1) / POINTWISE_THREADS;
    const size_t max_blocks = 65536;  // grid-stride loops cover the rest
    return (unsigned)(b < max_blocks ? b : max_blocks);
}

static size_t attention_smem_bytes(int d) { return sizeof(float) * (2 * (size_t)d + ATTN_CHUNK); }

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

static void cuda_attention(float *out, const float *q, const float *k, const float *v, const attn_seq *seqs, int n_seqs,
                           const attn_params *p) {
    size_t total_q = 0;
    for (int s = 0; s < n_seqs; s++) total_q += seqs[s].n_q > 0 ? (size_t)seqs[s].n_q : 0;
    if (total_q == 0 || p->n_heads <= 0) return;
    if (total_q > 0x7fffffffu || p->n_heads > 65535) {
        fprintf(stderr, "edgepatch: CUDA error attention grid %zu rows x %d heads is too large at %s:%d\n", total_q,
                p->n_heads, __FILE__, __LINE__);
        abort();
    }
    size_t smem = attention_smem_bytes(p->head_dim);
    if (smem > 48 * 1024) {  // head_dim above ~5600: far beyond any model this serves
        fprintf(stderr, "edgepatch: CUDA error attention head_dim %d needs %zu bytes of shared memory at %s:%d\n",
                p->head_dim, smem, __FILE__, __LINE__);
        abort();
    }

    // One descriptor per query row, flattened over the sequences so the grid needs no search.
    int4 *host_rows = (int4 *)ep_malloc(sizeof(int4) * total_q);
    size_t r = 0;
    for (int s = 0; s < n_seqs; s++)
        for (int qi = 0; qi < seqs[s].n_q; qi++, r++)
            host_rows[r] = make_int4(seqs[s].q_row + qi, seqs[s].q_pos + qi, seqs[s].kv_row, 0);
    if (total_q > ctx.attn_rows_cap) {
        CUDA_CHECK(cudaStreamSynchronize(ctx.stream));  // earlier attention calls may still read the old buffer
        CUDA_CHECK(cudaFree(ctx.attn_rows));
        size_t cap = total_q > 4096 ? total_q : 4096;
        CUDA_CHECK(cudaMalloc(&ctx.attn_rows, sizeof(int4) * cap));
        ctx.attn_rows_cap = cap;
    }
    // Stream-ordered after earlier kernels that read the buffer; a copy from pageable memory has taken
    // the source by the time it returns, so host_rows can be freed at once.
    CUDA_CHECK(cudaMemcpyAsync(ctx.attn_rows, host_rows, sizeof(int4) * total_q, cudaMemcpyHostToDevice, ctx.stream));
    free(host_rows);

    dim3 grid((unsigned)total_q, (unsigned)p->n_heads);
    attention_kernel<<<grid, ATTN_THREADS, smem, ctx.stream>>>(out, q, k, v, ctx.attn_rows, p->n_heads / p->n_kv_heads,
                                                               p->head_dim, p->q_stride, p->kv_stride, p->scale,
                                                               p->softcap, p->window);
    LAUNCH_CHECK("attention_kernel");
}

static const kernel_ops cuda_table = {
    "cuda",        cuda_alloc, cuda_release, cuda_upload,  cuda_download, cuda_sync,  cuda_matmul, cuda_rmsnorm,
    cuda_layernorm, cuda_rope, cuda_glu,     cuda_act,     cuda_softcap,  cuda_add,   cuda_scale,  cuda_attention,
    NULL,  // patched_attention: not yet on the GPU
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
    cudaError_t e = cudaFuncGetAttributes(&attr, attention_kernel);
    if (e != cudaSuccess) {
        fprintf(stderr, "edgepatch: CUDA device present but unusable (%s); the cuda backend is off\n",
                cudaGetErrorString(e));
        (void)cudaGetLastError();
        return;
    }
    cublasStatus_t bs = cublasCreate(&ctx.blas);
    if (bs != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "edgepatch: cuBLAS unusable (%s); the cuda backend is off\n", cublasGetStatusString(bs));
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
