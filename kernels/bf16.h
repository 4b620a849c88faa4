// bf16: the bfloat16 <-> fp32 conversions of the host code (weights read from checkpoints, bf16 HDF5
// datasets, the bf16 matrix product of the ref and cpu backends). The cuda backend uses CUDA's own
// __float2bfloat16_rn, which rounds the same way (to nearest, ties to even).
#ifndef EP_KERNELS_BF16_H
#define EP_KERNELS_BF16_H

#include <stdint.h>
#include <string.h>

// Exact: every bf16 value is an fp32 value.
static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// Round to nearest, ties to even (as torch's .to(torch.bfloat16)); NaN stays NaN.
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

// f rounded to the nearest bf16, as an fp32 value.
static inline float bf16_round(float f) { return bf16_to_f32(f32_to_bf16(f)); }

#endif
