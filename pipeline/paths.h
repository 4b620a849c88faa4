// paths: where the program finds the repository folders it ships with: datasets/ (task files, pair
// lists, word lists) and slurm/ (batch script templates).
//
// Search order for a folder F, the first that has the file asked for: the install prefix's data folder
// relative to the executable (<prefix>/bin/edgepatch -> <prefix>/share/edgepatch/F, as `cmake --install`
// lays it out; EP_SHARE_FROM_BIN, set by the build, is that relative path), F next to the executable's
// folder's parent or grandparent (build trees: build/edgepatch -> ../F), inside the executable's folder,
// then ./F (the working directory). For datasets/, $EDGEPATCH_DATA (a folder holding tasks/, pairs/,
// words/) comes before all of them. docs/install.md.
#ifndef EP_PATHS_H
#define EP_PATHS_H

#include <stddef.h>

#include "pipeline/error.h"

// Fills out with the path of `relative` inside the data folder; fails if no data folder has it.
int data_path(const char *relative, char *out, size_t n, ep_error *err);
// Fills out with the path of `relative` inside the repository folder `folder`; -1 if none has it.
int repo_path(const char *folder, const char *relative, char *out, size_t n);
// The folder part of a path ("a/b/c.json" -> "a/b", "c.json" -> ".").
void dir_of(const char *path, char *out, size_t n);
// `rel` resolved against folder `base` unless it is absolute.
void path_join(const char *base, const char *rel, char *out, size_t n);

#endif
