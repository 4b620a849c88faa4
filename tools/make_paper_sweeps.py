#!/usr/bin/env python3
"""Writes the paper sweeps: configs/sweeps/paper-smollm2-135m.json (SmolLM2-135M-Instruct on this machine,
`edgepatch sweep run`) and configs/sweeps/paper.json (the six models of configs/sweeps/full.json on a
cluster, `edgepatch sweep submit`), from one list of experiments so the two stay the same study
(docs/sweeps.md, "The paper as a sweep").

Per task (the six of the paper, and Ambiguous Present-Past again at the follow-up's 2:1 mix):
  <task>.accuracy  the full model's accuracy                                        (until patch)
  <task>.bands     each edge group ablated (donor 0) in each third of the layers,
                   "band:K/3", so one file serves every depth                         (until patch)
  <task>.nested    ablating differently for different tokens: y->last with donor 0,
                   x->y with donor 1 from a donor pass where y->last is already
                   ablated (DESIGN.md, "Ablating differently ...")                    (until patch)
  <task>.donor-<kind>  the donor families: the contextualization and aggregation
                   groups over all layers, reading a donor of one kind each (every
                   kind the task file lists)                                          (until patch)
  <task>.prune     iterative pruning: head rounds then edge rounds, 10% per round,
                   stopping at a faithfulness floor of 0.8                            (until prune)

Usage: tools/make_paper_sweeps.py [--check]   (--check: exit 1 if the committed files differ)
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TASKS = ["copying", "country_capital", "present_past", "person_sport", "capitalization", "ambiguous_present_past",
         "ambiguous_present_past_2to1"]

# The edge groups of the band heatmaps (docs/demo.md, "The edge groups"; bos->all, a no-op control, left out).
GROUPS = [
    ("x->y same", ["x"], ["y"], "same"),
    ("y->y earlier", ["y"], ["y"], "earlier"),
    ("y->last", ["y"], ["last"], "any"),
    ("x->last", ["x"], ["last"], "any"),
    ("query->last", ["query"], ["last"], "any"),
]
# Contextualization (x->y, y->y) and aggregation (y->last): the donor families ablate these.
FAMILY_GROUPS = ["x->y same", "y->y earlier", "y->last"]
N_BANDS = 3
FAITHFULNESS_FLOOR = 0.8


def rule(group, layers):
    _, s, r, rel = next(g for g in GROUPS if g[0] == group)
    return {"sender": s, "receiver": r, "relation": rel, "layers": layers}


def band_ablations():
    out = []
    for g in GROUPS:
        for k in range(N_BANDS):
            band = "%d/%d" % (k + 1, N_BANDS)
            out.append({"name": "%s band %s" % (g[0], band), "group": g[0], "band": band,
                        "rules": [rule(g[0], "band:%d/%d" % (k, N_BANDS))]})
    return out


def family_ablations(kind):
    return [{"name": "%s all layers" % g, "group": g, "band": kind, "rules": [rule(g, "all")]} for g in FAMILY_GROUPS]


def donor_kinds(task):
    with open(os.path.join(ROOT, "datasets", "tasks", task + ".json")) as f:
        return json.load(f)["donor_kinds"]


def experiments(prune_rounds):
    out = []
    for t in TASKS:
        out.append({"name": t + ".accuracy", "task": t, "experiment": "accuracy", "until": "patch",
                    "run": {"mode": "calc_accuracy", "donors": 1}})
        out.append({"name": t + ".bands", "task": t, "experiment": "bands", "until": "patch",
                    "run": {"mode": "calc_accuracy", "donors": 1, "ablations": band_ablations()}})
        out.append({"name": t + ".nested", "task": t, "experiment": "nested", "until": "patch",
                    "run": {"mode": "ablate_edges_differently_for_different_tokens", "donors": 2,
                            "affect_whom": {"curcuit": {"y,last": 0}, "ablate": {"x,y": 1}}}})
        for kind in donor_kinds(t):
            out.append({"name": "%s.donor-%s" % (t, kind), "task": t, "experiment": "donors", "until": "patch",
                        "run": {"mode": "calc_accuracy", "donors": [kind], "ablations": family_ablations(kind)}})
        out.append({"name": t + ".prune", "task": t, "experiment": "prune", "until": "prune",
                    "run": {"mode": "prune_heads", "donors": 1, "importance": "attribution", "prune_rounds": prune_rounds,
                            "prune_fraction": 0.1, "min_faithfulness": FAITHFULNESS_FLOOR}})
    return out


def smollm_sweep():
    return {
        "description": "The paper's experiments on SmolLM2-135M-Instruct, on one machine (`edgepatch sweep run`; "
                       "written by tools/make_paper_sweeps.py, do not edit): per task full-model accuracy, edge groups "
                       "ablated by layer band, the nested experiment, the donor families, and iterative pruning "
                       "(heads then edges, 10% a round, faithfulness floor 0.8). docs/sweeps.md.",
        "name": "paper-smollm2-135m",
        "output_root": "runs/sweeps/paper-smollm2-135m",
        "run": {"n_prompts": 24, "batch_size": 8, "seed": 1, "max_new_tokens": 3},
        "models": [{"name": "smollm2-135m", "path": "models/smollm2-135m-instruct", "gpus": 0, "ranks": 1}],
        "experiments": experiments({"heads": 4, "edges": 2}),
        "prompt_tokens": 128,
        "stages": [{"name": "run", "until": "prune"}],
    }


def cluster_sweep():
    with open(os.path.join(ROOT, "configs", "sweeps", "full.json")) as f:
        full = json.load(f)
    return {
        "description": "The paper's experiments on the six models of full.json (Gemma-2 2B/9B/27B, Phi-2, SmolLM2-1.7B, "
                       "Llama-3 8B) on a Slurm cluster (written by tools/make_paper_sweeps.py from full.json's models "
                       "and slurm block, do not edit; edit paths there): per task full-model accuracy, edge groups "
                       "ablated by layer band, the nested experiment, the donor families, iterative pruning (heads "
                       "then edges, 10% a round, faithfulness floor 0.8). docs/sweeps.md.",
        "name": "paper",
        "output_root": "runs/sweeps/paper",
        "run": {"n_prompts": 100, "batch_size": 8, "seed": 0, "max_new_tokens": 10},
        "models": full["models"],
        "experiments": experiments({"heads": 10, "edges": 10}),
        "prompt_tokens": full["prompt_tokens"],
        "stages": full["stages"],
        "slurm": full["slurm"],
    }


def main():
    check = "--check" in sys.argv[1:]
    bad = 0
    for name, sweep in (("paper-smollm2-135m.json", smollm_sweep()), ("paper.json", cluster_sweep())):
        path = os.path.join(ROOT, "configs", "sweeps", name)
        text = json.dumps(sweep, indent=1) + "\n"
        if check:
            with open(path) as f:
                if f.read() != text:
                    print("%s differs from tools/make_paper_sweeps.py's output" % path, file=sys.stderr)
                    bad = 1
        else:
            with open(path, "w") as f:
                f.write(text)
    return bad


if __name__ == "__main__":
    sys.exit(main())
