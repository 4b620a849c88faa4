// stage_inputs: what the model stages (cache, patch, the prune rounds) share: a run's inputs (config,
// model on its backend, prompts, plan) opened once, prompts sliced into batches, and the skip/refuse
// decision for an existing output. The work-item form of a stage is stages/work_stage.h.
#ifndef EP_STAGE_INPUTS_H
#define EP_STAGE_INPUTS_H

#include <jansson.h>

#include "pipeline/log.h"
#include "pipeline/model.h"
#include "stages/run_config.h"
#include "pipeline/tokenizer.h"
#include "stages/patch.h"
#include "stages/plan.h"
#include "stages/tokenize.h"
#include "stages/work_stage.h"

struct stage_inputs {
    const run_config *cfg;
    const ep_log *log;    // where the stages write their lines (NULL: nowhere); the caller's, outliving in
    model m;              // the checkpoint on the host: config, mapping, identity; fp32 weights only for a host
                          // backend (where in->dev borrows them)
    const kernel_ops *ops;  // the backend of the forward passes (config fields backend and dtype) ...
    model dev;              // ... and the model in its memory, as fp32 or bf16 (model_to_backend)
    prompt_set prompts;
    ablation_plan plan;
    ablation_plan *ablations;  // the config's "ablations" list: one patch pass each (stages/patch.h)
    int n_ablations;
    int n_cached_donors;  // donors the cache stage keeps: the plan's, and donor 0 when there are ablations
    uint32_t mean_donors;  // bit d: the prompts' donor d is of kind mean (stages/mean_stage.h)
    mean_table *mean;      // the run's mean table, once the mean stage has run (mean_stage_load); owned
    char prompts_hash[17];  // prompts.h5's inputs_hash
    char model_hash[17];
    char plan_hash[17];
    int full_passes;  // 1: every patched pass runs whole, none derived from another (stages/patch.h,
                      // "Reuse"): the path before reuse, for tests and benchmarks; no config field sets it
    int exact_plant;  // tests only, 0 otherwise: a planted error in EXACT_ROW_PREFIX scoring (stages/score.h,
                      // EXACT_PLANT_*), the can-fail siblings of its tests
};

// The config's backend: field backend "auto" (the default: cuda when a usable GPU is present, else cpu),
// "cpu", "cuda" (an error without a usable GPU) or "offset" (the cpu kernels behind device-style memory,
// kernels/ops_offset.c, for testing device code paths). A driver asks before stage_inputs_open_shard, to
// build the device group for that backend's memory.
// An unusable GPU under "auto" is a warning on log.
int stage_backend(const run_config *cfg, const ep_log *log, const kernel_ops **ops, ep_error *err);
// Loads the model, the prompts and the plan, and puts the model on the config's backend (stage_backend);
// field dtype "fp32" (the default) or "bf16" (docs/cuda.md, "bf16 runs").
// On a device backend the host model is opened without weights (model_open_shard) and the device model is
// read from the mapping; every pass (forward, donor, patched, attribution's backward) runs on in->dev.
// log (may be NULL) is kept in in->log for the stages' lines.
int stage_inputs_open(const run_config *cfg, const ep_log *log, stage_inputs *in, ep_error *err);
// The same on backend ops (stage_backend's), holding only this rank's shard of the model: rank host->rank
// of a tensor-parallel group of host->size ranks (docs/tensor_parallel.md; NULL: one rank, the whole
// model). Every rank of the group runs the same passes together. host gives the shard's rank and size
// (in->m.group); the model on ops (in->dev), which every pass computes with, sums through device's
// collectives, made for ops' memory (the host group itself on a host backend; an NCCL group sums the
// scores' host doubles over the MPI group it was made from). The driver builds both
// (sched/mpi_run.h, sched_open_groups); they must outlive in. A stage never makes a communicator.
int stage_inputs_open_shard(const run_config *cfg, const kernel_ops *ops, const ep_group *host, const ep_group *device,
                            const ep_log *log, stage_inputs *in, ep_error *err);
void stage_inputs_close(stage_inputs *in);

// Prompts [first, first + n) as a batch (pointers into in->prompts).
prompt_batch stage_batch(const stage_inputs *in, int first, int n);

// An existing output at path: 1 if complete, passing its checksums and made from `identity` (skip), 0 if
// absent, unreadable or corrupted (rebuild; a warning on log says why), -1 with an error if made from other
// inputs and not `fresh`.
int stage_output_current(const char *path, const char *identity, int fresh, const ep_log *log, ep_error *err);

#endif
