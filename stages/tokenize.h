// tokenize: the first stage. Builds a run's prompts (stages/prompts) and stores them in
// <output_path>/prompts.h5, with a human-readable tokenize_report.json beside it.
//
// prompts.h5 layout (docs/artifacts.md): datasets tokens, types, index [P, L] (padded with -1),
// lengths [P], donors [P, K, L], targets [P, T] (-1 padded), target_lengths [P], pair_ids [P, N+1],
// donor_kinds [K]; attributes format, task, task_path, tokenizer_path, tokenizer_hash, config_hash,
// inputs_hash, seed, n_prompts, n_shots, n_donors, type_names, donor_kind_names, edgepatch_version.
// A rerun whose inputs_hash matches a complete prompts.h5 does nothing; a mismatch is refused unless
// `fresh` is set. Written crash-safely through h5store.
#ifndef EP_TOKENIZE_H
#define EP_TOKENIZE_H

#include <stdint.h>

#include "pipeline/error.h"
#include "pipeline/log.h"
#include "stages/run_config.h"

// Its lines (up to date, rebuilding, what was kept) go to log (NULL: nowhere).
int tokenize_stage(const run_config *cfg, int fresh, const ep_log *log, ep_error *err);

// prompts.h5 read back, for the later stages and `edgepatch show`.
typedef struct {
    int n_prompts, max_len, n_donors, max_target, n_pairs;
    int32_t *tokens, *lengths, *types, *index, *donors, *targets, *target_lengths, *pair_ids, *donor_kinds;
    char *task, *tokenizer_path;
    // Each id's decoded piece ("" for padding), as tokens, donors and targets; NULL in a file of format
    // edgepatch-prompts-1, which has none.
    char **token_text, **donor_text, **target_text;
} prompt_set;

#define PROMPTS_FORMAT "edgepatch-prompts-2"

int prompt_set_load(const char *path, prompt_set *ps, ep_error *err);
void prompt_set_free(prompt_set *ps);

#endif
