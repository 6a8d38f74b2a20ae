/* Hugging Face GPT-2 safetensors (model.safetensors + config.json): reader and writer.
 *
 * File: u64 little-endian N, N bytes of JSON header, data. The header maps each key to
 * {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the data section).
 * GPT-2 stores its four matrices as Conv1D weights, (in, out); canonical tensors are (out, in). */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "modelfile_internal.h"

#define HEADER_CAP ((uint64_t)100 << 20) /* largest JSON header accepted */
#define CONFIG_CAP ((int64_t)16 << 20)   /* largest config.json accepted */
#define MAX_RANK 8
#define PREFIX "transformer."

/* ---------------------------------------------------------------------------------------------
 * Key names: HF suffix of each layer tensor, its canonical slot and its shape in the file, in
 * units of C (0: no such dimension). Conv1D weights are stored transposed. */
typedef struct {
    const char *suffix;
    int slot;
    int transpose;
    int d0, d1;
} layer_key;

static const layer_key layer_keys[MPS_TENSORS_PER_LAYER] = {
    { "ln_1.weight", MPS_SLOT_LN1W, 0, 1, 0 },
    { "ln_1.bias", MPS_SLOT_LN1B, 0, 1, 0 },
    { "attn.c_attn.weight", MPS_SLOT_QKVW, 1, 1, 3 },
    { "attn.c_attn.bias", MPS_SLOT_QKVB, 0, 3, 0 },
    { "attn.c_proj.weight", MPS_SLOT_ATTPROJW, 1, 1, 1 },
    { "attn.c_proj.bias", MPS_SLOT_ATTPROJB, 0, 1, 0 },
    { "ln_2.weight", MPS_SLOT_LN2W, 0, 1, 0 },
    { "ln_2.bias", MPS_SLOT_LN2B, 0, 1, 0 },
    { "mlp.c_fc.weight", MPS_SLOT_FCW, 1, 1, 4 },
    { "mlp.c_fc.bias", MPS_SLOT_FCB, 0, 4, 0 },
    { "mlp.c_proj.weight", MPS_SLOT_FCPROJW, 1, 4, 1 },
    { "mlp.c_proj.bias", MPS_SLOT_FCPROJB, 0, 1, 0 },
};

/* File shape and HF key (without prefix) of canonical tensor `index`. */
static void hf_tensor(const mps_config *cfg, int index, char *key, size_t keylen, int *ndim, int64_t shape[2],
                      int *transpose)
{
    const int64_t C = cfg->n_embd;
    *transpose = 0;
    if (index == MPS_TENSOR_WTE || index == MPS_TENSOR_WPE) {
        snprintf(key, keylen, "%s", index == MPS_TENSOR_WTE ? "wte.weight" : "wpe.weight");
        *ndim = 2;
        shape[0] = index == MPS_TENSOR_WTE ? cfg->vocab : cfg->n_positions;
        shape[1] = C;
        return;
    }
    if (index >= mps_tensor_lnfw(cfg)) {
        snprintf(key, keylen, "%s", index == mps_tensor_lnfw(cfg) ? "ln_f.weight" : "ln_f.bias");
        *ndim = 1;
        shape[0] = C;
        return;
    }
    int l = (index - 2) / MPS_TENSORS_PER_LAYER, slot = (index - 2) % MPS_TENSORS_PER_LAYER;
    const layer_key *lk = &layer_keys[slot];
    snprintf(key, keylen, "h.%d.%s", l, lk->suffix);
    *transpose = lk->transpose;
    *ndim = lk->d1 ? 2 : 1;
    shape[0] = lk->d0 * C;
    shape[1] = lk->d1 * C;
}

/* ---------------------------------------------------------------------------------------------
 * config.json */

static char *json_text(json_t *v)
{
    char *s = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT | JSON_REAL_PRECISION(6));
    return s ? s : strdup("?");
}

static int refuse(mps_err *err, const char *name, const char *field, json_t *v, const char *why)
{
    char *s = json_text(v);
    mps_fail(err, MPS_EUNSUPPORTED, "%s: %s=%s is not supported (%s)", name, field, s ? s : "?", why);
    free(s);
    return -1;
}

static int get_int(json_t *root, const char *name, const char *field, int64_t lo, int64_t hi, int64_t *out,
                   mps_err *err)
{
    json_t *v = json_object_get(root, field);
    if (v == NULL || json_is_null(v))
        return 1;
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi) {
        char *s = json_text(v);
        mps_fail(err, MPS_ECORRUPT, "%s: %s=%s: expected an integer in %lld..%lld", name, field, s, (long long)lo,
                 (long long)hi);
        free(s);
        return -1;
    }
    *out = json_integer_value(v);
    return 0;
}

/* Reads the model numbers of a parsed config.json and refuses options the model does not
 * implement. padded_vocab is left 0. */
static int hf_config_parse(json_t *root, const char *name, mps_config *cfg, mps_err *err)
{
    memset(cfg, 0, sizeof *cfg);
    if (!json_is_object(root))
        return mps_fail(err, MPS_ECORRUPT, "%s: not a JSON object", name);
    static const char *const req[] = { "n_layer", "n_embd", "n_head", "vocab_size" };
    int64_t v[4];
    for (int i = 0; i < 4; i++) {
        int r = get_int(root, name, req[i], 1, i == 3 ? ((int64_t)1 << 31) : (1 << 24), &v[i], err);
        if (r < 0)
            return -1;
        if (r > 0)
            return mps_fail(err, MPS_ECORRUPT, "%s: missing %s", name, req[i]);
    }
    int64_t npos;
    int r = get_int(root, name, "n_positions", 1, 1 << 24, &npos, err);
    if (r > 0)
        r = get_int(root, name, "n_ctx", 1, 1 << 24, &npos, err);
    if (r < 0)
        return -1;
    if (r > 0)
        return mps_fail(err, MPS_ECORRUPT, "%s: missing n_positions (and n_ctx)", name);
    cfg->n_layer = (int)v[0];
    cfg->n_embd = (int)v[1];
    cfg->n_head = (int)v[2];
    cfg->vocab = v[3];
    cfg->n_positions = (int)npos;

    json_t *x;
    if ((x = json_object_get(root, "model_type")) != NULL && !json_is_null(x) &&
        !(json_is_string(x) && strcmp(json_string_value(x), "gpt2") == 0))
        return refuse(err, name, "model_type", x, "only \"gpt2\"");
    if ((x = json_object_get(root, "n_inner")) != NULL && !json_is_null(x) &&
        !(json_is_integer(x) && json_integer_value(x) == 4 * (json_int_t)cfg->n_embd))
        return refuse(err, name, "n_inner", x, "the MLP width must be 4 * n_embd");
    if ((x = json_object_get(root, "activation_function")) != NULL && !json_is_null(x) &&
        !(json_is_string(x) && (strcmp(json_string_value(x), "gelu_new") == 0 ||
                                strcmp(json_string_value(x), "gelu_pytorch_tanh") == 0)))
        return refuse(err, name, "activation_function", x, "only gelu_new / gelu_pytorch_tanh");
    static const char *const must_be_false[] = { "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                                                 "add_cross_attention" };
    for (int i = 0; i < 3; i++)
        if ((x = json_object_get(root, must_be_false[i])) != NULL && json_is_true(x))
            return refuse(err, name, must_be_false[i], x, "GPT-2 attention as implemented needs false");
    if ((x = json_object_get(root, "tie_word_embeddings")) != NULL && json_is_false(x))
        return refuse(err, name, "tie_word_embeddings", x, "the output head is tied to wte");
    if ((x = json_object_get(root, "scale_attn_weights")) != NULL && json_is_false(x))
        return refuse(err, name, "scale_attn_weights", x, "attention is scaled by 1/sqrt(head size)");
    if ((x = json_object_get(root, "layer_norm_epsilon")) != NULL && !json_is_null(x)) {
        if (!json_is_number(x))
            return mps_fail(err, MPS_ECORRUPT, "%s: layer_norm_epsilon is not a number", name);
        if (fabs(json_number_value(x) - 1e-5) > 1e-8)
            return refuse(err, name, "layer_norm_epsilon", x, "only 1e-05");
    }
    mps_err e2 = { 0 };
    mps_config c2 = *cfg;
    c2.padded_vocab = c2.vocab;
    if (mps_config_validate(&c2, &e2) != 0)
        return mps_fail(err, MPS_ECORRUPT, "%s: %s", name, e2.msg);
    return 0;
}

static int load_config(const char *input, const mps_model_file_opts *opts, mps_model_file *f, json_t **root,
                       mps_err *err)
{
    char *owned = NULL;
    const char *cpath = opts->config_path;
    if (cpath == NULL) {
        const char *slash = strrchr(input, '/');
        size_t dl = slash ? (size_t)(slash - input) : 1;
        owned = malloc(dl + 16);
        if (owned == NULL)
            return mps_fail(err, MPS_ENOMEM, "%s: out of memory", input);
        if (slash)
            memcpy(owned, input, dl);
        else
            owned[0] = '.';
        memcpy(owned + dl, "/config.json", 13);
        cpath = owned;
    }
    int rc = -1;
    char *text = NULL;
    int fd = open(cpath, O_RDONLY | O_CLOEXEC | O_NONBLOCK); /* a FIFO must not block: refused below */
    struct stat st;
    if (fd < 0) {
        if (errno == ENOENT && opts->config_path == NULL)
            mps_fail(err, MPS_EUSAGE, "%s: config.json not found beside it; pass --config FILE", input);
        else
            mps_fail(err, errno == ENOENT || errno == ENOTDIR ? MPS_ECORRUPT : MPS_EIO, "%s: cannot open: %s", cpath,
                     strerror(errno));
        goto out;
    }
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        mps_fail(err, MPS_EUSAGE, "%s: not a readable regular file", cpath);
        goto out;
    }
    if ((int64_t)st.st_size > CONFIG_CAP) {
        mps_fail(err, MPS_ECORRUPT, "%s: %lld bytes is too large for a config.json", cpath, (long long)st.st_size);
        goto out;
    }
    size_t n = (size_t)st.st_size;
    text = malloc(n + 1);
    if (text == NULL) {
        mps_fail(err, MPS_ENOMEM, "%s: out of memory", cpath);
        goto out;
    }
    if (mps_pread_full(fd, cpath, text, n, 0, err) != 0)
        goto out;
    text[n] = '\0';
    json_error_t jerr;
    *root = json_loadb(text, n, JSON_REJECT_DUPLICATES, &jerr);
    if (*root == NULL) {
        mps_fail(err, MPS_ECORRUPT, "%s: line %d: %s", cpath, jerr.line, jerr.text);
        goto out;
    }
    if (hf_config_parse(*root, cpath, &f->cfg, err) != 0) {
        json_decref(*root);
        *root = NULL;
        goto out;
    }
    f->hf_config = text;
    text = NULL;
    rc = 0;
out:
    if (fd >= 0)
        close(fd);
    free(text);
    free(owned);
    return rc;
}

/* ---------------------------------------------------------------------------------------------
 * Reading */

typedef struct {
    const char *key;
    int src_dtype; /* MPS_SRC_* or -1 for a non-float dtype */
    const char *dtype;
    int ndim;
    int64_t shape[MAX_RANK];
    int64_t numel, begin, end;
    int role; /* 0: other, 1: wte, 2: lm_head */
} st_entry;

static int dtype_size(const char *d, int *src_dtype)
{
    static const struct { const char *name; int size, src; } t[] = {
        { "F32", 4, MPS_SRC_F32 }, { "BF16", 2, MPS_SRC_BF16 }, { "F16", 2, MPS_SRC_F16 },
        { "F64", 8, -1 }, { "I64", 8, -1 }, { "U64", 8, -1 }, { "I32", 4, -1 }, { "U32", 4, -1 },
        { "I16", 2, -1 }, { "U16", 2, -1 }, { "I8", 1, -1 }, { "U8", 1, -1 }, { "BOOL", 1, -1 },
        { "F8_E5M2", 1, -1 }, { "F8_E4M3", 1, -1 }, { "F8_E8M0", 1, -1 },
    };
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++)
        if (strcmp(d, t[i].name) == 0) {
            *src_dtype = t[i].src;
            return t[i].size;
        }
    return -1;
}

static int parse_entry(const char *path, const char *key, json_t *v, int64_t data_size, st_entry *e, mps_err *err)
{
    memset(e, 0, sizeof *e);
    e->key = key;
    if (!json_is_object(v))
        return mps_fail(err, MPS_ECORRUPT, "%s: tensor '%s': header entry is not an object", path, key);
    json_t *dt = json_object_get(v, "dtype"), *sh = json_object_get(v, "shape"),
           *off = json_object_get(v, "data_offsets");
    if (!json_is_string(dt))
        return mps_fail(err, MPS_ECORRUPT, "%s: tensor '%s': missing or invalid dtype", path, key);
    e->dtype = json_string_value(dt);
    int es = dtype_size(e->dtype, &e->src_dtype);
    if (es < 0)
        return mps_fail(err, MPS_ECORRUPT, "%s: tensor '%s': unknown dtype '%.32s'", path, key, e->dtype);
    if (!json_is_array(sh) || json_array_size(sh) > MAX_RANK)
        return mps_fail(err, MPS_ECORRUPT, "%s: tensor '%s': missing or invalid shape", path, key);
    e->ndim = (int)json_array_size(sh);
    e->numel = 1;
    for (int i = 0; i < e->ndim; i++) {
        json_t *d = json_array_get(sh, (size_t)i);
        if (!json_is_integer(d) || json_integer_value(d) < 0)
            return mps_fail(err, MPS_ECORRUPT, "%s: tensor '%s': shape[%d] is not a non-negative integer", path, key, i);
        e->shape[i] = json_integer_value(d);
        if (__builtin_mul_overflow(e->numel, e->shape[i], &e->numel))
            return mps_fail(err, MPS_ECORRUPT, "%s: tensor '%s': shape overflows", path, key);
    }
    int64_t nbytes;
    if (__builtin_mul_overflow(e->numel, (int64_t)es, &nbytes))
        return mps_fail(err, MPS_ECORRUPT, "%s: tensor '%s': shape overflows", path, key);
    if (!json_is_array(off) || json_array_size(off) != 2 || !json_is_integer(json_array_get(off, 0)) ||
        !json_is_integer(json_array_get(off, 1)))
        return mps_fail(err, MPS_ECORRUPT, "%s: tensor '%s': data_offsets is not [begin, end]", path, key);
    e->begin = json_integer_value(json_array_get(off, 0));
    e->end = json_integer_value(json_array_get(off, 1));
    if (e->begin < 0 || e->end < e->begin)
        return mps_fail(err, MPS_ECORRUPT, "%s: tensor '%s': invalid data_offsets [%lld, %lld]", path, key,
                        (long long)e->begin, (long long)e->end);
    if (e->end > data_size)
        return mps_fail(err, MPS_ECORRUPT,
                        "%s: tensor '%s': data_offsets end %lld is past the end of the data (%lld bytes; file truncated?)",
                        path, key, (long long)e->end, (long long)data_size);
    if (e->end - e->begin != nbytes)
        return mps_fail(err, MPS_ECORRUPT, "%s: tensor '%s': data_offsets span %lld bytes but %s shape needs %lld",
                        path, key, (long long)(e->end - e->begin), e->dtype, (long long)nbytes);
    return 0;
}

static int cmp_entry(const void *a, const void *b)
{
    const st_entry *x = *(st_entry *const *)a, *y = *(st_entry *const *)b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    return x->end < y->end ? -1 : x->end > y->end;
}

static int check_overlaps(const char *path, st_entry *ents, int n, mps_err *err)
{
    st_entry **p = malloc((size_t)(n ? n : 1) * sizeof *p);
    if (p == NULL)
        return mps_fail(err, MPS_ENOMEM, "%s: out of memory", path);
    int m = 0;
    for (int i = 0; i < n; i++)
        if (ents[i].end > ents[i].begin)
            p[m++] = &ents[i];
    qsort(p, (size_t)m, sizeof *p, cmp_entry);
    const st_entry *far = NULL; /* the entry reaching furthest so far */
    for (int i = 0; i < m; i++) {
        if (far && p[i]->begin < far->end) {
            /* lm_head stored as a view of wte (same bytes) is fine: the model ties them */
            int alias = p[i]->begin == far->begin && p[i]->end == far->end && p[i]->role + far->role == 3;
            if (!alias) {
                const st_entry *cur = p[i];
                free(p);
                return mps_fail(err, MPS_ECORRUPT,
                                "%s: tensors '%s' and '%s' overlap (data_offsets [%lld, %lld] and [%lld, %lld])", path,
                                far->key, cur->key, (long long)far->begin, (long long)far->end, (long long)cur->begin,
                                (long long)cur->end);
            }
        }
        if (far == NULL || p[i]->end > far->end)
            far = p[i];
    }
    free(p);
    return 0;
}

/* Parses "h.<l>.<suffix>": returns the canonical index, -2 if l >= n_layer (*layer set), -1 if no match. */
static int match_layer_key(const mps_config *cfg, const char *k, int *layer)
{
    if (strncmp(k, "h.", 2) != 0)
        return -1;
    const char *p = k + 2;
    if (*p < '0' || *p > '9' || (p[0] == '0' && p[1] >= '0' && p[1] <= '9'))
        return -1;
    int64_t l = 0;
    while (*p >= '0' && *p <= '9') {
        l = l * 10 + (*p - '0');
        if (l > 100000000)
            return -1;
        p++;
    }
    if (*p != '.')
        return -1;
    p++;
    for (int s = 0; s < MPS_TENSORS_PER_LAYER; s++)
        if (strcmp(p, layer_keys[s].suffix) == 0) {
            *layer = (int)l;
            return l < cfg->n_layer ? mps_layer_tensor((int)l, layer_keys[s].slot) : -2;
        }
    if (strcmp(p, "attn.bias") == 0 || strcmp(p, "attn.masked_bias") == 0)
        return -3;
    return -1;
}

#define KEY_LM_HEAD (-4)
/* The canonical index of a header key ("transformer." prefix optional): >= 0, KEY_LM_HEAD (the
 * tied output head, never prefixed), -3 for the attention mask buffers, -2 for a layer beyond
 * n_layer (*layer set), -1 for anything else. */
static int key_index(const mps_config *cfg, const char *key, int *has_prefix, int *layer)
{
    const char *k = key;
    *has_prefix = strncmp(k, PREFIX, strlen(PREFIX)) == 0;
    if (*has_prefix)
        k += strlen(PREFIX);
    else if (strcmp(k, "lm_head.weight") == 0)
        return KEY_LM_HEAD;
    if (strcmp(k, "wte.weight") == 0)
        return MPS_TENSOR_WTE;
    if (strcmp(k, "wpe.weight") == 0)
        return MPS_TENSOR_WPE;
    if (strcmp(k, "ln_f.weight") == 0)
        return mps_tensor_lnfw(cfg);
    if (strcmp(k, "ln_f.bias") == 0)
        return mps_tensor_lnfb(cfg);
    return match_layer_key(cfg, k, layer);
}

/* The error for a key that key_index() did not map to a parameter (0 for the others). */
static int key_error(const char *path, const mps_config *cfg, const char *key, int idx, int layer, mps_err *err)
{
    if (idx == -2)
        return mps_fail(err, MPS_ECORRUPT, "%s: tensor '%s': layer %d but config.json has n_layer=%d", path, key, layer,
                        cfg->n_layer);
    if (idx == -1)
        return mps_fail(err, MPS_EUNSUPPORTED, "%s: tensor '%s' is not a GPT-2 parameter this tool knows", path, key);
    return 0;
}

int mps_safetensors_open(mps_model_file *f, const mps_model_file_opts *opts, mps_err *err)
{
    const char *path = f->path;
    json_t *root = NULL, *croot = NULL;
    char *hbuf = NULL;
    st_entry *ents = NULL;
    int *seen = NULL;
    int rc = -1;

    unsigned char lenbuf[8];
    if (f->file_size < 8)
        return mps_fail(err, MPS_ECORRUPT, "%s: %lld bytes is too short for a safetensors file", path,
                        (long long)f->file_size);
    if (mps_pread_full(f->fd, path, lenbuf, 8, 0, err) != 0)
        return -1;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = (hlen << 8) | lenbuf[i];
    if (hlen > (uint64_t)(f->file_size - 8))
        return mps_fail(err, MPS_ECORRUPT, "%s: header length %llu is larger than the file (%lld bytes)", path,
                        (unsigned long long)hlen, (long long)f->file_size);
    if (hlen > HEADER_CAP)
        return mps_fail(err, MPS_ECORRUPT, "%s: header length %llu exceeds the %llu-byte limit", path,
                        (unsigned long long)hlen, (unsigned long long)HEADER_CAP);
    if (hlen < 2)
        return mps_fail(err, MPS_ECORRUPT, "%s: header length %llu is too short", path, (unsigned long long)hlen);
    int64_t data_start = 8 + (int64_t)hlen, data_size = f->file_size - data_start;
    hbuf = malloc((size_t)hlen + 1);
    if (hbuf == NULL)
        return mps_fail(err, MPS_ENOMEM, "%s: out of memory for a %llu-byte header", path, (unsigned long long)hlen);
    if (mps_pread_full(f->fd, path, hbuf, (size_t)hlen, 8, err) != 0)
        goto out;
    hbuf[hlen] = '\0';
    json_error_t jerr;
    root = json_loadb(hbuf, (size_t)hlen, JSON_REJECT_DUPLICATES, &jerr);
    if (root == NULL) {
        mps_fail(err, MPS_ECORRUPT, "%s: header JSON, line %d column %d: %s", path, jerr.line, jerr.column, jerr.text);
        goto out;
    }
    if (!json_is_object(root)) {
        mps_fail(err, MPS_ECORRUPT, "%s: header is not a JSON object", path);
        goto out;
    }

    /* Every entry: dtype, shape, offsets inside the data, no overlaps. */
    size_t nkeys = json_object_size(root);
    ents = calloc(nkeys ? nkeys : 1, sizeof *ents);
    if (ents == NULL) {
        mps_fail(err, MPS_ENOMEM, "%s: out of memory", path);
        goto out;
    }
    int n = 0;
    const char *key;
    json_t *val;
    json_object_foreach(root, key, val) {
        if (strcmp(key, "__metadata__") == 0)
            continue;
        if (parse_entry(path, key, val, data_size, &ents[n], err) != 0)
            goto out;
        n++;
    }

    if (load_config(path, opts, f, &croot, err) != 0)
        goto out;
    mps_config *cfg = &f->cfg;
    if (opts->padded_vocab) {
        if (opts->padded_vocab < cfg->vocab) {
            mps_fail(err, MPS_EUSAGE, "--padded-vocab %lld is smaller than the vocabulary (vocab_size=%lld)",
                     (long long)opts->padded_vocab, (long long)cfg->vocab);
            goto out;
        }
        cfg->padded_vocab = opts->padded_vocab;
    } else {
        cfg->padded_vocab = mps_default_padded_vocab(cfg->vocab);
    }
    {
        mps_err e2 = { 0 };
        if (mps_config_validate(cfg, &e2) != 0) {
            mps_fail(err, MPS_EUSAGE, "%s: %s", path, e2.msg);
            goto out;
        }
    }

    /* A config that needs more tensors than the header lists (n_layer=100000 beside a small
     * file): one of them is missing, and one of the first n + 1 already (n entries cannot cover
     * n + 1 tensors). It is named without tables sized by the config. */
    int prefixed = 0, lm_head = -1;
    if (mps_tensor_count(cfg) > n) {
        seen = calloc((size_t)n + 1, sizeof *seen);
        if (seen == NULL) {
            mps_fail(err, MPS_ENOMEM, "%s: out of memory", path);
            goto out;
        }
        for (int i = 0; i < n; i++) {
            int has_prefix, layer = -1, idx = key_index(cfg, ents[i].key, &has_prefix, &layer);
            prefixed |= has_prefix;
            if (key_error(path, cfg, ents[i].key, idx, layer, err) != 0)
                goto out;
            if (idx >= 0 && idx <= n)
                seen[idx] = 1;
        }
        int missing = 0;
        while (seen[missing])
            missing++;
        char hkey[96];
        int ndim, transpose;
        int64_t shape[2];
        hf_tensor(cfg, missing, hkey, sizeof hkey, &ndim, shape, &transpose);
        mps_fail(err, MPS_ECORRUPT, "%s: tensor '%s%s' is missing (config.json: n_layer=%d needs %d tensors, the header "
                 "lists %d)", path, prefixed ? PREFIX : "", hkey, cfg->n_layer, mps_tensor_count(cfg), n);
        goto out;
    }

    /* Map keys to canonical tensors and check their shapes against the config. */
    f->nsrc = mps_tensor_count(cfg);
    f->src = calloc((size_t)f->nsrc, sizeof *f->src);
    seen = malloc((size_t)f->nsrc * sizeof *seen);
    if (f->src == NULL || seen == NULL) {
        mps_fail(err, MPS_ENOMEM, "%s: out of memory", path);
        goto out;
    }
    for (int i = 0; i < f->nsrc; i++)
        seen[i] = -1;
    for (int i = 0; i < n; i++) {
        int has_prefix, layer = -1, idx = key_index(cfg, ents[i].key, &has_prefix, &layer);
        prefixed |= has_prefix;
        if (idx == KEY_LM_HEAD) {
            lm_head = i;
            ents[i].role = 2;
            continue;
        }
        if (idx == -3)
            continue; /* attention mask buffers: not parameters */
        if (key_error(path, cfg, ents[i].key, idx, layer, err) != 0)
            goto out;
        if (seen[idx] >= 0) {
            mps_fail(err, MPS_ECORRUPT, "%s: tensors '%s' and '%s' are the same parameter", path,
                     ents[seen[idx]].key, ents[i].key);
            goto out;
        }
        seen[idx] = i;
        if (idx == MPS_TENSOR_WTE)
            ents[i].role = 1;
        char hkey[96];
        int ndim, transpose;
        int64_t shape[2];
        hf_tensor(cfg, idx, hkey, sizeof hkey, &ndim, shape, &transpose);
        st_entry *e = &ents[i];
        if (e->ndim != ndim || e->shape[0] != shape[0] || (ndim == 2 && e->shape[1] != shape[1])) {
            char got[160] = "", want[64];
            for (int d = 0; d < e->ndim && strlen(got) < 120; d++)
                snprintf(got + strlen(got), sizeof got - strlen(got), "%s%lld", d ? ", " : "", (long long)e->shape[d]);
            if (ndim == 2)
                snprintf(want, sizeof want, "%lld, %lld", (long long)shape[0], (long long)shape[1]);
            else
                snprintf(want, sizeof want, "%lld", (long long)shape[0]);
            mps_fail(err, MPS_ECORRUPT, "%s: tensor '%s': shape (%s) but config.json implies (%s)", path, e->key, got,
                     want);
            goto out;
        }
        if (e->src_dtype < 0) {
            mps_fail(err, MPS_EUNSUPPORTED, "%s: tensor '%s': dtype %s is not supported (F32, BF16, F16)", path, e->key,
                     e->dtype);
            goto out;
        }
        mps_src *s = &f->src[idx];
        snprintf(s->key, sizeof s->key, "%s", e->key);
        s->offset = data_start + e->begin;
        s->dtype = e->src_dtype;
        s->numel = e->numel;
        s->transpose = transpose;
        s->tk = shape[0];
        s->tr = shape[1];
    }
    for (int i = 0; i < f->nsrc; i++) {
        if (seen[i] < 0) {
            char hkey[96];
            int ndim, transpose;
            int64_t shape[2];
            hf_tensor(cfg, i, hkey, sizeof hkey, &ndim, shape, &transpose);
            mps_fail(err, MPS_ECORRUPT, "%s: tensor '%s%s' is missing", path, prefixed ? PREFIX : "", hkey);
            goto out;
        }
    }
    if (lm_head >= 0) {
        st_entry *e = &ents[lm_head], *w = &ents[seen[MPS_TENSOR_WTE]];
        if (e->ndim != 2 || e->shape[0] != w->shape[0] || e->shape[1] != w->shape[1]) {
            mps_fail(err, MPS_ECORRUPT, "%s: tensor 'lm_head.weight': shape differs from '%s' (the head is tied to it)",
                     path, w->key);
            goto out;
        }
        if (e->src_dtype != w->src_dtype) {
            mps_fail(err, MPS_EUNSUPPORTED, "%s: tensor 'lm_head.weight': dtype %s differs from '%s' (%s); "
                     "an untied output head is not supported", path, e->dtype, w->key, w->dtype);
            goto out;
        }
        if (e->begin != w->begin) {
            f->has_tied = 1;
            f->tied = f->src[MPS_TENSOR_WTE];
            snprintf(f->tied.key, sizeof f->tied.key, "%s", e->key);
            f->tied.offset = data_start + e->begin;
        }
    }
    if (check_overlaps(path, ents, n, err) != 0)
        goto out;

    int all_bf16 = 1;
    for (int i = 0; i < f->nsrc; i++)
        if (f->src[i].dtype != MPS_SRC_BF16)
            all_bf16 = 0;
    f->dtype = all_bf16 ? MPS_DTYPE_BF16 : MPS_DTYPE_F32;
    rc = 0;
out:
    if (root)
        json_decref(root);
    if (croot)
        json_decref(croot);
    free(hbuf);
    free(ents);
    free(seen);
    return rc;
}

/* ---------------------------------------------------------------------------------------------
 * Writing */

static char *generate_config(const mps_config *cfg)
{
    json_t *o = json_object();
    json_t *arch = json_array();
    json_array_append_new(arch, json_string("GPT2LMHeadModel"));
    json_object_set_new(o, "architectures", arch);
    json_object_set_new(o, "model_type", json_string("gpt2"));
    json_object_set_new(o, "n_layer", json_integer(cfg->n_layer));
    json_object_set_new(o, "n_embd", json_integer(cfg->n_embd));
    json_object_set_new(o, "n_head", json_integer(cfg->n_head));
    json_object_set_new(o, "vocab_size", json_integer(cfg->vocab));
    json_object_set_new(o, "n_positions", json_integer(cfg->n_positions));
    json_object_set_new(o, "n_ctx", json_integer(cfg->n_positions));
    json_object_set_new(o, "activation_function", json_string("gelu_new"));
    json_object_set_new(o, "layer_norm_epsilon", json_real(1e-5));
    json_object_set_new(o, "n_inner", json_null());
    json_object_set_new(o, "tie_word_embeddings", json_true());
    json_int_t tok = cfg->vocab > 50256 ? 50256 : (json_int_t)cfg->vocab - 1;
    json_object_set_new(o, "bos_token_id", json_integer(tok));
    json_object_set_new(o, "eos_token_id", json_integer(tok));
    json_object_set_new(o, "resid_pdrop", json_real(0.1));
    json_object_set_new(o, "embd_pdrop", json_real(0.1));
    json_object_set_new(o, "attn_pdrop", json_real(0.1));
    json_object_set_new(o, "initializer_range", json_real(0.02));
    json_object_set_new(o, "scale_attn_weights", json_true());
    json_object_set_new(o, "use_cache", json_true());
    char *s = json_dumps(o, JSON_INDENT(2) | JSON_REAL_PRECISION(6));
    json_decref(o);
    if (s == NULL)
        return NULL;
    size_t n = strlen(s);
    char *t = realloc(s, n + 2);
    if (t == NULL) {
        free(s);
        return NULL;
    }
    t[n] = '\n';
    t[n + 1] = '\0';
    return t;
}

static int check_given_config(const char *text, const mps_config *cfg, mps_err *err)
{
    const char *name = "config.json (from the checkpoint)";
    json_error_t jerr;
    json_t *root = json_loads(text, JSON_REJECT_DUPLICATES, &jerr);
    if (root == NULL)
        return mps_fail(err, MPS_ECORRUPT, "%s: line %d: %s", name, jerr.line, jerr.text);
    mps_config c;
    int rc = hf_config_parse(root, name, &c, err);
    json_decref(root);
    if (rc != 0)
        return -1;
    const char *field = NULL;
    long long have = 0, want = 0;
    if (c.n_layer != cfg->n_layer)
        field = "n_layer", have = c.n_layer, want = cfg->n_layer;
    else if (c.n_embd != cfg->n_embd)
        field = "n_embd", have = c.n_embd, want = cfg->n_embd;
    else if (c.n_head != cfg->n_head)
        field = "n_head", have = c.n_head, want = cfg->n_head;
    else if (c.vocab != cfg->vocab)
        field = "vocab_size", have = c.vocab, want = cfg->vocab;
    else if (c.n_positions != cfg->n_positions)
        field = "n_positions", have = c.n_positions, want = cfg->n_positions;
    if (field)
        return mps_fail(err, MPS_ECORRUPT, "%s: %s=%lld but the model has %s=%lld", name, field, have, field, want);
    return 0;
}

int mps_safetensors_create(const char *dir, const mps_config *cfg, mps_dtype dtype, const char *hf_config_json,
                           mps_out_file **out, mps_err *err)
{
    *out = NULL;
    if (mps_config_validate(cfg, err) != 0)
        return -1;
    if (dtype != MPS_DTYPE_F32 && dtype != MPS_DTYPE_BF16)
        return mps_fail(err, MPS_EUSAGE, "%s: unsupported dtype %d", dir, (int)dtype);
    char *config_text;
    if (hf_config_json) {
        if (check_given_config(hf_config_json, cfg, err) != 0)
            return -1;
        config_text = strdup(hf_config_json);
    } else {
        config_text = generate_config(cfg);
    }
    if (config_text == NULL)
        return mps_fail(err, MPS_ENOMEM, "%s: out of memory", dir);

    int nitems = mps_tensor_count(cfg);
    mps_out_item *items = calloc((size_t)nitems, sizeof *items);
    json_t *hdr = json_object();
    json_t *meta = json_object();
    if (items == NULL || hdr == NULL || meta == NULL) {
        free(items);
        free(config_text);
        json_decref(hdr);
        json_decref(meta);
        return mps_fail(err, MPS_ENOMEM, "%s: out of memory", dir);
    }
    json_object_set_new(meta, "format", json_string("pt"));
    json_object_set_new(hdr, "__metadata__", meta);
    int64_t off = 0;
    for (int i = 0; i < nitems; i++) {
        mps_tensor_spec spec;
        mps_tensor_spec_get(cfg, i, &spec);
        char hkey[96], fkey[112];
        int ndim, transpose;
        int64_t shape[2];
        hf_tensor(cfg, i, hkey, sizeof hkey, &ndim, shape, &transpose);
        items[i].tensor = i;
        items[i].transpose = transpose;
        items[i].rows = i == MPS_TENSOR_WTE ? cfg->vocab : spec.shape[0];
        int64_t nb = mps_out_item_bytes(cfg, &items[i], dtype);
        snprintf(fkey, sizeof fkey, PREFIX "%s", hkey);
        json_t *t = json_object(), *sh = json_array(), *offs = json_array();
        for (int d = 0; d < ndim; d++)
            json_array_append_new(sh, json_integer(shape[d]));
        json_array_append_new(offs, json_integer(off));
        json_array_append_new(offs, json_integer(off + nb));
        json_object_set_new(t, "dtype", json_string(dtype == MPS_DTYPE_BF16 ? "BF16" : "F32"));
        json_object_set_new(t, "shape", sh);
        json_object_set_new(t, "data_offsets", offs);
        json_object_set_new(hdr, fkey, t);
        off += nb;
    }
    char *h = json_dumps(hdr, JSON_COMPACT);
    json_decref(hdr);
    if (h == NULL) {
        free(items);
        free(config_text);
        return mps_fail(err, MPS_ENOMEM, "%s: out of memory", dir);
    }
    size_t hl = strlen(h), padded = (hl + 7) / 8 * 8;
    unsigned char *head = malloc(8 + padded);
    if (head == NULL) {
        free(h);
        free(items);
        free(config_text);
        return mps_fail(err, MPS_ENOMEM, "%s: out of memory", dir);
    }
    for (int i = 0; i < 8; i++)
        head[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    memcpy(head + 8, h, hl);
    memset(head + 8 + hl, ' ', padded - hl);
    free(h);

    mps_out_file *f;
    if (mps_out_file_begin(dir, "model.safetensors", dtype, items, nitems, 8 + (int64_t)padded + off, "config.json",
                           config_text, &f, err) != 0) {
        free(head);
        return -1;
    }
    if (mps_out_file_write(f, head, 8 + padded, err) != 0) {
        free(head);
        mps_out_file_abort(f);
        return -1;
    }
    free(head);
    *out = f;
    return 0;
}
