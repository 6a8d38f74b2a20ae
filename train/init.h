/* A fresh training state (`mpshard init`); the trainer's saves are in save_async.h. */
#ifndef MPS_INIT_H
#define MPS_INIT_H

#include "ckpt.h"
#include "engine.h"

/* GPT-2 initialisation of canonical element `flat` of tensor `index`: N(0, 0.02) for weights and
 * embeddings, N(0, 0.02 / sqrt(2 n_layer)) for the residual projections (attprojw, fcprojw), zero
 * biases, unit layernorm weights, zero padded vocab rows. A pure function of (seed, tensor,
 * element), so every layout initialises the same model. */
float mps_init_value(const mps_config *cfg, const mps_tensor_spec *spec, uint64_t seed, int index, int64_t flat);
/* Writes DIR: parameters initialised for seed, Adam moments zero, step 0. */
int mps_init_write(const char *dir, const mps_config *cfg, const mps_layout *L, uint64_t seed, int force, int threads,
                   int quiet, mps_err *err);

/* mps_source callbacks for sources that need no per-tensor preparation (init, the trainer's saves). */
int mps_source_no_begin(void *ctx, int tensor, mps_err *err);
void mps_source_no_end(void *ctx, int tensor);

#endif
