// work_stage: the work-item form of a stage, which a driver runs: here in order in one process
// (stage_run_items), or sharded over MPI ranks by sched/ (sched/mpi_run.h). Stages never call MPI. Also
// the helpers of the model stages' items (prompt batches) and their shards.
#ifndef EP_WORK_STAGE_H
#define EP_WORK_STAGE_H

#include <stddef.h>

#include "pipeline/error.h"
#include "pipeline/log.h"

typedef struct stage_inputs stage_inputs;

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

// The one-process driver: prepare, the items in order, finish.
int stage_run_items(work_stage *ws, int fresh, ep_error *err);

// Shard helpers for work stages.
void stage_item_path(const stage_inputs *in, const char *stage, int item, char *out, size_t size);
void stage_item_range(const stage_inputs *in, int item, int *first, int *n);
int stage_n_items(const stage_inputs *in);
// The identity an item shard carries: the stage's identity and the item's prompt range.
void stage_item_identity(const char *stage_identity, int first, int n, char out[17]);
// Makes <output_path>/<stage>.d and removes the stale temporaries there (remove_temporaries, pipeline/files.h) or,
// if fresh, every item shard and temporary.
int stage_shard_dir_prepare(const stage_inputs *in, const char *stage, int fresh, ep_error *err);
// The item_done decision for the shard at path (see work_stage.item_done). A shard whose root attribute
// format is not `format` (an older layout) is recomputed, as a damaged one is.
int stage_item_current(const char *path, const char *identity, const char *format, const ep_log *log, ep_error *err);
// A shard read by run_item or finish failed as err says: its writer (not a follower) removes it and says
// so on ws->log; sets ws->shard_bad.
void stage_shard_damaged(work_stage *ws, const char *path, const ep_error *err);

#endif
