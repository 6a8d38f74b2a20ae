/* inspect: the planner against (1) mps_geometry called for every tensor and kind with no shortcut,
 * (2) what real checkpoints hold per rank, summed from their datasets, over a sweep of layouts,
 * (3) the lesson's 7B figures, (4) the activation formula and communication volumes by hand,
 * (5) --suggest for gpt3-175b on 64 GPUs, (6) the planning time over 1024 ranks, (7) the SVG. */
#include <math.h>
#include <time.h>

#include "inspect/plan.h"
#include "inspect/svg.h"
#include "modelfile.h"
#include "shard/shard.h"
#include "testutil.h"

static const mps_config small = { .n_layer = 3, .n_embd = 96, .n_head = 6, .n_positions = 64, .vocab = 1000, .padded_vocab = 1024 };
static const mps_config five = { .n_layer = 5, .n_embd = 48, .n_head = 6, .n_positions = 32, .vocab = 333, .padded_vocab = 384 };

static mps_layout layout_of(const mps_config *cfg, const char *text)
{
    mps_layout L;
    mps_err err;
    mps_err_clear(&err);
    if (mps_layout_parse(text, cfg, &L, &err) != 0) {
        fprintf(stderr, "layout %s: %s\n", text, err.msg);
        exit(2);
    }
    return L;
}

static mps_plan *plan_of(const mps_config *cfg, const mps_layout *L, const mps_plan_opts *o)
{
    mps_plan *p;
    mps_err err;
    mps_err_clear(&err);
    if (mps_plan_build(cfg, L, o, &p, &err) != 0) {
        fprintf(stderr, "plan: %s\n", err.msg);
        exit(2);
    }
    return p;
}

/* The shortcuts of mps_plan_build (rank classes, tensor classes, sharding groups) give exactly
 * what mps_geometry gives tensor by tensor and kind by kind. */
static void test_fast_equals_direct(void)
{
    static const struct { const mps_config *cfg; const char *layout; } cases[] = {
        { &small, "dp=1" }, { &small, "dp=2,zero=1" }, { &small, "dp=3,tp=2,pp=3,zero=2" }, { &small, "dp=4,zero=3" },
        { &small, "dp=7,tp=3,zero=3" }, { &small, "pp=2,stages=1:2,tp=6,dp=2,zero=1" }, { &five, "dp=5,pp=3,stages=1:3:1,tp=2,zero=3" },
        { &five, "dp=9,pp=5,tp=3,zero=2" }, { &five, "dp=2,pp=2,tp=6,zero=0" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        for (int prec = 0; prec < 2; prec++) {
            mps_layout L = layout_of(cases[i].cfg, cases[i].layout);
            mps_plan_opts o;
            mps_plan_opts_default(cases[i].cfg, &o);
            o.precision = (mps_precision)prec;
            o.micro_batch = 3;
            mps_plan *p = plan_of(cases[i].cfg, &L, &o);
            int same = 1;
            for (int r = 0; r < mps_layout_world(&L); r++) {
                mps_rank_usage fast, direct;
                mps_plan_rank(p, r, &fast);
                mps_plan_rank_direct(cases[i].cfg, &L, &o, r, &direct);
                same &= memcmp(fast.elems, direct.elems, sizeof fast.elems) == 0 &&
                        memcmp(fast.bytes, direct.bytes, sizeof fast.bytes) == 0 &&
                        fast.activations == direct.activations && fast.total == direct.total;
            }
            CHECK_MSG(same, "%s %s: planner differs from mps_geometry tensor by tensor", cases[i].layout,
                      mps_precision_name((mps_precision)prec));
            mps_plan_free(p);
        }
    /* the same for sample ranks of gpt3-175b over 1024 GPUs (uneven stages: 96 layers / 64 stages) */
    mps_config big;
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_config_preset("gpt3-175b", &big, &err) == 0);
    static const char *const big_layouts[] = { "dp=8,pp=64,tp=2,zero=3", "dp=16,pp=8,tp=8,zero=1", "dp=1024,zero=2" };
    for (size_t i = 0; i < sizeof big_layouts / sizeof big_layouts[0]; i++) {
        mps_layout L = layout_of(&big, big_layouts[i]);
        mps_plan_opts o;
        mps_plan_opts_default(&big, &o);
        o.precision = MPS_PRECISION_MIXED;
        mps_plan *p = plan_of(&big, &L, &o);
        static const int ranks[] = { 0, 1, 17, 511, 512, 1000, 1023 };
        for (size_t k = 0; k < sizeof ranks / sizeof ranks[0]; k++) {
            mps_rank_usage fast, direct;
            mps_plan_rank(p, ranks[k], &fast);
            mps_plan_rank_direct(&big, &L, &o, ranks[k], &direct);
            CHECK_MSG(memcmp(fast.elems, direct.elems, sizeof fast.elems) == 0 && fast.total == direct.total,
                      "gpt3-175b %s rank %d", big_layouts[i], ranks[k]);
        }
        mps_plan_free(p);
    }
}

/* Another zero stage that changes how a stored kind (param, adam_m, adam_v) is split over DP. */
static int other_zero(int zero)
{
    static const int swap[4] = { 1, 3, 0, 2 };
    return swap[zero];
}

/* A checkpoint's datasets, mapped to the ranks that hold them, hold per rank and kind exactly the
 * elements the planner gives for the same model and layout, and 4 bytes each in the fp32 plan. */
static void test_checkpoint_holdings(const char *model, const char *dir)
{
    static const char *const layouts[] = {
        "dp=1", "dp=2,zero=1", "dp=2,tp=3,pp=3,zero=3", "dp=3,pp=2,tp=2,zero=1", "tp=6,dp=2,zero=2",
        "dp=4,zero=3", "dp=5,tp=2,zero=1", "pp=2,stages=1:2,tp=2,dp=2", "dp=7,tp=6,pp=3,zero=3",
    };
    for (size_t i = 0; i < sizeof layouts / sizeof layouts[0]; i++) {
        char ck[1100];
        snprintf(ck, sizeof ck, "%s/ck%zu", dir, i);
        mps_shard_opts so = { .layout = layouts[i], .out_dir = ck, .quiet = 1, .chunk_bytes = 4096, .threads = 2 };
        mps_err err;
        mps_err_clear(&err);
        CHECK_MSG(mps_shard(model, &so, &err) == 0, "shard %s: %s", layouts[i], err.msg);
        char path[1200];
        snprintf(path, sizeof path, "%s/manifest.json", ck);
        mps_manifest m;
        if (mps_manifest_read(path, &m, &err) != 0) {
            CHECK_MSG(0, "%s: %s", path, err.msg);
            continue;
        }
        mps_ckpt_usage *u;
        CHECK_MSG(mps_ckpt_usage_scan(ck, &m, &u, &err) == 0, "scan %s: %s", layouts[i], err.msg);
        mps_plan_opts o;
        mps_plan_opts_default(&m.cfg, &o);
        mps_plan *plan = plan_of(&m.cfg, &m.layout, &o);
        int world = mps_layout_world(&m.layout), equal = 1, bytes_equal = 1;
        int64_t raw = 0, param_held = 0;
        for (int r = 0; r < world; r++) {
            mps_rank_usage pu;
            mps_plan_rank(plan, r, &pu);
            for (int k = 0; k < MPS_KIND_COUNT; k++) {
                if (!(m.kinds & (1u << k)))
                    continue;
                int64_t held = u->held[(size_t)r * MPS_KIND_COUNT + k];
                if (held != pu.elems[k]) {
                    equal = 0;
                    fprintf(stderr, "  %s rank %d %s: datasets %lld, plan %lld\n", layouts[i], r, mps_kind_name((mps_kind)k),
                            (long long)held, (long long)pu.elems[k]);
                }
                bytes_equal &= pu.bytes[k] == 4 * held;
            }
            param_held += u->held[(size_t)r * MPS_KIND_COUNT + MPS_KIND_PARAM];
            raw += u->file_raw[r];
        }
        CHECK_MSG(equal, "%s: per-rank holdings of the checkpoint differ from the plan", layouts[i]);
        CHECK_MSG(bytes_equal, "%s: fp32 plan bytes are not 4 per element held", layouts[i]);
        /* every element is stored once: the files hold param + adam_m + adam_v of the whole model */
        CHECK_MSG(raw == 3 * 4 * mps_param_count(&m.cfg), "%s: %lld raw bytes stored", layouts[i], (long long)raw);
        CHECK(param_held >= mps_param_count(&m.cfg));
        CHECK(u->datasets > 0);
        /* the comparison can fail: a plan with another ZeRO rule does not match these datasets */
        if (m.layout.dp > 1) {
            mps_layout wrong = m.layout;
            wrong.zero = other_zero(m.layout.zero);
            mps_plan *wp = plan_of(&m.cfg, &wrong, &o);
            int differs = 0;
            for (int r = 0; r < world; r++) {
                mps_rank_usage pu;
                mps_plan_rank(wp, r, &pu);
                for (int k = 0; k < MPS_KIND_COUNT; k++)
                    if ((m.kinds & (1u << k)) && u->held[(size_t)r * MPS_KIND_COUNT + k] != pu.elems[k])
                        differs = 1;
            }
            CHECK_MSG(differs, "%s: a plan with zero=%d matches the checkpoint too", layouts[i], wrong.zero);
            mps_plan_free(wp);
        }
        mps_plan_free(plan);
        mps_ckpt_usage_free(u);
        mps_manifest_free(&m);
    }
}

/* Rounded to 0.1 GB (10^9 bytes), as the lesson writes its figures. */
static double gb1(int64_t bytes) { return round((double)bytes / 1e8) / 10; }

/* The lesson: a 7B model in fp32 holds weights 28 GB, gradients 28 GB, Adam 56 GB, ~10 GB of
 * activations (the trainer's 9.3 GB here: per layer and token 4 * (2*4096 + 4 + 32) bytes of fp32
 * input, residual, norm statistics and log-sum-exp and 4 * 14 * 4096 of fp32 operand buffers
 * (2h norm outputs, 3h qkv, h attention output, 4h + 4h MLP), 32 layers x 1024 tokens: 8.59 GB;
 * the head's (1024, 128000) logits 0.52 GB; working buffers 0.13 GB); over 8 GPUs ZeRO-1 leaves 7 GB of optimizer state, ZeRO-2 10.5 GB of optimizer
 * state and gradients, ZeRO-3 14 GB of model state per GPU. */
static void test_lesson_7b(void)
{
    mps_config cfg;
    mps_err err;
    mps_err_clear(&err);
    /* 32 x 4096 with a 128000-token vocabulary and 8192 positions: 7.002e9 parameters */
    CHECK(mps_config_parse("n_layer=32,n_embd=4096,n_head=32,vocab=128000,n_positions=8192", &cfg, &err) == 0);
    CHECK(fabs((double)mps_param_count(&cfg) - 7e9) < 0.005e9);
    mps_plan_opts o;
    mps_plan_opts_default(&cfg, &o);
    o.seq = 1024;
    mps_layout L = layout_of(&cfg, "dp=1");
    mps_plan *p = plan_of(&cfg, &L, &o);
    mps_rank_usage u;
    mps_plan_rank(p, 0, &u);
    CHECK_MSG(gb1(u.bytes[MPS_KIND_PARAM]) == 28.0, "weights %.3f GB", u.bytes[MPS_KIND_PARAM] / 1e9);
    CHECK_MSG(gb1(u.bytes[MPS_KIND_GRAD]) == 28.0, "gradients %.3f GB", u.bytes[MPS_KIND_GRAD] / 1e9);
    CHECK_MSG(gb1(u.bytes[MPS_KIND_ADAM_M] + u.bytes[MPS_KIND_ADAM_V]) == 56.0, "Adam %.3f GB",
              (u.bytes[MPS_KIND_ADAM_M] + u.bytes[MPS_KIND_ADAM_V]) / 1e9);
    CHECK(u.bytes[MPS_KIND_MASTER] == 0);
    const double layers = 32.0 * 1024 * (4 * (2 * 4096 + 4 + 32) + 4 * 14 * 4096), logits = 1024.0 * 128000 * 4;
    /* slot; the step's ids and targets and the loss; scratch */
    const double buffers = 1024.0 * 12 * 4096 + (1024.0 * 8 + 8) + 1024.0 * 4 * (4 * 4096 + 4096 + 8);
    CHECK_MSG(u.activations == (int64_t)llround(layers + logits + buffers) && gb1(u.activations) == 9.3,
              "activations %.3f GB", u.activations / 1e9); /* b=1, s=1024 */
    mps_plan_free(p);
    const double want[4] = { 0, 7.0, 10.5, 14.0 };
    for (int zero = 1; zero <= 3; zero++) {
        char text[64];
        snprintf(text, sizeof text, "dp=8,zero=%d", zero);
        L = layout_of(&cfg, text);
        p = plan_of(&cfg, &L, &o);
        int all = 1;
        for (int r = 0; r < 8; r++) {
            mps_plan_rank(p, r, &u);
            int64_t sharded = u.bytes[MPS_KIND_ADAM_M] + u.bytes[MPS_KIND_ADAM_V];
            if (zero >= 2) sharded += u.bytes[MPS_KIND_GRAD];
            if (zero >= 3) sharded += u.bytes[MPS_KIND_PARAM];
            all &= gb1(sharded) == want[zero];
            if (r == 0)
                printf("ZeRO-%d over 8 GPUs: %.3f GB sharded state per GPU (+ %.2f GB activations, not sharded)\n", zero,
                       sharded / 1e9, u.activations / 1e9);
            /* ZeRO does not shard activations: the lesson's 15 GB would need them divided by 8 too */
            if (zero == 3)
                CHECK(gb1(u.total) > 23.0);
        }
        CHECK_MSG(all, "ZeRO-%d: per-GPU figure is not %.1f GB", zero, want[zero]);
        mps_plan_free(p);
    }
}

static void test_activations_and_comm(void)
{
    mps_config gpt2;
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_config_preset("gpt2", &gpt2, &err) == 0);
    mps_plan_opts o;
    mps_plan_opts_default(&gpt2, &o);
    o.micro_batch = 2;
    o.seq = 1024;
    o.global_batch = 64;
    mps_layout L = layout_of(&gpt2, "pp=2,tp=2");
    const double s = 1024, b = 2, h = 768, a = 12, t = 2, sb = s * b;
    /* the trainer's per-layer buffers with tensor parallelism but no sequence parallelism: per
     * token 4 * (2h + 4 + a/t) bytes of fp32 input, residual, norm statistics and log-sum-exp,
     * and e * (2h + 12h/t) of operand buffers in the dtype of e bytes (norm outputs whole; qkv 3h/t,
     * attention output h/t, fc and its GELU 4h/t each); selective is the same (no scores stored);
     * full keeps the fp32 input, 4h */
    const double fp32_part = 4 * (2 * h + 4 + a / t);
    const double none4 = sb * (fp32_part + 4 * (2 * h + 12 * h / t)), none2 = sb * (fp32_part + 2 * (2 * h + 12 * h / t));
    const double full = sb * 4 * h;
    /* working buffers, stage 0 with m = 32 micro-batches, 2 in flight: per slot x_out, dx (fp32) and dx
     * in the dtype; the ids and targets of the step's 32 micro-batches and the loss's double;
     * scratch (N, max(h, 4h/t, 3h/t)) and (N, h + 8) floats; a ring of two fp32 send buffers
     * (N, h) to the next stage (stage 1: to the previous), however many micro-batches the step has */
    const double scratch = sb * 4 * (4 * h / t + h + 8) + 32 * sb * 8 + 8, send = 2 * sb * 4 * h;
    const double slot4 = sb * 12 * h, slot2 = sb * 10 * h;
    /* stage 0 holds 2 micro-batches of its 6 layers, stage 1 one and a micro-batch's logits: fp32,
     * (b, s, 50304 / 2) */
    const double logits = b * s * (50304 / 2) * 4;
    CHECK(mps_activation_bytes(&gpt2, &L, &o, 0) == (int64_t)llround(2 * 6 * none4 + 2 * slot4 + scratch + send));
    CHECK(mps_activation_bytes(&gpt2, &L, &o, 1) == (int64_t)llround(6 * none4 + slot4 + scratch + send + logits));
    o.precision = MPS_PRECISION_MIXED; /* bf16 operand buffers and logits */
    CHECK(mps_activation_bytes(&gpt2, &L, &o, 1) == (int64_t)llround(6 * none2 + slot2 + scratch + send + logits / 2));
    o.precision = MPS_PRECISION_FP32;
    o.recompute = MPS_RECOMPUTE_SELECTIVE;
    CHECK(mps_activation_bytes(&gpt2, &L, &o, 0) == (int64_t)llround(2 * 6 * none4 + 2 * slot4 + scratch + send));
    o.recompute = MPS_RECOMPUTE_FULL; /* and one layer recomputed whole, with its output */
    const double work = none4 + sb * 4 * h;
    CHECK(mps_activation_bytes(&gpt2, &L, &o, 0) == (int64_t)llround(2 * 6 * full + 2 * slot4 + scratch + send + work));
    o.global_batch = 2; /* one micro-batch per step: nothing else in flight, one send buffer, its ids */
    CHECK(mps_activation_bytes(&gpt2, &L, &o, 0) ==
          (int64_t)llround(6 * full + slot4 + scratch - 31 * sb * 8 + send / 2 + work));
    o.global_batch = 2048; /* 1024 micro-batches: still the ring of two (their ids do grow) */
    CHECK(mps_activation_bytes(&gpt2, &L, &o, 0) ==
          (int64_t)llround(2 * 6 * full + 2 * slot4 + scratch + (1024 - 32) * sb * 8 + send + work));

    /* communication: DP all-reduce of the whole model for dp=4, ZeRO 0 in fp32 = 2 * 3/4 * N * 4 bytes;
     * ZeRO 1 and 2 the same (reduce-scatter + all-gather), ZeRO 3 1.5 times (ZeRO paper) */
    mps_plan_opts_default(&gpt2, &o);
    int64_t dp_bytes[4];
    for (int zero = 0; zero <= 3; zero++) {
        char text[32];
        snprintf(text, sizeof text, "dp=4,zero=%d", zero);
        L = layout_of(&gpt2, text);
        mps_plan *p = plan_of(&gpt2, &L, &o);
        mps_comm_volume c;
        mps_plan_comm(p, 0, &c);
        dp_bytes[zero] = c.dp;
        CHECK(c.tp == 0 && c.pp == 0 && c.total == c.dp);
        mps_plan_free(p);
    }
    CHECK(dp_bytes[0] == (int64_t)llround(2 * 0.75 * (double)mps_param_count(&gpt2) * 4));
    CHECK(dp_bytes[1] == dp_bytes[0] && dp_bytes[2] == dp_bytes[0]);
    CHECK(llabs(dp_bytes[3] - dp_bytes[0] * 3 / 2) <= 2);
    L = layout_of(&gpt2, "dp=1");
    mps_plan *p = plan_of(&gpt2, &L, &o);
    mps_comm_volume c;
    mps_plan_comm(p, 0, &c);
    CHECK(c.total == 0);
    mps_plan_free(p);
    /* TP: m micro-batches * layers * 4 all-reduces * 2(t-1)/t * s*b*h * 4 bytes; PP: activations both ways */
    o.global_batch = 8;
    L = layout_of(&gpt2, "tp=4,pp=2,dp=2");
    p = plan_of(&gpt2, &L, &o);
    CHECK(mps_plan_microbatches(p) == 4);
    mps_plan_comm(p, mps_layout_rank(&L, 1, 0, 0), &c);
    double sbh = 1024.0 * 768;
    CHECK(c.tp == (int64_t)llround(4.0 * 6 * 4 * 2 * 3 / 4.0 * sbh * 4));
    mps_tensor_spec wte;
    mps_tensor_spec_get(&gpt2, MPS_TENSOR_WTE, &wte);
    CHECK(c.pp == (int64_t)llround(4 * sbh / 4 * 4 + mps_tensor_numel(&wte) / 4.0 * 4));
    CHECK(fabs(mps_plan_bubble(p) - 1.0 / 5) < 1e-12);
    mps_plan_free(p);
}

/* ZeRO's transients (mps_transient_bytes), by hand for gpt3-175b at tp=2, h = 12288. */
static void test_transient(void)
{
    mps_config big;
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_config_preset("gpt3-175b", &big, &err) == 0);
    const int64_t h = big.n_embd;
    /* per layer at tp=2: qkv w 3h*h/2, qkv b 3h/2, proj w h*h/2, fc w 4h*h/2, fc b 4h/2, fc2 w 4h*h/2
     * (split); ln1 w, b, proj b, ln2 w, b, fc2 b (h each, replicated) */
    const int64_t layer = 12 * h * h / 2 + 7 * h / 2 + 6 * h;
    /* none at ZeRO-1, none with one replica (nothing sharded or gathered); ZeRO-2: two layers'
     * gradients; ZeRO-3: and two layers' weights */
    static const char *const cases[] = { "dp=8,pp=4,tp=2,zero=1", "dp=1,pp=4,tp=2,zero=3", "dp=8,pp=4,tp=2,zero=2",
                                         "dp=8,pp=4,tp=2,zero=3" };
    mps_plan_opts mixed, fp32;
    mps_plan_opts_default(&big, &mixed);
    mixed.precision = MPS_PRECISION_MIXED;
    mps_plan_opts_default(&big, &fp32);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        mps_layout L = layout_of(&big, cases[i]);
        /* gradients in fp32 (the trainer accumulates them so), weights in bf16 (mixed) or fp32 */
        int64_t want = L.zero >= 2 && L.dp > 1 ? 2 * layer * 4 + (L.zero == 3 ? 2 * layer * 2 : 0) : 0;
        int64_t want32 = L.zero >= 2 && L.dp > 1 ? 2 * layer * 4 + (L.zero == 3 ? 2 * layer * 4 : 0) : 0;
        int64_t middle = mps_transient_bytes(&big, &L, &mixed, 1, 1);
        CHECK_MSG(middle == want, "%s: middle stage %lld, want %lld", cases[i], (long long)middle,
                  (long long)want);
        CHECK(mps_transient_bytes(&big, &L, &fp32, 2, 0) == want32);
        /* --no-overlap: the gradients of all the stage's 24 layers instead of two */
        mixed.no_overlap = 1;
        int64_t whole = L.zero >= 2 && L.dp > 1 ? 24 * layer * 4 + (L.zero == 3 ? 2 * layer * 2 : 0) : 0;
        CHECK_MSG(mps_transient_bytes(&big, &L, &mixed, 1, 1) == whole, "%s --no-overlap: %lld, want %lld", cases[i],
                  (long long)mps_transient_bytes(&big, &L, &mixed, 1, 1), (long long)whole);
        mixed.no_overlap = 0;
        if (L.zero >= 2 && L.dp > 1) {
            /* the first stage adds wte's TP box (vocab rows split in 2) and wpe (replicated) */
            int64_t outside = big.padded_vocab / 2 * h + (int64_t)big.n_positions * h;
            int64_t gathered = outside + layer > 2 * layer ? outside + layer : 2 * layer; /* here 2 layers */
            int64_t first = (2 * layer + outside) * 4 + (L.zero == 3 ? gathered * 2 : 0);
            int64_t got = mps_transient_bytes(&big, &L, &mixed, 0, 0);
            CHECK_MSG(got == first, "%s: first stage %lld, want %lld", cases[i], (long long)got, (long long)first);
        }
    }
}

/* --suggest for gpt3-175b on 64 GPUs of 80 GiB: only layouts whose every rank fits, the same
 * verdict as the plain plan for dp=8,pp=4,tp=2,zero=2, fastest (estimated) first. */
static void test_suggest(void)
{
    mps_config big;
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_config_preset("gpt3-175b", &big, &err) == 0);
    const int64_t budget = (int64_t)80 << 30;
    for (int rec = 0; rec < 3; rec += 2) { /* no recompute: the lesson layout does not fit; full: it does */
        mps_plan_opts o;
        mps_plan_opts_default(&big, &o);
        o.precision = MPS_PRECISION_MIXED;
        o.recompute = (mps_recompute)rec;
        mps_suggestion *list;
        int n, considered;
        CHECK(mps_plan_suggest(&big, 64, budget, &o, &list, &n, &considered, &err) == 0);
        /* tp in {1,2,4,8,16,32} (divides 96 heads), pp any divisor of 64/tp, zero 0..3 when dp > 1 */
        int expect = 0;
        for (int tp = 1; tp <= 64; tp *= 2)
            for (int pp = 1; tp <= 32 && pp <= 64 / tp; pp *= 2)
                expect += 64 / tp / pp > 1 ? 4 : 1;
        CHECK_MSG(considered == expect, "considered %d layouts, expected %d", considered, expect);
        int lesson_listed = 0, every_fits = 1, sorted = 1;
        for (int i = 0; i < n; i++) {
            mps_plan_opts po = o;
            po.global_batch = 64; /* what suggest uses: 64 GPUs x micro-batch 1 */
            mps_plan *p = plan_of(&big, &list[i].layout, &po);
            every_fits &= mps_plan_over_budget(p, budget) == 0 && list[i].peak == mps_plan_peak(p, NULL);
            mps_plan_free(p);
            const mps_layout *l = &list[i].layout;
            lesson_listed |= l->dp == 8 && l->pp == 4 && l->tp == 2 && l->zero == 2;
            if (i > 0) /* fastest first by the step-time estimate (no longer the fewest bytes sent) */
                sorted &= list[i - 1].est.step_s <= list[i].est.step_s;
        }
        CHECK(every_fits && sorted);
        mps_layout L = layout_of(&big, "dp=8,pp=4,tp=2,zero=2");
        mps_plan *p = plan_of(&big, &L, &o);
        int fits = mps_plan_over_budget(p, budget) == 0;
        CHECK_MSG(fits == lesson_listed, "recompute %s: plain plan says %s, suggest %s", mps_recompute_name(o.recompute),
                  fits ? "fits" : "over", lesson_listed ? "lists it" : "does not");
        /* over 80 GiB either way: full recomputation takes the first stage's activations down to
         * 11.9 GB (its fp32 layer inputs, 4 in flight x 24 layers, whole on each TP rank without
         * sequence parallelism: 9.7 GB; a layer recomputed, the slots', scratch and send buffers),
         * but 44.2 GB of bf16 weights, 44.2 GB of ZeRO-2-sharded fp32 state, ZeRO-2's full fp32
         * gradients of two layers and of wte (8.6 GB) and the runtime keep its peak at 109.4 GB
         * (101.9 GiB) */
        CHECK(!fits);
        if (rec == MPS_RECOMPUTE_FULL)
            CHECK(mps_plan_peak(p, NULL) > budget + ((int64_t)21 << 30) &&
                  mps_plan_peak(p, NULL) < budget + ((int64_t)22 << 30));
        printf("gpt3-175b on 64 x 80 GiB, recompute %s: %d of %d layouts fit; dp=8,pp=4,tp=2,zero=2 peak %.2f GB\n",
               mps_recompute_name(o.recompute), n, considered, mps_plan_peak(p, NULL) / 1e9);
        mps_plan_free(p);
        free(list);
    }
    mps_suggestion *list;
    int n, considered;
    mps_plan_opts o;
    mps_plan_opts_default(&big, &o);
    CHECK(mps_plan_suggest(&big, 64, (int64_t)1 << 30, &o, &list, &n, &considered, &err) == 0 && n == 0);
    free(list);
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void test_time_1024(void)
{
    mps_config big;
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_config_preset("gpt3-175b", &big, &err) == 0);
    mps_layout L = layout_of(&big, "dp=16,pp=8,tp=8,zero=3");
    mps_plan_opts o;
    mps_plan_opts_default(&big, &o);
    double best = 1e9;
    for (int i = 0; i < 3; i++) {
        double t0 = now_ms();
        mps_plan *p = plan_of(&big, &L, &o);
        mps_plan_peak(p, NULL);
        mps_comm_volume c;
        mps_plan_comm_max(p, &c, NULL);
        mps_plan_free(p);
        double ms = now_ms() - t0;
        best = ms < best ? ms : best;
    }
    printf("gpt3-175b over 1024 ranks planned in %.2f ms\n", best);
    CHECK_MSG(best < 100, "%.1f ms", best);
}

/* Where the text element that reads `label` starts (about 7.5 px per character at 13 px; -1 if
 * there is none), and the right edge of the bars. */
static double svg_text_x(const char *svg, const char *label)
{
    char needle[128];
    snprintf(needle, sizeof needle, ">%s</text>", label);
    const char *hit = strstr(svg, needle);
    if (!hit)
        return -1;
    const char *start = hit;
    while (start > svg && strncmp(start, "<text ", 6) != 0)
        start--;
    double x = -1;
    if (sscanf(start, "<text x=\"%lf\"", &x) != 1)
        return -1;
    const char *anchor = strstr(start, "text-anchor=\"");
    double width = 7.5 * (double)strlen(label);
    if (anchor && anchor < hit && strncmp(anchor + 13, "end", 3) == 0)
        return x - width;
    if (anchor && anchor < hit && strncmp(anchor + 13, "middle", 6) == 0)
        return x - width / 2;
    return x;
}

static double svg_bars_right(const char *svg)
{
    double right = 0;
    for (const char *g = svg; (g = strstr(g, "<g><title>rank ")); g++) {
        const char *end = strstr(g, "</g>");
        for (const char *r = g; (r = strstr(r, "<rect ")) && r < end; r++) {
            double x, y, w;
            if (sscanf(r, "<rect x=\"%lf\" y=\"%lf\" width=\"%lf\"", &x, &y, &w) == 3 && x + w > right)
                right = x + w;
        }
    }
    return right;
}

static void test_svg(const char *dir)
{
    mps_layout L = layout_of(&small, "dp=2,pp=3,tp=2,zero=2");
    mps_plan_opts o;
    mps_plan_opts_default(&small, &o);
    o.precision = MPS_PRECISION_MIXED;
    mps_plan *p = plan_of(&small, &L, &o);
    char path[1100];
    snprintf(path, sizeof path, "%s/chart.svg", dir);
    mps_svg_opts so = { .title = "small <model> & layout", .gpu_mem = 2000000 };
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_svg_write_plan(path, p, &so, &err) == 0);
    FILE *f = fopen(path, "r");
    static char text[1 << 20];
    size_t n = f ? fread(text, 1, sizeof text - 1, f) : 0;
    text[n] = '\0';
    if (f)
        fclose(f);
    CHECK(strstr(text, "<svg") && strstr(text, "</svg>"));
    CHECK(strstr(text, "small &lt;model&gt; &amp; layout")); /* escaped */
    static const char *const labels[] = { "parameters", "gradients", "fp32 master", "Adam m", "Adam v", "activations",
                                          "ZeRO transient", "CUDA runtime", "memory per GPU", "rank (12 ranks", "GPU memory" };
    for (size_t i = 0; i < sizeof labels / sizeof labels[0]; i++)
        CHECK_MSG(strstr(text, labels[i]) != NULL, "chart lacks '%s'", labels[i]);
    int bars = 0;
    for (const char *s = text; (s = strstr(s, "<title>rank ")); s++)
        bars++;
    CHECK(bars == 12);
    int rects = 0;
    for (const char *s = text; (s = strstr(s, "<rect")); s++)
        rects++;
    CHECK(rects == 1 + 12 * 8 + 8); /* background, 8 segments per bar (mixed: master, runtime; ZeRO-2: transient), legend */
    /* the budget line says what was given (80 GiB, not the 85.9 GB of the GB axis), and its label
     * sits right of every bar and left of the legend, whatever the bars' height */
    so.gpu_mem = (int64_t)80 << 30;
    so.gpu_mem_label = "80 GiB";
    CHECK(mps_svg_write_plan(path, p, &so, &err) == 0);
    f = fopen(path, "r");
    n = f ? fread(text, 1, sizeof text - 1, f) : 0;
    text[n] = '\0';
    if (f)
        fclose(f);
    double label_x = svg_text_x(text, "GPU memory 80 GiB"), legend_x = svg_text_x(text, "legend");
    CHECK_MSG(label_x > svg_bars_right(text) && legend_x > label_x + 7.5 * strlen("GPU memory 80 GiB"),
              "budget label at x %.1f, bars end at %.1f, legend at %.1f", label_x, svg_bars_right(text), legend_x);
    CHECK(!strstr(text, "85.9"));
    so.gpu_mem = 0;
    snprintf(path, sizeof path, "%s/no-such-dir/chart.svg", dir);
    mps_err_clear(&err);
    CHECK(mps_svg_write_plan(path, p, &so, &err) != 0 && err.code == MPS_EIO && strstr(err.msg, "--svg"));
    mps_plan_free(p);
}

static void test_errors(void)
{
    mps_layout L = layout_of(&small, "dp=2");
    mps_plan_opts o;
    mps_plan_opts_default(&small, &o);
    o.micro_batch = 0;
    mps_plan *p;
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_plan_build(&small, &L, &o, &p, &err) != 0 && err.code == MPS_EUSAGE && strstr(err.msg, "--micro-batch"));
    mps_config big;
    CHECK(mps_config_preset("gpt3-175b", &big, &err) == 0);
    mps_layout L1 = layout_of(&big, "dp=1");
    mps_plan_opts_default(&big, &o);
    o.seq = (int64_t)1 << 24;
    o.micro_batch = 1 << 20; /* 2^44 tokens x 96 layers x 0.8 MB a token and layer: past int64 */
    mps_err_clear(&err);
    CHECK(mps_plan_build(&big, &L1, &o, &p, &err) != 0 && strstr(err.msg, "overflows"));
    CHECK(mps_precision_from_name("bf16") < 0 && mps_precision_from_name("mixed") == MPS_PRECISION_MIXED);
    CHECK(mps_recompute_from_name("full") == MPS_RECOMPUTE_FULL && mps_recompute_from_name("all") < 0);
    CHECK(mps_kind_bytes(MPS_PRECISION_FP32, MPS_KIND_MASTER) == 0 && mps_kind_bytes(MPS_PRECISION_MIXED, MPS_KIND_PARAM) == 2);
}

/* Llama-2-7B over dp=8 in mixed precision follows the ZeRO paper's model-state formulas per GPU
 * with fp32 gradients (Megatron-LM's 18 bytes a parameter), with P the parameters (vocabulary
 * padding included) and N = 8: stage 0 18P (2 weights + 4 gradients + 12 fp32 master, m, v),
 * stage 1 6P + 12P/N, stage 2 2P + 16P/N, stage 3 18P/N. Every
 * rank's state equals the formula within the one element a balanced split of a tensor adds. Also:
 * the activations of the Llama block (no attention scores under selective recompute) and the fast
 * plan against the direct one, and --suggest lists only tp that divide the 32 kv heads. */
static void test_llama_zero(void)
{
    mps_config cfg;
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_config_preset("llama-2-7b", &cfg, &err) == 0);
    const double P = (double)mps_param_count(&cfg), N = 8;
    CHECK(fabs(P - 6.7384e9) < 0.0001e9);
    mps_plan_opts o;
    mps_plan_opts_default(&cfg, &o);
    o.precision = MPS_PRECISION_MIXED;
    o.seq = 4096;
    const double want[4] = { 18 * P, 6 * P + 12 * P / N, 2 * P + 16 * P / N, 18 * P / N };
    for (int zero = 0; zero <= 3; zero++) {
        char text[64];
        snprintf(text, sizeof text, "dp=8,zero=%d", zero);
        mps_layout L = layout_of(&cfg, text);
        mps_plan *p = plan_of(&cfg, &L, &o);
        double worst = 0;
        for (int r = 0; r < 8; r++) {
            mps_rank_usage u;
            mps_plan_rank(p, r, &u);
            double state = 0;
            for (int k = 0; k < MPS_KIND_COUNT; k++)
                state += (double)u.bytes[k];
            worst = fmax(worst, fabs(state - want[zero]));
        }
        /* a rank's share of each of the 291 tensors is at most one element (18 bytes) off P/N */
        CHECK_MSG(worst <= 291 * 18, "ZeRO-%d: a rank is %.0f bytes off %.4f GB", zero, worst, want[zero] / 1e9);
        printf("llama-2-7b ZeRO-%d over 8 GPUs: %.3f GB of model state per GPU\n", zero, want[zero] / 1e9);
        mps_plan_free(p);
    }
    /* activations per layer and token, selective recompute (no scores either way), tp=2, bf16:
     * 4 * (2h + 4 + heads/t) of fp32 and 2 * (2h + qkv + h/t + 2F/t + F/t) of operand buffers, qkv =
     * (heads + 2 kv heads)/t x 128; stage 0 holds 2 micro-batches... of one (global batch 1) */
    o.recompute = MPS_RECOMPUTE_SELECTIVE;
    o.micro_batch = 1;
    o.global_batch = 1;
    mps_layout L = layout_of(&cfg, "pp=2,tp=2");
    const double s = 4096, h = 4096, F = 11008, qkv = (16 + 2 * 16) * 128.0;
    const double layer = s * (4 * (2 * h + 4 + 16) + 2 * (2 * h + qkv + h / 2 + 3 * F / 2));
    /* one slot (x_out, dx fp32, dx bf16), the step's ids and the loss, scratch (N, max(F/t, qkv) + h)
     * and (N, h + 8) floats, one send buffer to the other stage */
    const double buffers = s * 10 * h + (s * 8 + 8) + s * 4 * (qkv + h) + s * 4 * (h + 8) + s * 4 * h;
    const double logits = s * (32000 / 2) * 2; /* bf16 logits of the half vocabulary */
    CHECK(mps_activation_bytes(&cfg, &L, &o, 0) == (int64_t)llround(16 * layer + buffers));
    CHECK(mps_activation_bytes(&cfg, &L, &o, 1) == (int64_t)llround(16 * layer + buffers + logits));
    mps_config gqa;
    CHECK(mps_config_preset("llama-2-70b", &gqa, &err) == 0);
    mps_suggestion *list;
    int n, considered;
    CHECK(mps_plan_suggest(&gqa, 64, (int64_t)80 << 30, &o, &list, &n, &considered, &err) == 0);
    for (int i = 0; i < n; i++)
        CHECK(8 % list[i].layout.tp == 0);
    free(list);
}

int main(void)
{
    const char *dir = test_tmpdir("inspect");
    char model_dir[1100], model[1200];
    snprintf(model_dir, sizeof model_dir, "%s/model", dir);
    snprintf(model, sizeof model, "%s/model.safetensors", model_dir);
    mps_err err;
    mps_err_clear(&err);
    CHECK_MSG(mps_synth_write(model_dir, &small, MPS_FILE_SAFETENSORS, MPS_DTYPE_F32, 5, &err) == 0, "%s", err.msg);
    test_fast_equals_direct();
    test_checkpoint_holdings(model, dir);
    test_lesson_7b();
    test_llama_zero();
    test_activations_and_comm();
    test_transient();
    test_suggest();
    test_time_1024();
    test_svg(dir);
    test_errors();
    if (!test_failures) {
        char cmd[1200];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
        if (system(cmd) != 0)
            fprintf(stderr, "could not remove %s\n", dir);
    }
    TEST_DONE();
}
