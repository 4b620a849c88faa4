#include "mpi_run.h"

#include "sched/watchdog.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { TAG_ITEM = 101, TAG_FINAL = 102, TAG_STOP = 103, TAG_DONE = 104 };

static int launched_by_mpi(void) {
    const char *force = getenv("EDGEPATCH_MPI");
    if (force && *force) return atoi(force) != 0;
    return getenv("OMPI_COMM_WORLD_SIZE") || getenv("PMIX_RANK") || getenv("PMI_RANK") || getenv("PMI_SIZE");
}

// EDGEPATCH_TEST_KILL=STAGE:RANK:N[:write]: rank RANK (or "all") kills itself with SIGKILL once it has
// finished N items of STAGE in this run: before starting the next one, or with ":write" while writing
// it (data written, shard not yet committed).
static void parse_hooks(sched_ctx *sc) {
    const char *delay = getenv("EDGEPATCH_TEST_ITEM_DELAY_MS");
    sc->delay_ms = delay ? atoi(delay) : 0;
    sc->kill_rank = -2;
    const char *kill = getenv("EDGEPATCH_TEST_KILL");
    if (!kill || !*kill) return;
    char rank[16] = "", mode[16] = "";
    int n = 0;
    if (sscanf(kill, "%31[^:]:%15[^:]:%d:%15s", sc->kill_stage, rank, &n, mode) < 3) return;
    sc->kill_rank = !strcmp(rank, "all") ? -1 : atoi(rank);
    sc->kill_after = n;
    sc->kill_in_write = !strcmp(mode, "write");
}

static void maybe_kill(sched_ctx *sc, int in_write) {
    if (sc->kill_rank == -2 || !sc->stage || strcmp(sc->stage, sc->kill_stage) || sc->kill_in_write != in_write) return;
    if ((sc->kill_rank == -1 || sc->kill_rank == sc->rank) && sc->stage_items == sc->kill_after) {
        ep_logf(sc->log, EP_LOG_WARN, "edgepatch: test hook: rank %d kills itself in %s after %d items%s", sc->rank,
                sc->stage, sc->stage_items, in_write ? " (mid-write)" : "");
        raise(SIGKILL);
    }
}

static void before_commit(void *arg, int item) { maybe_kill(arg, 1); }

// EDGEPATCH_TEST_STALL=STEP:RANK:SECONDS: rank RANK (or "all") sleeps that long inside the watched
// step STEP ("init": after MPI_Init returned, "finalize": before MPI_Finalize), as a step that waits for a
// dead rank would: the watchdog's test (tests/cli_watchdog.sh).
static void test_stall(const sched_ctx *sc, const char *step, int rank) {
    const char *s = getenv("EDGEPATCH_TEST_STALL");
    char want[16] = "", who[16] = "";
    double seconds = 0;
    if (!s || sscanf(s, "%15[^:]:%15[^:]:%lf", want, who, &seconds) != 3 || strcmp(want, step)) return;
    if (strcmp(who, "all") && atoi(who) != rank) return;
    struct timespec ts = {(time_t)seconds, (long)((seconds - (double)(time_t)seconds) * 1e9)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

int sched_init(sched_ctx *sc, int *argc, char ***argv, ep_error *err) {
    memset(sc, 0, sizeof *sc);
    comm_single(&sc->world);
    comm_single(&sc->group);
    comm_single(&sc->device);
    sc->host_group = sc->device_group = group_single();
    sc->size = sc->n_groups = 1;
    parse_hooks(sc);
    // EDGEPATCH_TEST_START_HOLD_MS=N: N ms more of start before the handler is installed, the stop signals
    // still held by the front (sched/cli/launch.c): a test's signal lands in the start however slow the
    // machine it runs on is (tests/cli_signals.sh).
    const char *hold = getenv("EDGEPATCH_TEST_START_HOLD_MS");
    if (hold && atoi(hold) > 0) {
        struct timespec ts = {atoi(hold) / 1000, (long)(atoi(hold) % 1000) * 1000000L};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
        }
    }
    sched_signals_install();
    if (launched_by_mpi()) {
        // A stop asked for during MPI_Init waits for it, then reaches our handler (sched/signals.h); a
        // start that never ends (a rank killed meanwhile) ends in the watchdog's time (sched/watchdog.h).
        sched_signals_hold();
        sched_watchdog dog;
        sched_watchdog_start(&dog, "MPI_Init", sched_watchdog_limit(), 1);
        int rc = comm_world_init(argc, argv, &sc->world, err);
        if (rc == 0) test_stall(sc, "init", sc->world.rank);
        sched_watchdog_stop(&dog);
        sched_signals_install();
        if (rc) return -1;
        sc->mpi = 1;
        sc->rank = sc->world.rank;
        sc->size = sc->n_groups = sc->world.size;
        sc->group_id = sc->rank;
    }
    return 0;
}

void sched_finalize(sched_ctx *sc, int exit_status) {
    sched_close_groups(sc);
    comm_free(&sc->group);
    if (sc->mpi) {
        sched_signals_hold();  // the watchdog's thread must not take a stop signal
        sched_watchdog dog;
        sched_watchdog_start(&dog, "MPI_Finalize", sched_watchdog_limit(), exit_status);
        test_stall(sc, "finalize", sc->rank);
        comm_world_finalize(&sc->world);
        sched_watchdog_stop(&dog);
    }
    sc->mpi = 0;
}

int sched_set_tensor_parallel(sched_ctx *sc, int tp, const char *config_path, ep_error *err) {
    if (tp < 1 || sc->size % tp)
        return ep_fail(err, "%s: field tensor_parallel: %d does not divide the job's %d rank%s (run with a multiple of %d "
                            "ranks: mpirun -np %d)", config_path, tp, sc->size, sc->size == 1 ? "" : "s", tp, tp);
    comm_free(&sc->group);
    sc->n_groups = sc->size / tp;
    sc->group_id = sc->rank / tp;
    return tp == 1 ? 0 : comm_split(&sc->world, sc->group_id, sc->rank, &sc->group, err);
}

int sched_open_groups(sched_ctx *sc, const kernel_ops *ops, ep_error *err) {
    sched_close_groups(sc);
    sc->host_group = sc->device_group = comm_group(&sc->group);
    if (sc->group.size == 1) return 0;
    enum { HOST = 0, STAGED = 1, NCCL = 2 };
    int kind = ops->host_memory ? HOST : ops == kernel_ops_cuda() && comm_nccl_built() ? NCCL : STAGED;
    // Every rank of the group says its kind first. Host and staged ranks all meet in MPI calls, but one
    // without NCCL would leave the NCCL ranks waiting in NCCL's set-up for good.
    int range[2] = {kind, -kind};  // the max of each: the group's largest kind and minus its smallest
    if (comm_allreduce_max_i32(&sc->group, range, 2, err)) return -1;
    if (range[0] == NCCL && -range[1] != NCCL)
        return ep_fail(err, "tensor-parallel group %d: some ranks run on the cuda backend with NCCL and some do not "
                            "(field backend \"auto\" found a GPU on some nodes only?)", sc->group_id);
    if (kind == HOST) return 0;
    if (kind == NCCL) {
        if (comm_nccl_init(&sc->group, &sc->device, err)) return -1;
    } else {
        comm_staged_view(&sc->group, ops, &sc->device);
    }
    sc->device_group = comm_group(&sc->device);
    return 0;
}

void sched_close_groups(sched_ctx *sc) {
    comm_free(&sc->device);
    sc->host_group = sc->device_group = group_single();
}

// MPI's handler aborts the job on a failed call, so the communication calls below have no other outcome.
int sched_agree(sched_ctx *sc, int status) {
    if (status == SCHED_OK && sched_stop_requested()) status = SCHED_STOPPED;
    comm_allreduce_max_i32(&sc->world, &status, 1, NULL);
    return status;
}

static int bcast_from_root(sched_ctx *sc, int value) {
    comm_bcast_i32(&sc->world, &value, 1, 0, NULL);
    return value;
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

// Rank 0's view of the other ranks during a stage.
typedef struct {
    int finals, outcome, failed_rank, stop_sent;
} root_view;

static void send_stop(sched_ctx *sc, root_view *v) {
    if (v->stop_sent) return;
    v->stop_sent = 1;
    for (int r = 1; r < sc->size; r++) comm_send_i32(&sc->world, 0, r, TAG_STOP, NULL);
}

// One message from another rank, received by rank 0.
static void root_handle(sched_ctx *sc, root_view *v, int value, int src, int tag) {
    if (tag == TAG_ITEM) {
        progress_tick(&sc->prog, value);
    } else if (tag == TAG_FINAL) {
        v->finals++;
        if (value > v->outcome) v->outcome = value;
        if (value == SCHED_FAILED && v->failed_rank < 0) v->failed_rank = src;
        if (value != SCHED_OK) send_stop(sc, v);
    }
}

static void root_drain(sched_ctx *sc, root_view *v, int block) {
    for (;;) {
        int value, src, tag;
        if (!block && !comm_probe(&sc->world, -1, -1, NULL, NULL)) return;
        comm_recv_i32(&sc->world, &value, -1, -1, &src, &tag, NULL);
        root_handle(sc, v, value, src, tag);
        if (block) return;
    }
}

static int told_to_stop(sched_ctx *sc) {
    if (sc->size == 1 || sc->rank == 0) return 0;
    return comm_probe(&sc->world, 0, TAG_STOP, NULL, NULL);  // the message itself is consumed while waiting for TAG_DONE
}

int sched_run_stage(sched_ctx *sc, work_stage *ws, int fresh, ep_error *err) {
    int root = sc->rank == 0, n = ws->n_items;
    ws->before_commit = before_commit;
    ws->driver_arg = sc;
    ws->shard_bad = 0;
    sc->stage = ws->name;
    sc->stage_items = 0;
    sc->stage_pending = 0;

    int prepared = root ? ws->prepare(ws, fresh, err) : 0;
    prepared = bcast_from_root(sc, prepared);
    if (prepared < 0) return SCHED_FAILED;  // rank 0 holds the message
    // prepared > 0: the final outputs are current. The shards are checked all the same, because they
    // are the checkpoints the outputs are rebuilt from, and a damaged one must not wait for the day it
    // is needed: one that fails is computed again and the outputs merged again (the same bytes).
    int current = prepared > 0;

    // This group's items whose shards are missing, unfinished or corrupted: the leader checks them and
    // tells the group, whose ranks compute every item together.
    int leader = sc->group.rank == 0, g = sc->group_id, G = sc->n_groups;
    int *pending = ep_malloc(sizeof(int) * (size_t)(n / G + 2)), n_pending = 0, status = SCHED_OK;
    for (int i = g; i < n && leader; i += G) {
        int done = ws->item_done(ws, i, err);
        if (done < 0) {
            status = SCHED_FAILED;
            break;
        }
        if (done == 0) pending[n_pending++] = i;
    }
    int counts[2] = {status == SCHED_FAILED, n_pending};
    comm_allreduce_sum_i32(&sc->world, counts, 2, NULL);
    if (counts[0]) {
        if (!root && status == SCHED_FAILED) ep_logf(sc->log, EP_LOG_ERROR, "edgepatch run: rank %d: %s", sc->rank, err->msg);
        if (root && status != SCHED_FAILED)
            ep_fail(err, "%s: refused on another rank (its message is above)", ws->name);
        free(pending);
        return SCHED_FAILED;
    }
    sc->stage_pending = counts[1];
    if (current && counts[1] == 0) {
        free(pending);
        return SCHED_OK;
    }
    comm_bcast_i32(&sc->group, &n_pending, 1, 0, NULL);
    comm_bcast_i32(&sc->group, pending, n_pending, 0, NULL);
    if (root) progress_start(&sc->prog, sc->log, ws->name, n, n - counts[1], G);

    ws->follower = !leader;
    root_view view = {.outcome = SCHED_OK, .failed_rank = -1};
    for (int k = 0; k < n_pending && status == SCHED_OK; k++) {
        // The ranks of a group start an item together or not at all (a rank alone would wait forever in
        // the item's collectives).
        int halt = 0;
        if (root && sc->size > 1) {
            root_drain(sc, &view, 0);
            halt = view.outcome != SCHED_OK;
        }
        if (sched_stop_requested() || told_to_stop(sc)) halt = 2;
        comm_allreduce_max_i32(&sc->group, &halt, 1, NULL);
        if (halt) {
            if (halt == 2 || !root) status = SCHED_STOPPED;
            break;
        }
        maybe_kill(sc, 0);
        int failed = ws->run_item(ws, pending[k], err) == 0 ? SCHED_OK : ws->shard_bad ? SCHED_RETRY : SCHED_FAILED;
        if (failed == SCHED_FAILED && !root) ep_logf(sc->log, EP_LOG_ERROR, "edgepatch run: rank %d: %s", sc->rank, err->msg);
        int group_failed = failed;
        comm_allreduce_max_i32(&sc->group, &group_failed, 1, NULL);
        if (group_failed) {
            status = group_failed;
            if (failed != group_failed && root)
                ep_fail(err, "%s: failed on another rank of tensor-parallel group 0 (its message is above)", ws->name);
            break;
        }
        sc->stage_items++;
        if (sc->delay_ms > 0) sleep_ms(sc->delay_ms);
        if (root) progress_tick(&sc->prog, 1);
        else if (leader) comm_send_i32(&sc->world, 1, 0, TAG_ITEM, NULL);
    }
    free(pending);
    if (status == SCHED_OK && sched_stop_requested()) status = SCHED_STOPPED;

    int outcome = status;
    if (sc->size > 1 && root) {
        if (status != SCHED_OK) send_stop(sc, &view);
        while (view.finals < sc->size - 1) root_drain(sc, &view, 1);
        if (view.outcome > outcome) outcome = view.outcome;
        for (int r = 1; r < sc->size; r++) comm_send_i32(&sc->world, outcome, r, TAG_DONE, NULL);
        if (outcome == SCHED_FAILED && status != SCHED_FAILED)
            ep_fail(err, "%s: stopped because rank %d failed (its message is above)", ws->name, view.failed_rank);
    } else if (sc->size > 1) {
        comm_send_i32(&sc->world, status, 0, TAG_FINAL, NULL);
        for (;;) {
            int value, tag;
            comm_recv_i32(&sc->world, &value, 0, -1, NULL, &tag, NULL);
            if (tag == TAG_DONE) {
                outcome = value;
                break;
            }
        }
    }
    if (root) progress_end(&sc->prog);
    if (outcome != SCHED_OK) return outcome;

    // Rank 0's group runs finish: the leader merges and writes, the others join its model passes (prune
    // rounds measure the kept circuit) and write nothing.
    int finished = SCHED_OK;
    if (sc->group_id == 0 && ws->finish(ws, err)) finished = ws->shard_bad ? SCHED_RETRY : SCHED_FAILED;
    return bcast_from_root(sc, finished);
}
