/* The HDF5 zstd filter (id 32015, cd_values[0] = level), used in-process and by the plugin. */
#ifndef MPS_ZSTD_FILTER_H
#define MPS_ZSTD_FILTER_H
#include <hdf5.h>
extern const H5Z_class2_t mps_zstd_filter_class;
/* Registers the filter with the HDF5 library of this process (idempotent). 0 on success. */
int mps_zstd_filter_register(void);
#endif
