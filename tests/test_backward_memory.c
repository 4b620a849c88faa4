// backward_bytes (pipeline/backward.h) against the allocations model_backward really makes: this program
// is linked with -Wl,--wrap=malloc,--wrap=calloc,--wrap=realloc,--wrap=free (tests/CMakeLists.txt), so
// every allocation of the project's code (pipeline/, kernels/: ep_malloc, kernel_malloc) passes through
// the counters below, which record the bytes asked for, the most live at once while a pass runs, and
// what is still live when it returns. For the four tiny architectures, whole and as either rank of a
// tensor-parallel pair (a stand-in group: the values are wrong, the allocations are the shard's), clean,
// with head units only, and with edge rules reading two donors, over sequences of different lengths:
// the formula's peak and tape must be the counted bytes exactly. Then a can-fail sibling: a formula
// with one buffer left out, or one grown by a row, is caught by the same comparison.
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu_gemm.h"
#include "pipeline/backward.h"
#include "tests/harness.h"

// The counters: the wrappers are process-wide by nature (they replace malloc), so their state is too.
// An open-addressing table of the live blocks allocated while counting (pointer -> bytes); frees of
// blocks not in it (allocated before counting began) are passed through uncounted.
void *__real_malloc(size_t n);
void *__real_calloc(size_t c, size_t s);
void *__real_realloc(void *p, size_t n);
void __real_free(void *p);

#define SLOTS (1u << 16)
static struct {
    pthread_mutex_t mu;
    int on;
    size_t live, peak, n_live;
    void *key[SLOTS];
    size_t bytes[SLOTS];
} mem = {.mu = PTHREAD_MUTEX_INITIALIZER};

static size_t slot_of(const void *p) { return ((uintptr_t)p >> 4) * 2654435761u % SLOTS; }

static void note_alloc(void *p, size_t n) {
    if (!p) return;
    pthread_mutex_lock(&mem.mu);
    if (mem.on && mem.n_live < SLOTS / 2) {
        size_t i = slot_of(p);
        while (mem.key[i]) i = (i + 1) % SLOTS;
        mem.key[i] = p, mem.bytes[i] = n, mem.n_live++;
        mem.live += n;
        if (mem.live > mem.peak) mem.peak = mem.live;
    }
    pthread_mutex_unlock(&mem.mu);
}

// Removes p (backward-shift deletion keeps every probe chain whole).
static void note_free(void *p) {
    if (!p) return;
    pthread_mutex_lock(&mem.mu);
    size_t i = slot_of(p);
    while (mem.key[i] && mem.key[i] != p) i = (i + 1) % SLOTS;
    if (mem.key[i]) {
        mem.live -= mem.bytes[i], mem.n_live--;
        mem.key[i] = NULL;
        for (size_t j = (i + 1) % SLOTS; mem.key[j]; j = (j + 1) % SLOTS) {
            size_t home = slot_of(mem.key[j]);
            // j's entry may move into the hole i when its home is not in the cyclic range (i, j].
            if ((j > i && (home <= i || home > j)) || (j < i && home <= i && home > j)) {
                mem.key[i] = mem.key[j], mem.bytes[i] = mem.bytes[j];
                mem.key[j] = NULL;
                i = j;
            }
        }
    }
    pthread_mutex_unlock(&mem.mu);
}

void *__wrap_malloc(size_t n) {
    void *p = __real_malloc(n);
    note_alloc(p, n);
    return p;
}

void *__wrap_calloc(size_t c, size_t s) {
    void *p = __real_calloc(c, s);
    note_alloc(p, c * s);
    return p;
}

void *__wrap_realloc(void *p, size_t n) {
    note_free(p);
    void *q = __real_realloc(p, n);
    note_alloc(q, n);
    return q;
}

void __wrap_free(void *p) {
    note_free(p);
    __real_free(p);
}

static void counting(int on) {
    pthread_mutex_lock(&mem.mu);
    if (on) mem.peak = mem.live;
    mem.on = on;
    pthread_mutex_unlock(&mem.mu);
}

static size_t live_bytes(void) {
    pthread_mutex_lock(&mem.mu);
    size_t n = mem.live;
    pthread_mutex_unlock(&mem.mu);
    return n;
}

// A stand-in for the other rank of a pair: sums leave the buffer as it is, gathers repeat this rank's part.
static int fake_sum(void *ctx, float *buf, size_t n, ep_error *err) {
    (void)ctx, (void)buf, (void)n, (void)err;
    return 0;
}
static int fake_sum64(void *ctx, double *buf, size_t n, ep_error *err) {
    (void)ctx, (void)buf, (void)n, (void)err;
    return 0;
}
static int fake_gather(void *ctx, const float *send, float *recv, size_t n, ep_error *err) {
    (void)err;
    for (int r = 0; r < *(const int *)ctx; r++) memcpy(recv + (size_t)r * n, send, sizeof(float) * n);
    return 0;
}

enum { S = 3, CASES = 3 };
static const int lens[S] = {7, 12, 9}, targets[S] = {1, 3, 2};

// Case 0: clean; 1: head units reading donor 1 of 2; 2: edge rules reading donors 0 and 1 (in layers 0 and
// the last; the others' rule sets empty), and a head unit.
static void run_case(const model *m, int cse, const char *what, backward_memory *want_out, size_t *peak_out,
                     size_t *tape_out) {
    const model_config *c = &m->cfg;
    int T = 0, max_len = 0, max_prompt = 0;
    for (int s = 0; s < S; s++) {
        T += lens[s];
        max_len = lens[s] > max_len ? lens[s] : max_len;
        max_prompt = lens[s] - targets[s] > max_prompt ? lens[s] - targets[s] : max_prompt;
    }
    int *tokens = calloc((size_t)T, sizeof(int));
    for (int r = 0; r < T; r++) tokens[r] = (r * 37 + 5) % c->vocab_size;
    int32_t *types = calloc((size_t)S * max_len, sizeof(int32_t)), *index = calloc((size_t)S * max_len, sizeof(int32_t));
    int n_typed[S];
    for (int s = 0; s < S; s++) {
        n_typed[s] = lens[s] - targets[s];
        for (int i = 0; i < max_len; i++) types[s * max_len + i] = i % 3, index[s * max_len + i] = i / 3;
    }
    ep_error err = {{0}};
    int n_donors = cse == 0 ? 0 : 2;
    kv_cache donors[2];
    memset(donors, 0, sizeof donors);
    // The donor caches patch_donor_passes makes (kv_cache_init_backend with head outputs, the prompts' longest).
    size_t before = live_bytes();
    counting(1);
    for (int d = 0; d < n_donors; d++) kv_cache_init(&donors[d], c, S, max_prompt, 1, &err);
    counting(0);
    size_t donor_bytes = live_bytes() - before;
    edge_rule_set *rules = calloc((size_t)c->n_layers, sizeof *rules);
    for (int l = 0; l < c->n_layers; l++) {
        if (l != 0 && l != c->n_layers - 1) continue;
        rules[l].n = 2;
        for (int r = 0; r < 2; r++) {
            edge_rule *e = &rules[l].rule[r];
            *e = (edge_rule){.sender_types = r ? 2u : 5u, .receiver_types = 7u, .relation = REL_ANY, .donor = r};
            for (int h = 0; h < c->n_heads; h++) e->heads[h >> 6] |= 1ull << (h & 63);
        }
    }
    head_unit hu[2] = {{.layer = 0, .head = c->n_heads - 1, .type = 1, .donor = 1},
                       {.layer = c->n_layers - 1, .head = 0, .type = 0, .donor = 0}};
    forward_patch patch = {.layer_rules = cse == 2 ? rules : NULL, .head_units = hu, .n_head_units = 2,
                           .n_donors = n_donors, .donors = {&donors[0], &donors[1]}, .types = types,
                           .index = index, .type_stride = max_len, .n_typed = n_typed};
    grad_batch b = {.n_seqs = S, .len = lens, .n_target = targets, .tokens = tokens};
    backward_shape sh = {.n_seqs = S, .len = lens, .n_target = targets, .n_donors = n_donors,
                         .donor_capacity = max_prompt, .edge_rules = cse == 2, .n_threads = cpu_threads()};
    backward_memory want;
    check(backward_bytes(c, &sh, &want, &err) == 0, "%s: %s", what, err.msg);
    grad_tape t;
    before = live_bytes();
    counting(1);
    int rc = model_backward(kernel_ops_cpu(), m, &b, cse ? &patch : NULL, &t, &err);
    counting(0);
    size_t peak = mem.peak - before, tape = live_bytes() - before;
    check(rc == 0, "%s: %s", what, err.msg);
    check(peak == want.peak, "%s: peak %zu bytes counted, backward_bytes says %zu", what, peak, want.peak);
    check(tape == want.tape, "%s: tape %zu bytes counted, backward_bytes says %zu", what, tape, want.tape);
    check(donor_bytes == want.donors, "%s: donors %zu bytes counted, backward_bytes says %zu", what, donor_bytes,
          want.donors);
    if (rc == 0) grad_tape_free(&t);
    // EAP-IG over 3 path points (grad_ig_sums: the clean tape held beside each later point's pass) with
    // the patch's head units, and in case 2 an edge unit too.
    if (cse > 0) {
        int *donor_tokens = calloc((size_t)T, sizeof(int));
        for (int r = 0; r < T; r++) donor_tokens[r] = (r * 11 + 3) % c->vocab_size;
        edge_unit eu = {.layer = 0, .head = 0, .sender = 0, .receiver = 1, .donor = 0};
        int n_edges = cse == 2;
        double *hsum = calloc(2 * S, sizeof(double)), *esum = calloc(S, sizeof(double));
        grad_ig_request r = {.steps = 3, .donor_tokens = donor_tokens, .heads = hu, .n_heads = 2,
                             .edges = &eu, .n_edges = n_edges, .head_sums = hsum, .edge_sums = esum};
        sh.ig_steps = 3, sh.ig_head_units = 2, sh.ig_edge_units = n_edges;
        backward_memory ig;
        check(backward_bytes(c, &sh, &ig, &err) == 0, "%s: %s", what, err.msg);
        before = live_bytes();
        counting(1);
        rc = grad_ig_sums(kernel_ops_cpu(), m, &b, &patch, &r, &err);
        counting(0);
        size_t ig_peak = mem.peak - before;
        check(rc == 0, "%s eap-ig: %s", what, err.msg);
        check(ig_peak == ig.peak_ig, "%s eap-ig: peak %zu bytes counted, backward_bytes says %zu", what, ig_peak,
              ig.peak_ig);
        check(live_bytes() == before, "%s eap-ig: %zu bytes left behind", what, live_bytes() - before);
        // Can-fail sibling: without the clean tape held beside the path's passes the count differs.
        check(ig.peak_ig - ig.tape != ig_peak, "%s eap-ig: a peak without the held clean tape is caught", what);
        free(donor_tokens), free(hsum), free(esum);
    }
    for (int d = 0; d < n_donors; d++) kv_cache_free(&donors[d]);
    free(rules), free(tokens), free(types), free(index);
    *want_out = want, *peak_out = peak, *tape_out = tape;
}

int main(void) {
    const char *models[] = {"gemma2-tiny", "llama3-tiny", "smollm-tiny", "phi2-tiny"};
    int two = 2;
    ep_group pair = {.size = 2, .ctx = &two, .sum_f32 = fake_sum, .gather_f32 = fake_gather, .sum_f64 = fake_sum64};
    ep_group pair1 = pair;
    pair1.rank = 1;
    int checked = 0;
    size_t largest_part = 0;
    for (int i = 0; i < 4; i++) {
        for (int split = 0; split < 3; split++) {  // whole; rank 0 of 2; rank 1 of 2
            char dir[256], what[128];
            snprintf(dir, sizeof dir, "tests/fixtures/models/%s", models[i]);
            model m;
            ep_error err = {{0}};
            int rank = split == 2, size = split ? 2 : 1;
            if (model_load_shard(dir, rank, size, &m, &err)) {
                check(0, "%s: %s", dir, err.msg);
                continue;
            }
            if (split) m.group = rank ? &pair1 : &pair;
            for (int cse = 0; cse < CASES; cse++) {
                snprintf(what, sizeof what, "%s rank %d of %d case %d", models[i], rank, size, cse);
                backward_memory want;
                size_t peak, tape;
                run_case(&m, cse, what, &want, &peak, &tape);
                checked++;
                // Can-fail siblings: the same comparison with one part missing or one row too many fails.
                if (i == 0 && split == 2 && cse == 2) {
                    check(want.peak - want.scratch != peak, "%s: a peak without the layer scratch is caught", what);
                    check(want.tape + want.tape_dz / (size_t)m.cfg.n_layers != tape,
                          "%s: a tape with one layer's dL/dz too many is caught", what);
                    check(want.peak - want.attention != peak, "%s: a peak without attention_back's blocks is caught",
                          what);
                }
                largest_part = want.peak > largest_part ? want.peak : largest_part;
            }
            model_free(&m);
        }
    }
    check(checked == 4 * 3 * CASES && largest_part > 0, "%d passes compared", checked);
    // Bad shapes are refused with the field named.
    {
        model_config c = {0};
        int len = 3, nt = 3;
        backward_shape sh = {.n_seqs = 1, .len = &len, .n_target = &nt, .n_threads = 1};
        backward_memory out;
        ep_error err = {{0}};
        check(backward_bytes(&c, &sh, &out, &err) != 0 && strstr(err.msg, "targets"), "targets >= tokens refused: %s",
              err.msg);
        nt = 1, sh.n_threads = 0;
        check(backward_bytes(&c, &sh, &out, &err) != 0 && strstr(err.msg, "threads"), "no threads refused: %s", err.msg);
    }
    return test_finish("test_backward_memory");
}
