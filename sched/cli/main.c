// edgepatch: entry point. Dispatches to the subcommands of sched/cli/cli.h; everything else lives in
// the core library so that tests exercise the same code.
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
    {"run", cmd_run, "run CONFIG [--until STAGE] [--fresh]      run or resume a config's stages"},
    {"check", cmd_check, "check CONFIG|SWEEP [--json]               validate a config whole, print it resolved"},
    {"forward", cmd_forward,
     "forward --model DIR (--ids 2,651,... | --text T) [--top K] [--generate N] [--json]"},
    {"tokenize-text", cmd_tokenize_text,
     "tokenize-text --tokenizer DIR [--special] [--json] -- TEXT   (or --decode 1,2,3, or --file F)"},
    {"tasks", cmd_tasks, "tasks [--tokenizer DIR]"},
    {"show", cmd_show, "show RUN --prompt I [--json]"},
    {"convert-gguf", cmd_convert_gguf, "convert-gguf FILE.gguf OUTDIR               a llama.cpp Llama GGUF as an HF folder"},
    {"scores", cmd_scores, "scores RUN [--round R] [--json]"},
    {"memory", cmd_memory, "memory CONFIG.json... [--tp 1,2,4,8]     weights, KV cache and attribution-batch bytes per tensor-parallel rank"},
    {"report", cmd_report, "report RUN"},
    {"sweep", cmd_sweep, "sweep plan|submit|status SWEEP"},
};

static void usage(FILE *f) {
    fprintf(f, "edgepatch %s: in-context-learning circuits by attention-edge patching\n\nusage:\n", EP_VERSION);
    for (size_t i = 0; i < sizeof subcommands / sizeof subcommands[0]; i++)
        fprintf(f, "  edgepatch %s\n", subcommands[i].usage);
    fprintf(f, "\n'edgepatch COMMAND --help' describes one command.\n");
}

int main(int argc, char **argv) {
    // Line by line even into a pipe or a Slurm log, so that stdout and stderr keep their order.
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "--version")) {
        printf("edgepatch %s\n", EP_VERSION);
        return 0;
    }
    // The front (sched/cli/launch.c) starts us with SIGTERM and SIGUSR1 blocked. run and report install
    // their handler and then unblock them (sched/signals.h); every other command takes them as usual.
    if (strcmp(argv[1], "run") && strcmp(argv[1], "report")) {
        sigset_t stop = stop_signal_set();
        sigprocmask(SIG_UNBLOCK, &stop, NULL);
    }
    for (size_t i = 0; i < sizeof subcommands / sizeof subcommands[0]; i++)
        if (!strcmp(argv[1], subcommands[i].name)) return subcommands[i].run(argc - 1, argv + 1);
    fprintf(stderr, "edgepatch: unknown command '%s' (try 'edgepatch --help')\n", argv[1]);
    return 2;
}
