/* Pieces shared by the head-size-64 attention kernels of attention_fast.cu (mma.sync) and
 * attention_wgmma.cu (wgmma): asynchronous copies, fragment packing, quad reductions, and the
 * launches: the forward's for both, the backward's for mma.sync (its dQ kernel first, since it
 * also writes D = rowsum(dout * out), which the dK/dV kernel reads; the wgmma backward has D in a
 * kernel of its own and runs dQ and dK/dV side by side). Everything is in an anonymous namespace:
 * each file has its own copy. */
#ifndef MPS_ATTENTION_COMMON_CUH
#define MPS_ATTENTION_COMMON_CUH

#include <math.h>
#include <stdint.h>

#include "cuda_internal.h"

namespace {

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ uint32_t smem_addr(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }

/* Asynchronous copies (cp.async): they need no registers and cannot be moved next to their use by
 * the compiler, so a tile's loads have a whole tile's work to arrive. cp_async16 copies 16 bytes to
 * the shared address dst, or zero-fills them (source size 0, nothing read) when !valid. */
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, bool valid)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async4(float *dst, const float *src)
{
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

/* two floats to bf16x2, lo in the low half (the lower column index of a fragment) */
__device__ __forceinline__ uint32_t pack2(float lo, float hi)
{
    uint32_t r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ float ex2(float x)
{
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

/* row max / sum over the 4 lanes of a quad (the lanes that share an accumulator row); xor
 * butterflies leave the same bits in every lane */
__device__ __forceinline__ float quad_max(float v)
{
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v)
{
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

/* four consecutive bf16 at p (global memory, 8-byte aligned), widened */
__device__ __forceinline__ float4 ld4g(const bf16 *p)
{
    const uint2 u = __ldg(reinterpret_cast<const uint2 *>(p));
    const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&u.x));
    const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&u.y));
    return make_float4(lo.x, lo.y, hi.x, hi.y);
}

/* a row's D = dout . out when a half-warp holds the row, 4 elements a lane: the lane's four
 * products (dot4), then a fixed butterfly over the 16 lanes (every lane gets the same bits) */
__device__ __forceinline__ float dot4(float4 g, float4 o) { return g.x * o.x + g.y * o.y + g.z * o.z + g.w * o.w; }
__device__ __forceinline__ float half_warp_sum(float d)
{
    d += __shfl_xor_sync(0xffffffffu, d, 1);
    d += __shfl_xor_sync(0xffffffffu, d, 2);
    d += __shfl_xor_sync(0xffffffffu, d, 4);
    return d + __shfl_xor_sync(0xffffffffu, d, 8);
}

/* ---- launches: grid (B * H, row blocks); scores in log2 units (sl2 = scale * log2 e) */

typedef void (*att_fwd_kernel)(bf16 *out, float *lse, const bf16 *qkv, int T, int H, float sl2);
typedef void (*att_dq_kernel)(bf16 *dqkv, float *Dv, const bf16 *dout, const bf16 *out, const bf16 *qkv,
                              const float *lse, int T, int H, float scale, float sl2);
typedef void (*att_dkv_kernel)(bf16 *dqkv, const bf16 *dout, const bf16 *qkv, const float *lse, const float *Dv,
                               int T, int H, float scale, float sl2);

inline int att_smem(mps_cuda *c, const void *kernel, size_t smem, const char *what)
{
    if ((int64_t)smem > c->smem_optin) {
        cu_fail(c, "%s: needs %zu bytes of shared memory, the device allows %d", what, smem, c->smem_optin);
        return -1;
    }
    return cu_check(c, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem), what);
}

/* 0 when launched (errors recorded), -1 when T needs more row blocks than a grid holds */
inline int att_launch_fwd(mps_cuda *c, att_fwd_kernel k, size_t smem, int threads, int rows, const char *what,
                          act_t *out, float *lse, const act_t *qkv, int B, int T, int H)
{
    const int nb = (T + rows - 1) / rows;
    if (nb > 65535) /* grid.y */
        return -1;
    const float scale = 1.0f / sqrtf(64.0f);
    if (att_smem(c, (const void *)k, smem, what) != 0)
        return 0;
    k<<<dim3((unsigned)(B * H), (unsigned)nb), threads, smem, c->stream>>>(out, lse, qkv, T, H,
                                                                          scale * 1.4426950408889634f);
    cu_launched(c, what);
    return 0;
}

inline int att_launch_bwd(mps_cuda *c, att_dq_kernel kq, size_t smq, att_dkv_kernel kkv, size_t smkv, int threads,
                          int rows, const char *what_dq, const char *what_dkv, act_t *dqkv, const act_t *dout,
                          const act_t *qkv, const act_t *out, const float *lse, float *Dv, int B, int T, int H)
{
    const int nb = (T + rows - 1) / rows;
    if (nb > 65535)
        return -1;
    const float scale = 1.0f / sqrtf(64.0f), sl2 = scale * 1.4426950408889634f;
    const dim3 grid((unsigned)(B * H), (unsigned)nb);
    if (att_smem(c, (const void *)kq, smq, what_dq) != 0)
        return 0;
    kq<<<grid, threads, smq, c->stream>>>(dqkv, Dv, dout, out, qkv, lse, T, H, scale, sl2);
    if (cu_launched(c, what_dq) != 0)
        return 0;
    if (att_smem(c, (const void *)kkv, smkv, what_dkv) != 0)
        return 0;
    kkv<<<grid, threads, smkv, c->stream>>>(dqkv, dout, qkv, lse, Dv, T, H, scale, sl2);
    cu_launched(c, what_dkv);
    return 0;
}

} // namespace

#endif
