// results: a run folder's key figures as one JSON object, for `edgepatch run --json` and `edgepatch
// report --json` (docs/cli.md). Read from RUN/model_logs.json, RUN/circuit.json and RUN/function_vectors.h5,
// the files the report is drawn from, with their field names and values as they are there; nothing is
// computed here but the best cell of the function-vector sweep.
#ifndef EP_CLI_RESULTS_H
#define EP_CLI_RESULTS_H

#include <jansson.h>

#include "pipeline/error.h"

// {"task", "model_name", "n_prompts", "full_model_accuracy", "full_model_first_token_accuracy",
//  "full_model_mean_logit_diff", "plan", "plan_ablates", "accuracy", "first_token_accuracy",
//  "mean_logit_diff", "faithfulness_logit_diff" (the run's plan), "ablations": [{"name", "group", "band",
//  "accuracy", "first_token_accuracy", "mean_logit_diff"}], "rounds": [{"round", "kind", "method",
//  "units", "kept", "faithfulness_logit_diff", "kept_first_token_accuracy", "stop"}], "circuit": null
//  or {"round", "n_head_units", "n_edge_units", "faithfulness_logit_diff"}, "function_vectors": null or
//  {"n_heads", "heads_from", "baseline_accuracy", "baseline_first_token_accuracy", "best_layer",
//  "best_scale", "best_accuracy"}}; a field model_logs.json
// lacks is left out. *out is NULL (and 0 returned) when the run has no model_logs.json yet (the patch
// stage has not run); -1 if a file is there but is not a JSON object (function_vectors.h5: not readable).
int run_results_json(const char *run_dir, json_t **out, ep_error *err);

#endif
