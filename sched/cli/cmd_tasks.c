// edgepatch tasks [--tokenizer DIR] [--json]: the tasks in the data folder, with their sizes, and with a
// tokenizer how many pairs its clean-tokenization filter keeps.
#include <jansson.h>
#include <stdio.h>
#include <string.h>

#include "sched/cli/cli.h"
#include "pipeline/tokenizer.h"
#include "stages/prompts.h"
#include "stages/task.h"

static const char usage[] =
    "usage: edgepatch tasks [-t|--tokenizer DIR] [-j|--json]\n"
    "\n"
    "Lists the tasks (datasets/tasks/*.json) with their number of pairs, demonstrations and donor kinds.\n"
    "  -t, --tokenizer DIR  also how many pairs tokenize cleanly for that tokenizer and why the others do not\n"
    "  -j, --json           {\"tokenizer\": DIR or null, \"tasks\": [{\"name\", \"title\", \"pairs\", \"ambiguous\",\n"
    "                       \"shots\", \"donor_kinds\": [...], with --tokenizer \"kept\": {\"pairs_kept\", \"pairs_total\",\n"
    "                       \"ambiguous_kept\", \"ambiguous_total\", \"dropped\": {reason: count}}}]}\n"
    "  -h, --help           this text\n"
    "Exit status: 0 ok, 1 a bad task file or tokenizer, 2 usage.\n";

int cmd_tasks(int argc, char **argv) {
    static const struct option options[] = {{"tokenizer", required_argument, NULL, 't'}, {"json", no_argument, NULL, 'j'},
                                            CLI_HELP_OPTION, {0}};
    const char *tok_dir = NULL;
    int as_json = 0;
    cli_args a;
    cli_args_init(&a, "tasks", usage, argc, argv, options);
    for (int c; (c = cli_next(&a)) != CLI_END;) switch (c) {
            case 't': tok_dir = a.value; break;
            case 'j': as_json = 1; break;
            default: return cli_args_exit(&a, c);
        }
    if (a.n_positional) return cli_usage_error(&a, "unexpected argument '%s'", a.positional[0]);
    if (cli_parse_only()) return cli_args_done(&a);
    cli_args_free(&a);
    ep_error err = {{0}};
    tokenizer *tk = NULL;
    if (tok_dir && tokenizer_load(tok_dir, &tk, &err)) {
        fprintf(stderr, "edgepatch tasks: %s\n", err.msg);
        return 1;
    }
    char **names = NULL;
    int n = 0, rc = 0;
    if (task_names(&names, &n, &err)) {
        fprintf(stderr, "edgepatch tasks: %s\n", err.msg);
        if (tk) tokenizer_free(tk);
        return 1;
    }
    // Every task is read (and with a tokenizer filtered) before anything is printed: a bad task file
    // fails the command with its one line, not half a table.
    json_t *list = json_array();
    for (int i = 0; i < n && rc == 0; i++) {
        task t;
        if (task_load(names[i], &t, &err)) {
            rc = 1;
            break;
        }
        json_t *kinds = json_array();
        for (int k = 0; k < t.n_kinds; k++) json_array_append_new(kinds, json_string(donor_kind_name(t.kinds[k])));
        json_t *o = json_pack("{s:s,s:s,s:i,s:i,s:i,s:o}", "name", t.name, "title", t.title, "pairs", t.n_pairs,
                              "ambiguous", t.n_ambiguous, "shots", t.n_shots, "donor_kinds", kinds);
        if (tk) {
            prompt_builder b;
            if (prompt_builder_init(&b, &t, tk, NULL, &err)) {
                rc = 1;
            } else {
                json_t *dropped = json_object();
                for (int r = 1; r < PAIR_REASON_COUNT; r++)
                    if (b.report.dropped[r])
                        json_object_set_new(dropped, pair_reason_name((pair_reason)r), json_integer(b.report.dropped[r]));
                json_object_set_new(o, "kept", json_pack("{s:i,s:i,s:i,s:i,s:o}", "pairs_kept", b.report.pairs_kept,
                                                         "pairs_total", b.report.pairs_total, "ambiguous_kept",
                                                         b.report.ambiguous_kept, "ambiguous_total",
                                                         b.report.ambiguous_total, "dropped", dropped));
            }
            prompt_builder_free(&b);
        }
        json_array_append_new(list, o);
        task_free(&t);
    }
    task_names_free(names, n);
    if (tk) tokenizer_free(tk);
    if (rc) {
        fprintf(stderr, "edgepatch tasks: %s\n", err.msg);
        json_decref(list);
        return rc;
    }
    if (as_json) {
        json_t *o = json_pack("{s:s?,s:o}", "tokenizer", tok_dir, "tasks", list);
        cli_print_json(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
        return 0;
    }
    printf("%-24s %-24s %6s %6s %5s  %s\n", "task", "title", "pairs", "ambig", "shots", tk || tok_dir ? "kept (dropped: reasons)" : "donor kinds");
    size_t i;
    json_t *o;
    json_array_foreach(list, i, o) {
        printf("%-24s %-24s %6d %6d %5d  ", json_string_value(json_object_get(o, "name")),
               json_string_value(json_object_get(o, "title")), (int)json_integer_value(json_object_get(o, "pairs")),
               (int)json_integer_value(json_object_get(o, "ambiguous")), (int)json_integer_value(json_object_get(o, "shots")));
        json_t *kept = json_object_get(o, "kept");
        if (kept) {
            printf("%d of %d", (int)json_integer_value(json_object_get(kept, "pairs_kept")),
                   (int)json_integer_value(json_object_get(kept, "pairs_total")));
            if (json_integer_value(json_object_get(o, "ambiguous")))
                printf(" + %d of %d ambiguous", (int)json_integer_value(json_object_get(kept, "ambiguous_kept")),
                       (int)json_integer_value(json_object_get(kept, "ambiguous_total")));
            const char *reason;
            json_t *count;
            json_object_foreach(json_object_get(kept, "dropped"), reason, count)
                printf("; %d %s", (int)json_integer_value(count), reason);
        } else {
            size_t k;
            json_t *kind;
            json_array_foreach(json_object_get(o, "donor_kinds"), k, kind) printf("%s%s", k ? "," : "", json_string_value(kind));
        }
        printf("\n");
    }
    json_decref(list);
    return 0;
}
