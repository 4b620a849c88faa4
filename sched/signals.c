#include "signals.h"

#include <pthread.h>
#include <string.h>

#include "pipeline/stop_signals.h"

static volatile sig_atomic_t stop_signal = 0;

static void on_stop(int sig) { stop_signal = sig; }

void sched_signals_install(void) {
    // Once a stop was asked for, SA_RESETHAND has put that signal back to its default action: leave it
    // there, so a second one still ends the process at once.
    if (!stop_signal) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_stop;
        sa.sa_flags = SA_RESETHAND | SA_RESTART;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGTERM, &sa, NULL);
        sigaction(SIGUSR1, &sa, NULL);
    }
    sigset_t set = stop_signal_set();
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);
}

void sched_signals_hold(void) {
    sigset_t set = stop_signal_set();
    pthread_sigmask(SIG_BLOCK, &set, NULL);
}

int sched_stop_requested(void) { return stop_signal; }
