// tokenizer_load: tokenizer.json (or .json.gz) and tokenizer_config.json into a tokenizer
// (pipeline/tokenizer_impl.h).
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <zlib.h>

#include "pipeline/tokenizer_impl.h"

// ---- loading

static char *read_file(const char *path, size_t *len, int *missing, ep_error *err) {
    *missing = 0;
    FILE *plain = fopen(path, "rb");
    if (!plain) {
        *missing = 1;
        ep_fail(err, "%s: cannot open", path);
        return NULL;
    }
    // A plain file is read in one piece (its size known up front); a gzip file (magic 1f 8b) through zlib.
    struct stat st;
    if (fstat(fileno(plain), &st) || !S_ISREG(st.st_mode)) {
        fclose(plain);
        ep_fail(err, "%s: not a regular file", path);
        return NULL;
    }
    unsigned char magic[2] = {0, 0};
    size_t got_magic = fread(magic, 1, 2, plain);
    long size = -1;
    if (!(got_magic == 2 && magic[0] == 0x1f && magic[1] == 0x8b)) size = (long)st.st_size;
    if (size >= 0) {
        char *data = ep_malloc((size_t)size + 1);
        rewind(plain);
        size_t got = fread(data, 1, (size_t)size, plain);
        int bad = ferror(plain) || got != (size_t)size;
        fclose(plain);
        if (bad) {
            free(data);
            ep_fail(err, "%s: read error", path);
            return NULL;
        }
        data[size] = 0;
        *len = (size_t)size;
        return data;
    }
    fclose(plain);
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
            tokenizer_matcher_add(&t->raw_matcher, a->content, a->len, (int)i);
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
        tokenizer_matcher_add(&t->norm_matcher, norm.p, norm.len, (int)i);
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

static int load_parsed(tokenizer *t, json_t *root, const bpe_source *src, ep_error *err) {
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
    if (bpe_load(&t->model, model, src, t->name, err)) return -1;
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
    tokenizer_matcher_init(&t->raw_matcher);
    tokenizer_matcher_init(&t->norm_matcher);
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
    // The vocabulary and merges (nearly all of the file) are read from the text by bpe_load; jansson parses
    // the rest, with those two values cut out.
    bpe_source src = {json, len, {TJSON_ABSENT, 0}, {TJSON_ABSENT, 0}};
    char *rest;
    size_t rest_len;
    if (tjson_locate(json, len, name, &src.vocab, &src.merges, &rest, &rest_len, err)) {
        tokenizer_free(t);
        return -1;
    }
    json_error_t je;
    json_t *root = json_loadb(rest, rest_len, 0, &je);
    free(rest);
    if (!root) {
        ep_fail(err, "%s: malformed JSON at line %d column %d: %s", name, je.line, je.column, je.text);
        tokenizer_free(t);
        return -1;
    }
    int rc = load_parsed(t, root, &src, err);
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
    tokenizer_matcher_free(&t->raw_matcher);
    tokenizer_matcher_free(&t->norm_matcher);
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
