#include "safe_open.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

static int clear_nonblock(int fd)
{
    int flags = fcntl(fd, F_GETFL);
    return flags < 0 ? -1 : fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
}

int mps_open_input(const char *path, int not_regular, struct stat *st, mps_err *err)
{
    struct stat local;
    if (!st)
        st = &local;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        int e = errno;
        mps_fail(err, e == ENOENT || e == ENOTDIR ? MPS_ECORRUPT : MPS_EIO, "%s: cannot open: %s", path, strerror(e));
        errno = e;
        return -1;
    }
    if (fstat(fd, st) != 0) {
        int e = errno;
        close(fd);
        mps_fail(err, MPS_EIO, "%s: cannot stat: %s", path, strerror(e));
        errno = e;
        return -1;
    }
    if (!S_ISREG(st->st_mode)) {
        close(fd);
        mps_fail(err, not_regular, "%s: not a regular file", path);
        errno = EINVAL;
        return -1;
    }
    if (clear_nonblock(fd) != 0) {
        int e = errno;
        close(fd);
        mps_fail(err, MPS_EIO, "%s: %s", path, strerror(e));
        errno = e;
        return -1;
    }
    return fd;
}

int mps_open_tmp_output(const char *path, mps_err *err)
{
    /* O_NOFOLLOW: a symbolic link is refused (ELOOP), not followed; O_NONBLOCK: a FIFO without a
     * reader fails (ENXIO) instead of blocking, one with a reader is refused by the fstat below */
    int fd = open(path, O_WRONLY | O_CREAT | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, 0644);
    if (fd < 0) {
        if (errno == ELOOP)
            return mps_fail(err, MPS_EUSAGE, "%s is a symbolic link: refusing to write through it", path);
        if (errno == ENXIO)
            return mps_fail(err, MPS_EUSAGE, "%s is a FIFO: refusing to write to it", path);
        return mps_fail(err, MPS_EIO, "%s: cannot create: %s", path, strerror(errno));
    }
    struct stat st;
    const char *why = NULL;
    int code = MPS_EUSAGE;
    if (fstat(fd, &st) != 0 || clear_nonblock(fd) != 0)
        why = strerror(errno), code = MPS_EIO;
    else if (!S_ISREG(st.st_mode))
        why = "not a regular file: refusing to write to it";
    else if (st.st_nlink > 1)
        why = "has other hard links: refusing to overwrite it";
    if (why) {
        close(fd);
        return mps_fail(err, code, "%s: %s", path, why);
    }
    return fd;
}
