// metrics: what a patched run measures per prompt, as DESIGN.md defines it.
//
// correct: the greedy continuation (up to max_new tokens, stopping at eos), decoded and stripped of
// surrounding white space, starts with the target string (the query's output, stripped) -- the
// original's accuracy. first_token_correct: argmax of the logits at `last` is the first target token.
// target_logprob: log-probability of the first target token at `last`. logit_diff: its logit minus the
// best other token's. kl_full_model: KL(full || patched) of the next-token distributions at `last`, the
// full (clean) model's first: sum_i p_full,i (log p_full,i - log p_patched,i) in nats, from the fp32 logits
// after the final softcap, each log-softmax taken stably (max subtracted); 0 for the full model itself.
// It runs on the backend (kernel_ops.kl_div_rows), one compute path for every backend.
#ifndef EP_METRICS_H
#define EP_METRICS_H

#include "kernels/ops.h"
#include "pipeline/tokenizer.h"

typedef struct {
    int correct, first_token_correct;
    float target_logprob, logit_diff;
} prompt_metrics;

// The logit figures alone (no generation, no tokenizer): first_token_correct, target_logprob, logit_diff
// for first target token t0; correct is left 0. metrics_compute uses it.
// They are kernel_ops.logit_metrics' figures (ties to the lowest index, the exp sum in double).
void metrics_first_token(const float *last_logits, int vocab, int t0, prompt_metrics *out);
// The same figures from a row that kernel_ops.logit_metrics reduced (for target t0): sets
// first_token_correct, target_logprob and logit_diff, leaves correct as it is.
void metrics_from_row(const logit_row_metrics *row, int t0, prompt_metrics *out);
int metrics_compute(const tokenizer *tk, const float *last_logits, int vocab, const int *target, int n_target,
                    const int *generated, int n_generated, prompt_metrics *out, ep_error *err);
// out[r] = KL(full || patched) for rows rows of vocab logits (host memory, [rows][vocab] each; out host),
// computed by ops->kl_div_rows (the logits uploaded to a device backend's memory first).
void metrics_kl_full_model(const kernel_ops *ops, const float *full_logits, const float *patched_logits, int rows,
                           int vocab, float *out);

#endif
