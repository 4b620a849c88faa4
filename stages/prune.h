// prune: the score and prune stages, as rounds (docs/pruning.md).
//
// Round r scores the units of its kind in the current circuit C_r (head rounds first, then edge rounds
// inside the kept heads), keeps the best (prune_k[r] of them, or all but the lowest prune_fraction),
// measures C_r and the kept circuit C_{r+1}, and writes all of it to <output_path>/prune.d/round-NNN.h5
// (through h5store: temporary name, fsync, rename, completion record) and a line per round into
// model_logs.json (rewritten atomically) before round r + 1 starts. A rerun verifies the finished round
// files (completion record, checksums, identity), continues from the first missing one and so gives
// exactly the files an uninterrupted run gives; round files made from another config are refused
// unless fresh. When pruning stops, the final circuit goes to circuit.json (loadable as a config's
// `circuit` field, plus a summary by edge type and layer) and circuit.txt (a table).
// Config: the pruning fields of stages/run_config.h (run_prune: importance, prune_rounds, prune_fraction,
// prune_k, prune_using_imp_scores, min_units, min_faithfulness, exact_max_seqs, score_donors,
// compare_importance, exact_units_per_item; docs/config.md), parsed and checked there. A round is a work_stage
// (stages/stage_inputs.h): its items are the prompt batches (times groups of exact_units_per_item units
// when exact scores run), each scoring its units over its prompts into a shard
// prune.d/round-NNN.d/item-NNNNN.h5 (float64 sums), so sched/ shares a round out over MPI ranks; its
// finish (one process) merges the shards in item order, prunes, measures the kept circuit and writes
// the round file. Never calls MPI.
#ifndef EP_PRUNE_H
#define EP_PRUNE_H

#include "stages/score.h"

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

// One round file as `edgepatch scores` shows it.
typedef struct {
    int round, n_units, pruned;
    unit_kind kind;
    char method[16], stop[32];
    circuit_unit *units;
    float *scores;
    circuit circuit, kept;  // the circuit the scores were taken in, and the one kept after the round
    float metrics[3][3];    // rows: circuit, kept, clean; columns: target log-prob, first-token accuracy, logit diff
    // compare_importance rounds (else compare_method is "" and compare_scores NULL): the other method's
    // scores and the rank agreement of attribution with exact: Spearman with the signed exact scores,
    // Spearman with |exact|, top-k overlap, k (the round's keep count).
    char compare_method[16];
    float *compare_scores;
    double agreement[4];
} prune_round;

// Reads <run>/prune.d/round-NNN.h5 (round < 0: the last one there).
int prune_round_load(const char *run_dir, int round, prune_round *r, ep_error *err);
void prune_round_free(prune_round *r);

#endif
