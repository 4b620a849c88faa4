// edge_rule: the one definition of which attention edges read a donor's keys and values, and how.
//
// An edge (layer l, query head h, sender A -> receiver B) is decided by the first rule of layer l's rule
// set (in priority order) that matches it: h among its heads, type(A) among its sender types, type(B)
// among its receiver types, and the relation between the example indices holds (same: idx(A) ==
// idx(B) >= 0; earlier: 0 <= idx(A) < idx(B); any). Positions without a type (type < 0: generated
// tokens, padding) never match, so generation runs unpatched. The matching rule's `source` says what
// the edge reads (docs/design.md, "Interventions"):
//   EDGE_SRC_KV   donor d's key and value at A (the default, and all there was before issue 21);
//   EDGE_SRC_K    donor d's key with the current value (the donor moves the attention weight only);
//   EDGE_SRC_V    the current key with donor d's value (the weight stays, the content moves);
//   EDGE_SRC_ZERO the edge is removed: its score leaves B's softmax, which is renormalized over B's other
//                 edges; the donor is not read. A query whose every edge is removed outputs 0 (and has
//                 zero gradients): there is nothing left to renormalize over.
// A rule whose donor is -1 (and source not zero) keeps the edges it matches clean: a circuit is "keep
// these" rules before an "ablate the rest" rule. edge_lookup is used by the CPU and CUDA kernels, the
// reference backend and the tests alike; it answers with one small integer (an edge code) that the
// kernels store per edge and take apart with edge_key_donor / edge_value_donor.
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
#define EDGE_MAX_DONORS 16  // donor indices 0 .. 15 (plans refuse more; the edge code has 4 bits for one)

typedef enum { REL_ANY = 0, REL_SAME = 1, REL_EARLIER = 2 } edge_relation;

typedef enum { EDGE_SRC_KV = 0, EDGE_SRC_K = 1, EDGE_SRC_V = 2, EDGE_SRC_ZERO = 3 } edge_source;
#define EDGE_N_SOURCES 4

typedef struct {
    uint32_t sender_types;    // bit t: token type t (stages/prompts.h token_type) sends
    uint32_t receiver_types;  // bit t: token type t receives
    // edge_relation, and edge_source (0, kv, in a zeroed rule): two halves of what was one int32 relation,
    // so a kv rule has the bytes it had before sources existed (plan hashes hash rule sets as bytes)
    int16_t relation, source;
    int32_t donor;            // donor index the edge reads; -1: the edge stays clean (unless source is zero)
    uint64_t heads[EDGE_MAX_HEADS / 64];  // bit h: query head h
} edge_rule;

typedef struct {
    int n;
    edge_rule rule[EDGE_MAX_RULES];
} edge_rule_set;

// Edge codes: EDGE_CLEAN (the current key and value), EDGE_REMOVED (zeroed), or donor + 16 * source for
// an edge reading donor `donor` (0 .. 15) as source kv, k or v says (0 .. 47).
#define EDGE_CLEAN (-1)
#define EDGE_REMOVED (-2)

static inline EP_HOST_DEVICE int edge_lookup(const edge_rule_set *r, int head, int type_a, int idx_a, int type_b,
                                             int idx_b) {
    if (!r || type_a < 0 || type_b < 0) return EDGE_CLEAN;
    for (int i = 0; i < r->n; i++) {
        const edge_rule *e = &r->rule[i];
        if (!((e->heads[head >> 6] >> (head & 63)) & 1u)) continue;
        if (!((e->receiver_types >> type_b) & 1u) || !((e->sender_types >> type_a) & 1u)) continue;
        if (e->relation == REL_SAME && !(idx_a >= 0 && idx_a == idx_b)) continue;
        if (e->relation == REL_EARLIER && !(idx_a >= 0 && idx_a < idx_b)) continue;
        if (e->source == EDGE_SRC_ZERO) return EDGE_REMOVED;
        return e->donor < 0 ? EDGE_CLEAN : e->donor + 16 * e->source;
    }
    return EDGE_CLEAN;
}

// The donor whose key (value) the edge of this code reads; -1: the current pass's (or none, removed).
static inline EP_HOST_DEVICE int edge_key_donor(int code) {
    return code >= 0 && (code >> 4) != EDGE_SRC_V ? (code & 15) : -1;
}
static inline EP_HOST_DEVICE int edge_value_donor(int code) {
    return code >= 0 && (code >> 4) != EDGE_SRC_K ? (code & 15) : -1;
}

// "kv", "k", "v", "zero" <-> edge_source (-1 for an unknown name; NULL for an unknown value).
static inline int edge_source_parse(const char *s) {
    static const char *const names[EDGE_N_SOURCES] = {"kv", "k", "v", "zero"};
    for (int i = 0; s && i < EDGE_N_SOURCES; i++) {
        const char *a = names[i], *b = s;
        while (*a && *a == *b) a++, b++;
        if (!*a && !*b) return i;
    }
    return -1;
}
static inline const char *edge_source_name(int source) {
    static const char *const names[EDGE_N_SOURCES] = {"kv", "k", "v", "zero"};
    return source >= 0 && source < EDGE_N_SOURCES ? names[source] : (const char *)0;
}

#endif
