/* compare: two checkpoints (any layouts: every kind both store, and the scalar state), two model
 * files, or a checkpoint's parameters against a model file; bit for bit, or within a tolerance. */
#ifndef MPS_COMPARE_H
#define MPS_COMPARE_H

#include <stdint.h>

#include "err.h"

typedef enum { MPS_COMPARE_CKPTS, MPS_COMPARE_MODELS, MPS_COMPARE_CKPT_MODEL } mps_compare_what;

typedef struct {
    int tolerance;          /* 1: a within b when |a - b| <= atol + rtol * |b| (B is the reference); 0: bit for bit */
    double rtol, atol;
    int per_tensor;         /* report every tensor's errors, not only the tensors that differ */
    int64_t budget;         /* bytes of checkpoint data held at once; 0: 256 MiB (a model file's tensor is read whole) */
    void (*report)(void *ctx, const char *line); /* one line per difference */
    void *ctx;
} mps_compare_opts;

typedef struct {
    mps_compare_what what;
    int shapes_differ;      /* the models differ in shape: nothing else was compared */
    int state_differs;      /* checkpoints: the scalar state or the stored kinds differ */
    int tensors, tensors_differ;        /* (tensor, kind) pairs compared, and outside tolerance / not identical */
    int64_t elements, elements_differ;  /* compared: padded vocab rows only where both sides store them */
    double max_abs, max_rel;            /* over every element (max_rel: |a - b| / |b|) */
    char max_abs_at[80], max_rel_at[80];  /* "h.0.qkvw (param)", "" when the maximum is 0 */
} mps_compare_result;

/* Each of a and b is a checkpoint (or a run directory), a model file, or a directory holding
 * model.safetensors. Returns 0 when equal (or within tolerance), 1 when not, -1 on error. */
int mps_compare(const char *a, const char *b, const mps_compare_opts *o, mps_compare_result *res, mps_err *err);

#endif
