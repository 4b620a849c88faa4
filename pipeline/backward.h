// backward: the attribution loss and its gradients with respect to activations (never weights).
//
// Owns: grad_tape, what one forward + backward pass over a packed batch leaves for scoring: the loss,
// dL/dz (every layer, position and query head, z = the head's attention output before the output
// projection, after head-unit substitution), and the current pass's post-RoPE q, K, V and z. From these
// the two unit scores of docs/design.md are computed by the kernel table's score reductions, which
// recompute the attention probabilities and dL/dlogit edge by edge (nothing per edge is kept;
// docs/attribution.md derives the formulas); and EAP-IG's sums (grad_ig_sums: the same gradients averaged
// along the path from the donor's input embeddings to the clean ones).
// Promises: every numeric step runs through the backend's kernel table (kernels/ops.h): the forward is
// model_forward on that backend (patched as given), the backward mirrors it layer by layer with the
// table's gradient ops (final softcap and norm, lm_head only at predicting rows, pre-norm / sandwich /
// parallel blocks, MLPs, attention with scale, softcap, causal mask, window, GQA, edge ablation, head
// units, RoPE, partial rotary) and stops at the embeddings. The model is the backend's (model_to_backend:
// fp32 or bf16 weights in the backend's memory; a bf16 model's gradients and sums stay fp32), the tape
// lives in the backend's memory; the host holds the logits, the loss, small metadata and the scores'
// per-unit double sums. Never prints.
// A tensor-parallel shard (model.cfg.tp, model.group: docs/tensor_parallel.md) runs the pass with its group
// (collective: every rank of the group calls the same functions in the same order, scores included); its
// tape holds its own query heads and KV heads, and the scores, which name the model's heads, come out
// whole on every rank (the group's f32 sums on backend buffers, its f64 sum on the host's score sums).
#ifndef EP_BACKWARD_H
#define EP_BACKWARD_H

#include "pipeline/forward.h"

// A batch of sequences, each a prompt followed by its target tokens, packed row after row.
// The loss: per sequence, the mean cross-entropy of its n_target last tokens, each predicted from the
// position before it (the original's); then the sum over the sequences (the original took their mean,
// which scaled every prompt's gradient by 1/n_seqs and so made scores depend on batch_size).
typedef struct {
    int n_seqs;
    const int *len;       // [n_seqs] tokens per sequence (prompt + targets)
    const int *n_target;  // [n_seqs] targets at the end of each sequence, 1 <= n_target < len
    const int *tokens;    // packed
} grad_batch;

// Edge unit: in `layer`, query head `head`, every edge A->B with type(A) = sender, type(B) = receiver
// (A <= B, inside the layer's window, relation any) reads donor `donor`'s key and value at A, or as
// `source` says (kernels/edge_rule.h: 0 kv, k only, v only, or the edge removed; docs/attribution.md).
typedef struct {
    int layer, head, sender, receiver, donor;
    int source;  // edge_source; 0 (kv) when left out of an initializer
} edge_unit;

typedef struct {
    const kernel_ops *ops;   // the backend every buffer below (but the host metadata) lives in
    int n_layers, n_heads, n_kv_heads, head_dim, n_seqs, n_rows;  // n_heads, n_kv_heads: the tape's (a shard's)
    int head0, model_heads;  // the tape's head h is the model's head head0 + h, of model_heads
    const ep_group *group;   // a shard's group, which the scores are summed over; NULL for a whole model
    int *len, *row;         // [n_seqs] host: length and first packed row of each sequence
    attn_params *attn;      // [n_layers] host: each layer's attention as the table's ops take it
    double loss;
    double *seq_loss;       // [n_seqs] host
    float *dz;              // backend [n_layers][n_rows][n_heads * head_dim]: dL/dz
    float *q;               // backend [n_layers][n_rows][n_heads * head_dim]: post-RoPE queries
    kv_cache cache;         // backend: the current pass's K, V and z (z after head-unit substitution)
    forward_patch patch;    // a copy of the patch the pass ran with (pointers are the caller's)
    int patched;
} grad_tape;

// Forward (patched when `patch` is non-NULL) and backward over the batch on backend ops with m, the
// backend's model (model_to_backend; for ref and cpu the host model itself), its group for a shard. The
// patch's donor caches live in ops' memory (kv_cache_init_backend, as model_forward needs them). The caller
// keeps the patch's rule sets, donor caches and type arrays alive while the tape is used for scores.
int model_backward(const kernel_ops *ops, const model *m, const grad_batch *b, const forward_patch *patch,
                   grad_tape *t, ep_error *err);
// The same pass from given inputs: x0 (ops' memory, [rows][hidden]) replaces the tokens' embeddings as
// the residual stream entering layer 0 (NULL: the embeddings, i.e. model_backward). The tokens still give
// the targets. EAP-IG's path points.
int model_backward_at(const kernel_ops *ops, const model *m, const grad_batch *b, const forward_patch *patch,
                      const float *x0, grad_tape *t, ep_error *err);
void grad_tape_free(grad_tape *t);

// The loss alone (one patched forward pass on ops, as model_backward's): for checks by finite differences.
int model_loss(const kernel_ops *ops, const model *m, const grad_batch *b, const forward_patch *patch, double *loss,
               double *seq_loss, ep_error *err);

// dL/dz at (layer, packed row) into out (host): n_heads * head_dim floats (the tape's heads).
void grad_tape_dz(const grad_tape *t, int layer, int row, float *out);

// dL/d(donor `donor`'s keys and values) in `layer`: through the edges that read them (summed over the
// receivers and over a KV head's query heads), into host arrays laid out as the donor cache,
// [n_seqs][capacity][kv_dim] each (zero where no edge reads). One attention_back of the layer.
int grad_donor_kv(const grad_tape *t, int layer, int donor, float *dk, float *dv, ep_error *err);

// Attribution scores, averaged over the sequences (per_seq, optional: [n][n_seqs], signed, before the
// absolute value). Head unit: |sum over positions B of its type of (z(B) - z_donor(B))_head . dL/dz(B)_head|
// with z the current pass's (after substitution, so an already substituted unit scores 0). Edge unit:
// |sum over its edges of dL/dk*(A->B) . (k_donor(A) - k*(A->B)) + dL/dv*(A->B) . (v_donor(A) - v*(A->B))|,
// k*, v* what B read (so an edge already reading that donor contributes 0). Need the tape's patch to
// carry the donors and the types (a patch without rules or head units is the clean model). Units name the
// model's heads; on a shard's tape the calls are collective and every rank gets every unit's score.
int grad_head_scores(const grad_tape *t, const head_unit *units, int n, double *score, double *per_seq,
                     ep_error *err);
int grad_edge_scores(const grad_tape *t, const edge_unit *units, int n, double *score, double *per_seq,
                     ep_error *err);

// The signed per-(unit, sequence) sums behind the scores above, [n][n_seqs], with the gradients of tape t
// and the differences (z - z_d; k_d - k*, v_d - v* where an edge reads the current pass) of tape base
// (NULL: t itself, which is what grad_*_scores take |.| of). base must be a pass over the same batch and
// patch (EAP-IG: t a point on the path, base the clean pass). Collective on a shard, like the scores.
int grad_head_sums(const grad_tape *t, const grad_tape *base, const head_unit *units, int n, double *sums,
                   ep_error *err);
int grad_edge_sums(const grad_tape *t, const grad_tape *base, const edge_unit *units, int n, double *sums,
                   ep_error *err);

// EAP-IG (integrated gradients, Hanna et al. 2024; MIB's EAP-IG-inputs; docs/attribution.md): the
// residual stream entering layer 0 runs the straight path from the donor's embeddings to the clean ones,
// x(a) = e_donor + a (e_clean - e_donor), at a = k / steps, k = 1 .. steps (the right Riemann sum; the
// point a = 1 is the clean pass itself, run from the tokens). At each point a forward (patched by `patch`
// as the clean pass is: its donors are constants) and a backward; a unit's sum per sequence is the mean
// over the points of its gradients dotted with the clean pass's differences (head: (z - z_d) . dL/dz;
// edge: dL/dk* . (k_d - k*) + dL/dv* . (v_d - v*), k*, v* what the edge read in the clean pass). With
// steps = 1 the sums are attribution's, bit for bit. Holds the clean tape and one path tape at a time.
typedef struct {
    int steps;                // >= 1
    const int *donor_tokens;  // packed as the batch's tokens: each row's donor token (the path's start);
                              // rows without a donor token (the appended targets) repeat the clean token
    const head_unit *heads;
    int n_heads;
    const edge_unit *edges;
    int n_edges;
    double *head_sums, *edge_sums;    // out [n][n_seqs]: EAP-IG's signed sums (before |.|)
    double *head_plain, *edge_plain;  // optional out [n][n_seqs]: attribution's (the clean pass's)
} grad_ig_request;

int grad_ig_sums(const kernel_ops *ops, const model *m, const grad_batch *b, const forward_patch *patch,
                 const grad_ig_request *r, ep_error *err);

// What model_backward holds, in bytes, for a batch of this shape on this rank (cfg->tp: a shard's heads, KV
// heads, MLP columns and vocabulary block), part by part as the code allocates it on the cpu backend, whose
// memory is the host's (model_backward's allocations, host and backend, its forward pass's and the cpu
// kernels' scratch; a group's collectives may add their own). On a device backend the same buffers live
// in device memory but for the host's: tape_meta, pass_meta's rows, dlogits and the logits rows of forward
// (and the kernels' scratch is the device backend's own).
// docs/memory.md and `edgepatch memory` print it; tests/test_backward_memory.c counts the allocations of
// real passes and compares, so a change to what the backward allocates must change this too.
typedef struct {
    int n_seqs;
    const int *len, *n_target;  // [n_seqs], as grad_batch
    int n_donors;               // donor caches the patch carries (0: a clean pass)
    int donor_capacity;         // positions per donor sequence (the caller's caches; the prompts' longest)
    int edge_rules;             // the patch has layer rules and some layer's rules are non-empty
    int n_threads;              // the cpu pool (kernels/cpu_gemm.h): its attention keeps a block per thread
    int ig_steps;               // EAP-IG's path points (grad_ig_sums); 0: one model_backward alone
    int ig_head_units, ig_edge_units;  // the units grad_ig_sums sums (its per-sequence sums)
} backward_shape;

typedef struct {
    // The tape (kept until grad_tape_free; what the scores read):
    size_t tape_q;      // post-RoPE queries, every layer
    size_t tape_dz;     // dL/dz, every layer
    size_t tape_cache;  // the current pass's K, V and z, every layer
    size_t tape_meta;   // per-sequence lengths, rows, losses; per-layer attention parameters
    size_t tape;        // their sum
    // model_backward's own, for the pass:
    size_t resid;       // the residual stream entering every layer and leaving the last
    size_t attn_out;    // the attention blocks' outputs, every layer
    size_t dlogits;     // dL/dlogits at the predicting rows (the rank's vocabulary block; host), to the lm_head
    size_t pass_meta;   // predicting rows and positions
    size_t forward;     // transient inside the forward: logits rows, step buffers, the kernels' scratch
    size_t scratch;     // the residual gradients and the layer walk's buffers (recomputed MLP input and
                        // pre-activations, gradients, K/V gradients in the cache's rows, the layer's sequences)
    size_t head;        // transient at the final norm and lm_head: 3 rows of hidden per predicting row
    size_t attention;   // transient per layer: attention_back's blocks per (sequence, KV head) thread slot
    size_t per_layer;   // of the above, what each layer adds (tape, resid and attn_out per layer)
    size_t peak;        // the most live at once during model_backward (the tape included)
    size_t donors;      // the caller's donor caches (K, V, z), held alongside; not in peak
    // grad_ig_sums (ig_steps >= 1; else 0): its per-sequence sums; from the second point on, the clean
    // pass's tape held while each path point's pass runs and three [T][hidden] rows (the donor's
    // embeddings, the difference, the point's input). peak_ig: the most live at once in grad_ig_sums
    // (the sums' own scratch is smaller than a pass's, so a point's pass sets it).
    size_t ig_sums, ig_path, peak_ig;
} backward_memory;

int backward_bytes(const model_config *cfg, const backward_shape *b, backward_memory *out, ep_error *err);

#endif
