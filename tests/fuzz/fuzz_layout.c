/* Fuzz target: layout strings (mps_layout_parse) against a few models. An accepted layout must be
 * consistent, print to a string that parses back to the same layout, and give every rank a
 * valid piece of every tensor. Input: the layout string. */
#include "fuzz_common.h"
#include "geometry.h"
#include "layout.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define GPT2(L, C, H, T, V, VP) { .n_layer = L, .n_embd = C, .n_head = H, .n_positions = T, .vocab = V, .padded_vocab = VP }
static const mps_config configs[] = {
    GPT2(3, 96, 6, 64, 1000, 1024),       /* the suite's small model */
    GPT2(12, 768, 12, 1024, 50257, 50304), /* gpt2 */
    GPT2(1, 4, 1, 4, 8, 128),             /* one layer, one head */
    GPT2(256, 8, 8, 8, 8, 8),             /* as many layers as the largest pipeline */
    /* a Llama-family model: 8 query heads over 4 kv heads, untied head, q/k/v biases */
    { .n_layer = 5, .n_embd = 64, .n_head = 8, .n_positions = 32, .vocab = 300, .padded_vocab = 384,
      .arch = MPS_ARCH_LLAMA, .family = MPS_FAMILY_QWEN2, .n_kv_head = 4, .ffn = 96, .untied = 1, .qkv_bias = 1,
      .norm_eps = 1e-6, .rope_theta = 10000 },
};

static void check_layout(const mps_layout *L, const mps_config *cfg, const char *text)
{
    FUZZ_ASSERT(L->dp >= 1 && L->pp >= 1 && L->tp >= 1 && L->zero >= 0 && L->zero <= 3, "%s", text);
    FUZZ_ASSERT((int64_t)L->dp * L->pp * L->tp <= (1 << 24), "%s: world too large", text);
    FUZZ_ASSERT(L->pp <= MPS_MAX_PP && L->pp <= cfg->n_layer && cfg->n_head % L->tp == 0, "%s", text);
    FUZZ_ASSERT(L->stage_first[0] == 0 && L->stage_first[L->pp] == cfg->n_layer, "%s: stages", text);
    for (int s = 0; s < L->pp; s++)
        FUZZ_ASSERT(L->stage_first[s + 1] > L->stage_first[s], "%s: empty stage %d", text, s);
    for (int l = 0; l < cfg->n_layer; l++) {
        int s = mps_layout_stage_of_layer(L, l);
        FUZZ_ASSERT(s >= 0 && s < L->pp && l >= L->stage_first[s] && l < L->stage_first[s + 1], "%s: layer %d", text, l);
    }
    /* the canonical form parses back to the same layout */
    char buf[8192];
    mps_layout_format(L, buf, sizeof buf);
    mps_layout L2;
    mps_err err;
    mps_err_clear(&err);
    FUZZ_ASSERT(mps_layout_parse(buf, cfg, &L2, &err) == 0, "%s -> %s: %s", text, buf, err.msg);
    FUZZ_ASSERT(L2.dp == L->dp && L2.pp == L->pp && L2.tp == L->tp && L2.zero == L->zero, "%s -> %s", text, buf);
    for (int s = 0; s <= L->pp; s++)
        FUZZ_ASSERT(L2.stage_first[s] == L->stage_first[s], "%s -> %s: stage %d", text, buf, s);
    /* a few ranks: every piece lies inside its tensor */
    int world = mps_layout_world(L);
    int ranks[3] = { 0, world / 2, world - 1 };
    for (int i = 0; i < 3; i++)
        for (int t = 0; t < mps_tensor_count(cfg); t += 7) {
            mps_tensor_spec spec;
            mps_tensor_spec_get(cfg, t, &spec);
            mps_piece p;
            mps_geometry(cfg, L, ranks[i], MPS_KIND_ADAM_M, t, &p);
            if (!p.held)
                continue;
            for (int d = 0; d < spec.ndim; d++)
                FUZZ_ASSERT(p.box.off[d] >= 0 && p.box.cnt[d] >= 0 && p.box.off[d] + p.box.cnt[d] <= spec.shape[d],
                            "%s: rank %d tensor %s", text, ranks[i], spec.name);
            FUZZ_ASSERT(p.flat_begin >= 0 && p.flat_begin <= p.flat_end && p.flat_end <= mps_box_numel(&p.box),
                        "%s: rank %d tensor %s: flat range", text, ranks[i], spec.name);
        }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = malloc(size + 1);
    if (!text)
        return 0;
    memcpy(text, data, size);
    text[size] = '\0';
    for (size_t c = 0; c < sizeof configs / sizeof configs[0]; c++) {
        mps_layout L;
        mps_err err;
        mps_err_clear(&err);
        if (mps_layout_parse(text, &configs[c], &L, &err) != 0) {
            fuzz_check_err(&err, "parse");
            FUZZ_ASSERT(err.code == MPS_EUSAGE, "code %d: %s", err.code, err.msg);
            FUZZ_ASSERT(strstr(err.msg, "--layout") != NULL, "message does not name --layout: %s", err.msg);
            continue;
        }
        check_layout(&L, &configs[c], text);
    }
    free(text);
    return 0;
}
