// sweep: a sweep config (configs/sweeps/*.json: models x tasks, the stages as Slurm job groups), its
// runs' configs, their resource estimates, their status read from the run folders, and the sbatch
// scripts that run them (docs/sweeps.md).
//
// Promises: a run's status comes from its folder on disk only (stage completion records, cache shards,
// prune round files, circuit.json, and job-failed.txt written by the batch script), never from Slurm,
// so it is true after requeues, resubmissions and lost Slurm state. Every field is validated when the
// sweep is loaded; an unknown field is an error naming it. Planning and status never write anything;
// sweep_write_jobs writes the run configs and batch scripts and submits nothing (cmd_sweep calls sbatch).
#ifndef EP_SWEEP_H
#define EP_SWEEP_H

#include <jansson.h>

#include "pipeline/error.h"
#include "pipeline/model_config.h"
#include "stages/run_config.h"

typedef struct {
    const char *name;         // folder name of the model's runs and jobs
    const char *path;         // model folder (the runs' model_path)
    const char *dtype;        // the runs' dtype (fp32 or bf16), and bytes per weight in the estimate
    int tensor_parallel;      // ranks that hold one copy of the model
    int gpus;                 // GPUs per run (0: CPU ranks only)
    int ranks;                // MPI ranks per run: gpus, or the sweep's "ranks" when gpus == 0
    model_config cfg;         // its config.json (or the sweep's inline "config"), for the estimate
    json_t *run;              // the model's run-config fields, over the sweep's (borrowed)
} sweep_model;

typedef struct {
    const char *name;         // job name part
    const char *until;        // the last stage its jobs run (edgepatch run --until)
    int gpus;                 // 1: the model's GPUs and ranks; 0: one CPU task
    const char *time;         // its time limit (HH:MM:SS), or NULL for the sweep's
} sweep_stage;

// One run per model: a plain task (from "tasks": name and task alike, no overrides) or an "experiments"
// entry (its own name, the task, a label saying which experiment it is, the last stage it needs, and
// run-config fields over the sweep's and the model's).
typedef struct {
    const char *name;         // the run's folder under <output_root>/<model>/ (distinct)
    const char *task;         // task name
    const char *experiment;   // the experiment label ("" for a plain task)
    const char *until;        // the last stage the run needs (NULL: the sweep's last stage's)
    json_t *run;              // run-config fields over the sweep's and the model's (borrowed; NULL: none)
} sweep_entry;

typedef struct {
    char *path;               // the sweep file, for messages
    json_t *json;
    const char *name, *output_root;
    json_t *run;              // run-config fields shared by every run (borrowed)
    sweep_model *models;
    int n_models;
    sweep_entry *entries;     // the "tasks", then the "experiments" entries
    int n_entries;
    sweep_stage *stages;
    int n_stages;
    int prompt_tokens;        // tokens per prompt the memory estimate assumes
    // Slurm settings (absent: Slurm's defaults)
    const char *partition, *account, *time, *srun_options, *template_path;
    int signal_seconds, cpus_per_rank, array_max;
    double gpu_memory_gb;     // per GPU; 0: not checked
    json_t *options, *setup;  // extra #SBATCH options and setup lines (arrays of strings, borrowed)
} sweep;

int sweep_load(const char *path, sweep *s, ep_error *err);
void sweep_free(sweep *s);

// Runs (m, t) are model m x entry t (0 <= t < n_entries).
// The last stage run (m, t) needs: its entry's until, no later than the sweep's last stage group's.
int sweep_run_goal(const sweep *s, int t);

// Run (m, t)'s config, parsed and checked whole as edgepatch run checks it (against the model's shape
// from the sweep: its config.json or inline "config"); free with run_config_free. sweep_load already
// checked every run this way.
int sweep_run_config(const sweep *s, int m, int t, run_config *rc, ep_error *err);

// The folder of run (m, t): <output_root>/<model>/<entry name>.
void sweep_run_dir(const sweep *s, int m, int t, char *out, size_t n);

typedef struct {
    double params;            // weights, counted from the shape
    double weight_bytes;      // at the model's dtype
    double kv_bytes_per_token;  // keys and values of every layer for one prompt token
    double gpu_bytes_per_rank;  // weights / tensor_parallel + a batch's K/V, head outputs and logits
} sweep_estimate;

// Model m's estimate, with the batch_size and donors of its runs' config.
int sweep_estimate_model(const sweep *s, int m, sweep_estimate *e, ep_error *err);

// Bytes a run leaves on disk, by artifact, for the stages up to the sweep's last one (docs/sweeps.md,
// "Disk"): prompts (prompts.h5, tokenize_report.json), cache (cache.d/ shards: prompts x cached donors x
// layers x T x (2 kv_heads + heads) x head_dim x the cache dtype's bytes), patch (patch.d/ shards,
// patch.h5, model_logs.json), prune (the rounds' files prune.d/round-NNN.h5 and their item shards; the
// rounds as configured, units shrinking by prune_fraction, no early stop). The prompt lengths, padding,
// target width and shots come from the run's prompts.h5 when it is complete and made from this run's
// config (measured), else from the sweep's prompt_tokens and the task (assumed). Reads, never writes.
typedef struct {
    double tokens_per_prompt;  // mean prompt length used
    int measured;              // 1: from the run's prompts.h5; 0: prompt_tokens
    double prompts, cache, patch, prune, total;  // bytes
} sweep_disk;

int sweep_estimate_disk(const sweep *s, int m, int t, sweep_disk *d, ep_error *err);

typedef enum { RUN_PENDING, RUN_STARTED, RUN_DONE, RUN_FAILED, RUN_CONFLICT } run_state;

typedef struct {
    run_state state;
    const char *stage;        // the last finished stage: "-", tokenize, cache, patch, score, prune
    int cache_items, n_items; // finished cache shards of the run's items
    int rounds;               // finished prune round files
    char detail[1200];        // why failed or conflicting (job-failed.txt's line, the hash that differs)
} run_status;

const char *run_state_name(run_state s);
// Reads run (m, t)'s folder; done means the sweep's last stage is complete.
int sweep_run_status(const sweep *s, int m, int t, run_status *st, ep_error *err);

// Run (m, t)'s config as JSON (what submit writes as <run>/sweep-run.json and sweep run runs), checked
// whole; free with json_decref.
int sweep_run_json(const sweep *s, int m, int t, json_t **config, ep_error *err);

// Writes, for every model with runs not done: each such run's config into its folder
// (<run>/sweep-run.json) and one batch script per stage (<output_root>/slurm/<model>-<stage>.sbatch):
// #SBATCH lines from the sweep and the model, the list of those configs (array task i runs the i-th),
// then the body of slurm/edgepatch.sbatch. program is the edgepatch the jobs run. n_runs[m] gets the
// array size (0: nothing to run). Refuses, writing nothing, when a run's folder holds another config's run.
int sweep_write_jobs(const sweep *s, const char *program, int *n_runs, ep_error *err);
// The path sweep_write_jobs writes model m's stage g script to.
void sweep_script_path(const sweep *s, int m, int g, char *out, size_t n);

#endif
