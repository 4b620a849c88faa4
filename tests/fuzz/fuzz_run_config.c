// libFuzzer target: arbitrary bytes as a run config. run_config_parse, then, when it parses, the whole
// config's checks (run_config_check_values, run_config_check_inputs against the model shape: the task
// file lookup, the plans compiled, prune_using_imp_scores files opened) and what the stages compile from
// it: the plan (plan_from_run_config, with its donor-0 part and hash), the "ablations" plans
// (plan_list_from_run_config) and the resolved config. The model config is the
// tiny Gemma-2 fixture, loaded once. fuzz_task covers task files themselves.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline/model_config.h"
#include "stages/run_config.h"
#include "stages/plan.h"
#include "stages/stage_inputs.h"

static model_config cfg;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    ep_error err = {{0}};
    if (model_config_load(EP_SOURCE_DIR "/tests/fixtures/models/gemma2-tiny/config.json", &cfg, &err)) {
        fprintf(stderr, "fuzz_run_config: %s\n", err.msg);
        abort();
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *text = malloc(size + 1);  // run_config_parse takes a string: embedded NULs end it early
    if (size) memcpy(text, data, size);
    text[size] = 0;
    run_config rc;
    ep_error err = {{0}};
    if (run_config_parse(text, "fuzz.json", &rc, &err) == 0) {
        ablation_plan plan, part;
        if (plan_from_run_config(&rc, &cfg, &plan, &err) == 0) {
            plan_donor0_part(&plan, &part);
            (void)plan_hash(&plan);
            (void)plan_hash(&part);
            plan_free(&part);
            plan_free(&plan);
        }
        ablation_plan *list;
        int n;
        if (plan_list_from_run_config(&rc, &cfg, &list, &n, &err) == 0) {
            for (int i = 0; i < n; i++) (void)plan_hash(&list[i]);
            plan_list_free(list, n);
        }
        if (run_config_check_values(&rc, &err) == 0) (void)run_config_check_inputs(&rc, &cfg, &err);
        json_decref(run_config_resolved(&rc));
        run_config_free(&rc);
    }
    free(text);
    return 0;
}
