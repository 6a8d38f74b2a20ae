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
    /* In-place sums of count buffers over a group, each as allreduce_sum would give it, issued
     * together (NCCL: one group call and one wait for all of them instead of a wait per buffer).
     * Optional: NULL means the caller loops over allreduce_sum. */
    int (*allreduce_sum_many)(void *ctx, mps_group g, float *const *bufs, const int64_t *ns, int count,
                              mps_err *err);
    /* Starts in-place sums of count buffers over a group, each as allreduce_sum would give it,
     * and returns without waiting for them: the sums read the buffers as the backend's work issued
     * so far leaves them and run while later work goes on (NCCL: on a stream of their own). Nobody
     * may read or write the buffers until finish_started(); the backend's work issued after it sees
     * every started sum complete. Every member starts the same sums in the same order. Optional
     * (both NULL: the caller sums with allreduce_sum_many or allreduce_sum when it needs them). */
    int (*allreduce_sum_start)(void *ctx, mps_group g, float *const *bufs, const int64_t *ns, int count,
                               mps_err *err);
    int (*finish_started)(void *ctx, mps_err *err);
    /* Member i of the group receives the sum over the group of in[displ[i] .. displ[i] + counts[i])
     * into out (counts[rank-in-group] elements). */
    int (*reduce_scatter)(void *ctx, mps_group g, const float *in, float *out, const int64_t *counts,
                          const int64_t *displs, mps_err *err);
    /* out[displ[i] .. + counts[i]) = member i's in. */
    int (*allgather)(void *ctx, mps_group g, const float *in, float *out, const int64_t *counts,
                     const int64_t *displs, mps_err *err);
    /* Point to point between WORLD ranks. send does not block: buf must stay valid and unchanged
     * until flush() returns. recv returns when the message has arrived, or (NCCL) once the
     * backend's work issued after it is queued behind its arrival. Between two ranks, the messages
     * of each direction are received in the order they were sent (NCCL matches them by order, not
     * tag). */
    int (*send)(void *ctx, int peer, const float *buf, int64_t n, int tag, mps_err *err);
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
