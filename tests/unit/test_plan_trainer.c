/* The memory planner against the trainer it plans: the engine is built on the CPU backend with an
 * allocator that counts every byte the engine asks of the backend (what becomes device memory on
 * the CUDA backend), one step's gradients are computed, and the peak of the live bytes is compared
 * with `mps_plan_rank`'s fp32 total for the same model, layout and batch shape. The plan must
 * agree to within the few buffers it leaves out on purpose: per micro-batch slot the (C) column
 * sums of the residual gradient, and the Llama block's rotary table (T x head size floats).
 * Layouts of several ranks (dp, tp, pp) are checked rank by rank on engines built but not stepped
 * (building one does not communicate): what they allocate plus the gradients the first backward
 * allocates (whole TP boxes at ZeRO-0 and 1), against each rank's plan; at ZeRO-2 and 3 the
 * plan's transients are what the step adds (per layer), so the built engine must hold the rest. */
#include "testutil.h"
#include "train_fixture.h"

#include "arch.h"
#include "inspect/plan.h"

/* Live and peak bytes of the backend's allocations; each block carries its size in a header. */
typedef struct {
    int64_t live, peak;
} alloc_count;

#define HDR 16 /* keeps the blocks 16-byte aligned, as calloc's */

static void *count_alloc(void *ctx, size_t bytes)
{
    alloc_count *c = (alloc_count *)ctx;
    char *p = calloc(1, HDR + (bytes ? bytes : 1));
    if (!p)
        return NULL;
    memcpy(p, &bytes, sizeof bytes);
    c->live += (int64_t)bytes;
    if (c->live > c->peak)
        c->peak = c->live;
    return p + HDR;
}

static void count_release(void *ctx, void *p)
{
    if (!p)
        return;
    alloc_count *c = (alloc_count *)ctx;
    size_t bytes;
    memcpy(&bytes, (char *)p - HDR, sizeof bytes);
    c->live -= (int64_t)bytes;
    free((char *)p - HDR);
}

/* The CPU backend with its allocations counted in *count (its operations ignore their context). */
static void counting_cpu_backend(mps_backend *be, alloc_count *count)
{
    mps_backend_cpu(be);
    *count = (alloc_count){ 0, 0 };
    be->ctx = count;
    be->alloc = count_alloc;
    be->release = count_release;
}

static mps_train_opts train_opts(int micro_batch, int seq, int global_batch, int recompute)
{
    return (mps_train_opts){ .micro_batch = micro_batch, .seq = seq, .global_batch = global_batch, .lr = 1e-3f,
                             .lr_min = 1e-3f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .recompute = recompute };
}

static mps_plan_opts plan_opts(const mps_config *cfg, int micro_batch, int seq, int global_batch, int recompute)
{
    mps_plan_opts po;
    mps_plan_opts_default(cfg, &po);
    po.micro_batch = micro_batch;
    po.seq = seq;
    po.global_batch = global_batch;
    po.recompute = recompute ? MPS_RECOMPUTE_FULL : MPS_RECOMPUTE_NONE;
    return po;
}

/* What the plan leaves out: a (C) column sum per micro-batch slot, the rotary table (T x head size). */
static int64_t not_planned(const mps_config *cfg, int nslots, int seq)
{
    const int64_t rope = cfg->arch == MPS_ARCH_LLAMA ? (int64_t)seq * mps_cfg_head_dim(cfg) * 4 : 0;
    return (int64_t)nslots * cfg->n_embd * 4 + rope;
}

/* One engine on the counting CPU backend; the peak after one step's gradients against the plan. */
static void check_shape(const char *config, int micro_batch, int seq, int global_batch, int recompute,
                        const char *dir)
{
    mps_err err;
    mps_err_clear(&err);
    mps_config cfg;
    CHECK(mps_config_parse(config, &cfg, &err) == 0);
    mps_layout L;
    CHECK(mps_layout_parse("dp=1", &cfg, &L, &err) == 0);
    char path[1100];
    snprintf(path, sizeof path, "%s/plan-tokens.bin", dir);
    CHECK(mps_tokens_write_synthetic(path, 4000, cfg.vocab, 11, &err) == 0);
    mps_tokens *data = NULL;
    CHECK(mps_tokens_open(path, seq, cfg.vocab, &data, &err) == 0);
    mps_comm comm;
    mps_comm_self(&comm);
    mps_backend be;
    alloc_count count;
    counting_cpu_backend(&be, &count);
    mps_train_opts o = train_opts(micro_batch, seq, global_batch, recompute);
    mps_engine *e = NULL;
    int rc = data ? mps_engine_new(&cfg, &L, &comm, &be, &o, &e, &err) : -1;
    CHECK_MSG(rc == 0, "%s: %s", config, err.msg);
    if (rc == 0) {
        double loss, norm;
        CHECK(mps_engine_grads(e, data, 0, &loss, &norm, &err) == 0);
        mps_plan_opts po = plan_opts(&cfg, micro_batch, seq, global_batch, recompute);
        mps_plan *plan = NULL;
        CHECK(mps_plan_build(&cfg, &L, &po, &plan, &err) == 0);
        if (plan) {
            mps_rank_usage u;
            mps_plan_rank(plan, 0, &u);
            const int64_t left_out = not_planned(&cfg, 1, seq); /* pp = 1: one micro-batch in flight */
            CHECK_MSG(count.peak == u.total + left_out,
                      "%s, b %d s %d G %d recompute %d: the engine's peak %lld bytes, the plan %lld + %lld left out",
                      config, micro_batch, seq, global_batch, recompute, (long long)count.peak, (long long)u.total,
                      (long long)left_out);
            printf("%s, b=%d s=%d G=%d%s: engine peak %lld bytes, plan %lld (+%lld not planned)\n", config, micro_batch,
                   seq, global_batch, recompute ? " recompute" : "", (long long)count.peak, (long long)u.total,
                   (long long)left_out);
            mps_plan_free(plan);
        }
        mps_engine_free(e);
        CHECK_MSG(count.live == 0, "%lld bytes not released", (long long)count.live);
    }
    if (data)
        mps_tokens_close(data);
    remove(path);
}

/* Every rank of `layout`: the engine's buffers once built, plus its gradients (ZeRO-0, 1), or
 * without the step's transients (ZeRO-2, 3). */
static void check_layout_schedule(const char *config, const char *layout, int micro_batch, int seq, int global_batch,
                                  int gpipe)
{
    mps_err err;
    mps_err_clear(&err);
    mps_config cfg;
    CHECK(mps_config_parse(config, &cfg, &err) == 0);
    mps_layout L;
    CHECK(mps_layout_parse(layout, &cfg, &L, &err) == 0);
    mps_plan_opts po = plan_opts(&cfg, micro_batch, seq, global_batch, 0);
    po.gpipe = gpipe;
    mps_plan *plan = NULL;
    CHECK(mps_plan_build(&cfg, &L, &po, &plan, &err) == 0);
    const int world = mps_layout_world(&L);
    for (int r = 0; plan && r < world; r++) {
        mps_comm comm;
        mps_comm_self(&comm);
        comm.rank = r;
        comm.size = world;
        mps_backend be;
        alloc_count count;
        counting_cpu_backend(&be, &count);
        mps_train_opts o = train_opts(micro_batch, seq, global_batch, 0);
        o.schedule = gpipe ? MPS_SCHED_GPIPE : MPS_SCHED_1F1B;
        mps_engine *e = NULL;
        int rc = mps_engine_new(&cfg, &L, &comm, &be, &o, &e, &err);
        CHECK_MSG(rc == 0, "%s %s rank %d: %s", config, layout, r, err.msg);
        if (rc != 0)
            break;
        int64_t grads = 0;
        for (int t = 0; L.zero <= 1 && t < e->ntensors; t++)
            if (e->t[t].held)
                grads += e->t[t].box_n * 4;
        mps_rank_usage u;
        mps_plan_rank(plan, r, &u);
        if (L.zero >= 2)
            u.total -= u.transient;
        const int64_t left_out = not_planned(&cfg, e->nslots, seq);
        CHECK_MSG(count.live + grads == u.total + left_out,
                  "%s %s rank %d (stage %d, tp %d): the engine's %lld + %lld bytes of gradients, the plan %lld + %lld",
                  config, layout, r, u.at.pp, u.at.tp, (long long)count.live, (long long)grads, (long long)u.total,
                  (long long)left_out);
        mps_engine_free(e);
        CHECK(count.live == 0);
    }
    printf("%s %s, b=%d s=%d G=%d%s: every rank's buffers and gradients are its plan\n", config, layout,
           micro_batch, seq, global_batch, gpipe ? " gpipe" : "");
    mps_plan_free(plan);
}

static void check_layout(const char *config, const char *layout, int micro_batch, int seq, int global_batch)
{
    check_layout_schedule(config, layout, micro_batch, seq, global_batch, 0);
}

int main(void)
{
    const char *dir = test_tmpdir("plan_trainer");
    if (!dir)
        return 1;
    static const char *gpt2 = "n_layer=3,n_embd=48,n_head=4,vocab=300,n_positions=32";
    static const char *llama =
        "arch=llama,n_layer=2,n_embd=64,n_head=8,n_kv_head=2,ffn=176,vocab=250,n_positions=32,tied=0";
    check_shape(gpt2, 2, 16, 4, 0, dir);
    check_shape(gpt2, 3, 32, 6, 1, dir);
    check_shape(llama, 2, 16, 4, 0, dir);
    check_shape(llama, 1, 32, 3, 1, dir);
    /* the pipeline's slots (pp - stage in flight; GPipe: every micro-batch of the step, also without
     * a pipeline) and send buffers (a ring of two to each neighbour), TP's split widths, the logits on
     * the last stage, the tied wte there */
    check_layout(gpt2, "pp=2,tp=2", 2, 16, 8);
    check_layout(gpt2, "pp=3", 1, 32, 5);
    check_layout_schedule(gpt2, "pp=3", 1, 32, 5, 1);
    check_layout_schedule(llama, "dp=1", 1, 32, 3, 1);
    check_layout(llama, "pp=2,tp=2", 2, 16, 6);
    /* ZeRO over dp = 2 (the shards are uneven: 1 element off per tensor, the plan counts each rank's) */
    check_layout(gpt2, "dp=2,zero=1", 2, 16, 8);
    check_layout(gpt2, "dp=2,pp=2,zero=2", 1, 16, 4);
    check_layout(llama, "dp=2,tp=2,zero=3", 2, 16, 8);
    check_layout(llama, "dp=3,zero=1", 1, 16, 6);
    rmdir(dir);
    TEST_DONE();
}
