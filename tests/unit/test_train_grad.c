/* The whole CPU model's gradients (one process, every parameter tensor) against central finite
 * differences of the loss computed by the same engine: checks the composition of the kernels
 * (residuals, tied head, vocab padding, positions), which the kernel tests cannot. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine_internal.h"
#include "init.h"
#include "testutil.h"

static double loss_at(mps_engine *e, const mps_tokens *d)
{
    double loss, norm;
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_engine_grads(e, d, 0, &loss, &norm, &err) == 0);
    return loss;
}

int main(void)
{
    /* tiny GPT-2: 2 layers, C=8, 2 heads, vocab 11 padded to 16 (padding rows must get no gradient) */
    mps_config cfg = { .n_layer = 2, .n_embd = 8, .n_head = 2, .n_positions = 8, .vocab = 11, .padded_vocab = 16 };
    mps_layout L;
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_layout_parse("dp=1", &cfg, &L, &err) == 0);
    const char *dir = test_tmpdir("train_grad");
    CHECK(dir != NULL);
    char path[1100];
    snprintf(path, sizeof path, "%s/tokens.bin", dir);
    CHECK(mps_tokens_write_synthetic(path, 200, cfg.vocab, 7, &err) == 0);
    mps_tokens *data;
    CHECK(mps_tokens_open(path, 5, cfg.vocab, &data, &err) == 0);
    mps_comm comm;
    mps_comm_self(&comm);
    mps_backend be;
    mps_backend_cpu(&be);
    mps_train_opts o = { .micro_batch = 2, .seq = 5, .global_batch = 4, .lr = 1e-3f, .lr_min = 1e-3f,
                         .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f };
    mps_engine *e;
    CHECK(mps_engine_new(&cfg, &L, &comm, &be, &o, &e, &err) == 0);
    /* weights: the GPT-2 initialisation scaled up so that every path carries a visible gradient */
    for (int t = 0; t < e->ntensors; t++) {
        mps_tparam *p = &e->t[t];
        for (int64_t i = 0; i < p->box_n; i++) {
            float v = mps_init_value(&cfg, &p->spec, 3, t, i);
            float jitter = 0.1f * mps_init_value(&cfg, &e->t[MPS_TENSOR_WPE].spec, 5, MPS_TENSOR_WPE, i + 1000 * t);
            p->w[i] = t == MPS_TENSOR_WTE && i / cfg.n_embd >= cfg.vocab ? 0.0f : 3.0f * v + jitter;
        }
    }
    double loss, norm;
    CHECK(mps_engine_grads(e, data, 0, &loss, &norm, &err) == 0);
    /* keep the analytic gradients; later loss evaluations overwrite the accumulators */
    float **grads = calloc((size_t)e->ntensors, sizeof *grads);
    for (int t = 0; t < e->ntensors; t++) {
        grads[t] = malloc((size_t)e->t[t].box_n * sizeof(float));
        memcpy(grads[t], e->t[t].g, (size_t)e->t[t].box_n * sizeof(float));
    }
    int checked = 0, failed = 0;
    for (int t = 0; t < e->ntensors; t++) {
        mps_tparam *p = &e->t[t];
        /* up to 12 elements per tensor, spread over it */
        int64_t step = p->box_n / 12 + 1;
        for (int64_t i = t % 3; i < p->box_n; i += step) {
            float keep = p->w[i];
            float h = 2e-3f * (fabsf(keep) > 1 ? fabsf(keep) : 1);
            for (int u = 0; u < e->ntensors; u++)
                memset(e->t[u].g, 0, (size_t)e->t[u].box_n * sizeof(float));
            p->w[i] = keep + h;
            double lp = loss_at(e, data);
            for (int u = 0; u < e->ntensors; u++)
                memset(e->t[u].g, 0, (size_t)e->t[u].box_n * sizeof(float));
            p->w[i] = keep - h;
            double lm = loss_at(e, data);
            p->w[i] = keep;
            double numeric = (lp - lm) / (2.0 * (double)h), analytic = grads[t][i];
            /* fp32 forward, h = 1e-2: the difference quotient is good to ~1e-3 absolute here */
            double tol = 2e-3 + 2e-2 * fabs(numeric);
            checked++;
            if (fabs(analytic - numeric) > tol) {
                failed++;
                fprintf(stderr, "%s[%lld]: analytic %.6g numeric %.6g\n", p->spec.name, (long long)i, analytic,
                        numeric);
            }
        }
    }
    /* padded vocab rows take no part: their gradient is exactly zero */
    for (int64_t i = cfg.vocab * cfg.n_embd; i < cfg.padded_vocab * cfg.n_embd; i++)
        CHECK(grads[MPS_TENSOR_WTE][i] == 0.0f);
    printf("%d gradient elements checked against finite differences, %d off; loss %.6f\n", checked, failed, loss);
    CHECK(checked > 200);
    CHECK(failed == 0);
    for (int t = 0; t < e->ntensors; t++)
        free(grads[t]);
    free(grads);
    mps_engine_free(e);
    mps_tokens_close(data);
    remove(path);
    TEST_DONE();
}
