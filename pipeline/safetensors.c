#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "pipeline/mapped_file.h"

// A header larger than this is not a real checkpoint (real ones are a few hundred KB at most).
#define MAX_HEADER_BYTES (100u << 20)

static const struct {
    const char *name;
    st_dtype dtype;
    size_t size;
} dtype_table[] = {
    {"F32", ST_F32, 4}, {"F16", ST_F16, 2}, {"BF16", ST_BF16, 2}, {"I32", ST_I32, 4}, {"I64", ST_I64, 8},
    {"F64", ST_F64, 8}, {"I8", ST_I8, 1},   {"U8", ST_U8, 1},     {"BOOL", ST_BOOL, 1}, {"I16", ST_I16, 2},
};

const char *st_dtype_name(st_dtype d) {
    for (size_t i = 0; i < sizeof dtype_table / sizeof dtype_table[0]; i++)
        if (dtype_table[i].dtype == d) return dtype_table[i].name;
    return "?";
}

size_t st_dtype_size(st_dtype d) {
    for (size_t i = 0; i < sizeof dtype_table / sizeof dtype_table[0]; i++)
        if (dtype_table[i].dtype == d) return dtype_table[i].size;
    return 0;
}

float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, u;
    if (exp == 0) {
        if (mant == 0) {
            u = sign;
        } else {  // subnormal: normalize
            int e = -1;
            do {
                e++;
                mant <<= 1;
            } while (!(mant & 0x400));
            u = sign | (uint32_t)(127 - 15 - e) << 23 | (mant & 0x3ff) << 13;
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | mant << 13;
    } else {
        u = sign | (exp + 127 - 15) << 23 | mant << 13;
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static int compare_tensor_names(const void *a, const void *b) {
    return strcmp(((const st_tensor *)a)->name, ((const st_tensor *)b)->name);
}

static int compare_by_offset(const void *a, const void *b) {
    const st_tensor *x = *(const st_tensor *const *)a, *y = *(const st_tensor *const *)b;
    return x->data < y->data ? -1 : x->data > y->data ? 1 : 0;
}

static int parse_tensors(const char *path, const unsigned char *bytes, size_t size, safetensors *st, int file_index,
                         ep_error *err);

// Maps one file and appends its tensors to st; file_index is its slot in st->paths.
static int map_and_parse(const char *path, safetensors *st, int file_index, ep_error *err) {
    void *map;
    size_t size;
    if (map_file_readonly(path, 8, "a safetensors file has at least an 8-byte header length", &map, &size, err)) return -1;
    st->maps[file_index] = map;
    st->map_sizes[file_index] = size;
    return parse_tensors(path, map, size, st, file_index, err);
}

// Validates the header of one file's bytes (size >= 8) and appends its tensors to st.
static int parse_tensors(const char *path, const unsigned char *bytes, size_t size, safetensors *st, int file_index,
                         ep_error *err) {
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; i--) header_len = header_len << 8 | bytes[i];
    if (header_len > MAX_HEADER_BYTES || header_len > size - 8)
        return ep_fail(err, "%s: header length %llu exceeds the file (%zu bytes): truncated or not a safetensors file",
                       path, (unsigned long long)header_len, size);
    json_error_t jerr;
    json_t *root = json_loadb((const char *)bytes + 8, (size_t)header_len, 0, &jerr);
    if (!root) return ep_fail(err, "%s: header is not valid JSON: %s (offset %d)", path, jerr.text, jerr.position);
    if (!json_is_object(root)) {
        json_decref(root);
        return ep_fail(err, "%s: header is not a JSON object", path);
    }
    const unsigned char *data = bytes + 8 + header_len;
    size_t data_size = size - 8 - (size_t)header_len;
    size_t first_new = (size_t)st->n_tensors;
    st->tensors = ep_realloc(st->tensors, sizeof(st_tensor) * (st->n_tensors + json_object_size(root)));

    const char *key;
    json_t *value;
    int rc = 0;
    json_object_foreach(root, key, value) {
        if (!strcmp(key, "__metadata__")) {
            if (file_index == 0 && json_is_object(value)) st->metadata_json = json_dumps(value, JSON_COMPACT);
            continue;
        }
        json_t *jd = json_object_get(value, "dtype"), *js = json_object_get(value, "shape"),
               *jo = json_object_get(value, "data_offsets");
        if (!json_is_object(value) || !json_is_string(jd) || !json_is_array(js) || !json_is_array(jo) ||
            json_array_size(jo) != 2) {
            rc = ep_fail(err, "%s: tensor '%s': expected {dtype, shape, data_offsets[2]}", path, key);
            break;
        }
        st_tensor t = {.file = file_index};
        size_t elsize = 0;
        for (size_t i = 0; i < sizeof dtype_table / sizeof dtype_table[0]; i++)
            if (!strcmp(json_string_value(jd), dtype_table[i].name)) {
                t.dtype = dtype_table[i].dtype;
                elsize = dtype_table[i].size;
            }
        if (!elsize) {
            rc = ep_fail(err, "%s: tensor '%s': unsupported dtype '%s'", path, key, json_string_value(jd));
            break;
        }
        if (json_array_size(js) > ST_MAX_DIMS) {
            rc = ep_fail(err, "%s: tensor '%s': %zu dimensions, at most %d supported", path, key, json_array_size(js),
                         ST_MAX_DIMS);
            break;
        }
        t.ndim = (int)json_array_size(js);
        t.numel = 1;
        for (int d = 0; d < t.ndim && rc == 0; d++) {
            json_t *dim = json_array_get(js, (size_t)d);
            if (!json_is_integer(dim) || json_integer_value(dim) < 0 || json_integer_value(dim) > ((int64_t)1 << 40)) {
                rc = ep_fail(err, "%s: tensor '%s': shape[%d] is not a valid size", path, key, d);
                break;
            }
            t.shape[d] = json_integer_value(dim);
            if (t.shape[d] && t.numel > ((int64_t)1 << 42) / t.shape[d]) {
                rc = ep_fail(err, "%s: tensor '%s': shape too large", path, key);
                break;
            }
            t.numel *= t.shape[d];
        }
        if (rc) break;
        json_t *jb = json_array_get(jo, 0), *je = json_array_get(jo, 1);
        if (!json_is_integer(jb) || !json_is_integer(je) || json_integer_value(jb) < 0 ||
            json_integer_value(je) < json_integer_value(jb) || (uint64_t)json_integer_value(je) > data_size) {
            rc = ep_fail(err, "%s: tensor '%s': data_offsets outside the file's %zu data bytes (truncated file?)", path,
                         key, data_size);
            break;
        }
        size_t begin = (size_t)json_integer_value(jb), end = (size_t)json_integer_value(je);
        if (end - begin != (size_t)t.numel * elsize) {
            rc = ep_fail(err, "%s: tensor '%s': %zu data bytes, but %s x %lld elements need %zu", path, key, end - begin,
                         json_string_value(jd), (long long)t.numel, (size_t)t.numel * elsize);
            break;
        }
        t.data = data + begin;
        t.nbytes = end - begin;
        t.name = ep_strdup(key);
        st->tensors[st->n_tensors++] = t;
    }
    json_decref(root);
    if (rc) return rc;

    // Tensors must not overlap: a header that aliases bytes is corrupt.
    size_t n_new = (size_t)st->n_tensors - first_new;
    st_tensor **by_offset = ep_malloc(sizeof(st_tensor *) * (n_new ? n_new : 1));
    for (size_t i = 0; i < n_new; i++) by_offset[i] = &st->tensors[first_new + i];
    qsort(by_offset, n_new, sizeof *by_offset, compare_by_offset);
    for (size_t i = 1; i < n_new; i++)
        if (by_offset[i - 1]->data + by_offset[i - 1]->nbytes > by_offset[i]->data) {
            rc = ep_fail(err, "%s: tensors '%s' and '%s' overlap", path, by_offset[i - 1]->name, by_offset[i]->name);
            break;
        }
    free(by_offset);
    return rc;
}

static void init_files(safetensors *st, int n_files) {
    memset(st, 0, sizeof *st);
    st->n_files = n_files;
    st->paths = ep_calloc((size_t)n_files, sizeof(char *));
    st->maps = ep_calloc((size_t)n_files, sizeof(void *));
    st->map_sizes = ep_calloc((size_t)n_files, sizeof(size_t));
}

static int finish_table(safetensors *st, ep_error *err) {
    qsort(st->tensors, (size_t)st->n_tensors, sizeof(st_tensor), compare_tensor_names);
    for (int i = 1; i < st->n_tensors; i++)
        if (!strcmp(st->tensors[i - 1].name, st->tensors[i].name))
            return ep_fail(err, "%s: tensor '%s' appears twice", st->paths[st->tensors[i].file], st->tensors[i].name);
    return 0;
}

int safetensors_open_file(const char *path, safetensors *st, ep_error *err) {
    init_files(st, 1);
    st->paths[0] = ep_strdup(path);
    if (map_and_parse(path, st, 0, err) || finish_table(st, err)) {
        safetensors_close(st);
        return -1;
    }
    return 0;
}

int safetensors_open_buffer(const void *bytes, size_t size, const char *name, safetensors *st, ep_error *err) {
    init_files(st, 1);
    st->paths[0] = ep_strdup(name);
    if (size < 8) {
        ep_fail(err, "%s: truncated: %zu bytes, a safetensors file has at least an 8-byte header length", name, size);
        safetensors_close(st);
        return -1;
    }
    // maps[0] stays NULL: the bytes are borrowed, so close does not unmap them.
    if (parse_tensors(name, bytes, size, st, 0, err) || finish_table(st, err)) {
        safetensors_close(st);
        return -1;
    }
    return 0;
}

static char *join_path(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = ep_malloc(n);
    snprintf(p, n, "%s/%s", dir, name);
    return p;
}

static int open_sharded(const char *dir, const char *index_path, safetensors *st, ep_error *err) {
    memset(st, 0, sizeof *st);
    json_error_t jerr;
    json_t *root = json_load_file(index_path, 0, &jerr);
    if (!root) return ep_fail(err, "%s: not valid JSON: %s (line %d)", index_path, jerr.text, jerr.line);
    json_t *map = json_object_get(root, "weight_map");
    if (!json_is_object(map) || json_object_size(map) == 0) {
        json_decref(root);
        return ep_fail(err, "%s: field weight_map: expected a non-empty object of tensor name -> file", index_path);
    }
    // Distinct shard names, in order of first appearance.
    const char *key;
    json_t *value;
    size_t n_names = 0;
    const char **names = ep_malloc(sizeof(char *) * json_object_size(map));
    int rc = 0;
    json_object_foreach(map, key, value) {
        const char *f = json_string_value(value);
        if (!f || !*f || strchr(f, '/') || !strcmp(f, "..")) {
            rc = ep_fail(err, "%s: weight_map['%s']: expected a file name in the same folder", index_path, key);
            break;
        }
        size_t i = 0;
        while (i < n_names && strcmp(names[i], f)) i++;
        if (i == n_names) names[n_names++] = f;
    }
    if (rc == 0) {
        init_files(st, (int)n_names);
        for (size_t i = 0; i < n_names && rc == 0; i++) {
            st->paths[i] = join_path(dir, names[i]);
            rc = map_and_parse(st->paths[i], st, (int)i, err);
        }
        if (rc == 0) rc = finish_table(st, err);
        json_object_foreach(map, key, value) {
            if (rc) break;
            const st_tensor *t = safetensors_find(st, key);
            if (!t) {
                rc = ep_fail(err, "%s: weight_map names tensor '%s', which is in no shard", index_path, key);
            } else if (strcmp(strrchr(st->paths[t->file], '/') + 1, json_string_value(value))) {
                rc = ep_fail(err, "%s: weight_map puts '%s' in %s, but it is in %s", index_path, key,
                             json_string_value(value), st->paths[t->file]);
            }
        }
        if (rc) safetensors_close(st);
    }
    free(names);
    json_decref(root);
    return rc;
}

int safetensors_open_dir(const char *dir, safetensors *st, ep_error *err) {
    char *index = join_path(dir, "model.safetensors.index.json");
    int rc;
    if (access(index, F_OK) == 0) {
        rc = open_sharded(dir, index, st, err);
    } else {
        char *single = join_path(dir, "model.safetensors");
        if (access(single, F_OK) != 0)
            rc = ep_fail(err, "%s: no model.safetensors or model.safetensors.index.json in this folder", dir);
        else
            rc = safetensors_open_file(single, st, err);
        free(single);
    }
    free(index);
    return rc;
}

void safetensors_close(safetensors *st) {
    for (int i = 0; i < st->n_tensors; i++) free(st->tensors[i].name);
    free(st->tensors);
    for (int i = 0; i < st->n_files; i++) {
        if (st->maps && st->maps[i]) munmap(st->maps[i], st->map_sizes[i]);
        if (st->paths) free(st->paths[i]);
    }
    free(st->paths);
    free(st->maps);
    free(st->map_sizes);
    free(st->metadata_json);
    memset(st, 0, sizeof *st);
}

const st_tensor *safetensors_find(const safetensors *st, const char *name) {
    st_tensor key = {.name = (char *)name};
    return bsearch(&key, st->tensors, (size_t)st->n_tensors, sizeof(st_tensor), compare_tensor_names);
}

int safetensors_read_f32(const st_tensor *t, float *out, ep_error *err) {
    const unsigned char *p = t->data;
    switch (t->dtype) {
    case ST_F32: memcpy(out, p, t->nbytes); return 0;
    case ST_BF16:
        for (int64_t i = 0; i < t->numel; i++) out[i] = bf16_to_f32((uint16_t)(p[2 * i] | p[2 * i + 1] << 8));
        return 0;
    case ST_F16:
        for (int64_t i = 0; i < t->numel; i++) out[i] = f16_to_f32((uint16_t)(p[2 * i] | p[2 * i + 1] << 8));
        return 0;
    case ST_F64:
        for (int64_t i = 0; i < t->numel; i++) {
            double d;
            memcpy(&d, p + 8 * i, 8);
            out[i] = (float)d;
        }
        return 0;
    default: return ep_fail(err, "tensor '%s': dtype %s is not a floating type", t->name, st_dtype_name(t->dtype));
    }
}

int safetensors_read_i32(const st_tensor *t, int32_t *out, ep_error *err) {
    const unsigned char *p = t->data;
    for (int64_t i = 0; i < t->numel; i++) {
        int64_t v;
        switch (t->dtype) {
        case ST_I32: {
            int32_t x;
            memcpy(&x, p + 4 * i, 4);
            v = x;
            break;
        }
        case ST_I64: memcpy(&v, p + 8 * i, 8); break;
        case ST_I16: {
            int16_t x;
            memcpy(&x, p + 2 * i, 2);
            v = x;
            break;
        }
        case ST_I8: v = (int8_t)p[i]; break;
        case ST_U8: v = p[i]; break;
        default: return ep_fail(err, "tensor '%s': dtype %s is not an integer type", t->name, st_dtype_name(t->dtype));
        }
        if (v < INT32_MIN || v > INT32_MAX)
            return ep_fail(err, "tensor '%s': element %lld = %lld does not fit in int32", t->name, (long long)i,
                           (long long)v);
        out[i] = (int32_t)v;
    }
    return 0;
}

int safetensors_write_header(FILE *f, const char *path, const st_write_entry *entries, int n, ep_error *err) {
    json_t *root = json_object();
    uint64_t offset = 0;
    int rc = 0;
    for (int i = 0; i < n && !rc; i++) {
        const st_write_entry *e = &entries[i];
        if (e->ndim < 0 || e->ndim > ST_MAX_DIMS) {
            rc = ep_fail(err, "%s: tensor '%s': %d dimensions, at most %d", path, e->name, e->ndim, ST_MAX_DIMS);
            break;
        }
        json_t *shape = json_array();
        uint64_t numel = 1;
        for (int d = 0; d < e->ndim; d++) {
            json_array_append_new(shape, json_integer(e->shape[d]));
            numel *= (uint64_t)e->shape[d];
        }
        json_t *t = json_object();
        json_object_set_new(t, "dtype", json_string("F32"));
        json_object_set_new(t, "shape", shape);
        json_t *offsets = json_array();
        json_array_append_new(offsets, json_integer((json_int_t)offset));
        offset += 4 * numel;
        json_array_append_new(offsets, json_integer((json_int_t)offset));
        json_object_set_new(t, "data_offsets", offsets);
        if (json_object_get(root, e->name)) rc = ep_fail(err, "%s: tensor '%s' given twice", path, e->name);
        json_object_set_new(root, e->name, t);
    }
    char *text = rc ? NULL : json_dumps(root, JSON_COMPACT);
    json_decref(root);
    if (rc) return rc;
    size_t len = strlen(text), padded = (len + 7) / 8 * 8;
    unsigned char len_bytes[8];
    for (int i = 0; i < 8; i++) len_bytes[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    int ok = fwrite(len_bytes, 1, 8, f) == 8 && fwrite(text, 1, len, f) == len;
    for (size_t i = len; i < padded && ok; i++) ok = fputc(' ', f) != EOF;
    free(text);
    return ok ? 0 : ep_fail(err, "%s: cannot write the header: %s", path, strerror(errno));
}
