#!/usr/bin/env bash
# edgepatch run --until tokenize, show and tasks as a user runs them: the stage writes prompts.h5 and its
# report, a rerun is a no-op, changed inputs are refused without --fresh, the same seed gives identical
# files (h5diff), another seed different ones, and bad configs fail with one line naming file and field.
set -u
bin=$1
. "$(dirname "$0")/cli_harness.bash"

config() {  # output seed [extra json]
  printf '{"task": "country_capital", "model_name": "gemma2_calc_accuracy", "model_path": "tests/fixtures/models/gemma2-tiny", "output_path": "%s", "n_prompts": 6, "seed": %s, "donors": ["random_xy", "shuffle_y"]%s}\n' "$1" "$2" "${3:-}"
}
config "$tmp/a" 1 > "$tmp/a.json"
config "$tmp/b" 1 > "$tmp/b.json"
config "$tmp/c" 2 > "$tmp/c.json"

"$bin" run "$tmp/a.json" --until tokenize > "$tmp/out" 2>&1 && [ -f "$tmp/a/prompts.h5" ] && [ -f "$tmp/a/tokenize_report.json" ] && ok || bad "first run: $(cat "$tmp/out")"
"$bin" run "$tmp/a.json" --until tokenize > "$tmp/out" 2>&1 && grep -q "up to date" "$tmp/out" && ok || bad "rerun is not a no-op: $(cat "$tmp/out")"
"$bin" run "$tmp/b.json" --until tokenize > /dev/null 2>&1 && ok || bad "run b"
"$bin" run "$tmp/c.json" --until tokenize > /dev/null 2>&1 && ok || bad "run c"
h5diff -q "$tmp/a/prompts.h5" "$tmp/b/prompts.h5" && ok || bad "same seed, different prompts.h5"
h5diff -q "$tmp/a/prompts.h5" "$tmp/c/prompts.h5" > /dev/null && bad "another seed gave identical prompts" || ok

# Changed inputs: refused without --fresh (and the old file untouched), rebuilt with it.
config "$tmp/a" 3 > "$tmp/a3.json"
before=$(md5sum < "$tmp/a/prompts.h5")
"$bin" run "$tmp/a3.json" --until tokenize > /dev/null 2> "$tmp/err"
[ $? = 1 ] && grep -q -- "--fresh" "$tmp/err" && [ "$(md5sum < "$tmp/a/prompts.h5")" = "$before" ] && ok || bad "mismatch not refused: $(cat "$tmp/err")"
"$bin" run "$tmp/a3.json" --until tokenize --fresh > /dev/null 2>&1 && [ "$(md5sum < "$tmp/a/prompts.h5")" != "$before" ] && ok || bad "--fresh did not rebuild"

# A truncated prompts.h5 is rebuilt, never trusted.
truncate -s 2000 "$tmp/b/prompts.h5"
config "$tmp/e" 1 > "$tmp/e.json"
"$bin" run "$tmp/e.json" --until tokenize > /dev/null 2>&1
"$bin" run "$tmp/b.json" --until tokenize > /dev/null 2> "$tmp/err" && grep -q rebuilding "$tmp/err" && h5diff -q "$tmp/b/prompts.h5" "$tmp/e/prompts.h5" && ok || bad "truncated file not rebuilt: $(cat "$tmp/err")"

# show --json: structure and consistency with prompts.h5's own rules.
"$bin" show "$tmp/a" --prompt 2 --json > "$tmp/show.json" && ok || bad "show --json"
python3 - "$tmp/show.json" <<'PY' && ok || bad "show --json content"
import json, sys
s = json.load(open(sys.argv[1]))
n = len(s["tokens"])
assert len(s["types"]) == n and len(s["index"]) == n and len(s["pieces"]) == n
assert len(s["donors"]) == 2 and all(len(d) == n for d in s["donors"])
assert s["types"][0] == "bos" and s["types"][-1] == "last" and s["target"]
for d in s["donors"]:
    for i, t in enumerate(s["types"]):
        if t in ("bos", "t", "n", "query", "last"):
            assert d[i] == s["tokens"][i], (i, t)
print("  show --json: %d tokens, %d donors, target %s" % (n, len(s["donors"]), s["target"]))
PY
"$bin" show "$tmp/a" --prompt 0 | grep -q "donor 1" && ok || bad "show text"

"$bin" tasks | grep -q "country_capital" && ok || bad "tasks"
"$bin" tasks --tokenizer tests/fixtures/models/gemma2-tiny | grep -q "111 of 197" && ok || bad "tasks --tokenizer"

config "$tmp/d" 1 ', "n_shot": 3' > "$tmp/typo.json"
expect_error 1 "unknown field 'n_shot'" run "$tmp/typo.json" --until tokenize
printf '{"task": "country_capital", ' > "$tmp/broken.json"
expect_error 1 "broken.json" run "$tmp/broken.json" --until tokenize
config "$tmp/d" 1 | sed 's/country_capital/no_such_task/' > "$tmp/task.json"
expect_error 1 "unknown task 'no_such_task'" run "$tmp/task.json" --until tokenize
config "$tmp/d" 1 ', "donors": 16' > "$tmp/donors.json"
expect_error 1 "task" run "$tmp/donors.json" --until tokenize
config "$tmp/d" 1 | sed 's/"seed": 1/"seed": "one"/' > "$tmp/seed.json"
expect_error 1 "field seed" run "$tmp/seed.json" --until tokenize
expect_error 1 "prompt 99" show "$tmp/a" --prompt 99
expect_error 1 "prompts.h5" show "$tmp/nowhere" --prompt 0
expect_error 2 "--until" run "$tmp/a.json" --until frobnicate

finish cli_run_tokenize
