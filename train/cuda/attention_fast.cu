/* Causal self-attention for head size 64 on tensor cores, FlashAttention-2 style: the default path
 * of the CUDA backend for hs == 64 (MPS_CUDA_ATTENTION=fp32 or bf16 selects the older kernels of
 * attention.cu / attention_tc.cu instead). Layout as in ops_cpu.h: qkv (B, T, 3 * Cl) with rows
 * [q | k | v], head h at h * 64 of each part; out (B, T, Cl); lse (B, H, T); Cl = H * 64.
 *
 * Precision: q, k, v, dout and the probabilities P / dS enter the products as bf16 (qkv, out,
 * dout and dqkv are operand buffers, backend.h: bf16 in memory, copied into shared memory as they
 * are), every product accumulates in fp32 (mma.sync m16n8k16 bf16 -> f32), and the softmax, lse,
 * D and all sums stay fp32. The forward rounds out once, D reads it back, and the backward writes
 * (overwrites) dqkv rounded to bf16.
 *
 * Tiling (all three kernels): a CTA of 4 warps owns 128 rows (32 per warp, two m16 tiles: queries
 * in the forward and the dQ kernel, keys in the dK/dV kernel) and streams tiles of 64 rows of the
 * other side through shared memory, double-buffered: while tile j is computed from one buffer,
 * tile j + 1 arrives by cp.async in the other, so one __syncthreads per tile suffices. Fragments
 * are read with ldmatrix (non-transposed for Q K^T-like products, transposed for P V-like ones);
 * each fragment of the streamed tile feeds both m tiles of the warp, which halves the
 * shared-memory reads per product against 16 rows per warp (those kernels were bound by them:
 * ncu showed the shared-memory pipe 66% busy, the tensor pipe 36%). The forward keeps Q's
 * fragments in registers; the backward kernels re-read their own rows' fragments to stay within
 * 255 registers (two CTAs, 8 warps, per SM). Score tiles stay in registers: the accumulator layout
 * of two adjacent n8 tiles is the A-fragment layout of one k16 step, so P (or dS) goes to the next
 * product without shared memory. Shared-memory rows are 72 bf16 (144 bytes) apart: the 8 row
 * addresses of an ldmatrix phase land 4 banks apart, free of conflicts.
 *
 * Measured on an H200 (B 8, T 1024, H 12; the test's bench): forward 0.062 ms (207 TFLOP/s),
 * backward 0.195 ms (165 TFLOP/s); with 16 rows per warp and 8 warps per CTA they were 0.065 and
 * 0.222 ms, and the 124M training step 2% slower.
 *
 * Causality: key tiles above the diagonal are never visited; a warp skips a tile that lies
 * entirely above its 32 rows, and applies the mask to an m16 tile only when the tile crosses it.
 *
 * Backward without atomics (deterministic: every element of dqkv is updated by one thread, every
 * sum in a fixed order): a dK/dV kernel per 128 keys loops over the query tiles at or below the
 * diagonal, and a dQ kernel per 128 queries loops over the key tiles up to the diagonal (S and
 * dP are computed in both). D = rowsum(dout * out) is computed by the dQ kernel, which runs first. */
#include "attention_common.cuh"

namespace {

constexpr int FD = 64;           /* head size */
constexpr int FLD = FD + 8;      /* bf16 stride of a shared-memory row (144 bytes) */
constexpr int FROWS = 128;       /* rows owned by a CTA */
constexpr int FTILE = 64;        /* rows of a streamed tile */
constexpr int FTHREADS = 128;    /* 4 warps x 32 rows (two m16 tiles) */
/* groups of 16 keys whose S and dP the dQ kernel computes per read of its rows' fragments (2
 * halves those reads) */
constexpr int NPG_DQ = 2;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

/* shared memory of each kernel (bytes) */
constexpr size_t FSM_TILE = sizeof(bf16) * FTILE * FLD;  /* one 64-row tile */
constexpr size_t FSM_ROWS = sizeof(bf16) * FROWS * FLD;  /* the 128 owned rows */
constexpr size_t FSM_FWD = FSM_ROWS + 4 * FSM_TILE; /* Q; K, V double-buffered */
constexpr size_t FSM_DQ = 2 * FSM_ROWS + 4 * FSM_TILE + sizeof(float) * FROWS; /* Q, dO; K, V; D */
constexpr size_t FSM_DKV = 2 * FSM_ROWS + 4 * FSM_TILE + 6 * sizeof(float) * FTILE; /* + lse, D */

/* ---------------------------------------------------------------- warp-level primitives */

/* four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i receives
 * its row lane/4, elements 2 (lane%4), +1 (.trans: its column lane/4, rows 2 (lane%4), +1) */
__device__ __forceinline__ void ldsm4(uint32_t (&r)[4], const bf16 *p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p))
                 : "memory");
}
__device__ __forceinline__ void ldsm4t(uint32_t (&r)[4], const bf16 *p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p))
                 : "memory");
}

/* c (16x8 fp32) += a (16x16 bf16, row) . b (16x8 bf16, col) */
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1)
{
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* Fragment addresses (lane l) in a tile of rows stride FLD:
 * a_at: the A fragment of rows r0..r0+15, columns c0..c0+15 (ldsm4 gives a0..a3);
 *       also, with ldsm4t, the B fragments of B = X (X rows [k][n], k = r0.., n = c0..c0+15):
 *       registers {0, 1} the n8 tile c0, {2, 3} the n8 tile c0 + 8;
 * bt_at: with ldsm4, the B fragments of B = X^T (X rows [n][k], n = r0..r0+15, k = c0..c0+15):
 *       registers {0, 1} the n8 tile r0, {2, 3} the n8 tile r0 + 8. */
__device__ __forceinline__ const bf16 *a_at(const bf16 *t, int r0, int c0, int l)
{
    return t + (r0 + (l & 15)) * FLD + c0 + (l >> 4) * 8;
}
__device__ __forceinline__ const bf16 *bt_at(const bf16 *t, int r0, int c0, int l)
{
    return t + (r0 + (l & 7) + (l >> 4) * 8) * FLD + c0 + ((l >> 3) & 1) * 8;
}

/* acc (two m16 tiles x 64) += A (two m16 tiles x 64, k16 fragments a[mt][kk]) . B, B = X^T (
 * X a tile of 64 rows [n][k], as K in S = Q K^T) or X (X_ROWS_K: X rows [k][n], as V in P V); each B
 * fragment read from shared memory feeds both m tiles */
template <bool X_ROWS_K>
__device__ __forceinline__ void mm2(float (&acc)[2][8][4], const uint32_t (&a)[2][4][4], const bf16 *X, int l)
{
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) {
            /* X^T: n16 block i, k16 step j; X: k16 step i, n16 block j */
            const int nb = X_ROWS_K ? j : i, kk = X_ROWS_K ? i : j;
            uint32_t b[4];
            if (X_ROWS_K)
                ldsm4t(b, a_at(X, 16 * kk, 16 * nb, l));
            else
                ldsm4(b, bt_at(X, 16 * nb, 16 * kk, l));
#pragma unroll
            for (int mt = 0; mt < 2; mt++) {
                mma16816(acc[mt][2 * nb], a[mt][kk], b[0], b[1]);
                mma16816(acc[mt][2 * nb + 1], a[mt][kk], b[2], b[3]);
            }
        }
}

/* the A fragments of the 16 rows r0.. of a 64-wide tile */
__device__ __forceinline__ void load_a(uint32_t (&a)[4][4], const bf16 *t, int r0, int l)
{
#pragma unroll
    for (int kk = 0; kk < 4; kk++)
        ldsm4(a[kk], a_at(t, r0, 16 * kk, l));
}

/* ---------------------------------------------------------------- global -> shared (fp32 -> bf16) */

/* Rows t0 .. t0 + R - 1 of one head's part (base: its row 0, row stride ld elements, fp32 or
 * bf16), 64 elements each, into fp32 registers: thread x takes elements 4 (x % 16) .. + 3 of rows
 * x / 16 + 16 i (a half-warp reads one row); rows at or past T read as zeros. */
template <int R, class E, int NT = FTHREADS>
__device__ __forceinline__ void tile_ldg(float4 (&v)[R * 16 / NT], const E *base, int64_t ld, int t0, int T)
{
    const int c4 = threadIdx.x & 15, r = threadIdx.x >> 4;
#pragma unroll
    for (int i = 0; i < R * 16 / NT; i++) {
        const int t = t0 + r + NT / 16 * i;
        v[i] = t < T ? ld4g(base + (int64_t)t * ld + 4 * c4) : make_float4(0, 0, 0, 0);
    }
}

/* ... and from registers to the bf16 tile dst (rows FLD apart) */
template <int R, int NT = FTHREADS>
__device__ __forceinline__ void tile_sts(bf16 *dst, const float4 (&v)[R * 16 / NT])
{
    const int c4 = threadIdx.x & 15, r = threadIdx.x >> 4;
#pragma unroll
    for (int i = 0; i < R * 16 / NT; i++)
        *reinterpret_cast<uint2 *>(dst + (r + NT / 16 * i) * FLD + 4 * c4) =
            make_uint2(pack2(v[i].x, v[i].y), pack2(v[i].z, v[i].w));
}

/* qkv is an operand buffer (bf16): its tiles go to shared memory as they are. Rows t0 .. t0 + R - 1
 * of one head's part (base: its row 0, row stride ld elements, 64 bf16 = 8 x 16 bytes per row) by
 * cp.async into the bf16 tile dst (rows FLD apart): thread x copies 16-byte piece x % 8 of rows
 * x / 8 + 32 i; rows at or past T are zero-filled. The caller commits, waits and synchronises. */
template <int R, int NT = FTHREADS>
__device__ __forceinline__ void tile_cp_bf(bf16 *dst, const bf16 *base, int64_t ld, int t0, int T)
{
    const int c8 = threadIdx.x & 7, r = threadIdx.x >> 3;
#pragma unroll
    for (int i = 0; i < R * 8 / NT; i++) {
        const int row = r + NT / 8 * i, t = t0 + row;
        cp_async16(smem_addr(dst + row * FLD + 8 * c8), t < T ? base + (int64_t)t * ld + 8 * c8 : base, t < T);
    }
}

/* ---------------------------------------------------------------- forward */

/* grid (B * H, query blocks of 128); the query blocks with the most keys come first (blockIdx.y 0
 * is the last block), over all heads, so that the long CTAs start early (longest first; grouping
 * the heads for L2 locality instead measured slower). Warp w owns rows q0 + 32 w .. + 31 as two
 * m16 tiles mt; lane l holds their accumulator rows 16 mt + l/4 (+ 8), columns 8 n + 2 (l % 4)
 * (+ 1) of each n8 tile n. Scores are kept in log2 units: s * scale * log2(e), so that exp is one
 * ex2. */
__global__ void __launch_bounds__(FTHREADS, 2)
    k_fa_fwd(bf16 *out, float *lse, const bf16 *qkv, int T, int H, float sl2)
{
    extern __shared__ __align__(16) unsigned char fa_smem[];
    bf16 *Qs = reinterpret_cast<bf16 *>(fa_smem); /* [128][FLD] */
    bf16 *Ks = Qs + FROWS * FLD;                  /* [2][64][FLD] */
    bf16 *Vs = Ks + 2 * FTILE * FLD;              /* [2][64][FLD] */
    const int l = threadIdx.x & 31, w = threadIdx.x >> 5, g = l >> 2, tg = l & 3;
    const int bh = blockIdx.x, b = bh / H, h = bh % H;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * FROWS;
    const int64_t Cl = (int64_t)H * FD, ld = 3 * Cl;
    const bf16 *qb = qkv + (int64_t)b * T * ld + (int64_t)h * FD, *kb = qb + Cl, *vb = qb + 2 * Cl;
    const int nkt = (min(q0 + FROWS, T) + FTILE - 1) / FTILE;
    const int wr0 = q0 + 32 * w;                                    /* the warp's first row */
    const int wkt = wr0 < T ? min(wr0 + 31, T - 1) / FTILE + 1 : 0; /* key tiles of the warp */

    tile_cp_bf<FROWS, FTHREADS>(Qs, qb, ld, q0, T);
    tile_cp_bf<FTILE, FTHREADS>(Ks, kb, ld, 0, T);
    tile_cp_bf<FTILE, FTHREADS>(Vs, vb, ld, 0, T);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    uint32_t qf[2][4][4];
    load_a(qf[0], Qs, 32 * w, l);
    load_a(qf[1], Qs, 32 * w + 16, l);

    /* per m tile mt: rows wr0 + 16 mt + g (+ 8) */
    float o[2][8][4], m[2][2], ls[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; mt++) {
        m[mt][0] = m[mt][1] = -INFINITY;
        ls[mt][0] = ls[mt][1] = 0.0f;
#pragma unroll
        for (int n = 0; n < 8; n++)
            o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.0f;
    }

    for (int j = 0; j < nkt; j++) {
        const int buf = j & 1;
        const bool more = j + 1 < nkt;
        const bf16 *K = Ks + buf * FTILE * FLD, *V = Vs + buf * FTILE * FLD;
        const int k0 = j * FTILE;
        if (more) {
            tile_cp_bf<FTILE, FTHREADS>(Ks + (buf ^ 1) * FTILE * FLD, kb, ld, k0 + FTILE, T);
            tile_cp_bf<FTILE, FTHREADS>(Vs + (buf ^ 1) * FTILE * FLD, vb, ld, k0 + FTILE, T);
            cp_async_commit();
        }
        if (j < wkt) {
            float s[2][8][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int n = 0; n < 8; n++)
                    s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.0f;
            mm2<false>(s, qf, K, l); /* S = Q K^T */
            uint32_t pf[2][4][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++) {
                const int r0 = wr0 + 16 * mt;
                if (k0 + FTILE - 1 > r0) { /* the tile crosses these rows: mask keys > row */
#pragma unroll
                    for (int n = 0; n < 8; n++)
#pragma unroll
                        for (int e = 0; e < 4; e++)
                            if (k0 + 8 * n + 2 * tg + (e & 1) > r0 + g + 8 * (e >> 1))
                                s[mt][n][e] = -INFINITY;
                }
                float x0 = -INFINITY, x1 = -INFINITY;
#pragma unroll
                for (int n = 0; n < 8; n++) {
                    x0 = fmaxf(x0, fmaxf(s[mt][n][0], s[mt][n][1]));
                    x1 = fmaxf(x1, fmaxf(s[mt][n][2], s[mt][n][3]));
                }
                /* a row whose keys are all masked here had key 0 in an earlier tile: m stays finite */
                const float mn0 = fmaxf(m[mt][0], quad_max(x0) * sl2), mn1 = fmaxf(m[mt][1], quad_max(x1) * sl2);
                const float a0 = ex2(m[mt][0] - mn0), a1 = ex2(m[mt][1] - mn1);
                m[mt][0] = mn0;
                m[mt][1] = mn1;
                float ps0 = 0.0f, ps1 = 0.0f;
#pragma unroll
                for (int n = 0; n < 8; n++) {
                    const float p0 = ex2(fmaf(s[mt][n][0], sl2, -mn0)), p1 = ex2(fmaf(s[mt][n][1], sl2, -mn0));
                    const float p2 = ex2(fmaf(s[mt][n][2], sl2, -mn1)), p3 = ex2(fmaf(s[mt][n][3], sl2, -mn1));
                    ps0 += p0 + p1;
                    ps1 += p2 + p3;
                    pf[mt][n >> 1][(n & 1) * 2] = pack2(p0, p1);
                    pf[mt][n >> 1][(n & 1) * 2 + 1] = pack2(p2, p3);
                }
                ls[mt][0] = ls[mt][0] * a0 + ps0;
                ls[mt][1] = ls[mt][1] * a1 + ps1;
#pragma unroll
                for (int n = 0; n < 8; n++) {
                    o[mt][n][0] *= a0;
                    o[mt][n][1] *= a0;
                    o[mt][n][2] *= a1;
                    o[mt][n][3] *= a1;
                }
            }
            mm2<true>(o, pf, V, l); /* O += P V */
        }
        if (more)
            cp_async_wait_all();
        __syncthreads();
    }

#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const float sum = quad_sum(ls[mt][hf]), inv = 1.0f / sum; /* (every lane: a warp-wide shuffle) */
            const int t = wr0 + 16 * mt + g + 8 * hf;
            if (t >= T)
                continue;
            bf16 *orow = out + ((int64_t)b * T + t) * Cl + (int64_t)h * FD + 2 * tg;
#pragma unroll
            for (int n = 0; n < 8; n++)
                *reinterpret_cast<__nv_bfloat162 *>(orow + 8 * n) =
                    __floats2bfloat162_rn(o[mt][n][2 * hf] * inv, o[mt][n][2 * hf + 1] * inv);
            if (tg == 0)
                lse[(int64_t)bh * T + t] = (m[mt][hf] + log2f(sum)) * LN2;
        }
}

/* ---------------------------------------------------------------- backward: dQ */

/* grid (B * H, query blocks of 128), the longest first; warp w owns query rows q0 + 32 w .. + 31
 * (two m16 tiles). D = rowsum(dout * out) of the block's rows first (also written to Dv for
 * k_fa_dkv, which runs after this kernel); then per key tile, 16 NPG_DQ keys at a time: S = Q K^T,
 * P = exp(S - lse), dP = dO V^T, dS = P (dP - D), dQ += dS K; at the end dq += scale * dQ. The Q
 * and dO fragments are re-read from shared memory per k16 step to stay within 255 registers. */
__global__ void __launch_bounds__(FTHREADS, 2)
    k_fa_dq(bf16 *dqkv, float *Dv, const bf16 *dout, const bf16 *out, const bf16 *qkv, const float *lse, int T,
             int H, float scale, float sl2)
{
    extern __shared__ __align__(16) unsigned char fa_smem[];
    bf16 *Qs = reinterpret_cast<bf16 *>(fa_smem); /* [128][FLD] */
    bf16 *Gs = Qs + FROWS * FLD;                  /* dO [128][FLD] */
    bf16 *Ks = Gs + FROWS * FLD;                  /* [2][64][FLD] */
    bf16 *Vs = Ks + 2 * FTILE * FLD;              /* [2][64][FLD] */
    float *Dsm = reinterpret_cast<float *>(Vs + 2 * FTILE * FLD); /* D of the 128 rows */
    const int l = threadIdx.x & 31, w = threadIdx.x >> 5, g = l >> 2, tg = l & 3;
    const int bh = blockIdx.x, b = bh / H, h = bh % H;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * FROWS;
    const int64_t Cl = (int64_t)H * FD, ld = 3 * Cl;
    const bf16 *qb = qkv + (int64_t)b * T * ld + (int64_t)h * FD, *kb = qb + Cl, *vb = qb + 2 * Cl;
    const bf16 *gb = dout + (int64_t)b * T * Cl + (int64_t)h * FD;
    const bf16 *ob = out + (int64_t)b * T * Cl + (int64_t)h * FD;
    const int nkt = (min(q0 + FROWS, T) + FTILE - 1) / FTILE;
    const int wr0 = q0 + 32 * w;
    const int wkt = wr0 < T ? min(wr0 + 31, T - 1) / FTILE + 1 : 0;

    tile_cp_bf<FROWS, FTHREADS>(Qs, qb, ld, q0, T);
    tile_cp_bf<FTILE, FTHREADS>(Ks, kb, ld, 0, T);
    tile_cp_bf<FTILE, FTHREADS>(Vs, vb, ld, 0, T);
    cp_async_commit();
    /* dO rows and D = dout . out per row (a half-warp per row, a fixed butterfly), 64 rows at a time */
#pragma unroll
    for (int half = 0; half < 2; half++) {
        float4 v[FTILE * 16 / FTHREADS], o[FTILE * 16 / FTHREADS];
        tile_ldg<FTILE, bf16, FTHREADS>(v, gb, Cl, q0 + FTILE * half, T);
        tile_ldg<FTILE, bf16, FTHREADS>(o, ob, Cl, q0 + FTILE * half, T);
        tile_sts<FTILE, FTHREADS>(Gs + FTILE * half * FLD, v);
#pragma unroll
        for (int i = 0; i < FTILE * 16 / FTHREADS; i++) {
            const float d = half_warp_sum(dot4(v[i], o[i]));
            const int r = FTILE * half + (threadIdx.x >> 4) + FTHREADS / 16 * i, t = q0 + r;
            if ((threadIdx.x & 15) == 0) {
                Dsm[r] = d;
                if (t < T)
                    Dv[(int64_t)bh * T + t] = d;
            }
        }
    }
    cp_async_wait_all();
    /* lse (log2 units) and D of rows 16 mt + g (+ 8); 0 past T (zero rows: dS = 0 there) */
    float Lr[2][2], Dr[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const int t = wr0 + 16 * mt + g + 8 * hf;
            Lr[mt][hf] = t < T ? lse[(int64_t)bh * T + t] * LOG2E : 0.0f;
        }
    __syncthreads();
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int hf = 0; hf < 2; hf++)
            Dr[mt][hf] = Dsm[32 * w + 16 * mt + g + 8 * hf];

    float dq[2][8][4];
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int n = 0; n < 8; n++)
            dq[mt][n][0] = dq[mt][n][1] = dq[mt][n][2] = dq[mt][n][3] = 0.0f;

    for (int j = 0; j < nkt; j++) {
        const int buf = j & 1;
        const bool more = j + 1 < nkt;
        const bf16 *K = Ks + buf * FTILE * FLD, *V = Vs + buf * FTILE * FLD;
        const int k0 = j * FTILE;
        if (more) {
            tile_cp_bf<FTILE, FTHREADS>(Ks + (buf ^ 1) * FTILE * FLD, kb, ld, k0 + FTILE, T);
            tile_cp_bf<FTILE, FTHREADS>(Vs + (buf ^ 1) * FTILE * FLD, vb, ld, k0 + FTILE, T);
            cp_async_commit();
        }
        if (j < wkt) {
#pragma unroll
            for (int np0 = 0; np0 < 4; np0 += NPG_DQ) {
                uint32_t dsf[2][NPG_DQ][4]; /* per m tile, dS of keys 16 (np0 + i) .. as A fragments */
                float sacc[2][NPG_DQ][8], dacc[2][NPG_DQ][8];
#pragma unroll
                for (int mt = 0; mt < 2; mt++)
#pragma unroll
                    for (int i = 0; i < NPG_DQ; i++)
#pragma unroll
                        for (int e = 0; e < 8; e++)
                            sacc[mt][i][e] = dacc[mt][i][e] = 0.0f;
#pragma unroll
                for (int kk = 0; kk < 4; kk++) {
                    uint32_t bk[NPG_DQ][4], bv[NPG_DQ][4], af[4];
#pragma unroll
                    for (int i = 0; i < NPG_DQ; i++) {
                        ldsm4(bk[i], bt_at(K, 16 * (np0 + i), 16 * kk, l));
                        ldsm4(bv[i], bt_at(V, 16 * (np0 + i), 16 * kk, l));
                    }
#pragma unroll
                    for (int mt = 0; mt < 2; mt++) {
                        ldsm4(af, a_at(Qs, 32 * w + 16 * mt, 16 * kk, l));
#pragma unroll
                        for (int i = 0; i < NPG_DQ; i++) {
                            mma16816(*reinterpret_cast<float(*)[4]>(sacc[mt][i]), af, bk[i][0], bk[i][1]);
                            mma16816(*reinterpret_cast<float(*)[4]>(sacc[mt][i] + 4), af, bk[i][2], bk[i][3]);
                        }
                        ldsm4(af, a_at(Gs, 32 * w + 16 * mt, 16 * kk, l));
#pragma unroll
                        for (int i = 0; i < NPG_DQ; i++) {
                            mma16816(*reinterpret_cast<float(*)[4]>(dacc[mt][i]), af, bv[i][0], bv[i][1]);
                            mma16816(*reinterpret_cast<float(*)[4]>(dacc[mt][i] + 4), af, bv[i][2], bv[i][3]);
                        }
                    }
                }
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
                    const int r0 = wr0 + 16 * mt;
                    const bool diag = k0 + FTILE - 1 > r0;
#pragma unroll
                    for (int i = 0; i < NPG_DQ; i++) {
                        const int np = np0 + i;
                        /* element e: row g + 8 ((e >> 1) & 1), key 16 np + 8 (e >> 2) + 2 tg + (e & 1) */
                        float ds[8];
#pragma unroll
                        for (int e = 0; e < 8; e++) {
                            const int hi = (e >> 1) & 1;
                            float pv = ex2(fmaf(sacc[mt][i][e], sl2, -Lr[mt][hi]));
                            if (diag && k0 + 16 * np + 8 * (e >> 2) + 2 * tg + (e & 1) > r0 + g + 8 * hi)
                                pv = 0.0f;
                            ds[e] = pv * (dacc[mt][i][e] - Dr[mt][hi]);
                        }
                        dsf[mt][i][0] = pack2(ds[0], ds[1]);
                        dsf[mt][i][1] = pack2(ds[2], ds[3]);
                        dsf[mt][i][2] = pack2(ds[4], ds[5]);
                        dsf[mt][i][3] = pack2(ds[6], ds[7]);
                    }
                }
                /* dQ += dS K over these keys (a k16 step each), each K fragment for both m tiles */
#pragma unroll
                for (int i = 0; i < NPG_DQ; i++)
#pragma unroll
                    for (int dp = 0; dp < 4; dp++) {
                        uint32_t bb[4];
                        ldsm4t(bb, a_at(K, 16 * (np0 + i), 16 * dp, l));
#pragma unroll
                        for (int mt = 0; mt < 2; mt++) {
                            mma16816(dq[mt][2 * dp], dsf[mt][i], bb[0], bb[1]);
                            mma16816(dq[mt][2 * dp + 1], dsf[mt][i], bb[2], bb[3]);
                        }
                    }
            }
        }
        if (more)
            cp_async_wait_all();
        __syncthreads();
    }

#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const int t = wr0 + 16 * mt + g + 8 * hf;
            if (t >= T)
                continue;
            bf16 *row = dqkv + ((int64_t)b * T + t) * ld + (int64_t)h * FD + 2 * tg;
#pragma unroll
            for (int n = 0; n < 8; n++)
                *reinterpret_cast<__nv_bfloat162 *>(row + 8 * n) =
                    __floats2bfloat162_rn(scale * dq[mt][n][2 * hf], scale * dq[mt][n][2 * hf + 1]);
        }
}

/* ---------------------------------------------------------------- backward: dK, dV */

/* grid (B * H, key blocks of 128), the key blocks with the most queries (the first) first. Warp w
 * owns keys k0 + 32 w .. + 31 (two m16 tiles); its score accumulators are transposed (keys x
 * queries): per query tile, 16 queries at a time, S^T = K Q^T, dP^T = V dO^T, P^T = exp(S^T -
 * lse), dS^T = P^T (dP^T - D), then dV += P^T dO and dK += dS^T Q over those 16 queries (a k16
 * step each); at the end dk += scale * dK, dv += dV. The lse (log2 units; +inf past T, which makes
 * P^T zero there) and D of each query tile are staged in shared memory with its rows. The loop
 * over the 16-query groups is not unrolled: unrolled it spills. */
__global__ void __launch_bounds__(FTHREADS, 2)
    k_fa_dkv(bf16 *dqkv, const bf16 *dout, const bf16 *qkv, const float *lse, const float *Dv, int T, int H,
              float scale, float sl2)
{
    extern __shared__ __align__(16) unsigned char fa_smem[];
    bf16 *Ks = reinterpret_cast<bf16 *>(fa_smem);             /* [128][FLD] */
    bf16 *Vs = Ks + FROWS * FLD;                              /* [128][FLD] */
    bf16 *Qs = Vs + FROWS * FLD;                              /* [2][64][FLD] */
    bf16 *Gs = Qs + 2 * FTILE * FLD;                          /* dO [2][64][FLD] */
    float *Ls = reinterpret_cast<float *>(Gs + 2 * FTILE * FLD); /* [2][64] */
    float *Ds = Ls + 2 * FTILE;                               /* [2][64] */
    float *Sl = Ds + 2 * FTILE, *Sd = Sl + FTILE;             /* staging of lse, D [64] */
    const int l = threadIdx.x & 31, w = threadIdx.x >> 5, g = l >> 2, tg = l & 3;
    const int bh = blockIdx.x, b = bh / H, h = bh % H;
    const int k0 = blockIdx.y * FROWS;
    const int64_t Cl = (int64_t)H * FD, ld = 3 * Cl;
    const bf16 *qb = qkv + (int64_t)b * T * ld + (int64_t)h * FD, *kb = qb + Cl, *vb = qb + 2 * Cl;
    const bf16 *gb = dout + (int64_t)b * T * Cl + (int64_t)h * FD;
    const float *lb = lse + (int64_t)bh * T, *db = Dv + (int64_t)bh * T;
    const int jq0 = k0 / FTILE, nqt = (T + FTILE - 1) / FTILE;
    const int kw0 = k0 + 32 * w; /* the warp's first key */

    tile_cp_bf<FROWS, FTHREADS>(Ks, kb, ld, k0, T);
    tile_cp_bf<FROWS, FTHREADS>(Vs, vb, ld, k0, T);
    tile_cp_bf<FTILE, FTHREADS>(Qs, qb, ld, jq0 * FTILE, T);
    tile_cp_bf<FTILE, FTHREADS>(Gs, gb, Cl, jq0 * FTILE, T);
    cp_async_commit();
    if (threadIdx.x < FTILE) {
        const int t = jq0 * FTILE + threadIdx.x;
        Ls[threadIdx.x] = t < T ? lb[t] * LOG2E : INFINITY;
        Ds[threadIdx.x] = t < T ? db[t] : 0.0f;
    }
    cp_async_wait_all();
    __syncthreads();

    float dk[2][8][4], dv[2][8][4];
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                dk[mt][n][e] = dv[mt][n][e] = 0.0f;

    for (int jq = jq0; jq < nqt; jq++) {
        const int buf = (jq - jq0) & 1, qt0 = jq * FTILE;
        const bool more = jq + 1 < nqt;
        const bool act = kw0 < T && qt0 + FTILE - 1 >= kw0;
        const bf16 *Q = Qs + buf * FTILE * FLD, *G = Gs + buf * FTILE * FLD;
        const float *L = Ls + buf * FTILE, *Dq = Ds + buf * FTILE;
        if (more) {
            tile_cp_bf<FTILE, FTHREADS>(Qs + (buf ^ 1) * FTILE * FLD, qb, ld, qt0 + FTILE, T);
            tile_cp_bf<FTILE, FTHREADS>(Gs + (buf ^ 1) * FTILE * FLD, gb, Cl, qt0 + FTILE, T);
            const int t = qt0 + FTILE + threadIdx.x;
            if (threadIdx.x < FTILE && t < T) {
                cp_async4(Sl + threadIdx.x, lb + t);
                cp_async4(Sd + threadIdx.x, db + t);
            }
            cp_async_commit();
        }
#pragma unroll 1
        for (int np = 0; np < 4 && act; np++) {
            /* S^T and dP^T of the warp's 32 keys x queries 16 np .. 16 np + 15 */
            float sacc[2][8], dacc[2][8];
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int e = 0; e < 8; e++)
                    sacc[mt][e] = dacc[mt][e] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < 4; kk++) {
                uint32_t bq[4], bg[4], af[4];
                ldsm4(bq, bt_at(Q, 16 * np, 16 * kk, l));
                ldsm4(bg, bt_at(G, 16 * np, 16 * kk, l));
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
                    ldsm4(af, a_at(Ks, 32 * w + 16 * mt, 16 * kk, l));
                    mma16816(*reinterpret_cast<float(*)[4]>(sacc[mt]), af, bq[0], bq[1]);
                    mma16816(*reinterpret_cast<float(*)[4]>(sacc[mt] + 4), af, bq[2], bq[3]);
                    ldsm4(af, a_at(Vs, 32 * w + 16 * mt, 16 * kk, l));
                    mma16816(*reinterpret_cast<float(*)[4]>(dacc[mt]), af, bg[0], bg[1]);
                    mma16816(*reinterpret_cast<float(*)[4]>(dacc[mt] + 4), af, bg[2], bg[3]);
                }
            }
            const float2 la = *reinterpret_cast<const float2 *>(L + 16 * np + 2 * tg);
            const float2 lc = *reinterpret_cast<const float2 *>(L + 16 * np + 8 + 2 * tg);
            const float2 xa = *reinterpret_cast<const float2 *>(Dq + 16 * np + 2 * tg);
            const float2 xc = *reinterpret_cast<const float2 *>(Dq + 16 * np + 8 + 2 * tg);
            uint32_t pf[2][4], dsf[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++) {
                const int km = kw0 + 16 * mt;
                const bool diag = qt0 + 16 * np < km + 15; /* some query here precedes some key of the tile */
                float pv[8], ds[8];
#pragma unroll
                for (int e = 0; e < 8; e++) {
                    const float lq = e < 4 ? ((e & 1) ? la.y : la.x) : ((e & 1) ? lc.y : lc.x);
                    const float dq_ = e < 4 ? ((e & 1) ? xa.y : xa.x) : ((e & 1) ? xc.y : xc.x);
                    float p = ex2(fmaf(sacc[mt][e], sl2, -lq));
                    if (diag && km + g + 8 * ((e >> 1) & 1) > qt0 + 16 * np + 8 * (e >> 2) + 2 * tg + (e & 1))
                        p = 0.0f;
                    pv[e] = p;
                    ds[e] = p * (dacc[mt][e] - dq_);
                }
#pragma unroll
                for (int r = 0; r < 4; r++) {
                    pf[mt][r] = pack2(pv[2 * r], pv[2 * r + 1]);
                    dsf[mt][r] = pack2(ds[2 * r], ds[2 * r + 1]);
                }
            }
            /* dV += P^T dO and dK += dS^T Q over these 16 queries, each fragment for both m tiles */
#pragma unroll
            for (int dp = 0; dp < 4; dp++) {
                uint32_t bb[4];
                ldsm4t(bb, a_at(G, 16 * np, 16 * dp, l));
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
                    mma16816(dv[mt][2 * dp], pf[mt], bb[0], bb[1]);
                    mma16816(dv[mt][2 * dp + 1], pf[mt], bb[2], bb[3]);
                }
                ldsm4t(bb, a_at(Q, 16 * np, 16 * dp, l));
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
                    mma16816(dk[mt][2 * dp], dsf[mt], bb[0], bb[1]);
                    mma16816(dk[mt][2 * dp + 1], dsf[mt], bb[2], bb[3]);
                }
            }
        }
        if (more) {
            cp_async_wait_all();
            const int t = qt0 + FTILE + threadIdx.x;
            if (threadIdx.x < FTILE) {
                Ls[(buf ^ 1) * FTILE + threadIdx.x] = t < T ? Sl[threadIdx.x] * LOG2E : INFINITY;
                Ds[(buf ^ 1) * FTILE + threadIdx.x] = t < T ? Sd[threadIdx.x] : 0.0f;
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const int key = kw0 + 16 * mt + g + 8 * hf;
            if (key >= T)
                continue;
            bf16 *row = dqkv + ((int64_t)b * T + key) * ld + (int64_t)h * FD + Cl + 2 * tg;
#pragma unroll
            for (int n = 0; n < 8; n++) {
                *reinterpret_cast<__nv_bfloat162 *>(row + 8 * n) =
                    __floats2bfloat162_rn(scale * dk[mt][n][2 * hf], scale * dk[mt][n][2 * hf + 1]);
                *reinterpret_cast<__nv_bfloat162 *>(row + Cl + 8 * n) =
                    __floats2bfloat162_rn(dv[mt][n][2 * hf], dv[mt][n][2 * hf + 1]);
            }
        }
}

/* ---------------------------------------------------------------- launchers */

/* the fast path applies: head size 64 and 16-byte aligned tensors (float4 loads of qkv / dout,
 * bf16x2 stores of out / dqkv); otherwise the caller takes the fp32 kernels */
bool fa_applies(int hs, const void *a, const void *b, const void *c3)
{
    return hs == FD && cu_aligned16(a) && cu_aligned16(b) && (!c3 || cu_aligned16(c3));
}

} // namespace

int cu_attention_fwd_fast(mps_cuda *c, act_t *out, float *lse, const act_t *qkv, int B, int T, int H, int hs)
{
    if (!fa_applies(hs, out, qkv, NULL))
        return -1;
    if (c->wgmma)
        return cu_attention_fwd_wgmma(c, out, lse, qkv, B, T, H);
    return att_launch_fwd(c, k_fa_fwd, FSM_FWD, FTHREADS, FROWS, "attention_fwd (fast)", out, lse, qkv, B, T, H);
}

int cu_attention_bwd_fast(mps_cuda *c, act_t *dqkv, const act_t *dout, const act_t *qkv, const act_t *out,
                          const float *lse, float *Dv, int B, int T, int H, int hs, float *colpart)
{
    if (!fa_applies(hs, dqkv, dout, qkv) || !cu_aligned16(out))
        return -1;
    if (c->wgmma)
        return cu_attention_bwd_wgmma(c, dqkv, dout, qkv, out, lse, Dv, B, T, H, colpart) == 0 && colpart ? 1 : 0;
    return att_launch_bwd(c, k_fa_dq, FSM_DQ, k_fa_dkv, FSM_DKV, FTHREADS, FROWS, "attention_bwd (fast dq)",
                          "attention_bwd (fast dk, dv)", dqkv, dout, qkv, out, lse, Dv, B, T, H);
}
