// Every op of every available backend (cpu, and cuda where a GPU is present) against the reference
// backend on fresh random inputs, with the worst relative error printed per op. A sibling check feeds
// a deliberately wrong input to prove the comparison can fail. Then the cpu backend's products (matmul,
// bf16 matmul, attention, patched attention, and cpu_sgemm as the backward calls it) on awkward shapes in
// child processes started with OPENBLAS_NUM_THREADS / OMP_NUM_THREADS = 1, 2 and 3: the bytes must
// be the same (docs/distribution.md).
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kernels/bf16.h"
#include "kernels/cpu_gemm.h"
#include "kernels/ops.h"
#include "pipeline/error.h"
#include "tests/harness.h"

static unsigned long long rng_state = 0x9E3779B97F4A7C15ull;

static float frand(void) {  // uniform in [-1, 1)
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)((rng_state >> 40) / (double)(1ull << 24)) * 2.0f - 1.0f;
}

static float *random_floats(size_t n, float amplitude) {
    float *x = ep_malloc(sizeof(float) * n);
    for (size_t i = 0; i < n; i++) x[i] = frand() * amplitude;
    return x;
}

// Runs the op on backend `b` by copying the inputs in and the output back, so one helper serves the
// host and device backends alike.
typedef struct {
    const kernel_ops *b;
    void *dev[8];
    int n;
} staging;

static void *stage_in(staging *s, const void *host, size_t bytes) {
    void *d = s->b->alloc(bytes);
    s->b->upload(d, host, bytes);
    s->dev[s->n++] = d;
    return d;
}

static void stage_out(staging *s, void *host, const void *dev, size_t bytes) {
    s->b->sync();
    s->b->download(host, dev, bytes);
}

static void stage_free(staging *s) {
    for (int i = 0; i < s->n; i++) s->b->release(s->dev[i]);
    s->n = 0;
}

static const double tol = 2e-5;

static void report(const char *backend, const char *op, double err, double limit) {
    printf("  %-5s %-10s max rel error %.3g\n", backend, op, err);
    check(err <= limit, "%s %s: max rel error %.3g > %.3g", backend, op, err, limit);
}

static void test_matmul(const kernel_ops *b, const kernel_ops *ref) {
    int rows = 37, n_in = 96, n_out = 53;
    float *x = random_floats((size_t)rows * n_in, 1), *w = random_floats((size_t)n_out * n_in, 0.5f);
    float *bias = random_floats((size_t)n_out, 1);
    float *want = ep_malloc(sizeof(float) * (size_t)rows * n_out), *got = ep_malloc(sizeof(float) * (size_t)rows * n_out);
    for (int with_bias = 0; with_bias < 2; with_bias++) {
        ref->matmul(want, x, w, with_bias ? bias : NULL, rows, n_in, n_out);
        staging s = {.b = b};
        float *dx = stage_in(&s, x, sizeof(float) * (size_t)rows * n_in);
        float *dw = stage_in(&s, w, sizeof(float) * (size_t)n_out * n_in);
        float *db = stage_in(&s, bias, sizeof(float) * (size_t)n_out);
        float *dout = stage_in(&s, got, sizeof(float) * (size_t)rows * n_out);
        b->matmul(dout, dx, dw, with_bias ? db : NULL, rows, n_in, n_out);
        stage_out(&s, got, dout, sizeof(float) * (size_t)rows * n_out);
        stage_free(&s);
        report(b->name, with_bias ? "matmul+b" : "matmul", max_rel_error(got, want, (size_t)rows * n_out, 1e-6), tol);
    }
    // The comparison must be able to fail: a perturbed weight gives a visible error.
    w[5] += 0.25f;
    float *perturbed = ep_malloc(sizeof(float) * (size_t)rows * n_out);
    ref->matmul(perturbed, x, w, bias, rows, n_in, n_out);
    check(max_rel_error(perturbed, want, (size_t)rows * n_out, 1e-6) > 100 * tol, "perturbed weight not detected");
    free(perturbed);
    free(x), free(w), free(bias), free(want), free(got);
}

// The bf16 product against the reference's: x rounded to bf16, bf16 weights, wide accumulation.
static void test_matmul_bf16(const kernel_ops *b, const kernel_ops *ref) {
    int rows = 37, n_in = 300, n_out = 301;  // n_out above the cpu backend's block of weight rows
    size_t nw = (size_t)n_out * n_in, no = (size_t)rows * n_out;
    float *x = random_floats((size_t)rows * n_in, 1), *wf = random_floats(nw, 0.5f), *bias = random_floats(n_out, 1);
    uint16_t *w = ep_malloc(sizeof(uint16_t) * nw);
    for (size_t i = 0; i < nw; i++) w[i] = f32_to_bf16(wf[i]), wf[i] = bf16_to_f32(w[i]);
    float *want = ep_malloc(sizeof(float) * no), *got = ep_malloc(sizeof(float) * no);
    ref->matmul_bf16(want, x, w, bias, rows, n_in, n_out);
    staging s = {.b = b};
    float *dx = stage_in(&s, x, sizeof(float) * (size_t)rows * n_in);
    uint16_t *dw = stage_in(&s, w, sizeof(uint16_t) * nw);
    float *db = stage_in(&s, bias, sizeof(float) * (size_t)n_out);
    float *dout = stage_in(&s, got, sizeof(float) * no);
    b->matmul_bf16(dout, dx, dw, db, rows, n_in, n_out);
    stage_out(&s, got, dout, sizeof(float) * no);
    stage_free(&s);
    report(b->name, "matmul-bf16", max_rel_error(got, want, no, 1e-6), tol);
    // Can fail: the same weights with x not rounded to bf16 differ far beyond the tolerance.
    float *unrounded = ep_malloc(sizeof(float) * no);
    ref->matmul(unrounded, x, wf, bias, rows, n_in, n_out);
    check(max_rel_error(unrounded, want, no, 1e-6) > 10 * tol, "bf16 rounding of x not visible");
    free(unrounded);
    free(x), free(wf), free(w), free(bias), free(want), free(got);
}

static void test_norms(const kernel_ops *b, const kernel_ops *ref) {
    int rows = 11, dim = 200;
    size_t n = (size_t)rows * dim;
    float *x = random_floats(n, 3), *w = random_floats((size_t)dim, 1), *bias = random_floats((size_t)dim, 1);
    float *want = ep_malloc(sizeof(float) * n), *got = ep_malloc(sizeof(float) * n);
    for (int kind = 0; kind < 3; kind++) {
        staging s = {.b = b};
        float *dx = stage_in(&s, x, sizeof(float) * n), *dw = stage_in(&s, w, sizeof(float) * (size_t)dim);
        float *dbias = stage_in(&s, bias, sizeof(float) * (size_t)dim), *dout = stage_in(&s, got, sizeof(float) * n);
        const char *name;
        if (kind < 2) {
            float offset = kind == 0 ? 0.0f : 1.0f;
            ref->rmsnorm(want, x, w, offset, rows, dim, 1e-6f);
            b->rmsnorm(dout, dx, dw, offset, rows, dim, 1e-6f);
            name = kind == 0 ? "rmsnorm" : "rmsnorm+1";
        } else {
            ref->layernorm(want, x, w, bias, rows, dim, 1e-5f);
            b->layernorm(dout, dx, dw, dbias, rows, dim, 1e-5f);
            name = "layernorm";
        }
        stage_out(&s, got, dout, sizeof(float) * n);
        stage_free(&s);
        report(b->name, name, max_rel_error(got, want, n, 1e-6), tol);
    }
    free(x), free(w), free(bias), free(want), free(got);
}

static void test_rope(const kernel_ops *b, const kernel_ops *ref) {
    int rows = 9, n_heads = 3, head_dim = 16, stride = 50;
    size_t n = (size_t)rows * stride;
    int pos[9] = {0, 1, 2, 7, 100, 513, 4095, 4096, 30000};
    float inv_freq[8];
    for (int i = 0; i < 8; i++) inv_freq[i] = 1.0f / powf(10000.0f, (float)(2 * i) / 12.0f);
    for (int rot_dim = 12; rot_dim <= 16; rot_dim += 4) {  // partial and full rotary
        float *x = random_floats(n, 1), *want = ep_malloc(sizeof(float) * n), *got = ep_malloc(sizeof(float) * n);
        memcpy(want, x, sizeof(float) * n);
        ref->rope(want, stride, pos, inv_freq, rows, n_heads, head_dim, rot_dim);
        staging s = {.b = b};
        float *dx = stage_in(&s, x, sizeof(float) * n);
        int *dpos = stage_in(&s, pos, sizeof pos);
        float *dfreq = stage_in(&s, inv_freq, sizeof inv_freq);
        b->rope(dx, stride, dpos, dfreq, rows, n_heads, head_dim, rot_dim);
        stage_out(&s, got, dx, sizeof(float) * n);
        stage_free(&s);
        report(b->name, rot_dim == 16 ? "rope" : "rope-part", max_rel_error(got, want, n, 1e-6), tol);
        free(x), free(want), free(got);
    }
}

static void test_pointwise(const kernel_ops *b, const kernel_ops *ref) {
    size_t n = 1000;
    float *g = random_floats(n, 4), *u = random_floats(n, 2);
    float *want = ep_malloc(sizeof(float) * n), *got = ep_malloc(sizeof(float) * n);
    for (int op = 0; op < 6; op++) {
        staging s = {.b = b};
        float *dg = stage_in(&s, g, sizeof(float) * n), *du = stage_in(&s, u, sizeof(float) * n);
        float *dout = stage_in(&s, g, sizeof(float) * n);
        memcpy(want, g, sizeof(float) * n);
        const char *name = "";
        switch (op) {
        case 0: ref->glu(want, g, u, n, ACT_SILU), b->glu(dout, dg, du, n, ACT_SILU), name = "glu-silu"; break;
        case 1: ref->glu(want, g, u, n, ACT_GELU_TANH), b->glu(dout, dg, du, n, ACT_GELU_TANH), name = "glu-gelu"; break;
        case 2: ref->act(want, n, ACT_GELU_TANH), b->act(dout, n, ACT_GELU_TANH), name = "gelu"; break;
        case 3: ref->softcap(want, n, 3.0f), b->softcap(dout, n, 3.0f), name = "softcap"; break;
        case 4: ref->add(want, u, n), b->add(dout, du, n), name = "add"; break;
        case 5: ref->scale(want, n, 0.7f), b->scale(dout, n, 0.7f), name = "scale"; break;
        }
        stage_out(&s, got, dout, sizeof(float) * n);
        stage_free(&s);
        report(b->name, name, max_rel_error(got, want, n, 1e-6), tol);
    }
    free(g), free(u), free(want), free(got);
}

static void test_attention(const kernel_ops *b, const kernel_ops *ref) {
    // Three sequences of different lengths packed in one buffer, one of them a decode step reading a
    // longer cache (q_pos > 0), GQA 4:2, with and without softcap and a window shorter than the prompt.
    attn_seq seqs[3] = {{.q_row = 0, .n_q = 13, .q_pos = 0, .kv_row = 0},
                        {.q_row = 13, .n_q = 1, .q_pos = 20, .kv_row = 13},
                        {.q_row = 14, .n_q = 7, .q_pos = 0, .kv_row = 34}};
    int kv_rows = 41, q_rows = 21;
    for (int variant = 0; variant < 3; variant++) {
        attn_params p = {.n_heads = 4, .n_kv_heads = 2, .head_dim = 16, .q_stride = 70, .kv_stride = 40,
                         .scale = 0.25f, .softcap = variant >= 1 ? 5.0f : 0.0f, .window = variant == 2 ? 5 : 0};
        size_t nq = (size_t)q_rows * p.q_stride, nk = (size_t)kv_rows * p.kv_stride;
        float *q = random_floats(nq, 2), *k = random_floats(nk, 2), *v = random_floats(nk, 1);
        float *want = ep_calloc(nq, sizeof(float)), *got = ep_calloc(nq, sizeof(float));
        ref->attention(want, q, k, v, seqs, 3, &p);
        staging s = {.b = b};
        float *dq = stage_in(&s, q, sizeof(float) * nq), *dk = stage_in(&s, k, sizeof(float) * nk);
        float *dv = stage_in(&s, v, sizeof(float) * nk), *dout = stage_in(&s, got, sizeof(float) * nq);
        b->attention(dout, dq, dk, dv, seqs, 3, &p);
        stage_out(&s, got, dout, sizeof(float) * nq);
        stage_free(&s);
        const char *names[3] = {"attn", "attn-cap", "attn-win"};
        report(b->name, names[variant], max_rel_error(got, want, nq, 1e-6), tol);
        if (variant == 2) {  // without the window the answer must differ: proves the window is exercised
            attn_params nowin = p;
            nowin.window = 0;
            ref->attention(got, q, k, v, seqs, 3, &nowin);
            check(max_rel_error(got, want, nq, 1e-6) > 1e-3, "window had no effect");
        }
        free(q), free(k), free(v), free(want), free(got);
    }
}

// Long key ranges: a few queries that each see thousands of keys, so a backend that walks the keys in
// chunks (cuda: 1024 at a time with an online softmax) crosses chunk boundaries, with and without a
// window that starts the range mid-chunk.
static void test_attention_long(const kernel_ops *b, const kernel_ops *ref) {
    attn_seq seqs[2] = {{.q_row = 0, .n_q = 3, .q_pos = 2497, .kv_row = 0}, {.q_row = 3, .n_q = 2, .q_pos = 1200, .kv_row = 2500}};
    int kv_rows = 2500 + 1202, q_rows = 5;
    for (int variant = 0; variant < 2; variant++) {
        attn_params p = {.n_heads = 4, .n_kv_heads = 2, .head_dim = 32, .q_stride = 130, .kv_stride = 70,
                         .scale = 0.2f, .softcap = variant == 1 ? 5.0f : 0.0f, .window = variant == 1 ? 1500 : 0};
        size_t nq = (size_t)q_rows * p.q_stride, nk = (size_t)kv_rows * p.kv_stride;
        float *q = random_floats(nq, 2), *k = random_floats(nk, 2), *v = random_floats(nk, 1);
        float *want = ep_calloc(nq, sizeof(float)), *got = ep_calloc(nq, sizeof(float));
        ref->attention(want, q, k, v, seqs, 2, &p);
        staging s = {.b = b};
        float *dq = stage_in(&s, q, sizeof(float) * nq), *dk = stage_in(&s, k, sizeof(float) * nk);
        float *dv = stage_in(&s, v, sizeof(float) * nk), *dout = stage_in(&s, got, sizeof(float) * nq);
        b->attention(dout, dq, dk, dv, seqs, 2, &p);
        stage_out(&s, got, dout, sizeof(float) * nq);
        stage_free(&s);
        report(b->name, variant == 0 ? "attn-long" : "attn-lwin", max_rel_error(got, want, nq, 1e-6), tol);
        free(q), free(k), free(v), free(want), free(got);
    }
}

// Patched attention: backend against the reference on random rules, and three invariants that do not
// depend on either implementation: no rules = plain attention; donors equal to the current keys and
// values = plain attention; every edge ablated with donor 0 = plain attention over donor 0's keys and
// values (queries still from the current pass).
static void test_patched_attention(const kernel_ops *b, const kernel_ops *ref) {
    if (!b->patched_attention) {
        printf("  %-5s patched attention not implemented in this backend\n", b->name);
        return;
    }
    enum { T0 = 17, T1 = 9 };
    // types/index of a small ICL-like prompt: bos x t y n x t y n query last ...
    int32_t types[T0], index[T0];
    int pattern[8] = {1, 2, 3, 4, 1, 2, 3, 4};
    types[0] = 0, index[0] = -1;
    for (int i = 1; i < T0 - 2; i++) types[i] = pattern[(i - 1) % 8], index[i] = (i - 1) / 4;
    types[T0 - 2] = 5, types[T0 - 1] = 6, index[T0 - 2] = index[T0 - 1] = 4;
    attn_seq seqs[3] = {
        {.q_row = 0, .n_q = T0, .q_pos = 0, .kv_row = 0, .types = types, .index = index, .n_typed = T0, .donor_row = 0},
        {.q_row = T0, .n_q = T1, .q_pos = 0, .kv_row = T0, .types = types, .index = index, .n_typed = T1, .donor_row = T0},
        // a decode step past the typed prompt: its row is untyped and must read current keys only
        {.q_row = T0 + T1, .n_q = 1, .q_pos = T0, .kv_row = T0 + T1, .types = types, .index = index, .n_typed = T0,
         .donor_row = T0 + T1}};
    int kv_rows = T0 + T1 + T0 + 1, q_rows = T0 + T1 + 1;
    attn_params p = {.n_heads = 4, .n_kv_heads = 2, .head_dim = 16, .q_stride = 64, .kv_stride = 32, .scale = 0.25f,
                     .softcap = 5.0f, .window = 6};
    size_t nq = (size_t)q_rows * p.q_stride, nk = (size_t)kv_rows * p.kv_stride;
    float *q = random_floats(nq, 2), *k = random_floats(nk, 2), *v = random_floats(nk, 1);
    float *dk[2] = {random_floats(nk, 2), random_floats(nk, 2)}, *dv[2] = {random_floats(nk, 1), random_floats(nk, 1)};
    // A donor cache holds a prompt's positions only: whatever lies past them (NaN here, in the decode step's
    // donor row) must never reach the output, not even as 0 x NaN.
    for (int d = 0; d < 2; d++)
        for (int c = 0; c < p.kv_stride; c++) dk[d][(size_t)(kv_rows - 1) * p.kv_stride + c] = dv[d][(size_t)(kv_rows - 1) * p.kv_stride + c] = NAN;
    float *want = ep_calloc(nq, sizeof(float)), *got = ep_calloc(nq, sizeof(float)), *plain = ep_calloc(nq, sizeof(float));
    edge_rule_set rules = {.n = 3};
    rules.rule[0] = (edge_rule){.sender_types = 1u << 1 | 1u << 3, .receiver_types = 1u << 6 | 1u << 3,
                                .relation = REL_ANY, .donor = 0, .heads = {0x5}};
    rules.rule[1] = (edge_rule){.sender_types = 0xff, .receiver_types = 1u << 3, .relation = REL_SAME, .donor = 1,
                                .heads = {0xf}};
    rules.rule[2] = (edge_rule){.sender_types = 0xff, .receiver_types = 1u << 5 | 1u << 1, .relation = REL_EARLIER,
                                .donor = 1, .heads = {0xa}};
    const float *dkc[2] = {dk[0], dk[1]}, *dvc[2] = {dv[0], dv[1]};
    ref->patched_attention(want, q, k, v, 2, dkc, dvc, seqs, 3, &p, &rules);
    staging s = {.b = b};
    float *bq = stage_in(&s, q, sizeof(float) * nq), *bk = stage_in(&s, k, sizeof(float) * nk);
    float *bv = stage_in(&s, v, sizeof(float) * nk), *bout = stage_in(&s, got, sizeof(float) * nq);
    const float *bdk[2] = {stage_in(&s, dk[0], sizeof(float) * nk), stage_in(&s, dk[1], sizeof(float) * nk)};
    const float *bdv[2] = {stage_in(&s, dv[0], sizeof(float) * nk), stage_in(&s, dv[1], sizeof(float) * nk)};
    b->patched_attention(bout, bq, bk, bv, 2, bdk, bdv, seqs, 3, &p, &rules);
    stage_out(&s, got, bout, sizeof(float) * nq);
    stage_free(&s);
    report(b->name, "attn-patch", max_rel_error(got, want, nq, 1e-6), tol);
    ref->attention(plain, q, k, v, seqs, 3, &p);
    check(max_rel_error(want, plain, nq, 1e-6) > 1e-3, "the rules changed nothing: the test does not exercise them");
    // The decode row is untyped: it must equal plain attention.
    size_t row = (size_t)(T0 + T1) * p.q_stride;
    check(max_rel_error(want + row, plain + row, (size_t)p.q_stride, 1e-6) < 1e-6, "untyped row was patched");

    if (b == kernel_ops_cpu()) {  // invariants, once, on the host
        edge_rule_set none = {.n = 0};
        b->patched_attention(got, q, k, v, 2, dkc, dvc, seqs, 3, &p, &none);
        check(max_rel_error(got, plain, nq, 1e-6) < 1e-6, "no rules != plain attention");
        const float *same_k[2] = {k, k}, *same_v[2] = {v, v};
        b->patched_attention(got, q, k, v, 2, same_k, same_v, seqs, 3, &p, &rules);
        check(max_rel_error(got, plain, nq, 1e-6) < 1e-6, "donors equal to the current pass changed the result");
        edge_rule_set all = {.n = 1};
        all.rule[0] = (edge_rule){.sender_types = 0xff, .receiver_types = 0xff, .relation = REL_ANY, .donor = 0,
                                  .heads = {0xf}};
        b->patched_attention(got, q, k, v, 2, dkc, dvc, seqs, 2, &p, &all);
        ref->attention(plain, q, dk[0], dv[0], seqs, 2, &p);
        check(max_rel_error(got, plain, (size_t)(T0 + T1) * p.q_stride, 1e-6) < 1e-5,
              "all edges from donor 0 != attention over donor 0's keys and values");
        printf("  %-5s attn-patch invariants: no rules, donor = current, all edges = donor attention: ok\n", b->name);
    }
    free(q), free(k), free(v), free(dk[0]), free(dk[1]), free(dv[0]), free(dv[1]), free(want), free(got), free(plain);
}

// copy_rows (strided rows, as the forward pass writes the KV cache and substitutes head outputs) and
// gather_rows (the embedding and logits-row gathers): pure copies, so the result must be bit-exact.
static void test_copies(const kernel_ops *b, const kernel_ops *ref) {
    const int rows = 7, src_stride = 40, dst_stride = 33, row_len = 29, n_src = 50, n_idx = 12;
    float *src = random_floats((size_t)n_src * src_stride, 1.0f);
    float *dst0 = random_floats((size_t)rows * dst_stride, 1.0f);
    float *want = ep_malloc(sizeof(float) * (size_t)rows * dst_stride), *got = ep_malloc(sizeof(float) * (size_t)rows * dst_stride);
    memcpy(want, dst0, sizeof(float) * (size_t)rows * dst_stride);
    ref->copy_rows(want + 3, dst_stride, src + 5, src_stride, rows, row_len);
    staging s = {.b = b};
    float *d_src = stage_in(&s, src, sizeof(float) * (size_t)n_src * src_stride);
    float *d_dst = stage_in(&s, dst0, sizeof(float) * (size_t)rows * dst_stride);
    b->copy_rows(d_dst + 3, dst_stride, d_src + 5, src_stride, rows, row_len);
    stage_out(&s, got, d_dst, sizeof(float) * (size_t)rows * dst_stride);
    check(!memcmp(got, want, sizeof(float) * (size_t)rows * dst_stride), "%s copy_rows differs from ref", b->name);
    stage_free(&s);

    // Negative indices give zero rows; the output starts as non-zero junk so a skipped row shows.
    int idx[12] = {3, 0, 49, -1, 17, 8, 8, 21, -1, 48, 30, 2};
    float *gwant = ep_malloc(sizeof(float) * (size_t)n_idx * src_stride), *ggot = ep_malloc(sizeof(float) * (size_t)n_idx * src_stride);
    float *junk = random_floats((size_t)n_idx * src_stride, 1.0f);
    memcpy(gwant, junk, sizeof(float) * (size_t)n_idx * src_stride);
    ref->gather_rows(gwant, src, idx, n_idx, src_stride);
    d_src = stage_in(&s, src, sizeof(float) * (size_t)n_src * src_stride);
    int *d_idx = stage_in(&s, idx, sizeof idx);
    float *d_out = stage_in(&s, junk, sizeof(float) * (size_t)n_idx * src_stride);
    b->gather_rows(d_out, d_src, d_idx, n_idx, src_stride);
    stage_out(&s, ggot, d_out, sizeof(float) * (size_t)n_idx * src_stride);
    int ok = !memcmp(ggot, gwant, sizeof(float) * (size_t)n_idx * src_stride);
    for (int i = 0; i < n_idx; i++)
        for (int c = 0; c < src_stride; c++)
            ok &= gwant[(size_t)i * src_stride + c] == (idx[i] < 0 ? 0.0f : src[(size_t)idx[i] * src_stride + c]);
    check(ok, "%s gather_rows differs from ref or from the source rows (zeros for negative indices)", b->name);
    printf("  %-5s copy_rows, gather_rows: bit-exact\n", b->name);
    stage_free(&s);
    free(src), free(dst0), free(want), free(got), free(gwant), free(ggot), free(junk);
}

// The thread probe: products whose bits OpenBLAS's own threading changed (shapes from issue 19: e.g.
// 68 x 108 x 579 NoTrans/Trans, 119 x 264 x 532 NoTrans/NoTrans, 189 x 624 x 496), written one after the
// other to `path`, preceded by the pool's thread count. Inputs come from the file's fixed seed, so
// every child computes the same products.
enum { N_PROBE_PARTS = 10 };
static const char *const probe_names[N_PROBE_PARTS] = {
    "matmul 68x579->108", "matmul+b 189x496->624", "matmul 300x576->1536", "matmul-bf16 68x579->600",
    "sgemm NN 119x264x532", "sgemm TN 200x64x300", "sgemm NT 189x624x496", "sgemm NN 8x576x4000",
    "attention 2 seqs x 4 heads, 300 queries", "patched attention 300 queries"};

static void write_floats(FILE *f, const float *x, size_t n) { fwrite(x, sizeof(float), n, f); }

static int thread_probe(const char *path) {
    const kernel_ops *b = kernel_ops_cpu();
    FILE *f = fopen(path, "wb");
    if (!f) return 1;
    int threads = cpu_threads();
    fwrite(&threads, sizeof threads, 1, f);
    static const int mm[3][3] = {{68, 579, 108}, {189, 496, 624}, {300, 576, 1536}};  // rows, n_in, n_out
    for (int i = 0; i < 3; i++) {
        int rows = mm[i][0], n_in = mm[i][1], n_out = mm[i][2];
        float *x = random_floats((size_t)rows * n_in, 1), *w = random_floats((size_t)n_out * n_in, 0.5f);
        float *bias = random_floats((size_t)n_out, 1), *out = ep_malloc(sizeof(float) * (size_t)rows * n_out);
        b->matmul(out, x, w, i == 1 ? bias : NULL, rows, n_in, n_out);
        write_floats(f, out, (size_t)rows * n_out);
        free(x), free(w), free(bias), free(out);
    }
    {
        int rows = 68, n_in = 579, n_out = 600;
        float *x = random_floats((size_t)rows * n_in, 1), *wf = random_floats((size_t)n_out * n_in, 0.5f);
        uint16_t *w = ep_malloc(sizeof(uint16_t) * (size_t)n_out * n_in);
        for (size_t i = 0; i < (size_t)n_out * n_in; i++) w[i] = f32_to_bf16(wf[i]);
        float *out = ep_malloc(sizeof(float) * (size_t)rows * n_out);
        b->matmul_bf16(out, x, w, NULL, rows, n_in, n_out);
        write_floats(f, out, (size_t)rows * n_out);
        free(x), free(wf), free(w), free(out);
    }
    // The backward's forms: dX = dY W (NN), m^T b (TN), a b^T (NT), and the lm_head's long sum.
    static const int gm[4][5] = {{0, 0, 119, 264, 532}, {1, 0, 200, 64, 300}, {0, 1, 189, 624, 496}, {0, 0, 8, 576, 4000}};
    for (int i = 0; i < 4; i++) {
        int ta = gm[i][0], tb = gm[i][1], m = gm[i][2], n = gm[i][3], k = gm[i][4];
        float *a = random_floats((size_t)m * k, 1), *bm = random_floats((size_t)k * n, 1);
        float *c = random_floats((size_t)m * n, 1);  // beta = 1: accumulates, as the backward does
        cpu_sgemm(ta, tb, m, n, k, 1.0f, a, ta ? m : k, bm, tb ? k : n, 1.0f, c, n);
        write_floats(f, c, (size_t)m * n);
        free(a), free(bm), free(c);
    }
    // Attention: two prompts of 300 and 170 tokens, GQA 4:2, head_dim 64.
    enum { TQ = 300, TQ2 = 170 };
    attn_seq seqs[2] = {{.q_row = 0, .n_q = TQ, .q_pos = 0, .kv_row = 0}, {.q_row = TQ, .n_q = TQ2, .q_pos = 0, .kv_row = TQ}};
    attn_params p = {.n_heads = 4, .n_kv_heads = 2, .head_dim = 64, .q_stride = 256, .kv_stride = 128, .scale = 0.125f};
    size_t nq = (size_t)(TQ + TQ2) * p.q_stride, nk = (size_t)(TQ + TQ2) * p.kv_stride;
    float *q = random_floats(nq, 2), *k = random_floats(nk, 2), *v = random_floats(nk, 1);
    float *out = ep_calloc(nq, sizeof(float));
    b->attention(out, q, k, v, seqs, 2, &p);
    write_floats(f, out, nq);
    // Patched: the first prompt typed with a repeating pattern, one donor read by every head's edges into
    // receivers of type 3.
    int32_t *types = ep_malloc(sizeof(int32_t) * TQ), *index = ep_malloc(sizeof(int32_t) * TQ);
    for (int i = 0; i < TQ; i++) types[i] = 1 + i % 4, index[i] = i / 4;
    attn_seq ps = {.q_row = 0, .n_q = TQ, .q_pos = 0, .kv_row = 0, .types = types, .index = index, .n_typed = TQ};
    float *dk = random_floats(nk, 2), *dv = random_floats(nk, 1);
    const float *dkc[1] = {dk}, *dvc[1] = {dv};
    edge_rule_set rules = {.n = 1};
    rules.rule[0] = (edge_rule){.sender_types = 0xff, .receiver_types = 1u << 3, .relation = REL_ANY, .donor = 0,
                                .heads = {0xf}};
    memset(out, 0, sizeof(float) * nq);
    b->patched_attention(out, q, k, v, 1, dkc, dvc, &ps, 1, &p, &rules);
    write_floats(f, out, (size_t)TQ * p.q_stride);
    free(q), free(k), free(v), free(out), free(types), free(index), free(dk), free(dv);
    return fclose(f) != 0;
}

// Part sizes of the probe file, in order, after the thread count.
static size_t probe_part_bytes(int i) {
    static const size_t floats[N_PROBE_PARTS] = {68 * 108, 189 * 624, 300 * 1536, 68 * 600, 119 * 264, 200 * 64,
                                                 189 * 624, 8 * 576, 470 * 256, 300 * 256};
    return sizeof(float) * floats[i];
}

// Runs this program as a probe with the thread variables set to `threads`; returns its file's bytes.
static unsigned char *run_probe(int threads, const char *path, size_t *len) {
    pid_t pid = fork();
    if (pid == 0) {
        char n[16];
        snprintf(n, sizeof n, "%d", threads);
        setenv("OPENBLAS_NUM_THREADS", n, 1), setenv("OMP_NUM_THREADS", n, 1);
        execl("/proc/self/exe", "test_ops", "--thread-probe", path, (char *)NULL);
        _exit(127);
    }
    int status = 0;
    if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0) return NULL;
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *buf = ep_malloc(n > 0 ? (size_t)n : 1);
    *len = n > 0 && fread(buf, 1, (size_t)n, f) == (size_t)n ? (size_t)n : 0;
    fclose(f);
    return buf;
}

static void test_thread_independence(void) {
    char path[64];
    snprintf(path, sizeof path, "/tmp/ep-test-ops-probe-%d", (int)getpid());
    size_t want_len = sizeof(int);
    for (int i = 0; i < N_PROBE_PARTS; i++) want_len += probe_part_bytes(i);
    unsigned char *base = NULL;
    for (int threads = 1; threads <= 3; threads++) {
        size_t len = 0;
        unsigned char *got = run_probe(threads, path, &len);
        check(got && len == want_len, "thread probe with %d threads: no output or %zu bytes, expected %zu", threads, len,
              want_len);
        if (!got || len != want_len) {
            free(got);
            continue;
        }
        int seen;
        memcpy(&seen, got, sizeof seen);
        check(seen == threads, "thread probe: OPENBLAS_NUM_THREADS=%d gave a pool of %d threads", threads, seen);
        if (!base) {
            base = got;
            continue;
        }
        size_t off = sizeof(int);
        int differing = 0;
        for (int i = 0; i < N_PROBE_PARTS; off += probe_part_bytes(i), i++) {
            int same = !memcmp(got + off, base + off, probe_part_bytes(i));
            differing += !same;
            check(same, "cpu %s: %d threads gave other bytes than 1 thread", probe_names[i], threads);
        }
        printf("  cpu   %d threads against 1: %d of %d products byte-identical\n", threads, N_PROBE_PARTS - differing,
               N_PROBE_PARTS);
        free(got);
    }
    free(base);
    remove(path);
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "--thread-probe")) return thread_probe(argv[2]);
    const kernel_ops *ref = kernel_ops_ref();
    const kernel_ops *backends[2] = {kernel_ops_cpu(), kernel_ops_cuda()};
    for (int i = 0; i < 2; i++) {
        const kernel_ops *b = backends[i];
        if (!b) {
            printf("  cuda backend not available here (no CUDA build or no GPU): only cpu is checked\n");
            continue;
        }
        test_matmul(b, ref);
        test_matmul_bf16(b, ref);
        test_norms(b, ref);
        test_rope(b, ref);
        test_pointwise(b, ref);
        test_attention(b, ref);
        test_patched_attention(b, ref);
        test_attention_long(b, ref);
        test_copies(b, ref);
    }
    test_thread_independence();
    return test_finish("test_ops");
}
