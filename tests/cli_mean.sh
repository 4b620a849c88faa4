#!/usr/bin/env bash
# The mean donor (donor kind "mean", docs/donors.md) end to end on smollm-tiny: tokenize, the mean stage
# (70 prompts: two chunks of MEAN_CHUNK = 64 and 6), cache and patch with edges y -> last ablated by the
# mean donor. The mean chunks are byte-identical for batch sizes 2 and 3 and for 1 and 2 MPI ranks (and
# every cache shard and patch.h5 for 1 and 2 ranks); a run killed while writing the second chunk leaves
# no chunk that looks complete and resumes to the same bytes; a rerun recomputes nothing; configs the
# mean donor cannot run, and a task file naming an unknown donor task, are refused before anything runs.
set -u
bin=$1
. "$(dirname "$0")/cli_harness.bash"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
export OMPI_MCA_rmaps_base_oversubscribe=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
mpi_asan="ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0"

config() {  # name batch_size [extra fields]
  printf '{"task": "person_sport", "model_name": "smollm_ablate_edges", "model_path": "tests/fixtures/models/smollm-tiny", "output_path": "%s/%s", "n_prompts": 70, "batch_size": %s, "seed": 3, "donors": ["mean"], "n_shots": 3, "max_new_tokens": 2, "affect_whom": [["y", "last"]]%s}\n' "$tmp" "$1" "$2" "${3:-}" > "$tmp/$1.json"
}
same_files() {  # run_a run_b files...
  local a=$1 b=$2 f bad_files=""; shift 2
  for f in "$@"; do cmp -s "$tmp/$a/$f" "$tmp/$b/$f" || bad_files="$bad_files $f"; done
  [ -z "$bad_files" ] || echo "  $b differs from $a in:$bad_files" >&2
  [ -z "$bad_files" ]
}

config b2 2
timeout 300 "$bin" run "$tmp/b2.json" --until patch > "$tmp/b2.out" 2>&1 && [ -f "$tmp/b2/mean.d/item-00001.h5" ] &&
  [ ! -f "$tmp/b2/mean.d/item-00002.h5" ] && [ -f "$tmp/b2/patch.h5" ] && ok || bad "run with the mean donor: $(tail -3 "$tmp/b2.out")"
chunks=$(cd "$tmp/b2" && ls mean.d/*.h5 2>/dev/null)
grep -q "mean donor: 70 prompts in 2 chunks" "$tmp/b2.out" && ok || bad "no mean stage line: $(cat "$tmp/b2.out")"
# The donor row of a mean donor is the clean prompt (nothing is substituted at tokenize).
"$bin" show "$tmp/b2" --prompt 0 --json > "$tmp/show.json" 2>&1 && python3 -c "
import json, sys
d = json.load(open(sys.argv[1])); sys.exit(0 if d['donors'][0] == d['tokens'] else 1)" "$tmp/show.json" && ok ||
  bad "show: the mean donor's row is not the clean prompt"

config b3 3
timeout 300 "$bin" run "$tmp/b3.json" --until cache > "$tmp/b3.out" 2>&1 && same_files b2 b3 $chunks && ok ||
  bad "batch sizes 2 and 3: mean chunks differ $(tail -2 "$tmp/b3.out")"

if command -v mpirun > /dev/null; then
  config r2 2
  env "$mpi_asan" timeout 300 mpirun -np 2 "$bin" run "$tmp/r2.json" --until patch > "$tmp/r2.out" 2>&1 &&
    same_files b2 r2 $chunks $(cd "$tmp/b2" && ls cache.d/*.h5) patch.h5 && ok || bad "1 and 2 ranks differ: $(tail -3 "$tmp/r2.out")"
else
  bad "mpirun not found"
fi

# Killed while writing the second chunk: no complete-looking chunk 1, the rerun resumes to the same bytes.
config k 2
EDGEPATCH_TEST_KILL=mean:0:1:write timeout 300 "$bin" run "$tmp/k.json" --until cache > "$tmp/k.out" 2>&1
[ -f "$tmp/k/mean.d/item-00000.h5" ] && [ ! -f "$tmp/k/mean.d/item-00001.h5" ] && ok ||
  bad "kill mid-write of chunk 1: $(ls "$tmp/k/mean.d" 2>&1 | tr '\n' ' ') $(tail -2 "$tmp/k.out")"
timeout 300 "$bin" run "$tmp/k.json" --until cache > "$tmp/k2.out" 2>&1 && same_files b2 k $chunks && ok ||
  bad "resume after the kill: $(tail -3 "$tmp/k2.out")"
[ -z "$(ls "$tmp/k/mean.d" | grep tmp-)" ] && ok || bad "temporaries kept in mean.d"
# A rerun of a finished run recomputes nothing.
before=$(stat -c %Y.%i "$tmp/b2/mean.d/item-00000.h5")
timeout 300 "$bin" run "$tmp/b2.json" --until patch > "$tmp/again.out" 2>&1 &&
  [ "$(stat -c %Y.%i "$tmp/b2/mean.d/item-00000.h5")" = "$before" ] && ok || bad "rerun rewrote a mean chunk"

# Exact scores averaged over two donors, the mean donor and a corrupted prompt (the donors rotate between
# the evaluations: the mean donor moves with its index), and attribution scores from the mean donor.
for imp in exact attribution; do
  config s_$imp 2 ', "mode": "prune_heads_in_circuits", "importance": "'$imp'", "prune_rounds": {"heads": 1, "edges": 0}, "n_prompts": 8, "exact_units_per_item": 8'
  sed -i 's/"model_name": "smollm_ablate_edges", //; s/"donors": \["mean"\]/"donors": ["mean", "random_xy"]/; s/"n_prompts": 70, //' "$tmp/s_$imp.json"
  [ "$imp" = exact ] && sed -i 's/}$/, "score_donors": 2}/' "$tmp/s_$imp.json"
  timeout 300 "$bin" run "$tmp/s_$imp.json" --until score > "$tmp/s_$imp.out" 2>&1 && [ -f "$tmp/s_$imp/prune.d/round-000.h5" ] && ok ||
    bad "$imp scores with the mean donor: $(tail -3 "$tmp/s_$imp.out")"
done

# Refused before anything runs: eap-ig from a mean donor, tensor parallel.
config e 2 ', "mode": "prune_heads_in_circuits", "importance": "eap-ig", "prune_rounds": 1'
sed -i 's/"model_name": "smollm_ablate_edges", //' "$tmp/e.json"
expect_error 1 "eap-ig" check "$tmp/e.json"
config t 2 ', "tensor_parallel": 2'
expect_error 1 "tensor-parallel" check "$tmp/t.json"
[ ! -e "$tmp/e" ] && [ ! -e "$tmp/t" ] && ok || bad "a refused config wrote its run folder"

# A task file naming an unknown donor task: one line naming the file and the field, from the config check.
sed 's/"donor_tasks": \[[^]]*\]/"donor_tasks": ["no_such_task"]/; s|"\.\./|"'"$PWD"'/datasets/|g' datasets/tasks/person_sport.json > "$tmp/bad_task.json"
config bt 2
sed -i 's|"task": "person_sport"|"task": "'"$tmp"'/bad_task.json"|' "$tmp/bt.json"
expect_error 1 "bad_task.json: field donor_tasks\[0\]: unknown task 'no_such_task'" check "$tmp/bt.json"

finish cli_mean
