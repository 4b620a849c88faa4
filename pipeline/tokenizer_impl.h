// tokenizer_impl: the tokenizer's private parts, shared by its files (include only from them):
// tokenizer_load.c (tokenizer.json and tokenizer_config.json into the struct below), tokenizer_added.c
// (added and special tokens: the matcher and the split of a text around them), tokenizer.c (encoding)
// and tokenizer_decode.c (the decoder chain). The public contract is pipeline/tokenizer.h.
#ifndef EP_TOKENIZER_IMPL_H
#define EP_TOKENIZER_IMPL_H

#include <stddef.h>

#include "pipeline/bpe.h"
#include "pipeline/pretok.h"
#include "pipeline/tokenizer.h"

typedef struct {
    char *content;
    size_t len;
    int id;
    int special, lstrip, rstrip, normalized, single_word;
} added_token;

// Leftmost-longest matcher over a set of added tokens: a byte trie kept in a pairmap
// ((node << 8 | byte) -> child), terminal[node] = index into tokenizer.added or -1.
typedef struct {
    pairmap edges;
    int *terminal;
    int n_nodes;
    unsigned char first_byte[256];  // 1 if some token starts with this byte
    int n_tokens;
} token_matcher;

enum { TPL_SEQUENCE = -1 };

typedef struct {
    int *items;      // per item: TPL_SEQUENCE, or an index into ids_start/ids_len
    int n_items;
    int *ids;        // concatenated special-token ids
    int *ids_start, *ids_len;
    int n_specials;
} template_proc;

enum { DEC_BYTELEVEL, DEC_REPLACE, DEC_BYTEFALLBACK, DEC_FUSE, DEC_STRIP, DEC_METASPACE };

typedef struct {
    int kind;
    pcre2_code *re;
    char *content;
    size_t content_len;
    unsigned strip_char;
    int start, stop;
    unsigned replacement;
    int prepend_never;
} decoder_step;

struct tokenizer {
    char *name;
    bpe_model model;
    normalizer norm;
    pretokenizer pretok;
    added_token *added;
    int n_added;
    int *added_of_id;  // id -> index into added, or -1; n_ids entries
    int n_ids;
    token_matcher raw_matcher, norm_matcher;
    pcre2_code *word_char;  // single_word's notion of a word character
    template_proc *templates;
    int n_templates;
    decoder_step *decoders;
    int n_decoders;
    int has_decoder;
    int bos_id, eos_id, add_bos;
};

typedef struct {
    size_t s, e;
    int token;  // added index or -1
} span;

typedef struct {
    span *v;
    size_t n, cap;
} span_list;

// Added tokens (tokenizer_added.c).
void tokenizer_matcher_init(token_matcher *m);
void tokenizer_matcher_free(token_matcher *m);
void tokenizer_matcher_add(token_matcher *m, const char *s, size_t len, int index);
// tokenizers' AddedVocabulary::find_matches over s[0..n) with matcher m (the raw or the normalized one).
void tokenizer_find_added(const tokenizer *t, const token_matcher *m, const char *s, size_t n, span_list *out,
                          regex_scratch *rs);
// The start of the UTF-8 character before pos.
size_t tokenizer_utf8_prev(const char *s, size_t pos);

#endif
