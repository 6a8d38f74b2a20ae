/* The phase timeline of a shard write: allocation and the summary printed at the end. */
#include "trace.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

mps_trace *mps_trace_new(void)
{
    mps_trace *t = calloc(1, sizeof *t);
    if (t)
        t->t0 = mps_now_ns();
    return t;
}

void mps_trace_free(mps_trace *t)
{
    if (!t)
        return;
    free(t->tensors);
    free(t->workers);
    free(t->files);
    free(t);
}

int64_t mps_trace_rss(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f)
        return 0;
    long long size = 0, resident = 0;
    int n = fscanf(f, "%lld %lld", &size, &resident);
    fclose(f);
    return n == 2 ? resident * (int64_t)sysconf(_SC_PAGESIZE) : 0;
}

int mps_trace_enabled_by_env(void)
{
    const char *v = getenv("MPS_TRACE");
    return v && v[0] && strcmp(v, "0") != 0;
}

int mps_trace_setup_writer(mps_trace *t, int nworkers, int nfiles)
{
    free(t->workers);
    free(t->files);
    t->workers = calloc((size_t)(nworkers > 0 ? nworkers : 1), sizeof *t->workers);
    t->files = calloc((size_t)(nfiles > 0 ? nfiles : 1), sizeof *t->files);
    if (!t->workers || !t->files) {
        free(t->workers);
        free(t->files);
        t->workers = NULL;
        t->files = NULL;
        t->nworkers = t->nfiles = 0;
        return -1;
    }
    t->nworkers = nworkers;
    t->nfiles = nfiles;
    return 0;
}

int mps_trace_setup_tensors(mps_trace *t, const mps_config *cfg)
{
    int n = mps_tensor_count(cfg);
    free(t->tensors);
    t->ntensors = 0;
    if (!(t->tensors = calloc((size_t)(n > 0 ? n : 1), sizeof *t->tensors)))
        return -1;
    for (int i = 0; i < n; i++) {
        mps_tensor_spec spec;
        mps_tensor_spec_get(cfg, i, &spec);
        snprintf(t->tensors[i].name, sizeof t->tensors[i].name, "%s", spec.name);
        t->tensors[i].reader = -1;
    }
    t->ntensors = n;
    return 0;
}

static double rel(const mps_trace *t, int64_t at) { return at ? (double)(at - t->t0) / 1e9 : -1; }

int mps_trace_write_tensors(const mps_trace *t, const char *path)
{
    FILE *f = fopen(path, "w");
    if (!f)
        return -1;
    fprintf(f, "# times in s from the start (-1: never); queued = the scheduling thread had the tensor and "
               "queued its jobs, done = its last job finished, released = its read slot freed\n");
    fprintf(f, "tensor\tname\tMB\treader\tread_start\tread_end\tqueued\tdone\treleased\trss_MiB\n");
    for (int i = 0; i < t->ntensors; i++) {
        const mps_trace_tensor *e = &t->tensors[i];
        fprintf(f, "%d\t%s\t%.2f\t%d\t%.4f\t%.4f\t%.4f\t%.4f\t%.4f\t%lld\n", i, e->name, (double)e->bytes / 1e6,
                e->reader, rel(t, e->read_start), rel(t, e->read_end), rel(t, e->queued), rel(t, e->done),
                rel(t, e->released), (long long)(e->rss >> 20));
    }
    return fclose(f) == 0 ? 0 : -1;
}

/* ---- printing ---- */

typedef struct {
    int64_t at, rss;
    char text[200];
} line;

typedef struct {
    line *v;
    int n, cap;
} lines;

static void add(lines *l, int64_t at, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void add(lines *l, int64_t at, const char *fmt, ...)
{
    if (at == 0)
        return; /* never happened */
    if (l->n == l->cap) {
        int cap = l->cap ? l->cap * 2 : 64;
        line *v = realloc(l->v, sizeof *v * (size_t)cap);
        if (!v)
            return;
        l->v = v;
        l->cap = cap;
    }
    line *e = &l->v[l->n++];
    e->at = at;
    e->rss = 0;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->text, sizeof e->text, fmt, ap);
    va_end(ap);
}

static int cmp_line(const void *a, const void *b)
{
    const line *x = a, *y = b;
    return x->at < y->at ? -1 : x->at > y->at;
}

static double sec(int64_t ns) { return (double)ns / 1e9; }

/* "1.23 GB" / "45.6 MB" into a caller's buffer */
static const char *bytes_str(char *buf, size_t n, int64_t b)
{
    if (b >= 1000000000)
        snprintf(buf, n, "%.2f GB", (double)b / 1e9);
    else
        snprintf(buf, n, "%.1f MB", (double)b / 1e6);
    return buf;
}

/* bytes / seconds in GB/s, 0 when no time */
static double gbps(int64_t bytes, int64_t ns) { return ns > 0 ? (double)bytes / (double)ns : 0; }

static int64_t min_nz(int64_t a, int64_t b) { return a == 0 ? b : b == 0 ? a : a < b ? a : b; }
static int64_t max_of(int64_t a, int64_t b) { return a > b ? a : b; }

void mps_trace_print(const mps_trace *t, FILE *out)
{
    if (!t)
        return;
    int64_t end = mps_now_ns();
    lines l = { 0 };
    char b1[32], b2[32];
    const int64_t *ev = t->ev;
    add(&l, ev[MPS_EV_INPUT_OPENED], "input opened");
    add(&l, ev[MPS_EV_STAGE_BEGUN], "stage dir created");
    add(&l, ev[MPS_EV_FILES_CREATED], "%d shard files and their datasets created (HDF5 %.3f s, %lld calls)", t->nfiles,
        sec(t->h5create.ns), (long long)t->h5create.calls);
    add(&l, ev[MPS_EV_POOL_STARTED], "%d workers started", t->nworkers);
    /* readers */
    int64_t r_first_start = 0, r_first_end = 0, r_last_start = 0, r_last_end = 0;
    for (int i = 0; i < t->nreaders; i++) {
        const mps_trace_reader *r = &t->readers[i];
        r_first_start = min_nz(r_first_start, r->first_start);
        r_first_end = min_nz(r_first_end, r->first_end);
        r_last_start = max_of(r_last_start, r->last_start);
        r_last_end = max_of(r_last_end, r->last_end);
    }
    add(&l, r_first_start, "first tensor read started");
    add(&l, r_first_end, "first tensor read finished");
    add(&l, r_last_start, "last tensor read started");
    add(&l, r_last_end, "last tensor read finished");
    /* workers */
    int64_t w_first = 0, w_last = 0, w_pwrite = 0;
    for (int i = 0; i < t->nworkers; i++) {
        const mps_trace_worker *w = &t->workers[i];
        w_first = min_nz(w_first, w->first_chunk);
        w_last = max_of(w_last, w->last_chunk);
        w_pwrite = max_of(w_pwrite, w->last_pwrite_end);
    }
    add(&l, w_first, "first chunk compressed");
    add(&l, w_last, "last chunk compressed");
    add(&l, w_pwrite, "last pwrite done");
    add(&l, ev[MPS_EV_LAST_SUBMIT], "last job queued");
    add(&l, ev[MPS_EV_JOBS_DONE], "all jobs done");
    add(&l, ev[MPS_EV_FLUSHER_STOPPED], "writeback thread stopped");
    add(&l, ev[MPS_EV_DSETS_CLOSED], "checksums written, datasets closed (%.3f s)", sec(t->h5dclose.ns));
    /* files: min / max over them */
    int64_t lp_min = 0, lp_max = 0, fl_min = 0, fl_max = 0, cl_min = 0, cl_max = 0, fs_min = 0, fs_max = 0, fe_min = 0,
            fe_max = 0, close_long = 0, fsync_long = 0;
    for (int i = 0; i < t->nfiles; i++) {
        const mps_trace_file *f = &t->files[i];
        lp_min = min_nz(lp_min, f->last_pwrite);
        lp_max = max_of(lp_max, f->last_pwrite);
        fl_min = min_nz(fl_min, f->flush_begin);
        fl_max = max_of(fl_max, f->flush_begin);
        cl_min = min_nz(cl_min, f->close_end);
        cl_max = max_of(cl_max, f->close_end);
        fs_min = min_nz(fs_min, f->fsync_begin);
        fs_max = max_of(fs_max, f->fsync_begin);
        fe_min = min_nz(fe_min, f->fsync_end);
        fe_max = max_of(fe_max, f->fsync_end);
        if (f->close_end && f->flush_begin)
            close_long = max_of(close_long, f->close_end - f->flush_begin);
        if (f->fsync_end && f->fsync_begin)
            fsync_long = max_of(fsync_long, f->fsync_end - f->fsync_begin);
    }
    add(&l, lp_min, "first file complete (its last chunk pwritten); last file at +%.3f s", sec(lp_max - lp_min));
    add(&l, fl_min, "file flush+close begin (first); last begins at +%.3f s", sec(fl_max - fl_min));
    add(&l, cl_max, "file flush+close end (last); %d files, sum %.3f s, longest %.3f s", t->nfiles, sec(t->h5fclose.ns),
        sec(close_long));
    add(&l, fs_min, "file fsync begin (first); last begins at +%.3f s", sec(fs_max - fs_min));
    add(&l, fe_min, "file fsync end (first)");
    add(&l, fe_max, "file fsync end (last); sum %.3f s, longest %.3f s", sec(t->fsync.ns), sec(fsync_long));
    add(&l, ev[MPS_EV_FILES_SYNCED], "all shard files closed and fsynced");
    add(&l, ev[MPS_EV_WRITER_DONE], "writer returned");
    add(&l, ev[MPS_EV_SOURCE_STOPPED], "reader threads joined");
    add(&l, ev[MPS_EV_MANIFEST_WRITTEN], "manifest written and fsynced");
    add(&l, ev[MPS_EV_DIR_FSYNC_BEGIN], "stage directory fsync begin");
    add(&l, ev[MPS_EV_DIR_FSYNC_END], "stage directory fsync end");
    add(&l, ev[MPS_EV_RENAMED], "renamed into place");
    add(&l, ev[MPS_EV_COMMITTED], "committed (parent directory fsynced)");
    add(&l, end, "end");
    /* the resident size where an event recorded it: match by time */
    for (int i = 0; i < l.n; i++)
        for (int k = 0; k < MPS_EV_COUNT; k++)
            if (ev[k] && ev[k] == l.v[i].at)
                l.v[i].rss = t->ev_rss[k];
    /* the largest resident size seen when a tensor was queued */
    int peak = -1;
    for (int i = 0; i < t->ntensors; i++)
        if (t->tensors[i].rss && (peak < 0 || t->tensors[i].rss > t->tensors[peak].rss))
            peak = i;
    if (peak >= 0) {
        add(&l, t->tensors[peak].queued, "largest resident size when a tensor was queued: at %s",
            t->tensors[peak].name);
        if (l.n > 0 && l.v[l.n - 1].at == t->tensors[peak].queued)
            l.v[l.n - 1].rss = t->tensors[peak].rss;
    }
    qsort(l.v, (size_t)l.n, sizeof *l.v, cmp_line);
    fprintf(out, "trace: --- timeline (s from start; rss: resident MiB where sampled) ---\n");
    for (int i = 0; i < l.n; i++) {
        if (l.v[i].rss)
            fprintf(out, "trace: %8.3f  %s [rss %lld]\n", sec(l.v[i].at - t->t0), l.v[i].text,
                    (long long)(l.v[i].rss >> 20));
        else
            fprintf(out, "trace: %8.3f  %s\n", sec(l.v[i].at - t->t0), l.v[i].text);
    }
    free(l.v);

    fprintf(out, "trace: --- per thread (busy = wall time inside the call) ---\n");
    for (int i = 0; i < t->nreaders; i++) {
        const mps_trace_reader *r = &t->readers[i];
        fprintf(out,
                "trace: reader %d: %lld tensors; pread %.3f s for %s (%.2f GB/s while in it, %lld calls); "
                "whole reads %.3f s (transpose/convert %.3f s); alloc %.3f s (%lld buffers); blocked: all slots taken %.3f s, "
                "read-ahead budget full %.3f s; cpu %.3f s\n",
                i, (long long)r->tensors, sec(r->pread.ns), bytes_str(b1, sizeof b1, r->pread.bytes),
                gbps(r->pread.bytes, r->pread.ns), (long long)r->pread.calls, sec(r->read.ns),
                sec(r->read.ns - r->pread.ns), sec(r->alloc.ns), (long long)r->alloc.calls, sec(r->blocked_slot.ns),
                sec(r->blocked_budget.ns),
                sec(r->cpu_ns));
    }
    mps_trace_worker sum = { 0 };
    int64_t tail_idle_sum = 0;
    for (int i = 0; i < t->nworkers; i++) {
        const mps_trace_worker *w = &t->workers[i];
        int64_t tail = w->last_job_end && ev[MPS_EV_JOBS_DONE] ? ev[MPS_EV_JOBS_DONE] - w->last_job_end : 0;
        tail_idle_sum += tail;
        fprintf(out,
                "trace: worker %d: %lld jobs, %lld chunks (%lld zero); idle %.3f s (+%.3f s after its last job); "
                "gather %.3f s; compress %.3f s, %s -> %s; HDF5 lock wait %.3f s, H5Dwrite_chunk %.3f s; "
                "pwrite %.3f s, %s; other %.3f s; cpu %.3f s\n",
                i, (long long)w->jobs, (long long)w->chunks, (long long)w->zero_chunks, sec(w->idle_ns), sec(tail),
                sec(w->gather.ns), sec(w->compress.ns), bytes_str(b1, sizeof b1, w->compress.bytes),
                bytes_str(b2, sizeof b2, w->bytes_out), sec(w->lock_wait.ns), sec(w->h5write.ns), sec(w->pwrite.ns),
                bytes_str((char[32]){ 0 }, 32, w->pwrite.bytes), sec(w->notify.ns), sec(w->cpu_ns));
        sum.jobs += w->jobs;
        sum.chunks += w->chunks;
        sum.zero_chunks += w->zero_chunks;
        sum.idle_ns += w->idle_ns;
        sum.gather.ns += w->gather.ns;
        sum.compress.ns += w->compress.ns;
        sum.compress.bytes += w->compress.bytes;
        sum.bytes_out += w->bytes_out;
        sum.lock_wait.ns += w->lock_wait.ns;
        sum.h5write.ns += w->h5write.ns;
        sum.pwrite.ns += w->pwrite.ns;
        sum.pwrite.bytes += w->pwrite.bytes;
        sum.notify.ns += w->notify.ns;
        sum.cpu_ns += w->cpu_ns;
    }
    if (t->nworkers > 0)
        fprintf(out,
                "trace: workers (%d, sums): idle %.3f s (+%.3f s after last jobs); gather %.3f s; compress %.3f s, "
                "%s -> %s (%.2f GB/s per busy worker); HDF5 lock wait %.3f s, H5Dwrite_chunk %.3f s "
                "(%.1f us/chunk); pwrite %.3f s, %s (%.2f GB/s while in it); cpu %.3f s\n",
                t->nworkers, sec(sum.idle_ns), sec(tail_idle_sum), sec(sum.gather.ns), sec(sum.compress.ns),
                bytes_str(b1, sizeof b1, sum.compress.bytes), bytes_str(b2, sizeof b2, sum.bytes_out),
                gbps(sum.compress.bytes, sum.compress.ns), sec(sum.lock_wait.ns), sec(sum.h5write.ns),
                sum.chunks ? (double)sum.h5write.ns / 1e3 / (double)sum.chunks : 0, sec(sum.pwrite.ns),
                bytes_str((char[32]){ 0 }, 32, sum.pwrite.bytes), gbps(sum.pwrite.bytes, sum.pwrite.ns),
                sec(sum.cpu_ns));
    fprintf(out,
            "trace: main: waiting for a tensor's read %.3f s (%lld times); waiting for a tensor's jobs %.3f s; "
            "HDF5 create %.3f s, checksums+H5Dclose %.3f s, H5Fflush+H5Fclose+writeback start %.3f s; fsync %.3f s (%lld files)\n",
            sec(t->wait_source.ns), (long long)t->wait_source.calls, sec(t->wait_jobs.ns), sec(t->h5create.ns),
            sec(t->h5dclose.ns), sec(t->h5fclose.ns), sec(t->fsync.ns), (long long)t->fsync.calls);
    fprintf(out, "trace: writeback thread: sync_file_range %.3f s, %lld calls\n", sec(t->sync_range.ns),
            (long long)t->sync_range.calls);
    if (r_last_end) {
        int64_t synced = ev[MPS_EV_FILES_SYNCED], done = ev[MPS_EV_COMMITTED] ? ev[MPS_EV_COMMITTED] : end;
        fprintf(out,
                "trace: after the last read finished: %.3f s to the last chunk compressed, %.3f s to all files "
                "fsynced, %.3f s to the commit (of %.3f s in all)\n",
                w_last ? sec(w_last - r_last_end) : 0.0, synced ? sec(synced - r_last_end) : 0.0,
                sec(done - r_last_end), sec(done - t->t0));
    }
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) == 0)
        fprintf(out, "trace: process: user %.3f s, sys %.3f s, wall %.3f s, peak RSS %ld MiB\n",
                (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6,
                (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6, sec(end - t->t0), ru.ru_maxrss / 1024);
}
