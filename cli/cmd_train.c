/* mpshard train: the GPT-2 trainer. One process per rank of the layout (mpirun -np dp*pp*tp);
 * resumes from a checkpoint of any layout, saves RUNDIR/step-%08d and RUNDIR/latest
 * (train/save_async.c: in the background by default). */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <omp.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "backend.h"
#include "cli.h"
#include "comm_mpi.h"
#include "comm_nccl.h"
#include "comm_staged.h"
#include "data.h"
#include "engine.h"
#include "pool.h"
#include "save_async.h"

static const char *const help =
    "usage: [mpirun -np WORLD] mpshard train --ckpt DIR --layout L --data TOKENS.bin --steps N --out RUNDIR [options]\n"
    "\n"
    "Trains a GPT-2 or Llama-family model from the checkpoint DIR (any layout: each rank reads only\n"
    "the pieces it needs; DIR may also be a run directory, whose 'latest' names the checkpoint)\n"
    "until the step counter reaches N.\n"
    "WORLD must equal dp*pp*tp; without mpirun the run is one process (WORLD 1). TOKENS.bin is an\n"
    "llm.c token file, or a quoted glob pattern ('fineweb_train_*.bin') for a set of them, read as one\n"
    "stream in name order (a sequence never crosses from one file into the next).\n"
    "\n"
    "  --global-batch G   sequences per optimizer step, over all replicas (default B * dp)\n"
    "  --micro-batch B    sequences per micro-batch (default 4); accumulation = G / (B * dp)\n"
    "  --seq T            tokens per sequence (default 64)\n"
    "  --lr X             peak learning rate (default 3e-4)\n"
    "  --warmup K         linear warmup steps (default 0)\n"
    "  --lr-min X         final learning rate of the cosine decay (default: --lr, no decay)\n"
    "  --decay-steps S    step counter at which the decay reaches --lr-min (default: --steps)\n"
    "  --weight-decay X   AdamW decoupled decay of matrices and embeddings (default 0.1)\n"
    "  --grad-clip X      clip the global gradient norm (default 1.0; 0: off)\n"
    "  --schedule S       1f1b (default) or gpipe\n"
    "  --recompute        keep only each layer's input per micro-batch and recompute the layer's\n"
    "                     activations in the backward (about a third more compute, a fraction of the\n"
    "                     activation memory; the same losses)\n"
    "  --save-every K     also save every K steps (default: only at the end)\n"
    "                     Saves run in the background: training stalls only while the state is copied\n"
    "                     to host memory, a thread writes the checkpoint while training goes on, and it\n"
    "                     is committed (then 'latest') at the first step boundary after every rank's\n"
    "                     write has finished. The save at the end of the run is written directly.\n"
    "  --save-sync        write every save before training goes on (no snapshot memory)\n"
    "  --keep-last K      after each save, keep only the K newest checkpoints of RUNDIR (default 0:\n"
    "                     keep all); each older one is renamed step-*.removing, then deleted\n"
    "  --log FILE.jsonl   append one JSON object per step (and one per evaluation)\n"
    "  --val-data F       evaluate on token file F: the mean loss of the current weights over its\n"
    "                     first --val-batches global batches (forward passes only), when the run\n"
    "                     starts and ends and every --val-every steps\n"
    "  --val-every K      also evaluate when the step counter is a multiple of K (default 0: never)\n"
    "  --val-batches N    global batches per evaluation (default 10)\n"
    "  --backend B        cpu or cuda (default: cuda when built with it and a GPU is present)\n"
    "  --model NAME | --config K=V,..  refuse a checkpoint of another model\n"
    "  --comm C           nccl (default with the CUDA backend when every rank has its own GPU) or mpi\n"
    "                     (device buffers staged through host memory: several ranks may share a GPU)\n"
    "  --no-overlap       reduce the DP gradients after the backward pass; by default (NCCL) each\n"
    "                     layer's reduction starts as soon as the pass is done with it and runs under\n"
    "                     the rest (ZeRO-0/1: in the step's last pass; ZeRO-2/3: in every micro-batch's,\n"
    "                     freeing the layer's full gradients)\n"
    "  --comm-staged      stage collectives through host memory as for GPU buffers over MPI (tests)\n"
    "  --comm-deferred    the same, with the collectives the trainer starts under the backward run\n"
    "                     only when it waits for them, their inputs checked for changes (tests)\n"
    "  -q, --quiet        no per-step lines\n"
    "\n"
    "SIGTERM or SIGINT (to any rank): every rank stops at the next step boundary, the steps since the\n"
    "last save are saved and committed, and the run exits 0; --ckpt RUNDIR resumes it. A second\n"
    "signal ends it at once (the last committed save stays RUNDIR's latest).\n";

static const char *const eval_help =
    "usage: [mpirun -np WORLD] mpshard eval --ckpt DIR --data TOKENS.bin [options]\n"
    "\n"
    "The mean cross-entropy of the checkpoint DIR (or a run directory's latest) over the first\n"
    "--batches global batches of TOKENS.bin (a file or a quoted glob pattern), forward passes only,\n"
    "under the layout L (default dp=1; WORLD must equal dp*pp*tp). Prints one line, or with --json\n"
    "{\"step\", \"val_loss\", \"val_tokens\"}. Nothing is written.\n"
    "\n"
    "  --layout L         the parallel layout to evaluate under (any: the loss is the same)\n"
    "  --batches N        global batches (default 10)\n"
    "  --global-batch G   sequences per batch (default B * dp)\n"
    "  --micro-batch B    sequences per micro-batch (default 4)\n"
    "  --seq T            tokens per sequence (default 64)\n"
    "  --backend B, --comm C, --recompute   as for mpshard train\n"
    "  --json             the result as one JSON object\n";

typedef struct {
    const char *cmd;  /* "train", or "eval" (mpshard eval: load, evaluate, nothing else) */
    int eval_only, json;
    const char *ckpt, *layout, *data, *out, *log, *model, *config, *val_data;
    int64_t steps, save_every, val_every, val_batches, keep_last;
    int quiet;
    mps_train_opts o;
    int decay_set, lr_min_set, val_batches_set;
    int backend_cuda; /* -1: the default (cuda when this build has it and a GPU is there) */
    int comm_staged;  /* route collectives through the host-staging layer even for host buffers */
    int comm_deferred; /* ... in its deferred mode (comm_staged.h) */
    int comm_mpi;     /* --comm mpi: no NCCL even when every rank has a GPU */
    int save_sync;    /* --save-sync: no background saves */
    int cpu_threads;  /* OpenMP threads of this rank (set_cpu_threads) */
    double t_start;   /* process start, for the log's elapsed_s (time to first step) */
} train_args;

static int parse_float(const char *cmd, const char *opt, const char *v, double lo, double hi, float *out)
{
    char *end;
    double x = strtod(v, &end);
    if (end == v || *end || !(x >= lo && x <= hi)) {
        cli_usage(cmd, "%s '%s': expected a number from %g to %g", opt, v, lo, hi);
        return -1;
    }
    *out = (float)x;
    return 0;
}

static int parse_args(int argc, char **argv, train_args *a, int eval_only)
{
    static const struct option opts[] = {
        { "ckpt", required_argument, 0, 'C' }, { "layout", required_argument, 0, 'l' },
        { "data", required_argument, 0, 'd' }, { "steps", required_argument, 0, 'n' },
        { "global-batch", required_argument, 0, 'G' }, { "micro-batch", required_argument, 0, 'B' },
        { "seq", required_argument, 0, 'T' }, { "lr", required_argument, 0, 'r' },
        { "warmup", required_argument, 0, 'w' }, { "lr-min", required_argument, 0, 'm' },
        { "decay-steps", required_argument, 0, 'D' }, { "weight-decay", required_argument, 0, 'W' },
        { "grad-clip", required_argument, 0, 'c' }, { "schedule", required_argument, 0, 'S' },
        { "save-every", required_argument, 0, 'k' }, { "out", required_argument, 0, 'o' },
        { "log", required_argument, 0, 'L' }, { "backend", required_argument, 0, 'b' },
        { "model", required_argument, 0, 'M' }, { "config", required_argument, 0, 'K' },
        { "comm-staged", no_argument, 0, 'X' }, { "comm", required_argument, 0, 'Y' },
        { "save-sync", no_argument, 0, 'Z' }, { "recompute", no_argument, 0, 'R' },
        { "no-overlap", no_argument, 0, 'O' }, { "comm-deferred", no_argument, 0, 'V' },
        { "val-data", required_argument, 0, 'v' }, { "val-every", required_argument, 0, 'e' },
        { "val-batches", required_argument, 0, 'N' }, { "keep-last", required_argument, 0, 'P' },
        { "batches", required_argument, 0, 'N' }, { "json", no_argument, 0, 'J' },
        { "quiet", no_argument, 0, 'q' }, { "help", no_argument, 0, 'h' }, { 0, 0, 0, 0 },
    };
    memset(a, 0, sizeof *a);
    a->cmd = eval_only ? "eval" : "train";
    a->eval_only = eval_only;
    a->backend_cuda = -1;
    a->val_batches = 10;
    a->o = (mps_train_opts){ .micro_batch = 4, .seq = 64, .lr = 3e-4f, .weight_decay = 0.1f, .grad_clip = 1.0f,
                             .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .schedule = MPS_SCHED_1F1B };
    int64_t v;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "o:qh", opts, NULL)) != -1) {
        switch (c) {
        case 'C': a->ckpt = optarg; break;
        case 'l': a->layout = optarg; break;
        case 'd': a->data = optarg; break;
        case 'n': if (cli_int(a->cmd, "--steps", optarg, 0, 99999999, &a->steps)) return -1; break;
        case 'G': if (cli_int(a->cmd, "--global-batch", optarg, 1, 1 << 20, &v)) return -1; a->o.global_batch = (int)v; break;
        case 'B': if (cli_int(a->cmd, "--micro-batch", optarg, 1, 1 << 16, &v)) return -1; a->o.micro_batch = (int)v; break;
        case 'T': if (cli_int(a->cmd, "--seq", optarg, 1, 1 << 20, &v)) return -1; a->o.seq = (int)v; break;
        case 'r': if (parse_float(a->cmd, "--lr", optarg, 0, 10, &a->o.lr)) return -1; break;
        case 'w': if (cli_int(a->cmd, "--warmup", optarg, 0, 99999999, &a->o.warmup)) return -1; break;
        case 'm': if (parse_float(a->cmd, "--lr-min", optarg, 0, 10, &a->o.lr_min)) return -1; a->lr_min_set = 1; break;
        case 'D': if (cli_int(a->cmd, "--decay-steps", optarg, 0, 99999999, &a->o.decay_steps)) return -1; a->decay_set = 1; break;
        case 'W': if (parse_float(a->cmd, "--weight-decay", optarg, 0, 10, &a->o.weight_decay)) return -1; break;
        case 'c': if (parse_float(a->cmd, "--grad-clip", optarg, 0, 1e9, &a->o.grad_clip)) return -1; break;
        case 'S': {
            int gpipe;
            if (cli_schedule(a->cmd, optarg, &gpipe)) return -1;
            a->o.schedule = gpipe ? MPS_SCHED_GPIPE : MPS_SCHED_1F1B;
            break;
        }
        case 'k': if (cli_int(a->cmd, "--save-every", optarg, 0, 99999999, &a->save_every)) return -1; break;
        case 'o': a->out = optarg; break;
        case 'L': a->log = optarg; break;
        case 'b':
            if (strcmp(optarg, "cpu") == 0) a->backend_cuda = 0;
            else if (strcmp(optarg, "cuda") == 0) a->backend_cuda = 1;
            else { cli_usage(a->cmd, "--backend '%s': expected cpu or cuda", optarg); return -1; }
            break;
        case 'M': a->model = optarg; break;
        case 'K': a->config = optarg; break;
        case 'X': a->comm_staged = 1; break;
        case 'Z': a->save_sync = 1; break;
        case 'R': a->o.recompute = 1; break;
        case 'O': a->o.reduce_after_backward = 1; break;
        case 'V': a->comm_deferred = 1; break;
        case 'v': a->val_data = optarg; break;
        case 'P': if (cli_int(a->cmd, "--keep-last", optarg, 0, 1 << 30, &a->keep_last)) return -1; break;
        case 'e': if (cli_int(a->cmd, "--val-every", optarg, 0, 99999999, &a->val_every)) return -1; break;
        case 'N':
            if (cli_int(a->cmd, "--val-batches", optarg, 1, 1 << 20, &a->val_batches)) return -1;
            a->val_batches_set = 1;
            break;
        case 'Y':
            if (strcmp(optarg, "mpi") == 0) a->comm_mpi = 1;
            else if (strcmp(optarg, "nccl") == 0) a->comm_mpi = 0;
            else { cli_usage(a->cmd, "--comm '%s': expected nccl or mpi", optarg); return -1; }
            break;
        case 'q': a->quiet = 1; break;
        case 'J': a->json = 1; break;
        case 'h': fputs(eval_only ? eval_help : help, stdout); return 1;
        default: cli_bad_option(a->cmd, "o:qh", opts, argc, argv); return -1;
        }
    }
    if (optind != argc) {
        cli_usage(a->cmd, "unexpected argument '%s'", argv[optind]);
        return -1;
    }
    if (eval_only) { /* the data is what is evaluated; nothing is trained or written */
        if (!a->ckpt || !a->data) {
            cli_usage(a->cmd, "--ckpt and --data are required");
            return -1;
        }
        if (!a->layout)
            a->layout = "dp=1";
        a->val_data = a->data;
        return 0;
    }
    if (a->json) {
        cli_usage(a->cmd, "--json is an option of mpshard eval (train writes --log)");
        return -1;
    }
    if (!a->ckpt || !a->layout || !a->data || !a->out || !a->steps) {
        cli_usage(a->cmd, "--ckpt, --layout, --data, --steps and --out are required");
        return -1;
    }
    if ((a->val_every || a->val_batches_set) && !a->val_data) {
        cli_usage(a->cmd, "--val-every and --val-batches need --val-data");
        return -1;
    }
    if (!a->lr_min_set)
        a->o.lr_min = a->o.lr;
    if (!a->decay_set)
        a->o.decay_steps = a->steps;
    return 0;
}

/* DIR itself when it holds a manifest, else the checkpoint named by DIR/latest. */
static int resolve_ckpt(const char *dir, char *out, size_t size, mps_err *err)
{
    int rc = mps_ckpt_resolve(dir, out, size, err);
    if (rc < 0)
        return -1;
    char path[4400];
    snprintf(path, sizeof path, "%s/%s", out, MPS_MANIFEST_NAME);
    if (rc == 0 && access(path, F_OK) != 0)
        return mps_fail(err, MPS_EUSAGE, "--ckpt %s: neither a checkpoint (no %s) nor a run directory (no latest)", dir,
                        MPS_MANIFEST_NAME);
    return 0;
}

/* Saves RUNDIR/step-%08d with the run's schedule in the manifest (mps_saver_save). */
static int save(mps_saver *sv, const train_args *a, int64_t step, uint64_t seed, int64_t position, int direct,
                double *stall_s, mps_err *err)
{
    char state[1024];
    snprintf(state, sizeof state,
             "{\"lr\": %.7g, \"lr_min\": %.7g, \"warmup\": %lld, \"decay_steps\": %lld, \"weight_decay\": %.7g, "
             "\"grad_clip\": %.7g, \"beta1\": %.7g, \"beta2\": %.7g, \"eps\": %.7g, \"global_batch\": %d, "
             "\"micro_batch\": %d, \"seq\": %d, \"schedule\": \"%s\"}",
             a->o.lr, a->o.lr_min, (long long)a->o.warmup, (long long)a->o.decay_steps, a->o.weight_decay,
             a->o.grad_clip, a->o.beta1, a->o.beta2, a->o.eps, a->o.global_batch, a->o.micro_batch, a->o.seq,
             a->o.schedule == MPS_SCHED_GPIPE ? "gpipe" : "1f1b");
    /* the last save has no training left to overlap: written directly, without a snapshot */
    return mps_saver_save(sv, step, seed, position, state, direct || step == a->steps, stall_s, err);
}

/* One stderr line per committed save: how long training stalled for it and, in the background,
 * how long the write and the commit took. */
static void report_saves(mps_saver *sv, const train_args *a, int rank)
{
    mps_save_report r;
    while (mps_saver_next_report(sv, &r)) {
        if (rank != 0)
            continue;
        char wait[64] = "";
        if (r.wait_s >= 0.0005)
            snprintf(wait, sizeof wait, ", %.3f s of it waiting for the previous save", r.wait_s);
        if (!a->quiet && r.background)
            fprintf(stderr, "train: saved %s/step-%08lld in %.3f s of stall (snapshot copy%s); written in the "
                    "background in %.2f s, committed in %.3f s\n", a->out, (long long)r.step, r.stall_s, wait,
                    r.write_s, r.commit_s);
        else if (!a->quiet)
            fprintf(stderr, "train: saved %s/step-%08lld in %.2f s (training stalls for the save%s)\n", a->out,
                    (long long)r.step, r.stall_s, wait);
        /* the committer prunes; a failure to remove an old checkpoint does not stop training */
        int removed = 0;
        mps_err perr;
        mps_err_clear(&perr);
        if (mps_run_prune(a->out, (int)a->keep_last, &removed, &perr) != 0)
            fprintf(stderr, "train: warning: --keep-last: %s\n", perr.msg);
        else if (removed && !a->quiet)
            fprintf(stderr, "train: --keep-last %lld: removed %d older checkpoint%s\n", (long long)a->keep_last,
                    removed, removed == 1 ? "" : "s");
    }
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* An evaluation on --val-data of the checkpoint ckdir trained to step counter `step`: for mpshard
 * eval its result (a line, or --json); in a training run a progress line and one in the log. */
static int evaluate(mps_engine *e, const mps_tokens *val, const train_args *a, int rank, const char *ckdir,
                    int64_t step, FILE *log, mps_err *err)
{
    double loss;
    if (mps_engine_eval(e, val, 0, (int)a->val_batches, &loss, err) != 0)
        return mps_wrap(err, "evaluating on %s at step %lld", a->val_data, (long long)step);
    if (rank != 0)
        return 0;
    long long tokens = (long long)(a->val_batches * a->o.global_batch * a->o.seq);
    if (a->eval_only && a->json)
        printf("{\"step\": %lld, \"val_loss\": %.9g, \"val_tokens\": %lld}\n", (long long)step, loss, tokens);
    else if (a->eval_only)
        printf("%s (step %lld): loss %.6f over %lld tokens of %s\n", ckdir, (long long)step, loss, tokens, a->data);
    else if (!a->quiet) {
        printf("step %lld/%lld  val loss %.6f\n", (long long)step, (long long)a->steps, loss);
        fflush(stdout);
    }
    if (log) {
        fprintf(log, "{\"step\": %lld, \"val_loss\": %.9g, \"val_tokens\": %lld, \"elapsed_s\": %.3f}\n",
                (long long)step, loss, tokens, now_s() - a->t_start);
        fflush(log);
    }
    return 0;
}

/* L: the run's layout, parsed by read_layout() against the checkpoint's model */
static int train(train_args *a, const mps_layout *layout, mps_comm *comm, const mps_backend *be, int comm_on_device,
                 mps_err *err)
{
    char ckdir[4200];
    if (resolve_ckpt(a->ckpt, ckdir, sizeof ckdir, err) != 0)
        return -1;
    mps_ckpt *ck;
    if (mps_ckpt_open(ckdir, &ck, err) != 0)
        return -1;
    const mps_manifest *m = mps_ckpt_manifest(ck);
    mps_config cfg = m->cfg;
    int64_t step = m->step, position = m->data_position;
    uint64_t seed = m->rng_seed;
    if (a->model || a->config) {
        mps_config want;
        if ((a->model ? mps_config_preset(a->model, &want, err) : mps_config_parse(a->config, &want, err)) != 0) {
            mps_ckpt_close(ck);
            return -1;
        }
        if (want.n_layer != cfg.n_layer || want.n_embd != cfg.n_embd || want.n_head != cfg.n_head ||
            want.vocab != cfg.vocab || want.n_positions != cfg.n_positions) {
            mps_ckpt_close(ck);
            return mps_fail(err, MPS_EUSAGE, "--ckpt %s holds another model (n_layer=%d n_embd=%d n_head=%d vocab=%lld "
                            "n_positions=%d) than %s", ckdir, cfg.n_layer, cfg.n_embd, cfg.n_head,
                            (long long)cfg.vocab, cfg.n_positions, a->model ? a->model : "--config");
        }
    }
    mps_layout L = *layout;
    if (!a->o.global_batch)
        a->o.global_batch = a->o.micro_batch * L.dp;
    mps_tokens *data = NULL, *val = NULL;
    mps_engine *e = NULL;
    mps_saver *sv = NULL;
    int rc = -1;
    /* device buffers travel through host memory when the communication backend is MPI */
    mps_comm staged = { 0 };
    if ((be->device_memory && !comm_on_device) || a->comm_staged || a->comm_deferred) {
        mps_coords me = mps_layout_coords(&L, comm->rank);
        int gsize[MPS_GROUP_COUNT] = { comm->size, L.dp, L.tp }, gme[MPS_GROUP_COUNT] = { comm->rank, me.dp, me.tp };
        if (mps_comm_staged_new(comm, be, gsize, gme, a->comm_deferred, &staged, err) != 0)
            goto out;
        comm = &staged;
    }
    if (mps_engine_new(&cfg, &L, comm, be, &a->o, &e, err) != 0)
        goto out;
    /* mpshard eval reads its data only as the evaluation's (below) */
    if (!a->eval_only && mps_tokens_open(a->data, a->o.seq, cfg.vocab, &data, err) != 0)
        goto out;
    if (data && mps_tokens_sequences(data) < a->o.global_batch) {
        mps_fail(err, MPS_EUSAGE, "%s: %lld sequences of --seq %d are too few for one batch of --global-batch %d",
                 a->data, (long long)mps_tokens_sequences(data), a->o.seq, a->o.global_batch);
        goto out;
    }
    if (a->val_data && mps_tokens_open(a->val_data, a->o.seq, cfg.vocab, &val, err) != 0)
        goto out;
    if (val && mps_tokens_sequences(val) < a->val_batches * a->o.global_batch) {
        mps_fail(err, MPS_EUSAGE, "%s %s: %lld sequences of --seq %d are too few for %s %lld of --global-batch %d",
                 a->eval_only ? "--data" : "--val-data", a->val_data, (long long)mps_tokens_sequences(val), a->o.seq,
                 a->eval_only ? "--batches" : "--val-batches", (long long)a->val_batches, a->o.global_batch);
        goto out;
    }
    double t0 = now_s();
    /* readers per rank: the cores shared among the ranks (which may all be on this host), 2 to 8 */
    int readers = mps_cpu_count() / comm->size;
    readers = readers < 2 ? 2 : readers > 8 ? 8 : readers;
    if (mps_engine_load(e, ck, readers, err) != 0)
        goto out;
    mps_ckpt_close(ck);
    ck = NULL;
    if (comm->rank == 0 && !a->quiet) {
        char threads[64] = "";
        if (!be->device_memory)
            snprintf(threads, sizeof threads, ", %d CPU thread%s per rank", a->cpu_threads, a->cpu_threads == 1 ? "" : "s");
        fprintf(stderr, "%s: %s at step %lld, layout %s, %d micro-batches of %dx%d per replica%s; loaded in %.2f s\n",
                a->cmd, ckdir, (long long)step, a->layout, a->o.global_batch / (a->o.micro_batch * L.dp),
                a->o.micro_batch, a->o.seq, threads, now_s() - t0);
    }
    if (a->eval_only) {
        rc = evaluate(e, val, a, comm->rank, ckdir, step, NULL, err);
        goto out;
    }
    if (step >= a->steps) {
        if (comm->rank == 0 && !a->quiet)
            fprintf(stderr, "train: the checkpoint is already at step %lld (--steps %lld): nothing to do\n",
                    (long long)step, (long long)a->steps);
        rc = 0;
        goto out;
    }
    if ((a->steps - step) > (MPS_MAX_DATA_POSITION - position) / a->o.global_batch) {
        mps_fail(err, MPS_EUSAGE, "--steps %lld: from data position %lld the run would pass the largest a checkpoint "
                 "records (2^62 sequences)", (long long)a->steps, (long long)position);
        goto out;
    }
    if (mps_saver_new(e, a->out, !a->save_sync, &sv, err) != 0)
        goto out;
    /* a run that will save in the background pins its snapshot before the first step, not in the
     * first save's stall (the last save of a run is written directly) */
    if (!a->save_sync && a->save_every > 0 && step + a->save_every < a->steps) {
        double tp = now_s();
        int ok = mps_saver_prepare(sv, err) == 0;
        if (!comm->all_ok(comm->ctx, ok)) {
            if (ok)
                mps_fail(err, MPS_ENOMEM, "the save snapshot could not be allocated on another rank");
            goto out;
        }
        if (comm->rank == 0 && !a->quiet)
            fprintf(stderr, "train: host snapshot for background saves allocated in %.2f s\n", now_s() - tp);
    }
    FILE *log = NULL;
    if (comm->rank == 0 && a->log && !(log = fopen(a->log, "a"))) {
        mps_fail(err, MPS_EIO, "--log %s: %s", a->log, strerror(errno));
        goto out;
    }
    rc = val ? evaluate(e, val, a, comm->rank, ckdir, step, log, err) : 0;
    int64_t first_step = step, saved_step = -1;
    int stopped = 0;
    while (step < a->steps && rc == 0) {
        /* SIGTERM or SIGINT on any rank: every rank stops at this step boundary, and the steps
         * trained since the last save are saved (a pending background save committed first) */
        if (!comm->all_ok(comm->ctx, cli_stop_signal == 0)) {
            double stall;
            if (step > first_step && saved_step != step)
                rc = save(sv, a, step, seed, position, 1, &stall, err);
            report_saves(sv, a, comm->rank);
            stopped = 1;
            break;
        }
        double ts = now_s();
        mps_step_stats st;
        if ((rc = mps_engine_step(e, data, position, step, &st, err)) != 0)
            break;
        step++;
        position += a->o.global_batch;
        double t_done = now_s(), tps = (double)a->o.global_batch * a->o.seq / (t_done - ts);
        if (comm->rank == 0 && !a->quiet) {
            printf("step %lld/%lld  loss %.6f  lr %.3e  norm %.4f  %.0f tok/s\n", (long long)step,
                   (long long)a->steps, st.loss, st.lr, st.grad_norm, tps);
            fflush(stdout);
        }
        /* a step boundary: commit the background save if every rank's writer is done */
        rc = mps_saver_poll(sv, 0, err);
        int eval_now = val && ((a->val_every && step % a->val_every == 0) || step == a->steps);
        double stall = -1;
        if (rc == 0 && ((a->save_every && step % a->save_every == 0) || step == a->steps)) {
            rc = save(sv, a, step, seed, position, 0, &stall, err);
            saved_step = step;
        }
        report_saves(sv, a, comm->rank);
        if (log) {
            char extra[64] = "";
            if (rc == 0 && stall >= 0)
                snprintf(extra, sizeof extra, ", \"save_stall_s\": %.3f", stall);
            fprintf(log, "{\"step\": %lld, \"loss\": %.9g, \"lr\": %.9g, \"grad_norm\": %.9g, \"tokens_per_s\": %.1f, "
                    "\"elapsed_s\": %.3f%s}\n", (long long)step, st.loss, st.lr, st.grad_norm, tps, t_done - a->t_start,
                    extra);
            fflush(log);
        }
        if (rc == 0 && eval_now)
            rc = evaluate(e, val, a, comm->rank, ckdir, step, log, err);
    }
    /* nothing may be left in flight: the last save is committed before the run ends */
    if (rc == 0)
        rc = mps_saver_poll(sv, 1, err);
    report_saves(sv, a, comm->rank);
    if (log)
        fclose(log);
    if (rc == 0 && stopped && comm->rank == 0) { /* (printed even with -q: the run did not reach --steps) */
        char by[64];
        snprintf(by, sizeof by, "%s", cli_stop_signal ? cli_signal_name(cli_stop_signal) : "a signal to another rank");
        if (step > first_step)
            fprintf(stderr, "train: stopped by %s at step %lld of %lld: %s/step-%08lld saved and committed (resume "
                    "with --ckpt %s)\n", by, (long long)step, (long long)a->steps, a->out, (long long)step, a->out);
        else
            fprintf(stderr, "train: stopped by %s before the first step: nothing to save\n", by);
    }
out:
    mps_saver_free(sv); /* on an error exit: stops and joins a pending writer, removes its staging */
    mps_tokens_close(data);
    mps_tokens_close(val);
    mps_engine_free(e);
    mps_comm_staged_free(&staged);
    if (ck)
        mps_ckpt_close(ck);
    return rc;
}

/* The model and layout of the run, from the checkpoint's manifest (read by every rank first, so
 * that WORLD is checked against the layout before anything else). */
static int read_layout(const train_args *a, mps_layout *L, mps_err *err)
{
    char ckdir[4200], mpath[4300];
    if (resolve_ckpt(a->ckpt, ckdir, sizeof ckdir, err) != 0)
        return -1;
    snprintf(mpath, sizeof mpath, "%s/%s", ckdir, MPS_MANIFEST_NAME);
    mps_manifest m;
    if (mps_manifest_read(mpath, &m, err) != 0)
        return -1;
    int rc = mps_layout_parse(a->layout, &m.cfg, L, err);
    mps_manifest_free(&m);
    return rc;
}

/* The compute backend: CUDA on this rank's GPU when asked (or by default when there is one). */
static int make_backend(const train_args *a, mps_backend *be, int *own_gpu, mps_err *err)
{
    mps_backend_cpu(be);
    *own_gpu = 0;
    if (a->backend_cuda == 0)
        return 0;
    mps_err e2;
    mps_err_clear(&e2);
    /* one GPU per local rank when there are enough (NCCL needs that), else ranks share them */
    const char *local = getenv("OMPI_COMM_WORLD_LOCAL_RANK");
    if (cli_cuda_local_device(local ? atoi(local) : 0, own_gpu, &e2) == 0 && mps_backend_cuda(be, &e2) == 0)
        return 0;
    mps_backend_cpu(be);
    if (a->backend_cuda == 1) {
        *err = e2;
        return -1;
    }
    return 0; /* the default falls back to the CPU */
}

/* The CPU kernels' OpenMP threads: OMP_NUM_THREADS when it is set, else this host's cores shared
 * among the job's processes on it (each would otherwise start a thread per core: 4 ranks on 2
 * cores ran 6x slower), and no more than the cores this process may run on. */
static int set_cpu_threads(int multi)
{
    if (getenv("OMP_NUM_THREADS"))
        return omp_get_max_threads();
    int cores = mps_cpu_count(), threads = cores / cli_procs_local_size(multi);
    cpu_set_t mine;
    if (sched_getaffinity(0, sizeof mine, &mine) == 0 && CPU_COUNT(&mine) < threads)
        threads = CPU_COUNT(&mine);
    if (threads < 1)
        threads = 1;
    omp_set_num_threads(threads);
    return threads;
}

static int train_or_eval(int argc, char **argv, int eval_only)
{
    mps_procs procs;
    int multi = cli_procs_init(&argc, &argv, &procs);
    if (multi < 0)
        return MPS_EFAIL;
    double t_start = now_s();
    if (!eval_only) /* after MPI_Init: ours, whatever MPI installs */
        cli_stop_on_signals();
    train_args a;
    int prc = parse_args(argc, argv, &a, eval_only);
    a.t_start = t_start;
    if (prc != 0) {
        cli_procs_finish(multi);
        return prc == 1 ? 0 : MPS_EUSAGE;
    }
    a.cpu_threads = set_cpu_threads(multi);
    mps_err err;
    mps_err_clear(&err);
    mps_comm comm;
    mps_layout L;
    int rc = read_layout(&a, &L, &err);
    if (multi && rc == 0)
        rc = cli_comm_mpi_new(&L, &comm, &err);
    if (rc != 0) {
        /* every rank fails the same way here: one message */
        if (!multi || procs.rank == 0)
            cli_fail(a.cmd, &err);
        cli_procs_finish(multi);
        return err.code ? err.code : MPS_EFAIL;
    }
    if (!multi)
        mps_comm_self(&comm);
    mps_backend be;
    int own_gpu = 0;
    int ok = make_backend(&a, &be, &own_gpu, &err) == 0;
    /* all ranks agree on the backend and on NCCL (every rank must have its own GPU) */
    if (!comm.all_ok(comm.ctx, ok))
        rc = ok ? mps_fail(&err, MPS_EUNSUPPORTED, "--backend cuda failed on another rank") : -1;
    mps_comm nccl = { 0 };
    int use_nccl = 0;
    if (rc == 0 && multi && be.device_memory && comm.all_ok(comm.ctx, own_gpu && !a.comm_mpi)) {
        rc = cli_comm_nccl_new(&L, &comm, &be, &nccl, &err);
        use_nccl = rc == 0;
    }
    if (rc == 0)
        rc = train(&a, &L, use_nccl ? &nccl : &comm, &be, use_nccl, &err);
    if (use_nccl)
        cli_comm_nccl_free(&nccl);
    be.destroy(be.ctx);
    if (rc != 0) {
        /* once per job: the failing rank, or the first of several that failed alike */
        int all_failed = 1, code = err.code ? err.code : MPS_EFAIL;
        if (!multi || cli_procs_failed(!cli_error_is_secondary(&err), &all_failed))
            cli_fail(a.cmd, &err);
        if (multi && !all_failed)
            cli_comm_abort(code); /* peers may be inside a collective */
        if (multi)
            cli_comm_mpi_free(&comm);
        cli_procs_finish(multi);
        return code;
    }
    if (multi)
        cli_comm_mpi_free(&comm);
    cli_procs_finish(multi);
    return 0;
}

int cmd_train(int argc, char **argv) { return train_or_eval(argc, argv, 0); }
int cmd_eval(int argc, char **argv) { return train_or_eval(argc, argv, 1); }
