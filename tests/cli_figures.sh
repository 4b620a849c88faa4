#!/usr/bin/env bash
# The report's figures and their data (docs/demo.md, "The report"), on a small run of every stage
# (smollm-tiny: patch with four ablations, one head and one edge pruning round).
# Checks: accuracy_drop and circuit come as PNG, PDF and SVG (magic bytes) with accuracy_drop.csv and
# circuit.csv beside them; accuracy_drop.csv agrees with patch.h5 read independently (h5py: per-prompt
# `correct` of clean/ and every ablation-NNN/, the paired counts, n, the drop) and its 95% intervals
# with the Python reference of tests/check_interval.py, also on a model_logs.json edited to give
# non-trivial counts; circuit.csv lists circuit.json's units with the scores of the round files (h5py);
# circuit.dot has one rank per layer with every layer's label and the legend; a second report is
# byte-identical (the PDFs' dates are fixed); a bad model_logs.json (a wrong count, {}) is refused in one
# line and leaves every old file as it was; stale temporaries of the new files go, a live one stays; a
# model_logs.json without the counts still gives every figure, without intervals; without gnuplot and
# dot the CSVs are still written.
set -u
bin=$1
. "$(dirname "$0")/cli_harness.bash"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
py=${EP_PYTHON:-/usr/bin/python3}
here=$(cd "$(dirname "$0")" && pwd)

printf '{"task": "person_sport", "model_name": "smollm_prune_heads_in_circuits", "model_path": "tests/fixtures/models/smollm-tiny", "output_path": "%s/run", "n_prompts": 8, "batch_size": 4, "seed": 5, "n_shots": 3, "donors": 2, "max_new_tokens": 4, "affect_whom": [["x", "y"]], "importance": "attribution", "prune_rounds": {"heads": 1, "edges": 1}, "prune_fraction": 0.2, "ablations": [{"name": "y->last L0", "group": "y->last", "band": "0", "rules": [{"sender": ["y"], "receiver": ["last"], "layers": [0]}]}, {"name": "y->last L1-2", "group": "y->last", "band": "1-2", "rules": [{"sender": ["y"], "receiver": ["last"], "layers": [1, 2]}]}, {"name": "x->y L0", "group": "x->y", "band": "0", "rules": [{"sender": ["x"], "receiver": ["y"], "layers": [0]}]}, {"name": "x->y L1-2", "group": "x->y", "band": "1-2", "rules": [{"sender": ["x"], "receiver": ["y"], "layers": [1, 2]}]}]}\n' "$tmp" > "$tmp/run.json"
timeout 300 "$bin" run "$tmp/run.json" > "$tmp/run.out" 2>&1 && ok || bad "run: $(tail -5 "$tmp/run.out")"
d=$tmp/run
figures="accuracy_drop.png accuracy_drop.pdf accuracy_drop.svg circuit.png circuit.pdf circuit.svg"
data="report.txt accuracy_drop.gp accuracy_drop.csv circuit.dot circuit.csv"
magic() {  # file: png, pdf or svg by its first bytes
  case "$(head -c 8 "$1" | od -An -tx1 | tr -d ' \n')" in
    89504e470d0a1a0a) echo png ;;
    255044462d*) echo pdf ;;
    *) head -c 400 "$1" | grep -q '<svg' && echo svg ;;
  esac
}
for f in $figures; do [ "$(magic "$d/$f")" = "${f##*.}" ] && ok || bad "$f is not a ${f##*.} file"; done
for f in $data; do [ -s "$d/$f" ] && ok || bad "missing $f"; done
grep -q "drop 95% interval" "$d/report.txt" && grep -q "Newcombe" "$d/report.txt" && ok || bad "report.txt has no intervals: $(cat "$d/report.txt")"
grep -q "n = 8 prompts" "$d/accuracy_drop.gp" && ok || bad "the heatmap's title does not give n"

# accuracy_drop.csv against patch.h5 and the Python reference interval
check_csv() {  # run folder: every row as patch.h5 and model_logs.json give it
  "$py" - "$1" "$here" <<'PY'
import csv, json, sys
import h5py
sys.path.insert(0, sys.argv[2])
from check_interval import newcombe_paired
from statistics import NormalDist
run = sys.argv[1]
z = NormalDist().inv_cdf(0.975)
logs = json.load(open(f"{run}/model_logs.json"))
rows = list(csv.DictReader(open(f"{run}/accuracy_drop.csv")))
bad = []
with h5py.File(f"{run}/patch.h5", "r") as f:
    clean = f["clean/correct"][()]
    names = json.loads(f.attrs["ablations"])
    assert len(rows) == len(names) == 4, (len(rows), names)
    for row in rows:
        a = names.index(row["ablation"])
        abl = f[f"ablation-{a:03d}/correct"][()]
        n = len(clean)
        counts = [int(((clean == 1) & (abl == 1)).sum()), int(((clean == 1) & (abl == 0)).sum()),
                  int(((clean == 0) & (abl == 1)).sum()), int(((clean == 0) & (abl == 0)).sum())]
        entry = logs["ablations"][a]
        want = {"n_prompts": n, "both_correct": counts[0], "full_model_only_correct": counts[1],
                "ablated_only_correct": counts[2], "neither_correct": counts[3]}
        for k, v in want.items():
            if int(row[k]) != v: bad.append(f"{row['ablation']}: {k} {row[k]}, patch.h5 gives {v}")
        if (row["group"], row["band"]) != (entry["group"], entry["band"]): bad.append(f"{row['ablation']}: labels")
        layers = {"0": "0", "1-2": "1-2"}[row["band"]]
        if row["layers"] != layers: bad.append(f"{row['ablation']}: layers {row['layers']}, want {layers}")
        drop = clean.mean() - abl.mean()
        if abs(float(row["drop"]) - drop) > 1e-6: bad.append(f"{row['ablation']}: drop {row['drop']}, want {drop}")
        lo, hi = newcombe_paired(*counts, z)
        if abs(float(row["drop_ci95_low"]) - lo) > 1e-6 or abs(float(row["drop_ci95_high"]) - hi) > 1e-6:
            bad.append(f"{row['ablation']}: interval [{row['drop_ci95_low']}, {row['drop_ci95_high']}], want [{lo:.6f}, {hi:.6f}]")
print("\n".join(bad))
sys.exit(1 if bad else 0)
PY
}
check_csv "$d" && ok || bad "accuracy_drop.csv disagrees with patch.h5"

# Non-trivial counts (the tiny model answers nothing correctly): model_logs.json edited to counts of
# 3/3/1/1 for the first ablation (accuracies to match), the report's interval against the reference.
mkdir -p "$tmp/edit" && cp "$d"/model_logs.json "$d"/circuit.json "$tmp/edit/" && cp -r "$d/prune.d" "$tmp/edit/"
jq '.full_model_accuracy = 0.75 | .ablations[0].accuracy = 0.5
    | .ablations[0].prompts_correct = {"both": 3, "full_model_only": 3, "ablated_only": 1, "neither": 1}' "$d/model_logs.json" > "$tmp/edit/model_logs.json"
"$bin" report "$tmp/edit" > "$tmp/edit.out" 2>&1 && ok || bad "report on edited counts: $(cat "$tmp/edit.out")"
"$py" - "$tmp/edit/accuracy_drop.csv" "$here" <<'PY' && ok || bad "interval of the edited counts"
import csv, sys
sys.path.insert(0, sys.argv[2])
from check_interval import newcombe_paired
from statistics import NormalDist
row = next(r for r in csv.DictReader(open(sys.argv[1])) if r["ablation"] == "y->last L0")
lo, hi = newcombe_paired(3, 3, 1, 1, NormalDist().inv_cdf(0.975))
got = float(row["drop_ci95_low"]), float(row["drop_ci95_high"])
print(f"cli_figures: counts 3/3/1/1 of 8: drop {row['drop']}, interval {got}, reference ({lo:.6f}, {hi:.6f})")
sys.exit(0 if abs(got[0] - lo) < 1e-6 and abs(got[1] - hi) < 1e-6 and abs(float(row["drop"]) - 0.25) < 1e-9 else 1)
PY
grep -q '"0.25"' "$tmp/edit/accuracy_drop.gp" && grep -qF '"[-0.' "$tmp/edit/accuracy_drop.gp" && ok || bad "the cell label lacks the value or interval"

# circuit.csv: circuit.json's units, each with its score from the round files
"$py" - "$d" <<'PY' && ok || bad "circuit.csv disagrees with circuit.json or the round files"
import csv, json, sys
import h5py
run = sys.argv[1]
c = json.load(open(f"{run}/circuit.json"))
rows = list(csv.DictReader(open(f"{run}/circuit.csv")))
types = ["bos", "x", "t", "y", "n", "query", "last", "target"]
want = [("head", l, h, t, "", "") for l, h, t in c["heads"]] + [("edge", l, h, "", s, r) for l, h, s, r in c["edges"]]
got = [(r["kind"], int(r["layer"]), int(r["head"]), r["type"], r["sender"], r["receiver"]) for r in rows]
if got != want: sys.exit(f"units differ: {len(got)} rows, {len(want)} units")
scores = {}
for rnd in range(c["round"] + 1):
    with h5py.File(f"{run}/prune.d/round-{rnd:03d}.h5", "r") as f:
        kind = f.attrs["kind"]
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        for u, s in zip(f["units"][()], f["scores"][()]):
            key = ("head", u[0], u[1], types[u[2]], "", "") if kind == "head" else ("edge", u[0], u[1], "", types[u[2]], types[u[3]])
            scores[key] = (float(s), rnd)
bad = [r for r, k in zip(rows, got) if k not in scores or abs(float(r["score"]) - scores[k][0]) > 1e-6 * max(1, abs(scores[k][0]))
       or int(r["score_round"]) != scores[k][1]]
print(f"cli_figures: circuit.csv: {len(rows)} units ({len(c['heads'])} head, {len(c['edges'])} edge), {len(rows) - len(bad)} scores match the round files")
sys.exit(1 if bad else 0)
PY
L=$(jq .n_layers "$d/circuit.json")
[ "$L" -ge 1 ] 2> /dev/null && ok || bad "circuit.json has no n_layers"
axis=1
for l in $(seq 0 $((L - 1))); do grep -q "rank=same; \"L$l\"" "$d/circuit.dot" || axis=0; done
[ $axis = 1 ] && grep -q 'token types:' "$d/circuit.dot" && grep -q 'Dashed box' "$d/circuit.dot" && ok || bad "circuit.dot lacks a rank per layer or the legend"

# The report again: every file byte-identical (PNG, PDF, SVG, CSV, sources)
mkdir -p "$tmp/first" && (cd "$d" && cp $figures $data "$tmp/first/")
sleep 1
"$bin" report "$d" > "$tmp/again.out" 2>&1 && ok || bad "report: $(cat "$tmp/again.out")"
same() { local f; for f in $figures $data; do cmp -s "$tmp/first/$f" "$d/$f" || { echo "  $f differs" >&2; return 1; }; done; }
same && ok || bad "a second report is not byte-identical"

# Bad model_logs.json: one line naming the file and field, nothing written
cp "$d/model_logs.json" "$tmp/logs.json"
jq '.ablations[1].prompts_correct.neither = 100' "$tmp/logs.json" > "$d/model_logs.json"
expect_error 1 "model_logs.json: field ablations\[1\].prompts_correct: the counts add up to" report "$d"
same && ok || bad "a refused report changed files"
echo '{}' > "$d/model_logs.json"
expect_error 1 "model_logs.json: field task: missing" report "$d"
same && ok || bad "a refused report ({}) changed files"
cp "$tmp/logs.json" "$d/model_logs.json"

# Stale temporaries of the new files go, a live writer's stays
sleep 0 & dead=$!; wait $dead
sleep 60 & live=$!
for f in accuracy_drop.pdf accuracy_drop.csv circuit.csv circuit.pdf; do printf 'partial' > "$d/$f.tmp-$dead"; done
printf 'partial' > "$d/accuracy_drop.svg.tmp-$live"
"$bin" report "$d" > /dev/null 2>&1 && [ "$(cd "$d" && ls *.tmp-* | tr '\n' ' ')" = "accuracy_drop.svg.tmp-$live " ] && ok ||
  bad "report's temporaries: $(cd "$d" && ls *.tmp-*)"
kill $live 2> /dev/null; rm -f "$d"/*.tmp-*

# model_logs.json from before the counts: every figure, no intervals, one note
jq 'del(.prompts_correct) | del(.ablations[].prompts_correct) | del(.ablations[].layers)' "$tmp/logs.json" > "$d/model_logs.json"
"$bin" report "$d" > "$tmp/old.out" 2>&1 && grep -q "no 95% intervals" "$tmp/old.out" && ok || bad "report on old model_logs.json: $(cat "$tmp/old.out")"
awk -F, 'NR > 1 && $9 != "" {exit 1}' "$d/accuracy_drop.csv" && [ "$(magic "$d/accuracy_drop.pdf")" = pdf ] && ok || bad "old model_logs.json: $(head -3 "$d/accuracy_drop.csv")"
cp "$tmp/logs.json" "$d/model_logs.json"

# Without gnuplot and dot: the CSVs, no figures
rm -f "$d"/*.png "$d"/*.pdf "$d"/*.svg "$d"/*.csv
PATH=/nonexistent "$bin" report "$d" > "$tmp/notools.out" 2>&1 && [ "$(grep -c 'skipped: .* is not installed' "$tmp/notools.out")" = 2 ] &&
  [ -s "$d/accuracy_drop.csv" ] && [ -s "$d/circuit.csv" ] && [ -z "$(ls "$d"/*.png "$d"/*.pdf 2> /dev/null)" ] && ok ||
  bad "report without tools: $(cat "$tmp/notools.out")"
finish cli_figures
