#!/usr/bin/env bash
# edgepatch run with score and prune rounds (docs/pruning.md) on smollm-tiny: exact and attribution
# rounds (2 head + 2 edge), each round's file byte-identical to an uninterrupted run's after kill -9
# between rounds, in the middle of a round, while a round file is written, and at random moments;
# a config changed in the same folder is refused, --fresh rebuilds it; `scores --json` shows any
# round; prune_rounds 0 writes scores only; prune_using_imp_scores + prune_k prune by an earlier
# run's scores; compare_importance records both methods' rank agreement (recomputed here); exact
# rounds split units over work items.
set -u
bin=$1
. "$(dirname "$0")/cli_harness.bash"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1

config() {  # name importance [extra JSON fields]
  printf '{"task": "person_sport", "model_name": "smollm_prune_heads_in_circuits", "model_path": "tests/fixtures/models/smollm-tiny", "output_path": "%s/%s", "n_prompts": 8, "batch_size": 4, "seed": 5, "n_shots": 3, "max_new_tokens": 4, "affect_whom": [["x", "y"]], "importance": "%s", "prune_rounds": {"heads": 2, "edges": 2}, "prune_fraction": 0.2%s}\n' "$tmp" "$1" "$2" "${3:-}" > "$tmp/$1.json"
}
run() {  # name [env...]: status in $rc
  local name=$1; shift
  { env "$@" timeout 300 "$bin" run "$tmp/$name.json" > "$tmp/$name.out" 2>&1; rc=$?; } 2> /dev/null
}
same_as() {  # ref name: every round file, circuit.json/.txt and model_logs.json byte-identical
  local f bad_files=""
  for f in $(cd "$tmp/$1" && find prune.d -type f | sort) circuit.json circuit.txt model_logs.json; do
    cmp -s "$tmp/$1/$f" "$tmp/$2/$f" || bad_files="$bad_files $f"
  done
  [ -z "$bad_files" ] || { echo "  $2 differs from $1 in:$bad_files" >&2; return 1; }
  [ -z "$(find "$tmp/$2/prune.d" -name '*tmp-*')" ] || { echo "  $2 kept temporaries" >&2; return 1; }
}

for method in exact attribution; do
  config ref-$method $method
  run ref-$method
  [ $rc = 0 ] && [ "$(ls "$tmp/ref-$method/prune.d" | grep -c 'h5$')" = 4 ] && ok || bad "$method run: status $rc: $(cat "$tmp/ref-$method.out")"
  grep "^prune: round" "$tmp/ref-$method.out" | sed 's/^/  /'
  # kill -9 after one round, in the middle of round 2, while writing round 1's file (a temporary is left)
  for hook in 1 2:mid 1:write 0:write 3:mid; do
    name=k-$method-${hook/:/-}
    config $name $method
    run $name EDGEPATCH_TEST_KILL_ROUND=$hook
    killed=$rc
    [ $killed = 137 ] && ok || bad "$name: expected SIGKILL (137), got $killed: $(tail -3 "$tmp/$name.out")"
    case $hook in *write) [ -n "$(find "$tmp/$name/prune.d" -name '*tmp-*')" ] && ok || bad "$name: no temporary left by the kill mid-write";; esac
    run $name
    [ $rc = 0 ] && same_as ref-$method $name && ok || bad "$name: resumed run status $rc or differs"
  done
  echo "  $method: kill -9 after a round, mid-round, mid-write: resumed runs byte-identical to the uninterrupted one"
done

# The rounds' prompt batches are work items over MPI ranks: 1, 2 and 3 ranks give the same bytes; a
# rank killed with -9 while writing its first item shard ends the job, and a rerun completes it identically.
if command -v mpirun > /dev/null; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
  export OMPI_MCA_rmaps_base_oversubscribe=1
  mpi_asan="ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0"
  for np in 1 2 3; do
    config np$np exact
    { env "$mpi_asan" timeout 300 mpirun -np $np "$bin" run "$tmp/np$np.json" > "$tmp/np$np.out" 2>&1; rc=$?; } 2> /dev/null
    [ $rc = 0 ] && same_as ref-exact np$np && ok || bad "mpirun -np $np: status $rc or differs: $(tail -5 "$tmp/np$np.out")"
  done
  config mpikill exact
  { env "$mpi_asan" EDGEPATCH_TEST_KILL=prune:1:0:write timeout 300 mpirun -np 2 "$bin" run "$tmp/mpikill.json" > "$tmp/mpikill.out" 2>&1; rc=$?; } 2> /dev/null
  [ $rc != 0 ] && ok || bad "a rank killed mid-round: the job did not fail"
  { env "$mpi_asan" timeout 300 mpirun -np 2 "$bin" run "$tmp/mpikill.json" > "$tmp/mpikill.out" 2>&1; rc=$?; } 2> /dev/null
  [ $rc = 0 ] && same_as ref-exact mpikill && ok || bad "rerun after a killed rank: status $rc or differs: $(tail -5 "$tmp/mpikill.out")"
  echo "  mpirun -np 1, 2, 3: byte-identical round files, shards and circuit; a rank killed mid-write, rerun: identical"
fi

# kill -9 from outside at arbitrary moments, then resume until done
config rnd exact
for delay in 0.4 0.7 1.0 1.3; do
  { timeout -s KILL $delay "$bin" run "$tmp/rnd.json" > /dev/null 2>&1; } 2> /dev/null
done
run rnd
[ $rc = 0 ] && same_as ref-exact rnd && ok || bad "random kills: status $rc or differs"
echo "  kill -9 at 0.4, 0.7, 1.0, 1.3 s, then a rerun: byte-identical"

# Another config in the same folder is refused; --fresh rebuilds it as a run in a new folder would.
config ref-exact exact ', "prune_fraction": 0.3' 2> /dev/null
sed -i 's/"prune_fraction": 0.2, "prune_fraction": 0.3/"prune_fraction": 0.3/' "$tmp/ref-exact.json"
run ref-exact
[ $rc = 1 ] && grep -q -- "--fresh" "$tmp/ref-exact.out" && ok || bad "changed config not refused: $rc $(cat "$tmp/ref-exact.out")"
env timeout 300 "$bin" run "$tmp/ref-exact.json" --fresh > "$tmp/fresh.out" 2>&1 && ok || bad "--fresh: $(cat "$tmp/fresh.out")"
config other exact ', "prune_fraction": 0.3'
sed -i 's/"prune_fraction": 0.2, "prune_fraction": 0.3/"prune_fraction": 0.3/' "$tmp/other.json"
run other
[ $rc = 0 ] && same_as other ref-exact && ok || bad "--fresh rebuild differs from a new folder's run"
! same_as other k-exact-1 2> /dev/null && ok || bad "another prune_fraction gave the same files (the comparison cannot fail)"

# scores --json: any round; the kept set is a subset of the units
py_check() { local code=$1; shift; python3 -c "$code" "$@" 2>&1; }
out=$("$bin" scores "$tmp/ref-attribution" --round 0 --json)
py_check 'import json,sys; d=json.loads(sys.argv[1]); assert d["round"]==0 and d["kind"]=="head" and d["method"]=="attribution"; u=d["units"]; k=d["kept"]; assert len(u)>len(k)>0 and all("type" in x and "score" in x for x in u); print("  scores --round 0: %d head units, %d kept" % (len(u), len(k)))' "$out" && ok || bad "scores --round 0 --json: $out"
out=$("$bin" scores "$tmp/ref-attribution" --json)
py_check 'import json,sys; d=json.loads(sys.argv[1]); assert d["round"]==3 and d["kind"]=="edge" and "sender" in d["units"][0] and d["stop"]=="rounds"; print("  scores (last round): round 3, %d edge units, %d kept" % (len(d["units"]), len(d["kept"])))' "$out" && ok || bad "scores --json: $out"
"$bin" scores "$tmp/ref-attribution" --round 9 > /dev/null 2>&1; [ $? = 1 ] && ok || bad "a missing round is not an error"
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); assert len(d["prune"])==4 and d["prune"][3]["stop"]=="rounds"' "$tmp/ref-attribution/model_logs.json" && ok || bad "model_logs.json prune lines"
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); assert d["n_head_units"]>0 and d["n_edge_units"]>0 and d["by_type_and_layer"]["edges"]' "$tmp/ref-attribution/circuit.json" && ok || bad "circuit.json summary"

# prune_rounds 0: scores only; then an earlier run's scores drive pruning (prune_using_imp_scores, prune_k)
config s0 attribution
sed -i 's/"prune_rounds": {"heads": 2, "edges": 2}/"prune_rounds": 0/' "$tmp/s0.json"
run s0
out=$("$bin" scores "$tmp/s0" --json)
[ $rc = 0 ] && [ "$(ls "$tmp/s0/prune.d" | grep h5$)" = round-000.h5 ] && py_check 'import json,sys; d=json.loads(sys.argv[1]); assert d["stop"]=="scores_only" and len(d["kept"])==len(d["units"])' "$out" && ok || bad "prune_rounds 0: $rc $(cat "$tmp/s0.out")"
config imp attribution ", \"prune_using_imp_scores\": [\"$tmp/s0/prune.d/round-000.h5\"], \"prune_k\": [100]"
sed -i 's/"prune_rounds": {"heads": 2, "edges": 2}, //' "$tmp/imp.json"
run imp
a=$("$bin" scores "$tmp/s0" --json) b=$("$bin" scores "$tmp/imp" --round 0 --json)
[ $rc = 0 ] && python3 -c 'import json,sys; a=json.loads(sys.argv[1]); b=json.loads(sys.argv[2]); assert a["units"]==b["units"] and len(b["kept"])==100; top=sorted(range(len(a["units"])), key=lambda i: -a["units"][i]["score"])[:100]; assert sorted(json.dumps(a["units"][i] | {"score": 0}) for i in top)==sorted(json.dumps(k | {"score": 0}) for k in b["kept"])' "$a" "$b" && ok || bad "prune_using_imp_scores: $rc $(cat "$tmp/imp.out")"
echo "  prune_rounds 0 writes scores only; prune_using_imp_scores + prune_k [100] keeps that run's top 100"

# compare_importance: both methods score every round, exact prunes exactly as without the option (k-exact-1
# is ref-exact's config, ref-exact was rebuilt with another one above), the
# other method's scores are the attribution run's (round 0: the same full circuit), and the recorded
# rank agreement is what Spearman (average ranks) and the top-k overlap give recomputed here.
config cmp exact ', "compare_importance": true'
run cmp
[ $rc = 0 ] && [ "$(grep -c "rank agreement, attribution vs exact" "$tmp/cmp.out")" = 4 ] && ok || bad "compare_importance run: $rc $(cat "$tmp/cmp.out")"
agreement_check='
import json, sys
a, ref = json.loads(sys.argv[1]), json.loads(sys.argv[2])
att = json.loads(sys.argv[3]) if sys.argv[3] else None
assert {k: v for k, v in a.items() if k != "compare"} == ref, "pruning changed"
c = a["compare"]
assert c["method"] == "attribution"
if att: assert c["scores"] == [u["score"] for u in att["units"]], "attribution scores differ"
ex, at = [u["score"] for u in a["units"]], c["scores"]
def ranks(v):
    o = sorted(range(len(v)), key=lambda i: (-v[i], i)); r = [0.0] * len(v); i = 0
    while i < len(o):
        j = i
        while j + 1 < len(o) and v[o[j + 1]] == v[o[i]]: j += 1
        for k in range(i, j + 1): r[o[k]] = (i + j) / 2 + 1
        i = j + 1
    return r
def spearman(x, y):
    rx, ry = ranks(x), ranks(y); n = len(x); mx, my = sum(rx) / n, sum(ry) / n
    sxy = sum((p - mx) * (q - my) for p, q in zip(rx, ry))
    return sxy / (sum((p - mx) ** 2 for p in rx) * sum((q - my) ** 2 for q in ry)) ** 0.5
k = c["top_k"]
top = lambda v: set(sorted(range(len(v)), key=lambda i: (-v[i], i))[:k])
assert abs(spearman(at, ex) - c["spearman"]) < 1e-6 and abs(spearman(at, [abs(e) for e in ex]) - c["spearman_abs_exact"]) < 1e-6, "spearman"
assert k == len(a["kept"]) and len(top(at) & top(ex)) == c["top_k_overlap"], "top-k"
print("  compare_importance round %d: Spearman %.3f (|exact| %.3f), top-%d overlap %d: recomputed, pruning as without it" % (a["round"], c["spearman"], c["spearman_abs_exact"], k, c["top_k_overlap"]))
'
for r in 0 1 2 3; do
  a=$("$bin" scores "$tmp/cmp" --round $r --json) ref=$("$bin" scores "$tmp/k-exact-1" --round $r --json) att=""
  [ $r = 0 ] && att=$("$bin" scores "$tmp/ref-attribution" --round 0 --json)
  py_check "$agreement_check" "$a" "$ref" "$att" > "$tmp/cmp.check"; [ $? = 0 ] && ok || bad "compare round $r: $(cat "$tmp/cmp.check")"
  sed -n 1p "$tmp/cmp.check"
done
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); assert all(r["rank_agreement"]["compared_with"]=="attribution" for r in d["prune"])' "$tmp/cmp/model_logs.json" && ok || bad "model_logs.json rank_agreement"

# Exact rounds' work items are prompt batches x groups of exact_units_per_item units (ranks share the
# units): 7 units per item (2 batches x 18 groups) scores as one group per batch does.
for g in 7 1000; do
  config grp$g exact ", \"exact_units_per_item\": $g"
  sed -i 's/"prune_rounds": {"heads": 2, "edges": 2}/"prune_rounds": 0/' "$tmp/grp$g.json"
  run grp$g
  [ $rc = 0 ] || bad "exact_units_per_item $g: $rc $(cat "$tmp/grp$g.out")"
done
grep -q "^prune: 36 items" "$tmp/grp7.out" && grep -q "^prune: 2 items" "$tmp/grp1000.out" && ok || bad "unit groups: not 36 and 2 items"
a=$("$bin" scores "$tmp/grp7" --json) b=$("$bin" scores "$tmp/grp1000" --json)
py_check 'import json,sys; a=json.loads(sys.argv[1]); b=json.loads(sys.argv[2]); assert [u | {"score": 0} for u in a["units"]]==[u | {"score": 0} for u in b["units"]] and a["metrics"]==b["metrics"]; d=max(abs(x["score"]-y["score"]) for x, y in zip(a["units"], b["units"])); assert d < 1e-5, d; print("  exact_units_per_item 7 (36 items) vs 1000 (2 items): %d unit scores, max diff %.2g" % (len(a["units"]), d))' "$a" "$b" > "$tmp/grp.check" && ok || bad "unit groups change the scores: $(cat "$tmp/grp.check")"
cat "$tmp/grp.check"

finish cli_prune
