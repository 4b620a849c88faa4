// tokenizer_decode: the decoder chain (pipeline/tokenizer_impl.h).
#include <stdlib.h>
#include <string.h>

#include "pipeline/tokenizer_impl.h"

static size_t piece_len_of(const tokenizer *t, int id) {
    if (t->added_of_id[id] >= 0) return t->added[t->added_of_id[id]].len;
    return strlen(t->model.pieces[id]);
}

static int byte_token_value(const char *s, size_t n) {  // "<0xAB>" -> 0xAB, else -1
    if (n != 6 || s[0] != '<' || s[1] != '0' || s[2] != 'x' || s[5] != '>') return -1;
    int v = 0;
    for (int i = 3; i < 5; i++) {
        char ch = s[i];
        int d = ch >= '0' && ch <= '9' ? ch - '0' : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10 : ch >= 'A' && ch <= 'F' ? ch - 'A' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

static int apply_decoder(const decoder_step *d, const piece_list *in, piece_list *out, regex_scratch *rs, ep_error *err) {
    piece_list_clear(out);
    byte_buf b = {0};
    if (d->kind == DEC_BYTELEVEL) {
        // Every token's characters back to bytes (a token with a character off the map keeps its own
        // bytes), then the whole byte string as lossy UTF-8: one token out.
        for (size_t i = 0; i < in->n; i++) {
            const char *s = in->text.p + in->v[i].off;
            size_t n = in->v[i].len, mark = b.len;
            int all = 1;
            for (size_t k = 0; k < n;) {
                unsigned cp;
                k += utf8_decode(s + k, n - k, &cp);
                int byte = bytelevel_char_to_byte(cp);
                if (byte < 0) {
                    all = 0;
                    break;
                }
                char ch = (char)byte;
                buf_append(&b, &ch, 1);
            }
            if (!all) {
                b.len = mark;
                buf_append(&b, s, n);
            }
        }
        byte_buf clean = {0};
        utf8_sanitize(b.p ? b.p : "", b.len, &clean);
        piece_list_add(out, clean.p, clean.len, 0);
        buf_free(&clean);
    } else if (d->kind == DEC_FUSE) {
        piece_list_add(out, in->text.p ? in->text.p : "", in->text.len, 0);
    } else if (d->kind == DEC_BYTEFALLBACK) {
        // Runs of <0xXX> tokens become their bytes if those are valid UTF-8, else one U+FFFD per byte.
        for (size_t i = 0; i <= in->n; i++) {
            int v = i < in->n ? byte_token_value(in->text.p + in->v[i].off, in->v[i].len) : -1;
            if (v >= 0) {
                char ch = (char)v;
                buf_append(&b, &ch, 1);
                continue;
            }
            if (b.len) {
                byte_buf clean = {0};
                if (utf8_sanitize(b.p, b.len, &clean) == 0) {
                    piece_list_add(out, b.p, b.len, 0);
                } else {
                    for (size_t k = 0; k < b.len; k++) piece_list_add(out, "\xEF\xBF\xBD", 3, 0);
                }
                buf_free(&clean);
                b.len = 0;
            }
            if (i < in->n) piece_list_add(out, in->text.p + in->v[i].off, in->v[i].len, 0);
        }
    } else {
        for (size_t i = 0; i < in->n; i++) {
            const char *s = in->text.p + in->v[i].off;
            size_t n = in->v[i].len;
            b.len = 0;
            buf_append(&b, "", 0);
            if (d->kind == DEC_REPLACE) {
                size_t pos = 0, ms, me;
                while (pos < n) {
                    int rc = regex_find(d->re, s, n, pos, rs, &ms, &me, err);
                    if (rc < 0) {
                        buf_free(&b);
                        return -1;
                    }
                    if (rc == 0 || me == ms) break;
                    buf_append(&b, s + pos, ms - pos);
                    buf_append(&b, d->content, d->content_len);
                    pos = me;
                }
                buf_append(&b, s + pos, n - pos);
            } else if (d->kind == DEC_METASPACE) {
                for (size_t k = 0; k < n;) {
                    unsigned cp;
                    size_t cl = utf8_decode(s + k, n - k, &cp);
                    if (cp == d->replacement) {
                        if (!(i == 0 && !d->prepend_never)) buf_append(&b, " ", 1);
                    } else {
                        buf_append(&b, s + k, cl);
                    }
                    k += cl;
                }
            } else {  // DEC_STRIP: up to `start` leading and `stop` trailing copies of the character
                size_t a = 0, z = n;
                for (int k = 0; k < d->start && a < z; k++) {
                    unsigned cp;
                    size_t cl = utf8_decode(s + a, z - a, &cp);
                    if (cp != d->strip_char) break;
                    a += cl;
                }
                for (int k = 0; k < d->stop && z > a; k++) {
                    size_t p = tokenizer_utf8_prev(s, z);
                    unsigned cp;
                    utf8_decode(s + p, z - p, &cp);
                    if (cp != d->strip_char) break;
                    z = p;
                }
                buf_append(&b, s + a, z - a);
            }
            piece_list_add(out, b.p, b.len, 0);
        }
    }
    buf_free(&b);
    return 0;
}

int tokenizer_decode(const tokenizer *t, const int *ids, int n, int skip_special, char **text, size_t *len,
                     ep_error *err) {
    *text = NULL;
    if (len) *len = 0;
    piece_list a = {0}, b = {0};
    for (int i = 0; i < n; i++) {
        const char *p = tokenizer_piece(t, ids[i]);
        if (!p) {
            piece_list_free(&a);
            return ep_fail(err, "%s: id %d is not in the vocabulary (size %d)", t->name, ids[i], t->n_ids);
        }
        if (skip_special && tokenizer_is_special(t, ids[i])) continue;
        piece_list_add(&a, p, piece_len_of(t, ids[i]), 0);
    }
    byte_buf result = {0};
    buf_append(&result, "", 0);
    if (!t->has_decoder) {
        for (size_t i = 0; i < a.n; i++) {
            if (i) buf_append(&result, " ", 1);
            buf_append(&result, a.text.p + a.v[i].off, a.v[i].len);
        }
    } else {
        regex_scratch rs;
        regex_scratch_init(&rs);
        for (int k = 0; k < t->n_decoders; k++) {
            if (apply_decoder(&t->decoders[k], &a, &b, &rs, err)) {
                regex_scratch_free(&rs);
                piece_list_free(&a);
                piece_list_free(&b);
                buf_free(&result);
                return -1;
            }
            piece_list swap = a;
            a = b;
            b = swap;
        }
        regex_scratch_free(&rs);
        for (size_t i = 0; i < a.n; i++) buf_append(&result, a.text.p + a.v[i].off, a.v[i].len);
    }
    piece_list_free(&a);
    piece_list_free(&b);
    *text = result.p;
    if (len) *len = result.len;
    return 0;
}

