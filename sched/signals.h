// signals: the stop request. SIGTERM and SIGUSR1 (what Slurm sends before preemption or the time
// limit; mpirun forwards SIGUSR1 to every rank) set a flag that the work-item driver (sched/mpi_run)
// reads between items: the item in flight finishes and is committed, nothing new starts, and the run
// exits with SCHED_EXIT_INTERRUPTED so that a batch script can requeue it.
//
// A stop request must never find the default action (the process dies with 143 or 138: no requeue;
// under mpirun a rank dead in MPI_Init left mpirun waiting forever). The front, edgepatch
// (sched/cli/launch.c), starts the program with both signals blocked, so one that comes while the
// libraries load stays pending; the handler is installed first thing (sched_init, the report command)
// and only then are they unblocked. MPI_Init runs with them held again, so that the threads MPI starts
// never take them and a handler MPI may install never sees them; the handler is installed once more
// after it. A pending request reaches the handler at the unblocking.
//
// The flag is the one piece of global mutable state in edgepatch: a signal handler can reach nothing
// else. It is a volatile sig_atomic_t, written only by the handler and read only through
// sched_stop_requested. A second signal of the same kind takes the default action (the process ends
// at once), so an impatient second SIGTERM still works.
#ifndef EP_SCHED_SIGNALS_H
#define EP_SCHED_SIGNALS_H

#include <signal.h>

// Exit status of a run stopped by a signal: EX_TEMPFAIL, "interrupted, rerun to resume".
#define SCHED_EXIT_INTERRUPTED 75

// Installs the handler (again after MPI_Init, which may have put its own; not once a stop was
// requested) and unblocks SIGTERM and SIGUSR1 in the calling thread.
void sched_signals_install(void);
// Blocks SIGTERM and SIGUSR1 in the calling thread (and the threads it starts) until the next
// sched_signals_install.
void sched_signals_hold(void);
// The signal that asked to stop (SIGTERM or SIGUSR1), or 0.
int sched_stop_requested(void);

#endif
