// edgepatch convert-gguf FILE.gguf OUTDIR [--json]: a llama.cpp Llama GGUF as an HF checkpoint folder
// (config.json + F32 model.safetensors; pipeline/convert_gguf.h says what and why).
#include <jansson.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "sched/cli/cli.h"
#include "pipeline/convert_gguf.h"

static const char usage[] =
    "usage: edgepatch convert-gguf FILE.gguf OUTDIR [-j|--json]\n\n"
    "Writes OUTDIR/config.json (LlamaForCausalLM) and OUTDIR/model.safetensors (F32, HF tensor names,\n"
    "Q/K rows un-permuted) from a llama.cpp Llama GGUF holding F32, F16, BF16, Q8_0, Q4_0 or Q4_1\n"
    "tensors. OUTDIR must not exist; it appears only once complete. Tokenizer files: run\n"
    "tools/make_smollm_tokenizer.py (tools/fetch_smollm2.sh does both).\n"
    "  -j, --json  the summary as {\"gguf\", \"output\", \"tensors\", \"types\": [...], \"parameters\",\n"
    "              \"bytes_written\", \"seconds\"} instead of its line\n"
    "  -h, --help  this text\n"
    "Exit status: 0 written, 1 bad GGUF or OUTDIR exists (nothing written), 2 usage.\n";

int cmd_convert_gguf(int argc, char **argv) {
    static const struct option options[] = {{"json", no_argument, NULL, 'j'}, CLI_HELP_OPTION, {0}};
    int as_json = 0;
    cli_args a;
    cli_args_init(&a, "convert-gguf", usage, argc, argv, options);
    for (int c; (c = cli_next(&a)) != CLI_END;) switch (c) {
            case 'j': as_json = 1; break;
            default: return cli_args_exit(&a, c);
        }
    if (a.n_positional != 2)
        return cli_usage_error(&a, "need FILE.gguf and OUTDIR (%d argument%s given)", a.n_positional, a.n_positional == 1 ? "" : "s");
    if (cli_parse_only()) return cli_args_done(&a);
    const char *gguf = a.positional[0], *out = a.positional[1];
    cli_args_free(&a);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    ep_error err = {{0}};
    convert_gguf_stats s;
    if (convert_gguf(gguf, out, &s, &err)) {
        fprintf(stderr, "edgepatch convert-gguf: %s\n", err.msg);
        return 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double seconds = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    if (as_json) {
        json_t *types = json_array();
        char list[sizeof s.types];
        snprintf(list, sizeof list, "%s", s.types);
        for (char *save = NULL, *t = strtok_r(list, " ", &save); t; t = strtok_r(NULL, " ", &save))
            json_array_append_new(types, json_string(t));
        json_t *o = json_pack("{s:s,s:s,s:i,s:o,s:I,s:I,s:f}", "gguf", gguf, "output", out, "tensors", s.n_tensors,
                              "types", types, "parameters", (json_int_t)s.n_params, "bytes_written",
                              (json_int_t)s.bytes_written, "seconds", seconds);
        cli_print_json(o, JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(6));
        return 0;
    }
    printf("convert-gguf: %s -> %s: %d tensors (%s), %lld parameters, %lld bytes F32, %.1f s\n", gguf, out, s.n_tensors,
           s.types, s.n_params, s.bytes_written, seconds);
    return 0;
}
