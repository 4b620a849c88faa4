// mapped_file: a whole file mapped read-only, the checked way every binary reader (safetensors, GGUF)
// opens its input: open, stat, a minimum size, mmap; each failure one line naming the file.
#ifndef EP_MAPPED_FILE_H
#define EP_MAPPED_FILE_H

#include <stddef.h>

#include "pipeline/error.h"

// Maps path; fails if it is shorter than min_size, saying why with `min_what` ("a GGUF header alone
// takes 24"). Unmap with munmap(*map, *size).
int map_file_readonly(const char *path, size_t min_size, const char *min_what, void **map, size_t *size, ep_error *err);

#endif
