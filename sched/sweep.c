#include "sweep.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pipeline/files.h"
#include "pipeline/h5store.h"
#include "pipeline/hash.h"
#include "pipeline/model.h"
#include "pipeline/paths.h"
#include "stages/plan.h"
#include "stages/run_config.h"
#include "sched/run.h"
#include "stages/task.h"
#include "stages/tokenize.h"

static const char *top_fields[] = {"description", "name", "output_root", "run", "models", "tasks", "experiments",
                                   "stages", "prompt_tokens", "slurm"};
static const char *experiment_fields[] = {"name", "task", "experiment", "until", "run", "description"};
static const char *model_fields[] = {"name", "path", "dtype", "tensor_parallel", "gpus", "ranks", "config", "run",
                                     "description"};
static const char *stage_fields[] = {"name", "until", "gpus", "time"};
static const char *slurm_fields[] = {"partition", "account", "time", "signal_seconds", "cpus_per_rank", "array_max",
                                     "gpu_memory_gb", "options", "setup", "srun_options", "template"};
// Filled in per run; a sweep's "run" block must not set them.
static const char *per_run_fields[] = {"task", "model_path", "output_path", "tensor_parallel", "dtype"};

#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

static int in_list(const char *key, const char **list, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!strcmp(key, list[i])) return 1;
    return 0;
}

static int check_fields(json_t *o, const char **known, size_t n, const char *file, const char *where, ep_error *err) {
    if (!json_is_object(o)) return ep_fail(err, "%s: %s: expected a JSON object", file, where);
    const char *key;
    json_t *v;
    json_object_foreach(o, key, v) {
        if (!in_list(key, known, n)) return ep_fail(err, "%s: %s: unknown field '%s'", file, where, key);
    }
    return 0;
}

static int get_string(json_t *o, const char *key, int required, const char **out, const char *file, const char *where,
                      ep_error *err) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        if (required) return ep_fail(err, "%s: %s: field %s: required", file, where, key);
        return 0;
    }
    if (!json_is_string(v) || !json_string_length(v))
        return ep_fail(err, "%s: %s: field %s: expected a non-empty string", file, where, key);
    *out = json_string_value(v);
    return 0;
}

static int get_int(json_t *o, const char *key, long long lo, long long hi, int *out, const char *file, const char *where,
                   ep_error *err) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi)
        return ep_fail(err, "%s: %s: field %s: expected an integer in %lld..%lld", file, where, key, lo, hi);
    *out = (int)json_integer_value(v);
    return 0;
}

// A name used in file and job names: letters, digits, '.', '_', '-'.
static int check_name(const char *name, const char *file, const char *where, ep_error *err) {
    for (const char *p = name; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || strchr("._-", *p)))
            return ep_fail(err, "%s: %s: name '%s': use letters, digits, '.', '_' and '-' only", file, where, name);
    return 0;
}

static int string_array(json_t *a, const char *file, const char *where, ep_error *err) {
    if (!a) return 0;
    if (!json_is_array(a)) return ep_fail(err, "%s: %s: expected a list of strings", file, where);
    for (size_t i = 0; i < json_array_size(a); i++)
        if (!json_is_string(json_array_get(a, i))) return ep_fail(err, "%s: %s[%zu]: expected a string", file, where, i);
    return 0;
}

// A "run" block: run-config fields, except those the sweep sets per run.
static int check_run_block(json_t *run, const char *file, const char *where, ep_error *err) {
    if (!json_is_object(run)) return ep_fail(err, "%s: %s: expected a JSON object", file, where);
    for (size_t i = 0; i < COUNT(per_run_fields); i++)
        if (json_object_get(run, per_run_fields[i]))
            return ep_fail(err, "%s: %s: field %s: set per run by the sweep (models, tasks, output_root)", file, where,
                           per_run_fields[i]);
    return 0;
}

static int load_model(sweep *s, json_t *o, int i, ep_error *err) {
    sweep_model *m = &s->models[i];
    char where[64];
    snprintf(where, sizeof where, "models[%d]", i);
    if (check_fields(o, model_fields, COUNT(model_fields), s->path, where, err) ||
        get_string(o, "name", 1, &m->name, s->path, where, err) || check_name(m->name, s->path, where, err) ||
        get_string(o, "path", 1, &m->path, s->path, where, err) || get_string(o, "dtype", 0, &m->dtype, s->path, where, err))
        return -1;
    m->tensor_parallel = 1, m->gpus = -1, m->ranks = 1;
    if (get_int(o, "tensor_parallel", 1, 1024, &m->tensor_parallel, s->path, where, err) ||
        get_int(o, "gpus", 0, 4096, &m->gpus, s->path, where, err) || get_int(o, "ranks", 1, 4096, &m->ranks, s->path, where, err))
        return -1;
    if (m->gpus < 0) m->gpus = m->tensor_parallel;
    if (m->gpus > 0 && json_object_get(o, "ranks") && m->ranks != m->gpus)
        return ep_fail(err, "%s: %s: ranks = %d with gpus = %d: a run has one rank per GPU (ranks is for gpus = 0)",
                       s->path, where, m->ranks, m->gpus);
    if (m->gpus > 0) {
        if (m->gpus % m->tensor_parallel)
            return ep_fail(err, "%s: %s: gpus = %d is not a multiple of tensor_parallel = %d", s->path, where, m->gpus,
                           m->tensor_parallel);
        m->ranks = m->gpus;  // one rank per GPU
    } else if (m->ranks % m->tensor_parallel)
        return ep_fail(err, "%s: %s: ranks = %d is not a multiple of tensor_parallel = %d", s->path, where, m->ranks,
                       m->tensor_parallel);
    m->run = json_object_get(o, "run");
    snprintf(where, sizeof where, "models[%d].run", i);
    if (m->run && check_run_block(m->run, s->path, where, err)) return -1;
    snprintf(where, sizeof where, "models[%d]", i);
    // The config: the inline "config" (real models' numbers, for planning without the weights at hand), or
    // the model folder's config.json.
    json_t *config = json_object_get(o, "config");
    char cwhere[1100];
    json_t *loaded = NULL;
    if (config) {
        snprintf(cwhere, sizeof cwhere, "%s: %s.config", s->path, where);
        if (!json_is_object(config)) return ep_fail(err, "%s: expected a JSON object", cwhere);
    } else {
        snprintf(cwhere, sizeof cwhere, "%s/config.json", m->path);
        json_error_t jerr;
        config = loaded = json_load_file(cwhere, 0, &jerr);
        if (!loaded)
            return ep_fail(err, "%s: %s: model %s: %s (or give its numbers as an inline \"config\")", s->path, where,
                           m->name, jerr.text);
    }
    int rc = model_config_parse(config, cwhere, &m->cfg, err);
    if (rc == 0 && m->cfg.n_heads % m->tensor_parallel)
        rc = ep_fail(err, "%s: %s: tensor_parallel = %d does not divide %d attention heads", s->path, where,
                     m->tensor_parallel, m->cfg.n_heads);
    if (!m->dtype) m->dtype = "fp32";  // edgepatch run's default
    if (rc == 0 && strcmp(m->dtype, "fp32") && strcmp(m->dtype, "bf16"))
        rc = ep_fail(err, "%s: %s: field dtype: expected \"fp32\" or \"bf16\", got \"%s\"", s->path, where, m->dtype);
    json_decref(loaded);
    return rc;
}

static int load_stage(sweep *s, json_t *o, int i, ep_error *err) {
    sweep_stage *g = &s->stages[i];
    char where[64];
    snprintf(where, sizeof where, "stages[%d]", i);
    if (check_fields(o, stage_fields, COUNT(stage_fields), s->path, where, err) ||
        get_string(o, "name", 1, &g->name, s->path, where, err) || check_name(g->name, s->path, where, err) ||
        get_string(o, "until", 1, &g->until, s->path, where, err) || get_string(o, "time", 0, &g->time, s->path, where, err))
        return -1;
    if (run_stage_from_name(g->until) < 0)
        return ep_fail(err, "%s: %s: field until: '%s' is not tokenize, cache, patch, score, prune or fv", s->path, where, g->until);
    json_t *gpus = json_object_get(o, "gpus");
    if (gpus && !json_is_boolean(gpus)) return ep_fail(err, "%s: %s: field gpus: expected true or false", s->path, where);
    g->gpus = !gpus || json_is_true(gpus);
    return 0;
}

// Run (m, t)'s config: the sweep's run fields, the model's over them, then task, model_path, output_path,
// dtype and tensor_parallel (> 1 only); as JSON (config) and parsed and validated as edgepatch run would
// (rc), each when non-NULL, for the caller to free.
static int build_run(const sweep *s, int m, int t, json_t **config, run_config *rc, ep_error *err) {
    const sweep_model *md = &s->models[m];
    json_t *c = s->run ? json_deep_copy(s->run) : json_object();
    if (md->run) json_object_update(c, md->run);
    if (s->entries[t].run) json_object_update(c, s->entries[t].run);
    char dir[4096];
    sweep_run_dir(s, m, t, dir, sizeof dir);
    json_object_set_new(c, "task", json_string(s->entries[t].task));
    json_object_set_new(c, "model_path", json_string(md->path));
    json_object_set_new(c, "output_path", json_string(dir));
    json_object_set_new(c, "dtype", json_string(md->dtype));
    if (md->tensor_parallel > 1) json_object_set_new(c, "tensor_parallel", json_integer(md->tensor_parallel));
    char *text = json_dumps(c, JSON_COMPACT);
    char name[4200];
    snprintf(name, sizeof name, "%s: run %s/%s", s->path, md->name, s->entries[t].name);
    run_config parsed;
    int bad = run_config_parse(text, name, &parsed, err);
    free(text);
    // The whole config as edgepatch run checks it, against the model's shape the sweep has.
    if (!bad && (run_config_check_values(&parsed, err) || run_config_check_inputs(&parsed, &md->cfg, err))) {
        run_config_free(&parsed);
        bad = 1;
    }
    if (bad) {
        json_decref(c);
        return -1;
    }
    if (rc) *rc = parsed;
    else run_config_free(&parsed);
    if (config) *config = c;
    else json_decref(c);
    return 0;
}

int sweep_run_config(const sweep *s, int m, int t, run_config *rc, ep_error *err) { return build_run(s, m, t, NULL, rc, err); }

int sweep_run_json(const sweep *s, int m, int t, json_t **config, ep_error *err) { return build_run(s, m, t, config, NULL, err); }

int sweep_run_goal(const sweep *s, int t) {
    int last = run_stage_from_name(s->stages[s->n_stages - 1].until);
    int own = s->entries[t].until ? run_stage_from_name(s->entries[t].until) : last;
    return own < last ? own : last;
}

// A task name: checked as a file name part and loaded whole (its pairs too).
static int check_task(const char *name, const char *file, const char *where, ep_error *err) {
    task tk;
    if (check_name(name, file, where, err)) return -1;
    if (task_load(name, &tk, err)) return ep_wrap(err, "%s: %s", file, where);
    task_free(&tk);
    return 0;
}

// An "experiments" entry: name, task, experiment label, until, run.
static int load_experiment(sweep *s, json_t *o, int i, sweep_entry *e, ep_error *err) {
    char where[64];
    snprintf(where, sizeof where, "experiments[%d]", i);
    if (check_fields(o, experiment_fields, COUNT(experiment_fields), s->path, where, err) ||
        get_string(o, "name", 1, &e->name, s->path, where, err) || check_name(e->name, s->path, where, err) ||
        get_string(o, "task", 1, &e->task, s->path, where, err) ||
        get_string(o, "experiment", 0, &e->experiment, s->path, where, err) ||
        get_string(o, "until", 0, &e->until, s->path, where, err))
        return -1;
    if (!e->experiment) e->experiment = "";
    if (e->until && run_stage_from_name(e->until) < 0)
        return ep_fail(err, "%s: %s: field until: '%s' is not tokenize, cache, patch, score, prune or fv", s->path, where, e->until);
    char twhere[80];
    snprintf(twhere, sizeof twhere, "%s.task", where);
    if (check_task(e->task, s->path, twhere, err)) return -1;
    e->run = json_object_get(o, "run");
    snprintf(where, sizeof where, "experiments[%d].run", i);
    return e->run ? check_run_block(e->run, s->path, where, err) : 0;
}

int sweep_load(const char *path, sweep *s, ep_error *err) {
    memset(s, 0, sizeof *s);
    s->path = ep_strdup(path);
    json_error_t jerr;
    s->json = json_load_file(path, 0, &jerr);
    if (!s->json) {
        ep_fail(err, "%s: %s%s", path, jerr.line > 0 ? "invalid JSON: " : "", jerr.text);
        goto fail;
    }
    json_t *j = s->json, *slurm = json_object_get(j, "slurm");
    if (check_fields(j, top_fields, COUNT(top_fields), path, "sweep", err) ||
        get_string(j, "output_root", 1, &s->output_root, path, "sweep", err) ||
        get_string(j, "name", 1, &s->name, path, "sweep", err) || check_name(s->name, path, "sweep", err))
        goto fail;
    if (strchr(s->output_root, '\'')) {  // it is single-quoted in the sbatch command line
        ep_fail(err, "%s: field output_root: a path without single quotes, please", path);
        goto fail;
    }
    s->run = json_object_get(j, "run");
    if (s->run && check_run_block(s->run, path, "run", err)) goto fail;
    s->prompt_tokens = 256;
    if (get_int(j, "prompt_tokens", 1, 1 << 20, &s->prompt_tokens, path, "sweep", err)) goto fail;

    json_t *models = json_object_get(j, "models"), *tasks = json_object_get(j, "tasks"), *stages = json_object_get(j, "stages");
    json_t *experiments = json_object_get(j, "experiments");
    if (!json_is_array(models) || !json_array_size(models)) {
        ep_fail(err, "%s: field models: expected a non-empty list", path);
        goto fail;
    }
    if (experiments && !json_is_array(experiments)) {
        ep_fail(err, "%s: field experiments: expected a list of experiment entries", path);
        goto fail;
    }
    if (tasks && !json_is_array(tasks)) {
        ep_fail(err, "%s: field tasks: expected a list of task names", path);
        goto fail;
    }
    if (!json_array_size(tasks) && !json_array_size(experiments)) {
        ep_fail(err, "%s: field tasks: expected a non-empty list of task names (or experiments)", path);
        goto fail;
    }
    if (string_array(tasks, path, "tasks", err)) goto fail;
    s->n_models = (int)json_array_size(models);
    s->models = ep_calloc((size_t)s->n_models, sizeof *s->models);
    for (int i = 0; i < s->n_models; i++) {
        if (load_model(s, json_array_get(models, (size_t)i), i, err)) goto fail;
        for (int k = 0; k < i; k++)
            if (!strcmp(s->models[k].name, s->models[i].name)) {
                ep_fail(err, "%s: models[%d]: name '%s' used twice", path, i, s->models[i].name);
                goto fail;
            }
    }
    int n_plain = (int)json_array_size(tasks);
    s->n_entries = n_plain + (int)json_array_size(experiments);
    s->entries = ep_calloc((size_t)s->n_entries, sizeof *s->entries);
    for (int i = 0; i < s->n_entries; i++) {
        sweep_entry *e = &s->entries[i];
        char where[32];
        if (i < n_plain) {
            e->name = e->task = json_string_value(json_array_get(tasks, (size_t)i));
            e->experiment = "";
            snprintf(where, sizeof where, "tasks[%d]", i);
            if (check_task(e->task, path, where, err)) goto fail;
        } else {
            snprintf(where, sizeof where, "experiments[%d]", i - n_plain);
            if (load_experiment(s, json_array_get(experiments, (size_t)(i - n_plain)), i - n_plain, e, err)) goto fail;
        }
        for (int k = 0; k < i; k++)
            if (!strcmp(s->entries[k].name, e->name) && i < n_plain) {
                ep_fail(err, "%s: %s: task '%s' listed twice", path, where, e->name);
                goto fail;
            } else if (!strcmp(s->entries[k].name, e->name)) {
                ep_fail(err, "%s: %s: run name '%s' used twice (a task and an experiment share the model's folder)", path,
                        where, e->name);
                goto fail;
            }
    }
    if (stages) {
        if (!json_is_array(stages) || !json_array_size(stages)) {
            ep_fail(err, "%s: field stages: expected a non-empty list", path);
            goto fail;
        }
        s->n_stages = (int)json_array_size(stages);
        s->stages = ep_calloc((size_t)s->n_stages, sizeof *s->stages);
        for (int i = 0; i < s->n_stages; i++) {
            if (load_stage(s, json_array_get(stages, (size_t)i), i, err)) goto fail;
            if (i > 0 && run_stage_from_name(s->stages[i].until) <= run_stage_from_name(s->stages[i - 1].until)) {
                ep_fail(err, "%s: stages[%d]: until '%s' does not come after stages[%d]'s '%s'", path, i,
                        s->stages[i].until, i - 1, s->stages[i - 1].until);
                goto fail;
            }
        }
    } else {  // one job per run, through pruning
        s->n_stages = 1;
        s->stages = ep_calloc(1, sizeof *s->stages);
        s->stages[0] = (sweep_stage){.name = "run", .until = "prune", .gpus = 1};
    }

    s->signal_seconds = 120;
    if (slurm) {
        if (check_fields(slurm, slurm_fields, COUNT(slurm_fields), path, "slurm", err) ||
            get_string(slurm, "partition", 0, &s->partition, path, "slurm", err) ||
            get_string(slurm, "account", 0, &s->account, path, "slurm", err) ||
            get_string(slurm, "time", 0, &s->time, path, "slurm", err) ||
            get_string(slurm, "srun_options", 0, &s->srun_options, path, "slurm", err) ||
            get_string(slurm, "template", 0, &s->template_path, path, "slurm", err) ||
            get_int(slurm, "signal_seconds", 1, 86400, &s->signal_seconds, path, "slurm", err) ||
            get_int(slurm, "cpus_per_rank", 1, 4096, &s->cpus_per_rank, path, "slurm", err) ||
            get_int(slurm, "array_max", 1, 1000000, &s->array_max, path, "slurm", err))
            goto fail;
        json_t *mem = json_object_get(slurm, "gpu_memory_gb");
        if (mem && (!json_is_number(mem) || json_number_value(mem) <= 0)) {
            ep_fail(err, "%s: slurm: field gpu_memory_gb: expected a positive number", path);
            goto fail;
        }
        s->gpu_memory_gb = mem ? json_number_value(mem) : 0;
        s->options = json_object_get(slurm, "options");
        s->setup = json_object_get(slurm, "setup");
        if (string_array(s->options, path, "slurm.options", err) || string_array(s->setup, path, "slurm.setup", err))
            goto fail;
    }
    // Every run's config must be one edgepatch run accepts, now rather than in a job hours later.
    for (int m = 0; m < s->n_models; m++)
        for (int t = 0; t < s->n_entries; t++)
            if (build_run(s, m, t, NULL, NULL, err)) goto fail;
    return 0;
fail:
    sweep_free(s);
    return -1;
}

void sweep_free(sweep *s) {
    free(s->models);
    free(s->entries);
    free(s->stages);
    json_decref(s->json);
    free(s->path);
    memset(s, 0, sizeof *s);
}

void sweep_run_dir(const sweep *s, int m, int t, char *out, size_t n) {
    snprintf(out, n, "%s/%s/%s", s->output_root, s->models[m].name, s->entries[t].name);
}

int sweep_estimate_model(const sweep *s, int m, sweep_estimate *e, ep_error *err) {
    run_config rc;
    if (build_run(s, m, 0, NULL, &rc, err)) return -1;
    int batch_size = rc.batch_size, n_donors = rc.n_donors;
    run_config_free(&rc);
    const sweep_model *md = &s->models[m];
    const model_config *c = &md->cfg;
    double h = c->hidden, q = (double)c->n_heads * c->head_dim, kv = (double)c->n_kv_heads * c->head_dim;
    e->params = (double)model_held_floats(c);
    double b = strcmp(md->dtype, "bf16") ? 4 : 2, tp = md->tensor_parallel;
    e->weight_bytes = e->params * b;
    e->kv_bytes_per_token = 2.0 * c->n_layers * kv * b;
    // One batch on one rank: the clean pass's K/V, each donor's cached K/V and head outputs (z), the
    // activations the attribution backward pass keeps per layer (residual, norms, attention output, MLP
    // hidden), fp32, split over the tensor-parallel group; logits at 16 rows per prompt; plus 1 GiB for
    // the CUDA context and workspaces.
    double tokens = (double)batch_size * s->prompt_tokens;
    double z_per_token = c->n_layers * q * b;
    double act_per_token = c->n_layers * (4 * h + 2.0 * c->intermediate + 2 * q) * 4;
    double batch = tokens * (e->kv_bytes_per_token + n_donors * (e->kv_bytes_per_token + z_per_token) + act_per_token);
    e->gpu_bytes_per_rank = e->weight_bytes / tp + batch / tp + (double)batch_size * 16 * c->vocab_size * 4 + (1 << 30);
    return 0;
}

// HDF5's own bytes around the data of an h5store file (the 512-byte seal block, the superblock and root
// group; each dataset's object header with its crc32 attribute; each group's object header, B-tree,
// symbol node and local heap; each root attribute), fitted to this build's HDF5 1.10 files (earliest
// file format, contiguous datasets) of every kind the stages write. HDF5 allocates its metadata in
// 2 KiB blocks, so a file's real overhead is lumpy: the fit is within 1.6 KiB of each of them
// (docs/sweeps.md, "Disk").
#define H5_FILE_BYTES 6144.0
#define H5_DATASET_BYTES 352.0
#define H5_GROUP_BYTES 864.0
#define H5_ATTRIBUTE_BYTES 56.0
#define H5_STRING_BYTES 40.0

// Edge units per kept head unit when edge rounds start (stages/circuit.c, circuit_start_edges): for each
// receiver type, the sender types that occur at or before it in some prompt, averaged over the 7 head
// unit types (which of them pruning keeps is not known beforehand). Measured from prompts.h5's types when
// it is there; else an ICL prompt is assumed (bos, then x t y n per demonstration, then query and last):
// receiver bos has 1 sender, x, t, y and n 5 each (every demonstration type comes before them in a later
// demonstration), query 6, last 7: 34 over 7 types; with one demonstration types come once, in order:
// 1 + 2 + ... + 7 = 28.
static double assumed_edges_per_head_unit(int n_shots) { return (n_shots >= 2 ? 34.0 : 28.0) / PLAN_CIRCUIT_TYPES; }

static double measured_edges_per_head_unit(const prompt_set *p) {
    unsigned char occurs[PLAN_CIRCUIT_TYPES][PLAN_CIRCUIT_TYPES] = {{0}};  // [sender][receiver]
    for (int i = 0; i < p->n_prompts; i++) {
        unsigned seen = 0;
        const int32_t *ty = p->types + (size_t)i * p->max_len;
        for (int b = 0; b < p->lengths[i]; b++) {
            if (ty[b] < 0 || ty[b] >= PLAN_CIRCUIT_TYPES) continue;
            seen |= 1u << ty[b];
            for (int s = 0; s < PLAN_CIRCUIT_TYPES; s++)
                if ((seen >> s) & 1) occurs[s][ty[b]] = 1;
        }
    }
    int n = 0;
    for (int s = 0; s < PLAN_CIRCUIT_TYPES; s++)
        for (int r = 0; r < PLAN_CIRCUIT_TYPES; r++) n += occurs[s][r];
    return (double)n / PLAN_CIRCUIT_TYPES;
}

// What the estimate reads of the run's prompts.h5 when it is there (measured) or assumes.
typedef struct {
    double sum_len;  // tokens of every prompt together
    int max_len, max_target, n_shots, n_donors;
    double edges_per_head_unit;
} prompt_shape;

static int measure_prompts(const run_config *rc, prompt_shape *ps) {
    char path[4200], want[17], *hash = NULL;
    snprintf(path, sizeof path, "%s/prompts.h5", rc->output_path);
    if (h5store_is_complete(path) != 1) return 0;
    ep_error err = {{0}};
    h5store h;
    int same = 0;
    hash_hex(rc->hash, want);
    if (h5store_open(path, &h, &err) == 0) {
        same = h5store_get_str(&h, "config_hash", &hash, &err) == 0 && !strcmp(hash, want);
        free(hash);
        h5store_close(&h);
    }
    prompt_set p;
    if (!same || prompt_set_load(path, &p, &err)) return 0;  // another config's folder: status says so
    ps->sum_len = 0;
    for (int i = 0; i < p.n_prompts; i++) ps->sum_len += p.lengths[i];
    ps->max_len = p.max_len, ps->max_target = p.max_target, ps->n_shots = p.n_pairs - 1, ps->n_donors = p.n_donors;
    ps->edges_per_head_unit = measured_edges_per_head_unit(&p);
    prompt_set_free(&p);
    return 1;
}

// Units a round keeps of n (stages/prune_round.c, keep_count).
static double kept_units(const run_prune *p, int r, double n) {
    double k = r < p->n_k ? (double)p->k[r] : n - fmax(1.0, floor(n * p->fraction + 0.5));
    return k > n ? n : k < 0 ? 0 : k;
}

int sweep_estimate_disk(const sweep *s, int m, int t, sweep_disk *d, ep_error *err) {
    memset(d, 0, sizeof *d);
    run_config rc;
    if (build_run(s, m, t, NULL, &rc, err)) return -1;
    const model_config *c = &s->models[m].cfg;
    ablation_plan plan;
    if (plan_from_run_config(&rc, c, &plan, err)) {
        run_config_free(&rc);
        return -1;
    }
    int cached = plan.n_donors > 0 || rc.n_ablations == 0 ? plan.n_donors : 1;  // stage_inputs.c
    plan_free(&plan);
    double P = rc.n_prompts, items = ceil(P / rc.batch_size), L = c->n_layers, H = c->n_heads;
    prompt_shape ps = {P * s->prompt_tokens, s->prompt_tokens, 8, rc.n_shots, rc.n_donors, 0};
    d->measured = measure_prompts(&rc, &ps);
    if (!d->measured && ps.n_shots < 0) {  // the task's default
        task tk;
        if (task_load(s->entries[t].task, &tk, err)) {
            run_config_free(&rc);
            return -1;
        }
        ps.n_shots = tk.n_shots;
        task_free(&tk);
    }
    if (!d->measured) ps.edges_per_head_unit = assumed_edges_per_head_unit(ps.n_shots);
    d->tokens_per_prompt = P > 0 ? ps.sum_len / P : 0;
    int goal = sweep_run_goal(s, t);
    double K = ps.n_donors, Lp = ps.max_len, i4 = 4;

    // prompts.h5: tokens, types, index [P, Lp], donors [P, K, Lp], targets [P, T], lengths and
    // target_lengths [P], pair_ids [P, N + 1], donor_kinds [K]; tokenize_report.json beside it.
    // 16 attributes, the text ones (tokenize_report, type and donor kind names, paths) about 1 KiB more,
    // and tokenize_report.json about as much again.
    // The token texts (token_text, donor_text, target_text: one variable-length string per token) cost
    // H5_STRING_BYTES each: HDF5's 16-byte global-heap id in the dataset, the heap object's 16-byte
    // header and the text rounded up to 8 bytes (a token's text is a few bytes).
    d->prompts = H5_FILE_BYTES + (10 + 2 * (K > 0)) * H5_DATASET_BYTES + 16 * H5_ATTRIBUTE_BYTES + 2048 +
                 i4 * (3 * P * Lp + P * K * Lp + P * ps.max_target + 2 * P + P * (ps.n_shots + 1) + K) +
                 H5_STRING_BYTES * (P * Lp + P * K * Lp + P * ps.max_target);
    // cache.d/: per item a file; per prompt a group, per cached donor a group with k, v [L, T, kv_heads *
    // head_dim] and z [L, T, heads * head_dim], T the prompt's own length.
    if (goal >= RUN_CACHE) {
        double bytes = rc.cache_bf16 ? 2 : 4, row = (2.0 * c->n_kv_heads + c->n_heads) * c->head_dim;
        d->cache = items * (H5_FILE_BYTES + 12 * H5_ATTRIBUTE_BYTES) + (cached > 0) * P * H5_GROUP_BYTES +
                   P * cached * (H5_GROUP_BYTES + 3 * H5_DATASET_BYTES) + ps.sum_len * cached * L * row * bytes;
    }
    // patch.d/ and patch.h5: groups plan, clean and one per ablation, each correct, first_token_correct,
    // n_generated (int32 [P]), target_logprob, logit_diff, kl_full_model (float32 [P]), generated (int32 [P,
    // new tokens]), attn_entropy and attn_mass (float32 [P, L, H] and [P, L, H, 7], the latter with its
    // enum_names); once in the shards, once merged; model_logs.json (about 1 KiB and 0.5 KiB per group).
    if (goal >= RUN_PATCH) {
        double groups = 2 + rc.n_ablations, g_bytes = groups * (H5_GROUP_BYTES + 9 * H5_DATASET_BYTES + H5_ATTRIBUTE_BYTES);
        double data = groups * P * (6 * 4 + 4.0 * (double)rc.max_new_tokens + 4.0 * L * H * (1 + 7));
        d->patch = items * (H5_FILE_BYTES + 7 * H5_ATTRIBUTE_BYTES + g_bytes) + H5_FILE_BYTES + 6 * H5_ATTRIBUTE_BYTES +
                   g_bytes + 2 * data + 1024 + 512 * groups;
    }
    // prune.d/: round r's file holds units [n, 4], scores [n], metrics [3, 3], the circuit's and the kept
    // head masks [L, H, 7] (int32) and, from the first edge round on, edge masks [L, H, 8, 8]; its item
    // shards (prompt batches x unit groups) the float64 sums [n, width] and base [3].
    if (goal >= RUN_SCORE) {
        const run_prune *p = &rc.prune;
        int total = (int)(p->head_rounds + p->edge_rounds), rounds = goal == RUN_SCORE ? 1 : total > 0 ? total : 1;
        double n = L * H * PLAN_CIRCUIT_TYPES;
        for (int r = 0; r < rounds; r++) {
            int edge = r >= p->head_rounds && total > 0;
            if (edge && r == p->head_rounds) n = n * ps.edges_per_head_unit;
            // as stages/prune_round.c decides: eap-ig (3) computes exact and attribution with compare too
            int method = r < p->n_files ? 2 : p->exact ? 1 : p->eap_ig ? 3 : 0;
            int exact = method == 1 || ((method == 0 || method == 3) && p->compare);
            int attribution = method == 0 || ((method == 1 || method == 3) && p->compare), compare = exact && attribution;
            int ig = method == 3, ig_compare = ig && compare;  // ig_steps; compare/attribution_scores, eap_ig_agreement
            double width = 3 * exact + attribution + ig + (method == 2), nn = floor(n + 0.5);
            double groups = exact && nn > 0 ? ceil(nn / (double)p->exact_units_per_item) : 1;
            d->prune += H5_FILE_BYTES + (10 + compare + ig) * H5_ATTRIBUTE_BYTES +
                        (5 + 2 * edge + 2 * compare + 2 * ig_compare) * H5_DATASET_BYTES + (2 + compare) * H5_GROUP_BYTES +
                        nn * (16 + 4) + 36 + 2 * L * H * PLAN_CIRCUIT_TYPES * 4 +
                        edge * 2 * L * H * PLAN_EDGE_TYPES * PLAN_EDGE_TYPES * 4 + (compare + ig_compare) * (4 * nn + 32);
            d->prune += items * groups * (H5_FILE_BYTES + 8 * H5_ATTRIBUTE_BYTES + 2 * H5_DATASET_BYTES + 24) +
                        items * nn * (width ? width : 1) * 8;
            n = kept_units(p, r, nn);
        }
    }
    d->total = d->prompts + d->cache + d->patch + d->prune;
    run_config_free(&rc);
    return 0;
}

const char *run_state_name(run_state s) {
    static const char *names[] = {"pending", "started", "done", "failed", "conflict"};
    return names[s];
}

static int file_exists(const char *path) { return access(path, F_OK) == 0; }

int sweep_run_status(const sweep *s, int m, int t, run_status *st, ep_error *err) {
    memset(st, 0, sizeof *st);
    st->stage = "-";
    run_config rc;
    if (build_run(s, m, t, NULL, &rc, err)) return -1;
    const char *dir = rc.output_path;
    char path[4200];
    int last = -1;  // the last finished stage
    st->n_items = (rc.n_prompts + rc.batch_size - 1) / rc.batch_size;
    snprintf(path, sizeof path, "%s/prompts.h5", dir);
    if (h5store_is_complete(path)) {
        // A folder made from another config is refused by edgepatch run; say so rather than wait on it.
        h5store h;
        char *hash = NULL, want[17];
        hash_hex(rc.hash, want);
        if (h5store_open(path, &h, err) == 0) {
            if (h5store_get_str(&h, "config_hash", &hash, err) == 0 && strcmp(hash, want))
                snprintf(st->detail, sizeof st->detail, "%.900s was made from another config (config_hash %.32s, this sweep's %s)",
                         path, hash, want);
            free(hash);
            h5store_close(&h);
        } else
            snprintf(st->detail, sizeof st->detail, "%s", err->msg);
        last = 0;
    }
    for (int i = 0; last >= 0 && i < st->n_items; i++) {
        snprintf(path, sizeof path, "%s/cache.d/item-%05d.h5", dir, i);
        st->cache_items += h5store_is_complete(path) == 1;
    }
    if (last == 0 && st->cache_items == st->n_items) last = 1;
    snprintf(path, sizeof path, "%s/patch.h5", dir);
    if (last == 1 && h5store_is_complete(path)) last = 2;
    for (;; st->rounds++) {
        snprintf(path, sizeof path, "%s/prune.d/round-%03d.h5", dir, st->rounds);
        if (last < 2 || !h5store_is_complete(path)) break;
    }
    if (st->rounds > 0) last = 3;
    snprintf(path, sizeof path, "%s/circuit.json", dir);
    if (last == 3 && file_exists(path)) last = 4;
    // The fv stage: done once function_vectors.h5 is complete; a run without a function_vectors block has
    // nothing to do there (its goal is the rounds).
    snprintf(path, sizeof path, "%s/function_vectors.h5", dir);
    if (last == 4 && rc.fv.on && h5store_is_complete(path)) last = 5;
    st->stage = last < 0 ? "-" : run_stage_name((run_stage)last);
    int goal = sweep_run_goal(s, t);
    if (goal == RUN_FV && !rc.fv.on) goal = RUN_PRUNE;
    snprintf(path, sizeof path, "%s/job-failed.txt", dir);
    if (st->detail[0]) st->state = RUN_CONFLICT;
    else if (last >= goal) st->state = RUN_DONE;
    else if (file_exists(path)) {
        st->state = RUN_FAILED;
        FILE *f = fopen(path, "r");
        if (f && fgets(st->detail, sizeof st->detail, f)) st->detail[strcspn(st->detail, "\n")] = 0;
        if (f) fclose(f);
    } else {
        snprintf(path, sizeof path, "%s/cache.d", dir);
        st->state = last >= 0 || file_exists(path) ? RUN_STARTED : RUN_PENDING;
    }
    run_config_free(&rc);
    return 0;
}

void sweep_script_path(const sweep *s, int m, int g, char *out, size_t n) {
    snprintf(out, n, "%s/slurm/%s-%s.sbatch", s->output_root, s->models[m].name, s->stages[g].name);
}

// Appends printf-formatted text to a growing buffer.
typedef struct {
    char *s;
    size_t len, cap;
} text_buf;

static void tb_printf(text_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void tb_printf(text_buf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (b->len + (size_t)n + 1 > b->cap) {
        b->cap = (b->len + (size_t)n + 1) * 2;
        b->s = ep_realloc(b->s, b->cap);
    }
    va_start(ap, fmt);
    vsnprintf(b->s + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

// Single-quoted for the shell.
static void tb_quoted(text_buf *b, const char *s) {
    tb_printf(b, "'");
    for (const char *p = s; *p; p++) {
        if (*p == '\'') tb_printf(b, "'\\''");
        else tb_printf(b, "%c", *p);
    }
    tb_printf(b, "'");
}

static int read_template(const sweep *s, char **body, ep_error *err) {
    char path[4096];
    if (s->template_path) snprintf(path, sizeof path, "%s", s->template_path);
    else if (repo_path("slurm", "edgepatch.sbatch", path, sizeof path))
        return ep_fail(err, "slurm/edgepatch.sbatch: not found next to the program (set slurm.template in %s)", s->path);
    FILE *f = fopen(path, "r");
    if (!f) return ep_fail(err, "%s: cannot open: %s", path, strerror(errno));
    text_buf b = {0};
    char line[4096];
    int first = 1;
    // The template's shebang and #SBATCH lines give way to the generated header.
    while (fgets(line, sizeof line, f)) {
        if (!(first && !strncmp(line, "#!", 2)) && strncmp(line, "#SBATCH", 7)) tb_printf(&b, "%s", line);
        first = 0;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad || !b.s) {
        free(b.s);
        return ep_fail(err, "%s: cannot read, or empty", path);
    }
    *body = b.s;
    return 0;
}

// runs: the configs of the array's tasks, in the script itself (sbatch keeps a copy of the script as
// submitted, so a later submission cannot change what a queued task runs).
static int write_script(const sweep *s, int m, int g, json_t *runs, const char *program, const char *body,
                        ep_error *err) {
    const sweep_model *md = &s->models[m];
    const sweep_stage *st = &s->stages[g];
    char logs[4096], path[4200];
    snprintf(logs, sizeof logs, "%s/slurm/logs", s->output_root);
    int n_runs = (int)json_array_size(runs), ranks = st->gpus ? md->ranks : 1;
    text_buf b = {0};
    tb_printf(&b, "#!/bin/bash\n# Written by edgepatch sweep submit from %s: model %s, stage %s, %d runs.\n", s->path,
              md->name, st->name, n_runs);
    tb_printf(&b, "#SBATCH --job-name=ep-%s-%s-%s\n", s->name, md->name, st->name);
    tb_printf(&b, "#SBATCH --array=0-%d", n_runs - 1);
    if (s->array_max) tb_printf(&b, "%%%d", s->array_max);
    tb_printf(&b, "\n#SBATCH --ntasks=%d\n", ranks);
    if (st->gpus && md->gpus > 0) tb_printf(&b, "#SBATCH --gpus-per-task=1\n");
    if (s->cpus_per_rank) tb_printf(&b, "#SBATCH --cpus-per-task=%d\n", s->cpus_per_rank);
    const char *time = st->time ? st->time : s->time;
    if (time) tb_printf(&b, "#SBATCH --time=%s\n", time);
    if (s->partition) tb_printf(&b, "#SBATCH --partition=%s\n", s->partition);
    if (s->account) tb_printf(&b, "#SBATCH --account=%s\n", s->account);
    tb_printf(&b, "#SBATCH --signal=B:USR1@%d\n#SBATCH --requeue\n#SBATCH --open-mode=append\n", s->signal_seconds);
    tb_printf(&b, "#SBATCH --output=%s/%%x-%%A_%%a.out\n", logs);
    for (size_t i = 0; s->options && i < json_array_size(s->options); i++)
        tb_printf(&b, "#SBATCH %s\n", json_string_value(json_array_get(s->options, i)));
    // Each run stops at its own last stage when that comes before the stage group's (an experiments
    // entry's until): untils[i] beside runs[i].
    int same = 1, stage_goal = run_stage_from_name(st->until);
    for (int i = 0; i < n_runs; i++)
        same &= json_integer_value(json_object_get(json_array_get(runs, (size_t)i), "goal")) >= stage_goal;
    tb_printf(&b, "runs=(\n");
    for (int i = 0; i < n_runs; i++) {
        tb_printf(&b, "  ");
        tb_quoted(&b, json_string_value(json_object_get(json_array_get(runs, (size_t)i), "config")));
        tb_printf(&b, "\n");
    }
    tb_printf(&b, ")\n");
    if (!same) {
        tb_printf(&b, "untils=(");
        for (int i = 0; i < n_runs; i++) {
            int goal = (int)json_integer_value(json_object_get(json_array_get(runs, (size_t)i), "goal"));
            tb_printf(&b, "%s%s", i ? " " : "", run_stage_name((run_stage)(goal < stage_goal ? goal : stage_goal)));
        }
        tb_printf(&b, ")\n");
    }
    tb_printf(&b, "export EDGEPATCH=");
    tb_quoted(&b, program);
    if (same) tb_printf(&b, " EP_UNTIL=%s", st->until);
    else tb_printf(&b, " EP_UNTIL=\"${untils[$SLURM_ARRAY_TASK_ID]}\"");
    tb_printf(&b, " EP_CONFIG=\"${runs[$SLURM_ARRAY_TASK_ID]}\"");
    if (s->srun_options) {
        tb_printf(&b, " EP_SRUN_OPTIONS=");
        tb_quoted(&b, s->srun_options);
    }
    tb_printf(&b, "\n");
    for (size_t i = 0; s->setup && i < json_array_size(s->setup); i++)
        tb_printf(&b, "%s\n", json_string_value(json_array_get(s->setup, i)));
    tb_printf(&b, "%s", body);
    sweep_script_path(s, m, g, path, sizeof path);
    int rc = make_dirs(logs, err) || write_text_atomic(path, b.s, err);
    free(b.s);
    return rc ? -1 : 0;
}

int sweep_write_jobs(const sweep *s, const char *program, int *n_runs, ep_error *err) {
    // A folder holding another config's run would fail its job: refuse before writing anything.
    for (int m = 0; m < s->n_models; m++)
        for (int t = 0; t < s->n_entries; t++) {
            run_status st;
            if (sweep_run_status(s, m, t, &st, err)) return -1;
            if (st.state == RUN_CONFLICT)
                return ep_fail(err, "%s: run %s/%s: %s (remove the folder or change output_root)", s->path,
                               s->models[m].name, s->entries[t].name, st.detail);
        }
    char *body = NULL;
    if (read_template(s, &body, err)) return -1;
    int rc = 0;
    for (int m = 0; m < s->n_models && rc == 0; m++) {
        json_t *runs = json_array();
        for (int t = 0; t < s->n_entries && rc == 0; t++) {
            run_status st;
            json_t *c = NULL;
            char dir[4096], path[4200];
            if ((rc = sweep_run_status(s, m, t, &st, err))) break;
            if (st.state == RUN_DONE) continue;
            sweep_run_dir(s, m, t, dir, sizeof dir);
            snprintf(path, sizeof path, "%s/sweep-run.json", dir);
            rc = make_dirs(dir, err) || build_run(s, m, t, &c, NULL, err) || write_json_atomic(path, c, err) ? -1 : 0;
            json_decref(c);
            json_array_append_new(runs, json_pack("{s:s,s:i}", "config", path, "goal", sweep_run_goal(s, t)));
        }
        n_runs[m] = (int)json_array_size(runs);
        for (int g = 0; rc == 0 && n_runs[m] && g < s->n_stages; g++) rc = write_script(s, m, g, runs, program, body, err);
        json_decref(runs);
    }
    free(body);
    return rc;
}
