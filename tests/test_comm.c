// comm: size_t counts over MPI's int counts, and a failure on some ranks returned on every rank.
//
// The mpi backend moves a count in pieces of at most max_chunk elements (COMM_MAX_CHUNK by default). The
// test sees every MPI_Allreduce and MPI_Allgather that comm.c makes through MPI's profiling interface:
// its own MPI_Allreduce / MPI_Allgather note the count and buffer of each call and pass it on to
// PMPI_*. With tiny pieces (max_chunk 3 on 10 elements) the sums and gathers must equal the values
// worked out here and the one-call results; with counts over 2^31 (buffers that are mapped but never
// touched, the calls noted and not passed on) the pieces must each fit an int and cover the count, where
// the old `(int)n` cast made one call of 7 elements (2^32 + 7) or of a negative count (2^31 + 5).
// The runtime's collectives interface (pipeline/group.h) over a communicator (comm_group) must give the
// same sums and gathers through MPI, a group of one none, and the driver's groups (sched_open_groups)
// the host group on a host backend and a staged view for a device backend's memory (the offset backend:
// a host read of its memory faults, so a device group that is the host one fails).
// Run alone (one rank) and under mpirun -np 2 (tests/CMakeLists.txt).
#define _DEFAULT_SOURCE  // MAP_ANONYMOUS, MAP_NORESERVE
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "kernels/ops.h"
#include "pipeline/group.h"
#include "sched/comm.h"
#include "sched/mpi_run.h"
#include "tests/harness.h"

// What the calls since the last reset looked like.
static struct {
    int pass_on;  // 0: note the call only (buffers too big to touch)
    int calls;
    long long total;          // sum of counts (an allgather: of send counts)
    int min_count, max_count;
    const char *next;         // where the next piece should start (NULL: no call yet)
    int contiguous;           // each piece started where the one before ended
} seen;

static void reset(int pass_on) {
    memset(&seen, 0, sizeof seen);
    seen.pass_on = pass_on, seen.contiguous = 1, seen.min_count = 0x7fffffff;
}

static void note(const void *buf, int count, MPI_Datatype t) {
    int size = 0;
    MPI_Type_size(t, &size);
    if (seen.next && (const char *)buf != seen.next) seen.contiguous = 0;
    seen.next = (const char *)buf + (long long)count * size;
    seen.calls++;
    seen.total += count;
    if (count < seen.min_count) seen.min_count = count;
    if (count > seen.max_count) seen.max_count = count;
}

int MPI_Allreduce(const void *sendbuf, void *recvbuf, int count, MPI_Datatype datatype, MPI_Op op, MPI_Comm comm) {
    note(recvbuf, count, datatype);
    return seen.pass_on ? PMPI_Allreduce(sendbuf, recvbuf, count, datatype, op, comm) : MPI_SUCCESS;
}

int MPI_Allgather(const void *sendbuf, int sendcount, MPI_Datatype sendtype, void *recvbuf, int recvcount,
                  MPI_Datatype recvtype, MPI_Comm comm) {
    note(sendbuf, sendcount, sendtype);
    return seen.pass_on ? PMPI_Allgather(sendbuf, sendcount, sendtype, recvbuf, recvcount, recvtype, comm) : MPI_SUCCESS;
}

static void check_pieces(const char *what, int want_calls, long long want_total, int max_piece) {
    check(seen.calls == want_calls && seen.total == want_total && seen.min_count > 0 && seen.max_count <= max_piece &&
              seen.contiguous,
          "%s: %d calls of %d..%d elements, %lld in all, contiguous %d; want %d calls of at most %d, %lld in all", what,
          seen.calls, seen.min_count, seen.max_count, seen.total, seen.contiguous, want_calls, max_piece, want_total);
}

// Rank r holds x_r[i] = (r + 1) / 4 + i (exact in float and double): the sum over S ranks is
// S (S + 1) / 8 + S i.
static void test_small_pieces(const ep_comm *world) {
    int S = world->size, r = world->rank;
    ep_comm c = *world;
    ep_error err = {{0}};
    enum { N = 10 };
    float f[N], whole[N];
    double d[N + 1];
    for (int i = 0; i < N; i++) f[i] = whole[i] = (float)(r + 1) / 4 + (float)i;
    for (int i = 0; i < N + 1; i++) d[i] = (double)(r + 1) / 4 + i;

    c.max_chunk = 3;
    reset(1);
    check(comm_allreduce_sum_f32(&c, f, N, &err) == 0, "f32 sum in pieces: %s", err.msg);
    check_pieces("f32 sum, pieces of 3", 4, N, 3);
    int bad = 0;
    for (int i = 0; i < N; i++) bad += f[i] != (float)(S * (S + 1)) / 8 + (float)(S * i);
    check(bad == 0, "f32 sum in pieces of 3: %d of %d elements wrong", bad, N);
    c.max_chunk = 0;
    reset(1);
    check(comm_allreduce_sum_f32(&c, whole, N, &err) == 0, "f32 sum: %s", err.msg);
    check_pieces("f32 sum, one call", 1, N, N);
    check(!memcmp(f, whole, sizeof f), "f32 sum in pieces == in one call");

    c.max_chunk = 4;
    reset(1);
    check(comm_allreduce_sum_f64(&c, d, N + 1, &err) == 0, "f64 sum in pieces: %s", err.msg);
    check_pieces("f64 sum, pieces of 4", 3, N + 1, 4);
    bad = 0;
    for (int i = 0; i < N + 1; i++) bad += d[i] != (double)(S * (S + 1)) / 8 + (double)S * i;
    check(bad == 0, "f64 sum in pieces of 4: %d of %d elements wrong", bad, N + 1);

    // Gather: rank q sends q * 1000 + i; recv[q * n + i] must hold it.
    enum { G = 7 };
    float send[G], *got = malloc(sizeof(float) * G * (size_t)S), *one = malloc(sizeof(float) * G * (size_t)S);
    for (int i = 0; i < G; i++) send[i] = (float)(r * 1000 + i);
    c.max_chunk = 3;
    reset(1);
    check(comm_allgather_f32(&c, send, got, G, &err) == 0, "gather in pieces: %s", err.msg);
    check_pieces("gather, pieces of 3", 3, G, 3);
    bad = 0;
    for (int q = 0; q < S; q++)
        for (int i = 0; i < G; i++) bad += got[q * G + i] != (float)(q * 1000 + i);
    check(bad == 0, "gather in pieces of 3: %d of %d elements wrong", bad, G * S);
    c.max_chunk = 0;
    reset(1);
    check(comm_allgather_f32(&c, send, one, G, &err) == 0, "gather: %s", err.msg);
    check(!memcmp(got, one, sizeof(float) * G * (size_t)S), "gather in pieces == in one call");
    free(got), free(one);
    if (world->rank == 0) printf("  pieces of 3 and 4 over %d rank(s): sums and gathers exact, equal to one call\n", S);
}

// Counts over INT_MAX with the default pieces, on mappings that are never touched (the calls are noted,
// not made), so they cost no memory.
static void test_counts_over_int_max(const ep_comm *world) {
    size_t n_sum = (1ull << 32) + 7, n_gather = (1ull << 31) + 5, S = (size_t)world->size;
    size_t sum_bytes = n_sum * sizeof(float), gather_bytes = n_gather * sizeof(float) * (1 + S);
    int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
    char *a = mmap(NULL, sum_bytes, PROT_READ | PROT_WRITE, flags, -1, 0);
    char *b = mmap(NULL, gather_bytes, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (a == MAP_FAILED || b == MAP_FAILED) {
        printf("  skipped counts over 2^31: cannot map %zu + %zu bytes\n", sum_bytes, gather_bytes);
        if (a != MAP_FAILED) munmap(a, sum_bytes);
        if (b != MAP_FAILED) munmap(b, gather_bytes);
        return;
    }
    ep_comm c = *world;
    ep_error err = {{0}};
    long long most = (long long)COMM_MAX_CHUNK;
    int pieces = (int)((n_sum + COMM_MAX_CHUNK - 1) / COMM_MAX_CHUNK);
    reset(0);
    check(comm_allreduce_sum_f32(&c, (float *)a, n_sum, &err) == 0, "f32 sum of 2^32 + 7: %s", err.msg);
    check_pieces("f32 sum of 2^32 + 7", pieces, (long long)n_sum, (int)most);
    size_t n_f64 = sum_bytes / sizeof(double);
    reset(0);
    check(comm_allreduce_sum_f64(&c, (double *)a, n_f64, &err) == 0, "f64 sum of 2^31 + 3: %s", err.msg);
    check_pieces("f64 sum of 2^31 + 3", (int)((n_f64 + COMM_MAX_CHUNK - 1) / COMM_MAX_CHUNK), (long long)n_f64, (int)most);
    float *send = (float *)b, *recv = send + n_gather;
    reset(0);
    check(comm_allgather_f32(&c, send, recv, n_gather, &err) == 0, "gather of 2^31 + 5: %s", err.msg);
    check_pieces("gather of 2^31 + 5", (int)((n_gather + COMM_MAX_CHUNK - 1) / COMM_MAX_CHUNK), (long long)n_gather,
                 (int)most);
    if (world->rank == 0) printf("  2^32 + 7 floats: %d calls of at most %lld elements\n", pieces, most);
    munmap(a, sum_bytes), munmap(b, gather_bytes);
}

// A step that fails on one rank: every rank returns -1 with that rank's message (no rank is left in a
// collective that the failed one never joins, as NCCL's id broadcast was when rank 0 failed to make it).
static void test_agree(const ep_comm *world) {
    int S = world->size, r = world->rank;
    for (int failing = 0; failing < S; failing++) {
        ep_error mine = {{0}}, err = {{0}};
        int status = r == failing ? ep_fail(&mine, "NCCL ncclGetUniqueId failed: test failure on rank %d", r) : 0;
        reset(1);
        int rc = comm_agree(world, status, &mine, &err);
        char want[64];
        snprintf(want, sizeof want, "rank %d: NCCL", failing);
        check(rc == -1 && strstr(err.msg, want) && strstr(err.msg, "test failure"), "rank %d fails: rank %d got %d, '%s'",
              failing, r, rc, err.msg);
    }
    ep_error mine = {{0}}, err = {{0}};
    check(comm_agree(world, 0, &mine, &err) == 0, "no rank fails: %s", err.msg);
    ep_comm single;
    comm_single(&single);
    ep_fail(&mine, "alone");
    check(comm_agree(&single, -1, &mine, &err) == -1 && !strcmp(err.msg, "alone"), "single: '%s'", err.msg);
    check(comm_agree(&single, -1, &mine, &mine) == -1 && !strcmp(mine.msg, "alone"), "single, err is mine: '%s'", mine.msg);
    if (world->rank == 0) printf("  a failure on any one of %d rank(s) returned on all, with its message\n", S);
}

// Rank r's x_r[i] = (r + 1) / 4 + i summed through g, in the memory of ops: the sum over S ranks is
// S (S + 1) / 8 + S i. Returns the number of wrong elements, or -1 if the call failed.
static int group_sum_wrong(const ep_group *g, const kernel_ops *ops, int S, int r, ep_error *err) {
    enum { N = 9 };
    float x[N];
    for (int i = 0; i < N; i++) x[i] = (float)(r + 1) / 4 + (float)i;
    float *buf = ops->alloc(sizeof x);
    ops->upload(buf, x, sizeof x);
    int rc = group_sum_f32(g, buf, N, err);
    ops->download(x, buf, sizeof x);
    ops->release(buf);
    if (rc) return -1;
    int bad = 0;
    for (int i = 0; i < N; i++) bad += x[i] != (float)(S * (S + 1)) / 8 + (float)(S * i);
    return bad;
}

static void test_group(const ep_comm *world) {
    int S = world->size, r = world->rank;
    ep_error err = {{0}};
    ep_group g = comm_group(world);
    check(g.rank == r && g.size == S && g.ctx == (void *)world, "comm_group: rank %d of %d", g.rank, g.size);
    reset(1);
    int bad = group_sum_wrong(&g, kernel_ops_cpu(), S, r, &err);
    check(bad == 0 && seen.calls == 1, "group f32 sum over MPI: %d wrong, %d calls%s%s", bad, seen.calls, bad < 0 ? ": " : "",
          bad < 0 ? err.msg : "");
    enum { G = 5 };
    float send[G], *got = malloc(sizeof(float) * G * (size_t)S);
    double d[G];
    for (int i = 0; i < G; i++) send[i] = (float)(r * 1000 + i), d[i] = (double)(r + 1) / 8 + i;
    int rc = group_gather_f32(&g, send, got, G, &err) || group_sum_f64(&g, d, G, &err);
    bad = 0;
    for (int q = 0; q < S && rc == 0; q++)
        for (int i = 0; i < G; i++) bad += got[q * G + i] != (float)(q * 1000 + i);
    for (int i = 0; i < G && rc == 0; i++) bad += d[i] != (double)(S * (S + 1)) / 16 + (double)S * i;
    check(rc == 0 && bad == 0, "group gather and f64 sum over MPI: %d wrong%s%s", bad, rc ? ": " : "", rc ? err.msg : "");
    free(got);

    // A group of one (group_single, or none): sums leave the buffer alone; an all-gather is an error.
    ep_group one = group_single();
    float f[3] = {1.5f, -2, 3};
    double e[2] = {0.25, 7};
    rc = group_sum_f32(&one, f, 3, &err) || group_sum_f64(&one, e, 2, &err) || group_sum_f32(NULL, f, 3, &err) ||
         group_sum_f64(NULL, e, 2, &err);
    check(rc == 0 && f[0] == 1.5f && f[1] == -2 && f[2] == 3 && e[0] == 0.25 && e[1] == 7 && one.size == 1 && !one.ctx,
          "group of one: sums leave the buffer as it is%s%s", rc ? ": " : "", rc ? err.msg : "");
    err.msg[0] = 0;
    check(group_gather_f32(&one, f, f + 1, 1, &err) == -1 && strstr(err.msg, "all-gather"), "group of one: gather refused: '%s'",
          err.msg);
    ep_group broken = {.rank = r, .size = 2};
    check(group_sum_f32(&broken, f, 3, &err) == -1 && group_sum_f64(&broken, e, 2, &err) == -1,
          "a group of 2 without callbacks is an error");

    // The driver's groups over a tensor-parallel group of every rank (sched_open_groups).
    sched_ctx sc;
    memset(&sc, 0, sizeof sc);
    comm_single(&sc.world), comm_single(&sc.device);
    if (comm_split(world, 0, r, &sc.group, &err)) {
        check(0, "split: %s", err.msg);
        return;
    }
    const kernel_ops *off = kernel_ops_offset();
    rc = sched_open_groups(&sc, kernel_ops_cpu(), &err);
    check(rc == 0 && sc.host_group.ctx == (void *)&sc.group && sc.device_group.ctx == (void *)&sc.group &&
              sc.host_group.size == S && sc.device_group.rank == r,
          "cpu backend: the device group is the host group%s%s", rc ? ": " : "", rc ? err.msg : "");
    rc = sched_open_groups(&sc, off, &err);
    check(rc == 0 && sc.host_group.ctx == (void *)&sc.group && (S == 1 ? sc.device_group.ctx == (void *)&sc.group
                                                                        : sc.device.staging == off),
          "offset backend: %s%s%s", S == 1 ? "a group of one keeps the host group" : "the device group is a staged view",
          rc ? ": " : "", rc ? err.msg : "");
    if (rc == 0) {
        bad = group_sum_wrong(&sc.device_group, off, S, r, &err);
        check(bad == 0, "offset backend: f32 sum of device buffers through the device group: %d wrong%s%s", bad,
              bad < 0 ? ": " : "", bad < 0 ? err.msg : "");
    }
    // Host and staged ranks meet in the same MPI calls: a group may mix them.
    const kernel_ops *mine = r % 2 ? off : kernel_ops_cpu();
    rc = sched_open_groups(&sc, mine, &err);
    bad = rc ? -1 : group_sum_wrong(&sc.device_group, mine, S, r, &err);
    check(bad == 0, "cpu and offset ranks in one group: %d wrong%s%s", bad, bad < 0 ? ": " : "", bad < 0 ? err.msg : "");
    sched_close_groups(&sc);
    check(sc.device.kind == COMM_SINGLE && !sc.device.staging && sc.device_group.size == 1 && !sc.device_group.ctx,
          "sched_close_groups leaves groups of one");
    comm_free(&sc.group);
    if (r == 0) printf("  groups over %d rank(s): sums and gathers through the interface, staged on the offset backend\n", S);
}

int main(int argc, char **argv) {
    ep_comm world;
    ep_error err = {{0}};
    if (comm_world_init(&argc, &argv, &world, &err)) {
        fprintf(stderr, "test_comm: %s\n", err.msg);
        return 1;
    }
    test_small_pieces(&world);
    test_counts_over_int_max(&world);
    test_agree(&world);
    test_group(&world);
    int rc = test_finish(world.rank == 0 ? "test_comm" : "test_comm (rank > 0)");
    comm_world_finalize(&world);
    return rc;
}
