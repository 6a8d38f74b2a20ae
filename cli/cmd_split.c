/* mpshard split: a checkpoint for a new number of GPUs. The planner's candidates of exactly N ranks
 * that fit the GPU memory, the fastest by the step-time estimate (inspect/estimate.h), then the same
 * reshard as `mpshard reshard --layout`. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckpt.h"
#include "cli.h"
#include "inspect/plan.h"
#include "reshard/reshard.h"
#include "units.h"

static const char *const help =
    "usage: mpshard split SRC --gpus N -o DST [options]\n"
    "\n"
    "Reshards checkpoint SRC (any layout; parameters and optimizer state, bit for bit, as `mpshard\n"
    "reshard`) into the layout for N GPUs that the planner (`mpshard inspect`) expects to train\n"
    "fastest among those of exactly N ranks whose every rank fits --gpu-mem: estimated step time =\n"
    "compute + pipeline bubble + communication over NVLink or InfiniBand (docs/inspect.md). Prints the\n"
    "layout, its peak memory per rank and the runners-up, then writes DST. The ZeRO stage is SRC's\n"
    "unless --zero. Under `mpirun -np K mpshard split ...` the K processes split the target files.\n"
    "\n"
    "  --gpus N          GPUs of the new layout (dp x pp x tp = N)\n"
    "  -o, --out DST     output checkpoint directory\n"
    "  --gpu-mem M       memory per GPU, e.g. 80GiB or 40GB (default 80GB: an 80 GB card less the room\n"
    "                    the plan does not count; the GPU of this machine is not probed)\n"
    "  --micro-batch B   sequences per micro-batch the layout must hold (default 1)\n"
    "  --seq T           tokens per sequence (default: the model's n_positions, or its sliding window)\n"
    "  --global-batch G  sequences per optimizer step (default N x micro-batch)\n"
    "  --precision P     fp32 (default) or mixed, as `mpshard inspect`\n"
    "  --recompute R     none (default), selective or full, as `mpshard inspect`\n"
    "  --no-overlap      plan `train --no-overlap` (ZeRO-2/3 hold the stage's full gradients)\n"
    "  --schedule S      1f1b (default) or gpipe, as `mpshard train` will run\n"
    "  --zero Z          ZeRO stage of DST, 0..3 (default: SRC's)\n"
    "  --layout L        write layout L (dp x pp x tp = N) instead of the planner's choice\n"
    "  --dry-run         print the choice and stop: nothing is written\n"
    "  --top K           runners-up shown (default 3)\n"
    "  --memory-mb N     memory budget of the reshard (default 512)\n"
    "  --threads N       worker threads (default: all cores, within the budget)\n"
    "  --force           replace an existing committed checkpoint at DST\n"
    "  -q, --quiet       no progress on stderr\n"
    "\n"
    "Exit 1 when no layout of N GPUs fits --gpu-mem (one line says the smallest peak).\n";

typedef struct {
    const char *src, *out, *layout, *gpu_mem_text;
    int64_t gpus, gpu_mem, top;
    int zero, seq_set, dry_run;
    mps_plan_opts po;
    mps_reshard_opts ro;
} split_args;

static int parse_args(int argc, char **argv, split_args *a)
{
    static const struct option opts[] = {
        { "gpus", required_argument, 0, 'g' }, { "out", required_argument, 0, 'o' },
        { "gpu-mem", required_argument, 0, 'm' }, { "micro-batch", required_argument, 0, 'b' },
        { "seq", required_argument, 0, 's' }, { "global-batch", required_argument, 0, 'G' },
        { "precision", required_argument, 0, 'p' }, { "recompute", required_argument, 0, 'R' },
        { "no-overlap", no_argument, 0, 'O' }, { "zero", required_argument, 0, 'z' },
        { "schedule", required_argument, 0, 'P' },
        { "layout", required_argument, 0, 'L' }, { "dry-run", no_argument, 0, 'n' },
        { "top", required_argument, 0, 'k' }, { "memory-mb", required_argument, 0, 'M' },
        { "threads", required_argument, 0, 't' }, { "force", no_argument, 0, 'F' },
        { "quiet", no_argument, 0, 'q' }, { "help", no_argument, 0, 'h' }, { 0, 0, 0, 0 },
    };
    memset(a, 0, sizeof *a);
    a->zero = -1;
    a->top = 3;
    a->gpu_mem_text = "80GB";
    a->po.micro_batch = 1;
    a->ro.zero = -1;
    int c, v;
    int64_t n;
    optind = 1;
    while ((c = getopt_long(argc, argv, "o:qh", opts, NULL)) != -1) {
        switch (c) {
        case 'g': if (cli_int("split", "--gpus", optarg, 1, 1 << 24, &a->gpus)) return MPS_EUSAGE; break;
        case 'o': a->out = optarg; break;
        case 'm': a->gpu_mem_text = optarg; break;
        case 'b': if (cli_int("split", "--micro-batch", optarg, 1, 1 << 20, &a->po.micro_batch)) return MPS_EUSAGE; break;
        case 's': if (cli_int("split", "--seq", optarg, 1, 1 << 24, &a->po.seq)) return MPS_EUSAGE; a->seq_set = 1; break;
        case 'G': if (cli_int("split", "--global-batch", optarg, 1, (int64_t)1 << 40, &a->po.global_batch)) return MPS_EUSAGE; break;
        case 'p':
            if ((v = mps_precision_from_name(optarg)) < 0)
                return cli_usage("split", "--precision '%s': expected fp32 or mixed", optarg);
            a->po.precision = (mps_precision)v;
            break;
        case 'R':
            if ((v = mps_recompute_from_name(optarg)) < 0)
                return cli_usage("split", "--recompute '%s': expected none, selective or full", optarg);
            a->po.recompute = (mps_recompute)v;
            break;
        case 'O': a->po.no_overlap = 1; break;
        case 'P': if (cli_schedule("split", optarg, &a->po.gpipe)) return MPS_EUSAGE; break;
        case 'z': if (cli_int("split", "--zero", optarg, 0, 3, &n)) return MPS_EUSAGE; a->zero = (int)n; break;
        case 'L': a->layout = optarg; break;
        case 'n': a->dry_run = 1; break;
        case 'k': if (cli_int("split", "--top", optarg, 0, 1 << 20, &a->top)) return MPS_EUSAGE; break;
        case 'M': if (cli_int("split", "--memory-mb", optarg, 64, 1 << 20, &n)) return MPS_EUSAGE; a->ro.memory_budget = n << 20; break;
        case 't': if (cli_int("split", "--threads", optarg, 1, 1024, &n)) return MPS_EUSAGE; a->ro.threads = (int)n; break;
        case 'F': a->ro.force = 1; break;
        case 'q': a->ro.quiet = 1; break;
        case 'h': fputs(help, stdout); return -1;
        default: return MPS_EUSAGE;
        }
    }
    if (optind != argc - 1)
        return cli_usage("split", "expected one source checkpoint SRC");
    a->src = argv[optind];
    if (cli_parse_size(a->gpu_mem_text, &a->gpu_mem) != 0)
        return cli_usage("split", "--gpu-mem '%s': expected a size such as 80GiB or 40GB", a->gpu_mem_text);
    if (!a->gpus && !a->layout)
        return cli_usage("split", "--gpus N is required");
    if (!a->out && !a->dry_run)
        return cli_usage("split", "-o DST is required (or --dry-run)");
    return 0;
}

/* "dp=2,pp=2,tp=2,zero=1", with stages= only where they were given. */
static const char *layout_text(char *buf, size_t size, const mps_layout *L)
{
    mps_layout_format(L, buf, size);
    char *stages = strstr(buf, ",stages=");
    if (stages && !L->explicit_stages)
        *stages = '\0';
    return buf;
}

#define FMT(b) cli_fmt_bytes((char[32]){ 0 }, 32, (b), 0)
#define SECS(t) cli_fmt_seconds((char[32]){ 0 }, 32, (t))

static void print_header(void)
{
    printf("%-10s %-26s %10s %10s %10s %10s %10s\n", "", "layout", "peak/rank", "est. step", "compute", "bubble",
           "comm");
}

static void print_layout(const char *tag, const mps_suggestion *s, const char *note)
{
    char text[4096];
    printf("%-10s %-26s %10s %10s %10s %10s %10s%s\n", tag, layout_text(text, sizeof text, &s->layout), FMT(s->peak),
           SECS(s->est.step_s), SECS(s->est.compute_s), SECS(s->est.bubble_s), SECS(s->est.comm_s), note);
}

/* The planner's figures for one layout, as a suggestion. */
static int plan_layout(const mps_config *cfg, const mps_layout *L, const mps_plan_opts *po, mps_suggestion *s,
                       mps_err *err)
{
    mps_plan *plan;
    if (mps_plan_build(cfg, L, po, &plan, err) != 0)
        return -1;
    memset(s, 0, sizeof *s);
    s->layout = *mps_plan_layout(plan);
    s->peak = mps_plan_peak(plan, &s->peak_rank);
    mps_plan_comm_max(plan, &s->comm, &s->comm_rank);
    s->microbatches = mps_plan_microbatches(plan);
    s->bubble = mps_plan_bubble(plan);
    mps_estimate_step(plan, NULL, &s->est);
    mps_plan_free(plan);
    return 0;
}

/* Chooses the layout (or plans --layout) and prints the choice; *chosen is the layout to write. */
static int choose(split_args *a, const mps_manifest *m, int print, mps_layout *chosen, mps_err *err)
{
    const mps_config *cfg = &m->cfg;
    mps_plan_opts po = a->po;
    if (!a->seq_set)
        po.seq = mps_cfg_max_seq(cfg);
    mps_layout given;
    if (a->layout) {
        if (mps_layout_parse(a->layout, cfg, &given, err) != 0)
            return -1;
        int world = mps_layout_world(&given);
        if (a->gpus && world != a->gpus)
            return mps_fail(err, MPS_EUSAGE, "--layout %s has %d ranks, --gpus %lld", a->layout, world,
                            (long long)a->gpus);
        a->gpus = world;
        if (a->zero >= 0)
            given.zero = a->zero;
        else if (!strstr(a->layout, "zero"))
            given.zero = m->layout.zero; /* the layout string's default, 0, is not a choice of the user's */
    }
    const int zero = a->layout ? given.zero : a->zero >= 0 ? a->zero : m->layout.zero;
    if (po.global_batch == 0)
        po.global_batch = a->gpus * po.micro_batch; /* the same batch for every candidate, as --suggest */
    mps_suggestion *list;
    int n, best;
    if (mps_split_candidates(cfg, (int)a->gpus, zero, a->gpu_mem, &po, &list, &n, &best, err) != 0)
        return -1;
    int fit = 0;
    for (int i = 0; i < n; i++)
        fit += list[i].peak <= a->gpu_mem;
    char budget[64], text[4096];
    cli_size_label(budget, sizeof budget, a->gpu_mem_text);
    mps_suggestion own;
    if (a->layout && plan_layout(cfg, &given, &po, &own, err) != 0) {
        free(list);
        return -1;
    }
    if (!a->layout && best < 0) {
        int smallest = 0;
        for (int i = 1; i < n; i++)
            if (list[i].peak < list[smallest].peak)
                smallest = i;
        mps_fail(err, MPS_EFAIL,
                 "no layout of %lld GPU%s at ZeRO-%d fits --gpu-mem %s with micro-batch %lld x %lld tokens "
                 "(the smallest peak: %s for %s); try --zero 3, --recompute full, a smaller --micro-batch or --seq, "
                 "or more GPUs",
                 (long long)a->gpus, a->gpus == 1 ? "" : "s", zero, budget, (long long)po.micro_batch,
                 (long long)po.seq, FMT(list[smallest].peak), layout_text(text, sizeof text, &list[smallest].layout));
        free(list);
        return -1;
    }
    if (print) {
        printf("split      %s: %s (%d ranks) -> %lld GPUs of %s; %s, micro-batch %lld x %lld tokens, recompute %s, "
               "global batch %lld%s\n",
               a->src, layout_text(text, sizeof text, &m->layout), mps_layout_world(&m->layout), (long long)a->gpus,
               budget, mps_precision_name(po.precision), (long long)po.micro_batch, (long long)po.seq,
               mps_recompute_name(po.recompute), (long long)po.global_batch, po.gpipe ? ", GPipe schedule" : "");
        print_header();
        if (a->layout) {
            print_layout("given", &own, own.peak > a->gpu_mem ? "  over --gpu-mem" : "");
            if (best >= 0)
                print_layout("planner", &list[best], "  (the planner's choice)");
        } else {
            print_layout("chosen", &list[best], "");
            int shown = 0;
            for (int i = best + 1; i < n && shown < a->top; i++)
                if (list[i].peak <= a->gpu_mem) {
                    print_layout("runner-up", &list[i], "");
                    shown++;
                }
        }
        printf("%-10s %d of %d layouts of %lld GPUs at ZeRO-%d fit %s; step time estimated as in docs/inspect.md\n", "",
               fit, n, (long long)a->gpus, zero, budget);
        fflush(stdout);
    }
    *chosen = a->layout ? own.layout : list[best].layout;
    free(list);
    return 0;
}

static int run(split_args *a, const mps_procs *procs, mps_err *err)
{
    char src[4200], path[4400];
    if (mps_ckpt_resolve(a->src, src, sizeof src, err) < 0)
        return -1;
    snprintf(path, sizeof path, "%s/%s", src, MPS_MANIFEST_NAME);
    mps_manifest m;
    if (mps_manifest_read(path, &m, err) != 0)
        return -1;
    mps_layout L;
    int rc = choose(a, &m, !procs || procs->rank == 0, &L, err);
    mps_manifest_free(&m);
    if (rc != 0 || a->dry_run) {
        if (rc == 0 && (!procs || procs->rank == 0))
            printf("%-10s dry run: nothing written\n", "");
        return rc;
    }
    /* the layout as `mpshard reshard --layout` takes it: the same code path, the same files */
    char layout[4096];
    layout_text(layout, sizeof layout, &L);
    a->ro.layout = layout;
    a->ro.out_dir = a->out;
    a->ro.procs = procs;
    return mps_reshard(src, &a->ro, err);
}

int cmd_split(int argc, char **argv)
{
    split_args a;
    int rc = parse_args(argc, argv, &a);
    if (rc != 0)
        return rc < 0 ? 0 : rc; /* -1: --help printed */
    mps_procs procs;
    int multi = cli_procs_init(&argc, &argv, &procs);
    if (multi < 0)
        return MPS_EFAIL;
    mps_err err;
    mps_err_clear(&err);
    rc = run(&a, multi ? &procs : NULL, &err);
    cli_procs_finish(multi);
    return rc != 0 ? cli_fail("split", &err) : 0;
}
