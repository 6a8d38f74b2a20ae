/* Full model files: format detection, the generic tensor reader and the output file shared by
 * the safetensors and llm.c writers. */
#include "modelfile.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "modelfile_internal.h"
#include "safe_open.h"

#define READ_CHUNK ((size_t)1 << 22)  /* bytes per read of an untransposed tensor */
#define OUT_BUF ((size_t)1 << 22)     /* write buffer of an output file */

const char *mps_file_format_name(mps_file_format f)
{
    switch (f) {
    case MPS_FILE_SAFETENSORS: return "safetensors";
    case MPS_FILE_LLMC: return "llmc";
    case MPS_FILE_AUTO: return "auto";
    }
    return "?";
}

int mps_file_format_from_name(const char *name)
{
    if (name == NULL)
        return -1;
    if (strcmp(name, "safetensors") == 0)
        return MPS_FILE_SAFETENSORS;
    if (strcmp(name, "llmc") == 0 || strcmp(name, "llm.c") == 0)
        return MPS_FILE_LLMC;
    if (strcmp(name, "auto") == 0)
        return MPS_FILE_AUTO;
    return -1;
}

size_t mps_src_dtype_size(int src_dtype) { return src_dtype == MPS_SRC_F32 ? 4 : 2; }

int mps_pread_full(int fd, const char *path, void *buf, size_t n, int64_t off, mps_err *err)
{
    char *p = buf;
    while (n > 0) {
        size_t want = n > ((size_t)1 << 30) ? ((size_t)1 << 30) : n;
        ssize_t r = pread(fd, p, want, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return mps_fail(err, MPS_EIO, "%s: read at offset %lld failed: %s", path, (long long)off, strerror(errno));
        }
        if (r == 0)
            return mps_fail(err, MPS_ECORRUPT, "%s: file ends at offset %lld, before the data it declares", path,
                            (long long)off);
        p += r;
        n -= (size_t)r;
        off += r;
    }
    return 0;
}

static int write_all(int fd, const char *path, const void *data, size_t n, mps_err *err)
{
    const char *p = data;
    while (n > 0) {
        size_t want = n > ((size_t)1 << 30) ? ((size_t)1 << 30) : n;
        ssize_t w = write(fd, p, want);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return mps_fail(err, MPS_EIO, "%s: write failed: %s", path, strerror(errno));
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

int mps_mkdir_p(const char *dir, mps_err *err)
{
    size_t n = strlen(dir);
    char *buf = malloc(n + 1);
    if (buf == NULL)
        return mps_fail(err, MPS_ENOMEM, "%s: out of memory", dir);
    memcpy(buf, dir, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (buf[i] != '/' && buf[i] != '\0')
            continue;
        char c = buf[i];
        buf[i] = '\0';
        if (mkdir(buf, 0755) != 0 && errno != EEXIST) {
            int e = errno;
            free(buf);
            return mps_fail(err, MPS_EIO, "%s: cannot create directory: %s", dir, strerror(e));
        }
        buf[i] = c;
    }
    free(buf);
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return mps_fail(err, MPS_EIO, "%s: not a directory", dir);
    return 0;
}

static char *path_join(const char *dir, const char *name)
{
    size_t a = strlen(dir), b = strlen(name);
    char *p = malloc(a + b + 2);
    if (p == NULL)
        return NULL;
    memcpy(p, dir, a);
    p[a] = '/';
    memcpy(p + a + 1, name, b + 1);
    return p;
}

static char *str_concat(const char *a, const char *b)
{
    size_t na = strlen(a), nb = strlen(b);
    char *p = malloc(na + nb + 1);
    if (p == NULL)
        return NULL;
    memcpy(p, a, na);
    memcpy(p + na, b, nb + 1);
    return p;
}

static char *dir_of(const char *path)
{
    const char *slash = strrchr(path, '/');
    if (slash == NULL)
        return strdup(".");
    if (slash == path)
        return strdup("/");
    return strndup(path, (size_t)(slash - path));
}

static int fsync_dir(const char *dir, mps_err *err)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return mps_fail(err, MPS_EIO, "%s: cannot open directory: %s", dir, strerror(errno));
    if (fsync(fd) != 0 && errno != EINVAL) {
        int e = errno;
        close(fd);
        return mps_fail(err, MPS_EIO, "%s: fsync failed: %s", dir, strerror(e));
    }
    close(fd);
    return 0;
}

int mps_write_file_atomic(const char *path, const void *data, size_t n, mps_err *err)
{
    char *tmp = str_concat(path, ".tmp");
    char *dir = dir_of(path);
    if (tmp == NULL || dir == NULL) {
        free(tmp);
        free(dir);
        return mps_fail(err, MPS_ENOMEM, "%s: out of memory", path);
    }
    int rc = -1;
    int fd = mps_open_tmp_output(tmp, err);
    if (fd < 0)
        goto out;
    if (ftruncate(fd, 0) != 0) {
        mps_fail(err, MPS_EIO, "%s: cannot truncate: %s", tmp, strerror(errno));
        goto fail;
    }
    if (write_all(fd, tmp, data, n, err) != 0)
        goto fail;
    if (fsync(fd) != 0) {
        mps_fail(err, MPS_EIO, "%s: fsync failed: %s", tmp, strerror(errno));
        goto fail;
    }
    if (close(fd) != 0) {
        fd = -1;
        mps_fail(err, MPS_EIO, "%s: close failed: %s", tmp, strerror(errno));
        goto fail;
    }
    fd = -1;
    if (rename(tmp, path) != 0) {
        mps_fail(err, MPS_EIO, "%s: rename to %s failed: %s", tmp, path, strerror(errno));
        goto fail;
    }
    rc = fsync_dir(dir, err);
    goto out;
fail:
    if (fd >= 0)
        close(fd);
    unlink(tmp);
out:
    free(tmp);
    free(dir);
    return rc;
}

/* ---------------------------------------------------------------------------------------------
 * Reading */

int mps_model_file_open(const char *path, const mps_model_file_opts *opts, mps_model_file **out, mps_err *err)
{
    static const mps_model_file_opts no_opts;
    if (opts == NULL)
        opts = &no_opts;
    *out = NULL;
    if (opts->padded_vocab < 0)
        return mps_fail(err, MPS_EUSAGE, "--padded-vocab %lld: must be positive", (long long)opts->padded_vocab);
    mps_model_file *f = calloc(1, sizeof *f);
    if (f == NULL)
        return mps_fail(err, MPS_ENOMEM, "%s: out of memory", path);
    f->fd = -1;
    struct stat st;
    /* A directory stands for the model.safetensors inside it, or for the index of a model
     * stored in several files (what transformers' save_pretrained writes). */
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
        f->path = path_join(path, "model.safetensors");
        struct stat st2;
        if (f->path && stat(f->path, &st2) != 0 && errno == ENOENT) {
            free(f->path);
            f->path = path_join(path, "model.safetensors.index.json");
        }
    } else {
        f->path = strdup(path);
    }
    if (f->path == NULL) {
        free(f);
        return mps_fail(err, MPS_ENOMEM, "%s: out of memory", path);
    }
    /* O_NONBLOCK: a FIFO in place of the model would block open() forever; it is refused below
     * (not a regular file), and reads of a regular file ignore the flag */
    f->fd = open(f->path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (f->fd < 0) {
        /* a missing input is invalid input (exit 3), as a missing checkpoint is */
        mps_fail(err, errno == ENOENT || errno == ENOTDIR ? MPS_ECORRUPT : MPS_EIO, "%s: cannot open: %s", f->path,
                 strerror(errno));
        goto fail;
    }
    if (fstat(f->fd, &st) != 0) {
        mps_fail(err, MPS_EIO, "%s: cannot stat: %s", f->path, strerror(errno));
        goto fail;
    }
    if (!S_ISREG(st.st_mode)) {
        mps_fail(err, MPS_EUSAGE, "%s: not a regular file", f->path);
        goto fail;
    }
    f->file_size = (int64_t)st.st_size;

    mps_file_format fmt = opts->format;
    if (fmt == MPS_FILE_AUTO) {
        unsigned char head[9];
        if (f->file_size < (int64_t)sizeof head) {
            mps_fail(err, MPS_ECORRUPT, "%s: file of %lld bytes is neither a safetensors nor an llm.c model file",
                     f->path, (long long)f->file_size);
            goto fail;
        }
        if (mps_pread_full(f->fd, f->path, head, sizeof head, 0, err) != 0)
            goto fail;
        int32_t magic;
        memcpy(&magic, head, 4);
        if (magic == 20240326)
            fmt = MPS_FILE_LLMC;
        else if (head[8] == '{' || head[0] == '{') /* a safetensors file, or the JSON index of several */
            fmt = MPS_FILE_SAFETENSORS;
        else {
            mps_fail(err, MPS_ECORRUPT,
                     "%s: neither a safetensors file (8-byte header length, then '{'), a safetensors index "
                     "(JSON) nor an llm.c model file (magic 20240326)", f->path);
            goto fail;
        }
    }
    f->format = fmt;
    int rc;
    if (fmt == MPS_FILE_SAFETENSORS)
        rc = mps_safetensors_open(f, opts, err);
    else if (fmt == MPS_FILE_LLMC)
        rc = mps_llmc_open(f, opts, err);
    else
        rc = mps_fail(err, MPS_EUSAGE, "%s: unknown input format %d", f->path, (int)fmt);
    if (rc != 0)
        goto fail;
    if (f->nparts == 0 && mps_model_file_single_part(f, err) != 0)
        goto fail;
    *out = f;
    return 0;
fail:
    mps_model_file_close(f);
    return -1;
}

int mps_model_file_single_part(mps_model_file *f, mps_err *err)
{
    if (!(f->parts = calloc(1, sizeof *f->parts)) || !(f->parts[0].path = strdup(f->path)))
        return mps_fail(err, MPS_ENOMEM, "%s: out of memory", f->path);
    f->parts[0].fd = -1;
    f->nparts = 1;
    if ((f->parts[0].fd = dup(f->fd)) < 0)
        return mps_fail(err, MPS_EIO, "%s: dup: %s", f->path, strerror(errno));
    return 0;
}

const mps_config *mps_model_file_config(const mps_model_file *f) { return &f->cfg; }
mps_file_format mps_model_file_format(const mps_model_file *f) { return f->format; }
mps_dtype mps_model_file_dtype(const mps_model_file *f) { return f->dtype; }
const char *mps_model_file_hf_config(const mps_model_file *f) { return f->hf_config; }

void mps_model_file_close(mps_model_file *f)
{
    if (f == NULL)
        return;
    if (f->fd >= 0)
        close(f->fd);
    for (int i = 0; i < f->nparts; i++) {
        if (f->parts[i].fd >= 0)
            close(f->parts[i].fd);
        free(f->parts[i].path);
    }
    free(f->parts);
    free(f->path);
    free(f->hf_config);
    free(f->src);
    free(f);
}

static inline float f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    union { uint32_t u; float f; } v;
    if (exp == 0) {
        /* zero or subnormal: mant * 2^-24, exact in f32 */
        v.f = (float)mant * 5.9604644775390625e-8f;
        v.u |= sign;
    } else if (exp == 31) {
        v.u = sign | 0x7f800000u | (mant << 13);
    } else {
        v.u = sign | ((exp + 112u) << 23) | (mant << 13);
    }
    return v.f;
}

static void convert(int dtype, const void *src, float *dst, size_t n)
{
    if (dtype == MPS_SRC_F32) {
        memcpy(dst, src, n * 4);
    } else if (dtype == MPS_SRC_BF16) {
        const uint16_t *s = src;
        for (size_t i = 0; i < n; i++)
            dst[i] = mps_bf16_to_f32(s[i]);
    } else {
        const uint16_t *s = src;
        for (size_t i = 0; i < n; i++)
            dst[i] = f16_to_f32(s[i]);
    }
}

/* mps_pread_full from the file holding s, timed into io when it is not NULL (MPS_TRACE) */
static int pread_io(mps_model_file *f, const mps_src *s, mps_tacc *io, void *buf, size_t n, int64_t off, mps_err *err)
{
    int64_t t0 = io ? mps_now_ns() : 0;
    const mps_in_part *p = &f->parts[s->file];
    int rc = mps_pread_full(p->fd, p->path, buf, n, off, err);
    if (io)
        mps_tacc_add(io, mps_now_ns() - t0, (int64_t)n);
    return rc;
}

/* Reads s->numel elements stored in order into dst; if tied, also checks that the tied tensor
 * holds the same bytes. */
static int read_plain(mps_model_file *f, const mps_src *s, const mps_src *tied, float *dst, mps_tacc *io,
                      mps_err *err)
{
    size_t es = mps_src_dtype_size(s->dtype);
    int64_t total = s->numel * (int64_t)es;
    unsigned char *tmp = NULL, *tmp2 = NULL;
    if (s->dtype != MPS_SRC_F32)
        tmp = malloc(READ_CHUNK);
    if (tied)
        tmp2 = malloc(READ_CHUNK);
    if ((s->dtype != MPS_SRC_F32 && tmp == NULL) || (tied && tmp2 == NULL)) {
        free(tmp);
        free(tmp2);
        return mps_fail(err, MPS_ENOMEM, "%s: out of memory reading '%s'", f->path, s->key);
    }
    int rc = 0;
    for (int64_t pos = 0; pos < total; pos += (int64_t)READ_CHUNK) {
        size_t n = (size_t)(total - pos < (int64_t)READ_CHUNK ? total - pos : (int64_t)READ_CHUNK);
        unsigned char *raw = s->dtype == MPS_SRC_F32 ? (unsigned char *)dst + pos : tmp;
        if ((rc = pread_io(f, s, io, raw, n, s->offset + pos, err)) != 0)
            break;
        if (tied) {
            if ((rc = pread_io(f, tied, io, tmp2, n, tied->offset + pos, err)) != 0)
                break;
            if (memcmp(raw, tmp2, n) != 0) {
                rc = mps_fail(err, MPS_EUNSUPPORTED,
                              "%s: tensor '%s' differs from '%s', but config.json ties the output head to the "
                              "embedding", f->path, tied->key, s->key);
                break;
            }
        }
        if (s->dtype != MPS_SRC_F32)
            convert(s->dtype, tmp, (float *)((unsigned char *)dst + pos / (int64_t)es * 4), n / es);
    }
    free(tmp);
    free(tmp2);
    return rc;
}

#define TILE 32
/* stored rows k0 .. k0+kb-1 (in buf) -> elements k0 .. k0+kb-1 of every row of dst */
#define TRANSPOSE_LOOP(TYPE, CONV)                                                                   \
    do {                                                                                             \
        const TYPE *src = (const TYPE *)buf;                                                         \
        for (int64_t a0 = 0; a0 < kb; a0 += TILE)                                                    \
            for (int64_t r0 = 0; r0 < tr; r0 += TILE) {                                              \
                int64_t a1 = a0 + TILE < kb ? a0 + TILE : kb, r1 = r0 + TILE < tr ? r0 + TILE : tr;  \
                for (int64_t a = a0; a < a1; a++)                                                    \
                    for (int64_t r = r0; r < r1; r++)                                                \
                        dst[r * tk + k0 + a] = CONV(src[a * tr + r]);                                \
            }                                                                                        \
    } while (0)
#define CONV_F32(x) (x)
#define TRANSPOSE_BAND ((size_t)4 << 20) /* bytes of stored rows read and transposed at a time */

/* Reads a (tk, tr) stored matrix and writes its transpose (tr, tk) into dst, a band of stored rows
 * at a time: a 4 MiB buffer instead of one of the whole matrix (up to 40 MiB per reader thread,
 * a fresh mapping and its page faults for every tensor). */
static int read_transposed(mps_model_file *f, const mps_src *s, float *dst, mps_tacc *io, mps_err *err)
{
    size_t es = mps_src_dtype_size(s->dtype);
    int64_t tk = s->tk, tr = s->tr;
    if (tk <= 0 || tr <= 0)
        return 0;
    size_t row = (size_t)tr * es;
    int64_t band = (int64_t)(TRANSPOSE_BAND / row);
    if (band < 1)
        band = 1;
    if (band > tk)
        band = tk;
    size_t nbytes = (size_t)band * row;
    void *buf = malloc(nbytes);
    if (buf == NULL)
        return mps_fail(err, MPS_ENOMEM, "%s: out of memory reading '%s' (%zu bytes)", f->path, s->key, nbytes);
    for (int64_t k0 = 0; k0 < tk; k0 += band) {
        int64_t kb = tk - k0 < band ? tk - k0 : band;
        if (pread_io(f, s, io, buf, (size_t)kb * row, s->offset + k0 * (int64_t)row, err) != 0) {
            free(buf);
            return -1;
        }
        if (s->dtype == MPS_SRC_F32)
            TRANSPOSE_LOOP(float, CONV_F32);
        else if (s->dtype == MPS_SRC_BF16)
            TRANSPOSE_LOOP(uint16_t, mps_bf16_to_f32);
        else
            TRANSPOSE_LOOP(uint16_t, f16_to_f32);
    }
    free(buf);
    return 0;
}

int mps_model_file_read_tensor(mps_model_file *f, int index, float *dst, mps_err *err)
{
    return mps_model_file_read_tensor_io(f, index, dst, NULL, err);
}

int mps_model_file_read_tensor_io(mps_model_file *f, int index, float *dst, mps_tacc *io, mps_err *err)
{
    if (index < 0 || index >= f->nsrc)
        return mps_fail(err, MPS_EUSAGE, "%s: tensor index %d out of range 0..%d", f->path, index, f->nsrc - 1);
    mps_tensor_spec spec;
    mps_tensor_spec_get(&f->cfg, index, &spec);
    int64_t numel = mps_tensor_numel(&spec);
    const mps_src *s = &f->src[index];
    int rc;
    if (s->transpose)
        rc = read_transposed(f, s, dst, io, err);
    else
        rc = read_plain(f, s, (index == 0 && f->has_tied) ? &f->tied : NULL, dst, io, err);
    if (rc != 0)
        return mps_wrap(err, "reading %s", spec.name);
    if (s->numel < numel)
        memset(dst + s->numel, 0, (size_t)(numel - s->numel) * sizeof(float));
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Writing */

/* One file of an output: its header (written when the writer reaches it) and its total size. */
typedef struct {
    char *path, *tmp_path;
    int fd;
    unsigned char *header;
    size_t header_len;
    int64_t total;
} out_part;

struct mps_out_file {
    char *dir;
    out_part *parts;
    int nparts, cur;        /* the part being written */
    int64_t part_written;   /* bytes of the current part written (its header included) */
    mps_dtype dtype;
    mps_out_item *items;
    int nitems;
    int64_t total, written; /* tensor data of all parts together (headers not counted) */
    unsigned char *buf;
    size_t len;
    char *extra_name[2], *extra_text[2];
};

int64_t mps_out_item_bytes(const mps_config *cfg, const mps_out_item *it, mps_dtype dtype)
{
    mps_tensor_spec spec;
    mps_tensor_spec_get(cfg, it->tensor, &spec);
    int64_t per_row = mps_tensor_numel(&spec) / spec.shape[0];
    return it->rows * per_row * (int64_t)mps_dtype_size(dtype);
}

static void out_free(mps_out_file *f)
{
    if (f == NULL)
        return;
    for (int i = 0; f->parts && i < f->nparts; i++) {
        if (f->parts[i].fd >= 0)
            close(f->parts[i].fd);
        free(f->parts[i].path);
        free(f->parts[i].tmp_path);
        free(f->parts[i].header);
    }
    free(f->parts);
    free(f->dir);
    free(f->items);
    free(f->buf);
    for (int i = 0; i < 2; i++) {
        free(f->extra_name[i]);
        free(f->extra_text[i]);
    }
    free(f);
}

/* The temporary file is also the lock of its writer (flock, held until it is renamed into
 * place): a second writer of the same file fails at once instead of truncating the first one's
 * data. It is truncated only once locked; if the file we locked was renamed by a finishing writer
 * meanwhile, we try again with a fresh one. */
static int open_locked_tmp(out_part *p, mps_err *err)
{
    for (int attempt = 0; attempt < 100 && p->fd < 0; attempt++) {
        int fd = mps_open_tmp_output(p->tmp_path, err);
        if (fd < 0)
            return -1;
        if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
            close(fd);
            return mps_fail(err, MPS_EIO, "%s: another mpshard process is writing this file (%s is locked)", p->path,
                            p->tmp_path);
        }
        struct stat a, b;
        if (fstat(fd, &a) == 0 && stat(p->tmp_path, &b) == 0 && a.st_ino == b.st_ino && a.st_dev == b.st_dev)
            p->fd = fd;
        else
            close(fd);
    }
    if (p->fd < 0 || ftruncate(p->fd, 0) != 0)
        return mps_fail(err, MPS_EIO, "%s: cannot take or truncate: %s", p->tmp_path,
                        p->fd < 0 ? "lock retries" : strerror(errno));
    return 0;
}

static int write_part_header(mps_out_file *f, mps_err *err)
{
    out_part *p = &f->parts[f->cur];
    f->part_written = (int64_t)p->header_len;
    return p->header_len ? write_all(p->fd, p->tmp_path, p->header, p->header_len, err) : 0;
}

int mps_out_file_begin_parts(const char *dir, const mps_out_part_spec *specs, int nparts, mps_dtype dtype,
                             mps_out_item *items, int nitems, const char *const extra_name[2], char *extra_text[2],
                             mps_out_file **out, mps_err *err)
{
    *out = NULL;
    mps_out_file *f = calloc(1, sizeof *f);
    int nomem = f == NULL;
    if (f) {
        f->items = items;
        f->nitems = nitems;
        f->dtype = dtype;
        f->dir = strdup(dir);
        f->buf = malloc(OUT_BUF);
        f->parts = calloc((size_t)nparts, sizeof *f->parts);
        f->nparts = f->parts ? nparts : 0;
        nomem = !f->dir || !f->buf || !f->parts;
        for (int i = 0; i < 2; i++) {
            f->extra_text[i] = extra_text ? extra_text[i] : NULL;
            if (extra_name && extra_name[i] && !(f->extra_name[i] = strdup(extra_name[i])))
                nomem = 1;
        }
        for (int i = 0; i < f->nparts; i++) {
            out_part *p = &f->parts[i];
            p->fd = -1;
            p->path = path_join(dir, specs[i].name);
            p->tmp_path = p->path ? str_concat(p->path, ".tmp") : NULL;
            p->header = specs[i].header;
            p->header_len = specs[i].header_len;
            p->total = specs[i].total_bytes;
            f->total += specs[i].total_bytes - (int64_t)specs[i].header_len;
            nomem |= !p->path || !p->tmp_path;
        }
    } else {
        free(items);
        for (int i = 0; extra_text && i < 2; i++)
            free(extra_text[i]);
        for (int i = 0; i < nparts; i++)
            free(specs[i].header);
    }
    if (nomem) {
        out_free(f);
        return mps_fail(err, MPS_ENOMEM, "%s: out of memory", dir);
    }
    if (mps_mkdir_p(dir, err) != 0)
        goto fail;
    for (int i = 0; i < f->nparts; i++)
        if (open_locked_tmp(&f->parts[i], err) != 0)
            goto fail;
    if (write_part_header(f, err) != 0)
        goto fail;
    *out = f;
    return 0;
fail:
    mps_out_file_abort(f);
    return -1;
}

int mps_out_file_begin(const char *dir, const char *name, mps_dtype dtype, mps_out_item *items, int nitems,
                       int64_t total_bytes, const char *extra_name, char *extra_text, mps_out_file **out,
                       mps_err *err)
{
    mps_out_part_spec spec = { name, NULL, 0, total_bytes };
    const char *names[2] = { extra_name, NULL };
    char *texts[2] = { extra_text, NULL };
    return mps_out_file_begin_parts(dir, &spec, 1, dtype, items, nitems, names, texts, out, err);
}

void mps_out_file_items(const mps_out_file *f, const mps_out_item **items, int *count)
{
    *items = f->items;
    *count = f->nitems;
}

mps_dtype mps_out_file_dtype(const mps_out_file *f) { return f->dtype; }
const char *mps_out_file_path(const mps_out_file *f) { return f->parts[0].path; }

static int out_flush(mps_out_file *f, mps_err *err)
{
    if (f->len == 0)
        return 0;
    out_part *p = &f->parts[f->cur];
    int rc = write_all(p->fd, p->tmp_path, f->buf, f->len, err);
    f->len = 0;
    return rc;
}

/* Appends to the current part, which has room for nbytes. */
static int part_append(mps_out_file *f, const void *data, size_t nbytes, mps_err *err)
{
    f->part_written += (int64_t)nbytes;
    if (f->len + nbytes <= OUT_BUF) {
        memcpy(f->buf + f->len, data, nbytes);
        f->len += nbytes;
        return 0;
    }
    if (out_flush(f, err) != 0)
        return -1;
    if (nbytes >= OUT_BUF)
        return write_all(f->parts[f->cur].fd, f->parts[f->cur].tmp_path, data, nbytes, err);
    memcpy(f->buf, data, nbytes);
    f->len = nbytes;
    return 0;
}

int mps_out_file_write(mps_out_file *f, const void *data, size_t nbytes, mps_err *err)
{
    if ((int64_t)nbytes > f->total - f->written)
        return mps_fail(err, MPS_EFAIL, "%s: %zu more bytes written than the file holds (%lld of %lld written)",
                        f->parts[0].path, nbytes, (long long)f->written, (long long)f->total);
    f->written += (int64_t)nbytes;
    const unsigned char *p = data;
    while (nbytes > 0) {
        int64_t room = f->parts[f->cur].total - f->part_written;
        if (room == 0) { /* the next part: its header first */
            if (out_flush(f, err) != 0)
                return -1;
            f->cur++;
            if (write_part_header(f, err) != 0)
                return -1;
            continue;
        }
        size_t n = (int64_t)nbytes < room ? nbytes : (size_t)room;
        if (part_append(f, p, n, err) != 0)
            return -1;
        p += n;
        nbytes -= n;
    }
    return 0;
}

static int write_extra(mps_out_file *f, int i, mps_err *err)
{
    if (!f->extra_name[i] || !f->extra_text[i]) /* a single-file model has no index */
        return 0;
    char *p = path_join(f->dir, f->extra_name[i]);
    if (p == NULL)
        return mps_fail(err, MPS_ENOMEM, "%s: out of memory", f->dir);
    int r = mps_write_file_atomic(p, f->extra_text[i], strlen(f->extra_text[i]), err);
    free(p);
    return r;
}

/* Order of the commit: every part fsynced, the first extra file (config.json), the parts renamed
 * into place, the second extra file (a sharded model's index, which names the parts) last. */
int mps_out_file_finish(mps_out_file *f, mps_err *err)
{
    int rc = -1;
    if (f->written != f->total) {
        mps_fail(err, MPS_EFAIL, "%s: only %lld of %lld bytes were written", f->parts[0].path, (long long)f->written,
                 (long long)f->total);
        goto fail;
    }
    if (out_flush(f, err) != 0)
        goto fail;
    for (int i = 0; i < f->nparts; i++)
        if (fsync(f->parts[i].fd) != 0) {
            mps_fail(err, MPS_EIO, "%s: fsync failed: %s", f->parts[i].tmp_path, strerror(errno));
            goto fail;
        }
    if (write_extra(f, 0, err) != 0)
        goto fail;
    for (int i = 0; i < f->nparts; i++)
        if (rename(f->parts[i].tmp_path, f->parts[i].path) != 0) {
            mps_fail(err, MPS_EIO, "%s: rename to %s failed: %s", f->parts[i].tmp_path, f->parts[i].path,
                     strerror(errno));
            goto fail;
        }
    rc = fsync_dir(f->dir, err);
    if (rc == 0)
        rc = write_extra(f, 1, err);
    for (int i = 0; i < f->nparts; i++) { /* closed last: each holds its writer's lock until it is in place */
        int fd = f->parts[i].fd;
        f->parts[i].fd = -1;
        if (close(fd) != 0 && rc == 0)
            rc = mps_fail(err, MPS_EIO, "%s: close failed: %s", f->parts[i].path, strerror(errno));
    }
    out_free(f);
    return rc;
fail:
    for (int i = 0; i < f->nparts; i++)
        if (f->parts[i].fd >= 0)
            unlink(f->parts[i].tmp_path);
    out_free(f);
    return rc;
}

void mps_out_file_abort(mps_out_file *f)
{
    if (f == NULL)
        return;
    for (int i = 0; i < f->nparts; i++)
        if (f->parts[i].fd >= 0) {
            close(f->parts[i].fd);
            f->parts[i].fd = -1;
            unlink(f->parts[i].tmp_path);
        }
    out_free(f);
}
