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
    "usage: edgepatch check CONFIG|SWEEP [--json]\n"
    "\n"
    "Checks a run config (or every run of a sweep config: a file with \"models\" and \"tasks\") the way\n"
    "edgepatch run checks it before any stage runs: every field's type and value, the task file, the\n"
    "plan rules, ablations and circuit against the model's config.json (no weights are read), and every\n"
    "prune_using_imp_scores file. Prints the resolved config with every default filled in (docs/config.md).\n"
    "  --json  the resolved config as JSON on stdout (a sweep: {\"sweep\": SWEEP, \"runs\": [config, ...]})\n"
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
    if (cli_wants_help(argc, argv)) {
        fputs(usage, stdout);
        return 0;
    }
    const char *path = NULL;
    int as_json = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--json")) as_json = 1;
        else if (argv[i][0] == '-' || path) {
            fprintf(stderr, "edgepatch check: unexpected argument '%s' (see --help)\n", argv[i]);
            return 2;
        } else path = argv[i];
    }
    if (!path) {
        fprintf(stderr, "edgepatch check: need CONFIG or SWEEP (see --help)\n");
        return 2;
    }
    ep_error err = {{0}};
    json_error_t jerr;
    json_t *j = json_load_file(path, 0, &jerr);
    if (!j) {
        fprintf(stderr, "edgepatch check: %s: %s%s\n", path, jerr.line > 0 ? "invalid JSON: " : "", jerr.text);
        return 1;
    }
    // A sweep lists models and tasks; a run config names one task.
    int is_sweep = json_is_object(j) && json_object_get(j, "models") && json_object_get(j, "tasks");
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
        for (int t = 0; t < s.n_tasks && rc == 0; t++) {
            run_config c;
            if (sweep_run_config(&s, m, t, &c, &err)) {
                fprintf(stderr, "edgepatch check: %s\n", err.msg);
                rc = 1;
                break;
            }
            json_t *o = run_config_resolved(&c);
            if (!as_json) {
                char title[4200];
                snprintf(title, sizeof title, "%s: run %s/%s", path, s.models[m].name, s.tasks[t]);
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
