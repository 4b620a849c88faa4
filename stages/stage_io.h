// stage_io: what the model stages (cache, patch) share: opening a run's inputs (config, model,
// prompts, plan) once, slicing prompts into batches, the skip/refuse decision for an existing output,
// and atomic text files.
#ifndef EP_STAGE_IO_H
#define EP_STAGE_IO_H

#include "pipeline/model.h"
#include "pipeline/run_config.h"
#include "pipeline/tokenizer.h"
#include "stages/patch.h"
#include "stages/plan.h"
#include "stages/tokenize.h"

struct stage_inputs {
    const run_config *cfg;
    model m;
    prompt_set prompts;
    ablation_plan plan;
    char prompts_hash[17];  // prompts.h5's inputs_hash
    char model_hash[17];
    char plan_hash[17];
};

int stage_inputs_open(const run_config *cfg, stage_inputs *in, ep_error *err);
void stage_inputs_close(stage_inputs *in);

// Prompts [first, first + n) as a batch (pointers into in->prompts).
prompt_batch stage_batch(const stage_inputs *in, int first, int n);

// An existing output at path: 1 if complete and made from `identity` (skip), 0 if absent or unreadable
// (rebuild), -1 with an error if made from other inputs and not `fresh`.
int stage_output_current(const char *path, const char *identity, int fresh, ep_error *err);

int write_text_atomic(const char *path, const char *text, ep_error *err);

#endif
