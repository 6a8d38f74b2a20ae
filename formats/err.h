/* Errors returned by library code: a code and a one-line message naming the file, tensor,
 * option or rank concerned. Only main() turns them into an exit status. */
#ifndef MPS_ERR_H
#define MPS_ERR_H

/* Exit codes of the CLI, one per error class (documented in README.md). */
enum {
    MPS_OK = 0,
    MPS_EFAIL = 1,     /* anything not classified below */
    MPS_EUSAGE = 2,    /* bad option, layout string or arguments */
    MPS_ECORRUPT = 3,  /* input file or checkpoint is corrupt, truncated or inconsistent */
    MPS_EIO = 4,       /* the operating system refused a read, write, rename, ... */
    MPS_ENOMEM = 5,    /* an allocation failed */
    MPS_EUNSUPPORTED = 6, /* valid input this build or model does not implement */
    /* stopped at the caller's request: a writer whose stop flag holds signal N (a handler set it)
     * fails with MPS_ESTOPPED + N, the exit code of a process stopped by that signal */
    MPS_ESTOPPED = 128
};

typedef struct {
    int code;
    char msg[1024];
} mps_err;

/* Records the first error only (later calls keep the original cause) and returns -1,
 * so that `return mps_fail(err, MPS_EIO, "...")` reads naturally. */
int mps_fail(mps_err *err, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* Adds context in front of an existing message: "file.h5: <old message>". */
int mps_wrap(mps_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void mps_err_clear(mps_err *err);

#endif
