/* matmul_fwd / matmul_bwd of the CUDA backend: bf16 operands, fp32 accumulation and fp32 outputs.
 * The activations a product reads are operand buffers, already bf16 (backend.h: the kernel that
 * makes one rounds it once); the weights come from the bf16 copies AdamW writes along with its
 * update (cuda_internal.h mps_wcopy) where there is a valid one, and they (before the first step,
 * or at ZeRO >= 1 with dp > 1), like a dout that is an fp32 residual gradient with no operand
 * copy, are otherwise rounded to bf16 into scratch buffers per call (memory-bound, small next to
 * the product). cuBLASLt runs with compute type 32F. The forward bias is a cuBLASLt epilogue
 * (D = A B + resid + bias, the residual as the C matrix) when the bias is 16-byte aligned, else a
 * kernel. The backward overwrites dinp (beta = 0) and accumulates (beta = 1) into dw, as the
 * table asks; dbias is a deterministic column sum of dout (kernels_rows.cu).
 *
 * cuBLAS is column-major; a row-major (R, C) matrix is a column-major (C, R) one with the same
 * leading dimension, so with X^T meaning "the same bytes":
 *   out (N, OC) = inp (N, C) @ w^T        ->  out^T (OC x N) = op_T(w^T (C x OC)) @ inp^T (C x N)
 *   dinp (N, C) = dout (N, OC) @ w        ->  dinp^T (C x N) = w^T (C x OC) @ dout^T (OC x N)
 *   dw (OC, C) += dout^T @ inp (N, C)     ->  dw^T (C x OC) += inp^T (C x N) @ op_T(dout^T (OC x N))
 *
 * Plans (descriptors + the heuristic's algorithm) are cached per shape and alignment; when
 * cuBLASLt offers no algorithm, cublasGemmEx runs the same product. Both are deterministic for a
 * given shape (no atomics; split-K reductions run in a fixed order). */
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "cuda_internal.h"

/* ---------------------------------------------------------------- fp32 -> bf16 */

__global__ void k_to_bf16(__nv_bfloat16 *dst, const float *src, int64_t n, int vec)
{
    const int64_t stride = (int64_t)gridDim.x * blockDim.x, i0 = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    int64_t done = 0;
    if (vec) {
        const int64_t n4 = n >> 2;
        __nv_bfloat162 *d2 = reinterpret_cast<__nv_bfloat162 *>(dst);
        for (int64_t i = i0; i < n4; i += stride) {
            float4 v = reinterpret_cast<const float4 *>(src)[i];
            d2[2 * i] = __floats2bfloat162_rn(v.x, v.y);
            d2[2 * i + 1] = __floats2bfloat162_rn(v.z, v.w);
        }
        done = n4 << 2;
    }
    for (int64_t i = done + i0; i < n; i += stride)
        dst[i] = __float2bfloat16_rn(src[i]);
}

/* dst (n) = src rounded to bf16: 16-byte loads where src allows them (and dst the pairs of bf16
 * stores that go with them); 0, or -1 with the error recorded */
static int round_bf16(mps_cuda *c, __nv_bfloat16 *dst, const float *src, int64_t n, const char *what)
{
    const int vec = cu_aligned16(src) && ((uintptr_t)dst & 3) == 0;
    k_to_bf16<<<cu_grid(c, vec ? n / 4 + 1 : n, 256), 256, 0, c->stream>>>(dst, src, n, vec);
    return cu_launched(c, what);
}

/* bf16 copy of src (n) in a scratch slot (256-byte aligned) */
static const __nv_bfloat16 *to_bf16(mps_cuda *c, int slot, const float *src, int64_t n, const char *what)
{
    __nv_bfloat16 *dst = (__nv_bfloat16 *)cu_scratch(c, slot, (size_t)n * sizeof(__nv_bfloat16));
    return dst && round_bf16(c, dst, src, n, what) == 0 ? dst : NULL;
}

/* the bf16 form of a parameter (a weight or a bias): the copy AdamW keeps of it when there is a
 * valid one (kernels_optim.cu cu_wcopy_find), else rounded into a scratch slot like any operand */
static const __nv_bfloat16 *param_bf16(mps_cuda *c, int slot, const float *w, int64_t n, const char *what)
{
    const act_t *h = cu_wcopy_find(c, w, n);
    return h ? h : to_bf16(c, slot, w, n, what);
}

/* ---------------------------------------------------------------- plans */

static unsigned ptr_align(const void *p)
{
    unsigned a = 256;
    while (a > 1 && ((uintptr_t)p & (a - 1)))
        a >>= 1;
    return a;
}

static void plan_release(mps_gemm_plan *p)
{
    if (p->la)
        cublasLtMatrixLayoutDestroy(p->la);
    if (p->lb)
        cublasLtMatrixLayoutDestroy(p->lb);
    if (p->ld)
        cublasLtMatrixLayoutDestroy(p->ld);
    if (p->desc)
        cublasLtMatmulDescDestroy(p->desc);
    memset(p, 0, sizeof *p);
}

void cu_gemm_plans_free(mps_cuda *c)
{
    for (int i = 0; i < c->nplans && i < MPS_CUDA_MAX_PLANS; i++)
        plan_release(&c->plans[i]);
    c->nplans = 0;
}

/* builds p (key fields set); p->ok = 0 when cuBLASLt has no algorithm: not an error */
static int plan_build(mps_cuda *c, mps_gemm_plan *p, const char *what)
{
    cublasStatus_t st;
#define LT(call)                                                                                          \
    do {                                                                                                  \
        st = (call);                                                                                      \
        if (st != CUBLAS_STATUS_SUCCESS) {                                                                \
            cu_fail(c, "%s: %s: %s", what, #call, cublasGetStatusString(st));                             \
            return -1;                                                                                    \
        }                                                                                                 \
    } while (0)
    LT(cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    int32_t opa = p->ta ? CUBLAS_OP_T : CUBLAS_OP_N, opb = p->tb ? CUBLAS_OP_T : CUBLAS_OP_N;
    LT(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof opa));
    LT(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof opb));
    uint32_t epi = p->bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT; /* also MPS_EPI_PLAIN */
    if (p->epi == MPS_EPI_GELU_AUX)
        epi = p->bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
    else if (p->epi == MPS_EPI_DGELU)
        epi = p->bias ? CUBLASLT_EPILOGUE_DGELU_BGRAD : CUBLASLT_EPILOGUE_DGELU;
    if (epi != CUBLASLT_EPILOGUE_DEFAULT)
        LT(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi));
    if (p->bias) { /* the bias (or the bias gradient of DGELU_BGRAD): fp32, or bf16 where asked */
        int32_t bt = p->bias_bf16 ? CUDA_R_16BF : CUDA_R_32F;
        LT(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof bt));
    }
    if (p->epi == MPS_EPI_GELU_AUX || p->epi == MPS_EPI_DGELU) { /* aux: the GELU input, bf16 like D, (m x n) */
        int64_t ldaux = p->ldaux;
        LT(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &ldaux, sizeof ldaux));
    }
    /* stored shapes, column-major: A is (k x m) when transposed, B is (n x k) when transposed */
    LT(cublasLtMatrixLayoutCreate(&p->la, CUDA_R_16BF, p->ta ? p->k : p->m, p->ta ? p->m : p->k, p->lda));
    LT(cublasLtMatrixLayoutCreate(&p->lb, CUDA_R_16BF, p->tb ? p->n : p->k, p->tb ? p->k : p->n, p->ldb));
    LT(cublasLtMatrixLayoutCreate(&p->ld, p->d_bf16 ? CUDA_R_16BF : CUDA_R_32F, p->m, p->n, p->ldd));
    cublasLtMatmulPreference_t pref;
    LT(cublasLtMatmulPreferenceCreate(&pref));
    uint64_t ws = MPS_CUDA_WORKSPACE;
    uint32_t a_a = p->align_a, a_b = p->align_b, a_d = p->align_d;
    cublasLtMatmulHeuristicResult_t res[MPS_GEMM_CANDIDATES];
    memset(res, 0, sizeof res);
    int count = 0;
    st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
    if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &a_a, sizeof a_a);
    if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &a_b, sizeof a_b);
    if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &a_d, sizeof a_d);
    if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &a_d, sizeof a_d);
    if (st != CUBLAS_STATUS_SUCCESS) {
        cublasLtMatmulPreferenceDestroy(pref);
        cu_fail(c, "%s: cublasLtMatmulPreferenceSetAttribute: %s", what, cublasGetStatusString(st));
        return -1;
    }
    st = cublasLtMatmulAlgoGetHeuristic(c->lt, p->desc, p->la, p->lb, p->ld, p->ld, pref,
                                        c->gemm_tune ? MPS_GEMM_CANDIDATES : 1, res, &count);
    cublasLtMatmulPreferenceDestroy(pref);
    p->ok = st == CUBLAS_STATUS_SUCCESS && count > 0 && res[0].state == CUBLAS_STATUS_SUCCESS;
    if (p->ok)
        p->algo = res[0].algo;
    p->ncand = 0;
    for (int i = 0; p->ok && i < count; i++)
        if (res[i].state == CUBLAS_STATUS_SUCCESS)
            p->cand[p->ncand++] = res[i].algo;
    p->tuned = p->ncand <= 1;
    if (c->verbose)
        fprintf(stderr, "cuda: gemm plan %s: m %d n %d k %d %s%s%s D %s%s: %s\n", what, p->m, p->n, p->k,
                p->ta ? "T" : "N", p->tb ? "T" : "N",
                p->epi == MPS_EPI_GELU_AUX ? " gelu_aux" : p->epi == MPS_EPI_DGELU ? " dgelu" : "",
                p->d_bf16 ? "bf16" : "fp32", !p->bias ? "" : p->bias_bf16 ? ", bf16 bias" : ", fp32 bias",
                p->ok ? "cuBLASLt" : "no cuBLASLt algorithm");
#undef LT
    return 0;
}

/* the cached plan of this shape, built on first use (the oldest is replaced when the cache is full) */
static mps_gemm_plan *plan_get(mps_cuda *c, const mps_gemm_plan *key, const char *what)
{
    int used = c->nplans < MPS_CUDA_MAX_PLANS ? c->nplans : MPS_CUDA_MAX_PLANS;
    for (int i = 0; i < used; i++) {
        mps_gemm_plan *p = &c->plans[i];
        if (p->ta == key->ta && p->tb == key->tb && p->m == key->m && p->n == key->n && p->k == key->k &&
            p->lda == key->lda && p->ldb == key->ldb && p->ldd == key->ldd && p->bias == key->bias &&
            p->epi == key->epi && p->d_bf16 == key->d_bf16 && p->ldaux == key->ldaux && p->bias_bf16 == key->bias_bf16 &&
            p->align_a == key->align_a && p->align_b == key->align_b && p->align_d == key->align_d)
            return p;
    }
    mps_gemm_plan *p = &c->plans[c->nplans % MPS_CUDA_MAX_PLANS];
    if (c->nplans >= MPS_CUDA_MAX_PLANS)
        plan_release(p);
    *p = *key;
    p->desc = NULL;
    p->la = p->lb = p->ld = NULL;
    if (plan_build(c, p, what) != 0) {
        plan_release(p);
        return NULL;
    }
    c->nplans++;
    if (c->nplans >= 2 * MPS_CUDA_MAX_PLANS)  // keep the counter bounded, same slot sequence
        c->nplans -= MPS_CUDA_MAX_PLANS;
    return p;
}

/* The product of the plan `key` (shape, types, epilogue; alignments filled in here) through
 * cuBLASLt: 1 when it ran, 0 when cuBLASLt has no algorithm for it (the plan remembers that; the
 * caller takes another way), -1 on an error (recorded). */
static int lt_matmul(mps_cuda *c, const char *what, mps_gemm_plan *key, const __nv_bfloat16 *A,
                     const __nv_bfloat16 *B, float beta, const void *Cm, void *D, const void *bias, const void *aux)
{
    const float alpha = 1.0f;
    if (!Cm)
        Cm = D;
    key->bias = bias != NULL;
    key->align_a = ptr_align(A);
    key->align_b = ptr_align(B);
    unsigned ad = ptr_align(D);
    if (ptr_align(Cm) < ad)
        ad = ptr_align(Cm);
    if (aux && ptr_align(aux) < ad)
        ad = ptr_align(aux);
    key->align_d = ad;
    mps_gemm_plan *p = plan_get(c, key, what);
    if (!p)
        return -1;
    if (!p->ok)
        return 0;
    if (!p->tuned)
        cu_plan_tune(c, p, what, A, B, beta, Cm, D, bias, aux);
    cublasStatus_t st = CUBLAS_STATUS_SUCCESS;
    if (bias)
        st = cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias);
    if (st == CUBLAS_STATUS_SUCCESS && aux)
        st = cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux, sizeof aux);
    if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatmul(c->lt, p->desc, &alpha, A, p->la, B, p->lb, &beta, Cm, p->ld, D, p->ld, &p->algo,
                            c->workspace, MPS_CUDA_WORKSPACE, c->stream);
    if (st == CUBLAS_STATUS_SUCCESS)
        return 1;
    if (st == CUBLAS_STATUS_NOT_SUPPORTED || st == CUBLAS_STATUS_INVALID_VALUE) {
        p->ok = 0; /* another way from now on */
        return 0;
    }
    cu_fail(c, "%s: cublasLtMatmul (m %d n %d k %d): %s", what, key->m, key->n, key->k, cublasGetStatusString(st));
    return -1;
}

static mps_gemm_plan plan_key(int ta, int tb, int m, int n, int k, int lda, int ldb, int ldd)
{
    mps_gemm_plan key;
    memset(&key, 0, sizeof key);
    key.ta = ta, key.tb = tb, key.m = m, key.n = n, key.k = k;
    key.lda = lda, key.ldb = ldb, key.ldd = ldd;
    return key;
}

/* A product with a bf16 D (MPS_EPI_PLAIN: D = AB (+ bias); MPS_EPI_GELU_AUX: D = gelu(AB + bias),
 * aux = AB + bias; MPS_EPI_DGELU: D = AB * gelu'(aux), bias (fp32) = its row sums), through
 * cuBLASLt only: as lt_matmul. */
static int gemm_bf16(mps_cuda *c, const char *what, int epi, int ta, int tb, int m, int n, int k,
                     const __nv_bfloat16 *A, int lda, const __nv_bfloat16 *B, int ldb, act_t *D, int ldd,
                     const void *bias, const act_t *aux, int ldaux, int bias_bf16 = 0)
{
    mps_gemm_plan key = plan_key(ta, tb, m, n, k, lda, ldb, ldd);
    key.epi = epi, key.d_bf16 = 1, key.ldaux = ldaux, key.bias_bf16 = bias_bf16;
    return lt_matmul(c, what, &key, A, B, 0.0f, NULL, D, bias, aux);
}

/* D (m x n, column-major, ldd) = op(A) op(B) + beta Cm (+ bias (m) broadcast over columns); Cm
 * (laid out as D) is D itself when NULL. A, B bf16 scratch; Cm, D, bias fp32. cublasGemmEx (on a
 * copy of Cm in D) where cuBLASLt has no algorithm. */
static void gemm(mps_cuda *c, const char *what, int ta, int tb, int m, int n, int k, const __nv_bfloat16 *A, int lda,
                 const __nv_bfloat16 *B, int ldb, float beta, const float *Cm, float *D, int ldd, const float *bias)
{
    mps_gemm_plan key = plan_key(ta, tb, m, n, k, lda, ldb, ldd);
    int r = lt_matmul(c, what, &key, A, B, beta, Cm, D, bias, NULL);
    if (r != 0)
        return;
    if (Cm && Cm != D && beta != 0.0f &&
        cu_check(c, cudaMemcpy2DAsync(D, (size_t)ldd * sizeof(float), Cm, (size_t)ldd * sizeof(float),
                                      (size_t)m * sizeof(float), (size_t)n, cudaMemcpyDeviceToDevice, c->stream),
                 what) != 0)
        return;
    const float alpha = 1.0f;
    cublasStatus_t st = cublasGemmEx(c->blas, ta ? CUBLAS_OP_T : CUBLAS_OP_N, tb ? CUBLAS_OP_T : CUBLAS_OP_N, m, n, k,
                                     &alpha, A, CUDA_R_16BF, lda, B, CUDA_R_16BF, ldb, &beta, D, CUDA_R_32F, ldd,
                                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (st != CUBLAS_STATUS_SUCCESS) {
        cu_fail(c, "%s: cublasGemmEx (m %d n %d k %d): %s", what, m, n, k, cublasGetStatusString(st));
        return;
    }
    if (bias)  // D^T is the row-major (n, m) output
        cu_add_bias_rows(c, D, bias, n, m);
}

static int dims_ok(mps_cuda *c, const char *what, int64_t N, int C, int OC)
{
    if (N > INT_MAX || (int64_t)N * C > ((int64_t)1 << 40) || (int64_t)N * OC > ((int64_t)1 << 40)) {
        cu_fail(c, "%s: N = %lld too large", what, (long long)N);
        return 0;
    }
    return 1;
}

/* out (N, OC) = inp @ w^T + bias + resid: the residual is the product's C matrix (beta 1), the
 * bias its epilogue, so the residual add costs one read of resid inside the product's pass. */
void cu_matmul_fwd(void *ctx, float *out, const void *inp, const float *w, const float *bias, const float *resid,
                   int64_t N, int C, int OC)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (N <= 0 || OC <= 0 || !dims_ok(c, "matmul_fwd", N, C, OC))
        return;
    if (C <= 0) {  // empty product: out = resid (or 0) + bias
        if (resid)
            cu_check(c, cudaMemcpyAsync(out, resid, (size_t)N * OC * sizeof(float), cudaMemcpyDeviceToDevice, c->stream),
                     "matmul_fwd");
        else
            cu_check(c, cudaMemsetAsync(out, 0, (size_t)N * OC * sizeof(float), c->stream), "matmul_fwd");
        if (bias)
            cu_add_bias_rows(c, out, bias, N, OC);
        return;
    }
    const __nv_bfloat16 *wb = param_bf16(c, SCR_BF_B, w, (int64_t)OC * C, "matmul_fwd (w to bf16)");
    const act_t *ib = (const act_t *)inp;
    if (!wb)
        return;
    const int epi = bias && cu_aligned16(bias);
    gemm(c, "matmul_fwd", 1, 0, OC, (int)N, C, wb, C, ib, C, resid ? 1.0f : 0.0f, resid, out, OC, epi ? bias : NULL);
    if (bias && !epi)
        cu_add_bias_rows(c, out, bias, N, OC);
}

void cu_matmul_bwd(void *ctx, void *dinp, int dinp_act, float *dw, int dw_set, float *dbias, const void *dout,
                   int dout_act, const void *inp, const float *w, int64_t N, int C, int OC)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (N <= 0 || OC <= 0 || C <= 0 || !dims_ok(c, "matmul_bwd", N, C, OC))
        return;
    if (dbias) {
        if (dout_act)
            cu_colsum_acc_act(c, dbias, (const act_t *)dout, N, OC, "matmul_bwd (dbias)");
        else
            cu_colsum_acc(c, dbias, (const float *)dout, N, OC, "matmul_bwd (dbias)");
    }
    if (!dinp && !dw)
        return;
    const __nv_bfloat16 *gb = dout_act ? (const act_t *)dout
                                       : to_bf16(c, SCR_BF_C, (const float *)dout, N * OC, "matmul_bwd (dout to bf16)");
    if (!gb)
        return;
    if (dinp) {
        const __nv_bfloat16 *wb = param_bf16(c, SCR_BF_B, w, (int64_t)OC * C, "matmul_bwd (w to bf16)");
        if (!wb)
            return;
        if (dinp_act != MPS_DINP_ACT) { /* fp32: overwritten, or added to (beta 1) */
            gemm(c, "matmul_bwd (dinp)", 0, 0, C, (int)N, OC, wb, C, gb, OC, dinp_act == MPS_DINP_ADD ? 1.0f : 0.0f,
                 NULL, (float *)dinp, C, NULL);
        } else {
            /* a bf16 D wants a leading dimension that is a multiple of 8 */
            const int r = C % 8 == 0 ? gemm_bf16(c, "matmul_bwd (dinp, bf16)", MPS_EPI_PLAIN, 0, 0, C, (int)N, OC, wb,
                                                 C, gb, OC, (act_t *)dinp, C, NULL, NULL, 0)
                                     : 0;
            if (r < 0)
                return;
            if (r == 0) { /* fp32 into scratch, then rounded into the operand buffer */
                float *x = (float *)cu_scratch(c, SCR_MLP, (size_t)N * C * sizeof(float)); // (N, C)
                if (!x)
                    return;
                gemm(c, "matmul_bwd (dinp)", 0, 0, C, (int)N, OC, wb, C, gb, OC, 0.0f, NULL, x, C, NULL);
                cu_to_act(c, (act_t *)dinp, x, N * C, "matmul_bwd (dinp to operand)");
            }
        }
    }
    if (dw) {
        const act_t *ib = (const act_t *)inp;
        gemm(c, "matmul_bwd (dw)", 0, 1, C, OC, (int)N, ib, C, gb, OC, dw_set ? 0.0f : 1.0f, NULL, dw, C, NULL);
    }
}

/* the fp32 product inp @ w^T + bias (N, OC) in scratch: the last way of the bf16-output entries */
static const float *product_fp32(mps_cuda *c, const void *inp, const float *w, const float *bias, int64_t N, int C,
                                 int OC)
{
    float *x = (float *)cu_scratch(c, SCR_MLP, (size_t)N * OC * sizeof(float)); // (N, OC)
    if (x)
        cu_matmul_fwd(c, x, inp, w, bias, NULL, N, C, OC);
    return x;
}

/* out (N, OC) bf16 = inp @ wb^T + bias through cuBLASLt: with the bias epilogue on bb, the bias's
 * bf16 copy (cuBLASLt takes no fp32 bias with a bf16 D on an H100), else the product and then a
 * kernel that adds the fp32 bias (bias and bb both NULL: no bias). As lt_matmul: 1 when it ran, 0
 * when cuBLASLt offers neither (the caller takes another way), -1 on an error. */
static int bf16_product_biased(mps_cuda *c, const char *what, act_t *out, const act_t *inp, const act_t *wb,
                               const act_t *bb, const float *bias, int64_t N, int C, int OC)
{
    int r = bb ? gemm_bf16(c, what, MPS_EPI_PLAIN, 1, 0, OC, (int)N, C, wb, C, inp, C, out, OC, bb, NULL, 0, 1) : 0;
    if (r == 0) {
        r = gemm_bf16(c, what, MPS_EPI_PLAIN, 1, 0, OC, (int)N, C, wb, C, inp, C, out, OC, NULL, NULL, 0);
        if (r == 1 && bias)
            cu_add_bias_act(c, out, bias, N, OC);
    }
    return r;
}

/* out (N, OC) = inp @ w^T + bias as bf16 (the head's logits, qkv), the first way cuBLASLt offers:
 * a bf16 product with the bias epilogue on a bf16 copy of the bias (cuBLASLt takes no fp32 bias
 * with a bf16 D on an H100); the bf16 product, then a kernel adds the bias; the product into fp32
 * scratch and a conversion. */
void cu_matmul_fwd_act(void *ctx, void *out, const void *inp, const float *w, const float *bias, int64_t N, int C,
                       int OC)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (N <= 0 || OC <= 0 || !dims_ok(c, "matmul_fwd_act", N, C, OC))
        return;
    if (C > 0 && OC % 8 == 0 && (!bias || cu_aligned16(bias))) {
        const __nv_bfloat16 *wb = param_bf16(c, SCR_BF_B, w, (int64_t)OC * C, "matmul_fwd_act (w to bf16)");
        const __nv_bfloat16 *bb = bias && wb ? param_bf16(c, SCR_BIAS16, bias, OC, "matmul_fwd_act (bias to bf16)") : NULL;
        if (!wb || (bias && !bb))
            return;
        if (bf16_product_biased(c, "matmul_fwd_act", (act_t *)out, (const act_t *)inp, wb, bb, bias, N, C, OC) != 0)
            return;
    }
    const float *x = product_fp32(c, inp, w, bias, N, C, OC);
    if (x)
        cu_to_act(c, (act_t *)out, x, N * OC, "matmul_fwd_act (to operand)");
}

/* ---------------------------------------------------------------- stacked products */

/* the stacked weight (sum oc, C) of parts w[i] (oc[i], C) in bf16: the AdamW copies where they
 * lie side by side (cu_wcopy_stacked), else each part rounded into its rows of a scratch slot */
static const act_t *stacked_bf16(mps_cuda *c, const float *const *w, const int *oc, int nparts, int64_t W, int C,
                                 const char *what)
{
    const act_t *h = cu_wcopy_stacked(c, w, oc, nparts, C);
    if (h)
        return h;
    act_t *dst = (act_t *)cu_scratch(c, SCR_BF_B, (size_t)W * C * sizeof(act_t));
    if (!dst)
        return NULL;
    int64_t off = 0;
    for (int i = 0; i < nparts; off += (int64_t)oc[i] * C, i++)
        if (round_bf16(c, dst + off, w[i], (int64_t)oc[i] * C, what) != 0)
            return NULL;
    return dst;
}

/* the parts' biases side by side (W) in fp32 scratch, zeros for a part without one */
static const float *stacked_bias(mps_cuda *c, const float *const *bias, const int *oc, int nparts, int64_t W,
                                 const char *what)
{
    float *b = (float *)cu_scratch(c, SCR_STACK_BIAS, (size_t)W * sizeof(float));
    int64_t off = 0;
    for (int i = 0; b && i < nparts; off += oc[i], i++) {
        const size_t bytes = (size_t)oc[i] * sizeof(float);
        const cudaError_t e = bias[i] ? cudaMemcpyAsync(b + off, bias[i], bytes, cudaMemcpyDeviceToDevice, c->stream)
                                      : cudaMemsetAsync(b + off, 0, bytes, c->stream);
        if (cu_check(c, e, what) != 0)
            return NULL;
    }
    return b;
}

/* 1 when nparts parts of W columns in all fit the entries (else an error is recorded) */
static int parts_ok(mps_cuda *c, const char *what, int nparts, int64_t W, int64_t N, int C)
{
    if (nparts > MPS_MAX_PARTS || W > INT_MAX) {
        cu_fail(c, "%s: %d parts of %lld columns in all", what, nparts, (long long)W);
        return 0;
    }
    return dims_ok(c, what, N, C, (int)W);
}

/* whether any of the n pointers is set (the parts' biases or bias gradients) */
static int any_set(const void *const *p, int n)
{
    for (int i = 0; i < n; i++)
        if (p[i])
            return 1;
    return 0;
}

/* out (N, W) = inp @ [w_0; w_1; ...]^T + the stacked bias: one product over the stacked weight (as
 * cu_matmul_fwd_act: the bias in the epilogue on its bf16 copy, else a kernel after), or, where
 * cuBLASLt takes no bf16 output of this width, each part into scratch and then into its columns */
void cu_matmul_parts_fwd_act(void *ctx, void *out, const void *inp, const float *const *w, const float *const *bias,
                             const int *oc, int nparts, int64_t N, int C)
{
    mps_cuda *c = (mps_cuda *)ctx;
    const char *what = "matmul_parts_fwd_act";
    const int64_t W = mps_parts_width(oc, nparts);
    if (N <= 0 || W <= 0 || !parts_ok(c, what, nparts, W, N, C))
        return;
    const int biased = any_set((const void *const *)bias, nparts);
    if (C > 0 && W % 8 == 0) {
        const act_t *wb = stacked_bf16(c, w, oc, nparts, W, C, what);
        const float *bs = wb && biased ? stacked_bias(c, bias, oc, nparts, W, what) : NULL;
        const act_t *bb = bs ? to_bf16(c, SCR_BIAS16, bs, W, what) : NULL;
        if (!wb || (biased && !bb))
            return;
        if (bf16_product_biased(c, what, (act_t *)out, (const act_t *)inp, wb, bb, bs, N, C, (int)W) != 0)
            return;
    }
    int64_t off = 0;
    for (int i = 0; i < nparts; off += oc[i], i++) {
        act_t *part = (act_t *)cu_scratch(c, SCR_PART_OUT, (size_t)N * oc[i] * sizeof(act_t)); // (N, oc)
        if (!part)
            return;
        cu_matmul_fwd_act(ctx, part, inp, w[i], bias[i], N, C, oc[i]);
        if (cu_check(c, cudaMemcpy2DAsync((act_t *)out + off, (size_t)W * sizeof(act_t), part,
                                          (size_t)oc[i] * sizeof(act_t), (size_t)oc[i] * sizeof(act_t), (size_t)N,
                                          cudaMemcpyDeviceToDevice, c->stream),
                     what) != 0)
            return;
    }
}

/* dinp = dout @ [w_0; w_1; ...] in one product over the stacked weight (K = W: the parts' input
 * gradients summed inside it, no read-modify-write of dinp per part); each dw[i] from its columns
 * of dout (a row stride of W); the bias gradients from one column sum of dout */
void cu_matmul_parts_bwd(void *ctx, void *dinp, int dinp_act, float *const *dw, int dw_set, float *const *dbias,
                         const void *dout, const void *inp, const float *const *w, const int *oc, int nparts, int64_t N,
                         int C)
{
    mps_cuda *c = (mps_cuda *)ctx;
    const char *what = "matmul_parts_bwd";
    const int64_t W = mps_parts_width(oc, nparts);
    if (N <= 0 || W <= 0 || C <= 0 || !parts_ok(c, what, nparts, W, N, C))
        return;
    const act_t *g = (const act_t *)dout;
    const int biased = any_set((const void *const *)dbias, nparts);
    if (biased) {
        float *cs = (float *)cu_scratch(c, SCR_STACK_BIAS, (size_t)W * sizeof(float)); // (W)
        if (!cs || cu_check(c, cudaMemsetAsync(cs, 0, (size_t)W * sizeof(float), c->stream), what) != 0)
            return;
        cu_colsum_acc_act(c, cs, g, N, (int)W, "matmul_parts_bwd (dbias)");
        int64_t off = 0;
        for (int i = 0; i < nparts; off += oc[i], i++)
            if (dbias[i])
                cu_accumulate(ctx, dbias[i], cs + off, oc[i]);
    }
    if (dinp) {
        const act_t *wb = stacked_bf16(c, w, oc, nparts, W, C, what);
        if (!wb)
            return;
        /* an operand dinp straight from the product (a bf16 D wants ldd % 8 == 0), else through fp32 */
        const int r = dinp_act == MPS_DINP_ACT && C % 8 == 0
                          ? gemm_bf16(c, "matmul_parts_bwd (dinp, bf16)", MPS_EPI_PLAIN, 0, 0, C, (int)N, (int)W, wb, C,
                                      g, (int)W, (act_t *)dinp, C, NULL, NULL, 0)
                          : 0;
        if (r < 0)
            return;
        if (r == 0) {
            float *x = dinp_act == MPS_DINP_ACT ? (float *)cu_scratch(c, SCR_MLP, (size_t)N * C * sizeof(float))
                                                : (float *)dinp; // (N, C)
            if (!x)
                return;
            gemm(c, "matmul_parts_bwd (dinp)", 0, 0, C, (int)N, (int)W, wb, C, g, (int)W, 0.0f, NULL, x, C, NULL);
            if (dinp_act == MPS_DINP_ACT && cu_to_act(c, (act_t *)dinp, x, N * C, "matmul_parts_bwd (dinp to operand)"))
                return;
        }
    }
    const act_t *ib = (const act_t *)inp;
    int64_t off = 0;
    for (int i = 0; i < nparts; off += oc[i], i++)
        if (dw[i])
            gemm(c, "matmul_parts_bwd (dw)", 0, 1, C, oc[i], (int)N, ib, C, g + off, (int)W, dw_set ? 0.0f : 1.0f,
                 NULL, dw[i], C, NULL);
}

/* pre (N, OC) = inp @ w^T + bias, out = gelu(pre), the first way that cuBLASLt offers: (1) one
 * product with the GELU_AUX_BIAS epilogue (out is D, pre the aux output); (2) the product written
 * as bf16 pre with the bias epilogue, then a kernel writes out = gelu(pre); (2b) the same without
 * the epilogue, the kernel adding the bias; (3) the product into fp32 scratch, then a kernel writes
 * pre and out. cuBLASLt (CUDA 13.0, H100/H200, 2026-11-25) takes a bf16 D only with a bf16 bias, and
 * offered no GELU_AUX algorithm with an fp32 one (llm.c found bf16 GELU epilogues slow:
 * karpathy/llm.c#338). */
void cu_matmul_gelu_fwd(void *ctx, void *out, void *pre, const void *inp, const float *w, const float *bias, int64_t N,
                        int C, int OC)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (N <= 0 || OC <= 0 || !dims_ok(c, "matmul_gelu_fwd", N, C, OC))
        return;
    const __nv_bfloat16 *wb = C > 0 ? param_bf16(c, SCR_BF_B, w, (int64_t)OC * C, "matmul_gelu_fwd (w to bf16)") : NULL;
    if (C > 0 && !wb)
        return;
    /* the epilogues want a 16-byte aligned bias and leading dimensions that are multiples of 8 */
    if (C > 0 && OC % 8 == 0 && (!bias || cu_aligned16(bias))) {
        /* cuBLASLt takes a bf16 D only with a bf16 bias (a copy of ours) */
        const __nv_bfloat16 *bb = bias ? param_bf16(c, SCR_BIAS16, bias, OC, "matmul_gelu_fwd (bias to bf16)") : NULL;
        if (bias && !bb)
            return;
        const act_t *a = (const act_t *)inp;
        int r = gemm_bf16(c, "matmul_gelu_fwd", MPS_EPI_GELU_AUX, 1, 0, OC, (int)N, C, wb, C, a, C, (act_t *)out, OC,
                          bb, (const act_t *)pre, OC, 1);
        if (r == 0 && gemm_bf16(c, "matmul_gelu_fwd (pre)", MPS_EPI_PLAIN, 1, 0, OC, (int)N, C, wb, C, a, C,
                                (act_t *)pre, OC, bb, NULL, 0, 1) == 1) {
            cu_gelu_act(c, (act_t *)out, (const act_t *)pre, N * OC);
            return;
        }
        if (r == 0 && gemm_bf16(c, "matmul_gelu_fwd (pre, no bias)", MPS_EPI_PLAIN, 1, 0, OC, (int)N, C, wb, C, a, C,
                                (act_t *)pre, OC, NULL, NULL, 0) == 1) {
            cu_gelu_bias_act(c, (act_t *)out, (act_t *)pre, bias, N, OC);
            return;
        }
        if (r != 0)
            return;
    }
    const float *x = product_fp32(c, inp, w, bias, N, C, OC);
    if (x)
        cu_gelu_split(c, (act_t *)out, (act_t *)pre, x, N * OC);
}

/* dpre (N, C) = (dout (N, OC) @ w (OC, C)) * gelu'(pre), dbias += its column sums, the first way
 * that cuBLASLt offers: (1) one product with the DGELU_BGRAD epilogue (the bias gradient lands in
 * scratch, then is added); (2) the DGELU epilogue, then a column sum of dpre; (3) the product
 * written as bf16 into dpre, a kernel applies gelu' in place, a column sum; (4) the product into
 * fp32 scratch, a kernel, a column sum. CUDA 13.0 on an H200 has no DGELU_BGRAD algorithm with an
 * fp32 bias gradient; with a bf16 one it has, but runs the reduction as a separate epilogue kernel:
 * 0.83 ms a call at B=32 against 0.30 ms for (2) plus 0.05 ms for its column sum (measured
 * 2026-11-26), so it is not tried. */
void cu_matmul_dgelu_bwd(void *ctx, void *dpre, float *dbias, const void *dout, int dout_act, const float *w,
                         const void *pre, int64_t N, int C, int OC)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (N <= 0 || C <= 0 || OC <= 0 || !dims_ok(c, "matmul_dgelu_bwd", N, C, OC))
        return;
    const __nv_bfloat16 *gb = dout_act ? (const act_t *)dout
                                       : to_bf16(c, SCR_BF_C, (const float *)dout, N * OC, "matmul_dgelu_bwd (dout to bf16)");
    const __nv_bfloat16 *wb = gb ? param_bf16(c, SCR_BF_B, w, (int64_t)OC * C, "matmul_dgelu_bwd (w to bf16)") : NULL;
    if (!wb)
        return;
    float *bg = dbias ? (float *)cu_scratch(c, SCR_BGRAD, (size_t)C * sizeof(float)) : NULL;
    if (dbias && !bg)
        return;
    if (C % 8 == 0) {
        /* dpre^T (C x N) = w^T (C x OC) @ dout^T (OC x N), as the dinp product of cu_matmul_bwd */
        int r = gemm_bf16(c, "matmul_dgelu_bwd", MPS_EPI_DGELU, 0, 0, C, (int)N, OC, wb, C, gb, OC, (act_t *)dpre, C,
                          bg, (const act_t *)pre, C);
        if (r == 1) {
            if (dbias)
                cu_accumulate(ctx, dbias, bg, C);
            return;
        }
        if (r == 0 && dbias) { /* the epilogue without the bias gradient, then a column sum */
            r = gemm_bf16(c, "matmul_dgelu_bwd (no bgrad)", MPS_EPI_DGELU, 0, 0, C, (int)N, OC, wb, C, gb, OC,
                          (act_t *)dpre, C, NULL, (const act_t *)pre, C);
            if (r == 1) {
                cu_colsum_acc_act(c, dbias, (const act_t *)dpre, N, C, "matmul_dgelu_bwd (dbias)");
                return;
            }
        }
        if (r == 0)
            r = gemm_bf16(c, "matmul_dgelu_bwd (product)", MPS_EPI_PLAIN, 0, 0, C, (int)N, OC, wb, C, gb, OC,
                          (act_t *)dpre, C, NULL, NULL, 0) == 1 ? 2 : 0;
        if (r == 2) {
            cu_dgelu_inplace(c, (act_t *)dpre, (const act_t *)pre, N * C);
            if (dbias)
                cu_colsum_acc_act(c, dbias, (const act_t *)dpre, N, C, "matmul_dgelu_bwd (dbias)");
        }
        if (r != 0)
            return;
    }
    float *x = (float *)cu_scratch(c, SCR_MLP, (size_t)N * C * sizeof(float)); // (N, C)
    if (!x)
        return;
    gemm(c, "matmul_dgelu_bwd", 0, 0, C, (int)N, OC, wb, C, gb, OC, 0.0f, NULL, x, C, NULL);
    cu_dgelu_apply(c, (act_t *)dpre, x, (const act_t *)pre, N * C);
    if (dbias)
        cu_colsum_acc_act(c, dbias, (const act_t *)dpre, N, C, "matmul_dgelu_bwd (dbias)");
}
