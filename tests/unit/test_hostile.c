/* Hostile input, one hand-written case per trap: absurd lengths and counts in every parser
 * (safetensors header, llm.c header, manifest fields, layout and config strings, zstd frames,
 * stored chunk shapes, HDF5 attributes). Each must fail with the documented code and one line
 * naming the file, field or option, fast and without allocating what the input claims. The CLI
 * checks (exit codes 3 corrupt / 2 usage) run when $MPSHARD is set. Cases already covered by
 * test_modelfile (truncated data, overlapping offsets, wrong shapes) and cli/errors.sh are not
 * repeated here. */
#include <fcntl.h>
#include <hdf5.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdarg.h>
#include <sys/wait.h>
#include <time.h>

#include "chunk.h"
#include "ckpt.h"
#include "h5util.h"
#include "modelfile.h"
#include "save_async.h"
#include "testutil.h"
#include "zstd_filter.h"

static const char *tmp;
static const char *cli;

/* One error: the expected code, the message names each of the NULL-terminated needles, one line. */
static void expect_err(const mps_err *err, int code, const char *what, ...)
{
    CHECK_MSG(err->code == code, "%s: code %d, expected %d (%s)", what, err->code, code, err->msg);
    CHECK_MSG(strchr(err->msg, '\n') == NULL && err->msg[0], "%s: message is not one line: '%s'", what, err->msg);
    va_list ap;
    va_start(ap, what);
    for (const char *s; (s = va_arg(ap, const char *)) != NULL;)
        CHECK_MSG(strstr(err->msg, s) != NULL, "%s: message lacks '%s': %s", what, s, err->msg);
    va_end(ap);
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + t.tv_nsec * 1e-9;
}

/* Runs the CLI with args (a shell fragment); returns its exit code, stderr in tmp/cli.err. */
static int run_cli(const char *args)
{
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "'%s' %s >/dev/null 2>'%s/cli.err'", cli, args, tmp);
    int rc = system(cmd);
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

/* The CLI exits with `code` and its one-line stderr names `needle`. */
static void expect_cli(const char *args, int code, const char *needle)
{
    if (!cli)
        return;
    int rc = run_cli(args);
    char path[1200], line[2048] = "";
    snprintf(path, sizeof path, "%s/cli.err", tmp);
    FILE *fp = fopen(path, "r");
    int lines = 0;
    if (fp) {
        char buf[2048];
        while (fgets(buf, sizeof buf, fp)) {
            if (lines++ == 0)
                snprintf(line, sizeof line, "%s", buf);
        }
        fclose(fp);
    }
    CHECK_MSG(rc == code, "mpshard %s: exit %d, expected %d: %s", args, rc, code, line);
    /* (verify reports one line per damaged piece: only the first is checked) */
    CHECK_MSG(lines >= 1 && strstr(line, needle), "mpshard %s: stderr lacks '%s': %s", args, needle, line);
}

static void write_bytes(const char *path, const void *data, size_t n)
{
    FILE *fp = fopen(path, "wb");
    CHECK(fp != NULL);
    if (fp) {
        CHECK(fwrite(data, 1, n, fp) == n);
        fclose(fp);
    }
}

static char *read_bytes(const char *path, size_t *n)
{
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return NULL;
    fseek(fp, 0, SEEK_END);
    long len = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    char *buf = malloc((size_t)len + 1);
    if (buf && fread(buf, 1, (size_t)len, fp) != (size_t)len) {
        free(buf);
        buf = NULL;
    }
    if (buf)
        buf[len] = '\0';
    fclose(fp);
    *n = (size_t)len;
    return buf;
}

static const mps_config tiny = { .n_layer = 1, .n_embd = 4, .n_head = 1, .n_positions = 4, .vocab = 8, .padded_vocab = 128 };

/* ---- safetensors ---- */

/* Writes dir/model.safetensors: a header (JSON text, length field `hlen` or its own length when
 * hlen == 0) and `data` bytes. */
static void write_st(const char *dir, const char *header, uint64_t hlen, size_t data)
{
    char path[1200];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    size_t h = strlen(header);
    unsigned char *buf = calloc(1, 8 + h + data);
    uint64_t len = hlen ? hlen : h;
    for (int i = 0; i < 8; i++)
        buf[i] = (unsigned char)(len >> (8 * i));
    memcpy(buf + 8, header, h);
    write_bytes(path, buf, 8 + h + data);
    free(buf);
}

static void open_st(const char *dir, mps_err *err)
{
    char path[1200];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    mps_model_file *f = NULL;
    mps_err_clear(err);
    if (mps_model_file_open(path, NULL, &f, err) == 0)
        mps_model_file_close(f);
}

static void test_safetensors(void)
{
    char dir[1100], model[1200], args[3000];
    snprintf(dir, sizeof dir, "%s/st", tmp);
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_synth_write(dir, &tiny, MPS_FILE_SAFETENSORS, MPS_DTYPE_F32, 1, &err) == 0);
    snprintf(model, sizeof model, "%s/model.safetensors", dir);
    const char *wte = "{\"wte.weight\":{\"dtype\":\"F32\",\"shape\":[8,4],\"data_offsets\":[0,128]}}";

    /* a header length of 2^63: refused before any allocation */
    write_st(dir, wte, (uint64_t)1 << 63, 128);
    open_st(dir, &err);
    expect_err(&err, MPS_ECORRUPT, "header length 2^63", model, "header length 9223372036854775808", NULL);
    snprintf(args, sizeof args, "shard '%s' --layout dp=1 -o '%s/out'", model, tmp);
    expect_cli(args, 3, "header length");

    /* data_offsets past the end of a file that is not truncated otherwise */
    write_st(dir, "{\"wte.weight\":{\"dtype\":\"F32\",\"shape\":[8,4],\"data_offsets\":[64,192]}}", 0, 128);
    open_st(dir, &err);
    expect_err(&err, MPS_ECORRUPT, "offsets past EOF", model, "'wte.weight'", "past the end", NULL);
    expect_cli(args, 3, "'wte.weight'");
    write_st(dir, "{\"wte.weight\":{\"dtype\":\"F32\",\"shape\":[8,4],\"data_offsets\":[9223372036854775807,0]}}", 0, 128);
    open_st(dir, &err);
    expect_err(&err, MPS_ECORRUPT, "inverted offsets", model, "'wte.weight'", "invalid data_offsets", NULL);

    /* dtype and shape disagree with the byte span; a shape whose product overflows */
    write_st(dir, "{\"wte.weight\":{\"dtype\":\"F16\",\"shape\":[8,4],\"data_offsets\":[0,128]}}", 0, 128);
    open_st(dir, &err);
    expect_err(&err, MPS_ECORRUPT, "dtype/shape mismatch", model, "'wte.weight'", "F16 shape needs 64", NULL);
    write_st(dir, "{\"wte.weight\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4],\"data_offsets\":[0,128]}}", 0,
             128);
    open_st(dir, &err);
    expect_err(&err, MPS_ECORRUPT, "shape overflow", model, "'wte.weight'", "overflows", NULL);
    write_st(dir, "{\"wte.weight\":{\"dtype\":\"Q4\",\"shape\":[8,4],\"data_offsets\":[0,128]}}", 0, 128);
    open_st(dir, &err);
    expect_err(&err, MPS_ECORRUPT, "unknown dtype", model, "unknown dtype 'Q4'", NULL);

    /* bad JSON, and a key with control characters: still one line */
    write_st(dir, "{\"wte.weight\":{\"dtype\":\"F32\",\"shape\":[8,4],\"data_offsets\":[0,128]", 0, 128);
    open_st(dir, &err);
    expect_err(&err, MPS_ECORRUPT, "bad JSON", model, "header JSON", NULL);
    expect_cli(args, 3, "header JSON");
    write_st(dir, "{\"w\\n\\u001b[31m\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 0, 128);
    open_st(dir, &err);
    expect_err(&err, MPS_EUNSUPPORTED, "control characters in a key", model, "'w??[31m'", NULL);

    /* a config.json of 100000 layers beside a small file: named at once, no tables that big */
    mps_err_clear(&err);
    CHECK(mps_synth_write(dir, &tiny, MPS_FILE_SAFETENSORS, MPS_DTYPE_F32, 1, &err) == 0);
    char cpath[1200];
    snprintf(cpath, sizeof cpath, "%s/config.json", dir);
    const char *cfg = "{\"model_type\":\"gpt2\",\"n_layer\":100000,\"n_embd\":4,\"n_head\":1,\"vocab_size\":8,"
                      "\"n_positions\":4}";
    write_bytes(cpath, cfg, strlen(cfg));
    double t0 = now();
    open_st(dir, &err);
    expect_err(&err, MPS_ECORRUPT, "100000 layers", model, "is missing", "n_layer=100000", NULL);
    CHECK_MSG(now() - t0 < 0.5, "100000-layer config took %.2f s", now() - t0);
}

/* ---- llm.c ---- */

static void test_llmc(void)
{
    char dir[1100], path[1200], args[3000];
    snprintf(dir, sizeof dir, "%s/llmc", tmp);
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_synth_write(dir, &tiny, MPS_FILE_LLMC, MPS_DTYPE_F32, 1, &err) == 0);
    snprintf(path, sizeof path, "%s/model_00000000.bin", dir);
    size_t n;
    char *orig = read_bytes(path, &n);
    CHECK(orig != NULL);
    if (!orig)
        return;
    snprintf(args, sizeof args, "shard '%s' --layout dp=1 -o '%s/out'", path, tmp);
    static const struct { int field; int32_t value; const char *needle; } cases[] = {
        { 3, 1 << 30, "truncated" },      /* V = Vp = 2^30: the file would be 16 GiB */
        { 4, 100000, "truncated" },       /* L = 100000 */
        { 4, 2000000, "n_layer=2000000" }, /* beyond the model limits */
        { 6, 1 << 30, "n_embd" },         /* C = 2^30 */
        { 2, INT32_MAX, "n_positions" },  /* maxT */
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        char *b = malloc(n);
        memcpy(b, orig, n);
        memcpy(b + 4 * cases[c].field, &cases[c].value, 4);
        if (cases[c].field == 3)
            memcpy(b + 4 * 7, &cases[c].value, 4); /* Vp >= V */
        write_bytes(path, b, n);
        free(b);
        char what[64];
        snprintf(what, sizeof what, "llm.c header field %d = %d", cases[c].field, cases[c].value);
        mps_model_file *f = NULL;
        mps_err_clear(&err);
        double t0 = now();
        if (mps_model_file_open(path, NULL, &f, &err) == 0)
            mps_model_file_close(f);
        expect_err(&err, MPS_ECORRUPT, what, path, cases[c].needle, NULL);
        CHECK_MSG(now() - t0 < 0.5, "%s: took %.2f s (tables sized by the header?)", what, now() - t0);
        if (c == 0)
            expect_cli(args, 3, "truncated");
    }
    free(orig);
}

/* ---- manifest ---- */

#define XXH_KEY "\"manifest_xxh3\": \""

/* Writes the manifest text with a correct checksum (as mps_manifest_write computes it). */
static void write_manifest_text(const char *path, char *text)
{
    char *slot = strstr(text, XXH_KEY);
    CHECK(slot != NULL);
    if (slot) {
        char *d = slot + strlen(XXH_KEY), hex[17];
        memset(d, '0', 16);
        snprintf(hex, sizeof hex, "%016" PRIx64, mps_xxh3(text, strlen(text)));
        memcpy(d, hex, 16);
    }
    write_bytes(path, text, strlen(text));
}

/* Loads the manifest at src as JSON, lets edit() change it, writes it to dst re-checksummed. */
static void edit_manifest(const char *src, const char *dst, void (*edit)(json_t *root))
{
    json_error_t jerr;
    json_t *root = json_load_file(src, 0, &jerr);
    CHECK(root != NULL);
    if (!root)
        return;
    edit(root);
    char *text = json_dumps(root, JSON_INDENT(1));
    json_decref(root);
    write_manifest_text(dst, text);
    free(text);
}

static json_t *at(json_t *root, const char *a, const char *b) { return json_object_get(json_object_get(root, a), b); }
static void e_many_files(json_t *r)
{
    json_t *files = json_object_get(r, "files");
    for (int i = 0; i < 100; i++)
        json_array_append(files, json_array_get(files, 0));
}
static void e_dup_rank(json_t *r)
{
    json_t *f = json_array_get(json_object_get(r, "files"), 1);
    json_object_set_new(f, "rank", json_integer(0));
    json_object_set_new(f, "name", json_string("rank-00000.h5"));
}
static void e_bytes(json_t *r) { json_object_set_new(json_array_get(json_object_get(r, "files"), 0), "bytes", json_integer(-5)); }
static void e_rank(json_t *r)
{
    json_object_set_new(json_array_get(json_object_get(r, "files"), 0), "rank", json_integer((json_int_t)1 << 40));
}
static void e_no_layout(json_t *r) { json_object_del(r, "layout"); }
static void e_file_number(json_t *r) { json_array_set_new(json_object_get(r, "files"), 0, json_integer(0)); }
static void e_no_state(json_t *r) { json_object_del(r, "state"); }
static void e_no_files(json_t *r) { json_object_del(r, "files"); }
static void e_layers(json_t *r) { json_object_set_new(json_object_get(r, "model"), "n_layer", json_integer(1 << 20)); }
static void e_world(json_t *r)
{
    json_object_set_new(json_object_get(r, "layout"), "dp", json_integer(65536));
    json_object_set_new(json_object_get(r, "layout"), "tp", json_integer(65536));
}
/* 65536 ZeRO-1 replicas, and still the 2 files: the owner table would be sized by the layout */
static void e_big_dp(json_t *r)
{
    json_object_set_new(json_object_get(r, "layout"), "dp", json_integer(65536));
    json_object_set_new(json_object_get(r, "layout"), "zero", json_integer(1));
}
static void e_chunk(json_t *r) { json_object_set_new(json_object_get(r, "storage"), "chunk_bytes", json_integer((json_int_t)1 << 40)); }
static void e_id(json_t *r) { json_object_set_new(r, "checkpoint_id", json_string("../../../../etc/passwd0123456789")); }
static void e_seed(json_t *r) { json_object_set_new(json_object_get(r, "state"), "rng_seed", json_string("12abc")); }
static void e_stages(json_t *r) { json_array_set_new(at(r, "layout", "stage_layers"), 0, json_integer(1000)); }
/* a data position a few steps short of INT64_MAX: a trainer adding its batches would overflow */
static void e_position(json_t *r) { json_object_set_new(json_object_get(r, "state"), "data_position", json_integer(INT64_MAX - 5)); }
/* a padded vocabulary of 2^31 rows (inside the accepted range) over a small model's files, the
 * tensor list rewritten to match (it is normative: a reader refuses one that differs from the model) */
static void e_padded_vocab(json_t *r)
{
    json_object_set_new(json_object_get(r, "model"), "padded_vocab", json_integer((json_int_t)1 << 31));
    json_array_set_new(json_object_get(json_array_get(json_object_get(r, "tensors"), 0), "shape"), 0,
                       json_integer((json_int_t)1 << 31));
}
/* ... and files said to be a TiB each */
static void e_padded_vocab_big_files(json_t *r)
{
    e_padded_vocab(r);
    json_t *files = json_object_get(r, "files");
    for (size_t i = 0; i < json_array_size(files); i++)
        json_object_set_new(json_array_get(files, i), "bytes", json_integer((json_int_t)1 << 40));
}

static void test_manifest(void)
{
    char dir[1100], src[1200], dst[1200];
    snprintf(dir, sizeof dir, "%s/man", tmp);
    mkdir(dir, 0755);
    snprintf(src, sizeof src, "%s/good.json", dir);
    snprintf(dst, sizeof dst, "%s/manifest.json", dir);
    mps_config cfg = tiny;
    mps_layout L;
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_layout_parse("dp=2", &cfg, &L, &err) == 0);
    mps_manifest m;
    mps_manifest_init(&m, &cfg, &L);
    mps_file_entry files[2] = { { 0, "rank-00000.h5", 1000 }, { 1, "rank-00001.h5", 1000 } };
    m.files = files;
    m.nfiles = 2;
    snprintf(m.source_format, sizeof m.source_format, "synth");
    CHECK(mps_manifest_write(src, &m, &err) == 0);
    mps_manifest back;
    CHECK_MSG(mps_manifest_read(src, &back, &err) == 0, "%s", err.msg);
    mps_manifest_free(&back);
    static const struct { void (*edit)(json_t *); const char *needle; } cases[] = {
        { e_many_files, "'files'" },         { e_dup_rank, "rank 0 twice" },   { e_bytes, "'bytes'" },
        { e_rank, "'rank'" },                { e_no_layout, "'layout'" },      { e_no_state, "'state'" },
        { e_no_files, "'files'" },           { e_layers, "n_layer" },          { e_world, "world size" },
        { e_chunk, "'chunk_bytes'" },        { e_id, "checkpoint_id" },        { e_seed, "rng_seed" },
        { e_stages, "stage_layers[0]" },   { e_file_number, "files[0] is not an object" },
        { e_position, "'data_position'=9223372036854775802 out of range" },
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        edit_manifest(src, dst, cases[c].edit);
        mps_err_clear(&err);
        int rc = mps_manifest_read(dst, &back, &err);
        if (rc == 0)
            mps_manifest_free(&back);
        char what[64];
        snprintf(what, sizeof what, "manifest case %zu (%s)", c, cases[c].needle);
        expect_err(&err, MPS_ECORRUPT, what, dst, cases[c].needle, NULL);
    }
    /* a manifest that is well-formed but claims more non-empty pieces than it lists files is refused
     * by the reader before anything is sized by its layout */
    edit_manifest(src, dst, e_big_dp);
    mps_err_clear(&err);
    CHECK_MSG(mps_manifest_read(dst, &back, &err) == 0, "%s", err.msg);
    mps_manifest_free(&back);
    mps_ckpt *ck = NULL;
    mps_err_clear(&err);
    if (mps_ckpt_open(dir, &ck, &err) == 0)
        mps_ckpt_close(ck);
    expect_err(&err, MPS_ECORRUPT, "manifest with dp=65536 and 2 files", dst, "non-empty pieces", "'files' lists 2",
               NULL);
    /* the CLI: verify of a checkpoint whose manifest lacks its layout */
    edit_manifest(src, dst, e_no_layout);
    char args[1200];
    snprintf(args, sizeof args, "verify '%s'", dir);
    expect_cli(args, 3, "'layout' missing");
}

/* ---- a forged manifest over real files: a data position that would overflow, a model larger
 * than its files can hold (a whole rank's state is allocated from it by load and train) ---- */

static void test_forged_model(void)
{
    if (!cli)
        return;
    char ck[1100], good[1100], mpath[1200], tok[1100], args[4000];
    snprintf(good, sizeof good, "%s/fm_good", tmp);
    snprintf(ck, sizeof ck, "%s/fm", tmp);
    snprintf(mpath, sizeof mpath, "%s/manifest.json", ck);
    snprintf(tok, sizeof tok, "%s/fm_tok.bin", tmp);
    snprintf(args, sizeof args, "init --config n_layer=1,n_embd=64,n_head=2,vocab=256,n_positions=16 --layout dp=1 -q "
             "-o '%s' && '%s' tokens --count 5000 --vocab 256 -o '%s'", good, cli, tok);
    CHECK(run_cli(args) == 0);
    static const struct { void (*edit)(json_t *); const char *cmd, *needle; } cases[] = {
        { e_position, "train --ckpt '%s' --layout dp=1 --data '%s' --steps 4 --global-batch 2 --micro-batch 2 --seq 8 -q "
                      "--out '%s/fm_run'", "'data_position'" },
        { e_padded_vocab, "load '%s' --layout dp=1", "more than its 1 files" },
        { e_padded_vocab_big_files, "load '%s' --layout dp=1", "more than its 1 files" },
        { e_padded_vocab, "train --ckpt '%s' --layout dp=1 --data '%s' --steps 1 --global-batch 2 --micro-batch 2 --seq 8 -q "
                          "--out '%s/fm_run'", "more than its 1 files" },
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        snprintf(args, sizeof args, "rm -rf '%s' && cp -r '%s' '%s'", ck, good, ck);
        CHECK(system(args) == 0);
        char src[1300];
        snprintf(src, sizeof src, "%s/manifest.json", good);
        edit_manifest(src, mpath, cases[c].edit);
        if (c > 0) { /* the library refuses it at open, before anything is sized by the model */
            mps_ckpt *c0 = NULL;
            mps_err err;
            mps_err_clear(&err);
            if (mps_ckpt_open(ck, &c0, &err) == 0)
                mps_ckpt_close(c0);
            expect_err(&err, MPS_ECORRUPT, cases[c].needle, mpath, "padded_vocab=2147483648", cases[c].needle, NULL);
        }
        char cmd[4000];
        snprintf(cmd, sizeof cmd, cases[c].cmd, ck, tok, tmp);
        expect_cli(cmd, 3, cases[c].needle);
    }
}

/* ---- layout and config strings ---- */

static void test_strings(void)
{
    static const struct { const char *text, *needle; } layouts[] = {
        { "dp=99999999999", "dp=99999999999 must be between 1 and 65536" },
        { "dp=2,dp=3", "key 'dp' given twice" },
        { "tp=0", "tp=0 must be between 1 and 65536" },
        { "zero=-1", "zero=-1 must be 0, 1, 2 or 3" },
        { "dp=65536,tp=1,pp=1,zero=0,stages=1", "stages" },
        { "dp=65536,tp=512", "world size" },
        { "pp=2,stages=1:1:1", "lists 3 stages but pp=2" },
        { "stages=1:0", "'0' is not a layer count" },
        { "dp=2x", "is not an integer" },
        { "=", "unknown key ''" },
    };
    mps_config gpt2;
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_config_preset("gpt2", &gpt2, &err) == 0);
    for (size_t i = 0; i < sizeof layouts / sizeof layouts[0]; i++) {
        mps_layout L;
        mps_err_clear(&err);
        CHECK_MSG(mps_layout_parse(layouts[i].text, &gpt2, &L, &err) != 0, "layout %s accepted", layouts[i].text);
        expect_err(&err, MPS_EUSAGE, layouts[i].text, "--layout", layouts[i].needle, NULL);
    }
    char huge[6000];
    memset(huge, 'x', sizeof huge - 1);
    huge[sizeof huge - 1] = '\0';
    mps_layout L;
    mps_err_clear(&err);
    CHECK(mps_layout_parse(huge, &gpt2, &L, &err) != 0);
    expect_err(&err, MPS_EUSAGE, "6000-byte layout", "--layout", "too long", NULL);

    static const struct { const char *text, *needle; } configs[] = {
        { "n_layer=1,n_layer=2,n_embd=4,n_head=1,vocab=8,n_positions=4", "key 'n_layer' given twice" },
        { "n_layer=2147483648,n_embd=4,n_head=1,vocab=8,n_positions=4", "n_layer='2147483648'" },
        { "n_layer=1,n_embd=4,n_head=1,vocab=8", "missing n_positions" },
        { "n_layer=1,n_embd=4,n_head=3,vocab=8,n_positions=4", "n_head=3" },
        { "n_layer=1,n_embd=4,n_head=1,vocab=8,n_positions=4,padded_vocab=4", "padded_vocab=4" },
        { "n_layer=1,n_embd=4,n_head=1,vocab=99999999999999999999,n_positions=4", "vocab=" },
    };
    for (size_t i = 0; i < sizeof configs / sizeof configs[0]; i++) {
        mps_config c;
        mps_err_clear(&err);
        CHECK_MSG(mps_config_parse(configs[i].text, &c, &err) != 0, "config %s accepted", configs[i].text);
        expect_err(&err, MPS_EUSAGE, configs[i].text, "--config", configs[i].needle, NULL);
    }
    /* the CLI: exit 2 and the option named */
    expect_cli("inspect --model gpt2 --layout dp=99999999999", 2, "dp=99999999999");
    expect_cli("inspect --model gpt2 --layout dp=2,dp=3", 2, "given twice");
    expect_cli("inspect --model gpt2 --layout tp=0", 2, "tp=0");
    char args[1200];
    snprintf(args, sizeof args, "synth --config n_layer=1,n_layer=2,n_embd=4,n_head=1,vocab=8,n_positions=4 "
             "--format llmc -o '%s/never'", tmp);
    expect_cli(args, 2, "given twice");
}

/* ---- zstd frames and stored chunk shapes ---- */

static void test_chunks(void)
{
    /* a frame that claims 2^40 decoded bytes: one RLE block, 18 bytes in all */
    unsigned char frame[18] = { 0x28, 0xb5, 0x2f, 0xfd, 0xe0 };
    uint64_t claim = (uint64_t)1 << 40;
    memcpy(frame + 5, &claim, 8);
    uint32_t block = 1u | (1u << 1) | (131072u << 3); /* last, RLE, 128 KiB */
    memcpy(frame + 13, &block, 3);
    frame[16] = 0x42;
    ZSTD_DCtx *dctx = ZSTD_createDCtx();
    float raw[256], scratch[256];
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_chunk_decode(dctx, 0, frame, 17, 4, scratch, raw, sizeof raw, &err) != 0);
    expect_err(&err, MPS_ECORRUPT, "frame claiming 2^40", "declares 1099511627776 bytes, expected 1024", NULL);
    ZSTD_freeDCtx(dctx);
    /* the HDF5 filter (h5dump, h5py) refuses it before allocating: 17 bytes cannot decode to 2^40 */
    size_t buf_size = sizeof frame;
    void *buf = H5allocate_memory(buf_size, 0);
    memcpy(buf, frame, 17);
    CHECK(mps_zstd_filter_class.filter(H5Z_FLAG_REVERSE, 0, NULL, 17, &buf_size, &buf) == 0);
    H5free_memory(buf);
    /* a claim of 128 KiB from the same 17 bytes is possible: it decodes */
    claim = 131072;
    memcpy(frame + 5, &claim, 8);
    buf_size = sizeof frame;
    buf = H5allocate_memory(buf_size, 0);
    memcpy(buf, frame, 17);
    CHECK(mps_zstd_filter_class.filter(H5Z_FLAG_REVERSE, 0, NULL, 17, &buf_size, &buf) == 131072);
    CHECK(((unsigned char *)buf)[131071] == 0x42);
    H5free_memory(buf);

    /* stored chunk shapes whose products overflow */
    mps_chunk_grid g;
    int64_t dims[3] = { 3, 1024, 1024 }, chunk[3] = { 1, (int64_t)1 << 62, 1024 };
    mps_err_clear(&err);
    CHECK(mps_chunk_grid_load(&g, 3, dims, chunk, &err) != 0);
    expect_err(&err, MPS_ECORRUPT, "chunk extent 2^62", "chunk limit", NULL);
    int64_t d0[2] = { 0, 1 << 20 }, c0[2] = { (int64_t)1 << 50, 1 << 20 };
    mps_err_clear(&err);
    CHECK(mps_chunk_grid_load(&g, 2, d0, c0, &err) != 0);
    expect_err(&err, MPS_ECORRUPT, "chunk extent 2^50 on an empty dimension", "chunk limit", NULL);
}

/* ---- FIFOs where files are expected: refused at once, never a blocked open() ---- */

static void test_fifos(void)
{
    char dir[1100], path[1200];
    snprintf(dir, sizeof dir, "%s/fifo", tmp);
    mkdir(dir, 0755);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    CHECK(mkfifo(path, 0644) == 0);
    mps_model_file *f = NULL;
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_model_file_open(path, NULL, &f, &err) != 0);
    expect_err(&err, MPS_EUSAGE, "FIFO model", path, "not a regular file", NULL);
    snprintf(path, sizeof path, "%s/manifest.json", dir);
    CHECK(mkfifo(path, 0644) == 0);
    mps_manifest m;
    mps_err_clear(&err);
    CHECK(mps_manifest_read(path, &m, &err) != 0);
    expect_err(&err, MPS_ECORRUPT, "FIFO manifest", path, "not a regular file", NULL);
    /* a config.json FIFO beside a real model */
    snprintf(dir, sizeof dir, "%s/fifo2", tmp);
    mps_err_clear(&err);
    CHECK(mps_synth_write(dir, &tiny, MPS_FILE_SAFETENSORS, MPS_DTYPE_F32, 1, &err) == 0);
    snprintf(path, sizeof path, "%s/config.json", dir);
    CHECK(unlink(path) == 0 && mkfifo(path, 0644) == 0);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    mps_err_clear(&err);
    CHECK(mps_model_file_open(path, NULL, &f, &err) != 0);
    expect_err(&err, MPS_EUSAGE, "FIFO config.json", "config.json", "not a regular file", NULL);
    /* a run directory whose latest is a FIFO: its readers (and the trainer's --keep-last) refuse it */
    snprintf(dir, sizeof dir, "%s/fiforun", tmp);
    mkdir(dir, 0755);
    snprintf(path, sizeof path, "%s/latest", dir);
    CHECK(mkfifo(path, 0644) == 0);
    char out[1200];
    mps_err_clear(&err);
    CHECK(mps_ckpt_resolve(dir, out, sizeof out, &err) < 0);
    expect_err(&err, MPS_ECORRUPT, "FIFO latest", path, "not a regular file", NULL);
    int removed = -1;
    mps_err_clear(&err);
    CHECK(mps_run_prune(dir, 1, &removed, &err) == 0 && removed == 0);

    /* an HDF5 file (a shard) that is a FIFO: refused by name. One opened by descriptor goes to
     * HDF5 as that descriptor's file: read while the name stays, and a FIFO renamed over the name
     * after the reader opened it is reported as a replacement, never opened (a blocked open) */
    snprintf(path, sizeof path, "%s/rank-00000.h5", dir);
    CHECK(mkfifo(path, 0644) == 0);
    mps_err_clear(&err);
    CHECK(mps_h5_open_file(path, &err) < 0);
    expect_err(&err, MPS_ECORRUPT, "FIFO shard", path, "not a regular file", NULL);
    CHECK(unlink(path) == 0);
    mps_err_clear(&err);
    hid_t h = mps_h5_create_file(path, H5P_DEFAULT, &err);
    CHECK(h >= 0 && mps_h5_attr_str(h, "format", "mpshard") == 0);
    if (h >= 0)
        H5Fclose(h);
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    CHECK(fd >= 0);
    mps_err_clear(&err);
    h = fd >= 0 ? mps_h5_open_fd(fd, path, &err) : -1;
    char text[16] = "";
    CHECK_MSG(h >= 0 && mps_h5_read_attr_str(h, "format", text, sizeof text) == 0 && strcmp(text, "mpshard") == 0,
              "open by descriptor: %s", err.msg);
    if (h >= 0)
        H5Fclose(h);
    snprintf(out, sizeof out, "%s/fifo.h5", dir);
    CHECK(mkfifo(out, 0644) == 0 && rename(out, path) == 0);
    mps_err_clear(&err);
    CHECK(fd >= 0 && mps_h5_open_fd(fd, path, &err) < 0);
    expect_err(&err, MPS_ECORRUPT, "FIFO renamed over an open shard", path, "replaced while being opened", NULL);
    if (fd >= 0)
        close(fd);
}

/* ---- HDF5 attributes the reader checks ---- */

static void test_h5_attrs(void)
{
    if (!cli)
        return;
    char dir[1100], model[1200], ck[1200], args[3000], file[1300], mpath[1300];
    snprintf(dir, sizeof dir, "%s/h5", tmp);
    snprintf(model, sizeof model, "%s/model.safetensors", dir);
    snprintf(ck, sizeof ck, "%s/ck", tmp);
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_synth_write(dir, &tiny, MPS_FILE_SAFETENSORS, MPS_DTYPE_F32, 1, &err) == 0);
    snprintf(args, sizeof args, "shard '%s' --layout dp=1 -o '%s' -q", model, ck);
    CHECK(run_cli(args) == 0);
    snprintf(file, sizeof file, "%s/rank-00000.h5", ck);
    snprintf(mpath, sizeof mpath, "%s/manifest.json", ck);
    /* "rank" becomes a string, then "format_version" an array of 2^20 elements */
    static const char *const names[] = { "rank", "format_version" };
    for (int c = 0; c < 2; c++) {
        hid_t f = H5Fopen(file, H5F_ACC_RDWR, H5P_DEFAULT);
        CHECK(f >= 0);
        H5Adelete(f, names[c]);
        if (c == 0) {
            CHECK(mps_h5_attr_str(f, "rank", "0") == 0);
        } else {
            int64_t *big = calloc((size_t)1 << 20, sizeof *big);
            big[0] = 1;
            CHECK(mps_h5_attr_i64(f, "format_version", big, 1 << 20) == 0);
            free(big);
        }
        H5Fclose(f);
        /* the file size changed: record it so that the attribute itself is what is refused */
        mps_manifest m;
        mps_err_clear(&err);
        CHECK(mps_manifest_read(mpath, &m, &err) == 0);
        struct stat st;
        CHECK(stat(file, &st) == 0);
        m.files[0].bytes = (int64_t)st.st_size;
        CHECK(mps_manifest_write(mpath, &m, &err) == 0);
        mps_manifest_free(&m);
        snprintf(args, sizeof args, "verify -q '%s'", ck);
        expect_cli(args, 3, "rank-00000.h5");
    }
}

int main(void)
{
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    alarm(120); /* a blocked open() or a runaway allocation loop fails the test instead of hanging it */
    tmp = test_tmpdir("test_hostile");
    CHECK(tmp != NULL);
    if (tmp == NULL)
        TEST_DONE();
    cli = getenv("MPSHARD");
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_h5_init(&err) == 0);
    test_safetensors();
    test_llmc();
    test_manifest();
    test_forged_model();
    test_strings();
    test_chunks();
    test_fifos();
    test_h5_attrs();
    if (test_failures == 0) {
        char cmd[1200];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
        if (system(cmd) != 0)
            fprintf(stderr, "could not remove %s\n", tmp);
    }
    TEST_DONE();
}
