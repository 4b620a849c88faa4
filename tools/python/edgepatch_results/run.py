"""One run folder as DataFrames (docs/python.md)."""

import gzip
import json
import os
import re
from dataclasses import dataclass, field as dc_field

import numpy as np
import pandas as pd

from ._files import (DONOR_KIND_NAMES, TYPE_NAMES, MissingResult, ResultsError, SealedH5, field, load_json)

# Head units are scored for the prompt types bos .. last; edge units for every type (stages/plan.h).
N_HEAD_TYPES = 7
N_EDGE_TYPES = 8
METRIC_COLUMNS = ("target_logprob", "first_token_accuracy", "logit_diff")
METRIC_ROWS = ("circuit", "kept", "clean")
NUMBER = (int, float, type(None))
# Names the per-token text dataset of prompts.h5 may have (any string dataset shaped like `tokens` is used).
TOKEN_TEXT_DATASETS = ("pieces", "token_text", "token_pieces", "text")


def _nan(x):
    return float("nan") if x is None else float(x)


class _Decoder:
    """Token ids to text with the `tokenizers` package, when it is installed and the run's tokenizer is found."""

    def __init__(self, tokenizer):
        self.tk = tokenizer
        self.pieces = {}

    @staticmethod
    def load(spec, run_dir, attrs):
        if spec is False:
            return None
        if spec is not None and hasattr(spec, "decode"):
            return _Decoder(spec)
        try:
            import tokenizers  # optional: pip install 'tools/python[tokens]'
        except ImportError:
            return None
        if spec is not None:
            paths = [str(spec)]
        else:  # every tokenizer path prompts.h5 records, as given (relative to the working directory) and from the run folder
            paths = [v for k, v in sorted(attrs.items()) if k.startswith("tokenizer_path") and isinstance(v, str) and v]
            paths += [os.path.join(run_dir, p) for p in paths if not os.path.isabs(p)]
        for p in paths:
            for f in ([p] if os.path.isfile(p) else [os.path.join(p, "tokenizer.json"), os.path.join(p, "tokenizer.json.gz")]):
                if not os.path.isfile(f):
                    continue
                try:
                    if f.endswith(".gz"):
                        with gzip.open(f, "rt", encoding="utf-8") as g:
                            return _Decoder(tokenizers.Tokenizer.from_str(g.read()))
                    return _Decoder(tokenizers.Tokenizer.from_file(f))
                except Exception:  # a tokenizer file the package cannot read: no text, as without the package
                    continue
        return None

    def piece(self, token):
        token = int(token)
        if token not in self.pieces:
            self.pieces[token] = self.tk.decode([token], skip_special_tokens=False) if token >= 0 else ""
        return self.pieces[token]

    def text(self, ids):
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=True)


@dataclass
class Circuit:
    """A circuit: kept head units (layer, head, type) and kept edge units (layer, head, sender, receiver).

    `edges` is empty and `edges_pruned` False for a circuit from head rounds only (no edge unit was scored)."""

    heads: pd.DataFrame
    edges: pd.DataFrame
    round: int
    edges_pruned: bool
    n_head_units: int
    n_edge_units: int
    faithfulness_logit_diff: float = float("nan")
    source: str = ""
    info: dict = dc_field(default_factory=dict)

    def __repr__(self):
        return (f"Circuit(round {self.round}: {self.n_head_units} head units, {self.n_edge_units} edge units, "
                f"faithfulness {self.faithfulness_logit_diff:.3f}; {self.source})")


def _types(names, codes, path, name):
    codes = np.asarray(codes)
    if codes.size and (codes.min() < 0 or codes.max() >= len(names)):
        raise ResultsError(f"{path}: dataset {name}: value outside 0..{len(names) - 1}")
    return pd.Categorical.from_codes(codes, categories=list(names))


class Run:
    """A run folder (edgepatch run's output_path). Each table is read from the files when asked for.

    tokenizer: None (find the run's tokenizer.json and decode with the `tokenizers` package if installed),
    False (no token text unless prompts.h5 holds it), a path (a tokenizer folder or tokenizer.json), or an
    object with decode(ids, skip_special_tokens=...). config: a run config JSON file to report as .config
    (the run folder holds no copy of its config; see .config). verify: check seals and checksums."""

    def __init__(self, path, tokenizer=None, config=None, verify=True):
        self.path = os.fspath(path).rstrip("/") or "/"
        if not os.path.isdir(self.path):
            raise MissingResult(f"{self.path}: no such run folder")
        self.verify = verify
        self._tokenizer_spec = tokenizer
        self._decoder = None
        self._decoder_loaded = False
        self._config_file = config

    def __repr__(self):
        return f"Run({self.path!r})"

    def file(self, name):
        return os.path.join(self.path, name)

    def has(self, name):
        return os.path.exists(self.file(name))

    def _h5(self, name, fmt):
        return SealedH5(self.file(name), fmt, self.verify)

    def _decoder_for(self, attrs):
        if not self._decoder_loaded:
            self._decoder = _Decoder.load(self._tokenizer_spec, self.path, attrs)
            self._decoder_loaded = True
        return self._decoder

    # ---- prompts.h5 ----------------------------------------------------------------------------------
    def _prompt_arrays(self):
        with self._h5("prompts.h5", "edgepatch-prompts") as f:
            tokens = f.read("tokens", rank=2)
            P, L = tokens.shape
            a = {"path": f.path, "tokens": tokens, "lengths": f.read("lengths", 1, P)}
            for name in ("types", "index"):
                a[name] = f.read(name, 2, P)
                if a[name].shape != tokens.shape:
                    raise ResultsError(f"{f.path}: dataset {name}: shape {a[name].shape}, tokens has {tokens.shape}")
            a["targets"] = f.read("targets", 2, P)
            a["target_lengths"] = f.read("target_lengths", 1, P)
            a["pair_ids"] = f.read("pair_ids", 2, P)
            K = int(f.attr("n_donors", 0))
            a["donors"] = f.read("donors", 3, P) if f.has("donors") else np.zeros((P, 0, L), np.int32)
            a["donor_kinds"] = f.read("donor_kinds", 1) if f.has("donor_kinds") else np.zeros(0, np.int32)
            if a["donors"].shape[1:] != (K, L) or a["donor_kinds"].shape != (K,):
                raise ResultsError(f"{f.path}: datasets donors, donor_kinds: shapes {a['donors'].shape}, "
                                   f"{a['donor_kinds'].shape} for {K} donors of {L} positions")
            if P and (a["lengths"].min() < 1 or a["lengths"].max() > L):
                raise ResultsError(f"{f.path}: dataset lengths: a length outside 1..{L}")
            if P and (a["target_lengths"].min() < 0 or a["target_lengths"].max() > a["targets"].shape[1]):
                raise ResultsError(f"{f.path}: dataset target_lengths: a length outside 0..{a['targets'].shape[1]}")
            root_types = f.attr("type_names", "")
            a["type_names"] = f.enum_names("types", root_types.split(",") if root_types else TYPE_NAMES)
            if f.has("donor_kinds") and "enum_names" in f.h5["donor_kinds"].attrs:
                kinds = f.enum_names("donor_kinds", DONOR_KIND_NAMES)
                a["donor_kind_of"] = [kinds[k] if 0 <= k < len(kinds) else str(k) for k in a["donor_kinds"]]
            else:  # today's layout: the root attribute donor_kind_names names each donor, in order
                names = [n for n in f.attr("donor_kind_names", "").split(",") if n]
                a["donor_kind_of"] = names if len(names) == K else [
                    DONOR_KIND_NAMES[k] if 0 <= k < len(DONOR_KIND_NAMES) else str(k) for k in a["donor_kinds"]]
            a["token_text"] = f.string_dataset(TOKEN_TEXT_DATASETS, tokens.shape)
            a["donor_text"] = f.string_dataset(tuple("donor_" + n for n in TOKEN_TEXT_DATASETS), a["donors"].shape) \
                if a["donors"].size and a["donors"].shape != tokens.shape else None
            a["attrs"] = {k: f.attr(k) for k in f.h5.attrs}
        return a

    def _texts(self, a, ids, mask_text=None):
        """Text per token id: from prompts.h5's text dataset (mask_text), else the decoder, else ""."""
        if mask_text is not None:
            return [str(t) for t in mask_text]
        dec = self._decoder_for(a["attrs"])
        if dec is None:
            return [""] * len(ids)
        return [dec.piece(i) for i in ids]

    def prompts(self):
        """One row per prompt and position: prompt, position, token, token_text, type, example.

        type is categorical (bos, x, t, y, n, query, last, target); example is the demonstration index
        0..N-1, N for the query and the last separator, -1 for bos. token_text is "" when neither
        prompts.h5 nor an installed `tokenizers` gives it."""
        a = self._prompt_arrays()
        P, L = a["tokens"].shape
        mask = np.arange(L)[None, :] < a["lengths"][:, None]
        p, pos = np.nonzero(mask)
        ids = a["tokens"][mask]
        return pd.DataFrame({
            "prompt": p.astype(np.int64), "position": pos.astype(np.int64), "token": ids.astype(np.int64),
            "token_text": self._texts(a, ids, None if a["token_text"] is None else a["token_text"][mask]),
            "type": _types(a["type_names"], a["types"][mask], a["path"], "types"),
            "example": a["index"][mask].astype(np.int64),
        })

    def prompt_info(self):
        """One row per prompt: length, n_shots, target (token ids of output prefix + answer), target_text,
        target_length, pair_ids (task pair per demonstration then the query; -(i+1) marks ambiguous pair i),
        query_pair."""
        a = self._prompt_arrays()
        P = a["tokens"].shape[0]
        dec = self._decoder_for(a["attrs"])
        targets = [a["targets"][i, : a["target_lengths"][i]].astype(np.int64).tolist() for i in range(P)]
        return pd.DataFrame({
            "prompt": np.arange(P, dtype=np.int64), "length": a["lengths"].astype(np.int64),
            "n_shots": np.full(P, a["pair_ids"].shape[1] - 1, np.int64),
            "target": targets, "target_text": [dec.text(t) if dec else "" for t in targets],
            "target_length": a["target_lengths"].astype(np.int64),
            "pair_ids": [row.astype(np.int64).tolist() for row in a["pair_ids"]],
            "query_pair": a["pair_ids"][:, -1].astype(np.int64),
        })

    def donors(self):
        """One row per prompt, donor and position: donor_kind, token, token_text, same (the clean token)."""
        a = self._prompt_arrays()
        P, K, L = a["donors"].shape
        mask = np.arange(L)[None, None, :] < a["lengths"][:, None, None]
        mask = np.broadcast_to(mask, (P, K, L))
        p, d, pos = np.nonzero(mask)
        ids = a["donors"][mask]
        if a["donor_text"] is not None:
            texts = [str(t) for t in a["donor_text"][mask]]
        elif a["token_text"] is not None:  # the clean prompts' pieces by id; a token they lack gets the decoder's or ""
            known = dict(zip(a["tokens"].ravel().tolist(), (str(t) for t in a["token_text"].ravel())))
            dec = self._decoder_for(a["attrs"])
            texts = [known[i] if i in known else (dec.piece(i) if dec else "") for i in ids.tolist()]
        else:
            texts = self._texts(a, ids)
        return pd.DataFrame({
            "prompt": p.astype(np.int64), "donor": d.astype(np.int64), "donor_kind": [a["donor_kind_of"][k] for k in d],
            "position": pos.astype(np.int64), "token": ids.astype(np.int64), "token_text": texts,
            "same": ids == a["tokens"][p, pos],
        })

    # ---- patch.h5 ------------------------------------------------------------------------------------
    @property
    def logs(self):
        """model_logs.json as a dict."""
        return load_json(self.file("model_logs.json"))

    def ablations(self):
        """One row per ablation of the config's list, in order: ablation, h5_group, name, group, band, rules."""
        with self._h5("patch.h5", "edgepatch-patch") as f:
            return self._ablations(f)

    def _ablations(self, f):
        listed = f.attr("ablations", "[]")
        try:
            listed = json.loads(listed) if isinstance(listed, str) else list(listed)
        except ValueError:
            raise ResultsError(f"{f.path}: attribute ablations: not a JSON list") from None
        groups = sorted((n for n in f.h5 if re.fullmatch(r"ablation-\d{3,}", n)), key=lambda n: int(n.split("-")[1]))
        if [int(n.split("-")[1]) for n in groups] != list(range(len(groups))) or len(groups) != len(listed):
            raise ResultsError(f"{f.path}: groups ablation-NNN: {len(groups)} groups, attribute ablations names {len(listed)}")
        try:
            logged = self.logs.get("ablations", [])
        except ResultsError:
            logged = []
        rows = []
        for i, g in enumerate(groups):
            name = f.attr("name", listed[i], obj=g)
            log = next((e for e in logged if isinstance(e, dict) and e.get("name") == name), {})
            rules = f.attr("rules", None, obj=g)
            if isinstance(rules, str):
                try:
                    rules = json.loads(rules)
                except ValueError:
                    raise ResultsError(f"{f.path}: attribute {g}/rules: not JSON") from None
            rows.append({"ablation": i, "h5_group": g, "name": name, "group": f.attr("group", log.get("group"), obj=g),
                         "band": f.attr("band", log.get("band"), obj=g), "rules": rules})
        return pd.DataFrame(rows, columns=["ablation", "h5_group", "name", "group", "band", "rules"])

    def metrics(self):
        """One row per prompt and condition (full_model, plan, then each ablation by name): kind, ablation,
        group, band, correct, first_token_correct, target_logprob, logit_diff, n_generated, generated (ids),
        generated_text (None without a tokenizer), kl_full_model (KL of the full model's next-token
        distribution at `last` from this condition's, nats; NaN in files written before it existed).
        condition is categorical in that order."""
        n_prompts, attrs = None, {}
        if self.has("prompts.h5"):
            with self._h5("prompts.h5", "edgepatch-prompts") as p:
                n_prompts = p.read("lengths", 1).shape[0]
                attrs = {k: p.attr(k) for k in p.h5.attrs}
        with self._h5("patch.h5", "edgepatch-patch") as f:
            abl = self._ablations(f)
            conditions = [("full_model", "clean", "full_model", None, None, None), ("plan", "plan", "plan", None, None, None)]
            conditions += [(r.name, r.h5_group, "ablation", r.ablation, r.group, r.band) for r in abl.itertuples()]
            dec = self._decoder_for(attrs)
            frames = []
            for cond, g, kind, index, group, band in conditions:
                rows = n_prompts
                d = {k: f.read(f"{g}/{k}", 1, rows) for k in ("correct", "first_token_correct", "target_logprob", "logit_diff", "n_generated")}
                rows = d["correct"].shape[0]
                for k in d:
                    if d[k].shape[0] != rows:
                        raise ResultsError(f"{f.path}: dataset {g}/{k}: {d[k].shape[0]} rows, {g}/correct has {rows}")
                kl = f.read(f"{g}/kl_full_model", 1, rows).astype(np.float64) if f.has(f"{g}/kl_full_model") else np.full(rows, np.nan)
                gen = f.read(f"{g}/generated", 2, rows)
                n_gen = d["n_generated"]
                if rows and (n_gen.min() < 0 or n_gen.max() > gen.shape[1]):
                    raise ResultsError(f"{f.path}: dataset {g}/n_generated: a count outside 0..{gen.shape[1]}")
                generated = [gen[i, : n_gen[i]].astype(np.int64).tolist() for i in range(rows)]
                text = f.string_dataset([f"{g}/generated_text"], (rows,)) if f.has(f"{g}/generated_text") else None
                if text is not None:
                    texts = [str(t) for t in text]
                else:
                    texts = [dec.text(t) if dec else None for t in generated]
                frames.append(pd.DataFrame({
                    "prompt": np.arange(rows, dtype=np.int64), "condition": cond, "kind": kind,
                    "ablation": pd.array([index] * rows, dtype="Int64"), "group": group, "band": band,
                    "correct": d["correct"] != 0, "first_token_correct": d["first_token_correct"] != 0,
                    "target_logprob": d["target_logprob"].astype(np.float64), "logit_diff": d["logit_diff"].astype(np.float64),
                    "n_generated": n_gen.astype(np.int64), "generated": generated, "generated_text": texts,
                    "kl_full_model": kl,
                }))
        out = pd.concat(frames, ignore_index=True)
        out["condition"] = pd.Categorical(out["condition"], categories=list(dict.fromkeys(c[0] for c in conditions)))
        return out

    def attention(self):
        """The attention figures at `last`: one row per prompt, condition (as metrics()), layer and query
        head: entropy (nats) of that head's attention distribution at the `last` row, and mass_<type> for
        each sender type (bos .. last: the probability on keys of that type; they sum to 1). Empty for a
        patch.h5 written before these figures existed."""
        with self._h5("patch.h5", "edgepatch-patch") as f:
            abl = self._ablations(f)
            conditions = [("full_model", "clean"), ("plan", "plan")] + [(r.name, r.h5_group) for r in abl.itertuples()]
            frames = []
            for cond, g in conditions:
                if not f.has(f"{g}/attn_entropy"):
                    continue
                ent = f.read(f"{g}/attn_entropy", 3)
                mass = f.read(f"{g}/attn_mass", 4)
                if mass.shape[:3] != ent.shape:
                    raise ResultsError(f"{f.path}: dataset {g}/attn_mass: shape {mass.shape}, {g}/attn_entropy has {ent.shape}")
                names = f.attr("enum_names", None, obj=f"{g}/attn_mass")
                names = [str(n) for n in names] if names is not None else list(TYPE_NAMES[: mass.shape[3]])
                P, L, H = ent.shape
                pp, ll, hh = np.meshgrid(np.arange(P), np.arange(L), np.arange(H), indexing="ij")
                d = {"prompt": pp.ravel(), "condition": cond, "layer": ll.ravel(), "head": hh.ravel(),
                     "entropy": ent.astype(np.float64).ravel()}
                for t, n in enumerate(names):
                    d[f"mass_{n}"] = mass[..., t].astype(np.float64).ravel()
                frames.append(pd.DataFrame(d))
        if not frames:
            return pd.DataFrame(columns=["prompt", "condition", "layer", "head", "entropy"])
        out = pd.concat(frames, ignore_index=True)
        out["condition"] = pd.Categorical(out["condition"], categories=[c[0] for c in conditions])
        return out

    def summary(self):
        """model_logs.json's figures, one row per condition (full_model, plan, each ablation): accuracy,
        accuracy_drop (full model - this), first_token_accuracy, mean_target_logprob, mean_logit_diff,
        accuracy_on_full_model_correct, faithfulness_accuracy, faithfulness_logit_diff (NaN where the file
        has none). The whole file: .logs."""
        path, logs = self.file("model_logs.json"), self.logs
        field(path, logs, "task", str)
        field(path, logs, "n_prompts", int)
        figures = ["accuracy", "first_token_accuracy", "mean_target_logprob", "mean_logit_diff",
                   "accuracy_on_full_model_correct", "faithfulness_accuracy", "faithfulness_logit_diff",
                   "mean_kl_full_model"]
        full = {k: _nan(logs.get("full_model_" + k)) for k in figures}
        full["accuracy"] = _nan(field(path, logs, "full_model_accuracy", NUMBER))
        full.update(accuracy_on_full_model_correct=1.0 if full["accuracy"] > 0 else float("nan"),
                    faithfulness_accuracy=1.0, faithfulness_logit_diff=1.0, mean_kl_full_model=0.0)
        rows = [dict(condition="full_model", kind="full_model", ablation=None, group=None, band=None, **full)]
        if "accuracy" in logs:
            rows.append(dict(condition="plan", kind="plan", ablation=None, group=None, band=None,
                             **{k: _nan(field(path, logs, k, NUMBER) if k in logs else None) for k in figures}))
        for i, a in enumerate(logs.get("ablations", []) or []):
            where = f"ablations[{i}]."
            rows.append(dict(condition=field(path, a, "name", str, where), kind="ablation", ablation=i,
                             group=a.get("group"), band=a.get("band"),
                             **{k: _nan(field(path, a, k, NUMBER, where) if k in a else None) for k in figures}))
        out = pd.DataFrame(rows)
        out["ablation"] = pd.array(out["ablation"], dtype="Int64")
        out.insert(6, "accuracy_drop", full["accuracy"] - out["accuracy"])
        out["n_prompts"] = logs["n_prompts"]
        return out

    # ---- prune.d -------------------------------------------------------------------------------------
    def round_numbers(self):
        """The rounds with a round file, in order."""
        folder = self.file("prune.d")
        if not os.path.isdir(folder):
            return []
        return sorted(int(m.group(1)) for m in (re.fullmatch(r"round-(\d{3,})\.h5", n) for n in os.listdir(folder)) if m)

    def _round_file(self, r):
        if r is None:
            rounds = self.round_numbers()
            if not rounds:
                raise MissingResult(f"{self.file('prune.d')}: no finished round (the score stage has not run)")
            r = rounds[-1]
        name = f"prune.d/round-{int(r):03d}.h5"
        if not self.has(name):
            raise MissingResult(f"{self.file(name)}: no such round file (round {r} not run)")
        return self._h5(name, "edgepatch-prune-round")

    def _round(self, f, type_names):
        kind = f.attr("kind")
        if kind not in ("head", "edge"):
            raise ResultsError(f"{f.path}: attribute kind: expected \"head\" or \"edge\", not {kind!r}")
        units = f.read("units", 2)
        if units.shape[1] != 4:
            raise ResultsError(f"{f.path}: dataset units: expected [n, 4]")
        n = units.shape[0]
        scores = f.read("scores", 1, n)
        metrics = f.read("metrics", 2, 3)
        if metrics.shape != (3, 3):
            raise ResultsError(f"{f.path}: dataset metrics: expected [3, 3]")
        masks = {}
        for g in ("circuit", "kept"):
            masks[g + "/heads"] = f.read(g + "/heads", 3)
            if f.has(g + "/edges"):
                masks[g + "/edges"] = f.read(g + "/edges", 4)
        L, H = masks["circuit/heads"].shape[:2]
        for k, m in masks.items():
            want = (L, H, N_HEAD_TYPES) if k.endswith("heads") else (L, H, N_EDGE_TYPES, N_EDGE_TYPES)
            if m.shape != want:
                raise ResultsError(f"{f.path}: dataset {k}: shape {m.shape}, expected {want}")
        types = N_EDGE_TYPES if kind == "edge" else N_HEAD_TYPES
        bad = (units[:, 0] < 0) | (units[:, 0] >= L) | (units[:, 1] < 0) | (units[:, 1] >= H) | (units[:, 2] < 0) | (units[:, 2] >= types)
        if kind == "edge":
            bad |= (units[:, 3] < 0) | (units[:, 3] >= N_EDGE_TYPES)
        if bad.any():
            i = int(np.nonzero(bad)[0][0])
            raise ResultsError(f"{f.path}: dataset units: unit {i} {tuple(units[i])} is not a {kind} unit of a {L}-layer, {H}-head circuit")
        names = f.enum_names("units", type_names)
        return kind, units, scores, metrics, masks, names

    def _type_names(self):
        if self.has("prompts.h5"):
            try:
                with self._h5("prompts.h5", "edgepatch-prompts") as p:
                    root = p.attr("type_names", "")
                    return p.enum_names("types", root.split(",") if root else TYPE_NAMES)
            except ResultsError:
                pass
        return list(TYPE_NAMES)

    def rounds(self):
        """One row per finished pruning round: round, kind, method, n_units, n_kept, pruned, stop, the metrics
        of the circuit scored, the circuit kept and the clean model (circuit_/kept_/clean_ target_logprob,
        first_token_accuracy, logit_diff), faithfulness_logit_diff (kept / clean logit difference), and for
        compare_importance runs compare_method, spearman, spearman_abs_exact, top_k, top_k_overlap."""
        rows, type_names = [], self._type_names()
        for r in self.round_numbers():
            with self._round_file(r) as f:
                kind, units, scores, metrics, masks, _ = self._round(f, type_names)
                kept = self._kept(kind, units, masks)
                row = {"round": int(f.attr("round")), "kind": kind, "method": f.attr("method"), "n_units": len(units),
                       "n_kept": int(kept.sum()), "pruned": int(f.attr("pruned")), "stop": f.attr("stop")}
                mrows = f.attr("metrics_rows", ",".join(METRIC_ROWS)).split(",")
                mcols = f.attr("metrics_columns", ",".join(METRIC_COLUMNS)).split(",")
                for i, mr in enumerate(mrows):
                    for j, mc in enumerate(mcols):
                        row[f"{mr}_{mc}"] = float(metrics[i, j])
                clean = row.get("clean_logit_diff", float("nan"))
                row["faithfulness_logit_diff"] = row.get("kept_logit_diff", float("nan")) / clean if clean else float("nan")
                if f.has("compare/agreement"):
                    ag = f.read("compare/agreement", 1)
                    row.update(compare_method=f.attr("compare_method", None), spearman=float(ag[0]),
                               spearman_abs_exact=float(ag[1]), top_k_overlap=int(ag[2]), top_k=int(ag[3]))
                rows.append(row)
        return pd.DataFrame(rows)

    @staticmethod
    def _kept(kind, units, masks):
        l, h, a, b = units[:, 0], units[:, 1], units[:, 2], units[:, 3]
        if kind == "head":
            return masks["kept/heads"][l, h, a] != 0
        if "kept/edges" not in masks:
            return np.zeros(len(units), bool)
        return masks["kept/edges"][l, h, a, b] != 0

    def scores(self, round=None):
        """The units one round scored (default: the last round), in the file's order: round, kind, layer,
        head, type (head units) or sender and receiver (edge units), score, kept, rank (1 = highest score,
        ties in file order, as edgepatch scores lists them), compare_score (compare_importance runs).
        round="all": every round, concatenated."""
        if isinstance(round, str) and round == "all":
            frames = [self.scores(r) for r in self.round_numbers()]
            return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        type_names = self._type_names()
        with self._round_file(round) as f:
            kind, units, scores, _, masks, names = self._round(f, type_names)
            r = int(f.attr("round"))
            compare = f.read("compare/scores", 1, len(units)) if f.has("compare/scores") else None
        n = len(units)
        order = np.argsort(-scores.astype(np.float64), kind="stable")
        rank = np.empty(n, np.int64)
        rank[order] = np.arange(1, n + 1)
        df = pd.DataFrame({"round": np.full(n, r, np.int64), "kind": kind, "layer": units[:, 0].astype(np.int64),
                           "head": units[:, 1].astype(np.int64)})
        empty = pd.Categorical([None] * n, categories=list(names))
        if kind == "head":
            df["type"], df["sender"], df["receiver"] = pd.Categorical.from_codes(units[:, 2], categories=list(names)), empty, empty
        else:
            df["type"] = empty
            df["sender"] = pd.Categorical.from_codes(units[:, 2], categories=list(names))
            df["receiver"] = pd.Categorical.from_codes(units[:, 3], categories=list(names))
        df["score"] = scores.astype(np.float64)
        df["kept"] = self._kept(kind, units, masks)
        df["rank"] = rank
        if compare is not None:
            df["compare_score"] = compare.astype(np.float64)
        return df

    # ---- the circuit ---------------------------------------------------------------------------------
    def circuit(self, round=None):
        """The circuit pruning found (circuit.json), or with round=r the circuit kept after round r (its round
        file's kept masks)."""
        if round is not None:
            with self._round_file(round) as f:
                _, _, _, metrics, masks, names = self._round(f, self._type_names())
                r = int(f.attr("round"))
                mrows = f.attr("metrics_rows", ",".join(METRIC_ROWS)).split(",")
                mcols = f.attr("metrics_columns", ",".join(METRIC_COLUMNS)).split(",")
            l, h, t = np.nonzero(masks["kept/heads"])
            heads = pd.DataFrame({"layer": l.astype(np.int64), "head": h.astype(np.int64),
                                  "type": pd.Categorical.from_codes(t, categories=list(names))})
            edges = self._edge_frame(names, np.nonzero(masks["kept/edges"]) if "kept/edges" in masks else None)
            ld = dict(zip(mcols, metrics[mrows.index("kept")])), dict(zip(mcols, metrics[mrows.index("clean")]))
            faith = float(ld[0]["logit_diff"] / ld[1]["logit_diff"]) if ld[1]["logit_diff"] else float("nan")
            return Circuit(heads, edges, r, "kept/edges" in masks, len(heads), len(edges), faith, f.path)
        path = self.file("circuit.json")
        c = load_json(path)
        names = self._type_names()
        heads_list = field(path, c, "heads", list)
        for i, u in enumerate(heads_list):
            if not (isinstance(u, list) and len(u) == 3 and isinstance(u[2], str) and u[2] in names):
                raise ResultsError(f"{path}: field heads[{i}]: expected [layer, head, type]")
        heads = pd.DataFrame({"layer": [int(u[0]) for u in heads_list], "head": [int(u[1]) for u in heads_list],
                              "type": pd.Categorical([u[2] for u in heads_list], categories=names)})
        edges_list = c.get("edges")
        if edges_list is not None and not isinstance(edges_list, list):
            raise ResultsError(f"{path}: field edges: wrong type")
        for i, u in enumerate(edges_list or []):
            if not (isinstance(u, list) and len(u) == 4 and u[2] in names and u[3] in names):
                raise ResultsError(f"{path}: field edges[{i}]: expected [layer, head, sender, receiver]")
        edges = pd.DataFrame({"layer": [int(u[0]) for u in edges_list or []], "head": [int(u[1]) for u in edges_list or []],
                              "sender": pd.Categorical([u[2] for u in edges_list or []], categories=names),
                              "receiver": pd.Categorical([u[3] for u in edges_list or []], categories=names)})
        return Circuit(heads, edges, int(field(path, c, "round", int)), edges_list is not None,
                       int(field(path, c, "n_head_units", int)), int(field(path, c, "n_edge_units", int)),
                       _nan(field(path, c, "faithfulness_logit_diff", NUMBER)), path,
                       {k: v for k, v in c.items() if k not in ("heads", "edges")})

    @staticmethod
    def _edge_frame(names, nz):
        if nz is None:
            nz = (np.zeros(0, np.int64),) * 4
        l, h, s, r = nz
        return pd.DataFrame({"layer": l.astype(np.int64), "head": h.astype(np.int64),
                             "sender": pd.Categorical.from_codes(s, categories=list(names)),
                             "receiver": pd.Categorical.from_codes(r, categories=list(names))})

    # ---- the config ----------------------------------------------------------------------------------
    @property
    def config(self):
        """The run's config as a dict. A run folder holds no copy of the config file, so this is, in order:
        the file given as open_run(..., config=FILE); the run's sweep-run.json (runs of a sweep); else what
        the run's files record of it (task, model_name, seed, n_prompts, n_shots, donors, plan,
        max_new_tokens, ablations, importance and prune_rounds as run, config_hash), with "_source": "recorded"."""
        for source in ([self._config_file] if self._config_file else []) + [self.file("sweep-run.json")]:
            if source and os.path.exists(source):
                cfg = load_json(source)
                cfg.setdefault("_source", os.fspath(source))
                return cfg
        if self._config_file:
            raise MissingResult(f"{self._config_file}: no such config file")
        cfg = {"_source": "recorded", "output_path": self.path}
        if self.has("prompts.h5"):
            with self._h5("prompts.h5", "edgepatch-prompts") as p:
                for k in ("task", "task_path", "tokenizer_path", "seed", "n_prompts", "n_shots", "config_hash"):
                    if k in p.h5.attrs:
                        cfg[k] = p.attr(k)
                kinds = p.attr("donor_kind_names", "")
                cfg["donors"] = kinds.split(",") if kinds else []
        if self.has("model_logs.json"):
            logs = self.logs
            for k in ("model_name", "task", "n_prompts"):
                if k in logs:
                    cfg.setdefault(k, logs[k])
        if self.has("patch.h5"):
            with self._h5("patch.h5", "edgepatch-patch") as f:
                cfg["plan"] = f.attr("plan", None)
                cfg["max_new_tokens"] = f.attr("max_new_tokens", None)
                abl = self._ablations(f)
            cfg["ablations"] = [{k: v for k, v in r.items() if k not in ("ablation", "h5_group") and v is not None}
                                for r in abl.to_dict("records")]
        rounds = self.rounds() if self.round_numbers() else pd.DataFrame()
        if len(rounds):
            cfg["importance"] = rounds["method"].iloc[0]
            cfg["prune_rounds"] = {"heads": int((rounds["kind"] == "head").sum()), "edges": int((rounds["kind"] == "edge").sum())}
        return cfg

    @property
    def task(self):
        return self.config.get("task")

    @property
    def model_name(self):
        return self.config.get("model_name")


def open_run(path, tokenizer=None, config=None, verify=True):
    """Opens a run folder (edgepatch run's output_path): Run(path, ...)."""
    return Run(path, tokenizer=tokenizer, config=config, verify=verify)
