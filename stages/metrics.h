// metrics: what a patched run measures per prompt, as DESIGN.md defines it.
//
// correct: the greedy continuation (up to max_new tokens, stopping at eos), decoded and stripped of
// surrounding white space, starts with the target string (the query's output, stripped) -- the
// original's accuracy. first_token_correct: argmax of the logits at `last` is the first target token.
// target_logprob: log-probability of the first target token at `last`. logit_diff: its logit minus the
// best other token's.
#ifndef EP_METRICS_H
#define EP_METRICS_H

#include "pipeline/tokenizer.h"

typedef struct {
    int correct, first_token_correct;
    float target_logprob, logit_diff;
} prompt_metrics;

// The logit figures alone (no generation, no tokenizer): first_token_correct, target_logprob, logit_diff
// for first target token t0; correct is left 0. metrics_compute uses it.
void metrics_first_token(const float *last_logits, int vocab, int t0, prompt_metrics *out);
int metrics_compute(const tokenizer *tk, const float *last_logits, int vocab, const int *target, int n_target,
                    const int *generated, int n_generated, prompt_metrics *out, ep_error *err);

#endif
