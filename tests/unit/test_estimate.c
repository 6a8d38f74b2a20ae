/* The step-time estimate (inspect/estimate.h) and the layout `mpshard split` chooses, against
 * figures worked out by hand from the formula (the arithmetic is in the comments):
 *   step = compute + bubble + comm, compute = 6 P G s / (N * 989e12 * 0.4) (8 P with full
 *   recompute), bubble = compute (pp-1)/m, comm = bytes sent / (450e9 * 0.8) over NVLink or
 *   / (50e9 * 0.8) over InfiniBand (a group with ranks on two nodes of 8 GPUs).
 * Where a budget decides, the layouts on either side of it are apart by more than a GB beyond
 * their activation estimate, so that the choices stand on the model state and the formula. */
#include <math.h>

#include "inspect/plan.h"
#include "testutil.h"

static mps_config config_of(const char *text)
{
    mps_config cfg;
    mps_err err;
    mps_err_clear(&err);
    if (mps_config_parse(text, &cfg, &err) != 0) {
        fprintf(stderr, "config %s: %s\n", text, err.msg);
        exit(2);
    }
    return cfg;
}

static mps_plan_opts opts_of(const mps_config *cfg, mps_precision precision, int64_t seq, mps_recompute recompute,
                             int64_t global_batch)
{
    mps_plan_opts o;
    mps_plan_opts_default(cfg, &o);
    o.precision = precision;
    o.seq = seq;
    o.recompute = recompute;
    o.global_batch = global_batch;
    return o;
}

static mps_step_estimate estimate_of(const mps_config *cfg, const char *layout, const mps_plan_opts *o)
{
    mps_layout L;
    mps_plan *p;
    mps_err err;
    mps_err_clear(&err);
    if (mps_layout_parse(layout, cfg, &L, &err) != 0 || mps_plan_build(cfg, &L, o, &p, &err) != 0) {
        fprintf(stderr, "%s: %s\n", layout, err.msg);
        exit(2);
    }
    mps_step_estimate e;
    mps_estimate_step(p, NULL, &e);
    mps_plan_free(p);
    return e;
}

/* The PP bytes the planner has a rank send per step. */
static int64_t pp_bytes(const mps_config *cfg, const char *layout, const mps_plan_opts *o, int rank)
{
    mps_layout L;
    mps_plan *p;
    mps_err err;
    mps_err_clear(&err);
    if (mps_layout_parse(layout, cfg, &L, &err) != 0 || mps_plan_build(cfg, &L, o, &p, &err) != 0)
        return -1;
    mps_comm_volume c;
    mps_plan_comm(p, rank, &c);
    mps_plan_free(p);
    return c.pp;
}

static int near(double got, double want) { return fabs(got - want) <= 1e-6 * fabs(want); }

/* The chosen layout as "dp=..,pp=..,tp=..,zero=.." ("none" if nothing fits); *fit counts those that fit. */
static const char *choice(const mps_config *cfg, int gpus, int zero, int64_t gpu_mem, const mps_plan_opts *o,
                          char *buf, size_t size)
{
    mps_suggestion *list;
    int n, chosen;
    mps_err err;
    mps_err_clear(&err);
    if (mps_split_candidates(cfg, gpus, zero, gpu_mem, o, &list, &n, &chosen, &err) != 0) {
        snprintf(buf, size, "error: %.200s", err.msg);
        return buf;
    }
    if (chosen < 0)
        snprintf(buf, size, "none");
    else
        snprintf(buf, size, "dp=%d,pp=%d,tp=%d,zero=%d", list[chosen].layout.dp, list[chosen].layout.pp,
                 list[chosen].layout.tp, list[chosen].layout.zero);
    /* the list is in the estimate's order and holds only the asked ZeRO stage */
    for (int i = 0; i < n; i++) {
        CHECK(list[i].layout.zero == zero);
        CHECK(mps_layout_world(&list[i].layout) == gpus);
        if (i > 0)
            CHECK(list[i - 1].est.step_s <= list[i].est.step_s);
    }
    free(list);
    return buf;
}

#define EXPECT_CHOICE(cfg, gpus, zero, mem, o, want)                                                        \
    do {                                                                                                    \
        char got_[256];                                                                                     \
        choice(&(cfg), gpus, zero, mem, &(o), got_, sizeof got_);                                           \
        CHECK_MSG(strcmp(got_, want) == 0, "%d GPUs, ZeRO-%d, %lld bytes: chose %s, want %s", gpus, zero, \
                  (long long)(mem), got_, want);                                                            \
    } while (0)

/* A 3-layer model (n_embd 96, 6 heads, vocab 1000 padded to 1024, 64 positions) on 4 GPUs, fp32,
 * one sequence of 64 tokens per micro-batch, G = 4 sequences. The candidates (tp divides 6 heads,
 * pp <= 3 layers): dp x pp x tp = 4x1x1, 2x2x1, 2x1x2, 1x2x2.
 *   P = 1024*96 (wte) + 64*96 (wpe) + 3 * 111840 (12*96^2 + 13*96 per layer) + 2*96 = 440160
 *   compute = 6 * 440160 * 4*64 / (4 * 395.6e12) = 0.42725 us; sbh = 64*96 = 6144; fp32: 4 B
 *   4x1x1: m = 1, DP = 3/4 * 440160 * (4+4) = 2640960 B -> 7.3360 us; step 7.7633 us
 *   2x2x1: m = 2, bubble 0.42725/2 = 0.21363 us; stage 0 (layers 0-1, wte, wpe: 328128 elements):
 *          DP 1/2 * 328128 * 8 = 1312512 B, PP 2 * 6144*4 + wte 98304*4 = 442368 B
 *          -> (1312512 + 442368) / 360e9 = 4.8747 us; step 0.42725*1.5 + 4.8747 = 5.5155 us
 *   2x1x2: m = 2; TP box 49152 (wte/2) + 6144 + 3 * 56208 + 192 = 224112 elements,
 *          DP 1/2 * 224112 * 8 = 896448 B, TP 2 * 3 layers * 4 * (2*1/2) * 6144 * 4 = 589824 B
 *          -> 4.1286 us; step 4.5558 us
 *   1x2x2: m = 4, bubble 0.42725/4 = 0.10681 us; stage 0: TP 4 * 2 * 4 * 1 * 24576 = 786432 B,
 *          PP 4 * 6144/2 * 4 + wte TP half 49152*4 = 245760 B -> 2.8668 us; step 3.4013 us
 * So 1x2x2 first (no DP traffic at all), then 2x1x2, 2x2x1, 4x1x1; every one needs a few MB. */
static void test_small(void)
{
    mps_config cfg = config_of("n_layer=3,n_embd=96,n_head=6,vocab=1000,n_positions=64");
    mps_plan_opts o = opts_of(&cfg, MPS_PRECISION_FP32, 64, MPS_RECOMPUTE_NONE, 4);
    mps_step_estimate e = estimate_of(&cfg, "dp=4,zero=1", &o);
    CHECK_MSG(near(e.compute_s, 0.42725338726e-6) && near(e.step_s, 7.76325338726e-6) && e.bubble_s == 0,
              "4x1x1: compute %.9g, step %.9g", e.compute_s, e.step_s);
    e = estimate_of(&cfg, "dp=2,pp=2,zero=1", &o);
    CHECK_MSG(near(e.bubble_s, 0.21362669363e-6) && near(e.dp_s, 1312512 / 360e9) && near(e.pp_s, 442368 / 360e9) &&
                  near(e.step_s, 5.51554674756e-6) && e.comm_rank == 0,
              "2x2x1: bubble %.9g, step %.9g", e.bubble_s, e.step_s);
    e = estimate_of(&cfg, "dp=2,tp=2,zero=1", &o);
    CHECK_MSG(near(e.dp_s, 896448 / 360e9) && near(e.tp_s, 589824 / 360e9) && near(e.step_s, 4.55578672059e-6),
              "2x1x2: step %.9g", e.step_s);
    e = estimate_of(&cfg, "pp=2,tp=2,zero=1", &o);
    CHECK_MSG(near(e.bubble_s, 0.10681334681e-6) && near(e.tp_s, 786432 / 360e9) && e.dp_s == 0,
              "1x2x2: bubble %.9g", e.bubble_s);
    CHECK(!e.dp_ib && !e.tp_ib && !e.pp_ib); /* 4 GPUs: one node */
    EXPECT_CHOICE(cfg, 4, 1, (int64_t)80e9, o, "dp=1,pp=2,tp=2,zero=1");
    /* ZeRO is kept where dp = 1: a ZeRO-3 checkpoint split for 4 GPUs stays ZeRO-3 */
    EXPECT_CHOICE(cfg, 4, 3, (int64_t)80e9, o, "dp=1,pp=2,tp=2,zero=3");
}

/* The lesson's 7B model (32 layers x 4096, 32 heads, vocab 128000) on 8 GPUs of one node, mixed
 * precision (2 B weights, 4 B gradients: the trainer's fp32 accumulation), one sequence of 1024
 * tokens per micro-batch, G = 8, ZeRO-1.
 *   P = 524288000 (wte) + 33554432 (wpe) + 32 * 201379840 (12*4096^2 + 13*4096) + 8192 = 7002005504
 *   compute = 6 * 7002005504 * 8*1024 / (8 * 395.6e12) = 108.747 ms; sbh = 1024*4096 = 4194304
 *   dp=2,tp=4: m = 4; TP box 131072000 + 33554432 + 32 * 50363392 + 8192 = 1776263168,
 *     DP 1/2 * 1776263168 * (4 + 2) = 5328789504 B -> 14.802 ms; TP 4 * 32 * 4 * 1.5 * sbh * 2 =
 *     6442450944 B -> 17.896 ms; step 141.445 ms (peak 24.5 GB)
 *   pp=2,tp=4: m = 8, bubble 108.747/8 = 13.593 ms; TP 8 * 16 * 4 * 1.5 * sbh * 2 = 17.896 ms,
 *     PP 8 * sbh/4 * 2 + wte's TP quarter 131072000 * 4 = 541065216 B -> 1.503 ms; step 141.739 ms
 *     (peak 20.7 GB: 17.5 GB of model state at 18 B a parameter, 2.7 GB of activations: per layer
 *     and token 4 * (2*4096 + 4 + 8) + 2 * (2*4096 + 3072 + 1024 + 4096 + 4096) = 73776 B, 16 layers x
 *     2 micro-batches in flight, 0.25 GB of working buffers; 0.6 GB of CUDA runtime)
 *   dp=4,tp=2: m = 2; DP 3/4 * 3518177280 * 6 = 15831797760 B -> 43.977 ms, TP 2 * 32 * 4 * 1 * sbh * 2
 *     = 2147483648 B -> 5.965 ms; step 158.689 ms
 *   tp=8: m = 8; TP 8 * 32 * 4 * 1.75 * sbh * 2 = 15032385536 B -> 41.757 ms; step 150.504 ms
 *   pp=8 (what --suggest put first by bytes sent): m = 8, bubble 7/8 * 108.747 = 95.154 ms;
 *     PP (first stage) 8 * sbh * 2 + wte 524288000 * 4 = 2164260864 B -> 6.012 ms; step 209.912 ms
 * 80 GB: dp=2,tp=4. 21 GB: dp=2,tp=4 is over (24.5 GB), pp=2,tp=4 is next and fits (20.7 GB). */
static void test_7b(void)
{
    mps_config cfg = config_of("n_layer=32,n_embd=4096,n_head=32,vocab=128000,n_positions=8192");
    mps_plan_opts o = opts_of(&cfg, MPS_PRECISION_MIXED, 1024, MPS_RECOMPUTE_NONE, 8);
    static const struct { const char *layout; double step_ms; } hand[] = {
        { "dp=2,tp=4,zero=1", 141.445 }, { "dp=4,tp=2,zero=1", 158.689 }, { "tp=8", 150.504 }, { "pp=8", 209.912 },
    };
    for (size_t i = 0; i < sizeof hand / sizeof hand[0]; i++) {
        mps_step_estimate e = estimate_of(&cfg, hand[i].layout, &o);
        CHECK_MSG(fabs(e.step_s * 1e3 - hand[i].step_ms) < 0.001, "%s: %.4f ms, by hand %.3f", hand[i].layout,
                  e.step_s * 1e3, hand[i].step_ms);
    }
    mps_step_estimate e = estimate_of(&cfg, "pp=2,tp=4", &o);
    CHECK_MSG(near(e.compute_s, 0.108747021781) && near(e.bubble_s, 0.108747021781 / 8) &&
                  near(e.tp_s, 6442450944 / 360e9),
              "pp=2,tp=4: compute %.9g, bubble %.9g", e.compute_s, e.bubble_s);
    EXPECT_CHOICE(cfg, 8, 1, (int64_t)80e9, o, "dp=2,pp=1,tp=4,zero=1");
    EXPECT_CHOICE(cfg, 8, 1, (int64_t)21e9, o, "dp=1,pp=2,tp=4,zero=1");
    /* one GPU: 18 bytes of model state per parameter alone are 126 GB */
    EXPECT_CHOICE(cfg, 1, 1, (int64_t)80e9, o, "none");
    /* --suggest carries the same estimate (one function) and no longer puts pp=8 first */
    mps_suggestion *list;
    int n, considered;
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_plan_suggest(&cfg, 8, (int64_t)80e9, &o, &list, &n, &considered, &err) == 0 && n > 0);
    if (n > 0) {
        char layout[4096];
        mps_layout_format(&list[0].layout, layout, sizeof layout);
        /* ZeRO-2 sends what ZeRO-1 sends (the same time) and holds less */
        CHECK_MSG(strcmp(layout, "dp=2,pp=1,tp=4,zero=2") == 0, "suggest's first: %s", layout);
        CHECK(fabs(list[0].est.step_s - 141.445e-3) < 1e-6);
    }
    free(list);
}

/* GPT-3 175B on 64 GPUs (8 nodes of 8), 80 GiB, mixed, full recomputation (8 P FLOPs per token),
 * one sequence of 2048 tokens per micro-batch, G = 64, ZeRO-1.
 *   P = 618135552 (wte 50304 x 12288) + 25165824 + 96 * 1812099072 + 24576 = 174604836864
 *   compute = 8 * P * 64*2048 / (64 * 395.6e12) = 7231.36 ms; sbh = 2048*12288 = 25165824
 *   dp=1,pp=8,tp=8: m = 64, bubble 7/64 * compute = 790.93 ms; TP inside a node: 64 * 12 layers * 6
 *     (full recompute) * 1.75 * sbh * 2 = 405874409472 B -> 1127.43 ms; PP stages 8 ranks apart, on
 *     other nodes: a middle stage sends 2 * 64 * sbh/8 * 2 = 805306368 B over InfiniBand -> 20.13 ms
 *     (the planner's PP bytes, which count s*b*h/t per message: checked as whatever it sends, over IB);
 *     step 9169.85 ms (peak 45.7 GB)
 *   dp=2,pp=4,tp=8: m = 32, bubble 3/32 * compute = 677.94 ms, the same TP 1127.43 ms, DP over
 *     InfiniBand (the two replicas 8 ranks apart) 1/2 * 5540278272 * (4 + 2) = 16620834816 B -> 415.52 ms,
 *     PP 8.90 ms; step 9461.15 ms
 * The first is chosen; the flags say which groups cross nodes. */
static void test_175b(void)
{
    mps_config cfg = config_of("n_layer=96,n_embd=12288,n_head=96,vocab=50257,n_positions=2048");
    mps_plan_opts o = opts_of(&cfg, MPS_PRECISION_MIXED, 2048, MPS_RECOMPUTE_FULL, 64);
    mps_step_estimate e = estimate_of(&cfg, "pp=8,tp=8", &o);
    const double pp_ib = (double)pp_bytes(&cfg, "pp=8,tp=8", &o, e.comm_rank) / 40e9;
    CHECK_MSG(near(e.compute_s, 7.2313564) && near(e.bubble_s, 7.2313564 * 7 / 64) &&
                  near(e.tp_s, 405874409472.0 / 360e9) && near(e.pp_s, pp_ib),
              "pp=8,tp=8: compute %.7g bubble %.7g tp %.7g pp %.7g", e.compute_s, e.bubble_s, e.tp_s, e.pp_s);
    CHECK(!e.dp_ib && !e.tp_ib && e.pp_ib);
    e = estimate_of(&cfg, "dp=2,pp=4,tp=8,zero=1", &o);
    CHECK_MSG(near(e.dp_s, 16620834816.0 / 40e9) && near(e.bubble_s, 7.2313564 * 3 / 32), "dp=2,pp=4,tp=8: dp %.7g",
              e.dp_s);
    CHECK(e.dp_ib && !e.tp_ib && e.pp_ib);
    e = estimate_of(&cfg, "dp=2,pp=8,tp=4,zero=1", &o); /* a replica pair shares a node; stages do not */
    CHECK(!e.dp_ib && !e.tp_ib && e.pp_ib);
    e = estimate_of(&cfg, "dp=4,tp=16,zero=1", &o); /* TP over 16 GPUs spans two nodes */
    CHECK(e.dp_ib && e.tp_ib && !e.pp_ib);
    EXPECT_CHOICE(cfg, 64, 1, (int64_t)80 << 30, o, "dp=1,pp=8,tp=8,zero=1");
}

int main(void)
{
    test_small();
    test_7b();
    test_175b();
    TEST_DONE();
}
