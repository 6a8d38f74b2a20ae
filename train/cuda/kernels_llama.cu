/* The Llama block's element-wise and row kernels of the CUDA backend: RMSNorm forward and
 * backward, rotary embeddings, SwiGLU (the attention is in attention_gqa.cu). fp32 arithmetic on
 * bf16 operands, as the CPU backend's ops_cpu_llama.c does on fp32 ones; every sum has a fixed
 * order (one warp per row, column sums through per-chunk partials), so reruns are bit-identical. */
#include "kernels_common.cuh"

/* ---------------------------------------------------------------- RMSNorm */

/* one warp per row: rstd = 1 / sqrt(mean(x^2) + eps), out = w * (x * rstd); vec (C % 4 == 0,
 * 16-byte aligned rows): float4 loads, a lane's 4 squares added first */
__global__ void k_rms_fwd(act_t *out, float *rstd, const float *inp, const float *w, int64_t N, int C, float eps,
                          int vec)
{
    const int lane = threadIdx.x & 31, C4 = C >> 2;
    const int64_t nw = ((int64_t)gridDim.x * blockDim.x) >> 5;
    for (int64_t r = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; r < N; r += nw) {
        const float *x = inp + r * C; // (C)
        act_t *o = out + r * C;       // (C)
        float ss = 0.0f;
        if (vec) {
            for (int q = lane; q < C4; q += 32) {
                const float4 v = ld4(x, q);
                ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
            }
        } else {
            for (int j = lane; j < C; j += 32)
                ss += x[j] * x[j];
        }
        const float rs = 1.0f / sqrtf(warp_reduce(ss, SumOp()) / (float)C + eps);
        if (vec) {
            for (int q = lane; q < C4; q += 32) {
                const float4 v = ld4(x, q), g = ld4(w, q);
                st4_act(o, q, g.x * (v.x * rs), g.y * (v.y * rs), g.z * (v.z * rs), g.w * (v.w * rs));
            }
        } else {
            for (int j = lane; j < C; j += 32)
                o[j] = __float2bfloat16_rn(w[j] * (x[j] * rs));
        }
        if (lane == 0 && rstd)
            rstd[r] = rs;
    }
}

/* The same for rows of up to 128 K floats (C % 4 == 0, aligned): a lane's float4s j = lane + 32 i
 * (i < K) held in registers, all loaded before the first is used, so the row crosses the memory
 * bus once and a warp has K x 512 bytes in flight (k_rms_fwd reads it twice, the second time from
 * L2, a float4 or so per lane at a time). The sum runs in k_rms_fwd's order: the same bits. */
template <int K>
__global__ void __launch_bounds__(256) k_rms_fwd_reg(act_t *out, float *rstd, const float *inp, const float *w,
                                                     int64_t N, int C, float eps)
{
    const int lane = threadIdx.x & 31, C4 = C >> 2;
    const int64_t nw = ((int64_t)gridDim.x * blockDim.x) >> 5;
    for (int64_t r = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; r < N; r += nw) {
        float4 v[K];
#pragma unroll
        for (int i = 0; i < K; i++)
            v[i] = lane + 32 * i < C4 ? ld4(inp + r * C, lane + 32 * i) : make_float4(0, 0, 0, 0);
        float ss = 0.0f;
#pragma unroll
        for (int i = 0; i < K; i++)
            if (lane + 32 * i < C4)
                ss += v[i].x * v[i].x + v[i].y * v[i].y + v[i].z * v[i].z + v[i].w * v[i].w;
        const float rs = 1.0f / sqrtf(warp_reduce(ss, SumOp()) / (float)C + eps);
#pragma unroll
        for (int i = 0; i < K; i++) {
            const int q = lane + 32 * i;
            if (q < C4) {
                const float4 g = ld4(w, q);
                st4_act(out + r * C, q, g.x * (v[i].x * rs), g.y * (v[i].y * rs), g.z * (v[i].z * rs),
                        g.w * (v[i].w * rs));
            }
        }
        if (lane == 0 && rstd)
            rstd[r] = rs;
    }
}

void cu_rmsnorm_fwd(void *ctx, void *out, float *rstd, const float *inp, const float *w, int64_t N, int C, float eps)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (N <= 0 || C <= 0)
        return;
    const int vec = C % 4 == 0 && cu_aligned16(inp) && cu_aligned16(w) && aligned8(out);
    const unsigned grid = cu_grid(c, N * 32, 256);
    const int k = (C / 4 + 31) / 32; /* float4s per lane */
    if (vec && k <= 8)
        k_rms_fwd_reg<8><<<grid, 256, 0, c->stream>>>((act_t *)out, rstd, inp, w, N, C, eps);
    else if (vec && k <= 16) /* Llama 1B's 2048 */
        k_rms_fwd_reg<16><<<grid, 256, 0, c->stream>>>((act_t *)out, rstd, inp, w, N, C, eps);
    else if (vec && k <= 32) /* Llama 2 7B's 4096 */
        k_rms_fwd_reg<32><<<grid, 256, 0, c->stream>>>((act_t *)out, rstd, inp, w, N, C, eps);
    else
        k_rms_fwd<<<grid, 256, 0, c->stream>>>((act_t *)out, rstd, inp, w, N, C, eps, vec);
    cu_launched(c, "rmsnorm_fwd");
}

/* the backward: kernels_norm.cu (the layernorm backward's kernels without the mean) */

/* ---------------------------------------------------------------- rotary embeddings */

/* one thread per pair (row, head, i): (x_i, x_{i+half}) turned by position t's angle (sign -1:
 * back), in fp32, rounded once */
__global__ void k_rope(act_t *x, const float *cs, int64_t rows, int T, int nheads, int hd, int64_t ld, float sign)
{
    const int half = hd / 2;
    const int64_t n = rows * nheads * half, stride = (int64_t)gridDim.x * blockDim.x;
    const float *cosv = cs, *sinv = cs + (int64_t)T * half;
    for (int64_t id = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; id < n; id += stride) {
        const int i = (int)(id % half);
        const int64_t rh = id / half;
        const int h = (int)(rh % nheads);
        const int64_t row = rh / nheads, t = row % T;
        act_t *v = x + row * ld + (int64_t)h * hd;
        const float c = cosv[t * half + i], s = sign * sinv[t * half + i];
        const float a = __bfloat162float(v[i]), b = __bfloat162float(v[i + half]);
        v[i] = __float2bfloat16_rn(a * c - b * s);
        v[i + half] = __float2bfloat16_rn(b * c + a * s);
    }
}

/* The same with a block per row and two pairs (4-byte accesses) per thread, no 64-bit divisions:
 * for hd % 4 == 0 and 4-byte aligned rows (every real model). The same arithmetic, the same bits. */
__global__ void k_rope_rows(act_t *x, const float *cs, int T, int nheads, int hd, int64_t ld, float sign)
{
    const int half = hd / 2, hp = half / 2;
    const int64_t row = blockIdx.x;
    const int t = (int)(row % T);
    act_t *xr = x + row * ld;
    const float *cr = cs + (int64_t)t * half, *sr = cs + ((int64_t)T + t) * half;
    for (int idx = threadIdx.x; idx < nheads * hp; idx += blockDim.x) {
        const int h = idx / hp, i = 2 * (idx - h * hp);
        __nv_bfloat162 *pa = reinterpret_cast<__nv_bfloat162 *>(xr + (int64_t)h * hd + i);
        __nv_bfloat162 *pb = reinterpret_cast<__nv_bfloat162 *>(xr + (int64_t)h * hd + i + half);
        const float2 a = __bfloat1622float2(*pa), b = __bfloat1622float2(*pb);
        const float c0 = cr[i], c1 = cr[i + 1], s0 = sign * sr[i], s1 = sign * sr[i + 1];
        *pa = __floats2bfloat162_rn(a.x * c0 - b.x * s0, a.y * c1 - b.y * s1);
        *pb = __floats2bfloat162_rn(b.x * c0 + a.x * s0, b.y * c1 + a.y * s1);
    }
}

static void rope_launch(mps_cuda *c, void *x, const float *cs, int B, int T, int nheads, int hd, int64_t ld,
                        float sign, const char *what)
{
    const int64_t n = (int64_t)B * T * nheads * (hd / 2);
    if (n <= 0)
        return;
    if (hd % 4 == 0 && ld % 2 == 0 && ((uintptr_t)x & 3u) == 0 && (int64_t)B * T <= INT32_MAX) {
        const int pairs2 = nheads * hd / 4, threads = pairs2 < 256 ? (pairs2 + 31) / 32 * 32 : 256;
        k_rope_rows<<<(unsigned)((int64_t)B * T), threads, 0, c->stream>>>((act_t *)x, cs, T, nheads, hd, ld, sign);
    } else {
        k_rope<<<cu_grid(c, n, EW_THREADS), EW_THREADS, 0, c->stream>>>((act_t *)x, cs, (int64_t)B * T, T, nheads, hd,
                                                                         ld, sign);
    }
    cu_launched(c, what);
}

void cu_rope_fwd(void *ctx, void *x, const float *cs, int B, int T, int nheads, int hd, int64_t ld)
{
    rope_launch((mps_cuda *)ctx, x, cs, B, T, nheads, hd, ld, 1.0f, "rope_fwd");
}

void cu_rope_bwd(void *ctx, void *dx, const float *cs, int B, int T, int nheads, int hd, int64_t ld)
{
    rope_launch((mps_cuda *)ctx, dx, cs, B, T, nheads, hd, ld, -1.0f, "rope_bwd");
}

/* ---------------------------------------------------------------- SwiGLU */

__device__ __forceinline__ float silu_up(float g, float u) { return g / (1.0f + expf(-g)) * u; }
/* (d silu(g) u / dg, d / du) * d */
__device__ __forceinline__ void swiglu_grads(float g, float u, float d, float &dg, float &du)
{
    const float sig = 1.0f / (1.0f + expf(-g));
    dg = d * u * sig * (1.0f + g * (1.0f - sig));
    du = d * (g * sig);
}

/* Rows of F: out (N, F) dense, gate / up / dgate / dup in rows of stride ld (the stacked gate|up
 * product's columns). Element e of out (row e / F, column e % F) is at row * ld + column of the
 * strided ones. V: elements per thread and access, 4 (8-byte accesses) when F, ld and the buffers
 * allow, else 1. */
__device__ __forceinline__ int64_t row_of(int64_t e, int64_t n, int F)
{
    return n <= (int64_t)UINT32_MAX ? (int64_t)((uint32_t)e / (uint32_t)F) : e / F; /* 32-bit division where it fits */
}

template <int V>
__global__ void k_swiglu_fwd(act_t *out, const act_t *gate, const act_t *up, int64_t n, int F, int64_t ld)
{
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n / V; i += stride) {
        const int64_t e = i * V, r = row_of(e, n, F), at = r * ld + (e - r * F);
        if (V == 4) {
            const float4 g = ld4_act(gate, at / 4), u = ld4_act(up, at / 4);
            st4_act(out, i, silu_up(g.x, u.x), silu_up(g.y, u.y), silu_up(g.z, u.z), silu_up(g.w, u.w));
        } else {
            out[e] = __float2bfloat16_rn(silu_up(__bfloat162float(gate[at]), __bfloat162float(up[at])));
        }
    }
}

/* dgate, dup may be gate and up: each element is read before it is written, by one thread */
template <int V>
__global__ void k_swiglu_bwd(act_t *dgate, act_t *dup, const act_t *dout, const act_t *gate, const act_t *up,
                             int64_t n, int F, int64_t ld)
{
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n / V; i += stride) {
        const int64_t e = i * V, r = row_of(e, n, F), at = r * ld + (e - r * F);
        if (V == 4) {
            const float4 g = ld4_act(gate, at / 4), u = ld4_act(up, at / 4), d = ld4_act(dout, i);
            float4 dg, du;
            swiglu_grads(g.x, u.x, d.x, dg.x, du.x);
            swiglu_grads(g.y, u.y, d.y, dg.y, du.y);
            swiglu_grads(g.z, u.z, d.z, dg.z, du.z);
            swiglu_grads(g.w, u.w, d.w, dg.w, du.w);
            st4_act(dgate, at / 4, dg.x, dg.y, dg.z, dg.w);
            st4_act(dup, at / 4, du.x, du.y, du.z, du.w);
        } else {
            float dg, du;
            swiglu_grads(__bfloat162float(gate[at]), __bfloat162float(up[at]), __bfloat162float(dout[e]), dg, du);
            dgate[at] = __float2bfloat16_rn(dg);
            dup[at] = __float2bfloat16_rn(du);
        }
    }
}

void cu_swiglu_fwd(void *ctx, void *out, const void *gate, const void *up, int64_t N, int F, int64_t ld)
{
    mps_cuda *c = (mps_cuda *)ctx;
    const int64_t n = N * F;
    if (n <= 0)
        return;
    if (F % 4 == 0 && ld % 4 == 0 && aligned8(out) && aligned8(gate) && aligned8(up))
        k_swiglu_fwd<4><<<cu_grid(c, n / 4, EW_THREADS), EW_THREADS, 0, c->stream>>>(
            (act_t *)out, (const act_t *)gate, (const act_t *)up, n, F, ld);
    else
        k_swiglu_fwd<1><<<cu_grid(c, n, EW_THREADS), EW_THREADS, 0, c->stream>>>((act_t *)out, (const act_t *)gate,
                                                                                  (const act_t *)up, n, F, ld);
    cu_launched(c, "swiglu_fwd");
}

void cu_swiglu_bwd(void *ctx, void *dgate, void *dup, const void *dout, const void *gate, const void *up, int64_t N,
                   int F, int64_t ld)
{
    mps_cuda *c = (mps_cuda *)ctx;
    const int64_t n = N * F;
    if (n <= 0)
        return;
    if (F % 4 == 0 && ld % 4 == 0 && aligned8(dgate) && aligned8(dup) && aligned8(dout) && aligned8(gate) &&
        aligned8(up))
        k_swiglu_bwd<4><<<cu_grid(c, n / 4, EW_THREADS), EW_THREADS, 0, c->stream>>>(
            (act_t *)dgate, (act_t *)dup, (const act_t *)dout, (const act_t *)gate, (const act_t *)up, n, F, ld);
    else
        k_swiglu_bwd<1><<<cu_grid(c, n, EW_THREADS), EW_THREADS, 0, c->stream>>>(
            (act_t *)dgate, (act_t *)dup, (const act_t *)dout, (const act_t *)gate, (const act_t *)up, n, F, ld);
    cu_launched(c, "swiglu_bwd");
}
