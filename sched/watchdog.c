#include "watchdog.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "sched/signals.h"

double sched_watchdog_limit(void) {
    const char *s = getenv("EDGEPATCH_MPI_TIMEOUT");
    if (!s || !*s) return 600;
    char *end;
    double v = strtod(s, &end);
    return *end || !(v >= 0) ? 600 : v;
}

// A stop request that the held signals keep pending, or one the handler already took.
static int stop_pending(void) {
    sigset_t pending;
    if (sched_stop_requested()) return 1;
    if (sigpending(&pending) != 0) return 0;
    return sigismember(&pending, SIGTERM) == 1 || sigismember(&pending, SIGUSR1) == 1;
}

static void *watch(void *arg) {
    sched_watchdog *w = arg;
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    double whole = (double)(long)w->seconds;
    until.tv_sec += (time_t)whole;
    until.tv_nsec += (long)((w->seconds - whole) * 1e9);
    if (until.tv_nsec >= 1000000000L) until.tv_sec++, until.tv_nsec -= 1000000000L;
    pthread_mutex_lock(&w->lock);
    int rc = 0;
    while (!w->done && rc != ETIMEDOUT) rc = pthread_cond_timedwait(&w->done_cond, &w->lock, &until);
    int expired = !w->done;
    pthread_mutex_unlock(&w->lock);
    if (!expired) return NULL;
    int status = stop_pending() ? SCHED_EXIT_INTERRUPTED : w->status;
    char line[256];
    int n = snprintf(line, sizeof line,
                     "edgepatch: %s did not return within %g s (another rank of the job died?); exiting with status %d "
                     "(EDGEPATCH_MPI_TIMEOUT sets the limit)\n", w->what, w->seconds, status);
    if (n > 0 && write(STDERR_FILENO, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1) < 0) n = 0;
    _exit(status);
}

void sched_watchdog_start(sched_watchdog *w, const char *what, double seconds, int status) {
    memset(w, 0, sizeof *w);
    if (!(seconds > 0)) return;
    w->seconds = seconds, w->status = status;
    snprintf(w->what, sizeof w->what, "%s", what);
    pthread_mutex_init(&w->lock, NULL);
    pthread_cond_init(&w->done_cond, NULL);
    w->running = pthread_create(&w->thread, NULL, watch, w) == 0;
    if (!w->running) pthread_mutex_destroy(&w->lock), pthread_cond_destroy(&w->done_cond);
}

void sched_watchdog_stop(sched_watchdog *w) {
    if (!w->running) return;
    pthread_mutex_lock(&w->lock);
    w->done = 1;
    pthread_cond_signal(&w->done_cond);
    pthread_mutex_unlock(&w->lock);
    pthread_join(w->thread, NULL);
    pthread_mutex_destroy(&w->lock);
    pthread_cond_destroy(&w->done_cond);
    w->running = 0;
}
