#include "chunk.h"

#include <string.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

uint64_t mps_xxh3(const void *data, size_t nbytes) { return XXH3_64bits(data, nbytes); }

static void grid_derive(mps_chunk_grid *g)
{
    g->numel = 1;
    for (int i = 0; i < g->ndim; i++)
        g->numel *= g->dims[i];
    g->D = g->dims[g->split];
    g->T = 1;
    for (int i = g->split + 1; i < g->ndim; i++)
        g->T *= g->dims[i];
    g->k = g->chunk[g->split];
    g->per_outer = g->D == 0 ? 0 : (g->D + g->k - 1) / g->k;
    int64_t outer = 1;
    for (int i = 0; i < g->split; i++)
        outer *= g->dims[i];
    g->nchunks = outer * g->per_outer;
    g->chunk_elems = g->k * g->T;
}

void mps_chunk_grid_plan(mps_chunk_grid *g, int ndim, const int64_t *dims, int64_t target_elems)
{
    memset(g, 0, sizeof *g);
    g->ndim = ndim;
    if (target_elems < 1)
        target_elems = 1;
    for (int i = 0; i < ndim; i++)
        g->dims[i] = dims[i];
    /* j = the first dimension whose trailing product fits the target */
    int j = ndim - 1;
    int64_t trailing = 1;
    for (int i = ndim - 1; i >= 0; i--) {
        if (trailing > target_elems)
            break;
        j = i;
        trailing *= dims[i] > 0 ? dims[i] : 1;
    }
    int64_t T = 1;
    for (int i = j + 1; i < ndim; i++)
        T *= dims[i] > 0 ? dims[i] : 1;
    int64_t k = target_elems / T;
    if (k < 1) k = 1;
    if (k > dims[j]) k = dims[j] > 0 ? dims[j] : 1;
    for (int i = 0; i < ndim; i++)
        g->chunk[i] = i < j ? 1 : (i == j ? k : (dims[i] > 0 ? dims[i] : 1));
    /* the split is the first dimension whose chunk extent is not 1 (as mps_chunk_grid_load finds it) */
    g->split = ndim - 1;
    for (int i = 0; i < ndim; i++)
        if (g->chunk[i] != 1) {
            g->split = i;
            break;
        }
    grid_derive(g);
}

int mps_chunk_grid_load(mps_chunk_grid *g, int ndim, const int64_t *dims, const int64_t *chunk, mps_err *err)
{
    memset(g, 0, sizeof *g);
    if (ndim < 1 || ndim > MPS_MAX_DIMS)
        return mps_fail(err, MPS_ECORRUPT, "dataset rank %d not supported", ndim);
    g->ndim = ndim;
    int j = -1;
    /* the chunk shape comes from the file: every product is checked before it is formed */
    int64_t numel = 1, elems = 1;
    for (int i = 0; i < ndim; i++) {
        g->dims[i] = dims[i];
        g->chunk[i] = chunk[i];
        if (chunk[i] < 1)
            return mps_fail(err, MPS_ECORRUPT, "chunk extent %lld in dimension %d", (long long)chunk[i], i);
        if (dims[i] < 0 || __builtin_mul_overflow(numel, dims[i], &numel))
            return mps_fail(err, MPS_ECORRUPT, "dataset extent %lld in dimension %d", (long long)dims[i], i);
        if (__builtin_mul_overflow(elems, chunk[i], &elems) || elems > MPS_MAX_CHUNK_BYTES / 4)
            return mps_fail(err, MPS_ECORRUPT, "chunk extent %lld in dimension %d exceeds the %lld-byte chunk limit",
                            (long long)chunk[i], i, (long long)MPS_MAX_CHUNK_BYTES);
    }
    /* the split dimension: the first one whose chunk extent is not 1 (or the last) */
    for (int i = 0; i < ndim && j < 0; i++)
        if (chunk[i] != 1 || i == ndim - 1)
            j = i;
    for (int i = j + 1; i < ndim; i++)
        if (chunk[i] != dims[i])
            return mps_fail(err, MPS_ECORRUPT, "chunk shape is not of the form (1,..,k,whole..) (dimension %d)", i);
    if (chunk[j] > dims[j] && dims[j] > 0)
        return mps_fail(err, MPS_ECORRUPT, "chunk extent %lld exceeds dimension %lld", (long long)chunk[j], (long long)dims[j]);
    g->split = j;
    grid_derive(g);
    return 0;
}

void mps_chunk_range(const mps_chunk_grid *g, int64_t id, int64_t *begin, int64_t *end, int64_t *offset)
{
    int64_t o = id / g->per_outer, c = id % g->per_outer;
    int64_t row_hi = (c + 1) * g->k < g->D ? (c + 1) * g->k : g->D;
    *begin = o * g->D * g->T + c * g->k * g->T;
    *end = o * g->D * g->T + row_hi * g->T;
    if (offset) {
        for (int i = g->split - 1; i >= 0; i--) {
            offset[i] = o % g->dims[i];
            o /= g->dims[i];
        }
        offset[g->split] = c * g->k;
        for (int i = g->split + 1; i < g->ndim; i++)
            offset[i] = 0;
    }
}

int64_t mps_chunk_of(const mps_chunk_grid *g, int64_t flat)
{
    int64_t o = flat / (g->D * g->T), c = (flat % (g->D * g->T)) / (g->k * g->T);
    return o * g->per_outer + c;
}

#ifdef __SSE2__
#include <emmintrin.h>
#endif

/* Byte shuffle of 4-byte elements, 16 elements per step: three rounds of byte interleaving turn
 * 16 rows of 4 bytes into 4 rows of 16 bytes. Checked against the scalar loop in test_chunk. */
static size_t shuffle4_vector(const uint8_t *in, uint8_t *out, size_t n)
{
    size_t i = 0;
#ifdef __SSE2__
    for (; i + 16 <= n; i += 16) {
        const __m128i *src = (const __m128i *)(in + 4 * i);
        __m128i a = _mm_loadu_si128(src), b = _mm_loadu_si128(src + 1);
        __m128i c = _mm_loadu_si128(src + 2), d = _mm_loadu_si128(src + 3);
        __m128i ab0 = _mm_unpacklo_epi8(a, b), ab1 = _mm_unpackhi_epi8(a, b);
        __m128i cd0 = _mm_unpacklo_epi8(c, d), cd1 = _mm_unpackhi_epi8(c, d);
        __m128i x0 = _mm_unpacklo_epi8(ab0, ab1), x1 = _mm_unpackhi_epi8(ab0, ab1);
        __m128i y0 = _mm_unpacklo_epi8(cd0, cd1), y1 = _mm_unpackhi_epi8(cd0, cd1);
        __m128i p0 = _mm_unpacklo_epi8(x0, x1), p1 = _mm_unpackhi_epi8(x0, x1);
        __m128i q0 = _mm_unpacklo_epi8(y0, y1), q1 = _mm_unpackhi_epi8(y0, y1);
        _mm_storeu_si128((__m128i *)(out + i), _mm_unpacklo_epi64(p0, q0));
        _mm_storeu_si128((__m128i *)(out + n + i), _mm_unpackhi_epi64(p0, q0));
        _mm_storeu_si128((__m128i *)(out + 2 * n + i), _mm_unpacklo_epi64(p1, q1));
        _mm_storeu_si128((__m128i *)(out + 3 * n + i), _mm_unpackhi_epi64(p1, q1));
    }
#else
    (void)in; (void)out; (void)n;
#endif
    return i;
}

/* The inverse: byte planes (16 bytes of each) back to 16 interleaved 4-byte elements. */
static size_t unshuffle4_vector(const uint8_t *in, uint8_t *out, size_t n)
{
    size_t i = 0;
#ifdef __SSE2__
    for (; i + 16 <= n; i += 16) {
        __m128i b0 = _mm_loadu_si128((const __m128i *)(in + i));
        __m128i b1 = _mm_loadu_si128((const __m128i *)(in + n + i));
        __m128i b2 = _mm_loadu_si128((const __m128i *)(in + 2 * n + i));
        __m128i b3 = _mm_loadu_si128((const __m128i *)(in + 3 * n + i));
        __m128i lo01 = _mm_unpacklo_epi8(b0, b1), hi01 = _mm_unpackhi_epi8(b0, b1); /* byte pairs 0,1 */
        __m128i lo23 = _mm_unpacklo_epi8(b2, b3), hi23 = _mm_unpackhi_epi8(b2, b3); /* byte pairs 2,3 */
        __m128i *dst = (__m128i *)(out + 4 * i);
        _mm_storeu_si128(dst, _mm_unpacklo_epi16(lo01, lo23));
        _mm_storeu_si128(dst + 1, _mm_unpackhi_epi16(lo01, lo23));
        _mm_storeu_si128(dst + 2, _mm_unpacklo_epi16(hi01, hi23));
        _mm_storeu_si128(dst + 3, _mm_unpackhi_epi16(hi01, hi23));
    }
#else
    (void)in; (void)out; (void)n;
#endif
    return i;
}

void mps_shuffle(const uint8_t *in, uint8_t *out, size_t nbytes, size_t elem_size)
{
    size_t n = nbytes / elem_size;
    if (elem_size == 4) {
        uint8_t *o0 = out, *o1 = out + n, *o2 = out + 2 * n, *o3 = out + 3 * n;
        for (size_t i = shuffle4_vector(in, out, n); i < n; i++) {
            o0[i] = in[4 * i];
            o1[i] = in[4 * i + 1];
            o2[i] = in[4 * i + 2];
            o3[i] = in[4 * i + 3];
        }
    } else {
        for (size_t b = 0; b < elem_size; b++)
            for (size_t i = 0; i < n; i++)
                out[b * n + i] = in[i * elem_size + b];
    }
    /* HDF5 copies trailing bytes that do not form a whole element unchanged */
    memcpy(out + n * elem_size, in + n * elem_size, nbytes - n * elem_size);
}

void mps_unshuffle(const uint8_t *in, uint8_t *out, size_t nbytes, size_t elem_size)
{
    size_t n = nbytes / elem_size;
    if (elem_size == 4) {
        const uint8_t *i0 = in, *i1 = in + n, *i2 = in + 2 * n, *i3 = in + 3 * n;
        for (size_t i = unshuffle4_vector(in, out, n); i < n; i++) {
            out[4 * i] = i0[i];
            out[4 * i + 1] = i1[i];
            out[4 * i + 2] = i2[i];
            out[4 * i + 3] = i3[i];
        }
    } else {
        for (size_t b = 0; b < elem_size; b++)
            for (size_t i = 0; i < n; i++)
                out[i * elem_size + b] = in[b * n + i];
    }
    memcpy(out + n * elem_size, in + n * elem_size, nbytes - n * elem_size);
}

int mps_chunk_encode(ZSTD_CCtx *cctx, int level, const void *raw, size_t nbytes, size_t elem_size,
                     void *scratch, void *out, size_t out_cap, size_t *out_size, mps_err *err)
{
    const void *src = raw;
    if (elem_size > 1 && nbytes / elem_size > 1) { /* HDF5 leaves single-element chunks unshuffled */
        mps_shuffle(raw, scratch, nbytes, elem_size);
        src = scratch;
    }
    size_t n = ZSTD_compressCCtx(cctx, out, out_cap, src, nbytes, level);
    if (ZSTD_isError(n))
        return mps_fail(err, MPS_EFAIL, "zstd compression failed: %s", ZSTD_getErrorName(n));
    *out_size = n;
    return 0;
}

int mps_chunk_decode(ZSTD_DCtx *dctx, unsigned filter_mask, const void *in, size_t in_size, size_t elem_size,
                     void *scratch, void *raw, size_t nbytes, mps_err *err)
{
    int shuffled = !(filter_mask & 1u) && elem_size > 1 && nbytes / elem_size > 1;
    void *dst = shuffled ? scratch : raw;
    if (filter_mask & 2u) { /* zstd skipped: the bytes are stored as they are */
        if (in_size != nbytes)
            return mps_fail(err, MPS_ECORRUPT, "uncompressed chunk has %zu bytes, expected %zu", in_size, nbytes);
        memcpy(dst, in, nbytes);
    } else {
        unsigned long long content = ZSTD_getFrameContentSize(in, in_size);
        if (content != nbytes)
            return mps_fail(err, MPS_ECORRUPT, "zstd frame declares %llu bytes, expected %zu",
                            content == ZSTD_CONTENTSIZE_UNKNOWN || content == ZSTD_CONTENTSIZE_ERROR ? 0ull : content, nbytes);
        size_t n = ZSTD_decompressDCtx(dctx, dst, nbytes, in, in_size);
        if (ZSTD_isError(n) || n != nbytes)
            return mps_fail(err, MPS_ECORRUPT, "zstd frame does not decode: %s",
                            ZSTD_isError(n) ? ZSTD_getErrorName(n) : "short output");
    }
    if (shuffled)
        mps_unshuffle(scratch, raw, nbytes, elem_size);
    return 0;
}
