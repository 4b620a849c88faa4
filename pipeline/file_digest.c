#define _XOPEN_SOURCE 700  // realpath
#include "file_digest.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "pipeline/hash.h"

#define DIGEST_FORMAT "edgepatch-file-digests-1"

// What says a file is the one hashed before: any write changes mtime and ctime, and ctime cannot be set
// back from user space (touch -r sets mtime only); a copy or a replacement by rename has another inode.
typedef struct {
    json_int_t size, mtime_ns, ctime_ns, inode;
} file_key;

static file_key key_of(const struct stat *st) {
    return (file_key){.size = (json_int_t)st->st_size,
                      .mtime_ns = (json_int_t)st->st_mtim.tv_sec * 1000000000 + st->st_mtim.tv_nsec,
                      .ctime_ns = (json_int_t)st->st_ctim.tv_sec * 1000000000 + st->st_ctim.tv_nsec,
                      .inode = (json_int_t)st->st_ino};
}

static json_int_t int_field(json_t *entry, const char *name) {
    json_t *v = json_object_get(entry, name);
    return json_is_integer(v) ? json_integer_value(v) : -1;
}

// An entry's own checksum, over its key and digest: a damaged entry whose fields still parse (a flipped
// digit) must be read as absent, never as another file's digest.
static void entry_check(file_key k, uint64_t digest, char out[17]) {
    json_int_t fields[4] = {k.size, k.mtime_ns, k.ctime_ns, k.inode};
    uint64_t h = hash_bytes(HASH_INIT, fields, sizeof fields);
    hash_hex(hash_bytes(h, &digest, sizeof digest), out);
}

// The cached digest of a file with key k, if the entry holds one: 1, else 0.
static int cached(json_t *entry, file_key k, uint64_t *digest) {
    const char *hex = json_string_value(json_object_get(entry, "xxh64"));
    const char *check = json_string_value(json_object_get(entry, "check"));
    if (!hex || !check || strlen(hex) != 16 || int_field(entry, "size") != k.size ||
        int_field(entry, "mtime_ns") != k.mtime_ns || int_field(entry, "ctime_ns") != k.ctime_ns ||
        int_field(entry, "inode") != k.inode)
        return 0;
    char *end = NULL;
    unsigned long long v = strtoull(hex, &end, 16);
    char want[17];
    entry_check(k, (uint64_t)v, want);
    if (*end || strcmp(check, want)) return 0;
    *digest = (uint64_t)v;
    return 1;
}

static json_t *entry_of(file_key k, uint64_t digest) {
    char hex[17], check[17];
    hash_hex(digest, hex);
    entry_check(k, digest, check);
    return json_pack("{sIsIsIsIssss}", "size", k.size, "mtime_ns", k.mtime_ns, "ctime_ns", k.ctime_ns, "inode", k.inode,
                     "xxh64", hex, "check", check);
}

// The whole file through a read-only mapping (the page cache serves a checkpoint the model has mapped).
static int hash_open_file(int fd, const char *path, size_t size, uint64_t *digest, ep_error *err) {
    if (size == 0) {
        *digest = hash_xxh64("", 0, 0);
        return 0;
    }
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) return ep_fail(err, "%s: cannot map for its content hash: %s", path, strerror(errno));
    posix_madvise(map, size, POSIX_MADV_SEQUENTIAL);
    *digest = hash_xxh64(map, size, 0);
    munmap(map, size);
    return 0;
}

static double now_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static char *cache_text(json_t *root) {
    char *text = json_dumps(root, JSON_INDENT(1) | JSON_SORT_KEYS);
    size_t len = strlen(text);
    text = ep_realloc(text, len + 2);
    memcpy(text + len, "\n", 2);
    return text;
}

// 1 if the file at path holds exactly root's text.
static int same_text(const char *path, json_t *root) {
    char *want = cache_text(root);
    size_t len = strlen(want), got = 0;
    char *have = ep_malloc(len + 2);
    FILE *f = fopen(path, "rb");
    if (f) {
        got = fread(have, 1, len + 1, f);
        fclose(f);
    }
    int same = f && got == len && !memcmp(have, want, len);
    free(have), free(want);
    return same;
}

// Writes root to path through a temporary file in the same folder, fsynced, then renamed.
static int write_cache(const char *path, json_t *root, ep_error *err) {
    size_t n = strlen(path) + 16;
    char *tmp = ep_malloc(n);
    snprintf(tmp, n, "%s.tmp-XXXXXX", path);
    int fd = mkstemp(tmp);  // unique across the ranks of every node sharing the folder
    if (fd < 0) {
        ep_fail(err, "%s: cannot create (folder missing or not writable?): %s", tmp, strerror(errno));
        free(tmp);
        return -1;
    }
    char *text = cache_text(root);
    size_t len = strlen(text);
    int rc = 0;
    if (write(fd, text, len) != (ssize_t)len || fsync(fd) != 0)
        rc = ep_fail(err, "%s: cannot write (disk full?): %s", tmp, strerror(errno));
    if (close(fd) != 0 && rc == 0) rc = ep_fail(err, "%s: cannot write: %s", tmp, strerror(errno));
    if (rc == 0 && rename(tmp, path) != 0) rc = ep_fail(err, "%s: cannot rename to %s: %s", tmp, path, strerror(errno));
    if (rc) unlink(tmp);
    free(text);
    free(tmp);
    return rc;
}

int file_digests(const char *cache_path, int n, const char *const *paths, uint64_t *digests, digest_stats *stats,
                 ep_error *err) {
    digest_stats none = {0};
    if (!stats) stats = &none;
    *stats = (digest_stats){0};
    json_t *root = json_load_file(cache_path, 0, NULL), *files = json_object_get(root, "files");
    const char *format = json_string_value(json_object_get(root, "format"));
    if (!json_is_object(files) || !format || strcmp(format, DIGEST_FORMAT)) {
        json_decref(root);
        root = json_pack("{sss{}}", "format", DIGEST_FORMAT, "files");
        files = json_object_get(root, "files");
    }
    // The cache written back holds this call's files only, in canonical form: it is rewritten whenever
    // its bytes differ from that (a damaged byte that still parses, an entry of another file), so the
    // same files always leave the same cache.
    json_t *out = json_pack("{sss{}}", "format", DIGEST_FORMAT, "files"), *out_files = json_object_get(out, "files");
    int rc = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        char real[PATH_MAX];
        int fd = open(paths[i], O_RDONLY);
        struct stat st;
        if (fd < 0 || fstat(fd, &st) != 0 || !realpath(paths[i], real)) {
            rc = ep_fail(err, "%s: cannot open for its content hash: %s", paths[i], strerror(errno));
            if (fd >= 0) close(fd);
            break;
        }
        file_key k = key_of(&st);
        if (!cached(json_object_get(files, real), k, &digests[i])) {
            double t0 = now_seconds();
            rc = hash_open_file(fd, paths[i], (size_t)st.st_size, &digests[i], err);
            stats->seconds += now_seconds() - t0;
            if (rc == 0) stats->files_hashed++, stats->bytes_hashed += (uint64_t)st.st_size;
        }
        if (rc == 0) json_object_set_new(out_files, real, entry_of(k, digests[i]));
        close(fd);
    }
    if (rc == 0 && !same_text(cache_path, out)) rc = write_cache(cache_path, out, err);
    json_decref(root);
    json_decref(out);
    return rc;
}
