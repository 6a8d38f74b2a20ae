/* Opening files whose names come from the user or from a checkpoint: inputs without blocking on a
 * FIFO or a device, temporary outputs without writing through a link someone else put there. */
#ifndef MPS_SAFE_OPEN_H
#define MPS_SAFE_OPEN_H

#include <sys/stat.h>

#include "err.h"

/* Opens an input read-only. The open itself is non-blocking (a FIFO would block it forever), then
 * anything but a regular file is refused with code `not_regular` ("PATH: not a regular file"), and
 * the descriptor is made blocking again. A path that does not exist fails with MPS_ECORRUPT, any
 * other open error with MPS_EIO ("PATH: cannot open: <reason>"); errno is the open's then.
 * Returns the descriptor (its fstat in *st when st is not NULL), or -1. */
int mps_open_input(const char *path, int not_regular, struct stat *st, mps_err *err);

/* Opens a temporary output file for writing, creating it if needed and never truncating it (the
 * caller truncates once it holds whatever lock it needs). A symbolic link, a FIFO or any other
 * non-regular file, or a regular file with other hard links, in its place is refused (MPS_EUSAGE):
 * writing to it would change a file this program did not create. Returns the descriptor or -1. */
int mps_open_tmp_output(const char *path, mps_err *err);

#endif
