/* Checkpoint write/read: shard a synthetic model in layout A, then every rank of layouts B reads
 * its pieces through the reader; values must equal the source bit for bit. Also corruption:
 * a flipped byte in a chunk or the manifest, a missing or truncated file. */
#include <fcntl.h>
#include <hdf5.h>
#include <stdint.h>

#include "ckpt.h"
#include "modelfile.h"
#include "shard/shard.h"
#include "testutil.h"

static const mps_config cfg = { .n_layer = 3, .n_embd = 96, .n_head = 6, .n_positions = 64, .vocab = 1000, .padded_vocab = 1024 };

static void test_gather(const char *model, const char *dir, const char *layout_a)
{
    char ck[1100];
    snprintf(ck, sizeof ck, "%s/ck", dir);
    mps_shard_opts o = { .layout = layout_a, .out_dir = ck, .quiet = 1, .chunk_bytes = 4096 * 3, .force = 1 };
    mps_err err;
    mps_err_clear(&err);
    CHECK_MSG(mps_shard(model, &o, &err) == 0, "shard %s: %s", layout_a, err.msg);
    mps_ckpt *c;
    CHECK_MSG(mps_ckpt_open(ck, &c, &err) == 0, "%s", err.msg);
    mps_read_scratch *s = mps_read_scratch_new();
    static const char *targets[] = { "dp=1", "tp=3,pp=2", "dp=4,zero=3", "dp=3,tp=2,pp=3,zero=1", "dp=2,tp=6,zero=2" };
    int64_t compared = 0;
    for (size_t li = 0; li < sizeof targets / sizeof targets[0]; li++) {
        mps_layout L;
        CHECK(mps_layout_parse(targets[li], &cfg, &L, &err) == 0);
        for (int t = 0; t < mps_tensor_count(&cfg); t++) {
            mps_tensor_spec spec;
            mps_tensor_spec_get(&cfg, t, &spec);
            int64_t n = mps_tensor_numel(&spec);
            float *canon = malloc((size_t)n * sizeof(float)), *got = malloc((size_t)n * sizeof(float)),
                  *want = malloc((size_t)n * sizeof(float));
            for (int64_t i = 0; i < n; i++)
                canon[i] = mps_synth_value(&cfg, 7, t, i);
            for (int k = MPS_KIND_PARAM; k <= MPS_KIND_ADAM_V; k++) {
                if (k == MPS_KIND_MASTER)
                    continue;
                for (int r = 0; r < mps_layout_world(&L); r++) {
                    mps_piece p;
                    mps_geometry(&cfg, &L, r, (mps_kind)k, t, &p);
                    if (!p.held || p.flat_end == p.flat_begin)
                        continue;
                    int64_t m = p.flat_end - p.flat_begin;
                    if (k == MPS_KIND_PARAM)
                        mps_box_extract(canon, &spec, &p.box, p.flat_begin, p.flat_end, want);
                    else
                        memset(want, 0, (size_t)m * sizeof(float));
                    memset(got, 0xff, (size_t)m * sizeof(float));
                    int rc = mps_ckpt_gather(c, s, (mps_kind)k, t, &p.box, p.flat_begin, p.flat_end, got, &err);
                    CHECK_MSG(rc == 0 && memcmp(got, want, (size_t)m * sizeof(float)) == 0, "%s -> %s rank %d %s %s: %s",
                              layout_a, targets[li], r, spec.name, mps_kind_name((mps_kind)k), err.msg);
                    compared += m;
                }
            }
            free(canon);
            free(got);
            free(want);
        }
    }
    CHECK(compared > 0);
    /* a kind the checkpoint does not store is refused by name */
    mps_box box = { .ndim = 1, .cnt = { 96 } };
    float tmp[96];
    mps_err_clear(&err);
    CHECK(mps_ckpt_gather(c, s, MPS_KIND_MASTER, 2, &box, 0, 96, tmp, &err) != 0 && strstr(err.msg, "master"));
    mps_read_scratch_free(s);
    mps_ckpt_close(c);
}

static int run(const char *cmd)
{
    int rc = system(cmd);
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

static void flip_byte(const char *path, long long offset)
{
    int fd = open(path, O_RDWR);
    unsigned char b;
    CHECK(pread(fd, &b, 1, offset) == 1);
    b ^= 0x5a;
    CHECK(pwrite(fd, &b, 1, offset) == 1);
    close(fd);
}

typedef struct { char lines[8][1200]; int n; } reports;
static void collect(void *ctx, const char *line)
{
    reports *r = ctx;
    if (r->n < 8)
        snprintf(r->lines[r->n++], sizeof r->lines[0], "%s", line);
}

static void test_corruption(const char *model, const char *dir)
{
    char ck[1100], cmd[4000], file[1200];
    snprintf(ck, sizeof ck, "%s/bad", dir);
    mps_shard_opts o = { .layout = "dp=2,tp=2,zero=1", .out_dir = ck, .quiet = 1 };
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_shard(model, &o, &err) == 0);
    reports rep = { 0 };
    mps_verify_opts vo = { .quiet = 1, .report = collect, .report_ctx = &rep };
    CHECK(mps_verify(ck, &vo, &err) == 0 && vo.chunks_checked > 0);
    /* find where the owner of wte's first TP part keeps its first chunk, and flip a byte in it */
    int found = 0;
    for (int r = 0; r < 4 && !found; r++) {
        snprintf(file, sizeof file, "%s/rank-%05d.h5", ck, r);
        hid_t f = H5Fopen(file, H5F_ACC_RDONLY, H5P_DEFAULT);
        if (H5Lexists(f, "/param", H5P_DEFAULT) > 0 && H5Lexists(f, "/param/wte", H5P_DEFAULT) > 0) {
            hid_t d = H5Dopen2(f, "/param/wte", H5P_DEFAULT);
            hsize_t off[2];
            unsigned mask;
            haddr_t addr;
            hsize_t size;
            hid_t space = H5Dget_space(d);
            CHECK(H5Dget_chunk_info(d, space, 0, off, &mask, &addr, &size) >= 0);
            H5Sclose(space);
            H5Dclose(d);
            H5Fclose(f);
            flip_byte(file, (long long)(addr + size / 2));
            found = 1;
        } else {
            H5Fclose(f);
        }
    }
    CHECK(found);
    rep.n = 0;
    CHECK(mps_verify(ck, &vo, &err) > 0);
    CHECK_MSG(rep.n > 0 && strstr(rep.lines[0], file) && strstr(rep.lines[0], "wte"), "report: %s", rep.n ? rep.lines[0] : "");
    const char *cli = getenv("MPSHARD");
    if (cli) { /* the CLI exits with the corrupt-input code and names file and tensor */
        snprintf(cmd, sizeof cmd, "'%s' verify -q '%s' 2>'%s/verify.err'", cli, ck, dir);
        CHECK(run(cmd) == MPS_ECORRUPT);
        snprintf(cmd, sizeof cmd, "grep -q 'rank-.*h5: tensor wte' '%s/verify.err'", dir);
        CHECK(run(cmd) == 0);
    }
    /* a flipped byte in the manifest */
    snprintf(ck, sizeof ck, "%s/bad2", dir);
    o.out_dir = ck;
    CHECK(mps_shard(model, &o, &err) == 0);
    snprintf(file, sizeof file, "%s/manifest.json", ck);
    flip_byte(file, 100);
    mps_ckpt *c = NULL;
    mps_err_clear(&err);
    CHECK(mps_ckpt_open(ck, &c, &err) != 0 && err.code == MPS_ECORRUPT && strstr(err.msg, "checksum") &&
          strstr(err.msg, "manifest.json"));
    flip_byte(file, 100);
    mps_err_clear(&err);
    CHECK(mps_ckpt_open(ck, &c, &err) == 0);
    mps_ckpt_close(c);
    /* a truncated file and a missing file */
    snprintf(file, sizeof file, "%s/rank-00001.h5", ck);
    CHECK(truncate(file, 1000) == 0);
    snprintf(file, sizeof file, "%s/rank-00003.h5", ck);
    CHECK(unlink(file) == 0);
    rep.n = 0;
    mps_err_clear(&err);
    CHECK(mps_verify(ck, &vo, &err) >= 2);
    int saw_trunc = 0, saw_missing = 0;
    for (int i = 0; i < rep.n; i++) {
        saw_trunc |= strstr(rep.lines[i], "rank-00001.h5") && strstr(rep.lines[i], "truncated");
        saw_missing |= strstr(rep.lines[i], "rank-00003.h5") && strstr(rep.lines[i], "missing");
    }
    CHECK(saw_trunc && saw_missing);
    /* a file from another checkpoint of the same model and layout */
    char other[1100];
    snprintf(other, sizeof other, "%s/other", dir);
    o.out_dir = other;
    CHECK(mps_shard(model, &o, &err) == 0);
    snprintf(ck, sizeof ck, "%s/bad3", dir);
    o.out_dir = ck;
    CHECK(mps_shard(model, &o, &err) == 0);
    snprintf(cmd, sizeof cmd, "cp '%s/rank-00002.h5' '%s/rank-00002.h5'", other, ck);
    CHECK(run(cmd) == 0);
    rep.n = 0;
    mps_err_clear(&err);
    CHECK(mps_verify(ck, &vo, &err) > 0);
    CHECK_MSG(rep.n > 0 && strstr(rep.lines[0], "another checkpoint"), "%s", rep.n ? rep.lines[0] : "");
}

static void test_commit_rules(const char *model, const char *dir)
{
    char ck[1100], path[1200];
    snprintf(ck, sizeof ck, "%s/commit", dir);
    mps_shard_opts o = { .layout = "dp=1", .out_dir = ck, .quiet = 1 };
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_shard(model, &o, &err) == 0);
    /* a committed checkpoint is not replaced without force */
    mps_err_clear(&err);
    CHECK(mps_shard(model, &o, &err) != 0 && err.code == MPS_EUSAGE && strstr(err.msg, "--force"));
    o.force = 1;
    mps_err_clear(&err);
    CHECK(mps_shard(model, &o, &err) == 0);
    /* no staging directory or lock left behind */
    snprintf(path, sizeof path, "%s.partial", ck);
    CHECK(access(path, F_OK) != 0);
    snprintf(path, sizeof path, "%s.lock", ck);
    CHECK(access(path, F_OK) != 0);
    /* a failing shard (bad layout for the model) commits nothing */
    snprintf(ck, sizeof ck, "%s/never", dir);
    o.out_dir = ck;
    o.layout = "tp=4";
    mps_err_clear(&err);
    CHECK(mps_shard(model, &o, &err) != 0 && strstr(err.msg, "n_head"));
    CHECK(access(ck, F_OK) != 0);
    /* a non-checkpoint directory is never replaced, even with force */
    snprintf(ck, sizeof ck, "%s/userdir", dir);
    mkdir(ck, 0755);
    snprintf(path, sizeof path, "%s/notes.txt", ck);
    FILE *f = fopen(path, "w");
    fputs("keep me", f);
    fclose(f);
    o.layout = "dp=1";
    mps_err_clear(&err);
    CHECK(mps_shard(model, &o, &err) != 0 && strstr(err.msg, "not an mpshard checkpoint"));
    CHECK(access(path, F_OK) == 0);
}

int main(void)
{
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    const char *dir = test_tmpdir("ckpt");
    mps_err err;
    mps_err_clear(&err);
    char model_dir[1100], model[1200];
    snprintf(model_dir, sizeof model_dir, "%s/model", dir);
    CHECK_MSG(mps_synth_write(model_dir, &cfg, MPS_FILE_SAFETENSORS, MPS_DTYPE_F32, 7, &err) == 0, "%s", err.msg);
    snprintf(model, sizeof model, "%s/model.safetensors", model_dir);
    test_gather(model, dir, "dp=2,tp=3,pp=2,zero=3");
    test_gather(model, dir, "dp=3,tp=2,pp=3,zero=1");
    test_corruption(model, dir);
    test_commit_rules(model, dir);
    TEST_DONE();
}
