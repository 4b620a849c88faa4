#include "report.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "pipeline/files.h"
#include "pipeline/stop_signals.h"
#include "stages/stage_inputs.h"

extern char **environ;

static double num_or_nan(json_t *o, const char *key) {
    json_t *v = json_object_get(o, key);
    return json_is_number(v) ? json_number_value(v) : NAN;
}

static const char *str_or(json_t *o, const char *key, const char *fallback) {
    const char *s = json_string_value(json_object_get(o, key));
    return s ? s : fallback;
}

static json_t *load_object(const char *path, ep_error *err) {
    json_error_t je;
    json_t *o = json_load_file(path, 0, &je);
    if (json_is_object(o)) return o;
    ep_fail(err, "%s: %s", path, o ? "not a JSON object" : je.text);
    json_decref(o);
    return NULL;
}

// Field checks: the report refuses a file that lacks what it prints (rather than printing "?" and nan
// over a good report). A figure the run could not compute is null in the file, which is allowed.
enum { F_NUMBER, F_INTEGER, F_STRING, F_BOOL, F_ARRAY, F_OBJECT };

static int need(const char *path, const char *where, json_t *o, const char *key, int kind, int optional, ep_error *err) {
    static const char *expected[] = {"a number or null", "an integer", "a string", "true or false", "a list", "an object"};
    json_t *v = json_object_get(o, key);
    if (!v && optional) return 0;
    int fine = !v                 ? 0
               : kind == F_NUMBER ? json_is_number(v) || json_is_null(v)
               : kind == F_INTEGER ? json_is_integer(v)
               : kind == F_STRING ? json_is_string(v)
               : kind == F_BOOL   ? json_is_boolean(v)
               : kind == F_ARRAY  ? json_is_array(v)
                                  : json_is_object(v);
    if (fine) return 0;
    return ep_fail(err, "%s: field %s%s: %s (expected %s)", path, where, key, v ? "wrong type" : "missing", expected[kind]);
}

static int check_entry(const char *path, const char *list, size_t i, json_t *e, const char *const *keys, const int *kinds,
                       ep_error *err) {
    char where[96];
    snprintf(where, sizeof where, "%s[%zu].", list, i);
    if (!json_is_object(e)) return ep_fail(err, "%s: field %s[%zu]: expected an object", path, list, i);
    for (int k = 0; keys[k]; k++)
        if (need(path, where, e, keys[k], kinds[k], 0, err)) return -1;
    return 0;
}

static int check_logs(const char *path, json_t *logs, ep_error *err) {
    static const char *top[] = {"task", "model_name", "n_prompts", "full_model_accuracy", "full_model_first_token_accuracy",
                                "full_model_mean_logit_diff", "plan_ablates", NULL};
    static const int top_kinds[] = {F_STRING, F_STRING, F_INTEGER, F_NUMBER, F_NUMBER, F_NUMBER, F_BOOL};
    static const char *plan[] = {"plan", "accuracy", "first_token_accuracy", "mean_logit_diff", NULL};
    static const int plan_kinds[] = {F_STRING, F_NUMBER, F_NUMBER, F_NUMBER};
    static const char *ablation[] = {"name", "accuracy", "first_token_accuracy", "mean_logit_diff", NULL};
    static const int ablation_kinds[] = {F_STRING, F_NUMBER, F_NUMBER, F_NUMBER};
    static const char *round[] = {"round", "kind", "method", "units", "kept", "faithfulness_logit_diff",
                                  "kept_first_token_accuracy", "stop", NULL};
    static const int round_kinds[] = {F_INTEGER, F_STRING, F_STRING, F_INTEGER, F_INTEGER, F_NUMBER, F_NUMBER, F_STRING};
    for (int k = 0; top[k]; k++)
        if (need(path, "", logs, top[k], top_kinds[k], 0, err)) return -1;
    if (json_is_true(json_object_get(logs, "plan_ablates")))
        for (int k = 0; plan[k]; k++)
            if (need(path, "", logs, plan[k], plan_kinds[k], 0, err)) return -1;
    if (need(path, "", logs, "ablations", F_ARRAY, 1, err) || need(path, "", logs, "prune", F_ARRAY, 1, err)) return -1;
    size_t i;
    json_t *a;
    json_array_foreach(json_object_get(logs, "ablations"), i, a) {
        char where[64];
        snprintf(where, sizeof where, "ablations[%zu].", i);
        if (check_entry(path, "ablations", i, a, ablation, ablation_kinds, err) || need(path, where, a, "group", F_STRING, 1, err) ||
            need(path, where, a, "band", F_STRING, 1, err))
            return -1;
    }
    json_array_foreach(json_object_get(logs, "prune"), i, a)
        if (check_entry(path, "prune", i, a, round, round_kinds, err)) return -1;
    return 0;
}

static int check_circuit(const char *path, json_t *c, ep_error *err) {
    if (need(path, "", c, "round", F_INTEGER, 0, err) || need(path, "", c, "n_head_units", F_INTEGER, 0, err) ||
        need(path, "", c, "n_edge_units", F_INTEGER, 0, err) || need(path, "", c, "faithfulness_logit_diff", F_NUMBER, 0, err) ||
        need(path, "", c, "by_type_and_layer", F_OBJECT, 0, err))
        return -1;
    json_t *by = json_object_get(c, "by_type_and_layer");
    return need(path, "by_type_and_layer.", by, "heads", F_ARRAY, 0, err) || need(path, "by_type_and_layer.", by, "edges", F_ARRAY, 1, err);
}

// The table: full model and every ablation, then the pruning rounds.
static void print_table(FILE *f, json_t *logs) {
    double full = num_or_nan(logs, "full_model_accuracy");
    fprintf(f, "task %s, %d prompts, %s\n\n", str_or(logs, "task", "?"), (int)num_or_nan(logs, "n_prompts"),
            str_or(logs, "model_name", "?"));
    fprintf(f, "%-36s %9s %9s %12s %10s\n", "accuracy (greedy generation)", "accuracy", "drop", "first-token", "logit diff");
    fprintf(f, "%-36s %9.3f %9s %12.3f %10.3f\n", "full model", full, "", num_or_nan(logs, "full_model_first_token_accuracy"),
            num_or_nan(logs, "full_model_mean_logit_diff"));
    if (json_is_true(json_object_get(logs, "plan_ablates")))
        fprintf(f, "%-36.36s %9.3f %9.3f %12.3f %10.3f\n", str_or(logs, "plan", "?"), num_or_nan(logs, "accuracy"),
                full - num_or_nan(logs, "accuracy"), num_or_nan(logs, "first_token_accuracy"), num_or_nan(logs, "mean_logit_diff"));
    size_t i;
    json_t *a;
    json_array_foreach(json_object_get(logs, "ablations"), i, a) {
        double acc = num_or_nan(a, "accuracy");
        fprintf(f, "%-36.36s %9.3f %9.3f %12.3f %10.3f\n", str_or(a, "name", "?"), acc, full - acc,
                num_or_nan(a, "first_token_accuracy"), num_or_nan(a, "mean_logit_diff"));
    }
    json_t *rounds = json_object_get(logs, "prune");
    if (json_array_size(rounds)) {
        fprintf(f, "\n%-6s %-5s %-12s %8s %8s %14s %18s  %s\n", "round", "kind", "method", "scored", "kept",
                "faithfulness", "first-token (kept)", "stop");
        json_array_foreach(rounds, i, a)
            fprintf(f, "%-6d %-5s %-12s %8d %8d %14.3f %18.3f  %s\n", (int)num_or_nan(a, "round"), str_or(a, "kind", "?"),
                    str_or(a, "method", "?"), (int)num_or_nan(a, "units"), (int)num_or_nan(a, "kept"),
                    num_or_nan(a, "faithfulness_logit_diff"), num_or_nan(a, "kept_first_token_accuracy"), str_or(a, "stop", ""));
        fprintf(f, "(faithfulness: the kept circuit's mean logit difference / the full model's)\n");
    }
}

// Runs argv[0] (looked up in PATH). 0 done, 1 not installed (why says so), -1 it failed.
// The tool starts with SIGTERM and SIGUSR1 blocked: a stop request sent to our process group (mpirun
// forwards SIGUSR1 that way) is ours to honour, and must not kill a figure half drawn. SIGKILL and
// SIGINT still end it.
static int run_tool(char *const argv[], char *why, size_t why_size, ep_error *err) {
    pid_t pid;
    posix_spawnattr_t attr;
    sigset_t blocked = stop_signal_set();
    if (posix_spawnattr_init(&attr)) return ep_fail(err, "%s: cannot start: out of memory", argv[0]);
    posix_spawnattr_setsigmask(&attr, &blocked);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK);
    int rc = posix_spawnp(&pid, argv[0], NULL, &attr, argv, environ);
    posix_spawnattr_destroy(&attr);
    if (rc == ENOENT) {
        snprintf(why, why_size, "%s is not installed (tools/setup.sh installs it)", argv[0]);
        return 1;
    }
    if (rc) return ep_fail(err, "%s: cannot start: %s", argv[0], strerror(rc));
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR) return ep_fail(err, "%s: %s", argv[0], strerror(errno));
    if (WIFSIGNALED(status)) return ep_fail(err, "%s was killed by signal %d", argv[0], WTERMSIG(status));
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return ep_fail(err, "%s failed (exit status %d)", argv[0], WEXITSTATUS(status));
    return 0;
}

// The tool writes tmp; a finished figure replaces path.
static int draw(char *const argv[], const char *tmp, const char *path, char *why, size_t why_size, ep_error *err) {
    int rc = run_tool(argv, why, why_size, err);
    if (rc == 0 && rename(tmp, path) != 0) rc = ep_fail(err, "%s: cannot write: %s", path, strerror(errno));
    if (rc) unlink(tmp);
    return rc;
}

// "name='value'" for gnuplot -e, a quote in value doubled (gnuplot's single-quoted strings).
static void gnuplot_assign(char *out, size_t size, const char *name, const char *value) {
    size_t n = (size_t)snprintf(out, size, "%s='", name);
    for (const char *c = value; *c && n + 3 < size; c++) {
        if (*c == '\'') out[n++] = '\'';
        out[n++] = *c;
    }
    out[n++] = '\'';
    out[n] = 0;
}

// Distinct values of key over the ablations that have both "group" and "band", in first-seen order.
static int labels(json_t *ablations, const char *key, const char **out, int max) {
    int n = 0;
    size_t i;
    json_t *a;
    json_array_foreach(ablations, i, a) {
        const char *s = json_string_value(json_object_get(a, key));
        if (!s || !json_is_string(json_object_get(a, "group")) || !json_is_string(json_object_get(a, "band"))) continue;
        int k = 0;
        while (k < n && strcmp(out[k], s)) k++;
        if (k == n && n < max) out[n++] = s;
    }
    return n;
}

static int heatmap(const char *run, json_t *logs, FILE *out, ep_error *err) {
    json_t *ablations = json_object_get(logs, "ablations");
    const char *groups[64], *bands[64];
    int G = labels(ablations, "group", groups, 64), B = labels(ablations, "band", bands, 64);
    if (G == 0 || B == 0) {
        fprintf(out, "figures: accuracy_drop.png skipped: no ablation with \"group\" and \"band\" in this run\n");
        return 0;
    }
    double full = num_or_nan(logs, "full_model_accuracy"), *drop = ep_malloc(sizeof(double) * (size_t)G * B), most = 0.05;
    for (int k = 0; k < G * B; k++) drop[k] = NAN;
    size_t i;
    json_t *a;
    json_array_foreach(ablations, i, a) {
        for (int g = 0; g < G; g++)
            for (int b = 0; b < B; b++)
                if (!strcmp(groups[g], str_or(a, "group", "")) && !strcmp(bands[b], str_or(a, "band", "")))
                    drop[g * B + b] = full - num_or_nan(a, "accuracy");
    }
    for (int k = 0; k < G * B; k++)
        if (fabs(drop[k]) > most) most = fabs(drop[k]);
    char gp[4200], png[4200], tmp[4300];
    snprintf(gp, sizeof gp, "%s/accuracy_drop.gp", run);
    snprintf(png, sizeof png, "%s/accuracy_drop.png", run);
    snprintf(tmp, sizeof tmp, "%s.tmp-%d", png, (int)getpid());
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) {
        free(drop);
        return ep_fail(err, "%s: out of memory", gp);
    }
    fprintf(f, "# gnuplot script written by edgepatch report; run `gnuplot accuracy_drop.gp` to redraw.\n");
    // The output is a variable that we set on gnuplot's command line (a temporary named after our pid), so
    // the script's bytes are the same in every run; run by hand, it draws accuracy_drop.png.
    fprintf(f, "set terminal pngcairo size %d,%d font 'sans,11'\nif (!exists(\"out\")) out = 'accuracy_drop.png'\nset output out\n",
            260 + 130 * B, 220 + 55 * G);
    fprintf(f, "set title \"%s: accuracy drop when an edge group is ablated\\n(full-model accuracy %.3f over %d prompts; "
               "drop = full - ablated)\" noenhanced\n", str_or(logs, "task", "?"), full, (int)num_or_nan(logs, "n_prompts"));
    fprintf(f, "set termoption noenhanced\nset xlabel 'layers (band)'\nset ylabel 'ablated edges (sender -> receiver)'\nset cblabel 'accuracy drop'\n");
    fprintf(f, "set xrange [-0.5:%g]\nset yrange [%g:-0.5]\nset cbrange [%g:%g]\nset tics scale 0\n", B - 0.5, G - 0.5, -most, most);
    fprintf(f, "set palette defined (0 '#2166ac', 1 '#f7f7f7', 2 '#b2182b')\n");
    fprintf(f, "set xtics (");
    for (int b = 0; b < B; b++) fprintf(f, "%s\"%s\" %d", b ? ", " : "", bands[b], b);
    fprintf(f, ")\nset ytics (");
    for (int g = 0; g < G; g++) fprintf(f, "%s\"%s\" %d", g ? ", " : "", groups[g], g);
    fprintf(f, ")\n$drop << EOD\n");
    for (int g = 0; g < G; g++)
        for (int b = 0; b < B; b++)
            if (isfinite(drop[g * B + b])) fprintf(f, "%d %d %.4f\n", b, g, drop[g * B + b]);
    fprintf(f, "EOD\nplot $drop using 1:2:3 with image notitle, $drop using 1:2:(sprintf('%%.2f', $3)) with labels notitle\n");
    fclose(f);
    free(drop);
    int rc = write_text_atomic(gp, text, err);
    free(text);
    char why[200];
    char set_out[8700];
    gnuplot_assign(set_out, sizeof set_out, "out", tmp);
    char *argv[] = {"gnuplot", "-e", set_out, gp, NULL};
    if (rc == 0) rc = draw(argv, tmp, png, why, sizeof why, err);
    if (rc == 1) fprintf(out, "figures: accuracy_drop.png skipped: %s\n", why);
    else if (rc == 0) fprintf(out, "figures: %s (source %s)\n", png, gp);
    return rc < 0 ? -1 : 0;
}

// Layers as ranges: "0-2,5,7-9".
static void layer_ranges(const unsigned char *on, int n, char *out, size_t size) {
    size_t len = 0;
    out[0] = 0;
    for (int l = 0; l < n; l++) {
        if (!on[l]) continue;
        int e = l;
        while (e + 1 < n && on[e + 1]) e++;
        if (len < size)
            len += (size_t)snprintf(out + len, size - len, e > l ? "%s%d-%d" : "%s%d", len ? "," : "", l, e);
        l = e;
    }
}

static const char *type_order[] = {"bos", "x", "t", "y", "n", "query", "last"};
enum { N_TYPES = 7, MAX_LAYERS = 256 };

static int type_index(const char *s) {
    for (int t = 0; t < N_TYPES; t++)
        if (!strcmp(s, type_order[t])) return t;
    return -1;
}

// c: circuit.json (checked), or NULL when pruning did not run.
static int diagram(const char *run, json_t *logs, json_t *c, FILE *out, ep_error *err) {
    if (!c) {
        fprintf(out, "figures: circuit.png skipped: no circuit.json (pruning did not run)\n");
        return 0;
    }
    json_t *by = json_object_get(c, "by_type_and_layer"), *e;
    // per (sender, receiver): layers with kept edges and the number of (layer, head) edge units
    unsigned char(*layers)[N_TYPES][MAX_LAYERS] = ep_calloc(N_TYPES, sizeof *layers);
    int heads[N_TYPES][N_TYPES] = {{0}}, node_heads[N_TYPES] = {0}, used[N_TYPES] = {0}, most = 1;
    unsigned char node_layers[N_TYPES][MAX_LAYERS] = {{0}};
    size_t i;
    json_array_foreach(json_object_get(by, "edges"), i, e) {
        int s = type_index(str_or(e, "sender", "")), r = type_index(str_or(e, "receiver", "")), l = (int)num_or_nan(e, "layer");
        if (s < 0 || r < 0 || l < 0 || l >= MAX_LAYERS) continue;
        layers[s][r][l] = 1;
        heads[s][r] += (int)json_array_size(json_object_get(e, "heads"));
        used[s] = used[r] = 1;
        if (heads[s][r] > most) most = heads[s][r];
    }
    json_array_foreach(json_object_get(by, "heads"), i, e) {
        int t = type_index(str_or(e, "type", "")), l = (int)num_or_nan(e, "layer");
        if (t < 0 || l < 0 || l >= MAX_LAYERS) continue;
        node_heads[t] += (int)json_array_size(json_object_get(e, "heads"));
        node_layers[t][l] = 1;
        used[t] = 1;
    }
    int n_edges = (int)num_or_nan(c, "n_edge_units"), n_heads = (int)num_or_nan(c, "n_head_units");
    char *text = NULL, ranges[1024];
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) {
        free(layers);
        return ep_fail(err, "%s/circuit.dot: out of memory", run);
    }
    fprintf(f, "// Graphviz source written by edgepatch report; `dot -Tpng circuit.dot -o circuit.png` redraws it.\n");
    fprintf(f, "digraph circuit {\n  rankdir=LR; labelloc=t; fontname=\"sans\"; fontsize=16; nodesep=0.5; ranksep=1.1;\n");
    fprintf(f, "  label=\"%s circuit after pruning round %d: %d head units, %d edge units kept "
               "(faithfulness %.3f)\\nnodes: token types (kept head units, layers); arrows: kept edges sender -> receiver "
               "(layers L, number of (layer, head) units)%s\";\n",
            str_or(logs, "task", "?"), (int)num_or_nan(c, "round"), n_heads, n_edges, num_or_nan(c, "faithfulness_logit_diff"),
            json_object_get(c, "edges") ? "" : "\\n(head pruning only: no edge units were pruned)");
    fprintf(f, "  node [shape=box, style=\"rounded,filled\", fillcolor=\"#deebf7\", fontname=\"sans\"];\n");
    fprintf(f, "  edge [fontname=\"sans\", fontsize=10, color=\"#08519c\"];\n");
    for (int t = 0; t < N_TYPES; t++) {
        if (!used[t]) continue;
        layer_ranges(node_layers[t], MAX_LAYERS, ranges, sizeof ranges);
        fprintf(f, "  \"%s\" [label=\"%s\\n%d head units\\nL %s\"];\n", type_order[t], type_order[t], node_heads[t],
                ranges[0] ? ranges : "-");
    }
    for (int s = 0; s < N_TYPES; s++)
        for (int r = 0; r < N_TYPES; r++) {
            if (!heads[s][r]) continue;
            layer_ranges(layers[s][r], MAX_LAYERS, ranges, sizeof ranges);
            fprintf(f, "  \"%s\" -> \"%s\" [label=\"L %s\\n(%d)\", penwidth=%.2f];\n", type_order[s], type_order[r], ranges,
                    heads[s][r], 1.0 + 4.0 * heads[s][r] / most);
        }
    fprintf(f, "}\n");
    fclose(f);
    free(layers);
    char dot[4200], png[4200], svg[4200], tmp_png[4300], tmp_svg[4300], why[200];
    snprintf(dot, sizeof dot, "%s/circuit.dot", run);
    snprintf(png, sizeof png, "%s/circuit.png", run);
    snprintf(svg, sizeof svg, "%s/circuit.svg", run);
    snprintf(tmp_png, sizeof tmp_png, "%s.tmp-%d", png, (int)getpid());
    snprintf(tmp_svg, sizeof tmp_svg, "%s.tmp-%d", svg, (int)getpid());
    int rc = write_text_atomic(dot, text, err);
    free(text);
    char *to_png[] = {"dot", "-Tpng", "-Gdpi=110", dot, "-o", tmp_png, NULL}, *to_svg[] = {"dot", "-Tsvg", dot, "-o", tmp_svg, NULL};
    if (rc == 0) rc = draw(to_png, tmp_png, png, why, sizeof why, err);
    if (rc == 0) rc = draw(to_svg, tmp_svg, svg, why, sizeof why, err);
    if (rc == 1) fprintf(out, "figures: circuit.png and circuit.svg skipped: %s\n", why);
    else if (rc == 0) fprintf(out, "figures: %s, %s (source %s)\n", png, svg, dot);
    return rc < 0 ? -1 : 0;
}

int report_write(const char *run_dir, FILE *out, ep_error *err) {
    // What an earlier report killed half way left (this command's own files only: a run writing the same
    // folder has its own temporaries, and a live writer's are never touched; stages/stage_inputs.h).
    static const char *const own[] = {"report.txt", "accuracy_drop.gp", "accuracy_drop.png", "circuit.dot",
                                      "circuit.png", "circuit.svg", NULL};
    if (remove_temporaries(run_dir, 0, own, NULL, err)) return -1;
    // Both inputs are read and checked before anything is written: a bad one leaves the old report as it was.
    char path[4200], circuit_path[4200];
    snprintf(path, sizeof path, "%s/model_logs.json", run_dir);
    snprintf(circuit_path, sizeof circuit_path, "%s/circuit.json", run_dir);
    json_t *logs = load_object(path, err), *circuit = NULL;
    if (!logs) return -1;
    int rc = check_logs(path, logs, err);
    if (rc == 0 && access(circuit_path, F_OK) == 0) {
        circuit = load_object(circuit_path, err);
        rc = circuit ? check_circuit(circuit_path, circuit, err) : -1;
    }
    char *text = NULL;
    size_t len = 0;
    FILE *f = rc == 0 ? open_memstream(&text, &len) : NULL;
    if (rc == 0 && !f) rc = ep_fail(err, "%s: out of memory", run_dir);
    if (rc) {
        json_decref(logs), json_decref(circuit);
        return -1;
    }
    print_table(f, logs);
    fclose(f);
    fputs(text, out);
    snprintf(path, sizeof path, "%s/report.txt", run_dir);
    rc = write_text_atomic(path, text, err);
    free(text);
    fprintf(out, "\n");
    if (rc == 0) rc = heatmap(run_dir, logs, out, err);
    if (rc == 0) rc = diagram(run_dir, logs, circuit, out, err);
    json_decref(logs), json_decref(circuit);
    return rc;
}
