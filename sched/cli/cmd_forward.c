// edgepatch forward: one prompt through the model; prints the most likely next tokens and, with
// --generate N, the greedy continuation. --json prints the DESIGN.md form for scripts.
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sched/cli/cli.h"
#include "pipeline/forward.h"
#include "pipeline/generate.h"
#include "pipeline/model.h"
#include "pipeline/tokenizer.h"

static const char usage[] =
    "usage: edgepatch forward -m|--model DIR (-i|--ids 2,651,... | --text T) [-k|--top K] [-g|--generate N]\n"
    "                         [-j|--json]\n"
    "\n"
    "Runs one prompt through the HuggingFace checkpoint in DIR (config.json + safetensors) on the CPU.\n"
    "  -m, --model DIR     the checkpoint folder\n"
    "  -i, --ids LIST      token ids, comma-separated (include BOS yourself)\n"
    "      --text T        text, tokenized with DIR's tokenizer.json (BOS added as the tokenizer does)\n"
    "  -k, --top K         how many next tokens to show (default 5)\n"
    "  -g, --generate N    continue greedily for up to N tokens (stops at eos)\n"
    "  -j, --json          print {\"ids\", \"logits\" (last position), \"top\": [{id, piece, logprob}], \"generated\"}\n"
    "  -h, --help          this text\n"
    "Exit status: 0 ok, 1 bad model or tokenizer, 2 usage (also a malformed --ids list).\n";

typedef struct {
    const char *model_dir, *ids, *text;
    int top, generate, json;
} forward_args;

enum { OPT_TEXT = CLI_LONG_ONLY };

// 0 parsed; -1 with *exit_status set when the command ends here (help, a usage error, --parse-only).
static int parse_args(int argc, char **argv, forward_args *f, int *exit_status) {
    static const struct option options[] = {{"model", required_argument, NULL, 'm'}, {"ids", required_argument, NULL, 'i'},
                                            {"text", required_argument, NULL, OPT_TEXT}, {"top", required_argument, NULL, 'k'},
                                            {"generate", required_argument, NULL, 'g'}, {"json", no_argument, NULL, 'j'},
                                            CLI_HELP_OPTION, {0}};
    *f = (forward_args){.top = 5};
    cli_args a;
    cli_args_init(&a, "forward", usage, argc, argv, options);
    for (int c; (c = cli_next(&a)) != CLI_END;) switch (c) {
            case 'm': f->model_dir = a.value; break;
            case 'i': f->ids = a.value; break;
            case OPT_TEXT: f->text = a.value; break;
            case 'k':
            case 'g':
                if (cli_int_value(&a, c == 'k' ? "--top" : "--generate", 0, 100000, c == 'k' ? &f->top : &f->generate))
                    return *exit_status = cli_args_exit(&a, CLI_USAGE), -1;
                break;
            case 'j': f->json = 1; break;
            default: return *exit_status = cli_args_exit(&a, c), -1;
        }
    if (a.n_positional) return *exit_status = cli_usage_error(&a, "unexpected argument '%s'", a.positional[0]), -1;
    if (!f->model_dir || (!f->ids == !f->text))
        return *exit_status = cli_usage_error(&a, "need --model DIR and exactly one of --ids or --text"), -1;
    if (cli_parse_only()) return *exit_status = cli_args_done(&a), -1;
    cli_args_free(&a);
    return 0;
}

typedef struct {
    int id;
    double logprob;
} scored_token;

static int by_logprob_desc(const void *a, const void *b) {
    const scored_token *x = a, *y = b;
    if (x->logprob != y->logprob) return x->logprob < y->logprob ? 1 : -1;
    return x->id - y->id;
}

static const char *piece_of(const tokenizer *tk, int id) {
    const char *p = tk ? tokenizer_piece(tk, id) : NULL;
    return p ? p : "";
}

int cmd_forward(int argc, char **argv) {
    forward_args a;
    int exit_status;
    if (parse_args(argc, argv, &a, &exit_status)) return exit_status;
    ep_error err = {{0}};
    int *ids = NULL, n_ids = 0;
    // The tokenizer is optional with --ids (pieces are then left empty), required with --text.
    tokenizer *tk = NULL;
    if (tokenizer_load(a.model_dir, &tk, &err) && a.text) {
        fprintf(stderr, "edgepatch forward: %s\n", err.msg);
        return 1;
    }
    char msg[256];
    if (a.text ? tokenizer_encode(tk, a.text, strlen(a.text), 1, &ids, &n_ids, &err)
               : cli_parse_int_list(a.ids, &ids, &n_ids, msg, sizeof msg)) {
        fprintf(stderr, "edgepatch forward: %s: %s\n", a.text ? "--text" : "--ids", a.text ? err.msg : msg);
        if (tk) tokenizer_free(tk);
        return a.text ? 1 : 2;
    }
    if (n_ids == 0) {
        fprintf(stderr, "edgepatch forward: --text gives no tokens\n");
        if (tk) tokenizer_free(tk);
        return 2;
    }
    model m;
    if (model_load(a.model_dir, &m, &err)) {
        fprintf(stderr, "edgepatch forward: %s\n", err.msg);
        free(ids);
        if (tk) tokenizer_free(tk);
        return 1;
    }
    int V = m.cfg.vocab_size, rc = 1;
    const kernel_ops *ops = kernel_ops_cpu();
    kv_cache cache;
    float *logits = ep_malloc(sizeof(float) * (size_t)V);
    int *generated = ep_malloc(sizeof(int) * (size_t)(a.generate + 1)), n_generated = 0;
    scored_token *top = ep_malloc(sizeof(scored_token) * (size_t)V);
    int last = n_ids - 1;
    forward_batch b = {.n_seqs = 1, .n_new = &n_ids, .tokens = ids, .n_logit_rows = 1, .logit_rows = &last, .logits = logits};
    if (kv_cache_init(&cache, &m.cfg, 1, n_ids + a.generate, 0, &err) || model_forward(&m, ops, &cache, &b, NULL, &err)) goto fail;
    greedy_opts go = {.max_new_tokens = a.generate, .stop_ids = m.cfg.eos_ids, .n_stop_ids = m.cfg.n_eos};
    if (a.generate > 0 && greedy_decode(&m, ops, &cache, logits, &go, generated, &n_generated, &err)) goto fail;

    // log-softmax in double, then the top K.
    double mx = -INFINITY, sum = 0;
    for (int i = 0; i < V; i++) mx = logits[i] > mx ? logits[i] : mx;
    for (int i = 0; i < V; i++) sum += exp(logits[i] - mx);
    for (int i = 0; i < V; i++) top[i] = (scored_token){i, logits[i] - mx - log(sum)};
    qsort(top, (size_t)V, sizeof *top, by_logprob_desc);
    int k = a.top < V ? a.top : V;
    if (a.json) {
        json_t *o = json_object(), *jids = json_array(), *jl = json_array(), *jt = json_array(), *jg = json_array();
        for (int i = 0; i < n_ids; i++) json_array_append_new(jids, json_integer(ids[i]));
        for (int i = 0; i < V; i++) json_array_append_new(jl, json_real(logits[i]));
        for (int i = 0; i < k; i++)
            json_array_append_new(jt, json_pack("{s:i,s:s,s:f}", "id", top[i].id, "piece", piece_of(tk, top[i].id),
                                                "logprob", top[i].logprob));
        for (int i = 0; i < n_generated; i++) json_array_append_new(jg, json_integer(generated[i]));
        json_object_set_new(o, "ids", jids);
        json_object_set_new(o, "logits", jl);
        json_object_set_new(o, "top", jt);
        json_object_set_new(o, "generated", jg);
        cli_print_json(o, JSON_COMPACT | JSON_REAL_PRECISION(9));
    } else {
        printf("%s, %d tokens; next token:\n", m.cfg.arch_name, n_ids);
        for (int i = 0; i < k; i++)
            printf("  %8d  %-16s p=%.6f  logprob=%.6f\n", top[i].id, piece_of(tk, top[i].id), exp(top[i].logprob),
                   top[i].logprob);
        if (a.generate > 0) {
            printf("generated:");
            for (int i = 0; i < n_generated; i++) printf(" %d", generated[i]);
            char *text = NULL;
            if (tk && tokenizer_decode(tk, generated, n_generated, 0, &text, NULL, &err) == 0) printf("  \"%s\"", text);
            free(text);
            printf("\n");
        }
    }
    rc = 0;
    goto done;
fail:
    fprintf(stderr, "edgepatch forward: %s\n", err.msg);
done:
    kv_cache_free(&cache);
    free(logits), free(generated), free(top), free(ids);
    model_free(&m);
    if (tk) tokenizer_free(tk);
    return rc;
}
