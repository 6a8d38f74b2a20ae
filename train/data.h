/* Training data: llm.c token files (header of 256 int32: magic 20240520, version, token count;
 * then the tokens: uint16 in version 1, uint32 in version 2, which llm.c writes for Llama 3). Sequence j of a file is its tokens [j*T, j*T + T] (T inputs and the T
 * shifted targets). A set of files (a glob pattern, as llm.c's fineweb_train_*.bin shards) is
 * one stream: the sequences of the files in name order, none crossing from one file into the
 * next; the stream repeats when exhausted. The order is a function of the files and T only, so
 * every layout sees the same batches. */
#ifndef MPS_DATA_H
#define MPS_DATA_H

#include <stdint.h>

#include "err.h"

typedef struct mps_tokens mps_tokens;

/* Opens a token file, or every file a glob pattern (*, ?, [) matches, and checks each header
 * against the file's size; vocab: ids must be below it. */
int mps_tokens_open(const char *path, int T, int64_t vocab, mps_tokens **out, mps_err *err);
int64_t mps_tokens_sequences(const mps_tokens *d); /* distinct sequences before the stream repeats */
/* Reads sequence `seq` (any non-negative index: taken modulo the sequence count) into inputs (T)
 * and targets (T); an id >= vocab is an error naming the file and position. Thread-safe. */
int mps_tokens_read(const mps_tokens *d, int64_t seq, int32_t *inputs, int32_t *targets, mps_err *err);
void mps_tokens_close(mps_tokens *d);
/* Writes a token file of n tokens: a deterministic, learnable synthetic text (demo and tests);
 * version 2 (uint32) when vocab exceeds 65535. */
int mps_tokens_write_synthetic(const char *path, int64_t n, int64_t vocab, uint64_t seed, mps_err *err);

#endif
