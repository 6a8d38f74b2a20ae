/* Multi-process runs: under mpirun (OpenMPI sets OMPI_COMM_WORLD_SIZE) the processes split the
 * work; MPI is initialised here, in the front end, and handed to the library as callbacks. */
#include <stdio.h>
#include <stdlib.h>

#include "cli.h"

#ifdef MPS_HAVE_MPI
#include <mpi.h>

static int mpi_barrier(void *ctx)
{
    (void)ctx;
    return MPI_Barrier(MPI_COMM_WORLD) == MPI_SUCCESS ? 0 : -1;
}

static int mpi_all_ok(void *ctx, int ok)
{
    (void)ctx;
    int all = 0;
    MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_LAND, MPI_COMM_WORLD);
    return all;
}

static int mpi_bcast(void *ctx, void *buf, int bytes)
{
    (void)ctx;
    return MPI_Bcast(buf, bytes, MPI_BYTE, 0, MPI_COMM_WORLD) == MPI_SUCCESS ? 0 : -1;
}

static int mpi_agree(void *ctx, int ok, void *buf, int bytes)
{
    (void)ctx;
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    int mine = ok ? size : rank, first = size;
    MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (first == size)
        return 1;
    MPI_Bcast(buf, bytes, MPI_BYTE, first, MPI_COMM_WORLD);
    return 0;
}
#endif

int cli_procs_init(int *argc, char ***argv, mps_procs *out)
{
    const char *size = getenv("OMPI_COMM_WORLD_SIZE");
    if (!size || atoi(size) <= 1)
        return 0;
#ifdef MPS_HAVE_MPI
    /* FUNNELED: other threads exist (OpenMP, writer pools, the trainer's background save writer),
     * but only the main thread ever calls MPI */
    int provided;
    if (MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
        fprintf(stderr, "mpshard: MPI_Init failed\n");
        return -1;
    }
    int rank, n;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    *out = (mps_procs){ rank, n, mpi_barrier, mpi_all_ok, mpi_bcast, mpi_agree, NULL };
    return 1;
#else
    (void)argc; (void)argv; (void)out;
    fprintf(stderr, "mpshard: launched by mpirun, but this build has no MPI support\n");
    return -1;
#endif
}

void cli_procs_finish(int multi)
{
#ifdef MPS_HAVE_MPI
    if (multi)
        MPI_Finalize();
#else
    (void)multi;
#endif
}
