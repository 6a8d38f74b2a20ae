/* Causal self-attention for head size 64 with Hopper's warpgroup MMA (wgmma, sm_90a): the default
 * path of the CUDA backend on H100 / H200 (MPS_CUDA_ATTENTION=mma selects the mma.sync kernels of
 * attention_fast.cu instead; other cards and builds without sm_90a take those too). Same layout,
 * precision, causality and deterministic backward as attention_fast.cu (see there): qkv (B, T,
 * 3 Cl) bf16, out (B, T, Cl) bf16, lse (B, H, T) fp32, every product accumulated in fp32, the
 * backward without atomics (a dQ kernel per query block, a dK/dV kernel per key block).
 *
 * Why wgmma: the mma.sync kernels were bound by shared-memory reads (ncu: the shared-memory pipe
 * 66% busy, the tensor pipe 36%), since every warp copies every operand fragment of the streamed
 * tile into its own registers with ldmatrix. wgmma reads both operands of Q K^T-like products
 * straight from shared memory, once for the 4 warps of a warpgroup, and runs asynchronously.
 *
 * Tiling: a CTA is one warpgroup (4 warps, 128 threads) that owns 64 rows (wgmma's m64: queries
 * in the forward and the dQ kernel, keys in the dK/dV kernel; warp w holds rows 16 w .. 16 w + 15
 * of the accumulators) and streams tiles of 64 rows of the other side, double-buffered with
 * cp.async. Several CTAs per SM overlap one's softmax with another's products (forward 5, dQ 4,
 * dK/dV 3: the register budgets of the launch bounds, no spills; the kernels are latency-bound, and
 * 4 -> 5 and 3 -> 4 CTAs measured 4% and 7% faster). Every product is
 * m64n64k16: S = Q K^T with both operands in shared memory (K-major); P V, P^T dO, dS^T Q and dS K
 * with the probabilities in registers (an accumulator's layout is the A-fragment layout of
 * register-sourced wgmma, as with mma.sync) and the streamed tile as an MN-major B.
 *
 * Shared memory: each tile is 64 rows of 64 bf16 = 128 bytes, stored with the 128-byte swizzle
 * that wgmma's descriptors know: 16-byte chunk c of row r is at r * 128 + 16 (c ^ (r % 8)), tiles
 * 1024-byte aligned. A K-major operand (rows = M or N, the 64 columns = K) starts at row0 * 128 +
 * 32 kk for its k16 step kk; an MN-major one (rows = K) at 16 kk * 128; both have 8-row groups
 * 1024 bytes apart. cp.async writes through the generic proxy, so fence.proxy.async precedes the
 * barrier after which wgmma (the async proxy) reads a tile.
 *
 * Measured (B 8, T 1024, H 12; test_backend_cuda's bench) on an H100: forward 0.046 ms (279
 * TFLOP/s), backward 0.147 ms (219 TFLOP/s), against 0.063 / 0.199 ms for the mma.sync kernels; on
 * an H200 before the descriptor and load changes below 0.050 / 0.148 against 0.062 / 0.194, the
 * 124M training step +3.4%, 350M +4.0%, the same losses. Per tile the kernels add to a
 * descriptor's low word instead of rebuilding it, load all-real tiles without per-row checks, mask
 * only tiles that cross the diagonal, and the forward rescales O only when a row maximum moved.
 * Tried and dropped: keeping the dV/dK (or dQ, P V) products of one tile in flight under the next
 * tile's S products (the loads then wait for a barrier mid-iteration, and dK/dV needs 187
 * registers: 0.169 ms against 0.159). */
#include "attention_common.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MPS_WGMMA 1
#else
#define MPS_WGMMA 0
#endif

namespace {

constexpr int CW = 64;        /* columns of a tile chunk: a row of 64 bf16 is 128 bytes, one swizzle atom wide */
constexpr int ROWS = 64;      /* rows owned by a CTA (wgmma's m64) */
constexpr int TILE = 64;      /* rows of a streamed tile */
constexpr int NTHREADS = 128; /* one warpgroup */
constexpr uint32_t CHUNK_B = TILE * CW * 2; /* bytes of a 64 x 64 chunk: 8192 */

/* Head size HD = 64 or 128: a tile of 64 rows is HD / 64 chunks of 64 columns, each a swizzled
 * 64 x 64 block of its own (chunk c of a tile at + c CHUNK_B), so that every product is still
 * m64n64k16 over chunks: Q K^T sums over the chunks of the head dimension, P V gives one
 * accumulator per chunk. */
template <int HD> struct Geo {
    static constexpr int NC = HD / CW;
    static constexpr uint32_t TB = NC * CHUNK_B; /* bytes of a 64-row tile */
    /* dynamic shared memory (bytes), with 1024 of slack to align the tiles */
    static constexpr size_t FWD = 1024 + 5 * TB;               /* Q; K, V double-buffered */
    static constexpr size_t DQ = 1024 + 6 * TB + 4 * ROWS;     /* Q, dO; K, V double-buffered; D */
    static constexpr size_t DKV = 1024 + 6 * TB + 6 * 4 * TILE; /* K, V; Q, dO double-buffered; lse, D x 2, staging */
    /* CTAs per SM: the register budgets of the launch bounds (head size 64, measured: see above);
     * at 128 the shared memory allows two */
    static constexpr int FWD_CTAS = HD == 64 ? 5 : 2, DQ_CTAS = HD == 64 ? 4 : 2, DKV_CTAS = HD == 64 ? 3 : 2;
};

/* Where the operands lie: row t of batch b, head h of q at q + (b T + t) ldq + h HD, of k and v
 * (kv head h / group) at + (b T + t) ldkv + (h / group) HD; dq, dk, dv (backward) as q, k, v; out
 * and dout (B, T, H HD). GPT-2's fused qkv (B, T, 3 C) is q = qkv, k = qkv + C, v = qkv + 2 C,
 * ldq = ldkv = 3 C, group 1. */
struct WgArgs {
    const bf16 *q, *k, *v;
    bf16 *dq, *dk, *dv;
    int64_t ldq, ldkv;
    int T, H, group;
    float scale, sl2; /* 1 / sqrt(HD); scale log2 e (scores in log2 units) */
    /* (2, T, HD / 2) rotary cosines and sines, or NULL: the backward turns dq and dk back by them
     * as it stores them (the Llama block's rope_bwd, without a pass of its own) */
    const float *rope_cs;
};

/* whether this translation unit's device code has the wgmma kernels (sm_90a) */
__global__ void k_wg_probe(int *has) { *has = MPS_WGMMA; }

#if MPS_WGMMA

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

/* --------------------------------------------------------------- tiles: global -> shared */

/* this thread's shared-memory writes become visible to the async proxy (wgmma) */
__device__ __forceinline__ void fence_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

/* byte offset of 16-byte chunk c of row r in a swizzled tile */
__device__ __forceinline__ uint32_t swz(int r, int c) { return (uint32_t)(r * 128 + ((c ^ (r & 7)) << 4)); }

/* Rows t0 .. t0 + R - 1 of one head's part (base: its row 0, row stride ld elements), NC chunks
 * of 64 columns, by cp.async into the swizzled tile at shared address dst: thread x copies 16-byte
 * chunk x % 8 of rows x / 8 + 16 i of each; rows at or past T are zero-filled (nothing read). The
 * caller commits, waits, fences. */
template <int R, int NC>
__device__ __forceinline__ void tile_load(uint32_t dst, const bf16 *base, int64_t ld, int t0, int T)
{
    const int c = threadIdx.x & 7, r0 = threadIdx.x >> 3;
    /* rows r0 + 16 i share r % 8, so their chunks land 16 rows (2048 bytes) apart */
    const uint32_t d0 = dst + swz(r0, c);
    const bf16 *src = base + (int64_t)(t0 + r0) * ld + 8 * c;
    if (t0 + R <= T) { /* all rows real: no checks */
#pragma unroll
        for (int ch = 0; ch < NC; ch++)
#pragma unroll
            for (int i = 0; i < R / 16; i++)
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d0 + ch * CHUNK_B + 2048 * i),
                             "l"(src + CW * ch + 16 * i * ld)
                             : "memory");
        return;
    }
#pragma unroll
    for (int ch = 0; ch < NC; ch++)
#pragma unroll
        for (int i = 0; i < R / 16; i++) {
            const bool real = t0 + r0 + 16 * i < T;
            cp_async16(d0 + ch * CHUNK_B + 2048 * i, real ? src + CW * ch + 16 * i * ld : base, real);
        }
}

/* the next K and V tiles (rows k0 ..) into the buffers not in use (buf ^ 1), one commit group */
template <int NC>
__device__ __forceinline__ void kv_prefetch(uint32_t Ks, uint32_t Vs, int buf, const bf16 *kb, const bf16 *vb,
                                            int64_t ld, int k0, int T)
{
    tile_load<TILE, NC>(Ks + (buf ^ 1) * NC * CHUNK_B, kb, ld, k0, T);
    tile_load<TILE, NC>(Vs + (buf ^ 1) * NC * CHUNK_B, vb, ld, k0, T);
    cp_async_commit();
}
/* the end of a tile's iteration: the prefetched tile (if any) is in shared memory and visible to
 * wgmma, and every warp is done with this one */
__device__ __forceinline__ void tile_arrived(bool more)
{
    if (more) {
        cp_async_wait_all();
        fence_async();
    }
    __syncthreads();
}

/* --------------------------------------------------------------- wgmma */

/* Shared-memory matrix descriptors: start address, leading and stride byte offsets (16-byte units;
 * 1024 = the distance of 8-row groups, the leading one unused at 64 columns), 128-byte swizzle. The
 * kernels keep the low word (start address | leading offset << 16) of each tile's descriptor and
 * step by adding to it: +DK_STEP per k16 step of a K-major operand (rows = M or N, 32 bytes
 * along the row), +DM_STEP per k16 step of an MN-major one (16 rows). The high word is the same
 * for all (stride offset, swizzle). One add per product instead of rebuilding the 64 bits (ptx:
 * ~100 fewer instructions a tile in the dK/dV kernel). */
__device__ __forceinline__ uint32_t dlo(uint32_t addr) { return ((addr & 0x3FFFF) >> 4) | ((1024u >> 4) << 16); }
constexpr uint32_t DESC_HI = (1024u >> 4) | (1u << 30);
constexpr uint32_t DK_STEP = 32 >> 4, DM_STEP = 2048 >> 4, DC_STEP = CHUNK_B >> 4; /* DC: next chunk */

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
/* until at most N of this warpgroup's committed groups are pending (groups complete in order) */
template <int N> __device__ __forceinline__ void wg_wait()
{
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

/* an accumulator's registers are "written" here, so that no use of them moves above the wait
 * before (the compiler does not know that wgmma writes them asynchronously) */
__device__ __forceinline__ void reg_fence(float (&d)[32])
{
#pragma unroll
    for (int i = 0; i < 32; i++)
        asm volatile("" : "+f"(d[i])::"memory");
}

#define WG_D32                                                                                                    \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
    "%23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define WG_ACC(d)                                                                                                 \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),   \
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),    \
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),   \
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])

/* one m64n64k16 product with both operands in shared memory: operands 0-31 the accumulator,
 * 32 / 33 the descriptors' low words of A and B, 34 their high word, 35 scale-d (0: d = A . B) */
#define WG_SS_ASM                                                                                                 \
    "{\n.reg .pred p;\n.reg .b64 da, db;\nsetp.ne.b32 p, %35, 0;\n"                                                 \
    "mov.b64 da, {%32, %34};\nmov.b64 db, {%33, %34};\n"                                                           \
    "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " WG_D32 ", da, db, p, 1, 1, 0, 0;\n}\n"

/* d (64 x 64 fp32, this thread's 32) += A (64 x 16) . B (16 x 64), both operands from shared
 * memory; A K-major, B K-major (B^T's rows in memory) */
__device__ __forceinline__ void wg_ss(float (&d)[32], uint32_t alo, uint32_t blo)
{
    asm volatile(WG_SS_ASM : WG_ACC(d) : "r"(alo), "r"(blo), "r"(DESC_HI), "r"(1));
}
/* d = A . B: the first k16 step of a product, with scale-d false and d an output only. Zeroing d
 * instead adds register moves that the compiler may place after the wgmma fence (ptxas then
 * inserts a wait), and any dependence on d's previous value (a loop-carried copy) is a non-wgmma
 * write to an accumulator while other wgmmas are in flight, which makes ptxas serialise every
 * wgmma of the kernel. */
#define WG_OUT(d)                                                                                                 \
    "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7]), "=f"(d[8]),   \
        "=f"(d[9]), "=f"(d[10]), "=f"(d[11]), "=f"(d[12]), "=f"(d[13]), "=f"(d[14]), "=f"(d[15]), "=f"(d[16]),    \
        "=f"(d[17]), "=f"(d[18]), "=f"(d[19]), "=f"(d[20]), "=f"(d[21]), "=f"(d[22]), "=f"(d[23]), "=f"(d[24]),   \
        "=f"(d[25]), "=f"(d[26]), "=f"(d[27]), "=f"(d[28]), "=f"(d[29]), "=f"(d[30]), "=f"(d[31])
__device__ __forceinline__ void wg_ss_first(float (&d)[32], uint32_t alo, uint32_t blo)
{
    asm volatile(WG_SS_ASM : WG_OUT(d) : "r"(alo), "r"(blo), "r"(DESC_HI), "r"(0));
}
/* a k = 64 product from shared memory: d = A (64 x 64) . B, four k16 steps; a, b: descriptor low
 * words of K-major tiles */
__device__ __forceinline__ void wg_ss64(float (&d)[32], uint32_t a, uint32_t b)
{
    wg_ss_first(d, a, b);
#pragma unroll
    for (int kk = 1; kk < 4; kk++)
        wg_ss(d, a + DK_STEP * kk, b + DK_STEP * kk);
}
/* d = A . B over a head dimension of NC chunks (k = 64 NC): both operands K-major tiles of NC chunks */
template <int NC> __device__ __forceinline__ void wg_ss_hd(float (&d)[32], uint32_t a, uint32_t b)
{
    wg_ss64(d, a, b);
#pragma unroll
    for (int ch = 1; ch < NC; ch++)
#pragma unroll
        for (int kk = 0; kk < 4; kk++)
            wg_ss(d, a + DC_STEP * ch + DK_STEP * kk, b + DC_STEP * ch + DK_STEP * kk);
}
/* d += A . B with A from registers (this thread's k16 fragment, mma.sync's A layout) and B
 * MN-major in shared memory (B's rows in memory) */
__device__ __forceinline__ void wg_rs(float (&d)[32], const uint32_t (&a)[4], uint32_t blo)
{
    asm volatile("{\n.reg .pred p;\n.reg .b64 db;\nsetp.ne.b32 p, %38, 0;\n"
                 "mov.b64 db, {%36, %37};\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " WG_D32
                 ", {%32, %33, %34, %35}, db, p, 1, 1, 1;\n}\n"
                 : WG_ACC(d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(blo), "r"(DESC_HI), "r"(1));
}

/* --------------------------------------------------------------- small helpers */

/* this thread's half hf (rows g or g + 8 of its warp) of an accumulator, times scale, as bf16 at
 * row, the thread's columns 8 i + 2 tg, + 1 (row points at column 2 tg) */
__device__ __forceinline__ void store_half_row(bf16 *row, const float (&acc)[32], int hf, float scale)
{
#pragma unroll
    for (int i = 0; i < 8; i++)
        *reinterpret_cast<__nv_bfloat162 *>(row + 8 * i) =
            __floats2bfloat162_rn(scale * acc[4 * i + 2 * hf], scale * acc[4 * i + 2 * hf + 1]);
}
/* Causal masking of an accumulator tile: rows row0 + 16 w .. (this thread: row0 + g, + 8), columns
 * col0 .. col0 + 63 (this thread: col0 + 8 i + 2 tg, + 1). Elements whose key comes after their
 * query become v. KEYS_IN_ROWS: the rows are keys, the columns queries (dK/dV); else the reverse.
 * Only tiles that cross the diagonal have such elements; the others return at once. row0 is the
 * warp's first row. */
template <bool KEYS_IN_ROWS>
__device__ __forceinline__ void causal_mask(float (&s)[32], int row0, int col0, int g, int tg, float v)
{
    if (KEYS_IN_ROWS ? !(col0 < row0 + 15) : !(col0 + TILE - 1 > row0))
        return;
#pragma unroll
    for (int i = 0; i < 8; i++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int row = row0 + g + 8 * (e >> 1), col = col0 + 8 * i + 2 * tg + (e & 1);
            if (KEYS_IN_ROWS ? row > col : col > row)
                s[4 * i + e] = v;
        }
}
__device__ __forceinline__ void zero32(float (&d)[32])
{
#pragma unroll
    for (int i = 0; i < 32; i++)
        d[i] = 0.0f;
}
/* Accumulator element 4 i + e of this thread (lane l of warp w): row 16 w + l / 4 + 8 (e / 2),
 * column 8 i + 2 (l % 4) + e % 2. The A fragment of k16 step kk (columns 16 kk ..) packs elements
 * of n8 chunks 2 kk and 2 kk + 1: {row lo, chunk 2kk}, {row hi, 2kk}, {lo, 2kk+1}, {hi, 2kk+1}. */
__device__ __forceinline__ void to_afrag(uint32_t (&a)[4][4], const float (&v)[32])
{
#pragma unroll
    for (int i = 0; i < 8; i++) {
        a[i >> 1][(i & 1) * 2] = pack2(v[4 * i], v[4 * i + 1]);
        a[i >> 1][(i & 1) * 2 + 1] = pack2(v[4 * i + 2], v[4 * i + 3]);
    }
}

/* --------------------------------------------------------------- column sums */

/* dst[0 .. 63] = scale * the column sums of the CTA's 64 x 64 accumulator a over its rows before T
 * (thread rows r0 + g and r0 + g + 8, columns 8 i + 2 tg (+ 1)), in a fixed order: a thread's
 * two rows, the warp's eight row groups by a butterfly over g, then the four warps in order.
 * red: 4 x 64 floats of shared memory that nothing else uses now. Every thread of the CTA calls
 * it (it has a barrier). */
__device__ __forceinline__ void cta_colsum(const float (&a)[32], int r0, int g, int tg, int w, int T, float scale,
                                           float *red, float *dst)
{
    const bool in0 = r0 + g < T, in1 = r0 + g + 8 < T;
    float cs[16];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        cs[2 * i] = (in0 ? a[4 * i] : 0.0f) + (in1 ? a[4 * i + 2] : 0.0f);
        cs[2 * i + 1] = (in0 ? a[4 * i + 1] : 0.0f) + (in1 ? a[4 * i + 3] : 0.0f);
    }
#pragma unroll
    for (int off = 4; off < 32; off <<= 1)
#pragma unroll
        for (int k = 0; k < 16; k++)
            cs[k] += __shfl_xor_sync(0xffffffffu, cs[k], off);
    if (g == 0)
#pragma unroll
        for (int i = 0; i < 8; i++) {
            red[w * CW + 8 * i + 2 * tg] = cs[2 * i];
            red[w * CW + 8 * i + 2 * tg + 1] = cs[2 * i + 1];
        }
    __syncthreads();
    if (threadIdx.x < CW)
        dst[threadIdx.x] = scale * (((red[threadIdx.x] + red[CW + threadIdx.x]) + red[2 * CW + threadIdx.x]) +
                                    red[3 * CW + threadIdx.x]);
}

/* Rotary embeddings turned back on this thread's half hf (row pos) of an accumulator of NC
 * chunks before it is stored: column j < HD / 2 pairs with j + HD / 2, and both lie in this
 * thread's registers (HD 64: register groups i and i + 4 of the chunk; HD 128: the same register
 * of chunks 0 and 1). (a, b) -> (a cos + b sin, b cos - a sin), as rope_bwd. */
template <int HD>
__device__ __forceinline__ void rope_back(float (&acc)[HD / CW][32], int hf, int pos, int tg, const float *cs, int T)
{
    constexpr int half = HD / 2;
    const float *cosr = cs + (int64_t)pos * half, *sinr = cs + ((int64_t)T + pos) * half;
#pragma unroll
    for (int i = 0; i < (HD == 64 ? 4 : 8); i++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const int j = 8 * i + 2 * tg + e;
            float &a = acc[0][4 * i + 2 * hf + e];
            float &b = HD == 64 ? acc[0][4 * (i + 4) + 2 * hf + e] : acc[HD / CW - 1][4 * i + 2 * hf + e];
            const float c = cosr[j], s = sinr[j], a0 = a, b0 = b;
            a = a0 * c + b0 * s;
            b = b0 * c - a0 * s;
        }
}

#endif /* MPS_WGMMA */

/* --------------------------------------------------------------- forward */

/* grid (B * H, query blocks of 64), the blocks with the most keys first over all heads. Scores in
 * log2 units (s * scale * log2 e: exp is one ex2). Thread rows r0 + g and r0 + g + 8, r0 = q0 +
 * 16 w. */
template <int HD>
__global__ void __launch_bounds__(NTHREADS, Geo<HD>::FWD_CTAS) k_wg_fwd(bf16 *out, float *lse, const WgArgs a)
{
#if MPS_WGMMA
    constexpr int NC = Geo<HD>::NC;
    constexpr uint32_t TB = Geo<HD>::TB;
    extern __shared__ __align__(16) unsigned char wg_smem[];
    const uint32_t base = (smem_addr(wg_smem) + 1023u) & ~1023u;
    const uint32_t Qs = base, Ks = base + TB, Vs = base + 3 * TB; /* K, V: [2] tiles each */
    const int l = threadIdx.x & 31, w = threadIdx.x >> 5, g = l >> 2, tg = l & 3;
    const int T = a.T, H = a.H, bh = blockIdx.x, b = bh / H, h = bh % H, kvh = h / a.group;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * ROWS;
    const int64_t Cl = (int64_t)H * HD;
    const bf16 *qb = a.q + (int64_t)b * T * a.ldq + (int64_t)h * HD;
    const bf16 *kb = a.k + (int64_t)b * T * a.ldkv + (int64_t)kvh * HD;
    const bf16 *vb = a.v + (int64_t)b * T * a.ldkv + (int64_t)kvh * HD;
    const int nkt = (min(q0 + ROWS, T) + TILE - 1) / TILE;
    const int r0 = q0 + 16 * w;
    const float sl2 = a.sl2;

    tile_load<ROWS, NC>(Qs, qb, a.ldq, q0, T);
    tile_load<TILE, NC>(Ks, kb, a.ldkv, 0, T);
    tile_load<TILE, NC>(Vs, vb, a.ldkv, 0, T);
    cp_async_commit();
    cp_async_wait_all();
    fence_async();
    __syncthreads();

    float o[NC][32], m0 = -INFINITY, m1 = -INFINITY, ls0 = 0.0f, ls1 = 0.0f;
#pragma unroll
    for (int ch = 0; ch < NC; ch++)
        zero32(o[ch]);
    for (int j = 0; j < nkt; j++) {
        const int buf = j & 1, k0 = j * TILE;
        const bool more = j + 1 < nkt;
        const uint32_t K = Ks + buf * TB, V = Vs + buf * TB;
        if (more)
            kv_prefetch<NC>(Ks, Vs, buf, kb, vb, a.ldkv, k0 + TILE, T);
        float s[32];
        wg_fence();
        wg_ss_hd<NC>(s, dlo(Qs), dlo(K)); /* S = Q K^T */
        wg_commit();
        wg_wait<0>();
        reg_fence(s);
        causal_mask<false>(s, r0, k0, g, tg, -INFINITY); /* keys > row out of the softmax */
        float x0 = -INFINITY, x1 = -INFINITY;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            x0 = fmaxf(x0, fmaxf(s[4 * i], s[4 * i + 1]));
            x1 = fmaxf(x1, fmaxf(s[4 * i + 2], s[4 * i + 3]));
        }
        /* a row whose keys are all masked here had key 0 in an earlier tile: m stays finite */
        const float mn0 = fmaxf(m0, quad_max(x0) * sl2), mn1 = fmaxf(m1, quad_max(x1) * sl2);
        const float a0 = ex2(m0 - mn0), a1 = ex2(m1 - mn1);
        m0 = mn0;
        m1 = mn1;
        float ps0 = 0.0f, ps1 = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            s[4 * i] = ex2(fmaf(s[4 * i], sl2, -mn0));
            s[4 * i + 1] = ex2(fmaf(s[4 * i + 1], sl2, -mn0));
            s[4 * i + 2] = ex2(fmaf(s[4 * i + 2], sl2, -mn1));
            s[4 * i + 3] = ex2(fmaf(s[4 * i + 3], sl2, -mn1));
            ps0 += s[4 * i] + s[4 * i + 1];
            ps1 += s[4 * i + 2] + s[4 * i + 3];
        }
        ls0 = ls0 * a0 + ps0;
        ls1 = ls1 * a1 + ps1;
        uint32_t pf[4][4];
        to_afrag(pf, s);
        if (__any_sync(0xffffffffu, a0 != 1.0f || a1 != 1.0f)) { /* (once the maxima settle, rarely) */
#pragma unroll
            for (int ch = 0; ch < NC; ch++)
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    o[ch][4 * i] *= a0;
                    o[ch][4 * i + 1] *= a0;
                    o[ch][4 * i + 2] *= a1;
                    o[ch][4 * i + 3] *= a1;
                }
        }
        wg_fence();
#pragma unroll
        for (int ch = 0; ch < NC; ch++)
#pragma unroll
            for (int kk = 0; kk < 4; kk++)
                wg_rs(o[ch], pf[kk], dlo(V) + DC_STEP * ch + DM_STEP * kk); /* O += P V */
        wg_commit();
        wg_wait<0>(); /* (before the next iteration's loads overwrite this buffer) */
#pragma unroll
        for (int ch = 0; ch < NC; ch++)
            reg_fence(o[ch]);
        tile_arrived(more);
    }

#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const float sum = quad_sum(hf ? ls1 : ls0), inv = 1.0f / sum; /* (every lane: warp-wide shuffles) */
        const int t = r0 + g + 8 * hf;
        if (t >= T)
            continue;
        bf16 *row = out + ((int64_t)b * T + t) * Cl + (int64_t)h * HD + 2 * tg;
#pragma unroll
        for (int ch = 0; ch < NC; ch++)
            store_half_row(row + CW * ch, o[ch], hf, inv);
        if (tg == 0)
            lse[(int64_t)bh * T + t] = ((hf ? m1 : m0) + log2f(sum)) * LN2;
    }
#endif
}

/* --------------------------------------------------------------- backward: dQ */

/* D = dout . out of 64 rows per block (grid as k_wg_dq's, in row order), a half-warp per row (4
 * elements a lane per 64 columns, a fixed butterfly): written to Dv (B, H, T) before k_wg_dq and
 * k_wg_dkv, which then run side by side */
template <int HD>
__global__ void __launch_bounds__(NTHREADS) k_wg_D(float *Dv, const bf16 *dout, const bf16 *out, int T, int H)
{
#if MPS_WGMMA
    const int bh = blockIdx.x, b = bh / H, h = bh % H, q0 = blockIdx.y * ROWS;
    const int64_t Cl = (int64_t)H * HD;
    const int64_t off = (int64_t)b * T * Cl + (int64_t)h * HD;
    const bf16 *gb = dout + off, *ob = out + off;
#pragma unroll
    for (int i = 0; i < ROWS / 8; i++) {
        const int r = (threadIdx.x >> 4) + 8 * i, t = q0 + r, c4 = threadIdx.x & 15;
        float d = 0.0f;
        if (t < T)
#pragma unroll
            for (int ch = 0; ch < HD / CW; ch++)
                d += dot4(ld4g(gb + (int64_t)t * Cl + CW * ch + 4 * c4), ld4g(ob + (int64_t)t * Cl + CW * ch + 4 * c4));
        d = half_warp_sum(d);
        if (c4 == 0 && t < T)
            Dv[(int64_t)bh * T + t] = d;
    }
#endif
}

/* grid (B * H, query blocks of 64), the longest first. D of the block's rows from Dv (k_wg_D); then
 * per key tile: S = Q K^T, dP = dO V^T, P = exp(S - lse), dS = P (dP - D), dQ += dS K; at the end
 * dq = scale dQ, and with colpart (head size 64 only) the block's column sums of dq. */
template <int HD>
__global__ void __launch_bounds__(NTHREADS, Geo<HD>::DQ_CTAS)
    k_wg_dq(const WgArgs a, const float *Dv, const bf16 *dout, const float *lse, float *colpart)
{
#if MPS_WGMMA
    constexpr int NC = Geo<HD>::NC;
    constexpr uint32_t TB = Geo<HD>::TB;
    extern __shared__ __align__(16) unsigned char wg_smem[];
    const uint32_t base = (smem_addr(wg_smem) + 1023u) & ~1023u;
    const uint32_t Qs = base, Gs = base + TB, Ks = base + 2 * TB, Vs = base + 4 * TB;
    float *Dsm = reinterpret_cast<float *>(wg_smem + (base - smem_addr(wg_smem)) + 6 * TB); /* [64] */
    const int l = threadIdx.x & 31, w = threadIdx.x >> 5, g = l >> 2, tg = l & 3;
    const int T = a.T, H = a.H, bh = blockIdx.x, b = bh / H, h = bh % H, kvh = h / a.group;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * ROWS;
    const int64_t Cl = (int64_t)H * HD;
    const bf16 *qb = a.q + (int64_t)b * T * a.ldq + (int64_t)h * HD;
    const bf16 *kb = a.k + (int64_t)b * T * a.ldkv + (int64_t)kvh * HD;
    const bf16 *vb = a.v + (int64_t)b * T * a.ldkv + (int64_t)kvh * HD;
    const bf16 *gb = dout + (int64_t)b * T * Cl + (int64_t)h * HD;
    const int nkt = (min(q0 + ROWS, T) + TILE - 1) / TILE;
    const int r0 = q0 + 16 * w;
    const float sl2 = a.sl2;

    tile_load<ROWS, NC>(Qs, qb, a.ldq, q0, T);
    tile_load<ROWS, NC>(Gs, gb, Cl, q0, T);
    tile_load<TILE, NC>(Ks, kb, a.ldkv, 0, T);
    tile_load<TILE, NC>(Vs, vb, a.ldkv, 0, T);
    cp_async_commit();
    if (threadIdx.x < ROWS)
        Dsm[threadIdx.x] = q0 + (int)threadIdx.x < T ? Dv[(int64_t)bh * T + q0 + threadIdx.x] : 0.0f;
    /* lse (log2 units) of rows r0 + g (+ 8); 0 past T, where Q and dO are zero rows: dS = 0 */
    float Lr[2], Dr[2];
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const int t = r0 + g + 8 * hf;
        Lr[hf] = t < T ? lse[(int64_t)bh * T + t] * LOG2E : 0.0f;
    }
    cp_async_wait_all();
    fence_async();
    __syncthreads();
    Dr[0] = Dsm[16 * w + g];
    Dr[1] = Dsm[16 * w + g + 8];

    float dq[NC][32];
#pragma unroll
    for (int ch = 0; ch < NC; ch++)
        zero32(dq[ch]);
    for (int j = 0; j < nkt; j++) {
        const int buf = j & 1, k0 = j * TILE;
        const bool more = j + 1 < nkt;
        const uint32_t K = Ks + buf * TB, V = Vs + buf * TB;
        if (more)
            kv_prefetch<NC>(Ks, Vs, buf, kb, vb, a.ldkv, k0 + TILE, T);
        float s[32], dp[32];
        wg_fence();
        wg_ss_hd<NC>(s, dlo(Qs), dlo(K)); /* S = Q K^T */
        wg_commit();
        wg_ss_hd<NC>(dp, dlo(Gs), dlo(V)); /* dP = dO V^T */
        wg_commit();
        wg_wait<1>(); /* S; P's exponentials while dP is computed */
        reg_fence(s);
#pragma unroll
        for (int i = 0; i < 32; i++)
            s[i] = ex2(fmaf(s[i], sl2, -Lr[(i >> 1) & 1])); /* P */
        causal_mask<false>(s, r0, k0, g, tg, 0.0f); /* P = 0 for keys > row */
        wg_wait<0>();
        reg_fence(dp);
#pragma unroll
        for (int i = 0; i < 32; i++)
            s[i] *= dp[i] - Dr[(i >> 1) & 1]; /* dS */
        uint32_t dsf[4][4];
        to_afrag(dsf, s);
        wg_fence();
#pragma unroll
        for (int ch = 0; ch < NC; ch++)
#pragma unroll
            for (int kk = 0; kk < 4; kk++)
                wg_rs(dq[ch], dsf[kk], dlo(K) + DC_STEP * ch + DM_STEP * kk); /* dQ += dS K */
        wg_commit();
        wg_wait<0>();
#pragma unroll
        for (int ch = 0; ch < NC; ch++)
            reg_fence(dq[ch]);
        tile_arrived(more);
    }

#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const int t = r0 + g + 8 * hf;
        if (t >= T)
            continue;
        if (a.rope_cs)
            rope_back<HD>(dq, hf, t, tg, a.rope_cs, T);
        bf16 *row = a.dq + ((int64_t)b * T + t) * a.ldq + (int64_t)h * HD + 2 * tg;
#pragma unroll
        for (int ch = 0; ch < NC; ch++)
            store_half_row(row + CW * ch, dq[ch], hf, a.scale);
    }
    if (NC == 1 && colpart) { /* the Q tile's buffer is free: every warp is past the last tile (tile_arrived) */
        float *red = reinterpret_cast<float *>(wg_smem + (base - smem_addr(wg_smem)));
        cta_colsum(dq[0], r0, g, tg, w, T, a.scale, red,
                   colpart + ((int64_t)b * gridDim.y + q0 / ROWS) * a.ldq + (int64_t)h * HD);
    }
#endif
}

/* --------------------------------------------------------------- backward: dK, dV */

/* grid (B * KV, key blocks of 64), the blocks with the most queries (the first) first. For each
 * query head of the kv head's group in turn (so that K and V are read once per group, and the sum
 * over the group's heads needs no atomics), per query tile: S^T = K Q^T, dP^T = V dO^T, P^T =
 * exp(S^T - lse), dS^T = P^T (dP^T - D), dV += P^T dO, dK += dS^T Q; at the end dk = scale dK, dv
 * = dV. The accumulators are transposed (keys x queries). Thread rows (keys) r0 + g (+ 8), r0 = k0
 * + 16 w; the lse (log2 units; +inf past T, which makes P^T zero there) and D of each query tile
 * are staged in shared memory with its rows. */
template <int HD>
__global__ void __launch_bounds__(NTHREADS, Geo<HD>::DKV_CTAS)
    k_wg_dkv(const WgArgs a, const bf16 *dout, const float *lse, const float *Dv, float *colpart)
{
#if MPS_WGMMA
    constexpr int NC = Geo<HD>::NC;
    constexpr uint32_t TB = Geo<HD>::TB;
    extern __shared__ __align__(16) unsigned char wg_smem[];
    const uint32_t base = (smem_addr(wg_smem) + 1023u) & ~1023u;
    const uint32_t Ks = base, Vs = base + TB, Qs = base + 2 * TB, Gs = base + 4 * TB;
    float *Ls = reinterpret_cast<float *>(wg_smem + (base - smem_addr(wg_smem)) + 6 * TB); /* [2][64] */
    float *Ds = Ls + 2 * TILE;                                                              /* [2][64] */
    float *Sl = Ds + 2 * TILE, *Sd = Sl + TILE; /* staging of the next tile's lse, D */
    const int l = threadIdx.x & 31, w = threadIdx.x >> 5, g = l >> 2, tg = l & 3;
    const int T = a.T, H = a.H, KV = H / a.group, b = blockIdx.x / KV, kvh = blockIdx.x % KV;
    const int k0 = blockIdx.y * ROWS;
    const int64_t Cl = (int64_t)H * HD;
    const bf16 *kb = a.k + (int64_t)b * T * a.ldkv + (int64_t)kvh * HD;
    const bf16 *vb = a.v + (int64_t)b * T * a.ldkv + (int64_t)kvh * HD;
    const int jq0 = k0 / TILE, nq = (T + TILE - 1) / TILE - jq0, nit = a.group * nq;
    const int r0 = k0 + 16 * w;
    const float sl2 = a.sl2;
    /* iteration it: query head h0 + it / nq, query tile jq0 + it % nq */
    const int h0 = kvh * a.group;
#define QB(h) (a.q + (int64_t)b * T * a.ldq + (int64_t)(h) * HD)
#define GB(h) (dout + (int64_t)b * T * Cl + (int64_t)(h) * HD)
#define LB(h) (lse + ((int64_t)b * H + (h)) * T)
#define DB(h) (Dv + ((int64_t)b * H + (h)) * T)

    tile_load<ROWS, NC>(Ks, kb, a.ldkv, k0, T);
    tile_load<ROWS, NC>(Vs, vb, a.ldkv, k0, T);
    tile_load<TILE, NC>(Qs, QB(h0), a.ldq, jq0 * TILE, T);
    tile_load<TILE, NC>(Gs, GB(h0), Cl, jq0 * TILE, T);
    cp_async_commit();
    if (threadIdx.x < TILE) {
        const int t = jq0 * TILE + threadIdx.x;
        Ls[threadIdx.x] = t < T ? LB(h0)[t] * LOG2E : INFINITY;
        Ds[threadIdx.x] = t < T ? DB(h0)[t] : 0.0f;
    }
    cp_async_wait_all();
    fence_async();
    __syncthreads();

    float dk[NC][32], dv[NC][32];
#pragma unroll
    for (int ch = 0; ch < NC; ch++) {
        zero32(dk[ch]);
        zero32(dv[ch]);
    }
    for (int it = 0; it < nit; it++) {
        const int buf = it & 1, qt0 = (jq0 + it % nq) * TILE;
        const bool more = it + 1 < nit;
        const uint32_t Q = Qs + buf * TB, G = Gs + buf * TB;
        const float *L = Ls + buf * TILE, *Dq = Ds + buf * TILE;
        const int hn = h0 + (it + 1) / nq, tn0 = (jq0 + (it + 1) % nq) * TILE; /* the next iteration's */
        if (more) {
            tile_load<TILE, NC>(Qs + (buf ^ 1) * TB, QB(hn), a.ldq, tn0, T);
            tile_load<TILE, NC>(Gs + (buf ^ 1) * TB, GB(hn), Cl, tn0, T);
            const int t = tn0 + threadIdx.x;
            if (threadIdx.x < TILE && t < T) {
                cp_async4(Sl + threadIdx.x, LB(hn) + t);
                cp_async4(Sd + threadIdx.x, DB(hn) + t);
            }
            cp_async_commit();
        }
        float s[32], dp[32];
        wg_fence();
        wg_ss_hd<NC>(s, dlo(Ks), dlo(Q)); /* S^T = K Q^T */
        wg_commit();
        wg_ss_hd<NC>(dp, dlo(Vs), dlo(G)); /* dP^T = V dO^T */
        wg_commit();
        wg_wait<1>(); /* S^T; P^T's exponentials while dP^T is computed */
        reg_fence(s);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const float2 lq = *reinterpret_cast<const float2 *>(L + 8 * i + 2 * tg);
#pragma unroll
            for (int e = 0; e < 4; e++)
                s[4 * i + e] = ex2(fmaf(s[4 * i + e], sl2, -((e & 1) ? lq.y : lq.x))); /* P^T */
        }
        causal_mask<true>(s, r0, qt0, g, tg, 0.0f); /* P^T = 0 where a query precedes its key */
        wg_wait<0>();
        reg_fence(dp);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const float2 dq_ = *reinterpret_cast<const float2 *>(Dq + 8 * i + 2 * tg);
#pragma unroll
            for (int e = 0; e < 4; e++)
                dp[4 * i + e] = s[4 * i + e] * (dp[4 * i + e] - ((e & 1) ? dq_.y : dq_.x)); /* dS^T */
        }
        uint32_t pf[4][4], dsf[4][4];
        to_afrag(pf, s);
        to_afrag(dsf, dp);
        wg_fence();
#pragma unroll
        for (int ch = 0; ch < NC; ch++)
#pragma unroll
            for (int kk = 0; kk < 4; kk++)
                wg_rs(dv[ch], pf[kk], dlo(G) + DC_STEP * ch + DM_STEP * kk); /* dV += P^T dO */
#pragma unroll
        for (int ch = 0; ch < NC; ch++)
#pragma unroll
            for (int kk = 0; kk < 4; kk++)
                wg_rs(dk[ch], dsf[kk], dlo(Q) + DC_STEP * ch + DM_STEP * kk); /* dK += dS^T Q */
        wg_commit();
        wg_wait<0>();
#pragma unroll
        for (int ch = 0; ch < NC; ch++) {
            reg_fence(dk[ch]);
            reg_fence(dv[ch]);
        }
        if (more) {
            cp_async_wait_all();
            const int t = tn0 + threadIdx.x;
            if (threadIdx.x < TILE) {
                Ls[(buf ^ 1) * TILE + threadIdx.x] = t < T ? Sl[threadIdx.x] * LOG2E : INFINITY;
                Ds[(buf ^ 1) * TILE + threadIdx.x] = t < T ? Sd[threadIdx.x] : 0.0f;
            }
            fence_async();
        }
        __syncthreads();
    }
#undef QB
#undef GB
#undef LB
#undef DB

#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const int key = r0 + g + 8 * hf;
        if (key >= T)
            continue;
        if (a.rope_cs)
            rope_back<HD>(dk, hf, key, tg, a.rope_cs, T);
        const int64_t at = ((int64_t)b * T + key) * a.ldkv + (int64_t)kvh * HD + 2 * tg;
#pragma unroll
        for (int ch = 0; ch < NC; ch++) {
            store_half_row(a.dk + at + CW * ch, dk[ch], hf, a.scale);
            store_half_row(a.dv + at + CW * ch, dv[ch], hf, 1.0f);
        }
    }
    if (NC == 1 && colpart) { /* the K and V tiles' buffers are free: every warp is past the loop's barrier */
        float *red = reinterpret_cast<float *>(wg_smem + (base - smem_addr(wg_smem)));
        float *part = colpart + ((int64_t)b * gridDim.y + blockIdx.y) * a.ldq + Cl + (int64_t)kvh * HD;
        cta_colsum(dk[0], r0, g, tg, w, T, a.scale, red, part);
        cta_colsum(dv[0], r0, g, tg, w, T, 1.0f, red + 4 * CW, part + Cl);
    }
#endif
}

/* ---------------------------------------------------------------- host side */

template <int HD> int wg_fwd(mps_cuda *c, act_t *out, float *lse, const WgArgs &a, int B, const char *what)
{
    const int nb = (a.T + ROWS - 1) / ROWS;
    if (nb > 65535)
        return -1;
    if (att_smem(c, (const void *)k_wg_fwd<HD>, Geo<HD>::FWD, what) != 0)
        return 0;
    k_wg_fwd<HD><<<dim3((unsigned)(B * a.H), (unsigned)nb), NTHREADS, Geo<HD>::FWD, c->stream>>>(out, lse, a);
    cu_launched(c, what);
    return 0;
}

/* D first (k_wg_D), then the dK/dV kernel on the side stream beside the dQ kernel, so that each
 * fills the other's tail (their blocks run from the longest to the shortest) */
template <int HD>
int wg_bwd(mps_cuda *c, const WgArgs &a, const act_t *dout, const act_t *out, const float *lse, float *Dv, int B,
           float *colpart)
{
    const int nb = (a.T + ROWS - 1) / ROWS;
    if (nb > 65535)
        return -1;
    if (att_smem(c, (const void *)k_wg_dq<HD>, Geo<HD>::DQ, "attention_bwd (wgmma dq)") != 0 ||
        att_smem(c, (const void *)k_wg_dkv<HD>, Geo<HD>::DKV, "attention_bwd (wgmma dk, dv)") != 0)
        return 0;
    const dim3 grid((unsigned)(B * a.H), (unsigned)nb), grid_kv((unsigned)(B * (a.H / a.group)), (unsigned)nb);
    k_wg_D<HD><<<grid, NTHREADS, 0, c->stream>>>(Dv, dout, out, a.T, a.H);
    if (cu_launched(c, "attention_bwd (wgmma D)") != 0 ||
        cu_check(c, cudaEventRecord(c->ev_fork, c->stream), "attention_bwd (fork)") != 0 ||
        cu_check(c, cudaStreamWaitEvent(c->side, c->ev_fork, 0), "attention_bwd (fork)") != 0)
        return 0;
    k_wg_dkv<HD><<<grid_kv, NTHREADS, Geo<HD>::DKV, c->side>>>(a, dout, lse, Dv, colpart);
    if (cu_launched(c, "attention_bwd (wgmma dk, dv)") == 0) {
        k_wg_dq<HD><<<grid, NTHREADS, Geo<HD>::DQ, c->stream>>>(a, Dv, dout, lse, colpart);
        cu_launched(c, "attention_bwd (wgmma dq)");
    }
    /* the join (also after a failed launch: nothing may stay queued on the side stream unseen) */
    if (cu_check(c, cudaEventRecord(c->ev_join, c->side), "attention_bwd (join)") == 0)
        cu_check(c, cudaStreamWaitEvent(c->stream, c->ev_join, 0), "attention_bwd (join)");
    return 0;
}

/* GPT-2's fused qkv (B, T, 3 H 64) as WgArgs; dqkv may be NULL (forward) */
WgArgs gpt2_args(act_t *dqkv, const act_t *qkv, int T, int H)
{
    const int64_t Cl = (int64_t)H * 64;
    WgArgs a;
    a.q = qkv;
    a.k = qkv + Cl;
    a.v = qkv + 2 * Cl;
    a.dq = dqkv;
    a.dk = dqkv ? dqkv + Cl : NULL;
    a.dv = dqkv ? dqkv + 2 * Cl : NULL;
    a.ldq = a.ldkv = 3 * Cl;
    a.T = T;
    a.H = H;
    a.group = 1;
    a.scale = 1.0f / sqrtf(64.0f);
    a.sl2 = a.scale * 1.4426950408889634f;
    a.rope_cs = NULL;
    return a;
}

/* Llama-family q (B, T, H hd), k and v (B, T, KV hd) as WgArgs; NULL when the wgmma kernels do
 * not take them (head size other than 64 and 128, or an operand not 16-byte aligned) */
bool gqa_args(WgArgs *a, act_t *dq, act_t *dk, act_t *dv, const act_t *q, const act_t *k, const act_t *v, int T,
              int H, int KV, int hd, int64_t ldq, int64_t ldkv)
{
    const uintptr_t mis = (uintptr_t)q | (uintptr_t)k | (uintptr_t)v | (uintptr_t)dq | (uintptr_t)dk | (uintptr_t)dv;
    /* 16-byte rows: the tiles load and store 16-byte chunks */
    if ((hd != 64 && hd != 128) || KV <= 0 || H % KV != 0 || (mis & 15) != 0 || ldq % 8 != 0 || ldkv % 8 != 0)
        return false;
    a->q = q;
    a->k = k;
    a->v = v;
    a->dq = dq;
    a->dk = dk;
    a->dv = dv;
    a->ldq = ldq;
    a->ldkv = ldkv;
    a->T = T;
    a->H = H;
    a->group = H / KV;
    a->scale = 1.0f / sqrtf((float)hd);
    a->sl2 = a->scale * 1.4426950408889634f;
    a->rope_cs = NULL;
    return true;
}

} // namespace

int cu_wgmma_available(mps_cuda *c)
{
    int major = 0, minor = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, c->device) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, c->device) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    if (major != 9 || minor != 0)
        return 0;
    int *d = NULL, has = 0;
    if (cudaMalloc(&d, sizeof(int)) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    k_wg_probe<<<1, 1, 0, c->stream>>>(d);
    const int ok = cudaGetLastError() == cudaSuccess &&
                   cudaMemcpyAsync(&has, d, sizeof(int), cudaMemcpyDeviceToHost, c->stream) == cudaSuccess &&
                   cudaStreamSynchronize(c->stream) == cudaSuccess;
    (void)cudaGetLastError();
    cudaFree(d);
    return ok && has == 1;
}

int cu_attention_fwd_wgmma(mps_cuda *c, act_t *out, float *lse, const act_t *qkv, int B, int T, int H)
{
    return wg_fwd<64>(c, out, lse, gpt2_args(NULL, qkv, T, H), B, "attention_fwd (wgmma)");
}

int cu_attention_bwd_wgmma(mps_cuda *c, act_t *dqkv, const act_t *dout, const act_t *qkv, const act_t *out,
                           const float *lse, float *Dv, int B, int T, int H, float *colpart)
{
    return wg_bwd<64>(c, gpt2_args(dqkv, qkv, T, H), dout, out, lse, Dv, B, colpart);
}

int cu_gqa_fwd_wgmma(mps_cuda *c, act_t *out, float *lse, const act_t *q, const act_t *k, const act_t *v, int B, int T,
                     int H, int KV, int hd, int64_t ldq, int64_t ldkv)
{
    WgArgs a;
    if (((uintptr_t)out & 15) != 0 || !gqa_args(&a, NULL, NULL, NULL, q, k, v, T, H, KV, hd, ldq, ldkv))
        return -1;
    return hd == 64 ? wg_fwd<64>(c, out, lse, a, B, "gqa_fwd (wgmma)") : wg_fwd<128>(c, out, lse, a, B, "gqa_fwd (wgmma)");
}

int cu_gqa_bwd_wgmma(mps_cuda *c, act_t *dq, act_t *dk, act_t *dv, const act_t *dout, const act_t *q, const act_t *k,
                     const act_t *v, const act_t *out, const float *lse, float *Dv, int B, int T, int H, int KV, int hd,
                     int64_t ldq, int64_t ldkv, const float *rope_cs)
{
    WgArgs a;
    if ((((uintptr_t)out | (uintptr_t)dout) & 15) != 0 ||
        !gqa_args(&a, dq, dk, dv, q, k, v, T, H, KV, hd, ldq, ldkv))
        return -1;
    a.rope_cs = rope_cs;
    return hd == 64 ? wg_bwd<64>(c, a, dout, out, lse, Dv, B, NULL) : wg_bwd<128>(c, a, dout, out, lse, Dv, B, NULL);
}
