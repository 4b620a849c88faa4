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
    void *dev[24];
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
    // Interventions (kernels/edge_rule.h): the same rules as k-only, v-only and kv, after a zero rule that
    // removes every edge into bos (a row left with nothing: 0) and before one removing t, n -> last, n.
    edge_rule_set *iv = ep_malloc(sizeof *iv), *iv_swapped = ep_malloc(sizeof *iv_swapped);
    *iv = (edge_rule_set){.n = 5};
    iv->rule[0] = (edge_rule){.sender_types = 0xff, .receiver_types = 1u, .source = EDGE_SRC_ZERO, .donor = -1, .heads = {0xf}};
    iv->rule[1] = rules.rule[0], iv->rule[1].source = EDGE_SRC_K;
    iv->rule[2] = rules.rule[1], iv->rule[2].source = EDGE_SRC_V;
    iv->rule[3] = rules.rule[2];
    iv->rule[4] = (edge_rule){.sender_types = 1u << 2 | 1u << 4, .receiver_types = 1u << 6 | 1u << 4,
                              .source = EDGE_SRC_ZERO, .donor = -1, .heads = {0x6}};
    *iv_swapped = *iv;
    iv_swapped->rule[1].source = EDGE_SRC_V, iv_swapped->rule[2].source = EDGE_SRC_K;
    float *want_iv = ep_calloc(nq, sizeof(float)), *got_iv = ep_calloc(nq, sizeof(float));
    ref->patched_attention(want_iv, q, k, v, 2, dkc, dvc, seqs, 3, &p, iv);
    {
        staging s2 = {.b = b};
        float *bq2 = stage_in(&s2, q, sizeof(float) * nq), *bk2 = stage_in(&s2, k, sizeof(float) * nk);
        float *bv2 = stage_in(&s2, v, sizeof(float) * nk), *bout2 = stage_in(&s2, got_iv, sizeof(float) * nq);
        const float *bdk2[2] = {stage_in(&s2, dk[0], sizeof(float) * nk), stage_in(&s2, dk[1], sizeof(float) * nk)};
        const float *bdv2[2] = {stage_in(&s2, dv[0], sizeof(float) * nk), stage_in(&s2, dv[1], sizeof(float) * nk)};
        b->patched_attention(bout2, bq2, bk2, bv2, 2, bdk2, bdv2, seqs, 3, &p, iv);
        stage_out(&s2, got_iv, bout2, sizeof(float) * nq);
        stage_free(&s2);
    }
    report(b->name, "attn-patch-iv", max_rel_error(got_iv, want_iv, nq, 1e-6), tol);
    // The bos row (position 0 of the two typed sequences): every edge removed, so 0 exactly.
    for (int e = 0; e < p.n_heads * p.head_dim; e++)
        check(got_iv[e] == 0 && got_iv[(size_t)T0 * p.q_stride + e] == 0, "%s: a row with every edge removed is not 0",
              b->name);
    if (b == kernel_ops_cpu()) {  // can fail: the same rules with k-only and v-only swapped, and plain kv
        ref->patched_attention(got_iv, q, k, v, 2, dkc, dvc, seqs, 3, &p, iv_swapped);
        double swapped = max_rel_error(got_iv, want_iv, nq, 1e-6), vs_kv = max_rel_error(want, want_iv, nq, 1e-6);
        printf("  ref   attn-patch-iv: k-only <-> v-only swapped differs by %.3g, kv rules by %.3g\n", swapped, vs_kv);
        check(swapped > 1e-3 && vs_kv > 1e-3, "interventions: swapping k and v (%.3g) or using kv (%.3g) changed nothing",
              swapped, vs_kv);
    }
    free(want_iv), free(got_iv), free(iv), free(iv_swapped);
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
        // Every edge k-only from donor 0 = attention over donor 0's keys with the current values; v-only the
        // reverse; every edge removed = 0 (independent of the patched kernels: plain attention).
        all.rule[0].source = EDGE_SRC_K;
        b->patched_attention(got, q, k, v, 2, dkc, dvc, seqs, 2, &p, &all);
        ref->attention(plain, q, dk[0], v, seqs, 2, &p);
        check(max_rel_error(got, plain, (size_t)(T0 + T1) * p.q_stride, 1e-6) < 1e-5,
              "all edges k-only from donor 0 != attention over donor 0's keys and the current values");
        all.rule[0].source = EDGE_SRC_V;
        b->patched_attention(got, q, k, v, 2, dkc, dvc, seqs, 2, &p, &all);
        ref->attention(plain, q, k, dv[0], seqs, 2, &p);
        check(max_rel_error(got, plain, (size_t)(T0 + T1) * p.q_stride, 1e-6) < 1e-5,
              "all edges v-only from donor 0 != attention over the current keys and donor 0's values");
        all.rule[0].source = EDGE_SRC_ZERO, all.rule[0].donor = -1;
        b->patched_attention(got, q, k, v, 0, NULL, NULL, seqs, 2, &p, &all);
        double mx = 0;
        for (size_t e = 0; e < (size_t)(T0 + T1) * p.q_stride; e++)
            if (e % p.q_stride < (size_t)(p.n_heads * p.head_dim)) mx = fmax(mx, fabs(got[e]));
        check(mx == 0, "all edges removed: output %.3g, not 0", mx);
        printf("  %-5s attn-patch invariants: no rules, donor = current, all edges = donor attention, all k-only, "
               "all v-only, all removed: ok\n", b->name);
    }
    free(q), free(k), free(v), free(dk[0]), free(dk[1]), free(dv[0]), free(dv[1]), free(want), free(got), free(plain);
}

// The metric ops: kl_div_rows on rows of logits (one row with a huge range, one pair of identical rows), and
// attention_row_stats on the patched-attention inputs above (patched and plain, a window, softcap), every
// query row. ref is the yardstick; once on the host, invariants that need no reference: identical rows give
// KL 0, the masses of fully typed rows sum to 1, the entropy matches -sum p ln p of the distribution the
// attention output implies (p recovered by attending to one-hot values), and a wrong variant (the KL with
// its arguments swapped) differs.
static void test_logit_metrics(const kernel_ops *b, const kernel_ops *ref);

static void test_metric_ops(const kernel_ops *b, const kernel_ops *ref) {
    if (!b->kl_div_rows || !b->attention_row_stats || !b->logit_metrics) {
        printf("  %-5s metric ops not implemented in this backend\n", b->name);
        check(0, "%s: no metric ops", b->name);
        return;
    }
    enum { R = 4, N = 1000 };
    float *x = random_floats((size_t)R * N, 8), *y = random_floats((size_t)R * N, 8);
    for (int i = 0; i < N; i++) x[i] *= 40;                          // row 0: logits spread over +-320
    memcpy(y + 3 * N, x + 3 * N, sizeof(float) * N);                // row 3: identical rows
    float want[R], got[R], swapped[R];
    ref->kl_div_rows(want, x, y, R, N);
    ref->kl_div_rows(swapped, y, x, R, N);
    staging s = {.b = b};
    float *bx = stage_in(&s, x, sizeof(float) * R * N), *by = stage_in(&s, y, sizeof(float) * R * N);
    float *bo = stage_in(&s, got, sizeof(float) * R);
    b->kl_div_rows(bo, bx, by, R, N);
    stage_out(&s, got, bo, sizeof(float) * R);
    stage_free(&s);
    report(b->name, "kl_div", max_rel_error(got, want, R, 1e-6), tol);
    check(got[3] == 0.0f && want[3] == 0.0f, "%s: KL of identical rows is %g (ref %g), not 0", b->name, got[3], want[3]);
    check(max_rel_error(swapped, want, R, 1e-6) > 1e-2, "KL with the arguments swapped agrees: the check cannot fail");

    enum { T0 = 17, T1 = 9 };
    int32_t types[T0], index[T0];
    int pattern[8] = {1, 2, 3, 4, 1, 2, 3, 4};
    types[0] = 0, index[0] = -1;
    for (int i = 1; i < T0 - 2; i++) types[i] = pattern[(i - 1) % 8], index[i] = (i - 1) / 4;
    types[T0 - 2] = 5, types[T0 - 1] = 6, index[T0 - 2] = index[T0 - 1] = 4;
    attn_seq seqs[3] = {
        {.q_row = 0, .n_q = T0, .q_pos = 0, .kv_row = 0, .types = types, .index = index, .n_typed = T0, .donor_row = 0},
        {.q_row = T0, .n_q = T1, .q_pos = 0, .kv_row = T0, .types = types, .index = index, .n_typed = T1, .donor_row = T0},
        {.q_row = T0 + T1, .n_q = 1, .q_pos = T0, .kv_row = T0 + T1, .types = types, .index = index, .n_typed = T0,
         .donor_row = T0 + T1}};
    int kv_rows = T0 + T1 + T0 + 1, q_rows = T0 + T1 + 1, NT = 7;
    edge_rule_set rules = {.n = 3};
    rules.rule[0] = (edge_rule){.sender_types = 1u << 1 | 1u << 3, .receiver_types = 1u << 6 | 1u << 3,
                                .relation = REL_ANY, .donor = 0, .heads = {0x5}};
    rules.rule[1] = (edge_rule){.sender_types = 0xff, .receiver_types = 1u << 3, .relation = REL_SAME, .donor = 1,
                                .heads = {0xf}};
    rules.rule[2] = (edge_rule){.sender_types = 0xff, .receiver_types = 1u << 5 | 1u << 1, .relation = REL_EARLIER,
                                .donor = 1, .heads = {0xa}};
    // Variant 3: the interventions of test_patched_attention (k-only keys from a donor, v-only rules reading
    // the current key, removed edges, and the bos rows with every edge removed: entropy 0, masses 0).
    edge_rule_set *iv = ep_malloc(sizeof *iv);
    *iv = (edge_rule_set){.n = 5};
    iv->rule[0] = (edge_rule){.sender_types = 0xff, .receiver_types = 1u, .source = EDGE_SRC_ZERO, .donor = -1, .heads = {0xf}};
    iv->rule[1] = rules.rule[0], iv->rule[1].source = EDGE_SRC_K;
    iv->rule[2] = rules.rule[1], iv->rule[2].source = EDGE_SRC_V;
    iv->rule[3] = rules.rule[2];
    iv->rule[4] = (edge_rule){.sender_types = 1u << 2 | 1u << 4, .receiver_types = 1u << 6 | 1u << 4,
                              .source = EDGE_SRC_ZERO, .donor = -1, .heads = {0x6}};
    for (int variant = 0; variant < 4; variant++) {
        attn_params p = {.n_heads = 4, .n_kv_heads = 2, .head_dim = 16, .q_stride = 64, .kv_stride = 32,
                         .scale = 0.25f, .softcap = variant == 2 ? 0.0f : 5.0f, .window = variant == 2 ? 0 : 6};
        const edge_rule_set *rs = variant == 1 ? NULL : variant == 3 ? iv : &rules;
        size_t nq = (size_t)q_rows * p.q_stride, nk = (size_t)kv_rows * p.kv_stride, nr = (size_t)q_rows * p.n_heads;
        float *q = random_floats(nq, 2), *k = random_floats(nk, 2);
        float *dk[2] = {random_floats(nk, 2), random_floats(nk, 2)};
        const float *dkc[2] = {dk[0], dk[1]};
        float *we = ep_calloc(nr, sizeof(float)), *wm = ep_calloc(nr * NT, sizeof(float));
        float *ge = ep_calloc(nr, sizeof(float)), *gm = ep_calloc(nr * NT, sizeof(float));
        ref->attention_row_stats(we, wm, NT, q, k, 2, dkc, seqs, 3, &p, rs);
        staging t = {.b = b};
        float *bq = stage_in(&t, q, sizeof(float) * nq), *bk = stage_in(&t, k, sizeof(float) * nk);
        const float *bdk[2] = {stage_in(&t, dk[0], sizeof(float) * nk), stage_in(&t, dk[1], sizeof(float) * nk)};
        float *be = stage_in(&t, ge, sizeof(float) * nr), *bm = stage_in(&t, gm, sizeof(float) * nr * NT);
        b->attention_row_stats(be, bm, NT, bq, bk, 2, bdk, seqs, 3, &p, rs);
        stage_out(&t, ge, be, sizeof(float) * nr);
        stage_out(&t, gm, bm, sizeof(float) * nr * NT);
        stage_free(&t);
        const char *names[4] = {"rowstat-pt", "rowstat", "rowstat-nw", "rowstat-iv"};
        report(b->name, names[variant], fmax(max_rel_error(ge, we, nr, 1e-6), max_rel_error(gm, wm, nr * NT, 1e-6)), tol);
        if (b == kernel_ops_cpu()) {  // invariants of the reference, once
            double worst_sum = 0, worst_h = 0;
            for (size_t r = 0; r < (size_t)T0 * p.n_heads; r++) {  // sequence 0: every key typed
                double sum = 0;
                for (int c = 0; c < NT; c++) sum += wm[r * NT + c];
                int empty = variant == 3 && r < (size_t)p.n_heads;  // the bos row: every edge removed
                worst_sum = fmax(worst_sum, fabs(sum - (empty ? 0 : 1)));
                if (empty) worst_h = fmax(worst_h, fabs(we[r]));
            }
            // p from the attention output over one-hot values: value column c of sequence 0 is 1 at key c only,
            // for the rows whose keys all fit in head_dim columns (i < head_dim).
            float *v = ep_calloc(nk, sizeof(float)), *out = ep_calloc(nq, sizeof(float));
            for (int j = 0; j < p.head_dim; j++)
                for (int g = 0; g < p.n_kv_heads; g++) v[(size_t)j * p.kv_stride + g * p.head_dim + j] = 1;
            const float *dv[2] = {v, v};
            ref->patched_attention(out, q, k, v, 2, dkc, dv, seqs, 1, &p, rs ? rs : &(edge_rule_set){.n = 0});
            for (int i = 0; i < p.head_dim; i++)
                for (int h = 0; h < p.n_heads; h++) {
                    double hsum = 0;
                    for (int j = 0; j <= i; j++) {
                        double pj = out[(size_t)i * p.q_stride + h * p.head_dim + j];
                        if (pj > 0) hsum -= pj * log(pj);
                    }
                    worst_h = fmax(worst_h, fabs(hsum - we[(size_t)i * p.n_heads + h]));
                }
            free(v), free(out);
            printf("  %-5s %s invariants: masses sum to 1 (%.2g), entropy of the attention's p (%.2g)\n", b->name,
                   names[variant], worst_sum, worst_h);
            check(worst_sum < 1e-6 && worst_h < 1e-5, "%s: masses sum %.3g, entropy %.3g", names[variant], worst_sum, worst_h);
        }
        free(q), free(k), free(dk[0]), free(dk[1]), free(we), free(wm), free(ge), free(gm);
    }
    free(iv);
    free(x), free(y);
    test_logit_metrics(b, ref);
}

// The worst difference between two logit_metrics results: argmax and other must be equal (else 1), the
// floats within rel relative error (|a - b| / max(1, |b|)), infinities equal.
static double logit_metrics_error(const logit_row_metrics *got, const logit_row_metrics *want, int rows) {
    double worst = 0;
    for (int r = 0; r < rows; r++) {
        if (got[r].argmax != want[r].argmax || got[r].other != want[r].other) return 1;
        float g[3] = {got[r].target_logprob, got[r].logit_diff, got[r].log_sum_exp};
        float w[3] = {want[r].target_logprob, want[r].logit_diff, want[r].log_sum_exp};
        for (int f = 0; f < 3; f++) {
            if (isinf(w[f]) || isinf(g[f])) {
                if (g[f] != w[f]) return 1;
                continue;
            }
            double e = fabs((double)g[f] - w[f]) / fmax(1.0, fabs((double)w[f]));
            if (!(e <= worst)) worst = isnan(e) ? 1 : e;
        }
    }
    return worst;
}

// logit_metrics (the device-side reduction of stages/metrics.c's figures): rows longer than a block of
// threads, with ties at the max (the target behind and ahead of an equal logit), -inf logits (a target
// among them), logits near the fp32 range, a given second token, target 0 and n - 1. ref against a brute
// force written here (long double, each index tested against every other for the argmax), then every
// backend against ref; the can-fail siblings: the last-index tie rule and a planted one-ulp-scale error
// in one log-prob are caught.
static void test_logit_metrics(const kernel_ops *b, const kernel_ops *ref) {
    enum { R = 9, N = 1000 };
    float *x = random_floats((size_t)R * N, 8);
    int target[R] = {17, 700, 3, 250, 10, 11, 42, 0, N - 1}, other[R] = {-1, -1, -1, -1, -1, -1, 999, -1, -1};
    float *row = x + 1 * N;  // row 1: the max at 5, 700 and 900; the target the second of them
    row[5] = row[700] = row[900] = 20;
    row = x + 2 * N;  // row 2: the target 3 is the first of two maxima (logit_diff 0 against 600)
    row[3] = row[600] = 20;
    row = x + 3 * N;  // row 3: logits near the fp32 range (exp without the max subtracted overflows)
    for (int i = 0; i < N; i++) row[i] *= 4e37f;
    row = x + 4 * N;  // row 4: every other logit -inf (masked), the target finite
    for (int i = 1; i < N; i += 2) row[i] = -INFINITY;
    row = x + 5 * N;  // row 5: the same mask, the target 11 among the -inf: log-prob and diff -inf
    for (int i = 1; i < N; i += 2) row[i] = -INFINITY;
    row = x + 7 * N;  // row 7: the target 0 is the max (the best other starts from 1)
    row[0] = 30;
    row = x + 8 * N;  // row 8: the last token, tied with the first
    row[0] = row[N - 1] = 25;

    logit_row_metrics want[R], got[R], brute[R];
    int best_other[R];
    ref->logit_metrics(want, x, target, other, R, N);
    int last_tie_differs = 0;
    for (int r = 0; r < R; r++) {
        const float *v = x + (size_t)r * N;
        int am = -1, bo = -1, am_last = -1;
        for (int i = 0; i < N && am < 0; i++) {
            int is_max = 1;
            for (int j = 0; j < N && is_max; j++) is_max = j < i ? v[j] < v[i] : v[j] <= v[i];
            if (is_max) am = i;
        }
        for (int i = 0; i < N && bo < 0; i++) {
            if (i == target[r]) continue;
            int is_max = 1;
            for (int j = 0; j < N && is_max; j++)
                if (j != target[r]) is_max = j < i ? v[j] < v[i] : v[j] <= v[i];
            if (is_max) bo = i;
        }
        for (int i = 0; i < N; i++)
            if (v[i] == v[am]) am_last = i;
        last_tie_differs |= am_last != want[r].argmax;
        long double mx = v[am], sum = 0;
        for (int i = 0; i < N; i++) sum += expl((long double)v[i] - mx);
        long double lse = mx + logl(sum);
        int o = other[r] >= 0 ? other[r] : bo;
        best_other[r] = bo;
        brute[r] = (logit_row_metrics){.argmax = am, .other = o, .target_logprob = (float)((long double)v[target[r]] - lse),
                                       .logit_diff = v[target[r]] - v[o], .log_sum_exp = (float)lse};
    }
    if (b == kernel_ops_cpu()) {  // the reference against the brute force, once
        double e = logit_metrics_error(want, brute, R);
        printf("  ref   logit_metrics against a long double brute force: %.3g\n", e);
        check(e <= 1e-6, "ref logit_metrics off the brute force by %.3g", e);
        check(want[1].argmax == 5 && want[1].other == 5 && want[2].argmax == 3 && want[2].other == 600 &&
                  want[2].logit_diff == 0 && isinf(want[5].target_logprob) && want[8].argmax == 0,
              "ref logit_metrics: ties or -inf handled wrongly");
        check(last_tie_differs, "the last-index tie rule agrees with ref: the tie check cannot fail");
        logit_row_metrics planted[R];
        memcpy(planted, want, sizeof planted);
        planted[0].target_logprob = nextafterf(nextafterf(planted[0].target_logprob, 0), 0) * (1 + 4e-6f);
        check(logit_metrics_error(planted, want, R) > 1e-6, "a planted log-prob error passes: the check cannot fail");
    }
    staging s = {.b = b};
    float *bx = stage_in(&s, x, sizeof(float) * R * N);
    b->logit_metrics(got, bx, target, other, R, N);
    stage_free(&s);
    report(b->name, "logit_met", logit_metrics_error(got, want, R), 1e-6);
    // Without `other` (NULL): row 6 falls back to the best other token, on the backend as on the host.
    logit_row_metrics plain[R];
    bx = stage_in(&s, x, sizeof(float) * R * N);
    b->logit_metrics(plain, bx, target, NULL, R, N);
    stage_free(&s);
    check(plain[6].other == best_other[6] && best_other[6] != 999 && plain[6].argmax == want[6].argmax,
          "%s: logit_metrics with other NULL: other %d, want %d", b->name, plain[6].other, best_other[6]);
    free(x);
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

// ---------------------------------------------------------------------------------------------------
// Gradient ops (kernels/ops.h, docs/attribution.md).
//
// ref against central finite differences of the ref forward op: for a random direction u and cotangent
// dy, dy . (f(x + h u) - f(x - h u)) / 2 must equal dx . (x + h u - (x - h u)) / 2 with dx = J^T dy, the
// gradient op's output (the step is taken as the rounded inputs' difference, so only f's own rounding
// and the h^2 term remain). Each check has a can-fail sibling: a deliberately wrong variant of the
// gradient (a plausible bug) that the same comparison must reject. Then every backend against ref.

typedef void (*fwd_fn)(const void *ctx, const float *x, float *y);

// Relative disagreement of the directional derivative from differences with the analytic one.
static double fd_error(fwd_fn f, const void *ctx, const float *x, size_t n_x, size_t n_y, const float *dy,
                       const float *dx, float h) {
    float *xp = ep_malloc(sizeof(float) * n_x), *xm = ep_malloc(sizeof(float) * n_x);
    float *yp = ep_calloc(n_y, sizeof(float)), *ym = ep_calloc(n_y, sizeof(float));
    for (size_t i = 0; i < n_x; i++) {
        float u = frand();
        xp[i] = x[i] + h * u, xm[i] = x[i] - h * u;
    }
    f(ctx, xp, yp);
    f(ctx, xm, ym);
    double fd = 0, an = 0, ss = 0;
    for (size_t i = 0; i < n_y; i++) fd += (double)dy[i] * ((double)yp[i] - ym[i]) / 2;
    for (size_t i = 0; i < n_x; i++) {
        double t = (double)dx[i] * ((double)xp[i] - xm[i]) / 2;
        an += t, ss += t * t;
    }
    free(xp), free(xm), free(yp), free(ym);
    // Relative to the size a sum of these terms with random signs has (the root of the sum of squares),
    // or to the sums themselves where larger: a directional derivative near zero by cancellation is no
    // reason to fail, and a wrong term of the gradient still shows at its own size.
    double scale = fmax(sqrt(ss), fmax(fabs(an), fabs(fd)));
    return fabs(fd - an) / (scale > 1e-30 ? scale : 1e-30);
}

// f32 output rounding (2^-24 relative per element, over h = 1e-2 steps of O(1) inputs) and the h^2 term
// of central differences give up to about 2e-5 here; a wrong term of a gradient gives 3e-3 and more.
static const double fd_tol = 2e-4;

static void fd_report(const char *op, double err, double wrong_err) {
    printf("  ref   %-12s finite differences: rel error %.3g (wrong variant %.3g)\n", op, err, wrong_err);
    check(err <= fd_tol, "ref %s against finite differences: %.3g > %.3g", op, err, fd_tol);
    check(wrong_err > 10 * fd_tol, "ref %s: the wrong variant passed the finite-difference check (%.3g)", op, wrong_err);
}

typedef struct {
    int rows, n_in, n_out, dim;
    const float *w, *b;
    float w_offset, eps, cap;
    act_kind act;
    const int *pos;
    const float *inv_freq;
    int stride, n_heads, head_dim, rot_dim;
    size_t n;
} fd_ctx;

static void f_matmul(const void *c, const float *x, float *y) {
    const fd_ctx *t = c;
    kernel_ops_ref()->matmul(y, x, t->w, NULL, t->rows, t->n_in, t->n_out);
}
static void f_rmsnorm(const void *c, const float *x, float *y) {
    const fd_ctx *t = c;
    kernel_ops_ref()->rmsnorm(y, x, t->w, t->w_offset, t->rows, t->dim, t->eps);
}
static void f_layernorm(const void *c, const float *x, float *y) {
    const fd_ctx *t = c;
    kernel_ops_ref()->layernorm(y, x, t->w, t->b, t->rows, t->dim, t->eps);
}
static void f_rope(const void *c, const float *x, float *y) {
    const fd_ctx *t = c;
    memcpy(y, x, sizeof(float) * (size_t)t->rows * t->stride);
    kernel_ops_ref()->rope(y, t->stride, t->pos, t->inv_freq, t->rows, t->n_heads, t->head_dim, t->rot_dim);
}
static void f_act(const void *c, const float *x, float *y) {
    const fd_ctx *t = c;
    memcpy(y, x, sizeof(float) * t->n);
    kernel_ops_ref()->act(y, t->n, t->act);
}
static void f_glu(const void *c, const float *x, float *y) {  // x = [gate, up]
    const fd_ctx *t = c;
    kernel_ops_ref()->glu(y, x, x + t->n, t->n, t->act);
}
static void f_softcap(const void *c, const float *x, float *y) {
    const fd_ctx *t = c;
    memcpy(y, x, sizeof(float) * t->n);
    kernel_ops_ref()->softcap(y, t->n, t->cap);
}

static void test_grad_fd_pointwise(void) {
    const kernel_ops *ref = kernel_ops_ref();
    float h = 1e-2f;
    {  // linear: the gradient of matmul; wrong: accumulating onto what the buffer held
        fd_ctx c = {.rows = 5, .n_in = 70, .n_out = 40};
        float *w = random_floats((size_t)c.n_out * c.n_in, 0.5f), *x = random_floats((size_t)c.rows * c.n_in, 1);
        float *dy = random_floats((size_t)c.rows * c.n_out, 1), *dx = random_floats((size_t)c.rows * c.n_in, 1);
        c.w = w;
        float *junk = ep_malloc(sizeof(float) * (size_t)c.rows * c.n_in);
        memcpy(junk, dx, sizeof(float) * (size_t)c.rows * c.n_in);
        ref->linear_back(dx, dy, w, c.rows, c.n_in, c.n_out, 0);
        ref->linear_back(junk, dy, w, c.rows, c.n_in, c.n_out, 1);
        fd_report("linear_back", fd_error(f_matmul, &c, x, (size_t)c.rows * c.n_in, (size_t)c.rows * c.n_out, dy, dx, h),
                  fd_error(f_matmul, &c, x, (size_t)c.rows * c.n_in, (size_t)c.rows * c.n_out, dy, junk, h));
        // bf16: the gradient of the product with the weights' fp32 values; wrong: dy rounded to bf16 is
        // what this op must not do, but it is within 2^-9 of right, too close for differences: the wrong
        // variant here is the transposed weight layout read as [n_in, n_out].
        uint16_t *wb = ep_malloc(sizeof(uint16_t) * (size_t)c.n_out * c.n_in);
        for (size_t i = 0; i < (size_t)c.n_out * c.n_in; i++) wb[i] = f32_to_bf16(w[i]), w[i] = bf16_to_f32(wb[i]);
        ref->linear_back_bf16(dx, dy, wb, c.rows, c.n_in, c.n_out, 0);
        for (int r = 0; r < c.rows; r++)
            for (int i = 0; i < c.n_in; i++) {
                double s = 0;
                for (int o = 0; o < c.n_out; o++) s += (double)dy[(size_t)r * c.n_out + o] * w[((size_t)i * c.n_out + o) % ((size_t)c.n_out * c.n_in)];
                junk[(size_t)r * c.n_in + i] = (float)s;
            }
        fd_report("linear_bf16", fd_error(f_matmul, &c, x, (size_t)c.rows * c.n_in, (size_t)c.rows * c.n_out, dy, dx, h),
                  fd_error(f_matmul, &c, x, (size_t)c.rows * c.n_in, (size_t)c.rows * c.n_out, dy, junk, h));
        free(w), free(x), free(dy), free(dx), free(junk), free(wb);
    }
    {  // norms; wrong: the term through the row's statistics left out (rms: r g; layer: r (g - mean g))
        fd_ctx c = {.rows = 6, .dim = 50, .eps = 1e-6f};
        size_t n = (size_t)c.rows * c.dim;
        float *x = random_floats(n, 2), *w = random_floats((size_t)c.dim, 1), *b = random_floats((size_t)c.dim, 1);
        float *dy = random_floats(n, 1), *dx = ep_malloc(sizeof(float) * n), *bad = ep_malloc(sizeof(float) * n);
        c.w = w, c.b = b;
        for (int off = 0; off < 2; off++) {
            c.w_offset = (float)off;
            ref->rmsnorm_back(dx, x, w, c.w_offset, dy, c.rows, c.dim, c.eps, 0);
            for (int r = 0; r < c.rows; r++) {  // wrong: r g alone, the term through mean(x^2) left out
                double ss = 0;
                for (int i = 0; i < c.dim; i++) ss += pow(x[(size_t)r * c.dim + i], 2) / c.dim;
                for (int i = 0; i < c.dim; i++)
                    bad[(size_t)r * c.dim + i] = (float)(dy[(size_t)r * c.dim + i] * (c.w_offset + w[i]) / sqrt(ss + c.eps));
            }
            fd_report(off ? "rmsnorm+1_b" : "rmsnorm_back", fd_error(f_rmsnorm, &c, x, n, n, dy, dx, h),
                      fd_error(f_rmsnorm, &c, x, n, n, dy, bad, h));
        }
        c.eps = 1e-5f;
        ref->layernorm_back(dx, x, w, dy, c.rows, c.dim, c.eps, 0);
        for (int r = 0; r < c.rows; r++) {
            double mean = 0, var = 0, mg = 0;
            for (int i = 0; i < c.dim; i++) mean += x[(size_t)r * c.dim + i] / c.dim;
            for (int i = 0; i < c.dim; i++) var += pow(x[(size_t)r * c.dim + i] - mean, 2) / c.dim;
            for (int i = 0; i < c.dim; i++) mg += (double)dy[(size_t)r * c.dim + i] * w[i] / c.dim;
            for (int i = 0; i < c.dim; i++) bad[(size_t)r * c.dim + i] = (float)(((double)dy[(size_t)r * c.dim + i] * w[i] - mg) / sqrt(var + c.eps));
        }
        fd_report("layernorm_b", fd_error(f_layernorm, &c, x, n, n, dy, dx, h), fd_error(f_layernorm, &c, x, n, n, dy, bad, h));
        free(x), free(w), free(b), free(dy), free(dx), free(bad);
    }
    {  // rope, partial rotary; wrong: the forward rotation used as its own transpose
        int pos[5] = {0, 3, 17, 400, 4095};
        float inv_freq[8];
        for (int i = 0; i < 8; i++) inv_freq[i] = 1.0f / powf(10000.0f, (float)(2 * i) / 12.0f);
        fd_ctx c = {.rows = 5, .stride = 40, .n_heads = 2, .head_dim = 16, .rot_dim = 12, .pos = pos, .inv_freq = inv_freq};
        size_t n = (size_t)c.rows * c.stride;
        float *x = random_floats(n, 1), *dy = random_floats(n, 1), *dx = ep_malloc(sizeof(float) * n), *bad = ep_malloc(sizeof(float) * n);
        memcpy(dx, dy, sizeof(float) * n), memcpy(bad, dy, sizeof(float) * n);
        ref->rope_back(dx, c.stride, pos, inv_freq, c.rows, c.n_heads, c.head_dim, c.rot_dim);
        ref->rope(bad, c.stride, pos, inv_freq, c.rows, c.n_heads, c.head_dim, c.rot_dim);
        fd_report("rope_back", fd_error(f_rope, &c, x, n, n, dy, dx, h), fd_error(f_rope, &c, x, n, n, dy, bad, h));
        free(x), free(dy), free(dx), free(bad);
    }
    {  // act, glu, softcap; wrong: the other activation's derivative, softcap' from x instead of y
        fd_ctx c = {.n = 400, .cap = 3.0f};
        float *x = random_floats(2 * c.n, 4), *dy = random_floats(c.n, 1), *dx = ep_malloc(sizeof(float) * 2 * c.n);
        float *bad = ep_malloc(sizeof(float) * 2 * c.n), *y = ep_malloc(sizeof(float) * c.n);
        for (int a = 0; a < 2; a++) {
            c.act = a ? ACT_GELU_TANH : ACT_SILU;
            act_kind other = a ? ACT_SILU : ACT_GELU_TANH;
            ref->act_back(dx, x, dy, c.n, c.act);
            ref->act_back(bad, x, dy, c.n, other);
            fd_report(a ? "act_back-gelu" : "act_back-silu", fd_error(f_act, &c, x, c.n, c.n, dy, dx, h),
                      fd_error(f_act, &c, x, c.n, c.n, dy, bad, h));
            ref->glu_back(dx, dx + c.n, x, x + c.n, dy, c.n, c.act);
            ref->glu_back(bad, bad + c.n, x, x + c.n, dy, c.n, other);
            fd_report(a ? "glu_back-gelu" : "glu_back-silu", fd_error(f_glu, &c, x, 2 * c.n, c.n, dy, dx, h),
                      fd_error(f_glu, &c, x, 2 * c.n, c.n, dy, bad, h));
        }
        f_softcap(&c, x, y);
        ref->softcap_back(dx, y, dy, c.n, c.cap);
        ref->softcap_back(bad, x, dy, c.n, c.cap);
        fd_report("softcap_back", fd_error(f_softcap, &c, x, c.n, c.n, dy, dx, h), fd_error(f_softcap, &c, x, c.n, c.n, dy, bad, h));
        free(x), free(dy), free(dx), free(bad), free(y);
    }
}

// The attention fixture of the gradient checks: three sequences (17 and 9 typed prompt tokens, and a
// decode step at position 17 over a longer cache), GQA 4:2, softcap, window 6, padded strides, two
// donors and rules that send edges of several heads to each (kernels/edge_rule.h).
enum { GA_T0 = 17, GA_T1 = 9, GA_NQ = GA_T0 + GA_T1 + 1, GA_NKV = GA_T0 + GA_T1 + GA_T0 + 1 };

typedef struct {
    int32_t types[GA_T0], index[GA_T0];
    attn_seq seqs[3];
    attn_params p;
    edge_rule_set rules;
    size_t nq, nk;
    int n_seqs;
    const edge_rule_set *use_rules;  // &rules, or NULL for plain attention
} grad_attn;

static void grad_attn_init(grad_attn *a, float softcap, int window) {
    memset(a, 0, sizeof *a);
    int pattern[8] = {1, 2, 3, 4, 1, 2, 3, 4};
    a->types[0] = 0, a->index[0] = -1;
    for (int i = 1; i < GA_T0 - 2; i++) a->types[i] = pattern[(i - 1) % 8], a->index[i] = (i - 1) / 4;
    a->types[GA_T0 - 2] = 5, a->types[GA_T0 - 1] = 6, a->index[GA_T0 - 2] = a->index[GA_T0 - 1] = 4;
    a->seqs[0] = (attn_seq){.q_row = 0, .n_q = GA_T0, .q_pos = 0, .kv_row = 0, .types = a->types, .index = a->index,
                            .n_typed = GA_T0, .donor_row = 0};
    a->seqs[1] = (attn_seq){.q_row = GA_T0, .n_q = GA_T1, .q_pos = 0, .kv_row = GA_T0, .types = a->types,
                            .index = a->index, .n_typed = GA_T1, .donor_row = GA_T0};
    a->seqs[2] = (attn_seq){.q_row = GA_T0 + GA_T1, .n_q = 1, .q_pos = GA_T0, .kv_row = GA_T0 + GA_T1,
                            .types = a->types, .index = a->index, .n_typed = GA_T0, .donor_row = GA_T0 + GA_T1};
    a->n_seqs = 3;
    a->p = (attn_params){.n_heads = 4, .n_kv_heads = 2, .head_dim = 16, .q_stride = 70, .kv_stride = 40,
                         .scale = 0.25f, .softcap = softcap, .window = window};
    a->rules.n = 3;
    a->rules.rule[0] = (edge_rule){.sender_types = 1u << 1 | 1u << 3, .receiver_types = 1u << 6 | 1u << 3,
                                   .relation = REL_ANY, .donor = 0, .heads = {0x5}};
    a->rules.rule[1] = (edge_rule){.sender_types = 0xff, .receiver_types = 1u << 3, .relation = REL_SAME, .donor = 1,
                                   .heads = {0xf}};
    a->rules.rule[2] = (edge_rule){.sender_types = 0xff, .receiver_types = 1u << 5 | 1u << 1 | 1u << 6,
                                   .relation = REL_EARLIER, .donor = 1, .heads = {0xa}};
    a->use_rules = &a->rules;
    a->nq = (size_t)GA_NQ * a->p.q_stride, a->nk = (size_t)GA_NKV * a->p.kv_stride;
}

// The same rules with interventions (kernels/edge_rule.h): first a zero rule removing every edge into
// bos (a query left with nothing: its output is 0), then grad_attn_init's three rules as k-only, v-only
// and kv, then a zero rule removing t, n -> last, n edges of heads 1 and 2.
static void grad_attn_modes(grad_attn *a) {
    edge_rule_set *r = &a->rules;
    edge_rule base[3] = {r->rule[0], r->rule[1], r->rule[2]};
    r->n = 5;
    r->rule[0] = (edge_rule){.sender_types = 0xff, .receiver_types = 1u << 0, .relation = REL_ANY,
                             .source = EDGE_SRC_ZERO, .donor = -1, .heads = {0xf}};
    r->rule[1] = base[0], r->rule[1].source = EDGE_SRC_K;
    r->rule[2] = base[1], r->rule[2].source = EDGE_SRC_V;
    r->rule[3] = base[2];
    r->rule[4] = (edge_rule){.sender_types = 1u << 2 | 1u << 4, .receiver_types = 1u << 6 | 1u << 4,
                             .relation = REL_ANY, .source = EDGE_SRC_ZERO, .donor = -1, .heads = {0x6}};
}

// A plausible bug for the can-fail siblings: k-only and v-only swapped.
static void swap_k_v(edge_rule_set *r) {
    for (int i = 0; i < r->n; i++)
        if (r->rule[i].source == EDGE_SRC_K || r->rule[i].source == EDGE_SRC_V)
            r->rule[i].source = (int16_t)(EDGE_SRC_K + EDGE_SRC_V - r->rule[i].source);
}

// x = [q, k, v, donor k 0, 1, donor v 0, 1] for the differences.
static void f_attention(const void *c, const float *x, float *y) {
    const grad_attn *a = c;
    const float *q = x, *k = q + a->nq, *v = k + a->nk, *dk[2] = {v + a->nk, v + 2 * a->nk},
                *dv[2] = {v + 3 * a->nk, v + 4 * a->nk};
    kernel_ops_ref()->patched_attention(y, q, k, v, 2, dk, dv, a->seqs, a->n_seqs, &a->p, a->use_rules);
}

// ref's attention_back into grad (the layout of x): dq, dk, dv, the donors' dk, dv.
static void ref_attention_grad(const grad_attn *a, const grad_attn *as_run, const float *x, const float *dout,
                               float *grad) {
    size_t n = a->nq + 6 * a->nk;
    memset(grad, 0, sizeof(float) * n);
    const float *q = x, *k = q + a->nq, *v = k + a->nk, *dk[2] = {v + a->nk, v + 2 * a->nk},
                *dv[2] = {v + 3 * a->nk, v + 4 * a->nk};
    float *gq = grad, *gk = gq + a->nq, *gv = gk + a->nk, *gdk[2] = {gv + a->nk, gv + 2 * a->nk},
          *gdv[2] = {gv + 3 * a->nk, gv + 4 * a->nk};
    kernel_ops_ref()->attention_back(gq, gk, gv, q, k, v, dout, 2, dk, dv, gdk, gdv, as_run->seqs, as_run->n_seqs,
                                     &as_run->p, as_run->use_rules);
}

static void test_grad_fd_attention(void) {
    for (int variant = 0; variant < 4; variant++) {
        // plain with softcap and window; patched; patched without softcap or window; patched with the
        // interventions (k-only, v-only, zeroed edges)
        grad_attn a;
        grad_attn_init(&a, variant != 2 ? 5.0f : 0.0f, variant != 2 ? 6 : 0);
        if (variant == 0) a.use_rules = NULL;
        if (variant == 3) grad_attn_modes(&a);
        size_t n = a.nq + 6 * a.nk;
        float *x = ep_malloc(sizeof(float) * n), *dout = random_floats(a.nq, 1);
        for (size_t i = 0; i < n; i++) x[i] = frand() * (i < a.nq + a.nk ? 2.0f : 1.0f);
        float *g = ep_malloc(sizeof(float) * n), *bad = ep_malloc(sizeof(float) * n);
        ref_attention_grad(&a, &a, x, dout, g);
        // Wrong: the softcap's derivative (or, without softcap, the window) left out of the backward; with
        // interventions, the k-only and v-only rules swapped.
        grad_attn w = a;
        w.use_rules = a.use_rules ? &w.rules : NULL;
        if (variant == 3)
            swap_k_v(&w.rules);
        else if (variant < 2)
            w.p.softcap = 0;
        else
            w.p.window = 3;
        ref_attention_grad(&a, &w, x, dout, bad);
        const char *names[4] = {"attn_back", "attn_back-pat", "attn_back-pnc", "attn_back-iv"};
        fd_report(names[variant], fd_error(f_attention, &a, x, n, a.nq, dout, g, 1e-2f),
                  fd_error(f_attention, &a, x, n, a.nq, dout, bad, 1e-2f));
        if (variant == 1) {  // the donor gradients are not all zero: the rules send edges to both donors
            double s0 = 0, s1 = 0;
            for (size_t i = 0; i < a.nk; i++) s0 += fabs(g[a.nq + 3 * a.nk + i]), s1 += fabs(g[a.nq + 4 * a.nk + i]);
            check(s0 > 0 && s1 > 0, "patched attention_back: a donor's key gradient is all zero (%g, %g)", s0, s1);
        }
        free(x), free(dout), free(g), free(bad);
    }
}

// The test's own double-precision attention with one edge unit's edges moved toward its donor by t
// (k* + t (k_d - k*), v* + t (v_d - v*); only the key or the value for a k- or v-only unit; a zeroing
// unit scales the edge's weight exp(s) by 1 - t): the unit's score is d/dt of sum dout . out at t = 0
// (docs/attribution.md: the first-order change of the loss). Independent of the ops' code but for the
// rule matcher; removed edges (zero rules) are left out of the softmax, a row with none left adds 0. With
// kb, vb (the edge_scores base, else NULL) an edge reading the current pass moves by t (k_d - kb) instead.
static double interpolated_loss(const grad_attn *a, const float *q, const float *k, const float *v,
                                const float *const *dk, const float *const *dv, const float *dout,
                                const edge_score_unit *u, int s, double t, const float *kb, const float *vb) {
    const attn_params *p = &a->p;
    const attn_seq *sq = &a->seqs[s];
    int d = p->head_dim, rep = p->n_heads / p->n_kv_heads;
    double loss = 0, sc[64], kk[16], vv[64][16];
    for (int qi = 0; qi < sq->n_q; qi++) {
        int i = sq->q_pos + qi;
        for (int h = 0; h < p->n_heads; h++) {
            const float *qv = q + (size_t)(sq->q_row + qi) * p->q_stride + (size_t)h * d;
            double mx = -INFINITY;
            for (int j = 0; j <= i; j++) {
                sc[j] = -INFINITY;
                if (p->window > 0 && i - j >= p->window) continue;
                int typed = a->use_rules && i < sq->n_typed && j < sq->n_typed;
                int code = typed ? edge_lookup(a->use_rules, h, sq->types[j], sq->index[j], sq->types[i], sq->index[i]) : -1;
                if (code == EDGE_REMOVED) continue;
                int src_k = code >= 0 && code / 16 != EDGE_SRC_V ? code % 16 : -1;
                int src_v = code >= 0 && code / 16 != EDGE_SRC_K ? code % 16 : -1;
                size_t g = (size_t)(h / rep) * d, cur = (size_t)(sq->kv_row + j) * p->kv_stride + g,
                       don = (size_t)(sq->donor_row + j) * p->kv_stride + g;
                const float *ks = src_k >= 0 ? dk[src_k] + don : k + cur, *vs = src_v >= 0 ? dv[src_v] + don : v + cur;
                const float *kf = src_k < 0 && kb ? kb + cur : ks, *vf = src_v < 0 && vb ? vb + cur : vs;  // direction's base
                int in_unit = h == u->head && i < sq->n_typed && sq->types[i] == u->receiver && sq->types[j] == u->sender;
                double tk = in_unit && (u->source == EDGE_SRC_KV || u->source == EDGE_SRC_K) ? t : 0;
                double tv = in_unit && (u->source == EDGE_SRC_KV || u->source == EDGE_SRC_V) ? t : 0;
                for (int e = 0; e < d; e++) {
                    kk[e] = ks[e] + tk * ((double)dk[u->donor][don + e] - kf[e]);
                    vv[j][e] = vs[e] + tv * ((double)dv[u->donor][don + e] - vf[e]);
                }
                double dot = 0;
                for (int e = 0; e < d; e++) dot += qv[e] * kk[e];
                dot *= p->scale;
                if (p->softcap > 0) dot = p->softcap * tanh(dot / p->softcap);
                if (in_unit && u->source == EDGE_SRC_ZERO) dot += log1p(-t);  // exp(s) (1 - t)
                sc[j] = dot, mx = dot > mx ? dot : mx;
            }
            double sum = 0;
            for (int j = 0; j <= i; j++) sum += sc[j] == -INFINITY ? 0 : exp(sc[j] - mx);
            const float *ov = dout + (size_t)(sq->q_row + qi) * p->q_stride + (size_t)h * d;
            for (int j = 0; j <= i; j++) {
                if (sc[j] == -INFINITY) continue;
                double pr = exp(sc[j] - mx) / sum;
                for (int e = 0; e < d; e++) loss += ov[e] * pr * vv[j][e];
            }
        }
    }
    return loss;
}

static const edge_score_unit grad_edge_units[5] = {
    {.head = 0, .sender = 1, .receiver = 3, .donor = 0},  // partly read from donor 0 already (rule 0)
    {.head = 1, .sender = 2, .receiver = 3, .donor = 0},  // read from donor 1 (rule 1): k* is donor 1's
    {.head = 3, .sender = 4, .receiver = 6, .donor = 1},
    {.head = 2, .sender = 0, .receiver = 5, .donor = 1},
    {.head = 1, .sender = 1, .receiver = 1, .donor = 1},
};

// Units of every intervention, for grad_attn_modes' rules: edges read k-only, v-only, kv, removed or
// clean, scored as kv, k-only, v-only and zeroing units.
enum { N_IV_UNITS = 10 };
static const edge_score_unit grad_iv_units[N_IV_UNITS] = {
    {.head = 0, .sender = 1, .receiver = 3, .donor = 0, .source = EDGE_SRC_K},     // rule 1 (k-only, donor 0): 0
    {.head = 0, .sender = 1, .receiver = 3, .donor = 1, .source = EDGE_SRC_V},     // its current values
    {.head = 1, .sender = 2, .receiver = 3, .donor = 0, .source = EDGE_SRC_KV},    // rule 2 (v-only, donor 1)
    {.head = 1, .sender = 2, .receiver = 3, .donor = 1, .source = EDGE_SRC_K},
    {.head = 3, .sender = 4, .receiver = 6, .donor = 1, .source = EDGE_SRC_ZERO},  // clean edges, zeroed
    {.head = 2, .sender = 4, .receiver = 6, .donor = 0, .source = EDGE_SRC_ZERO},  // already removed (rule 4): 0
    {.head = 3, .sender = 3, .receiver = 5, .donor = 1, .source = EDGE_SRC_ZERO},  // rule 3 (kv, donor 1)
    {.head = 1, .sender = 3, .receiver = 6, .donor = 0, .source = EDGE_SRC_V},
    {.head = 2, .sender = 1, .receiver = 1, .donor = 0, .source = EDGE_SRC_ZERO},
    {.head = 3, .sender = 3, .receiver = 4, .donor = 1, .source = EDGE_SRC_K},
};

// ref edge_scores under grad_attn_modes' rules, every unit source, against the interpolated loss; the
// can-fail siblings: the units' k and v swapped, and the rules' k-only and v-only swapped.
static void test_grad_scores_interventions(void) {
    const kernel_ops *ref = kernel_ops_ref();
    grad_attn a;
    grad_attn_init(&a, 5.0f, 6);
    grad_attn_modes(&a);
    float *q = random_floats(a.nq, 2), *k = random_floats(a.nk, 2), *v = random_floats(a.nk, 1), *dout = random_floats(a.nq, 1);
    const float *dk[2] = {random_floats(a.nk, 2), random_floats(a.nk, 2)}, *dv[2] = {random_floats(a.nk, 1), random_floats(a.nk, 1)};
    double score[N_IV_UNITS * 3], worst = 0, mag = 0, unit_mag[N_IV_UNITS] = {0};
    ref->edge_scores(score, q, k, v, NULL, NULL, dout, 2, dk, dv, a.seqs, a.n_seqs, &a.p, a.use_rules, grad_iv_units, N_IV_UNITS);
    for (int u = 0; u < N_IV_UNITS; u++)
        for (int s = 0; s < a.n_seqs; s++) {
            double t = 1e-4, fd = (interpolated_loss(&a, q, k, v, dk, dv, dout, &grad_iv_units[u], s, t, NULL, NULL) -
                                   interpolated_loss(&a, q, k, v, dk, dv, dout, &grad_iv_units[u], s, -t, NULL, NULL)) / (2 * t);
            worst = fmax(worst, fabs(score[u * a.n_seqs + s] - fd)), mag = fmax(mag, fabs(fd));
            unit_mag[u] = fmax(unit_mag[u], fabs(fd));
        }
    int nonzero = 0;
    for (int u = 0; u < N_IV_UNITS; u++) nonzero += unit_mag[u] > 1e-3 * mag;
    edge_score_unit swapped[N_IV_UNITS];
    memcpy(swapped, grad_iv_units, sizeof swapped);
    for (int u = 0; u < N_IV_UNITS; u++)
        if (swapped[u].source == EDGE_SRC_K || swapped[u].source == EDGE_SRC_V) swapped[u].source = EDGE_SRC_K + EDGE_SRC_V - swapped[u].source;
    double wrong[N_IV_UNITS * 3], worst_units = 0, worst_rules = 0;
    ref->edge_scores(wrong, q, k, v, NULL, NULL, dout, 2, dk, dv, a.seqs, a.n_seqs, &a.p, a.use_rules, swapped, N_IV_UNITS);
    for (int i = 0; i < N_IV_UNITS * a.n_seqs; i++) worst_units = fmax(worst_units, fabs(wrong[i] - score[i]));
    edge_rule_set *rules = ep_malloc(sizeof *rules);
    *rules = a.rules;
    swap_k_v(rules);
    ref->edge_scores(wrong, q, k, v, NULL, NULL, dout, 2, dk, dv, a.seqs, a.n_seqs, &a.p, rules, grad_iv_units, N_IV_UNITS);
    for (int i = 0; i < N_IV_UNITS * a.n_seqs; i++) worst_rules = fmax(worst_rules, fabs(wrong[i] - score[i]));
    printf("  ref   edge_scores  interventions against d/dt of the interpolated loss: max error %.3g of %.3g, %d/%d "
           "units non-zero (units k<->v: %.3g, rules k<->v: %.3g)\n", worst, mag, nonzero, N_IV_UNITS, worst_units, worst_rules);
    check(mag > 0 && worst <= 1e-6 * mag, "ref edge_scores (interventions) against differences: %.3g of %.3g", worst, mag);
    // Units 0 (k-only from the donor whose key the edges read already) and 5 (edges removed already) are 0.
    check(unit_mag[0] == 0 && unit_mag[5] == 0 && nonzero == N_IV_UNITS - 2,
          "intervention units: %.3g and %.3g where 0 is due, %d non-zero", unit_mag[0], unit_mag[5], nonzero);
    check(worst_units > 1e-2 * mag, "edge_scores: units with k and v swapped gave the same scores");
    check(worst_rules > 1e-2 * mag, "edge_scores: rules with k-only and v-only swapped gave the same scores");
    free(rules);
    free(q), free(k), free(v), free(dout), free((void *)dk[0]), free((void *)dk[1]), free((void *)dv[0]), free((void *)dv[1]);
}

static void test_grad_scores_reference(void) {
    const kernel_ops *ref = kernel_ops_ref();
    grad_attn a;
    grad_attn_init(&a, 5.0f, 6);
    float *q = random_floats(a.nq, 2), *k = random_floats(a.nk, 2), *v = random_floats(a.nk, 1), *dout = random_floats(a.nq, 1);
    const float *dk[2] = {random_floats(a.nk, 2), random_floats(a.nk, 2)}, *dv[2] = {random_floats(a.nk, 1), random_floats(a.nk, 1)};
    double score[5 * 3], worst = 0, worst_wrong = 0, mag = 0;
    ref->edge_scores(score, q, k, v, NULL, NULL, dout, 2, dk, dv, a.seqs, a.n_seqs, &a.p, a.use_rules, grad_edge_units, 5);
    for (int u = 0; u < 5; u++)
        for (int s = 0; s < a.n_seqs; s++) {
            double t = 1e-4, fd = (interpolated_loss(&a, q, k, v, dk, dv, dout, &grad_edge_units[u], s, t, NULL, NULL) -
                                   interpolated_loss(&a, q, k, v, dk, dv, dout, &grad_edge_units[u], s, -t, NULL, NULL)) / (2 * t);
            double got = score[u * a.n_seqs + s];
            worst = fmax(worst, fabs(got - fd)), mag = fmax(mag, fabs(fd));
        }
    // With a base (EAP-IG: gradients at a path point, differences from the clean pass): the derivative
    // along k_d - base for the edges reading the current pass; ignoring the base must fail it.
    double based[5 * 3], worst_base = 0, mag_base = 0, worst_nobase = 0;
    float *kb = random_floats(a.nk, 2), *vb = random_floats(a.nk, 1);
    ref->edge_scores(based, q, k, v, kb, vb, dout, 2, dk, dv, a.seqs, a.n_seqs, &a.p, a.use_rules, grad_edge_units, 5);
    for (int u = 0; u < 5; u++)
        for (int s = 0; s < a.n_seqs; s++) {
            double t = 1e-4, fd = (interpolated_loss(&a, q, k, v, dk, dv, dout, &grad_edge_units[u], s, t, kb, vb) -
                                   interpolated_loss(&a, q, k, v, dk, dv, dout, &grad_edge_units[u], s, -t, kb, vb)) / (2 * t);
            worst_base = fmax(worst_base, fabs(based[u * a.n_seqs + s] - fd)), mag_base = fmax(mag_base, fabs(fd));
            worst_nobase = fmax(worst_nobase, fabs(score[u * a.n_seqs + s] - fd));
        }
    printf("  ref   edge_scores  with a base against d/dt: max error %.3g of %.3g (base ignored: %.3g)\n", worst_base,
           mag_base, worst_nobase);
    check(mag_base > 0 && worst_base <= 1e-6 * mag_base, "ref edge_scores with a base against differences: %.3g of %.3g",
          worst_base, mag_base);
    check(worst_nobase > 1e-2 * mag_base, "edge_scores without the base matched the based derivative: not exercised");
    free(kb), free(vb);
    // Wrong: scores from the clean pass's keys (rules ignored), as if every edge read the current keys.
    double wrong[5 * 3];
    ref->edge_scores(wrong, q, k, v, NULL, NULL, dout, 2, dk, dv, a.seqs, a.n_seqs, &a.p, NULL, grad_edge_units, 5);
    for (int i = 0; i < 5 * a.n_seqs; i++) worst_wrong = fmax(worst_wrong, fabs(wrong[i] - score[i]));
    // Central differences in double at t = 1e-4: the t^2 term is far below 1e-6 of the largest score.
    printf("  ref   edge_scores  against d/dt of the interpolated loss: max error %.3g of %.3g (rules ignored: %.3g)\n",
           worst, mag, worst_wrong);
    check(mag > 0 && worst <= 1e-6 * mag, "ref edge_scores against differences: %.3g of %.3g", worst, mag);
    check(worst_wrong > 1e-2 * mag, "edge_scores without the rules gave the same scores: the test does not exercise them");

    // Head scores: sum over the unit's positions of (z - z_d) . dz, independently in the test.
    head_score_unit hu[3] = {{.head = 0, .type = 3, .donor = 0}, {.head = 3, .type = 6, .donor = 1}, {.head = 2, .type = 1, .donor = 1}};
    float *z = random_floats(a.nq, 1), *dz = random_floats(a.nq, 1);
    const float *dzd[2] = {random_floats(a.nq, 1), random_floats(a.nq, 1)};
    double hs[3 * 3];
    ref->head_scores(hs, z, dzd, dz, a.seqs, a.n_seqs, &a.p, hu, 3);
    double herr = 0, hmag = 0;
    for (int u = 0; u < 3; u++)
        for (int s = 0; s < a.n_seqs; s++) {
            const attn_seq *sq = &a.seqs[s];
            double want = 0;
            for (int r = 0; r < sq->n_q; r++) {
                int B = sq->q_pos + r;
                if (B >= sq->n_typed || a.types[B] != hu[u].type) continue;
                for (int e = 0; e < a.p.head_dim; e++) {
                    size_t c = (size_t)hu[u].head * a.p.head_dim + e;
                    want += ((double)z[(size_t)(sq->q_row + r) * a.p.q_stride + c] -
                             dzd[hu[u].donor][(size_t)(sq->donor_row + B) * a.p.q_stride + c]) *
                            dz[(size_t)(sq->q_row + r) * a.p.q_stride + c];
                }
            }
            herr = fmax(herr, fabs(hs[u * a.n_seqs + s] - want)), hmag = fmax(hmag, fabs(want));
        }
    printf("  ref   head_scores  against the test's sum: max error %.3g of %.3g\n", herr, hmag);
    check(hmag > 0 && herr <= 1e-12 * hmag, "ref head_scores: %.3g of %.3g", herr, hmag);
    free(q), free(k), free(v), free(dout), free((void *)dk[0]), free((void *)dk[1]), free((void *)dv[0]),
        free((void *)dv[1]), free(z), free(dz), free((void *)dzd[0]), free((void *)dzd[1]);
}

// ---- Every backend against ref. Outputs start as the same random junk on both sides, so an op that
// writes where it must not (padding columns, rows past a donor's typed positions) or fails to
// overwrite shows as a difference.

static double max_rel_error_d(const double *got, const double *want, size_t n) {
    double scale = 1e-30, worst = 0;
    for (size_t i = 0; i < n; i++) scale = fmax(scale, fabs(want[i]));
    for (size_t i = 0; i < n; i++) {
        double e = fabs(got[i] - want[i]) / scale;
        worst = isnan(e) ? INFINITY : fmax(worst, e);
    }
    return worst;
}

static void test_grad_linear(const kernel_ops *b, const kernel_ops *ref) {
    int rows = 37, n_in = 96, n_out = 301;  // n_out above the cpu bf16 block of 256 weight rows
    size_t nx = (size_t)rows * n_in, nw = (size_t)n_out * n_in;
    float *dy = random_floats((size_t)rows * n_out, 1), *w = random_floats(nw, 0.5f), *dx0 = random_floats(nx, 1);
    uint16_t *wb = ep_malloc(sizeof(uint16_t) * nw);
    for (size_t i = 0; i < nw; i++) wb[i] = f32_to_bf16(w[i]);
    float *want = ep_malloc(sizeof(float) * nx), *got = ep_malloc(sizeof(float) * nx);
    for (int bf = 0; bf < 2; bf++)
        for (int acc = 0; acc < 2; acc++) {
            memcpy(want, dx0, sizeof(float) * nx);
            if (bf)
                ref->linear_back_bf16(want, dy, wb, rows, n_in, n_out, acc);
            else
                ref->linear_back(want, dy, w, rows, n_in, n_out, acc);
            staging s = {.b = b};
            float *bdy = stage_in(&s, dy, sizeof(float) * (size_t)rows * n_out), *bdx = stage_in(&s, dx0, sizeof(float) * nx);
            void *bw = bf ? stage_in(&s, wb, sizeof(uint16_t) * nw) : stage_in(&s, w, sizeof(float) * nw);
            if (bf)
                b->linear_back_bf16(bdx, bdy, bw, rows, n_in, n_out, acc);
            else
                b->linear_back(bdx, bdy, bw, rows, n_in, n_out, acc);
            stage_out(&s, got, bdx, sizeof(float) * nx);
            stage_free(&s);
            const char *names[4] = {"linear_back", "linear_back+", "lin_back-bf16", "lin_back-bf16+"};
            report(b->name, names[2 * bf + acc], max_rel_error(got, want, nx, 1e-6), tol);
        }
    free(dy), free(w), free(dx0), free(wb), free(want), free(got);
}

static void test_grad_norms_rope(const kernel_ops *b, const kernel_ops *ref) {
    int rows = 11, dim = 200;
    size_t n = (size_t)rows * dim;
    float *x = random_floats(n, 3), *w = random_floats((size_t)dim, 1), *dy = random_floats(n, 1), *dx0 = random_floats(n, 1);
    float *want = ep_malloc(sizeof(float) * n), *got = ep_malloc(sizeof(float) * n);
    for (int kind = 0; kind < 6; kind++) {
        int acc = kind & 1, op = kind / 2;  // rms offset 0, rms offset 1, layer; overwrite and accumulate
        memcpy(want, dx0, sizeof(float) * n);
        staging s = {.b = b};
        float *bx = stage_in(&s, x, sizeof(float) * n), *bw = stage_in(&s, w, sizeof(float) * dim);
        float *bdy = stage_in(&s, dy, sizeof(float) * n), *bdx = stage_in(&s, dx0, sizeof(float) * n);
        if (op < 2) {
            ref->rmsnorm_back(want, x, w, (float)op, dy, rows, dim, 1e-6f, acc);
            b->rmsnorm_back(bdx, bx, bw, (float)op, bdy, rows, dim, 1e-6f, acc);
        } else {
            ref->layernorm_back(want, x, w, dy, rows, dim, 1e-5f, acc);
            b->layernorm_back(bdx, bx, bw, bdy, rows, dim, 1e-5f, acc);
        }
        stage_out(&s, got, bdx, sizeof(float) * n);
        stage_free(&s);
        const char *names[6] = {"rms_back", "rms_back+", "rms+1_back", "rms+1_back+", "ln_back", "ln_back+"};
        report(b->name, names[kind], max_rel_error(got, want, n, 1e-6), tol);
    }
    free(x), free(w), free(dy), free(dx0), free(want), free(got);

    int rrows = 9, n_heads = 3, head_dim = 16, stride = 50;
    size_t rn = (size_t)rrows * stride;
    int pos[9] = {0, 1, 2, 7, 100, 513, 4095, 4096, 30000};
    float inv_freq[8];
    for (int i = 0; i < 8; i++) inv_freq[i] = 1.0f / powf(10000.0f, (float)(2 * i) / 12.0f);
    for (int rot_dim = 12; rot_dim <= 16; rot_dim += 4) {
        float *g = random_floats(rn, 1), *rw = ep_malloc(sizeof(float) * rn), *rg = ep_malloc(sizeof(float) * rn);
        memcpy(rw, g, sizeof(float) * rn);
        ref->rope_back(rw, stride, pos, inv_freq, rrows, n_heads, head_dim, rot_dim);
        staging s = {.b = b};
        float *bg = stage_in(&s, g, sizeof(float) * rn);
        int *bpos = stage_in(&s, pos, sizeof pos);
        float *bf = stage_in(&s, inv_freq, sizeof inv_freq);
        b->rope_back(bg, stride, bpos, bf, rrows, n_heads, head_dim, rot_dim);
        stage_out(&s, rg, bg, sizeof(float) * rn);
        stage_free(&s);
        report(b->name, rot_dim == 16 ? "rope_back" : "rope_back-part", max_rel_error(rg, rw, rn, 1e-6), tol);
        free(g), free(rw), free(rg);
    }
}

static void test_grad_pointwise(const kernel_ops *b, const kernel_ops *ref) {
    size_t n = 1000;
    float *x = random_floats(n, 4), *u = random_floats(n, 2), *dy = random_floats(n, 1), *y = ep_malloc(sizeof(float) * n);
    memcpy(y, x, sizeof(float) * n);
    ref->softcap(y, n, 3.0f);
    float *want = ep_malloc(sizeof(float) * 2 * n), *got = ep_malloc(sizeof(float) * 2 * n);
    for (int op = 0; op < 5; op++) {
        staging s = {.b = b};
        float *bx = stage_in(&s, x, sizeof(float) * n), *bu = stage_in(&s, u, sizeof(float) * n);
        float *bdy = stage_in(&s, dy, sizeof(float) * n), *by = stage_in(&s, y, sizeof(float) * n);
        float *bout = stage_in(&s, x, sizeof(float) * n), *bout2 = stage_in(&s, u, sizeof(float) * n);
        size_t m = n;
        const char *name = "";
        act_kind act = op % 2 ? ACT_GELU_TANH : ACT_SILU;
        if (op < 2) {
            ref->act_back(want, x, dy, n, act), b->act_back(bout, bx, bdy, n, act);
            name = op ? "act_back-gelu" : "act_back-silu";
        } else if (op < 4) {
            ref->glu_back(want, want + n, x, u, dy, n, act), b->glu_back(bout, bout2, bx, bu, bdy, n, act);
            name = op == 3 ? "glu_back-gelu" : "glu_back-silu", m = 2 * n;
        } else {
            ref->softcap_back(want, y, dy, n, 3.0f), b->softcap_back(bout, by, bdy, n, 3.0f);
            name = "softcap_back";
        }
        stage_out(&s, got, bout, sizeof(float) * n);
        if (m == 2 * n) stage_out(&s, got + n, bout2, sizeof(float) * n);
        stage_free(&s);
        report(b->name, name, max_rel_error(got, want, m, 1e-6), tol);
    }
    // In place (dx = dy), as the contract allows.
    memcpy(want, dy, sizeof(float) * n);
    ref->act_back(want, x, want, n, ACT_GELU_TANH);
    staging s = {.b = b};
    float *bx = stage_in(&s, x, sizeof(float) * n), *bdy = stage_in(&s, dy, sizeof(float) * n);
    b->act_back(bdy, bx, bdy, n, ACT_GELU_TANH);
    stage_out(&s, got, bdy, sizeof(float) * n);
    stage_free(&s);
    report(b->name, "act_back-inpl", max_rel_error(got, want, n, 1e-6), tol);
    free(x), free(u), free(dy), free(y), free(want), free(got);
}

// fp32 backends against the double reference: dk and dv sum over every query of a sequence and the
// query heads of a KV group, dlogit carries the cancellation g - sum p g; 1e-4 of the array's largest
// entry covers that (the forward attention holds 2e-5).
static const double attn_grad_tol = 1e-4;

static void test_grad_attention(const kernel_ops *b, const kernel_ops *ref) {
    for (int variant = 0; variant < 4; variant++) {
        grad_attn a;
        grad_attn_init(&a, variant != 2 ? 5.0f : 0.0f, variant != 2 ? 6 : 0);
        if (variant == 0) a.use_rules = NULL;
        if (variant == 3) grad_attn_modes(&a);
        size_t nq = a.nq, nk = a.nk;
        float *q = random_floats(nq, 2), *k = random_floats(nk, 2), *v = random_floats(nk, 1), *dout = random_floats(nq, 1);
        float *dkn[2] = {random_floats(nk, 2), random_floats(nk, 2)}, *dvn[2] = {random_floats(nk, 1), random_floats(nk, 1)};
        // Past a donor's typed positions (the decode step's donor row) lies NaN: never to be read.
        for (int d = 0; d < 2; d++)
            for (int c = 0; c < a.p.kv_stride; c++) dkn[d][(size_t)(GA_NKV - 1) * a.p.kv_stride + c] = dvn[d][(size_t)(GA_NKV - 1) * a.p.kv_stride + c] = NAN;
        // Outputs: 7 arrays (dq, dk, dv, donor dk 0/1, donor dv 0/1), all starting as junk.
        size_t sz[7] = {nq, nk, nk, nk, nk, nk, nk};
        float *junk[7], *want[7], *got[7];
        for (int i = 0; i < 7; i++) {
            junk[i] = random_floats(sz[i], 1), want[i] = ep_malloc(sizeof(float) * sz[i]), got[i] = ep_malloc(sizeof(float) * sz[i]);
            memcpy(want[i], junk[i], sizeof(float) * sz[i]);
        }
        const float *ck[2] = {dkn[0], dkn[1]}, *cv[2] = {dvn[0], dvn[1]};
        float *wdk[2] = {want[3], want[4]}, *wdv[2] = {want[5], want[6]};
        ref->attention_back(want[0], want[1], want[2], q, k, v, dout, 2, ck, cv, wdk, wdv, a.seqs, a.n_seqs, &a.p, a.use_rules);
        staging s = {.b = b};
        float *bq = stage_in(&s, q, sizeof(float) * nq), *bk = stage_in(&s, k, sizeof(float) * nk);
        float *bv = stage_in(&s, v, sizeof(float) * nk), *bo = stage_in(&s, dout, sizeof(float) * nq);
        const float *bck[2] = {stage_in(&s, dkn[0], sizeof(float) * nk), stage_in(&s, dkn[1], sizeof(float) * nk)};
        const float *bcv[2] = {stage_in(&s, dvn[0], sizeof(float) * nk), stage_in(&s, dvn[1], sizeof(float) * nk)};
        float *bout[7];
        for (int i = 0; i < 7; i++) bout[i] = stage_in(&s, junk[i], sizeof(float) * sz[i]);
        float *bdk[2] = {bout[3], bout[4]}, *bdv[2] = {bout[5], bout[6]};
        b->attention_back(bout[0], bout[1], bout[2], bq, bk, bv, bo, 2, bck, bcv, bdk, bdv, a.seqs, a.n_seqs, &a.p, a.use_rules);
        for (int i = 0; i < 7; i++) stage_out(&s, got[i], bout[i], sizeof(float) * sz[i]);
        // Donor gradients dropped (NULL targets): dq, dk, dv must not change.
        float *nq0 = stage_in(&s, junk[0], sizeof(float) * nq), *nk0 = stage_in(&s, junk[1], sizeof(float) * nk);
        float *nv0 = stage_in(&s, junk[2], sizeof(float) * nk);
        b->attention_back(nq0, nk0, nv0, bq, bk, bv, bo, 2, bck, bcv, NULL, NULL, a.seqs, a.n_seqs, &a.p, a.use_rules);
        float *drop = ep_malloc(sizeof(float) * (nq + 2 * nk));
        stage_out(&s, drop, nq0, sizeof(float) * nq);
        stage_out(&s, drop + nq, nk0, sizeof(float) * nk);
        stage_out(&s, drop + nq + nk, nv0, sizeof(float) * nk);
        check(!memcmp(drop, got[0], sizeof(float) * nq) && !memcmp(drop + nq, got[1], sizeof(float) * nk) &&
                  !memcmp(drop + nq + nk, got[2], sizeof(float) * nk),
              "%s attention_back: dropping the donor gradients changed dq, dk or dv", b->name);
        free(drop);
        stage_free(&s);
        const char *names[4][4] = {{"attn_back:dq", "attn_back:dk", "attn_back:dv", "attn_back:donor"},
                                   {"attnp_back:dq", "attnp_back:dk", "attnp_back:dv", "attnp_back:donor"},
                                   {"attnp0_back:dq", "attnp0_back:dk", "attnp0_back:dv", "attnp0_back:donor"},
                                   {"attniv_back:dq", "attniv_back:dk", "attniv_back:dv", "attniv_back:donor"}};
        for (int i = 0; i < 3; i++) report(b->name, names[variant][i], max_rel_error(got[i], want[i], sz[i], 1e-6), attn_grad_tol);
        // The donor arrays compared where they are numbers (the NaN row must stay as it was: junk).
        double worst = 0;
        for (int i = 3; i < 7; i++) worst = fmax(worst, max_rel_error(got[i], want[i], sz[i], 1e-6));
        report(b->name, names[variant][3], worst, attn_grad_tol);
        // Can fail: dropping the donor gradients (NULL) leaves them junk, which must differ from ref's.
        if (variant == 1)
            check(max_rel_error(junk[3], want[3], nk, 1e-6) > 100 * attn_grad_tol, "donor key gradients equal the junk they started as");
        free(q), free(k), free(v), free(dout), free(dkn[0]), free(dkn[1]), free(dvn[0]), free(dvn[1]);
        for (int i = 0; i < 7; i++) free(junk[i]), free(want[i]), free(got[i]);
    }
}

// Gemma-2's attention shape: head_dim 256 (every lane slot of the cuda kernels), GQA 8:4, softcap 50,
// a window shorter than the prompt, and a decode step over a 300-position cache (one query, many keys).
static void test_grad_attention_wide(const kernel_ops *b, const kernel_ops *ref) {
    attn_seq seqs[2] = {{.q_row = 0, .n_q = 40, .q_pos = 0, .kv_row = 0}, {.q_row = 40, .n_q = 1, .q_pos = 299, .kv_row = 40}};
    attn_params p = {.n_heads = 8, .n_kv_heads = 4, .head_dim = 256, .q_stride = 2048, .kv_stride = 1024,
                     .scale = 1.0f / 16, .softcap = 50.0f, .window = 24};
    int q_rows = 41, kv_rows = 40 + 300;
    size_t nq = (size_t)q_rows * p.q_stride, nk = (size_t)kv_rows * p.kv_stride;
    float *q = random_floats(nq, 2), *k = random_floats(nk, 2), *v = random_floats(nk, 1), *dout = random_floats(nq, 1);
    float *wq = ep_calloc(nq, sizeof(float)), *wk = ep_calloc(nk, sizeof(float)), *wv = ep_calloc(nk, sizeof(float));
    float *gq = ep_calloc(nq, sizeof(float)), *gk = ep_calloc(nk, sizeof(float)), *gv = ep_calloc(nk, sizeof(float));
    ref->attention_back(wq, wk, wv, q, k, v, dout, 0, NULL, NULL, NULL, NULL, seqs, 2, &p, NULL);
    staging s = {.b = b};
    float *bq = stage_in(&s, q, sizeof(float) * nq), *bk = stage_in(&s, k, sizeof(float) * nk);
    float *bv = stage_in(&s, v, sizeof(float) * nk), *bo = stage_in(&s, dout, sizeof(float) * nq);
    float *bgq = stage_in(&s, gq, sizeof(float) * nq), *bgk = stage_in(&s, gk, sizeof(float) * nk);
    float *bgv = stage_in(&s, gv, sizeof(float) * nk);
    b->attention_back(bgq, bgk, bgv, bq, bk, bv, bo, 0, NULL, NULL, NULL, NULL, seqs, 2, &p, NULL);
    stage_out(&s, gq, bgq, sizeof(float) * nq);
    stage_out(&s, gk, bgk, sizeof(float) * nk);
    stage_out(&s, gv, bgv, sizeof(float) * nk);
    stage_free(&s);
    report(b->name, "attn_back-d256:dq", max_rel_error(gq, wq, nq, 1e-6), attn_grad_tol);
    report(b->name, "attn_back-d256:dk", max_rel_error(gk, wk, nk, 1e-6), attn_grad_tol);
    report(b->name, "attn_back-d256:dv", max_rel_error(gv, wv, nk, 1e-6), attn_grad_tol);
    free(q), free(k), free(v), free(dout), free(wq), free(wk), free(wv), free(gq), free(gk), free(gv);
}

static void test_grad_scores(const kernel_ops *b, const kernel_ops *ref) {
    grad_attn a;
    grad_attn_init(&a, 5.0f, 6);
    size_t nq = a.nq, nk = a.nk;
    float *q = random_floats(nq, 2), *k = random_floats(nk, 2), *v = random_floats(nk, 1), *dout = random_floats(nq, 1);
    float *dkn[2] = {random_floats(nk, 2), random_floats(nk, 2)}, *dvn[2] = {random_floats(nk, 1), random_floats(nk, 1)};
    for (int d = 0; d < 2; d++)
        for (int c = 0; c < a.p.kv_stride; c++) dkn[d][(size_t)(GA_NKV - 1) * a.p.kv_stride + c] = dvn[d][(size_t)(GA_NKV - 1) * a.p.kv_stride + c] = NAN;
    const float *ck[2] = {dkn[0], dkn[1]}, *cv[2] = {dvn[0], dvn[1]};
    enum { NU = 5 };
    double want[NU * 3], got[NU * 3];
    ref->edge_scores(want, q, k, v, NULL, NULL, dout, 2, ck, cv, a.seqs, a.n_seqs, &a.p, a.use_rules, grad_edge_units, NU);
    float *kbase = random_floats(nk, 2), *vbase = random_floats(nk, 1);
    double want_b[NU * 3], got_b[NU * 3];
    ref->edge_scores(want_b, q, k, v, kbase, vbase, dout, 2, ck, cv, a.seqs, a.n_seqs, &a.p, a.use_rules, grad_edge_units, NU);
    staging s = {.b = b};
    float *bq = stage_in(&s, q, sizeof(float) * nq), *bk = stage_in(&s, k, sizeof(float) * nk);
    float *bv = stage_in(&s, v, sizeof(float) * nk), *bo = stage_in(&s, dout, sizeof(float) * nq);
    const float *bck[2] = {stage_in(&s, dkn[0], sizeof(float) * nk), stage_in(&s, dkn[1], sizeof(float) * nk)};
    const float *bcv[2] = {stage_in(&s, dvn[0], sizeof(float) * nk), stage_in(&s, dvn[1], sizeof(float) * nk)};
    for (int i = 0; i < NU * 3; i++) got[i] = 12345.0;  // junk that must be overwritten
    double *bs = stage_in(&s, got, sizeof got);
    b->edge_scores(bs, bq, bk, bv, NULL, NULL, bo, 2, bck, bcv, a.seqs, a.n_seqs, &a.p, a.use_rules, grad_edge_units, NU);
    stage_out(&s, got, bs, sizeof got);
    report(b->name, "edge_scores", max_rel_error_d(got, want, NU * 3), attn_grad_tol);
    float *bkb = stage_in(&s, kbase, sizeof(float) * nk), *bvb = stage_in(&s, vbase, sizeof(float) * nk);
    for (int i = 0; i < NU * 3; i++) got_b[i] = 12345.0;
    double *bsb = stage_in(&s, got_b, sizeof got_b);
    b->edge_scores(bsb, bq, bk, bv, bkb, bvb, bo, 2, bck, bcv, a.seqs, a.n_seqs, &a.p, a.use_rules, grad_edge_units, NU);
    stage_out(&s, got_b, bsb, sizeof got_b);
    report(b->name, "edge_scores-base", max_rel_error_d(got_b, want_b, NU * 3), attn_grad_tol);
    free(kbase), free(vbase);
    {  // every intervention, in the rules and in the units
        grad_attn m = a;
        grad_attn_modes(&m);
        double wiv[N_IV_UNITS * 3], giv[N_IV_UNITS * 3];
        ref->edge_scores(wiv, q, k, v, NULL, NULL, dout, 2, ck, cv, m.seqs, m.n_seqs, &m.p, &m.rules, grad_iv_units, N_IV_UNITS);
        for (int i = 0; i < N_IV_UNITS * 3; i++) giv[i] = 12345.0;
        double *bsi = stage_in(&s, giv, sizeof giv);
        b->edge_scores(bsi, bq, bk, bv, NULL, NULL, bo, 2, bck, bcv, m.seqs, m.n_seqs, &m.p, &m.rules, grad_iv_units, N_IV_UNITS);
        stage_out(&s, giv, bsi, sizeof giv);
        report(b->name, "edge_scores-iv", max_rel_error_d(giv, wiv, N_IV_UNITS * 3), attn_grad_tol);
    }

    head_score_unit hu[3] = {{.head = 0, .type = 3, .donor = 0}, {.head = 3, .type = 6, .donor = 1}, {.head = 2, .type = 1, .donor = 1}};
    double hw[9], hg[9];
    // z and dz in the q layout; donor z rows past the typed positions are NaN too.
    float *z = random_floats(nq, 1), *dz = random_floats(nq, 1), *zd[2] = {random_floats(nq, 1), random_floats(nq, 1)};
    const float *czd[2] = {zd[0], zd[1]};
    ref->head_scores(hw, z, czd, dz, a.seqs, a.n_seqs, &a.p, hu, 3);
    float *bz = stage_in(&s, z, sizeof(float) * nq), *bdz = stage_in(&s, dz, sizeof(float) * nq);
    const float *bzd[2] = {stage_in(&s, zd[0], sizeof(float) * nq), stage_in(&s, zd[1], sizeof(float) * nq)};
    for (int i = 0; i < 9; i++) hg[i] = 12345.0;
    double *bhs = stage_in(&s, hg, sizeof hg);
    b->head_scores(bhs, bz, bzd, bdz, a.seqs, a.n_seqs, &a.p, hu, 3);
    stage_out(&s, hg, bhs, sizeof hg);
    stage_free(&s);
    // z - z_d summed in double from fp32 inputs: every backend should give ref's sums to rounding.
    report(b->name, "head_scores", max_rel_error_d(hg, hw, 9), 1e-12);
    free(q), free(k), free(v), free(dout), free(dkn[0]), free(dkn[1]), free(dvn[0]), free(dvn[1]);
    free(z), free(dz), free(zd[0]), free(zd[1]);
}

static void test_grad_ops(const kernel_ops *b, const kernel_ops *ref) {
    test_grad_linear(b, ref);
    test_grad_norms_rope(b, ref);
    test_grad_pointwise(b, ref);
    test_grad_attention(b, ref);
    test_grad_attention_wide(b, ref);
    test_grad_scores(b, ref);
}

// The thread probe: products whose bits OpenBLAS's own threading changed (shapes from issue 19: e.g.
// 68 x 108 x 579 NoTrans/Trans, 119 x 264 x 532 NoTrans/NoTrans, 189 x 624 x 496), written one after the
// other to `path`, preceded by the pool's thread count. Inputs come from the file's fixed seed, so
// every child computes the same products.
enum { N_PROBE_PARTS = 13 };
static const char *const probe_names[N_PROBE_PARTS] = {
    "matmul 68x579->108", "matmul+b 189x496->624", "matmul 300x576->1536", "matmul-bf16 68x579->600",
    "sgemm NN 119x264x532", "sgemm TN 200x64x300", "sgemm NT 189x624x496", "sgemm NN 8x576x4000",
    "attention 2 seqs x 4 heads, 300 queries", "patched attention 300 queries",
    "linear_back-bf16 68x600->579", "attention_back (patched) dq, dk, dv, donor dk, dv", "edge_scores 4 units"};

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
    // The gradient ops: the bf16 input gradient (several blocks of weight rows), the patched attention
    // backward (dq, dk, dv and the donor's dk, dv) and edge scores on the same prompt.
    {
        int rows = 68, n_in = 579, n_out = 600;
        float *dy = random_floats((size_t)rows * n_out, 1), *wf = random_floats((size_t)n_out * n_in, 0.5f);
        uint16_t *w = ep_malloc(sizeof(uint16_t) * (size_t)n_out * n_in);
        for (size_t i = 0; i < (size_t)n_out * n_in; i++) w[i] = f32_to_bf16(wf[i]);
        float *dx = ep_malloc(sizeof(float) * (size_t)rows * n_in);
        b->linear_back_bf16(dx, dy, w, rows, n_in, n_out, 0);
        write_floats(f, dx, (size_t)rows * n_in);
        free(dy), free(wf), free(w), free(dx);
    }
    float *dout = random_floats(nq, 1), *g = ep_calloc(nq + 4 * nk, sizeof(float));
    float *gk[1] = {g + nq + 2 * nk}, *gv[1] = {g + nq + 3 * nk};
    b->attention_back(g, g + nq, g + nq + nk, q, k, v, dout, 1, dkc, dvc, gk, gv, &ps, 1, &p, &rules);
    write_floats(f, g, (size_t)TQ * p.q_stride);
    for (int part = 0; part < 4; part++) write_floats(f, g + nq + (size_t)part * nk, (size_t)TQ * p.kv_stride);
    edge_score_unit units[4] = {{0, 1, 3, 0, EDGE_SRC_KV}, {1, 2, 3, 0, EDGE_SRC_K}, {3, 4, 3, 0, EDGE_SRC_V}, {2, 3, 1, 0, EDGE_SRC_ZERO}};
    double score[4];
    b->edge_scores(score, q, k, v, NULL, NULL, dout, 1, dkc, dvc, &ps, 1, &p, &rules, units, 4);
    fwrite(score, sizeof score, 1, f);
    free(dout), free(g);
    free(q), free(k), free(v), free(out), free(types), free(index), free(dk), free(dv);
    return fclose(f) != 0;
}

// Part sizes of the probe file, in order, after the thread count.
static size_t probe_part_bytes(int i) {
    static const size_t floats[N_PROBE_PARTS] = {68 * 108, 189 * 624, 300 * 1536, 68 * 600, 119 * 264, 200 * 64,
                                                 189 * 624, 8 * 576, 470 * 256, 300 * 256,
                                                 68 * 579, 300 * 256 + 4 * 300 * 128, 4 * 2 /* doubles */};
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
    test_grad_fd_pointwise();
    test_grad_fd_attention();
    test_grad_scores_reference();
    test_grad_scores_interventions();
    const kernel_ops *backends[3] = {kernel_ops_cpu(), kernel_ops_offset(), kernel_ops_cuda()};
    for (int i = 0; i < 3; i++) {
        const kernel_ops *b = backends[i];
        if (!b) {
            printf("  cuda backend not available here (no CUDA build or no GPU): only cpu and offset are checked\n");
            continue;
        }
        if (b == kernel_ops_offset()) {  // the cpu kernels behind device-style memory: the gradient ops' wrappers
            test_grad_ops(b, ref);
            test_metric_ops(b, ref);
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
        test_grad_ops(b, ref);
        test_metric_ops(b, ref);
    }
    test_thread_independence();
    return test_finish("test_ops");
}
