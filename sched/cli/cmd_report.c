// edgepatch report RUN [--json]: the report of a finished run folder (stages/report.h), again.
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "sched/cli/cli.h"
#include "sched/cli/results.h"
#include "sched/signals.h"
#include "sched/sweep.h"
#include "sched/sweep_report.h"
#include "stages/report.h"

static const char usage[] =
    "usage: edgepatch report RUN [-j|--json]\n"
    "       edgepatch report SWEEP [-o DIR]\n"
    "\n"
    "Prints the report of the run folder RUN (full-model accuracy against each ablation of the config,\n"
    "each drop with its 95% interval; circuit size and faithfulness per pruning round) and writes it to\n"
    "RUN/report.txt, with the figures, each as PNG, PDF and SVG with its data as CSV:\n"
    "RUN/accuracy_drop.{png,pdf,svg,csv} (gnuplot: accuracy drop by edge group and layer band, n and the\n"
    "intervals) and RUN/circuit.{png,svg,pdf,csv} (Graphviz: the final circuit by layer, with a legend).\n"
    "A missing drawing tool skips its figure, with a note.\n"
    "A model_logs.json or circuit.json without a field the report prints is refused (one line naming the\n"
    "file and field, exit status 1) and nothing is written.\n"
    "`edgepatch run` ends by writing the same report.\n"
    "With a sweep file (SWEEP, configs/sweeps/*.json) instead of a run folder: one report across its tasks\n"
    "(docs/sweeps.md, \"The report across tasks\"), written into DIR (default <output_root>/report):\n"
    "report.txt (full-model accuracy, drops by edge group and layer band, the nested experiment, the donor\n"
    "families, contextualization versus aggregation, circuit sizes and faithfulness, times), the CSVs of\n"
    "those numbers, accuracy_drop.{png,pdf} and donor_families.{png,pdf} (gnuplot: every task side by side,\n"
    "one colour scale), circuit-<task>.{png,pdf} (Graphviz) and a copy of sweep-times.json.\n"
    "  -o, --output DIR  (SWEEP) where the sweep report goes\n"
    "  -j, --json  the report's figures as one JSON object on stdout (docs/cli.md: the fields of\n"
    "              model_logs.json and circuit.json the table shows); the table and notes go to stderr\n"
    "  -h, --help  this text\n"
    "Exit status: 0 done, 1 bad or missing run files, 2 usage.\n";

int cmd_report(int argc, char **argv) {
    static const struct option options[] = {{"json", no_argument, NULL, 'j'}, {"output", required_argument, NULL, 'o'},
                                            CLI_HELP_OPTION, {0}};
    int as_json = 0;
    const char *out_dir = NULL;
    cli_args a;
    cli_args_init(&a, "report", usage, argc, argv, options);
    for (int c; (c = cli_next(&a)) != CLI_END;) switch (c) {
            case 'j': as_json = 1; break;
            case 'o': out_dir = a.value; break;
            default: return cli_args_exit(&a, c);
        }
    if (cli_exactly_one(&a, "RUN, a run folder (or SWEEP, a sweep file)")) return 2;
    struct stat st;
    int is_sweep = stat(a.positional[0], &st) == 0 && S_ISREG(st.st_mode);
    if (is_sweep && as_json) return cli_usage_error(&a, "--json is for a run folder, not a sweep");
    if (!is_sweep && out_dir) return cli_usage_error(&a, "-o is for a sweep file, not a run folder");
    if (cli_parse_only()) return cli_args_done(&a);
    const char *run = a.positional[0];
    cli_args_free(&a);
    if (is_sweep) {
        sched_signals_install();
        sweep s;
        ep_error err = {{0}};
        if (sweep_load(run, &s, &err)) {
            fprintf(stderr, "edgepatch report: %s\n", err.msg);
            return 1;
        }
        int rc = sweep_report_write(&s, out_dir, stdout, &err);
        if (rc) fprintf(stderr, "edgepatch report: %s\n", err.msg);
        sweep_free(&s);
        return rc ? 1 : 0;
    }
    // A stop request (SIGTERM, SIGUSR1) does not cut the report short: it takes seconds, and its files
    // are replaced whole (docs/distribution.md).
    sched_signals_install();
    ep_error err = {{0}};
    if (report_write(run, as_json ? stderr : stdout, &err)) {
        fprintf(stderr, "edgepatch report: %s\n", err.msg);
        return 1;
    }
    if (as_json) {
        json_t *results = NULL;
        if (run_results_json(run, &results, &err)) {
            fprintf(stderr, "edgepatch report: %s\n", err.msg);
            return 1;
        }
        char txt[4200];
        snprintf(txt, sizeof txt, "%s/report.txt", run);
        json_t *o = json_pack("{s:s,s:s,s:o}", "run", run, "report", txt, "results", results ? results : json_null());
        cli_print_json(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(9));
    }
    return 0;
}
