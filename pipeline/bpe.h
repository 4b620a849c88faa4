// bpe: the byte-pair-encoding model of a HuggingFace tokenizer.json ("model": {"type": "BPE"}).
//
// Owns the vocabulary (piece <-> id), the merge table and the unknown-token / byte-fallback rules, and
// turns one pre-tokenized word into ids exactly as tokenizers' BPE::tokenize does: one symbol per
// character (or <0xXX> byte tokens under byte_fallback, or the unknown token), then merges applied
// lowest rank first (ties: leftmost) through a priority queue, O(n log n) in the word's length.
// A loaded model is read-only; all per-call state lives in a bpe_scratch, so one model serves many
// threads. Never prints.
#ifndef EP_BPE_H
#define EP_BPE_H

#include <jansson.h>
#include <stddef.h>

#include "pipeline/error.h"
#include "pipeline/strmap.h"
#include "pipeline/tokenizer_json.h"

enum { BPE_MAX_ID = 1 << 24 };  // largest accepted token id + 1

typedef struct {
    int *v;
    size_t n, cap;
} int_vec;

void int_vec_push(int_vec *a, int x);

typedef struct {
    strmap vocab;          // piece -> id
    const char **pieces;   // id -> piece (NUL-terminated, in vocab's arena); NULL for unused ids
    int n_pieces;          // 1 + the largest id
    pairmap merges;        // (left id << 32 | right id) -> (rank, merged id)
    int unk_id;            // -1: no unknown token (unknown characters are dropped, as in tokenizers)
    int unk_missing;       // unk_token named but not in the vocabulary: an error when it is needed
    int fuse_unk, byte_fallback, ignore_merges;
    int byte_ids[256];     // id of "<0xXX>" or -1
} bpe_model;

typedef struct {
    int *id, *prev, *next, *len;
    size_t sym_cap;
    struct bpe_merge *heap;
    size_t heap_n, heap_cap;
} bpe_scratch;

// Where model.vocab and model.merges sit in the tokenizer.json text (found by tjson_locate,
// pipeline/tokenizer_json.h). The two are read straight from the text into the maps; the other model
// fields come from the jansson object.
typedef struct {
    const char *doc;
    size_t len;
    tjson_span vocab, merges;
} bpe_source;

// Loads "model" (the object at tokenizer.json's "model", with vocab and merges from src); `file` names the
// file in error messages.
int bpe_load(bpe_model *m, json_t *model, const bpe_source *src, const char *file, ep_error *err);
void bpe_free(bpe_model *m);
void bpe_scratch_free(bpe_scratch *s);

// Appends the ids of one word (non-empty, valid UTF-8) to out.
int bpe_encode_word(const bpe_model *m, const char *word, size_t len, bpe_scratch *s, int_vec *out, ep_error *err);

#endif
