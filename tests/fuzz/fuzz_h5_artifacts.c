// libFuzzer target, structure-aware: the input drives our own writer (pipeline/h5store.h) to build a
// well-formed, committed HDF5 file, then every reader of that artifact runs on it. libhdf5 is not fuzzed
// (it is not robust to arbitrary bytes, and files are checked before it parses them); what is fuzzed
// is our readers' validation: ranks, shapes, counts and values that disagree with each other.
//
// Input: byte 0 picks the artifact (even: prompts.h5, odd: a prune round file), then records until the
// input ends, each: op (mod 5: i32 / f32 / f64 dataset, string / i64 attribute), name (index into
// `names`, the names our readers use), then
//   dataset: rank (1 + byte mod 4), rank dims (each mod 48; at most 4096 elements), one byte per element (val);
//   string:  length byte (>= 0xc0: one of `strings`, else mod 48 bytes that follow);
//   i64:     one byte (val).
// A name written twice keeps the first. Missing bytes read as 0.
// Readers: prompts.h5: prompt_set_load, then what later stages read of a loaded set (every token,
// type and index within lengths, every donor, target and pair id, circuit_start_edges); round file:
// prune_round_load, then what `edgepatch scores` and model_logs.json read (circuit_has of every unit in
// both circuits, the agreement counts as ints). Both: stage_output_current and h5store_open.
// EP_FUZZ_VERBOSE=1 prints why a reader refused the file (to check that a seed loads).
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "pipeline/h5store.h"
#include "stages/prompts.h"
#include "stages/circuit_file.h"
#include "stages/stage_inputs.h"
#include "stages/task.h"
#include "stages/tokenize.h"

static const char *names[] = {
    "tokens", "types", "index", "lengths", "donors", "donor_kinds", "targets", "target_lengths", "pair_ids",
    "units", "scores", "metrics", "compare/scores", "compare/agreement", "circuit/heads", "circuit/edges", "kept/heads",
    "kept/edges", "format", "task", "tokenizer_path", "inputs_hash", "kind", "method", "stop", "compare_method", "round",
    "pruned",
};
static const char *strings[] = {"edgepatch-prompts-1", "edgepatch-prune-round-1", "head", "edge", "attribution", "exact",
                                "min_units", "0123456789abcdef", ""};
#define N_NAMES (sizeof names / sizeof names[0])
#define N_STRINGS (sizeof strings / sizeof strings[0])

typedef struct {
    const uint8_t *p, *end;
} input;

static unsigned next(input *in) { return in->p < in->end ? *in->p++ : 0; }

// An element value: small numbers mostly, and the edges of the ranges.
static double val(unsigned b, int is_int) {
    static const double special[16] = {-1, -2, 2147483647.0, -2147483648.0, 1 << 30, 65536, 1e9, -1e9,
                                       NAN, INFINITY, -INFINITY, 1e30, -1e30, 3.5, 0.5, 1e300};
    if (b >= 0xf0) {
        double v = special[b - 0xf0];
        if (is_int && !isfinite(v)) return 0;
        if (is_int && (v > 2147483647.0 || v < -2147483648.0)) return v > 0 ? 2147483647.0 : -2147483648.0;
        return is_int ? (double)(int64_t)v : v;
    }
    return is_int ? (double)((int)b - 16) : ((int)b - 16) / 4.0;
}

static int64_t val_i64(unsigned b) {
    static const int64_t special[8] = {INT64_MAX, INT64_MIN, 2147483648LL, -2147483649LL, 1LL << 40, -1, 4294967296LL, 1000000000};
    return b >= 0xf8 ? special[b - 0xf8] : (int64_t)b - 16;
}

static char dir[64], prompts_path[128], round_path[160];

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    // h5store_commit fsyncs the file and its folder: on tmpfs that costs nothing (on a disk it would
    // bound the target to a few dozen runs a second).
    struct stat st;
    snprintf(dir, sizeof dir, "%s/ep-fuzz-h5-%d", stat("/dev/shm", &st) == 0 ? "/dev/shm" : "/tmp", (int)getpid());
    char sub[96];
    snprintf(sub, sizeof sub, "%s/prune.d", dir);
    mkdir(dir, 0700), mkdir(sub, 0700);
    snprintf(prompts_path, sizeof prompts_path, "%s/prompts.h5", dir);
    snprintf(round_path, sizeof round_path, "%s/prune.d/round-000.h5", dir);
    return 0;
}

static int build(input *in, const char *path) {
    h5store s;
    ep_error err = {{0}};
    if (h5store_create(path, &s, &err)) abort();
    unsigned char written[N_NAMES] = {0};
    while (in->p < in->end) {
        unsigned op = next(in) % 5, k = next(in) % N_NAMES;
        const char *name = names[k];
        int fresh = !written[k];
        written[k] = 1;
        if (op < 3) {
            h5shape sh = {1 + (int)(next(in) % 4), {0}};  // the writer refuses rank 0
            size_t n = 1;
            for (int d = 0; d < sh.rank; d++) n *= (size_t)(sh.dims[d] = next(in) % 48);
            if (n > 4096) continue;
            int32_t *vi = malloc(sizeof(int32_t) * (n + 1));
            float *vf = malloc(sizeof(float) * (n + 1));
            double *vd = malloc(sizeof(double) * (n + 1));
            for (size_t i = 0; i < n; i++) {
                unsigned b = next(in);
                vi[i] = (int32_t)val(b, 1), vf[i] = (float)(fabs(val(b, 0)) > 1e38 && isfinite(val(b, 0)) ? copysign(INFINITY, val(b, 0)) : val(b, 0)),
                vd[i] = val(b, 0);
            }
            int rc = !fresh ? 0
                     : op == 0 ? h5store_write_i32(&s, name, &sh, vi, &err)
                     : op == 1 ? h5store_write_f32(&s, name, &sh, vf, &err)
                               : h5store_write_f64(&s, name, &sh, vd, &err);
            free(vi), free(vf), free(vd);
            if (rc) {  // our writer must take any shape within its rank limit
                fprintf(stderr, "writer: %s\n", err.msg);
                abort();
            }
        } else if (op == 3) {
            unsigned len = next(in);
            char text[64];
            if (len >= 0xc0) {
                snprintf(text, sizeof text, "%s", strings[(len - 0xc0) % N_STRINGS]);
            } else {
                len %= 48;
                for (unsigned i = 0; i < len; i++) text[i] = (char)(next(in) | 1);  // no NUL inside
                text[len] = 0;
            }
            if (fresh && h5store_set_str(&s, name, text, &err)) abort();
        } else {
            int64_t v = val_i64(next(in));
            if (fresh && h5store_set_i64(&s, name, v, &err)) abort();
        }
    }
    if (h5store_commit(&s, &err)) abort();
    return 0;
}

static volatile unsigned sink;

static void read_prompts(const model_config *cfg) {
    prompt_set ps;
    ep_error err = {{0}};
    if (prompt_set_load(prompts_path, &ps, &err)) {
        if (getenv("EP_FUZZ_VERBOSE")) fprintf(stderr, "prompt_set_load: %s\n", err.msg);
        return;
    }
    // What later stages read of a loaded prompt set (stage_batch, the forward passes, the metrics).
    for (int p = 0; p < ps.n_prompts; p++) {
        int T = ps.lengths[p];
        for (int i = 0; i < T; i++) {
            size_t at = (size_t)p * ps.max_len + i;
            sink += (unsigned)ps.tokens[at] + (unsigned)ps.types[at] + (unsigned)ps.index[at];
            sink += (unsigned)strlen(token_type_name(ps.types[at]));
            for (int d = 0; d < ps.n_donors; d++) sink += (unsigned)ps.donors[((size_t)p * ps.n_donors + d) * ps.max_len + i];
        }
        for (int j = 0; j < ps.target_lengths[p]; j++) sink += (unsigned)ps.targets[(size_t)p * ps.max_target + j];
        for (int j = 0; j < ps.n_pairs; j++) sink += (unsigned)ps.pair_ids[(size_t)p * ps.n_pairs + j];
    }
    for (int d = 0; d < ps.n_donors; d++) sink += (unsigned)strlen(donor_kind_name((donor_kind)ps.donor_kinds[d]));
    circuit c;
    circuit_full(cfg, &c);
    circuit_start_edges(&c, &ps);
    circuit_free(&c);
    prompt_set_free(&ps);
}

static void read_round(void) {
    prune_round r;
    ep_error err = {{0}};
    if (prune_round_load(dir, 0, &r, &err)) {
        if (getenv("EP_FUZZ_VERBOSE")) fprintf(stderr, "prune_round_load: %s\n", err.msg);
        return;
    }
    for (int i = 0; i < r.n_units; i++) {
        sink += (unsigned)circuit_has(&r.kept, r.kind, &r.units[i]) + (unsigned)circuit_has(&r.circuit, r.kind, &r.units[i]);
        sink += (unsigned)strlen(token_type_name(r.units[i].type)) + (unsigned)strlen(token_type_name(r.units[i].sender)) +
                (unsigned)strlen(token_type_name(r.units[i].receiver));
        sink += r.scores[i] > 0;  // (unsigned) of a negative or NaN score would be undefined
    }
    if (r.compare_scores) sink += (unsigned)(int)r.agreement[2] + (unsigned)(int)r.agreement[3];
    prune_round_free(&r);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static model_config cfg;
    static int have_cfg;
    if (!have_cfg) {
        memset(&cfg, 0, sizeof cfg);
        cfg.n_layers = 2, cfg.n_heads = 4;  // circuit_full reads only these
        have_cfg = 1;
    }
    input in = {data, data + size};
    int is_round = next(&in) & 1;
    const char *path = is_round ? round_path : prompts_path;
    build(&in, path);
    if (is_round) read_round();
    else read_prompts(&cfg);
    ep_error err = {{0}};
    (void)stage_output_current(path, "0123456789abcdef", 0, NULL, &err);
    h5store s;
    if (h5store_open(path, &s, &err) == 0) h5store_close(&s);
    unlink(path);
    return 0;
}
