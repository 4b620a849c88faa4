// bench_tokenizer: encode throughput of the C tokenizer, single-threaded.
// usage: bench_tokenizer TOKENIZER_DIR TEXT_FILE [MIN_SECONDS]
// The text is cut into paragraphs at blank lines (as bench_tokenizer.py does for HF), each paragraph is
// one encode call, and the whole text is encoded repeatedly for at least MIN_SECONDS (default 3). Prints
// one line: "c <MB/s> MB/s <tokens> tokens <bytes> bytes"; the token count lets the script check that both
// sides did the same work.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline/tokenizer.h"
#include "bench/bench_util.h"

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: bench_tokenizer TOKENIZER_DIR TEXT_FILE [MIN_SECONDS]\n");
        return 2;
    }
    double min_s = argc > 3 ? atof(argv[3]) : 3.0;
    FILE *f = fopen(argv[2], "rb");
    if (!f) {
        fprintf(stderr, "bench_tokenizer: %s: cannot open\n", argv[2]);
        return 1;
    }
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = ep_malloc((size_t)size + 1);
    if (fread(text, 1, (size_t)size, f) != (size_t)size) {
        fprintf(stderr, "bench_tokenizer: %s: short read\n", argv[2]);
        return 1;
    }
    fclose(f);
    text[size] = 0;
    tokenizer *t;
    ep_error err;
    if (tokenizer_load(argv[1], &t, &err)) {
        fprintf(stderr, "bench_tokenizer: %s\n", err.msg);
        return 1;
    }
    long long tokens = 0, bytes = 0;
    int passes = 0;
    double t0 = bench_now_s(), elapsed = 0;
    while (elapsed < min_s || passes == 0) {
        long long pass_tokens = 0;
        const char *p = text, *end = text + size;
        while (p < end) {
            const char *q = strstr(p, "\n\n");
            q = q ? q + 2 : end;  // the paragraph keeps its blank line
            int *ids, n;
            if (tokenizer_encode(t, p, (size_t)(q - p), 0, &ids, &n, &err)) {
                fprintf(stderr, "bench_tokenizer: %s\n", err.msg);
                return 1;
            }
            pass_tokens += n;
            free(ids);
            p = q;
        }
        tokens = pass_tokens;
        bytes += size;
        passes++;
        elapsed = bench_now_s() - t0;
    }
    printf("c %.2f MB/s %lld tokens %ld bytes %d passes\n", bytes / elapsed / 1e6, tokens, size, passes);
    tokenizer_free(t);
    free(text);
    return 0;
}
