// edgepatch: the program users start, a small static front for edgepatch-core (beside it, same
// arguments and environment). It only blocks SIGTERM and SIGUSR1 before the core starts: the core
// loads MPI, HDF5, OpenBLAS and CUDA's libraries for 0.1-0.2 s before its first instruction, and a stop
// request in that window used to kill it (exit status 143 or 138: a preempted Slurm job was not
// requeued, and mpirun could wait for the dead rank forever). Blocked signals stay pending across
// exec, so the request waits until the core has installed its handler (sched/signals.h) and reaches
// it then. Being static, this front meets a signal with the default action only in the tenth of a
// millisecond from its exec to its first call, the window every program has.
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "pipeline/stop_signals.h"

int main(int argc, char **argv) {
    sigset_t stop = stop_signal_set();
    sigprocmask(SIG_BLOCK, &stop, NULL);
    char core[PATH_MAX + 32];
    ssize_t n = readlink("/proc/self/exe", core, PATH_MAX);
    if (n <= 0) {
        fprintf(stderr, "edgepatch: cannot find the program's own path (/proc/self/exe): %s\n", strerror(errno));
        return 127;
    }
    core[n] = 0;
    char *slash = strrchr(core, '/');
    strcpy(slash ? slash + 1 : core, "edgepatch-core");
    execv(core, argv);
    fprintf(stderr, "edgepatch: cannot start %s: %s\n", core, strerror(errno));
    return 127;
}
