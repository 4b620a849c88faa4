// libFuzzer target: bytes as a task file, its pair list and its word list. The input is split at the
// first two lines "=====" into those three parts, each written to its own file in a per-process
// folder (/tmp/ep-fuzz-task-PID/: task.json, pairs.json, words), so a task file naming "pairs.json"
// (pairs or ambiguous_pairs) reads the second part; without a separator the parts are empty. Then
// word_list_load, task_load, and when the task loads, prompt_builder_init and one prompt_build with
// the smollm-tiny tokenizer (loaded once) and two of the donor kinds the task offers.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "pipeline/tokenizer.h"
#include "stages/prompts.h"
#include "stages/task.h"

static tokenizer *tk;
static char dir[64];

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    ep_error err = {{0}};
    if (tokenizer_load(EP_SOURCE_DIR "/tests/fixtures/models/smollm-tiny", &tk, &err)) {
        fprintf(stderr, "fuzz_task: %s\n", err.msg);
        abort();
    }
    snprintf(dir, sizeof dir, "/tmp/ep-fuzz-task-%d", (int)getpid());
    mkdir(dir, 0700);
    return 0;
}

static void put(const char *name, const uint8_t *data, size_t size) {
    char path[128];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f) abort();
    if (size && fwrite(data, 1, size, f) != size) abort();
    fclose(f);
}

static const uint8_t *find_sep(const uint8_t *p, const uint8_t *end) {
    static const char sep[] = "\n=====\n";
    for (; p + 7 <= end; p++)
        if (!memcmp(p, sep, 7)) return p;
    return NULL;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const uint8_t *end = data + size, *s1 = find_sep(data, end), *s2 = s1 ? find_sep(s1 + 7, end) : NULL;
    put("task.json", data, (size_t)((s1 ? s1 : end) - data));
    put("pairs.json", s1 ? s1 + 7 : end, s1 ? (size_t)((s2 ? s2 : end) - (s1 + 7)) : 0);
    put("words", s2 ? s2 + 7 : end, s2 ? (size_t)(end - (s2 + 7)) : 0);
    char path[128];
    ep_error err = {{0}};
    word_list words;
    snprintf(path, sizeof path, "%s/words", dir);
    int have_words = word_list_load(path, &words, &err) == 0;
    task t;
    snprintf(path, sizeof path, "%s/task.json", dir);
    if (task_load(path, &t, &err) == 0) {
        prompt_builder b;
        if (prompt_builder_init(&b, &t, tk, have_words ? &words : NULL, &err) == 0) {
            // Two shots and two of the task's donor kinds (which two varies with the input): the search for
            // same-length random words is bounded but costs ~50,000 encodes a prompt when no word fits.
            prompt_params pp = {.seed = size, .n_shots = t.n_shots < 2 ? t.n_shots : 2, .n_donors = t.n_kinds < 2 ? t.n_kinds : 2};
            for (int d = 0; d < pp.n_donors; d++) pp.kinds[d] = t.kinds[(size + (size_t)d) % (size_t)t.n_kinds];
            if (!have_words)  // random-word donors need a word list (tokenize refuses the run without one)
                for (int d = 0; d < pp.n_donors; d++)
                    if (pp.kinds[d] == DONOR_RANDOM_XY || pp.kinds[d] == DONOR_RANDOM_X || pp.kinds[d] == DONOR_RANDOM_Y)
                        pp.kinds[d] = DONOR_OTHER_PAIRS;
            // One prompt: a task whose words never fit makes prompt_build try 64 prompts x 48 words per
            // replaced span before it gives up.
            prompt p;
            if (prompt_build(&b, &pp, 0, &p, &err) == 0) prompt_free(&p);
        }
        prompt_builder_free(&b);  // also after a failed init, as stages/tokenize.c does
        task_free(&t);
    }
    word_list_free(&words);  // also after a failed load, as stages/tokenize.c does
    return 0;
}
