// score: how well a circuit does and how much each of its units matters (docs/pruning.md).
//
// Owns: a circuit's metrics (stages/circuit.h: the circuit, its units and its plan), and the two scores
// of docs/design.md:
//   - attribution (the default): one forward + backward pass per batch of prompts with the targets
//     appended (pipeline/backward), |first-order change of the loss| per unit; eap-ig the same with the
//     gradients averaged along the path from the donor's embeddings to the prompt's (ig_steps passes);
//   - exact: metric(C) - metric(C without u), metric = mean log-probability of the first target token
//     at `last` (first-token accuracy and logit difference are recorded too), averaged over prompts and
//     over the first n_donors donors (evaluation j reads prompt donor (d + j) mod K where the plan says
//     donor d, K the prompts' donors: for the circuit's complement, donor j). The fast path runs the
//     circuit's pass once per batch with the residual stream captured, then for each unit only its own
//     layer from the stored stream (layers below cannot change), and the layers above for many units
//     at once, the batch replicated once per unit. It equals one full patched pass per unit (the
//     brute force, patch_run with the unit's plan), bitwise when units are not batched together.
//     With row reuse (EXACT_ROW_PREFIX, the prune rounds' path; docs/reuse.md) each unit recomputes only
//     the rows it can change, layer by layer from its own (score_unit_rows: its receivers or its head's
//     type, then whatever reads them through the circuit's edges), reading the circuit pass's keys, values
//     and residual stream everywhere else; exact_max_seqs / batch_size units go through each layer in one
//     call. Equal to the brute force to fp32 rounding (the products have other row counts).
// Promises: results depend only on the inputs and the batch size (batches are fixed prompt ranges,
// sums run in prompt order). Never prints, never calls MPI, writes no files (the prune stage does:
// stages/prune.h, stages/circuit_file.h).
// Rank statistics over scores are stages/rank.h.
#ifndef EP_SCORE_H
#define EP_SCORE_H

#include "stages/circuit.h"
#include "stages/patch.h"
#include "stages/stage_inputs.h"

typedef struct {
    double target_logprob, first_token_accuracy, logit_diff;  // means over prompts
} circuit_metrics;

// The circuit's metrics over every prompt (c NULL: the clean model, no base plan either).
int circuit_measure(const stage_inputs *in, const circuit *c, circuit_metrics *out, ep_error *err);

// Attribution scores of units (kept units of c, of one kind) over every prompt.
int score_attribution(const stage_inputs *in, const circuit *c, unit_kind kind, const circuit_unit *units, int n,
                      double *score, ep_error *err);
// EAP-IG scores (docs/attribution.md, "EAP-IG"): score_ig[u] = mean over prompts of |sum over the unit's
// positions or edges of the clean pass's differences . the gradients averaged over the ig_steps points
// a = k / ig_steps of the straight path from donor 0's embeddings to the prompt's|; the path's last point
// is the pass attribution takes, so score (optional) gets attribution's scores at no extra cost.
int score_eap_ig(const stage_inputs *in, const circuit *c, unit_kind kind, const circuit_unit *units, int n,
                 int ig_steps, double *score, double *score_ig, ep_error *err);

// exact_opts.prefix_reuse: what a unit's passes take from the circuit's pass.
enum {
    EXACT_BRUTE_FORCE = 0,   // nothing: one full patch_run per unit and batch
    EXACT_LAYER_PREFIX = 1,  // the layers below the unit's (the path before row reuse)
    EXACT_ROW_PREFIX = 2,    // those, and in the unit's layer and above every row the unit cannot change
                             // (stages/patch.h, "Reuse", patch_rows; docs/reuse.md): what the prune rounds use
};

typedef struct {
    int prefix_reuse;  // EXACT_*
    int max_seqs;      // sequences per pass when units are batched (<= batch_size: one unit per pass)
    int n_donors;      // donors averaged over, 1 .. the prompts' donors (0 counts as 1: donor 0 alone)
} exact_opts;

// stage_inputs.exact_plant (tests only): a planted error in EXACT_ROW_PREFIX scoring that its tests must catch.
enum {
    EXACT_PLANT_NONE = 0,
    EXACT_PLANT_OTHER_UNIT = 1,  // each unit but the first of a pass reads the residual stream rows, and reads
                                 // and writes the keys and values, of the unit before it in the pass
    EXACT_PLANT_ROW_SHORT = 2,   // each unit's first changed row of every sequence is taken from C, never recomputed
};

// The rows removing unit u (of kind) from the circuit can change in a batch, by layer (stages/patch.h,
// patch_rows): its receivers or its head's type in its layer, spread through carry (of the circuit's plan).
// What EXACT_ROW_PREFIX recomputes for u; r is initialised here (patch_rows_free).
void score_unit_rows(unit_kind kind, const circuit_unit *u, const prompt_batch *pb, int n_layers, const patch_carry *carry,
                     patch_rows *r);

// Exact scores: score[u] = metric(C) - metric(C without u) (target log-prob); optional `without` [n]
// gets each C-without-u's metrics and `with` C's.
int score_exact(const stage_inputs *in, const circuit *c, unit_kind kind, const circuit_unit *units, int n,
                const exact_opts *o, double *score, circuit_metrics *without, circuit_metrics *with, ep_error *err);

// The same per batch of prompts [first, first + S) under a circuit's plan, as sums over its prompts
// (the work items of the prune stage; the functions above are these over every batch in order):
// metric sums [3] (target log-prob, first-token correct, logit diff); attribution: sum[u] += the sum
// over the batch's prompts of unit u's |.|; exact: sums[u][3] += C-without-u's metric sums, base[3] +=
// C's, each summed over the o->n_donors donors too. score_exact_finish turns sums over P prompt-donor
// pairs (prompts x donors) into scores.
int score_check_targets(const stage_inputs *in, ep_error *err);
int circuit_measure_batch(const stage_inputs *in, const ablation_plan *plan, int first, int S, double *sums, ep_error *err);
int score_attribution_batch(const stage_inputs *in, const ablation_plan *plan, unit_kind kind, const circuit_unit *units,
                            int n, int first, int S, double *sum, ep_error *err);
// Both gradient scores of one batch (EAP-IG costs ig_steps forward + backward passes, attribution one, the
// path's last): sum[u] (optional) += attribution's, sum_ig[u] (optional: NULL runs attribution alone) +=
// EAP-IG's, each the sum over the batch's prompts of |.|.
int score_gradient_batch(const stage_inputs *in, const ablation_plan *plan, unit_kind kind, const circuit_unit *units,
                         int n, int ig_steps, int first, int S, double *sum, double *sum_ig, ep_error *err);
int score_exact_batch(const stage_inputs *in, const circuit *c, const ablation_plan *plan, unit_kind kind,
                      const circuit_unit *units, int n, const exact_opts *o, int first, int S, double *sums, double *base,
                      ep_error *err);
void score_exact_finish(const double *sums, const double *base, int n, int P, double *score, circuit_metrics *without,
                        circuit_metrics *with);

#endif
