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

#include "pipeline/h5store.h"
#include "pipeline/hash.h"
#include "stages/prompts.h"

#define NT PLAN_CIRCUIT_TYPES
#define ET PLAN_EDGE_TYPES

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
    char identity[17];
} prune_params;

static void params_free(prune_params *p) {
    free(p->k);
    free(p->files);
}

static int parse_params(const stage_inputs *in, prune_params *p, ep_error *err) {
    const run_config *rc = in->cfg;
    json_t *j = rc->json, *v;
    memset(p, 0, sizeof *p);
    p->importance = "attribution", p->fraction = 0.1, p->min_units = 1, p->exact_max_seqs = 64;
    if ((v = json_object_get(j, "importance"))) {
        const char *s = json_string_value(v);
        if (!s || (strcmp(s, "attribution") && strcmp(s, "exact")))
            return ep_fail(err, "%s: field importance: expected \"attribution\" or \"exact\"", rc->path);
        p->importance = s;
    }
    const char *mode = rc->model_name ? rc->model_name : "";
    int edges_mode = strstr(mode, "prune_edges_in_circuits") != NULL;
    if ((v = json_object_get(j, "prune_rounds"))) {
        if (json_is_integer(v) && json_integer_value(v) >= 0 && json_integer_value(v) <= 10000) {
            *(edges_mode ? &p->edge_rounds : &p->head_rounds) = (int)json_integer_value(v);
        } else if (json_is_object(v)) {
            json_t *h = json_object_get(v, "heads"), *e = json_object_get(v, "edges");
            if ((h && (!json_is_integer(h) || json_integer_value(h) < 0 || json_integer_value(h) > 10000)) ||
                (e && (!json_is_integer(e) || json_integer_value(e) < 0 || json_integer_value(e) > 10000)) ||
                json_object_size(v) != (size_t)(!!h + !!e))
                return ep_fail(err, "%s: field prune_rounds: expected {\"heads\": N, \"edges\": M} with counts 0..10000", rc->path);
            p->head_rounds = h ? (int)json_integer_value(h) : 0;
            p->edge_rounds = e ? (int)json_integer_value(e) : 0;
        } else {
            return ep_fail(err, "%s: field prune_rounds: expected a count or {\"heads\": N, \"edges\": M}", rc->path);
        }
    }
    if ((v = json_object_get(j, "prune_fraction"))) {
        if (!json_is_number(v) || json_number_value(v) <= 0 || json_number_value(v) >= 1)
            return ep_fail(err, "%s: field prune_fraction: expected a number in (0, 1)", rc->path);
        p->fraction = json_number_value(v);
    }
    if ((v = json_object_get(j, "prune_k")) && !json_is_null(v)) {
        if (!json_is_array(v)) return ep_fail(err, "%s: field prune_k: expected a list of unit counts", rc->path);
        p->n_k = (int)json_array_size(v);
        p->k = ep_calloc((size_t)p->n_k + 1, sizeof(int));
        for (int i = 0; i < p->n_k; i++) {
            json_t *e = json_array_get(v, (size_t)i);
            if (!json_is_integer(e) || json_integer_value(e) < 1 || json_integer_value(e) > 100000000)
                return ep_fail(err, "%s: field prune_k[%d]: expected a positive count", rc->path, i);
            p->k[i] = (int)json_integer_value(e);
        }
    }
    if ((v = json_object_get(j, "prune_using_imp_scores")) && !json_is_null(v)) {
        if (!json_is_array(v)) return ep_fail(err, "%s: field prune_using_imp_scores: expected a list of round files", rc->path);
        p->n_files = (int)json_array_size(v);
        p->files = ep_calloc((size_t)p->n_files + 1, sizeof(char *));
        for (int i = 0; i < p->n_files; i++)
            if (!(p->files[i] = json_string_value(json_array_get(v, (size_t)i))))
                return ep_fail(err, "%s: field prune_using_imp_scores[%d]: expected a path", rc->path, i);
        if (p->n_k != p->n_files)
            return ep_fail(err, "%s: field prune_k: needs one count per prune_using_imp_scores file (%d, not %d)", rc->path,
                           p->n_files, p->n_k);
    }
    if (p->n_files > p->head_rounds + p->edge_rounds) p->head_rounds = p->n_files - p->edge_rounds;
    if ((v = json_object_get(j, "min_units"))) {
        if (!json_is_integer(v) || json_integer_value(v) < 0) return ep_fail(err, "%s: field min_units: expected a count", rc->path);
        p->min_units = (int)json_integer_value(v);
    }
    if ((v = json_object_get(j, "min_faithfulness"))) {
        if (!json_is_number(v)) return ep_fail(err, "%s: field min_faithfulness: expected a number", rc->path);
        p->min_faithfulness = json_number_value(v);
    }
    if ((v = json_object_get(j, "exact_max_seqs"))) {
        if (!json_is_integer(v) || json_integer_value(v) < 1) return ep_fail(err, "%s: field exact_max_seqs: expected a count", rc->path);
        p->exact_max_seqs = (int)json_integer_value(v);
    }
    // Identity: everything a round's result depends on (the score files by their own identity).
    uint64_t h = hash_str(HASH_INIT, "prune-1");
    h = hash_str(h, in->prompts_hash), h = hash_str(h, in->model_hash), h = hash_str(h, in->plan_hash);
    h = hash_str(h, p->importance);
    int ints[5] = {p->head_rounds, p->edge_rounds, p->min_units, p->exact_max_seqs, rc->batch_size};
    h = hash_bytes(h, ints, sizeof ints);
    h = hash_bytes(h, &p->fraction, sizeof p->fraction);
    h = hash_bytes(h, &p->min_faithfulness, sizeof p->min_faithfulness);
    if (p->n_k) h = hash_bytes(h, p->k, sizeof(int) * (size_t)p->n_k);
    for (int i = 0; i < p->n_files; i++) {
        h5store s;
        char *id = NULL;
        if (h5store_open(p->files[i], &s, err)) return -1;
        int r = h5store_get_str(&s, "inputs_hash", &id, err);
        h5store_close(&s);
        if (r) return -1;
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
    free(r->units), free(r->scores);
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
    if (rc == 0) rc = read_mask(&s, "circuit", cfg, &r->circuit, err);
    if (rc == 0) rc = read_mask(&s, "kept", cfg, &r->kept, err);
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
} round_result;

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

static int write_json_file(const char *path, json_t *o, ep_error *err) {
    char *text = json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(8));
    size_t n = strlen(text);
    text = ep_realloc(text, n + 2);
    strcpy(text + n, "\n");
    int rc = write_text_atomic(path, text, err);
    free(text);
    return rc;
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
        prune_round_free(&pr);
    }
    json_object_set_new(o, "prune", rounds);
    int rc = write_json_file(path, o, err);
    json_decref(o);
    return rc;
}

static int write_summary(const stage_inputs *in, const circuit *c, int round, double faith, ep_error *err) {
    char path[4200], title[200];
    json_t *o = circuit_json(c);
    json_object_set_new(o, "round", json_integer(round));
    json_object_set_new(o, "faithfulness_logit_diff", num(faith));
    snprintf(path, sizeof path, "%s/circuit.json", in->cfg->output_path);
    int rc = write_json_file(path, o, err);
    json_decref(o);
    snprintf(title, sizeof title, "circuit after round %d (faithfulness, logit difference: %.4f)", round, faith);
    char *t = circuit_table(c, title);
    snprintf(path, sizeof path, "%s/circuit.txt", in->cfg->output_path);
    if (rc == 0) rc = write_text_atomic(path, t, err);
    free(t);
    return rc;
}

static int prepare_dir(const char *out, int fresh, ep_error *err) {
    char dir[4200], path[4600];
    snprintf(dir, sizeof dir, "%s/prune.d", out);
    if (mkdir(dir, 0777) != 0 && errno != EEXIST) return ep_fail(err, "%s: cannot create: %s", dir, strerror(errno));
    DIR *d = opendir(dir);
    if (!d) return ep_fail(err, "%s: cannot list: %s", dir, strerror(errno));
    struct dirent *e;
    while ((e = readdir(d)))
        if (!strncmp(e->d_name, "round-", 6) && (fresh || strstr(e->d_name, ".tmp-"))) {
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            unlink(path);
        }
    closedir(d);
    if (fresh) {
        snprintf(path, sizeof path, "%s/circuit.json", out), unlink(path);
        snprintf(path, sizeof path, "%s/circuit.txt", out), unlink(path);
    }
    return 0;
}

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

static int compute_round(const stage_inputs *in, const prune_params *p, int r, int n_rounds, circuit *c,
                         const circuit_metrics *clean, int kill_mid, round_result *res, circuit *kept, ep_error *err) {
    int total = p->head_rounds + p->edge_rounds;
    res->kind = r < p->head_rounds || total == 0 ? UNIT_HEAD : UNIT_EDGE;
    res->m_clean = *clean;
    if (res->kind == UNIT_EDGE && !c->edges) circuit_start_edges(c, &in->prompts);
    res->n = circuit_units(c, res->kind, &res->units);
    if (res->n == 0) return ep_fail(err, "prune round %d: the circuit has no %s units left to score", r, kind_name(res->kind));
    res->scores = ep_calloc((size_t)res->n, sizeof(double));
    int rc = 0;
    if (r < p->n_files) {
        // Scores of an earlier run (the original's prune_using_imp_scores): taken in this very circuit.
        prune_round f;
        if (load_round_file(p->files[r], &in->m.cfg, &f, err)) return -1;
        int same = f.kind == res->kind && f.n_units == res->n && circuit_equal(&f.circuit, c) &&
                   !memcmp(f.units, res->units, sizeof(circuit_unit) * (size_t)res->n);
        if (!same) rc = ep_fail(err, "%s: its scores were taken in another circuit than round %d's (prune_using_imp_scores[%d])", p->files[r], r, r);
        for (int i = 0; i < res->n && rc == 0; i++) res->scores[i] = f.scores[i];
        res->method = !strcmp(f.method, "exact") ? "exact" : "attribution";
        prune_round_free(&f);
    } else if (!strcmp(p->importance, "exact")) {
        exact_opts o = {1, p->exact_max_seqs};
        res->method = "exact";
        rc = score_exact(in, c, res->kind, res->units, res->n, &o, res->scores, NULL, NULL, err);
    } else {
        res->method = "attribution";
        rc = score_attribution(in, c, res->kind, res->units, res->n, res->scores, err);
    }
    if (rc == 0 && kill_mid) raise(SIGKILL);
    if (rc == 0) rc = circuit_measure(in, c, &res->m_circuit, err);
    circuit_copy(c, kept);
    res->pruned = total > 0;
    res->stop = "";
    if (rc || !res->pruned) {
        res->m_kept = res->m_circuit;
        res->stop = "scores_only";
        return rc;
    }
    int k = r < p->n_k ? p->k[r] : res->n - (int)fmax(1.0, floor(res->n * p->fraction + 0.5));
    if (k > res->n) k = res->n;
    if (k < 0) k = 0;
    int *order = ep_malloc(sizeof(int) * (size_t)(res->n + 1));
    rank_order(res->scores, res->n, order);
    for (int i = k; i < res->n; i++) circuit_set(kept, res->kind, &res->units[order[i]], 0);
    free(order);
    rc = circuit_measure(in, kept, &res->m_kept, err);
    double faith = clean->logit_diff != 0 ? res->m_kept.logit_diff / clean->logit_diff : NAN;
    if (p->min_faithfulness > 0 && !(faith >= p->min_faithfulness)) res->stop = "min_faithfulness";
    else if (k <= p->min_units) res->stop = "min_units";
    else if (r == n_rounds - 1) res->stop = "rounds";
    return rc;
}

int prune_stage(stage_inputs *in, int fresh, int max_rounds, int (*stop_requested)(void), ep_error *err) {
    prune_params p;
    if (parse_params(in, &p, err)) {
        params_free(&p);
        return -1;
    }
    const char *out = in->cfg->output_path;
    int n_rounds = p.head_rounds + p.edge_rounds > 0 ? p.head_rounds + p.edge_rounds : 1, rc = 0, computed = 0;
    int last = -1, stopped = 0, interrupted = 0;
    kill_hook kh;
    kill_hook_read(&kh);
    circuit c;
    circuit_full(&in->m.cfg, &c);
    circuit_metrics clean = {0};
    int have_clean = 0;
    double final_faith = NAN;
    if ((rc = prepare_dir(out, fresh, err))) goto done;
    for (int r = 0; r < n_rounds && !stopped && rc == 0; r++) {
        if (max_rounds > 0 && r >= max_rounds) break;
        char path[4200], id[17];
        round_path(out, r, path, sizeof path);
        round_identity(&p, r, id);
        int cur = stage_output_current(path, id, 0, err);
        if (cur < 0) {
            rc = -1;
            break;
        }
        if (cur == 1) {  // finished earlier: take its kept circuit and go on
            prune_round pr;
            if ((rc = load_round_file(path, &in->m.cfg, &pr, err))) break;
            stopped = pr.stop[0] != 0;
            int back = !strcmp(pr.stop, "min_faithfulness") || !strcmp(pr.stop, "scores_only");
            circuit_free(&c);
            circuit_copy(back ? &pr.circuit : &pr.kept, &c);
            final_faith = back ? (pr.metrics[2][2] ? pr.metrics[0][2] / pr.metrics[2][2] : NAN) : faithfulness(pr.metrics);
            prune_round_free(&pr);
            last = r;
            continue;
        }
        if (stop_requested && stop_requested()) {
            interrupted = 1;
            break;
        }
        if (kh.after == computed && !kh.where[0]) raise(SIGKILL);
        if (!have_clean && (rc = circuit_measure(in, NULL, &clean, err)) == 0) have_clean = 1;
        if (rc) break;
        round_result res = {0};
        circuit kept = {0};
        rc = compute_round(in, &p, r, n_rounds, &c, &clean, kh.after == computed && !strcmp(kh.where, "mid"), &res, &kept, err);
        if (rc == 0) rc = write_round(path, id, r, &c, &kept, &res, kh.after == computed && !strcmp(kh.where, "write"), err);
        if (rc == 0) {
            computed++;
            last = r;
            stopped = res.stop[0] != 0;
            int back = !strcmp(res.stop, "min_faithfulness") || !strcmp(res.stop, "scores_only");
            const circuit_metrics *fm = back ? &res.m_circuit : &res.m_kept;
            final_faith = clean.logit_diff != 0 ? fm->logit_diff / clean.logit_diff : NAN;
            int nk = 0;
            for (int i = 0; i < res.n; i++) nk += circuit_has(&kept, res.kind, &res.units[i]);
            printf("prune: round %d (%s units, %s): %d scored, %d kept, faithfulness %.4f%s%s\n", r, kind_name(res.kind),
                   res.method, res.n, nk, clean.logit_diff != 0 ? res.m_kept.logit_diff / clean.logit_diff : NAN,
                   res.stop[0] ? ", stop: " : "", res.stop);
            fflush(stdout);
            if (!back) {
                circuit_free(&c);
                circuit_copy(&kept, &c);
            }
            rc = write_logs(in, r + 1, err);
        }
        free(res.units), free(res.scores);
        circuit_free(&kept);
    }
    if (rc == 0 && last >= 0) rc = write_logs(in, last + 1, err);
    if (rc == 0 && stopped) {
        rc = write_summary(in, &c, last, final_faith, err);
        if (rc == 0) printf("prune: final circuit after round %d -> %s/circuit.json, circuit.txt\n", last, out);
    }
done:
    circuit_free(&c);
    params_free(&p);
    return rc ? -1 : interrupted;
}
