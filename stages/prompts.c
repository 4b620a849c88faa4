#include "prompts.h"

#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "pipeline/rng.h"

static const char *type_names[TT_COUNT] = {"bos", "x", "t", "y", "n", "query", "last", "target"};
static const char *reason_names[PAIR_REASON_COUNT] = {
    "clean",
    "empty input or output",
    "input merges with the separator",
    "separator merges with the output",
    "output merges with the example separator",
    "example separator merges with the input",
    "tokenizes differently inside a prompt",
};

const char *token_type_name(int type) { return type >= 0 && type < TT_COUNT ? type_names[type] : "?"; }

int token_type_parse(const char *s, token_type *out) {
    for (int t = 0; t < TT_COUNT; t++)
        if (!strcmp(s, type_names[t])) {
            *out = (token_type)t;
            return 0;
        }
    if (!strcmp(s, "last_separator")) {  // the original code's name for `last`
        *out = TT_LAST;
        return 0;
    }
    return -1;
}

const char *pair_reason_name(pair_reason r) { return r < PAIR_REASON_COUNT ? reason_names[r] : "?"; }

// Growable int array and string, for assembling prompts.
typedef struct {
    int *v, n, cap;
} ivec;

static void ivec_push(ivec *a, int x) {
    if (a->n == a->cap) a->v = ep_realloc(a->v, sizeof(int) * (size_t)(a->cap = a->cap ? 2 * a->cap : 64));
    a->v[a->n++] = x;
}

typedef struct {
    char *s;
    size_t n, cap;
} sbuf;

static void sbuf_add(sbuf *b, const char *s) {
    size_t len = strlen(s);
    if (b->n + len + 1 > b->cap) b->s = ep_realloc(b->s, b->cap = 2 * (b->n + len + 1));
    memcpy(b->s + b->n, s, len + 1);
    b->n += len;
}

static int encode(const prompt_builder *b, const char *text, int add_special, int **ids, int *n, ep_error *err) {
    return tokenizer_encode(b->tk, text, strlen(text), add_special, ids, n, err);
}

static int same(const int *a, int na, const int *b, int nb) {
    return na == nb && (na == 0 || !memcmp(a, b, sizeof(int) * (size_t)na));
}

// 1 if enc(concatenation of parts) equals the concatenation of the parts' token lists.
static int joins_cleanly(const prompt_builder *b, int n_parts, const char **texts, int *const *ids, const int *n_ids,
                         ep_error *err, int *clean) {
    sbuf text = {0};
    ivec want = {0};
    for (int i = 0; i < n_parts; i++) {
        sbuf_add(&text, texts[i]);
        for (int j = 0; j < n_ids[i]; j++) ivec_push(&want, ids[i][j]);
    }
    int *got = NULL, n_got = 0;
    int rc = encode(b, text.s, 0, &got, &n_got, err);
    *clean = rc == 0 && same(got, n_got, want.v, want.n);
    free(got), free(text.s), free(want.v);
    return rc;
}

static int pair_tokenize(prompt_builder *b, const char *x, const char *y, pair_tokens *pt, ep_error *err) {
    const task *t = b->task;
    memset(pt, 0, sizeof *pt);
    sbuf py = {0};
    sbuf_add(&py, t->output_prefix);
    sbuf_add(&py, y);
    int rc = encode(b, x, 0, &pt->x, &pt->nx, err);
    if (rc == 0) rc = encode(b, py.s, 0, &pt->y, &pt->ny, err);
    if (rc) {
        free(py.s);
        return -1;
    }
    pt->reason = PAIR_CLEAN;
    if (pt->nx == 0 || pt->ny == 0) pt->reason = PAIR_EMPTY;
    const char *sep = t->separator, *nl = t->example_separator;
    struct {
        int n;
        const char *texts[5];
        int *ids[5];
        int n_ids[5];
        pair_reason reason;
    } tests[5] = {
        {2, {x, sep}, {pt->x, b->t_ids}, {pt->nx, b->n_t}, PAIR_X_T},
        {2, {sep, py.s}, {b->t_ids, pt->y}, {b->n_t, pt->ny}, PAIR_T_Y},
        {2, {py.s, nl}, {pt->y, b->n_ids}, {pt->ny, b->n_n}, PAIR_Y_N},
        {2, {nl, x}, {b->n_ids, pt->x}, {b->n_n, pt->nx}, PAIR_N_X},
        {5, {nl, x, sep, py.s, nl}, {b->n_ids, pt->x, b->t_ids, pt->y, b->n_ids}, {b->n_n, pt->nx, b->n_t, pt->ny, b->n_n},
         PAIR_CONTEXT},
    };
    for (int i = 0; i < 5 && pt->reason == PAIR_CLEAN && rc == 0; i++) {
        int clean;
        rc = joins_cleanly(b, tests[i].n, tests[i].texts, tests[i].ids, tests[i].n_ids, err, &clean);
        if (!clean) pt->reason = tests[i].reason;
    }
    free(py.s);
    return rc;
}

static int is_capitalized(const char *s) { return s[0] >= 'A' && s[0] <= 'Z'; }

static int build_buckets(prompt_builder *b, ep_error *err) {
    char form[300];
    for (int i = 0; i < b->words->n; i++) {
        const char *w = b->words->words[i];
        for (int ylike = 0; ylike < 2; ylike++)
            for (int cap = 0; cap < 2; cap++) {
                snprintf(form, sizeof form, "%s%s", ylike ? b->task->output_prefix : "", w);
                if (cap) {
                    char *first = form + (ylike ? strlen(b->task->output_prefix) : 0);
                    *first = (char)toupper((unsigned char)*first);
                }
                int *ids = NULL, n = 0;
                if (encode(b, form, 0, &ids, &n, err)) return -1;
                free(ids);
                if (n < 1 || n > 8) continue;
                int *cnt = &b->bucket_n[ylike][cap][n];
                if ((*cnt & (*cnt - 1)) == 0)  // grow at powers of two
                    b->bucket[ylike][cap][n] = ep_realloc(b->bucket[ylike][cap][n], sizeof(int) * (size_t)(*cnt ? 2 * *cnt : 1));
                b->bucket[ylike][cap][n][(*cnt)++] = i;
            }
    }
    return 0;
}

// 1 if s equals (without case) the input (ylike = 0) or output of one of the task's own pairs or of
// the donor pairs before index `before` (duplicates keep their first occurrence).
static int seen_before(const prompt_builder *b, int ylike, const char *s, int before) {
    const task *t = b->task;
    for (int i = 0; i < t->n_pairs; i++)
        if (!strcasecmp(s, ylike ? t->pairs[i].y : t->pairs[i].x)) return 1;
    for (int i = 0; i < t->n_ambiguous; i++)
        if (!strcasecmp(s, ylike ? t->ambiguous[i].y : t->ambiguous[i].x)) return 1;
    for (int i = 0; i < before; i++)
        if (b->donor_tok[i].reason == PAIR_CLEAN && !strcasecmp(s, ylike ? t->donor_pairs[i].y : t->donor_pairs[i].x))
            return 1;
    return 0;
}

static int build_other_task_pools(prompt_builder *b, ep_error *err) {
    const task *t = b->task;
    b->donor_tok = ep_calloc((size_t)t->n_donor_pairs, sizeof(pair_tokens));
    b->other_x = ep_malloc(sizeof(int) * (size_t)t->n_donor_pairs);
    b->other_y = ep_malloc(sizeof(int) * (size_t)t->n_donor_pairs);
    for (int i = 0; i < t->n_donor_pairs; i++) {
        if (pair_tokenize(b, t->donor_pairs[i].x, t->donor_pairs[i].y, &b->donor_tok[i], err))
            return ep_wrap(err, "%s: donor task pair %d", t->path, i);
        if (b->donor_tok[i].reason != PAIR_CLEAN) continue;
        if (!seen_before(b, 0, t->donor_pairs[i].x, i)) b->other_x[b->n_other_x++] = i;
        if (!seen_before(b, 1, t->donor_pairs[i].y, i)) b->other_y[b->n_other_y++] = i;
    }
    return 0;
}

int prompt_builder_init(prompt_builder *b, const task *t, const tokenizer *tk, const word_list *words, ep_error *err) {
    memset(b, 0, sizeof *b);
    b->task = t;
    b->tk = tk;
    b->words = words;
    // The prefix the post-processor adds before text, and a check that it adds nothing after it.
    int *with = NULL, n_with = 0, *without = NULL, n_without = 0;
    if (encode(b, "", 1, &b->prefix, &b->n_prefix, err) || encode(b, "a", 1, &with, &n_with, err) ||
        encode(b, "a", 0, &without, &n_without, err))
        return -1;
    int ok = n_with == b->n_prefix + n_without && same(with, b->n_prefix, b->prefix, b->n_prefix);
    free(with), free(without);
    if (!ok) return ep_fail(err, "tokenizer: its post-processor adds tokens after the text; prompts need a prefix-only template");
    if (encode(b, t->separator, 0, &b->t_ids, &b->n_t, err) || encode(b, t->example_separator, 0, &b->n_ids, &b->n_n, err))
        return -1;
    if (b->n_t == 0 || b->n_n == 0) return ep_fail(err, "%s: separator and example_separator must not be empty", t->path);
    b->pairs = ep_calloc((size_t)t->n_pairs, sizeof(pair_tokens));
    b->clean = ep_malloc(sizeof(int) * (size_t)t->n_pairs);
    for (int i = 0; i < t->n_pairs; i++) {
        if (pair_tokenize(b, t->pairs[i].x, t->pairs[i].y, &b->pairs[i], err)) return ep_wrap(err, "%s: pair %d", t->path, i);
        b->report.dropped[b->pairs[i].reason]++;
        if (b->pairs[i].reason == PAIR_CLEAN) b->clean[b->n_clean++] = i;
    }
    b->ambiguous = ep_calloc((size_t)t->n_ambiguous + 1, sizeof(pair_tokens));
    b->clean_amb = ep_malloc(sizeof(int) * (size_t)(t->n_ambiguous + 1));
    for (int i = 0; i < t->n_ambiguous; i++) {
        if (pair_tokenize(b, t->ambiguous[i].x, t->ambiguous[i].y, &b->ambiguous[i], err)) return -1;
        if (b->ambiguous[i].reason == PAIR_CLEAN) b->clean_amb[b->n_clean_amb++] = i;
    }
    b->report.pairs_total = t->n_pairs;
    b->report.pairs_kept = b->n_clean;
    b->report.dropped[PAIR_CLEAN] = 0;
    b->report.ambiguous_total = t->n_ambiguous;
    b->report.ambiguous_kept = b->n_clean_amb;
    if (words && build_buckets(b, err)) return -1;
    return 0;
}

static void free_pair_tokens(pair_tokens *p, int n) {
    for (int i = 0; i < n; i++) free(p[i].x), free(p[i].y);
    free(p);
}

void prompt_builder_free(prompt_builder *b) {
    free(b->prefix), free(b->t_ids), free(b->n_ids);
    if (b->task) {
        free_pair_tokens(b->pairs, b->task->n_pairs);
        free_pair_tokens(b->ambiguous, b->task->n_ambiguous);
    }
    free(b->clean), free(b->clean_amb);
    if (b->task && b->donor_tok) free_pair_tokens(b->donor_tok, b->task->n_donor_pairs);
    free(b->other_x), free(b->other_y);
    for (int y = 0; y < 2; y++)
        for (int c = 0; c < 2; c++)
            for (int n = 0; n < 9; n++) free(b->bucket[y][c][n]);
    memset(b, 0, sizeof *b);
}

void prompt_free(prompt *p) {
    free(p->tokens), free(p->types), free(p->index), free(p->donors), free(p->target), free(p->pair_ids);
    memset(p, 0, sizeof *p);
}

// One demonstration or the query as the donor builder sees it: strings and tokens of x and y.
typedef struct {
    const char *x, *y;  // y without the output prefix
    const int *xt, *yt;
    int nx, ny;
    char *own_x, *own_y;  // replacement strings owned by the donor under construction
    int *own_xt, *own_yt;
} example;

static const pair_tokens *pair_of(const prompt_builder *b, int id) {
    return id >= 0 ? &b->pairs[id] : &b->ambiguous[-id - 1];
}

static const task_pair *text_of(const prompt_builder *b, int id) {
    return id >= 0 ? &b->task->pairs[id] : &b->task->ambiguous[-id - 1];
}

static void example_init(example *e, const prompt_builder *b, int id) {
    memset(e, 0, sizeof *e);
    const pair_tokens *pt = pair_of(b, id);
    const task_pair *tp = text_of(b, id);
    *e = (example){.x = tp->x, .y = tp->y, .xt = pt->x, .yt = pt->y, .nx = pt->nx, .ny = pt->ny};
}

static void example_release(example *e) {
    free(e->own_x), free(e->own_y), free(e->own_xt), free(e->own_yt);
    e->own_x = e->own_y = NULL;
    e->own_xt = e->own_yt = NULL;
}

// Lays out examples (N demos + query) as text, tokens, types and indices.
static void layout(const prompt_builder *b, const example *ex, int n_demos, sbuf *text, ivec *tokens, ivec *types,
                   ivec *index) {
    const task *t = b->task;
    for (int i = 0; i < b->n_prefix; i++) ivec_push(tokens, b->prefix[i]), ivec_push(types, TT_BOS), ivec_push(index, -1);
    for (int k = 0; k <= n_demos; k++) {
        int query = k == n_demos;
        sbuf_add(text, ex[k].x);
        for (int i = 0; i < ex[k].nx; i++) ivec_push(tokens, ex[k].xt[i]), ivec_push(types, query ? TT_QUERY : TT_X), ivec_push(index, k);
        sbuf_add(text, t->separator);
        for (int i = 0; i < b->n_t; i++) ivec_push(tokens, b->t_ids[i]), ivec_push(types, query ? TT_LAST : TT_T), ivec_push(index, k);
        if (query) break;
        sbuf_add(text, t->output_prefix);
        sbuf_add(text, ex[k].y);
        for (int i = 0; i < ex[k].ny; i++) ivec_push(tokens, ex[k].yt[i]), ivec_push(types, TT_Y), ivec_push(index, k);
        sbuf_add(text, t->example_separator);
        for (int i = 0; i < b->n_n; i++) ivec_push(tokens, b->n_ids[i]), ivec_push(types, TT_N), ivec_push(index, k);
    }
}

// 1 if the whole text, tokenized as the model will see it, gives exactly these tokens.
static int whole_matches(const prompt_builder *b, const char *text, const ivec *tokens, ep_error *err, int *match) {
    int *ids = NULL, n = 0;
    if (encode(b, text, 1, &ids, &n, err)) return -1;
    *match = same(ids, n, tokens->v, tokens->n);
    free(ids);
    return 0;
}

// Sets the example's x (ylike = 0) or y to a replacement string with its tokens.
static void set_replacement(example *e, int ylike, char *text, int *ids) {
    if (ylike) {
        free(e->own_y), free(e->own_yt);
        e->y = e->own_y = text;
        e->yt = e->own_yt = ids;
    } else {
        free(e->own_x), free(e->own_xt);
        e->x = e->own_x = text;
        e->xt = e->own_xt = ids;
    }
}

// A random word (or, for spans no single word fits, two words) whose x-like (ylike = 0) or y-like form
// has exactly as many tokens as the span it replaces, in that span's case and different from it.
// Sets *found to 0 if none turned up.
static int replace_random(prompt_builder *b, rng *r, example *e, int ylike, ep_error *err, int *found) {
    const char *orig = ylike ? e->y : e->x;
    int n = ylike ? e->ny : e->nx, cap = is_capitalized(orig);
    int singles = n <= 8 ? b->bucket_n[ylike][cap][n] : 0;
    *found = 0;
    for (int tries = 0; tries < 48; tries++) {
        int two = singles == 0 || tries >= 16;  // fall back to two-word phrases
        char word[300];
        if (!two) {
            snprintf(word, sizeof word, "%s", b->words->words[b->bucket[ylike][cap][n][rng_below(r, (uint32_t)singles)]]);
        } else {
            int w1 = (int)rng_below(r, (uint32_t)b->words->n), w2 = (int)rng_below(r, (uint32_t)b->words->n);
            snprintf(word, sizeof word, "%s %s", b->words->words[w1], b->words->words[w2]);
        }
        if (cap) word[0] = (char)toupper((unsigned char)word[0]);
        if (!strcasecmp(word, orig)) continue;
        sbuf form = {0};
        if (ylike) sbuf_add(&form, b->task->output_prefix);
        sbuf_add(&form, word);
        int *ids = NULL, nids = 0;
        int rc = encode(b, form.s, 0, &ids, &nids, err);
        free(form.s);
        if (rc) return -1;
        if (nids != n) {
            free(ids);
            continue;
        }
        set_replacement(e, ylike, ep_strdup(word), ids);
        *found = 1;
        return 0;
    }
    return 0;
}

// Replaces the example's x (ylike = 0) or y with a donor-task item from `pool` (indices into
// task->donor_pairs) of exactly the span's token count; a span no single item fits gets two items joined
// by a space, re-tokenized. Sets *found to 0 if none turned up.
static int replace_from_pool(prompt_builder *b, rng *r, example *e, int ylike, const int *pool, int n_pool, ep_error *err,
                             int *found) {
    int n = ylike ? e->ny : e->nx, n_cand = 0;
    int *cand = ep_malloc(sizeof(int) * (size_t)(n_pool + 1));
    for (int i = 0; i < n_pool; i++)
        if ((ylike ? b->donor_tok[pool[i]].ny : b->donor_tok[pool[i]].nx) == n) cand[n_cand++] = pool[i];
    *found = 0;
    if (n_cand > 0) {
        int id = cand[rng_below(r, (uint32_t)n_cand)];
        const task_pair *tp = &b->task->donor_pairs[id];
        const pair_tokens *pt = &b->donor_tok[id];
        if (ylike) e->y = tp->y, e->yt = pt->y;
        else e->x = tp->x, e->xt = pt->x;
        *found = 1;
    }
    free(cand);
    for (int tries = 0; tries < 32 && !*found && n_pool > 0; tries++) {
        const task_pair *a = &b->task->donor_pairs[pool[rng_below(r, (uint32_t)n_pool)]];
        const task_pair *c = &b->task->donor_pairs[pool[rng_below(r, (uint32_t)n_pool)]];
        sbuf word = {0}, form = {0};
        sbuf_add(&word, ylike ? a->y : a->x);
        sbuf_add(&word, " ");
        sbuf_add(&word, ylike ? c->y : c->x);
        if (ylike) sbuf_add(&form, b->task->output_prefix);
        sbuf_add(&form, word.s);
        int *ids = NULL, nids = 0;
        int rc = encode(b, form.s, 0, &ids, &nids, err);
        free(form.s);
        if (rc || nids != n) {
            free(ids), free(word.s);
            if (rc) return -1;
            continue;
        }
        set_replacement(e, ylike, word.s, ids);
        *found = 1;
    }
    return 0;
}

// other_mapping (ylike = 1): the example's output becomes the output of another pair of the task (none of
// the prompt's pairs) with as many tokens and a different text, so x_k no longer maps to its output;
// other_mapping_x (ylike = 0): its input becomes the input of such a pair whose output differs from the
// example's, so the kept output is not the new input's. Sets *found to 0 if no pair fits.
static int rematch(prompt_builder *b, rng *r, example *e, int ylike, const int *used, int n_used, int *found) {
    int n_cand = 0, *cand = ep_malloc(sizeof(int) * (size_t)(b->n_clean + 1));
    for (int c = 0; c < b->n_clean; c++) {
        int id = b->clean[c], in_prompt = 0;
        for (int u = 0; u < n_used && !in_prompt; u++) in_prompt = used[u] == id;
        const pair_tokens *pt = &b->pairs[id];
        if (in_prompt || (ylike ? pt->ny != e->ny : pt->nx != e->nx) || !strcmp(b->task->pairs[id].y, e->y)) continue;
        cand[n_cand++] = id;
    }
    *found = n_cand > 0;
    if (n_cand > 0) {
        int id = cand[rng_below(r, (uint32_t)n_cand)];
        if (ylike) e->y = b->task->pairs[id].y, e->yt = b->pairs[id].y;
        else e->x = b->task->pairs[id].x, e->xt = b->pairs[id].x;
    }
    free(cand);
    return 0;
}

// Fills ex[0..n_demos) (copies of the clean demos) with the donor's replacements. Returns -1 on error,
// else sets *ok.
static int make_donor(prompt_builder *b, donor_kind kind, rng *r, example *ex, int n_demos, const int *used, int n_used,
                      ep_error *err, int *ok, int *unmoved) {
    *ok = 1;
    *unmoved = 0;
    if (kind == DONOR_MEAN) return 0;  // its row is the clean prompt: the cache stage makes its activations
    if (kind == DONOR_SHUFFLE_Y) {
        // Derange outputs within groups of equal token length.
        int *order = ep_malloc(sizeof(int) * (size_t)n_demos), *group = ep_malloc(sizeof(int) * (size_t)n_demos);
        for (int k = 0; k < n_demos; k++) order[k] = k;
        for (int k = 0; k < n_demos; k++) {
            int g = 0;
            for (int j = 0; j < n_demos; j++)
                if (ex[j].ny == ex[k].ny) group[g++] = j;
            if (g < 2 || group[0] != k) continue;  // handle each group once, from its first member
            int *perm = ep_malloc(sizeof(int) * (size_t)g);
            for (int tries = 0;; tries++) {
                for (int j = 0; j < g; j++) perm[j] = group[j];
                if (tries < 64) rng_shuffle(r, perm, g);
                else
                    for (int j = 0; j < g; j++) perm[j] = group[(j + 1) % g];  // rotation: a derangement
                int fixed = 0;
                for (int j = 0; j < g; j++) fixed |= perm[j] == group[j];
                if (!fixed) break;
            }
            for (int j = 0; j < g; j++) order[group[j]] = perm[j];
            free(perm);
        }
        example *copy = ep_malloc(sizeof(example) * (size_t)n_demos);
        memcpy(copy, ex, sizeof(example) * (size_t)n_demos);
        for (int k = 0; k < n_demos; k++) {
            ex[k].y = copy[order[k]].y, ex[k].yt = copy[order[k]].yt;
            *unmoved += !strcmp(ex[k].y, copy[k].y);
        }
        free(copy), free(order), free(group);
        return 0;
    }
    for (int k = 0; k < n_demos && *ok; k++) {
        int found = 1;
        if (kind == DONOR_RANDOM_X || kind == DONOR_RANDOM_XY) {
            if (replace_random(b, r, &ex[k], 0, err, &found)) return -1;
            *ok &= found;
        }
        if (kind == DONOR_RANDOM_Y || kind == DONOR_RANDOM_XY) {
            if (replace_random(b, r, &ex[k], 1, err, &found)) return -1;
            *ok &= found;
        }
        if (kind == DONOR_OTHER_TASK_X || kind == DONOR_OTHER_TASK_Y) {
            int ylike = kind == DONOR_OTHER_TASK_Y;
            if (replace_from_pool(b, r, &ex[k], ylike, ylike ? b->other_y : b->other_x, ylike ? b->n_other_y : b->n_other_x,
                                  err, &found))
                return -1;
            *unmoved += !found;  // nothing of this length anywhere: the span stays (counted, as shuffle_y's)
        }
        if (kind == DONOR_OTHER_MAPPING || kind == DONOR_OTHER_MAPPING_X) {
            rematch(b, r, &ex[k], kind == DONOR_OTHER_MAPPING, used, n_used, &found);
            *unmoved += !found;
        }
        if (kind == DONOR_OTHER_PAIRS) {
            int n_cand = 0, *cand = ep_malloc(sizeof(int) * (size_t)(b->n_clean + 1));
            for (int c = 0; c < b->n_clean; c++) {
                int id = b->clean[c], in_prompt = 0;
                for (int u = 0; u < n_used && !in_prompt; u++) in_prompt = used[u] == id;
                if (!in_prompt && b->pairs[id].nx == ex[k].nx && b->pairs[id].ny == ex[k].ny) cand[n_cand++] = id;
            }
            if (n_cand == 0) *ok = 0;
            else {
                example_init(&ex[k], b, cand[rng_below(r, (uint32_t)n_cand)]);
            }
            free(cand);
        }
    }
    return 0;
}

enum { ATTEMPT_OK, ATTEMPT_REJECTED, ATTEMPT_UNALIGNED };

static int build_attempt(prompt_builder *b, const prompt_params *pp, int index, int attempt, prompt *out, ep_error *err,
                         int *outcome) {
    const task *t = b->task;
    int N = pp->n_shots;
    int n_amb = 0;
    if (t->n_ambiguous > 0) {
        n_amb = (int)lround(t->ambiguous_fraction * N);
        if (n_amb > b->n_clean_amb) n_amb = b->n_clean_amb;
    }
    if (b->n_clean < N - n_amb + 1)
        return ep_fail(err, "%s: %d clean pairs for this tokenizer, a prompt with %d demonstrations needs %d", t->path,
                       b->n_clean, N, N - n_amb + 1);
    rng r = rng_stream(pp->seed, (uint64_t)index, (uint64_t)attempt * 64);
    // Query and ordinary demonstrations: a partial Fisher-Yates draw without replacement.
    int *pool = ep_malloc(sizeof(int) * (size_t)(b->n_clean + b->n_clean_amb + 1));
    memcpy(pool, b->clean, sizeof(int) * (size_t)b->n_clean);
    int *ids = ep_malloc(sizeof(int) * (size_t)(N + 1));
    for (int k = 0; k < N - n_amb + 1; k++) {
        int j = k + (int)rng_below(&r, (uint32_t)(b->n_clean - k)), tmp = pool[k];
        pool[k] = pool[j];
        pool[j] = tmp;
    }
    ids[N] = pool[0];  // the query
    for (int k = 0; k < N - n_amb; k++) ids[k] = pool[k + 1];
    memcpy(pool, b->clean_amb, sizeof(int) * (size_t)b->n_clean_amb);
    for (int k = 0; k < n_amb; k++) {
        int j = k + (int)rng_below(&r, (uint32_t)(b->n_clean_amb - k)), tmp = pool[k];
        pool[k] = pool[j];
        pool[j] = tmp;
        ids[N - n_amb + k] = -pool[k] - 1;
    }
    free(pool);
    rng_shuffle(&r, ids, N);

    example *ex = ep_malloc(sizeof(example) * (size_t)(N + 1));
    for (int k = 0; k <= N; k++) example_init(&ex[k], b, ids[k]);
    sbuf text = {0};
    ivec tokens = {0}, types = {0}, idx = {0};
    layout(b, ex, N, &text, &tokens, &types, &idx);
    int match = 0, rc = whole_matches(b, text.s, &tokens, err, &match);
    *outcome = match ? ATTEMPT_OK : ATTEMPT_REJECTED;
    int *donors = NULL;
    if (rc == 0 && match && pp->n_donors > 0) {
        donors = ep_malloc(sizeof(int) * (size_t)pp->n_donors * (size_t)tokens.n);
        for (int d = 0; d < pp->n_donors && rc == 0 && *outcome == ATTEMPT_OK; d++) {
            rng rd = rng_stream(pp->seed, (uint64_t)index, (uint64_t)attempt * 64 + 1 + (uint64_t)d);
            int aligned = 0;
            for (int tries = 0; tries < 8 && !aligned && rc == 0; tries++) {
                example *dx = ep_malloc(sizeof(example) * (size_t)(N + 1));
                memcpy(dx, ex, sizeof(example) * (size_t)(N + 1));
                for (int k = 0; k <= N; k++) dx[k].own_x = dx[k].own_y = NULL, dx[k].own_xt = dx[k].own_yt = NULL;
                int ok = 0, unmoved = 0;
                rc = make_donor(b, pp->kinds[d], &rd, dx, N, ids, N + 1, err, &ok, &unmoved);
                if (rc == 0 && ok) {
                    sbuf dtext = {0};
                    ivec dtok = {0}, dtypes = {0}, didx = {0};
                    layout(b, dx, N, &dtext, &dtok, &dtypes, &didx);
                    rc = whole_matches(b, dtext.s, &dtok, err, &aligned);
                    aligned &= dtok.n == tokens.n;
                    if (aligned) {
                        memcpy(donors + (size_t)d * tokens.n, dtok.v, sizeof(int) * (size_t)tokens.n);
                        *(pp->kinds[d] == DONOR_SHUFFLE_Y ? &b->report.shuffle_unmoved : &b->report.spans_unmoved) += unmoved;
                    }
                    free(dtext.s), free(dtok.v), free(dtypes.v), free(didx.v);
                }
                for (int k = 0; k <= N; k++) example_release(&dx[k]);
                free(dx);
            }
            if (!aligned) *outcome = ATTEMPT_UNALIGNED;
        }
    }
    if (rc == 0 && *outcome == ATTEMPT_OK) {
        const pair_tokens *q = pair_of(b, ids[N]);
        *out = (prompt){.len = tokens.n, .tokens = tokens.v, .types = types.v, .index = idx.v, .n_donors = pp->n_donors,
                        .donors = donors, .n_target = q->ny, .n_pairs = N + 1, .pair_ids = ids};
        out->target = ep_malloc(sizeof(int) * (size_t)q->ny);
        memcpy(out->target, q->y, sizeof(int) * (size_t)q->ny);
        tokens.v = types.v = idx.v = NULL;
        donors = NULL;
        ids = NULL;
    }
    free(ex), free(text.s), free(tokens.v), free(types.v), free(idx.v), free(donors), free(ids);
    return rc;
}

int prompt_build(prompt_builder *b, const prompt_params *pp, int index, prompt *out, ep_error *err) {
    memset(out, 0, sizeof *out);
    if (pp->n_donors < 0 || pp->n_donors > 16) return ep_fail(err, "donors: between 0 and 16 donors per prompt");
    for (int d = 0; d < pp->n_donors; d++)
        if ((pp->kinds[d] == DONOR_RANDOM_XY || pp->kinds[d] == DONOR_RANDOM_X || pp->kinds[d] == DONOR_RANDOM_Y) &&
            !b->words)
            return ep_fail(err, "%s: donor kind %s needs a word list (field words)", b->task->path,
                           donor_kind_name(pp->kinds[d]));
    for (int d = 0; d < pp->n_donors; d++) {
        if (task_check_kind(b->task, pp->kinds[d], err)) return -1;
        // The donor tasks' pools, on first use (tokenizing their pairs costs as much as the task's own).
        if (donor_kind_needs_donor_tasks(pp->kinds[d]) && !b->donor_tok && build_other_task_pools(b, err)) return -1;
    }
    for (int attempt = 0; attempt < 64; attempt++) {
        int outcome = ATTEMPT_REJECTED;
        if (build_attempt(b, pp, index, attempt, out, err, &outcome)) return -1;
        if (outcome == ATTEMPT_OK) {
            b->report.prompts_built++;
            return 0;
        }
        if (outcome == ATTEMPT_REJECTED) b->report.prompts_rejected++;
        else b->report.donors_unaligned++;
    }
    return ep_fail(err, "%s: prompt %d: no aligned prompt with donors found in 64 attempts", b->task->path, index);
}
