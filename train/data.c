#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "data.h"

#define TOKENS_MAGIC 20240520
#define TOKENS_HEADER_BYTES 1024

struct mps_tokens {
    int fd;
    int T;
    int64_t ntok, nseq, vocab;
    char path[4096];
};

int mps_tokens_open(const char *path, int T, int64_t vocab, mps_tokens **out, mps_err *err)
{
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return mps_fail(err, MPS_EIO, "%s: %s", path, strerror(errno));
    struct stat st;
    int32_t h[256];
    if (fstat(fd, &st) != 0) {
        close(fd);
        return mps_fail(err, MPS_EIO, "%s: %s", path, strerror(errno));
    }
    if (st.st_size < TOKENS_HEADER_BYTES || pread(fd, h, sizeof h, 0) != (ssize_t)sizeof h) {
        close(fd);
        return mps_fail(err, MPS_ECORRUPT, "%s: shorter than the 1024-byte header of an llm.c token file", path);
    }
    int rc = 0;
    if (h[0] != TOKENS_MAGIC)
        rc = mps_fail(err, MPS_ECORRUPT, "%s: bad magic %d (an llm.c token file starts with %d)", path, h[0],
                      TOKENS_MAGIC);
    else if (h[1] != 1)
        rc = mps_fail(err, MPS_EUNSUPPORTED, "%s: token file version %d is not supported (1: uint16 tokens)", path,
                      h[1]);
    else if (h[2] < 0 || (int64_t)h[2] * 2 + TOKENS_HEADER_BYTES != st.st_size)
        rc = mps_fail(err, MPS_ECORRUPT, "%s: header says %d tokens but the file holds %lld bytes of tokens", path,
                      h[2], (long long)(st.st_size - TOKENS_HEADER_BYTES));
    else if (h[2] < T + 1)
        rc = mps_fail(err, MPS_EUSAGE, "%s: %d tokens are too few for one sequence of --seq %d (needs %d)", path, h[2],
                      T, T + 1);
    if (rc) {
        close(fd);
        return rc;
    }
    mps_tokens *d = calloc(1, sizeof *d);
    if (!d) {
        close(fd);
        return mps_fail(err, MPS_ENOMEM, "out of memory");
    }
    d->fd = fd;
    d->T = T;
    d->ntok = h[2];
    d->nseq = (d->ntok - 1) / T;
    d->vocab = vocab;
    snprintf(d->path, sizeof d->path, "%s", path);
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
    uint16_t buf[T + 1];
    int64_t first = (seq % d->nseq) * T;
    off_t off = TOKENS_HEADER_BYTES + (off_t)first * 2;
    if (pread(d->fd, buf, sizeof buf, off) != (ssize_t)sizeof buf)
        return mps_fail(err, MPS_EIO, "%s: reading tokens %lld..%lld failed", d->path, (long long)first,
                        (long long)(first + T));
    for (int i = 0; i <= T; i++)
        if (buf[i] >= d->vocab)
            return mps_fail(err, MPS_ECORRUPT, "%s: token %lld is id %u, beyond the model's vocabulary of %lld",
                            d->path, (long long)(first + i), buf[i], (long long)d->vocab);
    for (int i = 0; i < T; i++) {
        inputs[i] = buf[i];
        targets[i] = buf[i + 1];
    }
    return 0;
}

void mps_tokens_close(mps_tokens *d)
{
    if (!d)
        return;
    close(d->fd);
    free(d);
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
    if (vocab < 2 || vocab > 65536)
        return mps_fail(err, MPS_EUSAGE, "vocab %lld: a uint16 token file needs 2..65536", (long long)vocab);
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "wb");
    if (!f)
        return mps_fail(err, MPS_EIO, "%s: %s", tmp, strerror(errno));
    int32_t h[256] = { TOKENS_MAGIC, 1, (int32_t)n };
    int ok = fwrite(h, sizeof h, 1, f) == 1;
    /* A learnable stream: short "words" (runs of consecutive ids from a random start) separated by
     * a frequent id 0, so that a model quickly lowers its loss well below log(vocab). */
    uint64_t state = seed;
    uint16_t cur = 0;
    int left = 0;
    for (int64_t i = 0; i < n && ok; i++) {
        if (left == 0) {
            uint64_t r = mix64(state++);
            cur = 0;
            left = 2 + (int)(r % 5);
            uint16_t start = (uint16_t)(1 + (r >> 8) % (uint64_t)(vocab - 1 > 16 ? 16 : vocab - 1));
            ok = fputc(0, f) != EOF && fputc(0, f) != EOF;
            cur = start;
            continue;
        }
        uint16_t t = (uint16_t)(cur % vocab);
        ok = fwrite(&t, 2, 1, f) == 1;
        cur = (uint16_t)(cur * 3 % (vocab > 1 ? vocab : 2));
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
