// h5store: the HDF5 artifacts every stage reads and writes, crash-safe and self-checking.
//
// Owns: one HDF5 file per artifact. Writers create "<path>.tmp-<pid>", write datasets and attributes,
// then h5store_commit writes the completion record, closes the file, seals it (a CRC-32 of every byte
// of the file, in HDF5's user block: docs/artifacts.md), fsyncs, renames onto <path> and fsyncs the
// folder; a crash or kill at any moment leaves either the old file or no file under <path>, plus a tmp
// file that readers never open. h5store_open reads the whole file and refuses one without the seal (an
// unfinished write) or whose bytes do not match it (damaged anywhere: data, attributes or HDF5's own
// structures), before HDF5 parses it. Every dataset also carries a CRC-32 of its bytes, checked as it is
// read. Errors name the file and the dataset.
// Never calls MPI: parallel writers write their own files (see sched/).
#ifndef EP_H5STORE_H
#define EP_H5STORE_H

#include <hdf5.h>
#include <stddef.h>
#include <stdint.h>

#include "pipeline/error.h"

typedef struct {
    hid_t file;
    char *path;      // the final name
    char *tmp_path;  // where a writer writes until commit; NULL for readers
} h5store;

#define H5STORE_MAX_RANK 6

typedef struct {
    int rank;
    int64_t dims[H5STORE_MAX_RANK];
} h5shape;

int h5store_create(const char *path, h5store *s, ep_error *err);
// Marks complete and atomically publishes the file; closes s either way.
int h5store_commit(h5store *s, ep_error *err);
// Closes and deletes an unfinished file (the final path is untouched).
void h5store_abandon(h5store *s);

int h5store_open(const char *path, h5store *s, ep_error *err);
void h5store_close(h5store *s);
// 1 if path exists and carries the completion record, else 0 (no error).
int h5store_is_complete(const char *path);

// Datasets: names may contain '/' (groups are created as needed). float32, float64 and int32, row-major.
int h5store_write_f32(h5store *s, const char *name, const h5shape *shape, const float *data, ep_error *err);
int h5store_write_f64(h5store *s, const char *name, const h5shape *shape, const double *data, ep_error *err);
int h5store_write_i32(h5store *s, const char *name, const h5shape *shape, const int32_t *data, ep_error *err);
// Stores float data as bfloat16 (round to nearest even; half the bytes); h5store_read_f32 reads it back
// as floats.
int h5store_write_bf16(h5store *s, const char *name, const h5shape *shape, const float *data, ep_error *err);
// Readers allocate *data (free with free()) and check the CRC.
int h5store_read_f32(h5store *s, const char *name, h5shape *shape, float **data, ep_error *err);
int h5store_read_f64(h5store *s, const char *name, h5shape *shape, double **data, ep_error *err);
int h5store_read_i32(h5store *s, const char *name, h5shape *shape, int32_t **data, ep_error *err);
int h5store_has(h5store *s, const char *name);
// Strings: a dataset of variable-length UTF-8 strings (NULL entries are stored as ""). Its crc32 covers
// every string with its terminating NUL, in row-major order. The reader allocates an array of strings in
// one block (free(*data) frees all).
int h5store_write_str(h5store *s, const char *name, const h5shape *shape, const char *const *data, ep_error *err);
int h5store_read_str(h5store *s, const char *name, h5shape *shape, char ***data, ep_error *err);

// Self-description (docs/artifacts.md, "Conventions").
// Dimension labels of an existing dataset: one name per dimension, comma-separated ("prompt,position"),
// as many as its rank, stored with HDF5's dimension-scale API (H5DSset_label: attribute DIMENSION_LABELS;
// h5py: ds.dims[i].label).
int h5store_label(h5store *s, const char *dataset, const char *labels, ep_error *err);
// Reads dimension dim's label into out ("" when unlabelled).
int h5store_get_label(h5store *s, const char *dataset, int dim, char *out, size_t n, ep_error *err);
// Attributes on an object: a dataset or group by name ("/" or "" for the root). A string, or an array of n
// strings (enum_names and the like: variable-length UTF-8, index i = value i).
int h5store_set_str_at(h5store *s, const char *object, const char *name, const char *value, ep_error *err);
int h5store_set_strs_at(h5store *s, const char *object, const char *name, const char *const *values, int n,
                        ep_error *err);
// Reads a string-array attribute into a NULL-terminated array of strings in one block (free(*values)).
int h5store_get_strs_at(h5store *s, const char *object, const char *name, char ***values, int *n, ep_error *err);

// What an existing artifact at path was made from, by its "inputs_hash" attribute: the skip/recompute
// decision of every stage's output and item shard. h5store_made_from_format also wants the root
// attribute "format" to equal `format` (when not NULL): a file of another format (an older edgepatch's
// layout) is H5STORE_DAMAGED, so it is rebuilt like any unfinished or damaged file, never refused.
typedef enum {
    H5STORE_ABSENT = 0,   // no file at path
    H5STORE_SAME = 1,     // complete and sealed (so every byte sound: h5store_open), made from `identity`
    H5STORE_DAMAGED = 2,  // unreadable, unfinished or damaged (why says how)
    H5STORE_OTHER = 3,    // sound but made from other inputs (or without an inputs_hash)
} h5store_origin;
h5store_origin h5store_made_from(const char *path, const char *identity, ep_error *why);
h5store_origin h5store_made_from_format(const char *path, const char *identity, const char *format, ep_error *why);

// The CRC-32 (zlib's) every dataset carries: of its bytes as stored, any length (datasets over 4 GiB too).
uint32_t h5store_crc32(const void *data, size_t bytes);

// Root attributes: strings and integers.
int h5store_set_str(h5store *s, const char *name, const char *value, ep_error *err);
int h5store_get_str(h5store *s, const char *name, char **value, ep_error *err);
int h5store_set_i64(h5store *s, const char *name, int64_t value, ep_error *err);
int h5store_get_i64(h5store *s, const char *name, int64_t *value, ep_error *err);

#endif
