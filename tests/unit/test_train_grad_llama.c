/* The Llama block's gradients (RMSNorm, RoPE with Llama 3 scaling, grouped-query attention,
 * SwiGLU, q/k/v biases, untied and tied heads) in the whole CPU model against central finite
 * differences of the loss computed by the same engine, every tensor kind of the block checked. */
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

static void zero_grads(mps_engine *e)
{
    for (int u = 0; u < e->ntensors; u++)
        memset(e->t[u].g, 0, (size_t)e->t[u].box_n * sizeof(float));
}

/* Checks every tensor of the model described by `text`; returns the tensor kinds checked (names
 * without their layer, as "qw", joined). */
static void check_model(const char *text, const char *dir, char *kinds, size_t kinds_size)
{
    mps_config cfg;
    mps_layout L;
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_config_parse(text, &cfg, &err) == 0);
    CHECK(mps_layout_parse("dp=1", &cfg, &L, &err) == 0);
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
    CHECK_MSG(mps_engine_new(&cfg, &L, &comm, &be, &o, &e, &err) == 0, "%s", err.msg);
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
    double loss, norm;
    CHECK(mps_engine_grads(e, data, 0, &loss, &norm, &err) == 0);
    float **grads = calloc((size_t)e->ntensors, sizeof *grads);
    for (int t = 0; t < e->ntensors; t++) {
        grads[t] = malloc((size_t)e->t[t].box_n * sizeof(float));
        memcpy(grads[t], e->t[t].g, (size_t)e->t[t].box_n * sizeof(float));
    }
    int checked = 0, failed = 0;
    kinds[0] = 0;
    for (int t = 0; t < e->ntensors; t++) {
        mps_tparam *p = &e->t[t];
        const char *kind = p->spec.layer >= 0 ? strchr(p->spec.name + 2, '.') + 1 : p->spec.name;
        if (!strstr(kinds, kind) && strlen(kinds) + strlen(kind) + 2 < kinds_size) {
            strcat(kinds, " ");
            strcat(kinds, kind);
        }
        int64_t step = p->box_n / 12 + 1;
        for (int64_t i = t % 3; i < p->box_n; i += step) {
            float keep = p->w[i];
            float h = 2e-3f * (fabsf(keep) > 1 ? fabsf(keep) : 1);
            zero_grads(e);
            p->w[i] = keep + h;
            double lp = loss_at(e, data);
            zero_grads(e);
            p->w[i] = keep - h;
            double lm = loss_at(e, data);
            p->w[i] = keep;
            double numeric = (lp - lm) / (2.0 * (double)h), analytic = grads[t][i];
            double tol = 2e-3 + 2e-2 * fabs(numeric);
            checked++;
            if (fabs(analytic - numeric) > tol) {
                failed++;
                fprintf(stderr, "%s[%lld]: analytic %.6g numeric %.6g\n", p->spec.name, (long long)i, analytic,
                        numeric);
            }
        }
        /* padded vocab rows take no part: their gradient is exactly zero */
        if (p->spec.shape[0] == cfg.padded_vocab)
            for (int64_t i = cfg.vocab * cfg.n_embd; i < p->box_n; i++)
                CHECK(grads[t][i] == 0.0f);
    }
    printf("%s: %d gradient elements checked against finite differences, %d off; loss %.6f; tensors%s\n", text,
           checked, failed, loss, kinds);
    CHECK(checked > 200);
    CHECK(failed == 0);
    for (int t = 0; t < e->ntensors; t++)
        free(grads[t]);
    free(grads);
    mps_engine_free(e);
    mps_tokens_close(data);
    remove(path);
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
    TEST_DONE();
}
