// mpi_run: the work driver over ranks (its messages go through sched/comm, the one module that calls
// MPI). It starts MPI when the program was launched by mpirun or srun (or EDGEPATCH_MPI=1), and
// otherwise runs as a single process without touching MPI, exactly as an unlaunched `edgepatch run`
// always did. Ranks form groups of tensor_parallel consecutive ranks (one model split over a group,
// docs/tensor_parallel.md; groups of one without it). It drives a stage's work items
// (stages/work_stage.h) over the groups:
//   - prepare runs on rank 0 (shard folder, stale temporaries, --fresh), the others wait for it;
//   - item i belongs to group i % n_groups; each group's leader checks its own items' shards (complete,
//     checksums, inputs) and tells its group which to compute, in increasing order; every rank of the
//     group runs each item (the model is split over them), the leader alone writes its shard;
//   - ranks report each finished item and their final status to rank 0 (point to point), which shows
//     progress, tells everyone to stop when a rank fails or is interrupted, and decides the outcome;
//   - when every item is done, rank 0 runs finish (merging shards in item order) and shares its status.
// Outputs therefore never depend on the number of ranks. The output folder must be visible to every
// rank (one node, or a shared file system). A rank killed outright ends the whole job (mpirun and
// srun do that); the shards already committed stay valid and a restart resumes from them.
#ifndef EP_SCHED_MPI_RUN_H
#define EP_SCHED_MPI_RUN_H

#include "kernels/ops.h"
#include "pipeline/error.h"
#include "pipeline/group.h"
#include "sched/comm.h"
#include "sched/progress.h"
#include "sched/signals.h"
#include "stages/work_stage.h"

// Outcomes, ordered: the most severe of all ranks wins. SCHED_RETRY: a shard read during the stage was
// found damaged and removed (work_stage.shard_bad); running the stages again from the one that owns it
// recomputes it.
enum { SCHED_OK = 0, SCHED_RETRY = 1, SCHED_STOPPED = 2, SCHED_FAILED = 3 };

typedef struct {
    int rank, size;
    int mpi;  // 1 if MPI was started here (and must be finalized)
    ep_comm world;
    ep_comm group;  // this rank's tensor-parallel group (single until sched_set_tensor_parallel)
    ep_comm device;  // group's communicator for buffers in a device backend's memory (sched_open_groups)
    ep_group host_group, device_group;  // group's and device's collectives for the model (sched_open_groups)
    int n_groups, group_id;
    progress prog;
    const ep_log *log;  // where the driver's lines and progress go (set by the caller after sched_init; NULL: nowhere)
    // Test hooks (EDGEPATCH_TEST_ITEM_DELAY_MS, EDGEPATCH_TEST_KILL; docs/distribution.md).
    int delay_ms;
    char kill_stage[32];
    int kill_rank, kill_after, kill_in_write;  // kill_rank -1: every rank, -2: hook off
    const char *stage;
    int stage_items;  // items this rank finished in the current stage
    int stage_pending;  // items of the current stage to compute over all ranks (0: every shard was current)
} sched_ctx;

// Starts MPI if launched by an MPI launcher; installs the stop signals. Fails only if MPI does. A start
// that does not return in time (a rank of the job killed meanwhile) ends the process (sched/watchdog.h).
int sched_init(sched_ctx *sc, int *argc, char ***argv, ep_error *err);
// Shuts MPI down; exit_status is what the process will return, and what it exits with if MPI_Finalize
// does not return in time (sched/watchdog.h).
void sched_finalize(sched_ctx *sc, int exit_status);
// Splits the ranks into groups of tp consecutive ranks (group g: ranks g * tp ..). Fails, naming the
// config file's field, unless tp divides the number of ranks. Every rank must call it.
int sched_set_tensor_parallel(sched_ctx *sc, int tp, const char *config_path, ep_error *err);

// The collectives a split model's passes use (pipeline/group.h), built by the driver for backend ops so
// that no stage makes a communicator: host_group, group's on host buffers (the host model, attribution's
// backward pass); device_group, for buffers in ops' memory (the model on ops): an NCCL communicator over
// group's ranks on the cuda backend when the build has NCCL, else group staged through host memory
// (comm_staged_view: the offset backend, a CUDA build without NCCL), and host_group itself on a host
// backend or for a group of one. After sched_set_tensor_parallel; collective over the group (NCCL's
// set-up, and a check that either every rank of the group or none uses NCCL: a rank whose "auto" backend
// found no GPU fails the group instead of leaving the others in NCCL's set-up). Fails the same on every
// rank of the group. The groups point into sc (sc must stay where it is); freed by
// sched_close_groups or sched_finalize.
int sched_open_groups(sched_ctx *sc, const kernel_ops *ops, ep_error *err);
void sched_close_groups(sched_ctx *sc);

// The most severe status over the ranks (a rank's stop request counts as SCHED_STOPPED). Every rank
// must call it at the same point; without MPI it is status itself (or STOPPED on a signal).
int sched_agree(sched_ctx *sc, int status);

// Runs ws over the ranks as described above. Returns SCHED_OK, SCHED_RETRY, SCHED_STOPPED or
// SCHED_FAILED, the same on every rank. On failure rank 0's err says what failed (a failing rank other than 0 writes its own
// message to sc->log as an error, prefixed with its rank, and rank 0's err points to it).
int sched_run_stage(sched_ctx *sc, work_stage *ws, int fresh, ep_error *err);

#endif
