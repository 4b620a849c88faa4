// edgepatch memory CONFIG.json... [--tp LIST] [--batch SxL] [--targets N] [--donors N] [--ig-steps N] [--gpu-gib G] [--json]:
// per model config and tensor-parallel size, the bytes one rank holds (bf16 weights as model_load_shard
// slices them; K/V cache of its KV heads per 1k tokens), then what one attribution batch holds on that
// rank (backward_bytes: the backward's tape, pass buffers and scratch in fp32, the donor caches) and the
// device total with bf16 weights against a GPU's memory, as the markdown tables of docs/memory.md (or
// one JSON array).
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "sched/cli/cli.h"
#include "pipeline/backward.h"
#include "pipeline/model.h"
#include "stages/prompts.h"

static const char usage[] =
    "usage: edgepatch memory CONFIG.json|MODEL_DIR... [--tp 1,2,4,8] [-b|--batch 8x200] [--targets 1]\n"
    "                        [--donors 1] [--ig-steps N] [--gpu-gib 80] [-j|--json]\n"
    "\n"
    "For each HF config.json (or model folder: its config.json, named by the folder) and tensor-parallel\n"
    "size, as the markdown tables of docs/memory.md (a size the model does not split over says why):\n"
    "  1. the weight bytes one rank holds in bf16 (its slices; embeddings and norms replicated) and its K/V\n"
    "     cache bytes per 1024 tokens of one sequence (bf16; its KV heads, replicated when fewer than ranks);\n"
    "  2. one attribution batch on that rank (pipeline/backward.h, backward_bytes): the forward + backward's\n"
    "     bytes per layer and at their peak (fp32 activations and gradients), the donor caches it reads, the\n"
    "     device total with bf16 weights and whether it fits --gpu-gib GiB, and the host total of the cpu\n"
    "     backend today (fp32 weights).\n"
    "      --tp LIST        the tensor-parallel sizes (default 1,2,4,8)\n"
    "  -b, --batch SxL      S sequences of L tokens each (prompt + targets; default 8x200)\n"
    "      --targets N      target tokens per sequence (default 1)\n"
    "      --donors N       donor caches the patch reads, edge rules on (default 1)\n"
    "      --ig-steps N     an EAP-IG batch of N path points instead (\"importance\": \"eap-ig\"): the clean\n"
    "                       pass's tape held beside each point's pass, and the sums of every head unit\n"
    "      --gpu-gib G      device memory per GPU in GiB (default 80)\n"
    "  -j, --json           one JSON array of every (config, tensor_parallel) with the parts in bytes instead\n"
    "  -h, --help           this text\n"
    "Exit status: 0 ok, 1 a bad config (the others are still shown), 2 usage.\n";

static void print_gib(char *out, size_t n, double bytes) {
    if (bytes >= 1 << 30) snprintf(out, n, "%.2f GiB", bytes / (1 << 30));
    else snprintf(out, n, "%.1f MiB", bytes / (1 << 20));
}

typedef struct {
    int *tps, n_tp;
    int n_seqs, len, targets, donors, ig_steps, json;
    double gpu_gib;
} memory_opts;

// The parts of one rank's figures, or why it does not split (why non-empty).
typedef struct {
    const char *name;
    int tp;
    char why[sizeof(((ep_error *)0)->msg)];
    size_t weights, kv_per_1k;
    backward_memory bw;
    size_t device, host;
} memory_row;

enum { OPT_TP = CLI_LONG_ONLY, OPT_TARGETS, OPT_DONORS, OPT_IG_STEPS, OPT_GPU_GIB };

// 0 parsed (the configs in a->positional); -1 with *exit_status set when the command ends here.
static int parse_opts(cli_args *a, int argc, char **argv, memory_opts *o, int *exit_status) {
    static const struct option options[] = {{"tp", required_argument, NULL, OPT_TP}, {"batch", required_argument, NULL, 'b'},
                                            {"targets", required_argument, NULL, OPT_TARGETS},
                                            {"donors", required_argument, NULL, OPT_DONORS},
                                            {"ig-steps", required_argument, NULL, OPT_IG_STEPS},
                                            {"gpu-gib", required_argument, NULL, OPT_GPU_GIB}, {"json", no_argument, NULL, 'j'},
                                            CLI_HELP_OPTION, {0}};
    char msg[256];
    cli_args_init(a, "memory", usage, argc, argv, options);
    for (int c; (c = cli_next(a)) != CLI_END;) {
        const char *v = a->value;
        int bad = 0;
        switch (c) {
            case 'j': o->json = 1; break;
            case OPT_TP:
                free(o->tps);
                o->tps = NULL;
                if (cli_parse_int_list(v, &o->tps, &o->n_tp, msg, sizeof msg)) {
                    fprintf(stderr, "edgepatch memory: --tp: %s\n", msg);
                    bad = 1;
                }
                break;
            case 'b': {
                char x, extra;
                if (sscanf(v, "%d%c%d%c", &o->n_seqs, &x, &o->len, &extra) != 3 || (x != 'x' && x != 'X') || o->n_seqs < 1 ||
                    o->len < 2) {
                    fprintf(stderr, "edgepatch memory: --batch: expected SxL (sequences x tokens, L >= 2), got '%s'\n", v);
                    bad = 1;
                }
                break;
            }
            case OPT_TARGETS: bad = cli_int_value(a, "--targets", 1, 1 << 20, &o->targets); break;
            case OPT_DONORS: bad = cli_int_value(a, "--donors", 0, 16, &o->donors); break;
            case OPT_IG_STEPS: bad = cli_int_value(a, "--ig-steps", 1, 1 << 16, &o->ig_steps); break;
            case OPT_GPU_GIB: bad = cli_double_value(a, "--gpu-gib", 0, &o->gpu_gib); break;
            default: return *exit_status = cli_args_exit(a, c), -1;
        }
        if (bad) return *exit_status = cli_args_exit(a, CLI_USAGE), -1;
    }
    if (o->targets >= o->len) {
        fprintf(stderr, "edgepatch memory: --targets %d leaves no prompt in sequences of %d tokens\n", o->targets, o->len);
        return *exit_status = cli_args_exit(a, CLI_USAGE), -1;
    }
    if (!a->n_positional) return *exit_status = cli_usage_error(a, "need at least one CONFIG.json or model folder"), -1;
    if (cli_parse_only()) return *exit_status = cli_args_done(a), -1;
    return 0;
}

// One rank's figures: rank 0 holds the most (the row-parallel biases; every rank the same slice sizes).
static int fill_row(const model_config *loaded, const char *path, int tp, const memory_opts *o, memory_row *r) {
    model_config cfg = *loaded;
    ep_error err = {{0}};
    r->tp = tp;
    if (tp < 1 || model_config_shard(&cfg, path, 0, tp, &cfg.tp, &err)) {
        const char *why = strstr(err.msg, ": ") ? strstr(err.msg, ": ") + 2 : err.msg;
        snprintf(r->why, sizeof r->why, "%s", tp < 1 ? "size < 1" : why);
        return 0;
    }
    r->weights = 2 * model_held_floats(&cfg);
    r->kv_per_1k = (size_t)2 * 2 * cfg.n_layers * cfg.tp.n_kv_heads * cfg.head_dim * 1024;
    int *len = malloc(sizeof(int) * (size_t)o->n_seqs), *nt = malloc(sizeof(int) * (size_t)o->n_seqs);
    for (int s = 0; s < o->n_seqs; s++) len[s] = o->len, nt[s] = o->targets;
    // One thread: each further cpu thread adds one attention block per donor and the current keys (L x L).
    backward_shape sh = {.n_seqs = o->n_seqs, .len = len, .n_target = nt, .n_donors = o->donors,
                         .donor_capacity = o->len - o->targets, .edge_rules = o->donors > 0, .n_threads = 1,
                         .ig_steps = o->ig_steps, .ig_head_units = cfg.n_layers * cfg.n_heads * TT_TARGET};  // a type of every prompt token
    int rc = backward_bytes(&cfg, &sh, &r->bw, &err);
    free(len), free(nt);
    if (rc) {
        fprintf(stderr, "edgepatch memory: %s: %s\n", path, err.msg);
        return -1;
    }
    size_t peak = o->ig_steps ? r->bw.peak_ig : r->bw.peak;
    r->device = r->weights + peak + r->bw.donors;
    r->host = 2 * r->weights + peak + r->bw.donors;
    return 0;
}

// A string as JSON (quoted and escaped: a folder's name may hold anything).
static void print_json_string(const char *s) {
    json_t *j = json_string(s);
    char *text = j ? json_dumps(j, JSON_ENCODE_ANY) : NULL;
    fputs(text ? text : "null", stdout);
    free(text);
    json_decref(j);
}

static void print_json_row(const memory_row *r, const memory_opts *o, int first) {
    printf("%s\n  {\"config\": ", first ? "" : ",");
    print_json_string(r->name);
    printf(", \"tensor_parallel\": %d", r->tp);
    if (r->why[0]) {
        printf(", \"does_not_split\": ");
        print_json_string(r->why);
        printf("}");
        return;
    }
    const backward_memory *b = &r->bw;
    printf(", \"weights_bf16\": %zu, \"kv_cache_bf16_per_1k_tokens\": %zu", r->weights, r->kv_per_1k);
    printf(", \"batch\": {\"sequences\": %d, \"tokens\": %d, \"targets\": %d, \"donors\": %d}", o->n_seqs, o->len,
           o->targets, o->donors);
    printf(", \"backward\": {\"tape_q\": %zu, \"tape_dz\": %zu, \"tape_cache\": %zu, "
           "\"tape_meta\": %zu, \"tape\": %zu, \"resid\": %zu, \"attn_out\": %zu, \"dlogits\": %zu, \"pass_meta\": %zu, "
           "\"forward\": %zu, \"scratch\": %zu, \"head\": %zu, \"attention\": %zu, \"per_layer\": %zu, \"peak\": %zu}",
           b->tape_q, b->tape_dz, b->tape_cache, b->tape_meta, b->tape, b->resid, b->attn_out,
           b->dlogits, b->pass_meta, b->forward, b->scratch, b->head, b->attention, b->per_layer, b->peak);
    if (o->ig_steps)
        printf(", \"eap_ig\": {\"steps\": %d, \"sums\": %zu, \"path\": %zu, \"peak\": %zu}", o->ig_steps, b->ig_sums,
               b->ig_path, b->peak_ig);
    printf(", \"donor_caches\": %zu, \"device_total\": %zu, \"gpu_bytes\": %.0f, \"fits\": %s, \"host_total_cpu\": %zu}",
           b->donors, r->device, o->gpu_gib * (1 << 30), (double)r->device <= o->gpu_gib * (1 << 30) ? "true" : "false",
           r->host);
}

int cmd_memory(int argc, char **argv) {
    memory_opts o = {.n_seqs = 8, .len = 200, .targets = 1, .donors = 1, .gpu_gib = 80};
    cli_args a;
    int exit_status;
    if (parse_opts(&a, argc, argv, &o, &exit_status)) {
        free(o.tps);
        return exit_status;
    }
    if (!o.tps) {
        static const int def[] = {1, 2, 4, 8};
        o.tps = malloc(sizeof def);
        memcpy(o.tps, def, sizeof def);
        o.n_tp = 4;
    }
    int n_configs = a.n_positional;
    memory_row *rows = calloc((size_t)n_configs * o.n_tp, sizeof *rows);
    char (*names)[256] = calloc((size_t)n_configs, sizeof *names);
    int n_rows = 0, rc = 0;
    for (int i = 0; i < n_configs; i++) {
        // A model folder (as the other commands take) stands for its config.json, under the folder's name.
        const char *arg = a.positional[i];
        char path[4200];
        struct stat st;
        int is_dir = stat(arg, &st) == 0 && S_ISDIR(st.st_mode);
        size_t len = strlen(arg);
        while (len > 1 && arg[len - 1] == '/') len--;
        snprintf(path, sizeof path, is_dir ? "%.*s/config.json" : "%.*s", (int)len, arg);
        size_t start = len;
        while (start > 0 && arg[start - 1] != '/') start--;
        snprintf(names[i], sizeof names[i], "%.*s", (int)(len - start), arg + start);
        model_config cfg;
        ep_error err = {{0}};
        if (model_config_load(path, &cfg, &err)) {
            fprintf(stderr, "edgepatch memory: %s\n", err.msg);
            rc = 1;
            continue;
        }
        for (int k = 0; k < o.n_tp; k++) {
            memory_row *r = &rows[n_rows++];
            r->name = names[i];
            if (fill_row(&cfg, path, o.tps[k], &o, r)) rc = 1, n_rows--;
        }
    }
    if (o.json) {
        printf("[");
        for (int k = 0; k < n_rows; k++) print_json_row(&rows[k], &o, k == 0);
        printf("\n]\n");
    } else {
        printf("| config | tensor_parallel | weights per rank (bf16) | K/V cache per rank per 1k tokens (bf16) |\n");
        printf("|---|---|---|---|\n");
        for (int k = 0; k < n_rows; k++) {
            const memory_row *r = &rows[k];
            if (r->why[0]) {
                printf("| %s | %d | does not split: %s | |\n", r->name, r->tp, r->why);
                continue;
            }
            char w[32], kv[32];
            print_gib(w, sizeof w, (double)r->weights);
            print_gib(kv, sizeof kv, (double)r->kv_per_1k);
            printf("| %s | %d | %s | %s |\n", r->name, r->tp, w, kv);
        }
        printf("\nOne attribution batch per rank: %d sequences x %d tokens (%d target%s each), %d donor%s, edge rules "
               "on; forward + backward in fp32 (backward_bytes)%s.\n\n",
               o.n_seqs, o.len, o.targets, o.targets == 1 ? "" : "s", o.donors, o.donors == 1 ? "" : "s",
               o.ig_steps ? "; EAP-IG: the peak is grad_ig_sums' (the clean tape held beside each path point's pass)" : "");
        printf("| config | tensor_parallel | backward per layer | tape | backward peak | donor caches | device total "
               "(bf16 weights) | fits %g GiB | host total, cpu backend (fp32 weights) |\n", o.gpu_gib);
        printf("|---|---|---|---|---|---|---|---|---|\n");
        for (int k = 0; k < n_rows; k++) {
            const memory_row *r = &rows[k];
            if (r->why[0]) {
                printf("| %s | %d | does not split | | | | | | |\n", r->name, r->tp);
                continue;
            }
            char pl[32], tape[32], peak[32], dn[32], dev[32], host[32], fit[64];
            print_gib(pl, sizeof pl, (double)r->bw.per_layer);
            print_gib(tape, sizeof tape, (double)r->bw.tape);
            print_gib(peak, sizeof peak, (double)(o.ig_steps ? r->bw.peak_ig : r->bw.peak));
            print_gib(dn, sizeof dn, (double)r->bw.donors);
            print_gib(dev, sizeof dev, (double)r->device);
            print_gib(host, sizeof host, (double)r->host);
            double gpu = o.gpu_gib * (1 << 30), left = gpu - (double)r->device;
            char amount[32];
            print_gib(amount, sizeof amount, left >= 0 ? left : -left);
            snprintf(fit, sizeof fit, "%s (%s %s)", left >= 0 ? "yes" : "no", amount, left >= 0 ? "free" : "over");
            printf("| %s | %d | %s | %s | %s | %s | %s | %s | %s |\n", r->name, r->tp, pl, tape, peak, dn, dev, fit, host);
        }
    }
    free(rows), free(names);
    free(o.tps);
    cli_args_free(&a);
    return rc;
}
