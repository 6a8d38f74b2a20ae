/* mpshard init: a fresh training state; mpshard tokens: a synthetic llm.c token file. */
#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "data.h"
#include "init.h"
#include "output.h"

static const char *const init_help =
    "usage: mpshard init (--model NAME | --config K=V,..) --layout L -o DIR [options]\n"
    "\n"
    "Writes a fresh training state for layout L: transformers' initialisation (matrices and embeddings\n"
    "N(0, 0.02), GPT-2's residual projections N(0, 0.02/sqrt(2 n_layer)), zero biases, unit norm\n"
    "weights), zero Adam moments, step 0. The values are a pure function of the seed: every layout\n"
    "gets the same model.\n"
    "\n"
    "  --model NAME     a named model (GPT-2, Llama, Mistral, Qwen2 shapes): `mpshard models` lists them\n"
    "  --config K=V,..  n_layer=..,n_embd=..,n_head=..,vocab=..,n_positions=..[,padded_vocab=..]; Llama family:\n"
    "                   arch=llama[,family=llama|mistral|qwen2],n_kv_head=..,ffn=..,tied=0|1,qkv_bias=0|1,\n"
    "                   norm_eps=..,rope_theta=..[,rope_llama3=factor:low:high:original_positions\n"
    "                   | rope_linear=F | rope_dynamic=F]\n"
    "                   [,head_dim=N (when not n_embd / n_head)][,sliding_window=N (family=mistral)]\n"
    "  --layout L       dp=..,pp=..,tp=..,zero=..[,stages=a:b]\n"
    "  --seed S         default 1\n"
    "  --threads N      compression threads (default: all cores)\n"
    "  --force          replace an existing checkpoint at DIR\n"
    "  -q, --quiet      no progress\n";

int cmd_init(int argc, char **argv)
{
    static const struct option opts[] = {
        { "model", required_argument, 0, 'M' }, { "config", required_argument, 0, 'c' },
        { "layout", required_argument, 0, 'l' }, { "seed", required_argument, 0, 's' },
        { "threads", required_argument, 0, 't' }, { "force", no_argument, 0, 'f' },
        { "quiet", no_argument, 0, 'q' }, { "out", required_argument, 0, 'o' },
        { "help", no_argument, 0, 'h' }, { 0, 0, 0, 0 },
    };
    const char *model = NULL, *config = NULL, *layout = NULL, *out = NULL;
    int64_t seed = 1, threads = 0;
    int force = 0, quiet = 0, c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "o:qh", opts, NULL)) != -1) {
        switch (c) {
        case 'M': model = optarg; break;
        case 'c': config = optarg; break;
        case 'l': layout = optarg; break;
        case 's': if (cli_int("init", "--seed", optarg, 0, INT64_MAX, &seed)) return MPS_EUSAGE; break;
        case 't': if (cli_int("init", "--threads", optarg, 0, 1024, &threads)) return MPS_EUSAGE; break;
        case 'f': force = 1; break;
        case 'q': quiet = 1; break;
        case 'o': out = optarg; break;
        case 'h': fputs(init_help, stdout); return 0;
        default: return cli_bad_option("init", "o:qh", opts, argc, argv);
        }
    }
    if (optind != argc)
        return cli_usage("init", "unexpected argument '%s'", argv[optind]);
    if (!model == !config)
        return cli_usage("init", "give exactly one of --model and --config");
    if (!layout || !out)
        return cli_usage("init", "--layout and -o are required");
    mps_err err;
    mps_err_clear(&err);
    mps_config cfg;
    mps_layout L;
    if ((model ? mps_config_preset(model, &cfg, &err) : mps_config_parse(config, &cfg, &err)) != 0 ||
        mps_layout_parse(layout, &cfg, &L, &err) != 0 ||
        mps_init_write(out, &cfg, &L, (uint64_t)seed, force, (int)threads, quiet, &err) != 0)
        return cli_fail("init", &err);
    return 0;
}

static const char *const tokens_help =
    "usage: mpshard tokens --count N --vocab V -o FILE [--seed S] [--force]\n"
    "\n"
    "Writes an llm.c token file (magic 20240520; version 1, uint16 tokens, or for --vocab above\n"
    "65535 version 2, uint32 tokens) of N tokens of a deterministic synthetic text that a model\n"
    "can learn (demo and tests). An existing FILE is replaced only with --force.\n";

int cmd_tokens(int argc, char **argv)
{
    static const struct option opts[] = {
        { "count", required_argument, 0, 'n' }, { "vocab", required_argument, 0, 'v' },
        { "seed", required_argument, 0, 's' }, { "out", required_argument, 0, 'o' },
        { "force", no_argument, 0, 'F' }, { "help", no_argument, 0, 'h' }, { 0, 0, 0, 0 },
    };
    const char *out = NULL;
    int64_t count = 0, vocab = 0, seed = 1;
    int force = 0;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "o:h", opts, NULL)) != -1) {
        switch (c) {
        case 'n': if (cli_int("tokens", "--count", optarg, 2, INT32_MAX, &count)) return MPS_EUSAGE; break;
        case 'v': if (cli_int("tokens", "--vocab", optarg, 2, INT32_MAX, &vocab)) return MPS_EUSAGE; break;
        case 's': if (cli_int("tokens", "--seed", optarg, 0, INT64_MAX, &seed)) return MPS_EUSAGE; break;
        case 'o': out = optarg; break;
        case 'F': force = 1; break;
        case 'h': fputs(tokens_help, stdout); return 0;
        default: return cli_bad_option("tokens", "o:h", opts, argc, argv);
        }
    }
    if (optind != argc)
        return cli_usage("tokens", "unexpected argument '%s'", argv[optind]);
    if (!out || !count || !vocab)
        return cli_usage("tokens", "--count, --vocab and -o are required");
    mps_err err;
    mps_err_clear(&err);
    if ((!force && mps_output_refuse_existing(out, &err) != 0) ||
        mps_tokens_write_synthetic(out, count, vocab, (uint64_t)seed, &err) != 0)
        return cli_fail("tokens", &err);
    return 0;
}
