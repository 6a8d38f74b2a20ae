/* Byte sizes on the command line (inspect --gpu-mem, split --gpu-mem). */
#include "units.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const struct { const char *suffix, *name; double scale; } units[] = {
    { "B", "B", 1 }, { "kB", "kB", 1e3 }, { "KB", "kB", 1e3 }, { "MB", "MB", 1e6 }, { "GB", "GB", 1e9 },
    { "TB", "TB", 1e12 }, { "KiB", "KiB", 1024.0 }, { "MiB", "MiB", 1048576.0 }, { "GiB", "GiB", 1073741824.0 },
    { "TiB", "TiB", 1099511627776.0 }, { "K", "KiB", 1024.0 }, { "M", "MiB", 1048576.0 }, { "G", "GiB", 1073741824.0 },
    { "T", "TiB", 1099511627776.0 },
};
#define NUNITS (sizeof units / sizeof units[0])

/* The unit of a size ("80GiB": GiB), or -1. */
static int unit_of(const char *text, double *value)
{
    char *end;
    double v = strtod(text, &end);
    if (end == text || !(v > 0))
        return -1;
    for (size_t i = 0; i < NUNITS; i++)
        if (strcmp(end, units[i].suffix) == 0) {
            *value = v;
            return (int)i;
        }
    return -1;
}

int cli_parse_size(const char *text, int64_t *out)
{
    double v;
    int u = unit_of(text, &v);
    if (u < 0)
        return -1;
    double bytes = v * units[u].scale;
    if (bytes >= 9.0e18)
        return -1;
    *out = (int64_t)llround(bytes);
    return 0;
}

const char *cli_size_label(char *buf, size_t size, const char *text)
{
    double v;
    int u = unit_of(text, &v);
    if (u < 0) {
        snprintf(buf, size, "%s", text);
        return buf;
    }
    /* the number as typed (strtod accepted it: leading blanks and a sign are all it may skip) */
    const char *number = text;
    while (*number == ' ' || *number == '\t' || *number == '+')
        number++;
    int digits = (int)(strlen(number) - strlen(units[u].suffix));
    snprintf(buf, size, "%.*s %s", digits, number, units[u].name);
    return buf;
}

const char *cli_fmt_bytes(char *buf, size_t size, int64_t bytes, int binary)
{
    static const char *const dec[] = { "B", "kB", "MB", "GB", "TB", "PB" };
    static const char *const bin[] = { "B", "KiB", "MiB", "GiB", "TiB", "PiB" };
    double base = binary ? 1024.0 : 1000.0, v = (double)bytes;
    int u = 0;
    while (fabs(v) >= base && u < 5) {
        v /= base;
        u++;
    }
    if (u == 0)
        snprintf(buf, size, "%lld B", (long long)bytes);
    else
        snprintf(buf, size, "%.2f %s", v, binary ? bin[u] : dec[u]);
    return buf;
}

const char *cli_fmt_seconds(char *buf, size_t size, double s)
{
    if (s == 0)
        snprintf(buf, size, "0 s");
    else if (s >= 1)
        snprintf(buf, size, "%.2f s", s);
    else if (s >= 1e-3)
        snprintf(buf, size, "%.1f ms", s * 1e3);
    else
        snprintf(buf, size, "%.1f us", s * 1e6);
    return buf;
}
