/* Fuzz target: well-formed HDF5 shard files with hostile contents, for the checks the project
 * makes itself (HDF5's own parser is fuzz_h5file's business): the root attributes (format,
 * format_version, checkpoint_id, rank), each dataset's box attributes and chunk_xxh3, its type,
 * shape, chunk shape and filter pipeline, and the stored chunk bytes (any bytes, any filter
 * mask, chunks of another dataset), and datasets that are not what they seem: soft and external
 * links in place of a dataset or its group, another dataset hard-linked in its place, data kept in
 * other files (external storage, a virtual dataset). Those point at the FIFO "fifo" beside the
 * shard files: a reader that follows them blocks (a timeout is a finding). Whatever verify accepts
 * must read back exactly as written.
 *
 * Input: byte 0 picks the layout of a valid checkpoint (h5_base.h); then up to 24 edits, each an
 * opcode byte and its arguments, applied to the shard files through the HDF5 API. Bytes read
 * past the end are 0, so a short input makes few, mild edits. A link or storage edit ends the
 * script: the harness itself must not follow what it made.
 *
 * MPS_FUZZ_WRITE_H5FILE=PATH: runs one input and writes the edited rank-00000.h5 to PATH (seeds of
 * fuzz_h5file, whose base file is this target's first layout's). */
#include "h5_base.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char *const layouts[] = { "dp=1", "dp=2,zero=3", "tp=2" };
#define NLAYOUTS 3
#define MAX_DSETS 128

typedef struct {
    int rank;
    char path[64];
} dset_ref;

static char scratch[256], dir[300];
static h5_base bases[NLAYOUTS];
static dset_ref dsets[NLAYOUTS][MAX_DSETS];
static int ndsets[NLAYOUTS];

typedef struct {
    const uint8_t *p;
    size_t n;
} reader;

static unsigned u8(reader *r)
{
    if (r->n == 0)
        return 0;
    r->n--;
    return *r->p++;
}

/* A value for an integer attribute: mostly small (near the valid ones), sometimes any 64 bits. */
static int64_t val(reader *r)
{
    unsigned b = u8(r);
    if (b != 0xff)
        return (int64_t)(int8_t)b;
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v |= (uint64_t)u8(r) << (8 * i);
    return (int64_t)v;
}

static void cleanup(void)
{
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", scratch);
    if (scratch[0] && system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", scratch);
}

typedef struct {
    dset_ref *list;
    int *n;
    int rank;
} visit_ctx;

static herr_t visit(hid_t obj, const char *name, const H5O_info_t *info, void *arg)
{
    (void)obj;
    visit_ctx *v = arg;
    if (info->type == H5O_TYPE_DATASET && *v->n < MAX_DSETS) {
        v->list[*v->n].rank = v->rank;
        snprintf(v->list[*v->n].path, sizeof v->list[0].path, "/%s", name);
        (*v->n)++;
    }
    return 0;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    h5_no_free_lists();
    h5_scratch_dir(scratch, sizeof scratch, "fuzz_h5attr");
    atexit(cleanup);
    snprintf(dir, sizeof dir, "%s/ckpt", scratch);
    FUZZ_ASSERT(mkdir(dir, 0755) == 0, "mkdir %s", dir);
    h5_make_fifo(dir);
    for (int l = 0; l < NLAYOUTS; l++) {
        h5_base_build(&bases[l], layouts[l], scratch);
        /* the datasets of every rank file */
        for (int r = 0; r < bases[l].world; r++) {
            char path[400];
            h5_rank_path(dir, r, path, sizeof path);
            h5_write_file(path, bases[l].bytes[r], bases[l].size[r]);
            hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
            visit_ctx v = { dsets[l], &ndsets[l], r };
            FUZZ_ASSERT(f >= 0 && H5Ovisit(f, H5_INDEX_NAME, H5_ITER_NATIVE, visit, &v) >= 0, "visit %s", path);
            H5Fclose(f);
            unlink(path);
        }
        FUZZ_ASSERT(ndsets[l] > 0, "no datasets");
    }
    return 0;
}

/* Replaces attribute `name` of obj by one of another type, shape or value (or removes it). */
static void edit_attr(hid_t obj, const char *name, reader *r)
{
    if (H5Aexists(obj, name) > 0)
        H5Adelete(obj, name);
    unsigned variant = u8(r) % 9, count = u8(r) % 6;
    int64_t i64[8] = { 0 };
    int32_t i32[8] = { 0 };
    double f64[8] = { 0 };
    char text[48];
    for (unsigned i = 0; i < count; i++)
        i64[i] = val(r), i32[i] = (int32_t)i64[i], f64[i] = (double)i64[i];
    hid_t type = -1, mem = -1, space;
    const void *buf = i64;
    const char *vlen = text;
    hsize_t dims[2] = { count, 2 };
    switch (variant) {
    case 0: return; /* removed */
    case 1: type = H5T_STD_I64LE, mem = H5T_NATIVE_INT64; break;
    case 2: type = H5T_STD_U64LE, mem = H5T_NATIVE_INT64; break;
    case 3: type = H5T_STD_I32LE, mem = H5T_NATIVE_INT32, buf = i32; break;
    case 4: type = H5T_IEEE_F64LE, mem = H5T_NATIVE_DOUBLE, buf = f64; break;
    case 5: type = H5T_STD_I64BE, mem = H5T_NATIVE_INT64; break;
    case 6:   /* a fixed-length string of any bytes */
    case 7: { /* a variable-length string */
        unsigned len = u8(r) % (sizeof text - 1);
        for (unsigned i = 0; i < len; i++)
            text[i] = (char)u8(r);
        text[len] = '\0';
        type = H5Tcopy(H5T_C_S1);
        H5Tset_size(type, variant == 7 ? H5T_VARIABLE : (len ? len : 1));
        mem = type;
        buf = variant == 7 ? (const void *)&vlen : (const void *)text;
        dims[0] = 1; /* scalar, or an array of one string */
        break;
    }
    case 8: type = H5T_STD_I64LE, mem = H5T_NATIVE_INT64, dims[0] = count / 2 ? count / 2 : 1; break;
    }
    if (variant == 8)
        space = H5Screate_simple(2, dims, NULL);
    else if (variant >= 6)
        space = count & 1 ? H5Screate(H5S_SCALAR) : H5Screate_simple(1, dims, NULL);
    else if (count == 0)
        space = u8(r) & 1 ? H5Screate(H5S_NULL) : H5Screate(H5S_SCALAR);
    else
        space = H5Screate_simple(1, dims, NULL);
    hid_t a = H5Acreate2(obj, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
    if (a >= 0) {
        if (H5Sget_simple_extent_type(space) != H5S_NULL)
            H5Awrite(a, mem, buf);
        H5Aclose(a);
    }
    H5Sclose(space);
    if (variant == 6 || variant == 7)
        H5Tclose(type);
}

/* Copies every attribute of src to dst (fixed-size types: what the writer stores). */
static void copy_attrs(hid_t src, hid_t dst)
{
    H5O_info_t info;
    if (H5Oget_info(src, &info) < 0)
        return;
    for (hsize_t i = 0; i < info.num_attrs; i++) {
        hid_t a = H5Aopen_by_idx(src, ".", H5_INDEX_CRT_ORDER, H5_ITER_NATIVE, i, H5P_DEFAULT, H5P_DEFAULT);
        if (a < 0)
            a = H5Aopen_by_idx(src, ".", H5_INDEX_NAME, H5_ITER_NATIVE, i, H5P_DEFAULT, H5P_DEFAULT);
        if (a < 0)
            continue;
        char name[64];
        hid_t type = H5Aget_type(a), space = H5Aget_space(a);
        size_t n = H5Tget_size(type) * (size_t)(H5Sget_simple_extent_npoints(space) > 0 ? H5Sget_simple_extent_npoints(space) : 1);
        void *buf = malloc(n);
        if (buf && H5Aget_name(a, sizeof name, name) > 0 && !H5Tis_variable_str(type) && H5Aread(a, type, buf) >= 0) {
            hid_t b = H5Acreate2(dst, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
            if (b >= 0) {
                H5Awrite(b, type, buf);
                H5Aclose(b);
            }
        }
        free(buf);
        H5Sclose(space);
        H5Tclose(type);
        H5Aclose(a);
    }
}

/* Replaces a dataset by one of another type, shape, chunking or filter pipeline (keeping its
 * attributes), optionally filled through the filters. */
static void recreate(hid_t f, const char *path, reader *r)
{
    hid_t old = H5Dopen2(f, path, H5P_DEFAULT);
    if (old < 0)
        return;
    char tmp[80];
    snprintf(tmp, sizeof tmp, "%s.old", path);
    if (H5Lmove(f, path, f, tmp, H5P_DEFAULT, H5P_DEFAULT) < 0) {
        H5Dclose(old);
        return;
    }
    /* (the H5T_* names are function calls: no static table of them) */
    unsigned t = u8(r) % 5;
    hid_t type = t == 0 ? H5T_IEEE_F32LE : t == 1 ? H5T_IEEE_F32BE : t == 2 ? H5T_IEEE_F64LE : t == 3 ? H5T_STD_I32LE
                                                                                                 : H5T_STD_U8LE;
    int ndim = 1 + (int)(u8(r) % 3);
    hsize_t dims[3], chunk[3];
    hid_t oldspace = H5Dget_space(old);
    int oldnd = H5Sget_simple_extent_ndims(oldspace);
    hsize_t olddims[3] = { 1, 1, 1 };
    if (oldnd >= 1 && oldnd <= 3)
        H5Sget_simple_extent_dims(oldspace, olddims, NULL);
    H5Sclose(oldspace);
    for (int i = 0; i < ndim; i++) {
        unsigned b = u8(r);
        /* mostly the old extent (so that later checks are reached), else a small one */
        dims[i] = b < 128 && i < oldnd ? olddims[i] : b % 20;
        unsigned c = u8(r);
        chunk[i] = dims[i] ? 1 + c % dims[i] : 1;
    }
    hid_t space = H5Screate_simple(ndim, dims, NULL);
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    unsigned level = 1, filters = u8(r) % 7;
    if (filters != 6) {
        H5Pset_chunk(dcpl, ndim, chunk);
        if (filters == 0 || filters == 2 || filters == 5)
            H5Pset_shuffle(dcpl);
        if (filters == 0 || filters == 1 || filters == 4)
            H5Pset_filter(dcpl, MPS_ZSTD_FILTER_ID, H5Z_FLAG_MANDATORY, 1, &level);
        if (filters == 4)
            H5Pset_shuffle(dcpl);
        if (filters == 5)
            H5Pset_deflate(dcpl, 1);
    }
    hid_t d = H5Dcreate2(f, path, type, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    if (d >= 0) {
        copy_attrs(old, d);
        hssize_t n = H5Sget_simple_extent_npoints(space);
        if ((u8(r) & 1) && n > 0 && n < 100000) {
            float *zeros = calloc((size_t)n, sizeof *zeros);
            if (zeros)
                H5Dwrite(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, zeros);
            free(zeros);
        }
        H5Dclose(d);
    }
    H5Pclose(dcpl);
    H5Sclose(space);
    H5Dclose(old);
    H5Ldelete(f, tmp, H5P_DEFAULT);
}

/* The logical offset of chunk `index` of a chunked dataset (its grid, as HDF5 lays it out). */
static int chunk_offset(hid_t d, unsigned index, hsize_t *off)
{
    hid_t space = H5Dget_space(d), dcpl = H5Dget_create_plist(d);
    int nd = H5Sget_simple_extent_ndims(space), ok = 0;
    hsize_t dims[8], chunk[8];
    if (nd >= 1 && nd <= 8 && H5Pget_layout(dcpl) == H5D_CHUNKED && H5Pget_chunk(dcpl, nd, chunk) == nd) {
        H5Sget_simple_extent_dims(space, dims, NULL);
        hsize_t total = 1, per[8];
        for (int i = 0; i < nd; i++) {
            per[i] = chunk[i] ? (dims[i] + chunk[i] - 1) / chunk[i] : 0;
            total *= per[i];
        }
        if (total > 0) {
            hsize_t id = index % total;
            for (int i = nd - 1; i >= 0; i--) {
                off[i] = (id % per[i]) * chunk[i];
                id /= per[i];
            }
            ok = 1;
        }
    }
    H5Sclose(space);
    H5Pclose(dcpl);
    return ok;
}

/* Stores any bytes as chunk `index` of the dataset, with any filter mask. */
static void write_chunk(hid_t f, const char *path, reader *r)
{
    hid_t d = H5Dopen2(f, path, H5P_DEFAULT);
    if (d < 0)
        return;
    hsize_t off[8];
    unsigned index = u8(r), mask = u8(r);
    size_t len = u8(r);
    len |= (size_t)u8(r) << 8;
    if (len > r->n)
        len = r->n;
    if (chunk_offset(d, index, off) && len > 0)
        H5Dwrite_chunk(d, H5P_DEFAULT, mask, off, len, r->p);
    r->p += len;
    r->n -= len;
    H5Dclose(d);
}

/* Copies the stored bytes (and mask) of one chunk over another, maybe of another dataset: a
 * valid zstd frame of the wrong size or contents. */
static void copy_chunk(hid_t f, const char *from, const char *to, reader *r)
{
    hid_t a = H5Dopen2(f, from, H5P_DEFAULT), b = H5Dopen2(f, to, H5P_DEFAULT);
    hsize_t oa[8], ob[8], size = 0;
    unsigned ia = u8(r), ib = u8(r), mask = 0;
    if (a >= 0 && b >= 0 && chunk_offset(a, ia, oa) && chunk_offset(b, ib, ob) &&
        H5Dget_chunk_storage_size(a, oa, &size) >= 0 && size > 0 && size < (1u << 20)) {
        void *buf = malloc(size);
        if (buf && H5Dread_chunk(a, H5P_DEFAULT, oa, &mask, buf) >= 0)
            H5Dwrite_chunk(b, H5P_DEFAULT, mask, ob, size, buf);
        free(buf);
    }
    if (a >= 0)
        H5Dclose(a);
    if (b >= 0)
        H5Dclose(b);
}

/* Replaces the dataset (or its kind's group) by a link: external (to the FIFO), soft or hard (to
 * another dataset of the file, `to`). */
static void make_link(hid_t f, const char *path, const char *to, reader *r)
{
    unsigned variant = u8(r) % 4;
    char name[64];
    snprintf(name, sizeof name, "%s", path);
    char *slash = strrchr(name, '/');
    if (variant == 1 && slash && slash != name)
        *slash = '\0'; /* the group /param, /adam_m */
    if (H5Ldelete(f, name, H5P_DEFAULT) < 0)
        return;
    if (variant <= 1)
        H5Lcreate_external(H5_FIFO, variant ? name : "/x", f, name, H5P_DEFAULT, H5P_DEFAULT);
    else if (variant == 2)
        H5Lcreate_soft(to, f, name, H5P_DEFAULT, H5P_DEFAULT);
    else
        H5Lcreate_hard(f, to, f, name, H5P_DEFAULT, H5P_DEFAULT);
}

/* Replaces a dataset by one of the same type, shape and attributes whose data is in the FIFO:
 * external storage or a virtual dataset. */
static void store_elsewhere(hid_t f, const char *path, reader *r)
{
    hid_t old = H5Dopen2(f, path, H5P_DEFAULT);
    if (old < 0)
        return;
    hid_t space = H5Dget_space(old), dcpl = H5Pcreate(H5P_DATASET_CREATE);
    if (u8(r) & 1)
        H5Pset_external(dcpl, H5_FIFO, 0, H5F_UNLIMITED);
    else
        H5Pset_virtual(dcpl, space, H5_FIFO, "/x", space);
    char tmp[80];
    snprintf(tmp, sizeof tmp, "%s.old", path);
    if (H5Lmove(f, path, f, tmp, H5P_DEFAULT, H5P_DEFAULT) >= 0) {
        hid_t d = H5Dcreate2(f, path, H5T_IEEE_F32LE, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
        if (d >= 0) {
            copy_attrs(old, d);
            H5Dclose(d);
        }
        H5Ldelete(f, tmp, H5P_DEFAULT);
    }
    H5Pclose(dcpl);
    H5Sclose(space);
    H5Dclose(old);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    reader rd = { data, size };
    int l = (int)(u8(&rd) % NLAYOUTS);
    h5_base *b = &bases[l];
    hid_t files[H5_MAX_WORLD];
    for (int r = 0; r < b->world; r++) {
        char path[400];
        h5_rank_path(dir, r, path, sizeof path);
        h5_write_file(path, b->bytes[r], b->size[r]);
        files[r] = -1;
        if (rd.n > 0) {
            files[r] = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
            FUZZ_ASSERT(files[r] >= 0, "reopen %s", path);
        }
    }
    static const char *const root_attrs[] = { "format", "format_version", "checkpoint_id", "rank" };
    static const char *const dset_attrs[] = { "box_offset", "box_count", "flat_range", "chunk_xxh3" };
    for (int op = 0; op < 24 && rd.n > 0; op++) {
        unsigned code = u8(&rd) % 8;
        const dset_ref *ds = &dsets[l][u8(&rd) % (unsigned)ndsets[l]];
        hid_t f = files[ds->rank];
        switch (code) {
        case 0: {
            hid_t root = H5Gopen2(files[u8(&rd) % (unsigned)b->world], "/", H5P_DEFAULT);
            edit_attr(root, root_attrs[u8(&rd) % 4], &rd);
            H5Gclose(root);
            break;
        }
        case 1: {
            hid_t d = H5Dopen2(f, ds->path, H5P_DEFAULT);
            if (d >= 0) {
                edit_attr(d, dset_attrs[u8(&rd) % 4], &rd);
                H5Dclose(d);
            }
            break;
        }
        case 2: write_chunk(f, ds->path, &rd); break;
        case 3: recreate(f, ds->path, &rd); break;
        case 4: { /* remove the dataset, or its whole group */
            char group[64];
            snprintf(group, sizeof group, "%s", ds->path);
            char *slash = strrchr(group, '/');
            if (slash && slash != group && (u8(&rd) & 1))
                *slash = '\0';
            H5Ldelete(f, group, H5P_DEFAULT);
            break;
        }
        case 5: {
            const dset_ref *to = &dsets[l][u8(&rd) % (unsigned)ndsets[l]];
            if (to->rank == ds->rank)
                copy_chunk(f, ds->path, to->path, &rd);
            break;
        }
        case 6: /* (the last edit: later ones would follow the link) */
            make_link(f, ds->path, dsets[l][u8(&rd) % (unsigned)ndsets[l]].path, &rd);
            rd.n = 0;
            break;
        case 7:
            store_elsewhere(f, ds->path, &rd);
            rd.n = 0;
            break;
        }
    }
    for (int r = 0; r < b->world; r++)
        if (files[r] >= 0)
            FUZZ_ASSERT(H5Fclose(files[r]) >= 0, "close rank %d", r);
    const char *write_to = getenv("MPS_FUZZ_WRITE_H5FILE");
    if (write_to) {
        char path[400];
        unsigned char *bytes;
        size_t n;
        h5_rank_path(dir, 0, path, sizeof path);
        h5_read_file(path, &bytes, &n);
        h5_write_file(write_to, bytes, n);
        free(bytes);
        cleanup();
        _exit(0); /* (libFuzzer takes exit() inside an input for a finding) */
    }
    h5_write_manifest(b, dir);
    h5_check(b, dir);
    return 0;
}
