/* Model configs: Mistral's sliding window, a head size other than n_embd / n_head, linear and
 * dynamic RoPE scaling (model.h sliding_window, head_dim, rope) from config.json, in --config
 * strings, in the manifest and back into config.json, and the configs that must be refused; one
 * config per model (GPT-2's implied values given explicitly). */
#include "ckpt.h"
#include "engine.h"
#include "modelfile_internal.h"
#include "testutil.h"

/* a Mistral config.json with the given sliding_window member ("" for none) and context length */
static json_t *mistral_json(const char *window_member, int npos)
{
    char text[1024];
    snprintf(text, sizeof text,
             "{\"model_type\": \"mistral\", \"hidden_size\": 32, \"intermediate_size\": 48, \"num_hidden_layers\": 2,"
             " \"num_attention_heads\": 4, \"num_key_value_heads\": 2, \"vocab_size\": 100,"
             " \"max_position_embeddings\": %d, \"rms_norm_eps\": 1e-05, \"rope_theta\": 10000.0%s%s}",
             npos, window_member[0] ? ", " : "", window_member);
    json_error_t jerr;
    return json_loads(text, 0, &jerr);
}

/* the window parsed from a Mistral config.json, or -1 (with err) when it is refused */
static int parsed_window(const char *window_member, int npos, mps_err *err)
{
    json_t *root = mistral_json(window_member, npos);
    CHECK(root != NULL);
    mps_config c;
    mps_err_clear(err);
    int rc = root ? mps_hf_config_parse(root, "config.json", &c, err) : -1;
    json_decref(root);
    return rc == 0 ? c.sliding_window : -1;
}

static void test_hf_parse(void)
{
    mps_err err;
    /* Mistral 7B v0.1: 4096 below 32768 positions */
    CHECK(parsed_window("\"sliding_window\": 4096", 32768, &err) == 4096);
    /* v0.2, v0.3: null; a window of the context or more never binds */
    CHECK(parsed_window("\"sliding_window\": null", 32768, &err) == 0);
    CHECK(parsed_window("\"sliding_window\": 32768", 32768, &err) == 0);
    CHECK(parsed_window("\"sliding_window\": 100000", 32768, &err) == 0);
    /* missing: MistralConfig's default, 4096 */
    CHECK(parsed_window("", 32768, &err) == 4096);
    CHECK(parsed_window("", 4096, &err) == 0);
    /* not a positive count of positions */
    static const char *const bad[] = { "\"sliding_window\": 0", "\"sliding_window\": -5",
                                       "\"sliding_window\": \"4096\"", "\"sliding_window\": 4096.5" };
    for (int i = 0; i < 4; i++) {
        CHECK_MSG(parsed_window(bad[i], 32768, &err) == -1 && err.code == MPS_EUNSUPPORTED &&
                      strstr(err.msg, "config.json: sliding_window=") != NULL,
                  "%s: %s", bad[i], err.msg);
    }
    /* Qwen2's window (on the layers from max_window_layers on) is refused where it binds */
    const char *qwen = "{\"model_type\": \"qwen2\", \"hidden_size\": 32, \"intermediate_size\": 48, "
                       "\"num_hidden_layers\": 2, \"num_attention_heads\": 4, \"num_key_value_heads\": 2, "
                       "\"vocab_size\": 100, \"max_position_embeddings\": 64, \"use_sliding_window\": %s, "
                       "\"sliding_window\": %d}";
    for (int use = 0; use < 2; use++)
        for (int w = 32; w <= 64; w += 32) {
            char text[512];
            snprintf(text, sizeof text, qwen, use ? "true" : "false", w);
            json_error_t jerr;
            json_t *root = json_loads(text, 0, &jerr);
            mps_config c;
            mps_err_clear(&err);
            int rc = mps_hf_config_parse(root, "config.json", &c, &err);
            int refused = use && w < 64;
            CHECK_MSG(refused ? rc != 0 && strstr(err.msg, "sliding_window=32 is not supported") != NULL
                              : rc == 0 && c.sliding_window == 0,
                      "qwen2 use %d window %d: rc %d %s", use, w, rc, err.msg);
            json_decref(root);
        }
}

static void test_config_strings(void)
{
    mps_err err;
    mps_config c, back;
    mps_err_clear(&err);
    const char *text = "n_layer=2,n_embd=32,n_head=4,vocab=100,n_positions=64,arch=llama,family=mistral,"
                       "n_kv_head=2,ffn=48,sliding_window=16";
    CHECK_MSG(mps_config_parse(text, &c, &err) == 0, "%s", err.msg);
    CHECK(c.sliding_window == 16);
    char buf[512];
    mps_config_format(&c, buf, sizeof buf);
    CHECK_MSG(strstr(buf, ",sliding_window=16") != NULL, "%s", buf);
    CHECK_MSG(mps_config_parse(buf, &back, &err) == 0 && memcmp(&back, &c, sizeof c) == 0, "%s: %s", buf, err.msg);
    /* without a window the string has no key */
    c.sliding_window = 0;
    mps_config_format(&c, buf, sizeof buf);
    CHECK(strstr(buf, "sliding_window") == NULL);
    static const struct {
        const char *text, *msg;
    } bad[] = {
        { "n_layer=2,n_embd=32,n_head=4,vocab=100,n_positions=64,arch=llama,family=mistral,sliding_window=64",
          "sliding_window=64 must be below n_positions=64" },
        { "n_layer=2,n_embd=32,n_head=4,vocab=100,n_positions=64,arch=llama,sliding_window=16",
          "sliding_window is Mistral's (family=mistral), not llama's" },
        { "n_layer=2,n_embd=32,n_head=4,vocab=100,n_positions=64,sliding_window=16",
          "arch=gpt2 takes no n_kv_head, ffn, tied, qkv_bias, norm_eps, rope_theta, rope scaling, sliding_window or head_dim" },
        { "n_layer=2,n_embd=32,n_head=4,vocab=100,n_positions=64,arch=llama,family=mistral,sliding_window=-1",
          "sliding_window='-1' is not a valid number" },
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        mps_err_clear(&err);
        CHECK_MSG(mps_config_parse(bad[i].text, &c, &err) != 0 && err.code == MPS_EUSAGE &&
                      strstr(err.msg, bad[i].msg) != NULL,
                  "%s: %s", bad[i].text, err.msg);
    }
    CHECK(mps_config_preset("mistral-7b-v0.1", &c, &err) == 0 && c.sliding_window == 4096 && c.vocab == 32000 &&
          c.rope_theta == 10000 && c.family == MPS_FAMILY_MISTRAL);
    CHECK(mps_config_preset("mistral-7b", &c, &err) == 0 && c.sliding_window == 0);
}

/* config.json as export writes it for a checkpoint without an original one */
static void test_hf_generate(void)
{
    mps_config c;
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_config_preset("mistral-7b-v0.1", &c, &err) == 0);
    for (int w = 0; w < 2; w++) {
        c.sliding_window = w ? 4096 : 0;
        char *text = mps_hf_config_generate(&c, MPS_DTYPE_BF16);
        CHECK(text && strstr(text, w ? "\"sliding_window\": 4096" : "\"sliding_window\": null") != NULL);
        json_error_t jerr;
        json_t *root = text ? json_loads(text, 0, &jerr) : NULL;
        mps_config back;
        CHECK_MSG(root && mps_hf_config_parse(root, "config.json", &back, &err) == 0, "%s", err.msg);
        CHECK(root && back.sliding_window == c.sliding_window);
        json_decref(root);
        free(text);
    }
}

/* the oldest format version that describes the model; the window read back; a version 2
 * manifest with a window refused (no writer of version 2 wrote one) */
static void test_manifest(void)
{
    const char *dir = test_tmpdir("sliding_window");
    CHECK(dir != NULL);
    char path[1200];
    snprintf(path, sizeof path, "%s/manifest.json", dir);
    static const struct {
        const char *config;
        int version, window;
    } cases[] = {
        { "n_layer=2,n_embd=32,n_head=4,vocab=100,n_positions=64", 1, 0 },
        { "n_layer=2,n_embd=32,n_head=4,vocab=100,n_positions=64,arch=llama,family=mistral", 2, 0 },
        { "n_layer=2,n_embd=32,n_head=4,vocab=100,n_positions=64,arch=llama,family=mistral,sliding_window=16", 3, 16 },
        { "n_layer=2,n_embd=32,n_head=4,vocab=100,n_positions=64,arch=llama,family=mistral,head_dim=12", 3, 0 },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        mps_config c;
        mps_layout L;
        mps_err err;
        mps_err_clear(&err);
        CHECK(mps_config_parse(cases[i].config, &c, &err) == 0 && mps_layout_parse("dp=1", &c, &L, &err) == 0);
        mps_manifest m, r;
        mps_manifest_init(&m, &c, &L);
        CHECK(m.format_version == cases[i].version);
        remove(path);
        CHECK_MSG(mps_manifest_write(path, &m, &err) == 0, "%s", err.msg);
        CHECK_MSG(mps_manifest_read(path, &r, &err) == 0, "%s", err.msg);
        CHECK(r.format_version == cases[i].version && memcmp(&r.cfg, &c, sizeof c) == 0);
        mps_manifest_free(&r);
        if (cases[i].version == 3) {
            m.format_version = 2;
            remove(path);
            CHECK(mps_manifest_write(path, &m, &err) == 0);
            mps_err_clear(&err);
            CHECK_MSG(mps_manifest_read(path, &r, &err) != 0 && err.code == MPS_ECORRUPT &&
                          strstr(err.msg, cases[i].window ? "model.sliding_window in a manifest of format version 2"
                                                          : "model.head_dim in a manifest of format version 2") != NULL,
                      "%s", err.msg);
        }
        mps_manifest_free(&m);
    }
}

/* GPT-2 given its own n_kv_head, ffn and norm_eps is the GPT-2 without them (mps_config_format
 * prints GPT-2 as six numbers: the string must parse back to the same config) */
static void test_gpt2_one_config(void)
{
    mps_config plain, given, back;
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_config_parse("n_layer=6,n_embd=12,n_head=4,vocab=100,n_positions=64", &plain, &err) == 0);
    CHECK_MSG(mps_config_parse("n_layer=6,n_embd=12,n_head=4,vocab=100,n_positions=64,ffn=48,n_kv_head=4,"
                               "norm_eps=1e-5,tied=1,qkv_bias=0", &given, &err) == 0, "%s", err.msg);
    CHECK(memcmp(&plain, &given, sizeof plain) == 0);
    char buf[512];
    mps_config_format(&given, buf, sizeof buf);
    CHECK(mps_config_parse(buf, &back, &err) == 0 && memcmp(&back, &given, sizeof back) == 0);
    static const char *const other[] = { "ffn=50", "n_kv_head=2", "norm_eps=1e-6", "tied=0", "qkv_bias=1" };
    for (int i = 0; i < 5; i++) {
        char text[128];
        snprintf(text, sizeof text, "n_layer=6,n_embd=12,n_head=4,vocab=100,n_positions=64,%s", other[i]);
        mps_err_clear(&err);
        CHECK_MSG(mps_config_parse(text, &given, &err) != 0 && strstr(err.msg, "arch=gpt2 takes no") != NULL, "%s: %s",
                  text, err.msg);
    }
}

/* the config parsed from a config.json text, or -1 (with err) when it is refused */
static int parse_hf(const char *text, mps_config *c, mps_err *err)
{
    json_error_t jerr;
    json_t *root = json_loads(text, 0, &jerr);
    CHECK_MSG(root != NULL, "%s", text);
    mps_err_clear(err);
    int rc = root ? mps_hf_config_parse(root, "config.json", c, err) : -1;
    json_decref(root);
    return rc;
}

static void test_head_dim(void)
{
    mps_config c, back;
    mps_err err;
    const char *hf = "{\"model_type\": \"%s\", \"hidden_size\": %d, \"intermediate_size\": 48, "
                     "\"num_hidden_layers\": 2, \"num_attention_heads\": 4, \"num_key_value_heads\": 2, "
                     "\"vocab_size\": 100, \"max_position_embeddings\": 64, \"sliding_window\": null, "
                     "\"head_dim\": %s}";
    char text[512];
    /* Mistral NeMo's form: 4 heads of 12 in a 32-wide model */
    snprintf(text, sizeof text, hf, "mistral", 32, "12");
    CHECK_MSG(parse_hf(text, &c, &err) == 0 && c.head_dim == 12 && mps_cfg_head_dim(&c) == 12, "%s", err.msg);
    /* hidden_size / num_attention_heads, or null: none */
    snprintf(text, sizeof text, hf, "llama", 32, "8");
    CHECK(parse_hf(text, &c, &err) == 0 && c.head_dim == 0 && mps_cfg_head_dim(&c) == 8);
    snprintf(text, sizeof text, hf, "llama", 32, "null");
    CHECK(parse_hf(text, &c, &err) == 0 && c.head_dim == 0);
    /* a width the heads do not divide, with head_dim given */
    snprintf(text, sizeof text, hf, "llama", 30, "16");
    CHECK_MSG(parse_hf(text, &c, &err) == 0 && c.head_dim == 16, "%s", err.msg);
    static const struct {
        const char *family, *value, *msg;
    } bad[] = {
        { "qwen2", "12", "head_dim=12 is not supported (Qwen2's head size is hidden_size / num_attention_heads)" },
        { "llama", "11", "head_dim=11 must be even" },
        { "llama", "0", "head_dim=0 is not supported (a head size of 1 to 65536)" },
        { "mistral", "\"12\"", "head_dim=\"12\" is not supported" },
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        snprintf(text, sizeof text, hf, bad[i].family, 32, bad[i].value);
        CHECK_MSG(parse_hf(text, &c, &err) != 0 && strstr(err.msg, bad[i].msg) != NULL, "%s: %s", text, err.msg);
    }
    /* --config: the string round trip, the default stored as none, the refusals */
    const char *base = "n_layer=2,n_embd=32,n_head=4,vocab=100,n_positions=64,arch=llama,family=mistral,n_kv_head=2,"
                       "ffn=48";
    char cfgtext[512], buf[512];
    snprintf(cfgtext, sizeof cfgtext, "%s,head_dim=12", base);
    CHECK_MSG(mps_config_parse(cfgtext, &c, &err) == 0 && c.head_dim == 12, "%s", err.msg);
    mps_config_format(&c, buf, sizeof buf);
    CHECK_MSG(strstr(buf, ",head_dim=12") && mps_config_parse(buf, &back, &err) == 0 &&
                  memcmp(&back, &c, sizeof c) == 0, "%s", buf);
    snprintf(cfgtext, sizeof cfgtext, "%s,head_dim=8", base);
    CHECK(mps_config_parse(cfgtext, &c, &err) == 0 && c.head_dim == 0);
    mps_err_clear(&err);
    CHECK(mps_config_parse("n_layer=2,n_embd=32,n_head=4,vocab=100,n_positions=64,head_dim=12", &c, &err) != 0 &&
          strstr(err.msg, "arch=gpt2 takes no") != NULL);
    /* config.json as export writes it, and back */
    CHECK(mps_config_preset("mistral-nemo-12b", &c, &err) == 0 && c.head_dim == 128 && c.n_embd == 5120);
    char *gen = mps_hf_config_generate(&c, MPS_DTYPE_BF16);
    CHECK(gen && strstr(gen, "\"head_dim\": 128") != NULL);
    CHECK_MSG(gen && parse_hf(gen, &back, &err) == 0 && back.head_dim == 128 && back.n_embd == 5120, "%s", err.msg);
    free(gen);
    /* the tensors: q (H, hd, C), o (C, H, hd) */
    mps_tensor_spec s;
    mps_tensor_spec_get(&c, mps_tensor_find(&c, "h.0.qw"), &s);
    CHECK(s.ndim == 3 && s.shape[0] == 32 && s.shape[1] == 128 && s.shape[2] == 5120);
    mps_tensor_spec_get(&c, mps_tensor_find(&c, "h.0.ow"), &s);
    CHECK(s.ndim == 3 && s.shape[0] == 5120 && s.shape[1] == 32 && s.shape[2] == 128);
    mps_tensor_spec_get(&c, mps_tensor_find(&c, "h.0.kw"), &s);
    CHECK(s.ndim == 3 && s.shape[0] == 8 && s.shape[1] == 128 && s.shape[2] == 5120);
}

/* linear and dynamic RoPE scaling: a factor each (dynamic changes nothing below n_positions) */
static void test_rope_scaling(const char *type, mps_rope_type want)
{
    mps_config c, back;
    mps_err err;
    const char *hf = "{\"model_type\": \"llama\", \"hidden_size\": 32, \"intermediate_size\": 48, "
                     "\"num_hidden_layers\": 2, \"num_attention_heads\": 4, \"num_key_value_heads\": 2, "
                     "\"vocab_size\": 100, \"max_position_embeddings\": 64, %s}";
    static const char *const forms[] = {
        "\"rope_theta\": 10000.0, \"rope_scaling\": {\"rope_type\": \"%s\", \"factor\": 4.0}", /* 4.x */
        "\"rope_scaling\": {\"type\": \"%s\", \"factor\": 4}",                                 /* older 4.x */
        "\"rope_parameters\": {\"rope_type\": \"%s\", \"rope_theta\": 10000.0, \"factor\": 4.0}", /* 5.x */
    };
    char form[256], text[512];
    for (int i = 0; i < 3; i++) {
        snprintf(form, sizeof form, forms[i], type);
        snprintf(text, sizeof text, hf, form);
        CHECK_MSG(parse_hf(text, &c, &err) == 0 && c.rope.type == want && c.rope.factor == 4 && c.rope_theta == 10000,
                  "%s: %s", form, err.msg);
    }
    /* config.json as export writes it, the --config string and the manifest give it back (the
     * padded vocabulary is the model file's: config.json has none) */
    char *gen = mps_hf_config_generate(&c, MPS_DTYPE_F32);
    snprintf(form, sizeof form, "\"rope_type\": \"%s\"", type);
    CHECK(gen && strstr(gen, form) && strstr(gen, "\"factor\": 4.0"));
    CHECK(gen && parse_hf(gen, &back, &err) == 0 && memcmp(&back, &c, sizeof c) == 0);
    free(gen);
    c.padded_vocab = mps_default_padded_vocab(c.vocab);
    char buf[512];
    mps_config_format(&c, buf, sizeof buf);
    snprintf(form, sizeof form, ",rope_%s=4", type);
    CHECK_MSG(strstr(buf, form) && mps_config_parse(buf, &back, &err) == 0 && memcmp(&back, &c, sizeof c) == 0,
              "%s: %s", buf, err.msg);
    const char *dir = test_tmpdir("rope_scaling");
    char path[1200];
    snprintf(path, sizeof path, "%s/manifest.json", dir);
    mps_layout L;
    CHECK(mps_layout_parse("tp=2", &c, &L, &err) == 0);
    mps_manifest m, r;
    mps_manifest_init(&m, &c, &L);
    CHECK(m.format_version == 2); /* (older readers refuse the unknown scaling type by name) */
    remove(path);
    CHECK_MSG(mps_manifest_write(path, &m, &err) == 0 && mps_manifest_read(path, &r, &err) == 0, "%s", err.msg);
    CHECK(memcmp(&r.cfg, &c, sizeof c) == 0);
    mps_manifest_free(&r);
    mps_manifest_free(&m);
    /* refusals: no factor, a factor of 0 */
    snprintf(form, sizeof form, "\"rope_scaling\": {\"rope_type\": \"%s\"}", type);
    snprintf(text, sizeof text, hf, form);
    char msg[128];
    snprintf(msg, sizeof msg, "rope_scaling of type %s needs a positive factor", type);
    CHECK_MSG(parse_hf(text, &c, &err) != 0 && strstr(err.msg, msg) != NULL, "%s: %s", form, err.msg);
    snprintf(form, sizeof form, "\"rope_scaling\": {\"rope_type\": \"%s\", \"factor\": 0}", type);
    snprintf(text, sizeof text, hf, form);
    CHECK_MSG(parse_hf(text, &c, &err) != 0 && strstr(err.msg, "factor=0: expected a number in (0,") != NULL, "%s: %s",
              form, err.msg);
    snprintf(text, sizeof text, "n_layer=2,n_embd=32,n_head=4,vocab=100,n_positions=64,arch=llama,rope_%s=0", type);
    snprintf(msg, sizeof msg, "%s rope scaling needs 0 < factor", type);
    mps_err_clear(&err);
    CHECK_MSG(mps_config_parse(text, &c, &err) != 0 && strstr(err.msg, msg) != NULL, "%s: %s", text, err.msg);
}

/* the scalings transformers' releases compute differently are refused by name; one scaling at a time */
static void test_rope_refused(void)
{
    mps_config c;
    mps_err err;
    const char *hf = "{\"model_type\": \"llama\", \"hidden_size\": 32, \"intermediate_size\": 48, "
                     "\"num_hidden_layers\": 2, \"num_attention_heads\": 4, \"vocab_size\": 100, "
                     "\"max_position_embeddings\": 64, \"rope_scaling\": {\"rope_type\": \"%s\", \"factor\": 4.0}}";
    static const char *const types[] = { "yarn", "longrope", "su" };
    for (int i = 0; i < 3; i++) {
        char text[512], msg[128];
        snprintf(text, sizeof text, hf, types[i]);
        snprintf(msg, sizeof msg, "rope_scaling=\"%s\" is not supported (only default, linear, dynamic and llama3 RoPE)",
                 types[i]);
        CHECK_MSG(parse_hf(text, &c, &err) != 0 && strstr(err.msg, msg) != NULL, "%s: %s", types[i], err.msg);
    }
    mps_err_clear(&err);
    CHECK(mps_config_parse("n_layer=2,n_embd=32,n_head=4,vocab=100,n_positions=64,arch=llama,rope_linear=2,"
                           "rope_dynamic=2", &c, &err) != 0 && strstr(err.msg, "are RoPE scalings: give one") != NULL);
}

/* a backend whose kernels are not validated for heads x head_dim != n_embd (CUDA's, by default)
 * is refused such a model by name; the CPU backend takes it */
static void test_head_dim_backend(void)
{
    mps_config c;
    mps_layout L;
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_config_parse("arch=llama,family=mistral,n_layer=2,n_embd=32,n_head=4,n_kv_head=2,ffn=48,vocab=100,"
                           "n_positions=16,tied=0,head_dim=12", &c, &err) == 0);
    CHECK(mps_layout_parse("dp=1", &c, &L, &err) == 0);
    mps_comm comm;
    mps_comm_self(&comm);
    mps_backend be;
    mps_backend_cpu(&be);
    mps_train_opts o = { .micro_batch = 1, .seq = 8, .global_batch = 1, .lr = 1e-3f, .lr_min = 1e-3f,
                         .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f };
    mps_engine *e = NULL;
    CHECK_MSG(mps_engine_new(&c, &L, &comm, &be, &o, &e, &err) == 0, "%s", err.msg);
    mps_engine_free(e);
    be.any_head_dim = 0;
    e = NULL;
    mps_err_clear(&err);
    CHECK_MSG(mps_engine_new(&c, &L, &comm, &be, &o, &e, &err) != 0 && err.code == MPS_EUNSUPPORTED &&
                  strstr(err.msg, "--backend cpu: the model's 4 heads of head_dim 12 are 48 wide, not n_embd 32") != NULL,
              "%s", err.msg);
    mps_engine_free(e);
}

int main(void)
{
    test_head_dim_backend();
    test_rope_scaling("linear", MPS_ROPE_LINEAR);
    test_rope_scaling("dynamic", MPS_ROPE_DYNAMIC);
    test_rope_refused();
    test_head_dim();
    test_gpt2_one_config();
    test_hf_parse();
    test_config_strings();
    test_hf_generate();
    test_manifest();
    TEST_DONE();
}
