/* Layernorm forward and backward of the CUDA backend (determinism: kernels_rows.cu). */
#include "kernels_common.cuh"

/* ---------------------------------------------------------------- layernorm */

/* one warp per row, eps 1e-5, biased variance (two passes: mean, then squared deviations) */
__global__ void k_ln_fwd(act_t *out, float *mean, float *rstd, const float *inp, const float *w, const float *b,
                         int64_t N, int C)
{
    const int lane = threadIdx.x & 31;
    const int64_t nw = ((int64_t)gridDim.x * blockDim.x) >> 5;
    for (int64_t r = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; r < N; r += nw) {
        const float *x = inp + r * C;  // (C)
        float s = 0.0f;
        for (int j = lane; j < C; j += 32)
            s += x[j];
        const float m = warp_reduce(s, SumOp()) / C;
        float ss = 0.0f;
        for (int j = lane; j < C; j += 32) {
            const float d = x[j] - m;
            ss += d * d;
        }
        const float rs = 1.0f / sqrtf(warp_reduce(ss, SumOp()) / C + 1e-5f);
        act_t *o = out + r * C;
        for (int j = lane; j < C; j += 32)
            o[j] = __float2bfloat16_rn((x[j] - m) * rs * w[j] + b[j]);
        if (lane == 0) {
            if (mean)
                mean[r] = m;
            if (rstd)
                rstd[r] = rs;
        }
    }
}

/* The same for C % 4 == 0 and C <= 128 K (K <= 16: GPT-2 XL's 1600 is K = 13) with 16-byte
 * accesses: a lane keeps float4 j = lane + 32 i (i < K) of its row in registers, so the row is read once (the kernel above reads it three
 * times), and writes four bf16 at a time. */
template <int K>
__global__ void k_ln_fwd4(act_t *out, float *mean, float *rstd, const float *inp, const float *w, const float *b,
                          int64_t N, int C)
{
    const int lane = threadIdx.x & 31, C4 = C >> 2;
    const int64_t nw = ((int64_t)gridDim.x * blockDim.x) >> 5;
    for (int64_t r = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; r < N; r += nw) {
        float4 x[K];
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < K; i++) {
            const int j = lane + 32 * i;
            x[i] = j < C4 ? ld4(inp + r * C, j) : make_float4(0, 0, 0, 0);
            s += (x[i].x + x[i].y) + (x[i].z + x[i].w);
        }
        const float m = warp_reduce(s, SumOp()) / C;
        float ss = 0.0f;
#pragma unroll
        for (int i = 0; i < K; i++)
            if (lane + 32 * i < C4) {
                const float a = x[i].x - m, bb = x[i].y - m, cc = x[i].z - m, d = x[i].w - m;
                ss += (a * a + bb * bb) + (cc * cc + d * d);
            }
        const float rs = 1.0f / sqrtf(warp_reduce(ss, SumOp()) / C + 1e-5f);
#pragma unroll
        for (int i = 0; i < K; i++) {
            const int j = lane + 32 * i;
            if (j < C4) {
                const float4 wv = ld4(w, j), bv = ld4(b, j);
                st4_act(out + r * C, j, (x[i].x - m) * rs * wv.x + bv.x, (x[i].y - m) * rs * wv.y + bv.y,
                        (x[i].z - m) * rs * wv.z + bv.z, (x[i].w - m) * rs * wv.w + bv.w);
            }
        }
        if (lane == 0) {
            if (mean)
                mean[r] = m;
            if (rstd)
                rstd[r] = rs;
        }
    }
}

void cu_layernorm_fwd(void *ctx, void *out, float *mean, float *rstd, const float *inp, const float *w,
                      const float *b, int64_t N, int C)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (N <= 0 || C <= 0)
        return;
    const unsigned grid = cu_grid(c, N * 32, 256);
    const int k = (C / 4 + 31) / 32;
    const int vec = C % 4 == 0 && k <= 16 && cu_aligned16(inp) && cu_aligned16(w) && cu_aligned16(b) && aligned8(out);
    if (!vec) {
        k_ln_fwd<<<grid, 256, 0, c->stream>>>((act_t *)out, mean, rstd, inp, w, b, N, C);
    } else {
        switch (k) {
#define LNF_CASE(KK)                                                                                          \
    case KK: k_ln_fwd4<KK><<<grid, 256, 0, c->stream>>>((act_t *)out, mean, rstd, inp, w, b, N, C); break;
            LNF_CASE(1) LNF_CASE(2) LNF_CASE(3) LNF_CASE(4) LNF_CASE(5) LNF_CASE(6) LNF_CASE(7) LNF_CASE(8)
            LNF_CASE(9) LNF_CASE(10) LNF_CASE(11) LNF_CASE(12) LNF_CASE(13) LNF_CASE(14) LNF_CASE(15) LNF_CASE(16)
#undef LNF_CASE
        }
    }
    cu_launched(c, "layernorm_fwd");
}

#define LNB_WARPS 4
#define LNB_ROWS 32 /* rows per block: one partial sum of dw, db (and of dinp's columns) per 32 rows */
#define LNB_U 4     /* float4s per lane in flight at a time in the two-pass kernel's row loops */

/* The LN backward's outputs beyond dinp. Partial sums [blockIdx] (C each) of the block's rows:
 * pdw of dout * xhat, pdb of dout (the gradients of w and b), pdx of the updated dinp (the column
 * sums the next bias gradient takes); dact: the updated dinp as an operand buffer. Each NULL when
 * not wanted; dact and pdx only with dinp (cu_layernorm_bwd clears them otherwise). */
struct LnBwdOut {
    float *dinp;
    act_t *dact;
    float *pdw, *pdb, *pdx;
};

/* The block's partial sums: the per-warp sums in sh [3][LNB_WARPS][C] (dw, db, dx) added in warp
 * order. */
__device__ __forceinline__ void ln_block_sums(const LnBwdOut &o, const float *sh, int C)
{
    for (int j = threadIdx.x; j < C; j += blockDim.x) {
        if (o.pdw) {
            float sw = 0.0f, sb = 0.0f;
            for (int k = 0; k < LNB_WARPS; k++) {
                sw += sh[(int64_t)k * C + j];
                sb += sh[(int64_t)(LNB_WARPS + k) * C + j];
            }
            o.pdw[(int64_t)blockIdx.x * C + j] = sw;
            if (o.pdb)
                o.pdb[(int64_t)blockIdx.x * C + j] = sb;
        }
        if (o.pdx) {
            float sx = 0.0f;
            for (int k = 0; k < LNB_WARPS; k++)
                sx += sh[(int64_t)(2 * LNB_WARPS + k) * C + j];
            o.pdx[(int64_t)blockIdx.x * C + j] = sx;
        }
    }
}

/* Block = 4 warps over 32 rows, a warp per row. dinp (N, C) += rstd * (g - mean(g) - xhat *
 * mean(g * xhat)), g = dout * w; the partial sums of LnBwdOut summed per warp in shared memory,
 * then over the warps in order. RMS: RMSNorm's backward, the same without the mean (xhat = x rstd,
 * no mean(g) term; no pdb). */
template <class DT, bool RMS> /* dout: fp32, or an operand buffer */
__global__ void k_ln_bwd(LnBwdOut o, const DT *dout, const float *inp, const float *w, const float *mean,
                         const float *rstd, int64_t N, int C)
{
    extern __shared__ float4 ln_sm4[];
    float *sh = reinterpret_cast<float *>(ln_sm4);  // [3][LNB_WARPS][C]
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    float *aw = sh + (int64_t)wid * C, *ab = sh + (int64_t)(LNB_WARPS + wid) * C;
    float *ax = sh + (int64_t)(2 * LNB_WARPS + wid) * C;
    const int part = o.pdw || o.pdx;
    if (part)
        for (int j = lane; j < C; j += 32)
            aw[j] = ab[j] = ax[j] = 0.0f;
    const int64_t r0 = (int64_t)blockIdx.x * LNB_ROWS;
    for (int k = wid; k < LNB_ROWS && r0 + k < N; k += LNB_WARPS) {
        const int64_t r = r0 + k;
        const float *x = inp + r * C;  // (C)
        const DT *g = dout + r * C;    // (C)
        const float m = RMS ? 0.0f : mean[r], rs = rstd[r];
        if (o.dinp) {
            float sg = 0.0f, sgx = 0.0f;
            for (int j = lane; j < C; j += 32) {
                const float gw = to_f(g[j]) * w[j];
                sg += gw;
                sgx += gw * ((x[j] - m) * rs);
            }
            const float mg = RMS ? 0.0f : warp_reduce(sg, SumOp()) / C, mgx = warp_reduce(sgx, SumOp()) / C;
            float *dx = o.dinp + r * C;
            for (int j = lane; j < C; j += 32) {
                const float xh = (x[j] - m) * rs;
                const float v = dx[j] + rs * (to_f(g[j]) * w[j] - mg - xh * mgx);
                dx[j] = v;
                if (o.dact)
                    o.dact[r * C + j] = __float2bfloat16_rn(v);
                if (o.pdx)
                    ax[j] += v;
            }
        }
        if (o.pdw)
            for (int j = lane; j < C; j += 32) {
                aw[j] += to_f(g[j]) * ((x[j] - m) * rs);
                ab[j] += to_f(g[j]);
            }
    }
    if (!part)
        return;
    __syncthreads();
    ln_block_sums(o, sh, C);
}

/* The same for C % 4 == 0 and C <= 128 K, with 16-byte accesses: a lane keeps float4 j = lane + 32 i
 * (i < K) of its row in registers, all three inputs (x, dout and the old dinp) loaded before any
 * store so that the loads of a row are in flight together (the stores could alias them for all
 * the compiler knows), and its columns' dw and db sums across the block's rows in registers; the
 * dinp column sums go to the warp's row of shared memory (registers are full). The 4 warps' sums
 * meet in shared memory at the end. */
__device__ __forceinline__ float4 ld4_any(const float *p, int64_t i4) { return ld4(p, i4); }
__device__ __forceinline__ float4 ld4_any(const act_t *p, int64_t i4) { return ld4_act(p, i4); }

template <int K, class DT, bool RMS>
__global__ void __launch_bounds__(LNB_WARPS * 32)
    k_ln_bwd4(LnBwdOut o, const DT *dout, const float *inp, const float *w, const float *mean, const float *rstd,
              int64_t N, int C)
{
    extern __shared__ float4 ln_sm4[];
    float *sh = reinterpret_cast<float *>(ln_sm4); // [3][LNB_WARPS][C]
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, C4 = C >> 2;
    const int pw = o.pdw != NULL, px = o.pdx != NULL;
    float4 *sx = reinterpret_cast<float4 *>(sh + (int64_t)(2 * LNB_WARPS + wid) * C); /* this warp's dinp sums */
    float4 wv[K], adw[K], adb[K];
#pragma unroll
    for (int i = 0; i < K; i++) {
        const int j = lane + 32 * i;
        wv[i] = j < C4 ? ld4(w, j) : make_float4(0, 0, 0, 0);
        adw[i] = adb[i] = make_float4(0, 0, 0, 0);
        if (px && j < C4)
            sx[j] = make_float4(0, 0, 0, 0);
    }
    const int64_t r0 = (int64_t)blockIdx.x * LNB_ROWS;
    for (int k = wid; k < LNB_ROWS && r0 + k < N; k += LNB_WARPS) {
        const int64_t r = r0 + k;
        const float m = RMS ? 0.0f : mean[r], rs = rstd[r];
        float4 xh[K], gv[K], dv[K];
#pragma unroll
        for (int i = 0; i < K; i++) {
            const int j = lane + 32 * i;
            const float4 z = make_float4(0, 0, 0, 0);
            xh[i] = j < C4 ? ld4(inp + r * C, j) : z;
            gv[i] = j < C4 ? ld4_any(dout + r * C, j) : z;
            dv[i] = j < C4 && o.dinp ? ld4(o.dinp + r * C, j) : z;
        }
        float sg = 0.0f, sgx = 0.0f;
#pragma unroll
        for (int i = 0; i < K; i++) {
            const float4 x = xh[i], g = gv[i];
            xh[i] = make_float4((x.x - m) * rs, (x.y - m) * rs, (x.z - m) * rs, (x.w - m) * rs);
            const float a = g.x * wv[i].x, b = g.y * wv[i].y, c = g.z * wv[i].z, d = g.w * wv[i].w;
            sg += a + b + c + d; /* zero past C: w and g are 0 there */
            sgx += a * xh[i].x + b * xh[i].y + c * xh[i].z + d * xh[i].w;
        }
        if (o.dinp) {
            const float mg = RMS ? 0.0f : warp_reduce(sg, SumOp()) / C, mgx = warp_reduce(sgx, SumOp()) / C;
#pragma unroll
            for (int i = 0; i < K; i++) {
                const int j = lane + 32 * i;
                if (j < C4) {
                    float4 dx = dv[i];
                    dx.x += rs * (gv[i].x * wv[i].x - mg - xh[i].x * mgx);
                    dx.y += rs * (gv[i].y * wv[i].y - mg - xh[i].y * mgx);
                    dx.z += rs * (gv[i].z * wv[i].z - mg - xh[i].z * mgx);
                    dx.w += rs * (gv[i].w * wv[i].w - mg - xh[i].w * mgx);
                    st4(o.dinp + r * C, j, dx);
                    if (o.dact)
                        st4_act(o.dact + r * C, j, dx.x, dx.y, dx.z, dx.w);
                    if (px) {
                        float4 t = sx[j];
                        sx[j] = make_float4(t.x + dx.x, t.y + dx.y, t.z + dx.z, t.w + dx.w);
                    }
                }
            }
        }
        if (pw)
#pragma unroll
            for (int i = 0; i < K; i++) {
                adw[i].x += gv[i].x * xh[i].x;
                adw[i].y += gv[i].y * xh[i].y;
                adw[i].z += gv[i].z * xh[i].z;
                adw[i].w += gv[i].w * xh[i].w;
                adb[i].x += gv[i].x;
                adb[i].y += gv[i].y;
                adb[i].z += gv[i].z;
                adb[i].w += gv[i].w;
            }
    }
    if (!pw && !px)
        return;
    if (pw)
#pragma unroll
        for (int i = 0; i < K; i++) {
            const int j = lane + 32 * i;
            if (j < C4) {
                reinterpret_cast<float4 *>(sh + (int64_t)wid * C)[j] = adw[i];
                reinterpret_cast<float4 *>(sh + (int64_t)(LNB_WARPS + wid) * C)[j] = adb[i];
            }
        }
    __syncthreads();
    ln_block_sums(o, sh, C);
}

/* The two-pass and register kernels' end: the block's partial sums of the wanted columns, the
 * warps' rows of shared memory ([dw][db unless RMS][dx][LNB_WARPS][C / 4] float4s) added in warp
 * order, as ln_block_sums. After a __syncthreads(). */
template <bool RMS>
__device__ __forceinline__ void wide_block_sums(const LnBwdOut &o, int C4, int pw, int px)
{
    extern __shared__ float4 ln_sm4[];
    const int nw = pw ? (RMS ? 1 : 2) : 0;
    const float4 z = make_float4(0, 0, 0, 0);
    for (int q = threadIdx.x; q < C4; q += blockDim.x) {
        const int64_t at = (int64_t)blockIdx.x * C4 + q;
        float4 sw = z, sb = z, sx = z;
        for (int k = 0; k < LNB_WARPS; k++) { /* in warp order, as ln_block_sums */
            if (pw) {
                const float4 a = ln_sm4[(int64_t)k * C4 + q];
                sw = make_float4(sw.x + a.x, sw.y + a.y, sw.z + a.z, sw.w + a.w);
                if (!RMS) {
                    const float4 b = ln_sm4[(int64_t)(LNB_WARPS + k) * C4 + q];
                    sb = make_float4(sb.x + b.x, sb.y + b.y, sb.z + b.z, sb.w + b.w);
                }
            }
            if (px) {
                const float4 c = ln_sm4[(int64_t)(nw * LNB_WARPS + k) * C4 + q];
                sx = make_float4(sx.x + c.x, sx.y + c.y, sx.z + c.z, sx.w + c.w);
            }
        }
        if (pw) {
            reinterpret_cast<float4 *>(o.pdw)[at] = sw;
            if (!RMS && o.pdb)
                reinterpret_cast<float4 *>(o.pdb)[at] = sb;
        }
        if (px)
            reinterpret_cast<float4 *>(o.pdx)[at] = sx;
    }
}

/* The same for rows too wide for registers (C % 4 == 0, C > 1024: Llama's 2048 to 8192): two
 * passes over the row with 16-byte accesses, the first for the two row sums, the second (its
 * loads mostly L2 hits) for dinp; the column sums in the warp's rows of shared memory, only
 * those wanted: [dw][db unless RMS][dx][LNB_WARPS][C], each lane touching its own float4s, so the
 * warps meet only at the end. The sums over rows run in the order of k_ln_bwd's. */
template <class DT, bool RMS>
__global__ void __launch_bounds__(LNB_WARPS * 32)
    k_ln_bwd_wide(LnBwdOut o, const DT *dout, const float *inp, const float *w, const float *mean,
                  const float *rstd, int64_t N, int C)
{
    extern __shared__ float4 ln_sm4[];
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, C4 = C >> 2;
    const int pw = o.pdw != NULL, px = o.pdx != NULL, nw = pw ? (RMS ? 1 : 2) : 0;
    float4 *aw = ln_sm4 + (int64_t)wid * C4, *ab = ln_sm4 + (int64_t)(LNB_WARPS + wid) * C4;
    float4 *ax = ln_sm4 + (int64_t)(nw * LNB_WARPS + wid) * C4;
    const float4 z = make_float4(0, 0, 0, 0);
    for (int q = lane; q < C4; q += 32) {
        if (pw) {
            aw[q] = z;
            if (!RMS)
                ab[q] = z;
        }
        if (px)
            ax[q] = z;
    }
    const int64_t r0 = (int64_t)blockIdx.x * LNB_ROWS;
    for (int k = wid; k < LNB_ROWS && r0 + k < N; k += LNB_WARPS) {
        const int64_t r = r0 + k;
        const float *x = inp + r * C; // (C)
        const DT *g = dout + r * C;   // (C)
        const float m = RMS ? 0.0f : mean[r], rs = rstd[r];
        float mg = 0.0f, mgx = 0.0f;
        /* LNB_U float4s per lane loaded before any is used (the stores below may alias the inputs
         * as far as the compiler knows, so it would not hoist the next loads itself): more
         * bytes in flight per warp. The per-lane sums keep ascending q. */
        if (o.dinp) {
            float sg = 0.0f, sgx = 0.0f;
            for (int q0 = lane; q0 < C4; q0 += 32 * LNB_U) {
                float4 xv[LNB_U], gv[LNB_U], wv[LNB_U];
#pragma unroll
                for (int u = 0; u < LNB_U; u++) {
                    const int q = q0 + 32 * u;
                    if (q < C4)
                        xv[u] = ld4(x, q), gv[u] = ld4_any(g, q), wv[u] = ld4(w, q);
                }
#pragma unroll
                for (int u = 0; u < LNB_U; u++) {
                    if (q0 + 32 * u >= C4)
                        break;
                    const float a = gv[u].x * wv[u].x, b = gv[u].y * wv[u].y, c = gv[u].z * wv[u].z,
                                d = gv[u].w * wv[u].w;
                    sg += a + b + c + d;
                    sgx += a * ((xv[u].x - m) * rs) + b * ((xv[u].y - m) * rs) + c * ((xv[u].z - m) * rs) +
                           d * ((xv[u].w - m) * rs);
                }
            }
            mg = RMS ? 0.0f : warp_reduce(sg, SumOp()) / C;
            mgx = warp_reduce(sgx, SumOp()) / C;
        }
        for (int q0 = lane; q0 < C4; q0 += 32 * LNB_U) {
            float4 xv[LNB_U], gv[LNB_U], dv[LNB_U];
#pragma unroll
            for (int u = 0; u < LNB_U; u++) {
                const int q = q0 + 32 * u;
                if (q < C4) {
                    xv[u] = ld4(x, q), gv[u] = ld4_any(g, q);
                    if (o.dinp)
                        dv[u] = ld4(o.dinp + r * C, q);
                }
            }
#pragma unroll
            for (int u = 0; u < LNB_U; u++) {
                const int q = q0 + 32 * u;
                if (q >= C4)
                    break;
                const float4 xh = make_float4((xv[u].x - m) * rs, (xv[u].y - m) * rs, (xv[u].z - m) * rs,
                                              (xv[u].w - m) * rs);
                const float4 gq = gv[u];
                if (o.dinp) {
                    const float4 wv = ld4(w, q);
                    float4 dx = dv[u];
                    dx.x += rs * (gq.x * wv.x - mg - xh.x * mgx);
                    dx.y += rs * (gq.y * wv.y - mg - xh.y * mgx);
                    dx.z += rs * (gq.z * wv.z - mg - xh.z * mgx);
                    dx.w += rs * (gq.w * wv.w - mg - xh.w * mgx);
                    st4(o.dinp + r * C, q, dx);
                    if (o.dact)
                        st4_act(o.dact + r * C, q, dx.x, dx.y, dx.z, dx.w);
                    if (px) {
                        const float4 t = ax[q];
                        ax[q] = make_float4(t.x + dx.x, t.y + dx.y, t.z + dx.z, t.w + dx.w);
                    }
                }
                if (pw) {
                    const float4 t = aw[q];
                    aw[q] = make_float4(t.x + gq.x * xh.x, t.y + gq.y * xh.y, t.z + gq.z * xh.z, t.w + gq.w * xh.w);
                    if (!RMS) {
                        const float4 v = ab[q];
                        ab[q] = make_float4(v.x + gq.x, v.y + gq.y, v.z + gq.z, v.w + gq.w);
                    }
                }
            }
        }
    }
    if (!pw && !px)
        return;
    __syncthreads();
    wide_block_sums<RMS>(o, C4, pw, px);
}

/* four consecutive values of a row as loaded (fp32: 16 bytes; operand buffer: 8 bytes of bf16,
 * widened when used, so that a row of dout takes half the registers) */
template <class DT> struct Raw4;
template <> struct Raw4<float> {
    float4 v;
    __device__ __forceinline__ void load(const float *p, int64_t i4) { v = ld4(p, i4); }
    __device__ __forceinline__ float4 get() const { return v; }
};
template <> struct Raw4<act_t> {
    uint2 v;
    __device__ __forceinline__ void load(const act_t *p, int64_t i4) { v = reinterpret_cast<const uint2 *>(p)[i4]; }
    __device__ __forceinline__ float4 get() const { return bf16x4_to_float4(v); }
};

/* RMSNorm's backward for 1024 < C <= 2048 (Llama 1B's width; C % 4 == 0, aligned): a lane keeps
 * its float4s j = lane + 32 i (i < K) of the row's x and dout in registers, all loaded before the
 * first is used, so they cross the memory bus once (k_ln_bwd_wide reads them twice, the second
 * time from L2, LNB_U float4s per lane at a time); the old dinp follows in groups of LNB_U. dw's
 * sums: the warp's row of shared memory, then over the warps in order, as k_ln_bwd_wide. */
template <int K, class DT>
__global__ void __launch_bounds__(LNB_WARPS * 32)
    k_rms_bwd_reg(LnBwdOut o, const DT *dout, const float *inp, const float *w, const float *rstd, int64_t N, int C)
{
    extern __shared__ float4 ln_sm4[];
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, C4 = C >> 2;
    const int pw = o.pdw != NULL;
    float4 *aw = ln_sm4 + (int64_t)wid * C4; /* this warp's dw sums */
    const float4 z = make_float4(0, 0, 0, 0);
    if (pw)
        for (int q = lane; q < C4; q += 32)
            aw[q] = z;
    const int64_t r0 = (int64_t)blockIdx.x * LNB_ROWS;
    for (int k = wid; k < LNB_ROWS && r0 + k < N; k += LNB_WARPS) {
        const int64_t r = r0 + k;
        const float rs = rstd[r];
        float4 xh[K]; /* x * rstd, (C) */
        Raw4<DT> graw[K]; /* dout, (C) */
#pragma unroll
        for (int i = 0; i < K; i++) {
            const int q = lane + 32 * i;
            xh[i] = z;
            if (q < C4) {
                xh[i] = ld4(inp + r * C, q);
                graw[i].load(dout + r * C, q);
            }
        }
        float sgx = 0.0f;
#pragma unroll
        for (int i = 0; i < K; i++) {
            const int q = lane + 32 * i;
            xh[i] = make_float4(xh[i].x * rs, xh[i].y * rs, xh[i].z * rs, xh[i].w * rs);
            if (q < C4) {
                const float4 wv = ld4(w, q), g = graw[i].get();
                sgx += g.x * wv.x * xh[i].x + g.y * wv.y * xh[i].y + g.z * wv.z * xh[i].z + g.w * wv.w * xh[i].w;
            }
        }
        if (o.dinp) {
            const float mgx = warp_reduce(sgx, SumOp()) / C;
            float *dxr = o.dinp + r * C; // (C)
#pragma unroll
            for (int i0 = 0; i0 < K; i0 += LNB_U) {
                float4 dv[LNB_U];
#pragma unroll
                for (int u = 0; u < LNB_U; u++)
                    if (i0 + u < K && lane + 32 * (i0 + u) < C4)
                        dv[u] = ld4(dxr, lane + 32 * (i0 + u));
#pragma unroll
                for (int u = 0; u < LNB_U; u++) {
                    const int i = i0 + u, q = lane + 32 * i;
                    if (i < K && q < C4) {
                        const float4 wv = ld4(w, q), g = graw[i].get();
                        float4 dx = dv[u];
                        dx.x += rs * (g.x * wv.x - xh[i].x * mgx);
                        dx.y += rs * (g.y * wv.y - xh[i].y * mgx);
                        dx.z += rs * (g.z * wv.z - xh[i].z * mgx);
                        dx.w += rs * (g.w * wv.w - xh[i].w * mgx);
                        st4(dxr, q, dx);
                        if (o.dact)
                            st4_act(o.dact + r * C, q, dx.x, dx.y, dx.z, dx.w);
                    }
                }
            }
        }
        if (pw)
#pragma unroll
            for (int i = 0; i < K; i++) {
                const int q = lane + 32 * i;
                if (q < C4) {
                    const float4 t = aw[q], g = graw[i].get();
                    aw[q] = make_float4(t.x + g.x * xh[i].x, t.y + g.y * xh[i].y, t.z + g.z * xh[i].z,
                                        t.w + g.w * xh[i].w);
                }
            }
    }
    if (!pw)
        return;
    __syncthreads();
    wide_block_sums<true>(o, C4, pw, 0);
}

/* launches k_ln_bwd4<K> for the smallest K that holds C (up to C = 1024), or returns 0 (the scalar
 * kernel runs) */
template <class DT, bool RMS, class... A>
static int ln_bwd_vec(mps_cuda *c, unsigned nblk, size_t smem, int C, A... args)
{
    if (C % 4 != 0)
        return 0;
    const int k = (C / 4 + 31) / 32;
    switch (k) {
#define LNB_CASE(KK)                                                                                        \
    case KK:                                                                                                \
        if (smem > 48 * 1024 &&                                                                             \
            cu_check(c, cudaFuncSetAttribute(k_ln_bwd4<KK, DT, RMS>, cudaFuncAttributeMaxDynamicSharedMemorySize, \
                                             (int)smem), "layernorm_bwd") != 0)                             \
            return 1;                                                                                       \
        k_ln_bwd4<KK, DT, RMS><<<nblk, LNB_WARPS * 32, smem, c->stream>>>(args...);                        \
        return 1;
        LNB_CASE(1) LNB_CASE(2) LNB_CASE(3) LNB_CASE(4) LNB_CASE(5) LNB_CASE(6) LNB_CASE(7) LNB_CASE(8)
#undef LNB_CASE
    /* wider rows would not fit in registers (6 K float4 per lane) */
    default: return 0;
    }
}

/* Launches the backward for (N, C): the two-pass kernel past ln_bwd_vec's widest rows, else the
 * register one, else the scalar one; each with the shared memory it needs for the wanted column
 * sums (the wide kernel only those; the others [3][LNB_WARPS][C] floats). Returns -1 (reported)
 * when that is more than the device has. */
template <class DT, bool RMS = false>
static int ln_bwd_launch(mps_cuda *c, const char *what, const LnBwdOut &o, unsigned nblk, int vec, const DT *dout,
                         const float *inp, const float *w, const float *mean, const float *rstd, int64_t N, int C)
{
    const int wide = vec && C % 4 == 0 && C > 32 * 4 * 8;
    const int nsums = wide ? (o.pdw ? (RMS ? 1 : 2) : 0) + (o.pdx ? 1 : 0) : (o.pdw || o.pdx ? 3 : 0);
    const size_t smem = (size_t)nsums * LNB_WARPS * C * sizeof(float);
    if ((int64_t)smem > c->smem_optin)
        return cu_fail(c, "%s: C = %d needs %zu bytes of shared memory", what, C, smem), -1;
    if (RMS && wide && C <= 32 * 4 * 16 && !o.pdx) { /* rows held in registers: k_rms_bwd_reg */
        if (smem > 48 * 1024 &&
            cu_check(c, cudaFuncSetAttribute(k_rms_bwd_reg<16, DT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             (int)smem), what) != 0)
            return -1;
        k_rms_bwd_reg<16, DT><<<nblk, LNB_WARPS * 32, smem, c->stream>>>(o, dout, inp, w, rstd, N, C);
        return 0;
    }
    if (wide) {
        if (smem > 48 * 1024 &&
            cu_check(c, cudaFuncSetAttribute(k_ln_bwd_wide<DT, RMS>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             (int)smem), what) != 0)
            return -1;
        k_ln_bwd_wide<DT, RMS><<<nblk, LNB_WARPS * 32, smem, c->stream>>>(o, dout, inp, w, mean, rstd, N, C);
        return 0;
    }
    if (smem > 48 * 1024 &&
        cu_check(c, cudaFuncSetAttribute(k_ln_bwd<DT, RMS>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                 what) != 0)
        return -1;
    if (!(vec && ln_bwd_vec<DT, RMS>(c, nblk, smem, C, o, dout, inp, w, mean, rstd, N, C)))
        k_ln_bwd<DT, RMS><<<nblk, LNB_WARPS * 32, smem, c->stream>>>(o, dout, inp, w, mean, rstd, N, C);
    return 0;
}

void cu_layernorm_bwd(void *ctx, float *dinp, void *dinp_act, float *dinp_colsum, float *dw, float *db,
                      const void *dout, int dout_act, const float *inp, const float *w, const float *mean,
                      const float *rstd, int64_t N, int C)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (!dinp)
        dinp_act = dinp_colsum = NULL; /* they describe the updated dinp */
    if (N <= 0 || C <= 0 || (!dinp && !dw && !db))
        return;
    const int64_t nblk = (N + LNB_ROWS - 1) / LNB_ROWS;
    LnBwdOut o = {dinp, (act_t *)dinp_act, NULL, NULL, NULL};
    if (dw || db) {
        o.pdw = (float *)cu_scratch(c, SCR_PART, (size_t)nblk * C * sizeof(float));
        o.pdb = (float *)cu_scratch(c, SCR_PART2, (size_t)nblk * C * sizeof(float));
        if (!o.pdw || !o.pdb)
            return;
    }
    if (dinp_colsum && !(o.pdx = (float *)cu_scratch(c, SCR_PART3, (size_t)nblk * C * sizeof(float))))
        return;
    if (nblk > INT32_MAX) {
        cu_fail(c, "layernorm_bwd: N = %lld too large", (long long)N);
        return;
    }
    const int vec = cu_aligned16(dinp) && (dout_act ? aligned8(dout) : cu_aligned16(dout)) && cu_aligned16(inp) &&
                    cu_aligned16(w) && (!dinp_act || aligned8(dinp_act));
    const int rc = dout_act ? ln_bwd_launch<act_t>(c, "layernorm_bwd", o, (unsigned)nblk, vec, (const act_t *)dout,
                                                   inp, w, mean, rstd, N, C)
                            : ln_bwd_launch<float>(c, "layernorm_bwd", o, (unsigned)nblk, vec, (const float *)dout,
                                                   inp, w, mean, rstd, N, C);
    if (rc != 0 || cu_launched(c, "layernorm_bwd") != 0)
        return;
    /* the blocks' partials summed over the blocks: one launch for dw, db and dinp's column sums */
    float *dst[3];
    const float *src[3];
    int acc[3], n = 0;
    if (dw)
        dst[n] = dw, src[n] = o.pdw, acc[n++] = 1;
    if (db)
        dst[n] = db, src[n] = o.pdb, acc[n++] = 1;
    if (dinp_colsum)
        dst[n] = dinp_colsum, src[n] = o.pdx, acc[n++] = 1;
    cu_colsums(c, n, dst, src, acc, nblk, C, "layernorm_bwd (column sums)");
}


/* RMSNorm's backward (the Llama block): the kernels above without the mean, dinp += and dinp_act
 * (the updated dinp as an operand buffer) in one pass, dw from the blocks' partial sums */
void cu_rmsnorm_bwd(void *ctx, float *dinp, void *dinp_act, float *dw, const void *dout, int dout_act,
                    const float *inp, const float *w, const float *rstd, int64_t N, int C)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (!dinp)
        dinp_act = NULL;
    if (N <= 0 || C <= 0 || (!dinp && !dw))
        return;
    const int64_t nblk = (N + LNB_ROWS - 1) / LNB_ROWS;
    if (nblk > INT32_MAX) {
        cu_fail(c, "rmsnorm_bwd: N = %lld too large", (long long)N);
        return;
    }
    LnBwdOut o = {dinp, (act_t *)dinp_act, NULL, NULL, NULL};
    if (dw && !(o.pdw = (float *)cu_scratch(c, SCR_PART, (size_t)nblk * C * sizeof(float))))
        return;
    const int vec = cu_aligned16(dinp) && (dout_act ? aligned8(dout) : cu_aligned16(dout)) && cu_aligned16(inp) &&
                    cu_aligned16(w) && (!dinp_act || aligned8(dinp_act));
    const int rc = dout_act ? ln_bwd_launch<act_t, true>(c, "rmsnorm_bwd", o, (unsigned)nblk, vec, (const act_t *)dout,
                                                        inp, w, NULL, rstd, N, C)
                            : ln_bwd_launch<float, true>(c, "rmsnorm_bwd", o, (unsigned)nblk, vec, (const float *)dout,
                                                        inp, w, NULL, rstd, N, C);
    if (rc != 0 || cu_launched(c, "rmsnorm_bwd") != 0 || !dw)
        return;
    const float *src = o.pdw;
    const int acc = 1;
    cu_colsums(c, 1, &dw, &src, &acc, nblk, C, "rmsnorm_bwd (dw sums)");
}
