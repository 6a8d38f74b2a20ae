/* Compares two checkpoints of the same model, whatever their layouts: every stored kind of every
 * tensor, element by element (bit for bit), plus the scalar state. Streams in bands. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckpt.h"

int mps_ckpt_compare(const char *dir_a, const char *dir_b, int64_t budget, mps_ckpt_diff_fn report, void *ctx,
                     mps_err *err)
{
    mps_ckpt *a = NULL, *b = NULL;
    if (mps_ckpt_open(dir_a, &a, err) != 0 || mps_ckpt_open(dir_b, &b, err) != 0) {
        mps_ckpt_close(a);
        return -1;
    }
    const mps_manifest *ma = mps_ckpt_manifest(a), *mb = mps_ckpt_manifest(b);
    const mps_config *ca = &ma->cfg, *cb = &mb->cfg;
    char line[512];
    int differences = 0, rc = -1;
    float *x = NULL, *y = NULL;
    mps_read_scratch *sa = mps_read_scratch_new(), *sb = mps_read_scratch_new();
    if (memcmp(ca, cb, sizeof *ca) != 0) {
        report(ctx, "the models differ (n_layer, n_embd, n_head, n_positions or vocab)");
        rc = 1;
        goto out;
    }
    if (ma->step != mb->step || ma->rng_seed != mb->rng_seed || ma->data_position != mb->data_position) {
        snprintf(line, sizeof line, "scalar state differs: step %lld/%lld, rng_seed %llu/%llu, data_position %lld/%lld",
                 (long long)ma->step, (long long)mb->step, (unsigned long long)ma->rng_seed,
                 (unsigned long long)mb->rng_seed, (long long)ma->data_position, (long long)mb->data_position);
        report(ctx, line);
        differences++;
    }
    if (ma->kinds != mb->kinds) {
        report(ctx, "the checkpoints store different state kinds");
        differences++;
    }
    int64_t band = budget / 2 / (int64_t)sizeof(float);
    x = malloc((size_t)band * sizeof(float));
    y = malloc((size_t)band * sizeof(float));
    if (!x || !y || !sa || !sb) {
        mps_fail(err, MPS_ENOMEM, "out of memory");
        goto out;
    }
    for (int k = 0; k < MPS_KIND_COUNT; k++) {
        if (!(ma->kinds & mb->kinds & (1u << k)))
            continue;
        for (int t = 0; t < mps_tensor_count(ca); t++) {
            mps_tensor_spec spec;
            mps_tensor_spec_get(ca, t, &spec);
            mps_box box;
            mps_box_whole(&spec, &box);
            int64_t n = mps_tensor_numel(&spec), ndiff = 0;
            for (int64_t f = 0; f < n; f += band) {
                int64_t e = f + band < n ? f + band : n;
                if (mps_ckpt_gather(a, sa, (mps_kind)k, t, &box, f, e, x, err) != 0 ||
                    mps_ckpt_gather(b, sb, (mps_kind)k, t, &box, f, e, y, err) != 0)
                    goto out;
                if (memcmp(x, y, (size_t)(e - f) * sizeof(float)) != 0)
                    for (int64_t i = 0; i < e - f; i++)
                        ndiff += memcmp(&x[i], &y[i], sizeof(float)) != 0;
            }
            if (ndiff) {
                snprintf(line, sizeof line, "%s (%s): %lld of %lld elements differ", spec.name, mps_kind_name((mps_kind)k),
                         (long long)ndiff, (long long)n);
                report(ctx, line);
                differences++;
            }
        }
    }
    rc = differences ? 1 : 0;
out:
    free(x);
    free(y);
    mps_read_scratch_free(sa);
    mps_read_scratch_free(sb);
    mps_ckpt_close(a);
    mps_ckpt_close(b);
    return rc;
}
