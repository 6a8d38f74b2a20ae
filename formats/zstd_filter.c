#include "zstd_filter.h"

#include <zstd.h>

/* Decoded chunks are capped: HDF5 chunks are < 4 GiB, and a frame that claims more is hostile. */
#define MAX_DECODED ((unsigned long long)4 << 30)
/* The filter cannot know the chunk's size, so the output buffer is sized by the frame's claim;
 * the claim is first bounded by what the stored bytes can decode to at all: a zstd block yields
 * at most 128 KiB and costs at least 4 bytes (3-byte header, 1 byte of an RLE block). A frame
 * claiming more is refused before anything is allocated. */
#define MAX_RATIO 32768ull

static size_t zstd_filter(unsigned flags, size_t cd_nelmts, const unsigned cd_values[], size_t nbytes,
                          size_t *buf_size, void **buf)
{
    if (flags & H5Z_FLAG_REVERSE) {
        unsigned long long n = ZSTD_getFrameContentSize(*buf, nbytes);
        if (n == ZSTD_CONTENTSIZE_ERROR || n == ZSTD_CONTENTSIZE_UNKNOWN || n == 0 || n > MAX_DECODED ||
            n / MAX_RATIO > (unsigned long long)nbytes)
            return 0;
        void *out = H5allocate_memory((size_t)n, 0);
        if (!out)
            return 0;
        size_t got = ZSTD_decompress(out, (size_t)n, *buf, nbytes);
        if (ZSTD_isError(got) || got != n) {
            H5free_memory(out);
            return 0;
        }
        H5free_memory(*buf);
        *buf = out;
        *buf_size = (size_t)n;
        return (size_t)n;
    }
    int level = cd_nelmts > 0 ? (int)cd_values[0] : 3;
    size_t cap = ZSTD_compressBound(nbytes);
    void *out = H5allocate_memory(cap, 0);
    if (!out)
        return 0;
    size_t n = ZSTD_compress(out, cap, *buf, nbytes, level);
    if (ZSTD_isError(n)) {
        H5free_memory(out);
        return 0;
    }
    H5free_memory(*buf);
    *buf = out;
    *buf_size = cap;
    return n;
}

const H5Z_class2_t mps_zstd_filter_class = {
    H5Z_CLASS_T_VERS, (H5Z_filter_t)32015, 1, 1, "zstd", NULL, NULL, zstd_filter,
};

int mps_zstd_filter_register(void)
{
    if (H5Zfilter_avail((H5Z_filter_t)32015) > 0)
        return 0;
    return H5Zregister(&mps_zstd_filter_class) < 0 ? -1 : 0;
}
