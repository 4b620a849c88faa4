#!/usr/bin/env bash
# edgepatch sweep on a real Slurm (docs/sweeps.md): brings up munged, slurmctld and slurmd on localhost in
# the scratch folder (own socket, key, ports and state: nothing system-wide is touched), submits
# configs/sweeps/tiny.json (2 tiny models x 2 tasks, tokenize array then pruning array, one with 2 MPI
# ranks through srun --mpi=pmix) with `edgepatch sweep submit`, preempts two jobs mid-run (the time-limit
# signal to one batch shell, `scontrol requeue` of another), waits until `sweep status` says every run is
# done, and compares every run's files with the same runs done directly, without Slurm. The daemons are
# stopped by PID on exit, also when the test fails. Needs slurm-wlm and munge (tools/setup.sh) and root.
set -u
bin=$(realpath "$1")
. "$(dirname "$0")/cli_harness.bash"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
start=$SECONDS

S=$tmp/slurm
stop_daemons() {  # jobs still there (a failed check), then slurmd, slurmctld, munged, each by the PID it wrote
  local f pid n
  if [ -s "$S/run/slurmctld.pid" ]; then  # slurmd leaves running steps alone when it stops
    scancel -u "$(id -un)" 2> /dev/null
    for n in $(seq 50); do [ -z "$(squeue -h 2> /dev/null)" ] && break; sleep 0.2; done
  fi
  for f in "$S/run/slurmd.pid" "$S/run/slurmctld.pid" "$S/munged.pid"; do
    pid=$(cat "$f" 2> /dev/null) || continue
    kill -TERM "$pid" 2> /dev/null
    for n in $(seq 100); do kill -0 "$pid" 2> /dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2> /dev/null && kill -KILL "$pid" 2> /dev/null
  done
  return 0
}
trap 'stop_daemons; rm -rf "$tmp"' EXIT
trap 'exit 1' TERM INT HUP  # ctest's timeout, ^C: through the EXIT trap

for c in munged slurmctld slurmd sbatch scontrol squeue scancel; do
  command -v $c > /dev/null || { bad "$c not found: run tools/setup.sh (Debian packages slurm-wlm, munge)"; finish cli_sweep_slurm; exit; }
done
[ "$(id -u)" = 0 ] || { bad "needs root (the local slurmd runs jobs as root)"; finish cli_sweep_slurm; exit; }

# --- a private single-node Slurm (slurm.conf as in docs/sweeps.md) ---
mkdir -p "$S"/{state,spool,log,run}
chmod 700 "$S"
head -c 1024 /dev/urandom > "$S/munge.key"
chmod 600 "$S/munge.key"
port=$((20000 + RANDOM % 20000))
mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
cat > "$S/slurm.conf" <<EOF
ClusterName=ci
SlurmctldHost=localhost
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$S/munge.sock,cred_expire=5
MpiDefault=pmix
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool
SlurmctldPidFile=$S/run/slurmctld.pid
SlurmdPidFile=$S/run/slurmd.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.log
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$S/slurm.conf
munged --force --socket="$S/munge.sock" --key-file="$S/munge.key" --pid-file="$S/munged.pid" \
  --log-file="$S/log/munged.log" --seed-file="$S/munged.seed" || bad "munged did not start"
slurmctld -f "$SLURM_CONF" || bad "slurmctld did not start: $(tail -3 "$S/log/slurmctld.log")"
slurmd -f "$SLURM_CONF" -N localhost || bad "slurmd did not start: $(tail -3 "$S/log/slurmd.log")"
for n in $(seq 100); do [ "$(sinfo -h -o %T 2> /dev/null)" = idle ] && break; sleep 0.2; done
[ "$(sinfo -h -o %T 2> /dev/null)" = idle ] && ok || { bad "the node is not idle: $(sinfo 2>&1 | tail -2)"; finish cli_sweep_slurm; exit; }
echo "  slurm up on port $port after $((SECONDS - start)) s"

# --- the sweep, in the scratch folder; jobs start in the submit folder (sbatch's default) ---
repo=$PWD
cd "$tmp" || exit 1
sed -e "s#\"runs/sweeps/tiny\"#\"sweep\"#" -e "s#\"tests/fixtures/#\"$repo/tests/fixtures/#g" \
  "$repo/configs/sweeps/tiny.json" > tiny.json
"$bin" sweep plan tiny.json > plan.out 2>&1 && [ "$(grep -c ' pending ' plan.out)" = 4 ] && ok || bad "plan: $(cat plan.out)"
# The jobs sleep after each item so that the preemptions below land mid-run; MPI's own allocations are
# not ours (docs/distribution.md), so the jobs' leak checks are off.
export EDGEPATCH_TEST_ITEM_DELAY_MS=400 EDGEPATCH_PROGRESS_SECONDS=5
env ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0" "$bin" sweep submit tiny.json > submit.out 2>&1 && ok || bad "submit: $(cat submit.out)"
sed 's/^/  /' submit.out
job_of() { sed -n "s/^$1: .* $2 job \([0-9]*\).*/\1/p" submit.out; }  # model stage -> job id
gemma=$(job_of gemma2-tiny circuits) smol=$(job_of smollm-tiny circuits)
[ -n "$gemma" ] && [ -n "$smol" ] && ok || bad "no job ids in: $(cat submit.out)"

# --- preemption: wait until a job is mid-run, then interrupt it ---
wait_for() {  # file, seconds
  local n
  for n in $(seq $(($2 * 5))); do [ -e "$1" ] && return 0; sleep 0.2; done
  return 1
}
# gemma2-tiny/country_capital (array task 0, 2 ranks) once its first prune round is written: the
# time-limit signal to the batch shell (as --signal=B:USR1 sends it); the script forwards it, the
# ranks checkpoint and exit 75, the script requeues the job.
if wait_for sweep/gemma2-tiny/country_capital/prune.d/round-000.h5 150; then
  scancel --batch --signal=USR1 "${gemma}_0" && ok || bad "scancel --signal=USR1 ${gemma}_0 failed"
else bad "gemma2-tiny/country_capital never reached round 0: $(tail -5 sweep/slurm/logs/*gemma2-tiny-circuits*_0.out 2>&1)"; fi
# smollm-tiny/present_past (array task 1) once it has a cache shard: scontrol requeue, as a preemption
# does (SIGTERM to the ranks and the shell, the job goes back to the queue).
if wait_for sweep/smollm-tiny/present_past/cache.d/item-00000.h5 150; then
  scontrol requeue "${smol}_1" && ok || bad "scontrol requeue ${smol}_1 failed"
else bad "smollm-tiny/present_past never started its cache stage"; fi

# --- wait until the run folders say every run is done ---
for n in $(seq 300); do
  "$bin" sweep status tiny.json > status.out 2>&1
  grep -q "^4 runs: 4 done" status.out && [ -z "$(squeue -h 2> /dev/null)" ] && break
  grep -q " failed " status.out && break
  sleep 1
done
echo "  every run done $((SECONDS - start)) s after the start"
grep -q "^4 runs: 4 done" status.out && ok || { bad "not every run finished: $(cat status.out; squeue; tail -n 5 sweep/slurm/logs/*)"; }
logs=sweep/slurm/logs
grep -q "requeueing job" $logs/ep-tiny-gemma2-tiny-circuits-${gemma}_0.out && grep -q "(restart 1)" $logs/ep-tiny-gemma2-tiny-circuits-${gemma}_0.out &&
  grep -q "prune: round 0 .* already done\|prune: .* already done" $logs/ep-tiny-gemma2-tiny-circuits-${gemma}_0.out &&
  ok || bad "gemma2-tiny/country_capital was not interrupted, requeued and resumed: $(cat $logs/ep-tiny-gemma2-tiny-circuits-${gemma}_0.out)"
grep -q "(restart 1)" $logs/ep-tiny-smollm-tiny-circuits-${smol}_1.out && ok ||
  bad "smollm-tiny/present_past was not requeued: $(cat $logs/ep-tiny-smollm-tiny-circuits-${smol}_1.out)"
for log in $logs/ep-tiny-gemma2-tiny-circuits-${gemma}_1.out $logs/ep-tiny-smollm-tiny-circuits-${smol}_0.out $logs/*tokenize*; do
  grep -q "(restart 0)" "$log" && ! grep -q "(restart [1-9])" "$log" && ok || bad "$log: not preempted, but restarted: $(cat "$log")"
done
echo "  preempted: gemma2-tiny/country_capital (USR1 to the batch shell, requeued by the script), smollm-tiny/present_past (scontrol requeue)"

# The status comes from the run folders: the same with Slurm gone.
stop_daemons
"$bin" sweep status tiny.json > status2.out 2>&1 && cmp -s status.out status2.out && ok || bad "status without Slurm differs: $(cat status2.out)"
sed 's/^/  | /' status2.out
"$bin" sweep submit tiny.json > resubmit.out 2>&1 && [ "$(grep -c 'nothing to submit' resubmit.out)" = 2 ] && ok ||
  bad "a finished sweep submitted again: $(cat resubmit.out)"

# --- the same runs without Slurm, uninterrupted; every file of the sweep's runs must be the same ---
unset EDGEPATCH_TEST_ITEM_DELAY_MS
same_as() {  # ref run: prompts, every item shard, patch, every round file, circuit and logs byte-identical
  local f bad_files=""
  for f in prompts.h5 patch.h5 model_logs.json circuit.json circuit.txt $(cd "$1" && find cache.d patch.d prune.d -name '*.h5' | sort); do
    cmp -s "$1/$f" "$2/$f" || bad_files="$bad_files $f"
  done
  [ -z "$bad_files" ] || { echo "  $2 differs from $1 in:$bad_files" >&2; return 1; }
}
for run in gemma2-tiny/country_capital gemma2-tiny/present_past smollm-tiny/country_capital smollm-tiny/present_past; do
  ref=ref/$run
  mkdir -p "$ref"
  sed "s#\"output_path\": *\"[^\"]*\"#\"output_path\": \"$ref\"#" sweep/$run/sweep-run.json > "$ref.json"
  timeout 300 "$bin" run "$ref.json" > "$ref.out" 2>&1 || bad "direct run $run: $(tail -3 "$ref.out")"
  same_as "$ref" sweep/$run && ok || bad "$run: the sweep's files differ from a direct run's"
done
! same_as ref/gemma2-tiny/country_capital sweep/gemma2-tiny/present_past 2> /dev/null && ok || bad "two tasks gave the same files (the comparison cannot fail)"
echo "  4 runs byte-identical to direct uninterrupted runs (prompts.h5, item shards, patch.h5, rounds, circuit, model_logs); whole test $((SECONDS - start)) s"
finish cli_sweep_slurm
