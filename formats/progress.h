/* Progress on stderr (only when it is a terminal and not --quiet): bytes done, rate, time left. */
#ifndef MPS_PROGRESS_H
#define MPS_PROGRESS_H
#include <stdint.h>
typedef struct mps_progress mps_progress;
/* enabled < 0: decide from isatty(stderr). */
mps_progress *mps_progress_new(const char *label, int64_t total_bytes, int enabled);
void mps_progress_add(mps_progress *p, int64_t bytes); /* thread-safe */
void mps_progress_set_total(mps_progress *p, int64_t total_bytes);
/* What the total counts, printed after it ("9.29 GB of state written (param, adam_m, adam_v)"); copied. */
void mps_progress_set_what(mps_progress *p, const char *what);
void mps_progress_done(mps_progress *p); /* final line, frees */
#endif
