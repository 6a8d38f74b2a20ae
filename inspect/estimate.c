/* The step-time estimate of a planned layout (formula in inspect/estimate.h, constants and their
 * sources in docs/inspect.md), and the candidates `mpshard split` chooses from. */
#include "inspect/estimate.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "inspect/plan.h"

void mps_estimate_defaults(mps_estimate_consts *k)
{
    /* H100 SXM5: dense bf16 tensor-core peak (mpshard's CUDA trainer multiplies bf16 operands
     * whatever --precision stores); efficiency 0.4, what Megatron-LM reports for GPT models of
     * this size and what mpshard's trainer measures on one H100 (124M: 545K tok/s, 41%) */
    k->peak_flops = 989e12;
    k->efficiency = 0.4;
    /* NVLink 4: 18 links x 25 GB/s per direction; InfiniBand NDR: one 400 Gb/s adapter per GPU
     * (DGX H100); NCCL's ring collectives reach about 80% of either */
    k->nvlink_bytes_s = 450e9;
    k->ib_bytes_s = 50e9;
    k->comm_efficiency = 0.8;
    k->gpus_per_node = 8;
}

typedef enum { GROUP_DP, GROUP_TP, GROUP_PP } group_dim;

/* Whether some group of the dimension (the ranks that differ only in that coordinate) has ranks on
 * two nodes: its collectives (or pipeline messages) then run at the InfiniBand rate. */
static int group_crosses_nodes(const mps_layout *L, group_dim dim, int per_node)
{
    const int world = mps_layout_world(L);
    if (world <= per_node)
        return 0;
    for (int r = 0; r < world; r++) {
        mps_coords c = mps_layout_coords(L, r);
        int first = dim == GROUP_DP   ? mps_layout_rank(L, c.pp, 0, c.tp)
                    : dim == GROUP_TP ? mps_layout_rank(L, c.pp, c.dp, 0)
                                      : mps_layout_rank(L, 0, c.dp, c.tp);
        if (first / per_node != r / per_node)
            return 1;
    }
    return 0;
}

void mps_estimate_step(const mps_plan *p, const mps_estimate_consts *k, mps_step_estimate *e)
{
    mps_estimate_consts defaults;
    if (!k) {
        mps_estimate_defaults(&defaults);
        k = &defaults;
    }
    memset(e, 0, sizeof *e);
    const mps_layout *L = mps_plan_layout(p);
    const mps_plan_opts *o = mps_plan_options(p);
    const int world = mps_plan_world(p);
    /* 2 FLOPs per parameter and token forward, 4 backward; full recomputation replays the forward */
    const double flops_per_param_token = o->recompute == MPS_RECOMPUTE_FULL ? 8.0 : 6.0;
    const double tokens = (double)o->global_batch * (double)o->seq;
    e->compute_s = flops_per_param_token * (double)mps_param_count(mps_plan_config(p)) * tokens /
                   ((double)world * k->peak_flops * k->efficiency);
    /* 1F1B: (m + pp - 1) micro-batch slots for m micro-batches of work */
    e->bubble_s = e->compute_s * (double)(L->pp - 1) / (double)mps_plan_microbatches(p);
    e->dp_ib = group_crosses_nodes(L, GROUP_DP, k->gpus_per_node);
    e->tp_ib = group_crosses_nodes(L, GROUP_TP, k->gpus_per_node);
    e->pp_ib = group_crosses_nodes(L, GROUP_PP, k->gpus_per_node);
    const double nvlink = k->nvlink_bytes_s * k->comm_efficiency, ib = k->ib_bytes_s * k->comm_efficiency;
    const double bw_dp = e->dp_ib ? ib : nvlink, bw_tp = e->tp_ib ? ib : nvlink, bw_pp = e->pp_ib ? ib : nvlink;
    /* every rank of one (stage, TP rank) sends the same: one DP index per pair */
    e->comm_s = -1;
    for (int s = 0; s < L->pp; s++)
        for (int x = 0; x < L->tp; x++) {
            const int r = mps_layout_rank(L, s, 0, x);
            mps_comm_volume c;
            mps_plan_comm(p, r, &c);
            const double dp = (double)c.dp / bw_dp, tp = (double)c.tp / bw_tp, pp = (double)c.pp / bw_pp;
            if (dp + tp + pp > e->comm_s) {
                e->comm_s = dp + tp + pp;
                e->dp_s = dp, e->tp_s = tp, e->pp_s = pp;
                e->comm_rank = r;
            }
        }
    e->step_s = e->compute_s + e->bubble_s + e->comm_s;
}

int mps_split_candidates(const mps_config *cfg, int gpus, int zero, int64_t gpu_mem, const mps_plan_opts *o,
                         mps_suggestion **out, int *count, int *chosen, mps_err *err)
{
    *out = NULL;
    *count = 0;
    *chosen = -1;
    if (zero < 0 || zero > 3)
        return mps_fail(err, MPS_EUSAGE, "--zero %d: expected 0 to 3", zero);
    mps_suggestion *list;
    int n, considered;
    if (mps_plan_suggest(cfg, gpus, INT64_MAX, o, &list, &n, &considered, err) != 0)
        return -1;
    /* mps_plan_suggest plans dp = 1 at ZeRO-0 only: ZeRO shards over the DP group, so at dp = 1 every
     * stage holds and sends the same, and the checkpoint keeps the stage it was asked for */
    int kept = 0;
    for (int i = 0; i < n; i++) {
        if (list[i].layout.dp == 1)
            list[i].layout.zero = zero;
        else if (list[i].layout.zero != zero)
            continue;
        if (*chosen < 0 && list[i].peak <= gpu_mem)
            *chosen = kept;
        list[kept++] = list[i];
    }
    *out = list;
    *count = kept;
    return 0;
}
