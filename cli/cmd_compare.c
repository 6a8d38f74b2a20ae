#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "compare.h"

#define MAX_LINES 20 /* lines about tensors that differ, before the summary (all with --per-tensor) */

static const char *const help =
    "usage: mpshard compare A B [--rtol R] [--atol A] [--per-tensor]\n"
    "\n"
    "A and B are each a checkpoint (any layout; a run directory stands for its latest), a model file\n"
    "(safetensors or llm.c, any dtype, widened to f32) or a directory holding model.safetensors:\n"
    "  two checkpoints: every state kind both store, of every tensor, and the scalar state\n"
    "  a checkpoint and a model file: the checkpoint's parameters against the model's tensors\n"
    "  two model files: every tensor\n"
    "Bit for bit by default. With --rtol and/or --atol, an element a of A within atol + rtol * |b| of\n"
    "its b of B counts as equal: each tensor's largest absolute and relative (|a - b| / |b|) errors are\n"
    "measured, the tensors outside the tolerance listed, and one summary line gives the largest errors.\n"
    "The padded vocabulary rows of wte count only where both sides store them (checkpoints and llm.c\n"
    "files do, safetensors files do not) with the same padding.\n"
    "Exit 0 when identical (or within the tolerance), 1 when not.\n"
    "\n"
    "  --rtol R         relative tolerance (default 0)\n"
    "  --atol A         absolute tolerance (default 0)\n"
    "  --per-tensor     a line for every tensor, not only for those that differ\n"
    "  --memory-mb N    checkpoint data held at once (default 256; a model file's tensor is read whole)\n";

typedef struct {
    int lines, shown_all;
} printer;

static void print_line(void *ctx, const char *line)
{
    printer *p = ctx;
    if (p->shown_all || p->lines++ < MAX_LINES)
        printf("%s\n", line);
}

static int parse_tol(const char *opt, const char *v, double *out)
{
    char *end;
    double x = strtod(v, &end);
    if (end == v || *end || !(x >= 0 && x < INFINITY)) {
        cli_usage("compare", "%s '%s': expected a number >= 0", opt, v);
        return -1;
    }
    *out = x;
    return 0;
}

int cmd_compare(int argc, char **argv)
{
    static const struct option opts[] = {
        { "rtol", required_argument, 0, 'r' }, { "atol", required_argument, 0, 'a' },
        { "per-tensor", no_argument, 0, 'p' }, { "memory-mb", required_argument, 0, 'm' },
        { "help", no_argument, 0, 'h' }, { 0, 0, 0, 0 },
    };
    printer pr = { 0, 0 };
    mps_compare_opts o = { .report = print_line, .ctx = &pr };
    int64_t v;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'r': if (parse_tol("--rtol", optarg, &o.rtol)) return MPS_EUSAGE; o.tolerance = 1; break;
        case 'a': if (parse_tol("--atol", optarg, &o.atol)) return MPS_EUSAGE; o.tolerance = 1; break;
        case 'p': o.per_tensor = pr.shown_all = 1; break;
        case 'm': if (cli_int("compare", "--memory-mb", optarg, 1, 1 << 20, &v)) return MPS_EUSAGE; o.budget = v << 20; break;
        case 'h': fputs(help, stdout); return 0;
        default: return cli_bad_option("compare", "h", opts, argc, argv);
        }
    }
    if (optind != argc - 2)
        return cli_usage("compare", "expected two checkpoints or model files A and B");
    mps_err err;
    mps_err_clear(&err);
    mps_compare_result r;
    int rc = mps_compare(argv[optind], argv[optind + 1], &o, &r, &err);
    if (rc < 0)
        return cli_fail("compare", &err);
    if (r.shapes_differ)
        return 1;
    if (pr.lines > MAX_LINES)
        printf("... %d more lines\n", pr.lines - MAX_LINES);
    static const char *const what[] = {
        [MPS_COMPARE_CKPTS] = "every stored state kind of every tensor",
        [MPS_COMPARE_MODELS] = "every tensor of the two model files",
        [MPS_COMPARE_CKPT_MODEL] = "the checkpoint's parameters and the model file's tensors",
    };
    if (!o.tolerance && rc == 0)
        printf("identical: %s, bit for bit (%d tensors, %lld elements)\n", what[r.what], r.tensors,
               (long long)r.elements);
    else if (!o.tolerance)
        printf("differ: %d of %d tensors, %lld of %lld elements (max abs diff %.3g, in %s)%s\n", r.tensors_differ,
               r.tensors, (long long)r.elements_differ, (long long)r.elements, r.max_abs,
               r.max_abs_at[0] ? r.max_abs_at : "-", r.state_differs ? "; the state differs too" : "");
    else
        printf("%s tolerance (rtol %g, atol %g): %d of %d tensors, %lld of %lld elements outside; max abs error %.3g "
               "(%s), max rel error %.3g (%s)%s\n", r.tensors_differ ? "outside" : "within", o.rtol, o.atol,
               r.tensors_differ, r.tensors, (long long)r.elements_differ, (long long)r.elements, r.max_abs,
               r.max_abs_at[0] ? r.max_abs_at : "-", r.max_rel, r.max_rel_at[0] ? r.max_rel_at : "-",
               r.state_differs ? "; the state differs" : "");
    return rc;
}
