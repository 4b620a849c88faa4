#!/usr/bin/env bash
# EAP-IG end to end (docs/attribution.md "EAP-IG", docs/pruning.md) on smollm-tiny through edgepatch run:
#  - "importance": "eap-ig" with "ig_steps": 1 is attribution: every round's scores and kept set equal an
#    attribution run's (1 head + 1 edge round), the round files say method eap-ig, ig_steps 1;
#  - with compare_importance (ig_steps 5, the default) every round records exact's scores, attribution's
#    and both methods' rank agreement with exact, recomputed here from the scores (Spearman with average
#    ranks, top-k overlap); round 0's attribution scores are the attribution run's; model_logs.json's
#    rank_agreement keeps attribution's figures at the top and has both under by_method; ig_steps 5
#    changes the scores (the sibling: the path matters);
#  - batch_size 3, 4 and 8 give the same EAP-IG scores (to fp32 rounding);
#  - bad ig_steps are refused with one line naming the field, before any output.
# EAP-IG's cost against attribution's is bench_backward --ig-steps's (docs/benchmarks.md): on these tiny
# runs the passes are a small part of a round.
set -u
bin=$1
. "$(dirname "$0")/cli_harness.bash"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1

config() {  # name importance [extra JSON fields]
  printf '{"task": "person_sport", "model_name": "smollm_prune_heads_in_circuits", "model_path": "tests/fixtures/models/smollm-tiny", "output_path": "%s/%s", "n_prompts": 8, "batch_size": 4, "seed": 5, "n_shots": 3, "max_new_tokens": 4, "affect_whom": [["x", "y"]], "importance": "%s", "prune_rounds": {"heads": 1, "edges": 1}, "prune_fraction": 0.2%s}\n' "$tmp" "$1" "$2" "${3:-}" > "$tmp/$1.json"
}
run() {  # name: status in $rc
  { timeout 600 "$bin" run "$tmp/$1.json" > "$tmp/$1.out" 2>&1; rc=$?; } 2> /dev/null
}
py_check() { local code=$1; shift; python3 -c "$code" "$@" 2>&1; }

config att attribution
run att
[ $rc = 0 ] && ok || bad "attribution run: $rc $(cat "$tmp/att.out")"
config ig1 eap-ig ', "ig_steps": 1'
run ig1
[ $rc = 0 ] && ok || bad "eap-ig ig_steps 1 run: $rc $(cat "$tmp/ig1.out")"
grep -q "round 0 (head units, eap-ig)" "$tmp/ig1.out" && ok || bad "no eap-ig round line: $(cat "$tmp/ig1.out")"
for r in 0 1; do
  a=$("$bin" scores "$tmp/att" --round $r --json) b=$("$bin" scores "$tmp/ig1" --round $r --json)
  py_check 'import json,sys; a=json.loads(sys.argv[1]); b=json.loads(sys.argv[2]); assert b["method"]=="eap-ig" and b["ig_steps"]==1 and a["method"]=="attribution" and "ig_steps" not in a; assert a["units"]==b["units"] and a["kept"]==b["kept"], "scores differ"; print("  round %d (%s): eap-ig with ig_steps 1 = attribution, %d unit scores equal" % (a["round"], a["kind"], len(a["units"])))' "$a" "$b" > "$tmp/ig1.check" && ok || bad "ig_steps 1 vs attribution round $r: $(cat "$tmp/ig1.check")"
  cat "$tmp/ig1.check"
done
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); assert all(r["method"]=="eap-ig" and r["ig_steps"]==1 for r in d["prune"])' "$tmp/ig1/model_logs.json" && ok || bad "model_logs.json: method, ig_steps"

# compare_importance with the default 5 steps
config cmp eap-ig ', "compare_importance": true'
run cmp
[ $rc = 0 ] && [ "$(grep -c "rank agreement, eap-ig vs exact" "$tmp/cmp.out")" = 2 ] && [ "$(grep -c "rank agreement, attribution vs exact" "$tmp/cmp.out")" = 2 ] && ok || bad "compare run: $rc $(cat "$tmp/cmp.out")"
grep "rank agreement" "$tmp/cmp.out" | sed 's/^/  /'
agreement_check='
import json, sys
a = json.loads(sys.argv[1]); att = json.loads(sys.argv[2]) if sys.argv[2] else None
logs = json.load(open(sys.argv[3]))["prune"][a["round"]]
assert a["method"] == "eap-ig" and a["ig_steps"] == 5 and logs["ig_steps"] == 5
c = a["compare"]
assert c["method"] == "exact"
ig, ex, at = [u["score"] for u in a["units"]], c["scores"], c["attribution_scores"]
if att:
    assert at == [u["score"] for u in att["units"]], "attribution scores differ from the attribution run"
    d = max(abs(x - y) for x, y in zip(ig, at)) / max(abs(y) for y in at)
    assert d > 1e-2, "eap-ig (5 steps) equals attribution: %g" % d
    print("  round 0: eap-ig (5 steps) differs from attribution by %.3g of the largest score" % d)
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
for name, s, g in (("attribution", at, c), ("eap-ig", ig, c["eap_ig"])):
    assert abs(spearman(s, ex) - g["spearman"]) < 1e-6, name + " spearman"
    assert abs(spearman(s, [abs(e) for e in ex]) - g["spearman_abs_exact"]) < 1e-6, name + " spearman |exact|"
    assert g["top_k"] == k == len(a["kept"]) and len(top(s) & top(ex)) == g["top_k_overlap"], name + " top-k"
    lg = logs["rank_agreement"]["by_method"][name]
    assert sorted(lg) == ["spearman", "spearman_abs_exact", "top_k", "top_k_overlap"], name + " model_logs fields"
    assert all(abs(lg[f] - g[f]) < 1e-6 for f in lg), name + " model_logs figures"
ra = logs["rank_agreement"]
assert ra["compared_with"] == "exact" and abs(ra["spearman"] - c["spearman"]) < 1e-6 and ra["top_k_overlap"] == c["top_k_overlap"], "top-level figures are not attribution'"'"'s"
print("  round %d (%s): Spearman with exact, attribution %.3f, eap-ig %.3f (|exact|: %.3f, %.3f); top-%d overlap %d, %d: recomputed" % (a["round"], a["kind"], c["spearman"], c["eap_ig"]["spearman"], c["spearman_abs_exact"], c["eap_ig"]["spearman_abs_exact"], k, c["top_k_overlap"], c["eap_ig"]["top_k_overlap"]))
'
for r in 0 1; do
  a=$("$bin" scores "$tmp/cmp" --round $r --json) att=""
  [ $r = 0 ] && att=$("$bin" scores "$tmp/att" --round 0 --json)
  py_check "$agreement_check" "$a" "$att" "$tmp/cmp/model_logs.json" > "$tmp/cmp.check"; [ $? = 0 ] && ok || bad "compare round $r: $(cat "$tmp/cmp.check")"
  cat "$tmp/cmp.check"
done
"$bin" scores "$tmp/cmp" --round 0 | grep -q "rank agreement, eap-ig (5 steps) vs exact" && ok || bad "scores: no eap-ig agreement line"

# Batch-size independence (each prompt's loss on its own at every path point): batch_size 3 (an uneven
# last batch) and 8 give batch_size 4's EAP-IG scores, to fp32 rounding over other batch shapes.
for bs in 3 4 8; do
  config bs$bs eap-ig ", \"batch_size\": $bs"
  sed -i 's/"batch_size": 4, //; s/"prune_rounds": {"heads": 1, "edges": 1}/"prune_rounds": 0/' "$tmp/bs$bs.json"
  run bs$bs
  [ $rc = 0 ] || bad "batch_size $bs: $rc $(cat "$tmp/bs$bs.out")"
done
a=$("$bin" scores "$tmp/bs4" --json) b=$("$bin" scores "$tmp/bs3" --json) c=$("$bin" scores "$tmp/bs8" --json)
py_check 'import json,sys; r=[json.loads(x) for x in sys.argv[1:]]; s=[[u["score"] for u in d["units"]] for d in r]; m=max(abs(x) for x in s[0]); d=max(abs(x-y) for t in s[1:] for x, y in zip(s[0], t)); assert d <= 1e-5 * m, d / m; print("  batch_size 4, 3, 8: eap-ig scores within %.2g of the largest" % (d / m))' "$a" "$b" "$c" > "$tmp/bs.check" && ok || bad "batch size changes eap-ig scores: $(cat "$tmp/bs.check")"
cat "$tmp/bs.check"

# Bad ig_steps: one line naming the field, exit 1, no run folder made.
for bad_field in '"ig_steps": 0' '"ig_steps": 2.5' '"ig_steps": "5"'; do
  config badig eap-ig ", $bad_field"
  run badig
  [ $rc = 1 ] && [ "$(wc -l < "$tmp/badig.out")" = 1 ] && grep -q "field ig_steps" "$tmp/badig.out" && [ ! -e "$tmp/badig" ] && ok || bad "$bad_field: $rc $(cat "$tmp/badig.out")"
done
config badig attribution ', "ig_steps": 5'
run badig
[ $rc = 1 ] && grep -q "field ig_steps: only with" "$tmp/badig.out" && [ ! -e "$tmp/badig" ] && ok || bad "ig_steps with attribution: $rc $(cat "$tmp/badig.out")"
sed -i 's/"importance": "attribution", //' "$tmp/badig.json"
run badig
[ $rc = 1 ] && grep -q "field ig_steps: only with" "$tmp/badig.out" && ok || bad "ig_steps without importance: $rc $(cat "$tmp/badig.out")"
echo "  bad ig_steps (0, 2.5, \"5\", with attribution, without importance): refused, one line naming the field"

finish cli_eapig
