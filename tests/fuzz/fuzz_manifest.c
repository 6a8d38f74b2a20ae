/* Fuzz target: manifest.json (mps_manifest_read): every field, the layout, kinds, files.
 * Input: the manifest text. The harness writes the right manifest_xxh3 into the input before
 * reading it (a fuzzer cannot forge a checksum, and every field is behind it). A manifest that
 * reads must write back and read again to the same values. */
#include <inttypes.h>

#include "ckpt.h"
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define KEY "\"manifest_xxh3\": \""

/* Fixes the checksum in place as mps_manifest_read computes it: over the whole text (less one
 * trailing newline) with its own 16 digits written as zeros. */
static void fix_checksum(char *text, size_t len)
{
    char *slot = strstr(text, KEY);
    if (!slot || strstr(slot + 1, KEY) || len < (size_t)(slot - text) + strlen(KEY) + 16)
        return;
    char *digits = slot + strlen(KEY);
    memset(digits, '0', 16);
    size_t n = len > 0 && text[len - 1] == '\n' ? len - 1 : len;
    char hex[17];
    snprintf(hex, sizeof hex, "%016" PRIx64, mps_xxh3(text, n));
    memcpy(digits, hex, 16);
}

static int same_manifest(const mps_manifest *a, const mps_manifest *b)
{
    if (a->format_version != b->format_version || strcmp(a->checkpoint_id, b->checkpoint_id) != 0 ||
        memcmp(&a->cfg, &b->cfg, sizeof a->cfg) != 0 || a->layout.dp != b->layout.dp || a->layout.pp != b->layout.pp ||
        a->layout.tp != b->layout.tp || a->layout.zero != b->layout.zero || a->kinds != b->kinds ||
        a->chunk_bytes != b->chunk_bytes || a->zstd_level != b->zstd_level || a->step != b->step ||
        a->rng_seed != b->rng_seed || a->data_position != b->data_position || a->nfiles != b->nfiles ||
        strcmp(a->created_by, b->created_by) != 0 || strcmp(a->source_format, b->source_format) != 0)
        return 0;
    for (int s = 0; s <= a->layout.pp; s++)
        if (a->layout.stage_first[s] != b->layout.stage_first[s])
            return 0;
    for (int k = 0; k < MPS_KIND_COUNT; k++)
        if ((a->kinds & (1u << k)) && a->dtype[k] != b->dtype[k])
            return 0;
    for (int i = 0; i < a->nfiles; i++)
        if (a->files[i].rank != b->files[i].rank || a->files[i].bytes != b->files[i].bytes)
            return 0;
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static fuzz_file in, out;
    fuzz_file_init(&in, "manifest.json");
    fuzz_file_init(&out, "manifest2.json");
    char *text = malloc(size + 1);
    if (!text)
        return 0;
    memcpy(text, data, size);
    text[size] = '\0';
    fix_checksum(text, size);
    fuzz_file_set(&in, text, size);
    free(text);

    mps_manifest m, m2;
    mps_err err;
    mps_err_clear(&err);
    if (mps_manifest_read(in.path, &m, &err) != 0) {
        fuzz_check_err_names(&err, "read", in.path);
        return 0;
    }
    /* what was accepted is consistent */
    FUZZ_ASSERT(mps_config_validate(&m.cfg, &err) == 0, "config: %s", err.msg);
    mps_layout L = m.layout;
    FUZZ_ASSERT(mps_layout_validate(&L, &m.cfg, &err) == 0, "layout: %s", err.msg);
    FUZZ_ASSERT(m.nfiles >= 0 && m.nfiles <= mps_layout_world(&m.layout), "nfiles %d", m.nfiles);
    for (int i = 0; i < m.nfiles; i++)
        FUZZ_ASSERT(m.files[i].rank >= 0 && m.files[i].rank < mps_layout_world(&m.layout) && m.files[i].bytes >= 0,
                    "files[%d]", i);
    FUZZ_ASSERT(m.chunk_bytes >= 4 && m.chunk_bytes <= MPS_MAX_CHUNK_BYTES, "chunk_bytes %lld", (long long)m.chunk_bytes);
    /* and survives a write and a read */
    mps_err_clear(&err);
    FUZZ_ASSERT(mps_manifest_write(out.path, &m, &err) == 0, "write: %s", err.msg);
    FUZZ_ASSERT(mps_manifest_read(out.path, &m2, &err) == 0, "read back: %s", err.msg);
    FUZZ_ASSERT(same_manifest(&m, &m2), "the manifest changed through a write and a read");
    mps_manifest_free(&m);
    mps_manifest_free(&m2);
    return 0;
}
