#!/usr/bin/env bash
# edgepatch memory (docs/memory.md): the table in docs/memory.md is the command's output for the committed
# configs; with T = 1 the weights are the models' published parameter counts (x 2 bytes, bf16: Gemma-2
# 2B 2,614,341,888, Llama-3 8B 8,030,261,248, Gemma-2 27B 27,227,128,320 parameters); a T that does not
# split says why; a bad config is a one-line error.
set -u
bin=$1
. "$(dirname "$0")/cli_harness.bash"

"$bin" memory docs/model_configs/*.json > "$tmp/table" && ok || bad "memory failed"
grep -v '^|' docs/memory.md > /dev/null; diff <(grep '^|' docs/memory.md) "$tmp/table" > /dev/null && ok ||
  bad "docs/memory.md's table is not edgepatch memory's output (regenerate it: see docs/memory.md)"
gib() { awk -v p="$1" 'BEGIN { printf "%.2f GiB", p * 2 / 2^30 }'; }
for spec in gemma-2-2b:2614341888 llama-3-8b:8030261248 gemma-2-27b:27227128320; do
  IFS=: read -r name params <<< "$spec"
  want=$(gib "$params")
  grep -q "^| $name.json | 1 | $want |" "$tmp/table" && ok || bad "$name: expected $want at T = 1: $(grep "^| $name.json | 1 " "$tmp/table")"
done
grep -q "^| smollm-135m.json | 2 | does not split: num_attention_heads = 9" "$tmp/table" && ok || bad "smollm-135m T=2 should not split"
echo '{"architectures": ["LlamaForCausalLM"]}' > "$tmp/bad.json"
expect_error 1 "bad.json" memory "$tmp/bad.json"
finish cli_memory
