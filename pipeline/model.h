// model: a HuggingFace checkpoint folder loaded as fp32 weights for the forward pass.
//
// Owns: the config (model_config), the memory-mapped safetensors, and one fp32 pointer per weight.
// F32 tensors that are 4-byte aligned in the mapping are used in place (no copy); BF16/F16 tensors
// are converted once into an owned buffer. A model opened without weights (model_open_shard) holds the
// config and the mapping only, and model_to_backend moves each tensor from the mapping to the device
// itself (docs/cuda.md, "weights"). Promises: every tensor the architecture needs is present
// with the dtype class and shape the config implies; a missing, misshapen, or unexpected tensor is an
// error naming the file and the tensor. The model is read-only after loading and may be shared by
// threads.
#ifndef EP_MODEL_H
#define EP_MODEL_H

#include "kernels/ops.h"
#include "pipeline/error.h"
#include "pipeline/file_digest.h"
#include "pipeline/group.h"
#include "pipeline/model_config.h"
#include "pipeline/safetensors.h"

typedef struct {
    const float *attn_norm, *attn_norm_bias;  // input_layernorm
    const float *attn_post_norm;              // Gemma-2 post_attention_layernorm
    const float *mlp_norm;                    // Llama post_attention_layernorm, Gemma-2 pre_feedforward_layernorm
    const float *mlp_post_norm;               // Gemma-2 post_feedforward_layernorm
    const float *wq, *wk, *wv, *wo;           // [out, in], HF Linear layout
    const float *bq, *bk, *bv, *bo;
    const float *w_gate, *w_up, *w_down;      // Phi-2: fc1 is w_up, fc2 is w_down, no gate
    const float *b_gate, *b_up, *b_down;
    // A bf16 device model (model_to_backend with bf16 on) holds the matrices as bf16 here instead, and
    // the fp32 pointers above are NULL for them.
    const uint16_t *wq_bf16, *wk_bf16, *wv_bf16, *wo_bf16, *w_gate_bf16, *w_up_bf16, *w_down_bf16;
} layer_weights;

typedef struct {
    model_config cfg;
    const float *embed;  // [vocab, hidden]; a vocabulary-parallel shard: its rows [tp.vocab0, + tp.n_vocab)
    const float *final_norm, *final_norm_bias;
    const float *lm_head, *lm_head_bias;  // lm_head == embed when embeddings are tied
    const uint16_t *lm_head_bf16;         // a bf16 device model's vocabulary projection (a copy when tied)
    layer_weights *layers;
    float *inv_freq;     // rotary_dim / 2
    float embed_scale;   // sqrt(hidden) rounded to fp32 for Gemma, else 1
    safetensors st;
    void **owned;         // converted tensors and inv_freq (a device model: its buffers), freed with the model
    size_t *owned_bytes;  // their sizes
    int n_owned;
    size_t staging_bytes;  // a device model: the host buffer model_to_backend converted tensors in (freed after)
    uint64_t config_hash;  // of config.json's bytes
    const kernel_ops *backend;  // non-NULL: a device model (model_to_backend) whose weights and inv_freq live in
                                // this backend's memory; `owned` then lists those buffers
    const ep_group *group;  // a shard's tensor-parallel group (cfg.tp.size ranks, f32 buffers in the backend's
                            // memory; pipeline/group.h): set by the caller before model_forward; unused for a
                            // whole model
} model;

// Loads DIR/config.json and DIR's safetensors.
int model_load(const char *dir, model *m, ep_error *err);
// Rank tp_rank's shard of a tensor-parallel group of tp_size ranks (cfg.tp; docs/tensor_parallel.md):
// every tensor is validated whole, but only the rank's slice is held (rows of aligned F32 in place in
// the mapping, other slices converted into owned buffers). cfg keeps the whole model's sizes; cfg.tp says
// which part this is. tp_size 1 is model_load. A config that does not split is an error naming the field.
int model_load_shard(const char *dir, int tp_rank, int tp_size, model *m, ep_error *err);
// model_load_shard without the weights: config, mapping and identity, every tensor validated as there,
// every weight pointer NULL. What a device backend's run keeps on the host (model_to_backend reads the
// tensors from the mapping); the forward and backward passes cannot use it.
int model_open_shard(const char *dir, int tp_rank, int tp_size, model *m, ep_error *err);
// 1 if m's weight pointers are set (model_load, model_load_shard, model_init_random, a device model).
int model_holds_weights(const model *m);
// Host memory a model owns (its owned buffers unless they live on a device): converted weights and
// inv_freq. The mapping is not counted (file pages, shared and evictable).
size_t model_host_bytes(const model *m);
// The weights (floats) a model or shard of cfg's shape holds (cfg->tp; a tied lm_head counts once), as
// model_load_shard would: what `edgepatch memory` reports.
size_t model_held_floats(const model_config *cfg);
// The shape part of a checkpoint's identity: config.json's bytes and every safetensors header (names,
// dtypes, shapes, offsets), without reading the weights themselves.
uint64_t model_identity(const model *m);
// The identity of a loaded checkpoint for artifact attributes: model_identity and the content hash
// (XXH64) of every safetensors file, so it changes when any weight byte does. The hashes come from the
// digest cache at digest_cache when the files' keys match (pipeline/file_digest.h), else each file is
// read once and the cache rewritten. stats (may be NULL) says what was read.
int model_content_identity(const model *m, const char *digest_cache, uint64_t *out, digest_stats *stats, ep_error *err);
void model_free(model *m);

// A host model of the shape cfg describes with deterministic pseudo-random weights (uniform in
// [-0.05, 0.05), norm scales near 1), for benchmarks that need a real model's shape but not its values.
// Free with model_free.
void model_init_random(const model_config *cfg, uint64_t seed, model *m);

// A device model: m's weights (and inv_freq) in ops' memory, put there once, for model_forward with ops.
// For a host backend (ops->host_memory) dev only borrows m's pointers (no copy; m must outlive dev);
// otherwise every tensor is uploaded (a tied lm_head shares the embedding's copy) and dev is
// independent of m. dev has no safetensors (st is empty). Free with model_backend_free, not model_free.
// When m holds no weights (model_open_shard), each tensor, or the rank's slice of it, is read from m's
// mapping and uploaded one at a time: the host holds at most one tensor's conversion (staging_bytes);
// the device model is the same, byte for byte, as from model_load_shard's m. A host backend's fp32
// model borrows m's weights, so it needs m loaded (an error otherwise).
// With bf16 set, dev is a bf16 model on any backend (always copies): every weight is rounded to bf16
// (to nearest even), the matrices (q, k, v, o, gate, up, down, lm_head) are stored as bf16 and
// multiplied with matmul_bf16, the other weights stay fp32 arrays of bf16 values, and Gemma's embedding
// factor is the bf16 one (docs/cuda.md, "bf16 runs").
int model_to_backend(const model *m, const kernel_ops *ops, int bf16, model *dev, ep_error *err);
void model_backend_free(model *dev);

// Gemma multiplies embeddings by sqrt(hidden) as a tensor of the compute dtype: fp32 here, but a bf16
// run rounds the factor to bf16 first (sqrt(3584) = 59.87 becomes 59.75). Returns the factor HF uses.
float model_embed_scale(const model_config *cfg, int bf16_compute);

#endif
