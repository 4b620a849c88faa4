#!/usr/bin/env bash
# Config fields backend and dtype (docs/cuda.md). A run on the "offset" backend (the cpu kernels behind
# device-style memory: every upload, download and device-resident donor cache of the stages is
# exercised, and a host access to device memory faults) must give files byte-identical to the cpu run's,
# since backend is not part of a run's identity: the cache and patch stages, and exact pruning rounds. A bf16 run completes, differs from the fp32 run, and
# keeps its accuracy near it; its cache is not mistaken for the fp32 one. A model uploaded from the mapping
# (no attribution) gives the same bytes. Bad values are one-line errors.
set -u
bin=$1
. "$(dirname "$0")/cli_harness.bash"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1

config() {  # name backend dtype
  printf '{"task": "person_sport", "model_name": "smollm_ablate_edges_differently_for_different_tokens", "model_path": "tests/fixtures/models/smollm-tiny", "output_path": "%s/%s", "n_prompts": 8, "batch_size": 3, "seed": 5, "donors": 2, "n_shots": 4, "max_new_tokens": 4, "backend": "%s", "dtype": "%s", "affect_whom": {"curcuit": {"y,last": 0}, "ablate": {"x,y": 1}}}\n' "$tmp" "$1" "$2" "$3" > "$tmp/$1.json"
}
run() {  # name backend dtype: runs to the end of the patch stage, status in $rc
  config "$@"
  timeout 120 "$bin" run "$tmp/$1.json" --until patch > "$tmp/$1.out" 2>&1
  rc=$?
}

run cpu cpu fp32
[ $rc = 0 ] && ok || bad "cpu run: status $rc: $(cat "$tmp/cpu.out")"
run offset offset fp32
[ $rc = 0 ] && ok || bad "offset run: status $rc: $(cat "$tmp/offset.out")"
differ=""
for f in prompts.h5 patch.h5 model_logs.json $(cd "$tmp/cpu" && ls cache.d/* patch.d/*); do
  cmp -s "$tmp/cpu/$f" "$tmp/offset/$f" || differ="$differ $f"
done
[ -z "$differ" ] && ok || bad "offset backend differs from cpu in:$differ"

# Exact pruning (prefix reuse, replicated donor caches, circuit passes) on the offset backend: the cpu's bytes.
prune_config() {  # name backend
  printf '{"task": "country_capital", "model_name": "gemma2_prune_heads_in_circuits", "model_path": "tests/fixtures/models/gemma2-tiny", "output_path": "%s/%s", "n_prompts": 6, "batch_size": 3, "seed": 2, "n_shots": 3, "affect_whom": [["y", "last"]], "importance": "exact", "prune_rounds": {"heads": 1, "edges": 1}, "prune_fraction": 0.3, "backend": "%s"}\n' "$tmp" "$1" "$2" > "$tmp/$1.json"
  timeout 300 "$bin" run "$tmp/$1.json" > "$tmp/$1.out" 2>&1
}
prune_config prune_cpu cpu && prune_config prune_offset offset && ok || bad "exact prune runs: $(tail -3 "$tmp"/prune_*.out)"
differ=""
for f in circuit.json $(cd "$tmp/prune_cpu" && ls prune.d/*.h5); do
  cmp -s "$tmp/prune_cpu/$f" "$tmp/prune_offset/$f" || differ="$differ $f"
done
[ -z "$differ" ] && [ -n "$(ls "$tmp/prune_cpu/prune.d")" ] && ok || bad "exact pruning on the offset backend differs from cpu in:$differ"

run bf16 cpu bf16
[ $rc = 0 ] && ok || bad "bf16 run: status $rc: $(cat "$tmp/bf16.out")"
h5diff -q "$tmp/cpu/patch.h5" "$tmp/bf16/patch.h5" /plan/target_logprob /plan/target_logprob > /dev/null 2>&1
[ $? = 1 ] && ok || bad "a bf16 run gives the fp32 run's target log-probabilities"
# The same checkpoint in bf16: log-probabilities within a few percent of fp32 (both in [-inf, 0]).
python3 - "$tmp/cpu/model_logs.json" "$tmp/bf16/model_logs.json" <<'PY' && ok || bad "bf16 mean target log-prob far from fp32"
import json, sys
a, b = (json.load(open(p))["mean_target_logprob"] for p in sys.argv[1:])
print(f"  mean target log-prob: fp32 {a:.5f}, bf16 {b:.5f}")
sys.exit(0 if a != b and abs(a - b) <= 0.05 * abs(a) + 1e-3 else 1)
PY
# A dtype change in the same folder must not reuse the fp32 donor cache.
cp "$tmp/bf16.json" "$tmp/swap.json" && sed -i "s|$tmp/bf16|$tmp/cpu|" "$tmp/swap.json"
timeout 120 "$bin" run "$tmp/swap.json" --until cache > "$tmp/swap.out" 2>&1
grep -q "other inputs" "$tmp/swap.out" && ok || bad "bf16 run in an fp32 folder was not refused: $(cat "$tmp/swap.out")"

# Without attribution (importance "exact") a device backend's model comes from the checkpoint's mapping one
# tensor at a time, with no fp32 host copy (docs/cuda.md, "weights"); a BF16 checkpoint's matrices go up as
# their own bits in a bf16 run. The offset run must still give the cpu run's bytes.
for b in cpu offset; do
  config "ck_$b" "$b" bf16
  sed -i 's|smollm-tiny"|smollm-tiny-bf16", "importance": "exact"|' "$tmp/ck_$b.json"
  timeout 120 "$bin" run "$tmp/ck_$b.json" --until patch > "$tmp/ck_$b.out" 2>&1 || bad "bf16 checkpoint on $b: $(cat "$tmp/ck_$b.out")"
done
differ=""
for f in patch.h5 model_logs.json $(cd "$tmp/ck_cpu" && ls cache.d/* patch.d/*); do
  cmp -s "$tmp/ck_cpu/$f" "$tmp/ck_offset/$f" || differ="$differ $f"
done
grep -q '"importance": "exact"' "$tmp/ck_offset.json" && [ -z "$differ" ] && ok ||
  bad "bf16 checkpoint from the mapping (offset) differs from cpu in:$differ"

config badb tpu fp32
expect_error 1 "field backend" run "$tmp/badb.json"
config badd cpu fp16
expect_error 1 "field dtype" run "$tmp/badd.json"
config nogpu cuda fp32
if nvidia-smi -L > /dev/null 2>&1; then
  timeout 120 "$bin" run "$tmp/nogpu.json" --until patch > /dev/null 2>&1 && ok || bad "cuda backend run failed on a GPU machine"
else
  expect_error 1 "no usable GPU" run "$tmp/nogpu.json"
fi
finish cli_backend
