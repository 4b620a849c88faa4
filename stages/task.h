// task: an ICL task described by data (datasets/tasks/<name>.json): its pair list, prompt template,
// number of demonstrations and the donor kinds it offers. Adding a task needs a JSON file, no C code.
//
// Task file fields: name, title, pairs (path relative to the task file, a JSON list of objects),
// input / output (which fields of a pair object are x and y; Copying uses "input" for both),
// separator (t, default ":"), output_prefix (put before y, default " "), example_separator (n, default
// "\n"), n_shots (default 10), donor_kinds (list, index 0 is the default), words (word list for random
// donors), donor_tasks (names of the tasks whose inputs / outputs the other_task_x / other_task_y donors
// take; required by those kinds; their pair lists are loaded with this task), and for the ambiguous task ambiguous_pairs + ambiguous_fraction (the share of demonstrations
// drawn from pairs whose output equals the input; queries always come from pairs whose output differs).
// Pair objects flagged "suspect" are skipped. An unknown field, or a string field given another type,
// is an error. Errors name the task file and the field.
#ifndef EP_TASK_H
#define EP_TASK_H

#include "pipeline/error.h"

typedef enum {
    DONOR_RANDOM_XY,    // random words for x and y
    DONOR_RANDOM_Y,     // random words for y only
    DONOR_RANDOM_X,     // random words for x only
    DONOR_OTHER_PAIRS,  // other pairs of the same task
    DONOR_SHUFFLE_Y,    // outputs shuffled among the demonstrations
    DONOR_OTHER_TASK_X,  // inputs from another task's input space (donor_tasks), outputs kept
    DONOR_OTHER_TASK_Y,  // outputs from another task's output space (donor_tasks), inputs kept
    DONOR_OTHER_MAPPING,    // inputs kept, outputs of other pairs of the same task: the mapping differs
    DONOR_OTHER_MAPPING_X,  // outputs kept, inputs of other pairs of the same task: the mapping differs
    DONOR_MEAN,  // no corrupted prompt: the mean over the run's prompts of the clean activations at the same
                 // token type, example index and offset in the span (stages/mean_donor.h); tokens = the clean
    DONOR_KIND_COUNT
} donor_kind;

const char *donor_kind_name(donor_kind k);
int donor_kind_parse(const char *s, donor_kind *out);
// 1 for the kinds that draw from the task's donor_tasks.
int donor_kind_needs_donor_tasks(donor_kind k);

enum { TASK_MAX_DONOR_TASKS = 8 };

typedef struct {
    char *x, *y;
} task_pair;

typedef struct {
    char *name, *title, *path;
    task_pair *pairs;  // ordinary pairs (for the ambiguous task: those whose output differs from the input)
    int n_pairs;
    task_pair *ambiguous;  // pairs whose output equals the input (ambiguous task only)
    int n_ambiguous;
    double ambiguous_fraction;
    char *separator, *output_prefix, *example_separator;
    int n_shots;
    donor_kind kinds[DONOR_KIND_COUNT];
    int n_kinds;
    char *words_path;
    int n_donor_tasks;
    char *donor_task_paths[TASK_MAX_DONOR_TASKS];  // the donor tasks' files (their contents are inputs too)
    task_pair *donor_pairs;  // every pair of every donor task (ordinary pairs), in donor_tasks order
    int n_donor_pairs;
} task;

// name_or_path: a task name (looked up as tasks/<name>.json in the data folder; '-' and '_' and case
// are interchangeable) or a path to a task file.
int task_load(const char *name_or_path, task *t, ep_error *err);
void task_free(task *t);
// 0 if the task can build donors of kind k, else an error naming the task file's field that is missing.
int task_check_kind(const task *t, donor_kind k, ep_error *err);
// Names of the tasks in the data folder's tasks/ (sorted); free with task_names_free.
int task_names(char ***names, int *n, ep_error *err);
void task_names_free(char **names, int n);

// A word list: one word per line; only lowercase alphabetic words of 2 to 254 letters are kept (random
// replacement words should be ordinary words, not names or possessives; a longer line is skipped whole).
typedef struct {
    char **words;
    int n;
} word_list;

int word_list_load(const char *path, word_list *w, ep_error *err);
void word_list_free(word_list *w);

#endif
