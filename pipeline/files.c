#include "files.h"

#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int make_dirs(const char *path, ep_error *err) {
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1;; p++) {
        if (*p == '/' || *p == 0) {
            char c = *p;
            *p = 0;
            if (mkdir(buf, 0777) != 0 && errno != EEXIST) return ep_fail(err, "%s: cannot create folder: %s", buf, strerror(errno));
            *p = c;
            if (!c) break;
        }
    }
    return 0;
}
int write_text_atomic(const char *path, const char *text, ep_error *err) {
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp-%d", path, (int)getpid());
    FILE *f = fopen(tmp, "w");
    if (!f) return ep_fail(err, "%s: cannot write: %s", tmp, strerror(errno));
    int ok = fputs(text, f) >= 0 && fflush(f) == 0 && fsync(fileno(f)) == 0;
    ok &= fclose(f) == 0;
    if (!ok || rename(tmp, path) != 0) {
        unlink(tmp);
        return ep_fail(err, "%s: cannot write (disk full?)", path);
    }
    return 0;
}
int write_json_atomic(const char *path, json_t *o, ep_error *err) {
    char *text = json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(8));
    size_t n = strlen(text);
    text = ep_realloc(text, n + 2);
    strcpy(text + n, "\n");
    int rc = write_text_atomic(path, text, err);
    free(text);
    return rc;
}
long temporary_pid(const char *name) {
    const char *t = strstr(name, ".tmp-"), *next;
    if (!t) return 0;
    while ((next = strstr(t + 1, ".tmp-"))) t = next;
    t += 5;
    long pid = 0;
    for (const char *p = t; *p; p++) {
        if (*p < '0' || *p > '9' || pid > 100000000L) return 0;
        pid = pid * 10 + (*p - '0');
    }
    return t[0] && t != name + 5 ? pid : 0;
}
// A writer is alive if its pid is this process or any process of this host we can see (EPERM: it
// exists but belongs to someone else), unless it is a zombie: a killed MPI rank stays one until its
// launcher reaps it, which can be after the next run has started.
static int writer_alive(long pid) {
    if (pid == (long)getpid()) return 1;
    if (kill((pid_t)pid, 0) != 0 && errno != EPERM) return 0;
    char path[64], line[512];
    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return 1;  // no /proc: kill's answer
    size_t n = fread(line, 1, sizeof line - 1, f);
    fclose(f);
    line[n] = 0;
    const char *close = strrchr(line, ')');  // "pid (comm) S ...": the state follows the name
    return !(close && close[1] == ' ' && (close[2] == 'Z' || close[2] == 'X'));
}
int remove_tree(const char *path, ep_error *err) {
    struct stat st;
    if (lstat(path, &st) != 0) return errno == ENOENT ? 0 : ep_fail(err, "%s: cannot stat: %s", path, strerror(errno));
    if (S_ISDIR(st.st_mode)) {
        DIR *d = opendir(path);
        if (!d) return ep_fail(err, "%s: cannot list: %s", path, strerror(errno));
        struct dirent *e;
        char sub[4600];
        int rc = 0;
        while (rc == 0 && (e = readdir(d))) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
            snprintf(sub, sizeof sub, "%s/%s", path, e->d_name);
            rc = remove_tree(sub, err);
        }
        closedir(d);
        if (rc == 0 && rmdir(path) != 0 && errno != ENOENT) rc = ep_fail(err, "%s: cannot remove: %s", path, strerror(errno));
        return rc;
    }
    if (unlink(path) != 0 && errno != ENOENT) return ep_fail(err, "%s: cannot remove: %s", path, strerror(errno));
    return 0;
}
int remove_temporaries(const char *dir, int depth, const char *const *names, int *removed, ep_error *err) {
    DIR *d = opendir(dir);
    if (!d) return errno == ENOENT ? 0 : ep_fail(err, "%s: cannot list: %s", dir, strerror(errno));
    struct dirent *e;
    char path[4600];
    int rc = 0;
    while (rc == 0 && (e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        long pid = temporary_pid(e->d_name);
        int named = !names;
        for (int i = 0; names && names[i] && !named; i++) {
            size_t n = strlen(names[i]);
            named = !strncmp(e->d_name, names[i], n) && !strncmp(e->d_name + n, ".tmp-", 5);
        }
        struct stat st;
        if (pid > 0 && named) {
            if (writer_alive(pid)) continue;
            rc = remove_tree(path, err);
            if (rc == 0 && removed) (*removed)++;
        } else if (depth > 0 && lstat(path, &st) == 0 && S_ISDIR(st.st_mode)) {  // never through a symbolic link
            rc = remove_temporaries(path, depth - 1, names, removed, err);
        }
    }
    closedir(d);
    return rc;
}

int remove_entries(const char *dir, const char *prefix, ep_error *err) {
    DIR *d = opendir(dir);
    if (!d) return errno == ENOENT ? 0 : ep_fail(err, "%s: cannot list: %s", dir, strerror(errno));
    struct dirent *e;
    char path[4600];
    int rc = 0;
    size_t n = strlen(prefix);
    while (rc == 0 && (e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..") || strncmp(e->d_name, prefix, n)) continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        rc = remove_tree(path, err);
    }
    closedir(d);
    return rc;
}
