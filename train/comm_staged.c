/* Collectives over device buffers through a host-memory backend (MPI): every call copies the
 * device data to a host scratch, runs the inner collective there and copies the result back.
 * This is the fallback that lets several ranks share one GPU (NCCL refuses two ranks on one
 * device), so multi-rank layouts run on a single-GPU machine. Deferred mode (tests) adds the
 * started collectives of comm.h, run late with their inputs checked (comm_staged.h). */
#include <stdlib.h>
#include <string.h>

#include "comm.h"
#include "comm_staged.h"

typedef struct {
    mps_comm inner;
    const mps_backend *be;
    float *host[2];    /* scratch for in and out */
    size_t cap[2];     /* bytes */
    /* sends stay pending until send_wait or flush: each keeps its own host copy */
    struct staged_send {
        float *host;      /* what the inner backend sends */
        const float *src; /* the caller's (device) buffer */
        int64_t n;
    } *pending;
    int npending, pcap;
    int check_sends;      /* deferred mode: send_wait and flush check that src did not change */
} staged;

static float *scratch(staged *s, int which, int64_t n, mps_err *err)
{
    size_t bytes = (size_t)(n > 0 ? n : 1) * sizeof(float);
    if (bytes > s->cap[which]) {
        free(s->host[which]);
        s->host[which] = malloc(bytes);
        s->cap[which] = s->host[which] ? bytes : 0;
        if (!s->host[which]) {
            mps_fail(err, MPS_ENOMEM, "out of host memory staging %lld elements", (long long)n);
            return NULL;
        }
    }
    return s->host[which];
}

static int ar(void *c, mps_group g, float *buf, int64_t n, int max, mps_err *err)
{
    staged *s = c;
    float *h = scratch(s, 0, n, err);
    if (!h || s->be->sync(s->be->ctx, err) != 0)
        return -1;
    s->be->to_host(s->be->ctx, h, buf, (size_t)n * sizeof(float));
    int rc = (max ? s->inner.allreduce_max : s->inner.allreduce_sum)(s->inner.ctx, g, h, n, err);
    if (rc == 0)
        s->be->from_host(s->be->ctx, buf, h, (size_t)n * sizeof(float));
    return rc;
}

static int ar_sum(void *c, mps_group g, float *buf, int64_t n, mps_err *err) { return ar(c, g, buf, n, 0, err); }
static int ar_max(void *c, mps_group g, float *buf, int64_t n, mps_err *err) { return ar(c, g, buf, n, 1, err); }

/* host values: passed through */
static int ar_sum64(void *c, mps_group g, double *buf, int64_t n, mps_err *err)
{
    staged *s = c;
    return s->inner.allreduce_sum_f64(s->inner.ctx, g, buf, n, err);
}

static int64_t group_total(const int64_t *counts, const int64_t *displs, int size)
{
    int64_t end = 0;
    for (int i = 0; i < size; i++)
        if (displs[i] + counts[i] > end)
            end = displs[i] + counts[i];
    return end;
}

static int rs(void *c, mps_group g, const float *in, float *out, const int64_t *counts, const int64_t *displs,
              int gsize, int gme, mps_err *err)
{
    staged *s = c;
    int64_t total = group_total(counts, displs, gsize);
    float *hin = scratch(s, 0, total, err), *hout = hin ? scratch(s, 1, counts[gme], err) : NULL;
    if (!hout || s->be->sync(s->be->ctx, err) != 0)
        return -1;
    s->be->to_host(s->be->ctx, hin, in, (size_t)total * sizeof(float));
    int rc = s->inner.reduce_scatter(s->inner.ctx, g, hin, hout, counts, displs, err);
    if (rc == 0)
        s->be->from_host(s->be->ctx, out, hout, (size_t)counts[gme] * sizeof(float));
    return rc;
}

static int ag(void *c, mps_group g, const float *in, float *out, const int64_t *counts, const int64_t *displs,
              int gsize, int gme, mps_err *err)
{
    staged *s = c;
    int64_t total = group_total(counts, displs, gsize);
    float *hin = scratch(s, 0, counts[gme], err), *hout = hin ? scratch(s, 1, total, err) : NULL;
    if (!hout || s->be->sync(s->be->ctx, err) != 0)
        return -1;
    s->be->to_host(s->be->ctx, hin, in, (size_t)counts[gme] * sizeof(float));
    int rc = s->inner.allgather(s->inner.ctx, g, hin, hout, counts, displs, err);
    if (rc == 0)
        for (int i = 0; i < gsize; i++)
            s->be->from_host(s->be->ctx, out + displs[i], hout + displs[i], (size_t)counts[i] * sizeof(float));
    return rc;
}

/* A started collective on one buffer (deferred mode): what it reads must not change until
 * finish_started, and a host copy of that taken at the start tells whether it did. */
typedef enum { OP_SUM, OP_SCATTER, OP_GATHER } op_kind;
typedef struct {
    op_kind kind;
    mps_group g;
    float *buf;                     /* SUM, GATHER: in place; SCATTER: out */
    const int64_t *counts, *displs; /* SCATTER, GATHER: the group's parts */
    const float *watched;           /* the input: SUM buf, SCATTER in, GATHER this member's part */
    int64_t n;                      /* its elements */
    float *snapshot;                /* (host) */
} deferred_op;

/* The group size and this rank's index come from the inner backend's view (mps_comm_staged_new). */
typedef struct {
    staged s;
    int gsize[MPS_GROUP_COUNT], gme[MPS_GROUP_COUNT];
    deferred_op *ops; /* started, not yet finished */
    int nops, opcap;
} staged_groups;

static int rs_g(void *c, mps_group g, const float *in, float *out, const int64_t *counts, const int64_t *displs,
                mps_err *err)
{
    staged_groups *x = c;
    return rs(&x->s, g, in, out, counts, displs, x->gsize[g], x->gme[g], err);
}

static int ag_g(void *c, mps_group g, const float *in, float *out, const int64_t *counts, const int64_t *displs,
                mps_err *err)
{
    staged_groups *x = c;
    return ag(&x->s, g, in, out, counts, displs, x->gsize[g], x->gme[g], err);
}

/* ---- deferred mode: started collectives run at finish_started, their inputs checked ---- */

static float *host_copy(staged *s, const float *buf, int64_t n, mps_err *err)
{
    float *h = malloc(sizeof(float) * (size_t)(n > 0 ? n : 1));
    if (!h) {
        mps_fail(err, MPS_ENOMEM, "out of host memory");
        return NULL;
    }
    if (s->be->sync(s->be->ctx, err) != 0) {
        free(h);
        return NULL;
    }
    s->be->to_host(s->be->ctx, h, buf, (size_t)n * sizeof(float));
    return h;
}

static int run_op(staged_groups *x, const deferred_op *op, mps_err *err)
{
    switch (op->kind) {
    case OP_SUM:
        return ar_sum(x, op->g, op->buf, op->n, err);
    case OP_SCATTER:
        return rs_g(x, op->g, op->watched, op->buf, op->counts, op->displs, err);
    case OP_GATHER: /* (ag stages this member's part before it writes the others) */
        return ag_g(x, op->g, op->watched, op->buf, op->counts, op->displs, err);
    }
    return mps_fail(err, MPS_EFAIL, "a started collective of unknown kind");
}

/* start: kept with a copy of its input; else done now */
static int start_or_run(staged_groups *x, deferred_op op, int start, mps_err *err)
{
    if (!start)
        return run_op(x, &op, err);
    if (x->nops == x->opcap) {
        int cap = x->opcap ? 2 * x->opcap : 64;
        deferred_op *ops = realloc(x->ops, sizeof *ops * (size_t)cap);
        if (!ops)
            return mps_fail(err, MPS_ENOMEM, "out of host memory");
        x->ops = ops;
        x->opcap = cap;
    }
    if ((op.snapshot = host_copy(&x->s, op.watched, op.n, err)) == NULL)
        return -1;
    x->ops[x->nops++] = op;
    return 0;
}

static int finish_started(void *c, mps_err *err)
{
    staged_groups *x = c;
    int rc = 0;
    for (int i = 0; i < x->nops; i++) {
        deferred_op *op = &x->ops[i];
        float *now = rc == 0 ? host_copy(&x->s, op->watched, op->n, err) : NULL;
        if (rc == 0 && !now)
            rc = -1;
        if (rc == 0 && memcmp(now, op->snapshot, sizeof(float) * (size_t)op->n) != 0)
            rc = mps_fail(err, MPS_EFAIL, "rank %d: the input of a started collective (%lld elements) changed "
                          "before finish_started", x->s.inner.rank, (long long)op->n);
        if (rc == 0)
            rc = run_op(x, op, err);
        free(now);
        free(op->snapshot);
    }
    x->nops = 0;
    return rc;
}

static int ar_many(void *c, mps_group g, float *const *bufs, const int64_t *ns, int count, int start, mps_err *err)
{
    for (int i = 0; i < count; i++) {
        deferred_op op = { .kind = OP_SUM, .g = g, .buf = bufs[i], .watched = bufs[i], .n = ns[i] };
        if (start_or_run(c, op, start, err) != 0)
            return -1;
    }
    return 0;
}

static int rs_many(void *c, mps_group g, const float *const *ins, float *const *outs, const int64_t *const *counts,
                   const int64_t *const *displs, int count, int start, mps_err *err)
{
    staged_groups *x = c;
    for (int i = 0; i < count; i++) {
        deferred_op op = { .kind = OP_SCATTER, .g = g, .buf = outs[i], .counts = counts[i], .displs = displs[i],
                           .watched = ins[i],
                           .n = group_total(counts[i], displs[i], x->gsize[g]) };
        if (start_or_run(x, op, start, err) != 0)
            return -1;
    }
    return 0;
}

static int ag_many(void *c, mps_group g, float *const *bufs, const int64_t *const *counts,
                   const int64_t *const *displs, int count, int start, mps_err *err)
{
    staged_groups *x = c;
    const int me = x->gme[g];
    for (int i = 0; i < count; i++) {
        deferred_op op = { .kind = OP_GATHER, .g = g, .buf = bufs[i], .counts = counts[i], .displs = displs[i],
                           .watched = bufs[i] + displs[i][me], .n = counts[i][me] };
        if (start_or_run(x, op, start, err) != 0)
            return -1;
    }
    return 0;
}

static int send(void *c, int peer, const float *buf, int64_t n, int tag, mps_err *err)
{
    staged *s = c;
    if (s->npending == s->pcap) {
        int cap = s->pcap ? 2 * s->pcap : 16;
        struct staged_send *p = realloc(s->pending, (size_t)cap * sizeof *p);
        if (!p)
            return mps_fail(err, MPS_ENOMEM, "out of host memory for sends");
        s->pending = p;
        s->pcap = cap;
    }
    float *h = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    if (!h)
        return mps_fail(err, MPS_ENOMEM, "out of host memory staging a send");
    if (s->be->sync(s->be->ctx, err) != 0) {
        free(h);
        return -1;
    }
    s->be->to_host(s->be->ctx, h, buf, (size_t)n * sizeof(float));
    s->pending[s->npending++] = (struct staged_send){ h, buf, n };
    return s->inner.send(s->inner.ctx, peer, h, n, tag, err);
}

/* The inner send of pending[i] done; in deferred mode its source checked unchanged (a caller that
 * wrote it before send_wait or flush, which NCCL would have sent half-written, fails here). */
static int send_done(staged *s, int i, mps_err *err)
{
    struct staged_send *p = &s->pending[i];
    int rc = s->inner.send_wait(s->inner.ctx, p->host, err);
    if (rc == 0 && s->check_sends) {
        float *now = malloc((size_t)(p->n > 0 ? p->n : 1) * sizeof(float));
        if (!now || s->be->sync(s->be->ctx, err) != 0)
            rc = now ? -1 : mps_fail(err, MPS_ENOMEM, "out of host memory");
        if (rc == 0) {
            s->be->to_host(s->be->ctx, now, p->src, (size_t)p->n * sizeof(float));
            if (memcmp(now, p->host, (size_t)p->n * sizeof(float)) != 0)
                rc = mps_fail(err, MPS_EFAIL, "rank %d: the buffer of a send (%lld elements) was written before the "
                              "send was waited for", s->inner.rank, (long long)p->n);
        }
        free(now);
    }
    free(p->host);
    p->host = NULL;
    return rc;
}

static int send_wait(void *c, const float *buf, mps_err *err)
{
    staged *s = c;
    int rc = 0, kept = 0;
    for (int i = 0; i < s->npending; i++) {
        if (s->pending[i].src == buf) {
            int r = send_done(s, i, err);
            if (rc == 0)
                rc = r;
            continue;
        }
        s->pending[kept++] = s->pending[i];
    }
    s->npending = kept;
    return rc;
}

static int recv(void *c, int peer, float *buf, int64_t n, int tag, mps_err *err)
{
    staged *s = c;
    float *h = scratch(s, 0, n, err);
    if (!h || s->inner.recv(s->inner.ctx, peer, h, n, tag, err) != 0)
        return -1;
    s->be->from_host(s->be->ctx, buf, h, (size_t)n * sizeof(float));
    return 0;
}

static int flush(void *c, mps_err *err)
{
    staged *s = c;
    int rc = 0;
    for (int i = 0; i < s->npending; i++) {
        int r = send_done(s, i, err);
        if (rc == 0)
            rc = r;
    }
    s->npending = 0;
    int r = s->inner.flush(s->inner.ctx, err);
    return rc != 0 ? rc : r;
}

static int barrier(void *c, mps_err *err)
{
    staged *s = c;
    return s->inner.barrier(s->inner.ctx, err);
}

static int bcast(void *c, void *buf, int64_t n, int root, mps_err *err)
{
    staged *s = c; /* host bytes */
    return s->inner.bcast_bytes(s->inner.ctx, buf, n, root, err);
}

static int all_ok(void *c, int ok)
{
    staged *s = c;
    return s->inner.all_ok(s->inner.ctx, ok);
}

int mps_comm_staged_new(const mps_comm *inner, const mps_backend *be, const int *group_size, const int *group_index,
                        int deferred, mps_comm *out, mps_err *err)
{
    staged_groups *x = calloc(1, sizeof *x);
    if (!x)
        return mps_fail(err, MPS_ENOMEM, "out of memory");
    x->s.inner = *inner;
    x->s.be = be;
    for (int g = 0; g < MPS_GROUP_COUNT; g++) {
        x->gsize[g] = group_size[g];
        x->gme[g] = group_index[g];
    }
    *out = (mps_comm){ .ctx = x, .rank = inner->rank, .size = inner->size, .allreduce_sum = ar_sum,
                       .allreduce_max = ar_max, .allreduce_sum_f64 = ar_sum64, .reduce_scatter = rs_g,
                       .allgather = ag_g, .send = send, .send_wait = send_wait, .recv = recv, .flush = flush,
                       .barrier = barrier,
                       .bcast_bytes = bcast, .all_ok = all_ok };
    if (deferred) {
        x->s.check_sends = 1;
        out->allreduce_sum_many = ar_many;
        out->reduce_scatter_many = rs_many;
        out->allgather_many = ag_many;
        out->can_start = 1;
        out->finish_started = finish_started;
    }
    return 0;
}

void mps_comm_staged_free(mps_comm *c)
{
    staged_groups *x = c->ctx;
    if (!x)
        return;
    for (int i = 0; i < x->nops; i++)
        free(x->ops[i].snapshot);
    free(x->ops);
    for (int i = 0; i < x->s.npending; i++)
        free(x->s.pending[i].host);
    free(x->s.pending);
    free(x->s.host[0]);
    free(x->s.host[1]);
    free(x);
    c->ctx = NULL;
}
