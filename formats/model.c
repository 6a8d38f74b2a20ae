#include "model.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "arch.h"

const char *const mps_layer_slot_names[MPS_TENSORS_PER_LAYER] = {
    "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
    "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb"
};

/* the index of name in a table of n names, or -1 */
static int name_index(const char *const *names, int n, const char *name)
{
    for (int i = 0; i < n; i++)
        if (strcmp(name, names[i]) == 0)
            return i;
    return -1;
}

static const char *const kind_names[MPS_KIND_COUNT] = { "param", "master", "adam_m", "adam_v", "grad" };

const char *mps_kind_name(mps_kind kind)
{
    return (kind >= 0 && kind < MPS_KIND_COUNT) ? kind_names[kind] : "?";
}

int mps_kind_from_name(const char *name) { return name_index(kind_names, MPS_KIND_COUNT, name); }

const char *mps_dtype_name(mps_dtype dtype)
{
    return dtype == MPS_DTYPE_BF16 ? "bf16" : dtype == MPS_DTYPE_F16 ? "f16" : "f32";
}

int mps_dtype_from_name(const char *name)
{
    if (strcmp(name, "f32") == 0 || strcmp(name, "fp32") == 0)
        return MPS_DTYPE_F32;
    if (strcmp(name, "bf16") == 0)
        return MPS_DTYPE_BF16;
    if (strcmp(name, "f16") == 0 || strcmp(name, "fp16") == 0)
        return MPS_DTYPE_F16;
    return -1;
}

size_t mps_dtype_size(mps_dtype dtype) { return dtype == MPS_DTYPE_F32 ? 4 : 2; }

static const char *const family_names[MPS_FAMILY_COUNT] = { "gpt2", "llama", "mistral", "qwen2" };

const char *mps_family_name(mps_family f) { return f >= 0 && f < MPS_FAMILY_COUNT ? family_names[f] : "?"; }

int mps_family_from_name(const char *name) { return name_index(family_names, MPS_FAMILY_COUNT, name); }

static const char *const rope_names[MPS_ROPE_COUNT] = { "default", "llama3", "linear", "dynamic" };

const char *mps_rope_type_name(mps_rope_type t) { return t >= 0 && t < MPS_ROPE_COUNT ? rope_names[t] : "?"; }

int mps_rope_type_from_name(const char *name) { return name_index(rope_names, MPS_ROPE_COUNT, name); }

void mps_config_notes(const mps_config *c, char *buf, size_t size)
{
    int n = 0;
    buf[0] = '\0';
    if (c->sliding_window)
        n = snprintf(buf, size, "sliding window %d", c->sliding_window);
    if (c->head_dim && n >= 0 && (size_t)n < size)
        snprintf(buf + n, size - (size_t)n, "%shead_dim %d", n ? ", " : "", c->head_dim);
}

int64_t mps_default_padded_vocab(int64_t vocab) { return (vocab + 127) / 128 * 128; }

/* Limits keep every product below 2^62 and every name in MPS_NAME_MAX. */
#define MAX_LAYERS 100000
#define MAX_EMBD (1 << 20)
#define MAX_VOCAB ((int64_t)1 << 31)

int mps_config_validate(const mps_config *c, mps_err *err)
{
    if (c->arch < 0 || c->arch >= MPS_ARCH_COUNT)
        return mps_fail(err, MPS_EUSAGE, "model: unknown architecture %d", (int)c->arch);
    if (c->family < 0 || c->family >= MPS_FAMILY_COUNT || (c->arch == MPS_ARCH_GPT2) != (c->family == MPS_FAMILY_GPT2))
        return mps_fail(err, MPS_EUSAGE, "model: family %s does not run on architecture %s", mps_family_name(c->family),
                        c->arch == MPS_ARCH_GPT2 ? "gpt2" : "llama");
    if (c->n_layer < 1 || c->n_layer > MAX_LAYERS)
        return mps_fail(err, MPS_EUSAGE, "model: n_layer=%d out of range 1..%d", c->n_layer, MAX_LAYERS);
    if (c->n_embd < 1 || c->n_embd > MAX_EMBD)
        return mps_fail(err, MPS_EUSAGE, "model: n_embd=%d out of range 1..%d", c->n_embd, MAX_EMBD);
    if (c->n_head < 1 || (c->head_dim == 0 && c->n_embd % c->n_head != 0))
        return mps_fail(err, MPS_EUSAGE, "model: n_head=%d must be >= 1 and divide n_embd=%d (or give head_dim)",
                        c->n_head, c->n_embd);
    if (c->n_positions < 1 || c->n_positions > (1 << 24))
        return mps_fail(err, MPS_EUSAGE, "model: n_positions=%d out of range 1..%d", c->n_positions, 1 << 24);
    if (c->vocab < 1 || c->vocab > MAX_VOCAB)
        return mps_fail(err, MPS_EUSAGE, "model: vocab=%lld out of range", (long long)c->vocab);
    if (c->padded_vocab < c->vocab || c->padded_vocab > MAX_VOCAB)
        return mps_fail(err, MPS_EUSAGE, "model: padded_vocab=%lld must be >= vocab=%lld",
                        (long long)c->padded_vocab, (long long)c->vocab);
    if (c->arch == MPS_ARCH_GPT2) {
        /* GPT-2's block has none of these: a value here is a config meant for another model */
        if ((c->n_kv_head && c->n_kv_head != c->n_head) || (c->ffn && c->ffn != 4 * (int64_t)c->n_embd) ||
            c->untied || c->qkv_bias || c->rope_theta != 0 || c->rope.type != MPS_ROPE_DEFAULT ||
            (c->norm_eps != 0 && c->norm_eps != 1e-5) || c->sliding_window != 0 || c->head_dim != 0)
            return mps_fail(err, MPS_EUSAGE, "model: arch=gpt2 takes no n_kv_head, ffn, tied, qkv_bias, norm_eps, "
                            "rope_theta, rope scaling, sliding_window or head_dim (give arch=llama)");
        return 0;
    }
    if (c->n_kv_head < 1 || c->n_head % c->n_kv_head != 0)
        return mps_fail(err, MPS_EUSAGE, "model: n_kv_head=%d must be >= 1 and divide n_head=%d", c->n_kv_head,
                        c->n_head);
    if (c->ffn < 1 || c->ffn > ((int64_t)1 << 26))
        return mps_fail(err, MPS_EUSAGE, "model: ffn=%lld out of range 1..%lld", (long long)c->ffn,
                        (long long)1 << 26);
    if (!(c->norm_eps > 0 && c->norm_eps < 1))
        return mps_fail(err, MPS_EUSAGE, "model: norm_eps=%g must be in (0, 1)", c->norm_eps);
    if (!(c->rope_theta >= 1 && c->rope_theta < 1e12))
        return mps_fail(err, MPS_EUSAGE, "model: rope_theta=%g must be in [1, 1e12)", c->rope_theta);
    /* LlamaConfig's and MistralConfig's head_dim (Qwen2Config has none); a head size of
     * n_embd / n_head is written as none, so that each model has one config; even, for RoPE */
    if (c->head_dim != 0) {
        if (c->family == MPS_FAMILY_QWEN2)
            return mps_fail(err, MPS_EUSAGE, "model: head_dim is Llama's and Mistral's, not qwen2's (its head size "
                            "is n_embd / n_head)");
        if (c->head_dim < 2 || c->head_dim > (1 << 16) || c->head_dim % 2 != 0 ||
            (int64_t)c->head_dim * c->n_head > MAX_EMBD)
            return mps_fail(err, MPS_EUSAGE, "model: head_dim=%d must be even, 2..65536, with n_head x head_dim at "
                            "most %d", c->head_dim, MAX_EMBD);
        if (mps_head_dim_stored(c->n_embd, c->n_head, c->head_dim) == 0)
            return mps_fail(err, MPS_EUSAGE, "model: head_dim=%d is n_embd / n_head: leave it out", c->head_dim);
    }
    /* Mistral's: what export writes back as MistralConfig's sliding_window (LlamaConfig has none;
     * Qwen2's applies to some layers only). A window of n_positions or more never binds: such a
     * model is written without one, so that each model has one config. */
    if (c->sliding_window != 0 && c->family != MPS_FAMILY_MISTRAL)
        return mps_fail(err, MPS_EUSAGE, "model: sliding_window is Mistral's (family=mistral), not %s's",
                        mps_family_name(c->family));
    if (c->sliding_window < 0 || (c->sliding_window != 0 && c->sliding_window >= c->n_positions))
        return mps_fail(err, MPS_EUSAGE, "model: sliding_window=%d must be below n_positions=%d (a window of "
                        "n_positions or more is full causal attention: leave it out)", c->sliding_window,
                        c->n_positions);
    if (c->rope.type == MPS_ROPE_LLAMA3) {
        if (!(c->rope.factor >= 1 && c->rope.factor < 1e6) || !(c->rope.low_freq_factor > 0) ||
            !(c->rope.high_freq_factor > c->rope.low_freq_factor) || c->rope.high_freq_factor > 1e6 ||
            c->rope.original_max_positions < 1 || c->rope.original_max_positions > (1 << 24))
            return mps_fail(err, MPS_EUSAGE, "model: llama3 rope scaling needs factor >= 1, 0 < low_freq_factor < "
                            "high_freq_factor and original_max_position_embeddings >= 1");
    } else if (c->rope.type == MPS_ROPE_LINEAR || c->rope.type == MPS_ROPE_DYNAMIC) {
        /* (one config per model: the fields these scalings do not have are zero) */
        if (!(c->rope.factor > 0 && c->rope.factor < 1e6) || c->rope.low_freq_factor != 0 ||
            c->rope.high_freq_factor != 0 || c->rope.original_max_positions != 0)
            return mps_fail(err, MPS_EUSAGE, "model: %s rope scaling needs 0 < factor < 1e6 (and no other field)",
                            mps_rope_type_name(c->rope.type));
    } else if (c->rope.type != MPS_ROPE_DEFAULT) {
        return mps_fail(err, MPS_EUSAGE, "model: unknown rope scaling type %d", (int)c->rope.type);
    }
    return 0;
}

typedef struct {
    const char *name;
    mps_family family;
    int n_layer, n_embd, n_head, n_kv_head, n_positions;
    int64_t ffn, vocab;
    int untied, qkv_bias;
    double norm_eps, rope_theta;
    int llama3_rope; /* Llama 3.1's scaling: factor 8, low 1, high 4, original 8192 */
    int sliding_window;
    int head_dim; /* 0: n_embd / n_head */
} preset;
/* The published configs (config.json of each model on the Hugging Face hub; mistral-7b is v0.3,
 * mistral-7b-v0.1 the first release, with its 4096-token sliding window; Mistral NeMo (2407) and
 * Mistral Small 3 (2501) have 32 heads of 128 in a 5120-wide model), and the shapes the
 * benchmarks train (llama-125m, llama-1b-hs128: ../shared/bench/torch_llama.py). */
static const preset presets[] = {
    { "gpt2", MPS_FAMILY_GPT2, 12, 768, 12, 0, 1024, 0, 50257, 0, 0, 0, 0, 0, 0, 0 },
    { "gpt2-medium", MPS_FAMILY_GPT2, 24, 1024, 16, 0, 1024, 0, 50257, 0, 0, 0, 0, 0, 0, 0 },
    { "gpt2-large", MPS_FAMILY_GPT2, 36, 1280, 20, 0, 1024, 0, 50257, 0, 0, 0, 0, 0, 0, 0 },
    { "gpt2-xl", MPS_FAMILY_GPT2, 48, 1600, 25, 0, 1024, 0, 50257, 0, 0, 0, 0, 0, 0, 0 },
    { "gpt-7b", MPS_FAMILY_GPT2, 32, 4096, 32, 0, 2048, 0, 50257, 0, 0, 0, 0, 0, 0, 0 },
    { "gpt3-175b", MPS_FAMILY_GPT2, 96, 12288, 96, 0, 2048, 0, 50257, 0, 0, 0, 0, 0, 0, 0 },
    { "llama-2-7b", MPS_FAMILY_LLAMA, 32, 4096, 32, 32, 4096, 11008, 32000, 1, 0, 1e-5, 10000, 0, 0, 0 },
    { "llama-2-70b", MPS_FAMILY_LLAMA, 80, 8192, 64, 8, 4096, 28672, 32000, 1, 0, 1e-5, 10000, 0, 0, 0 },
    { "llama-3-8b", MPS_FAMILY_LLAMA, 32, 4096, 32, 8, 8192, 14336, 128256, 1, 0, 1e-5, 500000, 0, 0, 0 },
    { "llama-3-70b", MPS_FAMILY_LLAMA, 80, 8192, 64, 8, 8192, 28672, 128256, 1, 0, 1e-5, 500000, 0, 0, 0 },
    { "llama-3.1-8b", MPS_FAMILY_LLAMA, 32, 4096, 32, 8, 131072, 14336, 128256, 1, 0, 1e-5, 500000, 1, 0, 0 },
    { "mistral-7b", MPS_FAMILY_MISTRAL, 32, 4096, 32, 8, 32768, 14336, 32768, 1, 0, 1e-5, 1000000, 0, 0, 0 },
    { "mistral-7b-v0.1", MPS_FAMILY_MISTRAL, 32, 4096, 32, 8, 32768, 14336, 32000, 1, 0, 1e-5, 10000, 0, 4096, 0 },
    { "mistral-nemo-12b", MPS_FAMILY_MISTRAL, 40, 5120, 32, 8, 1024000, 14336, 131072, 1, 0, 1e-5, 1000000, 0, 0, 128 },
    { "mistral-small-24b", MPS_FAMILY_MISTRAL, 40, 5120, 32, 8, 32768, 32768, 131072, 1, 0, 1e-5, 100000000, 0, 0, 128 },
    { "qwen2.5-0.5b", MPS_FAMILY_QWEN2, 24, 896, 14, 2, 32768, 4864, 151936, 0, 1, 1e-6, 1000000, 0, 0, 0 },
    { "qwen2.5-7b", MPS_FAMILY_QWEN2, 28, 3584, 28, 4, 32768, 18944, 152064, 1, 1, 1e-6, 1000000, 0, 0, 0 },
    { "tinyllama-1.1b", MPS_FAMILY_LLAMA, 22, 2048, 32, 4, 2048, 5632, 32000, 1, 0, 1e-5, 10000, 0, 0, 0 },
    { "smollm2-135m", MPS_FAMILY_LLAMA, 30, 576, 9, 3, 8192, 1536, 49152, 0, 0, 1e-5, 100000, 0, 0, 0 },
    { "llama-125m", MPS_FAMILY_LLAMA, 12, 768, 12, 4, 1024, 2048, 32000, 1, 0, 1e-5, 10000, 0, 0, 0 },
    { "llama-1b-hs128", MPS_FAMILY_LLAMA, 16, 2048, 16, 4, 2048, 5632, 32000, 1, 0, 1e-5, 10000, 0, 0, 0 },
};
#define NPRESETS (sizeof presets / sizeof presets[0])

const char *mps_preset_name(int i) { return i >= 0 && (size_t)i < NPRESETS ? presets[i].name : NULL; }

void mps_preset_list(char *buf, size_t size)
{
    size_t n = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < NPRESETS && n < size; i++)
        n += (size_t)snprintf(buf + n, size - n, "%s%s", i ? ", " : "", presets[i].name);
}

int mps_config_preset(const char *name, mps_config *out, mps_err *err)
{
    for (size_t i = 0; i < NPRESETS; i++) {
        const preset *p = &presets[i];
        if (strcmp(p->name, name) != 0)
            continue;
        memset(out, 0, sizeof *out);
        out->n_layer = p->n_layer;
        out->n_embd = p->n_embd;
        out->n_head = p->n_head;
        out->n_positions = p->n_positions;
        out->vocab = p->vocab;
        out->padded_vocab = mps_default_padded_vocab(out->vocab);
        out->family = p->family;
        if (p->family != MPS_FAMILY_GPT2) {
            out->arch = MPS_ARCH_LLAMA;
            out->n_kv_head = p->n_kv_head;
            out->ffn = p->ffn;
            out->untied = p->untied;
            out->qkv_bias = p->qkv_bias;
            out->norm_eps = p->norm_eps;
            out->rope_theta = p->rope_theta;
            out->sliding_window = p->sliding_window;
            out->head_dim = p->head_dim;
            if (p->llama3_rope) {
                out->rope.type = MPS_ROPE_LLAMA3;
                out->rope.factor = 8;
                out->rope.low_freq_factor = 1;
                out->rope.high_freq_factor = 4;
                out->rope.original_max_positions = 8192;
            }
        }
        return 0;
    }
    char known[512];
    mps_preset_list(known, sizeof known);
    return mps_fail(err, MPS_EUSAGE, "--model %s: unknown model (known: %s)", name, known);
}

static int parse_i64(const char *s, int64_t *out)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (end == s || *end != '\0' || errno == ERANGE)
        return -1;
    *out = v;
    return 0;
}

static int parse_f64(const char *s, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end != '\0' || errno == ERANGE || !isfinite(v))
        return -1;
    *out = v;
    return 0;
}

/* --config keys. Integer keys hold at most `max`; 'r' keys are reals; 's' keys are names. */
enum { K_N_LAYER, K_N_EMBD, K_N_HEAD, K_VOCAB, K_N_POSITIONS, K_PADDED_VOCAB, K_ARCH, K_FAMILY, K_N_KV_HEAD, K_FFN,
       K_TIED, K_QKV_BIAS, K_NORM_EPS, K_ROPE_THETA, K_ROPE_LLAMA3, K_SLIDING_WINDOW, K_HEAD_DIM, K_ROPE_LINEAR,
       K_ROPE_DYNAMIC, K_COUNT };
static const struct { const char *name; char type; int64_t max; } config_keys[K_COUNT] = {
    { "n_layer", 'i', INT32_MAX }, { "n_embd", 'i', INT32_MAX }, { "n_head", 'i', INT32_MAX },
    { "vocab", 'i', MAX_VOCAB }, { "n_positions", 'i', INT32_MAX }, { "padded_vocab", 'i', MAX_VOCAB },
    { "arch", 's', 0 }, { "family", 's', 0 }, { "n_kv_head", 'i', INT32_MAX }, { "ffn", 'i', (int64_t)1 << 40 },
    { "tied", 'i', 1 }, { "qkv_bias", 'i', 1 }, { "norm_eps", 'r', 0 }, { "rope_theta", 'r', 0 },
    { "rope_llama3", 's', 0 }, { "sliding_window", 'i', INT32_MAX }, { "head_dim", 'i', INT32_MAX },
    { "rope_linear", 'r', 0 }, { "rope_dynamic", 'r', 0 },
};

int mps_config_parse(const char *text, mps_config *out, mps_err *err)
{
    memset(out, 0, sizeof *out);
    char buf[1024];
    if (strlen(text) >= sizeof buf)
        return mps_fail(err, MPS_EUSAGE, "--config: string too long");
    strcpy(buf, text);
    int64_t ivals[K_COUNT] = { 0 };
    double rvals[K_COUNT] = { 0 };
    const char *svals[K_COUNT] = { 0 };
    int seen[K_COUNT] = { 0 };
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(tok, '=');
        if (eq == NULL)
            return mps_fail(err, MPS_EUSAGE, "--config: '%s' is not key=value", tok);
        *eq = '\0';
        int k = -1;
        for (int i = 0; i < K_COUNT; i++)
            if (strcmp(tok, config_keys[i].name) == 0)
                k = i;
        if (k < 0)
            return mps_fail(err, MPS_EUSAGE,
                            "--config: unknown key '%s' (known: n_layer, n_embd, n_head, vocab, padded_vocab, "
                            "n_positions, arch, family, n_kv_head, ffn, tied, qkv_bias, norm_eps, rope_theta, rope_llama3, "
                            "rope_linear, rope_dynamic, sliding_window, head_dim)", tok);
        if (seen[k]++)
            return mps_fail(err, MPS_EUSAGE, "--config: key '%s' given twice", tok);
        const char *val = eq + 1;
        int bad;
        if (config_keys[k].type == 'i')
            bad = parse_i64(val, &ivals[k]) != 0 || ivals[k] < 0 || ivals[k] > config_keys[k].max;
        else if (config_keys[k].type == 'r')
            bad = parse_f64(val, &rvals[k]) != 0;
        else
            bad = (svals[k] = val)[0] == '\0';
        if (bad)
            return mps_fail(err, MPS_EUSAGE, "--config: %s='%s' is not a valid %s", tok, val,
                            config_keys[k].type == 's' ? "name" : "number");
    }
    for (int i = 0; i <= K_N_POSITIONS; i++)
        if (!seen[i])
            return mps_fail(err, MPS_EUSAGE, "--config: missing %s (give n_layer, n_embd, n_head, vocab, n_positions)",
                            config_keys[i].name);
    out->n_layer = (int)ivals[K_N_LAYER];
    out->n_embd = (int)ivals[K_N_EMBD];
    out->n_head = (int)ivals[K_N_HEAD];
    out->vocab = ivals[K_VOCAB];
    out->n_positions = (int)ivals[K_N_POSITIONS];
    out->padded_vocab = seen[K_PADDED_VOCAB] ? ivals[K_PADDED_VOCAB] : mps_default_padded_vocab(out->vocab);
    if (seen[K_ARCH]) {
        int a = mps_arch_from_name(svals[K_ARCH]);
        if (a < 0)
            return mps_fail(err, MPS_EUSAGE, "--config: arch='%s' is not gpt2 or llama", svals[K_ARCH]);
        out->arch = (mps_arch_id)a;
    }
    out->family = out->arch == MPS_ARCH_GPT2 ? MPS_FAMILY_GPT2 : MPS_FAMILY_LLAMA;
    if (seen[K_FAMILY]) {
        int f = mps_family_from_name(svals[K_FAMILY]);
        if (f < 0)
            return mps_fail(err, MPS_EUSAGE, "--config: family='%s' is not gpt2, llama, mistral or qwen2",
                            svals[K_FAMILY]);
        out->family = (mps_family)f;
    }
    out->head_dim = seen[K_HEAD_DIM] ? mps_head_dim_stored(out->n_embd, out->n_head, ivals[K_HEAD_DIM]) : 0;
    if (seen[K_ROPE_LLAMA3] + seen[K_ROPE_LINEAR] + seen[K_ROPE_DYNAMIC] > 1)
        return mps_fail(err, MPS_EUSAGE, "--config: rope_llama3, rope_linear and rope_dynamic are RoPE scalings: give "
                        "one");
    if (out->arch == MPS_ARCH_LLAMA) {
        /* the Llama defaults of transformers' LlamaConfig where a key is missing */
        out->n_kv_head = seen[K_N_KV_HEAD] ? (int)ivals[K_N_KV_HEAD] : out->n_head;
        out->ffn = seen[K_FFN] ? ivals[K_FFN] : 4 * (int64_t)out->n_embd;
        out->untied = seen[K_TIED] ? !ivals[K_TIED] : 1;
        out->qkv_bias = seen[K_QKV_BIAS] ? (int)ivals[K_QKV_BIAS] : out->family == MPS_FAMILY_QWEN2;
        out->norm_eps = seen[K_NORM_EPS] ? rvals[K_NORM_EPS] : 1e-5;
        out->rope_theta = seen[K_ROPE_THETA] ? rvals[K_ROPE_THETA] : 10000.0;
        out->sliding_window = (int)ivals[K_SLIDING_WINDOW];
        if (seen[K_ROPE_LLAMA3]) { /* factor:low_freq_factor:high_freq_factor:original_max_positions */
            char tail;
            out->rope.type = MPS_ROPE_LLAMA3;
            if (sscanf(svals[K_ROPE_LLAMA3], "%lf:%lf:%lf:%d%c", &out->rope.factor, &out->rope.low_freq_factor,
                       &out->rope.high_freq_factor, &out->rope.original_max_positions, &tail) != 4)
                return mps_fail(err, MPS_EUSAGE, "--config: rope_llama3='%s' is not factor:low:high:original_positions",
                                svals[K_ROPE_LLAMA3]);
        }
        if (seen[K_ROPE_LINEAR] || seen[K_ROPE_DYNAMIC]) {
            out->rope.type = seen[K_ROPE_LINEAR] ? MPS_ROPE_LINEAR : MPS_ROPE_DYNAMIC;
            out->rope.factor = rvals[seen[K_ROPE_LINEAR] ? K_ROPE_LINEAR : K_ROPE_DYNAMIC];
        }
    } else {
        /* GPT-2's own values (n_kv_head = n_head, ffn = 4 n_embd, norm_eps 1e-5) are stored as
         * the zeros they are implied by, so that each model has one config (mps_config_format
         * prints GPT-2 as its six numbers); any other value is refused by validate */
        out->n_kv_head = seen[K_N_KV_HEAD] && ivals[K_N_KV_HEAD] != out->n_head ? (int)ivals[K_N_KV_HEAD] : 0;
        out->ffn = seen[K_FFN] && ivals[K_FFN] != 4 * (int64_t)out->n_embd ? ivals[K_FFN] : 0;
        out->untied = seen[K_TIED] && !ivals[K_TIED];
        out->qkv_bias = seen[K_QKV_BIAS] ? (int)ivals[K_QKV_BIAS] : 0;
        out->norm_eps = seen[K_NORM_EPS] && rvals[K_NORM_EPS] != 1e-5 ? rvals[K_NORM_EPS] : 0;
        out->rope_theta = seen[K_ROPE_THETA] ? rvals[K_ROPE_THETA] : 0;
        if (seen[K_ROPE_LLAMA3] || seen[K_ROPE_LINEAR] || seen[K_ROPE_DYNAMIC])
            out->rope.type = MPS_ROPE_LLAMA3; /* refused by validate */
        out->sliding_window = (int)ivals[K_SLIDING_WINDOW]; /* (likewise) */
    }
    if (mps_config_validate(out, err) != 0)
        return mps_wrap(err, "--config %s", text);
    return 0;
}

void mps_config_format(const mps_config *c, char *buf, size_t size)
{
    int n = snprintf(buf, size, "n_layer=%d,n_embd=%d,n_head=%d,vocab=%lld,n_positions=%d,padded_vocab=%lld",
                     c->n_layer, c->n_embd, c->n_head, (long long)c->vocab, c->n_positions, (long long)c->padded_vocab);
    if (c->arch == MPS_ARCH_GPT2 || n < 0 || (size_t)n >= size)
        return;
    n += snprintf(buf + n, size - (size_t)n, ",arch=%s,family=%s,n_kv_head=%d,ffn=%lld,tied=%d,qkv_bias=%d,"
                  "norm_eps=%.17g,rope_theta=%.17g", mps_arch_name(c->arch), mps_family_name(c->family), c->n_kv_head,
                  (long long)c->ffn, !c->untied, c->qkv_bias, c->norm_eps, c->rope_theta);
    if (c->rope.type == MPS_ROPE_LLAMA3 && n > 0 && (size_t)n < size)
        n += snprintf(buf + n, size - (size_t)n, ",rope_llama3=%.17g:%.17g:%.17g:%d", c->rope.factor,
                      c->rope.low_freq_factor, c->rope.high_freq_factor, c->rope.original_max_positions);
    if ((c->rope.type == MPS_ROPE_LINEAR || c->rope.type == MPS_ROPE_DYNAMIC) && n > 0 && (size_t)n < size)
        n += snprintf(buf + n, size - (size_t)n, ",rope_%s=%.17g", mps_rope_type_name(c->rope.type), c->rope.factor);
    if (c->sliding_window != 0 && n > 0 && (size_t)n < size)
        n += snprintf(buf + n, size - (size_t)n, ",sliding_window=%d", c->sliding_window);
    if (c->head_dim != 0 && n > 0 && (size_t)n < size)
        snprintf(buf + n, size - (size_t)n, ",head_dim=%d", c->head_dim);
}

/* ---------------------------------------------------------------------------------------------
 * The catalogue, from the architecture table */

static int rules_present(const mps_config *cfg, const mps_tensor_rule *r, int n)
{
    int count = 0;
    for (int i = 0; i < n; i++)
        count += mps_rule_present(cfg, &r[i]);
    return count;
}

int mps_tensor_count(const mps_config *cfg)
{
    const mps_arch *a = mps_arch_of(cfg->arch);
    return rules_present(cfg, a->rules, a->n_embed) +
           cfg->n_layer * rules_present(cfg, a->rules + a->n_embed, a->n_layer_rules) +
           rules_present(cfg, a->rules + a->n_embed + a->n_layer_rules, a->n_final);
}

void mps_tensor_spec_get(const mps_config *cfg, int index, mps_tensor_spec *s)
{
    memset(s, 0, sizeof *s);
    int layer;
    const mps_tensor_rule *r = mps_tensor_rule_of(cfg, index, &layer);
    const mps_arch *a = mps_arch_of(cfg->arch);
    if (r == NULL) { /* out of range: an empty spec (callers index within mps_tensor_count) */
        s->tp_dim = -1;
        s->layer = -1;
        return;
    }
    if (layer >= 0)
        snprintf(s->name, sizeof s->name, "h.%d.%s", layer, r->name);
    else
        snprintf(s->name, sizeof s->name, "%s", r->name);
    s->ndim = r->ndim;
    for (int d = 0; d < MPS_MAX_DIMS; d++)
        s->shape[d] = d < r->ndim ? mps_dim_size(cfg, r->dims[d]) : 1;
    s->tp_dim = r->tp_dim;
    s->layer = layer;
    s->place = r->place;
    s->tied_head = r->head_if_tied && mps_cfg_tied(cfg);
    s->decay = r->decay;
    s->init = r->init;
    s->rule = (int)(r - a->rules);
}

int mps_tensor_find(const mps_config *cfg, const char *name)
{
    const mps_arch *a = mps_arch_of(cfg->arch);
    int nl = a->n_embed + a->n_layer_rules;
    for (int i = 0; i < a->n_embed; i++)
        if (strcmp(name, a->rules[i].name) == 0)
            return mps_tensor_index(cfg, i, -1);
    for (int i = nl; i < nl + a->n_final; i++)
        if (strcmp(name, a->rules[i].name) == 0)
            return mps_tensor_index(cfg, i, -1);
    int l, n = 0;
    char slot[MPS_NAME_MAX];
    if (sscanf(name, "h.%d.%40s%n", &l, slot, &n) != 2 || name[n] != '\0' || l < 0 || l >= cfg->n_layer)
        return -1;
    char canon[2 * MPS_NAME_MAX];
    snprintf(canon, sizeof canon, "h.%d.%s", l, slot);
    if (strcmp(canon, name) != 0) /* rejects "h.03.x", "h.+3.x" */
        return -1;
    for (int i = a->n_embed; i < nl; i++)
        if (strcmp(slot, a->rules[i].name) == 0)
            return mps_tensor_index(cfg, i, l);
    return -1;
}

int64_t mps_tensor_numel(const mps_tensor_spec *spec)
{
    int64_t n = 1;
    for (int i = 0; i < spec->ndim; i++)
        n *= spec->shape[i];
    return n;
}

int64_t mps_param_count(const mps_config *cfg)
{
    int64_t n = 0;
    mps_tensor_spec s;
    for (int i = 0; i < mps_tensor_count(cfg); i++) {
        mps_tensor_spec_get(cfg, i, &s);
        n += mps_tensor_numel(&s);
    }
    return n;
}
