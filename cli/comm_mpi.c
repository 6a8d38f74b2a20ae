/* The trainer's MPI communication backend (host memory): one communicator per DP and TP group,
 * split from MPI_COMM_WORLD by the layout's rank order. */
#include <limits.h>
#include <stdlib.h>

#include "cli.h"
#include "comm_mpi.h"

#ifdef MPS_HAVE_MPI
#include <mpi.h>

typedef struct {
    MPI_Comm group[MPS_GROUP_COUNT];
    MPI_Request *pending; /* sends not yet waited for */
    const float **sent;   /* the buffer of each */
    int npending, cap;
    int *icounts, *idispls; /* scratch for the v-collectives */
    int gmax;
} mpi_ctx;

static int to_int(int64_t n, const char *what, mps_err *err)
{
    if (n < 0 || n > INT_MAX)
        return mps_fail(err, MPS_EUNSUPPORTED, "%s of %lld elements exceeds MPI's int count", what, (long long)n);
    return 0;
}

static int mpi_check(int rc, const char *what, mps_err *err)
{
    if (rc == MPI_SUCCESS)
        return 0;
    char text[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, text, &len);
    return mps_fail(err, MPS_EIO, "MPI %s failed: %s", what, text);
}

static int allreduce(void *c, mps_group g, void *buf, int64_t n, MPI_Datatype t, MPI_Op op, mps_err *err)
{
    mpi_ctx *x = c;
    if (to_int(n, "all-reduce", err))
        return -1;
    return mpi_check(MPI_Allreduce(MPI_IN_PLACE, buf, (int)n, t, op, x->group[g]), "all-reduce", err);
}

static int ar_sum(void *c, mps_group g, float *buf, int64_t n, mps_err *err)
{
    return allreduce(c, g, buf, n, MPI_FLOAT, MPI_SUM, err);
}

static int ar_max(void *c, mps_group g, float *buf, int64_t n, mps_err *err)
{
    return allreduce(c, g, buf, n, MPI_FLOAT, MPI_MAX, err);
}

static int ar_sum64(void *c, mps_group g, double *buf, int64_t n, mps_err *err)
{
    return allreduce(c, g, buf, n, MPI_DOUBLE, MPI_SUM, err);
}

/* counts/displs to int, for a group of `size` members */
static int int_counts(mpi_ctx *x, int size, const int64_t *counts, const int64_t *displs, mps_err *err)
{
    if (size > x->gmax) {
        free(x->icounts);
        free(x->idispls);
        x->icounts = malloc((size_t)size * sizeof(int));
        x->idispls = malloc((size_t)size * sizeof(int));
        if (!x->icounts || !x->idispls)
            return mps_fail(err, MPS_ENOMEM, "out of memory for MPI counts");
        x->gmax = size;
    }
    for (int i = 0; i < size; i++) {
        if (to_int(counts[i], "a collective", err) || to_int(displs[i] + counts[i], "a collective", err))
            return -1;
        x->icounts[i] = (int)counts[i];
        x->idispls[i] = (int)displs[i];
    }
    return 0;
}

static int reduce_scatter(void *c, mps_group g, const float *in, float *out, const int64_t *counts,
                          const int64_t *displs, mps_err *err)
{
    mpi_ctx *x = c;
    int size;
    MPI_Comm_size(x->group[g], &size);
    if (int_counts(x, size, counts, displs, err))
        return -1;
    /* MPI_Reduce_scatter takes the parts back to back, which is how ZeRO partitions lie */
    for (int i = 1; i < size; i++)
        if (displs[i] != displs[i - 1] + counts[i - 1])
            return mps_fail(err, MPS_EFAIL, "reduce-scatter parts are not contiguous");
    return mpi_check(MPI_Reduce_scatter(in + displs[0], out, x->icounts, MPI_FLOAT, MPI_SUM, x->group[g]),
                     "reduce-scatter", err);
}

static int allgather(void *c, mps_group g, const float *in, float *out, const int64_t *counts,
                     const int64_t *displs, mps_err *err)
{
    mpi_ctx *x = c;
    int size, me;
    MPI_Comm_size(x->group[g], &size);
    MPI_Comm_rank(x->group[g], &me);
    if (int_counts(x, size, counts, displs, err))
        return -1;
    return mpi_check(MPI_Allgatherv(in, x->icounts[me], MPI_FLOAT, out, x->icounts, x->idispls, MPI_FLOAT,
                                    x->group[g]), "all-gather", err);
}

static int p2p_send(void *c, int peer, const float *buf, int64_t n, int tag, mps_err *err)
{
    mpi_ctx *x = c;
    if (to_int(n, "a send", err))
        return -1;
    if (x->npending == x->cap) {
        int cap = x->cap ? 2 * x->cap : 16;
        MPI_Request *p = realloc(x->pending, (size_t)cap * sizeof *p);
        if (p)
            x->pending = p;
        const float **b = p ? realloc(x->sent, (size_t)cap * sizeof *b) : NULL;
        if (!b)
            return mps_fail(err, MPS_ENOMEM, "out of memory for MPI requests");
        x->sent = b;
        x->cap = cap;
    }
    x->sent[x->npending] = buf;
    return mpi_check(MPI_Isend(buf, (int)n, MPI_FLOAT, peer, tag, MPI_COMM_WORLD, &x->pending[x->npending++]),
                     "send", err);
}

/* waits for the sends from buf; the others stay pending, in their order */
static int p2p_send_wait(void *c, const float *buf, mps_err *err)
{
    mpi_ctx *x = c;
    int rc = MPI_SUCCESS, kept = 0;
    for (int i = 0; i < x->npending; i++) {
        if (x->sent[i] == buf) {
            int r = MPI_Wait(&x->pending[i], MPI_STATUS_IGNORE);
            if (rc == MPI_SUCCESS)
                rc = r;
            continue;
        }
        x->pending[kept] = x->pending[i];
        x->sent[kept++] = x->sent[i];
    }
    x->npending = kept;
    return mpi_check(rc, "wait for a send", err);
}

static int p2p_recv(void *c, int peer, float *buf, int64_t n, int tag, mps_err *err)
{
    (void)c;
    if (to_int(n, "a receive", err))
        return -1;
    return mpi_check(MPI_Recv(buf, (int)n, MPI_FLOAT, peer, tag, MPI_COMM_WORLD, MPI_STATUS_IGNORE), "receive", err);
}

static int flush(void *c, mps_err *err)
{
    mpi_ctx *x = c;
    int rc = MPI_Waitall(x->npending, x->pending, MPI_STATUSES_IGNORE);
    x->npending = 0;
    return mpi_check(rc, "wait for sends", err);
}

static int barrier(void *c, mps_err *err)
{
    (void)c;
    return mpi_check(MPI_Barrier(MPI_COMM_WORLD), "barrier", err);
}

static int bcast_bytes(void *c, void *buf, int64_t n, int root, mps_err *err)
{
    (void)c;
    if (to_int(n, "a broadcast", err))
        return -1;
    return mpi_check(MPI_Bcast(buf, (int)n, MPI_BYTE, root, MPI_COMM_WORLD), "broadcast", err);
}

static int all_ok(void *c, int ok)
{
    (void)c;
    int all = 0;
    MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_LAND, MPI_COMM_WORLD);
    return all;
}

void cli_comm_abort(int code)
{
    MPI_Abort(MPI_COMM_WORLD, code);
}

int cli_comm_mpi_new(const mps_layout *L, mps_comm *out, mps_err *err)
{
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (size != mps_layout_world(L))
        return mps_fail(err, MPS_EUSAGE, "--layout needs dp*pp*tp = %d processes but mpirun started %d",
                        mps_layout_world(L), size);
    mpi_ctx *x = calloc(1, sizeof *x);
    if (!x)
        return mps_fail(err, MPS_ENOMEM, "out of memory");
    mps_coords me = mps_layout_coords(L, rank);
    x->group[MPS_GROUP_WORLD] = MPI_COMM_WORLD;
    /* DP group: same stage and TP part; TP group: same stage and DP replica */
    if (mpi_check(MPI_Comm_split(MPI_COMM_WORLD, me.pp * L->tp + me.tp, me.dp, &x->group[MPS_GROUP_DP]), "split", err) ||
        mpi_check(MPI_Comm_split(MPI_COMM_WORLD, me.pp * L->dp + me.dp, me.tp, &x->group[MPS_GROUP_TP]), "split", err)) {
        free(x);
        return -1;
    }
    *out = (mps_comm){ .ctx = x, .rank = rank, .size = size, .allreduce_sum = ar_sum, .allreduce_max = ar_max,
                       .allreduce_sum_f64 = ar_sum64, .reduce_scatter = reduce_scatter, .allgather = allgather,
                       .send = p2p_send, .send_wait = p2p_send_wait, .recv = p2p_recv, .flush = flush,
                       .barrier = barrier,
                       .bcast_bytes = bcast_bytes, .all_ok = all_ok };
    return 0;
}

void cli_comm_mpi_free(mps_comm *c)
{
    mpi_ctx *x = c->ctx;
    if (!x)
        return;
    MPI_Comm_free(&x->group[MPS_GROUP_DP]);
    MPI_Comm_free(&x->group[MPS_GROUP_TP]);
    free(x->pending);
    free(x->sent);
    free(x->icounts);
    free(x->idispls);
    free(x);
    c->ctx = NULL;
}
#else
void cli_comm_abort(int code)
{
    (void)code;
}

int cli_comm_mpi_new(const mps_layout *L, mps_comm *out, mps_err *err)
{
    (void)L; (void)out;
    return mps_fail(err, MPS_EUNSUPPORTED, "this build has no MPI support");
}

void cli_comm_mpi_free(mps_comm *c)
{
    (void)c;
}
#endif
