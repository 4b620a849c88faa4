// rng: counter-based random numbers, so every draw is a pure function of (seed, stream ids).
//
// A prompt's demonstrations, query and donors are drawn from a stream keyed by (seed, prompt index,
// purpose), never from a shared sequence, so the same prompt comes out the same whatever order, rank
// or resume produced it.
#ifndef EP_RNG_H
#define EP_RNG_H

#include <stdint.h>

typedef struct {
    uint64_t state;
} rng;

rng rng_stream(uint64_t seed, uint64_t a, uint64_t b);
uint64_t rng_next(rng *r);
// Uniform in [0, n), unbiased (n > 0).
uint32_t rng_below(rng *r, uint32_t n);
// Fisher-Yates shuffle of n ints.
void rng_shuffle(rng *r, int *v, int n);

#endif
