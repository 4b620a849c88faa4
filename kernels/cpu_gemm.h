// cpu_gemm: the cpu backend's threads and its one matrix product, whose bits never depend on how many
// threads compute it.
//
// Owns: one pool of worker threads per process (the cpu backend's context: kernel_ops_cpu() has no
// other), created on first use under pthread_once and never resized. Its size is read once from the
// environment as users set it: OPENBLAS_NUM_THREADS, else OMP_NUM_THREADS, else the CPUs in the
// process's affinity mask (an Open MPI rank bound to one core gets 1), at most CPU_MAX_THREADS. At
// creation OpenBLAS is set to one thread: every BLAS product in the project is single-threaded and the
// parallelism is ours.
// Promises: cpu_sgemm cuts C into fixed tiles of CPU_TILE_M x CPU_TILE_N elements (never along the sum,
// never by thread count) and runs each tile as one single-threaded cblas_sgemm, so every element is
// summed in an order that depends on the shapes only: 1, 2 or 64 threads, nested or not, give the same
// bytes (docs/distribution.md). cpu_parallel_for hands out independent tasks; a call made while the
// pool is busy (from inside a task, or from a second thread) runs its tasks in the calling thread,
// which changes the speed, never the result; so does a forked child, which has no workers.
// Never: splits a dot product, prints, or fails (a thread that cannot be created leaves a smaller
// pool). It is the one place the project calls cblas_sgemm (kernels/ops_cpu.c, pipeline/backward.c).
#ifndef EP_KERNELS_CPU_GEMM_H
#define EP_KERNELS_CPU_GEMM_H

enum { CPU_TILE_M = 256, CPU_TILE_N = 256, CPU_MAX_THREADS = 64 };

// Threads of the pool, the caller included (>= 1).
int cpu_threads(void);

// fn(ctx, task, worker) for every task in [0, n_tasks), spread over the pool; worker, below both
// n_tasks and cpu_threads(), names the thread running it (a slot of per-thread scratch). Tasks must not
// depend on one another's order. Returns when all are done.
typedef void (*cpu_task_fn)(void *ctx, int task, int worker);
void cpu_parallel_for(int n_tasks, cpu_task_fn fn, void *ctx);

// Row-major c[m, n] = alpha op(a)[m, k] . op(b)[k, n] + beta c, op = transpose when trans_* is set
// (a is then stored k x m, b n x k), row strides lda, ldb, ldc: cblas_sgemm's CblasRowMajor contract.
void cpu_sgemm(int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a, int lda, const float *b,
               int ldb, float beta, float *c, int ldc);

#endif
