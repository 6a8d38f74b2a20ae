/* Row kernels of the CUDA backend (residual and bias adds, embedding forward and backward,
 * positions, column sums). What holds for every kernels_*.cu file (the kernels other than GEMM and
 * attention): fp32 math throughout, shapes and the accumulate (+=) convention of ops_cpu.h;
 * outputs that are operand buffers (backend.h) are bf16 and overwritten.
 *
 * Determinism: no float atomics anywhere. Every output element is written by one thread, and
 * every reduction has a fixed shape that depends on the sizes only (not on timing or the SM
 * count): warp butterflies, block trees, fixed row chunks then a second pass over the chunk
 * partials (column sums of bias_grad, layernorm dw/db), fixed grids for sumsq. The embedding
 * backward sorts (token, row) pairs with a stable radix sort (CUB): the rows of a token then lie in
 * ascending row order in one run of the sorted array; fixed 64-position segments of that array
 * are summed piece by piece (many blocks share a long run, e.g. a padding token), then one block
 * per run adds the run's pieces in order to its row of dwte, which no other block touches. */
#include <cub/device/device_radix_sort.cuh>

#include "kernels_common.cuh"

/* ---------------------------------------------------------------- row kernels */

/* out (N, C) = a + b + bias (C) */
__global__ void k_residual_bias(float *out, const float *a, const float *b, const float *bias, int64_t N, int C,
                                int vec)
{
    for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {
        const int64_t o = r * C;
        if (vec) {
            const int64_t o4 = o >> 2;
            for (int j = threadIdx.x; j < C / 4; j += blockDim.x) {
                float4 x = ld4(a, o4 + j), y = ld4(b, o4 + j), z = ld4(bias, j);
                st4(out, o4 + j, make_float4(x.x + y.x + z.x, x.y + y.y + z.y, x.z + y.z + z.z, x.w + y.w + z.w));
            }
        } else {
            for (int j = threadIdx.x; j < C; j += blockDim.x)
                out[o + j] = a[o + j] + b[o + j] + bias[j];
        }
    }
}

void cu_residual_bias(void *ctx, float *out, const float *a, const float *b, const float *bias, int64_t N, int C)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (N <= 0 || C <= 0)
        return;
    int vec = C % 4 == 0 && cu_aligned16(out) && cu_aligned16(a) && cu_aligned16(b) && cu_aligned16(bias);
    k_residual_bias<<<row_grid(c, N), row_threads(vec ? C / 4 : C), 0, c->stream>>>(out, a, b, bias, N, C, vec);
    cu_launched(c, "residual_bias");
}

/* out (N, C) += bias (C) */
__global__ void k_add_bias_rows(float *out, const float *bias, int64_t N, int C)
{
    for (int64_t r = blockIdx.x; r < N; r += gridDim.x)
        for (int j = threadIdx.x; j < C; j += blockDim.x)
            out[r * C + j] += bias[j];
}

void cu_add_bias_rows(mps_cuda *c, float *out, const float *bias, int64_t N, int C)
{
    if (N <= 0 || C <= 0)
        return;
    k_add_bias_rows<<<row_grid(c, N), row_threads(C), 0, c->stream>>>(out, bias, N, C);
    cu_launched(c, "bias add");
}

/* out (N, C) = wte[tok - v0] for owned tokens, else 0 */
__global__ void k_embed_fwd(float *out, const int32_t *tokens, int64_t N, const float *wte, int64_t v0, int64_t Vl,
                            int C)
{
    for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {
        const int64_t tok = tokens[r];
        float *o = out + r * C;
        if (tok >= v0 && tok < v0 + Vl) {
            const float *w = wte + (tok - v0) * C;
            for (int j = threadIdx.x; j < C; j += blockDim.x)
                o[j] = w[j];
        } else {
            for (int j = threadIdx.x; j < C; j += blockDim.x)
                o[j] = 0.0f;
        }
    }
}

void cu_embed_fwd(void *ctx, float *out, const int32_t *tokens, int64_t N, const float *wte, int64_t v0, int64_t Vl,
                  int C)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (N <= 0 || C <= 0)
        return;
    k_embed_fwd<<<row_grid(c, N), row_threads(C), 0, c->stream>>>(out, tokens, N, wte, v0, Vl, C);
    cu_launched(c, "embed_fwd");
}

/* x (B*T, C) += wpe[t] */
__global__ void k_pos_fwd(float *x, const float *wpe, int64_t rows, int T, int C)
{
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const float *p = wpe + (r % T) * C;
        float *xr = x + r * C;
        for (int j = threadIdx.x; j < C; j += blockDim.x)
            xr[j] += p[j];
    }
}

void cu_pos_fwd(void *ctx, float *x, const float *wpe, int B, int T, int C)
{
    mps_cuda *c = (mps_cuda *)ctx;
    int64_t rows = (int64_t)B * T;
    if (rows <= 0 || C <= 0)
        return;
    k_pos_fwd<<<row_grid(c, rows), row_threads(C), 0, c->stream>>>(x, wpe, rows, T, C);
    cu_launched(c, "pos_fwd");
}

/* dwpe (T, C) += sum over b of dx (B, T, C): one thread per element of dwpe, b in order */
__global__ void k_pos_bwd(float *dwpe, const float *dx, int B, int T, int C)
{
    const int64_t n = (int64_t)T * C, stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float acc = dwpe[i];
        for (int b = 0; b < B; b++)
            acc += dx[(int64_t)b * n + i];
        dwpe[i] = acc;
    }
}

void cu_pos_bwd(void *ctx, float *dwpe, const float *dx, int B, int T, int C)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (!dwpe || (int64_t)T * C <= 0)
        return;
    k_pos_bwd<<<cu_grid(c, (int64_t)T * C, EW_THREADS), EW_THREADS, 0, c->stream>>>(dwpe, dx, B, T, C);
    cu_launched(c, "pos_bwd");
}

/* ---------------------------------------------------------------- embedding backward */

/* sort keys: the local row of owned tokens, Vl (sorted last, then skipped) for the others */
__global__ void k_embed_keys(uint32_t *keys, uint32_t *vals, const int32_t *tokens, int64_t N, int64_t v0, int64_t Vl)
{
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < N; i += stride) {
        const int64_t tok = tokens[i];
        keys[i] = (uint32_t)((tok >= v0 && tok < v0 + Vl) ? tok - v0 : Vl);
        vals[i] = (uint32_t)i;
    }
}

#define EMB_SEG 64 /* sorted positions per block of the first pass */

/* Pass 1, one block per segment of EMB_SEG sorted positions: a run of equal keys is cut into
 * pieces at the segment boundaries; pbuf[p] (C floats) = the sum, in position order, of the dout
 * rows of the piece that starts at position p (pieces of owned tokens only). */
__global__ void k_embed_pieces(float *pbuf, const float *dout, const uint32_t *keys, const uint32_t *vals, int64_t N,
                               int64_t Vl, int C)
{
    __shared__ uint32_t sk[EMB_SEG], sv[EMB_SEG];
    for (int64_t s = blockIdx.x; s * EMB_SEG < N; s += gridDim.x) {
        const int64_t p0 = s * EMB_SEG;
        const int n = (int)(N - p0 < EMB_SEG ? N - p0 : EMB_SEG);
        __syncthreads();  // the previous segment's readers are done
        for (int q = threadIdx.x; q < n; q += blockDim.x) {
            sk[q] = keys[p0 + q];
            sv[q] = vals[p0 + q];
        }
        __syncthreads();
        for (int col = threadIdx.x; col < C; col += blockDim.x) {
            float acc = 0.0f;
            int start = 0;
            for (int q0 = 0; q0 < n; q0 += 8) {
                float x[8];  // eight loads in flight, then added in position order
#pragma unroll
                for (int u = 0; u < 8; u++) {
                    const int q = q0 + u;
                    x[u] = (q < n && sk[q] < Vl) ? dout[(int64_t)sv[q] * C + col] : 0.0f;
                }
#pragma unroll
                for (int u = 0; u < 8; u++) {
                    const int q = q0 + u;
                    if (q >= n)
                        break;
                    if (q > 0 && sk[q] != sk[q - 1]) {  // a new piece: store the finished one
                        if (sk[start] < Vl)
                            pbuf[(p0 + start) * C + col] = acc;
                        acc = 0.0f;
                        start = q;
                    }
                    acc += x[u];
                }
            }
            if (sk[start] < Vl)
                pbuf[(p0 + start) * C + col] = acc;
        }
    }
}

/* Pass 2, one block per run (found at its first position i): dwte[key] += its pieces, i.e.
 * pbuf[i] then pbuf at each segment boundary inside the run, in order. A row of dwte belongs to
 * exactly one run. */
__global__ void k_embed_runs(float *dwte, const float *pbuf, const uint32_t *keys, int64_t N, int64_t Vl, int C)
{
    for (int64_t i = blockIdx.x; i < N; i += gridDim.x) {
        const uint32_t key = keys[i];
        if (key >= Vl || (i > 0 && keys[i - 1] == key))
            continue;  // uniform over the block
        /* the run is a prefix of what follows (keys are sorted): count its members blockDim at a time */
        int64_t end = i + 1;
        for (;;) {
            const int64_t j = end + threadIdx.x;
            const int cnt = __syncthreads_count(j < N && keys[j] == key);
            end += cnt;
            if (cnt < (int)blockDim.x)
                break;
        }
        const int64_t b0 = (i / EMB_SEG + 1) * EMB_SEG;  // first segment boundary after i
        float *d = dwte + (int64_t)key * C;
        for (int col = threadIdx.x; col < C; col += blockDim.x) {
            float acc = pbuf[i * C + col];
            for (int64_t b = b0; b < end; b += EMB_SEG)
                acc += pbuf[b * C + col];
            d[col] += acc;
        }
    }
}

void cu_embed_bwd(void *ctx, float *dwte, const float *dout, const int32_t *tokens, int64_t N, int64_t v0, int64_t Vl,
                  int C)
{
    mps_cuda *c = (mps_cuda *)ctx;
    if (!dwte || N <= 0 || C <= 0 || Vl <= 0)
        return;
    if (N > INT32_MAX || Vl >= (int64_t)UINT32_MAX) {
        cu_fail(c, "embed_bwd: N = %lld or Vl = %lld too large", (long long)N, (long long)Vl);
        return;
    }
    uint32_t *kv = (uint32_t *)cu_scratch(c, SCR_SORT, (size_t)N * 4 * sizeof(uint32_t));
    if (!kv)
        return;
    uint32_t *kin = kv, *vin = kv + N, *kout = kv + 2 * N, *vout = kv + 3 * N;
    k_embed_keys<<<cu_grid(c, N, EW_THREADS), EW_THREADS, 0, c->stream>>>(kin, vin, tokens, N, v0, Vl);
    if (cu_launched(c, "embed_bwd (keys)") != 0)
        return;
    int bits = 1;
    while (bits < 32 && ((int64_t)1 << bits) <= Vl)  // Vl itself must fit
        bits++;
    size_t tmp_bytes = 0;
    if (cu_check(c, cub::DeviceRadixSort::SortPairs(nullptr, tmp_bytes, kin, kout, vin, vout, (int)N, 0, bits, c->stream),
                 "embed_bwd (sort size)") != 0)
        return;
    void *tmp = cu_scratch(c, SCR_CUB, tmp_bytes);
    if (!tmp)
        return;
    if (cu_check(c, cub::DeviceRadixSort::SortPairs(tmp, tmp_bytes, kin, kout, vin, vout, (int)N, 0, bits, c->stream),
                 "embed_bwd (sort)") != 0)
        return;
    float *pbuf = (float *)cu_scratch(c, SCR_EMB, (size_t)N * C * sizeof(float));  // (N, C), piece starts only
    if (!pbuf)
        return;
    const int64_t nseg = (N + EMB_SEG - 1) / EMB_SEG;
    k_embed_pieces<<<row_grid(c, nseg), row_threads(C), 0, c->stream>>>(pbuf, dout, kout, vout, N, Vl, C);
    if (cu_launched(c, "embed_bwd (pieces)") != 0)
        return;
    k_embed_runs<<<row_grid(c, N), row_threads(C), 0, c->stream>>>(dwte, pbuf, kout, N, Vl, C);
    cu_launched(c, "embed_bwd (runs)");
}

/* ---------------------------------------------------------------- column sums */

#define CS_TX 32
#define CS_TY 8
#define CS_CHUNKS 256       /* at most this many row chunks, whose sums the last block adds */
#define CS_MIN_CHUNK 512    /* rows of a chunk at least: 64 loads per thread (0.084 against 0.092 ms
                             * at 256 for the (32768, 3072) bf16 bias gradient, H100) */
#define CS_ONEPASS_ROWS 8192 /* cu_colsums(): up to this many rows in one launch per pass */
#define CS_SHORT 128        /* cu_colsums(): up to this many rows in one pass, else chunks of this many */


/* Up to 3 arrays (rows, C) whose column sums one launch takes (blockIdx.z picks the array). With
 * part set, the launch's row chunks (blockIdx.y) write their sums there, (chunks, C) per array, and
 * the last block of each column range to finish (ticket: one counter per array and range, zero
 * between launches) adds them up into dst: one launch where a second pass took another. */
template <class T>
struct ColSums {
    float *dst[3];
    const T *src[3];
    int acc[3];
    float *part[3];
    unsigned *ticket;
};

/* V adjacent values of a row as floats, one 16-byte load (8 bf16 or 4 fp32), or V = 1 */
template <int V>
__device__ __forceinline__ void load_cols(const act_t *p, float *v)
{
    if (V == 8) {
        const uint4 u = *reinterpret_cast<const uint4 *>(p);
        const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int q = 0; q < 4; q++) {
            const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&w[q]));
            v[2 * q] = f.x, v[2 * q + 1] = f.y;
        }
    } else {
#pragma unroll
        for (int q = 0; q < V; q++)
            v[q] = __bfloat162float(p[q]);
    }
}
template <int V>
__device__ __forceinline__ void load_cols(const float *p, float *v)
{
    if (V == 4) {
        const float4 f = *reinterpret_cast<const float4 *>(p);
        v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
    } else {
#pragma unroll
        for (int q = 0; q < V; q++)
            v[q] = p[q];
    }
}

/* The block's 8 row lanes' sums s (thread (tx, ty): columns col .. col + V - 1) added in ty order
 * into d[col ..] (+= when add, else =); every thread calls it (barrier) */
template <int V>
__device__ __forceinline__ void colsum_flush(float (&sh)[V][CS_TY][CS_TX + 1], const float (&s)[V], float *d,
                                             int col, int C, bool add)
{
#pragma unroll
    for (int v = 0; v < V; v++)
        sh[v][threadIdx.y][threadIdx.x] = s[v];
    __syncthreads();
    if (threadIdx.y == 0 && col < C)
#pragma unroll
        for (int v = 0; v < V; v++) {
            float t = 0.0f;
            for (int q = 0; q < CS_TY; q++)
                t += sh[v][q][threadIdx.x];
            d[col + v] = add ? d[col + v] + t : t;
        }
}

/* Column sums of rows [y R, (y + 1) R) of the arrays (y = blockIdx.y), V adjacent columns per
 * thread (V = 8 bf16 or 4 fp32: one 16-byte load per row, so a warp has 512 bytes of a row in one
 * instruction and four rows in flight; C a multiple of V, src 16-byte aligned). Thread (tx, ty)
 * sums rows ty, ty + 8, ... of its columns in order, then the 8 partial sums are added in ty
 * order: the order, and so the bits, depend only on (rows, C, R), not on V. Without part,
 * dst[k][c] += the sum when acc[k], else = it (one chunk); with part, the chunk sums are added in
 * the same way (chunks ty, ty + 8, ..., then the 8 in ty order) by the range's last block. */
template <class T, int V>
__global__ void k_colsum(ColSums<T> a, int64_t rows, int C, int64_t R)
{
    __shared__ float sh[V][CS_TY][CS_TX + 1];
    __shared__ bool last;
    const int col = V * (blockIdx.x * CS_TX + threadIdx.x), k = blockIdx.z;
    const T *x = a.src[k];
    const int64_t r0 = (int64_t)blockIdx.y * R, r1 = r0 + R < rows ? r0 + R : rows;
    float s[V];
#pragma unroll
    for (int v = 0; v < V; v++)
        s[v] = 0.0f;
    if (col < C)
#pragma unroll 4
        for (int64_t r = r0 + threadIdx.y; r < r1; r += CS_TY) {
            float f[V];
            load_cols<V>(x + r * C + col, f);
#pragma unroll
            for (int v = 0; v < V; v++)
                s[v] += f[v];
        }
    float *part = a.part[k];
    colsum_flush<V>(sh, s, part ? part + (int64_t)blockIdx.y * C : a.dst[k], col, C, !part && a.acc[k]);
    if (!part)
        return;
    /* the chunk sums of this column range are out: the last block to get here adds them up */
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) {
        unsigned *tk = a.ticket + (size_t)k * gridDim.x + blockIdx.x;
        last = atomicAdd(tk, 1u) == gridDim.y - 1;
        if (last)
            *tk = 0; /* for the next launch (the others are done with it) */
    }
    __syncthreads();
    if (!last)
        return;
    __threadfence();
#pragma unroll
    for (int v = 0; v < V; v++)
        s[v] = 0.0f;
    if (col < C)
        for (unsigned y = threadIdx.y; y < gridDim.y; y += CS_TY)
#pragma unroll
            for (int v = 0; v < V; v++)
                s[v] += __ldcg(part + (int64_t)y * C + col + v); /* (L2: written by other blocks) */
    colsum_flush<V>(sh, s, a.dst[k], col, C, a.acc[k]); /* (sh is free: the barriers above) */
}

/* the zeroed counters of the last-block sums, at least count of them */
static unsigned *colsum_tickets(mps_cuda *c, size_t count)
{
    const size_t bytes = count * sizeof(unsigned);
    const bool fresh = c->scr_cap[SCR_TICKETS] < bytes;
    unsigned *t = (unsigned *)cu_scratch(c, SCR_TICKETS, bytes);
    if (t && fresh &&
        cu_check(c, cudaMemsetAsync(t, 0, c->scr_cap[SCR_TICKETS], c->stream), "column sums (counters)") != 0)
        return NULL;
    return t;
}

/* one pass over rows in chunks of R (nch of them) for n arrays: 16 bytes of a row per thread where
 * C and the arrays' alignment allow it and wide is set (the bf16 arrays, the chunked fp32 ones of
 * colsum_to: an fp32 pass over few rows needs the blocks of one column per thread to fill the GPU) */
template <class T>
static void colsum_pass(mps_cuda *c, const ColSums<T> &a, int n, unsigned nch, int64_t rows, int C, int64_t R,
                        bool wide)
{
    const dim3 blk(CS_TX, CS_TY);
    constexpr int VW = 16 / sizeof(T); /* values in 16 bytes */
    wide = wide && C % VW == 0;
    for (int k = 0; k < n; k++)
        wide = wide && cu_aligned16(a.src[k]);
    const unsigned gx = (unsigned)(wide ? (C / VW + CS_TX - 1) / CS_TX : (C + CS_TX - 1) / CS_TX);
    ColSums<T> b = a;
    if (b.part[0] && !(b.ticket = colsum_tickets(c, (size_t)n * gx)))
        return;
    if (wide)
        k_colsum<T, VW><<<dim3(gx, nch, (unsigned)n), blk, 0, c->stream>>>(b, rows, C, R);
    else
        k_colsum<T, 1><<<dim3(gx, nch, (unsigned)n), blk, 0, c->stream>>>(b, rows, C, R);
}

/* dst (C) = (or += when acc) the column sums of x (rows, C): in chunks of rows whose partial sums
 * the last block adds, the chunk size a function of the row count only (so the order of the sums
 * is one of (rows, C)) */
template <class T>
static void colsum_to(mps_cuda *c, float *dst, int acc, const T *x, int64_t rows, int C, const char *what)
{
    if (C <= 0)
        return;
    if (rows <= 0) {
        if (!acc)
            cu_check(c, cudaMemsetAsync(dst, 0, (size_t)C * sizeof(float), c->stream), what);
        return;
    }
    int64_t R = (rows + CS_CHUNKS - 1) / CS_CHUNKS;
    if (R < CS_MIN_CHUNK)
        R = CS_MIN_CHUNK;
    const int64_t nch = (rows + R - 1) / R;
    ColSums<T> one = {{dst}, {x}, {acc}, {NULL}, NULL};
    if (nch > 1 && !(one.part[0] = (float *)cu_scratch(c, SCR_COLSUM, (size_t)nch * C * sizeof(float))))
        return;
    colsum_pass(c, one, 1, (unsigned)nch, rows, C, R, sizeof(T) == sizeof(act_t) || nch > 1);
    cu_launched(c, what);
}

/* The column sums of n (<= 3) fp32 arrays (rows, C), the layernorm backward's block partials of dw,
 * db and dinp, in one launch that takes all n: up to CS_SHORT rows in one chunk; up to
 * CS_ONEPASS_ROWS in chunks of CS_SHORT rows (one block summing ~1000 rows eight at a time waits
 * on its loads one after another), whose sums the last block adds; more, array by array as
 * colsum_to. dst[k] (C) += the sums when acc[k], else = them. */
void cu_colsums(mps_cuda *c, int n, float *const *dst, const float *const *src, const int *acc, int64_t rows, int C,
                const char *what)
{
    if (n <= 0 || C <= 0)
        return;
    if (rows <= 0 || rows > CS_ONEPASS_ROWS) {
        for (int k = 0; k < n; k++)
            colsum_to(c, dst[k], acc[k], src[k], rows, C, what);
        return;
    }
    ColSums<float> a;
    memset(&a, 0, sizeof a);
    for (int k = 0; k < n; k++)
        a.dst[k] = dst[k], a.src[k] = src[k], a.acc[k] = acc[k];
    if (rows <= CS_SHORT) {
        colsum_pass(c, a, n, 1, rows, C, rows, false);
        cu_launched(c, what);
        return;
    }
    const int64_t nch = (rows + CS_SHORT - 1) / CS_SHORT;
    float *part = (float *)cu_scratch(c, SCR_COLSUM, (size_t)n * nch * C * sizeof(float)); // (n, nch, C)
    if (!part)
        return;
    for (int k = 0; k < n; k++)
        a.part[k] = part + (int64_t)k * nch * C;
    colsum_pass(c, a, n, (unsigned)nch, rows, C, CS_SHORT, false);
    cu_launched(c, what);
}

void cu_colsum_acc(mps_cuda *c, float *dst, const float *x, int64_t rows, int C, const char *what)
{
    colsum_to(c, dst, 1, x, rows, C, what);
}
void cu_colsum_acc_act(mps_cuda *c, float *dst, const act_t *x, int64_t rows, int C, const char *what)
{
    colsum_to(c, dst, 1, x, rows, C, what);
}

void cu_bias_grad(void *ctx, float *db, const float *dout, int64_t N, int C)
{
    if (db)
        cu_colsum_acc((mps_cuda *)ctx, db, dout, N, C, "bias_grad");
}

