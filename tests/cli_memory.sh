#!/usr/bin/env bash
# edgepatch memory (docs/memory.md): the tables in docs/memory.md are the command's output for the committed
# configs; with T = 1 the weights are the models' published parameter counts (x 2 bytes, bf16: Gemma-2
# 2B 2,614,341,888, Llama-3 8B 8,030,261,248, Gemma-2 27B 27,227,128,320 parameters); a T that does not
# split says why; a bad config is a one-line error. The attribution batch's table (backward_bytes, whose
# parts tests/test_backward_memory.c checks against counted allocations): recounted here from the HF
# configs' shapes by docs/memory.md's list of buffers (Gemma-2 27B and Llama-3 8B at T = 2, 8 x 200),
# the verdict for Gemma-2 27B at T = 2 on 80 GiB (fits) and on 30 GiB (does not), and bad options.
set -u
bin=$1
. "$(dirname "$0")/cli_harness.bash"

"$bin" memory docs/model_configs/*.json > "$tmp/table" && ok || bad "memory failed"
diff <(grep '^|' docs/memory.md) <(grep '^|' "$tmp/table") > /dev/null && ok ||
  bad "docs/memory.md's table is not edgepatch memory's output (regenerate it: see docs/memory.md)"
gib() { awk -v p="$1" 'BEGIN { printf "%.2f GiB", p * 2 / 2^30 }'; }
for spec in gemma-2-2b:2614341888 llama-3-8b:8030261248 gemma-2-27b:27227128320; do
  IFS=: read -r name params <<< "$spec"
  want=$(gib "$params")
  grep -q "^| $name.json | 1 | $want |" "$tmp/table" && ok || bad "$name: expected $want at T = 1: $(grep "^| $name.json | 1 " "$tmp/table")"
done
grep -q "^| smollm-135m.json | 2 | does not split: num_attention_heads = 9" "$tmp/table" && ok || bad "smollm-135m T=2 should not split"

# The backward's parts for one rank of a pair, recounted from config.json (fp32; docs/memory.md).
"$bin" memory docs/model_configs/gemma-2-27b.json docs/model_configs/llama-3-8b.json --tp 2 --json > "$tmp/json" &&
  ok || bad "memory --json failed"
python3 - "$tmp/json" docs/model_configs/gemma-2-27b.json docs/model_configs/llama-3-8b.json <<'PY' && ok || bad "backward parts differ from the recount"
import json, sys
rows, wrong = json.load(open(sys.argv[1])), []
for row, path in zip(rows, sys.argv[2:]):
    c = json.load(open(path))
    Tp, S, n, tg, nd = 2, 8, 200, 1, 1
    L, D, V = c["num_hidden_layers"], c["hidden_size"], c["vocab_size"]
    hd = c.get("head_dim", D // c["num_attention_heads"])
    H, KVH, NI = c["num_attention_heads"] // Tp, c["num_key_value_heads"] // Tp, c["intermediate_size"] // Tp
    T, R, Q, KV, f = S * n, S * tg, H * hd, KVH * hd, 4
    Vl = V // Tp if V % Tp == 0 else V  # the lm_head's vocabulary block
    want = {"tape_q": f * L * T * Q, "tape_dz": f * L * T * Q,
            "tape_cache": f * L * S * n * (2 * KV + Q) + 4 * S, "resid": f * (L + 1) * T * D,
            "attn_out": f * L * T * D, "dlogits": f * R * Vl, "head": 3 * f * R * D + 4 * R,
            # one thread: attention_back's P, dlogit, g, mask and 2 per donor, selection bytes
            "attention": f * n * n * (4 + 2 * nd) + n * n}
    wide = max(D, Q, KV)
    base = 2 * f * T * D + f * wide
    # residual gradients, zero row, layer buffers, K/V gradients in the cache's rows, the sequences (40 bytes
    # each) and a later rank's copy of the rules (rank 0 here: none)
    want["scratch"] = base + f * T * (7 * D + 2 * Q + 2 * KV + 5 * NI) + 2 * f * S * n * KV + 40 * S
    want["tape"] = sum(want[k] for k in ("tape_q", "tape_dz", "tape_cache")) + 16 * S + 32 * L
    want["peak"] = (want["tape"] + want["resid"] + want["attn_out"] + 4 * (R + T)
                    + max(want["scratch"] + want["attention"], want["dlogits"] + base + want["head"]))
    got = dict(row["backward"])
    want["donor_caches"], got["donor_caches"] = nd * (f * L * S * (n - tg) * (2 * KV + Q) + 4 * S), row["donor_caches"]
    want["device_total"] = row["weights_bf16"] + want["peak"] + want["donor_caches"]
    got["device_total"] = row["device_total"]
    wrong += ["%s %s: %d, recount %d" % (path, k, got[k], want[k]) for k in want if got[k] != want[k]]
print("\n".join(wrong), file=sys.stderr)
sys.exit(1 if wrong or len(rows) != 2 else 0)
PY
grep -q "^| gemma-2-27b.json | 2 | .* | yes ([0-9.]* GiB free) | " "$tmp/table" && ok ||
  bad "gemma-2-27b at T = 2 should fit 80 GiB: $(grep '^| gemma-2-27b.json | 2 |' "$tmp/table" | tail -1)"
"$bin" memory docs/model_configs/gemma-2-27b.json --tp 2 --gpu-gib 30 | grep -q "^| gemma-2-27b.json | 2 | .* | no ([0-9.]* GiB over) | " &&
  ok || bad "gemma-2-27b at T = 2 should not fit 30 GiB"
expect_error 2 "--batch" memory docs/model_configs/gemma-2-2b.json --batch 8y200
expect_error 2 "--targets" memory docs/model_configs/gemma-2-2b.json --batch 8x4 --targets 4
expect_error 2 "--gpu-gib" memory docs/model_configs/gemma-2-2b.json --gpu-gib -1
echo '{"architectures": ["LlamaForCausalLM"]}' > "$tmp/bad.json"
expect_error 1 "bad.json" memory "$tmp/bad.json"
finish cli_memory
