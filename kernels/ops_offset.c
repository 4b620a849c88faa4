// ops_offset: the "offset" backend, a device backend without a device. It wraps the cpu kernels, but its
// memory is separate (host_memory = 0: alloc, upload, download and release are the only way in and out)
// and its pointers are the malloc'd addresses plus 2^62, which is not a canonical x86-64 / AArch64 user
// address. So code that dereferences backend memory on the host faults at once, and so does code that
// hands a host pointer to an op (the wrapper's translation of it is the non-canonical one); pointer
// arithmetic on backend pointers (row offsets) keeps working. It computes exactly what the cpu backend
// computes, so a run on it must give the cpu run's bytes: the tests and `backend: "offset"` runs check
// the device code paths (uploads, downloads, device-resident caches) on machines without a GPU.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"
#include "kernels/alloc.h"

#define OFFSET_BACKEND_BIAS ((uintptr_t)1 << 62)

static inline void *ob_real(const void *p) { return p ? (void *)((uintptr_t)p - OFFSET_BACKEND_BIAS) : NULL; }
#define OB_F(p) ((float *)ob_real(p))

static void *ob_alloc(size_t bytes) { return (void *)((uintptr_t)kernel_malloc(bytes ? bytes : 1) + OFFSET_BACKEND_BIAS); }
static void ob_release(void *p) { free(ob_real(p)); }
static void ob_upload(void *dst, const void *host_src, size_t bytes) { memcpy(ob_real(dst), host_src, bytes); }
static void ob_download(void *host_dst, const void *src, size_t bytes) { memcpy(host_dst, ob_real(src), bytes); }
static void ob_sync(void) {}

static void ob_matmul(float *out, const float *x, const float *w, const float *bias, int rows, int n_in, int n_out) {
    kernel_ops_cpu()->matmul(OB_F(out), OB_F(x), OB_F(w), OB_F(bias), rows, n_in, n_out);
}
static void ob_matmul_bf16(float *out, const float *x, const uint16_t *w, const float *bias, int rows, int n_in,
                           int n_out) {
    kernel_ops_cpu()->matmul_bf16(OB_F(out), OB_F(x), (const uint16_t *)ob_real(w), OB_F(bias), rows, n_in, n_out);
}
static void ob_rmsnorm(float *out, const float *x, const float *w, float w_offset, int rows, int dim, float eps) {
    kernel_ops_cpu()->rmsnorm(OB_F(out), OB_F(x), OB_F(w), w_offset, rows, dim, eps);
}
static void ob_layernorm(float *out, const float *x, const float *w, const float *b, int rows, int dim, float eps) {
    kernel_ops_cpu()->layernorm(OB_F(out), OB_F(x), OB_F(w), OB_F(b), rows, dim, eps);
}
static void ob_rope(float *x, int stride, const int *pos, const float *inv_freq, int rows, int n_heads, int head_dim,
                    int rot_dim) {
    kernel_ops_cpu()->rope(OB_F(x), stride, (const int *)ob_real(pos), OB_F(inv_freq), rows, n_heads, head_dim, rot_dim);
}
static void ob_glu(float *out, const float *gate, const float *up, size_t n, act_kind act) {
    kernel_ops_cpu()->glu(OB_F(out), OB_F(gate), OB_F(up), n, act);
}
static void ob_act(float *x, size_t n, act_kind act) { kernel_ops_cpu()->act(OB_F(x), n, act); }
static void ob_softcap(float *x, size_t n, float cap) { kernel_ops_cpu()->softcap(OB_F(x), n, cap); }
static void ob_add(float *y, const float *x, size_t n) { kernel_ops_cpu()->add(OB_F(y), OB_F(x), n); }
static void ob_scale(float *y, size_t n, float s) { kernel_ops_cpu()->scale(OB_F(y), n, s); }
static void ob_attention(float *out, const float *q, const float *k, const float *v, const attn_seq *seqs, int n_seqs,
                         const attn_params *p) {
    kernel_ops_cpu()->attention(OB_F(out), OB_F(q), OB_F(k), OB_F(v), seqs, n_seqs, p);
}
static void ob_patched_attention(float *out, const float *q, const float *k, const float *v, int n_donors,
                                 const float *const *donor_k, const float *const *donor_v, const attn_seq *seqs,
                                 int n_seqs, const attn_params *p, const edge_rule_set *rules) {
    const float *dk[16], *dv[16];
    for (int d = 0; d < n_donors && d < 16; d++) dk[d] = OB_F(donor_k[d]), dv[d] = OB_F(donor_v[d]);
    kernel_ops_cpu()->patched_attention(OB_F(out), OB_F(q), OB_F(k), OB_F(v), n_donors, dk, dv, seqs, n_seqs, p, rules);
}
static void ob_copy_rows(float *dst, int dst_stride, const float *src, int src_stride, int rows, int row_len) {
    kernel_ops_cpu()->copy_rows(OB_F(dst), dst_stride, OB_F(src), src_stride, rows, row_len);
}
static void ob_gather_rows(float *dst, const float *src, const int *idx, int n, int row_len) {
    kernel_ops_cpu()->gather_rows(OB_F(dst), OB_F(src), (const int *)ob_real(idx), n, row_len);
}

// Gradient ops: the cpu kernels on the translated pointers (donor pointer arrays are host memory holding
// backend pointers, translated entry by entry; NULL stays NULL).
static void ob_linear_back(float *dx, const float *dy, const float *w, int rows, int n_in, int n_out, int accumulate) {
    kernel_ops_cpu()->linear_back(OB_F(dx), OB_F(dy), OB_F(w), rows, n_in, n_out, accumulate);
}
static void ob_linear_back_bf16(float *dx, const float *dy, const uint16_t *w, int rows, int n_in, int n_out,
                                int accumulate) {
    kernel_ops_cpu()->linear_back_bf16(OB_F(dx), OB_F(dy), (const uint16_t *)ob_real(w), rows, n_in, n_out, accumulate);
}
static void ob_rmsnorm_back(float *dx, const float *x, const float *w, float w_offset, const float *dy, int rows,
                            int dim, float eps, int accumulate) {
    kernel_ops_cpu()->rmsnorm_back(OB_F(dx), OB_F(x), OB_F(w), w_offset, OB_F(dy), rows, dim, eps, accumulate);
}
static void ob_layernorm_back(float *dx, const float *x, const float *w, const float *dy, int rows, int dim, float eps,
                              int accumulate) {
    kernel_ops_cpu()->layernorm_back(OB_F(dx), OB_F(x), OB_F(w), OB_F(dy), rows, dim, eps, accumulate);
}
static void ob_rope_back(float *x, int stride, const int *pos, const float *inv_freq, int rows, int n_heads,
                         int head_dim, int rot_dim) {
    kernel_ops_cpu()->rope_back(OB_F(x), stride, (const int *)ob_real(pos), OB_F(inv_freq), rows, n_heads, head_dim,
                                rot_dim);
}
static void ob_act_back(float *dx, const float *x, const float *dy, size_t n, act_kind act) {
    kernel_ops_cpu()->act_back(OB_F(dx), OB_F(x), OB_F(dy), n, act);
}
static void ob_glu_back(float *dgate, float *dup, const float *gate, const float *up, const float *dout, size_t n,
                        act_kind act) {
    kernel_ops_cpu()->glu_back(OB_F(dgate), OB_F(dup), OB_F(gate), OB_F(up), OB_F(dout), n, act);
}
static void ob_softcap_back(float *dx, const float *y, const float *dy, size_t n, float cap) {
    kernel_ops_cpu()->softcap_back(OB_F(dx), OB_F(y), OB_F(dy), n, cap);
}
static void ob_attention_back(float *dq, float *dk, float *dv, const float *q, const float *k, const float *v,
                              const float *dout, int n_donors, const float *const *donor_k,
                              const float *const *donor_v, float *const *donor_dk, float *const *donor_dv,
                              const attn_seq *seqs, int n_seqs, const attn_params *p, const edge_rule_set *rules) {
    const float *bk[16] = {0}, *bv[16] = {0};
    float *gk[16] = {0}, *gv[16] = {0};
    for (int d = 0; d < n_donors && d < 16; d++) {
        bk[d] = OB_F(donor_k[d]), bv[d] = OB_F(donor_v[d]);
        gk[d] = donor_dk ? OB_F(donor_dk[d]) : NULL, gv[d] = donor_dv ? OB_F(donor_dv[d]) : NULL;
    }
    kernel_ops_cpu()->attention_back(OB_F(dq), OB_F(dk), OB_F(dv), OB_F(q), OB_F(k), OB_F(v), OB_F(dout), n_donors, bk,
                                     bv, gk, gv, seqs, n_seqs, p, rules);
}
static void ob_head_scores(double *score, const float *z, const float *const *donor_z, const float *dz,
                           const attn_seq *seqs, int n_seqs, const attn_params *p, const head_score_unit *units,
                           int n_units) {
    const float *bz[16] = {0};
    for (int u = 0; u < n_units; u++)
        if (units[u].donor >= 0 && units[u].donor < 16) bz[units[u].donor] = OB_F(donor_z[units[u].donor]);
    kernel_ops_cpu()->head_scores((double *)ob_real(score), OB_F(z), bz, OB_F(dz), seqs, n_seqs, p, units, n_units);
}
static void ob_edge_scores(double *score, const float *q, const float *k, const float *v, const float *k_base,
                           const float *v_base, const float *dout,
                           int n_donors, const float *const *donor_k, const float *const *donor_v,
                           const attn_seq *seqs, int n_seqs, const attn_params *p, const edge_rule_set *rules,
                           const edge_score_unit *units, int n_units) {
    const float *bk[16] = {0}, *bv[16] = {0};
    for (int d = 0; d < n_donors && d < 16; d++) bk[d] = OB_F(donor_k[d]), bv[d] = OB_F(donor_v[d]);
    kernel_ops_cpu()->edge_scores((double *)ob_real(score), OB_F(q), OB_F(k), OB_F(v), k_base ? OB_F(k_base) : NULL,
                                  v_base ? OB_F(v_base) : NULL, OB_F(dout), n_donors, bk, bv,
                                  seqs, n_seqs, p, rules, units, n_units);
}

static void ob_kl_div_rows(float *out, const float *p_logits, const float *q_logits, int rows, int n) {
    kernel_ops_cpu()->kl_div_rows(OB_F(out), OB_F(p_logits), OB_F(q_logits), rows, n);
}
static void ob_attention_row_stats(float *entropy, float *mass, int n_types, const float *q, const float *k,
                                   int n_donors, const float *const *donor_k, const attn_seq *seqs, int n_seqs,
                                   const attn_params *p, const edge_rule_set *rules) {
    const float *bk[16] = {0};
    for (int d = 0; d < n_donors && d < 16; d++) bk[d] = OB_F(donor_k[d]);
    kernel_ops_cpu()->attention_row_stats(OB_F(entropy), OB_F(mass), n_types, OB_F(q), OB_F(k), n_donors, bk, seqs,
                                          n_seqs, p, rules);
}

// out, target and other are host memory: only the logits are translated.
static void ob_logit_metrics(logit_row_metrics *out, const float *logits, const int *target, const int *other, int rows,
                             int n) {
    kernel_ops_cpu()->logit_metrics(out, OB_F(logits), target, other, rows, n);
}

static const kernel_ops offset_table = {
    .name = "offset",
    .alloc = ob_alloc,
    .release = ob_release,
    .upload = ob_upload,
    .download = ob_download,
    .sync = ob_sync,
    .matmul = ob_matmul,
    .matmul_bf16 = ob_matmul_bf16,
    .rmsnorm = ob_rmsnorm,
    .layernorm = ob_layernorm,
    .rope = ob_rope,
    .glu = ob_glu,
    .act = ob_act,
    .softcap = ob_softcap,
    .add = ob_add,
    .scale = ob_scale,
    .attention = ob_attention,
    .patched_attention = ob_patched_attention,
    .copy_rows = ob_copy_rows,
    .gather_rows = ob_gather_rows,
    .linear_back = ob_linear_back,
    .linear_back_bf16 = ob_linear_back_bf16,
    .rmsnorm_back = ob_rmsnorm_back,
    .layernorm_back = ob_layernorm_back,
    .rope_back = ob_rope_back,
    .act_back = ob_act_back,
    .glu_back = ob_glu_back,
    .softcap_back = ob_softcap_back,
    .attention_back = ob_attention_back,
    .head_scores = ob_head_scores,
    .edge_scores = ob_edge_scores,
    .kl_div_rows = ob_kl_div_rows,
    .attention_row_stats = ob_attention_row_stats,
    .logit_metrics = ob_logit_metrics,
    .host_memory = 0,
};

const kernel_ops *kernel_ops_offset(void) { return &offset_table; }
