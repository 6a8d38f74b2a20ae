/* mpshard: the command-line front end. Only this layer prints and exits. */
#include <getopt.h>
#include <hdf5.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckpt.h"
#include "cli.h"

static const char *const usage_text =
    "usage: mpshard COMMAND [options]\n"
    "\n"
    "Checkpoints of GPT-2 and Llama-family models, sharded for any DP x PP x TP x ZeRO layout.\n"
    "\n"
    "commands:\n"
    "  shard INPUT --layout L -o DIR   full model (HF directory, safetensors, llm.c .bin) -> shards for layout L\n"
    "  reshard SRC --layout L -o DST   shards of one layout -> another (weights and optimizer state)\n"
    "  split SRC --gpus N -o DST       reshard for N GPUs into the layout the planner finds fastest\n"
    "  export DIR --format F -o OUT    shards (any layout) -> one full model file (safetensors, llmc)\n"
    "  verify DIR                      check completeness and every checksum\n"
    "  load DIR --layout L --rank R    read what rank R of layout L holds (the resume path; timing)\n"
    "  synth --model NAME -o OUT       write a synthetic model file (demo, tests, benchmarks)\n"
    "  compare A B                     two checkpoints or model files, bit for bit or within --rtol/--atol\n"
    "  ls DIR [--tensor NAME]          where each tensor of a checkpoint is stored (file, dataset, box)\n"
    "  extract DIR --tensor NAME -o F  one tensor of a checkpoint as .npy or .safetensors\n"
    "  inspect DIR | --model M --layout L  bytes per rank by kind; --suggest layouts that fit N GPUs\n"
    "  init --model M --layout L -o DIR    a fresh training state (random initialisation)\n"
    "  train --ckpt DIR --layout L ...     train (mpirun -np dp*pp*tp), resuming from any layout\n"
    "  eval --ckpt DIR --data TOKENS       the loss of a checkpoint over token data (any layout)\n"
    "  tokens --count N --vocab V -o FILE  a synthetic llm.c token file (demo, tests)\n"
    "  models                          the named models (--model) and their shapes\n"
    "\n"
    "Layouts: --layout dp=2,pp=2,tp=2,zero=1 (any order; missing keys mean 1, zero 0;\n"
    "stages=5:7 gives the number of layers per pipeline stage).\n"
    "Run 'mpshard COMMAND --help' for the options of a command.\n"
    "Exit codes: 0 ok, 1 failure, 2 usage, 3 corrupt or missing input, 4 I/O error, 5 out of memory,\n"
    "6 unsupported, 128+N stopped by signal N (130 SIGINT, 143 SIGTERM).\n";

/* One write per line: under mpirun the processes' stderr is merged, and a line written in pieces
 * interleaves with the others' ("mpshard train: mpshard train: ..."). */
static void put_line(const char *line)
{
    fputs(line, stderr);
    fflush(stderr);
}

int cli_fail(const char *cmd, const mps_err *err)
{
    char line[1200];
    snprintf(line, sizeof line, "mpshard %s: %s\n", cmd, err->msg[0] ? err->msg : "failed");
    put_line(line);
    return err->code ? err->code : MPS_EFAIL;
}

int cli_usage(const char *cmd, const char *fmt, ...)
{
    char msg[1024], line[1200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    snprintf(line, sizeof line, "mpshard %s: %s (see mpshard %s --help)\n", cmd, msg, cmd);
    if (cli_procs_is_first())
        put_line(line);
    return MPS_EUSAGE;
}

/* The long option that `arg` ("--name" or "--name=value") names, exactly or as a prefix. */
static const struct option *long_option(const struct option *opts, const char *arg)
{
    size_t n = strcspn(arg + 2, "=");
    const struct option *prefix = NULL;
    for (const struct option *o = opts; o->name; o++) {
        if (strncmp(o->name, arg + 2, n) != 0)
            continue;
        if (o->name[n] == '\0')
            return o;
        prefix = o;
    }
    return prefix;
}

int cli_bad_option(const char *cmd, const char *optstring, const struct option *opts, int argc, char **argv)
{
    /* getopt leaves optind past the argument of a long option; within a bundle of short options
     * (-qx) it may still point at the bundle, so argv[optind - 1] is a long option's only when
     * it names one whose value getopt reports in optopt */
    const char *arg = optind > 0 && optind <= argc ? argv[optind - 1] : "";
    int is_long = strncmp(arg, "--", 2) == 0;
    const struct option *lo = is_long ? long_option(opts, arg) : NULL;
    if (is_long && (optopt == 0 || (lo && lo->val == optopt))) {
        size_t name = strcspn(arg, "=");
        if (optopt == 0)
            return cli_usage(cmd, "unknown option '%.*s'", (int)name, arg);
        if (arg[name] == '=')
            return cli_usage(cmd, "option '--%s' takes no value", lo->name);
        return cli_usage(cmd, "option '--%s' needs a value", lo->name);
    }
    const char *o = optopt ? strchr(optstring, optopt) : NULL;
    if (o && o[1] == ':')
        return cli_usage(cmd, "option '-%c' needs a value", optopt);
    if (optopt)
        return cli_usage(cmd, "unknown option '-%c'", optopt);
    return cli_usage(cmd, "unknown option '%s'", arg);
}

int cli_int(const char *cmd, const char *opt, const char *value, int64_t lo, int64_t hi, int64_t *out)
{
    char *end;
    long long v = strtoll(value, &end, 10);
    if (end == value || *end != '\0' || v < lo || v > hi) {
        cli_usage(cmd, "%s '%s': expected an integer from %lld to %lld", opt, value, (long long)lo, (long long)hi);
        return -1;
    }
    *out = v;
    return 0;
}

int cli_schedule(const char *cmd, const char *value, int *gpipe)
{
    if (strcmp(value, "1f1b") != 0 && strcmp(value, "gpipe") != 0) {
        cli_usage(cmd, "--schedule '%s': expected 1f1b or gpipe", value);
        return -1;
    }
    *gpipe = strcmp(value, "gpipe") == 0;
    return 0;
}

int main(int argc, char **argv)
{
    /* HDF5's exit handler closes what is still open; after a failed write (disk full) a file whose
     * close failed makes it crash (HDF5 1.10: SIGSEGV in H5F__close_cb). So the library is shut
     * down here, after a command that succeeded, and left to the OS after one that failed (its
     * staging directory or temporary files are already removed by then). */
    H5dont_atexit(); /* before any other HDF5 call */
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL); /* errors are reported as one line by the library */
    /* Over a file size limit (ulimit -f), write() then fails with EFBIG, reported as an I/O error
     * (exit 4) after the staging directory or temporary file is removed, instead of the process
     * dying by SIGXFSZ and leaving them behind. */
    signal(SIGXFSZ, SIG_IGN);
    opterr = 0; /* unknown options are reported by cli_bad_option, in the form of every other error */
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "help") == 0) {
        fputs(usage_text, argc < 2 ? stderr : stdout);
        return argc < 2 ? MPS_EUSAGE : 0;
    }
    if (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "version") == 0) {
        unsigned maj, min, rel;
        H5get_libversion(&maj, &min, &rel);
        printf("mpshard %s (format version %d, HDF5 %u.%u.%u)\n", MPS_VERSION, MPS_FORMAT_VERSION, maj, min, rel);
        return 0;
    }
    static const struct { const char *name; int (*fn)(int, char **); } cmds[] = {
        { "shard", cmd_shard }, { "export", cmd_export }, { "verify", cmd_verify },
        { "synth", cmd_synth }, { "compare", cmd_compare }, { "reshard", cmd_reshard }, { "split", cmd_split },
        { "load", cmd_load },
        { "inspect", cmd_inspect }, { "init", cmd_init }, { "tokens", cmd_tokens }, { "train", cmd_train }, { "eval", cmd_eval },
        { "ls", cmd_ls }, { "extract", cmd_extract },
        { "models", cmd_models },
    };
    for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++)
        if (strcmp(argv[1], cmds[i].name) == 0) {
            int rc = cmds[i].fn(argc - 1, argv + 1);
            if (rc == 0)
                H5close();
            return rc;
        }
    fprintf(stderr, "mpshard: unknown command '%s' (see mpshard --help)\n", argv[1]);
    return MPS_EUSAGE;
}
