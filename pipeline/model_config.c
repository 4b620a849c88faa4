#include "model_config.h"

#include <float.h>
#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

// Field readers: absent (or null) fields take the HF class default; present fields of the wrong type
// are errors. Each returns 0 or -1 with the message naming file and field.
static int get_int(json_t *root, const char *path, const char *key, int required, int fallback, int *out, ep_error *err) {
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) {
        if (required) return ep_fail(err, "%s: field %s: missing (required)", path, key);
        *out = fallback;
        return 0;
    }
    if (!json_is_integer(v) || json_integer_value(v) < -1 || json_integer_value(v) > 1000000000)
        return ep_fail(err, "%s: field %s: expected an integer", path, key);
    *out = (int)json_integer_value(v);
    return 0;
}

static int get_float(json_t *root, const char *path, const char *key, float fallback, float *out, ep_error *err) {
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) {
        *out = fallback;
        return 0;
    }
    // Out-of-range doubles are rejected before the conversion to float, which would be undefined.
    if (!json_is_number(v) || !(fabs(json_number_value(v)) <= FLT_MAX))
        return ep_fail(err, "%s: field %s: expected a number in float range", path, key);
    *out = (float)json_number_value(v);
    return 0;
}

static int get_bool(json_t *root, const char *path, const char *key, int fallback, int *out, ep_error *err) {
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) {
        *out = fallback;
        return 0;
    }
    if (!json_is_boolean(v)) return ep_fail(err, "%s: field %s: expected true or false", path, key);
    *out = json_is_true(v);
    return 0;
}

static const char *get_string(json_t *root, const char *key, const char *fallback) {
    json_t *v = json_object_get(root, key);
    return json_is_string(v) ? json_string_value(v) : fallback;
}

static int read_special_ids(json_t *root, const char *path, model_config *cfg, ep_error *err) {
    if (get_int(root, path, "bos_token_id", 0, -1, &cfg->bos_id, err)) return -1;
    json_t *eos = json_object_get(root, "eos_token_id");
    cfg->n_eos = 0;
    if (json_is_integer(eos)) {
        if (json_integer_value(eos) < 0 || json_integer_value(eos) > 1000000000)
            return ep_fail(err, "%s: field eos_token_id: expected a token id", path);
        cfg->eos_ids[cfg->n_eos++] = (int)json_integer_value(eos);
    } else if (json_is_array(eos)) {
        size_t i;
        json_t *e;
        json_array_foreach(eos, i, e) {
            if (!json_is_integer(e) || json_integer_value(e) < 0 || json_integer_value(e) > 1000000000 || cfg->n_eos == 8)
                return ep_fail(err, "%s: field eos_token_id: expected token ids (integers >= 0), at most 8", path);
            cfg->eos_ids[cfg->n_eos++] = (int)json_integer_value(e);
        }
    } else if (eos && !json_is_null(eos)) {
        return ep_fail(err, "%s: field eos_token_id: expected an integer or a list of integers", path);
    }
    return 0;
}

static int read_rope_scaling(json_t *root, const char *path, model_config *cfg, ep_error *err) {
    json_t *rs = json_object_get(root, "rope_scaling");
    if (!rs || json_is_null(rs)) return 0;
    const char *type = get_string(rs, "rope_type", get_string(rs, "type", NULL));
    if (!json_is_object(rs) || !type) return ep_fail(err, "%s: field rope_scaling: expected an object with rope_type", path);
    if (strcmp(type, "llama3"))
        return ep_fail(err, "%s: field rope_scaling.rope_type: '%s' is not supported (only llama3)", path, type);
    cfg->rope_llama3 = 1;
    if (get_float(rs, path, "factor", NAN, &cfg->rope_factor, err) ||
        get_float(rs, path, "low_freq_factor", NAN, &cfg->rope_low_freq_factor, err) ||
        get_float(rs, path, "high_freq_factor", NAN, &cfg->rope_high_freq_factor, err) ||
        get_int(rs, path, "original_max_position_embeddings", 1, 0, &cfg->rope_original_max_positions, err))
        return ep_wrap(err, "rope_scaling");
    if (!(cfg->rope_factor > 0) || !(cfg->rope_low_freq_factor > 0) ||
        !(cfg->rope_high_freq_factor > cfg->rope_low_freq_factor) || cfg->rope_original_max_positions <= 0)
        return ep_fail(err, "%s: field rope_scaling: llama3 needs factor > 0, 0 < low_freq_factor < high_freq_factor "
                            "and original_max_position_embeddings > 0", path);
    return 0;
}

static int check_positive(const char *path, const char *key, int v, ep_error *err) {
    return v > 0 ? 0 : ep_fail(err, "%s: field %s: expected a positive integer, got %d", path, key, v);
}

int model_config_load(const char *path, model_config *cfg, ep_error *err) {
    memset(cfg, 0, sizeof *cfg);
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    if (!root && jerr.line < 1) return ep_fail(err, "%s: %s", path, jerr.text);
    if (!root) return ep_fail(err, "%s: invalid JSON: %s (line %d)", path, jerr.text, jerr.line);
    int rc = model_config_parse(root, path, cfg, err);
    json_decref(root);
    return rc;
}

int model_config_parse(json_t *root, const char *path, model_config *cfg, ep_error *err) {
    memset(cfg, 0, sizeof *cfg);
    int rc = -1;
    if (!json_is_object(root)) {
        ep_fail(err, "%s: expected a JSON object", path);
        goto done;
    }
    const char *arch = NULL;
    json_t *archs = json_object_get(root, "architectures");
    if (json_is_array(archs) && json_array_size(archs) > 0) arch = json_string_value(json_array_get(archs, 0));
    const char *model_type = get_string(root, "model_type", "");
    if (!arch) arch = !strcmp(model_type, "gemma2") ? "Gemma2ForCausalLM"
                      : !strcmp(model_type, "llama") ? "LlamaForCausalLM"
                      : !strcmp(model_type, "phi")   ? "PhiForCausalLM"
                                                     : model_type;
    snprintf(cfg->arch_name, sizeof cfg->arch_name, "%s", arch);
    if (!strcmp(arch, "Gemma2ForCausalLM")) cfg->arch = ARCH_GEMMA2;
    else if (!strcmp(arch, "LlamaForCausalLM")) cfg->arch = ARCH_LLAMA;
    else if (!strcmp(arch, "PhiForCausalLM")) cfg->arch = ARCH_PHI;
    else {
        ep_fail(err, "%s: field architectures: '%s' is not supported (Gemma2ForCausalLM, LlamaForCausalLM, PhiForCausalLM)",
                path, arch);
        goto done;
    }

    if (get_int(root, path, "vocab_size", 1, 0, &cfg->vocab_size, err) ||
        get_int(root, path, "hidden_size", 1, 0, &cfg->hidden, err) ||
        get_int(root, path, "num_hidden_layers", 1, 0, &cfg->n_layers, err) ||
        get_int(root, path, "num_attention_heads", 1, 0, &cfg->n_heads, err) ||
        get_int(root, path, "intermediate_size", 1, 0, &cfg->intermediate, err) ||
        get_int(root, path, "num_key_value_heads", 0, cfg->n_heads, &cfg->n_kv_heads, err) ||
        get_int(root, path, "max_position_embeddings", 0, 2048, &cfg->max_positions, err) ||
        read_special_ids(root, path, cfg, err) || read_rope_scaling(root, path, cfg, err))
        goto done;
    if (check_positive(path, "vocab_size", cfg->vocab_size, err) || check_positive(path, "hidden_size", cfg->hidden, err) ||
        check_positive(path, "num_hidden_layers", cfg->n_layers, err) ||
        check_positive(path, "num_attention_heads", cfg->n_heads, err) ||
        check_positive(path, "num_key_value_heads", cfg->n_kv_heads, err) ||
        check_positive(path, "intermediate_size", cfg->intermediate, err))
        goto done;
    if (cfg->n_heads % cfg->n_kv_heads) {
        ep_fail(err, "%s: num_key_value_heads = %d does not divide num_attention_heads = %d", path, cfg->n_kv_heads,
                cfg->n_heads);
        goto done;
    }
    if (get_float(root, path, "rope_theta", 10000.0f, &cfg->rope_theta, err)) goto done;
    const char *act = "";

    switch (cfg->arch) {
    case ARCH_GEMMA2: {
        float scalar = 0;
        int window = 0;
        if (get_int(root, path, "head_dim", 0, 256, &cfg->head_dim, err) ||
            get_float(root, path, "query_pre_attn_scalar", 224.0f, &scalar, err) ||
            get_float(root, path, "attn_logit_softcapping", 0.0f, &cfg->attn_softcap, err) ||
            get_float(root, path, "final_logit_softcapping", 0.0f, &cfg->final_softcap, err) ||
            get_int(root, path, "sliding_window", 0, 4096, &window, err) ||
            get_float(root, path, "rms_norm_eps", 1e-6f, &cfg->norm_eps, err) ||
            get_bool(root, path, "tie_word_embeddings", 1, &cfg->tied_embeddings, err) ||
            get_bool(root, path, "attention_bias", 0, &cfg->qkv_bias, err))
            goto done;
        if (!(scalar > 0)) {
            ep_fail(err, "%s: field query_pre_attn_scalar: expected a positive number", path);
            goto done;
        }
        cfg->attn_scale = powf(scalar, -0.5f);
        cfg->sliding_window = window;
        cfg->sliding_every_other = 1;
        cfg->norm = NORM_RMS;
        cfg->norm_weight_offset = 1.0f;
        cfg->block = BLOCK_SANDWICH_NORM;
        cfg->gated_mlp = 1;
        cfg->scale_embeddings = 1;
        cfg->o_bias = cfg->qkv_bias;
        act = get_string(root, "hidden_activation", get_string(root, "hidden_act", "gelu_pytorch_tanh"));
        break;
    }
    case ARCH_LLAMA: {
        cfg->head_dim = cfg->hidden / cfg->n_heads;
        int head_dim = cfg->head_dim;
        if (get_int(root, path, "head_dim", 0, cfg->head_dim, &head_dim, err) ||
            get_float(root, path, "rms_norm_eps", 1e-6f, &cfg->norm_eps, err) ||
            get_bool(root, path, "tie_word_embeddings", 0, &cfg->tied_embeddings, err) ||
            get_bool(root, path, "attention_bias", 0, &cfg->qkv_bias, err) ||
            get_bool(root, path, "mlp_bias", 0, &cfg->mlp_bias, err))
            goto done;
        if (head_dim != cfg->head_dim) {  // transformers 4.44 derives head_dim from hidden_size
            ep_fail(err, "%s: field head_dim: %d differs from hidden_size / num_attention_heads = %d", path, head_dim,
                    cfg->head_dim);
            goto done;
        }
        cfg->attn_scale = 1.0f / sqrtf((float)cfg->head_dim);
        cfg->norm = NORM_RMS;
        cfg->block = BLOCK_PRE_NORM;
        cfg->gated_mlp = 1;
        cfg->o_bias = cfg->qkv_bias;
        act = get_string(root, "hidden_act", "silu");
        break;
    }
    case ARCH_PHI: {
        float partial = 0;
        int qk_layernorm = 0;
        cfg->head_dim = cfg->hidden / cfg->n_heads;
        if (get_float(root, path, "partial_rotary_factor", 0.5f, &partial, err) ||
            get_float(root, path, "layer_norm_eps", 1e-5f, &cfg->norm_eps, err) ||
            get_bool(root, path, "tie_word_embeddings", 0, &cfg->tied_embeddings, err) ||
            get_bool(root, path, "qk_layernorm", 0, &qk_layernorm, err))
            goto done;
        if (!(partial > 0 && partial <= 1)) {  // also keeps the conversion to int below defined
            ep_fail(err, "%s: field partial_rotary_factor: expected a number in (0, 1]", path);
            goto done;
        }
        if (qk_layernorm) {
            ep_fail(err, "%s: field qk_layernorm: true is not supported", path);
            goto done;
        }
        cfg->rotary_dim = (int)(partial * (float)cfg->head_dim);
        cfg->attn_scale = 1.0f / sqrtf((float)cfg->head_dim);
        cfg->norm = NORM_LAYER;
        cfg->block = BLOCK_PARALLEL;
        cfg->gated_mlp = 0;
        cfg->qkv_bias = cfg->o_bias = cfg->mlp_bias = cfg->lm_head_bias = 1;
        act = get_string(root, "hidden_act", "gelu_new");
        break;
    }
    }
    if (!strcmp(act, "silu")) cfg->act = ACT_SILU;
    else if (!strcmp(act, "gelu_pytorch_tanh") || !strcmp(act, "gelu_new")) cfg->act = ACT_GELU_TANH;
    else {
        ep_fail(err, "%s: field hidden_act: '%s' is not supported (silu, gelu_pytorch_tanh, gelu_new)", path, act);
        goto done;
    }
    if (cfg->arch != ARCH_PHI) cfg->rotary_dim = cfg->head_dim;
    if (check_positive(path, "head_dim", cfg->head_dim, err)) goto done;
    if (cfg->arch != ARCH_GEMMA2 && cfg->hidden % cfg->n_heads) {
        ep_fail(err, "%s: num_attention_heads = %d does not divide hidden_size = %d", path, cfg->n_heads, cfg->hidden);
        goto done;
    }
    // Bounds far above any real model, so that every size the forward pass forms in int stays exact and
    // no allocation is absurd: n_heads x head_dim and the other widths fit in 2^20, vocab in 2^24.
    if (cfg->vocab_size > (1 << 24) || cfg->hidden > (1 << 20) || cfg->intermediate > (1 << 20) ||
        (int64_t)cfg->n_heads * cfg->head_dim > (1 << 20) || cfg->n_layers > (1 << 16) || cfg->max_positions > (1 << 24)) {
        ep_fail(err, "%s: sizes out of range: vocab_size <= 2^24, hidden_size, intermediate_size and "
                     "num_attention_heads * head_dim <= 2^20, num_hidden_layers <= 2^16 expected", path);
        goto done;
    }
    if (cfg->rotary_dim <= 0 || cfg->rotary_dim % 2 || cfg->rotary_dim > cfg->head_dim) {
        ep_fail(err, "%s: rotary dimension %d must be even and in 1..head_dim = %d", path, cfg->rotary_dim, cfg->head_dim);
        goto done;
    }
    if (!(cfg->norm_eps > 0) || !(cfg->rope_theta > 0) || cfg->attn_softcap < 0 || cfg->final_softcap < 0 ||
        cfg->sliding_window < 0) {
        ep_fail(err, "%s: eps, rope_theta must be positive and softcaps, sliding_window not negative", path);
        goto done;
    }
    if (cfg->bos_id >= cfg->vocab_size) {
        ep_fail(err, "%s: field bos_token_id: %d is outside the vocabulary of %d", path, cfg->bos_id, cfg->vocab_size);
        goto done;
    }
    cfg->tp = model_config_local(cfg);
    rc = 0;
done:
    return rc;
}

tp_shard model_config_local(const model_config *cfg) {
    if (cfg->tp.size >= 1) return cfg->tp;
    return (tp_shard){.rank = 0, .size = 1, .n_heads = cfg->n_heads, .n_kv_heads = cfg->n_kv_heads,
                      .n_inter = cfg->intermediate, .n_vocab = cfg->vocab_size};
}

int model_config_shard(const model_config *cfg, const char *path, int rank, int size, tp_shard *out, ep_error *err) {
    int H = cfg->n_heads, KV = cfg->n_kv_heads, I = cfg->intermediate, V = cfg->vocab_size;
    if (size < 1 || rank < 0 || rank >= size) return ep_fail(err, "tensor parallel: rank %d of %d", rank, size);
    if (H % size)
        return ep_fail(err, "%s: num_attention_heads = %d does not split over tensor_parallel = %d ranks", path, H, size);
    if (I % size)
        return ep_fail(err, "%s: intermediate_size = %d does not split over tensor_parallel = %d ranks", path, I, size);
    // KV heads split when the ranks divide them; with fewer KV heads than ranks, each rank keeps the one KV
    // head its query heads read (replicated), which needs the ranks to be a multiple of the KV heads.
    if (KV % size && size % KV)
        return ep_fail(err, "%s: num_key_value_heads = %d neither splits over nor is replicated evenly on "
                            "tensor_parallel = %d ranks (one must divide the other)", path, KV, size);
    tp_shard s = {.rank = rank, .size = size, .n_heads = H / size, .n_inter = I / size};
    s.head0 = rank * s.n_heads;
    s.inter0 = rank * s.n_inter;
    s.n_kv_heads = KV % size == 0 ? KV / size : 1;
    s.kv_head0 = s.head0 / (H / KV);
    // Vocabulary-parallel logits when the ranks divide the vocabulary, else every rank computes them all.
    s.n_vocab = V % size == 0 ? V / size : V;
    s.vocab0 = V % size == 0 ? rank * s.n_vocab : 0;
    *out = s;
    return 0;
}

int model_config_layer_window(const model_config *cfg, int layer) {
    if (cfg->sliding_window <= 0) return 0;
    if (cfg->sliding_every_other && layer % 2) return 0;
    return cfg->sliding_window;
}

void model_config_inv_freq(const model_config *cfg, float *inv_freq) {
    int dim = cfg->rotary_dim;
    for (int i = 0; i < dim / 2; i++) {
        float exponent = (float)(2 * i) / (float)dim;
        float f = 1.0f / powf(cfg->rope_theta, exponent);
        if (cfg->rope_llama3) {
            // HF _compute_llama3_parameters, operation for operation in fp32.
            float old_len = (float)cfg->rope_original_max_positions;
            float low_wavelen = old_len / cfg->rope_low_freq_factor, high_wavelen = old_len / cfg->rope_high_freq_factor;
            float wavelen = (float)6.283185307179586 / f;  // (float)(2 * math.pi) / inv_freq
            float scaled = wavelen > low_wavelen ? f / cfg->rope_factor : f;
            if (!(wavelen < high_wavelen) && !(wavelen > low_wavelen)) {
                float smooth = (old_len / wavelen - cfg->rope_low_freq_factor) /
                               (cfg->rope_high_freq_factor - cfg->rope_low_freq_factor);
                scaled = (1 - smooth) * scaled / cfg->rope_factor + smooth * scaled;
            }
            f = scaled;
        }
        inv_freq[i] = f;
    }
}
