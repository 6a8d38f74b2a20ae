/* Internals shared by engine.c (state, optimizer, schedule) and model.c (layer arithmetic). */
#ifndef MPS_ENGINE_INTERNAL_H
#define MPS_ENGINE_INTERNAL_H

#include "backend.h"
#include "engine.h"
#include "geometry.h"

/* message tags of the pipeline (comm.h send / recv) */
#define TAG_FWD(mb) (2 * (mb))
#define TAG_BWD(mb) (2 * (mb) + 1)
#define TAG_TIED (1 << 20)

/* One canonical tensor as this rank holds it. */
typedef struct {
    int held;
    mps_tensor_spec spec;
    mps_piece param;   /* PARAM piece: the TP/PP box, flat-sharded over DP at ZeRO-3 */
    mps_piece opt;     /* ADAM_M piece: the optimizer's flat range of the box */
    int64_t box_n;     /* elements of the box */
    float *w;          /* (box_n) weights; at ZeRO-3 only while gathered for use */
    float *w_shard;    /* ZeRO-3: param.flat_begin..flat_end */
    int w_users;       /* ZeRO-3: acquire/release count of the gathered copy */
    float *g;          /* (box_n) gradient accumulator; ZeRO-2/3: only while a micro-batch runs */
    float *g_shard;    /* ZeRO >= 1: reduced gradient of opt's flat range */
    float *m, *v;      /* Adam moments over opt's flat range */
    int64_t *dp_counts, *dp_displs; /* the DP group's flat ranges of the box (ZeRO partition) */
    int decay;         /* weight decay applies (matrices and embeddings, not biases or norms) */
} mps_tparam;

/* mps_mb_slot.dx_ready: dx alone (received from the next stage: the products round it, bias_grad
 * sums it); dx_act matches dx and dx_colsum holds its column sums (after the head); dx_act matches
 * dx and its column sums are already in the bias gradient they belong to (inside the stage). The
 * Llama block has no biases: for it any state but MPS_DX_NONE says that dx_act matches dx. */
enum { MPS_DX_NONE = 0, MPS_DX_SUMS = 1, MPS_DX_ADDED = 2 };

/* Activations one micro-batch keeps for its backward pass, per layer of the stage. */
typedef struct {
    float *x_in;             /* (N, C) layer input */
    void *ln1;               /* (N, C) operand buffer (backend.h: act_bytes per element) */
    float *ln1_mean, *ln1_rstd; /* (N), (N); RMSNorm: rstd only */
    void *qkv;               /* (N, qkv_w) operand buffer */
    void *atty;              /* (N, Cl) operand buffer */
    float *lse;              /* (B, Hl, T) */
    float *x2;               /* (N, C) after the attention residual */
    void *ln2;               /* (N, C) operand buffer */
    float *ln2_mean, *ln2_rstd;
    void *fch;               /* (N, fch_w) operand buffer: the GELU's input (Llama: gate, up) */
    void *gel;               /* (N, F) operand buffer (Llama: silu(gate) * up); in the backward, dfch */
} mps_layer_acts;

typedef struct {
    int32_t *inputs, *targets; /* (N): the micro-batch's rows of the step's device copy */
    mps_layer_acts *layers;    /* one per layer of the stage */
    float *x_out;              /* (N, C) stage output (sent to the next stage) */
    float *dx;                 /* (N, C) gradient flowing backward through the stage */
    /* What the layernorm backward that last updated dx handed on for dx's next readers, the
     * products and the output bias gradient of the layer below (backend.h layernorm_bwd): dx as an
     * operand buffer, and its column sums. dx_ready (MPS_DX_*) says how far they match dx. Per
     * slot, since the head's backward runs with the forward, ahead of the slot's own. */
    void *dx_act;              /* (N, C) operand buffer */
    float *dx_colsum;          /* (C) the head's column sums (MPS_DX_SUMS) */
    int dx_ready;
} mps_mb_slot;

/* One family's block (train/block_*.c): the arithmetic of the embedding, a layer and the head
 * for one micro-batch; model.c runs them over the stage. layer_fwd: a->x_in -> x_out (next: the
 * layer whose weights a ZeRO-3 prefetch may start, or -1); layer_bwd: s->dx from the layer's
 * output gradient to its input's; head: the last stage's forward and, unless evaluating, its
 * backward into s->dx. */
typedef struct {
    int (*embed_fwd)(mps_engine *e, mps_mb_slot *s, float *x, mps_err *err);
    int (*embed_bwd)(mps_engine *e, mps_mb_slot *s, const float *dx, mps_err *err);
    int (*layer_fwd)(mps_engine *e, int layer, int next, mps_layer_acts *a, float *x_out, mps_err *err);
    int (*layer_bwd)(mps_engine *e, int layer, int next, mps_layer_acts *a, mps_mb_slot *s, mps_err *err);
    int (*head)(mps_engine *e, mps_mb_slot *s, const float *x, mps_err *err);
    /* whether tensor t's gradient is written (not added to) by the step's first backward when
     * e->dw_set (its products' matmul_bwd dw_set): AdamW then leaves it unzeroed (keep_grad) */
    int (*grad_overwritten)(const mps_engine *e, int t);
} mps_block;
extern const mps_block mps_block_gpt2, mps_block_llama;

struct mps_engine {
    const mps_block *block;  /* the family's arithmetic */
    int per_layer;           /* tensors per layer (the architecture table's present rules) */
    int KVl;                 /* local key/value heads (Llama) */
    int qkv_w, fch_w;        /* widths of the qkv and fch activations: GPT-2 3Cl and F; Llama
                              * (Hl + 2 KVl) hs (q, k, v one after the other) and 2F (gate, up) */
    float *rope_cs;          /* Llama: (2, T, hs/2) rotary cosines and sines */
    mps_config cfg;
    mps_layout L;
    mps_comm *comm;
    const mps_backend *be;   /* where every tensor buffer below lives and which kernels run */
    mps_train_opts o;
    int rank;
    mps_coords me;
    int first_layer, nlayers, is_first, is_last;
    int ntensors;
    mps_tparam *t;           /* indexed by canonical tensor */
    int B, T, N, C, Cl, Hl, hs, F; /* N = B*T rows; Cl = C/tp; Hl heads; F = 4C/tp */
    int64_t v0, Vl;          /* this rank's vocab rows of wte */
    int accum;               /* micro-batches per step on this replica */
    int nslots;
    mps_mb_slot *slots;
    /* activation recompute (o.recompute): the slots keep only x_in per layer; every layer's forward
     * (and its replay before the layer's backward) works in this one set, the replay's output going
     * to work_out (N, C) */
    mps_layer_acts work;
    float *work_out;
    float **send_x, **send_dx; /* the pipeline's send buffers, a ring of nsend (mps_pipe_send_buffers):
                                * micro-batch mb's in [mb % nsend], written after send_wait */
    int nsend;
    float *scratch_a;        /* (N, max(C, F, 3Cl)) fp32 temporaries, or operand buffers of that size */
    float *scratch_b;        /* (N, C + 8) fp32 temporaries */
    void *logits;            /* (N, Vl) operand buffer, last stage; dlogits in place in the backward */
    /* this step's summed token losses (last stage, TP part 0): each micro-batch's head adds its
     * sum to loss_acc (a backend buffer of one double, in stream order: no wait for the device per
     * micro-batch), loss_first says whether it is the step's first, and the step reads it once */
    double *loss_acc;
    int loss_first;
    /* gradient reduction under the backward (engine_grads.c): on (ZeRO-0/1 with a comm backend
     * that can start collectives), in the step's last backward pass, per tensor whether its sum
     * or reduce-scatter has started this step, and ZeRO >= 1's reduce-scatter temporaries */
    int overlap_dp, last_backward;
    /* ZeRO-0 (ZeRO >= 1 reduces the full gradients into others and zeroes them): AdamW leaves the
     * gradients the block's products write unzeroed (keep_grad: block->grad_overwritten, the
     * matmul weights' and the head's), and the step's first backward (the first micro-batch's
     * head product for the head) overwrites them
     * (matmul_bwd's dw_set): set by forward_mb for the head and by backward_mb for the layers, in
     * the first micro-batch only */
    int dw_set;
    int evaluating;          /* mps_engine_eval: forward passes only, the loss and nothing else */
    int scatter_each_layer; /* ZeRO-2/3: reduce-scatters layer by layer in every micro-batch */
    unsigned char *sum_started;
    float **scatter_tmp;
    /* ZeRO-3: the tensors whose gather mps_weights_prefetch started (the next layer's) */
    int prefetch[MPS_TENSORS_PER_LAYER], prefetch_n;
    int32_t *step_inputs, *step_targets; /* (accum, N): this replica's tokens of the step (alloc_host) */
    /* (accum, N): their backend copy, moved in one queued copy per step (not one, and a wait for
     * the device, per micro-batch; no wait at the step's start: the previous step's optimizer may
     * still be running); the slots point into it. tokens_queued: a copy from step_inputs may still
     * be reading them (no wait for the device since it was queued); the next read waits first. */
    int32_t *step_inputs_dev, *step_targets_dev;
    int tokens_queued;
};

/* The catalogue over the architecture table: layer l's first tensor, the count per layer, and
 * layer l's tensor of a given name ("gatew"; -1 if the model has none). */
int mps_layer_first_tensor(const mps_config *cfg, int layer);
int mps_layer_tensor_count(const mps_config *cfg);
int mps_layer_tensor_named(const mps_config *cfg, int layer, const char *name);
int mps_rope_table(mps_engine *e, mps_err *err);

/* Sums (max) over the TP group; nothing alone. */
static inline int mps_tp_sum(mps_engine *e, float *buf, int64_t n, mps_err *err)
{
    return e->L.tp == 1 ? 0 : e->comm->allreduce_sum(e->comm->ctx, MPS_GROUP_TP, buf, n, err);
}
static inline int mps_tp_max(mps_engine *e, float *buf, int64_t n, mps_err *err)
{
    return e->L.tp == 1 ? 0 : e->comm->allreduce_max(e->comm->ctx, MPS_GROUP_TP, buf, n, err);
}

/* Buffers of the backend (device memory for CUDA): zeroed on allocation. */
static inline float *buf_new(const mps_engine *e, int64_t n)
{
    return e->be->alloc(e->be->ctx, (size_t)(n > 0 ? n : 1) * sizeof(float));
}
/* An operand buffer of n elements (backend.h: act_bytes each), zeroed. */
static inline void *act_new(const mps_engine *e, int64_t n)
{
    return e->be->alloc(e->be->ctx, (size_t)(n > 0 ? n : 1) * (size_t)e->be->act_bytes);
}
static inline void buf_free(const mps_engine *e, void *p)
{
    if (p)
        e->be->release(e->be->ctx, p);
}
static inline void buf_zero(const mps_engine *e, float *p, int64_t n)
{
    e->be->zero(e->be->ctx, p, (size_t)n * sizeof(float));
}
static inline void buf_copy(const mps_engine *e, float *dst, const float *src, int64_t n)
{
    e->be->copy(e->be->ctx, dst, src, (size_t)n * sizeof(float));
}

/* The first half of a step: forward and backward over the step's micro-batches, gradients reduced
 * (zero 0: p->g over the box; ZeRO >= 1: p->g_shard over opt's range), the global norm and the mean
 * loss; no update. mps_engine_step follows it with clipping and AdamW (tests call it alone). */
int mps_engine_grads(mps_engine *e, const mps_tokens *data, int64_t first_seq, double *loss, double *norm,
                     mps_err *err);

/* model.c: one micro-batch through the stage. Forward stores activations in the slot (and, on the
 * last stage, runs the head and its backward right away so that logits are never kept); backward
 * takes slot->dx and accumulates parameter gradients. */
int mps_model_forward(mps_engine *e, mps_mb_slot *s, mps_err *err);
int mps_model_backward(mps_engine *e, mps_mb_slot *s, mps_err *err);
/* engine.c: weights for use (mps_weights_acquire_many below; ZeRO-3 gathers them over DP), their
 * release, and the gradient accumulator. */
void mps_weights_release(mps_engine *e, int tensor);
float *mps_grad(mps_engine *e, int tensor, mps_err *err);
/* engine_grads.c, called by the backward once it is done with layer `layer`'s gradients (_rest:
 * at the end of the pass, for every other held tensor): where the comm backend can start
 * collectives, their DP reduction starts (ZeRO-0 sums, ZeRO-1 reduce-scatters: in the step's
 * last backward pass; ZeRO-2/3 reduce-scatters: in every one, the previous layer's completed and
 * its full gradients freed). No-ops otherwise. */
int mps_grads_start_layer(mps_engine *e, int layer, mps_err *err);
int mps_grads_start_rest(mps_engine *e, mps_err *err);
/* engine_grads.c: ZeRO-2/3 after each micro-batch: the full gradients reduce-scattered into the
 * owned partitions and freed. */
int mps_reduce_scatter_grads(mps_engine *e, mps_err *err);
/* engine_grads.c: after the schedule, the gradients summed over DP (ZeRO-0: p->g; ZeRO >= 1:
 * into p->g_shard) and the tied head's two copies summed. */
int mps_reduce_grads(mps_engine *e, mps_err *err);
/* ZeRO-1/2: rebuilds every held p->w from every DP replica's partition (opt's flat range) of it. */
int mps_gather_boxes(mps_engine *e, mps_err *err);
/* The weights of count tensors for use, w[i] those of tensors[i]; ZeRO-3 gathers the ones not in
 * use over DP (one group where the comm backend has allgather_many) until mps_weights_release. */
int mps_weights_acquire_many(mps_engine *e, const int *tensors, int count, float **const *w, mps_err *err);
/* ZeRO-3 where the comm backend can start collectives: the gather of count (<= one layer's)
 * tensors starts now and runs while the work queued meanwhile computes; the next acquire completes
 * it (for the compute stream) and returns its use counts. One at a time; a no-op otherwise. */
int mps_weights_prefetch(mps_engine *e, const int *tensors, int count, mps_err *err);

/* out (N, C) = resid + inp (N, K) @ w^T (+ bias): a row-parallel projection, summed over TP (model.c). */
int mps_row_parallel_fwd(mps_engine *e, float *out, const float *resid, const void *inp, const float *w,
                         const float *bias, int K, mps_err *err);

#endif
