#!/usr/bin/env bash
# The watchdog around MPI_Init and MPI_Finalize (sched/watchdog.h): a rank that waits there for a rank
# that died (SIGKILL; no handler runs) must not wait forever. EDGEPATCH_TEST_STALL makes one rank sleep
# inside the watched step, as such a wait would; with EDGEPATCH_MPI_TIMEOUT of a few seconds (long
# enough for a real start on a loaded machine) the job must end within seconds, the stalled rank saying
# why in one line, with status 1 (a start) or the run's own status (a finalize), or 75 when a stop
# request came meanwhile (a preempted job is requeued); a rerun then finishes. Without the watchdog (EDGEPATCH_MPI_TIMEOUT=0) the stall outlasts the test's limit: the
# check can fail.
set -u
bin=$1
. "$(dirname "$0")/cli_harness.bash"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
export OMPI_MCA_rmaps_base_oversubscribe=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
export ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0  # Open MPI's allocations (cli_mpi.sh)
if ! command -v mpirun > /dev/null; then echo "cli_watchdog: mpirun not found" >&2; exit 1; fi

config() {  # name
  printf '{"task": "person_sport", "model_name": "smollm_calc_accuracy", "model_path": "tests/fixtures/models/smollm-tiny", "output_path": "%s/%s", "n_prompts": 4, "batch_size": 2, "seed": 5, "n_shots": 3}\n' "$tmp" "$1" > "$tmp/$1.json"
}

# run_stalled NAME STEP RANK TIMEOUT [SIGNAL]: mpirun -np 2 with rank RANK stalled 120 s in STEP; the
# job gets 40 s. Prints mpirun's status (124: still running at 40 s, a hang).
run_stalled() {
  local name=$1 step=$2 rank=$3 limit=$4 sig=${5:-}
  config "$name"
  EDGEPATCH_MPI_TIMEOUT=$limit EDGEPATCH_TEST_STALL=$step:$rank:120 \
    timeout -k 5 "${JOB_LIMIT:-40}" mpirun -np 2 "$bin" run "$tmp/$name.json" --until tokenize > "$tmp/$name.out" 2>&1 &
  local job=$!
  if [ -n "$sig" ]; then
    # The stop request reaches the stalled rank while it waits in the step (its signals are held there).
    local p=""
    for _ in $(seq 200); do
      for k in $(pgrep -f "run $tmp/$name.json"); do
        tr '\0' '\n' < "/proc/$k/environ" 2> /dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$rank" && p=$k
      done
      [ -n "$p" ] && break
      sleep 0.05
    done
    sleep 1
    [ -n "$p" ] && kill -"$sig" "$p"
  fi
  wait $job
  echo $?
}

# A start that never returns on rank 1: status 1 from that rank, one line naming MPI_Init.
st=$(run_stalled init1 init 1 4)
if [ "$st" != 124 ] && [ "$st" != 0 ] && grep -q "MPI_Init did not return within 4 s.*status 1 " "$tmp/init1.out"; then ok
else bad "stalled MPI_Init: mpirun status $st, output: $(tail -5 "$tmp/init1.out")"; fi
"$bin" run "$tmp/init1.json" --until tokenize > /dev/null 2>&1 && ok || bad "rerun after a stalled start failed"

# The same with a stop request pending: 75, so that the batch script requeues the job.
st=$(run_stalled init-term init 1 8 TERM)
if grep -q "MPI_Init did not return within 8 s.*status 75 " "$tmp/init-term.out"; then ok
else bad "stalled MPI_Init with SIGTERM: mpirun status $st, output: $(tail -5 "$tmp/init-term.out")"; fi

# A finalize that never returns on rank 0 after a finished run: the run's own status, 0.
st=$(run_stalled fin0 finalize 0 10)
if [ "$st" != 124 ] && grep -q "MPI_Finalize did not return within 10 s.*status 0 " "$tmp/fin0.out" &&
   [ -f "$tmp/fin0/prompts.h5" ]; then ok
else bad "stalled MPI_Finalize: mpirun status $st, output: $(tail -5 "$tmp/fin0.out")"; fi

# Without the watchdog the stall is a hang (the test's own limit ends it): what the watchdog is for.
st=$(JOB_LIMIT=12 run_stalled off init 1 0)
[ "$st" = 124 ] && ok || bad "EDGEPATCH_MPI_TIMEOUT=0 still ended the stalled job (status $st): the check cannot fail"

finish cli_watchdog
