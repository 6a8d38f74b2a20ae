/* The Llama block's gradients (RMSNorm, RoPE with Llama 3 scaling, grouped-query attention,
 * SwiGLU, q/k/v biases, untied and tied heads, a head size other than n_embd / n_head) in the whole CPU model against central finite
 * differences of the loss computed by the same engine, every tensor kind of the block checked. */
#include <stdio.h>
#include <string.h>

#include "init.h"
#include "testutil.h"
#include "train_fixture.h"

/* Checks every tensor of the model described by `text`; returns the tensor kinds checked (names
 * without their layer, as "qw", joined). */
static void check_model(const char *text, const char *dir, char *kinds, size_t kinds_size)
{
    mps_config cfg;
    mps_err err;
    mps_err_clear(&err);
    kinds[0] = 0;
    CHECK(mps_config_parse(text, &cfg, &err) == 0);
    train_fixture fx;
    if (train_fixture_open(&fx, &cfg, dir) != 0) {
        train_fixture_close(&fx);
        return;
    }
    mps_engine *e = fx.e;
    /* the initialisation scaled up, and norms and biases moved off 1 and 0, so that every path
     * carries a visible gradient */
    for (int t = 0; t < e->ntensors; t++) {
        mps_tparam *p = &e->t[t];
        for (int64_t i = 0; i < p->box_n; i++) {
            float jitter = 0.1f * mps_init_value(&cfg, &e->t[0].spec, 5, 0, i + 1000 * t);
            float v = 3.0f * mps_init_value(&cfg, &p->spec, 3, t, i) + jitter;
            if (p->spec.init == MPS_INIT_ZEROS)
                v = 5.0f * jitter;
            p->w[i] = p->spec.shape[0] == cfg.padded_vocab && i / cfg.n_embd >= cfg.vocab ? 0.0f : v;
        }
    }
    double loss = train_fixture_loss(&fx);
    float **grads = train_fixture_copy_grads(&fx);
    int checked = 0, failed = 0;
    for (int t = 0; t < e->ntensors; t++) {
        mps_tparam *p = &e->t[t];
        const char *kind = p->spec.layer >= 0 ? strchr(p->spec.name + 2, '.') + 1 : p->spec.name;
        if (!strstr(kinds, kind) && strlen(kinds) + strlen(kind) + 2 < kinds_size) {
            strcat(kinds, " ");
            strcat(kinds, kind);
        }
        train_fixture_check_tensor(&fx, t, grads, &checked, &failed);
        /* the gradients the block's products write in the step's first backward (AdamW leaves them
         * unzeroed): the seven products' weights and the head's (one rank: the last stage) */
        static const char *const written[] = { "qw", "kw", "vw", "ow", "gatew", "upw", "downw", "lm_head" };
        int expect = strcmp(kind, "wte") == 0 && mps_cfg_tied(&cfg);
        for (size_t i = 0; i < sizeof written / sizeof written[0]; i++)
            expect |= strcmp(kind, written[i]) == 0;
        CHECK_MSG(e->block->grad_overwritten(e, t) == expect, "%s: grad_overwritten %d", p->spec.name, !expect);
        /* padded vocab rows take no part: their gradient is exactly zero */
        if (p->spec.shape[0] == cfg.padded_vocab)
            for (int64_t i = cfg.vocab * cfg.n_embd; i < p->box_n; i++)
                CHECK(grads[t][i] == 0.0f);
    }
    printf("%s: %d gradient elements checked against finite differences, %d off; loss %.6f; tensors%s\n", text,
           checked, failed, loss, kinds);
    CHECK(checked > 200);
    CHECK(failed == 0);
    train_fixture_free_grads(&fx, grads);
    train_fixture_close(&fx);
}

int main(void)
{
    const char *dir = test_tmpdir("train_grad_llama");
    CHECK(dir != NULL);
    char kinds[512];
    /* Llama 3 style: 4 query heads over 2 kv heads, untied head, the Llama 3 frequency scaling
     * with an original context short enough that every branch of it is taken */
    check_model("arch=llama,n_layer=2,n_embd=16,n_head=4,n_kv_head=2,ffn=24,vocab=11,n_positions=8,tied=0,"
                "rope_theta=500000,rope_llama3=8:1:4:8",
                dir, kinds, sizeof kinds);
    CHECK_MSG(strcmp(kinds, " wte ln1w qw kw vw ow ln2w gatew upw downw lnfw lm_head") == 0, "%s", kinds);
    /* Qwen2 style: q, k, v biases and the head tied to the embedding */
    check_model("arch=llama,family=qwen2,n_layer=2,n_embd=16,n_head=4,n_kv_head=1,ffn=24,vocab=11,n_positions=8,"
                "tied=1,qkv_bias=1,norm_eps=1e-6",
                dir, kinds, sizeof kinds);
    CHECK_MSG(strcmp(kinds, " wte ln1w qw qb kw kb vw vb ow ln2w gatew upw downw lnfw") == 0, "%s", kinds);
    /* Mistral NeMo's form: the heads (4 of 6) wider together than the model (16) */
    check_model("arch=llama,family=mistral,n_layer=2,n_embd=16,n_head=4,n_kv_head=2,ffn=24,vocab=11,n_positions=8,"
                "tied=0,head_dim=6",
                dir, kinds, sizeof kinds);
    CHECK_MSG(strcmp(kinds, " wte ln1w qw kw vw ow ln2w gatew upw downw lnfw lm_head") == 0, "%s", kinds);
    TEST_DONE();
}
