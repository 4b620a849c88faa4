// EAP-IG (pipeline/backward.h grad_ig_sums; docs/attribution.md "EAP-IG") on the tiny fixtures of
// tests/fixtures/grad (two prompts, their donors and a plan with ablated edges and a substituted head),
// cpu backend:
//  1. ig_steps = 1 is attribution: the sums equal grad_head_scores' / grad_edge_scores' signed per-prompt
//     sums bit for bit (the identity of the right Riemann sum, whose last point is the clean pass).
//  2. Against a finite-difference integral computed here, without the backward: at each path point
//     a = k / m the test builds the interpolated embeddings itself (in double, from the model's table),
//     runs the patched forward from them, and takes central differences of each prompt's loss (its own
//     cross-entropy from the logits) as the unit's activation moves along the clean pass's difference:
//     a head unit's z at its positions by eps (z_clean - z_donor) (a head-unit substitution from a donor
//     slot holding the moved z), an edge unit's edges reading k*_path + eps (k_donor - k*_clean) and the
//     same for v (a donor slot and a rule put first in the layer). The mean over the points must match.
//  3. Can-fail siblings: the path from clean to clean (donor tokens = the clean ones) must not match the
//     integral, nor ig_steps = 1; an edge unit the plan already ablates scores exactly 0.
//  4. On "offset" (device-style memory) the sums are the cpu's byte for byte.
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline/backward.h"
#include "stages/patch.h"
#include "tests/harness.h"

#define NP 2
#define STEPS 4
#define EPS 1e-2
#define TOL 1e-2  // of the largest |integral|: fp32 forwards under central differences at EPS

typedef struct {
    safetensors st;
    int max_len, T;
    int32_t lengths[NP], n_target[NP];
    int32_t *tokens, *types, *index, *donors;  // [NP][max_len]
    int *packed, *packed_donor;                // [T]
    ablation_plan plan;
    kv_cache donors_kv[16];
} fixture;

static int32_t *read_i32(const fixture *f, const char *name, int64_t *numel) {
    const st_tensor *t = safetensors_find(&f->st, name);
    if (!t) return NULL;
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
        f->lengths[i] = (int32_t)t->numel, f->T += (int)t->numel;
        if (t->numel > f->max_len) f->max_len = (int)t->numel;
        snprintf(key, sizeof key, "prompt%d.n_target", i);
        int32_t *nt = read_i32(f, key, NULL);
        f->n_target[i] = nt[0];
        free(nt);
    }
    size_t L = (size_t)f->max_len;
    f->tokens = calloc(NP * L, sizeof(int32_t)), f->types = calloc(NP * L, sizeof(int32_t));
    f->index = calloc(NP * L, sizeof(int32_t)), f->donors = calloc(NP * L, sizeof(int32_t));
    f->packed = calloc((size_t)f->T, sizeof(int)), f->packed_donor = calloc((size_t)f->T, sizeof(int));
    const char *what[4] = {"tokens", "types", "index", "donors"};
    int32_t *dst[4] = {f->tokens, f->types, f->index, f->donors};
    for (int i = 0, r = 0; i < NP; i++) {
        for (int w = 0; w < 4; w++) {
            snprintf(key, sizeof key, "prompt%d.%s", i, what[w]);
            int32_t *v = read_i32(f, key, NULL);
            memcpy(dst[w] + (size_t)i * L, v, sizeof(int32_t) * (size_t)f->lengths[i]);
            free(v);
        }
        for (int k = 0; k < f->lengths[i]; k++, r++)
            f->packed[r] = f->tokens[(size_t)i * L + k], f->packed_donor[r] = f->donors[(size_t)i * L + k];
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
    free(f->tokens), free(f->types), free(f->index), free(f->donors), free(f->packed), free(f->packed_donor);
    safetensors_close(&f->st);
}

static forward_patch patch_of(fixture *f) {
    return (forward_patch){.layer_rules = f->plan.layer_rules, .head_units = f->plan.head_units,
                           .n_head_units = f->plan.n_head_units, .n_donors = 1, .donors = {&f->donors_kv[0]},
                           .types = f->types, .index = f->index, .type_stride = f->max_len, .n_typed = f->lengths};
}

// The patched forward from x (host [T][hidden]; NULL: the tokens), cache kept (with z); with seq_loss,
// each prompt's loss computed here: the mean cross-entropy of its targets, each from the row before it.
static int run_forward(const model *m, fixture *f, const forward_patch *p, const float *x, kv_cache *cache,
                       double *seq_loss) {
    ep_error err = {{0}};
    const kernel_ops *ops = kernel_ops_cpu();
    int V = m->cfg.vocab_size, R = 0, rows[256];
    for (int s = 0, r0 = 0; s < NP; r0 += f->lengths[s], s++)
        for (int i = 0; i < f->n_target[s]; i++) rows[R++] = r0 + f->lengths[s] - f->n_target[s] - 1 + i;
    float *logits = malloc(sizeof(float) * (size_t)R * V);
    if (kv_cache_init(cache, &m->cfg, NP, f->max_len, 1, &err)) return -1;
    forward_batch b = {.n_seqs = NP, .n_new = f->lengths, .tokens = f->packed, .n_logit_rows = R, .logit_rows = rows,
                       .logits = logits, .x_in = x};
    int rc = model_forward(m, ops, cache, &b, p, &err);
    check(rc == 0, "forward: %s", err.msg);
    for (int s = 0, k = 0; rc == 0 && seq_loss && s < NP; s++) {
        seq_loss[s] = 0;
        for (int i = 0; i < f->n_target[s]; i++, k++) {
            const float *y = logits + (size_t)k * V;
            double mx = y[0], sum = 0;
            for (int v = 1; v < V; v++) mx = y[v] > mx ? y[v] : mx;
            for (int v = 0; v < V; v++) sum += exp(y[v] - mx);
            seq_loss[s] += (log(sum) + mx - y[f->packed[rows[k] + 1]]) / f->n_target[s];
        }
    }
    free(logits);
    return rc;
}

// Which source the unit's edges read under the plan: 0 none (no edge), 1 all the current pass, 2 all
// donor 0, 3 mixed.
static int edge_unit_reads(const model *m, const fixture *f, const edge_unit *u) {
    int cur = 0, don = 0, w = model_config_layer_window(&m->cfg, u->layer);
    for (int s = 0; s < NP; s++) {
        const int32_t *ty = f->types + (size_t)s * f->max_len, *ix = f->index + (size_t)s * f->max_len;
        for (int B = 0; B < f->lengths[s]; B++)
            for (int A = 0; A <= B; A++) {
                if (ty[A] != u->sender || ty[B] != u->receiver || (w > 0 && B - A >= w)) continue;
                int d = f->plan.layer_rules ? edge_lookup(&f->plan.layer_rules[u->layer], u->head, ty[A], ix[A], ty[B], ix[B]) : -1;
                if (d < 0) cur++;
                else don++;
            }
    }
    return cur + don == 0 ? 0 : don == 0 ? 1 : cur == 0 ? 2 : 3;
}

static int substituted(const fixture *f, const head_unit *u) {
    for (int i = 0; i < f->plan.n_head_units; i++)
        if (f->plan.head_units[i].layer == u->layer && f->plan.head_units[i].head == u->head &&
            f->plan.head_units[i].type == u->type)
            return 1;
    return 0;
}

// A copy of donor 0's cache (K, V, z), for the moved activations.
static void copy_donor(const model *m, const kv_cache *src, kv_cache *dst) {
    ep_error err;
    kv_cache_init(dst, &m->cfg, src->n_seqs, src->capacity, 1, &err);
    size_t kv = (size_t)src->n_layers * src->n_seqs * src->capacity * src->kv_dim;
    size_t z = (size_t)src->n_layers * src->n_seqs * src->capacity * src->z_dim;
    memcpy(dst->k, src->k, sizeof(float) * kv), memcpy(dst->v, src->v, sizeof(float) * kv);
    memcpy(dst->z, src->z, sizeof(float) * z);
    memcpy(dst->len, src->len, sizeof(int) * (size_t)src->n_seqs);
}

// d/d eps of each prompt's loss at path point x with head unit u's z (or edge unit e's keys and values)
// moved by eps times the clean pass's difference; out [NP].
static void derivative(const model *m, fixture *f, const float *x, const kv_cache *path, const kv_cache *clean,
                       const head_unit *u, const edge_unit *e, double *out) {
    const model_config *c = &m->cfg;
    const kv_cache *d0 = &f->donors_kv[0];
    int hd = c->head_dim, rep = c->n_heads / c->n_kv_heads;
    double lp[NP], lm[NP];
    edge_rule_set *rules = NULL;
    head_unit *hus = NULL;
    forward_patch p = patch_of(f);
    if (e) {
        rules = calloc((size_t)c->n_layers, sizeof *rules);
        if (f->plan.layer_rules) memcpy(rules, f->plan.layer_rules, sizeof *rules * (size_t)c->n_layers);
        edge_rule_set *ls = &rules[e->layer];
        memmove(&ls->rule[1], &ls->rule[0], sizeof(edge_rule) * (size_t)ls->n);
        ls->n++;
        ls->rule[0] = (edge_rule){.sender_types = 1u << e->sender, .receiver_types = 1u << e->receiver,
                                  .relation = REL_ANY, .donor = 1};
        ls->rule[0].heads[e->head >> 6] = 1ull << (e->head & 63);
        p.layer_rules = rules;
    } else {
        hus = calloc((size_t)f->plan.n_head_units + 1, sizeof *hus);
        memcpy(hus, f->plan.head_units, sizeof *hus * (size_t)f->plan.n_head_units);
        hus[f->plan.n_head_units] = (head_unit){u->layer, u->head, u->type, 1};
        p.head_units = hus, p.n_head_units = f->plan.n_head_units + 1;
    }
    for (int sign = -1; sign <= 1; sign += 2) {
        kv_cache d1, run;
        copy_donor(m, d0, &d1);
        double t = sign * EPS;
        for (int s = 0; s < NP; s++) {
            const int32_t *ty = f->types + (size_t)s * f->max_len;
            for (int A = 0; A < f->lengths[s]; A++) {
                if (u && ty[A] == u->type) {
                    float *z1 = kv_cache_z(&d1, u->layer, s, A) + (size_t)u->head * hd;
                    const float *zp = kv_cache_z(path, u->layer, s, A) + (size_t)u->head * hd,
                                *zc = kv_cache_z(clean, u->layer, s, A) + (size_t)u->head * hd,
                                *zd = kv_cache_z(d0, u->layer, s, A) + (size_t)u->head * hd;
                    for (int i = 0; i < hd; i++) z1[i] = (float)(zp[i] + t * ((double)zc[i] - zd[i]));
                }
                if (e && ty[A] == e->sender) {
                    size_t g = (size_t)(e->head / rep) * hd;
                    for (int kv = 0; kv < 2; kv++) {
                        float *(*at)(const kv_cache *, int, int, int) = kv ? kv_cache_v : kv_cache_k;
                        float *y = at(&d1, e->layer, s, A) + g;
                        const float *yp = at(path, e->layer, s, A) + g, *yc = at(clean, e->layer, s, A) + g,
                                    *yd = at(d0, e->layer, s, A) + g;
                        for (int i = 0; i < hd; i++) y[i] = (float)(yp[i] + t * ((double)yd[i] - yc[i]));
                    }
                }
            }
        }
        p.n_donors = 2, p.donors[1] = &d1;
        run_forward(m, f, &p, x, &run, sign < 0 ? lm : lp);
        kv_cache_free(&run), kv_cache_free(&d1);
    }
    for (int s = 0; s < NP; s++) out[s] = (lp[s] - lm[s]) / (2 * EPS);
    free(rules), free(hus);
}

// max |got - want| / max |want|, over n values.
static double rel_err(const double *got, const double *want, int n) {
    double peak = 1e-30, worst = 0;
    for (int i = 0; i < n; i++) peak = fmax(peak, fabs(want[i]));
    for (int i = 0; i < n; i++) worst = fmax(worst, fabs(got[i] - want[i]));
    return worst / peak;
}

static void test_model(const char *name) {
    model m;
    ep_error err = {{0}};
    if (load_fixture_model(name, &m)) return;
    const kernel_ops *ops = kernel_ops_cpu();
    const model_config *c = &m.cfg;
    fixture f;
    if (load_fixture(ops, &m, name, &f)) {
        free_fixture(&f);
        model_free(&m);
        return;
    }
    forward_patch patch = patch_of(&f);
    grad_batch gb = {.n_seqs = NP, .len = f.lengths, .n_target = f.n_target, .tokens = f.packed};

    // Units: the fixture's, head units the plan does not substitute, edge units whose edges all read the
    // current pass (for the differences) or all donor 0 (they must score 0).
    int64_t nh0 = 0, ne0 = 0;
    int32_t *hraw = read_i32(&f, "head_units", &nh0), *eraw = read_i32(&f, "edge_units", &ne0);
    nh0 /= 3, ne0 /= 4;
    head_unit hu[64];
    edge_unit eu[64];
    int nh = 0, ne = 0, n_ablated = 0;
    for (int i = 0; i < nh0 && nh < 64; i++) {
        head_unit u = {hraw[3 * i], hraw[3 * i + 1], hraw[3 * i + 2], 0};
        if (!substituted(&f, &u)) hu[nh++] = u;
    }
    for (int i = 0; i < ne0 && ne < 63; i++) {
        edge_unit u = {eraw[4 * i], eraw[4 * i + 1], eraw[4 * i + 2], eraw[4 * i + 3], 0, EDGE_SRC_KV};
        if (edge_unit_reads(&m, &f, &u) == 1) eu[ne++] = u;
    }
    free(hraw), free(eraw);
    check(nh > 0 && ne > 0, "%s: no usable units (%d head, %d edge)", name, nh, ne);
    // One edge unit the plan ablates whole (after the others): the first in (layer, head, sender, receiver) order.
    for (int l = 0; !n_ablated && f.plan.layer_rules && l < c->n_layers; l++)
        for (int h = 0; h < c->n_heads && !n_ablated; h++)
            for (int a = 0; a < 8 && !n_ablated; a++)
                for (int b = 0; b < 8 && !n_ablated; b++) {
                    edge_unit u = {l, h, a, b, 0, EDGE_SRC_KV};
                    if (edge_unit_reads(&m, &f, &u) == 2) eu[ne] = u, n_ablated = 1;
                }
    int ne_all = ne + n_ablated;

    // 1. ig_steps = 1 is attribution, bit for bit.
    double *h1 = calloc((size_t)nh * NP, sizeof(double)), *e1 = calloc((size_t)ne_all * NP, sizeof(double));
    double *hp = calloc((size_t)nh * NP, sizeof(double)), *ep = calloc((size_t)ne_all * NP, sizeof(double));
    double *hsc = calloc((size_t)nh, sizeof(double)), *esc = calloc((size_t)ne_all, sizeof(double));
    grad_ig_request r1 = {.steps = 1, .donor_tokens = f.packed_donor, .heads = hu, .n_heads = nh, .edges = eu,
                          .n_edges = ne_all, .head_sums = h1, .edge_sums = e1};
    int rc = grad_ig_sums(ops, &m, &gb, &patch, &r1, &err);
    check(rc == 0, "%s: eap-ig: %s", name, err.msg);
    grad_tape t;
    rc = rc ? rc : model_backward(ops, &m, &gb, &patch, &t, &err);
    if (rc == 0) {
        rc = grad_head_scores(&t, hu, nh, hsc, hp, &err) || grad_edge_scores(&t, eu, ne_all, esc, ep, &err);
        grad_tape_free(&t);
    }
    check(rc == 0 && !memcmp(h1, hp, sizeof(double) * (size_t)nh * NP) && !memcmp(e1, ep, sizeof(double) * (size_t)ne_all * NP),
          "%s: ig_steps 1 differs from attribution", name);
    printf("  %-12s ig_steps 1 = attribution bit for bit over %d head and %d edge units: %s\n", name, nh, ne_all,
           rc == 0 && !memcmp(h1, hp, sizeof(double) * (size_t)nh * NP) ? "yes" : "NO");

    // 2. EAP-IG with STEPS points against the integral by differences.
    double *hg = calloc((size_t)nh * NP, sizeof(double)), *eg = calloc((size_t)ne_all * NP, sizeof(double));
    grad_ig_request r = {.steps = STEPS, .donor_tokens = f.packed_donor, .heads = hu, .n_heads = nh, .edges = eu,
                         .n_edges = ne_all, .head_sums = hg, .edge_sums = eg};
    rc = grad_ig_sums(ops, &m, &gb, &patch, &r, &err);
    check(rc == 0, "%s: eap-ig: %s", name, err.msg);
    int D = c->hidden;
    double *hw = calloc((size_t)nh * NP, sizeof(double)), *ew = calloc((size_t)ne * NP, sizeof(double));
    float *x = malloc(sizeof(float) * (size_t)f.T * D);
    kv_cache clean;
    run_forward(&m, &f, &patch, NULL, &clean, NULL);
    for (int k = 1; k <= STEPS; k++) {
        double a = (double)k / STEPS, d[NP];
        for (int row = 0; row < f.T; row++)
            for (int i = 0; i < D; i++) {
                double ec = (double)m.embed[(size_t)f.packed[row] * D + i] * m.embed_scale,
                       ed = (double)m.embed[(size_t)f.packed_donor[row] * D + i] * m.embed_scale;
                x[(size_t)row * D + i] = (float)(ed + a * (ec - ed));
            }
        kv_cache path;
        run_forward(&m, &f, &patch, x, &path, NULL);
        for (int u = 0; u < nh; u++) {
            derivative(&m, &f, x, &path, &clean, &hu[u], NULL, d);
            for (int s = 0; s < NP; s++) hw[(size_t)u * NP + s] += d[s] / STEPS;
        }
        for (int u = 0; u < ne; u++) {
            derivative(&m, &f, x, &path, &clean, NULL, &eu[u], d);
            for (int s = 0; s < NP; s++) ew[(size_t)u * NP + s] += d[s] / STEPS;
        }
        kv_cache_free(&path);
    }
    kv_cache_free(&clean);
    double he = rel_err(hg, hw, nh * NP), ee = rel_err(eg, ew, ne * NP);
    // 3. Siblings: attribution (ig_steps 1) and the path from clean to clean.
    double *hcc = calloc((size_t)nh * NP, sizeof(double)), *ecc = calloc((size_t)ne_all * NP, sizeof(double));
    grad_ig_request rcc = r;
    rcc.donor_tokens = f.packed, rcc.head_sums = hcc, rcc.edge_sums = ecc;
    check(grad_ig_sums(ops, &m, &gb, &patch, &rcc, &err) == 0, "%s: clean-to-clean path: %s", name, err.msg);
    double he1 = rel_err(h1, hw, nh * NP), ee1 = rel_err(e1, ew, ne * NP);
    double hecc = rel_err(hcc, hw, nh * NP), eecc = rel_err(ecc, ew, ne * NP);
    double peak_h = 0, peak_e = 0;
    for (int i = 0; i < nh * NP; i++) peak_h = fmax(peak_h, fabs(hw[i]));
    for (int i = 0; i < ne * NP; i++) peak_e = fmax(peak_e, fabs(ew[i]));
    printf("  %-12s eap-ig (%d steps) vs the integral by differences: head units %.2e of %.3g, edge units %.2e of %.3g;"
           " siblings: ig_steps 1 %.2e / %.2e, clean-to-clean path %.2e / %.2e\n", name, STEPS, he, peak_h, ee, peak_e,
           he1, ee1, hecc, eecc);
    check(he <= TOL && ee <= TOL, "%s: eap-ig vs the integral: head %.3g, edge %.3g", name, he, ee);
    check(he1 > 5 * TOL && ee1 > 5 * TOL, "%s: attribution passed as the integral (%.3g, %.3g)", name, he1, ee1);
    check(hecc > 5 * TOL && eecc > 5 * TOL, "%s: the clean-to-clean path passed (%.3g, %.3g)", name, hecc, eecc);
    if (n_ablated) {
        check(eg[(size_t)ne * NP] == 0 && eg[(size_t)ne * NP + 1] == 0, "%s: an ablated edge unit scored %.3g, %.3g", name,
              eg[(size_t)ne * NP], eg[(size_t)ne * NP + 1]);
        printf("  %-12s edge unit (%d, %d, %d -> %d), ablated by the plan: eap-ig %.3g, %.3g\n", name, eu[ne].layer,
               eu[ne].head, eu[ne].sender, eu[ne].receiver, eg[(size_t)ne * NP], eg[(size_t)ne * NP + 1]);
    }
    check(n_ablated == 1, "%s: no edge unit ablated by the plan to check", name);

    // 4. The same sums on "offset" (the cpu kernels behind device-style memory: the embeddings, the
    // interpolation and the path's inputs stay in backend memory): byte for byte the cpu's.
    const kernel_ops *ob = kernel_ops_offset();
    model dev;
    fixture fo;
    if (model_to_backend(&m, ob, 0, &dev, &err) == 0) {
        if (load_fixture(ob, &dev, name, &fo) == 0) {
            forward_patch po = patch_of(&fo);
            double *ho = calloc((size_t)nh * NP, sizeof(double)), *eo = calloc((size_t)ne_all * NP, sizeof(double));
            grad_ig_request ro = r;
            ro.head_sums = ho, ro.edge_sums = eo;
            rc = grad_ig_sums(ob, &dev, &gb, &po, &ro, &err);
            int same = rc == 0 && !memcmp(ho, hg, sizeof(double) * (size_t)nh * NP) &&
                       !memcmp(eo, eg, sizeof(double) * (size_t)ne_all * NP);
            check(same, "%s: eap-ig on offset differs from cpu (%s)", name, rc ? err.msg : "values");
            printf("  %-12s eap-ig on offset = cpu byte for byte: %s\n", name, same ? "yes" : "NO");
            free(ho), free(eo);
        }
        free_fixture(&fo);
        model_backend_free(&dev);
    } else {
        check(0, "%s on offset: %s", name, err.msg);
    }
    free(h1), free(e1), free(hp), free(ep), free(hsc), free(esc), free(hg), free(eg), free(hw), free(ew), free(x);
    free(hcc), free(ecc);
    free_fixture(&f);
    model_free(&m);
}

int main(void) {
    test_model("gemma2-tiny");
    test_model("smollm-tiny");
    // Bad input: ig_steps 0 is refused.
    model m;
    ep_error err = {{0}};
    if (model_load("tests/fixtures/models/smollm-tiny", &m, &err) == 0) {
        int len = 3, nt = 1, toks[3] = {1, 2, 3};
        grad_batch b = {.n_seqs = 1, .len = &len, .n_target = &nt, .tokens = toks};
        grad_ig_request r = {.steps = 0, .donor_tokens = toks};
        check(grad_ig_sums(kernel_ops_cpu(), &m, &b, NULL, &r, &err) != 0 && strstr(err.msg, "ig_steps"),
              "ig_steps 0 refused: %s", err.msg);
        model_free(&m);
    }
    return test_finish("test_eapig");
}
