#include "cli.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline/error.h"

int cli_wants_help(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--")) return 0;
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) return 1;
    }
    return 0;
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
