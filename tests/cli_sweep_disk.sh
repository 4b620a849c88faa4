#!/usr/bin/env bash
# sweep plan's disk estimates (docs/sweeps.md, "Disk") against the real bytes of runs: every run of two
# small sweeps is run directly (edgepatch run on the configs submit --dry-run writes), then each run's
# files are summed by artifact (prompts, cache, patch, prune; the report's files and the run's own
# config are not estimated) and compared with `sweep plan --json`: the cache (the bytes that matter:
# tens of GB per run on the real models) and the total within 10%, the small artifacts (prompts, patch,
# prune) within 20% (at this size most of their bytes are HDF5's metadata, allocated in 2 KiB blocks;
# prune rounds' units depend on which head types pruning keeps, assumed even; docs/sweeps.md, "Disk"). The sweeps cover two architectures, fp32 and bf16 caches, ablations, head and edge rounds,
# attribution and exact scores in unit groups. Then the estimate from assumed prompt lengths (no
# prompts.h5 yet: prompt_tokens set to the measured mean) for the cache and the total, and the can-fail
# siblings: the same check fails for an estimate of a 4-layer model (inline config, same runs) and for
# an estimate that assumes prompts of twice their length.
set -u
bin=$1
. "$(dirname "$0")/cli_harness.bash"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
py=/usr/bin/python3; [ -x $py ] || py=python3

sed "s#\"runs/sweeps/tiny\"#\"$tmp/a\"#" configs/sweeps/tiny.json > "$tmp/a.json"
cat > "$tmp/b.json" <<EOF
{"name": "knobs", "output_root": "$tmp/b",
 "run": {"model_name": "prune_heads_in_circuits", "n_prompts": 10, "batch_size": 4, "n_shots": 2, "seed": 5,
         "max_new_tokens": 3, "donors": 2, "cache_dtype": "bf16", "importance": "exact", "exact_units_per_item": 40,
         "compare_importance": true, "prune_rounds": {"heads": 1, "edges": 1}, "prune_fraction": 0.3,
         "ablations": [{"name": "y->last", "rules": [{"sender": ["y"], "receiver": ["last"], "relation": "any"}]},
                       {"name": "bos->all", "rules": [{"sender": ["bos"], "receiver": "all", "relation": "any"}]}]},
 "models": [{"name": "smollm-tiny", "path": "tests/fixtures/models/smollm-tiny", "gpus": 0}],
 "tasks": ["person_sport"], "prompt_tokens": 64}
EOF
for s in a b; do
  "$bin" sweep submit "$tmp/$s.json" --dry-run > "$tmp/$s.dry" 2>&1 || bad "submit --dry-run $s: $(cat "$tmp/$s.dry")"
  for c in "$tmp/$s"/*/*/sweep-run.json; do
    "$bin" run "$c" > "$tmp/run.out" 2>&1 && ok || bad "run $c: $(tail -3 "$tmp/run.out")"
  done
  "$bin" sweep plan "$tmp/$s.json" --json > "$tmp/$s.plan.json" 2> "$tmp/$s.plan.err" && ok || bad "plan --json $s: $(cat "$tmp/$s.plan.err")"
done

# compare PLAN_JSON [TOLERANCE_ARTIFACTS]: every run's estimate against its folder's files; prints a
# line per run and artifact and exits non-zero if any is off by more than the tolerance.
cat > "$tmp/compare.py" <<'PY'
import json, os, re, sys
plan = json.load(open(sys.argv[1]))
artifacts = sys.argv[2].split(",") if len(sys.argv) > 2 else ["prompts", "cache", "patch", "prune", "total"]
def artifact(rel):
    if rel in ("prompts.h5", "tokenize_report.json"): return "prompts"
    if rel.startswith("cache.d/"): return "cache"
    if rel.startswith("patch.d/") or rel in ("patch.h5", "model_logs.json"): return "patch"
    if re.match(r"prune\.d/round-\d{3}(\.h5|\.d/item-\d{5}\.h5)$", rel): return "prune"
    if re.match(r"(report\.txt|circuit\.(json|txt|dot|csv|png|svg|pdf)|accuracy_drop\.(gp|csv|png|svg|pdf)|model_digests\.json|sweep-run\.json)$", rel):
        return None  # not estimated
    raise SystemExit("unexpected file in a run folder: " + rel)
bad = 0
for run in plan["runs"]:
    real = dict.fromkeys(["prompts", "cache", "patch", "prune", "total"], 0)
    for root, _, files in os.walk(run["folder"]):
        for f in files:
            p = os.path.join(root, f)
            a = artifact(os.path.relpath(p, run["folder"]))
            if a: real[a] += os.path.getsize(p); real["total"] += os.path.getsize(p)
    for a in artifacts:
        est = run["disk"][a]
        off = abs(est - real[a]) / real[a] if real[a] else float(est != 0)
        limit = 0.10 if a in ("cache", "total") else 0.20
        bad += off > limit
        print("  %-28s %-8s estimate %9d real %9d  %+.1f%%%s" % (run["model"] + "/" + run["task"], a, est, real[a],
              100 * (est - real[a]) / max(real[a], 1), "  OFF" if off > limit else ""))
sys.exit(1 if bad else 0)
PY
for s in a b; do
  $py "$tmp/compare.py" "$tmp/$s.plan.json" > "$tmp/$s.cmp" 2>&1 && ok || bad "sweep $s: estimate off: $(cat "$tmp/$s.cmp")"
  cat "$tmp/$s.cmp"
  $py - "$tmp/$s.plan.json" <<'PY' && ok || bad "sweep $s: tokens not measured or totals wrong"
import json, sys
p = json.load(open(sys.argv[1]))
assert all(r["disk"]["tokens_from"] == "prompts.h5" and r["state"] == "done" for r in p["runs"]), p["runs"]
for a in ["prompts", "cache", "patch", "prune", "total"]:
    assert p["disk"][a] == sum(r["disk"][a] for r in p["runs"]), a
assert p["disk"]["total"] == sum(p["disk"][a] for a in ["prompts", "cache", "patch", "prune"])
PY
done
# the bf16 cache holds half the bytes per value: its estimate is checked above, and it is the smaller
grep -q '"cache_dtype": "bf16"' "$tmp/b/smollm-tiny/person_sport/sweep-run.json" && ok || bad "sweep b: no bf16 cache"

# The table carries the same numbers.
"$bin" sweep plan "$tmp/a.json" > "$tmp/a.plan" 2>&1 && grep -q "^disk (estimate) .*prompts .*cache .*patch .*prune .*total" "$tmp/a.plan" &&
  grep -q "^smollm-tiny/country_capital  " "$tmp/a.plan" && grep -q "^total " "$tmp/a.plan" && ok || bad "plan table: $(cat "$tmp/a.plan")"
sed -n '/^disk/,/^(bytes/p' "$tmp/a.plan" | sed 's/^/  | /'

# Assumed lengths: sweep a's country_capital runs into an empty root, prompt_tokens the measured mean of
# one of them (an independent figure: prompts.h5's lengths read with h5py), compared with sweep a's real
# files (both models' runs have the same prompts' texts; their tokenizers differ slightly).
mean=$($py -c 'import h5py, sys; print(round(float(h5py.File(sys.argv[1])["lengths"][:].mean())))' "$tmp/a/smollm-tiny/country_capital/prompts.h5")
check_assumed() {  # PROMPT_TOKENS -> status of the comparison of sweep a's runs with the assumed estimate
  sed -e "s#\"$tmp/a\"#\"$tmp/empty\"#" -e "s#\"prompt_tokens\": 64#\"prompt_tokens\": $1#" \
    -e 's#"tasks": \[.*\]#"tasks": ["country_capital"]#' "$tmp/a.json" > "$tmp/assumed.json"
  "$bin" sweep plan "$tmp/assumed.json" --json > "$tmp/assumed.plan.json" || return 2
  $py - "$tmp/assumed.plan.json" "$tmp/a" <<'PY' || return 2
import json, sys
p = json.load(open(sys.argv[1]))
for r in p["runs"]:
    assert r["disk"]["tokens_from"] == "prompt_tokens", r
    r["folder"] = r["folder"].replace(p["output_root"], sys.argv[2])
json.dump(p, open(sys.argv[1], "w"))
PY
  $py "$tmp/compare.py" "$tmp/assumed.plan.json" cache,total > "$tmp/assumed.cmp" 2>&1
}
check_assumed "$mean" && ok || bad "assumed prompt_tokens $mean: $(cat "$tmp/assumed.cmp")"
grep " smollm-tiny/country_capital " "$tmp/assumed.cmp"
check_assumed $((2 * mean)); [ $? = 1 ] && ok || bad "can-fail: prompts assumed twice as long passed: $(cat "$tmp/assumed.cmp")"

# Can-fail: an estimate for a 4-layer model (the fixture's config.json with one more layer, inline; the
# runs and their prompts are the same) is more than 10% off.
$py - "$tmp/a.json" tests/fixtures/models/smollm-tiny/config.json > "$tmp/wrong.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1])); c = json.load(open(sys.argv[2]))
c["num_hidden_layers"] += 1
s["models"] = [m for m in s["models"] if m["name"] == "smollm-tiny"]
s["models"][0]["config"] = c
print(json.dumps(s))
PY
"$bin" sweep plan "$tmp/wrong.json" --json > "$tmp/wrong.plan.json" 2>&1 || bad "plan wrong.json: $(cat "$tmp/wrong.plan.json")"
$py "$tmp/compare.py" "$tmp/wrong.plan.json" cache > "$tmp/wrong.cmp" 2>&1; [ $? = 1 ] && ok || bad "can-fail: a 4-layer estimate passed: $(cat "$tmp/wrong.cmp")"

# status --json: the same states as the table
"$bin" sweep status "$tmp/a.json" --json > "$tmp/status.json" 2>&1 &&
  $py -c 'import json,sys; s=json.load(open(sys.argv[1])); assert s["counts"]["done"] == 4 and s["counts"]["runs"] == 4 and all(r["state"] == "done" and r["stage"] == "prune" and r["rounds"] == 3 for r in s["runs"]), s' "$tmp/status.json" &&
  ok || bad "status --json: $(cat "$tmp/status.json")"
expect_error 2 "--json is for plan and status" sweep submit "$tmp/a.json" --json
expect_error 2 "unknown option '--jsn'" sweep plan "$tmp/a.json" --jsn
"$bin" sweep --json plan "$tmp/a.json" > /dev/null 2>&1 && ok || bad "options before the action"
finish cli_sweep_disk
