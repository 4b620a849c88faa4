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
