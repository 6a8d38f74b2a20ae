/* Fuzz target: a whole shard file as the readers see it (mps_verify: mps_ckpt_open, the file's
 * attributes, every dataset's type, shape, chunking, filters and box attributes, every chunk;
 * then every tensor gathered).
 *
 * Input: the bytes of rank-00000.h5 of the one-rank checkpoint of h5_base.h (the seed is that
 * file: run with MPS_FUZZ_WRITE_SEED=PATH to write it). The manifest is rewritten with the
 * input's size so that the reader gets past the size check. HDF5 parses the bytes first: crashes
 * inside libhdf5 are recorded in RESULTS.md, not fixed here; fuzz_h5attr covers the project's
 * own checks on well-formed HDF5 files with hostile contents. */
#include "h5_base.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char scratch[256], dir[300], h5path[400];
static h5_base base;

static void cleanup(void)
{
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", scratch);
    if (scratch[0] && system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", scratch);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    h5_no_free_lists();
    h5_scratch_dir(scratch, sizeof scratch, "fuzz_h5file");
    atexit(cleanup);
    h5_base_build(&base, "dp=1", scratch);
    const char *seed = getenv("MPS_FUZZ_WRITE_SEED");
    if (seed) {
        h5_write_file(seed, base.bytes[0], base.size[0]);
        exit(0);
    }
    snprintf(dir, sizeof dir, "%s/ckpt", scratch);
    FUZZ_ASSERT(mkdir(dir, 0755) == 0, "mkdir %s", dir);
    h5_make_fifo(dir); /* what the link and storage seeds point at */
    h5_rank_path(dir, 0, h5path, sizeof h5path);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    h5_write_file(h5path, data, size);
    h5_write_manifest(&base, dir);
    h5_check(&base, dir);
    return 0;
}
