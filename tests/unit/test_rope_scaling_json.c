/* The Llama 3 RoPE scaling object as config.json (key "rope_type", 6 significant digits, indent 2)
 * and the manifest (key "type", every digit, indent 1) write it, byte for byte, and as both read it
 * back; without scaling, both write null. */
#include "ckpt.h"
#include "modelfile_internal.h"
#include "testutil.h"

/* Reads the whole file at path into buf, NUL-terminated; 0 when it is missing or does not fit. */
static int read_text(const char *path, char *buf, size_t size)
{
    FILE *f = fopen(path, "rb");
    size_t n = f ? fread(buf, 1, size - 1, f) : 0;
    int whole = f && feof(f);
    if (f)
        fclose(f);
    buf[n] = '\0';
    return n > 0 && whole;
}

/* low_freq_factor 0.1 has no short binary form: the two writers' precisions show in its digits */
static const char llama3_model[] = "arch=llama,n_layer=2,n_embd=32,n_head=4,n_kv_head=2,ffn=48,vocab=100,"
                                   "n_positions=16,tied=0,rope_theta=500000,rope_llama3=32:0.1:4.5:8192";

static const char hf_expected[] = "  \"rope_theta\": 500000.0,\n"
                                  "  \"rope_scaling\": {\n"
                                  "    \"rope_type\": \"llama3\",\n"
                                  "    \"factor\": 32.0,\n"
                                  "    \"low_freq_factor\": 0.1,\n"
                                  "    \"high_freq_factor\": 4.5,\n"
                                  "    \"original_max_position_embeddings\": 8192\n"
                                  "  },\n";

static const char manifest_expected[] = "  \"rope_theta\": 500000.0,\n"
                                        "  \"rope_scaling\": {\n"
                                        "   \"type\": \"llama3\",\n"
                                        "   \"factor\": 32.0,\n"
                                        "   \"low_freq_factor\": 0.10000000000000001,\n"
                                        "   \"high_freq_factor\": 4.5,\n"
                                        "   \"original_max_position_embeddings\": 8192\n"
                                        "  }\n";

static int same_rope(const mps_config *a, const mps_config *b)
{
    return a->rope.type == b->rope.type && a->rope.factor == b->rope.factor &&
           a->rope.low_freq_factor == b->rope.low_freq_factor && a->rope.high_freq_factor == b->rope.high_freq_factor &&
           a->rope.original_max_positions == b->rope.original_max_positions && a->rope_theta == b->rope_theta;
}

/* config.json: the text generated, and the config parsed back from it */
static void check_hf(const mps_config *cfg, const char *expected)
{
    char *text = mps_hf_config_generate(cfg, MPS_DTYPE_BF16);
    CHECK(text != NULL);
    if (!text)
        return;
    CHECK_MSG(strstr(text, expected) != NULL, "config.json lacks\n%s\nin\n%s", expected, text);
    json_error_t jerr;
    json_t *root = json_loads(text, 0, &jerr);
    CHECK(root != NULL);
    mps_config back = { 0 };
    mps_err err;
    mps_err_clear(&err);
    CHECK_MSG(root && mps_hf_config_parse(root, "config.json", &back, &err) == 0, "%s", err.msg);
    CHECK(same_rope(&back, cfg));
    json_decref(root);
    free(text);
}

/* manifest.json: the text written, and the manifest read back from it */
static void check_manifest(const mps_config *cfg, const char *dir, const char *expected)
{
    char path[1200];
    snprintf(path, sizeof path, "%s/manifest.json", dir);
    remove(path);
    mps_layout L;
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_layout_parse("dp=1", cfg, &L, &err) == 0);
    mps_manifest m, r;
    mps_manifest_init(&m, cfg, &L);
    CHECK_MSG(mps_manifest_write(path, &m, &err) == 0, "%s", err.msg);
    static char text[1 << 16]; /* this manifest is a few KiB */
    CHECK(read_text(path, text, sizeof text));
    CHECK_MSG(strstr(text, expected) != NULL, "manifest lacks\n%s\nin\n%s", expected, text);
    CHECK_MSG(mps_manifest_read(path, &r, &err) == 0, "%s", err.msg);
    CHECK(same_rope(&r.cfg, cfg));
    mps_manifest_free(&r);
    mps_manifest_free(&m);
}

int main(void)
{
    const char *dir = test_tmpdir("rope_scaling_json");
    CHECK(dir != NULL);
    mps_config cfg;
    mps_err err;
    mps_err_clear(&err);
    CHECK_MSG(mps_config_parse(llama3_model, &cfg, &err) == 0, "%s", err.msg);
    CHECK(cfg.rope.type == MPS_ROPE_LLAMA3);
    check_hf(&cfg, hf_expected);
    check_manifest(&cfg, dir, manifest_expected);

    cfg.rope.type = MPS_ROPE_DEFAULT; /* no scaling: null in both */
    cfg.rope.factor = cfg.rope.low_freq_factor = cfg.rope.high_freq_factor = 0;
    cfg.rope.original_max_positions = 0;
    check_hf(&cfg, "  \"rope_theta\": 500000.0,\n  \"rope_scaling\": null,\n");
    check_manifest(&cfg, dir, "  \"rope_theta\": 500000.0,\n  \"rope_scaling\": null\n");
    TEST_DONE();
}
