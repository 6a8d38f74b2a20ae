/* The step-time estimate that ranks layouts (inspect --suggest, split): compute at a stated peak
 * and efficiency, stretched by the 1F1B pipeline bubble, plus the bytes each rank sends over the
 * link its DP, TP and PP groups use (NVLink inside a node, InfiniBand between nodes).
 *
 *   step = compute + bubble + comm
 *   compute = f * P * G * s / (N * peak * efficiency)      f = 6 (8 with full recomputation)
 *   bubble  = compute * (pp - 1) / m                       so bubble / (compute + bubble) = (pp-1)/(m+pp-1)
 *   comm    = max over ranks of  DP/bw_dp + TP/bw_tp + PP/bw_pp   (mps_plan_comm's bytes sent)
 *
 * P parameters (padded vocab included), G sequences of s tokens per step, N ranks, m micro-batches
 * per pipeline per step; bw is the NVLink or the InfiniBand bandwidth times the communication
 * efficiency: InfiniBand when some group of that dimension has ranks on two nodes. No overlap of
 * communication with compute is assumed. The constants and why: docs/inspect.md. */
#ifndef MPS_INSPECT_ESTIMATE_H
#define MPS_INSPECT_ESTIMATE_H

/* (inspect/plan.h includes this header: a suggestion carries its estimate) */
typedef struct mps_plan mps_plan;

typedef struct {
    double peak_flops;      /* per GPU, FLOP/s */
    double efficiency;      /* fraction of peak_flops the training step reaches */
    double nvlink_bytes_s;  /* per GPU and direction, inside a node */
    double ib_bytes_s;      /* per GPU and direction, between nodes */
    double comm_efficiency; /* fraction of those bandwidths the collectives reach */
    int gpus_per_node;      /* ranks r and r' share a node when r / gpus_per_node == r' / gpus_per_node */
} mps_estimate_consts;

/* H100 SXM: 989e12 FLOP/s (dense bf16), efficiency 0.4, NVLink 450e9 B/s, InfiniBand 50e9 B/s
 * (one 400 Gb/s link per GPU), communication efficiency 0.8, 8 GPUs per node. */
void mps_estimate_defaults(mps_estimate_consts *k);

typedef struct {
    double compute_s, bubble_s;
    double dp_s, tp_s, pp_s; /* of the rank whose communication takes longest */
    double comm_s;           /* dp_s + tp_s + pp_s */
    double step_s;           /* compute_s + bubble_s + comm_s */
    int comm_rank;
    int dp_ib, tp_ib, pp_ib; /* 1: that dimension crosses nodes (InfiniBand) */
} mps_step_estimate;

/* The estimate of one planned layout; k NULL: mps_estimate_defaults. */
void mps_estimate_step(const mps_plan *p, const mps_estimate_consts *k, mps_step_estimate *out);

#endif
