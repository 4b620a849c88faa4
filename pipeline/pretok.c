#include "pipeline/pretok.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline/log.h"

// The GPT-2 pre-tokenizer regex, as tokenizers' ByteLevel uses it when use_regex is true.
static const char gpt2_regex[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

void buf_append(byte_buf *b, const char *s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (b->len + n + 1 > cap) cap *= 2;
        b->p = ep_realloc(b->p, cap);
        b->cap = cap;
    }
    if (n) memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
}

void buf_free(byte_buf *b) {
    free(b->p);
    memset(b, 0, sizeof *b);
}

size_t utf8_encode(unsigned cp, char *out) {
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

size_t utf8_decode(const char *s, size_t n, unsigned *cp) {
    const unsigned char *u = (const unsigned char *)s;
    if (u[0] < 0x80 || n < 2) {
        *cp = u[0];
        return 1;
    }
    if (u[0] < 0xE0) {
        *cp = (unsigned)(u[0] & 0x1F) << 6 | (u[1] & 0x3F);
        return 2;
    }
    if (u[0] < 0xF0 || n < 4) {
        if (n < 3) {
            *cp = u[0];
            return 1;
        }
        *cp = (unsigned)(u[0] & 0x0F) << 12 | (unsigned)(u[1] & 0x3F) << 6 | (u[2] & 0x3F);
        return 3;
    }
    *cp = (unsigned)(u[0] & 0x07) << 18 | (unsigned)(u[1] & 0x3F) << 12 | (unsigned)(u[2] & 0x3F) << 6 | (u[3] & 0x3F);
    return 4;
}

size_t utf8_sanitize(const char *in, size_t n, byte_buf *out) {
    static const char replacement[] = "\xEF\xBF\xBD";
    const unsigned char *u = (const unsigned char *)in;
    size_t replaced = 0, i = 0, run = 0;  // run: start of the pending well-formed stretch
    out->len = 0;
    buf_append(out, "", 0);
    while (i < n) {
        unsigned char c = u[i];
        size_t need;
        unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
        if (c < 0x80) {
            i++;
            continue;
        } else if (c >= 0xC2 && c <= 0xDF) {
            need = 1;
        } else if (c >= 0xE0 && c <= 0xEF) {
            need = 2;
            if (c == 0xE0) lo = 0xA0;
            if (c == 0xED) hi = 0x9F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            need = 3;
            if (c == 0xF0) lo = 0x90;
            if (c == 0xF4) hi = 0x8F;
        } else {
            need = 0;  // C0, C1, F5..FF, or a stray continuation byte
        }
        size_t k = 0;  // continuation bytes that fit
        while (k < need && i + 1 + k < n) {
            unsigned char d = u[i + 1 + k];
            unsigned char l = k == 0 ? lo : 0x80, h = k == 0 ? hi : 0xBF;
            if (d < l || d > h) break;
            k++;
        }
        if (need && k == need) {
            i += 1 + need;
            continue;
        }
        // Ill-formed: the lead byte and the continuation bytes that fit make one maximal subpart.
        buf_append(out, in + run, i - run);
        buf_append(out, replacement, 3);
        replaced++;
        i += 1 + k;
        run = i;
    }
    buf_append(out, in + run, n - run);
    return replaced;
}

unsigned bytelevel_byte_to_char(unsigned char b) {
    if ((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174) return b;
    if (b <= 32) return 256u + b;
    if (b <= 160) return (unsigned)b + 162u;  // 127..160 -> 289..322
    return 323;                               // 173
}

int bytelevel_char_to_byte(unsigned cp) {
    if ((cp >= 33 && cp <= 126) || (cp >= 161 && cp <= 172) || (cp >= 174 && cp <= 255)) return (int)cp;
    if (cp >= 256 && cp <= 288) return (int)cp - 256;
    if (cp >= 289 && cp <= 322) return (int)cp - 162;
    if (cp == 323) return 173;
    return -1;
}

// ---- regexes

struct split_seg {
    size_t s, e;
    int match;
};

void regex_scratch_init(regex_scratch *rs) {
    memset(rs, 0, sizeof *rs);
    rs->md = pcre2_match_data_create(1, NULL);
    rs->mc = pcre2_match_context_create(NULL);
    if (!rs->md || !rs->mc) {
        ep_fatal(1, "%s:%d: out of memory (pcre2)", __FILE__, __LINE__);
    }
}

void regex_scratch_free(regex_scratch *rs) {
    pcre2_match_data_free(rs->md);
    pcre2_match_context_free(rs->mc);
    pcre2_jit_stack_free(rs->jit);
    free(rs->segs);
    memset(rs, 0, sizeof *rs);
}

pcre2_code *regex_compile(const char *re, size_t len, int literal, const char *file, const char *field, ep_error *err) {
    int code;
    PCRE2_SIZE offset;
    uint32_t flags = PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP);  // UCP is not allowed with LITERAL
    pcre2_code *c = pcre2_compile((PCRE2_SPTR)re, len, flags, &code, &offset, NULL);
    if (!c) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(code, msg, sizeof msg);
        ep_fail(err, "%s: %s: regex does not compile at offset %zu: %s", file, field, (size_t)offset, (char *)msg);
        return NULL;
    }
    pcre2_jit_compile(c, PCRE2_JIT_COMPLETE);  // falls back to the interpreter if JIT is unavailable
    return c;
}

pcre2_code *pattern_compile(json_t *pattern, const char *file, const char *field, ep_error *err) {
    json_t *str = json_object_get(pattern, "String"), *re = json_object_get(pattern, "Regex");
    if (json_is_string(str)) return regex_compile(json_string_value(str), json_string_length(str), 1, file, field, err);
    if (json_is_string(re)) return regex_compile(json_string_value(re), json_string_length(re), 0, file, field, err);
    ep_fail(err, "%s: %s is not {\"String\": ...} or {\"Regex\": ...}", file, field);
    return NULL;
}

int regex_find(const pcre2_code *re, const char *s, size_t n, size_t start, regex_scratch *rs, size_t *ms, size_t *me,
               ep_error *err) {
    int rc = pcre2_match(re, (PCRE2_SPTR)s, n, start, PCRE2_NO_UTF_CHECK, rs->md, rs->mc);
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT && !rs->jit) {
        // The default 32 KiB JIT stack runs out on long runs (\s+(?!\S) over many spaces); only then is
        // a large one allocated, so short encodes stay cheap.
        rs->jit = pcre2_jit_stack_create(32 * 1024, 64 * 1024 * 1024, NULL);
        if (!rs->jit) return ep_fail(err, "tokenizer: cannot allocate a PCRE2 JIT stack");
        pcre2_jit_stack_assign(rs->mc, NULL, rs->jit);
        rc = pcre2_match(re, (PCRE2_SPTR)s, n, start, PCRE2_NO_UTF_CHECK, rs->md, rs->mc);
    }
    if (rc == PCRE2_ERROR_NOMATCH) return 0;
    if (rc < 0) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(rc, msg, sizeof msg);
        return ep_fail(err, "tokenizer: regex match failed: %s", (char *)msg);
    }
    PCRE2_SIZE *ov = pcre2_get_ovector_pointer(rs->md);
    *ms = ov[0];
    *me = ov[1];
    return 1;
}

// ---- pieces

void piece_list_free(piece_list *l) {
    buf_free(&l->text);
    free(l->v);
    memset(l, 0, sizeof *l);
}

void piece_list_clear(piece_list *l) {
    l->text.len = 0;
    l->n = 0;
}

void piece_list_add(piece_list *l, const char *s, size_t n, int first) {
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 64;
        l->v = ep_realloc(l->v, sizeof(piece) * l->cap);
    }
    l->v[l->n++] = (piece){l->text.len, n, first};
    buf_append(&l->text, s, n);
}

// ---- normalizers

enum { NORM_REPLACE, NORM_PREPEND };

struct normalizer_step {
    int kind;
    pcre2_code *re;
    char *content;
    size_t content_len;
};

static int normalizer_parse_into(normalizer *nz, json_t *j, const char *file, const char *field, ep_error *err) {
    if (!json_is_object(j)) return ep_fail(err, "%s: %s is not an object", file, field);
    const char *type = json_string_value(json_object_get(j, "type"));
    if (!type) return ep_fail(err, "%s: %s.type is missing", file, field);
    char sub[256];
    if (!strcmp(type, "Sequence")) {
        json_t *list = json_object_get(j, "normalizers");
        if (!json_is_array(list)) return ep_fail(err, "%s: %s.normalizers is not an array", file, field);
        size_t i;
        json_t *v;
        json_array_foreach(list, i, v) {
            snprintf(sub, sizeof sub, "%s.normalizers[%zu]", field, i);
            if (normalizer_parse_into(nz, v, file, sub, err)) return -1;
        }
        return 0;
    }
    normalizer_step st = {0};
    if (!strcmp(type, "Replace")) {
        json_t *content = json_object_get(j, "content");
        if (!json_is_string(content)) return ep_fail(err, "%s: %s.content is not a string", file, field);
        snprintf(sub, sizeof sub, "%s.pattern", field);
        st.kind = NORM_REPLACE;
        if (!(st.re = pattern_compile(json_object_get(j, "pattern"), file, sub, err))) return -1;
        st.content_len = json_string_length(content);
        st.content = ep_malloc(st.content_len + 1);
        memcpy(st.content, json_string_value(content), st.content_len + 1);
    } else if (!strcmp(type, "Prepend")) {
        json_t *prepend = json_object_get(j, "prepend");
        if (!json_is_string(prepend)) return ep_fail(err, "%s: %s.prepend is not a string", file, field);
        st.kind = NORM_PREPEND;
        st.content = ep_strdup(json_string_value(prepend));
        st.content_len = strlen(st.content);
    } else {
        return ep_fail(err, "%s: %s.type = \"%s\" is not supported (supported: Replace, Prepend, Sequence)", file, field, type);
    }
    nz->steps = ep_realloc(nz->steps, sizeof(normalizer_step) * (size_t)(nz->n + 1));
    nz->steps[nz->n++] = st;
    return 0;
}

int normalizer_parse(normalizer *nz, json_t *j, const char *file, ep_error *err) {
    memset(nz, 0, sizeof *nz);
    if (!j || json_is_null(j)) return 0;
    return normalizer_parse_into(nz, j, file, "normalizer", err);
}

void normalizer_free(normalizer *nz) {
    for (int i = 0; i < nz->n; i++) {
        pcre2_code_free(nz->steps[i].re);
        free(nz->steps[i].content);
    }
    free(nz->steps);
    memset(nz, 0, sizeof *nz);
}

static size_t char_len_at(const char *s, size_t left) {
    unsigned cp;
    return utf8_decode(s, left, &cp);
}

// Replaces every match of re in s by content, appending to out.
static int replace_all(const pcre2_code *re, const char *s, size_t n, const char *content, size_t content_len,
                       byte_buf *out, regex_scratch *rs, ep_error *err) {
    size_t pos = 0, ms, me;
    while (pos <= n) {
        int rc = regex_find(re, s, n, pos, rs, &ms, &me, err);
        if (rc < 0) return -1;
        if (rc == 0) break;
        buf_append(out, s + pos, ms - pos);
        buf_append(out, content, content_len);
        if (me == ms) {  // empty match: keep the next character and move past it
            if (me >= n) {
                pos = n + 1;
                break;
            }
            size_t cl = char_len_at(s + me, n - me);
            buf_append(out, s + me, cl);
            me += cl;
        }
        pos = me;
    }
    if (pos < n) buf_append(out, s + pos, n - pos);
    return 0;
}

int normalizer_apply(const normalizer *nz, const char *s, size_t n, byte_buf *out, regex_scratch *rs, ep_error *err) {
    out->len = 0;
    buf_append(out, s, n);
    byte_buf tmp = {0};
    for (int i = 0; i < nz->n; i++) {
        const normalizer_step *st = &nz->steps[i];
        tmp.len = 0;
        buf_append(&tmp, "", 0);
        if (st->kind == NORM_REPLACE) {
            if (replace_all(st->re, out->p, out->len, st->content, st->content_len, &tmp, rs, err)) {
                buf_free(&tmp);
                return -1;
            }
        } else {  // NORM_PREPEND: only on non-empty text
            if (out->len) buf_append(&tmp, st->content, st->content_len);
            buf_append(&tmp, out->p, out->len);
        }
        byte_buf swap = *out;
        *out = tmp;
        tmp = swap;
    }
    buf_free(&tmp);
    return 0;
}

// ---- pre-tokenizers

enum { PT_SPLIT, PT_BYTELEVEL, PT_METASPACE };
enum { SPLIT_REMOVED, SPLIT_ISOLATED, SPLIT_MERGED_WITH_PREVIOUS, SPLIT_MERGED_WITH_NEXT, SPLIT_CONTIGUOUS };
enum { PREPEND_ALWAYS, PREPEND_FIRST, PREPEND_NEVER };

struct pretok_step {
    int kind;
    pcre2_code *re;  // Split pattern; ByteLevel's GPT-2 regex (if use_regex); Metaspace's replacement
    int behavior, invert;
    int add_prefix_space;
    char replacement[8];
    size_t replacement_len;
    int prepend_scheme, split;
};

static int parse_behavior(const char *b) {
    static const char *names[] = {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"};
    for (int i = 0; i < 5; i++)
        if (b && !strcmp(b, names[i])) return i;
    return -1;
}

static void add_step(pretokenizer *pt, pretok_step st) {
    pt->steps = ep_realloc(pt->steps, sizeof(pretok_step) * (size_t)(pt->n + 1));
    pt->steps[pt->n++] = st;
}

static int pretok_parse_into(pretokenizer *pt, json_t *j, const char *file, const char *field, ep_error *err) {
    if (!json_is_object(j)) return ep_fail(err, "%s: %s is not an object", file, field);
    const char *type = json_string_value(json_object_get(j, "type"));
    if (!type) return ep_fail(err, "%s: %s.type is missing", file, field);
    char sub[256];
    pretok_step st = {0};
    if (!strcmp(type, "Sequence")) {
        json_t *list = json_object_get(j, "pretokenizers");
        if (!json_is_array(list)) return ep_fail(err, "%s: %s.pretokenizers is not an array", file, field);
        size_t i;
        json_t *v;
        json_array_foreach(list, i, v) {
            snprintf(sub, sizeof sub, "%s.pretokenizers[%zu]", field, i);
            if (pretok_parse_into(pt, v, file, sub, err)) return -1;
        }
        return 0;
    } else if (!strcmp(type, "Split")) {
        st.kind = PT_SPLIT;
        st.behavior = parse_behavior(json_string_value(json_object_get(j, "behavior")));
        if (st.behavior < 0) return ep_fail(err, "%s: %s.behavior is not one of Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous", file, field);
        st.invert = json_is_true(json_object_get(j, "invert"));
        snprintf(sub, sizeof sub, "%s.pattern", field);
        if (!(st.re = pattern_compile(json_object_get(j, "pattern"), file, sub, err))) return -1;
    } else if (!strcmp(type, "ByteLevel")) {
        st.kind = PT_BYTELEVEL;
        st.add_prefix_space = json_is_true(json_object_get(j, "add_prefix_space"));
        json_t *use_regex = json_object_get(j, "use_regex");
        if (!use_regex || json_is_true(use_regex)) {
            snprintf(sub, sizeof sub, "%s (GPT-2 regex)", field);
            if (!(st.re = regex_compile(gpt2_regex, strlen(gpt2_regex), 0, file, sub, err))) return -1;
        }
    } else if (!strcmp(type, "Digits")) {
        st.kind = PT_SPLIT;
        st.behavior = json_is_true(json_object_get(j, "individual_digits")) ? SPLIT_ISOLATED : SPLIT_CONTIGUOUS;
        // Rust's char::is_numeric is the N category, one character per match.
        if (!(st.re = regex_compile("\\p{N}", 5, 0, file, field, err))) return -1;
    } else if (!strcmp(type, "Metaspace")) {
        st.kind = PT_METASPACE;
        json_t *repl = json_object_get(j, "replacement");
        const char *r = json_string_value(repl);
        if (!r || json_string_length(repl) == 0 || json_string_length(repl) > 4 ||
            char_len_at(r, json_string_length(repl)) != json_string_length(repl))
            return ep_fail(err, "%s: %s.replacement is not a single character", file, field);
        st.replacement_len = json_string_length(repl);
        memcpy(st.replacement, r, st.replacement_len);
        const char *scheme = json_string_value(json_object_get(j, "prepend_scheme"));
        if (scheme) {
            if (!strcmp(scheme, "always")) st.prepend_scheme = PREPEND_ALWAYS;
            else if (!strcmp(scheme, "first")) st.prepend_scheme = PREPEND_FIRST;
            else if (!strcmp(scheme, "never")) st.prepend_scheme = PREPEND_NEVER;
            else return ep_fail(err, "%s: %s.prepend_scheme = \"%s\" is not always, first or never", file, field, scheme);
        } else {  // older files: add_prefix_space (default true)
            json_t *aps = json_object_get(j, "add_prefix_space");
            st.prepend_scheme = (!aps || json_is_true(aps)) ? PREPEND_ALWAYS : PREPEND_NEVER;
        }
        json_t *split = json_object_get(j, "split");
        st.split = !split || json_is_true(split);
        st.behavior = SPLIT_MERGED_WITH_NEXT;
        if (!(st.re = regex_compile(st.replacement, st.replacement_len, 1, file, field, err))) return -1;
    } else {
        return ep_fail(err, "%s: %s.type = \"%s\" is not supported (supported: Split, ByteLevel, Digits, Metaspace, Sequence)",
                       file, field, type);
    }
    add_step(pt, st);
    return 0;
}

int pretokenizer_parse(pretokenizer *pt, json_t *j, const char *file, ep_error *err) {
    memset(pt, 0, sizeof *pt);
    if (!j || json_is_null(j)) return 0;
    return pretok_parse_into(pt, j, file, "pre_tokenizer", err);
}

void pretokenizer_free(pretokenizer *pt) {
    for (int i = 0; i < pt->n; i++) pcre2_code_free(pt->steps[i].re);
    free(pt->steps);
    memset(pt, 0, sizeof *pt);
}

static void push_seg(regex_scratch *rs, size_t *n, size_t s, size_t e, int match) {
    if (*n == rs->seg_cap) {
        rs->seg_cap = rs->seg_cap ? rs->seg_cap * 2 : 64;
        rs->segs = ep_realloc(rs->segs, sizeof(struct split_seg) * rs->seg_cap);
    }
    rs->segs[(*n)++] = (struct split_seg){s, e, match};
}

// tokenizers' NormalizedString::split: the matches and the gaps between them, then the behaviour folds
// them into pieces; empty pieces are dropped.
static int split_piece(const char *s, size_t n, int first, const pcre2_code *re, int behavior, int invert,
                       regex_scratch *rs, piece_list *out, ep_error *err) {
    if (n == 0) return 0;
    size_t nseg = 0, prev = 0, pos = 0, ms = 0, me = 0;
    while (pos < n) {
        int rc = regex_find(re, s, n, pos, rs, &ms, &me, err);
        if (rc < 0) return -1;
        if (rc == 0) break;
        if (ms != prev) push_seg(rs, &nseg, prev, ms, 0);
        push_seg(rs, &nseg, ms, me, 1);
        prev = me;
        pos = me > ms ? me : me + char_len_at(s + me, n - me);
    }
    if (prev != n) push_seg(rs, &nseg, prev, n, 0);
    struct split_seg *g = rs->segs;
    if (invert)
        for (size_t i = 0; i < nseg; i++) g[i].match = !g[i].match;
    // Fold in place: k is the number of output pieces kept in g[0..k).
    size_t k = 0;
    int previous_match = 0;
    switch (behavior) {
    case SPLIT_REMOVED:
        for (size_t i = 0; i < nseg; i++)
            if (!g[i].match) g[k++] = g[i];
        break;
    case SPLIT_ISOLATED:
        k = nseg;
        break;
    case SPLIT_MERGED_WITH_PREVIOUS:
        for (size_t i = 0; i < nseg; i++) {
            struct split_seg c = g[i];
            if (c.match && !previous_match && k > 0) g[k - 1].e = c.e;
            else g[k++] = c;
            previous_match = c.match;
        }
        break;
    case SPLIT_MERGED_WITH_NEXT: {
        // Right to left: a match absorbs the piece after it. Output is built from the end of g.
        size_t w = nseg;
        for (size_t i = nseg; i-- > 0;) {
            struct split_seg c = g[i];
            if (c.match && !previous_match && w < nseg) g[w].s = c.s;
            else g[--w] = c;
            previous_match = c.match;
        }
        memmove(g, g + w, sizeof(struct split_seg) * (nseg - w));
        k = nseg - w;
        break;
    }
    case SPLIT_CONTIGUOUS:
        for (size_t i = 0; i < nseg; i++) {
            struct split_seg c = g[i];
            if (c.match == previous_match && k > 0) g[k - 1].e = c.e;
            else g[k++] = c;
            previous_match = c.match;
        }
        break;
    }
    for (size_t i = 0; i < k; i++)
        if (g[i].e > g[i].s) piece_list_add(out, s + g[i].s, g[i].e - g[i].s, first && g[i].s == 0);
    return 0;
}

static void bytelevel_map(const char *s, size_t n, int first, piece_list *out) {
    if (n == 0) return;
    size_t start = out->text.len;
    piece_list_add(out, "", 0, first);
    for (size_t i = 0; i < n; i++) {
        char tmp[4];
        size_t l = utf8_encode(bytelevel_byte_to_char((unsigned char)s[i]), tmp);
        buf_append(&out->text, tmp, l);
    }
    out->v[out->n - 1].len = out->text.len - start;
}

static int apply_step(const pretok_step *st, const piece_list *in, piece_list *out, regex_scratch *rs, byte_buf *scratch,
                      ep_error *err) {
    piece_list_clear(out);
    for (size_t i = 0; i < in->n; i++) {
        const char *s = in->text.p + in->v[i].off;
        size_t n = in->v[i].len;
        int first = in->v[i].first;
        if (st->kind == PT_SPLIT) {
            if (split_piece(s, n, first, st->re, st->behavior, st->invert, rs, out, err)) return -1;
        } else if (st->kind == PT_BYTELEVEL) {
            if (st->add_prefix_space && !(n > 0 && s[0] == ' ')) {
                scratch->len = 0;
                buf_append(scratch, " ", 1);
                buf_append(scratch, s, n);
                s = scratch->p;
                n = scratch->len;
            }
            if (!st->re) {
                bytelevel_map(s, n, first, out);
                continue;
            }
            // Split into a side list first, then map each sub-piece.
            piece_list sub = {0};
            if (split_piece(s, n, first, st->re, SPLIT_ISOLATED, 0, rs, &sub, err)) {
                piece_list_free(&sub);
                return -1;
            }
            for (size_t k = 0; k < sub.n; k++) bytelevel_map(sub.text.p + sub.v[k].off, sub.v[k].len, sub.v[k].first, out);
            piece_list_free(&sub);
        } else {  // PT_METASPACE
            scratch->len = 0;
            buf_append(scratch, "", 0);
            int starts_with_repl = n >= st->replacement_len && !memcmp(s, st->replacement, st->replacement_len);
            if (n > 0 && s[0] == ' ') starts_with_repl = 1;  // the space becomes the replacement below
            if (!starts_with_repl && (st->prepend_scheme == PREPEND_ALWAYS || (st->prepend_scheme == PREPEND_FIRST && first)))
                buf_append(scratch, st->replacement, st->replacement_len);
            for (size_t k = 0; k < n; k++) {
                if (s[k] == ' ') buf_append(scratch, st->replacement, st->replacement_len);
                else buf_append(scratch, s + k, 1);
            }
            if (st->split) {
                if (split_piece(scratch->p, scratch->len, first, st->re, SPLIT_MERGED_WITH_NEXT, 0, rs, out, err)) return -1;
            } else if (scratch->len) {
                piece_list_add(out, scratch->p, scratch->len, first);
            }
        }
    }
    return 0;
}

int pretokenizer_apply(const pretokenizer *pt, const char *s, size_t n, int first, piece_list *out, piece_list *tmp,
                       regex_scratch *rs, ep_error *err) {
    piece_list_clear(out);
    if (n == 0) return 0;
    piece_list_add(out, s, n, first);
    byte_buf scratch = {0};
    for (int i = 0; i < pt->n; i++) {
        piece_list swap = *tmp;
        *tmp = *out;
        *out = swap;
        if (apply_step(&pt->steps[i], tmp, out, rs, &scratch, err)) {
            buf_free(&scratch);
            return -1;
        }
    }
    buf_free(&scratch);
    return 0;
}
