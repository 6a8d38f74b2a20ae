/* Gradient reduction over DP: ZeRO-0 sums and ZeRO-1 reduce-scatters (started during the step's
 * last backward pass where the comm backend can run them under it, else after it), ZeRO-2/3
 * reduce-scatters in every micro-batch (layer by layer under the backward where the backend can,
 * else after it), and the tied head's gradient summed between the first and the last stage. */
#include <stdlib.h>
#include <string.h>

#include "engine_internal.h"

/* ZeRO-0: the DP sums of the held tensors in [t0, t1) whose sums have not started this step:
 * started (comm.h can_start) or done now (allreduce_sum_many, else a call per tensor). */
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
        if (e->comm->allreduce_sum_many)
            rc = e->comm->allreduce_sum_many(e->comm->ctx, MPS_GROUP_DP, bufs, ns, count, start, err);
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

/* ZeRO >= 1: the DP reduce-scatters of the full gradients of the held tensors in [t0, t1) not
 * started this step, each into a temporary of its owned partition (e->scatter_tmp), started or
 * done now; scatter_done() adds them to the partitions' gradients. */
static int scatter_tensors(mps_engine *e, int t0, int t1, int start, mps_err *err)
{
    int n = t1 > t0 ? t1 - t0 : 1;
    const float **ins = malloc(sizeof *ins * (size_t)n);
    float **outs = malloc(sizeof *outs * (size_t)n);
    const int64_t **counts = malloc(sizeof *counts * (size_t)n), **displs = malloc(sizeof *displs * (size_t)n);
    int count = 0, rc = ins && outs && counts && displs ? 0 : mps_fail(err, MPS_ENOMEM, "out of memory");
    for (int t = t0; rc == 0 && t < t1; t++) {
        mps_tparam *p = &e->t[t];
        if (!p->held || !p->g || e->sum_started[t])
            continue;
        if ((e->scatter_tmp[t] = buf_new(e, p->opt.flat_end - p->opt.flat_begin)) == NULL) {
            rc = mps_fail(err, MPS_ENOMEM, "rank %d: out of memory reducing %s", e->rank, p->spec.name);
            break;
        }
        ins[count] = p->g;
        outs[count] = e->scatter_tmp[t];
        counts[count] = p->dp_counts;
        displs[count++] = p->dp_displs;
        e->sum_started[t] = 1;
    }
    if (rc == 0 && count > 0) {
        if (e->comm->reduce_scatter_many)
            rc = e->comm->reduce_scatter_many(e->comm->ctx, MPS_GROUP_DP, ins, outs, counts, displs, count, start, err);
        else
            for (int i = 0; i < count && rc == 0; i++)
                rc = e->comm->reduce_scatter(e->comm->ctx, MPS_GROUP_DP, ins[i], outs[i], counts[i], displs[i], err);
        if (rc != 0)
            mps_wrap(err, "reducing the gradients over DP");
    }
    free(ins);
    free(outs);
    free(counts);
    free(displs);
    return rc;
}

/* ZeRO >= 1: `part` (the reduced partition) added to the partition's gradient, and the full
 * gradient zeroed for the next micro-batches (ZeRO-1) or freed (ZeRO-2/3, free_full). */
static void to_shard(mps_engine *e, mps_tparam *p, const float *part, int free_full)
{
    e->be->accumulate(e->be->ctx, p->g_shard, part, p->opt.flat_end - p->opt.flat_begin);
    if (free_full) {
        buf_free(e, p->g);
        p->g = NULL;
    } else {
        buf_zero(e, p->g, p->box_n);
    }
}

/* The reduce-scatters are complete: each partition's sum goes to its gradient (to_shard). */
static void scatter_done(mps_engine *e, int free_full)
{
    for (int t = 0; t < e->ntensors; t++) {
        if (!e->scatter_tmp[t])
            continue;
        to_shard(e, &e->t[t], e->scatter_tmp[t], free_full);
        buf_free(e, e->scatter_tmp[t]);
        e->scatter_tmp[t] = NULL;
    }
    memset(e->sum_started, 0, (size_t)e->ntensors);
}

/* ZeRO-2/3 under the backward, in every micro-batch: a layer's reduce-scatters start once its
 * backward is done, and the ones started before (the layer above's, which had this layer's
 * backward to run) are completed first: their sums added to the partitions and their full
 * gradients freed. So about two layers' full gradients exist at a time (and the embedding's,
 * final only at the end), not the whole stage's. final: the micro-batch's backward is over,
 * everything is completed. */
static int scatter_under_backward(mps_engine *e, int t0, int t1, int final, mps_err *err)
{
    if (e->comm->finish_started(e->comm->ctx, err) != 0)
        return -1;
    scatter_done(e, 1);
    if (scatter_tensors(e, t0, t1, 1, err) != 0)
        return -1;
    if (!final)
        return 0;
    if (e->comm->finish_started(e->comm->ctx, err) != 0)
        return -1;
    scatter_done(e, 1);
    return 0;
}

/* what the backward starts for tensors [t0, t1) once it is done with them */
static int start_tensors(mps_engine *e, int t0, int t1, int final, mps_err *err)
{
    if (e->scatter_each_layer)
        return scatter_under_backward(e, t0, t1, final, err);
    if (!e->overlap_dp || !e->last_backward)
        return 0;
    return e->L.zero == 0 ? sum_tensors(e, t0, t1, 1, err) : scatter_tensors(e, t0, t1, 1, err);
}

int mps_grads_start_layer(mps_engine *e, int layer, mps_err *err)
{
    int t0 = mps_layer_first_tensor(&e->cfg, layer);
    return start_tensors(e, t0, t0 + e->per_layer, 0, err);
}

int mps_grads_start_rest(mps_engine *e, mps_err *err)
{
    return start_tensors(e, 0, e->ntensors, 1, err);
}

/* ZeRO-2/3: after each micro-batch, the full gradients are reduce-scattered into the owned
 * partitions and freed (ZeRO-1 does this once per step, ZeRO-0 sums instead); under the
 * backward (scatter_under_backward) nothing is left for it. */
int mps_reduce_scatter_grads(mps_engine *e, mps_err *err)
{
    int rc = scatter_tensors(e, 0, e->ntensors, 0, err);
    scatter_done(e, 1);
    return rc;
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
    } else if (e->L.zero >= 1 && e->L.dp == 1) {
        /* one replica: the partition is the whole box */
        for (int t = 0; t < e->ntensors; t++)
            if (e->t[t].held && e->t[t].g)
                to_shard(e, &e->t[t], e->t[t].g, e->L.zero >= 2);
    } else if (e->L.zero == 1) {
        /* the reduce-scatters not started during the backward (all of them without overlap) */
        int rc = scatter_tensors(e, 0, e->ntensors, e->overlap_dp, err);
        if (rc == 0 && e->overlap_dp)
            rc = e->comm->finish_started(e->comm->ctx, err);
        if (rc == 0)
            scatter_done(e, 0);
        if (rc != 0)
            return -1;
    }
    /* the tied head: the first and the last stage each hold wte; their gradients are summed */
    if (e->L.pp > 1 && (e->is_first || e->is_last) && mps_cfg_tied(&e->cfg)) {
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

