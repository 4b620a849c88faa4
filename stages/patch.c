#include "patch.h"

#include "stages/mean_donor.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

// Which logits a pass writes (when logits is non-NULL): the last prompt position's, host memory; every
// position's, host memory; the last position's, left in backend memory (logits is ops' memory).
enum { LOGITS_LAST = 0, LOGITS_ALL = 1, LOGITS_LAST_IN_BACKEND = 2 };

// One forward pass over the batch's prompts (donor < 0) or donor `donor`'s tokens, into cache.
static int run_pass(const model *m, const kernel_ops *ops, const prompt_batch *pb, int donor, kv_cache *cache,
                    const forward_patch *patch, float *logits, int logit_mode, const patch_outputs *stats, float *resid,
                    ep_error *err) {
    int all_rows = logit_mode == LOGITS_ALL;
    int T = 0;
    for (int s = 0; s < pb->n_seqs; s++) T += pb->lengths[s];
    int *tokens = ep_malloc(sizeof(int) * (size_t)T), *rows = ep_malloc(sizeof(int) * (size_t)T);
    int n_rows = 0;
    for (int s = 0, t = 0; s < pb->n_seqs; s++) {
        const int32_t *src = donor < 0 ? pb->tokens + (size_t)s * pb->max_len
                                       : pb->donors + ((size_t)s * pb->n_donors + donor) * pb->max_len;
        for (int i = 0; i < pb->lengths[s]; i++, t++) {
            tokens[t] = src[i];
            if (all_rows || i == pb->lengths[s] - 1) rows[n_rows++] = t;
        }
    }
    forward_batch b = {.n_seqs = pb->n_seqs, .n_new = pb->lengths, .tokens = tokens, .n_logit_rows = logits ? n_rows : 0,
                       .logit_rows = rows, .logits = logits, .logits_in_backend = logit_mode == LOGITS_LAST_IN_BACKEND,
                       .resid = resid};
    // The attention at `last`, the prompt's final position (stats: the prompt pass only).
    int *last_rows = NULL;
    forward_attn_stats as;
    if (stats && stats->attn_entropy && stats->attn_mass) {
        last_rows = ep_malloc(sizeof(int) * (size_t)pb->n_seqs);
        for (int s = 0; s < pb->n_seqs; s++) last_rows[s] = pb->lengths[s] - 1;
        as = (forward_attn_stats){.rows = last_rows, .types = pb->types, .index = pb->index, .type_stride = pb->max_len,
                                  .n_typed = pb->lengths, .n_types = PATCH_ATTN_TYPES, .entropy = stats->attn_entropy,
                                  .mass = stats->attn_mass};
        b.attn_stats = &as;
    }
    int rc = model_forward(m, ops, cache, &b, patch, err);
    free(tokens), free(rows), free(last_rows);
    return rc;
}

int patch_donor_passes(const model *m, const kernel_ops *ops, const ablation_plan *plan, const prompt_batch *pb,
                       kv_cache *donors, ep_error *err) {
    if (plan->n_donors > pb->n_donors)
        return ep_fail(err, "plan %s reads donor %d, the prompts have %d donors", plan->name, plan->n_donors - 1,
                       pb->n_donors);
    ablation_plan part0;
    plan_donor0_part(plan, &part0);
    forward_patch nested = {.layer_rules = part0.layer_rules, .head_units = part0.head_units,
                            .n_head_units = part0.n_head_units, .n_donors = 1, .donors = {&donors[0]},
                            .types = pb->types, .index = pb->index, .type_stride = pb->max_len, .n_typed = pb->lengths};
    int rc = 0;
    for (int d = 0; d < plan->n_donors && rc == 0; d++) {
        if ((pb->mean_donors >> d) & 1u) {
            rc = pb->mean ? mean_table_fill(pb->mean, &m->cfg, ops, pb, &donors[d], err)
                          : ep_fail(err, "donor %d is the mean donor, and the run's mean table is not loaded", d);
            continue;
        }
        rc = kv_cache_init_backend(&donors[d], &m->cfg, pb->n_seqs, pb->max_len, 1, ops, err);
        if (rc == 0) rc = run_pass(m, ops, pb, d, &donors[d], d == 0 ? NULL : &nested, NULL, 0, NULL, NULL, err);
    }
    plan_free(&part0);
    return rc;
}

int patch_clean_pass(const model *m, const kernel_ops *ops, const prompt_batch *pb, kv_cache *clean, ep_error *err) {
    if (kv_cache_init_backend(clean, &m->cfg, pb->n_seqs, pb->max_len, 1, ops, err)) return -1;
    return run_pass(m, ops, pb, -1, clean, NULL, NULL, 0, NULL, NULL, err);
}

int patch_prompt_pass(const model *m, const kernel_ops *ops, const ablation_plan *plan, const prompt_batch *pb,
                      const kv_cache *donors, patch_outputs *out, ep_error *err) {
    const model_config *c = &m->cfg;
    if (!ops->patched_attention && plan->n_rules > 0)
        return ep_fail(err, "backend %s has no patched attention", ops->name);
    int S = pb->n_seqs, V = c->vocab_size;
    forward_patch patch = {.layer_rules = plan->layer_rules, .head_units = plan->head_units,
                           .n_head_units = plan->n_head_units, .n_donors = plan->n_donors, .types = pb->types,
                           .index = pb->index, .type_stride = pb->max_len, .n_typed = pb->lengths};
    for (int d = 0; d < plan->n_donors; d++) patch.donors[d] = &donors[d];
    kv_cache cache;
    int rc = kv_cache_init_backend(&cache, c, S, pb->max_len + (out->max_new > 0 ? out->max_new : 0), 0, ops, err);
    int patched = plan->n_donors > 0 || plan->n_rules > 0;
    if (out->row_metrics && !out->logits && !out->last_logits && out->max_new <= 0 &&
        model_config_local(c).n_vocab == V) {
        // Only the figures: the last logits stay in backend memory and are reduced there (logit_metrics).
        float *dev = rc == 0 ? ops->alloc(sizeof(float) * (size_t)S * V) : NULL;
        if (rc == 0) rc = run_pass(m, ops, pb, -1, &cache, patched ? &patch : NULL, dev, LOGITS_LAST_IN_BACKEND, out,
                                   NULL, err);
        if (rc == 0) ops->logit_metrics(out->row_metrics, dev, out->targets, NULL, S, V);
        if (dev) ops->release(dev);
        kv_cache_free(&cache);
        return rc;
    }
    float *last = ep_malloc(sizeof(float) * (size_t)S * V);
    if (rc == 0)
        rc = run_pass(m, ops, pb, -1, &cache, patched ? &patch : NULL, out->logits ? out->logits : last,
                      out->logits ? LOGITS_ALL : LOGITS_LAST, out, NULL, err);
    if (rc == 0 && out->logits) {
        // Packed rows -> [n_seqs][max_len][V]: last sequence first so nothing is overwritten before it moves.
        int t0 = 0;
        for (int s = 0; s < S; s++) t0 += pb->lengths[s];
        for (int s = S - 1; s >= 0; s--) {
            t0 -= pb->lengths[s];
            memcpy(last + (size_t)s * V, out->logits + (size_t)(t0 + pb->lengths[s] - 1) * V, sizeof(float) * V);
            memmove(out->logits + (size_t)s * pb->max_len * V, out->logits + (size_t)t0 * V,
                    sizeof(float) * (size_t)pb->lengths[s] * V);
        }
    }
    if (rc == 0 && out->last_logits) memcpy(out->last_logits, last, sizeof(float) * (size_t)S * V);
    if (rc == 0 && out->row_metrics) kernel_ops_ref()->logit_metrics(out->row_metrics, last, out->targets, NULL, S, V);
    if (rc == 0 && out->max_new > 0) {
        greedy_opts o = {.max_new_tokens = out->max_new, .stop_ids = out->stop_ids, .n_stop_ids = out->n_stop_ids};
        rc = greedy_decode(m, ops, &cache, last, &o, out->generated, out->n_generated, err);
    }
    free(last);
    kv_cache_free(&cache);
    return rc;
}

int patch_run(const model *m, const kernel_ops *ops, const ablation_plan *plan, const prompt_batch *pb,
              patch_outputs *out, ep_error *err) {
    kv_cache donors[16];
    memset(donors, 0, sizeof donors);
    int rc = patch_donor_passes(m, ops, plan, pb, donors, err);
    if (rc == 0) rc = patch_prompt_pass(m, ops, plan, pb, donors, out, err);
    for (int d = 0; d < 16; d++) kv_cache_free(&donors[d]);
    return rc;
}

// ---- Reuse

int plan_rule_patches(const edge_rule *r) {
    if (r->donor < 0 && r->source != EDGE_SRC_ZERO) return 0;  // a keep rule; a zero rule reads no donor but removes
    for (int i = 0; i < EDGE_MAX_HEADS / 64; i++)
        if (r->heads[i]) return 1;
    return 0;
}

void patch_reach_init(patch_reach *r, const prompt_batch *pb, int n_layers) {
    r->n_seqs = pb->n_seqs, r->n_layers = n_layers, r->first_layer = n_layers;
    r->first_row = ep_malloc(sizeof(int) * (size_t)(pb->n_seqs > 0 ? pb->n_seqs : 1));
    for (int s = 0; s < pb->n_seqs; s++) r->first_row[s] = pb->lengths[s];
}

void patch_reach_free(patch_reach *r) {
    free(r->first_row);
    r->first_row = NULL;
}

// The first position of sequence s (before `limit`) that receives an edge from a sender of the given
// types under relation, or limit. A sender at the receiver's own position counts (attention sees it).
static int first_edge_row(const prompt_batch *pb, int s, uint32_t senders, uint32_t receivers, int relation, int limit) {
    const int32_t *ty = pb->types + (size_t)s * pb->max_len, *ix = pb->index + (size_t)s * pb->max_len;
    int n = pb->lengths[s] < limit ? pb->lengths[s] : limit, any = 0, min_idx = INT_MAX;
    unsigned char *seen = relation == REL_SAME ? ep_calloc((size_t)n + 1, 1) : NULL;  // sender indices so far
    int row = limit;
    for (int p = 0; p < n; p++) {
        int t = ty[p], i = ix[p];
        if (t < 0 || t >= 32) continue;
        if ((senders >> t) & 1u) {
            any = 1;
            if (i >= 0 && i < min_idx) min_idx = i;
            if (seen && i >= 0 && i < n) seen[i] = 1;
        }
        if (!((receivers >> t) & 1u)) continue;
        int hit = relation == REL_SAME      ? i >= 0 && (i >= n || seen[i])  // an index past n: assume a sender
                  : relation == REL_EARLIER ? i >= 0 && min_idx < i
                                            : any;
        if (hit) {
            row = p;
            break;
        }
    }
    free(seen);
    return row;
}

void patch_reach_add_edges(patch_reach *r, const prompt_batch *pb, int layer, uint32_t senders, uint32_t receivers,
                           int relation) {
    int any = 0;  // the layer counts only if some sequence has such an edge
    for (int s = 0; s < r->n_seqs; s++) {
        int row = first_edge_row(pb, s, senders, receivers, relation, pb->lengths[s]);
        if (row < pb->lengths[s]) any = 1;
        if (row < r->first_row[s]) r->first_row[s] = row;
    }
    if (any && layer < r->first_layer) r->first_layer = layer;
}

void patch_reach_add_head(patch_reach *r, const prompt_batch *pb, int layer, int type) {
    int any = 0;
    for (int s = 0; s < r->n_seqs; s++) {
        const int32_t *ty = pb->types + (size_t)s * pb->max_len;
        for (int p = 0; p < pb->lengths[s]; p++)
            if (ty[p] == type) {
                any = 1;
                if (p < r->first_row[s]) r->first_row[s] = p;
                break;
            }
    }
    if (any && layer < r->first_layer) r->first_layer = layer;
}

void patch_reach_add_plan(patch_reach *r, const ablation_plan *plan, const prompt_batch *pb) {
    // Plans repeat one rule over many layers: each (senders, receivers, relation) is scanned once for the
    // rows, at its lowest layer (a higher layer only adds the layer, which the lowest one bounds).
    typedef struct {
        uint32_t senders, receivers;
        int relation;
    } shape;
    int cap = 64, n = 0;
    shape *done = ep_malloc(sizeof(shape) * (size_t)cap);
    for (int l = 0; l < plan->n_layers && plan->layer_rules; l++)
        for (int i = 0; i < plan->layer_rules[l].n; i++) {
            const edge_rule *e = &plan->layer_rules[l].rule[i];
            if (!plan_rule_patches(e)) continue;
            int k = 0;
            while (k < n && !(done[k].senders == e->sender_types && done[k].receivers == e->receiver_types &&
                              done[k].relation == e->relation))
                k++;
            if (k < n) continue;
            if (n == cap) done = ep_realloc(done, sizeof(shape) * (size_t)(cap *= 2));
            done[n++] = (shape){e->sender_types, e->receiver_types, e->relation};
            patch_reach_add_edges(r, pb, l, e->sender_types, e->receiver_types, e->relation);
        }
    free(done);
    for (int u = 0; u < plan->n_head_units; u++)
        if (plan->head_units[u].donor >= 0) patch_reach_add_head(r, pb, plan->head_units[u].layer, plan->head_units[u].type);
}

// The relation class of a sender at example index ia and a receiver at ib, and indices of each class
// (what edge_lookup's relations test).
enum { CARRY_SAME = 0, CARRY_EARLIER = 1, CARRY_NEITHER = 2 };
static int relation_class(int ia, int ib) { return ia >= 0 && ia == ib ? CARRY_SAME : ia >= 0 && ia < ib ? CARRY_EARLIER : CARRY_NEITHER; }

void patch_carry_init(patch_carry *c, const ablation_plan *plan, const prompt_batch *pb) {
    int nt = 1;
    for (int s = 0; s < pb->n_seqs; s++)
        for (int p = 0; p < pb->lengths[s]; p++) {
            int t = pb->types[(size_t)s * pb->max_len + p];
            if (t >= 0 && t < 32 && t + 1 > nt) nt = t + 1;
        }
    int L = plan->n_layers, H = plan->n_heads;
    c->n_layers = L, c->n_types = nt;
    c->reads = ep_calloc((size_t)L * nt * nt * 3, 1);
    static const int ia[3] = {0, 0, -1}, ib[3] = {0, 1, -1};
    unsigned char *replaced = ep_calloc((size_t)H * nt + 1, 1);  // [head][receiver type]: a head unit's output
    for (int l = 0; l < L; l++) {
        memset(replaced, 0, (size_t)H * nt);
        for (int u = 0; u < plan->n_head_units; u++) {
            const head_unit *h = &plan->head_units[u];
            if (h->layer == l && h->donor >= 0 && h->type >= 0 && h->type < nt) replaced[h->head * nt + h->type] = 1;
        }
        const edge_rule_set *rs = plan->layer_rules ? &plan->layer_rules[l] : NULL;
        for (int tb = 0; tb < nt; tb++)
            for (int ta = 0; ta < nt; ta++)
                for (int k = 0; k < 3; k++) {
                    int carries = 0;
                    for (int h = 0; h < H && !carries; h++) {
                        if (replaced[h * nt + tb]) continue;
                        int code = edge_lookup(rs && rs->n > 0 ? rs : NULL, h, ta, ia[k], tb, ib[k]);
                        carries = code == EDGE_CLEAN || (code >= 0 && (edge_key_donor(code) < 0 || edge_value_donor(code) < 0));
                    }
                    c->reads[(((size_t)l * nt + ta) * nt + tb) * 3 + k] = (unsigned char)carries;
                }
    }
    free(replaced);
}

void patch_carry_free(patch_carry *c) {
    free(c->reads);
    c->reads = NULL;
}

void patch_rows_init(patch_rows *r, const prompt_batch *pb, int n_layers) {
    r->n_seqs = pb->n_seqs, r->max_len = pb->max_len, r->n_layers = n_layers, r->first_layer = n_layers;
    r->rows = ep_calloc((size_t)n_layers * pb->n_seqs * pb->max_len + 1, 1);
}

void patch_rows_free(patch_rows *r) {
    free(r->rows);
    r->rows = NULL;
}

static unsigned char *rows_at(const patch_rows *r, int l, int s) { return r->rows + ((size_t)l * r->n_seqs + s) * r->max_len; }

void patch_rows_seed_edges(patch_rows *r, const prompt_batch *pb, int layer, uint32_t senders, uint32_t receivers,
                           int relation) {
    for (int s = 0; s < pb->n_seqs; s++) {
        const int32_t *ty = pb->types + (size_t)s * pb->max_len, *ix = pb->index + (size_t)s * pb->max_len;
        unsigned char *row = rows_at(r, layer, s);
        for (int b = 0; b < pb->lengths[s]; b++) {
            if (ty[b] < 0 || ty[b] >= 32 || !((receivers >> ty[b]) & 1u)) continue;
            for (int a = 0; a <= b; a++) {
                if (ty[a] < 0 || ty[a] >= 32 || !((senders >> ty[a]) & 1u)) continue;
                if (relation == REL_SAME && !(ix[a] >= 0 && ix[a] == ix[b])) continue;
                if (relation == REL_EARLIER && !(ix[a] >= 0 && ix[a] < ix[b])) continue;
                row[b] = 1;
                if (layer < r->first_layer) r->first_layer = layer;
                break;
            }
        }
    }
}

void patch_rows_seed_head(patch_rows *r, const prompt_batch *pb, int layer, int type) {
    for (int s = 0; s < pb->n_seqs; s++) {
        const int32_t *ty = pb->types + (size_t)s * pb->max_len;
        for (int p = 0; p < pb->lengths[s]; p++)
            if (ty[p] == type) {
                rows_at(r, layer, s)[p] = 1;
                if (layer < r->first_layer) r->first_layer = layer;
            }
    }
}

void patch_rows_spread(patch_rows *r, const prompt_batch *pb, const patch_carry *carry) {
    int nt = carry->n_types;
    for (int l = r->first_layer + 1; l < r->n_layers; l++)
        for (int s = 0; s < pb->n_seqs; s++) {
            const int32_t *ty = pb->types + (size_t)s * pb->max_len, *ix = pb->index + (size_t)s * pb->max_len;
            const unsigned char *in = rows_at(r, l - 1, s);
            unsigned char *out = rows_at(r, l, s);
            const unsigned char *reads = carry->reads + (size_t)l * nt * nt * 3;
            for (int b = 0; b < pb->lengths[s]; b++) {
                if (in[b] || out[b]) {
                    out[b] = 1;
                    continue;
                }
                int tb = ty[b];
                for (int a = 0; a < b && !out[b]; a++) {
                    if (!in[a]) continue;
                    int ta = ty[a];
                    out[b] = ta < 0 || ta >= nt || tb < 0 || tb >= nt ||
                             reads[((size_t)ta * nt + tb) * 3 + relation_class(ix[a], ix[b])];
                }
            }
        }
}

long patch_rows_count(const patch_rows *r) {
    long n = 0;
    for (size_t i = 0; i < (size_t)r->n_layers * r->n_seqs * r->max_len; i++) n += r->rows[i];
    return n;
}

int patch_base_run(const model *m, const kernel_ops *ops, const ablation_plan *plan, const prompt_batch *pb,
                   const kv_cache *donors, int max_new, patch_base *b, ep_error *err) {
    const model_config *c = &m->cfg;
    memset(b, 0, sizeof *b);
    if (!ops->patched_attention && plan->n_rules > 0) return ep_fail(err, "backend %s has no patched attention", ops->name);
    int T = 0, S = pb->n_seqs;
    for (int s = 0; s < S; s++) T += pb->lengths[s];
    b->n_rows = T;
    if (kv_cache_init_backend(&b->cache, c, S, pb->max_len + (max_new > 0 ? max_new : 0), 0, ops, err)) return -1;
    b->resid = ep_malloc(sizeof(float) * (size_t)(c->n_layers + 1) * T * c->hidden);
    b->last_logits = ep_malloc(sizeof(float) * (size_t)S * c->vocab_size);
    size_t stats = (size_t)S * c->n_layers * c->n_heads;
    b->attn_entropy = ep_malloc(sizeof(float) * stats);
    b->attn_mass = ep_malloc(sizeof(float) * stats * PATCH_ATTN_TYPES);
    patch_outputs base_stats = {.attn_entropy = b->attn_entropy, .attn_mass = b->attn_mass};
    forward_patch patch = {.layer_rules = plan->layer_rules, .head_units = plan->head_units,
                           .n_head_units = plan->n_head_units, .n_donors = plan->n_donors, .types = pb->types,
                           .index = pb->index, .type_stride = pb->max_len, .n_typed = pb->lengths};
    for (int d = 0; d < plan->n_donors; d++) patch.donors[d] = &donors[d];
    int patched = plan->n_donors > 0 || plan->n_rules > 0;
    int rc = run_pass(m, ops, pb, -1, &b->cache, patched ? &patch : NULL, b->last_logits, LOGITS_LAST, &base_stats, b->resid, err);
    if (rc) patch_base_free(b);
    return rc;
}

void patch_base_free(patch_base *b) {
    if (b->cache.len) kv_cache_free(&b->cache);
    free(b->resid), free(b->last_logits), free(b->attn_entropy), free(b->attn_mass);
    memset(b, 0, sizeof *b);
}

// plan's prompt pass derived from base into cache (S sequences, initialised by the caller, any content:
// the base's rows are copied in first), last-position logits into last [S][V]; with stats (its
// attn_entropy and attn_mass), the attention statistics at `last`: the base's in the layers below the
// reach, the recomputed last row's from there (so the last row is recomputed whenever the plan reaches
// anything, even where its own first row lies past it: an unchanged row, computed again).
static int derive_into(const model *m, const kernel_ops *ops, const ablation_plan *plan, const prompt_batch *pb,
                       const kv_cache *donors, const patch_base *base, const patch_reach *reach, kv_cache *cache,
                       float *last, const patch_outputs *stats, ep_error *err) {
    const model_config *c = &m->cfg;
    if (!ops->patched_attention && plan->n_rules > 0) return ep_fail(err, "backend %s has no patched attention", ops->name);
    if (base->cache.n_seqs != pb->n_seqs || (reach && reach->n_seqs != pb->n_seqs))
        return ep_fail(err, "patch: the base pass is not of this batch");
    patch_reach own = {0};
    if (!reach) {
        patch_reach_init(&own, pb, c->n_layers);
        patch_reach_add_plan(&own, plan, pb);
        reach = &own;
    }
    int S = pb->n_seqs, V = c->vocab_size, D = c->hidden, L = c->n_layers, l0 = reach->first_layer, rc = 0;
    int *start = ep_malloc(sizeof(int) * (size_t)S), *n_new = ep_malloc(sizeof(int) * (size_t)S);
    int T_new = 0;
    for (int s = 0; s < S; s++) {
        start[s] = l0 >= L ? pb->lengths[s] : reach->first_row[s];
        if (stats && l0 < L && start[s] > pb->lengths[s] - 1) start[s] = pb->lengths[s] - 1;
        if (start[s] < 0 || start[s] > pb->lengths[s])
            rc = ep_fail(err, "patch: sequence %d: first row %d is outside its %d positions", s, start[s], pb->lengths[s]);
        n_new[s] = pb->lengths[s] - start[s];
        T_new += n_new[s];
    }
    if (T_new == 0) l0 = L;
    // Keys and values of every layer before each sequence's first recomputed row (and, for the layers
    // below l0, at every row: what generation reads there), then the rows from there on, from layer l0.
    if (rc == 0) rc = kv_cache_copy_seqs(cache, 0, &base->cache, pb->lengths, start, 0, 0, err);
    memcpy(last, base->last_logits, sizeof(float) * (size_t)S * V);
    int H = c->n_heads, NT = PATCH_ATTN_TYPES;
    size_t n_stats = (size_t)S * L * H;
    if (stats) {
        memcpy(stats->attn_entropy, base->attn_entropy, sizeof(float) * n_stats);
        memcpy(stats->attn_mass, base->attn_mass, sizeof(float) * n_stats * NT);
    }
    if (rc == 0 && T_new > 0) {
        int *tokens = ep_malloc(sizeof(int) * (size_t)T_new), *rows = ep_malloc(sizeof(int) * (size_t)S),
            *row_seq = ep_malloc(sizeof(int) * (size_t)S);
        float *x = l0 > 0 ? ep_malloc(sizeof(float) * (size_t)T_new * D) : NULL;
        float *logits = ep_malloc(sizeof(float) * (size_t)S * V);
        int n_rows = 0;
        for (int s = 0, t = 0, t_base = 0; s < S; t_base += pb->lengths[s], s++) {
            for (int i = start[s]; i < pb->lengths[s]; i++, t++) {
                tokens[t] = pb->tokens[(size_t)s * pb->max_len + i];
                if (x) memcpy(x + (size_t)t * D, base->resid + ((size_t)l0 * base->n_rows + t_base + i) * D, sizeof(float) * D);
            }
            if (n_new[s] > 0) row_seq[n_rows] = s, rows[n_rows++] = t - 1;
        }
        forward_patch patch = {.layer_rules = plan->layer_rules, .head_units = plan->head_units,
                               .n_head_units = plan->n_head_units, .n_donors = plan->n_donors, .types = pb->types,
                               .index = pb->index, .type_stride = pb->max_len, .n_typed = pb->lengths};
        for (int d = 0; d < plan->n_donors; d++) patch.donors[d] = &donors[d];
        int patched = plan->n_donors > 0 || plan->n_rules > 0;
        forward_batch b = {.n_seqs = S, .n_new = n_new, .tokens = tokens, .n_logit_rows = n_rows, .logit_rows = rows,
                           .logits = logits, .first_layer = l0, .x_in = x};
        forward_attn_stats as;
        int *last_new = NULL;  // each sequence's last new token: its `last` (every sequence has one here)
        float *ent = NULL, *mass = NULL;
        if (stats) {
            last_new = ep_malloc(sizeof(int) * (size_t)S);
            for (int q = 0; q < S; q++) last_new[q] = n_new[q] - 1;
            ent = ep_malloc(sizeof(float) * n_stats), mass = ep_malloc(sizeof(float) * n_stats * NT);
            as = (forward_attn_stats){.rows = last_new, .types = pb->types, .index = pb->index, .type_stride = pb->max_len,
                                      .n_typed = pb->lengths, .n_types = NT, .entropy = ent, .mass = mass};
            b.attn_stats = &as;
        }
        rc = model_forward(m, ops, cache, &b, patched ? &patch : NULL, err);
        for (int k = 0; k < n_rows && rc == 0; k++)
            memcpy(last + (size_t)row_seq[k] * V, logits + (size_t)k * V, sizeof(float) * V);
        for (int q = 0; q < S && rc == 0 && stats; q++) {  // the layers run: l0 and above
            size_t at = ((size_t)q * L + l0) * H, n_at = (size_t)(L - l0) * H;
            memcpy(stats->attn_entropy + at, ent + at, sizeof(float) * n_at);
            memcpy(stats->attn_mass + at * NT, mass + at * NT, sizeof(float) * n_at * NT);
        }
        free(tokens), free(rows), free(row_seq), free(x), free(logits), free(last_new), free(ent), free(mass);
    }
    free(start), free(n_new);
    patch_reach_free(&own);
    return rc;
}

int patch_prompt_pass_from(const model *m, const kernel_ops *ops, const ablation_plan *plan, const prompt_batch *pb,
                           const kv_cache *donors, const patch_base *base, const patch_reach *reach,
                           patch_outputs *out, ep_error *err) {
    const model_config *c = &m->cfg;
    if (out->logits) return ep_fail(err, "patch: a derived pass gives the last position's logits only");
    int S = pb->n_seqs, V = c->vocab_size;
    kv_cache cache = {0};
    int rc = kv_cache_init_backend(&cache, c, S, pb->max_len + (out->max_new > 0 ? out->max_new : 0), 0, ops, err);
    float *last = ep_malloc(sizeof(float) * (size_t)S * V);
    if (rc == 0)
        rc = derive_into(m, ops, plan, pb, donors, base, reach, &cache, last, out->attn_entropy && out->attn_mass ? out : NULL,
                         err);
    if (rc == 0 && out->last_logits) memcpy(out->last_logits, last, sizeof(float) * (size_t)S * V);
    if (rc == 0 && out->row_metrics) kernel_ops_ref()->logit_metrics(out->row_metrics, last, out->targets, NULL, S, V);
    if (rc == 0 && out->max_new > 0) {
        greedy_opts o = {.max_new_tokens = out->max_new, .stop_ids = out->stop_ids, .n_stop_ids = out->n_stop_ids};
        rc = greedy_decode(m, ops, &cache, last, &o, out->generated, out->n_generated, err);
    }
    if (cache.len) kv_cache_free(&cache);
    free(last);
    return rc;
}

int patch_prompt_passes_from(const model *m, const kernel_ops *ops, int n, const ablation_plan *const *plans,
                             const prompt_batch *pb, const kv_cache *donors, const patch_base *base, patch_outputs *outs,
                             ep_error *err) {
    const model_config *c = &m->cfg;
    int S = pb->n_seqs, V = c->vocab_size, max_new = n > 0 ? outs[0].max_new : 0, rc = 0;
    for (int i = 0; i < n; i++)
        if (outs[i].logits || outs[i].max_new != max_new)
            return ep_fail(err, "patch: derived passes decoded together need one generation length and no full logits");
    if (max_new <= 0) {
        for (int i = 0; i < n && rc == 0; i++) rc = patch_prompt_pass_from(m, ops, plans[i], pb, donors, base, NULL, &outs[i], err);
        return rc;
    }
    int G_max = PATCH_DECODE_SEQS / S > 1 ? PATCH_DECODE_SEQS / S : 1;
    kv_cache one = {0}, all = {0};
    float *last = ep_malloc(sizeof(float) * (size_t)G_max * S * V);
    int *gen = ep_malloc(sizeof(int) * (size_t)G_max * S * max_new), *n_gen = ep_malloc(sizeof(int) * (size_t)G_max * S);
    rc = kv_cache_init_backend(&one, c, S, pb->max_len, 0, ops, err);
    for (int i0 = 0; i0 < n && rc == 0; i0 += G_max) {
        int G = i0 + G_max <= n ? G_max : n - i0;
        if (all.n_seqs != G * S) {
            if (all.len) kv_cache_free(&all);
            if ((rc = kv_cache_init_backend(&all, c, G * S, pb->max_len + max_new, 0, ops, err))) break;
        }
        // Each plan's prompt pass on its own, its cache then moved into its sequences of the shared one.
        for (int g = 0; g < G && rc == 0; g++) {
            const patch_outputs *o = &outs[i0 + g];
            rc = derive_into(m, ops, plans[i0 + g], pb, donors, base, NULL, &one, last + (size_t)g * S * V,
                             o->attn_entropy && o->attn_mass ? o : NULL, err);
            if (rc == 0) rc = kv_cache_copy_seqs(&all, g * S, &one, pb->lengths, NULL, 0, 0, err);
            if (rc == 0 && outs[i0 + g].last_logits)
                memcpy(outs[i0 + g].last_logits, last + (size_t)g * S * V, sizeof(float) * (size_t)S * V);
            if (rc == 0 && outs[i0 + g].row_metrics)
                kernel_ops_ref()->logit_metrics(outs[i0 + g].row_metrics, last + (size_t)g * S * V, outs[i0 + g].targets,
                                                NULL, S, V);
        }
        if (rc) break;
        greedy_opts o = {.max_new_tokens = max_new, .stop_ids = outs[0].stop_ids, .n_stop_ids = outs[0].n_stop_ids};
        rc = greedy_decode(m, ops, &all, last, &o, gen, n_gen, err);
        for (int g = 0; g < G && rc == 0; g++) {
            memcpy(outs[i0 + g].generated, gen + (size_t)g * S * max_new, sizeof(int) * (size_t)S * max_new);
            memcpy(outs[i0 + g].n_generated, n_gen + (size_t)g * S, sizeof(int) * (size_t)S);
        }
    }
    if (one.len) kv_cache_free(&one);
    if (all.len) kv_cache_free(&all);
    free(last), free(gen), free(n_gen);
    return rc;
}
