// edgepatch run CONFIG [--until STAGE] [--fresh]: runs or resumes a config's stages in order.
#include <stdio.h>
#include <string.h>

#include "pipeline/cli.h"
#include "pipeline/run_config.h"
#include "stages/cache.h"
#include "stages/patch.h"
#include "stages/stage_io.h"
#include "stages/tokenize.h"

static const char usage[] =
    "usage: edgepatch run CONFIG [--until STAGE] [--fresh]\n"
    "\n"
    "Runs the stages of the run described by CONFIG (JSON) in order, skipping work whose complete output\n"
    "already matches its inputs, so a killed run resumes where it stopped.\n"
    "  --until STAGE  stop after STAGE: tokenize, cache, patch, score or prune\n"
    "  --fresh        rebuild outputs even if they exist (needed when inputs changed)\n";

static const char *stages[] = {"tokenize", "cache", "patch", "score", "prune"};

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
    int last = -1;
    for (int s = 0; s < 5; s++)
        if (!strcmp(until, stages[s])) last = s;
    if (!config || last < 0) {
        fprintf(stderr, "edgepatch run: need CONFIG%s (see --help)\n", last < 0 ? " and a known --until stage" : "");
        return 2;
    }
    run_config cfg;
    ep_error err = {{0}};
    if (run_config_load(config, &cfg, &err)) {
        fprintf(stderr, "edgepatch run: %s\n", err.msg);
        return 1;
    }
    int rc = 0;
    stage_inputs in;
    int opened = 0;
    if (tokenize_stage(&cfg, fresh, &err)) rc = 1;
    if (rc == 0 && last >= 1) {
        opened = stage_inputs_open(&cfg, &in, &err) == 0;
        rc = !opened || cache_stage(&in, fresh, &err);
    }
    if (rc == 0 && last >= 2) rc = patch_stage(&in, fresh, &err) != 0;
    if (rc) fprintf(stderr, "edgepatch run: %s\n", err.msg);
    if (rc == 0 && last >= 3) {
        fprintf(stderr, "edgepatch run: stage %s is not available in this version yet (ran up to patch)\n", stages[3]);
        rc = 2;
    }
    if (opened) stage_inputs_close(&in);
    run_config_free(&cfg);
    return rc;
}
