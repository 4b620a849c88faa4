// hash: 64-bit FNV-1a content hashes that identify a stage's inputs (config, tokenizer, model files)
// in artifact attributes, printed as 16 hex digits. Identity, not security.
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

#endif
