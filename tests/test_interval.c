// test_interval: the report's 95% intervals (stages/interval.h) against values printed in the literature.
// With --table N it prints, for every paired 2x2 table of N prompts and fewer, the counts and the interval
// (%.12g), which tests/check_interval.py compares with its own implementation of the formulas.
//
// Known values: Wilson score intervals (Newcombe, Statistics in Medicine 17:857-872, 1998, table I, method 3):
// 81/263 -> 0.2553, 0.3662; 15/148 -> 0.0624, 0.1605; 0/20 -> 0, 0.1611; 1/29 -> 0.0061, 0.1718. The
// paired difference: Cavo et al. (2012) as Fagerland, Lydersen and Laake (2017, ch. 8) tabulate it
// ([[59, 6], [16, 80]]: estimate -0.0621, Newcombe square-and-add -0.1186 to -0.0046; the R package
// contingencytables, tests of chapter 8).
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "stages/interval.h"

static void near(double got, double want, const char *what) {
    check(fabs(got - want) <= 0.00005 + 1e-12, "%s: %.6f, want %.4f", what, got, want);
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "--table")) {
        int N = atoi(argv[2]);
        for (int n = 1; n <= N; n++)
            for (int a = 0; a <= n; a++)
                for (int b = 0; a + b <= n; b++)
                    for (int c = 0; a + b + c <= n; c++) {
                        double lo, hi;
                        paired_difference_interval((paired_counts){a, b, c, n - a - b - c}, INTERVAL_Z95, &lo, &hi);
                        printf("%d %d %d %d %.12g %.12g\n", a, b, c, n - a - b - c, lo, hi);
                    }
        return 0;
    }
    static const struct {
        int k, n;
        double lo, hi;
    } wilson[] = {{81, 263, 0.2553, 0.3662}, {15, 148, 0.0624, 0.1605}, {0, 20, 0, 0.1611}, {1, 29, 0.0061, 0.1718}};
    for (size_t i = 0; i < sizeof wilson / sizeof *wilson; i++) {
        double lo, hi;
        char what[64];
        wilson_interval(wilson[i].k, wilson[i].n, INTERVAL_Z95, &lo, &hi);
        snprintf(what, sizeof what, "Wilson %d/%d low", wilson[i].k, wilson[i].n);
        near(lo, wilson[i].lo, what);
        snprintf(what, sizeof what, "Wilson %d/%d high", wilson[i].k, wilson[i].n);
        near(hi, wilson[i].hi, what);
    }
    double lo, hi;
    paired_difference_interval((paired_counts){59, 6, 16, 80}, INTERVAL_Z95, &lo, &hi);
    near(lo, -0.1186, "paired (59, 6, 16, 80) low");
    near(hi, -0.0046, "paired (59, 6, 16, 80) high");
    // A difference of exactly 0 with no discordant prompts (an ablation that changes nothing): the interval
    // still has width (n = 10: the accuracies are uncertain), contains 0, and is symmetric.
    paired_difference_interval((paired_counts){7, 0, 0, 3}, INTERVAL_Z95, &lo, &hi);
    check(lo < 0 && hi > 0 && fabs(lo + hi) < 1e-12, "no discordant prompts: [%g, %g]", lo, hi);
    // Bounds stay in [-1, 1]; an empty table and a negative count give NaN.
    paired_difference_interval((paired_counts){0, 10, 0, 0}, INTERVAL_Z95, &lo, &hi);
    check(lo > 0 && hi <= 1, "all prompts lost: [%g, %g]", lo, hi);
    paired_difference_interval((paired_counts){0, 0, 0, 0}, INTERVAL_Z95, &lo, &hi);
    check(isnan(lo) && isnan(hi), "empty table: [%g, %g]", lo, hi);
    paired_difference_interval((paired_counts){1, -1, 0, 2}, INTERVAL_Z95, &lo, &hi);
    check(isnan(lo) && isnan(hi), "negative count: [%g, %g]", lo, hi);
    return test_finish("test_interval");
}
