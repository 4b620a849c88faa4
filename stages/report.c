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
#include "stages/circuit_file.h"
#include "stages/fv.h"
#include "stages/interval.h"
#include "stages/prompts.h"
#include "stages/stage_inputs.h"

extern char **environ;

// Bounds on a model's shape that the report draws (the largest models have about 130 layers and heads).
enum { MAX_LAYERS = 512, MAX_HEADS = 1024 };

double report_num(json_t *o, const char *key) {
    json_t *v = json_object_get(o, key);
    return json_is_number(v) ? json_number_value(v) : NAN;
}

const char *report_str(json_t *o, const char *key, const char *fallback) {
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

// "prompts_correct" (optional: model_logs.json from before it existed has none): four counts that add
// up to the run's prompts.
static int check_counts(const char *path, const char *where, json_t *o, int n_prompts, ep_error *err) {
    static const char *keys[] = {"both", "full_model_only", "ablated_only", "neither", NULL};
    json_t *t = json_object_get(o, "prompts_correct");
    if (!t) return 0;
    char at[96];
    snprintf(at, sizeof at, "%sprompts_correct.", where);
    if (!json_is_object(t)) return ep_fail(err, "%s: field %sprompts_correct: wrong type (expected an object)", path, where);
    long long sum = 0;
    for (int k = 0; keys[k]; k++) {
        if (need(path, at, t, keys[k], F_INTEGER, 0, err)) return -1;
        long long v = json_integer_value(json_object_get(t, keys[k]));
        if (v < 0) return ep_fail(err, "%s: field %s%s: negative", path, at, keys[k]);
        sum += v;
    }
    if (sum != n_prompts)
        return ep_fail(err, "%s: field %sprompts_correct: the counts add up to %lld, not n_prompts (%d)", path, where, sum, n_prompts);
    return 0;
}

// The mean KL(full model || ablated) column and the line's end; blank for a model_logs.json written before it.
static void kl_cell(FILE *f, json_t *o) {
    json_t *kl = json_object_get(o, "mean_kl_full_model");
    if (json_is_number(kl)) fprintf(f, " %9.4f\n", json_number_value(kl));
    else fprintf(f, " %9s\n", "");
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
    int n_prompts = (int)json_integer_value(json_object_get(logs, "n_prompts"));
    if (json_is_true(json_object_get(logs, "plan_ablates")))
        for (int k = 0; plan[k]; k++)
            if (need(path, "", logs, plan[k], plan_kinds[k], 0, err)) return -1;
    if (check_counts(path, "", logs, n_prompts, err)) return -1;
    if (need(path, "", logs, "ablations", F_ARRAY, 1, err) || need(path, "", logs, "prune", F_ARRAY, 1, err)) return -1;
    size_t i;
    json_t *a;
    json_array_foreach(json_object_get(logs, "ablations"), i, a) {
        char where[64];
        snprintf(where, sizeof where, "ablations[%zu].", i);
        if (check_entry(path, "ablations", i, a, ablation, ablation_kinds, err) || need(path, where, a, "group", F_STRING, 1, err) ||
            need(path, where, a, "band", F_STRING, 1, err) || need(path, where, a, "layers", F_ARRAY, 1, err) ||
            check_counts(path, where, a, n_prompts, err))
            return -1;
        size_t k;
        json_t *l;
        json_array_foreach(json_object_get(a, "layers"), k, l)
            if (!json_is_integer(l) || json_integer_value(l) < 0 || json_integer_value(l) >= MAX_LAYERS)
                return ep_fail(err, "%s: field %slayers[%zu]: expected a layer number", path, where, k);
    }
    json_array_foreach(json_object_get(logs, "prune"), i, a)
        if (check_entry(path, "prune", i, a, round, round_kinds, err)) return -1;
    return 0;
}

// The units of circuit.json's "heads" ([layer, head, "type"]) or "edges" ([layer, head, "sender",
// "receiver"]): what circuit.csv lists.
static int check_units(const char *path, json_t *c, const char *key, int n_names, ep_error *err) {
    size_t i;
    json_t *u;
    json_array_foreach(json_object_get(c, key), i, u) {
        int fine = json_is_array(u) && json_array_size(u) == (size_t)(2 + n_names);
        for (int k = 0; fine && k < 2; k++)
            fine = json_is_integer(json_array_get(u, k)) && json_integer_value(json_array_get(u, k)) >= 0 &&
                   json_integer_value(json_array_get(u, k)) < (k ? MAX_HEADS : MAX_LAYERS);
        for (int k = 0; fine && k < n_names; k++) {
            token_type t;
            fine = json_is_string(json_array_get(u, 2 + k)) && token_type_parse(json_string_value(json_array_get(u, 2 + k)), &t) == 0;
        }
        if (!fine)
            return ep_fail(err, "%s: field %s[%zu]: expected [layer, head, %s]", path, key, i, n_names == 1 ? "\"type\"" : "\"sender\", \"receiver\"");
    }
    return 0;
}

static int check_circuit(const char *path, json_t *c, ep_error *err) {
    if (need(path, "", c, "round", F_INTEGER, 0, err) || need(path, "", c, "n_head_units", F_INTEGER, 0, err) ||
        need(path, "", c, "n_edge_units", F_INTEGER, 0, err) || need(path, "", c, "faithfulness_logit_diff", F_NUMBER, 0, err) ||
        need(path, "", c, "by_type_and_layer", F_OBJECT, 0, err) || need(path, "", c, "heads", F_ARRAY, 0, err) ||
        need(path, "", c, "edges", F_ARRAY, 1, err) || need(path, "", c, "n_layers", F_INTEGER, 1, err) ||
        need(path, "", c, "n_heads", F_INTEGER, 1, err))
        return -1;
    json_t *n_layers = json_object_get(c, "n_layers"), *n_heads = json_object_get(c, "n_heads");
    if (n_layers && (json_integer_value(n_layers) < 1 || json_integer_value(n_layers) > MAX_LAYERS))
        return ep_fail(err, "%s: field n_layers: expected 1..%d", path, MAX_LAYERS);
    if (n_heads && (json_integer_value(n_heads) < 1 || json_integer_value(n_heads) > MAX_HEADS))
        return ep_fail(err, "%s: field n_heads: expected 1..%d", path, MAX_HEADS);
    if (check_units(path, c, "heads", 1, err) || check_units(path, c, "edges", 2, err)) return -1;
    json_t *by = json_object_get(c, "by_type_and_layer");
    return need(path, "by_type_and_layer.", by, "heads", F_ARRAY, 0, err) || need(path, "by_type_and_layer.", by, "edges", F_ARRAY, 1, err);
}

// The paired counts of o ("prompts_correct", checked), as the interval wants them; 0 when o has none.
static int counts_of(json_t *o, paired_counts *t) {
    json_t *c = json_object_get(o, "prompts_correct");
    if (!c) return 0;
    *t = (paired_counts){(int)json_integer_value(json_object_get(c, "both")), (int)json_integer_value(json_object_get(c, "full_model_only")),
                         (int)json_integer_value(json_object_get(c, "ablated_only")), (int)json_integer_value(json_object_get(c, "neither"))};
    return 1;
}

// The 95% interval of o's accuracy drop (full model - o), NaN when o has no paired counts.
static void drop_interval(json_t *o, double *lo, double *hi) {
    paired_counts t;
    *lo = *hi = NAN;
    if (counts_of(o, &t)) paired_difference_interval(t, INTERVAL_Z95, lo, hi);
}

static void interval_text(char *out, size_t size, json_t *o) {
    double lo, hi;
    drop_interval(o, &lo, &hi);
    if (isfinite(lo)) snprintf(out, size, "[%.3f, %.3f]", lo, hi);
    else snprintf(out, size, "-");
}

// The table: full model and every ablation, then the pruning rounds.
static void print_table(FILE *f, json_t *logs) {
    double full = report_num(logs, "full_model_accuracy");
    char ci[64];
    int with_ci = counts_of(logs, &(paired_counts){0});
    fprintf(f, "task %s, %d prompts, %s\n\n", report_str(logs, "task", "?"), (int)report_num(logs, "n_prompts"),
            report_str(logs, "model_name", "?"));
    fprintf(f, "%-36s %9s %9s %18s %12s %10s %9s\n", "accuracy (greedy generation)", "accuracy", "drop", "drop 95% interval",
            "first-token", "logit diff", "KL");
    fprintf(f, "%-36s %9.3f %9s %18s %12.3f %10.3f\n", "full model", full, "", "", report_num(logs, "full_model_first_token_accuracy"),
            report_num(logs, "full_model_mean_logit_diff"));
    if (json_is_true(json_object_get(logs, "plan_ablates"))) {
        interval_text(ci, sizeof ci, logs);
        fprintf(f, "%-36.36s %9.3f %9.3f %18s %12.3f %10.3f", report_str(logs, "plan", "?"), report_num(logs, "accuracy"),
                full - report_num(logs, "accuracy"), ci, report_num(logs, "first_token_accuracy"), report_num(logs, "mean_logit_diff"));
        kl_cell(f, logs);
    }
    size_t i;
    json_t *a;
    json_array_foreach(json_object_get(logs, "ablations"), i, a) {
        double acc = report_num(a, "accuracy");
        interval_text(ci, sizeof ci, a);
        with_ci |= counts_of(a, &(paired_counts){0});
        fprintf(f, "%-36.36s %9.3f %9.3f %18s %12.3f %10.3f", report_str(a, "name", "?"), acc, full - acc, ci,
                report_num(a, "first_token_accuracy"), report_num(a, "mean_logit_diff"));
        kl_cell(f, a);
    }
    if (with_ci)
        fprintf(f, "(drop: full-model accuracy - ablated accuracy on the same %d prompts; 95%% interval: Newcombe's hybrid score\n"
                   " interval for paired proportions, from the prompts each model alone answers correctly)\n",
                (int)report_num(logs, "n_prompts"));
    else if (json_array_size(json_object_get(logs, "ablations")) || json_is_true(json_object_get(logs, "plan_ablates")))
        fprintf(f, "(no 95%% intervals: model_logs.json has no per-prompt counts, \"prompts_correct\"; a rerun of `edgepatch run`\n"
                   " adds them from patch.h5)\n");
    if (json_array_size(json_object_get(logs, "ablations")) || json_is_true(json_object_get(logs, "plan_ablates")))
        fprintf(f, "(KL: mean over the prompts of KL(full model || ablated) of the next-token distribution at last, nats)\n");
    json_t *rounds = json_object_get(logs, "prune");
    if (json_array_size(rounds)) {
        fprintf(f, "\n%-6s %-5s %-12s %8s %8s %14s %18s  %s\n", "round", "kind", "method", "scored", "kept",
                "faithfulness", "first-token (kept)", "stop");
        json_array_foreach(rounds, i, a)
            fprintf(f, "%-6d %-5s %-12s %8d %8d %14.3f %18.3f  %s\n", (int)report_num(a, "round"), report_str(a, "kind", "?"),
                    report_str(a, "method", "?"), (int)report_num(a, "units"), (int)report_num(a, "kept"),
                    report_num(a, "faithfulness_logit_diff"), report_num(a, "kept_first_token_accuracy"), report_str(a, "stop", ""));
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

// cairo (1.16, Debian 12's) stamps every PDF with the time it was drawn and knows no SOURCE_DATE_EPOCH; the
// stamp is overwritten in place, same length (the cross-reference offsets stay right), with 1970-01-01
// 00:00 UTC, so a figure redrawn from the same data is byte-identical (tests/cli_recover.sh compares
// whole run folders).
static int pdf_fixed_dates(const char *path, ep_error *err) {
    FILE *f = fopen(path, "r+b");
    if (!f) return ep_fail(err, "%s: %s", path, strerror(errno));
    char *text = NULL;
    size_t len = 0, cap = 0, got;
    char chunk[65536];
    while ((got = fread(chunk, 1, sizeof chunk, f)) > 0) {
        if (len + got > cap) text = ep_realloc(text, cap = 2 * (len + got));
        memcpy(text + len, chunk, got);
        len += got;
    }
    static const char *keys[] = {"/CreationDate (D:", "/ModDate (D:"};
    static const char epoch[] = "19700101000000";
    int rc = 0;
    for (int k = 0; k < 2 && rc == 0; k++) {
        size_t klen = strlen(keys[k]);
        for (size_t at = 0; at + klen < len; at++) {
            if (memcmp(text + at, keys[k], klen)) continue;
            size_t d = at + klen;
            for (size_t j = 0; d + j < len && text[d + j] != ')' && j < 32; j++) {
                char c = text[d + j];
                text[d + j] = j < 14 && c >= '0' && c <= '9' ? epoch[j] : c >= '0' && c <= '9' ? '0' : c == '-' ? '+' : c;
            }
            if (fseek(f, (long)d, SEEK_SET) || fwrite(text + d, 1, 32 < len - d ? 32 : len - d, f) != (32 < len - d ? 32 : len - d))
                rc = ep_fail(err, "%s: %s", path, strerror(errno));
        }
    }
    free(text);
    if (fclose(f) && rc == 0) rc = ep_fail(err, "%s: %s", path, strerror(errno));
    return rc;
}

void report_figure_init(report_figure *f, const char *run, const char *name) {
    snprintf(f->path, sizeof f->path, "%s/%s", run, name);
    snprintf(f->tmp, sizeof f->tmp, "%.4199s.tmp-%d", f->path, (int)getpid());
}

static int ends_with(const char *s, const char *tail) {
    size_t n = strlen(s), m = strlen(tail);
    return n >= m && !strcmp(s + n - m, tail);
}

// Runs the tool, which writes files[0..n) under their temporaries; when it succeeded, the PDFs get fixed
// dates and every file replaces its figure; otherwise no figure changes and the temporaries go.
int report_draw(char *const argv[], report_figure *files, int n, char *why, size_t why_size, ep_error *err) {
    int rc = run_tool(argv, why, why_size, err);
    for (int k = 0; k < n && rc == 0; k++)
        if (ends_with(files[k].path, ".pdf")) rc = pdf_fixed_dates(files[k].tmp, err);
    for (int k = 0; k < n && rc == 0; k++)
        if (rename(files[k].tmp, files[k].path) != 0) rc = ep_fail(err, "%s: cannot write: %s", files[k].path, strerror(errno));
    if (rc)
        for (int k = 0; k < n; k++) unlink(files[k].tmp);
    return rc;
}

// "name='value'; " for gnuplot -e, a quote in value doubled (gnuplot's single-quoted strings).
size_t report_gnuplot_assign(char *out, size_t size, const char *name, const char *value) {
    size_t n = (size_t)snprintf(out, size, "%s='", name);
    for (const char *c = value; *c && n + 5 < size; c++) {
        if (*c == '\'') out[n++] = '\'';
        out[n++] = *c;
    }
    out[n++] = '\'';
    out[n++] = ';';
    out[n++] = ' ';
    out[n] = 0;
    return n;
}

// A CSV field (RFC 4180): quoted when it holds a comma, quote or line break, quotes doubled.
void report_csv_text(FILE *f, const char *s) {
    if (!strpbrk(s, ",\"\n\r")) {
        fputs(s, f);
        return;
    }
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"') fputc('"', f);
        fputc(*s, f);
    }
    fputc('"', f);
}

// A number for the CSV files: empty when not known.
static void csv_number(FILE *f, double x, const char *format) {
    if (isfinite(x)) fprintf(f, format, x);
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

// An ablation's "layers" (checked) as ranges; "" when model_logs.json does not give them.
static void ablation_layers(json_t *a, char *out, size_t size) {
    unsigned char on[MAX_LAYERS] = {0};
    size_t i;
    json_t *l;
    json_array_foreach(json_object_get(a, "layers"), i, l) on[json_integer_value(l)] = 1;
    layer_ranges(on, MAX_LAYERS, out, size);
}

// Writes NAME.csv (table) and NAME.gp (script) into run, then has gnuplot draw NAME.png, .pdf and .svg
// from the script (the outputs are its variables png, pdf and svg: temporaries until drawn); a missing
// gnuplot is a note on out. 0, or -1 (err).
static int gnuplot_figures(const char *run, const char *name, const char *table, const char *script, FILE *out,
                           ep_error *err) {
    char gp[4200], csv[4200], file[256];
    snprintf(gp, sizeof gp, "%s/%s.gp", run, name);
    snprintf(csv, sizeof csv, "%s/%s.csv", run, name);
    report_figure files[3];
    const char *vars[3] = {"png", "pdf", "svg"};
    char why[200], assign[3 * 8800];
    size_t at = 0;
    for (int k = 0; k < 3; k++) {
        snprintf(file, sizeof file, "%s.%s", name, vars[k]);
        report_figure_init(&files[k], run, file);
        at += report_gnuplot_assign(assign + at, sizeof assign - at, vars[k], files[k].tmp);
    }
    int rc = write_text_atomic(csv, table, err);
    if (rc == 0) rc = write_text_atomic(gp, script, err);
    char *argv[] = {"gnuplot", "-e", assign, gp, NULL};
    if (rc == 0) rc = report_draw(argv, files, 3, why, sizeof why, err);
    if (rc == 1) fprintf(out, "figures: %s.png, .pdf and .svg skipped: %s (data in %s)\n", name, why, csv);
    else if (rc == 0) fprintf(out, "figures: %s, .pdf, .svg (data %s, source %s)\n", files[0].path, csv, gp);
    return rc < 0 ? -1 : 0;
}

// accuracy_drop.csv: one row per heatmap cell (the ablation drawn there).
static char *heatmap_csv(json_t *logs, json_t **cell, const char **groups, const char **bands, int G, int B) {
    char *text = NULL, layers[4096];
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) return NULL;
    double full = report_num(logs, "full_model_accuracy");
    int n = (int)report_num(logs, "n_prompts");
    fprintf(f, "group,band,ablation,layers,n_prompts,accuracy,full_model_accuracy,drop,drop_ci95_low,drop_ci95_high,"
               "both_correct,full_model_only_correct,ablated_only_correct,neither_correct,first_token_accuracy,mean_logit_diff\n");
    for (int g = 0; g < G; g++)
        for (int b = 0; b < B; b++) {
            json_t *a = cell[g * B + b];
            if (!a) continue;
            double acc = report_num(a, "accuracy"), lo, hi;
            drop_interval(a, &lo, &hi);
            ablation_layers(a, layers, sizeof layers);
            report_csv_text(f, groups[g]), fputc(',', f), report_csv_text(f, bands[b]), fputc(',', f);
            report_csv_text(f, report_str(a, "name", "")), fputc(',', f), report_csv_text(f, layers);
            fprintf(f, ",%d,", n);
            csv_number(f, acc, "%.6f"), fputc(',', f), csv_number(f, full, "%.6f"), fputc(',', f);
            csv_number(f, full - acc, "%.6f"), fputc(',', f), csv_number(f, lo, "%.6f"), fputc(',', f), csv_number(f, hi, "%.6f");
            paired_counts t;
            if (counts_of(a, &t)) fprintf(f, ",%d,%d,%d,%d,", t.both, t.first_only, t.second_only, t.neither);
            else fprintf(f, ",,,,,");
            csv_number(f, report_num(a, "first_token_accuracy"), "%.6f"), fputc(',', f);
            csv_number(f, report_num(a, "mean_logit_diff"), "%.6f"), fputc('\n', f);
        }
    fclose(f);
    return text;
}

// A label for gnuplot's data block: double-quoted, so no quote or backslash inside (ours never have one).
void report_gnuplot_label(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) fputc(*s == '"' || *s == '\\' ? '\'' : *s, f);
    fputc('"', f);
}

static int heatmap(const char *run, json_t *logs, FILE *out, ep_error *err) {
    json_t *ablations = json_object_get(logs, "ablations");
    const char *groups[64], *bands[64];
    int G = labels(ablations, "group", groups, 64), B = labels(ablations, "band", bands, 64);
    if (G == 0 || B == 0) {
        fprintf(out, "figures: accuracy_drop.png skipped: no ablation with \"group\" and \"band\" in this run\n");
        return 0;
    }
    double full = report_num(logs, "full_model_accuracy"), most = 0.05;
    int n = (int)report_num(logs, "n_prompts"), with_ci = 0;
    json_t **cell = ep_calloc((size_t)G * B, sizeof *cell);
    size_t i;
    json_t *a;
    json_array_foreach(ablations, i, a) {
        for (int g = 0; g < G; g++)
            for (int b = 0; b < B; b++)
                if (!strcmp(groups[g], report_str(a, "group", "")) && !strcmp(bands[b], report_str(a, "band", ""))) cell[g * B + b] = a;
    }
    for (int k = 0; k < G * B; k++) {
        if (!cell[k]) continue;
        double d = full - report_num(cell[k], "accuracy");
        if (fabs(d) > most) most = fabs(d);
        with_ci |= counts_of(cell[k], &(paired_counts){0});
    }
    char *text = NULL, *table = heatmap_csv(logs, cell, groups, bands, G, B);
    size_t len = 0;
    FILE *f = table ? open_memstream(&text, &len) : NULL;
    if (!f) {
        free(cell), free(table);
        return ep_fail(err, "%s/accuracy_drop.gp: out of memory", run);
    }
    int width = 300 + 150 * B < 640 ? 640 : 300 + 150 * B, height = 270 + (with_ci ? 75 : 55) * G;
    fprintf(f, "# gnuplot script written by edgepatch report; run `gnuplot accuracy_drop.gp` to redraw accuracy_drop.png,\n"
               "# .pdf and .svg. The data: accuracy_drop.csv.\n");
    // The outputs are variables that we set on gnuplot's command line (temporaries named after our pid), so
    // the script's bytes are the same in every run; run by hand, it draws the three files beside it.
    fprintf(f, "if (!exists(\"png\")) png = 'accuracy_drop.png'\nif (!exists(\"pdf\")) pdf = 'accuracy_drop.pdf'\n"
               "if (!exists(\"svg\")) svg = 'accuracy_drop.svg'\n");
    fprintf(f, "set title \"%s: accuracy drop when an edge group is ablated\\nn = %d prompts, full-model accuracy %.3f\\n"
               "cell: drop = full - ablated%s\" noenhanced\n",
            report_str(logs, "task", "?"), n, full, with_ci ? ", [95% interval] (Newcombe, paired)" : "");
    fprintf(f, "set termoption noenhanced\nset xlabel 'layers (band)'\nset ylabel 'ablated edges (sender -> receiver)'\nset cblabel 'accuracy drop'\n");
    fprintf(f, "set xrange [-0.5:%g]\nset yrange [%g:-0.5]\nset cbrange [%g:%g]\nset tics scale 0\n", B - 0.5, G - 0.5, -most, most);
    fprintf(f, "set palette defined (0 '#2166ac', 1 '#f7f7f7', 2 '#b2182b')\n");
    fprintf(f, "set xtics (");
    for (int b = 0; b < B; b++) fprintf(f, "%s\"%s\" %d", b ? ", " : "", bands[b], b);
    fprintf(f, ")\nset ytics (");
    for (int g = 0; g < G; g++) fprintf(f, "%s\"%s\" %d", g ? ", " : "", groups[g], g);
    // columns: band, group, drop, label lines 1 and 2, label colour (white on the darkest cells)
    fprintf(f, ")\n$drop << EOD\n");
    for (int g = 0; g < G; g++)
        for (int b = 0; b < B; b++) {
            if (!cell[g * B + b]) continue;
            double d = full - report_num(cell[g * B + b], "accuracy"), lo, hi;
            if (!isfinite(d)) continue;
            char value[32], ci[64] = "";
            drop_interval(cell[g * B + b], &lo, &hi);
            snprintf(value, sizeof value, "%.2f", d);
            if (isfinite(lo)) snprintf(ci, sizeof ci, "[%.2f, %.2f]", lo, hi);
            fprintf(f, "%d %d %.4f ", b, g, d);
            report_gnuplot_label(f, value), fputc(' ', f), report_gnuplot_label(f, ci);
            fprintf(f, " %d\n", fabs(d) > 0.6 * most ? 0xffffff : 0x000000);
        }
    const char *plot = with_ci ? "plot $drop using 1:2:3 with image notitle, $drop using 1:2:(strcol(4)):6 with labels tc rgb variable "
                                 "offset 0,0.6 notitle, $drop using 1:2:(strcol(5)):6 with labels tc rgb variable offset 0,-0.6 notitle\n"
                               : "plot $drop using 1:2:3 with image notitle, $drop using 1:2:(strcol(4)):6 with labels tc rgb variable notitle\n";
    fprintf(f, "EOD\nset terminal pngcairo size %d,%d font 'sans,11'\nset output png\n%s", width, height, plot);
    fprintf(f, "set terminal pdfcairo size %.2fin,%.2fin font 'sans,8'\nset output pdf\nreplot\n", width / 100.0, height / 100.0);
    fprintf(f, "set terminal svg size %d,%d font 'sans,11' background '#ffffff'\nset output svg\nreplot\nunset output\n", width, height);
    fclose(f);
    free(cell);
    int rc = gnuplot_figures(run, "accuracy_drop", table, text, out, err);
    free(text), free(table);
    return rc;
}

static const char *type_order[] = {"bos", "x", "t", "y", "n", "query", "last"};
enum { N_TYPES = 7 };
// The token types' colours (Okabe and Ito's palette, told apart with colour-blindness): strong for
// arrows and borders, a light tint to fill boxes, and what each type is (docs/design.md).
static const char *type_colour[N_TYPES] = {"#999999", "#0072B2", "#56B4E9", "#E69F00", "#CC79A7", "#009E73", "#D55E00"};
static const char *type_fill[N_TYPES] = {"#e6e6e6", "#c6dcec", "#d8edf9", "#f8e3b8", "#f2dce9", "#bfe6dc", "#f4d0b8"};
static const char *type_meaning[N_TYPES] = {"beginning of text", "inputs x", "separators after x", "outputs y",
                                            "separators after y", "the query x", "the last separator"};

static int type_index(const char *s) {
    for (int t = 0; t < N_TYPES; t++)
        if (!strcmp(s, type_order[t])) return t;
    return -1;
}

// The scores the final circuit's units got in the round files: a unit's score from the last round of its
// kind (up to the circuit's round) that scored it, as float [n_layers][n_heads][8 * 8 + 8] (head units at
// [64 + type], edge units at [sender * 8 + receiver]); NaN where not known. NULL (why says so) when a
// round file cannot be read: circuit.csv then leaves the scores empty.
typedef struct {
    float *score;
    int *round;
    char method[2][16];  // by unit kind
} unit_scores;

enum { SCORE_SLOTS = 8 * 8 + 8 };

static int load_scores(const char *run, int last_round, int L, int H, unit_scores *s, ep_error *err) {
    size_t n = (size_t)L * H * SCORE_SLOTS;
    s->score = ep_malloc(sizeof(float) * n);
    s->round = ep_malloc(sizeof(int) * n);
    memset(s->method, 0, sizeof s->method);
    for (size_t k = 0; k < n; k++) s->score[k] = NAN, s->round[k] = -1;
    for (int r = 0; r <= last_round; r++) {
        prune_round pr;
        if (prune_round_load(run, r, &pr, err)) return -1;
        snprintf(s->method[pr.kind == UNIT_EDGE], sizeof s->method[0], "%s", pr.method);
        for (int u = 0; u < pr.n_units; u++) {
            const circuit_unit *cu = &pr.units[u];
            if (cu->layer < 0 || cu->layer >= L || cu->head < 0 || cu->head >= H) continue;
            size_t at = ((size_t)cu->layer * H + cu->head) * SCORE_SLOTS +
                        (pr.kind == UNIT_EDGE ? (size_t)(cu->sender * 8 + cu->receiver) : (size_t)(64 + cu->type));
            s->score[at] = pr.scores[u];
            s->round[at] = r;
        }
        prune_round_free(&pr);
    }
    return 0;
}

// circuit.csv: one row per unit of the final circuit.
static char *circuit_csv(json_t *c, const unit_scores *s, int L, int H) {
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) return NULL;
    fprintf(f, "kind,layer,head,type,sender,receiver,score,score_round,score_method\n");
    for (int kind = 0; kind < 2; kind++) {
        size_t i;
        json_t *u;
        json_array_foreach(json_object_get(c, kind ? "edges" : "heads"), i, u) {
            int l = (int)json_integer_value(json_array_get(u, 0)), h = (int)json_integer_value(json_array_get(u, 1));
            const char *a = json_string_value(json_array_get(u, 2)), *b = kind ? json_string_value(json_array_get(u, 3)) : "";
            fprintf(f, "%s,%d,%d,%s,%s,%s,", kind ? "edge" : "head", l, h, kind ? "" : a, kind ? a : "", b);
            token_type ta = 0, tb = 0;
            token_type_parse(a, &ta);
            if (kind) token_type_parse(b, &tb);
            size_t at = ((size_t)l * H + h) * SCORE_SLOTS + (kind ? (size_t)(ta * 8 + tb) : (size_t)(64 + ta));
            if (s->score && l < L && h < H && s->round[at] >= 0)
                fprintf(f, "%.9g,%d,%s\n", s->score[at], s->round[at], s->method[kind]);
            else fprintf(f, ",,\n");
        }
    }
    fclose(f);
    return text;
}

// The heads of a (layer, type) or (layer, sender, receiver) as text: "h 0,3,5", or "12 heads" when many.
static void heads_text(const unsigned char *on, int H, char *out, size_t size) {
    int n = 0;
    for (int h = 0; h < H; h++) n += on[h];
    if (n > 4) {
        snprintf(out, size, "%d heads", n);
        return;
    }
    size_t len = (size_t)snprintf(out, size, "h ");
    for (int h = 0, k = 0; h < H; h++)
        if (on[h] && len < size) len += (size_t)snprintf(out + len, size - len, "%s%d", k++ ? "," : "", h);
}

// c: circuit.json (checked), or NULL when pruning did not run.
static int diagram(const char *run, json_t *logs, json_t *c, FILE *out, ep_error *err) {
    if (!c) {
        fprintf(out, "figures: circuit.png skipped: no circuit.json (pruning did not run)\n");
        return 0;
    }
    json_t *by = json_object_get(c, "by_type_and_layer"), *e;
    // The model's layers (circuit.json from before n_layers: the highest layer of a unit) and heads.
    int L = (int)json_integer_value(json_object_get(c, "n_layers")), H = (int)json_integer_value(json_object_get(c, "n_heads"));
    size_t i;
    for (int kind = 0; kind < 2; kind++)
        json_array_foreach(json_object_get(c, kind ? "edges" : "heads"), i, e) {
            int l = (int)json_integer_value(json_array_get(e, 0)), h = (int)json_integer_value(json_array_get(e, 1));
            if (l + 1 > L) L = l + 1;
            if (h + 1 > H) H = h + 1;
        }
    if (L < 1) L = 1;
    if (H < 1) H = 1;
    // per layer and type: kept heads; per layer, sender and receiver: kept heads of edge units
    unsigned char *node = ep_calloc((size_t)L * N_TYPES * H, 1), *edge = ep_calloc((size_t)L * N_TYPES * N_TYPES * H, 1);
    int most = 1;
    for (int kind = 0; kind < 2; kind++)
        json_array_foreach(json_object_get(by, kind ? "edges" : "heads"), i, e) {
            int a = type_index(report_str(e, kind ? "sender" : "type", "")), b = kind ? type_index(report_str(e, "receiver", "")) : 0;
            int l = (int)report_num(e, "layer");
            if (a < 0 || b < 0 || !(l >= 0 && l < L)) continue;
            size_t k;
            json_t *h;
            int count = 0;
            json_array_foreach(json_object_get(e, "heads"), k, h) {
                int hh = (int)json_integer_value(h);
                if (hh < 0 || hh >= H) continue;
                if (kind) edge[(((size_t)l * N_TYPES + a) * N_TYPES + b) * H + hh] = 1, count++;
                else node[((size_t)l * N_TYPES + a) * H + hh] = 1;
            }
            if (count > most) most = count;
        }
    int n_edges = (int)report_num(c, "n_edge_units"), n_heads = (int)report_num(c, "n_head_units"), round = (int)report_num(c, "round");
    char *text = NULL, heads[256];
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) {
        free(node), free(edge);
        return ep_fail(err, "%s/circuit.dot: out of memory", run);
    }
    fprintf(f, "// Graphviz source written by edgepatch report; `dot -Tpdf circuit.dot -o circuit.pdf` redraws it (or -Tpng,\n"
               "// -Tsvg). One row per layer, L0 at the bottom; the units: circuit.csv.\n");
    fprintf(f, "digraph circuit {\n  rankdir=BT; newrank=true; nodesep=0.22; ranksep=0.5; fontname=\"sans\"; labelloc=t;\n");
    // Title and legend: an HTML-like graph label, outside the layout.
    fprintf(f, "  label=<<TABLE BORDER=\"0\" CELLSPACING=\"3\" CELLPADDING=\"2\">\n");
    fprintf(f, "    <TR><TD COLSPAN=\"%d\"><FONT POINT-SIZE=\"16\">%s circuit after pruning round %d: %d head units, %d edge units "
               "(faithfulness %.3f)</FONT></TD></TR>\n",
            5, report_str(logs, "task", "?"), round, n_heads, n_edges, report_num(c, "faithfulness_logit_diff"));
    fprintf(f, "    <TR><TD COLSPAN=\"%d\">rows: layers L0 (bottom) to L%d (top). Box: a layer's heads kept at one token type's "
               "positions (head units).</TD></TR>\n",
            5, L - 1);
    if (json_object_get(c, "edges"))
        fprintf(f, "    <TR><TD COLSPAN=\"%d\">Arrow: kept edge units of that layer, sender positions -&gt; receiver positions; colour: "
                   "the sender's type;<BR/>width and number: heads. Dashed box: an edge's end without kept head units.</TD></TR>\n",
                5);
    else fprintf(f, "    <TR><TD COLSPAN=\"%d\">(head pruning only: no edge units were pruned, so there are no arrows)</TD></TR>\n", 5);
    // the token types' colours, in two rows
    for (int row = 0; row < 2; row++) {
        fprintf(f, "    <TR><TD>%s</TD>", row ? "" : "token types:");
        for (int t = row * 4; t < (row ? N_TYPES : 4); t++)
            fprintf(f, "<TD BGCOLOR=\"%s\" BORDER=\"1\" COLOR=\"%s\">%s: %s</TD>", type_fill[t], type_colour[t], type_order[t], type_meaning[t]);
        fprintf(f, "</TR>\n");
    }
    fprintf(f, "  </TABLE>>;\n");
    fprintf(f, "  node [fontname=\"sans\", fontsize=10, shape=box, style=\"rounded,filled\", height=0.28, margin=\"0.06,0.02\"];\n");
    fprintf(f, "  edge [fontname=\"sans\", fontsize=8, arrowsize=0.6];\n");
    // The layer axis: every layer, in order, as a column of labels.
    fprintf(f, "  node [shape=plaintext, style=\"\", fontcolor=\"#444444\"];\n ");
    for (int l = 0; l < L; l++) fprintf(f, " \"L%d\";", l);
    fprintf(f, "\n  edge [style=invis, weight=100];\n ");
    for (int l = 0; l < L; l++) fprintf(f, "%s\"L%d\"", l ? " -> " : " ", l);
    fprintf(f, ";\n  node [shape=box, style=\"rounded,filled\", fontcolor=\"#000000\"];\n  edge [style=solid, weight=1];\n");
    // Nodes: a (layer, type) with kept head units, or at the end of a kept edge unit.
    int *shown = ep_calloc((size_t)L * N_TYPES, sizeof(int));
    for (int l = 0; l < L; l++)
        for (int a = 0; a < N_TYPES; a++)
            for (int b = 0; b < N_TYPES; b++)
                for (int h = 0; h < H; h++)
                    if (edge[(((size_t)l * N_TYPES + a) * N_TYPES + b) * H + h]) shown[l * N_TYPES + a] = shown[l * N_TYPES + b] = 1;
    for (int l = 0; l < L; l++) {
        int any = 0;
        for (int t = 0; t < N_TYPES; t++) {
            const unsigned char *on = node + ((size_t)l * N_TYPES + t) * H;
            int kept = memchr(on, 1, (size_t)H) != NULL;
            if (!kept && !shown[l * N_TYPES + t]) continue;
            shown[l * N_TYPES + t] = 1;
            if (!any++) fprintf(f, "  { rank=same; \"L%d\";", l);
            if (kept) {
                heads_text(on, H, heads, sizeof heads);
                fprintf(f, " \"%d:%s\" [label=\"%s  %s\", fillcolor=\"%s\", color=\"%s\", group=\"%s\"];", l, type_order[t], type_order[t],
                        heads, type_fill[t], type_colour[t], type_order[t]);
            } else
                fprintf(f, " \"%d:%s\" [label=\"%s\", style=\"rounded,dashed\", color=\"%s\", group=\"%s\"];", l, type_order[t],
                        type_order[t], type_colour[t], type_order[t]);
        }
        if (!any) continue;
        // left to right in token-type order, after the layer's label
        fprintf(f, " }\n  \"L%d\"", l);
        for (int t = 0; t < N_TYPES; t++)
            if (shown[l * N_TYPES + t]) fprintf(f, " -> \"%d:%s\"", l, type_order[t]);
        fprintf(f, " [style=invis];\n");
    }
    // Columns: a type's boxes one above the other, layer after layer.
    for (int t = 0; t < N_TYPES; t++) {
        int prev = -1;
        for (int l = 0; l < L; l++) {
            if (!shown[l * N_TYPES + t]) continue;
            if (prev >= 0) fprintf(f, "  \"%d:%s\" -> \"%d:%s\" [style=invis, weight=20];\n", prev, type_order[t], l, type_order[t]);
            prev = l;
        }
    }
    // The kept edge units (they do not move the boxes: constraint=false).
    for (int l = 0; l < L; l++)
        for (int a = 0; a < N_TYPES; a++)
            for (int b = 0; b < N_TYPES; b++) {
                const unsigned char *on = edge + (((size_t)l * N_TYPES + a) * N_TYPES + b) * H;
                int count = 0;
                for (int h = 0; h < H; h++) count += on[h];
                if (!count) continue;
                heads_text(on, H, heads, sizeof heads);
                fprintf(f, "  \"%d:%s\" -> \"%d:%s\" [color=\"%s\", penwidth=%.2f, xlabel=\"%d\", tooltip=\"L%d %s -> %s: %s\", constraint=false];\n",
                        l, type_order[a], l, type_order[b], type_colour[a], 0.8 + 3.2 * count / most, count, l, type_order[a], type_order[b], heads);
            }
    fprintf(f, "}\n");
    fclose(f);
    free(node), free(edge), free(shown);
    // circuit.csv, with the units' scores from the round files when they can be read
    unit_scores scores = {0};
    ep_error score_err = {{0}};
    int scores_known = load_scores(run, round, L, H, &scores, &score_err) == 0;
    if (!scores_known) free(scores.score), free(scores.round), scores.score = NULL, scores.round = NULL;
    char *table = circuit_csv(c, &scores, L, H);
    free(scores.score), free(scores.round);
    char dot[4200], csv[4200], why[200];
    snprintf(dot, sizeof dot, "%s/circuit.dot", run);
    snprintf(csv, sizeof csv, "%s/circuit.csv", run);
    int rc = table ? write_text_atomic(csv, table, err) : ep_fail(err, "%s: out of memory", csv);
    if (rc == 0) rc = write_text_atomic(dot, text, err);
    free(text), free(table);
    if (rc == 0 && !scores_known) fprintf(out, "figures: %s: scores left empty: %s\n", csv, score_err.msg);
    report_figure files[3];
    report_figure_init(&files[0], run, "circuit.png");
    report_figure_init(&files[1], run, "circuit.svg");
    report_figure_init(&files[2], run, "circuit.pdf");
    char *to_png[] = {"dot", "-Tpng", "-Gdpi=110", dot, "-o", files[0].tmp, NULL}, *to_svg[] = {"dot", "-Tsvg", dot, "-o", files[1].tmp, NULL},
         *to_pdf[] = {"dot", "-Tpdf", dot, "-o", files[2].tmp, NULL};
    if (rc == 0) rc = report_draw(to_png, &files[0], 1, why, sizeof why, err);
    if (rc == 0) rc = report_draw(to_svg, &files[1], 1, why, sizeof why, err);
    if (rc == 0) rc = report_draw(to_pdf, &files[2], 1, why, sizeof why, err);
    if (rc == 1) fprintf(out, "figures: circuit.png, .svg and .pdf skipped: %s (units in %s)\n", why, csv);
    else if (rc == 0) fprintf(out, "figures: %s, .svg, .pdf (units %s, source %s)\n", files[0].path, csv, dot);
    return rc < 0 ? -1 : 0;
}

static void fv_table(FILE *f, const fv_summary *v) {
    int bl, bs;
    fv_summary_best(v, &bl, &bs);
    fprintf(f, "\nfunction vectors: %d heads (%s), zero-shot accuracy %.3f without the vector, best %.3f (layer %d, scale %g)\n",
            v->n_heads, v->from, v->base[0], v->accuracy[bl * v->n_scales + bs], v->layers[bl], v->scales[bs]);
    fprintf(f, "layer");
    for (int k = 0; k < v->n_scales; k++) fprintf(f, "  scale %-6g", v->scales[k]);
    fprintf(f, "\n");
    for (int l = 0; l < v->n_layers; l++) {
        fprintf(f, "%-5d", v->layers[l]);
        for (int k = 0; k < v->n_scales; k++) fprintf(f, "  %12.3f", v->accuracy[l * v->n_scales + k]);
        fprintf(f, "\n");
    }
    fprintf(f, "(accuracy of the zero-shot prompts with scale x the vector added after the layer at `last`; "
               "function_vectors.h5)\n");
}

// fv_accuracy.{png,pdf,svg}: accuracy against the layer, one curve per scale, the baseline dashed, the ICL
// prompts' accuracy dotted.
// icl: the full model's accuracy with the demonstrations (model_logs.json), drawn dotted when known.
static int fv_figure(const char *run, const fv_summary *v, double icl, FILE *out, ep_error *err) {
    char *table = NULL, *text = NULL;
    size_t tlen = 0, len = 0;
    FILE *t = open_memstream(&table, &tlen);
    if (!t) return ep_fail(err, "%s/fv_accuracy.csv: out of memory", run);
    fprintf(t, "layer,scale,accuracy,first_token_accuracy\n");
    for (int l = 0; l < v->n_layers; l++)
        for (int k = 0; k < v->n_scales; k++)
            fprintf(t, "%d,%g,%.6f,%.6f\n", v->layers[l], v->scales[k], v->accuracy[l * v->n_scales + k],
                    v->first[l * v->n_scales + k]);
    fclose(t);
    FILE *f = open_memstream(&text, &len);
    if (!f) {
        free(table);
        return ep_fail(err, "%s/fv_accuracy.gp: out of memory", run);
    }
    fprintf(f, "# gnuplot script written by edgepatch report; run `gnuplot fv_accuracy.gp` to redraw fv_accuracy.png,\n"
               "# .pdf and .svg. The data: fv_accuracy.csv.\n");
    fprintf(f, "if (!exists(\"png\")) png = 'fv_accuracy.png'\nif (!exists(\"pdf\")) pdf = 'fv_accuracy.pdf'\n"
               "if (!exists(\"svg\")) svg = 'fv_accuracy.svg'\n");
    fprintf(f, "set termoption noenhanced\nset title \"function vector (%d heads) added after a layer at last: zero-shot accuracy\"\n",
            v->n_heads);
    int span = v->layers[v->n_layers - 1] - v->layers[0];
    fprintf(f, "set xlabel 'layer'\nset ylabel 'accuracy'\nset yrange [-0.03:1.05]\nset xtics %d\nset key outside right\nset grid\n",
            span > 16 ? (span + 15) / 16 : 1);
    fprintf(f, "$acc << EOD\n");
    for (int k = 0; k < v->n_scales; k++) {
        for (int l = 0; l < v->n_layers; l++) fprintf(f, "%d %.6f\n", v->layers[l], v->accuracy[l * v->n_scales + k]);
        fprintf(f, "\n\n");  // one gnuplot data block per scale
    }
    fprintf(f, "EOD\nbaseline = %.6f\n", v->base[0]);
    fprintf(f, "set terminal pngcairo size 800,480 font 'sans,11'\nset output png\n");
    fprintf(f, "plot for [k=0:%d] $acc index k using 1:2 with linespoints title sprintf('scale %%s', word('", v->n_scales - 1);
    for (int k = 0; k < v->n_scales; k++) fprintf(f, "%s%g", k ? " " : "", v->scales[k]);
    fprintf(f, "', k + 1)), baseline with lines dashtype 2 lc rgb '#555555' title 'no vector'");
    if (isfinite(icl)) fprintf(f, ", %.6f with lines dashtype 3 lc rgb '#000000' title 'with demonstrations'", icl);
    fprintf(f, "\n");
    fprintf(f, "set terminal pdfcairo size 8.00in,4.80in font 'sans,8'\nset output pdf\nreplot\n");
    fprintf(f, "set terminal svg size 800,480 font 'sans,11' background '#ffffff'\nset output svg\nreplot\nunset output\n");
    fclose(f);
    int rc = gnuplot_figures(run, "fv_accuracy", table, text, out, err);
    free(text), free(table);
    return rc;
}

int report_write(const char *run_dir, FILE *out, ep_error *err) {
    // What an earlier report killed half way left (this command's own files only: a run writing the same
    // folder has its own temporaries, and a live writer's are never touched; stages/stage_inputs.h).
    static const char *const own[] = {"report.txt",        "accuracy_drop.gp",  "accuracy_drop.csv", "accuracy_drop.png",
                                      "accuracy_drop.pdf", "accuracy_drop.svg", "circuit.dot",       "circuit.csv",
                                      "circuit.png",       "circuit.svg",       "circuit.pdf",       "fv_accuracy.gp",
                                      "fv_accuracy.csv",   "fv_accuracy.png",   "fv_accuracy.pdf",   "fv_accuracy.svg",
                                      NULL};
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
    fv_summary fv;
    ep_error fv_err = {{0}};
    int has_fv = fv_summary_load(run_dir, &fv, &fv_err);
    if (has_fv > 0) fv_table(f, &fv);
    if (has_fv < 0) fprintf(f, "\nfunction vectors: not shown: %s\n", fv_err.msg);
    fclose(f);
    fputs(text, out);
    snprintf(path, sizeof path, "%s/report.txt", run_dir);
    rc = write_text_atomic(path, text, err);
    free(text);
    fprintf(out, "\n");
    if (rc == 0) rc = heatmap(run_dir, logs, out, err);
    if (rc == 0) rc = diagram(run_dir, logs, circuit, out, err);
    if (rc == 0 && has_fv > 0) rc = fv_figure(run_dir, &fv, report_num(logs, "full_model_accuracy"), out, err);
    if (has_fv > 0) fv_summary_free(&fv);
    json_decref(logs), json_decref(circuit);
    return rc;
}
