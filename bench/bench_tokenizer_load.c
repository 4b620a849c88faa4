// bench_tokenizer_load: how long tokenizer_load takes (read, parse, build the maps), single-threaded.
// usage: bench_tokenizer_load TOKENIZER_DIR [REPEATS]
// Loads the directory REPEATS times (default 5), freeing each tokenizer, and prints one line:
// "c <best ms> ms best <median ms> ms median <vocab> vocab <repeats> repeats". The best of several runs is
// the least disturbed by other jobs; bench_tokenizer_load.py prints the same line for HF tokenizers.
#include <stdio.h>
#include <stdlib.h>

#include "pipeline/tokenizer.h"
#include "bench/bench_util.h"

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: bench_tokenizer_load TOKENIZER_DIR [REPEATS]\n");
        return 2;
    }
    int repeats = argc > 2 ? atoi(argv[2]) : 5;
    if (repeats < 1 || repeats > 1000) {
        fprintf(stderr, "bench_tokenizer_load: REPEATS must be in [1, 1000]\n");
        return 2;
    }
    double *ms = malloc(sizeof(double) * (size_t)repeats);
    int vocab = 0;
    for (int r = 0; r < repeats; r++) {
        tokenizer *t;
        ep_error err;
        double t0 = bench_now_s();
        if (tokenizer_load(argv[1], &t, &err)) {
            fprintf(stderr, "bench_tokenizer_load: %s\n", err.msg);
            free(ms);
            return 1;
        }
        ms[r] = (bench_now_s() - t0) * 1e3;
        vocab = tokenizer_vocab_size(t);
        tokenizer_free(t);
    }
    qsort(ms, (size_t)repeats, sizeof(double), cmp_double);
    printf("c %.1f ms best %.1f ms median %d vocab %d repeats\n", ms[0], ms[repeats / 2], vocab, repeats);
    free(ms);
    return 0;
}
