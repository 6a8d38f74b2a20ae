#include "h5util.h"

#include <string.h>
#include <sys/stat.h>

#include "zstd_filter.h"

int mps_h5_init(mps_err *err)
{
    if (mps_zstd_filter_register() != 0)
        return mps_fail(err, MPS_EFAIL, "cannot register the zstd HDF5 filter (id 32015)");
    return 0;
}

hid_t mps_h5_create_file(const char *path, hid_t base_fapl, mps_err *err)
{
    hid_t fapl = base_fapl == H5P_DEFAULT ? H5Pcreate(H5P_FILE_ACCESS) : H5Pcopy(base_fapl);
    /* v1.8 object headers: attributes larger than 64 KiB (per-chunk checksums) go to dense storage */
    H5Pset_libver_bounds(fapl, H5F_LIBVER_V18, H5F_LIBVER_V18);
    hid_t f = H5Fcreate(path, H5F_ACC_EXCL, H5P_DEFAULT, fapl);
    H5Pclose(fapl);
    if (f < 0)
        mps_fail(err, MPS_EIO, "%s: cannot create HDF5 file", path);
    return f;
}

hid_t mps_h5_open_file(const char *path, mps_err *err)
{
    /* HDF5 opens without O_NONBLOCK: a FIFO in place of a shard would block it forever */
    struct stat st;
    if (stat(path, &st) == 0 && !S_ISREG(st.st_mode)) {
        mps_fail(err, MPS_ECORRUPT, "%s: not a regular file", path);
        return -1;
    }
    htri_t is = H5Fis_hdf5(path);
    if (is <= 0) {
        mps_fail(err, MPS_ECORRUPT, "%s: missing, unreadable or not an HDF5 file", path);
        return -1;
    }
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0)
        mps_fail(err, MPS_ECORRUPT, "%s: cannot open HDF5 file (damaged?)", path);
    return f;
}

int mps_h5_attr_str(hid_t obj, const char *name, const char *value)
{
    hid_t type = H5Tcopy(H5T_C_S1);
    H5Tset_size(type, strlen(value) + 1);
    H5Tset_strpad(type, H5T_STR_NULLTERM);
    hid_t space = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(obj, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
    herr_t rc = a < 0 ? -1 : H5Awrite(a, type, value);
    if (a >= 0) H5Aclose(a);
    H5Sclose(space);
    H5Tclose(type);
    return rc < 0 ? -1 : 0;
}

static int attr_array(hid_t obj, const char *name, hid_t file_type, hid_t mem_type, const void *values, int64_t n)
{
    hsize_t dims[1] = { (hsize_t)n };
    hid_t space = n > 0 ? H5Screate_simple(1, dims, NULL) : H5Screate(H5S_NULL);
    hid_t a = H5Acreate2(obj, name, file_type, space, H5P_DEFAULT, H5P_DEFAULT);
    herr_t rc = a < 0 ? -1 : (n > 0 ? H5Awrite(a, mem_type, values) : 0);
    if (a >= 0) H5Aclose(a);
    H5Sclose(space);
    return rc < 0 ? -1 : 0;
}

int mps_h5_attr_i64(hid_t obj, const char *name, const int64_t *values, int n)
{
    return attr_array(obj, name, H5T_STD_I64LE, H5T_NATIVE_INT64, values, n);
}

int mps_h5_attr_u64(hid_t obj, const char *name, const uint64_t *values, int64_t n)
{
    return attr_array(obj, name, H5T_STD_U64LE, H5T_NATIVE_UINT64, values, n);
}

int mps_h5_read_attr_str(hid_t obj, const char *name, char *buf, size_t size)
{
    if (H5Aexists(obj, name) <= 0)
        return -1;
    hid_t a = H5Aopen(obj, name, H5P_DEFAULT);
    if (a < 0)
        return -1;
    hid_t type = H5Aget_type(a);
    int rc = -1;
    if (H5Tget_class(type) == H5T_STRING && !H5Tis_variable_str(type)) {
        size_t len = H5Tget_size(type);
        hid_t space = H5Aget_space(a);
        if (len > 0 && len < size && H5Sget_simple_extent_type(space) == H5S_SCALAR) {
            hid_t mem = H5Tcopy(H5T_C_S1);
            H5Tset_size(mem, len);
            if (H5Aread(a, mem, buf) >= 0) {
                buf[len] = '\0';
                rc = 0;
            }
            H5Tclose(mem);
        }
        H5Sclose(space);
    }
    H5Tclose(type);
    H5Aclose(a);
    return rc;
}

static int read_array(hid_t obj, const char *name, hid_t mem_type, void *values, int64_t n)
{
    if (H5Aexists(obj, name) <= 0)
        return -1;
    hid_t a = H5Aopen(obj, name, H5P_DEFAULT);
    if (a < 0)
        return -1;
    hid_t type = H5Aget_type(a), space = H5Aget_space(a);
    int rc = -1;
    hssize_t npoints = H5Sget_simple_extent_npoints(space);
    if (H5Tget_class(type) == H5T_INTEGER && H5Tget_size(type) == 8) {
        if (n == 0 && H5Sget_simple_extent_type(space) == H5S_NULL)
            rc = 0;
        else if (H5Sget_simple_extent_ndims(space) == 1 && npoints == n && H5Aread(a, mem_type, values) >= 0)
            rc = 0;
    }
    H5Sclose(space);
    H5Tclose(type);
    H5Aclose(a);
    return rc;
}

int mps_h5_read_attr_i64(hid_t obj, const char *name, int64_t *values, int64_t n)
{
    return read_array(obj, name, H5T_NATIVE_INT64, values, n);
}

int mps_h5_read_attr_u64(hid_t obj, const char *name, uint64_t *values, int64_t n)
{
    return read_array(obj, name, H5T_NATIVE_UINT64, values, n);
}
