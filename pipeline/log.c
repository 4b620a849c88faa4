#include "log.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

void ep_log_init(ep_log *log, FILE *results, FILE *diagnostics) {
    *log = (ep_log){.results = results, .diagnostics = diagnostics, .level = EP_LOG_INFO, .size = 1};
}

int ep_log_level_parse(const char *name) {
    static const char *const names[] = {"error", "warn", "info", "debug"};
    for (int i = 0; i < 4; i++)
        if (name && !strcmp(name, names[i])) return i;
    return -1;
}

// An on/off variable: unset or empty 0, "0" 0, "1" 1, anything else -1.
static int switch_value(const char *v) {
    if (!v || !*v || !strcmp(v, "0")) return 0;
    return !strcmp(v, "1") ? 1 : -1;
}

int ep_log_configure(ep_log *log, int rank, int size, ep_error *err) {
    const char *level = getenv("EDGEPATCH_LOG_LEVEL"), *time = getenv("EDGEPATCH_LOG_TIME"),
               *ranks = getenv("EDGEPATCH_LOG_RANK");
    int lv = level && *level ? ep_log_level_parse(level) : EP_LOG_INFO;
    if (lv < 0) return ep_fail(err, "EDGEPATCH_LOG_LEVEL: '%s' is not error, warn, info or debug", level);
    int ts = switch_value(time), rp = switch_value(ranks);
    if (ts < 0) return ep_fail(err, "EDGEPATCH_LOG_TIME: '%s' is not 0 or 1", time);
    if (rp < 0) return ep_fail(err, "EDGEPATCH_LOG_RANK: '%s' is not 0 or 1", ranks);
    log->level = (ep_log_level)lv;
    log->timestamps = ts;
    log->rank_prefix = rp;
    log->rank = rank;
    log->size = size;
    return 0;
}

int ep_log_enabled(const ep_log *log, ep_log_level level) { return log && level <= log->level; }

int ep_log_is_tty(const ep_log *log) {
    if (!log || !log->diagnostics) return 0;
    int fd = fileno(log->diagnostics);
    return fd >= 0 && isatty(fd);
}

void ep_log_prefix(const ep_log *log, time_t t, char *out, size_t size) {
    size_t n = 0;
    out[0] = 0;
    if (log->timestamps) {
        // ISO 8601 local time with its offset (+01:00), so that lines of ranks on other nodes, or a log
        // read in another zone, still compare.
        struct tm tm;
        char zone[8] = "";
        if (localtime_r(&t, &tm) && strftime(out, size, "%Y-%m-%dT%H:%M:%S", &tm)) {
            n = strlen(out);
            if (strftime(zone, sizeof zone, "%z", &tm) == 5)  // "+0100"
                n += (size_t)snprintf(out + n, size - n, "%.3s:%.2s", zone, zone + 3);
            if (n + 1 < size) out[n++] = ' ', out[n] = 0;
        }
    }
    if (log->rank_prefix && log->size > 1 && n < size) snprintf(out + n, size - n, "[rank %d/%d] ", log->rank, log->size);
}

// Writes lead, the prefix, the formatted text and tail to f as one write, so that lines of threads or
// ranks sharing a log do not interleave mid-line; then flushes (progress and results must reach a
// Slurm log or a pipe as they happen).
static void emit(const ep_log *log, FILE *f, const char *lead, const char *tail, const char *fmt, va_list ap) {
    if (!f) return;
    char prefix[96];
    ep_log_prefix(log, log->clock ? log->clock() : time(NULL), prefix, sizeof prefix);
    char stack[2048];
    va_list copy;
    va_copy(copy, ap);
    int len = vsnprintf(NULL, 0, fmt, copy);
    va_end(copy);
    if (len < 0) return;
    size_t lead_n = strlen(lead), prefix_n = strlen(prefix), tail_n = strlen(tail);
    size_t total = lead_n + prefix_n + (size_t)len + tail_n + 1;
    char *buf = total <= sizeof stack ? stack : ep_malloc(total);
    memcpy(buf, lead, lead_n);
    memcpy(buf + lead_n, prefix, prefix_n);
    vsnprintf(buf + lead_n + prefix_n, (size_t)len + 1, fmt, ap);
    memcpy(buf + lead_n + prefix_n + len, tail, tail_n + 1);
    fputs(buf, f);
    fflush(f);
    if (buf != stack) free(buf);
}

void ep_logf(const ep_log *log, ep_log_level level, const char *fmt, ...) {
    if (!ep_log_enabled(log, level)) return;
    va_list ap;
    va_start(ap, fmt);
    emit(log, log->diagnostics, "", "\n", fmt, ap);
    va_end(ap);
}

void ep_log_result(const ep_log *log, const char *fmt, ...) {
    if (!ep_log_enabled(log, EP_LOG_INFO)) return;
    va_list ap;
    va_start(ap, fmt);
    emit(log, log->results, "", "\n", fmt, ap);
    va_end(ap);
}

void ep_log_bar(const ep_log *log, int final, const char *fmt, ...) {
    if (!ep_log_enabled(log, EP_LOG_INFO)) return;
    va_list ap;
    va_start(ap, fmt);
    emit(log, log->diagnostics, "\r", final ? "\n" : "", fmt, ap);
    va_end(ap);
}

_Noreturn void ep_fatal(int status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(status);
}
