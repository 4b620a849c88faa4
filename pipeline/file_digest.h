// file_digest: content hashes of big input files (checkpoints of tens of GB), each read once and kept in
// a small JSON cache so that a rerun does not read them again.
//
// Owns: the cache file (a run keeps it in its output folder, docs/models.md, "identity"): one entry per
// file, by real path, with the key it was hashed under (size, mtime and ctime in ns, inode) and its
// XXH64. Promises: a digest comes from the cache only when the file's key is the entry's, else the file is
// read in full; the cache is rewritten atomically (temporary file, fsync, rename), so concurrent writers
// (the ranks of a run) each leave a whole file. Trusts the key: a file whose bytes changed while none of
// size, mtime, ctime and inode did keeps its old digest (docs/models.md says when that can happen).
// A missing, unreadable or foreign cache counts as empty. The cache keeps the files of the last call
// only, in canonical form, and is rewritten whenever its bytes are not that. Never prints.
#ifndef EP_FILE_DIGEST_H
#define EP_FILE_DIGEST_H

#include <stdint.h>

#include "pipeline/error.h"

typedef struct {
    int files_hashed;       // files read in full (no entry, or the key changed)
    uint64_t bytes_hashed;  // their bytes
    double seconds;         // spent reading and hashing them
} digest_stats;

// digests[i] = XXH64 (seed 0) of the bytes of paths[i], i < n, through the cache at cache_path. stats
// may be NULL. Fails with a message naming the file that cannot be read, or the cache that cannot be
// written.
int file_digests(const char *cache_path, int n, const char *const *paths, uint64_t *digests, digest_stats *stats,
                 ep_error *err);

#endif
