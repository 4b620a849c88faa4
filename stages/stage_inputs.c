#include "stage_inputs.h"

#include "stages/mean_donor.h"
#include "stages/task.h"

#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "pipeline/h5store.h"
#include "pipeline/hash.h"

// The config's backend (its name validated by run_config) as a dispatch table. A GPU that is present but
// unusable is named: in the error when "cuda" was asked for, in a warning when "auto" falls back to cpu.
int stage_backend(const run_config *cfg, const ep_log *log, const kernel_ops **ops, ep_error *err) {
    int wants_cuda = !strcmp(cfg->backend, "cuda") || !strcmp(cfg->backend, "auto");  // cpu runs never start CUDA
    const char *unusable = wants_cuda ? kernel_ops_cuda_unusable() : NULL;
    if (!(*ops = kernel_ops_named(cfg->backend)))
        return ep_fail(err, "%s: field backend: \"cuda\" asked for, but this build has no CUDA or no usable GPU is "
                            "present%s%s", cfg->path, unusable ? ": " : "", unusable ? unusable : "");
    if (unusable && !strcmp(cfg->backend, "auto"))
        ep_logf(log, EP_LOG_WARN, "edgepatch: %s; the cuda backend is off", unusable);
    return 0;
}

int stage_inputs_open(const run_config *cfg, const ep_log *log, stage_inputs *in, ep_error *err) {
    const kernel_ops *ops;
    memset(in, 0, sizeof *in);  // closable whatever fails
    if (stage_backend(cfg, log, &ops, err)) return -1;
    return stage_inputs_open_shard(cfg, ops, NULL, NULL, log, in, err);
}

int stage_inputs_open_shard(const run_config *cfg, const kernel_ops *ops, const ep_group *host, const ep_group *device,
                            const ep_log *log, stage_inputs *in, ep_error *err) {
    memset(in, 0, sizeof *in);
    in->cfg = cfg;
    in->log = log;
    if (!cfg->model_path) return ep_fail(err, "%s: field model_path: required for the model stages", cfg->path);
    char path[4096];
    snprintf(path, sizeof path, "%s/prompts.h5", cfg->output_path);
    in->ops = ops;
    // A host backend computes with the host model's weights; a device backend gets them from the mapping
    // one tensor at a time and the host keeps none (every pass, attribution's backward included, runs on
    // the backend's model).
    int rank = host ? host->rank : 0, size = host ? host->size : 1;
    if ((in->ops->host_memory ? model_load_shard : model_open_shard)(
            cfg->model_path, rank, size, &in->m, err))
        return -1;
    in->m.group = host;
    if (model_to_backend(&in->m, in->ops, cfg->bf16, &in->dev, err)) {
        model_free(&in->m);
        return -1;
    }
    // A split model's device copy sums and gathers buffers in the backend's memory (the driver's device group).
    in->dev.group = device ? device : host;
    if (prompt_set_load(path, &in->prompts, err) || plan_from_run_config(cfg, &in->m.cfg, &in->plan, err) ||
        plan_list_from_run_config(cfg, &in->m.cfg, &in->ablations, &in->n_ablations, err)) {
        stage_inputs_close(in);
        return -1;
    }
    h5store s;
    char *hash = NULL;
    if (h5store_open(path, &s, err) == 0) {
        if (h5store_get_str(&s, "inputs_hash", &hash, err) == 0) snprintf(in->prompts_hash, sizeof in->prompts_hash, "%s", hash);
        free(hash);
        h5store_close(&s);
    }
    // The model hash covers every weight byte (docs/models.md, "identity"); the files' content hashes are
    // kept in the run folder. A bf16 run computes other numbers from the same checkpoint: its artifacts
    // carry another model hash.
    uint64_t model_id = 0;
    char digests[4096];
    snprintf(digests, sizeof digests, "%s/model_digests.json", cfg->output_path);
    if (model_content_identity(&in->m, digests, &model_id, NULL, err)) {
        stage_inputs_close(in);
        return -1;
    }
    hash_hex(cfg->bf16 ? hash_str(model_id, "bf16") : model_id, in->model_hash);
    hash_hex(plan_hash(&in->plan), in->plan_hash);
    in->n_cached_donors = in->plan.n_donors > 0 || in->n_ablations == 0 ? in->plan.n_donors : 1;
    for (int d = 0; d < in->prompts.n_donors && d < 32; d++)
        if (in->prompts.donor_kinds[d] == DONOR_MEAN) in->mean_donors |= 1u << d;
    if (in->mean_donors && in->m.cfg.tp.size > 1) {
        ep_fail(err, "%s: field donors: the mean donor does not run tensor-parallel yet (tensor_parallel 1)", cfg->path);
        stage_inputs_close(in);
        return -1;
    }
    if (in->n_cached_donors > in->prompts.n_donors) {
        ep_fail(err, "%s: the plan or its ablations read donor %d but the prompts have %d donors (field donors)", cfg->path,
                in->n_cached_donors - 1, in->prompts.n_donors);
        stage_inputs_close(in);
        return -1;
    }
    for (int p = 0; p < in->prompts.n_prompts; p++)
        for (int i = 0; i < in->prompts.lengths[p]; i++) {
            int32_t t = in->prompts.tokens[(size_t)p * in->prompts.max_len + i];
            if (t < 0 || t >= in->m.cfg.vocab_size) {
                ep_fail(err, "%s: prompt %d has token %d outside the model's vocabulary of %d (tokenizer and model "
                             "differ?)", path, p, t, in->m.cfg.vocab_size);
                stage_inputs_close(in);
                return -1;
            }
        }
    return 0;
}

void stage_inputs_close(stage_inputs *in) {
    model_backend_free(&in->dev);
    model_free(&in->m);
    prompt_set_free(&in->prompts);
    plan_free(&in->plan);
    plan_list_free(in->ablations, in->n_ablations);
    if (in->mean) mean_table_free(in->mean);
    free(in->mean);
    in->mean = NULL;
}

prompt_batch stage_batch(const stage_inputs *in, int first, int n) {
    const prompt_set *ps = &in->prompts;
    size_t L = (size_t)ps->max_len;
    return (prompt_batch){.n_seqs = n, .max_len = ps->max_len, .n_donors = ps->n_donors,
                          .tokens = ps->tokens + first * L, .lengths = ps->lengths + first,
                          .types = ps->types + first * L, .index = ps->index + first * L,
                          .donors = ps->donors ? ps->donors + first * L * (size_t)ps->n_donors : NULL,
                          .mean_donors = in->mean_donors, .mean = in->mean};
}

int stage_output_current(const char *path, const char *identity, int fresh, const ep_log *log, ep_error *err) {
    if (fresh) return 0;
    ep_error why;
    switch (h5store_made_from(path, identity, &why)) {
    case H5STORE_SAME: return 1;
    case H5STORE_DAMAGED: ep_logf(log, EP_LOG_WARN, "edgepatch: rebuilding %s: %s", path, why.msg); return 0;
    case H5STORE_ABSENT: return 0;
    default: break;
    }
    return ep_fail(err, "%s: made from other inputs (prompts, model or plan changed); rerun with --fresh to rebuild it", path);
}

