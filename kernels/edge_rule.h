// edge_rule: the one definition of which attention edges read a donor's keys and values.
//
// An edge (layer l, query head h, sender A -> receiver B) is ablated with donor d when the first rule
// of layer l's rule set (in priority order) that matches it names d: h among its heads, type(A) among
// its sender types, type(B) among its receiver types, and the relation between the example indices
// holds (same: idx(A) == idx(B) >= 0; earlier: 0 <= idx(A) < idx(B); any). Positions without a type
// (type < 0: generated tokens, padding) never match, so generation runs unpatched. A rule whose donor
// is -1 keeps the edges it matches clean: a circuit is "keep these" rules before an "ablate the rest"
// rule. This function is used by the CPU and CUDA kernels, the reference backend and the tests alike.
#ifndef EP_KERNELS_EDGE_RULE_H
#define EP_KERNELS_EDGE_RULE_H

#include <stdint.h>

#ifdef __CUDACC__
#define EP_HOST_DEVICE __host__ __device__
#else
#define EP_HOST_DEVICE
#endif

#define EDGE_MAX_RULES 512
#define EDGE_MAX_HEADS 256

typedef enum { REL_ANY = 0, REL_SAME = 1, REL_EARLIER = 2 } edge_relation;

typedef struct {
    uint32_t sender_types;    // bit t: token type t (stages/prompts.h token_type) sends
    uint32_t receiver_types;  // bit t: token type t receives
    int32_t relation;         // edge_relation
    int32_t donor;            // donor index the edge reads; -1: the edge stays clean
    uint64_t heads[EDGE_MAX_HEADS / 64];  // bit h: query head h
} edge_rule;

typedef struct {
    int n;
    edge_rule rule[EDGE_MAX_RULES];
} edge_rule_set;

static inline EP_HOST_DEVICE int edge_donor(const edge_rule_set *r, int head, int type_a, int idx_a, int type_b,
                                            int idx_b) {
    if (!r || type_a < 0 || type_b < 0) return -1;
    for (int i = 0; i < r->n; i++) {
        const edge_rule *e = &r->rule[i];
        if (!((e->heads[head >> 6] >> (head & 63)) & 1u)) continue;
        if (!((e->receiver_types >> type_b) & 1u) || !((e->sender_types >> type_a) & 1u)) continue;
        if (e->relation == REL_SAME && !(idx_a >= 0 && idx_a == idx_b)) continue;
        if (e->relation == REL_EARLIER && !(idx_a >= 0 && idx_a < idx_b)) continue;
        return e->donor;
    }
    return -1;
}

#endif
