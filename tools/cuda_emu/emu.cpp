// cuda_emu: runs the kernels of kernels/ops_cuda.cu on the CPU against the reference backend, for
// machines without a GPU. One std::thread per CUDA thread, blocks one after another, __syncthreads as a
// std::barrier, warp shuffles through a per-warp exchange buffer; the cuBLAS call is replaced by a naive
// column-major sgemm with the same arguments, which checks the row-major mapping. It checks index math
// and the reduction/online-softmax logic, not timing or real-hardware races. Run: bash tools/cuda_emu/run.sh
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>
#include <math.h>
extern "C" {
#include "kernels/ops.h"
#include "kernels/ops_common.h"
}
struct dim3 { unsigned x = 1, y = 1, z = 1; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
struct int4 { int x, y, z, w; };
static int4 make_int4(int a, int b, int c, int d) { return {a, b, c, d}; }
thread_local dim3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;
static float emu_dyn_smem[1 << 16];
static std::unique_ptr<std::barrier<>> block_bar;
static std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
static float warp_buf[32][32];
#define __global__
#define __device__
#define __shared__ static
static void __syncthreads() { block_bar->arrive_and_wait(); }
static float __shfl_xor_sync(unsigned, float v, int o) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    warp_buf[w][lane] = v;
    warp_bar[w]->arrive_and_wait();
    float r = warp_buf[w][lane ^ o];
    warp_bar[w]->arrive_and_wait();
    return r;
}
#include "kernels.inc"  // the kernels of kernels/ops_cuda.cu, extracted by run.sh

static void launch(dim3 grid, dim3 block, std::function<void()> body) {
    gridDim = grid; blockDim = block;
    for (unsigned by = 0; by < grid.y; by++)
        for (unsigned bx = 0; bx < grid.x; bx++) {
            block_bar = std::make_unique<std::barrier<>>(block.x);
            warp_bar.clear();
            for (unsigned w = 0; w < block.x / 32; w++) warp_bar.push_back(std::make_unique<std::barrier<>>(32));
            memset(emu_dyn_smem, 0xff, sizeof emu_dyn_smem);  // NaN garbage: uninitialised reads show
            std::vector<std::thread> ts;
            for (unsigned t = 0; t < block.x; t++)
                ts.emplace_back([&, t, bx, by] { threadIdx = dim3(t); blockIdx = dim3(bx, by); body(); });
            for (auto &th : ts) th.join();
        }
}

static unsigned long long rng = 0x9E3779B97F4A7C15ull;
static float frand() { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return (float)((rng >> 40) / (double)(1ull << 24)) * 2 - 1; }
static std::vector<float> rnd(size_t n, float a) { std::vector<float> v(n); for (auto &x : v) x = frand() * a; return v; }
static double relerr(const std::vector<float> &g, const std::vector<float> &w) {
    double s = 1e-6, e = 0;
    for (float x : w) s = std::max(s, (double)fabs(x));
    for (size_t i = 0; i < g.size(); i++) { double d = fabs((double)g[i] - w[i]) / s; if (!(d <= e)) e = std::isnan(d) ? INFINITY : d; }
    return e;
}
static int fails = 0;
static void rep(const char *n, double e) { printf("  emu %-10s %.3g\n", n, e); if (!(e <= 2e-5)) fails++; }

// column-major sgemm as cuBLAS defines it
static void sgemm(bool ta, bool tb, int m, int n, int k, const float *A, int lda, const float *B, int ldb, float *C, int ldc) {
    for (int i = 0; i < m; i++) for (int j = 0; j < n; j++) {
        double s = 0;
        for (int l = 0; l < k; l++) s += (double)(ta ? A[l + (size_t)i * lda] : A[i + (size_t)l * lda]) * (tb ? B[j + (size_t)l * ldb] : B[l + (size_t)j * ldb]);
        C[i + (size_t)j * ldc] = (float)s;
    }
}

int main() {
    const kernel_ops *ref = kernel_ops_ref();
    {   // matmul mapping + bias kernel
        int rows = 37, n_in = 96, n_out = 53;
        auto x = rnd((size_t)rows * n_in, 1), w = rnd((size_t)n_out * n_in, .5f), b = rnd(n_out, 1);
        std::vector<float> want((size_t)rows * n_out), got(want.size());
        ref->matmul(want.data(), x.data(), w.data(), b.data(), rows, n_in, n_out);
        sgemm(true, false, n_out, rows, n_in, w.data(), n_in, x.data(), n_in, got.data(), n_out);
        float *o = got.data(); const float *bp = b.data();
        launch(dim3(3), dim3(POINTWISE_THREADS), [&] { bias_add_kernel(o, bp, rows, n_out); });
        rep("matmul+b", relerr(got, want));
    }
    {   // norms, with a dim not a multiple of anything, and a dim > blockDim
        for (int dim : {200, 777}) {
            int rows = 5; size_t n = (size_t)rows * dim;
            auto x = rnd(n, 3), w = rnd(dim, 1), b = rnd(dim, 1);
            std::vector<float> want(n), got(n);
            for (int k = 0; k < 2; k++) {
                const float *xp = x.data(), *wp = w.data(), *bp = b.data(); float *op = got.data();
                if (k == 0) { ref->rmsnorm(want.data(), xp, wp, 1.0f, rows, dim, 1e-6f);
                    launch(dim3(rows), dim3(ROW_THREADS), [&] { rmsnorm_kernel(op, xp, wp, 1.0f, dim, 1e-6f); }); rep("rmsnorm", relerr(got, want)); }
                else { ref->layernorm(want.data(), xp, wp, bp, rows, dim, 1e-5f);
                    launch(dim3(rows), dim3(ROW_THREADS), [&] { layernorm_kernel(op, xp, wp, bp, dim, 1e-5f); }); rep("layernorm", relerr(got, want)); }
            }
        }
    }
    {   // rope
        int rows = 9, n_heads = 3, head_dim = 16, stride = 50; size_t n = (size_t)rows * stride;
        int pos[9] = {0, 1, 2, 7, 100, 513, 4095, 4096, 30000}; float inv_freq[8];
        for (int i = 0; i < 8; i++) inv_freq[i] = 1.0f / powf(10000.0f, (float)(2 * i) / 12.0f);
        for (int rot = 12; rot <= 16; rot += 4) {
            auto x = rnd(n, 1); auto want = x; auto got = x;
            ref->rope(want.data(), stride, pos, inv_freq, rows, n_heads, head_dim, rot);
            float *xp = got.data(); int half = rot / 2;
            launch(dim3(1), dim3(POINTWISE_THREADS), [&] { rope_kernel(xp, stride, pos, inv_freq, rows, n_heads, head_dim, half); });
            rep("rope", relerr(got, want));
        }
    }
    {   // pointwise (grid smaller than n to exercise the stride loop)
        size_t n = 1000; auto g = rnd(n, 4), u = rnd(n, 2);
        for (int op = 0; op < 6; op++) {
            auto want = g, got = g; float *o = got.data(); const float *gp = g.data(), *up = u.data();
            switch (op) {
            case 0: ref->glu(want.data(), gp, up, n, ACT_SILU); launch(dim3(2), dim3(256), [&] { glu_kernel(o, gp, up, n, ACT_SILU); }); break;
            case 1: ref->glu(want.data(), gp, up, n, ACT_GELU_TANH); launch(dim3(2), dim3(256), [&] { glu_kernel(o, gp, up, n, ACT_GELU_TANH); }); break;
            case 2: ref->act(want.data(), n, ACT_GELU_TANH); launch(dim3(2), dim3(256), [&] { act_kernel(o, n, ACT_GELU_TANH); }); break;
            case 3: ref->softcap(want.data(), n, 3.0f); launch(dim3(2), dim3(256), [&] { softcap_kernel(o, n, 3.0f); }); break;
            case 4: ref->add(want.data(), up, n); launch(dim3(2), dim3(256), [&] { add_kernel(o, up, n); }); break;
            case 5: ref->scale(want.data(), n, 0.7f); launch(dim3(2), dim3(256), [&] { scale_kernel(o, n, 0.7f); }); break;
            }
            rep("pointwise", relerr(got, want));
        }
    }
    // attention: the same host-side flattening as cuda_attention
    auto attn = [&](const char *name, std::vector<attn_seq> seqs, int kv_rows, int q_rows, attn_params p) {
        size_t nq = (size_t)q_rows * p.q_stride, nk = (size_t)kv_rows * p.kv_stride;
        auto q = rnd(nq, 2), k = rnd(nk, 2), v = rnd(nk, 1);
        std::vector<float> want(nq, 0), got(nq, 0);
        ref->attention(want.data(), q.data(), k.data(), v.data(), seqs.data(), (int)seqs.size(), &p);
        std::vector<int4> rows;
        for (auto &s : seqs) for (int qi = 0; qi < s.n_q; qi++) rows.push_back(make_int4(s.q_row + qi, s.q_pos + qi, s.kv_row, 0));
        float *o = got.data(); const float *qp = q.data(), *kp = k.data(), *vp = v.data(); const int4 *rp = rows.data();
        launch(dim3((unsigned)rows.size(), p.n_heads), dim3(ATTN_THREADS), [&] {
            attention_kernel(o, qp, kp, vp, rp, p.n_heads / p.n_kv_heads, p.head_dim, p.q_stride, p.kv_stride, p.scale, p.softcap, p.window); });
        rep(name, relerr(got, want));
    };
    for (int variant = 0; variant < 3; variant++)
        attn("attn", {{0, 13, 0, 0}, {13, 1, 20, 13}, {14, 7, 0, 34}}, 41, 21,
             {4, 2, 16, 70, 40, 0.25f, variant >= 1 ? 5.0f : 0.0f, variant == 2 ? 5 : 0});
    attn("attn-long", {{0, 3, 2497, 0}, {3, 2, 1200, 2500}}, 3702, 5, {4, 2, 32, 130, 70, 0.2f, 0.0f, 0});
    attn("attn-lwin", {{0, 3, 2497, 0}, {3, 2, 1200, 2500}}, 3702, 5, {4, 2, 32, 130, 70, 0.2f, 5.0f, 1500});
    attn("attn-d256", {{0, 4, 0, 0}, {4, 2, 1030, 4}}, 4 + 1032, 6, {8, 4, 256, 2048, 1024, 1.0f / 16, 50.0f, 0});
    printf("emu: %d failures\n", fails);
    return fails != 0;
}
