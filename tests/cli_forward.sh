#!/usr/bin/env bash
# edgepatch forward, as a user calls it: the JSON output against the HF reference of a tiny fixture
# (logits at the last position and greedy tokens), and one-line errors with the right exit codes.
set -u
bin=$1
. "$(dirname "$0")/cli_harness.bash"

model=tests/fixtures/models/smollm-tiny
ref=tests/fixtures/reference/smollm-tiny.safetensors

# The reference's prompt 3 ids, generated tokens and last-position logits, read with the standard
# library only (safetensors is an 8-byte length, a JSON header, then raw little-endian data).
python3 - "$ref" > "$tmp/ref.json" <<'PY'
import json, struct, sys
raw = open(sys.argv[1], "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
hdr = json.loads(raw[8:8 + n]); data = raw[8 + n:]
def get(name):
    t = hdr[name]; b, e = t["data_offsets"]; fmt = {"I32": "i", "F32": "f"}[t["dtype"]]
    return list(struct.unpack("<%d%s" % ((e - b) // 4, fmt), data[b:e])), t["shape"]
ids, _ = get("prompt3.ids"); gen, _ = get("prompt3.generated"); logits, shape = get("prompt3.logits")
print(json.dumps({"ids": ids, "generated": gen, "last": logits[-shape[1]:], "text": hdr["__metadata__"]["prompt3.text"]}))
PY
ids=$(python3 -c 'import json,sys; print(",".join(map(str, json.load(open(sys.argv[1]))["ids"])))' "$tmp/ref.json")

if "$bin" forward --model "$model" --ids "$ids" --generate 8 --top 3 --json > "$tmp/out.json"; then ok; else bad "forward --json exited non-zero"; fi
python3 - "$tmp/ref.json" "$tmp/out.json" <<'PY' && ok || bad "forward --json does not match the HF reference"
import json, sys
ref = json.load(open(sys.argv[1])); out = json.load(open(sys.argv[2]))
assert out["ids"] == ref["ids"], "ids echo"
scale = max(abs(x) for x in ref["last"])
err = max(abs(a - b) for a, b in zip(out["logits"], ref["last"])) / scale
assert len(out["logits"]) == len(ref["last"]) and err < 1e-4, "logits error %g" % err
gen = out["generated"]
assert gen == ref["generated"][:len(gen)] and len(gen) >= 1, "generated %s vs %s" % (gen, ref["generated"])
assert out["top"][0]["id"] == ref["generated"][0] and len(out["top"]) == 3, "top-1 is the first generated token"
print("  forward --json: logits max rel error %.2e, %d generated tokens equal to HF" % (err, len(gen)))
PY

# --text goes through our tokenizer: the ids must be HF's ids for the reference's prompt text.
text=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["text"], end="")' "$tmp/ref.json")
"$bin" forward --model "$model" --text "$text" --json > "$tmp/text.json" && python3 - "$tmp/ref.json" "$tmp/text.json" <<'PY' && ok || bad "forward --text ids differ from HF's"
import json, sys
ref = json.load(open(sys.argv[1])); out = json.load(open(sys.argv[2]))
assert out["ids"] == ref["ids"], (out["ids"], ref["ids"])
PY

if "$bin" forward --model "$model" --ids "$ids" > "$tmp/text.txt" && grep -q "next token" "$tmp/text.txt"; then ok; else bad "plain output"; fi
if "$bin" forward --help | grep -q -- "--generate"; then ok; else bad "--help"; fi

# Errors: one line on stderr, exit 1 for bad input files, 2 for bad usage.
expect_error 1 "no-such-dir" forward --model "$tmp/no-such-dir" --ids 1,2
expect_error 2 "comma-separated" forward --model "$model" --ids 1,x
expect_error 2 "unknown option" forward --model "$model" --ids 1 --bogus 3
expect_error 2 "exactly one" forward --model "$model"
expect_error 1 "outside the vocabulary" forward --model "$model" --ids 1,99999999
cp -r "$model" "$tmp/broken" && echo '{"architectures": ["LlamaForCausalLM"], "vocab_size": ' > "$tmp/broken/config.json"
expect_error 1 "config.json" forward --model "$tmp/broken" --ids 1,2
expect_error 2 "unknown command" frobnicate

finish cli_forward
