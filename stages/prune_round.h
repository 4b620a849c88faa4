// prune_round (private to the prune stage: stages/prune.c and stages/prune_round.c): one round as a
// work stage (stages/work_stage.h), and what the rounds of one run share.
//
// Round r scores the units of its kind in the circuit it starts from, C_r. Its items are the prompt
// batches (times groups of exact_units_per_item units when exact scores run): item i scores its units
// over its prompts into the shard prune.d/round-NNN.d/item-NNNNN.h5 (float64 sums, format
// edgepatch-prune-item-1), so sched/ shares a round out over MPI ranks. Its finish (one process; a
// tensor-parallel follower only joins the passes) merges the shards in item order, turns the sums into
// scores (or takes an earlier run's, prune_using_imp_scores), keeps the best (prune_k[r] of them, or all
// but the lowest prune_fraction), measures C_r and the kept circuit C_{r+1}, decides whether pruning
// stops, and writes the round file and model_logs.json (stages/circuit_file.h). The loop over rounds
// (which round is next, which circuit it starts from, the final circuit files) is stages/prune.c.
// Never calls MPI, never prints (its lines go to the stage's log).
#ifndef EP_PRUNE_ROUND_H
#define EP_PRUNE_ROUND_H

#include "stages/circuit_file.h"
#include "stages/score.h"
#include "stages/stage_inputs.h"

// What the rounds use of the config's pruning fields (stages/run_config.h, checked there), as ints, and
// the identity of everything a round's result depends on.
typedef struct {
    const char *importance;  // "attribution" | "exact" | "eap-ig"
    int ig_steps;            // eap-ig's path points (0 for the other methods)
    int head_rounds, edge_rounds;
    double fraction;
    int n_k, *k;                 // prune_k
    int n_files;                 // prune_using_imp_scores
    const char **files;
    int min_units;
    double min_faithfulness;
    int exact_max_seqs;
    int exact_units_per_item;  // exact rounds: units per work item (items are prompt batches x unit groups)
    int score_donors;  // exact scores average over donors 0 .. score_donors - 1
    int compare;       // compare_importance: every scored round computes both methods' scores
    char identity[17];
} prune_params;

// Test hook (docs/pruning.md): EDGEPATCH_TEST_KILL_ROUND=N[:mid|:write] sends SIGKILL to this process
// once it has computed N rounds: before the next round (where ""), in the middle of it ("mid": scores
// merged, nothing measured) or while writing it ("write": the round file written, not committed).
typedef struct {
    int after;  // -1: no hook
    char where[8];
} prune_kill_hook;

// What every round of one run reads, and what the rounds carry from one to the next; the loop owns it.
typedef struct {
    const stage_inputs *in;
    prune_params p;
    int n_rounds;           // head_rounds + edge_rounds, or 1 (a scores-only round) when both are 0
    int computed;           // rounds this process has computed and written
    circuit_metrics clean;  // the clean model's metrics, measured by the first round this process finishes
    int have_clean;
    prune_kill_hook kh;
} prune_env;

// Sets ws up as round r (its kind: head rounds first, then edge rounds), scoring the units of circuit c
// (copied; an edge round brings edge units into play if c has none yet). path and identity are the round
// file's; current: the round file is already current (the driver then only checks the shards and redoes
// a damaged one). env must outlive ws. 0, or -1 with nothing to release (no units left, a bad plan).
int prune_round_stage(prune_env *env, int r, const circuit *c, const char *path, const char *identity, int current,
                      work_stage *ws, ep_error *err);

#endif
