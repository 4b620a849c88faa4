// Patched forward passes against the independent Python reference (tools/make_patch_fixtures.py, which
// patches HF transformers 4.44.2's own attention modules): logits at every prompt position and greedy
// generations for every plan of tests/fixtures/patch/plans.json on every tiny architecture. Then the
// invariants of issue 5, which need no reference: an empty plan gives the clean logits, a donor equal to
// the clean prompt gives the clean logits under any plan, edges no receiver reads change nothing, and
// changing one donor token changes exactly the runs whose plans read it.
// Every plan also runs on the other backends (the offset test backend of kernels/ops_offset.c, which
// must give cpu's logits and tokens bit for bit, and cuda when a GPU is usable) against the same
// reference. The mean donor (donor kind "mean") against tools/make_patch_fixtures.py --mean.
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "stages/mean_donor.h"
#include "stages/metrics.h"
#include "stages/patch.h"
#include "tests/harness.h"

#define TOL 1e-4
#define P 3
#define GEN 10

typedef struct {
    safetensors st;
    int max_len, K;
    int32_t lengths[P];
    int32_t *tokens, *types, *index, *donors;
} fixture;

static int32_t *read_i32(fixture *f, const char *name, int64_t *numel) {
    const st_tensor *t = safetensors_find(&f->st, name);
    if (!t) return NULL;
    int32_t *v = malloc(sizeof(int32_t) * (size_t)(t->numel ? t->numel : 1));
    ep_error err;
    safetensors_read_i32(t, v, &err);
    if (numel) *numel = t->numel;
    return v;
}

static int load_fixture(const char *model, fixture *f) {
    memset(f, 0, sizeof *f);
    char path[512], name[64];
    snprintf(path, sizeof path, "tests/fixtures/patch/%s.safetensors", model);
    ep_error err = {{0}};
    if (safetensors_open_file(path, &f->st, &err)) {
        check(0, "%s", err.msg);
        return -1;
    }
    for (int i = 0; i < P; i++) {
        snprintf(name, sizeof name, "prompt%d.tokens", i);
        const st_tensor *t = safetensors_find(&f->st, name);
        if (!t) {
            check(0, "%s: no %s", path, name);
            return -1;
        }
        f->lengths[i] = (int32_t)t->numel;
        if (t->numel > f->max_len) f->max_len = (int)t->numel;
        snprintf(name, sizeof name, "prompt%d.donors", i);
        f->K = (int)safetensors_find(&f->st, name)->shape[0];
    }
    size_t L = (size_t)f->max_len;
    f->tokens = calloc(P * L, sizeof(int32_t)), f->types = calloc(P * L, sizeof(int32_t));
    f->index = calloc(P * L, sizeof(int32_t)), f->donors = calloc(P * (size_t)f->K * L, sizeof(int32_t));
    const char *what[3] = {"tokens", "types", "index"};
    int32_t *dst[3] = {f->tokens, f->types, f->index};
    for (int i = 0; i < P; i++) {
        for (int w = 0; w < 3; w++) {
            snprintf(name, sizeof name, "prompt%d.%s", i, what[w]);
            int32_t *v = read_i32(f, name, NULL);
            memcpy(dst[w] + (size_t)i * L, v, sizeof(int32_t) * (size_t)f->lengths[i]);
            free(v);
        }
        snprintf(name, sizeof name, "prompt%d.donors", i);
        int32_t *v = read_i32(f, name, NULL);
        for (int d = 0; d < f->K; d++)
            memcpy(f->donors + ((size_t)i * f->K + d) * L, v + (size_t)d * f->lengths[i], sizeof(int32_t) * (size_t)f->lengths[i]);
        free(v);
    }
    return 0;
}

static void free_fixture(fixture *f) {
    free(f->tokens), free(f->types), free(f->index), free(f->donors);
    safetensors_close(&f->st);
}

static prompt_batch batch_of(const fixture *f) {
    return (prompt_batch){.n_seqs = P, .max_len = f->max_len, .n_donors = f->K, .tokens = f->tokens,
                          .lengths = f->lengths, .types = f->types, .index = f->index, .donors = f->donors};
}

// Logits at every position of every prompt, and generations.
typedef struct {
    float *logits;
    int generated[P * GEN], n_generated[P];
} run_result;

static int run_on(const model *m, const kernel_ops *ops, const ablation_plan *plan, const prompt_batch *pb,
                  run_result *r) {
    ep_error err = {{0}};
    r->logits = calloc((size_t)P * pb->max_len * m->cfg.vocab_size, sizeof(float));
    patch_outputs out = {.logits = r->logits, .max_new = GEN, .generated = r->generated, .n_generated = r->n_generated};
    if (patch_run(m, ops, plan, pb, &out, &err)) {
        check(0, "patch_run %s (%s): %s", plan->name, ops->name, err.msg);
        return -1;
    }
    return 0;
}

static int run(const model *m, const ablation_plan *plan, const prompt_batch *pb, run_result *r) {
    return run_on(m, kernel_ops_cpu(), plan, pb, r);
}

// A run against the Python reference's plan j: the worst row-relative logits error over every prompt
// position (into *worst) and the number of generated tokens equal to the reference's.
static int vs_reference(fixture *f, size_t j, const run_result *r, int V, double *worst) {
    ep_error err;
    int same = 0;
    *worst = 0;
    for (int s = 0; s < P; s++) {
        char key[96];
        snprintf(key, sizeof key, "plan%zu.prompt%d.logits", j, s);
        const st_tensor *t = safetensors_find(&f->st, key);
        float *w = malloc(sizeof(float) * (size_t)t->numel);
        safetensors_read_f32(t, w, &err);
        for (int i = 0; i < f->lengths[s]; i++) {
            double e = max_rel_error(r->logits + ((size_t)s * f->max_len + i) * V, w + (size_t)i * V, (size_t)V, 1e-6);
            if (e > *worst) *worst = e;
        }
        free(w);
        snprintf(key, sizeof key, "plan%zu.prompt%d.generated", j, s);
        int32_t *g = read_i32(f, key, NULL);
        for (int k = 0; k < GEN; k++) same += k < r->n_generated[s] && r->generated[s * GEN + k] == g[k];
        free(g);
    }
    return same;
}

// Worst row-relative error over the valid positions of all prompts.
static double logits_error(const float *a, const float *b, const prompt_batch *pb, int V, int only_prompt) {
    double worst = 0;
    for (int s = 0; s < P; s++) {
        if (only_prompt >= 0 && s != only_prompt) continue;
        for (int i = 0; i < pb->lengths[s]; i++) {
            size_t off = ((size_t)s * pb->max_len + i) * V;
            double e = max_rel_error(a + off, b + off, (size_t)V, 1e-6);
            if (e > worst) worst = e;
        }
    }
    return worst;
}

static int plan_reads_donor0_last(json_t *plan) {
    size_t i;
    json_t *e;
    json_array_foreach(json_object_get(plan, "rules"), i, e) {
        json_t *s = json_object_get(e, "sender");
        int donor = (int)json_integer_value(json_object_get(e, "donor"));
        int last = json_is_string(s);  // "all"
        size_t k;
        json_t *t;
        json_array_foreach(s, k, t) last |= !strcmp(json_string_value(t), "last");
        if (last && donor == 0) return 1;
    }
    json_array_foreach(json_object_get(plan, "heads"), i, e) if (!strcmp(json_string_value(json_object_get(e, "type")), "last") &&
                                                                 json_integer_value(json_object_get(e, "donor")) == 0) return 1;
    return 0;
}

// The model fixture NAME, its patch fixture and, when extra is not NULL, the reference file
// tests/fixtures/patch/NAME.EXTRA.safetensors: 0, or -1 with a failed check and nothing left open.
static int open_case(const char *name, const char *extra, model *m, fixture *f, safetensors *ref) {
    char path[512];
    ep_error err = {{0}};
    if (load_fixture_model(name, m)) return -1;
    if (load_fixture(name, f)) {
        model_free(m);
        return -1;
    }
    if (!extra) return 0;
    snprintf(path, sizeof path, "tests/fixtures/patch/%s.%s.safetensors", name, extra);
    if (safetensors_open_file(path, ref, &err)) {
        check(0, "%s", err.msg);
        free_fixture(f), model_free(m);
        return -1;
    }
    return 0;
}

// The figures-only path (patch_outputs.row_metrics alone: the last logits reduced in the backend's memory,
// never copied back) on model m (ops' memory) against metrics_first_token on the cpu pass's last logits:
// the same bytes on cpu and offset (the host reduction both run), within fp32 rounding on cuda. The
// targets are each prompt's last token (any in-vocabulary ids do). Returns the worst log-prob difference.
static double row_metrics_vs_logits(const model *host, const model *m, const kernel_ops *ops, const ablation_plan *plan,
                                    const prompt_batch *pb, int *same) {
    int V = m->cfg.vocab_size, targets[P];
    logit_row_metrics rows[P];
    for (int s = 0; s < P; s++) targets[s] = pb->tokens[(size_t)s * pb->max_len + pb->lengths[s] - 1];
    patch_outputs out = {.row_metrics = rows, .targets = targets};
    ep_error err = {{0}};
    *same = 0;
    if (patch_run(m, ops, plan, pb, &out, &err)) {
        check(0, "patch_run %s (%s, row_metrics): %s", plan->name, ops->name, err.msg);
        return INFINITY;
    }
    // The reference: the same pass on cpu with its last logits copied out (projected as the last rows alone:
    // a product over every row may round differently), then metrics_first_token on them.
    float *last = malloc(sizeof(float) * (size_t)P * V);
    patch_outputs lo = {.last_logits = last};
    if (patch_run(host, kernel_ops_cpu(), plan, pb, &lo, &err)) {
        check(0, "patch_run %s (cpu, last_logits): %s", plan->name, err.msg);
        free(last);
        return INFINITY;
    }
    double worst = 0;
    int n_same = 0;
    for (int s = 0; s < P; s++) {
        prompt_metrics want, got = {0};
        metrics_first_token(last + (size_t)s * V, V, targets[s], &want);
        metrics_from_row(&rows[s], targets[s], &got);
        n_same += !memcmp(&got, &want, sizeof got);
        worst = fmax(worst, fabs((double)got.target_logprob - want.target_logprob) +
                                (got.first_token_correct != want.first_token_correct));
    }
    *same = n_same == P;
    free(last);
    return worst;
}

static void test_model(const char *name, json_t *plans) {
    model m;
    ep_error err = {{0}};
    fixture f;
    if (open_case(name, NULL, &m, &f, NULL)) return;
    int V = m.cfg.vocab_size;
    prompt_batch pb = batch_of(&f);
    size_t n_logits = (size_t)P * f.max_len * V;
    float *want = malloc(sizeof(float) * n_logits);
    run_result clean = {0};
    ablation_plan empty;
    plan_empty(&m.cfg, &empty);
    run(&m, &empty, &pb, &clean);

    // The modified-donor batch for the "exactly the runs that read it" check: donor 0's token at prompt
    // 0's last position is changed (positions at the end affect nothing before them).
    int32_t *donors_mod = malloc(sizeof(int32_t) * (size_t)P * f.K * f.max_len);
    memcpy(donors_mod, f.donors, sizeof(int32_t) * (size_t)P * f.K * f.max_len);
    int32_t *last_tok = &donors_mod[(size_t)(f.lengths[0] - 1)];
    *last_tok = (*last_tok + 7) % V;
    prompt_batch pb_mod = pb;
    pb_mod.donors = donors_mod;
    // The clean prompt as every donor.
    int32_t *donors_clean = malloc(sizeof(int32_t) * (size_t)P * f.K * f.max_len);
    for (int s = 0; s < P; s++)
        for (int d = 0; d < f.K; d++)
            memcpy(donors_clean + ((size_t)s * f.K + d) * f.max_len, f.tokens + (size_t)s * f.max_len, sizeof(int32_t) * f.max_len);
    prompt_batch pb_same = pb;
    pb_same.donors = donors_clean;

    const kernel_ops *others[] = {kernel_ops_offset(), kernel_ops_cuda()};
    model devs[2];
    for (int k = 0; k < 2; k++)
        if (others[k] && model_to_backend(&m, others[k], 0, &devs[k], &err)) check(0, "%s", err.msg), others[k] = NULL;
    size_t j;
    json_t *pj;
    json_array_foreach(plans, j, pj) {
        ablation_plan plan;
        if (plan_parse(pj, "plans.json", &m.cfg, &plan, &err)) {
            check(0, "%s", err.msg);
            continue;
        }
        run_result r = {0};
        if (run(&m, &plan, &pb, &r) == 0) {
            double worst;
            int same_tokens = vs_reference(&f, j, &r, V, &worst);
            int rm_same;
            double rm = row_metrics_vs_logits(&m, &m, kernel_ops_cpu(), &plan, &pb, &rm_same);
            check(rm_same, "%s %s: cpu row_metrics differ from metrics_first_token of the logits (%.3g)", name,
                  plan.name, rm);
            for (int k = 0; k < 2; k++) {
                if (!others[k]) continue;
                rm = row_metrics_vs_logits(&m, &devs[k], others[k], &plan, &pb, &rm_same);
                check(others[k] == kernel_ops_offset() ? rm_same : rm <= 1e-4,
                      "%s %s: %s row_metrics off the cpu logits' figures (%.3g)", name, plan.name, others[k]->name, rm);
            }
            for (int k = 0; k < 2; k++) {
                run_result o = {0};
                if (!others[k] || run_on(&devs[k], others[k], &plan, &pb, &o)) {
                    free(o.logits);
                    continue;
                }
                double worst_o;
                int same_o = vs_reference(&f, j, &o, V, &worst_o);
                printf("  %-12s %-22s %-6s logits %.2e  generated %2d/%d equal to the Python reference\n", name,
                       plan.name, others[k]->name, worst_o, same_o, P * GEN);
                check(worst_o <= TOL && same_o == P * GEN, "%s %s (%s): logits %.2e, %d/%d tokens", name, plan.name,
                      others[k]->name, worst_o, same_o, P * GEN);
                if (others[k] == kernel_ops_offset())
                    check(!memcmp(o.logits, r.logits, sizeof(float) * n_logits) &&
                              !memcmp(o.generated, r.generated, sizeof r.generated) &&
                              !memcmp(o.n_generated, r.n_generated, sizeof r.n_generated),
                          "%s %s: the offset backend (cpu kernels) differs from cpu", name, plan.name);
                free(o.logits);
            }
            double vs_clean = logits_error(r.logits, clean.logits, &pb, V, -1);
            printf("  %-12s %-22s logits %.2e  generated %2d/%d equal to the Python reference  (%.2g from clean)\n",
                   name, plan.name, worst, same_tokens, P * GEN, vs_clean);
            check(worst <= TOL && same_tokens == P * GEN, "%s %s: logits %.2e, %d/%d tokens", name, plan.name, worst,
                  same_tokens, P * GEN);
            if (plan.n_rules + plan.n_head_units > 0)
                check(vs_clean > 1e-3, "%s %s: the plan changed nothing", name, plan.name);
            else
                check(vs_clean == 0, "%s: the empty plan is not the clean model", name);

            // Invariants: donors equal to the clean prompt -> clean logits.
            run_result same = {0};
            if (run(&m, &plan, &pb_same, &same) == 0)
                check(logits_error(same.logits, clean.logits, &pb, V, -1) < 2e-5,  // summation order only
                      "%s %s: a donor equal to the clean prompt changed the logits", name, plan.name);
            free(same.logits);
            // One donor token changed at prompt 0's last position: only plans that read donor 0 there change,
            // and only on prompt 0.
            run_result mod = {0};
            if (run(&m, &plan, &pb_mod, &mod) == 0) {
                double e0 = logits_error(mod.logits, r.logits, &pb, V, 0), e12 = 0;
                for (int s = 1; s < P; s++) {
                    double e = logits_error(mod.logits, r.logits, &pb, V, s);
                    if (e > e12) e12 = e;
                }
                int reads = plan_reads_donor0_last(pj);
                check(e12 == 0 && (reads ? e0 > 1e-6 : e0 == 0), "%s %s: changed donor token: prompt 0 %.2g (reads: %d), "
                      "others %.2g", name, plan.name, e0, reads, e12);
            }
            free(mod.logits);
        }
        free(r.logits);
        plan_free(&plan);
    }
    // Circuits: keeping every unit is the clean model; keeping no edge unit is the Python reference's
    // all_edges_donor0 plan; keeping no head unit replaces every head output at every prompt position.
    {
        int L = m.cfg.n_layers, H = m.cfg.n_heads;
        const char *types[7] = {"bos", "x", "t", "y", "n", "query", "last"};
        json_t *all_edges = json_array(), *all_heads = json_array();
        for (int l = 0; l < L; l++)
            for (int h = 0; h < H; h++)
                for (int a = 0; a < 7; a++) {
                    json_array_append_new(all_heads, json_pack("[i,i,s]", l, h, types[a]));
                    for (int b = 0; b < 7; b++) json_array_append_new(all_edges, json_pack("[i,i,s,s]", l, h, types[a], types[b]));
                }
        ablation_plan base, keep_all, keep_none;
        plan_empty(&m.cfg, &base);
        json_t *c_all = json_pack("{s:o,s:o}", "edges", all_edges, "heads", all_heads);
        json_t *c_none = json_pack("{s:[]}", "edges");
        run_result ra = {0}, rn = {0};
        if (plan_circuit(c_all, "circuit", &m.cfg, &base, &keep_all, &err) == 0 && run(&m, &keep_all, &pb, &ra) == 0)
            check(logits_error(ra.logits, clean.logits, &pb, V, -1) == 0, "%s: a circuit of every unit is not clean", name);
        else
            check(0, "circuit: %s", err.msg);
        if (plan_circuit(c_none, "circuit", &m.cfg, &base, &keep_none, &err) == 0 && run(&m, &keep_none, &pb, &rn) == 0) {
            double worst = 0;
            size_t k;
            json_t *pj2;
            json_array_foreach(plans, k, pj2) if (!strcmp(json_string_value(json_object_get(pj2, "name")), "all_edges_donor0"))
                vs_reference(&f, k, &rn, V, &worst);
            printf("  %-12s circuit of every unit = clean; circuit of no edge = reference all_edges_donor0 (%.2e)\n", name, worst);
            check(worst <= TOL, "%s: empty edge circuit vs all_edges_donor0: %.2e", name, worst);
        }
        free(ra.logits), free(rn.logits);
        plan_free(&keep_all), plan_free(&keep_none), plan_free(&base);
        json_decref(c_all), json_decref(c_none);
    }
    // Edges that no receiver reads: into bos from later senders (causality forbids them) -> clean.
    json_t *nothing = json_loads("{\"rules\": [{\"sender\": [\"y\", \"last\"], \"receiver\": [\"bos\", \"target\"]}]}", 0, NULL);
    ablation_plan np;
    run_result nr = {0};
    if (plan_parse(nothing, "unread", &m.cfg, &np, &err) == 0 && run(&m, &np, &pb, &nr) == 0)
        check(logits_error(nr.logits, clean.logits, &pb, V, -1) == 0, "%s: unread edges changed the logits", name);
    free(nr.logits);
    plan_free(&np);
    json_decref(nothing);

    for (int k = 0; k < 2; k++)
        if (others[k]) model_backend_free(&devs[k]);
    free(want), free(clean.logits), free(donors_mod), free(donors_clean);
    plan_free(&empty);
    free_fixture(&f);
    model_free(&m);
}

// Interventions (kernels/edge_rule.h) against the Python reference's interv_plans.json on this model: the
// last position's logits and the greedy generation of every prompt, on every backend. Can fail: the same
// plans with k-only and v-only swapped (plans with neither: zero rules read as kv from donor 0) must not
// match the reference. A circuit keeping no edge, ablating with "zero", is the reference's zero_everything.
static double vs_reference_last(const safetensors *iv, size_t j, const fixture *f, const run_result *r, int V, int *same) {
    ep_error err;
    double worst = 0;
    *same = 0;
    for (int s = 0; s < P; s++) {
        char key[96];
        snprintf(key, sizeof key, "plan%zu.prompt%d.last_logits", j, s);
        const st_tensor *t = safetensors_find(iv, key);
        if (!t || t->numel != V) {
            check(0, "interv fixture: no %s of %d floats", key, V);
            return INFINITY;
        }
        float *w = malloc(sizeof(float) * (size_t)V);
        safetensors_read_f32(t, w, &err);
        double e = max_rel_error(r->logits + ((size_t)s * f->max_len + f->lengths[s] - 1) * V, w, (size_t)V, 1e-6);
        if (e > worst) worst = e;
        free(w);
        snprintf(key, sizeof key, "plan%zu.prompt%d.generated", j, s);
        const st_tensor *gt = safetensors_find(iv, key);
        int32_t g[GEN];
        safetensors_read_i32(gt, g, &err);
        for (int k = 0; k < GEN; k++) *same += k < r->n_generated[s] && r->generated[s * GEN + k] == g[k];
    }
    return worst;
}

static void test_interventions(const char *name, json_t *plans) {
    model m;
    fixture f;
    safetensors iv;
    ep_error err = {{0}};
    if (open_case(name, "interv", &m, &f, &iv)) return;
    int V = m.cfg.vocab_size;
    prompt_batch pb = batch_of(&f);
    const kernel_ops *backends[3] = {kernel_ops_cpu(), kernel_ops_offset(), kernel_ops_cuda()};
    model devs[3];
    for (int k = 1; k < 3; k++)
        if (backends[k] && model_to_backend(&m, backends[k], 0, &devs[k], &err)) check(0, "%s", err.msg), backends[k] = NULL;
    size_t j;
    json_t *pj;
    json_array_foreach(plans, j, pj) {
        ablation_plan plan;
        if (plan_parse(pj, "interv_plans.json", &m.cfg, &plan, &err)) {
            check(0, "%s", err.msg);
            continue;
        }
        run_result on_cpu = {0};
        for (int k = 0; k < 3; k++) {
            run_result r = {0};
            if (!backends[k] || run_on(k ? &devs[k] : &m, backends[k], &plan, &pb, &r)) {
                free(r.logits);
                continue;
            }
            if (k == 1 && on_cpu.logits)  // offset: the cpu kernels behind device-style memory, bit for bit
                check(!memcmp(r.logits, on_cpu.logits, sizeof(float) * (size_t)P * f.max_len * V) &&
                          !memcmp(r.generated, on_cpu.generated, sizeof r.generated),
                      "%s %s: the offset backend differs from cpu", name, plan.name);
            int same;
            double worst = vs_reference_last(&iv, j, &f, &r, V, &same);
            printf("  %-12s %-22s %-6s last logits %.2e  generated %2d/%d equal to the Python reference\n", name,
                   plan.name, backends[k]->name, worst, same, P * GEN);
            check(worst <= TOL && same == P * GEN, "%s %s (%s): last logits %.2e, %d/%d tokens", name, plan.name,
                  backends[k]->name, worst, same, P * GEN);
            if (k == 0)
                on_cpu = r;
            else
                free(r.logits);
        }
        free(on_cpu.logits);
        // Can fail: k-only <-> v-only swapped, or (no k- or v-only rule) zero read as kv from donor 0.
        ablation_plan wrong = plan;
        wrong.layer_rules = malloc(sizeof(edge_rule_set) * (size_t)m.cfg.n_layers);
        memcpy(wrong.layer_rules, plan.layer_rules, sizeof(edge_rule_set) * (size_t)m.cfg.n_layers);
        int any_kv_only = 0;
        for (int l = 0; l < m.cfg.n_layers; l++)
            for (int r = 0; r < plan.layer_rules[l].n; r++) any_kv_only |= plan.layer_rules[l].rule[r].source == EDGE_SRC_K ||
                                                                         plan.layer_rules[l].rule[r].source == EDGE_SRC_V;
        for (int l = 0; l < m.cfg.n_layers; l++)
            for (int r = 0; r < wrong.layer_rules[l].n; r++) {
                edge_rule *e = &wrong.layer_rules[l].rule[r];
                if (any_kv_only && (e->source == EDGE_SRC_K || e->source == EDGE_SRC_V))
                    e->source = (int16_t)(EDGE_SRC_K + EDGE_SRC_V - e->source);
                else if (!any_kv_only && e->source == EDGE_SRC_ZERO)
                    e->source = EDGE_SRC_KV, e->donor = 0;
            }
        if (wrong.n_donors < 1) wrong.n_donors = 1;
        run_result w = {0};
        if (run(&m, &wrong, &pb, &w) == 0) {
            int same;
            double worst = vs_reference_last(&iv, j, &f, &w, V, &same);
            printf("  %-12s %-22s wrong (%s) last logits %.2e: rejected\n", name, plan.name,
                   any_kv_only ? "k <-> v" : "zero as kv", worst);
            check(worst > 100 * TOL, "%s %s: the wrong variant (%s) matched the reference (%.2e)", name, plan.name,
                  any_kv_only ? "k <-> v" : "zero as kv", worst);
        }
        free(w.logits);
        free(wrong.layer_rules);
        // A circuit keeping no edge unit, ablating with zero, = the reference's zero_everything.
        if (!strcmp(plan.name, "zero_everything")) {
            ablation_plan base, none;
            plan_empty(&m.cfg, &base);
            base.circuit_source = EDGE_SRC_ZERO;
            json_t *c_none = json_pack("{s:[]}", "edges");
            run_result rn = {0};
            if (plan_circuit(c_none, "circuit", &m.cfg, &base, &none, &err) == 0 && run(&m, &none, &pb, &rn) == 0) {
                int same;
                double worst = vs_reference_last(&iv, j, &f, &rn, V, &same);
                printf("  %-12s circuit of no edge, edge_intervention zero = reference zero_everything (%.2e)\n", name, worst);
                check(worst <= TOL && same == P * GEN, "%s: empty edge circuit (zero) vs zero_everything: %.2e", name, worst);
                plan_free(&none);
            } else {
                check(0, "circuit (zero): %s", err.msg);
            }
            free(rn.logits);
            json_decref(c_none);
            plan_free(&base);
        }
        plan_free(&plan);
    }
    for (int k = 1; k < 3; k++)
        if (backends[k]) model_backend_free(&devs[k]);
    safetensors_close(&iv);
    free_fixture(&f);
    model_free(&m);
}

// Prompt s of the fixture alone, as a batch of one.
static prompt_batch one_of(const fixture *f, int s) {
    size_t L = (size_t)f->max_len;
    return (prompt_batch){.n_seqs = 1, .max_len = f->max_len, .n_donors = f->K, .tokens = f->tokens + s * L,
                          .lengths = f->lengths + s, .types = f->types + s * L, .index = f->index + s * L,
                          .donors = f->donors + (size_t)s * f->K * L};
}

static int tables_identical(const mean_table *a, const mean_table *b) {
    size_t kv = (size_t)a->n_keys * a->n_layers * a->kv_dim, z = (size_t)a->n_keys * a->n_layers * a->z_dim;
    return a->n_keys == b->n_keys && !memcmp(a->keys, b->keys, sizeof(mean_key) * (size_t)a->n_keys) &&
           !memcmp(a->k, b->k, sizeof(float) * kv) && !memcmp(a->v, b->v, sizeof(float) * kv) &&
           !memcmp(a->z, b->z, sizeof(float) * z);
}

// The mean donor (donor kind "mean") against the Python reference of tools/make_patch_fixtures.py --mean:
// the table (groups, counts, layer 0's means) and patched runs with donor 0 the mean donor (donor 1, a
// token donor, nested over it); the table is the same bytes whether the prompts are added one by one or
// together; a table with examples 0 and 1 swapped is caught; a batch naming the mean donor without a
// table is refused.
static void test_mean(const char *name, json_t *plans) {
    model m;
    fixture f;
    safetensors ref;
    ep_error err = {{0}};
    if (open_case(name, "mean", &m, &f, &ref)) return;
    const model_config *c = &m.cfg;
    int V = c->vocab_size, kd = c->n_kv_heads * c->head_dim, zd = c->n_heads * c->head_dim, L = c->n_layers;
    prompt_batch pb = batch_of(&f);
    mean_sums all, one;
    mean_sums_init(&all, L, kd, zd), mean_sums_init(&one, L, kd, zd);
    kv_cache clean;
    check(patch_clean_pass(&m, kernel_ops_cpu(), &pb, &clean, &err) == 0 && mean_sums_add(&all, &clean, &pb, &err) == 0,
          "%s: mean sums: %s", name, err.msg);
    kv_cache_free(&clean);
    for (int s = 0; s < P; s++) {
        prompt_batch b1 = one_of(&f, s);
        check(patch_clean_pass(&m, kernel_ops_cpu(), &b1, &clean, &err) == 0 && mean_sums_add(&one, &clean, &b1, &err) == 0,
              "%s: mean sums, prompt %d: %s", name, s, err.msg);
        kv_cache_free(&clean);
    }
    mean_table table, table1;
    mean_table_from_sums(&all, &table), mean_table_from_sums(&one, &table1);
    // One by one or together: the same groups and counts, means within float rounding (the forward's rows
    // are not bitwise independent of the rows batched with them; the mean stage fixes its batches,
    // MEAN_BATCH, so its bytes do not depend on the config's batch_size: tests/test_stages.c).
    double worst_batch = 0;
    int same_groups = table.n_keys == table1.n_keys && !memcmp(table.keys, table1.keys, sizeof(mean_key) * (size_t)table.n_keys);
    for (int i = 0; same_groups && i < table.n_keys * L; i++) {  // row-relative, as the logits
        double dk = max_rel_error(table1.k + (size_t)i * kd, table.k + (size_t)i * kd, (size_t)kd, 1e-6);
        double dv = max_rel_error(table1.v + (size_t)i * kd, table.v + (size_t)i * kd, (size_t)kd, 1e-6);
        double dz = max_rel_error(table1.z + (size_t)i * zd, table.z + (size_t)i * zd, (size_t)zd, 1e-6);
        worst_batch = fmax(worst_batch, fmax(dk, fmax(dv, dz)));
    }
    check(same_groups && worst_batch < 1e-5, "%s: the mean table from batches of 1 vs 3: %.2e", name, worst_batch);
    // The groups, their counts and layer 0's means against the reference.
    const st_tensor *tk = safetensors_find(&ref, "mean.keys"), *tc = safetensors_find(&ref, "mean.count");
    int n_ref = tk ? (int)tk->shape[0] : -1, keys_ok = n_ref == table.n_keys;
    int32_t *rk = malloc(sizeof(int32_t) * (size_t)(n_ref > 0 ? 3 * n_ref : 1)), *rc = malloc(sizeof(int32_t) * (size_t)(n_ref > 0 ? n_ref : 1));
    if (keys_ok) safetensors_read_i32(tk, rk, &err), safetensors_read_i32(tc, rc, &err);
    for (int i = 0; i < table.n_keys && keys_ok; i++) {
        int j = 0;
        while (j < all.n_keys && memcmp(&all.keys[j], &table.keys[i], sizeof(mean_key))) j++;
        keys_ok = rk[3 * i] == table.keys[i].type && rk[3 * i + 1] == table.keys[i].index &&
                  rk[3 * i + 2] == table.keys[i].offset && rc[i] == all.count[j];
    }
    check(keys_ok, "%s: mean groups (%d) differ from the reference's (%d)", name, table.n_keys, n_ref);
    double worst_table = 0;
    const char *parts[3] = {"k", "v", "z"};
    for (int w = 0; w < 3 && keys_ok; w++) {
        char key[64];
        snprintf(key, sizeof key, "mean.layer0.%s", parts[w]);
        const st_tensor *t = safetensors_find(&ref, key);
        int dim = w == 2 ? zd : kd;
        float *r = malloc(sizeof(float) * (size_t)table.n_keys * dim);
        safetensors_read_f32(t, r, &err);
        const float *mine = w == 0 ? table.k : w == 1 ? table.v : table.z;
        for (int i = 0; i < table.n_keys; i++) {
            double e = max_rel_error(mine + (size_t)i * L * dim, r + (size_t)i * dim, (size_t)dim, 1e-6);
            if (e > worst_table) worst_table = e;
        }
        free(r);
    }
    printf("  %-12s mean table: %d groups, layer 0 k/v/z within %.2e of the reference; batches of 1 vs 3: %s, means within %.1e\n",
           name, table.n_keys, worst_table, tables_identical(&table, &table1) ? "identical bytes" : "same groups", worst_batch);
    check(keys_ok && worst_table <= TOL, "%s: mean table vs reference %.2e", name, worst_table);
    free(rk), free(rc);
    // A wrong table: blind to the example index (every group takes the average of the groups of its type
    // and offset over all examples).
    mean_table blind = table;
    size_t row = (size_t)L * kd, zrow = (size_t)L * zd;
    blind.k = calloc(row * table.n_keys, sizeof(float)), blind.v = calloc(row * table.n_keys, sizeof(float));
    blind.z = calloc(zrow * table.n_keys, sizeof(float));
    int n_merged = 0;
    for (int i = 0; i < table.n_keys; i++) {
        int n = 0;
        for (int j = 0; j < table.n_keys; j++)
            if (table.keys[i].type == table.keys[j].type && table.keys[i].offset == table.keys[j].offset) {
                for (size_t e = 0; e < row; e++) blind.k[i * row + e] += table.k[j * row + e], blind.v[i * row + e] += table.v[j * row + e];
                for (size_t e = 0; e < zrow; e++) blind.z[i * zrow + e] += table.z[j * zrow + e];
                n++;
            }
        for (size_t e = 0; e < row; e++) blind.k[i * row + e] /= (float)n, blind.v[i * row + e] /= (float)n;
        for (size_t e = 0; e < zrow; e++) blind.z[i * zrow + e] /= (float)n;
        n_merged += n > 1;
    }
    const kernel_ops *backends[2] = {kernel_ops_cpu(), kernel_ops_offset()};
    model dev;
    int have_offset = model_to_backend(&m, backends[1], 0, &dev, &err) == 0;
    size_t j;
    json_t *pj;
    json_array_foreach(plans, j, pj) {
        ablation_plan plan;
        if (plan_parse(pj, "mean_plans.json", c, &plan, &err)) {
            check(0, "%s", err.msg);
            continue;
        }
        pb.mean = &table, pb.mean_donors = 1u;
        run_result on_cpu = {0};
        for (int k = 0; k < 2; k++) {
            run_result r = {0};
            if ((k == 1 && !have_offset) || run_on(k ? &dev : &m, backends[k], &plan, &pb, &r)) {
                free(r.logits);
                continue;
            }
            if (k == 1 && on_cpu.logits)
                check(!memcmp(r.logits, on_cpu.logits, sizeof(float) * (size_t)P * f.max_len * V) &&
                          !memcmp(r.generated, on_cpu.generated, sizeof r.generated),
                      "%s %s: the offset backend differs from cpu", name, plan.name);
            int same;
            double worst = vs_reference_last(&ref, j, &f, &r, V, &same);
            printf("  %-12s %-18s %-6s last logits %.2e  generated %2d/%d equal to the Python reference\n", name,
                   plan.name, backends[k]->name, worst, same, P * GEN);
            check(worst <= TOL && same == P * GEN, "%s %s (%s): last logits %.2e, %d/%d tokens", name, plan.name,
                  backends[k]->name, worst, same, P * GEN);
            if (k == 0) on_cpu = r;
            else free(r.logits);
        }
        free(on_cpu.logits);
        // Can fail: the index-blind table.
        pb.mean = &blind;
        run_result w = {0};
        if (run(&m, &plan, &pb, &w) == 0) {
            int same;
            double worst = vs_reference_last(&ref, j, &f, &w, V, &same);
            printf("  %-12s %-18s index-blind table (%d groups merged): last logits %.2e, %d/%d tokens: rejected\n", name,
                   plan.name, n_merged, worst, same, P * GEN);
            check(worst > 100 * TOL, "%s %s: the index-blind mean table matched the reference (%.2e)", name, plan.name, worst);
        }
        free(w.logits);
        // Refused: a mean donor without the table.
        pb.mean = NULL;
        patch_outputs out = {0};
        ep_error merr = {{0}};
        check(patch_run(&m, kernel_ops_cpu(), &plan, &pb, &out, &merr) != 0 && strstr(merr.msg, "mean"),
              "%s %s: a mean donor without a table was not refused", name, plan.name);
        pb.mean_donors = 0;
        plan_free(&plan);
    }
    if (have_offset) model_backend_free(&dev);
    free(blind.k), free(blind.v), free(blind.z);
    mean_table_free(&table), mean_table_free(&table1);
    mean_sums_free(&all), mean_sums_free(&one);
    safetensors_close(&ref);
    free_fixture(&f);
    model_free(&m);
}

// The plan JSON of interventions: defaults, validation, the donor-0 part, the hash.
static void test_plan_interventions(void) {
    model_config cfg = {.n_layers = 2, .n_heads = 4};
    ep_error err = {{0}};
    ablation_plan a, b;
    json_t *kv = json_loads("{\"rules\": [{\"sender\": [\"y\"], \"receiver\": [\"last\"]}]}", 0, NULL);
    json_t *kv2 = json_loads("{\"rules\": [{\"sender\": [\"y\"], \"receiver\": [\"last\"], \"intervention\": \"kv\"}]}", 0, NULL);
    json_t *k = json_loads("{\"rules\": [{\"sender\": [\"y\"], \"receiver\": [\"last\"], \"intervention\": \"k\"}]}", 0, NULL);
    check(plan_parse(kv, "p", &cfg, &a, &err) == 0 && plan_parse(kv2, "p", &cfg, &b, &err) == 0 && plan_hash(&a) == plan_hash(&b) &&
              a.layer_rules[0].rule[0].source == EDGE_SRC_KV, "intervention kv is the default: %s", err.msg);
    uint64_t h_kv = plan_hash(&a);
    plan_free(&a), plan_free(&b);
    check(plan_parse(k, "p", &cfg, &a, &err) == 0 && plan_hash(&a) != h_kv && a.layer_rules[1].rule[0].source == EDGE_SRC_K &&
              a.n_donors == 1, "intervention k: %s", err.msg);
    plan_free(&a);
    a.circuit_source = 0;
    plan_empty(&cfg, &a);
    uint64_t h0 = plan_hash(&a);
    a.circuit_source = EDGE_SRC_ZERO;
    check(plan_hash(&a) != h0, "the circuit intervention is in the plan hash");
    plan_free(&a);
    struct {
        const char *json, *want;
    } bad[] = {{"{\"rules\": [{\"sender\": \"all\", \"receiver\": \"all\", \"intervention\": \"q\"}]}", "rules[0].intervention"},
               {"{\"rules\": [{\"sender\": \"all\", \"receiver\": \"all\", \"intervention\": \"zero\", \"donor\": 0}]}", "rules[0].donor"},
               {"{\"rules\": [{\"sender\": \"all\", \"receiver\": \"all\", \"intervention\": 3}]}", "rules[0].intervention"}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        json_t *j = json_loads(bad[i].json, 0, NULL);
        check(plan_parse(j, "plan.json", &cfg, &a, &err) != 0 && strstr(err.msg, bad[i].want) && strstr(err.msg, "plan.json"),
              "bad intervention %zu refused naming %s: %s", i, bad[i].want, err.msg);
        json_decref(j);
    }
    // A zero rule reads no donor: n_donors 0, not in the donor-0 part; a k rule of donor 0 is.
    json_t *mix = json_loads("{\"rules\": [{\"sender\": [\"x\"], \"receiver\": [\"y\"], \"intervention\": \"zero\"},"
                             " {\"sender\": [\"y\"], \"receiver\": [\"last\"], \"intervention\": \"k\"}]}", 0, NULL);
    json_t *zero = json_loads("{\"rules\": [{\"sender\": [\"x\"], \"receiver\": [\"y\"], \"intervention\": \"zero\"}]}", 0, NULL);
    check(plan_parse(zero, "p", &cfg, &a, &err) == 0 && a.n_donors == 0 && a.layer_rules[0].rule[0].donor == -1,
          "a zero plan reads no donor: %s", err.msg);
    plan_free(&a);
    if (plan_parse(mix, "p", &cfg, &a, &err) == 0) {
        plan_donor0_part(&a, &b);
        check(b.layer_rules[0].n == 1 && b.layer_rules[0].rule[0].source == EDGE_SRC_K, "donor-0 part: the k rule, not the zero rule");
        plan_free(&b), plan_free(&a);
    } else {
        check(0, "%s", err.msg);
    }
    json_decref(kv), json_decref(kv2), json_decref(k), json_decref(mix), json_decref(zero);
}

// The original's affect_whom forms compile to the same rules as the equivalent plan.
static void test_affect_whom(void) {
    model_config cfg = {.n_layers = 3, .n_heads = 4};
    ep_error err = {{0}};
    ablation_plan a, b;
    json_t *list = json_loads("[[\"y\", \"last\"], [\"x_i\", \"y_i\"]]", 0, NULL);
    json_t *plan = json_loads("{\"rules\": [{\"sender\": [\"y\"], \"receiver\": [\"last\"]}, {\"sender\": [\"x\"], "
                              "\"receiver\": [\"y\"]}]}", 0, NULL);
    check(plan_from_affect_whom(list, "config", &cfg, &a, &err) == 0 && plan_parse(plan, "plan", &cfg, &b, &err) == 0,
          "affect_whom list: %s", err.msg);
    check(a.n_donors == 1 && !memcmp(a.layer_rules, b.layer_rules, sizeof(edge_rule_set) * 3), "affect_whom list = plan");
    plan_free(&a), plan_free(&b);
    json_t *dict = json_loads("{\"curcuit\": {\"('y', 'last')\": 0}, \"ablate\": {\"x,y\": 1}}", 0, NULL);
    check(plan_from_affect_whom(dict, "config", &cfg, &a, &err) == 0 && a.n_donors == 2 && a.layer_rules[2].n == 2 &&
              a.layer_rules[2].rule[0].donor == 1 && a.layer_rules[2].rule[1].donor == 0,
          "affect_whom ablate/curcuit dict: %s", err.msg);
    plan_free(&a);
    json_t *bad = json_loads("[[\"y\", \"lastt\"]]", 0, NULL);
    check(plan_from_affect_whom(bad, "config.json: affect_whom", &cfg, &a, &err) != 0 && strstr(err.msg, "lastt"),
          "bad type named: %s", err.msg);
    json_decref(list), json_decref(plan), json_decref(dict), json_decref(bad);
}

int main(void) {
    json_t *plans = json_load_file("tests/fixtures/patch/plans.json", 0, NULL);
    check(plans && json_array_size(plans) >= 8, "tests/fixtures/patch/plans.json");
    test_affect_whom();
    test_plan_interventions();
    const char *models[] = {"gemma2-tiny", "llama3-tiny", "smollm-tiny", "phi2-tiny"};
    for (int i = 0; i < 4 && plans; i++) test_model(models[i], plans);
    json_t *iv_plans = json_load_file("tests/fixtures/patch/interv_plans.json", 0, NULL);
    check(iv_plans && json_array_size(iv_plans) >= 6, "tests/fixtures/patch/interv_plans.json");
    for (int i = 0; i < 4 && iv_plans; i++) test_interventions(models[i], iv_plans);
    json_decref(iv_plans);
    json_t *mean_plans = json_load_file("tests/fixtures/patch/mean_plans.json", 0, NULL);
    check(mean_plans && json_array_size(mean_plans) >= 4, "tests/fixtures/patch/mean_plans.json");
    for (int i = 0; i < 4 && mean_plans; i++) test_mean(models[i], mean_plans);
    json_decref(mean_plans);
    json_decref(plans);
    return test_finish("test_patch");
}
