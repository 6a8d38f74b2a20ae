/* WORLD 1: every collective is the identity; there is no peer to talk to. */
#include <string.h>

#include "comm.h"

static int self_noop(void *ctx, mps_group g, float *buf, int64_t n, mps_err *err)
{
    (void)ctx; (void)g; (void)buf; (void)n; (void)err;
    return 0;
}

static int self_noop_f64(void *ctx, mps_group g, double *buf, int64_t n, mps_err *err)
{
    (void)ctx; (void)g; (void)buf; (void)n; (void)err;
    return 0;
}

static int self_copy(void *ctx, mps_group g, const float *in, float *out, const int64_t *counts,
                     const int64_t *displs, mps_err *err)
{
    (void)ctx; (void)g; (void)err;
    memmove(out, in + displs[0], (size_t)counts[0] * sizeof(float));
    return 0;
}

static int self_gather(void *ctx, mps_group g, const float *in, float *out, const int64_t *counts,
                       const int64_t *displs, mps_err *err)
{
    (void)ctx; (void)g; (void)err;
    memmove(out + displs[0], in, (size_t)counts[0] * sizeof(float));
    return 0;
}

static int self_p2p(void *ctx, int peer, float *buf, int64_t n, int tag, mps_err *err)
{
    (void)ctx; (void)buf; (void)n; (void)tag;
    return mps_fail(err, MPS_EFAIL, "no rank %d in a one-process run", peer);
}

static int self_send(void *ctx, int peer, const float *buf, int64_t n, int tag, mps_err *err)
{
    return self_p2p(ctx, peer, (float *)buf, n, tag, err);
}

static int self_send_wait(void *ctx, const float *buf, mps_err *err)
{
    (void)ctx; (void)buf; (void)err;
    return 0;
}

static int self_flush(void *ctx, mps_err *err)
{
    (void)ctx; (void)err;
    return 0;
}

static int self_bcast(void *ctx, void *buf, int64_t n, int root, mps_err *err)
{
    (void)ctx; (void)buf; (void)n; (void)root; (void)err;
    return 0;
}

static int self_all_ok(void *ctx, int ok)
{
    (void)ctx;
    return ok != 0;
}

void mps_comm_self(mps_comm *out)
{
    *out = (mps_comm){ .ctx = NULL, .rank = 0, .size = 1, .allreduce_sum = self_noop, .allreduce_max = self_noop,
                       .allreduce_sum_f64 = self_noop_f64, .reduce_scatter = self_copy, .allgather = self_gather,
                       .send = self_send, .send_wait = self_send_wait, .recv = self_p2p, .flush = self_flush,
                       .barrier = self_flush,
                       .bcast_bytes = self_bcast,
                       .all_ok = self_all_ok };
}
