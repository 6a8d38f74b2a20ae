/* Writing shard files: datasets are created up front, then every chunk is gathered, checksummed,
 * shuffled and compressed on the worker pool and stored with H5Dwrite_chunk (HDF5's own filter
 * pipeline is bypassed: it runs under the library's global lock and would serialise compression). */
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ckpt.h"
#include "h5util.h"
#include "pool.h"
#include "progress.h"

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
    int *flush_fd;              /* per file: a descriptor used only to start writeback early */
    _Atomic int64_t *unflushed; /* per file: bytes written since writeback was last started */
    const mps_manifest *m;
    mps_source *src;
    out_dataset *ds;
    int nds, cap;
    hid_t *files;
    char (*paths)[4400];
    int nfiles;
    worker_scratch *scratch;
    int nthreads;
    mps_progress *progress;
};

static int write_one_chunk(writer *w, out_dataset *d, int64_t chunk, int worker, mps_err *err)
{
    worker_scratch *s = &w->scratch[worker];
    int64_t begin, end, offset[MPS_MAX_DIMS];
    mps_chunk_range(&d->grid, chunk, &begin, &end, offset);
    int64_t n = end - begin;
    if (w->src->gather(w->src->ctx, worker, d->kind, d->tensor, &d->piece.box, d->piece.flat_begin + begin,
                       d->piece.flat_begin + end, s->raw, err) != 0)
        return -1;
    /* edge chunks are stored full size: zero the tail */
    memset(s->raw + n, 0, (size_t)(d->grid.chunk_elems - n) * sizeof(float));
    d->sums[chunk] = mps_xxh3(s->raw, (size_t)n * sizeof(float));
    size_t packed;
    if (mps_chunk_encode(s->cctx, w->m->zstd_level, s->raw, (size_t)d->grid.chunk_elems * sizeof(float), sizeof(float),
                         s->shuffled, s->packed, s->packed_cap, &packed, err) != 0)
        return -1;
    hsize_t hoff[MPS_MAX_DIMS];
    for (int i = 0; i < d->grid.ndim; i++)
        hoff[i] = (hsize_t)offset[i];
    if (H5Dwrite_chunk(d->dset, H5P_DEFAULT, 0, hoff, packed, s->packed) < 0) {
        mps_tensor_spec spec;
        mps_tensor_spec_get(&w->m->cfg, d->tensor, &spec);
        return mps_fail(err, MPS_EIO, "%s: writing chunk %lld of /%s/%s failed (disk full?)", w->paths[d->file],
                        (long long)chunk, mps_kind_name(d->kind), spec.name);
    }
    mps_progress_add(w->progress, n * (int64_t)sizeof(float));
    /* Start writeback of what this file has so far every 64 MiB: the disk then writes while we
     * compress, instead of the final fsync writing everything at the end. */
    if (atomic_fetch_add(&w->unflushed[d->file], (int64_t)packed) + (int64_t)packed > ((int64_t)64 << 20)) {
        atomic_store(&w->unflushed[d->file], 0);
        if (w->flush_fd[d->file] >= 0)
            sync_file_range(w->flush_fd[d->file], 0, 0, SYNC_FILE_RANGE_WRITE);
    }
    return 0;
}

static int write_chunks(void *arg, int worker, mps_err *err)
{
    chunk_job *j = arg;
    for (int64_t c = j->chunk; c < j->chunk + j->count; c++)
        if (write_one_chunk(j->w, j->d, c, worker, err) != 0)
            return -1;
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
    w->files[index] = mps_h5_create_file(w->paths[index], err);
    if (w->files[index] < 0)
        return -1;
    w->flush_fd[index] = open(w->paths[index], O_RDONLY | O_CLOEXEC);
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
    if (w->flush_fd)
        for (int i = 0; i < w->nfiles; i++)
            if (w->flush_fd[i] >= 0)
                close(w->flush_fd[i]);
    free(w->flush_fd);
    free((void *)w->unflushed);
    if (w->scratch) {
        for (int i = 0; i < w->nthreads; i++) {
            free(w->scratch[i].raw);
            free(w->scratch[i].shuffled);
            free(w->scratch[i].packed);
            ZSTD_freeCCtx(w->scratch[i].cctx);
        }
        free(w->scratch);
    }
}

int mps_write_shards(const char *dir, const mps_manifest *m, const int *ranks, int nranks, mps_source *src,
                     const mps_write_opts *opts, mps_err *err)
{
    if (mps_h5_init(err) != 0)
        return -1;
    writer w = { .m = m, .src = src };
    int world = mps_layout_world(&m->layout);
    if (!ranks)
        nranks = world;
    mps_owners *owners = NULL;
    mps_pool *pool = NULL;
    chunk_job *jobs = NULL;
    int rc = -1;
    if (mps_owners_build(&m->cfg, &m->layout, m->kinds, &owners, err) != 0)
        return -1;
    w.files = malloc(sizeof *w.files * (size_t)nranks);
    w.paths = malloc(sizeof *w.paths * (size_t)nranks);
    w.flush_fd = malloc(sizeof *w.flush_fd * (size_t)nranks);
    w.unflushed = calloc((size_t)nranks, sizeof *w.unflushed);
    if (!w.files || !w.paths || !w.flush_fd || !w.unflushed) {
        mps_fail(err, MPS_ENOMEM, "out of memory");
        goto out;
    }
    for (int i = 0; i < nranks; i++) {
        w.files[i] = -1;
        w.flush_fd[i] = -1;
    }
    w.nfiles = nranks;
    for (int i = 0; i < nranks; i++) {
        int rank = ranks ? ranks[i] : i;
        if (rank < 0 || rank >= world) {
            mps_fail(err, MPS_EUSAGE, "rank %d outside the layout's world of %d", rank, world);
            goto out;
        }
        if (create_file(&w, dir, i, rank, owners, err) != 0)
            goto out;
    }
    qsort(w.ds, (size_t)w.nds, sizeof *w.ds, cmp_by_tensor);
    int64_t njobs = 0, total_bytes = 0;
    for (int i = 0; i < w.nds; i++) {
        njobs += w.ds[i].grid.nchunks;
        total_bytes += (w.ds[i].piece.flat_end - w.ds[i].piece.flat_begin) * (int64_t)sizeof(float);
    }
    jobs = malloc(sizeof *jobs * (size_t)(njobs ? njobs : 1));
    w.nthreads = opts->threads > 0 ? opts->threads : mps_cpu_count();
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
        s->cctx = ZSTD_createCCtx();
        if (!s->raw || !s->shuffled || !s->packed || !s->cctx) {
            mps_fail(err, MPS_ENOMEM, "out of memory for worker buffers");
            goto out;
        }
    }
    w.progress = opts->progress ? opts->progress
                                : mps_progress_new(opts->label ? opts->label : "write", total_bytes, opts->quiet ? 0 : -1);
    if (mps_pool_create(w.nthreads, (int)(njobs < 65536 ? njobs + 1 : 65536), &pool, err) != 0)
        goto out;
    /* Tensor by tensor, so that a source can hold one tensor (and prefetch the next) in memory. */
    int next = 0, nt = mps_tensor_count(&m->cfg), begun = -1;
    int64_t j = 0;
    for (int t = 0; t < nt; t++) {
        if (begun < t && src->begin_tensor && src->begin_tensor(src->ctx, t, err) != 0)
            goto out_pool;
        begun = t;
        int first = next;
        while (next < w.nds && w.ds[next].tensor == t)
            next++;
        for (int i = first; i < next; i++)
            for (int64_t c = 0; c < w.ds[i].grid.nchunks; c += CHUNKS_PER_JOB) {
                int64_t left = w.ds[i].grid.nchunks - c;
                jobs[j] = (chunk_job){ &w, &w.ds[i], c, left < CHUNKS_PER_JOB ? left : CHUNKS_PER_JOB };
                if (mps_pool_submit(pool, write_chunks, &jobs[j++], err) != 0)
                    goto out_pool;
            }
        if (t + 1 < nt && src->begin_tensor) { /* load the next tensor while this one compresses */
            if (src->begin_tensor(src->ctx, t + 1, err) != 0)
                goto out_pool;
            begun = t + 1;
        }
        if (mps_pool_wait(pool, err) != 0)
            goto out_pool;
        if (src->end_tensor)
            src->end_tensor(src->ctx, t);
    }
    for (int i = 0; i < w.nds; i++) {
        out_dataset *d = &w.ds[i];
        if (mps_h5_attr_u64(d->dset, "chunk_xxh3", d->sums, d->grid.nchunks) != 0) {
            mps_fail(err, MPS_EIO, "%s: cannot write checksums", w.paths[d->file]);
            goto out_pool;
        }
        H5Dclose(d->dset);
        d->dset = -1;
    }
    for (int i = 0; i < w.nfiles; i++) {
        herr_t closed = H5Fclose(w.files[i]);
        w.files[i] = -1;
        if (closed < 0) {
            mps_fail(err, MPS_EIO, "%s: closing failed (disk full?)", w.paths[i]);
            goto out_pool;
        }
        if (mps_fsync_path(w.paths[i], err) != 0)
            goto out_pool;
    }
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
