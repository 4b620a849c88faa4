// fv: function vectors (docs/function_vectors.md): the follow-up's intervention. The mean over the run's
// clean ICL prompts of chosen heads' outputs at `last` (each head's contribution to the residual stream, its
// slice of o_proj), their sum the function vector; then zero-shot prompts (each prompt's query alone: its
// prefix and query tokens, no demonstrations) run with the vector times s added to the residual stream
// leaving layer L at the last position (pipeline/forward.h, forward_add), and their accuracy (first token
// and full answer, stages/metrics.h) per (L, s), beside the zero-shot baseline.
//
// Promises: one prompt per pass and sums in double in prompt order, so the bytes never depend on batch
// size or rank count (the stage runs on rank 0: a whole model, tensor_parallel 1, checked at config load).
// The output, <output_path>/function_vectors.h5 (format edgepatch-fv-1, docs/artifacts.md), is written
// through h5store (temporary, fsync, rename, completion record): a kill leaves nothing that looks complete,
// and a rerun whose identity matches the complete file skips the stage (test hook: EDGEPATCH_TEST_KILL_FV=write
// SIGKILLs the process with the data written and the file not committed). Never prints, never calls MPI.
#ifndef EP_FV_H
#define EP_FV_H

#include "stages/stage_inputs.h"

#define FV_FORMAT "edgepatch-fv-1"

// The mean head outputs at the last position of each prompt of pb (one prompt per pass): means
// [n_heads][hidden], head i = (heads[2i], heads[2i + 1]) = (layer, head).
int fv_head_means(const model *m, const kernel_ops *ops, const prompt_batch *pb, const int *heads, int n_heads,
                  float *means, ep_error *err);
// Prompt i of pb without its demonstrations: the positions of example index -1 (the prefix: BOS) and of the
// last position's example (the query), in order, into tokens (room for the prompt's length); returns the count.
int fv_zero_shot(const prompt_batch *pb, int i, int *tokens);
// One pass over n tokens with scale * vec added after `layer` at the last position (layer < 0 or vec NULL:
// no addition), the last position's logits into last [vocab], then greedy generation (max_new tokens,
// stop ids as the model's eos) into gen / *n_gen.
int fv_injected_pass(const model *m, const kernel_ops *ops, const int *tokens, int n, int layer, const float *vec,
                     float scale, int max_new, float *last, int *gen, int *n_gen, ep_error *err);
// The heads the config's function_vectors block chooses: its heads, or the top_k head units of type `last`
// by round 0's scores in run_dir (highest first, ties in unit order; fewer when round 0 has fewer). *heads
// is malloc'ed [n][2]; *from says where they came from ("config" or the round's method).
int fv_choose_heads(const run_config *cfg, const model_config *mc, const char *run_dir, int **heads, int *n,
                    char from[32], ep_error *err);

// function_vectors.h5 read back, for the report and `run --json`'s results.
typedef struct {
    int n_layers, n_scales, n_heads;
    int32_t *layers;
    float *scales;
    double *accuracy, *first;  // [n_layers][n_scales]
    double base[2];            // zero-shot accuracy and first-token accuracy without the vector
    char *from;                // heads_from
} fv_summary;
// <run>/function_vectors.h5: 1 loaded, 0 no such file, -1 unreadable or of the wrong shape (err says why).
int fv_summary_load(const char *run, fv_summary *v, ep_error *err);
void fv_summary_free(fv_summary *v);
// The (layer, scale) indices of the best accuracy (the first on ties, layers then scales in file order).
void fv_summary_best(const fv_summary *v, int *layer, int *scale);

// The stage: skips when function_vectors.h5 is complete and made from these inputs (else writes it anew).
int fv_stage(stage_inputs *in, int fresh, ep_error *err);

#endif
