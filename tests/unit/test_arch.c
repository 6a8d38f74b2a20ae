/* The architecture table and the Llama family: the catalogue and its HF keys, the rows of q, k, v,
 * gate and up each rank must hold under grouped-query attention (written out by hand below, not
 * derived from the geometry), config.json in transformers 4.x and 5.x form, and f16 narrowing. */
#include <math.h>

#include "arch.h"
#include "geometry.h"
#include "modelfile.h"
#include "testutil.h"

static mps_config llama(int n_head, int n_kv_head, int64_t ffn, int qkv_bias, int untied)
{
    mps_config c = { .n_layer = 4, .n_embd = 4 * n_head, .n_head = n_head, .n_positions = 16, .vocab = 100,
                     .padded_vocab = 128, .arch = MPS_ARCH_LLAMA, .family = MPS_FAMILY_LLAMA, .n_kv_head = n_kv_head,
                     .ffn = ffn, .untied = untied, .qkv_bias = qkv_bias, .norm_eps = 1e-5, .rope_theta = 10000 };
    return c;
}

static mps_layout layout(const mps_config *cfg, const char *text)
{
    mps_layout L;
    mps_err err;
    mps_err_clear(&err);
    if (mps_layout_parse(text, cfg, &L, &err) != 0)
        fprintf(stderr, "layout %s: %s\n", text, err.msg);
    return L;
}

/* The box of tensor h.<layer>.<name> that `rank` holds. */
static mps_box box_of(const mps_config *cfg, const mps_layout *L, int rank, int layer, const char *name)
{
    char full[64];
    snprintf(full, sizeof full, "h.%d.%s", layer, name);
    int t = mps_tensor_find(cfg, full);
    mps_piece p;
    memset(&p, 0, sizeof p);
    if (t >= 0)
        mps_geometry(cfg, L, rank, MPS_KIND_PARAM, t, &p);
    return p.box;
}

/* The rows [lo, hi) of the Hugging Face matrix (out, in) that a box of canonical (heads, hd, C)
 * or (F, C) covers: dimension 0 times the rows per unit; the other dimensions must be whole. */
static int hf_rows(const mps_config *cfg, const mps_box *b, int64_t rows_per_unit, int64_t *lo, int64_t *hi)
{
    for (int d = 1; d < b->ndim; d++)
        if (b->off[d] != 0 || (d == b->ndim - 1 && b->cnt[d] != cfg->n_embd))
            return -1;
    *lo = b->off[0] * rows_per_unit;
    *hi = (b->off[0] + b->cnt[0]) * rows_per_unit;
    return 0;
}

typedef struct { int64_t q[2], k[2], v[2], gate[2], up[2]; } rank_rows;

/* Every rank of layout L (tp ranks of stage 0, dp 0) holds exactly the stated rows. */
static void check_rows(const mps_config *cfg, const char *layout_text, const rank_rows *want, int tp)
{
    mps_layout L = layout(cfg, layout_text);
    const int hd = mps_cfg_head_dim(cfg);
    for (int r = 0; r < tp; r++) {
        const struct { const char *name; int64_t per; const int64_t *rows; } t[5] = {
            { "qw", hd, want[r].q }, { "kw", hd, want[r].k }, { "vw", hd, want[r].v },
            { "gatew", 1, want[r].gate }, { "upw", 1, want[r].up },
        };
        for (int i = 0; i < 5; i++) {
            mps_box b = box_of(cfg, &L, r, 0, t[i].name);
            int64_t lo = -1, hi = -1;
            int whole = hf_rows(cfg, &b, t[i].per, &lo, &hi) == 0;
            CHECK_MSG(whole && lo == t[i].rows[0] && hi == t[i].rows[1], "%s rank %d %s: rows [%lld, %lld), want [%lld, %lld)",
                      layout_text, r, t[i].name, (long long)lo, (long long)hi, (long long)t[i].rows[0],
                      (long long)t[i].rows[1]);
        }
        /* every query head the rank holds uses a kv head the rank holds (head j uses kv head
         * j / (H / KV), transformers' repeat_kv) */
        mps_box q = box_of(cfg, &L, r, 0, "qw"), k = box_of(cfg, &L, r, 0, "kw");
        int group = cfg->n_head / cfg->n_kv_head;
        for (int64_t j = q.off[0]; j < q.off[0] + q.cnt[0]; j++)
            CHECK(j / group >= k.off[0] && j / group < k.off[0] + k.cnt[0]);
        /* o_proj and down_proj: the columns that match the rank's heads and MLP slice */
        mps_box o = box_of(cfg, &L, r, 0, "ow"), down = box_of(cfg, &L, r, 0, "downw");
        CHECK(o.off[0] == 0 && o.cnt[0] == cfg->n_embd && o.off[1] * hd == want[r].q[0] &&
              (o.off[1] + o.cnt[1]) * hd == want[r].q[1] && o.cnt[2] == hd);
        CHECK(down.off[1] == want[r].gate[0] && down.off[1] + down.cnt[1] == want[r].gate[1]);
    }
}

static void test_gqa_rows(void)
{
    /* 8 query heads over 2 kv heads (groups of 4), head size 4, C 32, MLP 48, tp = n_kv_head = 2:
     * rank 0 has kv head 0 and query heads 0-3, rank 1 kv head 1 and query heads 4-7 */
    mps_config a = llama(8, 2, 48, 0, 1);
    const rank_rows tp2[2] = {
        { { 0, 16 }, { 0, 4 }, { 0, 4 }, { 0, 24 }, { 0, 24 } },
        { { 16, 32 }, { 4, 8 }, { 4, 8 }, { 24, 48 }, { 24, 48 } },
    };
    check_rows(&a, "tp=2", tp2, 2);
    const rank_rows tp1[1] = { { { 0, 32 }, { 0, 8 }, { 0, 8 }, { 0, 48 }, { 0, 48 } } };
    check_rows(&a, "tp=1", tp1, 1);
    /* 8 query heads over 4 kv heads (pairs), tp = 2 below n_kv_head: kv heads 0-1 with query heads
     * 0-3; MLP 50 does not divide by 4: balanced, 13 13 12 12 */
    mps_config b = llama(8, 4, 50, 1, 1);
    const rank_rows btp2[2] = {
        { { 0, 16 }, { 0, 8 }, { 0, 8 }, { 0, 25 }, { 0, 25 } },
        { { 16, 32 }, { 8, 16 }, { 8, 16 }, { 25, 50 }, { 25, 50 } },
    };
    check_rows(&b, "tp=2,pp=2", btp2, 2);
    const rank_rows btp4[4] = {
        { { 0, 8 }, { 0, 4 }, { 0, 4 }, { 0, 13 }, { 0, 13 } },
        { { 8, 16 }, { 4, 8 }, { 4, 8 }, { 13, 26 }, { 13, 26 } },
        { { 16, 24 }, { 8, 12 }, { 8, 12 }, { 26, 38 }, { 26, 38 } },
        { { 24, 32 }, { 12, 16 }, { 12, 16 }, { 38, 50 }, { 38, 50 } },
    };
    check_rows(&b, "tp=4,dp=2,zero=1", btp4, 4);
    /* q/k/v biases go with their heads: rank 3 of tp=4 has q bias heads 6-7, k bias head 3 */
    mps_layout L = layout(&b, "tp=4");
    mps_box qb = box_of(&b, &L, 3, 1, "qb"), kb = box_of(&b, &L, 3, 1, "kb");
    CHECK(qb.off[0] == 6 && qb.cnt[0] == 2 && qb.cnt[1] == 4 && kb.off[0] == 3 && kb.cnt[0] == 1);
    /* Megatron's rank order: dp=2,pp=2,tp=2 rank 5 is stage 1, dp 0, tp 1 */
    mps_layout M = layout(&b, "dp=2,pp=2,tp=2");
    mps_box q5 = box_of(&b, &M, 5, 3, "qw"), q5_first = box_of(&b, &M, 5, 0, "qw");
    CHECK(q5.off[0] == 4 && q5.cnt[0] == 4 && q5_first.cnt[0] == 0);
    /* tp above or not dividing n_kv_head is refused, naming the heads */
    mps_layout bad;
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_layout_parse("tp=8", &b, &bad, &err) != 0 && strstr(err.msg, "4 key/value heads") &&
          strstr(err.msg, "kv-head replication"));
    mps_config c = llama(6, 3, 48, 0, 0);
    mps_err_clear(&err);
    CHECK_MSG(mps_layout_parse("tp=2", &c, &bad, &err) != 0 && strstr(err.msg, "tp=2 must divide the model's 3 key/value heads (n_kv_head; 6 query heads)") &&
          !strstr(err.msg, "replication"), "%s", err.msg);
}

static void test_catalogue(void)
{
    mps_config q = llama(8, 4, 50, 1, 0); /* Qwen2-like: biases, tied */
    q.family = MPS_FAMILY_QWEN2;
    /* wte, 12 per layer (with biases), the final norm; no lm_head when tied */
    CHECK(mps_tensor_count(&q) == 1 + 4 * 12 + 1);
    static const char *const layer0[] = { "h.0.ln1w", "h.0.qw", "h.0.qb", "h.0.kw", "h.0.kb", "h.0.vw", "h.0.vb",
                                          "h.0.ow", "h.0.ln2w", "h.0.gatew", "h.0.upw", "h.0.downw" };
    static const char *const hf0[] = {
        "model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.k_proj.bias", "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.self_attn.v_proj.bias", "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.post_attention_layernorm.weight", "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight" };
    /* HF shapes: q (H*hd, C), k/v (KV*hd, C), o (C, H*hd), gate/up (F, C), down (C, F) */
    static const int64_t hf_shape[][2] = { { 32, 0 }, { 32, 32 }, { 32, 0 }, { 16, 32 }, { 16, 0 }, { 16, 32 },
                                           { 16, 0 }, { 32, 32 }, { 32, 0 }, { 50, 32 }, { 50, 32 }, { 32, 50 } };
    for (int i = 0; i < 12; i++) {
        mps_tensor_spec s;
        mps_tensor_spec_get(&q, 1 + i, &s);
        CHECK_MSG(strcmp(s.name, layer0[i]) == 0, "tensor %d is %s, want %s", 1 + i, s.name, layer0[i]);
        CHECK(mps_tensor_find(&q, layer0[i]) == 1 + i);
        char key[128];
        int ndim, tr;
        int64_t shape[2];
        mps_hf_tensor(&q, 1 + i, key, sizeof key, &ndim, shape, &tr);
        CHECK_MSG(strcmp(key, hf0[i]) == 0 && tr == 0 && shape[0] == hf_shape[i][0] &&
                  (hf_shape[i][1] == 0 ? ndim == 1 : ndim == 2 && shape[1] == hf_shape[i][1]),
                  "%s: key %s (%lld, %lld)", layer0[i], key, (long long)shape[0], (long long)shape[1]);
        /* decay on matrices only */
        CHECK(s.decay == (strstr(layer0[i], "w") && !strstr(layer0[i], "ln")));
    }
    mps_tensor_spec wte, last;
    mps_tensor_spec_get(&q, 0, &wte);
    mps_tensor_spec_get(&q, mps_tensor_count(&q) - 1, &last);
    CHECK(strcmp(wte.name, "wte") == 0 && wte.tied_head && wte.shape[0] == 128 && strcmp(last.name, "lnfw") == 0);
    q.untied = 1;
    q.qkv_bias = 0;
    CHECK(mps_tensor_count(&q) == 1 + 4 * 9 + 2);
    mps_tensor_spec_get(&q, 0, &wte);
    mps_tensor_spec_get(&q, mps_tensor_count(&q) - 1, &last);
    CHECK(!wte.tied_head && strcmp(last.name, "lm_head") == 0 && last.place == MPS_PLACE_FINAL &&
          last.tp_dim == 0 && last.shape[0] == 128);
    CHECK(mps_tensor_find(&q, "h.2.qb") == -1 && mps_tensor_find(&q, "h.3.downw") == 1 + 3 * 9 + 8);
    /* the parameter counts of published models (without vocabulary padding) */
    static const struct { const char *name; double billions; } published[] = {
        { "llama-2-7b", 6.738 }, { "llama-3-8b", 8.030 }, { "mistral-7b", 7.248 }, { "qwen2.5-0.5b", 0.494 },
        { "tinyllama-1.1b", 1.100 }, { "smollm2-135m", 0.1345 },
    };
    for (size_t i = 0; i < sizeof published / sizeof published[0]; i++) {
        mps_config c;
        mps_err err;
        mps_err_clear(&err);
        CHECK(mps_config_preset(published[i].name, &c, &err) == 0);
        double n = (double)mps_param_count(&c) - (double)(c.padded_vocab - c.vocab) * c.n_embd * (c.untied ? 2 : 1);
        CHECK_MSG(fabs(n / 1e9 - published[i].billions) < 0.0015, "%s: %.4f B", published[i].name, n / 1e9);
    }
}

/* config.json of transformers 4.x (rope_theta + rope_scaling) and 5.x (rope_parameters) */
static void test_hf_configs(void)
{
    const char *dir = test_tmpdir("test_arch");
    mps_config c = llama(8, 4, 48, 0, 1);
    mps_err err;
    mps_err_clear(&err);
    CHECK_MSG(mps_synth_write(dir, &c, MPS_FILE_SAFETENSORS, MPS_DTYPE_BF16, 3, &err) == 0, "%s", err.msg);
    static const char *const configs[] = {
        "{\"model_type\": \"llama\", \"hidden_size\": 32, \"intermediate_size\": 48, \"num_hidden_layers\": 4,"
        " \"num_attention_heads\": 8, \"num_key_value_heads\": 4, \"vocab_size\": 100, \"max_position_embeddings\": 16,"
        " \"rms_norm_eps\": 1e-05, \"rope_theta\": 500000.0, \"rope_scaling\": {\"rope_type\": \"llama3\","
        " \"factor\": 8.0, \"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0, \"original_max_position_embeddings\": 8192},"
        " \"tie_word_embeddings\": false}",
        "{\"model_type\": \"llama\", \"hidden_size\": 32, \"intermediate_size\": 48, \"num_hidden_layers\": 4,"
        " \"num_attention_heads\": 8, \"num_key_value_heads\": 4, \"vocab_size\": 100, \"max_position_embeddings\": 16,"
        " \"rms_norm_eps\": 1e-05, \"rope_parameters\": {\"rope_type\": \"llama3\", \"rope_theta\": 500000.0,"
        " \"factor\": 8.0, \"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0, \"original_max_position_embeddings\": 8192},"
        " \"dtype\": \"bfloat16\"}",
    };
    for (int i = 0; i < 2; i++) {
        char path[1100];
        snprintf(path, sizeof path, "%s/config.json", dir);
        FILE *f = fopen(path, "w");
        fputs(configs[i], f);
        fclose(f);
        mps_model_file *mf = NULL;
        int rc = mps_model_file_open(dir, NULL, &mf, &err);
        CHECK_MSG(rc == 0, "config %d: %s", i, err.msg);
        if (rc != 0)
            continue;
        const mps_config *g = mps_model_file_config(mf);
        CHECK(g->arch == MPS_ARCH_LLAMA && g->family == MPS_FAMILY_LLAMA && g->n_kv_head == 4 && g->ffn == 48 &&
              g->untied && !g->qkv_bias && g->rope_theta == 500000.0 && g->norm_eps == 1e-5);
        CHECK(g->rope.type == MPS_ROPE_LLAMA3 && g->rope.factor == 8 && g->rope.low_freq_factor == 1 &&
              g->rope.high_freq_factor == 4 && g->rope.original_max_positions == 8192);
        CHECK(mps_model_file_dtype(mf) == MPS_DTYPE_BF16);
        mps_model_file_close(mf);
    }
}

/* f32 -> f16: every half survives the trip through f32, and ties round to even. */
static void test_f16(void)
{
    int bad = 0;
    for (uint32_t h = 0; h < 0x10000; h++) {
        uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
        float f;
        if (e == 31 && m)
            continue; /* NaN: stays NaN, checked below */
        if (e == 0)
            f = ldexpf((float)m, -24);
        else if (e == 31)
            f = INFINITY;
        else
            f = ldexpf((float)(m | 0x400), (int)e - 25);
        union { float f; uint32_t u; } v = { f };
        v.u |= sign;
        bad += mps_f32_to_f16(v.f) != h;
    }
    CHECK_MSG(bad == 0, "%d halves do not round-trip", bad);
    CHECK((mps_f32_to_f16(NAN) & 0x7c00) == 0x7c00 && (mps_f32_to_f16(NAN) & 0x3ff) != 0);
    CHECK(mps_f32_to_f16(1.0f + ldexpf(1, -11)) == 0x3c00);                  /* tie -> even (down) */
    CHECK(mps_f32_to_f16(1.0f + 3 * ldexpf(1, -11)) == 0x3c02);              /* tie -> even (up) */
    CHECK(mps_f32_to_f16(65519.0f) == 0x7bff && mps_f32_to_f16(65520.0f) == 0x7c00);
    CHECK(mps_f32_to_f16(ldexpf(1, -25)) == 0 && mps_f32_to_f16(ldexpf(1.5f, -25)) == 1); /* subnormal ties */
}

int main(void)
{
    test_gqa_rows();
    test_catalogue();
    test_hf_configs();
    test_f16();
    TEST_DONE();
}
