#include "circuit_file.h"

#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pipeline/files.h"
#include "pipeline/h5store.h"
#include "stages/prompts.h"

#define NT PLAN_CIRCUIT_TYPES
#define ET PLAN_EDGE_TYPES

void prune_round_path(const char *run_dir, int r, char *out, size_t n) {
    snprintf(out, n, "%s/prune.d/round-%03d.h5", run_dir, r);
}

// A unit as its row of the dataset `units`: (layer, head, type, -1) or (layer, head, sender, receiver),
// the columns the files have always had (a head unit's fourth is unused; readers ignore it).
static void row_of_unit(unit_kind kind, const circuit_unit *u, int32_t row[4]) {
    row[0] = u->layer, row[1] = u->head;
    row[2] = kind == UNIT_HEAD ? u->type : u->sender;
    row[3] = kind == UNIT_HEAD ? -1 : u->receiver;
}

static circuit_unit unit_of_row(unit_kind kind, const int32_t row[4]) {
    return kind == UNIT_HEAD ? circuit_head_unit(row[0], row[1], row[2]) : circuit_edge_unit(row[0], row[1], row[2], row[3]);
}

// The token type names (prompts.h5's types), the enum_names of every type-valued dataset or dimension.
static int set_type_names(h5store *s, const char *name, ep_error *err) {
    const char *names[TT_COUNT];
    for (int i = 0; i < TT_COUNT; i++) names[i] = token_type_name(i);
    return h5store_set_strs_at(s, name, "enum_names", names, TT_COUNT, err);
}

static int write_mask(h5store *s, const char *name, const circuit *c, int edges, ep_error *err) {
    size_t n = (size_t)c->n_layers * c->n_heads * (edges ? ET * ET : NT);
    const unsigned char *src = edges ? c->edges : c->heads;
    int32_t *v = ep_malloc(sizeof(int32_t) * n);
    for (size_t i = 0; i < n; i++) v[i] = src[i];
    h5shape sh = edges ? (h5shape){4, {c->n_layers, c->n_heads, ET, ET}} : (h5shape){3, {c->n_layers, c->n_heads, NT}};
    int rc = h5store_write_i32(s, name, &sh, v, err) ||
             h5store_label(s, name, edges ? "layer,head,sender,receiver" : "layer,head,type", err) || set_type_names(s, name, err);
    free(v);
    return rc ? -1 : 0;
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
    free(r->units), free(r->scores), free(r->compare_scores), free(r->attribution_scores);
    circuit_free(&r->circuit), circuit_free(&r->kept);
    memset(r, 0, sizeof *r);
}

int prune_round_read(const char *path, const model_config *cfg, prune_round *r, ep_error *err) {
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
    if (rc == 0 && h5store_has(&s, "compare/eap_ig_agreement")) {
        double *ag = NULL;
        h5shape sc, sa;
        rc = h5store_read_f32(&s, "compare/attribution_scores", &sc, &r->attribution_scores, err) ||
             h5store_read_f64(&s, "compare/eap_ig_agreement", &sa, &ag, err);
        if (rc == 0 && (sc.rank != 1 || sc.dims[0] != r->n_units || sa.rank != 1 || sa.dims[0] != 4 || !r->compare_scores))
            rc = ep_fail(err, "%s: datasets compare/attribution_scores, compare/eap_ig_agreement: expected [%d] and [4] "
                         "beside compare/scores", path, r->n_units);
        if (rc == 0) r->has_ig_agreement = 1, memcpy(r->ig_agreement, ag, sizeof r->ig_agreement);
        free(ag);
    }
    int64_t ig_steps = 0;
    if (rc == 0 && method && !strcmp(method, "eap-ig")) {
        rc = h5store_get_i64(&s, "ig_steps", &ig_steps, err);
        if (rc == 0 && (ig_steps < 1 || ig_steps > 1000))
            rc = ep_fail(err, "%s: attribute ig_steps: expected a count 1..1000, not %lld", path, (long long)ig_steps);
    }
    if (rc == 0 && strcmp(method, "attribution") && strcmp(method, "exact") && strcmp(method, "eap-ig"))
        rc = ep_fail(err, "%s: attribute method: expected \"attribution\", \"exact\" or \"eap-ig\", not \"%s\"", path, method);
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
    for (int k = 2; k < 4 && rc == 0 && r->has_ig_agreement; k++)
        if (!(r->ig_agreement[k] >= 0 && r->ig_agreement[k] <= r->n_units && r->ig_agreement[k] == floor(r->ig_agreement[k])))
            rc = ep_fail(err, "%s: dataset compare/eap_ig_agreement: element %d is not a unit count 0..%d", path, k, r->n_units);
    if (rc == 0) r->ig_steps = (int)ig_steps;
    if (rc == 0) {
        r->round = (int)round, r->pruned = (int)pruned;
        r->kind = !strcmp(kind, "edge") ? UNIT_EDGE : UNIT_HEAD;
        snprintf(r->method, sizeof r->method, "%s", method);
        snprintf(r->stop, sizeof r->stop, "%s", stop);
        memcpy(r->metrics, metrics, sizeof r->metrics);
        r->units = ep_malloc(sizeof(circuit_unit) * (size_t)(r->n_units + 1));
        for (int i = 0; i < r->n_units; i++) r->units[i] = unit_of_row(r->kind, units + 4 * i);
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
            prune_round_path(run_dir, k, path, sizeof path);
            if (!h5store_is_complete(path)) break;
            round = k;
        }
        if (round < 0) return ep_fail(err, "%s: no finished round in %s/prune.d (run the score stage first)", run_dir, run_dir);
    }
    prune_round_path(run_dir, round, path, sizeof path);
    if (access(path, F_OK) != 0) return ep_fail(err, "%s: no such round file (round %d not run)", path, round);
    return prune_round_read(path, NULL, r, err);
}


int prune_round_write(const char *path, const char *identity, int r, const circuit *c, const circuit *kept,
                      const prune_round_result *res, int kill_before_commit, ep_error *err) {
    h5store s;
    if (h5store_create(path, &s, err)) return -1;
    int n = res->n;
    int32_t *u = ep_malloc(sizeof(int32_t) * 4 * (size_t)n);
    float *sc = ep_malloc(sizeof(float) * (size_t)n);
    for (int i = 0; i < n; i++) {
        row_of_unit(res->kind, &res->units[i], u + 4 * i);
        sc[i] = (float)res->scores[i];
    }
    const circuit_metrics *ms[3] = {&res->m_circuit, &res->m_kept, &res->m_clean};
    float met[9];
    for (int i = 0; i < 3; i++)
        met[3 * i] = (float)ms[i]->target_logprob, met[3 * i + 1] = (float)ms[i]->first_token_accuracy,
        met[3 * i + 2] = (float)ms[i]->logit_diff;
    h5shape su = {2, {n, 4}}, ss = {1, {n}}, sm = {2, {3, 3}};
    const char *unit_cols[4] = {"layer", "head", res->kind == UNIT_HEAD ? "type" : "sender", "receiver"};
    const char *metric_rows[3] = {"circuit", "kept", "clean"}, *metric_cols[3] = {"target_logprob", "first_token_accuracy", "logit_diff"};
    int rc = h5store_write_i32(&s, "units", &su, u, err) || h5store_label(&s, "units", "unit,field", err) ||
             h5store_set_strs_at(&s, "units", "column_names", unit_cols, 4, err) || set_type_names(&s, "units", err) ||
             h5store_write_f32(&s, "scores", &ss, sc, err) || h5store_label(&s, "scores", "unit", err) ||
             h5store_write_f32(&s, "metrics", &sm, met, err) || h5store_label(&s, "metrics", "measured,metric", err) ||
             h5store_set_strs_at(&s, "metrics", "row_names", metric_rows, 3, err) ||
             h5store_set_strs_at(&s, "metrics", "column_names", metric_cols, 3, err) ||
             write_mask(&s, "circuit/heads", c, 0, err) ||
             (c->edges && write_mask(&s, "circuit/edges", c, 1, err)) || write_mask(&s, "kept/heads", kept, 0, err) ||
             (kept->edges && write_mask(&s, "kept/edges", kept, 1, err)) ||
             h5store_set_str(&s, "format", "edgepatch-prune-round-1", err) || h5store_set_str(&s, "inputs_hash", identity, err) ||
             h5store_set_i64(&s, "round", r, err) || h5store_set_str(&s, "kind", unit_kind_name(res->kind), err) ||
             h5store_set_str(&s, "method", res->method, err) || h5store_set_i64(&s, "pruned", res->pruned, err) ||
             h5store_set_str(&s, "stop", res->stop, err) ||
             h5store_set_str(&s, "metrics_columns", "target_logprob,first_token_accuracy,logit_diff", err) ||
             h5store_set_str(&s, "metrics_rows", "circuit,kept,clean", err) ||
             h5store_set_str(&s, "edge_intervention", res->edge_intervention ? res->edge_intervention : "kv", err);
    if (rc == 0 && res->compare_scores) {
        h5shape sa = {1, {4}};
        const char *agreement_names[4] = {"spearman", "spearman_abs_exact", "top_k_overlap", "top_k"};  // as model_logs.json names them
        for (int i = 0; i < n; i++) sc[i] = (float)res->compare_scores[i];
        rc = h5store_write_f32(&s, "compare/scores", &ss, sc, err) || h5store_label(&s, "compare/scores", "unit", err) ||
             h5store_write_f64(&s, "compare/agreement", &sa, res->agreement, err) ||
             h5store_label(&s, "compare/agreement", "statistic", err) ||
             h5store_set_strs_at(&s, "compare/agreement", "column_names", agreement_names, 4, err) ||
             h5store_set_str(&s, "compare_method", res->compare_method, err);
    }
    if (rc == 0 && res->compare_scores && res->has_ig_agreement && res->attribution_scores) {
        h5shape sa = {1, {4}};
        const char *agreement_names[4] = {"spearman", "spearman_abs_exact", "top_k_overlap", "top_k"};
        for (int i = 0; i < n; i++) sc[i] = (float)res->attribution_scores[i];
        rc = h5store_write_f32(&s, "compare/attribution_scores", &ss, sc, err) ||
             h5store_label(&s, "compare/attribution_scores", "unit", err) ||
             h5store_write_f64(&s, "compare/eap_ig_agreement", &sa, res->ig_agreement, err) ||
             h5store_label(&s, "compare/eap_ig_agreement", "statistic", err) ||
             h5store_set_strs_at(&s, "compare/eap_ig_agreement", "column_names", agreement_names, 4, err);
    }
    if (rc == 0 && !strcmp(res->method, "eap-ig")) rc = h5store_set_i64(&s, "ig_steps", res->ig_steps, err);
    free(u), free(sc);
    if (rc == 0 && kill_before_commit) raise(SIGKILL);  // test hook: data written, not committed
    if (rc) {
        h5store_abandon(&s);
        return -1;
    }
    return h5store_commit(&s, err);
}

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
// One method's rank agreement with exact, as model_logs.json names its figures.
static json_t *agreement_json(const double a[4]) {
    return json_pack("{s:o,s:o,s:i,s:i}", "spearman", num(a[0]), "spearman_abs_exact", num(a[1]), "top_k", (int)a[3],
                     "top_k_overlap", (int)a[2]);
}

int prune_logs_write(const char *run_dir, int n_rounds, ep_error *err) {
    char path[4200];
    snprintf(path, sizeof path, "%s/model_logs.json", run_dir);
    json_error_t je;
    json_t *o = access(path, F_OK) == 0 ? json_load_file(path, 0, &je) : json_object();
    if (!json_is_object(o)) {
        json_decref(o);
        return ep_fail(err, "%s: not a JSON object", path);
    }
    json_t *rounds = json_array();
    for (int r = 0; r < n_rounds; r++) {
        prune_round pr;
        if (prune_round_load(run_dir, r, &pr, err)) {
            json_decref(rounds), json_decref(o);
            return -1;
        }
        int kept = 0;
        for (int i = 0; i < pr.n_units; i++) kept += circuit_has(&pr.kept, pr.kind, &pr.units[i]);
        json_array_append_new(rounds, json_pack("{s:i,s:s,s:s,s:i,s:i,s:o,s:o,s:o,s:o,s:o,s:o,s:o,s:s}", "round", pr.round,
                                                "kind", unit_kind_name(pr.kind), "method", pr.method, "units", pr.n_units, "kept", kept,
                                                "target_logprob", num(pr.metrics[0][0]), "first_token_accuracy", num(pr.metrics[0][1]),
                                                "logit_diff", num(pr.metrics[0][2]), "kept_target_logprob", num(pr.metrics[1][0]),
                                                "kept_first_token_accuracy", num(pr.metrics[1][1]), "kept_logit_diff", num(pr.metrics[1][2]),
                                                "faithfulness_logit_diff", num(faithfulness(pr.metrics)), "stop", pr.stop));
        json_t *line = json_array_get(rounds, (size_t)r);
        if (pr.ig_steps) json_object_set_new(line, "ig_steps", json_integer(pr.ig_steps));
        if (pr.compare_scores) {
            // The top-level figures are attribution's agreement with exact (as before eap-ig); by_method has
            // one entry per gradient method the round computed (attribution, and eap-ig in an eap-ig round).
            json_t *ra = json_pack("{s:s,s:o,s:o,s:i,s:i}", "compared_with", pr.compare_method, "spearman",
                                   num(pr.agreement[0]), "spearman_abs_exact", num(pr.agreement[1]), "top_k",
                                   (int)pr.agreement[3], "top_k_overlap", (int)pr.agreement[2]);
            json_t *by = json_object();
            json_object_set_new(by, "attribution", agreement_json(pr.agreement));
            if (pr.has_ig_agreement) json_object_set_new(by, "eap-ig", agreement_json(pr.ig_agreement));
            json_object_set_new(ra, "by_method", by);
            json_object_set_new(line, "rank_agreement", ra);
        }
        prune_round_free(&pr);
    }
    json_object_set_new(o, "prune", rounds);
    int rc = write_json_atomic(path, o, err);
    json_decref(o);
    return rc;
}

int circuit_file_write(const char *run_dir, const circuit *c, int round, double faith, ep_error *err) {
    char path[4200], title[200];
    json_t *o = circuit_json(c);
    json_object_set_new(o, "round", json_integer(round));
    json_object_set_new(o, "faithfulness_logit_diff", num(faith));
    // the model's shape, for the report's layer axis (a circuit need not reach the last layer)
    json_object_set_new(o, "n_layers", json_integer(c->n_layers));
    json_object_set_new(o, "n_heads", json_integer(c->n_heads));
    snprintf(path, sizeof path, "%s/circuit.json", run_dir);
    int rc = write_json_atomic(path, o, err);
    json_decref(o);
    snprintf(title, sizeof title, "circuit after round %d (faithfulness, logit difference: %.4f)", round, faith);
    char *t = circuit_table(c, title);
    snprintf(path, sizeof path, "%s/circuit.txt", run_dir);
    if (rc == 0) rc = write_text_atomic(path, t, err);
    free(t);
    return rc;
}

void circuit_file_remove(const char *run_dir) {
    char path[4200];
    snprintf(path, sizeof path, "%s/circuit.json", run_dir), unlink(path);
    snprintf(path, sizeof path, "%s/circuit.txt", run_dir), unlink(path);
}
