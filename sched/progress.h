// progress: what rank 0 shows while a stage runs: items done of the stage's total, the rate since
// the start of this run, and the time left at that rate, on the sink's diagnostics stream (stderr). On
// a terminal a bar redrawn in place; otherwise (a Slurm log, a pipe) a line every
// EDGEPATCH_PROGRESS_SECONDS seconds (default 30) and one when the stage ends. Never calls MPI:
// sched/mpi_run feeds it the counts of every rank.
#ifndef EP_SCHED_PROGRESS_H
#define EP_SCHED_PROGRESS_H

#include "pipeline/log.h"

typedef struct {
    const ep_log *log;  // NULL: shows nothing
    const char *stage;
    int total, done, done_at_start, ranks, tty, active;
    double t0, last_print, every;
} progress;

// Starts a stage of `total` items of which `already_done` were finished by earlier runs.
void progress_start(progress *p, const ep_log *log, const char *stage, int total, int already_done, int ranks);
// n more items are done.
void progress_tick(progress *p, int n);
void progress_end(progress *p);

#endif
