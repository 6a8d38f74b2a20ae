/* The trainer's MPI backend: MPI must be initialised (cli_procs_init). */
#ifndef MPS_CLI_COMM_MPI_H
#define MPS_CLI_COMM_MPI_H

#include "comm.h"
#include "layout.h"

/* Checks that WORLD matches the layout and splits the DP and TP communicators. */
int cli_comm_mpi_new(const mps_layout *L, mps_comm *out, mps_err *err);
void cli_comm_mpi_free(mps_comm *c);
/* Ends every process of the run (a failure on one rank would leave the others in a collective). */
void cli_comm_abort(int code);

#endif
