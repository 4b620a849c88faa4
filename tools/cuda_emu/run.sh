#!/usr/bin/env bash
# Builds and runs the CPU emulation of the CUDA kernels (see emu.cpp). Not part of the CMake build: a
# development aid for GPU-less machines. Takes several minutes (one host thread per GPU thread; wmma emulated per lane): 10 min on 2 shared cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The kernels and their launch constants: from the "Threads per block" enum up to the launch helpers.
sed -n '/^\/\/ Threads per block/,/^\/\/ Launch helpers/p' kernels/ops_cuda.cu |
  sed -e 's/extern __shared__ float smem\[\];/float *smem = emu_dyn_smem;/' \
      -e 's/extern __shared__ __align__(128) float attn_smem\[\];/float *attn_smem = emu_dyn_smem;/' >"$tmp/kernels.inc"
g++ -std=c++20 -O1 -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers -I. -I"$tmp" -c tools/cuda_emu/emu.cpp -o "$tmp/emu.o"
gcc -std=c11 -O1 -D_POSIX_C_SOURCE=200809L -I. -c kernels/ops_ref.c -o "$tmp/ref.o"
gcc -std=c11 -O1 -D_POSIX_C_SOURCE=200809L -I. -c kernels/ops_fatal.c -o "$tmp/error.o"  # kernel_alloc_at, ops_fatal
g++ "$tmp/emu.o" "$tmp/ref.o" "$tmp/error.o" -o "$tmp/cuda_emu" -lm -lpthread
"$tmp/cuda_emu"
