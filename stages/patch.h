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
} patch_outputs;

int patch_run(const model *m, const kernel_ops *ops, const ablation_plan *plan, const prompt_batch *pb,
              patch_outputs *out, ep_error *err);

#endif
