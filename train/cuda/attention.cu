/* Causal self-attention of the CUDA backend, flash style (see ops_cpu.h for the layout: qkv rows
 * [q | k | v], head h at h * hs in each part; out (B, T, H * hs); lse (B, H, T)). No (T, T)
 * matrix ever reaches global memory: the forward keeps the output and the log-sum-exp per query
 * row; the backward recomputes the probabilities tile by tile from q, k and lse.
 *
 * Tiling: 64 queries x 64 keys per tile, 256 threads as a 16 x 16 grid; thread (ty, tx) owns rows
 * ty*4 .. ty*4+3 and columns tx*4 .. tx*4+3 of a score tile (4 x 4 registers), and the output dims
 * d = tx + 16 j of its 4 rows. A head is padded with zeros to HP (16, 32, 64 or 128) in shared
 * memory so that every loop runs over whole tiles. Operands whose rows a thread owns are stored
 * row-major (stride HP + 4), operands indexed by tx transposed ([HP][68]): all inner-loop reads
 * are float4 and free of bank conflicts (a quarter warp reads 8 consecutive float4, or one
 * broadcast address, or 8 rows 68 floats apart = 32 distinct banks).
 *
 * Backward without atomics (deterministic): a dK/dV kernel parallel over key tiles (each block
 * walks the query tiles at or below the diagonal) and a separate dQ kernel parallel over query
 * tiles; each element of dqkv is updated (+=) by exactly one thread, every sum in a fixed order.
 * The price is recomputing S and dP in both kernels (7 tile products instead of 5).
 *
 * MPS_CUDA_ATTENTION=bf16 switches the tile products to tensor cores (attention_tc.cu). By default
 * head size 64 takes the FlashAttention-2 style kernels of attention_fast.cu (bf16 mma.sync);
 * MPS_CUDA_ATTENTION=fp32 keeps these kernels for every head size. */
#include <math.h>

#include "cuda_internal.h"

#define AT_B 64        /* query and key tile */
#define AT_THREADS 256 /* 16 x 16 */
#define AT_PS 68       /* stride of 64-wide rows: 16-byte aligned, rows 4 banks apart */

/* rows [t0, t0 + 64) of one head's part (base: row 0 of that part, row stride ld), row-major into
 * dst[r * (HP + 4) + d]; zeros outside [0, T) x [0, hs) */
template <int HP>
__device__ __forceinline__ void load_rows(float *dst, const float *base, int64_t ld, int t0, int T, int hs)
{
    for (int idx = threadIdx.x; idx < AT_B * HP; idx += AT_THREADS) {
        int r = idx / HP, d = idx % HP, t = t0 + r;
        dst[r * (HP + 4) + d] = (t < T && d < hs) ? base[(int64_t)t * ld + d] : 0.0f;
    }
}

/* the same rows transposed: dst[d * AT_PS + r] */
template <int HP>
__device__ __forceinline__ void load_rows_t(float *dst, const float *base, int64_t ld, int t0, int T, int hs)
{
    for (int idx = threadIdx.x; idx < AT_B * HP; idx += AT_THREADS) {
        int r = idx / HP, d = idx % HP, t = t0 + r;
        dst[d * AT_PS + r] = (t < T && d < hs) ? base[(int64_t)t * ld + d] : 0.0f;
    }
}

__device__ __forceinline__ float comp(const float4 &v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

__device__ __forceinline__ float4 ld4s(const float *p) { return *reinterpret_cast<const float4 *>(p); }
__device__ __forceinline__ void st4s(float *p, float a, float b, float c, float d)
{
    *reinterpret_cast<float4 *>(p) = make_float4(a, b, c, d);
}

/* acc[i][j] += sum_d A[row i][d] * Bt[d][col j]: A row-major (stride HP + 4, rows ty*4 + i),
 * Bt transposed (stride AT_PS, columns tx*4 + j); d ascending */
template <int HP>
__device__ __forceinline__ void tile_abt(float (&acc)[4][4], const float *A, const float *Bt, int ty, int tx)
{
#pragma unroll 2
    for (int d = 0; d < HP; d += 4) {
        float4 a[4];
#pragma unroll
        for (int i = 0; i < 4; i++)
            a[i] = ld4s(A + (ty * 4 + i) * (HP + 4) + d);
#pragma unroll
        for (int dd = 0; dd < 4; dd++) {
            float4 bv = ld4s(Bt + (d + dd) * AT_PS + tx * 4);
#pragma unroll
            for (int i = 0; i < 4; i++) {
                float av = comp(a[i], dd);
                acc[i][0] += av * bv.x;
                acc[i][1] += av * bv.y;
                acc[i][2] += av * bv.z;
                acc[i][3] += av * bv.w;
            }
        }
    }
}

/* acc[i][jd] += sum_c P[row i][c] * Xt[d][c] over the 64 columns c of a tile, d = tx + 16 jd:
 * P (stride AT_PS, rows ty*4 + i), Xt transposed (stride AT_PS); c ascending */
template <int NJ>
__device__ __forceinline__ void tile_px(float (&acc)[4][NJ], const float *P, const float *Xt, int ty, int tx)
{
#pragma unroll 2
    for (int c = 0; c < AT_B; c += 4) {
        float4 p[4];
#pragma unroll
        for (int i = 0; i < 4; i++)
            p[i] = ld4s(P + (ty * 4 + i) * AT_PS + c);
#pragma unroll
        for (int jd = 0; jd < NJ; jd++) {
            float4 x = ld4s(Xt + (tx + 16 * jd) * AT_PS + c);
#pragma unroll
            for (int i = 0; i < 4; i++) {
                float a = acc[i][jd];
                a += p[i].x * x.x;
                a += p[i].y * x.y;
                a += p[i].z * x.z;
                a += p[i].w * x.w;
                acc[i][jd] = a;
            }
        }
    }
}

/* reductions over the 16 threads of a row (tx = lane & 15): xor butterflies give every lane the
 * same bits (a + b == b + a exactly) */
__device__ __forceinline__ float row16_max(float v)
{
    for (int o = 8; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float row16_sum(float v)
{
    for (int o = 8; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <int HP>
struct attn_smem {
    static constexpr int rows = AT_B * (HP + 4); /* a row-major 64 x HP tile */
    static constexpr int cols = HP * AT_PS;      /* a transposed tile */
    static constexpr int sq = AT_B * AT_PS;      /* a 64 x 64 score tile */
    static constexpr size_t fwd = sizeof(float) * (rows + 2 * cols + sq);
    static constexpr size_t dq = sizeof(float) * (2 * rows + 2 * cols + sq);
    static constexpr size_t dkv = sizeof(float) * (2 * rows + 2 * cols + 2 * sq + 2 * AT_B);
};

/* grid (query tiles, B * H); the last query tiles (most keys) are scheduled first */
template <int HP>
__global__ void __launch_bounds__(AT_THREADS) k_attn_fwd(float *out, float *lse, const float *qkv, int T, int H, int hs,
                                                         float scale)
{
    constexpr int NJ = HP / 16;
    extern __shared__ float4 smem4[];
    float *Qs = reinterpret_cast<float *>(smem4);  // [64][HP + 4]
    float *Kt = Qs + attn_smem<HP>::rows;          // [HP][68]
    float *Vt = Kt + attn_smem<HP>::cols;          // [HP][68]
    float *Ps = Vt + attn_smem<HP>::cols;          // [64][68]
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * AT_B;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    const int64_t Cl = (int64_t)H * hs, ld = 3 * Cl;
    const float *qb = qkv + (int64_t)b * T * ld + (int64_t)h * hs;  // q of (b, t = 0, h)
    load_rows<HP>(Qs, qb, ld, q0, T, hs);

    float o[4][NJ], m[4], l[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
#pragma unroll
        for (int jd = 0; jd < NJ; jd++)
            o[i][jd] = 0.0f;
    }
    for (int k0 = 0; k0 <= q0; k0 += AT_B) {  // key tiles up to the diagonal one (k0 == q0)
        __syncthreads();                      // the previous tile's readers are done
        load_rows_t<HP>(Kt, qb + Cl, ld, k0, T, hs);
        load_rows_t<HP>(Vt, qb + 2 * Cl, ld, k0, T, hs);
        __syncthreads();
        float s[4][4] = {};
        tile_abt<HP>(s, Qs, Kt, ty, tx);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int t = q0 + ty * 4 + i;
            float mx = -INFINITY;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int key = k0 + tx * 4 + j;
                s[i][j] = (key <= t && key < T) ? s[i][j] * scale : -INFINITY;
                mx = fmaxf(mx, s[i][j]);
            }
            /* key 0 is valid for every row and comes first: mn is finite from the first tile on */
            const float mn = fmaxf(m[i], row16_max(mx));
            const float corr = expf(m[i] - mn);  // 0 on the first tile (m = -inf)
            float ps = 0.0f;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                s[i][j] = expf(s[i][j] - mn);  // masked: exp(-inf) = 0
                ps += s[i][j];
            }
            l[i] = l[i] * corr + row16_sum(ps);
            m[i] = mn;
#pragma unroll
            for (int jd = 0; jd < NJ; jd++)
                o[i][jd] *= corr;
            st4s(Ps + (ty * 4 + i) * AT_PS + tx * 4, s[i][0], s[i][1], s[i][2], s[i][3]);
        }
        __syncthreads();
        tile_px<NJ>(o, Ps, Vt, ty, tx);
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int t = q0 + ty * 4 + i;
        if (t >= T)
            continue;
        const float inv = 1.0f / l[i];
        float *orow = out + ((int64_t)b * T + t) * Cl + (int64_t)h * hs;
#pragma unroll
        for (int jd = 0; jd < NJ; jd++) {
            const int d = tx + 16 * jd;
            if (d < hs)
                orow[d] = o[i][jd] * inv;
        }
        if (tx == 0)
            lse[(int64_t)bh * T + t] = m[i] + logf(l[i]);
    }
}

/* D (B, H, T) = dout . out per row: sum_s p_ts (dout_t . v_s), the softmax-backward term.
 * One warp per (b, t, h); rows of dout and out are hs contiguous floats at ((b*T + t)*H + h)*hs. */
__global__ void k_attn_D(float *Dv, const float *dout, const float *out, int64_t rows, int T, int H, int hs)
{
    const int lane = threadIdx.x & 31;
    const int64_t nw = ((int64_t)gridDim.x * blockDim.x) >> 5;
    for (int64_t w = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; w < rows; w += nw) {
        const float *g = dout + w * hs, *o = out + w * hs;
        float s = 0.0f;
        for (int d = lane; d < hs; d += 32)
            s += g[d] * o[d];
        for (int off = 16; off > 0; off >>= 1)
            s += __shfl_xor_sync(0xffffffffu, s, off);
        if (lane == 0) {
            const int64_t bt = w / H, h = w % H, b = bt / T, t = bt % T;
            Dv[(b * H + h) * T + t] = s;
        }
    }
}

/* dQ: grid (query tiles, B * H), the last query tiles first */
template <int HP>
__global__ void __launch_bounds__(AT_THREADS) k_attn_dq(float *dqkv, const float *dout, const float *qkv,
                                                        const float *lse, const float *Dv, int T, int H, int hs,
                                                        float scale)
{
    constexpr int NJ = HP / 16;
    extern __shared__ float4 smem4[];
    float *Qs = reinterpret_cast<float *>(smem4);  // [64][HP + 4]
    float *Gs = Qs + attn_smem<HP>::rows;          // dout [64][HP + 4]
    float *Kt = Gs + attn_smem<HP>::rows;          // [HP][68]
    float *Vt = Kt + attn_smem<HP>::cols;          // [HP][68]
    float *dS = Vt + attn_smem<HP>::cols;          // [64][68]
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * AT_B;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    const int64_t Cl = (int64_t)H * hs, ld = 3 * Cl;
    const float *qb = qkv + (int64_t)b * T * ld + (int64_t)h * hs;
    load_rows<HP>(Qs, qb, ld, q0, T, hs);
    load_rows<HP>(Gs, dout + (int64_t)b * T * Cl + (int64_t)h * hs, Cl, q0, T, hs);
    float lr[4], Dr[4], dq[4][NJ];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int t = q0 + ty * 4 + i;
        lr[i] = t < T ? lse[(int64_t)bh * T + t] : 0.0f;
        Dr[i] = t < T ? Dv[(int64_t)bh * T + t] : 0.0f;
#pragma unroll
        for (int jd = 0; jd < NJ; jd++)
            dq[i][jd] = 0.0f;
    }
    for (int k0 = 0; k0 <= q0; k0 += AT_B) {
        __syncthreads();
        load_rows_t<HP>(Kt, qb + Cl, ld, k0, T, hs);
        load_rows_t<HP>(Vt, qb + 2 * Cl, ld, k0, T, hs);
        __syncthreads();
        float s[4][4] = {}, dp[4][4] = {};
        tile_abt<HP>(s, Qs, Kt, ty, tx);
        tile_abt<HP>(dp, Gs, Vt, ty, tx);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int t = q0 + ty * 4 + i;
            float ds[4];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int key = k0 + tx * 4 + j;
                const float p = (key <= t && key < T) ? expf(s[i][j] * scale - lr[i]) : 0.0f;
                ds[j] = p * (dp[i][j] - Dr[i]);
            }
            st4s(dS + (ty * 4 + i) * AT_PS + tx * 4, ds[0], ds[1], ds[2], ds[3]);
        }
        __syncthreads();
        tile_px<NJ>(dq, dS, Kt, ty, tx);
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int t = q0 + ty * 4 + i;
        if (t >= T)
            continue;
        float *row = dqkv + ((int64_t)b * T + t) * ld + (int64_t)h * hs;
#pragma unroll
        for (int jd = 0; jd < NJ; jd++) {
            const int d = tx + 16 * jd;
            if (d < hs)
                row[d] += scale * dq[i][jd];
        }
    }
}

/* dK, dV: grid (key tiles, B * H); thread (ty, tx) owns keys ty*4 + i and dims tx + 16 j; the
 * score tiles are transposed (keys x queries) so that the same 4 x 4 register layout applies */
template <int HP>
__global__ void __launch_bounds__(AT_THREADS) k_attn_dkv(float *dqkv, const float *dout, const float *qkv,
                                                         const float *lse, const float *Dv, int T, int H, int hs,
                                                         float scale)
{
    constexpr int NJ = HP / 16;
    extern __shared__ float4 smem4[];
    float *Ks = reinterpret_cast<float *>(smem4);  // [64][HP + 4]
    float *Vs = Ks + attn_smem<HP>::rows;          // [64][HP + 4]
    float *Qt = Vs + attn_smem<HP>::rows;          // [HP][68]
    float *Gt = Qt + attn_smem<HP>::cols;          // dout [HP][68]
    float *Pt = Gt + attn_smem<HP>::cols;          // [64 keys][68]
    float *dSt = Pt + attn_smem<HP>::sq;           // [64 keys][68]
    float *ls = dSt + attn_smem<HP>::sq;           // lse of the query tile [64]
    float *Ds = ls + AT_B;                         // D of the query tile [64]
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const int k0 = blockIdx.x * AT_B;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    const int64_t Cl = (int64_t)H * hs, ld = 3 * Cl;
    const float *qb = qkv + (int64_t)b * T * ld + (int64_t)h * hs;
    const float *gb = dout + (int64_t)b * T * Cl + (int64_t)h * hs;
    load_rows<HP>(Ks, qb + Cl, ld, k0, T, hs);
    load_rows<HP>(Vs, qb + 2 * Cl, ld, k0, T, hs);
    float dk[4][NJ], dv[4][NJ];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int jd = 0; jd < NJ; jd++)
            dk[i][jd] = dv[i][jd] = 0.0f;
    for (int q0 = k0; q0 < T; q0 += AT_B) {  // query tiles from the diagonal one on
        __syncthreads();
        load_rows_t<HP>(Qt, qb, ld, q0, T, hs);
        load_rows_t<HP>(Gt, gb, Cl, q0, T, hs);
        if (threadIdx.x < AT_B) {
            const int t = q0 + threadIdx.x;
            ls[threadIdx.x] = t < T ? lse[(int64_t)bh * T + t] : 0.0f;
            Ds[threadIdx.x] = t < T ? Dv[(int64_t)bh * T + t] : 0.0f;
        }
        __syncthreads();
        float s[4][4] = {}, dp[4][4] = {};
        tile_abt<HP>(s, Ks, Qt, ty, tx);  // S^T: keys x queries
        tile_abt<HP>(dp, Vs, Gt, ty, tx); // dP^T
        const float4 l4 = ld4s(ls + tx * 4), D4 = ld4s(Ds + tx * 4);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int key = k0 + ty * 4 + i;
            float p[4], ds[4];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int t = q0 + tx * 4 + j;
                p[j] = (key <= t && t < T && key < T) ? expf(s[i][j] * scale - comp(l4, j)) : 0.0f;
                ds[j] = p[j] * (dp[i][j] - comp(D4, j));
            }
            st4s(Pt + (ty * 4 + i) * AT_PS + tx * 4, p[0], p[1], p[2], p[3]);
            st4s(dSt + (ty * 4 + i) * AT_PS + tx * 4, ds[0], ds[1], ds[2], ds[3]);
        }
        __syncthreads();
        tile_px<NJ>(dv, Pt, Gt, ty, tx);   // dV += P^T dO
        tile_px<NJ>(dk, dSt, Qt, ty, tx);  // dK += dS^T Q (scaled below)
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int key = k0 + ty * 4 + i;
        if (key >= T)
            continue;
        float *row = dqkv + ((int64_t)b * T + key) * ld + (int64_t)h * hs;
#pragma unroll
        for (int jd = 0; jd < NJ; jd++) {
            const int d = tx + 16 * jd;
            if (d < hs) {
                row[Cl + d] += scale * dk[i][jd];
                row[2 * Cl + d] += dv[i][jd];
            }
        }
    }
}

/* ---------------------------------------------------------------- launchers */

/* the padded head size of the kernels, 0 if hs is out of range */
static int attn_hp(int hs) { return hs <= 0 ? 0 : hs <= 16 ? 16 : hs <= 32 ? 32 : hs <= 64 ? 64 : hs <= 128 ? 128 : 0; }

static int attn_args_ok(mps_cuda *c, const char *what, int B, int T, int H, int hs)
{
    if (B <= 0 || T <= 0 || H <= 0)
        return 0;
    if (!attn_hp(hs)) {
        cu_fail(c, "%s: head size %d is not supported (1..128)", what, hs);
        return 0;
    }
    if ((int64_t)B * H > 65535) {
        cu_fail(c, "%s: B * H = %lld exceeds 65535", what, (long long)B * H);
        return 0;
    }
    return 1;
}

template <class K>
static int smem_setup(mps_cuda *c, K kernel, size_t smem, const char *what)
{
    if ((int64_t)smem > c->smem_optin) {
        cu_fail(c, "%s: needs %zu bytes of shared memory, the device allows %d", what, smem, c->smem_optin);
        return -1;
    }
    if (cu_check(c, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem), what) != 0)
        return -1;
    return 0;
}

template <int HP>
static void attn_fwd_hp(mps_cuda *c, float *out, float *lse, const float *qkv, int B, int T, int H, int hs)
{
    const size_t smem = attn_smem<HP>::fwd;
    dim3 grid((unsigned)((T + AT_B - 1) / AT_B), (unsigned)(B * H));
    if (smem_setup(c, k_attn_fwd<HP>, smem, "attention_fwd") != 0)
        return;
    k_attn_fwd<HP><<<grid, AT_THREADS, smem, c->stream>>>(out, lse, qkv, T, H, hs, 1.0f / sqrtf((float)hs));
    cu_launched(c, "attention_fwd");
}

template <int HP>
static void attn_bwd_hp(mps_cuda *c, float *dqkv, const float *dout, const float *qkv, const float *lse,
                        const float *Dv, int B, int T, int H, int hs)
{
    const float scale = 1.0f / sqrtf((float)hs);
    dim3 grid((unsigned)((T + AT_B - 1) / AT_B), (unsigned)(B * H));
    if (smem_setup(c, k_attn_dkv<HP>, attn_smem<HP>::dkv, "attention_bwd (dk, dv)") == 0) {
        k_attn_dkv<HP><<<grid, AT_THREADS, attn_smem<HP>::dkv, c->stream>>>(dqkv, dout, qkv, lse, Dv, T, H, hs, scale);
        cu_launched(c, "attention_bwd (dk, dv)");
    }
    if (smem_setup(c, k_attn_dq<HP>, attn_smem<HP>::dq, "attention_bwd (dq)") == 0) {
        k_attn_dq<HP><<<grid, AT_THREADS, attn_smem<HP>::dq, c->stream>>>(dqkv, dout, qkv, lse, Dv, T, H, hs, scale);
        cu_launched(c, "attention_bwd (dq)");
    }
}

/* tensor-core variants (attention_tc.cu); 0 when they took the call */
int cu_attention_fwd_tc(mps_cuda *c, float *out, float *lse, const float *qkv, int B, int T, int H, int hs);
int cu_attention_bwd_tc(mps_cuda *c, float *dqkv, const float *dout, const float *qkv, const float *lse,
                        const float *Dv, int B, int T, int H, int hs);

/* The fp32 kernels (and attention_tc.cu) read and write fp32: qkv (and the backward's out and
 * dout) are widened into scratch buffers, their output goes through another and is rounded into
 * the operand buffer after. */
static const float *qkv_fp32(mps_cuda *c, const void *qkv_act, int64_t n, const char *what)
{
    float *q = (float *)cu_scratch(c, SCR_ATT_QKV, (size_t)n * sizeof(float)); // (B, T, 3 Cl)
    if (!q || cu_from_act(c, q, (const act_t *)qkv_act, n, what) != 0)
        return NULL;
    return q;
}

void cu_attention_fwd(void *ctx, void *out_act, float *lse, const void *qkv_act, int B, int T, int H, int hs)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (!attn_args_ok(c, "attention_fwd", B, T, H, hs))
        return;
    if ((c->attn_mode == MPS_ATTN_FAST || c->attn_mode == MPS_ATTN_MMA) &&
        cu_attention_fwd_fast(c, (act_t *)out_act, lse, (const act_t *)qkv_act, B, T, H, hs) == 0)
        return;
    const int64_t n = (int64_t)B * T * H * hs;
    float *out = (float *)cu_scratch(c, SCR_ATT_OUT, (size_t)n * sizeof(float)); // (B, T, Cl)
    const float *qkv = out ? qkv_fp32(c, qkv_act, 3 * n, "attention_fwd (qkv to fp32)") : NULL;
    if (!qkv)
        return;
    if (!(c->attn_mode == MPS_ATTN_BF16 && cu_attention_fwd_tc(c, out, lse, qkv, B, T, H, hs) == 0)) {
        switch (attn_hp(hs)) {
        case 16: attn_fwd_hp<16>(c, out, lse, qkv, B, T, H, hs); break;
        case 32: attn_fwd_hp<32>(c, out, lse, qkv, B, T, H, hs); break;
        case 64: attn_fwd_hp<64>(c, out, lse, qkv, B, T, H, hs); break;
        default: attn_fwd_hp<128>(c, out, lse, qkv, B, T, H, hs); break;
        }
    }
    cu_to_act(c, (act_t *)out_act, out, n, "attention_fwd (to operand)");
}

/* dbias (3 H hs) += the column sums of dqkv: from the wgmma kernels' per-block sums (colpart, B *
 * ceil(T / 64) rows) when they wrote them, else from dqkv itself */
void cu_attention_bwd(void *ctx, void *dqkv_act, const void *dout_act, const void *qkv_act, const void *out_act,
                      const float *lse, int B, int T, int H, int hs, float *dbias)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (!dqkv_act || !attn_args_ok(c, "attention_bwd", B, T, H, hs))
        return;
    const int64_t rows = (int64_t)B * T * H, n = rows * hs;
    float *Dv = (float *)cu_scratch(c, SCR_ATTN, (size_t)rows * sizeof(float));  // (B, H, T)
    if (!Dv)
        return;
    /* the fast kernels compute D themselves */
    if (c->attn_mode == MPS_ATTN_FAST || c->attn_mode == MPS_ATTN_MMA) {
        const int64_t blocks = (int64_t)B * ((T + 63) / 64);
        float *colpart = NULL; // (B, T / 64, 3 H hs)
        if (dbias && c->wgmma && hs == 64 &&
            !(colpart = (float *)cu_scratch(c, SCR_ATT_COLS, (size_t)blocks * 3 * H * hs * sizeof(float))))
            return;
        const int r = cu_attention_bwd_fast(c, (act_t *)dqkv_act, (const act_t *)dout_act, (const act_t *)qkv_act,
                                            (const act_t *)out_act, lse, Dv, B, T, H, hs, colpart);
        if (r == 1) { /* a few hundred rows: the short-array column sums */
            const int one = 1;
            const float *src = colpart;
            cu_colsums(c, 1, &dbias, &src, &one, blocks, 3 * H * hs, "attention_bwd (dbias)");
        }
        else if (r == 0 && dbias)
            cu_colsum_acc_act(c, dbias, (const act_t *)dqkv_act, (int64_t)B * T, 3 * H * hs, "attention_bwd (dbias)");
        if (r >= 0)
            return;
    }
    float *out = (float *)cu_scratch(c, SCR_ATT_OUT, (size_t)n * sizeof(float));        // (B, T, Cl)
    float *dout = (float *)cu_scratch(c, SCR_ATT_DOUT, (size_t)n * sizeof(float));      // (B, T, Cl)
    float *dqkv = (float *)cu_scratch(c, SCR_ATT_DQKV, (size_t)3 * n * sizeof(float));  // (B, T, 3 Cl)
    const float *qkv = out && dout && dqkv ? qkv_fp32(c, qkv_act, 3 * n, "attention_bwd (qkv to fp32)") : NULL;
    if (!qkv || cu_from_act(c, out, (const act_t *)out_act, n, "attention_bwd (out to fp32)") != 0 ||
        cu_from_act(c, dout, (const act_t *)dout_act, n, "attention_bwd (dout to fp32)") != 0 ||
        cu_check(c, cudaMemsetAsync(dqkv, 0, (size_t)3 * n * sizeof(float), c->stream), "attention_bwd") != 0)
        return;
    k_attn_D<<<cu_grid(c, rows * 32, 256), 256, 0, c->stream>>>(Dv, dout, out, rows, T, H, hs);
    if (cu_launched(c, "attention_bwd (D)") != 0)
        return;
    if (!(c->attn_mode == MPS_ATTN_BF16 && cu_attention_bwd_tc(c, dqkv, dout, qkv, lse, Dv, B, T, H, hs) == 0)) {
        switch (attn_hp(hs)) {
        case 16: attn_bwd_hp<16>(c, dqkv, dout, qkv, lse, Dv, B, T, H, hs); break;
        case 32: attn_bwd_hp<32>(c, dqkv, dout, qkv, lse, Dv, B, T, H, hs); break;
        case 64: attn_bwd_hp<64>(c, dqkv, dout, qkv, lse, Dv, B, T, H, hs); break;
        default: attn_bwd_hp<128>(c, dqkv, dout, qkv, lse, Dv, B, T, H, hs); break;
        }
    }
    cu_to_act(c, (act_t *)dqkv_act, dqkv, 3 * n, "attention_bwd (to operand)");
    if (dbias)
        cu_colsum_acc(c, dbias, dqkv, (int64_t)B * T, 3 * H * hs, "attention_bwd (dbias)");
}
