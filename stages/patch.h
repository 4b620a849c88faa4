// patch: patched forward passes over a batch of prompts under an ablation plan, with greedy generation.
//
// patch_run does, for one batch: donor 0's clean pass (keys, values and head outputs kept); for each
// donor d > 0 that the plan reads, a pass over donor d's tokens in which the plan's donor-0 part is
// applied with donor 0's cache (the original's "ablate differently for different tokens"); then the
// patched prompt pass, and greedy generation in which generated tokens run unpatched.
#ifndef EP_PATCH_H
#define EP_PATCH_H

#include <stdint.h>

#include "pipeline/generate.h"
#include "stages/plan.h"
#include "stages/work_stage.h"

typedef struct {
    int n_seqs, max_len, n_donors;
    const int32_t *tokens;   // [n_seqs][max_len]
    const int32_t *lengths;  // [n_seqs]
    const int32_t *types, *index;  // [n_seqs][max_len]
    const int32_t *donors;   // [n_seqs][n_donors][max_len]
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
} patch_outputs;

#define PATCH_ATTN_TYPES 7  // bos, x, t, y, n, query, last (stages/prompts.h token_type up to TT_LAST)

// The donor passes the plan needs, into donors[0 .. plan->n_donors) (initialised here, with head outputs).
int patch_donor_passes(const model *m, const kernel_ops *ops, const ablation_plan *plan, const prompt_batch *pb,
                       kv_cache *donors, ep_error *err);
// The patched prompt pass reading those donors, then generation.
int patch_prompt_pass(const model *m, const kernel_ops *ops, const ablation_plan *plan, const prompt_batch *pb,
                      const kv_cache *donors, patch_outputs *out, ep_error *err);
// Both.
int patch_run(const model *m, const kernel_ops *ops, const ablation_plan *plan, const prompt_batch *pb,
              patch_outputs *out, ep_error *err);

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
