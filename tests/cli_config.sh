#!/usr/bin/env bash
# The config schema (stages/run_config.h, docs/config.md) checked whole before anything runs: for each
# bad value of issue 17 (a typo in importance, bad pruning fields, min_faithfulness, score_donors,
# exact_units_per_item, a missing prune_using_imp_scores file, max_new_tokens, prune_k longer than the
# rounds, a bad rule in ablations, a task file with "separator": 3, mode against model_name), `edgepatch
# run`, `edgepatch check` and `edgepatch sweep plan` each exit 1 with one line naming the file and the
# field, and the run folder (pre-populated) is left exactly as it was: same listing, same checksums, so
# no prompts.h5, no shard, no temporary. A good config passes check (text and --json, defaults filled
# in), and "mode" does not change the hash of a config without it.
set -u
bin=$1
. "$(dirname "$0")/cli_harness.bash"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1

# A data folder of our own (EDGEPATCH_DATA), so that a sweep (task names only) can meet a bad task file.
cp -r datasets "$tmp/data"
run="$tmp/sw/smollm-tiny/person_sport"  # the run folder of both the config and the sweep's one run
mkdir -p "$run/notes" "$tmp/imp"
echo "kept as it is" > "$run/notes/readme.txt"
printf 'x' > "$run/some.bin"
: > "$run/notes/empty"

# make CASE FRAGMENT: $tmp/CASE.json (a run config) and $tmp/CASE-sweep.json (a sweep with one run),
# the base fields updated with the JSON object FRAGMENT.
make() {
  python3 - "$tmp" "$run" "$1" "$2" <<'PY'
import json, sys
tmp, run, name, frag = sys.argv[1:]
base = {"task": "person_sport", "model_name": "smollm_prune_heads_in_circuits", "n_prompts": 4, "batch_size": 2,
        "seed": 5, "n_shots": 3, "max_new_tokens": 2, "affect_whom": [["x", "y"]], "importance": "attribution",
        "prune_rounds": {"heads": 1, "edges": 1}, "prune_fraction": 0.3}
base.update(json.loads(frag))
config = dict(base, model_path="tests/fixtures/models/smollm-tiny", output_path=run)
json.dump(config, open(f"{tmp}/{name}.json", "w"))
block = {k: v for k, v in base.items() if k != "task"}
sweep = {"name": "s", "output_root": f"{tmp}/sw", "run": block, "tasks": [base["task"]],
         "models": [{"name": "smollm-tiny", "path": "tests/fixtures/models/smollm-tiny", "gpus": 0, "ranks": 1}]}
json.dump(sweep, open(f"{tmp}/{name}-sweep.json", "w"))
PY
}

snapshot() { (cd "$tmp/sw" && find . -printf '%y %m %s %p\n' | sort && find . -type f -exec md5sum {} + | sort); }
before=$(snapshot)

# refused CASE NEEDLE FRAGMENT [SWEEP_NEEDLE]: each command exits 1 with one line holding NEEDLE after the
# file's name (for the sweep: after "SWEEP: run MODEL/TASK: ", or SWEEP_NEEDLE); the folder unchanged
# after each.
refused() {
  local name=$1 needle=$2 sweep_needle=${4:-"run smollm-tiny/person_sport: $2"}
  make "$name" "$3"
  expect_error 1 "$name.json: $needle" run "$tmp/$name.json"
  [ "$(snapshot)" = "$before" ] && ok || bad "$name: run changed the run folder: $(diff <(echo "$before") <(snapshot))"
  expect_error 1 "$name.json: $needle" check "$tmp/$name.json"
  expect_error 1 "$name-sweep.json: $sweep_needle" check "$tmp/$name-sweep.json"
  expect_error 1 "$name-sweep.json: $sweep_needle" sweep plan "$tmp/$name-sweep.json"
  expect_error 1 "$name-sweep.json: $sweep_needle" sweep submit "$tmp/$name-sweep.json" --dry-run
  [ "$(snapshot)" = "$before" ] && ok || bad "$name: check or sweep changed the run folder: $(diff <(echo "$before") <(snapshot))"
}

export EDGEPATCH_DATA="$tmp/data"
refused importance "field importance" '{"importance": "exactt"}'
refused fraction "field prune_fraction" '{"prune_fraction": 1.5}'
refused rounds "field prune_rounds" '{"prune_rounds": {"heads": -1, "edges": 1}}'
refused rounds_key "field prune_rounds" '{"prune_rounds": {"heads": 1, "edgs": 1}}'
refused min_units "field min_units" '{"min_units": -3}'
refused max_seqs "field exact_max_seqs" '{"exact_max_seqs": 0}'
refused faith "field min_faithfulness" '{"min_faithfulness": "high"}'
refused faith_pct "field min_faithfulness" '{"min_faithfulness": 50}'
refused score_donors "field score_donors" '{"score_donors": 3}'
refused units_per_item "field exact_units_per_item" '{"exact_units_per_item": 0}'
refused edge_intervention "field edge_intervention" '{"edge_intervention": "kq"}'
refused eapig_zero "field edge_intervention" '{"importance": "eap-ig", "edge_intervention": "zero"}'
refused plan_intervention "field plan: rules\[0\].intervention" '{"plan": {"rules": [{"sender": ["y"], "receiver": ["last"], "intervention": "zeros"}]}}'
refused plan_zero_donor "field plan: rules\[0\].donor" '{"plan": {"rules": [{"sender": ["y"], "receiver": ["last"], "intervention": "zero", "donor": 1}]}}'
refused imp_missing "field prune_using_imp_scores\[0\]" "{\"prune_using_imp_scores\": [\"$tmp/imp/round-000.h5\"], \"prune_k\": [3]}"
echo "not an HDF5 file" > "$tmp/imp/round-001.h5"
refused imp_bad "field prune_using_imp_scores\[0\]" "{\"prune_using_imp_scores\": [\"$tmp/imp/round-001.h5\"], \"prune_k\": [3]}"
# a sealed HDF5 file of another kind: a tokenize stage's prompts.h5
make other '{}'
sed "s#\"output_path\": \"[^\"]*\"#\"output_path\": \"$tmp/other\"#" "$tmp/other.json" > "$tmp/other2.json"
"$bin" run "$tmp/other2.json" --until tokenize > /dev/null 2>&1 && [ -e "$tmp/other/prompts.h5" ] && ok || bad "tokenize for a prompts.h5"
refused imp_kind "field prune_using_imp_scores\[0\]: .*not a prune round file" "{\"prune_using_imp_scores\": [\"$tmp/other/prompts.h5\"], \"prune_k\": [3]}"
refused max_new "field max_new_tokens" '{"max_new_tokens": 0}'
refused max_new_big "field max_new_tokens" '{"max_new_tokens": 4294967297}'
refused prune_k_long "field prune_k" '{"prune_k": [20, 10, 5]}'
refused prune_k_zero "field prune_k\[1\]" '{"prune_k": [20, 0]}'
refused abl_layer "field ablations\[0\]: rules\[0\].layers\[0\]" '{"ablations": [{"name": "a", "rules": [{"sender": ["y"], "receiver": ["last"], "layers": [99]}]}]}'
refused abl_type "field ablations\[0\]: rules\[0\].sender" '{"ablations": [{"name": "a", "rules": [{"sender": ["yy"], "receiver": ["last"]}]}]}'
refused abl_donor "field ablations\[0\]: reads donor 1" '{"ablations": [{"name": "a", "rules": [{"sender": ["y"], "receiver": ["last"], "donor": 1}]}]}'
refused abl_name "field ablations\[1\]: name 'a'" '{"ablations": [{"name": "a", "rules": []}, {"name": "a", "rules": []}]}'
refused plan_head "field plan: heads\[0\]" '{"plan": {"heads": [{"layer": 0, "head": 9, "type": "last"}]}}'
refused circuit "field circuit: heads\[0\]" '{"circuit": {"heads": [[7, 0, "last"]]}}'
refused affect "field affect_whom" '{"affect_whom": [["x", "yy"]]}'
refused mode_vs_name "fields mode and model_name" '{"mode": "prune_edges"}'
refused mode_typo "field mode" '{"mode": "prune_headz"}'
refused model_name "field model_name" '{"model_name": "smollm_prune_heds"}'
refused cache_dtype "field cache_dtype" '{"cache_dtype": "fp16"}'
refused donors "field donors\[0\]: unknown donor kind" '{"donors": ["random_zz"]}'
python3 - "$tmp/data/tasks/person_sport.json" <<'PY'
import json, sys
t = json.load(open(sys.argv[1])); t["separator"] = 3; json.dump(t, open(sys.argv[1], "w"))
PY
# (a sweep checks its tasks before its runs)
refused separator "field task: .*person_sport.json: field separator" '{}' "tasks\[0\]: .*person_sport.json: field separator"
cp datasets/tasks/person_sport.json "$tmp/data/tasks/person_sport.json"

# A good config: check says ok and fills in the defaults; --json is JSON with the mode; nothing written.
make good '{"mode": "prune_heads"}'
"$bin" check "$tmp/good.json" > "$tmp/good.out" 2>&1 && grep -q "^  mode  *\"prune_heads\"" "$tmp/good.out" &&
  grep -q "^  exact_units_per_item  *64$" "$tmp/good.out" && grep -q '^  donors  *\["random_xy"\]$' "$tmp/good.out" && ok ||
  bad "check good: $(cat "$tmp/good.out")"
"$bin" check "$tmp/good.json" --json | python3 -c 'import json,sys; c=json.load(sys.stdin); assert c["mode"]=="prune_heads" and c["min_units"]==1 and c["prune_rounds"]=={"heads":1,"edges":1} and c["n_shots"]==3 and c["score_donors"]=="all" and c["edge_intervention"]=="kv", c' &&
  ok || bad "check --json"
"$bin" check "$tmp/good-sweep.json" > "$tmp/goods.out" 2>&1 && grep -q "good-sweep.json: 1 runs ok" "$tmp/goods.out" && ok || bad "check sweep: $(cat "$tmp/goods.out")"
[ "$(snapshot)" = "$before" ] && ok || bad "check of a good config wrote: $(diff <(echo "$before") <(snapshot))"
# "mode" is a field of the identity only where given: the original's form hashes as before.
make plain '{"prune_fraction": 0.5}'  # a fraction both JSON writers print the same way
h_plain=$("$bin" check "$tmp/plain.json" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["config_hash"])')
h_mode=$("$bin" check "$tmp/good.json" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["config_hash"])')
want=$(python3 - "$tmp/plain.json" <<'PY'
import json, sys
# FNV-1a 64 of the canonical JSON (sorted keys, compact) without the fields outside the identity: an
# independent computation of run_config's hash.
c = json.load(open(sys.argv[1]))
for k in ("output_path", "description", "backend", "tensor_parallel"): c.pop(k, None)
s = json.dumps(c, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
h = 0xcbf29ce484222325
for b in s.encode() + b"\0":  # hash_str includes the terminating NUL
    h = ((h ^ b) * 0x100000001b3) & 0xffffffffffffffff
print("%016x" % h)
PY
)
[ "$h_plain" = "$want" ] && [ "$h_mode" != "$h_plain" ] && ok || bad "config hash: plain $h_plain (FNV-1a of the canonical JSON: $want), with mode $h_mode"
# usage
expect_error 2 "need CONFIG" check
expect_error 2 "unknown option" check "$tmp/good.json" --frobnicate

finish cli_config
