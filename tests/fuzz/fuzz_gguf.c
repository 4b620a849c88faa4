// libFuzzer target: arbitrary bytes as one GGUF file. Parses them in memory (exact-size buffer, so
// AddressSanitizer sees any read past the end), reads the typed metadata the converter reads, then
// dequantizes every supported tensor into a buffer of exactly numel floats and maps its name.
#include <stdint.h>
#include <stdlib.h>

#include "pipeline/gguf.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    gguf_file g;
    ep_error err = {{0}};
    if (gguf_open_buffer(data, size, "fuzz.gguf", &g, &err)) return 0;
    gguf_llama_hparams hp;
    int have_hp = gguf_llama_hparams_read(&g, &hp, &err) == 0;
    for (int i = 0; i < g.n_tensors; i++) {
        const gguf_tensor *t = &g.tensors[i];
        if (!gguf_type_supported(t->type) || t->numel > (1 << 24)) continue;
        float *out = malloc(t->numel > 0 ? (size_t)t->numel * 4 : 4);
        if (have_hp) {
            char hf[128];
            int64_t shape[GGUF_MAX_DIMS];
            int ndim;
            gguf_read_hf_tensor(&g, t, &hp, hf, sizeof hf, shape, &ndim, out, &err);
        } else {
            gguf_dequantize(&g, t, out, &err);
        }
        free(out);
    }
    for (int i = 0; i < g.n_kv; i++) {
        char *s = NULL;
        gguf_get_string(&g, g.kv[i].key, 0, &s, &err);
        free(s);
    }
    gguf_close(&g);
    return 0;
}
