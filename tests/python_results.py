#!/usr/bin/env python3
"""The Python results package (tools/python, docs/python.md) against a real run.

    python_results.py setup  EDGEPATCH WORKDIR   run a shortened demo into WORKDIR/run, pip-install the package
                                                 into WORKDIR/site (--no-deps --no-build-isolation --target)
    python_results.py check  EDGEPATCH WORKDIR   the installed package's tables against `edgepatch show --json`
                                                 and `edgepatch scores --json`, the per-prompt metrics against
                                                 model_logs.json's means, circuit.json against the last round
                                                 file's kept masks, the sweep opener, bad input, the example
    python_results.py tamper EDGEPATCH WORKDIR   the can-fail sibling: the same comparisons against show and
                                                 scores JSON with one planted change each must each fail

Run with the Python that has h5py, numpy and pandas (EP_SYSTEM_PYTHON, tests/CMakeLists.txt), from the
repository root. Under AddressSanitizer (EP_SANITIZED=1) the run is smaller (4 prompts, 2 ablations).
"""

import copy
import json
import math
import os
import shutil
import subprocess
import sys
import time

MODEL = "models/smollm2-135m-instruct"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def demo_config(out):
    with open("configs/demo.json") as f:
        cfg = json.load(f)
    small = os.environ.get("EP_SANITIZED") == "1"
    keep = ["y->last L20-29", "bos->all L0-9"] if small else ["y->last L0-9", "y->last L10-19", "y->last L20-29", "bos->all L0-9"]
    cfg.update(output_path=out, n_prompts=4 if small else 10, batch_size=4 if small else 5,
               ablations=[a for a in cfg["ablations"] if a["name"] in keep], prune_rounds={"heads": 1, "edges": 1},
               prune_k=[473, 20])
    return cfg


def setup(edgepatch, work):
    if not os.path.isfile(os.path.join(MODEL, "config.json")):
        sys.exit(f"python_results: {MODEL} is missing: run tools/fetch_smollm2.sh first (tools/test.sh does)")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    config = os.path.join(work, "demo.json")
    with open(config, "w") as f:
        json.dump(demo_config(os.path.join(work, "run")), f, indent=1)
    start = time.time()
    r = subprocess.run([edgepatch, "run", config], capture_output=True, text=True)
    print(f"python_results: shortened demo run: exit {r.returncode} in {time.time() - start:.0f} s")
    if r.returncode:
        sys.exit(f"python_results: edgepatch run failed: {r.stderr[-2000:]}")
    start = time.time()
    # from a copy: setuptools builds in the source folder (build/, *.egg-info), which stays untouched
    src = os.path.join(work, "src")
    shutil.copytree("tools/python", src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                        "--disable-pip-version-check", "--target", os.path.join(work, "site"), src],
                       capture_output=True, text=True)
    print(f"python_results: pip install --target {work}/site tools/python: exit {r.returncode} in {time.time() - start:.0f} s")
    if r.returncode:
        sys.exit(f"python_results: pip install failed: {(r.stdout + r.stderr)[-2000:]}")


def installed(work):
    """The package as pip installed it (not the source tree)."""
    site = os.path.abspath(os.path.join(work, "site"))
    sys.path.insert(0, site)
    import edgepatch_results as er
    if not os.path.abspath(er.__file__).startswith(site + os.sep):
        sys.exit(f"python_results: imported {er.__file__}, not the copy installed in {site}")
    return er


def reseal(path):
    """Rewrites the 512-byte seal of an edgepatch HDF5 file after an edit (docs/artifacts.md, "The seal")."""
    import zlib
    with open(path, "rb") as f:
        data = bytearray(f.read())
    body = bytes(data[512:])
    head = f"edgepatch h5store seal 1\ncrc32 {zlib.crc32(body):08x}\nbytes {len(body)}\n".encode()
    data[:512] = head + b"\0" * (512 - len(head))
    with open(path, "wb") as f:
        f.write(data)


def show_json(edgepatch, run, i):
    r = subprocess.run([edgepatch, "show", run, "--prompt", str(i), "--json"], capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def scores_json(edgepatch, run, r):
    out = subprocess.run([edgepatch, "scores", run, "--round", str(r), "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def first_difference(ours, theirs):
    """Where two lists differ, in a few words (the lists themselves are too long for one line)."""
    k = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return f"first difference at {k}: {ours[k:k + 1]} vs {theirs[k:k + 1]} ({len(ours)} vs {len(theirs)} entries)"


def printable(text):
    return text.replace("\n", "\\n").replace("\t", "\\t")


def same_real(a, b):
    """float32 values compared as float32 (the files' type; the JSON prints them to 9 or 17 digits)."""
    import numpy as np
    return np.float32(a) == np.float32(b) or (math.isnan(a) and math.isnan(b))


def compare_prompt(run, i, shown):
    """Differences between the package's tables for prompt i and `edgepatch show --json` (a list of lines)."""
    bad = []
    p = run.prompts()
    p = p[p.prompt == i].sort_values("position")
    for col, key in (("token", "tokens"), ("example", "index")):
        if p[col].tolist() != shown[key]:
            bad.append(f"prompt {i}: {col} differs from show's {key}: {first_difference(p[col].tolist(), shown[key])}")
    if p["type"].astype(str).tolist() != shown["types"]:
        bad.append(f"prompt {i}: type differs from show's types: {first_difference(p['type'].astype(str).tolist(), shown['types'])}")
    if p.position.tolist() != list(range(len(shown["tokens"]))):
        bad.append(f"prompt {i}: positions {p.position.tolist()}")
    if (p.token_text != "").any() and [printable(t) for t in p.token_text] != shown["pieces"]:
        bad.append(f"prompt {i}: token_text differs from show's pieces: {first_difference([printable(t) for t in p.token_text], shown['pieces'])}")
    info = run.prompt_info().set_index("prompt").loc[i]
    if info.target != shown["target"]:
        bad.append(f"prompt {i}: target {info.target} != show's {shown['target']}")
    if info.length != len(shown["tokens"]):
        bad.append(f"prompt {i}: length {info.length} != {len(shown['tokens'])}")
    d = run.donors()
    for k, donor in enumerate(shown["donors"]):
        got = d[(d.prompt == i) & (d.donor == k)].sort_values("position").token.tolist()
        if got != donor:
            bad.append(f"prompt {i}: donor {k} differs from show's: {first_difference(got, donor)}")
    if len(shown["donors"]) != d[d.prompt == i].donor.nunique():
        bad.append(f"prompt {i}: {d[d.prompt == i].donor.nunique()} donors, show has {len(shown['donors'])}")
    m = run.metrics()
    m = m[(m.prompt == i) & (m.condition == "plan")]
    want = shown.get("metrics")
    if want is None or len(m) != 1:
        return bad + [f"prompt {i}: plan metrics: {len(m)} rows, show's metrics {want}"]
    m = m.iloc[0]
    for k in ("correct", "first_token_correct"):
        if bool(m[k]) != want[k]:
            bad.append(f"prompt {i}: metrics {k}: {m[k]} != show's {want[k]}")
    for k in ("target_logprob", "logit_diff"):
        if not same_real(m[k], want[k]):
            bad.append(f"prompt {i}: metrics {k}: {m[k]!r} != show's {want[k]!r}")
    if m.generated_text is not None and m.generated_text != want["continuation"]:
        bad.append(f"prompt {i}: generated_text {m.generated_text!r} != show's continuation {want['continuation']!r}")
    return bad


def unit_key(kind, u):
    return (u["layer"], u["head"], u["type"]) if kind == "head" else (u["layer"], u["head"], u["sender"], u["receiver"])


def compare_round(run, r, shown):
    """Differences between run.scores(r) / run.rounds() and `edgepatch scores --round r --json`."""
    bad = []
    s = run.scores(r)
    kind = shown["kind"]
    if set(s.kind) != {kind} or (s["round"] != shown["round"]).any():
        bad.append(f"round {r}: kind/round {set(s.kind)} {set(s['round'])} != scores' {kind} {shown['round']}")
        return bad
    cols = ["layer", "head", "type"] if kind == "head" else ["layer", "head", "sender", "receiver"]
    ours = [tuple(int(v) if c in ("layer", "head") else str(v) for c, v in zip(cols, row)) for row in s[cols].itertuples(index=False)]
    theirs = [unit_key(kind, u) for u in shown["units"]]
    if ours != theirs:
        bad.append(f"round {r}: units differ from the scores': {first_difference(ours, theirs)}")
    else:
        for k, (a, u) in enumerate(zip(s.score, shown["units"])):
            if not same_real(a, u["score"]):
                bad.append(f"round {r}: unit {k} {theirs[k]}: score {a!r} != scores' {u['score']!r}")
                break
    kept = {o for o, k in zip(ours, s.kept) if k}
    want = {unit_key(kind, u) for u in shown["kept"]}
    if kept != want:
        bad.append(f"round {r}: kept: {len(kept)} units, scores' {len(want)}; differing {sorted(kept ^ want)[:3]}")
    # rank: the listing order of edgepatch scores (highest first, ties in file order)
    order = s.sort_values("rank").index.tolist()
    import numpy as np
    if order != np.argsort(-np.array([u["score"] for u in shown["units"]], dtype=np.float32), kind="stable").tolist():
        bad.append(f"round {r}: rank order differs from the scores' order")
    row = run.rounds().set_index("round").loc[r]
    for k in ("method", "stop"):
        if row[k] != shown[k]:
            bad.append(f"round {r}: {k} {row[k]!r} != scores' {shown[k]!r}")
    for which, figures in shown["metrics"].items():
        for k, v in figures.items():
            if not same_real(row[f"{which}_{k}"], v):
                bad.append(f"round {r}: {which}_{k} {row[f'{which}_{k}']!r} != scores' {v!r}")
    if row.n_units != len(shown["units"]) or row.n_kept != len(shown["kept"]):
        bad.append(f"round {r}: n_units/n_kept {row.n_units}/{row.n_kept} != {len(shown['units'])}/{len(shown['kept'])}")
    return bad


def check(edgepatch, work):
    er = installed(work)
    run_dir = os.path.join(work, "run")
    run = er.open_run(run_dir)
    bad, n = [], 0

    def expect(cond, what):
        nonlocal n
        n += 1
        if not cond:
            bad.append(what)

    P = run.prompt_info().shape[0]
    for i in sorted({0, P // 2, P - 1}):
        problems = compare_prompt(run, i, show_json(edgepatch, run_dir, i))
        expect(not problems, "; ".join(problems))
    rounds = run.round_numbers()
    expect(rounds == [0, 1], f"round files: {rounds}")
    for r in rounds:
        problems = compare_round(run, r, scores_json(edgepatch, run_dir, r))
        expect(not problems, "; ".join(problems))
    expect(run.scores().equals(run.scores(rounds[-1])), "scores(): not the last round's")

    # per-prompt metrics against the C code's means in model_logs.json (an independent aggregation)
    with open(os.path.join(run_dir, "model_logs.json")) as f:
        logs = json.load(f)
    m = run.metrics()
    means = m.groupby("condition", observed=True)[["correct", "first_token_correct", "logit_diff", "target_logprob"]].mean()
    cfg = demo_config(run_dir)
    expect(list(means.index) == ["full_model", "plan"] + [a["name"] for a in cfg["ablations"]], f"conditions {list(means.index)}")
    figures = [("full_model", logs["full_model_accuracy"], logs["full_model_first_token_accuracy"], logs["full_model_mean_logit_diff"], None),
               ("plan", logs["accuracy"], logs["first_token_accuracy"], logs["mean_logit_diff"], logs["mean_target_logprob"])]
    figures += [(a["name"], a["accuracy"], a["first_token_accuracy"], a["mean_logit_diff"], a["mean_target_logprob"]) for a in logs["ablations"]]
    for name, acc, first, ld, lp in figures:
        row = means.loc[name]
        expect(abs(row.correct - acc) < 1e-6 and abs(row.first_token_correct - first) < 1e-6,
               f"{name}: mean correct {row.correct}, first-token {row.first_token_correct} vs model_logs {acc}, {first}")
        expect(abs(row.logit_diff - ld) < 1e-5 * max(1, abs(ld)) and (lp is None or abs(row.target_logprob - lp) < 1e-5 * max(1, abs(lp))),
               f"{name}: mean logit diff {row.logit_diff}, target logprob {row.target_logprob} vs model_logs {ld}, {lp}")
    # KL from the full model: the per-prompt values' means against model_logs.json's (the C code's mean);
    # the full model's own rows are 0
    kl = m.groupby("condition", observed=True).kl_full_model.mean()
    expect(abs(kl["full_model"]) < 1e-12, f"full model KL {kl['full_model']}")
    for name, want in [("plan", logs["mean_kl_full_model"])] + [(a["name"], a["mean_kl_full_model"]) for a in logs["ablations"]]:
        expect(abs(kl[name] - want) < 1e-5 * max(1, abs(want)), f"{name}: mean KL {kl[name]} vs model_logs {want}")
    # attention at `last`: one row per (prompt, condition, layer, head); each head's masses sum to 1, and
    # the entropy lies in [0, ln(keys at last)] (a prompt's `last` sees its whole length)
    att = run.attention()
    info = run.prompt_info()
    mass_cols = [c for c in att.columns if c.startswith("mass_")]
    expect(mass_cols == ["mass_" + t for t in ("bos", "x", "t", "y", "n", "query", "last")], f"attention mass columns {mass_cols}")
    expect(len(att) > 0 and len(att) % (P * len(means)) == 0, f"attention(): {len(att)} rows")
    expect(((att[mass_cols].sum(axis=1) - 1).abs() < 1e-4).all(), "attention masses do not sum to 1")
    bound = att.prompt.map(info.set_index("prompt").length).map(math.log)
    expect(((att.entropy >= -1e-6) & (att.entropy <= bound + 1e-5)).all(), "attention entropy outside [0, ln n]")
    s = run.summary()
    expect(s.condition.tolist() == list(means.index), f"summary conditions {s.condition.tolist()}")
    expect(abs(s.set_index("condition").mean_kl_full_model["plan"] - logs["mean_kl_full_model"]) < 1e-9, "summary mean KL")
    expect((s.n_prompts == P).all() and P == cfg["n_prompts"], f"n_prompts {set(s.n_prompts)}, {P} prompts")
    abl = run.ablations()
    expect(abl.name.tolist() == [a["name"] for a in cfg["ablations"]] and abl.group.tolist() == [a["group"] for a in cfg["ablations"]]
           and abl.band.tolist() == [a["band"] for a in cfg["ablations"]], f"ablations {abl[['name', 'group', 'band']].values.tolist()}")
    pr = run.prompts()
    expect(len(pr) == run.prompt_info().length.sum() and set(pr.type.astype(str)) <= {"bos", "x", "t", "y", "n", "query", "last"},
           f"prompts(): {len(pr)} rows, types {set(pr.type.astype(str))}")
    expect(run.config.get("task") == "present_past" and run.config.get("n_prompts") == P, f"config {run.config}")

    # circuit.json against the last round file's kept masks (two files, two writers)
    c, k = run.circuit(), run.circuit(rounds[-1])
    expect(c.heads.astype(str).values.tolist() == k.heads.astype(str).values.tolist() and len(c.heads) == c.n_head_units,
           f"circuit heads: circuit.json {len(c.heads)} vs round file {len(k.heads)}")
    expect(c.edges.astype(str).values.tolist() == k.edges.astype(str).values.tolist() and len(c.edges) == c.n_edge_units > 0,
           f"circuit edges: circuit.json {len(c.edges)} vs round file {len(k.edges)}")
    expect(abs(c.faithfulness_logit_diff - run.rounds().faithfulness_logit_diff.iloc[-1]) < 1e-6, "circuit faithfulness")
    expect(len(c.edges) == run.scores(rounds[-1]).kept.sum(), "circuit edges vs kept units of the last round")

    # a sweep: its output_root folder and its sweep file (two copies of the run, without the caches)
    root = os.path.join(work, "sweep-root")
    shutil.rmtree(root, ignore_errors=True)
    for model in ("smollm-a", "smollm-b"):
        shutil.copytree(run_dir, os.path.join(root, model, "present_past"), ignore=shutil.ignore_patterns("cache.d"))
    os.makedirs(os.path.join(root, "slurm"))
    sweep_file = os.path.join(work, "sweep.json")
    with open(sweep_file, "w") as f:
        json.dump({"name": "t", "output_root": root, "models": [{"name": "smollm-a", "path": MODEL}, {"name": "smollm-b", "path": MODEL},
                                                                {"name": "not-started", "path": MODEL}], "tasks": ["present_past"]}, f)
    for opened in (er.open_sweep(root), er.open_sweep(sweep_file)):
        sm = opened.metrics()
        expect(len(sm) == 2 * len(m) and sorted(set(sm.run)) == ["smollm-a/present_past", "smollm-b/present_past"]
               and list(sm.columns[:3]) == ["run", "model", "task"], f"{opened}: metrics {len(sm)} rows, runs {set(sm.run)}")
        sc = opened.scores(0)
        expect(len(sc) == 2 * len(run.scores(0)) and opened.circuit().heads.shape[0] == 2 * len(c.heads), f"{opened}: scores, circuit")
        expect(len(opened.summary()) == 2 * len(s) and len(opened.prompts()) == 2 * len(pr), f"{opened}: summary, prompts")
    runs = er.open_sweep(sweep_file).runs()
    expect(runs.exists.tolist() == [True, True, False] and runs.rounds.tolist() == [2, 2, 0], f"sweep runs: {runs.to_dict('list')}")

    # the self-describing layout (docs/python.md, "Names from the files first"): a copy of the run with
    # enum_names attributes (upper-case names, so their use shows), per-token pieces, ablation attributes
    # and generated_text, resealed; the reader must take the names and texts from them
    new = os.path.join(work, "new-layout")
    shutil.rmtree(new, ignore_errors=True)
    shutil.copytree(run_dir, new, ignore=shutil.ignore_patterns("cache.d", "patch.d", "round-*.d"))
    upper = [t.upper() for t in ("bos", "x", "t", "y", "n", "query", "last", "target")]
    import h5py
    import numpy as np
    strings = h5py.string_dtype()
    with h5py.File(os.path.join(new, "prompts.h5"), "r+") as f:
        f["types"].attrs["enum_names"] = np.array(upper, dtype=strings)
        tokens = f["tokens"][()]
        f.create_dataset("pieces", data=np.array([[f"<{t}>" for t in row] for row in tokens], dtype=object), dtype=strings)
    with h5py.File(os.path.join(new, "patch.h5"), "r+") as f:
        for k in range(len(cfg["ablations"])):
            g = f[f"ablation-{k:03d}"]
            g.attrs.update(name=f"renamed {k}", group=f"group {k % 2}", band=f"band {k // 2}", rules=json.dumps({"rules": []}))
        f.create_dataset("plan/generated_text", data=np.array([f"text {i}" for i in range(P)], dtype=object), dtype=strings)
    for r in rounds:
        with h5py.File(os.path.join(new, f"prune.d/round-{r:03d}.h5"), "r+") as f:
            f["units"].attrs["enum_names"] = np.array(upper, dtype=strings)
    for name in ["prompts.h5", "patch.h5"] + [f"prune.d/round-{r:03d}.h5" for r in rounds]:
        reseal(os.path.join(new, name))
    nr = er.open_run(new)
    np_, old_p = nr.prompts(), run.prompts()
    expect(np_.type.astype(str).tolist() == old_p.type.astype(str).str.upper().tolist()
           and np_.token_text.tolist() == [f"<{t}>" for t in old_p.token], "new layout: prompts() ignores enum_names or pieces")
    na = nr.ablations()
    expect(na.name.tolist() == [f"renamed {k}" for k in range(len(na))] and na.rules.tolist() == [{"rules": []}] * len(na)
           and nr.metrics().condition.cat.categories.tolist()[2:] == na.name.tolist(), f"new layout: ablations {na.to_dict('list')}")
    nm = nr.metrics()
    expect(nm[nm.condition == "plan"].generated_text.tolist() == [f"text {i}" for i in range(P)], "new layout: generated_text")
    ns = nr.scores(rounds[-1])
    expect(ns.sender.astype(str).tolist() == run.scores(rounds[-1]).sender.astype(str).str.upper().tolist(), "new layout: unit names")

    # bad input: one line naming the file
    for path, want in ((os.path.join(work, "nowhere"), "nowhere: no such run folder"),):
        try:
            er.open_run(path)
            expect(False, f"open_run({path}) did not fail")
        except er.ResultsError as e:
            expect(want in str(e) and "\n" not in str(e), f"open_run({path}): {e}")
    damaged = os.path.join(root, "smollm-a", "present_past")
    with open(os.path.join(damaged, "patch.h5"), "r+b") as f:
        f.seek(2000)
        byte = f.read(1)
        f.seek(2000)
        f.write(bytes([byte[0] ^ 0x40]))
    try:
        er.open_run(damaged).metrics()
        expect(False, "metrics() of a damaged patch.h5 did not fail")
    except er.ResultsError as e:
        expect("patch.h5" in str(e) and "damaged" in str(e), f"damaged patch.h5: {e}")

    # the example redraws the heatmap and the circuit (PNG and PDF)
    figs = os.path.join(work, "figures")
    shutil.rmtree(figs, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=os.path.abspath(os.path.join(work, "site")), MPLCONFIGDIR=os.path.join(work, "mpl"))
    r = subprocess.run([sys.executable, "tools/python/examples/redraw_report.py", run_dir, figs], capture_output=True, text=True, env=env)
    expect(r.returncode == 0, f"redraw_report.py: exit {r.returncode}: {r.stderr[-1500:]}")
    for name in ("accuracy_drop", "circuit"):
        png, pdf = os.path.join(figs, name + ".png"), os.path.join(figs, name + ".pdf")
        ok = os.path.isfile(png) and os.path.getsize(png) > 1000 and open(png, "rb").read(8) == PNG_MAGIC
        expect(ok and os.path.isfile(pdf) and open(pdf, "rb").read(5) == b"%PDF-", f"{name}.png/.pdf not written (or not PNG/PDF)")
    expect(not [f for f in os.listdir(figs) if ".tmp-" in f], f"temporaries left in {figs}")

    for b in bad:
        print(f"python_results: FAIL: {b}")
    print(f"python_results: {n - len(bad)} of {n} checks passed")
    return 1 if bad else 0


def tamper(edgepatch, work):
    """Each planted change to the JSON that check() compares with must be found; the untouched JSON must pass."""
    er = installed(work)
    run_dir = os.path.join(work, "run")
    run = er.open_run(run_dir)
    shown, scored = show_json(edgepatch, run_dir, 0), scores_json(edgepatch, run_dir, 1)
    failures = 0
    if compare_prompt(run, 0, shown) or compare_round(run, 1, scored):
        print("python_results_tamper: FAIL: the untouched JSON does not match, so the planted changes prove nothing")
        return 1

    def planted(base, change):
        doc = copy.deepcopy(base)
        change(doc)
        return doc

    shows = {
        "a token id": lambda d: d["tokens"].__setitem__(1, d["tokens"][1] + 1),
        "a token type": lambda d: d["types"].__setitem__(0, "y" if d["types"][0] != "y" else "x"),
        "an example index": lambda d: d["index"].__setitem__(-1, d["index"][-1] - 1),
        "the target": lambda d: d["target"].append(13),
        "a donor token": lambda d: d["donors"][0].__setitem__(0, d["donors"][0][0] + 7),
        "correct": lambda d: d["metrics"].__setitem__("correct", not d["metrics"]["correct"]),
        "the logit difference": lambda d: d["metrics"].__setitem__("logit_diff", d["metrics"]["logit_diff"] + 1e-3),
    }
    scores = {
        "a score": lambda d: d["units"][5].__setitem__("score", d["units"][5]["score"] * 1.001 + 1e-6),
        "a unit's receiver": lambda d: d["units"][0].__setitem__("receiver", "last" if d["units"][0]["receiver"] != "last" else "y"),
        "a kept unit dropped": lambda d: d["kept"].pop(),
        "the kept metrics": lambda d: d["metrics"]["kept"].__setitem__("logit_diff", d["metrics"]["kept"]["logit_diff"] + 0.01),
    }
    for what, change in shows.items():
        found = compare_prompt(run, 0, planted(shown, change))
        print(f"python_results_tamper: show JSON with {what} changed: {'found: ' + found[0] if found else 'NOT FOUND'}")
        failures += not found
    for what, change in scores.items():
        found = compare_round(run, 1, planted(scored, change))
        print(f"python_results_tamper: scores JSON with {what} changed: {'found: ' + found[0] if found else 'NOT FOUND'}")
        failures += not found
    print(f"python_results_tamper: {len(shows) + len(scores) - failures} of {len(shows) + len(scores)} planted changes found")
    return 1 if failures else 0


def main(argv):
    if len(argv) != 4 or argv[1] not in ("setup", "check", "tamper"):
        sys.exit(__doc__)
    mode, edgepatch, work = argv[1], os.path.abspath(argv[2]), os.path.abspath(argv[3])
    if mode == "setup":
        setup(edgepatch, work)
        return 0
    if not os.path.isdir(os.path.join(work, "site")):
        sys.exit(f"python_results: {work}/site missing: the setup step (python_results_setup) did not run")
    return check(edgepatch, work) if mode == "check" else tamper(edgepatch, work)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
