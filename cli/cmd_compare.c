#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ckpt.h"
#include "cli.h"
#include "modelfile.h"

static void print_line(void *ctx, const char *line)
{
    (void)ctx;
    printf("%s\n", line);
}

/* a checkpoint directory, or a run directory whose latest is one */
static int is_checkpoint(const char *path)
{
    char dir[4200], manifest[4400];
    mps_err err;
    mps_err_clear(&err);
    if (mps_ckpt_resolve(path, dir, sizeof dir, &err) < 0)
        return 0;
    snprintf(manifest, sizeof manifest, "%s/" MPS_MANIFEST_NAME, dir);
    return access(manifest, F_OK) == 0;
}

static const char *const help =
    "usage: mpshard compare A B\n"
    "\n"
    "A and B are two checkpoint directories (any layouts): every stored state kind of every tensor\n"
    "and the scalar state are compared bit for bit. Or:\n"
    "Reads every canonical tensor of model files A and B (safetensors or llm.c, any dtype, widened\n"
    "to f32) and compares them bit for bit (the padded vocabulary rows of llm.c files included when\n"
    "both have them). Exit 0 when identical, 1 when they differ.\n";

int cmd_compare(int argc, char **argv)
{
    static const struct option opts[] = { { "help", no_argument, 0, 'h' }, { 0, 0, 0, 0 } };
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        if (c == 'h') { fputs(help, stdout); return 0; }
        return MPS_EUSAGE;
    }
    if (optind != argc - 2)
        return cli_usage("compare", "expected two model files");
    mps_err err;
    mps_err_clear(&err);
    /* one checkpoint makes it a checkpoint comparison: the other one, if not a committed checkpoint
     * (a crashed run's staging directory, a damaged manifest), is then reported as such */
    if (is_checkpoint(argv[optind]) || is_checkpoint(argv[optind + 1])) {
        int rc = mps_ckpt_compare(argv[optind], argv[optind + 1], (int64_t)256 << 20, print_line, NULL, &err);
        if (rc < 0)
            return cli_fail("compare", &err);
        if (rc == 0)
            printf("identical: every stored state kind of every tensor, bit for bit\n");
        return rc;
    }
    mps_model_file *a = NULL, *b = NULL;
    mps_model_file_opts fo = { 0 };
    if (mps_model_file_open(argv[optind], &fo, &a, &err) != 0 || mps_model_file_open(argv[optind + 1], &fo, &b, &err) != 0) {
        mps_model_file_close(a);
        return cli_fail("compare", &err);
    }
    const mps_config *ca = mps_model_file_config(a), *cb = mps_model_file_config(b);
    const int ntensors = mps_tensor_count(ca); /* a and b are closed before the summary */
    if (ca->n_layer != cb->n_layer || ca->n_embd != cb->n_embd || ca->n_head != cb->n_head ||
        ca->n_positions != cb->n_positions || ca->vocab != cb->vocab) {
        printf("models differ in shape\n");
        mps_model_file_close(a);
        mps_model_file_close(b);
        return 1;
    }
    int differ = 0, rc = 0;
    int64_t elements = 0;
    for (int t = 0; t < mps_tensor_count(ca) && rc == 0; t++) {
        mps_tensor_spec sa, sb;
        mps_tensor_spec_get(ca, t, &sa);
        mps_tensor_spec_get(cb, t, &sb);
        int64_t na = mps_tensor_numel(&sa), nb = mps_tensor_numel(&sb);
        float *x = malloc((size_t)na * sizeof(float)), *y = malloc((size_t)nb * sizeof(float));
        if (!x || !y) {
            mps_fail(&err, MPS_ENOMEM, "out of memory");
            rc = -1;
        } else if (mps_model_file_read_tensor(a, t, x, &err) != 0 || mps_model_file_read_tensor(b, t, y, &err) != 0) {
            rc = -1;
        } else {
            /* compare the real rows (padded vocab rows only when both files have the same padding) */
            int64_t n = na < nb ? na : nb;
            if (t == MPS_TENSOR_WTE && na != nb)
                n = ca->vocab * ca->n_embd;
            double maxdiff = 0;
            int64_t ndiff = 0;
            for (int64_t i = 0; i < n; i++)
                if (memcmp(&x[i], &y[i], sizeof(float)) != 0) {
                    ndiff++;
                    double d = fabs((double)x[i] - (double)y[i]);
                    if (d > maxdiff) maxdiff = d;
                }
            elements += n;
            if (ndiff) {
                differ++;
                printf("%s: %lld of %lld elements differ (max abs diff %g)\n", sa.name, (long long)ndiff, (long long)n, maxdiff);
            }
        }
        free(x);
        free(y);
    }
    mps_model_file_close(a);
    mps_model_file_close(b);
    if (rc != 0)
        return cli_fail("compare", &err);
    if (differ) {
        printf("%d tensors differ\n", differ);
        return 1;
    }
    printf("identical: %d tensors, %lld elements, bit for bit\n", ntensors, (long long)elements);
    return 0;
}
