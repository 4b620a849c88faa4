#include "mpi_run.h"

#include <mpi.h>
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
        fprintf(stderr, "edgepatch: test hook: rank %d kills itself in %s after %d items%s\n", sc->rank, sc->stage,
                sc->stage_items, in_write ? " (mid-write)" : "");
        fflush(stderr);
        raise(SIGKILL);
    }
}

static void before_commit(void *arg, int item) { maybe_kill(arg, 1); }

int sched_init(sched_ctx *sc, int *argc, char ***argv, ep_error *err) {
    memset(sc, 0, sizeof *sc);
    sc->size = 1;
    parse_hooks(sc);
    if (launched_by_mpi()) {
        int provided;
        if (MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
            return ep_fail(err, "MPI_Init failed (launched by mpirun or srun? see docs/distribution.md)");
        sc->mpi = 1;
        MPI_Comm_rank(MPI_COMM_WORLD, &sc->rank);
        MPI_Comm_size(MPI_COMM_WORLD, &sc->size);
    }
    // After MPI_Init, so that ours are the handlers in place.
    sched_signals_install();
    return 0;
}

void sched_finalize(sched_ctx *sc) {
    if (sc->mpi) MPI_Finalize();
    sc->mpi = 0;
}

int sched_agree(sched_ctx *sc, int status) {
    if (status == SCHED_OK && sched_stop_requested()) status = SCHED_STOPPED;
    if (sc->size > 1) MPI_Allreduce(MPI_IN_PLACE, &status, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    return status;
}

static int bcast_from_root(sched_ctx *sc, int value) {
    if (sc->size > 1) MPI_Bcast(&value, 1, MPI_INT, 0, MPI_COMM_WORLD);
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
    int zero = 0;
    for (int r = 1; r < sc->size; r++) MPI_Send(&zero, 1, MPI_INT, r, TAG_STOP, MPI_COMM_WORLD);
}

// One message from another rank, received by rank 0.
static void root_handle(sched_ctx *sc, root_view *v, int value, const MPI_Status *st) {
    if (st->MPI_TAG == TAG_ITEM) {
        progress_tick(&sc->prog, value);
    } else if (st->MPI_TAG == TAG_FINAL) {
        v->finals++;
        if (value > v->outcome) v->outcome = value;
        if (value == SCHED_FAILED && v->failed_rank < 0) v->failed_rank = st->MPI_SOURCE;
        if (value != SCHED_OK) send_stop(sc, v);
    }
}

static void root_drain(sched_ctx *sc, root_view *v, int block) {
    for (;;) {
        int flag = 1, value;
        MPI_Status st;
        if (!block) MPI_Iprobe(MPI_ANY_SOURCE, MPI_ANY_TAG, MPI_COMM_WORLD, &flag, &st);
        if (!flag) return;
        MPI_Recv(&value, 1, MPI_INT, MPI_ANY_SOURCE, MPI_ANY_TAG, MPI_COMM_WORLD, &st);
        root_handle(sc, v, value, &st);
        if (block) return;
    }
}

static int told_to_stop(sched_ctx *sc) {
    if (sc->size == 1 || sc->rank == 0) return 0;
    int flag = 0;
    MPI_Iprobe(0, TAG_STOP, MPI_COMM_WORLD, &flag, MPI_STATUS_IGNORE);
    return flag;  // the message itself is consumed while waiting for TAG_DONE
}

int sched_run_stage(sched_ctx *sc, work_stage *ws, int fresh, ep_error *err) {
    int root = sc->rank == 0, n = ws->n_items;
    ws->before_commit = before_commit;
    ws->driver_arg = sc;
    sc->stage = ws->name;
    sc->stage_items = 0;

    int prepared = root ? ws->prepare(ws, fresh, err) : 0;
    prepared = bcast_from_root(sc, prepared);
    if (prepared < 0) return SCHED_FAILED;  // rank 0 holds the message
    if (prepared > 0) return SCHED_OK;

    // This rank's items whose shards are missing, unfinished or corrupted.
    int *pending = ep_malloc(sizeof(int) * (size_t)(n / sc->size + 1)), n_pending = 0, status = SCHED_OK;
    for (int i = sc->rank; i < n; i += sc->size) {
        int done = ws->item_done(ws, i, err);
        if (done < 0) {
            status = SCHED_FAILED;
            break;
        }
        if (done == 0) pending[n_pending++] = i;
    }
    int counts[2] = {status == SCHED_FAILED, n_pending};
    if (sc->size > 1) MPI_Allreduce(MPI_IN_PLACE, counts, 2, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (counts[0]) {
        if (!root && status == SCHED_FAILED) fprintf(stderr, "edgepatch run: rank %d: %s\n", sc->rank, err->msg);
        if (root && status != SCHED_FAILED)
            ep_fail(err, "%s: refused on another rank (its message is above)", ws->name);
        free(pending);
        return SCHED_FAILED;
    }
    if (root) progress_start(&sc->prog, ws->name, n, n - counts[1], sc->size);

    root_view view = {.outcome = SCHED_OK, .failed_rank = -1};
    for (int k = 0; k < n_pending && status == SCHED_OK; k++) {
        if (root && sc->size > 1) {
            root_drain(sc, &view, 0);
            if (view.outcome != SCHED_OK) break;
        }
        if (sched_stop_requested() || told_to_stop(sc)) {
            status = SCHED_STOPPED;
            break;
        }
        maybe_kill(sc, 0);
        if (ws->run_item(ws, pending[k], err)) {
            status = SCHED_FAILED;
            if (!root) fprintf(stderr, "edgepatch run: rank %d: %s\n", sc->rank, err->msg);
            break;
        }
        sc->stage_items++;
        if (sc->delay_ms > 0) sleep_ms(sc->delay_ms);
        if (root) progress_tick(&sc->prog, 1);
        else {
            int one = 1;
            MPI_Send(&one, 1, MPI_INT, 0, TAG_ITEM, MPI_COMM_WORLD);
        }
    }
    free(pending);
    if (status == SCHED_OK && sched_stop_requested()) status = SCHED_STOPPED;

    int outcome = status;
    if (sc->size > 1 && root) {
        if (status != SCHED_OK) send_stop(sc, &view);
        while (view.finals < sc->size - 1) root_drain(sc, &view, 1);
        if (view.outcome > outcome) outcome = view.outcome;
        for (int r = 1; r < sc->size; r++) MPI_Send(&outcome, 1, MPI_INT, r, TAG_DONE, MPI_COMM_WORLD);
        if (outcome == SCHED_FAILED && status != SCHED_FAILED)
            ep_fail(err, "%s: stopped because rank %d failed (its message is above)", ws->name, view.failed_rank);
    } else if (sc->size > 1) {
        MPI_Send(&status, 1, MPI_INT, 0, TAG_FINAL, MPI_COMM_WORLD);
        for (;;) {
            MPI_Status st;
            int value;
            MPI_Recv(&value, 1, MPI_INT, 0, MPI_ANY_TAG, MPI_COMM_WORLD, &st);
            if (st.MPI_TAG == TAG_DONE) {
                outcome = value;
                break;
            }
        }
    }
    if (root) progress_end(&sc->prog);
    if (outcome != SCHED_OK) return outcome;

    int finished = root ? ws->finish(ws, err) : 0;
    finished = bcast_from_root(sc, finished);
    return finished ? SCHED_FAILED : SCHED_OK;
}
