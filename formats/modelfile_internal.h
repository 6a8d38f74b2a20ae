/* Internal declarations shared by modelfile.c, safetensors.c, llmc.c and synth.c. */
#ifndef MPS_MODELFILE_INTERNAL_H
#define MPS_MODELFILE_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "arch.h"
#include "modelfile.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "mpshard model files are little-endian; this host is not"
#endif

/* Element types a source tensor may be stored in. */
enum { MPS_SRC_F32 = 0, MPS_SRC_BF16 = 1, MPS_SRC_F16 = 2 };
size_t mps_src_dtype_size(int src_dtype);

/* Where the bytes of one canonical tensor lie in the input file. */
typedef struct {
    char key[96];     /* name in the file, for messages */
    int file;         /* which of the model's files (mps_model_file.parts) holds it */
    int64_t offset;   /* absolute file offset of the first byte */
    int dtype;        /* MPS_SRC_* */
    int64_t numel;    /* elements stored; canonical elements numel.. read as zero (wte padding) */
    int transpose;    /* 1: stored as a (tk, tr) matrix, canonical is (tr, tk): canonical[r][k] = file[k][r] */
    int64_t tk, tr;
} mps_src;

/* An input file of a model stored in several (a sharded safetensors model). */
typedef struct {
    char *path;
    int fd;
} mps_in_part;

struct mps_model_file {
    mps_file_format format;
    char *path;       /* the file named (the index of a sharded model) */
    int fd;           /* its descriptor; parts[0] of a single-file model */
    mps_in_part *parts; /* the files holding tensors (parts[0] is path/fd for a single file) */
    int nparts;
    int64_t file_size;
    mps_config cfg;
    mps_dtype dtype;
    char *hf_config;  /* safetensors: original config.json text */
    mps_src *src;     /* one per canonical tensor */
    int nsrc;
    int has_tied;     /* safetensors: lm_head.weight stored apart from wte; compared when wte is read */
    mps_src tied;
};

/* config.json (hf_config.c): parse (padded_vocab left 0; unsupported options refused by name),
 * generate for a config (dtype: torch_dtype of a Llama-family config), check a given text
 * against a config. */
int mps_hf_config_parse(json_t *root, const char *name, mps_config *cfg, mps_err *err);
char *mps_hf_config_generate(const mps_config *cfg, mps_dtype dtype);
int mps_hf_config_check(const char *text, const mps_config *cfg, mps_err *err);
/* The rope_scaling object of a config (null without scaling), its type under `type_key`: config.json
 * says "rope_type", the manifest "type" (FORMAT.md). */
json_t *mps_rope_scaling_json(const mps_config *cfg, const char *type_key);

/* parts[] of a model whose one file (f->path, f->fd) holds every tensor. */
int mps_model_file_single_part(mps_model_file *f, mps_err *err);

/* Format readers: fill f (path, fd, file_size already set). */
int mps_safetensors_open(mps_model_file *f, const mps_model_file_opts *opts, mps_err *err);
int mps_llmc_open(mps_model_file *f, const mps_model_file_opts *opts, mps_err *err);

/* pread exactly n bytes at off; short file -> MPS_ECORRUPT naming path, OS error -> MPS_EIO. */
int mps_pread_full(int fd, const char *path, void *buf, size_t n, int64_t off, mps_err *err);
/* Writes a whole small file atomically: PATH.tmp, fsync, rename. */
int mps_write_file_atomic(const char *path, const void *data, size_t n, mps_err *err);
/* mkdir -p. */
int mps_mkdir_p(const char *dir, mps_err *err);

/* Writers: mps_out_file_begin creates DIR/NAME.tmp for `total_bytes` bytes (header included)
 * and takes ownership of items (malloc'd). extra_name/extra_text (may be NULL): a small file
 * DIR/extra_name written atomically by finish (safetensors: config.json); extra_text is taken. */
int mps_out_file_begin(const char *dir, const char *name, mps_dtype dtype, mps_out_item *items, int nitems,
                       int64_t total_bytes, const char *extra_name, char *extra_text, mps_out_file **out,
                       mps_err *err);
/* One file of a multi-file output: its name in DIR, its header (malloc'd, taken; written by the
 * writer when it reaches the file) and its size with the header. */
typedef struct {
    const char *name;
    unsigned char *header;
    size_t header_len;
    int64_t total_bytes;
} mps_out_part_spec;
/* The same for an output of several files, written in order: mps_out_file_write takes the tensor
 * data of all of them as one stream. extra_name[0] (config.json) is written before the files are
 * renamed into place, extra_name[1] (the index naming them) after; either may be NULL. Texts, headers
 * and items are taken, also on failure. */
int mps_out_file_begin_parts(const char *dir, const mps_out_part_spec *specs, int nparts, mps_dtype dtype,
                             mps_out_item *items, int nitems, const char *const extra_name[2], char *extra_text[2],
                             mps_out_file **out, mps_err *err);
/* Bytes of item `it` in the file (rows * numel/shape[0] * dtype size). */
int64_t mps_out_item_bytes(const mps_config *cfg, const mps_out_item *it, mps_dtype dtype);

#endif
