// libFuzzer target: arbitrary bytes as one .safetensors file. Parses them in memory (the exact-size
// buffer lets AddressSanitizer see any read past the end, which a page-rounded mmap would hide), then
// converts every tensor to fp32 or int32 into a buffer of exactly numel elements, then closes.
#include <stdint.h>
#include <stdlib.h>

#include "pipeline/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    safetensors st;
    ep_error err = {{0}};
    if (safetensors_open_buffer(data, size, "fuzz.safetensors", &st, &err)) return 0;
    for (int i = 0; i < st.n_tensors; i++) {
        const st_tensor *t = &st.tensors[i];
        if (safetensors_find(&st, t->name) != t) abort();  // the table is sorted and unique
        void *out = malloc(t->numel > 0 ? (size_t)t->numel * 4 : 1);
        if (safetensors_read_f32(t, out, &err)) safetensors_read_i32(t, out, &err);
        free(out);
    }
    safetensors_close(&st);
    return 0;
}
