// alloc: the kernels' checked allocation. The bottom layer has no error module of its own: its ops
// cannot fail on input (kernels/ops.h states what they may assume), and running out of host memory is
// not an input error, so, as llm.c's mallocCheck does, it names the call site and exits (status 3, as
// pipeline/error.h's allocators).
#ifndef EP_KERNELS_ALLOC_H
#define EP_KERNELS_ALLOC_H

#include <stddef.h>

// kernels/ops_fatal.c, the one object of kernels/ that writes to stderr.
void *kernel_alloc_at(size_t count, size_t size, int zero, const char *file, int line);
#define kernel_malloc(n) kernel_alloc_at(1, (n), 0, __FILE__, __LINE__)
#define kernel_calloc(c, s) kernel_alloc_at((c), (s), 1, __FILE__, __LINE__)

#endif
