/* Fuzz target: the llm.c model file reader (1024-byte header, sizes implied by it), through
 * mps_model_file_open with format detection, then every tensor read back. Input: the file. */
#include "fuzz_common.h"
#include "modelfile.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static fuzz_file model;
    fuzz_file_init(&model, "model.bin");
    fuzz_file_set(&model, data, size);
    /* the last byte picks the --padded-vocab option half of the time (it must match the file's Vp) */
    mps_model_file_opts opts = { .format = size && (data[size - 1] & 1) ? MPS_FILE_LLMC : MPS_FILE_AUTO };
    if (size && (data[size - 1] & 2))
        opts.padded_vocab = 128;
    mps_model_file *f = NULL;
    mps_err err;
    mps_err_clear(&err);
    if (mps_model_file_open(model.path, &opts, &f, &err) != 0) {
        fuzz_check_err(&err, "open");
        FUZZ_ASSERT(strstr(err.msg, model.path) || (opts.padded_vocab && strstr(err.msg, "--padded-vocab")),
                    "message names no file: %s", err.msg);
        return 0;
    }
    const mps_config *cfg = mps_model_file_config(f);
    FUZZ_ASSERT(mps_config_validate(cfg, &err) == 0, "accepted config is invalid: %s", err.msg);
    FUZZ_ASSERT(mps_model_file_format(f) == MPS_FILE_LLMC || mps_model_file_format(f) == MPS_FILE_SAFETENSORS, "format");
    for (int t = 0; t < mps_tensor_count(cfg); t++) {
        mps_tensor_spec spec;
        mps_tensor_spec_get(cfg, t, &spec);
        int64_t numel = mps_tensor_numel(&spec);
        /* the reader checked that the file holds every tensor: numel is bounded by its size */
        FUZZ_ASSERT(numel <= (int64_t)size, "tensor %s: %lld elements in a %zu-byte file", spec.name,
                    (long long)numel, size);
        float *dst = malloc((size_t)numel * sizeof *dst);
        FUZZ_ASSERT(dst != NULL, "tensor %s", spec.name);
        mps_err_clear(&err);
        if (mps_model_file_read_tensor(f, t, dst, &err) != 0)
            fuzz_check_err_names(&err, "read", model.path);
        free(dst);
    }
    mps_model_file_close(f);
    return 0;
}
