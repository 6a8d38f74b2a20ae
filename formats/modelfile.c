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
    /* A directory stands for the model.safetensors inside it (what the writer produces). */
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode))
        f->path = path_join(path, "model.safetensors");
    else
        f->path = strdup(path);
    if (f->path == NULL) {
        free(f);
        return mps_fail(err, MPS_ENOMEM, "%s: out of memory", path);
    }
    /* O_NONBLOCK: a FIFO in place of the model would block open() forever; it is refused below
     * (not a regular file), and reads of a regular file ignore the flag */
    f->fd = open(f->path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (f->fd < 0) {
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
        else if (head[8] == '{')
            fmt = MPS_FILE_SAFETENSORS;
        else {
            mps_fail(err, MPS_ECORRUPT,
                     "%s: neither a safetensors file (8-byte header length, then '{') nor an llm.c model file "
                     "(magic 20240326)", f->path);
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
    *out = f;
    return 0;
fail:
    mps_model_file_close(f);
    return -1;
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

/* mps_pread_full, timed into io when it is not NULL (MPS_TRACE) */
static int pread_io(mps_model_file *f, mps_tacc *io, void *buf, size_t n, int64_t off, mps_err *err)
{
    int64_t t0 = io ? mps_now_ns() : 0;
    int rc = mps_pread_full(f->fd, f->path, buf, n, off, err);
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
        if ((rc = pread_io(f, io, raw, n, s->offset + pos, err)) != 0)
            break;
        if (tied) {
            if ((rc = pread_io(f, io, tmp2, n, tied->offset + pos, err)) != 0)
                break;
            if (memcmp(raw, tmp2, n) != 0) {
                rc = mps_fail(err, MPS_EUNSUPPORTED,
                              "%s: tensor '%s' differs from '%s': an untied output head is not supported "
                              "(GPT-2 ties lm_head to wte)", f->path, tied->key, s->key);
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
        if (pread_io(f, io, buf, (size_t)kb * row, s->offset + k0 * (int64_t)row, err) != 0) {
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
        rc = read_plain(f, s, (index == MPS_TENSOR_WTE && f->has_tied) ? &f->tied : NULL, dst, io, err);
    if (rc != 0)
        return mps_wrap(err, "reading %s", spec.name);
    if (s->numel < numel)
        memset(dst + s->numel, 0, (size_t)(numel - s->numel) * sizeof(float));
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Writing */

struct mps_out_file {
    char *dir, *path, *tmp_path;
    int fd;
    mps_dtype dtype;
    mps_out_item *items;
    int nitems;
    int64_t total, written;
    unsigned char *buf;
    size_t len;
    char *extra_name, *extra_text;
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
    if (f->fd >= 0)
        close(f->fd);
    free(f->dir);
    free(f->path);
    free(f->tmp_path);
    free(f->items);
    free(f->buf);
    free(f->extra_name);
    free(f->extra_text);
    free(f);
}

int mps_out_file_begin(const char *dir, const char *name, mps_dtype dtype, mps_out_item *items, int nitems,
                       int64_t total_bytes, const char *extra_name, char *extra_text, mps_out_file **out,
                       mps_err *err)
{
    *out = NULL;
    mps_out_file *f = calloc(1, sizeof *f);
    if (f == NULL) {
        free(items);
        free(extra_text);
        return mps_fail(err, MPS_ENOMEM, "%s: out of memory", dir);
    }
    f->fd = -1;
    f->items = items;
    f->nitems = nitems;
    f->extra_text = extra_text;
    f->dtype = dtype;
    f->total = total_bytes;
    f->dir = strdup(dir);
    f->path = path_join(dir, name);
    f->tmp_path = f->path ? str_concat(f->path, ".tmp") : NULL;
    f->buf = malloc(OUT_BUF);
    if (extra_name)
        f->extra_name = strdup(extra_name);
    if (!f->dir || !f->path || !f->tmp_path || !f->buf || (extra_name && !f->extra_name)) {
        out_free(f);
        return mps_fail(err, MPS_ENOMEM, "%s: out of memory", dir);
    }
    if (mps_mkdir_p(dir, err) != 0) {
        out_free(f);
        return -1;
    }
    /* The temporary file is also the lock of its writer (flock, held until it is renamed into
     * place): a second writer of the same file fails at once instead of truncating the first
     * one's data. It is truncated only once locked; if the file we locked was renamed by a
     * finishing writer meanwhile, we try again with a fresh one. */
    for (int attempt = 0; attempt < 100 && f->fd < 0; attempt++) {
        int fd = mps_open_tmp_output(f->tmp_path, err);
        if (fd < 0) {
            out_free(f);
            return -1;
        }
        if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
            close(fd);
            mps_fail(err, MPS_EIO, "%s: another mpshard process is writing this file (%s is locked)", f->path,
                     f->tmp_path);
            out_free(f);
            return -1;
        }
        struct stat a, b;
        if (fstat(fd, &a) == 0 && stat(f->tmp_path, &b) == 0 && a.st_ino == b.st_ino && a.st_dev == b.st_dev)
            f->fd = fd;
        else
            close(fd);
    }
    if (f->fd < 0 || ftruncate(f->fd, 0) != 0) {
        mps_fail(err, MPS_EIO, "%s: cannot take or truncate: %s", f->tmp_path, f->fd < 0 ? "lock retries" : strerror(errno));
        out_free(f);
        return -1;
    }
    *out = f;
    return 0;
}

void mps_out_file_items(const mps_out_file *f, const mps_out_item **items, int *count)
{
    *items = f->items;
    *count = f->nitems;
}

mps_dtype mps_out_file_dtype(const mps_out_file *f) { return f->dtype; }
const char *mps_out_file_path(const mps_out_file *f) { return f->path; }

static int out_flush(mps_out_file *f, mps_err *err)
{
    if (f->len == 0)
        return 0;
    int rc = write_all(f->fd, f->tmp_path, f->buf, f->len, err);
    f->len = 0;
    return rc;
}

int mps_out_file_write(mps_out_file *f, const void *data, size_t nbytes, mps_err *err)
{
    if ((int64_t)nbytes > f->total - f->written)
        return mps_fail(err, MPS_EFAIL, "%s: %zu more bytes written than the file holds (%lld of %lld written)",
                        f->path, nbytes, (long long)f->written, (long long)f->total);
    f->written += (int64_t)nbytes;
    if (f->len + nbytes <= OUT_BUF) {
        memcpy(f->buf + f->len, data, nbytes);
        f->len += nbytes;
        return 0;
    }
    if (out_flush(f, err) != 0)
        return -1;
    if (nbytes >= OUT_BUF)
        return write_all(f->fd, f->tmp_path, data, nbytes, err);
    memcpy(f->buf, data, nbytes);
    f->len = nbytes;
    return 0;
}

int mps_out_file_finish(mps_out_file *f, mps_err *err)
{
    int rc = -1;
    if (f->written != f->total) {
        mps_fail(err, MPS_EFAIL, "%s: only %lld of %lld bytes were written", f->path, (long long)f->written,
                 (long long)f->total);
        goto fail;
    }
    if (out_flush(f, err) != 0)
        goto fail;
    if (fsync(f->fd) != 0) {
        mps_fail(err, MPS_EIO, "%s: fsync failed: %s", f->tmp_path, strerror(errno));
        goto fail;
    }
    if (f->extra_name) {
        char *p = path_join(f->dir, f->extra_name);
        if (p == NULL) {
            mps_fail(err, MPS_ENOMEM, "%s: out of memory", f->dir);
            goto fail;
        }
        int r = mps_write_file_atomic(p, f->extra_text, strlen(f->extra_text), err);
        free(p);
        if (r != 0)
            goto fail;
    }
    if (rename(f->tmp_path, f->path) != 0) {
        mps_fail(err, MPS_EIO, "%s: rename to %s failed: %s", f->tmp_path, f->path, strerror(errno));
        goto fail;
    }
    rc = fsync_dir(f->dir, err);
    int fd = f->fd; /* closed last: it holds the writer's lock until the file is in place */
    f->fd = -1;
    if (close(fd) != 0 && rc == 0)
        rc = mps_fail(err, MPS_EIO, "%s: close failed: %s", f->path, strerror(errno));
    out_free(f);
    return rc;
fail:
    unlink(f->tmp_path);
    out_free(f);
    return rc;
}

void mps_out_file_abort(mps_out_file *f)
{
    if (f == NULL)
        return;
    if (f->fd >= 0) {
        close(f->fd);
        f->fd = -1;
    }
    unlink(f->tmp_path);
    out_free(f);
}
