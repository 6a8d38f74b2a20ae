/* The one geometry function: which part of each canonical tensor a rank holds, for a state kind,
 * under a layout. shard, reshard, export, train and inspect all call mps_geometry(). */
#ifndef MPS_GEOMETRY_H
#define MPS_GEOMETRY_H

#include <stdint.h>

#include "err.h"
#include "layout.h"
#include "model.h"

/* A box of a canonical tensor: offset and count per dimension. */
typedef struct {
    int ndim;
    int64_t off[MPS_MAX_DIMS];
    int64_t cnt[MPS_MAX_DIMS];
} mps_box;

/* What one rank holds of one tensor for one state kind. */
typedef struct {
    int held;            /* 0: this rank's pipeline stage does not hold the tensor */
    mps_box box;         /* the TP/PP box (the whole tensor when it is not split by TP) */
    int64_t flat_begin;  /* the ZeRO partition: elements [flat_begin, flat_end) of the box in */
    int64_t flat_end;    /* row-major order; the whole box when the kind is not sharded over DP */
    int tp_part;         /* which TP part (0 when replicated over TP) */
    int dp_part;         /* which ZeRO part (0 when not sharded over DP) */
} mps_piece;

/* Balanced split of n items into `parts`: part i gets n/parts items, the first n%parts one more. */
static inline void mps_split(int64_t n, int64_t parts, int64_t index, int64_t *begin, int64_t *count)
{
    int64_t base = n / parts, extra = n % parts;
    *begin = index * base + (index < extra ? index : extra);
    *count = base + (index < extra ? 1 : 0);
}

int64_t mps_box_numel(const mps_box *box);
/* The box covering the whole canonical tensor. */
void mps_box_whole(const mps_tensor_spec *spec, mps_box *out);
/* Intersection of two boxes of the same tensor; returns 0 if empty. */
int mps_box_intersect(const mps_box *a, const mps_box *b, mps_box *out);

/* 1 if ZeRO stage `zero` shards `kind` over the DP group: stage 1 master + Adam moments,
 * stage 2 also gradients, stage 3 also parameters. */
int mps_kind_dp_sharded(int zero, mps_kind kind);
/* 1 if the pipeline stage holds the tensor (wte: first stage, and last stage as the tied head). */
int mps_stage_holds(const mps_config *cfg, const mps_layout *L, int stage, const mps_tensor_spec *spec);

/* THE geometry function: (model, layout, rank, kind, tensor) -> the piece that rank holds. */
void mps_geometry(const mps_config *cfg, const mps_layout *L, int rank, mps_kind kind, int tensor, mps_piece *out);

/* Number of distinct pieces of a tensor for a kind (TP parts x ZeRO parts), and piece `id`
 * (id = tp_part * dp_parts + dp_part) with a representative rank that holds it. */
int mps_piece_count(const mps_config *cfg, const mps_layout *L, mps_kind kind, int tensor);
/* How many of those hold at least one element. A rank holds at most one piece of a (kind, tensor),
 * so a checkpoint's non-empty pieces of one (kind, tensor) have as many distinct owners, each with
 * a file: a reader checks this against the manifest's file list before sizing anything by the
 * layout. */
int64_t mps_nonempty_piece_count(const mps_config *cfg, const mps_layout *L, mps_kind kind, int tensor);
int mps_piece_by_id(const mps_config *cfg, const mps_layout *L, mps_kind kind, int tensor, int id, mps_piece *out);
static inline int mps_piece_id(const mps_config *cfg, const mps_layout *L, mps_kind kind, int tensor, const mps_piece *p)
{
    (void)cfg; (void)tensor;
    return p->tp_part * (mps_kind_dp_sharded(L->zero, kind) ? L->dp : 1) + p->dp_part;
}

/* Owners: a piece held by several ranks (replicas over DP, TP, or the tied head's two stages)
 * is stored once, by one of them. Owners are chosen greedily so that every rank stores about
 * the same number of bytes (FORMAT.md gives the exact rule); the choice is deterministic. */
typedef struct mps_owners mps_owners;
/* kinds: the stored kinds (a bitmask of 1 << mps_kind). */
int mps_owners_build(const mps_config *cfg, const mps_layout *L, unsigned kinds, mps_owners **out, mps_err *err);
int mps_owner_of(const mps_owners *o, mps_kind kind, int tensor, int piece_id);
/* Bytes (at 4 bytes per element) stored by each rank's file. */
int64_t mps_owner_bytes(const mps_owners *o, int rank);
void mps_owners_free(mps_owners *o);

/* Canonical flat index of the first element of row `row` of box (rows run along the last dimension). */
int64_t mps_box_row_origin(const mps_tensor_spec *spec, const mps_box *box, int64_t row);
/* Copies elements [fb, fe) (row-major within box) of a dense canonical tensor into dst. */
void mps_box_extract(const float *tensor, const mps_tensor_spec *spec, const mps_box *box, int64_t fb, int64_t fe,
                     float *dst);

#endif
