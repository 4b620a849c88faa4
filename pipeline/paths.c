#include "paths.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

// Where `cmake --install` puts the data folders, relative to the folder of the installed executable
// (CMakeLists.txt computes it from CMAKE_INSTALL_BINDIR and CMAKE_INSTALL_DATADIR).
#ifndef EP_SHARE_FROM_BIN
#define EP_SHARE_FROM_BIN "../share/edgepatch"
#endif

void dir_of(const char *path, char *out, size_t n) {
    const char *slash = strrchr(path, '/');
    if (!slash) {
        snprintf(out, n, ".");
        return;
    }
    size_t len = (size_t)(slash - path);
    snprintf(out, n, "%.*s", (int)(len ? len : 1), path);
}

void path_join(const char *base, const char *rel, char *out, size_t n) {
    if (rel[0] == '/' || !base || !*base) snprintf(out, n, "%s", rel);
    else snprintf(out, n, "%s/%s", base, rel);
}

int repo_path(const char *folder, const char *relative, char *out, size_t n) {
    char exe[PATH_MAX];
    ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (len > 0) {
        exe[len] = 0;
        char dir[PATH_MAX];
        dir_of(exe, dir, sizeof dir);
        const char *ups[] = {EP_SHARE_FROM_BIN, "..", "../..", "."};
        for (size_t i = 0; i < sizeof ups / sizeof ups[0]; i++) {
            char candidate[PATH_MAX + 64];
            snprintf(candidate, sizeof candidate, "%s/%s/%s/%s", dir, ups[i], folder, relative);
            if (access(candidate, R_OK) == 0) {
                snprintf(out, n, "%s", candidate);
                return 0;
            }
        }
    }
    snprintf(out, n, "%s/%s", folder, relative);
    return access(out, R_OK) == 0 ? 0 : -1;
}

int data_path(const char *relative, char *out, size_t n, ep_error *err) {
    const char *env = getenv("EDGEPATCH_DATA");
    if (env && *env) {
        path_join(env, relative, out, n);
        if (access(out, R_OK) == 0) return 0;
    }
    if (repo_path("datasets", relative, out, n) == 0) return 0;
    return ep_fail(err, "datasets/%s: not found (set EDGEPATCH_DATA to the folder holding tasks/, pairs/ and words/)",
                   relative);
}
