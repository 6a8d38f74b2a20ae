/* Fuzz target: model config strings (mps_config_parse, the --config option) and preset names.
 * An accepted config must validate, print to a string that parses back to it, and give a tensor
 * catalogue whose sizes do not overflow. Input: the string. */
#include "fuzz_common.h"
#include "model.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_config(const mps_config *c, const char *text)
{
    mps_err err;
    mps_err_clear(&err);
    FUZZ_ASSERT(mps_config_validate(c, &err) == 0, "%s: %s", text, err.msg);
    char buf[512];
    mps_config_format(c, buf, sizeof buf);
    mps_config c2;
    FUZZ_ASSERT(mps_config_parse(buf, &c2, &err) == 0, "%s -> %s: %s", text, buf, err.msg);
    FUZZ_ASSERT(memcmp(c, &c2, sizeof c2) == 0, "%s -> %s: differs", text, buf);
    /* sizes: UBSan reports a signed overflow in any of these */
    if (c->n_layer <= 1000) { /* (it walks every tensor: slow for 100000 layers) */
        int64_t total = mps_param_count(c);
        FUZZ_ASSERT(total > 0, "%s: parameter count %lld", text, (long long)total);
    }
    int n = mps_tensor_count(c);
    int ids[5] = { 0, 1, n / 2, n - 2, n - 1 };
    for (int i = 0; i < 5; i++) {
        mps_tensor_spec s;
        mps_tensor_spec_get(c, ids[i], &s);
        FUZZ_ASSERT(mps_tensor_numel(&s) > 0 && mps_tensor_find(c, s.name) == ids[i], "%s: tensor %s", text, s.name);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = malloc(size + 1);
    if (!text)
        return 0;
    memcpy(text, data, size);
    text[size] = '\0';
    mps_config c;
    mps_err err;
    mps_err_clear(&err);
    if (mps_config_parse(text, &c, &err) == 0) {
        check_config(&c, text);
    } else {
        fuzz_check_err(&err, "parse");
        FUZZ_ASSERT(err.code == MPS_EUSAGE, "code %d: %s", err.code, err.msg);
    }
    mps_err_clear(&err);
    if (mps_config_preset(text, &c, &err) == 0)
        check_config(&c, text);
    else
        fuzz_check_err(&err, "preset");
    free(text);
    return 0;
}
