/* reshard: a checkpoint of one layout -> a checkpoint of another, parameters and optimizer
 * state, streaming chunk by chunk in bounded memory. */
#ifndef MPS_RESHARD_H
#define MPS_RESHARD_H

#include "ckpt.h"

/* How a multi-process run (mpirun) splits the work; NULL members mean one process. */
typedef struct {
    int rank, size;                       /* this process among `size` */
    int (*barrier)(void *ctx);            /* all processes; returns 0 */
    int (*all_ok)(void *ctx, int ok);     /* logical AND of ok over all processes */
    int (*bcast)(void *ctx, void *buf, int bytes); /* from process 0 to all; returns 0 */
    /* 1 when every process passed ok; otherwise 0 on every process, and buf (bytes, the same on
     * all) holds the lowest failing process's buf, so that all report that process's error */
    int (*agree)(void *ctx, int ok, void *buf, int bytes);
    void *ctx;
} mps_procs;

typedef struct {
    const char *layout;     /* target layout; NULL: the source's */
    int zero;               /* -1: keep (or the layout string's); else the target ZeRO stage */
    const char *out_dir;
    int64_t memory_budget;  /* bytes; 0: 512 MiB */
    int threads;            /* 0: all cores (limited by the memory budget) */
    int force, quiet;
    const mps_procs *procs; /* NULL: one process writes every file */
    const volatile sig_atomic_t *stop; /* set (by a signal handler): fail soon, removing the staging */
} mps_reshard_opts;

/* Under several processes every one returns the same result: on a failure, the error of the
 * lowest process that failed (its code and message). */
int mps_reshard(const char *src_dir, const mps_reshard_opts *o, mps_err *err);

/* The source of a writer that reads from a checkpoint: one read scratch per worker. */
typedef struct {
    mps_ckpt *ckpt;
    mps_read_scratch **scratch;
    int nthreads;
} mps_ckpt_source;
int mps_ckpt_source_init(mps_ckpt_source *cs, mps_ckpt *c, int threads, mps_source *src, mps_err *err);
void mps_ckpt_source_free(mps_ckpt_source *cs);

#endif
