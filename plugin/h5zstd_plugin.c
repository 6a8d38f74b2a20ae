/* HDF5 dynamic filter plugin for zstd (filter id 32015): put the directory holding this
 * library on HDF5_PLUGIN_PATH and h5dump, h5py, ... read mpshard's shards. */
#include <H5PLextern.h>

#include "zstd_filter.h"

H5PL_type_t H5PLget_plugin_type(void) { return H5PL_TYPE_FILTER; }
const void *H5PLget_plugin_info(void) { return &mps_zstd_filter_class; }
