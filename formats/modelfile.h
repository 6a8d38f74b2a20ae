/* Full (unsharded) GPT-2 model files: Hugging Face safetensors and llm.c .bin.
 * Readers give canonical tensors in f32; writers take a byte stream in file order. */
#ifndef MPS_MODELFILE_H
#define MPS_MODELFILE_H

#include <stdint.h>
#include <stdio.h>

#include "err.h"
#include "model.h"
#include "trace.h"

typedef enum { MPS_FILE_AUTO = 0, MPS_FILE_SAFETENSORS, MPS_FILE_LLMC } mps_file_format;
const char *mps_file_format_name(mps_file_format f); /* "safetensors", "llmc" */
int mps_file_format_from_name(const char *name);     /* -1 if unknown */

/* ---- reading ---- */
typedef struct mps_model_file mps_model_file;

typedef struct {
    mps_file_format format;  /* MPS_FILE_AUTO: detected from the file's first bytes */
    const char *config_path; /* HF config.json; NULL: config.json beside the input file */
    int64_t padded_vocab;    /* 0: default (safetensors: vocab rounded up to 128; llm.c: the file's Vp) */
} mps_model_file_opts;

/* Opens and validates the whole file structure (header, every size and offset, config options)
 * before returning; no tensor data is read yet. Errors name the file and the key/field. */
int mps_model_file_open(const char *path, const mps_model_file_opts *opts, mps_model_file **out, mps_err *err);
const mps_config *mps_model_file_config(const mps_model_file *f);
mps_file_format mps_model_file_format(const mps_model_file *f);
mps_dtype mps_model_file_dtype(const mps_model_file *f); /* dtype of the stored parameters */
/* The original config.json text of a safetensors input (kept in the checkpoint so that export
 * writes it back), or NULL. */
const char *mps_model_file_hf_config(const mps_model_file *f);
/* Reads canonical tensor `index` (shape from mps_tensor_spec_get; wte rows vocab..padded_vocab-1
 * are zero unless the file stores them) as f32 into dst (numel floats). */
int mps_model_file_read_tensor(mps_model_file *f, int index, float *dst, mps_err *err);
/* The same; adds the time spent in pread(2) and the bytes read to *io when io is not NULL (MPS_TRACE). */
int mps_model_file_read_tensor_io(mps_model_file *f, int index, float *dst, mps_tacc *io, mps_err *err);
void mps_model_file_close(mps_model_file *f);

/* ---- writing ---- */
/* One item of an output file, in file order: a canonical tensor, possibly transposed and cut. */
typedef struct {
    int tensor;       /* canonical tensor index */
    int transpose;    /* 1: the file stores the canonical (rows, cols) matrix as (cols, rows); for
                       * qkvw the canonical (3, C, C) is taken as (3C, C) first (HF Conv1D layout) */
    int64_t rows;     /* leading canonical rows written: vocab for wte in safetensors, else shape[0] */
} mps_out_item;

typedef struct mps_out_file mps_out_file;

/* Creates DIR (if missing) and DIR/model.safetensors under a temporary name, or, when the tensors
 * exceed max_shard_bytes (> 0), DIR/model-0000k-of-0000n.safetensors and the index
 * model.safetensors.index.json, as transformers' save_pretrained writes them (GPT-2: transformers
 * 5.x naming, "transformer."-prefixed keys, no lm_head). config.json is written by finish:
 * hf_config_json (the original text, its model fields checked against cfg) or one generated from
 * cfg when NULL; the index last. dtype: f32, bf16 or f16. */
int mps_safetensors_create(const char *dir, const mps_config *cfg, mps_dtype dtype, const char *hf_config_json,
                           int64_t max_shard_bytes, mps_out_file **out, mps_err *err);
/* Creates DIR/model_%08d.bin (step) under a temporary name and writes the llm.c header
 * (magic 20240326, version 3 for f32, 5 for bf16, padded vocab). */
int mps_llmc_create(const char *dir, const mps_config *cfg, mps_dtype dtype, int64_t step,
                    mps_out_file **out, mps_err *err);
void mps_out_file_items(const mps_out_file *f, const mps_out_item **items, int *count);
mps_dtype mps_out_file_dtype(const mps_out_file *f);
/* Appends raw little-endian element bytes in file order. */
int mps_out_file_write(mps_out_file *f, const void *data, size_t nbytes, mps_err *err);
/* Checks every byte was written, fsyncs, renames into place, fsyncs the directory. Frees f. */
int mps_out_file_finish(mps_out_file *f, mps_err *err);
/* Removes the temporary file(s). Frees f. */
void mps_out_file_abort(mps_out_file *f);
/* Final path of the model file (DIR/model.safetensors or DIR/model_%08d.bin). */
const char *mps_out_file_path(const mps_out_file *f);

/* ---- synthetic models (demo, tests, benchmarks) ---- */
/* Deterministic value of canonical element `flat` of tensor `index` for `seed`: N(0, 0.02)-like
 * for weights, near 1 for layernorm weights, small for biases, 0 for padded vocab rows. */
float mps_synth_value(const mps_config *cfg, uint64_t seed, int index, int64_t flat);
/* Writes a whole synthetic model file in the given format and dtype (safetensors: plus config.json). */
int mps_synth_write(const char *dir, const mps_config *cfg, mps_file_format format, mps_dtype dtype,
                    uint64_t seed, mps_err *err);
/* The same; a safetensors model larger than max_shard_bytes (> 0) is written as several files and
 * an index, as transformers' save_pretrained(max_shard_size=...) does. */
int mps_synth_write_sharded(const char *dir, const mps_config *cfg, mps_file_format format, mps_dtype dtype,
                            uint64_t seed, int64_t max_shard_bytes, mps_err *err);
/* The same, adding the bytes written to progress (progress.h; NULL: none) after setting its total. */
struct mps_progress;
int mps_synth_write_progress(const char *dir, const mps_config *cfg, mps_file_format format, mps_dtype dtype,
                             uint64_t seed, int64_t max_shard_bytes, struct mps_progress *progress, mps_err *err);

#endif
