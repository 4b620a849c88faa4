// bench_patch: the pipeline's patched forward pass (stages/patch.h: donor pass, then the patched prompt
// pass, logits at the last position only) on synthetic ICL-shaped prompts, timed; the GPU check
// (tools/device_check.py) runs it next to HF transformers on the same prompts and the same weights.
//
// Prompts: B prompts of T tokens. Ids by the formula of bench_forward (bench_id: prompt s, position t);
// types: bos at 0, then (x, t, y, n) repeated with the repetition as example index, last at T - 1;
// donor 0 is the same prompt with other ids at the x and y positions (1 + (id + 7919) mod (vocab - 1)). The plan
// is every y -> last edge in every layer and head read from donor 0 (--plan FILE: another, in the JSON of
// stages/plan.h). device_check.py builds the same prompts and the same edge mask.
//
// Each rep runs the clean pass (no plan) and the patched run (donor pass + patched pass); one warm-up rep
// first. --dump FILE writes the last-position logits of the clean pass, then of the patched pass, as
// [2][B][vocab] little-endian float32. The last line is key=value pairs for scripts.
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "stages/patch.h"
#include "stages/plan.h"
#include "stages/prompts.h"
#include "bench/bench_util.h"

static const char usage[] =
    "usage: bench_patch --model DIR [--backend cpu|cuda|offset] [--dtype fp32|bf16] [--batch B] [--len T]\n"
    "                   [--reps R] [--plan FILE] [--dump FILE]\n"
    "  B prompts (default 64) of T tokens (default 100), R timed reps (default 3) after a warm-up.\n";

static const char default_plan[] =
    "{\"name\": \"y_to_last\", \"rules\": [{\"sender\": [\"y\"], \"receiver\": [\"last\"], \"donor\": 0}]}";

// One timed call of patch_run: last-position logits into last [B][V]; returns seconds or -1.
static double timed_run(const model *m, const kernel_ops *ops, const ablation_plan *plan, const prompt_batch *pb,
                        float *last, ep_error *err) {
    patch_outputs out = {.last_logits = last};
    double t0 = bench_now_s();
    if (patch_run(m, ops, plan, pb, &out, err)) return -1;
    ops->sync();
    return bench_now_s() - t0;
}

int main(int argc, char **argv) {
    const char *dir = NULL, *backend = "cpu", *dtype = "fp32", *plan_path = NULL, *dump = NULL;
    int B = 64, T = 100, R = 3;
    for (int i = 1; i < argc; i++) {
        const char *next = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(argv[i], "--help") || !next) {
            fputs(usage, !strcmp(argv[i], "--help") ? stdout : stderr);
            return !strcmp(argv[i], "--help") ? 0 : 2;
        }
        if (!strcmp(argv[i], "--model")) dir = next;
        else if (!strcmp(argv[i], "--backend")) backend = next;
        else if (!strcmp(argv[i], "--dtype")) dtype = next;
        else if (!strcmp(argv[i], "--plan")) plan_path = next;
        else if (!strcmp(argv[i], "--dump")) dump = next;
        else if (!strcmp(argv[i], "--batch")) B = atoi(next);
        else if (!strcmp(argv[i], "--len")) T = atoi(next);
        else if (!strcmp(argv[i], "--reps")) R = atoi(next);
        else {
            fprintf(stderr, "bench_patch: unknown option '%s'\n%s", argv[i], usage);
            return 2;
        }
        i++;
    }
    int bf16 = !strcmp(dtype, "bf16");
    if (!dir || B <= 0 || T < 6 || R <= 0 || (!bf16 && strcmp(dtype, "fp32"))) {
        fputs(usage, stderr);
        return 2;
    }
    const kernel_ops *ops = kernel_ops_named(backend);
    if (!ops) {
        fprintf(stderr, "bench_patch: backend '%s' is not available (cpu, offset, or cuda with a usable GPU)\n", backend);
        return 2;
    }
    model m, dev;
    ep_error err = {{0}};
    if (model_load(dir, &m, &err) || model_to_backend(&m, ops, bf16, &dev, &err)) {
        fprintf(stderr, "bench_patch: %s\n", err.msg);
        return 1;
    }
    json_error_t jerr;
    json_t *pj = plan_path ? json_load_file(plan_path, 0, &jerr) : json_loads(default_plan, 0, &jerr);
    ablation_plan plan, clean;
    if (!pj) {
        fprintf(stderr, "bench_patch: %s: %s\n", plan_path ? plan_path : "default plan", jerr.text);
        return 1;
    }
    if (plan_parse(pj, plan_path ? plan_path : "default plan", &m.cfg, &plan, &err)) {
        fprintf(stderr, "bench_patch: %s\n", err.msg);
        return 1;
    }
    json_decref(pj);
    plan_empty(&m.cfg, &clean);

    int V = m.cfg.vocab_size;
    size_t n = (size_t)B * T;
    int32_t *tokens = malloc(sizeof(int32_t) * n), *types = malloc(sizeof(int32_t) * n),
            *index = malloc(sizeof(int32_t) * n), *donors = malloc(sizeof(int32_t) * n),
            *lengths = malloc(sizeof(int32_t) * (size_t)B);
    for (int s = 0; s < B; s++) {
        lengths[s] = T;
        for (int t = 0; t < T; t++) {
            size_t i = (size_t)s * T + t;
            int k = (t - 1) % 4;  // 0 x, 1 t, 2 y, 3 n
            types[i] = t == 0 ? TT_BOS : t == T - 1 ? TT_LAST : k == 0 ? TT_X : k == 1 ? TT_T : k == 2 ? TT_Y : TT_N;
            index[i] = t == 0 || t == T - 1 ? -1 : (t - 1) / 4;
            tokens[i] = bench_id(s, t, T, V);
            donors[i] = types[i] == TT_X || types[i] == TT_Y ? 1 + (tokens[i] + 7919) % (V - 1) : tokens[i];
        }
    }
    prompt_batch pb = {.n_seqs = B, .max_len = T, .n_donors = 1, .tokens = tokens, .lengths = lengths,
                       .types = types, .index = index, .donors = donors};
    float *logits = malloc(sizeof(float) * 2 * (size_t)B * V);
    double t_clean = 0, t_patch = 0;
    for (int rep = 0; rep <= R; rep++) {
        double a = timed_run(&dev, ops, &clean, &pb, logits, &err);
        double b = a < 0 ? -1 : timed_run(&dev, ops, &plan, &pb, logits + (size_t)B * V, &err);
        if (b < 0) {
            fprintf(stderr, "bench_patch: %s\n", err.msg);
            return 1;
        }
        fprintf(stderr, "  %s rep %d: clean %.3f s, donor + patched %.3f s\n", rep ? "timed" : "warm-up", rep, a, b);
        if (rep > 0) t_clean += a, t_patch += b;
    }
    if (dump) {
        FILE *f = fopen(dump, "wb");
        if (!f || fwrite(logits, sizeof(float), 2 * (size_t)B * V, f) != 2 * (size_t)B * V || fclose(f)) {
            fprintf(stderr, "bench_patch: cannot write %s\n", dump);
            return 1;
        }
    }
    printf("engine=edgepatch backend=%s dtype=%s batch=%d len=%d reps=%d clean_s=%.5f patched_s=%.5f "
           "clean_tokens_per_s=%.1f patched_tokens_per_s=%.1f\n",
           ops->name, dtype, B, T, R, t_clean / R, t_patch / R, (double)n * R / t_clean, (double)n * R / t_patch);
    plan_free(&plan), plan_free(&clean);
    model_backend_free(&dev), model_free(&m);
    free(tokens), free(types), free(index), free(donors), free(lengths), free(logits);
    return 0;
}
