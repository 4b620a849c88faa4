// generate: greedy decoding on top of a filled KV cache, as HF generate(do_sample=False) does.
//
// The prompt pass is the caller's (it may be a patched pass); decoding then appends one token per
// unfinished sequence per step, reading the prompt's keys and values from the cache as they are, so
// ablations act on prompt positions only and generated positions run unpatched. A sequence stops
// after max_new_tokens, after emitting a stop id (which is kept in the output, as HF keeps eos), or
// when the caller's stop callback says so (e.g. a stop string in the decoded text).
#ifndef EP_GENERATE_H
#define EP_GENERATE_H

#include "pipeline/forward.h"

typedef struct {
    int max_new_tokens;
    const int *stop_ids;
    int n_stop_ids;
    // Optional: return non-zero to stop sequence `seq` after its tokens so far.
    int (*stop)(void *ctx, int seq, const int *generated, int n_generated);
    void *stop_ctx;
} greedy_opts;

// Index of the largest logit (the first one on ties, as torch.argmax).
int argmax(const float *logits, int n);

// last_logits: [n_seqs, vocab] at each sequence's last filled position. out: [n_seqs, max_new_tokens];
// n_out[s] tokens were generated for sequence s. The cache needs capacity for the new tokens.
int greedy_decode(const model *m, const kernel_ops *ops, kv_cache *cache, const float *last_logits,
                  const greedy_opts *o, int *out, int *n_out, ep_error *err);

// The prompt pass (unpatched) followed by greedy_decode, for n_seqs prompts packed back to back.
int greedy_generate(const model *m, const kernel_ops *ops, int n_seqs, const int *tokens, const int *lens,
                    const greedy_opts *o, int *out, int *n_out, ep_error *err);

#endif
