/* The GPT-2 model family: configuration, the catalogue of canonical tensors, state kinds. */
#ifndef MPS_MODEL_H
#define MPS_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

#define MPS_MAX_DIMS 4
#define MPS_TENSORS_PER_LAYER 12
#define MPS_NAME_MAX 48

typedef struct {
    int n_layer;
    int n_embd;       /* C */
    int n_head;       /* NH; C % NH == 0 */
    int n_positions;  /* maxT, rows of wpe */
    int64_t vocab;        /* V: real vocabulary of the tokenizer */
    int64_t padded_vocab; /* Vp >= V: rows of wte; rows V..Vp-1 are padding */
} mps_config;

/* Where a tensor lives in the pipeline. */
typedef enum {
    MPS_PLACE_EMBED,  /* first stage; wte is also held by the last stage as the tied head */
    MPS_PLACE_LAYER,  /* the stage that holds its layer */
    MPS_PLACE_FINAL   /* last stage (ln_f) */
} mps_place;

typedef struct {
    char name[MPS_NAME_MAX]; /* canonical name, e.g. "h.3.qkvw" */
    int ndim;
    int64_t shape[MPS_MAX_DIMS];
    int tp_dim;    /* dimension split by tensor parallelism, -1 if replicated across TP */
    int layer;     /* layer index for MPS_PLACE_LAYER tensors, else -1 */
    mps_place place;
    int tied_head; /* 1 for wte: the last pipeline stage holds it too, as the output head */
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

typedef enum { MPS_DTYPE_F32 = 0, MPS_DTYPE_BF16 = 1 } mps_dtype;
const char *mps_dtype_name(mps_dtype dtype); /* "f32", "bf16" */
int mps_dtype_from_name(const char *name);    /* -1 if unknown */
size_t mps_dtype_size(mps_dtype dtype);

/* Checks that the numbers describe a model this project implements; names the bad field. */
int mps_config_validate(const mps_config *cfg, mps_err *err);
/* The default padding of the vocabulary: up to a multiple of 128 (as llm.c: 50257 -> 50304). */
int64_t mps_default_padded_vocab(int64_t vocab);
/* Named presets: gpt2, gpt2-medium, gpt2-large, gpt2-xl, gpt-7b, gpt3-175b. Returns -1 if unknown. */
int mps_config_preset(const char *name, mps_config *out, mps_err *err);
/* Parses "n_layer=12,n_embd=768,n_head=12,vocab=50257,n_positions=1024[,padded_vocab=50304]". */
int mps_config_parse(const char *text, mps_config *out, mps_err *err);

/* The tensor catalogue: wte, wpe, then per layer l the 12 tensors h.l.{ln1w, ln1b, qkvw, qkvb,
 * attprojw, attprojb, ln2w, ln2b, fcw, fcb, fcprojw, fcprojb}, then lnfw, lnfb. */
int mps_tensor_count(const mps_config *cfg);
void mps_tensor_spec_get(const mps_config *cfg, int index, mps_tensor_spec *out);
int mps_tensor_find(const mps_config *cfg, const char *name); /* -1 if no such tensor */
int64_t mps_tensor_numel(const mps_tensor_spec *spec);
int64_t mps_param_count(const mps_config *cfg); /* padded vocab included */

/* Index of layer tensor `slot` (0..11) of layer l. */
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

#endif
