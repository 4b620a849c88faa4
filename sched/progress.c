#include "progress.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void format_eta(double s, char *out, size_t size) {
    if (s < 0 || s > 1e8) snprintf(out, size, "?");
    else if (s < 60) snprintf(out, size, "%.0fs", s);
    else if (s < 3600) snprintf(out, size, "%dm%02ds", (int)s / 60, (int)s % 60);
    else snprintf(out, size, "%dh%02dm", (int)s / 3600, (int)s % 3600 / 60);
}

static void show(progress *p, int final) {
    double t = now(), elapsed = t - p->t0;
    int fresh_done = p->done - p->done_at_start;
    double rate = elapsed > 0 ? fresh_done / elapsed : 0;
    char eta[32];
    format_eta(rate > 0 ? (p->total - p->done) / rate : -1, eta, sizeof eta);
    int pct = p->total ? (int)(100.0 * p->done / p->total) : 100;
    if (p->tty) {
        char bar[31];
        int fill = p->total ? 30 * p->done / p->total : 30;
        for (int i = 0; i < 30; i++) bar[i] = i < fill ? '#' : '.';
        bar[30] = 0;
        ep_log_bar(p->log, final, "%s [%s] %d/%d items %3d%%  %.2f items/s  ETA %s   ", p->stage, bar, p->done, p->total,
                   pct, rate, final ? "0s" : eta);
    } else if (final) {
        ep_logf(p->log, EP_LOG_INFO, "%s: %d/%d items done, %d in this run in %.1fs (%.2f items/s, %d rank%s)", p->stage,
                p->done, p->total, fresh_done, elapsed, rate, p->ranks, p->ranks == 1 ? "" : "s");
    } else {
        ep_logf(p->log, EP_LOG_INFO, "%s: %d/%d items (%d%%), %.2f items/s, ETA %s", p->stage, p->done, p->total, pct, rate,
                eta);
    }
    p->last_print = t;
}

void progress_start(progress *p, const ep_log *log, const char *stage, int total, int already_done, int ranks) {
    const char *every = getenv("EDGEPATCH_PROGRESS_SECONDS");
    *p = (progress){.log = log, .stage = stage, .total = total, .done = already_done, .done_at_start = already_done,
                    .ranks = ranks, .tty = ep_log_is_tty(log), .active = 1, .every = every ? atof(every) : 30.0};
    p->t0 = p->last_print = now();
    if (!p->tty)
        ep_logf(log, EP_LOG_INFO, "%s: %d items, %d already done, %d to run on %d rank%s", stage, total, already_done,
                total - already_done, ranks, ranks == 1 ? "" : "s");
    else show(p, 0);
}

void progress_tick(progress *p, int n) {
    if (!p->active) return;
    p->done += n;
    if (p->tty || now() - p->last_print >= p->every) show(p, 0);
}

void progress_end(progress *p) {
    if (!p->active) return;
    show(p, 1);
    p->active = 0;
}
