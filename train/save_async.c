/* The trainer's saves, synchronous or from a host snapshot written by a thread (save_async.h).
 *
 * Threads: the writer thread of a background save runs mps_write_shards (and its pool) over a
 * source that reads only the snapshot; it makes no backend call and no collective (MPI and NCCL
 * are only ever called from the main thread). While it runs it reads the snapshot, the piece table
 * and the save's manifest and staging path, which the main thread leaves alone until it has joined
 * the writer; it writes only its own result fields, then `finished` (release). The main thread
 * reads `finished` (acquire) to take part in the agreement, and the result fields after the join. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <hdf5.h>

#include "engine_internal.h"
#include "init.h"
#include "safe_open.h"
#include "save_async.h"

/* One checkpoint being saved: its manifest and, on rank 0, the staging directory and lock. */
typedef struct {
    mps_manifest m;
    mps_stage st;
    int staged;              /* rank 0 holds st (DIR.lock, DIR.partial) */
    int64_t step;
    char name[64];           /* step-%08d */
    char stage_dir[4200];
} save_stage;

/* Where the snapshot keeps the piece of one (kind, tensor) this rank writes. */
typedef struct {
    int64_t begin, end;      /* flat range of the piece's box */
    int64_t off;             /* its first element in the snapshot; -1: this rank does not write it */
} snap_piece;

#define MAX_REPORTS 4

struct mps_saver {
    mps_engine *e;
    const mps_backend *be;
    int rank, world, ntensors;
    int background;
    char rundir[4096];
    double *failed;          /* (world) scratch of agree(), allocated up front: failure paths allocate nothing */
    /* the snapshot, kept from one background save to the next (the pieces never change in a run) */
    snap_piece *pieces;      /* [kind * ntensors + tensor], NULL until the first background save */
    float *snap;             /* backend host memory (pinned on CUDA) */
    int64_t snap_n;
    /* the background save in flight */
    int pending, thread_started;
    pthread_t writer;
    save_stage cur;
    atomic_int finished;     /* the writer's last store */
    atomic_int cancel;       /* error exits: make the writer's remaining gathers fail */
    int write_rc;            /* the writer's result: read after the join only */
    mps_err write_err;
    double write_s;
    double stall_s, wait_s;  /* of the save in flight, for its report */
    /* committed saves not reported yet */
    mps_save_report reports[MAX_REPORTS];
    int nreports;
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* 1 when every rank passed ok. Otherwise 0 on every rank, and err holds the message of the lowest
 * failing rank: whichever rank gets to print before the run is aborted prints the cause (the
 * writer's "rank-00001.h5: ... disk full" rather than "failed on another rank"). */
static int agree(mps_saver *s, int ok, const mps_err *local, mps_err *err)
{
    mps_comm *c = s->e->comm;
    if (c->all_ok(c->ctx, ok))
        return 1;
    mps_err shared = *local;
    if (ok || !shared.msg[0])
        mps_err_clear(&shared);
    for (int r = 0; r < s->world; r++)
        s->failed[r] = r == s->rank && !ok;
    mps_err ignore;
    mps_err_clear(&ignore);
    int root = -1;
    if (c->allreduce_sum_f64(c->ctx, MPS_GROUP_WORLD, s->failed, s->world, &ignore) == 0)
        for (int r = 0; r < s->world && root < 0; r++)
            if (s->failed[r] > 0)
                root = r;
    if (root >= 0 && c->bcast_bytes(c->ctx, &shared, sizeof shared, root, &ignore) == 0 && shared.msg[0])
        *err = shared;
    else if (!ok && local->msg[0])
        *err = *local;
    else
        mps_fail(err, MPS_EIO, "saving failed on another rank");
    return 0;
}

/* RUNDIR/latest names the newest committed checkpoint; replaced atomically. */
static int write_latest(const char *rundir, const char *name, mps_err *err)
{
    char tmp[4200], final[4200];
    snprintf(tmp, sizeof tmp, "%s/latest.tmp", rundir);
    snprintf(final, sizeof final, "%s/latest", rundir);
    int fd = mps_open_tmp_output(tmp, err);
    if (fd < 0)
        return -1;
    char line[300];
    int n = snprintf(line, sizeof line, "%s\n", name);
    int ok = ftruncate(fd, 0) == 0 && write(fd, line, (size_t)n) == n && fsync(fd) == 0;
    ok &= close(fd) == 0;
    if (!ok || rename(tmp, final) != 0) {
        unlink(tmp);
        return mps_fail(err, MPS_EIO, "%s: %s", final, strerror(errno));
    }
    return mps_fsync_path(rundir, err);
}

/* Collective: the manifest (with rank 0's checkpoint id, which every shard file carries); rank 0
 * creates RUNDIR (with the first save: a run that fails before leaves nothing behind), takes
 * DIR.lock and creates DIR.partial before any rank writes into it. */
static int stage_begin(mps_saver *s, int64_t step, uint64_t rng_seed, int64_t data_position, const char *state_json,
                       save_stage *ss, mps_err *err)
{
    mps_engine *e = s->e;
    mps_comm *c = e->comm;
    memset(ss, 0, sizeof *ss);
    ss->st.lock_fd = -1;
    ss->step = step;
    snprintf(ss->name, sizeof ss->name, "step-%08lld", (long long)step);
    char dir[4200];
    snprintf(dir, sizeof dir, "%s/%s", s->rundir, ss->name);
    mps_manifest_init(&ss->m, &e->cfg, &e->L);
    ss->m.step = step;
    ss->m.rng_seed = rng_seed;
    ss->m.data_position = data_position;
    snprintf(ss->m.source_format, sizeof ss->m.source_format, "mpshard");
    mps_err local;
    mps_err_clear(&local);
    int ok = 1;
    if (state_json && !(ss->m.train_state_json = strdup(state_json))) {
        mps_fail(&local, MPS_ENOMEM, "out of memory");
        ok = 0;
    }
    /* (every rank takes part in the broadcast, whatever failed before it) */
    ok &= c->bcast_bytes(c->ctx, ss->m.checkpoint_id, sizeof ss->m.checkpoint_id, 0, &local) == 0;
    ok = ok && mps_stage_dir_name(dir, ss->stage_dir, sizeof ss->stage_dir, &local) == 0;
    if (ok && s->rank == 0 && mkdir(s->rundir, 0755) != 0 && errno != EEXIST) {
        mps_fail(&local, MPS_EIO, "--out %s: %s", s->rundir, strerror(errno));
        ok = 0;
    }
    if (ok && s->rank == 0) {
        ss->staged = mps_stage_begin(dir, 1, NULL, &ss->st, &local) == 0;
        ok = ss->staged;
    }
    if (!agree(s, ok, &local, err)) {
        if (ss->staged)
            mps_stage_abort(&ss->st);
        mps_manifest_free(&ss->m);
        return -1;
    }
    return 0;
}

/* Collective: when every rank wrote its file (ok), rank 0 commits DIR and rewrites latest; else
 * rank 0 removes DIR.partial and the previous checkpoint stays the latest. Frees ss either way. */
static int stage_end(mps_saver *s, save_stage *ss, int ok, const mps_err *local, mps_err *err)
{
    int wrote = agree(s, ok, local, err);
    mps_err l2;
    mps_err_clear(&l2);
    int committed = 1;
    if (ss->staged) { /* rank 0 */
        if (!wrote) {
            mps_stage_abort(&ss->st);
        } else if (mps_stage_commit(&ss->st, &ss->m, &l2) != 0) {
            mps_stage_abort(&ss->st);
            committed = 0;
        } else {
            committed = write_latest(s->rundir, ss->name, &l2) == 0;
        }
        ss->staged = 0;
    }
    mps_manifest_free(&ss->m);
    if (!wrote)
        return -1;
    return agree(s, committed, &l2, err) ? 0 : -1;
}

static snap_piece *piece_of(const mps_saver *s, mps_kind kind, int tensor)
{
    return &s->pieces[(int)kind * s->ntensors + tensor];
}

/* The pieces this rank writes (the owners are those mps_write_shards picks: the same function of
 * the layout and the stored kinds), and where each goes in the snapshot. */
static int snapshot_plan(mps_saver *s, const mps_manifest *m, mps_err *err)
{
    mps_engine *e = s->e;
    mps_owners *owners;
    if (mps_owners_build(&e->cfg, &e->L, m->kinds, &owners, err) != 0)
        return -1;
    s->pieces = calloc((size_t)MPS_KIND_COUNT * (size_t)s->ntensors, sizeof *s->pieces);
    if (!s->pieces) {
        mps_owners_free(owners);
        return mps_fail(err, MPS_ENOMEM, "out of memory");
    }
    int64_t n = 0;
    int rc = 0;
    for (int k = 0; k < MPS_KIND_COUNT && rc == 0; k++)
        for (int t = 0; t < s->ntensors && rc == 0; t++) {
            snap_piece *sp = piece_of(s, (mps_kind)k, t);
            sp->off = -1;
            mps_piece pc;
            mps_geometry(&e->cfg, &e->L, s->rank, (mps_kind)k, t, &pc);
            if (!(m->kinds & (1u << k)) || !pc.held || pc.flat_end <= pc.flat_begin ||
                mps_owner_of(owners, (mps_kind)k, t, mps_piece_id(&e->cfg, &e->L, (mps_kind)k, t, &pc)) != s->rank)
                continue;
            int64_t base, end;
            if (!mps_engine_state_buf(e, (mps_kind)k, t, &base, &end) || pc.flat_begin < base || pc.flat_end > end) {
                rc = mps_fail(err, MPS_EFAIL, "rank %d does not hold the %s piece of %s it saves", s->rank,
                              mps_kind_name((mps_kind)k), e->t[t].spec.name);
                break;
            }
            *sp = (snap_piece){ pc.flat_begin, pc.flat_end, n };
            n += pc.flat_end - pc.flat_begin;
        }
    mps_owners_free(owners);
    if (rc != 0) {
        free(s->pieces);
        s->pieces = NULL;
        return -1;
    }
    s->snap_n = n;
    return 0;
}

int mps_saver_prepare(mps_saver *s, mps_err *err)
{
    if (s->snap)
        return 0;
    mps_manifest m; /* the kinds a save stores: those of mps_train_save's manifest */
    mps_manifest_init(&m, &s->e->cfg, &s->e->L);
    int rc = s->pieces ? 0 : snapshot_plan(s, &m, err);
    mps_manifest_free(&m);
    size_t bytes = (size_t)s->snap_n * sizeof(float);
    if (rc == 0 && !(s->snap = s->be->alloc_host(s->be->ctx, bytes)))
        rc = mps_fail(err, MPS_ENOMEM, "out of host memory for the save's snapshot (%.1f MiB)", (double)bytes / (1 << 20));
    return rc;
}

/* The stall of a background save: the pieces this rank writes, device (or engine) -> snapshot. */
static int snapshot_take(mps_saver *s, const mps_manifest *m, mps_err *err)
{
    if (!s->pieces && snapshot_plan(s, m, err) != 0)
        return -1;
    size_t bytes = (size_t)s->snap_n * sizeof(float);
    if (!s->snap && !(s->snap = s->be->alloc_host(s->be->ctx, bytes)))
        return mps_fail(err, MPS_ENOMEM, "out of host memory for the save's snapshot (%.1f MiB)",
                        (double)bytes / (1 << 20));
    for (int k = 0; k < MPS_KIND_COUNT; k++)
        for (int t = 0; t < s->ntensors; t++) {
            const snap_piece *sp = piece_of(s, (mps_kind)k, t);
            if (sp->off < 0)
                continue;
            int64_t base, end;
            const float *src = mps_engine_state_buf(s->e, (mps_kind)k, t, &base, &end);
            s->be->to_host(s->be->ctx, s->snap + sp->off, src + (sp->begin - base),
                           (size_t)(sp->end - sp->begin) * sizeof(float));
        }
    return s->be->sync(s->be->ctx, err);
}

/* The writer's source: elements [fb, fe) of a piece, from the snapshot only. */
static int snap_gather(void *ctx, int worker, mps_kind kind, int tensor, const mps_box *box, int64_t fb, int64_t fe,
                       float *dst, mps_err *err)
{
    (void)worker; (void)box;
    mps_saver *s = ctx;
    if (atomic_load(&s->cancel))
        return mps_fail(err, MPS_EFAIL, "the save was cancelled");
    const snap_piece *sp = piece_of(s, kind, tensor);
    if (sp->off < 0 || fb < sp->begin || fe > sp->end)
        return mps_fail(err, MPS_EFAIL, "rank %d's snapshot lacks %s of tensor %d [%lld, %lld)", s->rank,
                        mps_kind_name(kind), tensor, (long long)fb, (long long)fe);
    memcpy(dst, s->snap + sp->off + (fb - sp->begin), (size_t)(fe - fb) * sizeof(float));
    return 0;
}

static void *writer_main(void *arg)
{
    mps_saver *s = arg;
    double t0 = now_s();
    /* HDF5 prints its error stack by default, per thread (main() turns it off only for its own);
     * an expected failure (H5Fcreate probing for the file) must not print, real ones come as mps_err */
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    mps_source src = { .ctx = s, .begin_tensor = mps_source_no_begin, .end_tensor = mps_source_no_end,
                       .gather = snap_gather };
    mps_write_opts wo = { .threads = 2, .quiet = 1, .label = "save" };
    int rank = s->rank;
    s->write_rc = mps_write_shards(s->cur.stage_dir, &s->cur.m, &rank, 1, &src, &wo, &s->write_err);
    s->write_s = now_s() - t0;
    atomic_store_explicit(&s->finished, 1, memory_order_release);
    return NULL;
}

int mps_saver_new(mps_engine *e, const char *rundir, int background, mps_saver **out, mps_err *err)
{
    mps_saver *s = calloc(1, sizeof *s);
    if (!s || !(s->failed = calloc((size_t)e->comm->size, sizeof *s->failed))) {
        free(s);
        return mps_fail(err, MPS_ENOMEM, "out of memory");
    }
    if ((size_t)snprintf(s->rundir, sizeof s->rundir, "%s", rundir) >= sizeof s->rundir) {
        free(s->failed);
        free(s);
        return mps_fail(err, MPS_EUSAGE, "--out %s: the name is too long", rundir);
    }
    s->e = e;
    s->be = e->be;
    s->rank = e->rank;
    s->world = e->comm->size;
    s->ntensors = mps_tensor_count(&e->cfg);
    s->background = background;
    atomic_init(&s->finished, 0);
    atomic_init(&s->cancel, 0);
    *out = s;
    return 0;
}

static void push_report(mps_saver *s, const mps_save_report *r)
{
    if (s->nreports == MAX_REPORTS) { /* the caller drains after every call: never reached */
        memmove(s->reports, s->reports + 1, sizeof s->reports[0] * (MAX_REPORTS - 1));
        s->nreports--;
    }
    s->reports[s->nreports++] = *r;
}

int mps_saver_next_report(mps_saver *s, mps_save_report *r)
{
    if (!s->nreports)
        return 0;
    *r = s->reports[0];
    memmove(s->reports, s->reports + 1, sizeof s->reports[0] * (size_t)(--s->nreports));
    return 1;
}

int mps_saver_poll(mps_saver *s, int block, mps_err *err)
{
    if (!s->pending)
        return 0;
    mps_comm *c = s->e->comm;
    if (!block && !c->all_ok(c->ctx, atomic_load_explicit(&s->finished, memory_order_acquire)))
        return 0;
    if (s->thread_started)
        pthread_join(s->writer, NULL);
    s->thread_started = s->pending = 0;
    double t0 = now_s();
    if (stage_end(s, &s->cur, s->write_rc == 0, &s->write_err, err) != 0)
        return -1;
    push_report(s, &(mps_save_report){ .step = s->cur.step, .background = 1, .stall_s = s->stall_s,
                                       .wait_s = s->wait_s, .write_s = s->write_s, .commit_s = now_s() - t0 });
    return 0;
}

int mps_saver_save(mps_saver *s, int64_t step, uint64_t rng_seed, int64_t data_position, const char *train_state_json,
                   int direct, double *stall_s, mps_err *err)
{
    double t0 = now_s();
    *stall_s = 0;
    if (mps_saver_poll(s, 1, err) != 0)
        return -1;
    double t1 = now_s();
    if (!s->background || direct) {
        save_stage ss;
        if (stage_begin(s, step, rng_seed, data_position, train_state_json, &ss, err) != 0)
            return -1;
        mps_err local;
        mps_err_clear(&local);
        int ok = mps_engine_write_shard(s->e, ss.stage_dir, &ss.m, &local) == 0;
        if (stage_end(s, &ss, ok, &local, err) != 0)
            return -1;
        *stall_s = now_s() - t0;
        push_report(s, &(mps_save_report){ .step = step, .stall_s = *stall_s, .wait_s = t1 - t0 });
        return 0;
    }
    if (stage_begin(s, step, rng_seed, data_position, train_state_json, &s->cur, err) != 0)
        return -1;
    /* From here the save is pending on every rank: whatever fails on this rank (the snapshot, the
     * thread) is its write's failure, which the next poll agrees on and reports. */
    s->pending = 1;
    atomic_store(&s->finished, 0);
    atomic_store(&s->cancel, 0);
    s->write_rc = 0;
    s->write_s = 0;
    mps_err_clear(&s->write_err);
    if (snapshot_take(s, &s->cur.m, &s->write_err) != 0) {
        s->write_rc = -1;
        atomic_store(&s->finished, 1);
    } else if (pthread_create(&s->writer, NULL, writer_main, s) == 0) {
        s->thread_started = 1;
    } else {
        writer_main(s); /* no thread to be had: write now, still correct */
    }
    s->wait_s = t1 - t0;
    s->stall_s = *stall_s = now_s() - t0;
    return 0;
}

void mps_saver_free(mps_saver *s)
{
    if (!s)
        return;
    if (s->pending) {
        atomic_store(&s->cancel, 1);
        if (s->thread_started)
            pthread_join(s->writer, NULL);
        if (s->cur.staged)
            mps_stage_abort(&s->cur.st);
        mps_manifest_free(&s->cur.m);
    }
    if (s->snap)
        s->be->release_host(s->be->ctx, s->snap);
    free(s->pieces);
    free(s->failed);
    free(s);
}
