// sweep_report: one report across the tasks of a sweep (`edgepatch report SWEEP [-o DIR]`, docs/sweeps.md,
// "The report across tasks"), from the runs' own files: each run's model_logs.json (accuracy, ablations),
// circuit.json and circuit.dot (pruning), and <output_root>/sweep-times.json.
//
// What each run is comes from the sweep file: an experiments entry's label (accuracy, bands, nested,
// donors, prune) and its run config (the ablations' rules, the donor kind). Per model it writes into dir:
//   report.txt           the tables: full-model accuracy, accuracy drop by edge group x layer band, the
//                        nested experiment, the donor families, contextualization (x->y, y->y) versus
//                        aggregation (y->last) by band, circuit sizes and faithfulness, wall times
//   accuracy_drop.csv    one row per band ablation; donor_families.csv, nested.csv, summary.csv,
//                        circuits.csv, times.csv: the other tables' numbers
//   accuracy_drop.{png,pdf} (gnuplot, accuracy_drop.gp): the tasks' heatmaps side by side, one colour scale
//   donor_families.{png,pdf} (gnuplot, donor_families.gp): donor kind x edge group per task, the same scale
//   circuit-<task>.{png,pdf} (Graphviz, from the prune run's circuit.dot)
// With several models every file name gets "-<model>" before its extension. A run not finished yet is a
// blank ("-") in the tables; a run file without a field the report reads fails the report with one line
// naming the file and field, before anything of that model is written (earlier models' files are). Files are replaced whole (atomically); a
// missing drawing tool skips its figures with a note in out. Never calls MPI; prints only to out.
#ifndef EP_SWEEP_REPORT_H
#define EP_SWEEP_REPORT_H

#include <stdio.h>

#include "pipeline/error.h"
#include "sched/sweep.h"

// dir: NULL for <output_root>/report. The tables go to out too.
int sweep_report_write(const sweep *s, const char *dir, FILE *out, ep_error *err);

#endif
