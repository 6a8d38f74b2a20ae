/* Elementwise kernels of the CUDA backend: sums, bf16 operand conversions, GELU forward and
 * backward (kernels_common.cuh: the launcher and the determinism rules of kernels_rows.cu). */
#include "kernels_common.cuh"

/* ---------------------------------------------------------------- elementwise */


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

void cu_add(void *ctx, float *out, const float *a, const float *b, int64_t n)
{
    int vec = cu_aligned16(out) && cu_aligned16(a) && cu_aligned16(b);
    launch_ew((mps_cuda *)ctx, AddF{out, a, b}, n, vec, "add");
}
void cu_accumulate(void *ctx, float *dst, const float *src, int64_t n)
{
    /* dst = dst + src: each element is read, then written, by one thread */
    launch_ew((mps_cuda *)ctx, AddF{dst, dst, src}, n, cu_aligned16(dst) && cu_aligned16(src), "accumulate");
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

