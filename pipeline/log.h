// log: the one sink library code writes its lines through (the stages, the work driver, progress).
//
// A sink is a plain struct the caller owns and passes down (stage_inputs.log, work_stage.log,
// sched_ctx.log, tokenize_stage's argument): there is no global logger. It keeps the two streams the
// program has always had: results (what a stage produced: "patch: accuracy ...", "... is up to date")
// go to `results` (stdout), diagnostics (rebuilding, recomputing, a rank's failure, progress) go to
// `diagnostics` (stderr). Each line has a level; lines above the sink's level are dropped.
//
// Format, decided in docs/distribution.md ("Logs"): by default a line is written exactly as given, so
// a run's output is what it always was. With `timestamps` every line starts with the local time,
// "2026-12-01T14:03:07+01:00 "; with `rank_prefix` and more than one rank, then "[rank R/N] ". Both
// are off unless asked for (EDGEPATCH_LOG_TIME, EDGEPATCH_LOG_RANK; slurm/edgepatch.sbatch sets them).
//
// A NULL sink drops every line (a library caller that wants silence). Outside this module library code
// never writes to stdout or stderr (tests/check_no_print.sh fails the build's tests if it does); the
// one other way out is ep_fatal, the last words of a process that cannot go on.
#ifndef EP_LOG_H
#define EP_LOG_H

#include <stdio.h>
#include <time.h>

#include "pipeline/error.h"

typedef enum { EP_LOG_ERROR = 0, EP_LOG_WARN = 1, EP_LOG_INFO = 2, EP_LOG_DEBUG = 3 } ep_log_level;

typedef struct {
    FILE *results;      // result lines (stdout in the program)
    FILE *diagnostics;  // errors, warnings, progress (stderr in the program)
    ep_log_level level;  // lines of a higher level are dropped (EP_LOG_INFO by default)
    int timestamps;      // 1: each line starts with the local time
    int rank_prefix;     // 1: each line starts with "[rank R/N] " when size > 1
    int rank, size;
    time_t (*clock)(void);  // the time stamped; NULL: time(NULL). Tests fix it.
} ep_log;

// Results to `results`, diagnostics to `diagnostics`, level info, no prefixes, one rank.
void ep_log_init(ep_log *log, FILE *results, FILE *diagnostics);
// Reads the options from the environment, for this process's rank of size ranks:
//   EDGEPATCH_LOG_LEVEL  error, warn, info (the default) or debug
//   EDGEPATCH_LOG_TIME   1: timestamps (0 or unset: none)
//   EDGEPATCH_LOG_RANK   1: the rank prefix when the job has more than one rank (0 or unset: none)
// A value that is none of these is an error naming the variable; log is then left as it was.
int ep_log_configure(ep_log *log, int rank, int size, ep_error *err);
// Parses a level name ("error", "warn", "info", "debug"); -1 for anything else.
int ep_log_level_parse(const char *name);

// One diagnostic line at level (the newline is added).
void ep_logf(const ep_log *log, ep_log_level level, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
// One result line at level info (the newline is added).
void ep_log_result(const ep_log *log, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
// A progress bar redrawn in place on the diagnostics stream (level info): "\r", the prefixes, the text,
// and a newline when final. Only for a terminal (ep_log_is_tty).
void ep_log_bar(const ep_log *log, int final, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
// 1 if the diagnostics stream is a terminal (where progress draws a bar instead of lines).
int ep_log_is_tty(const ep_log *log);
// 1 if a line of this level would be written.
int ep_log_enabled(const ep_log *log, ep_log_level level);

// The prefix of a line written at time t: "" by default, else the timestamp and the rank as described
// above. Exposed for the tests.
void ep_log_prefix(const ep_log *log, time_t t, char *out, size_t size);

// The last words of a process that cannot go on (out of memory): the message on stderr, then
// exit(status). Never returns.
_Noreturn void ep_fatal(int status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
