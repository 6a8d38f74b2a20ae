/* A parallel layout: DP x PP x TP with a ZeRO stage, and the pipeline stage boundaries.
 * Rank order (Megatron style): rank = (pp_rank * dp + dp_rank) * tp + tp_rank, TP fastest. */
#ifndef MPS_LAYOUT_H
#define MPS_LAYOUT_H

#include "err.h"
#include "model.h"

#define MPS_MAX_PP 256
#define MPS_MAX_PAR 65536 /* upper bound for dp, tp; world must stay below 2^31 */

typedef struct {
    int dp, pp, tp;
    int zero;            /* 0..3 */
    int explicit_stages; /* 1 if stage_first came from the layout string */
    int stage_first[MPS_MAX_PP + 1]; /* stage s holds layers [stage_first[s], stage_first[s+1]) */
} mps_layout;

typedef struct { int pp, dp, tp; } mps_coords;

/* Parses "dp=2,pp=2,tp=2,zero=1[,stages=5:7]" (any order; missing keys mean 1, zero 0).
 * stages= gives the number of layers of each stage, separated by ':'. Validates against cfg. */
int mps_layout_parse(const char *text, const mps_config *cfg, mps_layout *out, mps_err *err);
/* Fills stage_first with an even split (earlier stages get the extra layers) unless explicit. */
int mps_layout_validate(mps_layout *L, const mps_config *cfg, mps_err *err);
/* Writes the canonical string form, e.g. "dp=2,pp=2,tp=2,zero=1,stages=6:6". */
void mps_layout_format(const mps_layout *L, char *buf, size_t size);

static inline int mps_layout_world(const mps_layout *L) { return L->dp * L->pp * L->tp; }
static inline mps_coords mps_layout_coords(const mps_layout *L, int rank)
{
    mps_coords c = { rank / (L->tp * L->dp), (rank / L->tp) % L->dp, rank % L->tp };
    return c;
}
static inline int mps_layout_rank(const mps_layout *L, int pp, int dp, int tp)
{
    return (pp * L->dp + dp) * L->tp + tp;
}
/* The pipeline stage holding layer l. */
int mps_layout_stage_of_layer(const mps_layout *L, int layer);

#endif
