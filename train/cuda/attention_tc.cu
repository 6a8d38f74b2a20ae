/* Causal attention with its tile products on tensor cores (MPS_CUDA_ATTENTION=bf16): the same
 * flash decomposition as attention.cu (forward with online softmax, backward as a dK/dV kernel
 * over key tiles plus a dQ kernel over query tiles, no atomics), but Q, K, V, dO and the
 * probabilities P / dS enter the products as bf16 (WMMA 16x16x16, fp32 accumulation), as
 * FlashAttention does; the softmax, lse, D and every sum stay fp32. For head sizes up to 64;
 * larger heads run the fp32 kernels.
 *
 * Tiles of 64 x 64, 4 warps; warp w owns rows w*16 .. w*16+15 of the row side (queries, or keys in
 * dK/dV). A warp's score tile goes to shared memory (fp32); two lanes per row then apply the
 * mask and softmax over 32 columns each (columns visited in a lane-rotated order so that the 32
 * lanes hit 32 banks) and write P or dS as bf16 for the next product. */
#include <math.h>
#include <mma.h>

#include "cuda_internal.h"

using namespace nvcuda;

#define TC_B 64
#define TC_THREADS 128 /* 4 warps x 16 rows */
#define TC_SP 68       /* fp32 score-tile stride (multiple of 4 for WMMA, rows 4 banks apart) */
#define TC_PP 72       /* bf16 P / dS tile stride (multiple of 8, rows 4 banks apart) */

typedef __nv_bfloat16 bf16;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> frag_a;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> frag_bt; /* B = X^T, X rows [n][k] */
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> frag_b;  /* B = X, X rows [k][n] */
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> frag_c;

template <int HP>
struct tc_smem {
    static constexpr int LD = HP + 8;                                   /* bf16 stride of a 64 x HP tile */
    static constexpr size_t tile = sizeof(bf16) * TC_B * LD;            /* bytes, multiple of 32 */
    static constexpr size_t sc = sizeof(float) * TC_B * TC_SP;          /* fp32 64 x 64 tile */
    static constexpr size_t pb = sizeof(bf16) * TC_B * TC_PP;           /* bf16 64 x 64 tile */
    static constexpr size_t fwd = 3 * tile + 2 * sc + pb;
    static constexpr size_t dq = 4 * tile + 2 * sc + pb;
    static constexpr size_t dkv = 4 * tile + 2 * sc + 2 * pb + 2 * sizeof(float) * TC_B;
};

/* rows [t0, t0 + 64) of one head's part to bf16 dst[r * (HP + 8) + d], zeros outside [0, T) x [0, hs) */
template <int HP>
__device__ __forceinline__ void tc_load(bf16 *dst, const float *base, int64_t ld, int t0, int T, int hs)
{
    for (int idx = threadIdx.x; idx < TC_B * HP; idx += TC_THREADS) {
        const int r = idx / HP, d = idx % HP, t = t0 + r;
        dst[r * (HP + 8) + d] = __float2bfloat16_rn((t < T && d < hs) ? base[(int64_t)t * ld + d] : 0.0f);
    }
}

/* C (16 x 64 fp32, stride TC_SP) = A (16 rows x HP, bf16 stride HP + 8) . X^T, X 64 rows x HP */
template <int HP>
__device__ __forceinline__ void mm_abt(float *C, const bf16 *A, const bf16 *X)
{
    constexpr int LD = HP + 8;
#pragma unroll
    for (int n = 0; n < 4; n++) {
        frag_c acc;
        wmma::fill_fragment(acc, 0.0f);
#pragma unroll
        for (int k = 0; k < HP / 16; k++) {
            frag_a a;
            frag_bt b;
            wmma::load_matrix_sync(a, A + k * 16, LD);
            wmma::load_matrix_sync(b, X + n * 16 * LD + k * 16, LD);
            wmma::mma_sync(acc, a, b, acc);
        }
        wmma::store_matrix_sync(C + n * 16, acc, TC_SP, wmma::mem_row_major);
    }
}

/* acc (16 x HP as HP/16 fragments) += P (16 x 64 bf16, stride TC_PP) . Y (64 rows x HP, stride HP + 8) */
template <int HP>
__device__ __forceinline__ void mm_py(frag_c (&acc)[HP / 16], const bf16 *P, const bf16 *Y)
{
    constexpr int LD = HP + 8;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        frag_a a;
        wmma::load_matrix_sync(a, P + k * 16, TC_PP);
#pragma unroll
        for (int j = 0; j < HP / 16; j++) {
            frag_b b;
            wmma::load_matrix_sync(b, Y + k * 16 * LD + j * 16, LD);
            wmma::mma_sync(acc[j], a, b, acc[j]);
        }
    }
}

/* dst[d] += f * acc[d] for the lane's row r of the warp's 16 x HP fragments, columns d = 2 jj + half
 * below hs (dst NULL: the lane only takes part in the warp-wide staging); staged through the
 * warp's own fp32 tile W (stride TC_SP, HP <= 64 columns) */
template <int HP>
__device__ __forceinline__ void tc_add_rows(float *dst, float *W, frag_c (&acc)[HP / 16], float f, int hs, int r,
                                            int half)
{
    __syncwarp();  // earlier readers of W are done
#pragma unroll
    for (int j = 0; j < HP / 16; j++)
        wmma::store_matrix_sync(W + j * 16, acc[j], TC_SP, wmma::mem_row_major);
    __syncwarp();
    if (dst)
        for (int jj = 0; jj < HP / 2; jj++) {
            const int d = 2 * jj + half;
            if (d < hs)
                dst[d] += f * W[r * TC_SP + d];
        }
}

/* forward: grid (query tiles, B * H), the last query tiles first */
template <int HP>
__global__ void __launch_bounds__(TC_THREADS) k_tc_fwd(float *out, float *lse, const float *qkv, int T, int H, int hs,
                                                       float scale)
{
    constexpr int LD = HP + 8, NH = HP / 2;
    extern __shared__ __align__(128) unsigned char tc_sm[];
    bf16 *Qb = reinterpret_cast<bf16 *>(tc_sm), *Kb = Qb + TC_B * LD, *Vb = Kb + TC_B * LD;
    float *S = reinterpret_cast<float *>(Vb + TC_B * LD);  // [64][TC_SP]
    float *Os = S + TC_B * TC_SP;                           // [64][HP + 4] (P.V of the tile)
    bf16 *Pb = reinterpret_cast<bf16 *>(Os + TC_B * TC_SP); // [64][TC_PP]
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int r = lane >> 1, half = lane & 1, rot = (r >> 3) + 2 * half;  // lane's row and columns
    const int q0 = (gridDim.x - 1 - blockIdx.x) * TC_B;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    const int64_t Cl = (int64_t)H * hs, ld = 3 * Cl;
    const float *qb = qkv + (int64_t)b * T * ld + (int64_t)h * hs;
    tc_load<HP>(Qb, qb, ld, q0, T, hs);
    const int t = q0 + w * 16 + r;
    float *Sw = S + w * 16 * TC_SP, *Ow = Os + w * 16 * (HP + 4);
    bf16 *Pw = Pb + w * 16 * TC_PP;
    float o[NH], m = -INFINITY, l = 0.0f;
#pragma unroll
    for (int jj = 0; jj < NH; jj++)
        o[jj] = 0.0f;
    for (int k0 = 0; k0 <= q0; k0 += TC_B) {
        __syncthreads();
        tc_load<HP>(Kb, qb + Cl, ld, k0, T, hs);
        tc_load<HP>(Vb, qb + 2 * Cl, ld, k0, T, hs);
        __syncthreads();
        mm_abt<HP>(Sw, Qb + w * 16 * LD, Kb);
        __syncwarp();
        const float *srow = Sw + r * TC_SP + half * 32;
        float mx = -INFINITY;
        for (int j = 0; j < 32; j++) {
            const int cj = (j + rot) & 31, key = k0 + half * 32 + cj;
            if (key <= t && key < T)
                mx = fmaxf(mx, srow[cj] * scale);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        const float mn = fmaxf(m, mx);  // finite: key 0 is valid for every row, in the first tile
        const float corr = expf(m - mn);
        float ps = 0.0f;
        bf16 *prow = Pw + r * TC_PP + half * 32;
        for (int j = 0; j < 32; j++) {
            const int cj = (j + rot) & 31, key = k0 + half * 32 + cj;
            const float p = (key <= t && key < T) ? expf(srow[cj] * scale - mn) : 0.0f;
            ps += p;
            prow[cj] = __float2bfloat16_rn(p);
        }
        ps += __shfl_xor_sync(0xffffffffu, ps, 1);
        l = l * corr + ps;
        m = mn;
        __syncwarp();
        frag_c pv[HP / 16];
#pragma unroll
        for (int j = 0; j < HP / 16; j++)
            wmma::fill_fragment(pv[j], 0.0f);
        mm_py<HP>(pv, Pw, Vb);
#pragma unroll
        for (int j = 0; j < HP / 16; j++)
            wmma::store_matrix_sync(Ow + j * 16, pv[j], HP + 4, wmma::mem_row_major);
        __syncwarp();
#pragma unroll
        for (int jj = 0; jj < NH; jj++)
            o[jj] = o[jj] * corr + Ow[r * (HP + 4) + 2 * jj + half];
    }
    if (t < T) {
        const float inv = 1.0f / l;
        float *orow = out + ((int64_t)b * T + t) * Cl + (int64_t)h * hs;
#pragma unroll
        for (int jj = 0; jj < NH; jj++) {
            const int d = 2 * jj + half;
            if (d < hs)
                orow[d] = o[jj] * inv;
        }
        if (half == 0)
            lse[(int64_t)bh * T + t] = m + logf(l);
    }
}

/* dQ: grid (query tiles, B * H) */
template <int HP>
__global__ void __launch_bounds__(TC_THREADS) k_tc_dq(float *dqkv, const float *dout, const float *qkv,
                                                      const float *lse, const float *Dv, int T, int H, int hs,
                                                      float scale)
{
    constexpr int LD = HP + 8;
    extern __shared__ __align__(128) unsigned char tc_sm[];
    bf16 *Qb = reinterpret_cast<bf16 *>(tc_sm), *Gb = Qb + TC_B * LD, *Kb = Gb + TC_B * LD, *Vb = Kb + TC_B * LD;
    float *S = reinterpret_cast<float *>(Vb + TC_B * LD);   // [64][TC_SP]
    float *dP = S + TC_B * TC_SP;                            // [64][TC_SP]
    bf16 *dSb = reinterpret_cast<bf16 *>(dP + TC_B * TC_SP); // [64][TC_PP]
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int r = lane >> 1, half = lane & 1, rot = (r >> 3) + 2 * half;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * TC_B;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    const int64_t Cl = (int64_t)H * hs, ld = 3 * Cl;
    const float *qb = qkv + (int64_t)b * T * ld + (int64_t)h * hs;
    tc_load<HP>(Qb, qb, ld, q0, T, hs);
    tc_load<HP>(Gb, dout + (int64_t)b * T * Cl + (int64_t)h * hs, Cl, q0, T, hs);
    const int t = q0 + w * 16 + r;
    const float lr = t < T ? lse[(int64_t)bh * T + t] : 0.0f, Dr = t < T ? Dv[(int64_t)bh * T + t] : 0.0f;
    float *Sw = S + w * 16 * TC_SP, *dPw = dP + w * 16 * TC_SP;
    bf16 *dSw = dSb + w * 16 * TC_PP;
    frag_c dq[HP / 16];
#pragma unroll
    for (int j = 0; j < HP / 16; j++)
        wmma::fill_fragment(dq[j], 0.0f);
    for (int k0 = 0; k0 <= q0; k0 += TC_B) {
        __syncthreads();
        tc_load<HP>(Kb, qb + Cl, ld, k0, T, hs);
        tc_load<HP>(Vb, qb + 2 * Cl, ld, k0, T, hs);
        __syncthreads();
        mm_abt<HP>(Sw, Qb + w * 16 * LD, Kb);
        mm_abt<HP>(dPw, Gb + w * 16 * LD, Vb);
        __syncwarp();
        const float *srow = Sw + r * TC_SP + half * 32, *prow = dPw + r * TC_SP + half * 32;
        bf16 *drow = dSw + r * TC_PP + half * 32;
        for (int j = 0; j < 32; j++) {
            const int cj = (j + rot) & 31, key = k0 + half * 32 + cj;
            const float p = (key <= t && key < T) ? expf(srow[cj] * scale - lr) : 0.0f;
            drow[cj] = __float2bfloat16_rn(p * (prow[cj] - Dr));
        }
        __syncwarp();
        mm_py<HP>(dq, dSw, Kb);  // dQ += dS K
    }
    /* the warp's rows through its own score tile, then += scale * dq (HP <= 64 columns fit) */
    tc_add_rows<HP>(t < T ? dqkv + ((int64_t)b * T + t) * ld + (int64_t)h * hs : NULL, Sw, dq, scale, hs, r, half);
}

/* dK, dV: grid (key tiles, B * H); warp w owns keys k0 + w*16 .. +15; transposed score tiles */
template <int HP>
__global__ void __launch_bounds__(TC_THREADS) k_tc_dkv(float *dqkv, const float *dout, const float *qkv,
                                                       const float *lse, const float *Dv, int T, int H, int hs,
                                                       float scale)
{
    constexpr int LD = HP + 8;
    extern __shared__ __align__(128) unsigned char tc_sm[];
    bf16 *Kb = reinterpret_cast<bf16 *>(tc_sm), *Vb = Kb + TC_B * LD, *Qb = Vb + TC_B * LD, *Gb = Qb + TC_B * LD;
    float *St = reinterpret_cast<float *>(Gb + TC_B * LD);  // S^T [64 keys][TC_SP]
    float *dPt = St + TC_B * TC_SP;                          // dP^T
    bf16 *Pt = reinterpret_cast<bf16 *>(dPt + TC_B * TC_SP); // P^T [64 keys][TC_PP]
    bf16 *dSt = Pt + TC_B * TC_PP;                           // dS^T
    float *ls = reinterpret_cast<float *>(dSt + TC_B * TC_PP), *Ds = ls + TC_B;  // of the query tile
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int r = lane >> 1, half = lane & 1, rot = (r >> 3) + 2 * half;
    const int k0 = blockIdx.x * TC_B;
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    const int64_t Cl = (int64_t)H * hs, ld = 3 * Cl;
    const float *qb = qkv + (int64_t)b * T * ld + (int64_t)h * hs;
    const float *gb = dout + (int64_t)b * T * Cl + (int64_t)h * hs;
    tc_load<HP>(Kb, qb + Cl, ld, k0, T, hs);
    tc_load<HP>(Vb, qb + 2 * Cl, ld, k0, T, hs);
    const int key = k0 + w * 16 + r;
    float *Sw = St + w * 16 * TC_SP, *dPw = dPt + w * 16 * TC_SP;
    bf16 *Pw = Pt + w * 16 * TC_PP, *dSw = dSt + w * 16 * TC_PP;
    frag_c dk[HP / 16], dv[HP / 16];
#pragma unroll
    for (int j = 0; j < HP / 16; j++) {
        wmma::fill_fragment(dk[j], 0.0f);
        wmma::fill_fragment(dv[j], 0.0f);
    }
    for (int q0 = k0; q0 < T; q0 += TC_B) {
        __syncthreads();
        tc_load<HP>(Qb, qb, ld, q0, T, hs);
        tc_load<HP>(Gb, gb, Cl, q0, T, hs);
        if (threadIdx.x < TC_B) {
            const int tq = q0 + threadIdx.x;
            ls[threadIdx.x] = tq < T ? lse[(int64_t)bh * T + tq] : 0.0f;
            Ds[threadIdx.x] = tq < T ? Dv[(int64_t)bh * T + tq] : 0.0f;
        }
        __syncthreads();
        mm_abt<HP>(Sw, Kb + w * 16 * LD, Qb);   // S^T = K Q^T
        mm_abt<HP>(dPw, Vb + w * 16 * LD, Gb);  // dP^T = V dO^T
        __syncwarp();
        const float *srow = Sw + r * TC_SP + half * 32, *prow = dPw + r * TC_SP + half * 32;
        bf16 *pr = Pw + r * TC_PP + half * 32, *dr = dSw + r * TC_PP + half * 32;
        for (int j = 0; j < 32; j++) {
            const int cj = (j + rot) & 31, c = half * 32 + cj, tq = q0 + c;
            const float p = (key <= tq && tq < T && key < T) ? expf(srow[cj] * scale - ls[c]) : 0.0f;
            pr[cj] = __float2bfloat16_rn(p);
            dr[cj] = __float2bfloat16_rn(p * (prow[cj] - Ds[c]));
        }
        __syncwarp();
        mm_py<HP>(dv, Pw, Gb);   // dV += P^T dO
        mm_py<HP>(dk, dSw, Qb);  // dK += dS^T Q
    }
    /* through the warp's own score tile: dK (scaled), then dV */
    /* (called by every lane: the WMMA stores inside are warp-collective) */
    float *row = key < T ? dqkv + ((int64_t)b * T + key) * ld + (int64_t)h * hs : NULL;
    tc_add_rows<HP>(row ? row + Cl : NULL, Sw, dk, scale, hs, r, half);
    tc_add_rows<HP>(row ? row + 2 * Cl : NULL, Sw, dv, 1.0f, hs, r, half);
}

/* ---------------------------------------------------------------- launchers */

template <class K>
static int tc_smem_setup(mps_cuda *c, K kernel, size_t smem, const char *what)
{
    if ((int64_t)smem > c->smem_optin) {
        cu_fail(c, "%s: needs %zu bytes of shared memory, the device allows %d", what, smem, c->smem_optin);
        return -1;
    }
    return cu_check(c, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem), what);
}

static int tc_hp(int hs) { return hs <= 16 ? 16 : hs <= 32 ? 32 : hs <= 64 ? 64 : 0; }

template <int HP>
static void tc_fwd(mps_cuda *c, float *out, float *lse, const float *qkv, int B, int T, int H, int hs)
{
    dim3 grid((unsigned)((T + TC_B - 1) / TC_B), (unsigned)(B * H));
    if (tc_smem_setup(c, k_tc_fwd<HP>, tc_smem<HP>::fwd, "attention_fwd (bf16)") != 0)
        return;
    k_tc_fwd<HP><<<grid, TC_THREADS, tc_smem<HP>::fwd, c->stream>>>(out, lse, qkv, T, H, hs, 1.0f / sqrtf((float)hs));
    cu_launched(c, "attention_fwd (bf16)");
}

template <int HP>
static void tc_bwd(mps_cuda *c, float *dqkv, const float *dout, const float *qkv, const float *lse, const float *Dv,
                   int B, int T, int H, int hs)
{
    const float scale = 1.0f / sqrtf((float)hs);
    dim3 grid((unsigned)((T + TC_B - 1) / TC_B), (unsigned)(B * H));
    if (tc_smem_setup(c, k_tc_dkv<HP>, tc_smem<HP>::dkv, "attention_bwd (bf16 dk, dv)") == 0) {
        k_tc_dkv<HP><<<grid, TC_THREADS, tc_smem<HP>::dkv, c->stream>>>(dqkv, dout, qkv, lse, Dv, T, H, hs, scale);
        cu_launched(c, "attention_bwd (bf16 dk, dv)");
    }
    if (tc_smem_setup(c, k_tc_dq<HP>, tc_smem<HP>::dq, "attention_bwd (bf16 dq)") == 0) {
        k_tc_dq<HP><<<grid, TC_THREADS, tc_smem<HP>::dq, c->stream>>>(dqkv, dout, qkv, lse, Dv, T, H, hs, scale);
        cu_launched(c, "attention_bwd (bf16 dq)");
    }
}

int cu_attention_fwd_tc(mps_cuda *c, float *out, float *lse, const float *qkv, int B, int T, int H, int hs)
{
    switch (tc_hp(hs)) {
    case 16: tc_fwd<16>(c, out, lse, qkv, B, T, H, hs); return 0;
    case 32: tc_fwd<32>(c, out, lse, qkv, B, T, H, hs); return 0;
    case 64: tc_fwd<64>(c, out, lse, qkv, B, T, H, hs); return 0;
    default: return -1;  // fp32 kernels
    }
}

int cu_attention_bwd_tc(mps_cuda *c, float *dqkv, const float *dout, const float *qkv, const float *lse,
                        const float *Dv, int B, int T, int H, int hs)
{
    switch (tc_hp(hs)) {
    case 16: tc_bwd<16>(c, dqkv, dout, qkv, lse, Dv, B, T, H, hs); return 0;
    case 32: tc_bwd<32>(c, dqkv, dout, qkv, lse, Dv, B, T, H, hs); return 0;
    case 64: tc_bwd<64>(c, dqkv, dout, qkv, lse, Dv, B, T, H, hs); return 0;
    default: return -1;
    }
}
