#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, ASan + UBSan) and runs each tests/fuzz/fuzz_*.c for N seconds
# (default 60) on its corpus. New inputs go to build-fuzz/corpus/<target>/ (the committed corpus in
# tests/fuzz/corpus/ is only read); crashes are written to build-fuzz/crashes/<target>/.
#   tools/fuzz.sh [SECONDS] [TARGET...]
# To fold new inputs into the committed corpus (keep it small):
#   build-fuzz/tests/T -merge=1 tests/fuzz/corpus/T build-fuzz/corpus/T
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
CC=clang cmake -S . -B build-fuzz -DEP_FUZZ=ON -DWITH_CUDA=OFF >/dev/null
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  for src in tests/fuzz/fuzz_*.c; do targets+=("$(basename "$src" .c)"); done
fi
cmake --build build-fuzz -j"$(nproc)" --target "${targets[@]}"
status=0
for t in "${targets[@]}"; do
  mkdir -p "build-fuzz/corpus/$t" "build-fuzz/crashes/$t" "tests/fuzz/corpus/$t"
  echo "== $t: ${secs}s"
  ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    "build-fuzz/tests/$t" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -dict=tests/fuzz/json.dict \
    -artifact_prefix="build-fuzz/crashes/$t/" -print_final_stats=1 \
    "build-fuzz/corpus/$t" "tests/fuzz/corpus/$t" || status=1
done
exit $status
