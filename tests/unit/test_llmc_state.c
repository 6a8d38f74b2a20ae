/* llm.c optimizer-state import and export against an oracle written here from llm.c's own rules
 * (train_gpt2.cu gpt2_update / save_state, llmc/zero.cuh), independent of formats/llmc_state.c:
 * state files are written by hand with value f(kind, tensor, element) at the place llm.c puts
 * that element; the import must give f back at every element through mps_ckpt_gather, and the
 * export of the imported checkpoint must reproduce the hand-written files byte for byte. A
 * slicing that is wrong the same way in both directions fails one of the two checks. */
#include <fcntl.h>
#include <stdint.h>

#include "ckpt.h"
#include "export.h"
#include "llmc_state.h"
#include "modelfile.h"
#include "shard/shard.h"
#include "testutil.h"

static const char *tmp;

/* n_layer 2, C 48, 4 heads, vocab 250 (padded 256), maxT 32: every per-layer size divides by 2 and 3 */
static mps_config cfg_small(void)
{
    mps_config c = { .n_layer = 2, .n_embd = 48, .n_head = 4, .n_positions = 32, .vocab = 250, .padded_vocab = 256 };
    return c;
}

/* llm.c's 16 parameter tensors: per-layer sizes and layer counts (fill_in_parameter_sizes). */
static void llmc_sizes(const mps_config *c, int64_t S[16], int64_t L[16])
{
    int64_t C = c->n_embd, Vp = c->padded_vocab, T = c->n_positions;
    int64_t s[16] = { Vp * C, T * C, C, C, 3 * C * C, 3 * C, C * C, C, C, C, 4 * C * C, 4 * C, C * 4 * C, C, C, C };
    for (int i = 0; i < 16; i++) {
        S[i] = s[i];
        L[i] = (i >= 2 && i <= 13) ? c->n_layer : 1;
    }
}

/* canonical tensor index of llm.c tensor i, layer l (FORMAT.md catalogue) */
static int canon(const mps_config *c, int i, int l)
{
    if (i < 2)
        return i;
    if (i >= 14)
        return 2 + 12 * c->n_layer + (i - 14);
    return 2 + 12 * l + (i - 2);
}

/* The oracle: exact in f32 (ids stay below 2^22). kind 0 m, 1 v, 2 master. */
static float f_value(const mps_config *c, int kind, int t, int64_t e)
{
    static int64_t first[64]; /* first id of each tensor: catalogue order (one config per run) */
    if (first[1] == 0)
        for (int u = 1; u < mps_tensor_count(c); u++) {
            mps_tensor_spec s;
            mps_tensor_spec_get(c, u - 1, &s);
            first[u] = first[u - 1] + mps_tensor_numel(&s);
        }
    int64_t id = first[t] + e + 1;
    return kind == 0 ? (float)id : kind == 1 ? -(float)id : (float)id + 0.5f;
}

typedef struct {
    int n, zero, master, shuffle;
    int64_t step;
} variant;

static void header_of(const variant *v, int r, int32_t h[256])
{
    memset(h, 0, 256 * sizeof(int32_t));
    h[0] = 20240527;
    h[1] = 1;
    h[2] = v->n;
    h[3] = r;
    h[4] = v->master;
    h[5] = v->shuffle;
    h[10] = (int32_t)v->step;
    uint64_t rng = 13371337u + 1000u * (uint64_t)r, last = 777u + (uint64_t)r, shard = 3, sample = 41 + (uint64_t)r;
    memcpy(&h[20], &rng, 8);
    memcpy(&h[22], &last, 8);
    memcpy(&h[30], &shard, 8);
    memcpy(&h[32], &sample, 8);
}

/* Writes rank r's file by llm.c's rules; returns its size. */
static long write_state(const mps_config *c, const variant *v, int r, const char *path)
{
    int64_t S[16], L[16], total = 0, off[16];
    llmc_sizes(c, S, L);
    for (int i = 0; i < 16; i++) {
        off[i] = total;
        total += S[i] * L[i];
    }
    int64_t P = v->zero ? total / v->n : total;
    int nk = 2 + v->master;
    float *a = calloc((size_t)(nk * P), sizeof(float));
    for (int k = 0; k < nk; k++)
        for (int i = 0; i < 16; i++)
            for (int l = 0; l < L[i]; l++) {
                int t = canon(c, i, l);
                if (v->zero) { /* zero.cuh: rank r takes [r*S/N, (r+1)*S/N) of the layer; adamw at off/N + l*S/N */
                    int64_t q = S[i] / v->n;
                    for (int64_t e = r * q; e < (r + 1) * q; e++)
                        a[k * P + off[i] / v->n + l * q + (e - r * q)] = f_value(c, k, t, e);
                } else {
                    for (int64_t e = 0; e < S[i]; e++)
                        a[k * P + off[i] + l * S[i] + e] = f_value(c, k, t, e);
                }
            }
    int32_t h[256];
    header_of(v, r, h);
    FILE *fp = fopen(path, "wb");
    fwrite(h, 4, 256, fp);
    fwrite(a, 4, (size_t)(nk * P), fp);
    if (v->shuffle) { /* gl_pathc, shard_indices, shard_num_samples, intra_shard_indices, mt19937_state */
        uint64_t npath = 3, nsamp = 5;
        int32_t idx[5] = { 4, 2, 0, 1, 3 };
        char rng[2520];
        memset(rng, 7, sizeof rng);
        fwrite(&npath, 8, 1, fp);
        fwrite(idx, 4, 3, fp);
        fwrite(&nsamp, 8, 1, fp);
        fwrite(idx, 4, 5, fp);
        fwrite(rng, 1, sizeof rng, fp);
    }
    long size = ftell(fp);
    fclose(fp);
    free(a);
    return size;
}

static char *read_all(const char *path, long *n)
{
    *n = -1; /* also when the file cannot be opened */
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return NULL;
    fseek(fp, 0, SEEK_END);
    *n = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    char *b = malloc((size_t)*n + 1);
    if (fread(b, 1, (size_t)*n, fp) != (size_t)*n)
        *n = -1;
    fclose(fp);
    return b;
}

/* Every element of adam_m, adam_v (and master) equals the oracle; param equals the model file. */
static void check_ckpt(const mps_config *c, const variant *v, const char *dir, const char *what)
{
    mps_ckpt *ck;
    mps_err err = { 0 };
    int rc = mps_ckpt_open(dir, &ck, &err);
    CHECK_MSG(rc == 0, "%s: open: %s", what, err.msg);
    if (rc != 0)
        return;
    const mps_manifest *m = mps_ckpt_manifest(ck);
    CHECK(m->step == v->step);
    CHECK(m->rng_seed == 13371337u);
    CHECK(((m->kinds >> MPS_KIND_MASTER) & 1u) == (unsigned)v->master);
    char last_rank[256]; /* the record of the last rank, as header_of() wrote it */
    snprintf(last_rank, sizeof last_rank, "{\"rng_state\":\"%d\",\"rng_state_last_update\":\"%d\","
             "\"current_shard_idx\":\"3\",\"current_sample_idx\":\"%d\"}]", 13371337 + 1000 * (v->n - 1),
             777 + v->n - 1, 41 + v->n - 1);
    CHECK_MSG(m->train_state_json && strstr(m->train_state_json, "{\"llmc\":") && strstr(m->train_state_json, last_rank),
              "%s: train_state_json %s lacks %s", what, m->train_state_json ? m->train_state_json : "(null)", last_rank);
    mps_read_scratch *s = mps_read_scratch_new();
    int64_t bad = 0;
    for (int t = 0; t < mps_tensor_count(c); t++) {
        mps_tensor_spec spec;
        mps_tensor_spec_get(c, t, &spec);
        mps_box box;
        mps_box_whole(&spec, &box);
        int64_t n = mps_tensor_numel(&spec);
        float *x = malloc((size_t)n * sizeof(float));
        mps_kind kinds[3] = { MPS_KIND_ADAM_M, MPS_KIND_ADAM_V, MPS_KIND_MASTER };
        for (int k = 0; k < 2 + v->master; k++) {
            rc = mps_ckpt_gather(ck, s, kinds[k], t, &box, 0, n, x, &err);
            CHECK_MSG(rc == 0, "%s: gather %s: %s", what, spec.name, err.msg);
            for (int64_t e = 0; rc == 0 && e < n; e++)
                if (x[e] != f_value(c, k, t, e) && bad++ < 5)
                    fprintf(stderr, "%s: %s %s[%lld] = %g, want %g\n", what, mps_kind_name(kinds[k]), spec.name,
                            (long long)e, x[e], f_value(c, k, t, e));
        }
        rc = mps_ckpt_gather(ck, s, MPS_KIND_PARAM, t, &box, 0, n, x, &err);
        for (int64_t e = 0; rc == 0 && e < n; e++) {
            float want = mps_synth_value(c, 5, t, e);
            if (t == MPS_TENSOR_WTE && e >= c->vocab * c->n_embd)
                want = 0.0f;
            if (memcmp(&x[e], &want, 4) != 0 && bad++ < 5)
                fprintf(stderr, "%s: param %s[%lld] = %g, want %g\n", what, spec.name, (long long)e, x[e], want);
        }
        free(x);
    }
    CHECK_MSG(bad == 0, "%s: %lld elements differ", what, (long long)bad);
    mps_read_scratch_free(s);
    mps_ckpt_close(ck);
}

static void run_variant(const variant *v, const char *layout)
{
    mps_config c = cfg_small();
    char what[128], dir[1024], model[1100], ck[1100], ex[1100], paths[3][1200];
    snprintf(what, sizeof what, "n=%d zero=%d master=%d shuffle=%d layout %s", v->n, v->zero, v->master, v->shuffle,
             layout);
    snprintf(dir, sizeof dir, "%s/v%d%d%d%d-%s", tmp, v->n, v->zero, v->master, v->shuffle, layout);
    mps_err err = { 0 };
    CHECK(mps_synth_write(dir, &c, MPS_FILE_LLMC, MPS_DTYPE_F32, 5, &err) == 0);
    snprintf(model, sizeof model, "%s/model_%08lld.bin", dir, (long long)v->step);
    char orig[1100];
    snprintf(orig, sizeof orig, "%s/model_00000000.bin", dir);
    if (v->step != 0)
        CHECK(rename(orig, model) == 0);
    const char *list[3];
    for (int r = v->n - 1; r >= 0; r--) { /* any order */
        snprintf(paths[r], sizeof paths[r], "%s/state_%08lld_%05d.bin", dir, (long long)v->step, r);
        write_state(&c, v, r, paths[r]);
        list[v->n - 1 - r] = paths[r];
    }
    snprintf(ck, sizeof ck, "%s/ck", dir);
    mps_shard_opts so = { .layout = layout, .out_dir = ck, .quiet = 1, .threads = 2, .state_paths = list,
                          .nstate = v->n };
    int rc = mps_shard(model, &so, &err);
    CHECK_MSG(rc == 0, "%s: shard: %s", what, err.msg);
    if (rc != 0)
        return;
    check_ckpt(&c, v, ck, what);
    /* export back: the same bytes as the hand-written files (llm.c's placement, other direction) */
    snprintf(ex, sizeof ex, "%s/ex", dir);
    mps_export_opts eo = { .format = MPS_FILE_LLMC, .dtype = -1, .out_dir = ex, .threads = 2, .quiet = 1,
                           .processes = v->n, .zero = v->zero, .master_weights = v->master };
    rc = mps_export(ck, &eo, &err);
    CHECK_MSG(rc == 0, "%s: export: %s", what, err.msg);
    for (int r = 0; rc == 0 && r < v->n; r++) {
        char out[1300];
        snprintf(out, sizeof out, "%s/state_%08lld_%05d.bin", ex, (long long)v->step, r);
        long na, nb;
        char *a = read_all(paths[r], &na), *b = read_all(out, &nb);
        /* export writes should_shuffle 0 and no data-loader block (the permutation is not kept) */
        int64_t S[16], L[16], total = 0;
        llmc_sizes(&c, S, L);
        for (int i = 0; i < 16; i++)
            total += S[i] * L[i];
        long cmp_n = 1024 + (long)(2 + v->master) * 4 * (long)(v->zero ? total / v->n : total);
        CHECK_MSG(b && nb == cmp_n, "%s: exported %s is %ld bytes, want %ld", what, out, nb, cmp_n);
        if (a && b && nb == cmp_n) {
            int32_t ha[256], hb[256];
            memcpy(ha, a, 1024);
            memcpy(hb, b, 1024);
            ha[5] = 0;
            CHECK_MSG(memcmp(ha, hb, 1024) == 0, "%s: rank %d header differs", what, r);
            CHECK_MSG(memcmp(a + 1024, b + 1024, (size_t)cmp_n - 1024) == 0, "%s: rank %d arrays differ", what, r);
        }
        free(a);
        free(b);
    }
    char done[1300], mout[1300];
    snprintf(done, sizeof done, "%s/DONE_%08lld", ex, (long long)v->step);
    snprintf(mout, sizeof mout, "%s/model_%08lld.bin", ex, (long long)v->step);
    CHECK_MSG(access(done, F_OK) == 0, "%s: no %s", what, done);
    long na, nb;
    char *a = read_all(model, &na), *b = read_all(mout, &nb);
    CHECK_MSG(a && b && na == nb && memcmp(a, b, (size_t)na) == 0, "%s: exported model differs", what);
    free(a);
    free(b);
}

static void expect_fail(const char *what, const char *model, const char **list, int n, int code, const char *needle)
{
    char ck[1100];
    snprintf(ck, sizeof ck, "%s/bad-ck", tmp);
    mps_err err = { 0 };
    mps_shard_opts so = { .layout = "dp=2", .out_dir = ck, .quiet = 1, .threads = 2, .state_paths = list, .nstate = n };
    int rc = mps_shard(model, &so, &err);
    CHECK_MSG(rc != 0 && err.code == code && strstr(err.msg, needle), "%s: rc %d code %d: %s", what, rc, err.code,
              err.msg);
}

static void errors(void)
{
    mps_config c = cfg_small();
    char dir[1024], model[1100], p[4][1200];
    snprintf(dir, sizeof dir, "%s/errors", tmp);
    mps_err err = { 0 };
    CHECK(mps_synth_write(dir, &c, MPS_FILE_LLMC, MPS_DTYPE_F32, 5, &err) == 0);
    snprintf(model, sizeof model, "%s/model_00000000.bin", dir);
    variant v = { .n = 2, .zero = 1, .master = 0, .step = 0 };
    for (int r = 0; r < 2; r++) {
        snprintf(p[r], sizeof p[r], "%s/state_00000000_%05d.bin", dir, r);
        write_state(&c, &v, r, p[r]);
    }
    const char *one[1] = { p[0] }, *dup[2] = { p[0], p[0] };
    expect_fail("missing rank", model, one, 1, MPS_ECORRUPT, "num_processes=2 but 1 state file");
    expect_fail("duplicate rank", model, dup, 2, MPS_ECORRUPT, "process_rank=0, the same as");
    /* a truncated file */
    snprintf(p[2], sizeof p[2], "%s/trunc.bin", dir);
    long n;
    char *b = read_all(p[1], &n);
    FILE *fp = fopen(p[2], "wb");
    fwrite(b, 1, (size_t)n - 4, fp);
    fclose(fp);
    const char *trunc[2] = { p[0], p[2] };
    expect_fail("truncated", model, trunc, 2, MPS_ECORRUPT, "trunc.bin: file is");
    /* another step */
    variant v7 = v;
    v7.step = 7;
    snprintf(p[3], sizeof p[3], "%s/step7.bin", dir);
    write_state(&c, &v7, 1, p[3]);
    const char *steps[2] = { p[0], p[3] };
    expect_fail("step", model, steps, 2, MPS_ECORRUPT, "step7.bin: header step=7 but");
    /* bad magic */
    b[0] ^= 1;
    fp = fopen(p[2], "wb");
    fwrite(b, 1, (size_t)n, fp);
    fclose(fp);
    expect_fail("magic", model, trunc, 2, MPS_ECORRUPT, "trunc.bin: header magic=");
    free(b);
    /* the model name's step must match the files' */
    char m5[1100];
    snprintf(m5, sizeof m5, "%s/model_00000005.bin", dir);
    CHECK(rename(model, m5) == 0);
    const char *both[2] = { p[0], p[1] };
    expect_fail("model step", m5, both, 2, MPS_ECORRUPT, "the model file is of step 5");
    /* export refuses a ZeRO-1 slicing that llm.c cannot do, naming the tensor */
    CHECK(rename(m5, model) == 0);
    char ck[1100], ex[1100];
    snprintf(ck, sizeof ck, "%s/ck", dir);
    snprintf(ex, sizeof ex, "%s/ex", dir);
    mps_shard_opts so = { .layout = "tp=2", .out_dir = ck, .quiet = 1, .threads = 2, .state_paths = both, .nstate = 2 };
    CHECK(mps_shard(model, &so, &err) == 0);
    mps_export_opts eo = { .format = MPS_FILE_LLMC, .dtype = -1, .out_dir = ex, .threads = 2, .quiet = 1,
                           .processes = 5, .zero = 1, .master_weights = 1 };
    mps_err_clear(&err);
    CHECK_MSG(mps_export(ck, &eo, &err) != 0 && err.code == MPS_EUSAGE && strstr(err.msg, "tensor wte"),
              "zero check: %s", err.msg);
    CHECK(access(ex, F_OK) != 0); /* refused before anything was written */
}

int main(void)
{
    tmp = test_tmpdir("llmc_state");
    variant vs[] = {
        { .n = 2, .zero = 1, .master = 0, .shuffle = 0, .step = 0 },
        { .n = 3, .zero = 1, .master = 1, .shuffle = 1, .step = 42 },
        { .n = 2, .zero = 0, .master = 1, .shuffle = 0, .step = 42 },
        { .n = 1, .zero = 0, .master = 1, .shuffle = 1, .step = 3 },
    };
    for (size_t i = 0; i < sizeof vs / sizeof vs[0]; i++) {
        run_variant(&vs[i], "dp=2,tp=2,zero=1");
        if (i < 2)
            run_variant(&vs[i], "pp=2,tp=4,zero=0");
    }
    errors();
    TEST_DONE();
}
