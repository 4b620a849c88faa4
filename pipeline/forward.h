// forward: the batched fp32 forward pass and the KV cache it fills.
//
// Owns: kv_cache (post-RoPE keys and values per layer, sequence and position) and one forward step
// that appends new tokens to every sequence of a batch. Sequences of different lengths are packed
// row after row (no padding), and attention only ever reads a sequence's own cache rows, so prompts
// cannot see each other. The vocabulary projection runs only on the rows whose logits are asked for.
// The per-layer keys and values are left in the cache and the residual stream can be captured, which
// is what the patching stage reads and replaces. Never allocates model weights; never prints.
// A tensor-parallel shard's pass (model.cfg.tp, docs/tensor_parallel.md) computes its heads and MLP
// columns, sums the row-parallel projections over model.group (every rank of the group must run the same
// passes in the same order) and gathers the logits; its cache holds only its KV heads and head outputs.
#ifndef EP_FORWARD_H
#define EP_FORWARD_H

#include "kernels/ops.h"
#include "pipeline/error.h"
#include "pipeline/model.h"

typedef struct {
    int n_layers, n_seqs, capacity, kv_dim, z_dim;
    float *k, *v;  // [n_layers][n_seqs][capacity][kv_dim], post-RoPE keys and values
    float *z;      // optional [n_layers][n_seqs][capacity][z_dim]: every head's attention output before the
                   // output projection (head h at h * head_dim), what head units substitute
    int *len;      // positions filled per sequence (host memory)
    const kernel_ops *backend;  // non-NULL: k, v and z live in this (non-host) backend's memory
} kv_cache;

// with_z: also keep the heads' outputs (donor passes need them for head units). Host memory, zeroed.
int kv_cache_init(kv_cache *c, const model_config *cfg, int n_seqs, int capacity, int with_z, ep_error *err);
// The same in ops' memory: for a host backend (or ops NULL) exactly kv_cache_init; otherwise k, v and z
// are backend buffers (unfilled rows unspecified; never read by attention) for model_forward with ops.
int kv_cache_init_backend(kv_cache *c, const model_config *cfg, int n_seqs, int capacity, int with_z,
                          const kernel_ops *ops, ep_error *err);
void kv_cache_free(kv_cache *c);
// Sequence s of src (s < src->n_seqs) into sequence dst_seq0 + s of dst: the keys and values (and head
// outputs, when both keep them) of layers [first_layer, end_layer) (end_layer 0: every layer from
// first_layer) at positions < rows[s]; then dst->len[dst_seq0 + s] =
// len[s] (len NULL: rows). How a pass derived from another one starts (stages/patch.h, "Reuse"): it
// appends from len[s] on, overwriting the copies there in the layers it runs, and the layers it does not
// run keep the copied rows, which is what later steps (generation) read. Same memory (host or one
// backend), same model; dst needs the sequences and the capacity. Copies only, never computes.
int kv_cache_copy_seqs(kv_cache *dst, int dst_seq0, const kv_cache *src, const int *rows, const int *len,
                       int first_layer, int end_layer, ep_error *err);
// The whole model's cache from the shards of a tensor-parallel group (m is this rank's shard, m->group its
// group, whose buffers are in the shard's memory): collective. whole is a host cache initialised here
// (same sequences, capacity, lengths, head outputs if kept) with every KV head and query head; for a
// whole model it is a copy (downloaded from a device cache).
int kv_cache_gather(const model *m, const kv_cache *shard, kv_cache *whole, ep_error *err);
// Keys (or values) of layer l, sequence s, position p: kv_dim floats (backend memory for a backend cache).
float *kv_cache_k(const kv_cache *c, int layer, int seq, int pos);
float *kv_cache_v(const kv_cache *c, int layer, int seq, int pos);
float *kv_cache_z(const kv_cache *c, int layer, int seq, int pos);

// Head unit: in `layer`, query head `head`'s output at every position of token type `type` is replaced by
// donor `donor`'s output there.
typedef struct {
    int layer, head, type, donor;
} head_unit;

// What a patched pass substitutes. Donor caches are aligned with the batch: same sequences, same
// positions (donor prompts are token-aligned). Types and example indices come per sequence position
// ([n_seqs][type_stride]); positions at or past n_typed[s] are untyped and never patched.
typedef struct {
    const edge_rule_set *layer_rules;  // [n_layers], or NULL for no edge ablation
    const head_unit *head_units;
    int n_head_units;
    int n_donors;
    const kv_cache *donors[16];
    const int32_t *types, *index;
    int type_stride;
    const int *n_typed;
} forward_patch;
// Attention statistics a pass may take (kernel_ops.attention_row_stats) at one query row per sequence, in
// every layer it runs, for every query head of the model: the entropy of the row's attention distribution
// and its mass on each key type. A patched pass measures the attention as patched (its types, index and
// rules); an unpatched one reads the key types given here. A tensor-parallel shard's pass computes its own
// heads and sums the (otherwise zero) arrays over the group, so every rank gets every head.
typedef struct {
    const int *rows;              // [n_seqs]: which of the sequence's new tokens (0 .. n_new[s] - 1)
    const int32_t *types, *index; // [n_seqs][type_stride]: key positions' types and example indices (unpatched passes)
    int type_stride;
    const int *n_typed;           // [n_seqs]: positions at or past it are untyped
    int n_types;                  // mass entries per head (at most 16)
    float *entropy;               // out [n_seqs][n_layers][n_heads]; layers not run are 0
    float *mass;                  // out [n_seqs][n_layers][n_heads][n_types]
} forward_attn_stats;

// A vector added to the residual stream leaving layer `layer` (0 .. n_layers - 1; HF's hidden state after
// that decoder layer) at chosen rows of a pass, times `scale`: function-vector injection (stages/fv.h). The
// vector is uploaded and scaled with the op table's scale, then added row by row with its add, so every
// backend computes it. A partial pass adds it only when it runs `layer`; a tensor-parallel shard adds it to
// its (replicated) residual stream like a whole model.
typedef struct {
    int layer;
    const float *vec;  // host [hidden]
    float scale;
    int n_rows;
    const int *rows;   // packed rows of the batch's new tokens (0 .. T - 1)
} forward_add;

typedef struct {
    int n_seqs;            // must equal the cache's
    const int *n_new;      // tokens appended to each sequence this step (0 allowed)
    const int *tokens;     // packed: sequence 0's new tokens, then sequence 1's, ...
    int n_logit_rows;      // packed rows whose logits are wanted
    const int *logit_rows;
    float *logits;         // out: [n_logit_rows, vocab_size] (final softcap applied)
    int logits_in_backend; // 1: logits is ops' memory and the rows stay there (no download; the whole
                           // vocabulary on this rank: not with a vocabulary-parallel shard)
    float *resid;          // optional out: [n_layers + 1, n_tokens, hidden]: resid[l] enters layer l,
                           // resid[n_layers] leaves the last layer (before the final norm); with first_layer
                           // or end_layer set, only the slots of the layers run (and their ends) are written
    float *q_out;          // optional out [n_layers, n_tokens, n_heads * head_dim]: post-RoPE queries
    float *attn_out;       // optional out [n_layers, n_tokens, hidden]: the attention block's o_proj output
                           // (before Gemma's post-norm; a shard's: summed over the group, but in the parallel
                           // block, where it is the shard's part); both for the backward, written for the
                           // layers run
    int capture_backend;   // 1: resid, q_out and attn_out are ops' memory (the backward's tape stays on the
                           // backend: copied there with copy_rows, never downloaded); 0: host memory
    // A partial pass (prefix reuse for exact scores): start at first_layer (0..n_layers) from x_in, the
    // residual stream entering that layer ([n_tokens, hidden], e.g. a slot of an earlier pass's resid),
    // instead of embedding the tokens; stop after layer end_layer - 1 (0 means n_layers) and leave the
    // residual stream there in x_out. Layers outside the range are not touched in the cache (they are
    // not read: a layer's attention reads only its own layer's keys and values). Logits need
    // end_layer = n_layers. Given the same inputs, the layers run compute exactly what a full pass does.
    // x_in with first_layer 0 replaces the embeddings (EAP-IG's interpolated inputs: model_embed gives
    // the tokens' own); with capture_backend it is ops' memory (copied, not uploaded).
    int first_layer, end_layer;
    const float *x_in;     // required when first_layer > 0; optional with first_layer 0
    float *x_out;          // optional out [n_tokens, hidden]
    const forward_attn_stats *attn_stats;  // optional: attention statistics (host memory, like logits)
    const forward_add *add;                // optional: a vector added after a layer (forward_add)
} forward_batch;

// The batch's arrays (tokens, logit_rows, logits unless logits_in_backend, resid and x_in unless capture_backend, x_out) and the patch's metadata are host
// memory whatever the backend; the model's weights and every cache must live in ops' memory (a host model
// and host caches for host backends; model_to_backend and kv_cache_init_backend otherwise).
// Runs one step: embeds the new tokens at positions cache->len[s].., runs every layer (patched when
// `patch` is non-NULL), writes keys and values (and head outputs, if kept) into the cache, advances
// cache->len, and fills the requested outputs.
int model_forward(const model *m, const kernel_ops *ops, kv_cache *cache, const forward_batch *b,
                  const forward_patch *patch, ep_error *err);

// ---- One layer over chosen rows (row reuse, stages/patch.h "Reuse"; docs/reuse.md). A pass derived from
// another recomputes only the rows a change can reach, which need not be a suffix: each run of consecutive
// positions is an attn_seq (ops.h) of its own. Several units' rows go through one call (one product per
// weight for all of them), each unit's runs a part with its own patch.
typedef struct {
    int first_seq, n_seqs;        // the runs seqs[first_seq .. first_seq + n_seqs)
    const forward_patch *patch;   // NULL: unpatched. Its rules of the layer, donors (read at each run's
                                  // donor_row) and head units; its types, index and n_typed are not read
                                  // (each run carries its own, as attention takes them)
} forward_rows_part;

typedef struct {
    int layer;
    int n_rows;                   // rows of x, the runs' q_row .. q_row + n_q - 1 (every row in one run)
    float *x;                     // host [n_rows][hidden]: the residual stream entering `layer` at the runs'
                                  // positions, replaced by the one leaving it
    const attn_seq *seqs;         // the runs: positions q_pos .., keys and values at rows kv_row + j of k, v
    int n_seqs;
    float *k, *v;                 // the layer's keys and values, ops' memory, n_kv_rows rows of the model's
    int n_kv_rows;                // kv_dim (a shard's: its KV heads): the runs' rows are written first
                                  // (kv_row + q_pos ..), then attention reads rows kv_row + 0 .. pos
    const forward_rows_part *parts;
    int n_parts;                  // the parts cover the runs in order
} forward_rows;

// Runs b->layer on b's rows: the same arithmetic per row as model_forward's layer (the products have
// other row counts, so results agree to fp32 rounding). Collective for a shard, as model_forward.
int model_forward_rows(const model *m, const kernel_ops *ops, const forward_rows *b, ep_error *err);
// Logits of n rows of the residual stream leaving the last layer (host [n][hidden]) into host
// [n][vocab]: the final norm, the head and the final softcap, as model_forward's logit rows.
int model_project_logits(const model *m, const kernel_ops *ops, const float *x, int n, float *logits, ep_error *err);

// The residual stream entering layer 0 for T tokens (the embeddings, scaled as the model does) into x,
// [T][hidden] in ops' memory: what model_forward computes from the tokens. A shard's call is collective
// (a vocabulary-parallel embedding is summed over the group).
int model_embed(const model *m, const kernel_ops *ops, const int *tokens, int T, float *x, ep_error *err);

// Query head `head`'s contribution to the residual stream through layer `layer`'s output projection (its
// head_dim columns of o_proj, no bias) for n rows of head outputs z (ops' memory [n][n_heads * head_dim],
// the layout of kv_cache_z) into out (ops' memory [n][hidden]): the other heads' columns are multiplied by
// exact zeros, so out is the head's slice of the projection. A whole model only (not a tensor-parallel shard).
int model_head_output(const model *m, const kernel_ops *ops, int layer, int head, const float *z, int n, float *out,
                      ep_error *err);

// The config's norm (RMSNorm with its weight offset, or LayerNorm with bias b) of rows rows of hidden
// floats, on ops: the forward's and the backward's recomputation alike.
void forward_norm(const kernel_ops *ops, const model_config *c, float *out, const float *x, const float *w,
                  const float *b, int rows);
// A tensor-parallel shard's partial values (host or backend memory as m's group takes them) summed over
// its group in place, as the row-parallel projections are; nothing for a whole model. Collective.
int model_group_sum(const model *m, float *buf, size_t n, ep_error *err);

// A shard's copy of a layer's rules: its query head h is the model's head head0 + h, so the head bits
// move down by head0 (the kernels number a shard's own heads). For the forward and the backward alike.
void forward_shard_rules(edge_rule_set *dst, const edge_rule_set *src, int head0, int n_heads);

#endif
