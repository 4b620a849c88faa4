#!/usr/bin/env python3
"""Redraws a run's report figures with matplotlib, from the edgepatch_results tables.

    redraw_report.py RUN [OUT_DIR]

writes, in OUT_DIR (default: the working directory),
  accuracy_drop.png / .pdf  accuracy drop (full model - ablated) by edge group x layer band, as
                            stages/report.c draws it with gnuplot: every ablation with a group and a band,
                            rows and columns in the order they first appear, a diverging scale centred on
                            0, each cell labelled with its value;
  circuit.png / .pdf        the circuit pruning found: token types as nodes (kept head units and their
                            layers), kept edge units as arrows sender -> receiver labelled with their
                            layers and number of (layer, head) units, thicker for more units.
A figure the run has no data for (no grouped ablations; no circuit.json) is skipped with one line.
Needs matplotlib: pip install 'tools/python[plot]'.
"""

import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

import edgepatch_results as er  # noqa: E402

TYPE_ORDER = ["bos", "x", "t", "y", "n", "query", "last"]
# The report's gnuplot palette: blue (accuracy rises) - white - red (accuracy drops).
DROP_COLOURS = LinearSegmentedColormap.from_list("drop", ["#2166ac", "#f7f7f7", "#b2182b"])


def save(fig, out_dir, stem):
    """Writes stem.png and stem.pdf, each to a temporary name renamed when done."""
    paths = []
    for ext in ("png", "pdf"):
        path = os.path.join(out_dir, f"{stem}.{ext}")
        tmp = f"{path}.tmp-{os.getpid()}"
        fig.savefig(tmp, format=ext, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
        paths.append(path)
    plt.close(fig)
    return paths


def first_seen(values):
    return list(dict.fromkeys(values))


def heatmap(run, out_dir):
    s = run.summary()
    full = s.loc[s.condition == "full_model", "accuracy"].iloc[0]
    a = s[(s.kind == "ablation") & s.group.notna() & s.band.notna()]
    if a.empty:
        print("figures: accuracy_drop skipped: no ablation with a group and a band in this run")
        return []
    groups, bands = first_seen(a.group), first_seen(a.band)
    drop = np.full((len(groups), len(bands)), np.nan)
    for r in a.itertuples():
        drop[groups.index(r.group), bands.index(r.band)] = full - r.accuracy
    most = max(0.05, np.nanmax(np.abs(drop)))
    fig, ax = plt.subplots(figsize=((260 + 130 * len(bands)) / 100, (220 + 55 * len(groups)) / 100))
    im = ax.imshow(np.ma.masked_invalid(drop), cmap=DROP_COLOURS, vmin=-most, vmax=most, aspect="auto")
    for g in range(len(groups)):
        for b in range(len(bands)):
            if np.isfinite(drop[g, b]):
                ax.text(b, g, f"{drop[g, b]:.2f}", ha="center", va="center", fontsize=11)
    ax.set_xticks(range(len(bands)), bands)
    ax.set_yticks(range(len(groups)), groups)
    ax.tick_params(length=0)
    ax.set_xlabel("layers (band)")
    ax.set_ylabel("ablated edges (sender -> receiver)")
    n = int(s.n_prompts.iloc[0])
    ax.set_title(f"{run.config.get('task', '?')}: accuracy drop when an edge group is ablated\n"
                 f"(full-model accuracy {full:.3f} over {n} prompts; drop = full - ablated)", fontsize=11)
    fig.colorbar(im, ax=ax, label="accuracy drop")
    return save(fig, out_dir, "accuracy_drop")


def layer_ranges(layers):
    """Layers as ranges: 0-2,5,7-9."""
    out, ls = [], sorted(set(int(x) for x in layers))
    i = 0
    while i < len(ls):
        j = i
        while j + 1 < len(ls) and ls[j + 1] == ls[j] + 1:
            j += 1
        out.append(f"{ls[i]}-{ls[j]}" if j > i else f"{ls[i]}")
        i = j + 1
    return ",".join(out)


def diagram(run, out_dir):
    if not run.has("circuit.json"):
        print("figures: circuit skipped: no circuit.json (pruning did not run)")
        return []
    c = run.circuit()
    heads, edges = c.heads, c.edges
    pairs = {}
    for (snd, rcv), e in edges.groupby(["sender", "receiver"], observed=True):
        pairs[(str(snd), str(rcv))] = (len(e), layer_ranges(e.layer))
    used = set(heads.type.astype(str)) | {t for p in pairs for t in p}
    nodes = [t for t in TYPE_ORDER if t in used]
    # Nodes on a circle in token order (bos at the left, going clockwise), so no arrow runs through a node.
    angle = {t: np.pi - 2 * np.pi * i / max(len(nodes), 1) for i, t in enumerate(nodes)}
    pos = {t: (np.cos(angle[t]), np.sin(angle[t])) for t in nodes}
    fig, ax = plt.subplots(figsize=(9, 7.5))
    most = max([n for n, _ in pairs.values()] + [1])
    for (snd, rcv), (n, ranges) in pairs.items():
        width = 1.0 + 4.0 * n / most
        (x1, y1), (x2, y2) = pos[snd], pos[rcv]
        if snd == rcv:  # a loop outside the circle
            ux, uy = x1, y1
            # start and end on the box's edge (half-extents 0.2 x 0.12), either side of the outward direction
            edge = min(0.2 / abs(ux) if abs(ux) > 1e-9 else np.inf, 0.12 / abs(uy) if abs(uy) > 1e-9 else np.inf) + 0.01
            ax.add_patch(FancyArrowPatch((x1 + edge * ux - 0.07 * uy, y1 + edge * uy + 0.07 * ux),
                                         (x1 + edge * ux + 0.07 * uy, y1 + edge * uy - 0.07 * ux),
                                         connectionstyle="arc3,rad=-1.6", arrowstyle="-|>", mutation_scale=12,
                                         lw=width, color="#08519c", shrinkA=0, shrinkB=0))
            lx, ly = x1 + (edge + 0.2) * ux, y1 + (edge + 0.2) * uy
        else:
            rad = 0.2
            ax.add_patch(FancyArrowPatch((x1, y1), (x2, y2), connectionstyle=f"arc3,rad={rad}", arrowstyle="-|>",
                                         mutation_scale=14, lw=width, color="#08519c", shrinkA=34, shrinkB=34))
            # the quadratic Bezier's midpoint (matplotlib's arc3 control point: mid + rad * (dy, -dx))
            lx, ly = (x1 + x2) / 2 + 0.5 * rad * (y2 - y1), (y1 + y2) / 2 - 0.5 * rad * (x2 - x1)
        ax.text(lx, ly, f"L {ranges}\n({n})", ha="center", va="center", fontsize=8,
                bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))
    for t in nodes:
        h = heads[heads.type == t]
        x, y = pos[t]
        label = f"{t}\n{len(h)} head units\nL {layer_ranges(h.layer) or '-'}"
        ax.add_patch(FancyBboxPatch((x - 0.2, y - 0.12), 0.4, 0.24, boxstyle="round,pad=0.02", fc="#deebf7", ec="#333333"))
        ax.text(x, y, label, ha="center", va="center", fontsize=9)
    ax.set_xlim(-1.6, 1.6)
    ax.set_ylim(-1.45, 1.45)
    ax.set_aspect("equal")
    ax.axis("off")
    note = "" if c.edges_pruned else "\n(head pruning only: no edge units were pruned)"
    ax.set_title(f"{run.config.get('task', '?')} circuit after pruning round {c.round}: {c.n_head_units} head units, "
                 f"{c.n_edge_units} edge units kept (faithfulness {c.faithfulness_logit_diff:.3f})\n"
                 f"nodes: token types (kept head units, layers); arrows: kept edges sender -> receiver "
                 f"(layers L, number of (layer, head) units){note}", fontsize=9)
    return save(fig, out_dir, "circuit")


def main(argv):
    if len(argv) not in (2, 3) or argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr if len(argv) not in (2, 3) else sys.stdout)
        return 0 if len(argv) == 2 else 2
    out_dir = argv[2] if len(argv) == 3 else "."
    try:
        run = er.open_run(argv[1])
        os.makedirs(out_dir, exist_ok=True)
        for path in heatmap(run, out_dir) + diagram(run, out_dir):
            print(f"figures: {path}")
    except er.ResultsError as e:
        print(f"redraw_report: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
