/* The engine's state to and from checkpoints: a rank loads its pieces from a checkpoint of any
 * layout (the reader intersects boxes, so no offline reshard is needed) and writes the pieces it
 * owns under its own layout. */
#include <stdlib.h>
#include <string.h>

#include "engine_internal.h"
#include "init.h"
#include "reshard/load.h"

/* A part of a loaded piece goes straight to the engine's buffer (a device copy from the reader's
 * pinned buffer on CUDA, while the other readers go on reading and decompressing). */
static int load_sink(void *ctx, int worker, const mps_loaded_piece *lp, int64_t fb, int64_t fe, const float *data,
                     mps_err *err)
{
    (void)worker; (void)err;
    mps_engine *e = ctx;
    /* master (fp32) is partitioned like the optimizer state; where it exists it is the exact value
     * of the weights (param may be a bf16 rounding of it), and only it is loaded: into the weights */
    int64_t base, end;
    float *dst = mps_engine_state_buf(e, lp->kind == MPS_KIND_MASTER ? MPS_KIND_PARAM : lp->kind, lp->tensor, &base, &end);
    if (dst)
        e->be->from_host(e->be->ctx, dst + (fb - base), data, (size_t)(fe - fb) * sizeof(float));
    return 0;
}

int mps_engine_load(mps_engine *e, mps_ckpt *c, int threads, mps_err *err)
{
    const mps_manifest *m = mps_ckpt_manifest(c);
    if (memcmp(&m->cfg, &e->cfg, sizeof e->cfg) != 0)
        return mps_fail(err, MPS_EUSAGE, "%s: the checkpoint's model differs from the engine's", mps_ckpt_dir(c));
    const int have_master = (m->kinds >> MPS_KIND_MASTER) & 1;
    unsigned want = 1u << (have_master ? MPS_KIND_MASTER : MPS_KIND_PARAM) | 1u << MPS_KIND_ADAM_M |
                    1u << MPS_KIND_ADAM_V;
    /* streamed through one pinned buffer per reader: host memory does not grow with the model */
    float **bufs = calloc((size_t)threads, sizeof *bufs);
    int rc = bufs ? 0 : mps_fail(err, MPS_ENOMEM, "out of memory");
    for (int i = 0; rc == 0 && i < threads; i++)
        if (!(bufs[i] = e->be->alloc_host(e->be->ctx, (size_t)MPS_LOAD_PART * sizeof(float))))
            rc = mps_fail(err, MPS_ENOMEM, "rank %d: out of host memory for the load buffers", e->rank);
    if (rc == 0)
        rc = mps_load_rank_stream(c, &e->L, e->rank, want, threads, bufs, load_sink, e, err);
    for (int i = 0; bufs && i < threads; i++)
        if (bufs[i])
            e->be->release_host(e->be->ctx, bufs[i]);
    free(bufs);
    if (rc != 0 || e->be->sync(e->be->ctx, err) != 0)
        return -1;
    /* ZeRO-1/2 with master weights: each replica set only its partition from master; gather the rest */
    if (have_master && e->L.zero >= 1 && e->L.zero < 3 && e->L.dp > 1)
        return mps_gather_boxes(e, err);
    return 0;
}

float *mps_engine_state_buf(const mps_engine *e, mps_kind kind, int tensor, int64_t *begin, int64_t *end)
{
    const mps_tparam *p = &e->t[tensor];
    *begin = *end = 0;
    if (!p->held)
        return NULL;
    switch (kind) {
    case MPS_KIND_PARAM:
        *begin = e->L.zero >= 3 ? p->param.flat_begin : 0;
        *end = e->L.zero >= 3 ? p->param.flat_end : p->box_n;
        return e->L.zero >= 3 ? p->w_shard : p->w;
    case MPS_KIND_ADAM_M:
    case MPS_KIND_ADAM_V:
        *begin = p->opt.flat_begin;
        *end = p->opt.flat_end;
        return kind == MPS_KIND_ADAM_M ? p->m : p->v;
    default: return NULL;
    }
}

static int gather_state(void *ctx, int worker, mps_kind kind, int tensor, const mps_box *box, int64_t fb, int64_t fe,
                        float *dst, mps_err *err)
{
    (void)worker; (void)box;
    mps_engine *e = ctx;
    int64_t base, end;
    const float *src = mps_engine_state_buf(e, kind, tensor, &base, &end);
    if (!src || fb < base || fe > end)
        return mps_fail(err, MPS_EFAIL, "rank %d does not hold %s %s [%lld, %lld)", e->rank, mps_kind_name(kind),
                        e->t[tensor].spec.name, (long long)fb, (long long)fe);
    e->be->to_host(e->be->ctx, dst, src + (fb - base), (size_t)(fe - fb) * sizeof(float));
    return 0;
}

int mps_engine_write_shard(mps_engine *e, const char *dir, const mps_manifest *m, mps_err *err)
{
    mps_source src = { .ctx = e, .begin_tensor = mps_source_no_begin, .end_tensor = mps_source_no_end,
                       .gather = gather_state };
    mps_write_opts wo = { .threads = 2, .quiet = 1, .label = "save" };
    int rank = e->rank;
    return mps_write_shards(dir, m, &rank, 1, &src, &wo, err);
}
