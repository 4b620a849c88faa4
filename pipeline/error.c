#include "error.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

int ep_fail(ep_error *err, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return -1;
}

int ep_wrap(ep_error *err, const char *fmt, ...) {
    if (!err) return -1;
    char prefix[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    // Shift the old message right and put "prefix: " in front, truncating at the record's size.
    size_t plen = strlen(prefix), olen = strlen(err->msg), cap = sizeof err->msg - 1;
    if (plen + 2 > cap) plen = cap - 2;
    size_t keep = olen + plen + 2 > cap ? cap - plen - 2 : olen;
    memmove(err->msg + plen + 2, err->msg, keep);
    memcpy(err->msg, prefix, plen);
    err->msg[plen] = ':';
    err->msg[plen + 1] = ' ';
    err->msg[plen + 2 + keep] = 0;
    return -1;
}

static void out_of_memory(size_t n, const char *file, int line) {
    ep_fatal(3, "edgepatch: out of memory allocating %zu bytes at %s:%d", n, file, line);
}

void *ep_malloc_at(size_t n, const char *file, int line) {
    void *p = malloc(n ? n : 1);
    if (!p) out_of_memory(n, file, line);
    return p;
}

void *ep_calloc_at(size_t count, size_t size, const char *file, int line) {
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p) out_of_memory(count * size, file, line);
    return p;
}

void *ep_realloc_at(void *p, size_t n, const char *file, int line) {
    void *q = realloc(p, n ? n : 1);
    if (!q) out_of_memory(n, file, line);
    return q;
}

char *ep_strdup_at(const char *s, const char *file, int line) {
    size_t n = strlen(s) + 1;
    char *p = ep_malloc_at(n, file, line);
    memcpy(p, s, n);
    return p;
}
