#include "model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *const mps_layer_slot_names[MPS_TENSORS_PER_LAYER] = {
    "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
    "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb"
};

static const char *const kind_names[MPS_KIND_COUNT] = { "param", "master", "adam_m", "adam_v", "grad" };

const char *mps_kind_name(mps_kind kind)
{
    return (kind >= 0 && kind < MPS_KIND_COUNT) ? kind_names[kind] : "?";
}

int mps_kind_from_name(const char *name)
{
    for (int k = 0; k < MPS_KIND_COUNT; k++)
        if (strcmp(name, kind_names[k]) == 0)
            return k;
    return -1;
}

const char *mps_dtype_name(mps_dtype dtype) { return dtype == MPS_DTYPE_BF16 ? "bf16" : "f32"; }

int mps_dtype_from_name(const char *name)
{
    if (strcmp(name, "f32") == 0 || strcmp(name, "fp32") == 0)
        return MPS_DTYPE_F32;
    if (strcmp(name, "bf16") == 0)
        return MPS_DTYPE_BF16;
    return -1;
}

size_t mps_dtype_size(mps_dtype dtype) { return dtype == MPS_DTYPE_BF16 ? 2 : 4; }

int64_t mps_default_padded_vocab(int64_t vocab) { return (vocab + 127) / 128 * 128; }

/* Limits keep every product below 2^62 and every name in MPS_NAME_MAX. */
#define MAX_LAYERS 100000
#define MAX_EMBD (1 << 20)
#define MAX_VOCAB ((int64_t)1 << 31)

int mps_config_validate(const mps_config *c, mps_err *err)
{
    if (c->n_layer < 1 || c->n_layer > MAX_LAYERS)
        return mps_fail(err, MPS_EUSAGE, "model: n_layer=%d out of range 1..%d", c->n_layer, MAX_LAYERS);
    if (c->n_embd < 1 || c->n_embd > MAX_EMBD)
        return mps_fail(err, MPS_EUSAGE, "model: n_embd=%d out of range 1..%d", c->n_embd, MAX_EMBD);
    if (c->n_head < 1 || c->n_embd % c->n_head != 0)
        return mps_fail(err, MPS_EUSAGE, "model: n_head=%d must be >= 1 and divide n_embd=%d", c->n_head, c->n_embd);
    if (c->n_positions < 1 || c->n_positions > (1 << 24))
        return mps_fail(err, MPS_EUSAGE, "model: n_positions=%d out of range 1..%d", c->n_positions, 1 << 24);
    if (c->vocab < 1 || c->vocab > MAX_VOCAB)
        return mps_fail(err, MPS_EUSAGE, "model: vocab=%lld out of range", (long long)c->vocab);
    if (c->padded_vocab < c->vocab || c->padded_vocab > MAX_VOCAB)
        return mps_fail(err, MPS_EUSAGE, "model: padded_vocab=%lld must be >= vocab=%lld",
                        (long long)c->padded_vocab, (long long)c->vocab);
    return 0;
}

typedef struct { const char *name; int n_layer, n_embd, n_head, n_positions; int64_t vocab; } preset;
static const preset presets[] = {
    { "gpt2", 12, 768, 12, 1024, 50257 },
    { "gpt2-medium", 24, 1024, 16, 1024, 50257 },
    { "gpt2-large", 36, 1280, 20, 1024, 50257 },
    { "gpt2-xl", 48, 1600, 25, 1024, 50257 },
    { "gpt-7b", 32, 4096, 32, 2048, 50257 },
    { "gpt3-175b", 96, 12288, 96, 2048, 50257 },
};

int mps_config_preset(const char *name, mps_config *out, mps_err *err)
{
    for (size_t i = 0; i < sizeof presets / sizeof presets[0]; i++) {
        if (strcmp(presets[i].name, name) == 0) {
            out->n_layer = presets[i].n_layer;
            out->n_embd = presets[i].n_embd;
            out->n_head = presets[i].n_head;
            out->n_positions = presets[i].n_positions;
            out->vocab = presets[i].vocab;
            out->padded_vocab = mps_default_padded_vocab(out->vocab);
            return 0;
        }
    }
    return mps_fail(err, MPS_EUSAGE,
                    "--model %s: unknown model (known: gpt2, gpt2-medium, gpt2-large, gpt2-xl, gpt-7b, gpt3-175b)", name);
}

static int parse_i64(const char *s, int64_t *out)
{
    char *end;
    long long v = strtoll(s, &end, 10);
    if (end == s || *end != '\0')
        return -1;
    *out = v;
    return 0;
}

int mps_config_parse(const char *text, mps_config *out, mps_err *err)
{
    memset(out, 0, sizeof *out);
    char buf[512];
    if (strlen(text) >= sizeof buf)
        return mps_fail(err, MPS_EUSAGE, "--config: string too long");
    strcpy(buf, text);
    /* keys, and the largest value each can hold (the int fields must fit an int exactly) */
    static const struct { const char *name; int64_t max; } keys[] = {
        { "n_layer", INT32_MAX }, { "n_embd", INT32_MAX }, { "n_head", INT32_MAX }, { "vocab", MAX_VOCAB },
        { "n_positions", INT32_MAX }, { "padded_vocab", MAX_VOCAB },
    };
    int64_t vals[6] = { 0 };
    int seen[6] = { 0 };
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(tok, '=');
        if (eq == NULL)
            return mps_fail(err, MPS_EUSAGE, "--config: '%s' is not key=value", tok);
        *eq = '\0';
        int k = -1;
        for (int i = 0; i < 6; i++)
            if (strcmp(tok, keys[i].name) == 0)
                k = i;
        if (k < 0)
            return mps_fail(err, MPS_EUSAGE,
                            "--config: unknown key '%s' (known: n_layer, n_embd, n_head, vocab, padded_vocab, n_positions)", tok);
        if (seen[k]++)
            return mps_fail(err, MPS_EUSAGE, "--config: key '%s' given twice", tok);
        if (parse_i64(eq + 1, &vals[k]) != 0 || vals[k] < 0 || vals[k] > keys[k].max)
            return mps_fail(err, MPS_EUSAGE, "--config: %s='%s' is not a valid number", tok, eq + 1);
    }
    for (int i = 0; i < 5; i++)
        if (!seen[i])
            return mps_fail(err, MPS_EUSAGE, "--config: missing %s (give n_layer, n_embd, n_head, vocab, n_positions)",
                            keys[i].name);
    out->n_layer = (int)vals[0];
    out->n_embd = (int)vals[1];
    out->n_head = (int)vals[2];
    out->vocab = vals[3];
    out->n_positions = (int)vals[4];
    out->padded_vocab = seen[5] ? vals[5] : mps_default_padded_vocab(out->vocab);
    if (mps_config_validate(out, err) != 0)
        return mps_wrap(err, "--config %s", text);
    return 0;
}

int mps_tensor_count(const mps_config *cfg) { return 4 + cfg->n_layer * MPS_TENSORS_PER_LAYER; }

static void set_shape(mps_tensor_spec *s, int ndim, int64_t a, int64_t b, int64_t c)
{
    int64_t dims[3] = { a, b, c };
    s->ndim = ndim;
    for (int i = 0; i < MPS_MAX_DIMS; i++)
        s->shape[i] = i < ndim ? dims[i] : 1;
}

void mps_tensor_spec_get(const mps_config *cfg, int index, mps_tensor_spec *s)
{
    const int64_t C = cfg->n_embd;
    memset(s, 0, sizeof *s);
    s->tp_dim = -1;
    s->layer = -1;
    if (index == MPS_TENSOR_WTE) {
        snprintf(s->name, sizeof s->name, "wte");
        set_shape(s, 2, cfg->padded_vocab, C, 0); // (Vp, C), vocab-parallel
        s->tp_dim = 0;
        s->place = MPS_PLACE_EMBED;
        s->tied_head = 1;
        return;
    }
    if (index == MPS_TENSOR_WPE) {
        snprintf(s->name, sizeof s->name, "wpe");
        set_shape(s, 2, cfg->n_positions, C, 0); // (maxT, C), replicated
        s->place = MPS_PLACE_EMBED;
        return;
    }
    int layer_index = index - 2;
    if (layer_index >= cfg->n_layer * MPS_TENSORS_PER_LAYER) {
        int is_bias = layer_index - cfg->n_layer * MPS_TENSORS_PER_LAYER;
        snprintf(s->name, sizeof s->name, is_bias ? "lnfb" : "lnfw");
        set_shape(s, 1, C, 0, 0); // (C)
        s->place = MPS_PLACE_FINAL;
        return;
    }
    int l = layer_index / MPS_TENSORS_PER_LAYER, slot = layer_index % MPS_TENSORS_PER_LAYER;
    snprintf(s->name, sizeof s->name, "h.%d.%s", l, mps_layer_slot_names[slot]);
    s->layer = l;
    s->place = MPS_PLACE_LAYER;
    switch (slot) {
    case MPS_SLOT_QKVW: set_shape(s, 3, 3, C, C); s->tp_dim = 1; break;      // (3, C out, C in): heads split
    case MPS_SLOT_QKVB: set_shape(s, 2, 3, C, 0); s->tp_dim = 1; break;      // (3, C)
    case MPS_SLOT_ATTPROJW: set_shape(s, 2, C, C, 0); s->tp_dim = 1; break;  // (C out, C in): row-parallel
    case MPS_SLOT_FCW: set_shape(s, 2, 4 * C, C, 0); s->tp_dim = 0; break;   // (4C out, C in): column-parallel
    case MPS_SLOT_FCB: set_shape(s, 1, 4 * C, 0, 0); s->tp_dim = 0; break;   // (4C)
    case MPS_SLOT_FCPROJW: set_shape(s, 2, C, 4 * C, 0); s->tp_dim = 1; break; // (C out, 4C in): row-parallel
    default: set_shape(s, 1, C, 0, 0); break; // layernorms and row-parallel biases: (C), replicated
    }
}

int mps_tensor_find(const mps_config *cfg, const char *name)
{
    if (strcmp(name, "wte") == 0) return MPS_TENSOR_WTE;
    if (strcmp(name, "wpe") == 0) return MPS_TENSOR_WPE;
    if (strcmp(name, "lnfw") == 0) return mps_tensor_lnfw(cfg);
    if (strcmp(name, "lnfb") == 0) return mps_tensor_lnfb(cfg);
    int l, n = 0;
    char slot[MPS_NAME_MAX];
    if (sscanf(name, "h.%d.%40s%n", &l, slot, &n) != 2 || name[n] != '\0' || l < 0 || l >= cfg->n_layer)
        return -1;
    char canon[2 * MPS_NAME_MAX];
    snprintf(canon, sizeof canon, "h.%d.%s", l, slot);
    if (strcmp(canon, name) != 0) /* rejects "h.03.x", "h.+3.x" */
        return -1;
    for (int s = 0; s < MPS_TENSORS_PER_LAYER; s++)
        if (strcmp(slot, mps_layer_slot_names[s]) == 0)
            return mps_layer_tensor(l, s);
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
