// The patch stage's metrics at `last` against the independent Python reference
// (tools/make_metrics_fixtures.py: torch's float64 log_softmax of HF's logits for the KL, and the attention
// probabilities of HF's eager attention, patched as tools/make_patch_fixtures.py patches it, for the
// attention statistics): for every plan of tests/fixtures/patch/plans.json on every tiny architecture, on
// the prompts of tests/fixtures/patch/<model>.safetensors,
//   - KL(full || plan) of the next-token distribution (metrics_kl_full_model, kernel_ops.kl_div_rows),
//   - per layer and query head the entropy of the attention row of `last` and its mass on each sender type
//     (the forward's attention statistics, kernel_ops.attention_row_stats, through patch_run),
// on cpu, on offset (which must give cpu's bytes) and on cuda when a GPU is usable. Can-fail siblings: the
// KL with its arguments swapped, the entropy in bits and the masses shifted by one type must each miss
// the reference.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "stages/metrics.h"
#include "stages/patch.h"
#include "tests/harness.h"

#define P 3
#define NT PATCH_ATTN_TYPES
#define KL_TOL 2e-5    // nats, absolute (the logits match HF to ~1e-5; the KL to ~1e-6)
#define ATTN_TOL 2e-5  // entropy (nats) and masses, absolute (seen: ~3e-6)

typedef struct {
    safetensors st;
    int max_len, K;
    int32_t lengths[P];
    int32_t *tokens, *types, *index, *donors;
} prompts;

static int32_t *read_i32(const safetensors *st, const char *name) {
    const st_tensor *t = safetensors_find(st, name);
    if (!t) return NULL;
    int32_t *v = malloc(sizeof(int32_t) * (size_t)(t->numel ? t->numel : 1));
    ep_error err;
    safetensors_read_i32(t, v, &err);
    return v;
}

static int load_prompts(const char *model, prompts *f) {
    memset(f, 0, sizeof *f);
    char path[512], name[64];
    snprintf(path, sizeof path, "tests/fixtures/patch/%s.safetensors", model);
    ep_error err = {{0}};
    if (safetensors_open_file(path, &f->st, &err)) return check(0, "%s", err.msg), -1;
    for (int i = 0; i < P; i++) {
        snprintf(name, sizeof name, "prompt%d.tokens", i);
        const st_tensor *t = safetensors_find(&f->st, name);
        snprintf(name, sizeof name, "prompt%d.donors", i);
        const st_tensor *d = safetensors_find(&f->st, name);
        if (!t || !d) return check(0, "%s: no prompt %d", path, i), -1;
        f->lengths[i] = (int32_t)t->numel;
        if (t->numel > f->max_len) f->max_len = (int)t->numel;
        f->K = (int)d->shape[0];
    }
    size_t L = (size_t)f->max_len;
    f->tokens = calloc(P * L, sizeof(int32_t)), f->types = calloc(P * L, sizeof(int32_t));
    f->index = calloc(P * L, sizeof(int32_t)), f->donors = calloc(P * (size_t)f->K * L, sizeof(int32_t));
    const char *what[3] = {"tokens", "types", "index"};
    int32_t *dst[3] = {f->tokens, f->types, f->index};
    for (int i = 0; i < P; i++) {
        for (int w = 0; w < 3; w++) {
            snprintf(name, sizeof name, "prompt%d.%s", i, what[w]);
            int32_t *v = read_i32(&f->st, name);
            memcpy(dst[w] + (size_t)i * L, v, sizeof(int32_t) * (size_t)f->lengths[i]);
            free(v);
        }
        snprintf(name, sizeof name, "prompt%d.donors", i);
        int32_t *v = read_i32(&f->st, name);
        for (int d = 0; d < f->K; d++)
            memcpy(f->donors + ((size_t)i * f->K + d) * L, v + (size_t)d * f->lengths[i], sizeof(int32_t) * (size_t)f->lengths[i]);
        free(v);
    }
    return 0;
}

static void free_prompts(prompts *f) {
    free(f->tokens), free(f->types), free(f->index), free(f->donors);
    safetensors_close(&f->st);
}

// One plan's figures on one backend: the logits at last and the attention statistics.
typedef struct {
    float *last, *entropy, *mass;
} figures;

static int run_plan(const model *m, const kernel_ops *ops, const ablation_plan *plan, const prompt_batch *pb,
                    figures *fg) {
    const model_config *c = &m->cfg;
    size_t lh = (size_t)c->n_layers * c->n_heads;
    fg->last = calloc((size_t)P * c->vocab_size, sizeof(float));
    fg->entropy = calloc(P * lh, sizeof(float));
    fg->mass = calloc(P * lh * NT, sizeof(float));
    patch_outputs out = {.last_logits = fg->last, .attn_entropy = fg->entropy, .attn_mass = fg->mass};
    ep_error err = {{0}};
    if (patch_run(m, ops, plan, pb, &out, &err)) return check(0, "patch_run %s (%s): %s", plan->name, ops->name, err.msg), -1;
    return 0;
}

static void figures_free(figures *fg) { free(fg->last), free(fg->entropy), free(fg->mass); }

// The reference tensor `key` (n floats) of the metrics fixture, or NULL.
static float *reference(const safetensors *st, const char *key, size_t n) {
    const st_tensor *t = safetensors_find(st, key);
    if (!t || (size_t)t->numel != n) return check(0, "metrics fixture: %s missing or of the wrong size", key), NULL;
    float *v = malloc(sizeof(float) * n);
    ep_error err;
    safetensors_read_f32(t, v, &err);
    return v;
}

static double max_abs(const float *a, const float *b, size_t n, double scale_a) {
    double e = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs(a[i] * scale_a - b[i]);
        if (!(d <= e)) e = isnan(d) ? INFINITY : d;
    }
    return e;
}

// Worst errors of one plan's figures against the reference, with the can-fail variants' errors.
typedef struct {
    double kl, ent, mass, kl_swapped, ent_bits, mass_shifted;
} errors;

static void vs_reference(const safetensors *ref, const char *model, size_t j, const model_config *c, const float *kl,
                         const float *kl_swapped, const figures *fg, errors *e) {
    size_t lh = (size_t)c->n_layers * c->n_heads;
    for (int i = 0; i < P; i++) {
        char key[128];
        snprintf(key, sizeof key, "%s.plan%zu.prompt%d.kl", model, j, i);
        float *wk = reference(ref, key, 1);
        snprintf(key, sizeof key, "%s.plan%zu.prompt%d.attn_entropy", model, j, i);
        float *we = reference(ref, key, lh);
        snprintf(key, sizeof key, "%s.plan%zu.prompt%d.attn_mass", model, j, i);
        float *wm = reference(ref, key, lh * NT);
        if (wk && we && wm) {
            e->kl = fmax(e->kl, fabs((double)kl[i] - wk[0]));
            e->kl_swapped = fmax(e->kl_swapped, fabs((double)kl_swapped[i] - wk[0]));
            e->ent = fmax(e->ent, max_abs(fg->entropy + i * lh, we, lh, 1.0));
            e->ent_bits = fmax(e->ent_bits, max_abs(fg->entropy + i * lh, we, lh, 1.0 / log(2.0)));
            const float *gm = fg->mass + i * lh * NT;
            e->mass = fmax(e->mass, max_abs(gm, wm, lh * NT, 1.0));
            for (size_t u = 0; u < lh; u++)
                for (int t = 0; t < NT; t++)
                    e->mass_shifted = fmax(e->mass_shifted, fabs((double)gm[u * NT + (t + 1) % NT] - wm[u * NT + t]));
        }
        free(wk), free(we), free(wm);
    }
}

static void test_model(const char *name, json_t *plans, const safetensors *ref) {
    model m;
    ep_error err = {{0}};
    if (load_fixture_model(name, &m)) return;
    prompts f;
    if (load_prompts(name, &f)) {
        model_free(&m);
        return;
    }
    const model_config *c = &m.cfg;
    int V = c->vocab_size;
    size_t lh = (size_t)c->n_layers * c->n_heads;
    prompt_batch pb = {.n_seqs = P, .max_len = f.max_len, .n_donors = f.K, .tokens = f.tokens, .lengths = f.lengths,
                       .types = f.types, .index = f.index, .donors = f.donors};
    const kernel_ops *backends[3] = {kernel_ops_cpu(), kernel_ops_offset(), kernel_ops_cuda()};
    model devs[3];
    devs[0] = m;
    for (int k = 1; k < 3; k++)
        if (backends[k] && model_to_backend(&m, backends[k], 0, &devs[k], &err)) check(0, "%s", err.msg), backends[k] = NULL;
    figures clean[3] = {{0}};
    ablation_plan empty;
    plan_empty(c, &empty);
    for (int k = 0; k < 3; k++)
        if (backends[k] && run_plan(&devs[k], backends[k], &empty, &pb, &clean[k])) backends[k] = NULL;
    errors worst = {0};
    size_t j;
    json_t *pj;
    json_array_foreach(plans, j, pj) {
        ablation_plan plan;
        if (plan_parse(pj, "plans.json", c, &plan, &err)) {
            check(0, "%s", err.msg);
            continue;
        }
        figures cpu = {0};
        for (int k = 0; k < 3; k++) {
            figures fg = {0};
            if (!backends[k] || run_plan(&devs[k], backends[k], &plan, &pb, &fg)) {
                figures_free(&fg);
                continue;
            }
            float kl[P], kl_swapped[P];
            metrics_kl_full_model(backends[k], clean[k].last, fg.last, P, V, kl);
            metrics_kl_full_model(backends[k], fg.last, clean[k].last, P, V, kl_swapped);
            errors e = {0};
            vs_reference(ref, name, j, c, kl, kl_swapped, &fg, &e);
            printf("  %-12s %-22s %-6s kl %.2e  entropy %.2e  mass %.2e   (swapped kl %.2e, bits %.2e, shifted %.2e)\n",
                   name, plan.name, backends[k]->name, e.kl, e.ent, e.mass, e.kl_swapped, e.ent_bits, e.mass_shifted);
            check(e.kl <= KL_TOL && e.ent <= ATTN_TOL && e.mass <= ATTN_TOL, "%s %s (%s): kl %.2e, entropy %.2e, mass %.2e",
                  name, plan.name, backends[k]->name, e.kl, e.ent, e.mass);
            if (k == 0) {
                worst.kl_swapped = fmax(worst.kl_swapped, e.kl_swapped);
                worst.ent_bits = fmax(worst.ent_bits, e.ent_bits);
                worst.mass_shifted = fmax(worst.mass_shifted, e.mass_shifted);
                cpu = fg;
                continue;
            }
            if (backends[k] == kernel_ops_offset() && cpu.last) {
                float kl_cpu[P];
                metrics_kl_full_model(kernel_ops_cpu(), clean[0].last, cpu.last, P, V, kl_cpu);
                check(!memcmp(fg.entropy, cpu.entropy, sizeof(float) * P * lh) &&
                          !memcmp(fg.mass, cpu.mass, sizeof(float) * P * lh * NT) && !memcmp(kl, kl_cpu, sizeof kl),
                      "%s %s: offset's metrics are not cpu's bytes", name, plan.name);
            }
            figures_free(&fg);
        }
        if (!strcmp(plan.name, "clean") && cpu.last) {
            float kl[P];
            metrics_kl_full_model(kernel_ops_cpu(), clean[0].last, cpu.last, P, V, kl);
            check(kl[0] == 0 && kl[1] == 0 && kl[2] == 0, "%s: KL of the full model from itself is not 0", name);
        }
        figures_free(&cpu);
        plan_free(&plan);
    }
    // The siblings: each wrong variant must miss the reference somewhere by far more than the tolerance.
    printf("  %-12s can-fail: swapped kl %.3g (tol %.0e), entropy in bits %.3g, masses shifted %.3g (tol %.0e)\n", name,
           worst.kl_swapped, KL_TOL, worst.ent_bits, worst.mass_shifted, ATTN_TOL);
    check(worst.kl_swapped > 10 * KL_TOL, "%s: KL(plan || full) passes as KL(full || plan): the KL check cannot fail", name);
    check(worst.ent_bits > 10 * ATTN_TOL, "%s: the entropy in bits passes: the entropy check cannot fail", name);
    check(worst.mass_shifted > 10 * ATTN_TOL, "%s: masses shifted by a type pass: the mass check cannot fail", name);
    for (int k = 0; k < 3; k++) figures_free(&clean[k]);
    for (int k = 1; k < 3; k++)
        if (backends[k]) model_backend_free(&devs[k]);
    plan_free(&empty);
    free_prompts(&f);
    model_free(&m);
}

int main(void) {
    json_t *plans = json_load_file("tests/fixtures/patch/plans.json", 0, NULL);
    check(plans && json_array_size(plans) >= 8, "tests/fixtures/patch/plans.json");
    safetensors ref;
    ep_error err = {{0}};
    if (plans && safetensors_open_file("tests/fixtures/metrics/metrics.safetensors", &ref, &err) == 0) {
        const char *models[] = {"gemma2-tiny", "llama3-tiny", "smollm-tiny", "phi2-tiny"};
        for (int i = 0; i < 4; i++) test_model(models[i], plans, &ref);
        safetensors_close(&ref);
    } else {
        check(0, "%s", err.msg);
    }
    json_decref(plans);
    return test_finish("test_metrics");
}
