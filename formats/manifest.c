/* manifest.json: the commit point of a checkpoint (FORMAT.md, "Manifest"). */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "arch.h"
#include "ckpt.h"
#include "modelfile_internal.h" /* mps_rope_scaling_json */
#include "safe_open.h"

#define CHECKSUM_KEY "\"manifest_xxh3\": \""
#define MAX_MANIFEST_BYTES (64 << 20)

void mps_shard_file_name(int rank, char *buf, size_t size) { snprintf(buf, size, "rank-%05d.h5", rank); }

void mps_checkpoint_id_new(char out[33])
{
    unsigned char bytes[16];
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    ssize_t n = fd >= 0 ? read(fd, bytes, sizeof bytes) : -1;
    if (fd >= 0)
        close(fd);
    if (n != (ssize_t)sizeof bytes) { /* fall back to time and pid: uniqueness, not secrecy, matters */
        uint64_t a = (uint64_t)time(NULL) * 6364136223846793005ull + (uint64_t)getpid();
        uint64_t b = mps_xxh3(&a, sizeof a);
        memcpy(bytes, &a, 8);
        memcpy(bytes + 8, &b, 8);
    }
    for (int i = 0; i < 16; i++)
        snprintf(out + 2 * i, 3, "%02x", bytes[i]);
}

void mps_manifest_init(mps_manifest *m, const mps_config *cfg, const mps_layout *L)
{
    memset(m, 0, sizeof *m);
    /* the oldest version that describes the model, so that older mpshard releases read what they
     * can: version 2 adds the Llama family (a GPT-2 checkpoint stays version 1), version 3
     * model.sliding_window (a release that ignored it would train past the window) and
     * model.head_dim */
    m->format_version = cfg->arch == MPS_ARCH_GPT2 ? 1 : cfg->sliding_window || cfg->head_dim ? 3 : 2;
    mps_checkpoint_id_new(m->checkpoint_id);
    m->cfg = *cfg;
    m->layout = *L;
    m->kinds = (1u << MPS_KIND_PARAM) | (1u << MPS_KIND_ADAM_M) | (1u << MPS_KIND_ADAM_V);
    m->chunk_bytes = MPS_DEFAULT_CHUNK_BYTES;
    m->zstd_level = MPS_DEFAULT_ZSTD_LEVEL;
    snprintf(m->created_by, sizeof m->created_by, "mpshard %s", MPS_VERSION);
}

void mps_manifest_free(mps_manifest *m)
{
    free(m->train_state_json);
    free(m->hf_config_json);
    free(m->files);
    m->train_state_json = m->hf_config_json = NULL;
    m->files = NULL;
    m->nfiles = 0;
}

int mps_manifest_copy_header(mps_manifest *dst, const mps_manifest *src, mps_err *err)
{
    *dst = *src;
    dst->files = NULL;
    dst->nfiles = 0;
    dst->train_state_json = src->train_state_json ? strdup(src->train_state_json) : NULL;
    dst->hf_config_json = src->hf_config_json ? strdup(src->hf_config_json) : NULL;
    if ((src->train_state_json && !dst->train_state_json) || (src->hf_config_json && !dst->hf_config_json))
        return mps_fail(err, MPS_ENOMEM, "out of memory");
    return 0;
}

static json_t *layout_json(const mps_layout *L)
{
    json_t *stages = json_array();
    for (int s = 0; s < L->pp; s++)
        json_array_append_new(stages, json_integer(L->stage_first[s + 1] - L->stage_first[s]));
    return json_pack("{s:i, s:i, s:i, s:i, s:o}", "dp", L->dp, "pp", L->pp, "tp", L->tp, "zero", L->zero,
                     "stage_layers", stages);
}

/* The model section: GPT-2's six numbers, and for the Llama family every field of the config. */
static json_t *model_json(const mps_config *c)
{
    json_t *o = json_pack("{s:s, s:i, s:i, s:i, s:i, s:I, s:I}", "arch", mps_arch_name(c->arch), "n_layer", c->n_layer,
                          "n_embd", c->n_embd, "n_head", c->n_head, "n_positions", c->n_positions, "vocab",
                          (json_int_t)c->vocab, "padded_vocab", (json_int_t)c->padded_vocab);
    if (c->arch == MPS_ARCH_GPT2)
        return o;
    json_object_set_new(o, "family", json_string(mps_family_name(c->family)));
    json_object_set_new(o, "n_kv_head", json_integer(c->n_kv_head));
    json_object_set_new(o, "ffn", json_integer(c->ffn));
    json_object_set_new(o, "tied", json_boolean(!c->untied));
    json_object_set_new(o, "qkv_bias", json_boolean(c->qkv_bias));
    json_object_set_new(o, "norm_eps", json_real(c->norm_eps));
    json_object_set_new(o, "rope_theta", json_real(c->rope_theta));
    json_object_set_new(o, "rope_scaling", mps_rope_scaling_json(c, "type"));
    if (c->sliding_window)
        json_object_set_new(o, "sliding_window", json_integer(c->sliding_window));
    if (c->head_dim)
        json_object_set_new(o, "head_dim", json_integer(c->head_dim));
    return o;
}

int mps_manifest_write(const char *path, const mps_manifest *m, mps_err *err)
{
    json_t *root = json_object();
    json_object_set_new(root, "format", json_string("mpshard"));
    json_object_set_new(root, "format_version", json_integer(m->format_version));
    json_object_set_new(root, "checkpoint_id", json_string(m->checkpoint_id));
    json_object_set_new(root, "created_by", json_string(m->created_by));
    json_object_set_new(root, "model", model_json(&m->cfg));
    json_t *tensors = json_array();
    for (int t = 0; t < mps_tensor_count(&m->cfg); t++) {
        mps_tensor_spec s;
        mps_tensor_spec_get(&m->cfg, t, &s);
        json_t *shape = json_array();
        for (int d = 0; d < s.ndim; d++)
            json_array_append_new(shape, json_integer(s.shape[d]));
        json_array_append_new(tensors, json_pack("{s:s, s:o, s:i}", "name", s.name, "shape", shape, "tp_dim", s.tp_dim));
    }
    json_object_set_new(root, "tensors", tensors);
    json_object_set_new(root, "layout", layout_json(&m->layout));
    json_t *kinds = json_object();
    for (int k = 0; k < MPS_KIND_COUNT; k++)
        if (m->kinds & (1u << k))
            json_object_set_new(kinds, mps_kind_name((mps_kind)k), json_string(mps_dtype_name(m->dtype[k])));
    json_object_set_new(root, "kinds", kinds);
    json_object_set_new(root, "storage", json_pack("{s:I, s:s, s:i, s:s, s:s}", "chunk_bytes", (json_int_t)m->chunk_bytes,
        "compression", "shuffle+zstd", "zstd_level", m->zstd_level, "checksum", "xxh3-64 per chunk", "filter_id", "32015"));
    json_t *state = json_pack("{s:I, s:s, s:I}", "step", (json_int_t)m->step, "rng_seed", "", "data_position",
                              (json_int_t)m->data_position);
    char seed[24];
    snprintf(seed, sizeof seed, "%" PRIu64, m->rng_seed);
    json_object_set_new(state, "rng_seed", json_string(seed)); /* a string: JSON numbers lose 64-bit precision */
    if (m->train_state_json) {
        json_error_t jerr;
        json_t *extra = json_loads(m->train_state_json, 0, &jerr);
        if (extra)
            json_object_set_new(state, "train", extra);
    }
    json_object_set_new(root, "state", state);
    json_t *source = json_pack("{s:s, s:s}", "format", m->source_format, "dtype", mps_dtype_name(m->source_dtype));
    if (m->hf_config_json) {
        /* the parsed object for readers that want its fields; the text itself, which export
         * writes back byte for byte (a JSON round trip turns 0.1 into 0.10000000000000001) */
        json_error_t jerr;
        json_t *hf = json_loads(m->hf_config_json, 0, &jerr);
        if (hf)
            json_object_set_new(source, "hf_config", hf);
        json_t *text = json_string(m->hf_config_json);
        if (text)
            json_object_set_new(source, "hf_config_text", text);
    }
    json_object_set_new(root, "source", source);
    json_t *files = json_array();
    for (int i = 0; i < m->nfiles; i++)
        json_array_append_new(files, json_pack("{s:i, s:s, s:I}", "rank", m->files[i].rank, "name", m->files[i].name,
                                               "bytes", (json_int_t)m->files[i].bytes));
    json_object_set_new(root, "files", files);
    json_object_set_new(root, "manifest_xxh3", json_string("0000000000000000"));
    char *text = json_dumps(root, JSON_INDENT(1));
    json_decref(root);
    if (!text)
        return mps_fail(err, MPS_ENOMEM, "%s: cannot serialise the manifest", path);
    /* The checksum covers the whole text with its own value written as 16 zeros. */
    char *slot = strstr(text, CHECKSUM_KEY "0000000000000000");
    uint64_t h = mps_xxh3(text, strlen(text));
    char hex[17];
    snprintf(hex, sizeof hex, "%016" PRIx64, h);
    memcpy(slot + strlen(CHECKSUM_KEY), hex, 16);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    size_t len = strlen(text);
    int rc = 0;
    if (fd < 0)
        rc = mps_fail(err, MPS_EIO, "%s: cannot create: %s", path, strerror(errno));
    else if (write(fd, text, len) != (ssize_t)len || write(fd, "\n", 1) != 1 || fsync(fd) != 0)
        rc = mps_fail(err, MPS_EIO, "%s: write failed: %s", path, strerror(errno));
    if (fd >= 0 && close(fd) != 0 && rc == 0)
        rc = mps_fail(err, MPS_EIO, "%s: close failed: %s", path, strerror(errno));
    free(text);
    return rc;
}

static int get_int(json_t *obj, const char *key, int64_t lo, int64_t hi, int64_t *out, const char *path, mps_err *err)
{
    json_t *v = json_object_get(obj, key);
    if (!json_is_integer(v))
        return mps_fail(err, MPS_ECORRUPT, "%s: field '%s' missing or not an integer", path, key);
    int64_t x = json_integer_value(v);
    if (x < lo || x > hi)
        return mps_fail(err, MPS_ECORRUPT, "%s: field '%s'=%lld out of range", path, key, (long long)x);
    *out = x;
    return 0;
}

/* Copies a JSON string into a fixed field, cut at a character boundary (a cut UTF-8 sequence
 * would make the manifest unwritable). */
static void copy_text(char *dst, size_t size, json_t *v)
{
    const char *s = json_is_string(v) ? json_string_value(v) : "";
    size_t n = strlen(s);
    if (n >= size) {
        n = size - 1;
        while (n > 0 && ((unsigned char)s[n] & 0xc0) == 0x80) /* s[n] continues a sequence */
            n--;
    }
    memcpy(dst, s, n);
    dst[n] = '\0';
}

static int is_hex_id(const char *s)
{
    if (strlen(s) != 32)
        return 0;
    for (int i = 0; i < 32; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return 0;
    return 1;
}

static int cmp_int(const void *a, const void *b)
{
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

static int read_file_text(const char *path, char **out, size_t *len, mps_err *err)
{
    struct stat st;
    mps_err oerr;
    mps_err_clear(&oerr);
    int fd = mps_open_input(path, MPS_ECORRUPT, &st, &oerr); /* a FIFO must not block: refused */
    if (fd < 0)
        return mps_fail(err, oerr.code, "%s%s", oerr.msg, errno == ENOENT ? " (not a committed mpshard checkpoint)" : "");
    if (st.st_size > MAX_MANIFEST_BYTES) {
        close(fd);
        return mps_fail(err, MPS_ECORRUPT, "%s: larger than %d bytes", path, MAX_MANIFEST_BYTES);
    }
    char *buf = malloc((size_t)st.st_size + 1);
    if (!buf) {
        close(fd);
        return mps_fail(err, MPS_ENOMEM, "%s: out of memory", path);
    }
    ssize_t n = read(fd, buf, (size_t)st.st_size);
    close(fd);
    if (n != st.st_size) {
        free(buf);
        return mps_fail(err, MPS_EIO, "%s: short read", path);
    }
    buf[n] = '\0';
    *out = buf;
    *len = (size_t)n;
    return 0;
}

static int get_real(json_t *o, const char *key, double lo, double hi, double *out, const char *path, mps_err *err)
{
    json_t *v = json_object_get(o, key);
    if (!json_is_number(v) || !(json_number_value(v) >= lo && json_number_value(v) <= hi))
        return mps_fail(err, MPS_ECORRUPT, "%s: model.%s missing or out of range", path, key);
    *out = json_number_value(v);
    return 0;
}

/* The model section (model_json); an architecture or family this mpshard does not know is
 * refused by name. */
static int parse_model(json_t *model, const char *path, mps_config *c, mps_err *err)
{
    int64_t nl = 0, ne = 0, nh = 0, np = 0, vv = 0, pv = 0; /* set by get_int or unused: GCC 13 -O3 cannot see it */
    memset(c, 0, sizeof *c);
    if (!json_is_object(model) || get_int(model, "n_layer", 1, 1 << 20, &nl, path, err) ||
        get_int(model, "n_embd", 1, 1 << 24, &ne, path, err) || get_int(model, "n_head", 1, 1 << 24, &nh, path, err) ||
        get_int(model, "n_positions", 1, 1 << 24, &np, path, err) ||
        get_int(model, "vocab", 1, (int64_t)1 << 31, &vv, path, err) ||
        get_int(model, "padded_vocab", 1, (int64_t)1 << 31, &pv, path, err))
        return mps_fail(err, MPS_ECORRUPT, "%s: bad 'model' object", path);
    c->n_layer = (int)nl;
    c->n_embd = (int)ne;
    c->n_head = (int)nh;
    c->n_positions = (int)np;
    c->vocab = vv;
    c->padded_vocab = pv;
    json_t *arch = json_object_get(model, "arch");
    const char *an = json_is_string(arch) ? json_string_value(arch) : "gpt2"; /* format 1 wrote gpt2 always */
    int a = mps_arch_from_name(an);
    if (a < 0)
        return mps_fail(err, MPS_EUNSUPPORTED, "%s: model.arch '%.40s' is not an architecture this mpshard knows "
                        "(gpt2, llama)", path, an);
    c->arch = (mps_arch_id)a;
    if (c->arch == MPS_ARCH_GPT2)
        return 0;
    json_t *fam = json_object_get(model, "family"), *tied = json_object_get(model, "tied"),
           *bias = json_object_get(model, "qkv_bias"), *rs = json_object_get(model, "rope_scaling");
    int f = json_is_string(fam) ? mps_family_from_name(json_string_value(fam)) : -1;
    int64_t kv, ffn, orig;
    if (f < 0 || f == MPS_FAMILY_GPT2)
        return mps_fail(err, MPS_EUNSUPPORTED, "%s: model.family missing or not one this mpshard knows "
                        "(llama, mistral, qwen2)", path);
    c->family = (mps_family)f;
    if (get_int(model, "n_kv_head", 1, 1 << 24, &kv, path, err) || get_int(model, "ffn", 1, (int64_t)1 << 26, &ffn, path, err) ||
        get_real(model, "norm_eps", 0, 1, &c->norm_eps, path, err) ||
        get_real(model, "rope_theta", 1, 1e12, &c->rope_theta, path, err))
        return -1;
    if (!json_is_boolean(tied) || !json_is_boolean(bias))
        return mps_fail(err, MPS_ECORRUPT, "%s: model.tied and model.qkv_bias must be true or false", path);
    c->n_kv_head = (int)kv;
    c->ffn = ffn;
    c->untied = !json_is_true(tied);
    c->qkv_bias = json_is_true(bias);
    if (rs && !json_is_null(rs)) {
        json_t *type = json_object_get(rs, "type");
        const int rt = json_is_object(rs) && json_is_string(type) ? mps_rope_type_from_name(json_string_value(type)) : -1;
        if (rt == MPS_ROPE_LINEAR || rt == MPS_ROPE_DYNAMIC) {
            c->rope.type = (mps_rope_type)rt;
            return get_real(rs, "factor", 0, 1e6, &c->rope.factor, path, err);
        }
        if (rt != MPS_ROPE_LLAMA3)
            return mps_fail(err, MPS_EUNSUPPORTED, "%s: model.rope_scaling: only types llama3, linear and dynamic are "
                            "known", path);
        c->rope.type = MPS_ROPE_LLAMA3;
        if (get_real(rs, "factor", 1, 1e6, &c->rope.factor, path, err) ||
            get_real(rs, "low_freq_factor", 0, 1e6, &c->rope.low_freq_factor, path, err) ||
            get_real(rs, "high_freq_factor", 0, 1e6, &c->rope.high_freq_factor, path, err) ||
            get_int(rs, "original_max_position_embeddings", 1, 1 << 24, &orig, path, err))
            return -1;
        c->rope.original_max_positions = (int)orig;
    }
    int64_t window = 0;
    if (json_object_get(model, "sliding_window") != NULL &&
        get_int(model, "sliding_window", 1, 1 << 24, &window, path, err) != 0)
        return -1;
    c->sliding_window = (int)window;
    int64_t head_dim = 0;
    if (json_object_get(model, "head_dim") != NULL && get_int(model, "head_dim", 1, 1 << 16, &head_dim, path, err) != 0)
        return -1;
    c->head_dim = (int)head_dim;
    return 0;
}

/* The manifest's tensor list is normative: it must be the catalogue of its model, tensor by
 * tensor (name, shape, TP dimension), so that a reader never interprets datasets by a different
 * description than the writer's. */
static int check_tensor_list(json_t *list, const char *path, const mps_config *cfg, mps_err *err)
{
    int nt = mps_tensor_count(cfg);
    if (!json_is_array(list) || json_array_size(list) != (size_t)nt)
        return mps_fail(err, MPS_ECORRUPT, "%s: 'tensors' must list the model's %d tensors", path, nt);
    for (int t = 0; t < nt; t++) {
        mps_tensor_spec s;
        mps_tensor_spec_get(cfg, t, &s);
        json_t *e = json_array_get(list, (size_t)t), *name = json_object_get(e, "name"),
               *shape = json_object_get(e, "shape"), *tp = json_object_get(e, "tp_dim");
        int ok = json_is_string(name) && strcmp(json_string_value(name), s.name) == 0 && json_is_integer(tp) &&
                 json_integer_value(tp) == s.tp_dim && json_is_array(shape) && json_array_size(shape) == (size_t)s.ndim;
        for (int d = 0; ok && d < s.ndim; d++)
            ok = json_is_integer(json_array_get(shape, (size_t)d)) &&
                 json_integer_value(json_array_get(shape, (size_t)d)) == s.shape[d];
        if (!ok)
            return mps_fail(err, MPS_ECORRUPT, "%s: tensors[%d] is not %s as this mpshard's %s architecture "
                            "describes it (name, shape, tp_dim)", path, t, s.name, mps_arch_name(cfg->arch));
    }
    return 0;
}

int mps_manifest_read(const char *path, mps_manifest *m, mps_err *err)
{
    memset(m, 0, sizeof *m);
    char *text = NULL;
    size_t len = 0;
    if (read_file_text(path, &text, &len, err) != 0)
        return -1;
    /* checksum first: a flipped byte anywhere is reported as such, not as a parse error */
    char *slot = strstr(text, CHECKSUM_KEY);
    char *next = slot ? strstr(slot + 1, CHECKSUM_KEY) : NULL;
    if (!slot || next || len < (size_t)(slot - text) + strlen(CHECKSUM_KEY) + 16) {
        free(text);
        return mps_fail(err, MPS_ECORRUPT, "%s: no manifest checksum (damaged or not an mpshard manifest)", path);
    }
    char stored[17], *digits = slot + strlen(CHECKSUM_KEY);
    memcpy(stored, digits, 16);
    stored[16] = '\0';
    memset(digits, '0', 16);
    if (len > 0 && text[len - 1] == '\n')
        len--;
    char hex[17];
    snprintf(hex, sizeof hex, "%016" PRIx64, mps_xxh3(text, len));
    memcpy(digits, stored, 16);
    if (strcmp(hex, stored) != 0) {
        free(text);
        return mps_fail(err, MPS_ECORRUPT, "%s: manifest checksum mismatch (stored %s, computed %s): the file is damaged",
                        path, stored, hex);
    }
    json_error_t jerr;
    json_t *root = json_loads(text, JSON_REJECT_DUPLICATES, &jerr);
    free(text);
    if (!root)
        return mps_fail(err, MPS_ECORRUPT, "%s: invalid JSON at line %d: %s", path, jerr.line, jerr.text);
    int rc = -1;
    int64_t v = 0; /* get_int sets it or fails; GCC 12/13 at -O3 cannot see that */
    int *ranks = NULL;
    json_t *fmt = json_object_get(root, "format");
    if (!json_is_string(fmt) || strcmp(json_string_value(fmt), "mpshard") != 0) {
        mps_fail(err, MPS_ECORRUPT, "%s: not an mpshard manifest", path);
        goto out;
    }
    if (get_int(root, "format_version", 1, 1 << 20, &v, path, err) != 0)
        goto out;
    if (v > MPS_FORMAT_VERSION) {
        mps_fail(err, MPS_EUNSUPPORTED, "%s: format version %lld is newer than this mpshard reads (%d)", path,
                 (long long)v, MPS_FORMAT_VERSION);
        goto out;
    }
    m->format_version = (int)v;
    json_t *id = json_object_get(root, "checkpoint_id");
    if (!json_is_string(id) || !is_hex_id(json_string_value(id))) {
        mps_fail(err, MPS_ECORRUPT, "%s: checkpoint_id is not 32 hexadecimal digits", path);
        goto out;
    }
    strcpy(m->checkpoint_id, json_string_value(id));
    copy_text(m->created_by, sizeof m->created_by, json_object_get(root, "created_by"));
    if (parse_model(json_object_get(root, "model"), path, &m->cfg, err) != 0)
        goto out;
    if ((m->cfg.sliding_window || m->cfg.head_dim) && m->format_version < 3) { /* (unknown to version 2) */
        mps_fail(err, MPS_ECORRUPT, "%s: model.%s in a manifest of format version %d (it needs 3)", path,
                 m->cfg.sliding_window ? "sliding_window" : "head_dim", m->format_version);
        goto out;
    }
    if (mps_config_validate(&m->cfg, err) != 0) {
        mps_wrap(err, "%s", path);
        err->code = MPS_ECORRUPT;
        goto out;
    }
    if (check_tensor_list(json_object_get(root, "tensors"), path, &m->cfg, err) != 0)
        goto out;
    json_t *lay = json_object_get(root, "layout");
    int64_t dp = 0, pp = 0, tp = 0, zero = 0;
    if (!json_is_object(lay)) {
        mps_fail(err, MPS_ECORRUPT, "%s: 'layout' missing or not an object", path);
        goto out;
    }
    if (get_int(lay, "dp", 1, MPS_MAX_PAR, &dp, path, err) ||
        get_int(lay, "pp", 1, MPS_MAX_PP, &pp, path, err) || get_int(lay, "tp", 1, MPS_MAX_PAR, &tp, path, err) ||
        get_int(lay, "zero", 0, 3, &zero, path, err))
        goto out;
    m->layout.dp = (int)dp;
    m->layout.pp = (int)pp;
    m->layout.tp = (int)tp;
    m->layout.zero = (int)zero;
    json_t *stages = json_object_get(lay, "stage_layers");
    if (!json_is_array(stages) || json_array_size(stages) != (size_t)pp) {
        mps_fail(err, MPS_ECORRUPT, "%s: layout.stage_layers must list %lld stages", path, (long long)pp);
        goto out;
    }
    m->layout.explicit_stages = 1;
    int first = 0;
    for (int s = 0; s < (int)pp; s++) {
        json_t *n = json_array_get(stages, (size_t)s);
        if (!json_is_integer(n) || json_integer_value(n) < 1 || json_integer_value(n) > m->cfg.n_layer) {
            mps_fail(err, MPS_ECORRUPT, "%s: layout.stage_layers[%d] invalid", path, s);
            goto out;
        }
        m->layout.stage_first[s] = first;
        first += (int)json_integer_value(n);
    }
    m->layout.stage_first[pp] = first;
    if (mps_layout_validate(&m->layout, &m->cfg, err) != 0) {
        mps_wrap(err, "%s: layout", path);
        err->code = MPS_ECORRUPT;
        goto out;
    }
    json_t *kinds = json_object_get(root, "kinds");
    const char *kname;
    json_t *kval;
    if (!json_is_object(kinds)) {
        mps_fail(err, MPS_ECORRUPT, "%s: 'kinds' missing", path);
        goto out;
    }
    json_object_foreach(kinds, kname, kval) {
        int k = mps_kind_from_name(kname);
        int d = json_is_string(kval) ? mps_dtype_from_name(json_string_value(kval)) : -1;
        if (k < 0 || k == MPS_KIND_GRAD || d < 0 || d == MPS_DTYPE_F16) {
            mps_fail(err, MPS_ECORRUPT, "%s: unknown state kind or dtype '%s'", path, kname);
            goto out;
        }
        m->kinds |= 1u << k;
        m->dtype[k] = (mps_dtype)d;
    }
    json_t *storage = json_object_get(root, "storage");
    int64_t level = 0;
    if (!json_is_object(storage)) {
        mps_fail(err, MPS_ECORRUPT, "%s: 'storage' missing or not an object", path);
        goto out;
    }
    if (get_int(storage, "chunk_bytes", 4, MPS_MAX_CHUNK_BYTES, &m->chunk_bytes, path, err) ||
        get_int(storage, "zstd_level", -131072, 22, &level, path, err))
        goto out;
    m->zstd_level = (int)level;
    json_t *state = json_object_get(root, "state");
    if (!json_is_object(state)) {
        mps_fail(err, MPS_ECORRUPT, "%s: 'state' missing or not an object", path);
        goto out;
    }
    if (get_int(state, "step", 0, INT64_MAX, &m->step, path, err) ||
        get_int(state, "data_position", 0, MPS_MAX_DATA_POSITION, &m->data_position, path, err))
        goto out;
    json_t *seed = json_object_get(state, "rng_seed");
    if (seed) { /* a string of decimal digits (a JSON number loses 64-bit precision) */
        const char *d = json_is_string(seed) ? json_string_value(seed) : "";
        char *end;
        errno = 0;
        m->rng_seed = strtoull(d, &end, 10);
        if (*d < '0' || *d > '9' || *end != '\0' || errno == ERANGE) {
            mps_fail(err, MPS_ECORRUPT, "%s: state.rng_seed is not a 64-bit unsigned integer in a string", path);
            goto out;
        }
    }
    json_t *train = json_object_get(state, "train");
    if (train)
        m->train_state_json = json_dumps(train, JSON_COMPACT);
    json_t *source = json_object_get(root, "source");
    if (json_is_object(source)) {
        json_t *sf = json_object_get(source, "format"), *sd = json_object_get(source, "dtype");
        copy_text(m->source_format, sizeof m->source_format, sf);
        int d = json_is_string(sd) ? mps_dtype_from_name(json_string_value(sd)) : 0;
        m->source_dtype = d < 0 ? MPS_DTYPE_F32 : (mps_dtype)d;
        json_t *hf = json_object_get(source, "hf_config"), *hf_text = json_object_get(source, "hf_config_text");
        if (hf_text && !json_is_string(hf_text)) {
            mps_fail(err, MPS_ECORRUPT, "%s: source.hf_config_text is not a string", path);
            goto out;
        }
        if (hf_text) /* the original bytes */
            m->hf_config_json = strdup(json_string_value(hf_text));
        else if (hf) /* manifests written before hf_config_text: the object, re-serialised */
            m->hf_config_json = json_dumps(hf, JSON_INDENT(2));
        if ((hf_text || hf) && !m->hf_config_json) {
            mps_fail(err, MPS_ENOMEM, "%s: out of memory", path);
            goto out;
        }
    }
    json_t *files = json_object_get(root, "files");
    if (!json_is_array(files) || json_array_size(files) > (size_t)mps_layout_world(&m->layout)) {
        mps_fail(err, MPS_ECORRUPT, "%s: 'files' missing or longer than the world size", path);
        goto out;
    }
    m->nfiles = (int)json_array_size(files);
    m->files = calloc((size_t)m->nfiles + 1, sizeof *m->files);
    ranks = malloc(sizeof *ranks * ((size_t)m->nfiles + 1));
    if (!m->files || !ranks) {
        mps_fail(err, MPS_ENOMEM, "%s: out of memory for %d file entries", path, m->nfiles);
        goto out;
    }
    for (int i = 0; i < m->nfiles; i++) {
        json_t *f = json_array_get(files, (size_t)i);
        int64_t r;
        if (!json_is_object(f)) {
            mps_fail(err, MPS_ECORRUPT, "%s: files[%d] is not an object", path, i);
            goto out;
        }
        if (get_int(f, "rank", 0, mps_layout_world(&m->layout) - 1, &r, path, err) ||
            get_int(f, "bytes", 0, INT64_MAX, &m->files[i].bytes, path, err))
            goto out;
        m->files[i].rank = (int)r;
        mps_shard_file_name((int)r, m->files[i].name, sizeof m->files[i].name);
        json_t *name = json_object_get(f, "name");
        if (!json_is_string(name) || strcmp(json_string_value(name), m->files[i].name) != 0) {
            mps_fail(err, MPS_ECORRUPT, "%s: files[%d].name must be %s", path, i, m->files[i].name);
            goto out;
        }
        ranks[i] = (int)r;
    }
    qsort(ranks, (size_t)m->nfiles, sizeof *ranks, cmp_int);
    for (int i = 1; i < m->nfiles; i++)
        if (ranks[i] == ranks[i - 1]) {
            mps_fail(err, MPS_ECORRUPT, "%s: 'files' lists rank %d twice", path, ranks[i]);
            goto out;
        }
    rc = 0;
out:
    free(ranks);
    json_decref(root);
    if (rc != 0)
        mps_manifest_free(m);
    return rc;
}
