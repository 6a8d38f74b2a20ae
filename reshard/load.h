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

#endif
