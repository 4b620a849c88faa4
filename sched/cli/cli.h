// cli: the edgepatch subcommands, the top layer: argument parsing and printing only, over sched/ and
// the layers below (docs/architecture.md). Each takes the arguments after its name (argv[0] is the
// subcommand), prints its own --help, writes results to stdout and one-line errors to stderr, and
// returns the process exit status (0 ok, 1 bad input or failure, 2 usage error). docs/cli.md lists
// every command, its options, exit statuses and --json shape.
#ifndef EP_CLI_H
#define EP_CLI_H

#include <getopt.h>
#include <jansson.h>

int cmd_forward(int argc, char **argv);        // cmd_forward.c
int cmd_tokenize_text(int argc, char **argv);  // cmd_tokenize.c
int cmd_run(int argc, char **argv);            // cmd_run.c
int cmd_tasks(int argc, char **argv);          // cmd_tasks.c
int cmd_show(int argc, char **argv);           // cmd_show.c
int cmd_convert_gguf(int argc, char **argv);   // cmd_convert_gguf.c
int cmd_scores(int argc, char **argv);         // cmd_scores.c
int cmd_memory(int argc, char **argv);         // cmd_memory.c
int cmd_report(int argc, char **argv);         // cmd_report.c
int cmd_sweep(int argc, char **argv);          // cmd_sweep.c
int cmd_check(int argc, char **argv);          // cmd_check.c

// ---- Option parsing: getopt_long, GNU style, the same in every command (docs/cli.md) ----------------
// `--opt=value` and `--opt value`, short forms (`-u patch`, `-upatch`, `-jf`), unique prefixes of long
// names (`--unt=patch`), options before, between and after the positionals, `--` ends the options (what
// follows is positional even if it starts with '-'; a lone "-" is positional too). The order of
// positionals is kept and argv is not permuted; POSIXLY_CORRECT changes nothing. An unknown option, a
// missing value or an option given a value it takes none of is one line on stderr, "edgepatch CMD:
// ... (see 'edgepatch CMD --help')", and exit status 2. -h/--help prints the command's usage on stdout
// (exit 0). Use:
//
//     static const struct option options[] = {{"until", required_argument, NULL, 'u'},
//                                             {"fresh", no_argument, NULL, 'f'}, CLI_HELP_OPTION, {0}};
//     cli_args a;
//     cli_args_init(&a, "run", usage, argc, argv, options);
//     for (int c; (c = cli_next(&a)) != CLI_END;) switch (c) {
//         case 'u': until = a.value; break;
//         case 'f': fresh = 1; break;
//         default: return cli_args_exit(&a, c);  // CLI_HELP (usage printed: 0) or CLI_USAGE (2)
//     }
//     ... a.positional[0 .. a.n_positional) ...; checks of values; then
//     if (cli_parse_only()) return cli_args_done(&a);
//     ...
//     cli_args_free(&a);
//
// An option's short form is its val when val is a printable ASCII letter; long-only options use a val
// of CLI_LONG_ONLY + k. The short option string is built from the table, so one table says everything.
enum { CLI_END = -1, CLI_HELP = -2, CLI_USAGE = -3, CLI_LONG_ONLY = 256 };
#define CLI_HELP_OPTION {"help", no_argument, NULL, 'h'}

typedef struct {
    const char *command;  // "run", "sweep plan": in messages
    const char *usage;    // printed on -h/--help
    int argc;
    char **argv;
    const struct option *options;
    char shortopts[128];
    const char *value;     // the current option's value (optarg), NULL if it has none
    const char **positional;  // the positional arguments in order (argc slots)
    int n_positional;
} cli_args;

void cli_args_init(cli_args *a, const char *command, const char *usage, int argc, char **argv, const struct option *options);
// The next option's val; CLI_END when every argument is read; CLI_HELP after printing the usage on
// stdout; CLI_USAGE after printing the one-line error on stderr.
int cli_next(cli_args *a);
// The exit status for cli_next's CLI_HELP (0) or CLI_USAGE (2; any other code too); frees a.
int cli_args_exit(cli_args *a, int code);
// A usage error found by the command itself (a bad value, a missing positional): prints "edgepatch CMD:
// MESSAGE (see 'edgepatch CMD --help')" on stderr and returns 2; frees a.
int cli_usage_error(cli_args *a, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
// The one positional argument a command takes (named `what` in the message): 0 when there is exactly
// one (a.positional[0]), else the usage error's exit status 2 (a freed), as cli_usage_error.
int cli_exactly_one(cli_args *a, const char *what);
void cli_args_free(cli_args *a);

// Values. Each returns 0, or prints "edgepatch CMD: --OPT: expected ..., got 'V'" and returns -1.
int cli_int_value(cli_args *a, const char *opt, long min, long max, int *out);
int cli_double_value(cli_args *a, const char *opt, double min_exclusive, double *out);

// Parse-only mode (`edgepatch --parse-only CMD ARGS...`, tests/cli_args.sh): main sets it before the
// command runs; a command that supports it returns cli_args_done after its parse and checks of values,
// before it reads any file: "edgepatch CMD: arguments ok" on stdout, exit status 0. It is the one piece
// of process-wide state here, set once by main and read only.
void cli_set_parse_only(int on);
int cli_parse_only(void);
int cli_args_done(cli_args *a);

// Other helpers.
// Parses "2,651,17" into a fresh array; returns -1 (and fills msg) on a malformed list.
int cli_parse_int_list(const char *s, int **out, int *n, char *msg, int msg_size);
// Prints a jansson value on stdout with json_dumpf's flags and a newline, and drops the reference (the
// way --json outputs are written; NULL prints null).
void cli_print_json(json_t *value, size_t flags);

#endif
