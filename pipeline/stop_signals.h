// stop_signals: the signals that ask a run to stop, SIGTERM and SIGUSR1 (what Slurm sends before
// preemption or the time limit; mpirun forwards SIGUSR1 to every rank). One definition for the front
// that holds them (sched/cli/launch.c), the handler (sched/signals.h) and the children that must not
// take them (stages/report.c's gnuplot and dot). Header only: the static front links nothing else.
#ifndef EP_STOP_SIGNALS_H
#define EP_STOP_SIGNALS_H

#include <signal.h>

static inline sigset_t stop_signal_set(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGUSR1);
    return set;
}

#endif
