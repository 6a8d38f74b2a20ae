/* The architecture table: one description per model family, as data. For every tensor it gives the
 * canonical name, the shape in terms of the config, the dimension tensor parallelism splits, the
 * pipeline place, weight decay, the init rule and the Hugging Face key and orientation. The
 * catalogue (model.c), HF import and export (safetensors.c), synth, init, inspect and the
 * geometry's TP splits read it; only the trainer's block math knows more about an architecture. */
#ifndef MPS_ARCH_H
#define MPS_ARCH_H

#include "model.h"

/* Symbolic dimensions, resolved against a config by mps_dim_size(). */
typedef enum {
    MPS_DIM_NONE = 0,
    MPS_DIM_THREE, /* 3: GPT-2's fused q, k, v */
    MPS_DIM_C,     /* n_embd */
    MPS_DIM_F,     /* MLP width: 4C for GPT-2, intermediate_size for Llama */
    MPS_DIM_H,     /* query heads */
    MPS_DIM_KV,    /* key/value heads */
    MPS_DIM_HD,    /* head size C / H */
    MPS_DIM_VP,    /* padded vocabulary (rows vocab.. are padding) */
    MPS_DIM_POS    /* n_positions */
} mps_dim;

/* Which configs have the tensor. */
typedef enum {
    MPS_COND_ALWAYS = 0,
    MPS_COND_QKV_BIAS, /* q/k/v biases (Qwen2) */
    MPS_COND_UNTIED    /* a separate output head */
} mps_tensor_cond;

typedef struct {
    const char *name;      /* canonical name; a layer tensor's full name is "h.<layer>.<name>" */
    mps_place place;
    mps_tensor_cond cond;
    int ndim;
    mps_dim dims[MPS_MAX_DIMS];
    int tp_dim;            /* -1: replicated over TP. Shapes keep whole heads in one dimension, so a
                            * balanced split of that dimension never cuts a head or a kv group */
    int decay;             /* AdamW weight decay applies */
    mps_init_rule init;
    int head_if_tied;      /* the embedding: the last stage also holds it as the output head when tied */
    /* Hugging Face: the key (a layer tensor's has one %d for the layer), and how the file stores
     * the tensor: as a 2-D matrix whose rows are the first hf_row_dims canonical dimensions and whose
     * columns are the rest (hf_row_dims == ndim: 1-D), transposed when hf_transpose (GPT-2's Conv1D,
     * (in, out)). A leading MPS_DIM_VP dimension stores vocab rows, not padded_vocab. */
    const char *hf_key;
    int hf_row_dims;
    int hf_transpose;
} mps_tensor_rule;

typedef struct {
    const char *name;                /* "gpt2", "llama" */
    const mps_tensor_rule *rules;    /* n_embed embedding tensors, n_layer_rules per layer, n_final */
    int n_embed, n_layer_rules, n_final;
    const char *hf_optional_prefix;  /* a prefix some HF files put before every key ("transformer."), or NULL */
    const char *hf_tied_head_key;    /* key of a stored copy of the tied head ("lm_head.weight"), or NULL */
    const char *const *hf_buffers;   /* keys (with %d for the layer) of non-parameter buffers to skip; NULL ends */
} mps_arch;

extern const mps_arch mps_arch_gpt2;
extern const mps_arch mps_arch_llama;

const mps_arch *mps_arch_of(mps_arch_id id);
const char *mps_arch_name(mps_arch_id id);         /* "gpt2", "llama" */
int mps_arch_from_name(const char *name);          /* -1 if unknown */
int64_t mps_dim_size(const mps_config *cfg, mps_dim d);
int mps_rule_present(const mps_config *cfg, const mps_tensor_rule *r);

/* Catalogue index of the rule's tensor (layer for a layer rule), -1 when the config lacks it. */
int mps_tensor_index(const mps_config *cfg, int rule, int layer);
/* The rule of catalogue tensor `index` and its layer (-1 outside layers). */
const mps_tensor_rule *mps_tensor_rule_of(const mps_config *cfg, int index, int *layer);

/* The Hugging Face key of tensor `index` (without an optional prefix) and its 1-D or 2-D shape
 * in the file. */
void mps_hf_tensor(const mps_config *cfg, int index, char *key, size_t keylen, int *ndim, int64_t shape[2],
                   int *transpose);

/* The columns of the trainer's (tokens, .) buffers of one block on one TP rank (train/engine.c;
 * the planner counts the same): local heads, q|k|v (GPT-2 3 x attn; Llama the q heads and both
 * kv heads' k and v), the attention output (heads x head size), the MLP's hidden width, its first
 * product (GPT-2 fc; Llama gate|up, twice the hidden width), and the scratch width the block's
 * backward needs. tp must divide the heads, kv heads and hidden width (mps_layout_validate). */
typedef struct {
    int64_t heads, qkv, attn, ffn, fc, wide;
} mps_block_widths;
void mps_arch_block_widths(const mps_config *cfg, int tp, mps_block_widths *w);

/* The trainer's memory per layer: activation bytes one layer keeps for its backward, per
 * micro-batch of micro_batch sequences of seq tokens, under tensor parallelism tp, with 16-bit
 * (act_bytes 2, the CUDA trainer) or fp32 (4, the CPU trainer) operand buffers; recompute 0 none,
 * 1 selective (the same: the trainer stores no attention scores), 2 full (inspect/plan.h). */
long double mps_arch_layer_activation_bytes(const mps_config *cfg, int64_t seq, int64_t micro_batch, int tp,
                                            int recompute, int act_bytes);

#endif
