// edgepatch sweep plan|submit|status SWEEP: a sweep of models x tasks as Slurm job arrays (sched/sweep.h,
// docs/sweeps.md). plan and status read the run folders; submit writes the run configs and batch
// scripts and hands them to sbatch.
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "pipeline/files.h"
#include "pipeline/log.h"
#include "sched/cli/cli.h"
#include "sched/run.h"
#include "sched/signals.h"
#include "sched/sweep.h"

static const char usage[] =
    "usage: edgepatch sweep plan|status SWEEP [--json]\n"
    "       edgepatch sweep submit SWEEP [--dry-run]\n"
    "       edgepatch sweep run SWEEP\n"
    "\n"
    "SWEEP is a sweep config (configs/sweeps/*.json: models, tasks, stages, Slurm settings; docs/sweeps.md).\n"
    "  plan    the runs, each model's resource estimate (weights, K/V cache per prompt token, GPU memory per\n"
    "          rank), each run's disk estimate by artifact (prompts.h5, cache shards, patch, prune rounds)\n"
    "          and their total, and the jobs a submit would make; nothing is written\n"
    "  submit  writes every unfinished run's config into its folder and one batch script per model and\n"
    "          stage (<output_root>/slurm/), then submits them with sbatch: one job array per model and\n"
    "          stage, each stage's array task i after the previous stage's task i (aftercorr). Submitting\n"
    "          again resubmits what is not done; finished work is never redone (runs resume).\n"
    "  status  per run: done, started, pending, failed (the batch script's job-failed.txt) or conflict\n"
    "          (the folder holds another config's run), the last finished stage, cache items, prune rounds;\n"
    "          read from the run folders, not from Slurm\n"
    "  run     runs every run here, one after another, without Slurm (each as `edgepatch run` would, up to\n"
    "          its last stage), skipping finished ones; writes <output_root>/sweep-times.json (wall and CPU\n"
    "          seconds per run). A stop signal (SIGTERM, SIGUSR1) ends it with exit status 75, the run in\n"
    "          flight checkpointed; run it again to resume\n"
    "Options:\n"
    "  --json     (plan, status) one JSON object on stdout instead of the tables (bytes as integers)\n"
    "  --dry-run  (submit) write the scripts and print the sbatch commands instead of running them\n"
    "  -h, --help this text\n"
    "Relative paths in SWEEP are taken from the working directory, in the jobs too (sbatch starts them there).\n"
    "Exit status: 0 ok, 1 bad sweep, failed submission or failed run, 2 usage, 75 (run) stopped by a signal.\n";

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
        for (int t = 0; t < s->n_entries; t++) {
            run_status st;
            ep_error err = {{0}};
            char name[256], cache[32];
            snprintf(name, sizeof name, "%s/%s", s->models[m].name, s->entries[t].name);
            if (sweep_run_status(s, m, t, &st, &err)) {
                printf("%-40s %-9s %s\n", name, "error", err.msg);
                continue;
            }
            snprintf(cache, sizeof cache, "%d/%d", st.cache_items, st.n_items);
            printf("%-40s %-9s %-9s %7s %6d  %s\n", name, run_state_name(st.state), st.stage, cache, st.rounds, st.detail);
            counts[st.state]++;
        }
}

static json_t *bytes_json(double b) { return json_integer((json_int_t)llround(b)); }

static json_t *disk_json(const sweep_disk *d, int with_tokens) {
    json_t *o = json_object();
    if (with_tokens) {
        json_object_set_new(o, "tokens_per_prompt", json_real(d->tokens_per_prompt));
        json_object_set_new(o, "tokens_from", json_string(d->measured ? "prompts.h5" : "prompt_tokens"));
    }
    json_object_set_new(o, "prompts", bytes_json(d->prompts));
    json_object_set_new(o, "cache", bytes_json(d->cache));
    json_object_set_new(o, "patch", bytes_json(d->patch));
    json_object_set_new(o, "prune", bytes_json(d->prune));
    json_object_set_new(o, "total", bytes_json(d->total));
    return o;
}

// Every run's status as JSON objects (with its disk estimate when `disk`), counting states.
static int runs_json(const sweep *s, int disk, int *counts, json_t *runs, sweep_disk *sum, ep_error *err) {
    for (int m = 0; m < s->n_models; m++)
        for (int t = 0; t < s->n_entries; t++) {
            run_status st;
            ep_error rerr = {{0}};
            char dir[4096];
            json_t *o = json_object();
            sweep_run_dir(s, m, t, dir, sizeof dir);
            json_object_set_new(o, "model", json_string(s->models[m].name));
            json_object_set_new(o, "task", json_string(s->entries[t].task));
            json_object_set_new(o, "name", json_string(s->entries[t].name));
            json_object_set_new(o, "experiment", json_string(s->entries[t].experiment));
            json_object_set_new(o, "folder", json_string(dir));
            json_array_append_new(runs, o);
            if (sweep_run_status(s, m, t, &st, &rerr)) {
                json_object_set_new(o, "state", json_string("error"));
                json_object_set_new(o, "detail", json_string(rerr.msg));
                continue;
            }
            counts[st.state]++;
            json_object_set_new(o, "state", json_string(run_state_name(st.state)));
            json_object_set_new(o, "stage", json_string(st.stage));
            json_object_set_new(o, "cache_items", json_integer(st.cache_items));
            json_object_set_new(o, "n_items", json_integer(st.n_items));
            json_object_set_new(o, "rounds", json_integer(st.rounds));
            json_object_set_new(o, "detail", json_string(st.detail));
            if (!disk) continue;
            sweep_disk d;
            if (sweep_estimate_disk(s, m, t, &d, err)) return -1;
            json_object_set_new(o, "disk", disk_json(&d, 1));
            sum->prompts += d.prompts, sum->cache += d.cache, sum->patch += d.patch, sum->prune += d.prune;
            sum->total += d.total;
        }
    return 0;
}

static json_t *counts_json(const sweep *s, const int *counts) {
    json_t *o = json_object();
    json_object_set_new(o, "runs", json_integer(s->n_models * s->n_entries));
    for (int k = RUN_PENDING; k <= RUN_CONFLICT; k++) json_object_set_new(o, run_state_name((run_state)k), json_integer(counts[k]));
    return o;
}

static int print_json(json_t *o) {
    char *text = json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(6));
    json_decref(o);
    if (!text) {
        fprintf(stderr, "edgepatch sweep: out of memory\n");
        return 1;
    }
    puts(text);
    free(text);
    return 0;
}

static int plan_json(const sweep *s) {
    json_t *o = json_object(), *stages = json_array(), *models = json_array(), *runs = json_array();
    json_object_set_new(o, "sweep", json_string(s->name));
    json_object_set_new(o, "file", json_string(s->path));
    json_object_set_new(o, "output_root", json_string(s->output_root));
    json_object_set_new(o, "prompt_tokens", json_integer(s->prompt_tokens));
    for (int g = 0; g < s->n_stages; g++) {
        json_t *st = json_object();
        json_object_set_new(st, "name", json_string(s->stages[g].name));
        json_object_set_new(st, "until", json_string(s->stages[g].until));
        json_object_set_new(st, "gpus", json_boolean(s->stages[g].gpus));
        json_object_set_new(st, "time", s->stages[g].time ? json_string(s->stages[g].time) : json_null());
        json_array_append_new(stages, st);
    }
    json_object_set_new(o, "stages", stages);
    json_object_set_new(o, "models", models);
    json_object_set_new(o, "runs", runs);
    ep_error err = {{0}};
    for (int m = 0; m < s->n_models; m++) {
        const sweep_model *md = &s->models[m];
        sweep_estimate e;
        if (sweep_estimate_model(s, m, &e, &err)) goto fail;
        json_t *mo = json_object();
        json_object_set_new(mo, "name", json_string(md->name));
        json_object_set_new(mo, "path", json_string(md->path));
        json_object_set_new(mo, "dtype", json_string(md->dtype));
        json_object_set_new(mo, "params", bytes_json(e.params));
        json_object_set_new(mo, "weight_bytes", bytes_json(e.weight_bytes));
        json_object_set_new(mo, "kv_bytes_per_token", bytes_json(e.kv_bytes_per_token));
        json_object_set_new(mo, "tensor_parallel", json_integer(md->tensor_parallel));
        json_object_set_new(mo, "gpus", json_integer(md->gpus));
        json_object_set_new(mo, "ranks", json_integer(md->ranks));
        json_object_set_new(mo, "gpu_bytes_per_rank", bytes_json(e.gpu_bytes_per_rank));
        json_object_set_new(mo, "over_gpu_memory",
                            json_boolean(s->gpu_memory_gb > 0 && e.gpu_bytes_per_rank > s->gpu_memory_gb * (1 << 30)));
        json_array_append_new(models, mo);
    }
    int counts[5] = {0};
    sweep_disk sum = {0};
    if (runs_json(s, 1, counts, runs, &sum, &err)) goto fail;
    json_object_set_new(o, "disk", disk_json(&sum, 0));
    json_t *c = counts_json(s, counts);
    json_object_set_new(c, "to_submit", json_integer(s->n_models * s->n_entries - counts[RUN_DONE]));
    json_object_set_new(o, "counts", c);
    return print_json(o);
fail:
    json_decref(o);
    fprintf(stderr, "edgepatch sweep: %s\n", err.msg);
    return 1;
}

static int status_json(const sweep *s) {
    json_t *o = json_object(), *runs = json_array();
    json_object_set_new(o, "sweep", json_string(s->name));
    json_object_set_new(o, "file", json_string(s->path));
    json_object_set_new(o, "output_root", json_string(s->output_root));
    json_object_set_new(o, "runs", runs);
    int counts[5] = {0};
    ep_error err = {{0}};
    runs_json(s, 0, counts, runs, NULL, &err);  // without disk estimates it cannot fail
    json_object_set_new(o, "counts", counts_json(s, counts));
    return print_json(o);
}

// The disk table: each run's bytes by artifact, then the sweep's total.
static int print_disk(const sweep *s) {
    printf("%-40s %10s %10s %10s %10s %10s %10s\n", "disk (estimate)", "tok/prompt", "prompts", "cache", "patch",
           "prune", "total");
    sweep_disk sum = {0};
    int assumed = 0;
    for (int m = 0; m < s->n_models; m++)
        for (int t = 0; t < s->n_entries; t++) {
            sweep_disk d;
            ep_error err = {{0}};
            if (sweep_estimate_disk(s, m, t, &d, &err)) {
                fprintf(stderr, "edgepatch sweep: %s\n", err.msg);
                return 1;
            }
            char name[256], tok[32], b[5][32];
            snprintf(name, sizeof name, "%s/%s", s->models[m].name, s->entries[t].name);
            snprintf(tok, sizeof tok, "%.1f%s", d.tokens_per_prompt, d.measured ? "" : "*");
            assumed += !d.measured;
            double v[5] = {d.prompts, d.cache, d.patch, d.prune, d.total};
            for (int k = 0; k < 5; k++) human_bytes(v[k], b[k], sizeof b[k]);
            printf("%-40s %10s %10s %10s %10s %10s %10s\n", name, tok, b[0], b[1], b[2], b[3], b[4]);
            sum.prompts += d.prompts, sum.cache += d.cache, sum.patch += d.patch, sum.prune += d.prune, sum.total += d.total;
        }
    char b[5][32];
    double v[5] = {sum.prompts, sum.cache, sum.patch, sum.prune, sum.total};
    for (int k = 0; k < 5; k++) human_bytes(v[k], b[k], sizeof b[k]);
    printf("%-40s %10s %10s %10s %10s %10s %10s\n", "total", "", b[0], b[1], b[2], b[3], b[4]);
    printf("(bytes each run leaves through stage '%s'; tok/prompt from the run's prompts.h5%s; docs/sweeps.md)\n\n",
           s->stages[s->n_stages - 1].until, assumed ? ", * assumed: prompt_tokens" : "");
    return 0;
}

static int plan(const sweep *s) {
    printf("sweep %s: %d models x %d tasks and experiments = %d runs into %s; jobs per model:", s->name, s->n_models, s->n_entries,
           s->n_models * s->n_entries, s->output_root);
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
    if (print_disk(s)) return 1;
    int counts[5] = {0};
    print_runs(s, counts);
    printf("%d runs: %d done, %d to submit\n", s->n_models * s->n_entries, counts[RUN_DONE],
           s->n_models * s->n_entries - counts[RUN_DONE]);
    return 0;
}

static int status(const sweep *s) {
    int counts[5] = {0};
    print_runs(s, counts);
    printf("%d runs: %d done, %d started, %d pending, %d failed, %d conflict\n", s->n_models * s->n_entries,
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

static double seconds_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + t.tv_nsec * 1e-9;
}

static double cpu_seconds(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return (double)u.ru_utime.tv_sec + u.ru_utime.tv_usec * 1e-6 + (double)u.ru_stime.tv_sec + u.ru_stime.tv_usec * 1e-6;
}

// sweep-times.json: one record per run (model, name, task, experiment, until, state, wall_s, cpu_s) and
// the totals. A run found done keeps the times an earlier sweep run recorded for it (state "done",
// "skipped": true); without such a record its times are null.
static json_t *times_record(const sweep *s, int m, int t, json_t *old) {
    size_t i;
    json_t *r;
    json_array_foreach(json_object_get(old, "runs"), i, r) {
        if (!strcmp(json_string_value(json_object_get(r, "model")) ? json_string_value(json_object_get(r, "model")) : "",
                    s->models[m].name) &&
            json_string_value(json_object_get(r, "name")) && !strcmp(json_string_value(json_object_get(r, "name")), s->entries[t].name))
            return json_deep_copy(r);
    }
    return json_pack("{s:s,s:s,s:s,s:s,s:s,s:s,s:n,s:n}", "model", s->models[m].name, "name", s->entries[t].name,
                     "task", s->entries[t].task, "experiment", s->entries[t].experiment, "until",
                     run_stage_name((run_stage)sweep_run_goal(s, t)), "state", "pending", "wall_s", "cpu_s");
}

static int write_times(const sweep *s, const char *path, json_t *runs, double wall, ep_error *err) {
    double cpu_total = 0, wall_total = 0;
    size_t i;
    json_t *r;
    json_array_foreach(runs, i, r) {
        wall_total += json_number_value(json_object_get(r, "wall_s"));
        cpu_total += json_number_value(json_object_get(r, "cpu_s"));
    }
    json_t *o = json_pack("{s:s,s:s,s:O,s:{s:f,s:f},s:f}", "sweep", s->name, "file", s->path, "runs", runs, "total",
                          "wall_s", wall_total, "cpu_s", cpu_total, "this_call_wall_s", wall);
    int rc = make_dirs(s->output_root, err) || write_json_atomic(path, o, err) ? -1 : 0;
    json_decref(o);
    return rc;
}

// sweep run: every run of the sweep in this process, in order (models, then tasks and experiments).
static int run_all(const sweep *s, int *argc, char ***argv) {
    sched_ctx sc;
    ep_error err = {{0}};
    if (sched_init(&sc, argc, argv, &err)) {
        fprintf(stderr, "edgepatch sweep run: %s\n", err.msg);
        return 1;
    }
    ep_log log;
    ep_log_init(&log, stdout, stderr);
    if (ep_log_configure(&log, sc.rank, sc.size, &err)) {
        fprintf(stderr, "edgepatch sweep run: %s\n", err.msg);
        sched_finalize(&sc, 2);
        return 2;
    }
    sc.log = &log;
    char times_path[4200];
    snprintf(times_path, sizeof times_path, "%s/sweep-times.json", s->output_root);
    json_t *old = json_load_file(times_path, 0, NULL), *runs = json_array();
    int total = s->n_models * s->n_entries, k = 0, rc = 0;
    double start = seconds_now();
    for (int m = 0; m < s->n_models; m++)
        for (int t = 0; t < s->n_entries; t++) json_array_append_new(runs, times_record(s, m, t, old));
    json_decref(old);
    for (int m = 0; m < s->n_models && rc == 0; m++)
        for (int t = 0; t < s->n_entries && rc == 0; t++, k++) {
            json_t *rec = json_array_get(runs, (size_t)k), *c = NULL;
            char dir[4096], path[4200], name[512];
            snprintf(name, sizeof name, "%s/%s", s->models[m].name, s->entries[t].name);
            run_status st;
            if (sched_stop_requested()) {
                rc = SCHED_EXIT_INTERRUPTED;
                break;
            }
            if (sweep_run_status(s, m, t, &st, &err)) {
                rc = 1;
                break;
            }
            if (st.state == RUN_CONFLICT) {
                ep_fail(&err, "%s: run %s: %s (remove the folder or change output_root)", s->path, name, st.detail);
                rc = 1;
                break;
            }
            if (st.state == RUN_DONE) {
                json_object_set_new(rec, "state", json_string("done"));
                json_object_set_new(rec, "skipped", json_true());
                fprintf(stderr, "edgepatch sweep run: [%d/%d] %s: done already, skipped\n", k + 1, total, name);
                continue;
            }
            sweep_run_dir(s, m, t, dir, sizeof dir);
            snprintf(path, sizeof path, "%s/sweep-run.json", dir);
            if (make_dirs(dir, &err) || sweep_run_json(s, m, t, &c, &err) || write_json_atomic(path, c, &err)) {
                json_decref(c);
                rc = 1;
                break;
            }
            json_decref(c);
            int goal = sweep_run_goal(s, t);
            fprintf(stderr, "edgepatch sweep run: [%d/%d] %s: edgepatch run %s --until %s\n", k + 1, total, name, path,
                    run_stage_name((run_stage)goal));
            double w0 = seconds_now(), c0 = cpu_seconds();
            int status = run_pipeline(&sc, path, (run_stage)goal, 0, stdout, NULL, &err);
            double wall = seconds_now() - w0, cpu = cpu_seconds() - c0;
            // Times add up over the calls that worked on the run (a stopped run resumed later).
            double w_before = json_number_value(json_object_get(rec, "wall_s")), c_before = json_number_value(json_object_get(rec, "cpu_s"));
            const char *before = json_string_value(json_object_get(rec, "state"));
            int resumed = before && !strcmp(before, "interrupted") && json_is_number(json_object_get(rec, "wall_s"));
            json_object_set_new(rec, "wall_s", json_real((resumed ? w_before : 0) + wall));
            json_object_set_new(rec, "cpu_s", json_real((resumed ? c_before : 0) + cpu));
            json_object_del(rec, "skipped");
            json_object_set_new(rec, "state", json_string(status == SCHED_OK ? "done" : status == SCHED_STOPPED ? "interrupted" : "failed"));
            fprintf(stderr, "edgepatch sweep run: [%d/%d] %s: %s, %.1f s wall, %.1f s CPU\n", k + 1, total, name,
                    status == SCHED_OK ? "done" : status == SCHED_STOPPED ? "interrupted" : "failed", wall, cpu);
            if (status == SCHED_STOPPED) rc = SCHED_EXIT_INTERRUPTED;
            else if (status != SCHED_OK) {
                ep_wrap(&err, "run %s", name);
                rc = 1;
            }
            ep_error terr = {{0}};
            if (write_times(s, times_path, runs, seconds_now() - start, &terr)) {
                fprintf(stderr, "edgepatch sweep run: %s\n", terr.msg);
                rc = rc ? rc : 1;
            }
        }
    if (rc != 1 || !err.msg[0]) {  // the skipped runs' records too
        ep_error terr = {{0}};
        if (write_times(s, times_path, runs, seconds_now() - start, &terr)) {
            fprintf(stderr, "edgepatch sweep run: %s\n", terr.msg);
            rc = rc ? rc : 1;
        }
    }
    json_decref(runs);
    if (rc == 1) fprintf(stderr, "edgepatch sweep run: %s\n", err.msg[0] ? err.msg : "failed");
    else if (rc == SCHED_EXIT_INTERRUPTED)
        fprintf(stderr, "edgepatch sweep run: interrupted by a signal; finished work is saved, run the same command again "
                        "to resume (exit status %d)\n", SCHED_EXIT_INTERRUPTED);
    else fprintf(stderr, "edgepatch sweep run: %d runs done in %.1f s; times in %s\n", total, seconds_now() - start, times_path);
    sched_finalize(&sc, rc);
    return rc;
}

int cmd_sweep(int argc, char **argv) {
    enum { OPT_DRY_RUN = CLI_LONG_ONLY };
    static const struct option options[] = {{"dry-run", no_argument, NULL, OPT_DRY_RUN},
                                            {"json", no_argument, NULL, 'j'}, CLI_HELP_OPTION, {0}};
    int dry_run = 0, json = 0;
    cli_args a;
    cli_args_init(&a, "sweep", usage, argc, argv, options);
    for (int c; (c = cli_next(&a)) != CLI_END;) switch (c) {
        case OPT_DRY_RUN: dry_run = 1; break;
        case 'j': json = 1; break;
        default: return cli_args_exit(&a, c);
        }
    const char *action = a.n_positional > 0 ? a.positional[0] : NULL, *path = a.n_positional > 1 ? a.positional[1] : NULL;
    if (a.n_positional > 2) return cli_usage_error(&a, "unexpected argument '%s'", a.positional[2]);
    if (!action || !path ||
        (strcmp(action, "plan") && strcmp(action, "submit") && strcmp(action, "status") && strcmp(action, "run")))
        return cli_usage_error(&a, "need plan, submit, status or run and SWEEP");
    if (dry_run && strcmp(action, "submit")) return cli_usage_error(&a, "--dry-run is for submit");
    if (json && (!strcmp(action, "submit") || !strcmp(action, "run"))) return cli_usage_error(&a, "--json is for plan and status");
    if (cli_parse_only()) return cli_args_done(&a);
    cli_args_free(&a);  // action and path point into argv
    sweep s;
    ep_error err = {{0}};
    if (sweep_load(path, &s, &err)) {
        fprintf(stderr, "edgepatch sweep: %s\n", err.msg);
        return 1;
    }
    int rc = !strcmp(action, "run")      ? run_all(&s, &argc, &argv)
             : !strcmp(action, "plan")   ? (json ? plan_json(&s) : plan(&s))
             : !strcmp(action, "status") ? (json ? status_json(&s) : status(&s))
                                         : submit(&s, dry_run);
    sweep_free(&s);
    return rc;
}
