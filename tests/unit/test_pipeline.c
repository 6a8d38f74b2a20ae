/* Pipeline peers and channels (train/pipeline.h), and a simulation of the trainer's pipeline
 * messages on a backend whose sends block their queue until the peer receives (NCCL: one stream
 * per channel, cli/comm_nccl.c). The simulation replays one rank program per stage, in the order
 * engine.c issues them (forward_mb, backward_mb, run_schedule under 1F1B and GPipe, the tied
 * head's exchange, the step's norm), for two steps, and checks that every message is delivered:
 * also with the waits for the ring of send buffers (train/pipeline.h mps_pipe_send_buffers), as
 * NCCL makes them (the compute stream waits) and as MPI does (the host waits).
 * It shows it can fail on the two deadlocks met on the way: one stream for all messages (1F1B on
 * 2 stages), and NCCL's connection at a pair's first message, a host handshake, without the
 * connections made at start (the tied head's exchange from 3 stages on: 4 GPUs hung so). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "layout.h"
#include "pipeline.h"
#include "testutil.h"

enum { OP_SYNC, OP_COMPUTE, OP_SEND, OP_RECV, OP_FLUSH, OP_BARRIER, OP_SEND_WAIT };
typedef struct {
    int kind, peer, tag, channel;
    int waits; /* OP_SEND_WAIT: the send it waits for (the last from its buffer), or -1 */
    int compute_mark; /* compute items issued before it (a send or receive starts after them) */
    int done;
} op_t;

/* One rank: its program (host order), the compute stream's items and each channel's queue. */
typedef struct {
    op_t *ops;
    int nops, cap, host; /* next op the host issues */
    int compute_issued;  /* items on the compute stream */
    int compute_done;
    int *compute_wait;   /* per compute item: -1, an op it waits for (a receive), or -2 - op (flush) */
    int chan_head[MPS_PIPE_CHANNELS];
    int *chan_queue[MPS_PIPE_CHANNELS];
    int chan_len[MPS_PIPE_CHANNELS];
    int last_send[2][2]; /* [forward?][ring buffer]: the op index of its last send, or -1 */
} rank_t;

typedef int (*channel_fn)(const mps_layout *L, int sender, int receiver);

static int one_channel(const mps_layout *L, int sender, int receiver)
{
    (void)L, (void)sender, (void)receiver;
    return 0;
}

static void emit(rank_t *r, int kind, int peer, int tag)
{
    if (r->nops == r->cap) {
        r->cap = r->cap ? 2 * r->cap : 64;
        r->ops = realloc(r->ops, sizeof *r->ops * (size_t)r->cap);
    }
    r->ops[r->nops++] = (op_t){ kind, peer, tag, -1, -1, 0, 0 };
}

/* engine.c's order for one step of stage s (the tags only tell messages apart) */
static void program(rank_t *r, const mps_layout *L, int rank, int M, int gpipe, int step)
{
    mps_coords c = mps_layout_coords(L, rank);
    int first = c.pp == 0, last = c.pp == L->pp - 1;
    int prev = first ? -1 : mps_layout_rank(L, c.pp - 1, c.dp, c.tp);
    int next = last ? -1 : mps_layout_rank(L, c.pp + 1, c.dp, c.tp);
    int order[2 * 64][2], n = 0; /* (forward?, micro-batch) */
    if (gpipe) {
        for (int mb = 0; mb < M; mb++)
            order[n][0] = 1, order[n++][1] = mb;
        for (int mb = 0; mb < M; mb++)
            order[n][0] = 0, order[n++][1] = mb;
    } else {
        int warm = L->pp - c.pp - 1, fwd = 0, bwd = 0;
        if (warm > M)
            warm = M;
        for (; fwd < warm; fwd++)
            order[n][0] = 1, order[n++][1] = fwd;
        for (; fwd < M; fwd++, bwd++) {
            order[n][0] = 1, order[n++][1] = fwd;
            order[n][0] = 0, order[n++][1] = bwd;
        }
        for (; bwd < M; bwd++)
            order[n][0] = 0, order[n++][1] = bwd;
    }
    int base = step * 1000, ring = mps_pipe_send_buffers(M);
    for (int i = 0; i < n; i++) {
        int mb = order[i][1], fwd = order[i][0], to = fwd ? next : prev;
        if (fwd) { /* forward_mb: the batch's upload waits for the device */
            emit(r, OP_SYNC, -1, 0);
            if (!first)
                emit(r, OP_RECV, prev, base + 2 * mb);
        } else if (!last)
            emit(r, OP_RECV, next, base + 2 * mb + 1);
        emit(r, OP_COMPUTE, -1, 0);
        if (to >= 0) { /* the buffer mb % ring: wait for its last send, copy into it, send */
            int *last_send = &r->last_send[fwd][mb % ring];
            emit(r, OP_SEND_WAIT, -1, 0);
            r->ops[r->nops - 1].waits = *last_send;
            emit(r, OP_COMPUTE, -1, 0);
            *last_send = r->nops;
            emit(r, OP_SEND, to, base + 2 * mb + !fwd);
        }
    }
    if (L->pp > 1 && (first || last)) { /* the tied head: send, receive, flush */
        int peer = mps_layout_rank(L, first ? L->pp - 1 : 0, c.dp, c.tp);
        emit(r, OP_SEND, peer, base + 999);
        emit(r, OP_RECV, peer, base + 999);
        emit(r, OP_FLUSH, -1, 0);
    }
    emit(r, OP_FLUSH, -1, 0);
    emit(r, OP_BARRIER, -1, 0); /* the gradient norm over the world (a host wait first) */
}

static void push_compute(rank_t *r, int wait)
{
    r->compute_wait = realloc(r->compute_wait, sizeof(int) * (size_t)(r->compute_issued + 1));
    r->compute_wait[r->compute_issued++] = wait;
}

/* whether rank o->peer's host is at the other end of `o` (issued by rank `me`): the same pair
 * and direction, so the same channel */
static int reciprocal(const rank_t *rk, int me, const op_t *o)
{
    const rank_t *q = &rk[o->peer];
    if (q->host >= q->nops)
        return 0;
    const op_t *v = &q->ops[q->host];
    return v->peer == me && ((o->kind == OP_SEND && v->kind == OP_RECV) || (o->kind == OP_RECV && v->kind == OP_SEND));
}

/* Runs every rank's program; returns 1 when every op completed, 0 on a deadlock. connect_lazily:
 * a pair's first message on a channel waits on the host for the peer's host to reach the other
 * end (NCCL without the connections made at start). */
static int simulate(const mps_layout *L, int M, int gpipe, channel_fn channel, int connect_lazily, int host_waits)
{
    int world = mps_layout_world(L), ok = 1;
    unsigned char *connected = calloc((size_t)world * world * MPS_PIPE_CHANNELS, 1); /* [sender][receiver][ch] */
    rank_t *rk = calloc((size_t)world, sizeof *rk);
    for (int i = 0; i < world; i++) {
        memset(rk[i].last_send, -1, sizeof rk[i].last_send);
        for (int step = 0; step < 2; step++)
            program(&rk[i], L, i, M, gpipe, step);
    }
    for (int i = 0; i < world; i++)
        for (int ch = 0; ch < MPS_PIPE_CHANNELS; ch++)
            rk[i].chan_queue[ch] = malloc(sizeof(int) * (size_t)rk[i].nops);
    for (int progress = 1; progress;) {
        progress = 0;
        /* hosts issue until they must wait */
        int at_barrier = 0;
        for (int i = 0; i < world; i++) {
            rank_t *r = &rk[i];
            while (r->host < r->nops) {
                op_t *o = &r->ops[r->host];
                if (o->kind == OP_SYNC && r->compute_done < r->compute_issued)
                    break;
                if (o->kind == OP_SEND_WAIT && host_waits && o->waits >= 0 && !r->ops[o->waits].done)
                    break; /* MPI: the host waits for the send */
                if (o->kind == OP_BARRIER) {
                    if (r->compute_done == r->compute_issued)
                        at_barrier++;
                    break;
                }
                if (connect_lazily && (o->kind == OP_SEND || o->kind == OP_RECV)) {
                    int snd = o->kind == OP_SEND ? i : o->peer, rcv = o->kind == OP_SEND ? o->peer : i;
                    size_t at = ((size_t)snd * world + rcv) * MPS_PIPE_CHANNELS + (size_t)channel(L, snd, rcv);
                    unsigned char *link = &connected[at];
                    if (!*link && !reciprocal(rk, i, o))
                        break;
                    *link = 1; /* the peer's host passes the handshake in turn */
                }
                o->compute_mark = r->compute_issued;
                if (o->kind == OP_COMPUTE)
                    push_compute(r, -1);
                if (o->kind == OP_SEND_WAIT && !host_waits && o->waits >= 0)
                    push_compute(r, o->waits); /* NCCL: the compute stream waits for the send */
                if (o->kind == OP_SEND || o->kind == OP_RECV) {
                    o->channel = o->kind == OP_SEND ? channel(L, i, o->peer) : channel(L, o->peer, i);
                    r->chan_queue[o->channel][r->chan_len[o->channel]++] = r->host;
                    if (o->kind == OP_RECV)
                        push_compute(r, r->host); /* the compute stream waits for the receive */
                }
                if (o->kind == OP_FLUSH)
                    push_compute(r, -2 - r->host); /* ... for everything queued on the channels */
                r->host++;
                progress = 1;
            }
        }
        if (at_barrier == world) {
            for (int i = 0; i < world; i++)
                rk[i].host++;
            progress = 1;
        }
        /* messages whose send and receive are both at the head of their queues, both started */
        for (int i = 0; i < world; i++)
            for (int ch = 0; ch < MPS_PIPE_CHANNELS; ch++) {
                rank_t *r = &rk[i];
                if (r->chan_head[ch] == r->chan_len[ch])
                    continue;
                op_t *s = &r->ops[r->chan_queue[ch][r->chan_head[ch]]];
                if (s->kind != OP_SEND || r->compute_done < s->compute_mark)
                    continue;
                rank_t *q = &rk[s->peer];
                if (q->chan_head[ch] == q->chan_len[ch])
                    continue;
                op_t *v = &q->ops[q->chan_queue[ch][q->chan_head[ch]]];
                if (v->kind != OP_RECV || v->peer != i || q->compute_done < v->compute_mark)
                    continue;
                CHECK_MSG(v->tag == s->tag, "rank %d -> %d: message %d received as %d", i, s->peer, s->tag, v->tag);
                s->done = v->done = 1;
                r->chan_head[ch]++;
                q->chan_head[ch]++;
                progress = 1;
            }
        /* compute streams */
        for (int i = 0; i < world; i++) {
            rank_t *r = &rk[i];
            while (r->compute_done < r->compute_issued) {
                int w = r->compute_wait[r->compute_done];
                int ready = w == -1 || (w >= 0 && r->ops[w].done);
                if (w <= -2) { /* a flush: every send or receive issued before it is done */
                    ready = 1;
                    for (int j = 0; j < -2 - w; j++)
                        if ((r->ops[j].kind == OP_SEND || r->ops[j].kind == OP_RECV) && !r->ops[j].done)
                            ready = 0;
                }
                if (!ready)
                    break;
                r->compute_done++;
                progress = 1;
            }
        }
    }
    for (int i = 0; i < world; i++) {
        ok &= rk[i].host == rk[i].nops && rk[i].compute_done == rk[i].compute_issued;
        free(rk[i].ops);
        free(rk[i].compute_wait);
        for (int ch = 0; ch < MPS_PIPE_CHANNELS; ch++)
            free(rk[i].chan_queue[ch]);
    }
    free(rk);
    free(connected);
    return ok;
}

int main(void)
{
    const int dps[] = { 1, 2 }, tps[] = { 1, 3 };
    for (int pp = 1; pp <= 8; pp++)
        for (int a = 0; a < 2; a++)
            for (int b = 0; b < 2; b++) {
                mps_layout L = { .dp = dps[a], .tp = tps[b], .pp = pp, .zero = 0 };
                int world = mps_layout_world(&L);
                for (int r = 0; r < world; r++) {
                    mps_coords c = mps_layout_coords(&L, r);
                    int peers[MPS_PIPE_MAX_PEERS], n = mps_pipe_peers(&L, r, peers);
                    /* the neighbours and, on the first and last stage, each other; each once */
                    int want = (c.pp > 0) + (c.pp < pp - 1) + (pp > 2 && (c.pp == 0 || c.pp == pp - 1));
                    CHECK_MSG(n == want, "pp=%d rank %d: %d peers, expected %d", pp, r, n, want);
                    unsigned sends = 0, recvs = 0;
                    for (int i = 0; i < n; i++) {
                        mps_coords q = mps_layout_coords(&L, peers[i]);
                        CHECK(q.dp == c.dp && q.tp == c.tp && q.pp != c.pp);
                        for (int j = 0; j < i; j++)
                            CHECK(peers[j] != peers[i]);
                        int back[MPS_PIPE_MAX_PEERS], m = mps_pipe_peers(&L, peers[i], back), found = 0;
                        for (int j = 0; j < m; j++)
                            found |= back[j] == r;
                        CHECK_MSG(found, "pp=%d: rank %d lists %d, not the reverse", pp, r, peers[i]);
                        int cs = mps_pipe_channel(&L, r, peers[i]), cr = mps_pipe_channel(&L, peers[i], r);
                        CHECK(cs >= 0 && cs < MPS_PIPE_CHANNELS && cr >= 0 && cr < MPS_PIPE_CHANNELS);
                        sends |= 1u << cs;
                        recvs |= 1u << cr;
                    }
                    /* on each channel a rank only sends or only receives */
                    CHECK_MSG((sends & recvs) == 0, "pp=%d rank %d: channels %#x send and %#x receive", pp, r, sends,
                              recvs);
                }
                for (int M = 1; M <= 9; M += 4)
                    for (int gpipe = 0; gpipe < 2; gpipe++) {
                        const char *sched = gpipe ? "gpipe" : "1f1b";
                        for (int host_waits = 0; host_waits < 2; host_waits++)
                            CHECK_MSG(simulate(&L, M, gpipe, mps_pipe_channel, 0, host_waits),
                                      "deadlock: pp=%d dp=%d tp=%d M=%d %s, %s", pp, L.dp, L.tp, M, sched,
                                      host_waits ? "host waits for sends" : "stream waits for sends");
                        /* the simulation finds the deadlocks it is there for: one stream for every
                         * message under 1F1B (stage s sends forward then receives backward, s + 1
                         * the reverse) ... */
                        if (pp >= 2 && M >= 2 && !gpipe)
                            CHECK_MSG(!simulate(&L, M, gpipe, one_channel, 0, 0),
                                      "pp=%d M=%d 1f1b: no deadlock found on one channel", pp, M);
                        /* ... and, from 3 stages on, the tied head's first exchange (both ends send
                         * first) when NCCL connects the pair then, with a host handshake */
                        if (pp >= 3)
                            CHECK_MSG(!simulate(&L, M, gpipe, mps_pipe_channel, 1, 0),
                                      "pp=%d M=%d %s: no deadlock found connecting lazily", pp, M, sched);
                        else
                            CHECK(simulate(&L, M, gpipe, mps_pipe_channel, 1, 0) == 1);
                    }
            }
    TEST_DONE();
}
