// comm: a communicator, the one place where ranks talk to each other. Every MPI and NCCL call of the
// program lives in comm.c. The work driver (sched/mpi_run) uses this interface; the forward and backward
// passes (tensor-parallel all-reduce and all-gather) see a communicator only as the runtime's
// collectives interface (pipeline/group.h, comm_group below), so stages and the model code never see MPI.
//
// Backends: single (one rank; every collective is a no-op or a copy, no library is touched), mpi
// (buffers in host memory, or in a device backend's memory staged through the host: comm_staged_view)
// and nccl (buffers in device memory of the CUDA backend; built when CUDA and NCCL are found,
// EP_HAVE_NCCL). A communicator is a group of ranks: the world, or a tensor-parallel group
// split from it. Collectives must be called by every rank of the group in the same order. Calls return 0
// or -1 with err filled (MPI's default handler aborts the job on a communication failure before that).
#ifndef EP_SCHED_COMM_H
#define EP_SCHED_COMM_H

#include <limits.h>
#include <stddef.h>

#include "pipeline/error.h"
#include "pipeline/group.h"

typedef enum { COMM_SINGLE = 0, COMM_MPI = 1, COMM_NCCL = 2 } comm_kind;

typedef struct ep_comm_s {
    comm_kind kind;
    int rank, size;
    void *handle;  // the backend's communicator (MPI_Comm *, ncclComm_t), opaque so no MPI header leaks
    const struct kernel_ops *staging;  // a staged view's device backend (comm_staged_view), else NULL
    const struct ep_comm_s *host;      // an NCCL communicator's MPI (or single) group, which carries its
                                       // host collectives (double sums: the attribution scores); else NULL
    size_t max_chunk;  // elements one MPI call of a size_t-count collective carries; 0: COMM_MAX_CHUNK (tests
                       // set a few to run the pieces on small buffers)
} ep_comm;

// MPI counts are ints: the mpi backend moves a size_t count in pieces of at most this many elements (half
// of INT_MAX leaves room for implementations that add to a count inside). NCCL counts are size_t already.
#define COMM_MAX_CHUNK ((size_t)INT_MAX / 2)

// The single-rank communicator (no MPI).
void comm_single(ep_comm *c);
// Starts MPI (thread level FUNNELED) and gives the world communicator.
int comm_world_init(int *argc, char ***argv, ep_comm *world, ep_error *err);
// Shuts MPI down (after every communicator split from the world is freed).
void comm_world_finalize(ep_comm *world);
// Ranks of `parent` with the same color form one group, ordered by key. Collective over parent.
int comm_split(const ep_comm *parent, int color, int key, ep_comm *out, ep_error *err);
// An NCCL communicator over the same ranks as `group` (an MPI or single communicator): rank 0 makes the
// unique id and broadcasts it over `group`. Runs on the GPU the CUDA backend picked for this rank (local
// rank mod GPUs on the node, docs/cuda.md). Fails in builds without NCCL or without a usable GPU. Its
// double sums (host buffers) go through `group`, which must stay where it is and outlive out.
int comm_nccl_init(const ep_comm *group, ep_comm *out, ep_error *err);
// 1 when this build has NCCL (comm_nccl_init can work on a machine with GPUs).
int comm_nccl_built(void);
// A view of `group` (mpi or single) whose f32 collectives take buffers in the memory of `ops`, a device
// backend: they are downloaded, reduced or gathered over MPI on the host, and uploaded back (Debian's
// Open MPI is not CUDA-aware, so it cannot read device buffers). For a split model on a device backend
// without NCCL: the offset test backend, a CUDA build without NCCL. The view borrows group's MPI
// communicator: it must not outlive group, and comm_free on it frees nothing of group's.
void comm_staged_view(const ep_comm *group, const struct kernel_ops *ops, ep_comm *view);
void comm_free(ep_comm *c);

// Collective over an mpi or single group: 0 if every rank's status is 0, else -1 on every rank, with err
// holding the message of the lowest failing rank, prefixed by its rank ("rank 1: ..."). `mine` is this
// rank's err (its message is read when status is non-zero). What a step that can fail on some ranks only
// runs before the next collective step, so that no rank waits forever for one that has returned.
int comm_agree(const ep_comm *c, int status, const ep_error *mine, ep_error *err);

// Collectives over the group. f32 buffers are in the backend's memory (host for mpi, device for nccl and
// for a staged view); int and double buffers are host memory and need an mpi or single communicator
// (an nccl one's double sums run on the group it was made from).
int comm_allreduce_sum_f32(const ep_comm *c, float *buf, size_t n, ep_error *err);  // in place
// recv[r * n .. (r + 1) * n) = rank r's send[0 .. n); recv must not overlap send.
int comm_allgather_f32(const ep_comm *c, const float *send, float *recv, size_t n, ep_error *err);
int comm_allreduce_sum_f64(const ep_comm *c, double *buf, size_t n, ep_error *err);  // in place
int comm_allreduce_max_i32(const ep_comm *c, int *buf, int n, ep_error *err);  // in place
int comm_allreduce_sum_i32(const ep_comm *c, int *buf, int n, ep_error *err);  // in place
int comm_bcast_i32(const ep_comm *c, int *buf, int n, int root, ep_error *err);

// c's collectives as the runtime's interface (pipeline/group.h): rank and size are c's, and the callbacks
// are comm_allreduce_sum_f32, comm_allgather_f32 and comm_allreduce_sum_f64 on c, so the memory of the
// f32 buffers is c's (host for mpi and single, device for nccl and a staged view). The group points to
// c (its ctx): c must stay where it is, and outlive the group.
ep_group comm_group(const ep_comm *c);

// Point to point, one int (mpi_run's progress and stop messages). src or tag -1: any.
int comm_send_i32(const ep_comm *c, int value, int dest, int tag, ep_error *err);
// Blocks for a message; *src_out and *tag_out (if non-NULL) say where it came from.
int comm_recv_i32(const ep_comm *c, int *value, int src, int tag, int *src_out, int *tag_out, ep_error *err);
// 1 if a matching message is waiting (it stays queued), else 0.
int comm_probe(const ep_comm *c, int src, int tag, int *src_out, int *tag_out);

#endif
