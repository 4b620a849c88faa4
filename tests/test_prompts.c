// Tasks and prompts on real tokenizers (Gemma-2, Llama-3, Phi-2) and the tiny models' trained ones:
// - the clean-tokenization filter agrees pair by pair (and reason by reason) with HF tokenizers
//   (tests/fixtures/tasks/filter.json.gz from tools/gen_task_fixtures.py);
// - every position of every prompt is typed in the order bos* (x+ t+ y+ n+){N} query+ last+;
// - the prompt's text rebuilt here from its pairs tokenizes to exactly its tokens;
// - donor invariants for every kind; the target is the query's output; for the donor families
//   (other_task_x/y, other_mapping/_x), per demonstration by brute force over the task files: the factor
//   kept is kept, the one changed is changed (from the right space, mapping broken), with planted errors;
// - the same seed gives identical prompts in any build order, another seed different ones.
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "pipeline/tokenizer.h"
#include "stages/prompts.h"
#include "stages/task.h"
#include "tests/harness.h"

static json_t *load_gz_json(const char *path) {
    gzFile f = gzopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    int got;
    while ((got = gzread(f, buf + n, (unsigned)(cap - n))) > 0) {
        n += (size_t)got;
        if (n == cap) buf = realloc(buf, cap *= 2);
    }
    gzclose(f);
    json_t *j = json_loadb(buf, n, 0, NULL);
    free(buf);
    return j;
}

static int span_equal(const prompt *p, const int *donor, int type) {
    for (int i = 0; i < p->len; i++)
        if (p->types[i] == type && donor[i] != p->tokens[i]) return 0;
    return 1;
}

// The structure bos* (x+ t+ y+ n+){N} query+ last+ with example indices.
static int check_layout(const prompt *p, int N) {
    int i = 0;
    while (i < p->len && p->types[i] == TT_BOS) {
        if (p->index[i] != -1) return 0;
        i++;
    }
    int order[4] = {TT_X, TT_T, TT_Y, TT_N};
    for (int k = 0; k < N; k++)
        for (int s = 0; s < 4; s++) {
            int start = i;
            while (i < p->len && p->types[i] == order[s] && p->index[i] == k) i++;
            if (i == start) return 0;
        }
    for (int s = 0; s < 2; s++) {
        int start = i;
        while (i < p->len && p->types[i] == (s ? TT_LAST : TT_QUERY) && p->index[i] == N) i++;
        if (i == start) return 0;
    }
    return i == p->len;
}

static const task_pair *pair_text(const task *t, int id) { return id >= 0 ? &t->pairs[id] : &t->ambiguous[-id - 1]; }

// Rebuilds the prompt's text from its pairs, independently of the builder, and tokenizes it whole.
static int text_matches(const task *t, const tokenizer *tk, const prompt *p, int N) {
    size_t cap = 1 << 14, n = 0;
    char *text = malloc(cap);
    text[0] = 0;
    for (int k = 0; k <= N; k++) {
        const task_pair *tp = pair_text(t, p->pair_ids[k]);
        n += (size_t)snprintf(text + n, cap - n, "%s%s", tp->x, t->separator);
        if (k < N) n += (size_t)snprintf(text + n, cap - n, "%s%s%s", t->output_prefix, tp->y, t->example_separator);
    }
    int *ids = NULL, nids = 0;
    ep_error err;
    int ok = tokenizer_encode(tk, text, strlen(text), 1, &ids, &nids, &err) == 0 && nids == p->len &&
             !memcmp(ids, p->tokens, sizeof(int) * (size_t)nids);
    free(ids), free(text);
    return ok;
}

// Donor tokens decoded and re-encoded give themselves back: the donor is a real, cleanly tokenized text.
static int donor_round_trips(const tokenizer *tk, const int *donor, int len, int n_prefix) {
    char *text = NULL;
    size_t tlen = 0;
    int *ids = NULL, nids = 0;
    ep_error err;
    int ok = tokenizer_decode(tk, donor + n_prefix, len - n_prefix, 0, &text, &tlen, &err) == 0 &&
             tokenizer_encode(tk, text, tlen, 1, &ids, &nids, &err) == 0 && nids == len &&
             !memcmp(ids, donor, sizeof(int) * (size_t)len);
    free(text), free(ids);
    return ok;
}

// The tokens of example k's x (type TT_X) or y span in a donor row, and where the span starts.
static int span_of(const prompt *p, int type, int k, int *start) {
    int n = 0;
    *start = -1;
    for (int i = 0; i < p->len; i++)
        if (p->types[i] == type && p->index[i] == k) {
            if (*start < 0) *start = i;
            n++;
        }
    return n;
}

static int tokens_are(const int *a, const int *b, int n) { return !memcmp(a, b, sizeof(int) * (size_t)n); }

static int is_text_of(const task *t, int ylike, const char *s) {
    for (int i = 0; i < t->n_pairs; i++)
        if (!strcasecmp(s, ylike ? t->pairs[i].y : t->pairs[i].x)) return 1;
    for (int i = 0; i < t->n_ambiguous; i++)
        if (!strcasecmp(s, ylike ? t->ambiguous[i].y : t->ambiguous[i].x)) return 1;
    return 0;
}

// 1 if s is a donor task's input (ylike = 0) or output, or two of them joined by a space.
static int from_donor_tasks(const task *t, int ylike, const char *s) {
    for (int i = 0; i < t->n_donor_pairs; i++)
        if (!strcmp(s, ylike ? t->donor_pairs[i].y : t->donor_pairs[i].x)) return 1;
    for (const char *sp = strchr(s, ' '); sp; sp = strchr(sp + 1, ' ')) {
        char head[512];
        snprintf(head, sizeof head, "%.*s", (int)(sp - s), s);
        int a = 0, c = 0;
        for (int i = 0; i < t->n_donor_pairs; i++) {
            a |= !strcmp(head, ylike ? t->donor_pairs[i].y : t->donor_pairs[i].x);
            c |= !strcmp(sp + 1, ylike ? t->donor_pairs[i].y : t->donor_pairs[i].x);
        }
        if (a && c) return 1;
    }
    return 0;
}

// 1 if demonstration k's changed span (y for other_task_y / other_mapping, else x) has a single-item
// candidate of its token length: a donor-task item that is no text of this task, or a pair of the task
// outside the prompt whose output differs from the demonstration's.
static int candidate_exists(const prompt_builder *b, const prompt *p, donor_kind kind, int k) {
    const task *t = b->task;
    int ylike = kind == DONOR_OTHER_TASK_Y || kind == DONOR_OTHER_MAPPING, st, cn = span_of(p, ylike ? TT_Y : TT_X, k, &st);
    const task_pair *clean = pair_text(t, p->pair_ids[k]);
    if (kind == DONOR_OTHER_TASK_X || kind == DONOR_OTHER_TASK_Y) {
        for (int i = 0; i < t->n_donor_pairs; i++)
            if (b->donor_tok[i].reason == PAIR_CLEAN && (ylike ? b->donor_tok[i].ny : b->donor_tok[i].nx) == cn &&
                !is_text_of(t, ylike, ylike ? t->donor_pairs[i].y : t->donor_pairs[i].x))
                return 1;
        return 0;
    }
    for (int c = 0; c < b->n_clean; c++) {
        int id = b->clean[c], in_prompt = 0;
        for (int u = 0; u < p->n_pairs; u++) in_prompt |= p->pair_ids[u] == id;
        if (!in_prompt && (ylike ? b->pairs[id].ny : b->pairs[id].nx) == cn && strcmp(t->pairs[id].y, clean->y)) return 1;
    }
    return 0;
}

// Brute-force check of the donor families on one donor row: per demonstration k, the span the kind
// keeps is the clean one, the span it changes is changed the way the kind says, and a span left as it
// is had nothing of its token length to become (the builder's own pools are not consulted: every
// candidate is enumerated from the task files). Returns the number of bad demonstrations.
static int family_bad(const prompt_builder *b, const tokenizer *tk, const prompt *p, const int *dt, donor_kind kind,
                      int *moved) {
    const task *t = b->task;
    int N = p->n_pairs - 1, bad = 0;
    for (int k = 0; k < N; k++) {
        int sx, sy, nx = span_of(p, TT_X, k, &sx), ny = span_of(p, TT_Y, k, &sy);
        int ylike = kind == DONOR_OTHER_TASK_Y || kind == DONOR_OTHER_MAPPING;
        int ks = ylike ? sx : sy, kn = ylike ? nx : ny;  // the span kept
        int cs = ylike ? sy : sx, cn = ylike ? ny : nx;  // the span changed
        if (!tokens_are(dt + ks, p->tokens + ks, kn)) {
            bad++;
            continue;
        }
        const task_pair *clean = pair_text(t, p->pair_ids[k]);
        if (tokens_are(dt + cs, p->tokens + cs, cn)) {  // unchanged: only if no candidate has this length
            bad += candidate_exists(b, p, kind, k);
            continue;
        }
        (*moved)++;
        char *text = NULL;
        size_t tlen = 0;
        ep_error err;
        if (tokenizer_decode(tk, dt + cs, cn, 0, &text, &tlen, &err)) {
            bad++;
            continue;
        }
        const char *s = text;
        size_t pre = strlen(t->output_prefix);
        if (ylike && !strncmp(s, t->output_prefix, pre)) s += pre;
        if (kind == DONOR_OTHER_TASK_X || kind == DONOR_OTHER_TASK_Y) {
            // another task's input (output) space, and none of this task's
            bad += !from_donor_tasks(t, ylike, s) || is_text_of(t, ylike, s);
        } else {
            // this task's space, one of its pairs outside the prompt, and no pair of the task maps the kept
            // input to the new output (other_mapping) or the new input to the kept output (other_mapping_x)
            int in_space = 0, mapped = 0;
            for (int i = 0; i < t->n_pairs; i++) {
                const char *v = ylike ? t->pairs[i].y : t->pairs[i].x;
                int in_prompt = 0;
                for (int u = 0; u < p->n_pairs; u++) in_prompt |= p->pair_ids[u] == i;
                in_space |= !strcmp(v, s) && !in_prompt;
                mapped |= ylike ? !strcmp(t->pairs[i].x, clean->x) && !strcmp(t->pairs[i].y, s)
                                : !strcmp(t->pairs[i].x, s) && !strcmp(t->pairs[i].y, clean->y);
            }
            bad += !in_space || mapped;
        }
        free(text);
    }
    return bad;
}

static int prompts_equal(const prompt *a, const prompt *b) {
    return a->len == b->len && !memcmp(a->tokens, b->tokens, sizeof(int) * (size_t)a->len) &&
           !memcmp(a->donors, b->donors, sizeof(int) * (size_t)a->len * (size_t)a->n_donors) &&
           !memcmp(a->pair_ids, b->pair_ids, sizeof(int) * (size_t)a->n_pairs);
}

static void test_tokenizer(const char *name, const char *dir, json_t *fixture, const word_list *words) {
    tokenizer *tk = NULL;
    ep_error err = {{0}};
    if (tokenizer_load(dir, &tk, &err)) {
        check(0, "%s", err.msg);
        return;
    }
    char **names;
    int n_tasks;
    // The tasks edgepatch lists are the ones the reference found in datasets/tasks (each is looked up below).
    size_t want_tasks = json_object_size(json_object_get(json_object_get(fixture, "results"), name));
    check(task_names(&names, &n_tasks, &err) == 0 && (size_t)n_tasks == want_tasks && n_tasks >= 7,
          "%s: %d tasks listed, %zu in the reference %s", name, n_tasks, want_tasks, err.msg);
    for (int ti = 0; ti < n_tasks; ti++) {
        task t;
        if (task_load(names[ti], &t, &err)) {
            check(0, "%s", err.msg);
            continue;
        }
        prompt_builder b;
        if (prompt_builder_init(&b, &t, tk, words, &err)) {
            check(0, "%s %s: %s", name, t.name, err.msg);
            task_free(&t);
            continue;
        }
        // Filter agreement with HF tokenizers.
        json_t *want = json_object_get(json_object_get(json_object_get(fixture, "results"), name), t.name);
        json_t *wp = json_object_get(want, "pairs"), *wa = json_object_get(want, "ambiguous");
        int disagree = 0;
        check((int)json_array_size(wp) == t.n_pairs && (int)json_array_size(wa) == t.n_ambiguous, "%s %s: fixture size",
              name, t.name);
        for (int i = 0; i < t.n_pairs && i < (int)json_array_size(wp); i++)
            disagree += (int)json_integer_value(json_array_get(wp, (size_t)i)) != (int)b.pairs[i].reason;
        for (int i = 0; i < t.n_ambiguous && i < (int)json_array_size(wa); i++)
            disagree += (int)json_integer_value(json_array_get(wa, (size_t)i)) != (int)b.ambiguous[i].reason;
        check(disagree == 0, "%s %s: filter disagrees with HF on %d pairs", name, t.name, disagree);

        // Prompts with one donor of every kind.
        prompt_params pp = {.seed = 7, .n_shots = t.n_shots, .n_donors = DONOR_KIND_COUNT};
        for (int d = 0; d < DONOR_KIND_COUNT; d++) pp.kinds[d] = (donor_kind)d;
        int family_moved[DONOR_KIND_COUNT] = {0}, planted = 0, planted_caught = 0;
        int n_prompts = 12, bad_layout = 0, bad_text = 0, bad_donor = 0, bad_target = 0, bad_pairs = 0;
        prompt ps[12];
        for (int p = 0; p < n_prompts; p++) {
            if (prompt_build(&b, &pp, p, &ps[p], &err)) {
                check(0, "%s %s: %s", name, t.name, err.msg);
                n_prompts = p;
                break;
            }
            prompt *pr = &ps[p];
            int N = pp.n_shots;
            bad_layout += !check_layout(pr, N);
            bad_text += !text_matches(&t, tk, pr, N);
            for (int k = 0; k < N; k++)
                bad_pairs += pr->pair_ids[k] == pr->pair_ids[N] || (pr->pair_ids[N] < 0);
            const task_pair *q = pair_text(&t, pr->pair_ids[N]);
            int *tids = NULL, ntids = 0;
            char qy[512];
            snprintf(qy, sizeof qy, "%s%s", t.output_prefix, q->y);
            tokenizer_encode(tk, qy, strlen(qy), 0, &tids, &ntids, &err);
            bad_target += ntids != pr->n_target || memcmp(tids, pr->target, sizeof(int) * (size_t)ntids) != 0;
            free(tids);
            for (int d = 0; d < pr->n_donors; d++) {
                const int *dt = pr->donors + (size_t)d * pr->len;
                int ok = span_equal(pr, dt, TT_BOS) && span_equal(pr, dt, TT_T) && span_equal(pr, dt, TT_N) &&
                         span_equal(pr, dt, TT_QUERY) && span_equal(pr, dt, TT_LAST);
                if (pp.kinds[d] == DONOR_RANDOM_Y || pp.kinds[d] == DONOR_SHUFFLE_Y) ok &= span_equal(pr, dt, TT_X);
                if (pp.kinds[d] == DONOR_RANDOM_X) ok &= span_equal(pr, dt, TT_Y);
                if (pp.kinds[d] >= DONOR_OTHER_TASK_X && pp.kinds[d] <= DONOR_OTHER_MAPPING_X) {  // the families: brute force per demonstration
                    int moved = 0;
                    ok &= family_bad(&b, tk, pr, dt, pp.kinds[d], &moved) == 0 && moved > 0;
                    family_moved[pp.kinds[d] - DONOR_OTHER_TASK_X] += moved;
                    // Can-fail siblings: the changed span put back where a candidate exists, or the kept span
                    // altered, is caught.
                    int *plant = malloc(sizeof(int) * (size_t)pr->len);
                    int ylike = pp.kinds[d] == DONOR_OTHER_TASK_Y || pp.kinds[d] == DONOR_OTHER_MAPPING, m2 = 0;
                    for (int k = 0; k < N; k++) {
                        int st, n = span_of(pr, ylike ? TT_Y : TT_X, k, &st), st2, n2 = span_of(pr, ylike ? TT_X : TT_Y, k, &st2);
                        if (tokens_are(dt + st, pr->tokens + st, n) || !candidate_exists(&b, pr, pp.kinds[d], k))
                            continue;  // left as it was, or (a two-item join) could have been: try the next
                        memcpy(plant, dt, sizeof(int) * (size_t)pr->len);
                        memcpy(plant + st, pr->tokens + st, sizeof(int) * (size_t)n);
                        planted_caught += family_bad(&b, tk, pr, plant, pp.kinds[d], &m2) > 0;
                        memcpy(plant, dt, sizeof(int) * (size_t)pr->len);
                        plant[st2 + n2 - 1] = dt[st];  // the kept span altered
                        if (plant[st2 + n2 - 1] == pr->tokens[st2 + n2 - 1]) plant[st2 + n2 - 1]++;
                        planted_caught += family_bad(&b, tk, pr, plant, pp.kinds[d], &m2) > 0;
                        planted += 2;
                        break;
                    }
                    free(plant);
                }
                if (pp.kinds[d] == DONOR_MEAN) ok &= memcmp(dt, pr->tokens, sizeof(int) * (size_t)pr->len) == 0;
                else if (pp.kinds[d] != DONOR_SHUFFLE_Y) ok &= memcmp(dt, pr->tokens, sizeof(int) * (size_t)pr->len) != 0;
                if (pp.kinds[d] == DONOR_SHUFFLE_Y) {  // the same y tokens, permuted: equal sums per length
                    long sum_clean = 0, sum_donor = 0;
                    for (int i = 0; i < pr->len; i++)
                        if (pr->types[i] == TT_Y) sum_clean += pr->tokens[i], sum_donor += dt[i];
                    ok &= sum_clean == sum_donor;
                }
                ok &= donor_round_trips(tk, dt, pr->len, b.n_prefix);
                bad_donor += !ok;
            }
        }
        check(bad_layout == 0 && bad_text == 0 && bad_donor == 0 && bad_target == 0 && bad_pairs == 0,
              "%s %s: layout %d, text %d, donors %d, target %d, pairs %d bad", name, t.name, bad_layout, bad_text,
              bad_donor, bad_target, bad_pairs);
        check(planted == 2 * 4 * n_prompts && planted_caught == planted, "%s %s: %d of %d planted family errors caught",
              name, t.name, planted_caught, planted);
        printf("  %-12s %-24s kept %3d/%3d (HF agrees on all), %d prompts x %d donors ok; redrawn %d+%d; families moved "
               "%d/%d/%d/%d spans (%d left), %d/%d plants caught\n",
               name, t.name, b.report.pairs_kept, b.report.pairs_total, n_prompts, pp.n_donors, b.report.prompts_rejected,
               b.report.donors_unaligned, family_moved[0], family_moved[1], family_moved[2], family_moved[3],
               b.report.spans_unmoved, planted_caught, planted);

        // Determinism: prompt 5 alone, from a fresh builder, equals prompt 5 built after 0..4; another seed
        // gives another prompt 0.
        prompt_builder b2;
        prompt again, other;
        prompt_params pp2 = pp;
        pp2.seed = 8;
        if (n_prompts > 5 && prompt_builder_init(&b2, &t, tk, words, &err) == 0) {
            check(prompt_build(&b2, &pp, 5, &again, &err) == 0 && prompts_equal(&again, &ps[5]), "%s %s: prompt 5 "
                  "depends on build order", name, t.name);
            check(prompt_build(&b2, &pp2, 0, &other, &err) == 0 && !prompts_equal(&other, &ps[0]), "%s %s: seed ignored",
                  name, t.name);
            prompt_free(&again), prompt_free(&other);
            prompt_builder_free(&b2);
        }
        for (int p = 0; p < n_prompts; p++) prompt_free(&ps[p]);
        prompt_builder_free(&b);
        task_free(&t);
    }
    task_names_free(names, n_tasks);
    tokenizer_free(tk);
}

int main(void) {
    json_t *fixture = load_gz_json("tests/fixtures/tasks/filter.json.gz");
    check(fixture != NULL, "cannot read tests/fixtures/tasks/filter.json.gz");
    word_list words;
    ep_error err = {{0}};
    check(word_list_load("datasets/words/american-english-small", &words, &err) == 0, "%s", err.msg);
    // A line longer than the loader's buffer is one (unusable) line, not a word plus its fragments.
    {
        char wpath[64];
        snprintf(wpath, sizeof wpath, "/tmp/ep_test_words_%d", (int)getpid());
        FILE *wf = fopen(wpath, "w");
        fputs("ab\n", wf);
        for (int i = 0; i < 300; i++) fputc('a', wf);
        fputs("\ncd\nEf\nx\n", wf);
        fclose(wf);
        word_list w;
        int rc = word_list_load(wpath, &w, &err);
        check(rc == 0 && w.n == 2 && !strcmp(w.words[0], "ab") && !strcmp(w.words[1], "cd"),
              "word list with a 300-letter line: %d words (want ab, cd)", rc == 0 ? w.n : -1);
        word_list_free(&w);
        unlink(wpath);
    }
    // Every 6th word is plenty for the invariants and keeps the sanitizer build quick.
    for (int i = 0; i < words.n; i++)
        if (i % 6) free(words.words[i]);
    for (int i = 0; i * 6 < words.n; i++) words.words[i] = words.words[i * 6];
    words.n = (words.n + 5) / 6;
    const char *names[] = {"gemma-2", "llama-3", "phi-2", "gemma2-tiny", "llama3-tiny", "phi2-tiny", "smollm-tiny"};
    json_t *paths = json_object_get(fixture, "paths");
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        char dir[512];
        snprintf(dir, sizeof dir, "%s", json_string_value(json_object_get(paths, names[i])));
        *strrchr(dir, '/') = 0;
        test_tokenizer(names[i], dir, fixture, &words);
    }
    // donor_tasks is checked at task load: an unknown task, the task itself, or a family kind without donor
    // tasks is one error naming the file and the field; a good list loads the donor tasks' pairs.
    {
        const char *cases[][2] = {
            {"[\"no_such_task\"]", "field donor_tasks[0]: unknown task 'no_such_task'"},
            {"[\"./self.json\"]", "is this task itself"},
            {"3", "field donor_tasks: expected a list"},
            {NULL, "field donor_tasks: donor kind other_task_y"},
            {"[\"country_capital\"]", NULL},
        };
        char dir[64], path[128], pairs[128];
        snprintf(dir, sizeof dir, "/tmp/ep_test_donor_tasks_%d", (int)getpid());
        snprintf(path, sizeof path, "%s/self.json", dir);
        snprintf(pairs, sizeof pairs, "%s/p.json", dir);
        check(mkdir(dir, 0700) == 0, "mkdir %s", dir);
        FILE *pf = fopen(pairs, "w");
        fputs("[{\"input\": \"a\", \"output\": \"b\"}, {\"input\": \"c\", \"output\": \"d\"}]", pf);
        fclose(pf);
        for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
            FILE *f = fopen(path, "w");
            fprintf(f, "{\"name\": \"self\", \"pairs\": \"p.json\", \"donor_kinds\": [\"random_xy\", \"other_task_y\"]%s%s}",
                    cases[c][0] ? ", \"donor_tasks\": " : "", cases[c][0] ? cases[c][0] : "");
            fclose(f);
            task dt;
            ep_error terr = {{0}};
            int rc = task_load(path, &dt, &terr);
            if (cases[c][1])
                check(rc != 0 && strstr(terr.msg, path) && strstr(terr.msg, cases[c][1]) && !strchr(terr.msg, '\n'),
                      "donor_tasks case %zu: %s", c, rc ? terr.msg : "loaded");
            else
                check(rc == 0 && dt.n_donor_tasks == 1 && dt.n_donor_pairs > 100 && task_check_kind(&dt, DONOR_OTHER_TASK_X, &terr) == 0,
                      "donor_tasks case %zu: %s", c, rc ? terr.msg : "pairs not loaded");
            if (rc == 0) task_free(&dt);
        }
        unlink(path), unlink(pairs), rmdir(dir);
    }
    // Can-fail sibling: a flipped fixture entry must show as a disagreement.
    task t;
    tokenizer *tk;
    prompt_builder b;
    if (task_load("country_capital", &t, &err) == 0 && tokenizer_load("tests/fixtures/models/gemma2-tiny", &tk, &err) == 0) {
        prompt_builder_init(&b, &t, tk, NULL, &err);
        json_t *wp = json_object_get(json_object_get(json_object_get(json_object_get(fixture, "results"), "gemma2-tiny"),
                                                     "country_capital"), "pairs");
        int differs = 0;
        for (int i = 0; i < t.n_pairs; i++)
            differs += (json_integer_value(json_array_get(wp, (size_t)i)) == 0) != (b.pairs[i].reason == PAIR_CLEAN);
        check(differs == 0 && b.report.pairs_kept < t.n_pairs, "gemma2-tiny drops some country_capital pairs");
        b.pairs[0].reason = b.pairs[0].reason == PAIR_CLEAN ? PAIR_X_T : PAIR_CLEAN;
        check((json_integer_value(json_array_get(wp, 0)) == 0) != (b.pairs[0].reason == PAIR_CLEAN),
              "a flipped filter result is noticed");
        prompt_builder_free(&b);
        tokenizer_free(tk);
        task_free(&t);
    }
    word_list_free(&words);
    json_decref(fixture);
    return test_finish("test_prompts");
}
