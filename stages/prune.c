#include "prune.h"

#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "pipeline/files.h"
#include "pipeline/h5store.h"
#include "pipeline/hash.h"
#include "stages/prompts.h"

#define NT PLAN_CIRCUIT_TYPES
#define ET PLAN_EDGE_TYPES

// What the rounds use of the config's pruning fields (stages/run_config.h, checked there), as ints, and
// the identity of everything a round's result depends on.
typedef struct {
    const char *importance;  // "attribution" | "exact"
    int head_rounds, edge_rounds;
    double fraction;
    int n_k, *k;                 // prune_k
    int n_files;                 // prune_using_imp_scores
    const char **files;
    int min_units;
    double min_faithfulness;
    int exact_max_seqs;
    int exact_units_per_item;  // exact rounds: units per work item (items are prompt batches x unit groups)
    int score_donors;  // exact scores average over donors 0 .. score_donors - 1
    int compare;       // compare_importance: every scored round computes both methods' scores
    char identity[17];
} prune_params;

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
    // Identity: everything a round's result depends on (the score files by their own identity).
    uint64_t h = hash_str(HASH_INIT, "prune-1");
    h = hash_str(h, in->prompts_hash), h = hash_str(h, in->model_hash), h = hash_str(h, in->plan_hash);
    h = hash_str(h, p->importance);
    int ints[8] = {p->head_rounds, p->edge_rounds, p->min_units, p->exact_max_seqs, rc->batch_size, p->score_donors,
                   p->compare, p->exact_units_per_item};
    h = hash_bytes(h, ints, sizeof ints);
    h = hash_bytes(h, &p->fraction, sizeof p->fraction);
    h = hash_bytes(h, &p->min_faithfulness, sizeof p->min_faithfulness);
    if (p->n_k) h = hash_bytes(h, p->k, sizeof(int) * (size_t)p->n_k);
    for (int i = 0; i < p->n_files; i++) {
        // Another run's round file is a user input: checked whole when the config was loaded, and again
        // here, where its identity is read.
        h5store s;
        char *id = NULL;
        if (h5store_open(p->files[i], &s, err)) return ep_wrap(err, "%s: field prune_using_imp_scores[%d]", rc->path, i);
        int r = h5store_verify(&s, err) || h5store_get_str(&s, "inputs_hash", &id, err);
        h5store_close(&s);
        if (r) return ep_wrap(err, "%s: field prune_using_imp_scores[%d]", rc->path, i);
        h = hash_str(h, id);
        free(id);
    }
    hash_hex(h, p->identity);
    return 0;
}

static void round_path(const char *dir, int r, char *out, size_t n) { snprintf(out, n, "%s/prune.d/round-%03d.h5", dir, r); }

static void round_identity(const prune_params *p, int r, char out[17]) {
    uint64_t h = hash_str(HASH_INIT, "round");
    h = hash_str(h, p->identity);
    hash_hex(hash_bytes(h, &r, sizeof r), out);
}

static const char *kind_name(unit_kind k) { return k == UNIT_HEAD ? "head" : "edge"; }

// --- round files

static int write_mask(h5store *s, const char *name, const circuit *c, int edges, ep_error *err) {
    size_t n = (size_t)c->n_layers * c->n_heads * (edges ? ET * ET : NT);
    const unsigned char *src = edges ? c->edges : c->heads;
    int32_t *v = ep_malloc(sizeof(int32_t) * n);
    for (size_t i = 0; i < n; i++) v[i] = src[i];
    h5shape sh = edges ? (h5shape){4, {c->n_layers, c->n_heads, ET, ET}} : (h5shape){3, {c->n_layers, c->n_heads, NT}};
    int rc = h5store_write_i32(s, name, &sh, v, err);
    free(v);
    return rc;
}

static int read_mask(h5store *s, const char *group, const model_config *cfg_or_null, circuit *c, ep_error *err) {
    char name[64];
    h5shape sh;
    int32_t *v = NULL;
    memset(c, 0, sizeof *c);
    snprintf(name, sizeof name, "%s/heads", group);
    if (h5store_read_i32(s, name, &sh, &v, err)) return -1;
    if (sh.rank != 3 || sh.dims[2] != NT) {
        free(v);
        return ep_fail(err, "%s: dataset %s: expected [layers, heads, %d]", s->path, name, NT);
    }
    c->n_layers = (int)sh.dims[0], c->n_heads = (int)sh.dims[1];
    if (cfg_or_null && (c->n_layers != cfg_or_null->n_layers || c->n_heads != cfg_or_null->n_heads)) {
        free(v);
        return ep_fail(err, "%s: dataset %s: made for another model's layers and heads", s->path, name);
    }
    size_t n = (size_t)c->n_layers * c->n_heads * NT;
    c->heads = ep_malloc(n);
    for (size_t i = 0; i < n; i++) c->heads[i] = v[i] != 0;
    free(v);
    snprintf(name, sizeof name, "%s/edges", group);
    if (h5store_has(s, name)) {
        if (h5store_read_i32(s, name, &sh, &v, err)) return circuit_free(c), -1;
        if (sh.rank != 4 || sh.dims[0] != c->n_layers || sh.dims[1] != c->n_heads || sh.dims[2] != ET || sh.dims[3] != ET) {
            free(v);
            circuit_free(c);
            return ep_fail(err, "%s: dataset %s: expected [layers, heads, %d, %d]", s->path, name, ET, ET);
        }
        n = (size_t)c->n_layers * c->n_heads * ET * ET;
        c->edges = ep_malloc(n);
        for (size_t i = 0; i < n; i++) c->edges[i] = v[i] != 0;
        free(v);
    }
    return 0;
}

void prune_round_free(prune_round *r) {
    free(r->units), free(r->scores), free(r->compare_scores);
    circuit_free(&r->circuit), circuit_free(&r->kept);
    memset(r, 0, sizeof *r);
}

static int load_round_file(const char *path, const model_config *cfg, prune_round *r, ep_error *err) {
    memset(r, 0, sizeof *r);
    h5store s;
    if (h5store_open(path, &s, err)) return -1;
    char *kind = NULL, *method = NULL, *stop = NULL;
    int64_t round = 0, pruned = 0;
    h5shape sh;
    int32_t *units = NULL;
    float *metrics = NULL;
    int rc = h5store_get_str(&s, "kind", &kind, err) || h5store_get_str(&s, "method", &method, err) ||
             h5store_get_str(&s, "stop", &stop, err) || h5store_get_i64(&s, "round", &round, err) ||
             h5store_get_i64(&s, "pruned", &pruned, err);
    if (rc == 0 && (rc = h5store_read_i32(&s, "units", &sh, &units, err)) == 0 && (sh.rank != 2 || sh.dims[1] != 4))
        rc = ep_fail(err, "%s: dataset units: expected [n, 4]", path);
    if (rc == 0) {
        r->n_units = (int)sh.dims[0];
        if ((rc = h5store_read_f32(&s, "scores", &sh, &r->scores, err)) == 0 && (sh.rank != 1 || sh.dims[0] != r->n_units))
            rc = ep_fail(err, "%s: dataset scores: expected [%d]", path, r->n_units);
    }
    if (rc == 0 && (rc = h5store_read_f32(&s, "metrics", &sh, &metrics, err)) == 0 && (sh.rank != 2 || sh.dims[0] != 3 || sh.dims[1] != 3))
        rc = ep_fail(err, "%s: dataset metrics: expected [3, 3]", path);
    if (rc == 0 && h5store_has(&s, "compare/scores")) {
        char *cm = NULL;
        double *ag = NULL;
        h5shape sc, sa;
        rc = h5store_get_str(&s, "compare_method", &cm, err) || h5store_read_f32(&s, "compare/scores", &sc, &r->compare_scores, err) ||
             h5store_read_f64(&s, "compare/agreement", &sa, &ag, err);
        if (rc == 0 && (sc.rank != 1 || sc.dims[0] != r->n_units || sa.rank != 1 || sa.dims[0] != 4))
            rc = ep_fail(err, "%s: datasets compare/scores, compare/agreement: expected [%d] and [4]", path, r->n_units);
        if (rc == 0) snprintf(r->compare_method, sizeof r->compare_method, "%s", cm), memcpy(r->agreement, ag, sizeof r->agreement);
        free(cm), free(ag);
    }
    if (rc == 0) rc = read_mask(&s, "circuit", cfg, &r->circuit, err);
    if (rc == 0) rc = read_mask(&s, "kept", cfg, &r->kept, err);
    // What readers index by (circuit_has of every unit in both circuits) and convert to int must be in range.
    if (rc == 0 && (r->kept.n_layers != r->circuit.n_layers || r->kept.n_heads != r->circuit.n_heads))
        rc = ep_fail(err, "%s: datasets circuit/heads and kept/heads: different layers or heads", path);
    if (rc == 0 && strcmp(kind, "head") && strcmp(kind, "edge"))
        rc = ep_fail(err, "%s: attribute kind: expected \"head\" or \"edge\", not \"%s\"", path, kind);
    if (rc == 0 && (round < 0 || round > 1000000 || pruned < 0 || pruned > r->n_units))
        rc = ep_fail(err, "%s: attributes round, pruned: expected a round 0..1000000 and 0..%d units", path, r->n_units);
    for (int i = 0; i < r->n_units && rc == 0; i++) {
        const int32_t *u = units + 4 * i;
        int types = !strcmp(kind, "edge") ? ET : NT;
        if (u[0] < 0 || u[0] >= r->circuit.n_layers || u[1] < 0 || u[1] >= r->circuit.n_heads || u[2] < 0 || u[2] >= types ||
            (types == ET && (u[3] < 0 || u[3] >= ET)))  // a head unit's b is unused (-1)
            rc = ep_fail(err, "%s: dataset units: unit %d (%d, %d, %d, %d) is not a %s unit of a %d-layer, %d-head circuit",
                         path, i, u[0], u[1], u[2], u[3], kind, r->circuit.n_layers, r->circuit.n_heads);
    }
    for (int k = 2; k < 4 && rc == 0 && r->compare_scores; k++)  // top-k overlap and k: counts of units
        if (!(r->agreement[k] >= 0 && r->agreement[k] <= r->n_units && r->agreement[k] == floor(r->agreement[k])))
            rc = ep_fail(err, "%s: dataset compare/agreement: element %d is not a unit count 0..%d", path, k, r->n_units);
    if (rc == 0) {
        r->round = (int)round, r->pruned = (int)pruned;
        r->kind = !strcmp(kind, "edge") ? UNIT_EDGE : UNIT_HEAD;
        snprintf(r->method, sizeof r->method, "%s", method);
        snprintf(r->stop, sizeof r->stop, "%s", stop);
        memcpy(r->metrics, metrics, sizeof r->metrics);
        r->units = ep_malloc(sizeof(circuit_unit) * (size_t)(r->n_units + 1));
        for (int i = 0; i < r->n_units; i++)
            r->units[i] = (circuit_unit){units[4 * i], units[4 * i + 1], units[4 * i + 2], units[4 * i + 3]};
    }
    free(kind), free(method), free(stop), free(units), free(metrics);
    h5store_close(&s);
    if (rc) prune_round_free(r);
    return rc;
}

int prune_round_load(const char *run_dir, int round, prune_round *r, ep_error *err) {
    char path[4200];
    if (round < 0) {
        for (int k = 0;; k++) {
            round_path(run_dir, k, path, sizeof path);
            if (!h5store_is_complete(path)) break;
            round = k;
        }
        if (round < 0) return ep_fail(err, "%s: no finished round in %s/prune.d (run the score stage first)", run_dir, run_dir);
    }
    round_path(run_dir, round, path, sizeof path);
    if (access(path, F_OK) != 0) return ep_fail(err, "%s: no such round file (round %d not run)", path, round);
    return load_round_file(path, NULL, r, err);
}

// What one round computed, before it is written.
typedef struct {
    unit_kind kind;
    const char *method;
    circuit_unit *units;
    int n;
    double *scores;
    circuit_metrics m_circuit, m_kept, m_clean;
    int pruned;
    const char *stop;
    const char *compare_method;  // compare_importance: the other method, its scores, their rank agreement
    double *compare_scores;
    double agreement[4];
} round_result;

// Units round r keeps of n: prune_k[r], or all but the lowest prune_fraction (at least one dropped).
static int keep_count(const prune_params *p, int r, int n) {
    int k = r < p->n_k ? p->k[r] : n - (int)fmax(1.0, floor(n * p->fraction + 0.5));
    return k > n ? n : k < 0 ? 0 : k;
}

// Rank agreement of attribution with exact scores: Spearman with the signed exact scores (the two
// orders pruning would use), Spearman with |exact| (the size attribution estimates), and how many of
// the k units attribution ranks highest are among the k exact ranks highest (k: the round's keep count).
static void compare_ranks(const double *exact, const double *attribution, int n, int k, double out[4]) {
    double *mag = ep_malloc(sizeof(double) * (size_t)(n + 1));
    for (int i = 0; i < n; i++) mag[i] = fabs(exact[i]);
    out[0] = rank_spearman(attribution, exact, n);
    out[1] = rank_spearman(attribution, mag, n);
    out[2] = rank_topk_overlap(attribution, exact, n, k);
    out[3] = k;
    free(mag);
}

static int write_round(const char *path, const char *identity, int r, const circuit *c, const circuit *kept,
                       const round_result *res, int kill_in_write, ep_error *err) {
    h5store s;
    if (h5store_create(path, &s, err)) return -1;
    int n = res->n;
    int32_t *u = ep_malloc(sizeof(int32_t) * 4 * (size_t)n);
    float *sc = ep_malloc(sizeof(float) * (size_t)n);
    for (int i = 0; i < n; i++) {
        u[4 * i] = res->units[i].layer, u[4 * i + 1] = res->units[i].head, u[4 * i + 2] = res->units[i].a;
        u[4 * i + 3] = res->units[i].b;
        sc[i] = (float)res->scores[i];
    }
    const circuit_metrics *ms[3] = {&res->m_circuit, &res->m_kept, &res->m_clean};
    float met[9];
    for (int i = 0; i < 3; i++)
        met[3 * i] = (float)ms[i]->target_logprob, met[3 * i + 1] = (float)ms[i]->first_token_accuracy,
        met[3 * i + 2] = (float)ms[i]->logit_diff;
    h5shape su = {2, {n, 4}}, ss = {1, {n}}, sm = {2, {3, 3}};
    int rc = h5store_write_i32(&s, "units", &su, u, err) || h5store_write_f32(&s, "scores", &ss, sc, err) ||
             h5store_write_f32(&s, "metrics", &sm, met, err) || write_mask(&s, "circuit/heads", c, 0, err) ||
             (c->edges && write_mask(&s, "circuit/edges", c, 1, err)) || write_mask(&s, "kept/heads", kept, 0, err) ||
             (kept->edges && write_mask(&s, "kept/edges", kept, 1, err)) ||
             h5store_set_str(&s, "format", "edgepatch-prune-round-1", err) || h5store_set_str(&s, "inputs_hash", identity, err) ||
             h5store_set_i64(&s, "round", r, err) || h5store_set_str(&s, "kind", kind_name(res->kind), err) ||
             h5store_set_str(&s, "method", res->method, err) || h5store_set_i64(&s, "pruned", res->pruned, err) ||
             h5store_set_str(&s, "stop", res->stop, err) ||
             h5store_set_str(&s, "metrics_columns", "target_logprob,first_token_accuracy,logit_diff", err) ||
             h5store_set_str(&s, "metrics_rows", "circuit,kept,clean", err);
    if (rc == 0 && res->compare_scores) {
        h5shape sa = {1, {4}};
        for (int i = 0; i < n; i++) sc[i] = (float)res->compare_scores[i];
        rc = h5store_write_f32(&s, "compare/scores", &ss, sc, err) ||
             h5store_write_f64(&s, "compare/agreement", &sa, res->agreement, err) ||
             h5store_set_str(&s, "compare_method", res->compare_method, err);
    }
    free(u), free(sc);
    if (rc == 0 && kill_in_write) raise(SIGKILL);  // test hook: data written, not committed
    if (rc) {
        h5store_abandon(&s);
        return -1;
    }
    return h5store_commit(&s, err);
}

// --- the summary of a circuit

static json_t *circuit_json(const circuit *c) {
    json_t *o = json_object(), *heads = json_array(), *by = json_array();
    int nh = 0, ne = 0;
    for (int t = 0; t < NT; t++)
        for (int l = 0; l < c->n_layers; l++) {
            json_t *hs = json_array();
            for (int h = 0; h < c->n_heads; h++)
                if (c->heads[((size_t)l * c->n_heads + h) * NT + t]) json_array_append_new(hs, json_integer(h)), nh++;
            if (json_array_size(hs)) json_array_append_new(by, json_pack("{s:s,s:i,s:o}", "type", token_type_name(t), "layer", l, "heads", hs));
            else json_decref(hs);
        }
    for (int l = 0; l < c->n_layers; l++)
        for (int h = 0; h < c->n_heads; h++)
            for (int t = 0; t < NT; t++)
                if (c->heads[((size_t)l * c->n_heads + h) * NT + t])
                    json_array_append_new(heads, json_pack("[i,i,s]", l, h, token_type_name(t)));
    json_object_set_new(o, "heads", heads);
    json_t *summary = json_pack("{s:o}", "heads", by);
    if (c->edges) {
        json_t *edges = json_array(), *eby = json_array();
        for (int l = 0; l < c->n_layers; l++)
            for (int h = 0; h < c->n_heads; h++)
                for (int a = 0; a < ET; a++)
                    for (int b = 0; b < ET; b++)
                        if (c->edges[(((size_t)l * c->n_heads + h) * ET + a) * ET + b])
                            json_array_append_new(edges, json_pack("[i,i,s,s]", l, h, token_type_name(a), token_type_name(b))), ne++;
        for (int a = 0; a < ET; a++)
            for (int b = 0; b < ET; b++)
                for (int l = 0; l < c->n_layers; l++) {
                    json_t *hs = json_array();
                    for (int h = 0; h < c->n_heads; h++)
                        if (c->edges[(((size_t)l * c->n_heads + h) * ET + a) * ET + b]) json_array_append_new(hs, json_integer(h));
                    if (json_array_size(hs))
                        json_array_append_new(eby, json_pack("{s:s,s:s,s:i,s:o}", "sender", token_type_name(a), "receiver",
                                                             token_type_name(b), "layer", l, "heads", hs));
                    else json_decref(hs);
                }
        json_object_set_new(o, "edges", edges);
        json_object_set_new(summary, "edges", eby);
    }
    json_object_set_new(o, "n_head_units", json_integer(nh));
    json_object_set_new(o, "n_edge_units", json_integer(ne));
    json_object_set_new(o, "by_type_and_layer", summary);
    return o;
}

static char *circuit_table(const circuit *c, const char *title) {
    size_t cap = 4096, len = 0;
    char *t = ep_malloc(cap);
    t[0] = 0;
#define APPEND(...)                                                          \
    do {                                                                     \
        int k_ = snprintf(NULL, 0, __VA_ARGS__);                             \
        if (len + (size_t)k_ + 1 > cap) t = ep_realloc(t, cap = 2 * (cap + (size_t)k_)); \
        len += (size_t)snprintf(t + len, cap - len, __VA_ARGS__);           \
    } while (0)
    APPEND("%s\n\nhead units kept (layer, head, token type):\n%-10s %-6s %s\n", title, "type", "layer", "heads");
    for (int ty = 0; ty < NT; ty++)
        for (int l = 0; l < c->n_layers; l++) {
            int any = 0;
            for (int h = 0; h < c->n_heads; h++)
                if (c->heads[((size_t)l * c->n_heads + h) * NT + ty]) {
                    if (!any) APPEND("%-10s %-6d", token_type_name(ty), l);
                    APPEND(" %d", h);
                    any = 1;
                }
            if (any) APPEND("\n");
        }
    if (c->edges) {
        APPEND("\nedge units kept (sender -> receiver, layer, heads):\n%-18s %-6s %s\n", "edge type", "layer", "heads");
        for (int a = 0; a < ET; a++)
            for (int b = 0; b < ET; b++)
                for (int l = 0; l < c->n_layers; l++) {
                    int any = 0;
                    for (int h = 0; h < c->n_heads; h++)
                        if (c->edges[(((size_t)l * c->n_heads + h) * ET + a) * ET + b]) {
                            if (!any) {
                                char et[40];
                                snprintf(et, sizeof et, "%s->%s", token_type_name(a), token_type_name(b));
                                APPEND("%-18s %-6d", et, l);
                            }
                            APPEND(" %d", h);
                            any = 1;
                        }
                    if (any) APPEND("\n");
                }
    }
#undef APPEND
    return t;
}

static json_t *num(double x) { return isfinite(x) ? json_real(x) : json_null(); }

static double faithfulness(const float m[3][3]) { return m[2][2] != 0 ? (double)m[1][2] / m[2][2] : NAN; }

// model_logs.json gets "prune": one line per finished round, rebuilt from the round files.
static int write_logs(const stage_inputs *in, int n_rounds, ep_error *err) {
    char path[4200];
    snprintf(path, sizeof path, "%s/model_logs.json", in->cfg->output_path);
    json_error_t je;
    json_t *o = access(path, F_OK) == 0 ? json_load_file(path, 0, &je) : json_object();
    if (!json_is_object(o)) {
        json_decref(o);
        return ep_fail(err, "%s: not a JSON object", path);
    }
    json_t *rounds = json_array();
    for (int r = 0; r < n_rounds; r++) {
        prune_round pr;
        if (prune_round_load(in->cfg->output_path, r, &pr, err)) {
            json_decref(rounds), json_decref(o);
            return -1;
        }
        int kept = 0;
        for (int i = 0; i < pr.n_units; i++) kept += circuit_has(&pr.kept, pr.kind, &pr.units[i]);
        json_array_append_new(rounds, json_pack("{s:i,s:s,s:s,s:i,s:i,s:o,s:o,s:o,s:o,s:o,s:o,s:o,s:s}", "round", pr.round,
                                                "kind", kind_name(pr.kind), "method", pr.method, "units", pr.n_units, "kept", kept,
                                                "target_logprob", num(pr.metrics[0][0]), "first_token_accuracy", num(pr.metrics[0][1]),
                                                "logit_diff", num(pr.metrics[0][2]), "kept_target_logprob", num(pr.metrics[1][0]),
                                                "kept_first_token_accuracy", num(pr.metrics[1][1]), "kept_logit_diff", num(pr.metrics[1][2]),
                                                "faithfulness_logit_diff", num(faithfulness(pr.metrics)), "stop", pr.stop));
        if (pr.compare_scores)
            json_object_set_new(json_array_get(rounds, (size_t)r), "rank_agreement",
                                json_pack("{s:s,s:o,s:o,s:i,s:i}", "compared_with", pr.compare_method, "spearman",
                                          num(pr.agreement[0]), "spearman_abs_exact", num(pr.agreement[1]), "top_k",
                                          (int)pr.agreement[3], "top_k_overlap", (int)pr.agreement[2]));
        prune_round_free(&pr);
    }
    json_object_set_new(o, "prune", rounds);
    int rc = write_json_atomic(path, o, err);
    json_decref(o);
    return rc;
}

static int write_summary(const stage_inputs *in, const circuit *c, int round, double faith, ep_error *err) {
    char path[4200], title[200];
    json_t *o = circuit_json(c);
    json_object_set_new(o, "round", json_integer(round));
    json_object_set_new(o, "faithfulness_logit_diff", num(faith));
    snprintf(path, sizeof path, "%s/circuit.json", in->cfg->output_path);
    int rc = write_json_atomic(path, o, err);
    json_decref(o);
    snprintf(title, sizeof title, "circuit after round %d (faithfulness, logit difference: %.4f)", round, faith);
    char *t = circuit_table(c, title);
    snprintf(path, sizeof path, "%s/circuit.txt", in->cfg->output_path);
    if (rc == 0) rc = write_text_atomic(path, t, err);
    free(t);
    return rc;
}

// Removes a folder's entries that start with prefix, folders with what they hold, one level deep.
// Test hook (docs/pruning.md): EDGEPATCH_TEST_KILL_ROUND=N[:mid|:write] sends SIGKILL to this process
// once it has computed N rounds: before the next round, in the middle of it, or while writing it.
typedef struct {
    int after;
    char where[8];
} kill_hook;

static void kill_hook_read(kill_hook *k) {
    const char *v = getenv("EDGEPATCH_TEST_KILL_ROUND");
    k->after = -1, k->where[0] = 0;
    if (v && sscanf(v, "%d", &k->after) == 1) {
        const char *c = strchr(v, ':');
        snprintf(k->where, sizeof k->where, "%s", c ? c + 1 : "");
    }
}

struct prune_run {
    stage_inputs *in;
    prune_params p;
    int n_rounds, max_rounds;
    int r, last, stopped, computed;  // next round to look at, last finished one, stop seen, rounds computed here
    int checked;                     // the last finished round whose shards were handed to the driver to check
    circuit c;                       // the circuit round r starts from
    double final_faith;
    circuit_metrics clean;
    int have_clean;
    kill_hook kh;
};

int prune_open(stage_inputs *in, int max_rounds, prune_run **out, ep_error *err) {
    prune_run *pr = ep_calloc(1, sizeof *pr);
    pr->in = in;
    if (parse_params(in, &pr->p, err) || score_check_targets(in, err)) {
        params_free(&pr->p);
        free(pr);
        return -1;
    }
    pr->n_rounds = pr->p.head_rounds + pr->p.edge_rounds > 0 ? pr->p.head_rounds + pr->p.edge_rounds : 1;
    pr->max_rounds = max_rounds;
    pr->last = pr->checked = -1;
    pr->final_faith = NAN;
    circuit_full(&in->m.cfg, &pr->c);
    kill_hook_read(&pr->kh);
    *out = pr;
    return 0;
}

void prune_close(prune_run *pr) {
    if (!pr) return;
    circuit_free(&pr->c);
    params_free(&pr->p);
    free(pr);
}

int prune_prepare(prune_run *pr, int fresh, ep_error *err) {
    const char *out = pr->in->cfg->output_path;
    char dir[4200], path[4400];
    snprintf(dir, sizeof dir, "%s/prune.d", out);
    if (mkdir(dir, 0777) != 0 && errno != EEXIST) return ep_fail(err, "%s: cannot create: %s", dir, strerror(errno));
    // Temporaries left by killed writers in prune.d and the rounds' folders (pipeline/files.h).
    if (!fresh) return remove_temporaries(dir, 1, NULL, NULL, err);
    if (remove_entries(dir, "round-", err)) return -1;
    snprintf(path, sizeof path, "%s/circuit.json", out), unlink(path);
    snprintf(path, sizeof path, "%s/circuit.txt", out), unlink(path);
    return 0;
}

// One round as work items: item i = prompts [i * batch_size, ...), its sums in an item shard
// prune.d/round-NNN.d/item-NNNNN.h5; finish (one process) merges them in item order, prunes, measures
// and writes the round file.
typedef struct {
    prune_run *pr;
    int r;
    char identity[17], path[4200], dir[4200];
    unit_kind kind;
    int method;             // 0 attribution, 1 exact, 2 an earlier run's file
    int exact, attribution;  // which scores the items compute (both with compare_importance)
    circuit c;
    circuit_unit *units;
    int n, width;  // units, sums per unit: 3 exact (metrics of C without the unit), then 1 attribution; >= 1
    int n_groups, group;  // unit groups per prompt batch (1 unless exact scores run), units per group
    ablation_plan plan;
    int current;  // the round file is current: the driver only checks the shards (and redoes a damaged one)
} round_ctx;

// Work item i: prompt batch i / n_groups, units [u0, u0 + nu) of group i % n_groups.
typedef struct {
    int first, S, g, u0, nu;
} item_span;

static item_span item_of(const round_ctx *rc, int item) {
    item_span s;
    stage_item_range(rc->pr->in, item / rc->n_groups, &s.first, &s.S);
    s.g = item % rc->n_groups, s.u0 = s.g * rc->group;
    s.nu = rc->n - s.u0 < rc->group ? rc->n - s.u0 : rc->group;
    return s;
}

static void shard_path(const round_ctx *rc, int item, char *out, size_t n) { snprintf(out, n, "%s/item-%05d.h5", rc->dir, item); }

static void shard_identity(const round_ctx *rc, int item, char out[17]) {
    item_span s = item_of(rc, item);
    char id[17];
    hash_hex(hash_bytes(hash_bytes(hash_str(HASH_INIT, rc->identity), &s.u0, sizeof s.u0), &s.nu, sizeof s.nu), id);
    stage_item_identity(id, s.first, s.S, out);
}

static int round_prepare(work_stage *ws, int fresh, ep_error *err) {
    round_ctx *rc = ws->ctx;
    if (mkdir(rc->dir, 0777) != 0 && errno != EEXIST) return ep_fail(err, "%s: cannot create: %s", rc->dir, strerror(errno));
    if (!fresh) return remove_temporaries(rc->dir, 0, NULL, NULL, err) ? -1 : rc->current;
    return remove_entries(rc->dir, "item-", err);
}

static int round_item_done(work_stage *ws, int item, ep_error *err) {
    round_ctx *rc = ws->ctx;
    char path[4400], id[17];
    shard_path(rc, item, path, sizeof path);
    shard_identity(rc, item, id);
    return stage_item_current(path, id, ws->log, err);
}

static int round_run_item(work_stage *ws, int item, ep_error *err) {
    round_ctx *rc = ws->ctx;
    const stage_inputs *in = rc->pr->in;
    item_span sp = item_of(rc, item);
    int first = sp.first, S = sp.S, n = sp.nu, r;
    const circuit_unit *units = rc->units + sp.u0;
    // base: C's metric sums; exact scores sum them over the scoring donors, as they do C-without-u's.
    double *sums = ep_calloc((size_t)n * rc->width + 1, sizeof(double)), base[3] = {0};
    double *ex = ep_calloc((size_t)n * 3 + 1, sizeof(double)), *at = ep_calloc((size_t)n + 1, sizeof(double));
    if (rc->exact) {
        exact_opts o = {1, rc->pr->p.exact_max_seqs, rc->pr->p.score_donors};
        r = score_exact_batch(in, &rc->c, &rc->plan, rc->kind, units, n, &o, first, S, ex, base, err);
    } else {
        r = circuit_measure_batch(in, &rc->plan, first, S, base, err);
    }
    if (r == 0 && rc->attribution) r = score_attribution_batch(in, &rc->plan, rc->kind, units, n, first, S, at, err);
    for (int u = 0; u < n; u++) {
        for (int k = 0; k < 3 * rc->exact; k++) sums[(size_t)u * rc->width + k] = ex[(size_t)u * 3 + k];
        if (rc->attribution) sums[(size_t)u * rc->width + 3 * rc->exact] = at[u];
    }
    free(ex), free(at);
    char path[4400], id[17];
    shard_path(rc, item, path, sizeof path);
    shard_identity(rc, item, id);
    h5store s;
    if (r == 0 && !ws->follower && (r = h5store_create(path, &s, err)) == 0) {
        h5shape ss = {2, {n, rc->width ? rc->width : 1}}, sb = {1, {3}};
        r = h5store_write_f64(&s, "sums", &ss, sums, err) || h5store_write_f64(&s, "base", &sb, base, err) ||
            h5store_set_str(&s, "format", "edgepatch-prune-item-1", err) || h5store_set_str(&s, "inputs_hash", id, err) ||
            h5store_set_i64(&s, "item", item, err) || h5store_set_i64(&s, "first_prompt", first, err) ||
            h5store_set_i64(&s, "n_prompts", S, err) || h5store_set_i64(&s, "first_unit", sp.u0, err) ||
            h5store_set_i64(&s, "n_units", n, err);
        if (r == 0 && ws->before_commit) ws->before_commit(ws->driver_arg, item);
        if (r) h5store_abandon(&s);
        else r = h5store_commit(&s, err);
    }
    free(sums);
    return r;
}

static int round_finish(work_stage *ws, ep_error *err) {
    round_ctx *rc = ws->ctx;
    prune_run *pr = rc->pr;
    const stage_inputs *in = pr->in;
    const prune_params *p = &pr->p;
    int P = in->prompts.n_prompts, w = rc->width, r = 0;
    double *sums = ep_calloc((size_t)rc->n * w + 1, sizeof(double)), base[3] = {0};
    for (int item = 0; item < ws->n_items && r == 0; item++) {
        char path[4400], id[17], *have = NULL;
        shard_path(rc, item, path, sizeof path);
        shard_identity(rc, item, id);
        h5store s;
        // Checked again where it is read: a shard damaged since its item was checked is recomputed.
        if ((r = h5store_open(path, &s, err)) == 0 && (r = h5store_verify(&s, err))) h5store_close(&s);
        if (r) {
            stage_shard_damaged(ws, path, err);
            break;
        }
        double *v = NULL, *b = NULL;
        h5shape sh, sb;
        if (h5store_get_str(&s, "inputs_hash", &have, err) || strcmp(have, id)) r = ep_fail(err, "%s: made from other inputs than this round's", path);
        if (r == 0) r = h5store_read_f64(&s, "sums", &sh, &v, err) || h5store_read_f64(&s, "base", &sb, &b, err);
        item_span sp = item_of(rc, item);
        if (r == 0 && (sh.rank != 2 || sh.dims[0] != sp.nu || sh.dims[1] != w || sb.rank != 1 || sb.dims[0] != 3))
            r = ep_fail(err, "%s: dataset sums or base has the wrong shape", path);
        for (size_t i = 0; r == 0 && i < (size_t)sp.nu * w; i++) sums[(size_t)sp.u0 * w + i] += v[i];
        for (int i = 0; r == 0 && sp.g == 0 && i < 3; i++) base[i] += b[i];  // every group's C is the same
        free(v), free(b), free(have);
        h5store_close(&s);
    }
    round_result res = {.kind = rc->kind, .units = rc->units, .n = rc->n, .pruned = p->head_rounds + p->edge_rounds > 0, .stop = ""};
    res.scores = ep_calloc((size_t)rc->n + 1, sizeof(double));
    circuit kept;
    circuit_copy(&rc->c, &kept);
    if (r == 0 && rc->method == 2) {
        // Scores of an earlier run (the original's prune_using_imp_scores), taken in this very circuit.
        prune_round f;
        if ((r = load_round_file(p->files[rc->r], &in->m.cfg, &f, err)) == 0) {
            int same = f.kind == rc->kind && f.n_units == rc->n && circuit_equal(&f.circuit, &rc->c) &&
                       !memcmp(f.units, rc->units, sizeof(circuit_unit) * (size_t)rc->n);
            if (!same) r = ep_fail(err, "%s: its scores were taken in another circuit than round %d's (prune_using_imp_scores[%d])", p->files[rc->r], rc->r, rc->r);
            for (int i = 0; i < rc->n && r == 0; i++) res.scores[i] = f.scores[i];
            res.method = !strcmp(f.method, "exact") ? "exact" : "attribution";
            prune_round_free(&f);
        }
    } else if (r == 0) {
        // exact: C-without-u's metrics in columns 0..2 of the sums; attribution: the column after them
        double *ex = ep_calloc((size_t)rc->n * 3 + 1, sizeof(double)), *exs = ep_calloc((size_t)rc->n + 1, sizeof(double));
        double *ats = ep_calloc((size_t)rc->n + 1, sizeof(double));
        for (int u = 0; u < rc->n; u++) {
            for (int k = 0; k < 3 * rc->exact; k++) ex[(size_t)u * 3 + k] = sums[(size_t)u * w + k];
            if (rc->attribution) ats[u] = sums[(size_t)u * w + 3 * rc->exact] / P;
        }
        if (rc->exact) score_exact_finish(ex, base, rc->n, P * p->score_donors, exs, NULL, NULL);
        res.method = rc->method == 1 ? "exact" : "attribution";
        memcpy(res.scores, rc->method == 1 ? exs : ats, sizeof(double) * (size_t)rc->n);
        if (rc->exact && rc->attribution) {
            res.compare_method = rc->method == 1 ? "attribution" : "exact";
            res.compare_scores = rc->method == 1 ? ats : exs;
            compare_ranks(exs, ats, rc->n, keep_count(p, rc->r, rc->n), res.agreement);
            if (rc->method == 1) ats = NULL;  // now res.compare_scores
            else exs = NULL;
        }
        free(ex), free(exs), free(ats);
    }
    // exact scores sum C's metrics over the scoring donors: the circuit row is their mean
    double nb = rc->exact ? (double)P * p->score_donors : P;
    res.m_circuit = (circuit_metrics){base[0] / nb, base[1] / nb, base[2] / nb};
    if (r == 0 && pr->kh.after == pr->computed && !strcmp(pr->kh.where, "mid")) raise(SIGKILL);
    if (r == 0 && !pr->have_clean && (r = circuit_measure(in, NULL, &pr->clean, err)) == 0) pr->have_clean = 1;
    res.m_clean = pr->clean;
    if (r == 0 && !res.pruned) {
        res.m_kept = res.m_circuit;
        res.stop = "scores_only";
    } else if (r == 0) {
        int k = keep_count(p, rc->r, rc->n);
        int *order = ep_malloc(sizeof(int) * (size_t)(rc->n + 1));
        rank_order(res.scores, rc->n, order);
        for (int i = k; i < rc->n; i++) circuit_set(&kept, rc->kind, &rc->units[order[i]], 0);
        free(order);
        r = circuit_measure(in, &kept, &res.m_kept, err);
        double faith = pr->clean.logit_diff != 0 ? res.m_kept.logit_diff / pr->clean.logit_diff : NAN;
        if (p->min_faithfulness > 0 && !(faith >= p->min_faithfulness)) res.stop = "min_faithfulness";
        else if (k <= p->min_units) res.stop = "min_units";
        else if (rc->r == pr->n_rounds - 1) res.stop = "rounds";
    }
    // A tensor-parallel follower only joined the passes above.
    if (r == 0 && !ws->follower) r = write_round(rc->path, rc->identity, rc->r, &rc->c, &kept, &res,
                                pr->kh.after == pr->computed && !strcmp(pr->kh.where, "write"), err);
    if (r == 0 && !ws->follower) {
        pr->computed++;
        int nk = 0;
        for (int i = 0; i < rc->n; i++) nk += circuit_has(&kept, rc->kind, &rc->units[i]);
        ep_log_result(ws->log, "prune: round %d (%s units, %s): %d scored, %d kept, faithfulness %.4f%s%s", rc->r,
                      kind_name(rc->kind), res.method, rc->n, nk,
                      pr->clean.logit_diff != 0 ? res.m_kept.logit_diff / pr->clean.logit_diff : NAN,
                      res.stop[0] ? ", stop: " : "", res.stop);
        if (res.compare_scores)
            ep_log_result(ws->log, "prune: round %d rank agreement, attribution vs exact: Spearman %.3f (with |exact| %.3f), "
                          "top-%d overlap %d", rc->r, res.agreement[0], res.agreement[1], (int)res.agreement[3],
                          (int)res.agreement[2]);
        r = write_logs(in, rc->r + 1, err);
    }
    circuit_free(&kept);
    free(res.scores), free(res.compare_scores), free(sums);
    return r;
}

static void round_release(work_stage *ws) {
    round_ctx *rc = ws->ctx;
    if (!rc) return;
    circuit_free(&rc->c);
    plan_free(&rc->plan);
    free(rc->units);
    free(rc);
    ws->ctx = NULL;
}

int prune_next_round(prune_run *pr, int root, work_stage *ws, ep_error *err) {
    const stage_inputs *in = pr->in;
    const char *out = in->cfg->output_path;
    for (; pr->r < pr->n_rounds && !pr->stopped; pr->r++) {
        if (pr->max_rounds > 0 && pr->r >= pr->max_rounds) break;
        char path[4200], id[17];
        round_path(out, pr->r, path, sizeof path);
        round_identity(&pr->p, pr->r, id);
        int cur = stage_output_current(path, id, 0, in->log, err);
        if (cur < 0) return -1;
        // A finished round goes to the driver once too, which checks its shards (the checkpoints its file
        // is rebuilt from) and computes and merges again only what fails; the next call moves past it.
        if (cur == 0 || pr->checked != pr->r) {
            if (cur == 0 && pr->kh.after == pr->computed && !pr->kh.where[0]) raise(SIGKILL);
            pr->checked = pr->r;
            round_ctx *rc = ep_calloc(1, sizeof *rc);
            rc->pr = pr, rc->r = pr->r, rc->current = cur;
            snprintf(rc->identity, sizeof rc->identity, "%s", id);
            snprintf(rc->path, sizeof rc->path, "%s", path);
            snprintf(rc->dir, sizeof rc->dir, "%s/prune.d/round-%03d.d", out, pr->r);
            int total = pr->p.head_rounds + pr->p.edge_rounds;
            rc->kind = pr->r < pr->p.head_rounds || total == 0 ? UNIT_HEAD : UNIT_EDGE;
            circuit_copy(&pr->c, &rc->c);
            if (rc->kind == UNIT_EDGE && !rc->c.edges) circuit_start_edges(&rc->c, &in->prompts);
            rc->n = circuit_units(&rc->c, rc->kind, &rc->units);
            rc->method = pr->r < pr->p.n_files ? 2 : !strcmp(pr->p.importance, "exact") ? 1 : 0;
            rc->exact = rc->method == 1 || (rc->method == 0 && pr->p.compare);
            rc->attribution = rc->method == 0 || (rc->method == 1 && pr->p.compare);
            rc->width = 3 * rc->exact + rc->attribution + (rc->method == 2);
            rc->group = rc->exact && rc->n > 0 ? pr->p.exact_units_per_item : rc->n > 0 ? rc->n : 1;
            rc->n_groups = rc->n > 0 ? (rc->n + rc->group - 1) / rc->group : 1;
            int r = rc->n == 0 ? ep_fail(err, "prune round %d: the circuit has no %s units left to score", pr->r, kind_name(rc->kind))
                               : circuit_plan(&rc->c, &in->m.cfg, &in->plan, &rc->plan, err);
            *ws = (work_stage){.name = "prune", .n_items = stage_n_items(in) * rc->n_groups, .ctx = rc, .log = in->log,
                               .prepare = round_prepare,
                               .item_done = round_item_done, .run_item = round_run_item, .finish = round_finish,
                               .release = round_release};
            if (r) {  // a failed circuit_plan leaves rc->plan empty
                round_release(ws);
                return -1;
            }
            return 1;
        }
        // finished earlier (by this run or another): its kept circuit is the next one
        prune_round f;
        if (load_round_file(path, &in->m.cfg, &f, err)) return -1;
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
    if (root && pr->last >= 0 && write_logs(in, pr->last + 1, err)) return -1;
    if (root && pr->stopped) {
        if (write_summary(in, &pr->c, pr->last, pr->final_faith, err)) return -1;
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
