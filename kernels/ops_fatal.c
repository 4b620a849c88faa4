// ops_fatal: the last words of a backend op that cannot go on (kernels/ops_common.h), and of an
// allocation that fails (kernels/alloc.h). Its own object, because it is the one place in kernels/ that
// writes to stderr (tests/check_no_print.sh allows it here
// and nowhere else in kernels/).
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "kernels/alloc.h"
#include "kernels/ops_common.h"

void ops_fatal(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    abort();
}

void *kernel_alloc_at(size_t count, size_t size, int zero, const char *file, int line) {
    size_t bytes = count * size;
    void *p = zero ? calloc(bytes ? count : 1, bytes ? size : 1) : malloc(bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "edgepatch: out of memory allocating %zu bytes at %s:%d\n", bytes, file, line);
        exit(3);
    }
    return p;
}
