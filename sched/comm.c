#include "comm.h"

#include "kernels/ops.h"

#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef EP_HAVE_NCCL
#include <cuda_runtime.h>
#include <nccl.h>
#endif

static MPI_Comm mpi_of(const ep_comm *c) { return *(MPI_Comm *)c->handle; }

static int mpi_check(int rc, const char *what, ep_error *err) {
    if (rc == MPI_SUCCESS) return 0;
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    return ep_fail(err, "MPI %s failed: %s", what, msg);
}

void comm_single(ep_comm *c) { *c = (ep_comm){.kind = COMM_SINGLE, .rank = 0, .size = 1}; }

int comm_world_init(int *argc, char ***argv, ep_comm *world, ep_error *err) {
    comm_single(world);
    int provided;
    if (MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
        return ep_fail(err, "MPI_Init failed (launched by mpirun or srun? see docs/distribution.md)");
    MPI_Comm *h = ep_malloc(sizeof *h);
    *h = MPI_COMM_WORLD;
    *world = (ep_comm){.kind = COMM_MPI, .handle = h};
    MPI_Comm_rank(MPI_COMM_WORLD, &world->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world->size);
    return 0;
}

void comm_world_finalize(ep_comm *world) {
    if (world->kind != COMM_MPI) return;
    free(world->handle);
    MPI_Finalize();
    comm_single(world);
}

int comm_split(const ep_comm *parent, int color, int key, ep_comm *out, ep_error *err) {
    comm_single(out);
    if (parent->kind == COMM_SINGLE) return 0;
    if (parent->kind != COMM_MPI) return ep_fail(err, "comm_split: needs an MPI communicator");
    MPI_Comm *h = ep_malloc(sizeof *h);
    if (mpi_check(MPI_Comm_split(mpi_of(parent), color, key, h), "Comm_split", err)) {
        free(h);
        return -1;
    }
    *out = (ep_comm){.kind = COMM_MPI, .handle = h};
    MPI_Comm_rank(*h, &out->rank);
    MPI_Comm_size(*h, &out->size);
    return 0;
}

#ifdef EP_HAVE_NCCL
static int nccl_check(ncclResult_t rc, const char *what, ep_error *err) {
    if (rc == ncclSuccess) return 0;
    return ep_fail(err, "NCCL %s failed: %s", what, ncclGetErrorString(rc));
}
#endif

int comm_agree(const ep_comm *c, int status, const ep_error *mine, ep_error *err) {
    if (c->kind == COMM_SINGLE) {
        if (status == 0) return 0;
        if (err != mine) ep_fail(err, "%s", mine->msg);
        return -1;
    }
    if (c->kind != COMM_MPI) return ep_fail(err, "comm_agree: needs an MPI communicator");
    int first = status ? c->rank : c->size;  // the lowest failing rank, or size when none failed
    if (mpi_check(MPI_Allreduce(MPI_IN_PLACE, &first, 1, MPI_INT, MPI_MIN, mpi_of(c)), "Allreduce of a status", err))
        return -1;
    if (first == c->size) return 0;
    char msg[sizeof mine->msg];
    snprintf(msg, sizeof msg, "%s", c->rank == first ? mine->msg : "");
    if (mpi_check(MPI_Bcast(msg, (int)sizeof msg, MPI_CHAR, first, mpi_of(c)), "Bcast of an error", err)) return -1;
    return ep_fail(err, "rank %d: %s", first, msg);
}

int comm_nccl_init(const ep_comm *group, ep_comm *out, ep_error *err) {
    comm_single(out);
#ifdef EP_HAVE_NCCL
    // Each step that can fail on some ranks only is followed by comm_agree: a rank that returned alone
    // would leave the others waiting in the id's broadcast or in ncclCommInitRank for good.
    // The CUDA backend's start picks this rank's GPU (by local rank, docs/cuda.md); NCCL uses the same.
    ep_error mine = {{0}};
    ncclUniqueId id;
    memset(&id, 0, sizeof id);
    int status = kernel_ops_cuda() ? 0 : ep_fail(&mine, "NCCL: no usable CUDA device");
    if (status == 0 && group->rank == 0) status = nccl_check(ncclGetUniqueId(&id), "ncclGetUniqueId", &mine);
    if (comm_agree(group, status, &mine, err)) return -1;
    if (group->kind == COMM_MPI &&
        mpi_check(MPI_Bcast(&id, (int)sizeof id, MPI_BYTE, 0, mpi_of(group)), "Bcast of the NCCL id", err))
        return -1;
    ncclComm_t *h = ep_malloc(sizeof *h);
    status = nccl_check(ncclCommInitRank(h, group->size, id, group->rank), "ncclCommInitRank", &mine);
    if (comm_agree(group, status, &mine, err)) {
        if (status == 0) (void)ncclCommDestroy(*h);  // another rank failed: this one's communicator is of no use
        free(h);
        return -1;
    }
    *out = (ep_comm){.kind = COMM_NCCL, .rank = group->rank, .size = group->size, .handle = h, .host = group};
    return 0;
#else
    (void)group;
    return ep_fail(err, "NCCL: this build has no NCCL (it needs CUDA and nccl.h; docs/tensor_parallel.md)");
#endif
}

int comm_nccl_built(void) {
#ifdef EP_HAVE_NCCL
    return 1;
#else
    return 0;
#endif
}

void comm_staged_view(const ep_comm *group, const kernel_ops *ops, ep_comm *view) {
    *view = *group;
    view->staging = ops;
}

void comm_free(ep_comm *c) {
    if (c->staging) {  // a view: the handle is its group's
        comm_single(c);
        return;
    }
    if (c->kind == COMM_MPI) MPI_Comm_free((MPI_Comm *)c->handle);
#ifdef EP_HAVE_NCCL
    // Teardown has no caller to report to; a failed destroy leaks the communicator at worst.
    if (c->kind == COMM_NCCL) (void)ncclCommDestroy(*(ncclComm_t *)c->handle);
#endif
    if (c->kind != COMM_SINGLE) free(c->handle);
    comm_single(c);
}

#ifdef EP_HAVE_NCCL
// NCCL runs on the legacy default stream, which the CUDA backend's blocking stream is ordered with;
// waiting for the device before and after keeps the reduction in program order whatever stream the
// kernels used (simple first, and cheap next to a layer's matmuls).
static int nccl_ready(const char *what, ep_error *err) {
    cudaError_t rc = cudaDeviceSynchronize();
    return rc == cudaSuccess ? 0 : ep_fail(err, "NCCL %s: CUDA error before the call: %s", what, cudaGetErrorString(rc));
}

static int nccl_done(ncclResult_t rc, const char *what, ep_error *err) {
    if (nccl_check(rc, what, err)) return -1;
    cudaError_t sync = cudaDeviceSynchronize();
    return sync == cudaSuccess ? 0 : ep_fail(err, "NCCL %s: CUDA error after the call: %s", what, cudaGetErrorString(sync));
}
#endif

// The largest piece of a size_t count one MPI call carries on c.
static size_t chunk_of(const ep_comm *c) {
    return c->max_chunk && c->max_chunk < COMM_MAX_CHUNK ? c->max_chunk : COMM_MAX_CHUNK;
}

// In-place sum of n elements of type t (elsize bytes) in pieces of at most chunk_of(c).
static int mpi_allreduce_sum(const ep_comm *c, void *buf, size_t n, MPI_Datatype t, size_t elsize, ep_error *err) {
    size_t step = chunk_of(c);
    for (size_t at = 0; at < n; at += step) {
        int k = (int)(n - at < step ? n - at : step);  // at most COMM_MAX_CHUNK: fits
        if (mpi_check(MPI_Allreduce(MPI_IN_PLACE, (char *)buf + at * elsize, k, t, MPI_SUM, mpi_of(c)), "Allreduce", err))
            return -1;
    }
    return 0;
}

// recv[r * n + i] = rank r's send[i], in pieces of at most chunk_of(c) elements per rank: a piece
// [at, at + k) lands at recv + at as one block per rank whose extent is n floats, so rank r's block
// goes to recv[r * n + at ..).
static int mpi_allgather_f32(const ep_comm *c, const float *send, float *recv, size_t n, ep_error *err) {
    size_t step = chunk_of(c);
    if (n <= step)  // the common case (a layer's activations): one plain call
        return mpi_check(MPI_Allgather(send, (int)n, MPI_FLOAT, recv, (int)n, MPI_FLOAT, mpi_of(c)), "Allgather", err);
    for (size_t at = 0; at < n; at += step) {
        int k = (int)(n - at < step ? n - at : step);
        MPI_Datatype block = MPI_DATATYPE_NULL, spaced = MPI_DATATYPE_NULL;
        int rc = MPI_Type_contiguous(k, MPI_FLOAT, &block);
        if (rc == MPI_SUCCESS) rc = MPI_Type_create_resized(block, 0, (MPI_Aint)(n * sizeof(float)), &spaced);
        if (rc == MPI_SUCCESS) rc = MPI_Type_commit(&spaced);
        if (rc == MPI_SUCCESS) rc = MPI_Allgather(send + at, k, MPI_FLOAT, recv + at, 1, spaced, mpi_of(c));
        if (spaced != MPI_DATATYPE_NULL) MPI_Type_free(&spaced);
        if (block != MPI_DATATYPE_NULL) MPI_Type_free(&block);
        if (mpi_check(rc, "Allgather", err)) return -1;
    }
    return 0;
}

int comm_allreduce_sum_f32(const ep_comm *c, float *buf, size_t n, ep_error *err) {
    if (c->staging && c->kind == COMM_MPI) {
        float *host = ep_malloc(sizeof(float) * (n ? n : 1));
        c->staging->download(host, buf, sizeof(float) * n);
        ep_comm plain = *c;
        plain.staging = NULL;
        int rc = comm_allreduce_sum_f32(&plain, host, n, err);
        if (rc == 0) c->staging->upload(buf, host, sizeof(float) * n);
        free(host);
        return rc;
    }
    if (c->kind == COMM_MPI) return mpi_allreduce_sum(c, buf, n, MPI_FLOAT, sizeof(float), err);
#ifdef EP_HAVE_NCCL
    if (c->kind == COMM_NCCL) {
        if (nccl_ready("AllReduce", err)) return -1;
        return nccl_done(ncclAllReduce(buf, buf, n, ncclFloat, ncclSum, *(ncclComm_t *)c->handle, 0), "AllReduce", err);
    }
#endif
    return 0;
}

int comm_allgather_f32(const ep_comm *c, const float *send, float *recv, size_t n, ep_error *err) {
    if (c->staging) {  // single: one device-to-device copy through the host as well
        size_t all = n * (size_t)c->size;
        float *host_send = ep_malloc(sizeof(float) * (n ? n : 1)), *host_recv = ep_malloc(sizeof(float) * (all ? all : 1));
        c->staging->download(host_send, send, sizeof(float) * n);
        ep_comm plain = *c;
        plain.staging = NULL;
        int rc = comm_allgather_f32(&plain, host_send, host_recv, n, err);
        if (rc == 0) c->staging->upload(recv, host_recv, sizeof(float) * all);
        free(host_send), free(host_recv);
        return rc;
    }
    if (c->kind == COMM_MPI) return mpi_allgather_f32(c, send, recv, n, err);
#ifdef EP_HAVE_NCCL
    if (c->kind == COMM_NCCL) {
        if (nccl_ready("AllGather", err)) return -1;
        return nccl_done(ncclAllGather(send, recv, n, ncclFloat, *(ncclComm_t *)c->handle, 0), "AllGather", err);
    }
#endif
    if (c->kind == COMM_SINGLE) memcpy(recv, send, sizeof(float) * n);
    return 0;
}

static int int_reduce(const ep_comm *c, int *buf, int n, MPI_Op op, ep_error *err) {
    if (c->kind == COMM_SINGLE) return 0;
    if (c->kind != COMM_MPI) return ep_fail(err, "comm: integer collectives need an MPI communicator");
    return mpi_check(MPI_Allreduce(MPI_IN_PLACE, buf, n, MPI_INT, op, mpi_of(c)), "Allreduce", err);
}

int comm_allreduce_sum_f64(const ep_comm *c, double *buf, size_t n, ep_error *err) {
    if (c->kind == COMM_NCCL && c->host) c = c->host;  // host doubles: the MPI group the NCCL one was made from
    if (c->kind == COMM_SINGLE) return 0;
    if (c->kind != COMM_MPI) return ep_fail(err, "comm: double collectives need an MPI communicator");
    return mpi_allreduce_sum(c, buf, n, MPI_DOUBLE, sizeof(double), err);
}

int comm_allreduce_max_i32(const ep_comm *c, int *buf, int n, ep_error *err) { return int_reduce(c, buf, n, MPI_MAX, err); }
int comm_allreduce_sum_i32(const ep_comm *c, int *buf, int n, ep_error *err) { return int_reduce(c, buf, n, MPI_SUM, err); }

int comm_bcast_i32(const ep_comm *c, int *buf, int n, int root, ep_error *err) {
    if (c->kind == COMM_SINGLE) return 0;
    if (c->kind != COMM_MPI) return ep_fail(err, "comm: integer collectives need an MPI communicator");
    return mpi_check(MPI_Bcast(buf, n, MPI_INT, root, mpi_of(c)), "Bcast", err);
}

static int group_sum_f32_cb(void *ctx, float *buf, size_t n, ep_error *err) {
    return comm_allreduce_sum_f32(ctx, buf, n, err);
}
static int group_gather_f32_cb(void *ctx, const float *send, float *recv, size_t n, ep_error *err) {
    return comm_allgather_f32(ctx, send, recv, n, err);
}
static int group_sum_f64_cb(void *ctx, double *buf, size_t n, ep_error *err) {
    return comm_allreduce_sum_f64(ctx, buf, n, err);
}

ep_group comm_group(const ep_comm *c) {
    // ctx is the runtime's void *; the callbacks only read the communicator through it.
    return (ep_group){.rank = c->rank, .size = c->size, .ctx = (void *)c, .sum_f32 = group_sum_f32_cb,
                      .gather_f32 = group_gather_f32_cb, .sum_f64 = group_sum_f64_cb};
}

int comm_send_i32(const ep_comm *c, int value, int dest, int tag, ep_error *err) {
    if (c->kind != COMM_MPI) return ep_fail(err, "comm: messages need an MPI communicator");
    return mpi_check(MPI_Send(&value, 1, MPI_INT, dest, tag, mpi_of(c)), "Send", err);
}

int comm_recv_i32(const ep_comm *c, int *value, int src, int tag, int *src_out, int *tag_out, ep_error *err) {
    if (c->kind != COMM_MPI) return ep_fail(err, "comm: messages need an MPI communicator");
    MPI_Status st;
    int rc = MPI_Recv(value, 1, MPI_INT, src < 0 ? MPI_ANY_SOURCE : src, tag < 0 ? MPI_ANY_TAG : tag, mpi_of(c), &st);
    if (src_out) *src_out = st.MPI_SOURCE;
    if (tag_out) *tag_out = st.MPI_TAG;
    return mpi_check(rc, "Recv", err);
}

int comm_probe(const ep_comm *c, int src, int tag, int *src_out, int *tag_out) {
    if (c->kind != COMM_MPI) return 0;
    int flag = 0;
    MPI_Status st;
    MPI_Iprobe(src < 0 ? MPI_ANY_SOURCE : src, tag < 0 ? MPI_ANY_TAG : tag, mpi_of(c), &flag, &st);
    if (flag && src_out) *src_out = st.MPI_SOURCE;
    if (flag && tag_out) *tag_out = st.MPI_TAG;
    return flag;
}
