#ifndef MPS_CLI_COMM_NCCL_H
#define MPS_CLI_COMM_NCCL_H

#include "backend.h"
#include "comm.h"
#include "layout.h"

/* NCCL for the DP/TP collectives over the device buffers of `be`; `mpi` (the MPI backend) for
 * the rest. One GPU per rank. */
int cli_comm_nccl_new(const mps_layout *L, const mps_comm *mpi, const mps_backend *be, mps_comm *out, mps_err *err);
void cli_comm_nccl_free(mps_comm *c);
/* Selects GPU local_rank % device count for this process; *ranks_per_gpu_ok = 1 when this rank
 * has a GPU of its own (local_rank < device count), which NCCL needs. */
int cli_cuda_local_device(int local_rank, int *ranks_per_gpu_ok, mps_err *err);

#endif
