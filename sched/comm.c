#include "comm.h"

#include "kernels/ops.h"

#include <mpi.h>
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

int comm_nccl_init(const ep_comm *group, ep_comm *out, ep_error *err) {
    comm_single(out);
#ifdef EP_HAVE_NCCL
    // The CUDA backend's start picks this rank's GPU (by local rank, docs/cuda.md); NCCL uses the same.
    if (!kernel_ops_cuda()) return ep_fail(err, "NCCL: no usable CUDA device");
    ncclUniqueId id;
    if (group->rank == 0 && ncclGetUniqueId(&id) != ncclSuccess) return ep_fail(err, "NCCL: ncclGetUniqueId failed");
    if (group->kind == COMM_MPI &&
        mpi_check(MPI_Bcast(&id, (int)sizeof id, MPI_BYTE, 0, mpi_of(group)), "Bcast of the NCCL id", err))
        return -1;
    ncclComm_t *h = ep_malloc(sizeof *h);
    ncclResult_t rc = ncclCommInitRank(h, group->size, id, group->rank);
    if (rc != ncclSuccess) {
        free(h);
        return ep_fail(err, "NCCL: ncclCommInitRank: %s", ncclGetErrorString(rc));
    }
    *out = (ep_comm){.kind = COMM_NCCL, .rank = group->rank, .size = group->size, .handle = h};
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
    if (c->kind == COMM_NCCL) ncclCommDestroy(*(ncclComm_t *)c->handle);
#endif
    if (c->kind != COMM_SINGLE) free(c->handle);
    comm_single(c);
}

#ifdef EP_HAVE_NCCL
// NCCL runs on the legacy default stream, which the CUDA backend's blocking stream is ordered with;
// waiting for the device before and after keeps the reduction in program order whatever stream the
// kernels used (simple first, and cheap next to a layer's matmuls).
static int nccl_done(ncclResult_t rc, const char *what, ep_error *err) {
    if (rc != ncclSuccess) return ep_fail(err, "NCCL %s failed: %s", what, ncclGetErrorString(rc));
    if (cudaDeviceSynchronize() != cudaSuccess) return ep_fail(err, "NCCL %s: CUDA error after the call", what);
    return 0;
}
#endif

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
    if (c->kind == COMM_MPI)
        return mpi_check(MPI_Allreduce(MPI_IN_PLACE, buf, (int)n, MPI_FLOAT, MPI_SUM, mpi_of(c)), "Allreduce", err);
#ifdef EP_HAVE_NCCL
    if (c->kind == COMM_NCCL) {
        cudaDeviceSynchronize();
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
    if (c->kind == COMM_MPI)
        return mpi_check(MPI_Allgather(send, (int)n, MPI_FLOAT, recv, (int)n, MPI_FLOAT, mpi_of(c)), "Allgather", err);
#ifdef EP_HAVE_NCCL
    if (c->kind == COMM_NCCL) {
        cudaDeviceSynchronize();
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
    if (c->kind == COMM_SINGLE) return 0;
    if (c->kind != COMM_MPI) return ep_fail(err, "comm: double collectives need an MPI communicator");
    return mpi_check(MPI_Allreduce(MPI_IN_PLACE, buf, (int)n, MPI_DOUBLE, MPI_SUM, mpi_of(c)), "Allreduce", err);
}

int comm_allreduce_max_i32(const ep_comm *c, int *buf, int n, ep_error *err) { return int_reduce(c, buf, n, MPI_MAX, err); }
int comm_allreduce_sum_i32(const ep_comm *c, int *buf, int n, ep_error *err) { return int_reduce(c, buf, n, MPI_SUM, err); }

int comm_bcast_i32(const ep_comm *c, int *buf, int n, int root, ep_error *err) {
    if (c->kind == COMM_SINGLE) return 0;
    if (c->kind != COMM_MPI) return ep_fail(err, "comm: integer collectives need an MPI communicator");
    return mpi_check(MPI_Bcast(buf, n, MPI_INT, root, mpi_of(c)), "Bcast", err);
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
