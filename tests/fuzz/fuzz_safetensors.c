/* Fuzz target: the Hugging Face safetensors reader (header length, header JSON, dtypes, shapes,
 * data_offsets, overlaps) and the config.json beside it, then every tensor read back.
 *
 * Input: a 2-byte little-endian length n, n bytes of config.json, then the model.safetensors
 * bytes (both fuzzed: the header is only meaningful against a config). */
#include "fuzz_common.h"
#include "modelfile.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static fuzz_file model, config;
    fuzz_file_init(&model, "model.safetensors");
    fuzz_file_init(&config, "config.json");
    if (size < 2)
        return 0;
    size_t n = (size_t)data[0] | (size_t)data[1] << 8;
    if (n > size - 2)
        n = size - 2;
    fuzz_file_set(&config, data + 2, n);
    fuzz_file_set(&model, data + 2 + n, size - 2 - n);

    mps_model_file_opts opts = { .format = MPS_FILE_SAFETENSORS, .config_path = config.path };
    mps_model_file *f = NULL;
    mps_err err;
    mps_err_clear(&err);
    if (mps_model_file_open(model.path, &opts, &f, &err) != 0) {
        fuzz_check_err(&err, "open");
        FUZZ_ASSERT(strstr(err.msg, model.path) || strstr(err.msg, config.path), "message names no file: %s", err.msg);
        return 0;
    }
    /* An accepted file: every tensor must read (or fail cleanly) into a buffer sized by the
     * config, which the reader has checked against the file's own size. */
    const mps_config *cfg = mps_model_file_config(f);
    FUZZ_ASSERT(mps_config_validate(cfg, &err) == 0, "accepted config is invalid: %s", err.msg);
    for (int t = 0; t < mps_tensor_count(cfg); t++) {
        mps_tensor_spec spec;
        mps_tensor_spec_get(cfg, t, &spec);
        int64_t numel = mps_tensor_numel(&spec);
        float *dst = malloc((size_t)numel * sizeof *dst);
        FUZZ_ASSERT(dst != NULL, "tensor %s: %lld elements", spec.name, (long long)numel);
        mps_err_clear(&err);
        if (mps_model_file_read_tensor(f, t, dst, &err) != 0)
            fuzz_check_err_names(&err, "read", model.path);
        free(dst);
    }
    mps_model_file_close(f);
    return 0;
}
