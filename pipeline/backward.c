// The forward values come from model_forward on the backend (residual stream, post-RoPE queries and the
// attention blocks' outputs captured per layer into backend buffers, K/V/z kept in the backend cache);
// the backward walks the layers from the last to the first, recomputing from these only the norms and
// the MLP's pre-activations, so the MLP's wide intermediate values are never held for the whole pass.
// Every numeric step is an op of the kernel table (kernels/ops.h); what runs here is bookkeeping: which
// rows a sequence has, which head outputs a head unit replaced, which layers' rules read which donors.
#include "backward.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

// dx (+)= d(norm(x))/dx^T dy, per row (w: the norm's weight; RMS with the config's offset, or LayerNorm).
static void norm_back(const kernel_ops *ops, const model_config *c, float *dx, const float *x, const float *w,
                      const float *dy, int rows, int accumulate) {
    if (c->norm == NORM_LAYER)
        ops->layernorm_back(dx, x, w, dy, rows, c->hidden, c->norm_eps, accumulate);
    else
        ops->rmsnorm_back(dx, x, w, c->norm_weight_offset, dy, rows, c->hidden, c->norm_eps, accumulate);
}

// The forward's linear (model_to_backend's precision) and its input gradient (fp32 dy; bf16 weights widened).
static void linear(const kernel_ops *ops, float *out, const float *x, const float *w, const uint16_t *w_bf16,
                   const float *b, int rows, int n_in, int n_out) {
    if (w_bf16)
        ops->matmul_bf16(out, x, w_bf16, b, rows, n_in, n_out);
    else
        ops->matmul(out, x, w, b, rows, n_in, n_out);
}

static void linear_back(const kernel_ops *ops, float *dx, const float *dy, const float *w, const uint16_t *w_bf16,
                        int rows, int n_in, int n_out, int accumulate) {
    if (w_bf16)
        ops->linear_back_bf16(dx, dy, w_bf16, rows, n_in, n_out, accumulate);
    else
        ops->linear_back(dx, dy, w, rows, n_in, n_out, accumulate);
}

// One layer's scratch (backend memory): the recomputed MLP input and pre-activations, and the gradients.
// dkc, dvc: attention_back's key and value gradients in the cache's layout (rows s * capacity + j).
typedef struct {
    float *xn, *po, *x1, *gate, *up, *mo;  // po: Gemma's post-attention norm of o
    float *dxn, *dq, *dk, *dv, *dza, *dh, *dgate, *dup, *tmp, *tmp2, *dkc, *dvc;
} layer_scratch;

// Sized for the rank's heads and MLP columns (the whole model's for a whole model).
static void scratch_init(const kernel_ops *ops, layer_scratch *s, const model_config *c, int T, size_t cache_rows) {
    tp_shard sh = model_config_local(c);
    size_t t = (size_t)T, D = c->hidden, Q = (size_t)sh.n_heads * c->head_dim, KV = (size_t)sh.n_kv_heads * c->head_dim,
           NI = sh.n_inter, f = sizeof(float);
    float **d[] = {&s->xn, &s->po, &s->x1, &s->mo, &s->dxn, &s->tmp, &s->tmp2};
    for (size_t i = 0; i < sizeof d / sizeof *d; i++) *d[i] = ops->alloc(f * t * D);
    float **q[] = {&s->dq, &s->dza};
    for (size_t i = 0; i < sizeof q / sizeof *q; i++) *q[i] = ops->alloc(f * t * Q);
    s->dk = ops->alloc(f * t * KV);
    s->dv = ops->alloc(f * t * KV);
    s->dkc = ops->alloc(f * cache_rows * KV);
    s->dvc = ops->alloc(f * cache_rows * KV);
    float **m[] = {&s->gate, &s->up, &s->dh, &s->dgate, &s->dup};
    for (size_t i = 0; i < sizeof m / sizeof *m; i++) *m[i] = ops->alloc(f * t * NI);
}

static void scratch_free(const kernel_ops *ops, layer_scratch *s) {
    float *all[] = {s->xn, s->po, s->x1, s->gate, s->up,  s->mo,  s->dxn, s->dq,  s->dk,
                    s->dv, s->dza, s->dh, s->dgate, s->dup, s->tmp, s->tmp2, s->dkc, s->dvc};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) ops->release(all[i]);
}

// The MLP's pre-activation values from xn in gate (and up), NI columns (a shard's); its output mo only for
// the sandwich block, whose post-norm backward is the only reader of it (a shard's part of the sum, with
// the down projection's bias on the group's first rank only, as in the forward).
static void mlp_fwd(const kernel_ops *ops, const model_config *c, const layer_weights *w, layer_scratch *s,
                    const float *xn, int T, int NI) {
    size_t n = (size_t)T * NI;
    if (c->gated_mlp) {
        linear(ops, s->gate, xn, w->w_gate, w->w_gate_bf16, w->b_gate, T, c->hidden, NI);
        linear(ops, s->up, xn, w->w_up, w->w_up_bf16, w->b_up, T, c->hidden, NI);
    } else {
        linear(ops, s->gate, xn, w->w_up, w->w_up_bf16, w->b_up, T, c->hidden, NI);
    }
    if (c->block != BLOCK_SANDWICH_NORM) return;
    float *h = s->dh;  // scratch for the activation output; dh is overwritten by the backward later
    if (c->gated_mlp) {
        ops->glu(h, s->gate, s->up, n, c->act);
    } else {
        ops->copy_rows(h, NI, s->gate, NI, T, NI);
        ops->act(h, n, c->act);
    }
    linear(ops, s->mo, h, w->w_down, w->w_down_bf16, w->b_down, T, NI, c->hidden);
}

// dxn (+)= the MLP's input gradient for output gradient dmo (a shard's NI columns: its part of the sum).
static void mlp_back(const kernel_ops *ops, const model_config *c, const layer_weights *w, layer_scratch *s,
                     const float *dmo, float *dxn, int T, int NI, int accumulate) {
    size_t n = (size_t)T * NI;
    linear_back(ops, s->dh, dmo, w->w_down, w->w_down_bf16, T, NI, c->hidden, 0);
    if (c->gated_mlp) {
        ops->glu_back(s->dgate, s->dup, s->gate, s->up, s->dh, n, c->act);
        linear_back(ops, dxn, s->dgate, w->w_gate, w->w_gate_bf16, T, c->hidden, NI, accumulate);
        linear_back(ops, dxn, s->dup, w->w_up, w->w_up_bf16, T, c->hidden, NI, 1);
    } else {
        ops->act_back(s->dgate, s->gate, s->dh, n, c->act);
        linear_back(ops, dxn, s->dgate, w->w_up, w->w_up_bf16, T, c->hidden, NI, accumulate);
    }
}

// Whether head h (the model's number) of layer l was replaced by a head unit at positions of type `type`.
static int substituted_type(const forward_patch *p, int l, int h, int type) {
    for (int u = 0; u < p->n_head_units; u++)
        if (p->head_units[u].layer == l && p->head_units[u].head == h && p->head_units[u].type == type) return 1;
    return 0;
}

// Per-layer view of the tape for the table's attention ops: the sequences (queries at their packed rows,
// keys at the cache's rows, donors at theirs), the parameters, the rules in the shard's head numbering,
// and the donor pointers of the layer.
typedef struct {
    attn_seq *seqs;
    attn_params p;
    const edge_rule_set *rules;  // NULL: the layer reads no donor
    edge_rule_set *shard;        // a shard's renumbered copy (head0 > 0), else NULL
    const float *dk[16], *dv[16], *dz[16];
    int n_donors;
} layer_view;

static void view_init(layer_view *v, const grad_tape *t) {
    memset(v, 0, sizeof *v);
    v->seqs = ep_malloc(sizeof(attn_seq) * (size_t)t->n_seqs);
    const forward_patch *pt = &t->patch;
    for (int s = 0; s < t->n_seqs; s++) {
        v->seqs[s] = (attn_seq){.q_row = t->row[s], .n_q = t->len[s], .q_pos = 0, .kv_row = s * t->cache.capacity};
        if (t->patched) {
            v->seqs[s].types = pt->types + (size_t)s * pt->type_stride;
            v->seqs[s].index = pt->index + (size_t)s * pt->type_stride;
            v->seqs[s].n_typed = pt->n_typed[s];
            v->seqs[s].donor_row = pt->n_donors > 0 ? s * pt->donors[0]->capacity : 0;
        }
    }
    if (t->patched && pt->layer_rules && t->head0 > 0) v->shard = ep_malloc(sizeof *v->shard);
}

static void view_free(layer_view *v) { free(v->seqs), free(v->shard); }

static void view_layer(layer_view *v, const grad_tape *t, int l) {
    v->p = t->attn[l];
    const forward_patch *pt = &t->patch;
    v->rules = NULL, v->n_donors = 0;
    if (t->patched)
        for (int d = 0; d < pt->n_donors; d++) {
            v->dk[d] = kv_cache_k(pt->donors[d], l, 0, 0);
            v->dv[d] = kv_cache_v(pt->donors[d], l, 0, 0);
            v->dz[d] = pt->donors[d]->z ? kv_cache_z(pt->donors[d], l, 0, 0) : NULL;
        }
    if (!t->patched || !pt->layer_rules || pt->layer_rules[l].n == 0) return;
    v->n_donors = pt->n_donors;
    v->rules = &pt->layer_rules[l];
    if (v->shard) {
        forward_shard_rules(v->shard, v->rules, t->head0, t->n_heads);
        v->rules = v->shard;
    }
}

// dza = dz with the head outputs a head unit replaced zeroed (their gradient does not reach the attention),
// runs of consecutive substituted positions at once; zero: a backend row of at least head_dim zeros.
static void dz_seen(const grad_tape *t, int l, const float *dz, float *dza, const float *zero) {
    int hd = t->head_dim, Q = t->n_heads * hd;
    t->ops->copy_rows(dza, Q, dz, Q, t->n_rows, Q);
    const forward_patch *p = &t->patch;
    if (!t->patched || p->n_head_units == 0) return;
    for (int s = 0; s < t->n_seqs; s++) {
        const int32_t *ty = p->types + (size_t)s * p->type_stride;
        int n = t->len[s] < p->n_typed[s] ? t->len[s] : p->n_typed[s];
        for (int h = 0; h < t->n_heads; h++)
            for (int B = 0; B < n;) {
                if (!substituted_type(p, l, t->head0 + h, ty[B])) {
                    B++;
                    continue;
                }
                int run = 1;
                while (B + run < n && substituted_type(p, l, t->head0 + h, ty[B + run])) run++;
                t->ops->copy_rows(dza + (size_t)(t->row[s] + B) * Q + (size_t)h * hd, Q, zero, 0, run, hd);
                B += run;
            }
    }
}

static void batch_rows(const grad_batch *b, int *T, int *n_pred) {
    *T = 0, *n_pred = 0;
    for (int s = 0; s < b->n_seqs; s++) *T += b->len[s], *n_pred += b->n_target[s];
}

static int check_batch(const grad_batch *b, ep_error *err) {
    if (b->n_seqs <= 0) return ep_fail(err, "backward: no sequences");
    for (int s = 0; s < b->n_seqs; s++)
        if (b->n_target[s] < 1 || b->n_target[s] >= b->len[s])
            return ep_fail(err, "backward: sequence %d has %d targets in %d tokens (need 1 <= targets < tokens)", s,
                           b->n_target[s], b->len[s]);
    return 0;
}

// The forward pass on ops: cache filled (with z) in ops' memory, keep's resid, q_out and attn_out captured
// into backend buffers (keep may be NULL), logits at the predicting rows (host); the loss and, when dlogits
// is non-NULL, dL/dlogits (after the final softcap) of the rank's vocabulary block [vocab0, vocab0 + n_vocab)
// at those rows, into dlogits ([R][n_vocab], host).
static int forward_loss(const kernel_ops *ops, const model *m, const grad_batch *b, const forward_patch *patch,
                        const float *x0, kv_cache *cache, const forward_batch *keep, int *rows, double *loss,
                        double *seq_loss, float *dlogits, ep_error *err) {
    const model_config *c = &m->cfg;
    tp_shard sh = model_config_local(c);
    int T, R, V = c->vocab_size, Vl = sh.n_vocab, v0 = sh.vocab0, max_len = 0;
    batch_rows(b, &T, &R);
    for (int s = 0; s < b->n_seqs; s++) max_len = b->len[s] > max_len ? b->len[s] : max_len;
    if (kv_cache_init_backend(cache, c, b->n_seqs, max_len, 1, ops, err)) return -1;
    for (int s = 0, r0 = 0, k = 0; s < b->n_seqs; r0 += b->len[s], s++)
        for (int i = 0; i < b->n_target[s]; i++) rows[k++] = r0 + b->len[s] - b->n_target[s] - 1 + i;
    float *logits = ep_malloc(sizeof(float) * (size_t)R * V);
    forward_batch fb = {.n_seqs = b->n_seqs, .n_new = b->len, .tokens = b->tokens, .n_logit_rows = R,
                        .logit_rows = rows, .logits = logits};
    if (keep) fb.resid = keep->resid, fb.q_out = keep->q_out, fb.attn_out = keep->attn_out, fb.capture_backend = 1;
    fb.x_in = x0;  // backend memory: only the backward passes it, and always with keep (capture_backend)
    if (model_forward(m, ops, cache, &fb, patch, err)) {
        free(logits);
        return -1;
    }
    *loss = 0;
    for (int s = 0, k = 0; s < b->n_seqs; s++) {
        // Each prompt's own loss, summed over the batch: a prompt's gradient never depends on which
        // prompts share its batch (docs/attribution.md: the original's batch mean scaled it by 1/S).
        double ls = 0, w = 1.0 / (double)b->n_target[s];
        for (int i = 0; i < b->n_target[s]; i++, k++) {
            const float *y = logits + (size_t)k * V;
            int tgt = b->tokens[rows[k] + 1];
            float mx = y[0];
            for (int v = 1; v < V; v++) mx = y[v] > mx ? y[v] : mx;
            double sum = 0;
            for (int v = 0; v < V; v++) sum += exp((double)y[v] - mx);
            ls += log(sum) + mx - y[tgt];
            if (dlogits) {
                float *d = dlogits + (size_t)k * Vl;
                for (int v = v0; v < v0 + Vl; v++) {
                    double pr = exp((double)y[v] - mx) / sum;
                    double gy = w * (pr - (v == tgt));
                    if (c->final_softcap > 0) gy *= 1.0 - ((double)y[v] / c->final_softcap) * ((double)y[v] / c->final_softcap);
                    d[v - v0] = (float)gy;
                }
            }
        }
        ls /= b->n_target[s];
        if (seq_loss) seq_loss[s] = ls;
        *loss += ls;
    }
    free(logits);
    return 0;
}

int model_loss(const kernel_ops *ops, const model *m, const grad_batch *b, const forward_patch *patch, double *loss,
               double *seq_loss, ep_error *err) {
    if (check_batch(b, err)) return -1;
    int T, R;
    batch_rows(b, &T, &R);
    int *rows = ep_malloc(sizeof(int) * (size_t)R);
    kv_cache cache;
    int rc = forward_loss(ops, m, b, patch, NULL, &cache, NULL, rows, loss, seq_loss, NULL, err);
    kv_cache_free(&cache);
    free(rows);
    return rc;
}

// A backend buffer of n zeros (the source of the zeroing copies: copy_rows with source stride 0).
static float *backend_zeros(const kernel_ops *ops, size_t n) {
    float *z = ops->alloc(sizeof(float) * n);
    if (ops->host_memory) {
        memset(z, 0, sizeof(float) * n);
    } else {
        float *h = ep_calloc(n, sizeof(float));
        ops->upload(z, h, sizeof(float) * n);
        free(h);
    }
    return z;
}

// The gradient of the final norm and lm_head at the predicting rows (a vocabulary-parallel shard: its
// block of dL/dlogits), scattered into dx (zeroed here): the residual stream's gradient leaving the last
// layer. xlast: the residual stream there (backend, [T][D]).
static int head_back(const kernel_ops *ops, const model *m, const grad_batch *b, const int *rows, const float *dlogits,
                     const float *xlast, float *dx, const float *zero, ep_error *err) {
    const model_config *c = &m->cfg;
    tp_shard sh = model_config_local(c);
    int T, R, D = c->hidden;
    batch_rows(b, &T, &R);
    size_t RD = (size_t)R * D, f = sizeof(float);
    float *dl = (float *)dlogits, *xr = ops->alloc(f * RD), *dxn = ops->alloc(f * RD), *dxr = ops->alloc(f * RD);
    int *idx = ops->alloc(sizeof(int) * (size_t)R);
    ops->upload(idx, rows, sizeof(int) * (size_t)R);
    if (!ops->host_memory) {
        dl = ops->alloc(f * (size_t)R * sh.n_vocab);
        ops->upload(dl, dlogits, f * (size_t)R * sh.n_vocab);
    }
    ops->gather_rows(xr, xlast, idx, R, D);
    linear_back(ops, dxn, dl, m->lm_head, m->lm_head_bf16, R, D, sh.n_vocab, 0);
    int rc = sh.n_vocab < c->vocab_size ? model_group_sum(m, dxn, RD, err) : 0;
    if (rc == 0) {
        norm_back(ops, c, dxr, xr, m->final_norm, dxn, R, 0);
        ops->copy_rows(dx, D, zero, 0, T, D);
        // A sequence's predicting rows are consecutive: one copy each.
        for (int s = 0, k = 0; s < b->n_seqs; k += b->n_target[s], s++)
            ops->copy_rows(dx + (size_t)rows[k] * D, D, dxr + (size_t)k * D, D, b->n_target[s], D);
    }
    if (dl != dlogits) ops->release(dl);
    ops->release(xr), ops->release(dxn), ops->release(dxr), ops->release(idx);
    return rc;
}

int model_backward(const kernel_ops *ops, const model *m, const grad_batch *b, const forward_patch *patch,
                   grad_tape *t, ep_error *err) {
    return model_backward_at(ops, m, b, patch, NULL, t, err);
}

int model_backward_at(const kernel_ops *ops, const model *m, const grad_batch *b, const forward_patch *patch,
                      const float *x0, grad_tape *t, ep_error *err) {
    memset(t, 0, sizeof *t);
    if (check_batch(b, err)) return -1;
    const model_config *c = &m->cfg;
    tp_shard sh = model_config_local(c);
    int T, R, L = c->n_layers, D = c->hidden, H = sh.n_heads, hd = c->head_dim, NI = sh.n_inter;
    int Q = H * hd, KV = sh.n_kv_heads * hd;
    batch_rows(b, &T, &R);
    size_t f = sizeof(float), TD = (size_t)T * D;
    t->ops = ops;
    t->n_layers = L, t->n_heads = H, t->n_kv_heads = sh.n_kv_heads, t->head_dim = hd, t->n_seqs = b->n_seqs;
    t->head0 = sh.head0, t->model_heads = c->n_heads, t->group = sh.size > 1 ? m->group : NULL;
    t->n_rows = T;
    t->len = ep_malloc(sizeof(int) * (size_t)b->n_seqs);
    t->row = ep_malloc(sizeof(int) * (size_t)b->n_seqs);
    t->seq_loss = ep_calloc((size_t)b->n_seqs, sizeof(double));
    t->attn = ep_malloc(sizeof(attn_params) * (size_t)L);
    for (int l = 0; l < L; l++)
        t->attn[l] = (attn_params){.n_heads = H, .n_kv_heads = sh.n_kv_heads, .head_dim = hd, .q_stride = Q,
                                   .kv_stride = KV, .scale = c->attn_scale, .softcap = c->attn_softcap,
                                   .window = model_config_layer_window(c, l)};
    for (int s = 0, r = 0; s < b->n_seqs; r += b->len[s], s++) t->len[s] = b->len[s], t->row[s] = r;
    if (patch) {
        t->patch = *patch;
        t->patched = 1;
    }

    int *rows = ep_malloc(sizeof(int) * (size_t)R), *hpos = ep_malloc(sizeof(int) * (size_t)T);
    float *dlogits = ep_malloc(f * (size_t)R * sh.n_vocab);
    float *resid = ops->alloc(f * (size_t)(L + 1) * TD), *attn = ops->alloc(f * (size_t)L * TD);
    t->q = ops->alloc(f * (size_t)L * T * Q);
    forward_batch keep = {.resid = resid, .q_out = t->q, .attn_out = attn};
    if (forward_loss(ops, m, b, patch, x0, &t->cache, &keep, rows, &t->loss, t->seq_loss, dlogits, err)) {
        free(rows), free(hpos), free(dlogits);
        ops->release(resid), ops->release(attn);
        grad_tape_free(t);
        return -1;
    }
    for (int s = 0, r = 0; s < b->n_seqs; s++)
        for (int i = 0; i < b->len[s]; i++) hpos[r++] = i;
    int *pos = ops->alloc(sizeof(int) * (size_t)T);
    ops->upload(pos, hpos, sizeof(int) * (size_t)T);
    free(hpos);
    t->dz = ops->alloc(f * (size_t)L * T * Q);
    int wide = D > Q ? D : Q;
    float *zero = backend_zeros(ops, (size_t)(wide > KV ? wide : KV));

    // A shard (docs/tensor_parallel.md): dL/dlogits is whole on every rank (the logits were gathered) and
    // so is every gradient of the residual stream. The row-parallel o and down projections' backward is
    // local; the input gradients of the column-parallel projections (q/k/v, gate/up, the lm_head block)
    // are parts of a sum, summed over the group before the norm they come from (model_group_sum).
    float *dx = ops->alloc(f * TD), *dx_in = ops->alloc(f * TD);
    int rc = head_back(ops, m, b, rows, dlogits, resid + (size_t)L * TD, dx, zero, err);
    free(dlogits);
    layer_scratch s;
    size_t cache_rows = (size_t)b->n_seqs * t->cache.capacity;
    scratch_init(ops, &s, c, T, cache_rows);
    layer_view v;
    view_init(&v, t);
    for (int l = L - 1; l >= 0 && rc == 0; l--) {
        const layer_weights *w = &m->layers[l];
        const float *x = resid + (size_t)l * TD;
        const float *o = attn + (size_t)l * TD;  // summed over a group (not read by the parallel block)
        // Recompute the MLP's input (into s.xn) and pre-activations.
        if (c->block == BLOCK_PARALLEL) {
            forward_norm(ops, c, s.xn, x, w->attn_norm, w->attn_norm_bias, T);
        } else {
            ops->copy_rows(s.x1, D, x, D, T, D);
            if (c->block == BLOCK_SANDWICH_NORM) {
                forward_norm(ops, c, s.po, o, w->attn_post_norm, NULL, T);
                ops->add(s.x1, s.po, TD);
            } else {
                ops->add(s.x1, o, TD);
            }
            forward_norm(ops, c, s.xn, s.x1, w->mlp_norm, NULL, T);
        }
        mlp_fwd(ops, c, w, &s, s.xn, T, NI);
        if (c->block == BLOCK_SANDWICH_NORM && (rc = model_group_sum(m, s.mo, TD, err))) break;

        // Backward: do (gradient of the attention block's o_proj output) into s.tmp, dxn1 into s.dxn.
        float *dx1 = s.tmp2, *dxn1 = s.dxn;
        int dxn1_filled = 0;  // the parallel block's MLP writes dxn1 first; the attention's then adds to it
        if (c->block == BLOCK_PARALLEL) {
            ops->copy_rows(s.tmp, D, dx, D, T, D);
            mlp_back(ops, c, w, &s, dx, dxn1, T, NI, 0);
            dxn1_filled = 1;
            ops->copy_rows(dx1, D, dx, D, T, D);
        } else {
            const float *dmo = dx;
            if (c->block == BLOCK_SANDWICH_NORM) {
                norm_back(ops, c, s.tmp, s.mo, w->mlp_post_norm, dx, T, 0);
                dmo = s.tmp;
            }
            float *dxn2 = s.po;
            mlp_back(ops, c, w, &s, dmo, dxn2, T, NI, 0);
            if ((rc = model_group_sum(m, dxn2, TD, err))) break;
            ops->copy_rows(dx1, D, dx, D, T, D);
            norm_back(ops, c, dx1, s.x1, w->mlp_norm, dxn2, T, 1);
            if (c->block == BLOCK_SANDWICH_NORM)
                norm_back(ops, c, s.tmp, o, w->attn_post_norm, dx1, T, 0);
            else
                ops->copy_rows(s.tmp, D, dx1, D, T, D);
        }
        // dz = do . W_o, kept; the attention below sees it zeroed where a head unit replaced the output.
        float *dz = t->dz + (size_t)l * T * Q;
        linear_back(ops, dz, s.tmp, w->wo, w->wo_bf16, T, Q, D, 0);
        dz_seen(t, l, dz, s.dza, zero);
        view_layer(&v, t, l);
        ops->copy_rows(s.dkc, KV, zero, 0, (int)cache_rows, KV);
        ops->copy_rows(s.dvc, KV, zero, 0, (int)cache_rows, KV);
        ops->attention_back(s.dq, s.dkc, s.dvc, t->q + (size_t)l * T * Q, kv_cache_k(&t->cache, l, 0, 0),
                            kv_cache_v(&t->cache, l, 0, 0), s.dza, v.n_donors, v.dk, v.dv, NULL, NULL, v.seqs,
                            t->n_seqs, &v.p, v.rules);
        for (int sq = 0; sq < t->n_seqs; sq++) {  // the cache's rows to the packed rows
            ops->copy_rows(s.dk + (size_t)t->row[sq] * KV, KV, s.dkc + (size_t)v.seqs[sq].kv_row * KV, KV, t->len[sq], KV);
            ops->copy_rows(s.dv + (size_t)t->row[sq] * KV, KV, s.dvc + (size_t)v.seqs[sq].kv_row * KV, KV, t->len[sq], KV);
        }
        ops->rope_back(s.dq, Q, pos, m->inv_freq, T, H, hd, c->rotary_dim);
        ops->rope_back(s.dk, KV, pos, m->inv_freq, T, sh.n_kv_heads, hd, c->rotary_dim);
        // A replicated KV head's dk, dv hold only this rank's query heads' part: the group sum adds the rest.
        linear_back(ops, dxn1, s.dq, w->wq, w->wq_bf16, T, D, Q, dxn1_filled);
        linear_back(ops, dxn1, s.dk, w->wk, w->wk_bf16, T, D, KV, 1);
        linear_back(ops, dxn1, s.dv, w->wv, w->wv_bf16, T, D, KV, 1);
        if ((rc = model_group_sum(m, dxn1, TD, err))) break;  // the parallel block: attention and MLP at once
        ops->copy_rows(dx_in, D, dx1, D, T, D);
        norm_back(ops, c, dx_in, x, w->attn_norm, dxn1, T, 1);
        float *sw = dx;
        dx = dx_in, dx_in = sw;
    }
    ops->sync();
    view_free(&v);
    scratch_free(ops, &s);
    free(rows);
    ops->release(dx), ops->release(dx_in), ops->release(pos), ops->release(resid), ops->release(attn);
    ops->release(zero);
    if (rc) grad_tape_free(t);
    return rc;
}

void grad_tape_free(grad_tape *t) {
    free(t->len), free(t->row), free(t->seq_loss), free(t->attn);
    if (t->ops) {
        if (t->dz) t->ops->release(t->dz);
        if (t->q) t->ops->release(t->q);
    }
    kv_cache_free(&t->cache);
    memset(t, 0, sizeof *t);
}

void grad_tape_dz(const grad_tape *t, int layer, int row, float *out) {
    size_t Q = (size_t)t->n_heads * t->head_dim;
    t->ops->download(out, t->dz + ((size_t)layer * t->n_rows + row) * Q, sizeof(float) * Q);
}

static int check_donor(const grad_tape *t, int layer, int head, int donor, int need_z, ep_error *err) {
    if (!t->patched || !t->patch.types)
        return ep_fail(err, "scores: the pass ran without donors and token types");
    if (layer < 0 || layer >= t->n_layers || head < 0 || head >= t->model_heads || donor < 0 ||
        donor >= t->patch.n_donors || !t->patch.donors[donor] || (need_z && !t->patch.donors[donor]->z))
        return ep_fail(err, "scores: unit (layer %d, head %d, donor %d) is out of range or its donor is missing%s",
                       layer, head, donor, need_z ? " (or has no head outputs)" : "");
    return 0;
}

int grad_donor_kv(const grad_tape *t, int layer, int donor, float *dk, float *dv, ep_error *err) {
    if (check_donor(t, layer, t->head0, donor, 0, err)) return -1;
    const kernel_ops *ops = t->ops;
    const kv_cache *dn = t->patch.donors[donor];
    int hd = t->head_dim, Q = t->n_heads * hd, KV = t->n_kv_heads * hd;
    size_t f = sizeof(float), dn_rows = (size_t)dn->n_seqs * dn->capacity, c_rows = (size_t)t->n_seqs * t->cache.capacity;
    float *zero = backend_zeros(ops, (size_t)(Q > KV ? Q : KV)), *dza = ops->alloc(f * (size_t)t->n_rows * Q),
          *dq = ops->alloc(f * (size_t)t->n_rows * Q), *ck = ops->alloc(f * c_rows * KV), *cv = ops->alloc(f * c_rows * KV),
          *ddk = ops->alloc(f * dn_rows * KV), *ddv = ops->alloc(f * dn_rows * KV);
    layer_view v;
    view_init(&v, t);
    view_layer(&v, t, layer);
    ops->copy_rows(ck, KV, zero, 0, (int)c_rows, KV);
    ops->copy_rows(cv, KV, zero, 0, (int)c_rows, KV);
    ops->copy_rows(ddk, KV, zero, 0, (int)dn_rows, KV);
    ops->copy_rows(ddv, KV, zero, 0, (int)dn_rows, KV);
    dz_seen(t, layer, t->dz + (size_t)layer * t->n_rows * Q, dza, zero);
    float *tk[16] = {0}, *tv[16] = {0};
    tk[donor] = ddk, tv[donor] = ddv;
    ops->attention_back(dq, ck, cv, t->q + (size_t)layer * t->n_rows * Q, kv_cache_k(&t->cache, layer, 0, 0),
                        kv_cache_v(&t->cache, layer, 0, 0), dza, v.n_donors, v.dk, v.dv, tk, tv, v.seqs, t->n_seqs,
                        &v.p, v.rules);
    ops->download(dk, ddk, f * dn_rows * KV);
    ops->download(dv, ddv, f * dn_rows * KV);
    ops->release(zero), ops->release(dza), ops->release(dq), ops->release(ck), ops->release(cv);
    ops->release(ddk), ops->release(ddv);
    view_free(&v);
    return 0;
}

// |.| of the signed per-sequence sums and the mean over the sequences.
static void finish_scores(const double *signed_sum, int n, int S, double *score, double *per_seq) {
    for (int u = 0; u < n; u++) {
        score[u] = 0;
        for (int s = 0; s < S; s++) {
            score[u] += fabs(signed_sum[(size_t)u * S + s]) / S;
            if (per_seq) per_seq[(size_t)u * S + s] = signed_sum[(size_t)u * S + s];
        }
    }
}

// The sums' difference source: the base tape (EAP-IG's clean pass) or t itself, which must match t's batch.
static int check_base(const grad_tape *t, const grad_tape *base, ep_error *err) {
    if (!base || base == t) return 0;
    if (base->ops != t->ops || base->n_seqs != t->n_seqs || base->n_rows != t->n_rows || base->n_layers != t->n_layers ||
        base->n_heads != t->n_heads || base->head0 != t->head0 || base->cache.capacity != t->cache.capacity)
        return ep_fail(err, "scores: the base pass is of another batch or shard than the scored one");
    return 0;
}

// The units of layer l on the tape's heads, in the op's numbering (tape heads), and their places in the
// caller's list; returns how many.
static int layer_units(const grad_tape *t, int l, int n, const int *layer_of, const int *head_of, int *at) {
    int k = 0;
    for (int u = 0; u < n; u++)
        if (layer_of[u] == l && head_of[u] - t->head0 >= 0 && head_of[u] - t->head0 < t->n_heads) at[k++] = u;
    return k;
}

int grad_head_sums(const grad_tape *t, const grad_tape *base, const head_unit *units, int n, double *sum, ep_error *err) {
    int S = t->n_seqs, Q = t->n_heads * t->head_dim;
    for (int u = 0; u < n; u++)
        if (check_donor(t, units[u].layer, units[u].head, units[u].donor, 1, err)) return -1;
    if (check_base(t, base, err)) return -1;
    const grad_tape *zt = base ? base : t;  // z - z_d from the base, dL/dz from t
    const kernel_ops *ops = t->ops;
    double *got = ep_malloc(sizeof(double) * ((size_t)n * S + 1));
    memset(sum, 0, sizeof(double) * (size_t)n * S);
    int *layer_of = ep_malloc(sizeof(int) * ((size_t)n + 1)), *head_of = ep_malloc(sizeof(int) * ((size_t)n + 1)),
        *at = ep_malloc(sizeof(int) * ((size_t)n + 1));
    head_score_unit *hu = ep_malloc(sizeof *hu * ((size_t)n + 1));
    for (int u = 0; u < n; u++) layer_of[u] = units[u].layer, head_of[u] = units[u].head;
    double *dev = ops->alloc(sizeof(double) * ((size_t)n * S + 1));
    float *z = ops->alloc(sizeof(float) * (size_t)t->n_rows * Q);
    layer_view v;
    view_init(&v, t);
    for (int l = 0; l < t->n_layers; l++) {
        int k = layer_units(t, l, n, layer_of, head_of, at);
        if (k == 0) continue;
        view_layer(&v, t, l);
        for (int i = 0; i < k; i++) hu[i] = (head_score_unit){units[at[i]].head - t->head0, units[at[i]].type, units[at[i]].donor};
        for (int s = 0; s < S; s++)  // the cache's z rows to the packed rows of dz
            ops->copy_rows(z + (size_t)t->row[s] * Q, Q, kv_cache_z(&zt->cache, l, s, 0), Q, t->len[s], Q);
        ops->head_scores(dev, z, v.dz, t->dz + (size_t)l * t->n_rows * Q, v.seqs, S, &v.p, hu, k);
        ops->download(got, dev, sizeof(double) * (size_t)k * S);
        for (int i = 0; i < k; i++) memcpy(sum + (size_t)at[i] * S, got + (size_t)i * S, sizeof(double) * (size_t)S);
    }
    view_free(&v);
    ops->release(dev), ops->release(z);
    free(got), free(layer_of), free(head_of), free(at), free(hu);
    // A shard scored only the units on its heads (0 for the others): the group's sum gives every rank every
    // unit's signed sums (exactly: one rank's value plus zeros).
    return t->group ? group_sum_f64(t->group, sum, (size_t)n * S, err) : 0;
}

int grad_head_scores(const grad_tape *t, const head_unit *units, int n, double *score, double *per_seq, ep_error *err) {
    double *sum = ep_malloc(sizeof(double) * ((size_t)n * t->n_seqs + 1));
    int rc = grad_head_sums(t, NULL, units, n, sum, err);
    if (rc == 0) finish_scores(sum, n, t->n_seqs, score, per_seq);
    free(sum);
    return rc;
}

int grad_edge_sums(const grad_tape *t, const grad_tape *base, const edge_unit *units, int n, double *sum, ep_error *err) {
    int S = t->n_seqs, Q = t->n_heads * t->head_dim;
    for (int u = 0; u < n; u++) {
        if (check_donor(t, units[u].layer, units[u].head, units[u].donor, 0, err)) return -1;
        if (units[u].source < 0 || units[u].source >= EDGE_N_SOURCES)
            return ep_fail(err, "scores: edge unit %d has intervention %d (kv, k, v or zero: 0 .. 3)", u, units[u].source);
    }
    if (check_base(t, base, err)) return -1;
    const kernel_ops *ops = t->ops;
    double *got = ep_malloc(sizeof(double) * ((size_t)n * S + 1));
    memset(sum, 0, sizeof(double) * (size_t)n * S);
    int *layer_of = ep_malloc(sizeof(int) * ((size_t)n + 1)), *head_of = ep_malloc(sizeof(int) * ((size_t)n + 1)),
        *at = ep_malloc(sizeof(int) * ((size_t)n + 1));
    edge_score_unit *eu = ep_malloc(sizeof *eu * ((size_t)n + 1));
    for (int u = 0; u < n; u++) layer_of[u] = units[u].layer, head_of[u] = units[u].head;
    double *dev = ops->alloc(sizeof(double) * ((size_t)n * S + 1));
    float *dza = ops->alloc(sizeof(float) * (size_t)t->n_rows * Q), *zero = backend_zeros(ops, (size_t)t->head_dim);
    layer_view v;
    view_init(&v, t);
    for (int l = 0; l < t->n_layers; l++) {
        int k = layer_units(t, l, n, layer_of, head_of, at);
        if (k == 0) continue;
        view_layer(&v, t, l);
        for (int i = 0; i < k; i++) {
            const edge_unit *e = &units[at[i]];
            eu[i] = (edge_score_unit){e->head - t->head0, e->sender, e->receiver, e->donor, e->source};
        }
        dz_seen(t, l, t->dz + (size_t)l * t->n_rows * Q, dza, zero);
        // the base's keys and values: the differences of the edges that read the current pass
        ops->edge_scores(dev, t->q + (size_t)l * t->n_rows * Q, kv_cache_k(&t->cache, l, 0, 0),
                         kv_cache_v(&t->cache, l, 0, 0), base ? kv_cache_k(&base->cache, l, 0, 0) : NULL,
                         base ? kv_cache_v(&base->cache, l, 0, 0) : NULL, dza, t->patch.n_donors, v.dk, v.dv, v.seqs, S, &v.p, v.rules,
                         eu, k);
        ops->download(got, dev, sizeof(double) * (size_t)k * S);
        for (int i = 0; i < k; i++) memcpy(sum + (size_t)at[i] * S, got + (size_t)i * S, sizeof(double) * (size_t)S);
    }
    view_free(&v);
    ops->release(dev), ops->release(dza), ops->release(zero);
    free(got), free(layer_of), free(head_of), free(at), free(eu);
    return t->group ? group_sum_f64(t->group, sum, (size_t)n * S, err) : 0;
}

int grad_edge_scores(const grad_tape *t, const edge_unit *units, int n, double *score, double *per_seq, ep_error *err) {
    double *sum = ep_malloc(sizeof(double) * ((size_t)n * t->n_seqs + 1));
    int rc = grad_edge_sums(t, NULL, units, n, sum, err);
    if (rc == 0) finish_scores(sum, n, t->n_seqs, score, per_seq);
    free(sum);
    return rc;
}

// Bytes as the allocators above are asked for them (ep_malloc and kernel_malloc take 1 for 0).
static size_t asked(size_t n) { return n ? n : 1; }
static size_t max_sz(size_t a, size_t b) { return a > b ? a : b; }

int backward_bytes(const model_config *c, const backward_shape *b, backward_memory *out, ep_error *err) {
    memset(out, 0, sizeof *out);
    if (b->n_seqs <= 0 || !b->len || !b->n_target) return ep_fail(err, "backward memory: no sequences");
    if (b->n_threads < 1 || b->n_donors < 0 || b->n_donors > 16 || b->donor_capacity < 0)
        return ep_fail(err, "backward memory: %d threads, %d donors of %d positions", b->n_threads, b->n_donors,
                       b->donor_capacity);
    if (b->ig_steps < 0 || b->ig_head_units < 0 || b->ig_edge_units < 0)
        return ep_fail(err, "backward memory: ig_steps %d, %d head and %d edge units", b->ig_steps, b->ig_head_units,
                       b->ig_edge_units);
    grad_batch gb = {.n_seqs = b->n_seqs, .len = b->len, .n_target = b->n_target};
    if (check_batch(&gb, err)) return -1;
    tp_shard sh = model_config_local(c);
    size_t S = (size_t)b->n_seqs, L = (size_t)c->n_layers, D = (size_t)c->hidden, V = (size_t)c->vocab_size,
           Vl = (size_t)sh.n_vocab, hd = (size_t)c->head_dim, H = (size_t)sh.n_heads, Q = H * hd,
           KV = (size_t)sh.n_kv_heads * hd, NI = (size_t)sh.n_inter, f = sizeof(float);
    size_t T = 0, R = 0, max_len = 0;
    for (int s = 0; s < b->n_seqs; s++) {
        size_t n = (size_t)b->len[s];
        T += n, R += (size_t)b->n_target[s];
        max_len = n > max_len ? n : max_len;
    }
    size_t nn = max_len * max_len, cache_rows = S * max_len, wide = max_sz(max_sz(D, Q), KV);

    // The tape: model_backward's t->len, row, seq_loss, attn; q; dz; forward_loss's cache (k, v, z of every
    // layer for max_len positions, and its lengths). Nothing per edge: the scores recompute it.
    out->tape_meta = S * sizeof(int) * 2 + S * sizeof(double) + L * sizeof(attn_params);
    out->tape_q = f * L * T * Q;
    out->tape_dz = f * L * T * Q;
    out->tape_cache = f * L * S * max_len * (2 * KV + Q) + S * sizeof(int);
    out->tape = out->tape_meta + out->tape_q + out->tape_dz + out->tape_cache;

    // model_backward's rows and positions (host, then the backend's copy); resid, attn; dL/dlogits of the
    // rank's vocabulary block at the predicting rows (host).
    out->pass_meta = R * sizeof(int) + T * sizeof(int);
    out->resid = f * (L + 1) * T * D;
    out->attn_out = f * L * T * D;
    out->dlogits = f * R * Vl;

    // Inside forward_loss: the logits rows, model_forward's step buffers (hidden-wide rows: max(T, R) = T),
    // its host positions and sequences; during the layers a later shard's copy of the rules with, one at
    // a time, the vocabulary-parallel embedding's ids and the cpu attention's per-thread blocks (scores of
    // the current keys and of every donor, and the selection, when patched); after them project_logits'
    // gather buffers of a vocabulary-parallel shard.
    size_t slots = S * H < (size_t)b->n_threads ? S * H : (size_t)b->n_threads;
    size_t nd = b->edge_rules ? (size_t)b->n_donors : 0;
    size_t kernel = slots ? f * nn * (1 + nd) * slots + (b->edge_rules ? nn * slots : 0) : 0;
    int vocab_parallel = sh.n_vocab < c->vocab_size;
    size_t gather = vocab_parallel ? asked(f * R * Vl) + 2 * f * R * V : 0;
    size_t ids = vocab_parallel ? asked(sizeof(int) * T) : 0;
    size_t step = f * T * (D * 4 + Q * 2 + KV * 2 + NI * 2) + sizeof(int) * T * 3 + sizeof(attn_seq) * S;
    size_t rules = b->edge_rules && sh.head0 > 0 ? sizeof(edge_rule_set) : 0;
    out->forward = f * R * V + step + max_sz(rules + max_sz(ids, kernel), gather);

    // From the final norm on: dx, dx_in and the zero row (base); at the lm_head xr, dxn, dxr and the rows'
    // indices (on a device backend also the uploaded dL/dlogits; the cpu ops read the host's); then the
    // layer walk's scratch_init buffers (dkc, dvc in the cache's rows) and view_init's sequences and a
    // later shard's copy of the rules; per layer attention_back's blocks per thread (cpu ops:
    // kernels/ops_cpu.c agrad_run: P, dlogit, g, mask and two per donor a layer's rules read, and the
    // selection bytes, per (sequence, KV head) task slot).
    size_t base = 2 * f * T * D + f * wide;
    out->head = 3 * f * R * D + sizeof(int) * R;
    out->scratch = base + f * T * (D * 7 + Q * 2 + KV * 2 + NI * 5) + 2 * f * cache_rows * KV + sizeof(attn_seq) * S + rules;
    size_t aslots = S * (size_t)sh.n_kv_heads < (size_t)b->n_threads ? S * (size_t)sh.n_kv_heads : (size_t)b->n_threads;
    out->attention = f * nn * (4 + 2 * nd) * aslots + nn * aslots;

    size_t pass = out->pass_meta + out->resid + out->attn_out;
    size_t during_forward = out->tape_meta + out->tape_q + out->tape_cache + pass + out->dlogits + out->forward;
    size_t during_head = out->tape + pass + out->dlogits + base + out->head;
    size_t during_walk = out->tape + pass + out->scratch + out->attention;
    out->peak = max_sz(during_forward, max_sz(during_head, during_walk));
    out->per_layer = 2 * f * T * Q + f * S * max_len * (2 * KV + Q) + 2 * f * T * D + sizeof(attn_params);
    // patch_donor_passes' caches: K, V and z for donor_capacity positions, and their lengths.
    out->donors = (size_t)b->n_donors * (f * L * S * (size_t)b->donor_capacity * (2 * KV + Q) + S * sizeof(int));
    // grad_ig_sums: hs and es; with more than one point the clean tape and x, diff, e_donor beside each
    // later point's pass.
    if (b->ig_steps >= 1) {
        out->ig_sums = sizeof(double) * (S * (size_t)b->ig_head_units + 1) + sizeof(double) * (S * (size_t)b->ig_edge_units + 1);
        out->ig_path = b->ig_steps > 1 ? out->tape + 3 * asked(f * T * D) : 0;
        out->peak_ig = out->ig_sums + out->ig_path + out->peak;
    }
    return 0;
}

// EAP-IG: the clean pass first (the differences' base, and the path's last point), then the other path
// points one at a time, each a forward from interpolated embeddings and its backward.
int grad_ig_sums(const kernel_ops *ops, const model *m, const grad_batch *b, const forward_patch *patch,
                 const grad_ig_request *r, ep_error *err) {
    if (r->steps < 1) return ep_fail(err, "eap-ig: ig_steps %d (need at least 1)", r->steps);
    if (check_batch(b, err)) return -1;
    int S = b->n_seqs, T, R, D = m->cfg.hidden;
    batch_rows(b, &T, &R);
    size_t nh = (size_t)r->n_heads * S, ne = (size_t)r->n_edges * S, TD = (size_t)T * D;
    double *hs = ep_malloc(sizeof(double) * (nh + 1)), *es = ep_malloc(sizeof(double) * (ne + 1));
    grad_tape clean, path;
    int rc = model_backward(ops, m, b, patch, &clean, err);
    if (rc) {
        free(hs), free(es);
        return -1;
    }
    // The path's last point (a = 1) is the clean pass itself: with steps = 1 the sums are attribution's.
    rc = (r->n_heads && grad_head_sums(&clean, NULL, r->heads, r->n_heads, hs, err)) ||
         (r->n_edges && grad_edge_sums(&clean, NULL, r->edges, r->n_edges, es, err));
    for (size_t i = 0; rc == 0 && i < nh; i++) r->head_sums[i] = hs[i];
    for (size_t i = 0; rc == 0 && i < ne; i++) r->edge_sums[i] = es[i];
    if (rc == 0 && r->head_plain) memcpy(r->head_plain, hs, sizeof(double) * nh);
    if (rc == 0 && r->edge_plain) memcpy(r->edge_plain, es, sizeof(double) * ne);
    float *e_donor = NULL, *diff = NULL, *x = NULL;
    if (rc == 0 && r->steps > 1) {
        // diff = e_clean - e_donor (a negated copy added: the same rounding as one subtraction).
        e_donor = ops->alloc(sizeof(float) * TD), diff = ops->alloc(sizeof(float) * TD), x = ops->alloc(sizeof(float) * TD);
        rc = model_embed(m, ops, b->tokens, T, diff, err) || model_embed(m, ops, r->donor_tokens, T, e_donor, err);
        if (rc == 0) {
            ops->copy_rows(x, D, e_donor, D, T, D);
            ops->scale(x, TD, -1.0f);
            ops->add(diff, x, TD);
        }
    }
    for (int k = 1; k < r->steps && rc == 0; k++) {
        // x = e_donor + (k / m) (e_clean - e_donor)
        ops->copy_rows(x, D, diff, D, T, D);
        ops->scale(x, TD, (float)((double)k / r->steps));
        ops->add(x, e_donor, TD);
        if ((rc = model_backward_at(ops, m, b, patch, x, &path, err))) break;
        rc = (r->n_heads && grad_head_sums(&path, &clean, r->heads, r->n_heads, hs, err)) ||
             (r->n_edges && grad_edge_sums(&path, &clean, r->edges, r->n_edges, es, err));
        for (size_t i = 0; rc == 0 && i < nh; i++) r->head_sums[i] += hs[i];
        for (size_t i = 0; rc == 0 && i < ne; i++) r->edge_sums[i] += es[i];
        grad_tape_free(&path);
    }
    for (size_t i = 0; rc == 0 && i < nh; i++) r->head_sums[i] /= r->steps;
    for (size_t i = 0; rc == 0 && i < ne; i++) r->edge_sums[i] /= r->steps;
    if (x) ops->release(x), ops->release(diff), ops->release(e_donor);
    grad_tape_free(&clean);
    free(hs), free(es);
    return rc ? -1 : 0;
}
