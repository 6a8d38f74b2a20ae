#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "units.h"
#include "export.h"

static const char *const help =
    "usage: mpshard export DIR --format safetensors|llmc -o OUTDIR [options]\n"
    "\n"
    "Writes the parameters of checkpoint DIR (any layout) as one full model file, streaming in\n"
    "bounded memory: OUTDIR/model.safetensors + OUTDIR/config.json, as transformers'\n"
    "save_pretrained writes them (AutoModelForCausalLM.from_pretrained(OUTDIR) loads them; above\n"
    "--max-shard-size, model-0000k-of-0000n.safetensors + model.safetensors.index.json), or\n"
    "OUTDIR/model_%08d.bin (llm.c, GPT-2 only; step from the checkpoint). The original\n"
    "vocabulary size and config.json are restored.\n"
    "With --processes N (llm.c), also the optimizer state of N llm.c processes,\n"
    "OUTDIR/state_%08d_%05d.bin for ranks 0..N-1, then OUTDIR/DONE_%08d: a checkpoint that\n"
    "`train_gpt2cu -y 1` resumes with N processes.\n"
    "\n"
    "  --format F       safetensors or llmc (required)\n"
    "  -o, --out DIR    output directory\n"
    "  --dtype D        f32, bf16 or f16 (default: the dtype of the model the checkpoint came from)\n"
    "  --max-shard-size S  safetensors: largest file, e.g. 5GB (default, as transformers) or 500MB\n"
    "  --processes N    llmc: write the optimizer-state files of N processes and DONE\n"
    "  --zero 0|1       with --processes: 1 (default) each file holds its rank's ZeRO-1 slice of\n"
    "                   m, v and master (llm.c -z 1); 0 every file holds all of them (-z 0)\n"
    "  --master-weights 0|1  with --processes: 1 (default, llm.c -w 1) the files carry fp32 master\n"
    "                   weights (the checkpoint's master, else its f32 param); 0 they do not (-w 0)\n"
    "  --memory-mb N    tensor data held in memory at once (default 256)\n"
    "  --threads N      reader threads (default: all cores)\n"
    "  --force          replace existing output files (without it they are refused); with\n"
    "                   --processes also remove the step's DONE and state files of other ranks\n"
    "  -q, --quiet      no progress on stderr\n";

int cmd_export(int argc, char **argv)
{
    static const struct option opts[] = {
        { "format", required_argument, 0, 'f' }, { "out", required_argument, 0, 'o' },
        { "dtype", required_argument, 0, 'd' }, { "memory-mb", required_argument, 0, 'm' },
        { "threads", required_argument, 0, 't' }, { "quiet", no_argument, 0, 'q' }, { "help", no_argument, 0, 'h' },
        { "processes", required_argument, 0, 'P' }, { "zero", required_argument, 0, 'Z' },
        { "master-weights", required_argument, 0, 'W' }, { "max-shard-size", required_argument, 0, 'S' },
        { "force", no_argument, 0, 'F' }, { 0, 0, 0, 0 },
    };
    mps_export_opts o = { .format = MPS_FILE_AUTO, .dtype = -1, .zero = 1, .master_weights = 1 };
    int state_opt = 0;
    int64_t v;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "o:qh", opts, NULL)) != -1) {
        switch (c) {
        case 'f': {
            int f = mps_file_format_from_name(optarg);
            if (f < 0)
                return cli_usage("export", "--format '%s': expected safetensors or llmc", optarg);
            o.format = (mps_file_format)f;
            break;
        }
        case 'o': o.out_dir = optarg; break;
        case 'd':
            o.dtype = mps_dtype_from_name(optarg);
            if (o.dtype < 0)
                return cli_usage("export", "--dtype '%s': expected f32, bf16 or f16", optarg);
            break;
        case 'S':
            if (cli_parse_size(optarg, &o.max_shard_bytes) != 0)
                return cli_usage("export", "--max-shard-size '%s': expected a size such as 5GB or 200MiB", optarg);
            break;
        case 'm': if (cli_int("export", "--memory-mb", optarg, 1, 1 << 20, &v)) return MPS_EUSAGE; o.memory_budget = v << 20; break;
        case 't': if (cli_int("export", "--threads", optarg, 1, 1024, &v)) return MPS_EUSAGE; o.threads = (int)v; break;
        case 'P': if (cli_int("export", "--processes", optarg, 1, 65536, &v)) return MPS_EUSAGE; o.processes = (int)v; break;
        case 'Z': if (cli_int("export", "--zero", optarg, 0, 1, &v)) return MPS_EUSAGE; o.zero = (int)v; state_opt = 1; break;
        case 'W': if (cli_int("export", "--master-weights", optarg, 0, 1, &v)) return MPS_EUSAGE; o.master_weights = (int)v; state_opt = 1; break;
        case 'q': o.quiet = 1; break;
        case 'F': o.force = 1; break;
        case 'h': fputs(help, stdout); return 0;
        default: return cli_bad_option("export", "o:qh", opts, argc, argv);
        }
    }
    if (optind != argc - 1)
        return cli_usage("export", "expected one checkpoint DIR");
    if (o.format == MPS_FILE_AUTO)
        return cli_usage("export", "--format is required (safetensors or llmc)");
    if (!o.out_dir)
        return cli_usage("export", "-o OUTDIR is required");
    if (o.processes && o.format != MPS_FILE_LLMC)
        return cli_usage("export", "--processes: optimizer-state files are written for --format llmc only");
    if (state_opt && !o.processes)
        return cli_usage("export", "--zero and --master-weights go with --processes N");
    mps_err err;
    mps_err_clear(&err);
    cli_stop_on_signals();
    o.stop = &cli_stop_signal;
    if (mps_export(argv[optind], &o, &err) != 0)
        return cli_fail_or_stopped("export", o.out_dir, &err);
    return 0;
}
