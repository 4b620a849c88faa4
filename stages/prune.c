#include "prune.h"

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "pipeline/files.h"
#include "pipeline/h5store.h"
#include "pipeline/hash.h"
#include "stages/prune_round.h"

static void params_free(prune_params *p) {
    free(p->k);
}

static int parse_params(const stage_inputs *in, prune_params *p, ep_error *err) {
    const run_config *rc = in->cfg;
    const run_prune *f = &rc->prune;
    memset(p, 0, sizeof *p);
    if (run_config_check_values(rc, err)) return -1;  // the ranges the conversions below rely on
    int n_donors = in->prompts.n_donors;
    if (f->score_donors > n_donors)
        return ep_fail(err, "%s: field score_donors: expected a count 1..%d (the prompts' donors)", rc->path, n_donors);
    p->importance = f->importance;
    p->head_rounds = (int)f->head_rounds, p->edge_rounds = (int)f->edge_rounds;
    p->fraction = f->fraction;
    p->n_k = f->n_k;
    p->k = ep_calloc((size_t)p->n_k + 1, sizeof(int));
    for (int i = 0; i < p->n_k; i++) p->k[i] = (int)f->k[i];
    p->n_files = f->n_files, p->files = f->files;
    p->min_units = (int)f->min_units;
    p->min_faithfulness = f->min_faithfulness;
    p->exact_max_seqs = (int)f->exact_max_seqs;
    p->exact_units_per_item = (int)f->exact_units_per_item;
    p->score_donors = f->score_donors ? (int)f->score_donors : n_donors > 1 ? n_donors : 1;
    p->compare = f->compare;
    p->ig_steps = f->eap_ig ? f->ig_steps : 0;
    // Identity: everything a round's result depends on (the score files by their own identity).
    uint64_t h = hash_str(HASH_INIT, "prune-1");
    h = hash_str(h, in->prompts_hash), h = hash_str(h, in->model_hash), h = hash_str(h, in->plan_hash);
    h = hash_str(h, p->importance);
    int ints[8] = {p->head_rounds, p->edge_rounds, p->min_units, p->exact_max_seqs, rc->batch_size, p->score_donors,
                   p->compare, p->exact_units_per_item};
    h = hash_bytes(h, ints, sizeof ints);
    h = hash_bytes(h, &p->fraction, sizeof p->fraction);
    h = hash_bytes(h, &p->min_faithfulness, sizeof p->min_faithfulness);
    if (p->ig_steps) h = hash_bytes(h, &p->ig_steps, sizeof p->ig_steps);  // eap-ig only: other runs keep their identity
    if (p->n_k) h = hash_bytes(h, p->k, sizeof(int) * (size_t)p->n_k);
    for (int i = 0; i < p->n_files; i++) {
        // Another run's round file is a user input: checked whole when the config was loaded, and again
        // here, where its identity is read.
        h5store s;
        char *id = NULL;
        if (h5store_open(p->files[i], &s, err)) return ep_wrap(err, "%s: field prune_using_imp_scores[%d]", rc->path, i);
        int r = h5store_get_str(&s, "inputs_hash", &id, err);
        h5store_close(&s);
        if (r) return ep_wrap(err, "%s: field prune_using_imp_scores[%d]", rc->path, i);
        h = hash_str(h, id);
        free(id);
    }
    hash_hex(h, p->identity);
    return 0;
}

static void round_identity(const prune_params *p, int r, char out[17]) {
    uint64_t h = hash_str(HASH_INIT, "round");
    h = hash_str(h, p->identity);
    hash_hex(hash_bytes(h, &r, sizeof r), out);
}

// The test hook of stages/prune_round.h, from the environment.
static void kill_hook_read(prune_kill_hook *k) {
    const char *v = getenv("EDGEPATCH_TEST_KILL_ROUND");
    k->after = -1, k->where[0] = 0;
    if (v && sscanf(v, "%d", &k->after) == 1) {
        const char *c = strchr(v, ':');
        snprintf(k->where, sizeof k->where, "%s", c ? c + 1 : "");
    }
}

struct prune_run {
    prune_env env;  // what the rounds share: inputs, parameters, rounds computed, clean metrics, test hook
    int max_rounds;
    int r, last, stopped;  // next round to look at, last finished one, stop seen
    int checked;           // the last finished round whose shards were handed to the driver to check
    circuit c;             // the circuit round r starts from
    double final_faith;    // of the last finished round's circuit (the kept one, or the one it went back to)
};

int prune_open(stage_inputs *in, int max_rounds, prune_run **out, ep_error *err) {
    prune_run *pr = ep_calloc(1, sizeof *pr);
    prune_env *env = &pr->env;
    env->in = in;
    if (parse_params(in, &env->p, err) || score_check_targets(in, err)) {
        params_free(&env->p);
        free(pr);
        return -1;
    }
    env->n_rounds = env->p.head_rounds + env->p.edge_rounds > 0 ? env->p.head_rounds + env->p.edge_rounds : 1;
    pr->max_rounds = max_rounds;
    pr->last = pr->checked = -1;
    pr->final_faith = NAN;
    circuit_full(&in->m.cfg, &pr->c);
    kill_hook_read(&env->kh);
    *out = pr;
    return 0;
}

void prune_close(prune_run *pr) {
    if (!pr) return;
    circuit_free(&pr->c);
    params_free(&pr->env.p);
    free(pr);
}

int prune_prepare(prune_run *pr, int fresh, ep_error *err) {
    const char *out = pr->env.in->cfg->output_path;
    char dir[4200];
    snprintf(dir, sizeof dir, "%s/prune.d", out);
    if (mkdir(dir, 0777) != 0 && errno != EEXIST) return ep_fail(err, "%s: cannot create: %s", dir, strerror(errno));
    // Temporaries left by killed writers in prune.d and the rounds' folders (pipeline/files.h).
    if (!fresh) return remove_temporaries(dir, 1, NULL, NULL, err);
    if (remove_entries(dir, "round-", err)) return -1;
    circuit_file_remove(out);
    return 0;
}

int prune_next_round(prune_run *pr, int root, work_stage *ws, ep_error *err) {
    prune_env *env = &pr->env;
    const stage_inputs *in = env->in;
    const char *out = in->cfg->output_path;
    for (; pr->r < env->n_rounds && !pr->stopped; pr->r++) {
        if (pr->max_rounds > 0 && pr->r >= pr->max_rounds) break;
        char path[4200], id[17];
        prune_round_path(out, pr->r, path, sizeof path);
        round_identity(&env->p, pr->r, id);
        int cur = stage_output_current(path, id, 0, in->log, err);
        if (cur < 0) return -1;
        // A finished round goes to the driver once too, which checks its shards (the checkpoints its file
        // is rebuilt from) and computes and merges again only what fails; the next call moves past it.
        if (cur == 0 || pr->checked != pr->r) {
            if (cur == 0 && env->kh.after == env->computed && !env->kh.where[0]) raise(SIGKILL);
            pr->checked = pr->r;
            return prune_round_stage(env, pr->r, &pr->c, path, id, cur, ws, err) ? -1 : 1;
        }
        // finished earlier (by this run or another): its kept circuit is the next one
        prune_round f;
        if (prune_round_read(path, &in->m.cfg, &f, err)) return -1;
        pr->stopped = f.stop[0] != 0;
        int back = !strcmp(f.stop, "min_faithfulness") || !strcmp(f.stop, "scores_only");
        circuit_free(&pr->c);
        circuit_copy(back ? &f.circuit : &f.kept, &pr->c);
        int row = back ? 0 : 1;
        pr->final_faith = f.metrics[2][2] != 0 ? (double)f.metrics[row][2] / f.metrics[2][2] : NAN;
        prune_round_free(&f);
        pr->last = pr->r;
    }
    // Nothing left to compute: make model_logs.json and the summary match the round files.
    if (root && pr->last >= 0 && prune_logs_write(out, pr->last + 1, err)) return -1;
    if (root && pr->stopped) {
        if (circuit_file_write(out, &pr->c, pr->last, pr->final_faith, err)) return -1;
        ep_log_result(in->log, "prune: final circuit after round %d -> %s/circuit.json, circuit.txt", pr->last, out);
    }
    return 0;
}

int prune_stage(stage_inputs *in, int fresh, int max_rounds, int (*stop_requested)(void), ep_error *err) {
    prune_run *pr;
    if (prune_open(in, max_rounds, &pr, err)) return -1;
    int rc = prune_prepare(pr, fresh, err);
    while (rc == 0) {
        if (stop_requested && stop_requested()) {
            rc = 1;
            break;
        }
        work_stage ws;
        int r = prune_next_round(pr, 1, &ws, err);
        if (r <= 0) {
            rc = r;
            break;
        }
        rc = stage_run_items(&ws, 0, err);
        ws.release(&ws);
    }
    prune_close(pr);
    return rc;
}
