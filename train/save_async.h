/* The trainer's saves: RUNDIR/step-%08d, committed atomically (DIR.partial, then the manifest and
 * the rename of mps_stage_commit), then RUNDIR/latest rewritten to name it.
 *
 * Synchronous: every rank writes its shard file straight from the engine's buffers and rank 0
 * commits; training waits for the whole write. Background: every rank copies the pieces it owns
 * into a host snapshot (the only stall), a writer thread per rank writes the file from the snapshot
 * while training goes on, and the commit happens at the first step boundary where every rank's
 * writer has finished. All collectives run on the calling (main) thread: the ranks must make the
 * same calls in the same order, as for every collective. */
#ifndef MPS_SAVE_ASYNC_H
#define MPS_SAVE_ASYNC_H

#include <stdint.h>

#include "engine.h"

typedef struct mps_saver mps_saver;

/* A committed save, for the caller to report. */
typedef struct {
    int64_t step;
    int background;  /* written by the writer thread from a snapshot */
    double stall_s;  /* time training stood still for this save: the snapshot (background) or the whole save */
    double wait_s;   /* part of stall_s spent waiting for the previous background save to commit */
    double write_s;  /* background: the writer thread's time, from the snapshot to the file on disk */
    double commit_s; /* background: the commit at a step boundary (agreement, manifest, rename, latest) */
} mps_save_report;

/* background: saves are written by a thread from a snapshot (mps_saver_save may still be told to
 * write one directly). Nothing is allocated on the device or pinned until the first background save. */
int mps_saver_new(mps_engine *e, const char *rundir, int background, mps_saver **out, mps_err *err);
/* Allocates the background saves' snapshot now (pinned host memory on CUDA: pinning gigabytes takes
 * seconds, which would otherwise stall the first save). Local to the rank. */
int mps_saver_prepare(mps_saver *s, mps_err *err);
/* Saves the engine's state as RUNDIR/step-%08d (step: the counter after the update) with the
 * checkpoint's scalars. A pending background save is committed first (waiting for it). direct (or
 * a synchronous saver): written and committed before returning; otherwise the state is copied into
 * the snapshot and the writer thread started. *stall_s: the time this call took. Collective. */
int mps_saver_save(mps_saver *s, int64_t step, uint64_t rng_seed, int64_t data_position, const char *train_state_json,
                   int direct, double *stall_s, mps_err *err);
/* At a step boundary: commits the pending background save if every rank's writer has finished (one
 * all_ok per call while a save is pending), or waits for it when block. A failed write fails here,
 * with the writer's message on every rank; the staging directory is removed and latest is left as
 * it was. Collective. */
int mps_saver_poll(mps_saver *s, int block, mps_err *err);
/* The saves committed since the last call, oldest first: 1 and *r while there is one, then 0. */
int mps_saver_next_report(mps_saver *s, mps_save_report *r);
/* Stops a pending writer (its remaining chunks fail at once), joins it, removes the staging
 * directory (rank 0) and frees the snapshot: for exits on error, where no collective may run. After
 * a successful mps_saver_poll(block) there is nothing pending and it only frees. */
void mps_saver_free(mps_saver *s);

/* Keeps the `keep` newest committed checkpoints RUNDIR/step-* (by step; never the one that
 * RUNDIR/latest names) and removes the others, each renamed to step-*.removing first (no step-*
 * directory is ever a half-removed checkpoint; leftovers of a removal cut short go too); *removed:
 * how many. Directories without a manifest (staging .partial, anything else) are not touched.
 * keep <= 0: none removed. */
int mps_run_prune(const char *rundir, int keep, int *removed, mps_err *err);

#endif
