/* llm.c model files (karpathy/llm.c train_gpt2.c / train_gpt2.cu gpt2_write_to_checkpoint).
 *
 * Header: 256 int32 little-endian: [0] magic 20240326, [1] version (3: f32, 5: bf16), [2] maxT,
 * [3] V, [4] L, [5] NH, [6] C, [7] Vp. Then the parameters packed, all (out, in), layers stacked:
 * wte (Vp, C), wpe (maxT, C), ln1w (L, C), ln1b (L, C), qkvw (L, 3C, C), qkvb (L, 3C),
 * attprojw (L, C, C), attprojb (L, C), ln2w, ln2b (L, C), fcw (L, 4C, C), fcb (L, 4C),
 * fcprojw (L, C, 4C), fcprojb (L, C), lnfw (C), lnfb (C). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "modelfile_internal.h"

#define LLMC_MAGIC 20240326
#define LLMC_HEADER_BYTES 1024

/* Records tensor t of f's config as the next one in the packed parameters: at *off, which it moves
 * past the tensor, named `key` in messages (its canonical name if NULL). */
static void place_next(mps_model_file *f, int t, const char *key, int64_t *off)
{
    mps_tensor_spec spec;
    mps_tensor_spec_get(&f->cfg, t, &spec);
    mps_src *s = &f->src[t];
    snprintf(s->key, sizeof s->key, "%s", key ? key : spec.name);
    s->offset = *off;
    s->dtype = f->dtype == MPS_DTYPE_BF16 ? MPS_SRC_BF16 : MPS_SRC_F32;
    s->numel = mps_tensor_numel(&spec);
    *off += s->numel * (int64_t)mps_dtype_size(f->dtype);
}

int mps_llmc_open(mps_model_file *f, const mps_model_file_opts *opts, mps_err *err)
{
    const char *path = f->path;
    int32_t h[256];
    if (f->file_size < LLMC_HEADER_BYTES)
        return mps_fail(err, MPS_ECORRUPT, "%s: %lld bytes is shorter than the 1024-byte llm.c header", path,
                        (long long)f->file_size);
    if (mps_pread_full(f->fd, path, h, sizeof h, 0, err) != 0)
        return -1;
    if (h[0] != LLMC_MAGIC)
        return mps_fail(err, MPS_ECORRUPT, "%s: bad magic %d (an llm.c model file starts with %d)", path, h[0],
                        LLMC_MAGIC);
    mps_dtype dtype;
    if (h[1] == 3)
        dtype = MPS_DTYPE_F32;
    else if (h[1] == 5)
        dtype = MPS_DTYPE_BF16;
    else
        return mps_fail(err, MPS_EUNSUPPORTED, "%s: llm.c model version %d is not supported (3: f32, 5: bf16)", path,
                        h[1]);
    static const char *const names[] = { "maxT", "V", "L", "NH", "C", "Vp" };
    for (int i = 2; i < 8; i++)
        if (h[i] <= 0)
            return mps_fail(err, MPS_ECORRUPT, "%s: header %s=%d must be positive", path, names[i - 2], h[i]);
    mps_config *cfg = &f->cfg;
    cfg->n_positions = h[2];
    cfg->vocab = h[3];
    cfg->n_layer = h[4];
    cfg->n_head = h[5];
    cfg->n_embd = h[6];
    cfg->padded_vocab = h[7];
    if (cfg->padded_vocab < cfg->vocab)
        return mps_fail(err, MPS_ECORRUPT, "%s: header Vp=%d is smaller than V=%d", path, h[7], h[3]);
    mps_err e2 = { 0 };
    if (mps_config_validate(cfg, &e2) != 0)
        return mps_fail(err, MPS_ECORRUPT, "%s: header: %s", path, e2.msg);
    if (opts->padded_vocab && opts->padded_vocab != cfg->padded_vocab)
        return mps_fail(err, MPS_EUSAGE, "--padded-vocab %lld: %s stores wte with its own padded vocabulary Vp=%d",
                        (long long)opts->padded_vocab, path, h[7]);
    f->dtype = dtype;

    /* Validated limits keep every product below 2^62 elements. The size the header implies is
     * checked against the file's before the tensor table is allocated: a header claiming a huge L
     * costs nothing. Per layer: 12 C^2 (qkvw 3, attprojw 1, fcw 4, fcprojw 4) + 13 C (biases, norms). */
    size_t es = mps_dtype_size(dtype);
    int64_t L = cfg->n_layer, C = cfg->n_embd;
    int64_t implied = LLMC_HEADER_BYTES + (int64_t)es * (cfg->padded_vocab * C + (int64_t)cfg->n_positions * C +
                                                         L * (12 * C * C + 13 * C) + 2 * C);
    if (implied != f->file_size)
        return mps_fail(err, MPS_ECORRUPT, "%s: file is %lld bytes but its header (L=%d, C=%d, Vp=%d, maxT=%d, %s) "
                        "implies %lld (%s)", path, (long long)f->file_size, h[4], h[6], h[7], h[2],
                        mps_dtype_name(dtype), (long long)implied,
                        f->file_size < implied ? "truncated" : "trailing bytes");
    f->nsrc = mps_tensor_count(cfg);
    f->src = calloc((size_t)f->nsrc, sizeof *f->src);
    if (f->src == NULL)
        return mps_fail(err, MPS_ENOMEM, "%s: out of memory", path);
    int64_t off = LLMC_HEADER_BYTES;
    for (int t = 0; t < 2; t++) /* wte, wpe */
        place_next(f, t, NULL, &off);
    for (int slot = 0; slot < MPS_TENSORS_PER_LAYER; slot++) {
        for (int l = 0; l < L; l++) {
            char key[sizeof f->src[0].key];
            snprintf(key, sizeof key, "%s[%d]", mps_layer_slot_names[slot], l);
            place_next(f, mps_layer_tensor(l, slot), key, &off);
        }
    }
    for (int t = mps_tensor_lnfw(cfg); t <= mps_tensor_lnfb(cfg); t++)
        place_next(f, t, NULL, &off);
    if (off != implied) /* the closed form above and the walk must agree */
        return mps_fail(err, MPS_EFAIL, "%s: internal: tensor table ends at %lld, expected %lld", path, (long long)off,
                        (long long)implied);
    return 0;
}

int mps_llmc_create(const char *dir, const mps_config *cfg, mps_dtype dtype, int64_t step, mps_out_file **out,
                    mps_err *err)
{
    *out = NULL;
    if (mps_config_validate(cfg, err) != 0)
        return -1;
    if (cfg->arch != MPS_ARCH_GPT2)
        return mps_fail(err, MPS_EUNSUPPORTED, "%s: llm.c model files hold GPT-2 models only, this is a %s model "
                        "(export it with --format safetensors)", dir, mps_family_name(cfg->family));
    if (dtype != MPS_DTYPE_F32 && dtype != MPS_DTYPE_BF16)
        return mps_fail(err, MPS_EUSAGE, "%s: llm.c model files hold f32 or bf16, not %s", dir, mps_dtype_name(dtype));
    if (step < 0 || step > 99999999)
        return mps_fail(err, MPS_EUSAGE, "%s: step %lld out of range for model_%%08d.bin", dir, (long long)step);
    if (cfg->padded_vocab > INT32_MAX)
        return mps_fail(err, MPS_EUNSUPPORTED, "%s: padded_vocab %lld does not fit the llm.c header", dir,
                        (long long)cfg->padded_vocab);
    int nitems = mps_tensor_count(cfg);
    mps_out_item *items = calloc((size_t)nitems, sizeof *items);
    if (items == NULL)
        return mps_fail(err, MPS_ENOMEM, "%s: out of memory", dir);
    int k = 0;
    mps_tensor_spec spec;
    items[k++].tensor = MPS_TENSOR_WTE;
    items[k++].tensor = MPS_TENSOR_WPE;
    for (int slot = 0; slot < MPS_TENSORS_PER_LAYER; slot++)
        for (int l = 0; l < cfg->n_layer; l++)
            items[k++].tensor = mps_layer_tensor(l, slot);
    items[k++].tensor = mps_tensor_lnfw(cfg);
    items[k++].tensor = mps_tensor_lnfb(cfg);
    int64_t total = LLMC_HEADER_BYTES;
    for (int i = 0; i < nitems; i++) {
        mps_tensor_spec_get(cfg, items[i].tensor, &spec);
        items[i].transpose = 0;
        items[i].rows = spec.shape[0];
        total += mps_out_item_bytes(cfg, &items[i], dtype);
    }
    int32_t h[256];
    memset(h, 0, sizeof h);
    h[0] = LLMC_MAGIC;
    h[1] = dtype == MPS_DTYPE_BF16 ? 5 : 3;
    h[2] = cfg->n_positions;
    h[3] = (int32_t)cfg->vocab;
    h[4] = cfg->n_layer;
    h[5] = cfg->n_head;
    h[6] = cfg->n_embd;
    h[7] = (int32_t)cfg->padded_vocab;
    char name[32];
    snprintf(name, sizeof name, "model_%08lld.bin", (long long)step);
    mps_out_file *f;
    if (mps_out_file_begin(dir, name, dtype, items, nitems, total, NULL, NULL, &f, err) != 0)
        return -1;
    if (mps_out_file_write(f, h, sizeof h, err) != 0) {
        mps_out_file_abort(f);
        return -1;
    }
    *out = f;
    return 0;
}
