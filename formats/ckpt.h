/* A checkpoint: a directory of per-rank HDF5 shard files and a manifest (FORMAT.md). */
#ifndef MPS_CKPT_H
#define MPS_CKPT_H

#include <signal.h>
#include <stdint.h>

#include "chunk.h"
#include "err.h"
#include "geometry.h"
#include "layout.h"
#include "model.h"

#define MPS_FORMAT_VERSION 3 /* the newest this mpshard reads and writes (FORMAT.md) */
#define MPS_MANIFEST_NAME "manifest.json"
#define MPS_DEFAULT_CHUNK_BYTES ((int64_t)1 << 20)
#define MPS_DEFAULT_ZSTD_LEVEL 1
/* The largest state.data_position (sequences consumed) a manifest may record: far beyond any run,
 * and far enough below INT64_MAX that a trainer's steps cannot overflow it */
#define MPS_MAX_DATA_POSITION ((int64_t)1 << 62)

typedef struct {
    int rank;
    char name[32];   /* "rank-00003.h5" */
    int64_t bytes;
} mps_file_entry;

typedef struct {
    int format_version;
    char checkpoint_id[33]; /* 32 hex digits, random per checkpoint; every shard file carries it */
    mps_config cfg;
    mps_layout layout;
    unsigned kinds;                       /* stored kinds, bitmask of 1 << mps_kind */
    mps_dtype dtype[MPS_KIND_COUNT];      /* element type per stored kind */
    int64_t chunk_bytes;
    int zstd_level;
    /* training scalars */
    int64_t step;
    uint64_t rng_seed;
    int64_t data_position;
    char *train_state_json;   /* optional JSON object text (lr schedule, ...), or NULL */
    /* provenance */
    char source_format[16];   /* "safetensors", "llmc", "mpshard", "init" */
    mps_dtype source_dtype;   /* dtype of the parameters in the source model file */
    char *hf_config_json;     /* original config.json of a Hugging Face source, or NULL */
    char created_by[64];
    /* files (filled by commit) */
    int nfiles;
    mps_file_entry *files;
} mps_manifest;

/* A fresh random checkpoint id: 32 hex digits. */
void mps_checkpoint_id_new(char out[33]);
void mps_manifest_init(mps_manifest *m, const mps_config *cfg, const mps_layout *L);
void mps_manifest_free(mps_manifest *m);
/* Copies everything but the file list. */
int mps_manifest_copy_header(mps_manifest *dst, const mps_manifest *src, mps_err *err);
int mps_manifest_write(const char *path, const mps_manifest *m, mps_err *err);
/* Reads, checks the manifest checksum, the format version and every field. */
int mps_manifest_read(const char *path, mps_manifest *m, mps_err *err);
void mps_shard_file_name(int rank, char *buf, size_t size);

/* ---- writing: staging directory, then an atomic commit ---- */
typedef struct {
    char final_dir[4096];
    char stage_dir[4200]; /* final_dir + ".partial" */
    char lock_path[4200]; /* final_dir + ".lock" */
    int lock_fd;
    int replace;          /* a committed checkpoint is at final_dir and --force was given */
    struct mps_trace *trace; /* optional (trace.h): set after mps_stage_begin, which clears it */
} mps_stage;

/* Takes the lock DIR.lock (fails if another process holds it; refuses a DIR.lock that is not an
 * mpshard lock), refuses a committed DIR unless force (and any non-checkpoint, non-empty DIR),
 * removes a stale DIR.partial that the lock records as a writer's (or that is empty; anything else
 * is refused), creates it. A DIR that is a symbolic link stands for the directory it names.
 * inputs (NULL-terminated, or NULL): paths the command reads; one inside DIR.partial, or inside a
 * DIR that force would replace, is refused. On failure, a lock it created is removed again. */
int mps_stage_begin(const char *dir, int force, const char *const *inputs, mps_stage *st, mps_err *err);
/* Lists and sizes the shard files in the staging directory into m->files, writes and fsyncs the
 * manifest, fsyncs the directory, renames it to DIR (replacing the old checkpoint), releases the lock. */
int mps_stage_commit(mps_stage *st, mps_manifest *m, mps_err *err);
/* Removes the staging directory and releases the lock. */
void mps_stage_abort(mps_stage *st);
/* The staging directory a writer of DIR uses ("DIR.partial", beside the directory a link DIR names). */
int mps_stage_dir_name(const char *dir, char *out, size_t size, mps_err *err);
/* rm -r */
int mps_remove_tree(const char *path);
int mps_fsync_path(const char *path, mps_err *err);

/* ---- writing shard files ---- */
/* The data a writer stores: gather() fills dst with the elements [fb, fe) (row-major within box)
 * of tensor `tensor`, state `kind`. It runs on pool workers concurrently. begin/end_tensor run on
 * the scheduling thread in catalogue order (begin of tensor t+1 may come before end of t). */
typedef struct {
    void *ctx;
    int (*begin_tensor)(void *ctx, int tensor, mps_err *err);
    void (*end_tensor)(void *ctx, int tensor);
    int (*gather)(void *ctx, int worker, mps_kind kind, int tensor, const mps_box *box, int64_t fb, int64_t fe,
                  float *dst, mps_err *err);
} mps_source;

typedef struct {
    int threads;
    int quiet;
    const char *label;  /* progress label */
    struct mps_progress *progress; /* optional shared progress meter */
    struct mps_trace *trace;       /* optional phase timeline (trace.h); NULL: no clock is read */
    /* optional: once *stop is non-zero (a signal handler sets it to the signal's number) every
     * chunk still to write fails with MPS_ESTOPPED + *stop, so that the caller removes its staging
     * and returns */
    const volatile sig_atomic_t *stop;
} mps_write_opts;

/* Writes the shard files of `ranks` (all ranks when ranks == NULL) into dir for the layout and kinds
 * of m; fsyncs them. Pieces are stored by their owner rank only. */
int mps_write_shards(const char *dir, const mps_manifest *m, const int *ranks, int nranks, mps_source *src,
                     const mps_write_opts *opts, mps_err *err);

/* ---- reading ---- */
typedef struct mps_ckpt mps_ckpt;
typedef struct mps_read_scratch mps_read_scratch;

/* The checkpoint a path names: DIR itself when it holds a manifest (or has no 'latest'), else
 * DIR/NAME for the NAME in DIR/latest (a run directory of `mpshard train`: its newest committed
 * checkpoint). Returns 1 when it followed 'latest', 0 when out is DIR, -1 (err) for a 'latest'
 * that does not name a directory of DIR. */
int mps_ckpt_resolve(const char *dir, char *out, size_t size, mps_err *err);
/* Opens a checkpoint (a run directory: its latest, mps_ckpt_resolve). */
int mps_ckpt_open(const char *dir, mps_ckpt **out, mps_err *err);
/* Checks that DIR's file of `rank` is the one manifest m lists: present, of the recorded size, an
 * mpshard shard file carrying m's checkpoint id and that rank. Reads no chunk data. */
int mps_shard_file_check(const char *dir, const mps_manifest *m, int rank, mps_err *err);
const mps_manifest *mps_ckpt_manifest(const mps_ckpt *c);
const char *mps_ckpt_dir(const mps_ckpt *c);
void mps_ckpt_close(mps_ckpt *c);
mps_read_scratch *mps_read_scratch_new(void);
void mps_read_scratch_free(mps_read_scratch *s);
/* One scratch per worker thread: an array of n, or NULL when out of memory. */
mps_read_scratch **mps_read_scratches_new(int n);
void mps_read_scratches_free(mps_read_scratch **s, int n);
/* Fills dst with elements [fb, fe) (row-major within box) of tensor/kind, whatever layout wrote the
 * checkpoint; reads only the chunks that intersect, verifies their checksums. Thread-safe with one
 * scratch per thread. */
int mps_ckpt_gather(mps_ckpt *c, mps_read_scratch *s, mps_kind kind, int tensor, const mps_box *box,
                    int64_t fb, int64_t fe, float *dst, mps_err *err);
/* Bytes read from shard files so far (compressed, as stored). */
int64_t mps_ckpt_bytes_read(const mps_ckpt *c);

/* verify: every file present with its recorded size, every expected piece present with the
 * right attributes, every chunk decodes and matches its checksum. Problems are reported through
 * report() (one line each, naming the file and tensor); returns the number of problems. */
typedef struct {
    int threads;
    int quiet;
    void (*report)(void *ctx, const char *line);
    void *report_ctx;
    int64_t chunks_checked; /* out */
    int64_t bytes_checked;  /* out: decoded bytes */
} mps_verify_opts;
int mps_verify(const char *dir, mps_verify_opts *opts, mps_err *err);

#endif
