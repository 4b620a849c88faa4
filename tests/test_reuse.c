// Reuse (stages/patch.h, "Reuse"; docs/reuse.md): a patched pass derived from the clean pass, recomputing
// only the rows and layers its plan reaches, against the same plan's full pass (patch_prompt_pass, which
// tests/test_patch.c holds against HF transformers), on every architecture fixture, with prompts from the
// tokenize stage: plans whose first receiver is early (row 0: bos -> all; a y), late (the query) and at
// `last`, in early and late layers, edge rules and head units, a circuit-like plan (keep rules before
// "ablate the rest") and a plan reading a nested donor; last-position logits within 1e-6 of the largest
// |logit|, or twice the full pass's own distance from a double-precision pass (the ref backend) where that
// is larger (the shorter products round differently), and the same greedy generations. The reach is checked against positions found here by hand, and the derived
// pass on the offset backend (device-style memory) equals the cpu one bit for bit.
// Can-fail siblings: the same comparison with the first recomputed row planted one later (the pass then
// takes a row it must recompute from the clean pass) must fail; one earlier (a row recomputed that need
// not be) must still pass. Exact scores with row reuse (below, test_units): each unit's metrics against its
// own full pass, batched and one a pass, the changed rows by hand, and two planted errors that must show.
// Then the patch stage with ablations, derived (the default) against full passes
// (stage_inputs.full_passes): the same per-prompt metrics.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pipeline/h5store.h"
#include "stages/cache.h"
#include "stages/patch.h"
#include "stages/prompts.h"
#include "stages/score.h"
#include "stages/stage_inputs.h"
#include "stages/tokenize.h"
#include "tests/harness.h"

#define GEN 4
#define TOL 1e-6

static char dir[256];

static int open_run(const char *name, const char *model, const char *extra, run_config *cfg, stage_inputs *in) {
    char text[4096];
    snprintf(text, sizeof text,
             "{\"task\": \"person_sport\", \"model_name\": \"x_calc_accuracy\", \"model_path\": \"tests/fixtures/models/%s\","
             " \"output_path\": \"%s/%s\", \"n_prompts\": 6, \"batch_size\": 3, \"seed\": 5, \"n_shots\": 3,"
             " \"donors\": 2, \"max_new_tokens\": %d%s}",
             model, dir, name, GEN, extra);
    ep_error err = {{0}};
    if (run_config_parse(text, name, cfg, &err) || tokenize_stage(cfg, 0, NULL, &err) || stage_inputs_open(cfg, NULL, in, &err)) {
        check(0, "%s: %s", name, err.msg);
        return -1;
    }
    return 0;
}

typedef struct {
    const char *name, *json;
    int plant;  // 1: the first reached row's change reaches the last position's logits, so the planted
                // off-by-one must show (elsewhere it may not: a change in the last layer stays in its row)
} plan_case;

// Layers as JSON lists are filled in by the model's depth: "E" the first half, "A" the last layer only.
// "keep ..." plans get a keep rule (donor -1, which plan JSON cannot say; circuits make them) for
// y -> last before their rules in every layer.
static const plan_case cases[] = {
    {"bos->all early", "{\"name\": \"p\", \"rules\": [{\"sender\": [\"bos\"], \"receiver\": \"all\", \"layers\": E}]}", 0},
    {"x->y same early", "{\"name\": \"p\", \"rules\": [{\"sender\": [\"x\"], \"receiver\": [\"y\"], \"relation\": \"same\", \"layers\": E}]}", 1},
    {"y->y earlier late", "{\"name\": \"p\", \"rules\": [{\"sender\": [\"y\"], \"receiver\": [\"y\"], \"relation\": \"earlier\", \"layers\": A}]}", 0},
    {"x->query late", "{\"name\": \"p\", \"rules\": [{\"sender\": [\"x\"], \"receiver\": [\"query\"], \"layers\": A}]}", 0},
    {"y->last all layers", "{\"name\": \"p\", \"rules\": [{\"sender\": [\"y\"], \"receiver\": [\"last\"]}]}", 1},
    {"query->last late", "{\"name\": \"p\", \"rules\": [{\"sender\": [\"query\"], \"receiver\": [\"last\"], \"layers\": A}]}", 1},
    {"head units at last and y", "{\"name\": \"p\", \"heads\": [{\"layer\": 0, \"head\": 0, \"type\": \"last\", \"donor\": 0},"
                                 " {\"layer\": 0, \"head\": 1, \"type\": \"y\", \"donor\": 1}]}", 1},
    {"keep y->last, ablate the rest early", "{\"name\": \"p\", \"rules\": [{\"sender\": \"all\", \"receiver\": \"all\", \"layers\": E}]}", 0},
    {"nested donor 1 at last", "{\"name\": \"p\", \"rules\": [{\"sender\": [\"y\"], \"receiver\": [\"last\"], \"donor\": 1},"
                               " {\"sender\": [\"x\"], \"receiver\": [\"y\"], \"relation\": \"same\", \"donor\": 0, \"layers\": E}]}", 0},
    // interventions (kernels/edge_rule.h): a zero rule reads no donor but changes its edges
    {"zero x->y same early", "{\"name\": \"p\", \"rules\": [{\"sender\": [\"x\"], \"receiver\": [\"y\"], \"relation\": \"same\", \"layers\": E, \"intervention\": \"zero\"}]}", 1},
    {"k-only y->last, v-only x->query", "{\"name\": \"p\", \"rules\": [{\"sender\": [\"y\"], \"receiver\": [\"last\"], \"intervention\": \"k\"},"
                                        " {\"sender\": [\"x\"], \"receiver\": [\"query\"], \"layers\": A, \"intervention\": \"v\"}]}", 0},
};

static int parse_case(const plan_case *pc, const model_config *cfg, ablation_plan *plan) {
    char text[2048], early[256] = "[", last[32];
    for (int l = 0; l < (cfg->n_layers + 1) / 2; l++) {
        char one[16];
        snprintf(one, sizeof one, "%s%d", l ? ", " : "", l);
        strcat(early, one);
    }
    strcat(early, "]");
    snprintf(last, sizeof last, "[%d]", cfg->n_layers - 1);
    size_t o = 0;
    for (const char *p = pc->json; *p && o < sizeof text - 64; p++) {
        const char *put = *p == 'E' && p[-1] == ' ' ? early : *p == 'A' && p[-1] == ' ' ? last : NULL;
        if (put) o += (size_t)snprintf(text + o, sizeof text - o, "%s", put);
        else text[o++] = *p;
    }
    text[o] = 0;
    json_error_t je;
    json_t *j = json_loads(text, 0, &je);
    ep_error err = {{0}};
    int rc = j ? plan_parse(j, pc->name, cfg, plan, &err) : -1;
    json_decref(j);
    check(rc == 0, "%s: %s %s", pc->name, err.msg, j ? "" : je.text);
    if (rc == 0 && !strncmp(pc->name, "keep", 4))
        for (int l = 0; l < plan->n_layers; l++) {
            edge_rule_set *set = &plan->layer_rules[l];
            if (set->n == 0 || set->n >= EDGE_MAX_RULES) continue;
            memmove(&set->rule[1], &set->rule[0], sizeof(edge_rule) * (size_t)set->n);
            set->rule[0] = set->rule[1];
            set->rule[0].sender_types = 1u << TT_Y, set->rule[0].receiver_types = 1u << TT_LAST, set->rule[0].donor = -1;
            set->n++;
        }
    return rc;
}

// The first row the plan reaches in sequence s, found here from the matcher itself (not from
// patch_reach): the earliest receiver of an edge that reads a donor, or position of a head unit's type;
// *layer is lowered to the lowest layer with such an edge or head unit in this sequence.
static int first_row_by_hand(const prompt_batch *pb, int s, const ablation_plan *plan, int *layer) {
    int n = pb->lengths[s], best = n;
    const int32_t *ty = pb->types + (size_t)s * pb->max_len, *ix = pb->index + (size_t)s * pb->max_len;
    for (int l = 0; l < plan->n_layers; l++)
        for (int h = 0; h < plan->n_heads; h++)
            for (int b = 0; b < n; b++)
                for (int a = 0; a <= b; a++)
                    if (edge_lookup(&plan->layer_rules[l], h, ty[a], ix[a], ty[b], ix[b]) != EDGE_CLEAN) {  // read or removed
                        if (b < best) best = b;
                        if (l < *layer) *layer = l;
                        a = b = n;
                    }
    for (int u = 0; u < plan->n_head_units; u++)
        for (int p = 0; p < n; p++)
            if (ty[p] == plan->head_units[u].type) {
                if (p < best) best = p;
                if (plan->head_units[u].layer < *layer) *layer = plan->head_units[u].layer;
            }
    return best;
}

typedef struct {
    float *last;
    int *gen, *n_gen;
} result;

static void result_init(result *r, int S, int V) {
    r->last = calloc((size_t)S * V, sizeof(float));
    r->gen = calloc((size_t)S * GEN, sizeof(int));
    r->n_gen = calloc((size_t)S, sizeof(int));
}

static void result_free(result *r) { free(r->last), free(r->gen), free(r->n_gen); }

static int same_tokens(const result *a, const result *b, int S) {
    if (memcmp(a->n_gen, b->n_gen, sizeof(int) * S)) return 0;
    for (int s = 0; s < S; s++)
        if (memcmp(a->gen + s * GEN, b->gen + s * GEN, sizeof(int) * a->n_gen[s])) return 0;
    return 1;
}

static int run_full(const stage_inputs *in, const kernel_ops *ops, const model *m, const ablation_plan *plan,
                    const prompt_batch *pb, result *r, ep_error *err) {
    patch_outputs out = {.last_logits = r->last, .max_new = GEN, .generated = r->gen, .n_generated = r->n_gen,
                         .stop_ids = in->m.cfg.eos_ids, .n_stop_ids = in->m.cfg.n_eos};
    return patch_run(m, ops, plan, pb, &out, err);
}

// The derived pass; shift moves every sequence's first recomputed row (the planted off-by-one).
static int run_derived(const stage_inputs *in, const kernel_ops *ops, const model *m, const ablation_plan *plan,
                       const prompt_batch *pb, int shift, patch_reach *reach_out, result *r, ep_error *err) {
    kv_cache donors[16];
    memset(donors, 0, sizeof donors);
    patch_base base = {0};
    ablation_plan clean;
    plan_empty(&m->cfg, &clean);
    patch_reach reach;
    patch_reach_init(&reach, pb, m->cfg.n_layers);
    patch_reach_add_plan(&reach, plan, pb);
    for (int s = 0; s < pb->n_seqs; s++) {
        int row = reach.first_row[s] + shift;
        reach.first_row[s] = row < 0 ? 0 : row > pb->lengths[s] ? pb->lengths[s] : row;
    }
    int rc = patch_donor_passes(m, ops, plan, pb, donors, err);
    if (rc == 0) rc = patch_base_run(m, ops, &clean, pb, donors, GEN, &base, err);
    patch_outputs out = {.last_logits = r->last, .max_new = GEN, .generated = r->gen, .n_generated = r->n_gen,
                         .stop_ids = in->m.cfg.eos_ids, .n_stop_ids = in->m.cfg.n_eos};
    if (rc == 0) rc = patch_prompt_pass_from(m, ops, plan, pb, donors, &base, &reach, &out, err);
    if (reach_out) {
        *reach_out = reach;
        reach.first_row = NULL;
    }
    patch_reach_free(&reach);
    patch_base_free(&base);
    plan_free(&clean);
    for (int d = 0; d < 16; d++) kv_cache_free(&donors[d]);
    return rc;
}

// patch_prompt_passes_from over every plan three times over (more sequences than PATCH_DECODE_SEQS, so
// generation is decoded in several groups): each plan's logits = its own derived pass's bit for bit (the
// same pass), generations the same (decoded with other plans' sequences: other product shapes).
static void test_many(const stage_inputs *in, const model *m, const prompt_batch *pb, const ablation_plan *plans,
                      const result *single, int n) {
    int S = pb->n_seqs, V = m->cfg.vocab_size, N = 3 * n;
    check(N * S > PATCH_DECODE_SEQS, "many plans: %d sequences, more than one decode group", N * S);
    const ablation_plan **list = malloc(sizeof *list * (size_t)N);
    patch_outputs *outs = calloc((size_t)N, sizeof *outs);
    result *r = calloc((size_t)N, sizeof *r);
    for (int i = 0; i < N; i++) {
        list[i] = &plans[i % n];
        result_init(&r[i], S, V);
        outs[i] = (patch_outputs){.last_logits = r[i].last, .max_new = GEN, .generated = r[i].gen, .n_generated = r[i].n_gen,
                                  .stop_ids = in->m.cfg.eos_ids, .n_stop_ids = in->m.cfg.n_eos};
    }
    kv_cache donors[16];
    memset(donors, 0, sizeof donors);
    patch_base base = {0};
    ablation_plan clean, reads;  // the donors every plan reads: donor 1's pass under donor 0's part of none
    plan_empty(&m->cfg, &clean);
    plan_empty(&m->cfg, &reads);
    reads.n_donors = 2;
    ep_error err = {{0}};
    int rc = patch_donor_passes(m, kernel_ops_cpu(), &reads, pb, donors, &err);
    rc = rc ? rc : patch_base_run(m, kernel_ops_cpu(), &clean, pb, donors, 0, &base, &err);
    rc = rc ? rc : patch_prompt_passes_from(m, kernel_ops_cpu(), N, list, pb, donors, &base, outs, &err);
    check(rc == 0, "many plans: %s", err.msg);
    int logits_same = 1, tokens_same = 1;
    for (int i = 0; i < N && rc == 0; i++) {
        // donors here are read without any plan's donor-0 part: compare plans with no nested donor only
        if (plans[i % n].n_donors > 1 && plans[i % n].n_rules > 1) continue;
        logits_same &= !memcmp(r[i].last, single[i % n].last, sizeof(float) * (size_t)S * V);
        tokens_same &= same_tokens(&r[i], &single[i % n], S);
    }
    check(rc == 0 && logits_same && tokens_same, "many plans decoded together: logits bit for bit, generations the same");
    for (int i = 0; i < N; i++) result_free(&r[i]);
    free(list), free(outs), free(r);
    patch_base_free(&base);
    plan_free(&clean), plan_free(&reads);
    for (int d = 0; d < 16; d++) kv_cache_free(&donors[d]);
}

static void test_model(const char *model_name) {
    run_config cfg;
    stage_inputs in;
    if (open_run(model_name, model_name, "", &cfg, &in)) return;
    const model *m = &in.m;
    const kernel_ops *cpu = kernel_ops_cpu(), *off = kernel_ops_named("offset");
    model dev_off;
    ep_error err = {{0}};
    int have_off = off && model_to_backend(&in.m, off, 0, &dev_off, &err) == 0;
    check(have_off, "%s: the offset backend: %s", model_name, err.msg);
    int S = in.cfg->batch_size, V = m->cfg.vocab_size, L = m->cfg.n_layers;
    prompt_batch pb = stage_batch(&in, 0, S);
    enum { NC = sizeof cases / sizeof cases[0] };
    ablation_plan kept[NC];
    result single[NC];
    int n_kept = 0;
    double worst = 0, worst_noise = 0;
    int rows_saved = 0, rows_all = 0;
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        const plan_case *pc = &cases[k];
        ablation_plan plan;
        if (parse_case(pc, &m->cfg, &plan)) continue;
        result full, got, later, earlier, got_off, ref;
        result_init(&full, S, V), result_init(&got, S, V), result_init(&later, S, V), result_init(&earlier, S, V);
        result_init(&got_off, S, V), result_init(&ref, S, V);
        patch_reach reach = {0};
        int rc = run_full(&in, cpu, m, &plan, &pb, &full, &err);
        rc = rc ? rc : run_full(&in, kernel_ops_ref(), m, &plan, &pb, &ref, &err);
        rc = rc ? rc : run_derived(&in, cpu, m, &plan, &pb, 0, &reach, &got, &err);
        rc = rc ? rc : run_derived(&in, cpu, m, &plan, &pb, 1, NULL, &later, &err);
        rc = rc ? rc : run_derived(&in, cpu, m, &plan, &pb, -1, NULL, &earlier, &err);
        if (rc == 0 && have_off) rc = run_derived(&in, off, &dev_off, &plan, &pb, 0, NULL, &got_off, &err);
        check(rc == 0, "%s %s: %s", model_name, pc->name, err.msg);
        if (rc == 0) {
            // the reach: rows as found by hand, layers as the plan's lowest patched layer
            int rows_ok = 1, want_layer = L;
            for (int s = 0; s < S; s++) {
                rows_ok &= reach.first_row[s] == first_row_by_hand(&pb, s, &plan, &want_layer);
                rows_saved += reach.first_row[s], rows_all += pb.lengths[s];
            }
            check(rows_ok && reach.first_layer == want_layer, "%s %s: reach = first receiver rows by hand and layer %d (got %d)",
                  model_name, pc->name, want_layer, reach.first_layer);
            // relative to the logits' scale, at least 1 (a tiny random model's logits are far below a real one's)
            double e = max_rel_error(got.last, full.last, (size_t)S * V, 1), e_early = max_rel_error(earlier.last, full.last, (size_t)S * V, 1);
            double e_late = max_rel_error(later.last, full.last, (size_t)S * V, 1);
            if (e > worst) worst = e;
            // The full pass's own rounding: its distance from the ref backend (double sums). The derived pass's
            // products have other shapes, so it rounds differently: exact means no further from the full
            // pass than twice the full pass's distance from a double-precision pass (both passes are that
            // close to it), or within TOL.
            double noise = max_rel_error(full.last, ref.last, (size_t)S * V, 1), tol = 2 * noise > TOL ? 2 * noise : TOL;
            if (noise > worst_noise) worst_noise = noise;
            check(e <= tol && same_tokens(&got, &full, S), "%s %s: derived pass = full pass (logits %.2g relative; the full pass vs double sums %.2g; generation %s)",
                  model_name, pc->name, e, noise, same_tokens(&got, &full, S) ? "same" : "DIFFERS");
            check(e_early <= tol && same_tokens(&earlier, &full, S),
                  "%s %s: starting one row early is exact too (%.2g)", model_name, pc->name, e_early);
            // Planted off-by-one: the first row the plan reaches taken from the clean pass. Where every
            // sequence starts at a row past its length the plant is the same as the real thing.
            if (pc->plant)
                check(e_late > 10 * tol || !same_tokens(&later, &full, S),
                      "%s %s: can fail: the first recomputed row one too late is caught (%.2g)", model_name, pc->name, e_late);
            if (have_off)
                check(!memcmp(got_off.last, got.last, sizeof(float) * (size_t)S * V) && same_tokens(&got_off, &got, S),
                      "%s %s: offset backend = cpu bit for bit", model_name, pc->name);
        }
        patch_reach_free(&reach);
        if (rc == 0) {  // kept for the many-plans pass below
            kept[n_kept] = plan, single[n_kept++] = got;
            result_init(&got, S, V);
            memset(&plan, 0, sizeof plan);
        }
        result_free(&full), result_free(&got), result_free(&later), result_free(&earlier), result_free(&got_off);
        result_free(&ref);
        plan_free(&plan);
    }
    test_many(&in, m, &pb, kept, single, n_kept);
    for (int i = 0; i < n_kept; i++) plan_free(&kept[i]), result_free(&single[i]);
    printf("  %-12s %zu plans: derived passes = full passes within %.2g relative (full pass vs double sums: up to %.2g),"
           " same generations; %d of %d prompt rows before the first reached row\n",
           model_name, sizeof cases / sizeof cases[0], worst, worst_noise, rows_saved, rows_all);
    if (have_off) model_backend_free(&dev_off);
    stage_inputs_close(&in);
    run_config_free(&cfg);
}

// ---- Exact scores with row reuse (EXACT_ROW_PREFIX, stages/score.c): units of a circuit whose plan keeps
// some heads and edges and ablates the rest, so that the edges carry a change to some rows and not others.
// Each unit's metrics without it against its own full pass (the brute force, patch_run with the unit's
// plan), batched (every unit in one pass) and one unit a pass; the rows a unit changes (score_unit_rows)
// against the rows where its full pass's residual stream differs from the circuit's (two full passes of
// the same shapes: an unchanged row is the same bytes, so every differing row must be marked). Can-fail
// siblings: a unit reading the unit before it's keys and values, and each unit's first changed row taken
// from the circuit's pass, must differ from the brute force.
static void circuit_of(const stage_inputs *in, int with_edges, circuit *c) {
    const model_config *cfg = &in->m.cfg;
    circuit_full(cfg, c);
    for (int l = 0; l < cfg->n_layers; l++)  // ablate about half the head units: a sparse plan
        for (int h = 0; h < cfg->n_heads; h++)
            for (int t = 0; t < PLAN_CIRCUIT_TYPES; t++)
                if ((l * 7 + h * 3 + t) % 2) {
                    circuit_unit u = circuit_head_unit(l, h, t);
                    circuit_set(c, UNIT_HEAD, &u, 0);
                }
    if (!with_edges) return;
    circuit_start_edges(c, &in->prompts);
    circuit_unit *e;
    int n = circuit_units(c, UNIT_EDGE, &e);
    for (int i = 0; i < n; i += 3) circuit_set(c, UNIT_EDGE, &e[i], 0);  // and a third of the edges
    free(e);
}

// Units to score: receivers (or a head unit's type) early (x, y), late (query) and at `last`, in the first,
// a middle and the last layer.
static int pick_units(const circuit *c, unit_kind kind, int n_layers, circuit_unit *out, int max) {
    circuit_unit *all;
    int n_all = circuit_units(c, kind, &all), n = 0;
    const int types[4] = {TT_X, TT_Y, TT_QUERY, TT_LAST}, layers[3] = {0, n_layers / 2, n_layers - 1};
    for (int li = 0; li < 3; li++)
        for (int ti = 0; ti < 4 && n < max; ti++)
            for (int i = 0; i < n_all; i++) {
                const circuit_unit *u = &all[i];
                int t = kind == UNIT_HEAD ? u->type : u->receiver;
                if (u->layer == layers[li] && t == types[ti]) {
                    out[n++] = *u;
                    break;
                }
            }
    free(all);
    return n;
}

static double worst_metric_diff(const circuit_metrics *a, const circuit_metrics *b, int n) {
    double w = 0;
    for (int i = 0; i < n; i++) {
        double d = fabs(a[i].target_logprob - b[i].target_logprob) / (fabs(b[i].target_logprob) > 1 ? fabs(b[i].target_logprob) : 1);
        if (d > w) w = d;
    }
    return w;
}

// Every row where unit u's full pass differs from the circuit's leaving some layer is marked in the rows
// score_unit_rows gives; returns rows marked and rows that differ (counts over the batch).
static int rows_by_hand(const stage_inputs *in, const circuit *c, unit_kind kind, const circuit_unit *u, const prompt_batch *pb,
                        long *marked, long *differ, ep_error *err) {
    const model *m = &in->dev;  // the run's backend (the offset one keeps the weights in its memory only)
    const kernel_ops *ops = in->ops;
    int L = m->cfg.n_layers, D = m->cfg.hidden, S = pb->n_seqs;
    ablation_plan pc, pu;
    circuit cu;
    circuit_copy(c, &cu);
    circuit_set(&cu, kind, u, 0);
    int rc = circuit_plan(c, &m->cfg, &in->plan, &pc, err);
    rc = rc ? rc : circuit_plan(&cu, &m->cfg, &in->plan, &pu, err);
    circuit_free(&cu);
    if (rc) return rc;
    kv_cache donors[16];
    memset(donors, 0, sizeof donors);
    patch_base bc = {0}, bu = {0};
    rc = patch_donor_passes(m, ops, &pc, pb, donors, err);
    rc = rc ? rc : patch_base_run(m, ops, &pc, pb, donors, 0, &bc, err);
    rc = rc ? rc : patch_base_run(m, ops, &pu, pb, donors, 0, &bu, err);
    int ok = 1;
    if (rc == 0) {
        patch_carry carry;
        patch_carry_init(&carry, &pc, pb);
        patch_rows r;
        score_unit_rows(kind, u, pb, L, &carry, &r);
        *marked += patch_rows_count(&r);
        int T = bc.n_rows;
        for (int l = 0; l < L; l++)
            for (int s = 0, t = 0; s < S; t += pb->lengths[s], s++)
                for (int p = 0; p < pb->lengths[s]; p++) {
                    size_t at = ((size_t)(l + 1) * T + t + p) * D;
                    if (!memcmp(bc.resid + at, bu.resid + at, sizeof(float) * D)) continue;
                    (*differ)++;
                    ok &= r.rows[((size_t)l * S + s) * pb->max_len + p];
                }
        patch_rows_free(&r);
        patch_carry_free(&carry);
    }
    patch_base_free(&bc), patch_base_free(&bu);
    for (int d = 0; d < 16; d++) kv_cache_free(&donors[d]);
    plan_free(&pc), plan_free(&pu);
    return rc ? rc : ok ? 0 : 1;
}

// One kind's units of one run (intervention: what the circuit's ablated edges do, run config
// edge_intervention). plants: whether the planted errors must show (they move a unit's metric by about its
// own effect, which kv edge units of these tiny models have too little of for the one-row-short plant:
// it is reported only there).
static void test_units_of(const char *model_name, const char *intervention, unit_kind kind, int plants, const char *backend) {
    run_config cfg;
    stage_inputs in;
    char name[128], extra[128];
    snprintf(name, sizeof name, "units-%s-%s-%s-%s", model_name, unit_kind_name(kind), intervention, backend);
    snprintf(extra, sizeof extra, ", \"edge_intervention\": \"%s\", \"backend\": \"%s\"", intervention, backend);
    if (open_run(name, model_name, extra, &cfg, &in)) return;
    int L = in.m.cfg.n_layers, S = in.cfg->batch_size;
    prompt_batch pb = stage_batch(&in, 0, S);
    const char *what = unit_kind_name(kind);
    circuit c;
    circuit_of(&in, kind == UNIT_EDGE, &c);
    circuit_unit u[12];
    int n = pick_units(&c, kind, L, u, 12);
    check(n >= 6, "%s %s units: %d picked (receivers early, late, at last)", model_name, what, n);
    circuit_metrics *brute = calloc((size_t)n, sizeof *brute), *one = calloc((size_t)n, sizeof *one),
                    *all = calloc((size_t)n, sizeof *all), *pl1 = calloc((size_t)n, sizeof *pl1),
                    *pl2 = calloc((size_t)n, sizeof *pl2), with;
    double *score = calloc((size_t)n, sizeof(double)), effect = 0;
    exact_opts o_brute = {EXACT_BRUTE_FORCE, 0, 1}, o_one = {EXACT_ROW_PREFIX, S, 1}, o_all = {EXACT_ROW_PREFIX, 1000, 1};
    ep_error err = {{0}};
    int rc = score_exact(&in, &c, kind, u, n, &o_brute, score, brute, &with, &err);
    for (int i = 0; i < n; i++)
        if (fabs(score[i]) > effect) effect = fabs(score[i]);
    rc = rc ? rc : score_exact(&in, &c, kind, u, n, &o_one, score, one, NULL, &err);
    rc = rc ? rc : score_exact(&in, &c, kind, u, n, &o_all, score, all, NULL, &err);
    in.exact_plant = EXACT_PLANT_OTHER_UNIT;
    rc = rc ? rc : score_exact(&in, &c, kind, u, n, &o_all, score, pl1, NULL, &err);
    in.exact_plant = EXACT_PLANT_ROW_SHORT;
    rc = rc ? rc : score_exact(&in, &c, kind, u, n, &o_one, score, pl2, NULL, &err);
    in.exact_plant = EXACT_PLANT_NONE;
    check(rc == 0, "%s %s units: %s", model_name, what, err.msg);
    long marked = 0, differ = 0;
    int by_hand = 0;
    for (int i = 0; i < n && rc == 0 && by_hand == 0; i++) by_hand = rows_by_hand(&in, &c, kind, &u[i], &pb, &marked, &differ, &err);
    if (rc == 0) {
        double d1 = worst_metric_diff(one, brute, n), da = worst_metric_diff(all, brute, n);
        double p1 = worst_metric_diff(pl1, brute, n), p2 = worst_metric_diff(pl2, brute, n);
        int same_bytes = !memcmp(one, all, sizeof *one * (size_t)n);
        check(d1 <= TOL && da <= TOL, "%s %s units (%s): row reuse = each unit's full pass (one a pass %.2g, all %d in one %.2g relative)",
              model_name, what, intervention, d1, n, da);
        check(by_hand == 0, "%s %s units (%s): every row a unit's full pass changes is marked (%ld rows x layers differ, %ld marked) %s",
              model_name, what, intervention, differ, marked, by_hand < 0 ? err.msg : "");
        check(p1 > 10 * TOL, "%s %s units (%s): can fail: a unit reading another unit's rows is caught (%.2g)", model_name,
              what, intervention, p1);
        if (plants) {
            check(effect > 100 * TOL, "%s %s units (%s): the units matter (largest |score| %.2g)", model_name, what, intervention, effect);
            check(p2 > 10 * TOL, "%s %s units (%s): can fail: each unit's first changed row taken from the circuit is caught (%.2g)",
                  model_name, what, intervention, p2);
        }
        printf("  %-16s %-6s %2d %s units (%s, largest |score| %.2g): row reuse = full passes within %.2g (one a pass) / %.2g (batched;"
               " %s bytes); rows x layers: %ld differ, %ld marked; planted: other unit %.2g, row short %.2g\n",
               model_name, backend, n, what, intervention, effect, d1, da, same_bytes ? "same" : "other", differ, marked, p1, p2);
    }
    free(brute), free(one), free(all), free(pl1), free(pl2), free(score);
    circuit_free(&c);
    stage_inputs_close(&in);
    run_config_free(&cfg);
}

static void test_units(const char *model_name) {
    test_units_of(model_name, "kv", UNIT_HEAD, 1, "cpu");
    test_units_of(model_name, "kv", UNIT_EDGE, 0, "cpu");
    test_units_of(model_name, "zero", UNIT_EDGE, 1, "cpu");
    // device-style memory (kernels/ops_offset.c): the device code paths of the row passes
    if (!strcmp(model_name, "smollm-tiny")) test_units_of(model_name, "zero", UNIT_EDGE, 1, "offset");
}

// The patch stage's per-prompt metrics of every group, from patch.h5: target log-prob, generations, and the
// figures at `last` (KL from the full model, attention entropy and mass: extra[g][0..3) with their sizes).
static int read_stage(const char *out_dir, int n_groups, float **logprob, int32_t **gen, int *n, float *(*extra)[3],
                      size_t (*n_extra)[3], ep_error *err) {
    char path[600];
    snprintf(path, sizeof path, "%s/patch.h5", out_dir);
    h5store s;
    if (h5store_open(path, &s, err)) return -1;
    int rc = 0;
    for (int g = 0; g < n_groups && rc == 0; g++) {
        char name[64], gname[32];
        if (g < 2) snprintf(gname, sizeof gname, "%s", g ? "clean" : "plan");
        else snprintf(gname, sizeof gname, "ablation-%03d", g - 2);
        h5shape sh;
        snprintf(name, sizeof name, "%s/target_logprob", gname);
        rc = h5store_read_f32(&s, name, &sh, &logprob[g], err);
        n[g] = (int)sh.dims[0];
        snprintf(name, sizeof name, "%s/generated", gname);
        if (rc == 0) rc = h5store_read_i32(&s, name, &sh, &gen[g], err);
        const char *figures[3] = {"kl_full_model", "attn_entropy", "attn_mass"};
        for (int k = 0; k < 3 && rc == 0; k++) {
            snprintf(name, sizeof name, "%s/%s", gname, figures[k]);
            rc = h5store_read_f32(&s, name, &sh, &extra[g][k], err);
            n_extra[g][k] = 1;
            for (int d = 0; d < sh.rank; d++) n_extra[g][k] *= (size_t)sh.dims[d];
        }
    }
    h5store_close(&s);
    return rc;
}

static void test_stage(void) {
    const char *abl = ", \"ablations\": ["
                      "{\"name\": \"a\", \"rules\": [{\"sender\": [\"y\"], \"receiver\": [\"last\"], \"layers\": [1, 2]}]},"
                      "{\"name\": \"b\", \"rules\": [{\"sender\": [\"x\"], \"receiver\": [\"y\"], \"relation\": \"same\"}]},"
                      "{\"name\": \"c\", \"heads\": [{\"layer\": 2, \"head\": 1, \"type\": \"query\", \"donor\": 0}]}]";
    float *lp[2][5] = {{0}};
    int32_t *gen[2][5] = {{0}};
    float *extra[2][5][3] = {{{0}}};
    size_t n_extra[2][5][3] = {{{0}}};
    int n[2][5] = {{0}}, ok = 1;
    for (int full = 0; full < 2 && ok; full++) {
        run_config cfg;
        stage_inputs in;
        char name[32];
        snprintf(name, sizeof name, "stage-%s", full ? "full" : "derived");
        if (open_run(name, "smollm-tiny", abl, &cfg, &in)) return;
        in.full_passes = full;
        ep_error err = {{0}};
        ok = cache_stage(&in, 1, &err) == 0 && patch_stage(&in, 1, &err) == 0 &&
             read_stage(cfg.output_path, 2 + in.n_ablations, lp[full], gen[full], n[full], extra[full], n_extra[full], &err) == 0;
        check(ok, "patch stage (%s passes): %s", full ? "full" : "derived", err.msg);
        stage_inputs_close(&in);
        run_config_free(&cfg);
    }
    if (ok) {
        double worst = 0;
        int same = 1;
        for (int g = 0; g < 5; g++) {
            for (int i = 0; i < n[0][g]; i++) {
                double d = fabs(lp[0][g][i] - lp[1][g][i]) / (fabs(lp[1][g][i]) > 1 ? fabs(lp[1][g][i]) : 1);
                if (d > worst) worst = d;
            }
            same &= n[0][g] == n[1][g] && !memcmp(gen[0][g], gen[1][g], sizeof(int32_t) * (size_t)n[0][g] * GEN);
        }
        check(worst < 1e-5 && same, "patch stage: derived from the clean pass = full passes (target log-prob %.2g, generations %s)",
              worst, same ? "same" : "DIFFER");
        // KL, attention entropy and masses at `last`: the derived passes' (the base's below a plan's first
        // layer, the recomputed last row's above) against the full passes'
        double worst_fig[3] = {0};
        for (int g = 0; g < 5; g++)
            for (int k = 0; k < 3; k++) {
                int sized = n_extra[0][g][k] == n_extra[1][g][k] && n_extra[0][g][k] > 0;
                check(sized, "patch stage: group %d figure %d: %zu values derived, %zu full", g, k, n_extra[0][g][k],
                      n_extra[1][g][k]);
                for (size_t i = 0; sized && i < n_extra[0][g][k]; i++) {
                    double d = fabs((double)extra[0][g][k][i] - extra[1][g][k][i]);
                    if (d > worst_fig[k]) worst_fig[k] = d;
                }
            }
        check(worst_fig[0] < 1e-5 && worst_fig[1] < 1e-5 && worst_fig[2] < 1e-5,
              "patch stage: derived = full passes at last: KL %.2g, entropy %.2g, mass %.2g", worst_fig[0], worst_fig[1],
              worst_fig[2]);
        printf("  patch stage: at last, derived = full passes: KL within %.2g, entropy %.2g, mass %.2g\n", worst_fig[0],
               worst_fig[1], worst_fig[2]);
        printf("  patch stage: 3 ablations + clean, derived passes = full passes: log-prob within %.2g, same generations\n", worst);
    }
    for (int f = 0; f < 2; f++)
        for (int g = 0; g < 5; g++) {
            free(lp[f][g]), free(gen[f][g]);
            for (int k = 0; k < 3; k++) free(extra[f][g][k]);
        }
}

int main(void) {
    snprintf(dir, sizeof dir, "/tmp/ep_test_reuse_%d", (int)getpid());
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf %s && mkdir -p %s", dir, dir);
    if (system(cmd) != 0) return 1;
    const char *models[] = {"smollm-tiny", "llama3-tiny", "gemma2-tiny", "phi2-tiny", "gemma2-tiny-bf16"};
    for (size_t i = 0; i < sizeof models / sizeof models[0]; i++) test_model(models[i]);
    for (size_t i = 0; i < sizeof models / sizeof models[0]; i++) test_units(models[i]);
    test_stage();
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0) return 1;
    return test_finish("test_reuse");
}
