// log sink (pipeline/log.h): each line lands on its stream exactly as written when no option is set
// (the program's output before the sink existed), levels filter, the rank prefix appears only with the
// option and more than one rank, and timestamps are ISO 8601 local time with the zone's offset. The
// expected timestamps were computed outside this program (GNU date: `TZ=UTC date -d @1764597787
// +%FT%T%:z` gives 2025-12-01T14:03:07+00:00), not taken from the sink's own output.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "pipeline/log.h"
#include "tests/harness.h"

// The stream's whole contents, rewound and truncated afterwards for the next check.
static const char *take(FILE *f) {
    static char buf[8192];
    fflush(f);
    long n = ftell(f);
    rewind(f);
    size_t got = fread(buf, 1, n > 0 && n < (long)sizeof buf ? (size_t)n : 0, f);
    buf[got] = 0;
    rewind(f);
    if (ftruncate(fileno(f), 0) != 0) buf[0] = 0;
    return buf;
}

static time_t fixed_clock(void) { return 1764597787; }  // 2025-12-01T14:03:07Z

static void use_zone(const char *tz) {
    setenv("TZ", tz, 1);
    tzset();
}

int main(void) {
    FILE *out = tmpfile(), *diag = tmpfile();
    if (!out || !diag) {
        check(0, "tmpfile");
        return test_finish("test_log");
    }
    ep_log log;
    ep_log_init(&log, out, diag);

    // Defaults: each line as given, on its own stream, a newline added; nothing else on the other one.
    ep_log_result(&log, "patch: %s is up to date", "run/patch.h5");
    check(!strcmp(take(out), "patch: run/patch.h5 is up to date\n"), "result line");
    check(!strcmp(take(diag), ""), "a result line went to diagnostics too");
    ep_logf(&log, EP_LOG_WARN, "edgepatch: recomputing an item: %s", "item-00001.h5: damaged");
    check(!strcmp(take(diag), "edgepatch: recomputing an item: item-00001.h5: damaged\n"), "warning line");
    check(!strcmp(take(out), ""), "a diagnostic went to results");
    ep_log_bar(&log, 0, "cache [%s] 1/2", "###...");
    check(!strcmp(take(diag), "\rcache [###...] 1/2"), "bar line: no newline until final");
    ep_log_bar(&log, 1, "cache [%s] 2/2   ", "######");
    check(!strcmp(take(diag), "\rcache [######] 2/2   \n"), "final bar line");
    // A line longer than the sink's stack buffer arrives whole.
    char longer[5000];
    memset(longer, 'x', sizeof longer - 1);
    longer[sizeof longer - 1] = 0;
    ep_logf(&log, EP_LOG_INFO, "%s|", longer);
    const char *got = take(diag);
    check(strlen(got) == 5001 && got[4999] == '|' && got[5000] == '\n' && got[0] == 'x', "long line: %zu bytes", strlen(got));

    // Levels: info by default (debug dropped), each setting keeps its level and those above.
    ep_logf(&log, EP_LOG_DEBUG, "debug line");
    check(!strcmp(take(diag), ""), "debug shown at level info");
    const char *names[] = {"error", "warn", "info", "debug"};
    for (int lv = 0; lv < 4; lv++) {
        log.level = (ep_log_level)lv;
        for (int m = 0; m < 4; m++) ep_logf(&log, (ep_log_level)m, "%s", names[m]);
        ep_log_result(&log, "result");
        char want[64] = "";
        for (int m = 0; m <= lv; m++) strcat(strcat(want, names[m]), "\n");
        check(!strcmp(take(diag), want), "level %s: diagnostics", names[lv]);
        check(!strcmp(take(out), lv >= EP_LOG_INFO ? "result\n" : ""), "level %s: results are info lines", names[lv]);
    }
    log.level = EP_LOG_INFO;
    check(ep_log_level_parse("warn") == EP_LOG_WARN && ep_log_level_parse("debug") == EP_LOG_DEBUG &&
              ep_log_level_parse("verbose") == -1 && ep_log_level_parse(NULL) == -1,
          "level names");

    // The rank prefix: only with the option, and only when the job has more than one rank.
    log.rank = 0, log.size = 1, log.rank_prefix = 1;
    ep_logf(&log, EP_LOG_INFO, "one rank");
    check(!strcmp(take(diag), "one rank\n"), "prefix on a one-rank job");
    log.rank = 3, log.size = 4, log.rank_prefix = 0;
    ep_logf(&log, EP_LOG_INFO, "no option");
    check(!strcmp(take(diag), "no option\n"), "prefix without the option");
    log.rank_prefix = 1;
    ep_log_result(&log, "patch: done");
    check(!strcmp(take(out), "[rank 3/4] patch: done\n"), "rank prefix on results");
    ep_log_bar(&log, 0, "bar");
    check(!strcmp(take(diag), "\r[rank 3/4] bar"), "rank prefix after a bar's carriage return");

    // Timestamps, in two zones (POSIX TZ strings, so no zone database is needed: "IST-5:30" is UTC+5:30,
    // "XST8" UTC-8).
    log.clock = fixed_clock;
    log.timestamps = 1, log.rank_prefix = 0;
    use_zone("UTC0");
    ep_logf(&log, EP_LOG_WARN, "w");
    check(!strcmp(take(diag), "2025-12-01T14:03:07+00:00 w\n"), "timestamp in UTC");
    use_zone("IST-5:30");
    log.rank_prefix = 1;
    ep_log_result(&log, "r");
    check(!strcmp(take(out), "2025-12-01T19:33:07+05:30 [rank 3/4] r\n"), "timestamp at +05:30 with the rank");
    use_zone("XST8");
    char prefix[96];
    ep_log_prefix(&log, 0, prefix, sizeof prefix);
    check(!strcmp(prefix, "1969-12-31T16:00:00-08:00 [rank 3/4] "), "the epoch at -08:00: '%s'", prefix);
    log.timestamps = 0;
    ep_log_prefix(&log, 0, prefix, sizeof prefix);
    check(!strcmp(prefix, "[rank 3/4] "), "rank alone: '%s'", prefix);

    // A NULL sink writes nothing and says nothing is enabled.
    ep_logf(NULL, EP_LOG_ERROR, "nowhere");
    ep_log_result(NULL, "nowhere");
    check(!ep_log_enabled(NULL, EP_LOG_ERROR) && !strcmp(take(out), "") && !strcmp(take(diag), ""), "NULL sink");

    // Options from the environment: accepted values, and each bad one refused naming its variable.
    ep_error err = {{0}};
    ep_log env;
    ep_log_init(&env, out, diag);
    setenv("EDGEPATCH_LOG_LEVEL", "debug", 1), setenv("EDGEPATCH_LOG_TIME", "1", 1), setenv("EDGEPATCH_LOG_RANK", "1", 1);
    check(ep_log_configure(&env, 1, 2, &err) == 0 && env.level == EP_LOG_DEBUG && env.timestamps && env.rank_prefix &&
              env.rank == 1 && env.size == 2,
          "options from the environment: %s", err.msg);
    unsetenv("EDGEPATCH_LOG_LEVEL"), setenv("EDGEPATCH_LOG_TIME", "0", 1), unsetenv("EDGEPATCH_LOG_RANK");
    check(ep_log_configure(&env, 0, 1, &err) == 0 && env.level == EP_LOG_INFO && !env.timestamps && !env.rank_prefix,
          "defaults: %s", err.msg);
    const char *vars[] = {"EDGEPATCH_LOG_LEVEL", "EDGEPATCH_LOG_TIME", "EDGEPATCH_LOG_RANK"};
    for (int v = 0; v < 3; v++) {
        setenv(vars[v], "yes", 1);
        err.msg[0] = 0;
        ep_log before = env;
        check(ep_log_configure(&env, 0, 1, &err) == -1 && strstr(err.msg, vars[v]) && strstr(err.msg, "'yes'") &&
                  !memcmp(&before, &env, sizeof env),
              "bad %s: '%s'", vars[v], err.msg);
        unsetenv(vars[v]);
    }
    fclose(out), fclose(diag);
    return test_finish("test_log");
}
