/* Model files: synthetic safetensors / llm.c files read back exactly, hand-written safetensors
 * variants, config.json refusals, corrupt inputs, and the writers' round trip. */
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>

#include "modelfile.h"
#include "testutil.h"

static const char *tmp;

static mps_config small_cfg(void)
{
    mps_config c = { .n_layer = 3, .n_embd = 96, .n_head = 6, .n_positions = 64, .vocab = 1000 };
    c.padded_vocab = mps_default_padded_vocab(c.vocab); /* 1024 */
    return c;
}

enum { EXACT, ROUND_BF16, ROUND_F16 };

/* IEEE half precision, round to nearest even (finite values below 65504 only: enough here). */
static uint16_t f32_to_f16(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    float a = fabsf(f);
    if (a < ldexpf(1.0f, -14)) /* subnormal (or rounds up to the smallest normal, also right) */
        return (uint16_t)(sign | (uint16_t)nearbyintf(a * 16777216.0f));
    uint32_t ax = x & 0x7fffffffu, mant = ax & 0x7fffffu;
    uint32_t h = ((((ax >> 23) - 127 + 15) << 10) | (mant >> 13)), rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u)))
        h++;
    return (uint16_t)(sign | h);
}

static float f16_to_f32(uint16_t h)
{
    int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    float v = e == 0 ? ldexpf((float)m, -24) : ldexpf((float)(1024 + m), e - 25);
    return (h & 0x8000) ? -v : v;
}

static float round_as(int how, float x)
{
    if (how == ROUND_BF16)
        return mps_bf16_to_f32(mps_f32_to_bf16(x));
    if (how == ROUND_F16)
        return f16_to_f32(f32_to_f16(x));
    return x;
}

/* Every canonical tensor equals the synthetic values (rounded as stored); padding rows zero. */
static void check_all_tensors(mps_model_file *mf, const mps_config *cfg, uint64_t seed, int how, const char *what)
{
    int bad_tensors = 0;
    for (int t = 0; t < mps_tensor_count(cfg); t++) {
        mps_tensor_spec spec;
        mps_tensor_spec_get(cfg, t, &spec);
        int64_t n = mps_tensor_numel(&spec);
        float *dst = malloc((size_t)n * sizeof(float));
        for (int64_t i = 0; i < n; i++)
            dst[i] = NAN;
        mps_err err = { 0 };
        int rc = mps_model_file_read_tensor(mf, t, dst, &err);
        CHECK_MSG(rc == 0, "%s: read %s: %s", what, spec.name, err.msg);
        int64_t bad = 0, first = -1;
        for (int64_t i = 0; i < n; i++) {
            float want = round_as(how, mps_synth_value(cfg, seed, t, i));
            if (t == MPS_TENSOR_WTE && i >= cfg->vocab * cfg->n_embd)
                want = 0.0f;
            if (memcmp(&want, &dst[i], sizeof want) != 0) {
                if (first < 0)
                    first = i;
                bad++;
            }
        }
        if (bad)
            bad_tensors++;
        CHECK_MSG(bad == 0, "%s: tensor %s: %lld of %lld elements differ (first at %lld: %g vs %g)", what, spec.name,
                  (long long)bad, (long long)n, (long long)first, first >= 0 ? (double)dst[first] : 0.0,
                  first >= 0 ? (double)round_as(how, mps_synth_value(cfg, seed, t, first)) : 0.0);
        free(dst);
        if (bad_tensors > 3)
            break;
    }
}

static int cfg_equal(const mps_config *a, const mps_config *b)
{
    return a->n_layer == b->n_layer && a->n_embd == b->n_embd && a->n_head == b->n_head &&
           a->n_positions == b->n_positions && a->vocab == b->vocab && a->padded_vocab == b->padded_vocab;
}

static void write_text(const char *path, const char *text)
{
    FILE *fp = fopen(path, "w");
    CHECK(fp != NULL);
    if (fp) {
        fputs(text, fp);
        fclose(fp);
    }
}

static void write_config(const char *dir, const mps_config *c, const char *extra)
{
    char path[1200], text[2048];
    snprintf(path, sizeof path, "%s/config.json", dir);
    snprintf(text, sizeof text,
             "{%s\"n_layer\": %d, \"n_embd\": %d, \"n_head\": %d, \"vocab_size\": %lld, "
             "\"n_ctx\": %d%s%s}",
             (extra && strstr(extra, "model_type")) ? "" : "\"model_type\": \"gpt2\", ", c->n_layer, c->n_embd, c->n_head, (long long)c->vocab, c->n_positions, extra ? ", " : "",
             extra ? extra : "");
    write_text(path, text);
}

static int64_t file_size(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 ? (int64_t)st.st_size : -1;
}

/* ---- 1. synthetic files of both formats and dtypes read back exactly ---- */
static void test_synth_roundtrip(void)
{
    mps_config cfg = small_cfg();
    CHECK(cfg.padded_vocab == 1024);
    for (int fmt = MPS_FILE_SAFETENSORS; fmt <= MPS_FILE_LLMC; fmt++) {
        for (int dt = MPS_DTYPE_F32; dt <= MPS_DTYPE_BF16; dt++) {
            char dir[1200], path[1300], what[64];
            snprintf(what, sizeof what, "%s/%s", mps_file_format_name(fmt), mps_dtype_name(dt));
            snprintf(dir, sizeof dir, "%s/synth_%s_%s", tmp, mps_file_format_name(fmt), mps_dtype_name(dt));
            mps_err err = { 0 };
            int rc = mps_synth_write(dir, &cfg, fmt, dt, 42, &err);
            CHECK_MSG(rc == 0, "%s: synth_write: %s", what, err.msg);
            if (fmt == MPS_FILE_SAFETENSORS)
                snprintf(path, sizeof path, "%s/model.safetensors", dir);
            else
                snprintf(path, sizeof path, "%s/model_00000000.bin", dir);
            int64_t es = dt == MPS_DTYPE_BF16 ? 2 : 4;
            if (fmt == MPS_FILE_LLMC)
                CHECK(file_size(path) == 1024 + mps_param_count(&cfg) * es);
            else
                CHECK(file_size(path) > (mps_param_count(&cfg) - 24 * 96) * es);
            mps_model_file *mf = NULL;
            rc = mps_model_file_open(path, NULL, &mf, &err);
            CHECK_MSG(rc == 0, "%s: open: %s", what, err.msg);
            if (rc != 0)
                continue;
            CHECK(cfg_equal(mps_model_file_config(mf), &cfg));
            CHECK(mps_model_file_format(mf) == (mps_file_format)fmt);
            CHECK(mps_model_file_dtype(mf) == (mps_dtype)dt);
            CHECK((mps_model_file_hf_config(mf) != NULL) == (fmt == MPS_FILE_SAFETENSORS));
            check_all_tensors(mf, &cfg, 42, dt == MPS_DTYPE_BF16 ? ROUND_BF16 : EXACT, what);
            mps_model_file_close(mf);

            if (fmt == MPS_FILE_SAFETENSORS) {
                /* a directory stands for its model.safetensors; padded_vocab option */
                mps_model_file_opts o = { .format = MPS_FILE_SAFETENSORS, .padded_vocab = 1100 };
                rc = mps_model_file_open(dir, &o, &mf, &err);
                CHECK_MSG(rc == 0, "%s: open dir: %s", what, err.msg);
                if (rc == 0) {
                    mps_config c2 = cfg;
                    c2.padded_vocab = 1100;
                    CHECK(cfg_equal(mps_model_file_config(mf), &c2));
                    check_all_tensors(mf, &c2, 42, dt == MPS_DTYPE_BF16 ? ROUND_BF16 : EXACT, "padded 1100");
                    mps_model_file_close(mf);
                }
                o.padded_vocab = 999;
                mps_err e2 = { 0 };
                CHECK(mps_model_file_open(dir, &o, &mf, &e2) != 0 && e2.code == MPS_EUSAGE);
                /* generated config.json loads and is what the reader expects */
                char cpath[1300];
                snprintf(cpath, sizeof cpath, "%s/config.json", dir);
                CHECK(file_size(cpath) > 0);
            } else {
                mps_model_file_opts o = { .format = MPS_FILE_LLMC, .padded_vocab = 1024 };
                rc = mps_model_file_open(path, &o, &mf, &err);
                CHECK_MSG(rc == 0, "%s: open with padded_vocab=Vp: %s", what, err.msg);
                if (rc == 0)
                    mps_model_file_close(mf);
                o.padded_vocab = 1152;
                mps_err e2 = { 0 };
                CHECK(mps_model_file_open(path, &o, &mf, &e2) != 0 && e2.code == MPS_EUSAGE);
                /* header fields */
                int32_t h[8];
                FILE *fp = fopen(path, "rb");
                CHECK(fp && fread(h, 4, 8, fp) == 8);
                if (fp)
                    fclose(fp);
                CHECK(h[0] == 20240326 && h[1] == (dt == MPS_DTYPE_BF16 ? 5 : 3) && h[2] == 64 && h[3] == 1000 &&
                      h[4] == 3 && h[5] == 6 && h[6] == 96 && h[7] == 1024);
                /* a safetensors reader refuses it */
                mps_model_file_opts os = { .format = MPS_FILE_SAFETENSORS };
                e2.code = 0;
                CHECK(mps_model_file_open(path, &os, &mf, &e2) != 0 && e2.code != 0);
            }
        }
    }
}

/* ---- synthetic values: deterministic, roughly the intended distributions ---- */
static void test_synth_values(void)
{
    mps_config cfg = small_cfg();
    CHECK(mps_synth_value(&cfg, 1, 5, 77) == mps_synth_value(&cfg, 1, 5, 77));
    CHECK(mps_synth_value(&cfg, 1, 5, 77) != mps_synth_value(&cfg, 2, 5, 77));
    CHECK(mps_synth_value(&cfg, 1, MPS_TENSOR_WTE, 999 * 96 + 95) != 0.0f);
    CHECK(mps_synth_value(&cfg, 1, MPS_TENSOR_WTE, 1000 * 96) == 0.0f);
    CHECK(mps_synth_value(&cfg, 1, MPS_TENSOR_WTE, 1024 * 96 - 1) == 0.0f);
    struct { int t; double mean, sd; } cases[] = {
        { MPS_TENSOR_WTE, 0, 0.02 }, { mps_layer_tensor(1, MPS_SLOT_QKVW), 0, 0.02 },
        { mps_layer_tensor(2, MPS_SLOT_LN1W), 1, 0.02 }, { mps_layer_tensor(0, MPS_SLOT_FCB), 0, 0.01 },
        { mps_tensor_lnfw(&cfg), 1, 0.02 }, { mps_tensor_lnfb(&cfg), 0, 0.01 },
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        mps_tensor_spec spec;
        mps_tensor_spec_get(&cfg, cases[c].t, &spec);
        int64_t n = cases[c].t == MPS_TENSOR_WTE ? 1000 * 96 : mps_tensor_numel(&spec);
        double s = 0, s2 = 0;
        for (int64_t i = 0; i < n; i++) {
            double v = mps_synth_value(&cfg, 9, cases[c].t, i);
            s += v;
            s2 += v * v;
        }
        double mean = s / n, sd = sqrt(s2 / n - mean * mean);
        CHECK_MSG(fabs(mean - cases[c].mean) < 4 * cases[c].sd / sqrt((double)n) + 1e-7, "%s mean %g", spec.name, mean);
        CHECK_MSG(fabs(sd / cases[c].sd - 1) < 0.15, "%s sd %g", spec.name, sd);
    }
}

/* ---- hand-written safetensors files ---- */
typedef struct {
    int prefix;              /* "transformer." keys */
    int buffers;             /* h.{i}.attn.bias / masked_bias */
    int lm_head;             /* 1: copy of wte, 2: differs in one element */
    const char *dtype;       /* "F32", "BF16", "F16" */
    const char *skip;        /* key (no prefix) to leave out */
    const char *bad_shape;   /* key (no prefix) declared with its dimensions swapped */
    const char *extra_key;   /* an unknown key to add */
    int overlap;             /* wpe's offsets start inside wte's */
    uint64_t header_len_add; /* added to the stored header length */
} st_opts;

typedef struct { char *p; size_t len, cap; } sbuf;
static void sb_add(sbuf *b, const void *d, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        b->cap = (b->len + n + 1) * 2;
        b->p = realloc(b->p, b->cap);
    }
    memcpy(b->p + b->len, d, n);
    b->len += n;
    b->p[b->len] = '\0';
}
static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(sbuf *b, const char *fmt, ...)
{
    char tmpb[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmpb, sizeof tmpb, fmt, ap);
    va_end(ap);
    sb_add(b, tmpb, (size_t)n);
}

static void add_tensor(sbuf *hdr, sbuf *data, const char *key, const char *dtype, int ndim, const int64_t *shape,
                       const float *vals, int64_t n, int64_t begin_override)
{
    int64_t begin = begin_override >= 0 ? begin_override : (int64_t)data->len;
    int es = strcmp(dtype, "F32") == 0 ? 4 : 2;
    for (int64_t i = 0; i < n; i++) {
        if (es == 4) {
            sb_add(data, &vals[i], 4);
        } else if (strcmp(dtype, "BF16") == 0) {
            uint16_t h = mps_f32_to_bf16(vals[i]);
            sb_add(data, &h, 2);
        } else {
            uint16_t h = f32_to_f16(vals[i]);
            sb_add(data, &h, 2);
        }
    }
    sb_printf(hdr, "%s\"%s\":{\"dtype\":\"%s\",\"shape\":[", hdr->len > 1 ? "," : "", key, dtype);
    for (int d = 0; d < ndim; d++)
        sb_printf(hdr, "%s%lld", d ? "," : "", (long long)shape[d]);
    sb_printf(hdr, "],\"data_offsets\":[%lld,%lld]}", (long long)begin, (long long)(begin + n * es));
}

/* Writes DIR/model.safetensors with the synthetic values of seed in HF layout (keys in the
 * order of the canonical tensors, Conv1D weights transposed). */
static void build_st(const char *path, const mps_config *cfg, uint64_t seed, const st_opts *o)
{
    static const struct { const char *suffix; int slot, transpose, d0, d1; } lk[12] = {
        { "ln_1.weight", MPS_SLOT_LN1W, 0, 1, 0 }, { "ln_1.bias", MPS_SLOT_LN1B, 0, 1, 0 },
        { "attn.c_attn.weight", MPS_SLOT_QKVW, 1, 1, 3 }, { "attn.c_attn.bias", MPS_SLOT_QKVB, 0, 3, 0 },
        { "attn.c_proj.weight", MPS_SLOT_ATTPROJW, 1, 1, 1 }, { "attn.c_proj.bias", MPS_SLOT_ATTPROJB, 0, 1, 0 },
        { "ln_2.weight", MPS_SLOT_LN2W, 0, 1, 0 }, { "ln_2.bias", MPS_SLOT_LN2B, 0, 1, 0 },
        { "mlp.c_fc.weight", MPS_SLOT_FCW, 1, 1, 4 }, { "mlp.c_fc.bias", MPS_SLOT_FCB, 0, 4, 0 },
        { "mlp.c_proj.weight", MPS_SLOT_FCPROJW, 1, 4, 1 }, { "mlp.c_proj.bias", MPS_SLOT_FCPROJB, 0, 1, 0 },
    };
    const char *dtype = o->dtype ? o->dtype : "F32";
    const char *pre = o->prefix ? "transformer." : "";
    int64_t C = cfg->n_embd;
    sbuf hdr = { 0 }, data = { 0 };
    sb_add(&hdr, "{", 1);
    sb_printf(&hdr, "\"__metadata__\":{\"format\":\"pt\"}");
    int64_t wte_begin = 0;
    for (int t = 0; t < mps_tensor_count(cfg); t++) {
        char key[128], full[160];
        int ndim, transpose = 0;
        int64_t shape[2];
        if (t == MPS_TENSOR_WTE || t == MPS_TENSOR_WPE) {
            snprintf(key, sizeof key, t == MPS_TENSOR_WTE ? "wte.weight" : "wpe.weight");
            ndim = 2;
            shape[0] = t == MPS_TENSOR_WTE ? cfg->vocab : cfg->n_positions;
            shape[1] = C;
        } else if (t >= mps_tensor_lnfw(cfg)) {
            snprintf(key, sizeof key, t == mps_tensor_lnfw(cfg) ? "ln_f.weight" : "ln_f.bias");
            ndim = 1;
            shape[0] = C;
        } else {
            int l = (t - 2) / 12, s = (t - 2) % 12;
            snprintf(key, sizeof key, "h.%d.%s", l, lk[s].suffix);
            transpose = lk[s].transpose;
            ndim = lk[s].d1 ? 2 : 1;
            shape[0] = lk[s].d0 * C;
            shape[1] = lk[s].d1 * C;
        }
        if (o->skip && strcmp(o->skip, key) == 0)
            continue;
        int64_t n = ndim == 2 ? shape[0] * shape[1] : shape[0];
        float *v = malloc((size_t)n * sizeof(float));
        for (int64_t i = 0; i < n; i++) {
            int64_t flat = i;
            if (transpose) { /* file (K, R): element (k, r) is canonical (r, k) */
                int64_t k = i / shape[1], r = i % shape[1];
                flat = r * shape[0] + k;
            }
            v[i] = mps_synth_value(cfg, seed, t, flat);
        }
        if (o->bad_shape && strcmp(o->bad_shape, key) == 0) {
            int64_t sw = shape[0];
            shape[0] = shape[1] ? shape[1] : shape[0] + 1;
            shape[1] = sw;
            if (ndim == 1)
                shape[1] = 1, ndim = 2, shape[0] = sw, shape[1] = 1; /* (C) -> (C, 1): same bytes */
        }
        snprintf(full, sizeof full, "%s%s", pre, key);
        if (t == MPS_TENSOR_WTE)
            wte_begin = (int64_t)data.len;
        add_tensor(&hdr, &data, full, dtype, ndim, shape, v, n,
                   (o->overlap && t == MPS_TENSOR_WPE) ? wte_begin + 64 : -1);
        if (t == MPS_TENSOR_WTE && o->lm_head) {
            if (o->lm_head == 2)
                v[n / 2] += 1.0f;
            add_tensor(&hdr, &data, "lm_head.weight", dtype, ndim, shape, v, n, -1);
        }
        if (o->buffers && t >= 2 && t < mps_tensor_lnfw(cfg) && (t - 2) % 12 == MPS_SLOT_ATTPROJB) {
            int l = (t - 2) / 12;
            int64_t T = cfg->n_positions, bs[4] = { 1, 1, T, T };
            float *m = malloc((size_t)(T * T) * sizeof(float));
            for (int64_t i = 0; i < T * T; i++)
                m[i] = (i % T) <= (i / T) ? 1.0f : 0.0f;
            snprintf(full, sizeof full, "%sh.%d.attn.bias", pre, l);
            add_tensor(&hdr, &data, full, "F32", 4, bs, m, T * T, -1);
            float mb = -1e4f;
            snprintf(full, sizeof full, "%sh.%d.attn.masked_bias", pre, l);
            add_tensor(&hdr, &data, full, "F32", 0, bs, &mb, 1, -1);
            free(m);
        }
        free(v);
    }
    if (o->extra_key) {
        float z[4] = { 0 };
        int64_t s1 = 4;
        add_tensor(&hdr, &data, o->extra_key, "F32", 1, &s1, z, 4, -1);
    }
    sb_add(&hdr, "}", 1);
    while (hdr.len % 8)
        sb_add(&hdr, " ", 1);
    uint64_t hl = hdr.len + o->header_len_add;
    FILE *fp = fopen(path, "wb");
    CHECK(fp != NULL);
    if (fp) {
        CHECK(fwrite(&hl, 8, 1, fp) == 1);
        CHECK(fwrite(hdr.p, 1, hdr.len, fp) == hdr.len);
        CHECK(fwrite(data.p, 1, data.len, fp) == data.len);
        fclose(fp);
    }
    free(hdr.p);
    free(data.p);
}

/* Opens path (config.json beside it) and expects success + exact values. */
static void expect_reads(const char *path, const mps_config *cfg, uint64_t seed, int how, mps_dtype dt,
                         const char *what)
{
    mps_model_file *mf = NULL;
    mps_err err = { 0 };
    int rc = mps_model_file_open(path, NULL, &mf, &err);
    CHECK_MSG(rc == 0, "%s: open: %s", what, err.msg);
    if (rc != 0)
        return;
    CHECK(cfg_equal(mps_model_file_config(mf), cfg));
    CHECK(mps_model_file_format(mf) == MPS_FILE_SAFETENSORS);
    CHECK_MSG(mps_model_file_dtype(mf) == dt, "%s: dtype", what);
    check_all_tensors(mf, cfg, seed, how, what);
    mps_model_file_close(mf);
}

/* Expects open (or, with read_wte, reading wte) to fail with a message naming `named` (the file
 * at fault) and `name`. */
static void expect_error_in(const char *path, const char *named, const mps_model_file_opts *opts, int read_wte,
                            const char *name, int code, const char *what)
{
    mps_model_file *mf = NULL;
    mps_err err = { 0 };
    int rc = mps_model_file_open(path, opts, &mf, &err);
    if (read_wte) {
        CHECK_MSG(rc == 0, "%s: open: %s", what, err.msg);
        if (rc != 0)
            return;
        const mps_config *c = mps_model_file_config(mf);
        float *dst = malloc((size_t)(c->padded_vocab * c->n_embd) * sizeof(float));
        rc = mps_model_file_read_tensor(mf, MPS_TENSOR_WTE, dst, &err);
        free(dst);
        mps_model_file_close(mf);
    } else if (rc == 0) {
        mps_model_file_close(mf);
    }
    CHECK_MSG(rc != 0 && err.code != 0, "%s: expected an error", what);
    CHECK_MSG(strstr(err.msg, named) != NULL, "%s: message does not name %s: %s", what, named, err.msg);
    if (name)
        CHECK_MSG(strstr(err.msg, name) != NULL, "%s: message does not name '%s': %s", what, name, err.msg);
    if (code)
        CHECK_MSG(err.code == code, "%s: code %d, expected %d (%s)", what, err.code, code, err.msg);
    CHECK_MSG(strchr(err.msg, '\n') == NULL, "%s: message has several lines", what);
}

static void expect_error(const char *path, const mps_model_file_opts *opts, int read_wte, const char *name,
                         int code, const char *what)
{
    expect_error_in(path, path, opts, read_wte, name, code, what);
}

static void test_handwritten_safetensors(void)
{
    mps_config cfg = small_cfg();
    char dir[1200], path[1300];
    snprintf(dir, sizeof dir, "%s/hand", tmp);
    mkdir(dir, 0755);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    write_config(dir, &cfg, NULL);
    char cpath[1300];
    snprintf(cpath, sizeof cpath, "%s/config.json", dir);

    st_opts o = { 0 };
    build_st(path, &cfg, 5, &o);
    expect_reads(path, &cfg, 5, EXACT, MPS_DTYPE_F32, "no prefix");
    o = (st_opts){ .prefix = 1, .buffers = 1, .lm_head = 1 };
    build_st(path, &cfg, 5, &o);
    expect_reads(path, &cfg, 5, EXACT, MPS_DTYPE_F32, "prefix+buffers+lm_head");
    o = (st_opts){ .buffers = 1, .lm_head = 1 };
    build_st(path, &cfg, 6, &o);
    expect_reads(path, &cfg, 6, EXACT, MPS_DTYPE_F32, "no prefix+buffers+lm_head");
    o = (st_opts){ .dtype = "BF16", .lm_head = 1 };
    build_st(path, &cfg, 7, &o);
    expect_reads(path, &cfg, 7, ROUND_BF16, MPS_DTYPE_BF16, "bf16");
    o = (st_opts){ .dtype = "F16", .prefix = 1 };
    build_st(path, &cfg, 8, &o);
    expect_reads(path, &cfg, 8, ROUND_F16, MPS_DTYPE_F16, "f16");

    /* config.json: refusals and the --config hint */
    build_st(path, &cfg, 5, &(st_opts){ 0 });
    write_config(dir, &cfg, "\"activation_function\": \"relu\"");
    expect_error_in(path, cpath, NULL, 0, "activation_function", MPS_EUNSUPPORTED, "relu");
    write_config(dir, &cfg, "\"n_inner\": 100");
    expect_error_in(path, cpath, NULL, 0, "n_inner", MPS_EUNSUPPORTED, "n_inner 100");
    write_config(dir, &cfg, "\"scale_attn_by_inverse_layer_idx\": true");
    expect_error_in(path, cpath, NULL, 0, "scale_attn_by_inverse_layer_idx", MPS_EUNSUPPORTED, "scale_attn");
    write_config(dir, &cfg, "\"tie_word_embeddings\": false");
    expect_error_in(path, cpath, NULL, 0, "tie_word_embeddings", MPS_EUNSUPPORTED, "untied");
    write_config(dir, &cfg, "\"layer_norm_epsilon\": 1e-6");
    expect_error_in(path, cpath, NULL, 0, "layer_norm_epsilon", MPS_EUNSUPPORTED, "eps");
    write_config(dir, &cfg, "\"model_type\": \"gpt_neo\"");
    expect_error_in(path, cpath, NULL, 0, "model_type", MPS_EUNSUPPORTED, "model_type gpt_neo");
    write_config(dir, &cfg, "\"n_layer\": 3");
    expect_error_in(path, cpath, NULL, 0, NULL, MPS_ECORRUPT, "duplicate key in config.json");
    write_config(dir, &cfg, "\"n_inner\": 384, \"activation_function\": \"gelu_pytorch_tanh\", "
                            "\"layer_norm_epsilon\": 1e-05, \"tie_word_embeddings\": true, \"n_positions\": 64");
    expect_reads(path, &cfg, 5, EXACT, MPS_DTYPE_F32, "accepted options");
    unlink(cpath);
    expect_error(path, NULL, 0, "--config", 0, "missing config.json");
    {
        /* --config elsewhere */
        char other[1300];
        snprintf(other, sizeof other, "%s/other", tmp);
        mkdir(other, 0755);
        write_config(other, &cfg, NULL);
        snprintf(other + strlen(other), sizeof other - strlen(other), "/config.json");
        mps_model_file_opts co = { .config_path = other };
        mps_model_file *mf = NULL;
        mps_err err = { 0 };
        CHECK_MSG(mps_model_file_open(path, &co, &mf, &err) == 0, "--config: %s", err.msg);
        mps_model_file_close(mf);
    }
    write_config(dir, &cfg, NULL);

    /* corrupt files */
    build_st(path, &cfg, 5, &(st_opts){ .header_len_add = 1000000 });
    expect_error(path, NULL, 0, NULL, MPS_ECORRUPT, "header length > file");
    build_st(path, &cfg, 5, &(st_opts){ .overlap = 1, .prefix = 1 });
    expect_error(path, NULL, 0, "wpe.weight", MPS_ECORRUPT, "overlap");
    build_st(path, &cfg, 5, &(st_opts){ .bad_shape = "h.1.mlp.c_fc.weight" });
    expect_error(path, NULL, 0, "h.1.mlp.c_fc.weight", MPS_ECORRUPT, "wrong shape");
    build_st(path, &cfg, 5, &(st_opts){ .bad_shape = "h.2.ln_2.bias", .prefix = 1 });
    expect_error(path, NULL, 0, "transformer.h.2.ln_2.bias", MPS_ECORRUPT, "wrong shape 1-d");
    build_st(path, &cfg, 5, &(st_opts){ .skip = "h.2.ln_2.bias", .prefix = 1 });
    expect_error(path, NULL, 0, "transformer.h.2.ln_2.bias", MPS_ECORRUPT, "missing key");
    build_st(path, &cfg, 5, &(st_opts){ .skip = "ln_f.weight" });
    expect_error(path, NULL, 0, "'ln_f.weight", MPS_ECORRUPT, "missing key, no prefix");
    build_st(path, &cfg, 5, &(st_opts){ .extra_key = "h.0.attn.rotary" });
    expect_error(path, NULL, 0, "h.0.attn.rotary", MPS_EUNSUPPORTED, "unknown key");
    build_st(path, &cfg, 5, &(st_opts){ .extra_key = "h.3.ln_1.weight" });
    expect_error(path, NULL, 0, "h.3.ln_1.weight", MPS_ECORRUPT, "layer beyond n_layer");
    build_st(path, &cfg, 5, &(st_opts){ .lm_head = 2 });
    expect_error(path, NULL, 1, "lm_head.weight", MPS_EUNSUPPORTED, "untied lm_head");
    {
        /* truncated data section */
        build_st(path, &cfg, 5, &(st_opts){ 0 });
        int64_t sz = file_size(path);
        CHECK(truncate(path, sz - 4) == 0);
        expect_error(path, NULL, 0, "ln_f.bias", MPS_ECORRUPT, "truncated safetensors");
        /* garbage JSON */
        FILE *fp = fopen(path, "r+b");
        CHECK(fp != NULL);
        if (fp) {
            fseek(fp, 20, SEEK_SET);
            fputs("\x01\x02", fp);
            fclose(fp);
        }
        expect_error(path, NULL, 0, NULL, MPS_ECORRUPT, "bad JSON");
        /* file too short, then not a model file */
        write_text(path, "{}");
        expect_error(path, NULL, 0, NULL, MPS_ECORRUPT, "tiny file");
        write_text(path, "hello, this is not a model file");
        expect_error(path, NULL, 0, NULL, MPS_ECORRUPT, "not a model");
    }
}

static void test_llmc_corrupt(void)
{
    mps_config cfg = small_cfg();
    char dir[1200], path[1300], cmd[3000];
    snprintf(dir, sizeof dir, "%s/llmc_bad", tmp);
    mps_err err = { 0 };
    CHECK(mps_synth_write(dir, &cfg, MPS_FILE_LLMC, MPS_DTYPE_F32, 3, &err) == 0);
    snprintf(path, sizeof path, "%s/model_00000000.bin", dir);
    int64_t sz = file_size(path);
    CHECK(truncate(path, sz + 4) == 0);
    expect_error(path, NULL, 0, "trailing", MPS_ECORRUPT, "llmc longer");
    CHECK(truncate(path, sz) == 0);
    int fd = open(path, O_WRONLY);
    int32_t v = 20240327;
    CHECK(fd >= 0 && pwrite(fd, &v, 4, 0) == 4);
    mps_model_file_opts o = { .format = MPS_FILE_LLMC };
    expect_error(path, &o, 0, "magic", MPS_ECORRUPT, "llmc bad magic");
    expect_error(path, NULL, 0, NULL, MPS_ECORRUPT, "llmc bad magic, auto");
    v = 20240326;
    CHECK(pwrite(fd, &v, 4, 0) == 4);
    v = 4;
    CHECK(pwrite(fd, &v, 4, 4) == 4);
    expect_error(path, NULL, 0, "version", MPS_EUNSUPPORTED, "llmc version 4");
    v = 3;
    CHECK(pwrite(fd, &v, 4, 4) == 4);
    v = 999; /* Vp < V */
    CHECK(pwrite(fd, &v, 4, 28) == 4);
    expect_error(path, NULL, 0, "Vp", MPS_ECORRUPT, "llmc Vp < V");
    v = -5;
    CHECK(pwrite(fd, &v, 4, 28) == 4);
    expect_error(path, NULL, 0, "Vp", MPS_ECORRUPT, "llmc negative Vp");
    v = 1024;
    CHECK(pwrite(fd, &v, 4, 28) == 4);
    v = 7; /* NH does not divide C */
    CHECK(pwrite(fd, &v, 4, 20) == 4);
    expect_error(path, NULL, 0, "n_head", MPS_ECORRUPT, "llmc bad NH");
    v = 6;
    CHECK(pwrite(fd, &v, 4, 20) == 4);
    close(fd);
    mps_model_file *mf;
    CHECK(mps_model_file_open(path, NULL, &mf, &err) == 0);
    if (err.code == 0) {
        check_all_tensors(mf, &cfg, 3, EXACT, "llmc restored");
        mps_model_file_close(mf);
    }
    CHECK(truncate(path, sz - 1) == 0);
    expect_error(path, NULL, 0, "truncated", MPS_ECORRUPT, "llmc truncated");
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    CHECK(system(cmd) == 0);
}

/* ---- writer round trip: stream canonical values of seed 11 through the item list ---- */
static int stream_model(mps_out_file *f, const mps_config *cfg, uint64_t seed, size_t piece, mps_err *err)
{
    const mps_out_item *items;
    int n;
    mps_out_file_items(f, &items, &n);
    mps_dtype dt = mps_out_file_dtype(f);
    size_t es = mps_dtype_size(dt);
    for (int i = 0; i < n; i++) {
        mps_tensor_spec spec;
        mps_tensor_spec_get(cfg, items[i].tensor, &spec);
        int64_t numel = mps_tensor_numel(&spec), per_row = numel / spec.shape[0];
        int64_t count = items[i].rows * per_row;
        unsigned char *bytes = malloc((size_t)count * es);
        int64_t K = spec.shape[spec.ndim - 1], R = numel / K;
        for (int64_t j = 0; j < count; j++) {
            int64_t flat = items[i].transpose ? (j % R) * K + j / R : j;
            float v = mps_synth_value(cfg, seed, items[i].tensor, flat);
            if (dt == MPS_DTYPE_BF16) {
                uint16_t h = mps_f32_to_bf16(v);
                memcpy(bytes + j * 2, &h, 2);
            } else {
                memcpy(bytes + j * 4, &v, 4);
            }
        }
        for (size_t off = 0; off < (size_t)count * es; off += piece) {
            size_t m = (size_t)count * es - off < piece ? (size_t)count * es - off : piece;
            if (mps_out_file_write(f, bytes + off, m, err) != 0) {
                free(bytes);
                return -1;
            }
        }
        free(bytes);
    }
    return 0;
}

static void test_writer_roundtrip(void)
{
    mps_config cfg = small_cfg();
    char dir[1200], path[1300];
    snprintf(dir, sizeof dir, "%s/writer/sub", tmp);
    mps_err err = { 0 };
    mps_out_file *f = NULL;
    CHECK_MSG(mps_safetensors_create(dir, &cfg, MPS_DTYPE_F32, NULL, 0, &f, &err) == 0, "create: %s", err.msg);
    if (f == NULL)
        return;
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    CHECK(strcmp(mps_out_file_path(f), path) == 0);
    const mps_out_item *items;
    int n;
    mps_out_file_items(f, &items, &n);
    CHECK(n == mps_tensor_count(&cfg));
    CHECK(items[0].tensor == MPS_TENSOR_WTE && items[0].rows == cfg.vocab && !items[0].transpose);
    CHECK(items[mps_layer_tensor(1, MPS_SLOT_QKVW)].transpose == 1 && items[mps_layer_tensor(1, MPS_SLOT_QKVW)].rows == 3);
    CHECK(items[mps_layer_tensor(1, MPS_SLOT_QKVB)].transpose == 0);
    CHECK(file_size(path) < 0); /* not there before finish */
    CHECK_MSG(stream_model(f, &cfg, 11, 1000, &err) == 0, "stream: %s", err.msg);
    CHECK_MSG(mps_out_file_finish(f, &err) == 0, "finish: %s", err.msg);
    expect_reads(path, &cfg, 11, EXACT, MPS_DTYPE_F32, "writer f32");
    char cpath[1300], tpath[1400];
    snprintf(cpath, sizeof cpath, "%s/config.json", dir);
    FILE *fp = fopen(cpath, "r");
    char text[4096] = "";
    CHECK(fp != NULL);
    if (fp) {
        size_t r = fread(text, 1, sizeof text - 1, fp);
        text[r] = '\0';
        fclose(fp);
    }
    CHECK_MSG(strstr(text, "\"GPT2LMHeadModel\"") && strstr(text, "\"n_layer\": 3") && strstr(text, "1e-5") &&
              strstr(text, "\"eos_token_id\": 999"), "generated config.json: %s", text);
    snprintf(tpath, sizeof tpath, "%s.tmp", path);
    CHECK(file_size(tpath) < 0);

    /* given config.json kept verbatim (bf16, big pieces) */
    const char *given = "{\"model_type\":\"gpt2\",\"n_layer\":3,\"n_embd\":96,\"n_head\":6,\"vocab_size\":1000,"
                        "\"n_positions\":64,\"custom\":\"kept\"}";
    CHECK_MSG(mps_safetensors_create(dir, &cfg, MPS_DTYPE_BF16, given, 0, &f, &err) == 0, "create: %s", err.msg);
    CHECK_MSG(stream_model(f, &cfg, 12, (size_t)5 << 20, &err) == 0, "stream: %s", err.msg);
    CHECK_MSG(mps_out_file_finish(f, &err) == 0, "finish: %s", err.msg);
    expect_reads(path, &cfg, 12, ROUND_BF16, MPS_DTYPE_BF16, "writer bf16");
    mps_model_file *mf;
    if (mps_model_file_open(path, NULL, &mf, &err) == 0) {
        CHECK(strcmp(mps_model_file_hf_config(mf), given) == 0);
        mps_model_file_close(mf);
    }
    /* given config.json that disagrees with the model */
    mps_config c2 = cfg;
    c2.n_layer = 4;
    err.code = 0;
    CHECK(mps_safetensors_create(dir, &c2, MPS_DTYPE_F32, given, 0, &f, &err) != 0 && strstr(err.msg, "n_layer"));

    /* short write: finish fails, nothing replaced, tmp gone; abort removes tmp */
    err.code = 0;
    CHECK(mps_safetensors_create(dir, &cfg, MPS_DTYPE_F32, NULL, 0, &f, &err) == 0);
    float z[4] = { 0 };
    CHECK(mps_out_file_write(f, z, sizeof z, &err) == 0);
    CHECK(mps_out_file_finish(f, &err) != 0 && err.code != 0);
    CHECK(file_size(tpath) < 0);
    expect_reads(path, &cfg, 12, ROUND_BF16, MPS_DTYPE_BF16, "after failed finish");
    err.code = 0;
    CHECK(mps_llmc_create(dir, &cfg, MPS_DTYPE_F32, 1234, &f, &err) == 0);
    CHECK(strstr(mps_out_file_path(f), "/model_00001234.bin") != NULL);
    snprintf(tpath, sizeof tpath, "%s.tmp", mps_out_file_path(f));
    CHECK(file_size(tpath) >= 0);
    mps_out_file_abort(f);
    CHECK(file_size(tpath) < 0);

    /* llm.c writer round trip, awkward pieces */
    CHECK(mps_llmc_create(dir, &cfg, MPS_DTYPE_BF16, 7, &f, &err) == 0);
    CHECK_MSG(stream_model(f, &cfg, 13, 4099 * 2, &err) == 0, "stream: %s", err.msg);
    CHECK_MSG(mps_out_file_finish(f, &err) == 0, "finish: %s", err.msg);
    snprintf(path, sizeof path, "%s/model_00000007.bin", dir);
    if (mps_model_file_open(path, NULL, &mf, &err) == 0) {
        check_all_tensors(mf, &cfg, 13, ROUND_BF16, "llmc writer");
        mps_model_file_close(mf);
    }
    /* writing past the end is refused */
    CHECK(mps_llmc_create(dir, &cfg, MPS_DTYPE_F32, 8, &f, &err) == 0);
    size_t big = (size_t)mps_param_count(&cfg) * 4 + 1;
    unsigned char *junk = calloc(1, big);
    CHECK(mps_out_file_write(f, junk, big, &err) != 0);
    free(junk);
    mps_out_file_abort(f);
}

static void test_names(void)
{
    CHECK(strcmp(mps_file_format_name(MPS_FILE_SAFETENSORS), "safetensors") == 0);
    CHECK(strcmp(mps_file_format_name(MPS_FILE_LLMC), "llmc") == 0);
    CHECK(mps_file_format_from_name("safetensors") == MPS_FILE_SAFETENSORS);
    CHECK(mps_file_format_from_name("llmc") == MPS_FILE_LLMC);
    CHECK(mps_file_format_from_name("gguf") == -1);
}

int main(void)
{
    tmp = test_tmpdir("test_modelfile");
    CHECK(tmp != NULL);
    if (tmp == NULL)
        TEST_DONE();
    test_names();
    test_synth_values();
    test_synth_roundtrip();
    test_handwritten_safetensors();
    test_llmc_corrupt();
    test_writer_roundtrip();
    if (test_failures == 0) {
        char cmd[1200];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
        if (system(cmd) != 0)
            fprintf(stderr, "could not remove %s\n", tmp);
    }
    TEST_DONE();
}
