#!/usr/bin/env bash
# Runs the whole test suite: installs what is missing (tools/setup.sh), builds the Release configuration
# and the AddressSanitizer+UBSan one, fetches and converts the demo model once (tools/fetch_smollm2.sh,
# with the normal build; test_gguf fails without it) and runs ctest on both. Exit status is non-zero if
# anything fails.
#   ./tools/test.sh --quick   the inner loop: the Release build and the unit tests only (ctest -L unit)
set -euo pipefail
cd "$(dirname "$0")/.."
quick=0
[ "${1:-}" = --quick ] && quick=1
bash tools/setup.sh
jobs=$(nproc)
configs=(release asan)
[ $quick = 1 ] && configs=(release)
for cfg in "${configs[@]}"; do
  dir=build-test-$cfg
  flags=(-DCMAKE_BUILD_TYPE=Release)  # what users type; must build warning-free as the others
  [ $cfg = asan ] && flags=(-DCMAKE_BUILD_TYPE=Debug -DEP_SANITIZE=ON)
  cmake -S . -B "$dir" "${flags[@]}" -DCMAKE_COMPILE_WARNING_AS_ERROR=ON >/dev/null
  cmake --build "$dir" -j "$jobs" >/dev/null
  if [ $cfg = release ]; then bash tools/fetch_smollm2.sh "$dir/edgepatch"; fi
  echo "== ctest ($cfg)"
  # ASan: leaks are errors too; MPI's own allocations are not ours, so its leak reports are suppressed.
  ASAN_OPTIONS=detect_leaks=1 LSAN_OPTIONS=suppressions=$PWD/tests/lsan.supp:print_suppressions=0 \
    ctest --test-dir "$dir" --output-on-failure -j "$jobs" $([ $quick = 1 ] && echo "-L unit")
done
