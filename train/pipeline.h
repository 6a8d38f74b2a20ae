/* Which ranks exchange pipeline messages, and on which channel a GPU backend carries them.
 *
 * A rank exchanges pipeline messages with the ranks of the same DP replica and TP part on the
 * neighbouring stages (activations forward, their gradients backward), and the first and last
 * stage with each other (the tied head's gradient). On a backend whose sends block a queue until
 * the peer receives (NCCL: a send blocks its stream; cli/comm_nccl.c has one communicator and
 * stream per channel), mps_pipe_channel splits the messages by direction and by the parity of
 * the sending stage, so that on each channel a rank only sends or only receives: a send waiting
 * for a busy next stage never holds up a receive from the stage before. (One stream for all
 * messages deadlocks under 1F1B; one per direction does not, but has that head-of-line wait.
 * tests/unit/test_pipeline.c simulates the trainer's messages on these channels.) */
#ifndef MPS_PIPELINE_H
#define MPS_PIPELINE_H

#include "layout.h"

enum { MPS_PIPE_CHANNELS = 4, MPS_PIPE_MAX_PEERS = 3 };

/* The channel (0 .. MPS_PIPE_CHANNELS - 1) of a message from rank `sender` to rank `receiver`. */
int mps_pipe_channel(const mps_layout *L, int sender, int receiver);

/* The ranks `rank` exchanges pipeline messages with (both ways), each once, into
 * peers[MPS_PIPE_MAX_PEERS]; returns how many (0 without a pipeline). */
int mps_pipe_peers(const mps_layout *L, int rank, int *peers);

/* The send buffers a stage keeps for each direction: a ring over the step's micro-batches, a
 * buffer written again only once the send from it is done (comm.h send_wait), so that they do not
 * grow with the micro-batches of a step. Two: under 1F1B, by the time a stage writes micro-batch
 * k's activations, the next stage has sent back a gradient that it computed after taking
 * micro-batch k - 2 (and the stage before likewise for gradients), so the wait costs nothing in
 * the steady state; elsewhere the receiver takes that message before it needs anything of this
 * stage's later work, so the wait only paces the sender (tests/unit/test_pipeline.c simulates it). */
static inline int mps_pipe_send_buffers(int64_t microbatches)
{
    return microbatches < 2 ? (int)microbatches : 2;
}

#endif
