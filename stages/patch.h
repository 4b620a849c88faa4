// patch: patched forward passes over a batch of prompts under an ablation plan, with greedy generation.
//
// patch_run does, for one batch: donor 0's clean pass (keys, values and head outputs kept); for each
// donor d > 0 that the plan reads, a pass over donor d's tokens in which the plan's donor-0 part is
// applied with donor 0's cache (the original's "ablate differently for different tokens"); then the
// patched prompt pass, and greedy generation in which generated tokens run unpatched.
// A patched pass can also start from the pass it differs from (the clean pass, a circuit's pass) and
// recompute only the rows and layers its patch reaches ("Reuse" below; docs/reuse.md).
#ifndef EP_PATCH_H
#define EP_PATCH_H

#include <stdint.h>

#include "pipeline/generate.h"
#include "stages/plan.h"
#include "stages/work_stage.h"

typedef struct mean_table mean_table;  // stages/mean_donor.h

typedef struct {
    int n_seqs, max_len, n_donors;
    const int32_t *tokens;   // [n_seqs][max_len]
    const int32_t *lengths;  // [n_seqs]
    const int32_t *types, *index;  // [n_seqs][max_len]
    const int32_t *donors;   // [n_seqs][n_donors][max_len]
    uint32_t mean_donors;    // bit d: donor d is the mean donor (kind "mean"): no pass over its tokens, its
                             // cache is filled from `mean` (docs/donors.md)
    const mean_table *mean;  // the run's mean table (NULL when no donor is the mean donor)
} prompt_batch;

typedef struct {
    float *logits;       // optional out [n_seqs][max_len][vocab]: every prompt position
    float *last_logits;  // optional out [n_seqs][vocab]: the last prompt position
    int max_new;         // tokens to generate (0: none)
    int *generated;      // out [n_seqs][max_new]
    int *n_generated;    // out [n_seqs]
    const int *stop_ids;
    int n_stop_ids;
    // optional out: the attention statistics of the prompt pass at `last` (forward_attn_stats), every layer
    // and query head, mass over the prompt token types bos .. last (PATCH_ATTN_TYPES)
    float *attn_entropy;  // [n_seqs][n_layers][n_heads]
    float *attn_mass;     // [n_seqs][n_layers][n_heads][PATCH_ATTN_TYPES]
    // optional out [n_seqs]: the last position's next-token figures (kernel_ops.logit_metrics) for target
    // token targets[s] (host memory, [n_seqs], required with it). patch_prompt_pass, asked for these alone
    // (no logits, no last_logits, no generation), keeps the last logits in the backend's memory and reduces
    // them there, so a device backend copies back these few numbers instead of [n_seqs][vocab] floats; the
    // figures are the same bytes as metrics_first_token's on the host backends either way. Every other pass
    // taking patch_outputs (patch_prompt_pass with logits or generation, the derived passes) fills it from
    // the host copy of the last logits with the same host reduction.
    logit_row_metrics *row_metrics;
    const int *targets;
} patch_outputs;

#define PATCH_ATTN_TYPES 7  // bos, x, t, y, n, query, last (stages/prompts.h token_type up to TT_LAST)

// The donor passes the plan needs, into donors[0 .. plan->n_donors) (initialised here, with head outputs).
// A mean donor d (pb->mean_donors) is filled from pb->mean, never nested: it is the mean of clean passes.
int patch_donor_passes(const model *m, const kernel_ops *ops, const ablation_plan *plan, const prompt_batch *pb,
                       kv_cache *donors, ep_error *err);
// The clean pass over the batch's prompts into `clean` (initialised here, with head outputs): what the mean
// donor averages.
int patch_clean_pass(const model *m, const kernel_ops *ops, const prompt_batch *pb, kv_cache *clean, ep_error *err);
// The patched prompt pass reading those donors, then generation.
int patch_prompt_pass(const model *m, const kernel_ops *ops, const ablation_plan *plan, const prompt_batch *pb,
                      const kv_cache *donors, patch_outputs *out, ep_error *err);
// Both.
int patch_run(const model *m, const kernel_ops *ops, const ablation_plan *plan, const prompt_batch *pb,
              patch_outputs *out, ep_error *err);

// ---- Reuse (docs/reuse.md). A patch of edges into receivers B, or of head outputs at B, leaves every
// position before the first such B and every layer below the first patched layer exactly as in the pass
// it was derived from (causality: attention reads only earlier positions of its own layer). A patched pass
// can therefore start from that pass: its keys and values before the first patched row, its residual
// stream entering the first patched layer, and recompute only the rows and layers that can differ.
//
// The reach of a patch: what it can change relative to the pass it derives from.
typedef struct {
    int n_seqs, n_layers;
    int first_layer;  // the lowest layer with a patched edge or head output (n_layers: none)
    int *first_row;   // [n_seqs]: the first position that receives a patched edge or head output (the
                      // prompt's length: none in that sequence)
} patch_reach;

// Nothing reached yet.
void patch_reach_init(patch_reach *r, const prompt_batch *pb, int n_layers);
void patch_reach_free(patch_reach *r);
// Adds the edges of `layer` from senders of a type in `senders` to receivers of a type in `receivers`
// (bit t: token type t) under relation (kernels/edge_rule.h): a receiver counts from the first position
// of its type that has such a sender at or before it (conservative: heads and windows are not looked at).
void patch_reach_add_edges(patch_reach *r, const prompt_batch *pb, int layer, uint32_t senders, uint32_t receivers,
                           int relation);
// Adds a head output at every position of token type `type` in `layer`.
void patch_reach_add_head(patch_reach *r, const prompt_batch *pb, int layer, int type);
// Adds what plan changes relative to the clean pass: every rule that reads a donor (plan_rule_patches; a
// keep rule, donor -1, changes nothing) and every head unit with a donor, in their layers, whatever their
// priority, so the reach is exact for any plan (a circuit's keep rules before its "ablate the rest" rule
// reach row 0).
void patch_reach_add_plan(patch_reach *r, const ablation_plan *plan, const prompt_batch *pb);

// The rows a change can reach, layer by layer: finer than patch_reach, it follows the plan's edges. A row
// whose residual stream differs entering layer l has other keys and values there; a row B then differs
// leaving l if it differs entering, or if it reads such a row A <= B through an edge of some head that
// takes A's current key or value under the plan (clean, or a k- or v-only rule: one of the two is the
// current pass's) and whose output at B no head unit replaces. An edge reading a donor's key and value, or
// removed (zero), carries nothing. Rows of no changed row's reach keep the pass's values in every layer.
// The edges are looked at by type pair and relation only (heads and windows are not: conservative).
//
// Which edges carry: reads[l][type A][type B][relation class] (same, earlier, neither: the example
// indices), computed once per plan and batch from its rules and head units (patch_carry_init).
typedef struct {
    int n_layers, n_types;  // types 0 .. n_types - 1 (the batch's; an untyped or larger type always carries)
    unsigned char *reads;   // [n_layers][n_types][n_types][3]
} patch_carry;

void patch_carry_init(patch_carry *c, const ablation_plan *plan, const prompt_batch *pb);
void patch_carry_free(patch_carry *c);

typedef struct {
    int n_seqs, max_len, n_layers;
    int first_layer;       // the lowest layer with a changed row (n_layers: none)
    unsigned char *rows;   // [n_layers][n_seqs][max_len]: 1 where the stream leaving layer l can differ
} patch_rows;

void patch_rows_init(patch_rows *r, const prompt_batch *pb, int n_layers);
void patch_rows_free(patch_rows *r);
// Seeds, in `layer`: the receivers of the edges from senders of a type in `senders` to receivers of a type
// in `receivers` under relation (each receiver with such a sender at or before it), or every position of
// token type `type` (a head unit's output).
void patch_rows_seed_edges(patch_rows *r, const prompt_batch *pb, int layer, uint32_t senders, uint32_t receivers,
                           int relation);
void patch_rows_seed_head(patch_rows *r, const prompt_batch *pb, int layer, int type);
// Spreads the seeds up through the layers above the first (carry: the plan those layers run under).
void patch_rows_spread(patch_rows *r, const prompt_batch *pb, const patch_carry *carry);
// Rows x layers marked (the work of a derived pass).
long patch_rows_count(const patch_rows *r);

// A prompt pass kept whole for others to derive from: its cache (every layer at the prompt's positions;
// capacity for max_new more), the residual stream entering every layer and leaving the last (host,
// [n_layers + 1][T][hidden], the batch's T rows packed), and the last position's logits.
typedef struct {
    kv_cache cache;
    float *resid;
    float *last_logits;  // [n_seqs][vocab]
    float *attn_entropy;  // its attention statistics at `last` (patch_outputs): [n_seqs][n_layers][n_heads]
    float *attn_mass;     // [n_seqs][n_layers][n_heads][PATCH_ATTN_TYPES]
    int n_rows;
} patch_base;

// plan's prompt pass (reading donors, as patch_prompt_pass) kept as a base.
int patch_base_run(const model *m, const kernel_ops *ops, const ablation_plan *plan, const prompt_batch *pb,
                   const kv_cache *donors, int max_new, patch_base *b, ep_error *err);
void patch_base_free(patch_base *b);

// The patched prompt pass of plan, derived from base: base must be the pass of a plan that agrees with
// `plan` outside `reach` (reach NULL: the reach of plan itself, patch_reach_add_plan, for a base that is
// the clean pass). Rows before first_row[s] of every layer, and every row of the layers below first_layer,
// are base's; the others are recomputed in one pass from first_layer (residual stream from base), then
// generation runs on the recomputed cache. out->logits (every position) must be NULL. The same results
// as patch_prompt_pass up to fp32 rounding of the shorter matrix products (docs/reuse.md).
int patch_prompt_pass_from(const model *m, const kernel_ops *ops, const ablation_plan *plan, const prompt_batch *pb,
                           const kv_cache *donors, const patch_base *base, const patch_reach *reach,
                           patch_outputs *out, ep_error *err);

// Many plans' prompt passes, each derived from base as patch_prompt_pass_from does (reach: each plan's
// own), their generations decoded together, up to PATCH_DECODE_SEQS sequences a step (generation steps
// of few rows cost what the weights take to read). Every outs[i] asks for the same max_new, no logits.
#define PATCH_DECODE_SEQS 64
int patch_prompt_passes_from(const model *m, const kernel_ops *ops, int n, const ablation_plan *const *plans,
                             const prompt_batch *pb, const kv_cache *donors, const patch_base *base, patch_outputs *outs,
                             ep_error *err);

// 1 when an edge rule changes the edges it matches (reads a donor, kv, k- or v-only, or removes them: a
// zero rule, kernels/edge_rule.h): the one place that says so.
int plan_rule_patches(const edge_rule *r);

// Every pass of a work item is derived from the item's clean pass (stage_inputs.full_passes: each whole).
// The patch stage: the run's plan (and, when it ablates anything, the clean model too), then each of
// the config's ablations (stages/plan.h), over every prompt, donors read from the cache shards, per-prompt metrics (stages/metrics.h) per work item into
// <output_path>/patch.d/item-NNNNN.h5 (same groups, the item's rows), merged in item order into
// <output_path>/patch.h5 (groups plan/ and clean/: correct, first_token_correct, target_logprob,
// logit_diff [P], generated [P, max_new] padded with -1; ablation-NNN/ the same per ablation) and the
// run figures into model_logs.json (docs/artifacts.md).
typedef struct stage_inputs stage_inputs;
// As work items (stages/work_stage.h); ws borrows in (keep it open until ws.release).
int patch_work(stage_inputs *in, work_stage *ws, ep_error *err);
// Every item in order, in this process.
int patch_stage(stage_inputs *in, int fresh, ep_error *err);

#endif
