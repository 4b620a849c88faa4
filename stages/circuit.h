// circuit: which head units and edge units of a model are kept clean (docs/pruning.md).
//
// Owns: the circuit (every unit not kept is ablated with donor 0 on top of the run's base plan, i.e.
// its affect_whom rules), its units and their enumeration, and the circuit's ablation plan (built
// directly, through plan_circuit_masks, the same core the JSON `circuit` field uses).
// Promises: plain data; no passes, no files, never prints, never calls MPI. stages/score measures and
// scores circuits, stages/circuit_file writes and reads them.
#ifndef EP_CIRCUIT_H
#define EP_CIRCUIT_H

#include "stages/plan.h"
#include "stages/tokenize.h"  // prompt_set

typedef enum { UNIT_HEAD = 0, UNIT_EDGE = 1 } unit_kind;

// A unit, named as pipeline/forward.h's head_unit and pipeline/backward.h's edge_unit name theirs:
//   head unit: query head (layer, head)'s output at every position of token type `type`;
//              sender = receiver = -1;
//   edge unit: in (layer, head), the edges from positions of type `sender` to positions of type
//              `receiver`; type = -1.
// The unused fields are -1 so that units compare equal field by field (and by memcmp) exactly when
// they are the same unit. Round files store a unit as the row (layer, head, type, -1) or (layer, head,
// sender, receiver) (stages/circuit_file.h).
typedef struct {
    int layer, head;
    int type;              // head unit: the token type whose head output it is; -1 for an edge unit
    int sender, receiver;  // edge unit: the sender and receiver token types; -1 for a head unit
} circuit_unit;

circuit_unit circuit_head_unit(int layer, int head, int type);
circuit_unit circuit_edge_unit(int layer, int head, int sender, int receiver);
const char *unit_kind_name(unit_kind k);  // "head" or "edge" (the round files' kind attribute)

typedef struct {
    int n_layers, n_heads;
    unsigned char *heads;  // [n_layers][n_heads][PLAN_CIRCUIT_TYPES]: 1 kept
    unsigned char *edges;  // [n_layers][n_heads][PLAN_EDGE_TYPES][PLAN_EDGE_TYPES] (sender, receiver), NULL
                           // before edge units are in play (then no edge is ablated by the circuit)
} circuit;

// Every head unit kept, edge units not in play: the base plan alone.
void circuit_full(const model_config *cfg, circuit *c);
void circuit_copy(const circuit *src, circuit *dst);
void circuit_free(circuit *c);
int circuit_equal(const circuit *a, const circuit *b);
// Brings edge units into play: every (layer, head, sender, receiver) whose receiver's head unit
// (layer, head, receiver) is kept (elsewhere the head's output at the receiver is replaced anyway)
// and whose type pair occurs in the prompts (a sender at or before a receiver). Ablates nothing new.
void circuit_start_edges(circuit *c, const prompt_set *ps);
// The kept units of a kind, in (layer, head, type) order for head units and (layer, head, sender,
// receiver) order for edge units; *units is malloc'ed (free it).
int circuit_units(const circuit *c, unit_kind kind, circuit_unit **units);
// 1 if the unit is kept; sets it kept (1) or ablated (0). An edge unit is never kept before edge units
// are in play, and setting one then changes nothing. The unit's fields must be in range (callers that
// read units from files check them first).
int circuit_has(const circuit *c, unit_kind kind, const circuit_unit *u);
void circuit_set(circuit *c, unit_kind kind, const circuit_unit *u, int kept);
// The plan: base rules and head units, then the circuit's keep rules / ablate-the-rest (donor 0).
int circuit_plan(const circuit *c, const model_config *cfg, const ablation_plan *base, ablation_plan *out, ep_error *err);

#endif
