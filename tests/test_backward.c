// Activation gradients of the attribution loss (pipeline/backward.h), on the cpu backend and on offset
// (the same kernels behind device-style memory: the tape, the caches and the model in backend memory,
// reached only through the table), against the independent Python reference (tools/make_grad_fixtures.py: HF transformers 4.44.2 + torch autograd, with per-edge k*/v*
// leaves for the edge scores): the loss, dL/dz at every layer, position and head, and head-unit and
// edge-unit scores, for the clean model and one patched plan (edges reading donor 0 and a substituted
// head), on all four tiny architectures. Then checks that need no reference: finite differences of the
// patched loss along donor keys, donor values and a substituted head output agree with the gradients,
// and siblings that prove the comparisons can fail (a wrong sign, a flipped fixture entry).
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline/backward.h"
#include "stages/patch.h"
#include "tests/harness.h"

#define NP 2
#define TOL_LOSS 1e-5
#define TOL_DZ 1e-4
#define TOL_SCORE 1e-4

typedef struct {
    safetensors st;
    int max_len, n_donors;
    int32_t lengths[NP], n_target[NP];
    int32_t *tokens, *types, *index, *donors;  // [NP][max_len] ([NP][1][max_len] for donors)
    int *packed;
    ablation_plan plan;
    kv_cache donors_kv[16];
} fixture;

static float *read_f32(const fixture *f, const char *name, int64_t *numel) {
    const st_tensor *t = safetensors_find(&f->st, name);
    if (!t) {
        check(0, "fixture has no %s", name);
        return NULL;
    }
    float *v = malloc(sizeof(float) * (size_t)t->numel);
    ep_error err;
    safetensors_read_f32(t, v, &err);
    if (numel) *numel = t->numel;
    return v;
}

static int32_t *read_i32(const fixture *f, const char *name, int64_t *numel) {
    const st_tensor *t = safetensors_find(&f->st, name);
    if (!t) {
        check(0, "fixture has no %s", name);
        return NULL;
    }
    int32_t *v = malloc(sizeof(int32_t) * (size_t)t->numel);
    ep_error err;
    safetensors_read_i32(t, v, &err);
    if (numel) *numel = t->numel;
    return v;
}

static int load_fixture(const kernel_ops *ops, const model *m, const char *name, fixture *f) {
    memset(f, 0, sizeof *f);
    char path[512], key[64];
    snprintf(path, sizeof path, "tests/fixtures/grad/%s.safetensors", name);
    ep_error err = {{0}};
    if (safetensors_open_file(path, &f->st, &err)) {
        check(0, "%s", err.msg);
        return -1;
    }
    for (int i = 0; i < NP; i++) {
        snprintf(key, sizeof key, "prompt%d.tokens", i);
        const st_tensor *t = safetensors_find(&f->st, key);
        f->lengths[i] = (int32_t)t->numel;
        if (t->numel > f->max_len) f->max_len = (int)t->numel;
        snprintf(key, sizeof key, "prompt%d.n_target", i);
        int32_t *nt = read_i32(f, key, NULL);
        f->n_target[i] = nt[0];
        free(nt);
    }
    size_t L = (size_t)f->max_len;
    f->n_donors = 1;
    f->tokens = calloc(NP * L, sizeof(int32_t)), f->types = calloc(NP * L, sizeof(int32_t));
    f->index = calloc(NP * L, sizeof(int32_t)), f->donors = calloc(NP * L, sizeof(int32_t));
    f->packed = calloc(NP * L, sizeof(int));
    const char *what[4] = {"tokens", "types", "index", "donors"};
    int32_t *dst[4] = {f->tokens, f->types, f->index, f->donors};
    for (int i = 0, r = 0; i < NP; i++) {
        for (int w = 0; w < 4; w++) {
            snprintf(key, sizeof key, "prompt%d.%s", i, what[w]);
            int32_t *v = read_i32(f, key, NULL);
            memcpy(dst[w] + (size_t)i * L, v, sizeof(int32_t) * (size_t)f->lengths[i]);  // donors: [1, T]
            free(v);
        }
        for (int k = 0; k < f->lengths[i]; k++) f->packed[r++] = f->tokens[(size_t)i * L + k];
    }
    json_t *meta = json_loads(f->st.metadata_json, 0, NULL);
    json_t *pj = meta ? json_loads(json_string_value(json_object_get(meta, "plan")), 0, NULL) : NULL;
    int rc = pj ? plan_parse(pj, path, &m->cfg, &f->plan, &err) : -1;
    check(rc == 0, "%s: plan: %s", path, err.msg);
    json_decref(pj), json_decref(meta);
    if (rc) return -1;
    prompt_batch pb = {.n_seqs = NP, .max_len = f->max_len, .n_donors = 1, .tokens = f->tokens, .lengths = f->lengths,
                       .types = f->types, .index = f->index, .donors = f->donors};
    if (patch_donor_passes(m, ops, &f->plan, &pb, f->donors_kv, &err)) {
        check(0, "%s donor passes: %s", name, err.msg);
        return -1;
    }
    return 0;
}

static void free_fixture(fixture *f) {
    for (int d = 0; d < 16; d++) kv_cache_free(&f->donors_kv[d]);
    plan_free(&f->plan);
    free(f->tokens), free(f->types), free(f->index), free(f->donors), free(f->packed);
    safetensors_close(&f->st);
}

static forward_patch patch_of(fixture *f, int with_plan) {
    forward_patch p = {.n_donors = 1, .donors = {&f->donors_kv[0]}, .types = f->types, .index = f->index,
                       .type_stride = f->max_len, .n_typed = f->lengths};
    if (with_plan)
        p.layer_rules = f->plan.layer_rules, p.head_units = f->plan.head_units, p.n_head_units = f->plan.n_head_units;
    return p;
}

static grad_batch batch_of(const fixture *f) {
    return (grad_batch){.n_seqs = NP, .len = f->lengths, .n_target = f->n_target, .tokens = f->packed};
}

// Worst over (layer, position) rows of max|got - want| / max(|want|_row, floor), floor = 1e-4 of the
// layer's largest |want|, so that rows whose gradient is (nearly) zero are judged at the layer's scale.
static double dz_error(const float *got_tape_layer_rows, const float *want, int T, int Q) {
    double peak = 0, worst = 0;
    for (size_t i = 0; i < (size_t)T * Q; i++) peak = fabs(want[i]) > peak ? fabs(want[i]) : peak;
    for (int r = 0; r < T; r++) {
        double e = max_rel_error(got_tape_layer_rows + (size_t)r * Q, want + (size_t)r * Q, (size_t)Q, 1e-4 * peak + 1e-30);
        worst = e > worst ? e : worst;
    }
    return worst;
}

// |got - want| / max(|want|, 1e-2 of the largest |want| of the list).
static double score_error(const double *got, const float *want, int n) {
    double peak = 1e-30, worst = 0;
    for (int i = 0; i < n; i++) peak = fabs(want[i]) > peak ? fabs(want[i]) : peak;
    for (int i = 0; i < n; i++) {
        double s = fabs(want[i]) > 1e-2 * peak ? fabs(want[i]) : 1e-2 * peak;
        double e = fabs(got[i] - want[i]) / s;
        worst = e > worst ? e : worst;
    }
    return worst;
}

// The fixtures are torch autograd of the original's loss, the mean over the batch's NP prompts; ours is
// their sum (pipeline/backward.h), whose loss, gradients and scores are exactly NP times those.
static float *read_sum_scaled(fixture *f, const char *key, int64_t *n) {
    int64_t count = 0;
    float *v = read_f32(f, key, &count);
    for (int64_t i = 0; v && i < count; i++) v[i] *= NP;
    if (n) *n = count;
    return v;
}

static void compare_case(const kernel_ops *ops, const model *m, fixture *f, const char *name, const char *cse) {
    const model_config *c = &m->cfg;
    forward_patch patch = patch_of(f, !strcmp(cse, "plan"));
    grad_batch b = batch_of(f);
    grad_tape t;
    ep_error err = {{0}};
    if (model_backward(ops, m, &b, &patch, &t, &err)) {
        check(0, "%s %s %s: %s", ops->name, name, cse, err.msg);
        return;
    }
    char key[96];
    snprintf(key, sizeof key, "%s.loss", cse);
    float *want_loss = read_sum_scaled(f, key, NULL);
    double loss_err = fabs(t.loss - want_loss[0]) / fabs(want_loss[0]);
    int L = c->n_layers, Q = c->n_heads * c->head_dim;
    double dz_worst = 0, dz_flipped = 0;
    for (int s = 0; s < NP; s++) {
        snprintf(key, sizeof key, "%s.prompt%d.dz", cse, s);
        float *want = read_sum_scaled(f, key, NULL);
        int T = f->lengths[s];
        float *got = malloc(sizeof(float) * (size_t)T * Q);
        for (int l = 0; l < L; l++) {
            for (int p = 0; p < T; p++) grad_tape_dz(&t, l, t.row[s] + p, got + (size_t)p * Q);
            const float *w = want + (size_t)l * T * Q;
            double e = dz_error(got, w, T, Q);
            dz_worst = e > dz_worst ? e : dz_worst;
            if (s == 0 && l == 0) {  // can-fail sibling: the largest entry's sign flipped in the reference
                float *wf = malloc(sizeof(float) * (size_t)T * Q);
                memcpy(wf, w, sizeof(float) * (size_t)T * Q);
                size_t big = 0;
                for (size_t i = 0; i < (size_t)T * Q; i++) big = fabsf(wf[i]) > fabsf(wf[big]) ? i : big;
                wf[big] = -wf[big];
                dz_flipped = dz_error(got, wf, T, Q);
                free(wf);
            }
        }
        free(got), free(want);
    }
    int64_t nh = 0, ne = 0;
    snprintf(key, sizeof key, "%s.head_scores", cse);
    float *want_h = read_sum_scaled(f, key, NULL);
    snprintf(key, sizeof key, "%s.edge_scores", cse);
    float *want_e = read_sum_scaled(f, key, NULL);
    int32_t *hu = read_i32(f, "head_units", &nh), *eu = read_i32(f, "edge_units", &ne);
    nh /= 3, ne /= 4;
    head_unit *hus = calloc((size_t)nh, sizeof(head_unit));
    edge_unit *eus = calloc((size_t)ne, sizeof(edge_unit));
    for (int i = 0; i < nh; i++) hus[i] = (head_unit){hu[3 * i], hu[3 * i + 1], hu[3 * i + 2], 0};
    for (int i = 0; i < ne; i++) eus[i] = (edge_unit){eu[4 * i], eu[4 * i + 1], eu[4 * i + 2], eu[4 * i + 3], 0, EDGE_SRC_KV};
    double *hs = calloc((size_t)nh, sizeof(double)), *es = calloc((size_t)ne, sizeof(double));
    double *hps = calloc((size_t)nh * NP, sizeof(double)), *eps = calloc((size_t)ne * NP, sizeof(double));
    int rc = grad_head_scores(&t, hus, (int)nh, hs, hps, &err);
    rc = rc ? rc : grad_edge_scores(&t, eus, (int)ne, es, eps, &err);
    check(rc == 0, "%s %s scores: %s", name, cse, err.msg);
    double he = score_error(hs, want_h, (int)nh), ee = score_error(es, want_e, (int)ne);
    // Per prompt, signed (before the absolute value): reference [prompt][unit], ours [unit][prompt].
    snprintf(key, sizeof key, "%s.head_signed", cse);
    float *wh = read_sum_scaled(f, key, NULL);
    snprintf(key, sizeof key, "%s.edge_signed", cse);
    float *we = read_sum_scaled(f, key, NULL);
    for (int s = 0; s < NP; s++) {
        double gh[64], ge[64];
        for (int u = 0; u < nh && u < 64; u++) gh[u] = hps[(size_t)u * NP + s];
        for (int u = 0; u < ne && u < 64; u++) ge[u] = eps[(size_t)u * NP + s];
        he = fmax(he, score_error(gh, wh + (size_t)s * nh, (int)nh));
        ee = fmax(ee, score_error(ge, we + (size_t)s * ne, (int)ne));
    }
    free(wh), free(we), free(hps), free(eps);
    if (!strcmp(cse, "plan")) {  // can-fail sibling: the clean reference's scores are not the plan's
        float *ch = read_sum_scaled(f, "clean.head_scores", NULL), *ce = read_sum_scaled(f, "clean.edge_scores", NULL);
        double d = fmin(score_error(hs, ch, (int)nh), score_error(es, ce, (int)ne));
        check(d > TOL_SCORE, "%s: the plan's scores match the clean reference's (%.3g)", name, d);
        free(ch), free(ce);
    }
    printf("  %-6s %-12s %-5s loss %.6f (rel err %.2e)  dL/dz max row-rel err %.2e  head scores %.2e  edge scores %.2e"
           "  (flipped-entry sibling: %.2g)\n", ops->name, name, cse, t.loss, loss_err, dz_worst, he, ee, dz_flipped);
    check(loss_err <= TOL_LOSS, "%s %s: loss %.9g vs %.9g", name, cse, t.loss, want_loss[0]);
    check(dz_worst <= TOL_DZ, "%s %s: dL/dz error %.3g", name, cse, dz_worst);
    check(dz_flipped > TOL_DZ, "%s %s: a flipped reference entry went unnoticed (%.3g)", name, cse, dz_flipped);
    check(he <= TOL_SCORE && ee <= TOL_SCORE, "%s %s: head scores %.3g, edge scores %.3g", name, cse, he, ee);
    // model_loss is the same loss.
    double l2;
    check(model_loss(ops, m, &b, &patch, &l2, NULL, &err) == 0 && l2 == t.loss, "%s %s: model_loss %.9g vs %.9g", name,
          cse, l2, t.loss);
    free(want_loss), free(want_h), free(want_e), free(hu), free(eu), free(hus), free(eus), free(hs), free(es);
    grad_tape_free(&t);
}

// Central difference of the patched loss along unit direction u of n floats at x (backend memory: modified
// through uploads and restored).
static double directional_fd(const kernel_ops *ops, const model *m, const grad_batch *b, const forward_patch *p,
                             float *x, const float *u, int n, double eps) {
    size_t bytes = sizeof(float) * (size_t)n;
    float *save = malloc(bytes), *moved = malloc(bytes);
    ops->download(save, x, bytes);
    double lp = 0, lm = 0;
    ep_error err;
    for (int i = 0; i < n; i++) moved[i] = save[i] + (float)(eps * u[i]);
    ops->upload(x, moved, bytes);
    model_loss(ops, m, b, p, &lp, NULL, &err);
    for (int i = 0; i < n; i++) moved[i] = save[i] - (float)(eps * u[i]);
    ops->upload(x, moved, bytes);
    model_loss(ops, m, b, p, &lm, NULL, &err);
    ops->upload(x, save, bytes);
    free(save), free(moved);
    return (lp - lm) / (2 * eps);
}

static double unit_norm(float *g, int n) {
    double s = 0;
    for (int i = 0; i < n; i++) s += (double)g[i] * g[i];
    s = sqrt(s);
    for (int i = 0; i < n; i++) g[i] = (float)(g[i] / s);
    return s;
}

// Finite differences on the patched pass, independent of Python: donor 0's keys and values at a sender
// read by ablated edges (every layer; grad_donor_kv), and donor 0's z at a substituted head unit position.
static void finite_differences(const kernel_ops *ops, const model *m, fixture *f, const char *name) {
    const model_config *c = &m->cfg;
    forward_patch patch = patch_of(f, 1);
    grad_batch b = batch_of(f);
    grad_tape t;
    ep_error err = {{0}};
    if (model_backward(ops, m, &b, &patch, &t, &err)) {
        check(0, "%s %s: %s", ops->name, name, err.msg);
        return;
    }
    int hd = c->head_dim, KV = c->n_kv_heads * hd, Q = c->n_heads * hd, fails_wrong_sign = 1;
    const kv_cache *d0 = &f->donors_kv[0];
    size_t n_dn = (size_t)d0->n_seqs * d0->capacity * KV;
    double worst = 0;
    float *gk = malloc(sizeof(float) * hd), *gv = malloc(sizeof(float) * hd), *all_k = malloc(sizeof(float) * n_dn),
          *all_v = malloc(sizeof(float) * n_dn);
    for (int l = 0; l < c->n_layers; l++) {
        if (grad_donor_kv(&t, l, 0, all_k, all_v, &err)) {
            check(0, "%s %s: %s", ops->name, name, err.msg);
            break;
        }
        // The sender position of prompt 0 and KV head with the largest donor-key gradient.
        int bestA = -1, bestG = 0;
        double bestN = 0;
        for (int A = 0; A < f->lengths[0] && A < d0->capacity; A++)
            for (int g = 0; g < c->n_kv_heads; g++) {
                const float *gr = all_k + (size_t)A * KV + (size_t)g * hd;
                double nn = 0;
                for (int i = 0; i < hd; i++) nn += (double)gr[i] * gr[i];
                if (nn > bestN) bestN = nn, bestA = A, bestG = g;
            }
        if (bestA < 0) continue;
        memcpy(gk, all_k + (size_t)bestA * KV + (size_t)bestG * hd, sizeof(float) * hd);
        memcpy(gv, all_v + (size_t)bestA * KV + (size_t)bestG * hd, sizeof(float) * hd);
        double nk = unit_norm(gk, hd), nv = unit_norm(gv, hd);
        float *dk = kv_cache_k(d0, l, 0, bestA) + (size_t)bestG * hd;
        float *dv = kv_cache_v(d0, l, 0, bestA) + (size_t)bestG * hd;
        double fk = directional_fd(ops, m, &b, &patch, dk, gk, hd, 1e-2),
               fv = directional_fd(ops, m, &b, &patch, dv, gv, hd, 1e-2);
        double ek_ = fabs(fk - nk) / nk, ev_ = fabs(fv - nv) / nv;
        printf("  %-6s %-12s finite differences, donor 0 at layer %d, sender %d, kv head %d: d/dk %.6e vs gradient "
               "%.6e (%.1e), d/dv %.6e vs %.6e (%.1e)\n", ops->name, name, l, bestA, bestG, fk, nk, ek_, fv, nv, ev_);
        worst = fmax(worst, fmax(ek_, ev_));
        // Wrong-sign sibling: the negated gradient must not pass.
        fails_wrong_sign &= fabs(fk + nk) / nk > 1e-2 && fabs(fv + nv) / nv > 1e-2;
    }
    // A substituted head: the plan's head units replace z by donor 0's, so d loss / d donor z = dL/dz there.
    float *row = malloc(sizeof(float) * (size_t)Q);
    for (int u = 0; u < f->plan.n_head_units; u++) {
        const head_unit *hu = &f->plan.head_units[u];
        for (int B = 0; B < f->lengths[0]; B++) {
            if (f->types[B] != hu->type) continue;
            float *g = malloc(sizeof(float) * hd);
            grad_tape_dz(&t, hu->layer, t.row[0] + B, row);
            memcpy(g, row + (size_t)hu->head * hd, sizeof(float) * hd);
            double n = unit_norm(g, hd);
            double fz = directional_fd(ops, m, &b, &patch, kv_cache_z(d0, hu->layer, 0, B) + (size_t)hu->head * hd, g,
                                       hd, 1e-2);
            double e = fabs(fz - n) / n;
            printf("  %-6s %-12s finite differences, donor z of head unit (layer %d, head %d) at position %d: %.6e vs "
                   "dL/dz %.6e (%.1e)\n", ops->name, name, hu->layer, hu->head, B, fz, n, e);
            worst = fmax(worst, e);
            fails_wrong_sign &= fabs(fz + n) / n > 1e-2;
            free(g);
        }
    }
    check(worst <= 1e-2, "%s %s: finite differences disagree with the gradients by %.3g", ops->name, name, worst);
    check(fails_wrong_sign, "%s %s: a negated gradient passed the finite-difference check", ops->name, name);
    free(gk), free(gv), free(all_k), free(all_v), free(row);
    grad_tape_free(&t);
}

int main(void) {
    const char *models[] = {"gemma2-tiny", "llama3-tiny", "smollm-tiny", "phi2-tiny"};
    const kernel_ops *backends[] = {kernel_ops_cpu(), kernel_ops_offset()};
    for (int k = 0; k < 2; k++)
        for (int i = 0; i < 4; i++) {
            const kernel_ops *ops = backends[k];
            char dir[256];
            snprintf(dir, sizeof dir, "tests/fixtures/models/%s", models[i]);
            model m, dev;
            ep_error err = {{0}};
            if (model_load(dir, &m, &err)) {
                check(0, "%s", err.msg);
                continue;
            }
            if (model_to_backend(&m, ops, 0, &dev, &err)) {
                check(0, "%s on %s: %s", dir, ops->name, err.msg);
                model_free(&m);
                continue;
            }
            fixture f;
            if (load_fixture(ops, &dev, models[i], &f) == 0) {
                compare_case(ops, &dev, &f, models[i], "clean");
                compare_case(ops, &dev, &f, models[i], "plan");
                if (i < 2) finite_differences(ops, &dev, &f, models[i]);
            }
            free_fixture(&f);
            model_backend_free(&dev);
            model_free(&m);
        }
    // Bad input is refused.
    {
        model m;
        ep_error err = {{0}};
        if (model_load("tests/fixtures/models/smollm-tiny", &m, &err) == 0) {
            int len = 3, nt = 3, toks[3] = {1, 2, 3};
            grad_batch b = {.n_seqs = 1, .len = &len, .n_target = &nt, .tokens = toks};
            grad_tape t;
            check(model_backward(kernel_ops_cpu(), &m, &b, NULL, &t, &err) != 0 && strstr(err.msg, "targets"), "no prompt refused: %s",
                  err.msg);
            nt = 1;
            check(model_backward(kernel_ops_cpu(), &m, &b, NULL, &t, &err) == 0, "clean pass without a patch: %s", err.msg);
            head_unit hu = {0, 0, 0, 0};
            double sc;
            check(grad_head_scores(&t, &hu, 1, &sc, NULL, &err) != 0, "scores without donors refused");
            grad_tape_free(&t);
            model_free(&m);
        }
    }
    return test_finish("test_backward");
}
