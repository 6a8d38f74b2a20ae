/* CPU kernels of the trainer (train/ops_cpu.h):
 *  - every backward against central finite differences of J = sum(out * R) (fixed random R) on
 *    every element of small tensors, plus the accumulate (+=) contract: a second bwd call doubles;
 *  - forwards against naive double references (attention with the full T x T matrix, layernorm,
 *    matmul on odd sizes that hit every tile and tail path, gelu, cross-entropy over a TP=2 vocab
 *    split against the full vocab, AdamW over 3 steps, sumsq);
 *  - determinism: the same call twice, and 1, 2 and 3 threads, give bit-identical results. */
#include <math.h>
#include <omp.h>
#include <stdint.h>

#include "ops_cpu.h"
#include "testutil.h"

/* Finite differences: h = FD_H * max(1, |x|), central difference in double of float forwards.
 * Pass when |analytic - numeric| <= FD_TOL * max(1, |numeric|). Observed worst errors are below
 * 1e-3 of that scale; a wrong term (a missing mean in layernorm, a missing scale in attention, a
 * dropped tanh' in gelu) is off by 1e-1 or more. fd_selftest shows that the check does fail. */
#define FD_H 1e-2
#define FD_TOL 1e-3

/* sizes of the gradient checks */
enum { B = 2, T = 5, H = 2, HS = 4, CL = H * HS, C = 8, OC = 12, N = B * T, VL = 7, V0 = 3, VOC = 8 };

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static float urand(void)  // uniform in [-1, 1)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)((rng_state >> 40) * (2.0 / 16777216.0) - 1.0);
}
static float *rnd(int64_t n, float scale)
{
    float *p = malloc(sizeof(float) * (size_t)n);
    for (int64_t i = 0; i < n; i++) p[i] = scale * urand();
    return p;
}
static float *zeros(int64_t n) { return calloc((size_t)n, sizeof(float)); }
static float *fdup(const float *x, int64_t n)
{
    float *p = malloc(sizeof(float) * (size_t)n);
    memcpy(p, x, sizeof(float) * (size_t)n);
    return p;
}
static double dotR(const float *out, const float *R, int64_t n)
{
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += (double)out[i] * R[i];
    return s;
}

typedef double (*objective)(void *ctx);

/* worst |a - num| / (FD_TOL * max(1, |num|)) over every element of x (restored afterwards) */
static double fd_worst(float *x, int64_t n, const float *analytic, objective J, void *ctx)
{
    double worst = 0;
    for (int64_t i = 0; i < n; i++) {
        float x0 = x[i], h = (float)(FD_H * fmax(1.0, fabs(x0)));
        float xp = x0 + h, xm = x0 - h;
        x[i] = xp;
        double jp = J(ctx);
        x[i] = xm;
        double jm = J(ctx);
        x[i] = x0;
        double num = (jp - jm) / ((double)xp - (double)xm);
        double e = fabs(analytic[i] - num) / (FD_TOL * fmax(1.0, fabs(num)));
        if (e > worst) worst = e;
    }
    return worst;
}

static void fd_check(const char *what, float *x, int64_t n, const float *analytic, objective J, void *ctx)
{
    double w = fd_worst(x, n, analytic, J, ctx);
    CHECK_MSG(w <= 1.0, "%s: finite-difference error %.3g x the tolerance", what, w);
    printf("  fd %-22s worst %.2e of tolerance\n", what, w);
}

/* second bwd call into the same buffer: twice the first */
static void check_doubled(const char *what, const float *once, const float *twice, int64_t n)
{
    int bad = 0;
    for (int64_t i = 0; i < n; i++)
        if (fabsf(twice[i] - 2.0f * once[i]) > 1e-5f * fmaxf(1.0f, fabsf(once[i]))) bad++;
    CHECK_MSG(bad == 0, "%s: %d elements not accumulated", what, bad);
}

static double maxdiff(const float *a, const double *ref, int64_t n)
{
    double m = 0;
    for (int64_t i = 0; i < n; i++) m = fmax(m, fabs(a[i] - ref[i]));
    return m;
}

/* ------------------------------------------------------------ embeddings */

struct embed_ctx {
    float *wte, *out, *R;
    const int32_t *tok;
};
static double embed_J(void *p)
{
    struct embed_ctx *c = p;
    op_embed_fwd(c->out, c->tok, N, c->wte, V0, VL, C);
    return dotR(c->out, c->R, N * C);
}

static void test_embed(void)
{
    /* ids 0..11: owned are 3..9; 4 and 9 repeat, 0, 1, 11 are another rank's */
    static const int32_t tok[N] = {4, 0, 9, 4, 3, 11, 9, 1, 7, 4};
    struct embed_ctx c = {rnd(VL * C, 1), zeros(N * C), rnd(N * C, 1), tok};
    embed_J(&c);
    int ok = 1;
    for (int n = 0; n < N; n++)
        for (int k = 0; k < C; k++) {
            float want = (tok[n] >= V0 && tok[n] < V0 + VL) ? c.wte[(tok[n] - V0) * C + k] : 0.0f;
            ok &= c.out[n * C + k] == want;
        }
    CHECK_MSG(ok, "embed fwd rows");
    float *g = zeros(VL * C), *g2 = zeros(VL * C);
    op_embed_bwd(g, c.R, tok, N, V0, VL, C);
    op_embed_bwd(g2, c.R, tok, N, V0, VL, C);
    op_embed_bwd(g2, c.R, tok, N, V0, VL, C);
    check_doubled("embed dwte", g, g2, VL * C);
    op_embed_bwd(NULL, c.R, tok, N, V0, VL, C);
    fd_check("embed dwte", c.wte, VL * C, g, embed_J, &c);
    free(c.wte), free(c.out), free(c.R), free(g), free(g2);
}

struct pos_ctx {
    float *x, *wpe, *out, *R;
};
static double pos_J(void *p)
{
    struct pos_ctx *c = p;
    memcpy(c->out, c->x, sizeof(float) * N * C);
    op_pos_fwd(c->out, c->wpe, B, T, C);
    return dotR(c->out, c->R, N * C);
}

static void test_pos(void)
{
    /* wpe has more rows (T + 2) than used: the unused rows get no gradient */
    struct pos_ctx c = {rnd(N * C, 1), rnd((T + 2) * C, 1), zeros(N * C), rnd(N * C, 1)};
    float *g = zeros((T + 2) * C), *g2 = zeros((T + 2) * C);
    op_pos_bwd(g, c.R, B, T, C);
    op_pos_bwd(g2, c.R, B, T, C);
    op_pos_bwd(g2, c.R, B, T, C);
    check_doubled("pos dwpe", g, g2, (T + 2) * C);
    fd_check("pos dwpe", c.wpe, (T + 2) * C, g, pos_J, &c);
    free(c.x), free(c.wpe), free(c.out), free(c.R), free(g), free(g2);
}

/* ------------------------------------------------------------ layernorm */

struct ln_ctx {
    float *inp, *w, *b, *out, *mean, *rstd, *R;
};
static double ln_J(void *p)
{
    struct ln_ctx *c = p;
    op_layernorm_fwd(c->out, c->mean, c->rstd, c->inp, c->w, c->b, N, C);
    return dotR(c->out, c->R, N * C);
}

static void test_layernorm(void)
{
    struct ln_ctx c = {rnd(N * C, 2), rnd(C, 1), rnd(C, 1), zeros(N * C), zeros(N), zeros(N), rnd(N * C, 1)};
    for (int i = 0; i < N * C; i++) c.inp[i] += 0.5f;  // rows with a non-zero mean
    for (int i = 0; i < C; i++) c.w[i] += 1.0f;
    ln_J(&c);
    /* forward against double */
    double ref[N * C], md = 0, rd = 0;
    for (int n = 0; n < N; n++) {
        double mu = 0, var = 0;
        for (int k = 0; k < C; k++) mu += c.inp[n * C + k];
        mu /= C;
        for (int k = 0; k < C; k++) var += (c.inp[n * C + k] - mu) * (c.inp[n * C + k] - mu);
        double r = 1.0 / sqrt(var / C + 1e-5);  // biased variance, eps 1e-5
        for (int k = 0; k < C; k++) ref[n * C + k] = (c.inp[n * C + k] - mu) * r * c.w[k] + c.b[k];
        md = fmax(md, fabs(c.mean[n] - mu));
        rd = fmax(rd, fabs(c.rstd[n] - r) / r);
    }
    CHECK_MSG(maxdiff(c.out, ref, N * C) < 1e-5 && md < 1e-6 && rd < 1e-6, "layernorm fwd: out %.3g mean %.3g rstd %.3g",
              maxdiff(c.out, ref, N * C), md, rd);

    float *dx = zeros(N * C), *dw = zeros(C), *db = zeros(C);
    float *dx2 = zeros(N * C), *dw2 = zeros(C), *db2 = zeros(C);
    op_layernorm_bwd(dx, dw, db, c.R, c.inp, c.w, c.mean, c.rstd, N, C);
    for (int r = 0; r < 2; r++) op_layernorm_bwd(dx2, dw2, db2, c.R, c.inp, c.w, c.mean, c.rstd, N, C);
    check_doubled("layernorm dinp", dx, dx2, N * C);
    check_doubled("layernorm dw", dw, dw2, C);
    check_doubled("layernorm db", db, db2, C);
    op_layernorm_bwd(NULL, NULL, db2, c.R, c.inp, c.w, c.mean, c.rstd, N, C);
    fd_check("layernorm dinp", c.inp, N * C, dx, ln_J, &c);
    fd_check("layernorm dw", c.w, C, dw, ln_J, &c);
    fd_check("layernorm db", c.b, C, db, ln_J, &c);
    free(c.inp), free(c.w), free(c.b), free(c.out), free(c.mean), free(c.rstd), free(c.R);
    free(dx), free(dw), free(db), free(dx2), free(dw2), free(db2);
}

/* ------------------------------------------------------------ matmul */

struct mm_ctx {
    float *inp, *w, *bias, *out, *R;
};
static double mm_J(void *p)
{
    struct mm_ctx *c = p;
    op_matmul_fwd(c->out, c->inp, c->w, c->bias, N, C, OC);
    return dotR(c->out, c->R, N * OC);
}

static void test_matmul_fd(void)
{
    struct mm_ctx c = {rnd(N * C, 1), rnd(OC * C, 1), rnd(OC, 1), zeros(N * OC), rnd(N * OC, 1)};
    float *dx = zeros(N * C), *dw = zeros(OC * C), *db = zeros(OC);
    float *dx2 = zeros(N * C), *dw2 = zeros(OC * C), *db2 = zeros(OC);
    op_matmul_bwd(dx, dw, db, c.R, c.inp, c.w, N, C, OC);
    for (int r = 0; r < 2; r++) op_matmul_bwd(dx2, dw2, db2, c.R, c.inp, c.w, N, C, OC);
    check_doubled("matmul dinp", dx, dx2, N * C);
    check_doubled("matmul dw", dw, dw2, OC * C);
    check_doubled("matmul dbias", db, db2, OC);
    fd_check("matmul dinp", c.inp, N * C, dx, mm_J, &c);
    fd_check("matmul dw", c.w, OC * C, dw, mm_J, &c);
    fd_check("matmul dbias", c.bias, OC, db, mm_J, &c);
    free(c.inp), free(c.w), free(c.bias), free(c.out), free(c.R);
    free(dx), free(dw), free(db), free(dx2), free(dw2), free(db2);
}

/* fwd and bwd against double on a shape that crosses every block of the kernel: rows not a
 * multiple of the 4-row tile nor of the 64-row task, columns not a multiple of 8, K > 256 */
static void test_matmul_naive(int64_t n, int k, int oc, int with_bias)
{
    float *inp = rnd(n * k, 1), *w = rnd((int64_t)oc * k, 1), *bias = with_bias ? rnd(oc, 1) : NULL;
    float *out = zeros(n * oc), *g = rnd(n * oc, 1);
    float *dx = rnd(n * k, 1), *dw = rnd((int64_t)oc * k, 1), *db = rnd(oc, 1);  // bwd adds to these
    float *dx0 = fdup(dx, n * k), *dw0 = fdup(dw, (int64_t)oc * k), *db0 = fdup(db, oc);
    op_matmul_fwd(out, inp, w, bias, n, k, oc);
    op_matmul_bwd(dx, dw, db, g, inp, w, n, k, oc);
    /* error bound: a float sum of K terms, relative to the sum of their magnitudes */
    double worst = 0;
    for (int64_t i = 0; i < n; i++)
        for (int o = 0; o < oc; o++) {
            double s = bias ? bias[o] : 0, a = fabs(s);
            for (int j = 0; j < k; j++) {
                s += (double)inp[i * k + j] * w[(int64_t)o * k + j];
                a += fabs((double)inp[i * k + j] * w[(int64_t)o * k + j]);
            }
            worst = fmax(worst, fabs(out[i * oc + o] - s) / (a + 1));
        }
    CHECK_MSG(worst < 1e-6, "matmul fwd %lldx%dx%d: relative error %.3g", (long long)n, k, oc, worst);
    worst = 0;
    for (int64_t i = 0; i < n; i++)
        for (int j = 0; j < k; j++) {
            double s = dx0[i * k + j], a = fabs(s);
            for (int o = 0; o < oc; o++) {
                s += (double)g[i * oc + o] * w[(int64_t)o * k + j];
                a += fabs((double)g[i * oc + o] * w[(int64_t)o * k + j]);
            }
            worst = fmax(worst, fabs(dx[i * k + j] - s) / (a + 1));
        }
    CHECK_MSG(worst < 1e-6, "matmul dinp %lldx%dx%d: relative error %.3g", (long long)n, k, oc, worst);
    worst = 0;
    for (int o = 0; o < oc; o++) {
        for (int j = 0; j < k; j++) {
            double s = dw0[(int64_t)o * k + j], a = fabs(s);
            for (int64_t i = 0; i < n; i++) {
                s += (double)g[i * oc + o] * inp[i * k + j];
                a += fabs((double)g[i * oc + o] * inp[i * k + j]);
            }
            worst = fmax(worst, fabs(dw[(int64_t)o * k + j] - s) / (a + 1));
        }
        double s = db0[o], a = fabs(s);
        for (int64_t i = 0; i < n; i++) s += g[i * oc + o], a += fabs(g[i * oc + o]);
        worst = fmax(worst, fabs(db[o] - s) / (a + 1));
    }
    CHECK_MSG(worst < 1e-6, "matmul dw/dbias %lldx%dx%d: relative error %.3g", (long long)n, k, oc, worst);
    free(inp), free(w), free(bias), free(out), free(g), free(dx), free(dw), free(db), free(dx0), free(dw0), free(db0);
}

/* ------------------------------------------------------------ attention */

/* full (T, T) softmax in double; out (b, t, h*hs + d), lse (b, h, t) */
static void attention_ref(double *out, double *lse, const float *qkv, int b_, int t_, int h_, int hs)
{
    int64_t cl = (int64_t)h_ * hs, ld = 3 * cl;
    double *att = malloc(sizeof(double) * (size_t)t_ * (size_t)t_);
    for (int b = 0; b < b_; b++)
        for (int h = 0; h < h_; h++) {
            const float *base = qkv + (int64_t)b * t_ * ld + (int64_t)h * hs;
            for (int t = 0; t < t_; t++) {
                double mx = -INFINITY, sum = 0;
                for (int s = 0; s < t_; s++) {
                    double d = 0;
                    for (int i = 0; i < hs; i++) d += (double)base[t * ld + i] * base[s * ld + cl + i];
                    att[t * t_ + s] = s <= t ? d / sqrt((double)hs) : -INFINITY;  // causal mask
                    mx = fmax(mx, att[t * t_ + s]);
                }
                for (int s = 0; s < t_; s++) sum += exp(att[t * t_ + s] - mx);
                lse[((int64_t)b * h_ + h) * t_ + t] = mx + log(sum);
                for (int i = 0; i < hs; i++) {
                    double o = 0;
                    for (int s = 0; s < t_; s++) o += exp(att[t * t_ + s] - mx) / sum * base[s * ld + 2 * cl + i];
                    out[((int64_t)b * t_ + t) * cl + (int64_t)h * hs + i] = o;
                }
            }
        }
    free(att);
}

struct attn_ctx {
    float *qkv, *out, *lse, *R;
};
static double attn_J(void *p)
{
    struct attn_ctx *c = p;
    op_attention_fwd(c->out, c->lse, c->qkv, B, T, H, HS);
    return dotR(c->out, c->R, N * CL);
}

static void test_attention(void)
{
    /* scale 2: scores of a few units, so the softmax is far from uniform */
    struct attn_ctx c = {rnd(N * 3 * CL, 2), zeros(N * CL), zeros(B * H * T), rnd(N * CL, 1)};
    attn_J(&c);
    double ref[N * CL], lref[B * H * T];
    attention_ref(ref, lref, c.qkv, B, T, H, HS);
    CHECK_MSG(maxdiff(c.out, ref, N * CL) < 1e-5 && maxdiff(c.lse, lref, B * H * T) < 1e-5,
              "attention fwd: out %.3g lse %.3g", maxdiff(c.out, ref, N * CL), maxdiff(c.lse, lref, B * H * T));

    float *g = zeros(N * 3 * CL), *g2 = zeros(N * 3 * CL);
    op_attention_bwd(g, c.R, c.qkv, c.out, c.lse, B, T, H, HS);
    for (int r = 0; r < 2; r++) op_attention_bwd(g2, c.R, c.qkv, c.out, c.lse, B, T, H, HS);
    check_doubled("attention dqkv", g, g2, N * 3 * CL);
    fd_check("attention dqkv", c.qkv, N * 3 * CL, g, attn_J, &c);
    free(c.qkv), free(c.out), free(c.lse), free(c.R), free(g), free(g2);

    /* a longer sequence and hs not a multiple of 4 (scalar tails), against the double reference;
     * large scores (scale 6) stress the online max */
    int b2 = 1, t2 = 37, h2 = 3, hs2 = 10;
    int64_t cl2 = h2 * hs2;
    float *qkv = rnd(b2 * t2 * 3 * cl2, 6), *out = zeros(b2 * t2 * cl2), *lse = zeros(b2 * h2 * t2);
    double *r2 = malloc(sizeof(double) * (size_t)(b2 * t2 * cl2)), *l2 = malloc(sizeof(double) * (size_t)(b2 * h2 * t2));
    op_attention_fwd(out, lse, qkv, b2, t2, h2, hs2);
    attention_ref(r2, l2, qkv, b2, t2, h2, hs2);
    CHECK_MSG(maxdiff(out, r2, b2 * t2 * cl2) < 1e-5 && maxdiff(lse, l2, b2 * h2 * t2) < 1e-4,
              "attention fwd T=%d hs=%d: out %.3g lse %.3g", t2, hs2, maxdiff(out, r2, b2 * t2 * cl2),
              maxdiff(lse, l2, b2 * h2 * t2));
    free(qkv), free(out), free(lse), free(r2), free(l2);
}

/* ------------------------------------------------------------ gelu */

struct gelu_ctx {
    float *inp, *out, *R;
};
static double gelu_J(void *p)
{
    struct gelu_ctx *c = p;
    op_gelu_fwd(c->out, c->inp, N * C);
    return dotR(c->out, c->R, N * C);
}

static void test_gelu(void)
{
    struct gelu_ctx c = {rnd(N * C, 4), zeros(N * C), rnd(N * C, 1)};
    gelu_J(&c);
    double ref[N * C];
    for (int i = 0; i < N * C; i++) {
        double x = c.inp[i];
        ref[i] = 0.5 * x * (1 + tanh(sqrt(2 / 3.14159265358979323846) * (x + 0.044715 * x * x * x)));
    }
    CHECK_MSG(maxdiff(c.out, ref, N * C) < 1e-6, "gelu fwd %.3g", maxdiff(c.out, ref, N * C));
    float *g = zeros(N * C), *g2 = zeros(N * C);
    op_gelu_bwd(g, c.inp, c.R, N * C);
    for (int r = 0; r < 2; r++) op_gelu_bwd(g2, c.inp, c.R, N * C);
    check_doubled("gelu dinp", g, g2, N * C);
    fd_check("gelu dinp", c.inp, N * C, g, gelu_J, &c);
    free(c.inp), free(c.out), free(c.R), free(g), free(g2);
}

/* ------------------------------------------------------------ cross-entropy */

/* The engine's combination over the TP ranks: gmax = max of rowmax, then sums of sumexp and of
 * tlogit; loss_i = log(sumexp) + gmax - tlogit. nr ranges, range r = [v0[r], v0[r] + vl[r]). */
#define XR_MAX 3
struct xent_ctx {
    int nr;
    int64_t v0[XR_MAX], vl[XR_MAX], V;
    float *logits[XR_MAX];
    const int32_t *tgt;
    float scale;
    float gmax[N], gsum[N];
    double loss[N];
};
static double xent_J(void *p)
{
    struct xent_ctx *c = p;
    float part[N];
    float tl[N] = {0};
    for (int i = 0; i < N; i++) c->gmax[i] = -INFINITY, c->gsum[i] = 0;
    for (int r = 0; r < c->nr; r++) {
        op_xent_rowmax(part, c->logits[r], N, c->vl[r], c->v0[r], c->V);
        for (int i = 0; i < N; i++) c->gmax[i] = fmaxf(c->gmax[i], part[i]);
    }
    for (int r = 0; r < c->nr; r++) {
        op_xent_sumexp(part, c->logits[r], c->gmax, N, c->vl[r], c->v0[r], c->V);
        for (int i = 0; i < N; i++) c->gsum[i] += part[i];
        op_xent_target(part, c->logits[r], c->tgt, N, c->vl[r], c->v0[r]);
        for (int i = 0; i < N; i++) tl[i] += part[i];
    }
    double J = 0;
    for (int i = 0; i < N; i++) {
        c->loss[i] = log((double)c->gsum[i]) + c->gmax[i] - tl[i];
        J += c->scale * c->loss[i];
    }
    return J;
}

static void test_xent(void)
{
    /* forward: TP=2 over [0, 5) and [5, 12), V = 10 (ids 10, 11 are padding) vs the full vocab */
    static const int32_t tgt[N] = {0, 4, 5, 9, 2, 7, 3, 8, 6, 1};
    struct xent_ctx c = {.nr = 2, .v0 = {0, 5}, .vl = {5, 7}, .V = 10, .tgt = tgt, .scale = 1.0f / N};
    for (int r = 0; r < 2; r++) c.logits[r] = rnd(N * c.vl[r], 3);
    c.logits[1][0 * 7 + 6] = 50;  // a huge padded logit must not count
    xent_J(&c);
    double worst = 0;
    for (int i = 0; i < N; i++) {
        double full[10], mx = -INFINITY, s = 0;
        for (int j = 0; j < 10; j++) full[j] = j < 5 ? c.logits[0][i * 5 + j] : c.logits[1][i * 7 + j - 5];
        for (int j = 0; j < 10; j++) mx = fmax(mx, full[j]);
        for (int j = 0; j < 10; j++) s += exp(full[j] - mx);
        worst = fmax(worst, fabs(c.loss[i] - (log(s) + mx - full[tgt[i]])));
    }
    CHECK_MSG(worst < 1e-5, "xent loss TP=2 vs full vocab: %.3g", worst);
    free(c.logits[0]), free(c.logits[1]);

    /* gradients: three ranges [0, 3), [3, 10), [10, 12) of Vl 3, 7, 2 with V = 8: the middle one
     * is the (v0 = 3, Vl = 7) slice with 2 padded ids, the last is all padding (rowmax -inf) */
    static const int32_t tgt2[N] = {0, 2, 3, 7, 5, 1, 4, 6, 3, 7};  // all < V, in both ranges
    struct xent_ctx g = {.nr = 3, .v0 = {0, V0, V0 + VL}, .vl = {3, VL, 2}, .V = VOC, .tgt = tgt2, .scale = 0.37f};
    for (int r = 0; r < 3; r++) g.logits[r] = rnd(N * g.vl[r], 3);
    xent_J(&g);
    float rm[N];
    op_xent_rowmax(rm, g.logits[2], N, 2, V0 + VL, VOC);
    CHECK(isinf(rm[0]) && rm[0] < 0);
    for (int r = 0; r < 3; r++) {
        float *d = malloc(sizeof(float) * (size_t)(N * g.vl[r]));
        for (int64_t i = 0; i < N * g.vl[r]; i++) d[i] = 123.0f;  // bwd overwrites
        op_xent_bwd(d, g.logits[r], g.tgt, g.gmax, g.gsum, g.scale, N, g.vl[r], g.v0[r], g.V);
        int pad_ok = 1;
        for (int i = 0; i < N; i++)
            for (int64_t j = 0; j < g.vl[r]; j++)
                if (g.v0[r] + j >= g.V) pad_ok &= d[i * g.vl[r] + j] == 0.0f;
        CHECK_MSG(pad_ok, "xent: padded ids of range %d have a gradient", r);
        char what[32];
        snprintf(what, sizeof what, "xent dlogits range %d", r);
        fd_check(what, g.logits[r], N * g.vl[r], d, xent_J, &g);
        free(d);
    }
    for (int r = 0; r < 3; r++) free(g.logits[r]);
}

/* ------------------------------------------------------------ optimizer, reductions */

static void test_adamw(void)
{
    enum { n = 1000 };
    const float lr = 1e-2f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f;
    float *p = malloc(sizeof(float) * n), *m = zeros(n), *v = zeros(n), *g = malloc(sizeof(float) * n);
    double *pr = malloc(sizeof(double) * n), *mr = calloc(n, sizeof(double)), *vr = calloc(n, sizeof(double));
    double *mabs = calloc(n, sizeof(double));  // m summed in magnitudes: m itself may cancel to ~0
    for (int i = 0; i < n; i++) {  // |p| >= 0.5 and |g| >= 0.05, so relative errors are meaningful
        float u = urand();
        p[i] = (u < 0 ? -0.5f : 0.5f) + u;
        pr[i] = p[i];
    }
    double worst = 0;
    for (int t = 1; t <= 3; t++) {
        for (int i = 0; i < n; i++) {
            float u = urand();
            g[i] = (u < 0 ? -0.05f : 0.05f) + u;
        }
        op_adamw(p, g, m, v, n, lr, b1, b2, eps, wd, t);
        for (int i = 0; i < n; i++) {  // torch.optim.AdamW in double
            pr[i] *= 1 - (double)lr * wd;
            mr[i] = b1 * mr[i] + (1 - (double)b1) * g[i];
            mabs[i] = b1 * mabs[i] + (1 - (double)b1) * fabs(g[i]);
            vr[i] = b2 * vr[i] + (1 - (double)b2) * g[i] * g[i];
            double mhat = mr[i] / (1 - pow(b1, t)), vhat = vr[i] / (1 - pow(b2, t));
            pr[i] -= lr * mhat / (sqrt(vhat) + eps);
        }
        for (int i = 0; i < n; i++) {
            worst = fmax(worst, fabs(p[i] - pr[i]) / fabs(pr[i]));
            worst = fmax(worst, fabs(m[i] - mr[i]) / mabs[i]);
            worst = fmax(worst, fabs(v[i] - vr[i]) / fabs(vr[i]));
        }
    }
    CHECK_MSG(worst < 1e-6, "adamw 3 steps: relative error %.3g", worst);
    free(p), free(m), free(v), free(g), free(pr), free(mr), free(vr), free(mabs);
}

static void test_small_ops(void)
{
    enum { n = 100003 };  // above the parallel threshold, odd
    float *a = rnd(n, 1), *b = rnd(n, 1), *o = zeros(n);
    op_add(o, a, b, n);
    int ok = 1;
    for (int i = 0; i < n; i++) ok &= o[i] == a[i] + b[i];
    op_accumulate(o, a, n);
    for (int i = 0; i < n; i++) ok &= o[i] == (a[i] + b[i]) + a[i];
    op_scale(o, 0.5f, n);
    for (int i = 0; i < n; i++) ok &= o[i] == ((a[i] + b[i]) + a[i]) * 0.5f;
    float *a0 = fdup(a, n);
    op_add(a, a, b, n);  // the output aliases an input
    for (int i = 0; i < n; i++) ok &= a[i] == a0[i] + b[i];
    free(a0);
    CHECK_MSG(ok, "add / accumulate / scale");
    free(a), free(b), free(o);

    /* sumsq over more than one group of blocks, against a double sum */
    int64_t big = 600001;
    float *x = rnd(big, 3);
    double ref = 0;
    for (int64_t i = 0; i < big; i++) ref += (double)x[i] * x[i];
    double got = op_sumsq(x, big);
    CHECK_MSG(fabs(got - ref) <= 1e-12 * ref, "sumsq %.17g vs %.17g", got, ref);
    CHECK(op_sumsq(x, 0) == 0.0 && op_sumsq(x, 1) == (double)x[0] * x[0]);
    free(x);
}

/* ------------------------------------------------------------ determinism */

/* Every kernel with a sum on shapes that give several tasks; all outputs in one buffer. */
static float *run_all(int threads, int64_t *len)
{
    omp_set_num_threads(threads);
    uint64_t saved = rng_state;
    rng_state = 12345;
    /* large enough to pass the kernels' thresholds for a parallel region */
    enum { b = 3, t = 64, h = 3, hs = 12, cl = h * hs, n = b * t, c = 264, oc = 100, vl = 300 };
    float *qkv = rnd(n * 3 * cl, 2), *dout = rnd(n * oc, 1), *inp = rnd(n * c, 1), *w = rnd(oc * c, 1);
    float *lnw = rnd(c, 1), *lnb = rnd(c, 1), *bias = rnd(oc, 1), *logits = rnd(n * vl, 3);
    int32_t tok[n], tgt[n];
    for (int i = 0; i < n; i++) {
        tok[i] = (int32_t)((i * 7919) % 350);  // repeats; ids outside [5, 305) are another rank's
        tgt[i] = tok[i] % (vl - 3);           // targets are real ids (< V)
    }
    int64_t sizes[] = {n * cl, b * h * t, n * 3 * cl, n * oc, n * c, oc * c, oc, n * c, n, n, n * c, c, c, vl * c,
                       t * c, n, n, n * vl, 2};
    int64_t total = 0;
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) total += sizes[i];
    float *all = zeros(total), *p = all;
    float *out = p;
    p += n * cl;
    float *lse = p;
    p += b * h * t;
    op_attention_fwd(out, lse, qkv, b, t, h, hs);
    op_attention_bwd(p, out, qkv, out, lse, b, t, h, hs);  // dout = out: any fixed tensor will do
    p += n * 3 * cl;
    op_matmul_fwd(p, inp, w, bias, n, c, oc);
    p += n * oc;
    float *dx = p, *dw = p + n * c, *db = p + n * c + oc * c;
    op_matmul_bwd(dx, dw, db, dout, inp, w, n, c, oc);
    p += n * c + oc * c + oc;
    float *lo = p, *mean = p + n * c, *rstd = p + n * c + n;
    op_layernorm_fwd(lo, mean, rstd, inp, lnw, lnb, n, c);
    p += n * c + 2 * n;
    op_layernorm_bwd(p, p + n * c, p + n * c + c, inp, inp, lnw, mean, rstd, n, c);
    p += n * c + 2 * c;
    op_embed_bwd(p, inp, tok, n, 5, vl, c);
    p += vl * c;
    op_pos_bwd(p, inp, b, t, c);
    p += t * c;
    op_xent_rowmax(p, logits, n, vl, 0, vl - 3);
    op_xent_sumexp(p + n, logits, p, n, vl, 0, vl - 3);
    op_xent_bwd(p + 2 * n, logits, tgt, p, p + n, 0.1f, n, vl, 0, vl - 3);
    p += 2 * n + n * vl;
    float *sq = rnd(100003, 1);
    for (int i = 0; i < 100003; i++) sq[i] *= ldexpf(1.0f, i % 23 - 11);  // magnitudes that make the order show
    double s = op_sumsq(sq, 100003);
    free(sq);
    memcpy(p, &s, sizeof s);
    *len = total;
    free(qkv), free(dout), free(inp), free(w), free(lnw), free(lnb), free(bias), free(logits);
    rng_state = saved;
    return all;
}

static void test_determinism(void)
{
    int64_t n1, n2;
    float *ref = run_all(2, &n1);
    const int threads[] = {2, 1, 3};
    for (int i = 0; i < 3; i++) {
        float *again = run_all(threads[i], &n2);
        CHECK_MSG(n1 == n2 && memcmp(ref, again, sizeof(float) * (size_t)n1) == 0,
                  "results with %d threads differ from those with 2", threads[i]);
        free(again);
    }
    free(ref);
    omp_set_num_threads(2);
}

/* The checker must catch a wrong gradient: scale one element of a correct one by 1.1. */
static void fd_selftest(void)
{
    struct mm_ctx c = {rnd(N * C, 1), rnd(OC * C, 1), rnd(OC, 1), zeros(N * OC), rnd(N * OC, 1)};
    float *dw = zeros(OC * C);
    op_matmul_bwd(NULL, dw, NULL, c.R, c.inp, c.w, N, C, OC);
    int worst = 0;
    for (int i = 1; i < OC * C; i++) worst = fabsf(dw[i]) > fabsf(dw[worst]) ? i : worst;
    dw[worst] *= 1.1f;
    CHECK_MSG(fd_worst(c.w, OC * C, dw, mm_J, &c) > 1.0, "the finite-difference check missed a wrong gradient");
    free(c.inp), free(c.w), free(c.bias), free(c.out), free(c.R), free(dw);
}

int main(void)
{
    omp_set_num_threads(2);
    test_embed();
    test_pos();
    test_layernorm();
    test_matmul_fd();
    test_matmul_naive(70, 300, 45, 1);
    test_matmul_naive(3, 5, 8, 0);
    test_matmul_naive(1, 1, 1, 1);
    test_attention();
    test_gelu();
    test_xent();
    test_adamw();
    test_small_ops();
    test_determinism();
    fd_selftest();
    TEST_DONE();
}
