// edgepatch report RUN: the report of a finished run folder (stages/report.h), again.
#include <stdio.h>
#include <string.h>

#include "sched/cli/cli.h"
#include "sched/signals.h"
#include "stages/report.h"

static const char usage[] =
    "usage: edgepatch report RUN\n"
    "\n"
    "Prints the report of the run folder RUN (full-model accuracy against each ablation of the config,\n"
    "each drop with its 95% interval; circuit size and faithfulness per pruning round) and writes it to\n"
    "RUN/report.txt, with the figures, each as PNG, PDF and SVG with its data as CSV:\n"
    "RUN/accuracy_drop.{png,pdf,svg,csv} (gnuplot: accuracy drop by edge group and layer band, n and the\n"
    "intervals) and RUN/circuit.{png,svg,pdf,csv} (Graphviz: the final circuit by layer, with a legend).\n"
    "A missing drawing tool skips its figure, with a note.\n"
    "A model_logs.json or circuit.json without a field the report prints is refused (one line naming the\n"
    "file and field, exit status 1) and nothing is written.\n"
    "`edgepatch run` ends by writing the same report.\n";

int cmd_report(int argc, char **argv) {
    if (cli_wants_help(argc, argv)) {
        fputs(usage, stdout);
        return 0;
    }
    if (argc != 2 || argv[1][0] == '-') {
        fprintf(stderr, "edgepatch report: need RUN, a run folder (see --help)\n");
        return 2;
    }
    // A stop request (SIGTERM, SIGUSR1) does not cut the report short: it takes seconds, and its files
    // are replaced whole (docs/distribution.md).
    sched_signals_install();
    ep_error err = {{0}};
    if (report_write(argv[1], stdout, &err)) {
        fprintf(stderr, "edgepatch report: %s\n", err.msg);
        return 1;
    }
    return 0;
}
