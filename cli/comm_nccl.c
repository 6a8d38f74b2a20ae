/* The trainer's NCCL communication backend: DP and TP collectives and pipeline messages run on
 * the GPUs through NCCL (one communicator per group, split from a world communicator whose id
 * rank 0 broadcasts over MPI); host scalars and agreement go through the MPI backend. NCCL needs
 * one GPU per rank: with fewer GPUs than ranks on a node the trainer uses the staged MPI backend
 * alone.
 *
 * Streams: the synchronous collectives (TP sums, ZeRO's reduce-scatter and all-gather) run on
 * one stream after a host wait for the compute stream, and the host waits for them. The DP
 * gradient sums the engine starts during the backward (comm.h can_start) run on a stream of
 * their own behind an event of the compute stream, and the compute stream waits for them at
 * finish_started: no host wait. Pipeline messages go the same way, without host waits, on four
 * communicators and streams, one per channel of train/pipeline.h (direction x the parity of the
 * sending stage): a NCCL send blocks its stream until the peer receives, so on one stream 1F1B's
 * steady state deadlocks (stage s sends forward then receives backward while stage s + 1 sends
 * backward then receives forward), and on one stream per direction a send waiting for a busy
 * next stage holds up the receive from the stage before. Per channel a rank only sends or only
 * receives.
 *
 * NCCL's documentation asks that communicators not be used concurrently; here the DP, TP and
 * pipeline communicators do overlap (as in PyTorch and Megatron). Every rank issues each
 * communicator's operations in the same order, and NCCL's kernels occupy a few SMs each, so
 * they cannot starve one another of the GPU. */
#include "comm_nccl.h"

#if defined(MPS_HAVE_NCCL) && defined(MPS_HAVE_MPI)
#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>
#include <stdlib.h>
#include <string.h>

#include "comm_staged.h"
#include "pipeline.h"

enum { CHANNELS = MPS_PIPE_CHANNELS }; /* train/pipeline.h */
/* buffers whose latest send send_wait can wait for alone: the engine sends from two per direction
 * (a ring, mps_pipe_send_buffers) and the tied head's copy; more fall back to every channel */
enum { SENT_MAX = 8 };

typedef struct {
    mps_comm host;          /* staged MPI: f64, bcast, barrier, all_ok */
    const mps_backend *be;
    ncclComm_t group[MPS_GROUP_COUNT];
    ncclComm_t p2p[CHANNELS]; /* mps_pipe_channel(): splits of WORLD */
    int gsize[MPS_GROUP_COUNT], gme[MPS_GROUP_COUNT];
    cudaStream_t stream;    /* synchronous collectives */
    cudaStream_t compute;   /* the backend's stream (not ours) */
    cudaStream_t started;   /* collectives started without a wait (comm.h can_start) */
    cudaStream_t p2p_stream[CHANNELS];
    mps_layout L;           /* for the pipeline stage of a peer */
    cudaEvent_t ev_compute, ev_started, ev_p2p;
    int nstarted;           /* group calls started since the last finish_started */
    /* since the last flush: per buffer sent from, an event after its latest send on its channel */
    struct {
        const float *buf;
        int channel;
        cudaEvent_t ev;
    } sent[SENT_MAX];
    int nsent, sent_unknown; /* sent_unknown: a send that has no entry (then send_wait waits for all) */
} nccl_ctx;

static int nccl_check(ncclResult_t r, const char *what, mps_err *err)
{
    if (r == ncclSuccess)
        return 0;
    return mps_fail(err, MPS_EIO, "NCCL %s failed: %s", what, ncclGetErrorString(r));
}

static int cuda_check(cudaError_t r, const char *what, mps_err *err)
{
    if (r == cudaSuccess)
        return 0;
    return mps_fail(err, MPS_EIO, "CUDA %s failed: %s", what, cudaGetErrorString(r));
}

/* inputs ready on the compute stream before NCCL reads them; NCCL done before compute goes on */
static int before(nccl_ctx *x, mps_err *err)
{
    return x->be->sync(x->be->ctx, err);
}

static int after(nccl_ctx *x, const char *what, mps_err *err)
{
    return cuda_check(cudaStreamSynchronize(x->stream), what, err);
}

static int ar(void *c, mps_group g, float *buf, int64_t n, ncclRedOp_t op, mps_err *err)
{
    nccl_ctx *x = c;
    if (before(x, err) != 0 ||
        nccl_check(ncclAllReduce(buf, buf, (size_t)n, ncclFloat, op, x->group[g], x->stream), "all-reduce", err))
        return -1;
    return after(x, "all-reduce", err);
}

static int ar_sum(void *c, mps_group g, float *buf, int64_t n, mps_err *err) { return ar(c, g, buf, n, ncclSum, err); }

static int ar_max(void *c, mps_group g, float *buf, int64_t n, mps_err *err) { return ar(c, g, buf, n, ncclMax, err); }
/* stream `s` waits for the work issued on the compute stream so far */
static int after_compute(nccl_ctx *x, cudaStream_t s, mps_err *err)
{
    if (cuda_check(cudaEventRecord(x->ev_compute, x->compute), "event record", err) != 0)
        return -1;
    return cuda_check(cudaStreamWaitEvent(s, x->ev_compute, 0), "stream wait", err);
}

/* the compute stream's later work waits for everything issued on stream `s` so far */
static int compute_after(nccl_ctx *x, cudaStream_t s, cudaEvent_t ev, mps_err *err)
{
    if (cuda_check(cudaEventRecord(ev, s), "event record", err) != 0)
        return -1;
    return cuda_check(cudaStreamWaitEvent(x->compute, ev, 0), "stream wait", err);
}

/* Several collectives in one NCCL group call. Synchronous: one host wait for the compute stream
 * before, one for our stream after (a wait per tensor made ~150 round trips per step). Started:
 * on the `started` stream behind an event of the compute stream, no host wait (finish_started). */
static cudaStream_t many_begin(nccl_ctx *x, int start, mps_err *err)
{
    cudaStream_t s = start ? x->started : x->stream;
    if ((start ? after_compute(x, s, err) : before(x, err)) != 0 || nccl_check(ncclGroupStart(), "group start", err) != 0)
        return NULL;
    return s;
}

static int many_end(nccl_ctx *x, int rc, int start, const char *what, mps_err *err)
{
    /* the group is closed even after a failed call (the first error is the one reported) */
    if (nccl_check(ncclGroupEnd(), "group end", err) != 0)
        rc = -1;
    if (rc != 0)
        return -1;
    if (start) {
        x->nstarted++;
        return 0;
    }
    return after(x, what, err);
}

static int ar_sum_many(void *c, mps_group g, float *const *bufs, const int64_t *ns, int count, int start, mps_err *err)
{
    nccl_ctx *x = c;
    if (count <= 0)
        return 0;
    cudaStream_t s = many_begin(x, start, err);
    if (!s)
        return -1;
    int rc = 0;
    for (int i = 0; i < count && rc == 0; i++)
        if (ns[i] > 0)
            rc = nccl_check(ncclAllReduce(bufs[i], bufs[i], (size_t)ns[i], ncclFloat, ncclSum, x->group[g], s),
                            "all-reduce", err);
    return many_end(x, rc, start, "all-reduce", err);
}

/* ZeRO's parts differ in size by one element at most, and NCCL's reduce-scatter and all-gather
 * take equal parts: as a group of one call per member's part, each part goes straight to its place
 * without padding copies, moving the same bytes as the ring collectives ((members - 1) parts sent
 * per member). reduce: member r's outs[i] receives the sum of part r of every member's ins[i];
 * else (broadcast, in place, outs == ins): part r of member r's buffer goes to every member. */
static int per_part(nccl_ctx *x, mps_group g, int reduce, const float *const *ins, float *const *outs,
                    const int64_t *const *counts, const int64_t *const *displs, int count, int start, mps_err *err)
{
    if (count <= 0)
        return 0;
    cudaStream_t s = many_begin(x, start, err);
    if (!s)
        return -1;
    int rc = 0;
    for (int i = 0; i < count && rc == 0; i++)
        for (int r = 0; r < x->gsize[g] && rc == 0; r++) {
            size_t n = (size_t)counts[i][r];
            const float *part = ins[i] + displs[i][r];
            if (n > 0)
                rc = reduce ? nccl_check(ncclReduce(part, outs[i], n, ncclFloat, ncclSum, r, x->group[g], s), "reduce", err)
                            : nccl_check(ncclBroadcast(part, outs[i] + displs[i][r], n, ncclFloat, r, x->group[g], s),
                                         "broadcast", err);
        }
    return many_end(x, rc, start, reduce ? "reduce-scatter" : "all-gather", err);
}

static int rs_many(void *c, mps_group g, const float *const *ins, float *const *outs, const int64_t *const *counts,
                   const int64_t *const *displs, int count, int start, mps_err *err)
{
    return per_part(c, g, 1, ins, outs, counts, displs, count, start, err);
}

static int ag_many(void *c, mps_group g, float *const *bufs, const int64_t *const *counts, const int64_t *const *displs,
                   int count, int start, mps_err *err)
{
    return per_part(c, g, 0, (const float *const *)bufs, bufs, counts, displs, count, start, err);
}

static int reduce_scatter(void *c, mps_group g, const float *in, float *out, const int64_t *counts,
                          const int64_t *displs, mps_err *err)
{
    return per_part(c, g, 1, &in, &out, &counts, &displs, 1, 0, err);
}

/* out of place: the own part copied to its place first (ordered before the broadcasts on our stream) */
static int allgather(void *c, mps_group g, const float *in, float *out, const int64_t *counts, const int64_t *displs,
                     mps_err *err)
{
    nccl_ctx *x = c;
    int me = x->gme[g];
    if (before(x, err) != 0 ||
        cuda_check(cudaMemcpyAsync(out + displs[me], in, (size_t)counts[me] * sizeof(float), cudaMemcpyDeviceToDevice,
                                   x->stream), "copy", err) != 0)
        return -1;
    return per_part(x, g, 0, (const float *const *)&out, &out, &counts, &displs, 1, 0, err);
}

static int finish_started(void *c, mps_err *err)
{
    nccl_ctx *x = c;
    if (x->nstarted == 0)
        return 0;
    x->nstarted = 0;
    return compute_after(x, x->started, x->ev_started, err);
}


/* the rest: the staged MPI backend */
static int ar64(void *c, mps_group g, double *b, int64_t n, mps_err *err)
{
    nccl_ctx *x = c;
    return x->host.allreduce_sum_f64(x->host.ctx, g, b, n, err);
}
/* Pipeline messages (see the top of the file): a send waits on its direction's stream for the
 * compute stream to have made the data, a receive for it to be done with the buffer's old
 * contents; the compute stream then waits for the receive. */
static int p2p_send(void *c, int peer, const float *b, int64_t n, int tag, mps_err *err)
{
    (void)tag;
    nccl_ctx *x = c;
    int ch = mps_pipe_channel(&x->L, x->gme[MPS_GROUP_WORLD], peer);
    if (n <= 0)
        return 0;
    if (after_compute(x, x->p2p_stream[ch], err) != 0 ||
        nccl_check(ncclSend(b, (size_t)n, ncclFloat, peer, x->p2p[ch], x->p2p_stream[ch]), "send", err) != 0)
        return -1;
    int i = 0;
    while (i < x->nsent && x->sent[i].buf != b)
        i++;
    if (i == SENT_MAX || (i < x->nsent && x->sent[i].channel != ch)) {
        x->sent_unknown = 1;
        return 0;
    }
    if (!x->sent[i].ev &&
        cuda_check(cudaEventCreateWithFlags(&x->sent[i].ev, cudaEventDisableTiming), "event", err) != 0)
        return -1;
    if (i == x->nsent)
        x->nsent++;
    x->sent[i].buf = b;
    x->sent[i].channel = ch;
    return cuda_check(cudaEventRecord(x->sent[i].ev, x->p2p_stream[ch]), "event record", err);
}
/* the compute stream's later work waits for the latest send from b (and so for the ones before
 * it on that channel), the host does not */
static int p2p_send_wait(void *c, const float *b, mps_err *err)
{
    nccl_ctx *x = c;
    if (x->sent_unknown) { /* (a send with no entry, maybe from b) */
        for (int ch = 0; ch < CHANNELS; ch++)
            if (compute_after(x, x->p2p_stream[ch], x->ev_p2p, err) != 0)
                return -1;
        return 0;
    }
    for (int i = 0; i < x->nsent; i++)
        if (x->sent[i].buf == b)
            return cuda_check(cudaStreamWaitEvent(x->compute, x->sent[i].ev, 0), "stream wait", err);
    return 0;
}
static int p2p_recv(void *c, int peer, float *b, int64_t n, int tag, mps_err *err)
{
    (void)tag;
    nccl_ctx *x = c;
    int ch = mps_pipe_channel(&x->L, peer, x->gme[MPS_GROUP_WORLD]);
    if (n <= 0)
        return 0;
    if (after_compute(x, x->p2p_stream[ch], err) != 0 ||
        nccl_check(ncclRecv(b, (size_t)n, ncclFloat, peer, x->p2p[ch], x->p2p_stream[ch]), "receive", err) != 0)
        return -1;
    return compute_after(x, x->p2p_stream[ch], x->ev_p2p, err);
}
/* NCCL connects a pair of ranks at their first message, with a host-side handshake: the first
 * send blocks the host until the peer posts its receive. The pipeline's first messages to a
 * peer that is not a neighbour (the tied head's, first <-> last stage) would then deadlock
 * (each of the two stages sends before it receives), so every pipeline connection is made at
 * start: one group of one-element messages per channel, the channels in the same order on
 * every rank. The peers: both neighbouring stages, and the first and last stage each other. */
static int pipeline_connect(nccl_ctx *x, mps_err *err)
{
    const int me = x->gme[MPS_GROUP_WORLD];
    int peers[MPS_PIPE_MAX_PEERS];
    const int npeers = mps_pipe_peers(&x->L, me, peers);
    float *buf = NULL;
    int rc = cuda_check(cudaMalloc((void **)&buf, 2 * MPS_PIPE_MAX_PEERS * sizeof(float)), "alloc", err);
    if (rc == 0)
        rc = cuda_check(cudaMemset(buf, 0, 2 * MPS_PIPE_MAX_PEERS * sizeof(float)), "memset", err);
    for (int ch = 0; ch < CHANNELS && rc == 0; ch++) {
        rc = nccl_check(ncclGroupStart(), "group start", err);
        for (int i = 0; i < npeers && rc == 0; i++) {
            if (mps_pipe_channel(&x->L, me, peers[i]) == ch)
                rc = nccl_check(ncclSend(buf + i, 1, ncclFloat, peers[i], x->p2p[ch], x->p2p_stream[ch]), "send", err);
            if (rc == 0 && mps_pipe_channel(&x->L, peers[i], me) == ch)
                rc = nccl_check(ncclRecv(buf + MPS_PIPE_MAX_PEERS + i, 1, ncclFloat, peers[i], x->p2p[ch],
                                         x->p2p_stream[ch]), "receive", err);
        }
        ncclResult_t end = ncclGroupEnd();
        if (rc == 0)
            rc = nccl_check(end, "group end", err);
    }
    for (int ch = 0; ch < CHANNELS && rc == 0; ch++)
        rc = cuda_check(cudaStreamSynchronize(x->p2p_stream[ch]), "connect", err);
    if (buf)
        cudaFree(buf);
    return rc;
}
/* the sends' buffers are free once the compute stream's later work waits for every channel */
static int flush(void *c, mps_err *err)
{
    nccl_ctx *x = c;
    for (int ch = 0; ch < CHANNELS; ch++)
        if (compute_after(x, x->p2p_stream[ch], x->ev_p2p, err) != 0)
            return -1;
    x->nsent = 0; /* (the events stay, for the next step's sends) */
    x->sent_unknown = 0;
    return x->host.flush(x->host.ctx, err);
}
static int barrier(void *c, mps_err *err)
{
    nccl_ctx *x = c;
    return x->host.barrier(x->host.ctx, err);
}
static int bcast(void *c, void *b, int64_t n, int root, mps_err *err)
{
    nccl_ctx *x = c;
    return x->host.bcast_bytes(x->host.ctx, b, n, root, err);
}
static int all_ok(void *c, int ok)
{
    nccl_ctx *x = c;
    return x->host.all_ok(x->host.ctx, ok);
}

int cli_comm_nccl_new(const mps_layout *L, const mps_comm *mpi, const mps_backend *be, mps_comm *out, mps_err *err)
{
    nccl_ctx *x = calloc(1, sizeof *x);
    if (!x)
        return mps_fail(err, MPS_ENOMEM, "out of memory");
    mps_coords me = mps_layout_coords(L, mpi->rank);
    x->be = be;
    x->L = *L;
    x->gsize[MPS_GROUP_WORLD] = mpi->size;
    x->gme[MPS_GROUP_WORLD] = mpi->rank;
    x->gsize[MPS_GROUP_DP] = L->dp;
    x->gme[MPS_GROUP_DP] = me.dp;
    x->gsize[MPS_GROUP_TP] = L->tp;
    x->gme[MPS_GROUP_TP] = me.tp;
    if (mps_comm_staged_new(mpi, be, x->gsize, x->gme, 0, &x->host, err) != 0) {
        free(x);
        return -1;
    }
    ncclUniqueId id;
    if (mpi->rank == 0 && nccl_check(ncclGetUniqueId(&id), "id", err) != 0)
        memset(&id, 0, sizeof id); /* the broadcast still happens; init then fails everywhere */
    int rc = MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD) == MPI_SUCCESS ? 0 : -1;
    x->compute = be->native_stream ? (cudaStream_t)be->native_stream(be->ctx) : NULL;
    if (rc == 0 && !be->native_stream)
        rc = mps_fail(err, MPS_EUNSUPPORTED, "NCCL needs a backend with a CUDA stream (--backend cuda)");
    if (rc == 0)
        rc = cuda_check(cudaStreamCreateWithFlags(&x->stream, cudaStreamNonBlocking), "stream", err);
    if (rc == 0)
        rc = cuda_check(cudaStreamCreateWithFlags(&x->started, cudaStreamNonBlocking), "stream", err);
    for (int d = 0; d < CHANNELS && rc == 0; d++)
        rc = cuda_check(cudaStreamCreateWithFlags(&x->p2p_stream[d], cudaStreamNonBlocking), "stream", err);
    if (rc == 0)
        rc = cuda_check(cudaEventCreateWithFlags(&x->ev_compute, cudaEventDisableTiming), "event", err);
    if (rc == 0)
        rc = cuda_check(cudaEventCreateWithFlags(&x->ev_started, cudaEventDisableTiming), "event", err);
    if (rc == 0)
        rc = cuda_check(cudaEventCreateWithFlags(&x->ev_p2p, cudaEventDisableTiming), "event", err);
    if (rc == 0)
        rc = nccl_check(ncclCommInitRank(&x->group[MPS_GROUP_WORLD], mpi->size, id, mpi->rank), "init", err);
    /* DP group: same stage and TP part; TP group: same stage and replica (the MPI backend's colours) */
    if (rc == 0)
        rc = nccl_check(ncclCommSplit(x->group[MPS_GROUP_WORLD], me.pp * L->tp + me.tp, me.dp, &x->group[MPS_GROUP_DP],
                                      NULL), "split", err);
    if (rc == 0)
        rc = nccl_check(ncclCommSplit(x->group[MPS_GROUP_WORLD], me.pp * L->dp + me.dp, me.tp, &x->group[MPS_GROUP_TP],
                                      NULL), "split", err);
    /* pipeline messages, one communicator per channel (every rank splits: L is the same everywhere) */
    for (int d = 0; d < CHANNELS && rc == 0 && L->pp > 1; d++)
        rc = nccl_check(ncclCommSplit(x->group[MPS_GROUP_WORLD], 0, mpi->rank, &x->p2p[d], NULL), "split", err);
    if (rc == 0 && L->pp > 1)
        rc = pipeline_connect(x, err);
    if (rc != 0) {
        out->ctx = x;
        cli_comm_nccl_free(out);
        return -1;
    }
    *out = (mps_comm){ .ctx = x, .rank = mpi->rank, .size = mpi->size, .allreduce_sum = ar_sum,
                       .allreduce_sum_many = ar_sum_many,
                       .reduce_scatter_many = rs_many, .allgather_many = ag_many, .can_start = 1,
                       .finish_started = finish_started, .allreduce_max = ar_max, .allreduce_sum_f64 = ar64, .reduce_scatter = reduce_scatter,
                       .allgather = allgather, .send = p2p_send, .send_wait = p2p_send_wait, .recv = p2p_recv,
                       .flush = flush,
                       .barrier = barrier, .bcast_bytes = bcast, .all_ok = all_ok };
    return 0;
}

void cli_comm_nccl_free(mps_comm *c)
{
    nccl_ctx *x = c->ctx;
    if (!x)
        return;
    for (int d = 0; d < CHANNELS; d++)
        if (x->p2p[d])
            ncclCommDestroy(x->p2p[d]);
    for (int g = MPS_GROUP_COUNT - 1; g >= 0; g--)
        if (x->group[g])
            ncclCommDestroy(x->group[g]);
    cudaStream_t streams[] = { x->stream, x->started, x->p2p_stream[0], x->p2p_stream[1], x->p2p_stream[2],
                               x->p2p_stream[3] };
    for (size_t i = 0; i < sizeof streams / sizeof streams[0]; i++)
        if (streams[i])
            cudaStreamDestroy(streams[i]);
    cudaEvent_t events[] = { x->ev_compute, x->ev_started, x->ev_p2p };
    for (size_t i = 0; i < sizeof events / sizeof events[0]; i++)
        if (events[i])
            cudaEventDestroy(events[i]);
    for (int i = 0; i < SENT_MAX; i++)
        if (x->sent[i].ev)
            cudaEventDestroy(x->sent[i].ev);
    mps_comm_staged_free(&x->host);
    free(x);
    c->ctx = NULL;
}

int cli_cuda_local_device(int local_rank, int *ranks_per_gpu_ok, mps_err *err)
{
    int n = 0;
    if (cuda_check(cudaGetDeviceCount(&n), "device count", err) != 0)
        return -1;
    if (n <= 0)
        return mps_fail(err, MPS_EUNSUPPORTED, "no CUDA device");
    *ranks_per_gpu_ok = local_rank < n;
    return cuda_check(cudaSetDevice(local_rank % n), "set device", err);
}
#else
int cli_comm_nccl_new(const mps_layout *L, const mps_comm *mpi, const mps_backend *be, mps_comm *out, mps_err *err)
{
    (void)L; (void)mpi; (void)be; (void)out;
    return mps_fail(err, MPS_EUNSUPPORTED, "this build has no NCCL");
}

void cli_comm_nccl_free(mps_comm *c)
{
    (void)c;
}

int cli_cuda_local_device(int local_rank, int *ranks_per_gpu_ok, mps_err *err)
{
    (void)local_rank;
    *ranks_per_gpu_ok = 0;
    return mps_fail(err, MPS_EUNSUPPORTED, "this build has no CUDA");
}
#endif
