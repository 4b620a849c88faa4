// files: the run folder's file helpers: folders, atomic text and JSON files, the removal of what killed
// writers left, and trees. Every writer of the program (h5store for HDF5 files, these for text) writes
// "<name>.tmp-<pid>" and renames it onto <name> when done, so a reader never sees half a file.
#ifndef EP_FILES_H
#define EP_FILES_H

#include <jansson.h>

#include "pipeline/error.h"

// mkdir -p.
int make_dirs(const char *path, ep_error *err);
int write_text_atomic(const char *path, const char *text, ep_error *err);
// A JSON object as an indented file (keys in insertion order, reals to 8 digits, final newline), atomically.
int write_json_atomic(const char *path, json_t *o, ep_error *err);

// Temporaries: every writer writes "<name>.tmp-<pid>" (its own process id) and renames it onto <name>
// when done, so a temporary whose pid is no live process of this host was left by a killed writer and is
// never finished. Removes those in dir and, depth levels down, in its folders (symbolic links are not
// followed); a temporary of a live process (another command writing the same folder now, e.g. `edgepatch
// report` while a run goes on) is left alone. names (NULL-terminated, or NULL for any): only
// temporaries of these file names. Adds the number removed to *removed (if not NULL). A run folder has
// one `edgepatch run` at a time (docs/artifacts.md): a writer on another host is not seen here.
int remove_temporaries(const char *dir, int depth, const char *const *names, int *removed, ep_error *err);
// The pid of a temporary's name "<name>.tmp-<digits>", or 0 if name is no temporary's.
long temporary_pid(const char *name);
// Removes path: a file, or a folder with everything in it (symbolic links are removed, not followed). A
// path that does not exist is no error.
int remove_tree(const char *path, ep_error *err);
// Removes every entry of dir whose name starts with prefix ("" for all), as remove_tree.
int remove_entries(const char *dir, const char *prefix, ep_error *err);

#endif
