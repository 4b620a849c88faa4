#!/usr/bin/env bash
# Load time of the C tokenizer (tokenizer_load) against HF tokenizers 0.19.1 (Tokenizer.from_file) for each
# fixture tokenizer, same machine, same run; prints the best and median ms of both and the ratio C / HF
# of the best times.
# usage: bench/bench_tokenizer_load.sh [BUILD_DIR] [PYTHON] [REPEATS]
#        (defaults: build, .venv-bench/bin/python, 7)
# Both sides read the same uncompressed tokenizer.json (the fixtures are gzipped; HF cannot read .gz), copied
# with tokenizer_config.json into a temporary directory. The C and HF runs alternate per tokenizer in
# ROUNDS rounds (default 2) so that a burst of load from other jobs hits both; each side's best is taken
# over all rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
py=${2:-.venv-bench/bin/python}
repeats=${3:-7}
rounds=${ROUNDS:-2}
"$py" -c 'import tokenizers, sys; v = tokenizers.__version__; sys.exit(0 if v == "0.19.1" else f"need tokenizers 0.19.1, found {v}")'
cmake --build "$build" --target bench_tokenizer_load >/dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
names="gpt2 llama-3 gemma-2 smollm"
for t in $names; do
  mkdir -p "$work/$t"
  gzip -dc tests/fixtures/tokenizers/$t/tokenizer.json.gz >"$work/$t/tokenizer.json"
  cp tests/fixtures/tokenizers/$t/tokenizer_config.json "$work/$t/"
done
# min_of A B: the smaller number.
min_of() { awk -v a="$1" -v b="$2" 'BEGIN{print (a == "" || b + 0 < a + 0) ? b : a}'; }
printf "%-10s %8s %10s %10s %10s %10s %8s\n" tokenizer vocab "C best" "C median" "HF best" "HF median" "C/HF"
for t in $names; do
  cb="" cm="" hb="" hm=""
  for r in $(seq "$rounds"); do
    c=$("$build/bench/bench_tokenizer_load" "$work/$t" "$repeats")
    h=$("$py" bench/bench_tokenizer_load.py "$work/$t" "$repeats")
    cb=$(min_of "$cb" "$(echo "$c" | awk '{print $2}')"); cm=$(min_of "$cm" "$(echo "$c" | awk '{print $5}')")
    hb=$(min_of "$hb" "$(echo "$h" | awk '{print $2}')"); hm=$(min_of "$hm" "$(echo "$h" | awk '{print $5}')")
    cv=$(echo "$c" | awk '{print $8}'); hv=$(echo "$h" | awk '{print $8}')
  done
  ratio=$(awk -v a="$cb" -v b="$hb" 'BEGIN{printf "%.2f", a/b}')
  printf "%-10s %8s %10s %10s %10s %10s %8s%s\n" "$t" "$cv" "$cb" "$cm" "$hb" "$hm" "$ratio" \
    "$([ "$cv" = "$hv" ] || echo "  VOCAB SIZES DIFFER (HF $hv)")"
done
