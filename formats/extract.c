/* The output is written like an export: FILE.tmp (locked by its writer), fsynced, renamed over
 * FILE. Its header comes first (its size depends only on the shape), then the tensor's elements in
 * canonical row-major order, gathered band by band from whatever pieces hold them. */
#include "extract.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckpt.h"
#include "modelfile_internal.h"
#include "output.h"
#include "progress.h"

#define DEFAULT_BUDGET ((int64_t)64 << 20)

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n > k && strcmp(s + n - k, suffix) == 0;
}

/* NumPy format 1.0: magic, version, header length, a Python dict padded with spaces and ended by
 * a newline so that the data starts at a multiple of 64 bytes. */
static int npy_header(const mps_tensor_spec *spec, char *buf, size_t size)
{
    char shape[128] = "";
    size_t n = 0;
    for (int d = 0; d < spec->ndim; d++)
        n += (size_t)snprintf(shape + n, sizeof shape - n, "%lld,%s", (long long)spec->shape[d],
                              d + 1 < spec->ndim ? " " : "");
    if (spec->ndim > 1)
        shape[--n] = '\0'; /* (3, 96, 96) but (96,) */
    char dict[256];
    int len = snprintf(dict, sizeof dict, "{'descr': '<f4', 'fortran_order': False, 'shape': (%s), }", shape);
    int total = 10 + len + 1;
    int padded = (total + 63) / 64 * 64;
    if ((size_t)padded > size)
        return -1;
    memcpy(buf, "\x93NUMPY\x01\x00", 8);
    uint16_t hlen = (uint16_t)(padded - 10);
    buf[8] = (char)(hlen & 0xff);
    buf[9] = (char)(hlen >> 8);
    memcpy(buf + 10, dict, (size_t)len);
    memset(buf + 10 + len, ' ', (size_t)(padded - total));
    buf[padded - 1] = '\n';
    return padded;
}

/* safetensors: 8-byte little-endian header length, a JSON header padded with spaces to a multiple
 * of 8, then the data. */
static int safetensors_header(const mps_tensor_spec *spec, const char *kind, const char *ckpt_id, char *buf,
                              size_t size)
{
    char shape[128] = "";
    size_t n = 0;
    for (int d = 0; d < spec->ndim; d++)
        n += (size_t)snprintf(shape + n, sizeof shape - n, "%s%lld", d ? ", " : "", (long long)spec->shape[d]);
    char json[512];
    int len = snprintf(json, sizeof json,
                       "{\"__metadata__\": {\"tensor\": \"%s\", \"kind\": \"%s\", \"checkpoint_id\": \"%s\"}, "
                       "\"%s\": {\"dtype\": \"F32\", \"shape\": [%s], \"data_offsets\": [0, %lld]}}",
                       spec->name, kind, ckpt_id, spec->name, shape, (long long)(mps_tensor_numel(spec) * 4));
    int padded = (len + 7) / 8 * 8;
    if ((size_t)(8 + padded) > size || len >= (int)sizeof json)
        return -1;
    uint64_t hlen = (uint64_t)padded;
    for (int i = 0; i < 8; i++)
        buf[i] = (char)((hlen >> (8 * i)) & 0xff);
    memcpy(buf + 8, json, (size_t)len);
    memset(buf + 8 + len, ' ', (size_t)(padded - len));
    return 8 + padded;
}

int mps_extract(const char *ckpt_dir, const mps_extract_opts *o, mps_err *err)
{
    int npy = ends_with(o->out_path, ".npy");
    if (!npy && !ends_with(o->out_path, ".safetensors"))
        return mps_fail(err, MPS_EUSAGE, "-o %s: the file name must end in .npy or .safetensors", o->out_path);
    const char *kname = o->kind ? o->kind : "param";
    int kind = mps_kind_from_name(kname);
    if (kind < 0 || kind == MPS_KIND_GRAD)
        return mps_fail(err, MPS_EUSAGE, "--kind '%s': expected param, master, adam_m or adam_v", kname);
    mps_ckpt *c;
    if (mps_ckpt_open(ckpt_dir, &c, err) != 0)
        return -1;
    const mps_manifest *m = mps_ckpt_manifest(c);
    int t = mps_tensor_find(&m->cfg, o->tensor);
    mps_out_file *out = NULL;
    mps_read_scratch *scratch = NULL;
    mps_progress *progress = NULL;
    float *buf = NULL;
    int rc = -1;
    if (t < 0) {
        mps_fail(err, MPS_EUSAGE, "--tensor '%s': the model has no such tensor (mpshard ls %s lists them)", o->tensor,
                 ckpt_dir);
        goto out;
    }
    if (!(m->kinds & (1u << kind))) {
        mps_fail(err, MPS_EUSAGE, "--kind %s: %s stores no %s (mpshard ls %s lists what it stores)", kname, ckpt_dir,
                 kname, ckpt_dir);
        goto out;
    }
    if (!o->force && mps_output_refuse_existing(o->out_path, err) != 0)
        goto out;
    mps_tensor_spec spec;
    mps_tensor_spec_get(&m->cfg, t, &spec);
    char header[1024];
    int hbytes = npy ? npy_header(&spec, header, sizeof header)
                     : safetensors_header(&spec, kname, m->checkpoint_id, header, sizeof header);
    if (hbytes < 0) {
        mps_fail(err, MPS_EFAIL, "%s: header too long", o->out_path);
        goto out;
    }
    int64_t n = mps_tensor_numel(&spec);
    int64_t band = (o->memory_budget > 0 ? o->memory_budget : DEFAULT_BUDGET) / (int64_t)sizeof(float);
    if (band > n)
        band = n;
    scratch = mps_read_scratch_new();
    buf = malloc((size_t)band * sizeof(float));
    if (!scratch || !buf) {
        mps_fail(err, MPS_ENOMEM, "out of memory for a band of %lld elements", (long long)band);
        goto out;
    }
    /* the directory and the name of the output, as the model-file writer takes them */
    char dir[4200];
    const char *slash = strrchr(o->out_path, '/'), *name = slash ? slash + 1 : o->out_path;
    if (!slash)
        snprintf(dir, sizeof dir, ".");
    else if (slash == o->out_path)
        snprintf(dir, sizeof dir, "/");
    else
        snprintf(dir, sizeof dir, "%.*s", (int)(slash - o->out_path), o->out_path);
    if (mps_out_file_begin(dir, name, MPS_DTYPE_F32, NULL, 0, hbytes + n * (int64_t)sizeof(float), NULL, NULL, &out,
                           err) != 0 ||
        mps_out_file_write(out, header, (size_t)hbytes, err) != 0)
        goto out;
    progress = mps_progress_new("extract", n * (int64_t)sizeof(float), o->quiet ? 0 : -1);
    mps_box box;
    mps_box_whole(&spec, &box);
    for (int64_t f = 0; f < n; f += band) {
        int64_t e = f + band < n ? f + band : n;
        if (mps_ckpt_gather(c, scratch, (mps_kind)kind, t, &box, f, e, buf, err) != 0 ||
            mps_out_file_write(out, buf, (size_t)(e - f) * sizeof(float), err) != 0)
            goto out;
        mps_progress_add(progress, (e - f) * (int64_t)sizeof(float));
    }
    rc = mps_out_file_finish(out, err);
    out = NULL;
out:
    if (out)
        mps_out_file_abort(out);
    mps_progress_done(progress);
    free(buf);
    mps_read_scratch_free(scratch);
    mps_ckpt_close(c);
    return rc;
}
