#include "mapped_file.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

int map_file_readonly(const char *path, size_t min_size, const char *min_what, void **map, size_t *size, ep_error *err) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return ep_fail(err, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        close(fd);
        return ep_fail(err, "%s: cannot stat: %s", path, strerror(errno));
    }
    *size = (size_t)sb.st_size;
    if (*size < min_size) {
        close(fd);
        return ep_fail(err, "%s: truncated: %zu bytes, %s", path, *size, min_what);
    }
    *map = mmap(NULL, *size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (*map == MAP_FAILED) return ep_fail(err, "%s: cannot mmap: %s", path, strerror(errno));
    return 0;
}
