#!/usr/bin/env bash
# edgepatch report SWEEP (docs/sweeps.md, "The report across tasks") on a small sweep of experiments
# entries (smollm-tiny, two tasks: accuracy, band ablations, nested, two donor families, pruning), run
# with `sweep run`. The report's numbers are checked against the runs' own HDF5 files read here with
# h5py (tests/sweep_report_check.py), never against the report's own JSON sources:
# - accuracy_drop.csv: each band ablation's full-model and ablated accuracy (means of patch.h5's
#   clean/correct and ablation-NNN/correct, matched by the file's "ablations" attribute), the drop, its
#   layers (band K of N by the documented rounding) and its kind (from the sweep's rules);
# - donor_families.csv, nested.csv (patch.h5's plan/correct), summary.csv (the contextualization mean
#   and the aggregation drop per band, recomputed), circuits.csv (the last round file's kept or circuit
#   masks: head and edge unit counts, faithfulness = logit difference ratio from its metrics), times.csv
#   (sweep-times.json's sums), report.txt's full-model accuracies;
# - the figures: PNG and PDF by their magic bytes, one colour scale (a single cbrange, the largest |drop|
#   over every task's panels), noenhanced;
# - the can-fail sibling: one ablation's accuracy planted wrong in a model_logs.json, the report redone,
#   and the same check must fail; a model_logs.json without a field the report reads is refused in one
#   line naming the file and field, and leaves the old report as it was.
set -u
bin=$1
. "$(dirname "$0")/cli_harness.bash"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
py=${EP_PYTHON:-/usr/bin/python3}
here=$(cd "$(dirname "$0")" && pwd)

python3 - "$tmp/runs" "$tmp/sweep.json" <<'PY'
import json, sys
root, path = sys.argv[1:]
def rule(s, r, rel, layers): return {"sender": s, "receiver": r, "relation": rel, "layers": layers}
groups = [("x->y same", ["x"], ["y"], "same"), ("y->y earlier", ["y"], ["y"], "earlier"), ("y->last", ["y"], ["last"], "any"),
          ("query->last", ["query"], ["last"], "any")]
bands = [{"name": "%s b%d" % (g, k), "group": g, "band": "%d/2" % (k + 1), "rules": [rule(s, r, rel, "band:%d/2" % k)]}
         for g, s, r, rel in groups for k in range(2)]
ex = []
for t in ["person_sport", "present_past"]:
    ex += [{"name": t + ".accuracy", "task": t, "experiment": "accuracy", "until": "patch", "run": {"mode": "calc_accuracy"}},
           {"name": t + ".bands", "task": t, "experiment": "bands", "until": "patch", "run": {"mode": "calc_accuracy", "ablations": bands}},
           {"name": t + ".nested", "task": t, "experiment": "nested", "until": "patch",
            "run": {"mode": "ablate_edges_differently_for_different_tokens", "donors": 2,
                    "affect_whom": {"curcuit": {"y,last": 0}, "ablate": {"x,y": 1}}}}]
    for kind in ["random_xy", "random_y"]:
        ex.append({"name": "%s.donor-%s" % (t, kind), "task": t, "experiment": "donors", "until": "patch",
                   "run": {"mode": "calc_accuracy", "donors": [kind], "ablations": [
                       {"name": g + " all", "group": g, "band": kind, "rules": [rule(s, r, rel, "all")]} for g, s, r, rel in groups[:3]]}})
    ex.append({"name": t + ".prune", "task": t, "experiment": "prune", "until": "prune",
               "run": {"mode": "prune_heads", "importance": "attribution", "prune_rounds": {"heads": 2, "edges": 1},
                       "prune_fraction": 0.1, "min_faithfulness": 0.5}})
json.dump({"name": "reporttest", "output_root": root, "run": {"n_prompts": 12, "batch_size": 4, "seed": 2, "n_shots": 4,
           "max_new_tokens": 3}, "models": [{"name": "smollm-tiny", "path": "tests/fixtures/models/smollm-tiny", "gpus": 0}],
           "experiments": ex, "stages": [{"name": "run", "until": "prune"}]}, open(path, "w"), indent=1)
PY
timeout 900 "$bin" sweep run "$tmp/sweep.json" > "$tmp/run.out" 2> "$tmp/run.err" && ok || bad "sweep run: $(tail -5 "$tmp/run.err")"
timeout 300 "$bin" report "$tmp/sweep.json" -o "$tmp/rep" > "$tmp/rep.out" 2>&1 && ok || bad "report: $(tail -5 "$tmp/rep.out")"

magic() {  # file: png or pdf by its first bytes
  case "$(head -c 8 "$1" | od -An -tx1 | tr -d ' \n')" in
    89504e470d0a1a0a) echo png ;;
    255044462d*) echo pdf ;;
  esac
}
for f in accuracy_drop donor_families circuit-person_sport circuit-present_past; do
  for e in png pdf; do [ "$(magic "$tmp/rep/$f.$e")" = $e ] && ok || bad "$f.$e is not a $e file"; done
done
for f in report.txt accuracy_drop.csv accuracy_drop.gp donor_families.csv nested.csv summary.csv circuits.csv times.csv sweep-times.json; do
  [ -s "$tmp/rep/$f" ] && ok || bad "missing $f"
done
grep -q "Contextualization (x->y, y->y" "$tmp/rep/report.txt" && grep -q "^Circuits" "$tmp/rep/report.txt" && ok ||
  bad "report.txt lacks its tables: $(head -20 "$tmp/rep/report.txt")"
cmp -s "$tmp/rep.out" <(grep -v '^figures: ' "$tmp/rep.out") && bad "no figures line" || ok

"$py" "$here/sweep_report_check.py" "$tmp/sweep.json" "$tmp/rep" && ok || bad "the report's numbers disagree with the runs' HDF5 files (above)"

# --- can-fail sibling: a planted accuracy in one run's model_logs.json, the report redone
cp -r "$tmp/rep" "$tmp/rep-before"
logs=$tmp/runs/smollm-tiny/present_past.bands/model_logs.json
cp "$logs" "$tmp/logs.orig"
python3 - "$logs" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
a = d["ablations"][3]
a["accuracy"] = round(1 - a["accuracy"], 6) if a["accuracy"] != 0.5 else 0.25
json.dump(d, open(sys.argv[1], "w"), indent=2)
PY
timeout 300 "$bin" report "$tmp/sweep.json" -o "$tmp/rep-planted" > /dev/null 2>&1 && ok || bad "report of the planted run failed"
"$py" "$here/sweep_report_check.py" "$tmp/sweep.json" "$tmp/rep-planted" > "$tmp/planted.out" 2>&1 && bad "the check missed a planted accuracy" ||
  { grep -q "present_past" "$tmp/planted.out" && ok || bad "the check failed, but not on the planted run: $(cat "$tmp/planted.out")"; }
# a file without a field the report reads: one line, the old report untouched
python3 - "$logs" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
del d["full_model_accuracy"]
json.dump(d, open(sys.argv[1], "w"))
PY
expect_error 1 "$logs: field full_model_accuracy" report "$tmp/sweep.json" -o "$tmp/rep"
diff -r "$tmp/rep" "$tmp/rep-before" > /dev/null && ok || bad "a refused report changed the old one"
cp "$tmp/logs.orig" "$logs"
expect_error 2 "--json is for a run folder" report "$tmp/sweep.json" --json

finish cli_sweep_report
