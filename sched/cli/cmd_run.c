// edgepatch run CONFIG [--until STAGE] [--fresh]: runs or resumes a config's stages in order, alone or
// as one rank of an MPI job: argument parsing and the messages; the sequence is sched/run.h.
#include <stdio.h>
#include <string.h>

#include "pipeline/log.h"
#include "sched/cli/cli.h"
#include "sched/run.h"

static const char usage[] =
    "usage: edgepatch run CONFIG [--until STAGE] [--fresh]\n"
    "\n"
    "Runs the stages of the run described by CONFIG (JSON) in order, skipping work whose complete output\n"
    "already matches its inputs, so a killed run resumes where it stopped.\n"
    "  --until STAGE  stop after STAGE: tokenize, cache, patch, score (round 0's scores) or prune (every\n"
    "                 round; docs/pruning.md)\n"
    "  --fresh        rebuild outputs even if they exist (needed when inputs changed); a rerun without it\n"
    "                 resumes an interrupted --fresh run\n"
    "Once the patch stage is done, the run ends with its report (see edgepatch report --help).\n"
    "\n"
    "Under mpirun or srun the cache and patch stages are shared out over the ranks by work item (a batch\n"
    "of batch_size prompts); the outputs are identical for any number of ranks (docs/distribution.md).\n"
    "With tensor_parallel T in CONFIG, groups of T ranks split one model between them (docs/tensor_parallel.md).\n"
    "SIGTERM or SIGUSR1 stops the run after the items in flight: exit status 75, rerun to resume.\n"
    "Exit status: 0 done, 1 failed, 2 usage, 75 interrupted (rerun to resume).\n";

int cmd_run(int argc, char **argv) {
    if (cli_wants_help(argc, argv)) {
        fputs(usage, stdout);
        return 0;
    }
    const char *config = NULL, *until = "prune";
    int fresh = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--fresh")) fresh = 1;
        else if (!strcmp(argv[i], "--until") && i + 1 < argc) until = argv[++i];
        else if (argv[i][0] == '-' || config) {
            fprintf(stderr, "edgepatch run: unexpected argument '%s' (see --help)\n", argv[i]);
            return 2;
        } else config = argv[i];
    }
    int last = run_stage_from_name(until);
    if (!config || last < 0) {
        fprintf(stderr, "edgepatch run: need CONFIG%s (see --help)\n", last < 0 ? " and a known --until stage" : "");
        return 2;
    }
    sched_ctx sc;
    ep_error err = {{0}};
    if (sched_init(&sc, &argc, &argv, &err)) {
        fprintf(stderr, "edgepatch run: %s\n", err.msg);
        return 1;
    }
    // The stages', the driver's and these lines: results to stdout, the rest to stderr (pipeline/log.h).
    ep_log log;
    ep_log_init(&log, stdout, stderr);
    if (ep_log_configure(&log, sc.rank, sc.size, &err)) {
        if (sc.rank == 0) fprintf(stderr, "edgepatch run: %s\n", err.msg);
        sched_finalize(&sc, 2);
        return 2;
    }
    sc.log = &log;
    int status = run_pipeline(&sc, config, (run_stage)last, fresh, stdout, &err), rc = 0;
    if (status == SCHED_FAILED) {
        if (sc.rank == 0) ep_logf(&log, EP_LOG_ERROR, "edgepatch run: %s", err.msg[0] ? err.msg : "stopped because another rank failed");
        rc = 1;
    } else if (status == SCHED_STOPPED) {
        if (sc.rank == 0)
            ep_logf(&log, EP_LOG_ERROR, "edgepatch run: interrupted by a signal; finished items are saved, run the same "
                    "command again to resume (exit status %d)", SCHED_EXIT_INTERRUPTED);
        rc = SCHED_EXIT_INTERRUPTED;
    }
    sched_finalize(&sc, rc);
    return rc;
}
