#include "rank.h"

#include <math.h>
#include <stdlib.h>

#include "pipeline/error.h"

// Average ranks (1-based) of v, ties sharing their mean rank.
static void ranks(const double *v, int n, double *r) {
    int *o = ep_malloc(sizeof(int) * (size_t)(n + 1));
    rank_order(v, n, o);
    for (int i = 0; i < n;) {
        int j = i;
        while (j + 1 < n && v[o[j + 1]] == v[o[i]]) j++;
        for (int k = i; k <= j; k++) r[o[k]] = (i + j) / 2.0 + 1;
        i = j + 1;
    }
    free(o);
}

double rank_spearman(const double *a, const double *b, int n) {
    if (n < 2) return NAN;
    double *ra = ep_malloc(sizeof(double) * (size_t)n), *rb = ep_malloc(sizeof(double) * (size_t)n);
    ranks(a, n, ra), ranks(b, n, rb);
    double ma = 0, mb = 0, sab = 0, saa = 0, sbb = 0;
    for (int i = 0; i < n; i++) ma += ra[i] / n, mb += rb[i] / n;
    for (int i = 0; i < n; i++) {
        sab += (ra[i] - ma) * (rb[i] - mb);
        saa += (ra[i] - ma) * (ra[i] - ma);
        sbb += (rb[i] - mb) * (rb[i] - mb);
    }
    free(ra), free(rb);
    return saa > 0 && sbb > 0 ? sab / sqrt(saa * sbb) : NAN;
}

int rank_topk_overlap(const double *a, const double *b, int n, int k) {
    if (k > n) k = n;
    int *oa = ep_malloc(sizeof(int) * (size_t)(n + 1)), *ob = ep_malloc(sizeof(int) * (size_t)(n + 1)), both = 0;
    rank_order(a, n, oa), rank_order(b, n, ob);
    for (int i = 0; i < k; i++)
        for (int j = 0; j < k; j++) both += oa[i] == ob[j];
    free(oa), free(ob);
    return both;
}

void rank_order(const double *score, int n, int *order) {
    // insertion sort keeps this free of global state (qsort has no context argument in C11)
    for (int i = 0; i < n; i++) order[i] = i;
    for (int i = 1; i < n; i++) {
        int x = order[i], j = i - 1;
        while (j >= 0 && (score[order[j]] < score[x] || (score[order[j]] == score[x] && order[j] > x))) {
            order[j + 1] = order[j];
            j--;
        }
        order[j + 1] = x;
    }
}
