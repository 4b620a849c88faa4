"""A sweep (models x tasks, one run folder each: <output_root>/<model>/<task>/) as DataFrames."""

import os

import pandas as pd

from ._files import MissingResult, ResultsError, field, load_json
from .run import Circuit, Run

# What marks a folder under output_root as a run folder (any one of them).
RUN_MARKERS = ("prompts.h5", "model_logs.json", "sweep-run.json", "patch.h5")


class Sweep:
    """The runs of a sweep. Every table is the per-run table with run, model and task columns in front,
    concatenated over the runs that have the file it comes from (a run not that far yet is left out;
    .runs() says what each run has). A damaged file in any run raises ResultsError."""

    def __init__(self, path, output_root=None, tokenizer=None, verify=True):
        path = os.fspath(path)
        self.path, self.config = path, None
        if os.path.isfile(path):
            self.config = load_json(path)
            root = output_root or field(path, self.config, "output_root", str)
            models = field(path, self.config, "models", list)
            # the runs' folder names: the tasks, then the experiments entries' names (docs/sweeps.md); the
            # "task" column holds that name
            tasks = list(field(path, self.config, "tasks", list)) if "tasks" in self.config or "experiments" not in self.config else []
            names = [field(path, m, "name", str, f"models[{i}].") for i, m in enumerate(models)]
            for i, t in enumerate(tasks):
                if not isinstance(t, str):
                    raise ResultsError(f"{path}: field tasks[{i}]: wrong type")
            for i, e in enumerate(self.config.get("experiments", [])):
                tasks.append(field(path, e, "name", str, f"experiments[{i}]."))
            # Relative output_root: from the working directory, as edgepatch sweep takes it (docs/sweeps.md).
            pairs = [(m, t) for m in names for t in tasks]
        elif os.path.isdir(path):
            root = output_root or path
            pairs = []
            for m in sorted(os.listdir(root)):
                if m == "slurm" or not os.path.isdir(os.path.join(root, m)):
                    continue
                for t in sorted(os.listdir(os.path.join(root, m))):
                    if any(os.path.exists(os.path.join(root, m, t, f)) for f in RUN_MARKERS):
                        pairs.append((m, t))
            if not pairs:
                raise MissingResult(f"{root}: no run folders <model>/<task>/ under it (not a sweep's output_root?)")
        else:
            raise MissingResult(f"{path}: no such sweep file or output_root folder")
        self.output_root = root
        self._runs = [(m, t, os.path.join(root, m, t)) for m, t in pairs]
        self._tokenizer, self._verify = tokenizer, verify

    def __repr__(self):
        return f"Sweep({self.path!r}: {len(self._runs)} runs under {self.output_root})"

    def run(self, model, task):
        """One run of the sweep as a Run."""
        for m, t, p in self._runs:
            if (m, t) == (model, task):
                return Run(p, tokenizer=self._tokenizer, verify=self._verify)
        raise KeyError(f"{self.path}: no run {model}/{task}")

    def _open(self):
        for m, t, p in self._runs:
            if os.path.isdir(p):
                yield m, t, Run(p, tokenizer=self._tokenizer, verify=self._verify)

    def runs(self):
        """One row per run: run (model/task), model, task, path, exists, and what it has: prompts, patch,
        rounds (finished round files), circuit."""
        rows = []
        for m, t, p in self._runs:
            r = Run(p, verify=self._verify) if os.path.isdir(p) else None
            rows.append({"run": f"{m}/{t}", "model": m, "task": t, "path": p, "exists": r is not None,
                         "prompts": bool(r and r.has("prompts.h5")), "patch": bool(r and r.has("patch.h5")),
                         "rounds": len(r.round_numbers()) if r else 0, "circuit": bool(r and r.has("circuit.json"))})
        return pd.DataFrame(rows, columns=["run", "model", "task", "path", "exists", "prompts", "patch", "rounds", "circuit"])

    def _concat(self, table, needs, *args, **kwargs):
        frames = []
        for m, t, r in self._open():
            if needs and not needs(r):
                continue
            df = getattr(r, table)(*args, **kwargs)
            df.insert(0, "task", t)
            df.insert(0, "model", m)
            df.insert(0, "run", f"{m}/{t}")
            frames.append(df)
        if not frames:
            return pd.DataFrame(columns=["run", "model", "task"])
        out = pd.concat(frames, ignore_index=True)
        for c in ("condition",):  # per-run categories differ (ablation names): plain strings across runs
            if c in out:
                out[c] = out[c].astype(object)
        return out

    def prompts(self):
        return self._concat("prompts", lambda r: r.has("prompts.h5"))

    def prompt_info(self):
        return self._concat("prompt_info", lambda r: r.has("prompts.h5"))

    def donors(self):
        return self._concat("donors", lambda r: r.has("prompts.h5"))

    def metrics(self):
        return self._concat("metrics", lambda r: r.has("patch.h5"))

    def summary(self):
        return self._concat("summary", lambda r: r.has("model_logs.json"))

    def ablations(self):
        return self._concat("ablations", lambda r: r.has("patch.h5"))

    def rounds(self):
        return self._concat("rounds", lambda r: r.round_numbers())

    def scores(self, round=None):
        """scores(round) of every run that has that round (round=None: each run's last; "all": every round)."""
        if round is None or round == "all":
            need = lambda r: r.round_numbers()
        else:
            need = lambda r: int(round) in r.round_numbers()
        return self._concat("scores", need, round)

    def circuit(self, round=None):
        """Every run's circuit: a Circuit whose heads and edges tables carry run, model and task columns, and
        whose info is a table of one row per run (round, n_head_units, n_edge_units, faithfulness_logit_diff)."""
        heads, edges, info = [], [], []
        for m, t, r in self._open():
            if (round is None and not r.has("circuit.json")) or (round is not None and int(round) not in r.round_numbers()):
                continue
            c = r.circuit(round)
            for df, out in ((c.heads, heads), (c.edges, edges)):
                df = df.copy()
                df.insert(0, "task", t), df.insert(0, "model", m), df.insert(0, "run", f"{m}/{t}")
                out.append(df)
            info.append({"run": f"{m}/{t}", "model": m, "task": t, "round": c.round, "n_head_units": c.n_head_units,
                         "n_edge_units": c.n_edge_units, "edges_pruned": c.edges_pruned,
                         "faithfulness_logit_diff": c.faithfulness_logit_diff, "source": c.source})
        cat = lambda fs: pd.concat(fs, ignore_index=True) if fs else pd.DataFrame(columns=["run", "model", "task"])
        table = pd.DataFrame(info)
        return Circuit(cat(heads), cat(edges), round if round is not None else -1,
                       bool(table["edges_pruned"].any()) if len(table) else False,
                       int(table["n_head_units"].sum()) if len(table) else 0,
                       int(table["n_edge_units"].sum()) if len(table) else 0, float("nan"), self.path, {"runs": table})


def open_sweep(path, output_root=None, tokenizer=None, verify=True):
    """Opens a sweep: its sweep file (the runs are <output_root>/<model>/<task>/ for its models and tasks;
    output_root overrides the file's) or an output_root folder (every <model>/<task>/ run folder in it)."""
    return Sweep(path, output_root=output_root, tokenizer=tokenizer, verify=verify)
