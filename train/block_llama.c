/* The Llama family's arithmetic (Llama 2/3, Mistral, Qwen2, ...) for one micro-batch, with
 * Megatron-style tensor parallelism: q, k, v column-parallel by kv groups (rank r holds kv heads
 * [r KV/tp, (r+1) KV/tp) and exactly the query heads that read them), o row-parallel; gate and up
 * column-parallel, down row-parallel; the embedding and the head (untied lm_head, or wte when
 * tied) vocab-parallel. Layer: x2 = x + o(attn(rope(q(n1)), rope(k(n1)), v(n1))) with n1 =
 * rmsnorm(x); out = x2 + down(silu(gate(n2)) * up(n2)) with n2 = rmsnorm(x2). No biases but the
 * optional q, k, v ones. The products' weight gradients are written by the step's first backward
 * (e->dw_set) and added to after; the norms', biases' and the embedding's accumulate from zero. */
#include <string.h>

#include "arch.h"
#include "engine_internal.h"

/* The layer tensors by their place in the architecture table's layer rules. */
enum { R_LN1W, R_QW, R_QB, R_KW, R_KB, R_VW, R_VB, R_OW, R_LN2W, R_GATEW, R_UPW, R_DOWNW, R_COUNT };

/* layer's tensor of rule r, -1 when the model lacks it (the biases) */
static int rule_tensor(const mps_engine *e, int layer, int r)
{
    return mps_tensor_index(&e->cfg, mps_arch_llama.n_embed + r, layer);
}

/* The present tensors of a layer, in rule order: their indices, and where each rule's is. */
static int layer_tensors(const mps_engine *e, int layer, int tensors[R_COUNT], int pos[R_COUNT])
{
    int n = 0;
    for (int r = 0; r < R_COUNT; r++) {
        int t = rule_tensor(e, layer, r);
        pos[r] = t < 0 ? -1 : n;
        if (t >= 0)
            tensors[n++] = t;
    }
    return n;
}

/* w[r]: rule r's weights (NULL if absent), gathered (ZeRO-3) until layer_release; the next
 * layer's gather starts (prefetch) when next >= 0. */
static int layer_acquire(mps_engine *e, int layer, int next, float *w[R_COUNT], mps_err *err)
{
    int tensors[R_COUNT], pos[R_COUNT];
    int n = layer_tensors(e, layer, tensors, pos);
    float *got[R_COUNT];
    float **dst[R_COUNT];
    for (int i = 0; i < n; i++)
        dst[i] = &got[i];
    if (mps_weights_acquire_many(e, tensors, n, (float **const *)dst, err) != 0)
        return -1;
    for (int r = 0; r < R_COUNT; r++)
        w[r] = pos[r] < 0 ? NULL : got[pos[r]];
    if (next < 0)
        return 0;
    n = layer_tensors(e, next, tensors, pos);
    return mps_weights_prefetch(e, tensors, n, err);
}

static void layer_release(mps_engine *e, int layer)
{
    int tensors[R_COUNT], pos[R_COUNT];
    int n = layer_tensors(e, layer, tensors, pos);
    for (int i = 0; i < n; i++)
        mps_weights_release(e, tensors[i]);
}


/* element i of an operand buffer (backend.h: act_bytes per element, bf16 on CUDA) */
static void *act_at(const mps_engine *e, void *buf, int64_t i)
{
    return (char *)buf + i * e->be->act_bytes;
}

/* q, k, v in the qkv activation (N, qkv_w): the columns of one stacked product, rows of stride
 * qkv_w = Cl + 2 Kl */
static void *q_of(const mps_engine *e, void *qkv) { (void)e; return qkv; }
static void *k_of(const mps_engine *e, void *qkv) { return act_at(e, qkv, e->Cl); }
static void *v_of(const mps_engine *e, void *qkv) { return act_at(e, qkv, e->Cl + (int64_t)e->KVl * e->hs); }

/* A stacked product's parts, from p: the layer's weights, or their gradients, by rule. */
typedef struct {
    float *w[3], *b[3]; /* the parts' weights and biases (NULL: none) */
    int oc[3], n;       /* their output widths, the number of parts */
} stacked_parts;

enum { QKV, GATE_UP };

/* q|k|v (with the optional biases) or gate|up */
static stacked_parts parts_of(const mps_engine *e, int which, float *const p[R_COUNT])
{
    const int Kl = e->KVl * e->hs;
    if (which == QKV)
        return (stacked_parts){ { p[R_QW], p[R_KW], p[R_VW] }, { p[R_QB], p[R_KB], p[R_VB] }, { e->Cl, Kl, Kl }, 3 };
    return (stacked_parts){ { p[R_GATEW], p[R_UPW] }, { NULL, NULL }, { e->F, e->F }, 2 };
}

/* the parts' weights (or biases) as the products read them */
static const float *const *reads(float *const *p) { return (const float *const *)p; }

static void parts_fwd(mps_engine *e, int which, float *const w[R_COUNT], void *out, const void *inp)
{
    const stacked_parts s = parts_of(e, which, w);
    e->be->matmul_parts_fwd_act(e->be->ctx, out, inp, reads(s.w), reads(s.b), s.oc, s.n, e->N, e->C);
}

/* dinp = the input gradient (an operand buffer when dinp_act); the parts' weight (and bias)
 * gradients in g */
static void parts_bwd(mps_engine *e, int which, float *const w[R_COUNT], float *const g[R_COUNT], void *dinp,
                      int dinp_act, const void *dout, const void *inp)
{
    const stacked_parts sw = parts_of(e, which, w), sg = parts_of(e, which, g);
    e->be->matmul_parts_bwd(e->be->ctx, dinp, dinp_act ? MPS_DINP_ACT : MPS_DINP_F32, sg.w, e->dw_set, sg.b, dout, inp,
                            reads(sw.w), sw.oc, sw.n, e->N, e->C);
}

static int layer_forward(mps_engine *e, int layer, int next, mps_layer_acts *a, float *x_out, mps_err *err)
{
    float *w[R_COUNT];
    if (layer_acquire(e, layer, next, w, err) != 0)
        return -1;
    const mps_backend *be = e->be;
    const int64_t N = e->N;
    const int C = e->C, Cl = e->Cl, F = e->F;
    const float eps = (float)mps_cfg_norm_eps(&e->cfg);
    void *q = q_of(e, a->qkv), *k = k_of(e, a->qkv), *v = v_of(e, a->qkv);
    const int64_t ld = e->qkv_w; /* Cl + 2 Kl */
    be->rmsnorm_fwd(be->ctx, a->ln1, a->ln1_rstd, a->x_in, w[R_LN1W], N, C, eps);
    parts_fwd(e, QKV, w, a->qkv, a->ln1);
    be->rope_fwd(be->ctx, q, e->rope_cs, e->B, e->T, e->Hl, e->hs, ld);
    be->rope_fwd(be->ctx, k, e->rope_cs, e->B, e->T, e->KVl, e->hs, ld);
    be->gqa_fwd(be->ctx, a->atty, a->lse, q, k, v, e->B, e->T, e->Hl, e->KVl, e->hs, ld, ld);
    int rc = mps_row_parallel_fwd(e, a->x2, a->x_in, a->atty, w[R_OW], NULL, Cl, err);
    if (rc == 0) {
        /* gate|up: (N, 2 F), the columns of one stacked product */
        be->rmsnorm_fwd(be->ctx, a->ln2, a->ln2_rstd, a->x2, w[R_LN2W], N, C, eps);
        parts_fwd(e, GATE_UP, w, a->fch, a->ln2);
        be->swiglu_fwd(be->ctx, a->gel, a->fch, act_at(e, a->fch, F), N, F, 2 * (int64_t)F);
        rc = mps_row_parallel_fwd(e, x_out, a->x2, a->gel, w[R_DOWNW], NULL, F, err);
    }
    layer_release(e, layer);
    return rc;
}

/* s->dx (N, C): in, the gradient at the layer's output; out, at its input. */
static int layer_backward(mps_engine *e, int layer, int next, mps_layer_acts *a, mps_mb_slot *s, mps_err *err)
{
    float *w[R_COUNT], *g[R_COUNT];
    if (layer_acquire(e, layer, next, w, err) != 0)
        return -1;
    for (int r = 0; r < R_COUNT; r++) {
        int t = rule_tensor(e, layer, r);
        g[r] = NULL;
        if (t >= 0 && (g[r] = mps_grad(e, t, err)) == NULL) {
            layer_release(e, layer);
            return -1;
        }
    }
    const mps_backend *be = e->be;
    const int64_t N = e->N;
    const int C = e->C, Cl = e->Cl, F = e->F;
    float *dx = s->dx;
    float *dbig = e->scratch_a;                                      /* (N, max(F, qkv_w)) */
    void *datty = e->scratch_a + N * (F > e->qkv_w ? F : e->qkv_w);  /* (N, Cl) operand buffer */
    float *dln = e->scratch_b;                                       /* (N, C) */
    /* MLP: dx is the output's gradient; the residual passes it on, the norm's backward adds */
    /* the norms' input gradients (dln) are sums of several products' (one stacked product: gate|up,
     * q|k|v, which sums them inside) and of the TP group's: fp32 under TP, summed before the norm's
     * backward reads them, else the product's operand buffer */
    /* the residual gradient as the products read it: its operand copy when the norm backward that
     * wrote dx left one (s->dx_ready; not when dx came from the next stage) */
    const int dres_act = s->dx_ready != MPS_DX_NONE;
    const void *dres = dres_act ? s->dx_act : (const void *)dx;
    /* the norms' input gradients as operand buffers when no TP sum lies between (it sums fp32) */
    const int dln_act = e->L.tp == 1;
    void *dh = dbig; /* operand buffer */
    be->matmul_bwd(be->ctx, dh, 1, g[R_DOWNW], e->dw_set, NULL, dres, dres_act, a->gel, w[R_DOWNW], N, F, C);
    void *gate = a->fch, *up = act_at(e, a->fch, F); /* (N, 2 F): gate|up */
    be->swiglu_bwd(be->ctx, gate, up, dh, gate, up, N, F, 2 * (int64_t)F); /* dgate, dup in place */
    parts_bwd(e, GATE_UP, w, g, dln, dln_act, a->fch, a->ln2);
    int rc = mps_tp_sum(e, dln, N * C, err); /* n2 feeds every TP part: its gradient is the sum */
    if (rc == 0) {
        be->rmsnorm_bwd(be->ctx, dx, s->dx_act, g[R_LN2W], dln, dln_act, a->x2, w[R_LN2W], a->ln2_rstd, N, C);
        /* attention: dx is now x2's gradient */
        be->matmul_bwd(be->ctx, datty, 1, g[R_OW], e->dw_set, NULL, s->dx_act, 1, a->atty, w[R_OW], N, Cl, C);
        /* dq|dk|dv (N, qkv_w) laid out as q|k|v, operand buffer */
        const int64_t ld = e->qkv_w;
        void *dq = q_of(e, dbig), *dk = k_of(e, dbig), *dv = v_of(e, dbig);
        void *q = q_of(e, a->qkv), *k = k_of(e, a->qkv), *v = v_of(e, a->qkv);
        /* dq and dk come out turned back by the rotary embeddings (rope_bwd's work, fused) */
        be->gqa_bwd(be->ctx, dq, dk, dv, datty, q, k, v, a->atty, a->lse, e->B, e->T, e->Hl, e->KVl, e->hs, ld, ld,
                    e->rope_cs);
        parts_bwd(e, QKV, w, g, dln, dln_act, dbig, a->ln1);
        rc = mps_tp_sum(e, dln, N * C, err);
    }
    /* below the stage's first layer dx goes to the embedding or to the previous stage: no products */
    const int below = layer > e->first_layer;
    if (rc == 0)
        be->rmsnorm_bwd(be->ctx, dx, below ? s->dx_act : NULL, g[R_LN1W], dln, dln_act, a->x_in, w[R_LN1W], a->ln1_rstd,
                        N, C);
    s->dx_ready = below ? MPS_DX_ADDED : MPS_DX_NONE;
    layer_release(e, layer);
    return rc;
}

/* First stage: x (N, C) = wte[inputs], vocab-parallel (summed over TP). */
static int embed_forward(mps_engine *e, mps_mb_slot *s, float *x, mps_err *err)
{
    float *wte;
    const int tensors[1] = { MPS_TENSOR_WTE };
    float **const dst[1] = { &wte };
    if (mps_weights_acquire_many(e, tensors, 1, dst, err) != 0)
        return -1;
    e->be->embed_fwd(e->be->ctx, x, s->inputs, e->N, wte, e->v0, e->Vl, e->C);
    int rc = mps_tp_sum(e, x, (int64_t)e->N * e->C, err);
    mps_weights_release(e, MPS_TENSOR_WTE);
    return rc;
}

static int embed_backward(mps_engine *e, mps_mb_slot *s, const float *dx, mps_err *err)
{
    float *gwte = mps_grad(e, MPS_TENSOR_WTE, err);
    if (!gwte)
        return -1;
    e->be->embed_bwd(e->be->ctx, gwte, dx, s->inputs, e->N, e->v0, e->Vl, e->C);
    return 0;
}

/* Last stage: the final RMSNorm, the head (lm_head, or wte when tied: vocab-parallel logits),
 * cross-entropy, and right away the head's backward into s->dx. While evaluating, the loss only. */
static int head_forward_backward(mps_engine *e, mps_mb_slot *s, const float *x, mps_err *err)
{
    const mps_backend *be = e->be;
    const int64_t N = e->N;
    const int C = e->C;
    const int lnfw_t = mps_tensor_find(&e->cfg, "lnfw");
    const int head_t = mps_cfg_tied(&e->cfg) ? MPS_TENSOR_WTE : mps_tensor_find(&e->cfg, "lm_head");
    float *head, *lnfw;
    const int tensors[2] = { head_t, lnfw_t };
    float **const dst[2] = { &head, &lnfw };
    if (mps_weights_acquire_many(e, tensors, 2, dst, err) != 0)
        return -1;
    float *ghead = NULL, *glnfw = NULL;
    if (!e->evaluating) {
        ghead = mps_grad(e, head_t, err);
        glnfw = ghead ? mps_grad(e, lnfw_t, err) : NULL;
    }
    int rc = e->evaluating || glnfw ? 0 : -1;
    void *xf = e->scratch_a; /* (N, C) operand buffer */
    float *rstd = e->scratch_b;
    float *rowmax = e->scratch_b + 2 * N, *sumexp = e->scratch_b + 3 * N, *tlogit = e->scratch_b + 4 * N;
    float *gmax = e->scratch_b + 5 * N;
    float *dxf = e->scratch_b + 6 * N; /* (N, C) */
    const float scale = 1.0f / ((float)e->o.global_batch * (float)e->T);
    /* the vocab whole on this rank (and a backward to come): the statistics are final, and dlogits
     * comes from the same pass over the logits, in place */
    const int stats_bwd = e->L.tp == 1 && !e->evaluating;
    if (rc == 0) {
        be->rmsnorm_fwd(be->ctx, xf, rstd, x, lnfw, N, C, (float)mps_cfg_norm_eps(&e->cfg));
        be->matmul_fwd_act(be->ctx, e->logits, xf, head, NULL, N, C, (int)e->Vl);
        if (stats_bwd)
            be->xent_stats_bwd(be->ctx, rowmax, sumexp, tlogit, e->logits, s->targets, scale, N, e->Vl, e->v0,
                               e->cfg.vocab);
        else
            be->xent_stats(be->ctx, rowmax, sumexp, tlogit, e->logits, s->targets, N, e->Vl, e->v0, e->cfg.vocab);
        if (e->L.tp == 1) {
            gmax = rowmax;
        } else {
            buf_copy(e, gmax, rowmax, N);
            rc = mps_tp_max(e, gmax, N, err);
            if (rc == 0)
                be->xent_rescale(be->ctx, sumexp, rowmax, gmax, N);
        }
    }
    if (rc == 0) /* sumexp and tlogit lie next to each other */
        rc = mps_tp_sum(e, sumexp, 2 * N, err);
    if (rc == 0 && e->me.tp == 0) { /* added on the device: read once per step */
        be->xent_loss_add(be->ctx, e->loss_acc, e->loss_first, gmax, sumexp, tlogit, N);
        e->loss_first = 0;
    }
    if (rc == 0 && !e->evaluating) {
        if (!stats_bwd) /* in place */
            be->xent_bwd(be->ctx, e->logits, e->logits, s->targets, gmax, sumexp, scale, N, e->Vl, e->v0,
                         e->cfg.vocab);
        be->matmul_bwd(be->ctx, dxf, 0, ghead, e->dw_set, NULL, e->logits, 1, xf, head, N, C, (int)e->Vl);
        rc = mps_tp_sum(e, dxf, N * C, err);
    }
    if (rc == 0 && !e->evaluating) {
        buf_zero(e, s->dx, N * C);
        be->rmsnorm_bwd(be->ctx, s->dx, s->dx_act, glnfw, dxf, 0, x, lnfw, rstd, N, C);
        s->dx_ready = MPS_DX_ADDED; /* (the Llama block reads only the operand copy, no column sums) */
    }
    mps_weights_release(e, lnfw_t);
    mps_weights_release(e, head_t);
    return rc;
}

/* the products' weights (q, k, v, o, gate, up, down) and, on the last stage, the head's (lm_head,
 * or a tied wte, whose head product in the first micro-batch comes before its embedding's
 * backward) */
static int grad_overwritten(const mps_engine *e, int t)
{
    if (t == mps_tensor_find(&e->cfg, "lm_head") || (mps_cfg_tied(&e->cfg) && t == MPS_TENSOR_WTE))
        return e->is_last;
    int layer;
    const mps_tensor_rule *rule = mps_tensor_rule_of(&e->cfg, t, &layer);
    if (layer < 0)
        return 0;
    const int r = (int)(rule - mps_arch_llama.rules) - mps_arch_llama.n_embed;
    return r == R_QW || r == R_KW || r == R_VW || r == R_OW || r == R_GATEW || r == R_UPW || r == R_DOWNW;
}

const mps_block mps_block_llama = {
    embed_forward, embed_backward, layer_forward, layer_backward, head_forward_backward, grad_overwritten,
};
