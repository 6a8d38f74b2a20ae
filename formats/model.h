/* Model configuration, the catalogue of canonical tensors (built from the architecture table in
 * arch.h), state kinds and dtypes. */
#ifndef MPS_MODEL_H
#define MPS_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

#define MPS_MAX_DIMS 4
#define MPS_TENSORS_PER_LAYER 12 /* GPT-2's */
#define MPS_NAME_MAX 48

/* The block math a model runs. */
typedef enum { MPS_ARCH_GPT2 = 0, MPS_ARCH_LLAMA = 1, MPS_ARCH_COUNT } mps_arch_id;
/* The Hugging Face family a checkpoint came from (its model_type): what export writes back. */
typedef enum { MPS_FAMILY_GPT2 = 0, MPS_FAMILY_LLAMA, MPS_FAMILY_MISTRAL, MPS_FAMILY_QWEN2, MPS_FAMILY_COUNT } mps_family;
typedef enum { MPS_ROPE_DEFAULT = 0, MPS_ROPE_LLAMA3, MPS_ROPE_LINEAR, MPS_ROPE_DYNAMIC, MPS_ROPE_COUNT } mps_rope_type;

typedef struct {
    int n_layer;
    int n_embd;       /* C */
    int n_head;       /* NH; C % NH == 0 unless head_dim is given */
    int n_positions;  /* maxT: rows of wpe (GPT-2), the context length (Llama) */
    int64_t vocab;        /* V: real vocabulary of the tokenizer */
    int64_t padded_vocab; /* Vp >= V: rows of wte (and of an untied head); rows V..Vp-1 are padding */
    /* The fields below are zero for GPT-2, so that a GPT-2 config given as the six numbers above
     * is complete; read them through the mps_cfg_* accessors. */
    mps_arch_id arch;
    mps_family family;
    int n_kv_head;    /* key/value heads (grouped-query attention); 0: n_head */
    int64_t ffn;      /* MLP width; 0: 4 * n_embd */
    int untied;       /* 1: a separate output head (lm_head); GPT-2 is always tied */
    int qkv_bias;     /* Llama family: q, k, v projections have biases (Qwen2); GPT-2 always has them */
    double norm_eps;  /* 0: 1e-5 */
    double rope_theta; /* Llama family; 0: 10000 */
    /* Mistral's sliding-window attention (Mistral 7B v0.1: 4096): a query attends to at most the
     * last sliding_window positions. 0: none (full causal), and always 0 unless it is below
     * n_positions. The trainer runs full causal attention, which is the same thing for sequences
     * of at most sliding_window tokens, and refuses longer ones. */
    int sliding_window;
    /* Llama family: the head size where it is not n_embd / n_head (Mistral NeMo and Mistral Small
     * 3: 128 over 32 heads of a 5120-wide model, so q is 4096 wide); 0: n_embd / n_head, and
     * always 0 when it equals that */
    int head_dim;
    struct {
        /* MPS_ROPE_LLAMA3: Llama 3's frequency scaling (all four fields); MPS_ROPE_LINEAR: every
         * frequency divided by factor (positions interpolated: LongChat, LLaMA-2-7B-32K);
         * MPS_ROPE_DYNAMIC: dynamic NTK scaling by factor, which changes the frequencies only for
         * sequences longer than n_positions (at inference): the default ones in training */
        mps_rope_type type;
        double factor, low_freq_factor, high_freq_factor;
        int original_max_positions;
    } rope;
} mps_config;

static inline int mps_cfg_kv_heads(const mps_config *c) { return c->n_kv_head ? c->n_kv_head : c->n_head; }
static inline int64_t mps_cfg_ffn(const mps_config *c) { return c->ffn ? c->ffn : 4 * (int64_t)c->n_embd; }
static inline int mps_cfg_head_dim(const mps_config *c) { return c->head_dim ? c->head_dim : c->n_embd / c->n_head; }
static inline int mps_cfg_tied(const mps_config *c) { return c->arch == MPS_ARCH_GPT2 || !c->untied; }
static inline double mps_cfg_norm_eps(const mps_config *c) { return c->norm_eps > 0 ? c->norm_eps : 1e-5; }
static inline double mps_cfg_rope_theta(const mps_config *c) { return c->rope_theta > 0 ? c->rope_theta : 10000.0; }
/* the longest sequence the trainer takes: the context, or a sliding window below it */
static inline int mps_cfg_max_seq(const mps_config *c) { return c->sliding_window ? c->sliding_window : c->n_positions; }
/* a head size hd given for a model, as mps_config.head_dim stores it: 0 where it is
 * n_embd / n_head (one config per model) */
static inline int mps_head_dim_stored(int n_embd, int n_head, int64_t hd)
{
    return n_head > 0 && n_embd % n_head == 0 && hd == n_embd / n_head ? 0 : (int)hd;
}

const char *mps_family_name(mps_family f);   /* "gpt2", "llama", "mistral", "qwen2" */
int mps_family_from_name(const char *name);  /* -1 if unknown */
/* transformers' rope_type names: "default", "llama3", "linear", "dynamic" */
const char *mps_rope_type_name(mps_rope_type t);
int mps_rope_type_from_name(const char *name); /* -1 if unknown */
/* What a config has beyond the table's columns, for a listing: "sliding window W", "head_dim D",
 * joined by ", "; "" when neither */
void mps_config_notes(const mps_config *cfg, char *buf, size_t size);

/* Where a tensor lives in the pipeline. */
typedef enum {
    MPS_PLACE_EMBED,  /* first stage; a tied embedding is also held by the last stage as the head */
    MPS_PLACE_LAYER,  /* the stage that holds its layer */
    MPS_PLACE_FINAL   /* last stage (final norm, untied head) */
} mps_place;

/* How a fresh model initialises a tensor (train/init.c): N(0, 0.02); N(0, 0.02/sqrt(2 n_layer))
 * (GPT-2's residual projections); ones (norm weights); zeros (biases). */
typedef enum { MPS_INIT_NORMAL = 0, MPS_INIT_NORMAL_RESID, MPS_INIT_ONES, MPS_INIT_ZEROS } mps_init_rule;

typedef struct {
    char name[MPS_NAME_MAX]; /* canonical name, e.g. "h.3.qkvw" */
    int ndim;
    int64_t shape[MPS_MAX_DIMS];
    int tp_dim;    /* dimension split by tensor parallelism, -1 if replicated across TP */
    int layer;     /* layer index for MPS_PLACE_LAYER tensors, else -1 */
    mps_place place;
    int tied_head; /* 1 for a tied embedding: the last pipeline stage holds it too, as the output head */
    int decay;     /* AdamW weight decay applies (matrices and embeddings) */
    mps_init_rule init;
    int rule;      /* index of its rule in the architecture table (arch.h) */
} mps_tensor_spec;

/* State kinds. Gradients are never stored in a checkpoint but are planned by inspect. */
typedef enum {
    MPS_KIND_PARAM = 0,
    MPS_KIND_MASTER,
    MPS_KIND_ADAM_M,
    MPS_KIND_ADAM_V,
    MPS_KIND_GRAD,
    MPS_KIND_COUNT
} mps_kind;

const char *mps_kind_name(mps_kind kind); /* "param", "master", "adam_m", "adam_v", "grad" */
int mps_kind_from_name(const char *name); /* -1 if unknown */

/* Checkpoints store f32; bf16 and f16 are the dtypes of source models and of exports. */
typedef enum { MPS_DTYPE_F32 = 0, MPS_DTYPE_BF16 = 1, MPS_DTYPE_F16 = 2 } mps_dtype;
const char *mps_dtype_name(mps_dtype dtype); /* "f32", "bf16", "f16" */
int mps_dtype_from_name(const char *name);    /* -1 if unknown */
size_t mps_dtype_size(mps_dtype dtype);

/* Checks that the numbers describe a model this project implements; names the bad field. */
int mps_config_validate(const mps_config *cfg, mps_err *err);
/* The default padding of the vocabulary: up to a multiple of 128 (as llm.c: 50257 -> 50304). */
int64_t mps_default_padded_vocab(int64_t vocab);
/* Named presets (the published configs), one list that every command takes. Returns -1 if unknown. */
int mps_config_preset(const char *name, mps_config *out, mps_err *err);
/* Name of preset i, or NULL past the last one. */
const char *mps_preset_name(int i);
/* The preset names joined by ", " (for help texts and errors); 512 bytes hold them. */
void mps_preset_list(char *buf, size_t size);
/* Parses "n_layer=12,n_embd=768,n_head=12,vocab=50257,n_positions=1024[,padded_vocab=50304]", with
 * arch=llama also family, n_kv_head, ffn, tied, qkv_bias, norm_eps, rope_theta,
 * rope_llama3=factor:low_freq_factor:high_freq_factor:original_max_positions,
 * rope_linear=factor or rope_dynamic=factor, head_dim and (family=mistral) sliding_window. */
int mps_config_parse(const char *text, mps_config *out, mps_err *err);
/* The --config string that parses back to cfg exactly (512 bytes hold any). */
void mps_config_format(const mps_config *cfg, char *buf, size_t size);

/* The tensor catalogue, from the architecture table: the embedding tensors, then per layer l its
 * tensors h.l.*, then the final ones. GPT-2: wte, wpe, per layer the 12 tensors h.l.{ln1w, ln1b,
 * qkvw, qkvb, attprojw, attprojb, ln2w, ln2b, fcw, fcb, fcprojw, fcprojb}, then lnfw, lnfb. */
int mps_tensor_count(const mps_config *cfg);
void mps_tensor_spec_get(const mps_config *cfg, int index, mps_tensor_spec *out);
int mps_tensor_find(const mps_config *cfg, const char *name); /* -1 if no such tensor */
int64_t mps_tensor_numel(const mps_tensor_spec *spec);
int64_t mps_param_count(const mps_config *cfg); /* padded vocab included */

/* GPT-2 only: index of layer tensor `slot` (0..11) of layer l. */
static inline int mps_layer_tensor(int l, int slot) { return 2 + l * MPS_TENSORS_PER_LAYER + slot; }
enum {
    MPS_SLOT_LN1W, MPS_SLOT_LN1B, MPS_SLOT_QKVW, MPS_SLOT_QKVB, MPS_SLOT_ATTPROJW, MPS_SLOT_ATTPROJB,
    MPS_SLOT_LN2W, MPS_SLOT_LN2B, MPS_SLOT_FCW, MPS_SLOT_FCB, MPS_SLOT_FCPROJW, MPS_SLOT_FCPROJB
};
#define MPS_TENSOR_WTE 0
#define MPS_TENSOR_WPE 1
static inline int mps_tensor_lnfw(const mps_config *cfg) { return 2 + cfg->n_layer * MPS_TENSORS_PER_LAYER; }
static inline int mps_tensor_lnfb(const mps_config *cfg) { return 3 + cfg->n_layer * MPS_TENSORS_PER_LAYER; }
extern const char *const mps_layer_slot_names[MPS_TENSORS_PER_LAYER];

/* bf16 <-> f32. Widening is exact; narrowing rounds to nearest even (NaN stays NaN). */
static inline float mps_bf16_to_f32(uint16_t h)
{
    union { uint32_t u; float f; } v = { (uint32_t)h << 16 };
    return v.f;
}
static inline uint16_t mps_f32_to_bf16(float f)
{
    union { float f; uint32_t u; } v = { f };
    if ((v.u & 0x7f800000u) == 0x7f800000u && (v.u & 0x007fffffu))
        return (uint16_t)((v.u >> 16) | 0x40);
    uint32_t rounding = 0x7fffu + ((v.u >> 16) & 1u);
    return (uint16_t)((v.u + rounding) >> 16);
}

/* f32 -> IEEE half, round to nearest even; overflow gives infinity, NaN stays NaN. */
static inline uint16_t mps_f32_to_f16(float f)
{
    union { float f; uint32_t u; } v = { f };
    uint32_t sign = (v.u >> 16) & 0x8000u, absu = v.u & 0x7fffffffu;
    if (absu >= 0x7f800000u) /* inf or NaN */
        return (uint16_t)(sign | 0x7c00u | (absu > 0x7f800000u ? 0x200u : 0));
    if (absu >= 0x477ff000u) /* rounds to 65536 or more */
        return (uint16_t)(sign | 0x7c00u);
    if (absu < 0x38800000u) { /* below the smallest normal half: a subnormal or zero */
        if (absu < 0x33000000u) /* below half the smallest subnormal (2^-25): zero */
            return (uint16_t)sign;
        uint32_t mant = (absu & 0x7fffffu) | 0x800000u;
        int shift = 126 - (int)(absu >> 23); /* 14..24: the subnormal's mantissa is mant >> shift */
        uint32_t q = mant >> shift, rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1u)))
            q++;
        return (uint16_t)(sign | q);
    }
    uint32_t r = absu - 0x38000000u; /* rebias the exponent: 127 - 15 = 112 */
    uint32_t q = r >> 13, rem = r & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (q & 1u)))
        q++;
    return (uint16_t)(sign | q);
}

#endif
