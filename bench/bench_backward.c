// bench_backward: the cost of attribution against the cost it replaces. On one batch of a model folder
// (random token ids, deterministic), times one forward pass (model_loss), one forward + backward
// (model_backward, the attribution pass) and prints their ratio (best of `reps` interleaved rounds);
// then head-unit scores per second: attribution (every unit from one forward + backward) against exact
// scoring by one full forward per unit, and by exact scoring's prefix reuse (stages/score.c: a unit of
// layer l runs only layers l.. from the stored residual stream; the mean over l of that partial pass,
// timed, is the cost per unit, before batching units into one pass).
//   bench_backward MODEL_DIR [batch=8] [len=100] [targets=2] [reps=3]
#include <stdio.h>
#include <stdlib.h>

#include "pipeline/backward.h"
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

int main(int argc, char **argv) {
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
