// h5store: round trip of datasets and attributes, and the crash-safety promises: a killed writer never
// leaves a file that looks complete, an existing artifact survives a failed rewrite, and truncated or
// bit-flipped files are refused with a message naming the file and dataset.
#define _DEFAULT_SOURCE  // MAP_ANONYMOUS, MAP_NORESERVE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "pipeline/h5store.h"
#include "tests/harness.h"

#include <zlib.h>

static char dir[256];

static void write_sample(const char *path, float scale) {
    h5store s;
    ep_error err = {{0}};
    float f[6] = {1, 2, 3, 4, 5, 6};
    for (int i = 0; i < 6; i++) f[i] *= scale;
    int32_t v[3] = {-7, 0, 2147483647};
    h5shape fs = {2, {2, 3}}, vs = {1, {3}};
    check(h5store_create(path, &s, &err) == 0, "create: %s", err.msg);
    check(h5store_write_f32(&s, "group/sub/floats", &fs, f, &err) == 0, "write f32: %s", err.msg);
    check(h5store_write_i32(&s, "ints", &vs, v, &err) == 0, "write i32: %s", err.msg);
    check(h5store_set_str(&s, "task", "country-capital", &err) == 0, "attr str: %s", err.msg);
    check(h5store_set_i64(&s, "seed", 1234567890123LL, &err) == 0, "attr i64: %s", err.msg);
    check(h5store_commit(&s, &err) == 0, "commit: %s", err.msg);
}

static void test_round_trip(void) {
    char path[512];
    snprintf(path, sizeof path, "%s/a.h5", dir);
    write_sample(path, 1);
    h5store s;
    ep_error err = {{0}};
    check(h5store_open(path, &s, &err) == 0, "open: %s", err.msg);
    h5shape shape;
    float *f = NULL;
    int32_t *v = NULL;
    check(h5store_read_f32(&s, "group/sub/floats", &shape, &f, &err) == 0 && shape.rank == 2 && shape.dims[1] == 3 &&
              f[5] == 6,
          "read f32: %s", err.msg);
    check(h5store_read_i32(&s, "ints", &shape, &v, &err) == 0 && v[0] == -7 && v[2] == 2147483647, "read i32");
    char *task = NULL;
    int64_t seed = 0;
    check(h5store_get_str(&s, "task", &task, &err) == 0 && !strcmp(task, "country-capital"), "attr str");
    check(h5store_get_i64(&s, "seed", &seed, &err) == 0 && seed == 1234567890123LL, "attr i64");
    check(h5store_read_f32(&s, "nope/floats", &shape, &f, &err) != 0 && strstr(err.msg, "nope/floats"), "missing: %s",
          err.msg);
    check(h5store_read_f32(&s, "ints", &shape, &f, &err) != 0, "type mismatch refused");
    free(f), free(v), free(task);
    h5store_close(&s);
    check(h5store_is_complete(path), "complete");
}

static void test_killed_writer(void) {
    char path[512];
    snprintf(path, sizeof path, "%s/killed.h5", dir);
    write_sample(path, 1);  // an existing, complete artifact
    pid_t pid = fork();
    if (pid == 0) {  // a writer killed after writing data but before commit
        h5store s;
        ep_error err;
        float f[2] = {9, 9};
        h5shape sh = {1, {2}};
        if (h5store_create(path, &s, &err) == 0) h5store_write_f32(&s, "group/sub/floats", &sh, f, &err);
        raise(SIGKILL);
    }
    int status;
    waitpid(pid, &status, 0);
    check(WIFSIGNALED(status), "child was killed");
    h5store s;
    ep_error err = {{0}};
    float *f = NULL;
    h5shape shape;
    check(h5store_open(path, &s, &err) == 0 && h5store_read_f32(&s, "group/sub/floats", &shape, &f, &err) == 0 &&
              f[0] == 1,
          "old artifact intact after a killed rewrite: %s", err.msg);
    free(f);
    h5store_close(&s);
    // The killed writer's tmp file, renamed into place by hand, is still refused: no completion record.
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "mv %s.tmp-%d %s/renamed.h5", path, (int)pid, dir);
    check(system(cmd) == 0, "the tmp file of the killed writer exists");
    snprintf(path, sizeof path, "%s/renamed.h5", dir);
    // Killed before its first flush the file is not even valid HDF5; either way it must be refused.
    check(h5store_open(path, &s, &err) != 0 && strstr(err.msg, "renamed.h5"), "incomplete refused: %s", err.msg);
    check(!h5store_is_complete(path), "is_complete says no");
}

// A file whose data was flushed but whose writer never committed has no completion record.
static void test_uncommitted_flushed(void) {
    char path[512], tmp[600];
    snprintf(path, sizeof path, "%s/flushed.h5", dir);
    h5store s;
    ep_error err = {{0}};
    float f[2] = {1, 2};
    h5shape sh = {1, {2}};
    check(h5store_create(path, &s, &err) == 0 && h5store_write_f32(&s, "x", &sh, f, &err) == 0, "write");
    H5Fflush(s.file, H5F_SCOPE_GLOBAL);
    snprintf(tmp, sizeof tmp, "%s", s.tmp_path);
    check(rename(tmp, path) == 0, "rename by hand");
    h5store reader;
    check(h5store_open(path, &reader, &err) != 0 && strstr(err.msg, "completion record"), "uncommitted refused: %s",
          err.msg);
    h5store_abandon(&s);
}

static void test_abandon(void) {
    char path[512];
    snprintf(path, sizeof path, "%s/abandoned.h5", dir);
    h5store s;
    ep_error err;
    check(h5store_create(path, &s, &err) == 0, "create");
    h5store_abandon(&s);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "ls %s | grep -q abandoned", dir);
    check(system(cmd) != 0, "abandon leaves no file");
}

// Equal data gives byte-identical files (no modification times), and such a file opens (its seal holds).
static void test_reproducible(void) {
    char a[512], b[512], cmd[1200];
    snprintf(a, sizeof a, "%s/same1.h5", dir);
    snprintf(b, sizeof b, "%s/same2.h5", dir);
    write_sample(a, 3);
    sleep(1);
    write_sample(b, 3);
    snprintf(cmd, sizeof cmd, "cmp -s %s %s", a, b);
    check(system(cmd) == 0, "equal data written a second apart gives identical bytes");
    h5store s;
    ep_error err = {{0}};
    check(h5store_open(a, &s, &err) == 0, "a sound file opens: %s", err.msg);
    h5store_close(&s);
}

// Writes the seal of an h5store file as docs/artifacts.md describes it: the first 512 bytes hold
// "edgepatch h5store seal 1\ncrc32 %08x\nbytes %llu\n", zero-padded, for the bytes after them.
static int reseal(const char *path) {
    FILE *f = fopen(path, "r+b");
    if (!f || fseek(f, 512, SEEK_SET)) return -1;
    unsigned char buf[4096];
    uLong crc = crc32(0L, Z_NULL, 0);
    unsigned long long n = 0;
    size_t got;
    while ((got = fread(buf, 1, sizeof buf, f)) > 0) crc = crc32(crc, buf, (uInt)got), n += got;
    char seal[512] = {0};
    snprintf(seal, sizeof seal, "edgepatch h5store seal 1\ncrc32 %08lx\nbytes %llu\n", crc, n);
    int rc = fseek(f, 0, SEEK_SET) || fwrite(seal, 1, sizeof seal, f) != sizeof seal ? -1 : 0;
    return fclose(f) || rc ? -1 : 0;
}

// A byte flipped anywhere (here in HDF5's structures and padding, outside every dataset) is caught.
static void test_seal(void) {
    char path[512];
    snprintf(path, sizeof path, "%s/seal.h5", dir);
    write_sample(path, 10);
    FILE *f = fopen(path, "rb");
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fclose(f);
    int caught = 0, tried = 0;
    for (long at = 0; at < size; at += size / 37 + 1, tried++) {
        f = fopen(path, "r+b");
        fseek(f, at, SEEK_SET);
        int c = fgetc(f);
        fseek(f, at, SEEK_SET);
        fputc(c ^ 0x01, f);
        fclose(f);
        h5store s;
        ep_error err = {{0}};
        if (h5store_open(path, &s, &err) != 0) caught += strstr(err.msg, "seal.h5") != NULL;
        else h5store_close(&s);
        f = fopen(path, "r+b");
        fseek(f, at, SEEK_SET);
        fputc(c, f);
        fclose(f);
    }
    check(caught == tried, "a flipped bit at %d places over the file (%ld bytes): %d refused", tried, size, caught);
    h5store s;
    ep_error err = {{0}};
    check(h5store_open(path, &s, &err) == 0, "restored file opens: %s", err.msg);
    h5store_close(&s);
    printf("  seal: a flipped bit refused at %d of %d places over a %ld-byte file\n", caught, tried, size);
}

static void test_corruption(void) {
    char path[512], cmd[1200];
    snprintf(path, sizeof path, "%s/flip.h5", dir);
    write_sample(path, 1000);
    // Flip one byte inside the float dataset's data: the checksum must catch it.
    h5store s;
    ep_error err = {{0}};
    check(flip_h5_data_byte(path, "group/sub/floats", 5, 0x10) == 0, "flip a data byte");
    float *data = NULL;
    h5shape shape;
    check(h5store_open(path, &s, &err) != 0 && strstr(err.msg, "flip.h5") && strstr(err.msg, "checksum"),
          "the seal catches a flipped data byte before HDF5 reads the file: %s", err.msg);
    // Sealed again over the damage (the seal's format, docs/artifacts.md, written here independently):
    // the dataset's own checksum still catches it.
    check(reseal(path) == 0, "reseal");
    check(h5store_open(path, &s, &err) == 0, "a resealed file opens: %s", err.msg);
    check(h5store_read_f32(&s, "group/sub/floats", &shape, &data, &err) != 0 && strstr(err.msg, "checksum") &&
              strstr(err.msg, "flip.h5"),
          "bit flip detected: %s", err.msg);
    h5store_close(&s);
    free(data);

    snprintf(path, sizeof path, "%s/trunc.h5", dir);
    write_sample(path, 1);
    snprintf(cmd, sizeof cmd, "truncate -s 600 %s", path);
    check(system(cmd) == 0, "truncate");
    int rc = h5store_open(path, &s, &err);
    if (rc == 0) {  // if the superblock survived, reading must still fail
        rc = h5store_read_f32(&s, "group/sub/floats", &shape, &data, &err);
        h5store_close(&s);
        free(data);
    }
    check(rc != 0 && strstr(err.msg, "trunc.h5"), "truncated file refused: %s", err.msg);
    snprintf(path, sizeof path, "%s/missing-dir/x.h5", dir);
    check(h5store_create(path, &s, &err) != 0 && strstr(err.msg, "missing-dir"), "unwritable path: %s", err.msg);
}

// float64 datasets (the prune stage's item sums): exact round trip, their checksum checked as read, not
// readable as float32 and vice versa.
static void test_f64(void) {
    char path[512];
    snprintf(path, sizeof path, "%s/f64.h5", dir);
    h5store s;
    ep_error err = {{0}};
    double d[4] = {0.1, -1e300, 3.0000000000000004, 0};
    h5shape sh = {2, {2, 2}}, got;
    check(h5store_create(path, &s, &err) == 0 && h5store_write_f64(&s, "sums", &sh, d, &err) == 0 &&
              h5store_commit(&s, &err) == 0, "write f64: %s", err.msg);
    double *back = NULL;
    float *f = NULL;
    check(h5store_open(path, &s, &err) == 0, "open: %s", err.msg);
    check(h5store_read_f64(&s, "sums", &got, &back, &err) == 0 && got.rank == 2 && !memcmp(back, d, sizeof d),
          "f64 round trip is exact: %s", err.msg);
    check(h5store_read_f32(&s, "sums", &got, &f, &err) != 0, "float64 read as float32 is refused");
    free(back), free(f);
    h5store_close(&s);
}

// A dataset over 4 GiB (a Gemma-2 27B donor cache) gets the CRC of all its bytes, not of the low 32 bits
// of its length. The region is an anonymous mapping that is never written but for one page, so it costs
// no memory: its zero pages are all one shared page. The reference is zlib's crc32 fed in 1 GiB pieces
// (each fits its uInt length).
static void test_crc_over_4gib(void) {
    size_t bytes = (4ull << 30) + 8192, marked = (4ull << 30) + 100;
    unsigned char *region = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (region == MAP_FAILED) {
        printf("  skipped the 4 GiB checksum: cannot map %zu bytes\n", bytes);
        return;
    }
    region[marked] = 0x5a;  // past 4 GiB, where a truncated length stops short
    uLong want = crc32(0L, Z_NULL, 0);
    for (size_t at = 0; at < bytes;) {
        size_t piece = bytes - at < (1ull << 30) ? bytes - at : (1ull << 30);
        want = crc32(want, region + at, (uInt)piece);
        at += piece;
    }
    uint32_t got = h5store_crc32(region, bytes), truncated = (uint32_t)crc32(0L, region, (uInt)bytes);
    printf("  crc32 of %zu bytes: %08x, by 1 GiB pieces %08x (a 32-bit length would give %08x)\n", bytes, got,
           (unsigned)want, truncated);
    check(truncated != (uint32_t)want, "the test region tells a truncated length apart");
    check(got == (uint32_t)want, "crc32 over 4 GiB: %08x, want %08x", got, (unsigned)want);
    check(h5store_crc32(region, 4096) == (uint32_t)crc32(0L, region, 4096), "crc32 of a small buffer is zlib's");
    munmap(region, bytes);
}

// Self-description: dimension labels, string datasets (and their checksum: zlib's CRC-32 of the strings
// with their NULs, computed here independently), string and string-array attributes on datasets and
// groups, and made_from_format telling an older layout from a current one.
static void test_self_description(void) {
    char path[512];
    snprintf(path, sizeof path, "%s/described.h5", dir);
    h5store s;
    ep_error err = {{0}};
    int32_t v[6] = {0, 1, 2, 3, -1, 6};
    const char *text[6] = {"a", "", "\xc3\xa9t\xc3\xa9", NULL, "x y", "\n"};
    const char *names[3] = {"bos", "x", "t"};
    h5shape sh = {2, {2, 3}};
    check(h5store_create(path, &s, &err) == 0 && h5store_write_i32(&s, "g/types", &sh, v, &err) == 0 &&
              h5store_label(&s, "g/types", "prompt,position", &err) == 0 &&
              h5store_set_strs_at(&s, "g/types", "enum_names", names, 3, &err) == 0 &&
              h5store_set_str_at(&s, "g", "name", "y->last L0", &err) == 0 &&
              h5store_write_str(&s, "texts", &sh, text, &err) == 0 && h5store_label(&s, "texts", "prompt,position", &err) == 0 &&
              h5store_set_str(&s, "format", "fmt-2", &err) == 0 && h5store_set_str(&s, "inputs_hash", "abc", &err) == 0,
          "write: %s", err.msg);
    check(h5store_label(&s, "g/types", "one", &err) != 0 && strstr(err.msg, "g/types"), "too few labels refused: %s", err.msg);
    check(h5store_label(&s, "g/types", "a,b,c", &err) != 0, "too many labels refused");
    check(h5store_label(&s, "nothing", "a", &err) != 0 && strstr(err.msg, "nothing"), "label of a missing dataset refused");
    check(h5store_commit(&s, &err) == 0, "commit: %s", err.msg);
    check(h5store_open(path, &s, &err) == 0, "open: %s", err.msg);
    char label[32];
    check(h5store_get_label(&s, "g/types", 1, label, sizeof label, &err) == 0 && !strcmp(label, "position"), "label 1: %s", label);
    check(h5store_get_label(&s, "texts", 0, label, sizeof label, &err) == 0 && !strcmp(label, "prompt"), "label 0: %s", label);
    char **back = NULL, **en = NULL;
    int n = 0;
    h5shape got;
    check(h5store_read_str(&s, "texts", &got, &back, &err) == 0 && got.rank == 2 && got.dims[1] == 3, "read strings: %s", err.msg);
    for (int i = 0; back && i < 6; i++) check(!strcmp(back[i], text[i] ? text[i] : ""), "string %d: '%s'", i, back[i]);
    check(h5store_get_strs_at(&s, "g/types", "enum_names", &en, &n, &err) == 0 && n == 3 && !strcmp(en[2], "t") && !en[3],
          "enum_names: %s", err.msg);
    free(en);
    check(h5store_get_strs_at(&s, "g", "missing", &en, &n, &err) != 0 && strstr(err.msg, "missing"), "missing attribute named");
    h5store_close(&s);
    free(back);
    // The stored checksum is zlib's CRC-32 over "a\0\0ét\0...": corrupting it is caught on read (the
    // reference checksum is computed here from the strings themselves).
    uLong want = crc32(0L, Z_NULL, 0);
    for (int i = 0; i < 6; i++) want = crc32(want, (const unsigned char *)(text[i] ? text[i] : ""), (uInt)strlen(text[i] ? text[i] : "") + 1);
    check(h5store_open(path, &s, &err) == 0, "reopen");
    hid_t ds = H5Dopen2(s.file, "texts", H5P_DEFAULT), attr = H5Aopen(ds, "crc32", H5P_DEFAULT);
    uint32_t stored = 0;
    H5Aread(attr, H5T_NATIVE_UINT32, &stored);
    H5Aclose(attr), H5Dclose(ds);
    check(stored == (uint32_t)want, "string checksum %08x, zlib's %08x", stored, (unsigned)want);
    h5store_close(&s);
    check(h5store_made_from_format(path, "abc", "fmt-2", &err) == H5STORE_SAME, "current format, same inputs: same");
    check(h5store_made_from_format(path, "abc", "fmt-3", &err) == H5STORE_DAMAGED && strstr(err.msg, "fmt-2"),
          "another format: rebuilt as damaged (%s)", err.msg);
    check(h5store_made_from_format(path, "abd", "fmt-2", &err) == H5STORE_OTHER, "other inputs: other");
    check(h5store_made_from(path, "abc", &err) == H5STORE_SAME, "no format asked: same");
}

int main(void) {
    snprintf(dir, sizeof dir, "/tmp/ep_test_h5store_%d", (int)getpid());
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf %s && mkdir -p %s", dir, dir);
    if (system(cmd) != 0) return 1;
    test_round_trip();
    test_f64();
    test_killed_writer();
    test_uncommitted_flushed();
    test_abandon();
    test_corruption();
    test_seal();
    test_reproducible();
    test_crc_over_4gib();
    test_self_description();
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0) return 1;
    return test_finish("test_h5store");
}
