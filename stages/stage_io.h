// stage_io: what the model stages (cache, patch) share: opening a run's inputs (config, model,
// prompts, plan) once, slicing prompts into batches, the skip/refuse decision for an existing output,
// atomic text files, and the work-item form of a stage (work_stage) that a driver runs: here in order
// in one process (stage_run_items), or sharded over MPI ranks by sched/. Stages never call MPI.
#ifndef EP_STAGE_IO_H
#define EP_STAGE_IO_H

#include <jansson.h>

#include "pipeline/log.h"
#include "pipeline/model.h"
#include "stages/run_config.h"
#include "pipeline/tokenizer.h"
#include "stages/patch.h"
#include "stages/plan.h"
#include "stages/tokenize.h"

struct stage_inputs {
    const run_config *cfg;
    const ep_log *log;    // where the stages write their lines (NULL: nowhere); the caller's, outliving in
    model m;              // the checkpoint on the host: config, mapping, identity; fp32 weights only where they are
                          // used (a host backend, or attribution's CPU backward: stage_needs_host_weights)
    const kernel_ops *ops;  // the backend of the forward passes (config fields backend and dtype) ...
    model dev;              // ... and the model in its memory, as fp32 or bf16 (model_to_backend)
    prompt_set prompts;
    ablation_plan plan;
    ablation_plan *ablations;  // the config's "ablations" list: one patch pass each (stages/patch.h)
    int n_ablations;
    int n_cached_donors;  // donors the cache stage keeps: the plan's, and donor 0 when there are ablations
    char prompts_hash[17];  // prompts.h5's inputs_hash
    char model_hash[17];
    char plan_hash[17];
};

// The config's backend: field backend "auto" (the default: cuda when a usable GPU is present, else cpu),
// "cpu", "cuda" (an error without a usable GPU) or "offset" (the cpu kernels behind device-style memory,
// kernels/ops_offset.c, for testing device code paths). A driver asks before stage_inputs_open_shard, to
// build the device group for that backend's memory.
// An unusable GPU under "auto" is a warning on log.
int stage_backend(const run_config *cfg, const ep_log *log, const kernel_ops **ops, ep_error *err);
// Loads the model, the prompts and the plan, and puts the model on the config's backend (stage_backend);
// field dtype "fp32" (the default) or "bf16" (docs/cuda.md, "bf16 runs").
// On a device backend the host model holds weights (model_load_shard) only when stage_needs_host_weights
// says so; else it is opened without them (model_open_shard) and the device model is read from the mapping.
// log (may be NULL) is kept in in->log for the stages' lines.
int stage_inputs_open(const run_config *cfg, const ep_log *log, stage_inputs *in, ep_error *err);
// The same on backend ops (stage_backend's), holding only this rank's shard of the model: rank host->rank
// of a tensor-parallel group of host->size ranks (docs/tensor_parallel.md; NULL: one rank, the whole
// model). Every rank of the group runs the same passes together. The host model (in->m) computes with
// host's collectives (host buffers: attribution's backward pass); the model on ops (in->dev) with
// device's, made for ops' memory (the host group itself on a host backend). The driver builds both
// (sched/mpi_run.h, sched_open_groups); they must outlive in. A stage never makes a communicator.
int stage_inputs_open_shard(const run_config *cfg, const kernel_ops *ops, const ep_group *host, const ep_group *device,
                            const ep_log *log, stage_inputs *in, ep_error *err);
void stage_inputs_close(stage_inputs *in);
// 1 if a run of cfg may compute attribution scores (the backward pass runs on the CPU with the host
// model's fp32 weights): field importance "attribution" (the default for prune rounds; the prune stage
// scores round 0 even without prune_rounds) or compare_importance true.
int stage_needs_host_weights(const run_config *cfg);

// Prompts [first, first + n) as a batch (pointers into in->prompts).
prompt_batch stage_batch(const stage_inputs *in, int first, int n);

// An existing output at path: 1 if complete, passing its checksums and made from `identity` (skip), 0 if
// absent, unreadable or corrupted (rebuild; a warning on log says why), -1 with an error if made from other
// inputs and not `fresh`.
int stage_output_current(const char *path, const char *identity, int fresh, const ep_log *log, ep_error *err);

// mkdir -p.
int make_dirs(const char *path, ep_error *err);
int write_text_atomic(const char *path, const char *text, ep_error *err);
// A JSON object as an indented file (keys in insertion order, reals to 8 digits, final newline), atomically.
int write_json_atomic(const char *path, json_t *o, ep_error *err);

// A stage as independent work items (item i = prompts [i * batch_size, (i + 1) * batch_size)), each
// written to its own shard <output_path>/<stage>.d/item-NNNNN.h5, then merged into the final outputs.
// Which process runs which item, and in which order, never changes a byte of any output.
typedef struct work_stage work_stage;
struct work_stage {
    const char *name;  // "cache", "patch"
    int n_items;
    void *ctx;  // the stage's own
    const ep_log *log;  // where its lines go (the stage_inputs' log)
    // Once, in one process, before any item: 1 the final outputs are current (the driver then only checks
    // the shards, and computes and merges again only if one fails), 0 work
    // to do, -1 refused (outputs made from other inputs and not fresh). Makes the shard folder, removes
    // temporaries left by killed writers and, when fresh, the stage's old shards and outputs.
    int (*prepare)(work_stage *ws, int fresh, ep_error *err);
    // 1 if item's shard is complete, passes its checksums and was made from these inputs (skip it); 0
    // if absent, unfinished or corrupted (compute it; a warning on log says why); -1 refused (other inputs).
    int (*item_done)(work_stage *ws, int item, ep_error *err);
    // Computes item and commits its shard.
    int (*run_item)(work_stage *ws, int item, ep_error *err);
    // Once, in one process, after every item is done: reads the shards in item order into the final
    // outputs. With a tensor-parallel group the group's followers call it too (follower set): they take
    // part in any model pass it makes and write nothing.
    int (*finish)(work_stage *ws, ep_error *err);
    void (*release)(work_stage *ws);
    // Optional, set by the driver: run_item calls it once the item's data is written and before the
    // shard is committed (sched/ uses it for its crash tests).
    void (*before_commit)(void *arg, int item);
    void *driver_arg;
    // Set by the driver: 1 on the ranks of a tensor-parallel group other than its leader. They take part
    // in run_item's computation (the model is split over the group) but write nothing.
    int follower;
    // Set by run_item or finish when it failed because a shard it read (its own stage's or the cache's)
    // was missing, unreadable or failed a checksum although checked earlier in the run: the shard was
    // removed (stage_shard_damaged), and the driver runs the stages again from the one owning it, whose
    // item check recomputes it. Cleared by the driver when a stage starts.
    int shard_bad;
};

// The model stages as work items. The work_stage borrows in (keep it open until ws.release).
int cache_work(stage_inputs *in, work_stage *ws, ep_error *err);
int patch_work(stage_inputs *in, work_stage *ws, ep_error *err);
// The one-process driver: prepare, the items in order, finish.
int stage_run_items(work_stage *ws, int fresh, ep_error *err);

// Shard helpers for work stages.
void stage_item_path(const stage_inputs *in, const char *stage, int item, char *out, size_t size);
void stage_item_range(const stage_inputs *in, int item, int *first, int *n);
int stage_n_items(const stage_inputs *in);
// The identity an item shard carries: the stage's identity and the item's prompt range.
void stage_item_identity(const char *stage_identity, int first, int n, char out[17]);
// Makes <output_path>/<stage>.d and removes the stale temporaries there (stage_remove_temporaries) or,
// if fresh, every item shard and temporary.
int stage_shard_dir_prepare(const stage_inputs *in, const char *stage, int fresh, ep_error *err);

// Temporaries: every writer writes "<name>.tmp-<pid>" (its own process id) and renames it onto <name>
// when done, so a temporary whose pid is no live process of this host was left by a killed writer and is
// never finished. Removes those in dir and, depth levels down, in its folders (symbolic links are not
// followed); a temporary of a live process (another command writing the same folder now, e.g. `edgepatch
// report` while a run goes on) is left alone. names (NULL-terminated, or NULL for any): only
// temporaries of these file names. Adds the number removed to *removed (if not NULL). A run folder has
// one `edgepatch run` at a time (docs/artifacts.md): a writer on another host is not seen here.
int stage_remove_temporaries(const char *dir, int depth, const char *const *names, int *removed, ep_error *err);
// The pid of a temporary's name "<name>.tmp-<digits>", or 0 if name is no temporary's.
long stage_temporary_pid(const char *name);
// The item_done decision for the shard at path (see work_stage.item_done).
int stage_item_current(const char *path, const char *identity, const ep_log *log, ep_error *err);
// A shard read by run_item or finish failed as err says: its writer (not a follower) removes it and says
// so on ws->log; sets ws->shard_bad.
void stage_shard_damaged(work_stage *ws, const char *path, const ep_error *err);

#endif
