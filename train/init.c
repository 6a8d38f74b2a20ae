#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "init.h"

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

float mps_init_value(const mps_config *cfg, const mps_tensor_spec *spec, uint64_t seed, int index, int64_t flat)
{
    if (index == MPS_TENSOR_WTE) {
        if (flat / cfg->n_embd >= cfg->vocab)
            return 0.0f; /* padded rows */
        return (float)(0.02 * normal_at(seed, index, flat));
    }
    if (index == MPS_TENSOR_WPE)
        return (float)(0.02 * normal_at(seed, index, flat));
    if (index == mps_tensor_lnfw(cfg))
        return 1.0f;
    if (index == mps_tensor_lnfb(cfg))
        return 0.0f;
    int slot = (index - 2) % MPS_TENSORS_PER_LAYER;
    switch (slot) {
    case MPS_SLOT_LN1W:
    case MPS_SLOT_LN2W: return 1.0f;
    case MPS_SLOT_QKVW:
    case MPS_SLOT_FCW: return (float)(0.02 * normal_at(seed, index, flat));
    case MPS_SLOT_ATTPROJW:
    case MPS_SLOT_FCPROJW: return (float)(0.02 / sqrt(2.0 * cfg->n_layer) * normal_at(seed, index, flat));
    default: (void)spec; return 0.0f; /* biases */
    }
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
