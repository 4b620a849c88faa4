// The tokenize -> cache -> patch stages on a tiny model: patch.h5's per-prompt results equal a direct
// in-process patch_run over the same prompts (so the cache shards' round trip is exact), a rerun after
// deleting patch.h5 rebuilds it identically, a corrupted cache shard is refused by the patch stage with
// a message naming the file and dataset and recomputed by a rerun of the cache stage, and
// metrics_compute agrees with values computed here by hand; prompts.h5 files whose datasets disagree are
// refused by prompt_set_load; integer fields beyond int are refused, not truncated.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pipeline/h5store.h"
#include "stages/cache.h"
#include "stages/metrics.h"
#include "stages/patch.h"
#include "stages/stage_inputs.h"
#include "stages/task.h"
#include "stages/tokenize.h"
#include "tests/harness.h"

static char dir[256];

static int read_plan_i32(const char *path, const char *name, int32_t **v) {
    h5store s;
    ep_error err;
    h5shape sh;
    if (h5store_open(path, &s, &err)) return -1;
    int rc = h5store_read_i32(&s, name, &sh, v, &err);
    h5store_close(&s);
    return rc;
}

static void test_int_fields(stage_inputs *in);

static void test_stage_chain(void) {
    char text[2048], path[512];
    snprintf(text, sizeof text,
             "{\"task\": \"person_sport\", \"model_name\": \"smollm_ablate_edges_differently_for_different_tokens\","
             " \"model_path\": \"tests/fixtures/models/smollm-tiny\", \"output_path\": \"%s/run\", \"n_prompts\": 7,"
             " \"batch_size\": 3, \"seed\": 5, \"donors\": 2, \"n_shots\": 4, \"max_new_tokens\": 6,"
             " \"affect_whom\": {\"curcuit\": {\"y,last\": 0}, \"ablate\": {\"x,y\": 1}}}", dir);
    run_config cfg;
    ep_error err = {{0}};
    check(run_config_parse(text, "test.json", &cfg, &err) == 0, "config: %s", err.msg);
    check(tokenize_stage(&cfg, 0, NULL, &err) == 0, "tokenize: %s", err.msg);
    stage_inputs in;
    if (stage_inputs_open(&cfg, NULL, &in, &err)) {
        check(0, "inputs: %s", err.msg);
        run_config_free(&cfg);
        return;
    }
    check(in.plan.n_donors == 2, "the per-token plan reads two donors");
    check(cache_stage(&in, 0, &err) == 0 && patch_stage(&in, 0, &err) == 0, "cache + patch: %s", err.msg);
    test_int_fields(&in);

    // Direct, in-process: all prompts in one batch, donors computed on the spot.
    int P = in.prompts.n_prompts, V = in.m.cfg.vocab_size, N = 6;
    prompt_batch pb = stage_batch(&in, 0, P);
    float *last = malloc(sizeof(float) * (size_t)P * V);
    int *gen = malloc(sizeof(int) * (size_t)P * N), n_gen[16];
    patch_outputs out = {.last_logits = last, .max_new = N, .generated = gen, .n_generated = n_gen,
                         .stop_ids = in.m.cfg.eos_ids, .n_stop_ids = in.m.cfg.n_eos};
    check(patch_run(&in.m, kernel_ops_cpu(), &in.plan, &pb, &out, &err) == 0, "patch_run: %s", err.msg);
    snprintf(path, sizeof path, "%s/run/patch.h5", dir);
    int32_t *stored = NULL, *n_stored = NULL;
    check(read_plan_i32(path, "plan/generated", &stored) == 0 && read_plan_i32(path, "plan/n_generated", &n_stored) == 0,
          "read patch.h5");
    int same = 0;
    for (int p = 0; p < P && stored; p++) {
        int ok = n_stored[p] == n_gen[p];
        for (int k = 0; k < n_gen[p] && ok; k++) ok = stored[p * N + k] == gen[p * N + k];
        same += ok;
    }
    check(same == P, "stage results equal in-process results on %d of %d prompts", same, P);
    printf("  stages: %d prompts in batches of 3, cache shards round trip, generations equal to in-process: %d/%d\n", P, same, P);

    // Resume: a deleted patch.h5 is rebuilt identically.
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "cp %s %s.first && rm %s", path, path, path);
    check(system(cmd) == 0, "remove patch.h5");
    check(patch_stage(&in, 0, &err) == 0, "rerun: %s", err.msg);
    snprintf(cmd, sizeof cmd, "h5diff -q %s %s.first", path, path);
    check(system(cmd) == 0, "rebuilt patch.h5 differs from the first one");

    // A flipped byte inside a cache shard's data: refused, naming the file; a rerun of the
    // cache stage finds it, recomputes that item, and patch.h5 comes out as before.
    snprintf(path, sizeof path, "%s/run/cache.d/item-00001.h5", dir);
    if (flip_h5_data_byte(path, "prompt4/donor1/v", 11, 0x40) == 0) {
        check(patch_stage(&in, 1, &err) != 0 && strstr(err.msg, "cache.d/item-00001.h5") && strstr(err.msg, "checksum"),
              "corrupted cache refused: %s", err.msg);
        check(cache_stage(&in, 0, &err) == 0 && patch_stage(&in, 1, &err) == 0, "recompute after corruption: %s", err.msg);
        snprintf(cmd, sizeof cmd, "h5diff -q %s/run/patch.h5 %s/run/patch.h5.first", dir, dir);
        check(system(cmd) == 0, "patch.h5 after recomputing a corrupted cache item differs from the first one");
    }
    free(last), free(gen), free(stored), free(n_stored);
    stage_inputs_close(&in);
    run_config_free(&cfg);
}

static float *read_f32(const char *path, const char *name, int64_t *n) {
    h5store s;
    ep_error err;
    h5shape sh;
    float *v = NULL;
    if (h5store_open(path, &s, &err)) return NULL;
    if (h5store_read_f32(&s, name, &sh, &v, &err)) v = NULL;
    else *n = sh.dims[0];
    h5store_close(&s);
    return v;
}

static long file_size(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fclose(f);
    return n;
}

// cache_dtype "bf16": donor activations stored in half the bytes, read back as floats; results stay
// within bf16 rounding of the fp32 cache's.
static void test_bf16_cache(void) {
    const char *dtypes[2] = {"fp32", "bf16"};
    float *ld[2] = {NULL, NULL};
    int64_t n[2] = {0, 0};
    long shard[2] = {0, 0};
    for (int k = 0; k < 2; k++) {
        char text[2048], path[600];
        snprintf(text, sizeof text,
                 "{\"task\": \"country_capital\", \"model_name\": \"llama3_ablate_edges\", \"model_path\":"
                 " \"tests/fixtures/models/llama3-tiny\", \"output_path\": \"%s/%s\", \"n_prompts\": 4,"
                 " \"batch_size\": 4, \"n_shots\": 3, \"affect_whom\": [[\"y\", \"last\"], [\"x\", \"y\"]],"
                 " \"cache_dtype\": \"%s\"}", dir, dtypes[k], dtypes[k]);
        run_config cfg;
        stage_inputs in;
        ep_error err = {{0}};
        if (run_config_parse(text, "bf16.json", &cfg, &err) || tokenize_stage(&cfg, 0, NULL, &err) ||
            stage_inputs_open(&cfg, NULL, &in, &err)) {
            check(0, "%s", err.msg);
            return;
        }
        check(cache_stage(&in, 0, &err) == 0 && patch_stage(&in, 0, &err) == 0, "%s run: %s", dtypes[k], err.msg);
        snprintf(path, sizeof path, "%s/%s/patch.h5", dir, dtypes[k]);
        ld[k] = read_f32(path, "plan/logit_diff", &n[k]);
        snprintf(path, sizeof path, "%s/%s/cache.d/item-00000.h5", dir, dtypes[k]);
        shard[k] = file_size(path);
        stage_inputs_close(&in);
        run_config_free(&cfg);
    }
    double worst = 0, any = 0;
    for (int i = 0; ld[0] && ld[1] && i < n[0]; i++) {
        double d = fabs((double)ld[0][i] - ld[1][i]);
        worst = d > worst ? d : worst;
        any += d;
    }
    printf("  cache_dtype bf16: shard %ld bytes vs %ld for fp32; logit differences within %.3g of the fp32 run\n",
           shard[1], shard[0], worst);
    check(ld[0] && ld[1] && n[0] == n[1] && worst < 0.05 && any > 0, "bf16 cache results: worst %.3g", worst);
    check(shard[1] > 0 && shard[1] < shard[0] * 0.6, "bf16 shard %ld bytes, fp32 %ld", shard[1], shard[0]);
    free(ld[0]), free(ld[1]);
}

static void test_metrics(void) {
    tokenizer *tk;
    ep_error err = {{0}};
    if (tokenizer_load("tests/fixtures/models/llama3-tiny", &tk, &err)) {
        check(0, "%s", err.msg);
        return;
    }
    int *target, nt, *good, ng, *bad, nb;
    tokenizer_encode(tk, " Paris", 6, 0, &target, &nt, &err);
    tokenizer_encode(tk, " Paris is nice\n", 15, 0, &good, &ng, &err);
    tokenizer_encode(tk, " Pa", 3, 0, &bad, &nb, &err);
    int V = tokenizer_vocab_size(tk);
    float *logits = calloc((size_t)V, sizeof(float));
    logits[target[0]] = 2.0f;
    logits[(target[0] + 1) % V] = 3.0f;  // the best other token beats the target
    prompt_metrics m;
    check(metrics_compute(tk, logits, V, target, nt, good, ng, &m, &err) == 0, "metrics: %s", err.msg);
    double want_lp = 2.0 - log(exp(3.0) + exp(2.0) + (V - 2) * exp(0.0));
    check(m.correct && !m.first_token_correct && fabs(m.target_logprob - want_lp) < 1e-5 && fabs(m.logit_diff + 1.0f) < 1e-6,
          "metrics values: correct %d first %d lp %g (want %g) ld %g", m.correct, m.first_token_correct, m.target_logprob,
          want_lp, m.logit_diff);
    check(metrics_compute(tk, logits, V, target, nt, bad, nb, &m, &err) == 0 && !m.correct, "a prefix of the target is wrong");
    free(logits), free(target), free(good), free(bad);
    tokenizer_free(tk);
}

// prompts.h5 whose datasets disagree with each other (found by tests/fuzz/fuzz_h5_artifacts.c): the
// reader refuses each, naming the dataset, where it used to return a set whose readers (the forward
// passes, circuit_start_edges) index past the arrays. A consistent file (P = 2, L = 4, K = 1, T = 2,
// N + 1 = 2) loads. variant: which dataset is spoiled (0: none).
static int write_prompts(const char *path, int variant) {
    enum { P = 2, L = 4 };
    int32_t tokens[P * L] = {1, 5, 6, 7, 1, 8, 9, -1}, types[P * L] = {0, 1, 2, 6, 0, 1, 6, -1};
    int32_t index[P * L] = {-1, 0, 0, 0, -1, 0, 0, -1}, lengths[P] = {4, 3}, donors[P * L], kinds[1] = {3};
    int32_t targets[P * 2] = {3, 4, 5, -1}, target_lengths[P] = {2, 1}, pair_ids[P * 2] = {0, 1, 2, 3};
    memcpy(donors, tokens, sizeof donors);
    h5shape pl = {2, {P, L}}, p1 = {1, {P}}, pkl = {3, {P, 1, L}}, k1 = {1, {1}}, pt = {2, {P, 2}};
    if (variant == 1) lengths[1] = L + 1;              // a prompt longer than the rows
    if (variant == 2) pl.dims[1] = L - 1;              // types narrower than tokens (written below)
    if (variant == 3) types[2] = 8;                    // a type past TT_COUNT - 1
    if (variant == 4) kinds[0] = DONOR_KIND_COUNT;     // a donor kind past DONOR_KIND_COUNT - 1
    if (variant == 5) target_lengths[0] = 3;           // more target tokens than targets' columns
    if (variant == 6) pkl.dims[2] = L - 1;             // donors shorter than the prompts
    if (variant == 7) p1.dims[0] = 1;                  // target_lengths (and lengths) for fewer prompts
    h5shape tok = {2, {P, L}};
    h5store s;
    ep_error err = {{0}};
    if (h5store_create(path, &s, &err)) return -1;
    int rc = h5store_write_i32(&s, "tokens", &tok, tokens, &err) || h5store_write_i32(&s, "types", &pl, types, &err) ||
             h5store_write_i32(&s, "index", &tok, index, &err) ||
             h5store_write_i32(&s, "lengths", variant == 7 ? &(h5shape){1, {P}} : &p1, lengths, &err) ||
             h5store_write_i32(&s, "donors", &pkl, donors, &err) || h5store_write_i32(&s, "donor_kinds", &k1, kinds, &err) ||
             h5store_write_i32(&s, "targets", &pt, targets, &err) ||
             h5store_write_i32(&s, "target_lengths", &p1, target_lengths, &err) ||
             h5store_write_i32(&s, "pair_ids", &pt, pair_ids, &err) || h5store_set_str(&s, "format", "edgepatch-prompts-1", &err) ||
             h5store_set_str(&s, "task", "t", &err) || h5store_set_str(&s, "tokenizer_path", "m", &err);
    if (rc) {
        h5store_abandon(&s);
        return -1;
    }
    return h5store_commit(&s, &err);
}

// Integer fields beyond int (2^32 + 1 used to pass as 1 after the conversion to int) are refused,
// naming the field: a run config's donors, a task file's n_shots, and (at the patch stage)
// max_new_tokens; the same files with the field at 1 load.
static void test_int_fields(stage_inputs *in) {
    for (int big = 0; big < 2; big++) {
        const char *v = big ? "4294967297" : "1";
        char text[1024], path[512];
        run_config cfg;
        ep_error err = {{0}};
        snprintf(text, sizeof text, "{\"task\": \"t\", \"model_path\": \"m\", \"output_path\": \"o\", \"donors\": %s}", v);
        int rc = run_config_parse(text, "donors.json", &cfg, &err);
        if (big) check(rc != 0 && strstr(err.msg, "donors"), "donors 2^32 + 1 refused: %s", rc ? err.msg : "(parsed)");
        else check(rc == 0 && cfg.n_donors == 1, "donors 1 parses: %s", err.msg);
        if (rc == 0) run_config_free(&cfg);

        snprintf(path, sizeof path, "%s/int-task.json", dir);
        FILE *f = fopen(path, "w");
        fprintf(f, "{\"name\": \"t\", \"pairs\": \"%s/datasets/pairs/country-capital.json\", \"donor_kinds\": [\"other_pairs\"],"
                   " \"n_shots\": %s}", getcwd(text, sizeof text), v);
        fclose(f);
        task t;
        rc = task_load(path, &t, &err);
        if (big) check(rc != 0 && strstr(err.msg, "n_shots"), "n_shots 2^32 + 1 refused: %s", rc ? err.msg : "(loaded)");
        else check(rc == 0 && t.n_shots == 1, "n_shots 1 loads: %s", err.msg);
        if (rc == 0) task_free(&t);

        if (!in) continue;
        snprintf(text, sizeof text, "{\"task\": \"t\", \"model_path\": \"m\", \"output_path\": \"%s/int-run\", \"max_new_tokens\": %s}", dir, v);
        if (run_config_parse(text, "max_new.json", &cfg, &err)) {
            check(0, "%s", err.msg);
            continue;
        }
        stage_inputs copy = *in;
        copy.cfg = &cfg;
        work_stage ws = {0};
        rc = patch_work(&copy, &ws, &err);
        if (big) check(rc != 0 && strstr(err.msg, "max_new_tokens"), "max_new_tokens 2^32 + 1 refused: %s", rc ? err.msg : "(accepted)");
        else check(rc == 0, "max_new_tokens 1 accepted: %s", err.msg);
        if (rc == 0 && ws.release) ws.release(&ws);
        run_config_free(&cfg);
    }
}

static void test_prompts_validation(void) {
    static const char *names[] = {"", "lengths", "types", "types", "donor_kinds", "target_lengths", "donors", "target_lengths"};
    char path[512];
    snprintf(path, sizeof path, "%s/prompts-check.h5", dir);
    for (int v = 0; v < 8; v++) {
        prompt_set ps;
        ep_error err = {{0}};
        if (write_prompts(path, v)) {
            check(0, "writing prompts variant %d", v);
            continue;
        }
        int rc = prompt_set_load(path, &ps, &err);
        if (v == 0) check(rc == 0 && ps.n_prompts == 2 && ps.max_len == 4 && ps.n_donors == 1, "a consistent prompts.h5 loads: %s", err.msg);
        else check(rc != 0 && strstr(err.msg, names[v]), "prompts.h5 variant %d refused naming %s: %s", v, names[v], rc ? err.msg : "(loaded)");
        if (rc == 0) prompt_set_free(&ps);
    }
    unlink(path);
}

int main(void) {
    snprintf(dir, sizeof dir, "/tmp/ep_test_stages_%d", (int)getpid());
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf %s && mkdir -p %s", dir, dir);
    if (system(cmd) != 0) return 1;
    test_metrics();
    test_prompts_validation();
    test_stage_chain();
    test_bf16_cache();
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0) return 1;
    return test_finish("test_stages");
}
