#!/bin/bash
# check_no_print.sh OBJECT...: library code never prints (pipeline/log.h). Fails if an object file of the
# library (kernels/, pipeline/, stages/, sched/; the command line, sched/cli/, is not in it) refers to a function
# that writes to the terminal streams, or to stdout or stderr themselves (which is how fprintf, fputs or
# fwrite to them shows in an object). Writing to a FILE* a caller passes, or to a file, stays allowed.
#
# Read from the symbol tables (nm), so it sees what the compiler made of the source: gcc turns
# printf("x\n") into puts and printf("%c") into putchar, and _FORTIFY_SOURCE into __printf_chk.
#
# Allowed: the sink itself and the last words of a dying process (pipeline/log.c: ep_log_*, ep_fatal), and the
# kernels' last words (kernels/ops_fatal.c: ops_fatal).
set -u
forbidden='printf|__printf_chk|vprintf|__vprintf_chk|puts|putchar|putchar_unlocked|perror|dprintf|__dprintf_chk|vdprintf|__vdprintf_chk|psignal|psiginfo|stdout|stderr'
allowed='(/pipeline/log\.c|/kernels/ops_fatal\.c)\.o$'
[ $# -gt 0 ] || { echo "usage: check_no_print.sh OBJECT..." >&2; exit 2; }
# ctest passes $<TARGET_OBJECTS:...> as one argument, the paths joined by ';'.
objs=()
for arg in "$@"; do IFS=';' read -ra part <<< "$arg"; objs+=("${part[@]}"); done
bad=0 checked=0
for obj in "${objs[@]}"; do
  [[ "$obj" =~ $allowed ]] && continue
  [ -f "$obj" ] || { echo "check_no_print: $obj: no such object file" >&2; exit 2; }
  checked=$((checked + 1))
  syms=$(nm -u "$obj") || { echo "check_no_print: nm failed on $obj" >&2; exit 2; }
  hits=$(printf '%s\n' "$syms" | awk '{print $NF}' | grep -Ex "$forbidden" | sort -u | tr '\n' ' ')
  if [ -n "$hits" ]; then
    echo "FAIL $obj refers to: $hits(library code returns errors or writes through pipeline/log.h)"
    bad=1
  fi
done
[ "$checked" -gt 0 ] || { echo "check_no_print: no library object checked" >&2; exit 2; }
[ $bad = 0 ] && echo "check_no_print: $checked library objects write nothing to stdout or stderr"
exit $bad
