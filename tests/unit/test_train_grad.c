/* The whole CPU model's gradients (one process, every parameter tensor) against central finite
 * differences of the loss computed by the same engine: checks the composition of the kernels
 * (residuals, tied head, vocab padding, positions), which the kernel tests cannot. */
#include <stdio.h>

#include "init.h"
#include "testutil.h"
#include "train_fixture.h"

int main(void)
{
    /* tiny GPT-2: 2 layers, C=8, 2 heads, vocab 11 padded to 16 (padding rows must get no gradient) */
    mps_config cfg = { .n_layer = 2, .n_embd = 8, .n_head = 2, .n_positions = 8, .vocab = 11, .padded_vocab = 16 };
    const char *dir = test_tmpdir("train_grad");
    CHECK(dir != NULL);
    train_fixture fx;
    if (train_fixture_open(&fx, &cfg, dir) != 0) {
        train_fixture_close(&fx);
        TEST_DONE();
    }
    mps_engine *e = fx.e;
    /* weights: the GPT-2 initialisation scaled up so that every path carries a visible gradient */
    for (int t = 0; t < e->ntensors; t++) {
        mps_tparam *p = &e->t[t];
        for (int64_t i = 0; i < p->box_n; i++) {
            float v = mps_init_value(&cfg, &p->spec, 3, t, i);
            float jitter = 0.1f * mps_init_value(&cfg, &e->t[MPS_TENSOR_WPE].spec, 5, MPS_TENSOR_WPE, i + 1000 * t);
            p->w[i] = t == MPS_TENSOR_WTE && i / cfg.n_embd >= cfg.vocab ? 0.0f : 3.0f * v + jitter;
        }
    }
    double loss = train_fixture_loss(&fx);
    float **grads = train_fixture_copy_grads(&fx);
    int checked = 0, failed = 0;
    for (int t = 0; t < e->ntensors; t++)
        train_fixture_check_tensor(&fx, t, grads, &checked, &failed);
    /* padded vocab rows take no part: their gradient is exactly zero */
    for (int64_t i = cfg.vocab * cfg.n_embd; i < cfg.padded_vocab * cfg.n_embd; i++)
        CHECK(grads[MPS_TENSOR_WTE][i] == 0.0f);
    printf("%d gradient elements checked against finite differences, %d off; loss %.6f\n", checked, failed, loss);
    CHECK(checked > 200);
    CHECK(failed == 0);
    train_fixture_free_grads(&fx, grads);
    train_fixture_close(&fx);
    TEST_DONE();
}
