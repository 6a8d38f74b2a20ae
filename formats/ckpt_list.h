/* Where a checkpoint stores each tensor: for every stored kind and tensor, the pieces with their
 * owner's file, dataset, box and flat range (FORMAT.md sections 4 and 6). From the manifest and the
 * geometry alone: no shard file is opened. */
#ifndef MPS_CKPT_LIST_H
#define MPS_CKPT_LIST_H

#include "ckpt.h"

typedef struct {
    mps_kind kind;
    int tensor;
    const mps_tensor_spec *spec;
    int rank;                  /* the owner, whose file stores the piece */
    char file[32];             /* "rank-00003.h5" */
    char dataset[MPS_NAME_MAX + 16]; /* "/adam_m/h.3.qkvw" */
    mps_box box;
    int64_t flat_begin, flat_end; /* of the box, row-major; the whole box unless ZeRO shards the kind */
    int whole_box;             /* the dataset has the box's shape (else it is 1-D: the flat range) */
    int64_t bytes;             /* of the piece's elements (f32), uncompressed */
} mps_listed_piece;

/* Calls fn for every stored (non-empty) piece of the checkpoint c in the order kind, tensor, piece
 * id; only tensor `tensor` when >= 0, only kind `kind` when >= 0. Returns the number of pieces
 * listed, or -1 when fn fails (it sets err). */
typedef int (*mps_piece_fn)(void *ctx, const mps_listed_piece *p, mps_err *err);
int mps_ckpt_list(mps_ckpt *c, int tensor, int kind, mps_piece_fn fn, void *ctx, mps_err *err);

#endif
