// bench_reuse: what reusing the pass a patched pass differs from saves (stages/patch.h, "Reuse";
// docs/reuse.md), on the real demo model, each figure a ratio of the two paths measured in one run,
// interleaved (full path, reuse, full path, reuse, ...), the median over --reps repetitions:
//   - the demo's patch stage (configs/demo.json: 18 ablations + the full model, --patch-prompts 50
//     prompts, generation included): stage_inputs.full_passes 1 (every pass whole, the path before
//     reuse) against 0 (every pass derived from the clean pass);
//   - one exact head round and one exact edge round (--exact-prompts 20 prompts): score_exact with
//     EXACT_LAYER_PREFIX (the path before: only the layers below a unit reused) against
//     EXACT_ROW_PREFIX. The head round scores the full circuit's head units; the edge round the edge
//     units of the circuit the demo's head round keeps (473 of 1890 head units by attribution over the
//     same prompts). Exact rounds of every unit take hours on 2 cores: every --stride-th unit is scored
//     (same units on both paths), and times are per unit.
// Also: the results of both paths (max differences of the metrics and scores, kept units), and the
// attribution-to-exact cost ratio per unit before and after (attribution scores every unit of the round
// in one forward + backward per batch: its time over the round's units).
// Run from the repository root (the task and datasets): bench_reuse --model models/smollm2-135m-instruct
// [--reps R] [--stride K] [--patch-prompts P] [--exact-prompts P] [--skip patch|exact|head|edge] [--work DIR].
#define _GNU_SOURCE  // realpath
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bench/bench_util.h"
#include "pipeline/h5store.h"
#include "stages/cache.h"
#include "stages/circuit.h"
#include "stages/patch.h"
#include "stages/rank.h"
#include "stages/score.h"
#include "stages/stage_inputs.h"
#include "stages/tokenize.h"
#include "stages/work_stage.h"

static const char usage[] =
    "usage: bench_reuse --model DIR [--reps R] [--stride K] [--patch-prompts P] [--exact-prompts P]\n"
    "                   [--skip patch|exact|head|edge] [--work DIR]\n";

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// configs/demo.json with this run's paths and prompt count (and without ablations when asked).
static int max_new_override = -1;  // --max-new: another generation length than the demo's (diagnosis)

static int open_demo(const char *model_dir, const char *work, const char *name, int n_prompts, int ablations,
                     run_config *cfg, stage_inputs *in) {
    json_error_t je;
    json_t *j = json_load_file("configs/demo.json", 0, &je);
    if (!j) {
        fprintf(stderr, "bench_reuse: configs/demo.json: %s (run from the repository root)\n", je.text);
        return -1;
    }
    char out[4096], model[4096];
    snprintf(out, sizeof out, "%s/%s", work, name);
    if (!realpath(model_dir, model)) {
        fprintf(stderr, "bench_reuse: %s: no such model folder\n", model_dir);
        json_decref(j);
        return -1;
    }
    json_object_set_new(j, "output_path", json_string(out));
    json_object_set_new(j, "model_path", json_string(model));
    json_object_set_new(j, "n_prompts", json_integer(n_prompts));
    if (!ablations) json_object_del(j, "ablations");
    if (max_new_override >= 0) json_object_set_new(j, "max_new_tokens", json_integer(max_new_override));
    char *text = json_dumps(j, 0);
    json_decref(j);
    ep_error err = {{0}};
    int rc = run_config_parse(text, "configs/demo.json", cfg, &err) || tokenize_stage(cfg, 0, NULL, &err) ||
             stage_inputs_open(cfg, NULL, in, &err) || cache_stage(in, 0, &err);
    free(text);
    if (rc) fprintf(stderr, "bench_reuse: %s\n", err.msg);
    return rc ? -1 : 0;
}

// Every group's per-prompt target log-prob, correctness and generations from patch.h5, flattened.
typedef struct {
    float *logprob;
    int32_t *correct, *generated;
    size_t n, n_gen;
} stage_result;

static int read_patch(const char *out_dir, int n_groups, stage_result *r) {
    char path[4200];
    snprintf(path, sizeof path, "%s/patch.h5", out_dir);
    h5store s;
    ep_error err = {{0}};
    memset(r, 0, sizeof *r);
    if (h5store_open(path, &s, &err)) return -1;
    int rc = 0;
    for (int g = 0; g < n_groups && rc == 0; g++) {
        char name[64], gname[32];
        if (g < 2) snprintf(gname, sizeof gname, "%s", g ? "clean" : "plan");
        else snprintf(gname, sizeof gname, "ablation-%03d", g - 2);
        const char *what[3] = {"target_logprob", "correct", "generated"};
        for (int k = 0; k < 3 && rc == 0; k++) {
            h5shape sh;
            void *v = NULL;
            snprintf(name, sizeof name, "%s/%s", gname, what[k]);
            rc = k == 0 ? h5store_read_f32(&s, name, &sh, (float **)&v, &err) : h5store_read_i32(&s, name, &sh, (int32_t **)&v, &err);
            if (rc) break;
            size_t n = (size_t)sh.dims[0] * (sh.rank > 1 ? (size_t)sh.dims[1] : 1);
            size_t at = k == 2 ? r->n_gen : r->n;
            if (k == 0) r->logprob = realloc(r->logprob, sizeof(float) * (at + n)), memcpy(r->logprob + at, v, sizeof(float) * n);
            if (k == 1) r->correct = realloc(r->correct, sizeof(int32_t) * (at + n)), memcpy(r->correct + at, v, sizeof(int32_t) * n), r->n += n;
            if (k == 2) r->generated = realloc(r->generated, sizeof(int32_t) * (at + n)), memcpy(r->generated + at, v, sizeof(int32_t) * n), r->n_gen += n;
            free(v);
        }
    }
    h5store_close(&s);
    return rc;
}

static void stage_result_free(stage_result *r) { free(r->logprob), free(r->correct), free(r->generated); }

// The first item's prompts: every ablation's last-position logits, full pass against derived pass, as the
// largest difference over the largest |logit| (the logits' scale).
static double logits_check(stage_inputs *in) {
    kv_cache donors[16];
    memset(donors, 0, sizeof donors);
    int damaged = 0, first, n, V = in->m.cfg.vocab_size;
    stage_item_range(in, 0, &first, &n);
    prompt_batch pb = stage_batch(in, first, n);
    ep_error err = {{0}};
    patch_base base = {0};
    ablation_plan clean;
    plan_empty(&in->m.cfg, &clean);
    float *a = malloc(sizeof(float) * (size_t)n * V), *b = malloc(sizeof(float) * (size_t)n * V);
    int rc = cache_load_item(in, 0, donors, &damaged, &err);
    if (rc == 0) rc = patch_base_run(&in->dev, in->ops, &clean, &pb, donors, 0, &base, &err);
    double worst = 0;
    for (int k = 0; k < in->n_ablations && rc == 0; k++) {
        patch_outputs oa = {.last_logits = a}, ob = {.last_logits = b};
        rc = patch_prompt_pass(&in->dev, in->ops, &in->ablations[k], &pb, donors, &oa, &err);
        if (rc == 0) rc = patch_prompt_pass_from(&in->dev, in->ops, &in->ablations[k], &pb, donors, &base, NULL, &ob, &err);
        double d = 0, scale = 0;
        for (size_t i = 0; i < (size_t)n * V && rc == 0; i++) {
            if (fabs(a[i] - b[i]) > d) d = fabs(a[i] - b[i]);
            if (fabs(a[i]) > scale) scale = fabs(a[i]);
        }
        if (rc == 0 && d / scale > worst) worst = d / scale;
    }
    if (rc) fprintf(stderr, "bench_reuse: logits check: %s\n", err.msg);
    patch_base_free(&base);
    plan_free(&clean);
    for (int d = 0; d < 16; d++) kv_cache_free(&donors[d]);
    free(a), free(b);
    return rc ? NAN : worst;
}

static int bench_patch_stage(const char *model_dir, const char *work, int P, int R) {
    run_config cfg;
    stage_inputs in;
    if (open_demo(model_dir, work, "patch", P, 1, &cfg, &in)) return -1;
    double *ratio = calloc((size_t)R, sizeof(double)), *tf = calloc((size_t)R, sizeof(double)),
           *td = calloc((size_t)R, sizeof(double));
    stage_result res[2];
    memset(res, 0, sizeof res);
    ep_error err = {{0}};
    int rc = 0;
    fprintf(stderr, "patch stage: %d prompts, %d ablations + the full model, generation of %lld tokens\n", P,
            in.n_ablations, (long long)cfg.max_new_tokens);
    for (int rep = 0; rep < R && rc == 0; rep++) {
        double t[2];
        for (int k = 0; k < 2 && rc == 0; k++) {
            int full = rep % 2 ? k : 1 - k;  // alternate which path goes first
            in.full_passes = full;
            double t0 = bench_now_s();
            rc = patch_stage(&in, 1, &err);
            t[full] = bench_now_s() - t0;
            if (rc == 0 && rep == 0) {
                stage_result_free(&res[full]);
                rc = read_patch(cfg.output_path, 2 + in.n_ablations, &res[full]);
            }
        }
        if (rc) break;
        tf[rep] = t[1], td[rep] = t[0], ratio[rep] = t[1] / t[0];
        fprintf(stderr, "  rep %d: full passes %.2f s, derived %.2f s: x%.2f\n", rep, t[1], t[0], ratio[rep]);
    }
    if (rc == 0) {
        double worst = 0;
        size_t differ = 0, gen_differ = 0;
        for (size_t i = 0; i < res[0].n; i++) {
            double a = res[0].logprob[i], b = res[1].logprob[i], d = fabs(a - b) / (fabs(b) > 1 ? fabs(b) : 1);
            if (d > worst) worst = d;
            differ += res[0].correct[i] != res[1].correct[i];
        }
        for (size_t i = 0; i < res[0].n_gen; i++) gen_differ += res[0].generated[i] != res[1].generated[i];
        double mt_f = median(tf, R), mt_d = median(td, R), mr = median(ratio, R), w_full = 0, w_derived = 0;
        int L = in.m.cfg.n_layers, B = cfg.batch_size;
        for (int first = 0; first < P; first += B) {  // rows x layers of the prompt passes, generation aside
            prompt_batch pb = stage_batch(&in, first, first + B <= P ? B : P - first);
            for (int s = 0; s < pb.n_seqs; s++) w_full += (double)pb.lengths[s] * L * (1 + in.n_ablations), w_derived += (double)pb.lengths[s] * L;
            for (int a = 0; a < in.n_ablations; a++) {
                patch_reach r;
                patch_reach_init(&r, &pb, L);
                patch_reach_add_plan(&r, &in.ablations[a], &pb);
                for (int s = 0; s < pb.n_seqs && r.first_layer < L; s++)
                    w_derived += (double)(pb.lengths[s] - r.first_row[s]) * (L - r.first_layer);
                patch_reach_free(&r);
            }
        }
        double rel = logits_check(&in);
        printf("patch_stage max_rel_logits_diff=%.2g (first item, every ablation)\n", rel);
        printf("patch_stage prompts=%d ablations=%d reps=%d full_s=%.2f derived_s=%.2f median_ratio=%.2f "
               "max_rel_logprob_diff=%.2g correct_differ=%zu/%zu generated_differ=%zu/%zu prompt_work_ratio=%.2f\n",
               P, in.n_ablations, R, mt_f, mt_d, mr, worst, differ, res[0].n, gen_differ, res[0].n_gen, w_full / w_derived);
    } else {
        fprintf(stderr, "bench_reuse: %s\n", err.msg);
    }
    stage_result_free(&res[0]), stage_result_free(&res[1]);
    free(ratio), free(tf), free(td);
    stage_inputs_close(&in);
    run_config_free(&cfg);
    return rc;
}

// Rows x layers each path computes for the units' passes (the circuit's pass aside): the layer-prefix path
// runs every row of the unit's layer and the layers above; the suffix rule (the row path before, kept here
// as a figure) the rows from each sequence's first reached row; the row path the rows the unit can change
// (score_unit_rows). Machine-independent figures next to the timed ratio.
static void exact_work(const stage_inputs *in, const circuit *c, unit_kind kind, const circuit_unit *u, int n,
                       double *layer_rows, double *suffix_rows, double *row_rows) {
    int P = in->prompts.n_prompts, B = in->cfg->batch_size, L = in->m.cfg.n_layers;
    *layer_rows = *suffix_rows = *row_rows = 0;
    ablation_plan plan;
    ep_error err = {{0}};
    if (circuit_plan(c, &in->m.cfg, &in->plan, &plan, &err)) return;
    for (int first = 0; first < P; first += B) {
        prompt_batch pb = stage_batch(in, first, first + B <= P ? B : P - first);
        patch_carry carry;
        patch_carry_init(&carry, &plan, &pb);
        for (int i = 0; i < n; i++) {
            patch_reach r;
            patch_reach_init(&r, &pb, L);
            if (kind == UNIT_HEAD) patch_reach_add_head(&r, &pb, u[i].layer, u[i].type);
            else patch_reach_add_edges(&r, &pb, u[i].layer, 1u << u[i].sender, 1u << u[i].receiver, REL_ANY);
            for (int s = 0; s < pb.n_seqs; s++) {
                *layer_rows += (double)pb.lengths[s] * (L - u[i].layer);
                if (r.first_layer < L) *suffix_rows += (double)(pb.lengths[s] - r.first_row[s]) * (L - u[i].layer);
            }
            patch_reach_free(&r);
            patch_rows rows;
            score_unit_rows(kind, &u[i], &pb, L, &carry, &rows);
            *row_rows += (double)patch_rows_count(&rows);
            patch_rows_free(&rows);
        }
        patch_carry_free(&carry);
    }
    plan_free(&plan);
}

// One exact round (units of kind in circuit c, every stride-th) both ways, R times interleaved.
static int bench_exact_round(const stage_inputs *in, const circuit *c, unit_kind kind, int stride, int R, int max_seqs) {
    circuit_unit *all;
    int n_all = circuit_units(c, kind, &all), n = 0;
    circuit_unit *u = malloc(sizeof *u * (size_t)(n_all + 1));
    for (int i = 0; i < n_all; i += stride) u[n++] = all[i];
    double *s[2] = {calloc((size_t)n, sizeof(double)), calloc((size_t)n, sizeof(double))};
    double *attr = calloc((size_t)n_all + 1, sizeof(double));
    double *ratio = calloc((size_t)R, sizeof(double)), *tl = calloc((size_t)R, sizeof(double)),
           *tr = calloc((size_t)R, sizeof(double)), *marginal = calloc((size_t)R, sizeof(double));
    ep_error err = {{0}};
    int rc = 0;
    const char *what = unit_kind_name(kind);
    fprintf(stderr, "exact %s round: %d prompts, %d of the circuit's %d %s units (every %d-th)\n", what,
            in->prompts.n_prompts, n, n_all, what, stride);
    for (int rep = 0; rep < R && rc == 0; rep++) {
        double t[2], f[2];
        for (int k = 0; k < 2 && rc == 0; k++) {
            int rows = rep % 2 ? 1 - k : k;
            exact_opts o = {rows ? EXACT_ROW_PREFIX : EXACT_LAYER_PREFIX, max_seqs, 1};
            double t0 = bench_now_s();
            rc = score_exact(in, c, kind, u, n, &o, s[rows], NULL, NULL, &err);
            t[rows] = bench_now_s() - t0;
            // What every round pays per batch whatever its units (donor passes, the circuit's pass): a round
            // of all the circuit's units spreads it over all of them, this sample over n.
            t0 = bench_now_s();
            if (rc == 0) rc = score_exact(in, c, kind, u, 0, &o, s[rows], NULL, NULL, &err);
            f[rows] = bench_now_s() - t0;
        }
        if (rc) break;
        tl[rep] = t[0], tr[rep] = t[1], ratio[rep] = t[0] / t[1], marginal[rep] = (t[0] - f[0]) / (t[1] - f[1]);
        fprintf(stderr, "  rep %d: layer prefix %.2f s (%.2f s per batch), rows %.2f s (%.2f s per batch): x%.2f, per unit beyond the batch's x%.2f\n",
                rep, t[0], f[0], t[1], f[1], ratio[rep], marginal[rep]);
    }
    double t0 = bench_now_s();
    if (rc == 0) rc = score_attribution(in, c, kind, all, n_all, attr, &err);
    double t_attr = bench_now_s() - t0;
    if (rc == 0) {
        double worst = 0, scale = 0;
        for (int i = 0; i < n; i++) {
            double d = fabs(s[0][i] - s[1][i]);
            if (d > worst) worst = d;
            if (fabs(s[0][i]) > scale) scale = fabs(s[0][i]);
        }
        int k = n / 4 > 0 ? n / 4 : 1;
        int overlap = rank_topk_overlap(s[0], s[1], n, k);
        double ml = median(tl, R), mrow = median(tr, R), mr = median(ratio, R), w_layer, w_suffix, w_row;
        exact_work(in, c, kind, u, n, &w_layer, &w_suffix, &w_row);
        double attr_unit = t_attr / n_all, before = ml / n / attr_unit, after = mrow / n / attr_unit;
        printf("exact_%s_round prompts=%d units=%d of=%d reps=%d layer_prefix_s=%.2f row_prefix_s=%.2f median_ratio=%.2f "
               "per_unit_layer_prefix_ms=%.1f per_unit_row_prefix_ms=%.1f attribution_s=%.2f attribution_per_unit_ms=%.3f "
               "exact_to_attribution_per_unit_before=%.0f after=%.0f max_score_diff=%.2g max_abs_score=%.3g "
               "top25pct_kept_same=%d/%d work_ratio=%.2f suffix_rule_work_ratio=%.2f median_ratio_beyond_batch_cost=%.2f\n",
               what, in->prompts.n_prompts, n, n_all, R, ml, mrow, mr, 1e3 * ml / n, 1e3 * mrow / n, t_attr,
               1e3 * attr_unit, before, after, worst, scale, overlap, k, w_layer / w_row, w_layer / w_suffix, median(marginal, R));
    } else {
        fprintf(stderr, "bench_reuse: %s\n", err.msg);
    }
    free(s[0]), free(s[1]), free(attr), free(ratio), free(tl), free(tr), free(marginal), free(u), free(all);
    return rc;
}

static const char *skip_round = "";  // --skip head | edge: one exact round only

static int bench_exact(const char *model_dir, const char *work, int P, int R, int stride) {
    run_config cfg;
    stage_inputs in;
    if (open_demo(model_dir, work, "exact", P, 0, &cfg, &in)) return -1;
    int max_seqs = (int)cfg.prune.exact_max_seqs, rc;
    circuit c;
    circuit_full(&in.m.cfg, &c);
    rc = strcmp(skip_round, "head") ? bench_exact_round(&in, &c, UNIT_HEAD, stride, R, max_seqs) : 0;
    // The circuit the demo's head round keeps (its prune_k[0] head units by attribution), then its edges.
    circuit_unit *heads;
    int n = circuit_units(&c, UNIT_HEAD, &heads), keep = 473 < n ? 473 : n;
    double *score = calloc((size_t)n, sizeof(double));
    int *order = malloc(sizeof(int) * (size_t)n);
    ep_error err = {{0}};
    if (rc == 0 && (rc = score_attribution(&in, &c, UNIT_HEAD, heads, n, score, &err)))
        fprintf(stderr, "bench_reuse: %s\n", err.msg);
    if (rc == 0) {
        rank_order(score, n, order);
        for (int i = keep; i < n; i++) circuit_set(&c, UNIT_HEAD, &heads[order[i]], 0);
        circuit_start_edges(&c, &in.prompts);
        rc = strcmp(skip_round, "edge") ? bench_exact_round(&in, &c, UNIT_EDGE, stride, R, max_seqs) : 0;
    }
    free(score), free(order), free(heads);
    circuit_free(&c);
    stage_inputs_close(&in);
    run_config_free(&cfg);
    return rc;
}

int main(int argc, char **argv) {
    const char *model = NULL, *skip = "", *work = NULL;
    int R = 3, stride = 30, P_patch = 50, P_exact = 20;
    for (int i = 1; i < argc; i++) {
        const char *next = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(argv[i], "--help") || !next) {
            fputs(usage, !strcmp(argv[i], "--help") ? stdout : stderr);
            return !strcmp(argv[i], "--help") ? 0 : 2;
        }
        if (!strcmp(argv[i], "--model")) model = next;
        else if (!strcmp(argv[i], "--reps")) R = atoi(next);
        else if (!strcmp(argv[i], "--stride")) stride = atoi(next);
        else if (!strcmp(argv[i], "--patch-prompts")) P_patch = atoi(next);
        else if (!strcmp(argv[i], "--exact-prompts")) P_exact = atoi(next);
        else if (!strcmp(argv[i], "--skip")) skip = next;
        else if (!strcmp(argv[i], "--work")) work = next;
        else if (!strcmp(argv[i], "--max-new")) max_new_override = atoi(next);
        else {
            fprintf(stderr, "bench_reuse: unknown option '%s'\n%s", argv[i], usage);
            return 2;
        }
        i++;
    }
    if (!model || R <= 0 || stride <= 0 || P_patch <= 0 || P_exact <= 0) {
        fputs(usage, stderr);
        return 2;
    }
    char tmp[256];
    if (!work) {
        snprintf(tmp, sizeof tmp, "/tmp/bench_reuse_%d", (int)getpid());
        work = tmp;
    }
    char cmd[600];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", work);
    if (system(cmd)) return 1;
    int rc = 0;
    skip_round = skip;
    if (strcmp(skip, "patch") && strcmp(skip, "head") && strcmp(skip, "edge")) rc = bench_patch_stage(model, work, P_patch, R);
    if (rc == 0 && strcmp(skip, "exact")) rc = bench_exact(model, work, P_exact, R, stride);
    if (work == tmp) {
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", work);
        if (system(cmd)) rc = 1;
    }
    return rc ? 1 : 0;
}
