#include "score.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline/backward.h"
#include "stages/metrics.h"
#include "stages/prompts.h"

// The patch a plan applies to a batch, reading donors.
static forward_patch patch_of(const ablation_plan *plan, const prompt_batch *pb, kv_cache *donors) {
    forward_patch p = {.layer_rules = plan->layer_rules, .head_units = plan->head_units,
                       .n_head_units = plan->n_head_units, .n_donors = plan->n_donors, .types = pb->types,
                       .index = pb->index, .type_stride = pb->max_len, .n_typed = pb->lengths};
    for (int d = 0; d < plan->n_donors; d++) p.donors[d] = &donors[d];
    return p;
}

static void free_donors(kv_cache *donors) {
    for (int d = 0; d < 16; d++) kv_cache_free(&donors[d]);
}

// Adds prompt first+i's logit figures to sums[3] (log-prob, first-token correct, logit diff).
static void add_metrics(const stage_inputs *in, const float *last, int first, int n, double *sums) {
    const prompt_set *ps = &in->prompts;
    int V = in->m.cfg.vocab_size;
    for (int i = 0; i < n; i++) {
        prompt_metrics pm;
        metrics_first_token(last + (size_t)i * V, V, ps->targets[(size_t)(first + i) * ps->max_target], &pm);
        sums[0] += pm.target_logprob, sums[1] += pm.first_token_correct, sums[2] += pm.logit_diff;
    }
}

static void metrics_of(const double *sums, int P, circuit_metrics *m) {
    m->target_logprob = sums[0] / P, m->first_token_accuracy = sums[1] / P, m->logit_diff = sums[2] / P;
}

int score_check_targets(const stage_inputs *in, ep_error *err) {
    const prompt_set *ps = &in->prompts;
    for (int p = 0; p < ps->n_prompts; p++) {
        int t0 = ps->target_lengths[p] > 0 ? ps->targets[(size_t)p * ps->max_target] : -1;
        if (t0 < 0 || t0 >= in->m.cfg.vocab_size) return ep_fail(err, "prompts.h5: prompt %d has no usable target", p);
    }
    return 0;
}

// One plan's prompt pass over a batch (donors computed on the spot): last-position logits.
static int plan_last_logits(const stage_inputs *in, const ablation_plan *plan, const prompt_batch *pb, float *last,
                            ep_error *err) {
    patch_outputs out = {.last_logits = last};
    return patch_run(&in->dev, in->ops, plan, pb, &out, err);
}

int circuit_measure_batch(const stage_inputs *in, const ablation_plan *plan, int first, int n, double *sums, ep_error *err) {
    float *last = ep_malloc(sizeof(float) * (size_t)n * in->m.cfg.vocab_size);
    prompt_batch pb = stage_batch(in, first, n);
    int rc = plan_last_logits(in, plan, &pb, last, err);
    if (rc == 0) add_metrics(in, last, first, n, sums);
    free(last);
    return rc;
}

int circuit_measure(const stage_inputs *in, const circuit *c, circuit_metrics *out, ep_error *err) {
    if (score_check_targets(in, err)) return -1;
    ablation_plan plan;
    if (c ? circuit_plan(c, &in->m.cfg, &in->plan, &plan, err) : (plan_empty(&in->m.cfg, &plan), 0)) return -1;
    int P = in->prompts.n_prompts, B = in->cfg->batch_size, rc = 0;
    double sums[3] = {0};
    for (int first = 0; first < P && rc == 0; first += B) rc = circuit_measure_batch(in, &plan, first, first + B <= P ? B : P - first, sums, err);
    plan_free(&plan);
    if (rc == 0) metrics_of(sums, P, out);
    return rc;
}

// sum[u] += the batch's sum over its prompts of |signed[u][s]| (as the batch's mean times S, the order
// attribution always summed in).
static void add_abs(const double *signed_sum, int n, int S, double *sum) {
    for (int u = 0; sum && u < n; u++) {
        double mean = 0;
        for (int s = 0; s < S; s++) mean += fabs(signed_sum[(size_t)u * S + s]) / S;
        sum[u] += mean * S;
    }
}

int score_gradient_batch(const stage_inputs *in, const ablation_plan *plan, unit_kind kind, const circuit_unit *units,
                         int n, int ig_steps, int first, int S, double *sum, double *sum_ig, ep_error *err) {
    const prompt_set *ps = &in->prompts;
    int T = 0, rc;
    head_unit *hu = ep_calloc((size_t)n + 1, sizeof *hu);
    edge_unit *eu = ep_calloc((size_t)n + 1, sizeof *eu);
    for (int u = 0; u < n; u++) {
        hu[u] = (head_unit){units[u].layer, units[u].head, units[u].type, 0};
        // an edge unit's attribution is the first-order effect of the intervention the circuit ablates with
        eu[u] = (edge_unit){units[u].layer, units[u].head, units[u].sender, units[u].receiver, 0, plan->circuit_source};
    }
    prompt_batch pb = stage_batch(in, first, S);
    int *len = ep_malloc(sizeof(int) * (size_t)S), *n_target = ep_malloc(sizeof(int) * (size_t)S);
    for (int s = 0; s < S; s++) {
        n_target[s] = ps->target_lengths[first + s];
        len[s] = pb.lengths[s] + n_target[s];
        T += len[s];
    }
    // The clean tokens and, for EAP-IG's path, donor 0's (token-aligned; the targets repeat the clean ones).
    int *tokens = ep_malloc(sizeof(int) * (size_t)T), *donor_tokens = ep_malloc(sizeof(int) * (size_t)T);
    for (int s = 0, r = 0; s < S; s++) {
        const int32_t *dt = pb.n_donors > 0 ? pb.donors + (size_t)s * pb.n_donors * pb.max_len : NULL;
        for (int i = 0; i < pb.lengths[s]; i++, r++) {
            tokens[r] = pb.tokens[(size_t)s * pb.max_len + i];
            donor_tokens[r] = dt ? dt[i] : tokens[r];
        }
        for (int i = 0; i < n_target[s]; i++, r++)
            donor_tokens[r] = tokens[r] = ps->targets[(size_t)(first + s) * ps->max_target + i];
    }
    double *plain = ep_calloc((size_t)n * S + 1, sizeof(double)), *ig = ep_calloc((size_t)n * S + 1, sizeof(double));
    kv_cache donors[16];
    memset(donors, 0, sizeof donors);
    rc = sum_ig && pb.n_donors < 1 ? ep_fail(err, "eap-ig: the prompts carry no donor") : 0;
    if (rc == 0) rc = patch_donor_passes(&in->dev, in->ops, plan, &pb, donors, err);
    if (rc == 0) {
        forward_patch fp = patch_of(plan, &pb, donors);
        grad_batch gb = {.n_seqs = S, .len = len, .n_target = n_target, .tokens = tokens};
        int head = kind == UNIT_HEAD;
        grad_ig_request r = {.steps = sum_ig ? ig_steps : 1, .donor_tokens = donor_tokens,
                             .heads = head ? hu : NULL, .n_heads = head ? n : 0, .edges = head ? NULL : eu,
                             .n_edges = head ? 0 : n, .head_sums = head ? ig : NULL, .edge_sums = head ? NULL : ig,
                             .head_plain = head ? plain : NULL, .edge_plain = head ? NULL : plain};
        rc = grad_ig_sums(in->ops, &in->dev, &gb, &fp, &r, err);
        if (rc == 0) add_abs(plain, n, S, sum), add_abs(ig, n, S, sum_ig);
    }
    free_donors(donors);
    free(len), free(n_target), free(tokens), free(donor_tokens), free(hu), free(eu), free(plain), free(ig);
    return rc;
}

int score_attribution_batch(const stage_inputs *in, const ablation_plan *plan, unit_kind kind, const circuit_unit *units,
                            int n, int first, int S, double *sum, ep_error *err) {
    return score_gradient_batch(in, plan, kind, units, n, 1, first, S, sum, NULL, err);
}

int score_attribution(const stage_inputs *in, const circuit *c, unit_kind kind, const circuit_unit *units, int n,
                      double *score, ep_error *err) {
    return score_eap_ig(in, c, kind, units, n, 0, score, NULL, err);
}

int score_eap_ig(const stage_inputs *in, const circuit *c, unit_kind kind, const circuit_unit *units, int n,
                 int ig_steps, double *score, double *score_ig, ep_error *err) {
    if (score_check_targets(in, err)) return -1;
    if (score_ig && ig_steps < 1) return ep_fail(err, "eap-ig: ig_steps %d (need at least 1)", ig_steps);
    ablation_plan plan;
    if (circuit_plan(c, &in->m.cfg, &in->plan, &plan, err)) return -1;
    int P = in->prompts.n_prompts, B = in->cfg->batch_size, rc = 0;
    for (int u = 0; u < n; u++) {
        if (score) score[u] = 0;
        if (score_ig) score_ig[u] = 0;
    }
    for (int first = 0; first < P && rc == 0; first += B)
        rc = score_gradient_batch(in, &plan, kind, units, n, ig_steps, first, first + B <= P ? B : P - first, score,
                                  score_ig, err);
    for (int u = 0; u < n; u++) {
        if (score) score[u] /= P;
        if (score_ig) score_ig[u] /= P;
    }
    plan_free(&plan);
    return rc;
}

// A copy of kv caches' sequences, G times over (sequence g * S + s is sequence s), in ops' memory as src.
static void replicate_cache(const kernel_ops *ops, const kv_cache *src, int G, kv_cache *dst, const model_config *cfg) {
    ep_error e;
    kv_cache_init_backend(dst, cfg, src->n_seqs * G, src->capacity, src->z != NULL, ops, &e);
    int rows = src->n_seqs * src->capacity;  // a layer's block, as rows of kv_dim (z_dim) floats
    size_t kv = (size_t)rows * src->kv_dim, z = (size_t)rows * src->z_dim;
    for (int l = 0; l < src->n_layers; l++)
        for (int g = 0; g < G; g++) {
            ops->copy_rows(dst->k + ((size_t)l * G + g) * kv, src->kv_dim, src->k + (size_t)l * kv, src->kv_dim, rows,
                           src->kv_dim);
            ops->copy_rows(dst->v + ((size_t)l * G + g) * kv, src->kv_dim, src->v + (size_t)l * kv, src->kv_dim, rows,
                           src->kv_dim);
            if (src->z)
                ops->copy_rows(dst->z + ((size_t)l * G + g) * z, src->z_dim, src->z + (size_t)l * z, src->z_dim, rows,
                               src->z_dim);
        }
    for (int g = 0; g < G; g++) memcpy(dst->len + (size_t)g * src->n_seqs, src->len, sizeof(int) * (size_t)src->n_seqs);
}

// The batch's per-sequence arrays, G times over.
typedef struct {
    int32_t *types, *index, *lengths;
    int *tokens, *last_rows;
    kv_cache donors[16];
} replicated;

static void replicate(const stage_inputs *in, const ablation_plan *plan, const prompt_batch *pb, const kv_cache *donors,
                      const int *tokens, int T, int G, replicated *r) {
    int S = pb->n_seqs, L = pb->max_len;
    memset(r, 0, sizeof *r);
    r->types = ep_malloc(sizeof(int32_t) * (size_t)G * S * L);
    r->index = ep_malloc(sizeof(int32_t) * (size_t)G * S * L);
    r->lengths = ep_malloc(sizeof(int32_t) * (size_t)G * S);
    r->tokens = ep_malloc(sizeof(int) * (size_t)G * T);
    r->last_rows = ep_malloc(sizeof(int) * (size_t)G * S);
    for (int g = 0; g < G; g++) {
        memcpy(r->types + (size_t)g * S * L, pb->types, sizeof(int32_t) * (size_t)S * L);
        memcpy(r->index + (size_t)g * S * L, pb->index, sizeof(int32_t) * (size_t)S * L);
        memcpy(r->lengths + (size_t)g * S, pb->lengths, sizeof(int32_t) * (size_t)S);
        memcpy(r->tokens + (size_t)g * T, tokens, sizeof(int) * (size_t)T);
    }
    for (int s = 0, row = 0; s < G * S; s++) {
        row += r->lengths[s];
        r->last_rows[s] = row - 1;
    }
    for (int d = 0; d < plan->n_donors; d++) replicate_cache(in->ops, &donors[d], G, &r->donors[d], &in->dev.cfg);
}

static void replicated_free(replicated *r) {
    free(r->types), free(r->index), free(r->lengths), free(r->tokens), free(r->last_rows);
    free_donors(r->donors);
}

// The plan of circuit c with unit u ablated (on top of the run's plan): what an exact score compares with c.
static int unit_plan(const stage_inputs *in, const model_config *cfg, const circuit *c, unit_kind kind,
                     const circuit_unit *u, ablation_plan *out, ep_error *err) {
    circuit cu;
    circuit_copy(c, &cu);
    circuit_set(&cu, kind, u, 0);
    int rc = circuit_plan(&cu, cfg, &in->plan, out, err);
    circuit_free(&cu);
    return rc;
}

// Fast exact scores over one batch: sums[u][3] += the batch's metric sums for C without unit u.
static int exact_batch_fast(const stage_inputs *in, const circuit *c, const ablation_plan *plan, unit_kind kind,
                            const circuit_unit *units, int n, const prompt_batch *pb, int first, int max_seqs,
                            double *sums, double *base_sums, ep_error *err) {
    const model *m = &in->dev;
    const kernel_ops *ops = in->ops;
    int S = pb->n_seqs, L = m->cfg.n_layers, D = m->cfg.hidden, V = m->cfg.vocab_size, T = 0, rc;
    for (int s = 0; s < S; s++) T += pb->lengths[s];
    int G_max = max_seqs / S > 1 ? max_seqs / S : 1;
    int *tokens = ep_malloc(sizeof(int) * (size_t)T), *last_rows = ep_malloc(sizeof(int) * (size_t)S);
    for (int s = 0, r = 0; s < S; s++) {
        for (int i = 0; i < pb->lengths[s]; i++) tokens[r++] = pb->tokens[(size_t)s * pb->max_len + i];
        last_rows[s] = r - 1;
    }
    kv_cache donors[16], cache;
    memset(donors, 0, sizeof donors);
    float *resid = ep_malloc(sizeof(float) * (size_t)(L + 1) * T * D);
    float *xs = ep_malloc(sizeof(float) * (size_t)G_max * T * D);
    float *last = ep_malloc(sizeof(float) * (size_t)G_max * S * V);
    rc = patch_donor_passes(m, ops, plan, pb, donors, err);
    forward_patch fp = patch_of(plan, pb, donors);
    // The circuit's own pass, residual stream kept.
    if (rc == 0 && (rc = kv_cache_init_backend(&cache, &m->cfg, S, pb->max_len, 0, ops, err)) == 0) {
        forward_batch b = {.n_seqs = S, .n_new = pb->lengths, .tokens = tokens, .n_logit_rows = S, .logit_rows = last_rows,
                           .logits = last, .resid = resid};
        rc = model_forward(m, ops, &cache, &b, &fp, err);
        kv_cache_free(&cache);
        if (rc == 0) add_metrics(in, last, first, S, base_sums);
    }
    int *idx = ep_malloc(sizeof(int) * (size_t)(n + 1));
    replicated rep = {0};
    int rep_G = 0;
    for (int l = 0; l < L && rc == 0; l++) {
        int k = 0;
        for (int u = 0; u < n; u++)
            if (units[u].layer == l) idx[k++] = u;
        for (int c0 = 0; c0 < k && rc == 0; c0 += G_max) {
            int G = c0 + G_max <= k ? G_max : k - c0;
            // Layer l alone, from the stored stream, under each unit's plan.
            for (int g = 0; g < G && rc == 0; g++) {
                ablation_plan pu;
                rc = unit_plan(in, &m->cfg, c, kind, &units[idx[c0 + g]], &pu, err);
                if (rc) break;
                forward_patch fu = patch_of(&pu, pb, donors);
                if ((rc = kv_cache_init_backend(&cache, &m->cfg, S, pb->max_len, 0, ops, err)) == 0) {
                    forward_batch b = {.n_seqs = S, .n_new = pb->lengths, .tokens = tokens, .first_layer = l,
                                       .end_layer = l + 1, .x_in = resid + (size_t)l * T * D, .x_out = xs + (size_t)g * T * D};
                    rc = model_forward(m, ops, &cache, &b, &fu, err);
                    kv_cache_free(&cache);
                }
                plan_free(&pu);
            }
            if (rc) break;
            // The layers above under the circuit's plan (the same for every unit of layer l), G units at once.
            forward_patch fa = fp;
            const int32_t *lengths = pb->lengths;
            const int *toks = tokens, *rows = last_rows;
            if (G > 1) {
                if (rep_G != G) {
                    replicated_free(&rep);
                    replicate(in, plan, pb, donors, tokens, T, G, &rep);
                    rep_G = G;
                }
                fa.types = rep.types, fa.index = rep.index, fa.n_typed = rep.lengths;
                for (int d = 0; d < plan->n_donors; d++) fa.donors[d] = &rep.donors[d];
                lengths = rep.lengths, toks = rep.tokens, rows = rep.last_rows;
            }
            if ((rc = kv_cache_init_backend(&cache, &m->cfg, G * S, pb->max_len, 0, ops, err)) == 0) {
                forward_batch b = {.n_seqs = G * S, .n_new = lengths, .tokens = toks, .n_logit_rows = G * S,
                                   .logit_rows = rows, .logits = last, .first_layer = l + 1, .x_in = xs};
                rc = model_forward(m, ops, &cache, &b, &fa, err);
                kv_cache_free(&cache);
            }
            for (int g = 0; g < G && rc == 0; g++) add_metrics(in, last + (size_t)g * S * V, first, S, sums + (size_t)idx[c0 + g] * 3);
        }
    }
    if (rep_G) replicated_free(&rep);
    free(idx), free(resid), free(xs), free(last), free(tokens), free(last_rows);
    free_donors(donors);
    return rc;
}

// What removing unit u from the circuit changes: its edges or its head output, in its layer (the
// circuit's other units and the base plan are the same in both passes).
static void unit_reach(unit_kind kind, const circuit_unit *u, const prompt_batch *pb, int n_layers, patch_reach *r) {
    patch_reach_init(r, pb, n_layers);
    if (kind == UNIT_HEAD) patch_reach_add_head(r, pb, u->layer, u->type);
    else patch_reach_add_edges(r, pb, u->layer, 1u << u->sender, 1u << u->receiver, REL_ANY);
}

// Packed rows [start[s], lengths[s]) of every sequence of a batch from a [T][D] block of rows, appended at
// dst (host); returns the rows appended.
static int gather_suffix(float *dst, const float *src, const prompt_batch *pb, const int *start, int D) {
    int n = 0;
    for (int s = 0, t = 0; s < pb->n_seqs; t += pb->lengths[s], s++) {
        int k = pb->lengths[s] - start[s];
        if (k > 0) memcpy(dst + (size_t)n * D, src + ((size_t)t + start[s]) * D, sizeof(float) * (size_t)k * D);
        n += k;
    }
    return n;
}

// Fast exact scores with row reuse as well (stages/patch.h, "Reuse"; docs/reuse.md): as exact_batch_fast,
// but each unit's passes start at the first row its unit reaches in each sequence (keys and values before
// it, and the logits of sequences it does not reach, are the circuit pass's), and the layers above run for
// G units' row suffixes in one pass.
static int exact_batch_rows(const stage_inputs *in, const circuit *c, const ablation_plan *plan, unit_kind kind,
                            const circuit_unit *units, int n, const prompt_batch *pb, int first, int max_seqs,
                            double *sums, double *base_sums, ep_error *err) {
    const model *m = &in->dev;
    const kernel_ops *ops = in->ops;
    int S = pb->n_seqs, L = m->cfg.n_layers, D = m->cfg.hidden, V = m->cfg.vocab_size, rc;
    int G_max = max_seqs / S > 1 ? max_seqs / S : 1;
    kv_cache donors[16], one = {0}, many = {0};
    memset(donors, 0, sizeof donors);
    patch_base base = {0};
    rc = patch_donor_passes(m, ops, plan, pb, donors, err);
    if (rc == 0) rc = patch_base_run(m, ops, plan, pb, donors, 0, &base, err);  // the circuit's pass, kept
    if (rc == 0) add_metrics(in, base.last_logits, first, S, base_sums);
    int T = base.n_rows;
    forward_patch fp = patch_of(plan, pb, donors);
    float *xs = ep_malloc(sizeof(float) * ((size_t)G_max * T + 1) * D), *x_in = ep_malloc(sizeof(float) * ((size_t)T + 1) * D);
    float *logits = ep_malloc(sizeof(float) * (size_t)G_max * S * V);
    int *idx = ep_malloc(sizeof(int) * (size_t)(n + 1)), *start = ep_malloc(sizeof(int) * (size_t)G_max * S);
    int *n_new = ep_malloc(sizeof(int) * (size_t)G_max * S), *tokens = ep_malloc(sizeof(int) * ((size_t)G_max * T + 1));
    int *rows = ep_malloc(sizeof(int) * (size_t)G_max * S), *row_seq = ep_malloc(sizeof(int) * (size_t)G_max * S);
    if (rc == 0) rc = kv_cache_init_backend(&one, &m->cfg, S, pb->max_len, 0, ops, err);
    replicated rep = {0};
    int rep_G = 0;
    for (int l = 0; l < L && rc == 0; l++) {
        int k = 0;
        for (int u = 0; u < n; u++)
            if (units[u].layer == l) idx[k++] = u;
        for (int c0 = 0; c0 < k && rc == 0; c0 += G_max) {
            int G = c0 + G_max <= k ? G_max : k - c0, n_x = 0;
            // Layer l alone, from the stored stream, under each unit's plan, on the rows it reaches.
            for (int g = 0; g < G && rc == 0; g++) {
                patch_reach r;
                unit_reach(kind, &units[idx[c0 + g]], pb, L, &r);
                int *st = start + (size_t)g * S, T_g = 0;
                for (int s = 0; s < S; s++) {
                    st[s] = r.first_layer == l ? r.first_row[s] : pb->lengths[s];
                    n_new[g * S + s] = pb->lengths[s] - st[s];
                    T_g += n_new[g * S + s];
                }
                patch_reach_free(&r);
                if (T_g == 0) continue;
                ablation_plan pu;
                rc = unit_plan(in, &m->cfg, c, kind, &units[idx[c0 + g]], &pu, err);
                if (rc) break;
                forward_patch fu = patch_of(&pu, pb, donors);
                gather_suffix(x_in, base.resid + (size_t)l * T * D, pb, st, D);
                rc = kv_cache_copy_seqs(&one, 0, &base.cache, st, st, l, l + 1, err);
                if (rc == 0) {
                    int *tok = tokens + n_x;
                    for (int s = 0, t = 0; s < S; s++)
                        for (int i = st[s]; i < pb->lengths[s]; i++) tok[t++] = pb->tokens[(size_t)s * pb->max_len + i];
                    forward_batch b = {.n_seqs = S, .n_new = n_new + (size_t)g * S, .tokens = tok, .first_layer = l,
                                       .end_layer = l + 1, .x_in = x_in, .x_out = xs + (size_t)n_x * D};
                    rc = model_forward(m, ops, &one, &b, &fu, err);
                }
                plan_free(&pu);
                n_x += T_g;
            }
            if (rc) break;
            // The layers above under the circuit's plan (the same for every unit of layer l): the G units'
            // row suffixes in one pass over a cache holding the circuit pass's rows before each suffix.
            forward_patch fa = fp;
            if (G > 1) {
                if (rep_G != G) {
                    if (rep_G) replicated_free(&rep);
                    replicate(in, plan, pb, donors, pb->tokens, 0, G, &rep);
                    rep_G = G;
                }
                fa.types = rep.types, fa.index = rep.index, fa.n_typed = rep.lengths;
                for (int d = 0; d < plan->n_donors; d++) fa.donors[d] = &rep.donors[d];
            }
            if (many.n_seqs != G * S) {
                if (many.len) kv_cache_free(&many);
                if ((rc = kv_cache_init_backend(&many, &m->cfg, G * S, pb->max_len, 0, ops, err))) break;
            }
            int n_rows = 0;
            for (int g = 0; g < G && rc == 0; g++) {
                rc = kv_cache_copy_seqs(&many, g * S, &base.cache, start + (size_t)g * S, start + (size_t)g * S, l + 1, L, err);
                for (int s = 0, t = 0; s < S; s++) {
                    t += n_new[g * S + s];
                    if (n_new[g * S + s] > 0) row_seq[n_rows] = g * S + s, rows[n_rows++] = t - 1;
                }
            }
            // rows are per unit: make them packed rows of the whole pass
            for (int g = 0, off = 0, r = 0; g < G; g++) {
                int T_g = 0;
                for (int s = 0; s < S; s++) T_g += n_new[g * S + s];
                for (; r < n_rows && row_seq[r] < (g + 1) * S; r++) rows[r] += off;
                off += T_g;
            }
            if (rc == 0 && n_x > 0) {
                int *toks = tokens;  // the units' suffix tokens, in pass order (filled above)
                forward_batch b = {.n_seqs = G * S, .n_new = n_new, .tokens = toks, .n_logit_rows = n_rows,
                                   .logit_rows = rows, .logits = logits, .first_layer = l + 1, .x_in = xs};
                rc = model_forward(m, ops, &many, &b, &fa, err);
            }
            for (int g = 0; g < G && rc == 0; g++) {
                float *last = ep_malloc(sizeof(float) * (size_t)S * V);
                memcpy(last, base.last_logits, sizeof(float) * (size_t)S * V);
                for (int r = 0; r < n_rows; r++)
                    if (row_seq[r] / S == g) memcpy(last + (size_t)(row_seq[r] % S) * V, logits + (size_t)r * V, sizeof(float) * V);
                add_metrics(in, last, first, S, sums + (size_t)idx[c0 + g] * 3);
                free(last);
            }
        }
    }
    if (rep_G) replicated_free(&rep);
    if (one.len) kv_cache_free(&one);
    if (many.len) kv_cache_free(&many);
    free(xs), free(x_in), free(logits), free(idx), free(start), free(n_new), free(tokens), free(rows), free(row_seq);
    patch_base_free(&base);
    free_donors(donors);
    return rc;
}

// Brute force over one batch: one full patch_run per unit.
static int exact_batch_full(const stage_inputs *in, const circuit *c, const ablation_plan *plan, unit_kind kind,
                            const circuit_unit *units, int n, const prompt_batch *pb, int first, double *sums,
                            double *base_sums, ep_error *err) {
    int S = pb->n_seqs, V = in->m.cfg.vocab_size;
    float *last = ep_malloc(sizeof(float) * (size_t)S * V);
    int rc = plan_last_logits(in, plan, pb, last, err);
    if (rc == 0) add_metrics(in, last, first, S, base_sums);
    for (int u = 0; u < n && rc == 0; u++) {
        ablation_plan pu;
        rc = unit_plan(in, &in->m.cfg, c, kind, &units[u], &pu, err);
        if (rc) break;
        rc = plan_last_logits(in, &pu, pb, last, err);
        plan_free(&pu);
        if (rc == 0) add_metrics(in, last, first, S, sums + (size_t)u * 3);
    }
    free(last);
    return rc;
}

static int exact_donors(const exact_opts *o) { return o->n_donors > 1 ? o->n_donors : 1; }

int score_exact_batch(const stage_inputs *in, const circuit *c, const ablation_plan *plan, unit_kind kind,
                      const circuit_unit *units, int n, const exact_opts *o, int first, int S, double *sums, double *base,
                      ep_error *err) {
    prompt_batch pb = stage_batch(in, first, S);
    int J = exact_donors(o), K = pb.n_donors, rc = 0;
    if (J > K) return ep_fail(err, "exact scores: %d donors asked for, the prompts have %d", J, K);
    // Evaluation j: the batch with each prompt's donors rotated by j (plan donor d reads donor (d + j) mod K).
    int32_t *rotated = J > 1 ? ep_malloc(sizeof(int32_t) * (size_t)S * K * pb.max_len) : NULL;
    for (int j = 0; j < J && rc == 0; j++) {
        prompt_batch pj = pb;
        if (j > 0) {
            size_t row = (size_t)pb.max_len;
            for (int s = 0; s < S; s++)
                for (int d = 0; d < K; d++)
                    memcpy(rotated + ((size_t)s * K + d) * row, pb.donors + ((size_t)s * K + (d + j) % K) * row,
                           sizeof(int32_t) * row);
            pj.donors = rotated;
        }
        // Donors d > 0 are computed under the plan's donor-0 part, which removing a unit changes: those
        // plans take the brute-force path.
        rc = o->prefix_reuse == EXACT_ROW_PREFIX && plan->n_donors <= 1
                 ? exact_batch_rows(in, c, plan, kind, units, n, &pj, first, o->max_seqs, sums, base, err)
             : o->prefix_reuse && plan->n_donors <= 1
                 ? exact_batch_fast(in, c, plan, kind, units, n, &pj, first, o->max_seqs, sums, base, err)
                 : exact_batch_full(in, c, plan, kind, units, n, &pj, first, sums, base, err);
    }
    free(rotated);
    return rc;
}

void score_exact_finish(const double *sums, const double *base, int n, int P, double *score, circuit_metrics *without,
                        circuit_metrics *with) {
    circuit_metrics mc;
    metrics_of(base, P, &mc);
    if (with) *with = mc;
    for (int u = 0; u < n; u++) {
        circuit_metrics mu;
        metrics_of(sums + (size_t)u * 3, P, &mu);
        score[u] = mc.target_logprob - mu.target_logprob;
        if (without) without[u] = mu;
    }
}

int score_exact(const stage_inputs *in, const circuit *c, unit_kind kind, const circuit_unit *units, int n,
                const exact_opts *o, double *score, circuit_metrics *without, circuit_metrics *with, ep_error *err) {
    if (score_check_targets(in, err)) return -1;
    for (int u = 0; u < n; u++)
        if (!circuit_has(c, kind, &units[u])) return ep_fail(err, "exact scores: unit %d is not in the circuit", u);
    ablation_plan plan;
    if (circuit_plan(c, &in->m.cfg, &in->plan, &plan, err)) return -1;
    int P = in->prompts.n_prompts, B = in->cfg->batch_size, rc = 0;
    double *sums = ep_calloc((size_t)n * 3 + 1, sizeof(double)), base[3] = {0};
    for (int first = 0; first < P && rc == 0; first += B)
        rc = score_exact_batch(in, c, &plan, kind, units, n, o, first, first + B <= P ? B : P - first, sums, base, err);
    if (rc == 0) score_exact_finish(sums, base, n, P * exact_donors(o), score, without, with);
    free(sums);
    plan_free(&plan);
    return rc;
}
