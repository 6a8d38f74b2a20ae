#include "pool.h"

#include <hdf5.h>
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

typedef struct { mps_job_fn fn; void *arg; } job;

struct mps_pool {
    pthread_mutex_t lock;
    pthread_cond_t not_empty, not_full, idle;
    job *queue;
    int capacity, head, count, running, stop, failed, nthreads;
    mps_err first_err;
    pthread_t *threads;
};

typedef struct { mps_pool *pool; int index; } worker_arg;

static void *worker_main(void *p)
{
    /* HDF5 prints its error stack by default, per thread (main() turns it off only for its own):
     * library errors are reported as one line through mps_err instead */
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    worker_arg *wa = p;
    mps_pool *pool = wa->pool;
    int index = wa->index;
    free(wa);
    pthread_mutex_lock(&pool->lock);
    for (;;) {
        while (pool->count == 0 && !pool->stop)
            pthread_cond_wait(&pool->not_empty, &pool->lock);
        if (pool->count == 0 && pool->stop)
            break;
        job j = pool->queue[pool->head];
        pool->head = (pool->head + 1) % pool->capacity;
        pool->count--;
        pool->running++;
        int skip = pool->failed;
        pthread_cond_signal(&pool->not_full);
        pthread_mutex_unlock(&pool->lock);
        mps_err err;
        mps_err_clear(&err);
        int rc = skip ? 0 : j.fn(j.arg, index, &err);
        pthread_mutex_lock(&pool->lock);
        if (rc != 0 && !pool->failed) {
            pool->failed = 1;
            pool->first_err = err;
            if (pool->first_err.code == MPS_OK)
                pool->first_err.code = MPS_EFAIL;
        }
        pool->running--;
        if (pool->count == 0 && pool->running == 0)
            pthread_cond_broadcast(&pool->idle);
    }
    pthread_mutex_unlock(&pool->lock);
    /* the messages of a failed HDF5 call stay on this thread's error stack, which HDF5 frees
     * without them when the thread ends: clear it while they can still be freed */
    H5Eclear2(H5E_DEFAULT);
    return NULL;
}

int mps_cpu_count(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (int)n;
}

int mps_pool_create(int threads, int queue_capacity, mps_pool **out, mps_err *err)
{
    mps_pool *p = calloc(1, sizeof *p);
    if (threads < 1)
        threads = 1;
    if (queue_capacity < 1)
        queue_capacity = 1;
    if (!p || !(p->queue = calloc((size_t)queue_capacity, sizeof *p->queue)) ||
        !(p->threads = calloc((size_t)threads, sizeof *p->threads))) {
        if (p) { free(p->queue); free(p); }
        return mps_fail(err, MPS_ENOMEM, "out of memory creating the thread pool");
    }
    p->capacity = queue_capacity;
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->not_empty, NULL);
    pthread_cond_init(&p->not_full, NULL);
    pthread_cond_init(&p->idle, NULL);
    for (int i = 0; i < threads; i++) {
        worker_arg *wa = malloc(sizeof *wa);
        if (wa) {
            wa->pool = p;
            wa->index = i;
        }
        if (!wa || pthread_create(&p->threads[i], NULL, worker_main, wa) != 0) {
            free(wa);
            p->nthreads = i;
            mps_pool_destroy(p);
            return mps_fail(err, MPS_EFAIL, "cannot start worker thread %d", i);
        }
    }
    p->nthreads = threads;
    *out = p;
    return 0;
}

int mps_pool_threads(const mps_pool *p) { return p->nthreads; }

int mps_pool_submit(mps_pool *p, mps_job_fn fn, void *arg, mps_err *err)
{
    pthread_mutex_lock(&p->lock);
    while (p->count == p->capacity && !p->failed)
        pthread_cond_wait(&p->not_full, &p->lock);
    if (p->failed) {
        if (err && err->code == MPS_OK)
            *err = p->first_err;
        pthread_mutex_unlock(&p->lock);
        return -1;
    }
    p->queue[(p->head + p->count) % p->capacity] = (job){ fn, arg };
    p->count++;
    pthread_cond_signal(&p->not_empty);
    pthread_mutex_unlock(&p->lock);
    return 0;
}

int mps_pool_wait(mps_pool *p, mps_err *err)
{
    pthread_mutex_lock(&p->lock);
    while (p->count > 0 || p->running > 0)
        pthread_cond_wait(&p->idle, &p->lock);
    int failed = p->failed;
    if (failed && err && err->code == MPS_OK)
        *err = p->first_err;
    pthread_mutex_unlock(&p->lock);
    return failed ? -1 : 0;
}

void mps_pool_destroy(mps_pool *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->lock);
    p->stop = 1;
    pthread_cond_broadcast(&p->not_empty);
    pthread_mutex_unlock(&p->lock);
    for (int i = 0; i < p->nthreads; i++)
        pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->not_empty);
    pthread_cond_destroy(&p->not_full);
    pthread_cond_destroy(&p->idle);
    free(p->queue);
    free(p->threads);
    free(p);
}
