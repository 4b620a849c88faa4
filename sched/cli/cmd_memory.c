// edgepatch memory CONFIG.json... [--tp LIST]: per model config and tensor-parallel size, the bytes one
// rank holds (bf16 weights as model_load_shard slices them; K/V cache of its KV heads per 1k tokens), as
// the markdown table of docs/memory.md.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sched/cli/cli.h"
#include "pipeline/model.h"

static const char usage[] =
    "usage: edgepatch memory CONFIG.json... [--tp 1,2,4,8]\n"
    "\n"
    "For each HF config.json and tensor-parallel size (default 1,2,4,8): the weight bytes one rank holds in\n"
    "bf16 (its slices; embeddings and norms replicated) and its K/V cache bytes per 1024 tokens of one\n"
    "sequence (bf16; its KV heads, replicated when fewer than ranks), as a markdown table\n"
    "(docs/memory.md). A size the model does not split over says why.\n";

static void print_gib(char *out, size_t n, double bytes) {
    if (bytes >= 1 << 30) snprintf(out, n, "%.2f GiB", bytes / (1 << 30));
    else snprintf(out, n, "%.1f MiB", bytes / (1 << 20));
}

int cmd_memory(int argc, char **argv) {
    if (cli_wants_help(argc, argv)) {
        fputs(usage, stdout);
        return 0;
    }
    int *tps = NULL, n_tp = 0, n_configs = 0;
    char msg[256];
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--tp") && i + 1 < argc) {
            free(tps);
            if (cli_parse_int_list(argv[++i], &tps, &n_tp, msg, sizeof msg)) {
                fprintf(stderr, "edgepatch memory: --tp: %s\n", msg);
                return 2;
            }
        } else if (argv[i][0] == '-') {
            fprintf(stderr, "edgepatch memory: unexpected argument '%s' (see --help)\n", argv[i]);
            free(tps);
            return 2;
        } else n_configs++;
    }
    if (!n_configs) {
        fprintf(stderr, "edgepatch memory: need at least one CONFIG.json (see --help)\n");
        free(tps);
        return 2;
    }
    if (!tps) {
        static const int def[] = {1, 2, 4, 8};
        tps = malloc(sizeof def);
        memcpy(tps, def, sizeof def);
        n_tp = 4;
    }
    printf("| config | tensor_parallel | weights per rank (bf16) | K/V cache per rank per 1k tokens (bf16) |\n");
    printf("|---|---|---|---|\n");
    int rc = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--tp")) {
            i++;
            continue;
        }
        model_config cfg;
        ep_error err = {{0}};
        if (model_config_load(argv[i], &cfg, &err)) {
            fprintf(stderr, "edgepatch memory: %s\n", err.msg);
            rc = 1;
            continue;
        }
        const char *name = strrchr(argv[i], '/') ? strrchr(argv[i], '/') + 1 : argv[i];
        for (int k = 0; k < n_tp; k++) {
            // Rank 0 holds the most: the row-parallel biases, and every rank holds the same slice sizes.
            if (tps[k] < 1 || model_config_shard(&cfg, argv[i], 0, tps[k], &cfg.tp, &err)) {
                const char *why = strstr(err.msg, ": ") ? strstr(err.msg, ": ") + 2 : err.msg;
                printf("| %s | %d | does not split: %s | |\n", name, tps[k], tps[k] < 1 ? "size < 1" : why);
                continue;
            }
            char w[32], kv[32];
            print_gib(w, sizeof w, 2.0 * (double)model_held_floats(&cfg));
            print_gib(kv, sizeof kv, 2.0 * 2 * cfg.n_layers * cfg.tp.n_kv_heads * cfg.head_dim * 1024.0);
            printf("| %s | %d | %s | %s |\n", name, tps[k], w, kv);
        }
    }
    free(tps);
    return rc;
}
