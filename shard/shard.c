#include "shard.h"

#include <stdlib.h>
#include <string.h>

#include "progress.h"

/* The model file as a write source: tensor t is loaded into slot t % 2, so the next tensor can be
 * read while the workers compress the current one. Optimizer moments of a fresh state are zero. */
typedef struct {
    mps_model_file *file;
    const mps_config *cfg;
    float *slot[2];
    size_t capacity[2]; /* floats; buffers only grow, so pages are not faulted in again per tensor */
    int tensor[2];
    int synthetic_optimizer; /* fill Adam moments with deterministic values instead of zeros */
    uint64_t seed;
} file_source;

/* Deterministic non-zero optimizer state (tests and benchmarks of reshard): the synthetic-model
 * values of another seed (v made non-negative), a pure function of the canonical element. */
static void fill_synthetic(const file_source *fs, mps_kind kind, int t, const mps_box *box, int64_t fb, int64_t fe,
                           float *dst)
{
    mps_tensor_spec spec;
    mps_tensor_spec_get(fs->cfg, t, &spec);
    uint64_t seed = fs->seed * 2 + (kind == MPS_KIND_ADAM_V);
    int n = box->ndim;
    int64_t L = box->cnt[n - 1];
    for (int64_t row = fb / L; row * L < fe; row++) {
        int64_t rem = row, base = 0, stride = 1, coord[MPS_MAX_DIMS];
        for (int d = n - 2; d >= 0; d--) {
            coord[d] = rem % box->cnt[d];
            rem /= box->cnt[d];
        }
        for (int d = n - 1; d >= 0; d--) {
            base += (box->off[d] + (d == n - 1 ? 0 : coord[d])) * stride;
            stride *= spec.shape[d];
        }
        int64_t s0 = row * L > fb ? row * L : fb, s1 = (row + 1) * L < fe ? (row + 1) * L : fe;
        for (int64_t i = s0; i < s1; i++) {
            float v = mps_synth_value(fs->cfg, seed, t, base + i - row * L);
            dst[i - fb] = kind == MPS_KIND_ADAM_V ? (v < 0 ? -v : v) : v;
        }
    }
}

static int begin_tensor(void *ctx, int t, mps_err *err)
{
    file_source *fs = ctx;
    mps_tensor_spec spec;
    mps_tensor_spec_get(fs->cfg, t, &spec);
    int s = t % 2;
    size_t n = (size_t)mps_tensor_numel(&spec);
    fs->tensor[s] = -1;
    if (n > fs->capacity[s]) {
        free(fs->slot[s]);
        fs->slot[s] = malloc(n * sizeof(float));
        fs->capacity[s] = fs->slot[s] ? n : 0;
        if (!fs->slot[s])
            return mps_fail(err, MPS_ENOMEM, "out of memory loading tensor %s", spec.name);
    }
    if (mps_model_file_read_tensor(fs->file, t, fs->slot[s], err) != 0)
        return -1;
    fs->tensor[s] = t;
    return 0;
}

static void end_tensor(void *ctx, int t)
{
    file_source *fs = ctx;
    fs->tensor[t % 2] = -1;
}

static int gather(void *ctx, int worker, mps_kind kind, int t, const mps_box *box, int64_t fb, int64_t fe, float *dst,
                  mps_err *err)
{
    (void)worker;
    file_source *fs = ctx;
    if (kind == MPS_KIND_ADAM_M || kind == MPS_KIND_ADAM_V) {
        if (fs->synthetic_optimizer)
            fill_synthetic(fs, kind, t, box, fb, fe, dst);
        else
            memset(dst, 0, (size_t)(fe - fb) * sizeof(float));
        return 0;
    }
    int s = t % 2;
    if (fs->tensor[s] != t)
        return mps_fail(err, MPS_EFAIL, "internal: tensor %d not loaded", t);
    mps_tensor_spec spec;
    mps_tensor_spec_get(fs->cfg, t, &spec);
    mps_box_extract(fs->slot[s], &spec, box, fb, fe, dst);
    return 0;
}

int mps_shard(const char *input, const mps_shard_opts *o, mps_err *err)
{
    mps_model_file *file;
    if (mps_model_file_open(input, &o->file, &file, err) != 0)
        return -1;
    const mps_config *cfg = mps_model_file_config(file);
    mps_layout layout;
    mps_manifest m;
    mps_stage st;
    int rc = -1;
    if (mps_layout_parse(o->layout, cfg, &layout, err) != 0) {
        mps_model_file_close(file);
        return -1;
    }
    mps_manifest_init(&m, cfg, &layout);
    if (o->chunk_bytes > 0) {
        if (o->chunk_bytes < 4096 || o->chunk_bytes > MPS_MAX_CHUNK_BYTES) {
            mps_model_file_close(file);
            return mps_fail(err, MPS_EUSAGE, "--chunk-mb: chunk size must be between 4 KiB and 1 GiB");
        }
        m.chunk_bytes = o->chunk_bytes / 4 * 4;
    }
    if (o->level_set)
        m.zstd_level = o->zstd_level;
    snprintf(m.source_format, sizeof m.source_format, "%s", mps_file_format_name(mps_model_file_format(file)));
    m.source_dtype = mps_model_file_dtype(file);
    const char *hf = mps_model_file_hf_config(file);
    if (hf && !(m.hf_config_json = strdup(hf))) {
        mps_model_file_close(file);
        return mps_fail(err, MPS_ENOMEM, "out of memory");
    }
    if (mps_stage_begin(o->out_dir, o->force, &st, err) != 0)
        goto out;
    file_source fs = { .file = file, .cfg = cfg, .tensor = { -1, -1 }, .synthetic_optimizer = o->synthetic_optimizer,
                       .seed = o->synthetic_seed };
    mps_source src = { &fs, begin_tensor, end_tensor, gather };
    mps_write_opts wo = { .threads = o->threads, .quiet = o->quiet, .label = "shard" };
    int wrc = mps_write_shards(st.stage_dir, &m, NULL, 0, &src, &wo, err);
    free(fs.slot[0]);
    free(fs.slot[1]);
    if (wrc != 0 || mps_stage_commit(&st, &m, err) != 0) {
        mps_stage_abort(&st);
        goto out;
    }
    rc = 0;
out:
    mps_manifest_free(&m);
    mps_model_file_close(file);
    return rc;
}
