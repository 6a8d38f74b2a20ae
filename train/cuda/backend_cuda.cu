/* The CUDA backend: device memory from a stream-ordered pool, one stream for every copy and
 * kernel, errors kept in the context until sync reports them (the table's functions return
 * nothing), and the table itself. The kernels are in kernels_*.cu, gemm.cu, attention.cu,
 * attention_tc.cu, attention_fast.cu and attention_gqa.cu. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_internal.h"

/* ---------------------------------------------------------------- errors */

void cu_fail(mps_cuda *c, const char *fmt, ...)
{
    pthread_mutex_lock(&c->err_mu);
    if (!c->failed) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(c->msg, sizeof c->msg, fmt, ap);
        va_end(ap);
        c->failed = 1;
    }
    pthread_mutex_unlock(&c->err_mu);
}

int cu_check(mps_cuda *c, cudaError_t rc, const char *what)
{
    if (rc == cudaSuccess)
        return 0;
    cu_fail(c, "%s: %s", what, cudaGetErrorString(rc));
    return -1;
}

int cu_launched(mps_cuda *c, const char *what) { return cu_check(c, cudaGetLastError(), what); }

unsigned cu_grid(const mps_cuda *c, int64_t n, int bs)
{
    /* enough blocks to fill the device a few times over; the loops stride over the rest */
    int64_t want = (n + bs - 1) / bs, cap = (int64_t)c->nsm * 16;
    if (want > cap)
        want = cap;
    return (unsigned)(want < 1 ? 1 : want);
}

void *cu_scratch(mps_cuda *c, int slot, size_t bytes)
{
    if (bytes == 0)
        bytes = 1;
    if (c->scr_cap[slot] >= bytes)
        return c->scr[slot];
    /* stream-ordered: work queued before still sees the old buffer until it is done */
    if (c->scr[slot] && cu_check(c, cudaFreeAsync(c->scr[slot], c->stream), "scratch free") != 0)
        return NULL;
    c->scr[slot] = NULL;
    c->scr_cap[slot] = 0;
    size_t cap = (bytes + (2u << 20) - 1) & ~(size_t)((2u << 20) - 1); /* 2 MiB steps */
    void *p = NULL;
    cudaError_t rc = cudaMallocFromPoolAsync(&p, cap, c->pool, c->stream);
    if (rc != cudaSuccess) {
        (void)cudaGetLastError(); /* not sticky: do not let a later check report it twice */
        cu_fail(c, "scratch of %zu bytes: %s", cap, cudaGetErrorString(rc));
        return NULL;
    }
    c->scr[slot] = p;
    c->scr_cap[slot] = cap;
    return p;
}

/* ---------------------------------------------------------------- memory */

/* The memory entries may run on host threads other than the one that created the backend (the
 * checkpoint writer's threads call to_host): a new thread's current device is 0, so select ours. */
static int use_device(mps_cuda *c, const char *what) { return cu_check(c, cudaSetDevice(c->device), what); }

static void *cuda_alloc(void *ctx, size_t bytes)
{
    mps_cuda *c = (mps_cuda *)ctx;
    void *p = NULL;
    if (bytes == 0)
        bytes = 1;
    if (use_device(c, "alloc") != 0)
        return NULL;
    cudaError_t rc = cudaMallocFromPoolAsync(&p, bytes, c->pool, c->stream);
    if (rc != cudaSuccess) {
        (void)cudaGetLastError(); /* out of memory is the caller's error to report (NULL), not sticky */
        return NULL;
    }
    if (cu_check(c, cudaMemsetAsync(p, 0, bytes, c->stream), "alloc: memset") != 0) {
        (void)cudaFreeAsync(p, c->stream);
        return NULL;
    }
    return p;
}

static void cuda_release(void *ctx, void *p)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (p && use_device(c, "release") == 0) {
        cu_wcopy_invalidate(c, p, 0); /* the block's size is not known here: every copy */
        cu_check(c, cudaFreeAsync(p, c->stream), "release");
    }
}

static void cuda_zero(void *ctx, void *p, size_t bytes)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (bytes && use_device(c, "zero") == 0) {
        cu_wcopy_invalidate(c, p, bytes);
        cu_check(c, cudaMemsetAsync(p, 0, bytes, c->stream), "zero");
    }
}

static void cuda_copy(void *ctx, void *dst, const void *src, size_t bytes)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (bytes && dst != src && use_device(c, "copy") == 0) {
        cu_wcopy_invalidate(c, dst, bytes);
        cu_check(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, c->stream), "copy");
    }
}

/* Host copies are ordered after the queued kernels (same stream) and complete before returning.
 * Several host threads may call to_host at once: each one queues its copy and waits for the
 * stream; the runtime is thread-safe and nothing in the context is written but the error. */
static void cuda_to_host(void *ctx, void *host, const void *src, size_t bytes)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (!bytes || use_device(c, "to_host") != 0)
        return;
    if (cu_check(c, cudaMemcpyAsync(host, src, bytes, cudaMemcpyDeviceToHost, c->stream), "to_host") == 0)
        cu_check(c, cudaStreamSynchronize(c->stream), "to_host: synchronize");
}

/* 0 once the copy is queued behind the stream's work */
static int queue_from_host(mps_cuda *c, void *dst, const void *host, size_t bytes)
{
    if (!bytes || use_device(c, "from_host") != 0)
        return -1;
    cu_wcopy_invalidate(c, dst, bytes);
    return cu_check(c, cudaMemcpyAsync(dst, host, bytes, cudaMemcpyHostToDevice, c->stream), "from_host");
}

static void cuda_from_host(void *ctx, void *dst, const void *host, size_t bytes)
{
    mps_cuda *c = (mps_cuda *)ctx;
    /* the synchronisation makes the host buffer free for reuse even if it is pinned memory */
    if (queue_from_host(c, dst, host, bytes) == 0)
        cu_check(c, cudaStreamSynchronize(c->stream), "from_host: synchronize");
}

static void cuda_from_host_queued(void *ctx, void *dst, const void *host, size_t bytes)
{
    queue_from_host((mps_cuda *)ctx, dst, host, bytes);
}

static void *cuda_alloc_host(void *ctx, size_t bytes)
{
    mps_cuda *c = (mps_cuda *)ctx;
    void *p = NULL;
    if (use_device(c, "alloc_host") != 0)
        return NULL;
    /* pinned: device-to-host copies run at the link's rate and need no staging copy */
    if (cudaHostAlloc(&p, bytes ? bytes : 1, cudaHostAllocDefault) != cudaSuccess) {
        cudaGetLastError(); /* an allocation failure is the caller's to report, not a sticky error */
        return NULL;
    }
    return p; /* not zeroed: writing gigabytes of zeros would double the cost of pinning them */
}

static void cuda_release_host(void *ctx, void *p)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (p)
        cu_check(c, cudaFreeHost(p), "release_host");
}

static void *cuda_native_stream(void *ctx)
{
    return ((mps_cuda *)ctx)->stream;
}

static int cuda_sync(void *ctx, mps_err *err)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (use_device(c, "synchronize") == 0)
        cu_check(c, cudaStreamSynchronize(c->stream), "synchronize");
    cu_check(c, cudaGetLastError(), "asynchronous error");
    pthread_mutex_lock(&c->err_mu);
    int failed = c->failed;
    if (failed) {
        mps_fail(err, MPS_EFAIL, "CUDA: %s", c->msg);
        c->failed = 0;
        c->msg[0] = '\0';
    }
    pthread_mutex_unlock(&c->err_mu);
    return failed ? -1 : 0;
}

static void cuda_destroy(void *ctx)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (!c)
        return;
    if (c->stream)
        (void)cudaStreamSynchronize(c->stream);
    cu_gemm_plans_free(c);
    cu_wcopy_free(c);
    for (int i = 0; i < SCR_COUNT; i++)
        if (c->scr[i])
            (void)cudaFreeAsync(c->scr[i], c->stream);
    if (c->dres)
        (void)cudaFreeAsync(c->dres, c->stream);
    if (c->stream)
        (void)cudaStreamSynchronize(c->stream);
    if (c->lt)
        (void)cublasLtDestroy(c->lt);
    if (c->blas)
        (void)cublasDestroy(c->blas);
    if (c->workspace)
        (void)cudaFree(c->workspace);
    if (c->pool)
        (void)cudaMemPoolDestroy(c->pool);
    if (c->stream)
        (void)cudaStreamDestroy(c->stream);
    if (c->side)
        (void)cudaStreamDestroy(c->side);
    if (c->ev_fork)
        (void)cudaEventDestroy(c->ev_fork);
    if (c->ev_join)
        (void)cudaEventDestroy(c->ev_join);
    (void)cudaGetLastError();
    pthread_mutex_destroy(&c->res_mu);
    pthread_mutex_destroy(&c->err_mu);
    free(c);
}

/* ---------------------------------------------------------------- creation */

static int setup(mps_cuda *c, mps_err *err)
{
#define TRY(call)                                                                                          \
    do {                                                                                                   \
        cudaError_t rc_ = (call);                                                                          \
        if (rc_ != cudaSuccess)                                                                            \
            return mps_fail(err, MPS_EFAIL, "CUDA: %s: %s", #call, cudaGetErrorString(rc_));               \
    } while (0)
#define TRY_BLAS(call)                                                                                     \
    do {                                                                                                   \
        cublasStatus_t st_ = (call);                                                                       \
        if (st_ != CUBLAS_STATUS_SUCCESS)                                                                  \
            return mps_fail(err, MPS_EFAIL, "CUDA: %s: %s", #call, cublasGetStatusString(st_));            \
    } while (0)
    TRY(cudaGetDevice(&c->device));
    TRY(cudaDeviceGetAttribute(&c->nsm, cudaDevAttrMultiProcessorCount, c->device));
    TRY(cudaDeviceGetAttribute(&c->smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, c->device));
    TRY(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking));
    TRY(cudaStreamCreateWithFlags(&c->side, cudaStreamNonBlocking));
    TRY(cudaEventCreateWithFlags(&c->ev_fork, cudaEventDisableTiming));
    TRY(cudaEventCreateWithFlags(&c->ev_join, cudaEventDisableTiming));
    c->wgmma = c->attn_mode == MPS_ATTN_FAST && cu_wgmma_available(c);
    if (c->gemm_tune)
        cu_tune_setup(c);
    cudaMemPoolProps props;
    memset(&props, 0, sizeof props);
    props.allocType = cudaMemAllocationTypePinned;
    props.handleTypes = cudaMemHandleTypeNone;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = c->device;
    TRY(cudaMemPoolCreate(&c->pool, &props));
    /* keep freed memory in the pool (the default would return it to the driver at each sync) */
    uint64_t keep = UINT64_MAX;
    TRY(cudaMemPoolSetAttribute(c->pool, cudaMemPoolAttrReleaseThreshold, &keep));
    TRY(cudaMalloc(&c->workspace, MPS_CUDA_WORKSPACE));
    TRY(cudaMallocFromPoolAsync((void **)&c->dres, 1040 * sizeof(double), c->pool, c->stream));
    TRY_BLAS(cublasCreate(&c->blas));
    TRY_BLAS(cublasSetStream(c->blas, c->stream));
    TRY_BLAS(cublasSetWorkspace(c->blas, c->workspace, MPS_CUDA_WORKSPACE));
    TRY_BLAS(cublasLtCreate(&c->lt));
    TRY(cudaStreamSynchronize(c->stream));
#undef TRY
#undef TRY_BLAS
    return 0;
}

extern "C" int mps_backend_cuda(mps_backend *out, mps_err *err)
{
    int n = 0;
    cudaError_t rc = cudaGetDeviceCount(&n);
    if (rc != cudaSuccess || n == 0) {
        (void)cudaGetLastError();
        return mps_fail(err, MPS_EUNSUPPORTED, "--backend cuda: no CUDA device (%s)",
                        rc != cudaSuccess ? cudaGetErrorString(rc) : "none found");
    }
    mps_cuda *c = (mps_cuda *)calloc(1, sizeof *c);
    if (!c)
        return mps_fail(err, MPS_ENOMEM, "out of memory");
    pthread_mutex_init(&c->err_mu, NULL);
    pthread_mutex_init(&c->res_mu, NULL);
    /* MPS_CUDA_ATTENTION: unset (or anything else) = for head size 64 the wgmma kernels
     * (attention_wgmma.cu) on a card that runs them, else the bf16 mma.sync kernels
     * (attention_fast.cu); "mma" = those mma.sync kernels; "fp32" = the fp32 kernels for every head
     * size; "bf16" = the WMMA tensor-core kernels of attention_tc.cu */
    const char *vb = getenv("MPS_CUDA_VERBOSE");
    c->verbose = vb && strcmp(vb, "1") == 0;
    /* MPS_CUDA_GEMM_TUNE: unset or anything but "0": each GEMM shape takes the fastest of cuBLASLt's
     * first candidates, timed once per machine and kept in a cache file (gemm_tune.cu); "0": the
     * heuristic's first choice */
    const char *tn = getenv("MPS_CUDA_GEMM_TUNE");
    c->gemm_tune = !(tn && strcmp(tn, "0") == 0);
    const char *am = getenv("MPS_CUDA_ATTENTION");
    c->attn_mode = (am && strcmp(am, "bf16") == 0)   ? MPS_ATTN_BF16
                   : (am && strcmp(am, "fp32") == 0) ? MPS_ATTN_FP32
                   : (am && strcmp(am, "mma") == 0)  ? MPS_ATTN_MMA
                                                     : MPS_ATTN_FAST;
    if (setup(c, err) != 0) {
        cuda_destroy(c);
        return -1;
    }
    mps_backend b;
    memset(&b, 0, sizeof b);
    b.name = "cuda";
    b.ctx = c;
    b.device_memory = 1;
    /* The kernels take the head size and the attention width as parameters, but no GPU run has
     * checked a model whose n_head x head_dim is not n_embd yet: such models are refused unless
     * MPS_CUDA_ANY_HEAD_DIM=1, which tests/gpu/train_gpu.sh sets to check them against the CPU
     * backend and transformers (make it the default once that check has passed on the GPU host) */
    const char *ahd = getenv("MPS_CUDA_ANY_HEAD_DIM");
    b.any_head_dim = ahd && strcmp(ahd, "1") == 0;
    b.alloc = cuda_alloc;
    b.release = cuda_release;
    b.zero = cuda_zero;
    b.copy = cuda_copy;
    b.to_host = cuda_to_host;
    b.from_host = cuda_from_host;
    b.from_host_queued = cuda_from_host_queued;
    b.alloc_host = cuda_alloc_host;
    b.release_host = cuda_release_host;
    b.sync = cuda_sync;
    b.native_stream = cuda_native_stream;
    b.embed_fwd = cu_embed_fwd;
    b.embed_bwd = cu_embed_bwd;
    b.pos_fwd = cu_pos_fwd;
    b.pos_bwd = cu_pos_bwd;
    b.layernorm_fwd = cu_layernorm_fwd;
    b.layernorm_bwd = cu_layernorm_bwd;
    b.matmul_fwd = cu_matmul_fwd;
    b.matmul_bwd = cu_matmul_bwd;
    b.attention_fwd = cu_attention_fwd;
    b.attention_bwd = cu_attention_bwd;
    b.matmul_fwd_act = cu_matmul_fwd_act;
    b.matmul_parts_fwd_act = cu_matmul_parts_fwd_act;
    b.matmul_parts_bwd = cu_matmul_parts_bwd;
    b.matmul_gelu_fwd = cu_matmul_gelu_fwd;
    b.matmul_dgelu_bwd = cu_matmul_dgelu_bwd;
    b.rmsnorm_fwd = cu_rmsnorm_fwd;
    b.rmsnorm_bwd = cu_rmsnorm_bwd;
    b.rope_fwd = cu_rope_fwd;
    b.rope_bwd = cu_rope_bwd;
    b.swiglu_fwd = cu_swiglu_fwd;
    b.swiglu_bwd = cu_swiglu_bwd;
    b.gqa_fwd = cu_gqa_fwd;
    b.gqa_bwd = cu_gqa_bwd;
    b.residual_bias = cu_residual_bias;
    b.bias_grad = cu_bias_grad;
    b.add = cu_add;
    b.accumulate = cu_accumulate;
    b.act_bytes = (int)sizeof(act_t);
    b.xent_stats = cu_xent_stats;
    b.xent_rescale = cu_xent_rescale;
    b.xent_bwd = cu_xent_bwd;
    b.xent_stats_bwd = cu_xent_stats_bwd;
    b.xent_loss_add = cu_xent_loss_add;
    b.adamw_many = cu_adamw_many;
    b.sumsq_many = cu_sumsq_many;
    b.destroy = cuda_destroy;
    *out = b;
    return 0;
}
