/* llm.c optimizer-state files (llmc_state.h gives the layout). Reading checks every header field
 * and the exact file size before any data is used; data is read with pread straight into the
 * caller's buffer, so nothing here grows with the model. */
#include "llmc_state.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ckpt.h"
#include "modelfile_internal.h"
#include "safe_open.h"

/* llm.c gpt2_init_common: model->rng_state = 13371337 + process_rank */
#define LLMC_RNG_INIT 13371337u

typedef struct {
    char *path;
    int fd;
    int64_t size;
    mps_llmc_state_header h;
} state_file;

struct mps_llmc_state {
    mps_config cfg;
    int n;              /* processes = files */
    int zero;           /* 1: ZeRO-1 slices, 0: whole copies */
    int64_t total;      /* num_parameters (padded vocabulary included) */
    int64_t shard_numel;
    int64_t *prefix;    /* per canonical tensor: its first element in llm.c's parameter vector */
    state_file *files;  /* by rank */
};

static void put_u64(int32_t *slot, uint64_t v) { memcpy(slot, &v, sizeof v); }
static uint64_t get_u64(const int32_t *slot)
{
    uint64_t v;
    memcpy(&v, slot, sizeof v);
    return v;
}

void mps_llmc_state_header_pack(const mps_llmc_state_header *h, int32_t out[256])
{
    memset(out, 0, 256 * sizeof(int32_t));
    out[0] = MPS_LLMC_STATE_MAGIC;
    out[1] = MPS_LLMC_STATE_VERSION;
    out[2] = h->num_processes;
    out[3] = h->process_rank;
    out[4] = h->use_master_weights;
    out[5] = h->should_shuffle;
    out[10] = (int32_t)h->step;
    put_u64(&out[20], h->rng_state);
    put_u64(&out[22], h->rng_state_last_update);
    put_u64(&out[30], h->current_shard_idx);
    put_u64(&out[32], h->current_sample_idx);
}

void mps_llmc_tensor_order(const mps_config *cfg, int *order)
{
    int k = 0;
    order[k++] = MPS_TENSOR_WTE;
    order[k++] = MPS_TENSOR_WPE;
    for (int slot = 0; slot < MPS_TENSORS_PER_LAYER; slot++)
        for (int l = 0; l < cfg->n_layer; l++)
            order[k++] = mps_layer_tensor(l, slot);
    order[k++] = mps_tensor_lnfw(cfg);
    order[k++] = mps_tensor_lnfb(cfg);
}

int mps_llmc_zero_check(const mps_config *cfg, int processes, mps_err *err)
{
    for (int t = 0; t < mps_tensor_count(cfg); t++) {
        mps_tensor_spec spec;
        mps_tensor_spec_get(cfg, t, &spec);
        int64_t S = mps_tensor_numel(&spec);
        if (S % processes != 0)
            return mps_fail(err, MPS_EUSAGE,
                            "tensor %s: %lld elements per layer do not divide by %d processes (llm.c's ZeRO-1 "
                            "shards every layer's tensor evenly); use --zero 0 or another process count",
                            spec.name, (long long)S, processes);
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Reading */

static void files_close(state_file *f, int n)
{
    for (int i = 0; f && i < n; i++) {
        if (f[i].fd >= 0)
            close(f[i].fd);
        free(f[i].path);
    }
    free(f);
}

void mps_llmc_state_close(mps_llmc_state *s)
{
    if (!s)
        return;
    files_close(s->files, s->n);
    free(s->prefix);
    free(s);
}

/* Reads the header of one file into f (path, fd, size set); checks the fields that need no other file. */
static int read_header(state_file *f, int n, mps_err *err)
{
    int32_t h[256];
    if (f->size < MPS_LLMC_STATE_HEADER_BYTES)
        return mps_fail(err, MPS_ECORRUPT, "%s: %lld bytes is shorter than the 1024-byte llm.c state header", f->path,
                        (long long)f->size);
    if (mps_pread_full(f->fd, f->path, h, sizeof h, 0, err) != 0)
        return -1;
    if (h[0] != MPS_LLMC_STATE_MAGIC)
        return mps_fail(err, MPS_ECORRUPT, "%s: header magic=%d (an llm.c state file starts with %d)", f->path, h[0],
                        MPS_LLMC_STATE_MAGIC);
    if (h[1] != MPS_LLMC_STATE_VERSION)
        return mps_fail(err, MPS_EUNSUPPORTED, "%s: header version=%d (llm.c state files of version %d are supported)",
                        f->path, h[1], MPS_LLMC_STATE_VERSION);
    if (h[2] != n)
        return mps_fail(err, MPS_ECORRUPT, "%s: header num_processes=%d but %d state file%s given (one per rank)",
                        f->path, h[2], n, n == 1 ? " was" : "s were");
    if (h[3] < 0 || h[3] >= n)
        return mps_fail(err, MPS_ECORRUPT, "%s: header process_rank=%d is outside 0..%d", f->path, h[3], n - 1);
    if (h[4] != 0 && h[4] != 1)
        return mps_fail(err, MPS_ECORRUPT, "%s: header use_master_weights=%d (0 or 1)", f->path, h[4]);
    if (h[5] != 0 && h[5] != 1)
        return mps_fail(err, MPS_ECORRUPT, "%s: header should_shuffle=%d (0 or 1)", f->path, h[5]);
    if (h[10] < 0)
        return mps_fail(err, MPS_ECORRUPT, "%s: header step=%d is negative", f->path, h[10]);
    f->h = (mps_llmc_state_header){
        .num_processes = h[2], .process_rank = h[3], .use_master_weights = h[4], .should_shuffle = h[5],
        .step = h[10], .rng_state = get_u64(&h[20]), .rng_state_last_update = get_u64(&h[22]),
        .current_shard_idx = get_u64(&h[30]), .current_sample_idx = get_u64(&h[32]),
    };
    return 0;
}

static int read_u64_at(const state_file *f, int64_t off, uint64_t *v, mps_err *err)
{
    return mps_pread_full(f->fd, f->path, v, sizeof *v, off, err);
}

/* 1 if the file is exactly header + k arrays of P floats (+ the data-loader block when should_shuffle);
 * 0 if not; -1 on a read error. Every size read from the file is bounded by the file size first. */
static int size_matches(const state_file *f, int64_t P, mps_err *err)
{
    int k = 2 + f->h.use_master_weights;
    int64_t end = MPS_LLMC_STATE_HEADER_BYTES + (int64_t)k * P * 4;
    if (!f->h.should_shuffle)
        return f->size == end;
    if (f->size < end + 16 + MPS_LLMC_MT19937_BYTES)
        return 0;
    uint64_t gl_pathc, samples;
    if (read_u64_at(f, end, &gl_pathc, err) != 0)
        return -1;
    if (gl_pathc > (uint64_t)(f->size - end - 16 - MPS_LLMC_MT19937_BYTES) / 4)
        return 0;
    int64_t off = end + 8 + 4 * (int64_t)gl_pathc;
    if (read_u64_at(f, off, &samples, err) != 0)
        return -1;
    if (samples > (uint64_t)(f->size - off - 8 - MPS_LLMC_MT19937_BYTES) / 4)
        return 0;
    return f->size == off + 8 + 4 * (int64_t)samples + MPS_LLMC_MT19937_BYTES;
}

/* Which array size the file has: sets *zero (1: total/n slices, 0: whole copies). */
static int detect_size(const mps_llmc_state *s, const state_file *f, int *zero, mps_err *err)
{
    mps_err e2 = { 0 };
    int can_slice = s->n > 1 && mps_llmc_zero_check(&s->cfg, s->n, &e2) == 0;
    int r;
    if (can_slice && (r = size_matches(f, s->total / s->n, err)) != 0) {
        *zero = 1;
        return r < 0 ? -1 : 0;
    }
    if ((r = size_matches(f, s->total, err)) != 0) {
        *zero = 0;
        return r < 0 ? -1 : 0;
    }
    int k = 2 + f->h.use_master_weights;
    char sliced[96] = "";
    if (can_slice)
        snprintf(sliced, sizeof sliced, "%lld (ZeRO-1 slices) or ",
                 (long long)(MPS_LLMC_STATE_HEADER_BYTES + (int64_t)k * (s->total / s->n) * 4));
    return mps_fail(err, MPS_ECORRUPT,
                    "%s: file is %lld bytes but its header (num_processes=%d, use_master_weights=%d, should_shuffle=%d) "
                    "and the model's %lld parameters imply %s%lld (whole copies)%s", f->path, (long long)f->size,
                    s->n, f->h.use_master_weights, f->h.should_shuffle, (long long)s->total, sliced,
                    (long long)(MPS_LLMC_STATE_HEADER_BYTES + (int64_t)k * s->total * 4),
                    f->h.should_shuffle ? " plus the data-loader block" : "");
}

int mps_llmc_state_open(const char *const *paths, int n, const mps_config *cfg, int64_t model_step,
                        mps_llmc_state **out, mps_err *err)
{
    *out = NULL;
    if (n < 1 || n > MPS_LLMC_MAX_PROCESSES)
        return mps_fail(err, MPS_EUSAGE, "--state: %d files given (1 to %d)", n, MPS_LLMC_MAX_PROCESSES);
    mps_llmc_state *s = calloc(1, sizeof *s);
    state_file *in = calloc((size_t)n, sizeof *in);
    int nt = mps_tensor_count(cfg);
    int *order = malloc((size_t)nt * sizeof *order);
    if (!s || !in || !order) {
        free(s);
        free(in);
        free(order);
        return mps_fail(err, MPS_ENOMEM, "out of memory");
    }
    s->cfg = *cfg;
    s->n = n;
    s->prefix = malloc((size_t)nt * sizeof *s->prefix);
    s->files = calloc((size_t)n, sizeof *s->files);
    for (int i = 0; i < n; i++)
        in[i].fd = -1;
    for (int i = 0; s->files && i < n; i++)
        s->files[i].fd = -1;
    int rc = -1;
    if (!s->prefix || !s->files) {
        mps_fail(err, MPS_ENOMEM, "out of memory");
        goto out;
    }
    int in0_rank = 0; /* the rank of the first file given, which the others are compared with */
    mps_llmc_tensor_order(cfg, order);
    for (int i = 0; i < nt; i++) {
        mps_tensor_spec spec;
        mps_tensor_spec_get(cfg, order[i], &spec);
        s->prefix[order[i]] = s->total;
        s->total += mps_tensor_numel(&spec);
    }
    for (int i = 0; i < n; i++) {
        state_file *f = &in[i];
        if (!(f->path = strdup(paths[i]))) {
            mps_fail(err, MPS_ENOMEM, "out of memory");
            goto out;
        }
        struct stat st;
        if ((f->fd = mps_open_input(f->path, MPS_EUSAGE, &st, err)) < 0) /* a FIFO must not block: refused */
            goto out;
        f->size = st.st_size;
        if (read_header(f, n, err) != 0)
            goto out;
        const state_file *first = i == 0 ? f : &s->files[in0_rank];
        if (f->h.step != first->h.step) {
            mps_fail(err, MPS_ECORRUPT, "%s: header step=%lld but %s has step=%lld (files of different checkpoints)",
                     f->path, (long long)f->h.step, first->path, (long long)first->h.step);
            goto out;
        }
        if (model_step >= 0 && f->h.step != model_step) {
            mps_fail(err, MPS_ECORRUPT, "%s: header step=%lld but the model file is of step %lld", f->path,
                     (long long)f->h.step, (long long)model_step);
            goto out;
        }
        if (f->h.use_master_weights != first->h.use_master_weights || f->h.should_shuffle != first->h.should_shuffle) {
            mps_fail(err, MPS_ECORRUPT, "%s: header use_master_weights=%d should_shuffle=%d but %s has %d and %d",
                     f->path, f->h.use_master_weights, f->h.should_shuffle, first->path, first->h.use_master_weights,
                     first->h.should_shuffle);
            goto out;
        }
        int r = f->h.process_rank;
        if (s->files[r].path) {
            mps_fail(err, MPS_ECORRUPT, "%s: header process_rank=%d, the same as %s", f->path, r, s->files[r].path);
            goto out;
        }
        int zero = 0;
        if (detect_size(s, f, &zero, err) != 0)
            goto out;
        if (i > 0 && zero != s->zero) {
            mps_fail(err, MPS_ECORRUPT, "%s: its size says %s but %s holds %s", f->path,
                     zero ? "ZeRO-1 slices" : "whole copies", first->path, s->zero ? "ZeRO-1 slices" : "whole copies");
            goto out;
        }
        s->zero = zero;
        if (i == 0)
            in0_rank = r;
        s->files[r] = *f; /* moved: the rank's slot owns path and fd now */
        f->path = NULL;
        f->fd = -1;
    }
    /* n files with distinct ranks in 0..n-1: every rank is present */
    s->shard_numel = s->zero ? s->total / n : s->total;
    rc = 0;
out:
    files_close(in, n);
    free(order);
    if (rc != 0)
        mps_llmc_state_close(s);
    else
        *out = s;
    return rc;
}

int mps_llmc_state_processes(const mps_llmc_state *s) { return s->n; }
int mps_llmc_state_zero(const mps_llmc_state *s) { return s->zero; }
int mps_llmc_state_has_master(const mps_llmc_state *s) { return s->files[0].h.use_master_weights; }
const mps_llmc_state_header *mps_llmc_state_rank(const mps_llmc_state *s, int rank) { return &s->files[rank].h; }

static json_t *u64_string(uint64_t v)
{
    char buf[24];
    snprintf(buf, sizeof buf, "%" PRIu64, v);
    return json_string(buf);
}

char *mps_llmc_state_json(const mps_llmc_state *s)
{
    json_t *ranks = json_array();
    int ok = ranks != NULL;
    for (int r = 0; ok && r < s->n; r++) {
        const mps_llmc_state_header *h = &s->files[r].h;
        ok = json_array_append_new(ranks, json_pack("{s:o, s:o, s:o, s:o}", "rng_state", u64_string(h->rng_state),
                                   "rng_state_last_update", u64_string(h->rng_state_last_update),
                                   "current_shard_idx", u64_string(h->current_shard_idx),
                                   "current_sample_idx", u64_string(h->current_sample_idx))) == 0;
    }
    if (!ok) { /* out of memory: no partial record */
        json_decref(ranks);
        return NULL;
    }
    json_t *root = json_pack("{s:{s:i, s:i, s:i, s:i, s:o}}", "llmc", "num_processes", s->n, "zero_stage", s->zero,
                             "use_master_weights", s->files[0].h.use_master_weights, "should_shuffle",
                             s->files[0].h.should_shuffle, "ranks", ranks);
    char *text = root ? json_dumps(root, JSON_COMPACT) : NULL;
    json_decref(root);
    return text;
}

/* Reads canonical elements [c, c + len) of tensor t, kind array `ka` (0 m, 1 v, 2 master) into dst. */
static int read_run(mps_llmc_state *s, int ka, int t, int64_t S, int64_t c, int64_t len, float *dst, mps_err *err)
{
    int64_t base = MPS_LLMC_STATE_HEADER_BYTES + (int64_t)ka * s->shard_numel * 4;
    if (!s->zero)
        return mps_pread_full(s->files[0].fd, s->files[0].path, dst, (size_t)len * 4, base + (s->prefix[t] + c) * 4,
                              err);
    int64_t P = S / s->n; /* rank r holds [r*P, (r+1)*P) of the tensor at prefix/n */
    while (len > 0) {
        int64_t r = c / P, within = c - r * P, take = P - within < len ? P - within : len;
        const state_file *f = &s->files[r];
        if (mps_pread_full(f->fd, f->path, dst, (size_t)take * 4, base + (s->prefix[t] / s->n + within) * 4, err) != 0)
            return -1;
        c += take;
        len -= take;
        dst += take;
    }
    return 0;
}

int mps_llmc_state_gather(mps_llmc_state *s, mps_kind kind, int tensor, const mps_box *box, int64_t fb, int64_t fe,
                          float *dst, mps_err *err)
{
    int ka = kind == MPS_KIND_ADAM_M ? 0 : kind == MPS_KIND_ADAM_V ? 1 : kind == MPS_KIND_MASTER ? 2 : -1;
    if (ka < 0 || (ka == 2 && !mps_llmc_state_has_master(s)))
        return mps_fail(err, MPS_EFAIL, "llm.c state files hold no %s", mps_kind_name(kind));
    if (fe <= fb)
        return 0;
    mps_tensor_spec spec;
    mps_tensor_spec_get(&s->cfg, tensor, &spec);
    int64_t S = mps_tensor_numel(&spec), W = box->cnt[box->ndim - 1];
    /* rows of the box that continue each other in the canonical tensor are read as one run */
    int64_t run_c = 0, run_len = 0;
    float *run_dst = dst;
    for (int64_t row = fb / W; row * W < fe; row++) {
        int64_t s0 = row * W > fb ? row * W : fb, s1 = (row + 1) * W < fe ? (row + 1) * W : fe;
        int64_t c = mps_box_row_origin(&spec, box, row) + (s0 - row * W);
        if (run_len > 0 && c == run_c + run_len) {
            run_len += s1 - s0;
            continue;
        }
        if (run_len > 0 && read_run(s, ka, tensor, S, run_c, run_len, run_dst, err) != 0)
            return -1;
        run_c = c;
        run_len = s1 - s0;
        run_dst = dst + (s0 - fb);
    }
    return run_len > 0 ? read_run(s, ka, tensor, S, run_c, run_len, run_dst, err) : 0;
}

/* ---------------------------------------------------------------------------------------------
 * Writing */

static int parse_u64(json_t *obj, const char *key, int r, uint64_t *out, mps_err *err)
{
    json_t *v = json_object_get(obj, key);
    const char *text = json_is_string(v) ? json_string_value(v) : NULL;
    char *end = NULL;
    errno = 0;
    unsigned long long x = text && *text >= '0' && *text <= '9' ? strtoull(text, &end, 10) : 0;
    if (!text || !end || *end != '\0' || errno != 0)
        return mps_fail(err, MPS_ECORRUPT, "manifest: state.train.llmc.ranks[%d].%s must be a decimal string of "
                        "an unsigned 64-bit number", r, key);
    *out = x;
    return 0;
}

int mps_llmc_state_headers(const char *train_state_json, int64_t step, int processes, int use_master_weights,
                           mps_llmc_state_header *hdr, mps_err *err)
{
    if (step < 0 || step > INT32_MAX)
        return mps_fail(err, MPS_EUNSUPPORTED, "step %lld does not fit llm.c's int32 header field", (long long)step);
    json_t *root = NULL, *ranks = NULL;
    if (train_state_json) {
        json_error_t jerr;
        root = json_loads(train_state_json, 0, &jerr);
        json_t *llmc = json_object_get(root, "llmc");
        ranks = json_object_get(llmc, "ranks");
        if (llmc && (!json_is_array(ranks) || json_array_size(ranks) == 0)) {
            json_decref(root);
            return mps_fail(err, MPS_ECORRUPT, "manifest: state.train.llmc.ranks must be a non-empty array");
        }
    }
    int rc = 0;
    for (int r = 0; r < processes && rc == 0; r++) {
        mps_llmc_state_header *h = &hdr[r];
        *h = (mps_llmc_state_header){ .num_processes = processes, .process_rank = r,
                                      .use_master_weights = use_master_weights, .step = step };
        if (!ranks) {
            /* llm.c's values before its first step: rng 13371337 + rank, no sample drawn yet (the
             * loader's next batch is sample 0 of shard 0) */
            h->rng_state = h->rng_state_last_update = LLMC_RNG_INIT + (uint64_t)r;
            h->current_shard_idx = 0;
            h->current_sample_idx = UINT64_MAX;
            continue;
        }
        int src = r % (int)json_array_size(ranks);
        json_t *o = json_array_get(ranks, (size_t)src);
        rc = parse_u64(o, "rng_state", src, &h->rng_state, err) || parse_u64(o, "rng_state_last_update", src,
             &h->rng_state_last_update, err) || parse_u64(o, "current_shard_idx", src, &h->current_shard_idx, err) ||
             parse_u64(o, "current_sample_idx", src, &h->current_sample_idx, err) ? -1 : 0;
    }
    json_decref(root);
    return rc;
}

void mps_llmc_state_name(int64_t step, int rank, char *buf, size_t size)
{
    snprintf(buf, size, "state_%08lld_%05d.bin", (long long)step, rank);
}

void mps_llmc_done_name(int64_t step, char *buf, size_t size) { snprintf(buf, size, "DONE_%08lld", (long long)step); }

int mps_llmc_state_create(const char *dir, const mps_llmc_state_header *h, int64_t shard_numel, mps_out_file **out,
                          mps_err *err)
{
    char name[64];
    mps_llmc_state_name(h->step, h->process_rank, name, sizeof name);
    int64_t total = MPS_LLMC_STATE_HEADER_BYTES + (int64_t)(2 + h->use_master_weights) * shard_numel * 4;
    if (mps_out_file_begin(dir, name, MPS_DTYPE_F32, NULL, 0, total, NULL, NULL, out, err) != 0)
        return -1;
    int32_t hb[256];
    mps_llmc_state_header_pack(h, hb);
    if (mps_out_file_write(*out, hb, sizeof hb, err) != 0) {
        mps_out_file_abort(*out);
        *out = NULL;
        return -1;
    }
    return 0;
}

static int remove_file(const char *dir, const char *name, int *removed, mps_err *err)
{
    char path[4352];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (unlink(path) == 0) {
        *removed = 1;
        return 0;
    }
    if (errno == ENOENT)
        return 0;
    return mps_fail(err, MPS_EIO, "%s: cannot remove: %s", path, strerror(errno));
}

int mps_llmc_done_remove(const char *dir, int64_t step, mps_err *err)
{
    char name[32];
    int removed = 0;
    mps_llmc_done_name(step, name, sizeof name);
    if (remove_file(dir, name, &removed, err) != 0)
        return -1;
    return removed ? mps_fsync_path(dir, err) : 0;
}

int mps_llmc_state_remove_extra(const char *dir, int64_t step, int processes, mps_err *err)
{
    /* the names are fixed by (step, rank): probe ranks upward from `processes` until one is missing
     * (an export writes ranks 0..N-1 without gaps) */
    int removed = 0;
    for (int r = processes; r < MPS_LLMC_MAX_PROCESSES; r++) {
        char name[64];
        int gone = 0;
        mps_llmc_state_name(step, r, name, sizeof name);
        if (remove_file(dir, name, &gone, err) != 0)
            return -1;
        if (!gone)
            break;
        removed = 1;
    }
    return removed ? mps_fsync_path(dir, err) : 0;
}

int mps_llmc_done_write(const char *dir, int64_t step, mps_err *err)
{
    char name[32], path[4352];
    mps_llmc_done_name(step, name, sizeof name);
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return mps_write_file_atomic(path, "", 0, err);
}
