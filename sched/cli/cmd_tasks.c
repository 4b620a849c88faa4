// edgepatch tasks [--tokenizer DIR]: the tasks in the data folder, with their sizes, and with a
// tokenizer how many pairs its clean-tokenization filter keeps.
#include <stdio.h>
#include <string.h>

#include "sched/cli/cli.h"
#include "pipeline/tokenizer.h"
#include "stages/prompts.h"
#include "stages/task.h"

static const char usage[] =
    "usage: edgepatch tasks [--tokenizer DIR]\n"
    "\n"
    "Lists the tasks (datasets/tasks/*.json) with their number of pairs, demonstrations and donor kinds.\n"
    "With --tokenizer, also how many pairs tokenize cleanly for that tokenizer and why the others do not.\n";

int cmd_tasks(int argc, char **argv) {
    if (cli_wants_help(argc, argv)) {
        fputs(usage, stdout);
        return 0;
    }
    const char *tok_dir = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--tokenizer") && i + 1 < argc) tok_dir = argv[++i];
        else {
            fprintf(stderr, "edgepatch tasks: unexpected argument '%s' (see --help)\n", argv[i]);
            return 2;
        }
    }
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
    printf("%-24s %-24s %6s %6s %5s  %s\n", "task", "title", "pairs", "ambig", "shots", tk ? "kept (dropped: reasons)" : "donor kinds");
    for (int i = 0; i < n && rc == 0; i++) {
        task t;
        if (task_load(names[i], &t, &err)) {
            fprintf(stderr, "edgepatch tasks: %s\n", err.msg);
            rc = 1;
            break;
        }
        printf("%-24s %-24s %6d %6d %5d  ", t.name, t.title, t.n_pairs, t.n_ambiguous, t.n_shots);
        if (tk) {
            prompt_builder b;
            if (prompt_builder_init(&b, &t, tk, NULL, &err)) {
                fprintf(stderr, "\nedgepatch tasks: %s\n", err.msg);
                rc = 1;
            } else {
                printf("%d of %d", b.report.pairs_kept, b.report.pairs_total);
                if (t.n_ambiguous) printf(" + %d of %d ambiguous", b.report.ambiguous_kept, b.report.ambiguous_total);
                for (int r = 1; r < PAIR_REASON_COUNT; r++)
                    if (b.report.dropped[r]) printf("; %d %s", b.report.dropped[r], pair_reason_name((pair_reason)r));
            }
            prompt_builder_free(&b);
        } else {
            for (int k = 0; k < t.n_kinds; k++) printf("%s%s", k ? "," : "", donor_kind_name(t.kinds[k]));
        }
        printf("\n");
        task_free(&t);
    }
    task_names_free(names, n);
    if (tk) tokenizer_free(tk);
    return rc;
}
