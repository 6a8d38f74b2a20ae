#include "err.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* Messages quote names taken from input files and options (tensor keys, layout strings): a
 * control character there would split the one-line report or drive the terminal, so each
 * becomes '?'. */
static void one_line(char *msg)
{
    for (unsigned char *p = (unsigned char *)msg; *p; p++)
        if (*p < 0x20 || *p == 0x7f)
            *p = '?';
}

int mps_fail(mps_err *err, int code, const char *fmt, ...)
{
    if (err == NULL || err->code != MPS_OK)
        return -1;
    err->code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    va_end(ap);
    one_line(err->msg);
    return -1;
}

int mps_wrap(mps_err *err, const char *fmt, ...)
{
    if (err == NULL)
        return -1;
    char prefix[512], old[sizeof err->msg];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, err->msg, sizeof old);
    if (err->code == MPS_OK)
        err->code = MPS_EFAIL;
    size_t n = strlen(prefix);
    if (n > sizeof err->msg - 3)
        n = sizeof err->msg - 3;
    memcpy(err->msg, prefix, n);
    memcpy(err->msg + n, ": ", 2);
    size_t rest = sizeof err->msg - n - 3;
    strncpy(err->msg + n + 2, old, rest);
    err->msg[sizeof err->msg - 1] = '\0';
    one_line(err->msg);
    return -1;
}

void mps_err_clear(mps_err *err)
{
    err->code = MPS_OK;
    err->msg[0] = '\0';
}
