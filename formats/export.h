/* export: a checkpoint (any layout) -> one full model file, in bounded memory. */
#ifndef MPS_EXPORT_H
#define MPS_EXPORT_H

#include "ckpt.h"
#include "modelfile.h"

typedef struct {
    mps_file_format format;   /* safetensors or llmc */
    int dtype;                /* -1: the source model's dtype recorded in the manifest */
    const char *out_dir;
    int threads;              /* 0: all cores */
    int64_t memory_budget;    /* bytes of tensor data held at once; 0: 256 MiB */
    int quiet;
} mps_export_opts;

int mps_export(const char *ckpt_dir, const mps_export_opts *o, mps_err *err);

#endif
