#include "results.h"

#include <stdio.h>
#include <unistd.h>

#include "stages/fv.h"

static void copy_fields(json_t *to, json_t *from, const char *const *keys) {
    for (int k = 0; keys[k]; k++) {
        json_t *v = json_object_get(from, keys[k]);
        if (v) json_object_set(to, keys[k], v);
    }
}

// A list of objects, each reduced to keys.
static json_t *copy_list(json_t *from, const char *const *keys) {
    json_t *list = json_array(), *e;
    size_t i;
    json_array_foreach(from, i, e) {
        json_t *o = json_object();
        if (json_is_object(e)) copy_fields(o, e, keys);
        json_array_append_new(list, o);
    }
    return list;
}

static json_t *load_object(const char *path, ep_error *err) {
    json_error_t jerr;
    json_t *j = json_load_file(path, 0, &jerr);
    if (!j) {
        ep_fail(err, "%s: %s%s", path, jerr.line > 0 ? "invalid JSON: " : "", jerr.text);
        return NULL;
    }
    if (!json_is_object(j)) {
        json_decref(j);
        ep_fail(err, "%s: expected a JSON object", path);
        return NULL;
    }
    return j;
}

int run_results_json(const char *run_dir, json_t **out, ep_error *err) {
    static const char *const top[] = {"task", "model_name", "n_prompts", "full_model_accuracy",
                                      "full_model_first_token_accuracy", "full_model_mean_logit_diff", "plan",
                                      "plan_ablates", "accuracy", "first_token_accuracy", "mean_logit_diff",
                                      "faithfulness_logit_diff", NULL};
    static const char *const ablation[] = {"name", "group", "band", "accuracy", "first_token_accuracy", "mean_logit_diff", NULL};
    static const char *const round[] = {"round", "kind", "method", "units", "kept", "faithfulness_logit_diff",
                                        "kept_first_token_accuracy", "stop", NULL};
    static const char *const circuit[] = {"round", "n_head_units", "n_edge_units", "faithfulness_logit_diff", NULL};
    char path[4200];
    *out = NULL;
    snprintf(path, sizeof path, "%s/model_logs.json", run_dir);
    if (access(path, F_OK)) return 0;
    json_t *logs = load_object(path, err);
    if (!logs) return -1;
    json_t *o = json_object();
    copy_fields(o, logs, top);
    json_object_set_new(o, "ablations", copy_list(json_object_get(logs, "ablations"), ablation));
    json_object_set_new(o, "rounds", copy_list(json_object_get(logs, "prune"), round));
    json_decref(logs);
    snprintf(path, sizeof path, "%s/circuit.json", run_dir);
    json_t *c = NULL;
    if (access(path, F_OK) == 0 && !(c = load_object(path, err))) {
        json_decref(o);
        return -1;
    }
    json_t *co = c ? json_object() : json_null();
    if (c) copy_fields(co, c, circuit);
    json_object_set_new(o, "circuit", co);
    json_decref(c);
    // Function vectors (stages/fv.h): the sweep's headline figures, null without function_vectors.h5.
    fv_summary fv;
    int has_fv = fv_summary_load(run_dir, &fv, err);
    if (has_fv < 0) {
        json_decref(o);
        return -1;
    }
    json_t *fo = json_null();
    if (has_fv > 0) {
        int bl, bs;
        fv_summary_best(&fv, &bl, &bs);
        fo = json_pack("{s:i,s:s,s:f,s:f,s:i,s:f,s:f}", "n_heads", fv.n_heads, "heads_from", fv.from, "baseline_accuracy",
                       fv.base[0], "baseline_first_token_accuracy", fv.base[1], "best_layer", fv.layers[bl], "best_scale",
                       (double)fv.scales[bs], "best_accuracy", fv.accuracy[bl * fv.n_scales + bs]);
        fv_summary_free(&fv);
    }
    json_object_set_new(o, "function_vectors", fo);
    *out = o;
    return 0;
}
