#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "data.h"
#include "safe_open.h"

#define TOKENS_MAGIC 20240520
#define TOKENS_HEADER_BYTES 1024
#define TOKENS_MAX_FILES (1 << 20)

/* One file of the set: its sequences are [first, first + nseq) of the stream. */
typedef struct {
    char *path;
    int64_t ntok, nseq, first;
    int width; /* bytes per token: 2 (version 1, uint16), 4 (version 2, uint32) */
} token_file;

struct mps_tokens {
    int T;
    int64_t nseq, vocab;
    int nfiles;
    token_file *files;
    /* one descriptor open at a time (a set may hold more files than a process may open) */
    pthread_mutex_t lock;
    int open_file, fd;
};

/* Checks a token file's header against its size and T; *ntok: its token count, *width: bytes per
 * token (llm.c's version 1: uint16; version 2, for vocabularies above 65536: uint32). */
static int check_file(const char *path, int T, int64_t *ntok, int *width, mps_err *err)
{
    struct stat st;
    int fd = mps_open_input(path, MPS_EUSAGE, &st, err); /* a FIFO must not block: refused */
    if (fd < 0)
        return -1;
    int32_t h[256];
    int rc = 0;
    if (st.st_size < TOKENS_HEADER_BYTES || pread(fd, h, sizeof h, 0) != (ssize_t)sizeof h)
        rc = mps_fail(err, MPS_ECORRUPT, "%s: shorter than the 1024-byte header of an llm.c token file", path);
    else if (h[0] != TOKENS_MAGIC)
        rc = mps_fail(err, MPS_ECORRUPT, "%s: bad magic %d (an llm.c token file starts with %d)", path, h[0],
                      TOKENS_MAGIC);
    else if (h[1] != 1 && h[1] != 2)
        rc = mps_fail(err, MPS_EUNSUPPORTED, "%s: token file version %d is not supported (1: uint16 tokens, 2: uint32 "
                      "tokens)", path, h[1]);
    else if (h[2] < 0 || (int64_t)h[2] * (h[1] == 2 ? 4 : 2) + TOKENS_HEADER_BYTES != st.st_size)
        rc = mps_fail(err, MPS_ECORRUPT, "%s: header says %d tokens but the file holds %lld bytes of tokens", path,
                      h[2], (long long)(st.st_size - TOKENS_HEADER_BYTES));
    else if (h[2] < T + 1)
        rc = mps_fail(err, MPS_EUSAGE, "%s: %d tokens are too few for one sequence of --seq %d (needs %d)", path, h[2],
                      T, T + 1);
    close(fd);
    if (rc == 0) {
        *ntok = h[2];
        *width = h[1] == 2 ? 4 : 2;
    }
    return rc;
}

void mps_tokens_close(mps_tokens *d)
{
    if (!d)
        return;
    if (d->fd >= 0)
        close(d->fd);
    for (int i = 0; i < d->nfiles; i++)
        free(d->files[i].path);
    free(d->files);
    pthread_mutex_destroy(&d->lock);
    free(d);
}

int mps_tokens_open(const char *path, int T, int64_t vocab, mps_tokens **out, mps_err *err)
{
    *out = NULL;
    glob_t g = { 0 };
    const char *one[1] = { path };
    const char *const *names = one;
    size_t count = 1;
    if (strpbrk(path, "*?[")) { /* a shard set: the matching files in name order */
        int grc = glob(path, GLOB_ERR, NULL, &g);
        if (grc == GLOB_NOMATCH)
            return mps_fail(err, MPS_EUSAGE, "%s: no token file matches", path);
        if (grc != 0)
            return mps_fail(err, MPS_EIO, "%s: cannot list the matching files", path);
        if (g.gl_pathc > TOKENS_MAX_FILES) {
            globfree(&g);
            return mps_fail(err, MPS_EUSAGE, "%s: %zu files match, more than %d", path, g.gl_pathc, TOKENS_MAX_FILES);
        }
        names = (const char *const *)g.gl_pathv;
        count = g.gl_pathc;
    }
    mps_tokens *d = calloc(1, sizeof *d);
    int rc = d ? 0 : mps_fail(err, MPS_ENOMEM, "out of memory");
    if (rc == 0) {
        pthread_mutex_init(&d->lock, NULL);
        d->fd = -1;
        d->open_file = -1;
        d->T = T;
        d->vocab = vocab;
        if (!(d->files = calloc(count, sizeof *d->files)))
            rc = mps_fail(err, MPS_ENOMEM, "out of memory");
    }
    for (size_t i = 0; rc == 0 && i < count; i++) {
        token_file *f = &d->files[i];
        if (!(f->path = strdup(names[i]))) {
            rc = mps_fail(err, MPS_ENOMEM, "out of memory");
            break;
        }
        d->nfiles++;
        if (check_file(names[i], T, &f->ntok, &f->width, err) != 0) {
            rc = -1;
            break;
        }
        f->nseq = (f->ntok - 1) / T;
        f->first = d->nseq;
        d->nseq += f->nseq;
    }
    if (names != one)
        globfree(&g);
    if (rc != 0) {
        mps_tokens_close(d);
        return rc;
    }
    *out = d;
    return 0;
}

int64_t mps_tokens_sequences(const mps_tokens *d)
{
    return d->nseq;
}

int mps_tokens_read(const mps_tokens *d, int64_t seq, int32_t *inputs, int32_t *targets, mps_err *err)
{
    int T = d->T;
    unsigned char raw[4 * (T + 1)];
    seq %= d->nseq;
    int lo = 0, hi = d->nfiles - 1; /* the last file whose first sequence is <= seq */
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (d->files[mid].first <= seq)
            lo = mid;
        else
            hi = mid - 1;
    }
    const token_file *f = &d->files[lo];
    int64_t first = (seq - f->first) * T;
    const int width = f->width;
    const size_t bytes = (size_t)width * (size_t)(T + 1);
    off_t off = TOKENS_HEADER_BYTES + (off_t)first * width;
    mps_tokens *m = (mps_tokens *)d; /* the descriptor cache, under its lock */
    pthread_mutex_lock(&m->lock);
    if (m->open_file != lo) {
        if (m->fd >= 0)
            close(m->fd);
        mps_err oerr;
        mps_err_clear(&oerr);
        m->fd = mps_open_input(f->path, MPS_EUSAGE, NULL, &oerr); /* (replaced by a FIFO since it was checked) */
        m->open_file = m->fd >= 0 ? lo : -1;
    }
    ssize_t got = m->fd >= 0 ? pread(m->fd, raw, bytes, off) : -1;
    pthread_mutex_unlock(&m->lock);
    if (got != (ssize_t)bytes)
        return mps_fail(err, MPS_EIO, "%s: reading tokens %lld..%lld failed", f->path, (long long)first,
                        (long long)(first + T));
    uint32_t buf[T + 1]; /* (the files are little-endian, as the hosts that read them) */
    for (int i = 0; i <= T; i++) {
        uint16_t v16;
        if (width == 2) {
            memcpy(&v16, raw + 2 * i, 2);
            buf[i] = v16;
        } else {
            memcpy(&buf[i], raw + 4 * i, 4);
        }
        if (buf[i] >= d->vocab)
            return mps_fail(err, MPS_ECORRUPT, "%s: token %lld is id %u, beyond the model's vocabulary of %lld",
                            f->path, (long long)(first + i), buf[i], (long long)d->vocab);
    }
    for (int i = 0; i < T; i++) {
        inputs[i] = buf[i];
        targets[i] = buf[i + 1];
    }
    return 0;
}

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

int mps_tokens_write_synthetic(const char *path, int64_t n, int64_t vocab, uint64_t seed, mps_err *err)
{
    if (n < 2 || n > INT32_MAX)
        return mps_fail(err, MPS_EUSAGE, "--tokens %lld: expected 2 to %d", (long long)n, INT32_MAX);
    if (vocab < 2 || vocab > INT32_MAX)
        return mps_fail(err, MPS_EUSAGE, "vocab %lld: expected 2 to %d", (long long)vocab, INT32_MAX);
    /* llm.c's version 2 (uint32 tokens) above 65535 ids, as its Llama 3 files */
    const int width = vocab > 65535 ? 4 : 2;
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    int fd = mps_open_tmp_output(tmp, err);
    if (fd < 0)
        return -1;
    FILE *f = ftruncate(fd, 0) == 0 ? fdopen(fd, "wb") : NULL;
    if (!f) {
        int e = errno;
        close(fd);
        unlink(tmp);
        return mps_fail(err, MPS_EIO, "%s: %s", tmp, strerror(e));
    }
    int32_t h[256] = { TOKENS_MAGIC, width == 4 ? 2 : 1, (int32_t)n };
    int ok = fwrite(h, sizeof h, 1, f) == 1;
    /* A learnable stream: short "words" (runs of consecutive ids from a random start) separated by
     * a frequent id 0, so that a model quickly lowers its loss well below log(vocab). */
    uint64_t state = seed;
    int64_t cur = 0; /* (the same ids as uint16 arithmetic below 65536) */
    int left = 0;
    for (int64_t i = 0; i < n && ok; i++) {
        if (left == 0) {
            uint64_t r = mix64(state++);
            cur = 0;
            left = 2 + (int)(r % 5);
            int64_t start = (int64_t)(1 + (r >> 8) % (uint64_t)(vocab - 1 > 16 ? 16 : vocab - 1));
            const uint32_t zero = 0;
            ok = fwrite(&zero, (size_t)width, 1, f) == 1;
            cur = start;
            continue;
        }
        uint16_t t16 = (uint16_t)(cur % vocab);
        uint32_t t32 = (uint32_t)(cur % vocab);
        ok = (width == 2 ? fwrite(&t16, 2, 1, f) : fwrite(&t32, 4, 1, f)) == 1;
        cur = cur * 3 % vocab;
        if (cur == 0)
            cur = 1;
        left--;
    }
    if (fflush(f) != 0 || fsync(fileno(f)) != 0)
        ok = 0;
    if (fclose(f) != 0)
        ok = 0;
    if (!ok || rename(tmp, path) != 0) {
        unlink(tmp);
        return mps_fail(err, MPS_EIO, "%s: write failed: %s", path, strerror(errno));
    }
    return 0;
}
