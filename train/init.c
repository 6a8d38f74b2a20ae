#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "init.h"

#include "arch.h"

static uint64_t mix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* A standard normal from a counter: Box-Muller on two 53-bit uniforms of the hash. */
static double normal_at(uint64_t seed, int index, int64_t flat)
{
    uint64_t h = mix64(seed ^ mix64((uint64_t)index * 0x100000001b3ull ^ mix64((uint64_t)flat)));
    uint64_t h2 = mix64(h);
    double u1 = ((double)(h >> 11) + 1.0) / 9007199254740993.0; /* (0, 1] */
    double u2 = (double)(h2 >> 11) / 9007199254740992.0;
    return sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2);
}

/* The architecture table's init rule of each tensor (transformers' initialisation: N(0, 0.02) for
 * matrices and embeddings, ones for norm weights, zeros for biases; GPT-2's residual projections
 * N(0, 0.02/sqrt(2 n_layer)) as GPT-2's paper); padded vocabulary rows are zero. A pure function of
 * (seed, tensor, element), so every layout starts from the same model. */
float mps_init_value(const mps_config *cfg, const mps_tensor_spec *spec, uint64_t seed, int index, int64_t flat)
{
    int layer;
    if (mps_tensor_rule_of(cfg, index, &layer)->dims[0] == MPS_DIM_VP &&
        flat / (mps_tensor_numel(spec) / spec->shape[0]) >= cfg->vocab)
        return 0.0f; /* padded rows of the embedding and of an untied head */
    switch (spec->init) {
    case MPS_INIT_NORMAL: return (float)(0.02 * normal_at(seed, index, flat));
    case MPS_INIT_NORMAL_RESID: return (float)(0.02 / sqrt(2.0 * cfg->n_layer) * normal_at(seed, index, flat));
    case MPS_INIT_ONES: return 1.0f;
    case MPS_INIT_ZEROS: break;
    }
    return 0.0f;
}

typedef struct {
    const mps_config *cfg;
    uint64_t seed;
} init_source;

static int init_gather(void *ctx, int worker, mps_kind kind, int t, const mps_box *box, int64_t fb, int64_t fe,
                       float *dst, mps_err *err)
{
    (void)worker; (void)err;
    init_source *s = ctx;
    if (kind != MPS_KIND_PARAM) {
        memset(dst, 0, (size_t)(fe - fb) * sizeof(float));
        return 0;
    }
    mps_tensor_spec spec;
    mps_tensor_spec_get(s->cfg, t, &spec);
    int64_t L = box->cnt[box->ndim - 1];
    for (int64_t row = fb / L; row * L < fe; row++) {
        int64_t base = mps_box_row_origin(&spec, box, row);
        int64_t s0 = row * L > fb ? row * L : fb, s1 = (row + 1) * L < fe ? (row + 1) * L : fe;
        for (int64_t i = s0; i < s1; i++)
            dst[i - fb] = mps_init_value(s->cfg, &spec, s->seed, t, base + i - row * L);
    }
    return 0;
}

int mps_source_no_begin(void *ctx, int tensor, mps_err *err)
{
    (void)ctx; (void)tensor; (void)err;
    return 0;
}

void mps_source_no_end(void *ctx, int tensor)
{
    (void)ctx; (void)tensor;
}

int mps_init_write(const char *dir, const mps_config *cfg, const mps_layout *L, uint64_t seed, int force, int threads,
                   int quiet, mps_err *err)
{
    mps_manifest m;
    mps_manifest_init(&m, cfg, L);
    m.rng_seed = seed;
    snprintf(m.source_format, sizeof m.source_format, "init");
    mps_stage st;
    if (mps_stage_begin(dir, force, NULL, &st, err) != 0) {
        mps_manifest_free(&m);
        return -1;
    }
    init_source is = { cfg, seed };
    mps_source src = { &is, mps_source_no_begin, mps_source_no_end, init_gather };
    mps_write_opts wo = { .threads = threads, .quiet = quiet, .label = "init" };
    int rc = mps_write_shards(st.stage_dir, &m, NULL, 0, &src, &wo, err);
    if (rc == 0)
        rc = mps_stage_commit(&st, &m, err);
    if (rc != 0)
        mps_stage_abort(&st);
    mps_manifest_free(&m);
    return rc;
}
