/* Export streams each tensor in bands that fit the memory budget: row bands for tensors stored
 * in canonical order, column bands (gathered, then transposed) for Hugging Face Conv1D matrices.
 * Bands are gathered in parallel (one flat sub-range per job) and written in file order.
 * llm.c state files are flat ranges of canonical tensors (llmc_state.h), streamed the same way;
 * the model file comes first, the state files next, DONE last, each committed by rename. */
#include "export.h"

#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "llmc_state.h"
#include "output.h"
#include "pool.h"
#include "progress.h"

typedef struct {
    mps_ckpt *c;
    mps_read_scratch **scratch;
    mps_kind kind;
    int tensor;
    const mps_box *box;
    const volatile sig_atomic_t *stop; /* mps_export_opts.stop: checked before each band */
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

/* Gathers elements [fb, fe) of the box into dst using every worker (small ranges in fewer jobs). */
static int gather_range(mps_pool *pool, band *b, int64_t fb, int64_t fe, float *dst, gather_job *jobs, int njobs,
                        mps_err *err)
{
    int stop = b->stop ? *b->stop : 0;
    if (stop)
        return mps_fail(err, MPS_ESTOPPED + stop, "stopped by a signal");
    int64_t n = fe - fb, parts = n / 16384 < njobs ? n / 16384 : njobs;
    if (parts < 1)
        parts = 1;
    for (int64_t i = 0; i < parts; i++) {
        int64_t begin, count;
        mps_split(n, parts, i, &begin, &count);
        jobs[i] = (gather_job){ b, fb + begin, fb + begin + count, dst + begin };
        if (count > 0 && mps_pool_submit(pool, gather_part, &jobs[i], err) != 0)
            return -1;
    }
    return mps_pool_wait(pool, err);
}

/* Gathers the whole box into dst using every worker. */
static int gather_box(mps_pool *pool, band *b, float *dst, gather_job *jobs, int njobs, mps_err *err)
{
    return gather_range(pool, b, 0, mps_box_numel(b->box), dst, jobs, njobs, err);
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
    if (mps_out_file_dtype(out) == MPS_DTYPE_F16)
        for (int64_t i = 0; i < n; i++)
            h[i] = mps_f32_to_f16(src[i]);
    else
        for (int64_t i = 0; i < n; i++)
            h[i] = mps_f32_to_bf16(src[i]);
    return mps_out_file_write(out, h, (size_t)n * sizeof(uint16_t), err);
}

/* What an llm.c state export needs, checked before anything is written. */
typedef struct {
    int processes;
    int64_t shard_numel;           /* floats per array in each file */
    mps_kind kinds[3];             /* m, v, then master (or param when the checkpoint has no master) */
    int nkinds;
    mps_llmc_state_header *hdr;    /* per rank */
} state_plan;

static int plan_states(const mps_manifest *m, const mps_export_opts *o, state_plan *p, mps_err *err)
{
    const mps_config *cfg = &m->cfg;
    p->processes = o->processes;
    if (o->format != MPS_FILE_LLMC)
        return mps_fail(err, MPS_EUSAGE, "--processes: optimizer-state files are written for --format llmc only");
    if (o->processes < 1 || o->processes > MPS_LLMC_MAX_PROCESSES)
        return mps_fail(err, MPS_EUSAGE, "--processes %d: expected 1 to %d", o->processes, MPS_LLMC_MAX_PROCESSES);
    for (int k = MPS_KIND_ADAM_M; k <= MPS_KIND_ADAM_V; k++)
        if (!(m->kinds & (1u << k)))
            return mps_fail(err, MPS_EUSAGE, "--processes: the checkpoint stores no %s (Adam moments), which llm.c "
                            "state files need; export without --processes writes the model alone",
                            mps_kind_name((mps_kind)k));
    if (o->zero && mps_llmc_zero_check(cfg, o->processes, err) != 0)
        return -1;
    int64_t total = mps_param_count(cfg);
    p->shard_numel = o->zero ? total / o->processes : total;
    p->nkinds = 0;
    p->kinds[p->nkinds++] = MPS_KIND_ADAM_M;
    p->kinds[p->nkinds++] = MPS_KIND_ADAM_V;
    /* without a stored master copy the f32 param is the master copy (FORMAT.md section 3): what
     * llm.c itself starts from when it first allocates master weights */
    if (o->master_weights)
        p->kinds[p->nkinds++] = (m->kinds & (1u << MPS_KIND_MASTER)) ? MPS_KIND_MASTER : MPS_KIND_PARAM;
    p->hdr = calloc((size_t)o->processes, sizeof *p->hdr);
    if (!p->hdr)
        return mps_fail(err, MPS_ENOMEM, "out of memory");
    return mps_llmc_state_headers(m->train_state_json, m->step, o->processes, o->master_weights != 0, p->hdr, err);
}

/* Writes state_<step>_<rank>.bin for every rank: per kind, per canonical tensor in llm.c order, the
 * rank's flat range of the tensor (ZeRO-1) or the whole tensor, in bands of band_elems. */
static int write_states(mps_ckpt *c, const state_plan *p, const mps_export_opts *o, mps_pool *pool,
                        mps_read_scratch **scratch, gather_job *jobs, int njobs, float *buf, int64_t band_elems,
                        mps_progress *progress, mps_err *err)
{
    const mps_config *cfg = &mps_ckpt_manifest(c)->cfg;
    int nt = mps_tensor_count(cfg);
    int *order = malloc((size_t)nt * sizeof *order);
    if (!order)
        return mps_fail(err, MPS_ENOMEM, "out of memory");
    mps_llmc_tensor_order(cfg, order);
    int rc = -1;
    for (int r = 0; r < p->processes; r++) {
        mps_out_file *f;
        if (mps_llmc_state_create(o->out_dir, &p->hdr[r], p->shard_numel, &f, err) != 0)
            goto out;
        for (int k = 0; k < p->nkinds; k++)
            for (int i = 0; i < nt; i++) {
                mps_tensor_spec spec;
                mps_tensor_spec_get(cfg, order[i], &spec);
                mps_box box;
                mps_box_whole(&spec, &box);
                band b = { c, scratch, p->kinds[k], order[i], &box, o->stop };
                int64_t S = mps_tensor_numel(&spec), fb = 0, fe = S;
                if (o->zero) { /* rank r's ZeRO-1 slice of every layer's tensor */
                    fb = r * (S / p->processes);
                    fe = fb + S / p->processes;
                }
                for (int64_t b0 = fb; b0 < fe; b0 += band_elems) {
                    int64_t b1 = b0 + band_elems < fe ? b0 + band_elems : fe;
                    if (gather_range(pool, &b, b0, b1, buf, jobs, njobs, err) != 0 ||
                        mps_out_file_write(f, buf, (size_t)(b1 - b0) * sizeof(float), err) != 0) {
                        mps_out_file_abort(f);
                        goto out;
                    }
                    mps_progress_add(progress, (b1 - b0) * (int64_t)sizeof(float));
                }
            }
        if (mps_out_file_finish(f, err) != 0)
            goto out;
    }
    rc = 0;
out:
    free(order);
    return rc;
}

/* Without --force nothing already under the output names is replaced or removed: the model file
 * (and config.json), and with --processes the step's DONE and state files, those of ranks the
 * export would not write included (a forced export removes them). */
static int refuse_existing_outputs(const mps_manifest *m, const mps_export_opts *o, mps_err *err)
{
    if (mps_output_refuse_model_files(o->out_dir, o->format, m->step, err) != 0)
        return -1;
    if (!o->processes)
        return 0;
    char name[64], path[4400];
    mps_llmc_done_name(m->step, name, sizeof name);
    snprintf(path, sizeof path, "%s/%s", o->out_dir, name);
    if (mps_output_refuse_existing(path, err) != 0)
        return -1;
    for (int r = 0; r < MPS_LLMC_MAX_PROCESSES; r++) {
        struct stat st;
        mps_llmc_state_name(m->step, r, name, sizeof name);
        snprintf(path, sizeof path, "%s/%s", o->out_dir, name);
        if (r >= o->processes && lstat(path, &st) != 0)
            break; /* the names of an export's state files have no gaps */
        if (mps_output_refuse_existing(path, err) != 0)
            return -1;
    }
    return 0;
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
    state_plan plan = { 0 };
    if (o->processes && plan_states(m, o, &plan, err) != 0)
        goto out;
    if (!o->force && refuse_existing_outputs(m, o, err) != 0)
        goto out;
    /* DONE vouches for the files of its step: it goes before any of them is replaced */
    if (o->processes && mps_llmc_done_remove(o->out_dir, m->step, err) != 0)
        goto out;
    if (!scratch || !jobs || !buf || !tbuf || !conv) {
        mps_fail(err, MPS_ENOMEM, "out of memory for export buffers (--memory %lld MiB)", (long long)(budget >> 20));
        goto out;
    }
    if (mps_pool_create(threads, njobs, &pool, err) != 0)
        goto out;
    if (o->format == MPS_FILE_SAFETENSORS) {
        if (mps_safetensors_create(o->out_dir, cfg, dtype, m->hf_config_json,
                                   o->max_shard_bytes ? o->max_shard_bytes : MPS_DEFAULT_MAX_SHARD_BYTES, &out, err) != 0)
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
    total += (int64_t)plan.processes * plan.nkinds * plan.shard_numel * (int64_t)sizeof(float);
    progress = mps_progress_new("export", total, o->quiet ? 0 : -1);
    for (int i = 0; i < nitems; i++) {
        const mps_out_item *it = &items[i];
        mps_tensor_spec spec;
        mps_tensor_spec_get(cfg, it->tensor, &spec);
        mps_box box;
        mps_box_whole(&spec, &box);
        band b = { c, scratch, MPS_KIND_PARAM, it->tensor, &box, o->stop };
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
    if (rc == 0 && o->processes)
        rc = write_states(c, &plan, o, pool, scratch, jobs, njobs, buf, band_elems, progress, err) != 0 ||
             mps_llmc_state_remove_extra(o->out_dir, m->step, o->processes, err) != 0 ||
             mps_llmc_done_write(o->out_dir, m->step, err) != 0 ? -1 : 0;
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
    free(plan.hdr);
    mps_ckpt_close(c);
    return rc;
}
