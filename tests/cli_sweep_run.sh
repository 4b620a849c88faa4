#!/usr/bin/env bash
# edgepatch sweep run (docs/sweeps.md, "Running a sweep here"): a sweep of experiments entries on the tiny
# models (a plain task, and per task accuracy, band ablations with "band:K/N", the nested experiment, a
# donor family and pruning) runs every entry here, one after another, and
# - every run ends done, each run config is what the entry asked (task, mode, donors, ablations), and
#   each band ablation's layers are band K of N of the model's layers by the documented rounding
#   ([floor(K L / N), floor((K + 1) L / N)), computed here independently, on two depths);
# - sweep-times.json has a record with wall and CPU seconds for every run;
# - a stop signal in the middle (SIGTERM while the third run computes) exits 75, leaves that run
#   "started" (its patch.h5 absent or sealed, never a half file that looks complete) and the later runs
#   pending; a rerun skips the finished runs ("done already"), finishes the rest, exits 0, and every
#   model_logs.json, circuit.json and circuit.txt is byte-identical to those of a sweep never stopped;
# - a bad sweep field (unknown experiments field, bad until, bad band, a name used twice, a per-run
#   field in an entry's run, a missing task) is one line naming the file and the field, exit 1, nothing
#   written.
set -u
bin=$1
. "$(dirname "$0")/cli_harness.bash"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
py=${EP_PYTHON:-/usr/bin/python3}

make_sweep() {  # output root, file
  python3 - "$1" "$2" <<'PY'
import json, sys
root, path = sys.argv[1:]
bands = [{"name": "y->last b%d/2" % k, "group": "y->last", "band": "%d/2" % (k + 1),
          "rules": [{"sender": ["y"], "receiver": ["last"], "relation": "any", "layers": "band:%d/2" % k}]} for k in range(2)]
bands += [{"name": "x->y b%d/2" % k, "group": "x->y same", "band": "%d/2" % (k + 1),
           "rules": [{"sender": ["x"], "receiver": ["y"], "relation": "same", "layers": "band:%d/2" % k}]} for k in range(2)]
ex = []
for t in ["person_sport", "present_past"]:
    ex += [{"name": t + ".accuracy", "task": t, "experiment": "accuracy", "until": "patch", "run": {"mode": "calc_accuracy"}},
           {"name": t + ".bands", "task": t, "experiment": "bands", "until": "patch",
            "run": {"mode": "calc_accuracy", "ablations": bands}},
           {"name": t + ".nested", "task": t, "experiment": "nested", "until": "patch",
            "run": {"mode": "ablate_edges_differently_for_different_tokens", "donors": 2,
                    "affect_whom": {"curcuit": {"y,last": 0}, "ablate": {"x,y": 1}}}},
           {"name": t + ".donor-random_y", "task": t, "experiment": "donors", "until": "patch",
            "run": {"mode": "calc_accuracy", "donors": ["random_y"], "ablations": [
                {"name": "y->last all", "group": "y->last", "band": "random_y",
                 "rules": [{"sender": ["y"], "receiver": ["last"], "relation": "any", "layers": "all"}]}]}},
           {"name": t + ".prune", "task": t, "experiment": "prune", "until": "prune",
            "run": {"mode": "prune_heads", "importance": "attribution", "prune_rounds": {"heads": 1, "edges": 1},
                    "prune_fraction": 0.1, "min_faithfulness": 0.8}}]
s = {"name": "runtest", "output_root": root,
     "run": {"n_prompts": 6, "batch_size": 3, "seed": 4, "n_shots": 3, "max_new_tokens": 3},
     "models": [{"name": "smollm-tiny", "path": "tests/fixtures/models/smollm-tiny", "gpus": 0},
                {"name": "gemma2-tiny", "path": "tests/fixtures/models/gemma2-tiny", "gpus": 0}],
     "tasks": ["country_capital"], "experiments": ex, "stages": [{"name": "run", "until": "prune"}]}
json.dump(s, open(path, "w"), indent=1)
PY
}

# --- A whole sweep, uninterrupted
make_sweep "$tmp/a" "$tmp/a.json"
timeout 600 "$bin" sweep run "$tmp/a.json" > "$tmp/a.out" 2> "$tmp/a.err" && ok || bad "sweep run: $(tail -5 "$tmp/a.err")"
"$bin" sweep status "$tmp/a.json" > "$tmp/a.status" 2>&1
grep -q "^22 runs: 22 done," "$tmp/a.status" && ok || bad "not every run done: $(cat "$tmp/a.status")"
"$py" - "$tmp/a.json" <<'PY' && ok || bad "runs are not what the entries asked (above)"
import json, os, sys
s = json.load(open(sys.argv[1]))
bad = []
for m in s["models"]:
    L = json.load(open(os.path.join(m["path"], "config.json")))["num_hidden_layers"]
    entries = [{"name": t, "task": t, "until": "prune", "run": {}} for t in s["tasks"]] + s["experiments"]
    for e in entries:
        d = os.path.join(s["output_root"], m["name"], e["name"])
        c = json.load(open(os.path.join(d, "sweep-run.json")))
        want = dict(s["run"], **e["run"])
        for k, v in want.items():
            if c.get(k) != v: bad.append(f"{d}: {k} = {c.get(k)!r}, the entry asks {v!r}")
        if c["task"] != e["task"] or c["model_path"] != m["path"] or c["output_path"] != d:
            bad.append(f"{d}: task/model_path/output_path {c['task']} {c['model_path']} {c['output_path']}")
        if e.get("until") == "patch" and os.path.exists(os.path.join(d, "prune.d")):
            bad.append(f"{d}: ran past its until (patch)")
        logs = json.load(open(os.path.join(d, "model_logs.json")))
        for a, cfg in zip(logs.get("ablations", []), c.get("ablations", [])):
            lay = cfg["rules"][0]["layers"]
            if isinstance(lay, str) and lay.startswith("band:"):
                k, n = map(int, lay[5:].split("/"))
                want_layers = list(range(k * L // n, (k + 1) * L // n))
            else:
                want_layers = list(range(L))
            if a["layers"] != want_layers: bad.append(f"{d}: {a['name']}: layers {a['layers']}, band says {want_layers} (L = {L})")
        if e["name"].endswith(".prune") and not os.path.exists(os.path.join(d, "circuit.json")):
            bad.append(f"{d}: no circuit.json")
t = json.load(open(os.path.join(s["output_root"], "sweep-times.json")))
runs = t["runs"]
if len(runs) != 22: bad.append(f"sweep-times.json: {len(runs)} records")
for r in runs:
    if r["state"] != "done" or not (r["wall_s"] > 0 and r["cpu_s"] > 0): bad.append(f"sweep-times.json: {r}")
for b in bad: print(b, file=sys.stderr)
sys.exit(1 if bad else 0)
PY
# a second call finds everything done and computes nothing
timeout 120 "$bin" sweep run "$tmp/a.json" > /dev/null 2> "$tmp/a2.err" && [ "$(grep -c 'done already, skipped' "$tmp/a2.err")" = 22 ] &&
  ok || bad "second sweep run did not skip every run: $(tail -3 "$tmp/a2.err")"

# --- Stopped in the middle, then resumed
make_sweep "$tmp/b" "$tmp/b.json"
# timeout --foreground: a plain timeout passes the signal on to the child and then to its whole process
# group, so the run would get it twice, and a second stop signal ends a run at once (docs/distribution.md).
EDGEPATCH_TEST_ITEM_DELAY_MS=300 timeout --foreground 600 "$bin" sweep run "$tmp/b.json" > "$tmp/b.out" 2> "$tmp/b.err" &
pid=$!
# Until the third run computes (bounded by time: the suite runs beside this test and can make the first
# two runs take minutes); then a little later, inside it (its items take 300 ms each).
third=0
for _ in $(seq 3000); do
  grep -q "\[3/22\]" "$tmp/b.err" 2> /dev/null && [ -e "$tmp/b/smollm-tiny/person_sport.bands/cache.d" ] && { third=1; break; }
  sleep 0.1
done
[ $third = 1 ] || bad "the stopped sweep never reached its third run in 300 s: $(tail -3 "$tmp/b.err")"
sleep 0.5
kill -TERM $pid
wait $pid
st=$?
[ "$st" = 75 ] && ok || bad "stopped sweep run: exit $st, want 75: $(tail -3 "$tmp/b.err")"
"$bin" sweep status "$tmp/b.json" > "$tmp/b.status" 2>&1
awk '$1 == "smollm-tiny/country_capital" && $2 == "done"' "$tmp/b.status" | grep -q . &&
  awk '$1 == "smollm-tiny/person_sport.bands" && $2 == "started"' "$tmp/b.status" | grep -q . &&
  awk '$1 == "smollm-tiny/person_sport.nested" && $2 == "pending"' "$tmp/b.status" | grep -q . &&
  ok || bad "status after the stop: $(head -6 "$tmp/b.status")"
p=$tmp/b/smollm-tiny/person_sport.bands/patch.h5
[ ! -e "$p" ] || h5dump -H "$p" > /dev/null 2>&1 && ok || bad "$p looks half written"
grep -q '"state": "interrupted"' "$tmp/b/sweep-times.json" && ok || bad "sweep-times.json does not record the interrupted run"
timeout 600 "$bin" sweep run "$tmp/b.json" > "$tmp/b2.out" 2> "$tmp/b2.err" && ok || bad "resumed sweep run: $(tail -5 "$tmp/b2.err")"
grep -q "smollm-tiny/country_capital: done already, skipped" "$tmp/b2.err" && grep -q "person_sport.accuracy: done already, skipped" "$tmp/b2.err" &&
  ! grep -q "person_sport.bands: done already" "$tmp/b2.err" && ok || bad "resume did not skip exactly the finished runs: $(head -4 "$tmp/b2.err")"
"$bin" sweep status "$tmp/b.json" | grep -q "^22 runs: 22 done," && ok || bad "resumed sweep not done"
same=0 differ=0
for f in $(cd "$tmp/a" && find . -name model_logs.json -o -name circuit.json -o -name circuit.txt | sort); do
  if cmp -s "$tmp/a/$f" "$tmp/b/$f"; then same=$((same + 1)); else differ=$((differ + 1)); echo "  differs: $f" >&2; fi
done
[ "$differ" = 0 ] && [ "$same" -ge 26 ] && ok || bad "stopped-and-resumed sweep differs from an uninterrupted one ($same same, $differ differ)"
cmp -s "$tmp/a/smollm-tiny/person_sport.bands/model_logs.json" "$tmp/a/smollm-tiny/present_past.bands/model_logs.json" &&
  bad "two tasks' results are the same: the comparison above cannot fail" || ok
echo "  $same result files identical after a stop and a resume"

# --- Bad sweep files: one line naming the file and field, nothing written
bad_sweep() {  # name, python expression editing s, needle
  "$py" - "$tmp/a.json" "$tmp/$1.json" "$2" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
s["output_root"] = sys.argv[2] + ".out"
exec(sys.argv[3])
json.dump(s, open(sys.argv[2], "w"))
PY
  expect_error 1 "$3" sweep run "$tmp/$1.json"
  [ ! -e "$tmp/$1.json.out" ] && ok || bad "$1: a refused sweep wrote into its output_root"
}
bad_sweep unknown 's["experiments"][2]["untill"] = "patch"' "$tmp/unknown.json: experiments\[2\]: unknown field 'untill'"
bad_sweep until 's["experiments"][0]["until"] = "pach"' "experiments\[0\]: field until: 'pach'"
bad_sweep band 's["experiments"][1]["run"]["ablations"][0]["rules"][0]["layers"] = "band:2/2"' "band:K/N"
bad_sweep twice 's["experiments"][1]["name"] = s["experiments"][0]["name"]' "experiments\[1\]: run name 'person_sport.accuracy' used twice"
bad_sweep perrun 's["experiments"][0]["run"]["output_path"] = "x"' "experiments\[0\].run: field output_path: set per run"
bad_sweep notask 's["experiments"][0]["task"] = "no_such_task"' "experiments\[0\].task"
bad_sweep runfield 's["experiments"][3]["run"]["donors"] = ["no_such_kind"]' "field donors\[0\]: unknown donor kind"

finish cli_sweep_run
