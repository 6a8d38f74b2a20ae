/* Fuzz target: the chunk codec and the stored chunk shape.
 *
 * Input byte 0 picks the mode. Decode modes: bytes 1..3 give the chunk size the reader expects
 * (what the chunk grid says, at most 1 MiB here), bit 0-1 of byte 0 the HDF5 filter mask, bit 2
 * the element size; the rest is the stored chunk. mps_chunk_decode must refuse any frame that
 * does not decode to exactly that size, and the HDF5 filter (used by h5dump, h5py) must never
 * allocate what a frame claims beyond what its bytes can decode to. Grid mode (bit 3): dims and a
 * stored chunk shape for mps_chunk_grid_load, whose chunks must then tile the dataset. */
#include <hdf5.h>
#include <zstd.h>

#include "chunk.h"
#include "fuzz_common.h"
#include "zstd_filter.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static uint64_t get_u64(const uint8_t *p, size_t n)
{
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static void fuzz_decode(const uint8_t *data, size_t size)
{
    static ZSTD_DCtx *dctx;
    if (!dctx)
        dctx = ZSTD_createDCtx();
    unsigned mask = data[0] & 3u;
    size_t elem = (data[0] & 4) ? 2 : 4;
    size_t nbytes = (size_t)get_u64(data + 1, 3) & 0xfffff;
    const uint8_t *in = data + 4;
    size_t in_size = size - 4;
    uint8_t *raw = malloc(nbytes ? nbytes : 1), *scratch = malloc(nbytes ? nbytes : 1);
    FUZZ_ASSERT(raw && scratch, "malloc");
    mps_err err;
    mps_err_clear(&err);
    if (mps_chunk_decode(dctx, mask, in, in_size, elem, scratch, raw, nbytes, &err) != 0) {
        fuzz_check_err(&err, "decode");
        FUZZ_ASSERT(err.code == MPS_ECORRUPT, "code %d: %s", err.code, err.msg);
    } else if (mask & 2u) {
        FUZZ_ASSERT(in_size == nbytes, "stored chunk of %zu bytes accepted for %zu", in_size, nbytes);
    } else {
        /* accepted: the frame really is nbytes long; encoding what came out decodes the same.
         * mps_chunk_encode applies both filters (shuffle, then zstd), i.e. it writes a chunk of
         * filter mask 0, whatever mask the input chunk had: its output is decoded with mask 0.
         * (Decoding it with the input's mask would, for mask 1 "shuffle skipped", hand back the
         * shuffled bytes: a harness error, not a codec one.) */
        FUZZ_ASSERT(ZSTD_getFrameContentSize(in, in_size) == nbytes, "frame size");
        static ZSTD_CCtx *cctx;
        if (!cctx)
            cctx = ZSTD_createCCtx();
        size_t cap = ZSTD_compressBound(nbytes), packed;
        uint8_t *z = malloc(cap), *back = malloc(nbytes ? nbytes : 1), *plain = malloc(nbytes ? nbytes : 1);
        FUZZ_ASSERT(z && back && plain, "malloc");
        FUZZ_ASSERT(mps_chunk_encode(cctx, 1, raw, nbytes, elem, scratch, z, cap, &packed, &err) == 0, "%s", err.msg);
        FUZZ_ASSERT(mps_chunk_decode(dctx, 0, z, packed, elem, scratch, back, nbytes, &err) == 0, "%s", err.msg);
        FUZZ_ASSERT(memcmp(raw, back, nbytes) == 0, "round trip differs");
        /* the mask is honoured: with bit 0 (shuffle skipped) the same frame decodes to the bytes
         * as stored, the byte shuffle of raw (HDF5 leaves one-element chunks unshuffled) */
        FUZZ_ASSERT(mps_chunk_decode(dctx, 1, z, packed, elem, scratch, back, nbytes, &err) == 0, "%s", err.msg);
        if (nbytes / elem > 1)
            mps_shuffle(raw, plain, nbytes, elem);
        else
            memcpy(plain, raw, nbytes);
        FUZZ_ASSERT(memcmp(plain, back, nbytes) == 0, "shuffle-skipped decode differs from the stored bytes");
        free(z);
        free(back);
        free(plain);
    }
    free(raw);
    free(scratch);

    /* the HDF5 filter, reverse direction: HDF5 hands it the stored bytes in a buffer it owns */
    size_t buf_size = in_size ? in_size : 1;
    void *buf = H5allocate_memory(buf_size, 0);
    FUZZ_ASSERT(buf != NULL, "H5allocate_memory");
    memcpy(buf, in, in_size);
    size_t n = mps_zstd_filter_class.filter(H5Z_FLAG_REVERSE, 0, NULL, in_size, &buf_size, &buf);
    if (n != 0) {
        FUZZ_ASSERT(n == ZSTD_getFrameContentSize(in, in_size) && buf_size >= n, "filter output %zu", n);
        /* a zstd block of at most 128 KiB costs at least 4 bytes: no frame decodes to more */
        FUZZ_ASSERT(n / 32768 <= in_size, "filter decoded %zu bytes from %zu", n, in_size);
    }
    H5free_memory(buf);
}

static void fuzz_grid(const uint8_t *data, size_t size)
{
    if (size < 2 + 12 * MPS_MAX_DIMS)
        return;
    int ndim = 1 + data[1] % MPS_MAX_DIMS;
    int64_t dims[MPS_MAX_DIMS], chunk[MPS_MAX_DIMS];
    const uint8_t *p = data + 2;
    int64_t numel = 1;
    for (int i = 0; i < ndim; i++, p += 12) {
        /* dims come from the checked geometry (at most 2^31 along one axis, 2^51 in all);
         * the chunk shape comes from the file: any 64-bit value */
        dims[i] = (int64_t)(get_u64(p, 4) & 0x7fffffff) % ((int64_t)1 << (i == 0 ? 31 : 12));
        if (dims[i] && numel > ((int64_t)1 << 51) / dims[i])
            dims[i] = 1;
        chunk[i] = (int64_t)get_u64(p + 4, 8);
        numel *= dims[i];
    }
    mps_chunk_grid g;
    mps_err err;
    mps_err_clear(&err);
    if (mps_chunk_grid_load(&g, ndim, dims, chunk, &err) != 0) {
        fuzz_check_err(&err, "grid");
        return;
    }
    FUZZ_ASSERT(g.numel == numel && g.chunk_elems >= 1 && g.chunk_elems * 4 <= MPS_MAX_CHUNK_BYTES, "grid sizes");
    if (numel == 0)
        return;
    FUZZ_ASSERT(g.nchunks >= 1 && g.nchunks <= numel, "nchunks %lld for %lld elements", (long long)g.nchunks,
                (long long)numel);
    /* consecutive chunks tile [0, numel) in flat order, each within one chunk's elements */
    int64_t expect = 0, step = g.nchunks > 4096 ? g.nchunks / 4096 : 1;
    for (int64_t id = 0; id < g.nchunks; id = id == g.nchunks - 1 ? g.nchunks : (id + step < g.nchunks ? id + step : g.nchunks - 1)) {
        int64_t b, e, off[MPS_MAX_DIMS];
        mps_chunk_range(&g, id, &b, &e, off);
        if (step == 1)
            FUZZ_ASSERT(b == expect, "chunk %lld begins at %lld, expected %lld", (long long)id, (long long)b,
                        (long long)expect);
        FUZZ_ASSERT(b < e && e <= numel && e - b <= g.chunk_elems, "chunk %lld: [%lld, %lld)", (long long)id,
                    (long long)b, (long long)e);
        FUZZ_ASSERT(mps_chunk_of(&g, b) == id && mps_chunk_of(&g, e - 1) == id, "chunk_of %lld", (long long)id);
        for (int i = 0; i < ndim; i++)
            FUZZ_ASSERT(off[i] >= 0 && off[i] < (dims[i] ? dims[i] : 1), "offset");
        expect = e;
    }
    if (step == 1)
        FUZZ_ASSERT(expect == numel, "chunks cover %lld of %lld elements", (long long)expect, (long long)numel);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 4)
        return 0;
    if (data[0] & 8)
        fuzz_grid(data, size);
    else
        fuzz_decode(data, size);
    return 0;
}
