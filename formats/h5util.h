/* Small HDF5 helpers: attributes, file creation/opening with the project's settings. */
#ifndef MPS_H5UTIL_H
#define MPS_H5UTIL_H
#include <hdf5.h>
#include <stdint.h>

#include "err.h"

/* Registers the zstd filter in this process. */
int mps_h5_init(mps_err *err);
/* Creates path (it must not exist) with the project's settings on top of base_fapl (H5P_DEFAULT,
 * or a file-access list that chooses a driver; it is copied, not changed). */
hid_t mps_h5_create_file(const char *path, hid_t base_fapl, mps_err *err);
/* Opens path read-only with the project's settings; a FIFO or another non-regular file there is
 * refused without blocking. */
hid_t mps_h5_open_file(const char *path, mps_err *err);
/* The same for the file a caller already opened as fd (path: its name, for messages): HDF5 opens
 * that very file even if path has been replaced since (h5util.c). fd stays the caller's. */
hid_t mps_h5_open_fd(int fd, const char *path, mps_err *err);
/* Checks that the last link of `name` (relative to loc) is a hard link to an object of `type`
 * (H5O_TYPE_GROUP or H5O_TYPE_DATASET), without resolving a soft, external or user-defined link:
 * those are refused by name ("PATH: dataset NAME is an external link: refused (...)"). The links
 * above it must have been checked the same way: HDF5 follows them. info, if not NULL, gets the
 * object's basic info. Fails with one line naming `path` (the file, for the message) and `name`. */
int mps_h5_hard_link(hid_t loc, const char *name, H5O_type_t type, H5O_info_t *info, const char *path, mps_err *err);
/* Opens dataset `name` of a file opened by mps_h5_open_file: its last link must be a hard link
 * (mps_h5_hard_link; the groups above it are the caller's to check), and the file's bytes must show
 * that HDF5 will not decode anything outside the dataset's object header to open it: a virtual
 * dataset or one with external storage is refused (its data is in other files, and decoding its
 * layout can hang libhdf5: h5util.c). Fails with one line naming `path` and the dataset. */
hid_t mps_h5_open_dataset(hid_t loc, const char *name, const char *path, mps_err *err);
/* Checks that dataset d (named `name` in file `path`) is bound to `tensor` and `kind` by its
 * attributes of those names: a dataset of another tensor or kind hard-linked or swapped in place of
 * this one, of the same shape, would pass every other check. */
int mps_h5_check_tensor(hid_t d, const char *name, const char *tensor, const char *kind, const char *path,
                        mps_err *err);
int mps_h5_attr_str(hid_t obj, const char *name, const char *value);
int mps_h5_attr_i64(hid_t obj, const char *name, const int64_t *values, int n);
int mps_h5_attr_u64(hid_t obj, const char *name, const uint64_t *values, int64_t n);
/* Reads a string attribute into buf (fails if missing, not a string or too long). */
int mps_h5_read_attr_str(hid_t obj, const char *name, char *buf, size_t size);
/* Reads an integer array attribute of exactly n elements (fails otherwise). */
int mps_h5_read_attr_i64(hid_t obj, const char *name, int64_t *values, int64_t n);
int mps_h5_read_attr_u64(hid_t obj, const char *name, uint64_t *values, int64_t n);
#endif
