// harness: the small harness every C test uses.
//
// A test is a main() that calls check() / check_close() and returns test_finish(). Each failed check
// prints file:line and the reason; test_finish prints "N passed, N failed" and returns non-zero if
// anything failed. Comparisons report the worst error they saw, so a passing run still says how close.
#ifndef EP_TESTS_HARNESS_H
#define EP_TESTS_HARNESS_H

#include <stddef.h>

#include "pipeline/model.h"

typedef struct {
    int passed;
    int failed;
} test_counts;

extern test_counts test_state;  // one per test process; tests are single programs, so this is fine

void check_at(int ok, const char *file, int line, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
#define check(ok, ...) check_at((ok), __FILE__, __LINE__, __VA_ARGS__)

// Max over i of |got - want| / max(|want|_inf_over_array, floor): relative to the array's scale, so that
// near-zero entries of a logit vector do not dominate. Returns that error.
double max_rel_error(const float *got, const float *want, size_t n, double floor);

// Flips bits `mask` of the byte `byte` bytes into dataset `dataset`'s data in the HDF5 file at path
// (a contiguous dataset), as a disk or transfer error would; returns 0, or -1 if it cannot.
int flip_h5_data_byte(const char *path, const char *dataset, long byte, int mask);

// Loads the tiny model fixture tests/fixtures/models/NAME into m: 0, or -1 with a failed check.
int load_fixture_model(const char *name, model *m);

int test_finish(const char *name);

#endif
