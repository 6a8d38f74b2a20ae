#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "model.h"

static const char *const help =
    "usage: mpshard models [--config]\n"
    "\n"
    "Lists the named models that --model takes (shard, synth, init, inspect, train) with their\n"
    "shapes: the published configs of each family, and the shapes the benchmarks train.\n"
    "\n"
    "  --config   print each model as the --config string that describes it\n";

int cmd_models(int argc, char **argv)
{
    int as_config = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            fputs(help, stdout);
            return 0;
        }
        if (strcmp(argv[i], "--config") != 0)
            return cli_usage("models", "unexpected argument '%s'", argv[i]);
        as_config = 1;
    }
    if (!as_config)
        printf("%-17s %-8s %6s %6s %5s %4s %7s %7s %7s %s\n", "model", "family", "layers", "embd", "heads", "kv",
               "ffn", "vocab", "ctx", "params");
    for (int i = 0; mps_preset_name(i); i++) {
        mps_config c;
        mps_err err;
        mps_err_clear(&err);
        if (mps_config_preset(mps_preset_name(i), &c, &err) != 0)
            return cli_fail("models", &err);
        if (as_config) {
            char buf[512];
            mps_config_format(&c, buf, sizeof buf);
            printf("%s %s\n", mps_preset_name(i), buf);
            continue;
        }
        /* parameters without the vocabulary padding: what the model's card states */
        double params = (double)mps_param_count(&c) - (double)(c.padded_vocab - c.vocab) * c.n_embd * (c.untied ? 2 : 1);
        char notes[64];
        mps_config_notes(&c, notes, sizeof notes);
        printf("%-17s %-8s %6d %6d %5d %4d %7lld %7lld %7d %.2fB%s%s%s\n", mps_preset_name(i), mps_family_name(c.family),
               c.n_layer, c.n_embd, c.n_head, mps_cfg_kv_heads(&c), (long long)mps_cfg_ffn(&c), (long long)c.vocab,
               c.n_positions, params / 1e9, notes[0] ? "  (" : "", notes, notes[0] ? ")" : "");
    }
    return 0;
}
