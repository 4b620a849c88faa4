#include "pipeline/tokenizer_json.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { TJSON_MAX_DEPTH = 2048 };  // jansson's JSON_PARSER_MAX_DEPTH

void tjson_init(tjson *s, const char *doc, size_t len, size_t pos, const char *file) {
    memset(s, 0, sizeof *s);
    s->doc = doc;
    s->len = len;
    s->pos = pos;
    s->file = file;
}

void tjson_free(tjson *s) {
    free(s->buf);
    s->buf = NULL;
    s->buf_cap = 0;
}

int tjson_fail(const tjson *s, ep_error *err, const char *what) {
    size_t pos = s->pos < s->len ? s->pos : s->len;
    int line = 1;
    size_t line_start = 0;
    for (const char *p = s->doc, *end = s->doc + pos; (p = memchr(p, '\n', (size_t)(end - p))) != NULL; p++) {
        line++;
        line_start = (size_t)(p - s->doc) + 1;
    }
    return ep_fail(err, "%s: malformed JSON at line %d column %zu: %s", s->file, line, pos - line_start + 1, what);
}

int tjson_peek(tjson *s) {
    const char *d = s->doc;
    size_t i = s->pos, n = s->len;
    while (i < n && (d[i] == ' ' || d[i] == '\n' || d[i] == '\r' || d[i] == '\t')) i++;
    s->pos = i;
    return i < n ? (unsigned char)d[i] : -1;
}

int tjson_expect(tjson *s, char c, ep_error *err) {
    if (tjson_peek(s) != (unsigned char)c) {
        char what[32];
        snprintf(what, sizeof what, "expected '%c'", c);
        return tjson_fail(s, err, what);
    }
    s->pos++;
    return 0;
}

// Length of the well-formed UTF-8 sequence at p (lead byte >= 0x80), or 0 if ill-formed (RFC 3629: no
// overlong forms, no surrogates, nothing above U+10FFFF).
static size_t utf8_valid_len(const unsigned char *p, size_t left) {
    unsigned char c = p[0], lo = 0x80, hi = 0xBF;
    size_t need;
    if (c >= 0xC2 && c <= 0xDF) need = 1;
    else if (c >= 0xE0 && c <= 0xEF) {
        need = 2;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 3;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else {
        return 0;
    }
    if (left < need + 1 || p[1] < lo || p[1] > hi) return 0;
    for (size_t k = 2; k <= need; k++)
        if (p[k] < 0x80 || p[k] > 0xBF) return 0;
    return need + 1;
}

static void buf_reserve(tjson *s, size_t n) {
    if (n <= s->buf_cap) return;
    size_t cap = s->buf_cap ? s->buf_cap : 256;
    while (cap < n) cap *= 2;
    s->buf = ep_realloc(s->buf, cap);
    s->buf_cap = cap;
}

static int hex4(const unsigned char *p, unsigned *out) {
    unsigned v = 0;
    for (int k = 0; k < 4; k++) {
        unsigned c = p[k], d;
        if (c >= '0' && c <= '9') d = c - '0';
        else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
        else return -1;
        v = v << 4 | d;
    }
    *out = v;
    return 0;
}

static size_t utf8_put(char *o, unsigned cp) {
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xC0 | cp >> 6);
        o[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | cp >> 12);
        o[1] = (char)(0x80 | (cp >> 6 & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | cp >> 18);
    o[1] = (char)(0x80 | (cp >> 12 & 0x3F));
    o[2] = (char)(0x80 | (cp >> 6 & 0x3F));
    o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

int tjson_string(tjson *s, const char **out, size_t *out_len, ep_error *err) {
    if (tjson_peek(s) != '"') return tjson_fail(s, err, "expected a string");
    const unsigned char *d = (const unsigned char *)s->doc;
    size_t start = ++s->pos, i = start, n = s->len;
    // Fast path: no escapes, so the string is the document's own bytes.
    for (;;) {
        while (i < n && d[i] >= 0x20 && d[i] < 0x80 && d[i] != '"' && d[i] != '\\') i++;
        if (i >= n) {
            s->pos = i;
            return tjson_fail(s, err, "unterminated string");
        }
        unsigned char c = d[i];
        if (c == '"') {
            *out = s->doc + start;
            *out_len = i - start;
            s->pos = i + 1;
            return 0;
        }
        if (c == '\\') break;
        if (c < 0x20) {
            s->pos = i;
            return tjson_fail(s, err, "control character in a string");
        }
        size_t k = utf8_valid_len(d + i, n - i);
        if (!k) {
            s->pos = i;
            return tjson_fail(s, err, "invalid UTF-8 in a string");
        }
        i += k;
    }
    // Slow path: decode into s->buf. The decoded string is never longer than its JSON spelling.
    size_t o = i - start;
    buf_reserve(s, o + 64);
    memcpy(s->buf, s->doc + start, o);
    for (;;) {
        if (i >= n) {
            s->pos = i;
            return tjson_fail(s, err, "unterminated string");
        }
        buf_reserve(s, o + 8);
        unsigned char c = d[i];
        if (c == '"') break;
        if (c < 0x20) {
            s->pos = i;
            return tjson_fail(s, err, "control character in a string");
        }
        if (c >= 0x80) {
            size_t k = utf8_valid_len(d + i, n - i);
            if (!k) {
                s->pos = i;
                return tjson_fail(s, err, "invalid UTF-8 in a string");
            }
            memcpy(s->buf + o, d + i, k);
            o += k;
            i += k;
            continue;
        }
        if (c != '\\') {
            s->buf[o++] = (char)c;
            i++;
            continue;
        }
        if (i + 1 >= n) {
            s->pos = i;
            return tjson_fail(s, err, "unterminated string");
        }
        unsigned char e = d[i + 1];
        const char *simple = strchr("\"\\/bfnrt", e);
        if (e && simple) {
            static const char decoded[] = "\"\\/\b\f\n\r\t";
            s->buf[o++] = decoded[simple - "\"\\/bfnrt"];
            i += 2;
            continue;
        }
        unsigned cp, lo;
        if (e != 'u' || i + 6 > n || hex4(d + i + 2, &cp)) {
            s->pos = i;
            return tjson_fail(s, err, "invalid escape in a string");
        }
        i += 6;
        if (cp >= 0xDC00 && cp <= 0xDFFF) {
            s->pos = i - 6;
            return tjson_fail(s, err, "invalid Unicode escape (lone low surrogate)");
        }
        if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (i + 6 > n || d[i] != '\\' || d[i + 1] != 'u' || hex4(d + i + 2, &lo) || lo < 0xDC00 || lo > 0xDFFF) {
                s->pos = i - 6;
                return tjson_fail(s, err, "invalid Unicode escape (high surrogate without a low one)");
            }
            i += 6;
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        }
        o += utf8_put(s->buf + o, cp);
    }
    s->buf[o] = 0;
    *out = s->buf;
    *out_len = o;
    s->pos = i + 1;
    return 0;
}

static int is_digit(int c) { return c >= '0' && c <= '9'; }

int tjson_number(tjson *s, int64_t *value, int *is_int, ep_error *err) {
    tjson_peek(s);
    const char *d = s->doc;
    size_t i = s->pos, n = s->len;
    int neg = 0;
    if (i < n && d[i] == '-') {
        neg = 1;
        i++;
    }
    if (i >= n || !is_digit(d[i])) return tjson_fail(s, err, "invalid number");
    uint64_t v = 0;
    int big = 0;
    if (d[i] == '0') {
        i++;
    } else {
        for (; i < n && is_digit(d[i]); i++) {
            if (v > (UINT64_MAX - 9) / 10) big = 1;
            else v = v * 10 + (uint64_t)(d[i] - '0');
        }
    }
    *is_int = 1;
    if (i < n && d[i] == '.') {
        *is_int = 0;
        if (++i >= n || !is_digit(d[i])) {
            s->pos = i;
            return tjson_fail(s, err, "invalid number");
        }
        while (i < n && is_digit(d[i])) i++;
    }
    if (i < n && (d[i] == 'e' || d[i] == 'E')) {
        *is_int = 0;
        i++;
        if (i < n && (d[i] == '+' || d[i] == '-')) i++;
        if (i >= n || !is_digit(d[i])) {
            s->pos = i;
            return tjson_fail(s, err, "invalid number");
        }
        while (i < n && is_digit(d[i])) i++;
    }
    if (big || v > (uint64_t)INT64_MAX) *value = neg ? INT64_MIN : INT64_MAX;
    else *value = neg ? -(int64_t)v : (int64_t)v;
    s->pos = i;
    return 0;
}

static int skip_value(tjson *s, int depth, ep_error *err) {
    if (depth > TJSON_MAX_DEPTH) return tjson_fail(s, err, "maximum nesting depth reached");
    int c = tjson_peek(s);
    const char *str;
    size_t len;
    if (c == '"') return tjson_string(s, &str, &len, err);
    if (c == '{' || c == '[') {
        char close = c == '{' ? '}' : ']';
        s->pos++;
        if (tjson_peek(s) == close) {
            s->pos++;
            return 0;
        }
        for (;;) {
            if (c == '{') {
                if (tjson_string(s, &str, &len, err) || tjson_expect(s, ':', err)) return -1;
            }
            if (skip_value(s, depth + 1, err)) return -1;
            int next = tjson_peek(s);
            s->pos++;
            if (next == close) return 0;
            if (next != ',') {
                s->pos--;
                return tjson_fail(s, err, c == '{' ? "expected ',' or '}'" : "expected ',' or ']'");
            }
        }
    }
    if (c == '-' || is_digit(c)) {
        int64_t v;
        int is_int;
        return tjson_number(s, &v, &is_int, err);
    }
    static const char *const words[3] = {"true", "false", "null"};
    for (int k = 0; k < 3; k++) {
        size_t wl = strlen(words[k]);
        if (s->len - s->pos >= wl && !memcmp(s->doc + s->pos, words[k], wl)) {
            s->pos += wl;
            return 0;
        }
    }
    return tjson_fail(s, err, c < 0 ? "unexpected end of input" : "invalid token");
}

int tjson_skip(tjson *s, ep_error *err) { return skip_value(s, 1, err); }

// Reads the members of the object at the cursor, calling visit(key) for each: visit returns 1 when it has
// consumed the value itself, 0 to have it skipped, -1 on error.
typedef int (*member_fn)(tjson *s, const char *key, size_t key_len, void *ctx, ep_error *err);

static int each_member(tjson *s, member_fn visit, void *ctx, ep_error *err) {
    if (tjson_expect(s, '{', err)) return -1;
    if (tjson_peek(s) == '}') {
        s->pos++;
        return 0;
    }
    for (;;) {
        const char *key;
        size_t key_len;
        if (tjson_string(s, &key, &key_len, err) || tjson_expect(s, ':', err)) return -1;
        int used = visit(s, key, key_len, ctx, err);
        if (used < 0 || (!used && skip_value(s, 2, err))) return -1;
        int next = tjson_peek(s);
        if (next == '}') {
            s->pos++;
            return 0;
        }
        if (next != ',') return tjson_fail(s, err, "expected ',' or '}'");
        s->pos++;
    }
}

typedef struct {
    tjson_span vocab, merges;  // inside the current "model"
} locate_ctx;

static int key_is(const char *key, size_t len, const char *want) { return len == strlen(want) && !memcmp(key, want, len); }

static int visit_model(tjson *s, const char *key, size_t key_len, void *vctx, ep_error *err) {
    locate_ctx *c = vctx;
    int is_vocab = key_is(key, key_len, "vocab");
    if (!is_vocab && !key_is(key, key_len, "merges")) return 0;
    tjson_peek(s);
    long long at = (long long)s->pos;
    if (skip_value(s, 3, err)) return -1;
    *(is_vocab ? &c->vocab : &c->merges) = (tjson_span){at, (long long)s->pos};
    return 1;
}

static int visit_root(tjson *s, const char *key, size_t key_len, void *vctx, ep_error *err) {
    locate_ctx *c = vctx;
    if (!key_is(key, key_len, "model")) return 0;
    // A later "model" replaces an earlier one, as in jansson.
    c->vocab.at = c->merges.at = TJSON_ABSENT;
    if (tjson_peek(s) != '{') return 0;  // not an object: jansson reports it
    // tjson strings point into the document or into s->buf; keys are compared before the next read.
    return each_member(s, visit_model, c, err) ? -1 : 1;
}

int tjson_locate(const char *doc, size_t len, const char *file, tjson_span *vocab, tjson_span *merges, char **rest,
                 size_t *rest_len, ep_error *err) {
    vocab->at = merges->at = TJSON_ABSENT;
    *rest = NULL;
    tjson s;
    tjson_init(&s, doc, len, 0, file);
    locate_ctx c = {{TJSON_ABSENT, 0}, {TJSON_ABSENT, 0}};
    int rc = 0;
    if (tjson_peek(&s) == '{') {
        rc = each_member(&s, visit_root, &c, err);
        if (!rc && tjson_peek(&s) >= 0) rc = tjson_fail(&s, err, "end of file expected");
    }
    tjson_free(&s);
    if (rc) return -1;
    // The rest: the document with the cut values replaced by null and their newlines kept.
    tjson_span cut[2] = {c.vocab, c.merges};
    if (cut[0].at > cut[1].at) {
        tjson_span t = cut[0];
        cut[0] = cut[1];
        cut[1] = t;
    }
    char *out = ep_malloc(len + 8);  // a cut value is at least one byte; "null" and its newlines exceed it by <= 3
    size_t o = 0, from = 0;
    for (int k = 0; k < 2; k++) {
        if (cut[k].at == TJSON_ABSENT) continue;
        size_t a = (size_t)cut[k].at, e = (size_t)cut[k].end;
        memcpy(out + o, doc + from, a - from);
        o += a - from;
        memcpy(out + o, "null", 4);
        o += 4;
        for (const char *p = doc + a; (p = memchr(p, '\n', (size_t)(doc + e - p))) != NULL; p++) out[o++] = '\n';
        from = e;
    }
    memcpy(out + o, doc + from, len - from);
    o += len - from;
    out[o] = 0;
    *rest = out;
    *rest_len = o;
    *vocab = c.vocab;
    *merges = c.merges;
    return 0;
}
