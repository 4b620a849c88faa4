// run_config: a run's JSON config, the original Config fields and ours, validated in one place.
//
// Original fields (meaning kept): task, model_name (e.g. "gemma2_calc_accuracy"; the architecture is
// read from the model folder, the suffix names the run mode), batch_size, output_path, limit (number of
// prompts), affect_whom, prune_using_imp_scores, prune_k. Ours: model_path, tokenizer_path (default:
// model_path), seed (default 0), n_shots (default: the task's), n_prompts (alias of limit; default
// 100), donors (a count, using the task's donor kinds in order, or a list of kind names; default 1),
// importance, prune_rounds, prune_fraction, tensor_parallel. An unknown field is an error naming it (a
// typo must not silently fall back to a default). Relative paths are taken from the working directory,
// as the original did. Fields later stages read stay available in `json`.
#ifndef EP_RUN_CONFIG_H
#define EP_RUN_CONFIG_H

#include <jansson.h>
#include <stdint.h>

#include "pipeline/error.h"

typedef struct {
    char *path;  // the config file, for messages
    json_t *json;
    const char *task, *model_name, *model_path, *tokenizer_path, *output_path;
    uint64_t seed;
    int n_prompts;
    int n_shots;  // -1: the task's default
    int batch_size;
    int n_donors;
    char donor_kinds[16][16];  // explicit kind names, or "" to take the task's kind d
    const char *backend;       // where the forward passes run: "auto" (default), "cpu", "cuda" or "offset"
    int bf16;                  // field dtype: "fp32" (default) 0, "bf16" 1 (docs/cuda.md, "bf16 runs")
    int tensor_parallel;       // ranks per model (default 1; docs/tensor_parallel.md)
    uint64_t hash;             // of the canonical JSON (sorted keys) without output_path, description, backend
                               // and tensor_parallel (how and where the model runs does not change the results)
} run_config;

int run_config_load(const char *path, run_config *c, ep_error *err);
// The same from JSON text; `name` stands for the file in messages.
int run_config_parse(const char *text, const char *name, run_config *c, ep_error *err);
void run_config_free(run_config *c);

#endif
