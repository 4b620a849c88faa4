#include "prune_round.h"

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "pipeline/files.h"
#include "pipeline/h5store.h"
#include "pipeline/hash.h"
#include "stages/rank.h"

// Units round r keeps of n: prune_k[r], or all but the lowest prune_fraction (at least one dropped).
static int keep_count(const prune_params *p, int r, int n) {
    int k = r < p->n_k ? p->k[r] : n - (int)fmax(1.0, floor(n * p->fraction + 0.5));
    return k > n ? n : k < 0 ? 0 : k;
}

// Rank agreement of a gradient method's scores (attribution or EAP-IG) with exact scores: Spearman with
// the signed exact scores (the two orders pruning would use), Spearman with |exact| (the size the
// gradient scores estimate), and how many of the k units the method ranks highest are among the k exact
// ranks highest (k: the round's keep count).
static void compare_ranks(const double *exact, const double *attribution, int n, int k, double out[4]) {
    double *mag = ep_malloc(sizeof(double) * (size_t)(n + 1));
    for (int i = 0; i < n; i++) mag[i] = fabs(exact[i]);
    out[0] = rank_spearman(attribution, exact, n);
    out[1] = rank_spearman(attribution, mag, n);
    out[2] = rank_topk_overlap(attribution, exact, n, k);
    out[3] = k;
    free(mag);
}

// One round as work items: item i = prompts [i * batch_size, ...), its sums in an item shard
// prune.d/round-NNN.d/item-NNNNN.h5; finish (one process) merges them in item order, prunes, measures
// and writes the round file.
typedef struct {
    prune_env *env;
    int r;
    char identity[17], path[4200], dir[4200];
    unit_kind kind;
    int method;             // 0 attribution, 1 exact, 2 an earlier run's file, 3 eap-ig
    int exact, attribution, eap_ig;  // which scores the items compute (all with compare_importance and eap-ig)
    circuit c;
    circuit_unit *units;
    int n, width;  // units, sums per unit: 3 exact (metrics of C without the unit), 1 attribution, 1 eap-ig; >= 1
    int n_groups, group;  // unit groups per prompt batch (1 unless exact scores run), units per group
    ablation_plan plan;
    int current;  // the round file is current: the driver only checks the shards (and redoes a damaged one)
} round_ctx;

// Work item i: prompt batch i / n_groups, units [u0, u0 + nu) of group i % n_groups.
typedef struct {
    int first, S, g, u0, nu;
} item_span;

static item_span item_of(const round_ctx *rc, int item) {
    item_span s;
    stage_item_range(rc->env->in, item / rc->n_groups, &s.first, &s.S);
    s.g = item % rc->n_groups, s.u0 = s.g * rc->group;
    s.nu = rc->n - s.u0 < rc->group ? rc->n - s.u0 : rc->group;
    return s;
}

static void shard_path(const round_ctx *rc, int item, char *out, size_t n) { snprintf(out, n, "%s/item-%05d.h5", rc->dir, item); }

static void shard_identity(const round_ctx *rc, int item, char out[17]) {
    item_span s = item_of(rc, item);
    char id[17];
    hash_hex(hash_bytes(hash_bytes(hash_str(HASH_INIT, rc->identity), &s.u0, sizeof s.u0), &s.nu, sizeof s.nu), id);
    stage_item_identity(id, s.first, s.S, out);
}

static int round_prepare(work_stage *ws, int fresh, ep_error *err) {
    round_ctx *rc = ws->ctx;
    if (mkdir(rc->dir, 0777) != 0 && errno != EEXIST) return ep_fail(err, "%s: cannot create: %s", rc->dir, strerror(errno));
    if (!fresh) return remove_temporaries(rc->dir, 0, NULL, NULL, err) ? -1 : rc->current;
    return remove_entries(rc->dir, "item-", err);
}

static int round_item_done(work_stage *ws, int item, ep_error *err) {
    round_ctx *rc = ws->ctx;
    char path[4400], id[17];
    shard_path(rc, item, path, sizeof path);
    shard_identity(rc, item, id);
    return stage_item_current(path, id, "edgepatch-prune-item-1", ws->log, err);
}

static int round_run_item(work_stage *ws, int item, ep_error *err) {
    round_ctx *rc = ws->ctx;
    const stage_inputs *in = rc->env->in;
    item_span sp = item_of(rc, item);
    int first = sp.first, S = sp.S, n = sp.nu, r;
    const circuit_unit *units = rc->units + sp.u0;
    // base: C's metric sums; exact scores sum them over the scoring donors, as they do C-without-u's.
    double *sums = ep_calloc((size_t)n * rc->width + 1, sizeof(double)), base[3] = {0};
    double *ex = ep_calloc((size_t)n * 3 + 1, sizeof(double)), *at = ep_calloc((size_t)n + 1, sizeof(double)),
           *ig = ep_calloc((size_t)n + 1, sizeof(double));
    if (rc->exact) {
        exact_opts o = {in->full_passes ? EXACT_LAYER_PREFIX : EXACT_ROW_PREFIX, rc->env->p.exact_max_seqs,
                        rc->env->p.score_donors};
        r = score_exact_batch(in, &rc->c, &rc->plan, rc->kind, units, n, &o, first, S, ex, base, err);
    } else {
        r = circuit_measure_batch(in, &rc->plan, first, S, base, err);
    }
    // EAP-IG's last path point is attribution's pass: one call gives both.
    if (r == 0 && (rc->attribution || rc->eap_ig))
        r = score_gradient_batch(in, &rc->plan, rc->kind, units, n, rc->env->p.ig_steps, first, S, rc->attribution ? at : NULL,
                                 rc->eap_ig ? ig : NULL, err);
    for (int u = 0; u < n; u++) {
        for (int k = 0; k < 3 * rc->exact; k++) sums[(size_t)u * rc->width + k] = ex[(size_t)u * 3 + k];
        if (rc->attribution) sums[(size_t)u * rc->width + 3 * rc->exact] = at[u];
        if (rc->eap_ig) sums[(size_t)u * rc->width + 3 * rc->exact + rc->attribution] = ig[u];
    }
    free(ex), free(at), free(ig);
    char path[4400], id[17];
    shard_path(rc, item, path, sizeof path);
    shard_identity(rc, item, id);
    h5store s;
    if (r == 0 && !ws->follower && (r = h5store_create(path, &s, err)) == 0) {
        h5shape ss = {2, {n, rc->width ? rc->width : 1}}, sb = {1, {3}};
        // The columns of sums (rc->width of them): exact's three sums, attribution's, or the earlier file's placeholder.
        const char *cols[6], *metric_cols[3] = {"target_logprob", "first_token_accuracy", "logit_diff"};
        int nc = 0;
        if (rc->exact) cols[nc++] = "exact_target_logprob", cols[nc++] = "exact_first_token_accuracy", cols[nc++] = "exact_logit_diff";
        if (rc->attribution) cols[nc++] = "attribution";
        if (rc->eap_ig) cols[nc++] = "eap-ig";
        if (rc->method == 2 || nc == 0) cols[nc++] = "unused";
        r = h5store_write_f64(&s, "sums", &ss, sums, err) || h5store_label(&s, "sums", "unit,column", err) ||
            h5store_set_strs_at(&s, "sums", "column_names", cols, nc, err) ||
            h5store_write_f64(&s, "base", &sb, base, err) || h5store_label(&s, "base", "metric", err) ||
            h5store_set_strs_at(&s, "base", "column_names", metric_cols, 3, err) ||
            h5store_set_str(&s, "format", "edgepatch-prune-item-1", err) || h5store_set_str(&s, "inputs_hash", id, err) ||
            h5store_set_i64(&s, "item", item, err) || h5store_set_i64(&s, "first_prompt", first, err) ||
            h5store_set_i64(&s, "n_prompts", S, err) || h5store_set_i64(&s, "first_unit", sp.u0, err) ||
            h5store_set_i64(&s, "n_units", n, err);
        if (r == 0 && ws->before_commit) ws->before_commit(ws->driver_arg, item);
        if (r) h5store_abandon(&s);
        else r = h5store_commit(&s, err);
    }
    free(sums);
    return r;
}

static int round_finish(work_stage *ws, ep_error *err) {
    round_ctx *rc = ws->ctx;
    prune_env *env = rc->env;
    const stage_inputs *in = env->in;
    const prune_params *p = &env->p;
    int P = in->prompts.n_prompts, w = rc->width, r = 0;
    double *sums = ep_calloc((size_t)rc->n * w + 1, sizeof(double)), base[3] = {0};
    for (int item = 0; item < ws->n_items && r == 0; item++) {
        char path[4400], id[17], *have = NULL;
        shard_path(rc, item, path, sizeof path);
        shard_identity(rc, item, id);
        h5store s;
        // Checked again where it is read (the seal, at open): a shard damaged since its item was checked
        // is recomputed.
        r = h5store_open(path, &s, err);
        if (r) {
            stage_shard_damaged(ws, path, err);
            break;
        }
        double *v = NULL, *b = NULL;
        h5shape sh, sb;
        if (h5store_get_str(&s, "inputs_hash", &have, err) || strcmp(have, id)) r = ep_fail(err, "%s: made from other inputs than this round's", path);
        if (r == 0) r = h5store_read_f64(&s, "sums", &sh, &v, err) || h5store_read_f64(&s, "base", &sb, &b, err);
        item_span sp = item_of(rc, item);
        if (r == 0 && (sh.rank != 2 || sh.dims[0] != sp.nu || sh.dims[1] != w || sb.rank != 1 || sb.dims[0] != 3))
            r = ep_fail(err, "%s: dataset sums or base has the wrong shape", path);
        for (size_t i = 0; r == 0 && i < (size_t)sp.nu * w; i++) sums[(size_t)sp.u0 * w + i] += v[i];
        for (int i = 0; r == 0 && sp.g == 0 && i < 3; i++) base[i] += b[i];  // every group's C is the same
        free(v), free(b), free(have);
        h5store_close(&s);
    }
    double *scores = ep_calloc((size_t)rc->n + 1, sizeof(double));
    // each method's scores (what the comparison reads and the round file keeps), freed at the end
    double *exs = ep_calloc((size_t)rc->n + 1, sizeof(double)), *ats = ep_calloc((size_t)rc->n + 1, sizeof(double)),
           *igs = ep_calloc((size_t)rc->n + 1, sizeof(double));
    prune_round_result res = {.kind = rc->kind, .units = rc->units, .n = rc->n, .scores = scores,
                              .pruned = p->head_rounds + p->edge_rounds > 0, .stop = "",
                              .edge_intervention = edge_source_name(in->plan.circuit_source)};
    circuit kept;
    circuit_copy(&rc->c, &kept);
    if (r == 0 && rc->method == 2) {
        // Scores of an earlier run (the original's prune_using_imp_scores), taken in this very circuit.
        prune_round f;
        if ((r = prune_round_read(p->files[rc->r], &in->m.cfg, &f, err)) == 0) {
            int same = f.kind == rc->kind && f.n_units == rc->n && circuit_equal(&f.circuit, &rc->c) &&
                       !memcmp(f.units, rc->units, sizeof(circuit_unit) * (size_t)rc->n);
            if (!same) r = ep_fail(err, "%s: its scores were taken in another circuit than round %d's (prune_using_imp_scores[%d])", p->files[rc->r], rc->r, rc->r);
            for (int i = 0; i < rc->n && r == 0; i++) scores[i] = f.scores[i];
            res.method = !strcmp(f.method, "exact") ? "exact" : !strcmp(f.method, "eap-ig") ? "eap-ig" : "attribution";
            res.ig_steps = f.ig_steps;
            prune_round_free(&f);
        }
    } else if (r == 0) {
        // exact: C-without-u's metrics in columns 0..2 of the sums; attribution: the column after them;
        // eap-ig: the last
        double *ex = ep_calloc((size_t)rc->n * 3 + 1, sizeof(double));
        for (int u = 0; u < rc->n; u++) {
            for (int k = 0; k < 3 * rc->exact; k++) ex[(size_t)u * 3 + k] = sums[(size_t)u * w + k];
            if (rc->attribution) ats[u] = sums[(size_t)u * w + 3 * rc->exact] / P;
            if (rc->eap_ig) igs[u] = sums[(size_t)u * w + 3 * rc->exact + rc->attribution] / P;
        }
        if (rc->exact) score_exact_finish(ex, base, rc->n, P * p->score_donors, exs, NULL, NULL);
        res.method = rc->method == 1 ? "exact" : rc->method == 3 ? "eap-ig" : "attribution";
        res.ig_steps = rc->method == 3 ? p->ig_steps : 0;
        memcpy(scores, rc->method == 1 ? exs : rc->method == 3 ? igs : ats, sizeof(double) * (size_t)rc->n);
        if (rc->exact && rc->attribution) {
            // The other method's scores: exact's (attribution's, in an exact-led round); the agreement is
            // always attribution's with exact, and EAP-IG's beside it in an eap-ig round.
            res.compare_method = rc->method == 1 ? "attribution" : "exact";
            res.compare_scores = rc->method == 1 ? ats : exs;
            compare_ranks(exs, ats, rc->n, keep_count(p, rc->r, rc->n), res.agreement);
            if (rc->eap_ig) {
                res.attribution_scores = ats;
                res.has_ig_agreement = 1;
                compare_ranks(exs, igs, rc->n, keep_count(p, rc->r, rc->n), res.ig_agreement);
            }
        }
        free(ex);
    }
    // exact scores sum C's metrics over the scoring donors: the circuit row is their mean
    double nb = rc->exact ? (double)P * p->score_donors : P;
    res.m_circuit = (circuit_metrics){base[0] / nb, base[1] / nb, base[2] / nb};
    if (r == 0 && env->kh.after == env->computed && !strcmp(env->kh.where, "mid")) raise(SIGKILL);
    if (r == 0 && !env->have_clean && (r = circuit_measure(in, NULL, &env->clean, err)) == 0) env->have_clean = 1;
    res.m_clean = env->clean;
    if (r == 0 && !res.pruned) {
        res.m_kept = res.m_circuit;
        res.stop = "scores_only";
    } else if (r == 0) {
        int k = keep_count(p, rc->r, rc->n);
        int *order = ep_malloc(sizeof(int) * (size_t)(rc->n + 1));
        rank_order(res.scores, rc->n, order);
        for (int i = k; i < rc->n; i++) circuit_set(&kept, rc->kind, &rc->units[order[i]], 0);
        free(order);
        r = circuit_measure(in, &kept, &res.m_kept, err);
        double faith = env->clean.logit_diff != 0 ? res.m_kept.logit_diff / env->clean.logit_diff : NAN;
        if (p->min_faithfulness > 0 && !(faith >= p->min_faithfulness)) res.stop = "min_faithfulness";
        else if (k <= p->min_units) res.stop = "min_units";
        else if (rc->r == env->n_rounds - 1) res.stop = "rounds";
    }
    // A tensor-parallel follower only joined the passes above.
    if (r == 0 && !ws->follower) r = prune_round_write(rc->path, rc->identity, rc->r, &rc->c, &kept, &res,
                                      env->kh.after == env->computed && !strcmp(env->kh.where, "write"), err);
    if (r == 0 && !ws->follower) {
        env->computed++;
        int nk = 0;
        for (int i = 0; i < rc->n; i++) nk += circuit_has(&kept, rc->kind, &rc->units[i]);
        ep_log_result(ws->log, "prune: round %d (%s units, %s): %d scored, %d kept, faithfulness %.4f%s%s", rc->r,
                      unit_kind_name(rc->kind), res.method, rc->n, nk,
                      env->clean.logit_diff != 0 ? res.m_kept.logit_diff / env->clean.logit_diff : NAN,
                      res.stop[0] ? ", stop: " : "", res.stop);
        if (res.compare_scores)
            ep_log_result(ws->log, "prune: round %d rank agreement, attribution vs exact: Spearman %.3f (with |exact| %.3f), "
                          "top-%d overlap %d", rc->r, res.agreement[0], res.agreement[1], (int)res.agreement[3],
                          (int)res.agreement[2]);
        if (res.has_ig_agreement)
            ep_log_result(ws->log, "prune: round %d rank agreement, eap-ig vs exact: Spearman %.3f (with |exact| %.3f), "
                          "top-%d overlap %d", rc->r, res.ig_agreement[0], res.ig_agreement[1], (int)res.ig_agreement[3],
                          (int)res.ig_agreement[2]);
        r = prune_logs_write(in->cfg->output_path, rc->r + 1, err);
    }
    circuit_free(&kept);
    free(scores), free(exs), free(ats), free(igs), free(sums);
    return r;
}

static void round_release(work_stage *ws) {
    round_ctx *rc = ws->ctx;
    if (!rc) return;
    circuit_free(&rc->c);
    plan_free(&rc->plan);
    free(rc->units);
    free(rc);
    ws->ctx = NULL;
}

int prune_round_stage(prune_env *env, int r, const circuit *c, const char *path, const char *identity, int current,
                      work_stage *ws, ep_error *err) {
    const stage_inputs *in = env->in;
    const prune_params *p = &env->p;
    round_ctx *rc = ep_calloc(1, sizeof *rc);
    rc->env = env, rc->r = r, rc->current = current;
    snprintf(rc->identity, sizeof rc->identity, "%s", identity);
    snprintf(rc->path, sizeof rc->path, "%s", path);
    snprintf(rc->dir, sizeof rc->dir, "%s/prune.d/round-%03d.d", in->cfg->output_path, r);
    int total = p->head_rounds + p->edge_rounds;
    rc->kind = r < p->head_rounds || total == 0 ? UNIT_HEAD : UNIT_EDGE;
    circuit_copy(c, &rc->c);
    if (rc->kind == UNIT_EDGE && !rc->c.edges) circuit_start_edges(&rc->c, &in->prompts);
    rc->n = circuit_units(&rc->c, rc->kind, &rc->units);
    rc->method = r < p->n_files ? 2 : !strcmp(p->importance, "exact") ? 1 : !strcmp(p->importance, "eap-ig") ? 3 : 0;
    rc->exact = rc->method == 1 || ((rc->method == 0 || rc->method == 3) && p->compare);
    rc->attribution = rc->method == 0 || ((rc->method == 1 || rc->method == 3) && p->compare);
    rc->eap_ig = rc->method == 3;
    rc->width = 3 * rc->exact + rc->attribution + rc->eap_ig + (rc->method == 2);
    rc->group = rc->exact && rc->n > 0 ? p->exact_units_per_item : rc->n > 0 ? rc->n : 1;
    rc->n_groups = rc->n > 0 ? (rc->n + rc->group - 1) / rc->group : 1;
    int rv = rc->n == 0 ? ep_fail(err, "prune round %d: the circuit has no %s units left to score", r, unit_kind_name(rc->kind))
                        : circuit_plan(&rc->c, &in->m.cfg, &in->plan, &rc->plan, err);
    *ws = (work_stage){.name = "prune", .n_items = stage_n_items(in) * rc->n_groups, .ctx = rc, .log = in->log,
                       .prepare = round_prepare,
                       .item_done = round_item_done, .run_item = round_run_item, .finish = round_finish,
                       .release = round_release};
    if (rv) {  // a failed circuit_plan leaves rc->plan empty
        round_release(ws);
        return -1;
    }
    return 0;
}
