// edgepatch check CONFIG|SWEEP [--json]: checks a run config whole, or every run config a sweep expands
// to, as edgepatch run and sweep plan|submit check them (stages/run_config.h), and prints the resolved
// config(s) with every default filled in. Reads the files the config names (task file, the model's
// config.json, prune_using_imp_scores files); writes nothing.
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sched/cli/cli.h"
#include "sched/sweep.h"
#include "stages/run_config.h"

static const char usage[] =
    "usage: edgepatch check CONFIG|SWEEP [-j|--json]\n"
    "\n"
    "Checks a run config (or every run of a sweep config: a file with \"models\" and \"tasks\") the way\n"
    "edgepatch run checks it before any stage runs: every field's type and value, the task file, the\n"
    "plan rules, ablations and circuit against the model's config.json (no weights are read), and every\n"
    "prune_using_imp_scores file. Prints the resolved config with every default filled in (docs/config.md).\n"
    "  -j, --json  the resolved config as JSON on stdout (a sweep: {\"sweep\": SWEEP, \"runs\": [config, ...]})\n"
    "  -h, --help  this text\n"
    "Writes nothing. Exit status: 0 ok, 1 bad config (one line naming the file and the field), 2 usage.\n";

static void print_resolved(json_t *o, const char *title) {
    printf("%s: ok\n", title);
    const char *key;
    json_t *v;
    json_object_foreach(o, key, v) {
        char *text = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY | JSON_REAL_PRECISION(8));
        printf("  %-24s %s\n", key, text);
        free(text);
    }
}

int cmd_check(int argc, char **argv) {
    static const struct option options[] = {{"json", no_argument, NULL, 'j'}, CLI_HELP_OPTION, {0}};
    int as_json = 0;
    cli_args a;
    cli_args_init(&a, "check", usage, argc, argv, options);
    for (int c; (c = cli_next(&a)) != CLI_END;) switch (c) {
            case 'j': as_json = 1; break;
            default: return cli_args_exit(&a, c);
        }
    if (cli_exactly_one(&a, "CONFIG or SWEEP")) return 2;
    if (cli_parse_only()) return cli_args_done(&a);
    const char *path = a.positional[0];
    cli_args_free(&a);
    ep_error err = {{0}};
    json_error_t jerr;
    json_t *j = json_load_file(path, 0, &jerr);
    if (!j) {
        fprintf(stderr, "edgepatch check: %s: %s%s\n", path, jerr.line > 0 ? "invalid JSON: " : "", jerr.text);
        return 1;
    }
    // A sweep lists models and tasks; a run config names one task.
    int is_sweep = json_is_object(j) && json_object_get(j, "models") &&
                   (json_object_get(j, "tasks") || json_object_get(j, "experiments"));
    json_decref(j);
    if (!is_sweep) {
        run_config c;
        if (run_config_load(path, &c, &err)) {
            fprintf(stderr, "edgepatch check: %s\n", err.msg);
            return 1;
        }
        json_t *o = run_config_resolved(&c);
        if (as_json) {
            char *text = json_dumps(o, JSON_INDENT(2) | JSON_REAL_PRECISION(8));
            printf("%s\n", text);
            free(text);
        } else {
            print_resolved(o, path);
        }
        json_decref(o);
        run_config_free(&c);
        return 0;
    }
    sweep s;
    if (sweep_load(path, &s, &err)) {  // checks every run's config
        fprintf(stderr, "edgepatch check: %s\n", err.msg);
        return 1;
    }
    json_t *runs = json_array();
    int rc = 0;
    for (int m = 0; m < s.n_models && rc == 0; m++)
        for (int t = 0; t < s.n_entries && rc == 0; t++) {
            run_config c;
            if (sweep_run_config(&s, m, t, &c, &err)) {
                fprintf(stderr, "edgepatch check: %s\n", err.msg);
                rc = 1;
                break;
            }
            json_t *o = run_config_resolved(&c);
            if (!as_json) {
                char title[4200];
                snprintf(title, sizeof title, "%s: run %s/%s", path, s.models[m].name, s.entries[t].name);
                print_resolved(o, title);
            }
            json_array_append_new(runs, o);
            run_config_free(&c);
        }
    if (rc == 0 && as_json) {
        json_t *o = json_pack("{s:s,s:O}", "sweep", path, "runs", runs);
        char *text = json_dumps(o, JSON_INDENT(2) | JSON_REAL_PRECISION(8));
        printf("%s\n", text);
        free(text);
        json_decref(o);
    } else if (rc == 0) {
        printf("%s: %d runs ok\n", path, (int)json_array_size(runs));
    }
    json_decref(runs);
    sweep_free(&s);
    return rc;
}
