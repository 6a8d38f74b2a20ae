/* Helpers shared by the kernel files of the CUDA backend (kernels_*.cu): vector loads and stores,
 * fixed-shape reductions, the elementwise launcher, bf16 operand helpers, the multi-tensor launch
 * table and the host-result fetch. */
#ifndef MPS_KERNELS_COMMON_CUH
#define MPS_KERNELS_COMMON_CUH

#include <math.h>

#include "cuda_internal.h"

#define EW_THREADS 256

/* ---------------------------------------------------------------- helpers */

__device__ __forceinline__ float4 ld4(const float *p, int64_t i4) { return reinterpret_cast<const float4 *>(p)[i4]; }
__device__ __forceinline__ void st4(float *p, int64_t i4, float4 v) { reinterpret_cast<float4 *>(p)[i4] = v; }

struct SumOp {
    template <class T>
    __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <class T, class Op>
__device__ __forceinline__ T warp_reduce(T v, Op op)
{
    for (int o = 16; o > 0; o >>= 1)
        v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* every thread gets the block's reduction; a fixed tree (warp butterflies, then the warp results
 * in warp order), so the bits do not depend on scheduling. Call from all threads. */
template <class T, class Op>
__device__ T block_reduce(T v, Op op, T ident)
{
    __shared__ T sh[32];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_reduce(v, op);
    __syncthreads();  // an earlier call's readers are done with sh
    if (lane == 0)
        sh[w] = v;
    __syncthreads();
    return warp_reduce(lane < nw ? sh[lane] : ident, op);
}

/* grid-stride loop over n elements, float4 at a time when every pointer is 16-byte aligned */
template <class F>
__global__ void k_ew(F f, int64_t n, int vec)
{
    const int64_t stride = (int64_t)gridDim.x * blockDim.x, i0 = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    int64_t done = 0;
    if (vec) {
        const int64_t n4 = n >> 2;
        for (int64_t i = i0; i < n4; i += stride)
            f.four(i);
        done = n4 << 2;
    }
    for (int64_t i = done + i0; i < n; i += stride)
        f.one(i);
}

template <class F>
static void launch_ew(mps_cuda *c, F f, int64_t n, int vec, const char *what)
{
    if (n <= 0)
        return;
    k_ew<F><<<cu_grid(c, vec ? n / 4 + 1 : n, EW_THREADS), EW_THREADS, 0, c->stream>>>(f, n, vec);
    cu_launched(c, what);
}

/* block size for kernels with one block per row of `cols` elements */
static inline int row_threads(int64_t cols) { return cols >= 256 ? 256 : cols > 64 ? 128 : 64; }
static inline unsigned row_grid(const mps_cuda *c, int64_t rows)
{
    int64_t cap = (int64_t)c->nsm * 32;
    return (unsigned)(rows < 1 ? 1 : rows < cap ? rows : cap);
}

#define GELU_K 0.7978845608028654f  // sqrt(2 / pi)
#define GELU_A 0.044715f

__device__ __forceinline__ float gelu_f(float x) { return 0.5f * x * (1.0f + tanhf(GELU_K * (x + GELU_A * x * x * x))); }
__device__ __forceinline__ float gelu_g(float x)
{
    const float th = tanhf(GELU_K * (x + GELU_A * x * x * x));
    const float du = GELU_K * (1.0f + 3.0f * GELU_A * x * x);  // d(tanh argument)/dx
    return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * du;
}

/* four bf16 (8 bytes) at element 4 i4 */
__device__ __forceinline__ void st4_act(act_t *p, int64_t i4, float a, float b, float c, float d)
{
    __nv_bfloat162 lo = __floats2bfloat162_rn(a, b), hi = __floats2bfloat162_rn(c, d);
    uint2 u;
    u.x = *reinterpret_cast<uint32_t *>(&lo);
    u.y = *reinterpret_cast<uint32_t *>(&hi);
    reinterpret_cast<uint2 *>(p)[i4] = u;
}
/* four bf16 as loaded (8 bytes), widened */
__device__ __forceinline__ float4 bf16x4_to_float4(uint2 u)
{
    const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&u.x));
    const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&u.y));
    return make_float4(lo.x, lo.y, hi.x, hi.y);
}
__device__ __forceinline__ float4 ld4_act(const act_t *p, int64_t i4)
{
    return bf16x4_to_float4(reinterpret_cast<const uint2 *>(p)[i4]);
}
/* a value or two of an fp32 or a bf16 operand buffer, as floats */
__device__ __forceinline__ float2 to_f2(const float *p) { return make_float2(p[0], p[1]); }
__device__ __forceinline__ float2 to_f2(const act_t *p)
{
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(p));
}
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(act_t v) { return __bfloat162float(v); }
static inline int aligned8(const void *p) { return ((uintptr_t)p & 7u) == 0; }

/* ---------------------------------------------------------------- multi-tensor passes */

/* A launch over up to MT_MAX tensors, passed by value as the kernel's parameter (no table to copy
 * to the device; 3.4 KB, under the 4 KB limit): tensor i is cut into chunks of MT_CHUNK elements,
 * chunks first[i] .. first[i + 1] - 1 of the launch, one block per chunk. The chunking depends on
 * the sizes only, so every sum over chunks has a fixed order. */
#define MT_MAX 64
#define MT_CHUNK 32768 /* a multiple of 4: chunk starts keep a tensor's 16-byte alignment */
#define MT_THREADS 256
struct MtArgs {
    float *p[MT_MAX], *g[MT_MAX], *m[MT_MAX], *v[MT_MAX];
    act_t *pb[MT_MAX]; /* adamw: the parameter's bf16 copy (NULL: none) */
    int64_t n[MT_MAX];
    int64_t first[MT_MAX + 1];
    float decay[MT_MAX];
    unsigned long long keep; /* adamw: bit i set: tensor i's grad is left as it is (not zeroed) */
    int count;
};
static_assert(sizeof(MtArgs) + sizeof(float) * 16 <= 4096, "kernel parameters over 4 KB");

__device__ __forceinline__ int dev_aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

/* the tensor of the block's chunk, and the chunk's element range [*b, *e) in it */
__device__ __forceinline__ int mt_find(const MtArgs &a, int64_t *b, int64_t *e)
{
    const int64_t chunk = blockIdx.x;
    int lo = 0, hi = a.count - 1;
    while (lo < hi) { /* the last tensor whose first chunk is <= chunk */
        const int mid = (lo + hi + 1) >> 1;
        if (a.first[mid] <= chunk)
            lo = mid;
        else
            hi = mid - 1;
    }
    *b = (chunk - a.first[lo]) * MT_CHUNK;
    *e = *b + MT_CHUNK < a.n[lo] ? *b + MT_CHUNK : a.n[lo];
    return lo;
}

#define SQ_MAX_BLOCKS 1024 /* dres: this many doubles, then the results */

/* copies dres[1024 + slot] back; call with res_mu held */
static inline double fetch_result(mps_cuda *c, const char *what, int slot = 0)
{
    double h = NAN;
    if (cu_launched(c, what) != 0)
        return NAN;
    if (cu_check(c, cudaMemcpyAsync(&h, c->dres + SQ_MAX_BLOCKS + slot, sizeof h, cudaMemcpyDeviceToHost, c->stream), what) != 0 ||
        cu_check(c, cudaStreamSynchronize(c->stream), what) != 0)
        return NAN;
    return h;
}

#endif
