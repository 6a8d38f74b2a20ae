/* Synthetic models of any architecture: a deterministic value per (seed, tensor, element), streamed into a
 * model file in bounded memory.
 *
 * Each value is a hash (splitmix64) of the element, turned into an approximately normal number by
 * summing its four 16-bit parts (Irwin-Hall, 4 terms: within +-3.46 sigma). The scale has at most
 * 6 significant bits so that the product with the integer sum is exact in f32: the result is the
 * same bit pattern whatever the compiler does (FMA contraction included). */
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "arch.h"
#include "modelfile_internal.h"
#include "progress.h"

typedef struct {
    uint64_t key;
    float scale;       /* per unit of the centred 4 x 16-bit sum */
    float mean;
    int64_t zero_from; /* flat index from which values are 0 (wte padding rows) */
} synth_params;

static inline uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static void synth_params_get(const mps_config *cfg, uint64_t seed, int index, synth_params *p)
{
    /* std of the centred sum is 65536/sqrt(3); 71 * 2^-27 * 65536 / sqrt(3) = 0.02002 */
    const float w_scale = ldexpf(71.0f, -27), b_scale = ldexpf(71.0f, -28);
    p->key = mix64(seed ^ mix64(0x6d707368617264ULL + (uint64_t)index));
    p->zero_from = INT64_MAX;
    p->mean = 0.0f;
    p->scale = w_scale;
    mps_tensor_spec spec;
    mps_tensor_spec_get(cfg, index, &spec);
    int layer;
    if (mps_tensor_rule_of(cfg, index, &layer)->dims[0] == MPS_DIM_VP) /* padded vocab rows are zero */
        p->zero_from = cfg->vocab * (mps_tensor_numel(&spec) / spec.shape[0]);
    if (spec.init == MPS_INIT_ONES)
        p->mean = 1.0f; /* norm weights */
    else if (spec.init == MPS_INIT_ZEROS)
        p->scale = b_scale; /* biases */
}

static inline float synth_elem(const synth_params *p, int64_t flat)
{
    if (flat >= p->zero_from)
        return 0.0f;
    uint64_t h = mix64(p->key + ((uint64_t)flat + 1) * 0x9e3779b97f4a7c15ULL);
    int32_t d = (int32_t)((h & 0xffff) + ((h >> 16) & 0xffff) + ((h >> 32) & 0xffff) + (h >> 48)) - 131070;
    float v = (float)d * p->scale; /* exact */
    return p->mean + v;
}

float mps_synth_value(const mps_config *cfg, uint64_t seed, int index, int64_t flat)
{
    synth_params p;
    synth_params_get(cfg, seed, index, &p);
    return synth_elem(&p, flat);
}

#define BLOCK_ELEMS ((size_t)1 << 18) /* 1 MiB of f32 */

int mps_synth_write(const char *dir, const mps_config *cfg, mps_file_format format, mps_dtype dtype, uint64_t seed,
                    mps_err *err)
{
    return mps_synth_write_sharded(dir, cfg, format, dtype, seed, 0, err);
}

int mps_synth_write_sharded(const char *dir, const mps_config *cfg, mps_file_format format, mps_dtype dtype,
                            uint64_t seed, int64_t max_shard_bytes, mps_err *err)
{
    return mps_synth_write_progress(dir, cfg, format, dtype, seed, max_shard_bytes, NULL, err);
}

int mps_synth_write_progress(const char *dir, const mps_config *cfg, mps_file_format format, mps_dtype dtype,
                             uint64_t seed, int64_t max_shard_bytes, struct mps_progress *progress, mps_err *err)
{
    mps_out_file *f;
    int rc;
    if (format == MPS_FILE_SAFETENSORS)
        rc = mps_safetensors_create(dir, cfg, dtype, NULL, max_shard_bytes, &f, err);
    else if (format == MPS_FILE_LLMC)
        rc = mps_llmc_create(dir, cfg, dtype, 0, &f, err);
    else
        return mps_fail(err, MPS_EUSAGE, "synth: choose an output format (safetensors or llmc)");
    if (rc != 0)
        return -1;
    float *blk = malloc(BLOCK_ELEMS * sizeof(float));
    uint16_t *half = dtype != MPS_DTYPE_F32 ? malloc(BLOCK_ELEMS * sizeof(uint16_t)) : NULL;
    if (blk == NULL || (dtype != MPS_DTYPE_F32 && half == NULL)) {
        free(blk);
        free(half);
        mps_out_file_abort(f);
        return mps_fail(err, MPS_ENOMEM, "synth: out of memory");
    }
    const mps_out_item *items;
    int nitems;
    mps_out_file_items(f, &items, &nitems);
    int64_t total = 0;
    for (int i = 0; i < nitems; i++)
        total += mps_out_item_bytes(cfg, &items[i], dtype);
    mps_progress_set_total(progress, total);
    size_t n = 0;
#define FLUSH()                                                                                  \
    do {                                                                                         \
        if (dtype != MPS_DTYPE_F32) {                                                            \
            for (size_t j = 0; j < n; j++)                                                       \
                half[j] = dtype == MPS_DTYPE_BF16 ? mps_f32_to_bf16(blk[j]) : mps_f32_to_f16(blk[j]); \
            rc = mps_out_file_write(f, half, n * sizeof(uint16_t), err);                         \
        } else {                                                                                 \
            rc = mps_out_file_write(f, blk, n * sizeof(float), err);                             \
        }                                                                                        \
        mps_progress_add(progress, (int64_t)(n * mps_dtype_size(dtype)));                        \
        n = 0;                                                                                   \
        if (rc != 0)                                                                             \
            goto fail;                                                                           \
    } while (0)
    for (int i = 0; i < nitems; i++) {
        const mps_out_item *it = &items[i];
        mps_tensor_spec spec;
        mps_tensor_spec_get(cfg, it->tensor, &spec);
        synth_params p;
        synth_params_get(cfg, seed, it->tensor, &p);
        int64_t numel = mps_tensor_numel(&spec);
        if (it->transpose) {
            /* file matrix (K, R) holds the canonical (R, K) view transposed */
            int64_t K = spec.shape[spec.ndim - 1], R = numel / K;
            for (int64_t r = 0; r < K; r++) {
                int64_t flat = r;
                for (int64_t c = 0; c < R; c++, flat += K) {
                    blk[n++] = synth_elem(&p, flat);
                    if (n == BLOCK_ELEMS)
                        FLUSH();
                }
            }
        } else {
            int64_t count = it->rows * (numel / spec.shape[0]);
            for (int64_t flat = 0; flat < count;) {
                int64_t m = count - flat;
                if (m > (int64_t)(BLOCK_ELEMS - n))
                    m = (int64_t)(BLOCK_ELEMS - n);
                for (int64_t j = 0; j < m; j++)
                    blk[n + (size_t)j] = synth_elem(&p, flat + j);
                n += (size_t)m;
                flat += m;
                if (n == BLOCK_ELEMS)
                    FLUSH();
            }
        }
    }
    if (n > 0)
        FLUSH();
#undef FLUSH
    free(blk);
    free(half);
    return mps_out_file_finish(f, err);
fail:
    free(blk);
    free(half);
    mps_out_file_abort(f);
    return -1;
}
