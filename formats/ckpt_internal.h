/* Internals of the checkpoint reader shared by ckpt_read.c and verify.c. */
#ifndef MPS_CKPT_INTERNAL_H
#define MPS_CKPT_INTERNAL_H

#include <hdf5.h>
#include <pthread.h>
#include <stdatomic.h>

#include "ckpt.h"

typedef struct {
    int state;        /* 0 not opened yet, 1 open, -1 failed (open_err says why) */
    hid_t dset;
    mps_kind kind;
    int tensor_index;
    mps_piece piece;
    mps_chunk_grid grid;
    uint64_t *sums;
    int owner;
    mps_err open_err;
} stored_piece;

struct mps_ckpt {
    char dir[4096];
    mps_manifest m;
    mps_owners *owners;
    int world;
    pthread_mutex_t lock;     /* guards files, pieces and every HDF5 call */
    hid_t *files;             /* per rank: -2 not opened yet */
    int *fds;                 /* per rank: a plain descriptor, so chunk bytes are read outside HDF5's lock */
    int64_t *file_bytes;      /* per rank: size recorded in the manifest, -1 if not listed */
    stored_piece **pieces[MPS_KIND_COUNT]; /* [kind][tensor] -> array over piece ids, lazily */
    _Atomic int64_t bytes_read;
};

void mps_ckpt_file_path(const mps_ckpt *c, int rank, char *buf, size_t size);
/* Opens rank's file if not yet open, checking size, format, checkpoint id and rank. */
int mps_ckpt_check_rank_file(mps_ckpt *c, int rank, mps_err *err);
int mps_ckpt_piece(mps_ckpt *c, mps_kind kind, int tensor, int id, stored_piece **out, mps_err *err);
/* Reads, decodes and checks chunk `id` of the piece into the scratch's chunk buffer. */
int mps_ckpt_read_chunk(mps_ckpt *c, stored_piece *sp, int64_t id, mps_read_scratch *s, mps_err *err);
void mps_flat_range_bbox(const mps_box *b, int64_t fb, int64_t fe, mps_box *out);

#endif
