// libFuzzer target for the tokenizer: the first byte picks a mode.
//   mode 0..5: the rest is text for one of the fixture tokenizers (loaded once, from
//              $EP_TOKENIZER_FIXTURES or tests/fixtures/tokenizers, so run it from the repository root):
//              encode with and without specials, decode both ways; for the byte-level ones, decoding
//              must give back the text exactly (after invalid UTF-8 is replaced), else abort.
//   mode 6..7: the rest is a tokenizer.json for the loader; whatever loads is then used to encode and
//              decode a few strings and the input itself.
// Build: CC=clang cmake -S . -B build-fuzz -DEP_FUZZ=ON && cmake --build build-fuzz --target fuzz_tokenizer
// Run:   ./build-fuzz/tests/fuzz_tokenizer -max_total_time=300 tests/fuzz/corpus/fuzz_tokenizer
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline/pretok.h"
#include "pipeline/tokenizer.h"

static const char *names[] = {"gpt2", "llama-3", "gemma-2", "synthetic-llama2", "synthetic-metaspace", "synthetic-bytelevel"};
static const int round_trips[] = {1, 1, 0, 0, 0, 0};  // byte-level tokenizers decode every text back exactly
enum { N_TOK = sizeof names / sizeof names[0] };
static tokenizer *toks[N_TOK];  // read-only after LLVMFuzzerInitialize

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    const char *root = getenv("EP_TOKENIZER_FIXTURES");
    if (!root) root = "tests/fixtures/tokenizers";
    for (int i = 0; i < N_TOK; i++) {
        char dir[1024];
        snprintf(dir, sizeof dir, "%s/%s", root, names[i]);
        ep_error err;
        if (tokenizer_load(dir, &toks[i], &err)) {
            fprintf(stderr, "fuzz_tokenizer: %s (run from the repository root or set EP_TOKENIZER_FIXTURES)\n", err.msg);
            exit(1);
        }
    }
    return 0;
}

static void exercise(const tokenizer *t, const char *text, size_t len, int must_round_trip) {
    ep_error err;
    for (int special = 0; special < 2; special++) {
        int *ids, n;
        if (tokenizer_encode(t, text, len, special, &ids, &n, &err)) continue;  // an error is fine, a crash is not
        for (int i = 0; i < n; i++)
            if (!tokenizer_piece(t, ids[i])) abort();  // every id must be in the vocabulary
        for (int skip = 0; skip < 2; skip++) {
            char *dec;
            size_t dec_len;
            if (tokenizer_decode(t, ids, n, skip, &dec, &dec_len, &err)) abort();  // own ids always decode
            if (must_round_trip && !special && !skip) {
                byte_buf clean = {0};
                utf8_sanitize(text, len, &clean);
                if (dec_len != clean.len || memcmp(dec, clean.p, dec_len)) {
                    fprintf(stderr, "round trip failed\n");
                    abort();
                }
                buf_free(&clean);
            }
            free(dec);
        }
        free(ids);
    }
}

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size) {
    if (size < 1) return 0;
    int mode = data[0] % 8;
    const char *rest = (const char *)data + 1;
    size_t n = size - 1;
    if (mode < N_TOK) {
        exercise(toks[mode], rest, n, round_trips[mode]);
        return 0;
    }
    tokenizer *t;
    ep_error err;
    if (tokenizer_load_json(rest, n, NULL, 0, "fuzz/tokenizer.json", &t, &err)) {
        if (!memchr(err.msg, 0, sizeof err.msg) || strchr(err.msg, '\n')) abort();  // one terminated line
        return 0;
    }
    static const char *samples[] = {"", "Hello world", "  a\tb\n\n12345 don't", "\xff\xfe<bos>\xe2\x96\x81x", "日本語 😀"};
    for (size_t i = 0; i < sizeof samples / sizeof samples[0]; i++) exercise(t, samples[i], strlen(samples[i]), 0);
    exercise(t, rest, n < 4096 ? n : 4096, 0);
    tokenizer_free(t);
    return 0;
}
