/* The memory planner: per-rank bytes by state kind (through mps_geometry), activations,
 * communication volume per step, and the layouts that fit a number of GPUs. */
#include "inspect/plan.h"

#include "arch.h"
#include "pipeline.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static const char *const precision_names[] = { "fp32", "mixed" };
static const char *const recompute_names[] = { "none", "selective", "full" };

const char *mps_precision_name(mps_precision p) { return p == MPS_PRECISION_MIXED ? "mixed" : "fp32"; }
const char *mps_recompute_name(mps_recompute r)
{
    return (r >= MPS_RECOMPUTE_NONE && r <= MPS_RECOMPUTE_FULL) ? recompute_names[r] : "?";
}

int mps_precision_from_name(const char *name)
{
    for (int i = 0; i < 2; i++)
        if (strcmp(name, precision_names[i]) == 0)
            return i;
    return -1;
}

int mps_recompute_from_name(const char *name)
{
    for (int i = 0; i < 3; i++)
        if (strcmp(name, recompute_names[i]) == 0)
            return i;
    return -1;
}

void mps_plan_opts_default(const mps_config *cfg, mps_plan_opts *o)
{
    memset(o, 0, sizeof *o);
    o->precision = MPS_PRECISION_FP32;
    o->micro_batch = 1;
    o->seq = cfg->n_positions;
    o->recompute = MPS_RECOMPUTE_NONE;
}

int mps_kind_bytes(mps_precision p, mps_kind kind)
{
    if (p == MPS_PRECISION_FP32)
        return kind == MPS_KIND_MASTER ? 0 : 4; /* the weights are the master copy */
    /* bf16 weights for the products; gradients accumulated in fp32 (mpshard's trainer, and
     * Megatron-LM's default: 18 bytes a parameter before ZeRO, not the ZeRO paper's 16) */
    return kind == MPS_KIND_PARAM ? 2 : 4;
}

/* Bytes of the activations a TP/PP collective moves per element: the training dtype. */
static int activation_elem_bytes(mps_precision p) { return p == MPS_PRECISION_MIXED ? 2 : 4; }

static int64_t microbatches_for(const mps_layout *L, const mps_plan_opts *o)
{
    int64_t global = o->global_batch > 0 ? o->global_batch : (int64_t)mps_layout_world(L) * o->micro_batch;
    int64_t per_step = (int64_t)L->dp * o->micro_batch;
    int64_t m = (global + per_step - 1) / per_step;
    return m > 0 ? m : 1;
}

static long double layer_activation_bytes(const mps_config *cfg, const mps_layout *L, const mps_plan_opts *o,
                                          int recompute)
{
    return mps_arch_layer_activation_bytes(cfg, o->seq, o->micro_batch, L->tp, recompute,
                                           activation_elem_bytes(o->precision));
}

/* The trainer's buffers beside the layers' (train/engine.c), per stage: per micro-batch in flight
 * its output, gradient (fp32) and the gradient as an operand; the step's token ids and targets
 * (every micro-batch's, moved in one copy) and the loss's double; two scratch
 * buffers of the block's widest backward product and (tokens, C + 8) floats; the pipeline's send
 * buffers to each neighbouring stage, a ring of fp32 (tokens, C) (train/pipeline.h); under full
 * recomputation one layer's whole activations and its output, where the backward recomputes. */
static long double stage_buffer_bytes(const mps_config *cfg, const mps_layout *L, const mps_plan_opts *o, int stage,
                                      int64_t in_flight, int64_t microbatches)
{
    const long double tokens = (long double)o->micro_batch * (long double)o->seq, c = cfg->n_embd;
    mps_block_widths w;
    mps_arch_block_widths(cfg, L->tp, &w);
    long double total = (long double)in_flight * tokens * (8.0L + activation_elem_bytes(o->precision)) * c;
    total += (long double)microbatches * tokens * 8.0L + 8.0L;
    total += tokens * 4.0L * ((long double)w.wide + c + 8.0L);
    const int neighbours = (stage > 0) + (stage < L->pp - 1);
    const int ring = mps_pipe_send_buffers(microbatches);
    total += (long double)neighbours * (long double)ring * tokens * 4.0L * c;
    if (o->recompute == MPS_RECOMPUTE_FULL)
        total += layer_activation_bytes(cfg, L, o, MPS_RECOMPUTE_NONE) + tokens * 4.0L * c;
    return total;
}

static int64_t activation_bytes_m(const mps_config *cfg, const mps_layout *L, const mps_plan_opts *o, int stage,
                                  int64_t microbatches)
{
    /* 1F1B: stage i has pp - i micro-batches in flight at its peak (fewer if the step has fewer);
     * the first stage thus holds pp * L/pp = L layers' worth. GPipe: all of the step's, on every
     * stage (train/engine.c gives it a slot per micro-batch). */
    int64_t in_flight = L->pp - stage;
    if (in_flight > microbatches || o->gpipe)
        in_flight = microbatches;
    int64_t layers = L->stage_first[stage + 1] - L->stage_first[stage];
    long double total = layer_activation_bytes(cfg, L, o, (int)o->recompute) * (long double)layers *
                        (long double)in_flight;
    total += stage_buffer_bytes(cfg, L, o, stage, in_flight, microbatches);
    if (stage == L->pp - 1) {
        /* the head's logits (b, s, Vp/t) in the training dtype, one micro-batch's at a time (the
         * last stage runs the head's backward right after its forward, in place over them): for
         * GPT-2 124M at b = 32, s = 1024 they are 3.3 GB in bf16, more than a layer's activations */
        const long double vl = (long double)((cfg->padded_vocab + L->tp - 1) / L->tp);
        total += (long double)o->micro_batch * (long double)o->seq * vl * activation_elem_bytes(o->precision);
    }
    if (!(total < 4.0e18L))
        return -1;
    return (int64_t)llroundl(total);
}

int64_t mps_activation_bytes(const mps_config *cfg, const mps_layout *L, const mps_plan_opts *o, int stage)
{
    return activation_bytes_m(cfg, L, o, stage, microbatches_for(L, o));
}

int64_t mps_transient_bytes(const mps_config *cfg, const mps_layout *L, const mps_plan_opts *o, int stage,
                            int tp_rank)
{
    const mps_precision precision = o->precision;
    if (L->dp <= 1 || L->zero < 2)
        return 0;
    /* the TP boxes (unsharded: ZeRO-0 geometry) of the stage's first layer and of the tensors outside
     * the layers it holds (embeddings, the final norm, an untied head) */
    mps_layout box_layout = *L;
    box_layout.zero = 0;
    const int rank = mps_layout_rank(L, stage, 0, tp_rank);
    int first_layer = L->stage_first[stage];
    const mps_arch *arch = mps_arch_of(cfg->arch);
    const int nrules = arch->n_embed + arch->n_layer_rules + arch->n_final;
    int tensors[64], n = 0;
    for (int r = arch->n_embed; r < arch->n_embed + arch->n_layer_rules; r++)
        if (mps_tensor_index(cfg, r, first_layer) >= 0)
            tensors[n++] = mps_tensor_index(cfg, r, first_layer);
    const int nlayer_tensors = n;
    for (int r = 0; r < nrules; r++)
        if ((r < arch->n_embed || r >= arch->n_embed + arch->n_layer_rules) && mps_tensor_index(cfg, r, -1) >= 0)
            tensors[n++] = mps_tensor_index(cfg, r, -1);
    int64_t layer = 0, outside = 0;
    for (int i = 0; i < n; i++) {
        mps_tensor_spec spec;
        mps_tensor_spec_get(cfg, tensors[i], &spec);
        if (!mps_stage_holds(cfg, L, stage, &spec))
            continue;
        mps_piece piece;
        mps_geometry(cfg, &box_layout, rank, MPS_KIND_PARAM, tensors[i], &piece);
        if (piece.held)
            *(i < nlayer_tensors ? &layer : &outside) += mps_box_numel(&piece.box);
    }
    /* (the layers are all the same shape: n layers' full tensors are n times one; a one-layer stage
     * never holds two) */
    const int64_t stage_layers = L->stage_first[stage + 1] - L->stage_first[stage];
    const int64_t two = stage_layers < 2 ? stage_layers : 2;
    int64_t grads = ((o->no_overlap ? stage_layers : two) * layer + outside) * mps_kind_bytes(precision, MPS_KIND_GRAD);
    int64_t gathered = two * layer > outside + layer ? two * layer : outside + layer;
    return grads + (L->zero >= 3 ? gathered * mps_kind_bytes(precision, MPS_KIND_PARAM) : 0);
}

struct mps_plan {
    mps_config cfg;
    mps_layout L;
    mps_plan_opts o;
    int world;
    int64_t microbatches;
    int sharded[MPS_KIND_COUNT]; /* the kind is split over the DP group (ZeRO stage and dp > 1) */
    int64_t *unsharded_elems;    /* [stage * tp + tp_rank]: elements held of each kind not split over DP */
    int64_t *sharded_elems;      /* [rank]: elements held of each kind split over DP (NULL if none is) */
    int64_t *full_params;        /* [stage * tp + tp_rank]: parameters of the TP/PP box before ZeRO splits them */
    int64_t *tied_head;          /* [tp_rank]: wte elements of the TP box (gradient summed between first and last stage) */
    int64_t *activations;        /* [stage] */
    int64_t *transient;          /* [stage * tp + tp_rank] */
};

void mps_plan_free(mps_plan *p)
{
    if (!p)
        return;
    free(p->unsharded_elems);
    free(p->sharded_elems);
    free(p->full_params);
    free(p->tied_head);
    free(p->activations);
    free(p->transient);
    free(p);
}

/* Tensors whose specs agree in shape and TP split get the same piece from mps_geometry on any rank
 * whose stage holds them: the layers of a stage are counted as a multiple of one representative. */
typedef struct {
    int ndim, tp_dim;
    int64_t shape[MPS_MAX_DIMS];
} tensor_class;

static int class_equal(const tensor_class *a, const mps_tensor_spec *s)
{
    if (a->ndim != s->ndim || a->tp_dim != s->tp_dim)
        return 0;
    for (int i = 0; i < s->ndim; i++)
        if (a->shape[i] != s->shape[i])
            return 0;
    return 1;
}

/* Sums, over the tensor classes a stage holds, count * elements held by `rank` of kind; also the
 * elements of the TP/PP boxes (before the ZeRO split) when box_total is not NULL. */
static int64_t rank_class_sum(const mps_plan *p, int rank, mps_kind kind, int nclasses, const int *count,
                              const int *rep, int64_t *box_total)
{
    int64_t elems = 0, boxes = 0;
    for (int c = 0; c < nclasses; c++) {
        if (count[c] == 0)
            continue;
        mps_piece piece;
        mps_geometry(&p->cfg, &p->L, rank, kind, rep[c], &piece);
        if (!piece.held)
            continue;
        elems += (int64_t)count[c] * (piece.flat_end - piece.flat_begin);
        boxes += (int64_t)count[c] * mps_box_numel(&piece.box);
    }
    if (box_total)
        *box_total = boxes;
    return elems;
}

int mps_plan_build(const mps_config *cfg, const mps_layout *L, const mps_plan_opts *o, mps_plan **out, mps_err *err)
{
    if (mps_config_validate(cfg, err) != 0)
        return -1;
    if (o->micro_batch < 1 || o->micro_batch > (1 << 20))
        return mps_fail(err, MPS_EUSAGE, "--micro-batch %lld: expected 1 to %d", (long long)o->micro_batch, 1 << 20);
    if (o->seq < 1 || o->seq > (1 << 24))
        return mps_fail(err, MPS_EUSAGE, "--seq %lld: expected 1 to %d", (long long)o->seq, 1 << 24);
    if (o->global_batch < 0)
        return mps_fail(err, MPS_EUSAGE, "--global-batch %lld: must be positive", (long long)o->global_batch);
    mps_plan *p = calloc(1, sizeof *p);
    if (!p)
        return mps_fail(err, MPS_ENOMEM, "out of memory");
    p->cfg = *cfg;
    p->L = *L;
    if (mps_layout_validate(&p->L, cfg, err) != 0) {
        free(p);
        return -1;
    }
    p->o = *o;
    p->world = mps_layout_world(&p->L);
    p->microbatches = microbatches_for(&p->L, o);
    p->o.global_batch = o->global_batch > 0 ? o->global_batch : (int64_t)p->world * o->micro_batch;
    const int pp = p->L.pp, tp = p->L.tp, dp = p->L.dp, nt = mps_tensor_count(cfg);
    int any_sharded = 0, kind_unsharded = -1, kind_sharded = -1;
    for (int k = 0; k < MPS_KIND_COUNT; k++) {
        p->sharded[k] = mps_kind_dp_sharded(p->L.zero, (mps_kind)k) && dp > 1;
        any_sharded |= p->sharded[k];
        if (p->sharded[k] && kind_sharded < 0)
            kind_sharded = k;
        if (!p->sharded[k] && kind_unsharded < 0)
            kind_unsharded = k;
    }
    /* scratch: the tensor classes, and per stage how many tensors of each class it holds */
    tensor_class *classes = malloc(sizeof *classes * (size_t)nt);
    int *class_of = malloc(sizeof *class_of * (size_t)nt);
    mps_tensor_spec *specs = malloc(sizeof *specs * (size_t)nt);
    int *count = NULL, *rep = NULL, nclasses = 0, rc = -1;
    p->unsharded_elems = calloc((size_t)pp * tp, sizeof(int64_t));
    p->full_params = calloc((size_t)pp * tp, sizeof(int64_t));
    p->tied_head = calloc((size_t)tp, sizeof(int64_t));
    p->activations = calloc((size_t)pp, sizeof(int64_t));
    p->transient = calloc((size_t)pp * tp, sizeof(int64_t));
    if (any_sharded)
        p->sharded_elems = calloc((size_t)p->world, sizeof(int64_t));
    if (!classes || !class_of || !specs || !p->unsharded_elems || !p->full_params || !p->tied_head || !p->activations ||
        !p->transient || (any_sharded && !p->sharded_elems))
        goto oom;
    for (int t = 0; t < nt; t++) {
        mps_tensor_spec_get(cfg, t, &specs[t]);
        int c = 0;
        while (c < nclasses && !class_equal(&classes[c], &specs[t]))
            c++;
        if (c == nclasses) {
            classes[c].ndim = specs[t].ndim;
            classes[c].tp_dim = specs[t].tp_dim;
            memcpy(classes[c].shape, specs[t].shape, sizeof classes[c].shape);
            nclasses++;
        }
        class_of[t] = c;
    }
    count = calloc((size_t)pp * nclasses, sizeof *count);
    rep = malloc(sizeof *rep * (size_t)pp * nclasses); /* a tensor of the class that the stage holds */
    if (!count || !rep)
        goto oom;
    for (int t = 0; t < nt; t++)
        for (int s = 0; s < pp; s++)
            if (mps_stage_holds(cfg, &p->L, s, &specs[t])) {
                int *n = &count[s * nclasses + class_of[t]];
                if ((*n)++ == 0)
                    rep[s * nclasses + class_of[t]] = t;
            }
    for (int s = 0; s < pp; s++) {
        const int *cs = &count[s * nclasses], *rs = &rep[s * nclasses];
        for (int x = 0; x < tp; x++) {
            int64_t *box_total = &p->full_params[s * tp + x];
            if (kind_unsharded >= 0)
                p->unsharded_elems[s * tp + x] =
                    rank_class_sum(p, mps_layout_rank(&p->L, s, 0, x), (mps_kind)kind_unsharded, nclasses, cs, rs, box_total);
            if (kind_sharded >= 0)
                for (int d = 0; d < dp; d++) {
                    int r = mps_layout_rank(&p->L, s, d, x);
                    p->sharded_elems[r] = rank_class_sum(p, r, (mps_kind)kind_sharded, nclasses, cs, rs, box_total);
                }
        }
        for (int x = 0; x < tp; x++)
            p->transient[s * tp + x] = mps_transient_bytes(cfg, &p->L, o, s, x);
        p->activations[s] = activation_bytes_m(cfg, &p->L, o, s, p->microbatches);
        if (p->activations[s] < 0) {
            mps_fail(err, MPS_EUSAGE, "the activation estimate for --micro-batch %lld --seq %lld overflows",
                     (long long)o->micro_batch, (long long)o->seq);
            goto done;
        }
    }
    for (int x = 0; x < tp; x++) {
        mps_piece wte;
        mps_geometry(cfg, &p->L, mps_layout_rank(&p->L, 0, 0, x), MPS_KIND_GRAD, 0 /* the embedding */, &wte);
        p->tied_head[x] = wte.held ? mps_box_numel(&wte.box) : 0;
    }
    rc = 0;
    goto done;
oom:
    mps_fail(err, MPS_ENOMEM, "out of memory planning %d ranks", p->world);
done:
    free(classes);
    free(class_of);
    free(specs);
    free(count);
    free(rep);
    if (rc == 0)
        *out = p;
    else
        mps_plan_free(p);
    return rc;
}

const mps_config *mps_plan_config(const mps_plan *p) { return &p->cfg; }
const mps_layout *mps_plan_layout(const mps_plan *p) { return &p->L; }
const mps_plan_opts *mps_plan_options(const mps_plan *p) { return &p->o; }
int mps_plan_world(const mps_plan *p) { return p->world; }
int64_t mps_plan_microbatches(const mps_plan *p) { return p->microbatches; }

double mps_plan_bubble(const mps_plan *p)
{
    return (double)(p->L.pp - 1) / (double)(p->microbatches + p->L.pp - 1);
}

/* Bytes from elements; ZeRO-1's reduce-scatter output joins the transients: the trainer sums the
 * full gradients into a buffer of the rank's shard (the Adam state's flat range), fp32 */
static void fill_bytes(const mps_layout *L, mps_precision precision, mps_rank_usage *u)
{
    if (L->zero == 1 && L->dp > 1)
        u->transient += u->elems[MPS_KIND_ADAM_M] * mps_kind_bytes(precision, MPS_KIND_GRAD);
    u->runtime = precision == MPS_PRECISION_MIXED ? MPS_PLAN_CUDA_RUNTIME_BYTES : 0;
    u->total = u->activations + u->transient + u->runtime;
    for (int k = 0; k < MPS_KIND_COUNT; k++) {
        u->bytes[k] = u->elems[k] * mps_kind_bytes(precision, (mps_kind)k);
        u->total += u->bytes[k];
    }
}

void mps_plan_rank(const mps_plan *p, int rank, mps_rank_usage *u)
{
    memset(u, 0, sizeof *u);
    u->rank = rank;
    u->at = mps_layout_coords(&p->L, rank);
    int slot = u->at.pp * p->L.tp + u->at.tp;
    for (int k = 0; k < MPS_KIND_COUNT; k++)
        u->elems[k] = p->sharded[k] ? p->sharded_elems[rank] : p->unsharded_elems[slot];
    u->activations = p->activations[u->at.pp];
    u->transient = p->transient[slot];
    fill_bytes(&p->L, p->o.precision, u);
}

int64_t mps_plan_peak(const mps_plan *p, int *rank)
{
    int64_t best = -1;
    int best_rank = 0;
    for (int r = 0; r < p->world; r++) {
        mps_rank_usage u;
        mps_plan_rank(p, r, &u);
        if (u.total > best) {
            best = u.total;
            best_rank = r;
        }
    }
    if (rank)
        *rank = best_rank;
    return best;
}

int mps_plan_over_budget(const mps_plan *p, int64_t budget)
{
    int n = 0;
    for (int r = 0; r < p->world; r++) {
        mps_rank_usage u;
        mps_plan_rank(p, r, &u);
        n += u.total > budget;
    }
    return n;
}

void mps_plan_comm(const mps_plan *p, int rank, mps_comm_volume *c)
{
    memset(c, 0, sizeof *c);
    const mps_layout *L = &p->L;
    mps_coords at = mps_layout_coords(L, rank);
    int g = mps_kind_bytes(p->o.precision, MPS_KIND_GRAD), w = mps_kind_bytes(p->o.precision, MPS_KIND_PARAM);
    int a = activation_elem_bytes(p->o.precision);
    double n = (double)p->full_params[at.pp * L->tp + at.tp];
    if (L->dp > 1) {
        /* ring collectives over dp ranks send (dp-1)/dp of the buffer per phase (ZeRO paper, sec. 7):
         * all-reduce = reduce-scatter + all-gather. ZeRO 1 and 2 reduce-scatter the gradients and
         * all-gather the updated weights; ZeRO 3 all-gathers the weights in forward and backward. */
        double f = (double)(L->dp - 1) / L->dp;
        double per_elem = L->zero == 0 ? 2.0 * g : L->zero == 3 ? g + 2.0 * w : (double)(g + w);
        c->dp = (int64_t)llround(f * n * per_elem);
    }
    double m = (double)p->microbatches;
    double sbh = (double)p->o.seq * (double)p->o.micro_batch * p->cfg.n_embd;
    int layers = L->stage_first[at.pp + 1] - L->stage_first[at.pp];
    if (L->tp > 1) {
        /* Megatron: 2 all-reduces of s*b*h per layer forward, 2 backward (+2 when the forward is
         * recomputed in full); with sequence parallelism an all-gather + reduce-scatter pair, same volume */
        int collectives = p->o.recompute == MPS_RECOMPUTE_FULL ? 6 : 4;
        double f = 2.0 * (L->tp - 1) / L->tp;
        c->tp = (int64_t)llround(m * layers * collectives * f * sbh * a);
    }
    if (L->pp > 1) {
        /* every micro-batch: activations to the next stage, their gradients to the previous one
         * (s*b*h/t each with sequence parallelism), plus the tied embedding's gradient all-reduce
         * between the first and the last stage (2 ranks: each sends its whole buffer once) */
        int neighbours = (at.pp > 0) + (at.pp < L->pp - 1);
        double sends = neighbours * m * sbh / L->tp * a;
        if (at.pp == 0 || at.pp == L->pp - 1)
            sends += (double)p->tied_head[at.tp] * g;
        c->pp = (int64_t)llround(sends);
    }
    c->total = c->dp + c->tp + c->pp;
}

void mps_plan_comm_max(const mps_plan *p, mps_comm_volume *out, int *rank)
{
    /* every rank of a (stage, TP rank) sends the same, so one DP index per pair is enough */
    int best_rank = 0;
    memset(out, 0, sizeof *out);
    out->total = -1;
    for (int s = 0; s < p->L.pp; s++)
        for (int x = 0; x < p->L.tp; x++) {
            mps_comm_volume c;
            int r = mps_layout_rank(&p->L, s, 0, x);
            mps_plan_comm(p, r, &c);
            if (c.total > out->total) {
                *out = c;
                best_rank = r;
            }
        }
    if (rank)
        *rank = best_rank;
}

void mps_plan_tensor(const mps_config *cfg, const mps_layout *L, int rank, int tensor, int64_t elems[MPS_KIND_COUNT])
{
    for (int k = 0; k < MPS_KIND_COUNT; k++) {
        mps_piece piece;
        mps_geometry(cfg, L, rank, (mps_kind)k, tensor, &piece);
        elems[k] = piece.held ? piece.flat_end - piece.flat_begin : 0;
    }
}

void mps_plan_rank_direct(const mps_config *cfg, const mps_layout *L, const mps_plan_opts *o, int rank,
                          mps_rank_usage *u)
{
    memset(u, 0, sizeof *u);
    u->rank = rank;
    u->at = mps_layout_coords(L, rank);
    for (int t = 0; t < mps_tensor_count(cfg); t++) {
        int64_t elems[MPS_KIND_COUNT];
        mps_plan_tensor(cfg, L, rank, t, elems);
        for (int k = 0; k < MPS_KIND_COUNT; k++)
            u->elems[k] += elems[k];
    }
    u->activations = mps_activation_bytes(cfg, L, o, u->at.pp);
    u->transient = mps_transient_bytes(cfg, L, o, u->at.pp, u->at.tp);
    fill_bytes(L, o->precision, u);
}

/* ---- suggest ---- */
static int cmp_i64(int64_t a, int64_t b) { return a < b ? -1 : a > b; }
static int cmp_f64(double a, double b) { return a < b ? -1 : a > b; }

static int order_key(const mps_suggestion *a, const mps_suggestion *b, mps_suggest_order by)
{
    switch (by) {
    case MPS_SUGGEST_BY_PEAK: return cmp_i64(a->peak, b->peak);
    case MPS_SUGGEST_BY_BUBBLE: return cmp_f64(a->bubble, b->bubble);
    case MPS_SUGGEST_BY_COMM: return cmp_i64(a->comm.total, b->comm.total);
    default: return cmp_f64(a->est.step_s, b->est.step_s);
    }
}

static int compare_suggestions(const mps_suggestion *a, const mps_suggestion *b, mps_suggest_order first)
{
    static const mps_suggest_order ties[] = { MPS_SUGGEST_BY_TIME, MPS_SUGGEST_BY_PEAK, MPS_SUGGEST_BY_COMM,
                                              MPS_SUGGEST_BY_BUBBLE };
    int c = order_key(a, b, first);
    for (int k = 0; c == 0 && k < 4; k++)
        c = order_key(a, b, ties[k]);
    /* a total order, so that the listing does not depend on qsort */
    const int ka[4] = { a->layout.tp, a->layout.pp, a->layout.dp, a->layout.zero };
    const int kb[4] = { b->layout.tp, b->layout.pp, b->layout.dp, b->layout.zero };
    for (int i = 0; c == 0 && i < 4; i++)
        c = ka[i] < kb[i] ? -1 : ka[i] > kb[i];
    return c;
}

static int by_time(const void *a, const void *b) { return compare_suggestions(a, b, MPS_SUGGEST_BY_TIME); }
static int by_comm(const void *a, const void *b) { return compare_suggestions(a, b, MPS_SUGGEST_BY_COMM); }
static int by_peak(const void *a, const void *b) { return compare_suggestions(a, b, MPS_SUGGEST_BY_PEAK); }
static int by_bubble(const void *a, const void *b) { return compare_suggestions(a, b, MPS_SUGGEST_BY_BUBBLE); }

int mps_suggest_order_from_name(const char *name)
{
    static const char *const names[] = { "time", "comm", "peak", "bubble" };
    for (int i = 0; i < 4; i++)
        if (strcmp(name, names[i]) == 0)
            return i;
    return -1;
}

void mps_suggest_sort(mps_suggestion *list, int count, mps_suggest_order by)
{
    if (count > 1)
        qsort(list, (size_t)count, sizeof *list,
              by == MPS_SUGGEST_BY_PEAK     ? by_peak
              : by == MPS_SUGGEST_BY_BUBBLE ? by_bubble
              : by == MPS_SUGGEST_BY_COMM   ? by_comm
                                            : by_time);
}

int mps_plan_suggest(const mps_config *cfg, int gpus, int64_t gpu_mem, const mps_plan_opts *o, mps_suggestion **out,
                     int *count, int *considered, mps_err *err)
{
    *out = NULL;
    *count = *considered = 0;
    if (gpus < 1 || gpus > (1 << 24))
        return mps_fail(err, MPS_EUSAGE, "--gpus %d: expected 1 to %d", gpus, 1 << 24);
    if (gpu_mem <= 0)
        return mps_fail(err, MPS_EUSAGE, "--gpu-mem must be positive");
    mps_plan_opts po = *o;
    if (po.global_batch == 0)
        po.global_batch = (int64_t)gpus * o->micro_batch; /* one global batch for every candidate */
    int cap = 64, n = 0;
    mps_suggestion *list = malloc(sizeof *list * (size_t)cap);
    if (!list)
        return mps_fail(err, MPS_ENOMEM, "out of memory");
    for (int tp = 1; tp <= gpus; tp++) {
        if (gpus % tp || cfg->n_head % tp || mps_cfg_kv_heads(cfg) % tp)
            continue;
        for (int pp = 1; pp <= gpus / tp; pp++) {
            if ((gpus / tp) % pp || pp > cfg->n_layer || pp > MPS_MAX_PP)
                continue;
            int dp = gpus / tp / pp;
            for (int zero = 0; zero <= (dp > 1 ? 3 : 0); zero++) {
                mps_layout L;
                memset(&L, 0, sizeof L);
                L.dp = dp, L.pp = pp, L.tp = tp, L.zero = zero;
                mps_plan *plan;
                if (mps_layout_validate(&L, cfg, err) != 0 || mps_plan_build(cfg, &L, &po, &plan, err) != 0) {
                    free(list);
                    return -1;
                }
                (*considered)++;
                mps_suggestion sg;
                memset(&sg, 0, sizeof sg);
                sg.layout = L;
                sg.peak = mps_plan_peak(plan, &sg.peak_rank);
                mps_plan_comm_max(plan, &sg.comm, &sg.comm_rank);
                sg.microbatches = mps_plan_microbatches(plan);
                sg.bubble = mps_plan_bubble(plan);
                mps_estimate_step(plan, NULL, &sg.est);
                mps_plan_free(plan);
                if (sg.peak > gpu_mem)
                    continue;
                if (n == cap) {
                    mps_suggestion *grown = realloc(list, sizeof *list * (size_t)(cap *= 2));
                    if (!grown) {
                        free(list);
                        return mps_fail(err, MPS_ENOMEM, "out of memory");
                    }
                    list = grown;
                }
                list[n++] = sg;
            }
        }
    }
    mps_suggest_sort(list, n, MPS_SUGGEST_BY_TIME);
    *out = list;
    *count = n;
    return 0;
}
