/* inspect: what each rank holds in GPU memory while training under a layout.
 *
 * The planner asks mps_geometry() (formats/geometry.h) which elements of every canonical tensor a
 * rank holds per state kind, turns elements into bytes for a precision (fp32 or mixed), adds the
 * trainer's activation and working buffers and the communication volume of one optimizer step,
 * and lists the layouts that fit a number of GPUs. The checkpoint scanner sums what the datasets of
 * a checkpoint really hold per rank, so that the two can be compared (mpshard inspect --check).
 * Library code: errors come back through mps_err, nothing exits, no global mutable state. */
#ifndef MPS_INSPECT_PLAN_H
#define MPS_INSPECT_PLAN_H

#include <stdint.h>

#include "ckpt.h"
#include "err.h"
#include "geometry.h"
#include "inspect/estimate.h"
#include "layout.h"
#include "model.h"

typedef enum {
    MPS_PRECISION_FP32 = 0, /* 4 B weights + 4 B gradients + 8 B Adam state per parameter, no master copy */
    MPS_PRECISION_MIXED     /* 2 B bf16 weights + 4 B fp32 gradients + 12 B fp32 master, m, v (Megatron-LM) */
} mps_precision;

typedef enum { MPS_RECOMPUTE_NONE = 0, MPS_RECOMPUTE_SELECTIVE, MPS_RECOMPUTE_FULL } mps_recompute;

const char *mps_precision_name(mps_precision p);   /* "fp32", "mixed" */
int mps_precision_from_name(const char *name);     /* -1 if unknown */
const char *mps_recompute_name(mps_recompute r);   /* "none", "selective", "full" */
int mps_recompute_from_name(const char *name);     /* -1 if unknown */

typedef struct {
    mps_precision precision;
    int64_t micro_batch;   /* b: sequences per micro-batch */
    int64_t seq;           /* s: tokens per sequence */
    mps_recompute recompute;
    int64_t global_batch;  /* sequences per optimizer step; 0: world * micro_batch */
    int no_overlap;        /* the trainer's --no-overlap (or --comm mpi): ZeRO-2/3 reduce-scatter after
                            * the whole backward, so the stage's full gradients exist at once */
    int gpipe;             /* the trainer's --schedule gpipe: every micro-batch of the step in flight
                            * (all forwards, then all backwards) instead of 1F1B's pp - stage */
} mps_plan_opts;

/* fp32, micro-batch 1, seq = the model's n_positions, no recompute, default global batch. */
void mps_plan_opts_default(const mps_config *cfg, mps_plan_opts *o);

/* Bytes per element of a state kind under a precision (0 for the master copy in fp32 training). */
int mps_kind_bytes(mps_precision p, mps_kind kind);

/* What one rank holds. */
typedef struct {
    int rank;
    mps_coords at;
    int64_t elems[MPS_KIND_COUNT]; /* elements held per kind, from mps_geometry */
    int64_t bytes[MPS_KIND_COUNT]; /* elems * mps_kind_bytes */
    int64_t activations;           /* bytes, mps_activation_bytes of the rank's stage */
    int64_t transient;             /* bytes, mps_transient_bytes of the rank's stage and TP rank; ZeRO-1: and the
                                    * rank's shard of the gradients, the reduce-scatter's output */
    int64_t runtime;               /* bytes, MPS_PLAN_CUDA_RUNTIME_BYTES with mixed precision, else 0 */
    int64_t total;                 /* all kinds + activations + transient + runtime */
} mps_rank_usage;

/* What the CUDA trainer's GPU holds before it allocates anything: the CUDA context with its
 * kernels and cuBLASLt's handle and 32 MiB workspace. 561 MiB (588 MB) measured on an H200 with
 * CUDA 13 (bench/RESULTS.md), rounded up. Planned with --precision mixed (the CUDA trainer). */
#define MPS_PLAN_CUDA_RUNTIME_BYTES ((int64_t)600 * 1000 * 1000)

/* Bytes one rank sends per optimizer step (ring collectives; it receives about as much). */
typedef struct {
    int64_t dp;    /* gradient all-reduce / reduce-scatter and parameter all-gather over the DP group */
    int64_t tp;    /* the all-reduces (or all-gather + reduce-scatter pairs) of the TP group */
    int64_t pp;    /* activations and their gradients to the neighbouring stages, tied-head gradient */
    int64_t total;
} mps_comm_volume;

/* Activation bytes held by one rank of pipeline stage `stage` at the peak of a 1F1B schedule (or
 * GPipe's, o->gpipe: every micro-batch of the step in flight, also without a pipeline), as
 * mpshard's trainer allocates them: layers_of_stage * min(pp - stage, micro-batches per step) *
 * mps_arch_layer_activation_bytes (the layer's fp32 input, residual, statistics and log-sum-exp and
 * its operand buffers in the training dtype; full recompute: the fp32 input alone, plus one layer
 * recomputed whole), plus the stage's working buffers (per micro-batch in flight its output and
 * gradient; two scratch buffers; a ring of fp32 send buffers to each neighbouring stage,
 * train/pipeline.h); the last stage adds one micro-batch's logits, s*b*Vp/t elements of the training dtype
 * (Vp/t rounded up). Returns -1 if the figure does not fit in int64. */
int64_t mps_activation_bytes(const mps_config *cfg, const mps_layout *L, const mps_plan_opts *o, int stage);

/* ZeRO's working set beyond the sharded state, as mpshard's trainer keeps it (dp > 1; else 0):
 * ZeRO-2/3 reduce-scatter each layer's full gradients as the backward finishes it, so the full
 * gradients of two layers exist at a time, plus those of the stage's tensors outside the layers
 * (wte, wpe, the final layernorm), final only at the end of the pass (o->no_overlap: after the
 * whole backward, so those of all the stage's layers); ZeRO-3 gathers a layer's weights for its
 * use while the next layer's gather runs, so two layers' full weights (or, on the first and last
 * stage, the tensors outside the layers and one layer, if more). A one-layer stage holds one
 * layer's, not two. Full means the TP box: TP still splits them. Gradient and weight bytes per
 * element follow o->precision. */
int64_t mps_transient_bytes(const mps_config *cfg, const mps_layout *L, const mps_plan_opts *o, int stage,
                            int tp_rank);

typedef struct mps_plan mps_plan;

/* Plans every rank of the layout. Ranks with the same pipeline stage and TP rank hold the same
 * unsharded kinds, and tensors of one shape and TP split held by a stage hold the same piece, so
 * mps_geometry is called once per (rank class, tensor class, sharding group) rather than per
 * (rank, tensor, kind): gpt3-175b over 1024 ranks plans in milliseconds. */
int mps_plan_build(const mps_config *cfg, const mps_layout *L, const mps_plan_opts *o, mps_plan **out, mps_err *err);
void mps_plan_free(mps_plan *p);
const mps_config *mps_plan_config(const mps_plan *p);
const mps_layout *mps_plan_layout(const mps_plan *p);
const mps_plan_opts *mps_plan_options(const mps_plan *p); /* global_batch filled in */
int mps_plan_world(const mps_plan *p);
int64_t mps_plan_microbatches(const mps_plan *p); /* per pipeline per step: ceil(global / (dp * b)) */
double mps_plan_bubble(const mps_plan *p);        /* 1F1B idle fraction (pp-1) / (m+pp-1) */
void mps_plan_rank(const mps_plan *p, int rank, mps_rank_usage *out);
int64_t mps_plan_peak(const mps_plan *p, int *rank); /* the largest total, and its lowest rank */
void mps_plan_comm(const mps_plan *p, int rank, mps_comm_volume *out);
void mps_plan_comm_max(const mps_plan *p, mps_comm_volume *out, int *rank); /* the rank that sends most */
/* Number of ranks whose total exceeds budget bytes. */
int mps_plan_over_budget(const mps_plan *p, int64_t budget);

/* The same figures for one rank without any shortcut: mps_geometry for every tensor and kind.
 * Slow for big models; the tests compare it with mps_plan_rank. */
void mps_plan_rank_direct(const mps_config *cfg, const mps_layout *L, const mps_plan_opts *o, int rank,
                          mps_rank_usage *out);
/* Elements of one tensor a rank holds, per kind. */
void mps_plan_tensor(const mps_config *cfg, const mps_layout *L, int rank, int tensor, int64_t elems[MPS_KIND_COUNT]);

/* ---- layouts that fit ---- */
typedef struct {
    mps_layout layout;
    int64_t peak;      /* the largest per-rank total */
    int peak_rank;
    mps_comm_volume comm;     /* of the rank that sends most */
    int comm_rank;
    int64_t microbatches;
    double bubble;
    mps_step_estimate est; /* mps_estimate_step with the default constants */
} mps_suggestion;

/* Every dp x pp x tp = gpus (tp dividing n_head, pp <= n_layer) with zero 0..3 (only 0 when dp = 1),
 * planned with o (global_batch 0 means gpus * micro_batch, the same for every candidate). Returns the
 * candidates whose every rank fits gpu_mem bytes, best first: the shortest estimated step time
 * (inspect/estimate.h), then lowest peak. *considered counts all candidates. Free *out with free(). */
int mps_plan_suggest(const mps_config *cfg, int gpus, int64_t gpu_mem, const mps_plan_opts *o, mps_suggestion **out,
                     int *count, int *considered, mps_err *err);

/* The layouts `mpshard split` chooses from (inspect/estimate.c): every candidate of mps_plan_suggest
 * for `gpus` ranks at ZeRO stage `zero` (kept where dp = 1, where it changes nothing), fitting or
 * not, in mps_plan_suggest's order; *chosen is the first whose every rank fits gpu_mem bytes, -1 if
 * none does. Free *out with free(). */
int mps_split_candidates(const mps_config *cfg, int gpus, int zero, int64_t gpu_mem, const mps_plan_opts *o,
                         mps_suggestion **out, int *count, int *chosen, mps_err *err);

typedef enum { MPS_SUGGEST_BY_TIME = 0, MPS_SUGGEST_BY_COMM, MPS_SUGGEST_BY_PEAK, MPS_SUGGEST_BY_BUBBLE } mps_suggest_order;
int mps_suggest_order_from_name(const char *name); /* "time", "comm", "peak", "bubble"; -1 if unknown */
/* Re-sorts a suggestion list: by the key, then the others in the order time, peak, comm, bubble. */
void mps_suggest_sort(mps_suggestion *list, int count, mps_suggest_order by);

/* ---- what a checkpoint really holds ---- */
typedef struct {
    int world, ntensors;
    int64_t datasets;     /* datasets read */
    int64_t *held;        /* [rank * MPS_KIND_COUNT + kind]: elements of the rank's pieces (mps_geometry under the
                           * checkpoint's layout) found in the stored datasets; every rank that holds a replica counts it */
    int64_t *file_raw;    /* [rank]: f32 bytes of the datasets in that rank's file */
    int64_t *file_stored; /* [rank]: bytes those datasets occupy in the file (compressed chunks) */
    int64_t *tensor_raw;  /* [tensor]: f32 bytes stored for the tensor, all kinds and files */
    int64_t *tensor_stored;
} mps_ckpt_usage;

/* Reads the attributes (tensor, kind, box_offset, box_count, flat_range) of every dataset in every
 * file the manifest lists, checks them against the catalogue, and sums per rank and kind the elements
 * each rank holds under the checkpoint's layout. */
int mps_ckpt_usage_scan(const char *dir, const mps_manifest *m, mps_ckpt_usage **out, mps_err *err);
void mps_ckpt_usage_free(mps_ckpt_usage *u);

#endif
