#include "metrics.h"

#include <ctype.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

// The text without leading and trailing white space, as Python's str.strip() for ASCII white space.
static void strip(char *s) {
    size_t n = strlen(s), a = 0;
    while (a < n && isspace((unsigned char)s[a])) a++;
    while (n > a && isspace((unsigned char)s[n - 1])) n--;
    memmove(s, s + a, n - a);
    s[n - a] = 0;
}

// One row of kernel_ops.logit_metrics on the host (the reference backend's, the code every host backend
// runs), so these figures are the ones a device backend reduces in place (patch stage).
void metrics_first_token(const float *logits, int V, int t0, prompt_metrics *m) {
    memset(m, 0, sizeof *m);
    logit_row_metrics r;
    kernel_ops_ref()->logit_metrics(&r, logits, &t0, NULL, 1, V);
    metrics_from_row(&r, t0, m);
}

void metrics_from_row(const logit_row_metrics *r, int t0, prompt_metrics *m) {
    m->first_token_correct = r->argmax == t0;
    m->target_logprob = r->target_logprob;
    m->logit_diff = r->logit_diff;
}

int metrics_compute(const tokenizer *tk, const float *logits, int V, const int *target, int n_target, const int *gen,
                    int n_gen, prompt_metrics *m, ep_error *err) {
    memset(m, 0, sizeof *m);
    if (n_target < 1 || target[0] < 0 || target[0] >= V) return ep_fail(err, "metrics: empty or out-of-range target");
    metrics_first_token(logits, V, target[0], m);
    char *want = NULL, *got = NULL;
    if (tokenizer_decode(tk, target, n_target, 1, &want, NULL, err) || tokenizer_decode(tk, gen, n_gen, 1, &got, NULL, err)) {
        free(want);
        return -1;
    }
    strip(want);
    strip(got);
    m->correct = *want && !strncmp(got, want, strlen(want));
    free(want), free(got);
    return 0;
}

void metrics_kl_full_model(const kernel_ops *ops, const float *full, const float *patched, int rows, int V,
                           float *out) {
    if (rows <= 0) return;
    if (ops->host_memory) {
        ops->kl_div_rows(out, full, patched, rows, V);
        return;
    }
    size_t n = (size_t)rows * V;
    float *bf = ops->alloc(sizeof(float) * n), *bp = ops->alloc(sizeof(float) * n), *bo = ops->alloc(sizeof(float) * rows);
    ops->upload(bf, full, sizeof(float) * n);
    ops->upload(bp, patched, sizeof(float) * n);
    ops->kl_div_rows(bo, bf, bp, rows, V);
    ops->sync();
    ops->download(out, bo, sizeof(float) * rows);
    ops->release(bf), ops->release(bp), ops->release(bo);
}
