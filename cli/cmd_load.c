#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"
#include "reshard/load.h"

static const char *const help =
    "usage: mpshard load DIR --layout L [--rank R] [--threads N] [--checksum]\n"
    "\n"
    "Reads into memory everything rank R holds under layout L (parameters and optimizer state),\n"
    "from checkpoint DIR written under any layout: the trainer's resume path, as a command to time\n"
    "it. Under mpirun, R defaults to the process's rank (OMPI_COMM_WORLD_RANK). Prints one JSON line.\n"
    "\n"
    "  --checksum   also print an XXH3 of the loaded data (to compare loads across layouts)\n";

int cmd_load(int argc, char **argv)
{
    static const struct option opts[] = {
        { "layout", required_argument, 0, 'L' }, { "rank", required_argument, 0, 'r' },
        { "threads", required_argument, 0, 't' }, { "checksum", no_argument, 0, 'c' },
        { "help", no_argument, 0, 'h' }, { 0, 0, 0, 0 },
    };
    const char *layout_text = NULL;
    int64_t rank = -1, threads = 0, v;
    int checksum = 0, c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'L': layout_text = optarg; break;
        case 'r': if (cli_int("load", "--rank", optarg, 0, 1 << 24, &rank)) return MPS_EUSAGE; break;
        case 't': if (cli_int("load", "--threads", optarg, 1, 1024, &v)) return MPS_EUSAGE; threads = v; break;
        case 'c': checksum = 1; break;
        case 'h': fputs(help, stdout); return 0;
        default: return cli_bad_option("load", "h", opts, argc, argv);
        }
    }
    if (optind != argc - 1 || !layout_text)
        return cli_usage("load", "expected DIR and --layout");
    if (rank < 0) {
        const char *env = getenv("OMPI_COMM_WORLD_RANK");
        rank = env ? atoi(env) : 0;
    }
    mps_err err;
    mps_err_clear(&err);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    mps_ckpt *ck;
    if (mps_ckpt_open(argv[optind], &ck, &err) != 0)
        return cli_fail("load", &err);
    mps_layout layout;
    mps_rank_state st;
    if (mps_layout_parse(layout_text, &mps_ckpt_manifest(ck)->cfg, &layout, &err) != 0 ||
        mps_load_rank(ck, &layout, (int)rank, ~0u, (int)threads, &st, &err) != 0) {
        mps_ckpt_close(ck);
        return cli_fail("load", &err);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
    uint64_t h = 0;
    for (int i = 0; checksum && i < st.count; i++)
        h ^= mps_xxh3(st.pieces[i].data, (size_t)(st.pieces[i].piece.flat_end - st.pieces[i].piece.flat_begin) * 4) +
             (uint64_t)i * 0x9e3779b97f4a7c15ull;
    printf("{\"rank\": %lld, \"pieces\": %d, \"bytes\": %lld, \"seconds\": %.3f, \"GBps\": %.3f, \"read_bytes\": %lld",
           (long long)rank, st.count, (long long)st.bytes, secs, st.bytes / 1e9 / secs,
           (long long)mps_ckpt_bytes_read(ck));
    if (checksum)
        printf(", \"xxh3\": \"%016llx\"", (unsigned long long)h);
    printf("}\n");
    mps_rank_state_free(&st);
    mps_ckpt_close(ck);
    return 0;
}
