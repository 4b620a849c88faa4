# cli_harness: what every tests/cli_*.sh sources (not a test itself: ctest runs cli_*.sh only).
# Counts checks (ok / bad), gives a scratch folder $tmp removed on exit, checks one-line errors
# (expect_error), and prints the closing "NAME: N passed, N failed" line (finish).
passed=0 failed=0
ok() { passed=$((passed + 1)); }
bad() { failed=$((failed + 1)); echo "FAIL: $*" >&2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# expect_error STATUS NEEDLE ARGS...: `$bin ARGS...` exits with STATUS and prints exactly one line on
# stderr, containing NEEDLE.
expect_error() {
  local want=$1 needle=$2; shift 2
  "$bin" "$@" > /dev/null 2> "$tmp/err"; local got=$?
  if [ "$got" = "$want" ] && [ "$(wc -l < "$tmp/err")" = 1 ] && grep -q -- "$needle" "$tmp/err"; then ok
  else bad "edgepatch $* -> status $got, stderr: $(cat "$tmp/err")"; fi
}

# flip_byte FILE DATASET [AT]: flips byte AT (default 2) of the data of an HDF5 file's dataset (its
# offset from h5dump).
flip_byte() {
  local off
  off=$(h5dump -p -H -d "$2" "$1" | awk '/OFFSET/ {print $2}')
  [ -n "$off" ] || return 1
  # od and dd, not a Python start: the race tests of cli_recover.sh flip a byte while a run goes on
  local at=$((off + ${3:-2})) b
  b=$(od -An -tu1 -j "$at" -N1 "$1" | tr -d ' ')
  [ -n "$b" ] || return 1
  printf "$(printf '\\%03o' $((b ^ 0x5a)))" | dd of="$1" bs=1 seek="$at" conv=notrunc status=none
}

# finish NAME: the summary line; the script's status is non-zero if anything failed.
finish() {
  echo "$1: $passed passed, $failed failed"
  [ "$failed" = 0 ]
}
