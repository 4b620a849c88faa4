#!/usr/bin/env bash
# Stop requests at the edges of a run (docs/distribution.md, "Signals"): SIGTERM or SIGUSR1 the moment
# a run starts (while the program's libraries load, then in MPI_Init: the window where the default
# action used to kill it with 143 or 138, and where a rank dead in MPI_Init left mpirun waiting
# forever) must end in exit status 75 and a rerun that finishes; SIGUSR1 to the process group while
# gnuplot or dot draw a figure (mpirun forwards it that way) must not kill them: the report finishes.
set -u
bin=$1
. "$(dirname "$0")/cli_harness.bash"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
export OMPI_MCA_rmaps_base_oversubscribe=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
mpi_asan="ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0"  # as in cli_mpi.sh
if ! command -v mpirun > /dev/null; then echo "cli_signals: mpirun not found" >&2; exit 1; fi

config() {  # name
  printf '{"task": "person_sport", "model_name": "smollm_prune_heads_in_circuits", "model_path": "tests/fixtures/models/smollm-tiny", "output_path": "%s/%s", "n_prompts": 4, "batch_size": 2, "seed": 5, "n_shots": 3, "max_new_tokens": 2, "affect_whom": [["x", "y"]], "ablations": [{"name": "a", "group": "y->last", "band": "0", "rules": [{"sender": ["y"], "receiver": ["last"], "relation": "any", "layers": [0]}]}, {"name": "b", "group": "y->last", "band": "1", "rules": [{"sender": ["y"], "receiver": ["last"], "relation": "any", "layers": [1]}]}, {"name": "c", "group": "x->last", "band": "0", "rules": [{"sender": ["x"], "receiver": ["last"], "relation": "any", "layers": [0]}]}, {"name": "d", "group": "x->last", "band": "1", "rules": [{"sender": ["x"], "receiver": ["last"], "relation": "any", "layers": [1]}]}], "importance": "attribution", "prune_rounds": {"heads": 1, "edges": 0}, "prune_fraction": 0.3}\n' "$tmp" "$1" > "$tmp/$1.json"
}
# The program proper: edgepatch-core once the front (sched/cli/launch.c) has executed it. Not the front in
# the tenth of a millisecond before it blocks the signals: no program can take a signal there
# (docs/distribution.md). A build without the front (an older one) is signalled as soon as it runs.
core=edgepatch-core
[ -x "$(dirname "$bin")/edgepatch-core" ] || core=edgepatch
ranks_of() {  # mpirun pid: the pids of its children that run the program
  local k
  for k in $(cat "/proc/$1/task/$1/children" 2> /dev/null); do
    [ "$(cat "/proc/$k/comm" 2> /dev/null)" = $core ] && echo "$k"
  done
}

# --- At once: the signal sent right after the start, before the program can have done anything.
for sig in TERM USR1; do
  for i in 1 2 3; do
    name=start-$sig-$i
    config $name
    # The program waits a second more before its handler is in place (the front holds the signal
    # meanwhile), so that the signal lands in its start even where this shell is slow to send it.
    EDGEPATCH_TEST_START_HOLD_MS=1000 "$bin" run "$tmp/$name.json" > "$tmp/$name.out" 2>&1 &
    pid=$!
    # Once the shell's child runs the program (its exec: the libraries start loading then). Bounded by
    # time, not by a count of polls: on a loaded machine (CI runs mpirun tests beside this one) the child
    # can wait a second or more for its exec, and a signal sent before it would meet the shell's fork.
    started=0
    for _ in $(seq 3000); do [ "$(cat /proc/$pid/comm 2> /dev/null)" = $core ] && { started=1; break; }; sleep 0.01; done
    [ $started = 1 ] || bad "$name: the program did not start within 30 s (comm $(cat /proc/$pid/comm 2> /dev/null))"
    at_kill=$(cat /proc/$pid/comm 2> /dev/null)
    kill -$sig $pid
    timeout 60 tail --pid=$pid -f /dev/null
    wait $pid; rc=$?
    [ $rc = 75 ] && [ ! -e "$tmp/$name/prompts.h5" ] && ok || bad "$name: SIG$sig at the start (sent to $at_kill): status $rc (want 75, nothing written): $(tail -3 "$tmp/$name.out")"
  done
done
timeout 120 "$bin" run "$tmp/start-TERM-1.json" > "$tmp/rerun.out" 2>&1 && [ -e "$tmp/start-TERM-1/report.txt" ] && ok ||
  bad "rerun after a stop at the start: $(tail -3 "$tmp/rerun.out")"
echo "  SIGTERM / SIGUSR1 at the start of an unlaunched run: status 75 (6 runs); a rerun finishes"

# --- Under mpirun: the signal to every rank as soon as the ranks exist (loading, or in MPI_Init).
for sig in TERM USR1; do
  for i in 1 2; do
    name=mpi-$sig-$i
    config $name
    env "$mpi_asan" mpirun -np 2 "$bin" run "$tmp/$name.json" > "$tmp/$name.out" 2>&1 &
    pid=$!
    pids=
    for _ in $(seq 3000); do pids=$(ranks_of $pid); [ "$(echo $pids | wc -w)" = 2 ] && break; sleep 0.01; done
    [ -n "$pids" ] && kill -$sig $pids
    timeout 90 tail --pid=$pid -f /dev/null || { bad "$name: mpirun still running 90 s after SIG$sig to the starting ranks (hang)"; kill -9 $pid; }
    wait $pid; rc=$?
    [ $rc = 75 ] && ok || bad "$name: SIG$sig to both ranks at their start: status $rc (want 75): $(grep -v '^ *$' "$tmp/$name.out" | tail -4)"
  done
done
echo "  SIGTERM / SIGUSR1 to both ranks as they start (mpirun -np 2): status 75, no hang (4 runs)"

# --- A figure being drawn: gnuplot and dot are slowed down (a wrapper sleeps first) so that SIGUSR1
# reaches the process group while one runs. The report must finish, with every figure.
mkdir -p "$tmp/slow"
for tool in gnuplot dot; do
  real=$(command -v $tool) || { bad "$tool not installed"; continue; }
  printf '#!/bin/bash\ntouch %s/drawing-%s\nsleep 1\nexec %s "$@"\n' "$tmp" "$tool" "$real" > "$tmp/slow/$tool"
  chmod +x "$tmp/slow/$tool"
done
config fig
timeout 120 "$bin" run "$tmp/fig.json" > "$tmp/fig.out" 2>&1 || bad "fig: the run failed: $(tail -3 "$tmp/fig.out")"
for tool in gnuplot dot; do
  rm -f "$tmp/drawing-$tool" "$tmp/fig/report.txt"
  setsid env PATH="$tmp/slow:$PATH" "$bin" report "$tmp/fig" > "$tmp/fig-$tool.out" 2>&1 &
  pid=$!
  for _ in $(seq 600); do [ -e "$tmp/drawing-$tool" ] && break; sleep 0.01; done
  kill -USR1 -- -$pid
  timeout 60 tail --pid=$pid -f /dev/null
  wait $pid; rc=$?
  [ $rc = 0 ] && [ -s "$tmp/fig/report.txt" ] && [ -s "$tmp/fig/accuracy_drop.png" ] && [ -s "$tmp/fig/circuit.png" ] &&
    [ -z "$(find "$tmp/fig" -name '*.tmp-*')" ] && ok ||
    bad "report with SIGUSR1 to its process group while $tool draws: status $rc: $(tail -3 "$tmp/fig-$tool.out")"
done
# The same through mpirun, which forwards SIGUSR1 to the rank's process group.
rm -f "$tmp/drawing-gnuplot" "$tmp/fig/report.txt"
env "$mpi_asan" PATH="$tmp/slow:$PATH" mpirun -np 2 "$bin" run "$tmp/fig.json" > "$tmp/fig-mpi.out" 2>&1 &
pid=$!
for _ in $(seq 1000); do [ -e "$tmp/drawing-gnuplot" ] && break; sleep 0.01; done
kill -USR1 $pid
timeout 60 tail --pid=$pid -f /dev/null
wait $pid; rc=$?
[ $rc = 0 ] && [ -s "$tmp/fig/report.txt" ] && ! grep -q "failed" "$tmp/fig-mpi.out" && ok ||
  bad "SIGUSR1 to mpirun while gnuplot draws: status $rc: $(grep -v '^ *$' "$tmp/fig-mpi.out" | tail -3)"
echo "  SIGUSR1 while gnuplot / dot draw (report alone, and edgepatch run under mpirun): the report finishes"
finish cli_signals
