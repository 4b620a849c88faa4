// cpu_gemm: a small pthread pool and the tiled, thread-count-independent sgemm (kernels/cpu_gemm.h).
//
// Why not OpenBLAS's own threads: OpenBLAS splits a product over its threads by thread count, and its
// kernels for the pieces sum in different orders, so 1 and 2 threads gave different bits for some shapes
// (M=68, N=108, K=579 NoTrans/Trans among them), and an unlaunched run differed from an `mpirun` rank
// bound to one core. Why not OpenMP: with it next to OpenBLAS's pool the two runtimes spin-waited for the
// same cores (docs/benchmarks.md); a pool of our own, blocking on a condition variable between jobs,
// keeps one runtime and lets nested or concurrent calls fall back to the caller's thread.
#define _GNU_SOURCE  // sched_getaffinity, CPU_COUNT
#include "kernels/cpu_gemm.h"

#include <cblas.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

// The pool. Written once by pool_init under pthread_once; afterwards the job fields change only under
// mu, by the one caller that holds busy.
typedef struct {
    int n_threads;  // the caller plus the workers that were created
    pthread_mutex_t mu;
    pthread_cond_t start, done;
    unsigned long generation;  // bumped per job: a worker runs each job once
    int running;               // workers not yet finished with the current job
    cpu_task_fn fn;
    void *ctx;
    int n_tasks;
    atomic_int next;  // the next task to hand out
    atomic_flag busy;
} cpu_pool;

static cpu_pool pool = {.mu = PTHREAD_MUTEX_INITIALIZER,
                        .start = PTHREAD_COND_INITIALIZER,
                        .done = PTHREAD_COND_INITIALIZER,
                        .busy = ATOMIC_FLAG_INIT};
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;

// A positive leading integer of the variable ("4" or OMP's "4,2"), else 0.
static int env_count(const char *name) {
    const char *s = getenv(name);
    if (!s) return 0;
    char *end;
    long v = strtol(s, &end, 10);
    return end != s && v > 0 ? (v < CPU_MAX_THREADS ? (int)v : CPU_MAX_THREADS) : 0;
}

static int wanted_threads(void) {
    int n = env_count("OPENBLAS_NUM_THREADS");  // OpenBLAS's own order: its variable before OpenMP's
    if (!n) n = env_count("OMP_NUM_THREADS");
    if (!n) {
        cpu_set_t set;
        n = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : (int)sysconf(_SC_NPROCESSORS_ONLN);
    }
    return n < 1 ? 1 : n > CPU_MAX_THREADS ? CPU_MAX_THREADS : n;
}

static void run_tasks(cpu_task_fn fn, void *ctx, int n_tasks, int worker) {
    for (int t; (t = atomic_fetch_add(&pool.next, 1)) < n_tasks;) fn(ctx, t, worker);
}

static void *worker_main(void *arg) {
    int worker = (int)(intptr_t)arg;
    unsigned long seen = 0;
    pthread_mutex_lock(&pool.mu);
    for (;;) {
        while (pool.generation == seen) pthread_cond_wait(&pool.start, &pool.mu);
        seen = pool.generation;
        cpu_task_fn fn = pool.fn;
        void *ctx = pool.ctx;
        int n_tasks = pool.n_tasks;
        if (worker >= n_tasks) continue;  // workers 1 .. n_tasks - 1 take part: worker ids stay below n_tasks
        pthread_mutex_unlock(&pool.mu);
        run_tasks(fn, ctx, n_tasks, worker);
        pthread_mutex_lock(&pool.mu);
        if (--pool.running == 0) pthread_cond_signal(&pool.done);
    }
    return NULL;
}

// A forked child has only the forking thread: it runs every task itself (the same bits, by design).
static void pool_after_fork(void) { pool.n_threads = 1; }

static void pool_init(void) {
    // Before any product: every tile is one single-threaded BLAS call from whichever thread runs it.
    openblas_set_num_threads(1);
    int want = wanted_threads();
    pool.n_threads = 1;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    for (int i = 1; i < want; i++) {
        pthread_t th;
        if (pthread_create(&th, &attr, worker_main, (void *)(intptr_t)i) != 0) break;
        pool.n_threads++;
    }
    pthread_attr_destroy(&attr);
    pthread_atfork(NULL, NULL, pool_after_fork);
}

int cpu_threads(void) {
    pthread_once(&pool_once, pool_init);
    return pool.n_threads;
}

void cpu_parallel_for(int n_tasks, cpu_task_fn fn, void *ctx) {
    pthread_once(&pool_once, pool_init);
    if (n_tasks <= 0) return;
    if (n_tasks == 1 || pool.n_threads == 1 || atomic_flag_test_and_set(&pool.busy)) {
        for (int t = 0; t < n_tasks; t++) fn(ctx, t, 0);
        return;
    }
    pthread_mutex_lock(&pool.mu);
    pool.fn = fn, pool.ctx = ctx, pool.n_tasks = n_tasks;
    atomic_store(&pool.next, 0);
    pool.running = (n_tasks < pool.n_threads ? n_tasks : pool.n_threads) - 1;
    pool.generation++;
    pthread_cond_broadcast(&pool.start);
    pthread_mutex_unlock(&pool.mu);
    run_tasks(fn, ctx, n_tasks, 0);
    pthread_mutex_lock(&pool.mu);
    while (pool.running > 0) pthread_cond_wait(&pool.done, &pool.mu);
    pthread_mutex_unlock(&pool.mu);
    atomic_flag_clear(&pool.busy);
}

typedef struct {
    int trans_a, trans_b, m, n, k, lda, ldb, ldc, tiles_n;
    float alpha, beta;
    const float *a, *b;
    float *c;
} gemm_job;

static void gemm_tile(const gemm_job *g, int i0, int j0) {
    int mt = g->m - i0 < CPU_TILE_M ? g->m - i0 : CPU_TILE_M, nt = g->n - j0 < CPU_TILE_N ? g->n - j0 : CPU_TILE_N;
    // Rows i0.. of op(a) and columns j0.. of op(b), wherever their storage puts them.
    const float *a = g->a + (g->trans_a ? (size_t)i0 : (size_t)i0 * g->lda);
    const float *b = g->b + (g->trans_b ? (size_t)j0 * g->ldb : (size_t)j0);
    cblas_sgemm(CblasRowMajor, g->trans_a ? CblasTrans : CblasNoTrans, g->trans_b ? CblasTrans : CblasNoTrans, mt, nt,
                g->k, g->alpha, a, g->lda, b, g->ldb, g->beta, g->c + (size_t)i0 * g->ldc + j0, g->ldc);
}

static void gemm_task(void *ctx, int task, int worker) {
    const gemm_job *g = ctx;
    gemm_tile(g, task / g->tiles_n * CPU_TILE_M, task % g->tiles_n * CPU_TILE_N);
}

void cpu_sgemm(int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a, int lda, const float *b,
               int ldb, float beta, float *c, int ldc) {
    pthread_once(&pool_once, pool_init);
    if (m <= 0 || n <= 0) return;
    gemm_job g = {trans_a, trans_b, m, n, k, lda, ldb, ldc, (n + CPU_TILE_N - 1) / CPU_TILE_N, alpha, beta, a, b, c};
    int tiles = (m + CPU_TILE_M - 1) / CPU_TILE_M * g.tiles_n;
    if (tiles == 1)
        gemm_tile(&g, 0, 0);
    else
        cpu_parallel_for(tiles, gemm_task, &g);
}
