#!/usr/bin/env bash
# device_check: the GPU check of the CUDA backend (docs/cuda.md), in two halves, because the lent GPU
# image has CUDA, PyTorch and transformers but none of our build dependencies and no network.
#
#   bash tools/device_check.sh pack   On a machine with the build dependencies (tools/setup.sh) and nvcc:
#                                     builds the tests and benchmarks with CUDA for sm_90 and puts them,
#                                     the host libraries the image lacks and the wheels of transformers
#                                     4.44.2 (the version the fixtures and the original code use) into
#                                     .device/ (git-ignored; carry it to the GPU machine).
#   bash tools/device_check.sh        On the GPU machine, from the repository root: runs, under one
#                                     deadline, test_ops, test_model and test_patch (every backend against
#                                     the reference, HF and the Python patching reference: the cuda rows
#                                     are the GPU's), test_upload (weights from the mapping to the GPU,
#                                     byte-identical to the host model's upload), test_tp --nccl (tensor
#                                     parallelism over NCCL: every GPU in one group, or a group of one),
#                                     `edgepatch run` on the cuda backend against the cpu backend (tiny
#                                     Gemma-2 fixture: cache, patch, an exact prune round), bench_ops (fp32
#                                     and bf16 products at Gemma-2 2B shapes), tools/device_check.py (random-weight Gemma-2 2B and
#                                     SmolLM2-135M made on the spot: our CUDA forward and patched forward
#                                     in fp32 and bf16 against HF transformers on the same GPU and against
#                                     our cpu, and timed against HF eager patching; one table), and
#                                     compute-sanitizer memcheck/racecheck on test_ops when installed.
#
# Exit status of the check: 0 all passed; 1 a test failed or no cuda row ran; 2 device_check.py failed;
# 3 .device/ missing (run the pack half first); 6 compute-sanitizer found an error. The log goes to
# $OUT/device_check.log when $OUT is set. Environment: DEVICE_CHECK_DEADLINE_S (default 480),
# DEVICE_CHECK_ARGS (extra arguments for device_check.py, e.g. "--batch 32").
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

BINS="edgepatch tests/test_ops tests/test_model tests/test_patch tests/test_upload tests/test_tp bench/bench_ops bench/bench_patch"

pack() {
    set -e
    cmake -S . -B build-device -DWITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=RelWithDebInfo \
        -DCMAKE_COMPILE_WARNING_AS_ERROR=ON >/dev/null
    cmake --build build-device -j "$(nproc)" --target $(for b in $BINS; do basename "$b"; done) >/dev/null
    rm -rf .device && mkdir -p .device/lib .device/wheels
    for b in $BINS; do cp "build-device/$b" .device/; done
    # Every shared library the binaries load except glibc's, the C++ runtime's and CUDA's (cudart, cuBLAS,
    # NCCL: the GPU machine's own are used): OpenBLAS, MPI, HDF5, jansson, PCRE2 and what they pull in.
    for lib in $(ldd .device/edgepatch .device/test_* .device/bench_* | awk '/=>/ {print $3}' | sort -u |
        grep -Ev '/(libc|libm|libdl|libpthread|librt|libresolv|ld-linux[^/]*|libstdc\+\+|libgcc_s|libcudart|libcublas|libcublasLt|libnccl)\.so'); do
        cp -L "$lib" .device/lib/
    done
    tar cJf .device/lib.tar.xz -C .device lib && rm -rf .device/lib
    # The image's python is 3.12 with transformers 5; the check uses 4.44.2 and what it pins.
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .device/wheels \
        transformers==4.44.2 tokenizers==0.19.1 huggingface_hub==0.24.6
    du -sh .device
}

section() { printf '\n==== %s (t=%ds)\n' "$1" "$SECONDS"; }

# Seconds a step may take: its own cap, but never past the overall deadline (at least 5).
budget() {
    local cap=$1 left=$((DEADLINE_S - SECONDS))
    [ "$left" -lt 5 ] && left=5
    [ "$cap" -lt "$left" ] && echo "$cap" || echo "$left"
}

check() {
    DEADLINE_S=${DEVICE_CHECK_DEADLINE_S:-480}
    [ -x .device/test_ops ] || { echo "device_check: no .device/ here: run 'bash tools/device_check.sh pack' first"; return 3; }
    section "environment"
    date -u
    nvidia-smi -L 2>&1
    [ -d .device/lib ] || tar xJf .device/lib.tar.xz -C .device
    local libpath=$PWD/.device/lib name f
    for name in libcublasLt.so.13 libcublas.so.13 libcudart.so.13 libnccl.so.2; do
        f=$(find /usr/local /usr/lib /opt -name "$name*" 2>/dev/null | head -1)
        echo "$name: ${f:-NOT FOUND}"
        [ -n "$f" ] && libpath=$libpath:$(dirname "$f")
    done
    # Only our binaries see the carried libraries (python keeps the machine's own).
    export EP_DEVICE_LIBS=$libpath
    bin() { LD_LIBRARY_PATH=$EP_DEVICE_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} "$@"; }
    bin ldd .device/test_ops .device/test_tp | grep "not found"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ep-site \
        .device/wheels/*.whl && export PYTHONPATH=/tmp/ep-site${PYTHONPATH:+:$PYTHONPATH}

    local rc_test=0 t log
    for t in test_ops test_model test_patch test_upload; do
        section "$t"
        log=$(mktemp)
        OPENBLAS_NUM_THREADS=8 bin timeout "$(budget 150)" ".device/$t" 2>&1 | tee "$log" | grep -E "cuda|FAIL|passed"
        [ "${PIPESTATUS[0]}" -ne 0 ] && rc_test=1
        grep -q " cuda " "$log" || { echo "device_check: $t ran no cuda row: the cuda backend did not come up"; rc_test=1; }
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

    section "bench_ops (ms per call; ratio = cpu / cuda)"
    OPENBLAS_NUM_THREADS=$(nproc) bin timeout "$(budget 150)" .device/bench_ops

    section "device_check.py (HF transformers on this GPU)"
    OPENBLAS_NUM_THREADS=$(nproc) PYTHONUNBUFFERED=1 timeout "$(budget 400)" python3 tools/device_check.py \
        --bin .device ${DEVICE_CHECK_ARGS:-}
    local rc_py=$?

    local rc_san=0 tool
    if command -v compute-sanitizer >/dev/null 2>&1; then
        for tool in memcheck racecheck; do
            [ $((DEADLINE_S - SECONDS)) -lt 40 ] && { echo "compute-sanitizer $tool: out of time, not run"; continue; }
            section "compute-sanitizer --tool $tool test_ops"
            OPENBLAS_NUM_THREADS=8 bin timeout "$(budget 120)" compute-sanitizer --tool "$tool" --error-exitcode 86 \
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

if [ "${1:-}" = pack ]; then
    pack
    exit $?
fi
log=$(mktemp /tmp/device_check.XXXXXX)
check 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
echo "device_check: exit status $rc" | tee -a "$log"
[ -n "${OUT:-}" ] && mkdir -p "$OUT" && cp "$log" "$OUT/device_check.log"
rm -f "$log"
exit "$rc"
