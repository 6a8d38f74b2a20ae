#include "shard.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "llmc_state.h"
#include "progress.h"
#include "trace.h"

/* The model file as a write source. Reader threads load tensors in catalogue order into slots
 * ahead of the compression workers, within a memory budget, so that reading the input, compressing
 * and writing the output overlap instead of taking turns. Optimizer moments of a fresh state are
 * zero (or synthetic, for tests and benchmarks); imported llm.c state is read by the workers
 * straight from the state files, piece by piece (nothing of it is held in memory).
 * The read-ahead is bounded by bytes (PREFETCH_BUDGET), not by a handful of tensors: 8 of the 12
 * tensors of a GPT-2 layer are layernorm weights and biases of a few KiB, and with 4 slots they
 * held the window, so that the next large matrix was read only once the previous one had been
 * compressed (reading and compressing took turns; MPS_TRACE showed the readers waiting for a slot
 * most of the run while the byte budget was never reached). */
#define SLOTS 32
#define READERS 2     /* default; --readers */
#define MAX_READERS 8
/* Tensors read ahead and held, and slot buffers kept, in bytes (the tensor the scheduling thread
 * waits for is read whatever the budget). 192 MiB: several of GPT-2 XL's 30-40 MiB matrices ahead,
 * and about the peak RSS of the 4 slots of 640 MiB before (GPT-2 XL on the dev VM: 761-838 MiB
 * against 789-818; 320 MiB gave 937-1020 MiB, over the 1 GiB target). */
#define PREFETCH_BUDGET ((size_t)192 << 20)
#define KEEP_BUFFER ((size_t)64 << 20) /* larger buffers are freed after use, not kept */

typedef struct {
    float *data;
    size_t capacity; /* floats; reserved, with data NULL, while the reader that took the slot allocates */
    size_t bytes;    /* of the tensor it holds */
    int tensor;      /* -1: free */
    int ready;
} slot;

typedef struct file_source file_source;
typedef struct {
    file_source *fs;
    int index;
} reader_arg;

struct file_source {
    mps_model_file *file;
    const mps_config *cfg;
    int ntensors;
    pthread_mutex_t lock;
    pthread_cond_t changed;
    slot slots[SLOTS];
    int *slot_of;          /* tensor -> slot, set by begin_tensor before the tensor's jobs run */
    int next_to_read;
    int wanted;            /* the tensor the scheduling thread waits for or asks for next */
    size_t bytes_in_use;
    size_t buffer_bytes;   /* capacity of every slot's buffer, kept ones and those being allocated */
    int stop, failed;
    mps_err read_err;
    pthread_t readers[MAX_READERS];
    reader_arg reader_args[MAX_READERS];
    int want_readers;        /* threads to start */
    int nreaders;            /* started */
    int synthetic_optimizer; /* fill Adam moments with deterministic values instead of zeros */
    uint64_t seed;
    mps_llmc_state *state;   /* llm.c optimizer state, or NULL */
    mps_trace *tr;           /* phase timeline, or NULL */
};

/* Under the lock: the free slot for a tensor of `bytes`, or -1 when none is free. A kept buffer
 * that fits without wasting much, else an empty slot, else the smallest kept buffer that fits,
 * else the largest one (reallocated). */
static int pick_slot(const file_source *fs, size_t bytes)
{
    size_t need = (bytes + sizeof(float) - 1) / sizeof(float);
    int good = -1, empty = -1, fits = -1, largest = -1;
    for (int i = 0; i < SLOTS; i++) {
        const slot *s = &fs->slots[i];
        if (s->tensor >= 0)
            continue;
        if (s->capacity == 0) {
            if (empty < 0)
                empty = i;
        } else if (s->capacity >= need) {
            if (fits < 0 || s->capacity < fs->slots[fits].capacity)
                fits = i;
        } else if (largest < 0 || s->capacity > fs->slots[largest].capacity) {
            largest = i;
        }
    }
    if (fits >= 0 && fs->slots[fits].capacity <= 2 * need + ((size_t)1 << 18))
        good = fits;
    return good >= 0 ? good : empty >= 0 ? empty : fits >= 0 ? fits : largest;
}

/* Under the lock: detaches kept buffers of free slots, largest first, while all buffers together
 * exceed the budget; returns them in out (freed by the caller outside the lock). */
static int trim_buffers(file_source *fs, float **out)
{
    int n = 0;
    while (fs->buffer_bytes > PREFETCH_BUDGET) {
        int big = -1;
        for (int i = 0; i < SLOTS; i++)
            if (fs->slots[i].tensor < 0 && fs->slots[i].capacity > 0 &&
                (big < 0 || fs->slots[i].capacity > fs->slots[big].capacity))
                big = i;
        if (big < 0)
            break;
        slot *s = &fs->slots[big];
        fs->buffer_bytes -= s->capacity * sizeof(float);
        out[n++] = s->data;
        s->data = NULL;
        s->capacity = 0;
    }
    return n;
}

static void *reader_main(void *arg)
{
    const reader_arg *ra = arg;
    file_source *fs = ra->fs;
    mps_trace_reader *tr = fs->tr && ra->index < MPS_TRACE_MAX_READERS ? &fs->tr->readers[ra->index] : NULL;
    pthread_mutex_lock(&fs->lock);
    for (;;) {
        int t = fs->next_to_read, free_slot = -1;
        if (fs->stop || fs->failed || t >= fs->ntensors)
            break;
        mps_tensor_spec spec;
        mps_tensor_spec_get(fs->cfg, t, &spec);
        size_t bytes = (size_t)mps_tensor_numel(&spec) * sizeof(float);
        free_slot = pick_slot(fs, bytes);
        /* The tensor the scheduling thread waits for is read whatever the budget: it holds the
         * previous one until it has it (a first tensor larger than the budget, wte of a wide
         * model, waited for the second one forever). */
        if (free_slot < 0 ||
            (t > fs->wanted && fs->bytes_in_use > 0 && fs->bytes_in_use + bytes > PREFETCH_BUDGET)) {
            int64_t t0 = tr ? mps_now_ns() : 0;
            pthread_cond_wait(&fs->changed, &fs->lock);
            if (tr)
                mps_tacc_add(free_slot < 0 ? &tr->blocked_slot : &tr->blocked_budget, mps_now_ns() - t0, 0);
            continue;
        }
        slot *sl = &fs->slots[free_slot];
        sl->tensor = t;
        sl->ready = 0;
        sl->bytes = bytes;
        fs->bytes_in_use += bytes;
        fs->next_to_read++;
        /* a new buffer: the slot's old one and, beyond the budget, kept ones of free slots go */
        float *drop[SLOTS + 1];
        int ndrop = 0;
        size_t need = bytes / sizeof(float);
        int alloc = need > sl->capacity;
        if (alloc) {
            fs->buffer_bytes += (need - sl->capacity) * sizeof(float);
            drop[ndrop++] = sl->data;
            sl->data = NULL;
            sl->capacity = need; /* reserved; set to 0 below if the allocation fails */
            ndrop += trim_buffers(fs, drop + ndrop);
        }
        pthread_mutex_unlock(&fs->lock);
        mps_err err;
        mps_err_clear(&err);
        int rc = 0;
        int64_t t0 = tr ? mps_now_ns() : 0, t1 = t0;
        if (alloc) {
            for (int i = 0; i < ndrop; i++)
                free(drop[i]);
            sl->data = malloc(bytes ? bytes : 1);
            if (!sl->data)
                rc = mps_fail(&err, MPS_ENOMEM, "out of memory loading tensor %s", spec.name);
            if (tr) {
                t1 = mps_now_ns();
                mps_tacc_add(&tr->alloc, t1 - t0, (int64_t)bytes);
            }
        }
        if (rc == 0)
            rc = mps_model_file_read_tensor_io(fs->file, t, sl->data, tr ? &tr->pread : NULL, &err);
        if (tr) {
            int64_t t2 = mps_now_ns();
            if (fs->tr->tensors) {
                mps_trace_tensor *e = &fs->tr->tensors[t];
                e->read_start = t0;
                e->read_end = t2;
                e->bytes = (int64_t)bytes;
                e->reader = ra->index;
            }
            mps_tacc_add(&tr->read, t2 - t1, (int64_t)bytes);
            if (!tr->first_start) {
                tr->first_start = t0;
                tr->first_end = t2;
            }
            tr->last_start = t0;
            tr->last_end = t2;
            tr->tensors++;
        }
        pthread_mutex_lock(&fs->lock);
        if (!sl->data) {
            fs->buffer_bytes -= sl->capacity * sizeof(float);
            sl->capacity = 0;
        }
        if (rc != 0 && !fs->failed) {
            fs->failed = 1;
            fs->read_err = err;
        }
        sl->ready = 1;
        pthread_cond_broadcast(&fs->changed);
    }
    pthread_mutex_unlock(&fs->lock);
    if (tr)
        tr->cpu_ns = mps_thread_cpu_ns();
    return NULL;
}

static int begin_tensor(void *ctx, int t, mps_err *err)
{
    file_source *fs = ctx;
    int64_t t0 = fs->tr ? mps_now_ns() : 0;
    int waited = 0, rc = -1;
    pthread_mutex_lock(&fs->lock);
    if (fs->wanted != t) {
        fs->wanted = t;
        pthread_cond_broadcast(&fs->changed);
    }
    for (;;) {
        if (fs->failed) {
            *err = fs->read_err;
            break;
        }
        int found = -1;
        for (int i = 0; i < SLOTS && found < 0; i++)
            if (fs->slots[i].tensor == t && fs->slots[i].ready)
                found = i;
        if (found >= 0) {
            fs->slot_of[t] = found;
            fs->wanted = t + 1;
            pthread_cond_broadcast(&fs->changed);
            rc = 0;
            break;
        }
        waited = 1;
        pthread_cond_wait(&fs->changed, &fs->lock);
    }
    pthread_mutex_unlock(&fs->lock);
    if (fs->tr && waited)
        mps_tacc_add(&fs->tr->wait_source, mps_now_ns() - t0, 0);
    return rc;
}

static void end_tensor(void *ctx, int t)
{
    file_source *fs = ctx;
    pthread_mutex_lock(&fs->lock);
    slot *sl = &fs->slots[fs->slot_of[t]];
    fs->bytes_in_use -= sl->bytes;
    sl->tensor = -1;
    /* kept for the next tensor unless large or beyond the budget with the others */
    if (sl->capacity * sizeof(float) > KEEP_BUFFER || fs->buffer_bytes > PREFETCH_BUDGET) {
        fs->buffer_bytes -= sl->capacity * sizeof(float);
        free(sl->data);
        sl->data = NULL;
        sl->capacity = 0;
    }
    pthread_cond_broadcast(&fs->changed);
    pthread_mutex_unlock(&fs->lock);
}

static int source_start(file_source *fs, mps_err *err)
{
    pthread_mutex_init(&fs->lock, NULL);
    pthread_cond_init(&fs->changed, NULL);
    for (int i = 0; i < SLOTS; i++)
        fs->slots[i].tensor = -1;
    fs->slot_of = calloc((size_t)fs->ntensors, sizeof *fs->slot_of);
    if (!fs->slot_of)
        return mps_fail(err, MPS_ENOMEM, "out of memory");
    if (fs->tr) {
        fs->tr->nreaders = fs->want_readers < MPS_TRACE_MAX_READERS ? fs->want_readers : MPS_TRACE_MAX_READERS;
        mps_trace_setup_tensors(fs->tr, fs->cfg); /* out of memory: no per-tensor records */
    }
    for (int i = 0; i < fs->want_readers; i++) {
        fs->reader_args[i] = (reader_arg){ fs, i };
        if (pthread_create(&fs->readers[i], NULL, reader_main, &fs->reader_args[i]) != 0)
            return mps_fail(err, MPS_EFAIL, "cannot start a reader thread");
        fs->nreaders++;
    }
    return 0;
}

static void source_stop(file_source *fs)
{
    pthread_mutex_lock(&fs->lock);
    fs->stop = 1;
    pthread_cond_broadcast(&fs->changed);
    pthread_mutex_unlock(&fs->lock);
    for (int i = 0; i < fs->nreaders; i++)
        pthread_join(fs->readers[i], NULL);
    for (int i = 0; i < SLOTS; i++)
        free(fs->slots[i].data);
    free(fs->slot_of);
    pthread_mutex_destroy(&fs->lock);
    pthread_cond_destroy(&fs->changed);
}

/* Deterministic non-zero optimizer state (tests and benchmarks of reshard): the synthetic-model
 * values of another seed (v made non-negative), a pure function of the canonical element. */
static void fill_synthetic(const file_source *fs, mps_kind kind, int t, const mps_box *box, int64_t fb, int64_t fe,
                           float *dst)
{
    mps_tensor_spec spec;
    mps_tensor_spec_get(fs->cfg, t, &spec);
    uint64_t seed = fs->seed * 2 + (kind == MPS_KIND_ADAM_V);
    int64_t L = box->cnt[box->ndim - 1];
    for (int64_t row = fb / L; row * L < fe; row++) {
        int64_t base = mps_box_row_origin(&spec, box, row);
        int64_t s0 = row * L > fb ? row * L : fb, s1 = (row + 1) * L < fe ? (row + 1) * L : fe;
        for (int64_t i = s0; i < s1; i++) {
            float v = mps_synth_value(fs->cfg, seed, t, base + i - row * L);
            dst[i - fb] = kind == MPS_KIND_ADAM_V ? (v < 0 ? -v : v) : v;
        }
    }
}

static int gather(void *ctx, int worker, mps_kind kind, int t, const mps_box *box, int64_t fb, int64_t fe, float *dst,
                  mps_err *err)
{
    (void)worker;
    file_source *fs = ctx;
    if (fs->state && kind != MPS_KIND_PARAM)
        return mps_llmc_state_gather(fs->state, kind, t, box, fb, fe, dst, err);
    if (kind == MPS_KIND_ADAM_M || kind == MPS_KIND_ADAM_V) {
        if (fs->synthetic_optimizer)
            fill_synthetic(fs, kind, t, box, fb, fe, dst);
        else
            memset(dst, 0, (size_t)(fe - fb) * sizeof(float));
        return 0;
    }
    (void)err;
    mps_tensor_spec spec;
    mps_tensor_spec_get(fs->cfg, t, &spec);
    mps_box_extract(fs->slots[fs->slot_of[t]].data, &spec, box, fb, fe, dst);
    return 0;
}

/* The step in an llm.c model file name model_%08d.bin, or -1 when the name carries none. */
static int64_t llmc_name_step(const char *path)
{
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    size_t n = strlen(base);
    if (n < 11 || n > 28 || strncmp(base, "model_", 6) != 0 || strcmp(base + n - 4, ".bin") != 0)
        return -1;
    int64_t step = 0;
    for (const char *p = base + 6; p < base + n - 4; p++) {
        if (*p < '0' || *p > '9')
            return -1;
        step = step * 10 + (*p - '0');
    }
    return step;
}

/* Opens the llm.c state files of the model and takes the checkpoint's optimizer kinds and scalars from them. */
static int import_state(const char *input, const mps_model_file *file, const mps_shard_opts *o, mps_manifest *m,
                        mps_llmc_state **out, mps_err *err)
{
    if (o->synthetic_optimizer)
        return mps_fail(err, MPS_EUSAGE, "--state and --synthetic-optimizer exclude each other");
    if (mps_model_file_format(file) != MPS_FILE_LLMC)
        return mps_fail(err, MPS_EUSAGE, "--state: llm.c state files go with an llm.c model file, and %s is %s", input,
                        mps_file_format_name(mps_model_file_format(file)));
    if (mps_llmc_state_open(o->state_paths, o->nstate, mps_model_file_config(file), llmc_name_step(input), out,
                            err) != 0)
        return -1;
    const mps_llmc_state_header *h0 = mps_llmc_state_rank(*out, 0);
    m->step = h0->step;
    m->rng_seed = h0->rng_state;
    if (mps_llmc_state_has_master(*out)) {
        m->kinds |= 1u << MPS_KIND_MASTER;
        m->dtype[MPS_KIND_MASTER] = MPS_DTYPE_F32;
    }
    if (!(m->train_state_json = mps_llmc_state_json(*out)))
        return mps_fail(err, MPS_ENOMEM, "out of memory");
    return 0;
}

int mps_shard(const char *input, const mps_shard_opts *o, mps_err *err)
{
    mps_model_file *file;
    if (mps_model_file_open(input, &o->file, &file, err) != 0)
        return -1;
    mps_trace_event(o->trace, MPS_EV_INPUT_OPENED);
    const mps_config *cfg = mps_model_file_config(file);
    mps_layout layout;
    mps_manifest m;
    mps_stage st;
    mps_llmc_state *state = NULL;
    int rc = -1;
    if (mps_layout_parse(o->layout, cfg, &layout, err) != 0) {
        mps_model_file_close(file);
        return -1;
    }
    mps_manifest_init(&m, cfg, &layout);
    if (o->chunk_bytes > 0) {
        if (o->chunk_bytes < 4096 || o->chunk_bytes > MPS_MAX_CHUNK_BYTES) {
            mps_fail(err, MPS_EUSAGE, "--chunk-mb: chunk size must be between 4 KiB and 1 GiB");
            goto out;
        }
        m.chunk_bytes = o->chunk_bytes / 4 * 4;
    }
    if (o->level_set)
        m.zstd_level = o->zstd_level;
    snprintf(m.source_format, sizeof m.source_format, "%s", mps_file_format_name(mps_model_file_format(file)));
    m.source_dtype = mps_model_file_dtype(file);
    const char *hf = mps_model_file_hf_config(file);
    if (hf && !(m.hf_config_json = strdup(hf))) {
        mps_fail(err, MPS_ENOMEM, "out of memory");
        goto out;
    }
    if (o->weights_only && (o->nstate > 0 || o->synthetic_optimizer)) {
        mps_fail(err, MPS_EUSAGE, "--weights-only stores no optimizer state: it excludes %s",
                 o->nstate > 0 ? "--state" : "--synthetic-optimizer");
        goto out;
    }
    if (o->weights_only)
        m.kinds = 1u << MPS_KIND_PARAM;
    if (o->nstate > 0 && import_state(input, file, o, &m, &state, err) != 0)
        goto out;
    /* what this command reads must not be in the staging directory it may remove */
    const char **inputs = calloc((size_t)o->nstate + 3, sizeof *inputs);
    if (!inputs) {
        mps_fail(err, MPS_ENOMEM, "out of memory");
        goto out;
    }
    int ni = 0;
    inputs[ni++] = input;
    if (o->file.config_path)
        inputs[ni++] = o->file.config_path;
    for (int i = 0; i < o->nstate; i++)
        inputs[ni++] = o->state_paths[i];
    int staged = mps_stage_begin(o->out_dir, o->force, inputs, &st, err);
    free(inputs);
    if (staged != 0)
        goto out;
    st.trace = o->trace;
    mps_trace_event(o->trace, MPS_EV_STAGE_BEGUN);
    file_source fs = { .file = file, .cfg = cfg, .ntensors = mps_tensor_count(cfg),
                       .synthetic_optimizer = o->synthetic_optimizer, .seed = o->synthetic_seed, .state = state,
                       .tr = o->trace,
                       .want_readers = o->readers > 0 ? (o->readers < MAX_READERS ? o->readers : MAX_READERS) : READERS };
    mps_source src = { &fs, begin_tensor, end_tensor, gather };
    mps_write_opts wo = { .threads = o->threads, .quiet = o->quiet, .label = "shard", .trace = o->trace,
                         .stop = o->stop };
    int wrc = source_start(&fs, err) == 0 ? mps_write_shards(st.stage_dir, &m, NULL, 0, &src, &wo, err) : -1;
    mps_trace_event(o->trace, MPS_EV_WRITER_DONE);
    source_stop(&fs);
    mps_trace_event(o->trace, MPS_EV_SOURCE_STOPPED);
    if (wrc != 0 || mps_stage_commit(&st, &m, err) != 0) {
        mps_stage_abort(&st);
        goto out;
    }
    rc = 0;
out:
    mps_llmc_state_close(state);
    mps_manifest_free(&m);
    mps_model_file_close(file);
    return rc;
}
