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

#define XE_THREADS 256 /* k_xent_bwd */
/* The row statistics fold a row in XE_LANES interleaved lanes, whatever the block size (a thread
 * of a smaller block runs several lanes), so that k_xent_stats (256 threads: 4 lanes each) and
 * k_xent_stats_bwd (1024: one each) add in the same order and give the same bits. */
#define XE_LANES 1024
#define XE_STATS_THREADS 256

/* exp(x) as one ex2.approx (~2^-22 relative, plus the rounding of x log2(e), ~|x| 2^-24; exp(-inf)
 * = 0): the fused pass below computes two per logit and is bound by them with expf's range
 * reduction (0.69 against 0.52 ms at N = 8192, H200) */
__device__ __forceinline__ float xe_exp(float x)
{
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x * 1.44269504088896341f));
    return y;
}

/* online softmax statistics: (max, sum of exp(x - max)) pairs combine exactly in any fixed order */
struct MaxSum {
    float m, s;
};
__device__ __forceinline__ MaxSum ms_add(MaxSum a, float x)
{
    if (x > a.m) {
        a.s = a.s * xe_exp(a.m - x) + 1.0f; /* exp(-inf) = 0 for the first element */
        a.m = x;
    } else {
        a.s += xe_exp(x - a.m);
    }
    return a;
}
__device__ __forceinline__ MaxSum ms_join(MaxSum a, MaxSum b)
{
    const float m = fmaxf(a.m, b.m);
    if (m == -INFINITY)
        return a;
    return MaxSum{m, a.s * xe_exp(a.m - m) + b.s * xe_exp(b.m - m)};
}
__device__ __forceinline__ MaxSum ms_shfl(MaxSum v, int o)
{
    return MaxSum{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
}

/* lane's part of a row: elements lane, lane + XE_LANES, ... (8-element pieces with vec) folded in
 * order */
__device__ __forceinline__ MaxSum xent_lane_fold(const act_t *l, int64_t nr, int vec, int lane)
{
    MaxSum a = {-INFINITY, 0.0f};
    int64_t j0 = 0;
    if (vec) { /* 8 at a time: their max first, then 8 independent exps (not a chain of 8) */
        const int64_t n8 = nr >> 3;
        for (int64_t j = lane; j < n8; j += XE_LANES) {
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
                a.s *= xe_exp(a.m - cm); /* exp(-inf) = 0 for the first piece */
                a.m = cm;
            }
            float e[8];
#pragma unroll
            for (int q = 0; q < 8; q++)
                e[q] = xe_exp(x[q] - a.m);
            a.s += ((e[0] + e[1]) + (e[2] + e[3])) + ((e[4] + e[5]) + (e[6] + e[7]));
        }
        j0 = n8 << 3;
    }
    for (int64_t j = j0 + lane; j < nr; j += XE_LANES)
        a = ms_add(a, __bfloat162float(l[j]));
    return a;
}

/* A row's (local max, sum of exp relative to it) pair, valid in thread 0, from one pass over the
 * logits l (global or shared memory) by a block of XE_LANES / LPT threads: each lane folds its
 * elements in order, the 32 lanes of a lane-warp join in a fixed butterfly, and so do the 32
 * lane-warps: deterministic, and the same bits for any LPT and wherever l lies. vec: l
 * 16-byte aligned and read 8 at a time up to nr rounded down to 8. sh: XE_LANES / 32 pairs of
 * shared scratch (a barrier before the call writes it: a previous call's reader is done). */
template <int LPT>
__device__ __forceinline__ MaxSum xent_row_pair(const act_t *l, int64_t nr, int vec, MaxSum *sh)
{
    MaxSum a[LPT];
#pragma unroll
    for (int k = 0; k < LPT; k++) /* lane threadIdx.x + k blockDim.x: LPT folds in flight */
        a[k] = xent_lane_fold(l, nr, vec, threadIdx.x + k * (XE_LANES / LPT));
#pragma unroll
    for (int k = 0; k < LPT; k++)
        for (int o = 16; o > 0; o >>= 1)
            a[k] = ms_join(a[k], ms_shfl(a[k], o));
    __syncthreads(); /* the previous row's readers of sh are done */
    if ((threadIdx.x & 31) == 0)
#pragma unroll
        for (int k = 0; k < LPT; k++)
            sh[(threadIdx.x >> 5) + k * (XE_LANES / LPT / 32)] = a[k];
    __syncthreads();
    /* the 32 lane-warps' pairs, joined by warp 0 in a butterfly: 5 dependent joins a row, not the
     * 31 of one thread adding them one after another */
    MaxSum t = {-INFINITY, 0.0f};
    if (threadIdx.x < 32) {
        t = sh[threadIdx.x];
        for (int o = 16; o > 0; o >>= 1)
            t = ms_join(t, ms_shfl(t, o));
    }
    return t;
}

/* One block per row, one pass over the logits: local max, sum of exp relative to it, target
 * logit. vec: rows are 16-byte aligned (aligned base, Vl % 8 == 0). */
__global__ void __launch_bounds__(XE_STATS_THREADS) k_xent_stats(float *rowmax, float *sumexp, float *tlogit,
                                                                  const act_t *logits, const int32_t *targets,
                                                                  int64_t N, int64_t Vl, int64_t v0, int64_t nr,
                                                                  int vec)
{
    __shared__ MaxSum sh[XE_LANES / 32];
    for (int64_t i = blockIdx.x; i < N; i += gridDim.x) {
        const act_t *l = logits + i * Vl; // (Vl)
        const MaxSum t = xent_row_pair<XE_LANES / XE_STATS_THREADS>(l, nr, vec, sh);
        if (threadIdx.x == 0) {
            rowmax[i] = t.m;
            sumexp[i] = t.s;
            const int64_t tj = (int64_t)targets[i] - v0;
            tlogit[i] = (tj >= 0 && tj < Vl) ? __bfloat162float(l[tj]) : 0.0f;
        }
    }
}

/* one dlogit: element j of a row with nr real ids and target tj (I: int64_t, or int where a row fits
 * in shared memory) */
template <class I>
__device__ __forceinline__ float xent_d(float l, I j, I nr, I tj, float m, float inv, float scale)
{
    if (j >= nr)
        return 0.0f;
    const float p = xe_exp(l - m) * inv;
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

/* 16 bytes global -> shared without registers; all of a thread's copies are in flight at once */
__device__ __forceinline__ void xe_cp_async16(void *dst, const void *src)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"((unsigned)__cvta_generic_to_shared(dst)),
                 "l"(src)
                 : "memory");
}

/* k_xent_stats, then k_xent_bwd in place with gmax = rowmax and gsumexp = sumexp, in one pass:
 * the block copies its row into shared memory (Vl / 8 16-byte pieces: Vl % 8 == 0, logits
 * 16-byte aligned), takes the statistics from there as k_xent_stats does and writes the row's
 * dlogits from there as k_xent_bwd does: the same bits, and the logits are read from memory once,
 * not twice. Two blocks of XE_LANES per SM (a GPT-2 row is 98 KiB): one copies while the other
 * computes. (One block with two row buffers, the next row's copies under this row's work, measured
 * slower: 0.55 against 0.52 ms at N = 8192, H200.) */
__global__ void __launch_bounds__(XE_LANES, 2) k_xent_stats_bwd(float *rowmax, float *sumexp, float *tlogit,
                                                                act_t *logits, const int32_t *targets, float scale,
                                                                int64_t N, int64_t Vl, int64_t v0, int64_t nr)
{
    extern __shared__ uint4 xe_row[]; // (Vl / 8): the row
    __shared__ MaxSum sh[XE_LANES / 32];
    __shared__ float row_m, row_inv;
    const act_t *srow = reinterpret_cast<const act_t *>(xe_row);
    const int n8 = (int)(Vl >> 3);
    for (int64_t i = blockIdx.x; i < N; i += gridDim.x) {
        uint4 *l = reinterpret_cast<uint4 *>(logits + i * Vl); // (Vl / 8)
        for (int j = threadIdx.x; j < n8; j += blockDim.x)
            xe_cp_async16(xe_row + j, l + j);
        asm volatile("cp.async.wait_all;\n" ::: "memory");
        __syncthreads();
        const MaxSum t = xent_row_pair<1>(srow, nr, 1, sh);
        const int64_t tj = (int64_t)targets[i] - v0;
        if (threadIdx.x == 0) {
            rowmax[i] = t.m;
            sumexp[i] = t.s;
            tlogit[i] = (tj >= 0 && tj < Vl) ? __bfloat162float(srow[tj]) : 0.0f;
            row_m = t.m;
            row_inv = 1.0f / t.s;
        }
        __syncthreads();
        /* 32-bit indices: the row fits in shared memory (a target outside it matches no element) */
        const float m = row_m, inv = row_inv;
        const int nr32 = (int)nr, tj32 = tj >= 0 && tj < nr ? (int)tj : -1;
        for (int j = threadIdx.x; j < n8; j += blockDim.x) {
            const uint4 u = xe_row[j];
            const uint32_t w4[4] = {u.x, u.y, u.z, u.w};
            uint32_t o4[4];
#pragma unroll
            for (int q = 0; q < 4; q++) {
                const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&w4[q]));
                const int e = 8 * j + 2 * q;
                __nv_bfloat162 d = __floats2bfloat162_rn(xent_d(f.x, e, nr32, tj32, m, inv, scale),
                                                         xent_d(f.y, e + 1, nr32, tj32, m, inv, scale));
                o4[q] = *reinterpret_cast<uint32_t *>(&d);
            }
            l[j] = make_uint4(o4[0], o4[1], o4[2], o4[3]);
        }
        __syncthreads(); /* every read of the row and of row_m, row_inv is done before the next row's copies */
    }
}

__global__ void k_xent_rescale(float *sumexp, const float *rowmax, const float *gmax, int64_t N)
{
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < N; i += stride)
        sumexp[i] = rowmax[i] == -INFINITY ? 0.0f : sumexp[i] * xe_exp(rowmax[i] - gmax[i]);
}

void cu_xent_stats(void *ctx, float *rowmax, float *sumexp, float *tlogit, const void *logits, const int32_t *targets,
                   int64_t N, int64_t Vl, int64_t v0, int64_t V)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (N <= 0)
        return;
    const int vec = Vl % 8 == 0 && cu_aligned16(logits);
    k_xent_stats<<<row_grid(c, N), XE_STATS_THREADS, 0, c->stream>>>(rowmax, sumexp, tlogit, (const act_t *)logits,
                                                                     targets, N, Vl, v0, xent_nreal(Vl, v0, V), vec);
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

/* The fused pass where a row fits in a block's shared memory (GPT-2's 50304 ids: 98 KiB, two
 * blocks per SM on an H100), else the two kernels. */
void cu_xent_stats_bwd(void *ctx, float *rowmax, float *sumexp, float *tlogit, void *logits, const int32_t *targets,
                       float scale, int64_t N, int64_t Vl, int64_t v0, int64_t V)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (N <= 0 || Vl <= 0)
        return;
    const size_t smem = (size_t)Vl * sizeof(act_t);
    const size_t static_smem = XE_LANES / 32 * sizeof(MaxSum) + 2 * sizeof(float);
    if (Vl % 8 != 0 || !cu_aligned16(logits) || smem + static_smem > (size_t)c->smem_optin) {
        cu_xent_stats(ctx, rowmax, sumexp, tlogit, logits, targets, N, Vl, v0, V);
        cu_xent_bwd(ctx, logits, logits, targets, rowmax, sumexp, scale, N, Vl, v0, V);
        return;
    }
    if (cu_check(c, cudaFuncSetAttribute(k_xent_stats_bwd, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                 "xent_stats_bwd") != 0)
        return;
    int per_sm = 0;
    if (cu_check(c, cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k_xent_stats_bwd, XE_LANES, smem),
                 "xent_stats_bwd") != 0)
        return;
    const int64_t cap = (int64_t)c->nsm * (per_sm > 0 ? per_sm : 1);
    k_xent_stats_bwd<<<(unsigned)(N < cap ? N : cap), XE_LANES, smem, c->stream>>>(
        rowmax, sumexp, tlogit, (act_t *)logits, targets, scale, N, Vl, v0, xent_nreal(Vl, v0, V));
    cu_launched(c, "xent_stats_bwd");
}

/* ---------------------------------------------------------------- the loss */

/* one block of 1024: *acc = (first ? 0 : *acc) + the sum of log(sumexp) + gmax - tlogit, in
 * double, fixed tree */
__global__ void k_loss_add(double *acc, int first, const float *gmax, const float *sumexp, const float *tlogit,
                           int64_t N)
{
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x)
        s += (double)logf(sumexp[i]) + (double)gmax[i] - (double)tlogit[i];
    s = block_reduce(s, SumOp(), 0.0);
    if (threadIdx.x == 0)
        *acc = (first ? 0.0 : *acc) + s;
}

void cu_xent_loss_add(void *ctx, double *acc, int first, const float *gmax, const float *sumexp, const float *tlogit,
                      int64_t N)
{
    mps_cuda *c = (mps_cuda *)ctx;
    k_loss_add<<<1, 1024, 0, c->stream>>>(acc, first, gmax, sumexp, tlogit, N > 0 ? N : 0);
    cu_launched(c, "xent_loss_add");
}
