// hash: 64-bit content hashes that identify a stage's inputs in artifact attributes, printed as 16 hex
// digits: FNV-1a for the small ones (config, tokenizer, headers, identities combined) and XXH64 for
// checkpoint files of tens of GB (pipeline/file_digest). Identity, not security.
#ifndef EP_HASH_H
#define EP_HASH_H

#include <stddef.h>
#include <stdint.h>

#include "pipeline/error.h"

#define HASH_INIT 0xcbf29ce484222325ull

uint64_t hash_bytes(uint64_t h, const void *data, size_t n);
uint64_t hash_str(uint64_t h, const char *s);  // includes the terminating NUL, so "ab","c" != "a","bc"
// Hashes a whole file; fails with a message naming it.
int hash_file(const char *path, uint64_t *out, ep_error *err);
void hash_hex(uint64_t h, char out[17]);
// XXH64 (Yann Collet's xxHash, 64-bit; the same value as the reference library's XXH64(data, n, seed)):
// about ten times FNV-1a's speed, which reads a byte per multiply.
uint64_t hash_xxh64(const void *data, size_t n, uint64_t seed);

#endif
