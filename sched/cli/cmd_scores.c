// edgepatch scores RUN [--round R] [--json]: one round's importance scores and kept set
// (RUN/prune.d/round-NNN.h5, stages/circuit_file.h), the last finished round by default.
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sched/cli/cli.h"
#include "stages/circuit_file.h"
#include "stages/prompts.h"
#include "stages/rank.h"

static const char usage[] =
    "usage: edgepatch scores RUN [-r|--round R] [-j|--json]\n"
    "\n"
    "Shows the importance scores of round R (default: the last finished round) of the run folder RUN:\n"
    "every unit of the circuit the round scored, highest score first, and whether it was kept.\n"
    "  -r, --round R  the round to show (default: the last finished one)\n"
    "  -h, --help     this text\n"
    "  -j, --json     {\"round\": r, \"kind\": \"head\"|\"edge\", \"method\": \"attribution\"|\"exact\"|\"eap-ig\", \"units\":\n"
    "                 [{\"layer\", \"head\", \"type\" (head units) or \"sender\", \"receiver\" (edge units), \"score\"}, ...],\n"
    "           \"kept\": [units kept after the round, same form without score], \"stop\": \"...\",\n"
    "           \"metrics\": {\"circuit\", \"kept\", \"clean\": {\"target_logprob\", \"first_token_accuracy\",\n"
    "           \"logit_diff\"}},\n"
    "           \"compare\" (compare_importance runs): {\"method\": the other method, \"scores\": [per unit, in\n"
    "           the order of units], \"spearman\", \"spearman_abs_exact\", \"top_k\", \"top_k_overlap\" (attribution's\n"
    "           agreement with exact); eap-ig rounds add \"attribution_scores\" and \"eap_ig\": {EAP-IG's four}},\n"
    "           \"ig_steps\" (eap-ig rounds)}\n";

static json_t *unit_json(const prune_round *r, int i, int with_score) {
    const circuit_unit *u = &r->units[i];
    json_t *o = json_pack("{s:i,s:i}", "layer", u->layer, "head", u->head);
    if (r->kind == UNIT_HEAD) json_object_set_new(o, "type", json_string(token_type_name(u->type)));
    else {
        json_object_set_new(o, "sender", json_string(token_type_name(u->sender)));
        json_object_set_new(o, "receiver", json_string(token_type_name(u->receiver)));
    }
    if (with_score) json_object_set_new(o, "score", json_real(r->scores[i]));
    return o;
}

// Spearman is undefined (NaN) for fewer than two units or constant scores: JSON null then.
static json_t *real_or_null(double x) { return isfinite(x) ? json_real(x) : json_null(); }

int cmd_scores(int argc, char **argv) {
    static const struct option options[] = {{"round", required_argument, NULL, 'r'}, {"json", no_argument, NULL, 'j'},
                                            CLI_HELP_OPTION, {0}};
    int round = -1, as_json = 0;
    cli_args a;
    cli_args_init(&a, "scores", usage, argc, argv, options);
    for (int c; (c = cli_next(&a)) != CLI_END;) switch (c) {
            case 'r':
                if (cli_int_value(&a, "--round", 0, INT_MAX, &round)) return cli_args_exit(&a, CLI_USAGE);
                break;
            case 'j': as_json = 1; break;
            default: return cli_args_exit(&a, c);
        }
    if (cli_exactly_one(&a, "RUN, a run folder")) return 2;
    if (cli_parse_only()) return cli_args_done(&a);
    const char *run = a.positional[0];
    cli_args_free(&a);
    prune_round r;
    ep_error err = {{0}};
    if (prune_round_load(run, round, &r, &err)) {
        fprintf(stderr, "edgepatch scores: %s\n", err.msg);
        return 1;
    }
    int *order = malloc(sizeof(int) * (size_t)(r.n_units + 1));
    double *sc = malloc(sizeof(double) * (size_t)(r.n_units + 1));
    for (int i = 0; i < r.n_units; i++) sc[i] = r.scores[i];
    rank_order(sc, r.n_units, order);
    const char *kind = r.kind == UNIT_HEAD ? "head" : "edge";
    if (as_json) {
        json_t *units = json_array(), *kept = json_array();
        for (int i = 0; i < r.n_units; i++) {
            json_array_append_new(units, unit_json(&r, i, 1));
            if (circuit_has(&r.kept, r.kind, &r.units[i])) json_array_append_new(kept, unit_json(&r, i, 0));
        }
        json_t *m = json_object();
        const char *rows[3] = {"circuit", "kept", "clean"};
        for (int k = 0; k < 3; k++)
            json_object_set_new(m, rows[k], json_pack("{s:f,s:f,s:f}", "target_logprob", (double)r.metrics[k][0],
                                                      "first_token_accuracy", (double)r.metrics[k][1], "logit_diff",
                                                      (double)r.metrics[k][2]));
        json_t *o = json_pack("{s:i,s:s,s:s,s:o,s:o,s:s,s:o}", "round", r.round, "kind", kind, "method", r.method, "units",
                              units, "kept", kept, "stop", r.stop, "metrics", m);
        if (r.ig_steps) json_object_set_new(o, "ig_steps", json_integer(r.ig_steps));
        if (r.compare_scores) {
            json_t *cs = json_array();
            for (int i = 0; i < r.n_units; i++) json_array_append_new(cs, json_real(r.compare_scores[i]));
            json_object_set_new(o, "compare", json_pack("{s:s,s:o,s:o,s:o,s:i,s:i}", "method", r.compare_method, "scores", cs,
                                                        "spearman", real_or_null(r.agreement[0]), "spearman_abs_exact",
                                                        real_or_null(r.agreement[1]),
                                                        "top_k", (int)r.agreement[3], "top_k_overlap", (int)r.agreement[2]));
            if (r.has_ig_agreement) {
                json_t *c = json_object_get(o, "compare"), *as = json_array();
                for (int i = 0; i < r.n_units; i++) json_array_append_new(as, json_real(r.attribution_scores[i]));
                json_object_set_new(c, "attribution_scores", as);
                json_object_set_new(c, "eap_ig", json_pack("{s:o,s:o,s:i,s:i}", "spearman", real_or_null(r.ig_agreement[0]),
                                                           "spearman_abs_exact", real_or_null(r.ig_agreement[1]), "top_k",
                                                           (int)r.ig_agreement[3], "top_k_overlap", (int)r.ig_agreement[2]));
            }
        }
        char *text = json_dumps(o, JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(9));
        puts(text);
        free(text);
        json_decref(o);
    } else {
        int nk = 0;
        for (int i = 0; i < r.n_units; i++) nk += circuit_has(&r.kept, r.kind, &r.units[i]);
        printf("round %d: %d %s units scored by %s, %d kept%s%s\n", r.round, r.n_units, kind, r.method, nk,
               r.stop[0] ? "; stop: " : "", r.stop);
        if (r.compare_scores)
            printf("rank agreement, attribution vs exact: Spearman %.3f (with |exact| %.3f), top-%d overlap %d\n",
                   r.agreement[0], r.agreement[1], (int)r.agreement[3], (int)r.agreement[2]);
        if (r.has_ig_agreement)
            printf("rank agreement, eap-ig (%d steps) vs exact: Spearman %.3f (with |exact| %.3f), top-%d overlap %d\n",
                   r.ig_steps, r.ig_agreement[0], r.ig_agreement[1], (int)r.ig_agreement[3], (int)r.ig_agreement[2]);
        printf("metrics (target log-prob, first-token accuracy, logit diff): circuit %.4f %.3f %.4f, kept %.4f %.3f %.4f, "
               "clean %.4f %.3f %.4f\n", r.metrics[0][0], r.metrics[0][1], r.metrics[0][2], r.metrics[1][0], r.metrics[1][1],
               r.metrics[1][2], r.metrics[2][0], r.metrics[2][1], r.metrics[2][2]);
        printf("%5s %5s %4s %-18s %14s  %s\n", "rank", "layer", "head", r.kind == UNIT_HEAD ? "type" : "sender->receiver", "score", "kept");
        for (int k = 0; k < r.n_units; k++) {
            int i = order[k];
            const circuit_unit *u = &r.units[i];
            char what[48];
            if (r.kind == UNIT_HEAD) snprintf(what, sizeof what, "%s", token_type_name(u->type));
            else snprintf(what, sizeof what, "%s->%s", token_type_name(u->sender), token_type_name(u->receiver));
            printf("%5d %5d %4d %-18s %14.6g  %s\n", k + 1, u->layer, u->head, what, r.scores[i],
                   circuit_has(&r.kept, r.kind, u) ? "yes" : "no");
        }
    }
    free(order), free(sc);
    prune_round_free(&r);
    return 0;
}
