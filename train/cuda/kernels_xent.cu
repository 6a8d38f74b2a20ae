/* Cross-entropy over vocab-parallel logits and the loss sum returned to the host (determinism:
 * kernels_rows.cu). */
#include "kernels_common.cuh"

/* ---------------------------------------------------------------- cross-entropy */

/* how many of the Vl local ids are real (< V) */
static int64_t xent_nreal(int64_t Vl, int64_t v0, int64_t V)
{
    int64_t r = V - v0;
    return r < 0 ? 0 : (r > Vl ? Vl : r);
}

#define XE_THREADS 256

/* online softmax statistics: (max, sum of exp(x - max)) pairs combine exactly in any fixed order */
struct MaxSum {
    float m, s;
};
__device__ __forceinline__ MaxSum ms_add(MaxSum a, float x)
{
    if (x > a.m) {
        a.s = a.s * expf(a.m - x) + 1.0f; /* exp(-inf) = 0 for the first element */
        a.m = x;
    } else {
        a.s += expf(x - a.m);
    }
    return a;
}
__device__ __forceinline__ MaxSum ms_join(MaxSum a, MaxSum b)
{
    const float m = fmaxf(a.m, b.m);
    if (m == -INFINITY)
        return a;
    return MaxSum{m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}
__device__ __forceinline__ MaxSum ms_shfl(MaxSum v, int o)
{
    return MaxSum{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
}

/* One block per row, one pass over the logits: local max, sum of exp relative to it, target
 * logit. A thread folds its elements in order, then a fixed tree (warp butterflies, warps in
 * order) joins the pairs: deterministic. vec: rows are 16-byte aligned (aligned base, Vl % 8 == 0). */
__global__ void k_xent_stats(float *rowmax, float *sumexp, float *tlogit, const act_t *logits, const int32_t *targets,
                             int64_t N, int64_t Vl, int64_t v0, int64_t nr, int vec)
{
    __shared__ MaxSum sh[32];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    for (int64_t i = blockIdx.x; i < N; i += gridDim.x) {
        const act_t *l = logits + i * Vl; // (Vl)
        MaxSum a = {-INFINITY, 0.0f};
        int64_t j0 = 0;
        if (vec) { /* 8 at a time: their max first, then 8 independent exps (not a chain of 8) */
            const int64_t n8 = nr >> 3;
            for (int64_t j = threadIdx.x; j < n8; j += blockDim.x) {
                const uint4 u = reinterpret_cast<const uint4 *>(l)[j];
                const uint32_t w4[4] = {u.x, u.y, u.z, u.w};
                float x[8];
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&w4[q]));
                    x[2 * q] = f.x, x[2 * q + 1] = f.y;
                }
                float cm = x[0];
#pragma unroll
                for (int q = 1; q < 8; q++)
                    cm = fmaxf(cm, x[q]);
                if (cm > a.m) {
                    a.s *= expf(a.m - cm); /* exp(-inf) = 0 for the first chunk */
                    a.m = cm;
                }
                float e[8];
#pragma unroll
                for (int q = 0; q < 8; q++)
                    e[q] = expf(x[q] - a.m);
                a.s += ((e[0] + e[1]) + (e[2] + e[3])) + ((e[4] + e[5]) + (e[6] + e[7]));
            }
            j0 = n8 << 3;
        }
        for (int64_t j = j0 + threadIdx.x; j < nr; j += blockDim.x)
            a = ms_add(a, __bfloat162float(l[j]));
        for (int o = 16; o > 0; o >>= 1)
            a = ms_join(a, ms_shfl(a, o));
        __syncthreads(); /* the previous row's readers of sh are done */
        if (lane == 0)
            sh[w] = a;
        __syncthreads();
        if (threadIdx.x == 0) {
            MaxSum t = sh[0];
            for (int k = 1; k < nw; k++)
                t = ms_join(t, sh[k]);
            rowmax[i] = t.m;
            sumexp[i] = t.s;
            const int64_t tj = (int64_t)targets[i] - v0;
            tlogit[i] = (tj >= 0 && tj < Vl) ? __bfloat162float(l[tj]) : 0.0f;
        }
    }
}

__device__ __forceinline__ float xent_d(float l, int64_t j, int64_t nr, int64_t tj, float m, float inv, float scale)
{
    if (j >= nr)
        return 0.0f;
    const float p = expf(l - m) * inv;
    return scale * (j == tj ? p - 1.0f : p);
}

/* dlogits from the logits (both bf16; the same buffer is fine: each element is read, then written, by
 * one thread); vec: Vl % 4 == 0 and 8-byte aligned rows */
__global__ void k_xent_bwd(act_t *dlogits, const act_t *logits, const int32_t *targets, const float *gmax,
                           const float *gsumexp, float scale, int64_t N, int64_t Vl, int64_t v0, int64_t nr, int vec)
{
    for (int64_t i = blockIdx.x; i < N; i += gridDim.x) {
        const act_t *l = logits + i * Vl;
        act_t *d = dlogits + i * Vl;
        const float m = gmax[i], inv = 1.0f / gsumexp[i];
        const int64_t tj = (int64_t)targets[i] - v0;
        int64_t j0 = 0;
        if (vec) {
            const int64_t n4 = Vl >> 2;
            for (int64_t j = threadIdx.x; j < n4; j += blockDim.x) {
                float4 v = ld4_act(l, j);
                const int64_t e = j << 2;
                st4_act(d, j, xent_d(v.x, e, nr, tj, m, inv, scale), xent_d(v.y, e + 1, nr, tj, m, inv, scale),
                        xent_d(v.z, e + 2, nr, tj, m, inv, scale), xent_d(v.w, e + 3, nr, tj, m, inv, scale));
            }
            j0 = n4 << 2;
        }
        for (int64_t j = j0 + threadIdx.x; j < Vl; j += blockDim.x)
            d[j] = __float2bfloat16_rn(xent_d(__bfloat162float(l[j]), j, nr, tj, m, inv, scale));
    }
}

__global__ void k_xent_rescale(float *sumexp, const float *rowmax, const float *gmax, int64_t N)
{
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < N; i += stride)
        sumexp[i] = rowmax[i] == -INFINITY ? 0.0f : sumexp[i] * expf(rowmax[i] - gmax[i]);
}

void cu_xent_stats(void *ctx, float *rowmax, float *sumexp, float *tlogit, const void *logits, const int32_t *targets,
                   int64_t N, int64_t Vl, int64_t v0, int64_t V)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (N <= 0)
        return;
    const int vec = Vl % 8 == 0 && cu_aligned16(logits);
    k_xent_stats<<<row_grid(c, N), XE_THREADS, 0, c->stream>>>(rowmax, sumexp, tlogit, (const act_t *)logits, targets, N, Vl, v0,
                                                               xent_nreal(Vl, v0, V), vec);
    cu_launched(c, "xent_stats");
}

void cu_xent_rescale(void *ctx, float *sumexp, const float *rowmax, const float *gmax, int64_t N)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (N <= 0)
        return;
    k_xent_rescale<<<cu_grid(c, N, EW_THREADS), EW_THREADS, 0, c->stream>>>(sumexp, rowmax, gmax, N);
    cu_launched(c, "xent_rescale");
}

void cu_xent_bwd(void *ctx, void *dlogits, const void *logits, const int32_t *targets, const float *gmax,
                 const float *gsumexp, float scale, int64_t N, int64_t Vl, int64_t v0, int64_t V)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (N <= 0 || Vl <= 0)
        return;
    /* (8 at a time with 16-byte accesses measured slower: 0.59 against 0.47 ms at N = 8192, H200) */
    const int vec = Vl % 4 == 0 && aligned8(logits) && aligned8(dlogits);
    k_xent_bwd<<<row_grid(c, N), XE_THREADS, 0, c->stream>>>((act_t *)dlogits, (const act_t *)logits, targets, gmax, gsumexp, scale,
                                                             N, Vl, v0, xent_nreal(Vl, v0, V), vec);
    cu_launched(c, "xent_bwd");
}

/* ---------------------------------------------------------------- host results */

/* one block of 1024: out = sum of log(sumexp) + gmax - tlogit, in double, fixed tree */
__global__ void k_loss_sum(double *out, const float *gmax, const float *sumexp, const float *tlogit, int64_t N)
{
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x)
        s += (double)logf(sumexp[i]) + (double)gmax[i] - (double)tlogit[i];
    s = block_reduce(s, SumOp(), 0.0);
    if (threadIdx.x == 0)
        *out = s;
}

double cu_xent_loss_sum(void *ctx, const float *gmax, const float *sumexp, const float *tlogit, int64_t N)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (N <= 0)
        return 0.0;
    pthread_mutex_lock(&c->res_mu);
    k_loss_sum<<<1, 1024, 0, c->stream>>>(c->dres + SQ_MAX_BLOCKS, gmax, sumexp, tlogit, N);
    double r = fetch_result(c, "xent_loss_sum");
    pthread_mutex_unlock(&c->res_mu);
    return r;
}
