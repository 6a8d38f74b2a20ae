/* Internals of the CUDA backend (the .cu files of train/cuda, compiled by nvcc as C++): the context behind
 * mps_backend.ctx, error recording, scratch buffers, and the entries of the backend table that
 * each .cu file implements. Everything runs on the context's one stream, in issue order, so a
 * scratch buffer may be reused by the next call without any synchronisation. */
#ifndef MPS_CUDA_INTERNAL_H
#define MPS_CUDA_INTERNAL_H

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

extern "C" {
#include "backend.h"
}

/* The operand format of this backend (backend.h: act_bytes): activations that only GEMMs read are
 * bf16, rounded once by the kernel that makes them. */
typedef __nv_bfloat16 act_t;

/* Scratch buffers, grown on demand and kept until destroy. */
enum {
    SCR_BF_B,   /* bf16 copy of a GEMM operand (the weights) */
    SCR_BF_C,   /* bf16 copy of a GEMM operand (an fp32 dout in matmul_bwd) */
    SCR_PART,   /* fp32 partial sums of the column reductions (layernorm dw, db; bias_grad) */
    SCR_PART2,  /* second set of partial sums (layernorm db next to dw) */
    SCR_PART3,  /* third set (layernorm: column sums of the updated dinp) */
    SCR_COLSUM, /* chunk partials of the column sums' first pass (kernels_rows.cu) */
    SCR_TICKETS, /* the column sums' counters of finished chunks (zero between launches) */
    SCR_ATTN,   /* fp32 (B, H, T) row terms D = dout . out of the attention backward */
    SCR_ATT_COLS, /* fp32 (B, T / 64, 3 C) column sums of dqkv per 64 rows, from the wgmma backward */
    SCR_SORT,   /* int32 keys and values of the embedding backward's sort (4 x N) */
    SCR_CUB,    /* temporary storage of the CUB radix sort */
    SCR_EMB,    /* fp32 (N, C) piece sums of the embedding backward */
    SCR_ATT_OUT, /* fp32 attention output / its copy, for the attention kernels other than the fast path */
    SCR_ATT_DQKV, /* fp32 dqkv of those kernels, converted to the operand buffer after */
    SCR_MLP,    /* fp32 product of the GELU paths when cuBLASLt has no fused epilogue for them */
    SCR_ATT_QKV, /* fp32 copy of qkv for the attention kernels other than the fast path */
    SCR_ATT_DOUT, /* fp32 copy of dout for them */
    SCR_BIAS16, /* bf16 copy of a bias for a bf16-output product */
    SCR_BGRAD,  /* fp32 bias gradient written by the DGELU epilogue, added to dbias after */
    SCR_SUMSQ,  /* double chunk sums of sumsq_many */
    SCR_TUNE,   /* D of the accumulating GEMM candidates being timed (gemm_tune.cu) */
    SCR_STACK_BIAS, /* fp32 stacked bias of a stacked product, or the column sums of its gradient */
    SCR_PART_OUT, /* bf16 (N, oc) of one part, where a stacked product runs part by part */
    SCR_COUNT
};

#define MPS_GEMM_CANDIDATES 8
/* A bf16 copy of a parameter, written by adamw_many in the same pass as the update, so that the
 * products of the next step read it instead of rounding the fp32 weights again (one conversion
 * per weight and per product before). Made for the AdamW jobs the engine marks read_by_products
 * (the whole tensor: ZeRO-0, or dp = 1 below ZeRO-3; a partition or a shard is never what the
 * products read) and keyed by their exact (param, n). valid = 0 once anything else may have
 * written the range (from_host, copy, zero over it; any release). */
typedef struct {
    const float *p;
    int64_t n;
    act_t *bf;
    int valid;
    /* bf is an allocation of its own (freed with the record); 0 when it lies in another record's,
     * where cu_wcopy_stacked moved the parts of one stacked product */
    int owner;
} mps_wcopy;

/* A cached cuBLASLt plan: descriptors and the heuristic's algorithm for one GEMM shape. */
typedef struct {
    int ta, tb, m, n, k, lda, ldb, ldd, bias;
    int epi;     /* 0: none or bias (as bias says); MPS_EPI_GELU_AUX: D = gelu(AB + bias), aux = AB + bias;
                  * MPS_EPI_DGELU: D = AB * gelu'(aux), bias = row sums of D (when bias) */
    int d_bf16;  /* D (and aux) bf16, else fp32 */
    int bias_bf16; /* the bias epilogue's vector is bf16 (else fp32) */
    int ldaux;
    unsigned align_a, align_b, align_d; /* bytes (power of two, at most 256) */
    int ok; /* 0: no Lt algorithm for this shape, use cublasGemmEx */
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t la, lb, ld;
    cublasLtMatmulAlgo_t algo;
    /* gemm_tune: the heuristic's first candidates, timed on the plan's first call */
    cublasLtMatmulAlgo_t cand[MPS_GEMM_CANDIDATES];
    int ncand, tuned;
} mps_gemm_plan;

enum { MPS_EPI_GELU_AUX = 1, MPS_EPI_DGELU = 2, MPS_EPI_PLAIN = 3 /* bf16 D, bias epilogue if bias */ };
#define MPS_CUDA_MAX_PLANS 64
#define MPS_CUDA_WORKSPACE (32u << 20) /* cuBLAS(Lt) workspace: 32 MiB, as NVIDIA advises for Hopper */

/* attention kernels (MPS_CUDA_ATTENTION): FAST (default) = for head size 64 attention_wgmma.cu
 * where wgmma runs (sm_90a code on a 9.0 card), else attention_fast.cu; the fp32 kernels for other
 * head sizes; MMA ("mma") = attention_fast.cu (mma.sync) even where wgmma runs; FP32 ("fp32") =
 * the fp32 kernels always; BF16 ("bf16") = attention_tc.cu up to head size 64 */
enum { MPS_ATTN_FP32 = 0, MPS_ATTN_BF16 = 1, MPS_ATTN_FAST = 2, MPS_ATTN_MMA = 3 };

typedef struct {
    int device, nsm;
    int wgmma;       /* attn_mode FAST and the wgmma kernels run here: head size 64 takes them */
    int smem_optin;  /* most dynamic shared memory a block may opt into (bytes) */
    int attn_mode;   /* MPS_ATTN_*: from MPS_CUDA_ATTENTION at creation */
    int verbose;     /* MPS_CUDA_VERBOSE=1: each GEMM plan is reported on stderr when built */
    int gemm_tune;   /* MPS_CUDA_GEMM_TUNE (not 0): plans pick among their candidates (gemm_tune.cu) */
    char tune_path[1024]; /* the tuning cache file, "" for none */
    char tune_machine[320]; /* card/SMs/cuBLASLt version: the first part of every cache key */
    cudaStream_t stream;
    cudaStream_t side;   /* a second stream, joined back before the call that forked it returns */
    cudaEvent_t ev_fork, ev_join;
    cudaMemPool_t pool;  /* every alloc/release is stream-ordered from this pool: no device-wide sync */
    cublasHandle_t blas;
    cublasLtHandle_t lt;
    void *workspace;
    void *scr[SCR_COUNT];
    size_t scr_cap[SCR_COUNT];
    double *dres;        /* device: 1024 block partials + 1 result of the host-result reductions */
    pthread_mutex_t res_mu; /* the host-result reductions share dres */
    mps_gemm_plan plans[MPS_CUDA_MAX_PLANS];
    int nplans;
    mps_wcopy *wcopies; /* the parameters' bf16 copies (kernels_optim.cu: adamw_many) */
    int nwcopies, cap_wcopies;
    pthread_mutex_t err_mu; /* errors may come from several host threads (to_host) */
    int failed;
    char msg[800];
} mps_cuda;

/* gemm_tune.cu: the cache file's path and machine key; p->algo for a plan's first call */
void cu_tune_setup(mps_cuda *c);
void cu_plan_tune(mps_cuda *c, mps_gemm_plan *p, const char *what, const void *A, const void *B, float beta,
                  const void *Cm, void *D, const void *bias, const void *aux);

/* Records the first error (later ones are dropped until sync reports it). */
void cu_fail(mps_cuda *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* 0, or -1 after recording "what: <CUDA message>" */
int cu_check(mps_cuda *c, cudaError_t rc, const char *what);
/* after a kernel launch: the launch error, if any */
int cu_launched(mps_cuda *c, const char *what);
/* a scratch buffer of at least bytes (stream-ordered), NULL after recording an error */
void *cu_scratch(mps_cuda *c, int slot, size_t bytes);
/* grid size of a grid-stride loop over n items, blocks of bs threads */
unsigned cu_grid(const mps_cuda *c, int64_t n, int bs);

static inline int cu_aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

/* ---- kernels_*.cu: the table entries other than matmul and attention */
void cu_embed_fwd(void *ctx, float *out, const int32_t *tokens, int64_t N, const float *wte, int64_t v0, int64_t Vl,
                  int C);
void cu_embed_bwd(void *ctx, float *dwte, const float *dout, const int32_t *tokens, int64_t N, int64_t v0, int64_t Vl,
                  int C);
void cu_pos_fwd(void *ctx, float *x, const float *wpe, int B, int T, int C);
void cu_pos_bwd(void *ctx, float *dwpe, const float *dx, int B, int T, int C);
void cu_layernorm_fwd(void *ctx, void *out, float *mean, float *rstd, const float *inp, const float *w,
                      const float *b, int64_t N, int C);
void cu_layernorm_bwd(void *ctx, float *dinp, void *dinp_act, float *dinp_colsum, float *dw, float *db,
                      const void *dout, int dout_act, const float *inp, const float *w, const float *mean,
                      const float *rstd, int64_t N, int C);
void cu_residual_bias(void *ctx, float *out, const float *a, const float *b, const float *bias, int64_t N, int C);
void cu_bias_grad(void *ctx, float *db, const float *dout, int64_t N, int C);
void cu_add(void *ctx, float *out, const float *a, const float *b, int64_t n);
void cu_accumulate(void *ctx, float *dst, const float *src, int64_t n);
void cu_xent_stats(void *ctx, float *rowmax, float *sumexp, float *tlogit, const void *logits, const int32_t *targets,
                   int64_t N, int64_t Vl, int64_t v0, int64_t V);
void cu_xent_rescale(void *ctx, float *sumexp, const float *rowmax, const float *gmax, int64_t N);
void cu_xent_bwd(void *ctx, void *dlogits, const void *logits, const int32_t *targets, const float *gmax,
                 const float *gsumexp, float scale, int64_t N, int64_t Vl, int64_t v0, int64_t V);
void cu_xent_stats_bwd(void *ctx, float *rowmax, float *sumexp, float *tlogit, void *logits, const int32_t *targets,
                       float scale, int64_t N, int64_t Vl, int64_t v0, int64_t V);
void cu_xent_loss_add(void *ctx, double *acc, int first, const float *gmax, const float *sumexp, const float *tlogit,
                      int64_t N);
void cu_adamw_many(void *ctx, const mps_adamw_job *jobs, int count, const mps_adamw_step *step);
double cu_sumsq_many(void *ctx, const float *const *xs, const int64_t *ns, int count);
/* the valid bf16 copy of the first n elements of parameter w, or NULL */
const act_t *cu_wcopy_find(mps_cuda *c, const float *w, int64_t n);
/* the valid bf16 copies of parameters w[i] (oc[i] x C each) side by side: the stacked weight
 * (sum oc, C) of one product, or NULL (a part without a valid copy, or no memory to join them) */
const act_t *cu_wcopy_stacked(mps_cuda *c, const float *const *w, const int *oc, int nparts, int C);
/* marks the copies of parameters that overlap [p, p + bytes) stale; all of them when bytes is 0 */
void cu_wcopy_invalidate(mps_cuda *c, const void *p, size_t bytes);
void cu_wcopy_free(mps_cuda *c);
/* db (C) += column sums of x (rows, C), deterministic (used by bias_grad and matmul_bwd) */
void cu_colsum_acc(mps_cuda *c, float *db, const float *x, int64_t rows, int C, const char *what);
void cu_colsum_acc_act(mps_cuda *c, float *db, const act_t *x, int64_t rows, int C, const char *what);
/* the column sums of n (<= 3) fp32 arrays src[k] (rows, C) in launches that take all n (short
 * arrays: the layernorm's block partials, the attention's per-block sums); dst[k] (C) += them
 * when acc[k], else = them */
void cu_colsums(mps_cuda *c, int n, float *const *dst, const float *const *src, const int *acc, int64_t rows, int C,
                const char *what);
/* operand format <-> fp32 (n elements; 0 or -1 after recording an error) */
int cu_to_act(mps_cuda *c, act_t *dst, const float *src, int64_t n, const char *what);
int cu_from_act(mps_cuda *c, float *dst, const act_t *src, int64_t n, const char *what);
/* out (N, C) += bias (C) broadcast over rows */
void cu_add_bias_rows(mps_cuda *c, float *out, const float *bias, int64_t N, int C);

/* ---- gemm.cu */
void cu_matmul_fwd(void *ctx, float *out, const void *inp, const float *w, const float *bias, const float *resid,
                   int64_t N, int C, int OC);
void cu_matmul_bwd(void *ctx, void *dinp, int dinp_act, float *dw, int dw_set, float *dbias, const void *dout,
                   int dout_act, const void *inp, const float *w, int64_t N, int C, int OC);
void cu_matmul_fwd_act(void *ctx, void *out, const void *inp, const float *w, const float *bias, int64_t N, int C,
                       int OC);
void cu_matmul_parts_fwd_act(void *ctx, void *out, const void *inp, const float *const *w, const float *const *bias,
                             const int *oc, int nparts, int64_t N, int C);
void cu_matmul_parts_bwd(void *ctx, void *dinp, int dinp_act, float *const *dw, int dw_set, float *const *dbias,
                         const void *dout, const void *inp, const float *const *w, const int *oc, int nparts, int64_t N,
                         int C);
/* out (N, C) bf16 += bias (C) */
void cu_add_bias_act(mps_cuda *c, act_t *out, const float *bias, int64_t N, int C);
void cu_matmul_gelu_fwd(void *ctx, void *out, void *pre, const void *inp, const float *w, const float *bias, int64_t N,
                        int C, int OC);
void cu_matmul_dgelu_bwd(void *ctx, void *dpre, float *dbias, const void *dout, int dout_act, const float *w,
                         const void *pre, int64_t N, int C, int OC);
/* kernels_elementwise.cu: the unfused GELU steps of those (x fp32 (n)): pre = x, out = gelu(x); dpre = gelu'(pre) x */
void cu_gelu_split(mps_cuda *c, act_t *out, act_t *pre, const float *x, int64_t n);
void cu_dgelu_apply(mps_cuda *c, act_t *dpre, const float *x, const act_t *pre, int64_t n);
/* the same when the product is already bf16: out = gelu(pre); d = gelu'(pre) d in place */
void cu_gelu_act(mps_cuda *c, act_t *out, const act_t *pre, int64_t n);
/* pre (N, C) += bias (C) in place, then out = gelu(pre) */
void cu_gelu_bias_act(mps_cuda *c, act_t *out, act_t *pre, const float *bias, int64_t N, int C);
void cu_dgelu_inplace(mps_cuda *c, act_t *d, const act_t *pre, int64_t n);
void cu_gemm_plans_free(mps_cuda *c);

/* ---- attention.cu */
void cu_attention_fwd(void *ctx, void *out, float *lse, const void *qkv, int B, int T, int H, int hs);
void cu_attention_bwd(void *ctx, void *dqkv, const void *dout, const void *qkv, const void *out, const float *lse,
                      int B, int T, int H, int hs, float *dbias);

/* ---- kernels_llama.cu and attention_gqa.cu: the Llama block's entries (backend.h) */
void cu_rmsnorm_fwd(void *ctx, void *out, float *rstd, const float *inp, const float *w, int64_t N, int C, float eps);
void cu_rmsnorm_bwd(void *ctx, float *dinp, void *dinp_act, float *dw, const void *dout, int dout_act,
                    const float *inp, const float *w, const float *rstd, int64_t N, int C);
void cu_rope_fwd(void *ctx, void *x, const float *cs, int B, int T, int nheads, int hd, int64_t ld);
void cu_rope_bwd(void *ctx, void *dx, const float *cs, int B, int T, int nheads, int hd, int64_t ld);
void cu_swiglu_fwd(void *ctx, void *out, const void *gate, const void *up, int64_t N, int F, int64_t ld);
void cu_swiglu_bwd(void *ctx, void *dgate, void *dup, const void *dout, const void *gate, const void *up, int64_t N,
                   int F, int64_t ld);
void cu_gqa_fwd(void *ctx, void *out, float *lse, const void *q, const void *k, const void *v, int B, int T, int H,
                int KV, int hd, int64_t ldq, int64_t ldkv);
void cu_gqa_bwd(void *ctx, void *dq, void *dk, void *dv, const void *dout, const void *q, const void *k,
                const void *v, const void *out, const float *lse, int B, int T, int H, int KV, int hd, int64_t ldq,
                int64_t ldkv, const float *rope_cs);

/* ---- attention_fast.cu: head size 64 on tensor cores; 0 when they took the call (errors are
 * recorded), -1 when the shape or alignment does not apply (the caller runs another path).
 * Dv: (B, H, T) scratch that the backward fills with the rows dout . out. out and dqkv are
 * operand buffers (bf16); the backward overwrites dqkv. colpart, when not NULL: (B, ceil(T / 64),
 * 3 H 64) scratch for the column sums of dqkv over each block of 64 rows, which the wgmma kernels
 * write (cu_attention_bwd_fast then returns 1; the mma.sync kernels leave it alone and it returns
 * 0). */
int cu_attention_fwd_fast(mps_cuda *c, act_t *out, float *lse, const act_t *qkv, int B, int T, int H, int hs);
int cu_attention_bwd_fast(mps_cuda *c, act_t *dqkv, const act_t *dout, const act_t *qkv, const act_t *out,
                          const float *lse, float *Dv, int B, int T, int H, int hs, float *colpart);

/* ---- attention_wgmma.cu: head size 64 with Hopper's wgmma, called by the two above when c->wgmma
 * (same contract; the callers check the head size and alignment). cu_wgmma_available: the device
 * is compute capability 9.0 and this build's code for it has the wgmma kernels (sm_90a). */
int cu_wgmma_available(mps_cuda *c);
int cu_attention_fwd_wgmma(mps_cuda *c, act_t *out, float *lse, const act_t *qkv, int B, int T, int H);
int cu_attention_bwd_wgmma(mps_cuda *c, act_t *dqkv, const act_t *dout, const act_t *qkv, const act_t *out,
                           const float *lse, float *Dv, int B, int T, int H, float *colpart);
/* the Llama family's grouped-query attention (cu_gqa_fwd / cu_gqa_bwd's contract) with the same
 * kernels, for head sizes 64 and 128; -1 when they do not take the shape (the caller falls back) */
int cu_gqa_fwd_wgmma(mps_cuda *c, act_t *out, float *lse, const act_t *q, const act_t *k, const act_t *v, int B, int T,
                     int H, int KV, int hd, int64_t ldq, int64_t ldkv);
int cu_gqa_bwd_wgmma(mps_cuda *c, act_t *dq, act_t *dk, act_t *dv, const act_t *dout, const act_t *q, const act_t *k,
                     const act_t *v, const act_t *out, const float *lse, float *Dv, int B, int T, int H, int KV, int hd,
                     int64_t ldq, int64_t ldkv, const float *rope_cs);

#endif
