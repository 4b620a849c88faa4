#include "pipeline/tokenizer.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "pipeline/bpe.h"
#include "pipeline/pretok.h"

typedef struct {
    char *content;
    size_t len;
    int id;
    int special, lstrip, rstrip, normalized, single_word;
} added_token;

// Leftmost-longest matcher over a set of added tokens: a byte trie kept in a pairmap
// ((node << 8 | byte) -> child), terminal[node] = index into tokenizer.added or -1.
typedef struct {
    pairmap edges;
    int *terminal;
    int n_nodes;
    unsigned char first_byte[256];  // 1 if some token starts with this byte
    int n_tokens;
} token_matcher;

enum { TPL_SEQUENCE = -1 };

typedef struct {
    int *items;      // per item: TPL_SEQUENCE, or an index into ids_start/ids_len
    int n_items;
    int *ids;        // concatenated special-token ids
    int *ids_start, *ids_len;
    int n_specials;
} template_proc;

enum { DEC_BYTELEVEL, DEC_REPLACE, DEC_BYTEFALLBACK, DEC_FUSE, DEC_STRIP, DEC_METASPACE };

typedef struct {
    int kind;
    pcre2_code *re;
    char *content;
    size_t content_len;
    unsigned strip_char;
    int start, stop;
    unsigned replacement;
    int prepend_never;
} decoder_step;

struct tokenizer {
    char *name;
    bpe_model model;
    normalizer norm;
    pretokenizer pretok;
    added_token *added;
    int n_added;
    int *added_of_id;  // id -> index into added, or -1; n_ids entries
    int n_ids;
    token_matcher raw_matcher, norm_matcher;
    pcre2_code *word_char;  // single_word's notion of a word character
    template_proc *templates;
    int n_templates;
    decoder_step *decoders;
    int n_decoders;
    int has_decoder;
    int bos_id, eos_id, add_bos;
};

// ---- small helpers

static int rust_is_whitespace(unsigned cp) {
    // Rust's char::is_whitespace (the White_Space property), used by added tokens' lstrip/rstrip.
    return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
           (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

static size_t utf8_prev(const char *s, size_t pos) {  // start of the character before pos
    size_t i = pos - 1;
    while (i > 0 && ((unsigned char)s[i] & 0xC0) == 0x80) i--;
    return i;
}

// ---- added tokens

static void matcher_init(token_matcher *m) {
    memset(m, 0, sizeof *m);
    pairmap_init(&m->edges, 64);
    m->n_nodes = 1;
    m->terminal = ep_malloc(sizeof(int));
    m->terminal[0] = -1;
}

static void matcher_free(token_matcher *m) {
    pairmap_free(&m->edges);
    free(m->terminal);
    memset(m, 0, sizeof *m);
}

static void matcher_add(token_matcher *m, const char *s, size_t len, int index) {
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

typedef struct {
    size_t s, e;
    int token;  // added index or -1
} span;

typedef struct {
    span *v;
    size_t n, cap;
} span_list;

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
static void find_added(const tokenizer *t, const token_matcher *m, const char *s, size_t n, span_list *out,
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
                int start_space = start == 0 || !is_word_char(t, s, n, utf8_prev(s, start), rs);
                int stop_space = stop == n || !is_word_char(t, s, n, stop, rs);
                if (!start_space || !stop_space) continue;
            }
            if (a->lstrip) {
                size_t newstart = start;
                while (newstart > 0) {
                    size_t p = utf8_prev(s, newstart);
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

// ---- loading

static char *read_file(const char *path, size_t *len, int *missing, ep_error *err) {
    *missing = 0;
    FILE *probe = fopen(path, "rb");
    if (!probe) {
        *missing = 1;
        ep_fail(err, "%s: cannot open", path);
        return NULL;
    }
    fclose(probe);
    // gzread reads gzip and plain files alike.
    gzFile f = gzopen(path, "rb");
    if (!f) {
        ep_fail(err, "%s: cannot open", path);
        return NULL;
    }
    size_t cap = 1 << 20, n = 0;
    char *data = ep_malloc(cap);
    for (;;) {
        if (n + (1 << 16) + 1 > cap) data = ep_realloc(data, cap *= 2);
        int got = gzread(f, data + n, 1 << 16);
        if (got < 0) {
            int code;
            const char *msg = gzerror(f, &code);
            ep_fail(err, "%s: read error: %s", path, msg);
            gzclose(f);
            free(data);
            return NULL;
        }
        if (got == 0) break;
        n += (size_t)got;
    }
    gzclose(f);
    data[n] = 0;
    *len = n;
    return data;
}

static int parse_added(tokenizer *t, json_t *list, ep_error *err) {
    if (!list || json_is_null(list)) return 0;
    if (!json_is_array(list)) return ep_fail(err, "%s: added_tokens is not an array", t->name);
    t->n_added = (int)json_array_size(list);
    t->added = ep_calloc((size_t)t->n_added + 1, sizeof(added_token));
    size_t i;
    json_t *v;
    json_array_foreach(list, i, v) {
        json_t *content = json_object_get(v, "content"), *id = json_object_get(v, "id");
        if (!json_is_string(content) || !json_is_integer(id) || json_integer_value(id) < 0 ||
            json_integer_value(id) >= BPE_MAX_ID)
            return ep_fail(err, "%s: added_tokens[%zu] needs a string content and an integer id in [0, %d)", t->name, i,
                           BPE_MAX_ID);
        added_token *a = &t->added[i];
        a->len = json_string_length(content);
        a->content = ep_malloc(a->len + 1);
        memcpy(a->content, json_string_value(content), a->len + 1);
        a->id = (int)json_integer_value(id);
        a->special = json_is_true(json_object_get(v, "special"));
        a->lstrip = json_is_true(json_object_get(v, "lstrip"));
        a->rstrip = json_is_true(json_object_get(v, "rstrip"));
        a->single_word = json_is_true(json_object_get(v, "single_word"));
        json_t *normalized = json_object_get(v, "normalized");
        // tokenizers' default: normalized unless special.
        a->normalized = normalized ? json_is_true(normalized) : !a->special;  // the serde default
        if (!a->normalized) {
            matcher_add(&t->raw_matcher, a->content, a->len, (int)i);
            continue;
        }
        // A normalized token is matched in normalized text, so its own content is normalized first
        // (with Prepend, "▁world" is looked for as "▁▁world"), as tokenizers does.
        byte_buf norm = {0};
        regex_scratch rs;
        regex_scratch_init(&rs);
        int rc = normalizer_apply(&t->norm, a->content, a->len, &norm, &rs, err);
        regex_scratch_free(&rs);
        if (rc) {
            buf_free(&norm);
            return ep_wrap(err, "%s: added_tokens[%zu]", t->name, i);
        }
        matcher_add(&t->norm_matcher, norm.p, norm.len, (int)i);
        buf_free(&norm);
    }
    return 0;
}

static int parse_post(tokenizer *t, json_t *j, const char *field, ep_error *err) {
    if (!j || json_is_null(j)) return 0;
    const char *type = json_string_value(json_object_get(j, "type"));
    if (!type) return ep_fail(err, "%s: %s.type is missing", t->name, field);
    char sub[256];
    if (!strcmp(type, "Sequence")) {
        json_t *list = json_object_get(j, "processors");
        if (!json_is_array(list)) return ep_fail(err, "%s: %s.processors is not an array", t->name, field);
        size_t i;
        json_t *v;
        json_array_foreach(list, i, v) {
            snprintf(sub, sizeof sub, "%s.processors[%zu]", field, i);
            if (parse_post(t, v, sub, err)) return -1;
        }
        return 0;
    }
    if (!strcmp(type, "ByteLevel")) return 0;  // only moves offsets; ids are unchanged
    if (strcmp(type, "TemplateProcessing"))
        return ep_fail(err, "%s: %s.type = \"%s\" is not supported (supported: TemplateProcessing, ByteLevel, Sequence)",
                       t->name, field, type);
    json_t *single = json_object_get(j, "single"), *specials = json_object_get(j, "special_tokens");
    if (!json_is_array(single)) return ep_fail(err, "%s: %s.single is not an array", t->name, field);
    if (!json_is_object(specials)) return ep_fail(err, "%s: %s.special_tokens is not an object", t->name, field);
    t->templates = ep_realloc(t->templates, sizeof(template_proc) * (size_t)(t->n_templates + 1));
    template_proc *tp = &t->templates[t->n_templates++];
    memset(tp, 0, sizeof *tp);
    size_t n_items = json_array_size(single), total_ids = 0;
    tp->items = ep_calloc(n_items + 1, sizeof(int));
    tp->ids_start = ep_calloc(n_items + 1, sizeof(int));
    tp->ids_len = ep_calloc(n_items + 1, sizeof(int));
    tp->ids = ep_calloc(1, sizeof(int));
    size_t i;
    json_t *item;
    json_array_foreach(single, i, item) {
        json_t *seq = json_object_get(item, "Sequence"), *sp = json_object_get(item, "SpecialToken");
        if (seq) {
            const char *which = json_string_value(json_object_get(seq, "id"));
            if (!which || strcmp(which, "A"))
                return ep_fail(err, "%s: %s.single[%zu]: only sequence \"A\" is supported in a single template", t->name, field, i);
            tp->items[tp->n_items++] = TPL_SEQUENCE;
        } else if (sp) {
            const char *name = json_string_value(json_object_get(sp, "id"));
            json_t *def = name ? json_object_get(specials, name) : NULL;
            json_t *ids = def ? json_object_get(def, "ids") : NULL;
            if (!json_is_array(ids))
                return ep_fail(err, "%s: %s.single[%zu]: special token \"%s\" has no ids in special_tokens", t->name, field, i,
                               name ? name : "?");
            tp->ids = ep_realloc(tp->ids, sizeof(int) * (total_ids + json_array_size(ids) + 1));
            tp->ids_start[tp->n_specials] = (int)total_ids;
            size_t k;
            json_t *idv;
            json_array_foreach(ids, k, idv) {
                if (!json_is_integer(idv)) return ep_fail(err, "%s: %s.special_tokens[\"%s\"].ids[%zu] is not an integer", t->name, field, name, k);
                tp->ids[total_ids++] = (int)json_integer_value(idv);
            }
            tp->ids_len[tp->n_specials] = (int)json_array_size(ids);
            tp->items[tp->n_items++] = tp->n_specials++;
        } else {
            return ep_fail(err, "%s: %s.single[%zu] is neither Sequence nor SpecialToken", t->name, field, i);
        }
    }
    return 0;
}

static int parse_decoder(tokenizer *t, json_t *j, const char *field, ep_error *err) {
    if (!json_is_object(j)) return ep_fail(err, "%s: %s is not an object", t->name, field);
    const char *type = json_string_value(json_object_get(j, "type"));
    if (!type) return ep_fail(err, "%s: %s.type is missing", t->name, field);
    char sub[256];
    if (!strcmp(type, "Sequence")) {
        json_t *list = json_object_get(j, "decoders");
        if (!json_is_array(list)) return ep_fail(err, "%s: %s.decoders is not an array", t->name, field);
        size_t i;
        json_t *v;
        json_array_foreach(list, i, v) {
            snprintf(sub, sizeof sub, "%s.decoders[%zu]", field, i);
            if (parse_decoder(t, v, sub, err)) return -1;
        }
        return 0;
    }
    decoder_step d = {0};
    if (!strcmp(type, "ByteLevel")) {
        d.kind = DEC_BYTELEVEL;
    } else if (!strcmp(type, "ByteFallback")) {
        d.kind = DEC_BYTEFALLBACK;
    } else if (!strcmp(type, "Fuse")) {
        d.kind = DEC_FUSE;
    } else if (!strcmp(type, "Replace")) {
        d.kind = DEC_REPLACE;
        json_t *content = json_object_get(j, "content");
        if (!json_is_string(content)) return ep_fail(err, "%s: %s.content is not a string", t->name, field);
        snprintf(sub, sizeof sub, "%s.pattern", field);
        if (!(d.re = pattern_compile(json_object_get(j, "pattern"), t->name, sub, err))) return -1;
        d.content_len = json_string_length(content);
        d.content = ep_malloc(d.content_len + 1);
        memcpy(d.content, json_string_value(content), d.content_len + 1);
    } else if (!strcmp(type, "Strip")) {
        d.kind = DEC_STRIP;
        const char *c = json_string_value(json_object_get(j, "content"));
        json_t *start = json_object_get(j, "start"), *stop = json_object_get(j, "stop");
        if (!c || !*c || !json_is_integer(start) || !json_is_integer(stop))
            return ep_fail(err, "%s: %s needs a one-character content and integer start and stop", t->name, field);
        utf8_decode(c, strlen(c), &d.strip_char);
        d.start = (int)json_integer_value(start);
        d.stop = (int)json_integer_value(stop);
    } else if (!strcmp(type, "Metaspace")) {
        d.kind = DEC_METASPACE;
        const char *r = json_string_value(json_object_get(j, "replacement"));
        if (!r || !*r) return ep_fail(err, "%s: %s.replacement is not a character", t->name, field);
        utf8_decode(r, strlen(r), &d.replacement);
        const char *scheme = json_string_value(json_object_get(j, "prepend_scheme"));
        json_t *aps = json_object_get(j, "add_prefix_space");
        d.prepend_never = scheme ? !strcmp(scheme, "never") : (aps && !json_is_true(aps));
    } else {
        return ep_fail(err, "%s: %s.type = \"%s\" is not supported (supported: ByteLevel, ByteFallback, Fuse, Replace, Strip, Metaspace, Sequence)",
                       t->name, field, type);
    }
    t->decoders = ep_realloc(t->decoders, sizeof(decoder_step) * (size_t)(t->n_decoders + 1));
    t->decoders[t->n_decoders++] = d;
    return 0;
}

int tokenizer_token_id(const tokenizer *t, const char *piece) {
    size_t len = strlen(piece);
    for (int i = t->n_added - 1; i >= 0; i--)
        if (t->added[i].len == len && !memcmp(t->added[i].content, piece, len)) return t->added[i].id;
    int id;
    return strmap_get(&t->model.vocab, piece, len, &id) ? id : -1;
}

static const char *config_token(json_t *cfg, const char *key) {
    json_t *v = json_object_get(cfg, key);
    if (json_is_string(v)) return json_string_value(v);
    if (json_is_object(v)) return json_string_value(json_object_get(v, "content"));
    return NULL;
}

static int parse_config(tokenizer *t, const char *text, size_t len, const char *name, ep_error *err) {
    json_error_t je;
    json_t *cfg = json_loadb(text, len, JSON_DECODE_INT_AS_REAL, &je);  // model_max_length can be 1e30
    if (!cfg) return ep_fail(err, "%s: malformed JSON at line %d: %s", name, je.line, je.text);
    if (!json_is_object(cfg)) {
        json_decref(cfg);
        return ep_fail(err, "%s: not a JSON object", name);
    }
    const char *keys[2] = {"bos_token", "eos_token"};
    int *dst[2] = {&t->bos_id, &t->eos_id};
    for (int k = 0; k < 2; k++) {
        const char *tok = config_token(cfg, keys[k]);
        if (!tok) continue;
        *dst[k] = tokenizer_token_id(t, tok);
        if (*dst[k] < 0) {
            int rc = ep_fail(err, "%s: %s = \"%s\" is not a token of the tokenizer", name, keys[k], tok);
            json_decref(cfg);
            return rc;
        }
    }
    t->add_bos = json_is_true(json_object_get(cfg, "add_bos_token"));
    json_decref(cfg);
    return 0;
}

static int load_parsed(tokenizer *t, json_t *root, ep_error *err) {
    if (!json_is_object(root)) return ep_fail(err, "%s: not a JSON object", t->name);
    json_t *trunc = json_object_get(root, "truncation"), *pad = json_object_get(root, "padding");
    if (trunc && !json_is_null(trunc)) return ep_fail(err, "%s: truncation is not supported (only null)", t->name);
    if (pad && !json_is_null(pad)) return ep_fail(err, "%s: padding is not supported (only null)", t->name);
    json_t *model = json_object_get(root, "model");
    if (!json_is_object(model)) return ep_fail(err, "%s: model is missing or not an object", t->name);
    const char *mtype = json_string_value(json_object_get(model, "type"));
    // Older files omit model.type; a BPE model is recognised by its merges.
    if (mtype ? strcmp(mtype, "BPE") : !json_object_get(model, "merges"))
        return ep_fail(err, "%s: model.type = \"%s\" is not supported (only BPE)", t->name, mtype ? mtype : "(missing)");
    if (bpe_load(&t->model, model, t->name, err)) return -1;
    if (normalizer_parse(&t->norm, json_object_get(root, "normalizer"), t->name, err)) return -1;
    if (pretokenizer_parse(&t->pretok, json_object_get(root, "pre_tokenizer"), t->name, err)) return -1;
    if (parse_added(t, json_object_get(root, "added_tokens"), err)) return -1;
    if (parse_post(t, json_object_get(root, "post_processor"), "post_processor", err)) return -1;
    json_t *dec = json_object_get(root, "decoder");
    if (dec && !json_is_null(dec)) {
        t->has_decoder = 1;
        if (parse_decoder(t, dec, "decoder", err)) return -1;
    }
    t->n_ids = t->model.n_pieces;
    for (int i = 0; i < t->n_added; i++)
        if (t->added[i].id + 1 > t->n_ids) t->n_ids = t->added[i].id + 1;
    t->added_of_id = ep_malloc(sizeof(int) * ((size_t)t->n_ids + 1));
    for (int i = 0; i < t->n_ids; i++) t->added_of_id[i] = -1;
    for (int i = 0; i < t->n_added; i++) t->added_of_id[t->added[i].id] = i;
    for (int k = 0; k < t->n_templates; k++)
        for (int i = 0; i < t->templates[k].n_specials; i++)
            for (int j = 0; j < t->templates[k].ids_len[i]; j++) {
                int id = t->templates[k].ids[t->templates[k].ids_start[i] + j];
                if (!tokenizer_piece(t, id))
                    return ep_fail(err, "%s: post_processor: special token id %d is not in the vocabulary", t->name, id);
            }
    return 0;
}

static tokenizer *tokenizer_new(const char *name) {
    tokenizer *t = ep_calloc(1, sizeof *t);
    t->name = ep_strdup(name);
    t->bos_id = t->eos_id = -1;
    matcher_init(&t->raw_matcher);
    matcher_init(&t->norm_matcher);
    return t;
}

// Messages quote names from the file (a type, a key, a merge); a newline or other control character in
// one must not break the one-line contract.
static int one_line(ep_error *err) {
    if (err)
        for (char *p = err->msg; *p; p++)
            if ((unsigned char)*p < 0x20 || *p == 0x7f) *p = '?';
    return -1;
}

static int load_json(const char *json, size_t len, const char *config_json, size_t config_len, const char *name,
                     tokenizer **out, ep_error *err);

int tokenizer_load_json(const char *json, size_t len, const char *config_json, size_t config_len, const char *name,
                        tokenizer **out, ep_error *err) {
    return load_json(json, len, config_json, config_len, name, out, err) ? one_line(err) : 0;
}

static int load_json(const char *json, size_t len, const char *config_json, size_t config_len, const char *name,
                     tokenizer **out, ep_error *err) {
    *out = NULL;
    tokenizer *t = tokenizer_new(name);
    ep_error ignored;
    // single_word tests the Rust regex crate's \\w: Alphabetic, marks, decimal digits, connector punctuation
    // and the join controls (ZWNJ, ZWJ).
    static const char word_re[] = "[\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\x{200C}\\x{200D}]";
    t->word_char = regex_compile(word_re, strlen(word_re), 0, name, "(word characters)", &ignored);
    json_error_t je;
    json_t *root = json_loadb(json, len, 0, &je);
    if (!root) {
        ep_fail(err, "%s: malformed JSON at line %d column %d: %s", name, je.line, je.column, je.text);
        tokenizer_free(t);
        return -1;
    }
    int rc = load_parsed(t, root, err);
    json_decref(root);
    if (!rc && config_json) {
        char cfg_name[1100];
        const char *slash = strrchr(name, '/');
        snprintf(cfg_name, sizeof cfg_name, "%.*stokenizer_config.json", slash ? (int)(slash - name + 1) : 0, name);
        rc = parse_config(t, config_json, config_len, cfg_name, err);
    }
    if (rc) {
        tokenizer_free(t);
        return -1;
    }
    *out = t;
    return 0;
}

int tokenizer_load(const char *dir, tokenizer **out, ep_error *err) {
    *out = NULL;
    char path[4096], cfg_path[4096];
    size_t len = 0, cfg_len = 0;
    int missing;
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    char *json = read_file(path, &len, &missing, err);
    if (!json && missing) {
        snprintf(path, sizeof path, "%s/tokenizer.json.gz", dir);
        json = read_file(path, &len, &missing, err);
        if (!json && missing) return ep_fail(err, "%s: no tokenizer.json or tokenizer.json.gz in this directory", dir);
    }
    if (!json) return -1;
    snprintf(cfg_path, sizeof cfg_path, "%s/tokenizer_config.json", dir);
    char *cfg = read_file(cfg_path, &cfg_len, &missing, err);
    if (!cfg && !missing) {
        free(json);
        return -1;
    }
    int rc = tokenizer_load_json(json, len, cfg, cfg_len, path, out, err);
    free(json);
    free(cfg);
    return rc ? one_line(err) : 0;
}

void tokenizer_free(tokenizer *t) {
    if (!t) return;
    bpe_free(&t->model);
    normalizer_free(&t->norm);
    pretokenizer_free(&t->pretok);
    for (int i = 0; i < t->n_added; i++) free(t->added[i].content);
    free(t->added);
    free(t->added_of_id);
    matcher_free(&t->raw_matcher);
    matcher_free(&t->norm_matcher);
    pcre2_code_free(t->word_char);
    for (int i = 0; i < t->n_templates; i++) {
        free(t->templates[i].items);
        free(t->templates[i].ids);
        free(t->templates[i].ids_start);
        free(t->templates[i].ids_len);
    }
    free(t->templates);
    for (int i = 0; i < t->n_decoders; i++) {
        pcre2_code_free(t->decoders[i].re);
        free(t->decoders[i].content);
    }
    free(t->decoders);
    free(t->name);
    free(t);
}

// ---- encoding

// Per-call state: scratch buffers and the word cache (words repeat a lot in running text).
typedef struct {
    regex_scratch rs;
    bpe_scratch bs;
    byte_buf clean, normalized;
    span_list raw_spans, norm_spans;
    piece_list pieces, tmp;
    strmap cache;            // word -> index into cache_at
    int_vec cache_ids;       // ids of cached words, back to back
    int_vec cache_at;        // per cached word: start, count
} encode_ctx;

enum { CACHE_MAX_WORD = 256 };

static void ctx_free(encode_ctx *c) {
    regex_scratch_free(&c->rs);
    bpe_scratch_free(&c->bs);
    buf_free(&c->clean);
    buf_free(&c->normalized);
    free(c->raw_spans.v);
    free(c->norm_spans.v);
    piece_list_free(&c->pieces);
    piece_list_free(&c->tmp);
    strmap_free(&c->cache);
    free(c->cache_ids.v);
    free(c->cache_at.v);
}

static int encode_word(const tokenizer *t, encode_ctx *c, const char *w, size_t n, int_vec *out, ep_error *err) {
    int slot;
    if (n <= CACHE_MAX_WORD && strmap_get(&c->cache, w, n, &slot)) {
        int start = c->cache_at.v[2 * slot], count = c->cache_at.v[2 * slot + 1];
        for (int i = 0; i < count; i++) int_vec_push(out, c->cache_ids.v[start + i]);
        return 0;
    }
    size_t before = out->n;
    if (bpe_encode_word(&t->model, w, n, &c->bs, out, err)) return -1;
    if (n <= CACHE_MAX_WORD) {
        int entry = (int)(c->cache_at.n / 2);
        int_vec_push(&c->cache_at, (int)c->cache_ids.n);
        int_vec_push(&c->cache_at, (int)(out->n - before));
        for (size_t i = before; i < out->n; i++) int_vec_push(&c->cache_ids, out->v[i]);
        strmap_put(&c->cache, w, n, entry);
    }
    return 0;
}

static int encode_plain(const tokenizer *t, encode_ctx *c, const char *s, size_t n, int first, int_vec *out, ep_error *err) {
    if (normalizer_apply(&t->norm, s, n, &c->normalized, &c->rs, err)) return -1;
    find_added(t, &t->norm_matcher, c->normalized.p, c->normalized.len, &c->norm_spans, &c->rs);
    for (size_t i = 0; i < c->norm_spans.n; i++) {
        span sp = c->norm_spans.v[i];
        if (sp.token >= 0) {
            int_vec_push(out, t->added[sp.token].id);
            continue;
        }
        if (pretokenizer_apply(&t->pretok, c->normalized.p + sp.s, sp.e - sp.s, first && sp.s == 0, &c->pieces, &c->tmp,
                               &c->rs, err))
            return -1;
        for (size_t k = 0; k < c->pieces.n; k++)
            if (encode_word(t, c, c->pieces.text.p + c->pieces.v[k].off, c->pieces.v[k].len, out, err)) return -1;
    }
    return 0;
}

int tokenizer_encode(const tokenizer *t, const char *text, size_t len, int add_special, int **ids, int *n_ids,
                     ep_error *err) {
    *ids = NULL;
    *n_ids = 0;
    encode_ctx c = {0};
    regex_scratch_init(&c.rs);
    strmap_init(&c.cache, 256);
    int_vec out = {0};
    utf8_sanitize(text ? text : "", text ? len : 0, &c.clean);
    find_added(t, &t->raw_matcher, c.clean.p, c.clean.len, &c.raw_spans, &c.rs);
    int rc = 0;
    for (size_t i = 0; i < c.raw_spans.n && !rc; i++) {
        span sp = c.raw_spans.v[i];
        if (sp.token >= 0) int_vec_push(&out, t->added[sp.token].id);
        else rc = encode_plain(t, &c, c.clean.p + sp.s, sp.e - sp.s, sp.s == 0, &out, err);
    }
    if (!rc && add_special) {
        for (int k = 0; k < t->n_templates; k++) {
            const template_proc *tp = &t->templates[k];
            int_vec applied = {0};
            for (int i = 0; i < tp->n_items; i++) {
                if (tp->items[i] == TPL_SEQUENCE) {
                    for (size_t j = 0; j < out.n; j++) int_vec_push(&applied, out.v[j]);
                } else {
                    for (int j = 0; j < tp->ids_len[tp->items[i]]; j++)
                        int_vec_push(&applied, tp->ids[tp->ids_start[tp->items[i]] + j]);
                }
            }
            free(out.v);
            out = applied;
        }
    }
    ctx_free(&c);
    if (rc) {
        free(out.v);
        return -1;
    }
    *ids = out.v ? out.v : ep_malloc(sizeof(int));
    *n_ids = (int)out.n;
    return 0;
}

// ---- decoding

const char *tokenizer_piece(const tokenizer *t, int id) {
    if (id < 0 || id >= t->n_ids) return NULL;
    if (t->added_of_id[id] >= 0) return t->added[t->added_of_id[id]].content;
    return id < t->model.n_pieces ? t->model.pieces[id] : NULL;
}

int tokenizer_vocab_size(const tokenizer *t) { return t->n_ids; }
int tokenizer_bos_id(const tokenizer *t) { return t->bos_id; }
int tokenizer_eos_id(const tokenizer *t) { return t->eos_id; }
int tokenizer_add_bos(const tokenizer *t) { return t->add_bos; }

int tokenizer_is_special(const tokenizer *t, int id) {
    return id >= 0 && id < t->n_ids && t->added_of_id[id] >= 0 && t->added[t->added_of_id[id]].special;
}

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
                    size_t p = utf8_prev(s, z);
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
