/* mpshard ls: where each tensor of a checkpoint is stored; mpshard extract: one tensor as a file. */
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckpt_list.h"
#include "cli.h"
#include "extract.h"

static const char *const ls_help =
    "usage: mpshard ls DIR [--tensor NAME] [--kind K] [--json]\n"
    "\n"
    "Lists where checkpoint DIR (any layout; a run directory: its latest) stores each tensor: for\n"
    "every stored state kind and tensor, each piece with the file of the rank that stores it (a\n"
    "piece held by several ranks is stored once, by its owner), the HDF5 dataset, the box of the\n"
    "canonical tensor ([begin:end] per dimension), the elements of the box it holds (all, or a ZeRO\n"
    "flat range [begin, end) in row-major order) and its bytes (f32, uncompressed). Reads only the\n"
    "manifest.\n"
    "\n"
    "  --tensor NAME   only this tensor (wte, wpe, h.0.qkvw, ..., lnfw, lnfb)\n"
    "  --kind K        only this state kind (param, master, adam_m, adam_v)\n"
    "  --json          {\"checkpoint\", \"layout\", \"pieces\": [{\"tensor\", \"kind\", \"rank\", \"file\",\n"
    "                  \"dataset\", \"box_offset\", \"box_count\", \"flat_range\", \"shape\", \"bytes\"}]}\n";

static const char *const extract_help =
    "usage: mpshard extract DIR --tensor NAME [--kind K] -o FILE.npy|FILE.safetensors [options]\n"
    "\n"
    "Writes one tensor of checkpoint DIR (any layout) in its canonical shape and f32, gathered from\n"
    "the pieces that hold it in bands of bounded size: a NumPy .npy file, or a .safetensors file\n"
    "holding the one tensor under its canonical name (the kind and checkpoint id in its metadata).\n"
    "The whole padded vocabulary of wte is written.\n"
    "\n"
    "  --tensor NAME    the canonical tensor (mpshard ls DIR lists them; required)\n"
    "  --kind K         param (default), master, adam_m or adam_v\n"
    "  -o, --out FILE   output file; its extension picks the format\n"
    "  --memory-mb N    tensor data held in memory at once (default 64)\n"
    "  --force          replace an existing FILE\n"
    "  -q, --quiet      no progress on stderr\n";

typedef struct {
    char *cols[7];
} row;

typedef struct {
    int json;
    json_t *pieces;
    row *rows;
    int n, cap;
} ls_ctx;

static char *box_text(const mps_box *b)
{
    char buf[256] = "[";
    size_t n = 1;
    for (int d = 0; d < b->ndim; d++)
        n += (size_t)snprintf(buf + n, sizeof buf - n, "%s%lld:%lld", d ? ", " : "", (long long)b->off[d],
                              (long long)(b->off[d] + b->cnt[d]));
    snprintf(buf + n, sizeof buf - n, "]");
    return strdup(buf);
}

static json_t *int_array(const int64_t *v, int n)
{
    json_t *a = json_array();
    for (int i = 0; i < n; i++)
        json_array_append_new(a, json_integer(v[i]));
    return a;
}

static int add_piece(void *arg, const mps_listed_piece *p, mps_err *err)
{
    ls_ctx *x = arg;
    if (x->json) {
        int64_t flat[2] = { p->flat_begin, p->flat_end }, one = p->flat_end - p->flat_begin;
        json_t *o = json_pack("{s:s, s:s, s:i, s:s, s:s, s:o, s:o, s:o, s:o, s:I}", "tensor", p->spec->name, "kind",
                              mps_kind_name(p->kind), "rank", p->rank, "file", p->file, "dataset", p->dataset,
                              "box_offset", int_array(p->box.off, p->box.ndim), "box_count",
                              int_array(p->box.cnt, p->box.ndim), "flat_range", int_array(flat, 2), "shape",
                              p->whole_box ? int_array(p->box.cnt, p->box.ndim) : int_array(&one, 1), "bytes",
                              (json_int_t)p->bytes);
        if (!o || json_array_append_new(x->pieces, o) != 0)
            return mps_fail(err, MPS_ENOMEM, "out of memory");
        return 0;
    }
    if (x->n == x->cap) {
        int cap = x->cap ? 2 * x->cap : 64;
        row *r = realloc(x->rows, (size_t)cap * sizeof *r);
        if (!r)
            return mps_fail(err, MPS_ENOMEM, "out of memory");
        x->rows = r;
        x->cap = cap;
    }
    char flat[64], bytes[32];
    if (p->whole_box)
        snprintf(flat, sizeof flat, "all");
    else
        snprintf(flat, sizeof flat, "[%lld, %lld)", (long long)p->flat_begin, (long long)p->flat_end);
    snprintf(bytes, sizeof bytes, "%lld", (long long)p->bytes);
    row *r = &x->rows[x->n++];
    const char *src[7] = { p->spec->name, mps_kind_name(p->kind), p->file, p->dataset, NULL, flat, bytes };
    for (int i = 0; i < 7; i++)
        r->cols[i] = i == 4 ? box_text(&p->box) : strdup(src[i]);
    for (int i = 0; i < 7; i++)
        if (!r->cols[i])
            return mps_fail(err, MPS_ENOMEM, "out of memory");
    return 0;
}

/* The rows as a table: columns padded to their widest entry, bytes right-aligned. */
static void print_rows(const ls_ctx *x)
{
    static const char *const head[7] = { "tensor", "kind", "file", "dataset", "box", "elements", "bytes" };
    int w[7];
    for (int i = 0; i < 7; i++) {
        w[i] = (int)strlen(head[i]);
        for (int j = 0; j < x->n; j++)
            if ((int)strlen(x->rows[j].cols[i]) > w[i])
                w[i] = (int)strlen(x->rows[j].cols[i]);
    }
    for (int j = -1; j < x->n; j++) {
        const char *const *c = j < 0 ? head : (const char *const *)x->rows[j].cols;
        printf("%-*s  %-*s  %-*s  %-*s  %-*s  %-*s  %*s\n", w[0], c[0], w[1], c[1], w[2], c[2], w[3], c[3], w[4], c[4],
               w[5], c[5], w[6], c[6]);
    }
}

static void free_rows(ls_ctx *x)
{
    for (int j = 0; j < x->n; j++)
        for (int i = 0; i < 7; i++)
            free(x->rows[j].cols[i]);
    free(x->rows);
}

int cmd_ls(int argc, char **argv)
{
    static const struct option opts[] = {
        { "tensor", required_argument, 0, 't' }, { "kind", required_argument, 0, 'k' },
        { "json", no_argument, 0, 'j' }, { "help", no_argument, 0, 'h' }, { 0, 0, 0, 0 },
    };
    const char *tensor = NULL, *kind = NULL;
    ls_ctx x = { 0 };
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 't': tensor = optarg; break;
        case 'k': kind = optarg; break;
        case 'j': x.json = 1; break;
        case 'h': fputs(ls_help, stdout); return 0;
        default: return cli_bad_option("ls", "h", opts, argc, argv);
        }
    }
    if (optind != argc - 1)
        return cli_usage("ls", "expected one checkpoint DIR");
    int k = -1;
    if (kind && ((k = mps_kind_from_name(kind)) < 0 || k == MPS_KIND_GRAD))
        return cli_usage("ls", "--kind '%s': expected param, master, adam_m or adam_v", kind);
    mps_err err;
    mps_err_clear(&err);
    mps_ckpt *ck;
    if (mps_ckpt_open(argv[optind], &ck, &err) != 0)
        return cli_fail("ls", &err);
    const mps_manifest *m = mps_ckpt_manifest(ck);
    int t = -1;
    if (tensor && (t = mps_tensor_find(&m->cfg, tensor)) < 0) {
        mps_ckpt_close(ck);
        return cli_usage("ls", "--tensor '%s': the model has no such tensor (mpshard ls %s lists them)", tensor,
                         argv[optind]);
    }
    if (k >= 0 && !(m->kinds & (1u << k))) {
        mps_ckpt_close(ck);
        return cli_usage("ls", "--kind %s: %s stores no %s", kind, argv[optind], kind);
    }
    x.pieces = json_array();
    int n = x.pieces ? mps_ckpt_list(ck, t, k, add_piece, &x, &err) : mps_fail(&err, MPS_ENOMEM, "out of memory");
    if (n >= 0) {
        if (x.json) { /* one piece per line */
            char layout[256];
            mps_layout_format(&m->layout, layout, sizeof layout);
            json_t *head = json_pack("{s:s, s:s}", "checkpoint", mps_ckpt_dir(ck), "layout", layout);
            char *text = head ? json_dumps(head, JSON_COMPACT) : NULL;
            json_decref(head);
            if (!text)
                n = mps_fail(&err, MPS_ENOMEM, "out of memory");
            else
                printf("%.*s,\n \"pieces\": [\n", (int)strlen(text) - 1, text); /* without its closing brace */
            free(text);
            for (size_t i = 0; n >= 0 && i < json_array_size(x.pieces); i++) {
                char *piece = json_dumps(json_array_get(x.pieces, i), JSON_COMPACT);
                if (!piece) {
                    n = mps_fail(&err, MPS_ENOMEM, "out of memory");
                    break;
                }
                printf("  %s%s\n", piece, i + 1 < json_array_size(x.pieces) ? "," : "");
                free(piece);
            }
            if (n >= 0)
                printf(" ]}\n");
        } else {
            print_rows(&x);
        }
    }
    json_decref(x.pieces);
    free_rows(&x);
    mps_ckpt_close(ck);
    return n < 0 ? cli_fail("ls", &err) : 0;
}

int cmd_extract(int argc, char **argv)
{
    static const struct option opts[] = {
        { "tensor", required_argument, 0, 't' }, { "kind", required_argument, 0, 'k' },
        { "out", required_argument, 0, 'o' }, { "memory-mb", required_argument, 0, 'm' },
        { "force", no_argument, 0, 'F' }, { "quiet", no_argument, 0, 'q' }, { "help", no_argument, 0, 'h' },
        { 0, 0, 0, 0 },
    };
    mps_extract_opts o = { 0 };
    int64_t v;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "o:qh", opts, NULL)) != -1) {
        switch (c) {
        case 't': o.tensor = optarg; break;
        case 'k': o.kind = optarg; break;
        case 'o': o.out_path = optarg; break;
        case 'm': if (cli_int("extract", "--memory-mb", optarg, 1, 1 << 20, &v)) return MPS_EUSAGE; o.memory_budget = v << 20; break;
        case 'F': o.force = 1; break;
        case 'q': o.quiet = 1; break;
        case 'h': fputs(extract_help, stdout); return 0;
        default: return cli_bad_option("extract", "o:qh", opts, argc, argv);
        }
    }
    if (optind != argc - 1)
        return cli_usage("extract", "expected one checkpoint DIR");
    if (!o.tensor || !o.out_path)
        return cli_usage("extract", "--tensor and -o are required");
    mps_err err;
    mps_err_clear(&err);
    return mps_extract(argv[optind], &o, &err) != 0 ? cli_fail("extract", &err) : 0;
}
