/* The architecture table (arch.h): GPT-2 and the Llama family, and the catalogue arithmetic over it. */
#include "arch.h"

#include <stdio.h>
#include <string.h>

#define D(...) { __VA_ARGS__ }
#define LAYER MPS_PLACE_LAYER
#define ALWAYS MPS_COND_ALWAYS

/* GPT-2: learned positions, LayerNorm, GELU MLP of 4C, fused qkv with biases, head tied to wte.
 * The file stores the four matrices as Conv1D weights, (in, out). */
static const mps_tensor_rule gpt2_rules[] = {
    /* name, place, cond, ndim, dims, tp_dim, decay, init, head_if_tied, hf_key, hf_row_dims, hf_transpose */
    { "wte", MPS_PLACE_EMBED, ALWAYS, 2, D(MPS_DIM_VP, MPS_DIM_C), 0, 1, MPS_INIT_NORMAL, 1, "wte.weight", 1, 0 },
    { "wpe", MPS_PLACE_EMBED, ALWAYS, 2, D(MPS_DIM_POS, MPS_DIM_C), -1, 1, MPS_INIT_NORMAL, 0, "wpe.weight", 1, 0 },
    { "ln1w", LAYER, ALWAYS, 1, D(MPS_DIM_C), -1, 0, MPS_INIT_ONES, 0, "h.%d.ln_1.weight", 1, 0 },
    { "ln1b", LAYER, ALWAYS, 1, D(MPS_DIM_C), -1, 0, MPS_INIT_ZEROS, 0, "h.%d.ln_1.bias", 1, 0 },
    /* (3, C out, C in): each TP rank takes its heads' rows of q, k and v */
    { "qkvw", LAYER, ALWAYS, 3, D(MPS_DIM_THREE, MPS_DIM_C, MPS_DIM_C), 1, 1, MPS_INIT_NORMAL, 0,
      "h.%d.attn.c_attn.weight", 2, 1 },
    { "qkvb", LAYER, ALWAYS, 2, D(MPS_DIM_THREE, MPS_DIM_C), 1, 0, MPS_INIT_ZEROS, 0, "h.%d.attn.c_attn.bias", 2, 0 },
    /* (C out, C in): row-parallel */
    { "attprojw", LAYER, ALWAYS, 2, D(MPS_DIM_C, MPS_DIM_C), 1, 1, MPS_INIT_NORMAL_RESID, 0,
      "h.%d.attn.c_proj.weight", 1, 1 },
    { "attprojb", LAYER, ALWAYS, 1, D(MPS_DIM_C), -1, 0, MPS_INIT_ZEROS, 0, "h.%d.attn.c_proj.bias", 1, 0 },
    { "ln2w", LAYER, ALWAYS, 1, D(MPS_DIM_C), -1, 0, MPS_INIT_ONES, 0, "h.%d.ln_2.weight", 1, 0 },
    { "ln2b", LAYER, ALWAYS, 1, D(MPS_DIM_C), -1, 0, MPS_INIT_ZEROS, 0, "h.%d.ln_2.bias", 1, 0 },
    /* (4C out, C in): column-parallel */
    { "fcw", LAYER, ALWAYS, 2, D(MPS_DIM_F, MPS_DIM_C), 0, 1, MPS_INIT_NORMAL, 0, "h.%d.mlp.c_fc.weight", 1, 1 },
    { "fcb", LAYER, ALWAYS, 1, D(MPS_DIM_F), 0, 0, MPS_INIT_ZEROS, 0, "h.%d.mlp.c_fc.bias", 1, 0 },
    /* (C out, 4C in): row-parallel */
    { "fcprojw", LAYER, ALWAYS, 2, D(MPS_DIM_C, MPS_DIM_F), 1, 1, MPS_INIT_NORMAL_RESID, 0,
      "h.%d.mlp.c_proj.weight", 1, 1 },
    { "fcprojb", LAYER, ALWAYS, 1, D(MPS_DIM_C), -1, 0, MPS_INIT_ZEROS, 0, "h.%d.mlp.c_proj.bias", 1, 0 },
    { "lnfw", MPS_PLACE_FINAL, ALWAYS, 1, D(MPS_DIM_C), -1, 0, MPS_INIT_ONES, 0, "ln_f.weight", 1, 0 },
    { "lnfb", MPS_PLACE_FINAL, ALWAYS, 1, D(MPS_DIM_C), -1, 0, MPS_INIT_ZEROS, 0, "ln_f.bias", 1, 0 },
};
static const char *const gpt2_buffers[] = { "h.%d.attn.bias", "h.%d.attn.masked_bias", NULL };

const mps_arch mps_arch_gpt2 = {
    "gpt2", gpt2_rules, 2, 12, 2, "transformer.", "lm_head.weight", gpt2_buffers,
};

/* The Llama family (Llama 2/3, Mistral, Qwen2, TinyLlama, SmolLM): RMSNorm, RoPE, grouped-query
 * attention with q, k, v as separate tensors (so no reader needs Megatron's per-group interleaving),
 * SwiGLU with gate and up as separate tensors (each split on its own under TP), usually an untied
 * head. torch Linear weights are (out, in): the file holds the canonical tensor as it is. Shapes
 * keep heads whole: q (H, hd, C) and k, v (KV, hd, C) split on their head dimension give rank r the
 * kv heads [r KV/tp, (r+1) KV/tp) and exactly the query heads that use them (tp divides KV). */
static const mps_tensor_rule llama_rules[] = {
    { "wte", MPS_PLACE_EMBED, ALWAYS, 2, D(MPS_DIM_VP, MPS_DIM_C), 0, 1, MPS_INIT_NORMAL, 1,
      "model.embed_tokens.weight", 1, 0 },
    { "ln1w", LAYER, ALWAYS, 1, D(MPS_DIM_C), -1, 0, MPS_INIT_ONES, 0, "model.layers.%d.input_layernorm.weight", 1, 0 },
    { "qw", LAYER, ALWAYS, 3, D(MPS_DIM_H, MPS_DIM_HD, MPS_DIM_C), 0, 1, MPS_INIT_NORMAL, 0,
      "model.layers.%d.self_attn.q_proj.weight", 2, 0 },
    { "qb", LAYER, MPS_COND_QKV_BIAS, 2, D(MPS_DIM_H, MPS_DIM_HD), 0, 0, MPS_INIT_ZEROS, 0,
      "model.layers.%d.self_attn.q_proj.bias", 2, 0 },
    { "kw", LAYER, ALWAYS, 3, D(MPS_DIM_KV, MPS_DIM_HD, MPS_DIM_C), 0, 1, MPS_INIT_NORMAL, 0,
      "model.layers.%d.self_attn.k_proj.weight", 2, 0 },
    { "kb", LAYER, MPS_COND_QKV_BIAS, 2, D(MPS_DIM_KV, MPS_DIM_HD), 0, 0, MPS_INIT_ZEROS, 0,
      "model.layers.%d.self_attn.k_proj.bias", 2, 0 },
    { "vw", LAYER, ALWAYS, 3, D(MPS_DIM_KV, MPS_DIM_HD, MPS_DIM_C), 0, 1, MPS_INIT_NORMAL, 0,
      "model.layers.%d.self_attn.v_proj.weight", 2, 0 },
    { "vb", LAYER, MPS_COND_QKV_BIAS, 2, D(MPS_DIM_KV, MPS_DIM_HD), 0, 0, MPS_INIT_ZEROS, 0,
      "model.layers.%d.self_attn.v_proj.bias", 2, 0 },
    /* (C out, H, hd in): row-parallel by heads */
    { "ow", LAYER, ALWAYS, 3, D(MPS_DIM_C, MPS_DIM_H, MPS_DIM_HD), 1, 1, MPS_INIT_NORMAL, 0,
      "model.layers.%d.self_attn.o_proj.weight", 1, 0 },
    { "ln2w", LAYER, ALWAYS, 1, D(MPS_DIM_C), -1, 0, MPS_INIT_ONES, 0,
      "model.layers.%d.post_attention_layernorm.weight", 1, 0 },
    /* (F out, C in): column-parallel, gate and up each split on its own */
    { "gatew", LAYER, ALWAYS, 2, D(MPS_DIM_F, MPS_DIM_C), 0, 1, MPS_INIT_NORMAL, 0,
      "model.layers.%d.mlp.gate_proj.weight", 1, 0 },
    { "upw", LAYER, ALWAYS, 2, D(MPS_DIM_F, MPS_DIM_C), 0, 1, MPS_INIT_NORMAL, 0, "model.layers.%d.mlp.up_proj.weight",
      1, 0 },
    /* (C out, F in): row-parallel */
    { "downw", LAYER, ALWAYS, 2, D(MPS_DIM_C, MPS_DIM_F), 1, 1, MPS_INIT_NORMAL, 0,
      "model.layers.%d.mlp.down_proj.weight", 1, 0 },
    { "lnfw", MPS_PLACE_FINAL, ALWAYS, 1, D(MPS_DIM_C), -1, 0, MPS_INIT_ONES, 0, "model.norm.weight", 1, 0 },
    /* (Vp, C): vocab-parallel on the last stage */
    { "lm_head", MPS_PLACE_FINAL, MPS_COND_UNTIED, 2, D(MPS_DIM_VP, MPS_DIM_C), 0, 1, MPS_INIT_NORMAL, 0,
      "lm_head.weight", 1, 0 },
};
static const char *const llama_buffers[] = { "model.layers.%d.self_attn.rotary_emb.inv_freq", NULL };

const mps_arch mps_arch_llama = {
    "llama", llama_rules, 1, 12, 2, NULL, "lm_head.weight", llama_buffers,
};

const mps_arch *mps_arch_of(mps_arch_id id) { return id == MPS_ARCH_LLAMA ? &mps_arch_llama : &mps_arch_gpt2; }
const char *mps_arch_name(mps_arch_id id) { return mps_arch_of(id)->name; }

int mps_arch_from_name(const char *name)
{
    if (strcmp(name, "gpt2") == 0)
        return MPS_ARCH_GPT2;
    if (strcmp(name, "llama") == 0)
        return MPS_ARCH_LLAMA;
    return -1;
}

int64_t mps_dim_size(const mps_config *cfg, mps_dim d)
{
    switch (d) {
    case MPS_DIM_THREE: return 3;
    case MPS_DIM_C: return cfg->n_embd;
    case MPS_DIM_F: return mps_cfg_ffn(cfg);
    case MPS_DIM_H: return cfg->n_head;
    case MPS_DIM_KV: return mps_cfg_kv_heads(cfg);
    case MPS_DIM_HD: return mps_cfg_head_dim(cfg);
    case MPS_DIM_VP: return cfg->padded_vocab;
    case MPS_DIM_POS: return cfg->n_positions;
    case MPS_DIM_NONE: break;
    }
    return 1;
}

int mps_rule_present(const mps_config *cfg, const mps_tensor_rule *r)
{
    switch (r->cond) {
    case MPS_COND_QKV_BIAS: return cfg->qkv_bias != 0;
    case MPS_COND_UNTIED: return !mps_cfg_tied(cfg);
    case MPS_COND_ALWAYS: break;
    }
    return 1;
}

/* Catalogue position of rule `rule` among the present rules of [from, rule). */
static int present_before(const mps_config *cfg, const mps_arch *a, int from, int rule)
{
    int n = 0;
    for (int i = from; i < rule; i++)
        n += mps_rule_present(cfg, &a->rules[i]);
    return n;
}

int mps_tensor_index(const mps_config *cfg, int rule, int layer)
{
    const mps_arch *a = mps_arch_of(cfg->arch);
    int nl = a->n_embed + a->n_layer_rules;
    if (rule < 0 || rule >= nl + a->n_final || !mps_rule_present(cfg, &a->rules[rule]))
        return -1;
    int embeds = present_before(cfg, a, 0, a->n_embed);
    if (rule < a->n_embed)
        return present_before(cfg, a, 0, rule);
    int per_layer = present_before(cfg, a, a->n_embed, nl);
    if (rule < nl) {
        if (layer < 0 || layer >= cfg->n_layer)
            return -1;
        return embeds + layer * per_layer + present_before(cfg, a, a->n_embed, rule);
    }
    return embeds + cfg->n_layer * per_layer + present_before(cfg, a, nl, rule);
}

/* The rule among [from, to) that is the k-th present one. */
static const mps_tensor_rule *kth_present(const mps_config *cfg, const mps_arch *a, int from, int to, int k)
{
    for (int i = from; i < to; i++)
        if (mps_rule_present(cfg, &a->rules[i]) && k-- == 0)
            return &a->rules[i];
    return NULL;
}

const mps_tensor_rule *mps_tensor_rule_of(const mps_config *cfg, int index, int *layer)
{
    const mps_arch *a = mps_arch_of(cfg->arch);
    int nl = a->n_embed + a->n_layer_rules;
    int embeds = present_before(cfg, a, 0, a->n_embed), per_layer = present_before(cfg, a, a->n_embed, nl);
    *layer = -1;
    if (index < 0)
        return NULL;
    if (index < embeds)
        return kth_present(cfg, a, 0, a->n_embed, index);
    index -= embeds;
    if (index < cfg->n_layer * per_layer) {
        *layer = index / per_layer;
        return kth_present(cfg, a, a->n_embed, nl, index % per_layer);
    }
    return kth_present(cfg, a, nl, nl + a->n_final, index - cfg->n_layer * per_layer);
}

void mps_hf_tensor(const mps_config *cfg, int index, char *key, size_t keylen, int *ndim, int64_t shape[2],
                   int *transpose)
{
    int layer;
    const mps_tensor_rule *r = mps_tensor_rule_of(cfg, index, &layer);
    /* the key patterns are this file's literals, with one %d in a layer tensor's */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wformat-nonliteral"
    snprintf(key, keylen, r->hf_key, layer);
#pragma GCC diagnostic pop
    int64_t rows = 1, cols = 1;
    for (int d = 0; d < r->ndim; d++) {
        int64_t n = mps_dim_size(cfg, r->dims[d]);
        if (d == 0 && r->dims[0] == MPS_DIM_VP)
            n = cfg->vocab; /* the file has no padding rows */
        if (d < r->hf_row_dims)
            rows *= n;
        else
            cols *= n;
    }
    *transpose = r->hf_transpose;
    *ndim = r->hf_row_dims < r->ndim ? 2 : 1;
    shape[0] = r->hf_transpose ? cols : rows;
    shape[1] = r->hf_transpose ? rows : cols;
}

void mps_arch_block_widths(const mps_config *cfg, int tp, mps_block_widths *w)
{
    const int64_t hs = mps_cfg_head_dim(cfg), heads = cfg->n_head / tp, kv = mps_cfg_kv_heads(cfg) / tp;
    w->heads = heads;
    w->attn = heads * hs;
    w->ffn = mps_cfg_ffn(cfg) / tp;
    if (cfg->arch == MPS_ARCH_GPT2) {
        w->qkv = 3 * w->attn;
        w->fc = w->ffn;
        w->wide = cfg->n_embd > w->ffn ? cfg->n_embd : w->ffn;
        if (w->qkv > w->wide)
            w->wide = w->qkv;
    } else { /* q, then k and v of the kv heads; gate, then up; the backward's widest gradient, then an
              * (N, C) sum or the attention output's gradient (N, attn: wider than C where the
              * model's head_dim makes it so) */
        w->qkv = (heads + 2 * kv) * hs;
        w->fc = 2 * w->ffn;
        w->wide = (w->ffn > w->qkv ? w->ffn : w->qkv) + (cfg->n_embd > w->attn ? cfg->n_embd : w->attn);
    }
}

/* What mpshard's trainer keeps per layer and micro-batch (train/engine.c alloc_acts), per token:
 * in fp32 the layer input and the residual after attention (2C), the two norms' statistics (4)
 * and the attention's row log-sum-exp per local head; in the activation dtype the two norm
 * outputs (2C, whole on every TP rank: no sequence parallelism), q|k|v, the attention output, the
 * MLP's first product(s) and its activation. No attention scores: the attention is flash-style,
 * so selective recomputation changes nothing. Full recomputation keeps the fp32 input alone. */
long double mps_arch_layer_activation_bytes(const mps_config *cfg, int64_t seq, int64_t micro_batch, int tp,
                                            int recompute, int act_bytes)
{
    const long double tokens = (long double)seq * (long double)micro_batch, c = cfg->n_embd;
    if (recompute == 2)
        return tokens * 4.0L * c;
    mps_block_widths w;
    mps_arch_block_widths(cfg, tp, &w);
    const long double fp32 = 4.0L * (2.0L * c + 4.0L + (long double)w.heads);
    const long double act = (long double)act_bytes * (2.0L * c + (long double)(w.qkv + w.attn + w.fc + w.ffn));
    return tokens * (fp32 + act);
}
