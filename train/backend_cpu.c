/* The CPU backend: host memory and the OpenMP kernels of ops_cpu.h behind the backend table. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "ops_cpu.h"

static void *cpu_alloc(void *ctx, size_t bytes) { (void)ctx; return calloc(1, bytes ? bytes : 1); }
static void cpu_release(void *ctx, void *p) { (void)ctx; free(p); }
static void cpu_zero(void *ctx, void *p, size_t n) { (void)ctx; memset(p, 0, n); }
static void cpu_copy(void *ctx, void *d, const void *s, size_t n) { (void)ctx; memmove(d, s, n); }
static int cpu_sync(void *ctx, mps_err *err) { (void)ctx; (void)err; return 0; }
static void cpu_destroy(void *ctx) { (void)ctx; }

static void embed_fwd(void *c, float *out, const int32_t *tok, int64_t N, const float *wte, int64_t v0, int64_t Vl,
                      int C)
{
    (void)c;
    op_embed_fwd(out, tok, N, wte, v0, Vl, C);
}
static void embed_bwd(void *c, float *dwte, const float *dout, const int32_t *tok, int64_t N, int64_t v0, int64_t Vl,
                      int C)
{
    (void)c;
    op_embed_bwd(dwte, dout, tok, N, v0, Vl, C);
}
static void pos_fwd(void *c, float *x, const float *wpe, int B, int T, int C) { (void)c; op_pos_fwd(x, wpe, B, T, C); }
static void pos_bwd(void *c, float *d, const float *dx, int B, int T, int C) { (void)c; op_pos_bwd(d, dx, B, T, C); }
static void ln_fwd(void *c, void *out, float *mean, float *rstd, const float *inp, const float *w, const float *b,
                   int64_t N, int C)
{
    (void)c;
    op_layernorm_fwd(out, mean, rstd, inp, w, b, N, C);
}
/* db (C) += column sums of x (N, C); each thread owns columns, rows added in order */
static void colsum_acc(float *db, const float *x, int64_t N, int C)
{
#pragma omp parallel for schedule(static)
    for (int j = 0; j < C; j++) {
        float s = 0;
        for (int64_t i = 0; i < N; i++)
            s += x[i * C + j];
        db[j] += s;
    }
}
static void ln_bwd(void *c, float *dinp, void *dinp_act, float *dinp_colsum, float *dw, float *db, const void *dout,
                   int dout_act, const float *inp, const float *w, const float *mean, const float *rstd, int64_t N,
                   int C)
{
    (void)c; (void)dout_act; /* operand buffers are fp32 here */
    op_layernorm_bwd(dinp, dw, db, dout, inp, w, mean, rstd, N, C);
    if (dinp && dinp_act) /* operand buffers are fp32 here */
        memcpy(dinp_act, dinp, sizeof(float) * (size_t)(N * C));
    if (dinp && dinp_colsum)
        colsum_acc(dinp_colsum, dinp, N, C);
}
static void mm_fwd(void *c, float *out, const void *inp, const float *w, const float *bias, const float *resid,
                   int64_t N, int C, int OC)
{
    (void)c;
    if (!resid) {
        op_matmul_fwd(out, inp, w, bias, N, C, OC);
        return;
    }
    /* (resid + product) + bias: the rounding of the unfused product + residual_bias */
    op_matmul_fwd(out, inp, w, NULL, N, C, OC);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; i++)
        for (int j = 0; j < OC; j++) {
            float v = resid[i * OC + j] + out[i * OC + j];
            out[i * OC + j] = bias ? v + bias[j] : v;
        }
}
static void mm_fwd_act(void *c, void *out, const void *inp, const float *w, const float *bias, int64_t N, int C,
                       int OC)
{
    (void)c;
    op_matmul_fwd(out, inp, w, bias, N, C, OC);
}
static void mm_bwd(void *c, void *dinp, int dinp_act, float *dw, int dw_set, float *dbias, const void *dout,
                   int dout_act, const void *inp, const float *w, int64_t N, int C, int OC)
{
    (void)c; (void)dout_act; /* operand buffers are fp32 here */
    /* MPS_DINP_ADD: the product formed on its own, then added (the bits of a separate accumulate
     * pass); in place (the op accumulates) only when no scratch could be had */
    float *sum_into = NULL;
    if (dinp && dinp_act == MPS_DINP_ADD) {
        float *part = calloc((size_t)(N * C), sizeof(float));
        if (part) {
            sum_into = dinp;
            dinp = part;
        }
    } else if (dinp) { /* overwritten: the op accumulates */
        memset(dinp, 0, sizeof(float) * (size_t)(N * C));
    }
    if (dw && dw_set)
        memset(dw, 0, sizeof(float) * (size_t)OC * (size_t)C);
    op_matmul_bwd(dinp, dw, dbias, dout, inp, w, N, C, OC);
    if (sum_into) {
        op_accumulate(sum_into, dinp, N * C);
        free(dinp);
    }
}
static void att_fwd(void *c, void *out, float *lse, const void *qkv, int B, int T, int H, int hs)
{
    (void)c;
    op_attention_fwd(out, lse, qkv, B, T, H, hs);
}
static void att_bwd(void *c, void *dqkv, const void *dout, const void *qkv, const void *out, const float *lse,
                    int B, int T, int H, int hs, float *dbias)
{
    (void)c;
    memset(dqkv, 0, sizeof(float) * (size_t)B * T * 3 * H * hs); /* the op accumulates; the table overwrites */
    op_attention_bwd(dqkv, dout, qkv, out, lse, B, T, H, hs);
    if (dbias)
        colsum_acc(dbias, dqkv, (int64_t)B * T, 3 * H * hs);
}
static void mm_gelu_fwd(void *c, void *out, void *pre, const void *inp, const float *w, const float *bias, int64_t N,
                        int C, int OC)
{
    (void)c;
    op_matmul_fwd(pre, inp, w, bias, N, C, OC);
    op_gelu_fwd(out, pre, N * OC);
}
static void mm_dgelu_bwd(void *c, void *dpre, float *dbias, const void *dout, int dout_act, const float *w,
                         const void *pre, int64_t N, int C, int OC)
{
    (void)c; (void)dout_act; /* operand buffers are fp32 here */
    /* dpre is overwritten: the product first, then through gelu' in place */
    memset(dpre, 0, sizeof(float) * (size_t)(N * C));
    op_matmul_bwd(dpre, NULL, NULL, dout, NULL, w, N, C, OC);
    op_gelu_bwd_inplace(dpre, pre, N * C);
    if (dbias) {
        const float *d = dpre;
        for (int j = 0; j < C; j++) {
            float s = 0;
            for (int64_t i = 0; i < N; i++)
                s += d[i * C + j];
            dbias[j] += s;
        }
    }
}

static void rms_fwd(void *c, void *out, float *rstd, const float *inp, const float *w, int64_t N, int C, float eps)
{
    (void)c;
    op_rmsnorm_fwd(out, rstd, inp, w, N, C, eps);
}
static void rms_bwd(void *c, float *dinp, void *dinp_act, float *dw, const void *dout, int dout_act, const float *inp,
                    const float *w, const float *rstd, int64_t N, int C)
{
    (void)c; (void)dout_act; /* operand buffers are fp32 here */
    op_rmsnorm_bwd(dinp, dw, dout, inp, w, rstd, N, C);
    if (dinp && dinp_act) /* operand buffers are fp32 here */
        memcpy(dinp_act, dinp, sizeof(float) * (size_t)(N * C));
}
static void rope_fwd(void *c, void *x, const float *cs, int B, int T, int nh, int hd, int64_t ld)
{
    (void)c;
    op_rope_fwd(x, cs, B, T, nh, hd, ld);
}
static void rope_bwd(void *c, void *dx, const float *cs, int B, int T, int nh, int hd, int64_t ld)
{
    (void)c;
    op_rope_bwd(dx, cs, B, T, nh, hd, ld);
}
static void swiglu_fwd(void *c, void *out, const void *gate, const void *up, int64_t N, int F, int64_t ld)
{
    (void)c;
    op_swiglu_fwd(out, gate, up, N, F, ld);
}
static void swiglu_bwd(void *c, void *dgate, void *dup, const void *dout, const void *gate, const void *up, int64_t N,
                       int F, int64_t ld)
{
    (void)c;
    op_swiglu_bwd(dgate, dup, dout, gate, up, N, F, ld);
}
static void gqa_fwd(void *c, void *out, float *lse, const void *q, const void *k, const void *v, int B, int T, int H,
                    int KV, int hd, int64_t ldq, int64_t ldkv)
{
    (void)c;
    op_gqa_fwd(out, lse, q, k, v, B, T, H, KV, hd, ldq, ldkv);
}
/* rows (B T) of width hd * nheads at x, stride ld, set to 0 */
static void zero_rows(float *x, int64_t rows, int64_t width, int64_t ld)
{
    for (int64_t r = 0; r < rows; r++)
        memset(x + r * ld, 0, sizeof(float) * (size_t)width);
}
static void gqa_bwd(void *c, void *dq, void *dk, void *dv, const void *dout, const void *q, const void *k,
                    const void *v, const void *out, const float *lse, int B, int T, int H, int KV, int hd, int64_t ldq,
                    int64_t ldkv, const float *rope_cs)
{
    (void)c;
    /* the op accumulates; the table overwrites */
    const int64_t rows = (int64_t)B * T;
    zero_rows(dq, rows, (int64_t)H * hd, ldq);
    zero_rows(dk, rows, (int64_t)KV * hd, ldkv);
    zero_rows(dv, rows, (int64_t)KV * hd, ldkv);
    op_gqa_bwd(dq, dk, dv, dout, q, k, v, out, lse, B, T, H, KV, hd, ldq, ldkv);
    if (rope_cs) {
        op_rope_bwd(dq, rope_cs, B, T, H, hd, ldq);
        op_rope_bwd(dk, rope_cs, B, T, KV, hd, ldkv);
    }
}
/* the stacked products part by part, each into its columns */
static void mm_parts_fwd_act(void *c, void *out, const void *inp, const float *const *w, const float *const *bias,
                             const int *oc, int nparts, int64_t N, int C)
{
    (void)c;
    const int64_t W = mps_parts_width(oc, nparts);
    int64_t o = 0;
    for (int i = 0; i < nparts; o += oc[i], i++)
        op_matmul_fwd_ld((float *)out + o, W, inp, w[i], bias[i], N, C, oc[i]);
}
static void mm_parts_bwd(void *c, void *dinp_buf, int dinp_act, float *const *dw, int dw_set, float *const *dbias,
                         const void *dout, const void *inp, const float *const *w, const int *oc, int nparts, int64_t N,
                         int C)
{
    (void)c; (void)dinp_act; /* operand buffers are fp32 here */
    float *dinp = dinp_buf;
    const int64_t W = mps_parts_width(oc, nparts);
    int64_t o = 0;
    if (dinp) /* overwritten: the parts' products add up in it in part order */
        memset(dinp, 0, sizeof(float) * (size_t)(N * C));
    for (int i = 0; i < nparts; o += oc[i], i++) {
        if (dw[i] && dw_set)
            memset(dw[i], 0, sizeof(float) * (size_t)oc[i] * (size_t)C);
        op_matmul_bwd_ld(dinp, dw[i], dbias[i], (const float *)dout + o, W, inp, w[i], N, C, oc[i]);
    }
}

static void residual_bias(void *c, float *out, const float *a, const float *b, const float *bias, int64_t N, int C)
{
    (void)c;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; i++)
        for (int j = 0; j < C; j++)
            out[i * C + j] = a[i * C + j] + b[i * C + j] + bias[j];
}

static void bias_grad(void *c, float *db, const float *dout, int64_t N, int C)
{
    (void)c;
    colsum_acc(db, dout, N, C);
}

static void add(void *c, float *out, const float *a, const float *b, int64_t n) { (void)c; op_add(out, a, b, n); }
static void accumulate(void *c, float *d, const float *s, int64_t n) { (void)c; op_accumulate(d, s, n); }
static void xent_stats(void *c, float *rowmax, float *sumexp, float *tlogit, const void *logits,
                       const int32_t *targets, int64_t N, int64_t Vl, int64_t v0, int64_t V)
{
    (void)c;
    op_xent_rowmax(rowmax, logits, N, Vl, v0, V);
    op_xent_sumexp(sumexp, logits, rowmax, N, Vl, v0, V);
    op_xent_target(tlogit, logits, targets, N, Vl, v0);
}
static void xent_rescale(void *c, float *sumexp, const float *rowmax, const float *gmax, int64_t N)
{
    (void)c;
    for (int64_t i = 0; i < N; i++)
        sumexp[i] = rowmax[i] == -INFINITY ? 0.0f : sumexp[i] * expf(rowmax[i] - gmax[i]);
}
static void xent_bwd(void *c, void *dlogits, const void *logits, const int32_t *targets, const float *gmax,
                     const float *gsumexp, float s, int64_t N, int64_t Vl, int64_t v0, int64_t V)
{
    (void)c;
    op_xent_bwd(dlogits, logits, targets, gmax, gsumexp, s, N, Vl, v0, V);
}
static void xent_stats_bwd(void *c, float *rowmax, float *sumexp, float *tlogit, void *logits,
                           const int32_t *targets, float s, int64_t N, int64_t Vl, int64_t v0, int64_t V)
{
    xent_stats(c, rowmax, sumexp, tlogit, logits, targets, N, Vl, v0, V);
    xent_bwd(c, logits, logits, targets, rowmax, sumexp, s, N, Vl, v0, V);
}
static void xent_loss_add(void *c, double *acc, int first, const float *gmax, const float *sumexp,
                          const float *tlogit, int64_t N)
{
    (void)c;
    double sum = 0;
    for (int64_t i = 0; i < N; i++)
        sum += (double)logf(sumexp[i]) + gmax[i] - tlogit[i];
    *acc = (first ? 0.0 : *acc) + sum;
}
static void adamw_many(void *c, const mps_adamw_job *jobs, int count, const mps_adamw_step *st)
{
    (void)c;
    for (int i = 0; i < count; i++) {
        const mps_adamw_job *j = &jobs[i];
        if (st->grad_scale != 1.0f) /* the same rounding as scaling inside the update */
            op_scale(j->grad, st->grad_scale, j->n);
        op_adamw(j->param, j->grad, j->m, j->v, j->n, st->lr, st->beta1, st->beta2, st->eps, j->weight_decay, st->t);
        if (!j->keep_grad)
            memset(j->grad, 0, sizeof(float) * (size_t)j->n);
    }
}
static double sumsq_many(void *c, const float *const *xs, const int64_t *ns, int count)
{
    (void)c;
    double s = 0;
    for (int i = 0; i < count; i++)
        s += op_sumsq(xs[i], ns[i]);
    return s;
}

void mps_backend_cpu(mps_backend *out)
{
    *out = (mps_backend){
        .name = "cpu", .ctx = NULL, .device_memory = 0, .any_head_dim = 1, .alloc = cpu_alloc, .release = cpu_release,
        .alloc_host = cpu_alloc, .release_host = cpu_release,
        .zero = cpu_zero, .copy = cpu_copy, .to_host = cpu_copy, .from_host = cpu_copy,
        .from_host_queued = cpu_copy, .sync = cpu_sync,
        .embed_fwd = embed_fwd, .embed_bwd = embed_bwd, .pos_fwd = pos_fwd, .pos_bwd = pos_bwd,
        .layernorm_fwd = ln_fwd, .layernorm_bwd = ln_bwd, .matmul_fwd = mm_fwd, .matmul_bwd = mm_bwd,
        .matmul_fwd_act = mm_fwd_act,
        .attention_fwd = att_fwd, .attention_bwd = att_bwd, .matmul_gelu_fwd = mm_gelu_fwd,
        .matmul_dgelu_bwd = mm_dgelu_bwd,
        .rmsnorm_fwd = rms_fwd, .rmsnorm_bwd = rms_bwd, .rope_fwd = rope_fwd, .rope_bwd = rope_bwd,
        .swiglu_fwd = swiglu_fwd, .swiglu_bwd = swiglu_bwd, .gqa_fwd = gqa_fwd, .gqa_bwd = gqa_bwd,
        .matmul_parts_fwd_act = mm_parts_fwd_act, .matmul_parts_bwd = mm_parts_bwd,
        .residual_bias = residual_bias, .bias_grad = bias_grad, .add = add, .accumulate = accumulate,
        .xent_stats = xent_stats, .xent_rescale = xent_rescale, .act_bytes = sizeof(float),
        .xent_bwd = xent_bwd, .xent_stats_bwd = xent_stats_bwd, .xent_loss_add = xent_loss_add,
        .adamw_many = adamw_many, .sumsq_many = sumsq_many,
        .destroy = cpu_destroy,
    };
}

#ifndef MPS_HAVE_CUDA
int mps_backend_cuda(mps_backend *out, mps_err *err)
{
    (void)out;
    return mps_fail(err, MPS_EUNSUPPORTED, "--backend cuda: this build has no CUDA backend (nvcc was not found)");
}
#endif
