// tokenizer_added: added and special tokens (pipeline/tokenizer_impl.h).
#include <stdlib.h>
#include <string.h>

#include "pipeline/tokenizer_impl.h"

// ---- small helpers

static int rust_is_whitespace(unsigned cp) {
    // Rust's char::is_whitespace (the White_Space property), used by added tokens' lstrip/rstrip.
    return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
           (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

size_t tokenizer_utf8_prev(const char *s, size_t pos) {  // start of the character before pos
    size_t i = pos - 1;
    while (i > 0 && ((unsigned char)s[i] & 0xC0) == 0x80) i--;
    return i;
}

// ---- added tokens

void tokenizer_matcher_init(token_matcher *m) {
    memset(m, 0, sizeof *m);
    pairmap_init(&m->edges, 64);
    m->n_nodes = 1;
    m->terminal = ep_malloc(sizeof(int));
    m->terminal[0] = -1;
}

void tokenizer_matcher_free(token_matcher *m) {
    pairmap_free(&m->edges);
    free(m->terminal);
    memset(m, 0, sizeof *m);
}

void tokenizer_matcher_add(token_matcher *m, const char *s, size_t len, int index) {
    if (len == 0) return;
    int node = 0, child, unused;
    for (size_t i = 0; i < len; i++) {
        uint64_t key = (uint64_t)node << 8 | (unsigned char)s[i];
        if (!pairmap_get(&m->edges, key, &child, &unused)) {
            child = m->n_nodes++;
            m->terminal = ep_realloc(m->terminal, sizeof(int) * (size_t)m->n_nodes);
            m->terminal[child] = -1;
            pairmap_put(&m->edges, key, child, 0);
        }
        node = child;
    }
    m->terminal[node] = index;  // a later duplicate wins
    m->first_byte[(unsigned char)s[0]] = 1;
    m->n_tokens++;
}

// Longest token starting at s[pos]; returns its added index (and length) or -1.
static int matcher_longest(const token_matcher *m, const char *s, size_t n, size_t pos, size_t *len) {
    int node = 0, best = -1, child, unused;
    for (size_t i = pos; i < n; i++) {
        if (!pairmap_get(&m->edges, (uint64_t)node << 8 | (unsigned char)s[i], &child, &unused)) break;
        node = child;
        if (m->terminal[node] >= 0) {
            best = m->terminal[node];
            *len = i + 1 - pos;
        }
    }
    return best;
}


static void span_push(span_list *l, size_t s, size_t e, int token) {
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 16;
        l->v = ep_realloc(l->v, sizeof(span) * l->cap);
    }
    l->v[l->n++] = (span){s, e, token};
}

static int is_word_char(const tokenizer *t, const char *s, size_t n, size_t at, regex_scratch *rs) {
    size_t ms, me;
    ep_error ignored;
    unsigned cp;
    size_t cl = utf8_decode(s + at, n - at, &cp);
    return regex_find(t->word_char, s + at, cl, 0, rs, &ms, &me, &ignored) == 1;
}

// tokenizers' AddedVocabulary::find_matches: leftmost-longest matches (aho-corasick), each checked for
// single_word and widened by lstrip/rstrip, with the text between them as untokenized spans.
void tokenizer_find_added(const tokenizer *t, const token_matcher *m, const char *s, size_t n, span_list *out,
                       regex_scratch *rs) {
    out->n = 0;
    size_t start_offset = 0, pos = 0;
    if (m->n_tokens) {
        while (pos < n) {
            size_t len = 0;
            int idx = m->first_byte[(unsigned char)s[pos]] ? matcher_longest(m, s, n, pos, &len) : -1;
            if (idx < 0) {
                pos++;
                continue;
            }
            size_t start = pos, stop = pos + len;
            const added_token *a = &t->added[idx];
            pos = stop;  // matches never overlap: the search resumes after this one
            if (a->single_word) {
                int start_space = start == 0 || !is_word_char(t, s, n, tokenizer_utf8_prev(s, start), rs);
                int stop_space = stop == n || !is_word_char(t, s, n, stop, rs);
                if (!start_space || !stop_space) continue;
            }
            if (a->lstrip) {
                size_t newstart = start;
                while (newstart > 0) {
                    size_t p = tokenizer_utf8_prev(s, newstart);
                    unsigned cp;
                    utf8_decode(s + p, n - p, &cp);
                    if (!rust_is_whitespace(cp)) break;
                    newstart = p;
                }
                start = newstart > start_offset ? newstart : start_offset;
            }
            if (a->rstrip) {
                while (stop < n) {
                    unsigned cp;
                    size_t cl = utf8_decode(s + stop, n - stop, &cp);
                    if (!rust_is_whitespace(cp)) break;
                    stop += cl;
                }
                pos = stop;
            }
            if (start > start_offset) span_push(out, start_offset, start, -1);
            span_push(out, start, stop, idx);
            start_offset = stop;
        }
    }
    if (start_offset < n || n == 0) span_push(out, start_offset, n, -1);
}
