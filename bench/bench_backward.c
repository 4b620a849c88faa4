// bench_backward: the cost of attribution against the cost it replaces, in two modes.
//
// Positional (the CPU benchmark of docs/benchmarks.md): on one batch of a model folder (random token ids,
// deterministic), times one forward pass (model_loss), one forward + backward (model_backward, the
// attribution pass) and prints their ratio (best of `reps` interleaved rounds); then head-unit scores per
// second: attribution (every unit from one forward + backward) against exact scoring by one full forward
// per unit, and by exact scoring's prefix reuse (stages/score.c: a unit of layer l runs only layers l..
// from the stored residual stream; the mean over l of that partial pass, timed, is the cost per unit,
// before batching units into one pass). Always the cpu backend, the host model.
//   bench_backward MODEL_DIR [batch=8] [len=100] [targets=2] [reps=3]
//
// --model (one attribution round on any backend, what tools/device_check.py times against torch autograd
// through HF eager): bench_patch's prompts (B prompts of T tokens, typed, donor 0 with other ids at x and
// y), each followed by K target tokens (bench_id continued: prompt s, positions T..T+K-1, untyped); the
// plan every y -> last edge of every layer and head read from donor 0 (bench_patch's); then, as
// stages/score.c's score_attribution_batch does for one batch: the donor pass (patch_donor_passes), the
// patched forward + backward (model_backward; the loss is docs/attribution.md's: per prompt the mean
// target cross-entropy, summed over the prompts) and the head-unit scores (grad_head_scores) of every
// (layer, head, type) for the 7 prompt types (bos x t y n query last; query has no position here, so
// scores 0) and donor 0. Times the three (the mean of R reps after a warm-up rep), prints backward_bytes'
// peak for this batch, and with --dump writes the scores of the last rep as [L][H][7] little-endian
// float64, then the loss (one float64). With --ig-steps M the round is EAP-IG's instead (grad_ig_sums:
// M forward + backward passes along the path from the donor's embeddings, docs/attribution.md), timed
// whole as backward_s (scores_s 0): its ratio to attribution's round is EAP-IG's cost.
//   bench_backward --model DIR [--backend cpu|cuda|offset] [--dtype fp32|bf16] [--batch 64] [--len 100]
//                  [--targets 2] [--reps 3] [--dump FILE] [--ig-steps M]
#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu_gemm.h"
#include "pipeline/backward.h"
#include "stages/patch.h"
#include "stages/plan.h"
#include "stages/prompts.h"
#include "bench/bench_util.h"

// Seconds of one forward pass of the batch from layer `first` (x_in: the residual stream entering it)
// to the logits at the last position of each sequence.
static double time_from_layer(const model *m, const grad_batch *b, int first, const float *x_in, ep_error *err) {
    kv_cache cache;
    int T = 0, *rows = malloc(sizeof(int) * (size_t)b->n_seqs);
    for (int s = 0; s < b->n_seqs; s++) T += b->len[s], rows[s] = T - 1;
    float *logits = malloc(sizeof(float) * (size_t)b->n_seqs * m->cfg.vocab_size);
    double t0 = bench_now_s(), dt = -1;
    forward_batch fb = {.n_seqs = b->n_seqs, .n_new = b->len, .tokens = b->tokens, .n_logit_rows = b->n_seqs,
                        .logit_rows = rows, .logits = logits, .first_layer = first, .x_in = x_in};
    if (kv_cache_init(&cache, &m->cfg, b->n_seqs, b->len[0], 1, err) == 0) {
        if (model_forward(m, kernel_ops_cpu(), &cache, &fb, NULL, err) == 0) dt = bench_now_s() - t0;
        kv_cache_free(&cache);
    }
    free(rows), free(logits);
    return dt;
}

static const char attrib_usage[] =
    "usage: bench_backward --model DIR [--backend cpu|cuda|offset] [--dtype fp32|bf16] [--batch B] [--len T]\n"
    "                      [--targets K] [--reps R] [--dump FILE] [--ig-steps M]\n"
    "  one attribution round: B prompts (default 64) of T tokens (default 100) + K targets (default 2),\n"
    "  R timed reps (default 3) after a warm-up; --dump FILE: the head scores [L][H][7] f64, then the loss;\n"
    "  --ig-steps M: EAP-IG's round with M path points instead (the loss is then not computed: 0).\n";

static const char y_to_last_plan[] =
    "{\"name\": \"y_to_last\", \"rules\": [{\"sender\": [\"y\"], \"receiver\": [\"last\"], \"donor\": 0}]}";

enum { N_SCORED_TYPES = 7 };  // bos x t y n query last: the prompt's types (target is not a prompt type)

// The attribution round's inputs, built once.
typedef struct {
    int B, T, K;
    int32_t *tokens, *types, *index, *donors, *lengths;  // the prompt batch (bench_patch's)
    int *seq_tokens, *len, *n_target;                    // the grad batch: prompt + targets, packed
    int *seq_donor;                                      // the donor's tokens in the grad batch's rows
    prompt_batch pb;
    grad_batch gb;
} attrib_batch;

static void attrib_batch_make(attrib_batch *a, int B, int T, int K, int V) {
    size_t n = (size_t)B * T;
    a->B = B, a->T = T, a->K = K;
    a->tokens = malloc(sizeof(int32_t) * n), a->types = malloc(sizeof(int32_t) * n);
    a->index = malloc(sizeof(int32_t) * n), a->donors = malloc(sizeof(int32_t) * n);
    a->lengths = malloc(sizeof(int32_t) * (size_t)B);
    a->seq_tokens = malloc(sizeof(int) * (size_t)B * (T + K)), a->seq_donor = malloc(sizeof(int) * (size_t)B * (T + K));
    a->len = malloc(sizeof(int) * (size_t)B), a->n_target = malloc(sizeof(int) * (size_t)B);
    for (int s = 0; s < B; s++) {
        a->lengths[s] = T, a->len[s] = T + K, a->n_target[s] = K;
        for (int t = 0; t < T; t++) {
            size_t i = (size_t)s * T + t;
            int k = (t - 1) % 4;  // 0 x, 1 t, 2 y, 3 n
            a->types[i] = t == 0 ? TT_BOS : t == T - 1 ? TT_LAST : k == 0 ? TT_X : k == 1 ? TT_T : k == 2 ? TT_Y : TT_N;
            a->index[i] = t == 0 || t == T - 1 ? -1 : (t - 1) / 4;
            a->tokens[i] = bench_id(s, t, T, V);
            a->donors[i] = a->types[i] == TT_X || a->types[i] == TT_Y ? 1 + (a->tokens[i] + 7919) % (V - 1) : a->tokens[i];
        }
        for (int t = 0; t < T + K; t++)
            a->seq_tokens[(size_t)s * (T + K) + t] = a->seq_donor[(size_t)s * (T + K) + t] = bench_id(s, t, T, V);
        for (int t = 0; t < T; t++) a->seq_donor[(size_t)s * (T + K) + t] = a->donors[(size_t)s * T + t];
    }
    a->pb = (prompt_batch){.n_seqs = B, .max_len = T, .n_donors = 1, .tokens = a->tokens, .lengths = a->lengths,
                           .types = a->types, .index = a->index, .donors = a->donors};
    a->gb = (grad_batch){.n_seqs = B, .len = a->len, .n_target = a->n_target, .tokens = a->seq_tokens};
}

static void attrib_batch_free(attrib_batch *a) {
    free(a->tokens), free(a->types), free(a->index), free(a->donors), free(a->lengths);
    free(a->seq_tokens), free(a->seq_donor), free(a->len), free(a->n_target);
}

// One round: donor pass, patched forward + backward, head scores; seconds of each into secs[3].
static int attrib_round(const model *dev, const kernel_ops *ops, const ablation_plan *plan, const attrib_batch *a,
                        const head_unit *units, int n_units, int ig_steps, double *score, double *loss, double secs[3],
                        ep_error *err) {
    kv_cache donors[16];
    memset(donors, 0, sizeof donors);
    double t0 = bench_now_s();
    int rc = patch_donor_passes(dev, ops, plan, &a->pb, donors, err);
    ops->sync();
    double t1 = bench_now_s(), t2 = t1;
    if (rc == 0) {
        forward_patch fp = {.layer_rules = plan->layer_rules, .head_units = plan->head_units,
                            .n_head_units = plan->n_head_units, .n_donors = plan->n_donors, .types = a->pb.types,
                            .index = a->pb.index, .type_stride = a->pb.max_len, .n_typed = a->pb.lengths};
        for (int d = 0; d < plan->n_donors; d++) fp.donors[d] = &donors[d];
        grad_tape tape;
        if (ig_steps > 0) {  // EAP-IG: the whole path (its last point is the pass above), scores included
            double *sums = malloc(sizeof(double) * (size_t)n_units * a->B + 1);
            grad_ig_request r = {.steps = ig_steps, .donor_tokens = a->seq_donor, .heads = units, .n_heads = n_units,
                                 .head_sums = sums};
            rc = grad_ig_sums(ops, dev, &a->gb, &fp, &r, err);
            for (int u = 0; u < n_units && rc == 0; u++) {
                score[u] = 0;
                for (int s = 0; s < a->B; s++) score[u] += fabs(sums[(size_t)u * a->B + s]) / a->B;
            }
            free(sums);
            *loss = 0;
        } else {
            rc = model_backward(ops, dev, &a->gb, &fp, &tape, err);
        }
        ops->sync();
        t2 = bench_now_s();
        if (rc == 0 && ig_steps <= 0) {
            *loss = tape.loss;
            rc = grad_head_scores(&tape, units, n_units, score, NULL, err);
            grad_tape_free(&tape);
        }
    }
    double t3 = bench_now_s();
    for (int d = 0; d < 16; d++) kv_cache_free(&donors[d]);
    secs[0] = t1 - t0, secs[1] = t2 - t1, secs[2] = t3 - t2;
    return rc;
}

static int attrib_main(int argc, char **argv) {
    const char *dir = NULL, *backend = "cpu", *dtype = "fp32", *dump = NULL;
    int B = 64, T = 100, K = 2, R = 3, ig_steps = 0;
    for (int i = 1; i < argc; i++) {
        const char *next = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(argv[i], "--help") || !next) {
            fputs(attrib_usage, !strcmp(argv[i], "--help") ? stdout : stderr);
            return !strcmp(argv[i], "--help") ? 0 : 2;
        }
        if (!strcmp(argv[i], "--model")) dir = next;
        else if (!strcmp(argv[i], "--backend")) backend = next;
        else if (!strcmp(argv[i], "--dtype")) dtype = next;
        else if (!strcmp(argv[i], "--dump")) dump = next;
        else if (!strcmp(argv[i], "--batch")) B = atoi(next);
        else if (!strcmp(argv[i], "--len")) T = atoi(next);
        else if (!strcmp(argv[i], "--targets")) K = atoi(next);
        else if (!strcmp(argv[i], "--reps")) R = atoi(next);
        else if (!strcmp(argv[i], "--ig-steps")) ig_steps = atoi(next);
        else {
            fprintf(stderr, "bench_backward: unknown option '%s'\n%s", argv[i], attrib_usage);
            return 2;
        }
        i++;
    }
    int bf16 = !strcmp(dtype, "bf16");
    if (!dir || B <= 0 || T < 6 || K <= 0 || R <= 0 || (!bf16 && strcmp(dtype, "fp32"))) {
        fputs(attrib_usage, stderr);
        return 2;
    }
    const kernel_ops *ops = kernel_ops_named(backend);
    if (!ops) {
        fprintf(stderr, "bench_backward: backend '%s' is not available (cpu, offset, or cuda with a usable GPU)\n", backend);
        return 2;
    }
    model m, dev;
    ep_error err = {{0}};
    if (model_load(dir, &m, &err) || model_to_backend(&m, ops, bf16, &dev, &err)) {
        fprintf(stderr, "bench_backward: %s\n", err.msg);
        return 1;
    }
    json_error_t jerr;
    json_t *pj = json_loads(y_to_last_plan, 0, &jerr);
    ablation_plan plan;
    if (!pj || plan_parse(pj, "y_to_last plan", &m.cfg, &plan, &err)) {
        fprintf(stderr, "bench_backward: %s\n", pj ? err.msg : jerr.text);
        return 1;
    }
    json_decref(pj);
    const model_config *c = &m.cfg;
    int L = c->n_layers, H = c->n_heads, n_units = L * H * N_SCORED_TYPES;
    head_unit *units = malloc(sizeof *units * (size_t)n_units);
    for (int l = 0, u = 0; l < L; l++)
        for (int h = 0; h < H; h++)
            for (int ty = 0; ty < N_SCORED_TYPES; ty++) units[u++] = (head_unit){l, h, ty, 0};
    double *score = malloc(sizeof(double) * (size_t)n_units), loss = 0, sum[3] = {0};
    attrib_batch a;
    attrib_batch_make(&a, B, T, K, c->vocab_size);
    for (int rep = 0; rep <= R; rep++) {
        double secs[3];
        if (attrib_round(&dev, ops, &plan, &a, units, n_units, ig_steps, score, &loss, secs, &err)) {
            fprintf(stderr, "bench_backward: %s\n", err.msg);
            return 1;
        }
        fprintf(stderr, "  %s rep %d: donor %.3f s, forward + backward %.3f s, head scores %.3f s\n",
                rep ? "timed" : "warm-up", rep, secs[0], secs[1], secs[2]);
        for (int i = 0; rep > 0 && i < 3; i++) sum[i] += secs[i] / R;
    }
    // What model_backward holds for this batch (docs/memory.md's figure), and the donor caches beside it.
    backward_shape shape = {.n_seqs = B, .len = a.len, .n_target = a.n_target, .n_donors = plan.n_donors,
                            .donor_capacity = T, .edge_rules = plan.n_rules > 0, .n_threads = cpu_threads()};
    backward_memory mem;
    if (backward_bytes(c, &shape, &mem, &err)) {
        fprintf(stderr, "bench_backward: %s\n", err.msg);
        return 1;
    }
    if (dump) {
        FILE *f = fopen(dump, "wb");
        if (!f || fwrite(score, sizeof(double), (size_t)n_units, f) != (size_t)n_units ||
            fwrite(&loss, sizeof(double), 1, f) != 1 || fclose(f)) {
            fprintf(stderr, "bench_backward: cannot write %s\n", dump);
            return 1;
        }
    }
    printf("engine=edgepatch backend=%s dtype=%s batch=%d len=%d targets=%d reps=%d units=%d ig_steps=%d loss=%.9g "
           "donor_s=%.5f backward_s=%.5f scores_s=%.5f round_s=%.5f backward_peak_bytes=%zu donor_bytes=%zu\n",
           ops->name, dtype, B, T, K, R, n_units, ig_steps, loss, sum[0], sum[1], sum[2], sum[0] + sum[1] + sum[2], mem.peak,
           mem.donors);
    attrib_batch_free(&a);
    free(units), free(score);
    plan_free(&plan);
    model_backend_free(&dev), model_free(&m);
    return 0;
}

int main(int argc, char **argv) {
    if (argc > 1 && argv[1][0] == '-') return attrib_main(argc, argv);
    if (argc < 2) {
        fprintf(stderr, "usage: bench_backward MODEL_DIR [batch] [len] [targets] [reps]\n");
        return 2;
    }
    int B = argc > 2 ? atoi(argv[2]) : 8, T = argc > 3 ? atoi(argv[3]) : 100, K = argc > 4 ? atoi(argv[4]) : 2;
    int reps = argc > 5 ? atoi(argv[5]) : 3;
    model m;
    ep_error err = {{0}};
    if (model_load(argv[1], &m, &err)) {
        fprintf(stderr, "bench_backward: %s\n", err.msg);
        return 1;
    }
    int L = m.cfg.n_layers, D = m.cfg.hidden;
    int *tokens = malloc(sizeof(int) * (size_t)B * T), *len = malloc(sizeof(int) * (size_t)B),
        *n_target = malloc(sizeof(int) * (size_t)B);
    unsigned x = 12345;
    for (int i = 0; i < B * T; i++) tokens[i] = (int)((x = x * 1103515245u + 12345u) >> 8) % m.cfg.vocab_size;
    for (int s = 0; s < B; s++) len[s] = T, n_target[s] = K;
    grad_batch b = {.n_seqs = B, .len = len, .n_target = n_target, .tokens = tokens};
    double loss, best_f = 1e30, best_b = 1e30, prefix = 0;
    for (int rep = 0; rep < reps && !err.msg[0]; rep++) {
        double t0 = bench_now_s();
        if (model_loss(kernel_ops_cpu(), &m, &b, NULL, &loss, NULL, &err)) break;
        double t1 = bench_now_s();
        grad_tape tape;
        if (model_backward(kernel_ops_cpu(), &m, &b, NULL, &tape, &err)) break;
        double t2 = bench_now_s();
        grad_tape_free(&tape);
        if (t1 - t0 < best_f) best_f = t1 - t0;
        if (t2 - t1 < best_b) best_b = t2 - t1;
    }
    // Prefix reuse: one pass from each layer, from the clean residual stream (the cost does not depend on
    // its values).
    float *resid = malloc(sizeof(float) * (size_t)(L + 1) * B * T * D);
    if (!err.msg[0]) {
        kv_cache cache;
        int *rows = malloc(sizeof(int) * (size_t)B);
        for (int s = 0; s < B; s++) rows[s] = (s + 1) * T - 1;
        float *logits = malloc(sizeof(float) * (size_t)B * m.cfg.vocab_size);
        forward_batch fb = {.n_seqs = B, .n_new = len, .tokens = tokens, .n_logit_rows = B, .logit_rows = rows,
                            .logits = logits, .resid = resid};
        if (kv_cache_init(&cache, &m.cfg, B, T, 1, &err) == 0) {
            model_forward(&m, kernel_ops_cpu(), &cache, &fb, NULL, &err);
            kv_cache_free(&cache);
        }
        free(rows), free(logits);
    }
    for (int l = 0; l < L && !err.msg[0]; l++) prefix += time_from_layer(&m, &b, l, resid + (size_t)l * B * T * D, &err) / L;
    free(resid);
    if (err.msg[0]) {
        fprintf(stderr, "bench_backward: %s\n", err.msg);
        return 1;
    }
    int units = L * m.cfg.n_heads * 7;  // head units over the 7 prompt token types
    printf("bench_backward: %s, batch %d x %d tokens (%d targets each), best of %d\n", argv[1], B, T, K, reps);
    printf("  forward (loss)          %8.3f s\n", best_f);
    printf("  forward + backward      %8.3f s   ratio %.2f (target: at most 3)\n", best_b, best_b / best_f);
    printf("  head units              %8d\n", units);
    printf("  attribution scores/s    %8.1f   (all units from one forward + backward)\n", units / best_b);
    printf("  exact scores/s          %8.1f   (one full forward per unit)\n", 1.0 / best_f);
    printf("  exact scores/s          %8.1f   (prefix reuse: layers l.. per unit of layer l, %.3f s mean, once)\n",
           1.0 / prefix, prefix);
    free(tokens), free(len), free(n_target);
    model_free(&m);
    return 0;
}
