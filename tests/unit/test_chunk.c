/* Chunk codec: the vectorised shuffle equals HDF5's byte shuffle (reference loop), for every
 * length; encode/decode round trips; hostile frames are refused. */
#include <stdint.h>

#include "chunk.h"
#include "testutil.h"

static void reference_shuffle(const uint8_t *in, uint8_t *out, size_t nbytes, size_t elem)
{
    size_t n = nbytes / elem;
    for (size_t b = 0; b < elem; b++)
        for (size_t i = 0; i < n; i++)
            out[b * n + i] = in[i * elem + b];
    memcpy(out + n * elem, in + n * elem, nbytes - n * elem);
}

int main(void)
{
    size_t max = 4 * 1000 + 3;
    uint8_t *in = malloc(max), *a = malloc(max), *b = malloc(max), *back = malloc(max);
    for (size_t i = 0; i < max; i++)
        in[i] = (uint8_t)((i * 2654435761u) >> 13);
    for (size_t elem = 2; elem <= 4; elem += 2)
        for (size_t nbytes = 0; nbytes <= max; nbytes += (nbytes < 300 ? 1 : 97)) {
            reference_shuffle(in, a, nbytes, elem);
            mps_shuffle(in, b, nbytes, elem);
            CHECK_MSG(memcmp(a, b, nbytes) == 0, "shuffle elem %zu nbytes %zu", elem, nbytes);
            mps_unshuffle(b, back, nbytes, elem);
            CHECK_MSG(memcmp(in, back, nbytes) == 0, "unshuffle elem %zu nbytes %zu", elem, nbytes);
        }
    /* encode/decode */
    ZSTD_CCtx *cc = ZSTD_createCCtx();
    ZSTD_DCtx *dc = ZSTD_createDCtx();
    size_t nbytes = 4000, cap = ZSTD_compressBound(nbytes), packed;
    uint8_t *z = malloc(cap), *scratch = malloc(nbytes);
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_chunk_encode(cc, 1, in, nbytes, 4, scratch, z, cap, &packed, &err) == 0);
    CHECK(mps_chunk_decode(dc, 0, z, packed, 4, scratch, back, nbytes, &err) == 0 && memcmp(in, back, nbytes) == 0);
    /* a frame that decodes to another size than the chunk's is refused before decoding */
    mps_err_clear(&err);
    CHECK(mps_chunk_decode(dc, 0, z, packed, 4, scratch, back, nbytes - 4, &err) != 0 && err.code == MPS_ECORRUPT);
    /* garbage */
    memset(z, 0x41, 64);
    mps_err_clear(&err);
    CHECK(mps_chunk_decode(dc, 0, z, 64, 4, scratch, back, nbytes, &err) != 0 && err.code == MPS_ECORRUPT);
    /* filter mask: zstd skipped means stored shuffled bytes */
    mps_shuffle(in, z, nbytes, 4);
    CHECK(mps_chunk_decode(dc, 2, z, nbytes, 4, scratch, back, nbytes, &err) == 0 && memcmp(in, back, nbytes) == 0);
    /* filter mask 1 (shuffle skipped, as HDF5 records it): the frame holds the raw bytes as they
     * are. Re-encoding what it decodes to writes a chunk of mask 0 (both filters), which decodes
     * back to the same bytes with mask 0 and to their shuffle with mask 1 (fuzz_chunk finding,
     * corpus/chunk/shuffle_skipped: the harness had re-decoded with the input's mask). */
    uint8_t *raw = malloc(nbytes), *shuf = malloc(nbytes);
    size_t plain = ZSTD_compress(z, cap, in, nbytes, 1);
    CHECK(!ZSTD_isError(plain));
    mps_err_clear(&err);
    CHECK(mps_chunk_decode(dc, 1, z, plain, 4, scratch, raw, nbytes, &err) == 0 && memcmp(in, raw, nbytes) == 0);
    /* the same frame under mask 0 is taken as shuffled bytes */
    CHECK(mps_chunk_decode(dc, 0, z, plain, 4, scratch, back, nbytes, &err) == 0);
    mps_unshuffle(in, shuf, nbytes, 4);
    CHECK(memcmp(shuf, back, nbytes) == 0);
    CHECK(mps_chunk_encode(cc, 1, raw, nbytes, 4, scratch, z, cap, &packed, &err) == 0);
    CHECK(mps_chunk_decode(dc, 0, z, packed, 4, scratch, back, nbytes, &err) == 0 && memcmp(raw, back, nbytes) == 0);
    CHECK(mps_chunk_decode(dc, 1, z, packed, 4, scratch, back, nbytes, &err) == 0);
    mps_shuffle(raw, shuf, nbytes, 4);
    CHECK(memcmp(shuf, back, nbytes) == 0 && memcmp(raw, back, nbytes) != 0);
    /* one element (and a partial one): HDF5 does not shuffle, so encode leaves it as it is and
     * both masks decode the same */
    for (size_t small = 4; small <= 7; small += 3) {
        CHECK(mps_chunk_encode(cc, 1, in, small, 4, scratch, z, cap, &packed, &err) == 0);
        for (unsigned m = 0; m < 2; m++)
            CHECK_MSG(mps_chunk_decode(dc, m, z, packed, 4, scratch, back, small, &err) == 0 &&
                          memcmp(in, back, small) == 0, "%zu bytes, mask %u", small, m);
    }
    free(raw); free(shuf);
    ZSTD_freeCCtx(cc);
    ZSTD_freeDCtx(dc);
    free(in); free(a); free(b); free(back); free(z); free(scratch);
    TEST_DONE();
}
