#include <getopt.h>
#include <glob.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "shard/shard.h"
#include "trace.h"

static const char *const help =
    "usage: mpshard shard INPUT --layout L -o DIR [options]\n"
    "\n"
    "Shards a full checkpoint of a GPT-2 or Llama-family model (Hugging Face safetensors with\n"
    "config.json beside it, or an llm.c model .bin) into HDF5 shard files for layout L. Weights are\n"
    "stored in f32 (bf16 inputs are widened exactly) with a fresh optimizer state (Adam moments zero,\n"
    "step 0), or with the optimizer state of llm.c's state files (--state).\n"
    "\n"
    "  --layout L         dp=..,pp=..,tp=..,zero=0..3[,stages=a:b:..] (required)\n"
    "  -o, --out DIR      output checkpoint directory (committed atomically)\n"
    "  --format F         input format: auto (default), safetensors, llmc\n"
    "  --config FILE      Hugging Face config.json (default: beside INPUT)\n"
    "  --padded-vocab N   rows of the embedding (default: vocab rounded up to 128; llm.c: the file's)\n"
    "  --chunk-mb N       chunk size in MiB (default 1)\n"
    "  --level N          zstd level (default 1)\n"
    "  --threads N        compression threads (default: all cores)\n"
    "  --readers N        threads reading INPUT, 1..8 (default 2)\n"
    "  --force            replace an existing committed checkpoint at DIR\n"
    "  --weights-only     store the parameters only, no Adam moments (inference, fine-tuning: the\n"
    "                     trainer starts a checkpoint without them with zero moments)\n"
    "  -q, --quiet        no progress on stderr\n"
    "  --synthetic-optimizer SEED  fill the Adam moments with deterministic non-zero values\n"
    "                     instead of zeros (tests and benchmarks of reshard)\n"
    "  --state FILE       an llm.c optimizer-state file state_%08d_%05d.bin of INPUT's checkpoint\n"
    "                     (INPUT: its model_%08d.bin); give it once per rank, or once with a\n"
    "                     pattern: --state DIR/state_00000010_*.bin (expanded by the shell, or by\n"
    "                     mpshard when quoted). The checkpoint then stores\n"
    "                     llm.c's Adam m and v, fp32 master weights (when the files carry them),\n"
    "                     step, RNG state and data position\n"
    "\n"
    "Environment: MPS_TRACE=1 prints a timeline of the phases (reads, compression, writes, fsync,\n"
    "commit) and where each thread spent its time on stderr at the end; MPS_TRACE_TENSORS=FILE\n"
    "also writes when each tensor was read, queued, written and released, one line each.\n";

/* A growing list of --state paths (a value with * ? [ is expanded here, sorted). */
typedef struct {
    char **v;
    int n, cap;
} path_list;

static int path_add(path_list *l, const char *p)
{
    if (l->n == l->cap) {
        int cap = l->cap ? 2 * l->cap : 8;
        char **v = realloc(l->v, (size_t)cap * sizeof *v);
        if (!v)
            return -1;
        l->v = v;
        l->cap = cap;
    }
    if (!(l->v[l->n] = strdup(p)))
        return -1;
    l->n++;
    return 0;
}

static void path_free(path_list *l)
{
    for (int i = 0; i < l->n; i++)
        free(l->v[i]);
    free(l->v);
}

static int add_state(path_list *l, const char *value)
{
    if (!strpbrk(value, "*?[")) {
        if (path_add(l, value) != 0)
            return cli_usage("shard", "out of memory");
        return 0;
    }
    glob_t g;
    int r = glob(value, 0, NULL, &g);
    if (r == GLOB_NOMATCH)
        return cli_usage("shard", "--state '%s' matches no file", value);
    if (r != 0)
        return cli_usage("shard", "--state '%s': cannot expand the pattern", value);
    for (size_t i = 0; i < g.gl_pathc; i++)
        if (path_add(l, g.gl_pathv[i]) != 0) {
            globfree(&g);
            return cli_usage("shard", "out of memory");
        }
    globfree(&g);
    return 0;
}

/* llm.c names its state files state_%08d_%05d.bin */
static int is_state_name(const char *path)
{
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    size_t n = strlen(base);
    return n > 10 && strncmp(base, "state_", 6) == 0 && strcmp(base + n - 4, ".bin") == 0;
}

int cmd_shard(int argc, char **argv)
{
    static const struct option opts[] = {
        { "layout", required_argument, 0, 'L' }, { "out", required_argument, 0, 'o' },
        { "format", required_argument, 0, 'f' }, { "config", required_argument, 0, 'c' },
        { "padded-vocab", required_argument, 0, 'V' }, { "chunk-mb", required_argument, 0, 'C' },
        { "level", required_argument, 0, 'l' }, { "threads", required_argument, 0, 't' },
        { "force", no_argument, 0, 'F' }, { "quiet", no_argument, 0, 'q' }, { "help", no_argument, 0, 'h' },
        { "synthetic-optimizer", required_argument, 0, 'S' }, { "state", required_argument, 0, 's' },
        { "readers", required_argument, 0, 'R' }, { "weights-only", no_argument, 0, 'W' },
        { 0, 0, 0, 0 },
    };
    mps_shard_opts o = { 0 };
    path_list states = { 0 };
    int64_t v;
    int c, rc;
    optind = 1;
    while ((c = getopt_long(argc, argv, "o:qh", opts, NULL)) != -1) {
        switch (c) {
        case 'L': o.layout = optarg; break;
        case 'o': o.out_dir = optarg; break;
        case 'f': {
            int f = strcmp(optarg, "auto") == 0 ? MPS_FILE_AUTO : mps_file_format_from_name(optarg);
            if (f < 0) {
                path_free(&states);
                return cli_usage("shard", "--format '%s': expected auto, safetensors or llmc", optarg);
            }
            o.file.format = (mps_file_format)f;
            break;
        }
        case 'c': o.file.config_path = optarg; break;
        case 'V': if (cli_int("shard", "--padded-vocab", optarg, 1, (int64_t)1 << 31, &v)) { path_free(&states); return MPS_EUSAGE; } o.file.padded_vocab = v; break;
        case 'C': if (cli_int("shard", "--chunk-mb", optarg, 1, 1024, &v)) { path_free(&states); return MPS_EUSAGE; } o.chunk_bytes = v << 20; break;
        case 'l': if (cli_int("shard", "--level", optarg, -50, 22, &v)) { path_free(&states); return MPS_EUSAGE; } o.zstd_level = (int)v; o.level_set = 1; break;
        case 't': if (cli_int("shard", "--threads", optarg, 1, 1024, &v)) { path_free(&states); return MPS_EUSAGE; } o.threads = (int)v; break;
        case 'R': if (cli_int("shard", "--readers", optarg, 1, 8, &v)) { path_free(&states); return MPS_EUSAGE; } o.readers = (int)v; break;
        case 'F': o.force = 1; break;
        case 'W': o.weights_only = 1; break;
        case 'S': if (cli_int("shard", "--synthetic-optimizer", optarg, 0, INT64_MAX, &v)) { path_free(&states); return MPS_EUSAGE; }
            o.synthetic_optimizer = 1; o.synthetic_seed = (uint64_t)v; break;
        case 's': if ((rc = add_state(&states, optarg)) != 0) { path_free(&states); return rc; } break;
        case 'q': o.quiet = 1; break;
        case 'h': path_free(&states); fputs(help, stdout); return 0;
        default: path_free(&states); return cli_bad_option("shard", "o:qh", opts, argc, argv);
        }
    }
    /* An unquoted --state 'DIR/state_*.bin' reaches us expanded by the shell: its first file as
     * --state's value, the others as operands. Operands named like llm.c's state files join it. */
    const char *input = NULL;
    rc = 0;
    for (int i = optind; i < argc && rc == 0; i++) {
        if (states.n > 0 && is_state_name(argv[i]))
            rc = path_add(&states, argv[i]) != 0 ? cli_usage("shard", "out of memory") : 0;
        else if (!input)
            input = argv[i];
        else
            rc = cli_usage("shard", "expected one INPUT file, and '%s' is a second one", argv[i]);
    }
    if (rc == 0 && !input)
        rc = cli_usage("shard", "expected one INPUT file");
    if (rc == 0 && !o.layout)
        rc = cli_usage("shard", "--layout is required");
    if (rc == 0 && !o.out_dir)
        rc = cli_usage("shard", "-o DIR is required");
    if (rc == 0) {
        mps_err err;
        mps_err_clear(&err);
        o.state_paths = (const char *const *)states.v;
        o.nstate = states.n;
        o.trace = mps_trace_enabled_by_env() ? mps_trace_new() : NULL; /* out of memory: no trace */
        cli_stop_on_signals();
        o.stop = &cli_stop_signal;
        rc = mps_shard(input, &o, &err) == 0 ? 0 : cli_fail_or_stopped("shard", o.out_dir, &err);
        mps_trace_print(o.trace, stderr);
        const char *tensors = getenv("MPS_TRACE_TENSORS");
        if (o.trace && tensors && tensors[0] && mps_trace_write_tensors(o.trace, tensors) != 0)
            fprintf(stderr, "mpshard shard: MPS_TRACE_TENSORS: cannot write %s\n", tensors);
        mps_trace_free(o.trace);
    }
    path_free(&states);
    return rc;
}
