/* Gradient reduction over DP: ZeRO-0 sums (during the backward where the comm backend can run
 * them under it, else after it), ZeRO-1/2/3 reduce-scatters into the owned partitions, and the
 * tied head's gradient summed between the first and the last stage. */
#include <stdlib.h>
#include <string.h>

#include "engine_internal.h"

/* ZeRO-0: the DP sums of the held tensors in [t0, t1) whose sums have not started this step:
 * started (comm.h allreduce_sum_start) or done now (allreduce_sum_many, else a call per tensor). */
static int sum_tensors(mps_engine *e, int t0, int t1, int start, mps_err *err)
{
    float **bufs = malloc(sizeof *bufs * (size_t)(t1 > t0 ? t1 - t0 : 1));
    int64_t *ns = malloc(sizeof *ns * (size_t)(t1 > t0 ? t1 - t0 : 1));
    int count = 0, rc = bufs && ns ? 0 : mps_fail(err, MPS_ENOMEM, "out of memory");
    for (int t = t0; rc == 0 && t < t1; t++) {
        if (!e->t[t].held || e->sum_started[t])
            continue;
        /* every held tensor has a gradient buffer, even one no token touched */
        if ((bufs[count] = mps_grad(e, t, err)) == NULL)
            rc = -1;
        ns[count++] = e->t[t].box_n;
        e->sum_started[t] = 1;
    }
    if (rc == 0 && count > 0) {
        if (start)
            rc = e->comm->allreduce_sum_start(e->comm->ctx, MPS_GROUP_DP, bufs, ns, count, err);
        else if (e->comm->allreduce_sum_many) /* one call for all */
            rc = e->comm->allreduce_sum_many(e->comm->ctx, MPS_GROUP_DP, bufs, ns, count, err);
        else
            for (int i = 0; i < count && rc == 0; i++)
                rc = e->comm->allreduce_sum(e->comm->ctx, MPS_GROUP_DP, bufs[i], ns[i], err);
        if (rc != 0)
            mps_wrap(err, "summing the gradients over DP");
    }
    free(bufs);
    free(ns);
    return rc;
}

int mps_grads_start_layer(mps_engine *e, int layer, mps_err *err)
{
    if (!e->overlap_dp || !e->last_backward)
        return 0;
    int t0 = mps_layer_tensor(layer, 0);
    return sum_tensors(e, t0, t0 + MPS_TENSORS_PER_LAYER, 1, err);
}

int mps_grads_start_rest(mps_engine *e, mps_err *err)
{
    if (!e->overlap_dp || !e->last_backward)
        return 0;
    return sum_tensors(e, 0, e->ntensors, 1, err);
}

/* ZeRO-2/3: after each micro-batch, the full gradients are reduce-scattered into the owned
 * partitions and freed (ZeRO-1 does this once per step, ZeRO-0 all-reduces instead). */
int mps_reduce_scatter_grads(mps_engine *e, int free_full, mps_err *err)
{
    for (int t = 0; t < e->ntensors; t++) {
        mps_tparam *p = &e->t[t];
        if (!p->held || !p->g)
            continue;
        int64_t on = p->opt.flat_end - p->opt.flat_begin;
        float *tmp = buf_new(e, on);
        if (!tmp)
            return mps_fail(err, MPS_ENOMEM, "rank %d: out of memory reducing %s", e->rank, p->spec.name);
        int rc = e->comm->reduce_scatter(e->comm->ctx, MPS_GROUP_DP, p->g, tmp, p->dp_counts, p->dp_displs, err);
        if (rc == 0)
            e->be->accumulate(e->be->ctx, p->g_shard, tmp, on);
        buf_free(e, tmp);
        if (rc != 0)
            return mps_wrap(err, "reducing the gradient of %s", p->spec.name);
        if (free_full) {
            buf_free(e, p->g);
            p->g = NULL;
        } else {
            buf_zero(e, p->g, p->box_n);
        }
    }
    return 0;
}

int mps_reduce_grads(mps_engine *e, mps_err *err)
{
    /* every held tensor has a gradient buffer, even one no token touched */
    for (int t = 0; t < e->ntensors; t++)
        if (e->t[t].held && e->L.zero == 0 && !mps_grad(e, t, err))
            return -1;
    if (e->L.zero == 0 && e->L.dp > 1) {
        /* the sums not started during the backward (all of them without overlap) */
        int rc = sum_tensors(e, 0, e->ntensors, e->overlap_dp, err);
        if (rc == 0 && e->overlap_dp)
            rc = e->comm->finish_started(e->comm->ctx, err);
        memset(e->sum_started, 0, (size_t)e->ntensors);
        if (rc != 0)
            return -1;
    } else if (e->L.zero >= 1) {
        if (e->L.dp == 1) {
            /* one replica: the partition is the whole box */
            for (int t = 0; t < e->ntensors; t++) {
                mps_tparam *p = &e->t[t];
                if (p->held && p->g) {
                    e->be->accumulate(e->be->ctx, p->g_shard, p->g, p->box_n);
                    if (e->L.zero >= 2) {
                        buf_free(e, p->g);
                        p->g = NULL;
                    } else {
                        buf_zero(e, p->g, p->box_n);
                    }
                }
            }
        } else if (e->L.zero == 1 && mps_reduce_scatter_grads(e, 0, err) != 0) {
            return -1;
        }
    }
    /* the tied head: the first and the last stage each hold wte; their gradients are summed */
    if (e->L.pp > 1 && (e->is_first || e->is_last)) {
        mps_tparam *p = &e->t[MPS_TENSOR_WTE];
        int64_t n = e->L.zero == 0 ? p->box_n : p->opt.flat_end - p->opt.flat_begin;
        float *mine = e->L.zero == 0 ? p->g : p->g_shard;
        float *theirs = buf_new(e, n), *copy = buf_new(e, n);
        if (!theirs || !copy) {
            buf_free(e, theirs);
            buf_free(e, copy);
            return mps_fail(err, MPS_ENOMEM, "rank %d: out of memory for the tied head", e->rank);
        }
        buf_copy(e, copy, mine, n);
        int peer = mps_layout_rank(&e->L, e->is_first ? e->L.pp - 1 : 0, e->me.dp, e->me.tp);
        int rc = e->comm->send(e->comm->ctx, peer, copy, n, TAG_TIED, err);
        if (rc == 0)
            rc = e->comm->recv(e->comm->ctx, peer, theirs, n, TAG_TIED, err);
        if (rc == 0)
            rc = e->comm->flush(e->comm->ctx, err);
        /* the same order on both stages (first + last) keeps the two copies bit-identical */
        if (rc == 0)
            e->be->add(e->be->ctx, mine, e->is_first ? copy : theirs, e->is_first ? theirs : copy, n);
        buf_free(e, theirs);
        buf_free(e, copy);
        if (rc != 0)
            return mps_wrap(err, "summing the tied head's gradient");
    }
    return 0;
}

