/* llm.c optimizer-state files: state_%08d_%05d.bin, one per training process (karpathy/llm.c
 * train_gpt2.cu save_state / load_state, llmc/zero.cuh multi_gpu_get_shard_offset).
 *
 * A file is a header of 256 int32 (1024 bytes): [0] magic 20240527, [1] version 1,
 * [2] num_processes, [3] process_rank, [4] use_master_weights, [5] should_shuffle, [10] step,
 * [20..21] rng_state (u64), [22..23] rng_state_last_update (u64), [30..31] current_shard_idx,
 * [32..33] current_sample_idx (size_t); then AdamW m, v and (use_master_weights) the fp32 master
 * weights, float32 arrays of shard_num_parameters each; then, when should_shuffle, the data
 * loader's permutation: gl_pathc (size_t), shard_indices (int32 x gl_pathc), shard_num_samples
 * (size_t), intra_shard_indices (int32 x shard_num_samples), shuffle_rng (mt19937_state, 2520 bytes).
 *
 * The arrays follow the 16 llm.c parameter tensors in model-file order (wte, wpe, ln1w, ..., lnfb;
 * layer tensors stacked (L, ...)). Without ZeRO every rank holds all num_parameters elements (the
 * same values on every rank). Under ZeRO-1 shard_num_parameters = num_parameters / N and rank r
 * holds, of every layer's copy of every tensor of S elements per layer, elements
 * [r*S/N, (r+1)*S/N); layer l of tensor i starts at offset(i)/N + l*S/N, offset(i) being the
 * stacked tensor's offset in the full parameter vector. In canonical terms: the rank's slice is
 * the flat range [r*S/N, (r+1)*S/N) of every canonical tensor, in llm.c file order. */
#ifndef MPS_LLMC_STATE_H
#define MPS_LLMC_STATE_H

#include <stdint.h>

#include "err.h"
#include "geometry.h"
#include "model.h"
#include "modelfile.h"

#define MPS_LLMC_STATE_MAGIC 20240527
#define MPS_LLMC_STATE_VERSION 1
#define MPS_LLMC_STATE_HEADER_BYTES 1024
#define MPS_LLMC_MT19937_BYTES 2520 /* sizeof(mt19937_state): u64 seed_, int left_, uint next_, uint state_[624], uint MATRIX_A[2] */
#define MPS_LLMC_MAX_PROCESSES 65536

/* The fields of one file's header. */
typedef struct {
    int num_processes, process_rank;
    int use_master_weights, should_shuffle;
    int64_t step;
    uint64_t rng_state, rng_state_last_update;
    uint64_t current_shard_idx, current_sample_idx;
} mps_llmc_state_header;

void mps_llmc_state_header_pack(const mps_llmc_state_header *h, int32_t out[256]);

/* Canonical tensors in llm.c file order: wte, wpe, then ln1w of every layer, ln1b of every layer,
 * ..., lnfw, lnfb. order has mps_tensor_count(cfg) entries. */
void mps_llmc_tensor_order(const mps_config *cfg, int *order);
/* 0 when every per-layer tensor size divides by `processes` (llm.c's ZeRO-1 asserts it);
 * otherwise an MPS_EUSAGE error naming the tensor. */
int mps_llmc_zero_check(const mps_config *cfg, int processes, mps_err *err);

/* ---- reading a set of state files ---- */
typedef struct mps_llmc_state mps_llmc_state;

/* Opens the N files of one checkpoint (any order) and checks each: magic, version, num_processes
 * equal to n, every rank present once, flags 0 or 1, the same step, master flag and shuffle flag in
 * every file (and the step equal to model_step unless it is -1), the size exactly what the header
 * implies for the model cfg, with ZeRO-1 slices or whole copies (the sizes tell which). Errors name
 * the file and the field. */
int mps_llmc_state_open(const char *const *paths, int n, const mps_config *cfg, int64_t model_step,
                        mps_llmc_state **out, mps_err *err);
void mps_llmc_state_close(mps_llmc_state *s);
int mps_llmc_state_processes(const mps_llmc_state *s);
int mps_llmc_state_zero(const mps_llmc_state *s);        /* 1: ZeRO-1 slices; 0: whole copies */
int mps_llmc_state_has_master(const mps_llmc_state *s);
/* Header of rank r's file. */
const mps_llmc_state_header *mps_llmc_state_rank(const mps_llmc_state *s, int rank);
/* The manifest's train_state_json for the files: {"llmc": {...}} (FORMAT.md), malloc'd; NULL if
 * out of memory. */
char *mps_llmc_state_json(const mps_llmc_state *s);
/* Fills dst with elements [fb, fe) (row-major within box) of canonical tensor `tensor` of kind
 * adam_m, adam_v or master, read with pread from the files (thread-safe). */
int mps_llmc_state_gather(mps_llmc_state *s, mps_kind kind, int tensor, const mps_box *box, int64_t fb, int64_t fe,
                          float *dst, mps_err *err);

/* ---- writing ---- */
/* Per-rank header values for an export to `processes` ranks, from a checkpoint's train_state_json
 * (may be NULL): rank r takes the "llmc" record of source rank r mod N; without one, llm.c's fresh
 * values (rng_state 13371337 + r, data position: start of the data). step, num_processes,
 * process_rank, use_master_weights are set from the arguments; should_shuffle is always 0 (the
 * permutation depends on the process count and is not kept). hdr has `processes` entries. */
int mps_llmc_state_headers(const char *train_state_json, int64_t step, int processes, int use_master_weights,
                           mps_llmc_state_header *hdr, mps_err *err);
/* Creates DIR/state_<step>_<rank>.bin under a temporary name for (2 + use_master_weights) arrays
 * of shard_numel floats and writes the header; the caller appends m, v, master in file order
 * (mps_out_file_write) and commits with mps_out_file_finish (fsync, rename). */
int mps_llmc_state_create(const char *dir, const mps_llmc_state_header *h, int64_t shard_numel, mps_out_file **out,
                          mps_err *err);
/* "state_%08d_%05d.bin" / "DONE_%08d" */
void mps_llmc_state_name(int64_t step, int rank, char *buf, size_t size);
void mps_llmc_done_name(int64_t step, char *buf, size_t size);
/* Removes DIR/DONE_<step> if present (before the files it vouches for are replaced). */
int mps_llmc_done_remove(const char *dir, int64_t step, mps_err *err);
/* Removes DIR/state_<step>_<rank>.bin files of ranks >= processes (left by an export with more
 * processes: they would not belong to the new checkpoint). */
int mps_llmc_state_remove_extra(const char *dir, int64_t step, int processes, mps_err *err);
/* Writes the empty DIR/DONE_<step> atomically (tmp, fsync, rename, fsync the directory). */
int mps_llmc_done_write(const char *dir, int64_t step, mps_err *err);

#endif
