// run_config: a run's JSON config, the one schema of every field (docs/config.md), checked whole before
// any stage runs or any file is written.
//
// Original fields (meaning kept): task, model_name (free text; its suffix names the run mode when "mode"
// is absent, e.g. "gemma2_calc_accuracy"), batch_size, output_path, limit (number of prompts),
// affect_whom, prune_using_imp_scores, prune_k. Ours: mode, model_path, tokenizer_path (default:
// model_path), seed (default 0), n_shots (default: the task's), n_prompts (alias of limit; default 100),
// donors (a count, using the task's donor kinds in order, or a list of kind names; default 1), plan,
// circuit, edge_intervention (how circuits ablate edges: kv, k, v, zero), ablations, max_new_tokens,
// cache_dtype, backend, dtype, tensor_parallel, function_vectors, and the pruning
// fields (importance, ig_steps, prune_rounds, prune_fraction, min_units, min_faithfulness, exact_max_seqs,
// score_donors, compare_importance, exact_units_per_item). An unknown field is an error naming it (a
// typo must not silently fall back to a default). Relative paths are taken from the working directory,
// as the original did.
//
// Three checks, each an error naming the file and the field:
//   run_config_parse         the text alone: JSON, known fields, each field's type and form (names of
//                            modes, importance, dtypes; the fields run_config always read also their
//                            ranges), the mode from "mode" and/or model_name;
//   run_config_check_values  what the values mean, without files: ranges of the counts and fractions,
//                            prune_k against the rounds and files, score_donors against donors;
//   run_config_check_inputs  against the files the config names: the task file (loaded and checked
//                            whole; donor kinds it must offer), the model's config.json (layers and
//                            heads of every plan rule, ablation and circuit unit, compiled as the
//                            stages will; no weights read), every prune_using_imp_scores file (a sealed
//                            round file: h5store_open + verify).
// run_config_load runs all three; `edgepatch run`, `edgepatch check` and `sweep plan|submit` use them
// before anything runs. The stages read the typed fields below, never the JSON; those that convert a
// count call run_config_check_values again (cheap, no files), so a config made by run_config_parse
// alone (tests, the fuzz target) is refused there too rather than truncated.
#ifndef EP_RUN_CONFIG_H
#define EP_RUN_CONFIG_H

#include <jansson.h>
#include <stdint.h>

#include "pipeline/error.h"
#include "pipeline/model_config.h"

// The run mode: which plan a run starts from and what an integer prune_rounds counts. Every mode runs
// the same stages (edgepatch run --until picks where to stop).
typedef enum {
    RUN_MODE_CALC_ACCURACY,   // no ablation (the default)
    RUN_MODE_ABLATE_EDGES,    // affect_whom: a list of [sender, receiver] pairs, donor 0
    RUN_MODE_ABLATE_EDGES_PER_TOKEN,  // affect_whom: {"ablate": ..., "curcuit": ...} with donors per pair
    RUN_MODE_PRUNE_HEADS,     // pruning from the affect_whom pairs (if any); prune_rounds N: N head rounds
    RUN_MODE_PRUNE_EDGES,     // the same; prune_rounds N: N edge rounds
    RUN_MODE_COUNT
} run_mode;

// "calc_accuracy", "ablate_edges", "ablate_edges_differently_for_different_tokens", "prune_heads",
// "prune_edges".
const char *run_mode_name(run_mode m);

// One entry of the config's "ablations" list: its labels and its plan (plan_parse's JSON form, borrowed
// from the config's JSON; compiled by stages/plan.h once the model's shape is known).
typedef struct {
    const char *name, *group, *band;  // group and band: NULL when not given
    json_t *plan;
} run_ablation;

// The pruning fields (docs/pruning.md). Counts are kept as given (long long) until
// run_config_check_values has checked their ranges.
typedef struct {
    const char *importance;  // "attribution" (default), "exact" or "eap-ig"
    int exact;               // importance is "exact"
    int eap_ig;              // importance is "eap-ig"
    int ig_steps;            // eap-ig's path points (5; only with eap-ig, else 0)
    long long head_rounds, edge_rounds;  // prune_rounds (after the prune_using_imp_scores files: see below)
    double fraction;                     // prune_fraction (0.1)
    int n_k;
    long long *k;                        // prune_k
    int n_files;
    const char **files;                  // prune_using_imp_scores
    long long min_units;                 // 1
    double min_faithfulness;             // 0: off
    long long exact_max_seqs;            // 64
    long long exact_units_per_item;      // 64
    long long score_donors;              // 0: every donor the prompts have
    int compare;                         // compare_importance
} run_prune;

// The function_vectors block (docs/function_vectors.md; optional: the fv stage runs only when present).
// Counts kept as given until run_config_check_values; layers and heads are checked against the model's shape
// by run_config_check_inputs.
#define RUN_FV_MAX 256  // entries per list
typedef struct {
    int on;                 // the block is present
    int n_heads;            // explicit heads (0: the top_k heads of round 0's head scores at `last`)
    int heads[RUN_FV_MAX][2];  // (layer, head)
    long long top_k;        // 10
    int n_layers;           // 0: every layer of the model
    long long layers[RUN_FV_MAX];
    int n_scales;
    double scales[RUN_FV_MAX];  // 0, 0.5, 1, 2
} run_fv;

typedef struct {
    char *path;  // the config file, for messages
    json_t *json;  // the file as read (its identity; the stages read the typed fields)
    const char *task, *model_name, *model_path, *tokenizer_path, *output_path;
    run_mode mode;
    int mode_given;            // 1: the config has "mode" (else it came from model_name's suffix or the default)
    uint64_t seed;
    int n_prompts;
    int n_shots;  // -1: the task's default
    int batch_size;
    int n_donors;
    char donor_kinds[16][16];  // explicit kind names, or "" to take the task's kind d
    const char *backend;       // where the forward passes run: "auto" (default), "cpu", "cuda" or "offset"
    int bf16;                  // field dtype: "fp32" (default) 0, "bf16" 1 (docs/cuda.md, "bf16 runs")
    int cache_bf16;            // field cache_dtype: "fp32" (default) 0, "bf16" 1
    int tensor_parallel;       // ranks per model (default 1; docs/tensor_parallel.md)
    long long max_new_tokens;  // generated tokens per prompt (default 10; 1..1000)
    // Plans, as validated JSON (borrowed from json; NULL when absent): compiled against the model's
    // shape by stages/plan.h (plan_from_run_config, plan_list_from_run_config).
    json_t *plan, *affect_whom, *circuit;
    // field edge_intervention: how circuits (the "circuit" field, the score and prune stages) ablate the
    // edges they do not keep: edge_source (kernels/edge_rule.h), "kv" (default) 0, "k", "v", "zero"
    int edge_intervention;
    int n_ablations;
    run_ablation *ablations;
    run_prune prune;
    run_fv fv;
    uint64_t hash;             // of the canonical JSON (sorted keys) without output_path, description, backend
                               // and tensor_parallel (how and where the model runs does not change the results)
} run_config;

// Parse, check values and inputs (the model's config.json under model_path).
int run_config_load(const char *path, run_config *c, ep_error *err);
// The text alone; `name` stands for the file in messages.
int run_config_parse(const char *text, const char *name, run_config *c, ep_error *err);
int run_config_check_values(const run_config *c, ep_error *err);
// model: the model's shape, or NULL to read <model_path>/config.json (a sweep passes its models' inline
// configs; without model_path and model the plans are not checked: such a config can only tokenize).
// Loads the task file (and its pair lists) but keeps nothing.
int run_config_check_inputs(const run_config *c, const model_config *model, ep_error *err);
void run_config_free(run_config *c);

// The resolved config, every default filled in, as JSON (what `edgepatch check` prints); a new reference.
json_t *run_config_resolved(const run_config *c);

#endif
