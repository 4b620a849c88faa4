// convert_gguf: a llama.cpp Llama GGUF file turned into a HuggingFace checkpoint folder.
//
// Owns the one decision of what a converted folder holds: config.json (LlamaForCausalLM from the
// llama.* metadata: sizes, rope theta, rms eps, tie_word_embeddings when the file has no output.weight,
// bos/eos ids) and model.safetensors (every tensor dequantized to F32, HF names, Q/K rows un-permuted).
// Tokenizer files are NOT written here: tools/make_smollm_tokenizer.py builds tokenizer.json from the
// same GGUF metadata (one implementation of that structure; tools/fetch_smollm2.sh runs both).
// Promises: the folder appears complete or not at all (written under OUT.tmp-PID, fsynced, validated by
// model_load, then renamed); an existing OUT is never touched; a failure removes the temporary folder.
#ifndef EP_CONVERT_GGUF_H
#define EP_CONVERT_GGUF_H

#include "pipeline/error.h"

typedef struct {
    int n_tensors;
    long long n_params;
    long long bytes_written;  // model.safetensors
    char types[128];          // ggml types found, e.g. "F32 Q4_1 Q8_0"
} convert_gguf_stats;

int convert_gguf(const char *gguf_path, const char *out_dir, convert_gguf_stats *stats, ep_error *err);

#endif
