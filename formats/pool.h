/* A fixed pool of worker threads with a bounded job queue (submitters block when it is full,
 * which bounds the memory of jobs in flight). The first failing job's error is kept; later
 * jobs are skipped once a job failed. */
#ifndef MPS_POOL_H
#define MPS_POOL_H

#include "err.h"

typedef struct mps_pool mps_pool;
/* A job: runs on worker `worker` (0..threads-1), so it can use per-worker scratch buffers. */
typedef int (*mps_job_fn)(void *arg, int worker, mps_err *err);

int mps_pool_create(int threads, int queue_capacity, mps_pool **out, mps_err *err);
int mps_pool_threads(const mps_pool *p);
/* Queues a job; blocks while the queue is full. Returns -1 (and the first job error) once a job
 * has failed, in which case `arg` was not queued. */
int mps_pool_submit(mps_pool *p, mps_job_fn fn, void *arg, mps_err *err);
/* Waits until every queued job has finished; returns -1 with the first job error if any failed. */
int mps_pool_wait(mps_pool *p, mps_err *err);
void mps_pool_destroy(mps_pool *p);
/* The number of online CPUs (at least 1). */
int mps_cpu_count(void);

#endif
