// model_config: a HuggingFace config.json read into one architecture description.
//
// Owns: the mapping from the three supported HF architectures (Gemma2ForCausalLM, LlamaForCausalLM
// for Llama-3/3.1 and SmolLM, PhiForCausalLM) to data: norm kind, activation, block layout, rotary
// fraction, softcaps, window pattern, biases, embedding scale. The forward pass reads only this struct,
// never the architecture name, so architectures differ in data and not in copies of code.
// Promises: every field is validated (types, ranges, divisibility); an unsupported architecture or
// option (e.g. Phi's qk_layernorm, an unknown rope_scaling type) is an error naming the field.
#ifndef EP_MODEL_CONFIG_H
#define EP_MODEL_CONFIG_H

#include <jansson.h>

#include "kernels/ops.h"
#include "pipeline/error.h"

typedef enum { NORM_RMS, NORM_LAYER } norm_kind;

typedef enum {
    BLOCK_PRE_NORM,       // Llama: h += attn(norm(h)); h += mlp(norm(h))
    BLOCK_SANDWICH_NORM,  // Gemma-2: h += post_norm(attn(norm(h))); h += post_norm(mlp(norm(h)))
    BLOCK_PARALLEL,       // Phi-2: h += attn(norm(h)) + mlp(norm(h)), one norm
} block_kind;

typedef enum { ARCH_LLAMA, ARCH_GEMMA2, ARCH_PHI } arch_id;

// The part of the model one rank of a tensor-parallel group holds (docs/tensor_parallel.md): contiguous
// query heads, the KV heads they read (replicated over ranks when there are fewer KV heads than ranks),
// a block of MLP columns and, when the group size divides the vocabulary, a block of lm_head rows.
typedef struct {
    int rank, size;            // position in the group; size 0 (a hand-made config) or 1: the whole model
    int head0, n_heads;        // query heads [head0, head0 + n_heads)
    int kv_head0, n_kv_heads;  // KV heads [kv_head0, kv_head0 + n_kv_heads)
    int inter0, n_inter;       // MLP columns [inter0, inter0 + n_inter)
    int vocab0, n_vocab;       // lm_head rows (logits) this rank computes
} tp_shard;

typedef struct {
    arch_id arch;
    char arch_name[64];  // the HF class name, for messages

    int vocab_size;
    int hidden;
    int n_layers;
    int n_heads;
    int n_kv_heads;
    int head_dim;
    int intermediate;
    int max_positions;

    norm_kind norm;
    float norm_eps;
    float norm_weight_offset;  // Gemma's RMSNorm multiplies by (1 + w)
    block_kind block;
    act_kind act;
    int gated_mlp;             // gate/up/down (Llama, Gemma) vs fc1/fc2 (Phi)

    int qkv_bias;              // q/k/v projections have biases
    int o_bias;                // output projection has a bias
    int mlp_bias;
    int lm_head_bias;
    int tied_embeddings;

    float rope_theta;
    int rotary_dim;            // dims rotated per head (Phi: partial_rotary_factor * head_dim)
    int rope_llama3;           // rope_scaling {"rope_type": "llama3", ...}
    float rope_factor, rope_low_freq_factor, rope_high_freq_factor;
    int rope_original_max_positions;

    float attn_scale;          // multiplies q.k: query_pre_attn_scalar^-0.5 (Gemma) or head_dim^-0.5
    float attn_softcap;        // 0 = none
    float final_softcap;       // 0 = none
    int sliding_window;        // 0 = none
    int sliding_every_other;   // window only on even layers (Gemma-2)
    int scale_embeddings;      // multiply embeddings by sqrt(hidden) (Gemma)

    tp_shard tp;               // the whole model unless model_config_set_shard made it a shard

    int bos_id;                // -1 when absent
    int n_eos;                 // eos_token_id may be one id or a list (Llama-3.1)
    int eos_ids[8];
} model_config;

// Parses and validates DIR/config.json (path is the file itself).
int model_config_load(const char *path, model_config *cfg, ep_error *err);
// The same from a config.json already parsed (e.g. inline in a sweep file); path names it in messages.
int model_config_parse(json_t *root, const char *path, model_config *cfg, ep_error *err);

// Rank `rank` of a tensor-parallel group of `size` ranks: its shard of cfg's model, or an error naming the
// config field that does not split (heads, KV heads, MLP width). path names config.json in messages.
int model_config_shard(const model_config *cfg, const char *path, int rank, int size, tp_shard *out, ep_error *err);
// cfg->tp when set, else the whole model (for configs made by hand).
tp_shard model_config_local(const model_config *cfg);

// The window of layer l (0 = full causal attention).
int model_config_layer_window(const model_config *cfg, int layer);

// Rotary inverse frequencies (rotary_dim / 2 floats), computed in fp32 in the order HF computes them,
// including llama3 frequency scaling.
void model_config_inv_freq(const model_config *cfg, float *inv_freq);

#endif
