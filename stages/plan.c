#include "plan.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline/hash.h"
#include "stages/prompts.h"

_Static_assert(PLAN_CIRCUIT_TYPES == TT_TARGET && PLAN_EDGE_TYPES == TT_COUNT, "circuit type counts follow token_type");

static int parse_type(const char *s, int *out) {
    static const struct {
        const char *alias;
        int type;
    } aliases[] = {{"x_i", TT_X}, {"y_i", TT_Y}, {"t_i", TT_T}, {"n_i", TT_N}, {"last_separator", TT_LAST}};
    token_type t;
    if (token_type_parse(s, &t) == 0) {
        *out = (int)t;
        return 0;
    }
    for (size_t i = 0; i < sizeof aliases / sizeof aliases[0]; i++)
        if (!strcmp(s, aliases[i].alias)) {
            *out = aliases[i].type;
            return 0;
        }
    return -1;
}

// "all", a type name, or a list of type names -> a bit mask.
static int parse_types(json_t *v, const char *where, const char *field, uint32_t *mask, ep_error *err) {
    *mask = 0;
    if (json_is_string(v) && !strcmp(json_string_value(v), "all")) {
        *mask = (1u << TT_COUNT) - 1;
        return 0;
    }
    json_t *list = json_is_string(v) ? json_pack("[O]", v) : json_incref(v);
    int rc = 0;
    if (!json_is_array(list) || json_array_size(list) == 0) rc = ep_fail(err, "%s: %s: expected \"all\" or a list of token types", where, field);
    size_t i;
    json_t *e;
    json_array_foreach(list, i, e) {
        int t;
        if (rc) break;
        if (!json_is_string(e) || parse_type(json_string_value(e), &t))
            rc = ep_fail(err, "%s: %s[%zu]: '%s' is not a token type (bos, x, t, y, n, query, last, target)", where, field,
                         i, json_is_string(e) ? json_string_value(e) : "?");
        else *mask |= 1u << t;
    }
    json_decref(list);
    return rc;
}

// "all" or a list of integers in [0, n) -> a bit set (n <= 256).
static int parse_indices(json_t *v, const char *where, const char *field, int n, uint64_t *bits, ep_error *err) {
    memset(bits, 0, sizeof(uint64_t) * (EDGE_MAX_HEADS / 64));
    if (!v || (json_is_string(v) && !strcmp(json_string_value(v), "all"))) {
        for (int i = 0; i < n; i++) bits[i >> 6] |= 1ull << (i & 63);
        return 0;
    }
    // "band:K/N": band K (0..N-1) of N equal bands of the n indices, [floor(K n / N), floor((K + 1) n / N)),
    // so one config serves models of any depth (docs/config.md).
    if (json_is_string(v) && !strncmp(json_string_value(v), "band:", 5)) {
        const char *t = json_string_value(v) + 5;
        int k, nb, used = 0;
        if (sscanf(t, "%d/%d%n", &k, &nb, &used) != 2 || t[used] || nb < 1 || nb > n || k < 0 || k >= nb)
            return ep_fail(err, "%s: %s: expected \"band:K/N\" with 1 <= N <= %d and 0 <= K < N, got \"%s\"", where,
                           field, n, json_string_value(v));
        for (int i = (int)((long long)k * n / nb); i < (int)((long long)(k + 1) * n / nb); i++) bits[i >> 6] |= 1ull << (i & 63);
        return 0;
    }
    if (!json_is_array(v)) return ep_fail(err, "%s: %s: expected \"all\", \"band:K/N\" or a list of integers", where, field);
    size_t i;
    json_t *e;
    json_array_foreach(v, i, e) {
        if (!json_is_integer(e) || json_integer_value(e) < 0 || json_integer_value(e) >= n)
            return ep_fail(err, "%s: %s[%zu]: expected an integer in 0..%d", where, field, i, n - 1);
        int x = (int)json_integer_value(e);
        bits[x >> 6] |= 1ull << (x & 63);
    }
    return 0;
}

static void plan_init(const model_config *cfg, ablation_plan *p) {
    memset(p, 0, sizeof *p);
    p->n_layers = cfg->n_layers;
    p->n_heads = cfg->n_heads;
    p->layer_rules = ep_calloc((size_t)cfg->n_layers, sizeof(edge_rule_set));
}

void plan_empty(const model_config *cfg, ablation_plan *p) {
    plan_init(cfg, p);
    snprintf(p->name, sizeof p->name, "clean");
}

static int add_rule(ablation_plan *p, const char *where, const edge_rule *r, const uint64_t *layers, ep_error *err) {
    for (int l = 0; l < p->n_layers; l++) {
        if (!((layers[l >> 6] >> (l & 63)) & 1)) continue;
        edge_rule_set *set = &p->layer_rules[l];
        if (set->n == EDGE_MAX_RULES) return ep_fail(err, "%s: more than %d rules apply to layer %d", where, EDGE_MAX_RULES, l);
        set->rule[set->n++] = *r;
    }
    if (r->donor + 1 > p->n_donors) p->n_donors = r->donor + 1;
    p->n_rules++;
    return 0;
}

static int parse_donor(json_t *v, const char *where, const char *field, int *donor, ep_error *err) {
    if (!v) {
        *donor = 0;
        return 0;
    }
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= 16)
        return ep_fail(err, "%s: %s: expected a donor index in 0..15", where, field);
    *donor = (int)json_integer_value(v);
    return 0;
}

// A rule's "intervention" (absent: kv).
static int parse_source(json_t *v, const char *where, const char *field, int16_t *source, ep_error *err) {
    int s = v ? edge_source_parse(json_string_value(v)) : EDGE_SRC_KV;
    if (s < 0) return ep_fail(err, "%s: %s: expected \"kv\", \"k\", \"v\" or \"zero\"", where, field);
    *source = (int16_t)s;
    return 0;
}

int plan_parse(json_t *j, const char *where, const model_config *cfg, ablation_plan *p, ep_error *err) {
    plan_init(cfg, p);
    if (!json_is_object(j)) {
        plan_free(p);
        return ep_fail(err, "%s: a plan is a JSON object with rules and heads", where);
    }
    const char *name = json_string_value(json_object_get(j, "name"));
    snprintf(p->name, sizeof p->name, "%s", name ? name : "plan");
    json_t *rules = json_object_get(j, "rules"), *heads = json_object_get(j, "heads");
    int rc = 0;
    if ((rules && !json_is_array(rules)) || (heads && !json_is_array(heads)))
        rc = ep_fail(err, "%s: rules and heads must be lists", where);
    size_t i;
    json_t *e;
    char field[64];
    json_array_foreach(rules, i, e) {
        if (rc) break;
        edge_rule r = {0};
        uint64_t layers[EDGE_MAX_HEADS / 64];
        const char *rel = json_string_value(json_object_get(e, "relation"));
        snprintf(field, sizeof field, "rules[%zu]", i);
        if (!json_is_object(e)) {
            rc = ep_fail(err, "%s: %s: expected an object", where, field);
            break;
        }
        if (!rel || !strcmp(rel, "any")) r.relation = REL_ANY;
        else if (!strcmp(rel, "same")) r.relation = REL_SAME;
        else if (!strcmp(rel, "earlier")) r.relation = REL_EARLIER;
        else {
            rc = ep_fail(err, "%s: %s.relation: '%s' is not any, same or earlier", where, field, rel);
            break;
        }
        if (cfg->n_layers > EDGE_MAX_HEADS || cfg->n_heads > EDGE_MAX_HEADS) {
            rc = ep_fail(err, "%s: at most %d layers and heads are supported", where, EDGE_MAX_HEADS);
            break;
        }
        char sub[96];
        snprintf(sub, sizeof sub, "%s.sender", field);
        rc = parse_types(json_object_get(e, "sender"), where, sub, &r.sender_types, err);
        snprintf(sub, sizeof sub, "%s.receiver", field);
        if (!rc) rc = parse_types(json_object_get(e, "receiver"), where, sub, &r.receiver_types, err);
        snprintf(sub, sizeof sub, "%s.layers", field);
        if (!rc) rc = parse_indices(json_object_get(e, "layers"), where, sub, cfg->n_layers, layers, err);
        snprintf(sub, sizeof sub, "%s.heads", field);
        if (!rc) rc = parse_indices(json_object_get(e, "heads"), where, sub, cfg->n_heads, r.heads, err);
        snprintf(sub, sizeof sub, "%s.intervention", field);
        if (!rc) rc = parse_source(json_object_get(e, "intervention"), where, sub, &r.source, err);
        snprintf(sub, sizeof sub, "%s.donor", field);
        if (!rc && r.source == EDGE_SRC_ZERO && json_object_get(e, "donor"))
            rc = ep_fail(err, "%s: %s: a zero rule removes its edges and reads no donor; leave donor out", where, sub);
        if (!rc) rc = r.source == EDGE_SRC_ZERO ? (r.donor = -1, 0) : parse_donor(json_object_get(e, "donor"), where, sub, &r.donor, err);
        if (!rc) rc = add_rule(p, where, &r, layers, err);
    }
    p->head_units = ep_calloc(json_array_size(heads) + 1, sizeof(head_unit));
    json_array_foreach(heads, i, e) {
        if (rc) break;
        head_unit h;
        json_t *jl = json_object_get(e, "layer"), *jh = json_object_get(e, "head");
        const char *type = json_string_value(json_object_get(e, "type"));
        if (!json_is_integer(jl) || !json_is_integer(jh) || json_integer_value(jl) < 0 ||
            json_integer_value(jl) >= cfg->n_layers || json_integer_value(jh) < 0 || json_integer_value(jh) >= cfg->n_heads) {
            rc = ep_fail(err, "%s: heads[%zu]: layer must be in 0..%d and head in 0..%d", where, i, cfg->n_layers - 1,
                         cfg->n_heads - 1);
            break;
        }
        if (!type || parse_type(type, &h.type)) {
            rc = ep_fail(err, "%s: heads[%zu].type: expected a token type", where, i);
            break;
        }
        snprintf(field, sizeof field, "heads[%zu].donor", i);
        if ((rc = parse_donor(json_object_get(e, "donor"), where, field, &h.donor, err))) break;
        h.layer = (int)json_integer_value(jl);
        h.head = (int)json_integer_value(jh);
        p->head_units[p->n_head_units++] = h;
        if (h.donor + 1 > p->n_donors) p->n_donors = h.donor + 1;
    }
    if (rc) plan_free(p);
    return rc;
}

// One "sender,receiver" pair (a string or a list) with a donor, as the original's affect_whom had.
static int add_pair(ablation_plan *p, const char *where, json_t *pair, int donor, ep_error *err) {
    char sender[64], receiver[64];
    if (json_is_string(pair)) {
        const char *s = json_string_value(pair), *comma = strchr(s, ',');
        if (!comma || comma - s >= 64 || strlen(comma + 1) >= 64) return ep_fail(err, "%s: '%s' is not \"sender,receiver\"", where, s);
        snprintf(sender, sizeof sender, "%.*s", (int)(comma - s), s);
        snprintf(receiver, sizeof receiver, "%s", comma + 1);
    } else if (json_is_array(pair) && json_array_size(pair) >= 2 && json_is_string(json_array_get(pair, 0)) &&
               json_is_string(json_array_get(pair, 1))) {
        snprintf(sender, sizeof sender, "%s", json_string_value(json_array_get(pair, 0)));
        snprintf(receiver, sizeof receiver, "%s", json_string_value(json_array_get(pair, 1)));
        if (json_array_size(pair) == 3 && parse_donor(json_array_get(pair, 2), where, "donor", &donor, err)) return -1;
    } else {
        return ep_fail(err, "%s: expected [sender, receiver] pairs", where);
    }
    // strip blanks and the parentheses/quotes of a stringified Python tuple "('y', 'last')"
    char *parts[2] = {sender, receiver};
    for (int k = 0; k < 2; k++) {
        char *src = parts[k], *dst = parts[k];
        for (; *src; src++)
            if (!strchr(" ()'\"", *src)) *dst++ = *src;
        *dst = 0;
    }
    edge_rule r = {.relation = REL_ANY, .donor = donor};
    int ts, tr;
    if (parse_type(sender, &ts) || parse_type(receiver, &tr))
        return ep_fail(err, "%s: '%s' -> '%s': unknown token type", where, sender, receiver);
    r.sender_types = 1u << ts;
    r.receiver_types = 1u << tr;
    uint64_t all_layers[EDGE_MAX_HEADS / 64];
    parse_indices(NULL, where, "layers", p->n_layers, all_layers, err);
    parse_indices(NULL, where, "heads", p->n_heads, r.heads, err);
    return add_rule(p, where, &r, all_layers, err);
}

static int add_part(ablation_plan *p, const char *where, json_t *part, ep_error *err) {
    const char *key;
    json_t *v;
    size_t i;
    if (json_is_object(part)) {
        json_object_foreach(part, key, v) {
            int donor = 0;
            if (parse_donor(v, where, key, &donor, err)) return -1;
            json_t *k = json_string(key);
            int rc = add_pair(p, where, k, donor, err);
            json_decref(k);
            if (rc) return -1;
        }
        return 0;
    }
    if (!json_is_array(part)) return ep_fail(err, "%s: expected a map or a list of [sender, receiver, donor]", where);
    json_array_foreach(part, i, v) if (add_pair(p, where, v, 0, err)) return -1;
    return 0;
}

int plan_from_affect_whom(json_t *aw, const char *where, const model_config *cfg, ablation_plan *p, ep_error *err) {
    plan_init(cfg, p);
    snprintf(p->name, sizeof p->name, "affect_whom");
    p->head_units = ep_calloc(1, sizeof(head_unit));
    int rc = 0;
    if (!aw || json_is_null(aw)) return 0;
    if (json_is_array(aw)) {
        size_t i;
        json_t *e;
        json_array_foreach(aw, i, e) if ((rc = add_pair(p, where, e, 0, err))) break;
    } else if (json_is_object(aw) && (json_object_get(aw, "ablate") || json_object_get(aw, "curcuit") || json_object_get(aw, "circuit"))) {
        json_t *circuit = json_object_get(aw, "curcuit");
        if (!circuit) circuit = json_object_get(aw, "circuit");
        if (json_object_get(aw, "ablate")) rc = add_part(p, where, json_object_get(aw, "ablate"), err);
        if (!rc && circuit) rc = add_part(p, where, circuit, err);
    } else {
        rc = ep_fail(err, "%s: affect_whom: expected a list of [sender, receiver] pairs or {\"ablate\", \"curcuit\"}", where);
    }
    if (rc) plan_free(p);
    return rc;
}

void plan_free(ablation_plan *p) {
    free(p->layer_rules);
    free(p->head_units);
    memset(p, 0, sizeof *p);
}

void plan_donor0_part(const ablation_plan *p, ablation_plan *out) {
    memset(out, 0, sizeof *out);
    snprintf(out->name, sizeof out->name, "%.100s (donor 0 part)", p->name);
    out->n_layers = p->n_layers;
    out->layer_rules = ep_calloc((size_t)p->n_layers + 1, sizeof(edge_rule_set));
    for (int l = 0; l < p->n_layers; l++)
        for (int r = 0; r < p->layer_rules[l].n; r++)
            if (p->layer_rules[l].rule[r].donor == 0 && p->layer_rules[l].rule[r].source != EDGE_SRC_ZERO)
                out->layer_rules[l].rule[out->layer_rules[l].n++] = p->layer_rules[l].rule[r];
    out->head_units = ep_calloc((size_t)p->n_head_units + 1, sizeof(head_unit));
    for (int u = 0; u < p->n_head_units; u++)
        if (p->head_units[u].donor == 0) out->head_units[out->n_head_units++] = p->head_units[u];
    out->n_donors = 1;
}

static int unit_int(json_t *u, size_t k, int lo, int hi, int *out) {
    json_t *v = json_array_get(u, k);
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi) return -1;
    *out = (int)json_integer_value(v);
    return 0;
}

int plan_circuit_masks(const model_config *cfg, const ablation_plan *base, const unsigned char *kept_heads,
                       const unsigned char *kept_edges, ablation_plan *out, ep_error *err) {
    plan_init(cfg, out);
    snprintf(out->name, sizeof out->name, "circuit");
    int L = cfg->n_layers, H = cfg->n_heads, NT = PLAN_CIRCUIT_TYPES, rc = 0;
    if (L > EDGE_MAX_HEADS || H > EDGE_MAX_HEADS) {
        plan_free(out);
        return ep_fail(err, "circuit: at most %d layers and heads are supported", EDGE_MAX_HEADS);
    }
    memcpy(out->layer_rules, base->layer_rules, sizeof(edge_rule_set) * (size_t)L);
    out->n_rules = base->n_rules;
    out->circuit_source = base->circuit_source;
    out->n_donors = base->n_donors > 1 ? base->n_donors : 1;
    if (kept_edges) {
        // One keep rule (donor -1) per layer and (sender, receiver) with the heads that keep it, then one
        // "ablate the rest" rule; at most NT * NT + 1 rules per layer.
        for (int l = 0; l < L && rc == 0; l++) {
            uint64_t layers[EDGE_MAX_HEADS / 64] = {0};
            layers[l >> 6] = 1ull << (l & 63);
            for (int a = 0; a < PLAN_EDGE_TYPES && rc == 0; a++)
                for (int b = 0; b < PLAN_EDGE_TYPES && rc == 0; b++) {
                    edge_rule r = {.sender_types = 1u << a, .receiver_types = 1u << b, .relation = REL_ANY, .donor = -1};
                    int any = 0;
                    for (int h = 0; h < H; h++)
                        if (kept_edges[(((size_t)l * H + h) * PLAN_EDGE_TYPES + a) * PLAN_EDGE_TYPES + b]) {
                            r.heads[h >> 6] |= 1ull << (h & 63);
                            any = 1;
                        }
                    if (any) rc = add_rule(out, "circuit", &r, layers, err);
                }
        }
        if (rc == 0) {
            // ablate the rest: donor 0's key and/or value, or removed (no donor) as the base says
            int zero = base->circuit_source == EDGE_SRC_ZERO;
            edge_rule all = {.sender_types = (1u << TT_COUNT) - 1, .receiver_types = (1u << TT_COUNT) - 1, .relation = REL_ANY,
                             .source = (int16_t)base->circuit_source, .donor = zero ? -1 : 0};
            uint64_t layers[EDGE_MAX_HEADS / 64];
            parse_indices(NULL, "circuit", "layers", L, layers, err);
            parse_indices(NULL, "circuit", "heads", H, all.heads, err);
            rc = add_rule(out, "circuit", &all, layers, err);
        }
    }
    // Head units: the base's, then the complement of the kept ones over (layer, head, prompt type).
    out->head_units = ep_calloc((size_t)base->n_head_units + (size_t)L * H * NT + 1, sizeof(head_unit));
    if (base->n_head_units) memcpy(out->head_units, base->head_units, sizeof(head_unit) * (size_t)base->n_head_units);
    out->n_head_units = base->n_head_units;
    if (kept_heads)
        for (int l = 0; l < L; l++)
            for (int h = 0; h < H; h++)
                for (int t = 0; t < NT; t++)
                    if (!kept_heads[((size_t)l * H + h) * NT + t])
                        out->head_units[out->n_head_units++] = (head_unit){.layer = l, .head = h, .type = t, .donor = 0};
    if (rc) plan_free(out);
    return rc;
}

int plan_circuit(json_t *circuit, const char *where, const model_config *cfg, const ablation_plan *base,
                 ablation_plan *out, ep_error *err) {
    json_t *heads = json_object_get(circuit, "heads"), *edges = json_object_get(circuit, "edges");
    int L = cfg->n_layers, H = cfg->n_heads, NT = PLAN_CIRCUIT_TYPES, ET = PLAN_EDGE_TYPES, rc = 0;
    if (!json_is_object(circuit) || (!json_is_array(heads) && !json_is_array(edges)))
        return ep_fail(err, "%s: expected {\"heads\": [[layer, head, type], ...], \"edges\": [[layer, head, sender, receiver], ...]}", where);
    unsigned char *kept_heads = json_is_array(heads) ? ep_calloc((size_t)L * H * NT, 1) : NULL;
    unsigned char *kept_edges = json_is_array(edges) ? ep_calloc((size_t)L * H * ET * ET, 1) : NULL;
    size_t i;
    json_t *u;
    json_array_foreach(edges, i, u) {
        int l, h, ts, tr;
        if (!json_is_array(u) || json_array_size(u) != 4 || unit_int(u, 0, 0, L - 1, &l) || unit_int(u, 1, 0, H - 1, &h) ||
            !json_is_string(json_array_get(u, 2)) || !json_is_string(json_array_get(u, 3)) ||
            parse_type(json_string_value(json_array_get(u, 2)), &ts) || parse_type(json_string_value(json_array_get(u, 3)), &tr)) {
            rc = ep_fail(err, "%s: edges[%zu]: expected [layer 0..%d, head 0..%d, sender type, receiver type]", where, i, L - 1, H - 1);
            break;
        }
        kept_edges[(((size_t)l * H + h) * ET + ts) * ET + tr] = 1;
    }
    json_array_foreach(heads, i, u) {
        int l, h, t;
        if (rc) break;
        if (!json_is_array(u) || json_array_size(u) != 3 || unit_int(u, 0, 0, L - 1, &l) || unit_int(u, 1, 0, H - 1, &h) ||
            !json_is_string(json_array_get(u, 2)) || parse_type(json_string_value(json_array_get(u, 2)), &t) || t >= NT) {
            rc = ep_fail(err, "%s: heads[%zu]: expected [layer 0..%d, head 0..%d, prompt token type]", where, i, L - 1, H - 1);
            break;
        }
        kept_heads[((size_t)l * H + h) * NT + t] = 1;
    }
    if (rc == 0) rc = plan_circuit_masks(cfg, base, kept_heads, kept_edges, out, err);
    free(kept_heads), free(kept_edges);
    return rc;
}

// The plan of the run mode (mode, affect_whom, plan), before any circuit.
static int mode_plan(const run_config *rc, const model_config *cfg, ablation_plan *p, ep_error *err);

int plan_from_run_config(const run_config *rc, const model_config *cfg, ablation_plan *p, ep_error *err) {
    if (!rc->circuit) {
        if (mode_plan(rc, cfg, p, err)) return -1;
        p->circuit_source = rc->edge_intervention;  // the circuits the score and prune stages build on it
        return 0;
    }
    ablation_plan base;
    if (mode_plan(rc, cfg, &base, err)) return -1;
    base.circuit_source = rc->edge_intervention;
    char where[600];
    snprintf(where, sizeof where, "%s: field circuit", rc->path);
    int r = plan_circuit(rc->circuit, where, cfg, &base, p, err);
    plan_free(&base);
    return r;
}

// The forms of plan and affect_whom for the mode were checked by run_config_parse.
static int mode_plan(const run_config *rc, const model_config *cfg, ablation_plan *p, ep_error *err) {
    char where[600];
    if (rc->plan) {
        snprintf(where, sizeof where, "%s: field plan", rc->path);
        return plan_parse(rc->plan, where, cfg, p, err);
    }
    snprintf(where, sizeof where, "%s: field affect_whom", rc->path);
    if (rc->mode == RUN_MODE_CALC_ACCURACY) {
        plan_empty(cfg, p);
        return 0;
    }
    // pruning starts from the affect_whom edges already ablated (none when absent)
    return plan_from_affect_whom(rc->affect_whom, where, cfg, p, err);
}

int plan_list_from_run_config(const run_config *rc, const model_config *cfg, ablation_plan **list, int *n,
                              ep_error *err) {
    *list = NULL;
    *n = 0;
    if (!rc->n_ablations) return 0;
    ablation_plan *l = ep_calloc((size_t)rc->n_ablations + 1, sizeof *l);
    int status = 0;
    for (int i = 0; i < rc->n_ablations; i++) {
        char where[600];
        snprintf(where, sizeof where, "%s: field ablations[%d]", rc->path, i);
        if ((status = plan_parse(rc->ablations[i].plan, where, cfg, &l[i], err))) break;
        *n = i + 1;
        if (l[i].n_donors > 1) {
            status = ep_fail(err, "%s: reads donor %d; ablations may read donor 0 only", where, l[i].n_donors - 1);
            break;
        }
    }
    if (status) {
        plan_list_free(l, *n);
        *n = 0;
        return -1;
    }
    *list = l;
    return 0;
}

void plan_list_free(ablation_plan *list, int n) {
    for (int i = 0; i < n; i++) plan_free(&list[i]);
    free(list);
}

uint64_t plan_hash(const ablation_plan *p) {
    uint64_t h = hash_bytes(HASH_INIT, p->layer_rules, sizeof(edge_rule_set) * (size_t)p->n_layers);
    h = hash_bytes(h, p->head_units, sizeof(head_unit) * (size_t)p->n_head_units);
    if (p->circuit_source != EDGE_SRC_KV) h = hash_bytes(h, &(int32_t){p->circuit_source}, sizeof(int32_t));
    return h;
}
