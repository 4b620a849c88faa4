#!/usr/bin/env bash
# edgepatch run with tensor_parallel (docs/tensor_parallel.md) on the tiny fixture of every architecture:
# an unlaunched whole-model run is the reference; mpirun -np 2 with tensor_parallel 2, -np 4 with 2
# groups of 2 and, where the heads split, -np 4 with one group of 4 (Gemma-2 and Llama-3 fixtures: 2 KV
# heads replicated over 4 ranks) must give the same patch metrics (exact for the booleans and generated
# tokens, 1e-5 relative for log-probabilities and logit differences), the same exact head-unit scores
# of a prune round (within 1e-5 of the round's largest) and the same kept units (up to units tied with
# the cut, where summation order decides; the rounds after such a swap score another circuit and are
# skipped, with a line saying so). The same again with attribution scores (the backward pass on
# a split model) and two rounds, heads then edges. The two runs with groups of 2 are byte-identical (an
# item is computed the same whichever group runs it). A split model on the offset backend (device-style
# memory) gives the cpu split run's bytes. Then the refusals: a group that does not fit the ranks, heads
# that do not split.
set -u
bin=$1
. "$(dirname "$0")/cli_harness.bash"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
export OMPI_MCA_rmaps_base_oversubscribe=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
mpi_asan="ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0"  # as in cli_mpi.sh
if ! command -v mpirun > /dev/null; then echo "cli_tp: mpirun not found" >&2; exit 1; fi

config() {  # name model prefix tensor_parallel [importance]: exact scores one head round, attribution a head and an edge round
  local imp=${5:-exact} edges=0
  [ "$imp" = attribution ] && edges=1
  printf '{"task": "person_sport", "model_name": "%s_prune_heads_in_circuits", "model_path": "tests/fixtures/models/%s", "output_path": "%s/%s", "n_prompts": 4, "batch_size": 2, "seed": 3, "n_shots": 3, "max_new_tokens": 3, "affect_whom": [["x", "y"]], "importance": "%s", "prune_rounds": {"heads": 1, "edges": %s}, "prune_fraction": 0.3, "tensor_parallel": %s}\n' \
    "$3" "$2" "$tmp" "$1" "$imp" "$edges" "$4" > "$tmp/$1.json"
}
run() {  # name ranks (0: no mpirun): status in $rc
  if [ "$2" = 0 ]; then timeout 300 "$bin" run "$tmp/$1.json" > "$tmp/$1.out" 2>&1
  else env "$mpi_asan" timeout 300 mpirun -np "$2" "$bin" run "$tmp/$1.json" > "$tmp/$1.out" 2>&1; fi
  rc=$?
}
# Patch metrics and every round's scores of run $2 equal to run $1's (within the tolerances above); $3:
# the scores' method, $4: the rounds.
same_results() {
  local d r
  for d in correct first_token_correct generated target_logprob logit_diff; do
    for g in plan clean; do
      h5diff -p 1e-5 --exclude-attribute /$g/$d "$tmp/$1/patch.h5" "$tmp/$2/patch.h5" /$g/$d > "$tmp/diff" || { echo "  $2: /$g/$d: $(head -3 "$tmp/diff")" >&2; return 1; }
    done
  done
  local args=() r
  for r in $4; do
    "$bin" scores "$tmp/$1" --round $r --json > "$tmp/s1-$r.json" && "$bin" scores "$tmp/$2" --round $r --json > "$tmp/s2-$r.json" || return 1
    args+=("$tmp/s1-$r.json" "$tmp/s2-$r.json")
  done
  python3 - "$2" "$3" "${args[@]}" <<'PY' || return 1
import json, sys
name, method, files = sys.argv[1], sys.argv[2], sys.argv[3:]
key = lambda u: json.dumps({k: v for k, v in u.items() if k != "score"}, sort_keys=True)
ok = True
for r in range(len(files) // 2):
    a, b = (json.load(open(p)) for p in files[2 * r:2 * r + 2])
    sa, sb = ({key(u): u["score"] for u in s["units"]} for s in (a, b))
    scale = max(abs(x) for x in sa.values()) or 1.0
    err = max(abs(sa[k] - sb[k]) for k in sa if k in sb) / scale
    # The kept sets may differ only by units tied (within the tolerance) with the cut: summation order,
    # which differs between a split and a whole model and between machines, decides between scores
    # that are equal up to rounding.
    ka, kb = set(map(key, a["kept"])), set(map(key, b["kept"]))
    cut = min(sa[k] for k in ka)
    swapped = ka ^ kb
    ties = all(k in sa and k in sb and abs(sa[k] - cut) <= 1e-5 * scale and abs(sb[k] - cut) <= 1e-5 * scale for k in swapped)
    ok &= set(sa) == set(sb) and err <= 1e-5 and len(ka) == len(kb) and ties and a["method"] == b["method"] == method
    print("  %s round %d: %d %s units, max score error %.1e of the largest, kept %d, %d swapped at a tie (%s)" % (name, r, len(sa), a["kind"], err, len(kb), len(swapped) // 2, "ok" if ties else "NOT TIED"))
    if swapped and r + 1 < len(files) // 2:
        # The next rounds score units of two different circuits: nothing there is comparable.
        print("  %s rounds %d..%d not compared: round %d kept other units at a tie" % (name, r + 1, len(files) // 2 - 1, r))
        break
sys.exit(0 if ok else 1)
PY
}

for imp in exact:0 attribution:0,1; do
  IFS=: read -r imp rounds <<< "$imp"
  for spec in gemma2-tiny:gemma2:4 llama3-tiny:llama3:4 smollm-tiny:smollm:2 phi2-tiny:phi2:4; do
    IFS=: read -r model prefix max_tp <<< "$spec"
    m=$model-$imp
    config $m-ref $model $prefix 1 $imp
    run $m-ref 0
    [ $rc = 0 ] && ok || { bad "$m reference run: status $rc: $(tail -3 "$tmp/$m-ref.out")"; continue; }
    for case in tp2:2:2 groups2x2:4:2 tp4:4:4; do
      IFS=: read -r name np tp <<< "$case"
      [ "$tp" -gt "$max_tp" ] && continue
      config $m-$name $model $prefix $tp $imp
      run $m-$name $np
      [ $rc = 0 ] && same_results $m-ref $m-$name $imp "${rounds//,/ }" && ok ||
        bad "$m $name (-np $np, tensor_parallel $tp): status $rc: $(tail -3 "$tmp/$m-$name.out")"
    done
    for f in patch.h5 prune.d/round-000.h5 prune.d/round-001.h5 circuit.json; do
      [ -e "$tmp/$m-tp2/$f" ] || [ -e "$tmp/$m-groups2x2/$f" ] || continue
      cmp -s "$tmp/$m-tp2/$f" "$tmp/$m-groups2x2/$f" || { bad "$m: 1 group of 2 and 2 groups of 2 differ in $f"; continue 2; }
    done
    ok
  done
done

# A split model on a device backend: "offset" (device-style memory; the group's sums and gathers staged
# through the host, as on GPUs without NCCL) computes what cpu computes, so its files are the cpu split
# run's bytes. Gemma-2 over 2 ranks, Llama-3 over 4 (KV heads replicated).
for spec in gemma2-tiny:gemma2:tp2:2:2 llama3-tiny:llama3:tp4:4:4; do
  IFS=: read -r model prefix name np tp <<< "$spec"
  config $model-$name-offset $model $prefix $tp
  sed -i 's/}$/, "backend": "offset"}/' "$tmp/$model-$name-offset.json"
  run $model-$name-offset $np
  [ $rc = 0 ] && cmp -s "$tmp/$model-exact-$name/patch.h5" "$tmp/$model-$name-offset/patch.h5" &&
    cmp -s "$tmp/$model-exact-$name/prune.d/round-000.h5" "$tmp/$model-$name-offset/prune.d/round-000.h5" && ok ||
    bad "$model $name on the offset backend: status $rc, or files differ from the cpu run's: $(tail -3 "$tmp/$model-$name-offset.out")"
done

# Refusals: status 1 and the one message naming the field.
refused() {  # name ranks needle
  run $1 $2
  [ $rc = 1 ] && [ "$(grep -c "edgepatch run:" "$tmp/$1.out")" = 1 ] && grep -q -- "$3" "$tmp/$1.out" && ok ||
    bad "$1: expected status 1 and '$3', got $rc: $(cat "$tmp/$1.out")"
}
config nofit smollm-tiny smollm 2
refused nofit 0 "field tensor_parallel: 2 does not divide the job's 1 rank"
config nofit4 smollm-tiny smollm 4
refused nofit4 2 "field tensor_parallel: 4 does not divide the job's 2 ranks"
config heads smollm-tiny smollm 4
refused heads 4 "num_attention_heads = 6 does not split over tensor_parallel = 4"
finish cli_tp
