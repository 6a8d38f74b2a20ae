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

/* One tensor's AdamW update (adamw_many): param, grad, m, v hold n elements each. */
typedef struct {
    float *param, *grad, *m, *v;
    int64_t n;
    float weight_decay; /* 0 for biases and norms */
    /* the products read param itself (the whole tensor, not a partition or shard): a backend
     * whose operands are not fp32 may keep an operand copy of it, updated in the same pass */
    int read_by_products;
    /* the grad is left as it is, not zeroed: the next step's first backward overwrites it
     * (matmul_bwd's dw_set) */
    int keep_grad;
} mps_adamw_job;
/* The step's AdamW constants, shared by every tensor. */
typedef struct {
    float lr, beta1, beta2, eps;
    int64_t t;        /* 1-based step, for the bias corrections */
    float grad_scale; /* the clipping factor */
} mps_adamw_step;

/* the most parts of one stacked product (matmul_parts_fwd_act) */
#define MPS_MAX_PARTS 4

/* W, the stacked product's width: the sum of its parts' output widths oc */
static inline int64_t mps_parts_width(const int *oc, int nparts)
{
    int64_t W = 0;
    for (int i = 0; i < nparts; i++)
        W += oc[i];
    return W;
}

/* matmul_bwd's dinp modes */
enum { MPS_DINP_F32 = 0, MPS_DINP_ACT = 1, MPS_DINP_ADD = 2 };

typedef struct mps_backend {
    const char *name; /* "cpu", "cuda" */
    void *ctx;
    int device_memory; /* 1: buffers are not host memory (collectives over MPI must stage them) */
    /* 1: the Llama block's kernels are checked (tests) for head sizes with n_head x head size !=
     * n_embd (model.h head_dim); 0: the engine refuses such models */
    int any_head_dim;
    /* memory: alloc returns zeroed memory or NULL */
    void *(*alloc)(void *ctx, size_t bytes);
    void (*release)(void *ctx, void *p);
    void (*zero)(void *ctx, void *p, size_t bytes);
    void (*copy)(void *ctx, void *dst, const void *src, size_t bytes);      /* buffer -> buffer */
    void (*to_host)(void *ctx, void *host, const void *src, size_t bytes);  /* buffer -> host */
    void (*from_host)(void *ctx, void *dst, const void *host, size_t bytes); /* host -> buffer */
    /* host -> buffer, queued after the work before it without a wait: the host memory must stay
     * as it is until the next sync (CPU: copied at once) */
    void (*from_host_queued)(void *ctx, void *dst, const void *host, size_t bytes);
    /* host memory that to_host / from_host move fastest (CUDA: pinned), NOT zeroed, or NULL */
    void *(*alloc_host)(void *ctx, size_t bytes);
    void (*release_host)(void *ctx, void *p);
    /* 0, or -1 with the first asynchronous error the device reported since the last call */
    int (*sync)(void *ctx, mps_err *err);
    /* The native queue the backend's work runs on in issue order (CUDA: its cudaStream_t), for a
     * communication backend that queues its work behind the backend's and the backend's behind
     * its own instead of waiting on the host (cli/comm_nccl.c); NULL where work is done as it is
     * called (CPU). */
    void *(*native_stream)(void *ctx);

    void (*embed_fwd)(void *ctx, float *out, const int32_t *tokens, int64_t N, const float *wte, int64_t v0,
                      int64_t Vl, int C);
    void (*embed_bwd)(void *ctx, float *dwte, const float *dout, const int32_t *tokens, int64_t N, int64_t v0,
                      int64_t Vl, int C);
    void (*pos_fwd)(void *ctx, float *x, const float *wpe, int B, int T, int C);
    void (*pos_bwd)(void *ctx, float *dwpe, const float *dx, int B, int T, int C);
    /* Activations that only matrix products (or the attention and layernorm backwards) read ("GEMM
     * operands": the layernorm outputs, qkv, the attention output, the GELU input and output, the
     * logits; the gradients dqkv, dfch, dlogits, the attention output's, the layernorm outputs' when
     * no TP sum lies between, and a copy of the residual gradient) are kept in the backend's operand
     * format: act_bytes per element, fp32 on the CPU (4), bf16 on CUDA (2), so that the GPU rounds
     * each once where it is made instead of at every product. The engine sizes them with act_bytes and passes them as void *; it never reads
     * them. A kernel that writes such a buffer OVERWRITES it (no += there). */
    int act_bytes;
    void (*layernorm_fwd)(void *ctx, void *out_act, float *mean, float *rstd, const float *inp, const float *w,
                          const float *b, int64_t N, int C);
    /* dinp (N, C) += the layernorm's input gradient; dw, db (C) +=. The next consumers of dinp (a
     * residual gradient) are products and a bias gradient, so the same pass can hand them what they
     * read: dinp_act (operand buffer, overwritten) = the updated dinp, and dinp_colsum (C) += its
     * column sums, as bias_grad would add them (the CPU adds rows in order): the caller passes the
     * bias gradient itself. Each may be NULL. dout is an operand buffer when dout_act (the input
     * products' dinp, when no TP sum lies between), else fp32. */
    void (*layernorm_bwd)(void *ctx, float *dinp, void *dinp_act, float *dinp_colsum, float *dw, float *db,
                          const void *dout, int dout_act, const float *inp, const float *w, const float *mean,
                          const float *rstd, int64_t N, int C);
    /* out (N, OC) = inp @ w^T + bias + resid (bias, resid may be NULL; resid does not alias out):
     * the residual add rides in the product's epilogue. The CPU adds them as residual_bias does,
     * (resid + product) + bias, so the fused and the unfused forms give the same bits there. */
    void (*matmul_fwd)(void *ctx, float *out, const void *inp_act, const float *w, const float *bias,
                       const float *resid, int64_t N, int C, int OC);
    /* out (N, OC) = inp @ w^T + bias (bias may be NULL) as an operand buffer: the head's logits, qkv */
    void (*matmul_fwd_act)(void *ctx, void *out_act, const void *inp_act, const float *w, const float *bias,
                           int64_t N, int C, int OC);
    /* dinp (N, C) = dout @ w is OVERWRITTEN (a zero pass and a read of the old values saved), an
     * operand buffer when dinp_act is MPS_DINP_ACT (the attention output's gradient, which only the
     * attention backward reads; a layernorm output's, which only the layernorm backward reads),
     * fp32 when MPS_DINP_F32; with MPS_DINP_ADD fp32 dinp += dout @ w (the sum of several products'
     * input gradients, e.g. q, k and v of one norm's output, in the product's epilogue instead of
     * an extra pass; the product is formed first, then added, as an accumulate pass would); dw (OC, C) += dout^T inp, or = when dw_set (the step's first
     * product into a gradient that AdamW left unzeroed: no zeroing pass, no read of zeros); dbias
     * (OC) +=. dout is an operand buffer when dout_act, else fp32. */
    void (*matmul_bwd)(void *ctx, void *dinp, int dinp_act, float *dw, int dw_set, float *dbias, const void *dout,
                       int dout_act, const void *inp_act, const float *w, int64_t N, int C, int OC);
    void (*attention_fwd)(void *ctx, void *out_act, float *lse, const void *qkv_act, int B, int T, int H, int hs);
    /* dqkv (overwritten) from dout, an operand buffer (matmul_bwd's dinp_act); dbias (3 H hs) +=
     * the column sums of dqkv when not NULL (the qkv bias gradient: a GPU takes them from the
     * kernels' registers instead of reading dqkv again) */
    void (*attention_bwd)(void *ctx, void *dqkv_act, const void *dout_act, const void *qkv_act, const void *out_act,
                          const float *lse, int B, int T, int H, int hs, float *dbias);
    /* The MLP's first product with its GELU, so that a GPU can do both in one pass:
     * pre (N, OC) = inp (N, C) @ w^T + bias, out = gelu(pre); pre and out are operand buffers. */
    void (*matmul_gelu_fwd)(void *ctx, void *out_act, void *pre_act, const void *inp_act, const float *w,
                            const float *bias, int64_t N, int C, int OC);
    /* ... and the matching backward through the second product and the GELU: dpre (N, C) (operand
     * buffer, overwritten) = (dout (N, OC) @ w (OC, C)) * gelu'(pre); dbias (C) += column sums of dpre
     * (the first product's bias gradient), skipped when NULL. dout is an operand buffer when
     * dout_act, else fp32. */
    void (*matmul_dgelu_bwd)(void *ctx, void *dpre_act, float *dbias, const void *dout, int dout_act, const float *w,
                             const void *pre_act, int64_t N, int C, int OC);
    /* The Llama block's primitives (train/block_llama.c); a backend that leaves them NULL trains
     * GPT-2 only (the engine refuses other models there). Operand buffers as above.
     * RMSNorm: out (N, C) = w * x / sqrt(mean(x^2) + eps), fp32 statistics, rstd (N) kept;
     * bwd: dinp (N, C) += the input gradient, dw (C) +=; dout an operand buffer when dout_act
     * (the stacked product's input gradient, when no TP sum lies between), else fp32 (the sum
     * over the TP group); dinp_act (an operand buffer, overwritten; may be NULL) = the updated
     * dinp, for the products that read the residual gradient next (as layernorm_bwd's). */
    void (*rmsnorm_fwd)(void *ctx, void *out_act, float *rstd, const float *inp, const float *w, int64_t N, int C,
                        float eps);
    void (*rmsnorm_bwd)(void *ctx, float *dinp, void *dinp_act, float *dw, const void *dout, int dout_act,
                        const float *inp, const float *w, const float *rstd, int64_t N, int C);
    /* Rotary embeddings in place over nheads heads of hd at the start of each row (stride ld) of
     * an operand buffer (B, T, ld); cs (2, T, hd/2): cosines, then sines (the engine's table). The
     * backward turns a gradient back. */
    void (*rope_fwd)(void *ctx, void *x_act, const float *cs, int B, int T, int nheads, int hd, int64_t ld);
    void (*rope_bwd)(void *ctx, void *dx_act, const float *cs, int B, int T, int nheads, int hd, int64_t ld);
    /* out (N, F) = silu(gate) * up, gate and up (N, F) in rows of stride ld (the columns of one
     * stacked product: gate|up, ld 2 F); bwd: dgate, dup (overwritten, rows of stride ld; they
     * may be gate and up), dout (N, F) */
    void (*swiglu_fwd)(void *ctx, void *out_act, const void *gate_act, const void *up_act, int64_t N, int F,
                       int64_t ld);
    void (*swiglu_bwd)(void *ctx, void *dgate_act, void *dup_act, const void *dout_act, const void *gate_act,
                       const void *up_act, int64_t N, int F, int64_t ld);
    /* Causal grouped-query attention: q (B, T, H hd) in rows of stride ldq, k, v (B, T, KV hd) in
     * rows of stride ldkv (q|k|v the columns of one stacked product: ldq = ldkv = (H + 2 KV) hd),
     * out (B, T, H hd) dense; query head h on kv head h / (H / KV); lse (B, H, T). bwd: dq (as q),
     * dk, dv (as k, v) overwritten; with rope_cs (rope_fwd's table, may be NULL) dq and dk come out
     * turned back as rope_bwd would (a GPU does it as it stores them, instead of another pass). */
    void (*gqa_fwd)(void *ctx, void *out_act, float *lse, const void *q_act, const void *k_act, const void *v_act,
                    int B, int T, int H, int KV, int hd, int64_t ldq, int64_t ldkv);
    void (*gqa_bwd)(void *ctx, void *dq_act, void *dk_act, void *dv_act, const void *dout_act, const void *q_act,
                    const void *k_act, const void *v_act, const void *out_act, const float *lse, int B, int T, int H,
                    int KV, int hd, int64_t ldq, int64_t ldkv, const float *rope_cs);
    /* Products of one input with several weights stacked along their outputs (q|k|v, gate|up),
     * so that a GPU runs one product over the stacked weight instead of one per part: part i is
     * w[i] (oc[i], C) with bias[i] (oc[i], may be NULL), at columns [o_i, o_i + oc[i]) of out, o_i
     * the sum of oc[<i]; W = the sum of all oc. fwd: out (N, W, an operand buffer) = inp @ [w_0;
     * w_1; ...]^T + [bias_0 | bias_1 | ...]. bwd: dinp (N, C) = dout @ [w_0; w_1; ...],
     * OVERWRITTEN (the sum of the parts' input gradients, in one product), fp32 or, when
     * dinp_act is MPS_DINP_ACT, an operand buffer (MPS_DINP_ADD is not taken); dw[i] (oc[i], C) +=
     * dout_i^T inp, or = when dw_set (as matmul_bwd's); dbias[i] (oc[i]) += the column sums of
     * dout_i (each dw[i], dbias[i] may be NULL); dout (N, W) an operand buffer. At most
     * MPS_MAX_PARTS parts. */
    void (*matmul_parts_fwd_act)(void *ctx, void *out_act, const void *inp_act, const float *const *w,
                                 const float *const *bias, const int *oc, int nparts, int64_t N, int C);
    void (*matmul_parts_bwd)(void *ctx, void *dinp, int dinp_act, float *const *dw, int dw_set, float *const *dbias,
                             const void *dout_act, const void *inp_act, const float *const *w, const int *oc, int nparts,
                             int64_t N, int C);
    void (*residual_bias)(void *ctx, float *out, const float *a, const float *b, const float *bias, int64_t N, int C);
    /* db (C) += column sums of dout (N, C) */
    void (*bias_grad)(void *ctx, float *db, const float *dout, int64_t N, int C);
    void (*add)(void *ctx, float *out, const float *a, const float *b, int64_t n);
    void (*accumulate)(void *ctx, float *dst, const float *src, int64_t n);
    /* Cross-entropy over this rank's vocab slice in one pass over the logits (N, Vl, an operand
     * buffer, as the head's product writes them): per row the
     * local max over real ids (-INFINITY if none), the sum of exp(logit - local max), and the target's
     * logit (0 when another rank owns it). Under TP the engine takes the group's max and calls
     * xent_rescale (sumexp *= exp(rowmax - gmax)) before summing sumexp and tlogit over the group. */
    void (*xent_stats)(void *ctx, float *rowmax, float *sumexp, float *tlogit, const void *logits_act,
                       const int32_t *targets, int64_t N, int64_t Vl, int64_t v0, int64_t V);
    void (*xent_rescale)(void *ctx, float *sumexp, const float *rowmax, const float *gmax, int64_t N);
    /* dlogits (operand buffer) = scale * (softmax - onehot(target)), 0 on padded ids; dlogits may be
     * the logits buffer itself (element-wise in place) */
    void (*xent_bwd)(void *ctx, void *dlogits_act, const void *logits_act, const int32_t *targets, const float *gmax,
                     const float *gsumexp, float scale, int64_t N, int64_t Vl, int64_t v0, int64_t V);
    /* xent_stats, then xent_bwd in place (dlogits over the logits) with gmax = rowmax and gsumexp =
     * sumexp, for a rank whose statistics are the row's own (the vocab not split over TP): the
     * same results, and a GPU reads the logits once instead of twice */
    void (*xent_stats_bwd)(void *ctx, float *rowmax, float *sumexp, float *tlogit, void *logits_act,
                           const int32_t *targets, float scale, int64_t N, int64_t Vl, int64_t v0, int64_t V);
    /* *acc (a buffer of one double) = (first ? 0 : *acc) + the sum over rows of log(sumexp) + gmax
     * - tlogit, in double, in stream order: the caller reads acc with to_host after a sync, once
     * per step instead of waiting for the device at every micro-batch's head */
    void (*xent_loss_add)(void *ctx, double *acc, int first, const float *gmax, const float *sumexp,
                          const float *tlogit, int64_t N);
    /* AdamW over count tensors at once (one launch on a GPU instead of one per tensor) on grad *
     * step->grad_scale (the clipping factor, applied in the same pass); every grad is zeroed
     * afterwards, ready for the next step's accumulation, but those of keep_grad jobs, whose
     * contents are then unspecified (the next step's first backward overwrites them). */
    void (*adamw_many)(void *ctx, const mps_adamw_job *jobs, int count, const mps_adamw_step *step);
    /* host result: the sum of squares of count buffers in double (a fixed order that depends on the
     * sizes only); one wait for the device, one pass on a GPU */
    double (*sumsq_many)(void *ctx, const float *const *xs, const int64_t *ns, int count);
    void (*destroy)(void *ctx);
} mps_backend;

/* The CPU backend: host memory, OpenMP kernels. */
void mps_backend_cpu(mps_backend *out);
/* The CUDA backend on the current device; an error when this build has none or no GPU is there. */
int mps_backend_cuda(mps_backend *out, mps_err *err);

#endif
