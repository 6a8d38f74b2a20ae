/* The first-step loss of a Llama-family model imported from a transformers-style directory
 * (config.json + model.safetensors, as `mpshard synth` writes them; `shard` imports it) equals a
 * float64 forward pass written here from the Hugging Face definitions, independent of the
 * project's kernels: RMSNorm, rotate-half RoPE with Llama 3's, linear and dynamic scaling,
 * grouped-query attention, SwiGLU, q/k/v biases, untied or tied head, a head size other than
 * n_embd / n_head (Mistral NeMo's form: q wider than the model). The weights are scaled up in the
 * file first so that attention and the MLP move the loss well beyond the tolerance. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckpt.h"
#include "engine.h"
#include "modelfile.h"
#include "shard/shard.h"
#include "testutil.h"

/* The model as the reference reads it: its own copy of the numbers in the config string. */
typedef struct {
    const char *text;
    int L, C, H, KV, F, V, untied, bias;
    double eps, theta, factor, lo, hi, orig; /* orig 0: no Llama 3 scaling */
    int hd;                                  /* head size; 0: C / H */
    double linear;                           /* linear RoPE scaling's factor; 0: none */
} ref_model;

typedef struct {
    unsigned char *bytes;
    long size;
    const char *header;
    long data_start;
} st_file;

static int st_load(const char *path, st_file *f)
{
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return -1;
    fseek(fp, 0, SEEK_END);
    f->size = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    f->bytes = malloc((size_t)f->size + 1);
    int ok = f->bytes && fread(f->bytes, 1, (size_t)f->size, fp) == (size_t)f->size;
    fclose(fp);
    if (!ok)
        return -1;
    uint64_t n;
    memcpy(&n, f->bytes, 8);
    f->header = (const char *)f->bytes + 8;
    f->data_start = 8 + (long)n;
    return 0;
}

/* The float32 data of tensor `key` (its "data_offsets" in the header), and its element count. */
static float *st_tensor(st_file *f, const char *key, long *count)
{
    char quoted[256];
    snprintf(quoted, sizeof quoted, "\"%s\":", key);
    const char *k = strstr(f->header, quoted);
    if (!k || k >= (const char *)f->bytes + f->data_start)
        return NULL;
    const char *end = strchr(k, '}');
    const char *d = strstr(k, "\"data_offsets\":[");
    long a, b;
    if (!d || d > end || sscanf(d + 16, "%ld,%ld", &a, &b) != 2)
        return NULL;
    if (count)
        *count = (b - a) / 4;
    return (float *)(void *)(f->bytes + f->data_start + a);
}

/* Double x (n) = a float tensor of the file. */
static double *get(st_file *f, const char *fmt, int layer, long want)
{
    char key[256];
    snprintf(key, sizeof key, fmt, layer);
    long n = 0;
    float *src = st_tensor(f, key, &n);
    CHECK_MSG(src != NULL && n == want, "%s: missing or %ld elements (want %ld)", key, n, want);
    double *x = calloc((size_t)want, sizeof *x);
    for (long i = 0; src && i < want && i < n; i++) {
        float v;
        memcpy(&v, src + i, 4);
        x[i] = v;
    }
    return x;
}

/* y (out) = W (out, in) x (+ b) */
static void linear(double *y, const double *W, const double *b, const double *x, int out, int in)
{
    for (int o = 0; o < out; o++) {
        double s = b ? b[o] : 0.0;
        for (int i = 0; i < in; i++)
            s += W[(long)o * in + i] * x[i];
        y[o] = s;
    }
}

static void rmsnorm(double *y, const double *x, const double *w, int C, double eps)
{
    double ss = 0;
    for (int i = 0; i < C; i++)
        ss += x[i] * x[i];
    double r = 1.0 / sqrt(ss / C + eps);
    for (int i = 0; i < C; i++)
        y[i] = w[i] * (x[i] * r);
}

/* transformers' default and llama3 rope inverse frequencies */
static double inv_freq(const ref_model *m, int i, int hd)
{
    double f = pow(m->theta, -(2.0 * i) / hd);
    if (m->linear != 0) /* _compute_linear_scaling_rope_parameters: inv_freq /= factor */
        return f / m->linear;
    if (m->orig == 0)
        return f;
    double wl = 2 * M_PI / f, low_wl = m->orig / m->lo, high_wl = m->orig / m->hi;
    double scaled = wl > low_wl ? f / m->factor : f;
    if (wl >= high_wl && wl <= low_wl) {
        double smooth = (m->orig / wl - m->lo) / (m->hi - m->lo);
        scaled = (1 - smooth) * scaled / m->factor + smooth * scaled;
    }
    return scaled;
}

/* q_embed = q cos + rotate_half(q) sin, rotate_half(x) = cat(-x2, x1) */
static void rope(double *v, int pos, const ref_model *m, int hd)
{
    int h = hd / 2;
    for (int i = 0; i < h; i++) {
        double a = pos * inv_freq(m, i, hd), c = cos(a), s = sin(a);
        double x1 = v[i], x2 = v[i + h];
        v[i] = x1 * c - x2 * s;
        v[i + h] = x2 * c + x1 * s;
    }
}

/* Mean cross-entropy over the sequences [0, nseq) of T tokens of an llm.c version 1 file. */
static double reference_loss(const ref_model *m, const char *model_path, const char *tokens_path, int nseq, int T)
{
    st_file f;
    CHECK(st_load(model_path, &f) == 0);
    const int C = m->C, H = m->H, KV = m->KV, F = m->F, V = m->V, hd = m->hd ? m->hd : C / H, group = H / KV;
    double *E = get(&f, "model.embed_tokens.weight", 0, (long)V * C);
    double *head = m->untied ? get(&f, "lm_head.weight", 0, (long)V * C) : E;
    double *normf = get(&f, "model.norm.weight", 0, C);
    double *W[16][12];
    for (int l = 0; l < m->L; l++) {
        const char *p = "model.layers.%d.";
        char k[12][128];
        const char *names[12] = { "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.q_proj.bias",
                                  "self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight",
                                  "self_attn.v_proj.bias", "self_attn.o_proj.weight",
                                  "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                  "mlp.down_proj.weight" };
        long sizes[12] = { C, (long)H * hd * C, H * hd, (long)KV * hd * C, KV * hd, (long)KV * hd * C, KV * hd,
                           (long)C * H * hd, C, (long)F * C, (long)F * C, (long)C * F };
        for (int j = 0; j < 12; j++) {
            snprintf(k[j], sizeof k[j], "%s%s", p, names[j]);
            int is_bias = j == 2 || j == 4 || j == 6;
            W[l][j] = is_bias && !m->bias ? NULL : get(&f, k[j], l, sizes[j]);
        }
    }
    FILE *tf = fopen(tokens_path, "rb");
    CHECK(tf != NULL);
    long ntok = (long)nseq * T + 1;
    uint16_t *tok = calloc((size_t)ntok, 2);
    CHECK(tf && fseek(tf, 1024, SEEK_SET) == 0 && fread(tok, 2, (size_t)ntok, tf) == (size_t)ntok);
    if (tf)
        fclose(tf);
    double *x = calloc((size_t)T * C, 8), *n = calloc((size_t)T * C, 8);
    double *q = calloc((size_t)T * H * hd, 8), *kk = calloc((size_t)T * KV * hd, 8), *vv = calloc((size_t)T * KV * hd, 8);
    double *att = calloc((size_t)H * hd, 8), *tmp = calloc((size_t)C, 8), *g = calloc((size_t)F, 8),
           *u = calloc((size_t)F, 8), *logit = calloc((size_t)V, 8), *p = calloc((size_t)T, 8);
    double total = 0;
    for (int sq = 0; sq < nseq; sq++) {
        const uint16_t *in = tok + (long)sq * T;
        for (int t = 0; t < T; t++)
            memcpy(x + (long)t * C, E + (long)in[t] * C, sizeof(double) * (size_t)C);
        for (int l = 0; l < m->L; l++) {
            double **w = W[l];
            for (int t = 0; t < T; t++) {
                rmsnorm(n + (long)t * C, x + (long)t * C, w[0], C, m->eps);
                linear(q + (long)t * H * hd, w[1], w[2], n + (long)t * C, H * hd, C);
                linear(kk + (long)t * KV * hd, w[3], w[4], n + (long)t * C, KV * hd, C);
                linear(vv + (long)t * KV * hd, w[5], w[6], n + (long)t * C, KV * hd, C);
                for (int h = 0; h < H; h++)
                    rope(q + (long)t * H * hd + h * hd, t, m, hd);
                for (int h = 0; h < KV; h++)
                    rope(kk + (long)t * KV * hd + h * hd, t, m, hd);
            }
            for (int t = T - 1; t >= 0; t--) { /* (x[t] changes after every query row t' <= t is done) */
                for (int h = 0; h < H; h++) {
                    const double *qh = q + (long)t * H * hd + h * hd;
                    int kvh = h / group;
                    double mx = -INFINITY, sum = 0;
                    for (int s = 0; s <= t; s++) {
                        double d = 0;
                        for (int i = 0; i < hd; i++)
                            d += qh[i] * kk[(long)s * KV * hd + kvh * hd + i];
                        p[s] = d / sqrt((double)hd);
                        if (p[s] > mx)
                            mx = p[s];
                    }
                    for (int s = 0; s <= t; s++)
                        sum += (p[s] = exp(p[s] - mx));
                    for (int i = 0; i < hd; i++) {
                        double o = 0;
                        for (int s = 0; s <= t; s++)
                            o += p[s] / sum * vv[(long)s * KV * hd + kvh * hd + i];
                        att[h * hd + i] = o;
                    }
                }
                linear(tmp, w[7], NULL, att, C, H * hd);
                for (int i = 0; i < C; i++)
                    x[(long)t * C + i] += tmp[i];
            }
            for (int t = 0; t < T; t++) {
                double *xt = x + (long)t * C;
                rmsnorm(n, xt, w[8], C, m->eps);
                linear(g, w[9], NULL, n, F, C);
                linear(u, w[10], NULL, n, F, C);
                for (int i = 0; i < F; i++)
                    g[i] = g[i] / (1 + exp(-g[i])) * u[i];
                linear(tmp, w[11], NULL, g, C, F);
                for (int i = 0; i < C; i++)
                    xt[i] += tmp[i];
            }
        }
        for (int t = 0; t < T; t++) {
            rmsnorm(n, x + (long)t * C, normf, C, m->eps);
            linear(logit, head, NULL, n, V, C);
            double mx = -INFINITY, sum = 0;
            for (int i = 0; i < V; i++)
                mx = logit[i] > mx ? logit[i] : mx;
            for (int i = 0; i < V; i++)
                sum += exp(logit[i] - mx);
            total += log(sum) + mx - logit[in[t + 1]];
        }
    }
    for (int l = 0; l < m->L; l++)
        for (int j = 0; j < 12; j++)
            free(W[l][j]);
    if (m->untied)
        free(head);
    free(E); free(normf); free(tok); free(x); free(n); free(q); free(kk); free(vv); free(att); free(tmp);
    free(g); free(u); free(logit); free(p); free(f.bytes);
    return total / ((double)nseq * T);
}

/* Every float of the file's tensors but the norms' multiplied by s, in place. */
static void scale_weights(const char *path, float s)
{
    st_file f;
    CHECK(st_load(path, &f) == 0);
    const char *h = f.header, *end = (const char *)f.bytes + f.data_start;
    int scaled = 0;
    for (const char *k = strstr(h, "\"model.") ; k && k < end; k = strstr(k + 1, "\"model.")) {
        const char *close = strchr(k + 1, '"');
        char key[256];
        snprintf(key, sizeof key, "%.*s", (int)(close - k - 1), k + 1);
        if (strstr(key, "norm"))
            continue;
        long n;
        float *x = st_tensor(&f, key, &n);
        for (long i = 0; x && i < n; i++) {
            float v;
            memcpy(&v, x + i, 4);
            v *= s;
            memcpy(x + i, &v, 4);
        }
        scaled++;
    }
    float *lm = st_tensor(&f, "lm_head.weight", NULL);
    long n = 0;
    st_tensor(&f, "lm_head.weight", &n);
    for (long i = 0; lm && i < n; i++) {
        float v;
        memcpy(&v, lm + i, 4);
        v *= s;
        memcpy(lm + i, &v, 4);
    }
    CHECK(scaled > 5);
    FILE *fp = fopen(path, "wb");
    CHECK(fp && fwrite(f.bytes, 1, (size_t)f.size, fp) == (size_t)f.size && fclose(fp) == 0);
    free(f.bytes);
}

static void check(const ref_model *m, const char *dir, const char *tokens, const char *name)
{
    mps_err err;
    mps_err_clear(&err);
    mps_config cfg;
    CHECK(mps_config_parse(m->text, &cfg, &err) == 0);
    char hf[1200], ck[1200], st[1300];
    snprintf(hf, sizeof hf, "%s/%s-hf", dir, name);
    snprintf(ck, sizeof ck, "%s/%s-ck", dir, name);
    snprintf(st, sizeof st, "%s/model.safetensors", hf);
    CHECK_MSG(mps_synth_write(hf, &cfg, MPS_FILE_SAFETENSORS, MPS_DTYPE_F32, 11, &err) == 0, "%s", err.msg);
    scale_weights(st, 20.0f);
    mps_shard_opts so = { .layout = "dp=1", .out_dir = ck, .threads = 1, .quiet = 1 };
    CHECK_MSG(mps_shard(hf, &so, &err) == 0, "%s", err.msg);
    mps_ckpt *c;
    CHECK_MSG(mps_ckpt_open(ck, &c, &err) == 0, "%s", err.msg);
    mps_config got = mps_ckpt_manifest(c)->cfg;
    mps_layout L;
    CHECK(mps_layout_parse("dp=1", &got, &L, &err) == 0);
    const int T = 16, G = 4;
    mps_tokens *data;
    CHECK(mps_tokens_open(tokens, T, got.vocab, &data, &err) == 0);
    mps_comm comm;
    mps_comm_self(&comm);
    mps_backend be;
    mps_backend_cpu(&be);
    mps_train_opts o = { .micro_batch = 2, .seq = T, .global_batch = G, .lr = 1e-3f, .lr_min = 1e-3f,
                         .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f };
    mps_engine *e;
    CHECK_MSG(mps_engine_new(&got, &L, &comm, &be, &o, &e, &err) == 0, "%s", err.msg);
    CHECK_MSG(mps_engine_load(e, c, 1, &err) == 0, "%s", err.msg);
    mps_step_stats stats;
    CHECK_MSG(mps_engine_step(e, data, 0, 0, &stats, &err) == 0, "%s", err.msg);
    double want = reference_loss(m, st, tokens, G, T);
    printf("%s: first-step loss %.8f, float64 reference %.8f (relative %.2g)\n", m->text, stats.loss, want,
           fabs(stats.loss - want) / want);
    CHECK(fabs(stats.loss - want) <= 1e-5 * want);
    /* the scaled weights take the loss far from a uniform guess's, log(V) */
    CHECK(fabs(want - log((double)m->V)) > 0.1);
    mps_engine_free(e);
    mps_tokens_close(data);
    mps_ckpt_close(c);
}

int main(void)
{
    const char *dir = test_tmpdir("llama_reference");
    CHECK(dir != NULL);
    char tokens[1200];
    snprintf(tokens, sizeof tokens, "%s/tok.bin", dir);
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_tokens_write_synthetic(tokens, 2000, 250, 5, &err) == 0);
    static const struct {
        const char *name;
        ref_model m;
    } cases[] = {
        /* Llama 3: GQA, untied head, the rope scaling with one frequency in each of its three bands
         * (head size 16, theta 5e5: wavelengths 6.3 < 8, 32 between 8 and 64, the rest above 64) */
        { "llama",
          { "arch=llama,n_layer=2,n_embd=64,n_head=4,n_kv_head=2,ffn=48,vocab=250,n_positions=32,tied=0,"
            "rope_theta=500000,norm_eps=1e-5,rope_llama3=8:1:8:64",
            2, 64, 4, 2, 48, 250, 1, 0, 1e-5, 500000, 8, 1, 8, 64, 0, 0 } },
        /* Qwen2: one kv head for all four query heads, q/k/v biases, tied head */
        { "qwen2",
          { "arch=llama,family=qwen2,n_layer=2,n_embd=32,n_head=4,n_kv_head=1,ffn=40,vocab=250,n_positions=32,"
            "tied=1,qkv_bias=1,rope_theta=1000000,norm_eps=1e-6",
            2, 32, 4, 1, 40, 250, 0, 1, 1e-6, 1000000, 0, 0, 0, 0, 0, 0 } },
        /* Mistral NeMo's form: 4 heads of 12 (q and the attention output 48 wide) in a 32-wide
         * model, over 2 kv heads */
        { "mistral-head-dim",
          { "arch=llama,family=mistral,n_layer=2,n_embd=32,n_head=4,n_kv_head=2,ffn=40,vocab=250,n_positions=32,"
            "tied=0,rope_theta=1000000,norm_eps=1e-5,head_dim=12",
            2, 32, 4, 2, 40, 250, 1, 0, 1e-5, 1000000, 0, 0, 0, 0, 12, 0 } },
        /* linear RoPE scaling (LongChat's form), factor 4 */
        { "llama-rope-linear",
          { "arch=llama,n_layer=2,n_embd=32,n_head=4,n_kv_head=2,ffn=40,vocab=250,n_positions=32,tied=0,"
            "rope_theta=10000,norm_eps=1e-5,rope_linear=4",
            2, 32, 4, 2, 40, 250, 1, 0, 1e-5, 10000, 0, 0, 0, 0, 0, 4 } },
        /* dynamic NTK scaling changes the frequencies only past n_positions: the reference has none */
        { "llama-rope-dynamic",
          { "arch=llama,n_layer=2,n_embd=32,n_head=4,n_kv_head=2,ffn=40,vocab=250,n_positions=32,tied=0,"
            "rope_theta=10000,norm_eps=1e-5,rope_dynamic=4",
            2, 32, 4, 2, 40, 250, 1, 0, 1e-5, 10000, 0, 0, 0, 0, 0, 0 } },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        check(&cases[i].m, dir, tokens, cases[i].name);
    TEST_DONE();
}
