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

// One plan's prompt pass over prompts first.. of a batch (donors computed on the spot), its logit figures at
// the last position added to sums[3] as add_metrics adds them (the same bytes: metrics_first_token is
// logit_metrics on the host). The last logits are reduced where the pass ran (patch_outputs.row_metrics):
// a device backend copies back the figures, not [S][vocab] floats.
static int plan_add_metrics(const stage_inputs *in, const ablation_plan *plan, const prompt_batch *pb, int first,
                            double *sums, ep_error *err) {
    const prompt_set *ps = &in->prompts;
    int S = pb->n_seqs;
    int *targets = ep_malloc(sizeof(int) * (size_t)S);
    logit_row_metrics *rows = ep_malloc(sizeof *rows * (size_t)S);
    for (int i = 0; i < S; i++) targets[i] = ps->targets[(size_t)(first + i) * ps->max_target];
    patch_outputs out = {.row_metrics = rows, .targets = targets};
    int rc = patch_run(&in->dev, in->ops, plan, pb, &out, err);
    for (int i = 0; i < S && rc == 0; i++) {
        prompt_metrics pm = {0};
        metrics_from_row(&rows[i], targets[i], &pm);
        sums[0] += pm.target_logprob, sums[1] += pm.first_token_correct, sums[2] += pm.logit_diff;
    }
    free(targets), free(rows);
    return rc;
}

int circuit_measure_batch(const stage_inputs *in, const ablation_plan *plan, int first, int n, double *sums, ep_error *err) {
    prompt_batch pb = stage_batch(in, first, n);
    return plan_add_metrics(in, plan, &pb, first, sums, err);
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

// The rows removing unit u from the circuit can change (stages/patch.h, patch_rows): its edges' receivers
// or its head's type in its layer (the circuit's other units and the base plan are the same in both
// passes), spread up through the circuit's plan (carry).
void score_unit_rows(unit_kind kind, const circuit_unit *u, const prompt_batch *pb, int n_layers, const patch_carry *carry,
                     patch_rows *r) {
    patch_rows_init(r, pb, n_layers);
    if (kind == UNIT_HEAD) patch_rows_seed_head(r, pb, u->layer, u->type);
    else patch_rows_seed_edges(r, pb, u->layer, 1u << u->sender, 1u << u->receiver, REL_ANY);
    patch_rows_spread(r, pb, carry);
}

// One unit's state in a batch of derived passes: its plan (for its own layer), the rows it changes, and
// its residual stream at those rows (host [T][D], rows of the base pass's packing).
typedef struct {
    ablation_plan plan;
    forward_patch patch;
    patch_rows rows;
    float *x;
} exact_unit;

// Fast exact scores with row reuse (stages/patch.h, "Reuse"; docs/reuse.md): the circuit's pass C is kept
// (cache, residual stream, logits); each unit recomputes, layer by layer from its own, only the rows it
// can change (score_unit_rows), reading C's keys and values everywhere else; the rows of G units go
// through each layer in one model_forward_rows call (one product per weight for all), each unit's runs
// reading its own copy of the layer's keys and values (C's, its changed rows overwritten as it goes).
// Sequences whose last row the unit cannot change keep C's logits.
static int exact_batch_rows(const stage_inputs *in, const circuit *c, const ablation_plan *plan, unit_kind kind,
                            const circuit_unit *units, int n, const prompt_batch *pb, int first, int max_seqs, int plant,
                            double *sums, double *base_sums, ep_error *err) {
    const model *m = &in->dev;
    const kernel_ops *ops = in->ops;
    int S = pb->n_seqs, L = m->cfg.n_layers, D = m->cfg.hidden, V = m->cfg.vocab_size, rc;
    int G_max = max_seqs / S > 1 ? max_seqs / S : 1;
    kv_cache donors[16];
    memset(donors, 0, sizeof donors);
    patch_base base = {0};
    rc = patch_donor_passes(m, ops, plan, pb, donors, err);
    if (rc == 0) rc = patch_base_run(m, ops, plan, pb, donors, 0, &base, err);  // the circuit's pass, kept
    if (rc == 0) add_metrics(in, base.last_logits, first, S, base_sums);
    int T = base.n_rows, cap = base.cache.capacity, KV = base.cache.kv_dim;
    int *t0 = ep_malloc(sizeof(int) * (size_t)S);  // sequence s's first packed row
    for (int s = 0, t = 0; s < S; t += pb->lengths[s], s++) t0[s] = t;
    forward_patch fp = patch_of(plan, pb, donors);
    patch_carry carry = {0};
    patch_carry_init(&carry, plan, pb);
    exact_unit *eu = ep_calloc((size_t)G_max, sizeof *eu);
    for (int g = 0; g < G_max; g++) eu[g].x = ep_calloc(((size_t)T + 1) * D, sizeof(float));
    size_t block = (size_t)S * cap;  // one unit's copy of a layer: rows of KV floats
    float *k = rc == 0 ? ops->alloc(sizeof(float) * (size_t)G_max * block * KV) : NULL;
    float *v = rc == 0 ? ops->alloc(sizeof(float) * (size_t)G_max * block * KV) : NULL;
    float *x = ep_malloc(sizeof(float) * ((size_t)G_max * T + 1) * D);
    float *logits = ep_malloc(sizeof(float) * (size_t)G_max * S * V), *last = ep_malloc(sizeof(float) * (size_t)S * V);
    attn_seq *runs = ep_malloc(sizeof(attn_seq) * ((size_t)G_max * T + 1));
    forward_rows_part *parts = ep_malloc(sizeof(forward_rows_part) * (size_t)G_max);
    for (int c0 = 0; c0 < n && rc == 0; c0 += G_max) {
        int G = c0 + G_max <= n ? G_max : n - c0, l0 = L;
        for (int g = 0; g < G && rc == 0; g++) {
            exact_unit *e = &eu[g];
            score_unit_rows(kind, &units[c0 + g], pb, L, &carry, &e->rows);
            for (int s = 0; plant == EXACT_PLANT_ROW_SHORT && s < S; s++) {  // the planted error: one row short
                const unsigned char *top = e->rows.rows + ((size_t)(L - 1) * S + s) * pb->max_len;
                for (int p = 0; p < pb->lengths[s]; p++)
                    if (top[p]) {
                        for (int l = 0; l < L; l++) e->rows.rows[((size_t)l * S + s) * pb->max_len + p] = 0;
                        break;
                    }
            }
            if (e->rows.first_layer < l0) l0 = e->rows.first_layer;
            rc = unit_plan(in, &m->cfg, c, kind, &units[c0 + g], &e->plan, err);
            if (rc == 0) e->patch = patch_of(&e->plan, pb, donors);
        }
        for (int l = l0; l < L && rc == 0; l++) {
            int n_runs = 0, n_rows = 0;
            for (int g = 0; g < G; g++) {
                exact_unit *e = &eu[g];
                parts[g] = (forward_rows_part){.first_seq = n_runs, .patch = l == e->rows.first_layer ? &e->patch : &fp};
                if (l < e->rows.first_layer) continue;
                int copied = 0;
                for (int s = 0; s < S; s++) {
                    const unsigned char *now = e->rows.rows + ((size_t)l * S + s) * pb->max_len;
                    const unsigned char *below = l > e->rows.first_layer ? now - (size_t)S * pb->max_len : NULL;
                    for (int p = 0; p < pb->lengths[s];) {
                        if (!now[p]) {
                            p++;
                            continue;
                        }
                        if (!copied) {  // this unit's copy of C's keys and values of layer l
                            ops->copy_rows(k + (size_t)g * block * KV, KV, kv_cache_k(&base.cache, l, 0, 0), KV, (int)block, KV);
                            ops->copy_rows(v + (size_t)g * block * KV, KV, kv_cache_v(&base.cache, l, 0, 0), KV, (int)block, KV);
                            copied = 1;
                        }
                        int q = p, other = plant == EXACT_PLANT_OTHER_UNIT && g > 0;  // (the planted error)
                        const float *ex = other ? eu[g - 1].x : e->x;
                        for (; q < pb->lengths[s] && now[q]; q++) {  // the run's rows: the unit's stream, or C's entering l
                            const float *from = below && below[q] ? ex + ((size_t)t0[s] + q) * D
                                                                  : base.resid + ((size_t)l * T + t0[s] + q) * D;
                            memcpy(x + ((size_t)n_rows + q - p) * D, from, sizeof(float) * D);
                        }
                        int kv_g = other ? g - 1 : g;
                        runs[n_runs++] = (attn_seq){.q_row = n_rows, .n_q = q - p, .q_pos = p, .kv_row = (int)((size_t)kv_g * block) + s * cap,
                                                    .types = pb->types + (size_t)s * pb->max_len,
                                                    .index = pb->index + (size_t)s * pb->max_len, .n_typed = pb->lengths[s],
                                                    .donor_row = plan->n_donors > 0 ? s * donors[0].capacity : 0};
                        n_rows += q - p;
                        p = q;
                    }
                }
                parts[g].n_seqs = n_runs - parts[g].first_seq;
            }
            if (n_rows == 0) continue;
            forward_rows fr = {.layer = l, .n_rows = n_rows, .x = x, .seqs = runs, .n_seqs = n_runs, .k = k, .v = v,
                               .n_kv_rows = (int)((size_t)G * block), .parts = parts, .n_parts = G};
            rc = model_forward_rows(m, ops, &fr, err);
            for (int r = 0; r < n_runs && rc == 0; r++) {  // back into each unit's stream
                int g = 0;
                while (g + 1 < G && parts[g + 1].first_seq <= r) g++;
                int s = (runs[r].kv_row % (int)block) / cap;
                memcpy(eu[g].x + ((size_t)t0[s] + runs[r].q_pos) * D, x + (size_t)runs[r].q_row * D,
                       sizeof(float) * (size_t)runs[r].n_q * D);
            }
        }
        // Logits where a unit changes a sequence's last row, in one projection for the G units.
        int n_last = 0;
        for (int g = 0; g < G && rc == 0; g++)
            for (int s = 0; s < S; s++)
                if (eu[g].rows.rows[((size_t)(L - 1) * S + s) * pb->max_len + pb->lengths[s] - 1])
                    memcpy(x + (size_t)n_last++ * D, eu[g].x + ((size_t)t0[s] + pb->lengths[s] - 1) * D, sizeof(float) * D);
        if (rc == 0) rc = model_project_logits(m, ops, x, n_last, logits, err);
        for (int g = 0, r = 0; g < G && rc == 0; g++) {
            memcpy(last, base.last_logits, sizeof(float) * (size_t)S * V);
            for (int s = 0; s < S; s++)
                if (eu[g].rows.rows[((size_t)(L - 1) * S + s) * pb->max_len + pb->lengths[s] - 1])
                    memcpy(last + (size_t)s * V, logits + (size_t)r++ * V, sizeof(float) * V);
            add_metrics(in, last, first, S, sums + (size_t)(c0 + g) * 3);
        }
        for (int g = 0; g < G; g++) {
            patch_rows_free(&eu[g].rows);
            plan_free(&eu[g].plan);
            memset(&eu[g].plan, 0, sizeof eu[g].plan);
        }
    }
    for (int g = 0; g < G_max; g++) free(eu[g].x);
    free(eu), free(x), free(logits), free(last), free(runs), free(parts), free(t0);
    if (k) ops->release(k), ops->release(v);
    patch_carry_free(&carry);
    patch_base_free(&base);
    free_donors(donors);
    return rc;
}

// Brute force over one batch: one full patch_run per unit.
static int exact_batch_full(const stage_inputs *in, const circuit *c, const ablation_plan *plan, unit_kind kind,
                            const circuit_unit *units, int n, const prompt_batch *pb, int first, double *sums,
                            double *base_sums, ep_error *err) {
    int rc = plan_add_metrics(in, plan, pb, first, base_sums, err);
    for (int u = 0; u < n && rc == 0; u++) {
        ablation_plan pu;
        rc = unit_plan(in, &in->m.cfg, c, kind, &units[u], &pu, err);
        if (rc) break;
        rc = plan_add_metrics(in, &pu, pb, first, sums + (size_t)u * 3, err);
        plan_free(&pu);
    }
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
            pj.mean_donors = 0;  // a mean donor moves with its index
            for (int d = 0; d < K && d < 32; d++)
                if ((pb.mean_donors >> ((d + j) % K)) & 1u) pj.mean_donors |= 1u << d;
        }
        // Donors d > 0 are computed under the plan's donor-0 part, which removing a unit changes: those
        // plans take the brute-force path.
        rc = o->prefix_reuse == EXACT_ROW_PREFIX && plan->n_donors <= 1
                 ? exact_batch_rows(in, c, plan, kind, units, n, &pj, first, o->max_seqs, in->exact_plant, sums, base, err)
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
