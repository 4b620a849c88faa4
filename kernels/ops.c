// ops: the backends by the names configs and command lines use.
#include <string.h>

#include "kernels/ops.h"

const kernel_ops *kernel_ops_named(const char *name) {
    if (!strcmp(name, "cpu")) return kernel_ops_cpu();
    if (!strcmp(name, "offset")) return kernel_ops_offset();
    if (!strcmp(name, "cuda")) return kernel_ops_cuda();
    if (!strcmp(name, "auto")) return kernel_ops_cuda() ? kernel_ops_cuda() : kernel_ops_cpu();
    return NULL;
}
