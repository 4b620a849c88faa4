#!/usr/bin/env python3
"""The layers' include matrix (docs/architecture.md): every #include of the program's sources against
the allowed order, bottom to top

    kernels/ -> pipeline/ -> stages/ -> sched/ -> sched/cli/ (the command line)

A file may include its own layer's headers and those of the layers below it, never one above. The
libraries behind a system header are owned too: MPI and NCCL only in sched/comm.c (the one module that
talks between ranks), the CUDA runtime and cuBLAS only in the kernels' CUDA backend (and comm.c, for
NCCL's device buffers), HDF5 only in pipeline/h5store (the store), BLAS only in kernels/. The link-time
half of the same check is CMakeLists.txt's layer_check_<layer> programs.

    python3 tests/check_layers.py [ROOT]      # exit 1 and one line per violation
    python3 tests/check_layers.py --self-test  # plants violations in a copy: each must be found
"""
import os
import re
import shutil
import sys
import tempfile

LAYERS = ["kernels", "pipeline", "stages", "sched", "sched/cli"]
# System headers that belong to one module: header -> files that may include it.
OWNED = {
    "mpi.h": {"sched/comm.c"},
    "nccl.h": {"sched/comm.c"},
    "cuda_runtime.h": {"kernels/ops_cuda.cu", "sched/comm.c"},
    "cuda_bf16.h": {"kernels/ops_cuda.cu"},
    "cublas_v2.h": {"kernels/ops_cuda.cu"},
    "hdf5.h": {"pipeline/h5store.h"},
    "hdf5_hl.h": {"pipeline/h5store.c"},
    "cblas.h": {"kernels/cpu_gemm.c"},
}
INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', re.M)
SOURCE = (".c", ".h", ".cu")


def layer_of(path):
    """The layer index of a repository path (the deepest matching folder), or None outside them."""
    best = None
    for i, name in enumerate(LAYERS):
        if path.startswith(name + "/") and "/" not in path[len(name) + 1:]:
            best = i
    return best


def check(root):
    problems = []
    for top in ("kernels", "pipeline", "stages", "sched"):
        for dirpath, _, files in os.walk(os.path.join(root, top)):
            for f in sorted(files):
                if not f.endswith(SOURCE):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/")
                mine = layer_of(rel)
                if mine is None:
                    problems.append(f"{rel}: not in a layer (a folder that is not one of {', '.join(LAYERS)})")
                    continue
                text = open(os.path.join(dirpath, f), encoding="utf-8", errors="replace").read()
                for m in INCLUDE.finditer(text):
                    kind, header = m.group(1), m.group(2)
                    line = text.count("\n", 0, m.start()) + 1
                    if kind == "<":
                        owners = OWNED.get(header)
                        if owners is not None and rel not in owners:
                            problems.append(f"{rel}:{line}: includes <{header}>, which only {', '.join(sorted(owners))} may")
                        continue
                    if "/" not in header:  # a sibling header of the same folder
                        continue
                    theirs = layer_of(header)
                    if theirs is None:
                        problems.append(f"{rel}:{line}: includes \"{header}\", which is in no layer")
                    elif theirs > mine:
                        problems.append(f"{rel}:{line}: includes \"{header}\": {LAYERS[mine]}/ may not use "
                                        f"{LAYERS[theirs]}/, a layer above it")
    return problems


def self_test(root):
    """Each planted violation must be reported, and only it: the check can fail."""
    plants = [
        ("pipeline/forward.c", '#include "stages/plan.h"\n', "pipeline/ may not use stages/"),
        ("kernels/ops_ref.c", '#include "pipeline/error.h"\n', "kernels/ may not use pipeline/"),
        ("stages/cache.c", '#include "sched/comm.h"\n', "stages/ may not use sched/"),
        ("sched/sweep.c", '#include "sched/cli/cli.h"\n', "sched/ may not use sched/cli/"),
        ("stages/patch.c", "#include <mpi.h>\n", "includes <mpi.h>"),
    ]
    ok = True
    for path, line, expect in plants:
        with tempfile.TemporaryDirectory() as tmp:
            for top in ("kernels", "pipeline", "stages", "sched"):
                shutil.copytree(os.path.join(root, top), os.path.join(tmp, top))
            with open(os.path.join(tmp, path), "a") as f:
                f.write(line)
            found = check(tmp)
            hit = [p for p in found if p.startswith(path) and expect in p]
            if not hit or len(found) != 1:
                print(f"self-test: planting {line.strip()} in {path} gave {found or 'nothing'}")
                ok = False
    return ok


def main():
    args = sys.argv[1:]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if args and args[0] == "--self-test":
        if check(root):
            print("self-test needs a clean tree first:", *check(root), sep="\n  ")
            return 1
        if not self_test(root):
            return 1
        print("check_layers: self-test passed (5 planted violations found)")
        return 0
    if args:
        root = args[0]
    problems = check(root)
    for p in problems:
        print(p)
    if problems:
        print(f"check_layers: {len(problems)} include(s) against the layer order (docs/architecture.md)")
        return 1
    print("check_layers: every include follows the layer order")
    return 0


if __name__ == "__main__":
    sys.exit(main())
