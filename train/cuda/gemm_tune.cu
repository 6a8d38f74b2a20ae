/* GEMM tuning (MPS_CUDA_GEMM_TUNE, on by default): the first call of each GEMM shape times
 * cuBLASLt's first MPS_GEMM_CANDIDATES heuristic candidates and keeps the fastest. The choice goes
 * to a cache file, one line per shape, keyed by the card, its SM count, cuBLASLt's version and
 * the plan's full key, so that a later run (or another rank on the same host) reads it instead of
 * timing again: runs on one machine then use the same algorithms and stay bit-identical, which a
 * choice made by timing alone would not promise. It is the idea of PyTorch's TunableOp results
 * file. The file is untrusted input: a line that does not parse, names another key, or an index
 * beyond the candidates cuBLASLt offers now is ignored. Lookups and the timing run under an
 * exclusive flock() of the file, so that ranks sharing it time a shape once and agree. */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cuda_internal.h"

#define TUNE_FILE "gemm-tune-v1.txt"

/* mkdir -p of the directory part of path (best effort: open() reports what it cannot do) */
static void make_parents(const char *path)
{
    char buf[1024];
    if (strlen(path) >= sizeof buf)
        return;
    strcpy(buf, path);
    for (char *q = buf + 1; *q; q++)
        if (*q == '/') {
            *q = 0;
            (void)mkdir(buf, 0755);
            *q = '/';
        }
}

/* the cache file: MPS_CUDA_GEMM_CACHE (a path, or "none" for no file), else
 * $XDG_CACHE_HOME/mpshard/, else $HOME/.cache/mpshard/; "" when there is none. Its directories
 * are made here, once. */
void cu_tune_setup(mps_cuda *c)
{
    c->tune_path[0] = 0;
    const char *env = getenv("MPS_CUDA_GEMM_CACHE"), *xdg = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");
    int n = -1;
    if (env && *env)
        n = strcmp(env, "none") == 0 ? -1 : snprintf(c->tune_path, sizeof c->tune_path, "%s", env);
    else if (xdg && *xdg)
        n = snprintf(c->tune_path, sizeof c->tune_path, "%s/mpshard/" TUNE_FILE, xdg);
    else if (home && *home)
        n = snprintf(c->tune_path, sizeof c->tune_path, "%s/.cache/mpshard/" TUNE_FILE, home);
    if (n < 0 || n >= (int)sizeof c->tune_path)
        c->tune_path[0] = 0;
    if (c->tune_path[0])
        make_parents(c->tune_path);
    /* the machine part of every key: card name (spaces to '_'), SMs, cuBLASLt version */
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, c->device) != cudaSuccess) {
        (void)cudaGetLastError();
        strcpy(prop.name, "unknown");
    }
    prop.name[sizeof prop.name - 1] = 0;
    snprintf(c->tune_machine, sizeof c->tune_machine, "%s/%d/%zu", prop.name, c->nsm, cublasLtGetVersion());
    for (char *q = c->tune_machine; *q; q++)
        if (*q == ' ' || *q == '\t' || *q == '\n')
            *q = '_';
}

/* the key of a plan: the machine, then every field plan_get() compares (cap: the machine's
 * 320 bytes and 16 numbers of up to 11 characters fit) */
#define TUNE_KEY_CAP 528
static void tune_key(const mps_cuda *c, const mps_gemm_plan *p, char key[TUNE_KEY_CAP])
{
    snprintf(key, TUNE_KEY_CAP, "%s %d %d %d %d %d %d %d %d %d %d %d %d %d %u %u %u", c->tune_machine, p->ta, p->tb, p->m,
             p->n, p->k, p->lda, p->ldb, p->ldd, p->bias, p->epi, p->d_bf16, p->bias_bf16, p->ldaux, p->align_a,
             p->align_b, p->align_d);
}

/* the candidate index the file holds for key (lines "KEY ncand index"; the last valid one wins),
 * or -1 */
static int tune_lookup(FILE *f, const char *key, int ncand)
{
    char line[TUNE_KEY_CAP + 32];
    const size_t kl = strlen(key);
    int found = -1;
    rewind(f);
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, key, kl) != 0 || line[kl] != ' ')
            continue;
        int nc = 0, idx = 0;
        char tail = 0;
        if (sscanf(line + kl, " %d %d %c", &nc, &idx, &tail) != 2)
            continue;
        if (nc == ncand && idx >= 0 && idx < ncand)
            found = idx;
    }
    return found;
}

/* times each candidate of p (one warm-up, then the best of 3) with the call's operands; the index
 * of the fastest, or -1. The candidates write the call's own D (and aux, which GELU_AUX writes),
 * which the real call overwrites after, unless the product accumulates into D (beta != 0 with C =
 * D): then they write into scratch, so that D is read unchanged. */
static int tune_time(mps_cuda *c, mps_gemm_plan *p, const char *what, const void *A, const void *B, float beta,
                     const void *Cm, void *D, const void *bias, const void *aux)
{
    void *d = D;
    if (beta != 0.0f && Cm == D) {
        const size_t esz = p->d_bf16 ? 2 : 4, dbytes = (size_t)p->ldd * p->n * esz;
        if (p->epi == MPS_EPI_GELU_AUX || dbytes > ((size_t)1 << 30))
            return -1; /* (no such call: the accumulating products are the small dw ones) */
        if (!(d = cu_scratch(c, SCR_TUNE, dbytes)))
            return -1;
    }
    if (bias)
        cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias);
    if (aux)
        cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux, sizeof aux);
    cudaEvent_t e0, e1;
    if (cudaEventCreate(&e0) != cudaSuccess)
        return -1;
    if (cudaEventCreate(&e1) != cudaSuccess) {
        cudaEventDestroy(e0);
        return -1;
    }
    const float alpha = 1.0f;
    float best = INFINITY;
    int besti = -1;
    for (int i = 0; i < p->ncand; i++) {
        float t = INFINITY;
        for (int r = 0; r < 4; r++) {
            cudaEventRecord(e0, c->stream);
            cublasStatus_t st = cublasLtMatmul(c->lt, p->desc, &alpha, A, p->la, B, p->lb, &beta, Cm, p->ld, d, p->ld,
                                               &p->cand[i], c->workspace, MPS_CUDA_WORKSPACE, c->stream);
            cudaEventRecord(e1, c->stream);
            float ms = INFINITY;
            if (st != CUBLAS_STATUS_SUCCESS || cudaEventSynchronize(e1) != cudaSuccess ||
                cudaEventElapsedTime(&ms, e0, e1) != cudaSuccess)
                break;
            if (r > 0 && ms < t)
                t = ms;
        }
        if (c->verbose)
            fprintf(stderr, "cuda: gemm tune %s: m %d n %d k %d: candidate %d %.4f ms\n", what, p->m, p->n, p->k, i, t);
        if (t < best)
            best = t, besti = i;
    }
    (void)cudaGetLastError(); /* a candidate that failed to run is skipped, not an error */
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    return besti;
}

/* Picks p->algo among p->cand: from the cache file when it has this plan's key, else by timing
 * (and the choice is appended to the file). */
void cu_plan_tune(mps_cuda *c, mps_gemm_plan *p, const char *what, const void *A, const void *B, float beta,
                  const void *Cm, void *D, const void *bias, const void *aux)
{
    p->tuned = 1;
    char key[TUNE_KEY_CAP];
    tune_key(c, p, key);
    FILE *f = NULL;
    if (c->tune_path[0]) {
        const int fd = open(c->tune_path, O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
        if (fd >= 0 && !(f = fdopen(fd, "a+")))
            close(fd);
        if (!f && c->verbose)
            fprintf(stderr, "cuda: gemm tune cache %s: %s (tuning without it)\n", c->tune_path, strerror(errno));
        if (f && flock(fileno(f), LOCK_EX) != 0 && c->verbose)
            fprintf(stderr, "cuda: gemm tune cache %s: no lock: %s\n", c->tune_path, strerror(errno));
    }
    int idx = f ? tune_lookup(f, key, p->ncand) : -1;
    if (idx >= 0) {
        if (c->verbose)
            fprintf(stderr, "cuda: gemm tune %s: m %d n %d k %d: candidate %d from %s\n", what, p->m, p->n, p->k, idx,
                    c->tune_path);
    } else {
        idx = tune_time(c, p, what, A, B, beta, Cm, D, bias, aux);
        if (f && idx >= 0) {
            fprintf(f, "%s %d %d\n", key, p->ncand, idx);
            fflush(f);
        }
    }
    if (f) {
        flock(fileno(f), LOCK_UN);
        fclose(f);
    }
    if (idx >= 0)
        p->algo = p->cand[idx];
}
