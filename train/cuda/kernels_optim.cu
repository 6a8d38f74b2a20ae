/* The optimizer and the gradient norm: multi-tensor AdamW (with the parameters' bf16 copies) and
 * the sum of squares over many buffers, each in one launch per 64 tensors with a fixed chunking. */
#include "kernels_common.cuh"

/* torch.optim.AdamW (single-tensor path), the formula of op_adamw */
struct AdamF {
    float *p, *m, *v;
    const float *g;
    float b1, b2, ob1, ob2, step, bc2_sqrt, eps, decay, gs;
    __device__ __forceinline__ float upd(float pi, float gi, float &mi, float &vi) const
    {
        gi *= gs; /* the clipping factor: the same float product as a separate scale pass */
        mi = b1 * mi + ob1 * gi;
        vi = b2 * vi + ob2 * gi * gi;
        return pi * decay - step * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
    /* element i (float4 i) updated; the new parameter value is returned too */
    __device__ float one(int64_t i) const
    {
        float mi = m[i], vi = v[i];
        const float pn = upd(p[i], g[i], mi, vi);
        p[i] = pn;
        m[i] = mi;
        v[i] = vi;
        return pn;
    }
    __device__ float4 four(int64_t i) const
    {
        float4 pv = ld4(p, i), gv = ld4(g, i), mv = ld4(m, i), vv = ld4(v, i);
        pv.x = upd(pv.x, gv.x, mv.x, vv.x);
        pv.y = upd(pv.y, gv.y, mv.y, vv.y);
        pv.z = upd(pv.z, gv.z, mv.z, vv.z);
        pv.w = upd(pv.w, gv.w, mv.w, vv.w);
        st4(p, i, pv);
        st4(m, i, mv);
        st4(v, i, vv);
        return pv;
    }
};

/* AdamW over the launch's tensors (AdamF's arithmetic), each grad zeroed as it is read (unless
 * its keep bit is set) and the new parameter written to its bf16 copy where it has one */
__global__ void __launch_bounds__(MT_THREADS) k_adamw_many(MtArgs a, AdamF f)
{
    int64_t b, e;
    const int t = mt_find(a, &b, &e);
    f.p = a.p[t], f.g = a.g[t], f.m = a.m[t], f.v = a.v[t];
    f.decay = a.decay[t];
    float *g = a.g[t];
    act_t *pb = a.pb[t];
    const bool zero = !((a.keep >> t) & 1ull);
    const int vec = dev_aligned16(f.p) && dev_aligned16(g) && dev_aligned16(f.m) && dev_aligned16(f.v) &&
                    ((uintptr_t)pb & 7u) == 0;
    int64_t i = b + threadIdx.x;
    if (vec) { /* b is a multiple of 4: float4 q of the chunk is float4 b / 4 + q of the tensor */
        const int64_t n4 = (e - b) >> 2;
        for (int64_t q = threadIdx.x; q < n4; q += MT_THREADS) {
            const float4 pn = f.four((b >> 2) + q);
            if (zero)
                st4(g, (b >> 2) + q, make_float4(0, 0, 0, 0));
            if (pb)
                st4_act(pb, (b >> 2) + q, pn.x, pn.y, pn.z, pn.w);
        }
        i = b + (n4 << 2) + threadIdx.x;
    }
    for (; i < e; i += MT_THREADS) {
        const float pn = f.one(i);
        if (zero)
            g[i] = 0.0f;
        if (pb)
            pb[i] = __float2bfloat16_rn(pn);
    }
}

/* ---- the parameters' bf16 copies (cuda_internal.h mps_wcopy) */

const act_t *cu_wcopy_find(mps_cuda *c, const float *w, int64_t n)
{
    for (int i = 0; i < c->nwcopies; i++)
        if (c->wcopies[i].p == w && c->wcopies[i].valid && n <= c->wcopies[i].n)
            return c->wcopies[i].bf;
    return NULL;
}

void cu_wcopy_invalidate(mps_cuda *c, const void *p, size_t bytes)
{
    const char *a = (const char *)p, *z = a + bytes;
    for (int i = 0; i < c->nwcopies; i++) {
        const char *pa = (const char *)c->wcopies[i].p, *pz = pa + (size_t)c->wcopies[i].n * sizeof(float);
        if (!bytes || (pa < z && a < pz))
            c->wcopies[i].valid = 0;
    }
}

void cu_wcopy_free(mps_cuda *c)
{
    for (int i = 0; i < c->nwcopies; i++)
        if (c->wcopies[i].owner)
            (void)cudaFreeAsync(c->wcopies[i].bf, c->stream);
    free(c->wcopies);
    c->wcopies = NULL;
    c->nwcopies = c->cap_wcopies = 0;
}

/* the record of the copy of exactly (p, n), valid or not, or NULL */
static mps_wcopy *wcopy_record(mps_cuda *c, const float *p, int64_t n)
{
    for (int i = 0; i < c->nwcopies; i++)
        if (c->wcopies[i].p == p && c->wcopies[i].n == n)
            return &c->wcopies[i];
    return NULL;
}

/* the copy of an AdamW job's parameter (made on first use; NULL when there is no memory for it:
 * the products then round the weights themselves, as before) */
static mps_wcopy *wcopy_for(mps_cuda *c, const float *p, int64_t n)
{
    mps_wcopy *found = wcopy_record(c, p, n);
    if (found)
        return found;
    if (c->nwcopies == c->cap_wcopies) {
        int cap = c->cap_wcopies ? 2 * c->cap_wcopies : 256;
        mps_wcopy *w = (mps_wcopy *)realloc(c->wcopies, sizeof *w * (size_t)cap);
        if (!w)
            return NULL;
        c->wcopies = w;
        c->cap_wcopies = cap;
    }
    act_t *bf = NULL;
    if (cudaMallocFromPoolAsync((void **)&bf, (size_t)n * sizeof(act_t), c->pool, c->stream) != cudaSuccess) {
        (void)cudaGetLastError(); /* no room: no copy, not an error */
        return NULL;
    }
    mps_wcopy *w = &c->wcopies[c->nwcopies++];
    w->p = p, w->n = n, w->bf = bf, w->valid = 0, w->owner = 1;
    return w;
}

/* The parts' copies are made one by one by AdamW (wherever the pool puts them); the first time a
 * stacked product finds them all valid but apart, they move into one allocation, in part order,
 * and the records point there from then on (AdamW updates them in place), so that every later
 * product reads one (sum oc, C) matrix. */
const act_t *cu_wcopy_stacked(mps_cuda *c, const float *const *w, const int *oc, int nparts, int C)
{
    mps_wcopy *rec[MPS_MAX_PARTS];
    if (nparts < 1 || nparts > MPS_MAX_PARTS)
        return NULL;
    int apart = 0;
    int64_t total = 0;
    for (int i = 0; i < nparts; i++) {
        const int64_t n = (int64_t)oc[i] * C;
        rec[i] = wcopy_record(c, w[i], n);
        if (!rec[i] || !rec[i]->valid)
            return NULL;
        if (i > 0 && rec[i]->bf != rec[i - 1]->bf + (int64_t)oc[i - 1] * C)
            apart = 1;
        total += n;
    }
    if (!apart)
        return rec[0]->bf;
    act_t *bf = NULL;
    if (cudaMallocFromPoolAsync((void **)&bf, (size_t)total * sizeof(act_t), c->pool, c->stream) != cudaSuccess) {
        (void)cudaGetLastError(); /* no room: the caller rounds the weights itself */
        return NULL;
    }
    int64_t off = 0;
    for (int i = 0; i < nparts; i++) {
        const int64_t n = (int64_t)oc[i] * C;
        if (cu_check(c, cudaMemcpyAsync(bf + off, rec[i]->bf, (size_t)n * sizeof(act_t), cudaMemcpyDeviceToDevice,
                                        c->stream), "stacked weight copies") != 0)
            return NULL;
        off += n;
    }
    off = 0;
    for (int i = 0; i < nparts; i++) { /* the old places are freed behind the copies, in stream order */
        if (rec[i]->owner)
            (void)cudaFreeAsync(rec[i]->bf, c->stream);
        rec[i]->bf = bf + off;
        rec[i]->owner = i == 0;
        off += (int64_t)oc[i] * C;
    }
    return bf;
}

void cu_adamw_many(void *ctx, const mps_adamw_job *jobs, int count, const mps_adamw_step *st)
{
    mps_cuda *c = (mps_cuda *)ctx;
    /* the step constants in double on the host, as op_adamw */
    double bc1 = 1.0 - pow(st->beta1, (double)st->t), bc2 = 1.0 - pow(st->beta2, (double)st->t);
    AdamF f;
    memset(&f, 0, sizeof f);
    f.b1 = st->beta1;
    f.b2 = st->beta2;
    f.ob1 = 1.0f - st->beta1;
    f.ob2 = 1.0f - st->beta2;
    f.step = (float)(st->lr / bc1);
    f.bc2_sqrt = (float)sqrt(bc2);
    f.eps = st->eps;
    f.gs = st->grad_scale;
    MtArgs a;
    memset(&a, 0, sizeof a);
    for (int i = 0; i <= count; i++) {
        if (i == count || (a.count == MT_MAX)) { /* launch what is gathered */
            if (a.count > 0) {
                const int64_t blocks = a.first[a.count];
                if (blocks > INT32_MAX) {
                    cu_fail(c, "adamw: %lld chunks in one launch", (long long)blocks);
                    return;
                }
                k_adamw_many<<<(unsigned)blocks, MT_THREADS, 0, c->stream>>>(a, f);
                if (cu_launched(c, "adamw") != 0)
                    return;
            }
            memset(&a, 0, sizeof a);
            if (i == count)
                break;
        }
        const mps_adamw_job *j = &jobs[i];
        if (j->n <= 0)
            continue;
        mps_wcopy *wc = j->read_by_products ? wcopy_for(c, j->param, j->n) : NULL;
        const int k = a.count++;
        a.p[k] = j->param, a.g[k] = j->grad, a.m[k] = j->m, a.v[k] = j->v, a.n[k] = j->n;
        a.pb[k] = wc ? wc->bf : NULL;
        if (wc)
            wc->valid = 1; /* once the launch below has run: the stream orders every reader after it */
        a.decay[k] = 1.0f - st->lr * j->weight_decay;
        if (j->keep_grad)
            a.keep |= 1ull << k;
        a.first[k + 1] = a.first[k] + (j->n + MT_CHUNK - 1) / MT_CHUNK;
    }
}


/* *out += the sum of the parts */
__global__ void k_sum_parts(double *out, const double *part, int nparts)
{
    double s = 0.0;
    for (int i = threadIdx.x; i < nparts; i += blockDim.x)
        s += part[i];
    s = block_reduce(s, SumOp(), 0.0);
    if (threadIdx.x == 0)
        *out += s;
}

/* part[part0 + chunk] = the chunk's sum of squares in double (a block per chunk, MtArgs's tensors
 * in p) */
__global__ void __launch_bounds__(MT_THREADS) k_sumsq_many(double *part, int64_t part0, MtArgs a)
{
    int64_t b, e;
    const float *x = a.p[mt_find(a, &b, &e)];
    double s = 0.0;
    int64_t i = b + threadIdx.x;
    if (dev_aligned16(x)) {
        const int64_t n4 = (e - b) >> 2;
        for (int64_t q = threadIdx.x; q < n4; q += MT_THREADS) {
            const float4 v = ld4(x, (b >> 2) + q);
            s += (double)v.x * v.x + (double)v.y * v.y + (double)v.z * v.z + (double)v.w * v.w;
        }
        i = b + (n4 << 2) + threadIdx.x;
    }
    for (; i < e; i += MT_THREADS)
        s += (double)x[i] * x[i];
    s = block_reduce(s, SumOp(), 0.0);
    if (threadIdx.x == 0)
        part[part0 + blockIdx.x] = s;
}

/* Every buffer cut into MT_CHUNK chunks (a function of the sizes only), a block's double sum per
 * chunk, then one block adds the chunk sums in a fixed tree: the bits depend on the sizes alone. */
double cu_sumsq_many(void *ctx, const float *const *xs, const int64_t *ns, int count)
{
    mps_cuda *c = (mps_cuda *)ctx;
    int64_t nparts = 0;
    for (int i = 0; i < count; i++)
        if (ns[i] > 0)
            nparts += (ns[i] + MT_CHUNK - 1) / MT_CHUNK;
    if (nparts == 0)
        return 0.0;
    if (nparts > INT32_MAX) {
        cu_fail(c, "sumsq_many: %lld chunks", (long long)nparts);
        return NAN;
    }
    double *part = (double *)cu_scratch(c, SCR_SUMSQ, (size_t)nparts * sizeof(double));
    if (!part)
        return NAN;
    pthread_mutex_lock(&c->res_mu);
    double *acc = c->dres + SQ_MAX_BLOCKS + 1;
    int ok = cu_check(c, cudaMemsetAsync(acc, 0, sizeof *acc, c->stream), "sumsq_many") == 0;
    MtArgs a;
    memset(&a, 0, sizeof a);
    int64_t part0 = 0;
    for (int i = 0; i <= count && ok; i++) {
        if (i == count || a.count == MT_MAX) {
            if (a.count > 0) {
                k_sumsq_many<<<(unsigned)a.first[a.count], MT_THREADS, 0, c->stream>>>(part, part0, a);
                ok = cu_launched(c, "sumsq_many") == 0;
                part0 += a.first[a.count];
            }
            memset(&a, 0, sizeof a);
            if (i == count)
                break;
        }
        if (ns[i] <= 0)
            continue;
        const int k = a.count++;
        a.p[k] = (float *)xs[i], a.n[k] = ns[i];
        a.first[k + 1] = a.first[k] + (ns[i] + MT_CHUNK - 1) / MT_CHUNK;
    }
    if (ok)
        k_sum_parts<<<1, 1024, 0, c->stream>>>(acc, part, (int)nparts);
    double r = ok ? fetch_result(c, "sumsq_many", 1) : NAN;
    pthread_mutex_unlock(&c->res_mu);
    return r;
}

