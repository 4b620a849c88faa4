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
// RUN_PRUNE every round (docs/pruning.md), RUN_FV the function vectors (stages/fv.h; only with a
// function_vectors block, on rank 0).
typedef enum { RUN_TOKENIZE, RUN_CACHE, RUN_PATCH, RUN_SCORE, RUN_PRUNE, RUN_FV, RUN_N_STAGES } run_stage;

// "tokenize", "cache", "patch", "score", "prune", "fv".
const char *run_stage_name(run_stage s);
// The stage of a name, or -1 for none.
int run_stage_from_name(const char *name);

// What one run_pipeline call did, for `edgepatch run --json` (docs/cli.md). A
// stage is RUN_NOT_REACHED when not asked for (after `last`) or when the run stopped or failed before
// it; RUN_COMPUTED when this call computed at least one of its work items (merging shards that were
// all current into the outputs again does not count), else RUN_UP_TO_DATE (checked, nothing computed);
// tokenize is RUN_COMPUTED when it wrote prompts.h5. items and computed count the cache and patch
// stages' work items and the score and prune rounds (one loop runs them: items[RUN_SCORE] is 1 once
// round 0 exists, computed[RUN_SCORE] 1 when this call computed it; items[RUN_PRUNE] the later rounds,
// computed[RUN_PRUNE] those this call computed). Rank 0's view (tokenize runs on rank 0).
typedef enum { RUN_NOT_REACHED, RUN_UP_TO_DATE, RUN_COMPUTED } run_stage_state;
typedef struct {
    char output_path[4096];  // the config's output folder; "" if the config did not load
    run_stage_state state[RUN_N_STAGES];
    int items[RUN_N_STAGES], computed[RUN_N_STAGES];
} run_summary;

// Loads the config at config_path, then runs its stages up to and including `last`; fresh rebuilds
// outputs that exist. summary (optional) is filled with what was done. Once the patch stage is done, the run ends with its report (stages/report.h),
// written by rank 0 to report_out. Returns SCHED_OK, SCHED_STOPPED or SCHED_FAILED, the same on every
// rank; on failure rank 0's err says why (empty when another rank failed and printed its own message).
int run_pipeline(sched_ctx *sc, const char *config_path, run_stage last, int fresh, FILE *report_out, run_summary *summary,
                 ep_error *err);

#endif
