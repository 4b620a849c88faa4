#!/usr/bin/env bash
# The demo end to end on the real model (models/smollm2-135m-instruct, fetched by tools/fetch_smollm2.sh,
# which tools/test.sh runs before ctest): configs/demo.json shortened (few prompts, fewer ablations,
# one head and one edge round) runs tokenize -> cache -> patch with ablations -> prune -> report.
# Checks: every stage's output is complete; model_logs.json has the full-model accuracy, one entry per
# ablation and one per round; the full model is well above chance on Present-Past (chance = 1 / the
# number of distinct answers, about 1/290; the bound asked is 0.5); ablating every y -> last edge drops
# accuracy by at least 0.3 (the paper's main finding); bos -> all changes nothing (the donor's bos is
# the prompt's, so its keys and values are identical: an exact check of the ablation path); the figures
# are valid PNG / PDF / SVG with their CSVs (a row per heatmap cell, n and the 95% interval);
# `edgepatch report` redraws them and matches report.txt; without gnuplot and dot
# the report skips the figures in one line each and still succeeds; bad input gets one-line errors.
# Under AddressSanitizer (EP_SANITIZED=1, set by tests/CMakeLists.txt) the same checks run on a smaller
# demo: 4 prompts, 3 ablations.
set -u
bin=$1
. "$(dirname "$0")/cli_harness.bash"
model=models/smollm2-135m-instruct
if [ ! -f $model/config.json ]; then
  bad "$model is missing: run tools/fetch_smollm2.sh first (tools/test.sh does)"
  finish cli_demo
  exit
fi

if [ "${EP_SANITIZED:-0}" = 1 ]; then
  prompts=4 batch=4 keep='["y->last L0-9", "bos->all L0-9"]' note="(smaller demo under AddressSanitizer)"
else
  prompts=10 batch=5 keep='["y->last L0-9", "y->last L10-19", "y->last L20-29", "x->last L10-19", "query->last L10-19", "bos->all L0-9"]' note=""
fi
jq --arg out "$tmp/demo" --argjson p $prompts --argjson b $batch --argjson keep "$keep" '
  .output_path = $out | .n_prompts = $p | .batch_size = $b
  | .ablations = ([.ablations[] | select(.name as $n | $keep | index($n))]
                  + [{"name": "y->last all layers", "rules": [{"sender": ["y"], "receiver": ["last"]}]}])
  | .prune_rounds = {"heads": 1, "edges": 1} | .prune_k = [473, 20]' configs/demo.json > "$tmp/demo.json"
n_ablations=$(jq '.ablations | length' "$tmp/demo.json")

start=$(date +%s)
timeout 900 "$bin" run "$tmp/demo.json" > "$tmp/run.out" 2>&1
rc=$?
echo "cli_demo: demo of $prompts prompts, $n_ablations ablations, 2 rounds: exit $rc in $(($(date +%s) - start)) s $note"
[ $rc = 0 ] && ok || bad "demo run: status $rc: $(tail -5 "$tmp/run.out")"
d=$tmp/demo
for f in prompts.h5 patch.h5 prune.d/round-000.h5 prune.d/round-001.h5 circuit.json model_logs.json report.txt \
         accuracy_drop.png accuracy_drop.pdf accuracy_drop.svg accuracy_drop.gp accuracy_drop.csv circuit.png circuit.svg \
         circuit.pdf circuit.dot circuit.csv; do
  [ -s "$d/$f" ] && ok || bad "missing $f"
done
[ "$(ls "$d/cache.d" | grep -c 'item-.*h5$')" = $(((prompts + batch - 1) / batch)) ] && ok || bad "cache shards: $(ls "$d/cache.d")"
[ -z "$(find "$d" -name '*tmp-*')" ] && ok || bad "temporaries left: $(find "$d" -name '*tmp-*')"

logs=$d/model_logs.json
full=$(jq '.full_model_accuracy' "$logs")
echo "cli_demo: full-model accuracy $full over $prompts prompts; ablations: $(jq -c '[.ablations[] | [.name, .accuracy]]' "$logs")"
jq -e '.full_model_accuracy >= 0.5' "$logs" > /dev/null && ok || bad "full-model accuracy $full is not well above chance (>= 0.5)"
jq -e --argjson n "$n_ablations" '(.ablations | length) == $n and all(.ablations[]; (.accuracy | type) == "number")' "$logs" > /dev/null \
  && ok || bad "model_logs.json: ablations: $(jq -c .ablations "$logs")"
jq -e '(.prune | length) == 2 and all(.prune[]; (.faithfulness_logit_diff | type) == "number")' "$logs" > /dev/null \
  && ok || bad "model_logs.json: prune: $(jq -c .prune "$logs")"
jq -e '.full_model_accuracy - (.ablations[] | select(.name == "y->last all layers") | .accuracy) >= 0.3' "$logs" > /dev/null \
  && ok || bad "ablating every y -> last edge should drop accuracy by 0.3 or more"
jq -e '(.ablations[] | select(.name == "bos->all L0-9")) as $a | $a.accuracy == .full_model_accuracy
       and $a.mean_logit_diff == .full_model_mean_logit_diff' "$logs" > /dev/null \
  && ok || bad "bos -> all should change nothing (identical bos keys and values)"

is_png() { [ "$(head -c 8 "$1" | od -An -tx1 | tr -d ' \n')" = 89504e470d0a1a0a ]; }
for f in accuracy_drop.png circuit.png; do is_png "$d/$f" && ok || bad "$f is not a PNG"; done
for f in circuit.svg accuracy_drop.svg; do head -c 400 "$d/$f" | grep -q '<svg' && ok || bad "$f is not SVG"; done
for f in circuit.pdf accuracy_drop.pdf; do [ "$(head -c 5 "$d/$f")" = "%PDF-" ] && ok || bad "$f is not PDF"; done
# one CSV row per heatmap cell (the ablations with group and band), with n and the interval
[ "$(($(wc -l < "$d/accuracy_drop.csv") - 1))" = "$(jq '[.ablations[] | select(.group and .band)] | length' "$logs")" ] &&
  awk -F, -v n=$prompts 'NR > 1 && ($5 != n || $9 == "" || $10 == "") {exit 1}' "$d/accuracy_drop.csv" && ok ||
  bad "accuracy_drop.csv: $(head -3 "$d/accuracy_drop.csv")"
grep -q "drop 95% interval" "$d/report.txt" && ok || bad "report.txt has no intervals"
grep -q "full model" "$d/report.txt" && grep -q "faithfulness" "$d/report.txt" && ok || bad "report.txt: $(cat "$d/report.txt")"

# edgepatch report redraws the figures and prints the table it writes to report.txt
rm -f "$d"/accuracy_drop.png "$d"/circuit.png "$d"/circuit.svg "$d"/*.pdf "$d"/*.csv
"$bin" report "$d" > "$tmp/report.out" 2>&1 && ok || bad "report: $(cat "$tmp/report.out")"
is_png "$d/accuracy_drop.png" && is_png "$d/circuit.png" && [ -s "$d/circuit.svg" ] && [ -s "$d/circuit.pdf" ] && [ -s "$d/accuracy_drop.pdf" ] &&
  [ -s "$d/accuracy_drop.csv" ] && [ -s "$d/circuit.csv" ] && ok || bad "report did not redraw the figures"
grep -qF "$(head -3 "$d/report.txt" | tail -1)" "$tmp/report.out" && ok || bad "report output and report.txt differ"
# without the drawing tools: the table, one line per skipped figure, success
rm -f "$d"/*.png "$d"/circuit.svg
PATH=/nonexistent "$bin" report "$d" > "$tmp/notools.out" 2>&1 && ok || bad "report without tools failed: $(cat "$tmp/notools.out")"
[ "$(grep -c 'skipped: .* is not installed' "$tmp/notools.out")" = 2 ] && [ ! -e "$d/circuit.png" ] && ok \
  || bad "report without tools: $(cat "$tmp/notools.out")"

# bad input: one line naming the file and field
expect_error 1 "model_logs.json" report "$tmp/nowhere"
expect_error 2 "need RUN" report
bad_config() { jq --arg out "$tmp/$1" ".output_path = \$out | $2" "$tmp/demo.json" > "$tmp/$1.json"; }
bad_config noname '.ablations[0] |= del(.name)'
expect_error 1 "field ablations\[0\]: name" run "$tmp/noname.json" --until patch
bad_config twice '.ablations[1].name = .ablations[0].name'
expect_error 1 "field ablations\[1\]: name" run "$tmp/twice.json" --until patch
bad_config donor1 '.ablations[0].rules[0].donor = 1'
expect_error 1 "ablations may read donor 0 only" run "$tmp/donor1.json" --until patch
bad_config group '.ablations[0].group = 3'
expect_error 1 "field ablations\[0\]: group" run "$tmp/group.json" --until patch
finish cli_demo
