// Function vectors (stages/fv.h) against the independent Python reference of tools/make_fv_fixtures.py (HF
// transformers 4.44.2 modules with hooks only: o_proj's input recorded, a decoder layer's output changed), on
// every tiny architecture, on the prompts of tests/fixtures/patch/<model>.safetensors:
//   - the mean head outputs at the last position (fv_head_means: model_head_output, the head's slice of
//     o_proj) and their sum, the function vector;
//   - the zero-shot prompts (fv_zero_shot: the prefix and the query's positions);
//   - the logits at the last position and the greedy tokens with scale * vector added after layer L there
//     (fv_injected_pass: forward_add through the op table's scale and add), for two layers and two scales,
//     and without the vector (the zero-shot baseline);
// on cpu, on offset (which must give cpu's bytes) and on cuda when a GPU is usable, and (near, to bf16
// rounding) in a bf16 run on cpu. Can-fail siblings: the
// means of a neighbouring head, the vector added after another layer and the vector at another scale must
// each miss the reference.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline/safetensors.h"
#include "stages/fv.h"
#include "tests/harness.h"

#define P 3
#define N_GEN 5
#define MEAN_TOL 2e-5   // relative to the array's largest entry (seen: ~1e-6)
#define LOGIT_TOL 1e-4  // relative to the largest logit (seen: ~1e-6)
#define MISS 1e-3       // a can-fail sibling must be off by more than this

typedef struct {
    int max_len;
    int32_t lengths[P], *tokens, *types, *index;
} prompts;

static int32_t *read_i32(const safetensors *st, const char *name, int *n) {
    const st_tensor *t = safetensors_find(st, name);
    if (!t) return check(0, "fixture: no %s", name), NULL;
    int32_t *v = malloc(sizeof(int32_t) * (size_t)(t->numel ? t->numel : 1));
    ep_error err;
    if (safetensors_read_i32(t, v, &err)) return check(0, "%s: %s", name, err.msg), free(v), NULL;
    if (n) *n = (int)t->numel;
    return v;
}

static float *read_f32(const safetensors *st, const char *name, size_t want) {
    const st_tensor *t = safetensors_find(st, name);
    if (!t || (size_t)t->numel != want) return check(0, "fixture: %s missing or of the wrong size", name), NULL;
    float *v = malloc(sizeof(float) * want);
    ep_error err;
    if (safetensors_read_f32(t, v, &err)) return check(0, "%s: %s", name, err.msg), free(v), NULL;
    return v;
}

static int load_prompts(const char *model, prompts *f) {
    memset(f, 0, sizeof *f);
    char path[512], name[64];
    snprintf(path, sizeof path, "tests/fixtures/patch/%s.safetensors", model);
    safetensors st;
    ep_error err = {{0}};
    if (safetensors_open_file(path, &st, &err)) return check(0, "%s", err.msg), -1;
    int32_t *v[P][3] = {{0}};
    const char *what[3] = {"tokens", "types", "index"};
    int ok = 1;
    for (int i = 0; i < P; i++)
        for (int w = 0; w < 3; w++) {
            int n = 0;
            snprintf(name, sizeof name, "prompt%d.%s", i, what[w]);
            if (!(v[i][w] = read_i32(&st, name, &n))) ok = 0;
            if (w == 0) f->lengths[i] = n, f->max_len = n > f->max_len ? n : f->max_len;
        }
    size_t L = (size_t)f->max_len;
    f->tokens = calloc(P * L, sizeof(int32_t)), f->types = calloc(P * L, sizeof(int32_t)), f->index = calloc(P * L, sizeof(int32_t));
    int32_t *dst[3] = {f->tokens, f->types, f->index};
    for (int i = 0; i < P; i++)
        for (int w = 0; w < 3; w++) {
            if (ok) memcpy(dst[w] + (size_t)i * L, v[i][w], sizeof(int32_t) * (size_t)f->lengths[i]);
            free(v[i][w]);
        }
    safetensors_close(&st);
    return ok ? 0 : -1;
}

static void free_prompts(prompts *f) { free(f->tokens), free(f->types), free(f->index); }

// One model on one backend.
static void test_backend(const char *name, const model *m, const kernel_ops *ops, const prompts *f, const safetensors *ref,
                         float *cpu_logits) {
    const model_config *c = &m->cfg;
    int D = c->hidden, V = c->vocab_size, n_heads = 0, n_layers = 0;
    char key[128];
    snprintf(key, sizeof key, "%s.heads", name);
    int32_t *h32 = read_i32(ref, key, &n_heads);
    snprintf(key, sizeof key, "%s.layers", name);
    int32_t *layers = read_i32(ref, key, &n_layers);
    n_heads /= 2;
    snprintf(key, sizeof key, "%s.head_means", name);
    float *want_means = read_f32(ref, key, (size_t)n_heads * D);
    snprintf(key, sizeof key, "%s.vector", name);
    float *want_vec = read_f32(ref, key, (size_t)D);
    snprintf(key, sizeof key, "%s.scales", name);
    float *scales = read_f32(ref, key, 2);
    if (!h32 || !layers || !want_means || !want_vec || !scales) goto done;
    int heads[64];
    for (int i = 0; i < 2 * n_heads; i++) heads[i] = h32[i];
    prompt_batch pb = {.n_seqs = P, .max_len = f->max_len, .tokens = f->tokens, .lengths = f->lengths, .types = f->types,
                       .index = f->index};
    ep_error err = {{0}};

    // The mean head outputs and the vector.
    float *means = calloc((size_t)n_heads * D, sizeof(float)), vec[1024] = {0};
    if (fv_head_means(m, ops, &pb, heads, n_heads, means, &err)) {
        check(0, "%s (%s): fv_head_means: %s", name, ops->name, err.msg);
    } else {
        double e = max_rel_error(means, want_means, (size_t)n_heads * D, 1e-6);
        check(e < MEAN_TOL, "%s (%s): %d heads' mean outputs at last vs HF: max rel error %.2e", name, ops->name, n_heads, e);
        for (int d = 0; d < D; d++) {
            double s = 0;
            for (int h = 0; h < n_heads; h++) s += means[(size_t)h * D + d];
            vec[d] = (float)s;
        }
        e = max_rel_error(vec, want_vec, (size_t)D, 1e-6);
        check(e < MEAN_TOL, "%s (%s): the function vector vs HF: max rel error %.2e", name, ops->name, e);
        // Can-fail: the neighbouring head's means.
        int wrong[64];
        memcpy(wrong, heads, sizeof(int) * 2 * (size_t)n_heads);
        for (int h = 0; h < n_heads; h++) wrong[2 * h + 1] = (wrong[2 * h + 1] + 1) % c->n_heads;
        if (fv_head_means(m, ops, &pb, wrong, n_heads, means, &err) == 0) {
            e = max_rel_error(means, want_means, (size_t)n_heads * D, 1e-6);
            check(e > MISS, "%s (%s): can-fail: the neighbouring heads' means miss HF's (%.2e)", name, ops->name, e);
        }
    }
    free(means);

    float *last = malloc(sizeof(float) * (size_t)V);
    int *zero = malloc(sizeof(int) * (size_t)f->max_len), gen[N_GEN], n_gen = 0;
    double worst = 0;
    for (int i = 0; i < P; i++) {
        int nz = fv_zero_shot(&pb, i, zero), nref = 0;
        snprintf(key, sizeof key, "%s.prompt%d.zero_shot", name, i);
        int32_t *want_zero = read_i32(ref, key, &nref);
        int same = want_zero && nz == nref;
        for (int t = 0; same && t < nz; t++) same = zero[t] == want_zero[t];
        check(same, "%s: prompt %d's zero-shot tokens (%d) are the reference's (%d)", name, i, nz, nref);
        free(want_zero);
        for (int a = -1; a < n_layers; a++)
            for (int b = 0; b < (a < 0 ? 1 : 2); b++) {
                char what[64];
                if (a < 0) snprintf(what, sizeof what, "baseline");
                else snprintf(what, sizeof what, "l%d.s%d", a, b);
                int layer = a < 0 ? -1 : layers[a];
                if (fv_injected_pass(m, ops, zero, nz, layer, want_vec, a < 0 ? 0 : scales[b], N_GEN, last, gen, &n_gen, &err)) {
                    check(0, "%s (%s): fv_injected_pass: %s", name, ops->name, err.msg);
                    continue;
                }
                snprintf(key, sizeof key, "%s.prompt%d.%s.logits", name, i, what);
                float *want = read_f32(ref, key, (size_t)V);
                if (!want) continue;
                double e = max_rel_error(last, want, (size_t)V, 1e-6);
                worst = e > worst ? e : worst;
                check(e < LOGIT_TOL, "%s (%s): prompt %d %s: logits at last vs HF: max rel error %.2e", name, ops->name, i,
                      what, e);
                float *cpu = cpu_logits + ((size_t)i * 6 + (size_t)(a + 1) * 2 + b) * V;
                if (ops == kernel_ops_cpu()) memcpy(cpu, last, sizeof(float) * (size_t)V);
                if (ops == kernel_ops_offset())
                    check(!memcmp(cpu, last, sizeof(float) * (size_t)V), "%s: prompt %d %s: offset gives cpu's bytes", name, i, what);
                if (a >= 0) {
                    snprintf(key, sizeof key, "%s.prompt%d.%s.generated", name, i, what);
                    int32_t *want_gen = read_i32(ref, key, NULL);
                    int ok = want_gen != NULL;
                    for (int k = 0; ok && k < N_GEN; k++) ok = (k < n_gen ? gen[k] : -1) == want_gen[k];
                    check(ok, "%s (%s): prompt %d %s: greedy tokens are HF's", name, ops->name, i, what);
                    free(want_gen);
                    // Can-fail: after another layer, and at another scale.
                    int other = (layer + 1) % c->n_layers;
                    if (fv_injected_pass(m, ops, zero, nz, other, want_vec, scales[b], 0, last, gen, &n_gen, &err) == 0) {
                        double ew = max_rel_error(last, want, (size_t)V, 1e-6);
                        check(ew > MISS, "%s (%s): can-fail: prompt %d %s after layer %d misses HF's (%.2e)", name, ops->name,
                              i, what, other, ew);
                    }
                    if (fv_injected_pass(m, ops, zero, nz, layer, want_vec, scales[b] * 0.8f, 0, last, gen, &n_gen, &err) == 0) {
                        double ew = max_rel_error(last, want, (size_t)V, 1e-6);
                        check(ew > MISS, "%s (%s): can-fail: prompt %d %s at 0.8 x the scale misses HF's (%.2e)", name,
                              ops->name, i, what, ew);
                    }
                }
                free(want);
            }
    }
    // A vector after a layer the model does not have, or at a row past the pass, is refused.
    int row = 3, n_new = 2;
    forward_add bad_layer = {.layer = c->n_layers, .vec = want_vec, .scale = 1, .n_rows = 1, .rows = &(int){1}};
    forward_add bad_row = {.layer = 0, .vec = want_vec, .scale = 1, .n_rows = 1, .rows = &row};
    for (int k = 0; k < 2; k++) {
        kv_cache cache;
        if (kv_cache_init_backend(&cache, c, 1, 4, 0, ops, &err)) continue;
        forward_batch b = {.n_seqs = 1, .n_new = &n_new, .tokens = zero, .add = k ? &bad_row : &bad_layer};
        check(model_forward(m, ops, &cache, &b, NULL, &err) != 0 && strstr(err.msg, "added vector"),
              "%s (%s): an added vector %s is refused (%s)", name, ops->name, k ? "at a row past the pass" : "after no layer",
              err.msg);
        kv_cache_free(&cache);
    }
    printf("%s (%s): injected logits vs HF: worst max rel error %.2e\n", name, ops->name, worst);
    free(last), free(zero);
done:
    free(h32), free(layers), free(want_means), free(want_vec), free(scales);
}

// A bf16 run (dtype bf16: o_proj's bf16 weight in model_head_output, the vector added to the fp32 residual
// stream) on cpu: near HF's fp32 numbers (the bf16 products round each input to 8 bits of mantissa).
#define BF16_TOL 5e-2
static void test_bf16(const char *name, const model *m, const prompts *f, const safetensors *ref) {
    const model_config *c = &m->cfg;
    int D = c->hidden, V = c->vocab_size, n_heads = 0, heads[64], zero[512], gen[N_GEN], n_gen = 0;
    char key[128];
    snprintf(key, sizeof key, "%s.heads", name);
    int32_t *h32 = read_i32(ref, key, &n_heads);
    n_heads /= 2;
    snprintf(key, sizeof key, "%s.head_means", name);
    float *want = read_f32(ref, key, (size_t)n_heads * D), *means = calloc((size_t)n_heads * D, sizeof(float));
    snprintf(key, sizeof key, "%s.vector", name);
    float *vec = read_f32(ref, key, (size_t)D), *last = malloc(sizeof(float) * (size_t)V);
    snprintf(key, sizeof key, "%s.prompt0.l0.s1.logits", name);
    float *want_logits = read_f32(ref, key, (size_t)V), *scales = NULL;
    snprintf(key, sizeof key, "%s.scales", name);
    scales = read_f32(ref, key, 2);
    int32_t *layers = NULL;
    snprintf(key, sizeof key, "%s.layers", name);
    layers = read_i32(ref, key, NULL);
    model dev;
    ep_error err = {{0}};
    if (h32 && want && vec && want_logits && scales && layers && model_to_backend(m, kernel_ops_cpu(), 1, &dev, &err) == 0) {
        for (int i = 0; i < 2 * n_heads; i++) heads[i] = h32[i];
        prompt_batch pb = {.n_seqs = P, .max_len = f->max_len, .tokens = f->tokens, .lengths = f->lengths,
                           .types = f->types, .index = f->index};
        if (fv_head_means(&dev, kernel_ops_cpu(), &pb, heads, n_heads, means, &err) == 0) {
            double e = max_rel_error(means, want, (size_t)n_heads * D, 1e-6);
            check(e < BF16_TOL, "%s (bf16): head means vs HF fp32: max rel error %.2e", name, e);
            printf("%s (bf16): head means vs HF fp32: max rel error %.2e\n", name, e);
        } else {
            check(0, "%s (bf16): %s", name, err.msg);
        }
        int nz = f->lengths[0] <= 512 ? fv_zero_shot(&pb, 0, zero) : 0;
        if (nz > 0 && fv_injected_pass(&dev, kernel_ops_cpu(), zero, nz, layers[0], vec, scales[1], N_GEN, last, gen, &n_gen, &err) == 0) {
            double e = max_rel_error(last, want_logits, (size_t)V, 1e-6);
            check(e < BF16_TOL, "%s (bf16): injected logits vs HF fp32: max rel error %.2e", name, e);
        } else {
            check(0, "%s (bf16): %s", name, err.msg);
        }
        model_backend_free(&dev);
    } else if (err.msg[0]) {
        check(0, "%s (bf16): %s", name, err.msg);
    }
    free(h32), free(want), free(means), free(vec), free(last), free(want_logits), free(scales), free(layers);
}

static void test_model(const char *name, const safetensors *ref) {
    model m;
    ep_error err = {{0}};
    if (load_fixture_model(name, &m)) return;
    prompts f;
    if (load_prompts(name, &f) == 0) {
        float *cpu_logits = calloc((size_t)P * 6 * m.cfg.vocab_size, sizeof(float));
        const kernel_ops *backends[3] = {kernel_ops_cpu(), kernel_ops_offset(), kernel_ops_cuda()};
        for (int k = 0; k < 3; k++) {
            if (!backends[k]) continue;
            if (k == 0) {
                test_backend(name, &m, backends[k], &f, ref, cpu_logits);
                continue;
            }
            model dev;
            if (model_to_backend(&m, backends[k], 0, &dev, &err)) {
                check(0, "%s", err.msg);
                continue;
            }
            test_backend(name, &dev, backends[k], &f, ref, cpu_logits);
            model_backend_free(&dev);
        }
        free(cpu_logits);
        test_bf16(name, &m, &f, ref);
        free_prompts(&f);
    }
    model_free(&m);
}

int main(void) {
    safetensors ref;
    ep_error err = {{0}};
    if (safetensors_open_file("tests/fixtures/fv/fv.safetensors", &ref, &err)) {
        check(0, "%s", err.msg);
        return test_finish("test_fv");
    }
    const char *models[] = {"gemma2-tiny", "llama3-tiny", "smollm-tiny", "phi2-tiny"};
    for (int i = 0; i < 4; i++) test_model(models[i], &ref);
    safetensors_close(&ref);
    return test_finish("test_fv");
}
