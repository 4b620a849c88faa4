// pretok: the text stages of a HuggingFace tokenizer.json that run before the model: normalizers
// (Replace, Prepend, Sequence) and pre-tokenizers (Split, ByteLevel, Digits, Metaspace, Sequence),
// plus the UTF-8 sanitiser every input goes through first.
//
// Contract: each stage is parsed from its JSON object into plain data once (an unknown "type" is an
// error naming the field path, never skipped), then applied to valid UTF-8 text with per-call scratch
// (regex_scratch), so parsed stages are shared read-only between threads. Regexes are PCRE2 with
// PCRE2_UTF|PCRE2_UCP, standing in for the Oniguruma regexes tokenizers uses. Never prints.
#ifndef EP_PRETOK_H
#define EP_PRETOK_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include <jansson.h>
#include <pcre2.h>
#include <stddef.h>

#include "pipeline/error.h"

typedef struct {
    char *p;
    size_t len, cap;
} byte_buf;

void buf_append(byte_buf *b, const char *s, size_t n);
void buf_free(byte_buf *b);

// Copies in[0..n) to out, replacing every ill-formed UTF-8 subsequence by U+FFFD with the "maximal
// subpart" rule that Python's errors='replace' and Rust's from_utf8_lossy both follow. Returns the
// number of replacements made.
size_t utf8_sanitize(const char *in, size_t n, byte_buf *out);

typedef struct {
    pcre2_match_data *md;
    pcre2_match_context *mc;
    pcre2_jit_stack *jit;
    struct split_seg *segs;
    size_t seg_cap;
} regex_scratch;

void regex_scratch_init(regex_scratch *rs);
void regex_scratch_free(regex_scratch *rs);
// Finds the first match at or after `start`; returns 1 and sets [*ms, *me), or 0, or -1 on a PCRE2
// error (message in err).
int regex_find(const pcre2_code *re, const char *s, size_t n, size_t start, regex_scratch *rs, size_t *ms, size_t *me,
               ep_error *err);
// Compiles a tokenizer.json pattern object ({"String": s} or {"Regex": r}); `field` names it in errors.
pcre2_code *pattern_compile(json_t *pattern, const char *file, const char *field, ep_error *err);
pcre2_code *regex_compile(const char *re, size_t len, int literal, const char *file, const char *field, ep_error *err);

typedef struct normalizer_step normalizer_step;
typedef struct pretok_step pretok_step;

typedef struct {
    normalizer_step *steps;
    int n;
} normalizer;

typedef struct {
    pretok_step *steps;
    int n;
} pretokenizer;

// A list of pieces, each a byte range in one buffer. `first`: the piece starts at offset 0 of the
// original input (Metaspace's prepend_scheme "first" needs it).
typedef struct {
    size_t off, len;
    int first;
} piece;

typedef struct {
    byte_buf text;
    piece *v;
    size_t n, cap;
} piece_list;

void piece_list_free(piece_list *l);
void piece_list_clear(piece_list *l);
void piece_list_add(piece_list *l, const char *s, size_t n, int first);

int normalizer_parse(normalizer *nz, json_t *j, const char *file, ep_error *err);
void normalizer_free(normalizer *nz);
// out is overwritten with the normalized text.
int normalizer_apply(const normalizer *nz, const char *s, size_t n, byte_buf *out, regex_scratch *rs, ep_error *err);

int pretokenizer_parse(pretokenizer *pt, json_t *j, const char *file, ep_error *err);
void pretokenizer_free(pretokenizer *pt);
// Splits one segment into pieces; out is overwritten, tmp is scratch.
int pretokenizer_apply(const pretokenizer *pt, const char *s, size_t n, int first, piece_list *out, piece_list *tmp,
                       regex_scratch *rs, ep_error *err);

// The GPT-2 byte <-> character map of ByteLevel (bytes_to_unicode): printable Latin-1 bytes map to
// themselves, the other 68 bytes to U+0100.. in byte order. char_to_byte returns -1 off the map.
unsigned bytelevel_byte_to_char(unsigned char b);
int bytelevel_char_to_byte(unsigned cp);

// Decodes one UTF-8 character at s (valid input); returns its length and stores the code point.
size_t utf8_decode(const char *s, size_t n, unsigned *cp);
size_t utf8_encode(unsigned cp, char *out);

#endif
