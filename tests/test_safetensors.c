// safetensors and config.json readers: round trip of every dtype against values computed here, and
// the failure modes a user meets (truncated file, lying header, overlapping tensors, bad shard index,
// malformed or inconsistent config.json), each of which must be a one-line error naming the file.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pipeline/model.h"
#include "pipeline/safetensors.h"
#include "tests/harness.h"

static char tmpdir[256];

static void path_in(char *out, size_t n, const char *name) { snprintf(out, n, "%s/%s", tmpdir, name); }

// Writes an 8-byte little-endian header length, the header and the data.
static void write_raw(const char *name, const char *header, const void *data, size_t n_data) {
    char path[512];
    path_in(path, sizeof path, name);
    FILE *f = fopen(path, "wb");
    unsigned long long len = strlen(header);
    for (int i = 0; i < 8; i++) fputc((int)((len >> (8 * i)) & 0xff), f);
    fwrite(header, 1, len, f);
    if (n_data) fwrite(data, 1, n_data, f);
    fclose(f);
}

static void write_text(const char *name, const char *text) {
    char path[512];
    path_in(path, sizeof path, name);
    FILE *f = fopen(path, "w");
    fputs(text, f);
    fclose(f);
}

static int open_fails_with(const char *name, const char *needle) {
    char path[512];
    path_in(path, sizeof path, name);
    safetensors st;
    ep_error err = {{0}};
    int rc = safetensors_open_file(path, &st, &err);
    if (rc == 0) {
        safetensors_close(&st);
        printf("  %s: opened, expected an error containing '%s'\n", name, needle);
        return 0;
    }
    int ok = strstr(err.msg, needle) != NULL && strstr(err.msg, name) != NULL && !strchr(err.msg, '\n');
    printf("  %s -> %s\n", name, err.msg);
    return ok;
}

static void test_dtypes(void) {
    // F32 [2,3], BF16 [4], F16 [3] (with a subnormal), I64 [2]
    unsigned char data[24 + 8 + 6 + 16];
    float f32[6] = {1.5f, -2.25f, 3.0e-8f, 1e30f, -0.0f, 7.0f};
    memcpy(data, f32, 24);
    uint16_t bf[4] = {0x3fc0, 0xc010, 0x0001, 0x7f80};  // 1.5, -2.25, smallest subnormal, +inf
    memcpy(data + 24, bf, 8);
    uint16_t hf[3] = {0x3e00, 0x0001, 0xfbff};  // 1.5, 2^-24, -65504
    memcpy(data + 32, hf, 6);
    long long i64[2] = {-5, 2147483647LL};
    memcpy(data + 38, i64, 16);
    write_raw("dtypes.safetensors",
              "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"
              "\"b\":{\"dtype\":\"BF16\",\"shape\":[4],\"data_offsets\":[24,32]},"
              "\"c\":{\"dtype\":\"F16\",\"shape\":[3],\"data_offsets\":[32,38]},"
              "\"d\":{\"dtype\":\"I64\",\"shape\":[2],\"data_offsets\":[38,54]},"
              "\"__metadata__\":{\"format\":\"pt\"}}",
              data, sizeof data);
    char path[512];
    path_in(path, sizeof path, "dtypes.safetensors");
    safetensors st;
    ep_error err = {{0}};
    check(safetensors_open_file(path, &st, &err) == 0, "open: %s", err.msg);
    check(st.n_tensors == 4, "4 tensors, got %d", st.n_tensors);
    float out[6];
    const st_tensor *t = safetensors_find(&st, "a");
    check(t && t->ndim == 2 && t->shape[0] == 2 && t->shape[1] == 3, "a: shape");
    check(t && safetensors_read_f32(t, out, &err) == 0 && !memcmp(out, f32, 24), "a: F32 values");
    t = safetensors_find(&st, "b");
    check(t && safetensors_read_f32(t, out, &err) == 0 && out[0] == 1.5f && out[1] == -2.25f &&
              out[2] == ldexpf(1.0f, -133) && isinf(out[3]),
          "b: BF16 values");
    t = safetensors_find(&st, "c");
    check(t && safetensors_read_f32(t, out, &err) == 0 && out[0] == 1.5f && out[1] == ldexpf(1.0f, -24) &&
              out[2] == -65504.0f,
          "c: F16 values (incl. subnormal)");
    int32_t iv[2];
    t = safetensors_find(&st, "d");
    check(t && safetensors_read_i32(t, iv, &err) == 0 && iv[0] == -5 && iv[1] == 2147483647, "d: I64 values");
    check(safetensors_find(&st, "nope") == NULL, "find of a missing name");
    check(st.metadata_json && strstr(st.metadata_json, "format"), "metadata kept");
    safetensors_close(&st);
    check(f32_to_bf16(1.00390625f) == 0x3f80 && f32_to_bf16(1.01171875f) == 0x3f82, "bf16 round to nearest even");
}

static void test_bad_files(void) {
    float z[4] = {0};
    write_raw("truncated.safetensors", "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", z, 8);
    check(open_fails_with("truncated.safetensors", "outside"), "truncated data");
    write_raw("badjson.safetensors", "{\"a\": [", z, 0);
    check(open_fails_with("badjson.safetensors", "JSON"), "bad header JSON");
    write_raw("mismatch.safetensors", "{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,16]}}", z, 16);
    check(open_fails_with("mismatch.safetensors", "need"), "bytes do not match shape");
    write_raw("overlap.safetensors",
              "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
              "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
              z, 16);
    check(open_fails_with("overlap.safetensors", "overlap"), "overlapping tensors");
    write_raw("dtype.safetensors", "{\"a\":{\"dtype\":\"F8_E4M3\",\"shape\":[4],\"data_offsets\":[0,4]}}", z, 4);
    check(open_fails_with("dtype.safetensors", "dtype"), "unsupported dtype");
    write_raw("shape.safetensors", "{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", z, 4);
    check(open_fails_with("shape.safetensors", "shape"), "negative dimension");
    // A header length that points past the end of the file.
    char path[512];
    path_in(path, sizeof path, "hugeheader.safetensors");
    FILE *f = fopen(path, "wb");
    unsigned char len[8] = {0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0};
    fwrite(len, 1, 8, f);
    fputs("{}", f);
    fclose(f);
    check(open_fails_with("hugeheader.safetensors", "header length"), "header length beyond the file");
    path_in(path, sizeof path, "tiny.safetensors");
    f = fopen(path, "wb");
    fputs("abc", f);
    fclose(f);
    check(open_fails_with("tiny.safetensors", "truncated"), "file shorter than 8 bytes");
    check(open_fails_with("does-not-exist.safetensors", "cannot open"), "missing file");
}

static void test_sharded_index(void) {
    float one[2] = {1, 2}, two[3] = {3, 4, 5};
    char dir[512];
    path_in(dir, sizeof dir, "sharded");
    char cmd[600];
    snprintf(cmd, sizeof cmd, "mkdir -p %s", dir);
    check(system(cmd) == 0, "mkdir");
    write_raw("sharded/s1.safetensors", "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", one, 8);
    write_raw("sharded/s2.safetensors", "{\"y\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,12]}}", two, 12);
    write_text("sharded/model.safetensors.index.json",
               "{\"metadata\":{},\"weight_map\":{\"x\":\"s1.safetensors\",\"y\":\"s2.safetensors\"}}");
    safetensors st;
    ep_error err = {{0}};
    check(safetensors_open_dir(dir, &st, &err) == 0, "sharded open: %s", err.msg);
    float out[3];
    const st_tensor *t = safetensors_find(&st, "y");
    check(st.n_files == 2 && t && safetensors_read_f32(t, out, &err) == 0 && out[2] == 5, "sharded read");
    safetensors_close(&st);

    write_text("sharded/model.safetensors.index.json",
               "{\"weight_map\":{\"x\":\"s1.safetensors\",\"y\":\"s2.safetensors\",\"z\":\"s2.safetensors\"}}");
    check(safetensors_open_dir(dir, &st, &err) != 0 && strstr(err.msg, "'z'"), "index names a missing tensor: %s",
          err.msg);
    write_text("sharded/model.safetensors.index.json", "{\"weight_map\":{\"x\":\"../s1.safetensors\"}}");
    check(safetensors_open_dir(dir, &st, &err) != 0 && strstr(err.msg, "weight_map"), "index path escape: %s", err.msg);
    write_text("sharded/model.safetensors.index.json", "{\"weight_map\":{\"x\":\"s3.safetensors\"}}");
    check(safetensors_open_dir(dir, &st, &err) != 0 && strstr(err.msg, "s3.safetensors"), "missing shard: %s", err.msg);
}

static int config_fails_with(const char *json, const char *needle) {
    write_text("config.json", json);
    char path[512];
    path_in(path, sizeof path, "config.json");
    model_config cfg;
    ep_error err = {{0}};
    if (model_config_load(path, &cfg, &err) == 0) return 0;
    printf("  config -> %s\n", err.msg);
    return strstr(err.msg, needle) && strstr(err.msg, "config.json");
}

static void test_config(void) {
    const char *llama = "{\"architectures\":[\"LlamaForCausalLM\"],\"vocab_size\":100,\"hidden_size\":64,"
                        "\"num_hidden_layers\":2,\"num_attention_heads\":8,\"num_key_value_heads\":2,"
                        "\"intermediate_size\":128,\"rope_theta\":500000.0,\"rope_scaling\":{\"rope_type\":\"llama3\","
                        "\"factor\":8.0,\"low_freq_factor\":1.0,\"high_freq_factor\":4.0,"
                        "\"original_max_position_embeddings\":32},\"eos_token_id\":[5,6]}";
    write_text("config.json", llama);
    char path[512];
    path_in(path, sizeof path, "config.json");
    model_config cfg;
    ep_error err = {{0}};
    check(model_config_load(path, &cfg, &err) == 0, "llama config: %s", err.msg);
    check(cfg.head_dim == 8 && cfg.rotary_dim == 8 && cfg.rope_llama3 && cfg.n_eos == 2 && cfg.eos_ids[1] == 6,
          "llama config fields");
    // llama3 scaling against the formula evaluated here in double: low band / factor, high band unchanged.
    float f[4];
    model_config_inv_freq(&cfg, f);
    for (int i = 0; i < 4; i++) {
        double base = 1.0 / pow(500000.0, 2.0 * i / 8), wl = 2 * 3.141592653589793 / base, want;
        if (wl < 32 / 4.0) want = base;
        else if (wl > 32 / 1.0) want = base / 8;
        else {
            double sm = (32 / wl - 1) / 3;
            want = (1 - sm) * base / 8 + sm * base;
        }
        check(fabs(f[i] - want) <= 1e-6 * want, "llama3 inv_freq[%d] = %g, want %g", i, f[i], want);
    }
    check(config_fails_with("{\"architectures\":[\"LlamaForCausalLM\"],", "line"), "malformed JSON");
    check(config_fails_with("{\"architectures\":[\"GPTNeoXForCausalLM\"]}", "architectures"), "unknown architecture");
    check(config_fails_with("{\"architectures\":[\"LlamaForCausalLM\"],\"vocab_size\":100,\"hidden_size\":64,"
                            "\"num_hidden_layers\":2,\"num_attention_heads\":8,\"num_key_value_heads\":3,"
                            "\"intermediate_size\":128}",
                            "does not divide"),
          "kv heads do not divide heads");
    check(config_fails_with("{\"architectures\":[\"LlamaForCausalLM\"],\"vocab_size\":\"many\"}", "vocab_size"),
          "wrong type");
    check(config_fails_with("{\"architectures\":[\"LlamaForCausalLM\"],\"hidden_size\":64}", "vocab_size"),
          "missing required field");
    check(config_fails_with("{\"architectures\":[\"PhiForCausalLM\"],\"vocab_size\":100,\"hidden_size\":64,"
                            "\"num_hidden_layers\":2,\"num_attention_heads\":8,\"intermediate_size\":128,"
                            "\"qk_layernorm\":true}",
                            "qk_layernorm"),
          "unsupported option");
    check(config_fails_with("{\"architectures\":[\"LlamaForCausalLM\"],\"vocab_size\":100,\"hidden_size\":64,"
                            "\"num_hidden_layers\":2,\"num_attention_heads\":8,\"intermediate_size\":128,"
                            "\"rope_scaling\":{\"rope_type\":\"yarn\",\"factor\":2.0}}",
                            "yarn"),
          "unsupported rope scaling");
    // Found by fuzzing (tests/fuzz/fuzz_config.c) or by reading the code while writing the target: each
    // must be an error, not undefined behaviour or an absurd allocation.
    const char *phi = "{\"architectures\":[\"PhiForCausalLM\"],\"vocab_size\":100,\"hidden_size\":64,"
                      "\"num_hidden_layers\":2,\"num_attention_heads\":8,\"intermediate_size\":128,";
    char json[1024];
    snprintf(json, sizeof json, "%s\"partial_rotary_factor\":1e30}", phi);
    check(config_fails_with(json, "partial_rotary_factor"), "partial_rotary_factor 1e30 (float to int overflow)");
    snprintf(json, sizeof json, "%s\"partial_rotary_factor\":-0.5}", phi);
    check(config_fails_with(json, "partial_rotary_factor"), "negative partial_rotary_factor");
    snprintf(json, sizeof json, "%s\"rope_theta\":1e300}", phi);
    check(config_fails_with(json, "rope_theta"), "rope_theta beyond float range");
    snprintf(json, sizeof json, "%s\"eos_token_id\":[2, 1099511627776]}", phi);
    check(config_fails_with(json, "eos_token_id"), "eos_token_id beyond int");
    check(config_fails_with("{\"architectures\":[\"Gemma2ForCausalLM\"],\"vocab_size\":100,\"hidden_size\":64,"
                            "\"num_hidden_layers\":2,\"num_attention_heads\":8,\"intermediate_size\":128,"
                            "\"head_dim\":1000000000}",
                            "out of range"),
          "head_dim 1e9 (int overflow of n_heads * head_dim, 2 GB of rotary frequencies)");
    // Gemma's sqrt(hidden) factor, rounded to bf16 for a bf16 run: torch 2.4 gives 59.75 for 3584 (9B) and 68 for
    // 4608 (27B).
    model_config g = {.scale_embeddings = 1, .hidden = 3584};
    check(model_embed_scale(&g, 0) == (float)sqrt(3584.0) && model_embed_scale(&g, 1) == 59.75f, "embed scale 9B");
    g.hidden = 4608;
    check(model_embed_scale(&g, 1) == 68.0f, "embed scale 27B");
}

// A weight with 8 huge dimensions and no elements: model_load's shape message used to run its write
// pointer past a 96-byte buffer (and wrap the size it gave snprintf), cutting the message short.
static void test_long_shape_message(void) {
    char cmd[600], path[512];
    snprintf(cmd, sizeof cmd, "mkdir -p %s/longshape", tmpdir);
    check(system(cmd) == 0, "mkdir");
    write_text("longshape/config.json", "{\"architectures\":[\"LlamaForCausalLM\"],\"vocab_size\":100,"
                                        "\"hidden_size\":64,\"num_hidden_layers\":1,\"num_attention_heads\":8,"
                                        "\"intermediate_size\":128,\"tie_word_embeddings\":true}");
    write_raw("longshape/model.safetensors",
              "{\"model.embed_tokens.weight\":{\"dtype\":\"F32\",\"shape\":[0,1099511627776,1099511627776,"
              "1099511627776,1099511627776,1099511627776,1099511627776,1099511627776],\"data_offsets\":[0,0]}}",
              NULL, 0);
    path_in(path, sizeof path, "longshape");
    model m;
    ep_error err = {{0}};
    int rc = model_load(path, &m, &err);
    if (rc == 0) model_free(&m);
    printf("  longshape -> %s\n", err.msg);
    check(rc != 0 && strstr(err.msg, "embed_tokens") && strstr(err.msg, "1099511627776, 1099511627776], config"),
          "8-dim shape message, complete");
}

int main(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/ep_test_safetensors_%d", (int)getpid());
    char cmd[300];
    snprintf(cmd, sizeof cmd, "mkdir -p %s", tmpdir);
    if (system(cmd) != 0) return 1;
    test_dtypes();
    test_bad_files();
    test_sharded_index();
    test_config();
    test_long_shape_message();
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd) != 0) return 1;
    return test_finish("test_safetensors");
}
