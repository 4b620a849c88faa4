#define _XOPEN_SOURCE 700  // realpath
#include "tokenize.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pipeline/files.h"
#include "pipeline/h5store.h"
#include "pipeline/hash.h"
#include "pipeline/pretok.h"
#include "pipeline/tokenizer.h"
#include "stages/prompts.h"
#include "stages/stage_inputs.h"
#include "stages/task.h"

// Content hash of the tokenizer files in dir (tokenizer.json or .json.gz, tokenizer_config.json).
static int hash_tokenizer(const char *dir, uint64_t *h, ep_error *err) {
    const char *names[] = {"tokenizer.json", "tokenizer.json.gz", "tokenizer_config.json"};
    *h = HASH_INIT;
    int found = 0;
    for (int i = 0; i < 3; i++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        if (access(path, R_OK) != 0) continue;
        uint64_t fh;
        if (hash_file(path, &fh, err)) return -1;
        *h = hash_bytes(*h, &fh, sizeof fh);
        found += i < 2;
    }
    return found ? 0 : ep_fail(err, "%s: no tokenizer.json or tokenizer.json.gz", dir);
}

// tokenize_report.json's text (as write_json_atomic writes it). prompts.h5 keeps a copy (attribute
// tokenize_report), so a damaged report is rewritten from it without rebuilding the prompts.
static char *report_text(const task *t, const char *tokenizer_path, const tokenize_report *r) {
    json_t *dropped = json_object();
    for (int i = 1; i < PAIR_REASON_COUNT; i++)
        if (r->dropped[i]) json_object_set_new(dropped, pair_reason_name((pair_reason)i), json_integer(r->dropped[i]));
    json_t *o = json_pack("{s:s,s:s,s:i,s:i,s:o,s:i,s:i,s:i,s:i,s:i,s:i,s:i}", "task", t->name, "tokenizer", tokenizer_path,
                          "pairs_total", r->pairs_total, "pairs_kept", r->pairs_kept, "dropped", dropped,
                          "ambiguous_total", r->ambiguous_total, "ambiguous_kept", r->ambiguous_kept, "prompts",
                          r->prompts_built, "prompts_redrawn_tokenization", r->prompts_rejected,
                          "prompts_redrawn_donor_alignment", r->donors_unaligned, "shuffle_outputs_unmoved",
                          r->shuffle_unmoved, "donor_spans_unmoved", r->spans_unmoved);
    char *text = json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(8));
    json_decref(o);
    size_t n = strlen(text);
    text = ep_realloc(text, n + 2);
    strcpy(text + n, "\n");
    return text;
}

// 1 if the file at path holds exactly text, else 0 (missing, unreadable or other bytes).
static int file_holds(const char *path, const char *text) {
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    size_t n = strlen(text), i = 0;
    int c, same = 1;
    while (same && (c = fgetc(f)) != EOF) same = i < n && (char)c == text[i++];
    fclose(f);
    return same && i == n;
}

typedef struct {
    int P, L, K, T, N;
    int32_t *tokens, *lengths, *types, *index, *donors, *targets, *target_lengths, *pair_ids, *donor_kinds;
    char **token_text, **donor_text, **target_text;  // each id's decoded piece ("" for padding)
} prompt_arrays;

// A token's text as prompts.h5 stores it: the id decoded alone (special tokens kept), made valid UTF-8
// (a piece that is part of a character, or a NUL, becomes U+FFFD), so a reader needs no tokenizer.
static char *piece_text(const tokenizer *tk, int id) {
    char *raw = NULL;
    size_t len = 0;
    ep_error ignored;
    if (id < 0) return ep_strdup("");
    if (tokenizer_decode(tk, &id, 1, 0, &raw, &len, &ignored)) return ep_strdup("");
    byte_buf out = {0};
    utf8_sanitize(raw, len, &out);
    free(raw);
    buf_append(&out, "", 1);  // the NUL
    for (size_t i = 0; i + 1 < out.len; i++)
        if (!out.p[i]) {  // an embedded NUL: U+FFFD
            byte_buf fixed = {0};
            for (size_t j = 0; j + 1 < out.len; j++) buf_append(&fixed, out.p[j] ? out.p + j : "\xEF\xBF\xBD", out.p[j] ? 1 : 3);
            buf_append(&fixed, "", 1);
            buf_free(&out);
            out = fixed;
            break;
        }
    return out.p;
}

static char **texts_of(const tokenizer *tk, const int32_t *ids, size_t n) {
    char **v = ep_malloc(sizeof(char *) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) v[i] = piece_text(tk, ids[i]);
    return v;
}

static void texts_free(char **v, size_t n) {
    for (size_t i = 0; v && i < n; i++) free(v[i]);
    free(v);
}

static void arrays_init(prompt_arrays *a, prompt *ps, int P, int K, int N, const prompt_params *pp) {
    memset(a, 0, sizeof *a);
    a->P = P, a->K = K, a->N = N;
    for (int p = 0; p < P; p++) {
        if (ps[p].len > a->L) a->L = ps[p].len;
        if (ps[p].n_target > a->T) a->T = ps[p].n_target;
    }
    size_t PL = (size_t)P * a->L;
    a->tokens = ep_malloc(sizeof(int32_t) * PL), a->types = ep_malloc(sizeof(int32_t) * PL);
    a->index = ep_malloc(sizeof(int32_t) * PL), a->donors = ep_malloc(sizeof(int32_t) * PL * (K ? K : 1));
    a->targets = ep_malloc(sizeof(int32_t) * (size_t)P * a->T), a->lengths = ep_malloc(sizeof(int32_t) * (size_t)P);
    a->target_lengths = ep_malloc(sizeof(int32_t) * (size_t)P);
    a->pair_ids = ep_malloc(sizeof(int32_t) * (size_t)P * (N + 1));
    a->donor_kinds = ep_malloc(sizeof(int32_t) * (size_t)(K ? K : 1));
    for (int d = 0; d < K; d++) a->donor_kinds[d] = (int32_t)pp->kinds[d];
    for (int p = 0; p < P; p++) {
        a->lengths[p] = ps[p].len;
        a->target_lengths[p] = ps[p].n_target;
        for (int i = 0; i < a->L; i++) {
            size_t at = (size_t)p * a->L + i;
            int in = i < ps[p].len;
            a->tokens[at] = in ? ps[p].tokens[i] : -1;
            a->types[at] = in ? ps[p].types[i] : -1;
            a->index[at] = in ? ps[p].index[i] : -1;
            for (int d = 0; d < K; d++) a->donors[((size_t)p * K + d) * a->L + i] = in ? ps[p].donors[(size_t)d * ps[p].len + i] : -1;
        }
        for (int i = 0; i < a->T; i++) a->targets[(size_t)p * a->T + i] = i < ps[p].n_target ? ps[p].target[i] : -1;
        for (int i = 0; i <= N; i++) a->pair_ids[(size_t)p * (N + 1) + i] = ps[p].pair_ids[i];
    }
}

static void arrays_texts(prompt_arrays *a, const tokenizer *tk) {
    a->token_text = texts_of(tk, a->tokens, (size_t)a->P * a->L);
    a->donor_text = texts_of(tk, a->donors, (size_t)a->P * a->K * a->L);
    a->target_text = texts_of(tk, a->targets, (size_t)a->P * a->T);
}

static void arrays_free(prompt_arrays *a) {
    texts_free(a->token_text, (size_t)a->P * a->L), texts_free(a->donor_text, (size_t)a->P * a->K * a->L);
    texts_free(a->target_text, (size_t)a->P * a->T);
    free(a->tokens), free(a->types), free(a->index), free(a->donors), free(a->targets), free(a->lengths);
    free(a->target_lengths), free(a->pair_ids), free(a->donor_kinds);
}

// The enum names prompts.h5 stores (attribute enum_names, index = value).
static void type_names_list(const char *out[TT_COUNT]) {
    for (int i = 0; i < TT_COUNT; i++) out[i] = token_type_name(i);
}

static int store_prompts(const char *path, const prompt_arrays *a, const run_config *cfg, const task *t,
                         const prompt_params *pp, uint64_t tok_hash, uint64_t inputs_hash, const char *report,
                         const char *task_path, const char *tokenizer_path, ep_error *err) {
    h5store s;
    if (h5store_create(path, &s, err)) return -1;
    h5shape pl = {2, {a->P, a->L}}, p1 = {1, {a->P}}, pkl = {3, {a->P, a->K, a->L}}, pt = {2, {a->P, a->T}},
            pn = {2, {a->P, a->N + 1}}, k1 = {1, {a->K}};
    char hex[3][17], kinds[256] = "";
    hash_hex(tok_hash, hex[0]), hash_hex(cfg->hash, hex[1]), hash_hex(inputs_hash, hex[2]);
    for (int d = 0; d < a->K; d++) {
        if (d) strcat(kinds, ",");
        strcat(kinds, donor_kind_name(pp->kinds[d]));
    }
    char types[128] = "";
    const char *type_list[TT_COUNT], *kind_list[DONOR_KIND_COUNT];
    type_names_list(type_list);
    for (int i = 0; i < DONOR_KIND_COUNT; i++) kind_list[i] = donor_kind_name((donor_kind)i);
    for (int i = 0; i < TT_COUNT; i++) {
        if (i) strcat(types, ",");
        strcat(types, token_type_name(i));
    }
    int rc = h5store_write_i32(&s, "tokens", &pl, a->tokens, err) || h5store_label(&s, "tokens", "prompt,position", err) ||
             h5store_write_i32(&s, "types", &pl, a->types, err) || h5store_label(&s, "types", "prompt,position", err) ||
             h5store_set_strs_at(&s, "types", "enum_names", type_list, TT_COUNT, err) ||
             h5store_write_i32(&s, "index", &pl, a->index, err) || h5store_label(&s, "index", "prompt,position", err) ||
             h5store_write_i32(&s, "lengths", &p1, a->lengths, err) || h5store_label(&s, "lengths", "prompt", err) ||
             h5store_write_str(&s, "token_text", &pl, (const char *const *)a->token_text, err) ||
             h5store_label(&s, "token_text", "prompt,position", err) ||
             (a->K && (h5store_write_i32(&s, "donors", &pkl, a->donors, err) ||
                       h5store_label(&s, "donors", "prompt,donor,position", err) ||
                       h5store_write_str(&s, "donor_text", &pkl, (const char *const *)a->donor_text, err) ||
                       h5store_label(&s, "donor_text", "prompt,donor,position", err) ||
                       h5store_write_i32(&s, "donor_kinds", &k1, a->donor_kinds, err) ||
                       h5store_label(&s, "donor_kinds", "donor", err) ||
                       h5store_set_strs_at(&s, "donor_kinds", "enum_names", kind_list, DONOR_KIND_COUNT, err))) ||
             h5store_write_i32(&s, "targets", &pt, a->targets, err) || h5store_label(&s, "targets", "prompt,target_position", err) ||
             h5store_write_str(&s, "target_text", &pt, (const char *const *)a->target_text, err) ||
             h5store_label(&s, "target_text", "prompt,target_position", err) ||
             h5store_write_i32(&s, "target_lengths", &p1, a->target_lengths, err) ||
             h5store_label(&s, "target_lengths", "prompt", err) ||
             h5store_write_i32(&s, "pair_ids", &pn, a->pair_ids, err) || h5store_label(&s, "pair_ids", "prompt,example", err) ||
             h5store_set_str(&s, "format", PROMPTS_FORMAT, err) || h5store_set_str(&s, "task", t->name, err) ||
             h5store_set_str(&s, "task_path", task_path, err) ||
             h5store_set_str(&s, "tokenizer_path", tokenizer_path, err) ||
             h5store_set_str(&s, "tokenizer_hash", hex[0], err) || h5store_set_str(&s, "config_hash", hex[1], err) ||
             h5store_set_str(&s, "inputs_hash", hex[2], err) || h5store_set_i64(&s, "seed", (int64_t)cfg->seed, err) ||
             h5store_set_i64(&s, "n_prompts", a->P, err) || h5store_set_i64(&s, "n_shots", a->N, err) ||
             h5store_set_i64(&s, "n_donors", a->K, err) || h5store_set_str(&s, "type_names", types, err) ||
             h5store_set_str(&s, "donor_kind_names", kinds, err) ||
             h5store_set_str(&s, "edgepatch_version", EP_VERSION, err) ||
             h5store_set_str(&s, "tokenize_report", report, err);
    if (rc) {
        h5store_abandon(&s);
        return -1;
    }
    return h5store_commit(&s, err);
}

// path as an absolute path with no ".", ".." or symbolic links (realpath), or a copy of path when that fails.
static char *normalized(const char *path) {
    char *real = realpath(path, NULL);
    return real ? real : ep_strdup(path);
}

int tokenize_stage(const run_config *cfg, int fresh, const ep_log *log, ep_error *err) {
    task t;
    if (task_load(cfg->task, &t, err)) return ep_wrap(err, "%s: field task", cfg->path);
    prompt_params pp = {.seed = cfg->seed, .n_shots = cfg->n_shots >= 0 ? cfg->n_shots : t.n_shots, .n_donors = cfg->n_donors};
    for (int d = 0; d < pp.n_donors; d++) {
        if (cfg->donor_kinds[d][0]) {
            if (donor_kind_parse(cfg->donor_kinds[d], &pp.kinds[d])) {
                task_free(&t);
                return ep_fail(err, "%s: field donors[%d]: unknown donor kind '%s'", cfg->path, d, cfg->donor_kinds[d]);
            }
        } else if (d < t.n_kinds) {
            pp.kinds[d] = t.kinds[d];
        } else {
            task_free(&t);
            return ep_fail(err, "%s: field donors: %d donors asked, task %s offers %d kinds", cfg->path, pp.n_donors, t.name,
                           t.n_kinds);
        }
    }
    for (int d = 0; d < pp.n_donors; d++)
        if (task_check_kind(&t, pp.kinds[d], err)) {
            task_free(&t);
            return ep_wrap(err, "%s: field donors[%d]", cfg->path, d);
        }
    // The identity of everything this stage reads, to skip or refuse a rerun.
    uint64_t tok_hash = 0, task_hash = 0, inputs = HASH_INIT;
    tokenizer *tk = NULL;
    word_list words = {0};
    prompt_builder b = {0};
    prompt *ps = NULL;
    char path[4096];
    int rc = -1;
    if (hash_tokenizer(cfg->tokenizer_path, &tok_hash, err) || hash_file(t.path, &task_hash, err)) goto done;
    inputs = hash_bytes(inputs, &tok_hash, sizeof tok_hash);
    inputs = hash_bytes(inputs, &task_hash, sizeof task_hash);
    for (int i = 0; i < t.n_donor_tasks; i++) {  // the donor tasks' files (none: the hash of older runs)
        uint64_t h = 0;
        if (hash_file(t.donor_task_paths[i], &h, err)) goto done;
        inputs = hash_bytes(inputs, &h, sizeof h);
    }
    inputs = hash_bytes(inputs, &pp.seed, sizeof pp.seed);
    inputs = hash_bytes(inputs, &pp.n_shots, sizeof pp.n_shots);
    inputs = hash_bytes(inputs, &pp.n_donors, sizeof pp.n_donors);
    inputs = hash_bytes(inputs, pp.kinds, sizeof pp.kinds[0] * (size_t)pp.n_donors);
    inputs = hash_bytes(inputs, &cfg->n_prompts, sizeof cfg->n_prompts);
    if (make_dirs(cfg->output_path, err)) goto done;
    snprintf(path, sizeof path, "%s/prompts.h5", cfg->output_path);
    if (!fresh && access(path, F_OK) == 0) {
        // prompts.h5 is derived data: unreadable, unfinished or failing a checksum, it is rebuilt; sound
        // but made from other inputs, it is refused.
        h5store s;
        char *have = NULL, *report = NULL, want[17], report_path[4200];
        hash_hex(inputs, want);
        snprintf(report_path, sizeof report_path, "%s/tokenize_report.json", cfg->output_path);
        if (h5store_open(path, &s, err) == 0) {
            int sound = 1;  // the seal covers every byte (pipeline/h5store.h)
            char *format = NULL;
            // An older layout (format edgepatch-prompts-1) is rebuilt, as a damaged file is (same inputs).
            if (h5store_get_str(&s, "format", &format, err) || strcmp(format, PROMPTS_FORMAT)) {
                sound = 0;
                ep_fail(err, "%s: format %s, this edgepatch writes %s (an older layout)", path, format ? format : "missing",
                        PROMPTS_FORMAT);
            }
            free(format);
            int same = sound && h5store_get_str(&s, "inputs_hash", &have, err) == 0 && !strcmp(have, want);
            int has_report = same && h5store_get_str(&s, "tokenize_report", &report, err) == 0;
            free(have);
            h5store_close(&s);
            if (sound && !same) {
                ep_fail(err, "%s: made from other inputs (task, tokenizer or config changed); rerun with --fresh to rebuild it", path);
                goto done;
            }
            if (has_report) {
                if (!file_holds(report_path, report)) {
                    ep_logf(log, EP_LOG_WARN, "tokenize: rebuilding %s: %s", report_path,
                            access(report_path, F_OK) ? "missing" : "not the report prompts.h5 was made with (damaged?)");
                    rc = write_text_atomic(report_path, report, err);
                    free(report);
                    if (rc) goto done;
                } else {
                    free(report);
                }
                ep_log_result(log, "tokenize: %s is up to date", path);
                rc = 0;
                goto done;
            }
            if (same) ep_fail(err, "%s: attribute tokenize_report is missing (made by an older edgepatch)", path);
        }
        // An unreadable, incomplete or corrupted file is rebuilt, never trusted.
        ep_logf(log, EP_LOG_WARN, "tokenize: rebuilding %s: %s", path, err->msg);
    }
    if (tokenizer_load(cfg->tokenizer_path, &tk, err)) goto done;
    int needs_words = 0;
    for (int d = 0; d < pp.n_donors; d++)
        needs_words |= pp.kinds[d] == DONOR_RANDOM_XY || pp.kinds[d] == DONOR_RANDOM_X || pp.kinds[d] == DONOR_RANDOM_Y;
    if (needs_words) {
        if (!t.words_path) {
            ep_fail(err, "%s: field words: random-word donors need a word list", t.path);
            goto done;
        }
        if (word_list_load(t.words_path, &words, err)) goto done;
    }
    if (prompt_builder_init(&b, &t, tk, needs_words ? &words : NULL, err)) goto done;
    ps = ep_calloc((size_t)cfg->n_prompts, sizeof(prompt));
    for (int p = 0; p < cfg->n_prompts; p++)
        if (prompt_build(&b, &pp, p, &ps[p], err)) goto done;
    prompt_arrays a;
    arrays_init(&a, ps, cfg->n_prompts, pp.n_donors, pp.n_shots, &pp);
    arrays_texts(&a, tk);
    // Stored normalized (absolute, no links): the same wherever the run folder is moved or copied to.
    char *task_path = normalized(t.path), *tokenizer_path = normalized(cfg->tokenizer_path);
    char *report = report_text(&t, tokenizer_path, &b.report), report_path[4200];
    snprintf(report_path, sizeof report_path, "%s/tokenize_report.json", cfg->output_path);
    rc = store_prompts(path, &a, cfg, &t, &pp, tok_hash, inputs, report, task_path, tokenizer_path, err);
    free(task_path), free(tokenizer_path);
    arrays_free(&a);
    if (rc == 0) rc = write_text_atomic(report_path, report, err);
    free(report);
    if (rc == 0)
        ep_log_result(log, "tokenize: %s: %d of %d pairs kept, %d prompts with %d donors -> %s", t.name,
                      b.report.pairs_kept, b.report.pairs_total, cfg->n_prompts, pp.n_donors, path);
done:
    if (ps)
        for (int p = 0; p < cfg->n_prompts; p++) prompt_free(&ps[p]);
    free(ps);
    prompt_builder_free(&b);
    word_list_free(&words);
    if (tk) tokenizer_free(tk);
    task_free(&t);
    return rc;
}

// 1 if sh is [d0] / [d0, d1] / [d0, d1, d2] (rank dims given).
static int shape_is(const h5shape *sh, int rank, int64_t d0, int64_t d1, int64_t d2) {
    const int64_t want[3] = {d0, d1, d2};
    if (sh->rank != rank) return 0;
    for (int d = 0; d < rank; d++)
        if (sh->dims[d] != want[d]) return 0;
    return 1;
}

// The datasets agree with each other and with what later stages index by them (every count, length,
// type and donor kind in range), so no reader of a loaded set goes out of bounds.
static int prompt_set_check(const char *path, const prompt_set *ps, ep_error *err) {
    const int P = ps->n_prompts, L = ps->max_len;
    for (int p = 0; p < P; p++) {
        if (ps->lengths[p] < 1 || ps->lengths[p] > L)
            return ep_fail(err, "%s: dataset lengths: prompt %d has length %d, not 1..%d", path, p, ps->lengths[p], L);
        if (ps->target_lengths[p] < 0 || ps->target_lengths[p] > ps->max_target)
            return ep_fail(err, "%s: dataset target_lengths: prompt %d has %d, not 0..%d", path, p, ps->target_lengths[p],
                           ps->max_target);
        for (int i = 0; i < ps->lengths[p]; i++) {
            size_t at = (size_t)p * L + i;
            if (ps->tokens[at] < 0) return ep_fail(err, "%s: dataset tokens: prompt %d position %d: negative id", path, p, i);
            if (ps->types[at] < 0 || ps->types[at] >= TT_COUNT)
                return ep_fail(err, "%s: dataset types: prompt %d position %d: type %d, not 0..%d", path, p, i, ps->types[at],
                               TT_COUNT - 1);
            for (int d = 0; d < ps->n_donors; d++)
                if (ps->donors[((size_t)p * ps->n_donors + d) * L + i] < 0)
                    return ep_fail(err, "%s: dataset donors: prompt %d donor %d position %d: negative id", path, p, d, i);
        }
        for (int j = 0; j < ps->target_lengths[p]; j++)
            if (ps->targets[(size_t)p * ps->max_target + j] < 0)
                return ep_fail(err, "%s: dataset targets: prompt %d: negative id", path, p);
    }
    for (int d = 0; d < ps->n_donors; d++)
        if (ps->donor_kinds[d] < 0 || ps->donor_kinds[d] >= DONOR_KIND_COUNT)
            return ep_fail(err, "%s: dataset donor_kinds: donor %d has kind %d, not 0..%d", path, d, ps->donor_kinds[d],
                           DONOR_KIND_COUNT - 1);
    return 0;
}

int prompt_set_load(const char *path, prompt_set *ps, ep_error *err) {
    memset(ps, 0, sizeof *ps);
    h5store s;
    if (h5store_open(path, &s, err)) return -1;
    h5shape sh;
    char *format = NULL;
    int rc = h5store_get_str(&s, "format", &format, err);
    // edgepatch-prompts-1 (no token texts) is still read: `show` of an old run folder decodes with its tokenizer.
    if (rc == 0 && strcmp(format, PROMPTS_FORMAT) && strcmp(format, "edgepatch-prompts-1"))
        rc = ep_fail(err, "%s: not a prompts file (format %s)", path, format);
    free(format);
    // Every dataset's shape is checked against tokens' [P, L] and the counts it fixes (K, T, N + 1).
#define SHAPE(name, ...) \
    if (rc == 0 && !shape_is(&sh, __VA_ARGS__)) rc = ep_fail(err, "%s: dataset %s: shape does not match tokens [%d, %d]", path, name, P, L)
    int P = 0, L = 0;
    if (rc == 0) rc = h5store_read_i32(&s, "tokens", &sh, &ps->tokens, err);
    if (rc == 0 && (sh.rank != 2 || sh.dims[0] > INT32_MAX || sh.dims[1] > INT32_MAX))
        rc = ep_fail(err, "%s: dataset tokens: expected [prompts, length]", path);
    if (rc == 0) {
        ps->n_prompts = P = (int)sh.dims[0];
        ps->max_len = L = (int)sh.dims[1];
    }
    if (rc == 0) rc = h5store_read_i32(&s, "types", &sh, &ps->types, err);
    SHAPE("types", 2, P, L, 0);
    if (rc == 0) rc = h5store_read_i32(&s, "index", &sh, &ps->index, err);
    SHAPE("index", 2, P, L, 0);
    if (rc == 0) rc = h5store_read_i32(&s, "lengths", &sh, &ps->lengths, err);
    SHAPE("lengths", 1, P, 0, 0);
    if (rc == 0 && h5store_has(&s, "donors")) {
        rc = h5store_read_i32(&s, "donors", &sh, &ps->donors, err);
        if (rc == 0 && (sh.rank != 3 || sh.dims[1] < 1 || sh.dims[1] > 16))
            rc = ep_fail(err, "%s: dataset donors: expected [prompts, 1..16 donors, length]", path);
        if (rc == 0) ps->n_donors = (int)sh.dims[1];
        SHAPE("donors", 3, P, ps->n_donors, L);
        if (rc == 0) rc = h5store_read_i32(&s, "donor_kinds", &sh, &ps->donor_kinds, err);
        SHAPE("donor_kinds", 1, ps->n_donors, 0, 0);
    }
    if (rc == 0) rc = h5store_read_i32(&s, "targets", &sh, &ps->targets, err);
    if (rc == 0 && (sh.rank != 2 || sh.dims[1] > INT32_MAX)) rc = ep_fail(err, "%s: dataset targets: expected [prompts, length]", path);
    if (rc == 0) ps->max_target = (int)sh.dims[1];
    SHAPE("targets", 2, P, ps->max_target, 0);
    if (rc == 0) rc = h5store_read_i32(&s, "target_lengths", &sh, &ps->target_lengths, err);
    SHAPE("target_lengths", 1, P, 0, 0);
    if (rc == 0) rc = h5store_read_i32(&s, "pair_ids", &sh, &ps->pair_ids, err);
    if (rc == 0 && (sh.rank != 2 || sh.dims[1] > INT32_MAX)) rc = ep_fail(err, "%s: dataset pair_ids: expected [prompts, examples]", path);
    if (rc == 0) ps->n_pairs = (int)sh.dims[1];
    SHAPE("pair_ids", 2, P, ps->n_pairs, 0);
#undef SHAPE
    if (rc == 0 && h5store_has(&s, "token_text")) {
        h5shape st;
        rc = h5store_read_str(&s, "token_text", &st, &ps->token_text, err);
        if (rc == 0 && !shape_is(&st, 2, P, L, 0)) rc = ep_fail(err, "%s: dataset token_text: shape does not match tokens [%d, %d]", path, P, L);
        if (rc == 0 && ps->n_donors) {
            rc = h5store_read_str(&s, "donor_text", &st, &ps->donor_text, err);
            if (rc == 0 && !shape_is(&st, 3, P, ps->n_donors, L))
                rc = ep_fail(err, "%s: dataset donor_text: shape does not match donors", path);
        }
        if (rc == 0) rc = h5store_read_str(&s, "target_text", &st, &ps->target_text, err);
        if (rc == 0 && !shape_is(&st, 2, P, ps->max_target, 0)) rc = ep_fail(err, "%s: dataset target_text: shape does not match targets", path);
    }
    if (rc == 0) rc = h5store_get_str(&s, "task", &ps->task, err);
    if (rc == 0) rc = h5store_get_str(&s, "tokenizer_path", &ps->tokenizer_path, err);
    h5store_close(&s);
    if (rc == 0) rc = prompt_set_check(path, ps, err);
    if (rc) prompt_set_free(ps);
    return rc;
}

void prompt_set_free(prompt_set *ps) {
    free(ps->tokens), free(ps->lengths), free(ps->types), free(ps->index), free(ps->donors), free(ps->targets);
    free(ps->target_lengths), free(ps->pair_ids), free(ps->donor_kinds), free(ps->task), free(ps->tokenizer_path);
    free(ps->token_text), free(ps->donor_text), free(ps->target_text);
    memset(ps, 0, sizeof *ps);
}
