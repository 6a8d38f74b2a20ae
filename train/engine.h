/* The training engine: one rank's part of GPT-2 under a DP x PP x TP x ZeRO layout. The parallel
 * schedule (micro-batches, pipeline sends, TP and DP collectives, ZeRO partitions) is written once
 * against mps_comm; the arithmetic runs on the CPU kernels of ops_cpu.h. Which pieces of which
 * tensors a rank holds comes from mps_geometry(), the same function shard and reshard use, so a
 * rank saves exactly the pieces a checkpoint of its layout contains. */
#ifndef MPS_ENGINE_H
#define MPS_ENGINE_H

#include <stdint.h>

#include "backend.h"
#include "ckpt.h"
#include "comm.h"
#include "data.h"

typedef enum { MPS_SCHED_1F1B = 0, MPS_SCHED_GPIPE } mps_schedule;

typedef struct {
    int micro_batch;  /* B: sequences per micro-batch */
    int seq;          /* T */
    int global_batch; /* G: sequences per optimizer step, over all DP replicas */
    mps_schedule schedule;
    float lr, lr_min; /* peak and final learning rate */
    int64_t warmup;   /* linear warmup steps */
    int64_t decay_steps; /* the step counter at which the cosine decay reaches lr_min */
    float weight_decay, grad_clip, beta1, beta2, eps;
    int recompute;    /* keep only each layer's input per micro-batch; the backward recomputes the rest */
    /* DP: reduce the gradients after the backward pass (ZeRO-0/1: the step's last; ZeRO-2/3:
     * each micro-batch's), instead of starting each layer's reduction as soon as the pass is done
     * with it, where the comm backend can run it under the rest of the pass (comm.h can_start) */
    int reduce_after_backward;
} mps_train_opts;

typedef struct {
    double loss;      /* mean cross-entropy over the G * T tokens of the step */
    double grad_norm; /* global L2 norm before clipping */
    float lr;
} mps_step_stats;

typedef struct mps_engine mps_engine;

/* Validates the options against the layout (G divisible by B * dp, T <= n_positions, ...) and
 * allocates this rank's parameters, gradients and optimizer state (zeros). */
int mps_engine_new(const mps_config *cfg, const mps_layout *L, mps_comm *comm, const mps_backend *be,
                   const mps_train_opts *o, mps_engine **out, mps_err *err);
void mps_engine_free(mps_engine *e);
/* Reads this rank's pieces from a checkpoint of any layout (param; master when stored, which then
 * replaces param as the fp32 weights; adam_m, adam_v when stored, else zeros). */
int mps_engine_load(mps_engine *e, mps_ckpt *c, int threads, mps_err *err);
/* The learning rate of the update that takes the step counter from step to step + 1. */
float mps_engine_lr(const mps_train_opts *o, int64_t step);
/* One optimizer step over sequences [first_seq, first_seq + G) of the token stream. Returns with
 * the update queued on the backend (the host has waited for the gradient norm, not for AdamW):
 * read state through the backend's to_host, or sync first. */
int mps_engine_step(mps_engine *e, const mps_tokens *data, int64_t first_seq, int64_t step, mps_step_stats *stats,
                    mps_err *err);
/* The mean cross-entropy of the current weights over `batches` global batches of sequences
 * [first_seq, first_seq + batches * G) (validation): forward passes only, in the layout's
 * micro-batches; weights, gradients and optimizer state are left as they were. */
int mps_engine_eval(mps_engine *e, const mps_tokens *data, int64_t first_seq, int batches, double *loss,
                    mps_err *err);
/* Writes the shard file of this rank (the pieces it owns) for manifest m into dir. */
int mps_engine_write_shard(mps_engine *e, const char *dir, const mps_manifest *m, mps_err *err);
/* Where this rank keeps state `kind` (param, adam_m, adam_v) of a tensor: a buffer of the backend
 * holding elements [*begin, *end) of the tensor's box in row-major order (the weights, or their
 * ZeRO-3 shard; the moments over the optimizer's range). NULL when the rank keeps none. Saves read
 * their pieces from it, directly or through a host snapshot; the load writes into it. */
float *mps_engine_state_buf(const mps_engine *e, mps_kind kind, int tensor, int64_t *begin, int64_t *end);
/* Bytes of parameters, gradients and optimizer state this rank holds now. */
int64_t mps_engine_state_bytes(const mps_engine *e);

#endif
