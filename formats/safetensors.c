/* Hugging Face safetensors models (model.safetensors + config.json, or model-0000k-of-0000n.safetensors
 * + model.safetensors.index.json): reader and writer, for every architecture of the table (arch.h).
 *
 * File: u64 little-endian N, N bytes of JSON header, data. The header maps each key to
 * {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the data section). The
 * index is {"metadata": {"total_size"}, "weight_map": {key: file}}. Keys, shapes and orientation
 * (GPT-2's Conv1D matrices are stored (in, out)) come from the architecture table. */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "modelfile_internal.h"
#include "safe_open.h"

#define HEADER_CAP ((uint64_t)100 << 20) /* largest JSON header accepted */
#define CONFIG_CAP ((int64_t)16 << 20)   /* largest config.json accepted */
#define MAX_RANK 8
#define INDEX_CAP ((int64_t)64 << 20)  /* largest index file accepted */
#define MAX_PARTS 1000 /* files of one model: Llama 3.1 405B has 191; each is held open */

/* ---------------------------------------------------------------------------------------------
 * Reading */

typedef struct {
    const char *key;
    int src_dtype; /* MPS_SRC_* or -1 for a non-float dtype */
    const char *dtype;
    int ndim;
    int64_t shape[MAX_RANK];
    int64_t numel, begin, end;
    int role; /* 0: other, 1: the embedding, 2: a stored copy of the tied head */
    int file; /* which part of the model holds it */
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

/* Matches key against a pattern with at most one %d (a layer number without leading zeros):
 * 1 and *layer set on a match, 0 otherwise. */
static int match_pattern(const char *pattern, const char *key, int *layer)
{
    const char *pd = strstr(pattern, "%d");
    *layer = -1;
    if (pd == NULL)
        return strcmp(pattern, key) == 0;
    size_t pre = (size_t)(pd - pattern);
    if (strncmp(key, pattern, pre) != 0)
        return 0;
    const char *p = key + pre;
    if (*p < '0' || *p > '9' || (p[0] == '0' && p[1] >= '0' && p[1] <= '9'))
        return 0;
    int64_t l = 0;
    while (*p >= '0' && *p <= '9') {
        l = l * 10 + (*p - '0');
        if (l > 100000000)
            return 0;
        p++;
    }
    if (strcmp(p, pd + 2) != 0)
        return 0;
    *layer = (int)l;
    return 1;
}

#define KEY_UNKNOWN (-1)
#define KEY_BAD_LAYER (-2)
#define KEY_BUFFER (-3)
#define KEY_TIED_HEAD (-4)
/* The canonical index of a header key: >= 0, KEY_TIED_HEAD (a stored copy of the tied head, never
 * prefixed), KEY_BUFFER (non-parameter buffers such as GPT-2's attention masks), KEY_BAD_LAYER for
 * a layer beyond n_layer (*layer set), KEY_UNKNOWN for anything else (a tensor the config does not
 * have, such as a bias of a model without biases, included). */
static int key_index(const mps_config *cfg, const char *key, int *has_prefix, int *layer)
{
    const mps_arch *a = mps_arch_of(cfg->arch);
    const char *k = key;
    *layer = -1;
    *has_prefix = a->hf_optional_prefix && strncmp(k, a->hf_optional_prefix, strlen(a->hf_optional_prefix)) == 0;
    if (*has_prefix)
        k += strlen(a->hf_optional_prefix);
    else if (mps_cfg_tied(cfg) && a->hf_tied_head_key && strcmp(k, a->hf_tied_head_key) == 0)
        return KEY_TIED_HEAD;
    int nrules = a->n_embed + a->n_layer_rules + a->n_final;
    for (int r = 0; r < nrules; r++) {
        int l;
        if (!match_pattern(a->rules[r].hf_key, k, &l))
            continue;
        if (l >= cfg->n_layer) {
            *layer = l;
            return KEY_BAD_LAYER;
        }
        return mps_tensor_index(cfg, r, l);
    }
    for (int i = 0; a->hf_buffers && a->hf_buffers[i]; i++) {
        int l;
        if (match_pattern(a->hf_buffers[i], k, &l))
            return KEY_BUFFER;
    }
    return KEY_UNKNOWN;
}

/* The error for a key that key_index() did not map to a parameter (0 for the others). */
static int key_error(const char *path, const mps_config *cfg, const char *key, int idx, int layer, mps_err *err)
{
    if (idx == KEY_BAD_LAYER)
        return mps_fail(err, MPS_ECORRUPT, "%s: tensor '%s': layer %d but config.json has n_layer=%d", path, key, layer,
                        cfg->n_layer);
    if (idx == KEY_UNKNOWN)
        return mps_fail(err, MPS_EUNSUPPORTED, "%s: tensor '%s' is not a parameter of this %s model as config.json "
                        "describes it", path, key, mps_family_name(cfg->family));
    return 0;
}

/* Reads a small JSON file (config.json, the index) whole: a regular file, at most cap bytes, never
 * blocking on a FIFO. missing_hint: the error for a missing file (NULL: the OS error). */
static int read_small_file(const char *path, int64_t cap, const char *missing_hint, char **text, size_t *len,
                           mps_err *err)
{
    *text = NULL;
    struct stat st;
    mps_err open_err = { 0 };
    int fd = mps_open_input(path, MPS_EUSAGE, &st, &open_err);
    if (fd < 0) {
        if (errno == ENOENT && missing_hint)
            return mps_fail(err, MPS_EUSAGE, "%s", missing_hint);
        *err = open_err;
        return -1;
    }
    int rc = -1;
    if ((int64_t)st.st_size > cap) {
        mps_fail(err, MPS_ECORRUPT, "%s: %lld bytes is too large for this file", path, (long long)st.st_size);
    } else if ((*text = malloc((size_t)st.st_size + 1)) == NULL) {
        mps_fail(err, MPS_ENOMEM, "%s: out of memory", path);
    } else if (mps_pread_full(fd, path, *text, (size_t)st.st_size, 0, err) == 0) {
        (*text)[st.st_size] = '\0';
        *len = (size_t)st.st_size;
        rc = 0;
    }
    close(fd);
    if (rc != 0) {
        free(*text);
        *text = NULL;
    }
    return rc;
}

/* The directory part of a path ("." for a bare name), joined with name. */
static char *sibling(const char *path, const char *name)
{
    const char *slash = strrchr(path, '/');
    size_t dl = slash ? (size_t)(slash - path) : 1, nl = strlen(name);
    char *p = malloc(dl + nl + 2);
    if (p == NULL)
        return NULL;
    if (slash)
        memcpy(p, path, dl);
    else
        p[0] = '.';
    p[dl] = '/';
    memcpy(p + dl + 1, name, nl + 1);
    return p;
}

static int load_config(const char *input, const mps_model_file_opts *opts, mps_model_file *f, mps_err *err)
{
    char *owned = opts->config_path ? NULL : sibling(input, "config.json");
    const char *cpath = opts->config_path ? opts->config_path : owned;
    if (cpath == NULL)
        return mps_fail(err, MPS_ENOMEM, "%s: out of memory", input);
    char hint[512];
    snprintf(hint, sizeof hint, "%s: config.json not found beside it; pass --config FILE", input);
    char *text = NULL;
    size_t n = 0;
    int rc = -1;
    json_t *root = NULL;
    if (read_small_file(cpath, CONFIG_CAP, opts->config_path ? NULL : hint, &text, &n, err) != 0)
        goto out;
    json_error_t jerr;
    root = json_loadb(text, n, JSON_REJECT_DUPLICATES, &jerr);
    if (root == NULL) {
        mps_fail(err, MPS_ECORRUPT, "%s: line %d: %s", cpath, jerr.line, jerr.text);
        goto out;
    }
    if (mps_hf_config_parse(root, cpath, &f->cfg, err) != 0)
        goto out;
    f->hf_config = text;
    text = NULL;
    rc = 0;
out:
    json_decref(root);
    free(text);
    free(owned);
    return rc;
}

/* The files named by a model's index (model.safetensors.index.json): plain names in the index's
 * directory (a name with a '/' or a leading '.' is refused: the index must not reach outside the
 * model), each opened once, in order of first appearance. map: the weight_map, kept for the checks
 * of open_model. */
static int open_index(mps_model_file *f, json_t **map_out, json_t **root_out, mps_err *err)
{
    char *text = NULL;
    size_t n = 0;
    *root_out = NULL;
    if (read_small_file(f->path, INDEX_CAP, NULL, &text, &n, err) != 0)
        return -1;
    json_error_t jerr;
    json_t *root = json_loadb(text, n, JSON_REJECT_DUPLICATES, &jerr);
    free(text);
    if (root == NULL)
        return mps_fail(err, MPS_ECORRUPT, "%s: line %d: %s", f->path, jerr.line, jerr.text);
    *root_out = root;
    json_t *map = json_object_get(root, "weight_map");
    if (!json_is_object(map) || json_object_size(map) == 0)
        return mps_fail(err, MPS_ECORRUPT, "%s: no weight_map object: not a safetensors index", f->path);
    *map_out = map;
    size_t cap = json_object_size(map) < MAX_PARTS ? json_object_size(map) : MAX_PARTS;
    f->parts = calloc(cap, sizeof *f->parts);
    if (f->parts == NULL)
        return mps_fail(err, MPS_ENOMEM, "%s: out of memory", f->path);
    const char *key;
    json_t *v;
    json_object_foreach(map, key, v) {
        const char *name = json_is_string(v) ? json_string_value(v) : NULL;
        if (name == NULL || name[0] == '\0' || name[0] == '.' || strchr(name, '/') || strlen(name) > 255)
            return mps_fail(err, MPS_ECORRUPT, "%s: weight_map['%s'] is not a file name in the model's directory",
                            f->path, key);
        int seen = 0;
        for (int i = 0; i < f->nparts && !seen; i++)
            seen = strcmp(strrchr(f->parts[i].path, '/') + 1, name) == 0;
        if (seen)
            continue;
        if ((size_t)f->nparts == cap)
            return mps_fail(err, MPS_ECORRUPT, "%s: the index names more than %d files", f->path, MAX_PARTS);
        mps_in_part *p = &f->parts[f->nparts];
        p->fd = -1;
        if ((p->path = sibling(f->path, name)) == NULL)
            return mps_fail(err, MPS_ENOMEM, "%s: out of memory", f->path);
        f->nparts++;
        if ((p->fd = mps_open_input(p->path, MPS_EUSAGE, NULL, err)) < 0)
            return mps_wrap(err, "%s names it", f->path);
    }
    return 0;
}

/* Parses the header of part `file` and appends its entries. roots keep the parsed headers (the
 * entries point into them). */
static int read_header(mps_model_file *f, int file, json_t **root_out, st_entry **ents, int *n, mps_err *err)
{
    const mps_in_part *part = &f->parts[file];
    const char *path = part->path;
    struct stat st;
    if (fstat(part->fd, &st) != 0)
        return mps_fail(err, MPS_EIO, "%s: cannot stat: %s", path, strerror(errno));
    int64_t file_size = (int64_t)st.st_size;
    unsigned char lenbuf[8];
    if (file_size < 8)
        return mps_fail(err, MPS_ECORRUPT, "%s: %lld bytes is too short for a safetensors file", path,
                        (long long)file_size);
    if (mps_pread_full(part->fd, path, lenbuf, 8, 0, err) != 0)
        return -1;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = (hlen << 8) | lenbuf[i];
    if (hlen > (uint64_t)(file_size - 8))
        return mps_fail(err, MPS_ECORRUPT, "%s: header length %llu is larger than the file (%lld bytes)", path,
                        (unsigned long long)hlen, (long long)file_size);
    if (hlen > HEADER_CAP)
        return mps_fail(err, MPS_ECORRUPT, "%s: header length %llu exceeds the %llu-byte limit", path,
                        (unsigned long long)hlen, (unsigned long long)HEADER_CAP);
    if (hlen < 2)
        return mps_fail(err, MPS_ECORRUPT, "%s: header length %llu is too short", path, (unsigned long long)hlen);
    int64_t data_start = 8 + (int64_t)hlen, data_size = file_size - data_start;
    char *hbuf = malloc((size_t)hlen + 1);
    if (hbuf == NULL)
        return mps_fail(err, MPS_ENOMEM, "%s: out of memory for a %llu-byte header", path, (unsigned long long)hlen);
    if (mps_pread_full(part->fd, path, hbuf, (size_t)hlen, 8, err) != 0) {
        free(hbuf);
        return -1;
    }
    hbuf[hlen] = '\0';
    json_error_t jerr;
    json_t *root = json_loadb(hbuf, (size_t)hlen, JSON_REJECT_DUPLICATES, &jerr);
    free(hbuf);
    if (root == NULL)
        return mps_fail(err, MPS_ECORRUPT, "%s: header JSON, line %d column %d: %s", path, jerr.line, jerr.column,
                        jerr.text);
    *root_out = root;
    if (!json_is_object(root))
        return mps_fail(err, MPS_ECORRUPT, "%s: header is not a JSON object", path);
    /* Every entry: dtype, shape, offsets inside the data (overlaps: checked_overlaps, once the
     * tied head is known). */
    size_t nkeys = json_object_size(root);
    st_entry *grown = realloc(*ents, (size_t)(*n + (int)nkeys + 1) * sizeof *grown);
    if (grown == NULL)
        return mps_fail(err, MPS_ENOMEM, "%s: out of memory", path);
    *ents = grown;
    const char *key;
    json_t *val;
    json_object_foreach(root, key, val) {
        if (strcmp(key, "__metadata__") == 0)
            continue;
        st_entry *e = &grown[*n];
        if (parse_entry(path, key, val, data_size, e, err) != 0)
            return -1;
        e->file = file;
        e->begin += data_start; /* absolute offsets from here on */
        e->end += data_start;
        (*n)++;
    }
    return 0;
}

/* Fills src from the entries: every key mapped to its canonical tensor, shapes checked against
 * the config, nothing missing, nothing twice. */
static int map_entries(mps_model_file *f, st_entry *ents, int n, mps_err *err)
{
    const mps_config *cfg = &f->cfg;
    const char *path = f->path;
    const mps_arch *a = mps_arch_of(cfg->arch);
    const char *prefix = a->hf_optional_prefix ? a->hf_optional_prefix : "";
    int prefixed = 0, tied_head = -1, rc = -1;
    int *seen = NULL;
    /* A config that needs more tensors than the header lists (n_layer=100000 beside a small
     * file): one of them is missing, and one of the first n + 1 already (n entries cannot cover
     * n + 1 tensors). It is named without tables sized by the config. */
    if (mps_tensor_count(cfg) > n) {
        if ((seen = calloc((size_t)n + 1, sizeof *seen)) == NULL)
            return mps_fail(err, MPS_ENOMEM, "%s: out of memory", path);
        for (int i = 0; i < n; i++) {
            int has_prefix, layer, idx = key_index(cfg, ents[i].key, &has_prefix, &layer);
            prefixed |= has_prefix;
            if (key_error(path, cfg, ents[i].key, idx, layer, err) != 0)
                goto out;
            if (idx >= 0 && idx <= n)
                seen[idx] = 1;
        }
        int missing = 0;
        while (seen[missing])
            missing++;
        char hkey[128];
        int ndim, transpose;
        int64_t shape[2];
        mps_hf_tensor(cfg, missing, hkey, sizeof hkey, &ndim, shape, &transpose);
        mps_fail(err, MPS_ECORRUPT, "%s: tensor '%s%s' is missing (config.json: n_layer=%d needs %d tensors, the model "
                 "lists %d)", path, prefixed ? prefix : "", hkey, cfg->n_layer, mps_tensor_count(cfg), n);
        goto out;
    }
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
        st_entry *e = &ents[i];
        int has_prefix, layer, idx = key_index(cfg, e->key, &has_prefix, &layer);
        prefixed |= has_prefix;
        if (idx == KEY_TIED_HEAD) {
            tied_head = i;
            e->role = 2;
            continue;
        }
        if (idx == KEY_BUFFER)
            continue;
        if (key_error(path, cfg, e->key, idx, layer, err) != 0)
            goto out;
        if (seen[idx] >= 0) {
            mps_fail(err, MPS_ECORRUPT, "%s: tensors '%s' and '%s' are the same parameter", path, ents[seen[idx]].key,
                     e->key);
            goto out;
        }
        seen[idx] = i;
        if (idx == 0)
            e->role = 1; /* the embedding is the catalogue's first tensor in every architecture */
        char hkey[128];
        int ndim, transpose;
        int64_t shape[2];
        mps_hf_tensor(cfg, idx, hkey, sizeof hkey, &ndim, shape, &transpose);
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
        s->file = e->file;
        s->offset = e->begin;
        s->dtype = e->src_dtype;
        s->numel = e->numel;
        s->transpose = transpose;
        s->tk = shape[0];
        s->tr = shape[1];
    }
    for (int i = 0; i < f->nsrc; i++) {
        if (seen[i] < 0) {
            char hkey[128];
            int ndim, transpose;
            int64_t shape[2];
            mps_hf_tensor(cfg, i, hkey, sizeof hkey, &ndim, shape, &transpose);
            mps_fail(err, MPS_ECORRUPT, "%s: tensor '%s%s' is missing", path, prefixed ? prefix : "", hkey);
            goto out;
        }
    }
    if (tied_head >= 0) {
        st_entry *e = &ents[tied_head], *w = &ents[seen[0]];
        if (e->ndim != 2 || e->shape[0] != w->shape[0] || e->shape[1] != w->shape[1]) {
            mps_fail(err, MPS_ECORRUPT, "%s: tensor '%s': shape differs from '%s' (the head is tied to it)", path,
                     e->key, w->key);
            goto out;
        }
        if (e->src_dtype != w->src_dtype) {
            mps_fail(err, MPS_EUNSUPPORTED, "%s: tensor '%s': dtype %s differs from '%s' (%s), but config.json ties "
                     "the output head to the embedding", path, e->key, e->dtype, w->key, w->dtype);
            goto out;
        }
        if (e->begin != w->begin || e->file != w->file) { /* a copy: compared when the embedding is read */
            f->has_tied = 1;
            f->tied = f->src[0];
            snprintf(f->tied.key, sizeof f->tied.key, "%s", e->key);
            f->tied.file = e->file;
            f->tied.offset = e->begin;
        }
    }
    rc = 0;
out:
    free(seen);
    return rc;
}

int mps_safetensors_open(mps_model_file *f, const mps_model_file_opts *opts, mps_err *err)
{
    json_t *index = NULL, *map = NULL;
    json_t **roots = NULL;
    st_entry *ents = NULL;
    int n = 0, rc = -1;
    unsigned char first;
    if (mps_pread_full(f->fd, f->path, &first, 1, 0, err) != 0)
        return -1;
    if (first == '{') { /* the index of a model stored in several files */
        if (open_index(f, &map, &index, err) != 0)
            goto out;
    } else if (mps_model_file_single_part(f, err) != 0) {
        goto out;
    }
    if ((roots = calloc((size_t)f->nparts, sizeof *roots)) == NULL) {
        mps_fail(err, MPS_ENOMEM, "%s: out of memory", f->path);
        goto out;
    }
    for (int i = 0; i < f->nparts; i++)
        if (read_header(f, i, &roots[i], &ents, &n, err) != 0)
            goto out;
    if (map) { /* every key where the index says, and every key of the index in its file */
        for (int i = 0; i < n; i++) {
            json_t *v = json_object_get(map, ents[i].key);
            const char *want = json_is_string(v) ? json_string_value(v) : NULL;
            if (want == NULL || strcmp(want, strrchr(f->parts[ents[i].file].path, '/') + 1) != 0) {
                mps_fail(err, MPS_ECORRUPT, "%s: tensor '%s' is stored in %s, but the index %s", f->path, ents[i].key,
                         f->parts[ents[i].file].path, want ? "names another file" : "does not list it");
                goto out;
            }
        }
        if ((size_t)n != json_object_size(map)) {
            mps_fail(err, MPS_ECORRUPT, "%s: the index lists %zu tensors but its files hold %d", f->path,
                     json_object_size(map), n);
            goto out;
        }
    }
    if (load_config(f->path, opts, f, err) != 0)
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
    mps_err e2 = { 0 };
    if (mps_config_validate(cfg, &e2) != 0) {
        mps_fail(err, MPS_EUSAGE, "%s: %s", f->path, e2.msg);
        goto out;
    }
    if (map_entries(f, ents, n, err) != 0)
        goto out;
    for (int i = 0, j; i < n; i = j) { /* each file's entries, in one run */
        for (j = i; j < n && ents[j].file == ents[i].file; j++)
            ;
        if (check_overlaps(f->parts[ents[i].file].path, ents + i, j - i, err) != 0)
            goto out;
    }
    int all_bf16 = 1, all_f16 = 1;
    for (int i = 0; i < f->nsrc; i++) {
        all_bf16 &= f->src[i].dtype == MPS_SRC_BF16;
        all_f16 &= f->src[i].dtype == MPS_SRC_F16;
    }
    f->dtype = all_bf16 ? MPS_DTYPE_BF16 : all_f16 ? MPS_DTYPE_F16 : MPS_DTYPE_F32;
    rc = 0;
out:
    for (int i = 0; roots && i < f->nparts; i++)
        json_decref(roots[i]);
    free(roots);
    json_decref(index);
    free(ents);
    return rc;
}

/* ---------------------------------------------------------------------------------------------
 * Writing */

static const char *st_dtype_name(mps_dtype d) { return d == MPS_DTYPE_BF16 ? "BF16" : d == MPS_DTYPE_F16 ? "F16" : "F32"; }

/* The header of one output file: entries [first, last) of items, data offsets from 0. */
static unsigned char *make_header(const mps_config *cfg, const mps_out_item *items, int first, int last, mps_dtype dtype,
                                  size_t *len)
{
    const mps_arch *a = mps_arch_of(cfg->arch);
    json_t *hdr = json_object(), *meta = json_object();
    if (hdr == NULL || meta == NULL) {
        json_decref(hdr);
        json_decref(meta);
        return NULL;
    }
    json_object_set_new(meta, "format", json_string("pt"));
    json_object_set_new(hdr, "__metadata__", meta);
    int64_t off = 0;
    for (int i = first; i < last; i++) {
        char hkey[128], fkey[160];
        int ndim, transpose;
        int64_t shape[2];
        mps_hf_tensor(cfg, items[i].tensor, hkey, sizeof hkey, &ndim, shape, &transpose);
        /* transformers 5.x names GPT-2's keys with the prefix and leaves the tied head out */
        snprintf(fkey, sizeof fkey, "%s%s", a->hf_optional_prefix ? a->hf_optional_prefix : "", hkey);
        int64_t nb = mps_out_item_bytes(cfg, &items[i], dtype);
        json_t *t = json_object(), *sh = json_array(), *offs = json_array();
        for (int d = 0; d < ndim; d++)
            json_array_append_new(sh, json_integer(shape[d]));
        json_array_append_new(offs, json_integer(off));
        json_array_append_new(offs, json_integer(off + nb));
        json_object_set_new(t, "dtype", json_string(st_dtype_name(dtype)));
        json_object_set_new(t, "shape", sh);
        json_object_set_new(t, "data_offsets", offs);
        json_object_set_new(hdr, fkey, t);
        off += nb;
    }
    char *h = json_dumps(hdr, JSON_COMPACT);
    json_decref(hdr);
    if (h == NULL)
        return NULL;
    size_t hl = strlen(h), padded = (hl + 7) / 8 * 8;
    unsigned char *head = malloc(8 + padded);
    if (head != NULL) {
        for (int i = 0; i < 8; i++)
            head[i] = (unsigned char)((uint64_t)padded >> (8 * i));
        memcpy(head + 8, h, hl);
        memset(head + 8 + hl, ' ', padded - hl);
        *len = 8 + padded;
    }
    free(h);
    return head;
}

int mps_safetensors_create(const char *dir, const mps_config *cfg, mps_dtype dtype, const char *hf_config_json,
                           int64_t max_shard_bytes, mps_out_file **out, mps_err *err)
{
    *out = NULL;
    if (mps_config_validate(cfg, err) != 0)
        return -1;
    if (dtype != MPS_DTYPE_F32 && dtype != MPS_DTYPE_BF16 && dtype != MPS_DTYPE_F16)
        return mps_fail(err, MPS_EUSAGE, "%s: unsupported dtype %d", dir, (int)dtype);
    if (hf_config_json && mps_hf_config_check(hf_config_json, cfg, err) != 0)
        return -1;
    const mps_arch *a = mps_arch_of(cfg->arch);
    int nitems = mps_tensor_count(cfg), nparts = 0;
    mps_out_item *items = calloc((size_t)nitems, sizeof *items);
    int *part_first = calloc((size_t)nitems + 1, sizeof *part_first);
    mps_out_part_spec *specs = calloc((size_t)nitems, sizeof *specs);
    char (*names)[64] = calloc((size_t)nitems, sizeof *names);
    char *texts[2] = { hf_config_json ? strdup(hf_config_json) : mps_hf_config_generate(cfg, dtype), NULL };
    json_t *index = json_object(), *map = json_object();
    int rc = -1;
    if (!items || !part_first || !specs || !names || !texts[0] || !index || !map) {
        mps_fail(err, MPS_ENOMEM, "%s: out of memory", dir);
        goto out;
    }
    /* Files in catalogue order, as transformers' save_pretrained splits them: a file takes tensors
     * while they fit max_shard_bytes; a tensor larger than that gets a file of its own. */
    int64_t in_part = 0, total = 0;
    for (int i = 0; i < nitems; i++) {
        mps_tensor_spec spec;
        mps_tensor_spec_get(cfg, i, &spec);
        items[i].tensor = i;
        items[i].transpose = mps_tensor_rule_of(cfg, i, &(int){ 0 })->hf_transpose;
        /* the file has the vocabulary's rows, not the padding */
        items[i].rows = mps_tensor_rule_of(cfg, i, &(int){ 0 })->dims[0] == MPS_DIM_VP ? cfg->vocab : spec.shape[0];
        int64_t nb = mps_out_item_bytes(cfg, &items[i], dtype);
        if (nparts == 0 || (max_shard_bytes > 0 && in_part > 0 && in_part + nb > max_shard_bytes)) {
            part_first[nparts++] = i;
            in_part = 0;
        }
        in_part += nb;
        total += nb;
    }
    part_first[nparts] = nitems;
    for (int p = 0; p < nparts; p++) {
        if (nparts == 1)
            snprintf(names[p], sizeof names[p], "model.safetensors");
        else
            snprintf(names[p], sizeof names[p], "model-%05d-of-%05d.safetensors", p + 1, nparts);
        specs[p].name = names[p];
        if (!(specs[p].header = make_header(cfg, items, part_first[p], part_first[p + 1], dtype, &specs[p].header_len))) {
            mps_fail(err, MPS_ENOMEM, "%s: out of memory", dir);
            goto out;
        }
        specs[p].total_bytes = (int64_t)specs[p].header_len;
        for (int i = part_first[p]; i < part_first[p + 1]; i++) {
            specs[p].total_bytes += mps_out_item_bytes(cfg, &items[i], dtype);
            char hkey[128], fkey[160];
            int ndim, transpose;
            int64_t shape[2];
            mps_hf_tensor(cfg, i, hkey, sizeof hkey, &ndim, shape, &transpose);
            snprintf(fkey, sizeof fkey, "%s%s", a->hf_optional_prefix ? a->hf_optional_prefix : "", hkey);
            json_object_set_new(map, fkey, json_string(names[p]));
        }
    }
    if (nparts > 1) {
        json_object_set_new(index, "metadata", json_pack("{s:I}", "total_size", (json_int_t)total));
        json_object_set_new(index, "weight_map", map);
        map = NULL;
        char *t = json_dumps(index, JSON_INDENT(2) | JSON_SORT_KEYS);
        size_t tl = t ? strlen(t) : 0;
        if (t == NULL || (texts[1] = realloc(t, tl + 2)) == NULL) {
            free(t);
            mps_fail(err, MPS_ENOMEM, "%s: out of memory", dir);
            goto out;
        }
        texts[1][tl] = '\n';
        texts[1][tl + 1] = '\0';
    }
    static const char *const extra[2] = { "config.json", "model.safetensors.index.json" };
    rc = mps_out_file_begin_parts(dir, specs, nparts, dtype, items, nitems, extra, texts, out, err);
    items = NULL;
    texts[0] = texts[1] = NULL;
    nparts = 0; /* headers taken */
out:
    for (int p = 0; p < nparts; p++)
        free(specs[p].header);
    free(items);
    free(part_first);
    free(specs);
    free(names);
    free(texts[0]);
    free(texts[1]);
    json_decref(index);
    json_decref(map);
    return rc;
}
