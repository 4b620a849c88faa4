#!/usr/bin/env bash
# cmake --install (docs/install.md): installs the build folder of the program under test into a scratch
# prefix, then works only with the installed program from a fresh folder holding a copy of a tiny
# fixture model and its own config: the datasets (tasks by name, their pairs and words) and the Slurm
# template come from the prefix (EDGEPATCH_DATA unset; the source tree is not on any search path, and the
# can-fail siblings show that without the prefix's datasets/ or slurm/ the same commands fail), relative
# paths in a config resolve against the working directory, and the prefix can be moved.
set -u
bin=$1
. "$(dirname "$0")/cli_harness.bash"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
unset EDGEPATCH_DATA
src=$(pwd)
build=$(cd "$(dirname "$bin")" && pwd)
prefix=$tmp/prefix
cmake --install "$build" --prefix "$prefix" > "$tmp/install.out" 2>&1 && ok || bad "cmake --install: $(tail -5 "$tmp/install.out")"
share=$prefix/share/edgepatch
for f in bin/edgepatch bin/edgepatch-core share/edgepatch/datasets/tasks/present_past.json share/edgepatch/datasets/SOURCE.md \
         share/edgepatch/datasets/pairs/present-past.json share/edgepatch/slurm/edgepatch.sbatch \
         share/edgepatch/configs/sweeps/full.json share/doc/edgepatch/install.md share/doc/edgepatch/README.md; do
  [ -f "$prefix/$f" ] && ok || bad "not installed: $f"
done
[ -x "$prefix/bin/edgepatch" ] && [ -x "$prefix/bin/edgepatch-core" ] && ok || bad "installed programs not executable"
ep=$prefix/bin/edgepatch

# A fresh folder: the model copied in, a config with paths relative to it.
work=$tmp/work
mkdir -p "$work/models" "$work/mytasks/pairs"
cp -r tests/fixtures/models/smollm-tiny "$work/models/"
cat > "$work/run.json" <<'EOF'
{"task": "present_past", "model_path": "models/smollm-tiny", "output_path": "runs/pp", "n_prompts": 4, "batch_size": 2,
 "n_shots": 2, "max_new_tokens": 2, "seed": 1, "model_name": "prune_heads_in_circuits", "prune_rounds": 1}
EOF
cd "$work" || exit 1
"$ep" tasks > "$tmp/tasks.out" 2>&1 && grep -q "^present_past " "$tmp/tasks.out" && ok || bad "installed tasks: $(cat "$tmp/tasks.out")"
"$ep" run run.json > "$tmp/run.out" 2>&1 && ok || bad "installed run: $(tail -3 "$tmp/run.out")"
[ -f runs/pp/prompts.h5 ] && [ -f runs/pp/circuit.json ] && [ -f runs/pp/report.txt ] && ok || bad "run folder not under the working directory: $(ls -R runs 2>&1 | head)"
h5dump -a task_path runs/pp/prompts.h5 2>/dev/null | grep -qE "\"$prefix/(bin/\.\./)?share/edgepatch/datasets/tasks/present_past.json\"" && ok ||
  bad "task_path is not the prefix's: $(h5dump -a task_path runs/pp/prompts.h5 2>&1 | grep -i data -A2)"

# A task file given by a path: relative to the working directory; its pairs file relative to the task file.
sed 's#"pairs": "../pairs/present-past.json"#"pairs": "pairs/pp.json"#; s#"words": "../words/#"words": "'"$share"'/datasets/words/#' \
  "$share/datasets/tasks/present_past.json" > mytasks/pp.json
cp "$share/datasets/pairs/present-past.json" mytasks/pairs/pp.json
sed 's#"task": "present_past"#"task": "mytasks/pp.json"#; s#runs/pp#runs/own-task#' run.json > own-task.json
"$ep" run own-task.json --until tokenize > "$tmp/own.out" 2>&1 && [ -f runs/own-task/prompts.h5 ] && ok || bad "task by relative path: $(tail -3 "$tmp/own.out")"
# The same config started from another folder: its relative paths are taken from that folder, so the model is
# not found there (one line naming the field) and nothing is written beside the config.
mkdir -p "$tmp/elsewhere" && cd "$tmp/elsewhere" || exit 1
"$ep" run ../work/run.json > /dev/null 2> "$tmp/else.err"; rc=$?
[ "$rc" = 1 ] && [ "$(wc -l < "$tmp/else.err")" = 1 ] && grep -q "model" "$tmp/else.err" && [ ! -e runs ] && ok ||
  bad "config from another folder: status $rc, $(cat "$tmp/else.err")"
cd "$work" || exit 1

# sweep plan and submit --dry-run with the installed program: the template from the prefix, the jobs
# start the installed front.
cat > sweep.json <<'EOF'
{"name": "inst", "output_root": "sweeps/inst", "run": {"n_prompts": 4, "batch_size": 2, "n_shots": 2},
 "models": [{"name": "tiny", "path": "models/smollm-tiny", "gpus": 0}], "tasks": ["present_past", "country_capital"],
 "stages": [{"name": "all", "until": "patch"}]}
EOF
"$ep" sweep plan sweep.json > "$tmp/plan.out" 2>&1 && grep -q "^tiny/present_past " "$tmp/plan.out" && grep -q "^total " "$tmp/plan.out" &&
  ok || bad "installed sweep plan: $(cat "$tmp/plan.out")"
"$ep" sweep plan sweep.json --json > "$tmp/plan.json" 2>&1 && $(command -v /usr/bin/python3 || echo python3) -c 'import json,sys
p = json.load(open(sys.argv[1])); assert len(p["runs"]) == 2 and p["disk"]["total"] > 0, p' "$tmp/plan.json" && ok || bad "installed plan --json: $(cat "$tmp/plan.json")"
"$ep" sweep submit sweep.json --dry-run > "$tmp/dry.out" 2>&1 && ok || bad "installed submit --dry-run: $(cat "$tmp/dry.out")"
script=sweeps/inst/slurm/tiny-all.sbatch
body=$(grep -m1 '^failed=' "$share/slurm/edgepatch.sbatch")
[ -f "$script" ] && grep -qF -- "$body" "$script" && grep -q "^export EDGEPATCH='$prefix/bin/edgepatch'" "$script" && ok ||
  bad "script not from the installed template or program: $(cat "$script" 2>&1 | head -30)"

# Can-fail siblings: without the prefix's datasets/ the installed program finds no task, without its
# slurm/ no template (the working directory has neither, nor has anything above the prefix).
mv "$share/datasets" "$share/datasets.away"
"$ep" tasks > /dev/null 2> "$tmp/nodata.err"; rc=$?
[ "$rc" != 0 ] && grep -q "datasets/tasks: not found" "$tmp/nodata.err" && ok || bad "can-fail: tasks found without the prefix's datasets (status $rc)"
EDGEPATCH_DATA=$share/datasets.away "$ep" tasks > /dev/null 2>&1 && ok || bad "EDGEPATCH_DATA not honoured"
mv "$share/datasets.away" "$share/datasets"
mv "$share/slurm" "$share/slurm.away"
rm -rf sweeps
"$ep" sweep submit sweep.json --dry-run > /dev/null 2> "$tmp/noslurm.err"; rc=$?
[ "$rc" = 1 ] && grep -q "slurm/edgepatch.sbatch: not found" "$tmp/noslurm.err" && ok || bad "can-fail: a template found without the prefix's slurm/ (status $rc: $(cat "$tmp/noslurm.err"))"
mv "$share/slurm.away" "$share/slurm"

# The prefix moved as a whole still finds its data (the path is relative to the program).
mv "$prefix" "$tmp/moved"
"$tmp/moved/bin/edgepatch" tasks > "$tmp/moved.out" 2>&1 && grep -q "^present_past " "$tmp/moved.out" && ok || bad "moved prefix: $(cat "$tmp/moved.out")"
cd "$src" || exit 1
finish cli_install
