/* Loading what one rank of a layout holds, from a checkpoint written under any layout: the
 * trainer's resume path. Each rank reads only the chunks that intersect its pieces. */
#ifndef MPS_LOAD_H
#define MPS_LOAD_H

#include "ckpt.h"

typedef struct {
    mps_kind kind;
    int tensor;
    mps_piece piece;
    float *data; /* piece.flat_end - piece.flat_begin elements */
} mps_loaded_piece;

typedef struct {
    mps_loaded_piece *pieces;
    int count;
    int64_t bytes; /* of data loaded */
} mps_rank_state;

/* Loads every piece `rank` holds under `layout` for the kinds in `kinds` (bitmask) that the
 * checkpoint stores, with `threads` readers (0: all cores). */
int mps_load_rank(mps_ckpt *c, const mps_layout *layout, int rank, unsigned kinds, int threads, mps_rank_state *out,
                  mps_err *err);
void mps_rank_state_free(mps_rank_state *s);

/* The same, streamed: nothing of the rank's state is held at once. Reader w gathers parts of at
 * most MPS_LOAD_PART elements of a piece into worker_bufs[w] (threads buffers of MPS_LOAD_PART
 * floats: pinned memory lets a GPU copy them without staging) and calls sink with them; the readers
 * run concurrently, so sink must be thread-safe, and it may block (a device copy) while the other
 * readers go on reading and decompressing. p->data is NULL in the sink. */
#define MPS_LOAD_PART ((int64_t)1 << 22) /* 16 MiB of fp32: each part reads its chunks once */
typedef int (*mps_piece_sink)(void *ctx, int worker, const mps_loaded_piece *p, int64_t fb, int64_t fe,
                              const float *data, mps_err *err);
int mps_load_rank_stream(mps_ckpt *c, const mps_layout *layout, int rank, unsigned kinds, int threads,
                         float *const *worker_bufs, mps_piece_sink sink, void *ctx, mps_err *err);

#endif
