// bench_backward: the cost of attribution against the cost it replaces. On one batch of a model folder
// (random token ids, deterministic), times one forward pass (model_loss), one forward + backward
// (model_backward, the attribution pass) and prints their ratio; then, with a head-unit count, the
// implied scores per second of attribution against exact scoring by one patched forward per unit.
//   bench_backward MODEL_DIR [batch=8] [len=100] [targets=2]
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "pipeline/backward.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: bench_backward MODEL_DIR [batch] [len] [targets]\n");
        return 2;
    }
    int B = argc > 2 ? atoi(argv[2]) : 8, T = argc > 3 ? atoi(argv[3]) : 100, K = argc > 4 ? atoi(argv[4]) : 2;
    model m;
    ep_error err = {{0}};
    if (model_load(argv[1], &m, &err)) {
        fprintf(stderr, "bench_backward: %s\n", err.msg);
        return 1;
    }
    int *tokens = malloc(sizeof(int) * (size_t)B * T), *len = malloc(sizeof(int) * (size_t)B),
        *n_target = malloc(sizeof(int) * (size_t)B);
    unsigned x = 12345;
    for (int i = 0; i < B * T; i++) tokens[i] = (int)((x = x * 1103515245u + 12345u) >> 8) % m.cfg.vocab_size;
    for (int s = 0; s < B; s++) len[s] = T, n_target[s] = K;
    grad_batch b = {.n_seqs = B, .len = len, .n_target = n_target, .tokens = tokens};
    double loss, best_f = 1e30, best_b = 1e30;
    for (int rep = 0; rep < 3; rep++) {
        double t0 = now();
        if (model_loss(&m, &b, NULL, &loss, NULL, &err)) break;
        double t1 = now();
        grad_tape tape;
        if (model_backward(&m, &b, NULL, &tape, &err)) break;
        double t2 = now();
        grad_tape_free(&tape);
        if (t1 - t0 < best_f) best_f = t1 - t0;
        if (t2 - t1 < best_b) best_b = t2 - t1;
    }
    if (err.msg[0]) {
        fprintf(stderr, "bench_backward: %s\n", err.msg);
        return 1;
    }
    int units = m.cfg.n_layers * m.cfg.n_heads * 7;  // head units over the 7 prompt token types
    printf("bench_backward: %s, batch %d x %d tokens (%d targets each)\n", argv[1], B, T, K);
    printf("  forward (loss)          %8.3f s\n", best_f);
    printf("  forward + backward      %8.3f s   ratio %.2f (target: at most 3)\n", best_b, best_b / best_f);
    printf("  head units              %8d\n", units);
    printf("  attribution scores/s    %8.1f   (all units from one forward + backward)\n", units / best_b);
    printf("  exact scores/s          %8.1f   (one patched forward per unit, no prefix reuse)\n", 1.0 / best_f);
    free(tokens), free(len), free(n_target);
    model_free(&m);
    return 0;
}
