#include "hash.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

uint64_t hash_bytes(uint64_t h, const void *data, size_t n) {
    const unsigned char *p = data;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

uint64_t hash_str(uint64_t h, const char *s) { return hash_bytes(h, s, strlen(s) + 1); }

int hash_file(const char *path, uint64_t *out, ep_error *err) {
    FILE *f = fopen(path, "rb");
    if (!f) return ep_fail(err, "%s: cannot open: %s", path, strerror(errno));
    unsigned char buf[1 << 16];
    uint64_t h = HASH_INIT;
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) h = hash_bytes(h, buf, n);
    int bad = ferror(f);
    fclose(f);
    if (bad) return ep_fail(err, "%s: read error", path);
    *out = h;
    return 0;
}

void hash_hex(uint64_t h, char out[17]) { snprintf(out, 17, "%016llx", (unsigned long long)h); }
