#include "geometry.h"

#include <stdlib.h>
#include <string.h>

int64_t mps_box_numel(const mps_box *box)
{
    int64_t n = 1;
    for (int i = 0; i < box->ndim; i++)
        n *= box->cnt[i];
    return n;
}

void mps_box_whole(const mps_tensor_spec *spec, mps_box *out)
{
    memset(out, 0, sizeof *out);
    out->ndim = spec->ndim;
    for (int i = 0; i < spec->ndim; i++)
        out->cnt[i] = spec->shape[i];
}

int mps_box_intersect(const mps_box *a, const mps_box *b, mps_box *out)
{
    out->ndim = a->ndim;
    for (int i = 0; i < a->ndim; i++) {
        int64_t lo = a->off[i] > b->off[i] ? a->off[i] : b->off[i];
        int64_t ha = a->off[i] + a->cnt[i], hb = b->off[i] + b->cnt[i];
        int64_t hi = ha < hb ? ha : hb;
        if (hi <= lo)
            return 0;
        out->off[i] = lo;
        out->cnt[i] = hi - lo;
    }
    return 1;
}

int mps_kind_dp_sharded(int zero, mps_kind kind)
{
    switch (kind) {
    case MPS_KIND_PARAM: return zero >= 3;
    case MPS_KIND_GRAD: return zero >= 2;
    default: return zero >= 1;
    }
}

int mps_stage_holds(const mps_config *cfg, const mps_layout *L, int stage, const mps_tensor_spec *spec)
{
    (void)cfg;
    switch (spec->place) {
    case MPS_PLACE_EMBED: return stage == 0 || (spec->tied_head && stage == L->pp - 1);
    case MPS_PLACE_FINAL: return stage == L->pp - 1;
    default: return mps_layout_stage_of_layer(L, spec->layer) == stage;
    }
}

/* The piece for TP part `tp_part` and ZeRO part `dp_part` (both already reduced to 0 when the
 * tensor or kind is not split that way). */
static void make_piece(const mps_layout *L, mps_kind kind, const mps_tensor_spec *s, int tp_part, int dp_part,
                       mps_piece *out)
{
    memset(out, 0, sizeof *out);
    out->held = 1;
    mps_box_whole(s, &out->box);
    if (s->tp_dim >= 0 && L->tp > 1) {
        mps_split(s->shape[s->tp_dim], L->tp, tp_part, &out->box.off[s->tp_dim], &out->box.cnt[s->tp_dim]);
        out->tp_part = tp_part;
    }
    int64_t n = mps_box_numel(&out->box);
    out->flat_begin = 0;
    out->flat_end = n;
    if (mps_kind_dp_sharded(L->zero, kind) && L->dp > 1) {
        int64_t count;
        mps_split(n, L->dp, dp_part, &out->flat_begin, &count);
        out->flat_end = out->flat_begin + count;
        out->dp_part = dp_part;
    }
}

void mps_geometry(const mps_config *cfg, const mps_layout *L, int rank, mps_kind kind, int tensor, mps_piece *out)
{
    mps_tensor_spec s;
    mps_tensor_spec_get(cfg, tensor, &s);
    mps_coords c = mps_layout_coords(L, rank);
    if (!mps_stage_holds(cfg, L, c.pp, &s)) {
        memset(out, 0, sizeof *out);
        out->box.ndim = s.ndim;
        return;
    }
    int tp_part = (s.tp_dim >= 0) ? c.tp : 0;
    int dp_part = mps_kind_dp_sharded(L->zero, kind) ? c.dp : 0;
    make_piece(L, kind, &s, tp_part, dp_part, out);
}

static int tp_parts(const mps_layout *L, const mps_tensor_spec *s) { return s->tp_dim >= 0 ? L->tp : 1; }
static int dp_parts(const mps_layout *L, mps_kind kind) { return mps_kind_dp_sharded(L->zero, kind) ? L->dp : 1; }

int mps_piece_count(const mps_config *cfg, const mps_layout *L, mps_kind kind, int tensor)
{
    mps_tensor_spec s;
    mps_tensor_spec_get(cfg, tensor, &s);
    return tp_parts(L, &s) * dp_parts(L, kind);
}

int64_t mps_nonempty_piece_count(const mps_config *cfg, const mps_layout *L, mps_kind kind, int tensor)
{
    mps_tensor_spec s;
    mps_tensor_spec_get(cfg, tensor, &s);
    int64_t count = 0;
    for (int x = 0; x < tp_parts(L, &s); x++) {
        mps_piece p;
        make_piece(L, kind, &s, x, 0, &p);
        int64_t n = mps_box_numel(&p.box);
        /* a balanced split of n over dp leaves min(n, dp) parts non-empty */
        count += mps_kind_dp_sharded(L->zero, kind) && L->dp > 1 ? (n < L->dp ? n : L->dp) : (n > 0);
    }
    return count;
}

int mps_piece_by_id(const mps_config *cfg, const mps_layout *L, mps_kind kind, int tensor, int id, mps_piece *out)
{
    mps_tensor_spec s;
    mps_tensor_spec_get(cfg, tensor, &s);
    int ndp = dp_parts(L, kind);
    if (id < 0 || id >= tp_parts(L, &s) * ndp)
        return -1;
    make_piece(L, kind, &s, id / ndp, id % ndp, out);
    return 0;
}

struct mps_owners {
    int ntensors;
    int *offset[MPS_KIND_COUNT]; /* offset[kind][tensor]: index of the tensor's first piece in owner[kind] */
    int *owner[MPS_KIND_COUNT];  /* owner rank per piece, -1 for kinds not stored */
    int64_t *bytes;              /* per rank */
    int world;
};

void mps_owners_free(mps_owners *o)
{
    if (!o)
        return;
    for (int k = 0; k < MPS_KIND_COUNT; k++) {
        free(o->offset[k]);
        free(o->owner[k]);
    }
    free(o->bytes);
    free(o);
}

/* Greedy owner choice. For every stored kind in the order param, master, adam_m, adam_v, every
 * tensor in catalogue order and every piece in id order, the owner is the holder that has been
 * given the fewest bytes so far (ties: the lowest rank). Holders are enumerated over the stages
 * that hold the tensor, the DP ranks (all of them unless the kind is ZeRO-sharded) and the TP
 * ranks (all of them when the tensor is replicated over TP). */
int mps_owners_build(const mps_config *cfg, const mps_layout *L, unsigned kinds, mps_owners **out, mps_err *err)
{
    mps_owners *o = calloc(1, sizeof *o);
    int world = mps_layout_world(L), nt = mps_tensor_count(cfg);
    if (!o || !(o->bytes = calloc((size_t)world, sizeof *o->bytes)))
        goto oom;
    o->ntensors = nt;
    o->world = world;
    for (int k = 0; k < MPS_KIND_COUNT; k++) {
        if (!(kinds & (1u << k)))
            continue;
        if (!(o->offset[k] = malloc(sizeof(int) * (size_t)(nt + 1))))
            goto oom;
        int64_t total = 0;
        for (int t = 0; t < nt; t++) {
            o->offset[k][t] = (int)total;
            total += mps_piece_count(cfg, L, (mps_kind)k, t);
            if (total > (1 << 30))
                return mps_owners_free(o), mps_fail(err, MPS_EUSAGE, "layout has too many pieces");
        }
        o->offset[k][nt] = (int)total;
        if (!(o->owner[k] = malloc(sizeof(int) * (size_t)(total ? total : 1))))
            goto oom;
        for (int t = 0; t < nt; t++) {
            mps_tensor_spec s;
            mps_tensor_spec_get(cfg, t, &s);
            int sharded = mps_kind_dp_sharded(L->zero, (mps_kind)k) && L->dp > 1;
            int split = s.tp_dim >= 0;
            int np = mps_piece_count(cfg, L, (mps_kind)k, t);
            for (int id = 0; id < np; id++) {
                mps_piece p;
                mps_piece_by_id(cfg, L, (mps_kind)k, t, id, &p);
                int64_t nbytes = (p.flat_end - p.flat_begin) * 4;
                int best = -1;
                for (int st = 0; st < L->pp; st++) {
                    if (!mps_stage_holds(cfg, L, st, &s))
                        continue;
                    for (int d = sharded ? p.dp_part : 0; d < (sharded ? p.dp_part + 1 : L->dp); d++)
                        for (int x = split ? p.tp_part : 0; x < (split ? p.tp_part + 1 : L->tp); x++) {
                            int r = mps_layout_rank(L, st, d, x);
                            if (best < 0 || o->bytes[r] < o->bytes[best] || (o->bytes[r] == o->bytes[best] && r < best))
                                best = r;
                        }
                }
                o->owner[k][o->offset[k][t] + id] = best;
                if (best >= 0)
                    o->bytes[best] += nbytes;
            }
        }
    }
    *out = o;
    return 0;
oom:
    mps_owners_free(o);
    return mps_fail(err, MPS_ENOMEM, "out of memory building the owner table");
}

int mps_owner_of(const mps_owners *o, mps_kind kind, int tensor, int piece_id)
{
    if (!o->owner[kind] || tensor < 0 || tensor >= o->ntensors)
        return -1;
    int i = o->offset[kind][tensor] + piece_id;
    if (piece_id < 0 || i >= o->offset[kind][tensor + 1])
        return -1;
    return o->owner[kind][i];
}

int64_t mps_owner_bytes(const mps_owners *o, int rank) { return o->bytes[rank]; }

int64_t mps_box_row_origin(const mps_tensor_spec *spec, const mps_box *box, int64_t row)
{
    int n = box->ndim;
    int64_t rem = row, origin = 0, stride = 1, coord[MPS_MAX_DIMS];
    for (int d = n - 2; d >= 0; d--) {
        coord[d] = rem % box->cnt[d];
        rem /= box->cnt[d];
    }
    for (int d = n - 1; d >= 0; d--) {
        origin += (box->off[d] + (d == n - 1 ? 0 : coord[d])) * stride;
        stride *= spec->shape[d];
    }
    return origin;
}

void mps_box_extract(const float *tensor, const mps_tensor_spec *spec, const mps_box *box, int64_t fb, int64_t fe,
                     float *dst)
{
    int64_t L = box->cnt[box->ndim - 1];
    for (int64_t row = fb / L; row * L < fe; row++) {
        int64_t src = mps_box_row_origin(spec, box, row);
        int64_t s0 = row * L > fb ? row * L : fb, s1 = (row + 1) * L < fe ? (row + 1) * L : fe;
        memcpy(dst + (s0 - fb), tensor + src + (s0 - row * L), (size_t)(s1 - s0) * sizeof(float));
    }
}
