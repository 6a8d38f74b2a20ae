/* Hugging Face config.json: read into an mps_config (refusing, by name, every option the model
 * does not implement), generated from one, and checked against one. GPT-2 (model_type gpt2) and the
 * Llama family (llama, mistral, qwen2), with transformers' defaults where a key is missing. */
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "modelfile_internal.h"

static char *json_text(json_t *v)
{
    char *s = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT | JSON_REAL_PRECISION(6));
    return s ? s : strdup("?");
}

static int refuse(mps_err *err, const char *name, const char *field, json_t *v, const char *why)
{
    char *s = json_text(v);
    mps_fail(err, MPS_EUNSUPPORTED, "%s: %s=%s is not supported (%s)", name, field, s ? s : "?", why);
    free(s);
    return -1;
}

/* 0: read; 1: absent or null; -1: present but not an integer in [lo, hi] */
static int get_int(json_t *root, const char *name, const char *field, int64_t lo, int64_t hi, int64_t *out,
                   mps_err *err)
{
    json_t *v = json_object_get(root, field);
    if (v == NULL || json_is_null(v))
        return 1;
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi) {
        char *s = json_text(v);
        mps_fail(err, MPS_ECORRUPT, "%s: %s=%s: expected an integer in %lld..%lld", name, field, s, (long long)lo,
                 (long long)hi);
        free(s);
        return -1;
    }
    *out = json_integer_value(v);
    return 0;
}

/* The same for a required key. */
static int need_int(json_t *root, const char *name, const char *field, int64_t lo, int64_t hi, int64_t *out,
                    mps_err *err)
{
    int r = get_int(root, name, field, lo, hi, out, err);
    if (r > 0)
        return mps_fail(err, MPS_ECORRUPT, "%s: missing %s", name, field);
    return r;
}

/* 0: read; 1: absent or null (out keeps its default); -1: not a number in (lo, hi) */
static int get_real(json_t *root, const char *name, const char *field, double lo, double hi, double *out,
                    mps_err *err)
{
    json_t *v = json_object_get(root, field);
    if (v == NULL || json_is_null(v))
        return 1;
    if (!json_is_number(v) || !(json_number_value(v) > lo && json_number_value(v) < hi)) {
        char *s = json_text(v);
        mps_fail(err, MPS_ECORRUPT, "%s: %s=%s: expected a number in (%g, %g)", name, field, s, lo, hi);
        free(s);
        return -1;
    }
    *out = json_number_value(v);
    return 0;
}

static int is_true(json_t *root, const char *field)
{
    return json_is_true(json_object_get(root, field));
}

static int gpt2_parse(json_t *root, const char *name, mps_config *cfg, mps_err *err)
{
    static const char *const req[] = { "n_layer", "n_embd", "n_head", "vocab_size" };
    int64_t v[4];
    for (int i = 0; i < 4; i++)
        if (need_int(root, name, req[i], 1, i == 3 ? ((int64_t)1 << 31) : (1 << 24), &v[i], err) != 0)
            return -1;
    int64_t npos;
    int r = get_int(root, name, "n_positions", 1, 1 << 24, &npos, err);
    if (r > 0)
        r = get_int(root, name, "n_ctx", 1, 1 << 24, &npos, err);
    if (r < 0)
        return -1;
    if (r > 0)
        return mps_fail(err, MPS_ECORRUPT, "%s: missing n_positions (and n_ctx)", name);
    cfg->n_layer = (int)v[0];
    cfg->n_embd = (int)v[1];
    cfg->n_head = (int)v[2];
    cfg->vocab = v[3];
    cfg->n_positions = (int)npos;

    json_t *x;
    if ((x = json_object_get(root, "n_inner")) != NULL && !json_is_null(x) &&
        !(json_is_integer(x) && json_integer_value(x) == 4 * (json_int_t)cfg->n_embd))
        return refuse(err, name, "n_inner", x, "the MLP width must be 4 * n_embd");
    if ((x = json_object_get(root, "activation_function")) != NULL && !json_is_null(x) &&
        !(json_is_string(x) && (strcmp(json_string_value(x), "gelu_new") == 0 ||
                                strcmp(json_string_value(x), "gelu_pytorch_tanh") == 0)))
        return refuse(err, name, "activation_function", x, "only gelu_new / gelu_pytorch_tanh");
    static const char *const must_be_false[] = { "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                                                 "add_cross_attention" };
    for (int i = 0; i < 3; i++)
        if ((x = json_object_get(root, must_be_false[i])) != NULL && json_is_true(x))
            return refuse(err, name, must_be_false[i], x, "GPT-2 attention as implemented needs false");
    if ((x = json_object_get(root, "tie_word_embeddings")) != NULL && json_is_false(x))
        return refuse(err, name, "tie_word_embeddings", x, "GPT-2's output head is tied to wte");
    if ((x = json_object_get(root, "scale_attn_weights")) != NULL && json_is_false(x))
        return refuse(err, name, "scale_attn_weights", x, "attention is scaled by 1/sqrt(head size)");
    if ((x = json_object_get(root, "layer_norm_epsilon")) != NULL && !json_is_null(x)) {
        if (!json_is_number(x))
            return mps_fail(err, MPS_ECORRUPT, "%s: layer_norm_epsilon is not a number", name);
        if (fabs(json_number_value(x) - 1e-5) > 1e-8)
            return refuse(err, name, "layer_norm_epsilon", x, "only 1e-05");
    }
    return 0;
}

/* RoPE: transformers 4.x writes rope_theta and rope_scaling, 5.x one rope_parameters object
 * (rope_type, rope_theta and the scaling's fields). Llama 3's, linear and dynamic scaling are
 * implemented; yarn and longrope, whose formulas differ between transformers releases, are
 * refused by name. */
static int rope_parse(json_t *root, const char *name, mps_config *cfg, mps_err *err)
{
    json_t *params = json_object_get(root, "rope_parameters");
    json_t *scaling = json_is_object(params) ? params : json_object_get(root, "rope_scaling");
    const char *field = json_is_object(params) ? "rope_parameters" : "rope_scaling";
    cfg->rope_theta = 10000.0;
    if (get_real(root, name, "rope_theta", 0, 1e12, &cfg->rope_theta, err) < 0)
        return -1;
    if (json_is_object(params) && get_real(params, name, "rope_theta", 0, 1e12, &cfg->rope_theta, err) < 0)
        return -1;
    if (scaling == NULL || json_is_null(scaling))
        return 0;
    if (!json_is_object(scaling))
        return mps_fail(err, MPS_ECORRUPT, "%s: %s is not an object", name, field);
    json_t *type = json_object_get(scaling, "rope_type");
    if (type == NULL)
        type = json_object_get(scaling, "type");
    const char *t = json_is_string(type) ? json_string_value(type) : NULL;
    if (t == NULL || strcmp(t, "default") == 0)
        return 0;
    /* transformers' _compute_linear_scaling_rope_parameters (inv_freq / factor) and
     * _compute_dynamic_ntk_parameters (a larger base only for sequences past max_position_embeddings) */
    const int rt = mps_rope_type_from_name(t);
    if (rt == MPS_ROPE_LINEAR || rt == MPS_ROPE_DYNAMIC) {
        cfg->rope.type = (mps_rope_type)rt;
        if (get_real(scaling, name, "factor", 0, 1e6, &cfg->rope.factor, err) != 0 || !(cfg->rope.factor > 0))
            return mps_fail(err, MPS_ECORRUPT, "%s: %s of type %s needs a positive factor", name, field, t);
        return 0;
    }
    if (strcmp(t, "llama3") != 0)
        return refuse(err, name, field, type, "only default, linear, dynamic and llama3 RoPE");
    cfg->rope.type = MPS_ROPE_LLAMA3;
    int64_t orig = 0; /* set by need_int, or not used */
    if (get_real(scaling, name, "factor", 0, 1e6, &cfg->rope.factor, err) != 0 ||
        get_real(scaling, name, "low_freq_factor", 0, 1e6, &cfg->rope.low_freq_factor, err) != 0 ||
        get_real(scaling, name, "high_freq_factor", 0, 1e6, &cfg->rope.high_freq_factor, err) != 0 ||
        need_int(scaling, name, "original_max_position_embeddings", 1, 1 << 24, &orig, err) != 0)
        return mps_fail(err, MPS_ECORRUPT, "%s: %s of type llama3 needs factor, low_freq_factor, high_freq_factor and "
                        "original_max_position_embeddings", name, field);
    cfg->rope.original_max_positions = (int)orig;
    return 0;
}

static int llama_parse(json_t *root, const char *name, mps_family family, mps_config *cfg, mps_err *err)
{
    int64_t nl, ne, nh, ffn, vocab, npos, kv;
    if (need_int(root, name, "num_hidden_layers", 1, 1 << 20, &nl, err) ||
        need_int(root, name, "hidden_size", 1, 1 << 24, &ne, err) ||
        need_int(root, name, "num_attention_heads", 1, 1 << 24, &nh, err) ||
        need_int(root, name, "intermediate_size", 1, (int64_t)1 << 26, &ffn, err) ||
        need_int(root, name, "vocab_size", 1, (int64_t)1 << 31, &vocab, err) ||
        need_int(root, name, "max_position_embeddings", 1, 1 << 24, &npos, err))
        return -1;
    int r = get_int(root, name, "num_key_value_heads", 1, 1 << 24, &kv, err);
    if (r < 0)
        return -1;
    cfg->arch = MPS_ARCH_LLAMA;
    cfg->family = family;
    cfg->n_layer = (int)nl;
    cfg->n_embd = (int)ne;
    cfg->n_head = (int)nh;
    cfg->n_kv_head = r > 0 ? (int)nh : (int)kv;
    cfg->ffn = ffn;
    cfg->vocab = vocab;
    cfg->n_positions = (int)npos;
    cfg->norm_eps = 1e-6; /* LlamaConfig's, MistralConfig's and Qwen2Config's default */
    if (get_real(root, name, "rms_norm_eps", 0, 1, &cfg->norm_eps, err) < 0 || rope_parse(root, name, cfg, err) != 0)
        return -1;
    cfg->untied = !is_true(root, "tie_word_embeddings");
    cfg->qkv_bias = family == MPS_FAMILY_QWEN2; /* Qwen2's q, k, v projections always have biases */

    json_t *x;
    if ((x = json_object_get(root, "hidden_act")) != NULL && !json_is_null(x) &&
        !(json_is_string(x) && strcmp(json_string_value(x), "silu") == 0))
        return refuse(err, name, "hidden_act", x, "the MLP is SwiGLU with silu");
    if (is_true(root, "attention_bias"))
        return refuse(err, name, "attention_bias", json_object_get(root, "attention_bias"),
                      "o_proj has no bias in this model");
    if (is_true(root, "mlp_bias"))
        return refuse(err, name, "mlp_bias", json_object_get(root, "mlp_bias"), "the MLP has no biases");
    /* a head size other than hidden_size / num_attention_heads (Mistral NeMo, Mistral Small 3:
     * q is num_attention_heads x head_dim wide, o_proj takes that back to hidden_size) */
    if ((x = json_object_get(root, "head_dim")) != NULL && !json_is_null(x)) {
        if (!json_is_integer(x) || json_integer_value(x) < 1 || json_integer_value(x) > (1 << 16))
            return refuse(err, name, "head_dim", x, "a head size of 1 to 65536");
        if ((cfg->head_dim = mps_head_dim_stored((int)ne, (int)nh, json_integer_value(x))) != 0 &&
            family == MPS_FAMILY_QWEN2)
            return refuse(err, name, "head_dim", x, "Qwen2's head size is hidden_size / num_attention_heads");
    }
    static const char *const moe[] = { "num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok" };
    for (int i = 0; i < 4; i++)
        if ((x = json_object_get(root, moe[i])) != NULL && json_is_integer(x) && json_integer_value(x) > 0)
            return refuse(err, name, moe[i], x, "mixture-of-experts models are not implemented");
    if ((x = json_object_get(root, "quantization_config")) != NULL && !json_is_null(x))
        return refuse(err, name, "quantization_config", x, "quantized weights");
    /* Sliding-window attention. Mistral's (4096 in Mistral 7B v0.1, and MistralConfig's default
     * when the key is missing) is kept in the model config: below max_position_embeddings the
     * trainer takes sequences up to the window only, where full causal attention is the same
     * thing. Qwen2's, behind use_sliding_window, applies to the layers from max_window_layers on:
     * refused unless it never binds. */
    x = json_object_get(root, "sliding_window");
    if (family == MPS_FAMILY_MISTRAL) {
        if (x != NULL && !json_is_null(x) && !(json_is_integer(x) && json_integer_value(x) >= 1))
            return refuse(err, name, "sliding_window", x, "null or a positive number of positions");
        const int64_t w = x == NULL ? 4096 : json_is_null(x) ? 0 : json_integer_value(x);
        cfg->sliding_window = w < npos ? (int)w : 0;
    } else if (family == MPS_FAMILY_QWEN2 && is_true(root, "use_sliding_window") && x && !json_is_null(x) &&
               !(json_is_integer(x) && json_integer_value(x) >= npos)) {
        return refuse(err, name, "sliding_window", x, "Qwen2's sliding window on some layers: only full causal "
                      "attention, null or at least max_position_embeddings");
    }
    return 0;
}

int mps_hf_config_parse(json_t *root, const char *name, mps_config *cfg, mps_err *err)
{
    memset(cfg, 0, sizeof *cfg);
    if (!json_is_object(root))
        return mps_fail(err, MPS_ECORRUPT, "%s: not a JSON object", name);
    json_t *mt = json_object_get(root, "model_type");
    const char *type = json_is_string(mt) ? json_string_value(mt) : NULL;
    int rc;
    if (type == NULL && mt != NULL && !json_is_null(mt))
        return refuse(err, name, "model_type", mt, "gpt2, llama, mistral or qwen2");
    if (type == NULL || strcmp(type, "gpt2") == 0)
        rc = gpt2_parse(root, name, cfg, err); /* GPT-2 configs of old transformers have no model_type */
    else if (strcmp(type, "llama") == 0)
        rc = llama_parse(root, name, MPS_FAMILY_LLAMA, cfg, err);
    else if (strcmp(type, "mistral") == 0)
        rc = llama_parse(root, name, MPS_FAMILY_MISTRAL, cfg, err);
    else if (strcmp(type, "qwen2") == 0)
        rc = llama_parse(root, name, MPS_FAMILY_QWEN2, cfg, err);
    else
        return refuse(err, name, "model_type", mt, "gpt2, llama, mistral or qwen2");
    if (rc != 0)
        return -1;
    mps_err e2 = { 0 };
    mps_config c2 = *cfg;
    c2.padded_vocab = c2.vocab;
    if (mps_config_validate(&c2, &e2) != 0)
        return mps_fail(err, MPS_ECORRUPT, "%s: %s", name, e2.msg);
    return 0;
}

static const char *const hf_architectures[MPS_FAMILY_COUNT] = { "GPT2LMHeadModel", "LlamaForCausalLM",
                                                               "MistralForCausalLM", "Qwen2ForCausalLM" };

json_t *mps_rope_scaling_json(const mps_config *cfg, const char *type_key)
{
    if (cfg->rope.type == MPS_ROPE_LINEAR || cfg->rope.type == MPS_ROPE_DYNAMIC)
        return json_pack("{s:s, s:f}", type_key, mps_rope_type_name(cfg->rope.type), "factor", cfg->rope.factor);
    if (cfg->rope.type != MPS_ROPE_LLAMA3)
        return json_null();
    return json_pack("{s:s, s:f, s:f, s:f, s:i}", type_key, "llama3", "factor", cfg->rope.factor, "low_freq_factor",
                     cfg->rope.low_freq_factor, "high_freq_factor", cfg->rope.high_freq_factor,
                     "original_max_position_embeddings", cfg->rope.original_max_positions);
}

static void set_llama_fields(json_t *o, const mps_config *cfg, mps_dtype dtype)
{
    json_object_set_new(o, "hidden_size", json_integer(cfg->n_embd));
    json_object_set_new(o, "intermediate_size", json_integer(cfg->ffn));
    json_object_set_new(o, "num_hidden_layers", json_integer(cfg->n_layer));
    json_object_set_new(o, "num_attention_heads", json_integer(cfg->n_head));
    json_object_set_new(o, "num_key_value_heads", json_integer(cfg->n_kv_head));
    json_object_set_new(o, "head_dim", json_integer(mps_cfg_head_dim(cfg)));
    json_object_set_new(o, "vocab_size", json_integer(cfg->vocab));
    json_object_set_new(o, "max_position_embeddings", json_integer(cfg->n_positions));
    json_object_set_new(o, "rms_norm_eps", json_real(cfg->norm_eps));
    json_object_set_new(o, "rope_theta", json_real(cfg->rope_theta));
    json_object_set_new(o, "rope_scaling", mps_rope_scaling_json(cfg, "rope_type"));
    json_object_set_new(o, "hidden_act", json_string("silu"));
    json_object_set_new(o, "tie_word_embeddings", json_boolean(!cfg->untied));
    json_object_set_new(o, "initializer_range", json_real(0.02));
    json_object_set_new(o, "attention_dropout", json_real(0.0));
    json_object_set_new(o, "use_cache", json_true());
    json_object_set_new(o, "torch_dtype", json_string(dtype == MPS_DTYPE_BF16 ? "bfloat16" :
                                                      dtype == MPS_DTYPE_F16 ? "float16" : "float32"));
    if (cfg->family == MPS_FAMILY_LLAMA) {
        json_object_set_new(o, "attention_bias", json_false());
        json_object_set_new(o, "mlp_bias", json_false());
    } else {
        json_object_set_new(o, "sliding_window", cfg->sliding_window ? json_integer(cfg->sliding_window) : json_null());
    }
    if (cfg->family == MPS_FAMILY_QWEN2)
        json_object_set_new(o, "use_sliding_window", json_false());
}

static void set_gpt2_fields(json_t *o, const mps_config *cfg)
{
    json_object_set_new(o, "n_layer", json_integer(cfg->n_layer));
    json_object_set_new(o, "n_embd", json_integer(cfg->n_embd));
    json_object_set_new(o, "n_head", json_integer(cfg->n_head));
    json_object_set_new(o, "vocab_size", json_integer(cfg->vocab));
    json_object_set_new(o, "n_positions", json_integer(cfg->n_positions));
    json_object_set_new(o, "n_ctx", json_integer(cfg->n_positions));
    json_object_set_new(o, "activation_function", json_string("gelu_new"));
    json_object_set_new(o, "layer_norm_epsilon", json_real(1e-5));
    json_object_set_new(o, "n_inner", json_null());
    json_object_set_new(o, "tie_word_embeddings", json_true());
    json_int_t tok = cfg->vocab > 50256 ? 50256 : (json_int_t)cfg->vocab - 1;
    json_object_set_new(o, "bos_token_id", json_integer(tok));
    json_object_set_new(o, "eos_token_id", json_integer(tok));
    json_object_set_new(o, "resid_pdrop", json_real(0.1));
    json_object_set_new(o, "embd_pdrop", json_real(0.1));
    json_object_set_new(o, "attn_pdrop", json_real(0.1));
    json_object_set_new(o, "initializer_range", json_real(0.02));
    json_object_set_new(o, "scale_attn_weights", json_true());
    json_object_set_new(o, "use_cache", json_true());
}

char *mps_hf_config_generate(const mps_config *cfg, mps_dtype dtype)
{
    json_t *o = json_object();
    json_t *arch = json_array();
    json_array_append_new(arch, json_string(hf_architectures[cfg->family]));
    json_object_set_new(o, "architectures", arch);
    json_object_set_new(o, "model_type", json_string(mps_family_name(cfg->family)));
    if (cfg->arch == MPS_ARCH_GPT2)
        set_gpt2_fields(o, cfg);
    else
        set_llama_fields(o, cfg, dtype);
    char *s = json_dumps(o, JSON_INDENT(2) | JSON_REAL_PRECISION(6));
    json_decref(o);
    if (s == NULL)
        return NULL;
    size_t n = strlen(s);
    char *t = realloc(s, n + 2);
    if (t == NULL) {
        free(s);
        return NULL;
    }
    t[n] = '\n';
    t[n + 1] = '\0';
    return t;
}

int mps_hf_config_check(const char *text, const mps_config *cfg, mps_err *err)
{
    const char *name = "config.json (from the checkpoint)";
    json_error_t jerr;
    json_t *root = json_loads(text, JSON_REJECT_DUPLICATES, &jerr);
    if (root == NULL)
        return mps_fail(err, MPS_ECORRUPT, "%s: line %d: %s", name, jerr.line, jerr.text);
    mps_config c;
    int rc = mps_hf_config_parse(root, name, &c, err);
    json_decref(root);
    if (rc != 0)
        return -1;
    const char *field = NULL;
    long long have = 0, want = 0;
#define CHECK_FIELD(F, NAME)                                                                          \
    if (!field && (long long)c.F != (long long)cfg->F)                                                \
        field = NAME, have = (long long)c.F, want = (long long)cfg->F;
    CHECK_FIELD(arch, "architecture")
    CHECK_FIELD(family, "model_type")
    CHECK_FIELD(n_layer, "n_layer")
    CHECK_FIELD(n_embd, "n_embd")
    CHECK_FIELD(n_head, "n_head")
    CHECK_FIELD(vocab, "vocab_size")
    CHECK_FIELD(n_positions, "n_positions")
    CHECK_FIELD(n_kv_head, "num_key_value_heads")
    CHECK_FIELD(ffn, "intermediate_size")
    CHECK_FIELD(untied, "untied head")
    CHECK_FIELD(qkv_bias, "qkv_bias")
#undef CHECK_FIELD
    if (field)
        return mps_fail(err, MPS_ECORRUPT, "%s: %s=%lld but the model has %s=%lld", name, field, have, field, want);
    return 0;
}
