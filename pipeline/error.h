// error: the error record every fallible function fills, and checked allocation.
//
// Contract: a function that can fail returns 0 on success and -1 on failure, after writing one line
// into the caller's ep_error that names the file, the field and what was expected
// ("config.json: num_key_value_heads = 3 does not divide num_attention_heads = 8"). Functions never
// print; the command line prints the record. Allocation failure is not an input error: the checked
// allocators print file:line and exit (through ep_fatal, pipeline/log.h), as llm.c's mallocCheck does.
#ifndef EP_ERROR_H
#define EP_ERROR_H

#include <stddef.h>

typedef struct {
    char msg[1024];
} ep_error;

// Formats the message into err (if err is non-NULL) and returns -1, so callers can write
// `return ep_fail(err, "...")`.
int ep_fail(ep_error *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

// Prefixes an existing message ("while loading X: <old message>"); returns -1.
int ep_wrap(ep_error *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

void *ep_malloc_at(size_t n, const char *file, int line);
void *ep_calloc_at(size_t count, size_t size, const char *file, int line);
void *ep_realloc_at(void *p, size_t n, const char *file, int line);
char *ep_strdup_at(const char *s, const char *file, int line);

#define ep_malloc(n) ep_malloc_at((n), __FILE__, __LINE__)
#define ep_calloc(c, s) ep_calloc_at((c), (s), __FILE__, __LINE__)
#define ep_realloc(p, n) ep_realloc_at((p), (n), __FILE__, __LINE__)
#define ep_strdup(s) ep_strdup_at((s), __FILE__, __LINE__)

#endif
