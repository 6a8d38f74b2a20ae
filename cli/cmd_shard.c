#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "shard/shard.h"

static const char *const help =
    "usage: mpshard shard INPUT --layout L -o DIR [options]\n"
    "\n"
    "Shards a full GPT-2 checkpoint (Hugging Face safetensors with config.json beside it, or an\n"
    "llm.c model .bin) into HDF5 shard files for layout L. Weights are stored in f32 (bf16 inputs\n"
    "are widened exactly) with a fresh optimizer state (Adam moments zero, step 0).\n"
    "\n"
    "  --layout L         dp=..,pp=..,tp=..,zero=0..3[,stages=a:b:..] (required)\n"
    "  -o, --out DIR      output checkpoint directory (committed atomically)\n"
    "  --format F         input format: auto (default), safetensors, llmc\n"
    "  --config FILE      Hugging Face config.json (default: beside INPUT)\n"
    "  --padded-vocab N   rows of the embedding (default: vocab rounded up to 128; llm.c: the file's)\n"
    "  --chunk-mb N       chunk size in MiB (default 1)\n"
    "  --level N          zstd level (default 1)\n"
    "  --threads N        compression threads (default: all cores)\n"
    "  --force            replace an existing committed checkpoint at DIR\n"
    "  -q, --quiet        no progress on stderr\n"
    "  --synthetic-optimizer SEED  fill the Adam moments with deterministic non-zero values\n"
    "                     instead of zeros (tests and benchmarks of reshard)\n";

int cmd_shard(int argc, char **argv)
{
    static const struct option opts[] = {
        { "layout", required_argument, 0, 'L' }, { "out", required_argument, 0, 'o' },
        { "format", required_argument, 0, 'f' }, { "config", required_argument, 0, 'c' },
        { "padded-vocab", required_argument, 0, 'V' }, { "chunk-mb", required_argument, 0, 'C' },
        { "level", required_argument, 0, 'l' }, { "threads", required_argument, 0, 't' },
        { "force", no_argument, 0, 'F' }, { "quiet", no_argument, 0, 'q' }, { "help", no_argument, 0, 'h' },
        { "synthetic-optimizer", required_argument, 0, 'S' },
        { 0, 0, 0, 0 },
    };
    mps_shard_opts o = { 0 };
    int64_t v;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "o:qh", opts, NULL)) != -1) {
        switch (c) {
        case 'L': o.layout = optarg; break;
        case 'o': o.out_dir = optarg; break;
        case 'f': {
            int f = strcmp(optarg, "auto") == 0 ? MPS_FILE_AUTO : mps_file_format_from_name(optarg);
            if (f < 0)
                return cli_usage("shard", "--format '%s': expected auto, safetensors or llmc", optarg);
            o.file.format = (mps_file_format)f;
            break;
        }
        case 'c': o.file.config_path = optarg; break;
        case 'V': if (cli_int("shard", "--padded-vocab", optarg, 1, (int64_t)1 << 31, &v)) return MPS_EUSAGE; o.file.padded_vocab = v; break;
        case 'C': if (cli_int("shard", "--chunk-mb", optarg, 1, 1024, &v)) return MPS_EUSAGE; o.chunk_bytes = v << 20; break;
        case 'l': if (cli_int("shard", "--level", optarg, -50, 22, &v)) return MPS_EUSAGE; o.zstd_level = (int)v; o.level_set = 1; break;
        case 't': if (cli_int("shard", "--threads", optarg, 1, 1024, &v)) return MPS_EUSAGE; o.threads = (int)v; break;
        case 'F': o.force = 1; break;
        case 'S': if (cli_int("shard", "--synthetic-optimizer", optarg, 0, INT64_MAX, &v)) return MPS_EUSAGE;
            o.synthetic_optimizer = 1; o.synthetic_seed = (uint64_t)v; break;
        case 'q': o.quiet = 1; break;
        case 'h': fputs(help, stdout); return 0;
        default: return MPS_EUSAGE;
        }
    }
    if (optind != argc - 1)
        return cli_usage("shard", "expected one INPUT file");
    if (!o.layout)
        return cli_usage("shard", "--layout is required");
    if (!o.out_dir)
        return cli_usage("shard", "-o DIR is required");
    mps_err err;
    mps_err_clear(&err);
    if (mps_shard(argv[optind], &o, &err) != 0)
        return cli_fail("shard", &err);
    return 0;
}
