// report: what a finished run folder says, for a researcher: a table (full-model accuracy against each
// of the config's ablations; circuit size and faithfulness per pruning round) and two figures drawn by
// well-kept tools: accuracy_drop.png (gnuplot: accuracy drop by edge group x layer band, from the
// ablations that carry "group" and "band") and circuit.png / circuit.svg (Graphviz dot: token types as
// nodes, the final circuit's kept edges labelled with their layers). Reads only model_logs.json and
// circuit.json; writes report.txt, the figures and their sources (accuracy_drop.gp, circuit.dot) into
// the run folder, each atomically. A drawing tool that is not installed is no error: the figure is
// skipped and one line says so. Both inputs are checked field by field before anything is written: a
// file lacking what the report prints fails it and leaves the old report in place. Removes stale
// temporaries of its own files first. Never calls MPI.
#ifndef EP_REPORT_H
#define EP_REPORT_H

#include <stdio.h>

#include "pipeline/error.h"

// The table goes to out (and report.txt); notes about skipped figures go to out as well.
int report_write(const char *run_dir, FILE *out, ep_error *err);

#endif
