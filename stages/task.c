#define _XOPEN_SOURCE 700  // realpath
#include "task.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pipeline/paths.h"

static const char *kind_names[DONOR_KIND_COUNT] = {"random_xy",    "random_y",     "random_x",
                                                   "other_pairs",  "shuffle_y",    "other_task_x",
                                                   "other_task_y", "other_mapping", "other_mapping_x",
                                                   "mean"};

const char *donor_kind_name(donor_kind k) { return k < DONOR_KIND_COUNT ? kind_names[k] : "?"; }

int donor_kind_parse(const char *s, donor_kind *out) {
    for (int k = 0; k < DONOR_KIND_COUNT; k++)
        if (!strcmp(s, kind_names[k])) {
            *out = (donor_kind)k;
            return 0;
        }
    return -1;
}

int donor_kind_needs_donor_tasks(donor_kind k) { return k == DONOR_OTHER_TASK_X || k == DONOR_OTHER_TASK_Y; }

int task_check_kind(const task *t, donor_kind k, ep_error *err) {
    if (donor_kind_needs_donor_tasks(k) && t->n_donor_pairs == 0)
        return ep_fail(err, "%s: field donor_tasks: donor kind %s needs a list of other tasks to draw from", t->path,
                       donor_kind_name(k));
    return 0;
}

// A task file's fields; string: must be a JSON string.
static const struct {
    const char *name;
    int string;
} task_fields[] = {{"name", 1}, {"title", 1}, {"description", 1}, {"pairs", 1}, {"input", 1}, {"output", 1},
                   {"separator", 1}, {"output_prefix", 1}, {"example_separator", 1}, {"n_shots", 0},
                   {"donor_kinds", 0}, {"donor_tasks", 0}, {"words", 1}, {"ambiguous_pairs", 1}, {"ambiguous_fraction", 0}};

static const char *string_field(json_t *root, const char *key, const char *fallback) {
    json_t *v = json_object_get(root, key);
    return json_is_string(v) ? json_string_value(v) : fallback;
}

// Reads a pair list; keep(x, y) decides which pairs go to which list.
static int load_pairs(const char *path, const char *in_key, const char *out_key, int want_identity, task_pair **pairs,
                      int *n, ep_error *err) {
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    if (!root) return ep_fail(err, "%s: %s (line %d)", path, jerr.text, jerr.line);
    if (!json_is_array(root)) {
        json_decref(root);
        return ep_fail(err, "%s: expected a JSON list of {\"%s\", \"%s\"} objects", path, in_key, out_key);
    }
    *pairs = ep_calloc(json_array_size(root) + 1, sizeof(task_pair));
    *n = 0;
    size_t i;
    json_t *item;
    int rc = 0;
    json_array_foreach(root, i, item) {
        const char *x = string_field(item, in_key, NULL), *y = string_field(item, out_key, NULL);
        if (!x || !y) {
            rc = ep_fail(err, "%s: item %zu: fields '%s' and '%s' must be strings", path, i, in_key, out_key);
            break;
        }
        if (json_object_get(item, "suspect")) continue;  // upstream label known to be wrong
        if (!*x || !*y) {
            rc = ep_fail(err, "%s: item %zu: empty input or output", path, i);
            break;
        }
        if (want_identity >= 0 && (strcmp(x, y) == 0) != want_identity) continue;
        (*pairs)[*n].x = ep_strdup(x);
        (*pairs)[*n].y = ep_strdup(y);
        (*n)++;
    }
    json_decref(root);
    return rc;
}

static void canonical_name(const char *in, char *out, size_t n) {
    size_t i = 0;
    for (; in[i] && i + 1 < n; i++) out[i] = in[i] == '-' ? '_' : (char)tolower((unsigned char)in[i]);
    out[i] = 0;
}

// The file of a task named by name or path; -1 (err filled) if there is none.
static int task_path(const char *name_or_path, char *path, size_t n, ep_error *err) {
    if (strchr(name_or_path, '/') || strstr(name_or_path, ".json")) {
        snprintf(path, n, "%s", name_or_path);
        return 0;
    }
    char canon[256], rel[300];
    canonical_name(name_or_path, canon, sizeof canon);
    snprintf(rel, sizeof rel, "tasks/%s.json", canon);
    if (data_path(rel, path, n, err)) return ep_fail(err, "unknown task '%s' (see 'edgepatch tasks')", name_or_path);
    return 0;
}

static int task_load_file(const char *path, int with_donors, task *t, ep_error *err);

// donor_tasks: names (or paths, relative to the task file's folder when they contain '/') of other tasks.
// Their ordinary pairs are appended to t->donor_pairs when with_donors (a donor task's own donor_tasks are
// checked to exist but not loaded: no recursion).
static int load_donor_tasks(task *t, json_t *list, const char *dir, int with_donors, ep_error *err) {
    if (!list) return 0;
    if (!json_is_array(list) || json_array_size(list) == 0 || json_array_size(list) > TASK_MAX_DONOR_TASKS)
        return ep_fail(err, "%s: field donor_tasks: expected a list of 1 to %d task names", t->path, TASK_MAX_DONOR_TASKS);
    for (size_t i = 0; i < json_array_size(list); i++) {
        const char *name = json_string_value(json_array_get(list, i));
        char path[4096], rel_path[4096];
        ep_error nerr = {{0}};
        if (!name || !*name) return ep_fail(err, "%s: field donor_tasks[%zu]: expected a task name", t->path, i);
        if (strchr(name, '/')) {
            path_join(dir, name, rel_path, sizeof rel_path);
            name = rel_path;
        }
        if (task_path(name, path, sizeof path, &nerr) || access(path, R_OK))
            return ep_fail(err, "%s: field donor_tasks[%zu]: unknown task '%s' (see 'edgepatch tasks')", t->path, i, name);
        char *real_self = realpath(t->path, NULL), *real_other = realpath(path, NULL);
        int self = real_self && real_other && !strcmp(real_self, real_other);
        free(real_self), free(real_other);
        if (self) return ep_fail(err, "%s: field donor_tasks[%zu]: '%s' is this task itself", t->path, i, name);
        t->donor_task_paths[t->n_donor_tasks++] = ep_strdup(path);
        if (!with_donors) continue;
        task other;
        if (task_load_file(path, 0, &other, &nerr))
            return ep_fail(err, "%s: field donor_tasks[%zu]: %s", t->path, i, nerr.msg);
        t->donor_pairs = ep_realloc(t->donor_pairs, sizeof(task_pair) * (size_t)(t->n_donor_pairs + other.n_pairs + 1));
        for (int p = 0; p < other.n_pairs; p++) {
            t->donor_pairs[t->n_donor_pairs++] = other.pairs[p];
            other.pairs[p] = (task_pair){0};
        }
        task_free(&other);
    }
    return 0;
}

int task_load(const char *name_or_path, task *t, ep_error *err) {
    memset(t, 0, sizeof *t);
    char path[4096];
    if (task_path(name_or_path, path, sizeof path, err)) return -1;
    return task_load_file(path, 1, t, err);
}

static int task_load_file(const char *path, int with_donors, task *t, ep_error *err) {
    memset(t, 0, sizeof *t);
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    if (!root) return ep_fail(err, "%s: %s (line %d)", path, jerr.text, jerr.line);
    char dir[4096], file[4096];
    dir_of(path, dir, sizeof dir);
    int rc = -1;
    t->path = ep_strdup(path);
    const char *name = string_field(root, "name", NULL), *pairs = string_field(root, "pairs", NULL);
    if (!json_is_object(root) || !name || !pairs) {
        ep_fail(err, "%s: fields name and pairs (strings) are required", path);
        goto done;
    }
    // Every field known and of its type: a typo or a number where a string belongs ("separator": 3)
    // must not fall back to the default.
    const char *key;
    json_t *value;
    json_object_foreach(root, key, value) {
        int known = 0, string = 0;
        for (size_t i = 0; i < sizeof task_fields / sizeof task_fields[0] && !known; i++)
            if (!strcmp(key, task_fields[i].name)) known = 1, string = task_fields[i].string;
        if (!known) {
            ep_fail(err, "%s: unknown field '%s'", path, key);
            goto done;
        }
        if (string && !json_is_string(value)) {
            ep_fail(err, "%s: field %s: expected a string", path, key);
            goto done;
        }
    }
    t->name = ep_strdup(name);
    t->title = ep_strdup(string_field(root, "title", name));
    t->separator = ep_strdup(string_field(root, "separator", ":"));
    t->output_prefix = ep_strdup(string_field(root, "output_prefix", " "));
    t->example_separator = ep_strdup(string_field(root, "example_separator", "\n"));
    const char *in_key = string_field(root, "input", "input"), *out_key = string_field(root, "output", "output");
    json_t *shots = json_object_get(root, "n_shots");
    t->n_shots = 10;
    if (shots && (!json_is_integer(shots) || json_integer_value(shots) < 0 || json_integer_value(shots) > 1000)) {
        ep_fail(err, "%s: field n_shots: expected an integer in 0..1000", path);
        goto done;
    }
    if (shots) t->n_shots = (int)json_integer_value(shots);  // in range: checked before the conversion
    json_t *kinds = json_object_get(root, "donor_kinds");
    if (!json_is_array(kinds) || json_array_size(kinds) == 0 || json_array_size(kinds) > DONOR_KIND_COUNT) {
        ep_fail(err, "%s: field donor_kinds: expected a list of 1 to %d donor kinds", path, DONOR_KIND_COUNT);
        goto done;
    }
    for (size_t i = 0; i < json_array_size(kinds); i++) {
        const char *k = json_string_value(json_array_get(kinds, i));
        if (!k || donor_kind_parse(k, &t->kinds[t->n_kinds++])) {
            ep_fail(err, "%s: field donor_kinds[%zu]: '%s' is not one of random_xy, random_y, random_x, other_pairs, "
                         "shuffle_y, other_task_x, other_task_y, other_mapping, other_mapping_x, mean", path, i,
                    k ? k : "(not a string)");
            goto done;
        }
    }
    if (load_donor_tasks(t, json_object_get(root, "donor_tasks"), dir, with_donors, err)) goto done;
    for (int k = 0; k < t->n_kinds; k++)
        if (donor_kind_needs_donor_tasks(t->kinds[k]) && t->n_donor_tasks == 0) {
            ep_fail(err, "%s: field donor_tasks: donor kind %s (donor_kinds[%d]) needs a list of other tasks to draw from",
                    path, donor_kind_name(t->kinds[k]), k);
            goto done;
        }
    const char *ambiguous = string_field(root, "ambiguous_pairs", NULL);
    path_join(dir, pairs, file, sizeof file);
    if (load_pairs(file, in_key, out_key, ambiguous ? 0 : -1, &t->pairs, &t->n_pairs, err)) goto done;
    if (ambiguous) {
        path_join(dir, ambiguous, file, sizeof file);
        if (load_pairs(file, in_key, out_key, 1, &t->ambiguous, &t->n_ambiguous, err)) goto done;
        json_t *frac = json_object_get(root, "ambiguous_fraction");
        t->ambiguous_fraction = frac ? json_number_value(frac) : 0.5;
        if (frac && (!json_is_number(frac) || t->ambiguous_fraction < 0 || t->ambiguous_fraction > 1)) {
            ep_fail(err, "%s: field ambiguous_fraction: expected a number in [0, 1]", path);
            goto done;
        }
    }
    const char *words = string_field(root, "words", NULL);
    if (words) {
        path_join(dir, words, file, sizeof file);
        t->words_path = ep_strdup(file);
    }
    if (t->n_pairs < 2) {
        ep_fail(err, "%s: needs at least 2 pairs, has %d", path, t->n_pairs);
        goto done;
    }
    rc = 0;
done:
    json_decref(root);
    if (rc) task_free(t);
    return rc;
}

static void free_pairs(task_pair *p, int n) {
    for (int i = 0; i < n; i++) free(p[i].x), free(p[i].y);
    free(p);
}

void task_free(task *t) {
    free_pairs(t->pairs, t->n_pairs);
    free_pairs(t->ambiguous, t->n_ambiguous);
    free(t->name), free(t->title), free(t->path), free(t->separator), free(t->output_prefix);
    free(t->example_separator), free(t->words_path);
    for (int i = 0; i < t->n_donor_tasks; i++) free(t->donor_task_paths[i]);
    free_pairs(t->donor_pairs, t->n_donor_pairs);
    memset(t, 0, sizeof *t);
}

static int compare_strings(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

int task_names(char ***names, int *n, ep_error *err) {
    char dir[4096];
    if (data_path("tasks", dir, sizeof dir, err)) return -1;
    DIR *d = opendir(dir);
    if (!d) return ep_fail(err, "%s: cannot list: %s", dir, strerror(errno));
    int cap = 16;
    *names = ep_malloc(sizeof(char *) * (size_t)cap);
    *n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t len = strlen(e->d_name);
        if (len < 6 || strcmp(e->d_name + len - 5, ".json")) continue;
        if (*n == cap) *names = ep_realloc(*names, sizeof(char *) * (size_t)(cap *= 2));
        (*names)[*n] = ep_strdup(e->d_name);
        (*names)[(*n)++][len - 5] = 0;
    }
    closedir(d);
    qsort(*names, (size_t)*n, sizeof(char *), compare_strings);
    return 0;
}

void task_names_free(char **names, int n) {
    for (int i = 0; i < n; i++) free(names[i]);
    free(names);
}

int word_list_load(const char *path, word_list *w, ep_error *err) {
    memset(w, 0, sizeof *w);
    FILE *f = fopen(path, "r");
    if (!f) return ep_fail(err, "%s: cannot open: %s", path, strerror(errno));
    char line[256];
    int cap = 1024;
    w->words = ep_malloc(sizeof(char *) * (size_t)cap);
    while (fgets(line, sizeof line, f)) {
        size_t len = strcspn(line, "\r\n");
        int whole = line[len] != 0 || feof(f);  // else the line goes on past the buffer: too long for a word
        if (!whole) {  // skip its rest, which fgets would return as more (partial) words
            int ch;
            while ((ch = fgetc(f)) != EOF && ch != '\n') {
            }
        }
        line[len] = 0;
        int ok = whole && len >= 2;
        for (size_t i = 0; i < len && ok; i++) ok = line[i] >= 'a' && line[i] <= 'z';
        if (!ok) continue;
        if (w->n == cap) w->words = ep_realloc(w->words, sizeof(char *) * (size_t)(cap *= 2));
        w->words[w->n++] = ep_strdup(line);
    }
    fclose(f);
    if (w->n == 0) return ep_fail(err, "%s: no usable words (lowercase a-z, 2+ letters)", path);
    return 0;
}

void word_list_free(word_list *w) {
    for (int i = 0; i < w->n; i++) free(w->words[i]);
    free(w->words);
    memset(w, 0, sizeof *w);
}
