#include "run.h"

#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "pipeline/files.h"
#include "pipeline/log.h"
#include "stages/run_config.h"
#include "stages/cache.h"
#include "stages/circuit_file.h"
#include "stages/fv.h"
#include "stages/mean_stage.h"
#include "stages/patch.h"
#include "stages/prune.h"
#include "stages/report.h"
#include "stages/stage_inputs.h"
#include "stages/tokenize.h"

static const char *const stage_names[RUN_N_STAGES] = {"tokenize", "cache", "patch", "score", "prune", "fv"};

const char *run_stage_name(run_stage s) { return s >= 0 && s < RUN_N_STAGES ? stage_names[s] : "?"; }

int run_stage_from_name(const char *name) {
    for (int s = 0; s < RUN_N_STAGES; s++)
        if (!strcmp(name, stage_names[s])) return s;
    return -1;
}

// 1 if the file at path is not the one `before` describes (written anew: files are replaced whole).
static int file_replaced(const char *path, const struct stat *before, int existed) {
    struct stat now;
    if (stat(path, &now)) return 0;
    return !existed || now.st_ino != before->st_ino || now.st_dev != before->st_dev ||
           now.st_mtim.tv_sec != before->st_mtim.tv_sec || now.st_mtim.tv_nsec != before->st_mtim.tv_nsec;
}

static int count_rounds(const char *run_dir) {
    char path[4200];
    int n = 0;
    for (;; n++) {
        prune_round_path(run_dir, n, path, sizeof path);
        if (access(path, F_OK)) return n;
    }
}

// The model stages and the rounds, once the config is loaded and the groups are formed.
static int run_stages(sched_ctx *sc, const run_config *cfg, run_stage last, int fresh, FILE *report_out, run_summary *sum,
                      ep_error *err) {
    int root = sc->rank == 0;
    // Rank 0 first removes what killed writers left (*.tmp-PID anywhere in the run folder), while the
    // other ranks wait below and nothing of this run writes yet; then it tokenizes (it is cheap).
    // Nothing starts once a stop was asked for.
    int removed = 0, status = sched_stop_requested() ? SCHED_STOPPED : SCHED_OK;
    if (status == SCHED_OK && root && remove_temporaries(cfg->output_path, 8, NULL, &removed, err)) status = SCHED_FAILED;
    if (root && removed)
        ep_logf(sc->log, EP_LOG_WARN, "edgepatch run: removed %d unfinished file%s left by killed writers (*.tmp-PID) in %s",
                removed, removed == 1 ? "" : "s", cfg->output_path);
    // Whether tokenize wrote prompts.h5 anew (the summary; the stage itself only says so in its lines).
    char prompts[4200];
    struct stat before;
    snprintf(prompts, sizeof prompts, "%s/prompts.h5", cfg->output_path);
    int existed = stat(prompts, &before) == 0;
    if (status == SCHED_OK && root && tokenize_stage(cfg, fresh, sc->log, err)) status = SCHED_FAILED;
    status = sched_agree(sc, status);
    if (status == SCHED_OK) sum->state[RUN_TOKENIZE] = file_replaced(prompts, &before, existed) ? RUN_COMPUTED : RUN_UP_TO_DATE;
    stage_inputs in;
    const kernel_ops *ops = NULL;
    int opened = 0;
    // Every rank has its backend before the groups for its memory are built (collective over a group).
    if (status == SCHED_OK && last >= RUN_CACHE)
        status = sched_agree(sc, stage_backend(cfg, sc->log, &ops, err) ? SCHED_FAILED : SCHED_OK);
    if (status == SCHED_OK && last >= RUN_CACHE) {
        opened = sched_open_groups(sc, ops, err) == 0 &&
                 stage_inputs_open_shard(cfg, ops, &sc->host_group, &sc->device_group, sc->log, &in, err) == 0;
        status = sched_agree(sc, opened ? SCHED_OK : SCHED_FAILED);
    }
    // The prune stage's fields and inputs (an earlier run's round files) are checked before any work.
    prune_run *pr = NULL;
    if (status == SCHED_OK && last >= RUN_SCORE)
        status = sched_agree(sc, prune_open(&in, last == RUN_SCORE ? 1 : -1, &pr, err) ? SCHED_FAILED : SCHED_OK);
    // A shard found damaged where a later step reads it (a cache shard read by a patch item, a shard
    // read by a merge) was removed: the stages run again from the cache stage, whose item checks
    // recompute what is missing (SCHED_RETRY; a few times at most, then the run fails with its message).
    static int (*const model_stage[])(stage_inputs *, work_stage *, ep_error *) = {cache_work, patch_work};
    int retries = 0;
    for (run_stage s = RUN_CACHE; s <= RUN_PATCH && s <= last && status == SCHED_OK; s++) {
        work_stage ws;
        if (s == RUN_CACHE && in.mean_donors) {  // the mean donor's chunks, then its table on every rank
            int made = mean_stage_work(&in, &ws, err) == 0;
            status = sched_agree(sc, made ? SCHED_OK : SCHED_FAILED);
            if (status == SCHED_OK) status = sched_run_stage(sc, &ws, fresh && !retries, err);
            if (made) ws.release(&ws);
            if (status == SCHED_OK) status = sched_agree(sc, mean_stage_load(&in, err) ? SCHED_FAILED : SCHED_OK);
            if (status == SCHED_RETRY && retries < 3) {  // a damaged chunk was removed: again from here
                status = SCHED_OK, s = RUN_TOKENIZE, retries++;
                continue;
            }
            if (status != SCHED_OK) break;
        }
        int made = model_stage[s - RUN_CACHE](&in, &ws, err) == 0;
        status = sched_agree(sc, made ? SCHED_OK : SCHED_FAILED);
        if (status == SCHED_OK) status = sched_run_stage(sc, &ws, fresh && !retries, err);
        if (made && status == SCHED_OK) {
            sum->items[s] = ws.n_items;
            sum->computed[s] += sc->stage_pending;
            sum->state[s] = sum->computed[s] > 0 ? RUN_COMPUTED : RUN_UP_TO_DATE;
        }
        if (made) ws.release(&ws);
        if (status == SCHED_RETRY && retries < 3) status = SCHED_OK, s = RUN_TOKENIZE, retries++;
    }
    // Score and prune rounds (docs/pruning.md): each round's prompt batches are work items over the
    // ranks; rank 0 merges them, prunes and writes the round file before the next round starts.
    if (status == SCHED_OK && last >= RUN_SCORE) {
        status = sched_agree(sc, root && prune_prepare(pr, fresh, err) ? SCHED_FAILED : SCHED_OK);
        // Rounds whose items this call computed: round 0 is the score stage, the later ones prune's. A
        // round's index is the number of round files written before it.
        int walked = 0, score_new = 0, prune_new = 0;
        while (status == SCHED_OK) {
            work_stage ws;
            int r = prune_next_round(pr, root, &ws, err);
            status = sched_agree(sc, r < 0 ? SCHED_FAILED : SCHED_OK);
            int index = count_rounds(cfg->output_path);
            if (r > 0 && status == SCHED_OK) status = sched_run_stage(sc, &ws, 0, err);
            if (r > 0 && status == SCHED_OK && sc->stage_pending > 0) *(index == 0 ? &score_new : &prune_new) += 1;
            if (r > 0) ws.release(&ws);
            if (r == 0) {
                walked = 1;
                break;
            }
            if (status == SCHED_RETRY && retries < 3) status = SCHED_OK, retries++;  // the same round again
        }
        int rounds = count_rounds(cfg->output_path);
        if (walked || rounds > 0) {  // after a stop or failure: what was done so far
            sum->items[RUN_SCORE] = rounds > 0, sum->computed[RUN_SCORE] = score_new;
            sum->state[RUN_SCORE] = score_new ? RUN_COMPUTED : RUN_UP_TO_DATE;
        }
        if (last >= RUN_PRUNE && (walked || rounds > 1)) {
            sum->items[RUN_PRUNE] = rounds > 1 ? rounds - 1 : 0, sum->computed[RUN_PRUNE] = prune_new;
            sum->state[RUN_PRUNE] = prune_new ? RUN_COMPUTED : RUN_UP_TO_DATE;
        }
    }
    prune_close(pr);
    // Function vectors (stages/fv.h): rank 0 alone, one prompt per pass, after the rounds (top_k reads round
    // 0's scores). Without a function_vectors block the stage is not reached.
    if (status == SCHED_OK && last >= RUN_FV && cfg->fv.on) {
        char path[4200];
        struct stat fv_before;
        snprintf(path, sizeof path, "%s/function_vectors.h5", cfg->output_path);
        int fv_existed = stat(path, &fv_before) == 0;
        status = sched_agree(sc, root && fv_stage(&in, fresh, err) ? SCHED_FAILED : SCHED_OK);
        if (status == SCHED_OK) {
            sum->items[RUN_FV] = 1;
            sum->computed[RUN_FV] = file_replaced(path, &fv_before, fv_existed);
            sum->state[RUN_FV] = sum->computed[RUN_FV] ? RUN_COMPUTED : RUN_UP_TO_DATE;
        }
    }
    // The run ends with its report; rank 0 only, after every rank is done.
    if (status == SCHED_OK && root && last >= RUN_PATCH) {
        fprintf(report_out, "\nreport (%s/report.txt):\n", cfg->output_path);
        if (report_write(cfg->output_path, report_out, err)) status = SCHED_FAILED;
    }
    if (opened) stage_inputs_close(&in);
    sched_close_groups(sc);
    return status == SCHED_RETRY ? SCHED_FAILED : status;
}

int run_pipeline(sched_ctx *sc, const char *config_path, run_stage last, int fresh, FILE *report_out, run_summary *summary,
                 ep_error *err) {
    err->msg[0] = 0;
    run_summary ignored;
    run_summary *sum = summary ? summary : &ignored;
    memset(sum, 0, sizeof *sum);
    run_config cfg;
    if (run_config_load(config_path, &cfg, err)) return SCHED_FAILED;
    snprintf(sum->output_path, sizeof sum->output_path, "%s", cfg.output_path);
    if (last >= RUN_CACHE && !cfg.model_path) {  // refused before anything runs, not after tokenize
        ep_fail(err, "%s: field model_path: required for the model stages (or --until tokenize)", cfg.path);
        run_config_free(&cfg);
        return SCHED_FAILED;
    }
    // Groups of tensor_parallel ranks share one model (docs/tensor_parallel.md).
    int status = sched_set_tensor_parallel(sc, cfg.tensor_parallel, cfg.path, err) ? SCHED_FAILED
                                                                                      : run_stages(sc, &cfg, last, fresh, report_out, sum, err);
    run_config_free(&cfg);
    return status;
}
