/* One micro-batch through this rank's pipeline stage, over the family's block (engine_internal.h
 * mps_block: train/block_gpt2.c, train/block_llama.c): the embedding on the first stage, the
 * stage's layers, the head on the last; activation recompute replays a layer's forward before its
 * backward. */
#include "engine_internal.h"

/* The buffers layer l of the slot works in: its own, or with activation recompute the shared set
 * around the slot's stored input. */
static mps_layer_acts layer_acts(mps_engine *e, mps_mb_slot *s, int l)
{
    if (!e->o.recompute)
        return s->layers[l];
    mps_layer_acts a = e->work;
    a.x_in = s->layers[l].x_in;
    return a;
}

int mps_model_forward(mps_engine *e, mps_mb_slot *s, mps_err *err)
{
    if (e->is_first && e->block->embed_fwd(e, s, s->layers[0].x_in, err) != 0)
        return -1;
    for (int l = 0; l < e->nlayers; l++) {
        float *out = l + 1 < e->nlayers ? s->layers[l + 1].x_in : s->x_out;
        mps_layer_acts a = layer_acts(e, s, l);
        int next = l + 1 < e->nlayers ? e->first_layer + l + 1 : -1;
        if (e->block->layer_fwd(e, e->first_layer + l, next, &a, out, err) != 0)
            return -1;
    }
    if (e->is_last)
        return e->block->head(e, s, s->x_out, err);
    return 0;
}

int mps_model_backward(mps_engine *e, mps_mb_slot *s, mps_err *err)
{
    for (int l = e->nlayers - 1; l >= 0; l--) {
        mps_layer_acts a = layer_acts(e, s, l);
        /* recompute: replay the layer's forward from its stored input (the same kernels on the same
         * values: the activations, and so the gradients, are those of a run that kept them) */
        if (e->o.recompute && e->block->layer_fwd(e, e->first_layer + l, -1, &a, e->work_out, err) != 0)
            return -1;
        if (e->block->layer_bwd(e, e->first_layer + l, l > 0 ? e->first_layer + l - 1 : -1, &a, s, err) != 0 ||
            mps_grads_start_layer(e, e->first_layer + l, err) != 0)
            return -1;
    }
    if (e->is_first && e->block->embed_bwd(e, s, s->dx, err) != 0)
        return -1;
    return mps_grads_start_rest(e, err);
}

/* A row-parallel output projection and the residual around it: out (N, C) = resid + inp (N, K) @
 * w^T + bias. Alone, the residual and the bias ride in the product's epilogue; under TP the
 * partial products are summed over the group first and the bias (if any: GPT-2's) is added once,
 * after. Both families' blocks call it. */
int mps_row_parallel_fwd(mps_engine *e, float *out, const float *resid, const void *inp, const float *w,
                            const float *bias, int K, mps_err *err)
{
    const int64_t N = e->N;
    const int C = e->C;
    if (e->L.tp == 1) {
        e->be->matmul_fwd(e->be->ctx, out, inp, w, bias, resid, N, K, C);
        return 0;
    }
    float *proj = e->scratch_a; /* (N, C) partial sums */
    e->be->matmul_fwd(e->be->ctx, proj, inp, w, NULL, NULL, N, K, C);
    if (mps_tp_sum(e, proj, N * C, err) != 0)
        return -1;
    if (bias)
        e->be->residual_bias(e->be->ctx, out, resid, proj, bias, N, C);
    else
        e->be->add(e->be->ctx, out, resid, proj, N * C);
    return 0;
}
