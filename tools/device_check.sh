#!/usr/bin/env bash
# device_check: the GPU check of the CUDA backend (docs/cuda.md), in two halves, because the lent GPU
# image has CUDA, PyTorch and transformers but none of our build dependencies and no network.
#
#   bash tools/device_check.sh pack   On a machine with the build dependencies (tools/setup.sh) and nvcc:
#                                     builds the tests and benchmarks with CUDA for sm_90, strips them
#                                     and packs them, the host libraries the image lacks and the wheels
#                                     of transformers 4.44.2 (the version the fixtures and the original
#                                     code use, unpacked) into one archive, .device/device.tar.xz (git-ignored;
#                                     carry .device to the GPU machine). It prints what travels (the
#                                     working tree plus the archive) and fails if that is over 64 MiB,
#                                     the device tool's limit.
#   bash tools/device_check.sh        On the GPU machine, from the repository root: unpacks the archive,
#                                     runs a few-second preflight (GPU visible; cudart, cuBLAS, NCCL
#                                     found; every carried binary's libraries resolve; the image's torch
#                                     sees CUDA and transformers 4.44.2's Gemma-2 module imports) that
#                                     stops with one line naming what is missing, then, under one
#                                     deadline: test_ops (the gradient ops too), test_model and test_patch (every backend
#                                     against the reference, HF and the Python patching reference: the
#                                     cuda rows are the GPU's), test_upload (weights from the mapping to
#                                     the GPU, byte-identical to the host model's upload), test_tp --nccl
#                                     (tensor parallelism over NCCL: every GPU in one group, or a group
#                                     of one), `edgepatch run` on the cuda backend against the cpu backend
#                                     (tiny Gemma-2 fixture: cache, patch, an exact prune round),
#                                     an attribution prune run (heads then edges, tiny Gemma-2) on cpu
#                                     fp32, cuda fp32 and cuda bf16: each round's scores cuda vs cpu
#                                     within 1e-4 of the largest, bf16 vs fp32 Spearman >= 0.99 over
#                                     round 0's head units (attrib_check below),
#                                     bench_ops (fp32 and bf16 products at Gemma-2 2B shapes),
#                                     tools/device_check.py (random-weight Gemma-2 2B and SmolLM2-135M
#                                     made on the spot: our CUDA forward and patched forward in fp32 and
#                                     bf16 against HF transformers on the same GPU and against our cpu,
#                                     and timed against HF eager patching; one attribution round
#                                     (bench_backward --model) against torch autograd through HF eager
#                                     with hook patching: fp32 head scores, bf16 rank agreement, the
#                                     time ratio and the memory; one table), compute-sanitizer
#                                     memcheck on test_ops when installed (racecheck only on request). It
#                                     ends with the seconds each part took, to plan the next run.
#   bash tools/device_check.sh trim   Here, right before the device call, when pack says the tree is too
#                                     big: deletes from the working tree the tracked fixtures no part of
#                                     the check reads (DEVICE_UNUSED: the tokenizer parity and SmolLM2
#                                     fixtures, 22 MiB), so the device tool does not carry them, and
#                                     prints what travels now. `git checkout -- tests/fixtures` after the
#                                     call brings them back (they are tracked).
#   bash tools/device_check.sh attrib-local [BACKEND]
#                                     A dry run of the attribution rows on this machine: build/'s
#                                     edgepatch, BACKEND (default offset; or cpu) standing in for cuda.
#
# The log is written to $OUT/device_check.log (when $OUT is set) from its first line, so a run killed at
# the call's timeout still returns what it printed. Exit status of the check: 0 all passed; 1 a test
# failed or no cuda row ran; 2 device_check.py failed; 3 .device/ missing (run the pack half first);
# 4 the preflight failed; 6 compute-sanitizer found an error. Environment:
#   DEVICE_CHECK_TIMEOUT_S   the device call's timeout_s (default 600); the check's deadline is 60 s
#                            under it, so the summary and the timings are always printed
#   DEVICE_CHECK_DEADLINE_S  an earlier deadline (never later than the one above)
#   DEVICE_CHECK_RACECHECK=1 also run compute-sanitizer racecheck (slow: minutes)
#   DEVICE_CHECK_ARGS        extra arguments for device_check.py, e.g. "--batch 32"
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

BINS="edgepatch edgepatch-core tests/test_ops tests/test_model tests/test_patch tests/test_metrics tests/test_fv tests/test_upload tests/test_tp bench/bench_ops bench/bench_patch bench/bench_backward"

# The device tool carries the working tree and the carried paths, together at most 64 MiB.
CARRY_LIMIT_MIB=64
# Tracked paths no part of the GPU check reads (none of BINS' tests, device_check.py or the runs below).
DEVICE_UNUSED="tests/fixtures/tokenizers tests/fixtures/smollm2"

# What the device tool will carry: every file git does not ignore (and that exists), and .device.
carried() {
    local tree archive
    tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
    archive=$(stat -c %s .device/device.tar.xz 2>/dev/null || echo 0)
    awk -v t="$tree" -v a="$archive" -v l="$CARRY_LIMIT_MIB" -v w="$1" 'BEGIN {
        m = 1048576; printf "device_check %s: working tree %.1f MiB + .device/device.tar.xz %.1f MiB = %.1f MiB (limit %d MiB)\n", w, t / m, a / m, (t + a) / m, l }'
    [ $((tree + archive)) -le $((CARRY_LIMIT_MIB * 1048576)) ]
}

trim() {
    rm -rf $DEVICE_UNUSED
    carried trim || { echo "device_check trim: still over the device tool's $CARRY_LIMIT_MIB MiB" >&2; return 1; }
    echo "device_check trim: after the device call, 'git checkout -- tests/fixtures' restores $DEVICE_UNUSED"
}

pack() {
    set -e
    cmake -S . -B build-device -DWITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=RelWithDebInfo \
        -DCMAKE_COMPILE_WARNING_AS_ERROR=ON >/dev/null
    cmake --build build-device -j "$(nproc)" --target $(for b in $BINS; do basename "$b"; done) >/dev/null
    local stage=build-device/pack
    rm -rf .device "$stage" && mkdir -p .device "$stage/lib" "$stage/site"
    for b in $BINS; do cp "build-device/$b" "$stage/"; done
    # Debug info is most of a RelWithDebInfo binary and the GPU run needs none of it.
    strip --strip-unneeded "$stage"/edgepatch "$stage"/edgepatch-core "$stage"/test_* "$stage"/bench_*
    # Every shared library the binaries load except glibc's, the C++ runtime's and CUDA's (cudart, cuBLAS,
    # NCCL: the GPU machine's own are used): OpenBLAS, MPI, HDF5, jansson, PCRE2 and what they pull in.
    for lib in $(ldd "$stage"/edgepatch-core "$stage"/test_* "$stage"/bench_* | awk '/=>/ {print $3}' | sort -u |
        grep -Ev '/(libc|libm|libdl|libpthread|librt|libresolv|ld-linux[^/]*|libstdc\+\+|libgcc_s|libcudart|libcublas|libcublasLt|libnccl)\.so'); do
        cp -L "$lib" "$stage/lib/"
    done
    strip --strip-unneeded "$stage"/lib/*
    # The image's python is 3.12 with transformers 5; the check uses 4.44.2 and what it pins. Unpacked
    # here: xz packs the sources to 5.5 MB where the wheels (zip) take 13 MB, and the GPU half then needs
    # no pip, only PYTHONPATH.
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$stage/wheels" \
        transformers==4.44.2 tokenizers==0.19.1 huggingface_hub==0.24.6
    local whl
    for whl in "$stage"/wheels/*.whl; do python3 -m zipfile -e "$whl" "$stage/site/"; done
    rm -rf "$stage/wheels"
    tar cf - -C "$stage" . | xz -9 -T0 > .device/device.tar.xz
    rm -rf "$stage"
    if ! carried pack; then
        echo "device_check pack: over the device tool's $CARRY_LIMIT_MIB MiB: it would not travel; 'bash tools/device_check.sh trim' before the call leaves out $DEVICE_UNUSED" >&2
        return 1
    fi
}

# Parts and their seconds, for the table at the end (each section closes the one before).
PARTS=()
section() {
    [ ${#PARTS[@]} -gt 0 ] && PARTS[-1]="${PARTS[-1]}|$((SECONDS - PART_T0))"
    PART_T0=$SECONDS
    PARTS+=("$1")
    printf '\n==== %s (t=%ds)\n' "$1" "$SECONDS"
}
timings() {
    section "timings (seconds per part)"
    local p
    for p in "${PARTS[@]}"; do
        [[ $p == *"|"* ]] && printf '%6s s  %s\n' "${p##*|}" "${p%|*}"
    done
    printf '%6s s  in all (deadline %d s)\n' "$SECONDS" "$DEADLINE_S"
}

# Seconds a step may take: its own cap, but never past the overall deadline (past it: 1, so it fails fast).
budget() {
    local cap=$1 left=$((DEADLINE_S - SECONDS))
    [ "$left" -lt 1 ] && left=1
    [ "$cap" -lt "$left" ] && echo "$cap" || echo "$left"
}

# A few seconds that tell whether the rest can run at all; the first thing missing is one line, status 4.
preflight() {
    section "preflight"
    date -u
    local gpus
    gpus=$(timeout 20 nvidia-smi -L 2>&1) || { echo "device_check preflight: nvidia-smi failed: ${gpus%%$'\n'*}"; return 4; }
    echo "$gpus"
    grep -q '^GPU' <<< "$gpus" || { echo "device_check preflight: no GPU visible (nvidia-smi -L lists none)"; return 4; }
    local libpath=$PWD/.device/lib name f missing
    for name in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libnccl.so.2; do
        f=$(find /usr/local /usr/lib /opt -name "$name*" 2>/dev/null | head -1)
        [ -n "$f" ] || { echo "device_check preflight: $name not found under /usr/local, /usr/lib or /opt"; return 4; }
        echo "$name: $f"
        libpath=$libpath:$(dirname "$f")
    done
    # Only our binaries see the carried libraries (python keeps the machine's own).
    export EP_DEVICE_LIBS=$libpath
    missing=$(bin ldd .device/edgepatch-core .device/test_* .device/bench_* 2>&1 | grep "not found" | sort -u | head -3)
    [ -z "$missing" ] || { echo "device_check preflight: a carried binary's library is missing: $(echo $missing)"; return 4; }
    # The carried transformers 4.44.2 and what it pins, ahead of the image's own.
    export PYTHONPATH=$PWD/.device/site${PYTHONPATH:+:$PYTHONPATH}
    timeout 90 python3 - <<'PY' || return 4
import sys
try:
    import numpy, torch, transformers
    from transformers.models.gemma2 import modeling_gemma2  # noqa: F401 (the module device_check.py patches)
except Exception as e:
    sys.exit(f"device_check preflight: python cannot import what device_check.py needs: {type(e).__name__}: {e}")
if transformers.__version__ != "4.44.2":
    sys.exit(f"device_check preflight: transformers {transformers.__version__} imported, not the carried 4.44.2")
if not torch.cuda.is_available():
    sys.exit(f"device_check preflight: torch {torch.__version__} sees no CUDA device")
print(f"python {sys.version.split()[0]}, torch {torch.__version__} on {torch.cuda.get_device_name(0)}, transformers {transformers.__version__}")
PY
}

bin() { LD_LIBRARY_PATH=$EP_DEVICE_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} "$@"; }

# Attribution on the GPU (issue 18's device rows): an attribution prune run, heads then edges (tiny Gemma-2
# fixture), on cpu fp32, on $2 fp32 and on $2 bf16 ($1: the folder with edgepatch; $2: cuda on the GPU
# machine, another backend for a dry run here). Each round file's scores on $2 fp32 against cpu's,
# unit by unit (matched by layer, head, type / sender, receiver), within 1e-4 of the round's largest |cpu
# score| (a round whose unit set differs, because an earlier round kept other units, is a failure too);
# then bf16 against fp32 on $2: Spearman rank correlation over all head units of round 0 >= 0.99
# (average ranks for ties). From `edgepatch scores RUN --round R --json` in python without numpy or
# h5py (the GPU image has no h5py), as the exact round's check above.
attrib_check() {
    local bindir=$1 dev=$2 dir=/tmp/ep-attrib-check rc=0 name be dt r
    rm -rf "$dir" && mkdir -p "$dir"
    for name in cpu-fp32 "$dev-fp32" "$dev-bf16"; do
        be=${name%-*} dt=${name##*-}
        printf '{"task": "person_sport", "model_name": "gemma2_prune_heads_in_circuits", "model_path": "tests/fixtures/models/gemma2-tiny", "output_path": "%s/%s", "n_prompts": 8, "batch_size": 4, "seed": 3, "n_shots": 3, "max_new_tokens": 3, "affect_whom": [["x", "y"]], "importance": "attribution", "prune_rounds": {"heads": 1, "edges": 1}, "prune_fraction": 0.3, "backend": "%s", "dtype": "%s"}\n' \
            "$dir" "$name" "$be" "$dt" > "$dir/$name.json"
        OPENBLAS_NUM_THREADS=8 bin timeout "$(budget 120)" "$bindir/edgepatch" run "$dir/$name.json" > "$dir/$name.out" 2>&1 ||
            { echo "edgepatch run ($name, attribution) failed: $(tail -3 "$dir/$name.out")"; rc=1; }
        for r in 0 1; do
            bin "$bindir/edgepatch" scores "$dir/$name" --round $r --json > "$dir/$name.r$r.json" 2>&1 ||
                { echo "edgepatch scores ($name, round $r) failed: $(head -c 300 "$dir/$name.r$r.json")"; rc=1; }
        done
    done
    python3 - "$dir" cpu-fp32 "$dev-fp32" "$dev-bf16" <<'PY' || rc=1
import json, sys
d, ref, fp32, bf16 = sys.argv[1:5]

def load(name, r):
    try:
        j = json.load(open(f"{d}/{name}.r{r}.json"))
    except Exception as e:
        sys.exit(f"attribution check: {name} round {r}: no scores ({type(e).__name__}: {e})")
    key = lambda u: (u["layer"], u["head"], u.get("type"), u.get("sender"), u.get("receiver"))
    return j["kind"], j["method"], {key(u): u["score"] for u in j["units"]}

def ranks(xs):  # average ranks, ties shared
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r, i = [0.0] * len(xs), 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2
        i = j + 1
    return r

def spearman(a, b):
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / (va * vb) ** 0.5 if va > 0 and vb > 0 else float("nan")

ok = True
for r in (0, 1):
    kind, method, a = load(ref, r)
    _, method_b, b = load(fp32, r)
    if method != "attribution" or method_b != "attribution":
        print(f"round {r}: scored by {method} / {method_b}, not attribution: FAIL"); ok = False; continue
    if set(a) != set(b):
        print(f"round {r} ({kind}): {fp32} scored {len(b)} units, cpu {len(a)}; {len(set(a) ^ set(b))} differ: FAIL")
        ok = False; continue
    scale = max(abs(x) for x in a.values()) or 1.0
    err = max(abs(a[k] - b[k]) for k in a) / scale
    good = err <= 1e-4
    ok &= good
    print(f"attribution round {r} ({kind} units, {len(a)}): {fp32} vs cpu fp32: max error {err:.2e} of the largest "
          f"({scale:.3e}), limit 1e-4: {'ok' if good else 'FAIL'}")
_, _, a = load(fp32, 0)
_, _, c = load(bf16, 0)
if set(a) != set(c):
    print(f"round 0: {bf16} scored other units than {fp32}: FAIL"); ok = False
else:
    keys = sorted(a)
    rho = spearman([a[k] for k in keys], [c[k] for k in keys])
    scale = max(abs(x) for x in a.values()) or 1.0
    err = max(abs(a[k] - c[k]) for k in keys) / scale
    good = rho >= 0.99
    ok &= good
    print(f"attribution round 0 ({len(keys)} head units): {bf16} vs {fp32}: Spearman {rho:.4f}, limit 0.99: "
          f"{'ok' if good else 'FAIL'} (max score difference {err:.2e} of the largest)")
sys.exit(0 if ok else 1)
PY
    return $rc
}

check_parts() {
    local timeout_s=${DEVICE_CHECK_TIMEOUT_S:-600}
    DEADLINE_S=$((timeout_s - 60))
    [ -n "${DEVICE_CHECK_DEADLINE_S:-}" ] && [ "$DEVICE_CHECK_DEADLINE_S" -lt "$DEADLINE_S" ] && DEADLINE_S=$DEVICE_CHECK_DEADLINE_S
    [ -f .device/device.tar.xz ] || { echo "device_check: no .device/device.tar.xz here: run 'bash tools/device_check.sh pack' first and carry .device"; return 3; }
    section "unpack"
    timeout 120 tar xJf .device/device.tar.xz -C .device || { echo "device_check: .device/device.tar.xz did not unpack"; return 3; }
    du -sh .device
    preflight || return $?

    local rc_test=0 t log
    for t in test_ops test_model test_patch test_metrics test_fv test_upload; do
        section "$t"
        log=$(mktemp)
        OPENBLAS_NUM_THREADS=8 bin timeout "$(budget 150)" ".device/$t" 2>&1 | tee "$log" | grep -E "cuda|FAIL|passed"
        [ "${PIPESTATUS[0]}" -ne 0 ] && rc_test=1
        grep -q " cuda " "$log" || { echo "device_check: $t ran no cuda row: the cuda backend did not come up"; rc_test=1; }
        # test_ops' cuda rows include the gradient ops (issue 18 item 2: linear/norm/rope/pointwise
        # backward, attention backward with donor sources, head and edge scores); say so if they did not run.
        if [ "$t" = test_ops ] && ! grep -q "cuda  *attn_back" "$log"; then
            echo "device_check: test_ops ran no cuda gradient rows (attn_back, edge_scores, ...)"; rc_test=1
        fi
        rm -f "$log"
    done

    # Tensor parallelism over NCCL (docs/tensor_parallel.md): all GPUs in one group, one rank each, where
    # the machine has several and mpirun; otherwise a group of one, which still runs the NCCL communicator
    # (all-reduce, all-gather of device buffers) and the shard's forward on the GPU.
    local n_gpus
    n_gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
    command -v mpirun >/dev/null 2>&1 || n_gpus=1
    section "test_tp --nccl (tensor parallelism over NCCL, a group of $((n_gpus > 1 ? n_gpus : 1)))"
    if [ "$n_gpus" -gt 1 ]; then
        OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OPENBLAS_NUM_THREADS=1 bin timeout "$(budget 90)" \
            mpirun -np "$n_gpus" -x LD_LIBRARY_PATH .device/test_tp --nccl
    else
        OPENBLAS_NUM_THREADS=1 bin timeout "$(budget 90)" .device/test_tp --nccl
    fi
    [ $? -ne 0 ] && rc_test=1

    # The pipeline on the GPU: the same run config on the cuda and the cpu backend (backend is not part of
    # a run's identity, so each gets its own folder) gives the same figures and scores within fp32 noise.
    section "edgepatch run: cuda backend vs cpu backend (tiny Gemma-2, cache + patch + exact prune round)"
    local be dir=/tmp/ep-run-check
    rm -rf "$dir" && mkdir -p "$dir"
    for be in cpu cuda; do
        printf '{"task": "person_sport", "model_name": "gemma2_prune_heads_in_circuits", "model_path": "tests/fixtures/models/gemma2-tiny", "output_path": "%s/%s", "n_prompts": 8, "batch_size": 4, "seed": 3, "n_shots": 3, "max_new_tokens": 3, "affect_whom": [["x", "y"]], "importance": "exact", "prune_rounds": {"heads": 1, "edges": 0}, "prune_fraction": 0.3, "backend": "%s"}\n' \
            "$dir" "$be" "$be" > "$dir/$be.json"
        OPENBLAS_NUM_THREADS=8 bin timeout "$(budget 120)" .device/edgepatch run "$dir/$be.json" > "$dir/$be.out" 2>&1 ||
            { echo "edgepatch run ($be) failed: $(tail -3 "$dir/$be.out")"; rc_test=1; }
        bin .device/edgepatch scores "$dir/$be" --round 0 --json > "$dir/$be.scores.json" 2>&1 || rc_test=1
    done
    python3 - "$dir" <<'PY' || rc_test=1
import json, sys
d = sys.argv[1]
logs = [json.load(open(f"{d}/{b}/model_logs.json")) for b in ("cpu", "cuda")]
scores = [json.load(open(f"{d}/{b}.scores.json")) for b in ("cpu", "cuda")]
worst = max(abs(logs[0][k] - logs[1][k]) for k in logs[0] if isinstance(logs[0][k], float) and isinstance(logs[1].get(k), float))
sa, sb = ([u["score"] for u in s["units"]] for s in scores)
scale = max(abs(x) for x in sa) or 1.0
err = max(abs(x - y) for x, y in zip(sa, sb)) / scale
ok = worst <= 1e-4 and err <= 1e-4 and len(sa) == len(sb)
print(f"model_logs figures: max |cuda - cpu| {worst:.2e}; {len(sa)} head scores: max error {err:.2e} of the largest: {'ok' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
PY

    section "edgepatch run: attribution prune (heads then edges), cuda fp32 / bf16 vs cpu fp32 (tiny Gemma-2)"
    attrib_check .device cuda || rc_test=1

    section "bench_ops (ms per call; ratio = cpu / cuda)"
    OPENBLAS_NUM_THREADS=$(nproc) bin timeout "$(budget 150)" .device/bench_ops

    section "device_check.py (HF transformers on this GPU)"
    OPENBLAS_NUM_THREADS=$(nproc) PYTHONUNBUFFERED=1 timeout "$(budget 400)" python3 tools/device_check.py \
        --bin .device ${DEVICE_CHECK_ARGS:-}
    local rc_py=$?

    local rc_san=0 tool
    if command -v compute-sanitizer >/dev/null 2>&1; then
        local tools=memcheck
        [ "${DEVICE_CHECK_RACECHECK:-0}" = 1 ] && tools="memcheck racecheck"
        for tool in $tools; do
            [ $((DEADLINE_S - SECONDS)) -lt 40 ] && { echo "compute-sanitizer $tool: out of time, not run"; continue; }
            section "compute-sanitizer --tool $tool test_ops"
            # EP_CUDA_POOL=0: plain cudaMalloc per buffer, so memcheck sees each buffer's bounds (a pool's
            # slab would hide an overrun into a neighbouring buffer; docs/cuda.md "Device memory").
            EP_CUDA_POOL=0 OPENBLAS_NUM_THREADS=8 bin timeout "$(budget 120)" compute-sanitizer --tool "$tool" --error-exitcode 86 \
                .device/test_ops 2>&1 | tail -n 4
            [ "${PIPESTATUS[0]}" -eq 86 ] && rc_san=6
        done
    fi
    section "summary"
    echo "tests: $([ $rc_test = 0 ] && echo pass || echo FAIL)  device_check.py: $([ $rc_py = 0 ] && echo pass || echo "FAIL ($rc_py)")  sanitizer: $([ $rc_san = 0 ] && echo clean || echo ERRORS)"
    [ $rc_test != 0 ] && return 1
    [ $rc_py != 0 ] && return 2
    return $rc_san
}

# The table of seconds per part comes last whatever happened before it.
check() {
    check_parts
    local rc=$?
    timings
    return $rc
}

if [ "${1:-}" = pack ]; then
    pack
    exit $?
fi
# A dry run of the attribution rows on this machine: build/'s edgepatch, BACKEND (offset, cpu) for cuda.
if [ "${1:-}" = trim ]; then
    trim
    exit $?
fi
if [ "${1:-}" = attrib-local ]; then
    EP_DEVICE_LIBS= DEADLINE_S=$((SECONDS + 600))
    attrib_check build "${2:-offset}"
    rc=$?
    echo "device_check attrib-local: exit status $rc"
    exit "$rc"
fi
# The log goes into $OUT as it is written, so a run killed at the call's timeout still brings it back.
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && log=$OUT/device_check.log; else log=$(mktemp /tmp/device_check.XXXXXX); fi
check 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
echo "device_check: exit status $rc" | tee -a "$log"
[ -z "${OUT:-}" ] && echo "device_check: log in $log"
exit "$rc"
