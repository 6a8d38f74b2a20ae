/* Shard files whose datasets are not what they seem: a soft or external link in place of a dataset
 * or of a kind's group, a dataset keeping its data in other files (external storage, a virtual
 * dataset), and a dataset of another tensor or kind in place of the right one (hard-linked, same
 * shape). Each edit keeps the file a valid HDF5 file with the attributes a reader checks and
 * records the new file size in the manifest, so that only the trap is left. Every reader refuses
 * it with exit 3 naming the file and the dataset, at once: the links and the external files point
 * at a FIFO, which an open would block on forever (the CLI runs under `timeout`, the test under
 * alarm()); so do `inspect --check` and `--tensors`, which list each kind's group instead of
 * opening datasets by name. A virtual dataset whose global heap collection is damaged hangs
 * libhdf5 1.10 in H5Dopen2 itself (a fuzz_h5file finding): mps_h5_open_dataset refuses it from the
 * object header's bytes, which is also checked on plain files with both object header versions. */
#include <hdf5.h>
#include <sys/wait.h>

#include "ckpt.h"
#include "h5util.h"
#include "modelfile.h"
#include "shard/shard.h"
#include "testutil.h"

static const mps_config cfg = { .n_layer = 1, .n_embd = 8, .n_head = 2, .n_positions = 4, .vocab = 16, .padded_vocab = 16 };
static const char *tmp, *cli;
static char good[1100], ck[1100], fifo[1100];

/* Copies every attribute of src to dst (the fixed-size types the writer stores). */
static herr_t copy_attr(hid_t src, const char *name, const H5A_info_t *info, void *dst)
{
    (void)info;
    hid_t a = H5Aopen(src, name, H5P_DEFAULT), type = H5Aget_type(a), space = H5Aget_space(a);
    hssize_t n = H5Sget_simple_extent_npoints(space);
    size_t bytes = H5Tget_size(type) * (size_t)(n > 0 ? n : 1);
    void *buf = malloc(bytes);
    CHECK(buf && H5Aread(a, type, buf) >= 0);
    hid_t b = H5Acreate2(*(hid_t *)dst, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
    CHECK(b >= 0 && H5Awrite(b, type, buf) >= 0);
    H5Aclose(b);
    free(buf);
    H5Sclose(space);
    H5Tclose(type);
    H5Aclose(a);
    return 0;
}

/* Replaces dataset `name` by one of the same type, shape and attributes whose storage is dcpl's. */
static void recreate(hid_t f, const char *name, hid_t dcpl)
{
    hid_t old = H5Dopen2(f, name, H5P_DEFAULT), space = H5Dget_space(old);
    CHECK(old >= 0 && H5Ldelete(f, name, H5P_DEFAULT) >= 0);
    hid_t d = H5Dcreate2(f, name, H5T_IEEE_F32LE, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    CHECK(d >= 0);
    hsize_t idx = 0;
    CHECK(H5Aiterate2(old, H5_INDEX_NAME, H5_ITER_NATIVE, &idx, copy_attr, &d) >= 0);
    H5Dclose(d);
    H5Sclose(space);
    H5Dclose(old);
}

/* The edits: each one trap in rank-00000.h5 of a fresh copy of the good checkpoint. */
static void e_external_link(hid_t f)
{
    CHECK(H5Ldelete(f, "/param/wte", H5P_DEFAULT) >= 0);
    CHECK(H5Lcreate_external(fifo, "/x", f, "/param/wte", H5P_DEFAULT, H5P_DEFAULT) >= 0);
}
static void e_external_group(hid_t f)
{
    CHECK(H5Ldelete(f, "/param", H5P_DEFAULT) >= 0);
    CHECK(H5Lcreate_external(fifo, "/param", f, "/param", H5P_DEFAULT, H5P_DEFAULT) >= 0);
}
static void e_soft_link(hid_t f)
{
    CHECK(H5Ldelete(f, "/param/h.0.ln1w", H5P_DEFAULT) >= 0);
    CHECK(H5Lcreate_soft("/param/h.0.ln1b", f, "/param/h.0.ln1w", H5P_DEFAULT, H5P_DEFAULT) >= 0);
}
static void e_external_storage(hid_t f)
{
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    CHECK(H5Pset_external(dcpl, fifo, 0, H5F_UNLIMITED) >= 0);
    recreate(f, "/param/wpe", dcpl);
    H5Pclose(dcpl);
}
static void e_virtual(hid_t f)
{
    hsize_t dims[2] = { 4, 8 };
    hid_t space = H5Screate_simple(2, dims, NULL), dcpl = H5Pcreate(H5P_DATASET_CREATE);
    CHECK(H5Pset_virtual(dcpl, space, fifo, "/x", space) >= 0);
    recreate(f, "/param/wpe", dcpl);
    H5Pclose(dcpl);
    H5Sclose(space);
}
/* Sets the size of the free-space object (index 0) of the file's one global heap collection to 0.
 * libhdf5 1.10 decodes a collection by stepping from object to object by their sizes, so it never
 * gets past this one: H5Dopen2 of the virtual dataset whose mappings the collection holds hangs.
 * (fuzz_h5file found it as object 1's size shortened, which lands the walk on zeroed free space.) */
static void damage_global_heap(const char *file)
{
    FILE *fp = fopen(file, "r+b");
    CHECK(fp != NULL);
    if (!fp)
        return;
    static unsigned char b[1 << 20];
    size_t n = fread(b, 1, sizeof b, fp);
    CHECK(feof(fp));
    size_t gcol = n, found = 0;
    for (size_t i = 0; i + 4 <= n; i++)
        if (memcmp(b + i, "GCOL", 4) == 0) {
            gcol = i;
            found++;
        }
    CHECK_MSG(found == 1, "%s: %zu global heap collections", file, found);
    /* collection: signature, version, 3 reserved, size (8); objects from byte 16: index (2),
     * references (2), 4 reserved, size (8), the data padded to 8 bytes */
    size_t obj = gcol + 16, free_obj = 0;
    while (found == 1 && obj + 16 <= n && !free_obj) {
        uint64_t size = 0;
        for (int i = 7; i >= 0; i--)
            size = size << 8 | b[obj + 8 + (size_t)i];
        if (b[obj] == 0 && b[obj + 1] == 0)
            free_obj = obj;
        else
            obj += 16 + (size + 7) / 8 * 8;
    }
    CHECK_MSG(free_obj != 0, "%s: no free-space object in the global heap", file);
    if (free_obj) {
        memset(b + free_obj + 8, 0, 8);
        CHECK(fseek(fp, 0, SEEK_SET) == 0 && fwrite(b, 1, n, fp) == n);
    }
    CHECK(fclose(fp) == 0);
}
/* ln1w and ln1b have the same shape, box and chunking: only their names tell them apart */
static void e_swapped(hid_t f)
{
    CHECK(H5Ldelete(f, "/param/h.0.ln1w", H5P_DEFAULT) >= 0);
    CHECK(H5Lcreate_hard(f, "/param/h.0.ln1b", f, "/param/h.0.ln1w", H5P_DEFAULT, H5P_DEFAULT) >= 0);
}
static void e_other_kind(hid_t f)
{
    CHECK(H5Ldelete(f, "/param/h.0.ln1b", H5P_DEFAULT) >= 0);
    CHECK(H5Lcreate_hard(f, "/adam_m/h.0.ln1b", f, "/param/h.0.ln1b", H5P_DEFAULT, H5P_DEFAULT) >= 0);
}

static int run(const char *args)
{
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "timeout 60 '%s' %s >/dev/null 2>'%s/cli.err'", cli, args, tmp);
    int rc = system(cmd);
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

static void first_line(char *line, size_t size)
{
    char path[1200];
    snprintf(path, sizeof path, "%s/cli.err", tmp);
    FILE *fp = fopen(path, "r");
    line[0] = '\0';
    if (fp) {
        if (!fgets(line, (int)size, fp))
            line[0] = '\0';
        fclose(fp);
    }
}

/* edit changes the open file; patch, when not NULL, its bytes once closed */
static void trap(const char *what, void (*edit)(hid_t), void (*patch)(const char *), const char *dataset,
                 const char *needle)
{
    char cmd[4000];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && cp -r '%s' '%s'", ck, good, ck);
    CHECK(system(cmd) == 0);
    char file[1200], mpath[1200];
    snprintf(file, sizeof file, "%s/rank-00000.h5", ck);
    snprintf(mpath, sizeof mpath, "%s/manifest.json", ck);
    hid_t f = H5Fopen(file, H5F_ACC_RDWR, H5P_DEFAULT);
    CHECK(f >= 0);
    edit(f);
    CHECK(H5Fclose(f) >= 0);
    if (patch)
        patch(file);
    /* the manifest records the edited file's size: the size check passes, the trap is what is left */
    mps_manifest m;
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_manifest_read(mpath, &m, &err) == 0);
    struct stat st;
    CHECK(stat(file, &st) == 0);
    m.files[0].bytes = (int64_t)st.st_size;
    CHECK(mps_manifest_write(mpath, &m, &err) == 0);
    mps_manifest_free(&m);

    /* the library: verify reports the dataset, and a read of it fails the same way */
    char line[2048] = "";
    mps_verify_opts vo = { .threads = 1, .quiet = 1 };
    mps_err_clear(&err);
    int problems = mps_verify(ck, &vo, &err);
    CHECK_MSG(problems > 0, "%s: verify found %d problems (%s)", what, problems, err.msg);
    mps_ckpt *c;
    mps_err_clear(&err);
    CHECK(mps_ckpt_open(ck, &c, &err) == 0);
    mps_read_scratch *s = mps_read_scratch_new();
    float buf[128];
    int failed = 0;
    for (int k = MPS_KIND_PARAM; k <= MPS_KIND_ADAM_V && !failed; k++)
        for (int t = 0; t < mps_tensor_count(&cfg) && !failed; t++) {
            if (k == MPS_KIND_MASTER)
                continue;
            mps_tensor_spec spec;
            mps_box box;
            mps_tensor_spec_get(&cfg, t, &spec);
            mps_box_whole(&spec, &box);
            mps_err_clear(&err);
            failed = mps_ckpt_gather(c, s, (mps_kind)k, t, &box, 0, mps_tensor_numel(&spec), buf, &err) != 0;
        }
    CHECK_MSG(failed && err.code == MPS_ECORRUPT && strstr(err.msg, "rank-00000.h5") && strstr(err.msg, dataset) &&
                  strstr(err.msg, needle) && !strchr(err.msg, '\n'),
              "%s: reading: code %d: %s", what, err.code, err.msg);
    mps_read_scratch_free(s);
    mps_ckpt_close(c);
    if (!cli)
        return;
    /* the CLI readers: exit 3 at once, one line naming the file, the dataset and the trap (inspect
     * --check and --tensors reach every kind's group and every dataset by listing the groups) */
    static const char *const readers[] = { "verify -q '%s'", "export '%s' --format safetensors -o '%s/ex' -q",
                                           "load '%s' --layout tp=2 --rank 1", "inspect '%s' --check",
                                           "inspect '%s' --tensors" };
    for (int r = 0; r < (int)(sizeof readers / sizeof *readers); r++) {
        char args[3000];
        snprintf(args, sizeof args, readers[r], ck, tmp);
        int rc = run(args);
        first_line(line, sizeof line);
        CHECK_MSG(rc == 3 && strstr(line, "rank-00000.h5") && strstr(line, dataset) && strstr(line, needle),
                  "%s: mpshard %s: exit %d: %s", what, args, rc, line);
    }
}

/* In a file without a user block, the version 1 object header at addr (no checksum: HDF5 still
 * loads it) gets layout message version 9, which mps_h5_open_dataset must refuse by name. Version
 * 1 prefix: 16 bytes; messages: type (2), size (2), flags, 3 reserved, then the body. */
static void bad_layout_version(const char *file, haddr_t addr)
{
    unsigned char b[4096];
    FILE *fp = fopen(file, "r+b");
    CHECK(fp != NULL);
    if (!fp)
        return;
    size_t n = fseek(fp, (long)addr, SEEK_SET) == 0 ? fread(b, 1, sizeof b, fp) : 0;
    CHECK(n >= 16 && b[0] == 1);
    size_t end = n < 16 ? 0 : 16 + (size_t)(b[8] | b[9] << 8 | b[10] << 16 | (unsigned)b[11] << 24), layout = 0;
    unsigned char was = 0;
    for (size_t m = 16; m + 9 <= end && m + 9 <= n && !layout;) {
        if (b[m] == 0x08 && b[m + 1] == 0)
            layout = m + 8;
        m += 8 + (size_t)(b[m + 2] | b[m + 3] << 8);
    }
    CHECK_MSG(layout != 0, "%s: no layout message in the first chunk of the header at %llu", file,
              (unsigned long long)addr);
    if (layout) {
        was = b[layout];
        b[layout] = 9;
        CHECK(fseek(fp, (long)(addr + layout), SEEK_SET) == 0 && fwrite(b + layout, 1, 1, fp) == 1);
    }
    CHECK(fclose(fp) == 0);
    mps_err err;
    mps_err_clear(&err);
    hid_t f = mps_h5_open_file(file, &err), d = -1;
    CHECK_MSG(f >= 0, "%s", err.msg);
    if (f >= 0) {
        mps_err_clear(&err);
        d = mps_h5_open_dataset(f, "/chunked", file, &err);
        CHECK_MSG(d < 0 && err.code == MPS_ECORRUPT && strstr(err.msg, file) &&
                      strstr(err.msg, "dataset /chunked: damaged object header (a layout message of unknown version): "
                                      "refused") && !strchr(err.msg, '\n'),
                  "layout version 9: code %d: %s", err.code, err.msg);
        if (d >= 0)
            H5Dclose(d);
        H5Fclose(f);
    }
    if (layout) { /* back to the version it had, for the checks that follow */
        fp = fopen(file, "r+b");
        CHECK(fp != NULL);
        if (!fp)
            return;
        CHECK(fseek(fp, (long)(addr + layout), SEEK_SET) == 0 && fwrite(&was, 1, 1, fp) == 1);
        CHECK(fclose(fp) == 0);
    }
}

/* mps_h5_open_dataset on a plain file whose object headers are of the given version (libver
 * `low`): a chunked dataset whose header needs continuation chunks opens; a virtual dataset, one
 * with external storage and a virtual one over a damaged global heap are refused, naming the file
 * and the dataset, without HDF5 opening them. */
static void open_dataset_headers(H5F_libver_t low, unsigned version)
{
    char file[1200];
    snprintf(file, sizeof file, "%s/headers-v%u.h5", tmp, version);
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    CHECK(H5Pset_libver_bounds(fapl, low, H5F_LIBVER_LATEST) >= 0);
    hid_t f = H5Fcreate(file, H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
    CHECK(f >= 0);
    H5Pclose(fapl);
    hsize_t dims[2] = { 4, 8 }, chunk[2] = { 2, 8 };
    hid_t space = H5Screate_simple(2, dims, NULL), dcpl = H5Pcreate(H5P_DATASET_CREATE);
    /* attributes kept in the header (version 2 would move them to dense storage) */
    CHECK(H5Pset_chunk(dcpl, 2, chunk) >= 0 && H5Pset_attr_phase_change(dcpl, 100, 50) >= 0);
    hid_t chunked = H5Dcreate2(f, "/chunked", H5T_IEEE_F32LE, space, H5P_DEFAULT, dcpl, H5P_DEFAULT), d;
    CHECK(chunked >= 0);
    H5Pclose(dcpl);
    dcpl = H5Pcreate(H5P_DATASET_CREATE);
    CHECK(H5Pset_external(dcpl, fifo, 0, H5F_UNLIMITED) >= 0);
    CHECK((d = H5Dcreate2(f, "/external", H5T_IEEE_F32LE, space, H5P_DEFAULT, dcpl, H5P_DEFAULT)) >= 0);
    H5Dclose(d);
    H5Pclose(dcpl);
    dcpl = H5Pcreate(H5P_DATASET_CREATE);
    CHECK(H5Pset_virtual(dcpl, space, fifo, "/x", space) >= 0);
    CHECK((d = H5Dcreate2(f, "/virtual", H5T_IEEE_F32LE, space, H5P_DEFAULT, dcpl, H5P_DEFAULT)) >= 0);
    H5Dclose(d);
    H5Pclose(dcpl);
    H5Sclose(space);
    /* attributes added once other objects follow the header: it grows by continuation chunks */
    for (int i = 0; i < 24; i++) {
        char name[32];
        int64_t values[16] = { i };
        snprintf(name, sizeof name, "attr%02d", i);
        CHECK(mps_h5_attr_i64(chunked, name, values, 16) == 0);
    }
    H5Dclose(chunked);
    H5O_info_t oi;
    CHECK(H5Oget_info_by_name2(f, "/chunked", &oi, H5O_INFO_BASIC | H5O_INFO_HDR, H5P_DEFAULT) >= 0);
    CHECK_MSG(oi.hdr.version == version && oi.hdr.nchunks > 1, "v%u: /chunked has a version %u header of %u chunks",
              version, oi.hdr.version, oi.hdr.nchunks);
    CHECK(H5Fclose(f) >= 0);

    if (version == 1)
        bad_layout_version(file, oi.addr);
    for (int damaged = 0; damaged < 2; damaged++) {
        if (damaged)
            damage_global_heap(file);
        mps_err err;
        mps_err_clear(&err);
        CHECK((f = mps_h5_open_file(file, &err)) >= 0);
        static const char *const names[] = { "/chunked", "/external", "/virtual" };
        static const char *const needles[] = { NULL, "keeps its data in other files (external storage): refused",
                                                "keeps its data in other files (a virtual dataset): refused" };
        for (int i = damaged ? 2 : 0; i < 3; i++) {
            mps_err_clear(&err);
            d = mps_h5_open_dataset(f, names[i], file, &err);
            if (!needles[i]) {
                CHECK_MSG(d >= 0, "v%u: %s: %s", version, names[i], err.msg);
                if (d >= 0)
                    H5Dclose(d);
                continue;
            }
            CHECK_MSG(d < 0 && err.code == MPS_ECORRUPT && strstr(err.msg, file) && strstr(err.msg, names[i]) &&
                          strstr(err.msg, needles[i]) && !strchr(err.msg, '\n'),
                      "v%u%s: %s: code %d: %s", version, damaged ? " (damaged heap)" : "", names[i], err.code, err.msg);
            if (d >= 0)
                H5Dclose(d);
        }
        H5Fclose(f);
    }
}

int main(void)
{
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    alarm(300); /* a blocked open fails the test instead of hanging it */
    tmp = test_tmpdir("test_h5links");
    CHECK(tmp != NULL);
    if (!tmp)
        TEST_DONE();
    cli = getenv("MPSHARD");
    char model[1100];
    snprintf(model, sizeof model, "%s/m", tmp);
    snprintf(good, sizeof good, "%s/good", tmp);
    snprintf(ck, sizeof ck, "%s/ck", tmp);
    snprintf(fifo, sizeof fifo, "%s/fifo", tmp);
    CHECK(mkfifo(fifo, 0644) == 0);
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_synth_write(model, &cfg, MPS_FILE_SAFETENSORS, MPS_DTYPE_F32, 3, &err) == 0);
    snprintf(model, sizeof model, "%s/m/model.safetensors", tmp);
    mps_shard_opts o = { .layout = "dp=1", .out_dir = good, .quiet = 1, .threads = 1, .synthetic_optimizer = 1,
                         .synthetic_seed = 2 };
    CHECK_MSG(mps_shard(model, &o, &err) == 0, "%s", err.msg);

    trap("external link to a FIFO", e_external_link, NULL, "/param/wte", "an external link");
    trap("the kind's group an external link", e_external_group, NULL, "/param", "an external link");
    trap("soft link to another dataset", e_soft_link, NULL, "/param/h.0.ln1w", "a soft link");
    trap("external storage in a FIFO", e_external_storage, NULL, "/param/wpe", "external storage");
    trap("virtual dataset over a FIFO", e_virtual, NULL, "/param/wpe", "a virtual dataset");
    trap("virtual dataset, its global heap damaged", e_virtual, damage_global_heap, "/param/wpe", "a virtual dataset");
    trap("ln1w hard-linked to ln1b", e_swapped, NULL, "/param/h.0.ln1w", "not the param of tensor h.0.ln1w");
    trap("an adam_m dataset as param", e_other_kind, NULL, "/param/h.0.ln1b", "not the param of tensor h.0.ln1b");
    open_dataset_headers(H5F_LIBVER_EARLIEST, 1);
    open_dataset_headers(H5F_LIBVER_V18, 2);

    if (test_failures == 0) {
        char cmd[1200];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
        if (system(cmd) != 0)
            fprintf(stderr, "could not remove %s\n", tmp);
    }
    TEST_DONE();
}
