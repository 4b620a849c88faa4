#include "rng.h"

// splitmix64: a well-mixed 64-bit generator; its finalizer also keys the streams.
static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

rng rng_stream(uint64_t seed, uint64_t a, uint64_t b) {
    rng r = {mix64(mix64(mix64(seed) ^ (a + 0x9e3779b97f4a7c15ull)) ^ (b + 0x632be59bd9b4e019ull))};
    return r;
}

uint64_t rng_next(rng *r) { return mix64(r->state += 0x9e3779b97f4a7c15ull); }

uint32_t rng_below(rng *r, uint32_t n) {
    uint64_t limit = UINT64_MAX - UINT64_MAX % n;  // reject the top sliver so every residue is equally likely
    uint64_t x;
    do x = rng_next(r);
    while (x >= limit);
    return (uint32_t)(x % n);
}

void rng_shuffle(rng *r, int *v, int n) {
    for (int i = n - 1; i > 0; i--) {
        int j = (int)rng_below(r, (uint32_t)i + 1), t = v[i];
        v[i] = v[j];
        v[j] = t;
    }
}
