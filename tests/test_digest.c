// hash_xxh64 and file_digest: XXH64 against the reference library (libxxhash, loaded at run time when
// the machine has it, else the published values only), its speed next to FNV-1a, and the digest cache:
// a file is read once, a rerun reads nothing, and a changed byte is seen whether or not the mtime is put
// back (touch -r) or the file is replaced by another of the same size and mtime.
#define _DEFAULT_SOURCE  // utimensat's UTIME_OMIT, nanosleep
#include <dlfcn.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "pipeline/file_digest.h"
#include "pipeline/hash.h"
#include "tests/harness.h"

static char dir[256];

typedef unsigned long long (*xxh64_fn)(const void *, size_t, unsigned long long);

static uint64_t next_rand(uint64_t *x) {
    *x = *x * 6364136223846793005ull + 1442695040888963407ull;
    return *x >> 24;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void test_xxh64(void) {
    // Published values (xxHash's README and test suite) for the empty string, "a" and "abc" with seed 0.
    check(hash_xxh64("", 0, 0) == 0xEF46DB3751D8E999ull, "xxh64(\"\") = %016llx", (unsigned long long)hash_xxh64("", 0, 0));
    check(hash_xxh64("a", 1, 0) == 0xD24EC4F1A98C6E5Bull, "xxh64(\"a\")");
    check(hash_xxh64("abc", 3, 0) == 0x44BC2CF5AD770999ull, "xxh64(\"abc\")");
    void *lib = dlopen("libxxhash.so.0", RTLD_NOW);
    xxh64_fn ref = lib ? (xxh64_fn)dlsym(lib, "XXH64") : NULL;
    if (!ref) {
        printf("  libxxhash.so.0 not found: XXH64 checked against the published values only\n");
        return;
    }
    // Every length to 300 (each tail path and the 32-byte stripes), seeds 0 and 2^63 + 7, then lengths
    // of a few MB at odd offsets (unaligned reads).
    size_t big = (3u << 20) + 13;
    unsigned char *buf = malloc(big + 8);
    uint64_t x = 42;
    for (size_t i = 0; i < big + 8; i++) buf[i] = (unsigned char)next_rand(&x);
    int bad = 0, n = 0;
    for (size_t len = 0; len <= 300; len++)
        for (int s = 0; s < 2; s++, n++) {
            uint64_t seed = s ? 0x8000000000000007ull : 0;
            bad += hash_xxh64(buf + 1, len, seed) != ref(buf + 1, len, seed);
        }
    for (size_t off = 0; off < 8; off += 3, n++) bad += hash_xxh64(buf + off, big - off, 5) != ref(buf + off, big - off, 5);
    check(bad == 0, "xxh64: %d of %d inputs differ from libxxhash's XXH64", bad, n);
    printf("  xxh64: %d inputs (lengths 0..300, two seeds; %zu bytes unaligned) equal libxxhash's XXH64\n", n, big);
    free(buf);
    dlclose(lib);
}

// Throughput on 256 MiB in memory (what a checkpoint in the page cache costs; a cold one reads at the
// disk's speed).
static void test_speed(void) {
    size_t n = 256u << 20;
    unsigned char *buf = malloc(n);
    uint64_t x = 7;
    for (size_t i = 0; i < n; i += 8) {
        uint64_t v = next_rand(&x);
        memcpy(buf + i, &v, 8);
    }
    double t0 = now();
    volatile uint64_t a = hash_xxh64(buf, n, 0);
    double t1 = now();
    volatile uint64_t b = hash_bytes(HASH_INIT, buf, n);
    double t2 = now();
    (void)a, (void)b;
    printf("  speed on %zu MiB in memory: xxh64 %.0f MB/s, fnv-1a %.0f MB/s\n", n >> 20, (double)n / 1e6 / (t1 - t0),
           (double)n / 1e6 / (t2 - t1));
    free(buf);
}

static void write_file(const char *path, size_t n, uint64_t seed) {
    FILE *f = fopen(path, "wb");
    uint64_t x = seed;
    for (size_t i = 0; i < n; i++) fputc((int)(next_rand(&x) & 0xff), f);
    fclose(f);
}

static uint64_t xxh64_of(const char *path) {
    FILE *f = fopen(path, "rb");
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *buf = malloc((size_t)n + 1);
    size_t got = fread(buf, 1, (size_t)n, f);
    fclose(f);
    uint64_t h = hash_xxh64(buf, got, 0);
    free(buf);
    return h;
}

// Flips one byte in place (same size), sleeping first so the write falls in another timestamp tick.
static void flip_byte(const char *path, long at) {
    struct timespec pause = {0, 20000000};
    nanosleep(&pause, NULL);
    int fd = open(path, O_RDWR);
    unsigned char c = 0;
    if (pread(fd, &c, 1, at) == 1) {
        c ^= 0x10;
        if (pwrite(fd, &c, 1, at) != 1) check(0, "pwrite %s", path);
    }
    close(fd);
}

static void test_cache(void) {
    char a[512], b[512], cache[512], copy[512];
    snprintf(a, sizeof a, "%s/a.safetensors", dir);
    snprintf(b, sizeof b, "%s/b.safetensors", dir);
    snprintf(cache, sizeof cache, "%s/model_digests.json", dir);
    snprintf(copy, sizeof copy, "%s/a.copy", dir);
    write_file(a, 100000, 1);
    write_file(b, 70001, 2);
    const char *paths[2] = {a, b};
    uint64_t d[2] = {0}, first[2];
    digest_stats st;
    ep_error err = {{0}};

    check(file_digests(cache, 2, paths, d, &st, &err) == 0, "first: %s", err.msg);
    check(st.files_hashed == 2 && st.bytes_hashed == 170001 && d[0] == xxh64_of(a) && d[1] == xxh64_of(b),
          "first: both files read (%d, %llu bytes), digests their xxh64", st.files_hashed,
          (unsigned long long)st.bytes_hashed);
    memcpy(first, d, sizeof d);
    check(file_digests(cache, 2, paths, d, &st, &err) == 0 && st.files_hashed == 0 && !memcmp(d, first, sizeof d),
          "rerun: nothing read (%d files), same digests", st.files_hashed);

    // One byte changed in place: size and inode kept, mtime and ctime not.
    flip_byte(a, 50000);
    check(file_digests(cache, 2, paths, d, &st, &err) == 0 && st.files_hashed == 1 && d[0] != first[0] &&
              d[0] == xxh64_of(a) && d[1] == first[1],
          "changed byte: that file read again (%d), its new digest", st.files_hashed);

    // Another byte changed and the mtime put back (touch -r): ctime still tells.
    struct stat before;
    stat(a, &before);
    uint64_t was = d[0];
    flip_byte(a, 123);
    struct timespec times[2] = {{0, UTIME_OMIT}, before.st_mtim};
    utimensat(AT_FDCWD, a, times, 0);
    struct stat after;
    stat(a, &after);
    check(after.st_mtim.tv_sec == before.st_mtim.tv_sec && after.st_mtim.tv_nsec == before.st_mtim.tv_nsec &&
              after.st_size == before.st_size,
          "mtime and size put back");
    check(file_digests(cache, 2, paths, d, &st, &err) == 0 && st.files_hashed == 1 && d[0] != was && d[0] == xxh64_of(a),
          "changed byte, mtime put back: read again (%d)", st.files_hashed);

    // Replaced by another file of the same size and mtime (cp then mv): another inode.
    was = d[0];
    write_file(copy, 100000, 3);
    stat(a, &before);
    struct timespec same[2] = {before.st_atim, before.st_mtim};
    utimensat(AT_FDCWD, copy, same, 0);
    check(rename(copy, a) == 0, "rename");
    check(file_digests(cache, 2, paths, d, &st, &err) == 0 && st.files_hashed == 1 && d[0] != was && d[0] == xxh64_of(a),
          "replaced by rename: read again (%d)", st.files_hashed);

    // A damaged cache counts as empty and is rewritten whole.
    FILE *f = fopen(cache, "w");
    fputs("{\"format\": \"edgepatch-file-digests-1\", \"files\": [tr", f);
    fclose(f);
    check(file_digests(cache, 2, paths, d, &st, &err) == 0 && st.files_hashed == 2 && d[0] == xxh64_of(a),
          "damaged cache: both read (%d)", st.files_hashed);
    check(file_digests(cache, 2, paths, d, &st, &err) == 0 && st.files_hashed == 0, "rewritten cache used");

    // A damaged entry that still parses (one hex digit of a digest changed) is not taken for a digest:
    // that file is read again.
    char text[8192] = "";
    f = fopen(cache, "r");
    size_t len = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[len] = 0;
    char *hex = strstr(text, "\"xxh64\": \"");
    check(hex != NULL, "the cache names xxh64");
    if (hex) {
        hex += strlen("\"xxh64\": \"");
        *hex = *hex == '0' ? '1' : '0';
        f = fopen(cache, "w");
        fputs(text, f);
        fclose(f);
        check(file_digests(cache, 2, paths, d, &st, &err) == 0 && st.files_hashed == 1 && d[0] == xxh64_of(a) &&
                  d[1] == xxh64_of(paths[1]),
              "a changed digit in a cached digest: that file read again (%d), both digests right", st.files_hashed);
    }

    // A damaged byte that changes no value (a space in the indentation) and an entry of another file:
    // nothing is hashed again, and the cache is rewritten to the bytes these files always give.
    f = fopen(cache, "r");
    len = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[len] = 0;
    char canonical[8192];
    memcpy(canonical, text, len + 1);
    char *brace = strchr(text, '{');
    if (brace) {
        memmove(brace + 2, brace + 1, strlen(brace + 1) + 1);
        brace[1] = ' ';
    }
    char *files_at = strstr(text, "\"files\": {");
    if (files_at) {
        const char *other = "\"/elsewhere/model.safetensors\": {\"size\": 1}, ";
        size_t at = (size_t)(files_at - text) + strlen("\"files\": {"), add = strlen(other);
        memmove(text + at + add, text + at, strlen(text + at) + 1);
        memcpy(text + at, other, add);
    }
    f = fopen(cache, "w");
    fputs(text, f);
    fclose(f);
    check(file_digests(cache, 2, paths, d, &st, &err) == 0 && st.files_hashed == 0, "harmless damage: nothing read again (%d)",
          st.files_hashed);
    f = fopen(cache, "r");
    len = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[len] = 0;
    check(brace && files_at && !strcmp(text, canonical), "the cache is rewritten to its canonical bytes");

    // Errors name the file.
    const char *missing[1] = {"/nonexistent/model.safetensors"};
    check(file_digests(cache, 1, missing, d, &st, &err) != 0 && strstr(err.msg, "/nonexistent/model.safetensors"),
          "missing file: %s", err.msg);
    check(file_digests("/nonexistent/model_digests.json", 1, paths, d, &st, &err) != 0 &&
              strstr(err.msg, "/nonexistent/model_digests.json"),
          "unwritable cache: %s", err.msg);
}

int main(void) {
    snprintf(dir, sizeof dir, "/tmp/ep_test_digest_%d", (int)getpid());
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf %s && mkdir -p %s", dir, dir);
    if (system(cmd) != 0) return 1;
    test_xxh64();
    test_speed();
    test_cache();
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0) return 1;
    return test_finish("test_digest");
}
