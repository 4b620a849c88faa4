// bench_ops: times every op of the kernel dispatch table on the cpu and cuda backends at the shapes of a
// real forward pass (Gemma-2-2B-like: hidden 2304, intermediate 9216, 8 query heads and 4 kv heads of
// 256, a batch of 2048 rows = 16 sequences of 128 tokens), and prints one table: op, shape, cpu ms,
// cuda ms, ratio (cpu / cuda), achieved GFLOP/s where an op has a meaningful flop count, and the max
// relative difference of the cuda result from the cpu one (a sanity check on big shapes; test_ops is
// the correctness test). attn-patch is patched attention (edge ablation by 3 rules over 2 donors) on
// the attention case's 16 x 128 shape. mm-bf16 is the bf16 product of a bf16 run (matmul_bf16). attn-2b,
// patch-2b and decode-2b time attention at Gemma-2 2B's patching shape (64 x 100 tokens, and a decode step
// over 1024 keys), the rows to set against the per-row kernel's figures in docs/cuda.md.
//
// Timing: each backend runs the op once untimed (the result compared), then cuda does a few more warm-up
// calls, then `reps` calls are timed together and closed by the backend's sync; the cpu gets fewer reps
// so the whole run stays within seconds. In-place ops (rope, act, softcap, add, scale) keep updating the
// same buffer across reps, which changes values but not the work. Without a GPU the cuda columns are "-".
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/bf16.h"
#include "kernels/ops.h"
#include "pipeline/error.h"
#include "bench/bench_util.h"

enum {
    OP_MATMUL, OP_MATMUL_BF16, OP_RMSNORM, OP_LAYERNORM, OP_ROPE, OP_GLU, OP_ACT, OP_SOFTCAP, OP_ADD, OP_SCALE, OP_ATTENTION,
    OP_PATCHED
};
enum { MAX_BUFS = 8 };

typedef struct {
    int op;
    const char *name;
    char shape[80];
    double flops;  // per call; 0 where a flop rate says nothing useful
    int cpu_reps, cuda_reps;
    int n_bufs;
    size_t bytes[MAX_BUFS];
    void *host[MAX_BUFS];  // initial contents, owned
    int out;               // which buffer holds the result
    // op parameters
    int rows, n_in, n_out, dim, stride, n_heads, head_dim, rot_dim, has_bias;
    size_t n;
    act_kind act;
    attn_seq seqs[64];
    int n_seqs;
    attn_params ap;
    int32_t *types, *index;  // patched attention: one ICL-like layout shared by all sequences, owned
    edge_rule_set rules;
} bench_case;

static unsigned long long rng_state = 0x2545F4914F6CDD1Dull;

static float frand(void) {  // uniform in [-1, 1)
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)((rng_state >> 40) / (double)(1ull << 24)) * 2.0f - 1.0f;
}

static void add_floats(bench_case *c, size_t n, float amplitude) {
    float *x = ep_malloc(sizeof(float) * n);
    for (size_t i = 0; i < n; i++) x[i] = frand() * amplitude;
    c->bytes[c->n_bufs] = sizeof(float) * n;
    c->host[c->n_bufs++] = x;
}

static void run_op(const kernel_ops *b, void **buf, const bench_case *c) {
    switch (c->op) {
    case OP_MATMUL: b->matmul(buf[0], buf[1], buf[2], c->has_bias ? buf[3] : NULL, c->rows, c->n_in, c->n_out); break;
    case OP_MATMUL_BF16: b->matmul_bf16(buf[0], buf[1], buf[2], NULL, c->rows, c->n_in, c->n_out); break;
    case OP_RMSNORM: b->rmsnorm(buf[0], buf[1], buf[2], 1.0f, c->rows, c->dim, 1e-6f); break;
    case OP_LAYERNORM: b->layernorm(buf[0], buf[1], buf[2], buf[3], c->rows, c->dim, 1e-5f); break;
    case OP_ROPE: b->rope(buf[0], c->stride, buf[1], buf[2], c->rows, c->n_heads, c->head_dim, c->rot_dim); break;
    case OP_GLU: b->glu(buf[0], buf[1], buf[2], c->n, c->act); break;
    case OP_ACT: b->act(buf[0], c->n, c->act); break;
    case OP_SOFTCAP: b->softcap(buf[0], c->n, 30.0f); break;
    case OP_ADD: b->add(buf[0], buf[1], c->n); break;
    case OP_SCALE: b->scale(buf[0], c->n, 0.999f); break;
    case OP_ATTENTION: b->attention(buf[0], buf[1], buf[2], buf[3], c->seqs, c->n_seqs, &c->ap); break;
    case OP_PATCHED: {
        const float *dk[2] = {buf[4], buf[5]}, *dv[2] = {buf[6], buf[7]};
        b->patched_attention(buf[0], buf[1], buf[2], buf[3], 2, dk, dv, c->seqs, c->n_seqs, &c->ap, &c->rules);
        break;
    }
    }
}

// Runs the case on one backend: the result of the first call goes to `result` (bytes[out]), and the
// return value is the mean milliseconds per call over `reps` timed calls.
static double time_case(const kernel_ops *b, const bench_case *c, int warmup, int reps, void *result) {
    void *buf[MAX_BUFS] = {0};
    for (int i = 0; i < c->n_bufs; i++) {
        buf[i] = b->alloc(c->bytes[i]);
        b->upload(buf[i], c->host[i], c->bytes[i]);
    }
    run_op(b, buf, c);
    b->sync();
    b->download(result, buf[c->out], c->bytes[c->out]);
    for (int i = 0; i < warmup; i++) run_op(b, buf, c);
    b->sync();
    double t0 = (1e3 * bench_now_s());
    for (int i = 0; i < reps; i++) run_op(b, buf, c);
    b->sync();
    double ms = ((1e3 * bench_now_s()) - t0) / reps;
    for (int i = 0; i < c->n_bufs; i++) b->release(buf[i]);
    return ms;
}

static double max_rel_diff(const float *got, const float *want, size_t n) {
    double scale = 1e-6, worst = 0;
    for (size_t i = 0; i < n; i++)
        if (fabs((double)want[i]) > scale) scale = fabs((double)want[i]);
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)got[i] - (double)want[i]) / scale;
        if (e > worst || isnan(e)) worst = isnan(e) ? INFINITY : e;
    }
    return worst;
}

// ---------------------------------------------------------------------------------------------------
// The cases

enum { ROWS = 2048, HIDDEN = 2304, INTER = 9216, HEADS = 8, KV_HEADS = 4, HEAD_DIM = 256 };

static bench_case *new_case(int op, const char *name, int cpu_reps, int cuda_reps) {
    bench_case *c = ep_calloc(1, sizeof *c);
    c->op = op;
    c->name = name;
    c->cpu_reps = cpu_reps;
    c->cuda_reps = cuda_reps;
    return c;
}

static bench_case *matmul_case(const char *name, int rows, int n_in, int n_out, int has_bias, int cpu_reps) {
    bench_case *c = new_case(OP_MATMUL, name, cpu_reps, 20);
    c->rows = rows, c->n_in = n_in, c->n_out = n_out, c->has_bias = has_bias;
    add_floats(c, (size_t)rows * n_out, 0);  // out
    add_floats(c, (size_t)rows * n_in, 1);
    add_floats(c, (size_t)n_out * n_in, 0.05f);
    if (has_bias) add_floats(c, (size_t)n_out, 1);
    c->flops = 2.0 * rows * n_in * n_out;
    snprintf(c->shape, sizeof c->shape, "%dx%d . %dx%d^T%s", rows, n_in, n_out, n_in, has_bias ? " +b" : "");
    return c;
}

// The bf16 product of a bf16 run (weights bf16, input rounded to bf16 inside the op, fp32 out).
static bench_case *matmul_bf16_case(int rows, int n_in, int n_out, int cpu_reps) {
    bench_case *c = new_case(OP_MATMUL_BF16, "mm-bf16", cpu_reps, 20);
    c->rows = rows, c->n_in = n_in, c->n_out = n_out;
    add_floats(c, (size_t)rows * n_out, 0);  // out
    add_floats(c, (size_t)rows * n_in, 1);
    size_t nw = (size_t)n_out * n_in;
    uint16_t *w = ep_malloc(sizeof(uint16_t) * nw);
    for (size_t i = 0; i < nw; i++) w[i] = f32_to_bf16(frand() * 0.05f);
    c->bytes[c->n_bufs] = sizeof(uint16_t) * nw;
    c->host[c->n_bufs++] = w;
    c->flops = 2.0 * rows * n_in * n_out;
    snprintf(c->shape, sizeof c->shape, "%dx%d . %dx%d^T, bf16 weights", rows, n_in, n_out, n_in);
    return c;
}

static bench_case *norm_case(int op, const char *name) {
    bench_case *c = new_case(op, name, 10, 100);
    c->rows = ROWS, c->dim = HIDDEN;
    add_floats(c, (size_t)ROWS * HIDDEN, 0);
    add_floats(c, (size_t)ROWS * HIDDEN, 3);
    add_floats(c, HIDDEN, 1);
    if (op == OP_LAYERNORM) add_floats(c, HIDDEN, 1);
    snprintf(c->shape, sizeof c->shape, "%dx%d", ROWS, HIDDEN);
    return c;
}

static bench_case *rope_case(void) {
    bench_case *c = new_case(OP_ROPE, "rope", 10, 100);
    c->rows = ROWS, c->n_heads = HEADS, c->head_dim = HEAD_DIM, c->rot_dim = HEAD_DIM, c->stride = HEADS * HEAD_DIM;
    add_floats(c, (size_t)ROWS * HEADS * HEAD_DIM, 1);
    int *pos = ep_malloc(sizeof(int) * ROWS);
    for (int r = 0; r < ROWS; r++) pos[r] = r % 128;
    c->bytes[c->n_bufs] = sizeof(int) * ROWS;
    c->host[c->n_bufs++] = pos;
    float *inv_freq = ep_malloc(sizeof(float) * HEAD_DIM / 2);
    for (int i = 0; i < HEAD_DIM / 2; i++) inv_freq[i] = 1.0f / powf(10000.0f, (float)(2 * i) / HEAD_DIM);
    c->bytes[c->n_bufs] = sizeof(float) * HEAD_DIM / 2;
    c->host[c->n_bufs++] = inv_freq;
    snprintf(c->shape, sizeof c->shape, "%d rows x %d heads x %d", ROWS, HEADS, HEAD_DIM);
    return c;
}

static bench_case *pointwise_case(int op, const char *name, int rows, int dim, int n_bufs, int cpu_reps) {
    bench_case *c = new_case(op, name, cpu_reps, 100);
    c->n = (size_t)rows * dim;
    c->act = ACT_GELU_TANH;
    for (int i = 0; i < n_bufs; i++) add_floats(c, c->n, 3);
    snprintf(c->shape, sizeof c->shape, "%dx%d", rows, dim);
    return c;
}

// n_seqs sequences of n_q queries each ending at position last_pos, with their own kv rows.
static bench_case *attention_case(const char *name, int n_seqs, int n_q, int last_pos, int window) {
    bench_case *c = new_case(OP_ATTENTION, name, 3, 50);
    int n_keys = last_pos + 1;
    c->n_seqs = n_seqs;
    double key_visits = 0;
    for (int s = 0; s < n_seqs; s++) {
        c->seqs[s] = (attn_seq){.q_row = s * n_q, .n_q = n_q, .q_pos = n_keys - n_q, .kv_row = s * n_keys};
        for (int i = n_keys - n_q; i < n_keys; i++) key_visits += window > 0 && i + 1 > window ? window : i + 1;
    }
    c->ap = (attn_params){.n_heads = HEADS, .n_kv_heads = KV_HEADS, .head_dim = HEAD_DIM, .q_stride = HEADS * HEAD_DIM,
                          .kv_stride = KV_HEADS * HEAD_DIM, .scale = 1.0f / 16.0f, .softcap = 50.0f, .window = window};
    size_t nq = (size_t)n_seqs * n_q * c->ap.q_stride, nk = (size_t)n_seqs * n_keys * c->ap.kv_stride;
    add_floats(c, nq, 0);  // out
    add_floats(c, nq, 2);
    add_floats(c, nk, 2);
    add_floats(c, nk, 1);
    c->flops = key_visits * HEADS * 4.0 * HEAD_DIM;  // q.k and p.v, a multiply-add each
    snprintf(c->shape, sizeof c->shape, "%d seq x %dq @%d keys, %d/%d heads x %d, win %d", n_seqs, n_q, n_keys, HEADS,
             KV_HEADS, HEAD_DIM, window);
    return c;
}

// Patched attention over n_seqs full prompts of n_tok positions (queries = keys), with an ICL-like
// layout: bos, shots of x (8 tokens) t y (2) n, then the query x and the last token; 3 rules over 2
// donors whose key/value arrays have the same rows as the current ones.
static bench_case *patched_case(const char *name, int n_seqs, int n_tok) {
    bench_case *c = attention_case(name, n_seqs, n_tok, n_tok - 1, 0);
    c->op = OP_PATCHED;
    size_t nk = c->bytes[2] / sizeof(float);
    add_floats(c, nk, 2);  // donor 0 k, donor 1 k
    add_floats(c, nk, 2);
    add_floats(c, nk, 1);  // donor 0 v, donor 1 v
    add_floats(c, nk, 1);
    c->types = ep_malloc(sizeof(int32_t) * (size_t)n_tok);
    c->index = ep_malloc(sizeof(int32_t) * (size_t)n_tok);
    int shots = (n_tok - 8) / 12;
    for (int i = 0; i < n_tok; i++) {
        int o = (i - 1) % 12, e = (i - 1) / 12;
        if (i == 0) c->types[i] = 0, c->index[i] = -1;
        else if (e < shots) c->types[i] = o < 8 ? 1 : o == 8 ? 2 : o < 11 ? 3 : 4, c->index[i] = e;
        else c->types[i] = i == n_tok - 1 ? 6 : 5, c->index[i] = shots;
    }
    for (int s = 0; s < n_seqs; s++) {
        c->seqs[s].types = c->types, c->seqs[s].index = c->index, c->seqs[s].n_typed = n_tok;
        c->seqs[s].donor_row = c->seqs[s].kv_row;
    }
    c->rules.n = 3;
    c->rules.rule[0] = (edge_rule){.sender_types = 1u << 1 | 1u << 3, .receiver_types = 1u << 6 | 1u << 3,
                                   .relation = REL_ANY, .donor = 0, .heads = {0x55}};
    c->rules.rule[1] = (edge_rule){.sender_types = 0xff, .receiver_types = 1u << 3, .relation = REL_SAME, .donor = 1,
                                   .heads = {0xff}};
    c->rules.rule[2] = (edge_rule){.sender_types = 0xff, .receiver_types = 1u << 5 | 1u << 6, .relation = REL_EARLIER,
                                   .donor = 1, .heads = {0xaa}};
    snprintf(c->shape, sizeof c->shape, "%d seq x %d, %d/%d heads x %d, 3 rules, 2 donors", n_seqs, n_tok, HEADS,
             KV_HEADS, HEAD_DIM);
    return c;
}

int main(void) {
    const kernel_ops *cpu = kernel_ops_cpu(), *cuda = kernel_ops_cuda();
    bench_case *cases[] = {
        matmul_case("matmul", ROWS, HIDDEN, INTER, 0, 2),
        matmul_case("matmul", ROWS, HIDDEN, HEADS * HEAD_DIM, 1, 3),
        matmul_bf16_case(ROWS, HIDDEN, INTER, 2),
        matmul_bf16_case(ROWS, INTER, HIDDEN, 2),
        norm_case(OP_RMSNORM, "rmsnorm"),
        norm_case(OP_LAYERNORM, "layernorm"),
        rope_case(),
        pointwise_case(OP_GLU, "glu-gelu", ROWS, INTER, 3, 4),
        pointwise_case(OP_ACT, "gelu", ROWS, INTER, 1, 4),
        pointwise_case(OP_SOFTCAP, "softcap", ROWS, INTER, 1, 4),
        pointwise_case(OP_ADD, "add", ROWS, HIDDEN, 2, 10),
        pointwise_case(OP_SCALE, "scale", ROWS, HIDDEN, 1, 10),
        attention_case("attention", 16, 128, 127, 4096),
        // Few queries over a long cache, window shorter than the cache: the decode-like shape.
        attention_case("attention", 4, 4, 3071, 2048),
        patched_case("attn-patch", 16, 128),
        // Gemma-2 2B at the patch stage's shape (64 prompts of 100 tokens; 8 heads, 4 kv heads of 256, softcap 50):
        // the tiled tensor-core kernel's rows (docs/cuda.md, "Attention"), plain and patched, and decoding one
        // token per prompt over 1024 cached keys (split-K).
        attention_case("attn-2b", 64, 100, 99, 0),
        patched_case("patch-2b", 64, 100),
        attention_case("decode-2b", 64, 1, 1023, 0),
    };
    int n_cases = (int)(sizeof cases / sizeof cases[0]);

    printf("bench_ops: cpu backend vs %s\n", cuda ? "cuda backend" : "no cuda backend (no CUDA build or no GPU)");
    printf("%-10s %-50s %10s %10s %8s %10s %10s %10s\n", "op", "shape", "cpu ms", "cuda ms", "ratio", "cpu GF/s",
           "cuda GF/s", "max rdiff");
    for (int i = 0; i < n_cases; i++) {
        bench_case *c = cases[i];
        size_t out_bytes = c->bytes[c->out];
        float *want = ep_malloc(out_bytes), *got = ep_malloc(out_bytes);
        double cpu_ms = time_case(cpu, c, 0, c->cpu_reps, want);
        char cuda_ms_s[16] = "-", ratio_s[16] = "-", cpu_gf_s[16] = "-", cuda_gf_s[16] = "-", diff_s[16] = "-";
        if (c->flops > 0) snprintf(cpu_gf_s, sizeof cpu_gf_s, "%.1f", c->flops / cpu_ms / 1e6);
        if (cuda) {
            double cuda_ms = time_case(cuda, c, 3, c->cuda_reps, got);
            snprintf(cuda_ms_s, sizeof cuda_ms_s, "%.3f", cuda_ms);
            snprintf(ratio_s, sizeof ratio_s, "%.1f", cpu_ms / cuda_ms);
            if (c->flops > 0) snprintf(cuda_gf_s, sizeof cuda_gf_s, "%.1f", c->flops / cuda_ms / 1e6);
            snprintf(diff_s, sizeof diff_s, "%.2g", max_rel_diff(got, want, out_bytes / sizeof(float)));
        }
        printf("%-10s %-50s %10.3f %10s %8s %10s %10s %10s\n", c->name, c->shape, cpu_ms, cuda_ms_s, ratio_s, cpu_gf_s,
               cuda_gf_s, diff_s);
        fflush(stdout);
        free(want), free(got);
        for (int j = 0; j < c->n_bufs; j++) free(c->host[j]);
        free(c->types), free(c->index);
        free(c);
    }
    return 0;
}
