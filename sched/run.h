// run: the stage sequence of `edgepatch run`. One config's stages in order, as one rank of the job
// that sched_init set up (sched/mpi_run.h): rank 0 removes what killed writers left and tokenizes, the
// model stages (cache, patch) are sharded by work item, then the score and prune rounds. Each stage
// skips the work whose complete output already matches its inputs, so a killed run resumes where it
// stopped; nothing starts once a stop was asked for (sched/signals.h).
#ifndef EP_SCHED_RUN_H
#define EP_SCHED_RUN_H

#include <stdio.h>

#include "pipeline/error.h"
#include "sched/mpi_run.h"

// The stages, in the order they run; `--until` names the last one. RUN_SCORE is round 0's scores,
// RUN_PRUNE every round (docs/pruning.md).
typedef enum { RUN_TOKENIZE, RUN_CACHE, RUN_PATCH, RUN_SCORE, RUN_PRUNE, RUN_N_STAGES } run_stage;

// "tokenize", "cache", "patch", "score", "prune".
const char *run_stage_name(run_stage s);
// The stage of a name, or -1 for none.
int run_stage_from_name(const char *name);

// Loads the config at config_path, then runs its stages up to and including `last`; fresh rebuilds
// outputs that exist. Once the patch stage is done, the run ends with its report (stages/report.h),
// written by rank 0 to report_out. Returns SCHED_OK, SCHED_STOPPED or SCHED_FAILED, the same on every
// rank; on failure rank 0's err says why (empty when another rank failed and printed its own message).
int run_pipeline(sched_ctx *sc, const char *config_path, run_stage last, int fresh, FILE *report_out, ep_error *err);

#endif
