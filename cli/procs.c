/* Multi-process runs: under mpirun (OpenMPI sets OMPI_COMM_WORLD_SIZE) the processes split the
 * work; MPI is initialised here, in the front end, and handed to the library as callbacks. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"

#ifdef MPS_HAVE_MPI
#include <mpi.h>

/* A communicator of its own for agreeing on failures (cli_procs_failed): a process that fails
 * posts a collective there while the others may be inside collectives of the command's own. */
static MPI_Comm failure_comm = MPI_COMM_NULL;

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
    if (MPI_Comm_dup(MPI_COMM_WORLD, &failure_comm) != MPI_SUCCESS)
        failure_comm = MPI_COMM_NULL;
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
    if (multi) {
        if (failure_comm != MPI_COMM_NULL)
            MPI_Comm_free(&failure_comm);
        MPI_Finalize();
    }
#else
    (void)multi;
#endif
}

int cli_procs_local_size(int multi)
{
    const char *env = getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
    if (env && atoi(env) >= 1)
        return atoi(env);
#ifdef MPS_HAVE_MPI
    if (multi) {
        MPI_Comm node;
        int n = 1;
        if (MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node) == MPI_SUCCESS) {
            MPI_Comm_size(node, &n);
            MPI_Comm_free(&node);
        }
        return n;
    }
#else
    (void)multi;
#endif
    return 1;
}

int cli_error_is_secondary(const mps_err *err)
{
    /* the library's words for "I am fine, a peer failed" (reshard.c, save_async.c, engine.c,
     * cmd_train.c): the peer's own message is the one to print */
    static const char *const phrases[] = { "on another rank", "another process failed", "process 0 could not" };
    for (size_t i = 0; i < sizeof phrases / sizeof phrases[0]; i++)
        if (strstr(err->msg, phrases[i]))
            return 1;
    return 0;
}

int cli_procs_is_first(void)
{
    const char *rank = getenv("OMPI_COMM_WORLD_RANK");
    return !rank || atoi(rank) == 0;
}

int cli_procs_failed(int primary, int *all_failed)
{
    *all_failed = 0;
#ifdef MPS_HAVE_MPI
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    /* the lowest rank with an error of its own, else the lowest rank */
    int key = (primary ? 0 : size) + rank, first = -1;
    MPI_Request req;
    if (failure_comm == MPI_COMM_NULL ||
        MPI_Iallreduce(&key, &first, 1, MPI_INT, MPI_MIN, failure_comm, &req) != MPI_SUCCESS)
        return 1;
    /* every process that failed the same way (a missing input, a bad option value) gets here
     * within moments; one still working or waiting in a collective never does */
    struct timespec pause = { 0, 10 * 1000 * 1000 };
    for (int i = 0; i < 300; i++) {
        int done = 0;
        MPI_Test(&req, &done, MPI_STATUS_IGNORE);
        if (done) {
            *all_failed = 1;
            return first % size == rank;
        }
        nanosleep(&pause, NULL);
    }
    return 1; /* the request stays posted: the caller aborts the job */
#else
    (void)primary;
    return 1;
#endif
}
