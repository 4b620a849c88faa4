#include "harness.h"

#include <hdf5.h>

#include <math.h>
#include <stdarg.h>
#include <stdio.h>

test_counts test_state;

void check_at(int ok, const char *file, int line, const char *fmt, ...) {
    if (ok) {
        test_state.passed++;
        return;
    }
    test_state.failed++;
    fprintf(stderr, "FAIL %s:%d: ", file, line);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

double max_rel_error(const float *got, const float *want, size_t n, double floor) {
    double scale = floor;
    for (size_t i = 0; i < n; i++)
        if (fabs((double)want[i]) > scale) scale = fabs((double)want[i]);
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)got[i] - (double)want[i]) / scale;
        if (e > worst || isnan(e)) worst = isnan(e) ? INFINITY : e;
    }
    return worst;
}

int flip_h5_data_byte(const char *path, const char *dataset, long byte, int mask) {
    hid_t file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (file < 0) return -1;
    hid_t ds = H5Dopen2(file, dataset, H5P_DEFAULT);
    haddr_t offset = ds >= 0 ? H5Dget_offset(ds) : HADDR_UNDEF;
    if (ds >= 0) H5Dclose(ds);
    H5Fclose(file);
    FILE *f = offset == HADDR_UNDEF ? NULL : fopen(path, "r+b");
    if (!f) return -1;
    fseek(f, (long)offset + byte, SEEK_SET);
    int c = fgetc(f);
    fseek(f, (long)offset + byte, SEEK_SET);
    fputc(c ^ mask, f);
    return fclose(f) == 0 ? 0 : -1;
}

int test_finish(const char *name) {
    printf("%s: %d passed, %d failed\n", name, test_state.passed, test_state.failed);
    return test_state.failed ? 1 : 0;
}

int load_fixture_model(const char *name, model *m) {
    char dir[256];
    snprintf(dir, sizeof dir, "tests/fixtures/models/%s", name);
    ep_error err = {{0}};
    if (model_load(dir, m, &err) == 0) return 0;
    check(0, "%s", err.msg);
    return -1;
}
