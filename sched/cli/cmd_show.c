// edgepatch show RUN --prompt I [--json]: one prompt of a run, each token with its type and example
// index, and its donors aligned beneath (tokens that differ from the clean prompt highlighted on a
// terminal).
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sched/cli/cli.h"
#include "pipeline/h5store.h"
#include "pipeline/tokenizer.h"
#include "stages/prompts.h"
#include "stages/tokenize.h"

static const char usage[] =
    "usage: edgepatch show RUN -p|--prompt I [-j|--json]\n"
    "\n"
    "Shows prompt I of the run folder RUN (its prompts.h5): tokens, types, example indices, donors.\n"
    "  -p, --prompt I  the prompt's index, 0 .. prompts - 1\n"
    "  -j, --json      {\"tokens\": [ids], \"pieces\": [...], \"types\": [...], \"index\": [...], \"donors\":\n"
    "                  [[ids]...], \"target\": [ids], \"metrics\" (once the patch stage ran): {\"correct\",\n"
    "                  \"first_token_correct\", \"target_logprob\", \"logit_diff\", \"continuation\"}}\n"
    "  -h, --help      this text\n"
    "Exit status: 0 shown, 1 bad or missing run files or no such prompt, 2 usage.\n";

// A token as printable text: its piece as prompts.h5 stores it (stored, when the file has token texts),
// else decoded by the tokenizer, with newlines and tabs escaped.
static void printable(const tokenizer *tk, const char *stored, int id, char *out, size_t n) {
    char *text = NULL;
    ep_error err;
    if (stored) {
        text = ep_strdup(stored);
    } else if (!tk || tokenizer_decode(tk, &id, 1, 0, &text, NULL, &err)) {
        snprintf(out, n, "#%d", id);
        return;
    }
    size_t j = 0;
    for (const char *p = text; *p && j + 3 < n; p++) {
        if (*p == '\n') out[j++] = '\\', out[j++] = 'n';
        else if (*p == '\t') out[j++] = '\\', out[j++] = 't';
        else out[j++] = *p;
    }
    out[j] = 0;
    free(text);
}

// The prompt's metrics under the run's plan from RUN/patch.h5: 0 with *out NULL if the patch stage has
// not run (no patch.h5), 0 with *out set, or -1 if patch.h5 is there but unreadable, damaged or made for
// other prompts (a run's file is never shown in part).
static int prompt_metrics_json(const char *run, long index, int n_prompts, const tokenizer *tk, json_t **out, ep_error *err) {
    char path[4096];
    snprintf(path, sizeof path, "%s/patch.h5", run);
    *out = NULL;
    if (access(path, F_OK) != 0) return 0;
    h5store s;
    if (h5store_open(path, &s, err)) return -1;
    h5shape sh[6];
    int32_t *correct = NULL, *first = NULL, *gen = NULL, *n_gen = NULL;
    float *lp = NULL, *ld = NULL;
    int rc = h5store_read_i32(&s, "plan/correct", &sh[0], &correct, err) ||
             h5store_read_i32(&s, "plan/first_token_correct", &sh[1], &first, err) ||
             h5store_read_f32(&s, "plan/target_logprob", &sh[2], &lp, err) ||
             h5store_read_f32(&s, "plan/logit_diff", &sh[3], &ld, err) ||
             h5store_read_i32(&s, "plan/n_generated", &sh[4], &n_gen, err) ||
             h5store_read_i32(&s, "plan/generated", &sh[5], &gen, err) ? -1 : 0;
    static const char *names[6] = {"correct", "first_token_correct", "target_logprob", "logit_diff", "n_generated", "generated"};
    for (int k = 0; k < 6 && rc == 0; k++)
        if (sh[k].dims[0] != n_prompts || sh[k].rank != (k == 5 ? 2 : 1))
            rc = ep_fail(err, "%s: dataset plan/%s has %lld rows, prompts.h5 has %d prompts (made from other prompts?)", path,
                         names[k], (long long)sh[k].dims[0], n_prompts);
    if (rc == 0 && (n_gen[index] < 0 || n_gen[index] > sh[5].dims[1]))
        rc = ep_fail(err, "%s: dataset plan/n_generated: %d tokens for prompt %d, plan/generated holds %lld per prompt",
                     path, n_gen[index], (int)index, (long long)sh[5].dims[1]);
    if (rc == 0) {
        char *text = NULL;
        ep_error ignored;
        if (!tk || tokenizer_decode(tk, gen + index * sh[5].dims[1], n_gen[index], 1, &text, NULL, &ignored)) {
            // No tokenizer (the run folder moved without its model): the generated ids.
            size_t cap = 16 * (size_t)n_gen[index] + 1, at = 0;
            text = ep_malloc(cap);
            text[0] = 0;
            for (int k = 0; k < n_gen[index]; k++)
                at += (size_t)snprintf(text + at, cap - at, "%s#%d", k ? " " : "", gen[index * sh[5].dims[1] + k]);
        }
        *out = json_pack("{s:b,s:b,s:f,s:f,s:s}", "correct", correct[index], "first_token_correct", first[index],
                         "target_logprob", (double)lp[index], "logit_diff", (double)ld[index], "continuation", text);
        free(text);
    }
    free(correct), free(first), free(gen), free(n_gen), free(lp), free(ld);
    h5store_close(&s);
    return rc;
}

// The stored text at i of a text dataset, or NULL when the file has none.
#define TEXT(texts, i) ((texts) ? (texts)[i] : NULL)

int cmd_show(int argc, char **argv) {
    static const struct option options[] = {{"prompt", required_argument, NULL, 'p'}, {"json", no_argument, NULL, 'j'},
                                            CLI_HELP_OPTION, {0}};
    int prompt = -1, json = 0;
    cli_args a;
    cli_args_init(&a, "show", usage, argc, argv, options);
    for (int c; (c = cli_next(&a)) != CLI_END;) switch (c) {
            case 'p':
                if (cli_int_value(&a, "--prompt", 0, INT_MAX, &prompt)) return cli_args_exit(&a, CLI_USAGE);
                break;
            case 'j': json = 1; break;
            default: return cli_args_exit(&a, c);
        }
    if (a.n_positional > 1) return cli_usage_error(&a, "unexpected argument '%s'", a.positional[1]);
    if (a.n_positional == 0 || prompt < 0) return cli_usage_error(&a, "need RUN and --prompt I");
    if (cli_parse_only()) return cli_args_done(&a);
    const char *run = a.positional[0];
    long index = prompt;
    cli_args_free(&a);
    char path[4096];
    snprintf(path, sizeof path, "%s/prompts.h5", run);
    prompt_set ps;
    ep_error err = {{0}};
    if (prompt_set_load(path, &ps, &err)) {
        fprintf(stderr, "edgepatch show: %s\n", err.msg);
        return 1;
    }
    if (index >= ps.n_prompts) {
        fprintf(stderr, "edgepatch show: %s: prompt %ld does not exist (%d prompts)\n", path, index, ps.n_prompts);
        prompt_set_free(&ps);
        return 1;
    }
    // The token texts are in prompts.h5 (format 2); the tokenizer (at the normalized path the file names)
    // only decodes the continuation, and the tokens of an older file.
    tokenizer *tk = NULL;
    if (tokenizer_load(ps.tokenizer_path, &tk, &err)) {
        if (!ps.token_text) fprintf(stderr, "edgepatch show: warning: %s; showing ids only\n", err.msg);
        tk = NULL;
    }
    // Before anything is printed: a damaged patch.h5 fails the command, it is not shown without its metrics.
    json_t *metrics = NULL;
    if (prompt_metrics_json(run, index, ps.n_prompts, tk, &metrics, &err)) {
        fprintf(stderr, "edgepatch show: %s\n", err.msg);
        if (tk) tokenizer_free(tk);
        prompt_set_free(&ps);
        return 1;
    }
    int L = ps.lengths[index], K = ps.n_donors;
    const int32_t *tok = ps.tokens + (size_t)index * ps.max_len, *types = ps.types + (size_t)index * ps.max_len,
                  *idx = ps.index + (size_t)index * ps.max_len;
    char piece[256];
    if (json) {
        json_t *o = json_object(), *jt = json_array(), *jp = json_array(), *jy = json_array(), *ji = json_array(),
               *jd = json_array(), *jg = json_array();
        for (int i = 0; i < L; i++) {
            json_array_append_new(jt, json_integer(tok[i]));
            printable(tk, TEXT(ps.token_text, (size_t)index * ps.max_len + i), tok[i], piece, sizeof piece);
            json_array_append_new(jp, json_string(piece));
            json_array_append_new(jy, json_string(token_type_name(types[i])));
            json_array_append_new(ji, json_integer(idx[i]));
        }
        for (int d = 0; d < K; d++) {
            json_t *dl = json_array();
            const int32_t *dt = ps.donors + ((size_t)index * K + d) * ps.max_len;
            for (int i = 0; i < L; i++) json_array_append_new(dl, json_integer(dt[i]));
            json_array_append_new(jd, dl);
        }
        for (int i = 0; i < ps.target_lengths[index]; i++)
            json_array_append_new(jg, json_integer(ps.targets[(size_t)index * ps.max_target + i]));
        json_object_set_new(o, "tokens", jt);
        json_object_set_new(o, "pieces", jp);
        json_object_set_new(o, "types", jy);
        json_object_set_new(o, "index", ji);
        json_object_set_new(o, "donors", jd);
        json_object_set_new(o, "target", jg);
        if (metrics) json_object_set_new(o, "metrics", metrics);
        json_dumpf(o, stdout, JSON_COMPACT);
        fputc('\n', stdout);
        json_decref(o);
    } else {
        int colour = isatty(STDOUT_FILENO);
        printf("prompt %ld of %s (task %s, %d tokens, %d donors)\n", index, run, ps.task, L, K);
        printf("%4s %-6s %4s  %-18s", "pos", "type", "ex", "token");
        for (int d = 0; d < K; d++) printf(" donor %-12d", d);
        printf("\n");
        for (int i = 0; i < L; i++) {
            printable(tk, TEXT(ps.token_text, (size_t)index * ps.max_len + i), tok[i], piece, sizeof piece);
            printf("%4d %-6s %4d  %-18s", i, token_type_name(types[i]), idx[i], piece);
            for (int d = 0; d < K; d++) {
                int dt = ps.donors[((size_t)index * K + d) * ps.max_len + i];
                printable(tk, TEXT(ps.donor_text, ((size_t)index * K + d) * ps.max_len + i), dt, piece, sizeof piece);
                if (colour && dt != tok[i]) printf(" \033[1;31m%-18s\033[0m", piece);
                else printf(" %-18s", dt == tok[i] ? "." : piece);
            }
            printf("\n");
        }
        if (metrics) {
            printf("metrics: correct %s, first token correct %s, target logprob %.4f, logit diff %.4f, continuation \"%s\"\n",
                   json_is_true(json_object_get(metrics, "correct")) ? "yes" : "no",
                   json_is_true(json_object_get(metrics, "first_token_correct")) ? "yes" : "no",
                   json_real_value(json_object_get(metrics, "target_logprob")),
                   json_real_value(json_object_get(metrics, "logit_diff")),
                   json_string_value(json_object_get(metrics, "continuation")));
            json_decref(metrics);
        }
        printf("target:");
        for (int i = 0; i < ps.target_lengths[index]; i++) {
            printable(tk, TEXT(ps.target_text, (size_t)index * ps.max_target + i), ps.targets[(size_t)index * ps.max_target + i],
                      piece, sizeof piece);
            printf(" %s", piece);
        }
        printf("\n");
    }
    if (tk) tokenizer_free(tk);
    prompt_set_free(&ps);
    return 0;
}
