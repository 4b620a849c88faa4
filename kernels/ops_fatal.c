// ops_fatal: the last words of a backend op that cannot go on (kernels/ops_common.h). Its own object,
// because it is the one place in kernels/ that writes to stderr (tests/check_no_print.sh allows it here
// and nowhere else in kernels/).
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "kernels/ops_common.h"

void ops_fatal(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    abort();
}
