#!/usr/bin/env bash
# device_check: the one script to run on a GPU machine (H100/H200, CUDA driver present, this repository
# copied, no network). It builds a fresh CUDA build (build-device, sm_90), lists the GPU, runs
# tests/test_ops (which then checks the cuda backend against the reference too), tests/test_tp --nccl
# (tensor parallelism over NCCL: all GPUs in one group, or a group of one), and runs
# bench/bench_ops (cpu vs cuda timings at real shapes). Made to finish in well under 4 minutes on a
# 16-core machine; every step has a timeout taken from one overall deadline.
#
# Exit status: 0 all good; 1 test_ops failed (or did not exercise the cuda backend); 2 bench_ops failed;
# 3 build dependencies missing (this machine cannot install them: no network); 4 configure failed;
# 5 build failed; 6 compute-sanitizer found an error (only where compute-sanitizer is installed);
# 7 test_tp --nccl (tensor parallelism over NCCL, all GPUs in one group) failed.
# The full log is copied to "$OUT/device_check.log" when $OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

DEADLINE_S=${DEVICE_CHECK_DEADLINE_S:-225}  # the whole script, configure to bench
BUILD_DIR=build-device

section() { printf '\n==== %s (t=%ds)\n' "$1" "$SECONDS"; }

# Seconds a step may take: its own cap, but never past the overall deadline (at least 5).
budget() {
    local cap=$1 left=$((DEADLINE_S - SECONDS))
    [ "$left" -lt 5 ] && left=5
    [ "$cap" -lt "$left" ] && echo "$cap" || echo "$left"
}

main() {
    section "environment"
    date -u
    uname -srm
    echo "cores: $(nproc)"
    # nvcc is not always on PATH on a bare machine; CMake finds it through CUDACXX.
    if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
        export PATH=/usr/local/cuda/bin:$PATH
    fi
    if command -v nvcc >/dev/null 2>&1; then
        export CUDACXX=${CUDACXX:-$(command -v nvcc)}
        nvcc --version | tail -n 2
    fi

    section "build dependencies"
    local missing=()
    for tool in cmake pkg-config mpicc h5pcc nvcc; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool (program)")
    done
    if command -v pkg-config >/dev/null 2>&1; then
        for mod in jansson openblas libpcre2-8 hdf5 zlib; do
            pkg-config --exists "$mod" || missing+=("$mod (pkg-config module)")
        done
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        echo "device_check: missing build dependencies: ${missing[*]}"
        echo "device_check: this machine has no network, so tools/setup.sh cannot install them here;"
        echo "device_check: use an image where 'bash tools/setup.sh' has been run (and CUDA is in /usr/local/cuda)."
        return 3
    fi
    echo "all present: cmake $(cmake --version | head -n 1 | awk '{print $3}'), mpicc, h5pcc, nvcc, pkg-config modules"

    section "GPU"
    if command -v nvidia-smi >/dev/null 2>&1; then
        timeout 30 nvidia-smi -L
        timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    else
        echo "nvidia-smi not found (test_ops will say whether the cuda backend came up)"
    fi

    section "configure $BUILD_DIR (WITH_CUDA=ON, sm_90)"
    rm -rf "$BUILD_DIR"
    if ! timeout "$(budget 90)" cmake -S . -B "$BUILD_DIR" -DWITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
        -DCMAKE_BUILD_TYPE=RelWithDebInfo; then
        echo "device_check: configure failed"
        return 4
    fi

    section "build ($(nproc) jobs)"
    if ! timeout "$(budget 150)" cmake --build "$BUILD_DIR" -j "$(nproc)"; then
        echo "device_check: build failed"
        return 5
    fi

    section "test_ops (cpu and cuda backends against the reference)"
    local test_log rc_test
    test_log=$(mktemp)
    OPENBLAS_NUM_THREADS=1 timeout "$(budget 60)" "$BUILD_DIR/tests/test_ops" 2>&1 | tee "$test_log"
    rc_test=${PIPESTATUS[0]}
    if [ "$rc_test" -eq 0 ] && ! grep -q '^  cuda .*max rel error' "$test_log"; then
        echo "device_check: test_ops passed but checked no cuda op: the cuda backend did not come up on this machine"
        rc_test=1
    fi
    rm -f "$test_log"
    echo "test_ops exit status: $rc_test"

    # Tensor parallelism over NCCL (docs/tensor_parallel.md): every GPU in one group, one rank per GPU;
    # with one GPU a group of one still runs the NCCL communicator and the shard's forward on the GPU.
    local n_gpus rc_tp=0
    n_gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
    [ "$n_gpus" -ge 1 ] || n_gpus=1
    section "test_tp --nccl (tensor parallelism over NCCL, a group of $n_gpus)"
    if ! grep -q '^NCCL_LIBRARY:FILEPATH=/' "$BUILD_DIR/CMakeCache.txt" 2>/dev/null; then
        echo "NCCL not found by CMake on this machine: skipped"
    elif [ "$n_gpus" -gt 1 ]; then
        OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OPENBLAS_NUM_THREADS=1 timeout "$(budget 60)" \
            mpirun -np "$n_gpus" "$BUILD_DIR/tests/test_tp" --nccl
        rc_tp=$?
    else
        OPENBLAS_NUM_THREADS=1 timeout "$(budget 60)" "$BUILD_DIR/tests/test_tp" --nccl
        rc_tp=$?
    fi
    echo "test_tp --nccl exit status: $rc_tp"

    section "bench_ops (mean ms per call; ratio = cpu / cuda)"
    timeout "$(budget 120)" "$BUILD_DIR/bench/bench_ops"
    local rc_bench=$?
    echo "bench_ops exit status: $rc_bench"

    # Where the toolkit ships compute-sanitizer, spend what time is left on out-of-bounds and shared
    # memory race checks of the kernels (test_ops shapes are small enough).
    local rc_san=0
    if command -v compute-sanitizer >/dev/null 2>&1; then
        for tool in memcheck racecheck; do
            if [ $((DEADLINE_S - SECONDS)) -lt 30 ]; then
                echo "skipping compute-sanitizer $tool: out of time"
                continue
            fi
            section "compute-sanitizer --tool $tool test_ops"
            OPENBLAS_NUM_THREADS=1 timeout "$(budget 60)" compute-sanitizer --tool "$tool" --error-exitcode 86 \
                "$BUILD_DIR/tests/test_ops" >/tmp/device_check_san.log 2>&1
            local rc=$?
            tail -n 25 /tmp/device_check_san.log
            echo "compute-sanitizer $tool exit status: $rc"
            [ "$rc" -eq 86 ] && rc_san=6
        done
    else
        echo
        echo "(compute-sanitizer not installed: kernel memory/race checks skipped)"
    fi

    section "summary"
    echo "test_ops: $([ "$rc_test" -eq 0 ] && echo PASS || echo "FAIL ($rc_test)")"
    echo "bench_ops: $([ "$rc_bench" -eq 0 ] && echo ok || echo "FAIL ($rc_bench)")"
    echo "test_tp --nccl: $([ "$rc_tp" -eq 0 ] && echo PASS || echo "FAIL ($rc_tp)")"
    [ "$rc_san" -ne 0 ] && echo "compute-sanitizer: errors found"
    echo "total ${SECONDS}s"
    [ "$rc_test" -ne 0 ] && return 1
    [ "$rc_bench" -ne 0 ] && return 2
    [ "$rc_tp" -ne 0 ] && return 7
    return "$rc_san"
}

log=$(mktemp /tmp/device_check.XXXXXX)
main 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
echo "device_check: exit status $rc" | tee -a "$log"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT" && cp "$log" "$OUT/device_check.log" && chmod 644 "$OUT/device_check.log"
fi
rm -f "$log"
exit "$rc"
