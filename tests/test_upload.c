// Weights from the mapping to the device (model_open_shard + model_to_backend; docs/cuda.md, "weights")
// against the path that converts the whole model on the host first (model_load_shard + model_to_backend),
// for every fixture variant (F32, BF16, F16, sharded files), fp32 and bf16 runs, the whole model and
// tensor-parallel shards (T = 2, 4 where the config splits), on the offset backend (device-style memory),
// cuda when a GPU is present, and, for bf16, the cpu backend (a host copy):
// - every buffer of the two device models is byte-identical (downloaded and compared);
// - the whole model's logits of a packed batch are byte-identical;
// - host memory: after the mapping path the host owns at most one tensor (model_host_bytes of both models,
//   and the staging buffer), where the old path's host model owns every converted tensor (can fail: a
//   BF16 or F16 checkpoint's whole model exceeds its largest tensor).
// Can-fail sibling: one flipped bit in one weight of the new device model changes the logits.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline/forward.h"
#include "pipeline/model.h"
#include "tests/harness.h"

static const char *variants[] = {"gemma2-tiny",     "gemma2-tiny-bf16", "llama3-tiny",    "llama3-tiny-bf16",
                                 "llama3-tiny-f16", "phi2-tiny",        "phi2-tiny-bf16", "smollm-tiny",
                                 "smollm-tiny-bf16", "smollm-tiny-sharded"};

// A buffer of a model's backend, copied to the host.
static void *fetch(const kernel_ops *ops, const void *buf, size_t bytes) {
    void *h = malloc(bytes ? bytes : 1);
    if (ops->host_memory)
        memcpy(h, buf, bytes);
    else
        ops->download(h, buf, bytes);
    return h;
}

// Logits of every row of a fixed packed batch of two sequences (T = 1 models only).
static float *logits_of(const model *dev, const kernel_ops *ops) {
    const model_config *c = &dev->cfg;
    enum { S = 2, L0 = 11, L1 = 7 };
    int len[S] = {L0, L1}, tokens[L0 + L1], rows[L0 + L1];
    for (int t = 0; t < L0 + L1; t++) tokens[t] = (17 + 31 * t) % c->vocab_size, rows[t] = t;
    float *logits = malloc(sizeof(float) * (size_t)(L0 + L1) * c->vocab_size);
    forward_batch b = {.n_seqs = S, .n_new = len, .tokens = tokens, .n_logit_rows = L0 + L1, .logit_rows = rows,
                       .logits = logits};
    kv_cache cache;
    ep_error err = {{0}};
    if (kv_cache_init_backend(&cache, c, S, L0, 0, ops, &err) || model_forward(dev, ops, &cache, &b, NULL, &err)) {
        check(0, "forward (%s): %s", ops->name, err.msg);
        free(logits);
        logits = NULL;
    }
    kv_cache_free(&cache);
    return logits;
}

static size_t logits_bytes(const model *m) { return sizeof(float) * 18 * (size_t)m->cfg.vocab_size; }

// The two device models' buffers, pairwise (the same tensor list in the same order): 1 if all equal.
static int same_buffers(const model *a, const model *b, const kernel_ops *ops) {
    if (a->n_owned != b->n_owned) return 0;
    int same = 1;
    for (int i = 0; i < a->n_owned && same; i++) {
        if (a->owned_bytes[i] != b->owned_bytes[i]) return 0;
        void *x = fetch(ops, a->owned[i], a->owned_bytes[i]), *y = fetch(ops, b->owned[i], b->owned_bytes[i]);
        same = !memcmp(x, y, a->owned_bytes[i]);
        free(x), free(y);
    }
    return same;
}

// One variant, shard (rank, T), backend and dtype. largest: the largest held tensor's fp32 bytes.
static void compare(const char *variant, int rank, int T, const kernel_ops *ops, int bf16, size_t *largest) {
    char dir[256];
    snprintf(dir, sizeof dir, "tests/fixtures/models/%s", variant);
    model old_host, new_host, old_dev, new_dev;
    ep_error err = {{0}};
    if (model_load_shard(dir, rank, T, &old_host, &err)) {
        check(0, "%s: %s", variant, err.msg);
        return;
    }
    if (model_open_shard(dir, rank, T, &new_host, &err)) {
        check(0, "%s: %s", variant, err.msg);
        model_free(&old_host);
        return;
    }
    if (model_to_backend(&old_host, ops, bf16, &old_dev, &err) || model_to_backend(&new_host, ops, bf16, &new_dev, &err)) {
        check(0, "%s %s: %s", variant, ops->name, err.msg);
        model_free(&old_host), model_free(&new_host);
        return;
    }
    if (!bf16)  // an fp32 device model holds every tensor (slice) as fp32: the largest is the staging bound
        for (int i = 0; i < old_dev.n_owned; i++) *largest = old_dev.owned_bytes[i] > *largest ? old_dev.owned_bytes[i] : *largest;
    const char *dtype = bf16 ? "bf16" : "fp32";
    check(same_buffers(&old_dev, &new_dev, ops), "%s rank %d/%d %s %s: %d device buffers byte-identical to the old path's",
          variant, rank, T, ops->name, dtype, old_dev.n_owned);
    if (T == 1) {
        float *a = logits_of(&old_dev, ops), *b = logits_of(&new_dev, ops);
        check(a && b && !memcmp(a, b, logits_bytes(&old_dev)), "%s %s %s: logits byte-identical", variant, ops->name, dtype);
        free(a), free(b);
    }
    size_t new_bytes = model_host_bytes(&new_host) + model_host_bytes(&new_dev), old_bytes = model_host_bytes(&old_host);
    printf("  %-20s rank %d/%d %-6s %s: host bytes old path %9zu, mapping path %6zu (+ staging %7zu), largest tensor %7zu\n",
           variant, rank, T, ops->name, dtype, old_bytes, new_bytes, new_dev.staging_bytes, *largest);
    if (!ops->host_memory)  // (a host backend's bf16 model is itself a host copy)
        check(new_bytes <= *largest && new_dev.staging_bytes <= *largest,
              "%s %s %s: the mapping path keeps at most one tensor on the host", variant, ops->name, dtype);
    if (strstr(variant, "16"))  // BF16 and F16 checkpoints: the old path converts every tensor on the host
        check(old_bytes > *largest, "%s: the old path's host model (%zu bytes) exceeds one tensor", variant, old_bytes);
    model_backend_free(&old_dev), model_backend_free(&new_dev);
    model_free(&old_host), model_free(&new_host);
}

// Flips one bit of one weight of the mapping path's device model: the logits must change.
static void can_fail(const char *variant) {
    char dir[256];
    snprintf(dir, sizeof dir, "tests/fixtures/models/%s", variant);
    const kernel_ops *ops = kernel_ops_offset();
    model host, dev;
    ep_error err = {{0}};
    if (model_open_shard(dir, 0, 1, &host, &err) || model_to_backend(&host, ops, 0, &dev, &err)) {
        check(0, "%s: %s", variant, err.msg);
        return;
    }
    float *before = logits_of(&dev, ops);
    const float *wo = dev.layers[dev.cfg.n_layers - 1].wo;
    float w;
    ops->download(&w, wo + 5, sizeof w);
    uint32_t u;
    memcpy(&u, &w, sizeof u), u ^= 1u << 20, memcpy(&w, &u, sizeof w);
    ops->upload((float *)wo + 5, &w, sizeof w);
    float *after = logits_of(&dev, ops);
    check(before && after && memcmp(before, after, logits_bytes(&dev)), "%s: a flipped weight bit changes the logits", variant);
    free(before), free(after);
    model_backend_free(&dev);
    model_free(&host);
}

// A host backend's fp32 model borrows the host weights: from a model without them it is an error.
static void refuses_host_fp32(void) {
    model host, dev;
    ep_error err = {{0}};
    if (model_open_shard("tests/fixtures/models/llama3-tiny-bf16", 0, 1, &host, &err)) {
        check(0, "%s", err.msg);
        return;
    }
    int rc = model_to_backend(&host, kernel_ops_cpu(), 0, &dev, &err);
    if (rc == 0) model_backend_free(&dev);
    check(rc != 0 && strstr(err.msg, "holds none") && !model_holds_weights(&host),
          "cpu fp32 from a model without weights refused: %s", rc ? err.msg : "(accepted)");
    model_free(&host);
}

int main(void) {
    for (size_t v = 0; v < sizeof variants / sizeof variants[0]; v++) {
        for (int T = 1; T <= 4; T *= 2) {
            char dir[256];
            snprintf(dir, sizeof dir, "tests/fixtures/models/%s", variants[v]);
            model probe;
            ep_error err = {{0}};
            if (model_open_shard(dir, 0, T, &probe, &err)) {  // a config that does not split over T ranks
                check(T > 1, "%s: %s", variants[v], err.msg);
                continue;
            }
            model_free(&probe);
            const kernel_ops *devices[] = {kernel_ops_offset(), kernel_ops_cuda()};  // cuda: NULL without a GPU
            for (int rank = 0; rank < T; rank++)
                for (size_t d = 0; d < sizeof devices / sizeof devices[0]; d++) {
                    if (!devices[d]) continue;
                    size_t largest = 0;
                    compare(variants[v], rank, T, devices[d], 0, &largest);
                    compare(variants[v], rank, T, devices[d], 1, &largest);
                    if (d == 0) compare(variants[v], rank, T, kernel_ops_cpu(), 1, &largest);
                }
        }
    }
    can_fail("llama3-tiny-bf16");
    refuses_host_fp32();
    return test_finish("test_upload");
}
