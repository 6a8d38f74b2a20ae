/* Reading a checkpoint written under any layout: a region of a canonical tensor is assembled
 * from the chunks of the stored pieces that intersect it, and nothing else is read. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <unistd.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ckpt.h"
#include "ckpt_internal.h"
#include "h5util.h"
#include "safe_open.h"

struct mps_read_scratch {
    const void *cached_piece; /* the chunk now in `chunk`: consecutive gathers often need it again */
    int64_t cached_chunk;
    uint8_t *packed;
    size_t packed_cap;
    uint8_t *shuffled;
    float *chunk;
    size_t chunk_cap; /* bytes */
    ZSTD_DCtx *dctx;
};

mps_read_scratch *mps_read_scratch_new(void)
{
    mps_read_scratch *s = calloc(1, sizeof *s);
    if (s && !(s->dctx = ZSTD_createDCtx())) {
        free(s);
        return NULL;
    }
    return s;
}

void mps_read_scratch_free(mps_read_scratch *s)
{
    if (!s)
        return;
    free(s->packed);
    free(s->shuffled);
    free(s->chunk);
    ZSTD_freeDCtx(s->dctx);
    free(s);
}

mps_read_scratch **mps_read_scratches_new(int n)
{
    mps_read_scratch **s = calloc((size_t)n, sizeof *s);
    for (int i = 0; s && i < n; i++)
        if (!(s[i] = mps_read_scratch_new())) {
            mps_read_scratches_free(s, i);
            return NULL;
        }
    return s;
}

void mps_read_scratches_free(mps_read_scratch **s, int n)
{
    if (!s)
        return;
    for (int i = 0; i < n; i++)
        mps_read_scratch_free(s[i]);
    free(s);
}

const mps_manifest *mps_ckpt_manifest(const mps_ckpt *c) { return &c->m; }
const char *mps_ckpt_dir(const mps_ckpt *c) { return c->dir; }
int64_t mps_ckpt_bytes_read(const mps_ckpt *c) { return atomic_load(&c->bytes_read); }

int mps_ckpt_resolve(const char *dir, char *out, size_t size, mps_err *err)
{
    char path[4400];
    snprintf(out, size, "%s", dir);
    snprintf(path, sizeof path, "%s/" MPS_MANIFEST_NAME, dir);
    if (access(path, F_OK) == 0)
        return 0;
    snprintf(path, sizeof path, "%s/latest", dir);
    mps_err oerr;
    mps_err_clear(&oerr);
    int fd = mps_open_input(path, MPS_ECORRUPT, NULL, &oerr); /* a FIFO must not block: refused */
    if (fd < 0 && (errno == ENOENT || errno == ENOTDIR))
        return 0; /* not a run directory either: the caller's open names the missing manifest */
    if (fd < 0)
        return mps_fail(err, oerr.code, "%s", oerr.msg);
    char name[256] = "";
    ssize_t got = read(fd, name, sizeof name - 1);
    close(fd);
    int ok = got > 0;
    name[ok ? got : 0] = '\0';
    name[strcspn(name, "\n")] = '\0';
    if (!ok || !name[0] || strchr(name, '/') || strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
        return mps_fail(err, MPS_ECORRUPT, "%s: expected the name of a checkpoint directory beside it", path);
    if ((size_t)snprintf(out, size, "%s/%s", dir, name) >= size)
        return mps_fail(err, MPS_EUSAGE, "%s/%s: path too long", dir, name);
    return 1;
}

/* zstd decodes a block of at most 128 KiB from at least 4 stored bytes (a 3-byte header and one
 * byte repeated): no stored chunk decodes to more than this many times its size */
#define MAX_DECODE_RATIO 32768.0

/* The state the manifest describes must fit in the files it lists: readers size allocations from
 * the model (a rank's whole state for load and train), so a forged model (padded_vocab=2^31 over
 * a small model's files) is refused here, before anything is allocated for it. A file counts
 * with the smaller of its recorded and its actual size (a recorded size cannot make room). */
static int check_capacity(const mps_ckpt *c, const char *manifest, mps_err *err)
{
    const mps_manifest *m = &c->m;
    int nkinds = 0;
    for (int k = 0; k < MPS_KIND_COUNT; k++)
        nkinds += (m->kinds >> k) & 1;
    double need = (double)mps_param_count(&m->cfg) * (double)sizeof(float) * nkinds, stored = 0;
    for (int i = 0; i < m->nfiles; i++) {
        char path[4400];
        struct stat st;
        snprintf(path, sizeof path, "%s/%s", c->dir, m->files[i].name);
        int64_t bytes = stat(path, &st) == 0 && S_ISREG(st.st_mode) ? (int64_t)st.st_size : 0;
        stored += (double)(bytes < m->files[i].bytes ? bytes : m->files[i].bytes);
    }
    if (need > stored * MAX_DECODE_RATIO)
        return mps_fail(err, MPS_ECORRUPT, "%s: its model (%lld parameters, padded_vocab=%lld) needs %.3g GB of state, "
                        "more than its %d files of %.3g MB can hold: the manifest does not describe these files",
                        manifest, (long long)mps_param_count(&m->cfg), (long long)m->cfg.padded_vocab, need / 1e9,
                        m->nfiles, stored / 1e6);
    return 0;
}

int mps_ckpt_open(const char *dir, mps_ckpt **out, mps_err *err)
{
    if (mps_h5_init(err) != 0)
        return -1;
    char resolved[sizeof ((mps_ckpt *)0)->dir];
    if (mps_ckpt_resolve(dir, resolved, sizeof resolved, err) < 0)
        return -1;
    dir = resolved;
    mps_ckpt *c = calloc(1, sizeof *c);
    if (!c)
        return mps_fail(err, MPS_ENOMEM, "out of memory");
    snprintf(c->dir, sizeof c->dir, "%s", dir);
    pthread_mutex_init(&c->lock, NULL);
    char path[4400];
    snprintf(path, sizeof path, "%s/" MPS_MANIFEST_NAME, dir);
    if (mps_manifest_read(path, &c->m, err) != 0) {
        pthread_mutex_destroy(&c->lock);
        free(c);
        return -1;
    }
    int world = mps_layout_world(&c->m.layout), nt = mps_tensor_count(&c->m.cfg);
    /* every non-empty piece was written by its own rank into a listed file: a manifest whose layout
     * claims more (a huge dp with a short file list) is refused before the owner table, which is
     * sized by the layout, is built */
    for (int k = 0; k < MPS_KIND_COUNT; k++)
        for (int t = 0; (c->m.kinds & (1u << k)) && t < nt; t++) {
            int64_t np = mps_nonempty_piece_count(&c->m.cfg, &c->m.layout, (mps_kind)k, t);
            if (np > c->m.nfiles) {
                mps_tensor_spec spec;
                mps_tensor_spec_get(&c->m.cfg, t, &spec);
                mps_fail(err, MPS_ECORRUPT,
                         "%s: the layout gives %s of %s %lld non-empty pieces, each stored by its own rank, "
                         "but 'files' lists %d files", path, mps_kind_name((mps_kind)k), spec.name, (long long)np,
                         c->m.nfiles);
                mps_manifest_free(&c->m);
                pthread_mutex_destroy(&c->lock);
                free(c);
                return -1;
            }
        }
    if (check_capacity(c, path, err) != 0) {
        mps_manifest_free(&c->m);
        pthread_mutex_destroy(&c->lock);
        free(c);
        return -1;
    }
    c->world = world;
    c->files = malloc(sizeof *c->files * (size_t)world);
    c->fds = malloc(sizeof *c->fds * (size_t)world);
    c->file_bytes = malloc(sizeof *c->file_bytes * (size_t)world);
    for (int k = 0; k < MPS_KIND_COUNT && c->files; k++)
        if (c->m.kinds & (1u << k))
            c->pieces[k] = calloc((size_t)nt, sizeof *c->pieces[k]);
    if (!c->files || !c->file_bytes || !c->fds) {
        mps_ckpt_close(c);
        return mps_fail(err, MPS_ENOMEM, "out of memory");
    }
    for (int r = 0; r < world; r++) {
        c->files[r] = -2;
        c->file_bytes[r] = -1;
        c->fds[r] = -1;
    }
    for (int i = 0; i < c->m.nfiles; i++)
        c->file_bytes[c->m.files[i].rank] = c->m.files[i].bytes;
    if (mps_owners_build(&c->m.cfg, &c->m.layout, c->m.kinds, &c->owners, err) != 0) {
        mps_ckpt_close(c);
        return -1;
    }
    *out = c;
    return 0;
}

void mps_ckpt_close(mps_ckpt *c)
{
    if (!c)
        return;
    int nt = mps_tensor_count(&c->m.cfg);
    for (int k = 0; k < MPS_KIND_COUNT; k++) {
        if (!c->pieces[k])
            continue;
        for (int t = 0; t < nt; t++) {
            stored_piece *arr = c->pieces[k][t];
            if (!arr)
                continue;
            int np = mps_piece_count(&c->m.cfg, &c->m.layout, (mps_kind)k, t);
            for (int i = 0; i < np; i++) {
                if (arr[i].dset >= 0)
                    H5Dclose(arr[i].dset);
                free(arr[i].sums);
            }
            free(arr);
        }
        free(c->pieces[k]);
    }
    if (c->files)
        for (int r = 0; r < c->world; r++)
            if (c->files[r] >= 0)
                H5Fclose(c->files[r]);
    if (c->fds)
        for (int r = 0; r < c->world; r++)
            if (c->fds[r] >= 0)
                close(c->fds[r]);
    free(c->files);
    free(c->fds);
    free(c->file_bytes);
    mps_owners_free(c->owners);
    mps_manifest_free(&c->m);
    pthread_mutex_destroy(&c->lock);
    free(c);
}

void mps_ckpt_file_path(const mps_ckpt *c, int rank, char *buf, size_t size)
{
    char name[32];
    mps_shard_file_name(rank, name, sizeof name);
    snprintf(buf, size, "%s/%s", c->dir, name);
}

/* Opens a shard file and checks that it is the file the manifest lists for `rank`: its size, the
 * format, the checkpoint id and the rank it records. bytes < 0: the manifest does not list it.
 * Chunk bytes are read through *fd (pread), the index through the HDF5 handle: both must be the
 * same file, also when a writer replaces the checkpoint meanwhile (--force), so the file is opened
 * first and HDF5 opens that descriptor's file (mps_h5_open_fd); a name that no longer points to it
 * once its attributes are checked is reported as replaced. fd == NULL: the descriptor is closed. */
static hid_t open_checked(const mps_manifest *m, const char *path, int rank, int64_t bytes, int *fd_out, mps_err *err)
{
    if (bytes < 0)
        return mps_fail(err, MPS_ECORRUPT, "%s: the manifest does not list this file", path);
    /* O_NONBLOCK: a FIFO in place of a shard must not block the open */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return mps_fail(err, errno == ENOENT ? MPS_ECORRUPT : MPS_EIO, "%s: %s", path,
                        errno == ENOENT ? "missing" : strerror(errno));
    struct stat st, now;
    hid_t f = -1;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        mps_fail(err, MPS_ECORRUPT, "%s: not a regular file", path);
        goto fail;
    }
    if (st.st_size != bytes) {
        mps_fail(err, MPS_ECORRUPT, "%s: size %lld bytes, the manifest records %lld (truncated or replaced)", path,
                 (long long)st.st_size, (long long)bytes);
        goto fail;
    }
    if ((f = mps_h5_open_fd(fd, path, err)) < 0)
        goto fail;
    char text[64];
    int64_t rank_attr = -1, version = -1;
    if (mps_h5_read_attr_str(f, "format", text, sizeof text) != 0 || strcmp(text, "mpshard") != 0 ||
        mps_h5_read_attr_i64(f, "format_version", &version, 1) != 0 || version != m->format_version) {
        mps_fail(err, MPS_ECORRUPT, "%s: not an mpshard shard file of format version %d", path, m->format_version);
        goto fail;
    }
    if (mps_h5_read_attr_str(f, "checkpoint_id", text, sizeof text) != 0 || strcmp(text, m->checkpoint_id) != 0) {
        mps_fail(err, MPS_ECORRUPT, "%s: belongs to another checkpoint (checkpoint_id differs from the manifest)", path);
        goto fail;
    }
    if (mps_h5_read_attr_i64(f, "rank", &rank_attr, 1) != 0 || rank_attr != rank) {
        mps_fail(err, MPS_ECORRUPT, "%s: records rank %lld, expected %d", path, (long long)rank_attr, rank);
        goto fail;
    }
    if (stat(path, &now) != 0 || now.st_ino != st.st_ino || now.st_dev != st.st_dev) {
        mps_fail(err, MPS_ECORRUPT, "%s: replaced while being opened (another process rewrote the checkpoint)", path);
        goto fail;
    }
    if (fd_out)
        *fd_out = fd;
    else
        close(fd);
    return f;
fail:
    if (f >= 0)
        H5Fclose(f);
    close(fd);
    return -1;
}

int mps_shard_file_check(const char *dir, const mps_manifest *m, int rank, mps_err *err)
{
    if (mps_h5_init(err) != 0)
        return -1;
    char name[32], path[4400];
    mps_shard_file_name(rank, name, sizeof name);
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int64_t bytes = -1;
    for (int i = 0; i < m->nfiles; i++)
        if (m->files[i].rank == rank)
            bytes = m->files[i].bytes;
    hid_t f = open_checked(m, path, rank, bytes, NULL, err);
    if (f < 0)
        return -1;
    H5Fclose(f);
    return 0;
}

/* Opens rank's file (caller holds the lock) and checks it belongs to this checkpoint. */
static hid_t open_rank_file(mps_ckpt *c, int rank, mps_err *err)
{
    if (c->files[rank] >= 0)
        return c->files[rank];
    char path[4400];
    mps_ckpt_file_path(c, rank, path, sizeof path);
    hid_t f = open_checked(&c->m, path, rank, c->file_bytes[rank], &c->fds[rank], err);
    if (f < 0)
        return -1;
    c->files[rank] = f;
    return f;
}

int mps_ckpt_check_rank_file(mps_ckpt *c, int rank, mps_err *err)
{
    pthread_mutex_lock(&c->lock);
    hid_t f = open_rank_file(c, rank, err);
    pthread_mutex_unlock(&c->lock);
    return f < 0 ? -1 : 0;
}

static int boxes_equal(const int64_t *a, const int64_t *b, int n)
{
    for (int i = 0; i < n; i++)
        if (a[i] != b[i])
            return 0;
    return 1;
}

/* Opens and checks the stored piece (caller holds the lock). */
static int open_piece(mps_ckpt *c, mps_kind kind, int tensor, int id, stored_piece *sp, mps_err *err)
{
    mps_tensor_spec spec;
    mps_tensor_spec_get(&c->m.cfg, tensor, &spec);
    mps_piece_by_id(&c->m.cfg, &c->m.layout, kind, tensor, id, &sp->piece);
    sp->owner = mps_owner_of(c->owners, kind, tensor, id);
    char path[4400], dname[MPS_NAME_MAX + 16];
    mps_ckpt_file_path(c, sp->owner, path, sizeof path);
    snprintf(dname, sizeof dname, "/%s/%s", mps_kind_name(kind), spec.name);
    hid_t f = open_rank_file(c, sp->owner, err);
    if (f < 0)
        return -1;
    char group[32];
    snprintf(group, sizeof group, "/%s", mps_kind_name(kind));
    if (mps_h5_hard_link(f, group, H5O_TYPE_GROUP, NULL, path, err) != 0)
        return -1;
    /* the dataset a hard link too, and its data in this file: no external storage, no virtual
     * dataset (whose mappings name other files). mps_h5_open_dataset refuses both from the object
     * header's bytes, before HDF5 decodes the layout (which can hang libhdf5); HDF5's own view is
     * checked again below. */
    hid_t d = mps_h5_open_dataset(f, dname, path, err);
    if (d < 0)
        return -1;
    sp->dset = d;
    hid_t dcpl = H5Dget_create_plist(d);
    H5D_layout_t layout = dcpl < 0 ? H5D_LAYOUT_ERROR : H5Pget_layout(dcpl);
    int external = dcpl < 0 ? -1 : H5Pget_external_count(dcpl);
    if (layout == H5D_VIRTUAL || external != 0) {
        if (dcpl >= 0)
            H5Pclose(dcpl);
        return mps_fail(err, MPS_ECORRUPT, "%s: dataset %s keeps its data in other files (%s): refused", path, dname,
                        layout == H5D_VIRTUAL ? "a virtual dataset" : "external storage");
    }
    /* bound to its tensor: a dataset of another tensor or kind (a swapped or hard-linked one of the
     * same shape) would pass every other check */
    if (mps_h5_check_tensor(d, dname, spec.name, mps_kind_name(kind), path, err) != 0) {
        H5Pclose(dcpl);
        return -1;
    }
    const mps_piece *p = &sp->piece;
    int whole = p->flat_begin == 0 && p->flat_end == mps_box_numel(&p->box);
    int ndim = whole ? p->box.ndim : 1;
    int64_t want_dims[MPS_MAX_DIMS], dims[MPS_MAX_DIMS], chunk[MPS_MAX_DIMS], attr[MPS_MAX_DIMS], range[2];
    for (int i = 0; i < ndim; i++)
        want_dims[i] = whole ? p->box.cnt[i] : p->flat_end - p->flat_begin;
    hid_t type = H5Dget_type(d), space = H5Dget_space(d);
    int ok = H5Tequal(type, H5T_IEEE_F32LE) > 0 && H5Sget_simple_extent_ndims(space) == ndim;
    hsize_t hdims[MPS_MAX_DIMS], hchunk[MPS_MAX_DIMS];
    if (ok) {
        H5Sget_simple_extent_dims(space, hdims, NULL);
        ok = layout == H5D_CHUNKED && H5Pget_chunk(dcpl, ndim, hchunk) == ndim;
        for (int i = 0; ok && i < ndim; i++) {
            dims[i] = (int64_t)hdims[i];
            chunk[i] = (int64_t)hchunk[i];
        }
        ok = ok && boxes_equal(dims, want_dims, ndim);
    }
    if (ok) { /* the filter pipeline must be exactly shuffle then zstd: chunks are decoded by hand */
        unsigned flags, cd[4];
        size_t ncd = 4;
        ok = H5Pget_nfilters(dcpl) == 2 &&
             H5Pget_filter2(dcpl, 0, &flags, &ncd, cd, 0, NULL, NULL) == H5Z_FILTER_SHUFFLE;
        ncd = 4;
        ok = ok && H5Pget_filter2(dcpl, 1, &flags, &ncd, cd, 0, NULL, NULL) == MPS_ZSTD_FILTER_ID;
    }
    H5Tclose(type);
    H5Sclose(space);
    H5Pclose(dcpl);
    if (!ok)
        return mps_fail(err, MPS_ECORRUPT, "%s: dataset %s has the wrong type, shape, chunking or filters", path, dname);
    if (mps_h5_read_attr_i64(d, "box_offset", attr, p->box.ndim) != 0 || !boxes_equal(attr, p->box.off, p->box.ndim) ||
        mps_h5_read_attr_i64(d, "box_count", attr, p->box.ndim) != 0 || !boxes_equal(attr, p->box.cnt, p->box.ndim) ||
        mps_h5_read_attr_i64(d, "flat_range", range, 2) != 0 || range[0] != p->flat_begin || range[1] != p->flat_end)
        return mps_fail(err, MPS_ECORRUPT, "%s: dataset %s: box attributes do not match the manifest's layout", path,
                        dname);
    mps_err gerr;
    mps_err_clear(&gerr);
    if (mps_chunk_grid_load(&sp->grid, ndim, dims, chunk, &gerr) != 0)
        return mps_fail(err, MPS_ECORRUPT, "%s: dataset %s: %s", path, dname, gerr.msg);
    sp->sums = malloc(sizeof *sp->sums * (size_t)(sp->grid.nchunks ? sp->grid.nchunks : 1));
    if (!sp->sums)
        return mps_fail(err, MPS_ENOMEM, "out of memory");
    if (mps_h5_read_attr_u64(d, "chunk_xxh3", sp->sums, sp->grid.nchunks) != 0)
        return mps_fail(err, MPS_ECORRUPT, "%s: dataset %s: chunk_xxh3 attribute missing or of the wrong length", path, dname);
    return 0;
}

int mps_ckpt_piece(mps_ckpt *c, mps_kind kind, int tensor, int id, stored_piece **out, mps_err *err)
{
    if (!(c->m.kinds & (1u << kind)))
        return mps_fail(err, MPS_EUSAGE, "%s: the checkpoint stores no '%s' state", c->dir, mps_kind_name(kind));
    pthread_mutex_lock(&c->lock);
    int rc = 0;
    stored_piece *arr = c->pieces[kind][tensor];
    if (!arr) {
        int np = mps_piece_count(&c->m.cfg, &c->m.layout, kind, tensor);
        arr = calloc((size_t)np, sizeof *arr);
        if (!arr) {
            pthread_mutex_unlock(&c->lock);
            return mps_fail(err, MPS_ENOMEM, "out of memory");
        }
        for (int i = 0; i < np; i++) {
            arr[i].dset = -1;
            arr[i].kind = kind;
            arr[i].tensor_index = tensor;
        }
        c->pieces[kind][tensor] = arr;
    }
    stored_piece *sp = &arr[id];
    if (sp->state == 0) {
        mps_err perr;
        mps_err_clear(&perr);
        if (open_piece(c, kind, tensor, id, sp, &perr) != 0) {
            sp->state = -1;
            sp->open_err = perr;
        } else {
            sp->state = 1;
        }
    }
    if (sp->state < 0) {
        if (err && err->code == MPS_OK)
            *err = sp->open_err;
        rc = -1;
    }
    pthread_mutex_unlock(&c->lock);
    *out = sp;
    return rc;
}

int mps_ckpt_read_chunk(mps_ckpt *c, stored_piece *sp, int64_t id, mps_read_scratch *s, mps_err *err)
{
    if (s->cached_piece == sp && s->cached_chunk == id)
        return 0;
    s->cached_piece = NULL;
    int64_t begin, end, offset[MPS_MAX_DIMS];
    mps_chunk_range(&sp->grid, id, &begin, &end, offset);
    size_t raw_bytes = (size_t)sp->grid.chunk_elems * sizeof(float);
    size_t bound = ZSTD_compressBound(raw_bytes);
    if (s->chunk_cap < raw_bytes) {
        free(s->chunk);
        free(s->shuffled);
        s->chunk = malloc(raw_bytes);
        s->shuffled = malloc(raw_bytes);
        s->chunk_cap = s->chunk && s->shuffled ? raw_bytes : 0;
        if (!s->chunk_cap)
            return mps_fail(err, MPS_ENOMEM, "out of memory for a chunk of %zu bytes", raw_bytes);
    }
    hsize_t hoff[MPS_MAX_DIMS];
    for (int i = 0; i < sp->grid.ndim; i++)
        hoff[i] = (hsize_t)offset[i];
    char path[4400];
    mps_tensor_spec spec;
    mps_tensor_spec_get(&c->m.cfg, sp->tensor_index, &spec);
    /* Only the chunk index lookup goes through HDF5 (under its global lock); the bytes are read
     * with pread, so several threads read the disk at once. */
    pthread_mutex_lock(&c->lock);
    hsize_t stored = 0;
    haddr_t addr = HADDR_UNDEF;
    unsigned mask = 0;
    int rc = 0;
    if (H5Dget_chunk_info_by_coord(sp->dset, hoff, &mask, &addr, &stored) < 0 || addr == HADDR_UNDEF || stored == 0 ||
        stored > bound || addr + stored > (haddr_t)c->file_bytes[sp->owner])
        rc = -1;
    int fd = c->fds[sp->owner];
    pthread_mutex_unlock(&c->lock);
    if (rc == 0 && s->packed_cap < stored) {
        free(s->packed);
        s->packed = malloc((size_t)stored);
        s->packed_cap = s->packed ? (size_t)stored : 0;
        if (!s->packed)
            return mps_fail(err, MPS_ENOMEM, "out of memory");
    }
    if (rc == 0 && pread(fd, s->packed, (size_t)stored, (off_t)addr) != (ssize_t)stored)
        rc = -2;
    mps_ckpt_file_path(c, sp->owner, path, sizeof path);
    if (rc == -1)
        return mps_fail(err, MPS_ECORRUPT, "%s: tensor %s (%s): chunk %lld is missing or has an impossible size (%llu bytes)",
                        path, spec.name, mps_kind_name(sp->kind), (long long)id, (unsigned long long)stored);
    if (rc == -2)
        return mps_fail(err, MPS_ECORRUPT, "%s: tensor %s (%s): chunk %lld cannot be read", path, spec.name,
                        mps_kind_name(sp->kind), (long long)id);
    atomic_fetch_add(&c->bytes_read, (int64_t)stored);
    mps_err derr;
    mps_err_clear(&derr);
    if (mps_chunk_decode(s->dctx, mask, s->packed, (size_t)stored, sizeof(float), s->shuffled, s->chunk, raw_bytes,
                         &derr) != 0)
        return mps_fail(err, MPS_ECORRUPT, "%s: tensor %s (%s): chunk %lld: %s", path, spec.name, mps_kind_name(sp->kind),
                        (long long)id, derr.msg);
    if (mps_xxh3(s->chunk, (size_t)(end - begin) * sizeof(float)) != sp->sums[id])
        return mps_fail(err, MPS_ECORRUPT, "%s: tensor %s (%s): chunk %lld fails its checksum (data damaged)", path, spec.name,
                        mps_kind_name(sp->kind), (long long)id);
    s->cached_piece = sp;
    s->cached_chunk = id;
    return 0;
}

/* Row-major flat index of coords (relative to the box) inside box. */
static int64_t flat_in(const mps_box *b, const int64_t *rel)
{
    int64_t f = 0;
    for (int i = 0; i < b->ndim; i++)
        f = f * b->cnt[i] + rel[i];
    return f;
}

static void unravel(const mps_box *b, int64_t flat, int64_t *rel)
{
    for (int i = b->ndim - 1; i >= 0; i--) {
        rel[i] = flat % b->cnt[i];
        flat /= b->cnt[i];
    }
}

/* Bounding box (absolute coordinates) of the flat range [fb, fe) of box b (fe > fb). */
void mps_flat_range_bbox(const mps_box *b, int64_t fb, int64_t fe, mps_box *out)
{
    int64_t first[MPS_MAX_DIMS], last[MPS_MAX_DIMS];
    unravel(b, fb, first);
    unravel(b, fe - 1, last);
    *out = *b;
    int k = 0;
    while (k < b->ndim - 1 && first[k] == last[k]) {
        out->off[k] = b->off[k] + first[k];
        out->cnt[k] = 1;
        k++;
    }
    out->off[k] = b->off[k] + first[k];
    out->cnt[k] = last[k] - first[k] + 1;
    /* dimensions after k stay whole: a conservative bound */
}

/* Copies the part of decoded chunk (dataset range [cb, ce) of piece p) that falls into the target
 * (box tb, flat range [tfb, tfe)) into dst; returns the number of elements copied. */
static int64_t scatter_chunk(const mps_piece *p, int64_t cb, int64_t ce, const float *chunk, const mps_box *tb,
                             int64_t tfb, int64_t tfe, float *dst)
{
    const mps_box *pb = &p->box;
    int n = pb->ndim;
    int64_t L = pb->cnt[n - 1];
    int64_t a = p->flat_begin + cb, b = p->flat_begin + ce; /* flat range in the source box */
    int64_t copied = 0;
    int64_t t_lo = tb->off[n - 1], t_hi = tb->off[n - 1] + tb->cnt[n - 1];
    for (int64_t row = a / L; row * L < b; row++) {
        int64_t rel[MPS_MAX_DIMS], trel[MPS_MAX_DIMS];
        unravel(pb, row * L, rel);
        int inside = 1;
        for (int d = 0; d < n - 1 && inside; d++) {
            int64_t g = pb->off[d] + rel[d];
            inside = g >= tb->off[d] && g < tb->off[d] + tb->cnt[d];
            trel[d] = g - tb->off[d];
        }
        if (!inside)
            continue;
        int64_t s0 = row * L > a ? row * L : a, s1 = (row + 1) * L < b ? (row + 1) * L : b; /* source flat run */
        int64_t g0 = pb->off[n - 1] + (s0 - row * L), g1 = pb->off[n - 1] + (s1 - row * L);
        if (g0 < t_lo) g0 = t_lo;
        if (g1 > t_hi) g1 = t_hi;
        if (g1 <= g0)
            continue;
        trel[n - 1] = g0 - t_lo;
        int64_t t = flat_in(tb, trel);
        int64_t lo = t > tfb ? t : tfb, hi = t + (g1 - g0) < tfe ? t + (g1 - g0) : tfe;
        if (hi <= lo)
            continue;
        int64_t src = row * L + (g0 - pb->off[n - 1]) + (lo - t) - a;
        memcpy(dst + (lo - tfb), chunk + src, (size_t)(hi - lo) * sizeof(float));
        copied += hi - lo;
    }
    return copied;
}

int mps_ckpt_gather(mps_ckpt *c, mps_read_scratch *s, mps_kind kind, int tensor, const mps_box *box, int64_t fb,
                    int64_t fe, float *dst, mps_err *err)
{
    if (fe <= fb)
        return 0;
    const mps_config *cfg = &c->m.cfg;
    if (tensor < 0 || tensor >= mps_tensor_count(cfg))
        return mps_fail(err, MPS_EUSAGE, "tensor index %d out of range", tensor);
    mps_box want;
    mps_flat_range_bbox(box, fb, fe, &want);
    int np = mps_piece_count(cfg, &c->m.layout, kind, tensor);
    int64_t copied = 0;
    for (int id = 0; id < np; id++) {
        mps_piece p;
        mps_piece_by_id(cfg, &c->m.layout, kind, tensor, id, &p);
        if (p.flat_end <= p.flat_begin)
            continue;
        mps_box hit, pbb;
        mps_flat_range_bbox(&p.box, p.flat_begin, p.flat_end, &pbb);
        if (!mps_box_intersect(&want, &pbb, &hit))
            continue;
        stored_piece *sp;
        if (mps_ckpt_piece(c, kind, tensor, id, &sp, err) != 0)
            return -1;
        /* dataset flat range spanned by the intersection */
        int64_t rel_lo[MPS_MAX_DIMS], rel_hi[MPS_MAX_DIMS];
        for (int d = 0; d < p.box.ndim; d++) {
            rel_lo[d] = hit.off[d] - p.box.off[d];
            rel_hi[d] = hit.off[d] + hit.cnt[d] - 1 - p.box.off[d];
        }
        int64_t lo = flat_in(&p.box, rel_lo), hi = flat_in(&p.box, rel_hi) + 1;
        if (lo < p.flat_begin) lo = p.flat_begin;
        if (hi > p.flat_end) hi = p.flat_end;
        if (hi <= lo)
            continue;
        int64_t c0 = mps_chunk_of(&sp->grid, lo - p.flat_begin), c1 = mps_chunk_of(&sp->grid, hi - 1 - p.flat_begin);
        for (int64_t ch = c0; ch <= c1; ch++) {
            int64_t cb, ce;
            mps_chunk_range(&sp->grid, ch, &cb, &ce, NULL);
            mps_box cbb, tmp;
            mps_flat_range_bbox(&p.box, p.flat_begin + cb, p.flat_begin + ce, &cbb);
            if (!mps_box_intersect(&cbb, &hit, &tmp))
                continue;
            if (mps_ckpt_read_chunk(c, sp, ch, s, err) != 0)
                return -1;
            copied += scatter_chunk(&p, cb, ce, s->chunk, box, fb, fe, dst);
        }
    }
    if (copied != fe - fb) {
        mps_tensor_spec spec;
        mps_tensor_spec_get(cfg, tensor, &spec);
        return mps_fail(err, MPS_ECORRUPT, "%s: tensor %s (%s): the stored pieces cover %lld of %lld requested elements",
                        c->dir, spec.name, mps_kind_name(kind), (long long)copied, (long long)(fe - fb));
    }
    return 0;
}
