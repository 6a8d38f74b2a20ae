/* GPT-2 arithmetic of one pipeline stage for one micro-batch, with Megatron-style tensor
 * parallelism: the attention and MLP input projections are column-parallel (each TP rank computes
 * its heads / its quarter of the MLP), the output projections row-parallel (partial sums, reduced
 * over TP); the embedding and the tied head are vocab-parallel. Activations between blocks are
 * replicated over the TP group. */
#include <math.h>
#include <string.h>

#include "engine_internal.h"

/* The layer's weights, gathered (ZeRO-3) for the duration of a forward or backward pass. */
typedef struct {
    float *ln1w, *ln1b, *qkvw, *qkvb, *attprojw, *attprojb, *ln2w, *ln2b, *fcw, *fcb, *fcprojw, *fcprojb;
} layer_weights;

/* next: the layer whose weights to start gathering now (ZeRO-3 prefetch, mps_weights_prefetch),
 * the one this pass visits after `layer`; -1: none */
static int layer_acquire(mps_engine *e, int layer, int next, layer_weights *lw, mps_err *err)
{
    float **const dst[MPS_TENSORS_PER_LAYER] = { &lw->ln1w, &lw->ln1b, &lw->qkvw, &lw->qkvb, &lw->attprojw,
                                                 &lw->attprojb, &lw->ln2w, &lw->ln2b, &lw->fcw, &lw->fcb,
                                                 &lw->fcprojw, &lw->fcprojb };
    int tensors[MPS_TENSORS_PER_LAYER];
    for (int s = 0; s < MPS_TENSORS_PER_LAYER; s++)
        tensors[s] = mps_layer_tensor(layer, s);
    if (mps_weights_acquire_many(e, tensors, MPS_TENSORS_PER_LAYER, dst, err) != 0)
        return -1;
    if (next < 0)
        return 0;
    for (int s = 0; s < MPS_TENSORS_PER_LAYER; s++)
        tensors[s] = mps_layer_tensor(next, s);
    return mps_weights_prefetch(e, tensors, MPS_TENSORS_PER_LAYER, err);
}

static void layer_release(mps_engine *e, int layer)
{
    for (int s = 0; s < MPS_TENSORS_PER_LAYER; s++)
        mps_weights_release(e, mps_layer_tensor(layer, s));
}


static int layer_forward(mps_engine *e, int layer, int next, mps_layer_acts *a, float *x_out, mps_err *err)
{
    layer_weights w;
    if (layer_acquire(e, layer, next, &w, err) != 0)
        return -1; /* (a failed prefetch leaves the layer acquired: the run stops) */
    const int64_t N = e->N;
    const int C = e->C, Cl = e->Cl, F = e->F;
    e->be->layernorm_fwd(e->be->ctx, a->ln1, a->ln1_mean, a->ln1_rstd, a->x_in, w.ln1w, w.ln1b, N, C);
    e->be->matmul_fwd_act(e->be->ctx, a->qkv, a->ln1, w.qkvw, w.qkvb, N, C, 3 * Cl);
    e->be->attention_fwd(e->be->ctx, a->atty, a->lse, a->qkv, e->B, e->T, e->Hl, e->hs);
    int rc = mps_row_parallel_fwd(e, a->x2, a->x_in, a->atty, w.attprojw, w.attprojb, Cl, err);
    if (rc == 0) {
        e->be->layernorm_fwd(e->be->ctx, a->ln2, a->ln2_mean, a->ln2_rstd, a->x2, w.ln2w, w.ln2b, N, C);
        e->be->matmul_gelu_fwd(e->be->ctx, a->gel, a->fch, a->ln2, w.fcw, w.fcb, N, C, F);
        rc = mps_row_parallel_fwd(e, x_out, a->x2, a->gel, w.fcprojw, w.fcprojb, F, err);
    }
    layer_release(e, layer);
    return rc;
}

/* s->dx (N, C): in: gradient at the layer output; out: gradient at the layer input. Where the
 * layernorm backward that wrote dx also left its operand copy and column sums (s->dx_ready), the
 * products read the copy and the output biases' gradients get the sums from it (the layernorm
 * backwards below add them straight into the gradient of the bias they belong to); otherwise (dx
 * received from the next stage) the products round dx themselves and bias_grad sums it. */
static int layer_backward(mps_engine *e, int layer, int next, mps_layer_acts *a, mps_mb_slot *s, mps_err *err)
{
    float *dx = s->dx;
    layer_weights w;
    if (layer_acquire(e, layer, next, &w, err) != 0)
        return -1;
    const int64_t N = e->N;
    const int C = e->C, Cl = e->Cl, F = e->F;
    float *g[MPS_TENSORS_PER_LAYER];
    for (int s = 0; s < MPS_TENSORS_PER_LAYER; s++)
        if ((g[s] = mps_grad(e, mps_layer_tensor(layer, s), err)) == NULL) {
            layer_release(e, layer);
            return -1;
        }
    float *dbig = e->scratch_a;  /* (N, max(F, 3Cl)): the operand buffer dqkv */
    float *dsmall = e->scratch_b; /* (N, C) */
    int rc = 0;
    /* MLP: x3 = x2 + gelu(ln2 @ fcw^T + fcb) @ fcprojw^T + fcprojb; dx is dx3 here and becomes dx2 */
    const void *dres = dx; /* the residual gradient as the products read it */
    int dres_act = 0;
    if (s->dx_ready == MPS_DX_SUMS)
        e->be->accumulate(e->be->ctx, g[MPS_SLOT_FCPROJB], s->dx_colsum, C);
    else if (s->dx_ready == MPS_DX_NONE)
        e->be->bias_grad(e->be->ctx, g[MPS_SLOT_FCPROJB], dx, N, C);
    if (s->dx_ready != MPS_DX_NONE)
        dres = s->dx_act, dres_act = 1;
    /* the four weights' gradients: = in the step's first backward (e->dw_set), += after */
    e->be->matmul_bwd(e->be->ctx, NULL, 0, g[MPS_SLOT_FCPROJW], e->dw_set, NULL, dres, dres_act, a->gel, w.fcprojw, N,
                      F, C);
    /* dfch (an operand buffer, overwritten) goes where gel was: gel is no longer needed (the
     * product above, issued first, has read it), and no other (N, F) operand buffer is free */
    void *dfch = a->gel;
    e->be->matmul_dgelu_bwd(e->be->ctx, dfch, g[MPS_SLOT_FCB], dres, dres_act, w.fcprojw, a->fch, N, F, C);
    /* the layernorm output gradients (dsmall): operand buffers that the layernorm backward reads,
     * unless a TP sum comes between (it sums fp32) */
    const int dln_act = e->L.tp == 1;
    e->be->matmul_bwd(e->be->ctx, dsmall, dln_act, g[MPS_SLOT_FCW], e->dw_set, NULL, dfch, 1, a->ln2, w.fcw, N, C,
                      F);
    rc = mps_tp_sum(e, dsmall, N * C, err); /* ln2 feeds every TP part: its gradient is the sum */
    if (rc == 0) {
        /* dx becomes dx2, whose column sums are attprojb's gradient */
        e->be->layernorm_bwd(e->be->ctx, dx, s->dx_act, g[MPS_SLOT_ATTPROJB], g[MPS_SLOT_LN2W], g[MPS_SLOT_LN2B],
                             dsmall, dln_act, a->x2, w.ln2w, a->ln2_mean, a->ln2_rstd, N, C);
        s->dx_ready = MPS_DX_ADDED;
        /* attention: x2 = x + (attention(ln1 @ qkvw^T + qkvb) @ attprojw^T) + attprojb */
        void *datty = dsmall; /* (N, Cl) operand buffer: only the attention backward reads it */
        e->be->matmul_bwd(e->be->ctx, datty, 1, g[MPS_SLOT_ATTPROJW], e->dw_set, NULL, s->dx_act, 1, a->atty,
                          w.attprojw, N, Cl, C);
        void *dqkv = dbig; /* (N, 3 Cl) operand buffer, overwritten */
        /* qkvb's gradient, the column sums of dqkv, comes with it */
        e->be->attention_bwd(e->be->ctx, dqkv, datty, a->qkv, a->atty, a->lse, e->B, e->T, e->Hl, e->hs,
                             g[MPS_SLOT_QKVB]);
        e->be->matmul_bwd(e->be->ctx, dsmall, dln_act, g[MPS_SLOT_QKVW], e->dw_set, NULL, dqkv, 1, a->ln1, w.qkvw, N,
                          C, 3 * Cl);
        rc = mps_tp_sum(e, dsmall, N * C, err);
    }
    /* dx becomes the gradient at the layer below's output, whose column sums are that layer's
     * fcprojb gradient; below the stage's first layer dx goes to the embedding or to the previous
     * stage: no products, no sums */
    const int below = layer > e->first_layer;
    float *below_b = NULL;
    if (rc == 0 && below && (below_b = mps_grad(e, mps_layer_tensor(layer - 1, MPS_SLOT_FCPROJB), err)) == NULL)
        rc = -1;
    if (rc == 0)
        e->be->layernorm_bwd(e->be->ctx, dx, below ? s->dx_act : NULL, below_b, g[MPS_SLOT_LN1W], g[MPS_SLOT_LN1B],
                             dsmall, dln_act, a->x_in, w.ln1w, a->ln1_mean, a->ln1_rstd, N, C);
    s->dx_ready = below ? MPS_DX_ADDED : MPS_DX_NONE;
    layer_release(e, layer);
    return rc;
}

/* First stage: x (N, C) = wte[inputs] + wpe[positions]; wte is vocab-parallel. */
static int embed_forward(mps_engine *e, mps_mb_slot *s, float *x, mps_err *err)
{
    float *wte, *wpe;
    const int tensors[2] = { MPS_TENSOR_WTE, MPS_TENSOR_WPE };
    float **const dst[2] = { &wte, &wpe };
    if (mps_weights_acquire_many(e, tensors, 2, dst, err) != 0)
        return -1;
    e->be->embed_fwd(e->be->ctx, x, s->inputs, e->N, wte, e->v0, e->Vl, e->C);
    int rc = mps_tp_sum(e, x, (int64_t)e->N * e->C, err);
    if (rc == 0)
        e->be->pos_fwd(e->be->ctx, x, wpe, e->B, e->T, e->C);
    mps_weights_release(e, MPS_TENSOR_WPE);
    mps_weights_release(e, MPS_TENSOR_WTE);
    return rc;
}

static int embed_backward(mps_engine *e, mps_mb_slot *s, const float *dx, mps_err *err)
{
    float *gwte = mps_grad(e, MPS_TENSOR_WTE, err), *gwpe = gwte ? mps_grad(e, MPS_TENSOR_WPE, err) : NULL;
    if (!gwpe)
        return -1;
    e->be->embed_bwd(e->be->ctx, gwte, dx, s->inputs, e->N, e->v0, e->Vl, e->C);
    e->be->pos_bwd(e->be->ctx, gwpe, dx, e->B, e->T, e->C);
    return 0;
}

/* Last stage: ln_f, the tied head (vocab-parallel logits), cross-entropy, and right away the
 * head's backward: dx (N, C) receives the gradient at the last layer's output. While evaluating,
 * the loss only. */
static int head_forward_backward(mps_engine *e, mps_mb_slot *s, const float *x, mps_err *err)
{
    const int64_t N = e->N;
    const int C = e->C;
    int lnfw_t = mps_tensor_lnfw(&e->cfg), lnfb_t = mps_tensor_lnfb(&e->cfg);
    float *wte, *lnfw, *lnfb;
    const int tensors[3] = { MPS_TENSOR_WTE, lnfw_t, lnfb_t };
    float **const dst[3] = { &wte, &lnfw, &lnfb };
    if (mps_weights_acquire_many(e, tensors, 3, dst, err) != 0)
        return -1;
    float *gwte = NULL, *glnfw = NULL, *glnfb = NULL;
    if (!e->evaluating) {
        gwte = mps_grad(e, MPS_TENSOR_WTE, err);
        glnfw = mps_grad(e, lnfw_t, err);
        glnfb = mps_grad(e, lnfb_t, err);
    }
    int rc = e->evaluating || (gwte && glnfw && glnfb) ? 0 : -1;
    void *xf = e->scratch_a; /* (N, C) operand buffer */
    float *mean = e->scratch_b, *rstd = e->scratch_b + N;
    float *rowmax = e->scratch_b + 2 * N, *sumexp = e->scratch_b + 3 * N, *tlogit = e->scratch_b + 4 * N;
    float *gmax = e->scratch_b + 5 * N;
    float *dxf = e->scratch_b + 6 * N; /* (N, C) */
    const float scale = 1.0f / ((float)e->o.global_batch * (float)e->T);
    /* the vocab whole on this rank (and a backward to come): the statistics are final, and dlogits
     * comes from the same pass over the logits, in place */
    const int stats_bwd = e->L.tp == 1 && !e->evaluating;
    void *dlogits = e->logits;
    if (rc == 0) {
        e->be->layernorm_fwd(e->be->ctx, xf, mean, rstd, x, lnfw, lnfb, N, C);
        e->be->matmul_fwd_act(e->be->ctx, e->logits, xf, wte, NULL, N, C, (int)e->Vl);
        /* one pass over the logits: local max, sumexp relative to it, target logit (and dlogits) */
        if (stats_bwd)
            e->be->xent_stats_bwd(e->be->ctx, rowmax, sumexp, tlogit, dlogits, s->targets, scale, N, e->Vl, e->v0,
                                  e->cfg.vocab);
        else
            e->be->xent_stats(e->be->ctx, rowmax, sumexp, tlogit, e->logits, s->targets, N, e->Vl, e->v0,
                              e->cfg.vocab);
        if (e->L.tp == 1) {
            gmax = rowmax;
        } else {
            buf_copy(e, gmax, rowmax, N);
            rc = mps_tp_max(e, gmax, N, err);
            if (rc == 0)
                e->be->xent_rescale(e->be->ctx, sumexp, rowmax, gmax, N);
        }
    }
    if (rc == 0) /* one reduction for both: sumexp and tlogit lie next to each other */
        rc = mps_tp_sum(e, sumexp, 2 * N, err);
    if (rc == 0 && e->me.tp == 0) { /* added on the device: read once per step */
        e->be->xent_loss_add(e->be->ctx, e->loss_acc, e->loss_first, gmax, sumexp, tlogit, N);
        e->loss_first = 0;
    }
    if (rc == 0 && !e->evaluating) {
        if (!stats_bwd) /* in place */
            e->be->xent_bwd(e->be->ctx, dlogits, e->logits, s->targets, gmax, sumexp, scale, N, e->Vl, e->v0,
                            e->cfg.vocab);
        /* the step's first product into gwte overwrites it (e->dw_set: AdamW left it unzeroed); the
         * embedding's backward adds after */
        e->be->matmul_bwd(e->be->ctx, dxf, e->L.tp == 1, gwte, e->dw_set, NULL, dlogits, 1, xf, wte, N, C,
                          (int)e->Vl);
        rc = mps_tp_sum(e, dxf, N * C, err);
    }
    if (rc == 0 && !e->evaluating) {
        /* the column sums wait in the slot for the last layer's backward (the head runs with the
         * forward; another micro-batch's backward may come between) */
        buf_zero(e, s->dx, N * C);
        buf_zero(e, s->dx_colsum, C);
        e->be->layernorm_bwd(e->be->ctx, s->dx, s->dx_act, s->dx_colsum, glnfw, glnfb, dxf, e->L.tp == 1, x, lnfw, mean,
                             rstd, N, C);
        s->dx_ready = MPS_DX_SUMS;
    }
    mps_weights_release(e, lnfb_t);
    mps_weights_release(e, lnfw_t);
    mps_weights_release(e, MPS_TENSOR_WTE);
    return rc;
}

/* the four matmul weights and, on the last stage, wte (the head's product in the first
 * micro-batch comes before the embedding's backward) */
static int grad_overwritten(const mps_engine *e, int t)
{
    if (t == MPS_TENSOR_WTE)
        return e->is_last;
    if (t < mps_layer_tensor(0, 0))
        return 0;
    const int slot = (t - mps_layer_tensor(0, 0)) % MPS_TENSORS_PER_LAYER;
    return slot == MPS_SLOT_QKVW || slot == MPS_SLOT_ATTPROJW || slot == MPS_SLOT_FCW || slot == MPS_SLOT_FCPROJW;
}

const mps_block mps_block_gpt2 = {
    embed_forward, embed_backward, layer_forward, layer_backward, head_forward_backward, grad_overwritten,
};
