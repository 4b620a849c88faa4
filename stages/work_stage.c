#include "work_stage.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "pipeline/files.h"
#include "pipeline/h5store.h"
#include "pipeline/hash.h"
#include "stages/stage_inputs.h"

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
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/%s.d", in->cfg->output_path, stage);
    if (mkdir(dir, 0777) != 0 && errno != EEXIST) return ep_fail(err, "%s: cannot create: %s", dir, strerror(errno));
    if (!fresh) return remove_temporaries(dir, 0, NULL, NULL, err);
    return remove_entries(dir, "item-", err);
}
int stage_item_current(const char *path, const char *identity, const char *format, const ep_log *log, ep_error *err) {
    ep_error why;
    switch (h5store_made_from_format(path, identity, format, &why)) {
    case H5STORE_SAME: return 1;
    case H5STORE_DAMAGED: ep_logf(log, EP_LOG_WARN, "edgepatch: recomputing an item: %s", why.msg); return 0;
    case H5STORE_ABSENT: return 0;
    default: break;
    }
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
