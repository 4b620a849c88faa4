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

// XXH64 as its specification gives it (github.com/Cyan4973/xxHash, doc/xxhash_spec.md): four lanes over
// 32-byte stripes, then the tail in 8-, 4- and 1-byte steps, then the avalanche. Input words are read
// little-endian whatever the host.
#define XXH_P1 0x9E3779B185EBCA87ull
#define XXH_P2 0xC2B2AE3D27D4EB4Full
#define XXH_P3 0x165667B19E3779F9ull
#define XXH_P4 0x85EBCA77C2B2AE63ull
#define XXH_P5 0x27D4EB2F165667C5ull

static uint64_t rotl64(uint64_t x, int r) { return x << r | x >> (64 - r); }

// One unaligned load on little-endian hosts (a byte loop there ran at a sixth of the speed).
static uint64_t read_le64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static uint32_t read_le32(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}

static uint64_t xxh_round(uint64_t acc, uint64_t input) { return rotl64(acc + input * XXH_P2, 31) * XXH_P1; }

static uint64_t xxh_merge(uint64_t h, uint64_t lane) { return (h ^ xxh_round(0, lane)) * XXH_P1 + XXH_P4; }

uint64_t hash_xxh64(const void *data, size_t n, uint64_t seed) {
    const unsigned char *p = data, *end = p + n;
    uint64_t h;
    if (n >= 32) {
        uint64_t v1 = seed + XXH_P1 + XXH_P2, v2 = seed + XXH_P2, v3 = seed, v4 = seed - XXH_P1;
        for (; end - p >= 32; p += 32) {
            v1 = xxh_round(v1, read_le64(p)), v2 = xxh_round(v2, read_le64(p + 8));
            v3 = xxh_round(v3, read_le64(p + 16)), v4 = xxh_round(v4, read_le64(p + 24));
        }
        h = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18);
        h = xxh_merge(h, v1), h = xxh_merge(h, v2), h = xxh_merge(h, v3), h = xxh_merge(h, v4);
    } else {
        h = seed + XXH_P5;
    }
    h += (uint64_t)n;
    for (; end - p >= 8; p += 8) h = rotl64(h ^ xxh_round(0, read_le64(p)), 27) * XXH_P1 + XXH_P4;
    if (end - p >= 4) h = rotl64(h ^ (uint64_t)read_le32(p) * XXH_P1, 23) * XXH_P2 + XXH_P3, p += 4;
    for (; p < end; p++) h = rotl64(h ^ *p * XXH_P5, 11) * XXH_P1;
    h ^= h >> 33, h *= XXH_P2, h ^= h >> 29, h *= XXH_P3, h ^= h >> 32;
    return h;
}
