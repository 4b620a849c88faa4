// cli: the edgepatch subcommands, the top layer: argument parsing and printing only, over sched/ and
// the layers below (docs/architecture.md). Each takes the arguments after its name (argv[0] is the
// subcommand), prints its own --help, writes results to stdout and one-line errors to stderr, and
// returns the process exit status (0 ok, 1 bad input or failure, 2 usage error).
#ifndef EP_CLI_H
#define EP_CLI_H

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

// Shared helpers for the commands.
int cli_wants_help(int argc, char **argv);
// Parses "2,651,17" into a fresh array; returns -1 (and fills msg) on a malformed list.
int cli_parse_int_list(const char *s, int **out, int *n, char *msg, int msg_size);

#endif
