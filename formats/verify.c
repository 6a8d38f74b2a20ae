/* verify: completeness and integrity of a checkpoint, every chunk decoded and checksummed. */
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckpt.h"
#include "ckpt_internal.h"
#include "pool.h"
#include "progress.h"

typedef struct {
    mps_ckpt *c;
    mps_verify_opts *opts;
    pthread_mutex_t lock;
    int problems;
    mps_read_scratch **scratch;
    mps_progress *progress;
} verifier;

typedef struct {
    verifier *v;
    mps_kind kind;
    int tensor, id;
} piece_job;

static void problem(verifier *v, const char *fmt, ...)
{
    char line[1200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&v->lock);
    v->problems++;
    if (v->opts->report)
        v->opts->report(v->opts->report_ctx, line);
    pthread_mutex_unlock(&v->lock);
}

static int check_piece(void *arg, int worker, mps_err *unused)
{
    (void)unused;
    piece_job *j = arg;
    verifier *v = j->v;
    stored_piece *sp;
    mps_err err;
    mps_err_clear(&err);
    if (mps_ckpt_piece(v->c, j->kind, j->tensor, j->id, &sp, &err) != 0) {
        problem(v, "%s", err.msg);
        return 0;
    }
    for (int64_t ch = 0; ch < sp->grid.nchunks; ch++) {
        mps_err_clear(&err);
        if (mps_ckpt_read_chunk(v->c, sp, ch, v->scratch[worker], &err) != 0) {
            problem(v, "%s", err.msg);
            continue;
        }
        int64_t b, e;
        mps_chunk_range(&sp->grid, ch, &b, &e, NULL);
        pthread_mutex_lock(&v->lock);
        v->opts->chunks_checked++;
        v->opts->bytes_checked += (e - b) * (int64_t)sizeof(float);
        pthread_mutex_unlock(&v->lock);
        mps_progress_add(v->progress, (e - b) * (int64_t)sizeof(float));
    }
    return 0;
}

int mps_verify(const char *dir, mps_verify_opts *opts, mps_err *err)
{
    mps_ckpt *c;
    if (mps_ckpt_open(dir, &c, err) != 0)
        return -1;
    verifier v = { .c = c, .opts = opts };
    pthread_mutex_init(&v.lock, NULL);
    const mps_manifest *m = &c->m;
    int world = mps_layout_world(&m->layout), nt = mps_tensor_count(&m->cfg);
    opts->chunks_checked = opts->bytes_checked = 0;
    /* every rank's file must be listed, have its recorded size and carry this checkpoint's id and
     * its rank; a bad file is one problem (not one per piece it holds) and its pieces are skipped */
    char *bad_rank = calloc((size_t)world, 1);
    if (!bad_rank) {
        pthread_mutex_destroy(&v.lock);
        mps_ckpt_close(c);
        return mps_fail(err, MPS_ENOMEM, "out of memory");
    }
    for (int r = 0; r < world; r++) {
        mps_err ferr;
        mps_err_clear(&ferr);
        if (c->file_bytes[r] < 0) {
            problem(&v, "%s: rank %d has no file in the manifest", dir, r);
            bad_rank[r] = 1;
        } else if (mps_ckpt_check_rank_file(c, r, &ferr) != 0) {
            problem(&v, "%s", ferr.msg);
            bad_rank[r] = 1;
        }
    }
    /* every stored (non-empty) piece is one job */
    int threads = opts->threads > 0 ? opts->threads : mps_cpu_count();
    int64_t njobs = 0, cap = 0, total = 0;
    piece_job *jobs = NULL;
    mps_pool *pool = NULL;
    int rc = -1;
    for (int k = 0; k < MPS_KIND_COUNT; k++)
        for (int t = 0; (m->kinds & (1u << k)) && t < nt; t++) {
            int np = mps_piece_count(&m->cfg, &m->layout, (mps_kind)k, t);
            for (int id = 0; id < np; id++) {
                mps_piece p;
                mps_piece_by_id(&m->cfg, &m->layout, (mps_kind)k, t, id, &p);
                if (p.flat_end <= p.flat_begin || bad_rank[mps_owner_of(c->owners, (mps_kind)k, t, id)])
                    continue;
                if (njobs == cap) {
                    cap = cap ? cap * 2 : 1024;
                    piece_job *grown = realloc(jobs, sizeof *jobs * (size_t)cap);
                    if (!grown) {
                        mps_fail(err, MPS_ENOMEM, "out of memory");
                        goto out;
                    }
                    jobs = grown;
                }
                jobs[njobs++] = (piece_job){ &v, (mps_kind)k, t, id };
                total += (p.flat_end - p.flat_begin) * (int64_t)sizeof(float);
            }
        }
    if (!(v.scratch = mps_read_scratches_new(threads))) {
        mps_fail(err, MPS_ENOMEM, "out of memory");
        goto out;
    }
    v.progress = mps_progress_new("verify", total, opts->quiet ? 0 : -1);
    if (mps_pool_create(threads, 4096, &pool, err) != 0)
        goto out;
    for (int64_t j = 0; j < njobs; j++)
        if (mps_pool_submit(pool, check_piece, &jobs[j], err) != 0)
            goto out;
    if (mps_pool_wait(pool, err) != 0)
        goto out;
    rc = v.problems;
out:
    mps_pool_destroy(pool);
    mps_progress_done(v.progress);
    mps_read_scratches_free(v.scratch, threads);
    free(jobs);
    free(bad_rank);
    pthread_mutex_destroy(&v.lock);
    mps_ckpt_close(c);
    return rc;
}
