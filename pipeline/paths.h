// paths: where the program finds its data folder (task files, pair lists, word lists, default config).
//
// Search order: $EDGEPATCH_DATA (a folder holding tasks/, pairs/, words/), then datasets/ next to the
// executable's folder or its parent (build trees: build/edgepatch -> ../datasets), then ./datasets.
#ifndef EP_PATHS_H
#define EP_PATHS_H

#include <stddef.h>

#include "pipeline/error.h"

// Fills out with the path of `relative` inside the data folder; fails if no data folder has it.
int data_path(const char *relative, char *out, size_t n, ep_error *err);
// The folder part of a path ("a/b/c.json" -> "a/b", "c.json" -> ".").
void dir_of(const char *path, char *out, size_t n);
// `rel` resolved against folder `base` unless it is absolute.
void path_join(const char *base, const char *rel, char *out, size_t n);

#endif
