/* Causal grouped-query attention of the Llama block (backend.h gqa_fwd / gqa_bwd), flash style:
 * scores are never stored, the forward keeps an online softmax per query row and the row's
 * log-sum-exp, the backward recomputes the probabilities from it. fp32 arithmetic on bf16
 * operands (plain FMA tiles in shared memory; head sizes up to 128, any even or odd size).
 *
 * Grouped queries: a block of the forward (and of the dq backward) takes rows of one kv head's
 * whole query group, flattened as (position, head in the group), so each K / V tile it loads
 * serves every query head that reads it: K and V are never repeated per query head. The dk, dv
 * backward owns a tile of keys of one kv head and walks every query row of its group.
 *
 * Determinism: each output element is summed by one thread (or one warp in a fixed butterfly) in
 * a fixed order; no atomics. */
#include "kernels_common.cuh"

#define GQA_KT 64   /* keys per tile (two per lane) */
#define GQA_RW 4    /* query rows per warp */
#define GQA_WARPS 8 /* warps per block of the forward and dq kernels */
#define GQA_ROWS (GQA_RW * GQA_WARPS)
#define GQA_QR 16   /* query rows staged at a time by the dk, dv kernel */
#define GQA_MAX_HD 128

/* Shapes shared by the kernels. Rows of q / out are (b, t) with H heads of hd; of k / v, KV heads. */
struct GqaShape {
    int T, H, KV, hd, group;
    float scale;
    int64_t ldq, ldkv; /* row strides of q and dq; of k, v, dk and dv (out and dout: H hd) */
};

/* K and V rows [kt0, kt0 + GQA_KT) of kv head kvh as fp32 rows of stride hd + 1 (odd for every
 * even hd: a lane per row reads across the banks); zeros past T */
__device__ __forceinline__ void gqa_load_kv(float *Ks, float *Vs, const act_t *k, const act_t *v, const GqaShape &s,
                                            int b, int kvh, int kt0)
{
    const int hp = s.hd + 1;
    const int64_t ldk = s.ldkv;
    for (int idx = threadIdx.x; idx < GQA_KT * s.hd; idx += blockDim.x) {
        const int r = idx / s.hd, d = idx - r * s.hd, key = kt0 + r;
        float kv = 0.0f, vv = 0.0f;
        if (key < s.T) {
            const int64_t at = ((int64_t)b * s.T + key) * ldk + (int64_t)kvh * s.hd + d;
            kv = __bfloat162float(k[at]);
            vv = __bfloat162float(v[at]);
        }
        Ks[r * hp + d] = kv;
        Vs[r * hp + d] = vv;
    }
}

/* rows (flattened index fr = t * group + hh) of q-shaped x (rows of stride ldq) as fp32 (GQA_ROWS, hd) */
__device__ __forceinline__ void gqa_load_rows(float *dst, const act_t *x, int64_t ldq, const GqaShape &s, int b,
                                              int kvh, int r0, int nrows, int count)
{
    for (int idx = threadIdx.x; idx < count * s.hd; idx += blockDim.x) {
        const int r = idx / s.hd, d = idx - r * s.hd, fr = r0 + r;
        float val = 0.0f;
        if (fr < nrows) {
            const int t = fr / s.group, h = kvh * s.group + fr % s.group;
            val = __bfloat162float(x[((int64_t)b * s.T + t) * ldq + (int64_t)h * s.hd + d]);
        }
        dst[idx] = val;
    }
}

/* the scores of lane's two keys (kt0 + lane, kt0 + lane + 32) against row qr (shared memory),
 * scaled; -inf past position t */
__device__ __forceinline__ void gqa_scores(float *s0, float *s1, const float *qr, const float *Ks, int hd, int lane,
                                           int kt0, int t, float scale)
{
    const int hp = hd + 1;
    const float *k0 = Ks + lane * hp, *k1 = Ks + (lane + 32) * hp;
    float a = 0.0f, b = 0.0f;
    for (int d = 0; d < hd; d++) {
        const float qd = qr[d];
        a += qd * k0[d];
        b += qd * k1[d];
    }
    *s0 = kt0 + lane <= t ? a * scale : -INFINITY;
    *s1 = kt0 + lane + 32 <= t ? b * scale : -INFINITY;
}

__device__ __forceinline__ float gqa_dot(const float *x, const float *y, int hd)
{
    float a = 0.0f;
    for (int d = 0; d < hd; d++)
        a += x[d] * y[d];
    return a;
}

/* Forward: block (row tile, kv head, batch) of GQA_ROWS flattened rows; warp w has rows
 * w * GQA_RW + i; lane keeps output dims lane + 32 j (j < NJ). */
template <int NJ>
__global__ void __launch_bounds__(GQA_WARPS * 32) k_gqa_fwd(act_t *out, float *lse, const act_t *q, const act_t *k,
                                                            const act_t *v, GqaShape s)
{
    extern __shared__ float sm[];
    const int hd = s.hd, hp = hd + 1;
    float *Qs = sm, *Ks = Qs + GQA_ROWS * hd, *Vs = Ks + GQA_KT * hp;
    const int b = blockIdx.z, kvh = blockIdx.y, nrows = s.T * s.group, r0 = blockIdx.x * GQA_ROWS;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    gqa_load_rows(Qs, q, s.ldq, s, b, kvh, r0, nrows, GQA_ROWS);
    float m[GQA_RW], l[GQA_RW], o[GQA_RW][NJ];
#pragma unroll
    for (int i = 0; i < GQA_RW; i++) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
#pragma unroll
        for (int j = 0; j < NJ; j++)
            o[i][j] = 0.0f;
    }
    const int rlast = (r0 + GQA_ROWS < nrows ? r0 + GQA_ROWS : nrows) - 1;
    const int tmax = rlast / s.group;
    for (int kt0 = 0; kt0 <= tmax; kt0 += GQA_KT) {
        __syncthreads(); /* the previous tile's readers are done (and the rows are staged) */
        gqa_load_kv(Ks, Vs, k, v, s, b, kvh, kt0);
        __syncthreads();
#pragma unroll
        for (int i = 0; i < GQA_RW; i++) {
            const int lr = warp * GQA_RW + i, fr = r0 + lr;
            if (fr >= nrows)
                continue;
            const int t = fr / s.group;
            if (t < kt0) /* every key of the tile lies in the future */
                continue;
            float s0, s1;
            gqa_scores(&s0, &s1, Qs + lr * hd, Ks, hd, lane, kt0, t, s.scale);
            const float mn = fmaxf(m[i], warp_reduce(fmaxf(s0, s1), MaxOp())); /* finite: key kt0 <= t */
            const float corr = expf(m[i] - mn);
            const float p0 = expf(s0 - mn), p1 = expf(s1 - mn);
            l[i] = l[i] * corr + warp_reduce(p0 + p1, SumOp());
            m[i] = mn;
#pragma unroll
            for (int j = 0; j < NJ; j++)
                o[i][j] *= corr;
            const int nk = t - kt0 + 1 < GQA_KT ? t - kt0 + 1 : GQA_KT; /* keys past t have p = 0 */
            for (int key = 0; key < nk; key++) {
                const float pk = __shfl_sync(0xffffffffu, key < 32 ? p0 : p1, key & 31);
                const float *vr = Vs + key * hp;
#pragma unroll
                for (int j = 0; j < NJ; j++) {
                    const int d = lane + 32 * j;
                    if (d < hd)
                        o[i][j] += pk * vr[d];
                }
            }
        }
    }
    const int64_t ldq = (int64_t)s.H * hd;
#pragma unroll
    for (int i = 0; i < GQA_RW; i++) {
        const int fr = r0 + warp * GQA_RW + i;
        if (fr >= nrows)
            continue;
        const int t = fr / s.group, h = kvh * s.group + fr % s.group;
        const float inv = 1.0f / l[i];
        act_t *orow = out + ((int64_t)b * s.T + t) * ldq + (int64_t)h * hd;
#pragma unroll
        for (int j = 0; j < NJ; j++) {
            const int d = lane + 32 * j;
            if (d < hd)
                orow[d] = __float2bfloat16_rn(o[i][j] * inv);
        }
        if (lane == 0)
            lse[((int64_t)b * s.H + h) * s.T + t] = m[i] + logf(l[i]);
    }
}

/* D (B, H, T) = the rows dout . out, one warp per row */
__global__ void k_gqa_rowdot(float *D, const act_t *dout, const act_t *out, int64_t rows, int T, int H, int hd)
{
    const int lane = threadIdx.x & 31;
    const int64_t nw = ((int64_t)gridDim.x * blockDim.x) >> 5;
    for (int64_t r = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; r < rows; r += nw) {
        const int64_t bt = r / H; /* r = (b T + t) H + h: the row of dout / out */
        const int h = (int)(r - bt * H);
        const act_t *a = dout + r * hd, *o = out + r * hd;
        float s = 0.0f;
        for (int d = lane; d < hd; d += 32)
            s += __bfloat162float(a[d]) * __bfloat162float(o[d]);
        s = warp_reduce(s, SumOp());
        if (lane == 0) {
            const int64_t b = bt / T, t = bt - b * T;
            D[(b * H + h) * T + t] = s;
        }
    }
}

/* dq: the forward's layout; per key ds = p (dout . v - D), dq = scale sum ds k */
template <int NJ>
__global__ void __launch_bounds__(GQA_WARPS * 32) k_gqa_bwd_dq(act_t *dq, const act_t *dout, const act_t *q,
                                                               const act_t *k, const act_t *v, const float *lse,
                                                               const float *D, GqaShape s)
{
    extern __shared__ float sm[];
    const int hd = s.hd, hp = hd + 1;
    float *Qs = sm, *Gs = Qs + GQA_ROWS * hd, *Ks = Gs + GQA_ROWS * hd, *Vs = Ks + GQA_KT * hp;
    const int b = blockIdx.z, kvh = blockIdx.y, nrows = s.T * s.group, r0 = blockIdx.x * GQA_ROWS;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    gqa_load_rows(Qs, q, s.ldq, s, b, kvh, r0, nrows, GQA_ROWS);
    gqa_load_rows(Gs, dout, (int64_t)s.H * hd, s, b, kvh, r0, nrows, GQA_ROWS);
    float acc[GQA_RW][NJ], rl[GQA_RW], rd[GQA_RW];
#pragma unroll
    for (int i = 0; i < GQA_RW; i++) {
        const int fr = r0 + warp * GQA_RW + i;
        rl[i] = rd[i] = 0.0f;
        if (fr < nrows) {
            const int t = fr / s.group, h = kvh * s.group + fr % s.group;
            const int64_t at = ((int64_t)b * s.H + h) * s.T + t;
            rl[i] = lse[at];
            rd[i] = D[at];
        }
#pragma unroll
        for (int j = 0; j < NJ; j++)
            acc[i][j] = 0.0f;
    }
    const int rlast = (r0 + GQA_ROWS < nrows ? r0 + GQA_ROWS : nrows) - 1;
    const int tmax = rlast / s.group;
    for (int kt0 = 0; kt0 <= tmax; kt0 += GQA_KT) {
        __syncthreads();
        gqa_load_kv(Ks, Vs, k, v, s, b, kvh, kt0);
        __syncthreads();
#pragma unroll
        for (int i = 0; i < GQA_RW; i++) {
            const int lr = warp * GQA_RW + i, fr = r0 + lr;
            if (fr >= nrows)
                continue;
            const int t = fr / s.group;
            if (t < kt0)
                continue;
            float s0, s1;
            gqa_scores(&s0, &s1, Qs + lr * hd, Ks, hd, lane, kt0, t, s.scale);
            const float *g = Gs + lr * hd;
            const float dp0 = gqa_dot(g, Vs + lane * hp, hd), dp1 = gqa_dot(g, Vs + (lane + 32) * hp, hd);
            const float ds0 = expf(s0 - rl[i]) * (dp0 - rd[i]), ds1 = expf(s1 - rl[i]) * (dp1 - rd[i]);
            const int nk = t - kt0 + 1 < GQA_KT ? t - kt0 + 1 : GQA_KT;
            for (int key = 0; key < nk; key++) {
                const float dk = __shfl_sync(0xffffffffu, key < 32 ? ds0 : ds1, key & 31);
                const float *kr = Ks + key * hp;
#pragma unroll
                for (int j = 0; j < NJ; j++) {
                    const int d = lane + 32 * j;
                    if (d < hd)
                        acc[i][j] += dk * kr[d];
                }
            }
        }
    }
    const int64_t ldq = s.ldq;
#pragma unroll
    for (int i = 0; i < GQA_RW; i++) {
        const int fr = r0 + warp * GQA_RW + i;
        if (fr >= nrows)
            continue;
        const int t = fr / s.group, h = kvh * s.group + fr % s.group;
        act_t *row = dq + ((int64_t)b * s.T + t) * ldq + (int64_t)h * hd;
#pragma unroll
        for (int j = 0; j < NJ; j++) {
            const int d = lane + 32 * j;
            if (d < hd)
                row[d] = __float2bfloat16_rn(acc[i][j] * s.scale);
        }
    }
}

/* dk, dv: block (key tile, kv head, batch) of GQA_KT threads, thread kk owns key kt0 + kk and its
 * rows of dK, dV in shared memory; the group's query rows from position kt0 on, staged GQA_QR
 * at a time, each thread adding them in row order */
__global__ void __launch_bounds__(GQA_KT) k_gqa_bwd_dkdv(act_t *dk, act_t *dv, const act_t *dout, const act_t *q,
                                                        const act_t *k, const act_t *v, const float *lse,
                                                        const float *D, GqaShape s)
{
    extern __shared__ float sm[];
    const int hd = s.hd, hp = hd + 1;
    float *Ks = sm, *Vs = Ks + GQA_KT * hp, *dKs = Vs + GQA_KT * hp, *dVs = dKs + GQA_KT * hp;
    float *Qs = dVs + GQA_KT * hp, *Gs = Qs + GQA_QR * hd, *Ls = Gs + GQA_QR * hd, *Ds = Ls + GQA_QR;
    const int b = blockIdx.z, kvh = blockIdx.y, kt0 = blockIdx.x * GQA_KT, kk = threadIdx.x, key = kt0 + kk;
    const int nrows = s.T * s.group;
    gqa_load_kv(Ks, Vs, k, v, s, b, kvh, kt0);
    for (int d = 0; d < hd; d++) {
        dKs[kk * hp + d] = 0.0f;
        dVs[kk * hp + d] = 0.0f;
    }
    const float *kr = Ks + kk * hp, *vr = Vs + kk * hp;
    float *dkr = dKs + kk * hp, *dvr = dVs + kk * hp;
    for (int c0 = kt0 * s.group; c0 < nrows; c0 += GQA_QR) {
        __syncthreads(); /* the previous rows' readers are done (and K, V are loaded) */
        gqa_load_rows(Qs, q, s.ldq, s, b, kvh, c0, nrows, GQA_QR);
        gqa_load_rows(Gs, dout, (int64_t)s.H * hd, s, b, kvh, c0, nrows, GQA_QR);
        if (threadIdx.x < GQA_QR) {
            const int fr = c0 + threadIdx.x;
            float lv = 0.0f, dv0 = 0.0f;
            if (fr < nrows) {
                const int t = fr / s.group, h = kvh * s.group + fr % s.group;
                const int64_t at = ((int64_t)b * s.H + h) * s.T + t;
                lv = lse[at];
                dv0 = D[at];
            }
            Ls[threadIdx.x] = lv;
            Ds[threadIdx.x] = dv0;
        }
        __syncthreads();
        const int nr = c0 + GQA_QR < nrows ? GQA_QR : nrows - c0;
        for (int r = 0; r < nr; r++) {
            const int t = (c0 + r) / s.group;
            if (key >= s.T || key > t)
                continue;
            const float *qr = Qs + r * hd, *g = Gs + r * hd;
            const float p = expf(gqa_dot(qr, kr, hd) * s.scale - Ls[r]);
            const float ds = p * (gqa_dot(g, vr, hd) - Ds[r]);
            for (int d = 0; d < hd; d++) {
                dvr[d] += p * g[d];
                dkr[d] += ds * qr[d];
            }
        }
    }
    __syncthreads();
    const int64_t ldk = s.ldkv;
    for (int idx = threadIdx.x; idx < GQA_KT * hd; idx += blockDim.x) {
        const int r = idx / hd, d = idx - r * hd;
        if (kt0 + r >= s.T)
            continue;
        const int64_t at = ((int64_t)b * s.T + kt0 + r) * ldk + (int64_t)kvh * hd + d;
        dk[at] = __float2bfloat16_rn(dKs[r * hp + d] * s.scale);
        dv[at] = __float2bfloat16_rn(dVs[r * hp + d]);
    }
}

/* ---------------------------------------------------------------- host side */

static size_t fwd_smem(int hd) { return sizeof(float) * ((size_t)GQA_ROWS * hd + 2u * GQA_KT * (hd + 1)); }
static size_t dq_smem(int hd) { return sizeof(float) * (2u * GQA_ROWS * hd + 2u * GQA_KT * (hd + 1)); }
static size_t dkdv_smem(int hd)
{
    return sizeof(float) * (4u * GQA_KT * (hd + 1) + 2u * GQA_QR * hd + 2u * GQA_QR);
}

/* the shape checks of both directions; 0 when the kernels take it (else an error is recorded) */
static int gqa_shape(mps_cuda *c, GqaShape *s, int B, int T, int H, int KV, int hd, int64_t ldq, int64_t ldkv,
                     const char *what)
{
    if (ldq < (int64_t)H * hd || ldkv < (int64_t)KV * hd) {
        cu_fail(c, "%s: row strides %lld and %lld under the heads' widths %lld and %lld", what, (long long)ldq,
                (long long)ldkv, (long long)H * hd, (long long)KV * hd);
        return -1;
    }
    if (KV <= 0 || H % KV != 0 || hd <= 0 || hd > GQA_MAX_HD || B > 65535 || KV > 65535) {
        cu_fail(c, "%s: %d query heads over %d kv heads of size %d: the CUDA kernels take head sizes up to %d and "
                "whole query groups", what, H, KV, hd, GQA_MAX_HD);
        return -1;
    }
    const int64_t rows = (int64_t)T * (H / KV);
    if ((rows + GQA_ROWS - 1) / GQA_ROWS > INT32_MAX) {
        cu_fail(c, "%s: sequence of %d too long", what, T);
        return -1;
    }
    s->T = T;
    s->H = H;
    s->KV = KV;
    s->hd = hd;
    s->group = H / KV;
    s->scale = 1.0f / sqrtf((float)hd);
    s->ldq = ldq;
    s->ldkv = ldkv;
    return 0;
}

/* raises the kernel's dynamic shared memory limit to bytes (above the 48 KB default) */
static int gqa_smem(mps_cuda *c, const void *kernel, size_t bytes, const char *what)
{
    if (bytes > (size_t)c->smem_optin) {
        cu_fail(c, "%s: needs %zu bytes of shared memory, the device allows %d", what, bytes, c->smem_optin);
        return -1;
    }
    return cu_check(c, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes), what);
}

template <int NJ>
static void gqa_fwd_nj(mps_cuda *c, act_t *out, float *lse, const act_t *q, const act_t *k, const act_t *v, int B,
                       const GqaShape &s)
{
    const size_t smem = fwd_smem(s.hd);
    if (gqa_smem(c, (const void *)k_gqa_fwd<NJ>, smem, "gqa_fwd") != 0)
        return;
    dim3 grid((unsigned)(((int64_t)s.T * s.group + GQA_ROWS - 1) / GQA_ROWS), (unsigned)s.KV, (unsigned)B);
    k_gqa_fwd<NJ><<<grid, GQA_WARPS * 32, smem, c->stream>>>(out, lse, q, k, v, s);
    cu_launched(c, "gqa_fwd");
}

template <int NJ>
static void gqa_dq_nj(mps_cuda *c, act_t *dq, const act_t *dout, const act_t *q, const act_t *k, const act_t *v,
                      const float *lse, const float *D, int B, const GqaShape &s)
{
    const size_t smem = dq_smem(s.hd);
    if (gqa_smem(c, (const void *)k_gqa_bwd_dq<NJ>, smem, "gqa_bwd: dq") != 0)
        return;
    dim3 grid((unsigned)(((int64_t)s.T * s.group + GQA_ROWS - 1) / GQA_ROWS), (unsigned)s.KV, (unsigned)B);
    k_gqa_bwd_dq<NJ><<<grid, GQA_WARPS * 32, smem, c->stream>>>(dq, dout, q, k, v, lse, D, s);
    cu_launched(c, "gqa_bwd: dq");
}

void cu_gqa_fwd(void *ctx, void *out, float *lse, const void *q, const void *k, const void *v, int B, int T, int H,
                int KV, int hd, int64_t ldq, int64_t ldkv)
{
    mps_cuda *c = (mps_cuda *)ctx;
    GqaShape s;
    if (B <= 0 || T <= 0 || H <= 0 || gqa_shape(c, &s, B, T, H, KV, hd, ldq, ldkv, "gqa_fwd") != 0)
        return;
    act_t *o = (act_t *)out;
    const act_t *qa = (const act_t *)q, *ka = (const act_t *)k, *va = (const act_t *)v;
    if (c->wgmma && cu_gqa_fwd_wgmma(c, o, lse, qa, ka, va, B, T, H, KV, hd, ldq, ldkv) == 0)
        return;
    switch ((hd + 31) / 32) {
    case 1: gqa_fwd_nj<1>(c, o, lse, qa, ka, va, B, s); break;
    case 2: gqa_fwd_nj<2>(c, o, lse, qa, ka, va, B, s); break;
    case 3: gqa_fwd_nj<3>(c, o, lse, qa, ka, va, B, s); break;
    default: gqa_fwd_nj<4>(c, o, lse, qa, ka, va, B, s); break;
    }
}

void cu_gqa_bwd(void *ctx, void *dq, void *dk, void *dv, const void *dout, const void *q, const void *k,
                const void *v, const void *out, const float *lse, int B, int T, int H, int KV, int hd, int64_t ldq,
                int64_t ldkv, const float *rope_cs)
{
    mps_cuda *c = (mps_cuda *)ctx;
    GqaShape s;
    if (B <= 0 || T <= 0 || H <= 0 || gqa_shape(c, &s, B, T, H, KV, hd, ldq, ldkv, "gqa_bwd") != 0)
        return;
    const act_t *g = (const act_t *)dout, *qa = (const act_t *)q, *ka = (const act_t *)k, *va = (const act_t *)v;
    const int64_t rows = (int64_t)B * T * H;
    float *D = (float *)cu_scratch(c, SCR_ATTN, (size_t)rows * sizeof(float));
    if (!D)
        return;
    if (c->wgmma && cu_gqa_bwd_wgmma(c, (act_t *)dq, (act_t *)dk, (act_t *)dv, g, qa, ka, va, (const act_t *)out, lse,
                                     D, B, T, H, KV, hd, ldq, ldkv, rope_cs) == 0)
        return;
    k_gqa_rowdot<<<cu_grid(c, rows * 32, 256), 256, 0, c->stream>>>(D, g, (const act_t *)out, rows, T, H, hd);
    if (cu_launched(c, "gqa_bwd: rows") != 0)
        return;
    switch ((hd + 31) / 32) {
    case 1: gqa_dq_nj<1>(c, (act_t *)dq, g, qa, ka, va, lse, D, B, s); break;
    case 2: gqa_dq_nj<2>(c, (act_t *)dq, g, qa, ka, va, lse, D, B, s); break;
    case 3: gqa_dq_nj<3>(c, (act_t *)dq, g, qa, ka, va, lse, D, B, s); break;
    default: gqa_dq_nj<4>(c, (act_t *)dq, g, qa, ka, va, lse, D, B, s); break;
    }
    const size_t smem = dkdv_smem(hd);
    if (gqa_smem(c, (const void *)k_gqa_bwd_dkdv, smem, "gqa_bwd: dk, dv") != 0)
        return;
    dim3 grid((unsigned)((T + GQA_KT - 1) / GQA_KT), (unsigned)KV, (unsigned)B);
    k_gqa_bwd_dkdv<<<grid, GQA_KT, smem, c->stream>>>((act_t *)dk, (act_t *)dv, g, qa, ka, va, lse, D, s);
    if (cu_launched(c, "gqa_bwd: dk, dv") != 0 || !rope_cs)
        return;
    /* these kernels leave the rotary embeddings' backward to a pass of its own */
    cu_rope_bwd(ctx, dq, rope_cs, B, T, H, hd, ldq);
    cu_rope_bwd(ctx, dk, rope_cs, B, T, KV, hd, ldkv);
}
