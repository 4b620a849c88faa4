#include "h5store.h"

#include <errno.h>
#include <fcntl.h>
#include <hdf5_hl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#include "pipeline/safetensors.h"

#define COMPLETE_ATTR "edgepatch_complete"
#define CRC_ATTR "crc32"
#define BF16_ATTR "bfloat16"  // a 16-bit integer dataset holding bfloat16 bit patterns

// The seal: HDF5's user block, SEAL_BYTES at the start of the file that HDF5 leaves to its user, holds
// the CRC-32 and length of every byte after it, written last (after the file is closed, before the
// rename). A reader checks it before HDF5 parses anything, so no damaged byte goes unnoticed: not in a
// dataset, an attribute, HDF5's own metadata or its padding (a flip there used to pass every dataset
// checksum and leave a file that was not the one written), and HDF5's parser never sees a damaged file.
#define SEAL_BYTES 512
#define SEAL_MAGIC "edgepatch h5store seal 1\n"

// HDF5 prints its error stack to stderr by default; our errors are returned instead.
static void quiet_hdf5(void) { H5Eset_auto2(H5E_DEFAULT, NULL, NULL); }

static int fsync_path(const char *path, int directory) {
    int fd = open(path, directory ? O_RDONLY | O_DIRECTORY : O_RDONLY);
    if (fd < 0) return -1;
    int rc = fsync(fd);
    close(fd);
    return rc;
}

int h5store_create(const char *path, h5store *s, ep_error *err) {
    quiet_hdf5();
    memset(s, 0, sizeof *s);
    size_t n = strlen(path) + 32;
    s->path = ep_strdup(path);
    s->tmp_path = ep_malloc(n);
    snprintf(s->tmp_path, n, "%s.tmp-%d", path, (int)getpid());
    hid_t fcpl = H5Pcreate(H5P_FILE_CREATE);
    H5Pset_userblock(fcpl, SEAL_BYTES);
    s->file = H5Fcreate(s->tmp_path, H5F_ACC_TRUNC, fcpl, H5P_DEFAULT);
    H5Pclose(fcpl);
    if (s->file < 0) {
        ep_fail(err, "%s: cannot create (folder missing or not writable?)", s->tmp_path);
        free(s->path), free(s->tmp_path);
        memset(s, 0, sizeof *s);
        return -1;
    }
    return 0;
}

// CRC-32 and length of the bytes of fd from SEAL_BYTES to its end.
static int body_crc(int fd, uint32_t *crc, uint64_t *bytes) {
    enum { CHUNK = 1 << 20 };
    unsigned char *buf = ep_malloc(CHUNK);
    uLong c = crc32_z(0L, Z_NULL, 0);
    uint64_t n = 0;
    off_t at = SEAL_BYTES;
    ssize_t got;
    while ((got = pread(fd, buf, CHUNK, at)) > 0) {
        c = crc32_z(c, buf, (size_t)got);
        n += (uint64_t)got, at += got;
    }
    free(buf);
    *crc = (uint32_t)c, *bytes = n;
    return got < 0 ? -1 : 0;
}

static void seal_text(uint32_t crc, uint64_t bytes, char out[SEAL_BYTES]) {
    memset(out, 0, SEAL_BYTES);
    snprintf(out, SEAL_BYTES, "%scrc32 %08x\nbytes %llu\n", SEAL_MAGIC, crc, (unsigned long long)bytes);
}

// Writes the seal of the closed file at path.
static int seal(const char *path, ep_error *err) {
    int fd = open(path, O_RDWR);
    if (fd < 0) return ep_fail(err, "%s: cannot reopen to seal: %s", path, strerror(errno));
    uint32_t crc;
    uint64_t bytes;
    char text[SEAL_BYTES];
    int rc = body_crc(fd, &crc, &bytes);
    if (rc == 0) {
        seal_text(crc, bytes, text);
        rc = pwrite(fd, text, SEAL_BYTES, 0) == SEAL_BYTES ? 0 : -1;
    }
    if (rc == 0) rc = fsync(fd);
    if (rc) ep_fail(err, "%s: cannot seal (disk full?): %s", path, strerror(errno));
    close(fd);
    return rc;
}

// 0 if the file at path carries a seal that matches every byte after it.
static int check_seal(const char *path, ep_error *err) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return ep_fail(err, "%s: cannot open: %s", path, strerror(errno));
    char have[SEAL_BYTES], want[SEAL_BYTES];
    uint32_t crc;
    uint64_t bytes;
    int rc = 0;
    if (pread(fd, have, SEAL_BYTES, 0) != SEAL_BYTES || memcmp(have, SEAL_MAGIC, strlen(SEAL_MAGIC))) {
        rc = ep_fail(err, "%s: no completion record: the run that wrote it did not finish (or the file is truncated "
                          "or damaged)", path);
    } else if (body_crc(fd, &crc, &bytes)) {
        rc = ep_fail(err, "%s: cannot read: %s", path, strerror(errno));
    } else {
        seal_text(crc, bytes, want);
        if (memcmp(have, want, SEAL_BYTES))
            rc = ep_fail(err, "%s: damaged: its bytes do not match its checksum (truncated or corrupted)", path);
    }
    close(fd);
    return rc;
}

int h5store_commit(h5store *s, ep_error *err) {
    int rc = h5store_set_i64(s, COMPLETE_ATTR, 1, err);
    if (rc == 0 && (H5Fflush(s->file, H5F_SCOPE_GLOBAL) < 0 || H5Fclose(s->file) < 0))
        rc = ep_fail(err, "%s: cannot flush (disk full?)", s->tmp_path);
    else if (rc != 0)
        H5Fclose(s->file);
    s->file = -1;
    if (rc == 0) rc = seal(s->tmp_path, err);
    if (rc == 0 && rename(s->tmp_path, s->path) != 0)
        rc = ep_fail(err, "%s: cannot rename to %s: %s", s->tmp_path, s->path, strerror(errno));
    if (rc == 0) {
        char *dir = ep_strdup(s->path), *slash = strrchr(dir, '/');
        if (slash) *slash = 0;
        fsync_path(slash ? dir : ".", 1);
        free(dir);
    } else {
        unlink(s->tmp_path);
    }
    free(s->path), free(s->tmp_path);
    memset(s, 0, sizeof *s);
    return rc;
}

void h5store_abandon(h5store *s) {
    if (s->file > 0) H5Fclose(s->file);
    if (s->tmp_path) unlink(s->tmp_path);
    free(s->path), free(s->tmp_path);
    memset(s, 0, sizeof *s);
}

int h5store_open(const char *path, h5store *s, ep_error *err) {
    quiet_hdf5();
    memset(s, 0, sizeof *s);
    if (access(path, R_OK) != 0) return ep_fail(err, "%s: cannot open: %s", path, strerror(errno));
    if (check_seal(path, err)) return -1;
    s->file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (s->file < 0) {
        memset(s, 0, sizeof *s);
        return ep_fail(err, "%s: not a readable HDF5 file (truncated or corrupted?)", path);
    }
    s->path = ep_strdup(path);
    int64_t complete = 0;
    if (H5Aexists(s->file, COMPLETE_ATTR) <= 0 || h5store_get_i64(s, COMPLETE_ATTR, &complete, err) || complete != 1) {
        h5store_close(s);
        return ep_fail(err, "%s: no completion record: the run that wrote it did not finish", path);
    }
    return 0;
}

void h5store_close(h5store *s) {
    if (s->file > 0) H5Fclose(s->file);
    free(s->path), free(s->tmp_path);
    memset(s, 0, sizeof *s);
}

int h5store_is_complete(const char *path) {
    h5store s;
    ep_error err;
    if (access(path, R_OK) != 0 || h5store_open(path, &s, &err)) return 0;
    h5store_close(&s);
    return 1;
}

uint32_t h5store_crc32(const void *data, size_t bytes) {
    // crc32_z takes a size_t length; crc32's uInt would cover only the low 32 bits of a dataset over 4 GiB.
    return (uint32_t)crc32_z(0L, data, bytes);
}

static const char *file_name(const h5store *s) { return s->tmp_path ? s->tmp_path : s->path; }

// A dataset's crc32 attribute (its bytes' CRC-32), what every reader checks.
static int write_crc(h5store *s, hid_t ds, const char *name, uint32_t crc, ep_error *err) {
    hid_t aspace = H5Screate(H5S_SCALAR);
    hid_t attr = H5Acreate2(ds, CRC_ATTR, H5T_STD_U32LE, aspace, H5P_DEFAULT, H5P_DEFAULT);
    int rc = attr < 0 || H5Awrite(attr, H5T_NATIVE_UINT32, &crc) < 0
                 ? ep_fail(err, "%s: cannot write the checksum of %s", file_name(s), name)
                 : 0;
    if (attr >= 0) H5Aclose(attr);
    H5Sclose(aspace);
    return rc;
}

static size_t shape_numel(const h5shape *shape) {
    size_t n = 1;
    for (int i = 0; i < shape->rank; i++) n *= (size_t)shape->dims[i];
    return n;
}

static int write_dataset(h5store *s, const char *name, const h5shape *shape, hid_t file_type, hid_t mem_type,
                         const void *data, size_t elsize, ep_error *err) {
    if (shape->rank < 1 || shape->rank > H5STORE_MAX_RANK)
        return ep_fail(err, "%s: dataset %s: rank %d not supported", file_name(s), name, shape->rank);
    hsize_t dims[H5STORE_MAX_RANK];
    for (int i = 0; i < shape->rank; i++) dims[i] = (hsize_t)shape->dims[i];
    hid_t space = H5Screate_simple(shape->rank, dims, NULL);
    hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
    H5Pset_create_intermediate_group(lcpl, 1);
    // No modification times: the same data gives the same bytes, whenever and by whichever rank written.
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_obj_track_times(dcpl, 0);
    hid_t ds = H5Dcreate2(s->file, name, file_type, space, lcpl, dcpl, H5P_DEFAULT);
    H5Pclose(dcpl);
    int rc = 0;
    if (ds < 0 || H5Dwrite(ds, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) < 0) {
        rc = ep_fail(err, "%s: cannot write dataset %s (exists already, or disk full?)", file_name(s), name);
    } else {
        uint32_t crc = h5store_crc32(data, shape_numel(shape) * elsize);
        rc = write_crc(s, ds, name, crc, err);
    }
    if (ds >= 0) H5Dclose(ds);
    H5Pclose(lcpl);
    H5Sclose(space);
    return rc;
}

int h5store_write_f32(h5store *s, const char *name, const h5shape *shape, const float *data, ep_error *err) {
    return write_dataset(s, name, shape, H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, data, sizeof(float), err);
}

int h5store_write_f64(h5store *s, const char *name, const h5shape *shape, const double *data, ep_error *err) {
    return write_dataset(s, name, shape, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, data, sizeof(double), err);
}

int h5store_write_i32(h5store *s, const char *name, const h5shape *shape, const int32_t *data, ep_error *err) {
    return write_dataset(s, name, shape, H5T_STD_I32LE, H5T_NATIVE_INT32, data, sizeof(int32_t), err);
}

int h5store_has(h5store *s, const char *name) {
    // H5Lexists fails on a missing intermediate group, so walk the path one link at a time.
    char *copy = ep_strdup(name);
    int found = 1;
    for (char *p = copy; found;) {
        char *slash = strchr(p, '/');
        if (slash) *slash = 0;
        found = H5Lexists(s->file, copy, H5P_DEFAULT) > 0;
        if (!slash) break;
        *slash = '/';
        p = slash + 1;
    }
    free(copy);
    return found;
}

static int read_dataset(h5store *s, const char *name, h5shape *shape, hid_t mem_type, H5T_class_t want_class,
                        size_t elsize, void **data, ep_error *err) {
    if (!h5store_has(s, name)) return ep_fail(err, "%s: dataset %s is missing", file_name(s), name);
    hid_t ds = H5Dopen2(s->file, name, H5P_DEFAULT);
    if (ds < 0) return ep_fail(err, "%s: cannot open dataset %s", file_name(s), name);
    hid_t space = H5Dget_space(ds), type = H5Dget_type(ds);
    int rc = 0;
    int rank = H5Sget_simple_extent_ndims(space);
    if (H5Tget_class(type) != want_class || H5Tget_size(type) != elsize || rank < 1 || rank > H5STORE_MAX_RANK) {
        rc = ep_fail(err, "%s: dataset %s has an unexpected type or rank", file_name(s), name);
    } else {
        hsize_t dims[H5STORE_MAX_RANK];
        H5Sget_simple_extent_dims(space, dims, NULL);
        shape->rank = rank;
        for (int i = 0; i < rank; i++) shape->dims[i] = (int64_t)dims[i];
        size_t bytes = shape_numel(shape) * elsize;
        *data = ep_malloc(bytes);
        uint32_t stored = 0;
        hid_t attr = H5Aexists(ds, CRC_ATTR) > 0 ? H5Aopen(ds, CRC_ATTR, H5P_DEFAULT) : -1;
        if (H5Dread(ds, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, *data) < 0) {
            rc = ep_fail(err, "%s: cannot read dataset %s (corrupted file?)", file_name(s), name);
        } else if (attr < 0 || H5Aread(attr, H5T_NATIVE_UINT32, &stored) < 0) {
            rc = ep_fail(err, "%s: dataset %s has no checksum", file_name(s), name);
        } else if (h5store_crc32(*data, bytes) != stored) {
            rc = ep_fail(err, "%s: dataset %s is corrupted (checksum mismatch)", file_name(s), name);
        }
        if (attr >= 0) H5Aclose(attr);
        if (rc) {
            free(*data);
            *data = NULL;
        }
    }
    H5Tclose(type);
    H5Sclose(space);
    H5Dclose(ds);
    return rc;
}

// 1 if the dataset is stored as bfloat16 (16-bit integers marked so by h5store_write_bf16).
static int is_bf16(h5store *s, const char *name) {
    if (!h5store_has(s, name)) return 0;
    hid_t ds = H5Dopen2(s->file, name, H5P_DEFAULT);
    if (ds < 0) return 0;
    hid_t type = H5Dget_type(ds);
    int yes = H5Tget_class(type) == H5T_INTEGER && H5Tget_size(type) == 2 && H5Aexists(ds, BF16_ATTR) > 0;
    H5Tclose(type);
    H5Dclose(ds);
    return yes;
}

int h5store_read_f32(h5store *s, const char *name, h5shape *shape, float **data, ep_error *err) {
    if (!is_bf16(s, name)) return read_dataset(s, name, shape, H5T_NATIVE_FLOAT, H5T_FLOAT, sizeof(float), (void **)data, err);
    uint16_t *raw = NULL;
    if (read_dataset(s, name, shape, H5T_NATIVE_UINT16, H5T_INTEGER, sizeof(uint16_t), (void **)&raw, err)) return -1;
    size_t n = shape_numel(shape);
    *data = ep_malloc(sizeof(float) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) (*data)[i] = bf16_to_f32(raw[i]);
    free(raw);
    return 0;
}

int h5store_write_bf16(h5store *s, const char *name, const h5shape *shape, const float *data, ep_error *err) {
    size_t n = shape_numel(shape);
    uint16_t *raw = ep_malloc(sizeof(uint16_t) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) raw[i] = f32_to_bf16(data[i]);
    int rc = write_dataset(s, name, shape, H5T_STD_U16LE, H5T_NATIVE_UINT16, raw, sizeof(uint16_t), err);
    free(raw);
    if (rc) return -1;
    hid_t ds = H5Dopen2(s->file, name, H5P_DEFAULT), space = H5Screate(H5S_SCALAR);
    uint8_t one = 1;
    hid_t attr = H5Acreate2(ds, BF16_ATTR, H5T_STD_U8LE, space, H5P_DEFAULT, H5P_DEFAULT);
    if (attr < 0 || H5Awrite(attr, H5T_NATIVE_UINT8, &one) < 0) rc = ep_fail(err, "%s: cannot mark %s as bfloat16", file_name(s), name);
    if (attr >= 0) H5Aclose(attr);
    H5Sclose(space);
    H5Dclose(ds);
    return rc;
}

int h5store_read_f64(h5store *s, const char *name, h5shape *shape, double **data, ep_error *err) {
    return read_dataset(s, name, shape, H5T_NATIVE_DOUBLE, H5T_FLOAT, sizeof(double), (void **)data, err);
}

int h5store_read_i32(h5store *s, const char *name, h5shape *shape, int32_t **data, ep_error *err) {
    return read_dataset(s, name, shape, H5T_NATIVE_INT32, H5T_INTEGER, sizeof(int32_t), (void **)data, err);
}

static int write_attr(h5store *s, const char *name, hid_t type, const void *value, ep_error *err) {
    if (H5Aexists(s->file, name) > 0) H5Adelete(s->file, name);
    hid_t space = H5Screate(H5S_SCALAR);
    hid_t attr = H5Acreate2(s->file, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
    int rc = attr < 0 || H5Awrite(attr, type, value) < 0 ? ep_fail(err, "%s: cannot write attribute %s", file_name(s), name) : 0;
    if (attr >= 0) H5Aclose(attr);
    H5Sclose(space);
    return rc;
}

int h5store_set_str(h5store *s, const char *name, const char *value, ep_error *err) {
    hid_t type = H5Tcopy(H5T_C_S1);
    H5Tset_size(type, H5T_VARIABLE);
    H5Tset_cset(type, H5T_CSET_UTF8);
    int rc = write_attr(s, name, type, &value, err);
    H5Tclose(type);
    return rc;
}

int h5store_set_i64(h5store *s, const char *name, int64_t value, ep_error *err) {
    return write_attr(s, name, H5T_NATIVE_INT64, &value, err);
}

int h5store_get_str(h5store *s, const char *name, char **value, ep_error *err) {
    if (H5Aexists(s->file, name) <= 0) return ep_fail(err, "%s: attribute %s is missing", file_name(s), name);
    hid_t attr = H5Aopen(s->file, name, H5P_DEFAULT), type = H5Aget_type(attr);
    int rc = 0;
    if (H5Tget_class(type) != H5T_STRING || !H5Tis_variable_str(type)) {
        rc = ep_fail(err, "%s: attribute %s is not a string", file_name(s), name);
    } else {
        char *raw = NULL;
        hid_t mem = H5Tcopy(type);  // same character set: HDF5 does not convert ASCII <-> UTF-8
        if (H5Aread(attr, mem, &raw) < 0 || !raw) {
            rc = ep_fail(err, "%s: cannot read attribute %s", file_name(s), name);
        } else {
            *value = ep_strdup(raw);
            H5free_memory(raw);
        }
        H5Tclose(mem);
    }
    H5Tclose(type);
    H5Aclose(attr);
    return rc;
}

int h5store_get_i64(h5store *s, const char *name, int64_t *value, ep_error *err) {
    if (H5Aexists(s->file, name) <= 0) return ep_fail(err, "%s: attribute %s is missing", file_name(s), name);
    hid_t attr = H5Aopen(s->file, name, H5P_DEFAULT), type = H5Aget_type(attr);
    int rc = H5Tget_class(type) != H5T_INTEGER || H5Aread(attr, H5T_NATIVE_INT64, value) < 0
                 ? ep_fail(err, "%s: attribute %s is not an integer", file_name(s), name)
                 : 0;
    H5Tclose(type);
    H5Aclose(attr);
    return rc;
}

h5store_origin h5store_made_from_format(const char *path, const char *identity, const char *format, ep_error *why) {
    if (access(path, F_OK) != 0) return H5STORE_ABSENT;
    h5store s;
    if (h5store_open(path, &s, why)) return H5STORE_DAMAGED;
    char *have = NULL;
    ep_error ignored;
    if (format) {
        int ok = h5store_get_str(&s, "format", &have, &ignored) == 0 && !strcmp(have, format);
        if (!ok) ep_fail(why, "%s: format %s, this edgepatch writes %s (an older layout)", path, have ? have : "missing", format);
        free(have);
        have = NULL;
        if (!ok) {
            h5store_close(&s);
            return H5STORE_DAMAGED;
        }
    }
    int same = h5store_get_str(&s, "inputs_hash", &have, &ignored) == 0 && !strcmp(have, identity);
    free(have);
    h5store_close(&s);
    return same ? H5STORE_SAME : H5STORE_OTHER;
}

h5store_origin h5store_made_from(const char *path, const char *identity, ep_error *why) {
    return h5store_made_from_format(path, identity, NULL, why);
}

// ---- strings, labels, attributes on objects

static hid_t utf8_type(void) {
    hid_t type = H5Tcopy(H5T_C_S1);
    H5Tset_size(type, H5T_VARIABLE);
    H5Tset_cset(type, H5T_CSET_UTF8);
    return type;
}

int h5store_write_str(h5store *s, const char *name, const h5shape *shape, const char *const *data, ep_error *err) {
    if (shape->rank < 1 || shape->rank > H5STORE_MAX_RANK)
        return ep_fail(err, "%s: dataset %s: rank %d not supported", file_name(s), name, shape->rank);
    size_t n = shape_numel(shape), bytes = 0;
    const char **v = ep_malloc(sizeof(char *) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) v[i] = data[i] ? data[i] : "", bytes += strlen(v[i]) + 1;
    // The checksum covers the strings, each with its NUL, in row-major order.
    char *all = ep_malloc(bytes ? bytes : 1), *at = all;
    for (size_t i = 0; i < n; i++) {
        size_t k = strlen(v[i]) + 1;
        memcpy(at, v[i], k), at += k;
    }
    hsize_t dims[H5STORE_MAX_RANK];
    for (int i = 0; i < shape->rank; i++) dims[i] = (hsize_t)shape->dims[i];
    hid_t type = utf8_type(), space = H5Screate_simple(shape->rank, dims, NULL);
    hid_t lcpl = H5Pcreate(H5P_LINK_CREATE), dcpl = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_create_intermediate_group(lcpl, 1);
    H5Pset_obj_track_times(dcpl, 0);
    hid_t ds = H5Dcreate2(s->file, name, type, space, lcpl, dcpl, H5P_DEFAULT);
    int rc = 0;
    if (ds < 0 || (n && H5Dwrite(ds, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, v) < 0)) {
        rc = ep_fail(err, "%s: cannot write dataset %s (exists already, or disk full?)", file_name(s), name);
    } else {
        uint32_t crc = h5store_crc32(all, bytes);
        rc = write_crc(s, ds, name, crc, err);
    }
    if (ds >= 0) H5Dclose(ds);
    H5Pclose(dcpl), H5Pclose(lcpl), H5Sclose(space), H5Tclose(type);
    free(v), free(all);
    return rc;
}

// n strings (raw[i] may be NULL) copied into one block: the pointer array, a NULL, then the text.
static char **string_block(char **raw, size_t n) {
    size_t bytes = sizeof(char *) * (n + 1);
    for (size_t i = 0; i < n; i++) bytes += (raw[i] ? strlen(raw[i]) : 0) + 1;
    char **out = ep_malloc(bytes), *at = (char *)(out + n + 1);
    for (size_t i = 0; i < n; i++) {
        const char *t = raw[i] ? raw[i] : "";
        size_t k = strlen(t) + 1;
        memcpy(at, t, k);
        out[i] = at, at += k;
    }
    out[n] = NULL;
    return out;
}

int h5store_read_str(h5store *s, const char *name, h5shape *shape, char ***data, ep_error *err) {
    *data = NULL;
    if (!h5store_has(s, name)) return ep_fail(err, "%s: dataset %s is missing", file_name(s), name);
    hid_t ds = H5Dopen2(s->file, name, H5P_DEFAULT);
    if (ds < 0) return ep_fail(err, "%s: cannot open dataset %s", file_name(s), name);
    hid_t space = H5Dget_space(ds), type = H5Dget_type(ds);
    int rank = H5Sget_simple_extent_ndims(space), rc = 0;
    if (H5Tget_class(type) != H5T_STRING || !H5Tis_variable_str(type) || rank < 1 || rank > H5STORE_MAX_RANK) {
        rc = ep_fail(err, "%s: dataset %s has an unexpected type or rank", file_name(s), name);
    } else {
        hsize_t dims[H5STORE_MAX_RANK];
        H5Sget_simple_extent_dims(space, dims, NULL);
        shape->rank = rank;
        for (int i = 0; i < rank; i++) shape->dims[i] = (int64_t)dims[i];
        size_t n = shape_numel(shape);
        char **raw = ep_calloc(n ? n : 1, sizeof(char *));
        hid_t mem = H5Tcopy(type);
        uint32_t stored = 0;
        hid_t attr = H5Aexists(ds, CRC_ATTR) > 0 ? H5Aopen(ds, CRC_ATTR, H5P_DEFAULT) : -1;
        if (n && H5Dread(ds, mem, H5S_ALL, H5S_ALL, H5P_DEFAULT, raw) < 0) {
            rc = ep_fail(err, "%s: cannot read dataset %s (corrupted file?)", file_name(s), name);
        } else if (attr < 0 || H5Aread(attr, H5T_NATIVE_UINT32, &stored) < 0) {
            rc = ep_fail(err, "%s: dataset %s has no checksum", file_name(s), name);
        } else {
            *data = string_block(raw, n);
            size_t bytes = 0;
            for (size_t i = 0; i < n; i++) bytes += strlen((*data)[i]) + 1;
            if (h5store_crc32(n ? (*data)[0] : "", bytes) != stored) {
                rc = ep_fail(err, "%s: dataset %s is corrupted (checksum mismatch)", file_name(s), name);
                free(*data);
                *data = NULL;
            }
        }
        if (n) H5Dvlen_reclaim(mem, space, H5P_DEFAULT, raw);
        if (attr >= 0) H5Aclose(attr);
        H5Tclose(mem);
        free(raw);
    }
    H5Tclose(type);
    H5Sclose(space);
    H5Dclose(ds);
    return rc;
}

int h5store_label(h5store *s, const char *dataset, const char *labels, ep_error *err) {
    hid_t ds = h5store_has(s, dataset) ? H5Dopen2(s->file, dataset, H5P_DEFAULT) : -1;
    if (ds < 0) return ep_fail(err, "%s: cannot label dataset %s: no such dataset", file_name(s), dataset);
    hid_t space = H5Dget_space(ds);
    int rank = H5Sget_simple_extent_ndims(space), rc = 0, dim = 0;
    H5Sclose(space);
    int count = 1;  // counted first: a wrong count labels nothing
    for (const char *c = labels; *c; c++) count += *c == ',';
    if (count != rank) rc = ep_fail(err, "%s: dataset %s: %d labels \"%s\" for rank %d", file_name(s), dataset, count, labels, rank);
    char *copy = ep_strdup(labels), *save = NULL;
    for (char *t = strtok_r(copy, ",", &save); t && rc == 0; t = strtok_r(NULL, ",", &save), dim++)
        if (H5DSset_label(ds, (unsigned)dim, t) < 0)
            rc = ep_fail(err, "%s: cannot label dataset %s with \"%s\"", file_name(s), dataset, labels);
    if (rc == 0 && dim != rank)
        rc = ep_fail(err, "%s: dataset %s: empty labels in \"%s\"", file_name(s), dataset, labels);
    free(copy);
    H5Dclose(ds);
    return rc;
}

int h5store_get_label(h5store *s, const char *dataset, int dim, char *out, size_t n, ep_error *err) {
    hid_t ds = h5store_has(s, dataset) ? H5Dopen2(s->file, dataset, H5P_DEFAULT) : -1;
    if (ds < 0) return ep_fail(err, "%s: dataset %s is missing", file_name(s), dataset);
    if (n) out[0] = 0;
    ssize_t got = H5DSget_label(ds, (unsigned)dim, out, n);
    H5Dclose(ds);
    return got < 0 ? ep_fail(err, "%s: dataset %s: cannot read the label of dimension %d", file_name(s), dataset, dim) : 0;
}

static hid_t open_object(h5store *s, const char *object) {
    if (!object || !object[0] || !strcmp(object, "/")) return H5Oopen(s->file, "/", H5P_DEFAULT);
    return h5store_has(s, object) ? H5Oopen(s->file, object, H5P_DEFAULT) : -1;
}

static int write_attr_at(h5store *s, const char *object, const char *name, hid_t type, hid_t space, const void *value,
                         ep_error *err) {
    hid_t obj = open_object(s, object);
    if (obj < 0) return ep_fail(err, "%s: cannot write attribute %s of %s: no such object", file_name(s), name, object);
    if (H5Aexists(obj, name) > 0) H5Adelete(obj, name);
    hid_t attr = H5Acreate2(obj, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
    int rc = attr < 0 || H5Awrite(attr, type, value) < 0
                 ? ep_fail(err, "%s: cannot write attribute %s of %s", file_name(s), name, object)
                 : 0;
    if (attr >= 0) H5Aclose(attr);
    H5Oclose(obj);
    return rc;
}

int h5store_set_str_at(h5store *s, const char *object, const char *name, const char *value, ep_error *err) {
    hid_t type = utf8_type(), space = H5Screate(H5S_SCALAR);
    int rc = write_attr_at(s, object, name, type, space, &value, err);
    H5Sclose(space), H5Tclose(type);
    return rc;
}

int h5store_set_strs_at(h5store *s, const char *object, const char *name, const char *const *values, int n,
                        ep_error *err) {
    if (n < 1) return ep_fail(err, "%s: attribute %s of %s: an empty list", file_name(s), name, object);
    hsize_t dim = (hsize_t)n;
    hid_t type = utf8_type(), space = H5Screate_simple(1, &dim, NULL);
    int rc = write_attr_at(s, object, name, type, space, values, err);
    H5Sclose(space), H5Tclose(type);
    return rc;
}

int h5store_get_strs_at(h5store *s, const char *object, const char *name, char ***values, int *n, ep_error *err) {
    *values = NULL, *n = 0;
    hid_t obj = open_object(s, object);
    if (obj < 0 || H5Aexists(obj, name) <= 0) {
        if (obj >= 0) H5Oclose(obj);
        return ep_fail(err, "%s: attribute %s of %s is missing", file_name(s), name, object);
    }
    hid_t attr = H5Aopen(obj, name, H5P_DEFAULT), type = H5Aget_type(attr), space = H5Aget_space(attr);
    int rc = 0;
    hssize_t count = H5Sget_simple_extent_npoints(space);
    if (H5Tget_class(type) != H5T_STRING || !H5Tis_variable_str(type) || H5Sget_simple_extent_ndims(space) != 1 || count < 1) {
        rc = ep_fail(err, "%s: attribute %s of %s is not a list of strings", file_name(s), name, object);
    } else {
        char **raw = ep_calloc((size_t)count, sizeof(char *));
        hid_t mem = H5Tcopy(type);
        if (H5Aread(attr, mem, raw) < 0) {
            rc = ep_fail(err, "%s: cannot read attribute %s of %s", file_name(s), name, object);
        } else {
            *values = string_block(raw, (size_t)count), *n = (int)count;
            H5Dvlen_reclaim(mem, space, H5P_DEFAULT, raw);
        }
        H5Tclose(mem);
        free(raw);
    }
    H5Sclose(space), H5Tclose(type), H5Aclose(attr), H5Oclose(obj);
    return rc;
}
