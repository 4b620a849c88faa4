// circuit_file: the files pruning leaves in a run folder, written and read (docs/pruning.md).
//
// Owns the formats of
//   - <run>/prune.d/round-NNN.h5 (format edgepatch-prune-round-1): one round's units and scores, the
//     circuit they were taken in and the one kept after it, the metrics of both and of the clean model,
//     and with compare_importance the other method's scores and the rank agreement (eap-ig rounds: also
//     attribution's scores and EAP-IG's agreement beside attribution's). Units are the
//     dataset `units` [n, 4] of int32 rows (layer, head, type, -1) for head units and (layer, head,
//     sender, receiver) for edge units (stages/circuit.h names the fields);
//   - the "prune" list of <run>/model_logs.json: one line per finished round, rebuilt from the round files;
//   - <run>/circuit.json (loadable as a config's `circuit` field, plus a summary by edge type and layer)
//     and <run>/circuit.txt (a table): the final circuit.
// Promises: every file is written whole or not at all (round files through h5store: temporary name,
// fsync, rename, completion record; the JSON and text files through write_*_atomic); a round file is
// checked whole when read (shapes, units and counts in range), so readers can index masks by its
// units. Never prints, never calls MPI, runs no passes: the prune stage (stages/prune.h) decides what
// goes in.
#ifndef EP_CIRCUIT_FILE_H
#define EP_CIRCUIT_FILE_H

#include <stddef.h>

#include "stages/score.h"

// One round file as `edgepatch scores` shows it.
typedef struct {
    int round, n_units, pruned;
    unit_kind kind;
    char method[16], stop[32];
    circuit_unit *units;
    float *scores;
    circuit circuit, kept;  // the circuit the scores were taken in, and the one kept after the round
    float metrics[3][3];    // rows: circuit, kept, clean; columns: target log-prob, first-token accuracy, logit diff
    // compare_importance rounds (else compare_method is "" and compare_scores NULL): the other method's
    // scores and the rank agreement of attribution with exact: Spearman with the signed exact scores,
    // Spearman with |exact|, top-k overlap, k (the round's keep count).
    char compare_method[16];
    float *compare_scores;
    double agreement[4];
    // eap-ig rounds: the path points (attribute ig_steps; 0 for the other methods), and with
    // compare_importance attribution's scores (compare/attribution_scores) and EAP-IG's rank agreement
    // with exact (compare/eap_ig_agreement, as agreement's four), else NULL and has_ig_agreement 0.
    int ig_steps;
    float *attribution_scores;
    int has_ig_agreement;
    double ig_agreement[4];
} prune_round;

// <run_dir>/prune.d/round-NNN.h5.
void prune_round_path(const char *run_dir, int round, char *out, size_t n);
// Reads <run>/prune.d/round-NNN.h5 (round < 0: the last one there).
int prune_round_load(const char *run_dir, int round, prune_round *r, ep_error *err);
// Reads the round file at path; cfg (optional) is the model its circuits must fit.
int prune_round_read(const char *path, const model_config *cfg, prune_round *r, ep_error *err);
void prune_round_free(prune_round *r);

// What one round computed, to be written: n units of a kind and their scores by method, the metrics
// of the circuit, of the kept circuit and of the clean model, whether the round pruned (0: scores
// only), why pruning stops after it ("" when it does not), and with compare_importance the other method,
// its scores and the rank agreement (as prune_round's).
typedef struct {
    unit_kind kind;
    const char *method;
    const circuit_unit *units;
    int n;
    const double *scores;
    circuit_metrics m_circuit, m_kept, m_clean;
    int pruned;
    const char *stop;
    const char *compare_method;
    const double *compare_scores;  // NULL: no comparison
    double agreement[4];
    const char *edge_intervention;  // how the circuit ablates edges outside it (kv, k, v, zero); NULL: kv
    int ig_steps;                       // eap-ig: its path points, else 0
    const double *attribution_scores;   // eap-ig with compare_importance: attribution's scores, else NULL
    int has_ig_agreement;               // ... and EAP-IG's rank agreement with exact:
    double ig_agreement[4];
} prune_round_result;

// Writes round r's file at path: identity is its inputs_hash, c the circuit the scores were taken in,
// kept the circuit after the round. kill_before_commit is the prune stage's test hook (SIGKILL with the
// data written, the file not committed; docs/pruning.md).
int prune_round_write(const char *path, const char *identity, int r, const circuit *c, const circuit *kept,
                      const prune_round_result *res, int kill_before_commit, ep_error *err);

// model_logs.json's "prune": one line per round file 0 .. n_rounds - 1 of run_dir (every one must be
// there), the rest of model_logs.json kept as it is.
int prune_logs_write(const char *run_dir, int n_rounds, ep_error *err);

// circuit.json and circuit.txt of run_dir: circuit c, final after round `round`, faithfulness (logit
// difference of the circuit / the clean model's) faith. circuit_file_remove deletes both.
int circuit_file_write(const char *run_dir, const circuit *c, int round, double faith, ep_error *err);
void circuit_file_remove(const char *run_dir);

#endif
