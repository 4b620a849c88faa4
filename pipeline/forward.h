// forward: the batched fp32 forward pass and the KV cache it fills.
//
// Owns: kv_cache (post-RoPE keys and values per layer, sequence and position) and one forward step
// that appends new tokens to every sequence of a batch. Sequences of different lengths are packed
// row after row (no padding), and attention only ever reads a sequence's own cache rows, so prompts
// cannot see each other. The vocabulary projection runs only on the rows whose logits are asked for.
// The per-layer keys and values are left in the cache and the residual stream can be captured, which
// is what the patching stage reads and replaces. Never allocates model weights; never prints.
#ifndef EP_FORWARD_H
#define EP_FORWARD_H

#include "kernels/ops.h"
#include "pipeline/error.h"
#include "pipeline/model.h"

typedef struct {
    int n_layers, n_seqs, capacity, kv_dim;
    float *k, *v;  // [n_layers][n_seqs][capacity][kv_dim], post-RoPE keys and values
    int *len;      // positions filled per sequence
} kv_cache;

int kv_cache_init(kv_cache *c, const model_config *cfg, int n_seqs, int capacity, ep_error *err);
void kv_cache_free(kv_cache *c);
// Keys (or values) of layer l, sequence s, position p: kv_dim floats.
float *kv_cache_k(const kv_cache *c, int layer, int seq, int pos);
float *kv_cache_v(const kv_cache *c, int layer, int seq, int pos);

typedef struct {
    int n_seqs;            // must equal the cache's
    const int *n_new;      // tokens appended to each sequence this step (0 allowed)
    const int *tokens;     // packed: sequence 0's new tokens, then sequence 1's, ...
    int n_logit_rows;      // packed rows whose logits are wanted
    const int *logit_rows;
    float *logits;         // out: [n_logit_rows, vocab_size] (final softcap applied)
    float *resid;          // optional out: [n_layers + 1, n_tokens, hidden]: resid[l] enters layer l,
                           // resid[n_layers] leaves the last layer (before the final norm)
} forward_batch;

// Runs one step: embeds the new tokens at positions cache->len[s].., runs every layer, writes keys and
// values into the cache, advances cache->len, and fills the requested outputs.
int model_forward(const model *m, const kernel_ops *ops, kv_cache *cache, const forward_batch *b, ep_error *err);

#endif
