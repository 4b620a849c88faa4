#!/usr/bin/env python3
"""The report's paired-difference interval (stages/interval.h) against an independent implementation.

test_interval --table N prints every paired 2x2 table of 1..N prompts with the C interval; this script
computes Newcombe's method 10 from the formulas of Newcombe (1998) / Fagerland et al. (2017, ch. 8)
with Python's own normal quantile (statistics.NormalDist) and compares every bound (1e-9).

--self-test is the can-fail sibling: the same comparison against a reference with a planted error (phi
without Newcombe's n/2 adjustment, the textbook slip; then z of a 90% interval) must find mismatches,
or the comparison could not fail and the test fails.
"""
import math
import subprocess
import sys
from statistics import NormalDist


def wilson(k, n, z):
    p = k / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_paired(a, b, c, d, z, adjust_phi=True):
    n = a + b + c + d
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson(a + b, n, z)
    l2, u2 = wilson(a + c, n, z)
    if 0 in (a + b, c + d, a + c, b + d):
        phi = 0.0
    else:
        s = math.sqrt((a + b) * (c + d) * (a + c) * (b + d))
        num = a * d - b * c
        if adjust_phi:
            num = num - n / 2 if num > n / 2 else (0 if num >= 0 else num)
        phi = num / s
    diff = p1 - p2
    lo = diff - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = diff + math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    return lo, hi


def mismatches(rows, z, adjust_phi=True):
    bad = []
    for a, b, c, d, lo, hi in rows:
        want = newcombe_paired(a, b, c, d, z, adjust_phi)
        if abs(lo - want[0]) > 1e-9 or abs(hi - want[1]) > 1e-9:
            bad.append(((a, b, c, d), (lo, hi), want))
    return bad


def main():
    self_test = "--self-test" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--self-test"]
    if len(args) != 1:
        sys.exit("usage: check_interval.py [--self-test] PATH/test_interval")
    n_max = 24
    out = subprocess.run([args[0], "--table", str(n_max)], check=True, capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        f = line.split()
        rows.append((int(f[0]), int(f[1]), int(f[2]), int(f[3]), float(f[4]), float(f[5])))
    z95 = NormalDist().inv_cdf(0.975)
    if self_test:
        planted = [("phi without the n/2 adjustment", z95, False), ("z of a 90% interval", NormalDist().inv_cdf(0.95), True)]
        failed = 0
        for what, z, adjust in planted:
            found = len(mismatches(rows, z, adjust))
            print(f"check_interval --self-test: planted error ({what}): {found} of {len(rows)} tables differ")
            failed += found == 0
        sys.exit(1 if failed else 0)
    bad = mismatches(rows, z95)
    for t, got, want in bad[:10]:
        print(f"table {t}: C [{got[0]:.12g}, {got[1]:.12g}], reference [{want[0]:.12g}, {want[1]:.12g}]")
    print(f"check_interval: {len(rows) - len(bad)} of {len(rows)} paired tables (n = 1..{n_max}) agree with the reference")
    sys.exit(1 if bad or not rows else 0)


if __name__ == "__main__":
    main()
