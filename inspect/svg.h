/* A stacked bar chart of a plan: one bar per rank, one segment per state kind and the
 * activations, a labelled y axis in GB (or GiB), a legend and the GPU memory budget as a line. */
#ifndef MPS_INSPECT_SVG_H
#define MPS_INSPECT_SVG_H

#include <stdint.h>

#include "err.h"
#include "inspect/plan.h"

typedef struct {
    const char *title;  /* first line above the chart (model and layout, say) */
    int64_t gpu_mem;    /* bytes; 0: no budget line */
    const char *gpu_mem_label; /* the budget as the user gave it ("80 GiB"); NULL: gpu_mem in the axis unit */
    int binary_units;   /* 1: GiB axis, 0: GB */
} mps_svg_opts;

/* Writes the chart to path (a standalone SVG 1.1 file that browsers display). */
int mps_svg_write_plan(const char *path, const mps_plan *plan, const mps_svg_opts *opts, mps_err *err);

#endif
