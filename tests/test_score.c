// Circuits and importance scores (stages/circuit.h, stages/score.h, stages/rank.h) on the tiny models, with prompts from the tokenize
// stage: a partial forward pass started at any layer from a stored residual stream gives the full
// pass's logits bit for bit; a circuit's plan built from masks equals the one plan_circuit builds from
// JSON; exact scores by prefix reuse equal the brute force (one full patch_run per unit, the passes
// tests/test_patch.c holds against the HF reference) bit for bit, and within 1e-5 when many units share
// a pass; attribution and exact scores are compared by rank (Spearman, top-k overlap: printed, since a
// tiny random model need not agree); the speed-up of prefix reuse + batching is measured; exact scores
// averaged over 3 donors equal a brute force over full passes written here from the definition; round
// files with units or counts out of range are refused by prune_round_load; units keep their on-disk rows
// (layer, head, type, -1) and (layer, head, sender, receiver); pruning fields beyond int are refused, not
// truncated.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "pipeline/h5store.h"
#include "stages/metrics.h"
#include "stages/prompts.h"
#include "stages/circuit_file.h"
#include "stages/prune.h"
#include "stages/rank.h"
#include "stages/score.h"
#include "stages/tokenize.h"
#include "tests/harness.h"

static char dir[256];

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int open_run(const char *name, const char *model, const char *extra, run_config *cfg, stage_inputs *in) {
    char text[2048];
    snprintf(text, sizeof text,
             "{\"task\": \"person_sport\", \"model_name\": \"%s\", \"model_path\": \"tests/fixtures/models/%s\","
             " \"output_path\": \"%s/%s\", \"n_prompts\": 6, \"batch_size\": 3, \"seed\": 3, \"n_shots\": 3%s}",
             strstr(extra, "affect_whom") ? "x_ablate_edges" : "x_calc_accuracy", model, dir, name, extra);
    ep_error err = {{0}};
    if (run_config_parse(text, name, cfg, &err) || tokenize_stage(cfg, 0, NULL, &err) || stage_inputs_open(cfg, NULL, in, &err)) {
        check(0, "%s: %s", name, err.msg);
        return -1;
    }
    return 0;
}

// Partial passes from every layer equal the full pass, under a circuit's plan.
static void test_prefix_pass(stage_inputs *in, const ablation_plan *plan) {
    const model *m = &in->m;
    int S = in->cfg->batch_size, L = m->cfg.n_layers, D = m->cfg.hidden, V = m->cfg.vocab_size, T = 0;
    prompt_batch pb = stage_batch(in, 0, S);
    for (int s = 0; s < S; s++) T += pb.lengths[s];
    int *tok = malloc(sizeof(int) * T), rows[16];
    for (int s = 0, r = 0; s < S; s++) {
        for (int i = 0; i < pb.lengths[s]; i++) tok[r++] = pb.tokens[s * pb.max_len + i];
        rows[s] = r - 1;
    }
    kv_cache donors[16], cache;
    memset(donors, 0, sizeof donors);
    ep_error err = {{0}};
    check(patch_donor_passes(m, kernel_ops_cpu(), plan, &pb, donors, &err) == 0, "donors: %s", err.msg);
    forward_patch fp = {.layer_rules = plan->layer_rules, .head_units = plan->head_units, .n_head_units = plan->n_head_units,
                        .n_donors = plan->n_donors, .donors = {&donors[0]}, .types = pb.types, .index = pb.index,
                        .type_stride = pb.max_len, .n_typed = pb.lengths};
    float *resid = malloc(sizeof(float) * (L + 1) * T * D), *full = malloc(sizeof(float) * S * V),
          *part = malloc(sizeof(float) * S * V), *x = malloc(sizeof(float) * T * D);
    kv_cache_init(&cache, &m->cfg, S, pb.max_len, 0, &err);
    forward_batch b = {.n_seqs = S, .n_new = pb.lengths, .tokens = tok, .n_logit_rows = S, .logit_rows = rows,
                       .logits = full, .resid = resid};
    check(model_forward(m, kernel_ops_cpu(), &cache, &b, &fp, &err) == 0, "full pass: %s", err.msg);
    kv_cache_free(&cache);
    int equal = 0;
    for (int l = 0; l <= L; l++) {
        // layer l alone into x, then the rest from x: two partial passes
        kv_cache_init(&cache, &m->cfg, S, pb.max_len, 0, &err);
        forward_batch one = {.n_seqs = S, .n_new = pb.lengths, .tokens = tok, .first_layer = l, .end_layer = l < L ? l + 1 : L,
                             .x_in = resid + (size_t)l * T * D, .x_out = x};
        int rc = model_forward(m, kernel_ops_cpu(), &cache, &one, &fp, &err);
        kv_cache_free(&cache);
        kv_cache_init(&cache, &m->cfg, S, pb.max_len, 0, &err);
        forward_batch rest = {.n_seqs = S, .n_new = pb.lengths, .tokens = tok, .n_logit_rows = S, .logit_rows = rows,
                              .logits = part, .first_layer = l < L ? l + 1 : L, .x_in = x};
        rc = rc ? rc : model_forward(m, kernel_ops_cpu(), &cache, &rest, &fp, &err);
        kv_cache_free(&cache);
        equal += rc == 0 && !memcmp(full, part, sizeof(float) * S * V);
    }
    check(equal == L + 1, "%s: partial passes from %d of %d layers give the full pass's logits bit for bit", in->cfg->path,
          equal, L + 1);
    // It can fail: starting from another layer's stream does not give the same logits.
    kv_cache_init(&cache, &m->cfg, S, pb.max_len, 0, &err);
    forward_batch wrong = {.n_seqs = S, .n_new = pb.lengths, .tokens = tok, .n_logit_rows = S, .logit_rows = rows,
                           .logits = part, .first_layer = 1, .x_in = resid};
    check(model_forward(m, kernel_ops_cpu(), &cache, &wrong, &fp, &err) == 0 && memcmp(full, part, sizeof(float) * S * V),
          "starting layer 1 from layer 0's stream changes the logits");
    kv_cache_free(&cache);
    printf("  %-12s partial passes (layer l alone, then l+1..) = full pass, bit for bit, for l = 0..%d\n", in->cfg->path, L);
    for (int d = 0; d < 16; d++) kv_cache_free(&donors[d]);
    free(resid), free(full), free(part), free(x), free(tok);
}

// A circuit with a few units dropped, for nontrivial scores.
static void some_circuit(const stage_inputs *in, circuit *c, int with_edges) {
    circuit_full(&in->m.cfg, c);
    circuit_unit drop[3] = {circuit_head_unit(0, 1, TT_Y), circuit_head_unit(1, 0, TT_LAST), circuit_head_unit(0, 2, TT_X)};
    for (int i = 0; i < 3; i++) circuit_set(c, UNIT_HEAD, &drop[i], 0);
    if (with_edges) {
        circuit_start_edges(c, &in->prompts);
        circuit_unit e = circuit_edge_unit(1, 1, TT_Y, TT_LAST);
        circuit_set(c, UNIT_EDGE, &e, 0);
    }
}

static void test_mask_plan_equals_json(const stage_inputs *in) {
    circuit c;
    some_circuit(in, &c, 1);
    circuit_unit *hu, *eu;
    int nh = circuit_units(&c, UNIT_HEAD, &hu), ne = circuit_units(&c, UNIT_EDGE, &eu);
    json_t *j = json_pack("{s:[],s:[]}", "heads", "edges");
    for (int i = 0; i < nh; i++)
        json_array_append_new(json_object_get(j, "heads"), json_pack("[i,i,s]", hu[i].layer, hu[i].head, token_type_name(hu[i].type)));
    for (int i = 0; i < ne; i++)
        json_array_append_new(json_object_get(j, "edges"), json_pack("[i,i,s,s]", eu[i].layer, eu[i].head,
                                                                     token_type_name(eu[i].sender), token_type_name(eu[i].receiver)));
    ablation_plan a, b;
    ep_error err = {{0}};
    int ok = circuit_plan(&c, &in->m.cfg, &in->plan, &a, &err) == 0 && plan_circuit(j, "test", &in->m.cfg, &in->plan, &b, &err) == 0;
    check(ok && plan_hash(&a) == plan_hash(&b) && a.n_head_units == b.n_head_units, "mask plan = JSON plan: %s", err.msg);
    printf("  %-12s circuit of %d head and %d edge units: the plan from masks = plan_circuit's from JSON (%d head units ablated)\n",
           in->cfg->path, nh, ne, a.n_head_units);
    if (ok) plan_free(&a), plan_free(&b);
    json_decref(j);
    free(hu), free(eu);
    circuit_free(&c);
}

static double max_abs_diff(const double *a, const double *b, int n) {
    double w = 0;
    for (int i = 0; i < n; i++) w = fmax(w, fabs(a[i] - b[i]));
    return w;
}

static double spearman_abs(const double *a, const double *b, int n) {
    double *ab = malloc(sizeof(double) * n);
    for (int i = 0; i < n; i++) ab[i] = fabs(b[i]);
    double r = rank_spearman(a, ab, n);
    free(ab);
    return r;
}

static int topk_abs(const double *a, const double *b, int n, int k) {
    double *ab = malloc(sizeof(double) * n);
    for (int i = 0; i < n; i++) ab[i] = fabs(b[i]);
    int r = rank_topk_overlap(a, ab, n, k);
    free(ab);
    return r;
}

static void test_exact(const stage_inputs *in, unit_kind kind) {
    circuit c;
    some_circuit(in, &c, kind == UNIT_EDGE);
    circuit_unit *u;
    int n = circuit_units(&c, kind, &u);
    if (kind == UNIT_EDGE && n > 60) n = 60;  // a sample keeps the brute force short
    double *brute = calloc(n, sizeof(double)), *reuse = calloc(n, sizeof(double)), *batched = calloc(n, sizeof(double));
    double *attr = calloc(n, sizeof(double)), *rows1 = calloc(n, sizeof(double)), *rows64 = calloc(n, sizeof(double));
    circuit_metrics mb, mr, mrow;
    ep_error err = {{0}};
    exact_opts o_brute = {0, 0, 1}, o_reuse = {1, 1, 1}, o_batch = {1, 64, 1};
    exact_opts o_rows1 = {EXACT_ROW_PREFIX, 1, 1}, o_rows64 = {EXACT_ROW_PREFIX, 64, 1};
    double t0 = now();
    int rc = score_exact(in, &c, kind, u, n, &o_brute, brute, NULL, &mb, &err);
    double t1 = now();
    rc = rc ? rc : score_exact(in, &c, kind, u, n, &o_reuse, reuse, NULL, &mr, &err);
    double t2 = now();
    rc = rc ? rc : score_exact(in, &c, kind, u, n, &o_batch, batched, NULL, NULL, &err);
    double t3 = now();
    rc = rc ? rc : score_exact(in, &c, kind, u, n, &o_rows1, rows1, NULL, &mrow, &err);
    double t4 = now();
    rc = rc ? rc : score_exact(in, &c, kind, u, n, &o_rows64, rows64, NULL, NULL, &err);
    double t5 = now();
    rc = rc ? rc : score_attribution(in, &c, kind, u, n, attr, &err);
    check(rc == 0, "scores: %s", err.msg);
    // Row reuse (each unit's passes start at the first row it reaches) against the brute force: the
    // shorter products round differently, so within 1e-5 (scores are differences of log-probs ~ 1).
    double dr1 = max_abs_diff(brute, rows1, n), dr64 = max_abs_diff(brute, rows64, n);
    check(dr1 < 1e-5 && dr64 < 1e-5 && mrow.target_logprob == mb.target_logprob,
          "%s: row-reuse exact scores within 1e-5 of the brute force (one unit a pass %.3g, batched %.3g)",
          in->cfg->path, dr1, dr64);
    printf("  %-12s   row reuse: one unit a pass max diff %.2g (%.3f s), batched %.2g (%.3f s, x%.1f over the brute force)\n",
           in->cfg->path, dr1, t4 - t3, dr64, t5 - t4, (t1 - t0) / (t5 - t4));
    const char *what = kind == UNIT_HEAD ? "head" : "edge";
    check(!memcmp(brute, reuse, sizeof(double) * n) && mb.target_logprob == mr.target_logprob,
          "%s: %s units: prefix reuse = brute force bit for bit (max diff %.3g)", in->cfg->path, what, max_abs_diff(brute, reuse, n));
    double db = max_abs_diff(brute, batched, n);
    check(db < 1e-5, "%s: batched exact scores within 1e-5 of the brute force: %.3g", in->cfg->path, db);
    int distinct = 0, nonzero = 0;
    for (int i = 0; i < n; i++) distinct += brute[i] != brute[0], nonzero += brute[i] != 0;
    check(distinct > 0 && nonzero > 0, "the scores tell units apart (the comparison can fail)");
    int k = n / 4 > 1 ? n / 4 : 1;
    printf("  %-12s %d %s units: exact by prefix reuse = brute force bit for bit; batched (64 seqs/pass) max diff %.2g"
           " (%s)\n", in->cfg->path, n, what, db, db == 0 ? "bitwise" : "float reassociation");
    printf("  %-12s   time: brute force %.3f s, prefix reuse %.3f s (x%.1f), reuse + batching %.3f s (x%.1f)\n",
           in->cfg->path, t1 - t0, t2 - t1, (t1 - t0) / (t2 - t1), t3 - t2, (t1 - t0) / (t3 - t2));
    printf("  %-12s   attribution vs exact: Spearman %.3f, |exact| Spearman %.3f, top-%d overlap with |exact| %d/%d\n", in->cfg->path,
           rank_spearman(attr, brute, n), spearman_abs(attr, brute, n),
           k, topk_abs(attr, brute, n, k), k);
    free(brute), free(reuse), free(batched), free(attr), free(rows1), free(rows64), free(u);
    circuit_free(&c);
}

// Exact scores averaged over donors against a brute force written here from the definition: for each
// donor j and unit u, full patch_runs of C and of C without u in which donor 0 (the circuit
// complement's donor) is prompt donor j (a one-donor copy of the batch), the first target token's
// log-probability differences averaged over prompts and donors.
static void test_exact_donors(const stage_inputs *in) {
    const prompt_set *ps = &in->prompts;
    int P = ps->n_prompts, K = ps->n_donors, B = in->cfg->batch_size, V = in->m.cfg.vocab_size, n;
    circuit c;
    some_circuit(in, &c, 0);
    circuit_unit *u;
    n = circuit_units(&c, UNIT_HEAD, &u);
    if (n > 12) n = 12;  // units of layer 0 and 1: the brute force stays short
    double *ref = calloc(n, sizeof(double)), *per_donor0 = calloc(n, sizeof(double));
    double *brute = calloc(n, sizeof(double)), *fast = calloc(n, sizeof(double)), *one = calloc(n, sizeof(double));
    float *last = malloc(sizeof(float) * B * V), *last_u = malloc(sizeof(float) * B * V);
    int32_t *donor_j = malloc(sizeof(int32_t) * B * ps->max_len);
    ep_error err = {{0}};
    int rc = 0;
    for (int j = 0; j < K && rc == 0; j++)
        for (int first = 0; first < P && rc == 0; first += B) {
            prompt_batch pb = stage_batch(in, first, first + B <= P ? B : P - first);
            for (int s = 0; s < pb.n_seqs; s++)
                memcpy(donor_j + s * pb.max_len, pb.donors + ((size_t)s * K + j) * pb.max_len, sizeof(int32_t) * pb.max_len);
            pb.donors = donor_j, pb.n_donors = 1;
            ablation_plan plan;
            rc = circuit_plan(&c, &in->m.cfg, &in->plan, &plan, &err);
            patch_outputs out = {.last_logits = last};
            rc = rc ? rc : patch_run(&in->m, kernel_ops_cpu(), &plan, &pb, &out, &err);
            plan_free(&plan);
            for (int i = 0; i < n && rc == 0; i++) {
                circuit cu;
                circuit_copy(&c, &cu);
                circuit_set(&cu, UNIT_HEAD, &u[i], 0);
                rc = circuit_plan(&cu, &in->m.cfg, &in->plan, &plan, &err);
                circuit_free(&cu);
                patch_outputs ou = {.last_logits = last_u};
                rc = rc ? rc : patch_run(&in->m, kernel_ops_cpu(), &plan, &pb, &ou, &err);
                plan_free(&plan);
                for (int s = 0; s < pb.n_seqs && rc == 0; s++) {
                    prompt_metrics mc, mu;
                    int t = ps->targets[(size_t)(first + s) * ps->max_target];
                    metrics_first_token(last + (size_t)s * V, V, t, &mc);
                    metrics_first_token(last_u + (size_t)s * V, V, t, &mu);
                    ref[i] += (mc.target_logprob - mu.target_logprob) / ((double)P * K);
                    if (j == 0) per_donor0[i] += (mc.target_logprob - mu.target_logprob) / P;
                }
            }
        }
    exact_opts o_brute = {0, 0, K}, o_fast = {1, 64, K}, o_one = {1, 64, 1}, o_rows = {EXACT_ROW_PREFIX, 64, K};
    double *rows = calloc(n, sizeof(double));
    rc = rc ? rc : score_exact(in, &c, UNIT_HEAD, u, n, &o_rows, rows, NULL, NULL, &err);
    double drow = max_abs_diff(rows, ref, n);
    check(rc == 0 && drow < 1e-5, "%s: row-reuse exact scores over %d donors = the reference (%.3g)", in->cfg->path, K, drow);
    free(rows);
    rc = rc ? rc : score_exact(in, &c, UNIT_HEAD, u, n, &o_brute, brute, NULL, NULL, &err);
    rc = rc ? rc : score_exact(in, &c, UNIT_HEAD, u, n, &o_fast, fast, NULL, NULL, &err);
    rc = rc ? rc : score_exact(in, &c, UNIT_HEAD, u, n, &o_one, one, NULL, NULL, &err);
    check(rc == 0, "donor-averaged scores: %s", err.msg);
    double db = max_abs_diff(brute, ref, n), df = max_abs_diff(fast, ref, n), d0 = max_abs_diff(one, per_donor0, n);
    double spread = max_abs_diff(ref, per_donor0, n);
    check(db < 1e-9 && df < 1e-5, "%s: exact scores averaged over %d donors = the reference (brute %.3g, fast %.3g)",
          in->cfg->path, K, db, df);
    check(d0 < 1e-5, "%s: one donor = the reference's donor 0 alone (%.3g)", in->cfg->path, d0);
    check(spread > 1e-4, "%s: the donors' average differs from donor 0's (%.3g): the check can fail", in->cfg->path, spread);
    exact_opts too_many = {1, 64, K + 1};
    check(score_exact(in, &c, UNIT_HEAD, u, 1, &too_many, one, NULL, NULL, &err) != 0 && strstr(err.msg, "donors"),
          "more donors than the prompts have is refused: %s", err.msg);
    printf("  %-12s %d head units, %d donors: exact scores = the reference's mean over donors (brute force %.2g, "
           "prefix reuse + batching %.2g); donor 0 alone differs by up to %.3g\n", in->cfg->path, n, K, db, df, spread);
    free(ref), free(per_donor0), free(brute), free(fast), free(one), free(last), free(last_u), free(donor_j), free(u);
    circuit_free(&c);
}

static void test_rank_helpers(void) {
    double a[5] = {1, 2, 3, 4, 5}, b[5] = {10, 20, 30, 40, 50}, c[5] = {5, 4, 3, 2, 1}, t[4] = {1, 1, 2, 3};
    int o[4];
    check(fabs(rank_spearman(a, b, 5) - 1) < 1e-12 && fabs(rank_spearman(a, c, 5) + 1) < 1e-12, "spearman +-1");
    check(rank_topk_overlap(a, b, 5, 2) == 2 && rank_topk_overlap(a, c, 5, 2) == 0, "top-k overlap");
    rank_order(t, 4, o);
    check(o[0] == 3 && o[1] == 2 && o[2] == 0 && o[3] == 1, "rank order: highest first, ties in unit order");
}

// Round files whose units or counts are out of range (found by tests/fuzz/fuzz_h5_artifacts.c): the
// reader refuses each, where it used to return units that circuit_has (`edgepatch scores`,
// model_logs.json) looks up past the circuit's masks, and agreement counts that are converted to int
// (undefined for NaN). A consistent round file (2 layers, 2 heads, 2 head units) loads. variant: which
// part is spoiled (0: none).
static int write_round(const char *path, int variant) {
    enum { L = 2, H = 2 };
    int32_t units[2 * 4] = {0, 1, 6, -1, 1, 0, 3, -1}, heads[L * H * PLAN_CIRCUIT_TYPES], kept[L * H * PLAN_CIRCUIT_TYPES];
    float scores[2] = {0.5f, -1}, metrics[9] = {0};
    double agreement[4] = {1, 1, 1, 1};
    for (int i = 0; i < L * H * PLAN_CIRCUIT_TYPES; i++) heads[i] = 1, kept[i] = i % 2;
    h5shape su = {2, {2, 4}}, ss = {1, {2}}, sm = {2, {3, 3}}, sh = {3, {L, H, PLAN_CIRCUIT_TYPES}}, sk = sh, sa = {1, {4}};
    const char *kind = "head";
    if (variant == 1) units[4] = L;          // a layer past the circuit's
    if (variant == 2) units[6] = PLAN_CIRCUIT_TYPES;  // a head unit's type past the masks
    if (variant == 3) sk.dims[0] = 1;        // kept for fewer layers than the circuit
    if (variant == 4) agreement[3] = NAN;    // k, converted to int by its readers
    if (variant == 5) kind = "heads";        // neither "head" nor "edge"
    h5store s;
    ep_error err = {{0}};
    if (h5store_create(path, &s, &err)) return -1;
    int rc = h5store_write_i32(&s, "units", &su, units, &err) || h5store_write_f32(&s, "scores", &ss, scores, &err) ||
             h5store_write_f32(&s, "metrics", &sm, metrics, &err) || h5store_write_i32(&s, "circuit/heads", &sh, heads, &err) ||
             h5store_write_i32(&s, "kept/heads", &sk, kept, &err) || h5store_write_f32(&s, "compare/scores", &ss, scores, &err) ||
             h5store_write_f64(&s, "compare/agreement", &sa, agreement, &err) ||
             h5store_set_str(&s, "compare_method", "exact", &err) || h5store_set_str(&s, "kind", kind, &err) ||
             h5store_set_str(&s, "method", "attribution", &err) || h5store_set_str(&s, "stop", "", &err) ||
             h5store_set_i64(&s, "round", 0, &err) || h5store_set_i64(&s, "pruned", 1, &err);
    if (rc) {
        h5store_abandon(&s);
        return -1;
    }
    return h5store_commit(&s, &err);
}

// Pruning fields beyond int (2^32 + 1 used to pass as 1 after the conversion): prune_open refuses them,
// naming the field; the same config with the field at 1 opens.
static void test_prune_int_fields(stage_inputs *in) {
    static const char *fields[] = {"min_units", "exact_max_seqs"};
    for (int f = 0; f < 2; f++)
        for (int big = 0; big < 2; big++) {
            char text[1024];
            snprintf(text, sizeof text,
                     "{\"task\": \"person_sport\", \"model_path\": \"m\", \"output_path\": \"%s/int-fields\", \"%s\": %s}", dir,
                     fields[f], big ? "4294967297" : "1");
            run_config cfg;
            ep_error err = {{0}};
            if (run_config_parse(text, "int-fields.json", &cfg, &err)) {
                check(0, "%s", err.msg);
                continue;
            }
            stage_inputs copy = *in;
            copy.cfg = &cfg;
            prune_run *pr = NULL;
            int rc = prune_open(&copy, 1, &pr, &err);
            if (big) check(rc != 0 && strstr(err.msg, fields[f]), "%s 2^32 + 1 refused: %s", fields[f], rc ? err.msg : "(opened)");
            else check(rc == 0, "%s 1 opens: %s", fields[f], err.msg);
            prune_close(pr);
            run_config_free(&cfg);
        }
}

static void test_round_validation(void) {
    static const char *names[] = {"", "units", "units", "kept", "agreement", "kind"};
    char run[512], path[600], cmd[700];
    snprintf(run, sizeof run, "%s/round-check", dir);
    snprintf(path, sizeof path, "%s/prune.d/round-000.h5", run);
    snprintf(cmd, sizeof cmd, "mkdir -p %s/prune.d", run);
    if (system(cmd) != 0) return;
    for (int v = 0; v < 6; v++) {
        prune_round r;
        ep_error err = {{0}};
        if (write_round(path, v)) {
            check(0, "writing round variant %d", v);
            continue;
        }
        int rc = prune_round_load(run, 0, &r, &err);
        if (v == 0)
            check(rc == 0 && r.n_units == 2 && circuit_has(&r.kept, r.kind, &r.units[1]) == 1 && r.agreement[3] == 1,
                  "a consistent round file loads: %s", err.msg);
        else check(rc != 0 && strstr(err.msg, names[v]), "round variant %d refused naming %s: %s", v, names[v], rc ? err.msg : "(loaded)");
        if (rc == 0) prune_round_free(&r);
    }
}

// Units and their rows on disk (stages/circuit.h, stages/circuit_file.h). circuit_units names a head
// unit (layer, head, type) and an edge unit (layer, head, sender, receiver), the unused fields -1, in
// the masks' order (checked against the masks walked here). A round file stores them as the int32 rows
// (layer, head, type, -1) and (layer, head, sender, receiver): the columns round files have always had
// (written out here by hand, not by the code under test), so files stay byte-identical; read back, the
// rows give the same units, field by field.
static void test_unit_rows(void) {
    enum { L = 2, H = 2, NT = PLAN_CIRCUIT_TYPES, ET = PLAN_EDGE_TYPES };
    circuit c = {L, H, calloc(L * H * NT, 1), calloc(L * H * ET * ET, 1)};
    int kept_heads[3][3] = {{0, 1, TT_Y}, {1, 0, TT_LAST}, {1, 1, TT_X}};
    int kept_edges[3][4] = {{0, 0, TT_Y, TT_QUERY}, {1, 1, TT_X, TT_LAST}, {1, 1, TT_Y, TT_LAST}};
    for (int i = 0; i < 3; i++) c.heads[(kept_heads[i][0] * H + kept_heads[i][1]) * NT + kept_heads[i][2]] = 1;
    for (int i = 0; i < 3; i++)
        c.edges[((kept_edges[i][0] * H + kept_edges[i][1]) * ET + kept_edges[i][2]) * ET + kept_edges[i][3]] = 1;
    circuit_unit *hu, *eu;
    int nh = circuit_units(&c, UNIT_HEAD, &hu), ne = circuit_units(&c, UNIT_EDGE, &eu), named = nh == 3 && ne == 3;
    for (int i = 0; i < 3 && named; i++) {
        named &= hu[i].layer == kept_heads[i][0] && hu[i].head == kept_heads[i][1] && hu[i].type == kept_heads[i][2] &&
                 hu[i].sender == -1 && hu[i].receiver == -1;
        named &= eu[i].layer == kept_edges[i][0] && eu[i].head == kept_edges[i][1] && eu[i].type == -1 &&
                 eu[i].sender == kept_edges[i][2] && eu[i].receiver == kept_edges[i][3];
    }
    check(named, "circuit_units: %d head units (layer, head, type) and %d edge units (layer, head, sender, receiver), "
          "in the masks' order, unused fields -1", nh, ne);
    char run[512], path[600], cmd[700];
    snprintf(run, sizeof run, "%s/unit-rows", dir);
    snprintf(cmd, sizeof cmd, "mkdir -p %s/prune.d", run);
    if (system(cmd) != 0) return;
    prune_round_path(run, 0, path, sizeof path);
    for (int kind = UNIT_HEAD; kind <= UNIT_EDGE; kind++) {
        const circuit_unit *u = kind == UNIT_HEAD ? hu : eu;
        int32_t want[3 * 4];
        for (int i = 0; i < 3; i++)
            for (int k = 0; k < 4; k++) want[4 * i + k] = kind == UNIT_HEAD ? (k < 3 ? kept_heads[i][k] : -1) : kept_edges[i][k];
        double scores[3] = {3, 1, 2};
        prune_round_result res = {.kind = kind, .method = "attribution", .units = u, .n = 3, .scores = scores, .stop = ""};
        ep_error err = {{0}};
        h5store s;
        h5shape sh;
        int32_t *rows = NULL;
        int rc = prune_round_write(path, "0123456789abcdef", 0, &c, &c, &res, 0, &err);
        if (rc == 0 && (rc = h5store_open(path, &s, &err)) == 0) {
            rc = h5store_read_i32(&s, "units", &sh, &rows, &err);
            h5store_close(&s);
        }
        check(rc == 0 && sh.rank == 2 && sh.dims[0] == 3 && sh.dims[1] == 4 && !memcmp(rows, want, sizeof want),
              "%s units on disk: rows (layer, head, %s): %s", unit_kind_name(kind),
              kind == UNIT_HEAD ? "type, -1" : "sender, receiver", rc ? err.msg : "");
        prune_round r;
        if (rc == 0 && (rc = prune_round_load(run, 0, &r, &err)) == 0) {
            check(r.kind == (unit_kind)kind && r.n_units == 3 && !memcmp(r.units, u, sizeof(circuit_unit) * 3),
                  "%s units read back = the units written, field by field", unit_kind_name(kind));
            prune_round_free(&r);
        }
        check(rc == 0, "round file of %s units: %s", unit_kind_name(kind), err.msg);
        free(rows);
        unlink(path);
    }
    printf("  units: head (layer, head, type) and edge (layer, head, sender, receiver), on disk as rows (l, h, type, -1) "
           "and (l, h, sender, receiver)\n");
    free(hu), free(eu);
    circuit_free(&c);
}

// edge_intervention (k, v, zero) reaches the circuit's plan and the scores: exact scores by prefix reuse =
// the brute force under each (test_exact); attribution under the full circuit (nothing ablated, so every
// config scores around the same pass): each unit's |kv| <= |k| + |v| (kv's first-order term is the sum of
// k's and v's), and the k, v and zero scores differ from kv's (the intervention reached the kernels).
static void test_edge_interventions(void) {
    const char *names[4] = {"kv", "k", "v", "zero"};
    double *attr[4] = {NULL, NULL, NULL, NULL};
    int n = 0;
    for (int s = 0; s < 4; s++) {
        char extra[128], name[32];
        snprintf(extra, sizeof extra, ", \"edge_intervention\": \"%s\"", names[s]);
        snprintf(name, sizeof name, "iv-%s", names[s]);
        run_config cfg;
        stage_inputs in;
        if (open_run(name, "smollm-tiny", extra, &cfg, &in)) continue;
        check(in.plan.circuit_source == s, "edge_intervention %s: the plan's circuit source is %d", names[s], in.plan.circuit_source);
        if (s > 0) test_exact(&in, UNIT_EDGE);
        circuit c;
        circuit_full(&in.m.cfg, &c);
        circuit_start_edges(&c, &in.prompts);
        circuit_unit *u;
        n = circuit_units(&c, UNIT_EDGE, &u);
        attr[s] = calloc((size_t)n + 1, sizeof(double));
        ep_error err = {{0}};
        check(score_attribution(&in, &c, UNIT_EDGE, u, n, attr[s], &err) == 0, "attribution (%s): %s", names[s], err.msg);
        free(u);
        circuit_free(&c);
        stage_inputs_close(&in);
        run_config_free(&cfg);
    }
    if (!attr[0] || !attr[1] || !attr[2] || !attr[3]) return;
    double worst = 0, dk = 0, dv = 0, dz = 0, mx = 0;
    for (int i = 0; i < n; i++) {
        worst = fmax(worst, attr[0][i] - (attr[1][i] + attr[2][i]));
        dk = fmax(dk, fabs(attr[1][i] - attr[0][i])), dv = fmax(dv, fabs(attr[2][i] - attr[0][i]));
        dz = fmax(dz, fabs(attr[3][i] - attr[0][i])), mx = fmax(mx, attr[0][i]);
    }
    printf("  iv           %d edge units, attribution: |kv| - (|k| + |v|) at most %.3g (of %.3g); k, v, zero differ "
           "from kv by %.3g, %.3g, %.3g\n", n, worst, mx, dk, dv, dz);
    check(mx > 0 && worst <= 1e-9 * mx, "attribution: |kv| > |k| + |v| by %.3g", worst);
    check(dk > 1e-3 * mx && dv > 1e-3 * mx && dz > 1e-3 * mx, "attribution: an intervention gave kv's scores");
    for (int s = 0; s < 4; s++) free(attr[s]);
}

int main(void) {
    snprintf(dir, sizeof dir, "/tmp/ep_test_score_%d", (int)getpid());
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf %s && mkdir -p %s", dir, dir);
    if (system(cmd) != 0) return 1;
    test_rank_helpers();
    test_round_validation();
    test_unit_rows();
    test_edge_interventions();
    const char *models[2] = {"smollm-tiny", "gemma2-tiny"};
    const char *extra[2] = {"", ", \"affect_whom\": [[\"x\", \"y\"]]"};
    for (int i = 0; i < 2; i++) {
        run_config cfg;
        stage_inputs in;
        if (open_run(models[i], models[i], extra[i], &cfg, &in)) continue;
        circuit c;
        some_circuit(&in, &c, 1);
        ablation_plan plan;
        ep_error err = {{0}};
        if (circuit_plan(&c, &in.m.cfg, &in.plan, &plan, &err) == 0) {
            test_prefix_pass(&in, &plan);
            plan_free(&plan);
        }
        circuit_free(&c);
        test_mask_plan_equals_json(&in);
        test_exact(&in, UNIT_HEAD);
        test_exact(&in, UNIT_EDGE);
        stage_inputs_close(&in);
        run_config_free(&cfg);
    }
    run_config cfg;
    stage_inputs in;
    if (open_run("donors", "smollm-tiny", ", \"donors\": 3", &cfg, &in) == 0) {
        test_exact_donors(&in);
        test_prune_int_fields(&in);
        stage_inputs_close(&in);
        run_config_free(&cfg);
    }
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0) return 1;
    return test_finish("test_score");
}
