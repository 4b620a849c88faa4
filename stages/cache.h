// cache: the second stage. Runs the donor passes a run's plan needs (donor 0 clean; donors d > 0 under
// the plan's donor-0 part) and stores, per prompt and donor, the post-RoPE keys and values of every
// layer and KV head and every head's output before the output projection, in <output_path>/cache.h5:
// datasets prompt<p>/donor<d>/{k [L, T, kv_heads*head_dim], v, z [L, T, heads*head_dim]} (fp32), one
// group per prompt so a batch reads only its own; attributes format, inputs_hash (prompts, model,
// plan), n_prompts, n_donors, model_hash, plan_hash.
#ifndef EP_CACHE_H
#define EP_CACHE_H

#include "stages/stage_io.h"

int cache_stage(stage_inputs *in, int fresh, ep_error *err);
// Loads prompts [first, first + n)'s donors 0 .. n_donors-1 into caches aligned with stage_batch.
int cache_load_batch(const char *path, const stage_inputs *in, int first, int n, kv_cache *donors, ep_error *err);
// The identity cache.h5 must carry for these inputs.
void cache_identity(const stage_inputs *in, char out[17]);

#endif
