#include "cli.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline/error.h"

void cli_args_init(cli_args *a, const char *command, const char *usage, int argc, char **argv, const struct option *options) {
    *a = (cli_args){.command = command, .usage = usage, .argc = argc, .argv = argv, .options = options};
    a->positional = ep_malloc(sizeof(char *) * (size_t)(argc + 1));
    // "-": non-options come back in order as option 1 (no permutation, whatever POSIXLY_CORRECT says);
    // ":": a missing value is ':' rather than '?', and getopt prints nothing itself.
    size_t n = 0;
    a->shortopts[n++] = '-';
    a->shortopts[n++] = ':';
    for (const struct option *o = options; o->name && n + 3 < sizeof a->shortopts; o++) {
        if (o->flag || o->val >= 128 || !isalnum(o->val)) continue;
        a->shortopts[n++] = (char)o->val;
        if (o->has_arg != no_argument) a->shortopts[n++] = ':';
        if (o->has_arg == optional_argument) a->shortopts[n++] = ':';
    }
    a->shortopts[n] = 0;
    optind = 0;  // 0, not 1: glibc then forgets everything of the previous parse (a cluster half read)
    opterr = 0;
}

void cli_args_free(cli_args *a) {
    free(a->positional);
    a->positional = NULL;
}

static void usage_line(const cli_args *a, const char *fmt, va_list ap) {
    fprintf(stderr, "edgepatch %s: ", a->command);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, " (see 'edgepatch %s --help')\n", a->command);
}

int cli_usage_error(cli_args *a, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    usage_line(a, fmt, ap);
    va_end(ap);
    cli_args_free(a);
    return 2;
}

int cli_exactly_one(cli_args *a, const char *what) {
    if (a->n_positional == 0) return cli_usage_error(a, "need %s", what);
    if (a->n_positional > 1) return cli_usage_error(a, "unexpected argument '%s'", a->positional[1]);
    return 0;
}

static int usage_print(const cli_args *a, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int usage_print(const cli_args *a, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    usage_line(a, fmt, ap);
    va_end(ap);
    return CLI_USAGE;
}

static const struct option *option_of_val(const cli_args *a, int val) {
    for (const struct option *o = a->options; o->name; o++)
        if (!o->flag && o->val == val) return o;
    return NULL;
}

// An unknown or ambiguous long option: the element as given, its name without "--" and "=value".
static int bad_long_option(const cli_args *a, const char *element) {
    const char *name = element + 2;
    size_t len = strcspn(name, "=");
    int matches = 0;
    char first[64] = "", second[64] = "";
    for (const struct option *o = a->options; o->name; o++)
        if (len && !strncmp(o->name, name, len)) {
            snprintf(matches ? second : first, sizeof first, "%s", o->name);
            matches++;
        }
    if (matches > 1)
        return usage_print(a, "ambiguous option '--%.*s' (--%s, --%s%s)", (int)len, name, first, second, matches > 2 ? ", ..." : "");
    return usage_print(a, "unknown option '--%.*s'", (int)len, name);
}

int cli_next(cli_args *a) {
    for (;;) {
        int index = -1;
        int c = getopt_long(a->argc, a->argv, a->shortopts, a->options, &index);
        a->value = optarg;
        if (c == 1) {  // a positional, in order
            a->positional[a->n_positional++] = optarg;
            continue;
        }
        if (c == -1) {  // the end, or "--": everything after it is positional
            for (int i = optind; i < a->argc; i++) a->positional[a->n_positional++] = a->argv[i];
            return CLI_END;
        }
        const char *element = optind > 0 && optind <= a->argc ? a->argv[optind - 1] : "";
        if (c == ':') {
            const struct option *o = option_of_val(a, optopt);
            return usage_print(a, "option '--%s' needs a value", o ? o->name : "?");
        }
        if (c == '?') {
            const struct option *o = optopt ? option_of_val(a, optopt) : NULL;
            if (o && !strncmp(element, "--", 2)) return usage_print(a, "option '--%s' takes no value", o->name);
            if (!optopt && !strncmp(element, "--", 2)) return bad_long_option(a, element);
            return usage_print(a, "unknown option '-%c'", isprint(optopt) ? optopt : '?');
        }
        if (c == 'h' && option_of_val(a, 'h') && !strcmp(option_of_val(a, 'h')->name, "help")) {
            fputs(a->usage, stdout);
            return CLI_HELP;
        }
        return c;
    }
}

int cli_args_exit(cli_args *a, int code) {
    cli_args_free(a);
    return code == CLI_HELP ? 0 : 2;
}

static const char *option_label(const cli_args *a, const char *opt) { return opt ? opt : a->command; }

int cli_int_value(cli_args *a, const char *opt, long min, long max, int *out) {
    const char *s = a->value ? a->value : "";
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || *end || errno || v < min || v > max || v < INT_MIN || v > INT_MAX) {
        if (max >= INT_MAX) fprintf(stderr, "edgepatch %s: %s: expected an integer >= %ld, got '%s'\n", a->command, option_label(a, opt), min, s);
        else fprintf(stderr, "edgepatch %s: %s: expected an integer %ld..%ld, got '%s'\n", a->command, option_label(a, opt), min, max, s);
        return -1;
    }
    *out = (int)v;
    return 0;
}

int cli_double_value(cli_args *a, const char *opt, double min_exclusive, double *out) {
    const char *s = a->value ? a->value : "";
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end || errno || !isfinite(v) || !(v > min_exclusive)) {
        fprintf(stderr, "edgepatch %s: %s: expected a number > %g, got '%s'\n", a->command, option_label(a, opt), min_exclusive, s);
        return -1;
    }
    *out = v;
    return 0;
}

static int parse_only_mode;

void cli_set_parse_only(int on) { parse_only_mode = on; }
int cli_parse_only(void) { return parse_only_mode; }

int cli_args_done(cli_args *a) {
    printf("edgepatch %s: arguments ok\n", a->command);
    cli_args_free(a);
    return 0;
}

void cli_print_json(json_t *value, size_t flags) {
    if (value) json_dumpf(value, stdout, flags | JSON_ENCODE_ANY);
    else fputs("null", stdout);
    fputc('\n', stdout);
    json_decref(value);
}

int cli_parse_int_list(const char *s, int **out, int *n, char *msg, int msg_size) {
    int cap = 16, count = 0;
    int *v = ep_malloc(sizeof(int) * (size_t)cap);
    const char *p = s;
    while (*p) {
        char *end;
        errno = 0;
        long x = strtol(p, &end, 10);
        if (end == p || errno || x < INT_MIN || x > INT_MAX || (*end && *end != ',')) {
            snprintf(msg, (size_t)msg_size, "'%s' is not a comma-separated list of integers", s);
            free(v);
            return -1;
        }
        if (count == cap) v = ep_realloc(v, sizeof(int) * (size_t)(cap *= 2));
        v[count++] = (int)x;
        p = *end ? end + 1 : end;
    }
    if (count == 0) {
        snprintf(msg, (size_t)msg_size, "empty list");
        free(v);
        return -1;
    }
    *out = v;
    *n = count;
    return 0;
}
