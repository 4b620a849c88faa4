// libFuzzer target: arbitrary bytes as config.json. model_config_load reads a path, so the input goes
// to one temporary file per process; a config that loads must also give its rotary frequencies.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "pipeline/model_config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static char path[64];
    if (!path[0]) snprintf(path, sizeof path, "/tmp/ep-fuzz-config-%d.json", (int)getpid());
    FILE *f = fopen(path, "wb");
    if (!f) abort();
    if (size && fwrite(data, 1, size, f) != size) abort();
    fclose(f);
    model_config cfg;
    ep_error err = {{0}};
    if (model_config_load(path, &cfg, &err) == 0) {
        float *inv_freq = malloc(sizeof(float) * (size_t)(cfg.rotary_dim / 2 + 1));
        model_config_inv_freq(&cfg, inv_freq);
        free(inv_freq);
    }
    return 0;
}
