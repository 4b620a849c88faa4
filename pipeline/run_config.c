#include "run_config.h"

#include <stdlib.h>
#include <string.h>

#include "pipeline/hash.h"

static const char *known_fields[] = {
    // the original code's Config
    "task", "model_name", "batch_size", "output_path", "limit", "affect_whom", "prune_using_imp_scores", "prune_k",
    // ours
    "model_path", "tokenizer_path", "seed", "n_shots", "n_prompts", "donors", "importance", "prune_rounds",
    "prune_fraction", "tensor_parallel", "dtype", "description", "plan", "max_new_tokens", "circuit", "cache_dtype",
    "min_units", "min_faithfulness", "exact_max_seqs", "backend", "ablations", "score_donors", "compare_importance",
    "exact_units_per_item",
};

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
    const char *dtype = "fp32";
    c->backend = "auto";
    if (opt_string(c, "backend", &c->backend, err) || opt_string(c, "dtype", &dtype, err)) goto fail;
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
    c->bf16 = !strcmp(dtype, "bf16");
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
            if (!k || strlen(k) >= sizeof c->donor_kinds[d]) {
                ep_fail(err, "%s: field donors[%d]: expected a donor kind name", name, d);
                goto fail;
            }
            strcpy(c->donor_kinds[d], k);
        }
    } else if (donors && !json_is_null(donors)) {
        ep_fail(err, "%s: field donors: expected a count or a list of donor kinds", name);
        goto fail;
    }
    // Where the results go, the free-text description, the backend (backends agree to fp32 rounding; a run
    // may resume on another machine) and how the model is split over ranks (equal up to summation order, so
    // a run may resume with another split) do not change them: not part of the identity.
    json_t *identity = json_deep_copy(c->json);
    json_object_del(identity, "output_path");
    json_object_del(identity, "description");
    json_object_del(identity, "backend");
    json_object_del(identity, "tensor_parallel");
    char *canonical = json_dumps(identity, JSON_SORT_KEYS | JSON_COMPACT);
    json_decref(identity);
    c->hash = hash_str(HASH_INIT, canonical);
    free(canonical);
    return 0;
fail:
    run_config_free(c);
    return -1;
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
    return rc;
}

void run_config_free(run_config *c) {
    if (c->json) json_decref(c->json);
    free(c->path);
    memset(c, 0, sizeof *c);
}
