/* A compute backend of the trainer: where its buffers live and the kernels that work on them.
 * The engine (train/engine.c, train/model.c) runs the same schedule on every backend and touches
 * tensor data only through this table: the CPU backend (train/backend_cpu.c: host memory, the
 * OpenMP kernels of ops_cpu.h) and the CUDA backend (train/cuda/: device memory, cuBLAS and
 * fused kernels). Every pointer given to a kernel is a buffer of the backend (device memory for
 * CUDA), except where a function says "host". Shapes and the accumulate (+=) convention are those
 * of ops_cpu.h. */
#ifndef MPS_BACKEND_H
#define MPS_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

typedef struct mps_backend {
    const char *name; /* "cpu", "cuda" */
    void *ctx;
    int device_memory; /* 1: buffers are not host memory (collectives over MPI must stage them) */
    /* memory: alloc returns zeroed memory or NULL */
    void *(*alloc)(void *ctx, size_t bytes);
    void (*release)(void *ctx, void *p);
    void (*zero)(void *ctx, void *p, size_t bytes);
    void (*copy)(void *ctx, void *dst, const void *src, size_t bytes);      /* buffer -> buffer */
    void (*to_host)(void *ctx, void *host, const void *src, size_t bytes);  /* buffer -> host */
    void (*from_host)(void *ctx, void *dst, const void *host, size_t bytes); /* host -> buffer */
    /* host memory that to_host / from_host move fastest (CUDA: pinned), zeroed, or NULL */
    void *(*alloc_host)(void *ctx, size_t bytes);
    void (*release_host)(void *ctx, void *p);
    /* 0, or -1 with the first asynchronous error the device reported since the last call */
    int (*sync)(void *ctx, mps_err *err);

    void (*embed_fwd)(void *ctx, float *out, const int32_t *tokens, int64_t N, const float *wte, int64_t v0,
                      int64_t Vl, int C);
    void (*embed_bwd)(void *ctx, float *dwte, const float *dout, const int32_t *tokens, int64_t N, int64_t v0,
                      int64_t Vl, int C);
    void (*pos_fwd)(void *ctx, float *x, const float *wpe, int B, int T, int C);
    void (*pos_bwd)(void *ctx, float *dwpe, const float *dx, int B, int T, int C);
    void (*layernorm_fwd)(void *ctx, float *out, float *mean, float *rstd, const float *inp, const float *w,
                          const float *b, int64_t N, int C);
    void (*layernorm_bwd)(void *ctx, float *dinp, float *dw, float *db, const float *dout, const float *inp,
                          const float *w, const float *mean, const float *rstd, int64_t N, int C);
    void (*matmul_fwd)(void *ctx, float *out, const float *inp, const float *w, const float *bias, int64_t N, int C,
                       int OC);
    void (*matmul_bwd)(void *ctx, float *dinp, float *dw, float *dbias, const float *dout, const float *inp,
                       const float *w, int64_t N, int C, int OC);
    void (*attention_fwd)(void *ctx, float *out, float *lse, const float *qkv, int B, int T, int H, int hs);
    void (*attention_bwd)(void *ctx, float *dqkv, const float *dout, const float *qkv, const float *out,
                          const float *lse, int B, int T, int H, int hs);
    void (*gelu_fwd)(void *ctx, float *out, const float *inp, int64_t n);
    void (*gelu_bwd)(void *ctx, float *dinp, const float *inp, const float *dout, int64_t n);
    /* out (N, C) = a + b + bias (C) broadcast over rows (the residual after a row-parallel projection) */
    void (*residual_bias)(void *ctx, float *out, const float *a, const float *b, const float *bias, int64_t N, int C);
    /* db (C) += column sums of dout (N, C) */
    void (*bias_grad)(void *ctx, float *db, const float *dout, int64_t N, int C);
    void (*add)(void *ctx, float *out, const float *a, const float *b, int64_t n);
    void (*accumulate)(void *ctx, float *dst, const float *src, int64_t n);
    void (*scale)(void *ctx, float *x, float s, int64_t n);
    void (*xent_rowmax)(void *ctx, float *rowmax, const float *logits, int64_t N, int64_t Vl, int64_t v0, int64_t V);
    void (*xent_sumexp)(void *ctx, float *sumexp, const float *logits, const float *gmax, int64_t N, int64_t Vl,
                        int64_t v0, int64_t V);
    void (*xent_target)(void *ctx, float *tlogit, const float *logits, const int32_t *targets, int64_t N, int64_t Vl,
                        int64_t v0);
    void (*xent_bwd)(void *ctx, float *dlogits, const float *logits, const int32_t *targets, const float *gmax,
                     const float *gsumexp, float scale, int64_t N, int64_t Vl, int64_t v0, int64_t V);
    /* host result: sum over rows of log(sumexp) + gmax - tlogit */
    double (*xent_loss_sum)(void *ctx, const float *gmax, const float *sumexp, const float *tlogit, int64_t N);
    void (*adamw)(void *ctx, float *param, const float *grad, float *m, float *v, int64_t n, float lr, float beta1,
                  float beta2, float eps, float weight_decay, int64_t t);
    double (*sumsq)(void *ctx, const float *x, int64_t n); /* host result */
    void (*destroy)(void *ctx);
} mps_backend;

/* The CPU backend: host memory, OpenMP kernels. */
void mps_backend_cpu(mps_backend *out);
/* The CUDA backend on the current device; an error when this build has none or no GPU is there. */
int mps_backend_cuda(mps_backend *out, mps_err *err);

#endif
