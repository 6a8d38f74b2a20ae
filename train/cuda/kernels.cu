/* Kernels of the CUDA backend other than GEMM and attention: fp32 math throughout, shapes and the
 * accumulate (+=) convention of ops_cpu.h; outputs that are operand buffers (backend.h) are bf16 and
 * overwritten.
 *
 * Determinism: no float atomics anywhere. Every output element is written by one thread, and
 * every reduction has a fixed shape that depends on the sizes only (not on timing or the SM
 * count): warp butterflies, block trees, fixed row chunks then a second pass over the chunk
 * partials (column sums of bias_grad, layernorm dw/db), fixed grids for sumsq. The embedding
 * backward sorts (token, row) pairs with a stable radix sort (CUB): the rows of a token then lie in
 * ascending row order in one run of the sorted array; fixed 64-position segments of that array
 * are summed piece by piece (many blocks share a long run, e.g. a padding token), then one block
 * per run adds the run's pieces in order to its row of dwte, which no other block touches. */
#include <cub/device/device_radix_sort.cuh>
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
static int row_threads(int64_t cols) { return cols >= 256 ? 256 : cols > 64 ? 128 : 64; }
static unsigned row_grid(const mps_cuda *c, int64_t rows)
{
    int64_t cap = (int64_t)c->nsm * 32;
    return (unsigned)(rows < 1 ? 1 : rows < cap ? rows : cap);
}

/* ---------------------------------------------------------------- elementwise */

#define GELU_K 0.7978845608028654f  // sqrt(2 / pi)
#define GELU_A 0.044715f

__device__ __forceinline__ float gelu_f(float x) { return 0.5f * x * (1.0f + tanhf(GELU_K * (x + GELU_A * x * x * x))); }
__device__ __forceinline__ float gelu_g(float x)
{
    const float th = tanhf(GELU_K * (x + GELU_A * x * x * x));
    const float du = GELU_K * (1.0f + 3.0f * GELU_A * x * x);  // d(tanh argument)/dx
    return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * du;
}

struct AddF {
    float *o;
    const float *a, *b;
    __device__ void one(int64_t i) const { o[i] = a[i] + b[i]; }
    __device__ void four(int64_t i) const
    {
        float4 x = ld4(a, i), y = ld4(b, i);
        st4(o, i, make_float4(x.x + y.x, x.y + y.y, x.z + y.z, x.w + y.w));
    }
};
struct AccF {
    float *d;
    const float *s;
    __device__ void one(int64_t i) const { d[i] += s[i]; }
    __device__ void four(int64_t i) const
    {
        float4 x = ld4(d, i), y = ld4(s, i);
        st4(d, i, make_float4(x.x + y.x, x.y + y.y, x.z + y.z, x.w + y.w));
    }
};
/* four bf16 (8 bytes) at element 4 i4 */
__device__ __forceinline__ void st4_act(act_t *p, int64_t i4, float a, float b, float c, float d)
{
    __nv_bfloat162 lo = __floats2bfloat162_rn(a, b), hi = __floats2bfloat162_rn(c, d);
    uint2 u;
    u.x = *reinterpret_cast<uint32_t *>(&lo);
    u.y = *reinterpret_cast<uint32_t *>(&hi);
    reinterpret_cast<uint2 *>(p)[i4] = u;
}
__device__ __forceinline__ float4 ld4_act(const act_t *p, int64_t i4)
{
    const uint2 u = reinterpret_cast<const uint2 *>(p)[i4];
    const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&u.x));
    const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&u.y));
    return make_float4(lo.x, lo.y, hi.x, hi.y);
}
static int aligned8(const void *p) { return ((uintptr_t)p & 7u) == 0; }

struct ToActF {
    act_t *d;
    const float *s;
    __device__ void one(int64_t i) const { d[i] = __float2bfloat16_rn(s[i]); }
    __device__ void four(int64_t i) const
    {
        float4 v = ld4(s, i);
        st4_act(d, i, v.x, v.y, v.z, v.w);
    }
};
struct FromActF {
    float *d;
    const act_t *s;
    __device__ void one(int64_t i) const { d[i] = __bfloat162float(s[i]); }
    __device__ void four(int64_t i) const { st4(d, i, ld4_act(s, i)); }
};
/* torch.optim.AdamW (single-tensor path), the formula of op_adamw */
struct AdamF {
    float *p, *m, *v;
    const float *g;
    float b1, b2, ob1, ob2, step, bc2_sqrt, eps, decay, gs;
    __device__ __forceinline__ float upd(float pi, float gi, float &mi, float &vi) const
    {
        gi *= gs; /* the clipping factor: the same float product as a separate scale pass */
        mi = b1 * mi + ob1 * gi;
        vi = b2 * vi + ob2 * gi * gi;
        return pi * decay - step * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
    /* element i (float4 i) updated; the new parameter value is returned too */
    __device__ float one(int64_t i) const
    {
        float mi = m[i], vi = v[i];
        const float pn = upd(p[i], g[i], mi, vi);
        p[i] = pn;
        m[i] = mi;
        v[i] = vi;
        return pn;
    }
    __device__ float4 four(int64_t i) const
    {
        float4 pv = ld4(p, i), gv = ld4(g, i), mv = ld4(m, i), vv = ld4(v, i);
        pv.x = upd(pv.x, gv.x, mv.x, vv.x);
        pv.y = upd(pv.y, gv.y, mv.y, vv.y);
        pv.z = upd(pv.z, gv.z, mv.z, vv.z);
        pv.w = upd(pv.w, gv.w, mv.w, vv.w);
        st4(p, i, pv);
        st4(m, i, mv);
        st4(v, i, vv);
        return pv;
    }
};

void cu_add(void *ctx, float *out, const float *a, const float *b, int64_t n)
{
    int vec = cu_aligned16(out) && cu_aligned16(a) && cu_aligned16(b);
    launch_ew((mps_cuda *)ctx, AddF{out, a, b}, n, vec, "add");
}
void cu_accumulate(void *ctx, float *dst, const float *src, int64_t n)
{
    launch_ew((mps_cuda *)ctx, AccF{dst, src}, n, cu_aligned16(dst) && cu_aligned16(src), "accumulate");
}
struct GeluSplitF { /* pre = x, out = gelu(x), both rounded once */
    act_t *o, *pre;
    const float *x;
    __device__ void one(int64_t i) const
    {
        pre[i] = __float2bfloat16_rn(x[i]);
        o[i] = __float2bfloat16_rn(gelu_f(x[i]));
    }
    __device__ void four(int64_t i) const
    {
        float4 v = ld4(x, i);
        st4_act(pre, i, v.x, v.y, v.z, v.w);
        st4_act(o, i, gelu_f(v.x), gelu_f(v.y), gelu_f(v.z), gelu_f(v.w));
    }
};
struct DgeluF { /* d = gelu'(pre) x, pre as stored (bf16), as the fused epilogue sees it */
    act_t *d;
    const float *x;
    const act_t *pre;
    __device__ void one(int64_t i) const { d[i] = __float2bfloat16_rn(gelu_g(__bfloat162float(pre[i])) * x[i]); }
    __device__ void four(int64_t i) const
    {
        float4 v = ld4(x, i), p = ld4_act(pre, i);
        st4_act(d, i, gelu_g(p.x) * v.x, gelu_g(p.y) * v.y, gelu_g(p.z) * v.z, gelu_g(p.w) * v.w);
    }
};
struct GeluActF { /* out = gelu(pre), both bf16 */
    act_t *o;
    const act_t *pre;
    __device__ void one(int64_t i) const { o[i] = __float2bfloat16_rn(gelu_f(__bfloat162float(pre[i]))); }
    __device__ void four(int64_t i) const
    {
        float4 p = ld4_act(pre, i);
        st4_act(o, i, gelu_f(p.x), gelu_f(p.y), gelu_f(p.z), gelu_f(p.w));
    }
};
struct DgeluInF { /* d = gelu'(pre) d, bf16 in place */
    act_t *d;
    const act_t *pre;
    __device__ void one(int64_t i) const
    {
        d[i] = __float2bfloat16_rn(gelu_g(__bfloat162float(pre[i])) * __bfloat162float(d[i]));
    }
    __device__ void four(int64_t i) const
    {
        float4 p = ld4_act(pre, i), v = ld4_act(d, i);
        st4_act(d, i, gelu_g(p.x) * v.x, gelu_g(p.y) * v.y, gelu_g(p.z) * v.z, gelu_g(p.w) * v.w);
    }
};
struct GeluBiasF { /* pre (rows of C, bf16) += bias in place, out = gelu(pre); C % 4 == 0 for four() */
    act_t *o, *pre;
    const float *bias;
    int C;
    __device__ void one(int64_t i) const
    {
        const float p = __bfloat162float(__float2bfloat16_rn(__bfloat162float(pre[i]) + bias[i % C]));
        pre[i] = __float2bfloat16_rn(p);
        o[i] = __float2bfloat16_rn(gelu_f(p));
    }
    __device__ void four(int64_t i) const
    {
        float4 p = ld4_act(pre, i);
        const float4 b = ld4(bias, (i << 2) % C >> 2);
        st4_act(pre, i, p.x + b.x, p.y + b.y, p.z + b.z, p.w + b.w);
        p = ld4_act(pre, i); /* the stored (rounded) values, as the backward will see them */
        st4_act(o, i, gelu_f(p.x), gelu_f(p.y), gelu_f(p.z), gelu_f(p.w));
    }
};
void cu_gelu_bias_act(mps_cuda *c, act_t *out, act_t *pre, const float *bias, int64_t N, int C)
{
    if (!bias) {
        cu_gelu_act(c, out, pre, N * C);
        return;
    }
    const int vec = C % 4 == 0 && aligned8(out) && aligned8(pre) && cu_aligned16(bias);
    launch_ew(c, GeluBiasF{out, pre, bias, C}, N * C, vec, "gelu (bias, bf16)");
}
struct BiasActF { /* rows of C, bf16, += bias; C % 4 == 0 for four() */
    act_t *o;
    const float *bias;
    int C;
    __device__ void one(int64_t i) const { o[i] = __float2bfloat16_rn(__bfloat162float(o[i]) + bias[i % C]); }
    __device__ void four(int64_t i) const
    {
        const float4 p = ld4_act(o, i), b = ld4(bias, (i << 2) % C >> 2);
        st4_act(o, i, p.x + b.x, p.y + b.y, p.z + b.z, p.w + b.w);
    }
};
void cu_add_bias_act(mps_cuda *c, act_t *out, const float *bias, int64_t N, int C)
{
    launch_ew(c, BiasActF{out, bias, C}, N * C, C % 4 == 0 && aligned8(out) && cu_aligned16(bias), "bias (bf16)");
}
void cu_gelu_act(mps_cuda *c, act_t *out, const act_t *pre, int64_t n)
{
    launch_ew(c, GeluActF{out, pre}, n, aligned8(out) && aligned8(pre), "gelu (bf16)");
}
void cu_dgelu_inplace(mps_cuda *c, act_t *d, const act_t *pre, int64_t n)
{
    launch_ew(c, DgeluInF{d, pre}, n, aligned8(d) && aligned8(pre), "dgelu (bf16)");
}
void cu_gelu_split(mps_cuda *c, act_t *out, act_t *pre, const float *x, int64_t n)
{
    launch_ew(c, GeluSplitF{out, pre, x}, n, aligned8(out) && aligned8(pre) && cu_aligned16(x), "gelu (split)");
}
void cu_dgelu_apply(mps_cuda *c, act_t *dpre, const float *x, const act_t *pre, int64_t n)
{
    launch_ew(c, DgeluF{dpre, x, pre}, n, aligned8(dpre) && aligned8(pre) && cu_aligned16(x), "dgelu (split)");
}
int cu_to_act(mps_cuda *c, act_t *dst, const float *src, int64_t n, const char *what)
{
    launch_ew(c, ToActF{dst, src}, n, aligned8(dst) && cu_aligned16(src), what);
    return c->failed ? -1 : 0;
}
int cu_from_act(mps_cuda *c, float *dst, const act_t *src, int64_t n, const char *what)
{
    launch_ew(c, FromActF{dst, src}, n, cu_aligned16(dst) && aligned8(src), what);
    return c->failed ? -1 : 0;
}

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

/* AdamW over the launch's tensors (AdamF's arithmetic), each grad zeroed as it is read and the
 * new parameter written to its bf16 copy where it has one */
__global__ void __launch_bounds__(MT_THREADS) k_adamw_many(MtArgs a, AdamF f)
{
    int64_t b, e;
    const int t = mt_find(a, &b, &e);
    f.p = a.p[t], f.g = a.g[t], f.m = a.m[t], f.v = a.v[t];
    f.decay = a.decay[t];
    float *g = a.g[t];
    act_t *pb = a.pb[t];
    const int vec = dev_aligned16(f.p) && dev_aligned16(g) && dev_aligned16(f.m) && dev_aligned16(f.v) &&
                    ((uintptr_t)pb & 7u) == 0;
    int64_t i = b + threadIdx.x;
    if (vec) { /* b is a multiple of 4: float4 q of the chunk is float4 b / 4 + q of the tensor */
        const int64_t n4 = (e - b) >> 2;
        for (int64_t q = threadIdx.x; q < n4; q += MT_THREADS) {
            const float4 pn = f.four((b >> 2) + q);
            st4(g, (b >> 2) + q, make_float4(0, 0, 0, 0));
            if (pb)
                st4_act(pb, (b >> 2) + q, pn.x, pn.y, pn.z, pn.w);
        }
        i = b + (n4 << 2) + threadIdx.x;
    }
    for (; i < e; i += MT_THREADS) {
        const float pn = f.one(i);
        g[i] = 0.0f;
        if (pb)
            pb[i] = __float2bfloat16_rn(pn);
    }
}

/* ---- the parameters' bf16 copies (cuda_internal.h mps_wcopy) */

const act_t *cu_wcopy_find(mps_cuda *c, const float *w, int64_t n)
{
    for (int i = 0; i < c->nwcopies; i++)
        if (c->wcopies[i].p == w && c->wcopies[i].valid && n <= c->wcopies[i].n)
            return c->wcopies[i].bf;
    return NULL;
}

void cu_wcopy_invalidate(mps_cuda *c, const void *p, size_t bytes)
{
    const char *a = (const char *)p, *z = a + bytes;
    for (int i = 0; i < c->nwcopies; i++) {
        const char *pa = (const char *)c->wcopies[i].p, *pz = pa + (size_t)c->wcopies[i].n * sizeof(float);
        if (!bytes || (pa < z && a < pz))
            c->wcopies[i].valid = 0;
    }
}

void cu_wcopy_free(mps_cuda *c)
{
    for (int i = 0; i < c->nwcopies; i++)
        (void)cudaFreeAsync(c->wcopies[i].bf, c->stream);
    free(c->wcopies);
    c->wcopies = NULL;
    c->nwcopies = c->cap_wcopies = 0;
}

/* the copy of an AdamW job's parameter (made on first use; NULL when there is no memory for it:
 * the products then round the weights themselves, as before) */
static mps_wcopy *wcopy_for(mps_cuda *c, const float *p, int64_t n)
{
    for (int i = 0; i < c->nwcopies; i++)
        if (c->wcopies[i].p == p && c->wcopies[i].n == n)
            return &c->wcopies[i];
    if (c->nwcopies == c->cap_wcopies) {
        int cap = c->cap_wcopies ? 2 * c->cap_wcopies : 256;
        mps_wcopy *w = (mps_wcopy *)realloc(c->wcopies, sizeof *w * (size_t)cap);
        if (!w)
            return NULL;
        c->wcopies = w;
        c->cap_wcopies = cap;
    }
    act_t *bf = NULL;
    if (cudaMallocFromPoolAsync((void **)&bf, (size_t)n * sizeof(act_t), c->pool, c->stream) != cudaSuccess) {
        (void)cudaGetLastError(); /* no room: no copy, not an error */
        return NULL;
    }
    mps_wcopy *w = &c->wcopies[c->nwcopies++];
    w->p = p, w->n = n, w->bf = bf, w->valid = 0;
    return w;
}

void cu_adamw_many(void *ctx, const mps_adamw_job *jobs, int count, const mps_adamw_step *st)
{
    mps_cuda *c = (mps_cuda *)ctx;
    /* the step constants in double on the host, as op_adamw */
    double bc1 = 1.0 - pow(st->beta1, (double)st->t), bc2 = 1.0 - pow(st->beta2, (double)st->t);
    AdamF f;
    memset(&f, 0, sizeof f);
    f.b1 = st->beta1;
    f.b2 = st->beta2;
    f.ob1 = 1.0f - st->beta1;
    f.ob2 = 1.0f - st->beta2;
    f.step = (float)(st->lr / bc1);
    f.bc2_sqrt = (float)sqrt(bc2);
    f.eps = st->eps;
    f.gs = st->grad_scale;
    MtArgs a;
    memset(&a, 0, sizeof a);
    for (int i = 0; i <= count; i++) {
        if (i == count || (a.count == MT_MAX)) { /* launch what is gathered */
            if (a.count > 0) {
                const int64_t blocks = a.first[a.count];
                if (blocks > INT32_MAX) {
                    cu_fail(c, "adamw: %lld chunks in one launch", (long long)blocks);
                    return;
                }
                k_adamw_many<<<(unsigned)blocks, MT_THREADS, 0, c->stream>>>(a, f);
                if (cu_launched(c, "adamw") != 0)
                    return;
            }
            memset(&a, 0, sizeof a);
            if (i == count)
                break;
        }
        const mps_adamw_job *j = &jobs[i];
        if (j->n <= 0)
            continue;
        mps_wcopy *wc = j->read_by_products ? wcopy_for(c, j->param, j->n) : NULL;
        const int k = a.count++;
        a.p[k] = j->param, a.g[k] = j->grad, a.m[k] = j->m, a.v[k] = j->v, a.n[k] = j->n;
        a.pb[k] = wc ? wc->bf : NULL;
        if (wc)
            wc->valid = 1; /* once the launch below has run: the stream orders every reader after it */
        a.decay[k] = 1.0f - st->lr * j->weight_decay;
        a.first[k + 1] = a.first[k] + (j->n + MT_CHUNK - 1) / MT_CHUNK;
    }
}

/* ---------------------------------------------------------------- row kernels */

/* out (N, C) = a + b + bias (C) */
__global__ void k_residual_bias(float *out, const float *a, const float *b, const float *bias, int64_t N, int C,
                                int vec)
{
    for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {
        const int64_t o = r * C;
        if (vec) {
            const int64_t o4 = o >> 2;
            for (int j = threadIdx.x; j < C / 4; j += blockDim.x) {
                float4 x = ld4(a, o4 + j), y = ld4(b, o4 + j), z = ld4(bias, j);
                st4(out, o4 + j, make_float4(x.x + y.x + z.x, x.y + y.y + z.y, x.z + y.z + z.z, x.w + y.w + z.w));
            }
        } else {
            for (int j = threadIdx.x; j < C; j += blockDim.x)
                out[o + j] = a[o + j] + b[o + j] + bias[j];
        }
    }
}

void cu_residual_bias(void *ctx, float *out, const float *a, const float *b, const float *bias, int64_t N, int C)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (N <= 0 || C <= 0)
        return;
    int vec = C % 4 == 0 && cu_aligned16(out) && cu_aligned16(a) && cu_aligned16(b) && cu_aligned16(bias);
    k_residual_bias<<<row_grid(c, N), row_threads(vec ? C / 4 : C), 0, c->stream>>>(out, a, b, bias, N, C, vec);
    cu_launched(c, "residual_bias");
}

/* out (N, C) += bias (C) */
__global__ void k_add_bias_rows(float *out, const float *bias, int64_t N, int C)
{
    for (int64_t r = blockIdx.x; r < N; r += gridDim.x)
        for (int j = threadIdx.x; j < C; j += blockDim.x)
            out[r * C + j] += bias[j];
}

void cu_add_bias_rows(mps_cuda *c, float *out, const float *bias, int64_t N, int C)
{
    if (N <= 0 || C <= 0)
        return;
    k_add_bias_rows<<<row_grid(c, N), row_threads(C), 0, c->stream>>>(out, bias, N, C);
    cu_launched(c, "bias add");
}

/* out (N, C) = wte[tok - v0] for owned tokens, else 0 */
__global__ void k_embed_fwd(float *out, const int32_t *tokens, int64_t N, const float *wte, int64_t v0, int64_t Vl,
                            int C)
{
    for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {
        const int64_t tok = tokens[r];
        float *o = out + r * C;
        if (tok >= v0 && tok < v0 + Vl) {
            const float *w = wte + (tok - v0) * C;
            for (int j = threadIdx.x; j < C; j += blockDim.x)
                o[j] = w[j];
        } else {
            for (int j = threadIdx.x; j < C; j += blockDim.x)
                o[j] = 0.0f;
        }
    }
}

void cu_embed_fwd(void *ctx, float *out, const int32_t *tokens, int64_t N, const float *wte, int64_t v0, int64_t Vl,
                  int C)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (N <= 0 || C <= 0)
        return;
    k_embed_fwd<<<row_grid(c, N), row_threads(C), 0, c->stream>>>(out, tokens, N, wte, v0, Vl, C);
    cu_launched(c, "embed_fwd");
}

/* x (B*T, C) += wpe[t] */
__global__ void k_pos_fwd(float *x, const float *wpe, int64_t rows, int T, int C)
{
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const float *p = wpe + (r % T) * C;
        float *xr = x + r * C;
        for (int j = threadIdx.x; j < C; j += blockDim.x)
            xr[j] += p[j];
    }
}

void cu_pos_fwd(void *ctx, float *x, const float *wpe, int B, int T, int C)
{
    mps_cuda *c = (mps_cuda *)ctx;
    int64_t rows = (int64_t)B * T;
    if (rows <= 0 || C <= 0)
        return;
    k_pos_fwd<<<row_grid(c, rows), row_threads(C), 0, c->stream>>>(x, wpe, rows, T, C);
    cu_launched(c, "pos_fwd");
}

/* dwpe (T, C) += sum over b of dx (B, T, C): one thread per element of dwpe, b in order */
__global__ void k_pos_bwd(float *dwpe, const float *dx, int B, int T, int C)
{
    const int64_t n = (int64_t)T * C, stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float acc = dwpe[i];
        for (int b = 0; b < B; b++)
            acc += dx[(int64_t)b * n + i];
        dwpe[i] = acc;
    }
}

void cu_pos_bwd(void *ctx, float *dwpe, const float *dx, int B, int T, int C)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (!dwpe || (int64_t)T * C <= 0)
        return;
    k_pos_bwd<<<cu_grid(c, (int64_t)T * C, EW_THREADS), EW_THREADS, 0, c->stream>>>(dwpe, dx, B, T, C);
    cu_launched(c, "pos_bwd");
}

/* ---------------------------------------------------------------- embedding backward */

/* sort keys: the local row of owned tokens, Vl (sorted last, then skipped) for the others */
__global__ void k_embed_keys(uint32_t *keys, uint32_t *vals, const int32_t *tokens, int64_t N, int64_t v0, int64_t Vl)
{
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < N; i += stride) {
        const int64_t tok = tokens[i];
        keys[i] = (uint32_t)((tok >= v0 && tok < v0 + Vl) ? tok - v0 : Vl);
        vals[i] = (uint32_t)i;
    }
}

#define EMB_SEG 64 /* sorted positions per block of the first pass */

/* Pass 1, one block per segment of EMB_SEG sorted positions: a run of equal keys is cut into
 * pieces at the segment boundaries; pbuf[p] (C floats) = the sum, in position order, of the dout
 * rows of the piece that starts at position p (pieces of owned tokens only). */
__global__ void k_embed_pieces(float *pbuf, const float *dout, const uint32_t *keys, const uint32_t *vals, int64_t N,
                               int64_t Vl, int C)
{
    __shared__ uint32_t sk[EMB_SEG], sv[EMB_SEG];
    for (int64_t s = blockIdx.x; s * EMB_SEG < N; s += gridDim.x) {
        const int64_t p0 = s * EMB_SEG;
        const int n = (int)(N - p0 < EMB_SEG ? N - p0 : EMB_SEG);
        __syncthreads();  // the previous segment's readers are done
        for (int q = threadIdx.x; q < n; q += blockDim.x) {
            sk[q] = keys[p0 + q];
            sv[q] = vals[p0 + q];
        }
        __syncthreads();
        for (int col = threadIdx.x; col < C; col += blockDim.x) {
            float acc = 0.0f;
            int start = 0;
            for (int q0 = 0; q0 < n; q0 += 8) {
                float x[8];  // eight loads in flight, then added in position order
#pragma unroll
                for (int u = 0; u < 8; u++) {
                    const int q = q0 + u;
                    x[u] = (q < n && sk[q] < Vl) ? dout[(int64_t)sv[q] * C + col] : 0.0f;
                }
#pragma unroll
                for (int u = 0; u < 8; u++) {
                    const int q = q0 + u;
                    if (q >= n)
                        break;
                    if (q > 0 && sk[q] != sk[q - 1]) {  // a new piece: store the finished one
                        if (sk[start] < Vl)
                            pbuf[(p0 + start) * C + col] = acc;
                        acc = 0.0f;
                        start = q;
                    }
                    acc += x[u];
                }
            }
            if (sk[start] < Vl)
                pbuf[(p0 + start) * C + col] = acc;
        }
    }
}

/* Pass 2, one block per run (found at its first position i): dwte[key] += its pieces, i.e.
 * pbuf[i] then pbuf at each segment boundary inside the run, in order. A row of dwte belongs to
 * exactly one run. */
__global__ void k_embed_runs(float *dwte, const float *pbuf, const uint32_t *keys, int64_t N, int64_t Vl, int C)
{
    for (int64_t i = blockIdx.x; i < N; i += gridDim.x) {
        const uint32_t key = keys[i];
        if (key >= Vl || (i > 0 && keys[i - 1] == key))
            continue;  // uniform over the block
        /* the run is a prefix of what follows (keys are sorted): count its members blockDim at a time */
        int64_t end = i + 1;
        for (;;) {
            const int64_t j = end + threadIdx.x;
            const int cnt = __syncthreads_count(j < N && keys[j] == key);
            end += cnt;
            if (cnt < (int)blockDim.x)
                break;
        }
        const int64_t b0 = (i / EMB_SEG + 1) * EMB_SEG;  // first segment boundary after i
        float *d = dwte + (int64_t)key * C;
        for (int col = threadIdx.x; col < C; col += blockDim.x) {
            float acc = pbuf[i * C + col];
            for (int64_t b = b0; b < end; b += EMB_SEG)
                acc += pbuf[b * C + col];
            d[col] += acc;
        }
    }
}

void cu_embed_bwd(void *ctx, float *dwte, const float *dout, const int32_t *tokens, int64_t N, int64_t v0, int64_t Vl,
                  int C)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (!dwte || N <= 0 || C <= 0 || Vl <= 0)
        return;
    if (N > INT32_MAX || Vl >= (int64_t)UINT32_MAX) {
        cu_fail(c, "embed_bwd: N = %lld or Vl = %lld too large", (long long)N, (long long)Vl);
        return;
    }
    uint32_t *kv = (uint32_t *)cu_scratch(c, SCR_SORT, (size_t)N * 4 * sizeof(uint32_t));
    if (!kv)
        return;
    uint32_t *kin = kv, *vin = kv + N, *kout = kv + 2 * N, *vout = kv + 3 * N;
    k_embed_keys<<<cu_grid(c, N, EW_THREADS), EW_THREADS, 0, c->stream>>>(kin, vin, tokens, N, v0, Vl);
    if (cu_launched(c, "embed_bwd (keys)") != 0)
        return;
    int bits = 1;
    while (bits < 32 && ((int64_t)1 << bits) <= Vl)  // Vl itself must fit
        bits++;
    size_t tmp_bytes = 0;
    if (cu_check(c, cub::DeviceRadixSort::SortPairs(nullptr, tmp_bytes, kin, kout, vin, vout, (int)N, 0, bits, c->stream),
                 "embed_bwd (sort size)") != 0)
        return;
    void *tmp = cu_scratch(c, SCR_CUB, tmp_bytes);
    if (!tmp)
        return;
    if (cu_check(c, cub::DeviceRadixSort::SortPairs(tmp, tmp_bytes, kin, kout, vin, vout, (int)N, 0, bits, c->stream),
                 "embed_bwd (sort)") != 0)
        return;
    float *pbuf = (float *)cu_scratch(c, SCR_EMB, (size_t)N * C * sizeof(float));  // (N, C), piece starts only
    if (!pbuf)
        return;
    const int64_t nseg = (N + EMB_SEG - 1) / EMB_SEG;
    k_embed_pieces<<<row_grid(c, nseg), row_threads(C), 0, c->stream>>>(pbuf, dout, kout, vout, N, Vl, C);
    if (cu_launched(c, "embed_bwd (pieces)") != 0)
        return;
    k_embed_runs<<<row_grid(c, N), row_threads(C), 0, c->stream>>>(dwte, pbuf, kout, N, Vl, C);
    cu_launched(c, "embed_bwd (runs)");
}

/* ---------------------------------------------------------------- column sums */

#define CS_TX 32
#define CS_TY 8
#define CS_CHUNKS 256       /* at most this many row chunks: the second pass is one chunk */
#define CS_ONEPASS_ROWS 8192 /* colsums(): up to this many rows in one pass */

__device__ __forceinline__ float2 to_f2(const float *p) { return make_float2(p[0], p[1]); }
__device__ __forceinline__ float2 to_f2(const act_t *p)
{
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(p));
}
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(act_t v) { return __bfloat162float(v); }

/* Up to 3 arrays (rows, C) whose column sums one launch takes (blockIdx.z picks the array). */
template <class T>
struct ColSums {
    float *dst[3];
    const T *src[3];
    int acc[3];
};

/* Column sums of rows [y R, (y + 1) R) of the arrays (y = blockIdx.y), V adjacent columns per
 * thread (V = 2: bf16x2 loads, a warp reads 128 bytes of a row rather than 64; C even, src 4-byte
 * aligned). Thread (tx, ty) sums rows ty, ty + 8, ... of its columns in order, then the 8 partial
 * sums are added in ty order: the order, and so the bits, depend only on (rows, C, R), not on V.
 * dst[k][c] += the sum when acc[k], else dst[k][y * C + c] = it. */
template <class T, int V>
__global__ void k_colsum(ColSums<T> a, int64_t rows, int C, int64_t R)
{
    __shared__ float sh[V][CS_TY][CS_TX + 1];
    const int col = V * (blockIdx.x * CS_TX + threadIdx.x), k = blockIdx.z;
    const T *x = a.src[k];
    const int64_t r0 = (int64_t)blockIdx.y * R, r1 = r0 + R < rows ? r0 + R : rows;
    float s[V];
#pragma unroll
    for (int v = 0; v < V; v++)
        s[v] = 0.0f;
    if (col < C)
#pragma unroll 4
        for (int64_t r = r0 + threadIdx.y; r < r1; r += CS_TY) {
            if (V == 2) {
                const float2 p = to_f2(x + r * C + col);
                s[0] += p.x;
                s[V - 1] += p.y;
            } else {
                s[0] += to_f(x[r * C + col]);
            }
        }
#pragma unroll
    for (int v = 0; v < V; v++)
        sh[v][threadIdx.y][threadIdx.x] = s[v];
    __syncthreads();
    if (threadIdx.y == 0 && col < C) {
        float *d = a.acc[k] ? a.dst[k] : a.dst[k] + (int64_t)blockIdx.y * C;
#pragma unroll
        for (int v = 0; v < V; v++) {
            float t = 0.0f;
            for (int q = 0; q < CS_TY; q++)
                t += sh[v][q][threadIdx.x];
            d[col + v] = a.acc[k] ? d[col + v] + t : t;
        }
    }
}

/* one pass over rows in chunks of R (nch of them) for n arrays; bf16 arrays two columns a thread
 * where they allow it */
template <class T>
static void colsum_pass(mps_cuda *c, const ColSums<T> &a, int n, unsigned nch, int64_t rows, int C, int64_t R)
{
    const dim3 blk(CS_TX, CS_TY);
    bool pairs = sizeof(T) == sizeof(act_t) && C % 2 == 0;
    for (int k = 0; k < n; k++)
        pairs = pairs && ((uintptr_t)a.src[k] & 3u) == 0;
    if (pairs)
        k_colsum<T, 2><<<dim3((unsigned)((C / 2 + CS_TX - 1) / CS_TX), nch, (unsigned)n), blk, 0, c->stream>>>(a, rows, C, R);
    else
        k_colsum<T, 1><<<dim3((unsigned)((C + CS_TX - 1) / CS_TX), nch, (unsigned)n), blk, 0, c->stream>>>(a, rows, C, R);
}

/* dst (C) = (or += when acc) the column sums of x (rows, C): in chunks of rows whose partial sums
 * a second pass adds, the chunk size a function of the row count only (so the order of the sums
 * is one of (rows, C)) */
template <class T>
static void colsum_to(mps_cuda *c, float *dst, int acc, const T *x, int64_t rows, int C, const char *what)
{
    if (C <= 0)
        return;
    if (rows <= 0) {
        if (!acc)
            cu_check(c, cudaMemsetAsync(dst, 0, (size_t)C * sizeof(float), c->stream), what);
        return;
    }
    int64_t R = (rows + CS_CHUNKS - 1) / CS_CHUNKS;
    if (R < 256)
        R = 256;
    const int64_t nch = (rows + R - 1) / R;
    ColSums<T> one = {{dst}, {x}, {acc}};
    if (nch == 1) {
        colsum_pass(c, one, 1, 1, rows, C, R);
        cu_launched(c, what);
        return;
    }
    float *part = (float *)cu_scratch(c, SCR_COLSUM, (size_t)nch * C * sizeof(float));
    if (!part)
        return;
    ColSums<T> first = {{part}, {x}, {0}};
    colsum_pass(c, first, 1, (unsigned)nch, rows, C, R);
    if (cu_launched(c, what) != 0)
        return;
    ColSums<float> second = {{dst}, {part}, {acc}};
    colsum_pass(c, second, 1, 1, nch, C, CS_CHUNKS);
    cu_launched(c, what);
}

/* The column sums of n (<= 3) fp32 arrays (rows, C) in one launch, one pass each: the layernorm
 * backward's block partials of dw, db and dinp, which would otherwise take two launches each.
 * dst[k] (C) += the sums when acc[k], else = them. */
static void colsums(mps_cuda *c, int n, float *const *dst, const float *const *src, const int *acc, int64_t rows, int C,
                    const char *what)
{
    if (n <= 0 || C <= 0)
        return;
    if (rows <= 0 || rows > CS_ONEPASS_ROWS) {
        for (int k = 0; k < n; k++)
            colsum_to(c, dst[k], acc[k], src[k], rows, C, what);
        return;
    }
    ColSums<float> a;
    memset(&a, 0, sizeof a);
    for (int k = 0; k < n; k++)
        a.dst[k] = dst[k], a.src[k] = src[k], a.acc[k] = acc[k];
    colsum_pass(c, a, n, 1, rows, C, rows);
    cu_launched(c, what);
}

void cu_colsum_acc(mps_cuda *c, float *dst, const float *x, int64_t rows, int C, const char *what)
{
    colsum_to(c, dst, 1, x, rows, C, what);
}
void cu_colsum_acc_act(mps_cuda *c, float *dst, const act_t *x, int64_t rows, int C, const char *what)
{
    colsum_to(c, dst, 1, x, rows, C, what);
}

void cu_bias_grad(void *ctx, float *db, const float *dout, int64_t N, int C)
{
    if (db)
        cu_colsum_acc((mps_cuda *)ctx, db, dout, N, C, "bias_grad");
}

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
 * then over the warps in order. */
template <class DT> /* dout: fp32, or an operand buffer */
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
        const float m = mean[r], rs = rstd[r];
        if (o.dinp) {
            float sg = 0.0f, sgx = 0.0f;
            for (int j = lane; j < C; j += 32) {
                const float gw = to_f(g[j]) * w[j];
                sg += gw;
                sgx += gw * ((x[j] - m) * rs);
            }
            const float mg = warp_reduce(sg, SumOp()) / C, mgx = warp_reduce(sgx, SumOp()) / C;
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

template <int K, class DT>
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
        const float m = mean[r], rs = rstd[r];
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
            const float mg = warp_reduce(sg, SumOp()) / C, mgx = warp_reduce(sgx, SumOp()) / C;
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

/* launches k_ln_bwd4<K> for the smallest K that holds C (up to C = 1024), or returns 0 (the scalar
 * kernel runs) */
template <class DT, class... A>
static int ln_bwd_vec(mps_cuda *c, unsigned nblk, size_t smem, int C, A... args)
{
    if (C % 4 != 0)
        return 0;
    const int k = (C / 4 + 31) / 32;
    switch (k) {
#define LNB_CASE(KK)                                                                                        \
    case KK:                                                                                                \
        if (smem > 48 * 1024 &&                                                                             \
            cu_check(c, cudaFuncSetAttribute(k_ln_bwd4<KK, DT>, cudaFuncAttributeMaxDynamicSharedMemorySize, \
                                             (int)smem), "layernorm_bwd") != 0)                             \
            return 1;                                                                                       \
        k_ln_bwd4<KK, DT><<<nblk, LNB_WARPS * 32, smem, c->stream>>>(args...);                             \
        return 1;
        LNB_CASE(1) LNB_CASE(2) LNB_CASE(3) LNB_CASE(4) LNB_CASE(5) LNB_CASE(6) LNB_CASE(7) LNB_CASE(8)
#undef LNB_CASE
    /* wider rows would not fit in registers (6 K float4 per lane) */
    default: return 0;
    }
}

template <class DT>
static void ln_bwd_launch(mps_cuda *c, const LnBwdOut &o, unsigned nblk, size_t smem, int vec, const DT *dout,
                          const float *inp, const float *w, const float *mean, const float *rstd, int64_t N, int C)
{
    if (smem > 48 * 1024 &&
        cu_check(c, cudaFuncSetAttribute(k_ln_bwd<DT>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                 "layernorm_bwd") != 0)
        return;
    if (!(vec && ln_bwd_vec<DT>(c, nblk, smem, C, o, dout, inp, w, mean, rstd, N, C)))
        k_ln_bwd<DT><<<nblk, LNB_WARPS * 32, smem, c->stream>>>(o, dout, inp, w, mean, rstd, N, C);
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
    size_t smem = 0;
    if (dw || db || dinp_colsum) {
        if (dw || db) {
            o.pdw = (float *)cu_scratch(c, SCR_PART, (size_t)nblk * C * sizeof(float));
            o.pdb = (float *)cu_scratch(c, SCR_PART2, (size_t)nblk * C * sizeof(float));
            if (!o.pdw || !o.pdb)
                return;
        }
        if (dinp_colsum && !(o.pdx = (float *)cu_scratch(c, SCR_PART3, (size_t)nblk * C * sizeof(float))))
            return;
        smem = (size_t)3 * LNB_WARPS * C * sizeof(float);
        if ((int64_t)smem > c->smem_optin) {
            cu_fail(c, "layernorm_bwd: C = %d needs %zu bytes of shared memory", C, smem);
            return;
        }
    }
    if (nblk > INT32_MAX) {
        cu_fail(c, "layernorm_bwd: N = %lld too large", (long long)N);
        return;
    }
    const int vec = cu_aligned16(dinp) && (dout_act ? aligned8(dout) : cu_aligned16(dout)) && cu_aligned16(inp) &&
                    cu_aligned16(w) && (!dinp_act || aligned8(dinp_act));
    if (dout_act)
        ln_bwd_launch(c, o, (unsigned)nblk, smem, vec, (const act_t *)dout, inp, w, mean, rstd, N, C);
    else
        ln_bwd_launch(c, o, (unsigned)nblk, smem, vec, (const float *)dout, inp, w, mean, rstd, N, C);
    if (cu_launched(c, "layernorm_bwd") != 0)
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
    colsums(c, n, dst, src, acc, nblk, C, "layernorm_bwd (column sums)");
}

/* ---------------------------------------------------------------- cross-entropy */

/* how many of the Vl local ids are real (< V) */
static int64_t xent_nreal(int64_t Vl, int64_t v0, int64_t V)
{
    int64_t r = V - v0;
    return r < 0 ? 0 : (r > Vl ? Vl : r);
}

#define XE_THREADS 256

/* online softmax statistics: (max, sum of exp(x - max)) pairs combine exactly in any fixed order */
struct MaxSum {
    float m, s;
};
__device__ __forceinline__ MaxSum ms_add(MaxSum a, float x)
{
    if (x > a.m) {
        a.s = a.s * expf(a.m - x) + 1.0f; /* exp(-inf) = 0 for the first element */
        a.m = x;
    } else {
        a.s += expf(x - a.m);
    }
    return a;
}
__device__ __forceinline__ MaxSum ms_join(MaxSum a, MaxSum b)
{
    const float m = fmaxf(a.m, b.m);
    if (m == -INFINITY)
        return a;
    return MaxSum{m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}
__device__ __forceinline__ MaxSum ms_shfl(MaxSum v, int o)
{
    return MaxSum{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
}

/* One block per row, one pass over the logits: local max, sum of exp relative to it, target
 * logit. A thread folds its elements in order, then a fixed tree (warp butterflies, warps in
 * order) joins the pairs: deterministic. vec: rows are 16-byte aligned (aligned base, Vl % 8 == 0). */
__global__ void k_xent_stats(float *rowmax, float *sumexp, float *tlogit, const act_t *logits, const int32_t *targets,
                             int64_t N, int64_t Vl, int64_t v0, int64_t nr, int vec)
{
    __shared__ MaxSum sh[32];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    for (int64_t i = blockIdx.x; i < N; i += gridDim.x) {
        const act_t *l = logits + i * Vl; // (Vl)
        MaxSum a = {-INFINITY, 0.0f};
        int64_t j0 = 0;
        if (vec) { /* 8 at a time: their max first, then 8 independent exps (not a chain of 8) */
            const int64_t n8 = nr >> 3;
            for (int64_t j = threadIdx.x; j < n8; j += blockDim.x) {
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
                    a.s *= expf(a.m - cm); /* exp(-inf) = 0 for the first chunk */
                    a.m = cm;
                }
                float e[8];
#pragma unroll
                for (int q = 0; q < 8; q++)
                    e[q] = expf(x[q] - a.m);
                a.s += ((e[0] + e[1]) + (e[2] + e[3])) + ((e[4] + e[5]) + (e[6] + e[7]));
            }
            j0 = n8 << 3;
        }
        for (int64_t j = j0 + threadIdx.x; j < nr; j += blockDim.x)
            a = ms_add(a, __bfloat162float(l[j]));
        for (int o = 16; o > 0; o >>= 1)
            a = ms_join(a, ms_shfl(a, o));
        __syncthreads(); /* the previous row's readers of sh are done */
        if (lane == 0)
            sh[w] = a;
        __syncthreads();
        if (threadIdx.x == 0) {
            MaxSum t = sh[0];
            for (int k = 1; k < nw; k++)
                t = ms_join(t, sh[k]);
            rowmax[i] = t.m;
            sumexp[i] = t.s;
            const int64_t tj = (int64_t)targets[i] - v0;
            tlogit[i] = (tj >= 0 && tj < Vl) ? __bfloat162float(l[tj]) : 0.0f;
        }
    }
}

__device__ __forceinline__ float xent_d(float l, int64_t j, int64_t nr, int64_t tj, float m, float inv, float scale)
{
    if (j >= nr)
        return 0.0f;
    const float p = expf(l - m) * inv;
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

__global__ void k_xent_rescale(float *sumexp, const float *rowmax, const float *gmax, int64_t N)
{
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < N; i += stride)
        sumexp[i] = rowmax[i] == -INFINITY ? 0.0f : sumexp[i] * expf(rowmax[i] - gmax[i]);
}

void cu_xent_stats(void *ctx, float *rowmax, float *sumexp, float *tlogit, const void *logits, const int32_t *targets,
                   int64_t N, int64_t Vl, int64_t v0, int64_t V)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (N <= 0)
        return;
    const int vec = Vl % 8 == 0 && cu_aligned16(logits);
    k_xent_stats<<<row_grid(c, N), XE_THREADS, 0, c->stream>>>(rowmax, sumexp, tlogit, (const act_t *)logits, targets, N, Vl, v0,
                                                               xent_nreal(Vl, v0, V), vec);
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

/* ---------------------------------------------------------------- host results */

/* one block of 1024: out = sum of log(sumexp) + gmax - tlogit, in double, fixed tree */
__global__ void k_loss_sum(double *out, const float *gmax, const float *sumexp, const float *tlogit, int64_t N)
{
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x)
        s += (double)logf(sumexp[i]) + (double)gmax[i] - (double)tlogit[i];
    s = block_reduce(s, SumOp(), 0.0);
    if (threadIdx.x == 0)
        *out = s;
}

#define SQ_MAX_BLOCKS 1024 /* dres: this many doubles, then the results */

/* *out += the sum of the parts */
__global__ void k_sum_parts(double *out, const double *part, int nparts)
{
    double s = 0.0;
    for (int i = threadIdx.x; i < nparts; i += blockDim.x)
        s += part[i];
    s = block_reduce(s, SumOp(), 0.0);
    if (threadIdx.x == 0)
        *out += s;
}

/* copies dres[1024 + slot] back; call with res_mu held */
static double fetch_result(mps_cuda *c, const char *what, int slot = 0)
{
    double h = NAN;
    if (cu_launched(c, what) != 0)
        return NAN;
    if (cu_check(c, cudaMemcpyAsync(&h, c->dres + SQ_MAX_BLOCKS + slot, sizeof h, cudaMemcpyDeviceToHost, c->stream), what) != 0 ||
        cu_check(c, cudaStreamSynchronize(c->stream), what) != 0)
        return NAN;
    return h;
}

double cu_xent_loss_sum(void *ctx, const float *gmax, const float *sumexp, const float *tlogit, int64_t N)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (N <= 0)
        return 0.0;
    pthread_mutex_lock(&c->res_mu);
    k_loss_sum<<<1, 1024, 0, c->stream>>>(c->dres + SQ_MAX_BLOCKS, gmax, sumexp, tlogit, N);
    double r = fetch_result(c, "xent_loss_sum");
    pthread_mutex_unlock(&c->res_mu);
    return r;
}

/* part[part0 + chunk] = the chunk's sum of squares in double (a block per chunk, MtArgs's tensors
 * in p) */
__global__ void __launch_bounds__(MT_THREADS) k_sumsq_many(double *part, int64_t part0, MtArgs a)
{
    int64_t b, e;
    const float *x = a.p[mt_find(a, &b, &e)];
    double s = 0.0;
    int64_t i = b + threadIdx.x;
    if (dev_aligned16(x)) {
        const int64_t n4 = (e - b) >> 2;
        for (int64_t q = threadIdx.x; q < n4; q += MT_THREADS) {
            const float4 v = ld4(x, (b >> 2) + q);
            s += (double)v.x * v.x + (double)v.y * v.y + (double)v.z * v.z + (double)v.w * v.w;
        }
        i = b + (n4 << 2) + threadIdx.x;
    }
    for (; i < e; i += MT_THREADS)
        s += (double)x[i] * x[i];
    s = block_reduce(s, SumOp(), 0.0);
    if (threadIdx.x == 0)
        part[part0 + blockIdx.x] = s;
}

/* Every buffer cut into MT_CHUNK chunks (a function of the sizes only), a block's double sum per
 * chunk, then one block adds the chunk sums in a fixed tree: the bits depend on the sizes alone. */
double cu_sumsq_many(void *ctx, const float *const *xs, const int64_t *ns, int count)
{
    mps_cuda *c = (mps_cuda *)ctx;
    int64_t nparts = 0;
    for (int i = 0; i < count; i++)
        if (ns[i] > 0)
            nparts += (ns[i] + MT_CHUNK - 1) / MT_CHUNK;
    if (nparts == 0)
        return 0.0;
    if (nparts > INT32_MAX) {
        cu_fail(c, "sumsq_many: %lld chunks", (long long)nparts);
        return NAN;
    }
    double *part = (double *)cu_scratch(c, SCR_SUMSQ, (size_t)nparts * sizeof(double));
    if (!part)
        return NAN;
    pthread_mutex_lock(&c->res_mu);
    double *acc = c->dres + SQ_MAX_BLOCKS + 1;
    int ok = cu_check(c, cudaMemsetAsync(acc, 0, sizeof *acc, c->stream), "sumsq_many") == 0;
    MtArgs a;
    memset(&a, 0, sizeof a);
    int64_t part0 = 0;
    for (int i = 0; i <= count && ok; i++) {
        if (i == count || a.count == MT_MAX) {
            if (a.count > 0) {
                k_sumsq_many<<<(unsigned)a.first[a.count], MT_THREADS, 0, c->stream>>>(part, part0, a);
                ok = cu_launched(c, "sumsq_many") == 0;
                part0 += a.first[a.count];
            }
            memset(&a, 0, sizeof a);
            if (i == count)
                break;
        }
        if (ns[i] <= 0)
            continue;
        const int k = a.count++;
        a.p[k] = (float *)xs[i], a.n[k] = ns[i];
        a.first[k + 1] = a.first[k] + (ns[i] + MT_CHUNK - 1) / MT_CHUNK;
    }
    if (ok)
        k_sum_parts<<<1, 1024, 0, c->stream>>>(acc, part, (int)nparts);
    double r = ok ? fetch_result(c, "sumsq_many", 1) : NAN;
    pthread_mutex_unlock(&c->res_mu);
    return r;
}
