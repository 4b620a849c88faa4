// bench_util: what the benchmarks share: a monotonic clock, and the token-id formula that bench_forward,
// bench_patch and their Python counterparts (bench_forward_torch.py, tools/device_check.py) all use, so
// both engines see the same prompts.
#ifndef EP_BENCH_UTIL_H
#define EP_BENCH_UTIL_H

#include <stdint.h>
#include <time.h>

static inline double bench_now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// Prompt s, position t of T: 1 + ((s * T + t) * 2654435761 mod 2^32) mod (vocab - 1).
static inline int bench_id(int s, int t, int T, int vocab) {
    uint32_t x = (uint32_t)(s * T + t) * 2654435761u;
    return 1 + (int)(x % (uint32_t)(vocab - 1));
}

#endif
