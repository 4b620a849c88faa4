// edgepatch run CONFIG [--until STAGE] [--fresh] [--json]: runs or resumes a config's stages in order,
// alone or as one rank of an MPI job: argument parsing and the messages; the sequence is sched/run.h.
#include <stdio.h>
#include <string.h>

#include "pipeline/log.h"
#include "sched/cli/cli.h"
#include "sched/cli/results.h"
#include "sched/run.h"

static const char usage[] =
    "usage: edgepatch run CONFIG [-u|--until STAGE] [-f|--fresh] [-j|--json]\n"
    "\n"
    "Runs the stages of the run described by CONFIG (JSON) in order, skipping work whose complete output\n"
    "already matches its inputs, so a killed run resumes where it stopped.\n"
    "  -u, --until STAGE  stop after STAGE: tokenize, cache, patch, score (round 0's scores), prune\n"
    "                     (every round; docs/pruning.md) or fv (function vectors, when CONFIG has a\n"
    "                     function_vectors block: the default; docs/function_vectors.md)\n"
    "  -f, --fresh        rebuild outputs even if they exist (needed when inputs changed); a rerun without\n"
    "                     it resumes an interrupted --fresh run\n"
    "  -j, --json         a JSON summary on stdout when the run ends (whatever its outcome): the stages\n"
    "                     computed or up to date, the output folder, the status and the key figures\n"
    "                     (docs/cli.md); the stages' lines and the report go to stderr instead\n"
    "  -h, --help         this text\n"
    "Once the patch stage is done, the run ends with its report (see edgepatch report --help).\n"
    "\n"
    "Under mpirun or srun the cache and patch stages are shared out over the ranks by work item (a batch\n"
    "of batch_size prompts); the outputs are identical for any number of ranks (docs/distribution.md).\n"
    "With tensor_parallel T in CONFIG, groups of T ranks split one model between them (docs/tensor_parallel.md).\n"
    "SIGTERM or SIGUSR1 stops the run after the items in flight: exit status 75, rerun to resume.\n"
    "Exit status: 0 done, 1 failed, 2 usage, 75 interrupted (rerun to resume).\n";

static const char *const state_names[] = {"not reached", "up to date", "computed"};

// The --json summary (docs/cli.md).
static void print_summary(const char *config, run_stage last, int fresh, int ranks, int status, int rc,
                          const run_summary *sum, const ep_error *err) {
    json_t *stages = json_array();
    for (int s = 0; s < RUN_N_STAGES; s++) {
        const char *state = s > (int)last ? "not requested" : state_names[sum->state[s]];
        json_t *o = json_pack("{s:s,s:s}", "name", run_stage_name((run_stage)s), "state", state);
        if (s != RUN_TOKENIZE && sum->state[s] != RUN_NOT_REACHED) {
            json_object_set_new(o, "items", json_integer(sum->items[s]));
            json_object_set_new(o, "computed", json_integer(sum->computed[s]));
        }
        json_array_append_new(stages, o);
    }
    json_t *results = NULL;
    ep_error rerr = {{0}};
    if (sum->output_path[0] && run_results_json(sum->output_path, &results, &rerr)) results = NULL;
    const char *word = status == SCHED_OK ? "done" : status == SCHED_STOPPED ? "interrupted" : "failed";
    json_t *o = json_pack("{s:s,s:s?,s:s,s:b,s:i,s:s,s:i,s:o}", "config", config, "output_path",
                          sum->output_path[0] ? sum->output_path : NULL, "until", run_stage_name(last), "fresh", fresh,
                          "ranks", ranks, "status", word, "exit_status", rc, "stages", stages);
    json_object_set_new(o, "error", status == SCHED_FAILED ? json_string(err->msg[0] ? err->msg : "another rank failed") : json_null());
    json_object_set_new(o, "results", results ? results : json_null());
    cli_print_json(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(9));
}

int cmd_run(int argc, char **argv) {
    static const struct option options[] = {{"until", required_argument, NULL, 'u'}, {"fresh", no_argument, NULL, 'f'},
                                            {"json", no_argument, NULL, 'j'}, CLI_HELP_OPTION, {0}};
    const char *until = "fv";
    int fresh = 0, as_json = 0;
    cli_args a;
    cli_args_init(&a, "run", usage, argc, argv, options);
    for (int c; (c = cli_next(&a)) != CLI_END;) switch (c) {
            case 'u': until = a.value; break;
            case 'f': fresh = 1; break;
            case 'j': as_json = 1; break;
            default: return cli_args_exit(&a, c);
        }
    if (cli_exactly_one(&a, "CONFIG")) return 2;
    int last = run_stage_from_name(until);
    if (last < 0)
        return cli_usage_error(&a, "--until: unknown stage '%s' (tokenize, cache, patch, score, prune or fv)", until);
    if (cli_parse_only()) return cli_args_done(&a);
    const char *config = a.positional[0];
    cli_args_free(&a);
    sched_ctx sc;
    ep_error err = {{0}};
    if (sched_init(&sc, &argc, &argv, &err)) {
        fprintf(stderr, "edgepatch run: %s\n", err.msg);
        return 1;
    }
    // The stages', the driver's and these lines: results to stdout, the rest to stderr (pipeline/log.h);
    // with --json stdout holds the summary alone.
    ep_log log;
    ep_log_init(&log, as_json ? stderr : stdout, stderr);
    if (ep_log_configure(&log, sc.rank, sc.size, &err)) {
        if (sc.rank == 0) fprintf(stderr, "edgepatch run: %s\n", err.msg);
        sched_finalize(&sc, 2);
        return 2;
    }
    sc.log = &log;
    run_summary sum;
    int status = run_pipeline(&sc, config, (run_stage)last, fresh, as_json ? stderr : stdout, &sum, &err), rc = 0;
    if (status == SCHED_FAILED) {
        if (sc.rank == 0) ep_logf(&log, EP_LOG_ERROR, "edgepatch run: %s", err.msg[0] ? err.msg : "stopped because another rank failed");
        rc = 1;
    } else if (status == SCHED_STOPPED) {
        if (sc.rank == 0)
            ep_logf(&log, EP_LOG_ERROR, "edgepatch run: interrupted by a signal; finished items are saved, run the same "
                    "command again to resume (exit status %d)", SCHED_EXIT_INTERRUPTED);
        rc = SCHED_EXIT_INTERRUPTED;
    }
    if (as_json && sc.rank == 0) print_summary(config, (run_stage)last, fresh, sc.size, status, rc, &sum, &err);
    sched_finalize(&sc, rc);
    return rc;
}
