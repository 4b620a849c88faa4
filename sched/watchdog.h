// watchdog: a time limit on a blocking step that only another process can end. MPI_Init and
// MPI_Finalize wait for every rank of the job; when a rank is killed outright (SIGKILL: no handler can
// run) while the others wait there, the survivors and mpirun can wait for it forever, and a Slurm job
// then burns its whole time limit and is never requeued. sched_init and sched_finalize run those two
// calls under a watchdog: a thread that, unless the step returns within the limit, writes one line on
// stderr and ends the process with _exit (nothing of the run is open there: no file is being written
// before MPI_Init or after the last stage).
//
// The limit is EDGEPATCH_MPI_TIMEOUT seconds (default 600: a start of many ranks on a busy cluster
// takes well under that), and 0 turns the watchdog off. The exit status is SCHED_EXIT_INTERRUPTED (75,
// "rerun to resume") when a stop request (SIGTERM, SIGUSR1) is pending or was received, so that a
// preempted job is requeued as when the stop is handled; otherwise `status` (the step's own outcome:
// 1 for a start that never finished, the run's exit status for a finalize).
#ifndef EP_SCHED_WATCHDOG_H
#define EP_SCHED_WATCHDOG_H

#include <pthread.h>

typedef struct {
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t done_cond;
    int running, done;
    double seconds;
    int status;
    char what[96];
} sched_watchdog;

// The limit from the environment (EDGEPATCH_MPI_TIMEOUT), in seconds; 0: off.
double sched_watchdog_limit(void);
// Starts the watchdog of one step, named `what` in its message ("MPI_Init"). seconds <= 0: does nothing.
// Start it with the stop signals held (sched_signals_hold): the thread must never take them.
void sched_watchdog_start(sched_watchdog *w, const char *what, double seconds, int status);
// The step returned: stops and joins the thread.
void sched_watchdog_stop(sched_watchdog *w);

#endif
