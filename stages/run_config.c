#include "run_config.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline/h5store.h"
#include "pipeline/hash.h"
#include "stages/plan.h"
#include "stages/task.h"

static const char *known_fields[] = {
    // the original code's Config
    "task", "model_name", "batch_size", "output_path", "limit", "affect_whom", "prune_using_imp_scores", "prune_k",
    // ours
    "model_path", "tokenizer_path", "seed", "n_shots", "n_prompts", "donors", "importance", "prune_rounds",
    "prune_fraction", "tensor_parallel", "dtype", "description", "plan", "max_new_tokens", "circuit", "cache_dtype",
    "min_units", "min_faithfulness", "exact_max_seqs", "backend", "ablations", "score_donors", "compare_importance",
    "exact_units_per_item", "mode", "ig_steps", "edge_intervention", "function_vectors",
};

// The modes by name, and the original's model_name suffixes that name them (checked in this order: a
// suffix that ends another, "ablate_edges", comes last).
static const struct {
    const char *name, *suffix;
    run_mode mode;
} mode_forms[] = {
    {"calc_accuracy", "calc_accuracy", RUN_MODE_CALC_ACCURACY},
    {"ablate_edges_differently_for_different_tokens", "ablate_edges_differently_for_different_tokens",
     RUN_MODE_ABLATE_EDGES_PER_TOKEN},
    {"prune_heads", "prune_heads_in_circuits", RUN_MODE_PRUNE_HEADS},
    {"prune_edges", "prune_edges_in_circuits", RUN_MODE_PRUNE_EDGES},
    {"ablate_edges", "ablate_edges", RUN_MODE_ABLATE_EDGES},
};
#define N_FORMS (sizeof mode_forms / sizeof mode_forms[0])

const char *run_mode_name(run_mode m) {
    for (size_t i = 0; i < N_FORMS; i++)
        if (mode_forms[i].mode == m) return mode_forms[i].name;
    return "?";
}

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && !strcmp(s + n - k, suffix);
}

// The mode a model_name's suffix names, or -1.
static int mode_of_model_name(const char *s) {
    for (size_t i = 0; i < N_FORMS; i++)
        if (ends_with(s, mode_forms[i].suffix)) return (int)mode_forms[i].mode;
    return -1;
}

static int is_known(const char *key) {
    for (size_t i = 0; i < sizeof known_fields / sizeof known_fields[0]; i++)
        if (!strcmp(key, known_fields[i])) return 1;
    return 0;
}

static int opt_string(run_config *c, const char *key, const char **out, ep_error *err) {
    json_t *v = json_object_get(c->json, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_string(v)) return ep_fail(err, "%s: field %s: expected a string", c->path, key);
    *out = json_string_value(v);
    return 0;
}

static int opt_int(run_config *c, const char *key, long long lo, long long hi, long long *out, ep_error *err) {
    json_t *v = json_object_get(c->json, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi)
        return ep_fail(err, "%s: field %s: expected an integer in %lld..%lld", c->path, key, lo, hi);
    *out = json_integer_value(v);
    return 0;
}

// An integer kept as given (its range is run_config_check_values's).
static int opt_count(run_config *c, const char *key, long long *out, ep_error *err) {
    json_t *v = json_object_get(c->json, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_integer(v)) return ep_fail(err, "%s: field %s: expected an integer", c->path, key);
    *out = json_integer_value(v);
    return 0;
}

static int opt_number(run_config *c, const char *key, double *out, ep_error *err) {
    json_t *v = json_object_get(c->json, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_number(v)) return ep_fail(err, "%s: field %s: expected a number", c->path, key);
    *out = json_number_value(v);
    return 0;
}

// The mode: "mode", else model_name's suffix, else calc_accuracy; with an explicit "plan" an unknown
// model_name is free text (the plan replaces the mode's).
static int parse_mode(run_config *c, ep_error *err) {
    const char *mode = NULL;
    if (opt_string(c, "mode", &mode, err)) return -1;
    int from_name = c->model_name ? mode_of_model_name(c->model_name) : -1;
    c->mode = RUN_MODE_CALC_ACCURACY;
    if (mode) {
        int m = -1;
        for (size_t i = 0; i < N_FORMS && m < 0; i++)
            if (!strcmp(mode, mode_forms[i].name) || !strcmp(mode, mode_forms[i].suffix)) m = (int)mode_forms[i].mode;
        if (m < 0)
            return ep_fail(err, "%s: field mode: '%s' is not calc_accuracy, ablate_edges, "
                                "ablate_edges_differently_for_different_tokens, prune_heads or prune_edges", c->path, mode);
        if (from_name >= 0 && from_name != m)
            return ep_fail(err, "%s: fields mode and model_name disagree: mode '%s', model_name '%s' names %s", c->path, mode,
                           c->model_name, run_mode_name((run_mode)from_name));
        c->mode = (run_mode)m;
        c->mode_given = 1;
        return 0;
    }
    if (from_name >= 0) c->mode = (run_mode)from_name;
    else if (c->model_name && !json_object_get(c->json, "plan"))
        return ep_fail(err, "%s: field model_name: '%s' is not a run mode this version runs (calc_accuracy, ablate_edges, "
                            "ablate_edges_differently_for_different_tokens, prune_heads_in_circuits, prune_edges_in_circuits; "
                            "or give \"mode\" or a \"plan\")", c->path, c->model_name);
    return 0;
}

// The forms of the plan fields (their layers and heads need the model: run_config_check_inputs).
static int parse_plans(run_config *c, ep_error *err) {
    c->plan = json_object_get(c->json, "plan");
    c->affect_whom = json_object_get(c->json, "affect_whom");
    c->circuit = json_object_get(c->json, "circuit");
    if (json_is_null(c->affect_whom)) c->affect_whom = NULL;
    if (c->plan && !json_is_object(c->plan))
        return ep_fail(err, "%s: field plan: a plan is a JSON object with rules and heads", c->path);
    if (c->circuit && !json_is_object(c->circuit))
        return ep_fail(err, "%s: field circuit: expected {\"heads\": [[layer, head, type], ...], \"edges\": [[layer, head, "
                            "sender, receiver], ...]}", c->path);
    // What the mode's plan reads from affect_whom (an explicit plan replaces it).
    json_t *aw = c->affect_whom;
    const char *mode = c->model_name ? c->model_name : run_mode_name(c->mode), *field = c->mode_given ? "mode" : "model_name";
    if (!c->plan) {
        if (c->mode == RUN_MODE_ABLATE_EDGES_PER_TOKEN && !json_is_object(aw))
            return ep_fail(err, "%s: field affect_whom: %s %s needs affect_whom = {\"ablate\": ..., \"curcuit\": ...}", c->path,
                           field, c->mode_given ? run_mode_name(c->mode) : mode);
        if (c->mode == RUN_MODE_ABLATE_EDGES && !json_is_array(aw))
            return ep_fail(err, "%s: field affect_whom: %s %s needs affect_whom = [[sender, receiver], ...]", c->path, field,
                           c->mode_given ? run_mode_name(c->mode) : mode);
        if ((c->mode == RUN_MODE_PRUNE_HEADS || c->mode == RUN_MODE_PRUNE_EDGES) && aw && !json_is_array(aw))
            return ep_fail(err, "%s: field affect_whom: %s %s takes affect_whom = [[sender, receiver], ...]", c->path, field,
                           c->mode_given ? run_mode_name(c->mode) : mode);
    }
    json_t *a = json_object_get(c->json, "ablations"), *e;
    if (!a || json_is_null(a)) return 0;
    if (!json_is_array(a)) return ep_fail(err, "%s: field ablations: expected a list of plans", c->path);
    c->ablations = ep_calloc(json_array_size(a) + 1, sizeof *c->ablations);
    size_t i;
    json_array_foreach(a, i, e) {
        run_ablation *r = &c->ablations[i];
        if (!json_is_object(e)) return ep_fail(err, "%s: field ablations[%zu]: a plan is a JSON object with rules and heads", c->path, i);
        if (!json_is_string(json_object_get(e, "name")))
            return ep_fail(err, "%s: field ablations[%zu]: name: required (a distinct name per ablation)", c->path, i);
        for (int k = 0; k < 2; k++) {
            json_t *v = json_object_get(e, k ? "band" : "group");
            if (v && !json_is_string(v))
                return ep_fail(err, "%s: field ablations[%zu]: %s: expected a label (string)", c->path, i, k ? "band" : "group");
        }
        r->name = json_string_value(json_object_get(e, "name"));
        r->group = json_string_value(json_object_get(e, "group"));
        r->band = json_string_value(json_object_get(e, "band"));
        r->plan = e;
        for (size_t k = 0; k < i; k++)
            if (!strcmp(c->ablations[k].name, r->name))
                return ep_fail(err, "%s: field ablations[%zu]: name '%s' is also ablations[%zu]'s", c->path, i, r->name, k);
        c->n_ablations = (int)i + 1;
    }
    return 0;
}

static int parse_prune(run_config *c, ep_error *err) {
    run_prune *p = &c->prune;
    json_t *j = c->json, *v;
    p->importance = "attribution", p->fraction = 0.1, p->min_units = 1, p->exact_max_seqs = 64;
    p->exact_units_per_item = 64;
    if (opt_string(c, "importance", &p->importance, err)) return -1;
    if (strcmp(p->importance, "attribution") && strcmp(p->importance, "exact") && strcmp(p->importance, "eap-ig"))
        return ep_fail(err, "%s: field importance: expected \"attribution\", \"exact\" or \"eap-ig\", got \"%s\"", c->path,
                       p->importance);
    p->exact = !strcmp(p->importance, "exact");
    p->eap_ig = !strcmp(p->importance, "eap-ig");
    p->ig_steps = p->eap_ig ? 5 : 0;
    if ((v = json_object_get(j, "ig_steps"))) {
        // EAP-IG's path points (docs/attribution.md): only where they are used, a whole count 1..1000.
        if (!p->eap_ig)
            return ep_fail(err, "%s: field ig_steps: only with \"importance\": \"eap-ig\" (importance is \"%s\")", c->path,
                           p->importance);
        if (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > 1000)
            return ep_fail(err, "%s: field ig_steps: expected a count 1..1000 (path points)", c->path);
        p->ig_steps = (int)json_integer_value(v);
    }
    if ((v = json_object_get(j, "prune_rounds")) && !json_is_null(v)) {
        if (json_is_integer(v)) {
            *(c->mode == RUN_MODE_PRUNE_EDGES ? &p->edge_rounds : &p->head_rounds) = json_integer_value(v);
        } else if (json_is_object(v)) {
            json_t *h = json_object_get(v, "heads"), *e = json_object_get(v, "edges");
            if ((h && !json_is_integer(h)) || (e && !json_is_integer(e)) || json_object_size(v) != (size_t)(!!h + !!e))
                return ep_fail(err, "%s: field prune_rounds: expected {\"heads\": N, \"edges\": M} with counts 0..10000", c->path);
            p->head_rounds = h ? json_integer_value(h) : 0;
            p->edge_rounds = e ? json_integer_value(e) : 0;
        } else {
            return ep_fail(err, "%s: field prune_rounds: expected a count or {\"heads\": N, \"edges\": M}", c->path);
        }
    }
    if (opt_number(c, "prune_fraction", &p->fraction, err)) return -1;
    if ((v = json_object_get(j, "prune_k")) && !json_is_null(v)) {
        if (!json_is_array(v)) return ep_fail(err, "%s: field prune_k: expected a list of unit counts", c->path);
        p->n_k = (int)json_array_size(v);
        p->k = ep_calloc((size_t)p->n_k + 1, sizeof *p->k);
        for (int i = 0; i < p->n_k; i++) {
            json_t *e = json_array_get(v, (size_t)i);
            if (!json_is_integer(e)) return ep_fail(err, "%s: field prune_k[%d]: expected a positive count", c->path, i);
            p->k[i] = json_integer_value(e);
        }
    }
    if ((v = json_object_get(j, "prune_using_imp_scores")) && !json_is_null(v)) {
        if (!json_is_array(v)) return ep_fail(err, "%s: field prune_using_imp_scores: expected a list of round files", c->path);
        p->n_files = (int)json_array_size(v);
        p->files = ep_calloc((size_t)p->n_files + 1, sizeof(char *));
        for (int i = 0; i < p->n_files; i++)
            if (!(p->files[i] = json_string_value(json_array_get(v, (size_t)i))))
                return ep_fail(err, "%s: field prune_using_imp_scores[%d]: expected a path", c->path, i);
    }
    // Rounds read from files are rounds too (head rounds first).
    if (p->n_files > p->head_rounds + p->edge_rounds) p->head_rounds = p->n_files - p->edge_rounds;
    if (opt_count(c, "min_units", &p->min_units, err) || opt_number(c, "min_faithfulness", &p->min_faithfulness, err) ||
        opt_count(c, "exact_max_seqs", &p->exact_max_seqs, err) ||
        opt_count(c, "exact_units_per_item", &p->exact_units_per_item, err) ||
        opt_count(c, "score_donors", &p->score_donors, err))
        return -1;
    if (json_object_get(j, "score_donors") && p->score_donors == 0)  // 0 is the struct's "all"
        return ep_fail(err, "%s: field score_donors: expected a count 1..%d (the prompts' donors)", c->path, c->n_donors);
    if ((v = json_object_get(j, "compare_importance"))) {
        if (!json_is_boolean(v)) return ep_fail(err, "%s: field compare_importance: expected true or false", c->path);
        p->compare = json_is_true(v);
    }
    if ((v = json_object_get(j, "edge_intervention")) &&
        (c->edge_intervention = edge_source_parse(json_string_value(v))) < 0)
        return ep_fail(err, "%s: field edge_intervention: expected \"kv\", \"k\", \"v\" or \"zero\"", c->path);
    // EAP-IG integrates gradients along a path from the clean inputs to the donor's; a removed edge has no
    // donor to go towards (docs/attribution.md)
    if (c->edge_intervention == EDGE_SRC_ZERO && p->eap_ig)
        return ep_fail(err, "%s: field edge_intervention: \"zero\" cannot be scored by \"importance\": \"eap-ig\" "
                            "(use attribution or exact)", c->path);
    return 0;
}

// The function_vectors block's form: {"heads": [[layer, head], ...] | "top_k": K, "layers": [...], "scales": [...]}.
static int parse_fv(run_config *c, ep_error *err) {
    run_fv *f = &c->fv;
    json_t *b = json_object_get(c->json, "function_vectors"), *v, *e;
    if (!b || json_is_null(b)) return 0;
    const char *form = "expected {\"heads\": [[layer, head], ...] or \"top_k\": K, \"layers\": [...], \"scales\": [...]}";
    if (!json_is_object(b)) return ep_fail(err, "%s: field function_vectors: %s", c->path, form);
    const char *key;
    json_object_foreach(b, key, v) {
        if (strcmp(key, "heads") && strcmp(key, "top_k") && strcmp(key, "layers") && strcmp(key, "scales"))
            return ep_fail(err, "%s: field function_vectors: unknown field '%s'", c->path, key);
    }
    f->on = 1, f->top_k = 10;
    static const double default_scales[] = {0, 0.5, 1, 2};
    f->n_scales = 4;
    memcpy(f->scales, default_scales, sizeof default_scales);
    if (json_object_get(b, "heads") && json_object_get(b, "top_k"))
        return ep_fail(err, "%s: field function_vectors: heads and top_k exclude each other (top_k picks the heads)", c->path);
    size_t i;
    if ((v = json_object_get(b, "heads"))) {
        if (!json_is_array(v) || json_array_size(v) < 1 || json_array_size(v) > RUN_FV_MAX)
            return ep_fail(err, "%s: field function_vectors.heads: expected 1..%d [layer, head] pairs", c->path, RUN_FV_MAX);
        json_array_foreach(v, i, e) {
            json_t *l = json_array_get(e, 0), *h = json_array_get(e, 1);
            if (!json_is_array(e) || json_array_size(e) != 2 || !json_is_integer(l) || !json_is_integer(h) ||
                json_integer_value(l) < 0 || json_integer_value(h) < 0 || json_integer_value(l) > 100000 ||
                json_integer_value(h) > 100000)
                return ep_fail(err, "%s: field function_vectors.heads[%zu]: expected [layer, head]", c->path, i);
            f->heads[i][0] = (int)json_integer_value(l), f->heads[i][1] = (int)json_integer_value(h);
            for (size_t k = 0; k < i; k++)
                if (f->heads[k][0] == f->heads[i][0] && f->heads[k][1] == f->heads[i][1])
                    return ep_fail(err, "%s: field function_vectors.heads[%zu]: [%d, %d] is also heads[%zu]", c->path, i,
                                   f->heads[i][0], f->heads[i][1], k);
        }
        f->n_heads = (int)json_array_size(v);
    }
    if ((v = json_object_get(b, "top_k"))) {
        if (!json_is_integer(v)) return ep_fail(err, "%s: field function_vectors.top_k: expected a count", c->path);
        f->top_k = json_integer_value(v);
    }
    if ((v = json_object_get(b, "layers"))) {
        if (!json_is_array(v) || json_array_size(v) < 1 || json_array_size(v) > RUN_FV_MAX)
            return ep_fail(err, "%s: field function_vectors.layers: expected a list of 1..%d layers", c->path, RUN_FV_MAX);
        json_array_foreach(v, i, e) {
            if (!json_is_integer(e)) return ep_fail(err, "%s: field function_vectors.layers[%zu]: expected a layer", c->path, i);
            f->layers[i] = json_integer_value(e);
            for (size_t k = 0; k < i; k++)
                if (f->layers[k] == f->layers[i])
                    return ep_fail(err, "%s: field function_vectors.layers[%zu]: layer %lld is also layers[%zu]", c->path, i,
                                   f->layers[i], k);
        }
        f->n_layers = (int)json_array_size(v);
    }
    if ((v = json_object_get(b, "scales"))) {
        if (!json_is_array(v) || json_array_size(v) < 1 || json_array_size(v) > RUN_FV_MAX)
            return ep_fail(err, "%s: field function_vectors.scales: expected a list of 1..%d numbers", c->path, RUN_FV_MAX);
        json_array_foreach(v, i, e) {
            if (!json_is_number(e)) return ep_fail(err, "%s: field function_vectors.scales[%zu]: expected a number", c->path, i);
            f->scales[i] = json_number_value(e);
        }
        f->n_scales = (int)json_array_size(v);
    }
    return 0;
}

int run_config_parse(const char *text, const char *name, run_config *c, ep_error *err) {
    memset(c, 0, sizeof *c);
    c->path = ep_strdup(name);
    json_error_t jerr;
    c->json = json_loads(text, 0, &jerr);
    if (!c->json) {
        ep_fail(err, "%s: invalid JSON: %s (line %d)", name, jerr.text, jerr.line);
        goto fail;
    }
    if (!json_is_object(c->json)) {
        ep_fail(err, "%s: expected a JSON object", name);
        goto fail;
    }
    const char *key;
    json_t *value;
    json_object_foreach(c->json, key, value) {
        if (!is_known(key)) {
            ep_fail(err, "%s: unknown field '%s'", name, key);
            goto fail;
        }
    }
    long long seed = 0, n_prompts = 100, limit = -1, n_shots = -1, batch = 8, tp = 1;
    if (opt_string(c, "task", &c->task, err) || opt_string(c, "model_name", &c->model_name, err) ||
        opt_string(c, "model_path", &c->model_path, err) || opt_string(c, "tokenizer_path", &c->tokenizer_path, err) ||
        opt_string(c, "output_path", &c->output_path, err) || opt_int(c, "seed", 0, INT64_MAX, &seed, err) ||
        opt_int(c, "n_prompts", 1, 10000000, &n_prompts, err) || opt_int(c, "limit", 1, 10000000, &limit, err) ||
        opt_int(c, "n_shots", 0, 1000, &n_shots, err) || opt_int(c, "batch_size", 1, 1000000, &batch, err) ||
        opt_int(c, "tensor_parallel", 1, 4096, &tp, err))
        goto fail;
    if (!c->task) {
        ep_fail(err, "%s: field task: required", name);
        goto fail;
    }
    if (!c->output_path) {
        ep_fail(err, "%s: field output_path: required", name);
        goto fail;
    }
    if (!c->tokenizer_path) c->tokenizer_path = c->model_path;
    if (!c->tokenizer_path) {
        ep_fail(err, "%s: field model_path (or tokenizer_path): required", name);
        goto fail;
    }
    const char *dtype = "fp32", *cache_dtype = "fp32";
    c->backend = "auto";
    if (opt_string(c, "backend", &c->backend, err) || opt_string(c, "dtype", &dtype, err) ||
        opt_string(c, "cache_dtype", &cache_dtype, err))
        goto fail;
    if (strcmp(c->backend, "auto") && strcmp(c->backend, "cpu") && strcmp(c->backend, "cuda") &&
        strcmp(c->backend, "offset")) {
        ep_fail(err, "%s: field backend: expected \"auto\", \"cpu\", \"cuda\" or \"offset\", got \"%s\"", name,
                c->backend);
        goto fail;
    }
    if (strcmp(dtype, "fp32") && strcmp(dtype, "bf16")) {
        ep_fail(err, "%s: field dtype: expected \"fp32\" or \"bf16\", got \"%s\"", name, dtype);
        goto fail;
    }
    if (strcmp(cache_dtype, "fp32") && strcmp(cache_dtype, "bf16")) {
        ep_fail(err, "%s: field cache_dtype: expected \"fp32\" or \"bf16\", got \"%s\"", name, cache_dtype);
        goto fail;
    }
    c->bf16 = !strcmp(dtype, "bf16");
    c->cache_bf16 = !strcmp(cache_dtype, "bf16");
    c->seed = (uint64_t)seed;
    c->n_prompts = (int)(limit > 0 ? limit : n_prompts);
    c->n_shots = (int)n_shots;
    c->batch_size = (int)batch;
    c->tensor_parallel = (int)tp;
    json_t *donors = json_object_get(c->json, "donors");
    c->n_donors = 1;
    if (json_is_integer(donors)) {
        if (json_integer_value(donors) < 0 || json_integer_value(donors) > 16) {  // before the conversion to int
            ep_fail(err, "%s: field donors: expected 0..16 or a list of donor kinds", name);
            goto fail;
        }
        c->n_donors = (int)json_integer_value(donors);
    } else if (json_is_array(donors)) {
        c->n_donors = (int)json_array_size(donors);
        if (c->n_donors > 16) {
            ep_fail(err, "%s: field donors: at most 16", name);
            goto fail;
        }
        for (int d = 0; d < c->n_donors; d++) {
            const char *k = json_string_value(json_array_get(donors, (size_t)d));
            donor_kind kind;
            if (!k || strlen(k) >= sizeof c->donor_kinds[d]) {
                ep_fail(err, "%s: field donors[%d]: expected a donor kind name", name, d);
                goto fail;
            }
            if (donor_kind_parse(k, &kind)) {
                ep_fail(err, "%s: field donors[%d]: unknown donor kind '%s'", name, d, k);
                goto fail;
            }
            strcpy(c->donor_kinds[d], k);
        }
    } else if (donors && !json_is_null(donors)) {
        ep_fail(err, "%s: field donors: expected a count or a list of donor kinds", name);
        goto fail;
    }
    c->max_new_tokens = 10;
    if (opt_count(c, "max_new_tokens", &c->max_new_tokens, err) || parse_mode(c, err) || parse_plans(c, err) ||
        parse_prune(c, err) || parse_fv(c, err))
        goto fail;
    // Where the results go, the free-text description, the backend (backends agree to fp32 rounding; a run
    // may resume on another machine) and how the model is split over ranks (equal up to summation order, so
    // a run may resume with another split) do not change them: not part of the identity. A config without
    // "mode" hashes as it did before the field existed.
    json_t *identity = json_deep_copy(c->json);
    json_object_del(identity, "output_path");
    json_object_del(identity, "description");
    json_object_del(identity, "backend");
    json_object_del(identity, "tensor_parallel");
    json_object_del(identity, "function_vectors");  // read by the fv stage alone, which has its own identity
    char *canonical = json_dumps(identity, JSON_SORT_KEYS | JSON_COMPACT);
    json_decref(identity);
    c->hash = hash_str(HASH_INIT, canonical);
    free(canonical);
    return 0;
fail:
    run_config_free(c);
    return -1;
}

int run_config_check_values(const run_config *c, ep_error *err) {
    const run_prune *p = &c->prune;
    if (c->max_new_tokens < 1 || c->max_new_tokens > 1000)
        return ep_fail(err, "%s: field max_new_tokens: expected 1..1000", c->path);
    if (p->head_rounds < 0 || p->head_rounds > 10000 || p->edge_rounds < 0 || p->edge_rounds > 10000)
        return ep_fail(err, "%s: field prune_rounds: expected a count or {\"heads\": N, \"edges\": M} with counts 0..10000", c->path);
    if (!(p->fraction > 0 && p->fraction < 1))
        return ep_fail(err, "%s: field prune_fraction: expected a number in (0, 1)", c->path);
    for (int i = 0; i < p->n_k; i++)
        if (p->k[i] < 1 || p->k[i] > 100000000) return ep_fail(err, "%s: field prune_k[%d]: expected a positive count", c->path, i);
    if (p->n_files && p->n_k != p->n_files)
        return ep_fail(err, "%s: field prune_k: needs one count per prune_using_imp_scores file (%d, not %d)", c->path,
                       p->n_files, p->n_k);
    // prune_k[r] is round r's keep count: an entry past the last pruning round would never be used.
    if (p->n_k > p->head_rounds + p->edge_rounds)
        return ep_fail(err, "%s: field prune_k: %d counts for %lld pruning rounds (prune_rounds)", c->path, p->n_k,
                       p->head_rounds + p->edge_rounds);
    if (p->min_units < 0 || p->min_units > 100000000)
        return ep_fail(err, "%s: field min_units: expected a count 0..100000000", c->path);
    // Faithfulness is a ratio to the clean model's logit difference; a threshold above 1 is most likely a
    // percentage (50 for 0.5).
    if (!(p->min_faithfulness >= 0 && p->min_faithfulness <= 1))
        return ep_fail(err, "%s: field min_faithfulness: expected a number in [0, 1] (0: off)", c->path);
    if (p->exact_max_seqs < 1 || p->exact_max_seqs > 100000000)
        return ep_fail(err, "%s: field exact_max_seqs: expected a count 1..100000000", c->path);
    if (p->exact_units_per_item < 1 || p->exact_units_per_item > 100000000)
        return ep_fail(err, "%s: field exact_units_per_item: expected a positive count", c->path);
    if (p->score_donors && (p->score_donors < 1 || p->score_donors > c->n_donors))
        return ep_fail(err, "%s: field score_donors: expected a count 1..%d (the prompts' donors)", c->path, c->n_donors);
    const run_fv *f = &c->fv;
    if (f->on) {
        if (f->top_k < 1 || f->top_k > 100000)
            return ep_fail(err, "%s: field function_vectors.top_k: expected a count 1..100000", c->path);
        for (int i = 0; i < f->n_scales; i++)
            if (!(fabs(f->scales[i]) <= 1e4))
                return ep_fail(err, "%s: field function_vectors.scales[%d]: expected a number in [-10000, 10000]", c->path, i);
        // The injection adds one whole vector to a whole model's residual stream (docs/function_vectors.md).
        if (c->tensor_parallel > 1)
            return ep_fail(err, "%s: field function_vectors: not with tensor_parallel %d > 1 (not supported yet)", c->path,
                           c->tensor_parallel);
    }
    return 0;
}

// The plans compiled against the model's shape as the stages will compile them (then dropped).
static int check_plans(const run_config *c, const model_config *m, ep_error *err) {
    ablation_plan p, *list = NULL;
    int n = 0;
    if (plan_from_run_config(c, m, &p, err)) return -1;
    plan_free(&p);
    if (plan_list_from_run_config(c, m, &list, &n, err)) return -1;
    plan_list_free(list, n);
    return 0;
}

int run_config_check_inputs(const run_config *c, const model_config *model, ep_error *err) {
    // The task file, whole (its pair lists too), and the donor kinds the config asks of it.
    task t;
    if (task_load(c->task, &t, err)) return ep_wrap(err, "%s: field task", c->path);
    int rc = 0;
    for (int d = 0; d < c->n_donors && rc == 0; d++)
        if (!c->donor_kinds[d][0] && d >= t.n_kinds)
            rc = ep_fail(err, "%s: field donors: %d donors asked, task %s offers %d kinds", c->path, c->n_donors, t.name,
                         t.n_kinds);
    for (int d = 0; d < c->n_donors && rc == 0; d++) {
        donor_kind kind = d < t.n_kinds ? t.kinds[d] : DONOR_KIND_COUNT;
        if (c->donor_kinds[d][0] && donor_kind_parse(c->donor_kinds[d], &kind) == 0 && task_check_kind(&t, kind, err))
            rc = ep_wrap(err, "%s: field donors[%d]", c->path, d);
        else if (kind == DONOR_MEAN && c->prune.eap_ig)  // EAP-IG integrates from the donor prompt's embeddings
            rc = ep_fail(err, "%s: field importance: \"eap-ig\" needs donor prompts; donor %d is the mean donor, which has "
                              "none (use \"attribution\" or \"exact\")", c->path, d);
        else if (kind == DONOR_MEAN && c->tensor_parallel > 1)
            rc = ep_fail(err, "%s: field donors[%d]: the mean donor does not run tensor-parallel yet (tensor_parallel 1)",
                         c->path, d);
    }
    task_free(&t);
    if (rc) return -1;
    // The model's shape from its config.json (no weights): every plan's layers and heads.
    // A config without model_path runs the tokenize stage only (with tokenizer_path): no plan to check.
    model_config loaded;
    if (!model && !c->model_path) return 0;
    if (!model) {
        char path[4200];
        snprintf(path, sizeof path, "%s/config.json", c->model_path);
        if (model_config_load(path, &loaded, err)) return ep_wrap(err, "%s: field model_path", c->path);
        model = &loaded;
    }
    if (check_plans(c, model, err)) return -1;
    for (int i = 0; i < c->fv.n_heads; i++)
        if (c->fv.heads[i][0] >= model->n_layers || c->fv.heads[i][1] >= model->n_heads)
            return ep_fail(err, "%s: field function_vectors.heads[%d]: [%d, %d] is outside the model's %d layers x %d heads",
                           c->path, i, c->fv.heads[i][0], c->fv.heads[i][1], model->n_layers, model->n_heads);
    for (int i = 0; i < c->fv.n_layers; i++)
        if (c->fv.layers[i] < 0 || c->fv.layers[i] >= model->n_layers)
            return ep_fail(err, "%s: field function_vectors.layers[%d]: layer %lld is outside the model's 0..%d", c->path, i,
                           c->fv.layers[i], model->n_layers - 1);
    // Another run's round files are user inputs: sealed and intact, or refused now.
    for (int i = 0; i < c->prune.n_files; i++) {
        h5store s;
        if (h5store_open(c->prune.files[i], &s, err)) return ep_wrap(err, "%s: field prune_using_imp_scores[%d]", c->path, i);
        char *format = NULL;
        int r = h5store_get_str(&s, "format", &format, err);
        if (r == 0 && strcmp(format, "edgepatch-prune-round-1"))
            r = ep_fail(err, "%s: a %s file, not a prune round file (prune.d/round-NNN.h5)", c->prune.files[i], format);
        free(format);
        h5store_close(&s);
        if (r) return ep_wrap(err, "%s: field prune_using_imp_scores[%d]", c->path, i);
    }
    return 0;
}

int run_config_load(const char *path, run_config *c, ep_error *err) {
    json_error_t jerr;
    json_t *j = json_load_file(path, 0, &jerr);
    if (!j) {
        memset(c, 0, sizeof *c);
        return jerr.line < 1 ? ep_fail(err, "%s: %s", path, jerr.text)
                             : ep_fail(err, "%s: invalid JSON: %s (line %d)", path, jerr.text, jerr.line);
    }
    char *text = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    int rc = run_config_parse(text, path, c, err);
    free(text);
    if (rc == 0 && (run_config_check_values(c, err) || run_config_check_inputs(c, NULL, err))) {
        run_config_free(c);
        rc = -1;
    }
    return rc;
}

void run_config_free(run_config *c) {
    if (c->json) json_decref(c->json);
    free(c->path);
    free(c->ablations);
    free(c->prune.k);
    free(c->prune.files);
    memset(c, 0, sizeof *c);
}

json_t *run_config_resolved(const run_config *c) {
    const run_prune *p = &c->prune;
    json_t *o = json_object(), *donors = json_array(), *k = json_array(), *files = json_array();
    json_object_set_new(o, "mode", json_string(run_mode_name(c->mode)));
    json_object_set_new(o, "task", json_string(c->task));
    if (c->model_name) json_object_set_new(o, "model_name", json_string(c->model_name));
    json_object_set_new(o, "model_path", c->model_path ? json_string(c->model_path) : json_null());
    json_object_set_new(o, "tokenizer_path", json_string(c->tokenizer_path));
    json_object_set_new(o, "output_path", json_string(c->output_path));
    json_object_set_new(o, "seed", json_integer((json_int_t)c->seed));
    json_object_set_new(o, "n_prompts", json_integer(c->n_prompts));
    // The task's defaults (n_shots, donor kinds) where the config leaves them to it.
    task t;
    ep_error terr = {{0}};
    int have_task = task_load(c->task, &t, &terr) == 0;
    json_object_set_new(o, "n_shots", json_integer(c->n_shots >= 0 ? c->n_shots : have_task ? t.n_shots : -1));
    json_object_set_new(o, "batch_size", json_integer(c->batch_size));
    for (int d = 0; d < c->n_donors; d++)
        json_array_append_new(donors, json_string(c->donor_kinds[d][0] ? c->donor_kinds[d]
                                                  : have_task && d < t.n_kinds ? donor_kind_name(t.kinds[d]) : "?"));
    if (have_task) task_free(&t);
    json_object_set_new(o, "donors", donors);
    json_object_set_new(o, "backend", json_string(c->backend));
    json_object_set_new(o, "dtype", json_string(c->bf16 ? "bf16" : "fp32"));
    json_object_set_new(o, "cache_dtype", json_string(c->cache_bf16 ? "bf16" : "fp32"));
    json_object_set_new(o, "tensor_parallel", json_integer(c->tensor_parallel));
    json_object_set_new(o, "max_new_tokens", json_integer(c->max_new_tokens));
    if (c->plan) json_object_set(o, "plan", c->plan);
    if (c->affect_whom) json_object_set(o, "affect_whom", c->affect_whom);
    if (c->circuit) json_object_set(o, "circuit", c->circuit);
    json_t *ab = json_array();
    for (int i = 0; i < c->n_ablations; i++) json_array_append(ab, c->ablations[i].plan);
    json_object_set_new(o, "ablations", ab);
    json_object_set_new(o, "importance", json_string(p->importance));
    if (p->eap_ig) json_object_set_new(o, "ig_steps", json_integer(p->ig_steps));
    json_object_set_new(o, "prune_rounds", json_pack("{s:I,s:I}", "heads", (json_int_t)p->head_rounds, "edges",
                                                     (json_int_t)p->edge_rounds));
    json_object_set_new(o, "prune_fraction", json_real(p->fraction));
    for (int i = 0; i < p->n_k; i++) json_array_append_new(k, json_integer(p->k[i]));
    json_object_set_new(o, "prune_k", k);
    for (int i = 0; i < p->n_files; i++) json_array_append_new(files, json_string(p->files[i]));
    json_object_set_new(o, "prune_using_imp_scores", files);
    json_object_set_new(o, "min_units", json_integer(p->min_units));
    json_object_set_new(o, "min_faithfulness", json_real(p->min_faithfulness));
    json_object_set_new(o, "exact_max_seqs", json_integer(p->exact_max_seqs));
    json_object_set_new(o, "exact_units_per_item", json_integer(p->exact_units_per_item));
    json_object_set_new(o, "score_donors", p->score_donors ? json_integer(p->score_donors) : json_string("all"));
    json_object_set_new(o, "compare_importance", json_boolean(p->compare));
    json_object_set_new(o, "edge_intervention", json_string(edge_source_name(c->edge_intervention)));
    if (c->fv.on) {
        const run_fv *f = &c->fv;
        json_t *fv = json_object(), *l = json_array(), *sc = json_array();
        if (f->n_heads) {
            json_t *h = json_array();
            for (int i = 0; i < f->n_heads; i++) json_array_append_new(h, json_pack("[i,i]", f->heads[i][0], f->heads[i][1]));
            json_object_set_new(fv, "heads", h);
        } else {
            json_object_set_new(fv, "top_k", json_integer(f->top_k));
        }
        for (int i = 0; i < f->n_layers; i++) json_array_append_new(l, json_integer(f->layers[i]));
        json_object_set_new(fv, "layers", f->n_layers ? l : json_string("all"));
        if (!f->n_layers) json_decref(l);
        for (int i = 0; i < f->n_scales; i++) json_array_append_new(sc, json_real(f->scales[i]));
        json_object_set_new(fv, "scales", sc);
        json_object_set_new(o, "function_vectors", fv);
    }
    char hex[17];
    hash_hex(c->hash, hex);
    json_object_set_new(o, "config_hash", json_string(hex));
    return o;
}
