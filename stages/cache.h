// cache: the second stage. Runs the donor passes a run's plan needs (donor 0 clean; donors d > 0 under
// the plan's donor-0 part) and stores, per prompt and donor, the post-RoPE keys and values of every
// layer and KV head and every head's output before the output projection. One shard per work item
// (a batch of batch_size prompts), <output_path>/cache.d/item-NNNNN.h5: datasets
// prompt<p>/donor<d>/{k [L, T, kv_heads, head_dim], v, z [L, T, heads, head_dim]} (fp32 or bf16, p the
// run's prompt index; dimension labels and the rest: docs/artifacts.md); attributes format, inputs_hash (the stage identity and the item's prompt range),
// stage_hash, model_hash, plan_hash, plan, item, first_prompt, n_prompts, n_donors. The patch stage
// reads the shard of its own item; the stage is complete when every shard is.
#ifndef EP_CACHE_H
#define EP_CACHE_H

#include "stages/stage_inputs.h"

// The shards' format: 2 stores k, v and z per head (4-D); a shard of format 1 (flat 3-D) is recomputed.
#define CACHE_ITEM_FORMAT "edgepatch-cache-item-2"

// The cache stage as work items (stages/work_stage.h); ws borrows in (keep it open until ws.release).
int cache_work(stage_inputs *in, work_stage *ws, ep_error *err);
// Every item in order, in this process (sched/ shards the same work_stage, cache_work, over ranks).
int cache_stage(stage_inputs *in, int fresh, ep_error *err);
// Loads work item `item`'s donors 0 .. n_donors-1 into caches in in->ops' memory, aligned with stage_batch
// of its range. *damaged is set to 1 when the failure is the shard's own (missing, unreadable, unfinished,
// a dataset failing its checksum): the cache stage recomputes such a shard on its next run.
int cache_load_item(const stage_inputs *in, int item, kv_cache *donors, int *damaged, ep_error *err);
// The identity of the cache stage for these inputs (each shard carries it with its range).
void cache_identity(const stage_inputs *in, char out[17]);

#endif
