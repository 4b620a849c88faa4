// edgepatch run CONFIG [--until STAGE] [--fresh]: runs or resumes a config's stages in order, alone or
// as one rank of an MPI job (sched/mpi_run.h: rank 0 tokenizes, the model stages are sharded by item).
#include <stdio.h>
#include <string.h>

#include "pipeline/cli.h"
#include "stages/run_config.h"
#include "sched/mpi_run.h"
#include "stages/cache.h"
#include "stages/patch.h"
#include "stages/prune.h"
#include "stages/report.h"
#include "stages/stage_io.h"
#include "stages/tokenize.h"

static const char usage[] =
    "usage: edgepatch run CONFIG [--until STAGE] [--fresh]\n"
    "\n"
    "Runs the stages of the run described by CONFIG (JSON) in order, skipping work whose complete output\n"
    "already matches its inputs, so a killed run resumes where it stopped.\n"
    "  --until STAGE  stop after STAGE: tokenize, cache, patch, score (round 0's scores) or prune (every\n"
    "                 round; docs/pruning.md)\n"
    "  --fresh        rebuild outputs even if they exist (needed when inputs changed); a rerun without it\n"
    "                 resumes an interrupted --fresh run\n"
    "Once the patch stage is done, the run ends with its report (see edgepatch report --help).\n"
    "\n"
    "Under mpirun or srun the cache and patch stages are shared out over the ranks by work item (a batch\n"
    "of batch_size prompts); the outputs are identical for any number of ranks (docs/distribution.md).\n"
    "With tensor_parallel T in CONFIG, groups of T ranks split one model between them (docs/tensor_parallel.md).\n"
    "SIGTERM or SIGUSR1 stops the run after the items in flight: exit status 75, rerun to resume.\n"
    "Exit status: 0 done, 1 failed, 2 usage, 75 interrupted (rerun to resume).\n";

static const char *stages[] = {"tokenize", "cache", "patch", "score", "prune"};

int cmd_run(int argc, char **argv) {
    if (cli_wants_help(argc, argv)) {
        fputs(usage, stdout);
        return 0;
    }
    const char *config = NULL, *until = "prune";
    int fresh = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--fresh")) fresh = 1;
        else if (!strcmp(argv[i], "--until") && i + 1 < argc) until = argv[++i];
        else if (argv[i][0] == '-' || config) {
            fprintf(stderr, "edgepatch run: unexpected argument '%s' (see --help)\n", argv[i]);
            return 2;
        } else config = argv[i];
    }
    int last = -1;
    for (int s = 0; s < 5; s++)
        if (!strcmp(until, stages[s])) last = s;
    if (!config || last < 0) {
        fprintf(stderr, "edgepatch run: need CONFIG%s (see --help)\n", last < 0 ? " and a known --until stage" : "");
        return 2;
    }
    sched_ctx sc;
    ep_error err = {{0}};
    if (sched_init(&sc, &argc, &argv, &err)) {
        fprintf(stderr, "edgepatch run: %s\n", err.msg);
        return 1;
    }
    int root = sc.rank == 0;
    run_config cfg;
    if (run_config_load(config, &cfg, &err)) {
        if (root) fprintf(stderr, "edgepatch run: %s\n", err.msg);
        sched_finalize(&sc);
        return 1;
    }
    if (last >= 1 && !cfg.model_path) {  // refused before anything runs, not after tokenize
        if (root) fprintf(stderr, "edgepatch run: %s: field model_path: required for the model stages (or --until tokenize)\n", cfg.path);
        run_config_free(&cfg);
        sched_finalize(&sc);
        return 1;
    }
    // Groups of tensor_parallel ranks share one model (docs/tensor_parallel.md).
    if (sched_set_tensor_parallel(&sc, cfg.tensor_parallel, cfg.path, &err)) {
        if (root) fprintf(stderr, "edgepatch run: %s\n", err.msg);
        run_config_free(&cfg);
        sched_finalize(&sc);
        return 1;
    }
    // Rank 0 first removes what killed writers left (*.tmp-PID anywhere in the run folder), while the
    // other ranks wait below and nothing of this run writes yet; then it tokenizes (it is cheap).
    // Nothing starts once a stop was asked for.
    int removed = 0, status = sched_stop_requested() ? SCHED_STOPPED : SCHED_OK;
    if (status == SCHED_OK && root && stage_remove_temporaries(cfg.output_path, 8, NULL, &removed, &err)) status = SCHED_FAILED;
    if (root && removed)
        fprintf(stderr, "edgepatch run: removed %d unfinished file%s left by killed writers (*.tmp-PID) in %s\n", removed,
                removed == 1 ? "" : "s", cfg.output_path);
    if (status == SCHED_OK && root && tokenize_stage(&cfg, fresh, &err)) status = SCHED_FAILED;
    status = sched_agree(&sc, status);
    stage_inputs in;
    int opened = 0;
    if (status == SCHED_OK && last >= 1) {
        opened = stage_inputs_open_shard(&cfg, cfg.tensor_parallel > 1 ? &sc.group : NULL, &in, &err) == 0;
        status = sched_agree(&sc, opened ? SCHED_OK : SCHED_FAILED);
    }
    // The prune stage's fields and inputs (an earlier run's round files) are checked before any work.
    prune_run *pr = NULL;
    if (status == SCHED_OK && last >= 3) status = sched_agree(&sc, prune_open(&in, last == 3 ? 1 : -1, &pr, &err) ? SCHED_FAILED : SCHED_OK);
    // A shard found damaged where a later step reads it (a cache shard read by a patch item, a shard
    // read by a merge) was removed: the stages run again from the cache stage, whose item checks
    // recompute what is missing (SCHED_RETRY; a few times at most, then the run fails with its message).
    int retries = 0;
    for (int s = 1; s <= 2 && s <= last && status == SCHED_OK; s++) {
        work_stage ws;
        int made = (s == 1 ? cache_work : patch_work)(&in, &ws, &err) == 0;
        status = sched_agree(&sc, made ? SCHED_OK : SCHED_FAILED);
        if (status == SCHED_OK) status = sched_run_stage(&sc, &ws, fresh && !retries, &err);
        if (made) ws.release(&ws);
        if (status == SCHED_RETRY && retries < 3) status = SCHED_OK, s = 0, retries++;
    }
    // Score and prune rounds (docs/pruning.md): each round's prompt batches are work items over the
    // ranks; rank 0 merges them, prunes and writes the round file before the next round starts.
    if (status == SCHED_OK && last >= 3) {
        status = sched_agree(&sc, root && prune_prepare(pr, fresh, &err) ? SCHED_FAILED : SCHED_OK);
        while (status == SCHED_OK) {
            work_stage ws;
            int r = prune_next_round(pr, root, &ws, &err);
            status = sched_agree(&sc, r < 0 ? SCHED_FAILED : SCHED_OK);
            if (r > 0 && status == SCHED_OK) status = sched_run_stage(&sc, &ws, 0, &err);
            if (r > 0) ws.release(&ws);
            if (r == 0) break;
            if (status == SCHED_RETRY && retries < 3) status = SCHED_OK, retries++;  // the same round again
        }
    }
    prune_close(pr);
    // The run ends with its report (stages/report.h); rank 0 only, after every rank is done.
    if (status == SCHED_OK && root && last >= 2) {
        printf("\nreport (%s/report.txt):\n", cfg.output_path);
        if (report_write(cfg.output_path, stdout, &err)) status = SCHED_FAILED;
    }
    int rc = 0;
    if (status == SCHED_FAILED || status == SCHED_RETRY) {
        if (root) fprintf(stderr, "edgepatch run: %s\n", err.msg[0] ? err.msg : "stopped because another rank failed");
        rc = 1;
    } else if (status == SCHED_STOPPED) {
        if (root)
            fprintf(stderr, "edgepatch run: interrupted by a signal; finished items are saved, run the same command again "
                            "to resume (exit status %d)\n", SCHED_EXIT_INTERRUPTED);
        rc = SCHED_EXIT_INTERRUPTED;
    }
    if (opened) stage_inputs_close(&in);
    run_config_free(&cfg);
    sched_finalize(&sc);
    return rc;
}
