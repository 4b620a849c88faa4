// prune: the score and prune stages, as a loop over rounds (docs/pruning.md).
//
// Round r scores the units of its kind in the current circuit C_r (head rounds first, then edge rounds
// inside the kept heads), keeps the best (prune_k[r] of them, or all but the lowest prune_fraction),
// measures C_r and the kept circuit C_{r+1}, and writes all of it to <output_path>/prune.d/round-NNN.h5
// and a line per round into model_logs.json before round r + 1 starts (the files: stages/circuit_file.h;
// one round as a work stage, its items, shards and merge: stages/prune_round.h). This module is the loop:
// the config's pruning fields (stages/run_config.h: run_prune, parsed and checked there; docs/config.md)
// and the identity of the rounds' inputs, which round is next and which circuit it starts from. A rerun
// verifies the finished round files (completion record, checksums, identity), continues from the first
// missing one and so gives exactly the files an uninterrupted run gives; round files made from another
// config are refused unless fresh. When pruning stops, the final circuit goes to circuit.json and
// circuit.txt. sched/ runs each round's work_stage (over MPI ranks, or in one process through
// prune_stage). Never calls MPI, never prints.
#ifndef EP_PRUNE_H
#define EP_PRUNE_H

#include "stages/stage_inputs.h"

typedef struct prune_run prune_run;
// Every rank: the config's pruning fields (max_rounds as for prune_stage).
int prune_open(stage_inputs *in, int max_rounds, prune_run **pr, ep_error *err);
void prune_close(prune_run *pr);
// Once, in one process, before the rounds: prune.d, temporaries of killed writers, and with fresh every
// round file, shard and summary.
int prune_prepare(prune_run *pr, int fresh, ep_error *err);
// Every rank, between rounds: walks the finished round files (their kept circuits), then 1 with ws set
// up for the next round to compute, or 0 when nothing is left (root also rewrites model_logs.json and,
// once pruning stopped, circuit.json and circuit.txt from the round files), -1 on error.
int prune_next_round(prune_run *pr, int root, work_stage *ws, ep_error *err);

// Runs (or resumes) the rounds in this process; max_rounds > 0 stops after that many round files exist (--until score
// is 1), -1 runs them all. stop_requested (optional; sched/ passes its signal flag) is asked between
// rounds: 1 is returned when it asked to stop (finished rounds are kept), 0 when done, -1 on error.
int prune_stage(stage_inputs *in, int fresh, int max_rounds, int (*stop_requested)(void), ep_error *err);

#endif
