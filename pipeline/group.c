#include "group.h"

ep_group group_single(void) { return (ep_group){.rank = 0, .size = 1}; }

static int group_size(const ep_group *g) { return g ? g->size : 1; }

int group_sum_f32(const ep_group *g, float *buf, size_t n, ep_error *err) {
    if (g && g->sum_f32) return g->sum_f32(g->ctx, buf, n, err);
    if (group_size(g) == 1) return 0;
    return ep_fail(err, "group: rank %d of %d has no f32 sum", g->rank, g->size);
}

int group_gather_f32(const ep_group *g, const float *send, float *recv, size_t n, ep_error *err) {
    if (g && g->gather_f32) return g->gather_f32(g->ctx, send, recv, n, err);
    return ep_fail(err, "group: rank %d of %d has no f32 all-gather", g ? g->rank : 0, group_size(g));
}

int group_sum_f64(const ep_group *g, double *buf, size_t n, ep_error *err) {
    if (g && g->sum_f64) return g->sum_f64(g->ctx, buf, n, err);
    if (group_size(g) == 1) return 0;
    return ep_fail(err, "group: rank %d of %d has no f64 sum", g->rank, g->size);
}
