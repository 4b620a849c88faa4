// edgepatch convert-gguf FILE.gguf OUTDIR: a llama.cpp Llama GGUF as an HF checkpoint folder
// (config.json + F32 model.safetensors; pipeline/convert_gguf.h says what and why).
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "sched/cli/cli.h"
#include "pipeline/convert_gguf.h"

static void help(FILE *f) {
    fprintf(f, "usage: edgepatch convert-gguf FILE.gguf OUTDIR\n\n"
               "Writes OUTDIR/config.json (LlamaForCausalLM) and OUTDIR/model.safetensors (F32, HF tensor names,\n"
               "Q/K rows un-permuted) from a llama.cpp Llama GGUF holding F32, F16, BF16, Q8_0, Q4_0 or Q4_1\n"
               "tensors. OUTDIR must not exist; it appears only once complete. Tokenizer files: run\n"
               "tools/make_smollm_tokenizer.py (tools/fetch_smollm2.sh does both).\n");
}

int cmd_convert_gguf(int argc, char **argv) {
    if (cli_wants_help(argc, argv)) {
        help(stdout);
        return 0;
    }
    if (argc != 3) {
        help(stderr);
        return 2;
    }
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    ep_error err = {{0}};
    convert_gguf_stats s;
    if (convert_gguf(argv[1], argv[2], &s, &err)) {
        fprintf(stderr, "edgepatch convert-gguf: %s\n", err.msg);
        return 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("convert-gguf: %s -> %s: %d tensors (%s), %lld parameters, %lld bytes F32, %.1f s\n", argv[1], argv[2],
           s.n_tensors, s.types, s.n_params, s.bytes_written,
           (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec));
    return 0;
}
