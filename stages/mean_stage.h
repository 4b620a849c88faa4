// mean_stage: the mean donor's work before the cache stage, when a donor of the prompts is of kind mean
// (docs/donors.md). Items are chunks of MEAN_CHUNK prompts (fixed, not batch_size); each runs the clean
// passes of its prompts in batches of MEAN_BATCH (fixed too: a forward row's last bits depend on the rows
// batched with it) and stores the float64 sums per group (stages/mean_donor.h) in
// <output_path>/mean.d/item-NNNNN.h5: datasets keys [n, 3] (type, index, offset), count [n], k, v
// [n, layers, kv_heads, head_dim], z [n, layers, heads, head_dim]; attributes format, inputs_hash (the
// stage identity and the chunk's range), stage_hash, model_hash, first_prompt, n_prompts. mean_stage_load
// adds the chunks in chunk order into the table in->mean, so the table's bytes do not depend on the batch
// size, the rank count or resumes (a killed item leaves no shard and is recomputed).
#ifndef EP_MEAN_STAGE_H
#define EP_MEAN_STAGE_H

#include "stages/stage_inputs.h"

#define MEAN_ITEM_FORMAT "edgepatch-mean-item-1"
#define MEAN_BATCH 8

// The stage as work items (stages/work_stage.h); ws borrows in.
int mean_stage_work(stage_inputs *in, work_stage *ws, ep_error *err);
// Every chunk's shard, read in chunk order into in->mean (replacing a table loaded before).
int mean_stage_load(stage_inputs *in, ep_error *err);
// Both, in this process (cache_stage calls it when in->mean_donors is set and no table is loaded).
int mean_stage(stage_inputs *in, int fresh, ep_error *err);

#endif
