/* The staged backend's pipeline sends (train/comm_staged.c): each send keeps a host copy until
 * send_wait on its buffer or flush, and hands the inner backend's send_wait that copy; in deferred
 * mode a buffer written before its send was waited for is reported (the CPU suite's check that the
 * engine waits before it reuses a send buffer, which NCCL would otherwise send half-written). */
#include "backend.h"
#include "comm.h"
#include "comm_staged.h"
#include "testutil.h"

/* An inner backend that records the sends it was given and the buffers waited for. */
typedef struct {
    const float *sent[16];
    float first[16]; /* the first element of each send, when it was sent */
    int nsent;
    const float *waited[16];
    int nwaited, nflush;
} fake;

static int fake_send(void *ctx, int peer, const float *buf, int64_t n, int tag, mps_err *err)
{
    (void)peer, (void)tag, (void)err;
    fake *f = ctx;
    if (f->nsent < 16) {
        f->first[f->nsent] = n > 0 ? buf[0] : 0;
        f->sent[f->nsent++] = buf;
    }
    return 0;
}

static int fake_send_wait(void *ctx, const float *buf, mps_err *err)
{
    (void)err;
    fake *f = ctx;
    if (f->nwaited < 16)
        f->waited[f->nwaited++] = buf;
    return 0;
}

static int fake_flush(void *ctx, mps_err *err)
{
    (void)err;
    ((fake *)ctx)->nflush++;
    return 0;
}

static void setup(fake *f, const mps_backend *be, int deferred, mps_comm *out)
{
    memset(f, 0, sizeof *f);
    mps_comm inner = { .ctx = f, .rank = 1, .size = 2, .send = fake_send, .send_wait = fake_send_wait,
                       .flush = fake_flush };
    const int sizes[MPS_GROUP_COUNT] = { 2, 1, 1 }, index[MPS_GROUP_COUNT] = { 1, 0, 0 };
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_comm_staged_new(&inner, be, sizes, index, deferred, out, &err) == 0);
}

int main(void)
{
    mps_backend be;
    mps_backend_cpu(&be);
    float a[4] = { 1, 2, 3, 4 }, b[4] = { 5, 6, 7, 8 };
    fake f;
    mps_comm c;
    mps_err err;

    /* a ring of two buffers: the inner backend waits for exactly the copy made from the buffer
     * about to be written again, and sends what the buffer held at each send */
    for (int deferred = 0; deferred < 2; deferred++) {
        setup(&f, &be, deferred, &c);
        mps_err_clear(&err);
        CHECK(c.send(c.ctx, 0, a, 4, 0, &err) == 0 && c.send(c.ctx, 0, b, 4, 1, &err) == 0);
        CHECK(c.send_wait(c.ctx, a, &err) == 0);
        CHECK_MSG(f.nwaited == 1 && f.waited[0] == f.sent[0], "send_wait(a): %d inner waits", f.nwaited);
        CHECK(f.sent[0] != a && f.sent[0] != f.sent[1]); /* host copies, one per send */
        a[0] = 9; /* a written again once waited for: no error even when deferred */
        CHECK(c.send(c.ctx, 0, a, 4, 2, &err) == 0);
        CHECK(c.send_wait(c.ctx, b, &err) == 0 && f.nwaited == 2 && f.waited[1] == f.sent[1]);
        CHECK(c.send_wait(c.ctx, b, &err) == 0 && f.nwaited == 2); /* nothing left from b */
        CHECK_MSG(err.code == 0, "%s", err.msg);
        CHECK(f.nsent == 3 && f.first[0] == 1 && f.first[1] == 5 && f.first[2] == 9);
        CHECK(c.flush(c.ctx, &err) == 0 && f.nwaited == 3 && f.waited[2] == f.sent[2] && f.nflush == 1);
        mps_comm_staged_free(&c);
        a[0] = 1;
    }

    /* deferred: a buffer written before its send was waited for fails the wait, or the flush */
    setup(&f, &be, 1, &c);
    mps_err_clear(&err);
    CHECK(c.send(c.ctx, 0, a, 4, 0, &err) == 0);
    a[2] = -1;
    CHECK(c.send_wait(c.ctx, a, &err) != 0);
    CHECK_MSG(err.code == MPS_EFAIL && strstr(err.msg, "rank 1") &&
              strstr(err.msg, "written before the send was waited for"), "%s", err.msg);
    mps_err_clear(&err);
    CHECK(c.send(c.ctx, 0, b, 4, 1, &err) == 0);
    b[3] = -1;
    CHECK(c.flush(c.ctx, &err) != 0 && strstr(err.msg, "written before the send was waited for"));
    mps_comm_staged_free(&c);

    /* not deferred: the same writes are the caller's business (what was sent is the copy) */
    setup(&f, &be, 0, &c);
    mps_err_clear(&err);
    CHECK(c.send(c.ctx, 0, a, 4, 0, &err) == 0);
    a[2] = -2;
    CHECK(c.send_wait(c.ctx, a, &err) == 0 && f.first[0] == 1);
    mps_comm_staged_free(&c);
    TEST_DONE();
}
