// prompts: ICL prompts built from a task for one tokenizer, every position typed, with token-aligned
// corrupted donors. Pure computation: no files, no MPI; the tokenize stage stores what this builds.
//
// A prompt is  [prefix] x_1 t y_1 n ... x_N t y_N n x_q t  where [prefix] is what the tokenizer's
// post-processor puts before text (BOS for Gemma and Llama, nothing for Phi-2 and SmolLM), x_i the
// input, t the separator, y_i the output prefix + output, n the example separator. Its tokens are the
// concatenation of the segments' tokens, so each position's type and example index come from the
// segment that produced it, never from token strings; a prompt is kept only if tokenizing its whole
// text gives exactly that concatenation.
//
// The clean-tokenization filter: a pair (x, y) is kept when x and y are non-empty and
//   enc(x t) = X T,  enc(t p y) = T Y,  enc(p y n) = Y N,  enc(n x) = N X,  enc(n x t p y n) = N X T Y N
// (X = enc(x), Y = enc(p y), T = enc(t), N = enc(n), without special tokens); the first failing test is
// the reason it was dropped. tools/gen_task_fixtures.py applies the same tests with HF tokenizers.
//
// Every draw for prompt i comes from rng streams keyed by (seed, i, attempt, purpose), so prompt i is
// the same whatever else is built, in whatever order.
#ifndef EP_PROMPTS_H
#define EP_PROMPTS_H

#include <stdint.h>

#include "pipeline/tokenizer.h"
#include "stages/task.h"

typedef enum { TT_BOS, TT_X, TT_T, TT_Y, TT_N, TT_QUERY, TT_LAST, TT_TARGET, TT_COUNT } token_type;

const char *token_type_name(int type);
int token_type_parse(const char *s, token_type *out);

typedef enum { PAIR_CLEAN, PAIR_EMPTY, PAIR_X_T, PAIR_T_Y, PAIR_Y_N, PAIR_N_X, PAIR_CONTEXT, PAIR_REASON_COUNT } pair_reason;

const char *pair_reason_name(pair_reason r);

typedef struct {
    int *x, nx;  // tokens of x alone
    int *y, ny;  // tokens of output_prefix + y
    pair_reason reason;
} pair_tokens;

typedef struct {
    uint64_t seed;
    int n_shots;
    int n_donors;
    donor_kind kinds[16];  // kind of donor d
} prompt_params;

typedef struct {
    int len;
    int *tokens, *types, *index;  // [len]; index is the example (0..N-1 demos, N the query), -1 for bos
    int n_donors;
    int *donors;  // [n_donors][len]
    int n_target;
    int *target;  // tokens of output_prefix + y_q, typed target when appended
    int n_pairs;
    int *pair_ids;  // demos then query: i >= 0 is task pair i, -(i+1) is ambiguous pair i
} prompt;

void prompt_free(prompt *p);

typedef struct {
    int pairs_total, pairs_kept;
    int dropped[PAIR_REASON_COUNT];
    int ambiguous_total, ambiguous_kept;
    int prompts_built;
    int prompts_rejected;  // whole-prompt tokenization differed from the segments: redrawn
    int donors_unaligned;  // no same-length replacement found: prompt redrawn
    int shuffle_unmoved;   // outputs a shuffle donor had to leave in place (no other output of equal length)
    // spans an other_task_* / other_mapping* donor had to leave as they are: no item of the span's token
    // length in the pool (for other_task_*, no two items joined either)
    int spans_unmoved;
} tokenize_report;

typedef struct {
    const task *task;
    const tokenizer *tk;
    int *prefix, n_prefix;
    int *t_ids, n_t, *n_ids, n_n;
    pair_tokens *pairs, *ambiguous;
    int *clean, n_clean;          // indices of kept ordinary pairs
    int *clean_amb, n_clean_amb;  // indices of kept ambiguous pairs
    // Random replacement words bucketed by token count, for x-like and y-like spans, lower-case and
    // capitalized (a replacement takes the case of the word it replaces).
    const word_list *words;
    int *bucket[2][2][9];  // [y-like][capitalized][token count 1..8]
    int bucket_n[2][2][9];
    // The donor tasks' pairs (task->donor_pairs) tokenized under this task's template, and the pools the
    // other_task_x / other_task_y donors draw from: indices of clean donor pairs whose input (output),
    // distinct, is no input (output) of this task, compared without case. Built by the first prompt_build
    // that asks for such a donor (NULL / 0 before).
    pair_tokens *donor_tok;
    int *other_x, n_other_x, *other_y, n_other_y;
    tokenize_report report;
} prompt_builder;

// Tokenizes and filters every pair; words may be NULL when no random donor kind is used.
int prompt_builder_init(prompt_builder *b, const task *t, const tokenizer *tk, const word_list *words, ep_error *err);
void prompt_builder_free(prompt_builder *b);

// Builds prompt `index` (deterministic in params->seed and index).
int prompt_build(prompt_builder *b, const prompt_params *params, int index, prompt *out, ep_error *err);

#endif
