/* extract: one tensor of one state kind of a checkpoint (any layout) as a .npy or .safetensors
 * file of its canonical shape, gathered in bands of bounded size. */
#ifndef MPS_EXTRACT_H
#define MPS_EXTRACT_H

#include <stdint.h>

#include "err.h"

typedef struct {
    const char *tensor;      /* canonical name, e.g. "h.3.qkvw" */
    const char *kind;        /* "param" (NULL), "master", "adam_m", "adam_v" */
    const char *out_path;    /* ends in .npy or .safetensors */
    int64_t memory_budget;   /* bytes of tensor data held at once; 0: 64 MiB */
    int force, quiet;
} mps_extract_opts;

int mps_extract(const char *ckpt_dir, const mps_extract_opts *o, mps_err *err);

#endif
