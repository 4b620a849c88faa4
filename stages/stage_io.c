#include "stage_io.h"

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

int stage_needs_host_weights(const run_config *cfg) {
    return !cfg->prune.exact || cfg->prune.compare;
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
    // one tensor at a time, and the host keeps fp32 weights only for attribution's CPU backward pass.
    int rank = host ? host->rank : 0, size = host ? host->size : 1;
    if ((in->ops->host_memory || stage_needs_host_weights(cfg) ? model_load_shard : model_open_shard)(
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
}

prompt_batch stage_batch(const stage_inputs *in, int first, int n) {
    const prompt_set *ps = &in->prompts;
    size_t L = (size_t)ps->max_len;
    return (prompt_batch){.n_seqs = n, .max_len = ps->max_len, .n_donors = ps->n_donors,
                          .tokens = ps->tokens + first * L, .lengths = ps->lengths + first,
                          .types = ps->types + first * L, .index = ps->index + first * L,
                          .donors = ps->donors ? ps->donors + first * L * (size_t)ps->n_donors : NULL};
}

int stage_output_current(const char *path, const char *identity, int fresh, const ep_log *log, ep_error *err) {
    if (fresh || access(path, F_OK) != 0) return 0;
    h5store s;
    ep_error open_err;
    if (h5store_open(path, &s, &open_err)) {
        ep_logf(log, EP_LOG_WARN, "edgepatch: rebuilding %s: %s", path, open_err.msg);
        return 0;
    }
    if (h5store_verify(&s, &open_err)) {
        ep_logf(log, EP_LOG_WARN, "edgepatch: rebuilding %s: %s", path, open_err.msg);
        h5store_close(&s);
        return 0;
    }
    char *have = NULL;
    int same = h5store_get_str(&s, "inputs_hash", &have, &open_err) == 0 && !strcmp(have, identity);
    free(have);
    h5store_close(&s);
    if (same) return 1;
    return ep_fail(err, "%s: made from other inputs (prompts, model or plan changed); rerun with --fresh to rebuild it", path);
}

int make_dirs(const char *path, ep_error *err) {
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1;; p++) {
        if (*p == '/' || *p == 0) {
            char c = *p;
            *p = 0;
            if (mkdir(buf, 0777) != 0 && errno != EEXIST) return ep_fail(err, "%s: cannot create folder: %s", buf, strerror(errno));
            *p = c;
            if (!c) break;
        }
    }
    return 0;
}

int write_text_atomic(const char *path, const char *text, ep_error *err) {
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp-%d", path, (int)getpid());
    FILE *f = fopen(tmp, "w");
    if (!f) return ep_fail(err, "%s: cannot write: %s", tmp, strerror(errno));
    int ok = fputs(text, f) >= 0 && fflush(f) == 0 && fsync(fileno(f)) == 0;
    ok &= fclose(f) == 0;
    if (!ok || rename(tmp, path) != 0) {
        unlink(tmp);
        return ep_fail(err, "%s: cannot write (disk full?)", path);
    }
    return 0;
}

int stage_n_items(const stage_inputs *in) {
    int B = in->cfg->batch_size;
    return (in->prompts.n_prompts + B - 1) / B;
}

void stage_item_range(const stage_inputs *in, int item, int *first, int *n) {
    int B = in->cfg->batch_size, P = in->prompts.n_prompts;
    *first = item * B;
    *n = *first + B <= P ? B : P - *first;
}

void stage_item_path(const stage_inputs *in, const char *stage, int item, char *out, size_t size) {
    snprintf(out, size, "%s/%s.d/item-%05d.h5", in->cfg->output_path, stage, item);
}

void stage_item_identity(const char *stage_identity, int first, int n, char out[17]) {
    uint64_t h = hash_str(HASH_INIT, "item");
    h = hash_str(h, stage_identity);
    h = hash_bytes(h, &first, sizeof first);
    h = hash_bytes(h, &n, sizeof n);
    hash_hex(h, out);
}

int stage_shard_dir_prepare(const stage_inputs *in, const char *stage, int fresh, ep_error *err) {
    char dir[4096], path[4400];
    snprintf(dir, sizeof dir, "%s/%s.d", in->cfg->output_path, stage);
    if (mkdir(dir, 0777) != 0 && errno != EEXIST) return ep_fail(err, "%s: cannot create: %s", dir, strerror(errno));
    if (!fresh) return stage_remove_temporaries(dir, 0, NULL, NULL, err);
    DIR *d = opendir(dir);
    if (!d) return ep_fail(err, "%s: cannot list: %s", dir, strerror(errno));
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strncmp(e->d_name, "item-", 5)) {
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            unlink(path);
        }
    }
    closedir(d);
    return 0;
}

long stage_temporary_pid(const char *name) {
    const char *t = strstr(name, ".tmp-"), *next;
    if (!t) return 0;
    while ((next = strstr(t + 1, ".tmp-"))) t = next;
    t += 5;
    long pid = 0;
    for (const char *p = t; *p; p++) {
        if (*p < '0' || *p > '9' || pid > 100000000L) return 0;
        pid = pid * 10 + (*p - '0');
    }
    return t[0] && t != name + 5 ? pid : 0;
}

// A writer is alive if its pid is this process or any process of this host we can see (EPERM: it
// exists but belongs to someone else), unless it is a zombie: a killed MPI rank stays one until its
// launcher reaps it, which can be after the next run has started.
static int writer_alive(long pid) {
    if (pid == (long)getpid()) return 1;
    if (kill((pid_t)pid, 0) != 0 && errno != EPERM) return 0;
    char path[64], line[512];
    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return 1;  // no /proc: kill's answer
    size_t n = fread(line, 1, sizeof line - 1, f);
    fclose(f);
    line[n] = 0;
    const char *close = strrchr(line, ')');  // "pid (comm) S ...": the state follows the name
    return !(close && close[1] == ' ' && (close[2] == 'Z' || close[2] == 'X'));
}

static int remove_tree(const char *path, ep_error *err) {
    struct stat st;
    if (lstat(path, &st) != 0) return errno == ENOENT ? 0 : ep_fail(err, "%s: cannot stat: %s", path, strerror(errno));
    if (S_ISDIR(st.st_mode)) {
        DIR *d = opendir(path);
        if (!d) return ep_fail(err, "%s: cannot list: %s", path, strerror(errno));
        struct dirent *e;
        char sub[4600];
        int rc = 0;
        while (rc == 0 && (e = readdir(d))) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
            snprintf(sub, sizeof sub, "%s/%s", path, e->d_name);
            rc = remove_tree(sub, err);
        }
        closedir(d);
        if (rc == 0 && rmdir(path) != 0 && errno != ENOENT) rc = ep_fail(err, "%s: cannot remove: %s", path, strerror(errno));
        return rc;
    }
    if (unlink(path) != 0 && errno != ENOENT) return ep_fail(err, "%s: cannot remove: %s", path, strerror(errno));
    return 0;
}

int stage_remove_temporaries(const char *dir, int depth, const char *const *names, int *removed, ep_error *err) {
    DIR *d = opendir(dir);
    if (!d) return errno == ENOENT ? 0 : ep_fail(err, "%s: cannot list: %s", dir, strerror(errno));
    struct dirent *e;
    char path[4600];
    int rc = 0;
    while (rc == 0 && (e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        long pid = stage_temporary_pid(e->d_name);
        int named = !names;
        for (int i = 0; names && names[i] && !named; i++) {
            size_t n = strlen(names[i]);
            named = !strncmp(e->d_name, names[i], n) && !strncmp(e->d_name + n, ".tmp-", 5);
        }
        struct stat st;
        if (pid > 0 && named) {
            if (writer_alive(pid)) continue;
            rc = remove_tree(path, err);
            if (rc == 0 && removed) (*removed)++;
        } else if (depth > 0 && lstat(path, &st) == 0 && S_ISDIR(st.st_mode)) {  // never through a symbolic link
            rc = stage_remove_temporaries(path, depth - 1, names, removed, err);
        }
    }
    closedir(d);
    return rc;
}

int stage_item_current(const char *path, const char *identity, const ep_log *log, ep_error *err) {
    if (access(path, F_OK) != 0) return 0;
    h5store s;
    ep_error why;
    if (h5store_open(path, &s, &why)) {
        ep_logf(log, EP_LOG_WARN, "edgepatch: recomputing an item: %s", why.msg);
        return 0;
    }
    if (h5store_verify(&s, &why)) {
        ep_logf(log, EP_LOG_WARN, "edgepatch: recomputing an item: %s", why.msg);
        h5store_close(&s);
        return 0;
    }
    char *have = NULL;
    int same = h5store_get_str(&s, "inputs_hash", &have, &why) == 0 && !strcmp(have, identity);
    free(have);
    h5store_close(&s);
    if (same) return 1;
    return ep_fail(err, "%s: made from other inputs (prompts, model, plan or batch_size changed); rerun with --fresh "
                        "to rebuild it", path);
}

void stage_shard_damaged(work_stage *ws, const char *path, const ep_error *err) {
    ws->shard_bad = 1;
    if (ws->follower) return;
    ep_logf(ws->log, EP_LOG_WARN, "edgepatch: recomputing a damaged shard: %s", err->msg);
    unlink(path);
}

int stage_run_items(work_stage *ws, int fresh, ep_error *err) {
    int r = ws->prepare(ws, fresh, err);
    if (r < 0) return -1;
    // r == 1: the outputs are current, but the shards are checked all the same (sched_run_stage says why).
    // A shard of this stage found damaged by the merge: the items are checked (and it recomputed) once more.
    // Another stage's damaged shard (the cache's, read by patch items) is that stage's to recompute.
    for (int attempt = 0;; attempt++) {
        ws->shard_bad = 0;
        int computed = 0;
        for (int i = 0; i < ws->n_items; i++) {
            int done = ws->item_done(ws, i, err);
            if (done < 0 || (done == 0 && ws->run_item(ws, i, err))) return -1;
            computed += done == 0;
        }
        if (r == 1 && computed == 0) return 0;
        if (ws->finish(ws, err) == 0) return 0;
        if (!ws->shard_bad || attempt == 2) return -1;
    }
}

int write_json_atomic(const char *path, json_t *o, ep_error *err) {
    char *text = json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(8));
    size_t n = strlen(text);
    text = ep_realloc(text, n + 2);
    strcpy(text + n, "\n");
    int rc = write_text_atomic(path, text, err);
    free(text);
    return rc;
}
