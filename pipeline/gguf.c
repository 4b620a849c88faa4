#include "gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "pipeline/mapped_file.h"

#include "pipeline/safetensors.h"  // f16_to_f32, bf16_to_f32

// Keys and names longer than this are not real GGUF content (llama.cpp uses a few dozen bytes).
#define MAX_NAME_BYTES 65536
// Nesting of arrays of arrays beyond this is treated as corrupt (GGUF files use none).
#define MAX_ARRAY_DEPTH 4

// A bounds-checked reading position in the file's bytes. Every read checks the remaining length first,
// so a corrupt count or length can never move the cursor outside the mapping.
typedef struct {
    const unsigned char *bytes;
    size_t size, pos;
    const char *path;
    ep_error *err;
} cursor;

static int need(cursor *c, uint64_t n, const char *field) {
    if (n > c->size - c->pos)
        return ep_fail(c->err, "%s: %s: needs %llu bytes at offset %zu, but the file has %zu (truncated or corrupt)",
                       c->path, field, (unsigned long long)n, c->pos, c->size);
    return 0;
}

static uint64_t le(const unsigned char *p, int n) {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

static int read_u32(cursor *c, uint32_t *out, const char *field) {
    if (need(c, 4, field)) return -1;
    *out = (uint32_t)le(c->bytes + c->pos, 4);
    c->pos += 4;
    return 0;
}

static int read_u64(cursor *c, uint64_t *out, const char *field) {
    if (need(c, 8, field)) return -1;
    *out = le(c->bytes + c->pos, 8);
    c->pos += 8;
    return 0;
}

static int read_string(cursor *c, gguf_string *s, const char *field) {
    uint64_t len;
    if (read_u64(c, &len, field) || need(c, len, field)) return -1;
    s->ptr = (const char *)c->bytes + c->pos;
    s->len = len;
    c->pos += (size_t)len;
    return 0;
}

static char *string_dup(const gguf_string *s) {
    char *p = ep_malloc((size_t)s->len + 1);
    memcpy(p, s->ptr, (size_t)s->len);
    p[s->len] = 0;
    return p;
}

static size_t scalar_size(uint32_t type) {
    switch (type) {
    case GGUF_U8: case GGUF_I8: case GGUF_BOOL: return 1;
    case GGUF_U16: case GGUF_I16: return 2;
    case GGUF_U32: case GGUF_I32: case GGUF_F32: return 4;
    case GGUF_U64: case GGUF_I64: case GGUF_F64: return 8;
    default: return 0;
    }
}

// Widens a scalar at p into the kv's i/u/f.
static int decode_scalar(const unsigned char *p, uint32_t type, gguf_kv *kv) {
    uint64_t raw = le(p, (int)scalar_size(type));
    switch (type) {
    case GGUF_U8: case GGUF_U16: case GGUF_U32: case GGUF_U64: case GGUF_BOOL:
        kv->u = raw;
        kv->i = raw > INT64_MAX ? INT64_MAX : (int64_t)raw;
        break;
    case GGUF_I8: kv->i = (int8_t)raw; break;
    case GGUF_I16: kv->i = (int16_t)raw; break;
    case GGUF_I32: kv->i = (int32_t)raw; break;
    case GGUF_I64: memcpy(&kv->i, &raw, 8); break;
    case GGUF_F32: {
        uint32_t u = (uint32_t)raw;
        float f;
        memcpy(&f, &u, 4);
        kv->f = f;
        break;
    }
    case GGUF_F64: memcpy(&kv->f, &raw, 8); break;
    default: return -1;
    }
    if (type == GGUF_BOOL && raw > 1) return -1;
    if (type != GGUF_F32 && type != GGUF_F64) kv->f = (double)kv->i;
    if (type == GGUF_I8 || type == GGUF_I16 || type == GGUF_I32 || type == GGUF_I64) kv->u = (uint64_t)kv->i;
    return 0;
}

// Validates (and skips) an array's elements; fills kv's array fields at depth 0.
static int read_array(cursor *c, gguf_kv *kv, int depth, const char *key) {
    uint32_t et;
    uint64_t n;
    char field[600];
    snprintf(field, sizeof field, "metadata '%.500s' (array)", key);
    if (read_u32(c, &et, field) || read_u64(c, &n, field)) return -1;
    if (et > GGUF_F64)
        return ep_fail(c->err, "%s: metadata '%.500s': unknown array element type %u", c->path, key, et);
    if (et == GGUF_ARRAY && depth + 1 >= MAX_ARRAY_DEPTH)
        return ep_fail(c->err, "%s: metadata '%.500s': arrays nested deeper than %d", c->path, key, MAX_ARRAY_DEPTH);
    // Every element takes at least one byte (strings and arrays at least 8), so a count larger than the
    // rest of the file is corrupt; checking first keeps the allocation below bounded by the file size.
    size_t min_elem = scalar_size(et) ? scalar_size(et) : 8;
    if (n > (c->size - c->pos) / min_elem)
        return ep_fail(c->err, "%s: metadata '%.500s': %llu elements do not fit in the %zu bytes left (truncated?)",
                       c->path, key, (unsigned long long)n, c->size - c->pos);
    if (depth == 0) {
        kv->elem_type = (gguf_value_type)et;
        kv->n = n;
        kv->data = c->bytes + c->pos;
    }
    if (scalar_size(et)) {
        if (need(c, n * scalar_size(et), field)) return -1;
        if (et == GGUF_BOOL)
            for (uint64_t i = 0; i < n; i++)
                if (c->bytes[c->pos + i] > 1)
                    return ep_fail(c->err, "%s: metadata '%.500s'[%llu]: bool is %u, expected 0 or 1", c->path, key,
                                   (unsigned long long)i, c->bytes[c->pos + i]);
        c->pos += (size_t)(n * scalar_size(et));
        return 0;
    }
    if (et == GGUF_STRING) {
        gguf_string *strs = depth == 0 ? ep_malloc(sizeof(gguf_string) * (size_t)(n ? n : 1)) : NULL;
        if (depth == 0) kv->strs = strs;
        for (uint64_t i = 0; i < n; i++) {
            gguf_string s;
            if (read_string(c, &s, field)) return -1;
            if (strs) strs[i] = s;
        }
        return 0;
    }
    for (uint64_t i = 0; i < n; i++) {
        gguf_kv inner = {0};
        if (read_array(c, &inner, depth + 1, key)) return -1;
    }
    return 0;
}

static int read_kv(cursor *c, gguf_kv *kv, int index) {
    gguf_string key;
    char field[64];
    snprintf(field, sizeof field, "metadata key %d", index);
    if (read_string(c, &key, field)) return -1;
    if (key.len == 0 || key.len > MAX_NAME_BYTES || memchr(key.ptr, 0, (size_t)key.len))
        return ep_fail(c->err, "%s: %s: length %llu, expected 1..%d bytes without NUL", c->path, field,
                       (unsigned long long)key.len, MAX_NAME_BYTES);
    kv->key = string_dup(&key);
    uint32_t type;
    char vfield[600];
    snprintf(vfield, sizeof vfield, "metadata '%.500s'", kv->key);
    if (read_u32(c, &type, vfield)) return -1;
    if (type > GGUF_F64) return ep_fail(c->err, "%s: metadata '%.500s': unknown value type %u", c->path, kv->key, type);
    kv->type = (gguf_value_type)type;
    if (type == GGUF_STRING) return read_string(c, &kv->str, vfield);
    if (type == GGUF_ARRAY) return read_array(c, kv, 0, kv->key);
    if (need(c, scalar_size(type), vfield)) return -1;
    if (decode_scalar(c->bytes + c->pos, type, kv))
        return ep_fail(c->err, "%s: metadata '%.500s': bool is %u, expected 0 or 1", c->path, kv->key, c->bytes[c->pos]);
    c->pos += scalar_size(type);
    return 0;
}

// --- tensor types ---

typedef struct {
    uint32_t type;
    const char *name;
    int block;           // elements per block
    size_t block_bytes;  // bytes per block
    int supported;       // gguf_dequantize handles it
} type_info;

// Types this reader knows by size (so it can validate a file holding them); only `supported` ones
// dequantize. Sizes from ggml.c's type_traits.
static const type_info type_table[] = {
    {GGML_F32, "F32", 1, 4, 1},     {GGML_F16, "F16", 1, 2, 1},     {GGML_Q4_0, "Q4_0", 32, 18, 1},
    {GGML_Q4_1, "Q4_1", 32, 20, 1}, {6, "Q5_0", 32, 22, 0},         {7, "Q5_1", 32, 24, 0},
    {GGML_Q8_0, "Q8_0", 32, 34, 1}, {9, "Q8_1", 32, 36, 0},         {10, "Q2_K", 256, 84, 0},
    {11, "Q3_K", 256, 110, 0},      {12, "Q4_K", 256, 144, 0},      {13, "Q5_K", 256, 176, 0},
    {14, "Q6_K", 256, 210, 0},      {15, "Q8_K", 256, 292, 0},      {24, "I8", 1, 1, 0},
    {25, "I16", 1, 2, 0},           {26, "I32", 1, 4, 0},           {27, "I64", 1, 8, 0},
    {28, "F64", 1, 8, 0},           {GGML_BF16, "BF16", 1, 2, 1},
};

static const type_info *find_type(uint32_t type) {
    for (size_t i = 0; i < sizeof type_table / sizeof type_table[0]; i++)
        if (type_table[i].type == type) return &type_table[i];
    return NULL;
}

const char *gguf_type_name(uint32_t type) {
    const type_info *t = find_type(type);
    return t ? t->name : NULL;
}

int gguf_type_supported(uint32_t type) {
    const type_info *t = find_type(type);
    return t && t->supported;
}

static int read_tensor_info(cursor *c, gguf_tensor *t, int index) {
    gguf_string name;
    char field[600];
    snprintf(field, sizeof field, "tensor info %d", index);
    if (read_string(c, &name, field)) return -1;
    if (name.len == 0 || name.len > MAX_NAME_BYTES || memchr(name.ptr, 0, (size_t)name.len))
        return ep_fail(c->err, "%s: tensor info %d: name length %llu, expected 1..%d bytes without NUL", c->path,
                       index, (unsigned long long)name.len, MAX_NAME_BYTES);
    t->name = string_dup(&name);
    snprintf(field, sizeof field, "tensor '%.500s'", t->name);
    uint32_t ndim, type;
    if (read_u32(c, &ndim, field)) return -1;
    if (ndim < 1 || ndim > GGUF_MAX_DIMS)
        return ep_fail(c->err, "%s: tensor '%.500s': %u dimensions, expected 1..%d", c->path, t->name, ndim, GGUF_MAX_DIMS);
    t->ndim = (int)ndim;
    t->numel = 1;
    for (int d = 0; d < GGUF_MAX_DIMS; d++) t->ne[d] = 1;
    for (int d = 0; d < t->ndim; d++) {
        uint64_t ne;
        if (read_u64(c, &ne, field)) return -1;
        if (ne > ((uint64_t)1 << 40) || (ne && (uint64_t)t->numel > ((uint64_t)1 << 42) / ne))
            return ep_fail(c->err, "%s: tensor '%.500s': ne[%d] = %llu makes the tensor too large", c->path, t->name, d,
                           (unsigned long long)ne);
        t->ne[d] = (int64_t)ne;
        t->numel *= (int64_t)ne;
    }
    if (read_u32(c, &type, field) || read_u64(c, &t->offset, field)) return -1;
    const type_info *ti = find_type(type);
    if (!ti) return ep_fail(c->err, "%s: tensor '%.500s': unknown ggml type %u", c->path, t->name, type);
    t->type = type;
    if (t->ne[0] % ti->block)
        return ep_fail(c->err, "%s: tensor '%.500s': row length ne[0] = %lld is not a multiple of %s's block of %d",
                       c->path, t->name, (long long)t->ne[0], ti->name, ti->block);
    t->nbytes = (size_t)(t->numel / ti->block) * ti->block_bytes;
    return 0;
}

static int compare_by_offset(const void *a, const void *b) {
    const gguf_tensor *x = *(const gguf_tensor *const *)a, *y = *(const gguf_tensor *const *)b;
    return x->offset < y->offset ? -1 : x->offset > y->offset ? 1 : 0;
}

static int compare_names(const void *a, const void *b) {
    return strcmp((*(const gguf_tensor *const *)a)->name, (*(const gguf_tensor *const *)b)->name);
}

static int compare_keys(const void *a, const void *b) {
    return strcmp((*(const gguf_kv *const *)a)->key, (*(const gguf_kv *const *)b)->key);
}

static int parse(gguf_file *g, const unsigned char *bytes, size_t size, ep_error *err) {
    cursor c = {bytes, size, 0, g->path, err};
    if (size < 4 || memcmp(bytes, "GGUF", 4))
        return ep_fail(err, "%s: magic: expected 'GGUF' in the first 4 bytes (not a GGUF file)", g->path);
    c.pos = 4;
    uint64_t n_tensors, n_kv;
    if (read_u32(&c, &g->version, "header version")) return -1;
    if (g->version != 2 && g->version != 3)
        return ep_fail(err, "%s: header version: %u, supported are 2 and 3 (little-endian)", g->path, g->version);
    if (read_u64(&c, &n_tensors, "header tensor count") || read_u64(&c, &n_kv, "header metadata count")) return -1;
    // A metadata pair takes at least 8 + 1 + 4 + 1 bytes and a tensor info at least 8 + 1 + 4 + 8 + 4 + 8.
    if (n_kv > (size - c.pos) / 14)
        return ep_fail(err, "%s: header metadata count: %llu pairs cannot fit in %zu bytes (truncated or corrupt)", g->path,
                       (unsigned long long)n_kv, size);
    if (n_tensors > (size - c.pos) / 33)
        return ep_fail(err, "%s: header tensor count: %llu tensors cannot fit in %zu bytes (truncated or corrupt)", g->path,
                       (unsigned long long)n_tensors, size);
    if (n_kv > (1u << 30) || n_tensors > (1u << 30))
        return ep_fail(err, "%s: header counts: %llu metadata pairs, %llu tensors: too many (corrupt)", g->path,
                       (unsigned long long)n_kv, (unsigned long long)n_tensors);
    g->kv = ep_calloc((size_t)n_kv, sizeof(gguf_kv));
    for (uint64_t i = 0; i < n_kv; i++) {
        g->n_kv = (int)i + 1;  // counted before reading, so close() frees a half-read pair
        if (read_kv(&c, &g->kv[i], (int)i)) return -1;
    }
    // Keys unique (sorted copy, so a file with millions of pairs costs n log n, not n^2).
    const gguf_kv **keys = ep_malloc(sizeof(gguf_kv *) * (size_t)(n_kv ? n_kv : 1));
    for (int i = 0; i < g->n_kv; i++) keys[i] = &g->kv[i];
    qsort(keys, (size_t)g->n_kv, sizeof *keys, compare_keys);
    for (int i = 1; i < g->n_kv; i++)
        if (!strcmp(keys[i - 1]->key, keys[i]->key)) {
            ep_fail(err, "%s: metadata '%.500s' appears twice", g->path, keys[i]->key);
            free(keys);
            return -1;
        }
    free(keys);
    g->alignment = 32;
    const gguf_kv *al = gguf_find_kv(g, "general.alignment");
    if (al) {
        if (al->type != GGUF_U32 || al->u == 0 || (al->u & (al->u - 1)) || al->u > 65536)
            return ep_fail(err, "%s: metadata 'general.alignment': expected a power of two (u32) up to 65536", g->path);
        g->alignment = al->u;
    }
    g->tensors = ep_calloc((size_t)n_tensors, sizeof(gguf_tensor));
    for (uint64_t i = 0; i < n_tensors; i++) {
        g->n_tensors = (int)i + 1;
        if (read_tensor_info(&c, &g->tensors[i], (int)i)) return -1;
    }
    size_t data_start = (size_t)((c.pos + g->alignment - 1) / g->alignment * g->alignment);
    if (data_start > size && n_tensors > 0)
        return ep_fail(err, "%s: data section: starts at %zu, past the end of the file (%zu bytes; truncated)", g->path,
                       data_start, size);
    size_t data_size = data_start <= size ? size - data_start : 0;
    for (int i = 0; i < g->n_tensors; i++) {
        gguf_tensor *t = &g->tensors[i];
        if (t->offset % g->alignment)
            return ep_fail(err, "%s: tensor '%.500s': offset %llu is not a multiple of the alignment %llu", g->path,
                           t->name, (unsigned long long)t->offset, (unsigned long long)g->alignment);
        if (t->offset > data_size || t->nbytes > data_size - t->offset)
            return ep_fail(err, "%s: tensor '%.500s': bytes [%llu, %llu) lie outside the %zu-byte data section "
                                "(truncated?)", g->path, t->name, (unsigned long long)t->offset,
                           (unsigned long long)(t->offset + t->nbytes), data_size);
        t->data = bytes + data_start + t->offset;
    }
    // Names unique and bytes disjoint: a table that aliases is corrupt.
    gguf_tensor **order = ep_malloc(sizeof(gguf_tensor *) * (size_t)(g->n_tensors ? g->n_tensors : 1));
    for (int i = 0; i < g->n_tensors; i++) order[i] = &g->tensors[i];
    int rc = 0;
    qsort(order, (size_t)g->n_tensors, sizeof *order, compare_names);
    for (int i = 1; i < g->n_tensors && !rc; i++)
        if (!strcmp(order[i - 1]->name, order[i]->name))
            rc = ep_fail(err, "%s: tensor '%.500s' appears twice", g->path, order[i]->name);
    qsort(order, (size_t)g->n_tensors, sizeof *order, compare_by_offset);
    for (int i = 1; i < g->n_tensors && !rc; i++)
        if (order[i - 1]->offset + order[i - 1]->nbytes > order[i]->offset)
            rc = ep_fail(err, "%s: tensors '%.500s' and '%.500s' overlap", g->path, order[i - 1]->name, order[i]->name);
    free(order);
    return rc;
}

int gguf_open_buffer(const void *bytes, size_t size, const char *name, gguf_file *g, ep_error *err) {
    memset(g, 0, sizeof *g);
    g->path = ep_strdup(name);
    if (parse(g, bytes, size, err)) {
        gguf_close(g);
        return -1;
    }
    return 0;
}

int gguf_open_file(const char *path, gguf_file *g, ep_error *err) {
    memset(g, 0, sizeof *g);
    void *map;
    size_t size;
    if (map_file_readonly(path, 24, "a GGUF header alone takes 24", &map, &size, err)) return -1;
    g->path = ep_strdup(path);
    g->map = map;
    g->map_size = size;
    if (parse(g, map, size, err)) {
        gguf_close(g);
        return -1;
    }
    return 0;
}

void gguf_close(gguf_file *g) {
    for (int i = 0; i < g->n_kv; i++) {
        free(g->kv[i].key);
        free(g->kv[i].strs);
    }
    free(g->kv);
    for (int i = 0; i < g->n_tensors; i++) free(g->tensors[i].name);
    free(g->tensors);
    if (g->map) munmap(g->map, g->map_size);
    free(g->path);
    memset(g, 0, sizeof *g);
}

const gguf_kv *gguf_find_kv(const gguf_file *g, const char *key) {
    for (int i = 0; i < g->n_kv; i++)
        if (g->kv[i].key && !strcmp(g->kv[i].key, key)) return &g->kv[i];
    return NULL;
}

const gguf_tensor *gguf_find_tensor(const gguf_file *g, const char *name) {
    for (int i = 0; i < g->n_tensors; i++)
        if (g->tensors[i].name && !strcmp(g->tensors[i].name, name)) return &g->tensors[i];
    return NULL;
}

static const gguf_kv *lookup(const gguf_file *g, const char *key, int required, ep_error *err, int *rc) {
    const gguf_kv *kv = gguf_find_kv(g, key);
    *rc = !kv && required ? ep_fail(err, "%s: metadata '%s': missing (required)", g->path, key) : 0;
    return kv;
}

int gguf_get_int(const gguf_file *g, const char *key, int required, int64_t fallback, int64_t *out, ep_error *err) {
    int rc;
    const gguf_kv *kv = lookup(g, key, required, err, &rc);
    if (!kv) {
        if (!rc) *out = fallback;
        return rc;
    }
    switch (kv->type) {
    case GGUF_U8: case GGUF_U16: case GGUF_U32: case GGUF_U64:
        if (kv->u > INT64_MAX) return ep_fail(err, "%s: metadata '%s': %llu is out of range", g->path, key, (unsigned long long)kv->u);
        *out = (int64_t)kv->u;
        return 0;
    case GGUF_I8: case GGUF_I16: case GGUF_I32: case GGUF_I64: *out = kv->i; return 0;
    default: return ep_fail(err, "%s: metadata '%s': expected an integer", g->path, key);
    }
}

int gguf_get_float(const gguf_file *g, const char *key, int required, double fallback, double *out, ep_error *err) {
    int rc;
    const gguf_kv *kv = lookup(g, key, required, err, &rc);
    if (!kv) {
        if (!rc) *out = fallback;
        return rc;
    }
    if (kv->type != GGUF_F32 && kv->type != GGUF_F64)
        return ep_fail(err, "%s: metadata '%s': expected a float (F32 or F64)", g->path, key);
    *out = kv->f;
    return 0;
}

int gguf_get_bool(const gguf_file *g, const char *key, int required, int fallback, int *out, ep_error *err) {
    int rc;
    const gguf_kv *kv = lookup(g, key, required, err, &rc);
    if (!kv) {
        if (!rc) *out = fallback;
        return rc;
    }
    if (kv->type != GGUF_BOOL) return ep_fail(err, "%s: metadata '%s': expected a bool", g->path, key);
    *out = (int)kv->u;
    return 0;
}

int gguf_get_string(const gguf_file *g, const char *key, int required, char **out, ep_error *err) {
    int rc;
    const gguf_kv *kv = lookup(g, key, required, err, &rc);
    if (!kv) {
        if (!rc) *out = NULL;
        return rc;
    }
    if (kv->type != GGUF_STRING) return ep_fail(err, "%s: metadata '%s': expected a string", g->path, key);
    if (memchr(kv->str.ptr, 0, (size_t)kv->str.len))
        return ep_fail(err, "%s: metadata '%s': string holds a NUL byte", g->path, key);
    *out = string_dup(&kv->str);
    return 0;
}

// --- dequantization (ggml-quants.c's dequantize_row_*) ---

static float half_at(const unsigned char *p) { return f16_to_f32((uint16_t)(p[0] | p[1] << 8)); }

int gguf_dequantize(const gguf_file *g, const gguf_tensor *t, float *out, ep_error *err) {
    const unsigned char *p = t->data;
    const int64_t n = t->numel;
    switch (t->type) {
    case GGML_F32: memcpy(out, p, (size_t)n * 4); return 0;
    case GGML_F16:
        for (int64_t i = 0; i < n; i++) out[i] = half_at(p + 2 * i);
        return 0;
    case GGML_BF16:
        for (int64_t i = 0; i < n; i++) out[i] = bf16_to_f32((uint16_t)(p[2 * i] | p[2 * i + 1] << 8));
        return 0;
    case GGML_Q8_0:  // block: fp16 d, 32 x int8 q; x = d * q
        for (int64_t b = 0; b < n / 32; b++, p += 34) {
            const float d = half_at(p);
            for (int j = 0; j < 32; j++) out[32 * b + j] = d * (float)(int8_t)p[2 + j];
        }
        return 0;
    case GGML_Q4_0:  // block: fp16 d, 16 bytes of nibbles; low nibbles are x[0..16), high x[16..32); x = d * (q - 8)
        for (int64_t b = 0; b < n / 32; b++, p += 18) {
            const float d = half_at(p);
            for (int j = 0; j < 16; j++) {
                out[32 * b + j] = d * (float)((p[2 + j] & 0x0f) - 8);
                out[32 * b + j + 16] = d * (float)((p[2 + j] >> 4) - 8);
            }
        }
        return 0;
    case GGML_Q4_1:  // block: fp16 d, fp16 m, 16 bytes of nibbles (as Q4_0); x = d * q + m
        for (int64_t b = 0; b < n / 32; b++, p += 20) {
            const float d = half_at(p), m = half_at(p + 2);
            for (int j = 0; j < 16; j++) {
                out[32 * b + j] = d * (float)(p[4 + j] & 0x0f) + m;
                out[32 * b + j + 16] = d * (float)(p[4 + j] >> 4) + m;
            }
        }
        return 0;
    default: {
        const char *name = gguf_type_name(t->type);
        return ep_fail(err, "%s: tensor '%s': ggml type %s (%u) is not supported (F32, F16, BF16, Q8_0, Q4_0, Q4_1 are)",
                       g->path, t->name, name ? name : "?", t->type);
    }
    }
}

// --- llama.cpp's Llama naming ---

int gguf_llama_hparams_read(const gguf_file *g, gguf_llama_hparams *hp, ep_error *err) {
    memset(hp, 0, sizeof *hp);
    char *arch = NULL;
    if (gguf_get_string(g, "general.architecture", 1, &arch, err)) return -1;
    int is_llama = !strcmp(arch, "llama");
    if (!is_llama) {
        ep_fail(err, "%s: metadata 'general.architecture': '%.200s' is not supported (only llama)", g->path, arch);
        free(arch);
        return -1;
    }
    free(arch);
    if (gguf_get_int(g, "llama.block_count", 1, 0, &hp->n_layers, err) ||
        gguf_get_int(g, "llama.embedding_length", 1, 0, &hp->hidden, err) ||
        gguf_get_int(g, "llama.feed_forward_length", 1, 0, &hp->intermediate, err) ||
        gguf_get_int(g, "llama.attention.head_count", 1, 0, &hp->n_heads, err) ||
        gguf_get_int(g, "llama.attention.head_count_kv", 0, hp->n_heads, &hp->n_kv_heads, err) ||
        gguf_get_int(g, "llama.context_length", 0, 2048, &hp->context_length, err) ||
        gguf_get_float(g, "llama.rope.freq_base", 0, 10000.0, &hp->rope_theta, err) ||
        gguf_get_float(g, "llama.attention.layer_norm_rms_epsilon", 1, 0, &hp->rms_eps, err))
        return -1;
    const int64_t max = 1 << 24;
    struct { const char *key; int64_t v; } pos[] = {
        {"llama.block_count", hp->n_layers}, {"llama.embedding_length", hp->hidden},
        {"llama.feed_forward_length", hp->intermediate}, {"llama.attention.head_count", hp->n_heads},
        {"llama.attention.head_count_kv", hp->n_kv_heads}, {"llama.context_length", hp->context_length},
    };
    for (size_t i = 0; i < sizeof pos / sizeof pos[0]; i++)
        if (pos[i].v <= 0 || pos[i].v > max)
            return ep_fail(err, "%s: metadata '%s': %lld, expected 1..%lld", g->path, pos[i].key, (long long)pos[i].v,
                           (long long)max);
    if (hp->hidden % hp->n_heads || (hp->hidden / hp->n_heads) % 2 || hp->n_heads % hp->n_kv_heads)
        return ep_fail(err, "%s: metadata 'llama.attention.head_count': %lld heads (%lld key/value heads) do not split "
                            "%lld dims into even head dims", g->path, (long long)hp->n_heads,
                       (long long)hp->n_kv_heads, (long long)hp->hidden);
    int64_t head_dim = hp->hidden / hp->n_heads;
    if (gguf_get_int(g, "llama.rope.dimension_count", 0, head_dim, &hp->rope_dims, err)) return -1;
    if (hp->rope_dims != head_dim)
        return ep_fail(err, "%s: metadata 'llama.rope.dimension_count': %lld, only full rotary (head dim %lld) is "
                            "supported", g->path, (long long)hp->rope_dims, (long long)head_dim);
    if (!(hp->rope_theta > 0) || !isfinite(hp->rope_theta) || !(hp->rms_eps > 0) || !(hp->rms_eps < 1))
        return ep_fail(err, "%s: metadata 'llama.rope.freq_base' / 'llama.attention.layer_norm_rms_epsilon': expected "
                            "theta > 0 and 0 < eps < 1", g->path);
    if (gguf_find_kv(g, "llama.rope.scaling.type") || gguf_find_kv(g, "llama.rope.scale_linear"))
        return ep_fail(err, "%s: metadata 'llama.rope.scaling.type': rope scaling in GGUF is not supported", g->path);
    // The vocabulary size: llama.vocab_size if present, else the token list's length, else the embedding.
    const gguf_kv *tokens = gguf_find_kv(g, "tokenizer.ggml.tokens");
    int64_t fallback = tokens && tokens->type == GGUF_ARRAY ? (int64_t)tokens->n : 0;
    const gguf_tensor *embd = gguf_find_tensor(g, "token_embd.weight");
    if (!fallback && embd && embd->ndim == 2) fallback = embd->ne[1];
    if (gguf_get_int(g, "llama.vocab_size", 0, fallback, &hp->vocab_size, err)) return -1;
    if (hp->vocab_size <= 0 || hp->vocab_size > max)
        return ep_fail(err, "%s: metadata 'llama.vocab_size': %lld, expected 1..%lld", g->path,
                       (long long)hp->vocab_size, (long long)max);
    return 0;
}

int gguf_llama_hf_name(const char *gguf_name, const gguf_llama_hparams *hp, char *hf, size_t hf_size,
                       int *unpermute_heads, ep_error *err) {
    static const struct { const char *gguf, *hf; } global[] = {
        {"token_embd.weight", "model.embed_tokens.weight"},
        {"output_norm.weight", "model.norm.weight"},
        {"output.weight", "lm_head.weight"},
    };
    static const struct { const char *gguf, *hf; } per_layer[] = {
        {"attn_norm.weight", "input_layernorm.weight"},
        {"ffn_norm.weight", "post_attention_layernorm.weight"},
        {"attn_q.weight", "self_attn.q_proj.weight"},
        {"attn_k.weight", "self_attn.k_proj.weight"},
        {"attn_v.weight", "self_attn.v_proj.weight"},
        {"attn_output.weight", "self_attn.o_proj.weight"},
        {"ffn_gate.weight", "mlp.gate_proj.weight"},
        {"ffn_up.weight", "mlp.up_proj.weight"},
        {"ffn_down.weight", "mlp.down_proj.weight"},
    };
    *unpermute_heads = 0;
    for (size_t i = 0; i < sizeof global / sizeof global[0]; i++)
        if (!strcmp(gguf_name, global[i].gguf)) {
            snprintf(hf, hf_size, "%s", global[i].hf);
            return 0;
        }
    int layer = -1, used = 0;
    if (sscanf(gguf_name, "blk.%d.%n", &layer, &used) == 1 && used > 0 && layer >= 0 && layer < hp->n_layers &&
        gguf_name[4] >= '0' && gguf_name[4] <= '9') {
        char canonical[32];
        snprintf(canonical, sizeof canonical, "blk.%d.", layer);  // rejects "blk.01." and "blk.+1."
        if (!strncmp(gguf_name, canonical, strlen(canonical)))
            for (size_t i = 0; i < sizeof per_layer / sizeof per_layer[0]; i++)
                if (!strcmp(gguf_name + used, per_layer[i].gguf)) {
                    snprintf(hf, hf_size, "model.layers.%d.%s", layer, per_layer[i].hf);
                    if (i == 2) *unpermute_heads = (int)hp->n_heads;
                    if (i == 3) *unpermute_heads = (int)hp->n_kv_heads;
                    return 0;
                }
    }
    return ep_fail(err, "tensor '%s': not a llama.cpp Llama tensor name this converter knows (token_embd, "
                        "output_norm, output, blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,ffn_norm,ffn_gate,"
                        "ffn_up,ffn_down} with N < %lld)", gguf_name, (long long)hp->n_layers);
}

static int check_perm_shape(int64_t rows, int64_t n_head, ep_error *err) {
    if (n_head <= 0 || rows % n_head || (rows / n_head) % 2)
        return ep_fail(err, "Q/K permutation: %lld rows do not split into %lld heads of even size", (long long)rows,
                       (long long)n_head);
    return 0;
}

// GGUF row h*hd + 2i + j  <->  HF row h*hd + j*hd/2 + i.
int gguf_unpermute_rows(const float *in, float *out, int64_t rows, int64_t cols, int64_t n_head, ep_error *err) {
    if (check_perm_shape(rows, n_head, err)) return -1;
    int64_t hd = rows / n_head, half = hd / 2;
    for (int64_t h = 0; h < n_head; h++)
        for (int64_t i = 0; i < half; i++)
            for (int64_t j = 0; j < 2; j++)
                memcpy(out + (size_t)(h * hd + j * half + i) * (size_t)cols, in + (size_t)(h * hd + 2 * i + j) * (size_t)cols,
                       sizeof(float) * (size_t)cols);
    return 0;
}

int gguf_permute_rows(const float *in, float *out, int64_t rows, int64_t cols, int64_t n_head, ep_error *err) {
    if (check_perm_shape(rows, n_head, err)) return -1;
    int64_t hd = rows / n_head, half = hd / 2;
    for (int64_t h = 0; h < n_head; h++)
        for (int64_t i = 0; i < half; i++)
            for (int64_t j = 0; j < 2; j++)
                memcpy(out + (size_t)(h * hd + 2 * i + j) * (size_t)cols, in + (size_t)(h * hd + j * half + i) * (size_t)cols,
                       sizeof(float) * (size_t)cols);
    return 0;
}

int gguf_read_hf_tensor(const gguf_file *g, const gguf_tensor *t, const gguf_llama_hparams *hp, char *hf_name,
                        size_t hf_name_size, int64_t hf_shape[GGUF_MAX_DIMS], int *hf_ndim, float *out, ep_error *err) {
    int heads = 0;
    if (gguf_llama_hf_name(t->name, hp, hf_name, hf_name_size, &heads, err)) return ep_wrap(err, "%s", g->path);
    *hf_ndim = t->ndim;
    for (int d = 0; d < t->ndim; d++) hf_shape[d] = t->ne[t->ndim - 1 - d];
    if (!heads) return gguf_dequantize(g, t, out, err);
    if (t->ndim != 2) return ep_fail(err, "%s: tensor '%s': expected a matrix", g->path, t->name);
    float *tmp = ep_malloc(sizeof(float) * (size_t)t->numel);
    int rc = gguf_dequantize(g, t, tmp, err);
    if (!rc && gguf_unpermute_rows(tmp, out, t->ne[1], t->ne[0], heads, err))
        rc = ep_wrap(err, "%s: tensor '%s'", g->path, t->name);
    free(tmp);
    return rc;
}
