#include "load.h"

#include <stdlib.h>
#include <string.h>

#include "pool.h"

typedef struct {
    mps_ckpt *c;
    mps_read_scratch **scratch;
    mps_loaded_piece *p;
    int64_t fb, fe; /* part of the piece's flat range */
    float *const *worker_bufs; /* streaming: gather here, then hand to sink */
    mps_piece_sink sink;
    void *sink_ctx;
} load_job;

static int load_part(void *arg, int worker, mps_err *err)
{
    load_job *j = arg;
    float *dst = j->worker_bufs ? j->worker_bufs[worker] : j->p->data + (j->fb - j->p->piece.flat_begin);
    if (mps_ckpt_gather(j->c, j->scratch[worker], j->p->kind, j->p->tensor, &j->p->piece.box, j->fb, j->fe, dst, err) != 0)
        return -1;
    return j->sink ? j->sink(j->sink_ctx, worker, j->p, j->fb, j->fe, dst, err) : 0;
}

void mps_rank_state_free(mps_rank_state *s)
{
    for (int i = 0; i < s->count; i++)
        free(s->pieces[i].data);
    free(s->pieces);
    memset(s, 0, sizeof *s);
}

/* The pieces (data NULL) `rank` holds for `kinds` that the checkpoint stores, and how many jobs of
 * at most MPS_LOAD_PART elements cover them. */
static int list_pieces(mps_ckpt *c, const mps_layout *layout, int rank, unsigned kinds, mps_rank_state *out,
                       int64_t *njobs, mps_err *err)
{
    const mps_manifest *m = mps_ckpt_manifest(c);
    memset(out, 0, sizeof *out);
    *njobs = 0;
    if (rank < 0 || rank >= mps_layout_world(layout))
        return mps_fail(err, MPS_EUSAGE, "rank %d outside the layout's world of %d", rank, mps_layout_world(layout));
    kinds &= m->kinds;
    int nt = mps_tensor_count(&m->cfg);
    out->pieces = calloc((size_t)nt * MPS_KIND_COUNT, sizeof *out->pieces);
    if (!out->pieces)
        return mps_fail(err, MPS_ENOMEM, "out of memory");
    for (int k = 0; k < MPS_KIND_COUNT; k++)
        for (int t = 0; (kinds & (1u << k)) && t < nt; t++) {
            mps_loaded_piece *lp = &out->pieces[out->count];
            mps_geometry(&m->cfg, layout, rank, (mps_kind)k, t, &lp->piece);
            int64_t n = lp->piece.flat_end - lp->piece.flat_begin;
            if (!lp->piece.held || n == 0)
                continue;
            lp->kind = (mps_kind)k;
            lp->tensor = t;
            out->bytes += n * (int64_t)sizeof(float);
            *njobs += (n + MPS_LOAD_PART - 1) / MPS_LOAD_PART;
            out->count++;
        }
    return 0;
}

/* Runs the jobs over st's pieces on `threads` readers: into each piece's data, or (worker_bufs)
 * into the worker's buffer and then to sink. */
static int run_jobs(mps_ckpt *c, mps_rank_state *st, int64_t njobs, int threads, float *const *worker_bufs,
                    mps_piece_sink sink, void *ctx, mps_err *err)
{
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
    for (int i = 0; i < st->count; i++) {
        mps_loaded_piece *lp = &st->pieces[i];
        for (int64_t f = lp->piece.flat_begin; f < lp->piece.flat_end; f += MPS_LOAD_PART) {
            int64_t fe = f + MPS_LOAD_PART < lp->piece.flat_end ? f + MPS_LOAD_PART : lp->piece.flat_end;
            jobs[j] = (load_job){ c, scratch, lp, f, fe, worker_bufs, sink, ctx };
            if (mps_pool_submit(pool, load_part, &jobs[j++], err) != 0)
                goto out; /* (destroy joins the workers before jobs[] is freed) */
        }
    }
    rc = mps_pool_wait(pool, err);
out:
    mps_pool_destroy(pool);
    mps_read_scratches_free(scratch, threads);
    free(jobs);
    return rc;
}

int mps_load_rank(mps_ckpt *c, const mps_layout *layout, int rank, unsigned kinds, int threads, mps_rank_state *out,
                  mps_err *err)
{
    int64_t njobs;
    if (list_pieces(c, layout, rank, kinds, out, &njobs, err) != 0)
        return -1;
    for (int i = 0; i < out->count; i++) {
        mps_loaded_piece *lp = &out->pieces[i];
        if (!(lp->data = malloc((size_t)(lp->piece.flat_end - lp->piece.flat_begin) * sizeof(float)))) {
            mps_rank_state_free(out);
            return mps_fail(err, MPS_ENOMEM, "out of memory for rank %d's state", rank);
        }
    }
    if (threads <= 0)
        threads = mps_cpu_count();
    if (run_jobs(c, out, njobs, threads, NULL, NULL, NULL, err) != 0) {
        mps_rank_state_free(out);
        return -1;
    }
    return 0;
}

int mps_load_rank_stream(mps_ckpt *c, const mps_layout *layout, int rank, unsigned kinds, int threads,
                         float *const *worker_bufs, mps_piece_sink sink, void *ctx, mps_err *err)
{
    mps_rank_state st;
    int64_t njobs;
    if (list_pieces(c, layout, rank, kinds, &st, &njobs, err) != 0)
        return -1;
    int rc = run_jobs(c, &st, njobs, threads, worker_bufs, sink, ctx, err);
    mps_rank_state_free(&st);
    return rc;
}
