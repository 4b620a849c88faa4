#!/usr/bin/env bash
# Attribution scores do not depend on batch_size (docs/attribution.md): each prompt's loss is its own, a
# unit's score is the mean over prompts of |its per-prompt sum|. An attribution run (a head round, then
# an edge round) of 8 prompts with batch_size 1, 3 (batches of 3, 3, 2) and 7 (7, 1) gives the same head
# and edge scores within 5e-6 of the round's largest score (as tests/cli_tp.sh; observed: 2.4e-7 to
# 3.2e-7 on Gemma-2, 6.1e-7 to 1.6e-6 on Llama-3: fp32 products over other batch shapes round
# differently, and the worst error relative to each unit's own score is printed too) and the same kept
# units, on Gemma-2 and Llama-3 fixtures. (The original's batch mean made a batch of
# 3 score a third of a batch of 1, and the prompts of a short last batch weigh more.)
set -u
bin=$1
. "$(dirname "$0")/cli_harness.bash"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1

for model in gemma2-tiny llama3-tiny; do
  for B in 1 3 7; do
    name=$model-b$B
    printf '{"task": "person_sport", "model_name": "x_prune_heads_in_circuits", "model_path": "tests/fixtures/models/%s", "output_path": "%s/%s", "n_prompts": 8, "batch_size": %s, "seed": 4, "n_shots": 3, "max_new_tokens": 2, "affect_whom": [["x", "y"]], "importance": "attribution", "prune_rounds": {"heads": 1, "edges": 1}, "prune_fraction": 0.3}\n' \
      "$model" "$tmp" "$name" "$B" > "$tmp/$name.json"
    timeout 300 "$bin" run "$tmp/$name.json" --until prune > "$tmp/$name.out" 2>&1 || { bad "$name: $(tail -3 "$tmp/$name.out")"; continue; }
    for r in 0 1; do "$bin" scores "$tmp/$name" --round $r --json > "$tmp/$name.r$r.json" || bad "$name: scores --round $r"; done
  done
  for B in 3 7; do
    python3 - "$tmp/$model-b1" "$tmp/$model-b$B" "$model" "$B" <<'PY' && ok || bad "$model: batch_size $B gives other scores than batch_size 1"
import json, sys
a, b, model, B = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
key = lambda u: json.dumps({k: v for k, v in u.items() if k != "score"}, sort_keys=True)
ok = True
for r in (0, 1):
    x, y = (json.load(open(f"{p}.r{r}.json")) for p in (a, b))
    sx, sy = ({key(u): u["score"] for u in s["units"]} for s in (x, y))
    top = max(abs(v) for v in sx.values()) or 1.0
    same_units = set(sx) == set(sy)
    err = max(abs(sx[k] - sy[k]) for k in sx) / top if same_units else float("inf")
    own = max(abs(sx[k] - sy[k]) / max(abs(sx[k]), 1e-12) for k in sx) if same_units else float("inf")
    same_kept = set(map(key, x["kept"])) == set(map(key, y["kept"]))
    print(f"  {model} round {r}: {len(sx)} {x['kind']} units, batch_size {B} vs 1: max score error {err:.1e} of the largest"
          f" ({own:.1e} of the unit's own), kept sets {'equal' if same_kept else 'DIFFER'}")
    ok &= err <= 5e-6 and same_kept
sys.exit(0 if ok else 1)
PY
  done
done
finish cli_batch
