/* The trainer's communication interface: collectives over the DP, TP and PP groups of a layout
 * and point-to-point messages between pipeline stages. One backend over MPI (cli/comm_mpi.c, host
 * memory), one for a single process (train/comm_self.c); the CUDA backend adds NCCL. The engine
 * only sees this table, so every backend runs the same schedule. */
#ifndef MPS_COMM_H
#define MPS_COMM_H

#include <stdint.h>

#include "err.h"

typedef enum { MPS_GROUP_WORLD = 0, MPS_GROUP_DP, MPS_GROUP_TP, MPS_GROUP_COUNT } mps_group;

typedef struct mps_comm {
    void *ctx;
    int rank, size; /* in WORLD */
    /* In-place sum / max over a group. */
    int (*allreduce_sum)(void *ctx, mps_group g, float *buf, int64_t n, mps_err *err);
    int (*allreduce_max)(void *ctx, mps_group g, float *buf, int64_t n, mps_err *err);
    int (*allreduce_sum_f64)(void *ctx, mps_group g, double *buf, int64_t n, mps_err *err);
    /* Several tensors at once (NCCL: one group call, one wait), each as the single call would do
     * it; every member issues the same calls in the same order. Optional: NULL means the caller
     * loops over the single calls. With start = 1 (only where can_start) the call returns without
     * waiting: it reads the buffers as the backend's work issued so far leaves them and runs while
     * later work goes on; nobody may touch the buffers until finish_started(), after which the
     * backend's work issued from then on sees every started call complete.
     * allreduce_sum_many: in place, count buffers of ns[i] elements. */
    int (*allreduce_sum_many)(void *ctx, mps_group g, float *const *bufs, const int64_t *ns, int count, int start,
                              mps_err *err);
    /* reduce_scatter_many: as reduce_scatter for each (ins[i], outs[i], counts[i], displs[i]) */
    int (*reduce_scatter_many)(void *ctx, mps_group g, const float *const *ins, float *const *outs,
                               const int64_t *const *counts, const int64_t *const *displs, int count, int start,
                               mps_err *err);
    /* allgather_many, in place: member i's part bufs[k][displs[k][i] .. + counts[k][i]) goes to
     * every member (start must be 0) */
    int (*allgather_many)(void *ctx, mps_group g, float *const *bufs, const int64_t *const *counts,
                          const int64_t *const *displs, int count, int start, mps_err *err);
    int can_start;
    int (*finish_started)(void *ctx, mps_err *err);
    /* Member i of the group receives the sum over the group of in[displ[i] .. displ[i] + counts[i])
     * into out (counts[rank-in-group] elements). */
    int (*reduce_scatter)(void *ctx, mps_group g, const float *in, float *out, const int64_t *counts,
                          const int64_t *displs, mps_err *err);
    /* out[displ[i] .. + counts[i]) = member i's in. */
    int (*allgather)(void *ctx, mps_group g, const float *in, float *out, const int64_t *counts,
                     const int64_t *displs, mps_err *err);
    /* Point to point between WORLD ranks. send does not block: buf must stay valid and unchanged
     * until send_wait(buf) or flush() returns. recv returns when the message has arrived, or
     * (NCCL) once the backend's work issued after it is queued behind its arrival. Between two
     * ranks, the messages of each direction are received in the order they were sent (NCCL
     * matches them by order, not tag). send_wait: the sends issued from buf are done with it, so
     * that the backend's work issued after the call may write buf again (MPI: the host waits for
     * them; NCCL: only the backend's stream does); sends from other buffers may still be under
     * way. flush: every send is done. */
    int (*send)(void *ctx, int peer, const float *buf, int64_t n, int tag, mps_err *err);
    int (*send_wait)(void *ctx, const float *buf, mps_err *err);
    int (*recv)(void *ctx, int peer, float *buf, int64_t n, int tag, mps_err *err);
    int (*flush)(void *ctx, mps_err *err);
    int (*barrier)(void *ctx, mps_err *err);
    /* n bytes from WORLD rank root to every rank. */
    int (*bcast_bytes)(void *ctx, void *buf, int64_t n, int root, mps_err *err);
    /* 1 when every rank passed ok != 0 (every rank must call it: agreement on failures). */
    int (*all_ok)(void *ctx, int ok);
} mps_comm;

/* The single-process backend (WORLD 1: every group has one member). */
void mps_comm_self(mps_comm *out);

#endif
