// The patch stage driver (declared in stages/patch.h).
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pipeline/files.h"
#include "pipeline/h5store.h"
#include "pipeline/hash.h"
#include "stages/cache.h"
#include "stages/metrics.h"
#include "stages/patch.h"
#include "stages/prompts.h"
#include "stages/stage_inputs.h"

// The file formats (docs/artifacts.md): 2 adds kl_full_model, attn_entropy and attn_mass to every group.
#define PATCH_FORMAT "edgepatch-patch-2"
#define PATCH_ITEM_FORMAT "edgepatch-patch-item-2"

typedef struct {
    int32_t *correct, *first_token_correct, *generated, *n_generated;
    float *target_logprob, *logit_diff, *kl_full_model;
    float *attn_entropy, *attn_mass;  // [P][layers][heads], [P][layers][heads][PATCH_ATTN_TYPES]
} metric_arrays;

static void metric_arrays_init(metric_arrays *a, int P, int max_new, int layer_heads) {
    a->correct = ep_calloc((size_t)P, sizeof(int32_t));
    a->first_token_correct = ep_calloc((size_t)P, sizeof(int32_t));
    a->n_generated = ep_calloc((size_t)P, sizeof(int32_t));
    a->generated = ep_malloc(sizeof(int32_t) * (size_t)P * (max_new ? max_new : 1));
    for (size_t i = 0; i < (size_t)P * (max_new ? max_new : 1); i++) a->generated[i] = -1;
    a->target_logprob = ep_calloc((size_t)P, sizeof(float));
    a->logit_diff = ep_calloc((size_t)P, sizeof(float));
    a->kl_full_model = ep_calloc((size_t)P, sizeof(float));
    a->attn_entropy = ep_calloc((size_t)P * layer_heads, sizeof(float));
    a->attn_mass = ep_calloc((size_t)P * layer_heads * PATCH_ATTN_TYPES, sizeof(float));
}

static void metric_arrays_free(metric_arrays *a) {
    free(a->correct), free(a->first_token_correct), free(a->generated), free(a->n_generated);
    free(a->target_logprob), free(a->logit_diff), free(a->kl_full_model), free(a->attn_entropy), free(a->attn_mass);
}

// One plan's outputs over a batch of prompts first..: metrics into rows 0.. of a.
static int outputs_metrics(const stage_inputs *in, const tokenizer *tk, int first, int n, int max_new, const float *last,
                           const int *gen, const int *n_gen, metric_arrays *a, ep_error *err) {
    int V = in->m.cfg.vocab_size, rc = 0;
    const prompt_set *ps = &in->prompts;
    for (int i = 0; i < n && rc == 0; i++) {
        int p = first + i;
        prompt_metrics m;
        rc = metrics_compute(tk, last + (size_t)i * V, V, ps->targets + (size_t)p * ps->max_target, ps->target_lengths[p],
                             gen + (size_t)i * max_new, n_gen[i], &m, err);
        a->correct[i] = m.correct;
        a->first_token_correct[i] = m.first_token_correct;
        a->target_logprob[i] = m.target_logprob;
        a->logit_diff[i] = m.logit_diff;
        a->n_generated[i] = n_gen[i];
        for (int k = 0; k < n_gen[i]; k++) a->generated[(size_t)i * max_new + k] = gen[(size_t)i * max_new + k];
    }
    return rc;
}

// Every plan of plans[0..n) over one batch of prompts first..: the prompt pass, generation and metrics into
// rows 0.. of a[i]. With base (the clean pass), each pass is derived from it and the generations are
// decoded together (stages/patch.h, "Reuse"); without, each plan runs whole, one after another.
// plans[full] is the full model: every plan's KL at `last` is taken against its logits (its own: 0).
static int measure(stage_inputs *in, const tokenizer *tk, int n_plans, const ablation_plan *const *plans,
                   metric_arrays *const *a, const prompt_batch *pb, const kv_cache *donors, const patch_base *base,
                   int full, int first, int max_new, ep_error *err) {
    int V = in->m.cfg.vocab_size, n = pb->n_seqs, rc = 0, mn = max_new ? max_new : 1;
    float *last = ep_malloc(sizeof(float) * (size_t)n_plans * n * V);
    int *gen = ep_malloc(sizeof(int) * (size_t)n_plans * n * mn), *n_gen = ep_calloc((size_t)n_plans * n, sizeof(int));
    patch_outputs *out = ep_calloc((size_t)n_plans, sizeof *out);
    for (int i = 0; i < n_plans; i++)
        out[i] = (patch_outputs){.last_logits = last + (size_t)i * n * V, .max_new = max_new,
                                 .generated = gen + (size_t)i * n * mn, .n_generated = n_gen + (size_t)i * n,
                                 .stop_ids = in->m.cfg.eos_ids, .n_stop_ids = in->m.cfg.n_eos,
                                 .attn_entropy = a[i]->attn_entropy, .attn_mass = a[i]->attn_mass};
    if (base)
        rc = patch_prompt_passes_from(&in->dev, in->ops, n_plans, plans, pb, donors, base, out, err);
    for (int i = 0; i < n_plans && rc == 0 && !base; i++)
        rc = patch_prompt_pass(&in->dev, in->ops, plans[i], pb, donors, &out[i], err);
    for (int i = 0; i < n_plans && rc == 0; i++) {
        rc = outputs_metrics(in, tk, first, n, max_new, out[i].last_logits, out[i].generated, out[i].n_generated, a[i], err);
        metrics_kl_full_model(in->ops, out[full].last_logits, out[i].last_logits, n, V, a[i]->kl_full_model);
    }
    free(last), free(gen), free(n_gen), free(out);
    return rc;
}

// The token types of attn_mass's last dimension, bos .. last (its enum_names).
static const char *const *attn_type_names(void) {
    static const char *names[PATCH_ATTN_TYPES];
    for (int t = 0; t < PATCH_ATTN_TYPES; t++) names[t] = token_type_name(t);
    return names;
}

static int store_metrics(h5store *s, const char *group, const metric_arrays *a, int P, int max_new, int layers,
                         int heads, ep_error *err) {
    char name[64];
    h5shape pe = {3, {P, layers, heads}}, pm = {4, {P, layers, heads, PATCH_ATTN_TYPES}};
    snprintf(name, sizeof name, "%s/kl_full_model", group);
    if (h5store_write_f32(s, name, &(h5shape){1, {P}}, a->kl_full_model, err) || h5store_label(s, name, "prompt", err))
        return -1;
    snprintf(name, sizeof name, "%s/attn_entropy", group);
    if (h5store_write_f32(s, name, &pe, a->attn_entropy, err) || h5store_label(s, name, "prompt,layer,head", err))
        return -1;
    snprintf(name, sizeof name, "%s/attn_mass", group);
    if (h5store_write_f32(s, name, &pm, a->attn_mass, err) || h5store_label(s, name, "prompt,layer,head,sender_type", err) ||
        h5store_set_strs_at(s, name, "enum_names", attn_type_names(), PATCH_ATTN_TYPES, err))
        return -1;
    h5shape p1 = {1, {P}}, pg = {2, {P, max_new ? max_new : 1}};
    const char *ints[3] = {"correct", "first_token_correct", "n_generated"};
    const int32_t *iv[3] = {a->correct, a->first_token_correct, a->n_generated};
    for (int k = 0; k < 3; k++) {
        snprintf(name, sizeof name, "%s/%s", group, ints[k]);
        if (h5store_write_i32(s, name, &p1, iv[k], err) || h5store_label(s, name, "prompt", err)) return -1;
    }
    snprintf(name, sizeof name, "%s/generated", group);
    if (h5store_write_i32(s, name, &pg, a->generated, err) || h5store_label(s, name, "prompt,generated_position", err))
        return -1;
    snprintf(name, sizeof name, "%s/target_logprob", group);
    if (h5store_write_f32(s, name, &p1, a->target_logprob, err) || h5store_label(s, name, "prompt", err)) return -1;
    snprintf(name, sizeof name, "%s/logit_diff", group);
    return h5store_write_f32(s, name, &p1, a->logit_diff, err) || h5store_label(s, name, "prompt", err) ? -1 : 0;
}

static double mean_i(const int32_t *v, int n, const int32_t *mask) {
    double s = 0;
    int k = 0;
    for (int i = 0; i < n; i++)
        if (!mask || mask[i]) s += v[i], k++;
    return k ? s / k : NAN;
}

static double mean_f(const float *v, int n) {
    double s = 0;
    for (int i = 0; i < n; i++) s += v[i];
    return n ? s / n : NAN;
}

static json_t *real_or_null(double x) { return isfinite(x) ? json_real(x) : json_null(); }

// One plan's figures into o, against the clean model's.
static void set_figures(json_t *o, const metric_arrays *m, const metric_arrays *clean, int P) {
    double acc = mean_i(m->correct, P, NULL), full = mean_i(clean->correct, P, NULL);
    double ld = mean_f(m->logit_diff, P), full_ld = mean_f(clean->logit_diff, P);
    json_object_set_new(o, "accuracy", real_or_null(acc));
    json_object_set_new(o, "first_token_accuracy", real_or_null(mean_i(m->first_token_correct, P, NULL)));
    json_object_set_new(o, "mean_target_logprob", real_or_null(mean_f(m->target_logprob, P)));
    json_object_set_new(o, "mean_logit_diff", real_or_null(ld));
    json_object_set_new(o, "mean_kl_full_model", real_or_null(mean_f(m->kl_full_model, P)));
    json_object_set_new(o, "accuracy_on_full_model_correct", real_or_null(mean_i(m->correct, P, clean->correct)));
    json_object_set_new(o, "faithfulness_accuracy", real_or_null(full > 0 ? acc / full : NAN));
    json_object_set_new(o, "faithfulness_logit_diff", real_or_null(full_ld != 0 ? ld / full_ld : NAN));
    // The paired table of greedy correctness against the full model on the same prompts: what the
    // report's 95% interval of the accuracy drop is computed from (stages/interval.h).
    int both = 0, full_only = 0, ablated_only = 0;
    for (int i = 0; i < P; i++) {
        both += clean->correct[i] && m->correct[i];
        full_only += clean->correct[i] && !m->correct[i];
        ablated_only += !clean->correct[i] && m->correct[i];
    }
    json_object_set_new(o, "prompts_correct", json_pack("{s:i,s:i,s:i,s:i}", "both", both, "full_model_only", full_only,
                                                         "ablated_only", ablated_only, "neither", P - both - full_only - ablated_only));
}

// The layers a plan ablates anything in (a rule that reads a donor, or a head unit), ascending.
static json_t *ablated_layers(const ablation_plan *p) {
    json_t *list = json_array();
    for (int l = 0; l < p->n_layers; l++) {
        int any = 0;
        for (int r = 0; r < p->layer_rules[l].n && !any; r++) any = plan_rule_patches(&p->layer_rules[l].rule[r]);
        for (int u = 0; u < p->n_head_units && !any; u++) any = p->head_units[u].layer == l && p->head_units[u].donor >= 0;
        if (any) json_array_append_new(list, json_integer(l));
    }
    return list;
}

// model_logs.json as the patch stage writes it. m: the plan's, the clean model's, then each ablation's figures.
static json_t *model_logs_object(const stage_inputs *in, const metric_arrays *m, int P) {
    const metric_arrays *clean = &m[1];
    json_t *o = json_object();
    json_object_set_new(o, "model_name", json_string(in->cfg->model_name ? in->cfg->model_name : ""));
    json_object_set_new(o, "task", json_string(in->prompts.task));
    json_object_set_new(o, "plan", json_string(in->plan.name));
    json_object_set_new(o, "plan_ablates", json_boolean(in->plan.n_rules + in->plan.n_head_units > 0));
    json_object_set_new(o, "n_prompts", json_integer(P));
    set_figures(o, &m[0], clean, P);
    json_object_set_new(o, "full_model_accuracy", real_or_null(mean_i(clean->correct, P, NULL)));
    json_object_set_new(o, "full_model_first_token_accuracy", real_or_null(mean_i(clean->first_token_correct, P, NULL)));
    json_object_set_new(o, "full_model_mean_target_logprob", real_or_null(mean_f(clean->target_logprob, P)));
    json_object_set_new(o, "full_model_mean_logit_diff", real_or_null(mean_f(clean->logit_diff, P)));
    json_object_set_new(o, "model_hash", json_string(in->model_hash));
    json_object_set_new(o, "plan_hash", json_string(in->plan_hash));
    if (in->n_ablations) {
        json_t *list = json_array();
        for (int a = 0; a < in->n_ablations; a++) {
            json_t *f = json_pack("{s:s}", "name", in->ablations[a].name);
            const run_ablation *spec = &in->cfg->ablations[a];
            // the report's heatmap labels, when the config gives them
            if (spec->group) json_object_set_new(f, "group", json_string(spec->group));
            if (spec->band) json_object_set_new(f, "band", json_string(spec->band));
            json_object_set_new(f, "layers", ablated_layers(&in->ablations[a]));
            set_figures(f, &m[2 + a], clean, P);
            json_array_append_new(list, f);
        }
        json_object_set_new(o, "ablations", list);
    }
    return o;
}

static int write_model_logs(const stage_inputs *in, const metric_arrays *m, int P, ep_error *err) {
    json_t *o = model_logs_object(in, m, P);
    char path[4096];
    snprintf(path, sizeof path, "%s/model_logs.json", in->cfg->output_path);
    int rc = write_json_atomic(path, o, err);
    json_decref(o);
    return rc;
}

// One float dataset of a group, [n, inner...] with `inner` floats per prompt, into rows [first, first + n) of dst.
static int load_floats(h5store *s, const char *group, const char *dataset, float *dst, int first, int n, int rank,
                       size_t inner, ep_error *err) {
    char name[64];
    snprintf(name, sizeof name, "%s/%s", group, dataset);
    h5shape sh;
    float *v = NULL;
    int rc = h5store_read_f32(s, name, &sh, &v, err);
    size_t numel = 1;
    for (int d = 0; rc == 0 && d < sh.rank; d++) numel *= (size_t)sh.dims[d];
    if (rc == 0 && (sh.rank != rank || sh.dims[0] != n || numel != (size_t)n * inner))
        rc = ep_fail(err, "%s: dataset %s has the wrong shape for this item", s->path, name);
    if (rc == 0) memcpy(dst + (size_t)first * inner, v, sizeof(float) * (size_t)n * inner);
    free(v);
    return rc;
}

// Rows [0, n) of one group of an item shard into rows [first, first + n) of a.
static int load_metrics(h5store *s, const char *group, metric_arrays *a, int first, int n, int max_new, int layer_heads,
                        ep_error *err) {
    if (load_floats(s, group, "kl_full_model", a->kl_full_model, first, n, 1, 1, err) ||
        load_floats(s, group, "attn_entropy", a->attn_entropy, first, n, 3, (size_t)layer_heads, err) ||
        load_floats(s, group, "attn_mass", a->attn_mass, first, n, 4, (size_t)layer_heads * PATCH_ATTN_TYPES, err))
        return -1;
    const char *ints[4] = {"correct", "first_token_correct", "n_generated", "generated"};
    int32_t *iv[4] = {a->correct, a->first_token_correct, a->n_generated, a->generated};
    const char *floats[2] = {"target_logprob", "logit_diff"};
    float *fv[2] = {a->target_logprob, a->logit_diff};
    char name[64];
    for (int k = 0; k < 6; k++) {
        int is_int = k < 4, width = k == 3 ? max_new : 1;
        snprintf(name, sizeof name, "%s/%s", group, is_int ? ints[k] : floats[k - 4]);
        h5shape sh;
        void *v = NULL;
        int rc = is_int ? h5store_read_i32(s, name, &sh, (int32_t **)&v, err) : h5store_read_f32(s, name, &sh, (float **)&v, err);
        if (rc == 0 && (sh.dims[0] != n || sh.rank != (k == 3 ? 2 : 1) || (k == 3 && sh.dims[1] != max_new)))
            rc = ep_fail(err, "%s: dataset %s has the wrong shape for this item", s->path, name);
        if (rc == 0) {
            size_t row = (size_t)width * 4;
            memcpy(is_int ? (void *)(iv[k] + (size_t)first * width) : (void *)(fv[k - 4] + first), v, row * n);
        }
        free(v);
        if (rc) return -1;
    }
    return 0;
}

typedef struct {
    stage_inputs *in;
    tokenizer *tk;
    ablation_plan clean;
    int max_new, ablates, layer_heads;
    char identity[17], path[4096], logs_path[4096];
} patch_ctx;

static metric_arrays *groups_init(const patch_ctx *c, int n);
static void groups_free(const patch_ctx *c, metric_arrays *m);
static void group_name(int g, char out[32]);

// With a current patch.h5: model_logs.json (derived from it) is rewritten from it unless it holds what
// the patch stage wrote (compared as text, after the prune rounds' "prune" lines are set aside; those
// are kept, and the prune stage rewrites them from its round files anyway).
static int logs_check(const patch_ctx *c, ep_error *err) {
    const stage_inputs *in = c->in;
    int P = in->prompts.n_prompts, rc = 0;
    metric_arrays *m = groups_init(c, P);
    h5store s;
    if ((rc = h5store_open(c->path, &s, err)) == 0) {
        for (int g = 0; g < 2 + in->n_ablations && rc == 0; g++) {
            char name[32];
            group_name(g, name);
            rc = load_metrics(&s, name, &m[g], 0, P, c->max_new, c->layer_heads, err);
        }
        h5store_close(&s);
    }
    json_t *want = rc == 0 ? model_logs_object(in, m, P) : NULL;
    groups_free(c, m);
    if (rc) return -1;
    json_error_t je;
    json_t *have = json_load_file(c->logs_path, 0, &je), *prune = json_object_get(have, "prune");
    const char *why = !have ? (access(c->logs_path, F_OK) ? "missing" : "not JSON")
                            : !json_is_object(have) ? "not a JSON object" : NULL;
    if (prune) json_incref(prune);
    if (!why) {
        json_object_del(have, "prune");
        size_t flags = JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(8);
        char *a = json_dumps(have, flags), *b = json_dumps(want, flags);
        if (strcmp(a, b)) why = "its figures are not patch.h5's (damaged?)";
        free(a), free(b);
    }
    if (why) {
        ep_logf(in->log, EP_LOG_WARN, "patch: rebuilding %s from %s: %s", c->logs_path, c->path, why);
        if (json_is_array(prune)) json_object_set(want, "prune", prune);
        rc = write_json_atomic(c->logs_path, want, err);
    }
    json_decref(prune), json_decref(have), json_decref(want);
    return rc;
}

static int patch_prepare(work_stage *ws, int fresh, ep_error *err) {
    patch_ctx *c = ws->ctx;
    int current = stage_output_current(c->path, c->identity, fresh, ws->log, err);
    if (current < 0) return -1;
    ep_error why;
    if (current && h5store_made_from_format(c->path, c->identity, PATCH_FORMAT, &why) != H5STORE_SAME) {
        ep_logf(ws->log, EP_LOG_WARN, "edgepatch: rebuilding %s: %s", c->path, why.msg);  // an older format
        current = 0;
    }
    if (current) {
        if (logs_check(c, err)) return -1;
        ep_log_result(ws->log, "patch: %s is up to date", c->path);
        return 1;
    }
    if (fresh) unlink(c->path), unlink(c->logs_path);
    return stage_shard_dir_prepare(c->in, "patch", fresh, err);
}

static void item_identity(const patch_ctx *c, int item, char out[17]) {
    int first, n;
    stage_item_range(c->in, item, &first, &n);
    stage_item_identity(c->identity, first, n, out);
}

static int patch_item_done(work_stage *ws, int item, ep_error *err) {
    patch_ctx *c = ws->ctx;
    char path[4096], identity[17];
    item_identity(c, item, identity);
    stage_item_path(c->in, "patch", item, path, sizeof path);
    return stage_item_current(path, identity, PATCH_ITEM_FORMAT, ws->log, err);
}

// Metric groups of the patch files: 0 "plan", 1 "clean", 2 + a "ablation-NNN" for the config's ablation a.
static void group_name(int g, char out[32]) {
    if (g < 2) snprintf(out, 32, "%s", g == 0 ? "plan" : "clean");
    else snprintf(out, 32, "ablation-%03d", g - 2);
}

static metric_arrays *groups_init(const patch_ctx *c, int n) {
    int G = 2 + c->in->n_ablations;
    metric_arrays *m = ep_calloc((size_t)G, sizeof *m);
    for (int g = 0; g < G; g++) metric_arrays_init(&m[g], n, c->max_new, c->layer_heads);
    return m;
}

static void groups_free(const patch_ctx *c, metric_arrays *m) {
    for (int g = 0; g < 2 + c->in->n_ablations; g++) metric_arrays_free(&m[g]);
    free(m);
}

// An ablation group's attributes: its name, the config's group and band labels (when given) and its
// plan as the config's ablations[i] gives it, less name, group and band (canonical JSON: sorted keys,
// compact), so the file says what was ablated.
static int store_ablation_attrs(const patch_ctx *c, h5store *s, const char *group, int a, ep_error *err) {
    const run_ablation *spec = &c->in->cfg->ablations[a];
    json_t *plan = json_deep_copy(spec->plan);  // the plan without the labels stored beside it
    json_object_del(plan, "name"), json_object_del(plan, "group"), json_object_del(plan, "band");
    char *rules = json_dumps(plan, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref(plan);
    int rc = h5store_set_str_at(s, group, "name", c->in->ablations[a].name, err) ||
             (spec->group && h5store_set_str_at(s, group, "group", spec->group, err)) ||
             (spec->band && h5store_set_str_at(s, group, "band", spec->band, err)) ||
             h5store_set_str_at(s, group, "rules", rules ? rules : "null", err);
    free(rules);
    return rc ? -1 : 0;
}

// Every group of m (n prompts) into s; without ablations in the plan, "clean" is the plan's figures.
static int store_groups(const patch_ctx *c, h5store *s, const metric_arrays *m, int n, ep_error *err) {
    for (int g = 0; g < 2 + c->in->n_ablations; g++) {
        char name[32];
        group_name(g, name);
        if (store_metrics(s, name, g == 1 && !c->ablates ? &m[0] : &m[g], n, c->max_new, c->in->m.cfg.n_layers,
                          c->in->m.cfg.n_heads, err))
            return -1;
        if (g >= 2 && store_ablation_attrs(c, s, name, g - 2, err)) return -1;
    }
    return 0;
}

static int patch_run_item(work_stage *ws, int item, ep_error *err) {
    patch_ctx *c = ws->ctx;
    stage_inputs *in = c->in;
    char path[4096], identity[17];
    int first, n, rc;
    stage_item_range(in, item, &first, &n);
    item_identity(c, item, identity);
    stage_item_path(in, "patch", item, path, sizeof path);
    metric_arrays *m = groups_init(c, n);
    prompt_batch pb = stage_batch(in, first, n);
    kv_cache donors[16];
    memset(donors, 0, sizeof donors);
    int damaged = 0;
    rc = cache_load_item(in, item, donors, &damaged, err);
    if (rc && damaged) {  // the cache stage recomputes it: the driver runs it again, then this item (work_stage.shard_bad)
        char cache_path[4096];
        stage_item_path(in, "cache", item, cache_path, sizeof cache_path);
        stage_shard_damaged(ws, cache_path, err);
    }
    // The clean pass, kept whole: every other pass of the item derives from it, recomputing only the rows
    // and layers its plan reaches (in->full_passes: each one whole, as before the reuse).
    patch_base base = {0};
    int derive = !in->full_passes && (c->ablates || in->n_ablations > 0), n_plans = 0;
    const ablation_plan **plans = ep_calloc((size_t)in->n_ablations + 2, sizeof *plans);
    metric_arrays **into = ep_calloc((size_t)in->n_ablations + 2, sizeof *into);
    plans[n_plans] = &in->plan, into[n_plans++] = &m[0];
    if (c->ablates) plans[n_plans] = &c->clean, into[n_plans++] = &m[1];
    for (int a = 0; a < in->n_ablations; a++) plans[n_plans] = &in->ablations[a], into[n_plans++] = &m[2 + a];
    if (rc == 0 && derive) rc = patch_base_run(&in->dev, in->ops, &c->clean, &pb, donors, 0, &base, err);
    // the full model: the clean plan, or the run's plan itself when it ablates nothing
    if (rc == 0)
        rc = measure(in, c->tk, n_plans, plans, into, &pb, donors, derive ? &base : NULL, c->ablates ? 1 : 0, first,
                     c->max_new, err);
    patch_base_free(&base);
    free(plans), free(into);
    for (int d = 0; d < 16; d++) kv_cache_free(&donors[d]);
    h5store s;
    if (rc == 0 && !ws->follower && (rc = h5store_create(path, &s, err)) == 0) {
        rc = store_groups(c, &s, m, n, err) ||
             h5store_set_str(&s, "format", PATCH_ITEM_FORMAT, err) || h5store_set_str(&s, "inputs_hash", identity, err) ||
             h5store_set_str(&s, "stage_hash", c->identity, err) || h5store_set_i64(&s, "item", item, err) ||
             h5store_set_i64(&s, "first_prompt", first, err) || h5store_set_i64(&s, "n_prompts", n, err);
        if (rc == 0 && ws->before_commit) ws->before_commit(ws->driver_arg, item);
        if (rc) h5store_abandon(&s);
        else rc = h5store_commit(&s, err);
    }
    groups_free(c, m);
    return rc;
}

// Rank 0 (or the only process): the item shards in item order into patch.h5 and model_logs.json.
// model_logs.json is written first: patch.h5, the stage's completion record, comes last.
static int patch_finish(work_stage *ws, ep_error *err) {
    if (ws->follower) return 0;
    patch_ctx *c = ws->ctx;
    stage_inputs *in = c->in;
    int P = in->prompts.n_prompts, rc = 0;
    metric_arrays *m = groups_init(c, P);
    for (int item = 0; item < ws->n_items && rc == 0; item++) {
        char path[4096], identity[17], *have = NULL;
        int first, n;
        stage_item_range(in, item, &first, &n);
        item_identity(c, item, identity);
        stage_item_path(in, "patch", item, path, sizeof path);
        h5store s;
        // Checked again where it is read (the seal, at open): a shard damaged since its item was checked
        // is recomputed.
        rc = h5store_open(path, &s, err);
        if (rc) {
            stage_shard_damaged(ws, path, err);
            break;
        }
        if (h5store_get_str(&s, "inputs_hash", &have, err) || strcmp(have, identity))
            rc = ep_fail(err, "%s: made from other inputs than this run's; rerun the patch stage", path);
        free(have);
        for (int g = 0; g < 2 + in->n_ablations && rc == 0; g++) {
            char name[32];
            group_name(g, name);
            rc = load_metrics(&s, name, &m[g], first, n, c->max_new, c->layer_heads, err);
        }
        h5store_close(&s);
    }
    if (rc == 0) rc = write_model_logs(in, m, P, err);
    json_t *names = json_array();
    for (int a = 0; a < in->n_ablations; a++) json_array_append_new(names, json_string(in->ablations[a].name));
    char *names_text = json_dumps(names, JSON_COMPACT);
    json_decref(names);
    h5store s;
    if (rc == 0 && (rc = h5store_create(c->path, &s, err)) == 0) {
        rc = store_groups(c, &s, m, P, err) ||
             h5store_set_str(&s, "format", PATCH_FORMAT, err) || h5store_set_str(&s, "inputs_hash", c->identity, err) ||
             h5store_set_str(&s, "plan", in->plan.name, err) || h5store_set_str(&s, "ablations", names_text, err) ||
             h5store_set_i64(&s, "max_new_tokens", c->max_new, err);
        if (rc) h5store_abandon(&s);
        else rc = h5store_commit(&s, err);
    }
    free(names_text);
    if (rc == 0) {
        double acc = mean_i(m[0].correct, P, NULL), full = mean_i(m[1].correct, P, NULL);
        char ablations[32] = "";
        if (in->n_ablations) snprintf(ablations, sizeof ablations, ", %d ablations", in->n_ablations);
        ep_log_result(ws->log, "patch: accuracy %.3f (full model %.3f) over %d prompts%s -> %s", acc, full, P, ablations,
                      c->path);
    }
    groups_free(c, m);
    return rc;
}

static void patch_release(work_stage *ws) {
    patch_ctx *c = ws->ctx;
    if (!c) return;
    plan_free(&c->clean);
    tokenizer_free(c->tk);
    free(c);
    ws->ctx = NULL;
}

int patch_work(stage_inputs *in, work_stage *ws, ep_error *err) {
    // Range-checked before the conversion to int (2^32 + 5 must not pass as 5).
    if (run_config_check_values(in->cfg, err)) return -1;
    int max_new = (int)in->cfg->max_new_tokens;
    patch_ctx *c = ep_calloc(1, sizeof *c);
    c->in = in;
    c->max_new = max_new;
    uint64_t h = hash_str(HASH_INIT, "patch");
    h = hash_str(h, in->prompts_hash);
    h = hash_str(h, in->model_hash);
    h = hash_str(h, in->plan_hash);
    for (int a = 0; a < in->n_ablations; a++) {
        h = hash_str(h, in->ablations[a].name);
        h = hash_bytes(h, &(uint64_t){plan_hash(&in->ablations[a])}, sizeof(uint64_t));
    }
    h = hash_bytes(h, &max_new, sizeof max_new);
    hash_hex(h, c->identity);
    snprintf(c->path, sizeof c->path, "%s/patch.h5", in->cfg->output_path);
    snprintf(c->logs_path, sizeof c->logs_path, "%s/model_logs.json", in->cfg->output_path);
    if (tokenizer_load(in->prompts.tokenizer_path, &c->tk, err)) {
        free(c);
        return -1;
    }
    c->ablates = in->plan.n_rules + in->plan.n_head_units > 0;
    c->layer_heads = in->m.cfg.n_layers * in->m.cfg.n_heads;
    plan_empty(&in->m.cfg, &c->clean);
    *ws = (work_stage){.name = "patch", .n_items = stage_n_items(in), .ctx = c, .log = in->log, .prepare = patch_prepare,
                       .item_done = patch_item_done, .run_item = patch_run_item, .finish = patch_finish,
                       .release = patch_release};
    return 0;
}

int patch_stage(stage_inputs *in, int fresh, ep_error *err) {
    work_stage ws;
    if (patch_work(in, &ws, err)) return -1;
    int rc = stage_run_items(&ws, fresh, err);
    ws.release(&ws);
    return rc;
}
