/* A CUPTI injection library: with CUDA_INJECTION64_PATH=<this .so> and MPS_TRACE_OUT=<file>, any
 * CUDA program (mpshard train, python3 torch_llama.py) writes one line per kernel, memcpy, memset
 * and CUDA runtime call, with the device's and the host's timestamps (ns, one clock), for
 * bench/timeline.py: where the GPU sits idle between kernels, and what the host was doing then.
 * The clocks are the card's as it runs (no replay, no locked clocks: unlike ncu).
 * Build: bench/train_timeline.sh (cc -shared -fPIC ... -lcupti). A bench tool, not part of mpshard.
 *   K start end stream correlation name
 *   M start end bytes copykind        (memcpy)      S start end bytes  (memset)
 *   R start end correlation name       (a CUDA runtime call on the host) */
#include <cupti.h>
#include <stdio.h>
#include <stdlib.h>

#define TRACE_BUF (8u << 20)

static FILE *trace_out; /* the tool's one output, set once by InitializeInjection */

static void CUPTIAPI buffer_requested(uint8_t **buf, size_t *size, size_t *max_records)
{
    *buf = (uint8_t *)aligned_alloc(8, TRACE_BUF);
    *size = *buf ? TRACE_BUF : 0;
    *max_records = 0;
}

static void write_record(const CUpti_Activity *r)
{
    switch (r->kind) {
    case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL:
    case CUPTI_ACTIVITY_KIND_KERNEL: {
        const CUpti_ActivityKernel10 *k = (const CUpti_ActivityKernel10 *)r;
        fprintf(trace_out, "K %llu %llu %u %u %s\n", (unsigned long long)k->start, (unsigned long long)k->end,
                k->streamId, k->correlationId, k->name ? k->name : "?");
        break;
    }
    case CUPTI_ACTIVITY_KIND_MEMCPY: {
        const CUpti_ActivityMemcpy6 *m = (const CUpti_ActivityMemcpy6 *)r;
        fprintf(trace_out, "M %llu %llu %llu %u\n", (unsigned long long)m->start, (unsigned long long)m->end,
                (unsigned long long)m->bytes, (unsigned)m->copyKind);
        break;
    }
    case CUPTI_ACTIVITY_KIND_MEMSET: {
        const CUpti_ActivityMemset4 *m = (const CUpti_ActivityMemset4 *)r;
        fprintf(trace_out, "S %llu %llu %llu\n", (unsigned long long)m->start, (unsigned long long)m->end,
                (unsigned long long)m->bytes);
        break;
    }
    case CUPTI_ACTIVITY_KIND_RUNTIME: {
        const CUpti_ActivityAPI *a = (const CUpti_ActivityAPI *)r;
        const char *name = NULL;
        if (cuptiGetCallbackName(CUPTI_CB_DOMAIN_RUNTIME_API, a->cbid, &name) != CUPTI_SUCCESS || !name)
            name = "?";
        fprintf(trace_out, "R %llu %llu %u %s\n", (unsigned long long)a->start, (unsigned long long)a->end,
                a->correlationId, name);
        break;
    }
    default:
        break;
    }
}

static void CUPTIAPI buffer_completed(CUcontext ctx, uint32_t stream, uint8_t *buf, size_t size, size_t valid)
{
    (void)ctx, (void)stream, (void)size;
    CUpti_Activity *r = NULL;
    while (cuptiActivityGetNextRecord(buf, valid, &r) == CUPTI_SUCCESS)
        write_record(r);
    free(buf);
}

static void flush_at_exit(void)
{
    cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
    if (trace_out)
        fclose(trace_out);
    trace_out = NULL;
}

/* called by the CUDA driver when CUDA_INJECTION64_PATH names this library */
int InitializeInjection(void)
{
    const char *path = getenv("MPS_TRACE_OUT");
    if (!path || !(trace_out = fopen(path, "w"))) {
        fprintf(stderr, "cupti_trace: MPS_TRACE_OUT is not a writable file: no trace\n");
        return 1;
    }
    if (cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed) != CUPTI_SUCCESS ||
        cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) != CUPTI_SUCCESS ||
        cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY) != CUPTI_SUCCESS ||
        cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET) != CUPTI_SUCCESS ||
        cuptiActivityEnable(CUPTI_ACTIVITY_KIND_RUNTIME) != CUPTI_SUCCESS) {
        fprintf(stderr, "cupti_trace: CUPTI activity tracing could not be enabled\n");
        return 1;
    }
    atexit(flush_at_exit);
    return 1;
}
