#include "sweep_report.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pipeline/files.h"
#include "stages/report.h"

enum { MAX_LABELS = 32, MAX_TASKS = 64, MAX_DONORS = 16 };

// What one model's runs of one task gave (NULL: the run has not written the file yet).
typedef struct {
    const char *task;
    int accuracy, bands, nested, prune;  // entry indices, -1 when the sweep has none
    int donors[MAX_DONORS], n_donors;
    json_t *acc_logs, *band_logs, *nested_logs, *prune_circuit, *donor_logs[MAX_DONORS];
    json_t *band_config, *donor_config[MAX_DONORS];  // the runs' configs (ablations' rules, donor kind)
    double wall, cpu;                                // sweep-times.json, summed over the task's runs
    int timed;
} task_runs;

// A run file: NULL in *out when it is not there (the run has not got that far); refused when it is there
// but lacks a field the report reads.
static int load_run_file(const char *dir, const char *name, const char *const *numbers, json_t **out, ep_error *err) {
    char path[4400];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    *out = NULL;
    if (access(path, F_OK) != 0) return 0;
    json_error_t jerr;
    json_t *j = json_load_file(path, 0, &jerr);
    if (!j || !json_is_object(j)) {
        json_decref(j);
        return ep_fail(err, "%s: %s", path, j ? "expected a JSON object" : jerr.text);
    }
    for (int k = 0; numbers[k]; k++)
        if (!json_is_number(json_object_get(j, numbers[k]))) {
            json_decref(j);
            return ep_fail(err, "%s: field %s: expected a number", path, numbers[k]);
        }
    json_t *abl = json_object_get(j, "ablations"), *a;
    size_t i;
    if (abl && !json_is_array(abl)) {
        json_decref(j);
        return ep_fail(err, "%s: field ablations: expected a list", path);
    }
    json_array_foreach(abl, i, a) {
        if (!json_is_string(json_object_get(a, "name")) || !json_is_number(json_object_get(a, "accuracy"))) {
            json_decref(j);
            return ep_fail(err, "%s: field ablations[%zu]: expected a name and an accuracy", path, i);
        }
    }
    *out = j;
    return 0;
}

static const char *const logs_fields[] = {"n_prompts", "accuracy", "full_model_accuracy", NULL};
static const char *const circuit_fields[] = {"n_head_units", "n_edge_units", "round", "faithfulness_logit_diff", NULL};

// 1: contextualization (every rule: senders among x, y; receiver y), 2: aggregation (every rule: y -> last),
// 0: another group. From the run config's ablation `name`.
static int ablation_kind(json_t *config, const char *name) {
    size_t i, k;
    json_t *a, *r;
    json_array_foreach(json_object_get(config, "ablations"), i, a) {
        if (strcmp(report_str(a, "name", ""), name)) continue;
        int context = 1, aggregation = 1, n = 0;
        json_array_foreach(json_object_get(a, "rules"), k, r) {
            json_t *s = json_object_get(r, "sender"), *v = json_object_get(r, "receiver"), *e;
            size_t q;
            int only_y_receiver = json_is_array(v) && json_array_size(v) == 1 && !strcmp(json_string_value(json_array_get(v, 0)) ? json_string_value(json_array_get(v, 0)) : "", "y");
            int last_receiver = json_is_array(v) && json_array_size(v) == 1 && !strcmp(json_string_value(json_array_get(v, 0)) ? json_string_value(json_array_get(v, 0)) : "", "last");
            int xy_senders = json_is_array(s) && json_array_size(s) > 0, y_sender = json_is_array(s) && json_array_size(s) == 1;
            json_array_foreach(s, q, e) {
                const char *t = json_string_value(e) ? json_string_value(e) : "";
                xy_senders &= !strcmp(t, "x") || !strcmp(t, "y");
                y_sender &= !strcmp(t, "y");
            }
            context &= only_y_receiver && xy_senders;
            aggregation &= last_receiver && y_sender;
            n++;
        }
        return n == 0 ? 0 : context ? 1 : aggregation ? 2 : 0;
    }
    return 0;
}

// "0-9" style ranges of a model_logs ablation's layers.
static void layer_text(json_t *a, char *out, size_t size) {
    size_t i, n = 0;
    json_t *l;
    long prev = -2, start = -2;
    out[0] = 0;
    json_array_foreach(json_object_get(a, "layers"), i, l) {
        long x = (long)json_integer_value(l);
        if (x == prev + 1) {
            prev = x;
            continue;
        }
        if (start >= 0 && n < size)
            n += (size_t)snprintf(out + n, size - n, n ? " %ld" : "%ld", start), n += prev > start && n < size ? (size_t)snprintf(out + n, size - n, "-%ld", prev) : 0;
        start = prev = x;
    }
    if (start >= 0 && n < size) {
        n += (size_t)snprintf(out + n, size - n, n ? " %ld" : "%ld", start);
        if (prev > start && n < size) snprintf(out + n, size - n, "-%ld", prev);
    }
}

// Distinct labels in first-seen order.
static int add_label(const char **labels, int *n, const char *s) {
    for (int k = 0; k < *n; k++)
        if (!strcmp(labels[k], s)) return k;
    if (*n >= MAX_LABELS) return -1;
    labels[*n] = s;
    return (*n)++;
}

// One heatmap panel: rows x cols of values (NAN: blank).
typedef struct {
    char title[256];
    const char *rows[MAX_LABELS], *cols[MAX_LABELS];
    int R, C;
    double v[MAX_LABELS][MAX_LABELS];
    char col_text[MAX_LABELS][96];  // a column's tic label when set (a band with its layers), else cols[c]
} panel;

// A gnuplot script drawing the panels side by side (4 a row) with one colour scale [-most, most].
static char *panels_gp(const char *name, const char *title, const char *xlabel, const char *ylabel, const panel *p, int n,
                       double most, int *width, int *height) {
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) return NULL;
    int per_row = n < 4 ? n : 4, rows = (n + per_row - 1) / per_row, maxR = 1;
    for (int k = 0; k < n; k++) maxR = p[k].R > maxR ? p[k].R : maxR;
    *width = 120 + 330 * per_row + 80 < 960 ? 960 : 120 + 330 * per_row + 80, *height = 90 + rows * (150 + 38 * maxR);
    fprintf(f, "# gnuplot script written by edgepatch report SWEEP; `gnuplot %s.gp` redraws %s.png and .pdf\n", name, name);
    fprintf(f, "if (!exists(\"png\")) png = '%s.png'\nif (!exists(\"pdf\")) pdf = '%s.pdf'\n", name, name);
    for (int k = 0; k < n; k++) {
        fprintf(f, "$p%d << EOD\n", k);
        for (int r = 0; r < p[k].R; r++)
            for (int c = 0; c < p[k].C; c++)
                if (isfinite(p[k].v[r][c])) {
                    char value[32];
                    snprintf(value, sizeof value, "%.2f", p[k].v[r][c]);
                    fprintf(f, "%d %d %.4f ", c, r, p[k].v[r][c]);
                    report_gnuplot_label(f, value);
                    fprintf(f, "\n");
                }
        fprintf(f, "EOD\n");
    }
    fprintf(f, "set palette defined (0 '#2166ac', 1 '#f7f7f7', 2 '#b2182b')\nset cbrange [%g:%g]\nset tics scale 0\n", -most, most);
    for (int t = 0; t < 2; t++) {
        if (t == 0) fprintf(f, "set terminal pngcairo noenhanced size %d,%d font 'sans,10'\nset output png\n", *width, *height);
        else fprintf(f, "set terminal pdfcairo noenhanced size %.2fin,%.2fin font 'sans,7'\nset output pdf\n", *width / 100.0, *height / 100.0);
        fprintf(f, "set multiplot layout %d,%d title ", rows, per_row);
        report_gnuplot_label(f, title);
        fprintf(f, " noenhanced\n");
        for (int k = 0; k < n; k++) {
            fprintf(f, "set title ");
            report_gnuplot_label(f, p[k].title);
            fprintf(f, " noenhanced\nset xlabel '%s' offset 0,-0.8\nset ylabel '%s'\n", xlabel, k % per_row ? "" : ylabel);
            fprintf(f, "set xrange [-0.5:%g]\nset yrange [%g:-0.5]\nset xtics (", p[k].C - 0.5, p[k].R - 0.5);
            for (int c = 0; c < p[k].C; c++)
                fprintf(f, "%s\"%s\" %d", c ? ", " : "", p[k].col_text[c][0] ? p[k].col_text[c] : p[k].cols[c], c);
            fprintf(f, ")\nset ytics (");
            for (int r = 0; r < p[k].R; r++) fprintf(f, "%s\"%s\" %d", r ? ", " : "", k % per_row ? "" : p[k].rows[r], r);
            // one colour scale for every panel, its box beside the last
            fprintf(f, ")\n%s\n", k == n - 1 ? "set colorbox\nset cblabel 'accuracy drop'" : "unset colorbox");
            fprintf(f, "plot $p%d using 1:2:(0.5):(0.5):3 with boxxyerror fs solid 1.0 noborder lc palette notitle, "
                       "$p%d using 1:2:4 with labels notitle\n", k, k);
        }
        fprintf(f, "unset multiplot\n");
    }
    fprintf(f, "unset output\n");
    fclose(f);
    return text;
}

// Draws name.gp's figures into dir (PNG and PDF); a missing gnuplot is a note.
static int draw_gp(const char *dir, const char *name, FILE *out, ep_error *err) {
    char gp[4400], png[256], pdf[256], assign[2 * 9000];
    snprintf(gp, sizeof gp, "%s/%s.gp", dir, name);
    snprintf(png, sizeof png, "%s.png", name), snprintf(pdf, sizeof pdf, "%s.pdf", name);
    report_figure files[2];
    report_figure_init(&files[0], dir, png);
    report_figure_init(&files[1], dir, pdf);
    size_t at = report_gnuplot_assign(assign, sizeof assign, "png", files[0].tmp);
    report_gnuplot_assign(assign + at, sizeof assign - at, "pdf", files[1].tmp);
    char *argv[] = {"gnuplot", "-e", assign, gp, NULL}, why[200];
    int rc = report_draw(argv, files, 2, why, sizeof why, err);
    if (rc == 1) fprintf(out, "figures: %s.png and .pdf skipped: %s\n", name, why);
    else if (rc == 0) fprintf(out, "figures: %s, %s\n", files[0].path, files[1].path);
    return rc < 0 ? -1 : 0;
}

// "name" or "name-model" (several models).
static void file_name(const sweep *s, int m, const char *base, char *out, size_t n) {
    if (s->n_models > 1) snprintf(out, n, "%s-%s", base, s->models[m].name);
    else snprintf(out, n, "%s", base);
}

static void free_runs(task_runs *t, int n) {
    for (int i = 0; i < n; i++) {
        json_decref(t[i].acc_logs), json_decref(t[i].band_logs), json_decref(t[i].nested_logs);
        json_decref(t[i].prune_circuit), json_decref(t[i].band_config);
        for (int d = 0; d < t[i].n_donors; d++) json_decref(t[i].donor_logs[d]), json_decref(t[i].donor_config[d]);
    }
}

// Collects model m's runs by task and reads their files (checked).
static int collect(const sweep *s, int m, task_runs *tr, int *n_tasks, ep_error *err) {
    *n_tasks = 0;
    for (int e = 0; e < s->n_entries; e++) {
        const sweep_entry *en = &s->entries[e];
        int t = 0;
        while (t < *n_tasks && strcmp(tr[t].task, en->task)) t++;
        if (t == *n_tasks) {
            if (t >= MAX_TASKS) return ep_fail(err, "%s: more than %d tasks to report", s->path, MAX_TASKS);
            memset(&tr[t], 0, sizeof tr[t]);
            tr[t].task = en->task;
            tr[t].accuracy = tr[t].bands = tr[t].nested = tr[t].prune = -1;
            (*n_tasks)++;
        }
        char dir[4096];
        sweep_run_dir(s, m, e, dir, sizeof dir);
        const char *x = en->experiment;
        int rc = 0;
        if (!strcmp(x, "accuracy") && tr[t].accuracy < 0) tr[t].accuracy = e, rc = load_run_file(dir, "model_logs.json", logs_fields, &tr[t].acc_logs, err);
        else if (!strcmp(x, "bands") && tr[t].bands < 0) {
            tr[t].bands = e;
            rc = load_run_file(dir, "model_logs.json", logs_fields, &tr[t].band_logs, err) || sweep_run_json(s, m, e, &tr[t].band_config, err);
        } else if (!strcmp(x, "nested") && tr[t].nested < 0) tr[t].nested = e, rc = load_run_file(dir, "model_logs.json", logs_fields, &tr[t].nested_logs, err);
        else if (!strcmp(x, "prune") && tr[t].prune < 0) tr[t].prune = e, rc = load_run_file(dir, "circuit.json", circuit_fields, &tr[t].prune_circuit, err);
        else if (!strcmp(x, "donors") && tr[t].n_donors < MAX_DONORS) {
            int d = tr[t].n_donors++;
            tr[t].donors[d] = e;
            rc = load_run_file(dir, "model_logs.json", logs_fields, &tr[t].donor_logs[d], err) ||
                 sweep_run_json(s, m, e, &tr[t].donor_config[d], err);
        }
        if (rc) return -1;
    }
    // Wall and CPU seconds of each task's runs (sweep run's record).
    char path[4200];
    snprintf(path, sizeof path, "%s/sweep-times.json", s->output_root);
    json_t *times = json_load_file(path, 0, NULL), *r;
    size_t i;
    json_array_foreach(json_object_get(times, "runs"), i, r) {
        if (strcmp(report_str(r, "model", ""), s->models[m].name)) continue;
        for (int t = 0; t < *n_tasks; t++)
            if (!strcmp(report_str(r, "task", ""), tr[t].task) && json_is_number(json_object_get(r, "wall_s"))) {
                tr[t].wall += report_num(r, "wall_s"), tr[t].cpu += report_num(r, "cpu_s"), tr[t].timed++;
            }
    }
    json_decref(times);
    return 0;
}

static void cell(FILE *f, double x) {
    if (isfinite(x)) fprintf(f, " %8.3f", x);
    else fprintf(f, " %8s", "-");
}

static void csv_num(FILE *f, double x) {
    if (isfinite(x)) fprintf(f, ",%.6g", x);
    else fputc(',', f);
}

// The donor kind a donors run reads: its config's donors[0].
static const char *donor_kind(json_t *config) {
    const char *k = json_string_value(json_array_get(json_object_get(config, "donors"), 0));
    return k ? k : "?";
}

typedef struct {
    char *text;
    size_t len;
    FILE *f;
} membuf;

static int mb_open(membuf *b) {
    b->text = NULL, b->len = 0;
    b->f = open_memstream(&b->text, &b->len);
    return b->f ? 0 : -1;
}

static int report_model(const sweep *s, int m, const char *dir, FILE *out, ep_error *err) {
    task_runs *tr = ep_calloc(MAX_TASKS, sizeof *tr);
    int T = 0, rc = collect(s, m, tr, &T, err);
    if (rc) {
        free_runs(tr, T), free(tr);
        return -1;
    }
    membuf txt, drop, fam, nest, sum, circ, tim;
    if (mb_open(&txt) || mb_open(&drop) || mb_open(&fam) || mb_open(&nest) || mb_open(&sum) || mb_open(&circ) || mb_open(&tim)) {
        free_runs(tr, T), free(tr);
        return ep_fail(err, "report: out of memory");
    }
    FILE *f = txt.f;
    panel *bands = ep_calloc(MAX_TASKS, sizeof *bands), *fams = ep_calloc(MAX_TASKS, sizeof *fams);
    int n_band_panels = 0, n_fam_panels = 0;
    double most = 0.05;
    fprintf(f, "Sweep %s (%s), model %s: %d tasks. Accuracy: greedy generation, correct when the continuation starts\n"
               "with the target. drop = full-model accuracy - accuracy with the edges ablated (each run's own full model).\n\n",
            s->name, s->path, s->models[m].name, T);

    // Full-model accuracy
    fprintf(f, "Full-model accuracy\n%-30s %8s %8s %8s\n", "task", "n", "accuracy", "1st-tok");
    for (int t = 0; t < T; t++) {
        json_t *l = tr[t].acc_logs;
        fprintf(f, "%-30s", tr[t].task);
        if (l) fprintf(f, " %8d", (int)report_num(l, "n_prompts"));
        else fprintf(f, " %8s", "-");
        cell(f, l ? report_num(l, "full_model_accuracy") : NAN),
            cell(f, l ? report_num(l, "full_model_first_token_accuracy") : NAN);
        fprintf(f, "\n");
    }

    // Band ablations: drop by group x band, per task
    fprintf(drop.f, "task,group,band,layers,ablation,n_prompts,full_model_accuracy,accuracy,drop,kind\n");
    fprintf(sum.f, "task,band,contextualization_drop,aggregation_drop\n");
    for (int t = 0; t < T; t++) {
        json_t *l = tr[t].band_logs, *a;
        if (!l) continue;
        panel *p = &bands[n_band_panels++];
        snprintf(p->title, sizeof p->title, "%s (n = %d, full %.2f)", tr[t].task, (int)report_num(l, "n_prompts"), report_num(l, "full_model_accuracy"));
        for (int r = 0; r < MAX_LABELS; r++)
            for (int c = 0; c < MAX_LABELS; c++) p->v[r][c] = NAN;
        double full = report_num(l, "full_model_accuracy"), ctx[MAX_LABELS] = {0}, agg[MAX_LABELS] = {0};
        int n_ctx[MAX_LABELS] = {0}, n_agg[MAX_LABELS] = {0};
        size_t i;
        json_array_foreach(json_object_get(l, "ablations"), i, a) {
            const char *g = report_str(a, "group", NULL), *b = report_str(a, "band", NULL);
            if (!g || !b) continue;
            int r = add_label(p->rows, &p->R, g), c = add_label(p->cols, &p->C, b);
            if (r < 0 || c < 0) continue;
            double d = full - report_num(a, "accuracy");
            p->v[r][c] = d;
            most = fabs(d) > most ? fabs(d) : most;
            int kind = ablation_kind(tr[t].band_config, report_str(a, "name", ""));
            if (kind == 1) ctx[c] += d, n_ctx[c]++;
            if (kind == 2) agg[c] += d, n_agg[c]++;
            char layers[2048];
            layer_text(a, layers, sizeof layers);
            if (!p->col_text[c][0] && layers[0] && strlen(layers) < 40) snprintf(p->col_text[c], sizeof p->col_text[c], "%.40s\\nL%.39s", b, layers);
            report_csv_text(drop.f, tr[t].task), fputc(',', drop.f), report_csv_text(drop.f, g), fputc(',', drop.f);
            report_csv_text(drop.f, b), fputc(',', drop.f), report_csv_text(drop.f, layers), fputc(',', drop.f);
            report_csv_text(drop.f, report_str(a, "name", ""));
            fprintf(drop.f, ",%d", (int)report_num(l, "n_prompts"));
            csv_num(drop.f, full), csv_num(drop.f, report_num(a, "accuracy")), csv_num(drop.f, d);
            fprintf(drop.f, ",%s\n", kind == 1 ? "contextualization" : kind == 2 ? "aggregation" : "other");
        }
        if (p->C == 0 || p->R == 0) {  // no ablation with a group and a band
            n_band_panels--;
            continue;
        }
        fprintf(f, "\n%s: accuracy drop by edge group (rows) and layer band (columns); full model %.3f, n = %d\n%-16s",
                tr[t].task, full, (int)report_num(l, "n_prompts"), "");
        for (int c = 0; c < p->C; c++) fprintf(f, " %8s", p->cols[c]);
        fprintf(f, "\n");
        for (int r = 0; r < p->R; r++) {
            fprintf(f, "%-16s", p->rows[r]);
            for (int c = 0; c < p->C; c++) cell(f, p->v[r][c]);
            fprintf(f, "\n");
        }
        for (int c = 0; c < p->C; c++) {
            report_csv_text(sum.f, tr[t].task), fputc(',', sum.f), report_csv_text(sum.f, p->cols[c]);
            csv_num(sum.f, n_ctx[c] ? ctx[c] / n_ctx[c] : NAN), csv_num(sum.f, n_agg[c] ? agg[c] / n_agg[c] : NAN);
            fputc('\n', sum.f);
        }
    }

    // Contextualization versus aggregation, by band
    fprintf(f, "\nContextualization (x->y, y->y: mean drop of those groups) versus aggregation (y->last: drop), by band\n");
    for (int t = 0; t < T; t++) {
        if (!tr[t].band_logs) continue;
        const panel *p = NULL;
        for (int k = 0; k < n_band_panels; k++)
            if (!strncmp(bands[k].title, tr[t].task, strlen(tr[t].task)) && bands[k].title[strlen(tr[t].task)] == ' ') p = &bands[k];
        if (!p) continue;
        fprintf(f, "%-30s", tr[t].task);
        double best_c = -INFINITY, best_a = -INFINITY;
        int at_c = -1, at_a = -1;
        for (int c = 0; c < p->C; c++) {
            double cs = 0, as = 0;
            int nc = 0, na = 0;
            for (int r = 0; r < p->R; r++) {
                int kind = 0;
                size_t i;
                json_t *a;
                json_array_foreach(json_object_get(tr[t].band_logs, "ablations"), i, a)
                    if (!strcmp(report_str(a, "group", ""), p->rows[r]) && !strcmp(report_str(a, "band", ""), p->cols[c]))
                        kind = ablation_kind(tr[t].band_config, report_str(a, "name", ""));
                if (!isfinite(p->v[r][c])) continue;
                if (kind == 1) cs += p->v[r][c], nc++;
                if (kind == 2) as += p->v[r][c], na++;
            }
            double cm = nc ? cs / nc : NAN, am = na ? as / na : NAN;
            fprintf(f, "  band %s: ctx", p->cols[c]), cell(f, cm), fprintf(f, " agg"), cell(f, am);
            if (nc && cm > best_c) best_c = cm, at_c = c;
            if (na && am > best_a) best_a = am, at_a = c;
        }
        fprintf(f, "\n%-30s  largest contextualization drop in band %s, largest aggregation drop in band %s\n", "",
                at_c >= 0 ? p->cols[at_c] : "-", at_a >= 0 ? p->cols[at_a] : "-");
    }

    // Nested
    fprintf(f, "\nNested (ablating differently for different tokens: the run's plan)\n%-30s %8s %8s %8s\n", "task", "full", "nested",
            "drop");
    fprintf(nest.f, "task,n_prompts,full_model_accuracy,accuracy,drop\n");
    for (int t = 0; t < T; t++) {
        json_t *l = tr[t].nested_logs;
        if (tr[t].nested < 0) continue;
        double full = l ? report_num(l, "full_model_accuracy") : NAN, acc = l ? report_num(l, "accuracy") : NAN;
        fprintf(f, "%-30s", tr[t].task), cell(f, full), cell(f, acc), cell(f, full - acc), fprintf(f, "\n");
        report_csv_text(nest.f, tr[t].task);
        fprintf(nest.f, ",%d", l ? (int)report_num(l, "n_prompts") : 0);
        csv_num(nest.f, full), csv_num(nest.f, acc), csv_num(nest.f, full - acc), fputc('\n', nest.f);
    }

    // Donor families: donor kind x group, per task
    fprintf(fam.f, "task,donor_kind,group,n_prompts,full_model_accuracy,accuracy,drop\n");
    for (int t = 0; t < T; t++) {
        if (!tr[t].n_donors) continue;
        panel *p = &fams[n_fam_panels++];
        snprintf(p->title, sizeof p->title, "%s", tr[t].task);
        for (int r = 0; r < MAX_LABELS; r++)
            for (int c = 0; c < MAX_LABELS; c++) p->v[r][c] = NAN;
        for (int d = 0; d < tr[t].n_donors; d++) {
            json_t *l = tr[t].donor_logs[d], *a;
            const char *kind = donor_kind(tr[t].donor_config[d]);
            int r = add_label(p->rows, &p->R, kind);
            size_t i;
            if (!l || r < 0) continue;
            json_array_foreach(json_object_get(l, "ablations"), i, a) {
                const char *g = report_str(a, "group", report_str(a, "name", ""));
                int c = add_label(p->cols, &p->C, g);
                if (c < 0) continue;
                double dd = report_num(l, "full_model_accuracy") - report_num(a, "accuracy");
                p->v[r][c] = dd;
                most = fabs(dd) > most ? fabs(dd) : most;
                report_csv_text(fam.f, tr[t].task), fputc(',', fam.f), report_csv_text(fam.f, kind), fputc(',', fam.f);
                report_csv_text(fam.f, g);
                fprintf(fam.f, ",%d", (int)report_num(l, "n_prompts"));
                csv_num(fam.f, report_num(l, "full_model_accuracy")), csv_num(fam.f, report_num(a, "accuracy")), csv_num(fam.f, dd);
                fputc('\n', fam.f);
            }
        }
        if (p->C == 0) {  // no donor run of this task has finished: no panel
            n_fam_panels--;
            continue;
        }
        fprintf(f, "\n%s: donor families, accuracy drop by donor kind (rows) and edge group over all layers (columns)\n%-16s",
                tr[t].task, "");
        for (int c = 0; c < p->C; c++) fprintf(f, " %14s", p->cols[c]);
        fprintf(f, "\n");
        for (int r = 0; r < p->R; r++) {
            fprintf(f, "%-16s", p->rows[r]);
            for (int c = 0; c < p->C; c++) isfinite(p->v[r][c]) ? fprintf(f, " %14.3f", p->v[r][c]) : fprintf(f, " %14s", "-");
            fprintf(f, "\n");
        }
    }

    // Circuits
    fprintf(f, "\nCircuits (iterative pruning: heads then edges, the final round's circuit)\n%-30s %6s %10s %10s %12s\n", "task",
            "round", "head units", "edge units", "faithfulness");
    fprintf(circ.f, "task,round,n_head_units,n_edge_units,faithfulness_logit_diff\n");
    for (int t = 0; t < T; t++) {
        json_t *c = tr[t].prune_circuit;
        if (tr[t].prune < 0) continue;
        if (!c) {
            fprintf(f, "%-30s %6s %10s %10s %12s\n", tr[t].task, "-", "-", "-", "-");
            continue;
        }
        fprintf(f, "%-30s %6d %10d %10d %12.3f\n", tr[t].task, (int)report_num(c, "round"), (int)report_num(c, "n_head_units"),
                (int)report_num(c, "n_edge_units"), report_num(c, "faithfulness_logit_diff"));
        report_csv_text(circ.f, tr[t].task);
        fprintf(circ.f, ",%d,%d,%d", (int)report_num(c, "round"), (int)report_num(c, "n_head_units"), (int)report_num(c, "n_edge_units"));
        csv_num(circ.f, report_num(c, "faithfulness_logit_diff")), fputc('\n', circ.f);
    }

    // Times
    fprintf(f, "\nWall and CPU time per task (sweep-times.json, every run of the task)\n%-30s %10s %10s %6s\n", "task", "wall s",
            "CPU s", "runs");
    fprintf(tim.f, "task,runs_timed,wall_s,cpu_s\n");
    double wall = 0, cpu = 0;
    for (int t = 0; t < T; t++) {
        fprintf(f, "%-30s %10.1f %10.1f %6d\n", tr[t].task, tr[t].wall, tr[t].cpu, tr[t].timed);
        report_csv_text(tim.f, tr[t].task);
        fprintf(tim.f, ",%d,%.3f,%.3f\n", tr[t].timed, tr[t].wall, tr[t].cpu);
        wall += tr[t].wall, cpu += tr[t].cpu;
    }
    fprintf(f, "%-30s %10.1f %10.1f\n", "total", wall, cpu);

    char names[8][1024], base[8][64] = {"report", "accuracy_drop", "donor_families", "nested", "summary", "circuits", "times",
                                        "accuracy_drop"};
    for (int k = 0; k < 8; k++) file_name(s, m, base[k], names[k], sizeof names[k]);
    fprintf(f, "\nFigures: %s.png/.pdf (band heatmaps, one colour scale [-%.2f, %.2f]), %s.png/.pdf (donor families, the "
               "same scale), circuit-<task>.png/.pdf (Graphviz). Data: %s.csv, %s.csv, %s.csv, %s.csv, %s.csv, %s.csv.\n",
            names[1], most, most, names[2], names[1], names[2], names[3], names[4], names[5], names[6]);
    membuf *bufs[7] = {&txt, &drop, &fam, &nest, &sum, &circ, &tim};
    for (int k = 0; k < 7; k++) fclose(bufs[k]->f);

    // Write: the tables, then the figures.
    int w, h;
    char title[512];
    snprintf(title, sizeof title, "%s: accuracy drop when an edge group is ablated in a band of the layers (drop = full - ablated)",
             s->models[m].name);
    char *gp_bands = n_band_panels ? panels_gp(names[1], title, "layer band", "edge group", bands, n_band_panels, most, &w, &h) : NULL;
    snprintf(title, sizeof title, "%s: donor families: accuracy drop by donor kind, edge group over all layers", s->models[m].name);
    char *gp_fams = n_fam_panels ? panels_gp(names[2], title, "edge group", "donor kind", fams, n_fam_panels, most, &w, &h) : NULL;
    rc = make_dirs(dir, err);
    for (int k = 0; k < 7 && rc == 0; k++) {
        char path[8400];
        snprintf(path, sizeof path, "%s/%s.%s", dir, names[k], k ? "csv" : "txt");
        rc = write_text_atomic(path, bufs[k]->text ? bufs[k]->text : "", err);
    }
    char path[8400];
    if (rc == 0 && gp_bands) {
        snprintf(path, sizeof path, "%s/%s.gp", dir, names[1]);
        rc = write_text_atomic(path, gp_bands, err) || draw_gp(dir, names[1], out, err) ? -1 : 0;
    }
    if (rc == 0 && gp_fams) {
        snprintf(path, sizeof path, "%s/%s.gp", dir, names[2]);
        rc = write_text_atomic(path, gp_fams, err) || draw_gp(dir, names[2], out, err) ? -1 : 0;
    }
    // The circuits: each prune run's circuit.dot (the run report's); the PNG small (60 dpi, a palette: gd), the PDF whole.
    for (int t = 0; t < T && rc == 0; t++) {
        if (tr[t].prune < 0 || !tr[t].prune_circuit) continue;
        char run[4096], dot[4200], png[1100], pdf[1100], why[200];
        sweep_run_dir(s, m, tr[t].prune, run, sizeof run);
        snprintf(dot, sizeof dot, "%s/circuit.dot", run);
        if (access(dot, R_OK) != 0) {
            fprintf(out, "figures: circuit-%s skipped: no %s\n", tr[t].task, dot);
            continue;
        }
        char task_stem[400], stem[1024];
        snprintf(task_stem, sizeof task_stem, "circuit-%s", tr[t].task);
        file_name(s, m, task_stem, stem, sizeof stem);
        snprintf(png, sizeof png, "%s.png", stem), snprintf(pdf, sizeof pdf, "%s.pdf", stem);
        report_figure files[2];
        report_figure_init(&files[0], dir, png);
        report_figure_init(&files[1], dir, pdf);
        char *to_png[] = {"dot", "-Tpng:gd", "-Gdpi=60", dot, "-o", files[0].tmp, NULL}, *to_pdf[] = {"dot", "-Tpdf", dot, "-o", files[1].tmp, NULL};
        int r1 = report_draw(to_png, &files[0], 1, why, sizeof why, err);
        int r2 = r1 < 0 ? -1 : report_draw(to_pdf, &files[1], 1, why, sizeof why, err);
        if (r1 < 0 || r2 < 0) rc = -1;
        else if (r1 == 1 || r2 == 1) fprintf(out, "figures: %s skipped: %s\n", stem, why);
        else fprintf(out, "figures: %s/%s, .pdf\n", dir, png);
    }
    if (rc == 0) fputs(txt.text ? txt.text : "", out);
    for (int k = 0; k < 7; k++) free(bufs[k]->text);
    free(gp_bands), free(gp_fams), free(bands), free(fams);
    free_runs(tr, T), free(tr);
    return rc;
}

int sweep_report_write(const sweep *s, const char *dir, FILE *out, ep_error *err) {
    char def[4200];
    if (!dir) {
        snprintf(def, sizeof def, "%s/report", s->output_root);
        dir = def;
    }
    for (int m = 0; m < s->n_models; m++)
        if (report_model(s, m, dir, out, err)) return -1;
    // The times beside the tables (sweep-times.json as sweep run wrote it).
    char from[4300], to[4300];
    snprintf(from, sizeof from, "%s/sweep-times.json", s->output_root);
    snprintf(to, sizeof to, "%s/sweep-times.json", dir);
    json_t *times = json_load_file(from, 0, NULL);
    int rc = times ? write_json_atomic(to, times, err) : 0;
    json_decref(times);
    return rc;
}
