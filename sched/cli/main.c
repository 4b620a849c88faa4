// edgepatch: entry point. Dispatches to the subcommands of sched/cli/cli.h; everything else lives in
// the core library so that tests exercise the same code.
//
// Global options come before the command: -h/--help, -V/--version, and --parse-only (the command then
// parses and checks its arguments and stops before it reads any file: tests/cli_args.sh runs every
// command line of the docs that way). `edgepatch help CMD` is `edgepatch CMD --help`.
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "sched/cli/cli.h"
#include "pipeline/stop_signals.h"

typedef struct {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *usage;
} subcommand;

static const subcommand subcommands[] = {
    {"run", cmd_run, "run CONFIG [-u|--until STAGE] [-f|--fresh] [-j|--json]     run or resume a config's stages"},
    {"check", cmd_check, "check CONFIG|SWEEP [-j|--json]       validate a config whole, print it resolved"},
    {"forward", cmd_forward,
     "forward -m|--model DIR (-i|--ids 2,651,... | --text T) [-k|--top K] [-g|--generate N] [-j|--json]"},
    {"tokenize-text", cmd_tokenize_text,
     "tokenize-text -t|--tokenizer DIR [--special] [-j|--json] -- TEXT   (or --decode 1,2,3, or --file F)"},
    {"tasks", cmd_tasks, "tasks [-t|--tokenizer DIR] [-j|--json]   the tasks and their sizes"},
    {"show", cmd_show, "show RUN -p|--prompt I [-j|--json]      one prompt's tokens, types, donors, metrics"},
    {"convert-gguf", cmd_convert_gguf, "convert-gguf FILE.gguf OUTDIR [-j|--json]   a llama.cpp Llama GGUF as an HF folder"},
    {"scores", cmd_scores, "scores RUN [-r|--round R] [-j|--json]   a pruning round's scores"},
    {"memory", cmd_memory,
     "memory CONFIG.json|MODEL_DIR... [--tp 1,2,4,8] [-j|--json]   weights, KV cache and attribution-batch bytes per rank"},
    {"report", cmd_report, "report RUN [-j|--json]                   a run's report and figures, again"},
    {"sweep", cmd_sweep, "sweep plan|submit|status SWEEP [-j|--json] [--dry-run]   a sweep on Slurm (--json: plan, status)"},
};
enum { N_SUBCOMMANDS = sizeof subcommands / sizeof subcommands[0] };

static void usage(FILE *f) {
    fprintf(f, "edgepatch %s: in-context-learning circuits by attention-edge patching\n\n"
               "usage: edgepatch [-h|--help] [-V|--version] [--parse-only] COMMAND [ARGS...]\n\ncommands:\n", EP_VERSION);
    for (int i = 0; i < N_SUBCOMMANDS; i++) fprintf(f, "  edgepatch %s\n", subcommands[i].usage);
    fprintf(f, "\n'edgepatch COMMAND --help' (or 'edgepatch help COMMAND') describes one command; docs/cli.md all of them.\n"
               "Options take '--opt value' or '--opt=value'; '--' ends them. Exit status: 0 ok, 1 failed, 2 usage.\n");
}

static const subcommand *find(const char *name) {
    for (int i = 0; i < N_SUBCOMMANDS; i++)
        if (!strcmp(name, subcommands[i].name)) return &subcommands[i];
    return NULL;
}

int main(int argc, char **argv) {
    // Line by line even into a pipe or a Slurm log, so that stdout and stderr keep their order.
    setvbuf(stdout, NULL, _IOLBF, 0);
    // The global options, before the command (the command's own come after its name).
    int first = 1, parse_only = 0;
    for (; first < argc && argv[first][0] == '-'; first++) {
        const char *o = argv[first];
        if (!strcmp(o, "--help") || !strcmp(o, "-h")) {
            usage(stdout);
            return 0;
        }
        if (!strcmp(o, "--version") || !strcmp(o, "-V")) {
            printf("edgepatch %s\n", EP_VERSION);
            return 0;
        }
        if (!strcmp(o, "--parse-only")) {
            parse_only = 1;
            continue;
        }
        if (!strcmp(o, "--")) {
            first++;
            break;
        }
        fprintf(stderr, "edgepatch: unknown option '%s' (see 'edgepatch --help')\n", o);
        return 2;
    }
    if (first >= argc) {
        usage(stderr);
        return 2;
    }
    const char *name = argv[first];
    char *help_argv[3];
    if (!strcmp(name, "help")) {  // help [COMMAND]
        if (first + 1 >= argc) {
            usage(stdout);
            return 0;
        }
        if (!find(argv[first + 1])) {
            fprintf(stderr, "edgepatch: unknown command '%s' (see 'edgepatch --help')\n", argv[first + 1]);
            return 2;
        }
        help_argv[0] = argv[first + 1], help_argv[1] = "--help", help_argv[2] = NULL;
        return find(argv[first + 1])->run(2, help_argv);
    }
    const subcommand *cmd = find(name);
    if (!cmd) {
        fprintf(stderr, "edgepatch: unknown command '%s' (see 'edgepatch --help')\n", name);
        return 2;
    }
    cli_set_parse_only(parse_only);
    // The front (sched/cli/launch.c) starts us with SIGTERM and SIGUSR1 blocked. run and report install
    // their handler and then unblock them (sched/signals.h); every other command takes them as usual.
    if (strcmp(name, "run") && strcmp(name, "report")) {
        sigset_t stop = stop_signal_set();
        sigprocmask(SIG_UNBLOCK, &stop, NULL);
    }
    return cmd->run(argc - first, argv + first);
}
