// safetensors: read-only, memory-mapped access to HuggingFace .safetensors checkpoints.
//
// Owns: the mapping of one file or of a sharded set (model.safetensors.index.json), and a validated
// table of tensors (name, dtype, shape, bytes). Promises: every tensor's bytes lie inside its file's
// data area and match dtype x shape; a bad header, a truncated file or an index naming a missing
// tensor is an error naming the file and the field, and nothing is ever read out of bounds. Never
// converts or copies data except in safetensors_read_f32 / safetensors_read_i32. Also writes the
// format (safetensors_write_header: F32 tensors laid out back to back, for convert-gguf).
#ifndef EP_SAFETENSORS_H
#define EP_SAFETENSORS_H

#include <stddef.h>
#include <stdio.h>
#include <stdint.h>

#include "kernels/bf16.h"
#include "pipeline/error.h"

typedef enum { ST_F32, ST_F16, ST_BF16, ST_I32, ST_I64, ST_F64, ST_I8, ST_U8, ST_BOOL, ST_I16 } st_dtype;

#define ST_MAX_DIMS 8

typedef struct {
    char *name;
    st_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    int64_t numel;
    const unsigned char *data;  // inside the mapping; not necessarily aligned
    size_t nbytes;
    int file;  // index into safetensors.paths
} st_tensor;

typedef struct {
    int n_files;
    char **paths;
    void **maps;
    size_t *map_sizes;
    int n_tensors;
    st_tensor *tensors;  // sorted by name
    char *metadata_json; // the "__metadata__" object of the first file, as JSON text (or NULL)
} safetensors;

// Opens one .safetensors file.
int safetensors_open_file(const char *path, safetensors *st, ep_error *err);
// Parses safetensors bytes already in memory (tests, fuzzing); name stands for the file in messages.
// The bytes are borrowed: tensors point into them, so they must outlive st.
int safetensors_open_buffer(const void *bytes, size_t size, const char *name, safetensors *st, ep_error *err);
// Opens a checkpoint folder: model.safetensors.index.json (sharded) if present, else model.safetensors.
int safetensors_open_dir(const char *dir, safetensors *st, ep_error *err);
void safetensors_close(safetensors *st);

const st_tensor *safetensors_find(const safetensors *st, const char *name);
const char *st_dtype_name(st_dtype d);
size_t st_dtype_size(st_dtype d);

// Converts a floating tensor (F32, F16, BF16, F64) to fp32 into out[numel].
int safetensors_read_f32(const st_tensor *t, float *out, ep_error *err);
// Converts an integer tensor (I32, I64, I16, I8, U8) to int32 into out[numel]; fails if a value does
// not fit.
int safetensors_read_i32(const st_tensor *t, int32_t *out, ep_error *err);

// Writes the 8-byte length and JSON header of a file whose tensors are all F32 and follow the header
// back to back in the order given (data_offsets contiguous from 0, as the safetensors library requires);
// the caller then writes each tensor's numel * 4 bytes in that order. The header is space-padded to a
// multiple of 8 bytes so that the data section starts aligned. path is for messages.
typedef struct {
    const char *name;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
} st_write_entry;
int safetensors_write_header(FILE *f, const char *path, const st_write_entry *entries, int n, ep_error *err);

// fp16 -> fp32, exact. (bf16 conversions: kernels/bf16.h, included here for the readers of BF16 data.)
float f16_to_f32(uint16_t h);

#endif
