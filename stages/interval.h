// interval: 95% intervals for the report's accuracies (docs/demo.md, "The report").
//
// An ablation's accuracy drop is a paired difference: the full model and the ablated model answer the
// same prompts, so each prompt falls in one cell of a 2x2 table, and the two accuracies are correlated.
// The interval used is Newcombe's hybrid score interval for a difference of paired proportions (method 10
// of Newcombe, Statistics in Medicine 17:2635-2650, 1998): the Wilson score interval of each accuracy,
// combined with the estimated correlation phi of the two, where ad - bc is moved n/2 towards 0 when it is
// positive (and phi is 0 when a margin is empty), as Newcombe defines it and as Fagerland, Lydersen and
// Laake ("Statistical Analysis of Contingency Tables", 2017, ch. 8; R package contingencytables) compute
// it. It stays within [-1, 1], is not degenerate at 0 or n, and has close to nominal coverage for small n.
// Pure functions, no state.
#ifndef EP_INTERVAL_H
#define EP_INTERVAL_H

// The normal quantile of a two-sided 95% interval (1.959963984540054).
#define INTERVAL_Z95 1.959963984540054

// Wilson score interval of k successes out of n (n > 0); n <= 0 gives NaN.
void wilson_interval(int k, int n, double z, double *lo, double *hi);

// Counts of a paired 2x2 table over the same n = both + first_only + second_only + neither items:
// "first" (here the full model) and "second" (the ablated model) correct.
typedef struct {
    int both, first_only, second_only, neither;
} paired_counts;

// The interval of p1 - p2 = (first_only - second_only) / n, p1 and p2 the two accuracies; an empty table
// (n = 0) or a negative count gives NaN.
void paired_difference_interval(paired_counts t, double z, double *lo, double *hi);

#endif
