#!/usr/bin/env bash
# CLI tests for `edgepatch tokenize-text`: encode/decode on the committed tokenizer fixtures, --json and
# --special, and bad input (malformed JSON, a missing file, an unsupported component), each of which must
# give a one-line error on stderr and a non-zero exit. Usage: tests/cli_tokenize.sh path/to/edgepatch
set -u
bin=${1:?usage: cli_tokenize.sh EDGEPATCH}
fx=tests/fixtures/tokenizers
. "$(dirname "$0")/cli_harness.bash"

# expect_out NAME EXPECTED ARGS...: stdout must equal EXPECTED and the exit status 0.
expect_out() {
  local name=$1 want=$2; shift 2
  local got
  got=$("$bin" tokenize-text "$@" 2>"$tmp/err")
  local rc=$?
  if [ $rc -eq 0 ] && [ "$got" = "$want" ]; then ok; else bad "$name: rc=$rc got [$got] want [$want] stderr [$(cat "$tmp/err")]"; fi
}

# expect_err NAME NEEDLE ARGS...: non-zero exit, empty stdout, exactly one stderr line containing NEEDLE.
expect_err() {
  local name=$1 needle=$2; shift 2
  "$bin" tokenize-text "$@" >"$tmp/out" 2>"$tmp/err"
  local rc=$?
  local lines
  lines=$(wc -l <"$tmp/err")
  if [ $rc -ne 0 ] && [ ! -s "$tmp/out" ] && [ "$lines" -eq 1 ] && grep -qF -- "$needle" "$tmp/err"; then ok
  else bad "$name: rc=$rc lines=$lines stderr [$(cat "$tmp/err")] want [$needle]"; fi
}

expect_out "gemma plain" $'ids: 651,6037,576,6081,603\npieces: "The" "▁capital" "▁of" "▁France" "▁is"' \
  --tokenizer $fx/gemma-2 -- "The capital of France is"
expect_out "gemma --special" $'ids: 2,651,6037,576,6081,603\npieces: "<bos>" "The" "▁capital" "▁of" "▁France" "▁is"' \
  --tokenizer $fx/gemma-2 --special -- "The capital of France is"
expect_out "gemma --json" '{"ids":[2,7127],"pieces":["<bos>","▁Paris"]}' --tokenizer $fx/gemma-2 --special --json -- " Paris"
expect_out "llama-3 --special --json" '{"ids":[128000,791,6864,315,9822,374],"pieces":["<|begin_of_text|>","The","Ġcapital","Ġof","ĠFrance","Ġis"]}' \
  --tokenizer $fx/llama-3 --special --json -- "The capital of France is"
expect_out "gpt2 no BOS" $'ids: 464,3139,286,4881,318\npieces: "The" "Ġcapital" "Ġof" "ĠFrance" "Ġis"' \
  --tokenizer $fx/gpt2 --special -- "The capital of France is"
expect_out "smollm digits" '{"ids":[1,2,3,4],"pieces":["<|im_start|>","<|im_end|>","<repo_name>","<reponame>"]}' \
  --tokenizer $fx/smollm --json -- "<|im_start|><|im_end|><repo_name><reponame>"
expect_out "gemma decode" "The capital of France is" --tokenizer $fx/gemma-2 --decode 2,651,6037,576,6081,603
expect_out "gemma decode --special" "<bos>The capital of France is" --tokenizer $fx/gemma-2 --special --decode 2,651,6037,576,6081,603
expect_out "llama decode --json" '{"text": "The capital"}' --tokenizer $fx/llama-3 --json --decode 128000,791,6864
expect_out "empty text" $'ids:\npieces:' --tokenizer $fx/gpt2 -- ""
expect_out "help" "$("$bin" tokenize-text --help)" --help

# Round trip through the command line on a prompt the tasks use.
prompt=$'Afghanistan: Kabul\nAlbania: Tirana\nFrance:'
for t in gpt2 phi-2 llama-3 llama-3.1 gemma-2 smollm; do
  ids=$("$bin" tokenize-text --tokenizer $fx/$t -- "$prompt" | sed -n 's/^ids: //p')
  expect_out "$t round trip" "$prompt" --tokenizer $fx/$t --decode "$ids"
done

# --file against HF tokenizers' ids, for every fixture tokenizer: the parity cases (tests/fixtures/
# tokenizers/*/parity.jsonl.gz, made by tools/gen_tokenizer_fixtures.py with tokenizers 0.19.1) as JSONL
# (alternately bare strings, \u-escaped, and {"text": ...} objects with another field, raw UTF-8), as
# plain lines (the cases without a newline, and the invalid UTF-8 byte cases), and the cases with
# recorded BOS ids under --special. Each output line must equal the fixture's ids for its input line.
python3 - "$fx" "$tmp" <<'PY'
import gzip, json, os, sys
fx, out = sys.argv[1], sys.argv[2]
names = sorted(n for n in os.listdir(fx) if os.path.exists(f"{fx}/{n}/parity.jsonl.gz"))
open(f"{out}/names", "w").write(" ".join(names))
for name in names:
    files = {k: open(f"{out}/{name}.{k}", "wb") for k in ("jsonl", "jsonl.want", "txt", "txt.want", "sp", "sp.want")}
    def put(kind, data, ids):
        files[kind].write(data + b"\n")
        files[kind + ".want"].write(json.dumps(ids).encode() + b"\n")
    with gzip.open(f"{fx}/{name}/parity.jsonl.gz", "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            c = json.loads(line)
            if "text" in c:
                t = c["text"]
                jl = json.dumps(t) if i % 2 else json.dumps({"case": i, "text": t}, ensure_ascii=False)
                put("jsonl", jl.encode(), c["ids"])
                if "\n" not in t:
                    put("txt", t.encode(), c["ids"])
                if "special" in c:
                    put("sp", json.dumps(t).encode(), c["special"])
            elif b"\n" not in bytes.fromhex(c["bytes"]):
                put("txt", bytes.fromhex(c["bytes"]), c["ids"])
    for f in files.values():
        f.close()
PY
# same_ids GOT WANT: every line of GOT is {"ids": [...]} with WANT's ids on the same line, and the line
# counts agree. Prints the number of lines compared, or the first difference (exit 1).
same_ids() {
  python3 - "$1" "$2" <<'PY'
import json, sys
got = open(sys.argv[1], "rb").read().splitlines()
want = open(sys.argv[2], "rb").read().splitlines()
if len(got) != len(want):
    sys.exit(f"{len(got)} output lines for {len(want)} inputs")
for i, (g, w) in enumerate(zip(got, want)):
    if json.loads(g)["ids"] != json.loads(w):
        sys.exit(f"line {i + 1}: got {g.decode()} want {w.decode()}")
print(len(got))
PY
}
for t in $(cat "$tmp/names"); do
  for kind in jsonl txt sp; do
    args=(--tokenizer "$fx/$t" --file "$tmp/$t.$kind")
    [ $kind = txt ] || args+=(--jsonl)
    [ $kind = sp ] && args+=(--special)
    if "$bin" tokenize-text "${args[@]}" >"$tmp/got" 2>"$tmp/err" && n=$(same_ids "$tmp/got" "$tmp/$t.$kind.want" 2>&1); then
      if [ "$n" -gt 100 ] || { [ $kind = sp ] && [ "$n" -gt 0 ]; }; then ok; else bad "$t --file $kind: only $n lines"; fi
    else
      bad "$t --file $kind: $(cat "$tmp/err") $n"
    fi
  done
done
# The comparison can fail: one id changed in the expected ids is caught.
"$bin" tokenize-text --tokenizer $fx/gpt2 --file "$tmp/gpt2.txt" >"$tmp/got" 2>/dev/null
sed '7s/^\[\([0-9]*\)/[1\1/' "$tmp/gpt2.txt.want" >"$tmp/flipped.want"
! cmp -s "$tmp/flipped.want" "$tmp/gpt2.txt.want" && ! same_ids "$tmp/got" "$tmp/flipped.want" >/dev/null 2>&1 && ok ||
  bad "same_ids misses a changed id"
head -n 3 "$tmp/gpt2.txt.want" >"$tmp/short.want"
! same_ids "$tmp/got" "$tmp/short.want" >/dev/null 2>&1 && ok || bad "same_ids misses a missing line"

# --pieces: each id's piece as in the tokenizer.json vocabulary (read here by Python), and stdin (-)
# gives the same output as the file; the last line may lack its newline; an empty line is an empty text.
printf 'The capital of France is\n\n Paris' >"$tmp/few.txt"
for t in gpt2 gemma-2; do
  "$bin" tokenize-text --tokenizer $fx/$t --file "$tmp/few.txt" --pieces >"$tmp/got" 2>"$tmp/err" || bad "$t --pieces: $(cat "$tmp/err")"
  python3 - "$fx/$t/tokenizer.json.gz" "$tmp/got" <<'PY' && ok || bad "$t --pieces differ from the vocabulary"
import gzip, json, sys
vocab = {i: p for p, i in json.load(gzip.open(sys.argv[1]))["model"]["vocab"].items()}
rows = [json.loads(l) for l in open(sys.argv[2], encoding="utf-8")]
assert len(rows) == 3 and rows[1] == {"ids": [], "pieces": []}, rows
assert all(len(r["ids"]) > 0 for r in (rows[0], rows[2])), rows
assert all(r["pieces"] == [vocab[i] for i in r["ids"]] for r in rows), rows
PY
  "$bin" tokenize-text --tokenizer $fx/$t --pieces --file - <"$tmp/few.txt" >"$tmp/got-stdin" 2>/dev/null
  cmp -s "$tmp/got" "$tmp/got-stdin" && ok || bad "$t: --file - differs from --file F"
done
expect_out "--opt=value" '{"ids":[464,3139]}' --tokenizer=$fx/gpt2 --file=- --jsonl <<<'{"text": "The capital"}'
expect_out "empty file" "" --tokenizer $fx/gpt2 --file /dev/null
expect_out "CR kept in plain lines" '{"ids":[87,201]}' --tokenizer $fx/gpt2 --file - <<<$'x\r'

# --file errors: one line naming the file and line, nothing on stdout, nothing encoded.
printf '"ok"\n{"text": 5}\n' >"$tmp/notext.jsonl"
printf '"ok"\n\n"ok"\n' >"$tmp/blank.jsonl"
printf '"ok"\n"unterminated\n' >"$tmp/broken.jsonl"
expect_err "--file missing" "$tmp/nope.txt: cannot open" --tokenizer $fx/gpt2 --file "$tmp/nope.txt"
expect_err "--jsonl no text" "$tmp/notext.jsonl:2: expected a JSON string or an object" --tokenizer $fx/gpt2 --jsonl --file "$tmp/notext.jsonl"
expect_err "--jsonl blank line" "$tmp/blank.jsonl:2: an empty line" --tokenizer $fx/gpt2 --jsonl --file "$tmp/blank.jsonl"
expect_err "--jsonl malformed" "$tmp/broken.jsonl:2: malformed JSON" --tokenizer $fx/gpt2 --jsonl --file "$tmp/broken.jsonl"
expect_err "--jsonl from stdin" "stdin:2: malformed JSON" --tokenizer $fx/gpt2 --jsonl --file - <"$tmp/broken.jsonl"
expect_err "--file bad tokenizer" "no tokenizer.json" --tokenizer "$tmp" --file "$tmp/few.txt"
for args in "--file $tmp/few.txt -- x" "--file $tmp/few.txt --decode 1" "--pieces -- x" "--jsonl --decode 1" "--file"; do
  # shellcheck disable=SC2086
  "$bin" tokenize-text --tokenizer $fx/gpt2 $args >"$tmp/out" 2>"$tmp/err"
  rc=$?
  [ $rc -eq 2 ] && [ ! -s "$tmp/out" ] && [ "$(wc -l <"$tmp/err")" -eq 1 ] && ok || bad "usage error for '$args': rc=$rc $(cat "$tmp/err")"
done

# Bad input.
mkdir -p "$tmp/malformed" "$tmp/unsupported" "$tmp/empty" "$tmp/badconfig"
printf '{"model": {"type": "BPE", "vocab": {' >"$tmp/malformed/tokenizer.json"
printf '{"normalizer": {"type": "NFKC"}, "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}' >"$tmp/unsupported/tokenizer.json"
printf '{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}' >"$tmp/badconfig/tokenizer.json"
printf '{"bos_token": "<nope>"}' >"$tmp/badconfig/tokenizer_config.json"
expect_err "malformed JSON" "$tmp/malformed/tokenizer.json: malformed JSON" --tokenizer "$tmp/malformed" -- "x"
expect_err "missing file" "$tmp/empty: no tokenizer.json or tokenizer.json.gz" --tokenizer "$tmp/empty" -- "x"
expect_err "missing dir" "no-such-dir" --tokenizer "$tmp/no-such-dir" -- "x"
expect_err "unsupported component" 'normalizer.type = "NFKC" is not supported' --tokenizer "$tmp/unsupported" -- "x"
expect_err "bad config token" 'tokenizer_config.json: bos_token = "<nope>"' --tokenizer "$tmp/badconfig" -- "x"
expect_err "unknown id" "id 999999 is not in the vocabulary" --tokenizer $fx/gpt2 --decode 1,999999
expect_err "bad id list" "not a comma-separated list" --tokenizer $fx/gpt2 --decode 1,x
expect_err "no text" "need --tokenizer DIR" --tokenizer $fx/gpt2
"$bin" tokenize-text --tokenizer $fx/gpt2 --bogus -- x >/dev/null 2>&1
[ $? -eq 2 ] && ok || bad "unknown option exits 2"

finish cli_tokenize
