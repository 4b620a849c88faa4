#!/usr/bin/env bash
# edgepatch sweep without Slurm (docs/sweeps.md): plan's parameter counts against independent references
# (the tiny models' safetensors headers, the real models' published sizes), status read from run
# folders (done, started, pending, failed, conflict) as runs are made directly, submit --dry-run's
# scripts (syntax, #SBATCH lines, only unfinished runs), and one-line errors for bad sweeps.
# tests/cli_sweep_slurm.sh submits to a real Slurm.
set -u
bin=$1
. "$(dirname "$0")/cli_harness.bash"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1

sed "s#\"runs/sweeps/tiny\"#\"$tmp/sweep\"#" configs/sweeps/tiny.json > "$tmp/tiny.json"
"$bin" sweep plan "$tmp/tiny.json" > "$tmp/plan.out" 2>&1 && [ "$(grep -c ' pending ' "$tmp/plan.out")" = 4 ] &&
  grep -q "^4 runs: 0 done, 4 to submit" "$tmp/plan.out" && ok || bad "plan: $(cat "$tmp/plan.out")"
[ ! -e "$tmp/sweep" ] && ok || bad "plan wrote into the sweep's folder"

# Parameter counts: the estimate leaves out norms and biases, so it is within 2% of the tensors' sizes
# in the fixtures' safetensors headers, and within 1% of the real models' published sizes.
params_of() { awk -v m="$1" '$1 == m { v = $2; u = substr(v, length(v)); v = substr(v, 1, length(v) - 1);
  print v * (u == "B" ? 1e9 : u == "M" ? 1e6 : 1e3) }' "$2"; }
for m in gemma2-tiny smollm-tiny; do
  want=$(python3 -c 'import json,struct,sys,math
f=open(sys.argv[1],"rb"); n=struct.unpack("<Q",f.read(8))[0]; h=json.loads(f.read(n))
print(sum(math.prod(t["shape"]) for k,t in h.items() if k!="__metadata__"))' tests/fixtures/models/$m/model.safetensors)
  got=$(params_of $m "$tmp/plan.out")
  python3 -c 'import sys; g,w=map(float,sys.argv[1:]); assert abs(g-w)<=0.02*w' "$got" "$want" && ok || bad "$m: plan says $got parameters, the safetensors hold $want"
  echo "  $m: $got parameters estimated, $want in model.safetensors"
done
"$bin" sweep plan configs/sweeps/full.json > "$tmp/full.out" 2>&1 && ok || bad "plan full.json: $(cat "$tmp/full.out")"
# published sizes (model cards): Gemma-2 2.61B / 9.24B / 27.2B, Phi-2 2.78B, SmolLM2-1.7B 1.71B, Llama-3-8B 8.03B
for pair in gemma2-2b:2.614e9 gemma2-9b:9.242e9 gemma2-27b:27.227e9 phi2:2.78e9 smollm-1.7b:1.711e9 llama3-8b:8.03e9; do
  m=${pair%%:*} want=${pair#*:}
  got=$(params_of $m "$tmp/full.out")
  python3 -c 'import sys; g,w=map(float,sys.argv[1:]); assert abs(g-w)<=0.01*w' "$got" "$want" 2> /dev/null && ok || bad "$m: plan says '$got' parameters, published $want"
done
grep -q "^gemma2-27b .* 2 *2 *2 " "$tmp/full.out" && ! grep -q "over gpu_memory_gb" "$tmp/full.out" && ok || bad "full.json: 27B not on 2 GPUs or over memory: $(cat "$tmp/full.out")"
sed -n '/^model/,/^(GPU/p' "$tmp/full.out" | sed 's/^/  | /'

# submit --dry-run: scripts for the 4 runs, valid bash, the sweep's resources, a list of run configs
"$bin" sweep submit "$tmp/tiny.json" --dry-run > "$tmp/dry.out" 2>&1 && ok || bad "dry run: $(cat "$tmp/dry.out")"
s=$tmp/sweep/slurm
for f in "$s"/*.sbatch; do bash -n "$f" && ok || bad "$f: not valid bash"; done
grep -q -- "^#SBATCH --ntasks=2$" "$s/gemma2-tiny-circuits.sbatch" && grep -q -- "^#SBATCH --ntasks=1$" "$s/gemma2-tiny-tokenize.sbatch" &&
  grep -q -- "^#SBATCH --array=0-1$" "$s/smollm-tiny-circuits.sbatch" && grep -q -- "^#SBATCH --signal=B:USR1@60$" "$s/smollm-tiny-circuits.sbatch" &&
  grep -q -- "^#SBATCH --requeue$" "$s/smollm-tiny-circuits.sbatch" && grep -q "^export .*EP_UNTIL=tokenize" "$s/smollm-tiny-tokenize.sbatch" &&
  [ "$(grep -c '^#SBATCH --signal' "$s/smollm-tiny-circuits.sbatch")" = 1 ] && grep -q 'srun --mpi=pmix' "$s/smollm-tiny-circuits.sbatch" &&
  ok || bad "scripts: $(cat "$s/gemma2-tiny-circuits.sbatch")"
runs_of() { sed -n '/^runs=(/,/^)/p' "$1" | tr -d "\n '"; }
[ "$(runs_of "$s/smollm-tiny-circuits.sbatch")" = "runs=($tmp/sweep/smollm-tiny/country_capital/sweep-run.json$tmp/sweep/smollm-tiny/present_past/sweep-run.json)" ] &&
  [ -s "$tmp/sweep/smollm-tiny/present_past/sweep-run.json" ] && ok || bad "run list: $(cat "$s/smollm-tiny-circuits.sbatch")"

# status from the folders: one run done directly, one stopped after the cache stage, one failed (the
# batch script's job-failed.txt), one made from another seed (edgepatch run would refuse it).
r=$tmp/sweep
"$bin" run $r/smollm-tiny/country_capital/sweep-run.json > "$tmp/run1.out" 2>&1 || bad "direct run: $(tail -3 "$tmp/run1.out")"
"$bin" run $r/smollm-tiny/present_past/sweep-run.json --until cache > "$tmp/run2.out" 2>&1 || bad "direct run: $(tail -3 "$tmp/run2.out")"
echo "job 7: edgepatch run x exited with status 1" > $r/gemma2-tiny/present_past/job-failed.txt
sed 's/"seed": 3/"seed": 4/' $r/gemma2-tiny/country_capital/sweep-run.json > "$tmp/other.json"
"$bin" run "$tmp/other.json" --until tokenize > "$tmp/run3.out" 2>&1 || bad "direct run: $(tail -3 "$tmp/run3.out")"
"$bin" sweep status "$tmp/tiny.json" > "$tmp/status.out" 2>&1 && ok || bad "status: $(cat "$tmp/status.out")"
sed 's/^/  | /' "$tmp/status.out"
row() { grep "^$1 " "$tmp/status.out" | tr -s ' '; }
[[ "$(row smollm-tiny/country_capital)" == "smollm-tiny/country_capital done prune 2/2 3 " ]] && ok || bad "done run: $(row smollm-tiny/country_capital)"
[[ "$(row smollm-tiny/present_past)" == "smollm-tiny/present_past started cache 2/2 0 " ]] && ok || bad "stopped run: $(row smollm-tiny/present_past)"
[[ "$(row gemma2-tiny/present_past)" == "gemma2-tiny/present_past failed - 0/2 0 job 7: edgepatch run x exited with status 1" ]] && ok || bad "failed run: $(row gemma2-tiny/present_past)"
[[ "$(row gemma2-tiny/country_capital)" == "gemma2-tiny/country_capital conflict tokenize 0/2 0 "*"made from another config"* ]] && ok || bad "conflict: $(row gemma2-tiny/country_capital)"
grep -q "^4 runs: 1 done, 1 started, 0 pending, 1 failed, 1 conflict" "$tmp/status.out" && ok || bad "status summary: $(tail -1 "$tmp/status.out")"
# a folder holding another config's run stops submit before it writes anything; a finished run is not
# submitted again
find "$s" -exec touch -d 2000-01-01 {} +
expect_error 1 "run gemma2-tiny/country_capital: .*made from another config" sweep submit "$tmp/tiny.json" --dry-run
[ -z "$(find "$s" -newer "$tmp/tiny.json")" ] && ok || bad "a refused submit wrote scripts"
rm -r $r/gemma2-tiny/country_capital
"$bin" sweep submit "$tmp/tiny.json" --dry-run > "$tmp/dry2.out" 2>&1 && grep -q "^smollm-tiny: 1 runs:" "$tmp/dry2.out" &&
  [ "$(runs_of "$s/smollm-tiny-circuits.sbatch")" = "runs=($tmp/sweep/smollm-tiny/present_past/sweep-run.json)" ] && ok || bad "resubmission: $(cat "$tmp/dry2.out")"

# bad sweeps: one line naming the file and the field, status 1; usage errors status 2
bad_sweep() {  # needle sed-expression
  sed "$2" "$tmp/tiny.json" > "$tmp/bad.json"
  expect_error 1 "$1" sweep plan "$tmp/bad.json"
}
bad_sweep "bad.json: sweep: unknown field 'modles'" 's/"models"/"modles"/'
bad_sweep "bad.json: models\[1\]: field path: required" 's#"path": "tests/fixtures/models/smollm-tiny", ##'
bad_sweep "bad.json: models\[0\]: ranks = 3 is not a multiple of tensor_parallel = 2" 's/"ranks": 2}/"ranks": 3, "tensor_parallel": 2}/'
bad_sweep "bad.json: models\[0\]: tensor_parallel = 3 does not divide" 's/"ranks": 2}/"ranks": 3, "tensor_parallel": 3}/'
bad_sweep "bad.json: models\[1\]: ranks = 2 with gpus = 1" 's/"gpus": 0, "ranks": 1}/"gpus": 1, "ranks": 2}/'
bad_sweep "bad.json: tasks\[1\]: unknown task 'present_pst'" 's/"present_past"\]/"present_pst"]/'
bad_sweep "bad.json: tasks\[1\]: task 'country_capital' listed twice" 's/"present_past"\]/"country_capital"]/'
bad_sweep "bad.json: run: field output_path: set per run" 's/"n_prompts": 8,/"n_prompts": 8, "output_path": "x",/'
bad_sweep "bad.json: run gemma2-tiny/country_capital: unknown field 'n_prompt'" 's/"n_prompts": 8/"n_prompt": 8/'
bad_sweep "bad.json: stages\[1\]: until 'tokenize' does not come after" 's/"until": "prune"/"until": "tokenize"/'
bad_sweep "bad.json: slurm: field signal_seconds: expected an integer" 's/"signal_seconds": 60/"signal_seconds": "60"/'
bad_sweep "models\[0\]: model gemma2-tiny: " 's#tests/fixtures/models/gemma2-tiny#tests/fixtures/models/none#'
bad_sweep "bad.json: field output_root: a path without single quotes" 's#"output_root": "#"output_root": "it'"'"'s/#'
bad_sweep "bad.json: models\[1\]: field dtype: expected \"fp32\" or \"bf16\", got \"float16\"" 's/"ranks": 1}/"ranks": 1, "dtype": "float16"}/'
bad_sweep "bad.json: run: field dtype: set per run" 's/"n_prompts": 8,/"n_prompts": 8, "dtype": "bf16",/'
bad_sweep "bad.json: invalid JSON" 's/}$/,/'
expect_error 2 "need plan, submit, status or run" sweep plan
expect_error 2 "need plan, submit, status or run" sweep launch "$tmp/tiny.json"
expect_error 2 "--dry-run is for submit" sweep status "$tmp/tiny.json" --dry-run
finish cli_sweep
