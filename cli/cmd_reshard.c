#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "comm_mpi.h"
#include "reshard/reshard.h"

static const char *const help =
    "usage: mpshard reshard SRC (--layout L | --zero Z) -o DST [options]\n"
    "\n"
    "Rewrites checkpoint SRC (any layout) for another layout: parameters, Adam moments and the\n"
    "scalar state (step, RNG seed, data position, schedule), bit for bit. Streams chunk by chunk:\n"
    "peak memory stays under --memory-mb whatever the model size. Source checksums are verified\n"
    "while reading; DST is committed atomically; SRC is never modified.\n"
    "Under `mpirun -np K mpshard reshard ...` the K processes split the target files between them\n"
    "(one shared file system).\n"
    "\n"
    "  --layout L       target layout dp=..,pp=..,tp=..,zero=..[,stages=..] (default: the source's)\n"
    "  --zero Z         target ZeRO stage 0..3 (keeps the rest of the layout unless --layout)\n"
    "  -o, --out DST    output checkpoint directory\n"
    "  --memory-mb N    memory budget (default 512): bounds the number of worker threads\n"
    "  --threads N      worker threads (default: all cores, within the budget)\n"
    "  --force          replace an existing committed checkpoint at DST\n"
    "  -q, --quiet      no progress on stderr\n";

int cmd_reshard(int argc, char **argv)
{
    static const struct option opts[] = {
        { "layout", required_argument, 0, 'L' }, { "zero", required_argument, 0, 'z' },
        { "out", required_argument, 0, 'o' }, { "memory-mb", required_argument, 0, 'm' },
        { "threads", required_argument, 0, 't' }, { "force", no_argument, 0, 'F' },
        { "quiet", no_argument, 0, 'q' }, { "help", no_argument, 0, 'h' }, { 0, 0, 0, 0 },
    };
    mps_reshard_opts o = { .zero = -1 };
    int64_t v;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "o:qh", opts, NULL)) != -1) {
        switch (c) {
        case 'L': o.layout = optarg; break;
        case 'z': if (cli_int("reshard", "--zero", optarg, 0, 3, &v)) return MPS_EUSAGE; o.zero = (int)v; break;
        case 'o': o.out_dir = optarg; break;
        case 'm': if (cli_int("reshard", "--memory-mb", optarg, 64, 1 << 20, &v)) return MPS_EUSAGE; o.memory_budget = v << 20; break;
        case 't': if (cli_int("reshard", "--threads", optarg, 1, 1024, &v)) return MPS_EUSAGE; o.threads = (int)v; break;
        case 'F': o.force = 1; break;
        case 'q': o.quiet = 1; break;
        case 'h': fputs(help, stdout); return 0;
        default: return cli_bad_option("reshard", "o:qh", opts, argc, argv);
        }
    }
    if (optind != argc - 1)
        return cli_usage("reshard", "expected one source checkpoint SRC");
    if (!o.layout && o.zero < 0)
        return cli_usage("reshard", "give --layout or --zero");
    if (!o.out_dir)
        return cli_usage("reshard", "-o DST is required");
    mps_procs procs;
    int multi = cli_procs_init(&argc, &argv, &procs);
    if (multi < 0)
        return MPS_EFAIL;
    o.procs = multi ? &procs : NULL;
    cli_stop_on_signals();
    o.stop = &cli_stop_signal;
    mps_err err;
    mps_err_clear(&err);
    int rc = mps_reshard(argv[optind], &o, &err);
    /* every process has the same error (the lowest failing one's): one line, the same exit code.
     * Printed before MPI_Finalize: once another process has exited with it, mpirun stops (SIGTERM,
     * then SIGKILL) the processes that are still running. */
    if (rc != 0 && multi && procs.rank != 0)
        rc = err.code ? err.code : MPS_EFAIL;
    else if (rc != 0)
        rc = cli_fail_or_stopped("reshard", o.out_dir, &err);
    cli_procs_finish(multi);
    return rc;
}
