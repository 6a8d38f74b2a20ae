#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "units.h"
#include "modelfile.h"
#include "output.h"
#include "progress.h"

static const char *const help =
    "usage: mpshard synth (--model NAME | --config K=V,..) --format safetensors|llmc -o DIR [options]\n"
    "\n"
    "Writes a model file with deterministic synthetic weights (a pure function of the seed), for\n"
    "demos, tests and benchmarks: DIR/model.safetensors + config.json, or DIR/model_00000000.bin.\n"
    "\n"
    "  --model NAME     a named model (GPT-2, Llama, Mistral, Qwen2 shapes): `mpshard models` lists them\n"
    "  --config K=V,..  n_layer=..,n_embd=..,n_head=..,vocab=..,n_positions=..[,padded_vocab=..]; Llama family:\n"
    "                   arch=llama[,family=llama|mistral|qwen2],n_kv_head=..,ffn=..,tied=0|1,qkv_bias=0|1,\n"
    "                   norm_eps=..,rope_theta=..[,rope_llama3=factor:low:high:original_positions\n"
    "                   | rope_linear=F | rope_dynamic=F]\n"
    "                   [,head_dim=N (when not n_embd / n_head)][,sliding_window=N (family=mistral)]\n"
    "  --format F       safetensors or llmc (required)\n"
    "  --dtype D        f32 (default), bf16 or f16\n"
    "  --max-shard-size S  safetensors: several files and an index above this size (e.g. 500MB)\n"
    "  --seed S         default 1\n"
    "  --force          replace an existing model file (and config.json) in DIR\n"
    "  -q, --quiet      no progress on stderr\n";

int cmd_synth(int argc, char **argv)
{
    static const struct option opts[] = {
        { "model", required_argument, 0, 'M' }, { "config", required_argument, 0, 'c' },
        { "format", required_argument, 0, 'f' }, { "dtype", required_argument, 0, 'd' },
        { "seed", required_argument, 0, 's' }, { "out", required_argument, 0, 'o' },
        { "max-shard-size", required_argument, 0, 'S' }, { "force", no_argument, 0, 'F' },
        { "quiet", no_argument, 0, 'q' }, { "help", no_argument, 0, 'h' }, { 0, 0, 0, 0 },
    };
    const char *model = NULL, *config = NULL, *out = NULL;
    int format = -1, dtype = MPS_DTYPE_F32, force = 0, quiet = 0;
    int64_t seed = 1, max_shard = 0;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "o:qh", opts, NULL)) != -1) {
        switch (c) {
        case 'M': model = optarg; break;
        case 'c': config = optarg; break;
        case 'f':
            format = mps_file_format_from_name(optarg);
            if (format < 0)
                return cli_usage("synth", "--format '%s': expected safetensors or llmc", optarg);
            break;
        case 'd':
            dtype = mps_dtype_from_name(optarg);
            if (dtype < 0)
                return cli_usage("synth", "--dtype '%s': expected f32, bf16 or f16", optarg);
            break;
        case 'S':
            if (cli_parse_size(optarg, &max_shard) != 0)
                return cli_usage("synth", "--max-shard-size '%s': expected a size such as 5GB or 200MiB", optarg);
            break;
        case 's': if (cli_int("synth", "--seed", optarg, 0, INT64_MAX, &seed)) return MPS_EUSAGE; break;
        case 'o': out = optarg; break;
        case 'F': force = 1; break;
        case 'q': quiet = 1; break;
        case 'h': fputs(help, stdout); return 0;
        default: return cli_bad_option("synth", "o:qh", opts, argc, argv);
        }
    }
    if (optind != argc)
        return cli_usage("synth", "unexpected argument '%s'", argv[optind]);
    if (!model == !config)
        return cli_usage("synth", "give exactly one of --model and --config");
    if (format < 0 || !out)
        return cli_usage("synth", "--format and -o are required");
    mps_err err;
    mps_err_clear(&err);
    mps_config cfg;
    if ((model ? mps_config_preset(model, &cfg, &err) : mps_config_parse(config, &cfg, &err)) != 0 ||
        (!force && mps_output_refuse_model_files(out, (mps_file_format)format, 0, &err) != 0))
        return cli_fail("synth", &err);
    mps_progress *progress = mps_progress_new("synth", 0, quiet ? 0 : -1);
    int rc = mps_synth_write_progress(out, &cfg, (mps_file_format)format, (mps_dtype)dtype, (uint64_t)seed, max_shard,
                                      progress, &err);
    mps_progress_done(progress);
    return rc != 0 ? cli_fail("synth", &err) : 0;
}
