#!/usr/bin/env bash
# Packs the CUDA checks for the lent GPU machine, whose image has CUDA and cuBLAS but none of our other
# build dependencies (MPI, HDF5, jansson, OpenBLAS) and no network: builds here with -DWITH_CUDA=ON for
# sm_90, and puts the test and benchmark binaries with the host libraries they need (OpenBLAS and the
# gfortran/quadmath/gomp runtime, xz-compressed) and a runner into .device/ (git-ignored). Then, on the
# device (the `device` tool's run, carrying .device):   bash .device/run.sh
# run.sh finds cuBLAS/cudart on the machine, runs test_ops (cpu and cuda rows against the reference),
# bench_ops, and compute-sanitizer memcheck/racecheck when present, logging to $OUT/device.log.
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build-device -DWITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_COMPILE_WARNING_AS_ERROR=ON >/dev/null
cmake --build build-device -j "$(nproc)" --target test_ops bench_ops >/dev/null
rm -rf .device && mkdir -p .device/lib
cp build-device/tests/test_ops build-device/bench/bench_ops .device/
for lib in $(ldd .device/test_ops .device/bench_ops | awk '/=>/{print $3}' | sort -u | grep -E 'openblas|gfortran|quadmath|gomp'); do
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
echo "== bench_ops"; OMP_NUM_THREADS=16 timeout 150 .device/bench_ops; echo "bench_ops rc=$?"
if command -v compute-sanitizer >/dev/null; then
  echo "== compute-sanitizer memcheck test_ops"; timeout 120 compute-sanitizer --tool memcheck .device/test_ops 2>&1 | tail -4
  echo "== compute-sanitizer racecheck test_ops"; timeout 120 compute-sanitizer --tool racecheck .device/test_ops 2>&1 | tail -3
fi
} 2>&1 | tee "$out/device.log"
RUN
chmod +x .device/run.sh
du -sh .device
