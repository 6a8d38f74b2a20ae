#include "h5util.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

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

/* HDF5 opens files by name, without O_NONBLOCK: a FIFO put in place of the file between the
 * caller's checks and HDF5's open would block that open forever, and another file put there would
 * be read instead. So HDF5 is given this process's /proc/self/fd entry of the descriptor the caller
 * already checked: opening it opens that same file, whatever the name now points to. (HDF5 then
 * resolves the entry to a path for its external links; once the file's name has been replaced that
 * fails, and the open is reported as a replacement.) Where there is no /proc (not mounted, or it
 * shows another file), the name itself is used, once it still names the descriptor's file: the
 * window left is between that check and HDF5's open. */
static int same_file(const char *name, const struct stat *st)
{
    struct stat now;
    return stat(name, &now) == 0 && now.st_ino == st->st_ino && now.st_dev == st->st_dev;
}

hid_t mps_h5_open_fd(int fd, const char *path, mps_err *err)
{
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        mps_fail(err, MPS_ECORRUPT, "%s: not a regular file", path);
        return -1;
    }
    char via[64];
    snprintf(via, sizeof via, "/proc/self/fd/%d", fd);
    const char *name = same_file(via, &st) ? via : path;
    hid_t f = -1;
    int is_hdf5 = 0;
    if (name == via || same_file(path, &st)) {
        if ((is_hdf5 = H5Fis_hdf5(name) > 0)) {
            /* sec2 named (HDF5's default): mps_h5_open_dataset reads object headers through its descriptor */
            hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
            f = fapl >= 0 && H5Pset_fapl_sec2(fapl) >= 0 ? H5Fopen(name, H5F_ACC_RDONLY, fapl) : -1;
            if (fapl >= 0)
                H5Pclose(fapl);
            if (f >= 0)
                return f;
        }
    }
    if (!same_file(path, &st))
        mps_fail(err, MPS_ECORRUPT, "%s: replaced while being opened (another process rewrote the checkpoint)", path);
    else if (!is_hdf5)
        mps_fail(err, MPS_ECORRUPT, "%s: unreadable or not an HDF5 file", path);
    else
        mps_fail(err, MPS_ECORRUPT, "%s: cannot open HDF5 file (damaged?)", path);
    return -1;
}

hid_t mps_h5_open_file(const char *path, mps_err *err)
{
    /* O_NONBLOCK: a FIFO at path must not block this open either */
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        mps_fail(err, MPS_ECORRUPT, "%s: %s", path, errno == ENOENT ? "missing" : strerror(errno));
        return -1;
    }
    hid_t f = mps_h5_open_fd(fd, path, err);
    close(fd); /* (HDF5 has its own descriptor) */
    return f;
}

/* ---- Opening a dataset of an untrusted file ----
 * H5Dopen2 decodes the dataset's layout message, and a virtual dataset's layout keeps its mappings
 * in a global heap collection of the file. libhdf5 1.10 decodes a collection by stepping from
 * object to object by their recorded sizes (H5HG__cache_heap_deserialize) and never moves past a
 * free-space object of size 0: a damaged collection hangs the open inside the library, before the
 * caller could see that the dataset is virtual. An external file list is likewise decoded, from a
 * local heap, by the open. A shard file holds neither, so the dataset's object header is walked
 * from the file's bytes first (format specification, "Data Object Headers": both header versions
 * and their continuation chunks) and such a dataset refused before HDF5 decodes any of it. Only
 * message types, message sizes, continuations and the layout's version and class are read; every
 * size is checked against its chunk and every address against the file. */

enum { OH_MSG_EFL = 0x07, OH_MSG_LAYOUT = 0x08, OH_MSG_CONT = 0x10, OH_LAYOUT_VIRTUAL = 3 };
/* Bounds on one header: the writer's have a chunk or two of a few KiB (attributes above 64 KiB
 * go to dense storage); a cycle of continuation chunks ends at the first bound. */
#define OH_MAX_CHUNKS 256
#define OH_MAX_BYTES ((uint64_t)64 << 20)

typedef struct {
    int fd;
    uint64_t base, space; /* file offset of address 0, and the bytes from there to the end */
    unsigned sizeof_addr, sizeof_size;
    int v2, crt_order;    /* header version 2; its message headers carry a creation order */
    uint64_t addr[OH_MAX_CHUNKS], len[OH_MAX_CHUNKS]; /* chunk 0: its messages; the others whole */
    int nchunks;
    uint64_t bytes;       /* of all chunks queued */
    int virtual_layout, external;
} oh_walk;

static uint64_t oh_le(const uint8_t *p, unsigned n)
{
    uint64_t v = 0;
    for (unsigned i = n; i-- > 0;)
        v = v << 8 | p[i];
    return v;
}

static int oh_read(const oh_walk *w, uint64_t addr, void *buf, uint64_t n)
{
    if (addr > w->space || n > w->space - addr)
        return -1;
    return pread(w->fd, buf, (size_t)n, (off_t)(w->base + addr)) == (ssize_t)n ? 0 : -1;
}

static const char *oh_add_chunk(oh_walk *w, uint64_t addr, uint64_t len)
{
    if (w->nchunks == OH_MAX_CHUNKS)
        return "more than 256 chunks";
    if (len > OH_MAX_BYTES - w->bytes)
        return "larger than 64 MiB";
    w->bytes += len;
    w->addr[w->nchunks] = addr;
    w->len[w->nchunks] = len;
    w->nchunks++;
    return NULL;
}

/* The n bytes of messages of one chunk; NULL, or why the header is refused. */
static const char *oh_messages(oh_walk *w, const uint8_t *p, uint64_t n)
{
    uint64_t head = w->v2 ? (w->crt_order ? 6 : 4) : 8, pos = 0;
    while (n - pos >= head) { /* less than a message header left is a gap (version 2) */
        unsigned type = w->v2 ? p[pos] : (unsigned)oh_le(p + pos, 2);
        uint64_t size = oh_le(p + pos + (w->v2 ? 1 : 2), 2);
        pos += head;
        if (size > n - pos)
            return "a message runs past its chunk";
        const uint8_t *body = p + pos;
        pos += size;
        if (type == OH_MSG_EFL) {
            w->external = 1;
        } else if (type == OH_MSG_LAYOUT) {
            /* versions 1 and 2: version, rank, class; versions 3 and 4: version, class */
            if (size < 3 || body[0] < 1 || body[0] > 4)
                return "a layout message of unknown version";
            if (body[body[0] >= 3 ? 1 : 2] == OH_LAYOUT_VIRTUAL)
                w->virtual_layout = 1;
        } else if (type == OH_MSG_CONT) {
            if (size < w->sizeof_addr + w->sizeof_size)
                return "a continuation message too short";
            uint64_t addr = oh_le(body, w->sizeof_addr), len = oh_le(body + w->sizeof_addr, w->sizeof_size);
            const char *why = oh_add_chunk(w, addr, len);
            if (why)
                return why;
        }
    }
    return NULL;
}

/* Walks the object header at addr: NULL, or why it is refused. */
static const char *oh_walk_header(oh_walk *w, uint64_t addr)
{
    uint8_t pre[34]; /* the longest prefix: version 2 with times, attribute bounds, 8-byte size */
    if (oh_read(w, addr, pre, 6) != 0)
        return "past the end of the file";
    uint64_t prefix, size0;
    if (memcmp(pre, "OHDR", 4) == 0) {
        if (pre[4] != 2)
            return "unknown version";
        unsigned flags = pre[5], size_bytes = 1u << (flags & 3);
        w->v2 = 1;
        w->crt_order = (flags & 0x04) != 0;
        prefix = 6 + ((flags & 0x20) ? 16 : 0) + ((flags & 0x10) ? 4 : 0) + size_bytes;
        if (oh_read(w, addr, pre, prefix) != 0)
            return "past the end of the file";
        size0 = oh_le(pre + prefix - size_bytes, size_bytes);
    } else {
        /* version 1: version, reserved, message count, reference count, chunk size, padding */
        if (pre[0] != 1)
            return "unknown version";
        prefix = 16;
        if (oh_read(w, addr, pre, prefix) != 0)
            return "past the end of the file";
        size0 = oh_le(pre + 8, 4);
    }
    const char *why = oh_add_chunk(w, addr + prefix, size0);
    for (int i = 0; !why && i < w->nchunks; i++) {
        uint64_t len = w->len[i];
        if (w->addr[i] > w->space || len > w->space - w->addr[i])
            return "a chunk past the end of the file";
        uint8_t *buf = malloc(len ? (size_t)len : 1);
        if (!buf)
            return "too large to read (out of memory)";
        if (oh_read(w, w->addr[i], buf, len) != 0) {
            why = "unreadable";
        } else if (i > 0 && w->v2) { /* a continuation chunk: signature, messages, checksum */
            if (len < 8 || memcmp(buf, "OCHK", 4) != 0)
                why = "a continuation chunk without its signature";
            else
                why = oh_messages(w, buf + 4, len - 8);
        } else {
            why = oh_messages(w, buf, len);
        }
        free(buf);
    }
    return why;
}

/* The file of loc as the walk reads it: its descriptor (through sec2, mps_h5_open_file's driver,
 * whose handle is an int), user block (where address 0 lies), address and length sizes. */
static int oh_file(hid_t loc, oh_walk *w)
{
    hid_t f = H5Iget_file_id(loc);
    hid_t fcpl = f < 0 ? -1 : H5Fget_create_plist(f), fapl = f < 0 ? -1 : H5Fget_access_plist(f);
    hsize_t userblock = 0;
    size_t sizeof_addr = 0, sizeof_size = 0;
    void *handle = NULL;
    struct stat st;
    int ok = fcpl >= 0 && fapl >= 0 && H5Pget_driver(fapl) == H5FD_SEC2 &&
             H5Pget_sizes(fcpl, &sizeof_addr, &sizeof_size) >= 0 && H5Pget_userblock(fcpl, &userblock) >= 0 &&
             H5Fget_vfd_handle(f, fapl, &handle) >= 0 && handle && fstat(*(int *)handle, &st) == 0 &&
             sizeof_addr >= 1 && sizeof_addr <= 8 && sizeof_size >= 1 && sizeof_size <= 8 &&
             userblock <= (uint64_t)st.st_size;
    if (ok) {
        w->fd = *(int *)handle;
        w->base = userblock;
        w->space = (uint64_t)st.st_size - userblock;
        w->sizeof_addr = (unsigned)sizeof_addr;
        w->sizeof_size = (unsigned)sizeof_size;
    }
    if (fcpl >= 0)
        H5Pclose(fcpl);
    if (fapl >= 0)
        H5Pclose(fapl);
    if (f >= 0)
        H5Fclose(f);
    return ok ? 0 : -1;
}

/* Neither H5Lexists nor H5Lget_info resolves the last link of name, so a soft or external link
 * (which HDF5 would follow, to another object or into any file: a FIFO blocks the open) is refused
 * before anything resolves it; the links above it are the caller's (mps_h5_hard_link on each). */
int mps_h5_hard_link(hid_t loc, const char *name, H5O_type_t type, H5O_info_t *info, const char *path, mps_err *err)
{
    H5L_info_t li;
    H5O_info_t oi;
    const char *what = type == H5O_TYPE_GROUP ? "group" : "dataset";
    if (H5Lexists(loc, name, H5P_DEFAULT) <= 0 || H5Lget_info(loc, name, &li, H5P_DEFAULT) < 0)
        return mps_fail(err, MPS_ECORRUPT, "%s: %s %s is missing", path, what, name);
    if (li.type != H5L_TYPE_HARD)
        return mps_fail(err, MPS_ECORRUPT, "%s: %s %s is %s: refused (a shard file holds its data itself)", path,
                        what, name, li.type == H5L_TYPE_SOFT       ? "a soft link"
                                    : li.type == H5L_TYPE_EXTERNAL ? "an external link"
                                                                   : "a user-defined link");
    if (H5Oget_info_by_name2(loc, name, &oi, H5O_INFO_BASIC, H5P_DEFAULT) < 0 || oi.type != type)
        return mps_fail(err, MPS_ECORRUPT, "%s: %s is not a %s", path, name, what);
    if (info)
        *info = oi;
    return 0;
}

int mps_h5_check_tensor(hid_t d, const char *name, const char *tensor, const char *kind, const char *path,
                        mps_err *err)
{
    char text[128]; /* over any tensor or kind name (MPS_NAME_MAX): a longer attribute fails to read */
    if (mps_h5_read_attr_str(d, "tensor", text, sizeof text) != 0 || strcmp(text, tensor) != 0 ||
        mps_h5_read_attr_str(d, "kind", text, sizeof text) != 0 || strcmp(text, kind) != 0)
        return mps_fail(err, MPS_ECORRUPT, "%s: dataset %s is not the %s of tensor %s (its tensor or kind attribute "
                        "differs)", path, name, kind, tensor);
    return 0;
}

hid_t mps_h5_open_dataset(hid_t loc, const char *name, const char *path, mps_err *err)
{
    H5O_info_t oi;
    if (mps_h5_hard_link(loc, name, H5O_TYPE_DATASET, &oi, path, err) != 0)
        return -1;
    oh_walk *w = calloc(1, sizeof *w); /* 4 KiB of chunk list: not on a worker's stack */
    if (!w)
        return mps_fail(err, MPS_ENOMEM, "out of memory");
    if (oh_file(loc, w) != 0) {
        free(w);
        return mps_fail(err, MPS_ECORRUPT, "%s: cannot read the object header of dataset %s (unsupported address "
                        "sizes or user block)", path, name);
    }
    const char *why = oh_walk_header(w, oi.addr);
    int virtual_layout = w->virtual_layout, external = w->external;
    free(w);
    if (why)
        return mps_fail(err, MPS_ECORRUPT, "%s: dataset %s: damaged object header (%s): refused", path, name, why);
    if (virtual_layout || external)
        return mps_fail(err, MPS_ECORRUPT, "%s: dataset %s keeps its data in other files (%s): refused", path, name,
                        virtual_layout ? "a virtual dataset" : "external storage");
    hid_t d = H5Dopen2(loc, name, H5P_DEFAULT);
    if (d < 0)
        return mps_fail(err, MPS_ECORRUPT, "%s: cannot open dataset %s", path, name);
    return d;
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
