#ifndef MPS_COMM_STAGED_H
#define MPS_COMM_STAGED_H

#include "backend.h"
#include "comm.h"

/* A communication backend over the buffers of `be` (device memory) built on `inner`, which works
 * on host memory (MPI). group_size / group_index: this rank's group sizes and its index in each
 * group (WORLD, DP, TP). inner must outlive the result.
 *
 * deferred (tests, `mpshard train --comm-deferred`): the result also has comm.h's started
 * collectives (can_start), run only at finish_started() and only after checking that their
 * inputs did not change since the start (else finish_started fails, naming the rank). Their
 * results come as late as they can: a reader that does not wait for them sees unreduced values
 * (the losses show it), a writer that does not wait fails the check. So the CPU suite covers the
 * engine's gradient reduction under the backward and ZeRO-3's prefetch without a GPU. */
int mps_comm_staged_new(const mps_comm *inner, const mps_backend *be, const int *group_size, const int *group_index,
                        int deferred, mps_comm *out, mps_err *err);
void mps_comm_staged_free(mps_comm *c);

#endif
