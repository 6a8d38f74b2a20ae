/* The Llama block's element-wise and row kernels of the CUDA backend: RMSNorm forward and
 * backward, rotary embeddings, SwiGLU (the attention is in attention_gqa.cu). fp32 arithmetic on
 * bf16 operands, as the CPU backend's ops_cpu_llama.c does on fp32 ones; every sum has a fixed
 * order (one warp per row, column sums through per-chunk partials), so reruns are bit-identical. */
#include "kernels_common.cuh"

/* ---------------------------------------------------------------- RMSNorm */

/* one warp per row: rstd = 1 / sqrt(mean(x^2) + eps), out = w * (x * rstd) */
__global__ void k_rms_fwd(act_t *out, float *rstd, const float *inp, const float *w, int64_t N, int C, float eps)
{
    const int lane = threadIdx.x & 31;
    const int64_t nw = ((int64_t)gridDim.x * blockDim.x) >> 5;
    for (int64_t r = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; r < N; r += nw) {
        const float *x = inp + r * C;
        float ss = 0.0f;
        for (int j = lane; j < C; j += 32)
            ss += x[j] * x[j];
        const float rs = 1.0f / sqrtf(warp_reduce(ss, SumOp()) / (float)C + eps);
        act_t *o = out + r * C;
        for (int j = lane; j < C; j += 32)
            o[j] = __float2bfloat16_rn(w[j] * (x[j] * rs));
        if (lane == 0 && rstd)
            rstd[r] = rs;
    }
}

void cu_rmsnorm_fwd(void *ctx, void *out, float *rstd, const float *inp, const float *w, int64_t N, int C, float eps)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (N <= 0 || C <= 0)
        return;
    k_rms_fwd<<<cu_grid(c, N * 32, 256), 256, 0, c->stream>>>((act_t *)out, rstd, inp, w, N, C, eps);
    cu_launched(c, "rmsnorm_fwd");
}

/* dinp += w dy r - (sum_j w_j dy_j x_j) r^3 / C * x, one warp per row */
__global__ void k_rms_bwd_dx(float *dinp, const float *dout, const float *inp, const float *w, const float *rstd,
                             int64_t N, int C)
{
    const int lane = threadIdx.x & 31;
    const int64_t nw = ((int64_t)gridDim.x * blockDim.x) >> 5;
    for (int64_t r = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; r < N; r += nw) {
        const float *x = inp + r * C, *dy = dout + r * C;
        const float rs = rstd[r];
        float dot = 0.0f;
        for (int j = lane; j < C; j += 32)
            dot += w[j] * dy[j] * x[j];
        const float k = warp_reduce(dot, SumOp()) * rs * rs * rs / (float)C;
        float *dx = dinp + r * C;
        for (int j = lane; j < C; j += 32)
            dx[j] += w[j] * dy[j] * rs - k * x[j];
    }
}

#define RMS_CHUNK 64 /* rows per partial sum of dw */

/* part[chunk][j] = sum over the chunk's rows i (in order) of dy_ij x_ij r_i */
__global__ void k_rms_bwd_dw(float *part, const float *dout, const float *inp, const float *rstd, int64_t N, int C)
{
    const int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= C)
        return;
    const int64_t i0 = (int64_t)blockIdx.x * RMS_CHUNK;
    const int64_t i1 = i0 + RMS_CHUNK < N ? i0 + RMS_CHUNK : N;
    float s = 0.0f;
    for (int64_t i = i0; i < i1; i++)
        s += dout[i * C + j] * inp[i * C + j] * rstd[i];
    part[(int64_t)blockIdx.x * C + j] = s;
}

void cu_rmsnorm_bwd(void *ctx, float *dinp, float *dw, const float *dout, const float *inp, const float *w,
                    const float *rstd, int64_t N, int C)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (N <= 0 || C <= 0)
        return;
    if (dinp) {
        k_rms_bwd_dx<<<cu_grid(c, N * 32, 256), 256, 0, c->stream>>>(dinp, dout, inp, w, rstd, N, C);
        if (cu_launched(c, "rmsnorm_bwd") != 0)
            return;
    }
    if (dw) {
        const int64_t nch = (N + RMS_CHUNK - 1) / RMS_CHUNK;
        if (nch > 65535) { /* the grid's x: 4M rows; the engine's micro-batches are far below */
            cu_fail(c, "rmsnorm_bwd: %lld rows is more than this kernel takes", (long long)N);
            return;
        }
        float *part = (float *)cu_scratch(c, SCR_PART, (size_t)nch * C * sizeof(float));
        if (!part)
            return;
        dim3 grid((unsigned)nch, (unsigned)((C + 255) / 256));
        k_rms_bwd_dw<<<grid, 256, 0, c->stream>>>(part, dout, inp, rstd, N, C);
        if (cu_launched(c, "rmsnorm_bwd: dw") != 0)
            return;
        const int acc = 1;
        const float *src = part;
        cu_colsums(c, 1, &dw, &src, &acc, nch, C, "rmsnorm_bwd: dw sums");
    }
}

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

static void rope_launch(mps_cuda *c, void *x, const float *cs, int B, int T, int nheads, int hd, int64_t ld,
                        float sign, const char *what)
{
    const int64_t n = (int64_t)B * T * nheads * (hd / 2);
    if (n <= 0)
        return;
    k_rope<<<cu_grid(c, n, EW_THREADS), EW_THREADS, 0, c->stream>>>((act_t *)x, cs, (int64_t)B * T, T, nheads, hd, ld,
                                                                     sign);
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

__global__ void k_swiglu_fwd(act_t *out, const act_t *gate, const act_t *up, int64_t n)
{
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float g = __bfloat162float(gate[i]);
        out[i] = __float2bfloat16_rn(g / (1.0f + expf(-g)) * __bfloat162float(up[i]));
    }
}

/* dgate, dup may be gate and up: each element is read before it is written, by one thread */
__global__ void k_swiglu_bwd(act_t *dgate, act_t *dup, const act_t *dout, const act_t *gate, const act_t *up,
                             int64_t n)
{
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float g = __bfloat162float(gate[i]), u = __bfloat162float(up[i]), d = __bfloat162float(dout[i]);
        const float sig = 1.0f / (1.0f + expf(-g));
        dgate[i] = __float2bfloat16_rn(d * u * sig * (1.0f + g * (1.0f - sig)));
        dup[i] = __float2bfloat16_rn(d * (g * sig));
    }
}

void cu_swiglu_fwd(void *ctx, void *out, const void *gate, const void *up, int64_t n)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (n <= 0)
        return;
    k_swiglu_fwd<<<cu_grid(c, n, EW_THREADS), EW_THREADS, 0, c->stream>>>((act_t *)out, (const act_t *)gate,
                                                                           (const act_t *)up, n);
    cu_launched(c, "swiglu_fwd");
}

void cu_swiglu_bwd(void *ctx, void *dgate, void *dup, const void *dout, const void *gate, const void *up, int64_t n)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (n <= 0)
        return;
    k_swiglu_bwd<<<cu_grid(c, n, EW_THREADS), EW_THREADS, 0, c->stream>>>(
        (act_t *)dgate, (act_t *)dup, (const act_t *)dout, (const act_t *)gate, (const act_t *)up, n);
    cu_launched(c, "swiglu_bwd");
}
