// cuda_emu: runs the kernels of kernels/ops_cuda.cu on the CPU against the reference backend, for
// machines without a GPU. One std::thread per CUDA thread, blocks one after another, __syncthreads as a
// std::barrier, warp shuffles through a per-warp exchange buffer; the cuBLAS call is replaced by a naive
// column-major sgemm with the same arguments, which checks the row-major mapping. wmma fragments (the
// tensor-core attention) are emulated per lane: every lane holds the whole tile (num_elements = rows x cols,
// so element-wise loops over x[] mean what they mean on the GPU), loads it itself (the pointer's 256-bit
// alignment and ldm checked as the hardware requires), computes the product itself with its inputs cut
// to tf32 (the low 13 mantissa bits dropped, as the tensor cores read them) and fp32 accumulation, and
// lane 0 alone stores, so a store read by other lanes without a __syncwarp is a race here too. It checks
// index math and the reduction/online-softmax logic, not timing or real-hardware races. Run: bash
// tools/cuda_emu/run.sh
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>
#include <math.h>
extern "C" {
#include "kernels/bf16.h"
#include "kernels/ops.h"
#include "kernels/ops_common.h"
}
struct dim3 { unsigned x = 1, y = 1, z = 1; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
struct int4 { int x, y, z, w; };
static int4 make_int4(int a, int b, int c, int d) { return {a, b, c, d}; }
thread_local dim3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;
alignas(128) static float emu_dyn_smem[1 << 16];
static std::unique_ptr<std::barrier<>> block_bar;
static std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
typedef uint16_t __nv_bfloat16;
static __nv_bfloat16 __float2bfloat16_rn(float f) { return f32_to_bf16(f); }
#define __global__
#define __device__
#define __host__
#define __align__(n)
#define __shared__ static
static void __syncthreads() { block_bar->arrive_and_wait(); }
static void __syncwarp() { warp_bar[threadIdx.x >> 5]->arrive_and_wait(); }
// One exchange buffer per value type, shared by the block's threads (lane l of warp w writes [w][l]).
template <typename T> static T shfl_xor(T v, int o) {
    static T buf[32][32];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    buf[w][lane] = v;
    warp_bar[w]->arrive_and_wait();
    T r = buf[w][lane ^ o];
    warp_bar[w]->arrive_and_wait();
    return r;
}
static float __shfl_xor_sync(unsigned, float v, int o) { return shfl_xor(v, o); }
static double __shfl_xor_sync(unsigned, double v, int o) { return shfl_xor(v, o); }
static int __shfl_xor_sync(unsigned, int v, int o) { return shfl_xor(v, o); }
static float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }

// wmma (see the top): fragments hold the whole tile in every lane, row-major (a: M x K, b: K x N, acc: M x N).
namespace nvcuda { namespace wmma {
struct matrix_a {}; struct matrix_b {}; struct accumulator {};
struct row_major {}; struct col_major {};
namespace precision { struct tf32 {}; }
enum layout_t { mem_row_major, mem_col_major };
template <typename Use, int M, int N, int K, typename T, typename Layout = void> struct fragment {
    static constexpr int R = std::is_same_v<Use, matrix_b> ? K : M, C = std::is_same_v<Use, matrix_a> ? K : N;
    static constexpr int num_elements = R * C;
    float x[R * C];
};
static void emu_check(const void *p, unsigned ldm) {
    if ((uintptr_t)p % 32 != 0 || ldm % 4 != 0) {
        fprintf(stderr, "cuda_emu: wmma pointer %p or ldm %u misaligned\n", p, ldm);
        abort();
    }
}
static float tf32_cut(float f) { unsigned u; memcpy(&u, &f, 4); u &= 0xffffe000u; memcpy(&f, &u, 4); return f; }
// cvt.rna.tf32.f32: to nearest, ties away from zero
static float __float_to_tf32(float f) {
    if (!std::isfinite(f)) return f;
    unsigned u; memcpy(&u, &f, 4); u = (u + 0x1000u) & 0xffffe000u; memcpy(&f, &u, 4); return f;
}
template <typename Use, int M, int N, int K, typename T, typename L>
static void load_matrix_sync(fragment<Use, M, N, K, T, L> &f, const float *p, unsigned ldm) {
    emu_check(p, ldm);
    typedef fragment<Use, M, N, K, T, L> F;
    for (int r = 0; r < F::R; r++)
        for (int c = 0; c < F::C; c++) f.x[r * F::C + c] = std::is_same_v<L, col_major> ? p[(size_t)c * ldm + r] : p[(size_t)r * ldm + c];
}
template <int M, int N, int K>
static void load_matrix_sync(fragment<accumulator, M, N, K, float> &f, const float *p, unsigned ldm, layout_t l) {
    emu_check(p, ldm);
    for (int r = 0; r < M; r++)
        for (int c = 0; c < N; c++) f.x[r * N + c] = l == mem_col_major ? p[(size_t)c * ldm + r] : p[(size_t)r * ldm + c];
}
template <int M, int N, int K>
static void store_matrix_sync(float *p, const fragment<accumulator, M, N, K, float> &f, unsigned ldm, layout_t l) {
    emu_check(p, ldm);
    if ((threadIdx.x & 31) != 0) return;
    for (int r = 0; r < M; r++)
        for (int c = 0; c < N; c++) (l == mem_col_major ? p[(size_t)c * ldm + r] : p[(size_t)r * ldm + c]) = f.x[r * N + c];
}
template <typename F> static void fill_fragment(F &f, float v) { for (auto &e : f.x) e = v; }
template <int M, int N, int K, typename LA, typename LB>
static void mma_sync(fragment<accumulator, M, N, K, float> &d, const fragment<matrix_a, M, N, K, precision::tf32, LA> &a,
                     const fragment<matrix_b, M, N, K, precision::tf32, LB> &b, const fragment<accumulator, M, N, K, float> &c) {
    float t[M * N];
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            float s = c.x[i * N + j];
            for (int kk = 0; kk < K; kk++) s += tf32_cut(a.x[i * K + kk]) * tf32_cut(b.x[kk * N + j]);
            t[i * N + j] = s;
        }
    memcpy(d.x, t, sizeof t);
}
} }
using namespace nvcuda;
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

// A rule (kernels/edge_rule.h) on the heads of one 64-bit word, with its source (default kv).
static edge_rule er(uint32_t senders, uint32_t receivers, int relation, int donor, uint64_t heads, int source = EDGE_SRC_KV) {
    edge_rule r;
    memset(&r, 0, sizeof r);
    r.sender_types = senders, r.receiver_types = receivers, r.relation = (int16_t)relation, r.source = (int16_t)source;
    r.donor = donor, r.heads[0] = heads;
    return r;
}

// test_ops' interventions on three rules: a zero rule into bos first (rows with nothing left), the rules as
// k-only, v-only and kv, then a zero rule t, n -> last, n on heads 1 and 2.
static edge_rule_set with_interventions(const edge_rule_set &r3) {
    edge_rule_set r;
    memset(&r, 0, sizeof r);
    r.n = 5;
    r.rule[0] = er(0xff, 1u, REL_ANY, -1, 0xf, EDGE_SRC_ZERO);
    r.rule[1] = r3.rule[0], r.rule[1].source = EDGE_SRC_K;
    r.rule[2] = r3.rule[1], r.rule[2].source = EDGE_SRC_V;
    r.rule[3] = r3.rule[2];
    r.rule[4] = er(1u << 2 | 1u << 4, 1u << 6 | 1u << 4, REL_ANY, -1, 0x6, EDGE_SRC_ZERO);
    return r;
}
static void rep(const char *n, double e) { printf("  emu %-10s %.3g\n", n, e); if (!(e <= 2e-5)) fails++; }

// column-major sgemm as cuBLAS defines it
static void sgemm(bool ta, bool tb, int m, int n, int k, const float *A, int lda, const float *B, int ldb, float *C, int ldc) {
    for (int i = 0; i < m; i++) for (int j = 0; j < n; j++) {
        double s = 0;
        for (int l = 0; l < k; l++) s += (double)(ta ? A[l + (size_t)i * lda] : A[i + (size_t)l * lda]) * (tb ? B[j + (size_t)l * ldb] : B[l + (size_t)j * ldb]);
        C[i + (size_t)j * ldc] = (float)s;
    }
}

// Attention through the tile kernels as attention_launch runs them; plant (may be NULL) edits the tile map
// between the map kernel and the tile kernel (the can-fail rows).
struct tile_stats { int items = 0, split_items = 0, clean = 0, donor = 0, mixed = 0, removed = 0; };
template <bool X3>
static void tile_attention(float *out, const float *q, const float *k, const float *v, const std::vector<attn_seq> &seqs,
                           const attn_params &p, const attn_patch *patch, tile_stats *st,
                           void (*plant)(int4 *info, size_t n)) {
    int group = p.n_heads / p.n_kv_heads, d = p.head_dim, ns = (int)seqs.size();
    attn_tiles_layout lay = attn_tiles_fill(nullptr, nullptr, seqs.data(), ns, group, p.n_kv_heads, p.window);
    std::vector<attn_tile> items(lay.n_items + lay.n_combine);
    attn_tiles_fill(items.data(), items.data() + lay.n_items, seqs.data(), ns, group, p.n_kv_heads, p.window);
    if (attn_tile_smem_floats(d) > sizeof emu_dyn_smem / sizeof(float)) { fprintf(stderr, "cuda_emu: smem\n"); abort(); }
    *st = tile_stats();
    st->items = (int)lay.n_items;
    for (size_t i = 0; i < lay.n_items; i++) st->split_items += items[i].split >= 0;
    std::vector<float> partial(lay.n_partials * ATTN_TILE_Q * (size_t)(d + 2), NAN);
    std::vector<int4> info(lay.n_map_tiles);
    std::vector<signed char> codes(lay.n_map_tiles * ATTN_TILE_Q * ATTN_TILE_K);
    const attn_tile *it = items.data(), *comb = items.data() + lay.n_items;
    float *pp = partial.data();
    attn_patch none; memset(&none, 0, sizeof none);
    if (patch) {
        int4 *ip = info.data(); signed char *cp = codes.data(); attn_patch pa = *patch;
        launch(dim3((unsigned)lay.n_map_tiles), dim3(ATTN_MAP_THREADS), [&] {
            attn_tile_map_kernel(ip, cp, it, (int)lay.n_items, group, p.window, pa); });
        for (auto &t : info)
            t.x == EDGE_CLEAN ? st->clean++ : t.x == EDGE_REMOVED ? st->removed++ : t.x == ATTN_TILE_MIXED ? st->mixed++ : st->donor++;
        if (plant) plant(info.data(), info.size());
    }
    const int4 *ip = info.data(); const signed char *cp = codes.data();
    launch(dim3((unsigned)lay.n_items), dim3(ATTN_TILE_THREADS), [&] {
        if (patch) attention_tile_kernel<true, X3>(out, pp, q, k, v, it, group, d, p.q_stride, p.kv_stride, p.scale, p.softcap, p.window, *patch, ip, cp);
        else attention_tile_kernel<false, X3>(out, pp, q, k, v, it, group, d, p.q_stride, p.kv_stride, p.scale, p.softcap, p.window, none, nullptr, nullptr); });
    if (lay.n_combine > 0)
        launch(dim3((unsigned)lay.n_combine), dim3(ROW_THREADS), [&] { attn_split_combine_kernel(out, pp, comb, group, d, p.q_stride); });
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
    {   // matmul_bf16's input rounding kernel and the bf16 product (GemmEx's operands widened, exact)
        int rows = 37, n_in = 96, n_out = 53; size_t nx = (size_t)rows * n_in;
        auto x = rnd(nx, 1), wf = rnd((size_t)n_out * n_in, .5f), b = rnd(n_out, 1);
        std::vector<uint16_t> w(wf.size()), xb(nx);
        for (size_t i = 0; i < w.size(); i++) w[i] = f32_to_bf16(wf[i]);
        std::vector<float> want((size_t)rows * n_out), got(want.size()), xw(nx), ww(w.size());
        ref->matmul_bf16(want.data(), x.data(), w.data(), b.data(), rows, n_in, n_out);
        const float *xp = x.data(); uint16_t *xbp = xb.data();
        launch(dim3(2), dim3(POINTWISE_THREADS), [&] { to_bf16_kernel(xbp, xp, nx); });
        for (size_t i = 0; i < nx; i++) xw[i] = bf16_to_f32(xb[i]);
        for (size_t i = 0; i < w.size(); i++) ww[i] = bf16_to_f32(w[i]);
        sgemm(true, false, n_out, rows, n_in, ww.data(), n_in, xw.data(), n_in, got.data(), n_out);
        float *o = got.data(); const float *bp = b.data();
        launch(dim3(3), dim3(POINTWISE_THREADS), [&] { bias_add_kernel(o, bp, rows, n_out); });
        rep("matmul-bf16", relerr(got, want));
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
    // attention: the tile items of attention_launch (attn_tiles_fill), the tile map kernel when patched, the
    // tile kernel, the split-K combine kernel; "device" memory is host memory here.
    auto attn = [&](const char *name, std::vector<attn_seq> seqs, int kv_rows, int q_rows, attn_params p) {
        size_t nq = (size_t)q_rows * p.q_stride, nk = (size_t)kv_rows * p.kv_stride;
        auto q = rnd(nq, 2), k = rnd(nk, 2), v = rnd(nk, 1);
        std::vector<float> want(nq, 0), got(nq, 0);
        ref->attention(want.data(), q.data(), k.data(), v.data(), seqs.data(), (int)seqs.size(), &p);
        tile_stats st;
        tile_attention<true>(got.data(), q.data(), k.data(), v.data(), seqs, p, nullptr, &st, nullptr);
        rep(name, relerr(got, want));
        printf("  emu %-10s   (%d items, %d split-K chunks, d %d, group %d)\n", "", st.items, st.split_items, p.head_dim,
               p.n_heads / p.n_kv_heads);
        if (!strcmp(name, "attn-d256")) {  // one tf32 pass instead of three: the precision decision, measured
            std::vector<float> one(nq, 0);
            tile_attention<false>(one.data(), q.data(), k.data(), v.data(), seqs, p, nullptr, &st, nullptr);
            double e = relerr(one, want);
            printf("  emu %-10s %.3g (one tf32 pass; must miss 2e-5)\n", "attn-1xtf32", e);
            if (!(e > 2e-5)) fails++;
        }
    };
    for (int variant = 0; variant < 3; variant++)
        attn("attn", {{0, 13, 0, 0}, {13, 1, 20, 13}, {14, 7, 0, 34}}, 41, 21,
             {4, 2, 16, 70, 40, 0.25f, variant >= 1 ? 5.0f : 0.0f, variant == 2 ? 5 : 0});
    attn("attn-long", {{0, 3, 2497, 0}, {3, 2, 1200, 2500}}, 3702, 5, {4, 2, 32, 130, 70, 0.2f, 0.0f, 0});
    attn("attn-lwin", {{0, 3, 2497, 0}, {3, 2, 1200, 2500}}, 3702, 5, {4, 2, 32, 130, 70, 0.2f, 5.0f, 1500});
    attn("attn-d256", {{0, 4, 0, 0}, {4, 2, 1030, 4}}, 4 + 1032, 6, {8, 4, 256, 2048, 1024, 1.0f / 16, 50.0f, 0});
    // several query tiles per sequence (GQA rows packed), a window shorter than a tile; head_dim 64 and 80
    attn("attn-d64", {{0, 70, 0, 0}, {70, 33, 10, 70}}, 70 + 43, 103, {6, 2, 64, 400, 130, 0.125f, 30.0f, 20});
    attn("attn-d80", {{0, 40, 0, 0}, {40, 1, 1100, 40}}, 40 + 1101, 41, {8, 2, 80, 650, 170, 0.1f, 0.0f, 0});
    // decode: one query row over 1200+ keys, split-K chunks, with and without a window
    attn("decode", {{0, 1, 1300, 0}, {1, 1, 700, 1301}}, 1301 + 701, 2, {8, 4, 256, 2048, 1024, 1.0f / 16, 50.0f, 0});
    attn("decode-win", {{0, 1, 1300, 0}, {1, 1, 700, 1301}}, 1301 + 701, 2, {8, 4, 64, 520, 260, 0.125f, 0.0f, 1000});

    // patched attention: the same host-side packing as cuda_patched_attention (attn_patch_plan/fill/at), then
    // as attention, against ref_patched_attention. need: tile classes the row must exercise (bits 1: uniform
    // donor, 2: mixed, 4: uniform removed, 8: split-K).
    auto pattn = [&](const char *name, std::vector<attn_seq> seqs, int kv_rows, int q_rows, attn_params p,
                     const edge_rule_set &rules, int n_donors, bool must_differ, int need = 0) {
        size_t nq = (size_t)q_rows * p.q_stride, nk = (size_t)kv_rows * p.kv_stride;
        auto q = rnd(nq, 2), k = rnd(nk, 2), v = rnd(nk, 1);
        std::vector<std::vector<float>> dk, dv;
        std::vector<const float *> dkp, dvp;
        for (int d = 0; d < n_donors; d++) { dk.push_back(rnd(nk, 2)); dv.push_back(rnd(nk, 1)); }
        for (int d = 0; d < n_donors; d++) { dkp.push_back(dk[d].data()); dvp.push_back(dv[d].data()); }
        std::vector<float> want(nq, 0), got(nq, 0), plain(nq, 0);
        ref->patched_attention(want.data(), q.data(), k.data(), v.data(), n_donors, dkp.data(), dvp.data(), seqs.data(),
                               (int)seqs.size(), &p, &rules);
        ref->attention(plain.data(), q.data(), k.data(), v.data(), seqs.data(), (int)seqs.size(), &p);
        if (must_differ && !(relerr(plain, want) > 1e-3)) { printf("  emu %s: the rules changed nothing\n", name); fails++; }
        attn_patch_layout lay = attn_patch_plan(seqs.data(), (int)seqs.size());
        std::vector<unsigned char> buf(lay.bytes + 16);
        unsigned char *dev = buf.data() + (16 - (uintptr_t)buf.data() % 16) % 16;  // cudaMalloc aligns far more
        attn_patch_fill(dev, &lay, &rules, seqs.data(), (int)seqs.size());
        attn_patch patch = attn_patch_at(dev, &lay, n_donors, dkp.data(), dvp.data());
        tile_stats st;
        tile_attention<true>(got.data(), q.data(), k.data(), v.data(), seqs, p, &patch, &st, nullptr);
        rep(name, relerr(got, want));
        printf("  emu %-10s   (%d items, %d split; tiles: %d clean, %d donor, %d mixed, %d removed)\n", "", st.items,
               st.split_items, st.clean, st.donor, st.mixed, st.removed);
        int have = (st.donor > 0) | (st.mixed > 0) << 1 | (st.removed > 0) << 2 | (st.split_items > 0) << 3;
        if ((have & need) != need) { printf("  emu %s: tile classes %#x, needs %#x\n", name, have, need); fails++; }
        if (st.mixed > 0 || st.donor > 0) {  // can-fail: a planted wrong tile map must be caught
            std::vector<float> bad(nq, 0);
            tile_attention<true>(bad.data(), q.data(), k.data(), v.data(), seqs, p, &patch, &st, [](int4 *info, size_t n) {
                for (size_t t = 0; t < n; t++)  // the first patched tile read as all current
                    if (info[t].x != EDGE_CLEAN && info[t].x != EDGE_REMOVED) { info[t] = make_int4(EDGE_CLEAN, 1, 1, 0); return; }
            });
            double e = relerr(bad, want);
            printf("  emu %-10s   planted map (one tile read as current): %.3g, must miss 2e-5\n", "", e);
            if (!(e > 2e-5)) fails++;
        }
    };
    {   // the inputs of tests/test_ops.c test_patched_attention (fresh random values)
        enum { T0 = 17, T1 = 9 };
        static int32_t types[T0], index[T0];
        int pattern[8] = {1, 2, 3, 4, 1, 2, 3, 4};
        types[0] = 0, index[0] = -1;
        for (int i = 1; i < T0 - 2; i++) types[i] = pattern[(i - 1) % 8], index[i] = (i - 1) / 4;
        types[T0 - 2] = 5, types[T0 - 1] = 6, index[T0 - 2] = index[T0 - 1] = 4;
        std::vector<attn_seq> seqs = {
            {0, T0, 0, 0, types, index, T0, 0},
            {T0, T1, 0, T0, types, index, T1, T0},
            {T0 + T1, 1, T0, T0 + T1, types, index, T0, T0 + T1}};
        int kv_rows = T0 + T1 + T0 + 1, q_rows = T0 + T1 + 1;
        attn_params p = {4, 2, 16, 64, 32, 0.25f, 5.0f, 6};
        edge_rule_set rules; memset(&rules, 0, sizeof rules); rules.n = 3;
        rules.rule[0] = er(1u << 1 | 1u << 3, 1u << 6 | 1u << 3, REL_ANY, 0, 0x5);
        rules.rule[1] = er(0xff, 1u << 3, REL_SAME, 1, 0xf);
        rules.rule[2] = er(0xff, 1u << 5 | 1u << 1, REL_EARLIER, 1, 0xa);
        pattn("attn-patch", seqs, kv_rows, q_rows, p, rules, 2, true, 2);
        attn_params nowin = p; nowin.window = 0; nowin.softcap = 0;
        pattn("patch-nowin", seqs, kv_rows, q_rows, nowin, rules, 2, true);
        edge_rule_set all; memset(&all, 0, sizeof all); all.n = 1;
        all.rule[0] = er(0xff, 0xff, REL_ANY, 0, 0xf);
        pattn("patch-all", {seqs[0], seqs[1]}, kv_rows, q_rows, nowin, all, 1, true, 1);
        // untyped sequences (types NULL, or n_typed 0) next to a typed one
        std::vector<attn_seq> mixed = {{0, T0, 0, 0, nullptr, nullptr, T0, 0}, {T0, T1, 0, T0, types, index, 0, T0},
                                       {T0 + T1, T1, 0, T0 + T1, types, index, T1, 5}};
        pattn("patch-mixed", mixed, T0 + 2 * T1 + 5, T0 + 2 * T1, p, rules, 2, true);
        edge_rule_set ivr = with_interventions(rules);
        pattn("patch-iv", seqs, kv_rows, q_rows, p, ivr, 2, true, 2);
        pattn("patch-iv-nowin", seqs, kv_rows, q_rows, nowin, ivr, 2, true);
        all.rule[0].source = EDGE_SRC_ZERO, all.rule[0].donor = -1;  // every edge removed: every row 0
        pattn("patch-allzero", {seqs[0], seqs[1]}, kv_rows, q_rows, nowin, all, 0, true, 4);
    }
    {   // long typed sequences: several key chunks (ATTN_CHUNK), the source choice kept per chunk; a window
        int n = 2600;
        static std::vector<int32_t> types(n), index(n);
        types[0] = 0, index[0] = -1;
        for (int i = 1; i < n - 2; i++) types[i] = 1 + (i - 1) % 4, index[i] = (i - 1) / 4;
        types[n - 2] = 5, types[n - 1] = 6, index[n - 2] = index[n - 1] = (n - 3) / 4 + 1;
        edge_rule_set rules; memset(&rules, 0, sizeof rules); rules.n = 3;
        rules.rule[0] = er(1u << 1 | 1u << 3, 1u << 6 | 1u << 3, REL_ANY, 0, 0x5);
        rules.rule[1] = er(0xff, 1u << 3, REL_SAME, 1, 0xf);
        rules.rule[2] = er(0xff, 1u << 5 | 1u << 1 | 1u << 6, REL_EARLIER, 1, 0xa);
        // queries at the end of a 2600-position typed prompt, and one decode position past it
        std::vector<attn_seq> seqs = {{0, 3, n - 3, 0, types.data(), index.data(), n, 0},
                                      {3, 1, n, n + 1, types.data(), index.data(), n, 7}};
        int kv_rows = 2 * n + 2, q_rows = 4;
        pattn("patch-long", seqs, kv_rows, q_rows, {4, 2, 32, 130, 70, 0.2f, 0.0f, 0}, rules, 2, true, 2 | 8);
        pattn("patch-lwin", seqs, kv_rows, q_rows, {4, 2, 32, 130, 70, 0.2f, 5.0f, 1500}, rules, 2, true);
        // interventions, and whole key chunks removed (x, t, y, n -> query, last on heads 0, 1: only bos and the
        // query's own positions are left, so most chunks are removed entirely)
        edge_rule_set ivr = with_interventions(rules);
        memmove(&ivr.rule[1], &ivr.rule[0], sizeof(edge_rule) * (size_t)ivr.n);
        ivr.rule[0] = er(0x1e, 1u << 5 | 1u << 6, REL_ANY, -1, 0x3, EDGE_SRC_ZERO);
        ivr.n++;
        pattn("patch-long-iv", seqs, kv_rows, q_rows, {4, 2, 32, 130, 70, 0.2f, 0.0f, 0}, ivr, 2, true, 2 | 8);
        // only the query and the last position: on heads 0, 1 whole key tiles removed next to mixed ones
        std::vector<attn_seq> rm = {{0, 2, n - 2, 0, types.data(), index.data(), n, 0}};
        pattn("patch-long-rm", rm, kv_rows, 2, {4, 2, 32, 130, 70, 0.2f, 0.0f, 0}, ivr, 2, true, 2 | 4 | 8);
        pattn("patch-lwin-iv", seqs, kv_rows, q_rows, {4, 2, 32, 130, 70, 0.2f, 5.0f, 1500}, ivr, 2, true);
    }
    // ---- Gradient kernels against the reference backend (kernels/ops.h, the gradient ops).
    {   // linear_back's cuBLAS mapping (N, N, n_in, rows, n_out) and the bf16 widening kernel
        int rows = 7, n_in = 40, n_out = 33;
        auto dy = rnd((size_t)rows * n_out, 1), w = rnd((size_t)n_out * n_in, .5f);
        std::vector<uint16_t> wb(w.size());
        for (size_t i = 0; i < w.size(); i++) wb[i] = f32_to_bf16(w[i]);
        std::vector<float> want((size_t)rows * n_in), got(want.size()), ww(w.size());
        ref->linear_back_bf16(want.data(), dy.data(), wb.data(), rows, n_in, n_out, 0);
        float *wp = ww.data(); const uint16_t *wbp = wb.data(); size_t nw = w.size();
        launch(dim3(2), dim3(POINTWISE_THREADS), [&] { bf16_widen_kernel(wp, wbp, nw); });
        sgemm(false, false, n_in, rows, n_out, ww.data(), n_in, dy.data(), n_out, got.data(), n_in);
        rep("lin_back-bf16", relerr(got, want));
    }
    {   // norm backward, dims below and above the block size, overwrite and accumulate
        for (int dim : {200, 777})
            for (int kind = 0; kind < 4; kind++) {
                int rows = 5, acc = kind & 1; size_t n = (size_t)rows * dim;
                auto x = rnd(n, 3), w = rnd(dim, 1), dy = rnd(n, 1), dx0 = rnd(n, 1);
                auto want = dx0, got = dx0;
                const float *xp = x.data(), *wp = w.data(), *dyp = dy.data(); float *op = got.data();
                if (kind < 2) {
                    ref->rmsnorm_back(want.data(), xp, wp, 1.0f, dyp, rows, dim, 1e-6f, acc);
                    launch(dim3(rows), dim3(ROW_THREADS), [&] { rmsnorm_back_kernel(op, xp, wp, 1.0f, dyp, dim, 1e-6f, acc); });
                    rep("rms_back", relerr(got, want));
                } else {
                    ref->layernorm_back(want.data(), xp, wp, dyp, rows, dim, 1e-5f, acc);
                    launch(dim3(rows), dim3(ROW_THREADS), [&] { layernorm_back_kernel(op, xp, wp, dyp, dim, 1e-5f, acc); });
                    rep("ln_back", relerr(got, want));
                }
            }
    }
    {   // rope_back, pointwise backward
        int rows = 9, n_heads = 3, head_dim = 16, stride = 50; size_t n = (size_t)rows * stride;
        int pos[9] = {0, 1, 2, 7, 100, 513, 4095, 4096, 30000}; float inv_freq[8];
        for (int i = 0; i < 8; i++) inv_freq[i] = 1.0f / powf(10000.0f, (float)(2 * i) / 12.0f);
        auto x = rnd(n, 1); auto want = x; auto got = x;
        ref->rope_back(want.data(), stride, pos, inv_freq, rows, n_heads, head_dim, 12);
        float *xp = got.data();
        launch(dim3(1), dim3(POINTWISE_THREADS), [&] { rope_back_kernel(xp, stride, pos, inv_freq, rows, n_heads, head_dim, 6); });
        rep("rope_back", relerr(got, want));
        size_t m = 1000; auto g = rnd(m, 4), u = rnd(m, 2), d = rnd(m, 1);
        for (int op = 0; op < 5; op++) {
            std::vector<float> w2(2 * m), g2(2 * m);
            float *o = g2.data(); const float *gp = g.data(), *up = u.data(), *dp = d.data();
            act_kind act = op % 2 ? ACT_GELU_TANH : ACT_SILU;
            if (op < 2) { ref->act_back(w2.data(), gp, dp, m, act); launch(dim3(2), dim3(256), [&] { act_back_kernel(o, gp, dp, m, act); }); }
            else if (op < 4) { ref->glu_back(w2.data(), w2.data() + m, gp, up, dp, m, act); launch(dim3(2), dim3(256), [&] { glu_back_kernel(o, o + m, gp, up, dp, m, act); }); }
            else { ref->softcap_back(w2.data(), up, dp, m, 3.0f); launch(dim3(2), dim3(256), [&] { softcap_back_kernel(o, up, dp, m, 3.0f); }); }
            rep("pw_back", relerr(g2, w2));
        }
    }
    {   // attention backward, edge and head scores: the host packing of cuda_attention_back / cuda_edge_scores
        enum { T0 = 17, T1 = 9 };
        static int32_t types[T0], index[T0];
        int pattern[8] = {1, 2, 3, 4, 1, 2, 3, 4};
        types[0] = 0, index[0] = -1;
        for (int i = 1; i < T0 - 2; i++) types[i] = pattern[(i - 1) % 8], index[i] = (i - 1) / 4;
        types[T0 - 2] = 5, types[T0 - 1] = 6, index[T0 - 2] = index[T0 - 1] = 4;
        std::vector<attn_seq> seqs = {{0, T0, 0, 0, types, index, T0, 0}, {T0, T1, 0, T0, types, index, T1, T0},
                                      {T0 + T1, 1, T0, T0 + T1, types, index, T0, T0 + T1}};
        int kv_rows = T0 + T1 + T0 + 1, q_rows = T0 + T1 + 1, S = 3;
        edge_rule_set rules; memset(&rules, 0, sizeof rules); rules.n = 3;
        rules.rule[0] = er(1u << 1 | 1u << 3, 1u << 6 | 1u << 3, REL_ANY, 0, 0x5);
        rules.rule[1] = er(0xff, 1u << 3, REL_SAME, 1, 0xf);
        rules.rule[2] = er(0xff, 1u << 5 | 1u << 1 | 1u << 6, REL_EARLIER, 1, 0xa);
        edge_rule_set plain_rules = rules, ivr = with_interventions(rules);
        for (int variant = 0; variant < 4; variant++) {  // plain, patched, patched without softcap/window, interventions
            bool patched = variant > 0;
            rules = variant == 3 ? ivr : plain_rules;
            attn_params p = {4, 2, 16, 70, 40, 0.25f, variant != 2 ? 5.0f : 0.0f, variant != 2 ? 6 : 0};
            size_t nq = (size_t)q_rows * p.q_stride, nk = (size_t)kv_rows * p.kv_stride;
            auto q = rnd(nq, 2), k = rnd(nk, 2), v = rnd(nk, 1), dout = rnd(nq, 1);
            std::vector<std::vector<float>> dkn = {rnd(nk, 2), rnd(nk, 2)}, dvn = {rnd(nk, 1), rnd(nk, 1)};
            const float *ck[2] = {dkn[0].data(), dkn[1].data()}, *cv[2] = {dvn[0].data(), dvn[1].data()};
            // outputs: dq, dk, dv, donor dk 0/1, donor dv 0/1, from the same junk
            std::vector<std::vector<float>> junk = {rnd(nq, 1), rnd(nk, 1), rnd(nk, 1), rnd(nk, 1), rnd(nk, 1), rnd(nk, 1), rnd(nk, 1)};
            auto want = junk, got = junk;
            float *wdk[2] = {want[3].data(), want[4].data()}, *wdv[2] = {want[5].data(), want[6].data()};
            ref->attention_back(want[0].data(), want[1].data(), want[2].data(), q.data(), k.data(), v.data(), dout.data(), 2, ck, cv,
                                wdk, wdv, seqs.data(), S, &p, patched ? &rules : nullptr);
            grad_meta_layout lay = grad_meta_plan(seqs.data(), S, 5);
            // edge_score_unit {head, sender, receiver, donor, source}; every source when variant 3
            static const int units_kv[5][5] = {{0, 1, 3, 0, 0}, {1, 2, 3, 0, 0}, {3, 4, 6, 1, 0}, {2, 0, 5, 1, 0}, {1, 1, 1, 1, 0}};
            static const int units_iv[5][5] = {{0, 1, 3, 1, 1}, {1, 2, 3, 0, 2}, {3, 4, 6, 1, 3}, {2, 3, 5, 1, 3}, {1, 1, 1, 0, 1}};
            const int (*units)[5] = variant == 3 ? units_iv : units_kv;
            std::vector<unsigned char> mbuf(lay.bytes + 16);
            unsigned char *meta = mbuf.data() + (16 - (uintptr_t)mbuf.data() % 16) % 16;
            grad_meta_fill(meta, &lay, seqs.data(), S, &units[0][0], 5, 5);
            attn_patch_layout play = attn_patch_plan(seqs.data(), S);
            std::vector<unsigned char> pbuf(play.bytes + 16);
            unsigned char *pdev = pbuf.data() + (16 - (uintptr_t)pbuf.data() % 16) % 16;
            edge_rule_set none; memset(&none, 0, sizeof none);
            attn_patch_fill(pdev, &play, patched ? &rules : &none, seqs.data(), S);
            attn_patch patch = attn_patch_at(pdev, &play, 2, ck, cv);
            std::vector<float> stats(3 * lay.total_q * p.n_heads);
            attn_grad_targets tg; memset(&tg, 0, sizeof tg);
            for (int d = 0; d < 2 && patched; d++) tg.dk[d] = got[3 + d].data(), tg.dv[d] = got[5 + d].data();
            const int4 *rows = (const int4 *)meta, *keys = (const int4 *)(meta + lay.off_keys), *seqd = (const int4 *)(meta + lay.off_seqd);
            float *st = stats.data(), *gq = got[0].data(), *gk = got[1].data(), *gv = got[2].data();
            const float *qp = q.data(), *kp = k.data(), *vp = v.data(), *op = dout.data();
            int group = p.n_heads / p.n_kv_heads;
            launch(dim3((unsigned)lay.total_q, p.n_heads), dim3(ATTN_THREADS), [&] {
                if (patched) attn_back_query_kernel<true>(gq, st, qp, kp, vp, op, rows, group, p.head_dim, p.q_stride, p.kv_stride, p.scale, p.softcap, p.window, patch);
                else attn_back_query_kernel<false>(gq, st, qp, kp, vp, op, rows, group, p.head_dim, p.q_stride, p.kv_stride, p.scale, p.softcap, p.window, patch); });
            launch(dim3((unsigned)lay.total_k, p.n_kv_heads), dim3(ATTN_THREADS), [&] {
                if (patched) attn_back_key_kernel<true>(gk, gv, tg, 2, st, qp, kp, vp, op, keys, seqd, p.n_heads, group, p.head_dim, p.q_stride, p.kv_stride, p.scale, p.softcap, p.window, patch);
                else attn_back_key_kernel<false>(gk, gv, tg, 0, st, qp, kp, vp, op, keys, seqd, p.n_heads, group, p.head_dim, p.q_stride, p.kv_stride, p.scale, p.softcap, p.window, patch); });
            const char *names[7] = {"ab:dq", "ab:dk", "ab:dv", "ab:donor-dk0", "ab:donor-dk1", "ab:donor-dv0", "ab:donor-dv1"};
            for (int i = 0; i < 7; i++) {
                double e = relerr(got[i], want[i]);
                printf("  emu %-14s %.3g%s\n", names[i], e, variant == 3 ? " (interventions)" : "");
                if (!(e <= 1e-4)) fails++;  // test_ops' attention gradient tolerance
            }
            // edge scores (the statistics of the launch above) against ref
            double sw[15], sg[15];
            ref->edge_scores(sw, qp, kp, vp, nullptr, nullptr, op, 2, ck, cv, seqs.data(), S, &p, patched ? &rules : nullptr, (const edge_score_unit *)&units[0][0], 5);
            double *sgp = sg;
            const int4 *ud = (const int4 *)(meta + lay.off_units);
            launch(dim3(5, S), dim3(ATTN_THREADS), [&] {
                edge_scores_kernel(sgp, S, st, qp, kp, vp, nullptr, nullptr, op, ud, seqd, p.n_heads, group, p.head_dim, p.q_stride, p.kv_stride, p.scale, p.softcap, p.window, patch); });
            double sc = 1e-30, e = 0;
            for (int i = 0; i < 15; i++) sc = std::max(sc, fabs(sw[i]));
            for (int i = 0; i < 15; i++) e = std::max(e, fabs(sg[i] - sw[i]) / sc);
            printf("  emu %-14s %.3g%s\n", "edge_scores", e, variant == 3 ? " (interventions)" : "");
            if (!(e <= 1e-4)) fails++;
            // with a base for the differences of the edges reading the current pass (EAP-IG)
            auto kb = rnd(nk, 2), vb = rnd(nk, 1);
            const float *kbp = kb.data(), *vbp = vb.data();
            ref->edge_scores(sw, qp, kp, vp, kbp, vbp, op, 2, ck, cv, seqs.data(), S, &p, patched ? &rules : nullptr, (const edge_score_unit *)&units[0][0], 5);
            launch(dim3(5, S), dim3(ATTN_THREADS), [&] {
                edge_scores_kernel(sgp, S, st, qp, kp, vp, kbp, vbp, op, ud, seqd, p.n_heads, group, p.head_dim, p.q_stride, p.kv_stride, p.scale, p.softcap, p.window, patch); });
            sc = 1e-30, e = 0;
            for (int i = 0; i < 15; i++) sc = std::max(sc, fabs(sw[i]));
            for (int i = 0; i < 15; i++) e = std::max(e, fabs(sg[i] - sw[i]) / sc);
            printf("  emu %-14s %.3g\n", "edge_scores-b", e);
            if (!(e <= 1e-4)) fails++;
        }
        rules = plain_rules;
        {   // head_dim 80: lane slots 0..2 of the gradient kernels, the last partly; GQA 4:1, a decode step
            std::vector<attn_seq> ws = {{0, 12, 0, 0, nullptr, nullptr, 0, 0}, {12, 1, 20, 12, nullptr, nullptr, 0, 0}};
            attn_params p = {4, 1, 80, 330, 90, 0.1f, 20.0f, 9};
            size_t nq = 13 * (size_t)p.q_stride, nk = 33 * (size_t)p.kv_stride;
            auto q = rnd(nq, 2), k = rnd(nk, 2), v = rnd(nk, 1), dout = rnd(nq, 1);
            std::vector<std::vector<float>> want = {rnd(nq, 1), rnd(nk, 1), rnd(nk, 1)}, got = want;
            ref->attention_back(want[0].data(), want[1].data(), want[2].data(), q.data(), k.data(), v.data(), dout.data(), 0,
                                nullptr, nullptr, nullptr, nullptr, ws.data(), 2, &p, nullptr);
            grad_meta_layout lay = grad_meta_plan(ws.data(), 2, 0);
            std::vector<unsigned char> mbuf(lay.bytes + 16);
            unsigned char *meta = mbuf.data() + (16 - (uintptr_t)mbuf.data() % 16) % 16;
            grad_meta_fill(meta, &lay, ws.data(), 2, nullptr, 0, 0);
            attn_patch none; memset(&none, 0, sizeof none);
            attn_grad_targets tg; memset(&tg, 0, sizeof tg);
            std::vector<float> stats(3 * lay.total_q * p.n_heads);
            const int4 *rows = (const int4 *)meta, *keys = (const int4 *)(meta + lay.off_keys), *seqd = (const int4 *)(meta + lay.off_seqd);
            float *st = stats.data(), *gq = got[0].data(), *gk = got[1].data(), *gv = got[2].data();
            const float *qp = q.data(), *kp = k.data(), *vp = v.data(), *op = dout.data();
            launch(dim3((unsigned)lay.total_q, p.n_heads), dim3(ATTN_THREADS), [&] {
                attn_back_query_kernel<false>(gq, st, qp, kp, vp, op, rows, 4, p.head_dim, p.q_stride, p.kv_stride, p.scale, p.softcap, p.window, none); });
            launch(dim3((unsigned)lay.total_k, p.n_kv_heads), dim3(ATTN_THREADS), [&] {
                attn_back_key_kernel<false>(gk, gv, tg, 0, st, qp, kp, vp, op, keys, seqd, p.n_heads, 4, p.head_dim, p.q_stride, p.kv_stride, p.scale, p.softcap, p.window, none); });
            const char *names[3] = {"ab-d80:dq", "ab-d80:dk", "ab-d80:dv"};
            for (int i = 0; i < 3; i++) {
                double e = relerr(got[i], want[i]);
                printf("  emu %-14s %.3g\n", names[i], e);
                if (!(e <= 1e-4)) fails++;
            }
        }
        {   // head scores: donor z arrays travel as the patch's donor_k
            attn_params p = {4, 2, 16, 70, 40, 0.25f, 0.0f, 0};
            size_t nq = (size_t)q_rows * p.q_stride;
            auto z = rnd(nq, 1), dz = rnd(nq, 1), z0 = rnd(nq, 1), z1 = rnd(nq, 1);
            const float *zd[2] = {z0.data(), z1.data()};
            static const int hu[3][3] = {{0, 3, 0}, {3, 6, 1}, {2, 1, 1}};
            double hw[9], hg[9];
            ref->head_scores(hw, z.data(), zd, dz.data(), seqs.data(), S, &p, (const head_score_unit *)&hu[0][0], 3);
            grad_meta_layout lay = grad_meta_plan(seqs.data(), S, 3);
            std::vector<unsigned char> mbuf(lay.bytes + 16);
            unsigned char *meta = mbuf.data() + (16 - (uintptr_t)mbuf.data() % 16) % 16;
            grad_meta_fill(meta, &lay, seqs.data(), S, &hu[0][0], 3, 3);
            attn_patch_layout play = attn_patch_plan(seqs.data(), S);
            std::vector<unsigned char> pbuf(play.bytes + 16);
            unsigned char *pdev = pbuf.data() + (16 - (uintptr_t)pbuf.data() % 16) % 16;
            edge_rule_set none; memset(&none, 0, sizeof none);
            attn_patch_fill(pdev, &play, &none, seqs.data(), S);
            attn_patch patch = attn_patch_at(pdev, &play, 2, zd, zd);
            double *hgp = hg; const float *zp = z.data(), *dzp = dz.data();
            const int4 *ud = (const int4 *)(meta + lay.off_units), *seqd = (const int4 *)(meta + lay.off_seqd);
            launch(dim3(3, S), dim3(ROW_THREADS), [&] { head_scores_kernel(hgp, S, zp, dzp, ud, seqd, p.head_dim, p.q_stride, patch); });
            double sc = 1e-30, e = 0;
            for (int i = 0; i < 9; i++) sc = std::max(sc, fabs(hw[i]));
            for (int i = 0; i < 9; i++) e = std::max(e, fabs(hg[i] - hw[i]) / sc);
            printf("  emu %-14s %.3g\n", "head_scores", e);
            if (!(e <= 1e-12)) fails++;
        }
    }
    // ---- Metric kernels (kernels/ops.h, the metric ops) against the reference backend.
    {   // kl_div_rows: a row longer than the block, a wide logit range, identical rows
        int R = 3, n = 1000;
        auto x = rnd((size_t)R * n, 8), y = rnd((size_t)R * n, 8);
        for (int i = 0; i < n; i++) x[i] *= 40;
        for (int i = 0; i < n; i++) y[2 * n + i] = x[2 * n + i];
        std::vector<float> want(R), got(R, NAN);
        ref->kl_div_rows(want.data(), x.data(), y.data(), R, n);
        float *o = got.data(); const float *xp = x.data(), *yp = y.data();
        launch(dim3(R), dim3(ROW_THREADS), [&] { kl_div_rows_kernel(o, xp, yp, n); });
        rep("kl_div", relerr(got, want));
        if (got[2] != 0.0f) { printf("  emu kl_div of identical rows %g\n", got[2]); fails++; }
    }
    {   // logit_metrics: rows longer than the block, ties at the max (target behind and ahead), -inf logits,
        // logits near the fp32 range, a given second token; argmax and other must match ref exactly
        int R = 6, n = 1000;
        auto x = rnd((size_t)R * n, 8);
        x[1 * n + 5] = x[1 * n + 700] = x[1 * n + 900] = 20;
        x[2 * n + 3] = x[2 * n + 600] = 20;
        for (int i = 0; i < n; i++) x[3 * n + i] *= 4e37f;
        for (int i = 1; i < n; i += 2) x[4 * n + i] = -INFINITY;
        std::vector<int> target = {17, 700, 3, 250, 10, 42}, other = {-1, -1, -1, -1, -1, 999}, tokens(2 * R);
        for (int r = 0; r < R; r++) tokens[2 * r] = target[r], tokens[2 * r + 1] = other[r];
        std::vector<logit_row_metrics> want(R), got(R);
        ref->logit_metrics(want.data(), x.data(), target.data(), other.data(), R, n);
        logit_row_metrics *o = got.data(); const float *xp = x.data(); const int *tp = tokens.data();
        launch(dim3(R), dim3(ROW_THREADS), [&] { logit_metrics_kernel(o, xp, tp, n); });
        double e = 0;
        for (int r = 0; r < R; r++) {
            if (got[r].argmax != want[r].argmax || got[r].other != want[r].other) e = 1;
            float g[3] = {got[r].target_logprob, got[r].logit_diff, got[r].log_sum_exp};
            float w[3] = {want[r].target_logprob, want[r].logit_diff, want[r].log_sum_exp};
            for (int f = 0; f < 3; f++)
                e = std::max(e, std::isinf(w[f]) || std::isinf(g[f]) ? (g[f] == w[f] ? 0.0 : 1.0)
                                                                      : fabs((double)g[f] - w[f]) / std::max(1.0, fabs((double)w[f])));
        }
        rep("logit_met", e);
    }
    {   // attention_row_stats: the patched-attention inputs, patched and plain, with and without a window
        enum { T0 = 17, T1 = 9 };
        static int32_t types[T0], index[T0];
        int pattern[8] = {1, 2, 3, 4, 1, 2, 3, 4};
        types[0] = 0, index[0] = -1;
        for (int i = 1; i < T0 - 2; i++) types[i] = pattern[(i - 1) % 8], index[i] = (i - 1) / 4;
        types[T0 - 2] = 5, types[T0 - 1] = 6, index[T0 - 2] = index[T0 - 1] = 4;
        std::vector<attn_seq> seqs = {{0, T0, 0, 0, types, index, T0, 0}, {T0, T1, 0, T0, types, index, T1, T0},
                                      {T0 + T1, 1, T0, T0 + T1, types, index, T0, T0 + T1},
                                      {T0 + T1 + 1, 2, 3, 0, nullptr, nullptr, 0, 0}};
        int kv_rows = T0 + T1 + T0 + 1, q_rows = T0 + T1 + 3, S = 4, NT = 7;
        edge_rule_set rules; memset(&rules, 0, sizeof rules); rules.n = 3;
        rules.rule[0] = er(1u << 1 | 1u << 3, 1u << 6 | 1u << 3, REL_ANY, 0, 0x5);
        rules.rule[1] = er(0xff, 1u << 3, REL_SAME, 1, 0xf);
        rules.rule[2] = er(0xff, 1u << 5 | 1u << 1 | 1u << 6, REL_EARLIER, 1, 0xa);
        edge_rule_set none; memset(&none, 0, sizeof none);
        edge_rule_set plain_rules = rules, ivr = with_interventions(rules);
        for (int variant = 0; variant < 4; variant++) {  // 3: interventions (k-only keys, removed edges, empty rows)
            bool patched = variant != 1;
            rules = variant == 3 ? ivr : plain_rules;
            attn_params p = {4, 2, 16, 70, 40, 0.25f, variant != 2 ? 5.0f : 0.0f, variant != 2 ? 6 : 0};
            size_t nq = (size_t)q_rows * p.q_stride, nk = (size_t)kv_rows * p.kv_stride, nr = (size_t)q_rows * p.n_heads;
            auto q = rnd(nq, 2), k = rnd(nk, 2), d0 = rnd(nk, 2), d1 = rnd(nk, 2);
            const float *dk[2] = {d0.data(), d1.data()};
            std::vector<float> we(nr), wm(nr * NT), ge(nr, NAN), gm(nr * NT, NAN);
            ref->attention_row_stats(we.data(), wm.data(), NT, q.data(), k.data(), 2, dk, seqs.data(), S, &p,
                                     patched ? &rules : nullptr);
            std::vector<int4> rows(q_rows);
            attn_rows_fill(rows.data(), seqs.data(), S);
            attn_patch_layout lay = attn_patch_plan(seqs.data(), S);
            std::vector<unsigned char> buf(lay.bytes + 16);
            unsigned char *dev = buf.data() + (16 - (uintptr_t)buf.data() % 16) % 16;
            attn_patch_fill(dev, &lay, patched ? &rules : &none, seqs.data(), S);
            attn_patch patch = attn_patch_at(dev, &lay, 2, dk, dk);
            float *ep = ge.data(), *mp = gm.data(); const float *qp = q.data(), *kp = k.data(); const int4 *rp = rows.data();
            launch(dim3((unsigned)q_rows, p.n_heads), dim3(ATTN_THREADS), [&] {
                if (patched) attention_row_stats_kernel<true>(ep, mp, NT, qp, kp, rp, p.n_heads, 2, p.head_dim, p.q_stride, p.kv_stride, p.scale, p.softcap, p.window, patch);
                else attention_row_stats_kernel<false>(ep, mp, NT, qp, kp, rp, p.n_heads, 2, p.head_dim, p.q_stride, p.kv_stride, p.scale, p.softcap, p.window, patch); });
            rep("rowstat-ent", relerr(ge, we));
            rep("rowstat-mass", relerr(gm, wm));
        }
    }
    printf("emu: %d failures\n", fails);
    return fails != 0;
}
