// gguf: read-only, memory-mapped access to llama.cpp GGUF files (versions 2 and 3, little-endian), their
// dequantization to fp32, and llama.cpp's Llama tensor naming mapped back to HuggingFace's.
//
// Owns: the mapping, a validated table of metadata key/values (every GGUF value type, arrays and
// nested arrays included; strings point into the mapping) and a validated table of tensors (name,
// ggml type, dimensions, bytes). Promises: every length, count and offset is bounds-checked before it
// is used; every tensor's bytes lie inside the aligned data section, are aligned, do not overlap and
// match type x dimensions; a truncated or corrupt file is a one-line error naming the file and the
// field. Dequantizes exactly the types listed in gguf_type_supported (F32, F16, BF16, Q8_0, Q4_0,
// Q4_1: what SmolLM2-135M-Instruct.Q4_1.gguf holds, plus the common unquantized ones); any other ggml
// type is an error naming the tensor. Never writes the file.
//
// Layout: GGUF dimensions run fastest first (ne[0] is a row's length), the reverse of HF/safetensors
// shapes: a GGUF [in, out] matrix is HF's [out, in] with the same bytes in the same order.
#ifndef EP_GGUF_H
#define EP_GGUF_H

#include <stddef.h>
#include <stdint.h>

#include "pipeline/error.h"

// Metadata value types, as numbered in the GGUF specification.
typedef enum {
    GGUF_U8 = 0, GGUF_I8 = 1, GGUF_U16 = 2, GGUF_I16 = 3, GGUF_U32 = 4, GGUF_I32 = 5, GGUF_F32 = 6, GGUF_BOOL = 7,
    GGUF_STRING = 8, GGUF_ARRAY = 9, GGUF_U64 = 10, GGUF_I64 = 11, GGUF_F64 = 12,
} gguf_value_type;

// Tensor types, as numbered in ggml (only the ones this reader names).
typedef enum {
    GGML_F32 = 0, GGML_F16 = 1, GGML_Q4_0 = 2, GGML_Q4_1 = 3, GGML_Q8_0 = 8, GGML_BF16 = 30,
} ggml_type;

#define GGUF_MAX_DIMS 4

typedef struct {
    const char *ptr;  // inside the mapping, NOT NUL-terminated
    uint64_t len;
} gguf_string;

typedef struct {
    char *key;  // owned, NUL-terminated
    gguf_value_type type;
    // Scalars: the value widened (integers and bools in i or u, floats in f); strings in str.
    int64_t i;
    uint64_t u;
    double f;
    gguf_string str;
    // Arrays: element type and count; elements start at `data` in the mapping. String arrays also get
    // a table of their strings (strs[n]); arrays of arrays are validated and skipped (no accessor).
    gguf_value_type elem_type;
    uint64_t n;
    const unsigned char *data;
    gguf_string *strs;
} gguf_kv;

typedef struct {
    char *name;  // owned, NUL-terminated
    uint32_t type;  // a ggml_type number (validated to be one gguf_type_name knows)
    int ndim;
    int64_t ne[GGUF_MAX_DIMS];  // fastest first; unused dims are 1
    int64_t numel;
    uint64_t offset;  // relative to the data section
    const unsigned char *data;
    size_t nbytes;
} gguf_tensor;

typedef struct {
    char *path;
    void *map;  // NULL when the bytes are borrowed (gguf_open_buffer)
    size_t map_size;
    uint32_t version;
    uint64_t alignment;
    int n_kv;
    gguf_kv *kv;
    int n_tensors;
    gguf_tensor *tensors;  // in file order
} gguf_file;

int gguf_open_file(const char *path, gguf_file *g, ep_error *err);
// Parses GGUF bytes already in memory (tests, fuzzing); name stands for the file in messages. The bytes
// are borrowed and must outlive g.
int gguf_open_buffer(const void *bytes, size_t size, const char *name, gguf_file *g, ep_error *err);
void gguf_close(gguf_file *g);

const gguf_kv *gguf_find_kv(const gguf_file *g, const char *key);
const gguf_tensor *gguf_find_tensor(const gguf_file *g, const char *name);

// Typed metadata getters: an absent key is an error when required, else leaves *out at fallback; a
// key of the wrong type is always an error. get_int accepts every integer type (range-checked to
// int64), get_float F32/F64, get_string a string (copied, NUL-terminated, free() it; embedded NULs
// are an error).
int gguf_get_int(const gguf_file *g, const char *key, int required, int64_t fallback, int64_t *out, ep_error *err);
int gguf_get_float(const gguf_file *g, const char *key, int required, double fallback, double *out, ep_error *err);
int gguf_get_bool(const gguf_file *g, const char *key, int required, int fallback, int *out, ep_error *err);
int gguf_get_string(const gguf_file *g, const char *key, int required, char **out, ep_error *err);

const char *gguf_type_name(uint32_t type);  // "Q4_1", or NULL for a type this reader does not know
int gguf_type_supported(uint32_t type);      // 1 if gguf_dequantize handles it

// Dequantizes a tensor into out[numel] (fp32), as ggml's dequantize_row_* does (for Q4_1: d * q + m
// in fp32, with d, m the block's fp16 scale and minimum).
int gguf_dequantize(const gguf_file *g, const gguf_tensor *t, float *out, ep_error *err);

// --- llama.cpp's Llama naming ---

// The llama.* hyperparameters a Llama GGUF carries (general.architecture must be "llama").
typedef struct {
    int64_t n_layers, hidden, intermediate, n_heads, n_kv_heads, context_length, vocab_size, rope_dims;
    double rope_theta, rms_eps;
} gguf_llama_hparams;

int gguf_llama_hparams_read(const gguf_file *g, gguf_llama_hparams *hp, ep_error *err);

// Maps a llama.cpp tensor name (token_embd.weight, blk.N.attn_q.weight, ...) to its HF Llama name.
// *unpermute_heads is set to the head count whose Q/K row permutation must be undone (n_heads for
// attn_q, n_kv_heads for attn_k), else 0. Returns -1 with the tensor named for an unknown name.
int gguf_llama_hf_name(const char *gguf_name, const gguf_llama_hparams *hp, char *hf, size_t hf_size,
                       int *unpermute_heads, ep_error *err);

// convert_hf_to_gguf.py stores q_proj/k_proj rows permuted for llama.cpp's RoPE:
//   w.reshape(n_head, 2, d / n_head / 2, in).swapaxes(1, 2).reshape(d, in)
// (GGUF row h*hd + 2i + j holds HF row h*hd + j*hd/2 + i). These undo and apply that on [rows, cols].
int gguf_unpermute_rows(const float *in, float *out, int64_t rows, int64_t cols, int64_t n_head, ep_error *err);
int gguf_permute_rows(const float *in, float *out, int64_t rows, int64_t cols, int64_t n_head, ep_error *err);

// A tensor in HF form: dequantized, un-permuted where needed, with HF's shape (slowest first).
int gguf_read_hf_tensor(const gguf_file *g, const gguf_tensor *t, const gguf_llama_hparams *hp, char *hf_name,
                        size_t hf_name_size, int64_t hf_shape[GGUF_MAX_DIMS], int *hf_ndim, float *out, ep_error *err);

#endif
