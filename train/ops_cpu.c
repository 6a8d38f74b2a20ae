/* CPU kernels of the GPT-2 trainer (see ops_cpu.h), fp32 with OpenMP; attention is in ops_cpu_attn.c.
 *
 * Determinism: every output element is produced by exactly one thread, and each element's sum runs
 * in a fixed order that depends on neither the schedule nor the thread count (reductions over rows,
 * such as dw of LayerNorm or the embedding gradient, are split over columns, each column summed in
 * row order). So results are bit-identical across runs and across OMP_NUM_THREADS. */
#include "ops_cpu.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Loops over fewer elements than this (products: fewer than 8x as many multiply-adds) run on the
 * calling thread: a parallel region would cost more than the work. */
#define OPS_PAR_MIN 32768
/* Columns per task in the column-split reductions (16 floats: one cache line per row). */
#define OPS_COL_BLOCK 16

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* ---------------------------------------------------------------- embeddings */

void op_embed_fwd(float *out, const int32_t *tokens, int64_t N, const float *wte, int64_t v0, int64_t Vl, int C)
{
#pragma omp parallel for schedule(static) if (N * C >= OPS_PAR_MIN)
    for (int64_t n = 0; n < N; n++) {
        int64_t tok = tokens[n];
        float *o = out + n * C;  // (C)
        if (tok >= v0 && tok < v0 + Vl)
            memcpy(o, wte + (tok - v0) * C, sizeof(float) * (size_t)C);
        else
            memset(o, 0, sizeof(float) * (size_t)C);
    }
}

void op_embed_bwd(float *dwte, const float *dout, const int32_t *tokens, int64_t N, int64_t v0, int64_t Vl, int C)
{
    if (!dwte) return;
    /* A token can repeat, so rows of dwte get several contributions: split over columns, each
     * task walks all N rows in order (deterministic without atomics). */
    int64_t nblk = (C + OPS_COL_BLOCK - 1) / OPS_COL_BLOCK;
#pragma omp parallel for schedule(static) if (N * C >= OPS_PAR_MIN)
    for (int64_t cb = 0; cb < nblk; cb++) {
        int64_t c0 = cb * OPS_COL_BLOCK, c1 = min64(C, c0 + OPS_COL_BLOCK);
        for (int64_t n = 0; n < N; n++) {
            int64_t tok = tokens[n];
            if (tok < v0 || tok >= v0 + Vl) continue;
            float *d = dwte + (tok - v0) * C;
            const float *g = dout + n * C;
            for (int64_t c = c0; c < c1; c++) d[c] += g[c];
        }
    }
}

void op_pos_fwd(float *x, const float *wpe, int B, int T, int C)
{
#pragma omp parallel for schedule(static) if ((int64_t)B * T * C >= OPS_PAR_MIN)
    for (int64_t bt = 0; bt < (int64_t)B * T; bt++) {
        float *xr = x + bt * C;                 // (C)
        const float *p = wpe + (bt % T) * C;    // (C)
        for (int c = 0; c < C; c++) xr[c] += p[c];
    }
}

void op_pos_bwd(float *dwpe, const float *dx, int B, int T, int C)
{
    if (!dwpe) return;
    /* each thread owns rows t of dwpe and sums over b in order */
#pragma omp parallel for schedule(static) if ((int64_t)B * T * C >= OPS_PAR_MIN)
    for (int t = 0; t < T; t++) {
        float *d = dwpe + (int64_t)t * C;
        for (int b = 0; b < B; b++) {
            const float *g = dx + ((int64_t)b * T + t) * C;
            for (int c = 0; c < C; c++) d[c] += g[c];
        }
    }
}

/* ---------------------------------------------------------------- layernorm */

void op_layernorm_fwd(float *out, float *mean, float *rstd, const float *inp, const float *w, const float *b,
                      int64_t N, int C)
{
#pragma omp parallel for schedule(static) if (N * C >= OPS_PAR_MIN)
    for (int64_t n = 0; n < N; n++) {
        const float *x = inp + n * C;  // (C)
        float *o = out + n * C;
        /* statistics in double: cheap here (memory bound) and exact enough for any C */
        double s = 0;
        for (int c = 0; c < C; c++) s += x[c];
        double mu = s / C, ss = 0;
        for (int c = 0; c < C; c++) {
            double d = x[c] - mu;
            ss += d * d;
        }
        float m = (float)mu;
        float r = (float)(1.0 / sqrt(ss / C + 1e-5));  // biased variance, as torch
        for (int c = 0; c < C; c++) o[c] = (x[c] - m) * r * w[c] + b[c];
        if (mean) mean[n] = m;
        if (rstd) rstd[n] = r;
    }
}

void op_layernorm_bwd(float *dinp, float *dw, float *db, const float *dout, const float *inp, const float *w,
                      const float *mean, const float *rstd, int64_t N, int C)
{
    if (dinp) {
        /* dinp = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dout * w, xhat = (x - mean) * rstd */
#pragma omp parallel for schedule(static) if (N * C >= OPS_PAR_MIN)
        for (int64_t n = 0; n < N; n++) {
            const float *x = inp + n * C, *go = dout + n * C;  // (C)
            float *dx = dinp + n * C;
            float m = mean[n], r = rstd[n];
            double sg = 0, sgx = 0;
            for (int c = 0; c < C; c++) {
                float g = go[c] * w[c];
                sg += g;
                sgx += (double)g * ((x[c] - m) * r);
            }
            float mg = (float)(sg / C), mgx = (float)(sgx / C);
            for (int c = 0; c < C; c++) {
                float xhat = (x[c] - m) * r;
                dx[c] += r * (go[c] * w[c] - mg - xhat * mgx);
            }
        }
    }
    if (dw || db) {
        /* sums over rows: split over columns, rows in order */
        int64_t nblk = (C + OPS_COL_BLOCK - 1) / OPS_COL_BLOCK;
#pragma omp parallel for schedule(static) if (N * C >= OPS_PAR_MIN)
        for (int64_t cb = 0; cb < nblk; cb++) {
            int64_t c0 = cb * OPS_COL_BLOCK, c1 = min64(C, c0 + OPS_COL_BLOCK);
            for (int64_t n = 0; n < N; n++) {
                const float *x = inp + n * C, *go = dout + n * C;
                float m = mean[n], r = rstd[n];
                if (dw)
                    for (int64_t c = c0; c < c1; c++) dw[c] += go[c] * ((x[c] - m) * r);
                if (db)
                    for (int64_t c = c0; c < c1; c++) db[c] += go[c];
            }
        }
    }
}

/* ---------------------------------------------------------------- matmul */

/* One GEMM core for the three products: C (M, NC) += A (M, K) @ B (K, NC), where A's element (m, k)
 * is at A[m * sam + k * sak] (so A may be a transposed view), B is row-major with leading
 * dimension ldb, C with ldc. The inner loop runs along contiguous columns of B and C.
 *
 * Each element is computed as c + a_0 b_0 + a_1 b_1 + ... in ascending k, in float, whatever the
 * tile, block or thread: the register tile is loaded from C and stored back between k-blocks,
 * never restarted from 0. So results equal the naive triple loop bit for bit (no FMA contraction:
 * ISO C mode compiles with -ffp-contract=off) and do not depend on the thread count.
 *
 * GCC at -O2 keeps neither a float[4][8] accumulator array in registers nor vectorises it, so the
 * tile uses the GCC/Clang vector extension (4 floats, i.e. SSE on baseline x86-64, NEON on arm64):
 * a 4 x 8 tile is 8 vector registers; about 20 GFLOPS per core against about 2 for plain loops. */
typedef float v4f __attribute__((vector_size(16)));

static inline v4f ld4(const float *p)
{
    v4f v;
    memcpy(&v, p, sizeof v);  // unaligned load
    return v;
}
static inline void st4(float *p, v4f v) { memcpy(p, &v, sizeof v); }

#define MM_MR 4    // rows of a register tile
#define MM_NR 8    // columns of a register tile (2 vectors)
#define MM_KB 256  // k-block: the B strip (MM_KB x MM_NR, 8 KiB) stays in L1 across the row tiles
#define MM_MB 64   // rows per task: the A block (MM_MB x MM_KB, 64 KiB) stays in L2 across columns

/* rows [m0, m0 + MM_MR), columns [j, j + MM_NR), k in [k0, k1) */
static void mm_tile4(float *c, int64_t ldc, const float *a, int64_t sam, int64_t sak, const float *b,
                     int64_t ldb, int64_t k0, int64_t k1)
{
    v4f lo0 = ld4(c), hi0 = ld4(c + 4);
    v4f lo1 = ld4(c + ldc), hi1 = ld4(c + ldc + 4);
    v4f lo2 = ld4(c + 2 * ldc), hi2 = ld4(c + 2 * ldc + 4);
    v4f lo3 = ld4(c + 3 * ldc), hi3 = ld4(c + 3 * ldc + 4);
    for (int64_t k = k0; k < k1; k++) {
        const float *bk = b + k * ldb, *ak = a + k * sak;
        v4f b0 = ld4(bk), b1 = ld4(bk + 4);
        float x0 = ak[0], x1 = ak[sam], x2 = ak[2 * sam], x3 = ak[3 * sam];
        v4f a0 = {x0, x0, x0, x0}, a1 = {x1, x1, x1, x1}, a2 = {x2, x2, x2, x2}, a3 = {x3, x3, x3, x3};
        lo0 += a0 * b0;
        hi0 += a0 * b1;
        lo1 += a1 * b0;
        hi1 += a1 * b1;
        lo2 += a2 * b0;
        hi2 += a2 * b1;
        lo3 += a3 * b0;
        hi3 += a3 * b1;
    }
    st4(c, lo0), st4(c + 4, hi0);
    st4(c + ldc, lo1), st4(c + ldc + 4, hi1);
    st4(c + 2 * ldc, lo2), st4(c + 2 * ldc + 4, hi2);
    st4(c + 3 * ldc, lo3), st4(c + 3 * ldc + 4, hi3);
}

/* one row, columns [j, j + MM_NR) */
static void mm_tile1(float *c, const float *a, int64_t sak, const float *b, int64_t ldb, int64_t k0, int64_t k1)
{
    v4f lo = ld4(c), hi = ld4(c + 4);
    for (int64_t k = k0; k < k1; k++) {
        float x = a[k * sak];
        v4f av = {x, x, x, x};
        lo += av * ld4(b + k * ldb);
        hi += av * ld4(b + k * ldb + 4);
    }
    st4(c, lo), st4(c + 4, hi);
}

/* C rows [m0, m1) (see above) */
static void mm_rows(float *c, int64_t ldc, const float *a, int64_t sam, int64_t sak, const float *b, int64_t ldb,
                    int64_t m0, int64_t m1, int64_t K, int64_t NC)
{
    int64_t jfull = NC - NC % MM_NR;
    for (int64_t k0 = 0; k0 < K; k0 += MM_KB) {
        int64_t k1 = min64(K, k0 + MM_KB);
        for (int64_t j = 0; j < jfull; j += MM_NR) {
            int64_t m = m0;
            for (; m + MM_MR <= m1; m += MM_MR)
                mm_tile4(c + m * ldc + j, ldc, a + m * sam, sam, sak, b + j, ldb, k0, k1);
            for (; m < m1; m++) mm_tile1(c + m * ldc + j, a + m * sam, sak, b + j, ldb, k0, k1);
        }
        if (jfull < NC)  // last NC % 8 columns, scalar; still ascending k per element
            for (int64_t m = m0; m < m1; m++)
                for (int64_t k = k0; k < k1; k++) {
                    float x = a[m * sam + k * sak];
                    const float *bk = b + k * ldb;
                    float *cm = c + m * ldc;
                    for (int64_t j = jfull; j < NC; j++) cm[j] += x * bk[j];
                }
    }
}

/* C (M, NC) += A @ B, tasks of MM_MB rows of C: each thread owns its rows */
static void mm_acc(float *c, int64_t ldc, const float *a, int64_t sam, int64_t sak, const float *b, int64_t ldb,
                   int64_t M, int64_t K, int64_t NC)
{
    int64_t ntask = (M + MM_MB - 1) / MM_MB;
#pragma omp parallel for schedule(static) if (M * K * NC >= 8 * OPS_PAR_MIN)
    for (int64_t t = 0; t < ntask; t++)
        mm_rows(c, ldc, a, sam, sak, b, ldb, t * MM_MB, min64(M, (t + 1) * MM_MB), K, NC);
}

void op_matmul_fwd(float *out, const float *inp, const float *w, const float *bias, int64_t N, int C, int OC)
{
    op_matmul_fwd_ld(out, OC, inp, w, bias, N, C, OC);
}

void op_matmul_fwd_ld(float *out, int64_t ldo, const float *inp, const float *w, const float *bias, int64_t N, int C,
                      int OC)
{
    /* out starts as the bias (or 0) and accumulates inp @ w^T */
#pragma omp parallel for schedule(static) if (N * OC >= OPS_PAR_MIN)
    for (int64_t n = 0; n < N; n++) {
        float *o = out + n * ldo;
        if (bias)
            memcpy(o, bias, sizeof(float) * (size_t)OC);
        else
            memset(o, 0, sizeof(float) * (size_t)OC);
    }
    /* The tile wants B = w^T (C, OC) with contiguous output columns: transpose w once per call
     * (C * OC copies against 2 * N * C * OC flops). */
    float *wt = malloc(sizeof(float) * (size_t)C * (size_t)OC);
    if (wt) {
#pragma omp parallel for schedule(static) if ((int64_t)C * OC >= OPS_PAR_MIN)
        for (int i = 0; i < C; i++)
            for (int o = 0; o < OC; o++) wt[(int64_t)i * OC + o] = w[(int64_t)o * C + i];
        mm_acc(out, ldo, inp, C, 1, wt, OC, N, C, OC);
        free(wt);
        return;
    }
    /* no memory for the transpose: dot products, same per-element order (ascending k) */
#pragma omp parallel for schedule(static) if (N * C * OC >= 8 * OPS_PAR_MIN)
    for (int64_t n = 0; n < N; n++)
        for (int o = 0; o < OC; o++) {
            const float *x = inp + n * C, *wr = w + (int64_t)o * C;
            float acc = out[n * ldo + o];
            for (int i = 0; i < C; i++) acc += x[i] * wr[i];
            out[n * ldo + o] = acc;
        }
}

void op_matmul_bwd(float *dinp, float *dw, float *dbias, const float *dout, const float *inp, const float *w,
                   int64_t N, int C, int OC)
{
    op_matmul_bwd_ld(dinp, dw, dbias, dout, OC, inp, w, N, C, OC);
}

void op_matmul_bwd_ld(float *dinp, float *dw, float *dbias, const float *dout, int64_t ldd, const float *inp,
                      const float *w, int64_t N, int C, int OC)
{
    /* dinp (N, C) += dout (N, OC) @ w (OC, C): tasks over N */
    if (dinp) mm_acc(dinp, C, dout, ldd, 1, w, C, N, OC, C);
    /* dw (OC, C) += dout^T (OC, N) @ inp (N, C): tasks over OC, each sums its rows over N in order */
    if (dw) mm_acc(dw, C, dout, 1, ldd, inp, C, OC, N, C);
    if (dbias) {
        int64_t nblk = (OC + OPS_COL_BLOCK - 1) / OPS_COL_BLOCK;
#pragma omp parallel for schedule(static) if (N * OC >= OPS_PAR_MIN)
        for (int64_t cb = 0; cb < nblk; cb++) {
            int64_t o0 = cb * OPS_COL_BLOCK, o1 = min64(OC, o0 + OPS_COL_BLOCK);
            for (int64_t n = 0; n < N; n++)
                for (int64_t o = o0; o < o1; o++) dbias[o] += dout[n * ldd + o];
        }
    }
}

/* ---------------------------------------------------------------- elementwise */

#define GELU_K 0.7978845608028654f  // sqrt(2 / pi)
#define GELU_A 0.044715f

void op_gelu_fwd(float *out, const float *inp, int64_t n)
{
#pragma omp parallel for schedule(static) if (n >= OPS_PAR_MIN)
    for (int64_t i = 0; i < n; i++) {
        float x = inp[i];
        out[i] = 0.5f * x * (1.0f + tanhf(GELU_K * (x + GELU_A * x * x * x)));
    }
}

static inline float gelu_grad(float x)
{
    float th = tanhf(GELU_K * (x + GELU_A * x * x * x));
    float du = GELU_K * (1.0f + 3.0f * GELU_A * x * x);  // d(tanh argument)/dx
    return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * du;
}

void op_gelu_bwd(float *dinp, const float *inp, const float *dout, int64_t n)
{
#pragma omp parallel for schedule(static) if (n >= OPS_PAR_MIN)
    for (int64_t i = 0; i < n; i++) dinp[i] += gelu_grad(inp[i]) * dout[i];
}

void op_gelu_bwd_inplace(float *d, const float *inp, int64_t n)
{
#pragma omp parallel for schedule(static) if (n >= OPS_PAR_MIN)
    for (int64_t i = 0; i < n; i++) d[i] = gelu_grad(inp[i]) * d[i];
}

void op_add(float *out, const float *a, const float *b, int64_t n)
{
#pragma omp parallel for schedule(static) if (n >= OPS_PAR_MIN)
    for (int64_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

void op_accumulate(float *dst, const float *src, int64_t n)
{
#pragma omp parallel for schedule(static) if (n >= OPS_PAR_MIN)
    for (int64_t i = 0; i < n; i++) dst[i] += src[i];
}

void op_scale(float *x, float s, int64_t n)
{
#pragma omp parallel for schedule(static) if (n >= OPS_PAR_MIN)
    for (int64_t i = 0; i < n; i++) x[i] *= s;
}

/* ---------------------------------------------------------------- cross-entropy */

/* how many of the Vl local ids are real (< V); the rest are padding */
static int64_t xent_nreal(int64_t Vl, int64_t v0, int64_t V)
{
    int64_t r = V - v0;
    return r < 0 ? 0 : (r > Vl ? Vl : r);
}

void op_xent_rowmax(float *rowmax, const float *logits, int64_t N, int64_t Vl, int64_t v0, int64_t V)
{
    int64_t nr = xent_nreal(Vl, v0, V);
#pragma omp parallel for schedule(static) if (N * Vl >= OPS_PAR_MIN)
    for (int64_t i = 0; i < N; i++) {
        const float *l = logits + i * Vl;  // (Vl)
        float m = -INFINITY;
        for (int64_t j = 0; j < nr; j++) m = l[j] > m ? l[j] : m;
        rowmax[i] = m;
    }
}

void op_xent_sumexp(float *sumexp, const float *logits, const float *gmax, int64_t N, int64_t Vl, int64_t v0,
                    int64_t V)
{
    int64_t nr = xent_nreal(Vl, v0, V);
#pragma omp parallel for schedule(static) if (N * Vl >= OPS_PAR_MIN)
    for (int64_t i = 0; i < N; i++) {
        const float *l = logits + i * Vl;
        float m = gmax[i];
        double s = 0;  // tens of thousands of terms: sum in double
        for (int64_t j = 0; j < nr; j++) s += expf(l[j] - m);
        sumexp[i] = (float)s;
    }
}

void op_xent_target(float *tlogit, const float *logits, const int32_t *targets, int64_t N, int64_t Vl, int64_t v0)
{
#pragma omp parallel for schedule(static) if (N >= OPS_PAR_MIN)
    for (int64_t i = 0; i < N; i++) {
        int64_t j = (int64_t)targets[i] - v0;
        tlogit[i] = (j >= 0 && j < Vl) ? logits[i * Vl + j] : 0.0f;
    }
}

void op_xent_bwd(float *dlogits, const float *logits, const int32_t *targets, const float *gmax, const float *gsumexp,
                 float scale, int64_t N, int64_t Vl, int64_t v0, int64_t V)
{
    int64_t nr = xent_nreal(Vl, v0, V);
#pragma omp parallel for schedule(static) if (N * Vl >= OPS_PAR_MIN)
    for (int64_t i = 0; i < N; i++) {
        const float *l = logits + i * Vl;  // (Vl)
        float *d = dlogits + i * Vl;
        float m = gmax[i], inv = 1.0f / gsumexp[i];
        int64_t tj = (int64_t)targets[i] - v0;  // local target column, may lie outside [0, nr)
        for (int64_t j = 0; j < nr; j++) {
            float p = expf(l[j] - m) * inv;
            d[j] = scale * (j == tj ? p - 1.0f : p);
        }
        for (int64_t j = nr; j < Vl; j++) d[j] = 0.0f;
    }
}

/* ---------------------------------------------------------------- optimizer */

void op_adamw(float *param, const float *grad, float *m, float *v, int64_t n, float lr, float beta1, float beta2,
              float eps, float weight_decay, int64_t t)
{
    /* torch.optim.AdamW (single-tensor path): p *= 1 - lr*wd; m, v moments;
     * p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps), bc = 1 - beta^t */
    double bc1 = 1.0 - pow(beta1, (double)t), bc2 = 1.0 - pow(beta2, (double)t);
    float step = (float)(lr / bc1), bc2_sqrt = (float)sqrt(bc2);
    float decay = 1.0f - lr * weight_decay, one_b1 = 1.0f - beta1, one_b2 = 1.0f - beta2;
#pragma omp parallel for schedule(static) if (n >= OPS_PAR_MIN)
    for (int64_t i = 0; i < n; i++) {
        float g = grad[i];
        float mi = beta1 * m[i] + one_b1 * g;
        float vi = beta2 * v[i] + one_b2 * g * g;
        m[i] = mi;
        v[i] = vi;
        param[i] = param[i] * decay - step * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
}

/* Fixed blocks, each summed by one thread, then the block sums added in block order: the result
 * depends on n only, not on the thread count. */
#define SUMSQ_BLOCK 8192
#define SUMSQ_GROUP 64  // blocks per parallel round (their partial sums live on the stack)

double op_sumsq(const float *x, int64_t n)
{
    double total = 0;
    for (int64_t base = 0; base < n; base += (int64_t)SUMSQ_BLOCK * SUMSQ_GROUP) {
        double part[SUMSQ_GROUP];
        int64_t nb = min64(SUMSQ_GROUP, (n - base + SUMSQ_BLOCK - 1) / SUMSQ_BLOCK);
#pragma omp parallel for schedule(static) if (nb > 1)
        for (int64_t b = 0; b < nb; b++) {
            int64_t i0 = base + b * SUMSQ_BLOCK, i1 = min64(n, i0 + SUMSQ_BLOCK);
            double s0 = 0, s1 = 0, s2 = 0, s3 = 0;  // 4 chains hide the add latency
            int64_t i = i0;
            for (; i + 4 <= i1; i += 4) {
                s0 += (double)x[i] * x[i];
                s1 += (double)x[i + 1] * x[i + 1];
                s2 += (double)x[i + 2] * x[i + 2];
                s3 += (double)x[i + 3] * x[i + 3];
            }
            for (; i < i1; i++) s0 += (double)x[i] * x[i];
            part[b] = (s0 + s1) + (s2 + s3);
        }
        for (int64_t b = 0; b < nb; b++) total += part[b];
    }
    return total;
}
