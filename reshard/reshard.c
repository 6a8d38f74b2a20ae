#include "reshard.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pool.h"

static int gather_from_ckpt(void *ctx, int worker, mps_kind kind, int tensor, const mps_box *box, int64_t fb, int64_t fe,
                            float *dst, mps_err *err)
{
    mps_ckpt_source *cs = ctx;
    return mps_ckpt_gather(cs->ckpt, cs->scratch[worker], kind, tensor, box, fb, fe, dst, err);
}

int mps_ckpt_source_init(mps_ckpt_source *cs, mps_ckpt *c, int threads, mps_source *src, mps_err *err)
{
    cs->ckpt = c;
    cs->nthreads = threads;
    cs->scratch = mps_read_scratches_new(threads);
    if (!cs->scratch)
        return mps_fail(err, MPS_ENOMEM, "out of memory");
    *src = (mps_source){ cs, NULL, NULL, gather_from_ckpt };
    return 0;
}

void mps_ckpt_source_free(mps_ckpt_source *cs)
{
    mps_read_scratches_free(cs->scratch, cs->nthreads);
    cs->scratch = NULL;
}

static int same_path(const char *a, const char *b)
{
    char ra[PATH_MAX], rb[PATH_MAX];
    if (!realpath(a, ra) || !realpath(b, rb))
        return 0;
    return strcmp(ra, rb) == 0;
}

/* Per worker: the write side keeps 3 chunk buffers (raw, shuffled, compressed), the read side
 * 3 (compressed, shuffled, decoded) for the largest chunk of either checkpoint. */
static int threads_for_budget(int64_t budget, int64_t chunk_bytes, int requested)
{
    int64_t per_worker = 6 * chunk_bytes + (1 << 20);
    int64_t fixed = (int64_t)64 << 20; /* HDF5 metadata, tables, the process itself */
    int64_t fit = (budget - fixed) / per_worker;
    int n = requested > 0 ? requested : mps_cpu_count();
    if (fit < 1) fit = 1;
    return n < fit ? n : (int)fit;
}

/* Every process passed ok: 1. Otherwise 0 on every process, with err the error of the lowest
 * failing one (a process that did not fail gets its code and message: the job's exit code is the
 * failing process's, whichever process mpirun hears from first). */
static int agree(const mps_procs *procs, int ok, mps_err *err)
{
    if (!procs)
        return ok;
    mps_err shared = *err;
    if (procs->agree(procs->ctx, ok, &shared, (int)sizeof shared))
        return 1;
    *err = shared;
    return 0;
}

int mps_reshard(const char *src_dir, const mps_reshard_opts *o, mps_err *err)
{
    const mps_procs *procs = o->procs;
    int me = procs ? procs->rank : 0, nprocs = procs ? procs->size : 1;
    if (same_path(src_dir, o->out_dir))
        return mps_fail(err, MPS_EUSAGE, "%s: the destination is the source checkpoint", o->out_dir);
    mps_ckpt *c = NULL;
    int ok = mps_ckpt_open(src_dir, &c, err) == 0;
    if (!agree(procs, ok, err)) {
        mps_ckpt_close(c);
        return -1;
    }
    const mps_manifest *sm = mps_ckpt_manifest(c);
    mps_manifest m;
    mps_stage st = { .lock_fd = -1 };
    mps_ckpt_source cs = { 0 };
    int rc = -1, staged = 0;
    ok = mps_manifest_copy_header(&m, sm, err) == 0;
    mps_checkpoint_id_new(m.checkpoint_id);
    if (procs) /* every process's files must carry process 0's id */
        procs->bcast(procs->ctx, m.checkpoint_id, (int)sizeof m.checkpoint_id);
    snprintf(m.created_by, sizeof m.created_by, "mpshard %s", MPS_VERSION);
    ok = ok && (!o->layout || mps_layout_parse(o->layout, &sm->cfg, &m.layout, err) == 0);
    if (o->zero >= 0)
        m.layout.zero = o->zero;
    if (!o->layout)
        m.layout.explicit_stages = 1; /* keep the source's stage boundaries */
    ok = ok && mps_layout_validate(&m.layout, &sm->cfg, err) == 0;
    if (!agree(procs, ok, err))
        goto out;
    /* the staging directory: process 0 creates it, every process writes its share of the files */
    if (me == 0) {
        const char *inputs[] = { src_dir, mps_ckpt_dir(c), NULL };
        ok = mps_stage_begin(o->out_dir, o->force, inputs, &st, err) == 0;
    }
    staged = me == 0 && ok;
    if (!agree(procs, ok, err))
        goto out;
    char stage_dir[sizeof st.stage_dir];
    ok = mps_stage_dir_name(o->out_dir, stage_dir, sizeof stage_dir, err) == 0;
    int world = mps_layout_world(&m.layout);
    int *ranks = malloc(sizeof(int) * (size_t)(world / nprocs + 1));
    int nranks = 0;
    if (ok && !ranks) {
        mps_fail(err, MPS_ENOMEM, "out of memory");
        ok = 0;
    }
    for (int r = me; ranks && r < world; r += nprocs)
        ranks[nranks++] = r;
    int threads = threads_for_budget(o->memory_budget > 0 ? o->memory_budget : (int64_t)512 << 20,
                                     m.chunk_bytes > sm->chunk_bytes ? m.chunk_bytes : sm->chunk_bytes, o->threads);
    mps_source src;
    ok = ok && mps_ckpt_source_init(&cs, c, threads, &src, err) == 0;
    if (ok && nranks > 0) {
        mps_write_opts wo = { .threads = threads, .quiet = o->quiet || me != 0, .label = "reshard", .stop = o->stop };
        ok = mps_write_shards(stage_dir, &m, ranks, nranks, &src, &wo, err) == 0;
    }
    free(ranks);
    if (!agree(procs, ok, err))
        goto out;
    ok = me != 0 || mps_stage_commit(&st, &m, err) == 0;
    if (me == 0 && ok)
        staged = 0;
    if (!agree(procs, ok, err))
        goto out;
    rc = 0;
out:
    if (staged)
        mps_stage_abort(&st);
    mps_ckpt_source_free(&cs);
    mps_manifest_free(&m);
    mps_ckpt_close(c);
    return rc;
}
