#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <string.h>

#include "ckpt.h"
#include "cli.h"

static const char *const help =
    "usage: mpshard verify DIR [--json] [--threads N] [-q]\n"
    "\n"
    "Checks checkpoint DIR: the manifest checksum, every rank's file (present, recorded size,\n"
    "same checkpoint id), every expected dataset (shape, box attributes, filters) and every chunk\n"
    "(decodes, matches its xxh3 checksum). Prints one line per problem, naming file and tensor.\n"
    "Exit 0 when intact, 3 when a problem was found.\n"
    "\n"
    "  --json          print {\"ok\": bool, \"problems\": [...], \"chunks\": n, \"bytes\": n}\n"
    "  --threads N     reader threads (default: all cores)\n"
    "  -q, --quiet     no progress on stderr\n";

typedef struct { int json; json_t *list; } report_ctx;

static void report(void *ctx, const char *line)
{
    report_ctx *r = ctx;
    if (r->json)
        json_array_append_new(r->list, json_string(line));
    else
        fprintf(stderr, "mpshard verify: %s\n", line);
}

int cmd_verify(int argc, char **argv)
{
    static const struct option opts[] = {
        { "json", no_argument, 0, 'j' }, { "threads", required_argument, 0, 't' },
        { "quiet", no_argument, 0, 'q' }, { "help", no_argument, 0, 'h' }, { 0, 0, 0, 0 },
    };
    report_ctx rc = { 0, NULL };
    mps_verify_opts o = { .report = report, .report_ctx = &rc };
    int64_t v;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "qh", opts, NULL)) != -1) {
        switch (c) {
        case 'j': rc.json = 1; break;
        case 't': if (cli_int("verify", "--threads", optarg, 1, 1024, &v)) return MPS_EUSAGE; o.threads = (int)v; break;
        case 'q': o.quiet = 1; break;
        case 'h': fputs(help, stdout); return 0;
        default: return cli_bad_option("verify", "qh", opts, argc, argv);
        }
    }
    if (optind != argc - 1)
        return cli_usage("verify", "expected one checkpoint DIR");
    rc.list = json_array();
    mps_err err;
    mps_err_clear(&err);
    int problems = mps_verify(argv[optind], &o, &err);
    if (problems < 0) {
        if (!rc.json) {
            json_decref(rc.list);
            return cli_fail("verify", &err);
        }
        json_array_append_new(rc.list, json_string(err.msg));
    }
    if (rc.json) {
        json_t *out = json_pack("{s:s, s:b, s:O, s:I, s:I}", "checkpoint", argv[optind], "ok", problems == 0, "problems",
                                rc.list, "chunks", (json_int_t)o.chunks_checked, "bytes", (json_int_t)o.bytes_checked);
        char *text = json_dumps(out, JSON_INDENT(2));
        puts(text);
        free(text);
        json_decref(out);
    } else if (problems == 0) {
        printf("%s: OK (%lld chunks, %.3f GB checked)\n", argv[optind], (long long)o.chunks_checked,
               o.bytes_checked / 1e9);
    } else {
        fprintf(stderr, "mpshard verify: %s: %d problem%s found\n", argv[optind], problems, problems == 1 ? "" : "s");
    }
    json_decref(rc.list);
    if (problems < 0)
        return err.code ? err.code : MPS_EFAIL;
    return problems == 0 ? 0 : MPS_ECORRUPT;
}
