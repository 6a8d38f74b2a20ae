/* The Llama block's CPU kernels (see ops_cpu.h): RMSNorm, rotary embeddings, SwiGLU and causal
 * grouped-query attention. Every parallel loop gives each thread whole rows, heads or columns and
 * keeps its sums in a fixed order, so results do not depend on the thread count. */
#include <math.h>
#include <string.h>

#include "ops_cpu.h"

/* below this much work a parallel region costs more than it saves */
#define PAR_MIN (1 << 16)

void op_rmsnorm_fwd(float *out, float *rstd, const float *inp, const float *w, int64_t N, int C, float eps)
{
#pragma omp parallel for schedule(static) if (N * C >= PAR_MIN)
    for (int64_t i = 0; i < N; i++) {
        const float *x = inp + i * C;
        float ss = 0.0f;
        for (int j = 0; j < C; j++)
            ss += x[j] * x[j];
        float r = 1.0f / sqrtf(ss / (float)C + eps);
        rstd[i] = r;
        for (int j = 0; j < C; j++)
            out[i * C + j] = w[j] * (x[j] * r);
    }
}

void op_rmsnorm_bwd(float *dinp, float *dw, const float *dout, const float *inp, const float *w, const float *rstd,
                    int64_t N, int C)
{
    if (dinp) {
#pragma omp parallel for schedule(static) if (N * C >= PAR_MIN)
        for (int64_t i = 0; i < N; i++) {
            const float *x = inp + i * C, *dy = dout + i * C;
            const float r = rstd[i];
            float dot = 0.0f; /* sum_j w_j dy_j x_j */
            for (int j = 0; j < C; j++)
                dot += w[j] * dy[j] * x[j];
            const float k = dot * r * r * r / (float)C;
            for (int j = 0; j < C; j++)
                dinp[i * C + j] += w[j] * dy[j] * r - k * x[j];
        }
    }
    if (dw) {
#pragma omp parallel for schedule(static) if (N * C >= PAR_MIN)
        for (int j = 0; j < C; j++) {
            float s = 0.0f;
            for (int64_t i = 0; i < N; i++)
                s += dout[i * C + j] * inp[i * C + j] * rstd[i];
            dw[j] += s;
        }
    }
}

/* Hugging Face's rotate-half: the pairs (i, i + hd/2) turn by position t's angle t * inv_freq[i]
 * (cs: (T, hd/2) cosines then (T, hd/2) sines); sign -1 turns back (the backward). */
static void rope_apply(float *x, const float *cs, int B, int T, int nheads, int hd, int64_t ld, float sign)
{
    const int half = hd / 2;
    const float *cosv = cs, *sinv = cs + (int64_t)T * half;
#pragma omp parallel for schedule(static) if ((int64_t)B * T * nheads * hd >= PAR_MIN)
    for (int64_t row = 0; row < (int64_t)B * T; row++) {
        const int64_t t = row % T;
        for (int h = 0; h < nheads; h++) {
            float *v = x + row * ld + (int64_t)h * hd;
            for (int i = 0; i < half; i++) {
                const float c = cosv[t * half + i], s = sign * sinv[t * half + i];
                const float a = v[i], b = v[i + half];
                v[i] = a * c - b * s;
                v[i + half] = b * c + a * s;
            }
        }
    }
}

void op_rope_fwd(float *x, const float *cs, int B, int T, int nheads, int hd, int64_t ld)
{
    rope_apply(x, cs, B, T, nheads, hd, ld, 1.0f);
}

void op_rope_bwd(float *dx, const float *cs, int B, int T, int nheads, int hd, int64_t ld)
{
    rope_apply(dx, cs, B, T, nheads, hd, ld, -1.0f);
}

void op_swiglu_fwd(float *out, const float *gate, const float *up, int64_t N, int F, int64_t ld)
{
#pragma omp parallel for schedule(static) if (N * F >= PAR_MIN)
    for (int64_t r = 0; r < N; r++)
        for (int j = 0; j < F; j++) {
            const float g = gate[r * ld + j];
            out[r * F + j] = g / (1.0f + expf(-g)) * up[r * ld + j];
        }
}

void op_swiglu_bwd(float *dgate, float *dup, const float *dout, const float *gate, const float *up, int64_t N, int F,
                   int64_t ld)
{
#pragma omp parallel for schedule(static) if (N * F >= PAR_MIN)
    for (int64_t r = 0; r < N; r++)
        for (int j = 0; j < F; j++) {
            const int64_t i = r * ld + j;
            const float g = gate[i], u = up[i], d = dout[r * F + j];
            const float sig = 1.0f / (1.0f + expf(-g));
            const float silu = g * sig;
            dgate[i] = d * u * sig * (1.0f + g * (1.0f - sig));
            dup[i] = d * silu;
        }
}

static inline float dotf(const float *a, const float *b, int n)
{
    float s = 0.0f;
    for (int i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

static inline void axpyf(float *y, float alpha, const float *x, int n)
{
    for (int i = 0; i < n; i++)
        y[i] += alpha * x[i];
}

void op_gqa_fwd(float *out, float *lse, const float *q, const float *k, const float *v, int B, int T, int H, int KV,
                int hd, int64_t ldq, int64_t ldk)
{
    const int64_t ldo = (int64_t)H * hd;
    const int group = H / KV;
    const float scale = 1.0f / sqrtf((float)hd);
#pragma omp parallel for collapse(2) schedule(static) if ((int64_t)B * H * T * T * hd >= PAR_MIN)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            const int kvh = h / group;
            for (int t = 0; t < T; t++) {
                const float *qr = q + ((int64_t)b * T + t) * ldq + (int64_t)h * hd;
                float *o = out + ((int64_t)b * T + t) * ldo + (int64_t)h * hd;
                memset(o, 0, sizeof(float) * (size_t)hd);
                float m = -INFINITY, l = 0.0f; /* online softmax, as op_attention_fwd */
                for (int s = 0; s <= t; s++) {
                    const int64_t krow = ((int64_t)b * T + s) * ldk + (int64_t)kvh * hd;
                    const float sc = dotf(qr, k + krow, hd) * scale;
                    if (sc > m) {
                        const float corr = expf(m - sc);
                        l *= corr;
                        for (int i = 0; i < hd; i++)
                            o[i] *= corr;
                        m = sc;
                    }
                    const float p = expf(sc - m);
                    l += p;
                    axpyf(o, p, v + krow, hd);
                }
                for (int i = 0; i < hd; i++)
                    o[i] /= l;
                lse[((int64_t)b * H + h) * T + t] = m + logf(l);
            }
        }
}

/* Tasks are (batch, kv head): a task owns its kv head's dk, dv and its query heads' dq. */
void op_gqa_bwd(float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k, const float *v,
                const float *out, const float *lse, int B, int T, int H, int KV, int hd, int64_t ldq, int64_t ldk)
{
    const int64_t ldo = (int64_t)H * hd;
    const int group = H / KV;
    const float scale = 1.0f / sqrtf((float)hd);
#pragma omp parallel for collapse(2) schedule(static) if ((int64_t)B * H * T * T * hd >= PAR_MIN)
    for (int b = 0; b < B; b++)
        for (int kvh = 0; kvh < KV; kvh++)
            for (int h = kvh * group; h < (kvh + 1) * group; h++)
                for (int t = 0; t < T; t++) {
                    const int64_t qrow = ((int64_t)b * T + t) * ldq + (int64_t)h * hd;
                    const int64_t orow = ((int64_t)b * T + t) * ldo + (int64_t)h * hd;
                    const float *qr = q + qrow, *go = dout + orow;
                    const float D = dotf(go, out + orow, hd);
                    const float l = lse[((int64_t)b * H + h) * T + t];
                    for (int s = 0; s <= t; s++) {
                        const int64_t krow = ((int64_t)b * T + s) * ldk + (int64_t)kvh * hd;
                        const float p = expf(dotf(qr, k + krow, hd) * scale - l);
                        const float ds = p * (dotf(go, v + krow, hd) - D);
                        axpyf(dq + qrow, scale * ds, k + krow, hd);
                        axpyf(dk + krow, scale * ds, qr, hd);
                        axpyf(dv + krow, p, go, hd);
                    }
                }
}
