/* shard: a full model file (plus, for llm.c, its optimizer-state files) -> a checkpoint of shards
 * for a layout. */
#ifndef MPS_SHARD_H
#define MPS_SHARD_H

#include "ckpt.h"
#include "modelfile.h"

typedef struct {
    const char *layout;        /* layout string */
    const char *out_dir;
    mps_model_file_opts file;  /* input format, config.json path, padded vocab */
    int64_t chunk_bytes;       /* 0: default */
    int zstd_level;            /* used when level_set */
    int level_set;
    int threads;               /* 0: all cores */
    int readers;               /* threads reading the input file, 1..8; 0: default (2) */
    int force, quiet;
    int weights_only;          /* store param only: no Adam moments (a trainer starts them at zero) */
    int synthetic_optimizer;   /* tests/benchmarks: non-zero deterministic Adam moments */
    uint64_t synthetic_seed;
    /* llm.c optimizer state: the N files state_%08d_%05d.bin of the model file's checkpoint (any
     * order); the checkpoint then stores their Adam moments, master weights (when present), step,
     * RNG state and data position instead of a fresh state */
    const char *const *state_paths;
    int nstate;
    struct mps_trace *trace;   /* optional phase timeline (trace.h, MPS_TRACE=1); NULL: none */
    const volatile sig_atomic_t *stop; /* set (by a signal handler): fail soon, removing the staging */
} mps_shard_opts;

int mps_shard(const char *input, const mps_shard_opts *o, mps_err *err);

#endif
