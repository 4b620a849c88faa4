// signals: the stop request. SIGTERM and SIGUSR1 (what Slurm sends before preemption or the time
// limit; mpirun forwards SIGUSR1 to every rank) set a flag that the work-item driver (sched/mpi_run)
// reads between items: the item in flight finishes and is committed, nothing new starts, and the run
// exits with SCHED_EXIT_INTERRUPTED so that a batch script can requeue it.
//
// The flag is the one piece of global mutable state in edgepatch: a signal handler can reach nothing
// else. It is a volatile sig_atomic_t, written only by the handler and read only through
// sched_stop_requested. A second signal of the same kind takes the default action (the process ends
// at once), so an impatient second SIGTERM still works.
#ifndef EP_SCHED_SIGNALS_H
#define EP_SCHED_SIGNALS_H

// Exit status of a run stopped by a signal: EX_TEMPFAIL, "interrupted, rerun to resume".
#define SCHED_EXIT_INTERRUPTED 75

void sched_signals_install(void);
// The signal that asked to stop (SIGTERM or SIGUSR1), or 0.
int sched_stop_requested(void);

#endif
