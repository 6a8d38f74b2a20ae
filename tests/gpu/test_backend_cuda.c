/* The CUDA backend (train/cuda) against the CPU backend, entry by entry of the backend table:
 * random inputs of small and odd sizes (and a few larger ones that take the multi-pass and
 * multi-tile paths), the same inputs to both backends, the outputs compared as
 *   rel = max |gpu - cpu| / max |cpu|   over each output tensor,
 * against a tolerance per class of kernel (TOL_*). Gradient outputs start from random values, so
 * that the accumulate (+=) contract is checked too. Operand buffers (backend.h: bf16 on the GPU)
 * are given to both backends with the same bf16-rounded values; as outputs they start from random
 * values (every element must be overwritten) and take at least TOL_ACT (one bf16 rounding). Every GPU call runs twice from the same state
 * and the two results must be bit-identical (determinism).
 *
 * Also: the memory entries (zeroed alloc, copies, to_host from several threads at once), an
 * error report through sync, the attention paths against the CPU (the default backend runs head
 * size 64 on the bf16 kernels of attention_wgmma.cu on H100 / H200, else attention_fast.cu;
 * MPS_CUDA_ATTENTION=mma, =fp32 and =bf16 select the mma.sync, the fp32 and the WMMA kernels), and
 * timings at GPT-2 124M sizes (informational; MPS_TEST_BENCH=0
 * skips them).
 *
 * The Llama block's entries (groups rmsnorm, rope, swiglu, gqa) likewise, grouped-query attention
 * with H = 8 query heads over KV = 2 and 8 kv heads, head sizes 64 and 128.
 *
 * The tests come in groups (memory, embed, layernorm, matmul, attention, attention_bf16,
 * elementwise, xent, optim, gemm_tune, rmsnorm, rope, swiglu, gqa, bench), each run in a child process with fresh backends, so that a
 * kernel fault or hang shows as that group's failure and the other groups still report.
 * `test_backend_cuda <group>` runs one group in-process (e.g. under compute-sanitizer).
 * Every line starts with "ok" or "FAIL"; bench lines are informational.
 *
 * Without a GPU: prints "no GPU: skipped" and exits 77 (CTest: skipped). */
#include <cuda_runtime_api.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "backend.h"

/* Tolerances on rel (see above). bf16 GEMM operands carry 8 significant bits: 2e-2 leaves room
 * over the ~1e-3 expected, a wrong index or transpose gives ~1. The fp32 kernels differ from the
 * CPU only by summation order, FMA contraction and libm ulps: 1e-5 for element-wise and
 * short-row kernels, 1e-4 where sums run over thousands of terms (the CPU sums in float in row
 * order, which is itself off by ~1e-5 there). */
#define TOL_EW 1e-5
#define TOL_RED 1e-4
#define TOL_GEMM 2e-2
#define TOL_ATTN 1e-4
#define TOL_ATTN_BF16 3e-2
#define TOL_DOUBLE 1e-9
#define TOL_ACT 8e-3 /* an output rounded to bf16: 2^-8 of its magnitude at most, relative to the max */

static mps_backend cpu, gpu;
static int failures, checks;

/* ---------------------------------------------------------------- helpers */

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rnext(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}
static float urand(void) { return (float)((rnext() >> 40) * (2.0 / 16777216.0) - 1.0); } /* [-1, 1) */

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "out of host memory\n");
        exit(1);
    }
    return p;
}
static float *hrand(int64_t n, float scale)
{
    float *p = xmalloc(sizeof(float) * (size_t)n);
    for (int64_t i = 0; i < n; i++)
        p[i] = scale * urand();
    return p;
}
static float *hdup(const float *x, int64_t n)
{
    float *p = xmalloc(sizeof(float) * (size_t)n);
    memcpy(p, x, sizeof(float) * (size_t)n);
    return p;
}
static int32_t *hints(int64_t n, int32_t lo, int32_t hi) /* uniform in [lo, hi) */
{
    int32_t *p = xmalloc(sizeof(int32_t) * (size_t)n);
    for (int64_t i = 0; i < n; i++)
        p[i] = lo + (int32_t)(rnext() % (uint64_t)(hi - lo));
    return p;
}

static void *dalloc(size_t bytes)
{
    void *d = gpu.alloc(gpu.ctx, bytes);
    if (!d) {
        fprintf(stderr, "FAIL: device alloc of %zu bytes\n", bytes);
        exit(1);
    }
    return d;
}
static void *dput(const void *h, size_t bytes)
{
    void *d = dalloc(bytes);
    gpu.from_host(gpu.ctx, d, h, bytes);
    return d;
}
static float *dputf(const float *h, int64_t n) { return dput(h, sizeof(float) * (size_t)n); }
static float *dgetf(const float *d, int64_t n)
{
    float *h = xmalloc(sizeof(float) * (size_t)n);
    gpu.to_host(gpu.ctx, h, d, sizeof(float) * (size_t)n);
    return h;
}
static void dfree(void *d) { gpu.release(gpu.ctx, d); }

/* operand buffers: host floats <-> the GPU backend's format (act_bytes 2: bf16, 4: fp32) */
static uint16_t f2bf(float f) /* round to nearest even (finite values) */
{
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static float bf2f(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static void round_act(float *h, int64_t n) /* the values an operand buffer can hold */
{
    if (gpu.act_bytes == 2)
        for (int64_t i = 0; i < n; i++)
            h[i] = bf2f(f2bf(h[i]));
}
static void act_put(void *d, const float *h, int64_t n)
{
    if (gpu.act_bytes == 4) {
        gpu.from_host(gpu.ctx, d, h, sizeof(float) * (size_t)n);
        return;
    }
    uint16_t *b = xmalloc(2 * (size_t)(n > 0 ? n : 1));
    for (int64_t i = 0; i < n; i++)
        b[i] = f2bf(h[i]);
    gpu.from_host(gpu.ctx, d, b, 2 * (size_t)n);
    free(b);
}
static float *act_get(const void *d, int64_t n)
{
    float *h = xmalloc(sizeof(float) * (size_t)(n > 0 ? n : 1));
    if (gpu.act_bytes == 4) {
        gpu.to_host(gpu.ctx, h, d, sizeof(float) * (size_t)n);
        return h;
    }
    uint16_t *b = xmalloc(2 * (size_t)(n > 0 ? n : 1));
    gpu.to_host(gpu.ctx, b, d, 2 * (size_t)n);
    for (int64_t i = 0; i < n; i++)
        h[i] = bf2f(b[i]);
    free(b);
    return h;
}

static int sync_ok(const char *what)
{
    mps_err e;
    memset(&e, 0, sizeof e);
    if (gpu.sync(gpu.ctx, &e) != 0) {
        printf("FAIL  %s: sync: %s\n", what, e.msg);
        failures++;
        return 0;
    }
    return 1;
}

/* accuracy of one output tensor; the reference scale is max |cpu|, at least floor */
static void cmp_floor(const char *op, const char *what, const float *g, const float *c, int64_t n, double tol,
                      double floor)
{
    double maxabs = 0, maxref = 0;
    int64_t worst = 0, bad = 0;
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(g[i]) != !isfinite(c[i]) || (!isfinite(c[i]) && g[i] != c[i])) {
            if (!bad)
                worst = i;
            bad++;
            continue;
        }
        if (!isfinite(c[i]))
            continue;
        double d = fabs((double)g[i] - (double)c[i]);
        if (d > maxabs && !bad) {
            maxabs = d;
            worst = i;
        }
        if (fabs(c[i]) > maxref)
            maxref = fabs(c[i]);
    }
    /* an output that is exactly zero on the CPU (attention with T=1: the softmax of a single score
     * has zero gradient; the GPU's differently rounded D_t leaves ~1 ulp) is compared in absolute
     * terms, the inputs being of unit scale */
    if (floor > maxref)
        maxref = floor;
    double rel = maxref > 0 ? maxabs / maxref : maxabs;
    int ok = !bad && rel <= tol;
    checks++;
    printf("%-5s %-34s %-7s max|diff| %.3e  max|cpu| %.3e  rel %.3e  (tol %.0e)%s\n", ok ? "ok" : "FAIL", op, what,
           maxabs, maxref, rel, tol, bad ? "  non-finite mismatch" : "");
    if (!ok) {
        failures++;
        printf("      worst element %lld of %lld: gpu %.9g cpu %.9g\n", (long long)worst, (long long)n, g[worst], c[worst]);
    }
}

static void cmp(const char *op, const char *what, const float *g, const float *c, int64_t n, double tol)
{
    cmp_floor(op, what, g, c, n, tol, 0.0);
}

/* two GPU results of one output must be bit-identical: "between" names them in the message */
static void identical(const char *op, const char *what, const float *a, const float *b, int64_t n,
                      const char *between)
{
    int64_t diff = 0, first = -1;
    for (int64_t i = 0; i < n; i++)
        if (memcmp(&a[i], &b[i], sizeof(float)) != 0) {
            if (first < 0)
                first = i;
            diff++;
        }
    checks++;
    if (diff) {
        failures++;
        printf("FAIL  %-34s %-7s %lld of %lld elements differ %s (first %lld: %.9g vs %.9g)\n", op, what,
               (long long)diff, (long long)n, between, (long long)first, a[first], b[first]);
    }
}
/* the two GPU runs of one output */
static void same(const char *op, const char *what, const float *a, const float *b, int64_t n)
{
    identical(op, what, a, b, n, "between two runs: NOT DETERMINISTIC");
}

/* Outputs of one test: the initial contents (random for += outputs), the CPU result, the device
 * buffer and the results of the two GPU runs. */
#define MAXO 6
typedef struct {
    const char *name;
    int64_t n;
    int act; /* an operand buffer on the GPU */
    float *init, *cpu, *dev, *res[2];
} obuf;
typedef struct {
    obuf o[MAXO];
    int no;
    const char *op;
} oset;

/* adds an output; init NULL: zeros; returns the CPU buffer */
static float *o_add(oset *s, const char *name, int64_t n, const float *init)
{
    obuf *b = &s->o[s->no++];
    b->name = name;
    b->n = n;
    b->init = xmalloc(sizeof(float) * (size_t)n);
    if (init)
        memcpy(b->init, init, sizeof(float) * (size_t)n);
    else
        memset(b->init, 0, sizeof(float) * (size_t)n);
    b->cpu = hdup(b->init, n);
    b->dev = dputf(b->init, n);
    b->act = 0;
    b->res[0] = b->res[1] = NULL;
    return b->cpu;
}
/* adds an operand-buffer output: overwritten, so it starts from random values on the GPU */
static float *o_add_act(oset *s, const char *name, int64_t n)
{
    obuf *b = &s->o[s->no++];
    b->name = name;
    b->n = n;
    b->act = 1;
    b->init = hrand(n, 100.0f);
    round_act(b->init, n);
    b->cpu = xmalloc(sizeof(float) * (size_t)(n > 0 ? n : 1));
    memset(b->cpu, 0, sizeof(float) * (size_t)n);
    b->dev = dalloc((size_t)(n > 0 ? n : 1) * (size_t)gpu.act_bytes);
    b->res[0] = b->res[1] = NULL;
    return b->cpu;
}
static float *o_dev(oset *s, int i) { return s->o[i].dev; }
static void o_reset(oset *s)
{
    for (int i = 0; i < s->no; i++)
        if (s->o[i].act)
            act_put(s->o[i].dev, s->o[i].init, s->o[i].n);
        else
            gpu.from_host(gpu.ctx, s->o[i].dev, s->o[i].init, sizeof(float) * (size_t)s->o[i].n);
}
static void o_fetch(oset *s, int run)
{
    sync_ok(s->op);
    for (int i = 0; i < s->no; i++)
        s->o[i].res[run] = s->o[i].act ? act_get(s->o[i].dev, s->o[i].n) : dgetf(s->o[i].dev, s->o[i].n);
}
/* compares (output i against tols[i], or tol when tols is NULL) and frees */
static void o_done_each(oset *s, double tol, const double *tols)
{
    for (int i = 0; i < s->no; i++) {
        obuf *b = &s->o[i];
        double t = tols ? tols[i] : tol;
        cmp(s->op, b->name, b->res[0], b->cpu, b->n, b->act && t < TOL_ACT ? TOL_ACT : t);
        same(s->op, b->name, b->res[0], b->res[1], b->n);
        free(b->init);
        free(b->cpu);
        free(b->res[0]);
        free(b->res[1]);
        dfree(b->dev);
    }
    s->no = 0;
}
static void o_done(oset *s, double tol) { o_done_each(s, tol, NULL); }
/* runs the GPU call twice, each from the initial outputs */
#define GPU_TWICE(s, call)                                                                                 \
    do {                                                                                                   \
        for (int run_ = 0; run_ < 2; run_++) {                                                             \
            o_reset(&(s));                                                                                 \
            call;                                                                                          \
            o_fetch(&(s), run_);                                                                           \
        }                                                                                                  \
    } while (0)

typedef struct {
    float *h, *d;
    int64_t n;
} tin;
static tin in_rand(int64_t n, float scale)
{
    tin t = {hrand(n, scale), NULL, n};
    t.d = dputf(t.h, n);
    return t;
}
static tin in_copy(const float *h, int64_t n)
{
    tin t = {hdup(h, n), NULL, n};
    t.d = dputf(t.h, n);
    return t;
}
/* an operand-buffer input: random values rounded to what the buffer holds, the same on both sides */
static tin in_rand_act(int64_t n, float scale)
{
    tin t = {hrand(n, scale), NULL, n};
    round_act(t.h, n);
    t.d = dalloc((size_t)(n > 0 ? n : 1) * (size_t)gpu.act_bytes);
    act_put(t.d, t.h, n);
    return t;
}
static tin in_copy_act(const float *h, int64_t n)
{
    tin t = {hdup(h, n), NULL, n};
    round_act(t.h, n);
    t.d = dalloc((size_t)(n > 0 ? n : 1) * (size_t)gpu.act_bytes);
    act_put(t.d, t.h, n);
    return t;
}
static void in_free(tin *t)
{
    free(t->h);
    dfree(t->d);
}

/* ---------------------------------------------------------------- memory */

typedef struct {
    const float *dev;
    const float *want;
    int64_t n;
    int bad;
} th_arg;

static void *to_host_thread(void *p)
{
    th_arg *a = p;
    float *h = xmalloc(sizeof(float) * (size_t)a->n);
    for (int round = 0; round < 16; round++) {
        memset(h, 0, sizeof(float) * (size_t)a->n);
        gpu.to_host(gpu.ctx, h, a->dev, sizeof(float) * (size_t)a->n);
        if (memcmp(h, a->want, sizeof(float) * (size_t)a->n) != 0)
            a->bad = 1;
    }
    free(h);
    return NULL;
}

static void test_memory(void)
{
    const int64_t n = 100003;
    checks++;
    /* alloc is zeroed (fill a buffer, free it, allocate again: the pool may hand back the same memory) */
    float *ones = hrand(n, 1.0f);
    float *d = dputf(ones, n);
    dfree(d);
    d = dalloc(sizeof(float) * (size_t)n);
    float *h = dgetf(d, n);
    int64_t nz = 0;
    for (int64_t i = 0; i < n; i++)
        nz += h[i] != 0.0f;
    printf("%-5s %-34s %lld non-zero floats after alloc\n", nz ? "FAIL" : "ok", "alloc (zeroed)", (long long)nz);
    failures += nz != 0;
    free(h);
    /* from_host / to_host / copy / zero */
    gpu.from_host(gpu.ctx, d, ones, sizeof(float) * (size_t)n);
    float *d2 = dalloc(sizeof(float) * (size_t)n);
    gpu.copy(gpu.ctx, d2, d, sizeof(float) * (size_t)n);
    gpu.zero(gpu.ctx, d, sizeof(float) * 1000);
    float *h1 = dgetf(d, n), *h2 = dgetf(d2, n);
    int ok = memcmp(h2, ones, sizeof(float) * (size_t)n) == 0 && memcmp(h1 + 1000, ones + 1000, sizeof(float) * (size_t)(n - 1000)) == 0;
    for (int i = 0; i < 1000; i++)
        ok &= h1[i] == 0.0f;
    checks++;
    printf("%-5s %-34s\n", ok ? "ok" : "FAIL", "from_host, copy, zero, to_host");
    failures += !ok;
    /* to_host from 4 threads at once, while the buffers are distinct slices of one allocation */
    pthread_t th[4];
    th_arg args[4];
    for (int t = 0; t < 4; t++) {
        args[t].dev = d2 + t * (n / 4);
        args[t].want = ones + t * (n / 4);
        args[t].n = n / 4;
        args[t].bad = 0;
        pthread_create(&th[t], NULL, to_host_thread, &args[t]);
    }
    int bad = 0;
    for (int t = 0; t < 4; t++) {
        pthread_join(th[t], NULL);
        bad |= args[t].bad;
    }
    checks++;
    printf("%-5s %-34s\n", bad ? "FAIL" : "ok", "to_host from 4 threads at once");
    failures += bad;
    sync_ok("memory");
    free(h1);
    free(h2);
    free(ones);
    dfree(d);
    dfree(d2);
}

/* ---------------------------------------------------------------- embeddings */

static void test_embed(int64_t N, int C, int64_t v0, int64_t Vl, int32_t tok_lo, int32_t tok_hi)
{
    char op[64];
    int32_t *tok = hints(N, tok_lo, tok_hi);
    int32_t *tok_d = dput(tok, sizeof(int32_t) * (size_t)N);
    tin wte = in_rand(Vl * C, 1.0f), dout = in_rand(N * C, 1.0f);
    oset s = {.op = op};

    snprintf(op, sizeof op, "embed_fwd N%lld C%d v0 %lld", (long long)N, C, (long long)v0);
    float *junk = hrand(N * C, 1.0f);
    float *out = o_add(&s, "out", N * C, junk); /* overwritten */
    free(junk);
    cpu.embed_fwd(cpu.ctx, out, tok, N, wte.h, v0, Vl, C);
    GPU_TWICE(s, gpu.embed_fwd(gpu.ctx, o_dev(&s, 0), tok_d, N, wte.d, v0, Vl, C));
    o_done(&s, 0.0);

    snprintf(op, sizeof op, "embed_bwd N%lld C%d v0 %lld", (long long)N, C, (long long)v0);
    float *init = hrand(Vl * C, 1.0f);
    float *dwte = o_add(&s, "dwte", Vl * C, init);
    free(init);
    cpu.embed_bwd(cpu.ctx, dwte, dout.h, tok, N, v0, Vl, C);
    GPU_TWICE(s, gpu.embed_bwd(gpu.ctx, o_dev(&s, 0), dout.d, tok_d, N, v0, Vl, C));
    o_done(&s, N > 1000 ? TOL_RED : TOL_EW);
    in_free(&wte);
    in_free(&dout);
    free(tok);
    dfree(tok_d);
}

static void test_pos(int B, int T, int C)
{
    char op[64];
    tin wpe = in_rand((int64_t)(T + 5) * C, 1.0f), dx = in_rand((int64_t)B * T * C, 1.0f);
    float *x0 = hrand((int64_t)B * T * C, 1.0f);
    oset s = {.op = op};
    snprintf(op, sizeof op, "pos_fwd B%d T%d C%d", B, T, C);
    float *x = o_add(&s, "x", (int64_t)B * T * C, x0);
    cpu.pos_fwd(cpu.ctx, x, wpe.h, B, T, C);
    GPU_TWICE(s, gpu.pos_fwd(gpu.ctx, o_dev(&s, 0), wpe.d, B, T, C));
    o_done(&s, TOL_EW);
    snprintf(op, sizeof op, "pos_bwd B%d T%d C%d", B, T, C);
    float *dwpe = o_add(&s, "dwpe", (int64_t)(T + 5) * C, wpe.h);
    cpu.pos_bwd(cpu.ctx, dwpe, dx.h, B, T, C);
    GPU_TWICE(s, gpu.pos_bwd(gpu.ctx, o_dev(&s, 0), dx.d, B, T, C));
    o_done(&s, TOL_EW);
    free(x0);
    in_free(&wpe);
    in_free(&dx);
}

/* ---------------------------------------------------------------- layernorm */

static void test_layernorm(int64_t N, int C, int with_stats, int with_dinp)
{
    char op[80];
    tin inp = in_rand(N * C, 2.0f), w = in_rand(C, 1.0f), b = in_rand(C, 0.5f), dout = in_rand(N * C, 1.0f);
    for (int64_t i = 0; i < N * C; i++) /* rows with an offset: the mean matters */
        inp.h[i] += (float)(i / C % 7) - 3.0f;
    gpu.from_host(gpu.ctx, inp.d, inp.h, sizeof(float) * (size_t)(N * C));
    oset s = {.op = op};
    snprintf(op, sizeof op, "layernorm_fwd N%lld C%d%s", (long long)N, C, with_stats ? "" : " no stats");
    float *out = o_add_act(&s, "out", N * C);
    float *mean = with_stats ? o_add(&s, "mean", N, NULL) : NULL;
    float *rstd = with_stats ? o_add(&s, "rstd", N, NULL) : NULL;
    cpu.layernorm_fwd(cpu.ctx, out, mean, rstd, inp.h, w.h, b.h, N, C);
    GPU_TWICE(s, gpu.layernorm_fwd(gpu.ctx, o_dev(&s, 0), with_stats ? o_dev(&s, 1) : NULL,
                                   with_stats ? o_dev(&s, 2) : NULL, inp.d, w.d, b.d, N, C));
    /* the backward takes the CPU's statistics */
    tin m = {NULL, NULL, 0}, r = {NULL, NULL, 0};
    if (with_stats) {
        m = in_copy(mean, N);
        r = in_copy(rstd, N);
    }
    o_done(&s, TOL_EW);
    if (with_stats) {
        tin dout_act = in_copy_act(dout.h, N * C); /* dout as an operand buffer (the products' bf16 dinp) */
        for (int da = 0; da < 2; da++) {
            const tin *g = da ? &dout_act : &dout;
            snprintf(op, sizeof op, "layernorm_bwd N%lld C%d%s%s", (long long)N, C, with_dinp ? "" : " no dinp",
                     da ? " dout act" : "");
            /* with dinp also its operand copy (overwritten: starts from poison) and column sums (+=) */
            float *i0 = hrand(N * C, 1.0f), *i1 = hrand(C, 1.0f), *i2 = hrand(C, 1.0f), *i3 = hrand(C, 1e3f);
            float *dinp = with_dinp ? o_add(&s, "dinp", N * C, i0) : NULL;
            float *dact = with_dinp ? o_add_act(&s, "dinp_act", N * C) : NULL;
            float *dsum = with_dinp ? o_add(&s, "dinp_colsum", C, i3) : NULL;
            float *dw = o_add(&s, "dw", C, i1), *db = o_add(&s, "db", C, i2);
            cpu.layernorm_bwd(cpu.ctx, dinp, dact, dsum, dw, db, g->h, da, inp.h, w.h, m.h, r.h, N, C);
            int k = with_dinp ? 3 : 0;
            GPU_TWICE(s, gpu.layernorm_bwd(gpu.ctx, with_dinp ? o_dev(&s, 0) : NULL, with_dinp ? o_dev(&s, 1) : NULL,
                                           with_dinp ? o_dev(&s, 2) : NULL, o_dev(&s, k), o_dev(&s, k + 1), g->d, da,
                                           inp.d, w.d, m.d, r.d, N, C));
            o_done(&s, N > 1000 ? TOL_RED : TOL_EW);
            free(i3);
            free(i0);
            free(i1);
            free(i2);
        }
        in_free(&dout_act);
        in_free(&m);
        in_free(&r);
    }
    in_free(&inp);
    in_free(&w);
    in_free(&b);
    in_free(&dout);
}

/* ---------------------------------------------------------------- matmul */

/* off_out, off_bias: the output and bias pointers shifted by that many floats (unaligned paths) */
static void test_matmul(int64_t N, int C, int OC, int bias, int off_out, int off_bias)
{
    char op[96];
    tin inp = in_rand_act(N * C, 1.0f), w = in_rand((int64_t)OC * C, 1.0f), bb = in_rand(OC + off_bias, 1.0f);
    tin dout = in_rand(N * OC, 1.0f), dout_act = in_copy_act(dout.h, N * OC);
    const float *bh = bias ? bb.h + off_bias : NULL, *bd = bias ? bb.d + off_bias : NULL;
    oset s = {.op = op};
    snprintf(op, sizeof op, "matmul_fwd N%lld C%d OC%d%s%s%s", (long long)N, C, OC, bias ? " bias" : "",
             off_out ? " out+1" : "", off_bias ? " bias+1" : "");
    float *init = hrand(N * OC + off_out, 1.0f);
    float *out = o_add(&s, "out", N * OC + off_out, init); /* overwritten, prefix untouched */
    cpu.matmul_fwd(cpu.ctx, out + off_out, inp.h, w.h, bh, NULL, N, C, OC);
    GPU_TWICE(s, gpu.matmul_fwd(gpu.ctx, o_dev(&s, 0) + off_out, inp.d, w.d, bd, NULL, N, C, OC));
    o_done(&s, TOL_GEMM);
    /* the residual in the epilogue: out = inp @ w^T + bias + resid */
    snprintf(op, sizeof op, "matmul_fwd+resid N%lld C%d OC%d%s%s%s", (long long)N, C, OC, bias ? " bias" : "",
             off_out ? " out+1" : "", off_bias ? " bias+1" : "");
    tin resid = in_rand(N * OC + off_out, 4.0f);
    out = o_add(&s, "out", N * OC + off_out, init);
    cpu.matmul_fwd(cpu.ctx, out + off_out, inp.h, w.h, bh, resid.h + off_out, N, C, OC);
    GPU_TWICE(s, gpu.matmul_fwd(gpu.ctx, o_dev(&s, 0) + off_out, inp.d, w.d, bd, resid.d + off_out, N, C, OC));
    o_done(&s, TOL_GEMM);
    in_free(&resid);
    free(init);
    if (!off_out) { /* the product as an operand buffer (the head's logits, qkv) */
        snprintf(op, sizeof op, "matmul_fwd_act N%lld C%d OC%d%s", (long long)N, C, OC, bias ? " bias" : "");
        out = o_add_act(&s, "out", N * OC);
        cpu.matmul_fwd_act(cpu.ctx, out, inp.h, w.h, bh, N, C, OC);
        GPU_TWICE(s, gpu.matmul_fwd_act(gpu.ctx, o_dev(&s, 0), inp.d, w.d, bd, N, C, OC));
        o_done(&s, TOL_GEMM);
    }

    /* bit 0: dw only (else dinp, dw, dbias); bit 1: dout an operand; bit 2: dw_set (dw overwritten:
     * large initial values, so that an accumulation would show) */
    for (int variant = 0; variant < 8; variant++) {
        const int da = (variant >> 1) & 1, set = variant >> 2;
        const tin *g = da ? &dout_act : &dout;
        snprintf(op, sizeof op, "matmul_bwd N%lld C%d OC%d%s%s%s%s", (long long)N, C, OC, variant & 1 ? " dw only" : "",
                 off_out ? " grads+1" : "", da ? " dout act" : "", set ? " dw=" : "");
        float *i0 = hrand(N * C + off_out, 1.0f), *i1 = hrand((int64_t)OC * C + off_out, set ? 64.0f : 1.0f);
        float *i2 = hrand(OC, 1.0f);
        float *dinp = variant & 1 ? NULL : o_add(&s, "dinp", N * C + off_out, i0);
        float *dw = o_add(&s, "dw", (int64_t)OC * C + off_out, i1);
        float *db = variant & 1 ? NULL : o_add(&s, "dbias", OC, i2);
        cpu.matmul_bwd(cpu.ctx, dinp ? dinp + off_out : NULL, 0, dw + off_out, set, db, g->h, 0, inp.h, w.h, N, C, OC);
        if (variant & 1)
            GPU_TWICE(s, gpu.matmul_bwd(gpu.ctx, NULL, 0, o_dev(&s, 0) + off_out, set, NULL, g->d, da, inp.d, w.d, N,
                                        C, OC));
        else
            GPU_TWICE(s, gpu.matmul_bwd(gpu.ctx, o_dev(&s, 0) + off_out, 0, o_dev(&s, 1) + off_out, set, o_dev(&s, 2),
                                        g->d, da, inp.d, w.d, N, C, OC));
        /* dbias is an fp32 column sum: it must meet the fp32 tolerance, not the GEMM one */
        double tols[MAXO];
        for (int i = 0; i < s.no; i++)
            tols[i] = strcmp(s.o[i].name, "dbias") == 0 ? (N > 1000 ? TOL_RED : TOL_EW) : TOL_GEMM;
        o_done_each(&s, 0, tols);
        free(i0);
        free(i1);
        free(i2);
    }
    /* dinp as an operand buffer (the attention output's gradient), from an operand dout */
    snprintf(op, sizeof op, "matmul_bwd N%lld C%d OC%d dinp act", (long long)N, C, OC);
    float *dinp = o_add_act(&s, "dinp", N * C);
    float *i1 = hrand((int64_t)OC * C, 1.0f);
    float *dw = o_add(&s, "dw", (int64_t)OC * C, i1);
    cpu.matmul_bwd(cpu.ctx, dinp, 1, dw, 0, NULL, dout_act.h, 1, inp.h, w.h, N, C, OC);
    GPU_TWICE(s, gpu.matmul_bwd(gpu.ctx, o_dev(&s, 0), 1, o_dev(&s, 1), 0, NULL, dout_act.d, 1, inp.d, w.d, N, C, OC));
    o_done(&s, TOL_GEMM);
    free(i1);
    in_free(&inp);
    in_free(&w);
    in_free(&bb);
    in_free(&dout);
    in_free(&dout_act);
}

/* The stacked products (q|k|v, gate|up): nparts weights of oc[i] rows, with biases or not. copies:
 * an AdamW step first, so that the GPU holds bf16 copies of the weights, made apart and joined by
 * the first product; a second step then updates them where they were joined. */
static void test_matmul_parts(int64_t N, int C, int nparts, const int *oc, int bias, int copies)
{
    char op[112];
    int64_t W = 0;
    tin w[MPS_MAX_PARTS], b[MPS_MAX_PARTS], gr[MPS_MAX_PARTS];
    const float *wh[MPS_MAX_PARTS], *wd[MPS_MAX_PARTS], *bh[MPS_MAX_PARTS], *bd[MPS_MAX_PARTS];
    for (int i = 0; i < nparts; i++) {
        W += oc[i];
        w[i] = in_rand((int64_t)oc[i] * C, 1.0f);
        b[i] = in_rand(oc[i], 1.0f);
        gr[i] = in_rand((int64_t)oc[i] * C, 1.0f);
        wh[i] = w[i].h, wd[i] = w[i].d;
        bh[i] = bias ? b[i].h : NULL, bd[i] = bias ? b[i].d : NULL;
    }
    tin inp = in_rand_act(N * C, 1.0f), dout = in_rand_act(N * W, 1.0f);
    for (int round = 0; round < (copies ? 2 : 1); round++) {
        if (copies) { /* the same step on both sides; the GPU's copies are read_by_products */
            const mps_adamw_step st = {0.05f, 0.9f, 0.95f, 1e-8f, round + 1, 1.0f};
            for (int i = 0; i < nparts; i++) {
                const int64_t n = (int64_t)oc[i] * C;
                float *hm = xmalloc(sizeof(float) * (size_t)n), *hv = xmalloc(sizeof(float) * (size_t)n);
                memset(hm, 0, sizeof(float) * (size_t)n);
                memset(hv, 0, sizeof(float) * (size_t)n);
                float *m = dputf(hm, n), *v = dputf(hv, n), *gh = hdup(gr[i].h, n), *gd = dputf(gr[i].h, n);
                mps_adamw_job jc = {w[i].h, gh, hm, hv, n, 0.1f, 1, 0}, jg = {w[i].d, gd, m, v, n, 0.1f, 1, 0};
                cpu.adamw_many(cpu.ctx, &jc, 1, &st);
                gpu.adamw_many(gpu.ctx, &jg, 1, &st);
                sync_ok("matmul_parts: adamw");
                free(hm);
                free(hv);
                free(gh);
                dfree(m);
                dfree(v);
                dfree(gd);
            }
        }
        const char *how = copies ? (round ? " copies, 2nd step" : " copies") : "";
        oset s = {.op = op};
        snprintf(op, sizeof op, "matmul_parts_fwd_act N%lld C%d W%lld (%d parts)%s%s", (long long)N, C, (long long)W,
                 nparts, bias ? " bias" : "", how);
        float *out = o_add_act(&s, "out", N * W);
        cpu.matmul_parts_fwd_act(cpu.ctx, out, inp.h, wh, bh, oc, nparts, N, C);
        GPU_TWICE(s, gpu.matmul_parts_fwd_act(gpu.ctx, o_dev(&s, 0), inp.d, wd, bd, oc, nparts, N, C));
        o_done(&s, TOL_GEMM);
        /* dinp overwritten, fp32 or an operand buffer; dw += (in the second round dw_set: dw
         * overwritten, large initial values so that an accumulation would show) */
        float *none[MPS_MAX_PARTS] = {NULL};
        for (int da = 0; da < 2; da++) {
            snprintf(op, sizeof op, "matmul_parts_bwd N%lld C%d W%lld (%d parts)%s%s%s", (long long)N, C, (long long)W,
                     nparts, how, round ? " dw=" : "", da ? " dinp act" : "");
            float *i0 = hrand(N * C, 1.0f);
            float *dinp = da ? o_add_act(&s, "dinp", N * C) : o_add(&s, "dinp", N * C, i0);
            float *dwh[MPS_MAX_PARTS];
            for (int i = 0; i < nparts; i++) {
                float *init = hrand((int64_t)oc[i] * C, round ? 64.0f : 1.0f);
                dwh[i] = o_add(&s, "dw", (int64_t)oc[i] * C, init);
                free(init);
            }
            const int mode = da ? MPS_DINP_ACT : MPS_DINP_F32;
            cpu.matmul_parts_bwd(cpu.ctx, dinp, mode, dwh, round, none, dout.h, inp.h, wh, oc, nparts, N, C);
            GPU_TWICE(s, {
                float *dwd[MPS_MAX_PARTS];
                for (int i = 0; i < nparts; i++)
                    dwd[i] = o_dev(&s, 1 + i);
                gpu.matmul_parts_bwd(gpu.ctx, o_dev(&s, 0), mode, dwd, round, none, dout.d, inp.d, wd, oc, nparts, N,
                                     C);
            });
            o_done(&s, TOL_GEMM);
            free(i0);
        }
        if (bias) { /* the bias gradients alone: fp32 column sums */
            snprintf(op, sizeof op, "matmul_parts_bwd N%lld C%d W%lld (%d parts) dbias", (long long)N, C, (long long)W,
                     nparts);
            float *dbh[MPS_MAX_PARTS];
            for (int i = 0; i < nparts; i++) {
                float *init = hrand(oc[i], 1.0f);
                dbh[i] = o_add(&s, "dbias", oc[i], init);
                free(init);
            }
            cpu.matmul_parts_bwd(cpu.ctx, NULL, 0, none, 0, dbh, dout.h, inp.h, wh, oc, nparts, N, C);
            GPU_TWICE(s, {
                float *dbd[MPS_MAX_PARTS];
                for (int i = 0; i < nparts; i++)
                    dbd[i] = o_dev(&s, i);
                gpu.matmul_parts_bwd(gpu.ctx, NULL, 0, none, 0, dbd, dout.d, inp.d, wd, oc, nparts, N, C);
            });
            o_done(&s, N > 1000 ? TOL_RED : TOL_EW);
        }
    }
    for (int i = 0; i < nparts; i++) {
        in_free(&w[i]);
        in_free(&b[i]);
        in_free(&gr[i]);
    }
    in_free(&inp);
    in_free(&dout);
}

/* the MLP's fused entries: pre = inp @ w^T + bias, out = gelu(pre); dpre = (dout @ w2) gelu'(pre),
 * dbias += column sums of dpre (OC % 8 == 0 takes cuBLASLt's GELU epilogues, else the steps) */
static void test_matmul_gelu(int64_t N, int C, int OC)
{
    char op[96];
    tin inp = in_rand_act(N * C, 1.0f), w = in_rand((int64_t)OC * C, 0.5f), bias = in_rand(OC, 0.5f);
    oset s = {.op = op};
    snprintf(op, sizeof op, "matmul_gelu_fwd N%lld C%d OC%d", (long long)N, C, OC);
    float *out = o_add_act(&s, "out", N * OC), *pre = o_add_act(&s, "pre", N * OC);
    cpu.matmul_gelu_fwd(cpu.ctx, out, pre, inp.h, w.h, bias.h, N, C, OC);
    GPU_TWICE(s, gpu.matmul_gelu_fwd(gpu.ctx, o_dev(&s, 0), o_dev(&s, 1), inp.d, w.d, bias.d, N, C, OC));
    tin p = in_copy_act(pre, N * OC); /* the backward takes the CPU's pre */
    o_done(&s, TOL_GEMM);

    /* backward through the second product (w2 (C2, OC), dout (N, C2)) and the GELU */
    const int C2 = C + 8;
    tin w2 = in_rand((int64_t)C2 * OC, 0.5f), dout = in_rand(N * C2, 1.0f);
    snprintf(op, sizeof op, "matmul_dgelu_bwd N%lld C%d OC%d", (long long)N, OC, C2);
    float *i0 = hrand(OC, 1.0f);
    float *dpre = o_add_act(&s, "dpre", N * OC), *db = o_add(&s, "dbias", OC, i0);
    cpu.matmul_dgelu_bwd(cpu.ctx, dpre, db, dout.h, 0, w2.h, p.h, N, OC, C2);
    GPU_TWICE(s, gpu.matmul_dgelu_bwd(gpu.ctx, o_dev(&s, 0), o_dev(&s, 1), dout.d, 0, w2.d, p.d, N, OC, C2));
    o_done(&s, TOL_GEMM);
    /* the same with dout an operand buffer (the layernorm backward's copy of the residual gradient) */
    snprintf(op, sizeof op, "matmul_dgelu_bwd N%lld C%d OC%d dout act", (long long)N, OC, C2);
    tin dout_act = in_copy_act(dout.h, N * C2);
    dpre = o_add_act(&s, "dpre", N * OC), db = o_add(&s, "dbias", OC, i0);
    cpu.matmul_dgelu_bwd(cpu.ctx, dpre, db, dout_act.h, 1, w2.h, p.h, N, OC, C2);
    GPU_TWICE(s, gpu.matmul_dgelu_bwd(gpu.ctx, o_dev(&s, 0), o_dev(&s, 1), dout_act.d, 1, w2.d, p.d, N, OC, C2));
    o_done(&s, TOL_GEMM);
    in_free(&dout_act);
    free(i0);
    in_free(&inp);
    in_free(&w);
    in_free(&bias);
    in_free(&p);
    in_free(&w2);
    in_free(&dout);
}

/* ---------------------------------------------------------------- attention */

static void test_attention(mps_backend *be, const char *tag, int B, int T, int H, int hs, double tol)
{
    mps_backend saved = gpu;
    gpu = *be;
    char op[96];
    const int64_t Cl = (int64_t)H * hs, nqkv = (int64_t)B * T * 3 * Cl, nout = (int64_t)B * T * Cl;
    const int64_t nlse = (int64_t)B * H * T;
    tin qkv = in_rand_act(nqkv, 1.5f), dout = in_rand_act(nout, 1.0f); /* operand buffers */
    oset s = {.op = op};
    snprintf(op, sizeof op, "attention_fwd%s B%d T%d H%d hs%d", tag, B, T, H, hs);
    float *out = o_add_act(&s, "out", nout), *lse = o_add(&s, "lse", nlse, NULL);
    cpu.attention_fwd(cpu.ctx, out, lse, qkv.h, B, T, H, hs);
    GPU_TWICE(s, gpu.attention_fwd(gpu.ctx, o_dev(&s, 0), o_dev(&s, 1), qkv.d, B, T, H, hs));
    tin o = in_copy_act(out, nout), l = in_copy(lse, nlse); /* the backward takes the CPU's forward */
    o_done(&s, tol);
    if (tol < TOL_ACT) /* dqkv is an operand buffer: one bf16 rounding */
        tol = TOL_ACT;

    snprintf(op, sizeof op, "attention_bwd%s B%d T%d H%d hs%d", tag, B, T, H, hs);
    float *dqkv = o_add_act(&s, "dqkv", nqkv); /* overwritten: starts from random values */
    /* dbias += the column sums of dqkv: large initial values, so that an overwrite would show */
    float *db_init = hrand(3 * Cl, 64.0f);
    float *db = o_add(&s, "dbias", 3 * Cl, db_init);
    cpu.attention_bwd(cpu.ctx, dqkv, dout.h, qkv.h, o.h, l.h, B, T, H, hs, db);
    GPU_TWICE(s, gpu.attention_bwd(gpu.ctx, o_dev(&s, 0), dout.d, qkv.d, o.d, l.d, B, T, H, hs, o_dev(&s, 1)));
    float *gd = s.o[0].res[0], *cd = s.o[0].cpu;
    /* q, k and v parts separately: a bug in one of the two backward kernels shows by name */
    const int64_t nbuf = nout > 3 * Cl ? nout : 3 * Cl; /* a part of dqkv, or dbias */
    float *gp = xmalloc(sizeof(float) * (size_t)nbuf), *cp = xmalloc(sizeof(float) * (size_t)nbuf);
    static const char *part_name[3] = {"dq", "dk", "dv"};
    /* with T = 1 the softmax of one score has no gradient: dq and dk are 0 up to the rounding of
     * out (bf16) against v in D - dP, on both sides; they are compared against the scale of dv */
    double dv_scale = 0;
    for (int64_t r = 0; r < (int64_t)B * T; r++)
        for (int64_t j = 0; j < Cl; j++)
            dv_scale = fmax(dv_scale, fabs(cd[r * 3 * Cl + 2 * Cl + j]));
    for (int part = 0; part < 3; part++) {
        for (int64_t r = 0; r < (int64_t)B * T; r++) {
            memcpy(gp + r * Cl, gd + r * 3 * Cl + part * Cl, sizeof(float) * (size_t)Cl);
            memcpy(cp + r * Cl, cd + r * 3 * Cl + part * Cl, sizeof(float) * (size_t)Cl);
        }
        cmp_floor(op, part_name[part], gp, cp, nout, tol, T == 1 && part < 2 ? dv_scale : 0.0);
    }
    same(op, "dqkv", s.o[0].res[0], s.o[0].res[1], nqkv);
    /* dbias: the sums alone (initial values taken off) to dqkv's tolerance, then the whole */
    for (int64_t j = 0; j < 3 * Cl; j++) {
        gp[j] = s.o[1].res[0][j] - db_init[j];
        cp[j] = s.o[1].cpu[j] - db_init[j];
    }
    cmp(op, "dbias", gp, cp, 3 * Cl, tol);
    cmp(op, "dbias+=", s.o[1].res[0], s.o[1].cpu, 3 * Cl, tol);
    same(op, "dbias", s.o[1].res[0], s.o[1].res[1], 3 * Cl);
    free(gp);
    free(cp);
    free(db_init);
    for (int i = 0; i < 2; i++) {
        free(s.o[i].init);
        free(s.o[i].cpu);
        free(s.o[i].res[0]);
        free(s.o[i].res[1]);
        dfree(s.o[i].dev);
    }
    in_free(&o);
    in_free(&l);
    in_free(&qkv);
    in_free(&dout);
    gpu = saved;
}

/* ---------------------------------------------------------------- the Llama block */

/* adds an operand-buffer output that the call updates in place: it starts from init (rounded to
 * what the buffer holds) on both sides */
static float *o_add_act_from(oset *s, const char *name, int64_t n, const float *init)
{
    float *c = o_add_act(s, name, n);
    obuf *b = &s->o[s->no - 1];
    memcpy(b->init, init, sizeof(float) * (size_t)n);
    round_act(b->init, n);
    memcpy(c, b->init, sizeof(float) * (size_t)n);
    return c;
}

static void test_rmsnorm(int64_t N, int C)
{
    char op[80];
    tin inp = in_rand(N * C, 2.0f), w = in_rand(C, 1.0f), dout = in_rand(N * C, 1.0f);
    tin dout_act = in_rand_act(N * C, 1.0f);
    for (int64_t i = 0; i < N * C; i++) /* rows of different scales: rstd matters */
        inp.h[i] *= (float)(1 + i / C % 5);
    gpu.from_host(gpu.ctx, inp.d, inp.h, sizeof(float) * (size_t)(N * C));
    oset s = {.op = op};
    snprintf(op, sizeof op, "rmsnorm_fwd N%lld C%d", (long long)N, C);
    float *out = o_add_act(&s, "out", N * C), *rstd = o_add(&s, "rstd", N, NULL);
    cpu.rmsnorm_fwd(cpu.ctx, out, rstd, inp.h, w.h, N, C, 1e-5f);
    GPU_TWICE(s, gpu.rmsnorm_fwd(gpu.ctx, o_dev(&s, 0), o_dev(&s, 1), inp.d, w.d, N, C, 1e-5f));
    tin r = in_copy(rstd, N); /* the backward takes the CPU's statistics */
    o_done(&s, TOL_EW);
    float *i0 = hrand(N * C, 1.0f), *i1 = hrand(C, 1.0f); /* += outputs: random start */
    for (int da = 0; da < 2; da++) { /* dout fp32 (a TP sum), or the product's operand buffer */
        const tin *g = da ? &dout_act : &dout;
        snprintf(op, sizeof op, "rmsnorm_bwd N%lld C%d%s", (long long)N, C, da ? " dout act" : "");
        float *dinp = o_add(&s, "dinp", N * C, i0), *dw = o_add(&s, "dw", C, i1);
        float *dact = o_add_act(&s, "dinp_act", N * C);
        cpu.rmsnorm_bwd(cpu.ctx, dinp, dact, dw, g->h, da, inp.h, w.h, r.h, N, C);
        GPU_TWICE(s, gpu.rmsnorm_bwd(gpu.ctx, o_dev(&s, 0), o_dev(&s, 2), o_dev(&s, 1), g->d, da, inp.d, w.d, r.d, N,
                                     C));
        o_done(&s, N > 1000 || C > 1000 ? TOL_RED : TOL_EW); /* long sums: dw over rows, the row dot over C */
    }
    in_free(&dout_act);
    free(i0);
    free(i1);
    in_free(&r);
    in_free(&inp);
    in_free(&w);
    in_free(&dout);
}

/* nheads heads of hd at the start of rows of ld (the elements past them must stay as they are) */
static void test_rope(int B, int T, int nheads, int hd, int64_t ld)
{
    char op[96];
    const int half = hd / 2;
    const int64_t n = (int64_t)B * T * ld, ncs = (int64_t)T * half;
    float *cs = xmalloc(sizeof(float) * (size_t)(2 * ncs));
    for (int t = 0; t < T; t++) /* the engine's table: t * theta^(-2i/hd) */
        for (int i = 0; i < half; i++) {
            double a = t * pow(10000.0, -2.0 * i / hd);
            cs[(int64_t)t * half + i] = (float)cos(a);
            cs[ncs + (int64_t)t * half + i] = (float)sin(a);
        }
    tin tab = in_copy(cs, 2 * ncs);
    float *x0 = hrand(n, 2.0f);
    for (int dir = 0; dir < 2; dir++) {
        oset s = {.op = op};
        snprintf(op, sizeof op, "rope_%s B%d T%d heads%d hd%d ld%lld", dir ? "bwd" : "fwd", B, T, nheads, hd,
                 (long long)ld);
        float *x = o_add_act_from(&s, "x", n, x0);
        if (dir)
            cpu.rope_bwd(cpu.ctx, x, tab.h, B, T, nheads, hd, ld);
        else
            cpu.rope_fwd(cpu.ctx, x, tab.h, B, T, nheads, hd, ld);
        if (dir)
            GPU_TWICE(s, gpu.rope_bwd(gpu.ctx, o_dev(&s, 0), tab.d, B, T, nheads, hd, ld));
        else
            GPU_TWICE(s, gpu.rope_fwd(gpu.ctx, o_dev(&s, 0), tab.d, B, T, nheads, hd, ld));
        o_done(&s, TOL_ACT);
    }
    free(x0);
    free(cs);
    in_free(&tab);
}

/* element i of an operand buffer on the GPU */
static void *act_at(void *d, int64_t i) { return (char *)d + i * gpu.act_bytes; }

/* stacked: gate and up the columns of one (N, 2 F) buffer (the stacked gate|up product), rows of
 * stride 2 F; else two (N, F) buffers */
static void test_swiglu(int64_t N, int F, int stacked)
{
    char op[80];
    const int64_t n = N * F, ld = stacked ? 2 * (int64_t)F : F;
    tin gu = in_rand_act(stacked ? 2 * n : n, 4.0f), upb = in_rand_act(stacked ? 1 : n, 2.0f);
    tin dout = in_rand_act(n, 1.0f);
    const float *gh = gu.h, *uh = stacked ? gu.h + F : upb.h;
    const void *gd = gu.d, *ud = stacked ? act_at(gu.d, F) : upb.d;
    const char *how = stacked ? " stacked" : "";
    oset s = {.op = op};
    snprintf(op, sizeof op, "swiglu_fwd N%lld F%d%s", (long long)N, F, how);
    float *out = o_add_act(&s, "out", n);
    cpu.swiglu_fwd(cpu.ctx, out, gh, uh, N, F, ld);
    GPU_TWICE(s, gpu.swiglu_fwd(gpu.ctx, o_dev(&s, 0), gd, ud, N, F, ld));
    o_done(&s, TOL_ACT);
    if (!stacked) { /* into other buffers */
        snprintf(op, sizeof op, "swiglu_bwd N%lld F%d", (long long)N, F);
        float *dg = o_add_act(&s, "dgate", n), *du = o_add_act(&s, "dup", n);
        cpu.swiglu_bwd(cpu.ctx, dg, du, dout.h, gh, uh, N, F, ld);
        GPU_TWICE(s, gpu.swiglu_bwd(gpu.ctx, o_dev(&s, 0), o_dev(&s, 1), dout.d, gd, ud, N, F, ld));
        o_done(&s, TOL_ACT);
        snprintf(op, sizeof op, "swiglu_bwd in place N%lld F%d", (long long)N, F);
        float *g = o_add_act_from(&s, "dgate", n, gh), *u = o_add_act_from(&s, "dup", n, uh);
        cpu.swiglu_bwd(cpu.ctx, g, u, dout.h, g, u, N, F, ld);
        GPU_TWICE(s, gpu.swiglu_bwd(gpu.ctx, o_dev(&s, 0), o_dev(&s, 1), dout.d, o_dev(&s, 0), o_dev(&s, 1), N, F,
                                    ld));
        o_done(&s, TOL_ACT);
    } else { /* in place over the stacked buffer, as the engine calls it */
        snprintf(op, sizeof op, "swiglu_bwd in place N%lld F%d stacked", (long long)N, F);
        float *x = o_add_act_from(&s, "dgate|dup", 2 * n, gu.h);
        cpu.swiglu_bwd(cpu.ctx, x, x + F, dout.h, x, x + F, N, F, ld);
        GPU_TWICE(s, gpu.swiglu_bwd(gpu.ctx, o_dev(&s, 0), act_at(o_dev(&s, 0), F), dout.d, o_dev(&s, 0),
                                    act_at(o_dev(&s, 0), F), N, F, ld));
        o_done(&s, TOL_ACT);
    }
    in_free(&gu);
    in_free(&upb);
    in_free(&dout);
}

/* rope: the backward turns dq and dk back by a rotary table (rope_fwd's, theta 10000). stacked:
 * q|k|v the columns of one (B T, (H + 2 KV) hd) buffer (the stacked product's), and so
 * dq|dk|dv; else q, k, v each a buffer of its own */
static void test_gqa_rope(int B, int T, int H, int KV, int hd, int rope, int stacked)
{
    char op[128];
    const int64_t rows = (int64_t)B * T, nq = rows * H * hd, nk = rows * KV * hd, nlse = (int64_t)B * H * T;
    const int64_t W = (int64_t)(H + 2 * KV) * hd, ldq = stacked ? W : (int64_t)H * hd, ldkv = stacked ? W : (int64_t)KV * hd;
    /* the (B T, W) buffer, or q, k, v one after the other: offsets of k and v, in elements */
    const int64_t ko = stacked ? (int64_t)H * hd : nq, vo = stacked ? (int64_t)(H + KV) * hd : nq + nk;
    const int64_t nall = stacked ? rows * W : nq + 2 * nk;
    tin qkv = in_rand_act(nall, 1.5f);
    for (int64_t i = vo; !stacked && i < nall; i++) /* v of a smaller scale, as before */
        qkv.h[i] *= 1.0f / 1.5f;
    if (!stacked) /* the scaled v on the GPU too */
        act_put(qkv.d, qkv.h, nall);
    tin dout = in_rand_act(nq, 1.0f);
    const char *how = stacked ? " stacked" : "";
    oset s = {.op = op};
    snprintf(op, sizeof op, "gqa_fwd B%d T%d H%d KV%d hd%d%s", B, T, H, KV, hd, how);
    float *out = o_add_act(&s, "out", nq), *lse = o_add(&s, "lse", nlse, NULL);
    cpu.gqa_fwd(cpu.ctx, out, lse, qkv.h, qkv.h + ko, qkv.h + vo, B, T, H, KV, hd, ldq, ldkv);
    GPU_TWICE(s, gpu.gqa_fwd(gpu.ctx, o_dev(&s, 0), o_dev(&s, 1), qkv.d, act_at(qkv.d, ko), act_at(qkv.d, vo), B, T, H,
                             KV, hd, ldq, ldkv));
    tin o = in_copy_act(out, nq), l = in_copy(lse, nlse); /* the backward takes the CPU's forward */
    o_done(&s, TOL_ATTN);
    snprintf(op, sizeof op, "gqa_bwd B%d T%d H%d KV%d hd%d%s%s", B, T, H, KV, hd, how, rope ? " +rope_bwd" : "");
    const int half = hd / 2;
    float *cs = xmalloc(sizeof(float) * (size_t)(2 * T * half));
    for (int t = 0; t < T; t++)
        for (int i = 0; i < half; i++) {
            const double ang = t * pow(10000.0, -2.0 * i / hd);
            cs[t * half + i] = (float)cos(ang);
            cs[(T + t) * half + i] = (float)sin(ang);
        }
    tin cst = in_copy(cs, 2 * T * half);
    free(cs);
    float *dqkv = o_add_act(&s, stacked ? "dq|dk|dv" : "dq, dk, dv", nall);
    cpu.gqa_bwd(cpu.ctx, dqkv, dqkv + ko, dqkv + vo, dout.h, qkv.h, qkv.h + ko, qkv.h + vo, o.h, l.h, B, T, H, KV, hd,
                ldq, ldkv, rope ? cst.h : NULL);
    GPU_TWICE(s, gpu.gqa_bwd(gpu.ctx, o_dev(&s, 0), act_at(o_dev(&s, 0), ko), act_at(o_dev(&s, 0), vo), dout.d, qkv.d,
                             act_at(qkv.d, ko), act_at(qkv.d, vo), o.d, l.d, B, T, H, KV, hd, ldq, ldkv,
                             rope ? cst.d : NULL));
    o_done(&s, TOL_ACT);
    in_free(&cst);
    in_free(&o);
    in_free(&l);
    in_free(&qkv);
    in_free(&dout);
}
static void test_gqa(int B, int T, int H, int KV, int hd) { test_gqa_rope(B, T, H, KV, hd, 0, 0); }

/* ---------------------------------------------------------------- element-wise */

static void test_elementwise(int64_t n, int off)
{
    char op[64];
    tin a = in_rand(n + off, 3.0f), b = in_rand(n + off, 1.0f);
    float *x0 = hrand(n + off, 1.0f);
    oset s = {.op = op};
    const char *sfx = off ? " +1" : "";

    snprintf(op, sizeof op, "add n%lld%s (out = a)", (long long)n, sfx);
    float *oa = o_add(&s, "out", n + off, a.h);
    cpu.add(cpu.ctx, oa + off, oa + off, b.h + off, n);
    GPU_TWICE(s, gpu.add(gpu.ctx, o_dev(&s, 0) + off, o_dev(&s, 0) + off, b.d + off, n));
    o_done(&s, TOL_EW);

    snprintf(op, sizeof op, "add n%lld%s", (long long)n, sfx);
    float *out = o_add(&s, "out", n + off, x0);
    cpu.add(cpu.ctx, out + off, a.h + off, b.h + off, n);
    GPU_TWICE(s, gpu.add(gpu.ctx, o_dev(&s, 0) + off, a.d + off, b.d + off, n));
    o_done(&s, TOL_EW);

    snprintf(op, sizeof op, "accumulate n%lld%s", (long long)n, sfx);
    out = o_add(&s, "dst", n + off, x0);
    cpu.accumulate(cpu.ctx, out + off, a.h + off, n);
    GPU_TWICE(s, gpu.accumulate(gpu.ctx, o_dev(&s, 0) + off, a.d + off, n));
    o_done(&s, TOL_EW);

    free(x0);
    in_free(&a);
    in_free(&b);
}

static void test_rows(int64_t N, int C)
{
    char op[64];
    tin a = in_rand(N * C, 1.0f), b = in_rand(N * C, 1.0f), bias = in_rand(C, 1.0f);
    oset s = {.op = op};
    snprintf(op, sizeof op, "residual_bias N%lld C%d", (long long)N, C);
    o_add(&s, "out", N * C, NULL);
    float *out = s.o[0].cpu;
    cpu.residual_bias(cpu.ctx, out, a.h, b.h, bias.h, N, C);
    GPU_TWICE(s, gpu.residual_bias(gpu.ctx, o_dev(&s, 0), a.d, b.d, bias.d, N, C));
    o_done(&s, TOL_EW);

    snprintf(op, sizeof op, "bias_grad N%lld C%d", (long long)N, C);
    float *db = o_add(&s, "db", C, bias.h);
    cpu.bias_grad(cpu.ctx, db, a.h, N, C);
    GPU_TWICE(s, gpu.bias_grad(gpu.ctx, o_dev(&s, 0), a.d, N, C));
    o_done(&s, N > 1000 ? TOL_RED : TOL_EW);
    in_free(&a);
    in_free(&b);
    in_free(&bias);
}

/* ---------------------------------------------------------------- cross-entropy */

static void test_xent(int64_t N, int64_t Vl, int64_t v0, int64_t V)
{
    char op[96];
    tin logits = in_rand_act(N * Vl, 4.0f);
    int32_t *tg = hints(N, 0, (int32_t)V);
    int32_t *tg_d = dput(tg, sizeof(int32_t) * (size_t)N);
    oset s = {.op = op};
    const char *fmt = "%s N%lld Vl%lld v0 %lld V%lld";
#define XOP(name) snprintf(op, sizeof op, fmt, name, (long long)N, (long long)Vl, (long long)v0, (long long)V)

    XOP("xent_stats");
    float *rowmax = o_add(&s, "rowmax", N, NULL), *sumexp = o_add(&s, "sumexp", N, NULL);
    float *tl = o_add(&s, "tlogit", N, NULL);
    cpu.xent_stats(cpu.ctx, rowmax, sumexp, tl, logits.h, tg, N, Vl, v0, V);
    GPU_TWICE(s, gpu.xent_stats(gpu.ctx, o_dev(&s, 0), o_dev(&s, 1), o_dev(&s, 2), logits.d, tg_d, N, Vl, v0, V));
    /* the later pieces take gmax = rowmax + 0.5 as if another TP rank had a larger one (any
     * real number >= the row max works; here every row has real ids) */
    float *gm = hdup(rowmax, N);
    for (int64_t i = 0; i < N; i++)
        gm[i] = isfinite(gm[i]) ? gm[i] + 0.5f : 0.0f;
    tin gmax = in_copy(gm, N), rmax = in_copy(rowmax, N), lsum = in_copy(sumexp, N);
    free(gm);
    tin tlog = in_copy(tl, N);
    /* rowmax and tlogit are exact; sumexp is summed in another order (online, per thread) */
    const double stat_tols[3] = {0.0, TOL_RED, 0.0};
    o_done_each(&s, 0, stat_tols);

    XOP("xent_rescale");
    float *se = o_add(&s, "sumexp", N, lsum.h);
    cpu.xent_rescale(cpu.ctx, se, rmax.h, gmax.h, N);
    GPU_TWICE(s, gpu.xent_rescale(gpu.ctx, o_dev(&s, 0), rmax.d, gmax.d, N));
    float *gs = hdup(se, N);
    for (int64_t i = 0; i < N; i++)
        gs[i] = gs[i] > 0 ? gs[i] * 1.25f : 1.0f; /* "the sum over TP ranks" */
    tin gsum = in_copy(gs, N);
    free(gs);
    o_done(&s, TOL_EW);

    const float scale = 1.0f / (float)(N * 3);
    XOP("xent_bwd");
    float *dl = o_add_act(&s, "dlogits", N * Vl);
    cpu.xent_bwd(cpu.ctx, dl, logits.h, tg, gmax.h, gsum.h, scale, N, Vl, v0, V);
    GPU_TWICE(s, gpu.xent_bwd(gpu.ctx, o_dev(&s, 0), logits.d, tg_d, gmax.d, gsum.d, scale, N, Vl, v0, V));
    o_done(&s, TOL_EW);

    XOP("xent_bwd in place");
    dl = o_add_act(&s, "dlogits", N * Vl);
    memcpy(s.o[0].init, logits.h, sizeof(float) * (size_t)(N * Vl)); /* the GPU starts from the logits */
    cpu.xent_bwd(cpu.ctx, dl, logits.h, tg, gmax.h, gsum.h, scale, N, Vl, v0, V);
    GPU_TWICE(s, gpu.xent_bwd(gpu.ctx, o_dev(&s, 0), o_dev(&s, 0), tg_d, gmax.d, gsum.d, scale, N, Vl, v0, V));
    o_done(&s, TOL_EW);

    /* the fused pass: against the CPU, and bit for bit against the two kernels above run the same
     * way (statistics, then dlogits in place from the row's own max and sum) */
    XOP("xent_stats_bwd");
    rowmax = o_add(&s, "rowmax", N, NULL), sumexp = o_add(&s, "sumexp", N, NULL), tl = o_add(&s, "tlogit", N, NULL);
    dl = o_add_act(&s, "dlogits", N * Vl);
    memcpy(s.o[3].init, logits.h, sizeof(float) * (size_t)(N * Vl)); /* in place over the logits */
    memcpy(dl, logits.h, sizeof(float) * (size_t)(N * Vl));
    cpu.xent_stats_bwd(cpu.ctx, rowmax, sumexp, tl, dl, tg, scale, N, Vl, v0, V);
    GPU_TWICE(s, gpu.xent_stats_bwd(gpu.ctx, o_dev(&s, 0), o_dev(&s, 1), o_dev(&s, 2), o_dev(&s, 3), tg_d, scale, N,
                                    Vl, v0, V));
    {
        float *two_d[3], *two[4];
        void *dl2_d = dalloc((size_t)(N * Vl) * (size_t)gpu.act_bytes);
        act_put(dl2_d, logits.h, N * Vl);
        for (int k = 0; k < 3; k++)
            two_d[k] = dalloc(sizeof(float) * (size_t)N);
        gpu.xent_stats(gpu.ctx, two_d[0], two_d[1], two_d[2], dl2_d, tg_d, N, Vl, v0, V);
        gpu.xent_bwd(gpu.ctx, dl2_d, dl2_d, tg_d, two_d[0], two_d[1], scale, N, Vl, v0, V);
        sync_ok(op);
        for (int k = 0; k < 3; k++)
            two[k] = dgetf(two_d[k], N);
        two[3] = act_get(dl2_d, N * Vl);
        for (int k = 0; k < 4; k++) {
            identical(op, s.o[k].name, s.o[k].res[0], two[k], s.o[k].n, "from xent_stats + xent_bwd");
            free(two[k]);
        }
        for (int k = 0; k < 3; k++)
            dfree(two_d[k]);
        dfree(dl2_d);
    }
    /* dlogits from the CPU's sumexp, summed in another order */
    const double fused_tols[4] = {0.0, TOL_RED, 0.0, TOL_RED};
    o_done_each(&s, 0, fused_tols);

    /* the step's accumulator: first = 1 overwrites whatever it held (NaN here), first = 0 adds */
    XOP("xent_loss_add");
    double lc = NAN, lc2, lg1, lg2, lg3, nan = NAN;
    cpu.xent_loss_add(cpu.ctx, &lc, 1, gmax.h, gsum.h, tlog.h, N);
    lc2 = lc;
    cpu.xent_loss_add(cpu.ctx, &lc2, 0, gmax.h, gsum.h, tlog.h, N);
    double *acc = dalloc(sizeof(double));
    gpu.from_host(gpu.ctx, acc, &nan, sizeof nan);
    gpu.xent_loss_add(gpu.ctx, acc, 1, gmax.d, gsum.d, tlog.d, N);
    gpu.to_host(gpu.ctx, &lg1, acc, sizeof lg1);
    gpu.xent_loss_add(gpu.ctx, acc, 0, gmax.d, gsum.d, tlog.d, N);
    gpu.to_host(gpu.ctx, &lg2, acc, sizeof lg2);
    gpu.xent_loss_add(gpu.ctx, acc, 1, gmax.d, gsum.d, tlog.d, N);
    gpu.to_host(gpu.ctx, &lg3, acc, sizeof lg3);
    sync_ok(op);
    dfree(acc);
    double rel = fabs(lg1 - lc) / fmax(fabs(lc), 1e-30), rel2 = fabs(lg2 - lc2) / fmax(fabs(lc2), 1e-30);
    int ok = rel <= 1e-6 && rel2 <= 1e-6 && lg2 == lg1 + lg1 && memcmp(&lg1, &lg3, sizeof lg1) == 0;
    checks++;
    failures += !ok;
    printf("%-5s %-34s gpu %.12g cpu %.12g rel %.3e, twice %.12g (cpu %.12g) (tol 1e-06)%s\n", ok ? "ok" : "FAIL", op,
           lg1, lc, rel, lg2, lc2, memcmp(&lg1, &lg3, sizeof lg1) ? " NOT DETERMINISTIC" : "");
#undef XOP
    in_free(&logits);
    in_free(&gmax);
    in_free(&gsum);
    in_free(&tlog);
    in_free(&rmax);
    in_free(&lsum);
    free(tg);
    dfree(tg_d);
}

/* ---------------------------------------------------------------- optimizer, norms */

/* AdamW over several tensors in one call (sizes around the multi-tensor chunk and launch limits,
 * offsets that break 16-byte alignment, with and without weight decay), 3 steps with a clipping
 * factor on the second; every grad must come back zeroed but those of keep_grad jobs (every
 * fourth), which keep step 3's values */
static void test_adamw_many(int count, int64_t n0, int off)
{
    char op[80];
    snprintf(op, sizeof op, "adamw_many %d tensors from n%lld%s", count, (long long)n0, off ? " +1" : "");
    int64_t *ns = xmalloc(sizeof *ns * (size_t)count), total = 0;
    for (int i = 0; i < count; i++) {
        ns[i] = i == 1 ? 0 : n0 + (int64_t)i * 4099 % 40000; /* one empty tensor */
        total += ns[i] + off;
    }
    float *p0 = hrand(total, 1.0f);
    tin g[3] = {in_rand(total, 1e-2f), in_rand(total, 1e-3f), in_rand(total, 1e-1f)};
    oset s = {.op = op};
    float *p = o_add(&s, "param", total, p0), *m = o_add(&s, "m", total, NULL), *v = o_add(&s, "v", total, NULL);
    float *gz = o_add(&s, "grad (zeroed)", total, NULL);
    mps_adamw_job *jc = xmalloc(sizeof *jc * (size_t)count), *jg = xmalloc(sizeof *jg * (size_t)count);
    for (int t = 1; t <= 3; t++) {
        mps_adamw_step st = {6e-4f, 0.9f, 0.95f, 1e-8f, t, t == 2 ? 0.3f : 1.0f};
        float *gh = hdup(g[t - 1].h, total);
        for (int i = 0, at = 0; i < count; at += (int)(ns[i] + off), i++)
            jc[i] = (mps_adamw_job){p + at + off, gh + at + off, m + at + off, v + at + off, ns[i], i % 3 ? 0.1f : 0.0f,
                                    i % 2, i % 4 == 3};
        cpu.adamw_many(cpu.ctx, jc, count, &st);
        for (int64_t i = 0, at = 0; i < count; at += ns[i] + off, i++)
            memcpy(gz + at + off, gh + at + off, sizeof(float) * (size_t)ns[i]); /* zeros, where the jobs were */
        free(gh);
    }
    for (int run_ = 0; run_ < 2; run_++) {
        o_reset(&s);
        for (int t = 1; t <= 3; t++) {
            mps_adamw_step st = {6e-4f, 0.9f, 0.95f, 1e-8f, t, t == 2 ? 0.3f : 1.0f};
            /* the grads: step t's values, in the buffer that must come back zeroed */
            gpu.from_host(gpu.ctx, o_dev(&s, 3), g[t - 1].h, sizeof(float) * (size_t)total);
            for (int i = 0, at = 0; i < count; at += (int)(ns[i] + off), i++)
                jg[i] = (mps_adamw_job){o_dev(&s, 0) + at + off, o_dev(&s, 3) + at + off, o_dev(&s, 1) + at + off,
                                        o_dev(&s, 2) + at + off, ns[i], i % 3 ? 0.1f : 0.0f, i % 2, i % 4 == 3};
            gpu.adamw_many(gpu.ctx, jg, count, &st);
        }
        o_fetch(&s, run_);
    }
    /* outside the jobs (the offsets) the grad buffer keeps step 3's values on both sides */
    for (int64_t i = 0, at = 0; i < count; at += ns[i] + off, i++)
        for (int k = 0; k < off; k++)
            gz[at + k] = g[2].h[at + k];
    o_done(&s, TOL_EW);
    free(jc);
    free(jg);
    free(ns);
    free(p0);
    for (int i = 0; i < 3; i++)
        in_free(&g[i]);
}

/* The products read the bf16 copy that adamw_many keeps of a parameter: after an update they must
 * see the new weights, and after anything else writes the weights (from_host, copy) the new ones
 * again, not the stale copy. */
static void test_weight_copies(void)
{
    const int64_t N = 64;
    const int C = 96, OC = 80;
    const int64_t nw = (int64_t)OC * C;
    char op[80];
    tin inp = in_rand_act(N * C, 1.0f), w = in_rand(nw, 1.0f), g = in_rand(nw, 1.0f), w2 = in_rand(nw, 1.0f);
    tin w3 = in_rand(nw, 1.0f);
    float *m = dalloc(sizeof(float) * (size_t)nw), *v = dalloc(sizeof(float) * (size_t)nw);
    float *hm = xmalloc(sizeof(float) * (size_t)nw), *hv = xmalloc(sizeof(float) * (size_t)nw);
    memset(hm, 0, sizeof(float) * (size_t)nw);
    memset(hv, 0, sizeof(float) * (size_t)nw);
    float *gh = hdup(g.h, nw), *out = xmalloc(sizeof(float) * (size_t)(N * OC));
    const mps_adamw_step st = {0.05f, 0.9f, 0.95f, 1e-8f, 1, 1.0f}; /* a large step: old and new weights differ */
    mps_adamw_job jc = {w.h, gh, hm, hv, nw, 0.1f, 1, 0}, jg = {w.d, g.d, m, v, nw, 0.1f, 1, 0};
    cpu.adamw_many(cpu.ctx, &jc, 1, &st);
    gpu.adamw_many(gpu.ctx, &jg, 1, &st);
    for (int stage = 0; stage < 3; stage++) {
        if (stage == 1) { /* the weights written from the host */
            memcpy(w.h, w2.h, sizeof(float) * (size_t)nw);
            gpu.from_host(gpu.ctx, w.d, w2.h, sizeof(float) * (size_t)nw);
        } else if (stage == 2) { /* ... and by a device copy */
            memcpy(w.h, w3.h, sizeof(float) * (size_t)nw);
            gpu.copy(gpu.ctx, w.d, w3.d, sizeof(float) * (size_t)nw);
        }
        static const char *names[3] = {"after adamw", "after from_host", "after copy"};
        snprintf(op, sizeof op, "weight copies: matmul_fwd %s", names[stage]);
        cpu.matmul_fwd(cpu.ctx, out, inp.h, w.h, NULL, NULL, N, C, OC);
        float *dout = dalloc(sizeof(float) * (size_t)(N * OC));
        gpu.matmul_fwd(gpu.ctx, dout, inp.d, w.d, NULL, NULL, N, C, OC);
        sync_ok(op);
        float *res = dgetf(dout, N * OC);
        cmp(op, "out", res, out, N * OC, TOL_GEMM);
        free(res);
        dfree(dout);
    }
    free(gh);
    free(out);
    free(hm);
    free(hv);
    dfree(m);
    dfree(v);
    in_free(&inp);
    in_free(&w);
    in_free(&g);
    in_free(&w2);
    in_free(&w3);
}

/* the sum of squares of one buffer */
static double sumsq1(mps_backend *be, const float *x, int64_t n) { return be->sumsq_many(be->ctx, &x, &n, 1); }

static void test_sumsq(int64_t n, int off)
{
    char op[64];
    snprintf(op, sizeof op, "sumsq_many n%lld%s", (long long)n, off ? " +1" : "");
    tin x = in_rand(n + off, 2.0f);
    double c = sumsq1(&cpu, x.h + off, n);
    double g1 = sumsq1(&gpu, x.d + off, n), g2 = sumsq1(&gpu, x.d + off, n);
    sync_ok(op);
    double rel = fabs(g1 - c) / fmax(fabs(c), 1e-300);
    int ok = rel <= TOL_DOUBLE && memcmp(&g1, &g2, sizeof g1) == 0;
    checks++;
    failures += !ok;
    printf("%-5s %-34s gpu %.15g cpu %.15g rel %.3e (tol %.0e)%s\n", ok ? "ok" : "FAIL", op, g1, c, rel, TOL_DOUBLE,
           memcmp(&g1, &g2, sizeof g1) ? " NOT DETERMINISTIC" : "");
    in_free(&x);
}

/* several buffers in one call: the same as the sum of the single calls */
static void test_sumsq_many(void)
{
    const int64_t ns[4] = {100003, 7, 0, 5000};
    tin x[4];
    const float *hx[4], *dx[4];
    double c = 0, g1 = 0;
    for (int i = 0; i < 4; i++) {
        x[i] = in_rand(ns[i] > 0 ? ns[i] : 1, 1.0f + (float)i);
        hx[i] = x[i].h;
        dx[i] = x[i].d;
        c += sumsq1(&cpu, hx[i], ns[i]);
        g1 += sumsq1(&gpu, dx[i], ns[i]);
    }
    double cm = cpu.sumsq_many(cpu.ctx, hx, ns, 4), gm = gpu.sumsq_many(gpu.ctx, dx, ns, 4);
    double gm2 = gpu.sumsq_many(gpu.ctx, dx, ns, 4);
    sync_ok("sumsq_many");
    /* the GPU chunks the buffers together: its sum need not have the bits of the single calls' */
    int ok = cm == c && memcmp(&gm, &gm2, sizeof gm) == 0 && fabs(gm - c) <= TOL_DOUBLE * c &&
             fabs(g1 - c) <= TOL_DOUBLE * c;
    checks++;
    failures += !ok;
    printf("%-5s %-34s gpu %.15g (single calls %.15g) cpu %.15g (single %.15g)\n", ok ? "ok" : "FAIL",
           "sumsq_many 4 buffers", gm, g1, cm, c);
    for (int i = 0; i < 4; i++)
        in_free(&x[i]);
}

/* an error inside a table call comes back through sync, once */
static void test_error_report(void)
{
    float *d = dalloc(1024);
    gpu.attention_fwd(gpu.ctx, d, d, d, 1, 1, 1, 200); /* head size 200: unsupported */
    mps_err e;
    memset(&e, 0, sizeof e);
    int rc1 = gpu.sync(gpu.ctx, &e);
    mps_err e2;
    memset(&e2, 0, sizeof e2);
    int rc2 = gpu.sync(gpu.ctx, &e2);
    int ok = rc1 == -1 && strncmp(e.msg, "CUDA: ", 6) == 0 && rc2 == 0;
    checks++;
    failures += !ok;
    printf("%-5s %-34s sync -> %d \"%s\", then %d\n", ok ? "ok" : "FAIL", "error report through sync", rc1, e.msg, rc2);
    dfree(d);
}

/* ---------------------------------------------------------------- timings */

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* sync of a backend other than gpu */
static void sync_be(mps_backend *be, const char *what)
{
    mps_err e;
    memset(&e, 0, sizeof e);
    if (be->sync(be->ctx, &e) != 0) {
        printf("FAIL  %s: sync: %s\n", what, e.msg);
        failures++;
    }
}

/* a CUDA backend whose attention kernels MPS_CUDA_ATTENTION=mode selects ("bf16", "fp32", "mma");
 * 0 when made */
static int cuda_backend_attention(const char *mode, mps_backend *be, mps_err *err)
{
    memset(err, 0, sizeof *err);
    setenv("MPS_CUDA_ATTENTION", mode, 1);
    int rc = mps_backend_cuda(be, err);
    unsetenv("MPS_CUDA_ATTENTION");
    return rc;
}

/* ms_out = the mean time of `reps` calls after one untimed call */
#define BENCH_MS(be, label, reps, call, ms_out)                                                            \
    do {                                                                                                   \
        call;                                                                                              \
        sync_be(be, label);                                                                                \
        double t0_ = now();                                                                                \
        for (int r_ = 0; r_ < (reps); r_++)                                                                \
            call;                                                                                          \
        sync_be(be, label);                                                                                \
        (ms_out) = (now() - t0_) * 1e3 / (reps);                                                           \
    } while (0)

#define BENCH(be, label, flops, reps, call)                                                                \
    do {                                                                                                   \
        double ms_;                                                                                        \
        BENCH_MS(be, label, reps, call, ms_);                                                              \
        if ((flops) > 0)                                                                                   \
            printf("bench %-44s %8.3f ms  %6.1f TFLOP/s\n", label, ms_, (flops) / (ms_ * 1e-3) / 1e12);      \
        else                                                                                               \
            printf("bench %-44s %8.3f ms\n", label, ms_);                                                  \
    } while (0)

/* the same for a memory-bound kernel: its rate against the bytes it must move (the card's HBM
 * peak: 3.35 TB/s on H100 SXM, 4.8 on H200) */
#define BENCH_BYTES(be, label, bytes, reps, call)                                                         \
    do {                                                                                                   \
        double ms_;                                                                                        \
        BENCH_MS(be, label, reps, call, ms_);                                                              \
        printf("bench %-44s %8.3f ms  %6.2f TB/s\n", label, ms_, (bytes) / (ms_ * 1e-3) / 1e12);           \
    } while (0)

/* one GPT-2 124M layer's pieces at B=8, T=1024 (the engine's micro-batch of the benchmark is B=32:
 * multiply by 4), and the head at V=50304 */
static void bench(mps_backend *bf16)
{
    const int B = 8, T = 1024, C = 768, H = 12, hs = 64, F = 4 * C;
    const int64_t N = (int64_t)B * T, Vl = 50304;
    float *x = dalloc(sizeof(float) * (size_t)(N * F)), *y = dalloc(sizeof(float) * (size_t)(N * F));
    float *qkv = dalloc(sizeof(float) * (size_t)(N * 3 * C)), *dqkv = dalloc(sizeof(float) * (size_t)(N * 3 * C));
    float *w = dalloc(sizeof(float) * (size_t)F * C), *dw = dalloc(sizeof(float) * (size_t)F * C);
    float *bias = dalloc(sizeof(float) * (size_t)F), *lse = dalloc(sizeof(float) * (size_t)(B * H * T));
    float *mean = dalloc(sizeof(float) * (size_t)N), *rstd = dalloc(sizeof(float) * (size_t)N);
    float *logits = dalloc(sizeof(float) * (size_t)(N * Vl)), *wte = dalloc(sizeof(float) * (size_t)(Vl * C));
    int32_t *tok = dalloc(sizeof(int32_t) * (size_t)N);
    /* small random values so that exp and the softmax do real work */
    float *hq = hrand(N * 3 * C, 1.0f);
    gpu.from_host(gpu.ctx, qkv, hq, sizeof(float) * (size_t)(N * 3 * C));
    const double mm = 2.0 * (double)N * C * 3 * C, att = 4.0 * B * H * (double)T * T / 2 * hs;
    printf("timings (informational), B=%d T=%d C=%d H=%d: one layer's pieces\n", B, T, C, H);
    BENCH(&gpu, "matmul_fwd qkv (N, 768) -> (N, 2304) +bias", mm, 10,
          gpu.matmul_fwd(gpu.ctx, qkv, x, w, bias, NULL, N, C, 3 * C));
    BENCH(&gpu, "matmul_fwd_act qkv (N, 768) -> (N, 2304) +bias, bf16", mm, 10,
          gpu.matmul_fwd_act(gpu.ctx, dqkv, x, w, bias, N, C, 3 * C));
    BENCH(&gpu, "matmul_bwd qkv dinp+dw+dbias (dout operand)", 2 * mm, 10,
          gpu.matmul_bwd(gpu.ctx, y, 0, dw, 0, bias, qkv, 1, x, w, N, C, 3 * C));
    BENCH(&gpu, "matmul_bwd qkv dinp+dw+dbias (dout fp32)", 2 * mm, 10,
          gpu.matmul_bwd(gpu.ctx, y, 0, dw, 0, bias, qkv, 0, x, w, N, C, 3 * C));
    BENCH(&gpu, "matmul_fwd fc (N, 768) -> (N, 3072) +bias", 2.0 * N * C * F, 10,
          gpu.matmul_fwd(gpu.ctx, y, x, w, bias, NULL, N, C, F));
    BENCH(&gpu, "matmul_gelu_fwd fc (N, 768) -> (N, 3072)", 2.0 * N * C * F, 10,
          gpu.matmul_gelu_fwd(gpu.ctx, y, dqkv, x, w, bias, N, C, F));
    BENCH(&gpu, "matmul_dgelu_bwd fcproj (N, 768) -> (N, 3072)", 2.0 * N * C * F, 10,
          gpu.matmul_dgelu_bwd(gpu.ctx, y, bias, qkv, 0, w, dqkv, N, F, C));
    BENCH(&gpu, "matmul_bwd qkv dw+dbias (dout operand)", mm, 10,
          gpu.matmul_bwd(gpu.ctx, NULL, 0, dw, 0, bias, qkv, 1, x, w, N, C, 3 * C));
    BENCH(&gpu, "matmul_bwd fc dw+dbias (dout operand)", 2.0 * N * C * F, 10,
          gpu.matmul_bwd(gpu.ctx, NULL, 0, dw, 0, bias, qkv, 1, x, w, N, C, F));
    act_put(qkv, hq, N * 3 * C); /* qkv as the operand buffer attention reads (the products wrote over it) */
    act_put(y, hq, N * C);         /* dout, an operand buffer too */
    free(hq);
    /* the default backend: hs = 64 runs attention_wgmma.cu on H100 / H200 (else attention_fast.cu);
     * the forward first, so that the backward sees a real lse */
    BENCH(&gpu, "attention_fwd (default: wgmma on sm_90)", att, 20, gpu.attention_fwd(gpu.ctx, x, lse, qkv, B, T, H, hs));
    BENCH(&gpu, "attention_bwd (default: wgmma on sm_90)", 2.5 * att, 20,
          gpu.attention_bwd(gpu.ctx, dqkv, y, qkv, x, lse, B, T, H, hs, bias));
    /* the Llama block's grouped-query attention at llama-125m's shape (H 12 over KV 4, head size
     * 64; B = 8 of its 32) and at llama-1b-hs128's (H 16 over KV 4, head size 128, T 2048, B = 2
     * of its 8) */
    for (int k = 0; k < 2; k++) {
        const int gB = k ? 2 : B, gT = k ? 2048 : T, gH = k ? 16 : H, gKV = 4, ghd = k ? 128 : 64;
        /* q|k|v the columns of one buffer, as the engine's stacked product leaves them */
        const int64_t ld = (int64_t)(gH + 2 * gKV) * ghd;
        char *q = (char *)qkv, *kk = q + (int64_t)gH * ghd * gpu.act_bytes, *v = kk + (int64_t)gKV * ghd * gpu.act_bytes;
        char *dq = (char *)dqkv, *dk = dq + (int64_t)gH * ghd * gpu.act_bytes, *dv = dk + (int64_t)gKV * ghd * gpu.act_bytes;
        const double gatt = 4.0 * gB * gH * (double)gT * gT / 2 * ghd;
        BENCH(&gpu, k ? "gqa_fwd B2 T2048 H16 KV4 hd128" : "gqa_fwd B8 T1024 H12 KV4 hd64", gatt, 20,
              gpu.gqa_fwd(gpu.ctx, x, lse, q, kk, v, gB, gT, gH, gKV, ghd, ld, ld));
        BENCH(&gpu, k ? "gqa_bwd B2 T2048 H16 KV4 hd128" : "gqa_bwd B8 T1024 H12 KV4 hd64", 2.5 * gatt, 20,
              gpu.gqa_bwd(gpu.ctx, dq, dk, dv, y, q, kk, v, x, lse, gB, gT, gH, gKV, ghd, ld, ld, NULL));
    }
    /* for comparison: the mma.sync kernels of attention_fast.cu and the fp32 kernels */
    for (int k = 0; k < 2; k++) {
        mps_backend other;
        mps_err err;
        if (cuda_backend_attention(k == 0 ? "mma" : "fp32", &other, &err) != 0)
            continue;
        const int reps = k == 0 ? 20 : 5;
        BENCH(&other, k == 0 ? "attention_fwd (mma.sync)" : "attention_fwd fp32", att, reps,
              other.attention_fwd(other.ctx, x, lse, qkv, B, T, H, hs));
        BENCH(&other, k == 0 ? "attention_bwd (mma.sync)" : "attention_bwd fp32", 2.5 * att, reps,
              other.attention_bwd(other.ctx, dqkv, y, qkv, x, lse, B, T, H, hs, bias));
        other.destroy(other.ctx);
    }
    if (bf16) {
        BENCH(bf16, "attention_fwd bf16 (tensor cores)", att, 5, bf16->attention_fwd(bf16->ctx, x, lse, qkv, B, T, H, hs));
        BENCH(bf16, "attention_bwd bf16 (tensor cores)", 2.5 * att, 5,
              bf16->attention_bwd(bf16->ctx, dqkv, y, qkv, x, lse, B, T, H, hs, bias));
    }
    BENCH(&gpu, "layernorm_fwd (N, 768)", 0, 10, gpu.layernorm_fwd(gpu.ctx, y, mean, rstd, x, w, bias, N, C));
    BENCH(&gpu, "layernorm_bwd (N, 768)", 0, 10, gpu.layernorm_bwd(gpu.ctx, y, NULL, NULL, dw, bias, x, 0, qkv, w, mean, rstd, N, C));
    {
        /* RMSNorm at tinyllama-1.1b's step (N = 8 x 2048 rows of C = 2048; 44 of each per step),
         * against the bytes each must move: forward x (fp32) in, out (bf16) out; backward x and dout
         * (bf16) in, dinp (fp32) in and out, its bf16 copy out */
        const int64_t rn = 16384;
        const int rc = 2048;
        float *rx = logits, *rdx = logits + rn * rc;
        char *rout = (char *)(logits + 2 * rn * rc), *rdout = (char *)(logits + 3 * rn * rc);
        char *rdact = (char *)(logits + 4 * rn * rc);
        float *hx = hrand(rn * rc, 1.0f);
        gpu.from_host(gpu.ctx, rx, hx, sizeof(float) * (size_t)(rn * rc));
        gpu.from_host(gpu.ctx, rdx, hx, sizeof(float) * (size_t)(rn * rc));
        act_put(rdout, hx, rn * rc);
        free(hx);
        const double fwd_bytes = (double)rn * rc * (4 + 2), bwd_bytes = (double)rn * rc * (4 + 2 + 4 + 4 + 2);
        BENCH_BYTES(&gpu, "rmsnorm_fwd (16384, 2048)", fwd_bytes, 20,
                    gpu.rmsnorm_fwd(gpu.ctx, rout, lse, rx, w, rn, rc, 1e-5f));
        BENCH_BYTES(&gpu, "rmsnorm_bwd (16384, 2048) dout act, +dact, +dw", bwd_bytes, 20,
                    gpu.rmsnorm_bwd(gpu.ctx, rdx, rdact, dw, rdout, 1, rx, w, lse, rn, rc));
    }
    BENCH(&gpu, "residual_bias (N, 768)", 0, 10, gpu.residual_bias(gpu.ctx, y, x, qkv, bias, N, C));
    BENCH(&gpu, "bias_grad (N, 3072)", 0, 10, gpu.bias_grad(gpu.ctx, bias, x, N, F));
    {
        /* the bias gradients of the 124M (B=32) and 350M (B=16) steps: column sums of bf16 dqkv / dfch */
        static const int shapes[][2] = {{32768, 2304}, {32768, 3072}, {16384, 3072}, {16384, 4096}};
        for (int i = 0; i < 4; i++) {
            char label[64];
            const int64_t rows = shapes[i][0];
            const int cols = shapes[i][1];
            snprintf(label, sizeof label, "bias grad, bf16 dout (%lld, %d)", (long long)rows, cols);
            BENCH(&gpu, label, 0, 10,
                  gpu.matmul_bwd(gpu.ctx, NULL, 0, NULL, 0, dw, logits, 1, NULL, NULL, rows, 768, cols));
        }
    }
    BENCH(&gpu, "embed_fwd", 0, 10, gpu.embed_fwd(gpu.ctx, y, tok, N, wte, 0, Vl, C));
    BENCH(&gpu, "embed_bwd (all tokens 0: one run of N rows)", 0, 5, gpu.embed_bwd(gpu.ctx, wte, x, tok, N, 0, Vl, C));
    BENCH(&gpu, "matmul_fwd_act head (N, 768) -> (N, 50304)", 2.0 * N * C * Vl, 3,
          gpu.matmul_fwd_act(gpu.ctx, logits, x, wte, NULL, N, C, (int)Vl));
    float *dlogits = dalloc((size_t)(N * Vl) * (size_t)gpu.act_bytes);
    BENCH(&gpu, "xent_stats (N, 50304)", 0, 5,
          gpu.xent_stats(gpu.ctx, mean, rstd, y, logits, tok, N, Vl, 0, 50257));
    BENCH(&gpu, "xent_bwd (N, 50304)", 0, 5,
          gpu.xent_bwd(gpu.ctx, dlogits, logits, tok, mean, rstd, 1e-5f, N, Vl, 0, 50257));
    BENCH(&gpu, "xent_stats_bwd (N, 50304), in place", 0, 5,
          gpu.xent_stats_bwd(gpu.ctx, mean, rstd, y, dlogits, tok, 1e-5f, N, Vl, 0, 50257));
    BENCH(&gpu, "matmul_bwd head dinp+dw", 4.0 * N * C * Vl, 3,
          gpu.matmul_bwd(gpu.ctx, y, 0, wte, 0, NULL, dlogits, 1, x, wte, N, C, (int)Vl));
    dfree(dlogits);
    mps_adamw_job aj = {logits, logits + 41000000, logits + 82000000, logits + 123000000, 41000000, 0.1f, 0, 0};
    mps_adamw_step as = {1e-4f, 0.9f, 0.95f, 1e-8f, 1, 0.5f};
    BENCH(&gpu, "adamw_many 41M parameters (one tensor)", 0, 3, gpu.adamw_many(gpu.ctx, &aj, 1, &as));
    BENCH(&gpu, "sumsq 124M", 0, 5, (void)sumsq1(&gpu, logits, 124000000));
    float *bufs[] = {x, y, qkv, dqkv, w, dw, bias, lse, mean, rstd, logits, wte};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        dfree(bufs[i]);
    dfree(tok);
    sync_ok("bench");
}

/* ---------------------------------------------------------------- main */

/* ---------------------------------------------------------------- groups */

static mps_backend gpu_bf16;
static int have_bf16;

static void g_memory(void)
{
    test_memory();
    test_error_report();
}
static void g_embed(void)
{
    test_embed(37, 48, 500, 1000, 0, 1600); /* a third of the tokens not owned */
    test_embed(37, 33, 0, 1000, 0, 1000);   /* all owned, odd C */
    test_embed(5000, 72, 2, 8, 0, 12);      /* runs of ~600 rows per token */
    test_pos(3, 70, 48);
    test_pos(2, 33, 37);
}
static void g_layernorm(void)
{
    test_layernorm(37, 48, 1, 1);
    test_layernorm(37, 48, 0, 1);
    test_layernorm(37, 33, 1, 0);
    test_layernorm(9000, 100, 1, 1); /* 282 row blocks of partial sums */
    test_layernorm(5, 1600, 1, 1);   /* GPT-2 XL width: the two-pass kernel */
    test_layernorm(70, 2052, 0, 1);  /* two-pass, a row not a multiple of 128 floats */
}
static void g_matmul(void)
{
    test_matmul(37, 48, 100, 1, 0, 0);
    test_matmul(37, 48, 100, 0, 0, 0);
    test_matmul(37, 33, 37, 1, 1, 1); /* odd leading dimensions, unaligned output and bias */
    test_matmul(300, 128, 384, 1, 0, 0);
    test_matmul(2000, 64, 96, 1, 0, 0); /* long k for dw */
    test_matmul_gelu(300, 64, 256);     /* cuBLASLt epilogues */
    test_matmul_gelu(37, 48, 100);      /* OC % 8 != 0: the steps */
    test_matmul_gelu(4096, 128, 512);
    static const int qkv[3] = {128, 32, 32}, odd[3] = {40, 13, 13}, gu[2] = {96, 96};
    test_matmul_parts(300, 64, 3, qkv, 1, 0);  /* q|k|v with biases (Qwen2) */
    test_matmul_parts(300, 64, 3, qkv, 0, 1);  /* ... without, from AdamW's copies */
    test_matmul_parts(37, 48, 3, odd, 1, 0);   /* 66 columns: part by part */
    test_matmul_parts(2000, 64, 2, gu, 0, 1);  /* gate|up, long k for dw */
}
/* ---------------------------------------------------------------- GEMM tuning cache */

static int count_lines(const char *path) /* -1: no file */
{
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    int n = 0, ch;
    while ((ch = fgetc(f)) != EOF)
        n += ch == '\n';
    fclose(f);
    return n;
}

/* a fresh CUDA backend under MPS_CUDA_GEMM_TUNE=tune (NULL: unset) and MPS_CUDA_GEMM_CACHE=cache
 * runs out (N, OC) = inp @ w^T + bias on it (device buffers of gpu); the result, NULL on failure */
static float *tuned_matmul(const char *tune, const char *cache, const float *inp, const float *w, const float *b,
                           int64_t N, int C, int OC)
{
    mps_backend be;
    mps_err err;
    memset(&err, 0, sizeof err);
    char keep[512];
    const char *was = getenv("MPS_CUDA_GEMM_CACHE");
    snprintf(keep, sizeof keep, "%s", was ? was : "");
    if (tune)
        setenv("MPS_CUDA_GEMM_TUNE", tune, 1);
    setenv("MPS_CUDA_GEMM_CACHE", cache, 1);
    const int rc = mps_backend_cuda(&be, &err);
    unsetenv("MPS_CUDA_GEMM_TUNE");
    if (was)
        setenv("MPS_CUDA_GEMM_CACHE", keep, 1);
    else
        unsetenv("MPS_CUDA_GEMM_CACHE");
    if (rc != 0) {
        printf("FAIL  gemm_tune: mps_backend_cuda: %s\n", err.msg);
        failures++;
        return NULL;
    }
    float *out = dalloc(sizeof(float) * (size_t)(N * OC));
    sync_ok("gemm_tune (buffers)");
    be.matmul_fwd(be.ctx, out, inp, w, b, NULL, N, C, OC);
    sync_be(&be, "gemm_tune (matmul)");
    be.destroy(be.ctx);
    float *h = dgetf(out, N * OC);
    dfree(out);
    return h;
}

static void expect(int ok, const char *what)
{
    checks++;
    if (!ok) {
        failures++;
        printf("FAIL  gemm_tune: %s\n", what);
    } else {
        printf("ok    gemm_tune: %s\n", what);
    }
}

/* The tuning cache (gemm_tune.cu): a first backend times the shape's candidates and appends its
 * choice; a second one finds it (no new line) and computes the very same bits; lines that do not
 * parse, name an index beyond the candidates or belong to another key are ignored (the product is
 * still right, and the shape is timed and appended again); "none" writes no file, and neither
 * does MPS_CUDA_GEMM_TUNE=0. */
static void g_gemm_tune(void)
{
    const int64_t N = 2048;
    const int C = 512, OC = 1536;
    char path[128], bad[140], none_dir[128];
    snprintf(path, sizeof path, "/tmp/mps-gemm-tune-%d.txt", (int)getpid());
    snprintf(bad, sizeof bad, "%s.bad", path);
    snprintf(none_dir, sizeof none_dir, "/tmp/mps-gemm-tune-%d.d", (int)getpid());
    unlink(path);
    unlink(bad);
    tin inp = in_rand_act(N * C, 1.0f), w = in_rand((int64_t)OC * C, 1.0f), b = in_rand(OC, 1.0f);
    float *ref = xmalloc(sizeof(float) * (size_t)(N * OC));
    cpu.matmul_fwd(cpu.ctx, ref, inp.h, w.h, b.h, NULL, N, C, OC);

    float *first = tuned_matmul(NULL, path, inp.d, w.d, b.d, N, C, OC);
    const int lines = count_lines(path);
    expect(lines >= 1, "the first backend appends its choice to the cache file");
    float *second = tuned_matmul(NULL, path, inp.d, w.d, b.d, N, C, OC);
    expect(count_lines(path) == lines, "a second backend reads the choice (no line added)");
    if (first && second) {
        cmp("gemm_tune", "timed", first, ref, N * OC, TOL_GEMM);
        same("gemm_tune (cached choice)", "out", first, second, N * OC);
    }

    /* a hostile file: the real key with an index past the candidates, garbage, another card */
    FILE *f = fopen(path, "r"), *g = fopen(bad, "w");
    char line[1024];
    int written = 0;
    if (f && g) {
        while (fgets(line, sizeof line, f)) {
            char *sp = strrchr(line, ' ');
            if (sp) { /* KEY ncand index -> KEY ncand 99 */
                *sp = 0;
                fprintf(g, "%s 99\n%s -1\n", line, line);
                written += 2;
            }
        }
        fprintf(g, "garbage\n\nNVIDIA_X/1/1 0 0 1 1 1 1 1 1 0 0 0 0 0 16 16 16 8 0\n");
        written += 3;
    }
    if (f)
        fclose(f);
    if (g)
        fclose(g);
    float *third = tuned_matmul(NULL, bad, inp.d, w.d, b.d, N, C, OC);
    expect(count_lines(bad) == written + lines, "invalid cache lines are ignored: the shape is timed and appended");
    if (third)
        cmp("gemm_tune", "bad cache", third, ref, N * OC, TOL_GEMM);

    /* no file: "none", and no tuning */
    float *fourth = tuned_matmul(NULL, "none", inp.d, w.d, b.d, N, C, OC);
    snprintf(line, sizeof line, "%s/cache.txt", none_dir);
    float *fifth = tuned_matmul("0", line, inp.d, w.d, b.d, N, C, OC);
    expect(count_lines(line) == -1, "MPS_CUDA_GEMM_TUNE=0 writes no cache file");
    if (fourth)
        cmp("gemm_tune", "no file", fourth, ref, N * OC, TOL_GEMM);
    if (fifth)
        cmp("gemm_tune", "untuned", fifth, ref, N * OC, TOL_GEMM);
    /* a cache path that cannot be made: tuning goes on without it */
    float *sixth = tuned_matmul(NULL, "/proc/mps-no-such-dir/cache.txt", inp.d, w.d, b.d, N, C, OC);
    if (sixth)
        cmp("gemm_tune", "unwritable cache", sixth, ref, N * OC, TOL_GEMM);
    rmdir(none_dir);
    unlink(path);
    unlink(bad);
    free(first), free(second), free(third), free(fourth), free(fifth), free(sixth), free(ref);
    in_free(&inp);
    in_free(&w);
    in_free(&b);
}

/* hs = 64 has extra cases for the default tensor-core kernels (attention_fast.cu: CTAs of 128
 * rows, tiles of 64): T below, at and past a tile (1, 64, 70, 129, 256), T = 1000 (many tiles, the
 * last partial), several heads and batches (B * H > 1: the head and batch offsets; 150 heads) */
static const struct {
    int B, T, H, hs;
} att_cases[] = {
    {2, 70, 3, 16},  {2, 70, 3, 64},  {1, 130, 2, 40}, {1, 200, 2, 128}, {2, 64, 1, 64},  {1, 1, 2, 32},
    {1, 257, 1, 100}, {1, 1, 1, 64},  {3, 129, 2, 64}, {2, 256, 3, 64},  {1, 1000, 2, 64}, {3, 256, 50, 64},
};
/* the hs = 64 cases on a backend made with MPS_CUDA_ATTENTION=mode */
static void attention_hs64_under(const char *mode, double tol)
{
    mps_backend be;
    mps_err err;
    if (cuda_backend_attention(mode, &be, &err) != 0) {
        printf("FAIL  mps_backend_cuda (%s attention): %s\n", mode, err.msg);
        failures++;
        return;
    }
    char tag[32];
    snprintf(tag, sizeof tag, " %s", mode);
    for (size_t i = 0; i < sizeof att_cases / sizeof att_cases[0]; i++)
        if (att_cases[i].hs == 64)
            test_attention(&be, tag, att_cases[i].B, att_cases[i].T, att_cases[i].H, att_cases[i].hs, tol);
    be.destroy(be.ctx);
}
static void g_attention(void)
{
    /* the default backend runs hs = 64 on the bf16 tensor-core kernels (attention_wgmma.cu on H100 /
     * H200, else attention_fast.cu): those cases take the bf16 tolerance; the other head sizes run
     * the fp32 kernels */
    for (size_t i = 0; i < sizeof att_cases / sizeof att_cases[0]; i++)
        test_attention(&gpu, "", att_cases[i].B, att_cases[i].T, att_cases[i].H, att_cases[i].hs,
                       att_cases[i].hs == 64 ? TOL_ATTN_BF16 : TOL_ATTN);
    /* hs = 64 on the fp32 kernels too (MPS_CUDA_ATTENTION=fp32), at the fp32 tolerance, and on the
     * mma.sync kernels (MPS_CUDA_ATTENTION=mma), which the default replaces by the wgmma ones on
     * H100 / H200 */
    attention_hs64_under("fp32", TOL_ATTN);
    attention_hs64_under("mma", TOL_ATTN_BF16);
}
static void g_attention_bf16(void)
{
    if (!have_bf16)
        return;
    for (size_t i = 0; i < sizeof att_cases / sizeof att_cases[0]; i++)
        test_attention(&gpu_bf16, " bf16", att_cases[i].B, att_cases[i].T, att_cases[i].H, att_cases[i].hs,
                       TOL_ATTN_BF16);
}
static void g_elementwise(void)
{
    test_elementwise(10007, 0);
    test_elementwise(10007, 1);
    test_elementwise(3, 0);
    test_rows(37, 48);
    test_rows(37, 33);
    test_rows(5000, 100);
}
static void g_xent(void)
{
    test_xent(37, 1000, 0, 990);  /* 10 padded ids */
    test_xent(37, 500, 500, 990); /* second TP half: 490 real ids */
    test_xent(37, 998, 0, 998);   /* Vl % 4 != 0: scalar path */
    test_xent(5, 500, 1000, 990); /* no real id on this rank: rowmax -inf, sumexp 0 */
    test_xent(5, 1024, 1024, 990); /* the same where xent_stats_bwd runs its fused kernel (Vl % 8 == 0) */
    test_xent(300, 50304, 0, 50257); /* GPT-2's padded vocab: the fused kernel's grid loops over rows */
    test_xent(3, 131072, 0, 131000); /* a row beyond a block's shared memory: the two kernels */
}
static void g_optim(void)
{
    test_adamw_many(3, 10007, 0);
    test_adamw_many(3, 10007, 1);
    test_adamw_many(70, 33000, 0); /* two launches (64 tensors each at most), chunk tails */
    test_adamw_many(5, 100003, 1);
    test_weight_copies();
    test_sumsq(100003, 0);
    test_sumsq(100003, 1);
    test_sumsq(7, 0);
    test_sumsq_many();
}
static void g_rmsnorm(void)
{
    test_rmsnorm(37, 48);
    test_rmsnorm(37, 33);
    test_rmsnorm(5000, 100); /* many chunks of the dw sums */
    test_rmsnorm(300, 2048); /* past 1024: rows in registers (k_rms_fwd_reg<16>, k_rms_bwd_reg) */
    test_rmsnorm(70, 1028);  /* the same with most lanes' last float4s past the row */
    test_rmsnorm(50, 1500);
    test_rmsnorm(33, 4096);  /* Llama 7B's width: k_rms_fwd_reg<32>, the two-pass backward */
    test_rmsnorm(40, 8192);  /* Llama 70B's width: the loops of k_rms_fwd; 128 KiB of shared memory */
}
static void g_rope(void)
{
    test_rope(2, 17, 3, 16, 48);        /* q-shaped: the heads fill the row */
    test_rope(2, 70, 2, 64, 3 * 128);   /* heads at the start of wider rows */
    test_rope(1, 129, 8, 128, 8 * 128);
    test_rope(3, 5, 1, 6, 10);
}
static void g_swiglu(void)
{
    test_swiglu(1, 10007, 0);
    test_swiglu(1, 3, 0);
    test_swiglu(100, 3000, 0);
    test_swiglu(37, 100, 1);  /* the stacked gate|up buffer: 8-byte accesses */
    test_swiglu(37, 101, 1);  /* ... and element by element */
    test_swiglu(64, 5632, 1); /* tinyllama's width */
}
/* H = 8 over KV = 2 (groups of 4) and KV = 8 (plain multi-head), head sizes 64 and 128, T below,
 * at and past a key tile (64) and not a multiple of it; a few odd shapes (groups of 3, head sizes
 * of 48 and 32, T = 1) */
static void g_gqa(void)
{
    static const struct {
        int B, T, H, KV, hd;
    } c[] = {
        {2, 70, 8, 2, 64}, {1, 130, 8, 8, 64}, {2, 100, 8, 2, 128}, {1, 129, 8, 8, 128}, {1, 64, 8, 2, 64},
        {1, 300, 8, 2, 128}, {2, 33, 6, 2, 48}, {1, 200, 4, 1, 32}, {1, 1, 8, 2, 64}, {1, 5, 2, 2, 128},
        {2, 200, 16, 2, 64}, {1, 260, 8, 1, 128}, {1, 129, 4, 4, 128},
    };
    for (size_t i = 0; i < sizeof c / sizeof c[0]; i++)
        test_gqa(c[i].B, c[i].T, c[i].H, c[i].KV, c[i].hd);
    /* the backward with the rotary embeddings' backward fused (wgmma: at the stores) */
    test_gqa_rope(2, 100, 8, 2, 64, 1, 0);
    test_gqa_rope(1, 130, 8, 2, 128, 1, 0);
    test_gqa_rope(1, 70, 6, 2, 48, 1, 0);
    /* q|k|v in one stacked buffer, as the engine lays them out */
    test_gqa_rope(2, 100, 8, 2, 64, 1, 1);
    test_gqa_rope(1, 130, 8, 2, 128, 1, 1);
    test_gqa_rope(1, 70, 6, 2, 48, 1, 1);
    test_gqa_rope(1, 65, 4, 4, 64, 0, 1);
    /* head sizes 64 and 128 take the wgmma kernels on H100 / H200: the fp32 kernels (other cards)
     * once more for them, selected by MPS_CUDA_ATTENTION=fp32 */
    mps_backend fp32, saved = gpu;
    mps_err err;
    if (cuda_backend_attention("fp32", &fp32, &err) != 0) {
        printf("not ok - a CUDA backend with MPS_CUDA_ATTENTION=fp32: %s\n", err.msg);
        failures++;
        return;
    }
    gpu = fp32;
    test_gqa(2, 100, 8, 2, 128);
    test_gqa_rope(1, 130, 8, 2, 64, 1, 0);
    test_gqa_rope(1, 130, 8, 2, 64, 1, 1);
    gpu = saved;
    fp32.destroy(fp32.ctx);
}
static void g_bench(void)
{
    const char *b = getenv("MPS_TEST_BENCH");
    if (!b || strcmp(b, "0") != 0)
        bench(have_bf16 ? &gpu_bf16 : NULL);
}

static const struct {
    const char *name;
    void (*fn)(void);
} groups[] = {
    {"memory", g_memory}, {"embed", g_embed}, {"layernorm", g_layernorm}, {"matmul", g_matmul},
    {"attention", g_attention}, {"attention_bf16", g_attention_bf16}, {"elementwise", g_elementwise},
    {"xent", g_xent}, {"optim", g_optim}, {"gemm_tune", g_gemm_tune}, {"rmsnorm", g_rmsnorm}, {"rope", g_rope},
    {"swiglu", g_swiglu}, {"gqa", g_gqa}, {"bench", g_bench},
};
#define NGROUPS ((int)(sizeof groups / sizeof groups[0]))

/* one group with fresh backends; returns its failure count */
static int run_group(int g)
{
    mps_err err;
    memset(&err, 0, sizeof err);
    mps_backend_cpu(&cpu);
    unsetenv("MPS_CUDA_ATTENTION");
    if (mps_backend_cuda(&gpu, &err) != 0) {
        printf("FAIL  [%s] mps_backend_cuda: %s\n", groups[g].name, err.msg);
        return 1;
    }
    have_bf16 = cuda_backend_attention("bf16", &gpu_bf16, &err) == 0; /* a second backend: WMMA attention */
    if (!have_bf16) {
        printf("FAIL  [%s] mps_backend_cuda (bf16 attention): %s\n", groups[g].name, err.msg);
        failures++;
    }
    groups[g].fn();
    if (have_bf16)
        gpu_bf16.destroy(gpu_bf16.ctx);
    gpu.destroy(gpu.ctx);
    printf("[%s] %d checks, %d failed\n", groups[g].name, checks, failures);
    return failures;
}

/* Usage: test_backend_cuda [group] (one group in this process, e.g. under compute-sanitizer).
 * Without an argument every group runs in a child process of its own: a kernel fault (a sticky
 * CUDA error) or a hang then costs that group only. The parent never initialises CUDA, which a
 * process that forks must not do; the device check runs in a child too. */
int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc > 1) {
        for (int g = 0; g < NGROUPS; g++)
            if (strcmp(argv[1], groups[g].name) == 0)
                return run_group(g) ? 1 : 0;
        fprintf(stderr, "unknown group %s\n", argv[1]);
        return 2;
    }
    /* the suite's backends tune their GEMMs into a cache file of its own, not the user's */
    char cache[96];
    snprintf(cache, sizeof cache, "/tmp/mps-test-gemm-tune-%d.txt", (int)getpid());
    setenv("MPS_CUDA_GEMM_CACHE", cache, 1);
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        int ndev = 0;
        cudaError_t rc = cudaGetDeviceCount(&ndev);
        if (rc != cudaSuccess || ndev == 0) {
            printf("no GPU: skipped (%s)\n", rc != cudaSuccess ? cudaGetErrorString(rc) : "0 devices");
            _exit(77);
        }
        struct cudaDeviceProp prop;
        if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess)
            printf("device 0: %s, sm_%d%d, %d SMs, %.1f GiB\n", prop.name, prop.major, prop.minor,
                   prop.multiProcessorCount, (double)prop.totalGlobalMem / (1 << 30));
        _exit(0);
    }
    int st = 0;
    if (pid < 0 || waitpid(pid, &st, 0) != pid || !WIFEXITED(st)) {
        printf("FAIL  device check did not complete\n");
        return 1;
    }
    if (WEXITSTATUS(st) == 77)
        return 77;
    int bad_groups = 0;
    for (int g = 0; g < NGROUPS; g++) {
        fflush(stdout);
        pid = fork();
        if (pid == 0) {
            alarm(600); /* a hung kernel ends the group, not the suite */
            _exit(run_group(g) ? 1 : 0);
        }
        if (pid < 0 || waitpid(pid, &st, 0) != pid) {
            printf("FAIL  [%s] could not run\n", groups[g].name);
            bad_groups++;
        } else if (WIFSIGNALED(st)) {
            printf("FAIL  [%s] killed by signal %d%s\n", groups[g].name, WTERMSIG(st),
                   WTERMSIG(st) == SIGALRM ? " (timeout: a kernel hangs?)" : "");
            bad_groups++;
        } else if (WEXITSTATUS(st) != 0) {
            bad_groups++;
        }
    }
    unlink(cache);
    printf("%d of %d groups failed\n", bad_groups, NGROUPS);
    return bad_groups ? 1 : 0;
}
