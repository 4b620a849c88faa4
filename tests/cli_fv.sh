#!/usr/bin/env bash
# Function vectors end to end (docs/function_vectors.md) on smollm-tiny through edgepatch run:
#  - a function_vectors block with top_k: function_vectors.h5 is written after the rounds, complete, with
#    the documented datasets; its heads are round 0's top head units at `last` (from `edgepatch scores`);
#    scale 0 gives the zero-shot baseline at every layer; the report has its line and fv_accuracy figure;
#    --json's stages end with fv;
#  - a rerun says up to date and leaves the file's bytes alone;
#  - killed (SIGKILL) while the stage runs, nothing that looks complete is left; the rerun finishes with the
#    same bytes;
#  - explicit heads give the same bytes for batch_size 3 and 8, and for 1 and 2 MPI ranks;
#  - sweep status: a stage group until fv is done once the file is complete;
#  - bad fields are refused with one line naming the field, before anything is written.
set -u
bin=$1
. "$(dirname "$0")/cli_harness.bash"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
py=${EP_SYSTEM_PYTHON:-/usr/bin/python3}

config() {  # name n_prompts batch_size function_vectors-JSON [extra fields]
  printf '{"task": "person_sport", "model_name": "smollm_prune_heads_in_circuits", "model_path": "tests/fixtures/models/smollm-tiny", "output_path": "%s/%s", "n_prompts": %s, "batch_size": %s, "seed": 5, "n_shots": 3, "max_new_tokens": 4, "function_vectors": %s%s}\n' "$tmp" "$1" "$2" "$3" "$4" "${5:-}" > "$tmp/$1.json"
}
run() {  # name [args]: status in $rc
  local name=$1; shift
  { timeout 600 "$bin" run "$tmp/$name.json" "$@" > "$tmp/$name.out" 2> "$tmp/$name.err"; rc=$?; } 2> /dev/null
}

config top 12 4 '{"top_k": 3, "layers": [0, 2], "scales": [0, 1, 4]}'
run top --json
[ $rc = 0 ] && [ -f "$tmp/top/function_vectors.h5" ] && ok || bad "top_k run: $rc $(cat "$tmp/top.err")"
grep -q "^fv: 3 heads (round 0 attribution), 2 layers x 3 scales over 12 zero-shot prompts" "$tmp/top.err" && ok || bad "no fv line: $(cat "$tmp/top.err")"
$py -c 'import json,sys; s=json.load(open(sys.argv[1])); st={x["name"]: x for x in s["stages"]}; assert list(st)[-1]=="fv" and st["fv"]["state"]=="computed" and st["fv"]["items"]==1, st' "$tmp/top.out" && ok || bad "--json stages: $(cat "$tmp/top.out")"
$py - "$tmp/top.out" "$tmp/top/function_vectors.h5" <<'EOF' && ok || bad "--json results.function_vectors: $(cat "$tmp/top.out")"
import json, sys
import h5py, numpy as np
r = json.load(open(sys.argv[1]))["results"]["function_vectors"]
f = h5py.File(sys.argv[2], "r")
acc = f["accuracy"][:]
l, s = np.unravel_index(int(np.argmax(acc)), acc.shape)  # the first best, layers then scales
assert r["n_heads"] == 3 and r["heads_from"] == "round 0 attribution" and r["baseline_accuracy"] == f["baseline/accuracy"][0], r
assert r["best_layer"] == int(f["layers"][l]) and r["best_scale"] == float(f["scales"][s]) and r["best_accuracy"] == acc[l, s], r
EOF
"$bin" scores "$tmp/top" --round 0 --json > "$tmp/scores.json" || bad "scores"
$py - "$tmp/top/function_vectors.h5" "$tmp/scores.json" > "$tmp/check.txt" 2>&1 <<'EOF' && ok || bad "function_vectors.h5: $(cat "$tmp/check.txt")"
import json, sys
import h5py, numpy as np
f = h5py.File(sys.argv[1], "r")
s = json.load(open(sys.argv[2]))
assert f.attrs["format"] == b"edgepatch-fv-1" or f.attrs["format"] == "edgepatch-fv-1", f.attrs["format"]
hidden = 48
assert f["heads"].shape == (3, 2) and f["head_means"].shape == (3, hidden) and f["vector"].shape == (hidden,)
assert list(f["layers"][:]) == [0, 2] and list(f["scales"][:]) == [0, 1, 4]
assert f["correct"].shape == (2, 3, 12) and f["first_token_correct"].shape == (2, 3, 12)
assert f["accuracy"].shape == (2, 3) and f["baseline/correct"].shape == (12,)
# the vector is the heads' means summed
assert np.allclose(f["vector"][:], f["head_means"][:].astype(np.float64).sum(0), rtol=1e-6, atol=1e-6)
# scale 0 is the zero-shot baseline, at every layer
for l in range(2):
    assert (f["correct"][l, 0] == f["baseline/correct"][:]).all() and (f["first_token_correct"][l, 0] == f["baseline/first_token_correct"][:]).all()
assert np.allclose(f["accuracy"][:], f["correct"][:].mean(-1)) and abs(f["baseline/accuracy"][0] - f["baseline/correct"][:].mean()) < 1e-12
# the heads: round 0's head units of type last, highest score first (ties in unit order)
units = [(u, u["score"]) for u in s["units"] if u.get("type") == "last"]
order = sorted(range(len(units)), key=lambda i: (-units[i][1], i))
want = [[units[i][0]["layer"], units[i][0]["head"]] for i in order[:3]]
assert f["heads"][:].tolist() == want, (f["heads"][:].tolist(), want)
print("heads", want, "accuracy", f["accuracy"][:].tolist(), "baseline", f["baseline/accuracy"][:].tolist())
EOF
cat "$tmp/check.txt"
grep -q "^function vectors: 3 heads (round 0 attribution)" "$tmp/top/report.txt" && ok || bad "report.txt: no function vectors line"
[ -f "$tmp/top/fv_accuracy.csv" ] && [ -f "$tmp/top/fv_accuracy.gp" ] && [ "$(wc -l < "$tmp/top/fv_accuracy.csv")" = 7 ] && ok || bad "fv_accuracy.csv/.gp"
if command -v gnuplot > /dev/null; then [ -s "$tmp/top/fv_accuracy.png" ] && ok || bad "no fv_accuracy.png"; fi

# A rerun: up to date, the same bytes.
sum0=$(md5sum < "$tmp/top/function_vectors.h5")
run top
[ $rc = 0 ] && grep -q "^fv: up to date" "$tmp/top.out" && [ "$(md5sum < "$tmp/top/function_vectors.h5")" = "$sum0" ] && ok || bad "rerun: $rc $(cat "$tmp/top.out")"

# Killed while the stage runs (the earlier stages done first): no complete-looking file, then resumed.
config kill 12 4 '{"top_k": 3, "layers": [0, 2], "scales": [0, 1, 4, 2, 3, 5, 6, 7, 8, 9, 10, 11]}'
run kill --until prune
[ $rc = 0 ] && ok || bad "kill config up to prune: $rc $(cat "$tmp/kill.err")"
killed=0
for delay in 0.05 0.1 0.2; do
  rm -f "$tmp/kill/function_vectors.h5"
  "$bin" run "$tmp/kill.json" > /dev/null 2>&1 &
  pid=$!
  sleep $delay
  kill -KILL $pid 2> /dev/null && killed=$((killed + 1))
  wait $pid 2> /dev/null
  if [ -f "$tmp/kill/function_vectors.h5" ]; then
    # the stage finished before the kill: the file must then be complete
    h5dump -A "$tmp/kill/function_vectors.h5" > /dev/null 2>&1 && ok || bad "a complete-looking damaged file after the kill"
  else ok; fi
done
[ $killed -gt 0 ] && ok || bad "the run was never killed (finished too fast?)"
# ... and at the worst moment: every dataset written, the file not committed (the stage's test hook).
rm -f "$tmp/kill/function_vectors.h5"
{ EDGEPATCH_TEST_KILL_FV=write "$bin" run "$tmp/kill.json" > /dev/null 2>&1; rc=$?; } 2> /dev/null
[ $rc = 137 ] && [ ! -e "$tmp/kill/function_vectors.h5" ] && ls "$tmp/kill" | grep -q "^function_vectors.h5.tmp-" && ok ||
  bad "killed before the commit: status $rc, $(ls "$tmp/kill")"
run kill
[ $rc = 0 ] && [ -f "$tmp/kill/function_vectors.h5" ] && ok || bad "resume after the kill: $rc $(cat "$tmp/kill.err")"
ls "$tmp/kill" | grep -q "tmp-" && bad "temporaries left: $(ls "$tmp/kill")" || ok
config ref 12 4 '{"top_k": 3, "layers": [0, 2], "scales": [0, 1, 4, 2, 3, 5, 6, 7, 8, 9, 10, 11]}'
run ref
[ $rc = 0 ] && cmp -s "$tmp/ref/function_vectors.h5" "$tmp/kill/function_vectors.h5" && ok || bad "resumed run's file differs from an uninterrupted run's"

# Batch size does not change a byte (explicit heads: the choice itself does not depend on the scores).
config b3 10 3 '{"heads": [[0, 1], [2, 5], [1, 0]], "scales": [0, 2]}'
config b8 10 8 '{"heads": [[0, 1], [2, 5], [1, 0]], "scales": [0, 2]}'
run b3 --until fv; r3=$rc
run b8 --until fv; r8=$rc
[ $r3 = 0 ] && [ $r8 = 0 ] && cmp -s "$tmp/b3/function_vectors.h5" "$tmp/b8/function_vectors.h5" && ok || bad "batch_size 3 vs 8: $r3 $r8 $(cat "$tmp/b3.err" "$tmp/b8.err")"
grep -q "^fv: 3 heads (config), 3 layers x 2 scales" "$tmp/b3.out" && ok || bad "explicit heads line: $(cat "$tmp/b3.out")"
# ... nor does the rank count (the stage runs on rank 0; the others wait).
if command -v mpirun > /dev/null; then
  config np2 10 8 '{"heads": [[0, 1], [2, 5], [1, 0]], "scales": [0, 2]}'
  { ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
      OMPI_MCA_btl_vader_single_copy_mechanism=none OMPI_MCA_rmaps_base_oversubscribe=1 \
      timeout 300 mpirun -np 2 "$bin" run "$tmp/np2.json" > "$tmp/np2.out" 2>&1; rc=$?; } 2> /dev/null
  [ $rc = 0 ] && cmp -s "$tmp/b8/function_vectors.h5" "$tmp/np2/function_vectors.h5" && ok || bad "2 ranks: $rc $(tail -3 "$tmp/np2.out")"
fi

# sweep status: a stage group until fv is done once function_vectors.h5 is complete, not after the rounds.
cat > "$tmp/sw.json" <<EOF
{"name": "fv", "output_root": "$tmp/sw",
 "run": {"model_name": "prune_heads_in_circuits", "n_prompts": 4, "batch_size": 4, "n_shots": 2, "seed": 5, "max_new_tokens": 2,
         "function_vectors": {"top_k": 2, "layers": [1], "scales": [1]}},
 "stages": [{"name": "run", "until": "fv", "gpus": false}],
 "models": [{"name": "smollm-tiny", "path": "tests/fixtures/models/smollm-tiny", "gpus": 0}], "tasks": ["person_sport"]}
EOF
sweep_state() { "$bin" sweep status "$tmp/sw.json" --json 2> /dev/null | $py -c 'import json,sys; r=json.load(sys.stdin)["runs"][0]; print(r["state"], r["stage"])'; }
"$bin" sweep submit "$tmp/sw.json" --dry-run > "$tmp/sw.dry" 2>&1 || bad "sweep submit --dry-run: $(cat "$tmp/sw.dry")"
swrun=$(ls "$tmp"/sw/*/*/sweep-run.json 2> /dev/null | head -1)
if [ -n "$swrun" ]; then
  "$bin" run "$swrun" --until prune > /dev/null 2>&1
  [ "$(sweep_state)" = "started prune" ] && ok || bad "sweep status after the rounds: $(sweep_state)"
  "$bin" run "$swrun" > /dev/null 2>&1
  [ "$(sweep_state)" = "done fv" ] && ok || bad "sweep status after fv: $(sweep_state)"
else
  bad "sweep submit --dry-run wrote no run config: $(cat "$tmp/sw.dry")"
fi

# edgepatch check prints the block resolved (defaults filled in); other fields' identity does not change with it.
config chk 4 4 '{"heads": [[0, 1]]}'
"$bin" check "$tmp/chk.json" --json > "$tmp/chk.out" 2>&1
$py -c 'import json,sys; c=json.load(open(sys.argv[1])); c=c.get("config", c); f=c["function_vectors"]; assert f=={"heads": [[0, 1]], "layers": "all", "scales": [0.0, 0.5, 1.0, 2.0]}, f' "$tmp/chk.out" && ok || bad "check --json: $(cat "$tmp/chk.out")"
sed 's/, "function_vectors": {"heads": \[\[0, 1\]\]}//' "$tmp/chk.json" > "$tmp/chk0.json"
h1=$("$bin" check "$tmp/chk.json" --json | $py -c 'import json,sys; c=json.load(sys.stdin); print(c.get("config", c)["config_hash"])')
h0=$("$bin" check "$tmp/chk0.json" --json | $py -c 'import json,sys; c=json.load(sys.stdin); print(c.get("config", c)["config_hash"])')
[ -n "$h1" ] && [ "$h1" = "$h0" ] && ok || bad "config_hash changes with function_vectors: $h1 vs $h0"

# Bad fields: one line naming the field, nothing written.
bad_field() {  # needle function_vectors-JSON [extra]
  config badf 4 4 "$2" "${3:-}"
  expect_error 1 "$1" run "$tmp/badf.json"
  [ -e "$tmp/badf" ] && bad "bad field $1: output written" || ok
}
bad_field "field function_vectors.layers\[0\]: layer 9 is outside" '{"layers": [9]}'
bad_field "field function_vectors.heads\[0\]: \[0, 6\] is outside" '{"heads": [[0, 6]]}'
bad_field "field function_vectors: unknown field 'scale'" '{"scale": [1]}'
bad_field "field function_vectors: heads and top_k exclude each other" '{"heads": [[0, 1]], "top_k": 2}'
bad_field "field function_vectors.top_k: expected a count 1..100000" '{"top_k": 0}'
bad_field "field function_vectors.scales\[1\]: expected a number" '{"scales": [1, "2"]}'
bad_field "field function_vectors: not with tensor_parallel 2" '{}' ', "tensor_parallel": 2'

finish cli_fv
