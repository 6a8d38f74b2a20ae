/* The set-up the whole-model gradient tests share: one process on the CPU backend over a
 * synthetic token file, and the central finite-difference check of single weights. Header-only
 * because tests/tests.cmake builds each test_*.c alone; include it after testutil.h. */
#ifndef MPS_TRAIN_FIXTURE_H
#define MPS_TRAIN_FIXTURE_H
#include <math.h>

#include "engine_internal.h"

typedef struct {
    mps_config cfg;
    mps_layout L;
    mps_comm comm;    /* the engine keeps pointers to comm and be: the fixture must not move */
    mps_backend be;
    mps_train_opts o;
    char path[1100];  /* the token file */
    mps_tokens *data;
    mps_engine *e;
} train_fixture;

/* 200 synthetic tokens in DIR/tokens.bin, sequences of 5, micro-batch 2 of a global batch 4.
 * Returns 0 with fx->e built, else -1 (the failed check printed). */
static inline int train_fixture_open(train_fixture *fx, const mps_config *cfg, const char *dir)
{
    mps_err err;
    mps_err_clear(&err);
    memset(fx, 0, sizeof *fx);
    fx->cfg = *cfg;
    CHECK(mps_layout_parse("dp=1", &fx->cfg, &fx->L, &err) == 0);
    snprintf(fx->path, sizeof fx->path, "%s/tokens.bin", dir);
    CHECK(mps_tokens_write_synthetic(fx->path, 200, fx->cfg.vocab, 7, &err) == 0);
    int rc = mps_tokens_open(fx->path, 5, fx->cfg.vocab, &fx->data, &err);
    CHECK(rc == 0);
    if (rc != 0)
        return -1;
    mps_comm_self(&fx->comm);
    mps_backend_cpu(&fx->be);
    fx->o = (mps_train_opts){ .micro_batch = 2, .seq = 5, .global_batch = 4, .lr = 1e-3f, .lr_min = 1e-3f,
                              .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f };
    rc = mps_engine_new(&fx->cfg, &fx->L, &fx->comm, &fx->be, &fx->o, &fx->e, &err);
    CHECK_MSG(rc == 0, "%s", err.msg);
    return rc == 0 ? 0 : -1;
}

static inline void train_fixture_close(train_fixture *fx)
{
    if (fx->e)
        mps_engine_free(fx->e);
    if (fx->data)
        mps_tokens_close(fx->data);
    remove(fx->path);
}

static inline double train_fixture_loss(train_fixture *fx)
{
    double loss, norm;
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_engine_grads(fx->e, fx->data, 0, &loss, &norm, &err) == 0);
    return loss;
}

/* A copy of every tensor's gradient: later loss evaluations overwrite the accumulators. */
static inline float **train_fixture_copy_grads(const train_fixture *fx)
{
    const mps_engine *e = fx->e;
    float **grads = calloc((size_t)e->ntensors, sizeof *grads);
    for (int t = 0; t < e->ntensors; t++) {
        grads[t] = malloc((size_t)e->t[t].box_n * sizeof(float));
        memcpy(grads[t], e->t[t].g, (size_t)e->t[t].box_n * sizeof(float));
    }
    return grads;
}

static inline void train_fixture_free_grads(const train_fixture *fx, float **grads)
{
    for (int t = 0; t < fx->e->ntensors; t++)
        free(grads[t]);
    free(grads);
}

static inline void train_fixture_zero_grads(train_fixture *fx)
{
    for (int u = 0; u < fx->e->ntensors; u++)
        memset(fx->e->t[u].g, 0, (size_t)fx->e->t[u].box_n * sizeof(float));
}

/* Up to 12 elements of tensor t, spread over it, against central differences of the loss; adds
 * to *checked and *failed, and prints every element off. */
static inline void train_fixture_check_tensor(train_fixture *fx, int t, float *const *grads, int *checked, int *failed)
{
    mps_tparam *p = &fx->e->t[t];
    int64_t step = p->box_n / 12 + 1;
    for (int64_t i = t % 3; i < p->box_n; i += step) {
        float keep = p->w[i];
        float h = 2e-3f * (fabsf(keep) > 1 ? fabsf(keep) : 1);
        train_fixture_zero_grads(fx);
        p->w[i] = keep + h;
        double lp = train_fixture_loss(fx);
        train_fixture_zero_grads(fx);
        p->w[i] = keep - h;
        double lm = train_fixture_loss(fx);
        p->w[i] = keep;
        double numeric = (lp - lm) / (2.0 * (double)h), analytic = grads[t][i];
        /* fp32 forward, h = 2e-3 (relative above 1): the difference quotient is good to ~1e-3 absolute here */
        double tol = 2e-3 + 2e-2 * fabs(numeric);
        (*checked)++;
        if (fabs(analytic - numeric) > tol) {
            (*failed)++;
            fprintf(stderr, "%s[%lld]: analytic %.6g numeric %.6g\n", p->spec.name, (long long)i, analytic, numeric);
        }
    }
}
#endif
