// edgepatch sweep plan|submit|status SWEEP: a sweep of models x tasks as Slurm job arrays (sched/sweep.h,
// docs/sweeps.md). plan and status read the run folders; submit writes the run configs and batch
// scripts and hands them to sbatch.
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sched/cli/cli.h"
#include "sched/sweep.h"

static const char usage[] =
    "usage: edgepatch sweep plan|submit|status SWEEP [--dry-run]\n"
    "\n"
    "SWEEP is a sweep config (configs/sweeps/*.json: models, tasks, stages, Slurm settings; docs/sweeps.md).\n"
    "  plan    the runs, each model's resource estimate (weights, K/V cache per prompt token, GPU memory per\n"
    "          rank) and the jobs a submit would make; nothing is written\n"
    "  submit  writes every unfinished run's config into its folder and one batch script per model and\n"
    "          stage (<output_root>/slurm/), then submits them with sbatch: one job array per model and\n"
    "          stage, each stage's array task i after the previous stage's task i (aftercorr). Submitting\n"
    "          again resubmits what is not done; finished work is never redone (runs resume).\n"
    "          --dry-run writes the scripts and prints the sbatch commands instead of running them\n"
    "  status  per run: done, started, pending, failed (the batch script's job-failed.txt) or conflict\n"
    "          (the folder holds another config's run), the last finished stage, cache items, prune rounds;\n"
    "          read from the run folders, not from Slurm\n"
    "Relative paths in SWEEP are taken from the working directory, in the jobs too (sbatch starts them there).\n"
    "Exit status: 0 ok, 1 bad sweep or failed submission, 2 usage.\n";

static void human_bytes(double b, char *out, size_t n) {
    const char *units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    while (b >= 1024 && u < 4) b /= 1024, u++;
    snprintf(out, n, u ? "%.1f %s" : "%.0f %s", b, units[u]);
}

static void human_count(double x, char *out, size_t n) {
    if (x >= 1e9) snprintf(out, n, "%.2fB", x / 1e9);
    else if (x >= 1e6) snprintf(out, n, "%.1fM", x / 1e6);
    else snprintf(out, n, "%.1fk", x / 1e3);
}

static void print_runs(const sweep *s, int *counts) {
    printf("%-40s %-9s %-9s %7s %6s  %s\n", "run", "state", "stage", "cache", "rounds", "detail");
    for (int m = 0; m < s->n_models; m++)
        for (int t = 0; t < s->n_tasks; t++) {
            run_status st;
            ep_error err = {{0}};
            char name[256], cache[32];
            snprintf(name, sizeof name, "%s/%s", s->models[m].name, s->tasks[t]);
            if (sweep_run_status(s, m, t, &st, &err)) {
                printf("%-40s %-9s %s\n", name, "error", err.msg);
                continue;
            }
            snprintf(cache, sizeof cache, "%d/%d", st.cache_items, st.n_items);
            printf("%-40s %-9s %-9s %7s %6d  %s\n", name, run_state_name(st.state), st.stage, cache, st.rounds, st.detail);
            counts[st.state]++;
        }
}

static int plan(const sweep *s) {
    printf("sweep %s: %d models x %d tasks = %d runs into %s; jobs per model:", s->name, s->n_models, s->n_tasks,
           s->n_models * s->n_tasks, s->output_root);
    for (int g = 0; g < s->n_stages; g++)
        printf("%s %s (until %s, %s)", g ? " ->" : "", s->stages[g].name, s->stages[g].until,
               s->stages[g].gpus ? "the model's GPUs and ranks" : "1 CPU task");
    printf("\n\n%-16s %9s %-9s %10s %10s %3s %4s %5s %12s\n", "model", "params", "dtype", "weights", "K/V/token", "tp",
           "gpus", "ranks", "GPU mem/rank");
    for (int m = 0; m < s->n_models; m++) {
        const sweep_model *md = &s->models[m];
        sweep_estimate e;
        ep_error err = {{0}};
        if (sweep_estimate_model(s, m, &e, &err)) {
            fprintf(stderr, "edgepatch sweep: %s\n", err.msg);
            return 1;
        }
        char p[32], w[32], kv[32], g[32];
        human_count(e.params, p, sizeof p);
        human_bytes(e.weight_bytes, w, sizeof w), human_bytes(e.kv_bytes_per_token, kv, sizeof kv);
        human_bytes(e.gpu_bytes_per_rank, g, sizeof g);
        printf("%-16s %9s %-9s %10s %10s %3d %4d %5d %12s%s\n", md->name, p, md->dtype, w, kv,
               md->tensor_parallel, md->gpus, md->ranks, g,
               s->gpu_memory_gb > 0 && e.gpu_bytes_per_rank > s->gpu_memory_gb * (1 << 30) ? "  (over gpu_memory_gb: raise tensor_parallel)" : "");
    }
    printf("(GPU memory per rank: weights / tensor_parallel plus one batch of %d-token prompts; docs/sweeps.md)\n\n",
           s->prompt_tokens);
    int counts[5] = {0};
    print_runs(s, counts);
    printf("%d runs: %d done, %d to submit\n", s->n_models * s->n_tasks, counts[RUN_DONE],
           s->n_models * s->n_tasks - counts[RUN_DONE]);
    return 0;
}

static int status(const sweep *s) {
    int counts[5] = {0};
    print_runs(s, counts);
    printf("%d runs: %d done, %d started, %d pending, %d failed, %d conflict\n", s->n_models * s->n_tasks,
           counts[RUN_DONE], counts[RUN_STARTED], counts[RUN_PENDING], counts[RUN_FAILED], counts[RUN_CONFLICT]);
    return 0;
}

// The sbatch command for a stage's script, after the job `after` (NULL: none). sweep_load keeps single
// quotes out of output_root, so the quoting holds.
static void sbatch_command(const char *script, const char *after, char *cmd, size_t n) {
    if (after) snprintf(cmd, n, "sbatch --parsable --dependency=aftercorr:%s --kill-on-invalid-dep=yes '%s'", after, script);
    else snprintf(cmd, n, "sbatch --parsable '%s'", script);
}

// Runs sbatch --parsable on a script; the job id, or -1 with err filled.
static long sbatch(const char *script, long after, ep_error *err) {
    char cmd[8400], dep[32];
    snprintf(dep, sizeof dep, "%ld", after);
    sbatch_command(script, after > 0 ? dep : NULL, cmd, sizeof cmd);
    FILE *p = popen(cmd, "r");
    if (!p) return ep_fail(err, "%s: cannot run sbatch", script);
    char out[256] = "";
    if (!fgets(out, sizeof out, p)) out[0] = 0;
    int rc = pclose(p);
    out[strcspn(out, "\n")] = 0;
    char *end;
    long id = strtol(out, &end, 10);
    if (rc != 0 || end == out || (*end && *end != ';'))
        return ep_fail(err, "%s: sbatch failed (wait status %d%s%s)", script, rc, out[0] ? ", output: " : "", out);
    return id;
}

static int submit(const sweep *s, int dry_run) {
    char program[PATH_MAX] = "edgepatch";
    ssize_t len = readlink("/proc/self/exe", program, sizeof program - 1);
    if (len > 0) program[len] = 0;
    // The jobs start the front beside us (sched/cli/launch.c), which holds stop signals while we load.
    char *base = strrchr(program, '/');
    if (base && !strcmp(base, "/edgepatch-core")) {
        strcpy(base, "/edgepatch");
        if (access(program, X_OK) != 0) strcpy(base, "/edgepatch-core");
    }
    int *n_runs = calloc((size_t)s->n_models, sizeof *n_runs);
    ep_error err = {{0}};
    int rc = 0;
    if (!n_runs || sweep_write_jobs(s, program, n_runs, &err)) {
        fprintf(stderr, "edgepatch sweep submit: %s\n", n_runs ? err.msg : "out of memory");
        free(n_runs);
        return 1;
    }
    for (int m = 0; m < s->n_models && rc == 0; m++) {
        if (!n_runs[m]) {
            printf("%s: every run done, nothing to submit\n", s->models[m].name);
            continue;
        }
        printf("%s: %d runs:", s->models[m].name, n_runs[m]);
        long prev = 0;
        for (int g = 0; g < s->n_stages; g++) {
            char script[4200];
            sweep_script_path(s, m, g, script, sizeof script);
            if (dry_run) {
                char cmd[8400];
                sbatch_command(script, g ? "<previous>" : NULL, cmd, sizeof cmd);
                printf("%s %s", g ? " then" : "", cmd);
                continue;
            }
            long id = sbatch(script, prev, &err);
            if (id < 0) {
                printf("\n");
                fprintf(stderr, "edgepatch sweep submit: %s\n", err.msg);
                rc = 1;
                break;
            }
            printf(" %s job %ld%s", s->stages[g].name, id, prev ? " (aftercorr)" : "");
            prev = id;
        }
        if (rc == 0) printf("\n");
    }
    free(n_runs);
    return rc;
}

int cmd_sweep(int argc, char **argv) {
    if (cli_wants_help(argc, argv)) {
        fputs(usage, stdout);
        return 0;
    }
    const char *action = NULL, *path = NULL;
    int dry_run = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--dry-run")) dry_run = 1;
        else if (argv[i][0] == '-' || (action && path)) {
            fprintf(stderr, "edgepatch sweep: unexpected argument '%s' (see --help)\n", argv[i]);
            return 2;
        } else if (!action) action = argv[i];
        else path = argv[i];
    }
    if (!action || !path || (strcmp(action, "plan") && strcmp(action, "submit") && strcmp(action, "status")) ||
        (dry_run && strcmp(action, "submit"))) {
        fprintf(stderr, "edgepatch sweep: need plan, submit or status and SWEEP%s (see --help)\n",
                dry_run ? "; --dry-run is for submit" : "");
        return 2;
    }
    sweep s;
    ep_error err = {{0}};
    if (sweep_load(path, &s, &err)) {
        fprintf(stderr, "edgepatch sweep: %s\n", err.msg);
        return 1;
    }
    int rc = !strcmp(action, "plan") ? plan(&s) : !strcmp(action, "status") ? status(&s) : submit(&s, dry_run);
    sweep_free(&s);
    return rc;
}
