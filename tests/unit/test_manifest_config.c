/* The original config.json in the manifest: written as its exact text (source.hf_config_text) and
 * read back byte for byte; a manifest of the earlier form, with only the parsed object
 * (source.hf_config), is still read (the object re-serialised). */
#include <inttypes.h>

#include "ckpt.h"
#include "testutil.h"

static const char config_text[] =
    "{\"model_type\": \"gpt2\",   \"n_layer\": 2, \"attn_pdrop\": 0.1,\n"
    "  \"layer_norm_epsilon\": 1e-05, \"note\": \"caf\xc3\xa9 \\\"q\\\"\\n\"}\n";

static char *slurp(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)len + 1);
    *n = b && fread(b, 1, (size_t)len, f) == (size_t)len ? (size_t)len : 0;
    if (b)
        b[*n] = '\0';
    fclose(f);
    return b;
}

/* Rewrites the manifest at path with its hf_config_text member removed and the checksum redone
 * (FORMAT.md section 5): a manifest as mpshard wrote it before that member existed. */
static int drop_text_member(const char *path)
{
    size_t n;
    char *t = slurp(path, &n);
    char *m = t ? strstr(t, ",\n  \"hf_config_text\": \"") : NULL;
    if (!m)
        return free(t), -1;
    char *end = strchr(m + 24, '\n'); /* the string value holds no raw newline: JSON escapes them */
    memmove(m, end, strlen(end) + 1);
    char *slot = strstr(t, "\"manifest_xxh3\": \"") + strlen("\"manifest_xxh3\": \"");
    memset(slot, '0', 16);
    size_t len = strlen(t);
    char hex[17];
    snprintf(hex, sizeof hex, "%016" PRIx64, mps_xxh3(t, len - (t[len - 1] == '\n')));
    memcpy(slot, hex, 16);
    FILE *f = fopen(path, "wb");
    int rc = f && fwrite(t, 1, len, f) == len ? 0 : -1;
    if (f)
        fclose(f);
    free(t);
    return rc;
}

int main(void)
{
    const char *dir = test_tmpdir("manifest_config");
    char path[1200];
    snprintf(path, sizeof path, "%s/manifest.json", dir);
    mps_config cfg = { .n_layer = 2, .n_embd = 48, .n_head = 4, .n_positions = 32, .vocab = 250, .padded_vocab = 256 };
    mps_layout L;
    mps_err err = { 0 };
    CHECK(mps_layout_parse("dp=2", &cfg, &L, &err) == 0);
    mps_manifest m, r;
    mps_manifest_init(&m, &cfg, &L);
    snprintf(m.source_format, sizeof m.source_format, "safetensors");
    m.hf_config_json = strdup(config_text);
    CHECK_MSG(mps_manifest_write(path, &m, &err) == 0, "%s", err.msg);
    CHECK_MSG(mps_manifest_read(path, &r, &err) == 0, "%s", err.msg);
    CHECK_MSG(r.hf_config_json && strcmp(r.hf_config_json, config_text) == 0, "config text read back: %s",
              r.hf_config_json ? r.hf_config_json : "(none)");
    mps_manifest_free(&r);
    /* the parsed object is there too, for readers that want its fields */
    size_t n;
    char *text = slurp(path, &n);
    CHECK(text && strstr(text, "\"hf_config\": {") && strstr(text, "\"attn_pdrop\": 0.10000000000000001"));
    free(text);

    /* the earlier form: the object only */
    CHECK(drop_text_member(path) == 0);
    text = slurp(path, &n);
    CHECK(text && !strstr(text, "hf_config_text"));
    free(text);
    CHECK_MSG(mps_manifest_read(path, &r, &err) == 0, "old form: %s", err.msg);
    CHECK_MSG(r.hf_config_json && strstr(r.hf_config_json, "\"n_layer\": 2") && strstr(r.hf_config_json, "\"attn_pdrop\""),
              "old form read back: %s", r.hf_config_json ? r.hf_config_json : "(none)");
    mps_manifest_free(&r);
    mps_manifest_free(&m);
    TEST_DONE();
}
