/* CPU reference kernels of the GPT-2 trainer (fp32, OpenMP). Pure functions: no communication.
 * They work on one rank's tensor-parallel slice; the engine (train/engine.c) adds the TP/PP/DP
 * collectives between them. N = B * T rows. Backward functions ACCUMULATE (+=) into every
 * gradient output, so that gradients of micro-batches and of several uses sum up; a NULL
 * gradient output is skipped. */
#ifndef MPS_OPS_CPU_H
#define MPS_OPS_CPU_H

#include <stdint.h>

/* Vocab-parallel embedding: this rank holds rows [v0, v0 + Vl) of wte (Vl, C).
 * out (N, C) = wte[tok - v0] for tokens this rank owns, 0 for the others (the engine sums over TP). */
void op_embed_fwd(float *out, const int32_t *tokens, int64_t N, const float *wte, int64_t v0, int64_t Vl, int C);
void op_embed_bwd(float *dwte, const float *dout, const int32_t *tokens, int64_t N, int64_t v0, int64_t Vl, int C);

/* Learned positions: x (B, T, C) += wpe (T, C) (first T rows of wpe); bwd: dwpe += sum over b of dx. */
void op_pos_fwd(float *x, const float *wpe, int B, int T, int C);
void op_pos_bwd(float *dwpe, const float *dx, int B, int T, int C);

/* LayerNorm over the last dimension, eps 1e-5. out, inp (N, C); w, b (C); mean, rstd (N) saved for bwd. */
void op_layernorm_fwd(float *out, float *mean, float *rstd, const float *inp, const float *w, const float *b,
                      int64_t N, int C);
void op_layernorm_bwd(float *dinp, float *dw, float *db, const float *dout, const float *inp, const float *w,
                      const float *mean, const float *rstd, int64_t N, int C);

/* out (N, OC) = inp (N, C) @ w^T + bias, w (OC, C) as PyTorch nn.Linear / the canonical (out, in)
 * tensors; bias (OC) may be NULL. */
void op_matmul_fwd(float *out, const float *inp, const float *w, const float *bias, int64_t N, int C, int OC);
/* the same into rows of stride ldo (columns of a wider output) */
void op_matmul_fwd_ld(float *out, int64_t ldo, const float *inp, const float *w, const float *bias, int64_t N, int C,
                      int OC);
/* dinp (N, C) += dout @ w; dw (OC, C) += dout^T @ inp; dbias (OC) += column sums of dout. */
void op_matmul_bwd(float *dinp, float *dw, float *dbias, const float *dout, const float *inp, const float *w,
                   int64_t N, int C, int OC);
/* the same with dout in rows of stride ldd (columns of a wider gradient) */
void op_matmul_bwd_ld(float *dinp, float *dw, float *dbias, const float *dout, int64_t ldd, const float *inp,
                      const float *w, int64_t N, int C, int OC);

/* Causal self-attention over H local heads of size hs (Cl = H * hs).
 * qkv (B, T, 3 * Cl): each row is [q (Cl) | k (Cl) | v (Cl)], head h at h * hs in each part.
 * out (B, T, Cl); lse (B, H, T): log-sum-exp of each row of scaled scores, saved for bwd.
 * Flash style: no (T, T) matrix is stored; bwd recomputes the probabilities from q, k and lse. */
void op_attention_fwd(float *out, float *lse, const float *qkv, int B, int T, int H, int hs);
void op_attention_bwd(float *dqkv, const float *dout, const float *qkv, const float *out, const float *lse, int B,
                      int T, int H, int hs);

/* The Llama block. RMSNorm over the last dimension: out = w * x / sqrt(mean(x^2) + eps), the
 * statistics in fp32; rstd (N) saved for bwd, which ADDS into dinp (N, C) and dw (C). */
void op_rmsnorm_fwd(float *out, float *rstd, const float *inp, const float *w, int64_t N, int C, float eps);
void op_rmsnorm_bwd(float *dinp, float *dw, const float *dout, const float *inp, const float *w, const float *rstd,
                    int64_t N, int C);
/* Rotary embeddings in place on nheads heads of hd at the start of each row (stride ld) of x
 * (B, T, ld): Hugging Face's rotate-half, the pairs (i, i + hd/2) turned by position t's angle;
 * cs (2, T, hd/2) holds the cosines, then the sines. bwd turns a gradient back, in place. */
void op_rope_fwd(float *x, const float *cs, int B, int T, int nheads, int hd, int64_t ld);
void op_rope_bwd(float *dx, const float *cs, int B, int T, int nheads, int hd, int64_t ld);
/* SwiGLU: out (N, F) = silu(gate) * up, gate and up (N, F) in rows of stride ld; bwd OVERWRITES
 * dgate and dup (rows of stride ld; they may alias gate and up), dout (N, F). */
void op_swiglu_fwd(float *out, const float *gate, const float *up, int64_t N, int F, int64_t ld);
void op_swiglu_bwd(float *dgate, float *dup, const float *dout, const float *gate, const float *up, int64_t N, int F,
                   int64_t ld);
/* Causal grouped-query attention: q (B, T, H hd) in rows of stride ldq, k, v (B, T, KV hd) in
 * rows of stride ldkv, out (B, T, H hd) dense; query head h reads kv head h / (H / KV), with no
 * copy of k, v per query head. lse (B, H, T) as op_attention_fwd. bwd ADDS into dq (as q), dk,
 * dv (as k, v). */
void op_gqa_fwd(float *out, float *lse, const float *q, const float *k, const float *v, int B, int T, int H, int KV,
                int hd, int64_t ldq, int64_t ldkv);
void op_gqa_bwd(float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k, const float *v,
                const float *out, const float *lse, int B, int T, int H, int KV, int hd, int64_t ldq, int64_t ldkv);

/* GELU, tanh approximation (GPT-2's gelu_new). */
void op_gelu_fwd(float *out, const float *inp, int64_t n);
void op_gelu_bwd(float *dinp, const float *inp, const float *dout, int64_t n);
/* d = gelu'(inp) * d (the product's gradient turned into the GELU input's, in place) */
void op_gelu_bwd_inplace(float *d, const float *inp, int64_t n);

/* out = a + b (out may alias a or b). */
void op_add(float *out, const float *a, const float *b, int64_t n);
/* dst += src */
void op_accumulate(float *dst, const float *src, int64_t n);

/* Vocab-parallel cross-entropy. logits (N, Vl) cover vocab ids [v0, v0 + Vl); only ids < V are
 * real (the padded rows V..Vp-1 take no part in the softmax). Per row i, after the engine has
 * combined the partial results over the TP group (max of rowmax, then sum of sumexp and tlogit):
 *   loss_i = log(sumexp_i) + gmax_i - tlogit_i. */
void op_xent_rowmax(float *rowmax, const float *logits, int64_t N, int64_t Vl, int64_t v0, int64_t V);  /* -INFINITY if no real id */
void op_xent_sumexp(float *sumexp, const float *logits, const float *gmax, int64_t N, int64_t Vl, int64_t v0, int64_t V);
void op_xent_target(float *tlogit, const float *logits, const int32_t *targets, int64_t N, int64_t Vl, int64_t v0); /* 0 when not owned */
/* dlogits (N, Vl) = scale * (softmax - onehot(target)), 0 on padded ids; OVERWRITES dlogits,
 * which may be the logits buffer itself (element-wise in place).
 * scale is d(total loss)/d(loss_i), e.g. 1 / (global batch * T). */
void op_xent_bwd(float *dlogits, const float *logits, const int32_t *targets, const float *gmax, const float *gsumexp,
                 float scale, int64_t N, int64_t Vl, int64_t v0, int64_t V);

/* AdamW with decoupled weight decay (PyTorch torch.optim.AdamW semantics) on n elements;
 * t is the step number after the increment (1 for the first update). */
void op_adamw(float *param, const float *grad, float *m, float *v, int64_t n, float lr, float beta1, float beta2,
              float eps, float weight_decay, int64_t t);
/* sum of squares in double */
double op_sumsq(const float *x, int64_t n);
void op_scale(float *x, float s, int64_t n);

#endif
