/* What a checkpoint really holds per rank: the attributes of every stored dataset, mapped to the
 * ranks that hold those elements under the checkpoint's layout. A piece is stored once, by its
 * owner; every rank holding a replica of it counts it, as it would hold it in GPU memory. */
#include <hdf5.h>
#include <stdlib.h>
#include <string.h>

#include "h5util.h"
#include "inspect/plan.h"

typedef struct {
    int kind, tensor;
    int64_t off[MPS_MAX_DIMS], cnt[MPS_MAX_DIMS];
    int64_t flat_begin, flat_end;
} stored_dataset;

typedef struct {
    const mps_manifest *m;
    mps_ckpt_usage *u;
    const char *path; /* the file being read */
    int rank;
    int kind;
    hid_t group;
    stored_dataset *list;
    int64_t n, cap;
    mps_err *err;
} scan_ctx;

void mps_ckpt_usage_free(mps_ckpt_usage *u)
{
    if (!u)
        return;
    free(u->held);
    free(u->file_raw);
    free(u->file_stored);
    free(u->tensor_raw);
    free(u->tensor_stored);
    free(u);
}

/* Reads one dataset's attributes and checks them against the catalogue (the file is untrusted). */
static herr_t visit_dataset(hid_t group, const char *name, const H5L_info_t *info, void *arg)
{
    (void)info;
    scan_ctx *x = arg;
    const mps_config *cfg = &x->m->cfg;
    const char *kname = mps_kind_name((mps_kind)x->kind);
    int t = mps_tensor_find(cfg, name);
    if (t < 0) {
        mps_fail(x->err, MPS_ECORRUPT, "%s: /%s/%s is not a tensor of this model", x->path, kname, name);
        return -1;
    }
    /* its group was checked by the caller: the dataset's own link must be a hard link too, like
     * the readers' (mps_h5_open_dataset), and its attributes bind it to this tensor and kind */
    char dname[MPS_NAME_MAX + 16];
    snprintf(dname, sizeof dname, "/%s/%s", kname, name);
    hid_t d = mps_h5_open_dataset(group, dname, x->path, x->err);
    if (d < 0)
        return -1;
    if (mps_h5_check_tensor(d, dname, name, kname, x->path, x->err) != 0) {
        H5Dclose(d);
        return -1;
    }
    mps_tensor_spec spec;
    mps_tensor_spec_get(cfg, t, &spec);
    stored_dataset ds = { .kind = x->kind, .tensor = t };
    int64_t range[2] = { 0, 0 };
    int ok = mps_h5_read_attr_i64(d, "box_offset", ds.off, spec.ndim) == 0 &&
             mps_h5_read_attr_i64(d, "box_count", ds.cnt, spec.ndim) == 0 &&
             mps_h5_read_attr_i64(d, "flat_range", range, 2) == 0;
    int64_t box_numel = 1;
    for (int i = 0; ok && i < spec.ndim; i++) {
        ok = ds.off[i] >= 0 && ds.cnt[i] >= 0 && ds.off[i] <= spec.shape[i] && ds.cnt[i] <= spec.shape[i] - ds.off[i];
        box_numel *= ds.cnt[i];
    }
    ok = ok && range[0] >= 0 && range[0] <= range[1] && range[1] <= box_numel;
    hsize_t storage = 0;
    if (ok) {
        hid_t space = H5Dget_space(d);
        hssize_t npoints = space >= 0 ? H5Sget_simple_extent_npoints(space) : -1;
        ok = npoints == range[1] - range[0];
        if (space >= 0)
            H5Sclose(space);
        storage = H5Dget_storage_size(d);
    }
    H5Dclose(d);
    if (!ok) {
        mps_fail(x->err, MPS_ECORRUPT, "%s: dataset %s: attributes box_offset, box_count or flat_range missing or "
                 "inconsistent with its shape", x->path, dname);
        return -1;
    }
    ds.flat_begin = range[0];
    ds.flat_end = range[1];
    if (x->n == x->cap) {
        int64_t cap = x->cap ? 2 * x->cap : 256;
        stored_dataset *grown = realloc(x->list, sizeof *grown * (size_t)cap);
        if (!grown) {
            mps_fail(x->err, MPS_ENOMEM, "out of memory");
            return -1;
        }
        x->list = grown;
        x->cap = cap;
    }
    x->list[x->n++] = ds;
    int64_t raw = (range[1] - range[0]) * (int64_t)sizeof(float);
    x->u->file_raw[x->rank] += raw;
    x->u->file_stored[x->rank] += (int64_t)storage;
    x->u->tensor_raw[t] += raw;
    x->u->tensor_stored[t] += (int64_t)storage;
    x->u->datasets++;
    return 0;
}

static int dataset_order(const void *pa, const void *pb)
{
    const stored_dataset *a = pa, *b = pb;
    if (a->kind != b->kind)
        return a->kind < b->kind ? -1 : 1;
    if (a->tensor != b->tensor)
        return a->tensor < b->tensor ? -1 : 1;
    for (int i = 0; i < MPS_MAX_DIMS; i++) {
        if (a->off[i] != b->off[i])
            return a->off[i] < b->off[i] ? -1 : 1;
        if (a->cnt[i] != b->cnt[i])
            return a->cnt[i] < b->cnt[i] ? -1 : 1;
    }
    if (a->flat_begin != b->flat_begin)
        return a->flat_begin < b->flat_begin ? -1 : 1;
    return a->flat_end < b->flat_end ? -1 : a->flat_end > b->flat_end;
}

/* Elements of piece p (kind, tensor) found in the sorted dataset list: the datasets of the same box
 * whose flat ranges overlap the piece's. Within one layout the pieces of a tensor differ by their TP
 * box or by their ZeRO range inside the same box, so this is exact. */
static int64_t found_elements(const stored_dataset *list, int64_t n, int kind, int tensor, const mps_piece *p)
{
    stored_dataset key = { .kind = kind, .tensor = tensor, .flat_begin = INT64_MIN, .flat_end = INT64_MIN };
    for (int i = 0; i < p->box.ndim; i++) {
        key.off[i] = p->box.off[i];
        key.cnt[i] = p->box.cnt[i];
    }
    int64_t lo = 0, hi = n; /* first dataset >= key */
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (dataset_order(&list[mid], &key) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    int64_t found = 0;
    for (int64_t i = lo; i < n; i++) {
        const stored_dataset *d = &list[i];
        if (d->kind != kind || d->tensor != tensor || memcmp(d->off, key.off, sizeof key.off) != 0 ||
            memcmp(d->cnt, key.cnt, sizeof key.cnt) != 0 || d->flat_begin >= p->flat_end)
            break;
        int64_t b = d->flat_begin > p->flat_begin ? d->flat_begin : p->flat_begin;
        int64_t e = d->flat_end < p->flat_end ? d->flat_end : p->flat_end;
        if (e > b)
            found += e - b;
    }
    return found;
}

int mps_ckpt_usage_scan(const char *dir, const mps_manifest *m, mps_ckpt_usage **out, mps_err *err)
{
    if (mps_h5_init(err) != 0)
        return -1;
    int world = mps_layout_world(&m->layout), nt = mps_tensor_count(&m->cfg);
    mps_ckpt_usage *u = calloc(1, sizeof *u);
    scan_ctx x = { .m = m, .u = u, .err = err };
    if (!u || !(u->held = calloc((size_t)world * MPS_KIND_COUNT, sizeof(int64_t))) ||
        !(u->file_raw = calloc((size_t)world, sizeof(int64_t))) || !(u->file_stored = calloc((size_t)world, sizeof(int64_t))) ||
        !(u->tensor_raw = calloc((size_t)nt, sizeof(int64_t))) || !(u->tensor_stored = calloc((size_t)nt, sizeof(int64_t)))) {
        mps_ckpt_usage_free(u);
        return mps_fail(err, MPS_ENOMEM, "out of memory");
    }
    u->world = world;
    u->ntensors = nt;
    for (int i = 0; i < m->nfiles; i++) {
        char path[4400];
        snprintf(path, sizeof path, "%s/%s", dir, m->files[i].name);
        hid_t f = mps_h5_open_file(path, err);
        if (f < 0)
            goto fail;
        x.path = path;
        x.rank = m->files[i].rank;
        for (int k = 0; k < MPS_KIND_COUNT; k++) {
            if (!(m->kinds & (1u << k)))
                continue;
            char group[32];
            snprintf(group, sizeof group, "/%s", mps_kind_name((mps_kind)k));
            if (H5Lexists(f, group, H5P_DEFAULT) <= 0)
                continue; /* a rank that owns nothing of this kind */
            /* opened only through a hard link: H5Gopen2 would follow an external one into any
             * file (a FIFO there blocks it forever) and a soft one to another group */
            if (mps_h5_hard_link(f, group, H5O_TYPE_GROUP, NULL, path, err) != 0) {
                H5Fclose(f);
                goto fail;
            }
            hid_t g = H5Gopen2(f, group, H5P_DEFAULT);
            x.kind = k;
            hsize_t idx = 0;
            herr_t rc = g >= 0 ? H5Literate(g, H5_INDEX_NAME, H5_ITER_NATIVE, &idx, visit_dataset, &x) : -1;
            if (g >= 0)
                H5Gclose(g);
            if (rc < 0) {
                H5Fclose(f);
                mps_fail(err, MPS_ECORRUPT, "%s: cannot list group %s", path, group);
                goto fail;
            }
        }
        H5Fclose(f);
    }
    if (x.n > 0)
        qsort(x.list, (size_t)x.n, sizeof *x.list, dataset_order);
    for (int r = 0; r < world; r++)
        for (int k = 0; k < MPS_KIND_COUNT; k++) {
            if (!(m->kinds & (1u << k)))
                continue;
            int64_t held = 0;
            for (int t = 0; t < nt; t++) {
                mps_piece p;
                mps_geometry(&m->cfg, &m->layout, r, (mps_kind)k, t, &p);
                if (p.held && p.flat_end > p.flat_begin)
                    held += found_elements(x.list, x.n, k, t, &p);
            }
            u->held[(size_t)r * MPS_KIND_COUNT + k] = held;
        }
    free(x.list);
    *out = u;
    return 0;
fail:
    free(x.list);
    mps_ckpt_usage_free(u);
    return -1;
}
