#include "patch.h"

#include <stdlib.h>
#include <string.h>

// One forward pass over the batch's prompts (donor < 0) or donor `donor`'s tokens, into cache.
static int run_pass(const model *m, const kernel_ops *ops, const prompt_batch *pb, int donor, kv_cache *cache,
                    const forward_patch *patch, float *logits, int all_rows, ep_error *err) {
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
    int rc = model_forward(m, ops, cache, &b, patch, err);
    free(tokens), free(rows);
    return rc;
}

int patch_run(const model *m, const kernel_ops *ops, const ablation_plan *plan, const prompt_batch *pb,
              patch_outputs *out, ep_error *err) {
    const model_config *c = &m->cfg;
    if (plan->n_donors > pb->n_donors)
        return ep_fail(err, "plan %s reads donor %d, the prompts have %d donors", plan->name, plan->n_donors - 1,
                       pb->n_donors);
    if (!ops->patched_attention && plan->n_rules > 0)
        return ep_fail(err, "backend %s has no patched attention", ops->name);
    int S = pb->n_seqs, V = c->vocab_size, rc = 0;
    kv_cache donors[16], cache;
    memset(donors, 0, sizeof donors);
    memset(&cache, 0, sizeof cache);
    forward_patch patch = {.layer_rules = plan->layer_rules, .head_units = plan->head_units,
                           .n_head_units = plan->n_head_units, .n_donors = plan->n_donors, .types = pb->types,
                           .index = pb->index, .type_stride = pb->max_len, .n_typed = pb->lengths};
    // Donor passes: donor 0 clean, donors d > 0 under the plan's donor-0 part.
    ablation_plan part0;
    plan_donor0_part(plan, &part0);
    forward_patch nested = patch;
    nested.layer_rules = part0.layer_rules;
    nested.head_units = part0.head_units;
    nested.n_head_units = part0.n_head_units;
    nested.n_donors = 1;
    for (int d = 0; d < plan->n_donors && rc == 0; d++) {
        rc = kv_cache_init(&donors[d], c, S, pb->max_len, 1, err);
        patch.donors[d] = nested.donors[d] = &donors[d];
        if (rc == 0) rc = run_pass(m, ops, pb, d, &donors[d], d == 0 ? NULL : &nested, NULL, 0, err);
    }
    float *last = NULL;
    if (rc == 0) rc = kv_cache_init(&cache, c, S, pb->max_len + (out->max_new > 0 ? out->max_new : 0), 0, err);
    if (rc == 0) {
        float *logits = out->logits;
        if (!logits) logits = last = ep_malloc(sizeof(float) * (size_t)S * V);
        rc = run_pass(m, ops, pb, -1, &cache, plan->n_donors > 0 || plan->n_rules > 0 ? &patch : NULL, logits,
                      out->logits != NULL, err);
        if (rc == 0 && out->logits) {  // every position computed: the last rows are the sequences' ends
            last = ep_malloc(sizeof(float) * (size_t)S * V);
            for (int s = 0, t = 0; s < S; t += pb->lengths[s], s++)
                memcpy(last + (size_t)s * V, out->logits + (size_t)(t + pb->lengths[s] - 1) * V, sizeof(float) * V);
        }
    }
    if (rc == 0 && out->logits) {
        // Packed rows -> [n_seqs][max_len][V], last sequence first so nothing is overwritten before it moves.
        for (int s = S - 1; s >= 0; s--) {
            int t0 = 0;
            for (int k = 0; k < s; k++) t0 += pb->lengths[k];
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
    plan_free(&part0);
    for (int d = 0; d < 16; d++) kv_cache_free(&donors[d]);
    kv_cache_free(&cache);
    return rc;
}
