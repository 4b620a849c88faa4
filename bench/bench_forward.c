// bench_forward: throughput of the batched prompt pass, the way the pipeline runs it: B prompts of T
// tokens packed into one forward step, logits only at each prompt's last position. One warm-up pass,
// then R timed passes (the KV cache is rewound between passes); prints tokens/s over the timed passes.
// Token ids are --ids (comma-separated, used for every prompt) or generated as bench_ids() does, the
// same formula bench_forward_torch.py uses, so both engines see the same ids. --backend picks the kernel
// backend (cpu, or cuda: the weights are uploaded once from the checkpoint's mapping, outside the timing,
// and the host memory the model keeps is printed); --random CONFIG runs a model
// of that config.json's shape with pseudo-random weights (e.g. bench/smollm2-135m.json) instead of --model.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline/forward.h"
#include "pipeline/generate.h"
#include "pipeline/model.h"
#include "bench/bench_util.h"

static const char usage[] =
    "usage: bench_forward (--model DIR | --random CONFIG) [--backend cpu|cuda] [--batch B] [--len T] [--reps R]\n"
    "                     [--ids 1,2,3]\n"
    "  B prompts (default 16) of T token ids (default 100), R timed passes (default 3) after a warm-up.\n"
    "  Threads: OMP_NUM_THREADS / OPENBLAS_NUM_THREADS.\n";

int main(int argc, char **argv) {
    const char *dir = NULL, *ids = NULL, *random_cfg = NULL, *backend = "cpu";
    int B = 16, T = 100, R = 3;
    for (int i = 1; i < argc; i++) {
        const char *next = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(argv[i], "--help") || !next) {
            fputs(usage, !strcmp(argv[i], "--help") ? stdout : stderr);
            return !strcmp(argv[i], "--help") ? 0 : 2;
        }
        if (!strcmp(argv[i], "--model")) dir = next;
        else if (!strcmp(argv[i], "--random")) random_cfg = next;
        else if (!strcmp(argv[i], "--backend")) backend = next;
        else if (!strcmp(argv[i], "--ids")) ids = next;
        else if (!strcmp(argv[i], "--batch")) B = atoi(next);
        else if (!strcmp(argv[i], "--len")) T = atoi(next);
        else if (!strcmp(argv[i], "--reps")) R = atoi(next);
        else {
            fprintf(stderr, "bench_forward: unknown option '%s'\n%s", argv[i], usage);
            return 2;
        }
        i++;
    }
    if (!dir == !random_cfg || B <= 0 || R <= 0 || (!ids && T <= 0)) {
        fputs(usage, stderr);
        return 2;
    }
    const kernel_ops *ops = kernel_ops_named(backend);
    if (!ops) {
        fprintf(stderr, "bench_forward: backend '%s' is not available (cpu, or cuda with a usable GPU)\n", backend);
        return 2;
    }
    model m, dev;
    ep_error err = {{0}};
    if (random_cfg) {
        model_config cfg;
        if (model_config_load(random_cfg, &cfg, &err)) {
            fprintf(stderr, "bench_forward: %s\n", err.msg);
            return 1;
        }
        model_init_random(&cfg, 1, &m);
    } else if ((ops->host_memory ? model_load(dir, &m, &err) : model_open_shard(dir, 0, 1, &m, &err))) {
        fprintf(stderr, "bench_forward: %s\n", err.msg);
        return 1;
    }
    if (model_to_backend(&m, ops, 0, &dev, &err)) {
        fprintf(stderr, "bench_forward: %s\n", err.msg);
        return 1;
    }
    // A device backend's weights come from the mapping, one tensor at a time (docs/cuda.md, "weights").
    fprintf(stderr, "host memory of the model: %zu bytes (upload staging %zu bytes)\n",
            model_host_bytes(&m) + model_host_bytes(&dev), dev.staging_bytes);
    int V = m.cfg.vocab_size;
    int *prompt = NULL, n_prompt = 0;
    if (ids) {
        prompt = malloc(sizeof(int) * (strlen(ids) + 1));
        for (const char *p = ids; *p;) {
            char *end;
            long id = strtol(p, &end, 10);
            if (end == p || (*end && *end != ',') || id < 0 || id >= V) {
                fprintf(stderr, "bench_forward: --ids: expected comma-separated ids in 0..%d, at '%s'\n", V - 1, p);
                return 2;
            }
            prompt[n_prompt++] = (int)id;
            p = *end ? end + 1 : end;
        }
        T = n_prompt;
        if (T == 0) {
            fprintf(stderr, "bench_forward: --ids is empty\n");
            return 2;
        }
    }
    int *tokens = malloc(sizeof(int) * (size_t)B * T), *n_new = malloc(sizeof(int) * B), *rows = malloc(sizeof(int) * B);
    for (int s = 0; s < B; s++) {
        for (int t = 0; t < T; t++) tokens[s * T + t] = ids ? prompt[t] : bench_id(s, t, T, V);
        n_new[s] = T;
        rows[s] = s * T + T - 1;
    }
    float *logits = malloc(sizeof(float) * (size_t)B * V);
    kv_cache cache;
    if (kv_cache_init_backend(&cache, &m.cfg, B, T, 0, ops, &err)) {
        fprintf(stderr, "bench_forward: %s\n", err.msg);
        return 1;
    }
    forward_batch fb = {.n_seqs = B, .n_new = n_new, .tokens = tokens, .n_logit_rows = B, .logit_rows = rows,
                        .logits = logits};
    double total = 0;
    for (int rep = 0; rep <= R; rep++) {
        memset(cache.len, 0, sizeof(int) * B);
        double t0 = bench_now_s();
        if (model_forward(&dev, ops, &cache, &fb, NULL, &err)) {
            fprintf(stderr, "bench_forward: %s\n", err.msg);
            return 1;
        }
        double dt = bench_now_s() - t0;
        if (rep > 0) total += dt;  // rep 0 is the warm-up
        fprintf(stderr, "  %s pass %d: %.3f s\n", rep ? "timed" : "warm-up", rep, dt);
    }
    printf("argmax of the first prompts:");
    for (int s = 0; s < B && s < 4; s++) printf(" %d", argmax(logits + (size_t)s * V, V));
    printf("\n");
    printf("engine=edgepatch backend=%s batch=%d len=%d reps=%d seconds=%.4f tokens_per_s=%.1f\n", ops->name, B, T, R, total / R,
           (double)B * T * R / total);
    kv_cache_free(&cache);
    model_backend_free(&dev);
    model_free(&m);
    free(prompt), free(tokens), free(n_new), free(rows), free(logits);
    return 0;
}
