#include "circuit.h"

#include <stdlib.h>
#include <string.h>

#define NT PLAN_CIRCUIT_TYPES
#define ET PLAN_EDGE_TYPES

circuit_unit circuit_head_unit(int layer, int head, int type) { return (circuit_unit){layer, head, type, -1, -1}; }

circuit_unit circuit_edge_unit(int layer, int head, int sender, int receiver) {
    return (circuit_unit){layer, head, -1, sender, receiver};
}

const char *unit_kind_name(unit_kind k) { return k == UNIT_HEAD ? "head" : "edge"; }

static size_t n_head_slots(const circuit *c) { return (size_t)c->n_layers * c->n_heads * NT; }
static size_t n_edge_slots(const circuit *c) { return (size_t)c->n_layers * c->n_heads * ET * ET; }

void circuit_full(const model_config *cfg, circuit *c) {
    memset(c, 0, sizeof *c);
    c->n_layers = cfg->n_layers, c->n_heads = cfg->n_heads;
    c->heads = ep_malloc(n_head_slots(c));
    memset(c->heads, 1, n_head_slots(c));
}

void circuit_copy(const circuit *src, circuit *dst) {
    *dst = *src;
    dst->heads = ep_malloc(n_head_slots(src));
    memcpy(dst->heads, src->heads, n_head_slots(src));
    if (src->edges) {
        dst->edges = ep_malloc(n_edge_slots(src));
        memcpy(dst->edges, src->edges, n_edge_slots(src));
    }
}

void circuit_free(circuit *c) {
    free(c->heads), free(c->edges);
    memset(c, 0, sizeof *c);
}

int circuit_equal(const circuit *a, const circuit *b) {
    if (a->n_layers != b->n_layers || a->n_heads != b->n_heads || !a->edges != !b->edges) return 0;
    if (memcmp(a->heads, b->heads, n_head_slots(a))) return 0;
    return !a->edges || !memcmp(a->edges, b->edges, n_edge_slots(a));
}

void circuit_start_edges(circuit *c, const prompt_set *ps) {
    unsigned char occurs[ET][ET] = {{0}};  // [sender][receiver]
    for (int p = 0; p < ps->n_prompts; p++) {
        unsigned seen = 0;
        const int32_t *ty = ps->types + (size_t)p * ps->max_len;
        for (int B = 0; B < ps->lengths[p]; B++) {
            if (ty[B] < 0 || ty[B] >= NT) continue;
            seen |= 1u << ty[B];
            for (int s = 0; s < NT; s++)
                if ((seen >> s) & 1) occurs[s][ty[B]] = 1;
        }
    }
    free(c->edges);
    c->edges = ep_calloc(n_edge_slots(c), 1);
    for (int l = 0; l < c->n_layers; l++)
        for (int h = 0; h < c->n_heads; h++)
            for (int r = 0; r < NT; r++) {
                if (!c->heads[((size_t)l * c->n_heads + h) * NT + r]) continue;
                for (int s = 0; s < NT; s++)
                    if (occurs[s][r]) c->edges[(((size_t)l * c->n_heads + h) * ET + s) * ET + r] = 1;
            }
}

static unsigned char *slot(const circuit *c, unit_kind kind, const circuit_unit *u) {
    size_t lh = (size_t)u->layer * c->n_heads + u->head;
    return kind == UNIT_HEAD ? &c->heads[lh * NT + u->type] : &c->edges[(lh * ET + u->sender) * ET + u->receiver];
}

int circuit_has(const circuit *c, unit_kind kind, const circuit_unit *u) {
    if (kind == UNIT_EDGE && !c->edges) return 0;
    return *slot(c, kind, u);
}

void circuit_set(circuit *c, unit_kind kind, const circuit_unit *u, int kept) {
    if (kind == UNIT_EDGE && !c->edges) return;
    *slot(c, kind, u) = (unsigned char)(kept != 0);
}

int circuit_units(const circuit *c, unit_kind kind, circuit_unit **units) {
    int n = 0;
    size_t cap = kind == UNIT_HEAD ? n_head_slots(c) : n_edge_slots(c);
    *units = ep_malloc(sizeof(circuit_unit) * (cap + 1));
    if (kind == UNIT_EDGE && !c->edges) return 0;
    for (int l = 0; l < c->n_layers; l++)
        for (int h = 0; h < c->n_heads; h++) {
            if (kind == UNIT_HEAD) {
                for (int t = 0; t < NT; t++) {
                    circuit_unit u = circuit_head_unit(l, h, t);
                    if (*slot(c, kind, &u)) (*units)[n++] = u;
                }
                continue;
            }
            for (int s = 0; s < ET; s++)
                for (int r = 0; r < ET; r++) {
                    circuit_unit u = circuit_edge_unit(l, h, s, r);
                    if (*slot(c, kind, &u)) (*units)[n++] = u;
                }
        }
    return n;
}

int circuit_plan(const circuit *c, const model_config *cfg, const ablation_plan *base, ablation_plan *out, ep_error *err) {
    return plan_circuit_masks(cfg, base, c->heads, c->edges, out, err);
}
