#!/usr/bin/env python3
"""Checks docs/artifacts.md against a real run folder, file by file (issue 22: self-describing artifacts).

usage: check_artifacts.py EDGEPATCH SOURCE_DIR [--plant]

Runs a small config (tokenize, cache, patch with ablations, a head and an edge prune round, function
vectors) on the tiny fixture model smollm-tiny (copied to a temporary folder, so it can be removed afterwards), then:
  1. walks every file of the run folder: every HDF5 group, dataset (type, shape, dimension labels,
     attributes) and attribute, every JSON file's keys, and compares them with the tables of
     docs/artifacts.md; anything present but undocumented, documented (as "always") but absent, or of
     another type, shape or labels fails with one line naming it; then the same for an eap-ig run with
     compare_importance (its round files' and model_logs.json's extra fields);
  2. runs the same config into a second folder: every HDF5 and JSON file byte-identical;
  3. moves the run folder elsewhere, removes the model copy, and runs `edgepatch show` from another
     working directory: the token texts are still shown (from prompts.h5), equal to the first show's.
--plant: the self-test. Checks the same run against copies of the document with one planted mismatch
each (a renamed attribute, a wrong shape, a dropped dataset row, a wrong dimension label); every one
must fail, naming what was planted.

The document's machine-read parts (docs/artifacts.md, "How to read the tables"): a section per file
("### `pattern`"), and tables whose header row is one of HEADERS below.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import h5py
import numpy as np

HEADERS = {
    "files": ["file", "written by", "when", "meaning"],
    "datasets": ["dataset", "type", "shape", "dimension labels", "attributes", "when", "meaning"],
    "attributes": ["attribute", "type", "when", "meaning"],
    "group attributes": ["group", "attribute", "type", "when", "meaning"],
    "dataset attributes": ["dataset attribute", "type", "when", "meaning"],
    "file attributes": ["file attribute", "type", "when", "meaning"],
    "keys": ["key", "type", "when", "meaning"],
}


def cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def unquote(s):
    return s.strip().strip("`").strip()


def parse_doc(text):
    """{section pattern or None: {kind: [rows as dicts]}}; None holds the tables before any file section."""
    doc = {None: {}}
    section = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^###\s+`([^`]+)`", line)
        if m:
            section = m.group(1)
            doc.setdefault(section, {})
        elif re.match(r"^##\s", line):
            section = None
        elif line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|[-| :]+\|$", lines[i + 1].strip()):
            head = cells(line)
            kind = next((k for k, h in HEADERS.items() if h == head), None)
            i += 2
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(head, cells(lines[i]))))
                i += 1
            if kind:
                doc[section].setdefault(kind, []).extend(rows)
            continue
        i += 1
    return doc


def pattern_regex(p):
    """A documented name as a regex: NNN (3 or more N) digits, <x> a number, {a,b} either, * any key."""
    return re.compile("^" + pattern_body(p) + "$")


def pattern_body(p):
    out, i = "", 0
    while i < len(p):
        m = re.match(r"N{3,}", p[i:])
        if m:
            out += r"\d{%d}" % len(m.group(0))
            i += len(m.group(0))
            continue
        if p[i] == "<":
            j = p.index(">", i)
            out += r"\d+"
            i = j + 1
            continue
        if p[i] == "{":
            j = p.index("}", i)
            out += "(?:" + "|".join(pattern_body(a.strip()) for a in p[i + 1:j].split(",")) + ")"
            i = j + 1
            continue
        out += re.escape(p[i])
        i += 1
    return out


def required(row):
    return row.get("when", "always").strip().lower() == "always"


DTYPES = {"int32": "<i4", "float32": "<f4", "float64": "<f8", "uint16": "<u2", "uint8": "|u1", "uint32": "<u4",
          "int64": "<i8"}


def dataset_type_ok(doc_type, dtype):
    for t in (x.strip() for x in doc_type.replace("`", "").split(" or ")):
        if t == "string" and h5py.check_string_dtype(dtype) is not None:
            return True
        if t in DTYPES and dtype.str == DTYPES[t]:
            return True
    return False


def attr_type_ok(doc_type, dtype, shape):
    for t in (x.strip() for x in doc_type.replace("`", "").split(" or ")):
        array = t.endswith("[]")
        base = t[:-2] if array else t
        if array != (len(shape) == 1):
            continue
        if base == "string" and h5py.check_string_dtype(dtype) is not None:
            return True
        if base in DTYPES and dtype.str == DTYPES[base]:
            return True
    return False


def shape_ok(doc_shape, shape, symbols):
    """doc_shape like '[P, L]' or '[N+1]'; unbound symbols bind to what the file has."""
    dims = [d.strip() for d in doc_shape.replace("`", "").strip().strip("[]").split(",") if d.strip()]
    if len(dims) != len(shape):
        return False
    trial = dict(symbols)
    for d, n in zip(dims, shape):
        m = re.match(r"^([A-Za-z_][A-Za-z_0-9]*)?\s*([+-]\s*\d+)?$", d)
        if re.match(r"^\d+$", d):
            if int(d) != n:
                return False
            continue
        if not m or not m.group(1):
            return False
        name, off = m.group(1), int(m.group(2).replace(" ", "")) if m.group(2) else 0
        if name in trial:
            if trial[name] + off != n:
                return False
        else:
            trial[name] = n - off
    symbols.update(trial)
    return True


def attr_info(obj, name):
    a = h5py.h5a.open(obj.id, name.encode())
    return a.dtype, a.shape


def check_h5(rel, path, section, common, global_symbols, problems):
    ds_rows = section.get("datasets", [])
    attr_rows = section.get("attributes", []) + common.get("file attributes", [])
    group_rows = section.get("group attributes", [])
    every_ds_attr = common.get("dataset attributes", [])
    seen_ds, seen_attr, seen_group = set(), set(), set()
    f = h5py.File(path, "r")
    symbols_by_group = {}

    def match(rows, key, name):
        for i, r in enumerate(rows):
            if pattern_regex(unquote(r[key])).match(name):
                return i, r
        return None, None

    items = []
    f.visititems(lambda name, o: items.append((name, o)))
    for name, o in [("/", f)] + items:
        if isinstance(o, h5py.Dataset):
            i, r = match(ds_rows, "dataset", name)
            if r is None:
                problems.append(f"{rel}: dataset {name}: not in docs/artifacts.md")
                continue
            seen_ds.add(i)
            if not dataset_type_ok(r["type"], o.dtype):
                problems.append(f"{rel}: dataset {name}: type {o.dtype} is not {r['type']}")
            parent = name.rsplit("/", 1)[0] if "/" in name else ""
            syms = symbols_by_group.setdefault(parent, dict(global_symbols))
            if not shape_ok(r["shape"], o.shape, syms):
                problems.append(f"{rel}: dataset {name}: shape {list(o.shape)} is not {r['shape']} ({syms})")
            labels = [d.label for d in o.dims]
            want = [x.strip() for x in unquote(r["dimension labels"]).split(",")]
            if labels != want:
                problems.append(f"{rel}: dataset {name}: dimension labels {','.join(labels)} are not {','.join(want)}")
            doc_attrs = [unquote(a) for a in r["attributes"].split(",") if unquote(a) and unquote(a) != "-"]
            optional = {a.rstrip("?") for a in doc_attrs if a.endswith("?")}
            doc_attrs = {a.rstrip("?") for a in doc_attrs}
            universal = {unquote(x["dataset attribute"]): x for x in every_ds_attr}
            for a in o.attrs.keys():
                if a in universal:
                    t, sh = attr_info(o, a)
                    if not attr_type_ok(universal[a]["type"], t, sh):
                        problems.append(f"{rel}: dataset {name}: attribute {a}: type {t} {sh} is not {universal[a]['type']}")
                elif a not in doc_attrs:
                    problems.append(f"{rel}: dataset {name}: attribute {a}: not in docs/artifacts.md")
            for a in doc_attrs - optional:
                if a not in o.attrs:
                    problems.append(f"{rel}: dataset {name}: attribute {a}: documented, absent")
            for a, x in universal.items():
                if required(x) and a not in o.attrs:
                    problems.append(f"{rel}: dataset {name}: attribute {a}: documented for every dataset, absent")
        else:
            is_root = name == "/"
            for a in o.attrs.keys():
                if is_root:
                    i, r = None, None
                    for j, x in enumerate(attr_rows):
                        key = "attribute" if "attribute" in x else "file attribute"
                        if unquote(x[key]) == a:
                            i, r = j, x
                            break
                    if r is None:
                        problems.append(f"{rel}: attribute {a}: not in docs/artifacts.md")
                        continue
                    seen_attr.add(i)
                else:
                    r, i = None, None
                    for j, x in enumerate(group_rows):
                        if pattern_regex(unquote(x["group"])).match(name) and unquote(x["attribute"]) == a:
                            i, r = j, x
                            break
                    if r is None:
                        problems.append(f"{rel}: group {name}: attribute {a}: not in docs/artifacts.md")
                        continue
                    seen_group.add(i)
                t, sh = attr_info(o, a)
                if not attr_type_ok(r["type"], t, sh):
                    where = "" if is_root else f"group {name}: "
                    problems.append(f"{rel}: {where}attribute {a}: type {t} {list(sh)} is not {r['type']}")
    for i, r in enumerate(ds_rows):
        if required(r) and i not in seen_ds:
            problems.append(f"{rel}: dataset {unquote(r['dataset'])}: documented, absent")
    for i, r in enumerate(attr_rows):
        key = "attribute" if "attribute" in r else "file attribute"
        if required(r) and i not in seen_attr:
            problems.append(f"{rel}: attribute {unquote(r[key])}: documented, absent")
    for i, r in enumerate(group_rows):
        if required(r) and i not in seen_group:
            problems.append(f"{rel}: group {unquote(r['group'])}: attribute {unquote(r['attribute'])}: documented, absent")
    f.close()


def json_keys(o, prefix=()):
    out = []
    if isinstance(o, dict):
        for k, v in o.items():
            out.append(prefix + (k,))
            out += json_keys(v, prefix + (k,))
    elif isinstance(o, list):
        for e in o:
            if isinstance(e, dict):
                out += json_keys(e, prefix[:-1] + (prefix[-1] + "[]",) if prefix else ("[]",))
    return out


def key_match(doc_key, key):
    parts = doc_key.split(".")
    return len(parts) == len(key) and all(p == "*" or p == k for p, k in zip(parts, key))


def check_json(rel, path, section, problems):
    rows = section.get("keys", [])
    keys = sorted(set(json_keys(json.load(open(path)))))
    seen = set()
    for k in keys:
        hit = [i for i, r in enumerate(rows) if key_match(unquote(r["key"]), k)]
        if not hit:
            problems.append(f"{rel}: key {'.'.join(k)}: not in docs/artifacts.md")
        seen.update(hit)
    for i, r in enumerate(rows):
        if required(r) and i not in seen:
            problems.append(f"{rel}: key {unquote(r['key'])}: documented, absent")


def check_run(run, doc_text, global_symbols):
    doc = parse_doc(doc_text)
    common = doc[None]
    files = common.get("files", [])
    problems = []
    if not files:
        return ["docs/artifacts.md: no files table (| file | written by | when | meaning |)"]
    present = sorted(os.path.relpath(os.path.join(d, f), run) for d, _, fs in os.walk(run) for f in fs)
    seen = set()
    for rel in present:
        hit = [i for i, r in enumerate(files) if pattern_regex(unquote(r["file"])).match(rel)]
        if not hit:
            problems.append(f"{rel}: file not in docs/artifacts.md")
            continue
        seen.update(hit)
        pat = unquote(files[hit[0]]["file"])
        section = next((doc[s] for s in doc if s and pattern_regex(s).match(rel)), None)
        if rel.endswith(".h5") or rel.endswith(".json"):
            if section is None:
                problems.append(f"{rel}: no section ### `{pat}` in docs/artifacts.md")
            elif rel.endswith(".h5"):
                check_h5(rel, os.path.join(run, rel), section, common, global_symbols, problems)
            else:
                check_json(rel, os.path.join(run, rel), section, problems)
    for i, r in enumerate(files):
        if required(r) and i not in seen:
            problems.append(f"{unquote(r['file'])}: documented, absent from the run folder")
    return problems


def config(model, out):
    ablations = [
        {"name": "y->last L0", "group": "y->last", "band": "0", "rules": [{"sender": ["y"], "receiver": ["last"], "relation": "any", "layers": [0]}]},
        {"name": "y->last L1-2", "group": "y->last", "band": "1-2", "rules": [{"sender": ["y"], "receiver": ["last"], "relation": "any", "layers": [1, 2]}]},
        {"name": "x->y L0", "group": "x->y", "band": "0", "rules": [{"sender": ["x"], "receiver": ["y"], "relation": "same", "layers": [0]}]},
        {"name": "x->y L1-2", "group": "x->y", "band": "1-2", "rules": [{"sender": ["x"], "receiver": ["y"], "relation": "same", "layers": [1, 2]}]},
        {"name": "bos->last", "rules": [{"sender": ["bos"], "receiver": ["last"], "relation": "any"}]},  # no group or band
    ]
    return {"task": "person_sport", "model_name": "smollm_prune_heads_in_circuits", "model_path": model, "output_path": out,
            "n_prompts": 6, "batch_size": 4, "seed": 5, "n_shots": 3, "max_new_tokens": 3, "donors": 2,
            "affect_whom": [["x", "y"]], "importance": "attribution", "prune_rounds": {"heads": 1, "edges": 1},
            "prune_fraction": 0.2, "ablations": ablations,
            "function_vectors": {"top_k": 2, "layers": [0, 2], "scales": [0, 1]}}


def run_edgepatch(exe, cfg_path, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    r = subprocess.run([exe, "run", cfg_path], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        sys.exit(f"edgepatch run {cfg_path}: status {r.returncode}\n{r.stdout}\n{r.stderr}")


def show(exe, run, cwd):
    r = subprocess.run([exe, "show", run, "--prompt", "1", "--json"], cwd=cwd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        sys.exit(f"edgepatch show {run}: status {r.returncode}: {r.stderr}")
    return json.loads(r.stdout), r.stderr


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    exe, src = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    plant = "--plant" in sys.argv[3:]
    doc_text = open(os.path.join(src, "docs", "artifacts.md"), encoding="utf-8").read()
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        shutil.copytree(os.path.join(src, "tests", "fixtures", "models", "smollm-tiny"), model)
        mc = json.load(open(os.path.join(model, "config.json")))
        run = os.path.join(tmp, "run")
        cfg_path = os.path.join(tmp, "a.json")
        json.dump(config(model, run), open(cfg_path, "w"))
        run_edgepatch(exe, cfg_path, src)
        with h5py.File(os.path.join(run, "prompts.h5"), "r") as f:
            symbols = {"P": int(f.attrs["n_prompts"]), "K": int(f.attrs["n_donors"]), "N": int(f.attrs["n_shots"])}
        heads = mc["num_attention_heads"]
        symbols.update({"layers": mc["num_hidden_layers"], "heads": heads,
                        "kv_heads": mc.get("num_key_value_heads", heads),
                        "head_dim": mc.get("head_dim", mc["hidden_size"] // heads), "max_new_tokens": 3})
        if plant:
            return self_test(run, doc_text, symbols)
        problems = check_run(run, doc_text, symbols)
        for p in problems:
            print(p)
        if problems:
            sys.exit(f"{len(problems)} differences between docs/artifacts.md and the run folder")
        n_files = sum(len(fs) for _, _, fs in os.walk(run))
        print(f"  docs/artifacts.md matches every one of the run folder's {n_files} files")
        # 1b. an eap-ig run with compare_importance: the round files' and model_logs.json's extra fields
        run_ig = os.path.join(tmp, "run-eapig")
        cfg_ig = os.path.join(tmp, "eapig.json")
        json.dump(dict(config(model, run_ig), importance="eap-ig", ig_steps=2, compare_importance=True), open(cfg_ig, "w"))
        run_edgepatch(exe, cfg_ig, src)
        problems = check_run(run_ig, doc_text, symbols)
        for p in problems:
            print(p)
        if problems:
            sys.exit(f"{len(problems)} differences between docs/artifacts.md and the eap-ig run folder")
        print("  docs/artifacts.md matches an eap-ig run with compare_importance too")
        # 1c. a run whose donor 0 is the mean donor: mean.d/ (and the score and prune rounds from it)
        run_mean = os.path.join(tmp, "run-mean")
        cfg_mean = os.path.join(tmp, "mean.json")
        json.dump(dict(config(model, run_mean), donors=["mean", "random_xy"]), open(cfg_mean, "w"))
        run_edgepatch(exe, cfg_mean, src)
        problems = check_run(run_mean, doc_text, symbols)
        if not os.path.exists(os.path.join(run_mean, "mean.d", "item-00000.h5")):
            problems.append("the mean-donor run wrote no mean.d/item-00000.h5")
        for p in problems:
            print(p)
        if problems:
            sys.exit(f"{len(problems)} differences between docs/artifacts.md and the mean-donor run folder")
        print("  docs/artifacts.md matches a run with the mean donor (mean.d/) too")
        # 2. the same config in another folder: byte-identical HDF5 and JSON files
        run2 = os.path.join(tmp, "run2")
        cfg2 = os.path.join(tmp, "b.json")
        json.dump(config(model, run2), open(cfg2, "w"))
        run_edgepatch(exe, cfg2, src)
        differ = []
        for d, _, fs in os.walk(run):
            for f in fs:
                rel = os.path.relpath(os.path.join(d, f), run)
                if rel.endswith((".h5", ".json")) and open(os.path.join(run, rel), "rb").read() != open(os.path.join(run2, rel), "rb").read():
                    differ.append(rel)
        if differ:
            sys.exit(f"two runs of one config differ in: {' '.join(sorted(differ))}")
        print("  a second run into another folder: every HDF5 and JSON file byte-identical")
        # 3. a moved run folder, its model gone, shown from another working directory
        before, _ = show(exe, run, src)
        moved = os.path.join(tmp, "elsewhere", "moved-run")
        os.makedirs(os.path.dirname(moved))
        shutil.move(run, moved)
        shutil.rmtree(model)
        other_cwd = os.path.join(tmp, "elsewhere")
        after, err = show(exe, "moved-run", other_cwd)
        if after["pieces"] != before["pieces"] or any(p.startswith("#") for p in after["pieces"]):
            sys.exit(f"show of the moved run folder without its model: pieces {after['pieces'][:8]}... not {before['pieces'][:8]}...")
        if "".join(after["pieces"]).strip() == "":
            sys.exit("show: empty token texts")
        print(f"  show of a moved run folder, model removed, from another directory: the same {len(after['pieces'])} token texts")


def plant_variants(doc_text):
    """(what, planted doc) pairs: each a single mismatch the check must report."""
    out = []
    def swap(what, old, new):
        if old not in doc_text:
            sys.exit(f"self-test: cannot plant '{what}': '{old}' not in docs/artifacts.md")
        out.append((what, doc_text.replace(old, new, 1)))
    swap("renamed attribute", "| `tokenizer_path` | string |", "| `tokenizer_location` | string |")
    swap("wrong shape", "| `types` | int32 | [P, L] |", "| `types` | int32 | [P, L, 2] |")
    swap("wrong dimension label", "[layers, T, kv_heads, head_dim] | layer, position, kv_head, d_head |",
         "[layers, T, kv_heads, head_dim] | layer, position, head, d_head |")
    swap("renamed group attribute", "| `ablation-NNN` | `rules` |", "| `ablation-NNN` | `plan_rules` |")
    swap("renamed JSON key", "| `full_model_mean_target_logprob` |", "| `full_model_target_logprob` |")
    return out


def self_test(run, doc_text, symbols):
    base = check_run(run, doc_text, symbols)
    if base:
        for p in base:
            print(p)
        sys.exit("self-test: the unplanted document does not match the run already")
    failed = []
    for what, text in plant_variants(doc_text):
        problems = check_run(run, text, symbols)
        if not problems:
            failed.append(what)
        else:
            print(f"  planted {what}: detected: {problems[0]}")
    if failed:
        sys.exit(f"self-test: planted mismatches not detected: {', '.join(failed)}")
    print("  every planted mismatch detected")


if __name__ == "__main__":
    main()
