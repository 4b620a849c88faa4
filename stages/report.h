// report: what a finished run folder says, for a researcher: a table (full-model accuracy against each
// of the config's ablations, each drop with its 95% interval; circuit size and faithfulness per pruning
// round) and two figures drawn by well-kept tools, each as PNG, PDF and SVG with its data as CSV:
// accuracy_drop.{png,pdf,svg} (gnuplot, from accuracy_drop.gp: accuracy drop by edge group x layer band
// from the ablations that carry "group" and "band", each cell with its 95% interval, n in the title;
// accuracy_drop.csv) and circuit.{png,svg,pdf} (Graphviz dot, from circuit.dot: the final circuit with one
// rank per layer, a layer axis and a legend; circuit.csv lists its units with their round-file scores).
// The interval (stages/interval.h) comes from the paired counts the patch stage writes into
// model_logs.json ("prompts_correct"). Reads model_logs.json and circuit.json (and the round files for
// circuit.csv's scores: a round file that cannot be read leaves them empty, with a note); writes every
// file into the run folder atomically, byte-identical for the same inputs (the PDFs' dates are fixed).
// A drawing tool that is not installed is no error: the figure is skipped and one line says so. Both
// inputs are checked field by field before anything is written: a file lacking what the report prints
// fails it and leaves the old report in place. Removes stale temporaries of its own files first. Never
// calls MPI.
#ifndef EP_REPORT_H
#define EP_REPORT_H

#include <jansson.h>
#include <stdio.h>

#include "pipeline/error.h"

// The table goes to out (and report.txt); notes about skipped figures go to out as well.
int report_write(const char *run_dir, FILE *out, ep_error *err);

// The drawing helpers the sweep report (sched/sweep_report.c) shares with the run report.
// One figure file a tool draws: the tool writes tmp, a finished figure replaces path (dir/name).
typedef struct {
    char path[4200], tmp[4300];
} report_figure;
void report_figure_init(report_figure *f, const char *dir, const char *name);
// Runs the tool (argv[0] on PATH, stop signals blocked in it), which writes files[0..n) under their
// temporaries; when it succeeded the PDFs get fixed dates and every file replaces its figure. Returns 0,
// 1 when the tool is not installed (why says so; nothing changed), -1 on failure (err).
int report_draw(char *const argv[], report_figure *files, int n, char *why, size_t why_size, ep_error *err);
// "name='value'; " for gnuplot -e (quotes doubled); returns the length written.
size_t report_gnuplot_assign(char *out, size_t size, const char *name, const char *value);
// A CSV field (RFC 4180 quoting) and a double-quoted gnuplot data label.
void report_csv_text(FILE *f, const char *s);
void report_gnuplot_label(FILE *f, const char *s);
// A JSON object's number field (NAN when absent or not a number) and string field (fallback then).
double report_num(json_t *o, const char *key);
const char *report_str(json_t *o, const char *key, const char *fallback);

#endif
