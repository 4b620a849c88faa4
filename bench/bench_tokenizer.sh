#!/usr/bin/env bash
# Encode throughput of the C tokenizer against HF tokenizers (0.19.1, from the project venv) on the same
# text, both single-threaded, for each fixture tokenizer; prints MB/s of both and the ratio C / HF.
# usage: bench/bench_tokenizer.sh [BUILD_DIR] [PYTHON]     (defaults: build, .venv-bench/bin/python: a venv
# with tokenizers==0.19.1, see docs/benchmarks.md)
# The text: the GPL-3 and Apache-2.0 license texts from /usr/share/common-licenses plus the task prompts
# (about 100 kB of English prose and prompt lines), repeated as needed by the timers.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
py=${2:-.venv-bench/bin/python}
cmake --build "$build" --target bench_tokenizer >/dev/null
text=$(mktemp)
trap 'rm -f "$text"' EXIT
cat /usr/share/common-licenses/GPL-3 /usr/share/common-licenses/Apache-2.0 >"$text"
"$py" - "$text" <<'PY'
import glob, json, sys
with open(sys.argv[1], "a", encoding="utf-8") as out:
    for path in sorted(glob.glob("datasets/pairs/*.json")):
        pairs = json.load(open(path, encoding="utf-8"))
        for i in range(0, len(pairs) - 3, 3):
            out.write("".join(f"{p['input']}: {p['output']}\n" for p in pairs[i:i + 3]) + "\n")
PY
printf "%-10s %12s %12s %8s  %s\n" tokenizer "C MB/s" "HF MB/s" "C/HF" "tokens (C / HF)"
for t in gpt2 llama-3 gemma-2 smollm; do
  dir=tests/fixtures/tokenizers/$t
  c=$("$build/bench/bench_tokenizer" "$dir" "$text" 3)
  h=$("$py" bench/bench_tokenizer.py "$dir" "$text" 3)
  cm=$(echo "$c" | awk '{print $2}'); hm=$(echo "$h" | awk '{print $2}')
  ct=$(echo "$c" | awk '{print $4}'); ht=$(echo "$h" | awk '{print $4}')
  ratio=$(awk -v a="$cm" -v b="$hm" 'BEGIN{printf "%.2f", a/b}')
  printf "%-10s %12s %12s %8s  %s / %s%s\n" "$t" "$cm" "$hm" "$ratio" "$ct" "$ht" "$([ "$ct" = "$ht" ] || echo '  TOKEN COUNTS DIFFER')"
done
