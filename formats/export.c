/* Export streams each tensor in bands that fit the memory budget: row bands for tensors stored
 * in canonical order, column bands (gathered, then transposed) for Hugging Face Conv1D matrices.
 * Bands are gathered in parallel (one flat sub-range per job) and written in file order. */
#include "export.h"

#include <stdlib.h>
#include <string.h>

#include "pool.h"
#include "progress.h"

typedef struct {
    mps_ckpt *c;
    mps_read_scratch **scratch;
    mps_kind kind;
    int tensor;
    const mps_box *box;
} band;

typedef struct {
    band *b;
    int64_t fb, fe;
    float *dst;
} gather_job;

static int gather_part(void *arg, int worker, mps_err *err)
{
    gather_job *j = arg;
    return mps_ckpt_gather(j->b->c, j->b->scratch[worker], j->b->kind, j->b->tensor, j->b->box, j->fb, j->fe, j->dst, err);
}

/* Gathers the whole box into dst using every worker. */
static int gather_box(mps_pool *pool, band *b, float *dst, gather_job *jobs, int njobs, mps_err *err)
{
    int64_t n = mps_box_numel(b->box);
    for (int i = 0; i < njobs; i++) {
        int64_t begin, count;
        mps_split(n, njobs, i, &begin, &count);
        jobs[i] = (gather_job){ b, begin, begin + count, dst + begin };
        if (count > 0 && mps_pool_submit(pool, gather_part, &jobs[i], err) != 0)
            return -1;
    }
    return mps_pool_wait(pool, err);
}

/* src (R, W) -> dst (W, R), in tiles that stay in cache */
static void transpose(const float *src, float *dst, int64_t R, int64_t W)
{
    enum { TILE = 32 };
    for (int64_t r0 = 0; r0 < R; r0 += TILE)
        for (int64_t k0 = 0; k0 < W; k0 += TILE) {
            int64_t r1 = r0 + TILE < R ? r0 + TILE : R, k1 = k0 + TILE < W ? k0 + TILE : W;
            for (int64_t r = r0; r < r1; r++)
                for (int64_t k = k0; k < k1; k++)
                    dst[k * R + r] = src[r * W + k];
        }
}

static int emit(mps_out_file *out, const float *src, int64_t n, void *conv, mps_err *err)
{
    if (mps_out_file_dtype(out) == MPS_DTYPE_F32)
        return mps_out_file_write(out, src, (size_t)n * sizeof(float), err);
    uint16_t *h = conv;
    for (int64_t i = 0; i < n; i++)
        h[i] = mps_f32_to_bf16(src[i]);
    return mps_out_file_write(out, h, (size_t)n * sizeof(uint16_t), err);
}

int mps_export(const char *ckpt_dir, const mps_export_opts *o, mps_err *err)
{
    mps_ckpt *c;
    if (mps_ckpt_open(ckpt_dir, &c, err) != 0)
        return -1;
    const mps_manifest *m = mps_ckpt_manifest(c);
    const mps_config *cfg = &m->cfg;
    mps_dtype dtype = o->dtype >= 0 ? (mps_dtype)o->dtype : m->source_dtype;
    int64_t budget = o->memory_budget > 0 ? o->memory_budget : (int64_t)256 << 20;
    int threads = o->threads > 0 ? o->threads : mps_cpu_count();
    int njobs = threads * 4;
    mps_out_file *out = NULL;
    mps_pool *pool = NULL;
    mps_progress *progress = NULL;
    mps_read_scratch **scratch = mps_read_scratches_new(threads);
    gather_job *jobs = calloc((size_t)njobs, sizeof *jobs);
    /* the band buffer, its transpose and the bf16 conversion share the budget */
    int64_t band_elems = budget / 3 / (int64_t)sizeof(float);
    float *buf = malloc((size_t)band_elems * sizeof(float)), *tbuf = malloc((size_t)band_elems * sizeof(float));
    void *conv = malloc((size_t)band_elems * sizeof(float));
    int rc = -1;
    if (!scratch || !jobs || !buf || !tbuf || !conv) {
        mps_fail(err, MPS_ENOMEM, "out of memory for export buffers (--memory %lld MiB)", (long long)(budget >> 20));
        goto out;
    }
    if (mps_pool_create(threads, njobs, &pool, err) != 0)
        goto out;
    if (o->format == MPS_FILE_SAFETENSORS) {
        if (mps_safetensors_create(o->out_dir, cfg, dtype, m->hf_config_json, &out, err) != 0)
            goto out;
    } else if (o->format == MPS_FILE_LLMC) {
        if (mps_llmc_create(o->out_dir, cfg, dtype, m->step, &out, err) != 0)
            goto out;
    } else {
        mps_fail(err, MPS_EUSAGE, "--format: export writes safetensors or llmc");
        goto out;
    }
    const mps_out_item *items;
    int nitems;
    mps_out_file_items(out, &items, &nitems);
    int64_t total = 0;
    for (int i = 0; i < nitems; i++) {
        mps_tensor_spec spec;
        mps_tensor_spec_get(cfg, items[i].tensor, &spec);
        total += mps_tensor_numel(&spec) / spec.shape[0] * items[i].rows * (int64_t)sizeof(float);
    }
    progress = mps_progress_new("export", total, o->quiet ? 0 : -1);
    for (int i = 0; i < nitems; i++) {
        const mps_out_item *it = &items[i];
        mps_tensor_spec spec;
        mps_tensor_spec_get(cfg, it->tensor, &spec);
        mps_box box;
        mps_box_whole(&spec, &box);
        band b = { c, scratch, MPS_KIND_PARAM, it->tensor, &box };
        if (!it->transpose) {
            /* rows [0, it->rows) of dim 0, in bands of whole rows */
            int64_t row_elems = mps_tensor_numel(&spec) / spec.shape[0];
            int64_t rows_per_band = band_elems / row_elems;
            if (rows_per_band < 1) {
                mps_fail(err, MPS_EUSAGE, "tensor %s: one row (%lld bytes) exceeds the export memory budget", spec.name,
                         (long long)(row_elems * 4));
                goto out;
            }
            for (int64_t r0 = 0; r0 < it->rows; r0 += rows_per_band) {
                int64_t r1 = r0 + rows_per_band < it->rows ? r0 + rows_per_band : it->rows;
                box.off[0] = r0;
                box.cnt[0] = r1 - r0;
                if (gather_box(pool, &b, buf, jobs, njobs, err) != 0 || emit(out, buf, (r1 - r0) * row_elems, conv, err) != 0)
                    goto out;
                mps_progress_add(progress, (r1 - r0) * row_elems * (int64_t)sizeof(float));
            }
        } else {
            /* the canonical matrix (R, K) (qkvw: (3C, C)) is written as (K, R): column bands */
            int last = spec.ndim - 1;
            int64_t K = spec.shape[last], R = mps_tensor_numel(&spec) / K;
            int64_t cols_per_band = band_elems / R;
            if (cols_per_band < 1) {
                mps_fail(err, MPS_EUSAGE, "tensor %s: one column (%lld bytes) exceeds the export memory budget", spec.name,
                         (long long)(R * 4));
                goto out;
            }
            for (int64_t k0 = 0; k0 < K; k0 += cols_per_band) {
                int64_t k1 = k0 + cols_per_band < K ? k0 + cols_per_band : K, W = k1 - k0;
                box.off[last] = k0;
                box.cnt[last] = W;
                if (gather_box(pool, &b, buf, jobs, njobs, err) != 0)
                    goto out;
                transpose(buf, tbuf, R, W);
                if (emit(out, tbuf, R * W, conv, err) != 0)
                    goto out;
                mps_progress_add(progress, R * W * (int64_t)sizeof(float));
            }
        }
    }
    rc = mps_out_file_finish(out, err);
    out = NULL;
out:
    if (out)
        mps_out_file_abort(out);
    mps_progress_done(progress);
    mps_pool_destroy(pool);
    mps_read_scratches_free(scratch, threads);
    free(jobs);
    free(buf);
    free(tbuf);
    free(conv);
    mps_ckpt_close(c);
    return rc;
}
