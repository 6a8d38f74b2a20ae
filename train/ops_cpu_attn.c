/* Causal self-attention of the CPU trainer (see ops_cpu.h), flash style: the forward keeps only
 * the output and the log-sum-exp per query row; the backward recomputes the probabilities.
 * Tasks are (batch, head) pairs: each thread owns that pair's slices of out, lse and dqkv, and
 * runs its sums in a fixed order, so results do not depend on the thread count. */
#include <math.h>
#include <string.h>

#include "ops_cpu.h"

/* Dot products and axpy over a head (hs floats) with the GCC/Clang vector extension: at -O2 GCC
 * vectorises neither a float reduction nor a loop of unknown length. The lanes are combined in a
 * fixed order, so results stay deterministic. */
typedef float v4f __attribute__((vector_size(16)));

static inline v4f ld4(const float *p)
{
    v4f v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void st4(float *p, v4f v) { memcpy(p, &v, sizeof v); }

static inline float dot(const float *a, const float *b, int n)
{
    v4f acc = {0, 0, 0, 0};
    int i = 0;
    for (; i + 4 <= n; i += 4) acc += ld4(a + i) * ld4(b + i);
    float s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* y += alpha * x */
static inline void axpy(float *y, float alpha, const float *x, int n)
{
    v4f av = {alpha, alpha, alpha, alpha};
    int i = 0;
    for (; i + 4 <= n; i += 4) st4(y + i, ld4(y + i) + av * ld4(x + i));
    for (; i < n; i++) y[i] += alpha * x[i];
}

/* below this much work (multiply-adds, twice the causal half) a parallel region costs more */
#define ATTN_PAR_MIN (1 << 18)

static inline void scal(float *y, float alpha, int n)
{
    for (int i = 0; i < n; i++) y[i] *= alpha;
}

void op_attention_fwd(float *out, float *lse, const float *qkv, int B, int T, int H, int hs)
{
    const int64_t Cl = (int64_t)H * hs, ld = 3 * Cl;  // qkv row stride
    const float scale = 1.0f / sqrtf((float)hs);
#pragma omp parallel for collapse(2) schedule(static) if ((int64_t)B * H * T * T * hs >= ATTN_PAR_MIN)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            const float *base = qkv + (int64_t)b * T * ld + (int64_t)h * hs;  // q of (b, 0, h)
            for (int t = 0; t < T; t++) {
                const float *q = base + t * ld;  // (hs)
                float *o = out + ((int64_t)b * T + t) * Cl + (int64_t)h * hs;  // (hs): the accumulator
                memset(o, 0, sizeof(float) * (size_t)hs);
                /* online softmax: running max m, running sum l of exp(score - m), o scaled alike */
                float m = -INFINITY, l = 0.0f;
                for (int s = 0; s <= t; s++) {
                    const float *k = base + s * ld + Cl, *v = base + s * ld + 2 * Cl;
                    float sc = dot(q, k, hs) * scale;
                    if (sc > m) {
                        float corr = expf(m - sc);  // 0 on the first key (m = -inf)
                        l *= corr;
                        scal(o, corr, hs);
                        m = sc;
                    }
                    float p = expf(sc - m);
                    l += p;
                    axpy(o, p, v, hs);
                }
                scal(o, 1.0f / l, hs);
                lse[((int64_t)b * H + h) * T + t] = m + logf(l);
            }
        }
}

void op_attention_bwd(float *dqkv, const float *dout, const float *qkv, const float *out, const float *lse, int B,
                      int T, int H, int hs)
{
    if (!dqkv) return;
    const int64_t Cl = (int64_t)H * hs, ld = 3 * Cl;
    const float scale = 1.0f / sqrtf((float)hs);
#pragma omp parallel for collapse(2) schedule(static) if ((int64_t)B * H * T * T * hs >= ATTN_PAR_MIN)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            const int64_t off = (int64_t)b * T * ld + (int64_t)h * hs;  // q of (b, 0, h) in qkv and dqkv
            const float *base = qkv + off;
            float *dbase = dqkv + off;
            const float *lrow = lse + ((int64_t)b * H + h) * T;  // (T)
            for (int t = 0; t < T; t++) {
                const float *q = base + t * ld;
                float *dq = dbase + t * ld;
                const int64_t orow = ((int64_t)b * T + t) * Cl + (int64_t)h * hs;
                const float *go = dout + orow, *o = out + orow;  // (hs)
                float D = dot(go, o, hs);  // = sum_s p_ts (dout_t . v_s)
                for (int s = 0; s <= t; s++) {
                    const float *k = base + s * ld + Cl, *v = base + s * ld + 2 * Cl;
                    float *dk = dbase + s * ld + Cl, *dv = dbase + s * ld + 2 * Cl;
                    float p = expf(dot(q, k, hs) * scale - lrow[t]);
                    float ds = p * (dot(go, v, hs) - D);  // d loss / d score
                    axpy(dq, scale * ds, k, hs);
                    axpy(dk, scale * ds, q, hs);
                    axpy(dv, p, go, hs);
                }
            }
        }
}
