#include "load.h"

#include <stdlib.h>
#include <string.h>

#include "pool.h"

typedef struct {
    mps_ckpt *c;
    mps_read_scratch **scratch;
    mps_loaded_piece *p;
    int64_t fb, fe; /* part of the piece's flat range */
} load_job;

static int load_part(void *arg, int worker, mps_err *err)
{
    load_job *j = arg;
    return mps_ckpt_gather(j->c, j->scratch[worker], j->p->kind, j->p->tensor, &j->p->piece.box, j->fb, j->fe,
                           j->p->data + (j->fb - j->p->piece.flat_begin), err);
}

void mps_rank_state_free(mps_rank_state *s)
{
    for (int i = 0; i < s->count; i++)
        free(s->pieces[i].data);
    free(s->pieces);
    memset(s, 0, sizeof *s);
}

int mps_load_rank(mps_ckpt *c, const mps_layout *layout, int rank, unsigned kinds, int threads, mps_rank_state *out,
                  mps_err *err)
{
    const mps_manifest *m = mps_ckpt_manifest(c);
    memset(out, 0, sizeof *out);
    if (rank < 0 || rank >= mps_layout_world(layout))
        return mps_fail(err, MPS_EUSAGE, "rank %d outside the layout's world of %d", rank, mps_layout_world(layout));
    kinds &= m->kinds;
    int nt = mps_tensor_count(&m->cfg);
    out->pieces = calloc((size_t)nt * MPS_KIND_COUNT, sizeof *out->pieces);
    if (!out->pieces)
        return mps_fail(err, MPS_ENOMEM, "out of memory");
    /* jobs of at most 16 MiB: each job reads its source chunks once (the reader keeps the last
     * decoded chunk), so only chunks straddling two jobs are decoded twice */
    const int64_t part = (int64_t)1 << 22;
    int64_t njobs = 0;
    for (int k = 0; k < MPS_KIND_COUNT; k++)
        for (int t = 0; (kinds & (1u << k)) && t < nt; t++) {
            mps_loaded_piece *lp = &out->pieces[out->count];
            mps_geometry(&m->cfg, layout, rank, (mps_kind)k, t, &lp->piece);
            int64_t n = lp->piece.flat_end - lp->piece.flat_begin;
            if (!lp->piece.held || n == 0)
                continue;
            lp->kind = (mps_kind)k;
            lp->tensor = t;
            lp->data = malloc((size_t)n * sizeof(float));
            if (!lp->data) {
                mps_rank_state_free(out);
                return mps_fail(err, MPS_ENOMEM, "out of memory for rank %d's state", rank);
            }
            out->bytes += n * (int64_t)sizeof(float);
            njobs += (n + part - 1) / part;
            out->count++;
        }
    if (threads <= 0)
        threads = mps_cpu_count();
    load_job *jobs = malloc(sizeof *jobs * (size_t)(njobs ? njobs : 1));
    mps_read_scratch **scratch = mps_read_scratches_new(threads);
    mps_pool *pool = NULL;
    int rc = -1;
    if (!jobs || !scratch) {
        mps_fail(err, MPS_ENOMEM, "out of memory");
        goto out;
    }
    if (mps_pool_create(threads, 4096, &pool, err) != 0)
        goto out;
    int64_t j = 0;
    for (int i = 0; i < out->count; i++) {
        mps_loaded_piece *lp = &out->pieces[i];
        for (int64_t f = lp->piece.flat_begin; f < lp->piece.flat_end; f += part) {
            jobs[j] = (load_job){ c, scratch, lp, f, f + part < lp->piece.flat_end ? f + part : lp->piece.flat_end };
            if (mps_pool_submit(pool, load_part, &jobs[j++], err) != 0)
                goto out;
        }
    }
    rc = mps_pool_wait(pool, err);
out:
    mps_pool_destroy(pool);
    mps_read_scratches_free(scratch, threads);
    free(jobs);
    if (rc != 0)
        mps_rank_state_free(out);
    return rc;
}
