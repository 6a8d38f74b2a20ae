/* The engine's state and schedule: parameters and optimizer state per ZeRO stage, micro-batches
 * through the pipeline (GPipe or 1F1B), gradient reduction over DP, the tied head between the
 * first and last stage, global-norm clipping and AdamW. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "arch.h"
#include "engine_internal.h"
#include "pipeline.h"

static void *zalloc(int64_t n, size_t size)
{
    return calloc((size_t)(n > 0 ? n : 1), size);
}

static int setup_tensor(mps_engine *e, int t, mps_err *err)
{
    mps_tparam *p = &e->t[t];
    mps_tensor_spec_get(&e->cfg, t, &p->spec);
    mps_geometry(&e->cfg, &e->L, e->rank, MPS_KIND_PARAM, t, &p->param);
    if (!p->param.held)
        return 0;
    p->held = 1;
    mps_geometry(&e->cfg, &e->L, e->rank, MPS_KIND_ADAM_M, t, &p->opt);
    p->box_n = mps_box_numel(&p->param.box);
    p->decay = p->spec.decay; /* matrices and embeddings (the architecture table) */
    int64_t on = p->opt.flat_end - p->opt.flat_begin;
    p->m = buf_new(e, on);
    p->v = buf_new(e, on);
    p->dp_counts = zalloc(e->L.dp, sizeof(int64_t));
    p->dp_displs = zalloc(e->L.dp, sizeof(int64_t));
    if (!p->m || !p->v || !p->dp_counts || !p->dp_displs)
        return mps_fail(err, MPS_ENOMEM, "rank %d: out of memory for %s", e->rank, p->spec.name);
    for (int d = 0; d < e->L.dp; d++) {
        mps_piece q;
        mps_geometry(&e->cfg, &e->L, mps_layout_rank(&e->L, e->me.pp, d, e->me.tp), MPS_KIND_ADAM_M, t, &q);
        p->dp_displs[d] = q.flat_begin;
        p->dp_counts[d] = q.flat_end - q.flat_begin;
    }
    if (e->L.zero >= 3) {
        p->w_shard = buf_new(e, p->param.flat_end - p->param.flat_begin);
        if (!p->w_shard)
            return mps_fail(err, MPS_ENOMEM, "rank %d: out of memory for %s", e->rank, p->spec.name);
    } else if ((p->w = buf_new(e, p->box_n)) == NULL) {
        return mps_fail(err, MPS_ENOMEM, "rank %d: out of memory for %s", e->rank, p->spec.name);
    }
    if (e->L.zero >= 1 && (p->g_shard = buf_new(e, on)) == NULL)
        return mps_fail(err, MPS_ENOMEM, "rank %d: out of memory for %s", e->rank, p->spec.name);
    return 0;
}

/* One layer's activation buffers; with x_in_only, just the input (activation recompute). */
static int alloc_acts(mps_engine *e, mps_layer_acts *a, int x_in_only)
{
    int64_t N = e->N, C = e->C;
    if ((a->x_in = buf_new(e, N * C)) == NULL)
        return -1;
    if (x_in_only)
        return 0;
    float **bufs[] = { &a->ln1_mean, &a->ln1_rstd, &a->lse, &a->x2, &a->ln2_mean, &a->ln2_rstd };
    int64_t sizes[] = { N, N, (int64_t)e->B * e->Hl * e->T, N * C, N, N };
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
        if ((*bufs[i] = buf_new(e, sizes[i])) == NULL)
            return -1;
    void **acts[] = { &a->ln1, &a->qkv, &a->atty, &a->ln2, &a->fch, &a->gel };
    int64_t act_sizes[] = { N * C, N * e->qkv_w, N * e->Cl, N * C, N * e->fch_w, N * e->F };
    for (size_t i = 0; i < sizeof act_sizes / sizeof act_sizes[0]; i++)
        if ((*acts[i] = act_new(e, act_sizes[i])) == NULL)
            return -1;
    return 0;
}

static void free_acts(mps_engine *e, mps_layer_acts *a)
{
    void *bufs[] = { a->x_in, a->ln1, a->ln1_mean, a->ln1_rstd, a->qkv, a->atty, a->lse,
                     a->x2, a->ln2, a->ln2_mean, a->ln2_rstd, a->fch, a->gel };
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        buf_free(e, bufs[i]);
}

static int alloc_slot(mps_engine *e, mps_mb_slot *s)
{
    int64_t N = e->N, C = e->C;
    s->layers = zalloc(e->nlayers, sizeof *s->layers);
    s->x_out = buf_new(e, N * C);
    s->dx = buf_new(e, N * C);
    s->dx_act = act_new(e, N * C);
    s->dx_colsum = buf_new(e, C);
    if (!s->layers || !s->x_out || !s->dx || !s->dx_act || !s->dx_colsum)
        return -1;
    for (int l = 0; l < e->nlayers; l++)
        if (alloc_acts(e, &s->layers[l], e->o.recompute) != 0)
            return -1;
    return 0;
}

static void free_slot(mps_engine *e, mps_mb_slot *s)
{
    if (s->layers)
        for (int l = 0; l < e->nlayers; l++)
            free_acts(e, &s->layers[l]);
    free(s->layers);
    buf_free(e, s->x_out);
    buf_free(e, s->dx);
    buf_free(e, s->dx_act);
    buf_free(e, s->dx_colsum);
}

int mps_engine_new(const mps_config *cfg, const mps_layout *L, mps_comm *comm, const mps_backend *be,
                   const mps_train_opts *o, mps_engine **out, mps_err *err)
{
    *out = NULL;
    if (cfg->arch == MPS_ARCH_LLAMA && (!be->rmsnorm_fwd || !be->rmsnorm_bwd || !be->rope_fwd || !be->rope_bwd ||
                                        !be->swiglu_fwd || !be->swiglu_bwd || !be->gqa_fwd || !be->gqa_bwd ||
                                        !be->matmul_parts_fwd_act || !be->matmul_parts_bwd))
        return mps_fail(err, MPS_EUNSUPPORTED, "--backend %s trains GPT-2 models only; this checkpoint holds a %s model "
                        "(llama architecture): train it with --backend cpu", be->name, mps_family_name(cfg->family));
    if (cfg->head_dim && !be->any_head_dim)
        return mps_fail(err, MPS_EUNSUPPORTED, "--backend %s: the model's %d heads of head_dim %d are %lld wide, not "
                        "n_embd %d, and this backend's kernels are not validated for that (train with --backend cpu; "
                        "MPS_CUDA_ANY_HEAD_DIM=1 runs it anyway)", be->name, cfg->n_head, cfg->head_dim,
                        (long long)cfg->n_head * cfg->head_dim, cfg->n_embd);
    if (cfg->arch == MPS_ARCH_LLAMA && (mps_cfg_kv_heads(cfg) % L->tp != 0 || mps_cfg_head_dim(cfg) % 2 != 0))
        return mps_fail(err, MPS_EUSAGE, "--layout tp=%d must divide the model's %d key/value heads (and the head size "
                        "%d must be even for the rotary embeddings)", L->tp, mps_cfg_kv_heads(cfg),
                        mps_cfg_head_dim(cfg));
    if (comm->size != mps_layout_world(L))
        return mps_fail(err, MPS_EUSAGE, "--layout needs dp*pp*tp = %d processes but %d are running%s",
                        mps_layout_world(L), comm->size, comm->size == 1 ? " (launch with mpirun -np N)" : "");
    if (o->micro_batch < 1 || o->seq < 1 || o->global_batch < 1)
        return mps_fail(err, MPS_EUSAGE, "--micro-batch, --seq and --global-batch must be positive");
    if (o->seq > cfg->n_positions)
        return mps_fail(err, MPS_EUSAGE, "--seq %d exceeds the model's n_positions %d", o->seq, cfg->n_positions);
    /* the attention here is full causal: the model's sliding window is the same thing only for
     * sequences it covers (model.h) */
    if (o->seq > mps_cfg_max_seq(cfg))
        return mps_fail(err, MPS_EUNSUPPORTED, "--seq %d exceeds the model's sliding_window %d (the trainer's "
                        "attention is full causal, which is the model's only for sequences up to the window)",
                        o->seq, cfg->sliding_window);
    if (o->global_batch % (o->micro_batch * L->dp) != 0)
        return mps_fail(err, MPS_EUSAGE, "--global-batch %d must be a multiple of --micro-batch %d x dp %d",
                        o->global_batch, o->micro_batch, L->dp);
    if ((int64_t)o->micro_batch * o->seq * (int64_t)cfg->n_embd * 4 > INT32_MAX)
        return mps_fail(err, MPS_EUSAGE, "--micro-batch %d x --seq %d is too large for the CPU backend",
                        o->micro_batch, o->seq);
    mps_engine *e = calloc(1, sizeof *e);
    if (!e)
        return mps_fail(err, MPS_ENOMEM, "out of memory");
    e->cfg = *cfg;
    e->L = *L;
    e->comm = comm;
    e->be = be;
    e->o = *o;
    e->rank = comm->rank;
    e->me = mps_layout_coords(L, e->rank);
    e->first_layer = L->stage_first[e->me.pp];
    e->nlayers = L->stage_first[e->me.pp + 1] - e->first_layer;
    e->is_first = e->me.pp == 0;
    e->is_last = e->me.pp == L->pp - 1;
    e->B = o->micro_batch;
    e->T = o->seq;
    e->N = e->B * e->T;
    e->C = cfg->n_embd;
    e->hs = mps_cfg_head_dim(cfg);
    e->Hl = cfg->n_head / L->tp;
    e->Cl = e->Hl * e->hs;
    e->accum = o->global_batch / (o->micro_batch * L->dp);
    e->ntensors = mps_tensor_count(cfg);
    e->t = calloc((size_t)e->ntensors, sizeof *e->t);
    e->sum_started = calloc((size_t)e->ntensors, 1);
    e->scatter_tmp = calloc((size_t)e->ntensors, sizeof *e->scatter_tmp);
    /* ZeRO-0 sums and ZeRO-1 reduce-scatters run under the step's last backward pass */
    e->overlap_dp = !o->reduce_after_backward && L->dp > 1 && comm->can_start && comm->finish_started &&
                    ((L->zero == 0 && comm->allreduce_sum_many) || (L->zero == 1 && comm->reduce_scatter_many));
    /* ZeRO-2/3 reduce-scatter each layer's gradients during every micro-batch's backward and free
     * them, so that the stage's full gradients never exist at once (engine_grads.c) */
    e->scatter_each_layer = !o->reduce_after_backward && L->dp > 1 && L->zero >= 2 && comm->can_start &&
                            comm->finish_started && comm->reduce_scatter_many;
    if (!e->t || !e->sum_started || !e->scatter_tmp) {
        free(e->t);
        free(e->sum_started);
        free(e->scatter_tmp);
        free(e);
        return mps_fail(err, MPS_ENOMEM, "out of memory");
    }
    *out = e;
    for (int t = 0; t < e->ntensors; t++)
        if (setup_tensor(e, t, err) != 0)
            return -1;
    /* the local sizes come from the geometry of this rank's pieces */
    mps_piece p;
    const int llama = cfg->arch == MPS_ARCH_LLAMA;
    e->block = llama ? &mps_block_llama : &mps_block_gpt2;
    e->per_layer = mps_layer_tensor_count(cfg);
    /* the MLP's first product (column-parallel): its rows here are the local width */
    mps_geometry(cfg, L, e->rank, MPS_KIND_PARAM,
                 llama ? mps_layer_tensor_named(cfg, e->first_layer, "gatew")
                       : mps_layer_tensor(e->first_layer, MPS_SLOT_FCW), &p);
    e->F = (int)p.box.cnt[0];
    e->KVl = mps_cfg_kv_heads(cfg) / L->tp;
    mps_block_widths bw; /* the buffers' widths, as the planner counts them */
    mps_arch_block_widths(cfg, L->tp, &bw);
    e->qkv_w = (int)bw.qkv;
    e->fch_w = (int)bw.fc; /* Llama: gate, then up */
    /* the vocab rows of the embedding, or on a last stage of its own of the untied head (split alike) */
    mps_geometry(cfg, L, e->rank, MPS_KIND_PARAM,
                 mps_cfg_tied(cfg) || e->is_first ? MPS_TENSOR_WTE : mps_tensor_find(cfg, "lm_head"), &p);
    e->v0 = p.box.off[0];
    e->Vl = p.box.cnt[0];
    const int64_t wide = bw.wide;
    if (bw.ffn != e->F || bw.attn != e->Cl)
        return mps_fail(err, MPS_EFAIL, "rank %d: the block's widths disagree with the geometry", e->rank);
    if (llama && mps_rope_table(e, err) != 0)
        return -1;
    e->scratch_a = buf_new(e, (int64_t)e->N * wide);
    e->scratch_b = buf_new(e, (int64_t)e->N * (e->C + 8));
    e->logits = e->is_last ? act_new(e, (int64_t)e->N * e->Vl) : NULL;
    /* 1F1B keeps at most (stages after this one + 1) micro-batches in flight; GPipe all of them */
    int inflight = L->pp - e->me.pp;
    e->nslots = o->schedule == MPS_SCHED_GPIPE || inflight > e->accum ? e->accum : inflight;
    e->slots = calloc((size_t)e->nslots, sizeof *e->slots);
    e->nsend = mps_pipe_send_buffers(e->accum);
    e->send_x = calloc((size_t)e->nsend, sizeof(float *));
    e->send_dx = calloc((size_t)e->nsend, sizeof(float *));
    /* the backend's host memory (CUDA: pinned, so that the queued copy does not wait for the
     * device to stage it) */
    const size_t tok_bytes = (size_t)e->accum * (size_t)e->N * sizeof(int32_t);
    e->step_inputs = e->be->alloc_host(e->be->ctx, tok_bytes);
    e->step_targets = e->be->alloc_host(e->be->ctx, tok_bytes);
    e->step_inputs_dev = e->be->alloc(e->be->ctx, tok_bytes);
    e->step_targets_dev = e->be->alloc(e->be->ctx, tok_bytes);
    e->loss_acc = e->be->alloc(e->be->ctx, sizeof(double));
    if (!e->step_inputs || !e->step_targets || !e->step_inputs_dev || !e->step_targets_dev || !e->loss_acc ||
        !e->scratch_a || !e->scratch_b || (e->is_last && !e->logits) || !e->slots || !e->send_x || !e->send_dx)
        return mps_fail(err, MPS_ENOMEM, "rank %d: out of memory for activations", e->rank);
    for (int i = 0; i < e->nslots; i++)
        if (alloc_slot(e, &e->slots[i]) != 0)
            return mps_fail(err, MPS_ENOMEM, "rank %d: out of memory for activations", e->rank);
    if (o->recompute && (alloc_acts(e, &e->work, 0) != 0 || (e->work_out = buf_new(e, (int64_t)e->N * e->C)) == NULL))
        return mps_fail(err, MPS_ENOMEM, "rank %d: out of memory for activations", e->rank);
    for (int i = 0; i < e->nsend; i++) {
        if (!e->is_last && (e->send_x[i] = buf_new(e, (int64_t)e->N * e->C)) == NULL)
            return mps_fail(err, MPS_ENOMEM, "rank %d: out of memory for pipeline buffers", e->rank);
        if (!e->is_first && (e->send_dx[i] = buf_new(e, (int64_t)e->N * e->C)) == NULL)
            return mps_fail(err, MPS_ENOMEM, "rank %d: out of memory for pipeline buffers", e->rank);
    }
    return 0;
}

void mps_engine_free(mps_engine *e)
{
    if (!e)
        return;
    if (e->prefetch_n > 0) { /* (only after a failed step) the started gather done before its buffers go */
        mps_err ignored;
        (void)e->comm->finish_started(e->comm->ctx, &ignored);
    }
    for (int t = 0; t < e->ntensors; t++) {
        mps_tparam *p = &e->t[t];
        buf_free(e, p->w);
        buf_free(e, p->w_shard);
        buf_free(e, p->g);
        buf_free(e, p->g_shard);
        buf_free(e, p->m);
        buf_free(e, p->v);
        free(p->dp_counts);
        free(p->dp_displs);
    }
    for (int t = 0; e->scatter_tmp && t < e->ntensors; t++)
        buf_free(e, e->scatter_tmp[t]);
    free(e->t);
    free(e->sum_started);
    free(e->scatter_tmp);
    if (e->slots)
        for (int i = 0; i < e->nslots; i++)
            free_slot(e, &e->slots[i]);
    free(e->slots);
    free_acts(e, &e->work);
    buf_free(e, e->work_out);
    for (int i = 0; e->send_x && i < e->nsend; i++) {
        buf_free(e, e->send_x[i]);
        buf_free(e, e->send_dx[i]);
    }
    free(e->send_x);
    free(e->send_dx);
    buf_free(e, e->scratch_a);
    buf_free(e, e->scratch_b);
    buf_free(e, e->logits);
    buf_free(e, e->rope_cs);
    e->be->release_host(e->be->ctx, e->step_inputs);
    e->be->release_host(e->be->ctx, e->step_targets);
    buf_free(e, e->step_inputs_dev);
    buf_free(e, e->step_targets_dev);
    buf_free(e, e->loss_acc);
    free(e);
}

int mps_layer_first_tensor(const mps_config *cfg, int layer)
{
    return mps_tensor_index(cfg, mps_arch_of(cfg->arch)->n_embed, layer);
}

int mps_layer_tensor_count(const mps_config *cfg)
{
    const mps_arch *a = mps_arch_of(cfg->arch);
    int n = 0;
    for (int r = a->n_embed; r < a->n_embed + a->n_layer_rules; r++)
        n += mps_rule_present(cfg, &a->rules[r]);
    return n;
}

int mps_layer_tensor_named(const mps_config *cfg, int layer, const char *name)
{
    char full[MPS_NAME_MAX];
    snprintf(full, sizeof full, "h.%d.%s", layer, name);
    return mps_tensor_find(cfg, full);
}

/* The inverse frequencies of the rotary embeddings as transformers computes them: theta^(-2i/hd)
 * (also with dynamic NTK scaling, which changes them only for sequences past n_positions, never
 * trained here: mps_engine_new refuses --seq above it); with linear scaling all of them divided by
 * the factor; with Llama 3's scaling (its _compute_llama3_parameters) the long wavelengths divided
 * by the factor, the medium ones blended smoothly. */
static double rope_inv_freq(const mps_config *cfg, int i, int hd)
{
    double f = 1.0 / pow(mps_cfg_rope_theta(cfg), 2.0 * i / hd);
    if (cfg->rope.type == MPS_ROPE_LINEAR)
        return f / cfg->rope.factor;
    if (cfg->rope.type != MPS_ROPE_LLAMA3)
        return f;
    const double factor = cfg->rope.factor, lo = cfg->rope.low_freq_factor, hi = cfg->rope.high_freq_factor;
    const double old = cfg->rope.original_max_positions;
    const double wavelen = 2.0 * M_PI / f, lo_wavelen = old / lo, hi_wavelen = old / hi;
    if (wavelen < hi_wavelen)
        return f;
    if (wavelen > lo_wavelen)
        return f / factor;
    const double smooth = (old / wavelen - lo) / (hi - lo);
    return (1.0 - smooth) * f / factor + smooth * f;
}

/* The rotary table (2, T, hd/2) on the backend: cosines, then sines of t * inv_freq[i]. */
int mps_rope_table(mps_engine *e, mps_err *err)
{
    const int half = e->hs / 2;
    const int64_t n = (int64_t)e->T * half;
    float *host = malloc(sizeof *host * (size_t)(2 * n));
    e->rope_cs = buf_new(e, 2 * n);
    if (!host || !e->rope_cs) {
        free(host);
        return mps_fail(err, MPS_ENOMEM, "rank %d: out of memory for the rotary table", e->rank);
    }
    for (int t = 0; t < e->T; t++)
        for (int i = 0; i < half; i++) {
            double angle = (double)t * rope_inv_freq(&e->cfg, i, e->hs);
            host[(int64_t)t * half + i] = (float)cos(angle);
            host[n + (int64_t)t * half + i] = (float)sin(angle);
        }
    e->be->from_host(e->be->ctx, e->rope_cs, host, sizeof *host * (size_t)(2 * n));
    free(host);
    return 0;
}

/* ---- weights and gradients ---- */

/* The boxes p->w of count tensors rebuilt in place from every DP replica's part of them, in one
 * allgather_many group, done now or started (start: comm.h can_start). */
static int allgather_boxes(mps_engine *e, const int *tensors, int count, int start, mps_err *err)
{
    if (count <= 0)
        return 0;
    float **bufs = malloc(sizeof *bufs * (size_t)count);
    const int64_t **counts = malloc(sizeof *counts * (size_t)count);
    const int64_t **displs = malloc(sizeof *displs * (size_t)count);
    int rc = bufs && counts && displs ? 0 : mps_fail(err, MPS_ENOMEM, "out of memory");
    for (int i = 0; rc == 0 && i < count; i++) {
        bufs[i] = e->t[tensors[i]].w;
        counts[i] = e->t[tensors[i]].dp_counts;
        displs[i] = e->t[tensors[i]].dp_displs;
    }
    if (rc == 0 && e->comm->allgather_many(e->comm->ctx, MPS_GROUP_DP, bufs, counts, displs, count, start, err) != 0)
        rc = mps_wrap(err, "gathering the weights over DP");
    free(bufs);
    free(counts);
    free(displs);
    return rc;
}

/* ZeRO-3: the boxes not in use are gathered from the DP group for the duration of the use: each
 * replica's shard copied to its place, then one in-place group gather, done now or started
 * (start: comm.h can_start; else a gather per tensor). Every tensor's use count goes up by one. */
static int gather_many(mps_engine *e, const int *tensors, int count, int start, mps_err *err)
{
    int *gathered = malloc(sizeof *gathered * (size_t)(count > 0 ? count : 1));
    int n = 0, done = 0, rc = gathered ? 0 : mps_fail(err, MPS_ENOMEM, "out of memory");
    for (; rc == 0 && done < count; done++) {
        mps_tparam *p = &e->t[tensors[done]];
        if (p->w_users++ > 0)
            continue;
        if ((p->w = buf_new(e, p->box_n)) == NULL) {
            p->w_users = 0;
            rc = mps_fail(err, MPS_ENOMEM, "rank %d: out of memory gathering %s", e->rank, p->spec.name);
            break;
        }
        if (e->comm->allgather_many) {
            buf_copy(e, p->w + p->dp_displs[e->me.dp], p->w_shard, p->dp_counts[e->me.dp]);
            gathered[n++] = tensors[done];
        } else if (e->comm->allgather(e->comm->ctx, MPS_GROUP_DP, p->w_shard, p->w, p->dp_counts, p->dp_displs, err)) {
            rc = mps_wrap(err, "gathering %s", p->spec.name);
            done++;
            break;
        }
    }
    if (rc == 0)
        rc = allgather_boxes(e, gathered, n, start, err);
    free(gathered);
    if (rc != 0) /* undo the acquires made */
        for (int i = 0; i < done; i++)
            mps_weights_release(e, tensors[i]);
    return rc;
}

/* A started gather (mps_weights_prefetch) complete for the compute stream's later work, and its
 * use counts returned: the tensors an acquire took meanwhile stay, the others are freed. */
static int finish_prefetch(mps_engine *e, mps_err *err)
{
    if (e->prefetch_n == 0)
        return 0;
    int rc = e->comm->finish_started(e->comm->ctx, err);
    for (int i = 0; i < e->prefetch_n; i++)
        mps_weights_release(e, e->prefetch[i]);
    e->prefetch_n = 0;
    return rc;
}

int mps_weights_acquire_many(mps_engine *e, const int *tensors, int count, float **const *w, mps_err *err)
{
    if (e->L.zero >= 3) {
        /* the prefetched tensors are in use already: no second gather for them */
        int rc = gather_many(e, tensors, count, 0, err);
        if (finish_prefetch(e, err) != 0 && rc == 0) {
            for (int i = 0; i < count; i++)
                mps_weights_release(e, tensors[i]);
            rc = -1;
        }
        if (rc != 0)
            return -1;
    }
    for (int i = 0; i < count; i++)
        *w[i] = e->t[tensors[i]].w;
    return 0;
}

int mps_weights_prefetch(mps_engine *e, const int *tensors, int count, mps_err *err)
{
    if (e->L.zero < 3 || e->L.dp == 1 || !e->comm->can_start || !e->comm->allgather_many || !e->comm->finish_started ||
        e->prefetch_n > 0 || count > MPS_TENSORS_PER_LAYER)
        return 0;
    if (gather_many(e, tensors, count, 1, err) != 0)
        return -1;
    memcpy(e->prefetch, tensors, sizeof *tensors * (size_t)count);
    e->prefetch_n = count;
    return 0;
}

void mps_weights_release(mps_engine *e, int tensor)
{
    mps_tparam *p = &e->t[tensor];
    if (e->L.zero < 3 || p->w_users == 0)
        return;
    if (--p->w_users == 0) {
        buf_free(e, p->w);
        p->w = NULL;
    }
}

float *mps_grad(mps_engine *e, int tensor, mps_err *err)
{
    mps_tparam *p = &e->t[tensor];
    if (!p->g && (p->g = buf_new(e, p->box_n)) == NULL)
        mps_fail(err, MPS_ENOMEM, "rank %d: out of memory for the gradient of %s", e->rank, p->spec.name);
    return p->g;
}

/* ZeRO-1/2: each replica holds the whole box but owns (updates, or loads from master) only its
 * partition; the boxes are rebuilt from every replica's partition: in place, all in one group
 * where the comm backend has allgather_many, else a tensor at a time from a copy of the own part.
 * (The partitions are never whole boxes at dp > 1, so the backend keeps no operand copy of these
 * weights that NCCL's writes would leave stale: mps_adamw_job.read_by_products.) */
int mps_gather_boxes(mps_engine *e, mps_err *err)
{
    if (e->comm->allgather_many) {
        int *held = malloc(sizeof *held * (size_t)e->ntensors);
        int count = 0;
        if (!held)
            return mps_fail(err, MPS_ENOMEM, "out of memory");
        for (int t = 0; t < e->ntensors; t++)
            if (e->t[t].held)
                held[count++] = t;
        int rc = allgather_boxes(e, held, count, 0, err);
        free(held);
        return rc;
    }
    for (int t = 0; t < e->ntensors; t++) {
        mps_tparam *p = &e->t[t];
        if (!p->held)
            continue;
        int64_t on = p->opt.flat_end - p->opt.flat_begin;
        float *mine = buf_new(e, on);
        if (!mine)
            return mps_fail(err, MPS_ENOMEM, "rank %d: out of memory gathering %s", e->rank, p->spec.name);
        buf_copy(e, mine, p->w + p->opt.flat_begin, on);
        int rc = e->comm->allgather(e->comm->ctx, MPS_GROUP_DP, mine, p->w, p->dp_counts, p->dp_displs, err);
        buf_free(e, mine);
        if (rc != 0)
            return mps_wrap(err, "gathering %s over DP", p->spec.name);
    }
    return 0;
}

/* ---- the schedule ---- */

/* Replica d takes sequences [d * G/dp, (d + 1) * G/dp) of the step, in micro-batches of B: the
 * step's batch is the same whatever the layout. Read before the schedule starts, and every rank
 * told whether all of them succeeded (all_ok), so that a bad token stops every rank at the same
 * point rather than leaving peers in a collective. `what`: whose tokens, for the message. */
static int read_step_tokens(mps_engine *e, const mps_tokens *data, int64_t first_seq, const char *what,
                            mps_err *err)
{
    int per_replica = e->o.global_batch / e->L.dp;
    int64_t first = first_seq + (int64_t)e->me.dp * per_replica;
    if (e->tokens_queued && e->be->sync(e->be->ctx, err) != 0) /* the last copy has read them */
        return -1;
    e->tokens_queued = 0;
    int ok = 1;
    for (int i = 0; i < per_replica && ok; i++)
        ok = mps_tokens_read(data, first + i, e->step_inputs + (int64_t)i * e->T, e->step_targets + (int64_t)i * e->T,
                             err) == 0;
    if (!e->comm->all_ok(e->comm->ctx, ok))
        return ok ? mps_fail(err, MPS_ECORRUPT, "reading %s tokens failed on another rank", what) : -1;
    /* the step's tokens to the backend in one copy each, queued after the previous step's
     * readers (its optimizer may still be running: no wait here) */
    size_t bytes = (size_t)per_replica * (size_t)e->T * sizeof(int32_t);
    e->be->from_host_queued(e->be->ctx, e->step_inputs_dev, e->step_inputs, bytes);
    e->be->from_host_queued(e->be->ctx, e->step_targets_dev, e->step_targets, bytes);
    e->tokens_queued = 1;
    e->loss_first = 1;
    return 0;
}

/* the micro-batch's rows of the step's tokens (no copy, no wait) */
static void load_batch(mps_engine *e, mps_mb_slot *s, int mb)
{
    s->inputs = e->step_inputs_dev + (int64_t)mb * e->N;
    s->targets = e->step_targets_dev + (int64_t)mb * e->N;
}

/* this step's summed token losses so far (a wait for the device; 0 where no head ran) */
static int read_loss_sum(mps_engine *e, double *sum, mps_err *err)
{
    *sum = 0;
    if (!e->is_last || e->loss_first)
        return 0;
    e->be->to_host(e->be->ctx, sum, e->loss_acc, sizeof *sum);
    return e->be->sync(e->be->ctx, err);
}

static int stage_rank(const mps_engine *e, int stage)
{
    return mps_layout_rank(&e->L, stage, e->me.dp, e->me.tp);
}

static int forward_mb(mps_engine *e, int mb, mps_err *err)
{
    mps_mb_slot *s = &e->slots[mb % e->nslots];
    load_batch(e, s, mb);
    e->dw_set = e->L.zero == 0 && mb == 0; /* the head's product, the step's first into wte's gradient */
    int64_t n = (int64_t)e->N * e->C;
    if (!e->is_first && e->comm->recv(e->comm->ctx, stage_rank(e, e->me.pp - 1), s->layers[0].x_in, n, TAG_FWD(mb),
                                      err) != 0)
        return -1;
    if (mps_model_forward(e, s, err) != 0)
        return -1;
    if (!e->is_last) {
        float *out = e->send_x[mb % e->nsend];
        if (e->comm->send_wait(e->comm->ctx, out, err) != 0)
            return -1;
        buf_copy(e, out, s->x_out, n);
        return e->comm->send(e->comm->ctx, stage_rank(e, e->me.pp + 1), out, n, TAG_FWD(mb), err);
    }
    return 0;
}

static int backward_mb(mps_engine *e, int mb, mps_err *err)
{
    mps_mb_slot *s = &e->slots[mb % e->nslots];
    int64_t n = (int64_t)e->N * e->C;
    e->last_backward = mb == e->accum - 1; /* the gradients are final layer by layer */
    e->dw_set = e->L.zero == 0 && mb == 0;  /* the step's first backward overwrites the weights' */
    if (!e->is_last) {
        s->dx_ready = MPS_DX_NONE;
        if (e->comm->recv(e->comm->ctx, stage_rank(e, e->me.pp + 1), s->dx, n, TAG_BWD(mb), err) != 0)
            return -1;
    }
    if (mps_model_backward(e, s, err) != 0)
        return -1;
    if (!e->is_first) {
        float *out = e->send_dx[mb % e->nsend];
        if (e->comm->send_wait(e->comm->ctx, out, err) != 0)
            return -1;
        buf_copy(e, out, s->dx, n);
        if (e->comm->send(e->comm->ctx, stage_rank(e, e->me.pp - 1), out, n, TAG_BWD(mb), err) != 0)
            return -1;
    }
    if (e->L.zero >= 2 && e->L.dp > 1)
        return mps_reduce_scatter_grads(e, err);
    return 0;
}

static int run_schedule(mps_engine *e, mps_err *err)
{
    int M = e->accum;
    if (e->o.schedule == MPS_SCHED_GPIPE) {
        for (int mb = 0; mb < M; mb++)
            if (forward_mb(e, mb, err) != 0)
                return -1;
        for (int mb = 0; mb < M; mb++)
            if (backward_mb(e, mb, err) != 0)
                return -1;
        return 0;
    }
    /* 1F1B: warm up with the forwards the later stages need, then alternate, then drain */
    int warm = e->L.pp - e->me.pp - 1;
    if (warm > M)
        warm = M;
    int fwd = 0, bwd = 0;
    for (; fwd < warm; fwd++)
        if (forward_mb(e, fwd, err) != 0)
            return -1;
    for (; fwd < M; fwd++, bwd++)
        if (forward_mb(e, fwd, err) != 0 || backward_mb(e, bwd, err) != 0)
            return -1;
    for (; bwd < M; bwd++)
        if (backward_mb(e, bwd, err) != 0)
            return -1;
    return 0;
}

/* The reduced gradient of tensor t over the optimizer's flat range. */
static float *reduced_grad(mps_engine *e, mps_tparam *p)
{
    (void)e;
    return e->L.zero == 0 ? p->g : p->g_shard;
}

/* Global gradient norm: every distinct element counted once over the world. */
static int grad_norm(mps_engine *e, double *out, mps_err *err)
{
    /* (one wait for the device for all of them) */
    const float **xs = malloc(sizeof *xs * (size_t)e->ntensors);
    int64_t *ns = malloc(sizeof *ns * (size_t)e->ntensors);
    int count = 0;
    if (!xs || !ns) {
        free(xs);
        free(ns);
        return mps_fail(err, MPS_ENOMEM, "out of memory");
    }
    for (int t = 0; t < e->ntensors; t++) {
        mps_tparam *p = &e->t[t];
        if (!p->held)
            continue;
        if (t == MPS_TENSOR_WTE && e->L.pp > 1 && !e->is_first)
            continue; /* the tied head's copy */
        if (p->spec.tp_dim < 0 && e->me.tp != 0)
            continue; /* replicated over TP */
        if (e->L.zero == 0 && e->me.dp != 0)
            continue; /* replicated over DP */
        ns[count] = e->L.zero == 0 ? p->box_n : p->opt.flat_end - p->opt.flat_begin;
        xs[count++] = reduced_grad(e, p);
    }
    double sumsq = e->be->sumsq_many(e->be->ctx, xs, ns, count);
    free(xs);
    free(ns);
    if (e->comm->allreduce_sum_f64(e->comm->ctx, MPS_GROUP_WORLD, &sumsq, 1, err) != 0)
        return -1;
    *out = sqrt(sumsq);
    return 0;
}

float mps_engine_lr(const mps_train_opts *o, int64_t step)
{
    if (step < o->warmup)
        return o->lr * (float)(step + 1) / (float)o->warmup;
    if (o->decay_steps <= o->warmup || o->lr_min == o->lr)
        return o->lr;
    double progress = (double)(step - o->warmup) / (double)(o->decay_steps - o->warmup);
    if (progress > 1)
        progress = 1;
    return (float)(o->lr_min + 0.5 * (1.0 + cos(M_PI * progress)) * (o->lr - o->lr_min));
}

/* AdamW over every held tensor in one backend call (which zeroes the gradients but, at ZeRO-0,
 * those the block's products write: the next step's first product into each overwrites it, for
 * a tied wte the head's, which comes before the embedding's backward), then at
 * ZeRO-1/2 the updated partitions are gathered back into each replica's full copy. */
static int optimizer_step(mps_engine *e, int64_t step, float lr, float clip_scale, mps_err *err)
{
    mps_adamw_job *jobs = malloc(sizeof *jobs * (size_t)(e->ntensors > 0 ? e->ntensors : 1));
    if (!jobs)
        return mps_fail(err, MPS_ENOMEM, "out of memory");
    int count = 0;
    for (int t = 0; t < e->ntensors; t++) {
        mps_tparam *p = &e->t[t];
        if (!p->held)
            continue;
        int64_t ob = p->opt.flat_begin, on = p->opt.flat_end - ob;
        jobs[count++] = (mps_adamw_job){
            .param = e->L.zero >= 3 ? p->w_shard : p->w + ob,
            .grad = e->L.zero == 0 ? p->g : p->g_shard,
            .m = p->m, .v = p->v, .n = on,
            .weight_decay = p->decay ? e->o.weight_decay : 0.0f,
            .read_by_products = e->L.zero < 3 && on == p->box_n, /* the whole box, where the products read it */
            .keep_grad = e->L.zero == 0 && e->block->grad_overwritten(e, t),
        };
    }
    const mps_adamw_step st = {.lr = lr, .beta1 = e->o.beta1, .beta2 = e->o.beta2, .eps = e->o.eps, .t = step + 1,
                               .grad_scale = clip_scale};
    e->be->adamw_many(e->be->ctx, jobs, count, &st);
    free(jobs);
    if (e->L.zero >= 1 && e->L.zero < 3 && e->L.dp > 1)
        return mps_gather_boxes(e, err);
    return 0;
}

int mps_engine_grads(mps_engine *e, const mps_tokens *data, int64_t first_seq, double *loss, double *norm,
                     mps_err *err)
{
    if (read_step_tokens(e, data, first_seq, "the step's", err) != 0)
        return -1;
    int rc = run_schedule(e, err);
    if (rc == 0)
        rc = e->comm->flush(e->comm->ctx, err);
    if (rc == 0)
        rc = mps_reduce_grads(e, err);
    if (rc == 0)
        rc = grad_norm(e, norm, err);
    if (rc == 0 && (rc = e->be->sync(e->be->ctx, err)) == 0) /* (the norm's fetch has waited already) */
        e->tokens_queued = 0;
    double sum = 0;
    if (rc == 0)
        rc = read_loss_sum(e, &sum, err);
    if (rc == 0)
        rc = e->comm->allreduce_sum_f64(e->comm->ctx, MPS_GROUP_WORLD, &sum, 1, err);
    *loss = sum / ((double)e->o.global_batch * e->T);
    return rc;
}

int mps_engine_eval(mps_engine *e, const mps_tokens *data, int64_t first_seq, int batches, double *loss,
                    mps_err *err)
{
    double sum = 0;
    int rc = 0;
    e->evaluating = 1;
    for (int b = 0; b < batches && rc == 0; b++) {
        if ((rc = read_step_tokens(e, data, first_seq + (int64_t)b * e->o.global_batch, "the evaluation's",
                                       err)) != 0)
            break;
        /* forward passes in micro-batch order (each stage passes its output on), then the sends'
         * buffers are free for the next batch */
        for (int mb = 0; mb < e->accum && rc == 0; mb++)
            rc = forward_mb(e, mb, err);
        if (rc == 0)
            rc = e->comm->flush(e->comm->ctx, err);
        double batch_sum = 0;
        if (rc == 0)
            rc = read_loss_sum(e, &batch_sum, err);
        sum += batch_sum;
    }
    e->evaluating = 0;
    if (rc == 0)
        rc = e->comm->allreduce_sum_f64(e->comm->ctx, MPS_GROUP_WORLD, &sum, 1, err);
    if (rc == 0)
        rc = e->be->sync(e->be->ctx, err);
    *loss = sum / ((double)batches * e->o.global_batch * e->T);
    return rc;
}

int mps_engine_step(mps_engine *e, const mps_tokens *data, int64_t first_seq, int64_t step, mps_step_stats *stats,
                    mps_err *err)
{
    double loss, norm;
    if (mps_engine_grads(e, data, first_seq, &loss, &norm, err) != 0)
        return -1;
    /* every rank has the same loss and norm (summed over the world): all stop here together,
     * before an update that would spread the NaN or infinity into the weights and the moments */
    if (!isfinite(loss) || !isfinite(norm))
        return mps_fail(err, MPS_EFAIL, "step %lld: the loss (%g) or the gradient norm (%g) is not finite; the update "
                        "is not applied", (long long)step + 1, loss, norm);
    float lr = mps_engine_lr(&e->o, step);
    float clip = 1.0f;
    if (e->o.grad_clip > 0 && norm > e->o.grad_clip)
        clip = (float)(e->o.grad_clip / (norm + 1e-6));
    /* no wait for the update: the next step's tokens and forward queue behind it, and what reads
     * the weights on the host (saves) waits for the device itself */
    if (optimizer_step(e, step, lr, clip, err) != 0)
        return -1;
    stats->loss = loss;
    stats->grad_norm = norm;
    stats->lr = lr;
    return 0;
}

int64_t mps_engine_state_bytes(const mps_engine *e)
{
    int64_t n = 0;
    for (int t = 0; t < e->ntensors; t++) {
        const mps_tparam *p = &e->t[t];
        if (!p->held)
            continue;
        int64_t on = p->opt.flat_end - p->opt.flat_begin;
        n += (e->L.zero >= 3 ? p->param.flat_end - p->param.flat_begin : p->box_n) + 2 * on;
        n += e->L.zero >= 1 ? on : p->box_n;
    }
    return n * 4;
}
