// rank: statistics of rankings, for comparing two scorings of the same units (docs/pruning.md:
// compare_importance) and for choosing which units a round keeps.
//
// Promises: pure functions of their arguments (no state, no files, never prints); results depend only
// on the values, ties resolved by unit index, never by the order a sort happens to leave them in.
#ifndef EP_RANK_H
#define EP_RANK_H

// Spearman's rho of a and b over n values (average ranks for ties); NaN when n < 2 or either is constant.
double rank_spearman(const double *a, const double *b, int n);
// How many of the k highest of a are among the k highest of b (k capped at n; ties as rank_order).
int rank_topk_overlap(const double *a, const double *b, int n, int k);
// Unit indices by score, highest first, ties in unit order (what pruning keeps first).
void rank_order(const double *score, int n, int *order);

#endif
