/* export: a checkpoint (any layout) -> one full model file, in bounded memory; for llm.c also the
 * optimizer-state files of N processes and the DONE file (formats/llmc_state.h). */
#ifndef MPS_EXPORT_H
#define MPS_EXPORT_H

#include "ckpt.h"
#include "modelfile.h"

/* transformers' default max_shard_size ("5GB") */
#define MPS_DEFAULT_MAX_SHARD_BYTES ((int64_t)5000000000)

typedef struct {
    mps_file_format format;   /* safetensors or llmc */
    int dtype;                /* -1: the source model's dtype recorded in the manifest */
    const char *out_dir;
    int threads;              /* 0: all cores */
    int64_t memory_budget;    /* bytes of tensor data held at once; 0: 256 MiB */
    int quiet;
    int force;                /* replace existing output files (else they are refused, exit 2) */
    int64_t max_shard_bytes;  /* safetensors: larger models go to several files and an index; 0: 5 GB */
    /* llm.c only: processes > 0 also writes OUT/state_%08d_%05d.bin for ranks 0..processes-1 and
     * then OUT/DONE_%08d, as llm.c's write_checkpoint does */
    int processes;
    int zero;                 /* 1: each state file holds its rank's ZeRO-1 slice; 0: whole m, v */
    int master_weights;       /* 1: the files carry fp32 master weights (llm.c -w 1, its default) */
    const volatile sig_atomic_t *stop; /* set (by a signal handler): fail soon, removing the temporary file */
} mps_export_opts;

int mps_export(const char *ckpt_dir, const mps_export_opts *o, mps_err *err);

#endif
