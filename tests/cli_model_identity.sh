#!/usr/bin/env bash
# The model's identity covers every weight byte (docs/models.md, "identity"). A copied checkpoint with one
# weight byte changed (same size, same tensor shapes, its mtime put back with touch -r) must not reuse
# the donor caches computed from the old weights: the rerun is refused as for any other changed input,
# and --fresh rebuilds them under another model hash. A rerun with the weights untouched reads no
# checkpoint again (model_digests.json is not rewritten) and skips every item.
set -u
bin=$1
. "$(dirname "$0")/cli_harness.bash"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1

cp -r tests/fixtures/models/smollm-tiny "$tmp/model"
weights="$tmp/model/model.safetensors"
printf '{"task": "person_sport", "model_name": "smollm_ablate_edges_differently_for_different_tokens", "model_path": "%s/model", "output_path": "%s/run", "n_prompts": 6, "batch_size": 3, "seed": 5, "donors": 2, "n_shots": 4, "max_new_tokens": 4, "affect_whom": {"curcuit": {"y,last": 0}, "ablate": {"x,y": 1}}}\n' "$tmp" "$tmp" > "$tmp/run.json"
cache() { timeout 120 "$bin" run "$tmp/run.json" --until cache "$@" > "$tmp/out" 2>&1; }
model_hash() { h5dump -a /model_hash "$tmp/run/cache.d/$(ls "$tmp/run/cache.d" | head -1)" | grep -o '"[0-9a-f]\{16\}"'; }

cache && ok || bad "first run: $(cat "$tmp/out")"
first_hash=$(model_hash)
[ -n "$first_hash" ] && grep -q "$(realpath "$weights")" "$tmp/run/model_digests.json" && ok ||
  bad "no model hash or no digest of $weights: $first_hash $(cat "$tmp/run/model_digests.json" 2> /dev/null)"
digests_before=$(stat -c %y "$tmp/run/model_digests.json")
sums_before=$(cd "$tmp/run/cache.d" && md5sum *)

# Unchanged weights: every item skipped, no checkpoint read again.
cache && grep -q "cache: \([0-9]*\) items, \1 already done" "$tmp/out" && [ "$(stat -c %y "$tmp/run/model_digests.json")" = "$digests_before" ] && ok ||
  bad "rerun with the same weights: $(cat "$tmp/out")"

# One weight byte changed in place, size kept, mtime put back.
touch -r "$weights" "$tmp/stamp"
python3 - "$weights" <<'PY'
import struct, sys
path = sys.argv[1]
with open(path, "r+b") as f:
    header = struct.unpack("<Q", f.read(8))[0]
    at = 8 + header + 1001  # inside the first tensors' data, past the JSON header
    f.seek(at)
    b = f.read(1)[0]
    f.seek(at)
    f.write(bytes([b ^ 0x40]))
PY
touch -r "$tmp/stamp" "$weights"
[ "$(stat -c '%s %y' "$weights")" = "$(stat -c '%s %y' tests/fixtures/models/smollm-tiny/model.safetensors | cut -d' ' -f1) $(stat -c %y "$tmp/stamp")" ] && ok ||
  bad "the changed copy does not keep size and mtime"
cache
rc=$?
[ $rc = 1 ] && grep -q "made from other inputs.*--fresh" "$tmp/out" && [ "$(cd "$tmp/run/cache.d" && md5sum *)" = "$sums_before" ] && ok ||
  bad "caches from the old weights reused or touched: status $rc: $(cat "$tmp/out")"

# --fresh rebuilds them under another model hash.
cache --fresh && ok || bad "--fresh: $(cat "$tmp/out")"
[ -n "$(model_hash)" ] && [ "$(model_hash)" != "$first_hash" ] && ok || bad "same model hash $first_hash after a weight changed"
finish cli_model_identity
