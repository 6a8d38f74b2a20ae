/* A small valid checkpoint built in memory by the HDF5 fuzz targets: a one-layer model, a few
 * layouts, chunks of 16 elements (several per tensor), kinds param and adam_m, a fixed
 * checkpoint id. The shard files are kept as bytes; each input reinstalls them in a scratch
 * directory, edits them, and writes a manifest that records their sizes. */
#ifndef MPS_FUZZ_H5_BASE_H
#define MPS_FUZZ_H5_BASE_H

#include <fcntl.h>
#include <hdf5.h>
#include <sys/stat.h>

#include "ckpt.h"
#include "fuzz_common.h"
#include "geometry.h"
#include "h5util.h"
#include "modelfile.h"

static const mps_config h5_cfg = { .n_layer = 1, .n_embd = 8, .n_head = 2, .n_positions = 4, .vocab = 8, .padded_vocab = 16 };
#define H5_ID "0123456789abcdef0123456789abcdef"
/* A FIFO beside the shard files: the target of the link and storage seeds (an external link's
 * relative file name is looked up beside the file that holds it). A reader that opened it would
 * block until libFuzzer's -timeout. */
#define H5_FIFO "fifo"
#define H5_MAX_WORLD 4

typedef struct {
    mps_manifest m;
    int world;
    unsigned char *bytes[H5_MAX_WORLD];
    size_t size[H5_MAX_WORLD];
} h5_base;

/* The canonical value of element `flat` of tensor t for a kind (Adam moments differ from params). */
static float h5_value(mps_kind kind, int t, int64_t flat)
{
    float v = mps_synth_value(&h5_cfg, 7, t, flat);
    return kind == MPS_KIND_PARAM ? v : v * v + (float)flat;
}

static int h5_gather(void *ctx, int worker, mps_kind kind, int tensor, const mps_box *box, int64_t fb, int64_t fe,
                     float *dst, mps_err *err)
{
    (void)ctx;
    (void)worker;
    (void)err;
    mps_tensor_spec spec;
    mps_tensor_spec_get(&h5_cfg, tensor, &spec);
    int64_t n = mps_tensor_numel(&spec);
    float *full = malloc((size_t)n * sizeof *full);
    FUZZ_ASSERT(full != NULL, "malloc");
    for (int64_t i = 0; i < n; i++)
        full[i] = h5_value(kind, tensor, i);
    mps_box_extract(full, &spec, box, fb, fe, dst);
    free(full);
    return 0;
}

static void h5_read_file(const char *path, unsigned char **bytes, size_t *size)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    FUZZ_ASSERT(fd >= 0 && fstat(fd, &st) == 0, "%s", path);
    *size = (size_t)st.st_size;
    *bytes = malloc(*size);
    FUZZ_ASSERT(*bytes && read(fd, *bytes, *size) == (ssize_t)*size, "%s", path);
    close(fd);
}

static void h5_write_file(const char *path, const void *bytes, size_t size)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    FUZZ_ASSERT(fd >= 0 && (size == 0 || write(fd, bytes, size) == (ssize_t)size) && close(fd) == 0, "write %s", path);
}

/* A scratch directory for this process, on /dev/shm when there is one (no disk traffic). */
static void h5_scratch_dir(char *dir, size_t size, const char *name)
{
    struct stat st;
    const char *base = getenv("TMPDIR");
    if (!base)
        base = stat("/dev/shm", &st) == 0 && access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    snprintf(dir, size, "%s/%s.XXXXXX", base, name);
    FUZZ_ASSERT(mkdtemp(dir) != NULL, "mkdtemp %s", dir);
}

static void h5_make_fifo(const char *dir)
{
    char path[400];
    snprintf(path, sizeof path, "%s/" H5_FIFO, dir);
    FUZZ_ASSERT(mkfifo(path, 0644) == 0, "mkfifo %s", path);
}

static void h5_rank_path(const char *dir, int rank, char *buf, size_t size)
{
    char name[32];
    mps_shard_file_name(rank, name, sizeof name);
    snprintf(buf, size, "%s/%s", dir, name);
}

/* HDF5 keeps freed blocks on its own free lists and reuses them: AddressSanitizer would then miss
 * a use after free inside those blocks, and a leak would be reported where the block was first
 * allocated. With the lists off, every block goes back to malloc at once. */
static void h5_no_free_lists(void)
{
    H5set_free_list_limits(0, 0, 0, 0, 0, 0);
}

/* Writes the valid checkpoint of `layout` with the project's writer and keeps its files' bytes. */
static void h5_base_build(h5_base *b, const char *layout, const char *scratch)
{
    mps_err err;
    mps_err_clear(&err);
    mps_layout L;
    FUZZ_ASSERT(mps_layout_parse(layout, &h5_cfg, &L, &err) == 0, "%s", err.msg);
    FUZZ_ASSERT(mps_h5_init(&err) == 0, "%s", err.msg);
    mps_manifest_init(&b->m, &h5_cfg, &L);
    memcpy(b->m.checkpoint_id, H5_ID, 33);
    b->m.kinds = (1u << MPS_KIND_PARAM) | (1u << MPS_KIND_ADAM_M);
    b->m.chunk_bytes = 64;
    snprintf(b->m.source_format, sizeof b->m.source_format, "synth");
    b->world = mps_layout_world(&L);
    FUZZ_ASSERT(b->world <= H5_MAX_WORLD, "world");
    char dir[512];
    snprintf(dir, sizeof dir, "%s/base", scratch);
    FUZZ_ASSERT(mkdir(dir, 0755) == 0, "mkdir %s", dir);
    mps_source src = { .gather = h5_gather };
    mps_write_opts wo = { .threads = 1, .quiet = 1, .label = "fuzz" };
    FUZZ_ASSERT(mps_write_shards(dir, &b->m, NULL, 0, &src, &wo, &err) == 0, "%s", err.msg);
    b->m.nfiles = b->world;
    b->m.files = calloc((size_t)b->world, sizeof *b->m.files);
    FUZZ_ASSERT(b->m.files != NULL, "calloc");
    for (int r = 0; r < b->world; r++) {
        char path[600];
        h5_rank_path(dir, r, path, sizeof path);
        h5_read_file(path, &b->bytes[r], &b->size[r]);
        unlink(path);
        b->m.files[r].rank = r;
        mps_shard_file_name(r, b->m.files[r].name, sizeof b->m.files[r].name);
    }
    rmdir(dir);
}

/* Writes the manifest of dir, recording the sizes its rank files have now. */
static void h5_write_manifest(h5_base *b, const char *dir)
{
    for (int r = 0; r < b->world; r++) {
        char path[600];
        struct stat st;
        h5_rank_path(dir, r, path, sizeof path);
        b->m.files[r].bytes = stat(path, &st) == 0 ? (int64_t)st.st_size : 0;
    }
    char path[600];
    snprintf(path, sizeof path, "%s/" MPS_MANIFEST_NAME, dir);
    mps_err err;
    mps_err_clear(&err);
    FUZZ_ASSERT(mps_manifest_write(path, &b->m, &err) == 0, "%s", err.msg);
}

static void h5_problem(void *ctx, const char *line)
{
    int *count = ctx;
    (*count)++;
    FUZZ_ASSERT(line[0] && !strchr(line, '\n'), "problem line: '%s'", line);
}

/* verify, then (when verify found nothing) every tensor of every kind read back exactly. */
static void h5_check(h5_base *b, const char *dir)
{
    mps_err err;
    mps_err_clear(&err);
    int problems = 0;
    mps_verify_opts vo = { .threads = 1, .quiet = 1, .report = h5_problem, .report_ctx = &problems };
    int rc = mps_verify(dir, &vo, &err);
    if (rc < 0) {
        fuzz_check_err(&err, "verify");
        return;
    }
    FUZZ_ASSERT(rc == problems, "verify returned %d, reported %d", rc, problems);
    mps_ckpt *c;
    mps_err_clear(&err);
    if (mps_ckpt_open(dir, &c, &err) != 0) {
        fuzz_check_err(&err, "open");
        FUZZ_ASSERT(rc > 0, "verify passed but open failed: %s", err.msg);
        return;
    }
    mps_read_scratch *s = mps_read_scratch_new();
    for (int k = 0; k < MPS_KIND_COUNT; k++) {
        if (!(b->m.kinds & (1u << k)))
            continue;
        for (int t = 0; t < mps_tensor_count(&h5_cfg); t++) {
            mps_tensor_spec spec;
            mps_tensor_spec_get(&h5_cfg, t, &spec);
            mps_box box;
            mps_box_whole(&spec, &box);
            int64_t n = mps_tensor_numel(&spec);
            float *dst = malloc((size_t)n * sizeof *dst);
            FUZZ_ASSERT(dst != NULL, "malloc");
            mps_err_clear(&err);
            if (mps_ckpt_gather(c, s, (mps_kind)k, t, &box, 0, n, dst, &err) != 0) {
                fuzz_check_err(&err, "gather");
                FUZZ_ASSERT(rc > 0, "verify passed but reading %s failed: %s", spec.name, err.msg);
            } else if (rc == 0) {
                /* chunks carry checksums: whatever verify accepts reads back as written */
                for (int64_t i = 0; i < n; i++) {
                    float want = h5_value((mps_kind)k, t, i);
                    FUZZ_ASSERT(memcmp(&want, &dst[i], 4) == 0, "%s %s[%lld] = %g, wrote %g", mps_kind_name((mps_kind)k),
                                spec.name, (long long)i, (double)dst[i], (double)want);
                }
            }
            free(dst);
        }
    }
    mps_read_scratch_free(s);
    mps_ckpt_close(c);
}

#endif
