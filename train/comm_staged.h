#ifndef MPS_COMM_STAGED_H
#define MPS_COMM_STAGED_H

#include "backend.h"
#include "comm.h"

/* A communication backend over the buffers of `be` (device memory) built on `inner`, which works
 * on host memory (MPI). group_size / group_index: this rank's group sizes and its index in each
 * group (WORLD, DP, TP). inner must outlive the result. */
int mps_comm_staged_new(const mps_comm *inner, const mps_backend *be, const int *group_size, const int *group_index,
                        mps_comm *out, mps_err *err);
void mps_comm_staged_free(mps_comm *c);

#endif
