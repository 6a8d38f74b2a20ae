#include "progress.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

struct mps_progress {
    char label[64];
    char what[96];
    _Atomic int64_t done;
    _Atomic int64_t total;
    _Atomic int64_t last_print_ns;
    int64_t start_ns;
    int enabled;
};

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

mps_progress *mps_progress_new(const char *label, int64_t total_bytes, int enabled)
{
    mps_progress *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    snprintf(p->label, sizeof p->label, "%s", label);
    atomic_store(&p->total, total_bytes);
    p->start_ns = now_ns();
    p->enabled = enabled < 0 ? isatty(2) : enabled;
    return p;
}

static void print_line(mps_progress *p, int final)
{
    double secs = (now_ns() - p->start_ns) / 1e9;
    double done = (double)atomic_load(&p->done), total = (double)atomic_load(&p->total);
    double rate = secs > 0 ? done / secs : 0;
    double left = rate > 0 && total > done ? (total - done) / rate : 0;
    fprintf(stderr, "\r%s: %.2f / %.2f GB%s%s  %.0f MB/s  %s %.0fs   %s", p->label, done / 1e9, total / 1e9,
            p->what[0] ? " " : "", p->what, rate / 1e6, final ? "took" : "left", final ? secs : left, final ? "\n" : "");
    fflush(stderr);
}

void mps_progress_add(mps_progress *p, int64_t bytes)
{
    if (!p)
        return;
    atomic_fetch_add(&p->done, bytes);
    if (!p->enabled)
        return;
    int64_t t = now_ns(), last = atomic_load(&p->last_print_ns);
    if (t - last > 250000000 && atomic_compare_exchange_strong(&p->last_print_ns, &last, t))
        print_line(p, 0);
}

void mps_progress_set_total(mps_progress *p, int64_t total_bytes)
{
    if (p)
        atomic_store(&p->total, total_bytes);
}

void mps_progress_set_what(mps_progress *p, const char *what)
{
    if (p)
        snprintf(p->what, sizeof p->what, "%s", what ? what : "");
}

void mps_progress_done(mps_progress *p)
{
    if (!p)
        return;
    if (p->enabled)
        print_line(p, 1);
    free(p);
}
