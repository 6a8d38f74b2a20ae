/* Phase timeline of a shard write (`MPS_TRACE=1 mpshard shard ...`): when each phase began and
 * ended, and per thread where its time went (reading, waiting, compressing, HDF5 under its lock,
 * pwrite, fsync). Made for a machine without perf or strace: the writer path takes a timestamp
 * (clock_gettime(CLOCK_MONOTONIC), a vDSO call) around each step when a trace is attached, and
 * nothing at all when the trace pointer is NULL (the default).
 * No global state: the CLI creates the trace and hangs it off the options (mps_shard_opts,
 * mps_write_opts, mps_stage); every thread writes only its own record (readers, workers, the
 * writeback thread, the scheduling thread), and the CLI prints the whole at the end. */
#ifndef MPS_TRACE_H
#define MPS_TRACE_H

#include <stdint.h>
#include <stdio.h>
#include <time.h>

#include "model.h"

static inline int64_t mps_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* CPU time of the calling thread (a system call, not vDSO: once per job or thread, not per chunk). */
static inline int64_t mps_thread_cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Time, bytes and calls of one activity of one thread. */
typedef struct {
    int64_t ns, bytes, calls;
} mps_tacc;

static inline void mps_tacc_add(mps_tacc *a, int64_t ns, int64_t bytes)
{
    a->ns += ns;
    a->bytes += bytes;
    a->calls++;
}

/* Absolute CLOCK_MONOTONIC times below; 0 = never happened. */
#define MPS_TRACE_MAX_READERS 8

typedef struct { /* one reader thread of the input file */
    int64_t first_start, first_end, last_start, last_end; /* its first and last tensor read */
    int64_t tensors;
    mps_tacc read;       /* whole tensor reads: pread + transpose / dtype conversion; bytes = f32 out */
    mps_tacc pread;      /* inside pread(2) only; bytes read from the file */
    mps_tacc blocked_slot;   /* waiting: every slot taken (read-ahead of SLOTS tensors) */
    mps_tacc blocked_budget; /* waiting: the read-ahead byte budget is full */
    mps_tacc alloc;      /* (re)allocating a slot buffer */
    int64_t cpu_ns;      /* thread CPU time at its end */
    char pad[64];
} mps_trace_reader;

typedef struct { /* one compression worker of the writer's pool */
    int64_t start;       /* pool start */
    int64_t first_chunk, last_chunk; /* when its first / last chunk was compressed */
    int64_t last_job_end, last_pwrite_end;
    int64_t jobs, chunks, zero_chunks;
    int64_t idle_ns;     /* between jobs: the queue was empty (from pool start to its last job) */
    mps_tacc gather;     /* filling the raw chunk from the source (copy out of a read slot) */
    mps_tacc compress;   /* checksum + shuffle + zstd; bytes = raw in (zero chunks: the check only) */
    int64_t bytes_out;   /* compressed bytes produced */
    mps_tacc lock_wait;  /* waiting for the writer's HDF5 lock */
    mps_tacc h5write;    /* H5Dwrite_chunk, under that lock (chunk allocation + index) */
    mps_tacc pwrite;     /* pwrite of the chunk bytes (outside the lock) */
    mps_tacc notify;     /* progress + writeback bookkeeping */
    int64_t cpu_ns;      /* thread CPU time at the end of its last job */
    char pad[64];
} mps_trace_worker;

typedef struct { /* one tensor of the source, in catalogue order */
    int64_t read_start, read_end; /* its read by a reader thread */
    int64_t queued;               /* the scheduling thread had it (begin_tensor returned) and queued its jobs */
    int64_t done;                 /* its last job finished */
    int64_t released;             /* end_tensor: its read slot freed */
    int64_t bytes;                /* f32 bytes read */
    int64_t rss;                  /* resident bytes of the process when it was queued */
    int reader;
    char name[MPS_NAME_MAX];
} mps_trace_tensor;

typedef struct { /* one shard file */
    int64_t flush_begin, close_end;  /* H5Fflush + H5Fclose + starting its writeback */
    int64_t fsync_begin, fsync_end;
    _Atomic int64_t last_pwrite;     /* its last chunk's pwrite ended (any worker) */
    _Atomic int64_t bytes;           /* chunk bytes pwritten */
} mps_trace_file;

enum {
    MPS_EV_INPUT_OPENED,
    MPS_EV_STAGE_BEGUN,
    MPS_EV_FILES_CREATED,    /* every file and dataset created */
    MPS_EV_POOL_STARTED,
    MPS_EV_LAST_SUBMIT,      /* the last job queued */
    MPS_EV_JOBS_DONE,        /* every job finished (pool idle) */
    MPS_EV_FLUSHER_STOPPED,
    MPS_EV_DSETS_CLOSED,     /* checksum attributes written, datasets closed */
    MPS_EV_FILES_SYNCED,     /* every file flushed, closed and fsynced */
    MPS_EV_WRITER_DONE,      /* mps_write_shards returned (pool and buffers freed) */
    MPS_EV_SOURCE_STOPPED,   /* reader threads joined */
    MPS_EV_MANIFEST_WRITTEN, /* the manifest written and fsynced in the stage dir */
    MPS_EV_DIR_FSYNC_BEGIN,
    MPS_EV_DIR_FSYNC_END,
    MPS_EV_RENAMED,
    MPS_EV_COMMITTED,        /* parent directory fsynced, lock released */
    MPS_EV_COUNT
};

typedef struct mps_trace {
    int64_t t0;
    int64_t ev[MPS_EV_COUNT];
    int64_t ev_rss[MPS_EV_COUNT]; /* resident bytes at the event */
    int nreaders;
    mps_trace_reader readers[MPS_TRACE_MAX_READERS];
    int nworkers;
    mps_trace_worker *workers; /* set up by the writer (mps_trace_setup_writer) */
    int nfiles;
    mps_trace_file *files;
    int ntensors;
    mps_trace_tensor *tensors; /* set up by the source (mps_trace_setup_tensors), or NULL */
    /* the scheduling (main) thread */
    mps_tacc wait_source;  /* begin_tensor: the tensor's read had not finished */
    mps_tacc wait_jobs;    /* waiting for the jobs of tensor t-1 before releasing its slot */
    mps_tacc h5create;     /* file + dataset creation with attributes (HDF5 lock) */
    mps_tacc h5dclose;     /* checksum attributes + H5Dclose */
    mps_tacc h5fclose;     /* H5Fflush + H5Fclose + sync_file_range(WRITE), all files */
    mps_tacc fsync;        /* fsync of shard files */
    /* the writeback thread */
    mps_tacc sync_range;   /* sync_file_range(WRITE) calls */
} mps_trace;

/* NULL when out of memory. */
mps_trace *mps_trace_new(void);
void mps_trace_free(mps_trace *t);
/* The CLI's switch: MPS_TRACE set and not "0" or "". */
int mps_trace_enabled_by_env(void);
/* Resident bytes of the process now (/proc/self/statm), 0 when unknown. */
int64_t mps_trace_rss(void);
/* Records event ev now, with the resident size (a later call for the same event overwrites it). */
static inline void mps_trace_event(mps_trace *t, int ev)
{
    if (t) {
        t->ev[ev] = mps_now_ns();
        t->ev_rss[ev] = mps_trace_rss();
    }
}
/* Allocates the per-worker and per-file records (a second writer replaces the first's); -1 when
 * out of memory, in which case the writer traces nothing per worker. */
int mps_trace_setup_writer(mps_trace *t, int nworkers, int nfiles);
/* Allocates the per-tensor records, with the tensors' names; -1 when out of memory. */
int mps_trace_setup_tensors(mps_trace *t, const mps_config *cfg);
/* One line per tensor (tab-separated, times in s from the start) into path; -1 on failure. */
int mps_trace_write_tensors(const mps_trace *t, const char *path);
/* The timeline (sorted by time) and the per-thread totals, one line each, prefixed "trace: ". */
void mps_trace_print(const mps_trace *t, FILE *out);

#endif
