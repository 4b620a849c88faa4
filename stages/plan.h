// plan: which edges and heads a run ablates, and with which donor, read from JSON and compiled into
// the per-layer rule sets and head units the forward pass applies (pipeline/forward.h).
//
// Plan JSON:
//   {"name": "...",
//    "rules": [{"sender": ["y"] | "all", "receiver": ["last"] | "all", "relation": "any"|"same"|"earlier",
//               "layers": "all" | "band:K/N" | [0, 1], "heads": "all" | "band:K/N" | [0, 2], "donor": 0,
//               "intervention": "kv" | "k" | "v" | "zero"}, ...],
//    "heads": [{"layer": 1, "head": 2, "type": "last", "donor": 0}, ...]}
// Rules are in priority order (the first match decides an edge's donor). A rule's intervention
// (kernels/edge_rule.h; default "kv") says what its edges read: the donor's key and value, its key only
// (with the current value), its value only (with the current key), or nothing: "zero" removes the edges
// from their receivers' softmax and reads no donor, so a zero rule must not name one. The original code's
// affect_whom forms are accepted too (plan_from_affect_whom): a list of [sender, receiver] type pairs
// (every layer and head, relation any, donor 0), and {"ablate": ..., "curcuit": ...} where each part
// maps "sender,receiver" (or lists [sender, receiver, donor]) to a donor index; "ablate" rules take
// priority over "curcuit" ones. Type names are those of stages/prompts.h; the original's x_i, y_i,
// t_i, n_i and last_separator are accepted as x, y, t, n and last.
#ifndef EP_PLAN_H
#define EP_PLAN_H

#include <jansson.h>

#include "pipeline/forward.h"
#include "pipeline/model_config.h"
#include "stages/run_config.h"

typedef struct {
    char name[128];
    int n_layers, n_heads;
    edge_rule_set *layer_rules;  // [n_layers]
    head_unit *head_units;
    int n_head_units;
    int n_donors;  // 1 + the largest donor index the plan reads (0 for an empty plan)
    int n_rules;   // rules as written (before expansion over layers)
    // How a circuit built on this plan (plan_circuit, plan_circuit_masks with this plan as the base)
    // ablates the edges it does not keep: edge_source, the run config's edge_intervention (default kv).
    int circuit_source;
} ablation_plan;

int plan_parse(json_t *j, const char *where, const model_config *cfg, ablation_plan *p, ep_error *err);
int plan_from_affect_whom(json_t *affect_whom, const char *where, const model_config *cfg, ablation_plan *p,
                          ep_error *err);
void plan_free(ablation_plan *p);
// The donor-0 part of a plan: what the nested donor pass of a donor d > 0 applies (the rules reading donor
// 0, kv, k- or v-only, and the head units of donor 0; zero rules read no donor and are not in it).
void plan_donor0_part(const ablation_plan *p, ablation_plan *out);
// An empty plan for cfg (the clean model).
void plan_empty(const model_config *cfg, ablation_plan *p);
// A circuit: kept head units [[layer, head, "type"], ...] and/or kept edge units
// [[layer, head, "sender", "receiver"], ...] ({"heads": ..., "edges": ...}); every other unit of the
// given kinds is ablated with donor 0, on top of (after) the rules of `base` (affect_whom). Edge units
// become "keep" rules (donor -1) before one "ablate everything" rule, whose intervention is the base's
// circuit_source (kv, k, v with donor 0, or zero); head units the complement list. out keeps the base's
// circuit_source.
int plan_circuit(json_t *circuit, const char *where, const model_config *cfg, const ablation_plan *base,
                 ablation_plan *out, ep_error *err);
// The same from masks (what plan_circuit parses its JSON into, and what stages/score builds directly):
// kept_heads [n_layers][n_heads][PLAN_CIRCUIT_TYPES] (1 kept; NULL: no head unit is ablated), kept_edges
// [n_layers][n_heads][PLAN_EDGE_TYPES][PLAN_EDGE_TYPES] by (sender, receiver) (NULL: no edge rule).
// Keep rules are merged per (layer, sender, receiver) over heads, so a layer needs at most
// PLAN_EDGE_TYPES^2 + 1 rules besides the base's.
#define PLAN_CIRCUIT_TYPES 7  // head units: the prompt types bos .. last
#define PLAN_EDGE_TYPES 8     // edge units: every token type (target included; prompt passes never match it)
int plan_circuit_masks(const model_config *cfg, const ablation_plan *base, const unsigned char *kept_heads,
                       const unsigned char *kept_edges, ablation_plan *out, ep_error *err);
// The plan a run config asks for: its explicit "plan", else its mode's (calc_accuracy: none; the others:
// affect_whom, whose form run_config_parse checked), then its "circuit" if it gives one.
int plan_from_run_config(const run_config *rc, const model_config *cfg, ablation_plan *p, ep_error *err);
// The config's "ablations" list (absent: none; names and labels checked by run_config_parse): each
// entry's plan compiled, read by its own patch pass (stages/patch.h). They may read donor 0 only (the
// cache stage keeps donor 0 for them; nested donors would need a cache per ablation). *list is NULL
// when n is 0.
int plan_list_from_run_config(const run_config *rc, const model_config *cfg, ablation_plan **list, int *n,
                              ep_error *err);
void plan_list_free(ablation_plan *list, int n);
// Identity of a compiled plan (rules with their interventions, head units, and a non-kv circuit_source),
// for artifact attributes. A plan of kv rules has the hash it had before interventions existed.
uint64_t plan_hash(const ablation_plan *p);

#endif
