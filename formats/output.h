/* Outputs that are single files (model files, config.json, token files): a writer never replaces
 * one that is already there unless the user passed --force. */
#ifndef MPS_OUTPUT_H
#define MPS_OUTPUT_H

#include <stdint.h>

#include "err.h"
#include "modelfile.h"

/* Fails (MPS_EUSAGE, naming path and --force) when anything exists at path (a dangling link too);
 * 0 when nothing is there. */
int mps_output_refuse_existing(const char *path, mps_err *err);
/* The same for every file a model-file writer of `format` puts into dir: model.safetensors (or the
 * parts model-0000k-of-0000n.safetensors and model.safetensors.index.json) and config.json, or
 * model_<step>.bin. */
int mps_output_refuse_model_files(const char *dir, mps_file_format format, int64_t step, mps_err *err);

#endif
