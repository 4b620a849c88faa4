#!/usr/bin/env bash
# The chaos test (tests/chaos.py, docs/reliability.md): seeded random kills (KILL, TERM, USR1 to every
# rank, one rank or mpirun, from MPI start to the report) and corruptions (a flipped byte, a truncated
# file) of edgepatch runs on 1, 2 and 4 ranks and a tensor_parallel 2 group; every attempt ends by
# itself, and the last run leaves the undisturbed run's bytes. 30 kill points here (a few minutes; 10
# in the sanitizer build, which is about seven times slower); `python3 tests/chaos.py BIN --long` for
# 1000.
set -u
bin=$1
cd "$(dirname "$0")/.." || exit 1
if ! command -v mpirun > /dev/null; then echo "cli_chaos: mpirun not found" >&2; exit 1; fi
points=30
[ -n "${EP_SANITIZED:-}" ] && points=10
exec python3 tests/chaos.py "$bin" --points "$points" --seed "${CHAOS_SEED:-7}"
