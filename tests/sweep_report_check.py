#!/usr/bin/env python3
"""Checks `edgepatch report SWEEP`'s numbers (one model) against the runs' own HDF5 files, read here with
h5py, and the sweep file (tests/cli_sweep_report.sh). Usage: sweep_report_check.py SWEEP REPORT_DIR.
Exit 0 when everything agrees; otherwise one line per disagreement on stderr and exit 1."""
import csv
import json
import os
import re
import sys

import h5py

sweep_path, rep = sys.argv[1:3]
s = json.load(open(sweep_path))
assert len(s["models"]) == 1, "one model"
model = s["models"][0]
L = json.load(open(os.path.join(model["path"], "config.json")))["num_hidden_layers"]
root = os.path.join(s["output_root"], model["name"])
entries = s["experiments"]
bad = []
TOL = 1e-5


def close(a, b):
    return (a == "" and b is None) or (a != "" and b is not None and abs(float(a) - b) <= TOL)


def patch_accuracies(run):
    """full-model accuracy, the plan's, and each ablation's by name, from patch.h5."""
    with h5py.File(os.path.join(root, run, "patch.h5"), "r") as f:
        full = float(f["clean/correct"][()].mean())
        plan = float(f["plan/correct"][()].mean()) if "plan" in f else None
        names = json.loads(f.attrs["ablations"]) if "ablations" in f.attrs else []
        abl = {n: float(f["ablation-%03d/correct" % i][()].mean()) for i, n in enumerate(names)}
        n = len(f["clean/correct"][()])
    return full, plan, abl, n


def rows(name):
    return list(csv.DictReader(open(os.path.join(rep, name))))


def kind_of(rules):
    ctx = all(r["receiver"] == ["y"] and set(r["sender"]) <= {"x", "y"} for r in rules)
    agg = all(r["receiver"] == ["last"] and r["sender"] == ["y"] for r in rules)
    return "contextualization" if ctx else "aggregation" if agg else "other"


def band_layers(spec):
    if spec == "all":
        return list(range(L))
    k, n = map(int, spec[5:].split("/"))
    return list(range(k * L // n, (k + 1) * L // n))


def ranges(layers):
    out, i = [], 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1:
            j += 1
        out.append(str(layers[i]) if i == j else "%d-%d" % (layers[i], layers[j]))
        i = j + 1
    return " ".join(out)


most = 0.05
# accuracy_drop.csv and summary.csv
drop_rows = rows("accuracy_drop.csv")
want_rows, ctx_sum = 0, {}
for e in entries:
    if e["experiment"] != "bands":
        continue
    full, _, abl, n = patch_accuracies(e["name"])
    for a in e["run"]["ablations"]:
        want_rows += 1
        r = [x for x in drop_rows if x["task"] == e["task"] and x["ablation"] == a["name"]]
        if len(r) != 1:
            bad.append(f"accuracy_drop.csv: {len(r)} rows for {e['task']} / {a['name']}")
            continue
        r = r[0]
        d = full - abl[a["name"]]
        most = max(most, abs(d))
        kind = kind_of(a["rules"])
        key = (e["task"], a["band"])
        c = ctx_sum.setdefault(key, {"contextualization": [], "aggregation": []})
        if kind in c:
            c[kind].append(d)
        for field, want in (("full_model_accuracy", full), ("accuracy", abl[a["name"]]), ("drop", d)):
            if not close(r[field], want):
                bad.append(f"accuracy_drop.csv: {e['task']} / {a['name']}: {field} {r[field]}, patch.h5 gives {want:.6f}")
        if r["layers"] != ranges(band_layers(a["rules"][0]["layers"])) or r["kind"] != kind or int(r["n_prompts"]) != n:
            bad.append(f"accuracy_drop.csv: {e['task']} / {a['name']}: layers {r['layers']!r} kind {r['kind']} n {r['n_prompts']}, "
                       f"want {ranges(band_layers(a['rules'][0]['layers']))!r} {kind} {n}")
if len(drop_rows) != want_rows:
    bad.append(f"accuracy_drop.csv: {len(drop_rows)} rows, the sweep has {want_rows} band ablations")
for r in rows("summary.csv"):
    c = ctx_sum.get((r["task"], r["band"]))
    if c is None:
        bad.append(f"summary.csv: unexpected row {r}")
        continue
    for k in ("contextualization", "aggregation"):
        want = sum(c[k]) / len(c[k]) if c[k] else None
        if not close(r[k + "_drop"], want):
            bad.append(f"summary.csv: {r['task']} band {r['band']}: {k} {r[k + '_drop']}, patch.h5 gives {want}")
if len(rows("summary.csv")) != len(ctx_sum):
    bad.append(f"summary.csv: {len(rows('summary.csv'))} rows, want {len(ctx_sum)}")

# donor_families.csv
fam = rows("donor_families.csv")
n_fam = 0
for e in entries:
    if e["experiment"] != "donors":
        continue
    full, _, abl, _ = patch_accuracies(e["name"])
    kind = e["run"]["donors"][0]
    for a in e["run"]["ablations"]:
        n_fam += 1
        r = [x for x in fam if x["task"] == e["task"] and x["donor_kind"] == kind and x["group"] == a["group"]]
        d = full - abl[a["name"]]
        most = max(most, abs(d))
        if len(r) != 1 or not close(r[0]["drop"], d) or not close(r[0]["accuracy"], abl[a["name"]]):
            bad.append(f"donor_families.csv: {e['task']} {kind} {a['group']}: {r}, patch.h5 gives drop {d:.6f}")
if len(fam) != n_fam:
    bad.append(f"donor_families.csv: {len(fam)} rows, want {n_fam}")

# nested.csv
nest = {r["task"]: r for r in rows("nested.csv")}
for e in entries:
    if e["experiment"] == "nested":
        full, plan, _, _ = patch_accuracies(e["name"])
        r = nest.get(e["task"])
        if not r or not close(r["accuracy"], plan) or not close(r["full_model_accuracy"], full) or not close(r["drop"], full - plan):
            bad.append(f"nested.csv: {e['task']}: {r}, patch.h5 gives full {full} nested {plan}")

# circuits.csv: the last round file's kept (or, stopped by the faithfulness floor, circuit) masks
circ = {r["task"]: r for r in rows("circuits.csv")}
for e in entries:
    if e["experiment"] != "prune":
        continue
    d = os.path.join(root, e["name"], "prune.d")
    last = max(int(m.group(1)) for m in (re.match(r"round-(\d+)\.h5$", x) for x in os.listdir(d)) if m)
    options = []
    with h5py.File(os.path.join(d, "round-%03d.h5" % last), "r") as f:
        metrics = f["metrics"][()]
        rn = [x.decode() if isinstance(x, bytes) else str(x) for x in f["metrics"].attrs["row_names"]]
        cn = [x.decode() if isinstance(x, bytes) else str(x) for x in f["metrics"].attrs["column_names"]]
        ld = cn.index("logit_diff")
        for g in ("kept", "circuit"):
            heads = int(f[g + "/heads"][()].sum())
            edges = int(f[g + "/edges"][()].sum()) if "edges" in f[g] else 0
            options.append((last, heads, edges, metrics[rn.index(g)][ld] / metrics[rn.index("clean")][ld]))
    r = circ.get(e["task"])
    if not r or not any(int(r["round"]) == o[0] and int(r["n_head_units"]) == o[1] and int(r["n_edge_units"]) == o[2]
                        and abs(float(r["faithfulness_logit_diff"]) - o[3]) < 1e-4 for o in options):
        bad.append(f"circuits.csv: {e['task']}: {r}, the round file gives one of {options}")

# times.csv against sweep-times.json
times = json.load(open(os.path.join(s["output_root"], "sweep-times.json")))
for r in rows("times.csv"):
    mine = [x for x in times["runs"] if x["task"] == r["task"] and x["wall_s"] is not None]
    if int(r["runs_timed"]) != len(mine) or abs(float(r["wall_s"]) - sum(x["wall_s"] for x in mine)) > 1e-3:
        bad.append(f"times.csv: {r}, sweep-times.json gives {len(mine)} runs, {sum(x['wall_s'] for x in mine)} s")

# report.txt: full-model accuracy per task, from the accuracy runs' patch.h5
text = open(os.path.join(rep, "report.txt")).read()
for e in entries:
    if e["experiment"] == "accuracy":
        full, _, _, n = patch_accuracies(e["name"])
        if not re.search(r"^%s +%d +%.3f" % (re.escape(e["task"]), n, full), text, re.M):
            bad.append(f"report.txt: no line '{e['task']} {n} {full:.3f}' in the full-model accuracy table")

# one colour scale over every panel
gp = open(os.path.join(rep, "accuracy_drop.gp")).read()
scales = re.findall(r"^set cbrange \[(\S+):(\S+)\]", gp, re.M)
if len(scales) != 1 or abs(float(scales[0][1]) - most) > 1e-4 or abs(float(scales[0][0]) + most) > 1e-4:
    bad.append(f"accuracy_drop.gp: colour scales {scales}, want one [-{most:.4f}:{most:.4f}]")
if len(re.findall(r"^set multiplot", gp, re.M)) != 2 or "noenhanced" not in gp:
    bad.append("accuracy_drop.gp: not a multiplot per terminal, or enhanced text")
for b in bad:
    print(b, file=sys.stderr)
sys.exit(1 if bad else 0)
