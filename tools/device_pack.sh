#!/usr/bin/env bash
# Packs the CUDA checks for the lent GPU machine, whose image has CUDA and cuBLAS but none of our other
# build dependencies (MPI, HDF5, jansson, OpenBLAS) and no network: builds here with -DWITH_CUDA=ON for
# sm_90, and puts the test and benchmark binaries with the host libraries they need (OpenBLAS and the
# gfortran/quadmath/gomp runtime, xz-compressed) and a runner into .device/ (git-ignored). Then, on the
# device (the `device` tool's run, carrying .device):   bash .device/run.sh
# run.sh finds cuBLAS/cudart on the machine, runs test_ops (cpu and cuda rows against the reference),
# test_model and test_patch (whole forward passes, plain and patched, on every backend against the HF /
# Python references in tests/fixtures, which travel with the tree), bench_ops, bench_forward (a
# SmolLM2-135M-shaped model with random weights, bench/smollm2-135m.json, on cuda and on cpu), and
# compute-sanitizer memcheck/racecheck when present, logging to $OUT/device.log.
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build-device -DWITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_COMPILE_WARNING_AS_ERROR=ON >/dev/null
bins="tests/test_ops tests/test_model tests/test_patch bench/bench_ops bench/bench_forward"
cmake --build build-device -j "$(nproc)" --target $(for b in $bins; do basename "$b"; done) >/dev/null
rm -rf .device && mkdir -p .device/lib
for b in $bins; do cp "build-device/$b" .device/; done
for lib in $(ldd $(for b in $bins; do echo ".device/$(basename "$b")"; done) | awk '/=>/{print $3}' | sort -u | grep -E 'openblas|gfortran|quadmath|gomp'); do
  cp -L "$lib" .device/lib/
done
tar cJf .device/lib.tar.xz -C .device lib && rm -rf .device/lib
cat > .device/run.sh <<'RUN'
#!/usr/bin/env bash
set -u
cd "$(dirname "$0")/.."
[ -d .device/lib ] || tar xJf .device/lib.tar.xz -C .device
out=${OUT:-/tmp}
{
echo "== nvidia-smi"; nvidia-smi -L
lib=""
for name in libcublasLt.so.13 libcublas.so.13 libcudart.so.13; do
  f=$(find /usr/local /usr/lib /opt -name "$name*" 2>/dev/null | head -1)
  echo "found $name at ${f:-NOTHING}"
  [ -n "$f" ] && lib="$lib:$(dirname "$f")"
done
export LD_LIBRARY_PATH=$PWD/.device/lib$lib
echo "== missing libs:"; ldd .device/test_ops | grep "not found"
echo "== test_ops"; timeout 120 .device/test_ops; echo "test_ops rc=$?"
echo "== test_model"; timeout 120 .device/test_model | grep -E "cuda|FAIL|passed"; echo "test_model rc=${PIPESTATUS[0]}"
echo "== test_patch"; timeout 120 .device/test_patch | grep -E "cuda|FAIL|passed"; echo "test_patch rc=${PIPESTATUS[0]}"
echo "== bench_ops"; OMP_NUM_THREADS=16 timeout 150 .device/bench_ops; echo "bench_ops rc=$?"
for be in cuda cpu; do
  echo "== bench_forward $be (SmolLM2-135M shape, random weights, 16 x 100 tokens)"
  OPENBLAS_NUM_THREADS=16 timeout 120 .device/bench_forward --random bench/smollm2-135m.json --backend $be \
    --batch 16 --len 100 --reps 3 2>&1 | tail -2; echo "bench_forward $be rc=$?"
done
if command -v compute-sanitizer >/dev/null; then
  echo "== compute-sanitizer memcheck test_ops"; timeout 120 compute-sanitizer --tool memcheck .device/test_ops 2>&1 | tail -4
  echo "== compute-sanitizer racecheck test_ops"; timeout 120 compute-sanitizer --tool racecheck .device/test_ops 2>&1 | tail -3
  echo "== compute-sanitizer memcheck test_model"; timeout 150 compute-sanitizer --tool memcheck .device/test_model 2>&1 | tail -4
fi
} 2>&1 | tee "$out/device.log"
RUN
chmod +x .device/run.sh
du -sh .device
