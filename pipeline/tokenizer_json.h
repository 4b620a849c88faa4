// tokenizer_json: a small, strict JSON reader over a tokenizer.json held in memory, for the two parts that
// are nearly all of the file: model.vocab (an object of piece -> id) and model.merges (an array). Building
// a jansson tree of them cost more than half of a load (one malloc'd node per entry, freed again right
// after); reading them straight from the text into the BPE maps does not allocate per entry.
//
// Contract: tjson_locate finds where the values of model.vocab and model.merges start (the last "model"
// member of the top-level object, and its last "vocab" / "merges" member, as jansson keeps the last of a
// duplicated key) and returns a copy of the document with those two values replaced by `null`, for
// jansson to parse the small rest; the copy keeps the newlines of the cut values, so jansson's line
// numbers in error messages stay those of the file. The reader functions (tjson_string, tjson_int, ...)
// are strict RFC 8259 where they read (UTF-8 checked, escapes and surrogate pairs decoded, no control
// characters), except that \u0000 is accepted inside strings (HF tokenizers accepts it; jansson refuses
// it without JSON_ALLOW_NUL). Errors name the file, line and column. Never prints, no global state.
#ifndef EP_TOKENIZER_JSON_H
#define EP_TOKENIZER_JSON_H

#include <stddef.h>
#include <stdint.h>

#include "pipeline/error.h"

enum { TJSON_ABSENT = -1 };

// A value's bytes [at, end) in the document; at == TJSON_ABSENT: no such value.
typedef struct {
    long long at, end;
} tjson_span;

typedef struct {
    const char *doc;  // the whole document: positions count from here
    size_t len, pos;  // its length, and the cursor
    const char *file; // names the document in error messages
    char *buf;        // decoding buffer for strings with escapes (owned; tjson_free)
    size_t buf_cap;
} tjson;

void tjson_init(tjson *s, const char *doc, size_t len, size_t pos, const char *file);
void tjson_free(tjson *s);

// Fills err with "FILE: malformed JSON at line L column C: WHAT" for the cursor's position; returns -1.
int tjson_fail(const tjson *s, ep_error *err, const char *what);

// Skips whitespace; returns the next byte, or -1 at the end of the document.
int tjson_peek(tjson *s);
// Consumes byte c after whitespace, or fails with "expected 'c'".
int tjson_expect(tjson *s, char c, ep_error *err);
// Reads the string at the cursor. *out points into the document when the string has no escapes, else
// into s->buf (valid until the next call); *out_len is its decoded length (it may hold NUL bytes).
int tjson_string(tjson *s, const char **out, size_t *out_len, ep_error *err);
// Reads the number at the cursor (strict grammar). *is_int is 1 for an integer without fraction or exponent
// and then *value holds it, saturated at INT64_MAX / INT64_MIN.
int tjson_number(tjson *s, int64_t *value, int *is_int, ep_error *err);
// Skips one value of any kind (nesting up to 2048 levels, as jansson allows).
int tjson_skip(tjson *s, ep_error *err);

// The locations of the values of model.vocab and model.merges (TJSON_ABSENT where missing). *rest (free()
// it) is the document with those values replaced by null, *rest_len its length. A document whose root is
// not an object, or whose "model" is not an object, comes back whole (both absent), for jansson to report.
// Checks the syntax of the whole document on the way (an error names line and column).
int tjson_locate(const char *doc, size_t len, const char *file, tjson_span *vocab, tjson_span *merges, char **rest,
                 size_t *rest_len, ep_error *err);

#endif
