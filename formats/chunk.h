/* Chunks of a stored dataset and their codec.
 *
 * Every stored dataset holds the elements [flat_begin, flat_end) of a box in row-major order,
 * shaped as the box (a whole box) or 1-D (a ZeRO partition). Chunk shapes have the form
 * (1, ..., 1, k, d_{j+1}, ..., d_{n-1}): each chunk is then one contiguous run of the
 * dataset's flat order, which lets every reader map element ranges to chunks with arithmetic. */
#ifndef MPS_CHUNK_H
#define MPS_CHUNK_H

#include <stddef.h>
#include <stdint.h>
#include <zstd.h>

#include "err.h"
#include "model.h"

#define MPS_ZSTD_FILTER_ID 32015
#define MPS_MAX_CHUNK_BYTES ((int64_t)1 << 30) /* HDF5 requires < 4 GiB; we stay far below */

typedef struct {
    int ndim;
    int64_t dims[MPS_MAX_DIMS];
    int64_t chunk[MPS_MAX_DIMS];
    int split;        /* j: dims before j have chunk extent 1, dims after j are whole */
    int64_t D, T, k;  /* d_j, product of dims after j, chunk extent along j */
    int64_t per_outer; /* chunks per index of the outer dims: ceil(D / k) */
    int64_t nchunks;
    int64_t chunk_elems; /* k * T: elements in a full chunk (edge chunks are stored full size) */
    int64_t numel;
} mps_chunk_grid;

/* Chooses the chunk shape for a dataset of `dims` with at most target_elems per chunk (>= 1). */
void mps_chunk_grid_plan(mps_chunk_grid *g, int ndim, const int64_t *dims, int64_t target_elems);
/* Rebuilds the grid from a stored chunk shape; fails if it is not of the form above. */
int mps_chunk_grid_load(mps_chunk_grid *g, int ndim, const int64_t *dims, const int64_t *chunk, mps_err *err);
/* Flat element range of chunk `id` and its offset (in elements, per dimension) for HDF5. */
void mps_chunk_range(const mps_chunk_grid *g, int64_t id, int64_t *begin, int64_t *end, int64_t *offset);
/* The chunk holding flat element `flat` (0 <= flat < numel). */
int64_t mps_chunk_of(const mps_chunk_grid *g, int64_t flat);

/* Codec of one chunk, identical to HDF5's pipeline shuffle (filter 2) then zstd (filter 32015):
 * encode shuffles `raw` (nbytes, elements of elem_size bytes) and compresses one zstd frame. */
int mps_chunk_encode(ZSTD_CCtx *cctx, int level, const void *raw, size_t nbytes, size_t elem_size,
                     void *scratch, void *out, size_t out_cap, size_t *out_size, mps_err *err);
/* decode honours HDF5's filter mask (bit 0: shuffle skipped, bit 1: zstd skipped) and fails
 * unless the frame decodes to exactly nbytes. */
int mps_chunk_decode(ZSTD_DCtx *dctx, unsigned filter_mask, const void *in, size_t in_size, size_t elem_size,
                     void *scratch, void *raw, size_t nbytes, mps_err *err);
void mps_shuffle(const uint8_t *in, uint8_t *out, size_t nbytes, size_t elem_size);
void mps_unshuffle(const uint8_t *in, uint8_t *out, size_t nbytes, size_t elem_size);
uint64_t mps_xxh3(const void *data, size_t nbytes);

#endif
