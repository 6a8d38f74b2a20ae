/* Compares two sides tensor by tensor, in bands: a checkpoint side is gathered from whatever
 * pieces hold the band (any layout), a model-file side reads each tensor whole once and serves its
 * bands from memory. Elements are equal when their bits are (NaN and -0 included), or, with a
 * tolerance, when |a - b| <= atol + rtol * |b|. */
#include "compare.h"

#include <dirent.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "arch.h"
#include "ckpt.h"
#include "modelfile.h"

typedef struct {
    const char *path;
    mps_ckpt *ck;              /* a checkpoint, or */
    mps_read_scratch *scratch;
    mps_model_file *mf;        /* a model file */
    float *whole;              /* the model file's tensor `whole_t` */
    int whole_t;
    const mps_config *cfg;
    int stores_padding;        /* the padded vocab rows of wte are stored (checkpoints, llm.c files) */
} side;

/* a checkpoint directory, or a run directory whose latest is one */
static int is_checkpoint(const char *path)
{
    char dir[4200], manifest[4400];
    mps_err err;
    mps_err_clear(&err);
    if (mps_ckpt_resolve(path, dir, sizeof dir, &err) < 0)
        return 0;
    snprintf(manifest, sizeof manifest, "%s/" MPS_MANIFEST_NAME, dir);
    return access(manifest, F_OK) == 0;
}

/* a file, or a directory holding model.safetensors or the index of its parts (what export and
 * synth write, and transformers' save_pretrained) */
static int is_model_file(const char *path)
{
    struct stat st;
    char inner[4200];
    if (stat(path, &st) != 0)
        return 0;
    if (!S_ISDIR(st.st_mode))
        return 1;
    snprintf(inner, sizeof inner, "%s/model.safetensors", path);
    if (access(inner, F_OK) == 0)
        return 1;
    snprintf(inner, sizeof inner, "%s/model.safetensors.index.json", path);
    return access(inner, F_OK) == 0;
}

/* A directory of llm.c files is no model file by itself: the user names the one meant. */
static int refuse_llmc_dir(const char *path, mps_err *err)
{
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode) || is_model_file(path))
        return 0;
    DIR *d = opendir(path);
    struct dirent *e;
    char found[256] = "";
    while (d && (e = readdir(d)) != NULL) {
        size_t n = strlen(e->d_name);
        if (n > 10 && n < sizeof found && strncmp(e->d_name, "model_", 6) == 0 && strcmp(e->d_name + n - 4, ".bin") == 0)
            snprintf(found, sizeof found, "%s", e->d_name);
    }
    if (d)
        closedir(d);
    if (!found[0])
        return 0;
    return mps_fail(err, MPS_EUSAGE, "%s is neither a checkpoint nor a safetensors model directory; to compare its "
                    "llm.c model file, name it: %s/%s", path, path, found);
}

static int side_open(side *s, const char *path, int ckpt, mps_err *err)
{
    memset(s, 0, sizeof *s);
    s->path = path;
    s->whole_t = -1;
    if (ckpt) {
        if (mps_ckpt_open(path, &s->ck, err) != 0)
            return -1;
        s->cfg = &mps_ckpt_manifest(s->ck)->cfg;
        s->stores_padding = 1;
        if (!(s->scratch = mps_read_scratch_new()))
            return mps_fail(err, MPS_ENOMEM, "out of memory");
        return 0;
    }
    mps_model_file_opts fo = { 0 };
    if (refuse_llmc_dir(path, err) != 0 || mps_model_file_open(path, &fo, &s->mf, err) != 0)
        return -1;
    s->cfg = mps_model_file_config(s->mf);
    s->stores_padding = mps_model_file_format(s->mf) == MPS_FILE_LLMC;
    return 0;
}

static void side_close(side *s)
{
    mps_read_scratch_free(s->scratch);
    mps_ckpt_close(s->ck);
    mps_model_file_close(s->mf);
    free(s->whole);
}

/* elements [f, e) of the tensor (canonical row-major order) into dst */
static int side_read(side *s, mps_kind kind, int t, int64_t f, int64_t e, float *dst, mps_err *err)
{
    mps_tensor_spec spec;
    mps_tensor_spec_get(s->cfg, t, &spec);
    if (s->ck) {
        mps_box box;
        mps_box_whole(&spec, &box);
        return mps_ckpt_gather(s->ck, s->scratch, kind, t, &box, f, e, dst, err);
    }
    if (s->whole_t != t) {
        free(s->whole);
        s->whole_t = -1;
        if (!(s->whole = malloc((size_t)mps_tensor_numel(&spec) * sizeof(float))))
            return mps_fail(err, MPS_ENOMEM, "%s: out of memory for tensor %s", s->path, spec.name);
        if (mps_model_file_read_tensor(s->mf, t, s->whole, err) != 0)
            return -1;
        s->whole_t = t;
    }
    memcpy(dst, s->whole + f, (size_t)(e - f) * sizeof(float));
    return 0;
}

typedef struct {
    int64_t differ;
    double max_abs, max_rel;
} errors;

static void compare_band(const mps_compare_opts *o, const float *x, const float *y, int64_t n, errors *er)
{
    if (memcmp(x, y, (size_t)n * sizeof(float)) == 0)
        return;
    for (int64_t i = 0; i < n; i++) {
        if (memcmp(&x[i], &y[i], sizeof(float)) == 0)
            continue;
        double a = x[i], b = y[i], d = fabs(a - b);
        int nan = isnan(a) || isnan(b);
        if (nan || isinf(a) || isinf(b))
            d = nan || a != b ? INFINITY : 0; /* inf vs -inf, or a NaN: infinitely far */
        double rel = d == 0 ? 0 : b != 0 && isfinite(d) ? d / fabs(b) : INFINITY;
        if (d > er->max_abs)
            er->max_abs = d;
        if (rel > er->max_rel)
            er->max_rel = rel;
        er->differ += !o->tolerance || !(d <= o->atol + o->rtol * fabs(b));
    }
}

static void report(const mps_compare_opts *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void report(const mps_compare_opts *o, const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (o->report)
        o->report(o->ctx, line);
}

static int same_shape(const mps_config *a, const mps_config *b)
{
    return a->arch == b->arch && a->n_layer == b->n_layer && a->n_embd == b->n_embd && a->n_head == b->n_head &&
           a->n_positions == b->n_positions && a->vocab == b->vocab && mps_cfg_kv_heads(a) == mps_cfg_kv_heads(b) &&
           mps_cfg_ffn(a) == mps_cfg_ffn(b) && mps_cfg_tied(a) == mps_cfg_tied(b) && a->qkv_bias == b->qkv_bias;
}

/* One (tensor, kind): counts and the largest errors into res, a line when it differs. */
static int compare_tensor(side *a, side *b, mps_kind kind, int t, float *x, float *y, int64_t band,
                          const mps_compare_opts *o, mps_compare_result *res, mps_err *err)
{
    mps_tensor_spec spec;
    mps_tensor_spec_get(a->cfg, t, &spec);
    int64_t n = mps_tensor_numel(&spec);
    /* the padded vocab rows (the embedding's, an untied head's) only where both sides store them,
     * and the same number of them */
    int layer;
    const mps_tensor_rule *rule = mps_tensor_rule_of(a->cfg, t, &layer);
    if (rule && rule->dims[0] == MPS_DIM_VP &&
        (!a->stores_padding || !b->stores_padding || a->cfg->padded_vocab != b->cfg->padded_vocab))
        n = n / spec.shape[0] * a->cfg->vocab;
    errors er = { 0 };
    for (int64_t f = 0; f < n; f += band) {
        int64_t e = f + band < n ? f + band : n;
        if (side_read(a, kind, t, f, e, x, err) != 0 || side_read(b, kind, t, f, e, y, err) != 0)
            return -1;
        compare_band(o, x, y, e - f, &er);
    }
    char at[80];
    snprintf(at, sizeof at, "%s (%s)", spec.name, mps_kind_name(kind));
    res->tensors++;
    res->elements += n;
    res->elements_differ += er.differ;
    res->tensors_differ += er.differ > 0;
    if (er.max_abs > res->max_abs) {
        res->max_abs = er.max_abs;
        snprintf(res->max_abs_at, sizeof res->max_abs_at, "%s", at);
    }
    if (er.max_rel > res->max_rel) {
        res->max_rel = er.max_rel;
        snprintf(res->max_rel_at, sizeof res->max_rel_at, "%s", at);
    }
    if (!o->tolerance && er.differ)
        report(o, "%s: %lld of %lld elements differ (max abs diff %.3g)", at, (long long)er.differ, (long long)n,
               er.max_abs);
    else if (!o->tolerance && o->per_tensor)
        report(o, "%s: identical, %lld elements", at, (long long)n);
    else if (er.differ || o->per_tensor)
        report(o, "%s: max abs error %.3g, max rel error %.3g; %lld of %lld elements outside tolerance", at, er.max_abs,
               er.max_rel, (long long)er.differ, (long long)n);
    return 0;
}

int mps_compare(const char *pa, const char *pb, const mps_compare_opts *o, mps_compare_result *res, mps_err *err)
{
    memset(res, 0, sizeof *res);
    int ca = is_checkpoint(pa), cb = is_checkpoint(pb);
    /* one checkpoint makes it a checkpoint comparison: the other one, unless a model file, is then
     * refused as what it is (a crashed run's staging directory, a damaged manifest) */
    if (ca != cb && refuse_llmc_dir(ca ? pb : pa, err) != 0)
        return -1;
    if (ca != cb && is_model_file(ca ? pb : pa))
        res->what = MPS_COMPARE_CKPT_MODEL;
    else if (ca || cb)
        ca = cb = 1, res->what = MPS_COMPARE_CKPTS;
    else
        res->what = MPS_COMPARE_MODELS;
    side a, b;
    memset(&b, 0, sizeof b);
    float *x = NULL, *y = NULL;
    int rc = -1;
    if (side_open(&a, pa, ca, err) != 0 || side_open(&b, pb, cb, err) != 0)
        goto out;
    int64_t budget = o->budget > 0 ? o->budget : (int64_t)256 << 20;
    int64_t band = budget / 2 / (int64_t)sizeof(float);
    if (!(x = malloc((size_t)band * sizeof(float))) || !(y = malloc((size_t)band * sizeof(float)))) {
        mps_fail(err, MPS_ENOMEM, "out of memory");
        goto out;
    }
    unsigned kinds = 1u << MPS_KIND_PARAM;
    if (res->what == MPS_COMPARE_CKPTS) {
        const mps_manifest *ma = mps_ckpt_manifest(a.ck), *mb = mps_ckpt_manifest(b.ck);
        if (memcmp(&ma->cfg, &mb->cfg, sizeof ma->cfg) != 0) {
            report(o, "the models differ (architecture, n_layer, n_embd, n_head, n_positions, vocab or padded_vocab)");
            res->shapes_differ = 1;
            rc = 1;
            goto out;
        }
        if (ma->step != mb->step || ma->rng_seed != mb->rng_seed || ma->data_position != mb->data_position) {
            report(o, "scalar state differs: step %lld/%lld, rng_seed %llu/%llu, data_position %lld/%lld",
                   (long long)ma->step, (long long)mb->step, (unsigned long long)ma->rng_seed,
                   (unsigned long long)mb->rng_seed, (long long)ma->data_position, (long long)mb->data_position);
            res->state_differs = 1;
        }
        if (ma->kinds != mb->kinds) {
            report(o, "the checkpoints store different state kinds");
            res->state_differs = 1;
        }
        kinds = ma->kinds & mb->kinds;
    } else if (!same_shape(a.cfg, b.cfg)) {
        report(o, "the models differ in shape (architecture, n_layer, n_embd, n_head, n_positions or vocab)");
        res->shapes_differ = 1;
        rc = 1;
        goto out;
    }
    for (int k = 0; k < MPS_KIND_COUNT; k++)
        for (int t = 0; (kinds & (1u << k)) && t < mps_tensor_count(a.cfg); t++)
            if (compare_tensor(&a, &b, (mps_kind)k, t, x, y, band, o, res, err) != 0)
                goto out;
    rc = res->tensors_differ || res->state_differs ? 1 : 0;
out:
    free(x);
    free(y);
    side_close(&a);
    side_close(&b);
    return rc;
}
