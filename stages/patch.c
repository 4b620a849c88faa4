#include "patch.h"

#include <stdlib.h>
#include <string.h>

// One forward pass over the batch's prompts (donor < 0) or donor `donor`'s tokens, into cache.
static int run_pass(const model *m, const kernel_ops *ops, const prompt_batch *pb, int donor, kv_cache *cache,
                    const forward_patch *patch, float *logits, int all_rows, const patch_outputs *stats,
                    ep_error *err) {
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
                       .logit_rows = rows, .logits = logits};
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
        rc = kv_cache_init_backend(&donors[d], &m->cfg, pb->n_seqs, pb->max_len, 1, ops, err);
        if (rc == 0) rc = run_pass(m, ops, pb, d, &donors[d], d == 0 ? NULL : &nested, NULL, 0, NULL, err);
    }
    plan_free(&part0);
    return rc;
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
    float *last = ep_malloc(sizeof(float) * (size_t)S * V);
    if (rc == 0) {
        int patched = plan->n_donors > 0 || plan->n_rules > 0;
        rc = run_pass(m, ops, pb, -1, &cache, patched ? &patch : NULL, out->logits ? out->logits : last,
                      out->logits != NULL, out, err);
    }
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
