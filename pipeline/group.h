// group: the collectives a tensor-parallel shard's passes need (docs/tensor_parallel.md), as an
// interface the runtime owns. forward.c sums the row-parallel projections and gathers the vocabulary
// blocks and cache shards; backward.c sums the scores. They call these callbacks and never see MPI or
// NCCL: the distribution layer fills a group (sched/comm.h, comm_group: MPI, NCCL, or MPI staged through
// host memory) and the driver hands it to the model (model.group), as llama.cpp's backends and gemma.cpp's
// thread pool are handed in.
//
// Contract:
//   - A group is rank `rank` of `size` ranks. Every rank of the group calls the same collectives in the
//     same order with the same n (a collective is a meeting: a rank that skips one leaves the others
//     waiting for good).
//   - f32 buffers live in the memory of the backend the model computes on (host for ref and cpu, device
//     for cuda and offset): a model's group is the one made for its backend's memory. f64 buffers live in
//     host memory (the backward pass runs on the host).
//   - Each call returns 0, or -1 with err naming the collective and the cause. What a failure leaves in
//     the buffers is unspecified.
//   - ctx is the implementation's and is passed to every callback; the group neither owns nor frees it,
//     and whatever it points to must outlive every use of the group.
//   - A group of one needs no callbacks (group_single): its sums leave the buffer as it is. Nothing
//     gathers over one rank (a shard of one is the whole model), so its all-gather is an error.
// Never prints; holds no state of its own.
#ifndef EP_GROUP_H
#define EP_GROUP_H

#include <stddef.h>

#include "pipeline/error.h"

typedef struct {
    int rank, size;
    void *ctx;
    // buf[i] = the sum over the ranks of their buf[i], i < n, in place.
    int (*sum_f32)(void *ctx, float *buf, size_t n, ep_error *err);
    // recv[r * n .. (r + 1) * n) = rank r's send[0 .. n); recv holds size * n floats and does not overlap send.
    int (*gather_f32)(void *ctx, const float *send, float *recv, size_t n, ep_error *err);
    // As sum_f32, on host doubles.
    int (*sum_f64)(void *ctx, double *buf, size_t n, ep_error *err);
} ep_group;

// Rank 0 of 1, no callbacks.
ep_group group_single(void);

// The collectives through g's callbacks. g NULL is a group of one. A sum over one rank without a
// callback returns 0 and leaves buf as it is; a missing callback of a larger group, and an all-gather
// without one, are errors.
int group_sum_f32(const ep_group *g, float *buf, size_t n, ep_error *err);
int group_gather_f32(const ep_group *g, const float *send, float *recv, size_t n, ep_error *err);
int group_sum_f64(const ep_group *g, double *buf, size_t n, ep_error *err);

#endif
