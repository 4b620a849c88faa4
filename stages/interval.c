#include "interval.h"

#include <math.h>

void wilson_interval(int k, int n, double z, double *lo, double *hi) {
    if (n <= 0 || k < 0 || k > n) {
        *lo = *hi = NAN;
        return;
    }
    double p = (double)k / n, z2 = z * z;
    double centre = (p + z2 / (2.0 * n)) / (1 + z2 / n), half = z * sqrt(p * (1 - p) / n + z2 / (4.0 * n * n)) / (1 + z2 / n);
    *lo = fmax(0, centre - half);
    *hi = fmin(1, centre + half);
}

void paired_difference_interval(paired_counts t, double z, double *lo, double *hi) {
    int a = t.both, b = t.first_only, c = t.second_only, d = t.neither, n = a + b + c + d;
    if (a < 0 || b < 0 || c < 0 || d < 0 || n <= 0) {
        *lo = *hi = NAN;
        return;
    }
    double p1 = (double)(a + b) / n, p2 = (double)(a + c) / n, l1, u1, l2, u2;
    wilson_interval(a + b, n, z, &l1, &u1);
    wilson_interval(a + c, n, z, &l2, &u2);
    // phi: the correlation of the two outcomes over the prompts, with ad - bc moved n/2 towards 0 when it
    // is positive (Newcombe's definition); 0 when a margin is empty.
    double phi = 0;
    if (a + b && c + d && a + c && b + d) {
        double ad_bc = (double)a * d - (double)b * c, margins = sqrt((double)(a + b) * (c + d) * (a + c) * (b + d));
        phi = ad_bc > n / 2.0 ? (ad_bc - n / 2.0) / margins : ad_bc >= 0 ? 0 : ad_bc / margins;
    }
    double diff = p1 - p2, x1 = p1 - l1, y2 = u2 - p2, x2 = p2 - l2, y1 = u1 - p1;
    *lo = diff - sqrt(fmax(0, x1 * x1 - 2 * phi * x1 * y2 + y2 * y2));
    *hi = diff + sqrt(fmax(0, x2 * x2 - 2 * phi * x2 * y1 + y1 * y1));
}
