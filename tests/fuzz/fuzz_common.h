/* Shared by the libFuzzer targets: inputs become files in memory (memfd), reached through
 * /proc/self/fd/N by the parsers that take a path, and error reports are checked for the
 * project's conventions. A finding is an abort(), which libFuzzer records with its input. */
#ifndef MPS_FUZZ_COMMON_H
#define MPS_FUZZ_COMMON_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "err.h"

/* A memory file reached by path; created once per process (the targets run one input at a time). */
typedef struct {
    int fd;
    char path[64];
} fuzz_file;

static inline void fuzz_file_init(fuzz_file *f, const char *name)
{
    if (f->path[0])
        return;
    f->fd = memfd_create(name, MFD_CLOEXEC);
    if (f->fd < 0) {
        perror("memfd_create");
        abort();
    }
    snprintf(f->path, sizeof f->path, "/proc/self/fd/%d", f->fd);
}

/* Replaces the file's contents with data[0..n). */
static inline void fuzz_file_set(fuzz_file *f, const void *data, size_t n)
{
    if (ftruncate(f->fd, 0) != 0 || (n && pwrite(f->fd, data, n, 0) != (ssize_t)n)) {
        perror("memfd write");
        abort();
    }
}

/* An error must carry a known code and one non-empty line (it is printed as one line by the CLI). */
static inline void fuzz_check_err(const mps_err *err, const char *what)
{
    if (err->code < MPS_EFAIL || err->code > MPS_EUNSUPPORTED || err->msg[0] == '\0' ||
        strchr(err->msg, '\n') != NULL || strchr(err->msg, '\r') != NULL) {
        fprintf(stderr, "%s: bad error report: code %d, message '%s'\n", what, err->code, err->msg);
        abort();
    }
}

/* As fuzz_check_err, and the message names `name` (the file or option at fault). */
static inline void fuzz_check_err_names(const mps_err *err, const char *what, const char *name)
{
    fuzz_check_err(err, what);
    if (strstr(err->msg, name) == NULL) {
        fprintf(stderr, "%s: error message does not name %s: '%s'\n", what, name, err->msg);
        abort();
    }
}

#define FUZZ_ASSERT(cond, ...)                                                  \
    do {                                                                        \
        if (!(cond)) {                                                          \
            fprintf(stderr, "%s:%d: assertion failed: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                       \
            fputc('\n', stderr);                                                \
            abort();                                                            \
        }                                                                       \
    } while (0)

#endif
