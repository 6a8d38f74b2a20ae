/* Writing shard files: datasets are created up front, then every chunk is gathered, checksummed,
 * shuffled and compressed on the worker pool and stored with H5Dwrite_chunk (HDF5's own filter
 * pipeline is bypassed: it runs under the library's global lock and would serialise compression).
 * The chunk bytes themselves are written by the worker with pwrite, outside that lock (below). */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ckpt.h"
#include "h5util.h"
#include "pool.h"
#include "progress.h"
#include "trace.h"

/* ---- Deferred chunk writes ----
 * H5Dwrite_chunk holds HDF5's global lock for the whole call, the pwrite of the chunk bytes
 * included, so every worker waited on every other worker's write syscall. The shard files are
 * therefore opened through a thin file driver over sec2 (HDF5's default) that forwards every
 * call but one: while a worker's H5Dwrite_chunk runs, the raw-data write of exactly that worker's
 * buffer is not performed but its address recorded; the worker pwrites the bytes there once
 * H5Dwrite_chunk has returned, outside the lock.
 * Why that is safe: HDF5 has allocated the chunk's space (raw data, H5MF) and recorded it in the
 * chunk index exactly as for an ordinary direct write, so the file's structure is unchanged and
 * the space belongs to the chunk until the file is closed (nothing is rewritten or deleted here,
 * so it is never freed for reuse). HDF5 keeps no copy of a directly written chunk (no chunk-cache
 * entry; the metadata accumulator trims itself around any raw write before the driver is called),
 * so no cache flush and no file close ever writes those bytes. HDF5 never reads them while
 * writing, and every pwrite has completed before the first dataset is closed.
 * The driver keeps sec2's feature flags and free-list map, writes no driver-info block (sb_size
 * is NULL), so the file is an ordinary HDF5 file that any reader opens with the default driver. */
#if H5_VERS_MAJOR == 1 && H5_VERS_MINOR == 10 /* the H5FD_class_t of the 1.10 series */
#define MPS_DEFER_WRITES 1
#else
#define MPS_DEFER_WRITES 0 /* other versions: HDF5 writes the bytes itself, under its lock */
#endif

typedef struct {
    const void *buf; /* the buffer whose raw-data write is taken out, or NULL */
    size_t size;
    haddr_t addr;    /* out: where HDF5 placed it */
    int taken;       /* out: the driver saw and skipped that write */
} defer_slot;

typedef struct {
    defer_slot slot; /* shared by the writer's files: their H5Dwrite_chunk calls are serialised */
    int discard;     /* the write failed and the files are abandoned: the driver drops every write,
                      * so that closing them cannot fail (HDF5 1.10 leaves a file whose close failed
                      * half-destroyed, and crashes on it at exit) */
} defer_ctl;

#if MPS_DEFER_WRITES
typedef struct {
    defer_ctl *ctl;
} defer_fapl;

typedef struct {
    H5FD_t pub;       /* first: HDF5 owns it */
    H5FD_t *inner;    /* the sec2 file that does all the I/O HDF5 does */
    defer_ctl *ctl;
    haddr_t deferred_end; /* end of the highest deferred write, so that get_eof stays truthful */
} defer_file;

static H5FD_t *defer_open(const char *name, unsigned flags, hid_t fapl, haddr_t maxaddr)
{
    const defer_fapl *fa = H5Pget_driver_info(fapl);
    if (!fa)
        return NULL;
    defer_file *f = calloc(1, sizeof *f);
    if (!f)
        return NULL;
    hid_t inner_fapl = H5Pcreate(H5P_FILE_ACCESS);
    if (inner_fapl >= 0 && H5Pset_fapl_sec2(inner_fapl) >= 0)
        f->inner = H5FDopen(name, flags, inner_fapl, maxaddr);
    if (inner_fapl >= 0)
        H5Pclose(inner_fapl);
    if (!f->inner) {
        free(f);
        return NULL;
    }
    f->ctl = fa->ctl;
    return &f->pub;
}

static herr_t defer_close(H5FD_t *file)
{
    defer_file *f = (defer_file *)file;
    herr_t rc = H5FDclose(f->inner);
    free(f);
    return rc;
}

static int defer_cmp(const H5FD_t *a, const H5FD_t *b)
{
    return H5FDcmp(((const defer_file *)a)->inner, ((const defer_file *)b)->inner);
}

static herr_t defer_query(const H5FD_t *file, unsigned long *flags)
{
    (void)file;
    if (flags) /* sec2's behaviour: aggregated metadata and small raw data, the metadata accumulator */
        *flags = H5FD_FEAT_AGGREGATE_METADATA | H5FD_FEAT_ACCUMULATE_METADATA | H5FD_FEAT_DATA_SIEVE |
                 H5FD_FEAT_AGGREGATE_SMALLDATA;
    return 0;
}

static haddr_t defer_get_eoa(const H5FD_t *file, H5FD_mem_t type)
{
    return H5FDget_eoa(((const defer_file *)file)->inner, type);
}

static herr_t defer_set_eoa(H5FD_t *file, H5FD_mem_t type, haddr_t addr)
{
    return H5FDset_eoa(((defer_file *)file)->inner, type, addr);
}

static haddr_t defer_get_eof(const H5FD_t *file, H5FD_mem_t type)
{
    const defer_file *f = (const defer_file *)file;
    haddr_t eof = H5FDget_eof(f->inner, type);
    return eof != HADDR_UNDEF && eof < f->deferred_end ? f->deferred_end : eof;
}

static herr_t defer_get_handle(H5FD_t *file, hid_t fapl, void **handle)
{
    return H5FDget_vfd_handle(((defer_file *)file)->inner, fapl, handle);
}

static herr_t defer_read(H5FD_t *file, H5FD_mem_t type, hid_t dxpl, haddr_t addr, size_t size, void *buf)
{
    return H5FDread(((defer_file *)file)->inner, type, dxpl, addr, size, buf);
}

static herr_t defer_write(H5FD_t *file, H5FD_mem_t type, hid_t dxpl, haddr_t addr, size_t size, const void *buf)
{
    defer_file *f = (defer_file *)file;
    defer_slot *s = &f->ctl->slot;
    if (f->ctl->discard)
        return 0;
    if (type == H5FD_MEM_DRAW && s->buf == buf && s->size == size && !s->taken) {
        s->addr = addr;
        s->taken = 1;
        if (addr + size > f->deferred_end)
            f->deferred_end = addr + size;
        return 0;
    }
    return H5FDwrite(f->inner, type, dxpl, addr, size, buf);
}

static herr_t defer_flush(H5FD_t *file, hid_t dxpl, hbool_t closing)
{
    return H5FDflush(((defer_file *)file)->inner, dxpl, closing);
}

static herr_t defer_truncate(H5FD_t *file, hid_t dxpl, hbool_t closing)
{
    defer_file *f = (defer_file *)file;
    return f->ctl->discard ? 0 : H5FDtruncate(f->inner, dxpl, closing);
}

static herr_t defer_lock(H5FD_t *file, hbool_t rw)
{
    return H5FDlock(((defer_file *)file)->inner, rw);
}

static herr_t defer_unlock(H5FD_t *file)
{
    return H5FDunlock(((defer_file *)file)->inner);
}

static const H5FD_class_t defer_class = {
    .name = "mpshard_defer",
    .maxaddr = ((haddr_t)1 << 63) - 1, /* sec2's: what an off_t addresses */
    .fc_degree = H5F_CLOSE_WEAK,
    .fapl_size = sizeof(defer_fapl),
    .open = defer_open,
    .close = defer_close,
    .cmp = defer_cmp,
    .query = defer_query,
    .get_eoa = defer_get_eoa,
    .set_eoa = defer_set_eoa,
    .get_eof = defer_get_eof,
    .get_handle = defer_get_handle,
    .read = defer_read,
    .write = defer_write,
    .flush = defer_flush,
    .truncate = defer_truncate,
    .lock = defer_lock,
    .unlock = defer_unlock,
    .fl_map = H5FD_FLMAP_DICHOTOMY,
};
#endif

typedef struct {
    hid_t dset;
    int file;          /* index into the writer's file list */
    mps_kind kind;
    int tensor;
    mps_piece piece;
    mps_chunk_grid grid;
    uint64_t *sums;    /* one checksum per chunk */
} out_dataset;

typedef struct {
    float *raw;
    uint8_t *shuffled, *packed;
    size_t packed_cap;
    ZSTD_CCtx *cctx;
    /* All-zero chunks (fresh optimizer state: two thirds of what `shard` writes) encode to the same
     * frame every time: the last one made is kept, with the checksum of the last zero run. */
    uint8_t *zero_frame;
    size_t zero_frame_size;
    int64_t zero_frame_elems; /* chunk_elems it was made for, 0 = none */
    uint64_t zero_sum;
    int64_t zero_sum_elems;   /* element count it was made for, 0 = none */
} worker_scratch;

typedef struct writer writer;
/* A job writes a run of consecutive chunks of one dataset: a source chunk that straddles two of
 * them is then read once (the reader keeps its last decoded chunk). */
#define CHUNKS_PER_JOB 8
typedef struct {
    writer *w;
    out_dataset *d;
    int64_t chunk, count;
} chunk_job;

struct writer {
    int *fd;                    /* per file: a plain descriptor, for the chunk bytes and early writeback */
    _Atomic int64_t *unflushed; /* per file: bytes written since writeback was last started */
    /* The writeback thread: starts the disk writing a file's new bytes every FLUSH_BYTES, so that
     * the disk writes while we compress instead of the final fsync writing everything at the end;
     * sync_file_range can block while the device queue is full, which would stall a worker. */
    pthread_t flusher;
    int flusher_running, flush_stop;
    int *flush_pending;         /* per file, guarded by flush_lock */
    pthread_mutex_t flush_lock;
    pthread_cond_t flush_cond;
    const mps_manifest *m;
    mps_source *src;
    out_dataset *ds;
    int nds, cap;
    hid_t *files;
    char (*paths)[4400];
    int nfiles;
    hid_t driver, fapl;         /* the deferring driver (registered per writer) and the files' access list */
    pthread_mutex_t h5_lock;    /* held around H5Dwrite_chunk, which HDF5 serialises anyway: guards ctl.slot */
    defer_ctl ctl;
    pthread_mutex_t sched_lock; /* guards left and failed */
    pthread_cond_t sched_cond;
    int64_t *left;              /* per tensor: jobs not finished yet */
    int failed;
    worker_scratch *scratch;
    int nthreads;
    mps_progress *progress;
    mps_trace *tr;              /* phase timeline, or NULL (then no clock is read) */
    mps_trace_worker *tw;       /* its per-worker records, or NULL */
    mps_trace_file *tf;         /* its per-file records, or NULL */
    const volatile sig_atomic_t *stop; /* mps_write_opts.stop */
};

#define FLUSH_BYTES ((int64_t)64 << 20)

static void *flusher_main(void *arg)
{
    writer *w = arg;
    int next = 0;
    pthread_mutex_lock(&w->flush_lock);
    for (;;) {
        int f = -1;
        for (int k = 0; k < w->nfiles && f < 0; k++) /* round robin: no file waits behind a busy one */
            if (w->flush_pending[(next + k) % w->nfiles])
                f = (next + k) % w->nfiles;
        if (f < 0) {
            if (w->flush_stop)
                break;
            pthread_cond_wait(&w->flush_cond, &w->flush_lock);
            continue;
        }
        w->flush_pending[f] = 0;
        next = f + 1;
        pthread_mutex_unlock(&w->flush_lock);
        int64_t t0 = w->tr ? mps_now_ns() : 0;
        sync_file_range(w->fd[f], 0, 0, SYNC_FILE_RANGE_WRITE); /* a hint: its failure changes nothing */
        if (w->tr)
            mps_tacc_add(&w->tr->sync_range, mps_now_ns() - t0, 0);
        pthread_mutex_lock(&w->flush_lock);
    }
    pthread_mutex_unlock(&w->flush_lock);
    return NULL;
}

static void flusher_stop(writer *w)
{
    if (!w->flusher_running)
        return;
    pthread_mutex_lock(&w->flush_lock);
    w->flush_stop = 1;
    pthread_cond_signal(&w->flush_cond);
    pthread_mutex_unlock(&w->flush_lock);
    pthread_join(w->flusher, NULL);
    w->flusher_running = 0;
}

/* 1 when the n bytes at p are all zero bits (-0.0f is not zero here: its frame differs). */
static int all_zero(const void *p, size_t n)
{
    const uint64_t *q = p;
    size_t words = n / 8;
    for (size_t i = 0; i < words; i += 512) { /* 4 KiB at a time: stops early on real data */
        uint64_t acc = 0;
        size_t e = i + 512 < words ? i + 512 : words;
        for (size_t k = i; k < e; k++)
            acc |= q[k];
        if (acc)
            return 0;
    }
    const uint8_t *b = p;
    for (size_t i = words * 8; i < n; i++)
        if (b[i])
            return 0;
    return 1;
}

static int pwrite_all(int fd, const void *buf, size_t n, off_t off)
{
    const char *p = buf;
    while (n > 0) {
        ssize_t k = pwrite(fd, p, n, off);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0) {
            if (k == 0)
                errno = ENOSPC;
            return -1;
        }
        p += k;
        n -= (size_t)k;
        off += k;
    }
    return 0;
}

/* The largest value stored at *p: v or what was there (a file's last pwrite, from any worker). */
static void atomic_max(_Atomic int64_t *p, int64_t v)
{
    int64_t cur = atomic_load_explicit(p, memory_order_relaxed);
    while (cur < v && !atomic_compare_exchange_weak_explicit(p, &cur, v, memory_order_relaxed, memory_order_relaxed))
        ;
}

static int write_one_chunk(writer *w, out_dataset *d, int64_t chunk, int worker, mps_err *err)
{
    worker_scratch *s = &w->scratch[worker];
    mps_trace_worker *tw = w->tw ? &w->tw[worker] : NULL;
    int64_t ta = tw ? mps_now_ns() : 0, tb = 0;
    int stop = w->stop ? *w->stop : 0;
    if (stop)
        return mps_fail(err, MPS_ESTOPPED + stop, "%s: stopped by a signal before it was written", w->paths[d->file]);
    int64_t begin, end, offset[MPS_MAX_DIMS];
    mps_chunk_range(&d->grid, chunk, &begin, &end, offset);
    int64_t n = end - begin;
    if (w->src->gather(w->src->ctx, worker, d->kind, d->tensor, &d->piece.box, d->piece.flat_begin + begin,
                       d->piece.flat_begin + end, s->raw, err) != 0)
        return -1;
    if (tw) {
        tb = mps_now_ns();
        mps_tacc_add(&tw->gather, tb - ta, n * (int64_t)sizeof(float));
    }
    /* edge chunks are stored full size: zero the tail */
    size_t raw_bytes = (size_t)d->grid.chunk_elems * sizeof(float);
    memset(s->raw + n, 0, raw_bytes - (size_t)n * sizeof(float));
    const uint8_t *frame = s->packed;
    size_t packed;
    int zero = all_zero(s->raw, (size_t)n * sizeof(float));
    if (zero) {
        if (s->zero_frame_elems != d->grid.chunk_elems) {
            if (mps_chunk_encode(s->cctx, w->m->zstd_level, s->raw, raw_bytes, sizeof(float), s->shuffled, s->zero_frame,
                                 s->packed_cap, &s->zero_frame_size, err) != 0)
                return -1;
            s->zero_frame_elems = d->grid.chunk_elems;
        }
        if (s->zero_sum_elems != n) {
            s->zero_sum = mps_xxh3(s->raw, (size_t)n * sizeof(float));
            s->zero_sum_elems = n;
        }
        d->sums[chunk] = s->zero_sum;
        frame = s->zero_frame;
        packed = s->zero_frame_size;
    } else {
        d->sums[chunk] = mps_xxh3(s->raw, (size_t)n * sizeof(float));
        if (mps_chunk_encode(s->cctx, w->m->zstd_level, s->raw, raw_bytes, sizeof(float), s->shuffled, s->packed,
                             s->packed_cap, &packed, err) != 0)
            return -1;
    }
    if (tw) {
        ta = mps_now_ns();
        mps_tacc_add(&tw->compress, ta - tb, n * (int64_t)sizeof(float));
        tw->bytes_out += (int64_t)packed;
        tw->chunks++;
        tw->zero_chunks += zero;
        if (!tw->first_chunk)
            tw->first_chunk = ta;
        tw->last_chunk = ta;
    }
    hsize_t hoff[MPS_MAX_DIMS];
    for (int i = 0; i < d->grid.ndim; i++)
        hoff[i] = (hsize_t)offset[i];
    /* Under the lock HDF5 only allocates and indexes the chunk; the driver hands its address back
     * in the slot (taken stays 0 where HDF5 wrote the bytes itself: another HDF5 version). */
    pthread_mutex_lock(&w->h5_lock);
    if (tw) {
        tb = mps_now_ns();
        mps_tacc_add(&tw->lock_wait, tb - ta, 0);
    }
    w->ctl.slot = (defer_slot){ .buf = frame, .size = packed, .addr = HADDR_UNDEF };
    herr_t hrc = H5Dwrite_chunk(d->dset, H5P_DEFAULT, 0, hoff, packed, frame);
    defer_slot got = w->ctl.slot;
    w->ctl.slot.buf = NULL;
    pthread_mutex_unlock(&w->h5_lock);
    if (tw) {
        ta = mps_now_ns();
        mps_tacc_add(&tw->h5write, ta - tb, (int64_t)packed);
    }
    int io_errno = 0;
    if (hrc >= 0 && got.taken && pwrite_all(w->fd[d->file], frame, packed, (off_t)got.addr) != 0)
        io_errno = errno;
    if (tw) {
        tb = mps_now_ns();
        mps_tacc_add(&tw->pwrite, tb - ta, (int64_t)packed);
        tw->last_pwrite_end = tb;
        if (w->tf) {
            atomic_max(&w->tf[d->file].last_pwrite, tb);
            atomic_fetch_add_explicit(&w->tf[d->file].bytes, (int64_t)packed, memory_order_relaxed);
        }
    }
    if (hrc < 0 || io_errno) {
        mps_tensor_spec spec;
        mps_tensor_spec_get(&w->m->cfg, d->tensor, &spec);
        return mps_fail(err, MPS_EIO, "%s: writing chunk %lld of /%s/%s failed: %s", w->paths[d->file], (long long)chunk,
                        mps_kind_name(d->kind), spec.name, io_errno ? strerror(io_errno) : "HDF5 error (disk full?)");
    }
    mps_progress_add(w->progress, n * (int64_t)sizeof(float));
    if (w->flusher_running && atomic_fetch_add(&w->unflushed[d->file], (int64_t)packed) + (int64_t)packed > FLUSH_BYTES) {
        atomic_store(&w->unflushed[d->file], 0);
        pthread_mutex_lock(&w->flush_lock);
        w->flush_pending[d->file] = 1;
        pthread_cond_signal(&w->flush_cond);
        pthread_mutex_unlock(&w->flush_lock);
    }
    if (tw)
        mps_tacc_add(&tw->notify, mps_now_ns() - tb, 0);
    return 0;
}

static int write_chunks(void *arg, int worker, mps_err *err)
{
    chunk_job *j = arg;
    writer *w = j->w;
    mps_trace_worker *tw = w->tw ? &w->tw[worker] : NULL;
    if (tw)
        tw->idle_ns += mps_now_ns() - (tw->last_job_end ? tw->last_job_end : tw->start);
    int rc = 0;
    for (int64_t c = j->chunk; c < j->chunk + j->count && rc == 0; c++)
        rc = write_one_chunk(w, j->d, c, worker, err);
    if (tw) {
        tw->jobs++;
        tw->cpu_ns = mps_thread_cpu_ns();
        tw->last_job_end = mps_now_ns();
    }
    pthread_mutex_lock(&w->sched_lock);
    if (rc != 0)
        w->failed = 1;
    if (--w->left[j->d->tensor] == 0 || rc != 0) {
        if (tw && w->tr->tensors && j->d->tensor < w->tr->ntensors)
            w->tr->tensors[j->d->tensor].done = mps_now_ns();
        pthread_cond_broadcast(&w->sched_cond);
    }
    pthread_mutex_unlock(&w->sched_lock);
    return rc;
}

/* Waits until every job of tensor t has finished; on a failed job, for the pool's first error. */
static int wait_tensor(writer *w, mps_pool *pool, int t, mps_err *err)
{
    int64_t t0 = w->tr ? mps_now_ns() : 0;
    pthread_mutex_lock(&w->sched_lock);
    while (w->left[t] > 0 && !w->failed)
        pthread_cond_wait(&w->sched_cond, &w->sched_lock);
    int failed = w->failed;
    pthread_mutex_unlock(&w->sched_lock);
    if (w->tr)
        mps_tacc_add(&w->tr->wait_jobs, mps_now_ns() - t0, 0);
    if (failed) {
        mps_pool_wait(pool, err);
        return -1;
    }
    return 0;
}

static int create_dataset(writer *w, int file, mps_kind kind, int tensor, const mps_piece *p, mps_err *err)
{
    const mps_manifest *m = w->m;
    mps_tensor_spec spec;
    mps_tensor_spec_get(&m->cfg, tensor, &spec);
    if (w->nds == w->cap) {
        int cap = w->cap ? w->cap * 2 : 256;
        out_dataset *grown = realloc(w->ds, sizeof *grown * (size_t)cap);
        if (!grown)
            return mps_fail(err, MPS_ENOMEM, "out of memory");
        w->ds = grown;
        w->cap = cap;
    }
    out_dataset *d = &w->ds[w->nds];
    memset(d, 0, sizeof *d);
    d->file = file;
    d->kind = kind;
    d->tensor = tensor;
    d->piece = *p;
    d->dset = -1;
    int whole = p->flat_begin == 0 && p->flat_end == mps_box_numel(&p->box);
    int ndim = whole ? p->box.ndim : 1;
    int64_t dims[MPS_MAX_DIMS];
    for (int i = 0; i < ndim; i++)
        dims[i] = whole ? p->box.cnt[i] : p->flat_end - p->flat_begin;
    mps_chunk_grid_plan(&d->grid, ndim, dims, m->chunk_bytes / (int64_t)sizeof(float));
    d->sums = calloc((size_t)d->grid.nchunks, sizeof *d->sums);
    if (!d->sums)
        return mps_fail(err, MPS_ENOMEM, "out of memory");
    w->nds++;
    hsize_t hdims[MPS_MAX_DIMS], hchunk[MPS_MAX_DIMS];
    for (int i = 0; i < ndim; i++) {
        hdims[i] = (hsize_t)dims[i];
        hchunk[i] = (hsize_t)d->grid.chunk[i];
    }
    char path[MPS_NAME_MAX + 16];
    snprintf(path, sizeof path, "/%s/%s", mps_kind_name(kind), spec.name);
    hid_t space = H5Screate_simple(ndim, hdims, NULL);
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    unsigned level = (unsigned)m->zstd_level;
    H5Pset_chunk(dcpl, ndim, hchunk);
    H5Pset_shuffle(dcpl);
    H5Pset_filter(dcpl, MPS_ZSTD_FILTER_ID, H5Z_FLAG_MANDATORY, 1, &level);
    H5Pset_fill_time(dcpl, H5D_FILL_TIME_NEVER);
    hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
    H5Pset_create_intermediate_group(lcpl, 1);
    d->dset = H5Dcreate2(w->files[file], path, H5T_IEEE_F32LE, space, lcpl, dcpl, H5P_DEFAULT);
    H5Pclose(lcpl);
    H5Pclose(dcpl);
    H5Sclose(space);
    if (d->dset < 0)
        return mps_fail(err, MPS_EIO, "%s: cannot create dataset %s", w->paths[file], path);
    int64_t shape[MPS_MAX_DIMS], range[2] = { p->flat_begin, p->flat_end };
    for (int i = 0; i < spec.ndim; i++)
        shape[i] = spec.shape[i];
    if (mps_h5_attr_str(d->dset, "tensor", spec.name) || mps_h5_attr_str(d->dset, "kind", mps_kind_name(kind)) ||
        mps_h5_attr_i64(d->dset, "canonical_shape", shape, spec.ndim) ||
        mps_h5_attr_i64(d->dset, "box_offset", p->box.off, p->box.ndim) ||
        mps_h5_attr_i64(d->dset, "box_count", p->box.cnt, p->box.ndim) ||
        mps_h5_attr_i64(d->dset, "flat_range", range, 2))
        return mps_fail(err, MPS_EIO, "%s: cannot write attributes of %s", w->paths[file], path);
    return 0;
}

static int create_file(writer *w, const char *dir, int index, int rank, const mps_owners *owners, mps_err *err)
{
    const mps_manifest *m = w->m;
    char name[32];
    mps_shard_file_name(rank, name, sizeof name);
    snprintf(w->paths[index], sizeof w->paths[index], "%s/%s", dir, name);
    w->files[index] = mps_h5_create_file(w->paths[index], w->fapl, err);
    if (w->files[index] < 0)
        return -1;
    w->fd[index] = open(w->paths[index], O_WRONLY | O_CLOEXEC);
    if (w->fd[index] < 0)
        return mps_fail(err, MPS_EIO, "%s: cannot open for writing: %s", w->paths[index], strerror(errno));
    char layout[256];
    mps_layout_format(&m->layout, layout, sizeof layout);
    int64_t nums[3] = { m->format_version, rank, mps_layout_world(&m->layout) };
    hid_t f = w->files[index];
    if (mps_h5_attr_str(f, "format", "mpshard") || mps_h5_attr_i64(f, "format_version", &nums[0], 1) ||
        mps_h5_attr_str(f, "checkpoint_id", m->checkpoint_id) || mps_h5_attr_i64(f, "rank", &nums[1], 1) ||
        mps_h5_attr_i64(f, "world", &nums[2], 1) || mps_h5_attr_str(f, "layout", layout))
        return mps_fail(err, MPS_EIO, "%s: cannot write file attributes", w->paths[index]);
    for (int k = 0; k < MPS_KIND_COUNT; k++) {
        if (!(m->kinds & (1u << k)))
            continue;
        for (int t = 0; t < mps_tensor_count(&m->cfg); t++) {
            int np = mps_piece_count(&m->cfg, &m->layout, (mps_kind)k, t);
            for (int id = 0; id < np; id++) {
                if (mps_owner_of(owners, (mps_kind)k, t, id) != rank)
                    continue;
                mps_piece p;
                mps_piece_by_id(&m->cfg, &m->layout, (mps_kind)k, t, id, &p);
                if (p.flat_end > p.flat_begin && create_dataset(w, index, (mps_kind)k, t, &p, err) != 0)
                    return -1;
            }
        }
    }
    return 0;
}

static int cmp_by_tensor(const void *a, const void *b)
{
    const out_dataset *x = a, *y = b;
    if (x->tensor != y->tensor)
        return x->tensor - y->tensor;
    if (x->kind != y->kind)
        return (int)x->kind - (int)y->kind;
    return x->file - y->file;
}

static void writer_free(writer *w)
{
    flusher_stop(w);
    w->ctl.discard = 1; /* files still open here are abandoned (an error): nothing more reaches them */
    for (int i = 0; i < w->nds; i++) {
        if (w->ds[i].dset >= 0)
            H5Dclose(w->ds[i].dset);
        free(w->ds[i].sums);
    }
    free(w->ds);
    for (int i = 0; i < w->nfiles; i++)
        if (w->files[i] >= 0)
            H5Fclose(w->files[i]);
    free(w->files);
    free(w->paths);
    if (w->fd)
        for (int i = 0; i < w->nfiles; i++)
            if (w->fd[i] >= 0)
                close(w->fd[i]);
    free(w->fd);
    free((void *)w->unflushed);
    free(w->flush_pending);
    free(w->left);
    if (w->fapl >= 0 && w->fapl != H5P_DEFAULT)
        H5Pclose(w->fapl);
    if (w->driver >= 0)
        H5FDunregister(w->driver);
    if (w->scratch) {
        for (int i = 0; i < w->nthreads; i++) {
            free(w->scratch[i].raw);
            free(w->scratch[i].shuffled);
            free(w->scratch[i].packed);
            free(w->scratch[i].zero_frame);
            ZSTD_freeCCtx(w->scratch[i].cctx);
        }
        free(w->scratch);
    }
    pthread_mutex_destroy(&w->h5_lock);
    pthread_mutex_destroy(&w->sched_lock);
    pthread_cond_destroy(&w->sched_cond);
    pthread_mutex_destroy(&w->flush_lock);
    pthread_cond_destroy(&w->flush_cond);
}

/* The files' access list: the deferring driver where this HDF5 has it. */
static int writer_fapl(writer *w, mps_err *err)
{
#if MPS_DEFER_WRITES
    defer_fapl fa = { &w->ctl };
    w->driver = H5FDregister(&defer_class);
    w->fapl = w->driver >= 0 ? H5Pcreate(H5P_FILE_ACCESS) : -1;
    if (w->fapl < 0 || H5Pset_driver(w->fapl, w->driver, &fa) < 0)
        return mps_fail(err, MPS_EFAIL, "cannot set up the HDF5 file driver for writing shards");
#else
    (void)err;
    w->fapl = H5P_DEFAULT;
#endif
    return 0;
}

int mps_write_shards(const char *dir, const mps_manifest *m, const int *ranks, int nranks, mps_source *src,
                     const mps_write_opts *opts, mps_err *err)
{
    if (mps_h5_init(err) != 0)
        return -1;
    writer w = { .m = m, .src = src, .driver = -1, .fapl = -1 };
    pthread_mutex_init(&w.h5_lock, NULL);
    pthread_mutex_init(&w.sched_lock, NULL);
    pthread_cond_init(&w.sched_cond, NULL);
    pthread_mutex_init(&w.flush_lock, NULL);
    pthread_cond_init(&w.flush_cond, NULL);
    int world = mps_layout_world(&m->layout), nt = mps_tensor_count(&m->cfg);
    if (!ranks)
        nranks = world;
    mps_owners *owners = NULL;
    mps_pool *pool = NULL;
    chunk_job *jobs = NULL;
    int rc = -1;
    if (mps_owners_build(&m->cfg, &m->layout, m->kinds, &owners, err) != 0)
        goto out;
    w.files = malloc(sizeof *w.files * (size_t)nranks);
    w.paths = malloc(sizeof *w.paths * (size_t)nranks);
    w.fd = malloc(sizeof *w.fd * (size_t)nranks);
    w.unflushed = calloc((size_t)nranks, sizeof *w.unflushed);
    w.flush_pending = calloc((size_t)nranks, sizeof *w.flush_pending);
    w.left = calloc((size_t)(nt > 0 ? nt : 1), sizeof *w.left);
    if (!w.files || !w.paths || !w.fd || !w.unflushed || !w.flush_pending || !w.left) {
        mps_fail(err, MPS_ENOMEM, "out of memory");
        goto out;
    }
    for (int i = 0; i < nranks; i++) {
        w.files[i] = -1;
        w.fd[i] = -1;
    }
    w.nfiles = nranks;
    w.nthreads = opts->threads > 0 ? opts->threads : mps_cpu_count();
    w.tr = opts->trace;
    w.stop = opts->stop;
    if (w.tr && mps_trace_setup_writer(w.tr, w.nthreads, nranks) == 0) {
        w.tw = w.tr->workers;
        w.tf = w.tr->files;
    }
    if (writer_fapl(&w, err) != 0)
        goto out;
    for (int i = 0; i < nranks; i++) {
        int rank = ranks ? ranks[i] : i;
        if (rank < 0 || rank >= world) {
            mps_fail(err, MPS_EUSAGE, "rank %d outside the layout's world of %d", rank, world);
            goto out;
        }
        int64_t t0 = w.tr ? mps_now_ns() : 0;
        if (create_file(&w, dir, i, rank, owners, err) != 0)
            goto out;
        if (w.tr)
            mps_tacc_add(&w.tr->h5create, mps_now_ns() - t0, 0);
    }
    mps_trace_event(w.tr, MPS_EV_FILES_CREATED);
    qsort(w.ds, (size_t)w.nds, sizeof *w.ds, cmp_by_tensor);
    int64_t njobs = 0, total_bytes = 0;
    for (int i = 0; i < w.nds; i++) {
        njobs += (w.ds[i].grid.nchunks + CHUNKS_PER_JOB - 1) / CHUNKS_PER_JOB;
        total_bytes += (w.ds[i].piece.flat_end - w.ds[i].piece.flat_begin) * (int64_t)sizeof(float);
    }
    jobs = malloc(sizeof *jobs * (size_t)(njobs ? njobs : 1));
    w.scratch = calloc((size_t)w.nthreads, sizeof *w.scratch);
    if (!jobs || !w.scratch) {
        mps_fail(err, MPS_ENOMEM, "out of memory");
        goto out;
    }
    size_t chunk_max = (size_t)m->chunk_bytes;
    for (int i = 0; i < w.nthreads; i++) {
        worker_scratch *s = &w.scratch[i];
        s->packed_cap = ZSTD_compressBound(chunk_max);
        s->raw = malloc(chunk_max);
        s->shuffled = malloc(chunk_max);
        s->packed = malloc(s->packed_cap);
        s->zero_frame = malloc(s->packed_cap);
        s->cctx = ZSTD_createCCtx();
        if (!s->raw || !s->shuffled || !s->packed || !s->zero_frame || !s->cctx) {
            mps_fail(err, MPS_ENOMEM, "out of memory for worker buffers");
            goto out;
        }
    }
    w.progress = opts->progress ? opts->progress
                                : mps_progress_new(opts->label ? opts->label : "write", total_bytes, opts->quiet ? 0 : -1);
    if (!opts->progress) { /* the total is the state written, every stored kind, not the input's size */
        char what[96] = "of state written (";
        for (int k = 0, n = 0; k < MPS_KIND_COUNT; k++)
            if (m->kinds & (1u << k))
                snprintf(what + strlen(what), sizeof what - strlen(what), "%s%s", n++ ? ", " : "",
                         mps_kind_name((mps_kind)k));
        snprintf(what + strlen(what), sizeof what - strlen(what), ")");
        mps_progress_set_what(w.progress, what);
    }
    if (w.tw) {
        int64_t now = mps_now_ns();
        for (int i = 0; i < w.nthreads; i++)
            w.tw[i].start = now;
        mps_trace_event(w.tr, MPS_EV_POOL_STARTED);
    }
    if (mps_pool_create(w.nthreads, (int)(njobs < 65536 ? njobs + 1 : 65536), &pool, err) != 0)
        goto out;
    /* without the writeback thread, the final fsync writes everything: slower, still correct */
    w.flusher_running = pthread_create(&w.flusher, NULL, flusher_main, &w) == 0;
    /* Tensor by tensor, so that a source holds few tensors in memory: tensor t is begun (loaded)
     * while t-1 compresses, and t's jobs are queued before waiting for t-1's, so that workers go on
     * with t while the last jobs of t-1 finish instead of idling at a per-tensor barrier. */
    int next = 0;
    int64_t j = 0;
    for (int t = 0; t < nt; t++) {
        if (src->begin_tensor && src->begin_tensor(src->ctx, t, err) != 0)
            goto out_pool;
        int first = next;
        while (next < w.nds && w.ds[next].tensor == t)
            next++;
        int64_t tjobs = 0;
        for (int i = first; i < next; i++)
            tjobs += (w.ds[i].grid.nchunks + CHUNKS_PER_JOB - 1) / CHUNKS_PER_JOB;
        pthread_mutex_lock(&w.sched_lock);
        w.left[t] = tjobs;
        pthread_mutex_unlock(&w.sched_lock);
        for (int i = first; i < next; i++)
            for (int64_t c = 0; c < w.ds[i].grid.nchunks; c += CHUNKS_PER_JOB) {
                int64_t left = w.ds[i].grid.nchunks - c;
                jobs[j] = (chunk_job){ &w, &w.ds[i], c, left < CHUNKS_PER_JOB ? left : CHUNKS_PER_JOB };
                if (mps_pool_submit(pool, write_chunks, &jobs[j++], err) != 0)
                    goto out_pool;
            }
        mps_trace_tensor *te = w.tr && w.tr->tensors && t < w.tr->ntensors ? w.tr->tensors : NULL;
        if (te) {
            te[t].queued = mps_now_ns();
            te[t].rss = mps_trace_rss();
            if (tjobs == 0)
                te[t].done = te[t].queued;
        }
        if (t > 0) {
            if (wait_tensor(&w, pool, t - 1, err) != 0)
                goto out_pool;
            if (src->end_tensor)
                src->end_tensor(src->ctx, t - 1);
            if (te)
                te[t - 1].released = mps_now_ns();
        }
    }
    mps_trace_event(w.tr, MPS_EV_LAST_SUBMIT);
    if (nt > 0) {
        if (wait_tensor(&w, pool, nt - 1, err) != 0)
            goto out_pool;
        if (src->end_tensor)
            src->end_tensor(src->ctx, nt - 1);
        if (w.tr && w.tr->tensors && nt - 1 < w.tr->ntensors)
            w.tr->tensors[nt - 1].released = mps_now_ns();
    }
    if (mps_pool_wait(pool, err) != 0)
        goto out_pool;
    mps_trace_event(w.tr, MPS_EV_JOBS_DONE);
    flusher_stop(&w);
    mps_trace_event(w.tr, MPS_EV_FLUSHER_STOPPED);
    int64_t t0 = w.tr ? mps_now_ns() : 0;
    for (int i = 0; i < w.nds; i++) {
        out_dataset *d = &w.ds[i];
        if (mps_h5_attr_u64(d->dset, "chunk_xxh3", d->sums, d->grid.nchunks) != 0) {
            mps_fail(err, MPS_EIO, "%s: cannot write checksums", w.paths[d->file]);
            goto out_pool;
        }
        H5Dclose(d->dset);
        d->dset = -1;
    }
    if (w.tr) {
        mps_tacc_add(&w.tr->h5dclose, mps_now_ns() - t0, 0);
        mps_trace_event(w.tr, MPS_EV_DSETS_CLOSED);
    }
    for (int i = 0; i < w.nfiles; i++) {
        if (w.tr)
            t0 = mps_now_ns();
        if (w.tf)
            w.tf[i].flush_begin = t0;
        /* Flush first: a flush that fails (disk full) leaves the file open and whole, and the
         * error path then closes it without writing; a failed H5Fclose could not be undone. */
        if (H5Fflush(w.files[i], H5F_SCOPE_LOCAL) < 0) {
            mps_fail(err, MPS_EIO, "%s: writing metadata failed (disk full?)", w.paths[i]);
            goto out_pool;
        }
        herr_t closed = H5Fclose(w.files[i]);
        w.files[i] = -1;
        if (closed < 0) {
            mps_fail(err, MPS_EIO, "%s: closing failed (disk full?)", w.paths[i]);
            goto out_pool;
        }
        /* the disk starts on what is left of this file while the next ones close (a hint) */
        sync_file_range(w.fd[i], 0, 0, SYNC_FILE_RANGE_WRITE);
        if (w.tr)
            mps_tacc_add(&w.tr->h5fclose, mps_now_ns() - t0, 0);
        if (w.tf)
            w.tf[i].close_end = mps_now_ns();
    }
    /* fsync after every file is closed: one file's fsync no longer waits for the writeback of
     * its bytes alone while the others' have not started */
    for (int i = 0; i < w.nfiles; i++) {
        int64_t t1 = w.tr ? mps_now_ns() : 0;
        if (w.tf)
            w.tf[i].fsync_begin = t1;
        if (fsync(w.fd[i]) != 0) {
            mps_fail(err, MPS_EIO, "%s: fsync failed: %s", w.paths[i], strerror(errno));
            goto out_pool;
        }
        if (w.tr) {
            int64_t t2 = mps_now_ns();
            mps_tacc_add(&w.tr->fsync, t2 - t1, 0);
            if (w.tf)
                w.tf[i].fsync_end = t2;
        }
    }
    mps_trace_event(w.tr, MPS_EV_FILES_SYNCED);
    rc = 0;
out_pool:
    if (pool) {
        mps_pool_wait(pool, NULL);
        mps_pool_destroy(pool);
    }
    if (!opts->progress)
        mps_progress_done(w.progress);
out:
    free(jobs);
    writer_free(&w);
    mps_owners_free(owners);
    return rc;
}
