// tokenizer: a HuggingFace tokenizer.json read in C, encoding and decoding with the same ids as the
// Rust `tokenizers` library (pinned 0.19.1 in tools/gen_tokenizer_fixtures.py) for the files used here.
//
// Owns the whole pipeline: added/special tokens (split out first, with lstrip/rstrip/single_word and
// normalized flags) -> normalizer -> pre-tokenizer -> BPE model (pipeline/bpe.h) -> post-processor
// (TemplateProcessing for BOS); and decoding through the decoder chain. The stages it supports are listed
// in docs/tokenizer.md; any other component in a file is a load error naming it, never a silent
// difference. Input bytes that are not valid UTF-8 are replaced by U+FFFD per maximal ill-formed
// subsequence (Python's errors='replace'), then encoded.
//
// A loaded tokenizer is immutable: concurrent encodes and decodes from many threads are safe (each call
// keeps its own scratch and word cache). Never prints.
#ifndef EP_TOKENIZER_H
#define EP_TOKENIZER_H

#include <stddef.h>

#include "pipeline/error.h"

typedef struct tokenizer tokenizer;

// Loads DIR/tokenizer.json (or DIR/tokenizer.json.gz, read through zlib) and, if present,
// DIR/tokenizer_config.json (bos_token, eos_token, add_bos_token).
int tokenizer_load(const char *dir, tokenizer **out, ep_error *err);
// The same from memory: tokenizer.json text and optional tokenizer_config.json text (NULL: none).
// `name` stands for the file in error messages.
int tokenizer_load_json(const char *json, size_t len, const char *config_json, size_t config_len, const char *name,
                        tokenizer **out, ep_error *err);
void tokenizer_free(tokenizer *t);

// Encodes text[0..len) into a fresh array (*ids, free() it; *n_ids may be 0). add_special = 1 applies
// the post-processor (e.g. Gemma's and Llama-3's BOS). Special-token text inside the input ("<bos>") is
// always recognised as that token, as in tokenizers.
int tokenizer_encode(const tokenizer *t, const char *text, size_t len, int add_special, int **ids, int *n_ids,
                     ep_error *err);
// Decodes ids into a fresh NUL-terminated string (free() it) of *len bytes (len may be NULL; the text can
// hold NUL bytes where the ids encode them); skip_special drops special tokens.
int tokenizer_decode(const tokenizer *t, const int *ids, int n, int skip_special, char **text, size_t *len,
                     ep_error *err);

const char *tokenizer_piece(const tokenizer *t, int id);  // vocabulary string of an id, NULL if none
int tokenizer_vocab_size(const tokenizer *t);             // 1 + the largest id
int tokenizer_bos_id(const tokenizer *t);                 // -1 if tokenizer_config.json names none
int tokenizer_eos_id(const tokenizer *t);
int tokenizer_add_bos(const tokenizer *t);                // tokenizer_config.json's add_bos_token
int tokenizer_is_special(const tokenizer *t, int id);
// The id of a token string (added tokens first, then the model vocabulary), or -1.
int tokenizer_token_id(const tokenizer *t, const char *piece);

#endif
