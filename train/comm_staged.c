/* Collectives over device buffers through a host-memory backend (MPI): every call copies the
 * device data to a host scratch, runs the inner collective there and copies the result back.
 * This is the fallback that lets several ranks share one GPU (NCCL refuses two ranks on one
 * device), so multi-rank layouts run on a single-GPU machine. */
#include <stdlib.h>
#include <string.h>

#include "comm.h"
#include "comm_staged.h"

typedef struct {
    mps_comm inner;
    const mps_backend *be;
    float *host[2];    /* scratch for in and out */
    size_t cap[2];     /* bytes */
    /* sends stay pending until flush: each keeps its own host copy */
    float **pending;
    int npending, pcap;
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

/* The group size and this rank's index come from the inner backend's view (mps_comm_staged_new). */
typedef struct {
    staged s;
    int gsize[MPS_GROUP_COUNT], gme[MPS_GROUP_COUNT];
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

static int send(void *c, int peer, const float *buf, int64_t n, int tag, mps_err *err)
{
    staged *s = c;
    if (s->npending == s->pcap) {
        int cap = s->pcap ? 2 * s->pcap : 16;
        float **p = realloc(s->pending, (size_t)cap * sizeof *p);
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
    s->pending[s->npending++] = h;
    return s->inner.send(s->inner.ctx, peer, h, n, tag, err);
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
    int rc = s->inner.flush(s->inner.ctx, err);
    for (int i = 0; i < s->npending; i++)
        free(s->pending[i]);
    s->npending = 0;
    return rc;
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
                        mps_comm *out, mps_err *err)
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
                       .allgather = ag_g, .send = send, .recv = recv, .flush = flush, .barrier = barrier,
                       .bcast_bytes = bcast, .all_ok = all_ok };
    return 0;
}

void mps_comm_staged_free(mps_comm *c)
{
    staged_groups *x = c->ctx;
    if (!x)
        return;
    for (int i = 0; i < x->s.npending; i++)
        free(x->s.pending[i]);
    free(x->s.pending);
    free(x->s.host[0]);
    free(x->s.host[1]);
    free(x);
    c->ctx = NULL;
}
