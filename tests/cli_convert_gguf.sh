#!/usr/bin/env bash
# edgepatch convert-gguf, as a user calls it, on the demo model's GGUF (tools/fetch_smollm2.sh keeps it
# in its cache): the output is byte-identical to the fetched folder's (conversion is deterministic), an
# existing folder is refused and left alone, and a truncated or foreign file is a one-line error that
# leaves no folder (neither OUT nor its temporary OUT.tmp-PID) behind.
set -u
bin=$1
. "$(dirname "$0")/cli_harness.bash"

gguf=${EP_MODEL_CACHE:-models/.cache}/SmolLM2-135M-Instruct.Q4_1.gguf
model=models/smollm2-135m-instruct
if [ ! -f "$gguf" ] || [ ! -f "$model/SHA256SUMS" ]; then
  echo "FAIL: $gguf or $model/SHA256SUMS is missing: run tools/fetch_smollm2.sh (tools/test.sh does)" >&2
  exit 1
fi

if "$bin" convert-gguf "$gguf" "$tmp/out" > "$tmp/log"; then ok; else bad "convert-gguf exited non-zero"; fi
for f in config.json model.safetensors; do
  want=$(grep " $f\$" "$model/SHA256SUMS" | cut -d' ' -f1)
  got=$(sha256sum "$tmp/out/$f" 2>/dev/null | cut -d' ' -f1)
  if [ -n "$want" ] && [ "$got" = "$want" ]; then ok; else bad "$f differs from the fetched folder's ($got vs $want)"; fi
done
grep -q "272 tensors" "$tmp/log" && ok || bad "summary line: $(cat "$tmp/log")"

# An existing folder is refused and untouched.
before=$(sha256sum "$tmp/out/config.json")
"$bin" convert-gguf "$gguf" "$tmp/out" 2> "$tmp/err"; rc=$?
if [ $rc -eq 1 ] && [ "$(wc -l < "$tmp/err")" -eq 1 ] && grep -q "already exists" "$tmp/err"; then ok; else
  bad "existing OUT: rc $rc, '$(cat "$tmp/err")'"; fi
[ "$(sha256sum "$tmp/out/config.json")" = "$before" ] && ok || bad "existing folder was modified"

# Truncated GGUFs (inside the header, inside the tensor data) and a foreign file: one line naming the
# file, exit 1, nothing left behind.
head -c 1000 "$gguf" > "$tmp/header.gguf"
head -c 50000000 "$gguf" > "$tmp/data.gguf"
printf 'not a gguf file at all, just text\n' > "$tmp/text.gguf"
for f in header data text; do
  "$bin" convert-gguf "$tmp/$f.gguf" "$tmp/conv-$f" 2> "$tmp/err"; rc=$?
  if [ $rc -eq 1 ] && [ "$(wc -l < "$tmp/err")" -eq 1 ] && grep -q "$f.gguf" "$tmp/err"; then ok; else
    bad "$f.gguf: rc $rc, '$(cat "$tmp/err")'"; fi
  if ls -d "$tmp/conv-$f"* >/dev/null 2>&1; then bad "$f.gguf left a folder behind"; else ok; fi
  echo "  $f.gguf -> $(cat "$tmp/err")"
done

"$bin" convert-gguf "$gguf" 2>/dev/null; [ $? -eq 2 ] && ok || bad "missing OUTDIR is not a usage error"

# --json: the summary as JSON, against the files written (the safetensors' size, its header's tensors).
"$bin" convert-gguf --json "$gguf" "$tmp/out-json" > "$tmp/conv.json" && ok || bad "convert-gguf --json failed"
python3 - "$tmp/conv.json" "$tmp/out-json/model.safetensors" "$gguf" <<'PY' && ok || bad "convert-gguf --json differs from the files"
import json, math, os, struct, sys
o, st = json.load(open(sys.argv[1])), sys.argv[2]
with open(st, "rb") as f:
    header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
tensors = {k: v for k, v in header.items() if k != "__metadata__"}
params = sum(math.prod(v["shape"]) for v in tensors.values())
assert o["gguf"] == sys.argv[3] and o["bytes_written"] == os.path.getsize(st), (o, os.path.getsize(st))
assert o["tensors"] == 272 and o["parameters"] == params and "Q4_1" in o["types"], (o, len(tensors), params)
PY
"$bin" convert-gguf --help | grep -q "convert-gguf FILE.gguf OUTDIR" && ok || bad "--help"

finish cli_convert_gguf
