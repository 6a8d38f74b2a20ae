/* mpshard inspect: what each GPU holds (from a checkpoint or planned), and which layouts fit. */
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "ckpt.h"
#include "cli.h"
#include "inspect/plan.h"
#include "inspect/svg.h"
#include "units.h"

static const char *const help =
    "usage: mpshard inspect DIR [options]\n"
    "       mpshard inspect (--model NAME | --config K=V,..) --layout L [options]\n"
    "       mpshard inspect (--model NAME | --config K=V,..) --gpus N --gpu-mem M --suggest [options]\n"
    "\n"
    "What each GPU holds while training under a layout: one row per rank with the bytes of\n"
    "parameters, gradients, fp32 master weights, Adam m and v (after ZeRO sharding over the DP\n"
    "group), an activation estimate and the total; the rank with the peak; the bytes each rank sends\n"
    "per optimizer step. From checkpoint DIR (its model and layout; bytes on disk per file and the\n"
    "compression ratio too), or planned from a model and a layout. --suggest lists the layouts of N\n"
    "GPUs whose every rank fits M bytes, best (shortest estimated step time) first.\n"
    "\n"
    "  --model NAME        a named model (GPT-2, Llama, Mistral, Qwen2 shapes): `mpshard models` lists them\n"
    "  --config K=V,..     n_layer=..,n_embd=..,n_head=..,vocab=..,n_positions=..[,padded_vocab=..]; Llama family:\n"
    "                   arch=llama[,family=llama|mistral|qwen2],n_kv_head=..,ffn=..,tied=0|1,qkv_bias=0|1,\n"
    "                   norm_eps=..,rope_theta=..[,rope_llama3=factor:low:high:original_positions\n"
    "                   | rope_linear=F | rope_dynamic=F]\n"
    "                   [,head_dim=N (when not n_embd / n_head)][,sliding_window=N (family=mistral)]\n"
    "  --layout L          dp=..,pp=..,tp=..,zero=0..3[,stages=a:b:..]\n"
    "  --precision P       fp32 (default: 4 B weights + 4 B gradients + 8 B Adam per parameter) or\n"
    "                      mixed (the CUDA trainer: 2 B bf16 weights + 4 B fp32 gradients + 12 B fp32\n"
    "                      master, m, v; bf16 activations; 0.6 GB for the CUDA runtime)\n"
    "  --micro-batch B     sequences per micro-batch (default 1)\n"
    "  --seq T             tokens per sequence (default: the model's n_positions, or its sliding window)\n"
    "  --recompute R       none (default), selective (the same: no scores are stored) or full\n"
    "  --global-batch G    sequences per optimizer step, for the communication volume\n"
    "                      (default: GPUs x micro-batch)\n"
    "  --no-overlap        plan train --no-overlap (or --comm mpi): ZeRO-2/3 reduce-scatter after the\n"
    "                      whole backward and hold the stage's full gradients until then\n"
    "  --schedule S        1f1b (default) or gpipe, as train's: GPipe holds the activations of every\n"
    "                      micro-batch of the step, 1F1B those of pp - stage of them\n"
    "  --gpu-mem M         GPU memory, e.g. 80GiB or 40GB (K, M, G, T alone mean KiB .. TiB):\n"
    "                      ranks over it are marked, and the command exits 1 if any is\n"
    "                      (--suggest: if no layout fits)\n"
    "  --gpus N --suggest  list the layouts of N GPUs whose every rank fits --gpu-mem\n"
    "  --top K             list at most K layouts (default: all that fit)\n"
    "  --sort KEY          order of --suggest: time (default: estimated step time), comm (bytes sent\n"
    "                      per rank and step), peak (memory) or bubble (pipeline idle fraction)\n"
    "  --tensors           per-tensor breakdown for one rank; for DIR also bytes stored per tensor\n"
    "  --rank R            the rank of --tensors (default: the rank with the peak)\n"
    "  --check             DIR: sum, per rank and kind, the elements its datasets hold and compare with\n"
    "                      the plan (exit 3 if they differ)\n"
    "  --svg FILE          write a stacked bar chart per rank (SVG; scripts/render-svg.sh makes a PNG)\n"
    "  --units U           GB (default, 10^9 bytes) or GiB (2^30) in tables and the chart\n"
    "  --json              print one JSON object (bytes as integers)\n"
    "  --time              plan --repeat times (default 5) and print the fastest planning time\n"
    "  --repeat N          runs for --time\n"
    "\n"
    "Activations: the buffers mpshard's trainer keeps per layer and micro-batch (tensor parallelism\n"
    "without sequence parallelism, flash-style attention: no scores) and its working buffers\n"
    "(docs/inspect.md); full recomputation keeps each layer's fp32 input; a 1F1B pipeline stage i\n"
    "holds min(pp - i, micro-batches) micro-batches of its layers.\n"
    "Step time: 6 * params * tokens / (GPUs * 989 TFLOP/s * 0.4), stretched by the 1F1B bubble\n"
    "(pp-1)/(m+pp-1), plus the bytes the busiest rank sends over NVLink (450 GB/s) or, for groups\n"
    "spanning nodes of 8 GPUs, InfiniBand (50 GB/s), both at 80%. See docs/inspect.md.\n";


typedef struct {
    const char *dir, *model, *config, *layout, *svg, *gpu_mem_text;
    mps_plan_opts po;
    int seq_set;
    int64_t gpu_mem, gpus, top, rank, repeat;
    int suggest, tensors, check, json, binary, time;
    mps_suggest_order sort;
} inspect_args;

#define FMT(b) cli_fmt_bytes((char[32]){ 0 }, 32, (b), a->binary)

static const char *kind_column[MPS_KIND_COUNT] = { "params", "master", "adam_m", "adam_v", "grads" };
/* Table order: what a rank holds for the forward/backward pass, then the optimizer state. */
static const mps_kind table_kinds[MPS_KIND_COUNT] = { MPS_KIND_PARAM, MPS_KIND_GRAD, MPS_KIND_MASTER, MPS_KIND_ADAM_M,
                                                      MPS_KIND_ADAM_V };

static const char *preset_name_of(const mps_config *cfg)
{
    for (int i = 0; mps_preset_name(i); i++) {
        mps_config p;
        mps_err e;
        mps_err_clear(&e);
        if (mps_config_preset(mps_preset_name(i), &p, &e) == 0 && memcmp(&p, cfg, sizeof p) == 0)
            return mps_preset_name(i);
    }
    return NULL;
}

static json_t *model_json(const mps_config *cfg)
{
    const char *name = preset_name_of(cfg);
    return json_pack("{s:o, s:i, s:i, s:i, s:I, s:I, s:i, s:I}", "name", name ? json_string(name) : json_null(),
                     "n_layer", cfg->n_layer, "n_embd", cfg->n_embd, "n_head", cfg->n_head, "vocab",
                     (json_int_t)cfg->vocab, "padded_vocab", (json_int_t)cfg->padded_vocab, "n_positions",
                     cfg->n_positions, "params", (json_int_t)mps_param_count(cfg));
}

static void print_model(const mps_config *cfg)
{
    const char *name = preset_name_of(cfg);
    int64_t params = mps_param_count(cfg);
    char count[32];
    if (params >= 1000000000)
        snprintf(count, sizeof count, "%.3f B", (double)params / 1e9);
    else if (params >= 1000000)
        snprintf(count, sizeof count, "%.2f M", (double)params / 1e6);
    else
        snprintf(count, sizeof count, "%lld", (long long)params);
    char notes[64], extra[72] = "";
    mps_config_notes(cfg, notes, sizeof notes);
    if (notes[0])
        snprintf(extra, sizeof extra, " (%s)", notes);
    printf("model      %s%s%d layers, n_embd %d, %d heads, vocab %lld (padded %lld), %d positions%s: %s parameters\n",
           name ? name : "", name ? ": " : "", cfg->n_layer, cfg->n_embd, cfg->n_head, (long long)cfg->vocab,
           (long long)cfg->padded_vocab, cfg->n_positions, extra, count);
}

/* the training line's notes under --no-overlap and --schedule gpipe */
static const char *no_overlap_note(int no_overlap)
{
    return no_overlap ? ", gradients reduced after the backward (--no-overlap)" : "";
}

static const char *schedule_note(int gpipe)
{
    return gpipe ? ", GPipe schedule (every micro-batch of the step in flight)" : "";
}

static const char *schedule_name(int gpipe)
{
    return gpipe ? "gpipe" : "1f1b";
}

static void print_training(const mps_plan *plan)
{
    const mps_plan_opts *o = mps_plan_options(plan);
    printf("training   %s (%s), micro-batch %lld x %lld tokens, recompute %s, global batch %lld sequences "
           "(%lld micro-batch%s per pipeline per step)%s%s\n",
           mps_precision_name(o->precision),
           o->precision == MPS_PRECISION_MIXED ? "bf16 weights; fp32 gradients, master, m, v"
                                               : "fp32 weights, gradients, m, v; no master copy",
           (long long)o->micro_batch, (long long)o->seq, mps_recompute_name(o->recompute), (long long)o->global_batch,
           (long long)mps_plan_microbatches(plan), mps_plan_microbatches(plan) == 1 ? "" : "es",
           no_overlap_note(o->no_overlap), schedule_note(o->gpipe));
}

#define SECS(t) cli_fmt_seconds((char[32]){ 0 }, 32, (t))

static const char *link_name(int ib) { return ib ? "IB" : "NVLink"; }

/* The step-time estimate in one line (inspect/estimate.h). */
static void print_estimate(const mps_step_estimate *e)
{
    printf("step time  %s estimated: compute %s + bubble %s + communication %s (rank %d: DP %s over %s, "
           "TP %s over %s, PP %s over %s)\n",
           SECS(e->step_s), SECS(e->compute_s), SECS(e->bubble_s), SECS(e->comm_s), e->comm_rank, SECS(e->dp_s),
           link_name(e->dp_ib), SECS(e->tp_s), link_name(e->tp_ib), SECS(e->pp_s), link_name(e->pp_ib));
}

static json_t *estimate_json(const mps_step_estimate *e)
{
    return json_pack("{s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:i, s:b, s:b, s:b}", "step_s", e->step_s, "compute_s",
                     e->compute_s, "bubble_s", e->bubble_s, "comm_s", e->comm_s, "dp_s", e->dp_s, "tp_s", e->tp_s,
                     "pp_s", e->pp_s, "comm_rank", e->comm_rank, "dp_ib", e->dp_ib, "tp_ib", e->tp_ib, "pp_ib",
                     e->pp_ib);
}

/* The per-rank table, the peak, the budget, the communication and step-time lines. */
static void print_ranks(const inspect_args *a, const mps_plan *plan)
{
    int world = mps_plan_world(plan);
    printf("\n%6s %4s %4s %4s", "rank", "pp", "dp", "tp");
    for (int i = 0; i < MPS_KIND_COUNT; i++)
        printf(" %11s", kind_column[table_kinds[i]]);
    printf(" %12s %11s %11s%s\n", "activations", "transient", "total", a->gpu_mem ? "  budget" : "");
    for (int r = 0; r < world; r++) {
        mps_rank_usage u;
        mps_plan_rank(plan, r, &u);
        printf("%6d %4d %4d %4d", r, u.at.pp, u.at.dp, u.at.tp);
        for (int i = 0; i < MPS_KIND_COUNT; i++)
            printf(" %11s", FMT(u.bytes[table_kinds[i]]));
        printf(" %12s %11s %11s%s\n", FMT(u.activations), FMT(u.transient), FMT(u.total),
               a->gpu_mem ? (u.total > a->gpu_mem ? "  OVER" : "  fits") : "");
    }
    int peak_rank;
    int64_t peak = mps_plan_peak(plan, &peak_rank);
    mps_rank_usage first;
    mps_plan_rank(plan, 0, &first);
    if (first.runtime)
        printf("\nruntime    %s per GPU in each total: the CUDA context and cuBLASLt's workspace\n", FMT(first.runtime));
    printf("%speak       rank %d: %s\n", first.runtime ? "" : "\n", peak_rank, FMT(peak));
    if (a->gpu_mem) {
        int over = mps_plan_over_budget(plan, a->gpu_mem);
        printf("budget     %s (%s) per GPU: ", cli_fmt_bytes((char[32]){ 0 }, 32, a->gpu_mem, 0),
               cli_fmt_bytes((char[32]){ 0 }, 32, a->gpu_mem, 1));
        if (over)
            printf("%d of %d ranks are over it\n", over, world);
        else
            printf("every rank fits\n");
    }
    mps_comm_volume c;
    int comm_rank;
    mps_plan_comm_max(plan, &c, &comm_rank);
    printf("comm/step  rank %d sends the most: DP %s, TP %s, PP %s, total %s; pipeline bubble %.0f%%\n", comm_rank,
           FMT(c.dp), FMT(c.tp), FMT(c.pp), FMT(c.total), 100 * mps_plan_bubble(plan));
    mps_step_estimate e;
    mps_estimate_step(plan, NULL, &e);
    print_estimate(&e);
}

static json_t *ranks_json(const inspect_args *a, const mps_plan *plan)
{
    json_t *list = json_array();
    for (int r = 0; r < mps_plan_world(plan); r++) {
        mps_rank_usage u;
        mps_plan_rank(plan, r, &u);
        json_t *o = json_pack("{s:i, s:i, s:i, s:i, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I}", "rank", r, "pp", u.at.pp,
                              "dp", u.at.dp, "tp", u.at.tp, "params", (json_int_t)u.bytes[MPS_KIND_PARAM], "grads",
                              (json_int_t)u.bytes[MPS_KIND_GRAD], "master", (json_int_t)u.bytes[MPS_KIND_MASTER],
                              "adam_m", (json_int_t)u.bytes[MPS_KIND_ADAM_M], "adam_v",
                              (json_int_t)u.bytes[MPS_KIND_ADAM_V], "activations", (json_int_t)u.activations,
                              "transient", (json_int_t)u.transient, "runtime", (json_int_t)u.runtime, "total",
                              (json_int_t)u.total);
        if (a->gpu_mem)
            json_object_set_new(o, "over_budget", json_boolean(u.total > a->gpu_mem));
        json_array_append_new(list, o);
    }
    return list;
}

static json_t *comm_json(const mps_comm_volume *c, int rank)
{
    return json_pack("{s:i, s:I, s:I, s:I, s:I}", "rank", rank, "dp", (json_int_t)c->dp, "tp", (json_int_t)c->tp, "pp",
                     (json_int_t)c->pp, "total", (json_int_t)c->total);
}

static json_t *plan_json(const inspect_args *a, const mps_plan *plan)
{
    const mps_plan_opts *o = mps_plan_options(plan);
    char layout[4096];
    mps_layout_format(mps_plan_layout(plan), layout, sizeof layout);
    int peak_rank, comm_rank;
    int64_t peak = mps_plan_peak(plan, &peak_rank);
    mps_comm_volume c;
    mps_plan_comm_max(plan, &c, &comm_rank);
    json_t *j = json_pack("{s:o, s:s, s:i, s:s, s:I, s:I, s:s, s:I, s:I, s:f}", "model", model_json(mps_plan_config(plan)),
                          "layout", layout, "world", mps_plan_world(plan), "precision", mps_precision_name(o->precision),
                          "micro_batch", (json_int_t)o->micro_batch, "seq", (json_int_t)o->seq, "recompute",
                          mps_recompute_name(o->recompute), "global_batch", (json_int_t)o->global_batch, "microbatches",
                          (json_int_t)mps_plan_microbatches(plan), "bubble", mps_plan_bubble(plan));
    json_object_set_new(j, "no_overlap", json_boolean(o->no_overlap));
    json_object_set_new(j, "schedule", json_string(schedule_name(o->gpipe)));
    json_object_set_new(j, "ranks", ranks_json(a, plan));
    json_object_set_new(j, "peak", json_pack("{s:i, s:I}", "rank", peak_rank, "bytes", (json_int_t)peak));
    json_object_set_new(j, "comm", comm_json(&c, comm_rank));
    mps_step_estimate e;
    mps_estimate_step(plan, NULL, &e);
    json_object_set_new(j, "estimate", estimate_json(&e));
    if (a->gpu_mem) {
        json_object_set_new(j, "gpu_mem", json_integer(a->gpu_mem));
        json_object_set_new(j, "over_budget", json_integer(mps_plan_over_budget(plan, a->gpu_mem)));
    }
    return j;
}

/* --tensors: what one rank holds of each tensor. */
static int tensors_report(const inspect_args *a, const mps_plan *plan, json_t *out, mps_err *err)
{
    const mps_config *cfg = mps_plan_config(plan);
    const mps_layout *L = mps_plan_layout(plan);
    const mps_plan_opts *o = mps_plan_options(plan);
    int rank = (int)a->rank;
    if (rank < 0)
        mps_plan_peak(plan, &rank);
    if (rank >= mps_plan_world(plan))
        return mps_fail(err, MPS_EUSAGE, "--rank %d: the layout has ranks 0..%d", rank, mps_plan_world(plan) - 1);
    mps_coords at = mps_layout_coords(L, rank);
    json_t *list = out ? json_array() : NULL;
    if (!out) {
        printf("\ntensors held by rank %d (pp %d, dp %d, tp %d), %s:\n%-16s %-16s %-8s", rank, at.pp, at.dp, at.tp,
               mps_precision_name(o->precision), "tensor", "shape", "tp split");
        for (int i = 0; i < MPS_KIND_COUNT; i++)
            printf(" %11s", kind_column[table_kinds[i]]);
        printf("\n");
    }
    int skipped = 0;
    for (int t = 0; t < mps_tensor_count(cfg); t++) {
        mps_tensor_spec spec;
        mps_tensor_spec_get(cfg, t, &spec);
        int64_t elems[MPS_KIND_COUNT];
        mps_plan_tensor(cfg, L, rank, t, elems);
        if (elems[MPS_KIND_PARAM] == 0 && elems[MPS_KIND_GRAD] == 0 && elems[MPS_KIND_ADAM_M] == 0) {
            skipped++;
            continue;
        }
        char shape[64] = "", split[16];
        for (int i = 0, n = 0; i < spec.ndim; i++)
            n += snprintf(shape + n, sizeof shape - (size_t)n, "%s%lld", i ? "x" : "", (long long)spec.shape[i]);
        if (spec.tp_dim >= 0 && L->tp > 1)
            snprintf(split, sizeof split, "dim %d", spec.tp_dim);
        else
            snprintf(split, sizeof split, "-");
        if (out) {
            json_t *sh = json_array();
            for (int i = 0; i < spec.ndim; i++)
                json_array_append_new(sh, json_integer(spec.shape[i]));
            json_t *e = json_pack("{s:s, s:o, s:i}", "name", spec.name, "shape", sh, "tp_dim", spec.tp_dim);
            for (int k = 0; k < MPS_KIND_COUNT; k++)
                json_object_set_new(e, kind_column[k], json_integer(elems[k] * mps_kind_bytes(o->precision, (mps_kind)k)));
            json_array_append_new(list, e);
        } else {
            printf("%-16s %-16s %-8s", spec.name, shape, split);
            for (int i = 0; i < MPS_KIND_COUNT; i++)
                printf(" %11s", FMT(elems[table_kinds[i]] * mps_kind_bytes(o->precision, table_kinds[i])));
            printf("\n");
        }
    }
    if (out)
        json_object_set_new(out, "tensors", json_pack("{s:i, s:o}", "rank", rank, "list", list));
    else if (skipped)
        printf("(%d tensors are held by other pipeline stages)\n", skipped);
    return 0;
}

static int run_svg(const inspect_args *a, const mps_plan *plan, const char *label, mps_err *err)
{
    char layout[4096], title[4600];
    mps_layout_format(mps_plan_layout(plan), layout, sizeof layout);
    snprintf(title, sizeof title, "%s, %s: memory per GPU", label, layout);
    char budget[64];
    mps_svg_opts so = { .title = title, .gpu_mem = a->gpu_mem, .binary_units = a->binary };
    if (a->gpu_mem_text)
        so.gpu_mem_label = cli_size_label(budget, sizeof budget, a->gpu_mem_text);
    return mps_svg_write_plan(a->svg, plan, &so, err);
}

static void emit_json(json_t *j)
{
    char *text = json_dumps(j, JSON_INDENT(1) | JSON_REAL_PRECISION(6));
    if (text)
        puts(text);
    free(text);
    json_decref(j);
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* --time: the whole planning (every rank's figures, the peak and the communication maximum). */
static int run_time(const inspect_args *a, const mps_config *cfg, const mps_layout *L, mps_err *err)
{
    double best = 1e300;
    int64_t peak = 0;
    for (int64_t i = 0; i < a->repeat; i++) {
        double t0 = now_ms();
        mps_plan *plan;
        if (mps_plan_build(cfg, L, &a->po, &plan, err) != 0)
            return -1;
        peak = mps_plan_peak(plan, NULL);
        mps_comm_volume c;
        mps_plan_comm_max(plan, &c, NULL);
        mps_plan_free(plan);
        double ms = now_ms() - t0;
        if (ms < best)
            best = ms;
    }
    char layout[4096];
    mps_layout_format(L, layout, sizeof layout);
    printf("planned %d ranks (%s) in %.2f ms (fastest of %lld runs); peak %s\n", mps_layout_world(L), layout, best,
           (long long)a->repeat, cli_fmt_bytes((char[32]){ 0 }, 32, peak, a->binary));
    return 0;
}

/* *fit: how many layouts fit --gpu-mem. */
static int run_suggest(const inspect_args *a, const mps_config *cfg, int *fit, mps_err *err)
{
    mps_suggestion *list;
    int n, considered;
    if (mps_plan_suggest(cfg, (int)a->gpus, a->gpu_mem, &a->po, &list, &n, &considered, err) != 0)
        return -1;
    mps_suggest_sort(list, n, a->sort);
    int shown = a->top > 0 && a->top < n ? (int)a->top : n;
    int64_t global = a->po.global_batch ? a->po.global_batch : a->gpus * a->po.micro_batch;
    if (a->json) {
        json_t *arr = json_array();
        for (int i = 0; i < shown; i++) {
            const mps_suggestion *s = &list[i];
            char layout[4096];
            mps_layout_format(&s->layout, layout, sizeof layout);
            json_array_append_new(arr, json_pack("{s:s, s:i, s:i, s:i, s:i, s:I, s:i, s:o, s:I, s:f}", "layout", layout,
                                                 "dp", s->layout.dp, "pp", s->layout.pp, "tp", s->layout.tp, "zero",
                                                 s->layout.zero, "peak", (json_int_t)s->peak, "peak_rank", s->peak_rank,
                                                 "comm", comm_json(&s->comm, s->comm_rank), "microbatches",
                                                 (json_int_t)s->microbatches, "bubble", s->bubble));
            json_object_set_new(json_array_get(arr, (size_t)i), "estimate", estimate_json(&s->est));
        }
        json_t *j = json_pack("{s:o, s:I, s:I, s:s, s:I, s:I, s:s, s:I, s:i, s:i, s:o}", "model", model_json(cfg), "gpus",
                              (json_int_t)a->gpus, "gpu_mem", (json_int_t)a->gpu_mem, "precision",
                              mps_precision_name(a->po.precision), "micro_batch", (json_int_t)a->po.micro_batch, "seq",
                              (json_int_t)a->po.seq, "recompute", mps_recompute_name(a->po.recompute), "global_batch",
                              (json_int_t)global, "considered", considered, "fit", n, "layouts", arr);
        json_object_set_new(j, "no_overlap", json_boolean(a->po.no_overlap));
        json_object_set_new(j, "schedule", json_string(schedule_name(a->po.gpipe)));
        emit_json(j);
    } else {
        print_model(cfg);
        printf("training   %s, micro-batch %lld x %lld tokens, recompute %s, global batch %lld sequences%s%s\n",
               mps_precision_name(a->po.precision), (long long)a->po.micro_batch, (long long)a->po.seq,
               mps_recompute_name(a->po.recompute), (long long)global,
               no_overlap_note(a->po.no_overlap), schedule_note(a->po.gpipe));
        static const char *const order[] = { "shortest estimated step time", "fewest bytes sent per rank and step",
                                             "lowest peak memory", "smallest pipeline bubble" };
        printf("layouts of %lld GPUs with every rank within %s: %d of %d fit%s%s\n", (long long)a->gpus, FMT(a->gpu_mem),
               n, considered, n ? "; first: " : "", n ? order[a->sort] : "");
        if (n)
            printf("\n%4s  %-24s %11s %6s %11s %11s %11s %11s %7s %10s\n", "#", "layout", "peak", "rank", "DP/step",
                   "TP/step", "PP/step", "comm total", "bubble", "step time");
        for (int i = 0; i < shown; i++) {
            const mps_suggestion *s = &list[i];
            char layout[4096];
            mps_layout_format(&s->layout, layout, sizeof layout);
            char *stages = strstr(layout, ",stages="); /* even stages: the default, not worth a column */
            if (stages && !s->layout.explicit_stages)
                *stages = '\0';
            printf("%4d  %-24s %11s %6d %11s %11s %11s %11s %6.0f%% %10s\n", i + 1, layout, FMT(s->peak), s->peak_rank,
                   FMT(s->comm.dp), FMT(s->comm.tp), FMT(s->comm.pp), FMT(s->comm.total), 100 * s->bubble,
                   SECS(s->est.step_s));
        }
        if (shown < n)
            printf("(%d more; --top 0 lists all)\n", n - shown);
        if (n)
            printf("step time: estimated (docs/inspect.md): 6 x params x tokens at 40%% of 989 TFLOP/s per GPU, the "
                   "pipeline bubble, bytes sent over NVLink 450 GB/s or InfiniBand 50 GB/s at 80%%\n");
    }
    free(list);
    *fit = n;
    return 0;
}

/* Files of a checkpoint: bytes on disk (stat) and the raw f32 bytes the layout stores in each.
 * Each file is also checked against the manifest (size, checkpoint id, rank; no chunk data is
 * read): the table is still printed, then the first bad file is the error. */
static int files_report(const inspect_args *a, const char *dir, const mps_manifest *m, json_t *out, mps_err *err)
{
    mps_owners *owners;
    if (mps_owners_build(&m->cfg, &m->layout, m->kinds, &owners, err) != 0)
        return -1;
    json_t *list = out ? json_array() : NULL;
    if (!out)
        printf("\n%-18s %14s %14s %8s\n", "file", "on disk", "raw f32", "ratio");
    int64_t disk_total = 0, raw_total = 0;
    int bad = 0;
    mps_err first;
    mps_err_clear(&first);
    for (int i = 0; i < m->nfiles; i++) {
        char path[4400];
        snprintf(path, sizeof path, "%s/%s", dir, m->files[i].name);
        struct stat st;
        int64_t raw = mps_owner_bytes(owners, m->files[i].rank), disk = stat(path, &st) == 0 ? (int64_t)st.st_size : -1;
        double ratio = disk > 0 ? (double)raw / (double)disk : 0;
        mps_err ferr;
        mps_err_clear(&ferr);
        int ok = mps_shard_file_check(dir, m, m->files[i].rank, &ferr) == 0;
        if (!ok && bad++ == 0)
            first = ferr;
        if (disk >= 0)
            disk_total += disk;
        raw_total += raw;
        if (out)
            json_array_append_new(list, json_pack("{s:s, s:i, s:I, s:I, s:f, s:b}", "name", m->files[i].name, "rank",
                                                  m->files[i].rank, "bytes", (json_int_t)disk, "raw_bytes", (json_int_t)raw,
                                                  "ratio", ratio, "ok", ok));
        else if (disk < 0)
            printf("%-18s %14s %14s %8s\n", m->files[i].name, "MISSING", FMT(raw), "-");
        else
            printf("%-18s %14s %14s %7.3fx%s\n", m->files[i].name, FMT(disk), FMT(raw), ratio, ok ? "" : "  BAD");
    }
    double ratio = disk_total > 0 ? (double)raw_total / (double)disk_total : 0;
    if (out) {
        json_object_set_new(out, "files", list);
        json_object_set_new(out, "disk", json_pack("{s:I, s:I, s:f}", "bytes", (json_int_t)disk_total, "raw_bytes",
                                                    (json_int_t)raw_total, "ratio", ratio));
    } else {
        printf("%-18s %14s %14s %7.3fx\n", "total", FMT(disk_total), FMT(raw_total), ratio);
    }
    mps_owners_free(owners);
    int world = mps_layout_world(&m->layout);
    if (bad == 0 && m->nfiles != world)
        return mps_fail(err, MPS_ECORRUPT, "%s/" MPS_MANIFEST_NAME ": lists %d files for %d ranks", dir, m->nfiles, world);
    if (bad > 1)
        return mps_fail(err, first.code, "%s (and %d more bad file%s)", first.msg, bad - 1, bad > 2 ? "s" : "");
    if (bad)
        return mps_fail(err, first.code, "%s", first.msg);
    return 0;
}

/* --check: what the datasets hold per rank and kind against the plan; --tensors: stored per tensor. */
static int scan_report(const inspect_args *a, const char *dir, const mps_manifest *m, const mps_plan *plan, json_t *out,
                       int *mismatches, mps_err *err)
{
    mps_ckpt_usage *u;
    if (mps_ckpt_usage_scan(dir, m, &u, err) != 0)
        return -1;
    *mismatches = 0;
    if (a->check) {
        json_t *bad = out ? json_array() : NULL;
        int compared = 0;
        for (int r = 0; r < u->world; r++) {
            mps_rank_usage pu;
            mps_plan_rank(plan, r, &pu);
            for (int k = 0; k < MPS_KIND_COUNT; k++) {
                if (!(m->kinds & (1u << k)))
                    continue;
                compared++;
                int64_t held = u->held[(size_t)r * MPS_KIND_COUNT + k];
                if (held == pu.elems[k])
                    continue;
                (*mismatches)++;
                char line[256];
                snprintf(line, sizeof line, "rank %d %s: the datasets hold %lld elements, the plan %lld", r,
                         mps_kind_name((mps_kind)k), (long long)held, (long long)pu.elems[k]);
                if (out)
                    json_array_append_new(bad, json_string(line));
                else
                    fprintf(stderr, "mpshard inspect: %s\n", line);
            }
        }
        if (out)
            json_object_set_new(out, "check", json_pack("{s:b, s:I, s:i, s:o}", "ok", *mismatches == 0, "datasets",
                                                        (json_int_t)u->datasets, "compared", compared, "mismatches", bad));
        else if (*mismatches == 0)
            printf("\ncheck      OK: the %lld datasets hold, for each of %d ranks and each stored kind, exactly the "
                   "planned elements\n", (long long)u->datasets, u->world);
        else
            printf("\ncheck      FAILED: %d (rank, kind) pairs differ from the plan\n", *mismatches);
    }
    if (a->tensors) {
        json_t *list = out ? json_array() : NULL;
        if (!out)
            printf("\nstored per tensor (all kinds, all files):\n%-16s %14s %14s %8s\n", "tensor", "raw f32", "on disk",
                   "ratio");
        for (int t = 0; t < u->ntensors; t++) {
            mps_tensor_spec spec;
            mps_tensor_spec_get(&m->cfg, t, &spec);
            double ratio = u->tensor_stored[t] > 0 ? (double)u->tensor_raw[t] / (double)u->tensor_stored[t] : 0;
            if (out)
                json_array_append_new(list, json_pack("{s:s, s:I, s:I, s:f}", "name", spec.name, "raw_bytes",
                                                      (json_int_t)u->tensor_raw[t], "stored_bytes",
                                                      (json_int_t)u->tensor_stored[t], "ratio", ratio));
            else
                printf("%-16s %14s %14s %7.3fx\n", spec.name, FMT(u->tensor_raw[t]), FMT(u->tensor_stored[t]), ratio);
        }
        if (out)
            json_object_set_new(out, "stored_tensors", list);
    }
    mps_ckpt_usage_free(u);
    return 0;
}

static int parse_args(int argc, char **argv, inspect_args *a)
{
    static const struct option opts[] = {
        { "model", required_argument, 0, 'M' }, { "config", required_argument, 0, 'c' },
        { "layout", required_argument, 0, 'L' }, { "precision", required_argument, 0, 'p' },
        { "micro-batch", required_argument, 0, 'b' }, { "seq", required_argument, 0, 's' },
        { "recompute", required_argument, 0, 'R' }, { "global-batch", required_argument, 0, 'G' },
        { "gpu-mem", required_argument, 0, 'm' }, { "gpus", required_argument, 0, 'g' },
        { "suggest", no_argument, 0, 'S' }, { "top", required_argument, 0, 'k' },
        { "tensors", no_argument, 0, 'T' }, { "rank", required_argument, 0, 'r' },
        { "check", no_argument, 0, 'C' }, { "svg", required_argument, 0, 'v' },
        { "units", required_argument, 0, 'u' }, { "json", no_argument, 0, 'j' },
        { "time", no_argument, 0, 't' }, { "repeat", required_argument, 0, 'n' },
        { "sort", required_argument, 0, 'o' }, { "no-overlap", no_argument, 0, 'O' },
        { "schedule", required_argument, 0, 'P' },
        { "help", no_argument, 0, 'h' }, { 0, 0, 0, 0 },
    };
    memset(a, 0, sizeof *a);
    a->rank = -1;
    a->repeat = 5;
    a->po.micro_batch = 1;
    int c, v;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'M': a->model = optarg; break;
        case 'c': a->config = optarg; break;
        case 'L': a->layout = optarg; break;
        case 'p':
            if ((v = mps_precision_from_name(optarg)) < 0)
                return cli_usage("inspect", "--precision '%s': expected fp32 or mixed", optarg);
            a->po.precision = (mps_precision)v;
            break;
        case 'R':
            if ((v = mps_recompute_from_name(optarg)) < 0)
                return cli_usage("inspect", "--recompute '%s': expected none, selective or full", optarg);
            a->po.recompute = (mps_recompute)v;
            break;
        case 'b': if (cli_int("inspect", "--micro-batch", optarg, 1, 1 << 20, &a->po.micro_batch)) return MPS_EUSAGE; break;
        case 's': if (cli_int("inspect", "--seq", optarg, 1, 1 << 24, &a->po.seq)) return MPS_EUSAGE; a->seq_set = 1; break;
        case 'G': if (cli_int("inspect", "--global-batch", optarg, 1, (int64_t)1 << 40, &a->po.global_batch)) return MPS_EUSAGE; break;
        case 'm':
            if (cli_parse_size(optarg, &a->gpu_mem) != 0)
                return cli_usage("inspect", "--gpu-mem '%s': expected a size such as 80GiB or 40GB", optarg);
            a->gpu_mem_text = optarg;
            break;
        case 'g': if (cli_int("inspect", "--gpus", optarg, 1, 1 << 24, &a->gpus)) return MPS_EUSAGE; break;
        case 'S': a->suggest = 1; break;
        case 'o':
            if ((v = mps_suggest_order_from_name(optarg)) < 0)
                return cli_usage("inspect", "--sort '%s': expected time, comm, peak or bubble", optarg);
            a->sort = (mps_suggest_order)v;
            break;
        case 'k': if (cli_int("inspect", "--top", optarg, 0, 1 << 30, &a->top)) return MPS_EUSAGE; break;
        case 'T': a->tensors = 1; break;
        case 'r': if (cli_int("inspect", "--rank", optarg, 0, 1 << 24, &a->rank)) return MPS_EUSAGE; break;
        case 'C': a->check = 1; break;
        case 'v': a->svg = optarg; break;
        case 'u':
            if (strcmp(optarg, "GB") != 0 && strcmp(optarg, "GiB") != 0)
                return cli_usage("inspect", "--units '%s': expected GB or GiB", optarg);
            a->binary = strcmp(optarg, "GiB") == 0;
            break;
        case 'j': a->json = 1; break;
        case 'O': a->po.no_overlap = 1; break;
        case 'P': if (cli_schedule("inspect", optarg, &a->po.gpipe)) return MPS_EUSAGE; break;
        case 't': a->time = 1; break;
        case 'n': if (cli_int("inspect", "--repeat", optarg, 1, 1000, &a->repeat)) return MPS_EUSAGE; break;
        case 'h': fputs(help, stdout); return -1;
        default: return cli_bad_option("inspect", "h", opts, argc, argv);
        }
    }
    if (optind < argc - 1)
        return cli_usage("inspect", "unexpected argument '%s'", argv[optind + 1]);
    a->dir = optind == argc - 1 ? argv[optind] : NULL;
    if (a->dir && (a->model || a->config || a->layout || a->suggest))
        return cli_usage("inspect", "give a checkpoint DIR or --model/--config with --layout or --suggest, not both");
    if (!a->dir) {
        if (!a->model == !a->config)
            return cli_usage("inspect", "give a checkpoint DIR, or exactly one of --model and --config");
        if (a->suggest && a->layout)
            return cli_usage("inspect", "--suggest chooses the layout: drop --layout");
        if (!a->suggest && !a->layout)
            return cli_usage("inspect", "--layout is required to plan a model (or --suggest with --gpus and --gpu-mem)");
        if (a->suggest && (!a->gpus || !a->gpu_mem))
            return cli_usage("inspect", "--suggest needs --gpus and --gpu-mem");
    }
    if (a->gpus && !a->suggest)
        return cli_usage("inspect", "--gpus is used with --suggest");
    if (a->check && !a->dir)
        return cli_usage("inspect", "--check compares a checkpoint DIR with its plan");
    if (a->suggest && (a->tensors || a->svg || a->time || a->rank >= 0))
        return cli_usage("inspect", "--suggest lists layouts: --tensors, --rank, --svg and --time need one layout");
    if (a->time && a->dir)
        return cli_usage("inspect", "--time plans a model: use it with --model/--config and --layout");
    if (a->rank >= 0 && !a->tensors)
        return cli_usage("inspect", "--rank selects the rank of --tensors");
    return 0;
}

int cmd_inspect(int argc, char **argv)
{
    inspect_args a;
    int rc = parse_args(argc, argv, &a);
    if (rc != 0)
        return rc < 0 ? 0 : rc; /* -1: --help printed */
    mps_err err;
    mps_err_clear(&err);
    mps_config cfg;
    mps_layout L;
    mps_manifest m;
    int have_manifest = 0;
    memset(&m, 0, sizeof m);
    char resolved[4200];
    if (a.dir) { /* a run directory: its latest checkpoint */
        if (mps_ckpt_resolve(a.dir, resolved, sizeof resolved, &err) < 0)
            return cli_fail("inspect", &err);
        a.dir = resolved;
        char path[4400];
        snprintf(path, sizeof path, "%s/%s", a.dir, MPS_MANIFEST_NAME);
        if (mps_manifest_read(path, &m, &err) != 0)
            return cli_fail("inspect", &err);
        have_manifest = 1;
        cfg = m.cfg;
        L = m.layout;
    } else if ((a.model ? mps_config_preset(a.model, &cfg, &err) : mps_config_parse(a.config, &cfg, &err)) != 0) {
        return cli_fail("inspect", &err);
    }
    if (!a.seq_set)
        a.po.seq = mps_cfg_max_seq(&cfg);
    if (a.suggest) {
        int fit = 0;
        if (run_suggest(&a, &cfg, &fit, &err) != 0)
            return cli_fail("inspect", &err);
        if (fit == 0) /* a verdict scripts can test, as for one layout over --gpu-mem */
            fprintf(stderr, "mpshard inspect: no layout of %lld GPUs fits --gpu-mem %s\n", (long long)a.gpus,
                    a.gpu_mem_text);
        return fit ? 0 : MPS_EFAIL;
    }
    if (!a.dir && mps_layout_parse(a.layout, &cfg, &L, &err) != 0)
        return cli_fail("inspect", &err);
    if (a.time) {
        if (run_time(&a, &cfg, &L, &err) != 0)
            return cli_fail("inspect", &err);
        return 0;
    }
    mps_plan *plan = NULL;
    json_t *j = NULL;
    int mismatches = 0, status = 0;
    if (mps_plan_build(&cfg, &L, &a.po, &plan, &err) != 0)
        goto fail;
    if (a.json) {
        j = plan_json(&a, plan);
    } else {
        print_model(&cfg);
        char layout[4096];
        mps_layout_format(&L, layout, sizeof layout);
        printf("layout     %s (%d ranks)\n", layout, mps_layout_world(&L));
        if (have_manifest)
            printf("checkpoint %s: format version %d, step %lld, id %s, from %s\n", a.dir, m.format_version,
                   (long long)m.step, m.checkpoint_id, m.source_format[0] ? m.source_format : "?");
        print_training(plan);
        print_ranks(&a, plan);
    }
    if (have_manifest && j)
        json_object_set_new(j, "checkpoint", json_pack("{s:s, s:i, s:I, s:s}", "dir", a.dir, "format_version",
                                                       m.format_version, "step", (json_int_t)m.step, "checkpoint_id",
                                                       m.checkpoint_id));
    if (a.tensors && tensors_report(&a, plan, j, &err) != 0)
        goto fail;
    if (have_manifest) {
        /* a bad file is reported (the first one is the error), and the command still shows what it
         * can: --check then says what the datasets that can be read hold */
        if (files_report(&a, a.dir, &m, j, &err) != 0)
            status = err.code;
        if ((a.check || a.tensors) && scan_report(&a, a.dir, &m, plan, j, &mismatches, &err) != 0 && status == 0)
            status = err.code;
    }
    if (a.svg && run_svg(&a, plan, have_manifest ? a.dir : (a.model ? a.model : a.config), &err) != 0)
        goto fail;
    int over = a.gpu_mem ? mps_plan_over_budget(plan, a.gpu_mem) : 0;
    if (j) {
        emit_json(j);
        j = NULL;
    }
    mps_plan_free(plan);
    if (have_manifest)
        mps_manifest_free(&m);
    if (status)
        return cli_fail("inspect", &err);
    if (mismatches)
        return MPS_ECORRUPT;
    if (over) { /* the table says which; this line and the exit code are for scripts */
        fprintf(stderr, "mpshard inspect: %d of %d ranks are over --gpu-mem %s\n", over, mps_layout_world(&L),
                a.gpu_mem_text);
        return MPS_EFAIL;
    }
    return 0;
fail:
    json_decref(j);
    mps_plan_free(plan);
    if (have_manifest)
        mps_manifest_free(&m);
    return cli_fail("inspect", &err);
}
