#!/usr/bin/env bash
# Forward-pass throughput, edgepatch (cpu backend) vs HF transformers (fp32, eager), same model, same
# token ids, same thread count. Prints one table.
#   bench/bench_forward.sh [MODEL_DIR]   (default /tmp/ep-bench/smollm-135m, created if missing)
# Env: EP_PYTHON (default .venv/bin/python), THREADS (default nproc), BATCH (16), LEN (100), REPS (3),
#      BUILD (build folder, default build).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${EP_PYTHON:-.venv/bin/python}
dir=${1:-/tmp/ep-bench/smollm-135m}
threads=${THREADS:-$(nproc)}
batch=${BATCH:-16} len=${LEN:-100} reps=${REPS:-3} build=${BUILD:-build}
export OMP_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads

"$py" bench/make_bench_model.py "$dir"
cmake -S . -B "$build" >/dev/null
cmake --build "$build" -j"$(nproc)" --target bench_forward >/dev/null

echo "== edgepatch (threads $threads, OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-unset})"
c_out=$("$build/bench/bench_forward" --model "$dir" --batch "$batch" --len "$len" --reps "$reps")
echo "$c_out"
echo "== torch (threads $threads)"
t_out=$("$py" bench/bench_forward_torch.py --model "$dir" --batch "$batch" --len "$len" --reps "$reps" --threads "$threads")
echo "$t_out"

c_tps=$(sed -n 's/.*tokens_per_s=\([0-9.]*\).*/\1/p' <<<"$c_out")
t_tps=$(sed -n 's/.*tokens_per_s=\([0-9.]*\).*/\1/p' <<<"$t_out")
echo
echo "model $dir, batch $batch x $len tokens, $reps timed passes, $threads threads"
printf '%-12s %12s %10s\n' engine tokens/s C/torch
printf '%-12s %12s %10s\n' edgepatch "$c_tps" "$(awk -v c="$c_tps" -v t="$t_tps" 'BEGIN{printf "%.2f", c/t}')"
printf '%-12s %12s %10s\n' torch "$t_tps" "1.00"
