/* Geometry: for a sweep of layouts, every element of every canonical tensor is stored exactly
 * once per state kind (owners), and held by exactly the expected number of ranks. */
#include <stdint.h>

#include "chunk.h"
#include "geometry.h"
#include "layout.h"
#include "testutil.h"

static int64_t expected_holders(const mps_config *cfg, const mps_layout *L, mps_kind kind, const mps_tensor_spec *s)
{
    int stages = 0;
    for (int st = 0; st < L->pp; st++)
        stages += mps_stage_holds(cfg, L, st, s);
    int dp = mps_kind_dp_sharded(L->zero, kind) ? 1 : L->dp;
    int tp = s->tp_dim >= 0 ? 1 : L->tp;
    return (int64_t)stages * dp * tp;
}

static void mark(uint8_t *counts, const mps_tensor_spec *s, const mps_piece *p)
{
    /* walk the flat range of the box and bump the canonical elements it covers */
    int n = p->box.ndim;
    for (int64_t f = p->flat_begin; f < p->flat_end; f++) {
        int64_t rem = f, canon = 0, stride = 1;
        int64_t coord[MPS_MAX_DIMS];
        for (int d = n - 1; d >= 0; d--) {
            coord[d] = rem % p->box.cnt[d];
            rem /= p->box.cnt[d];
        }
        for (int d = n - 1; d >= 0; d--) {
            canon += (p->box.off[d] + coord[d]) * stride;
            stride *= s->shape[d];
        }
        counts[canon]++;
    }
}

static int pieces_equal(const mps_piece *a, const mps_piece *b)
{
    if (a->held != b->held || a->flat_begin != b->flat_begin || a->flat_end != b->flat_end || a->box.ndim != b->box.ndim)
        return 0;
    for (int d = 0; d < a->box.ndim; d++)
        if (a->box.off[d] != b->box.off[d] || a->box.cnt[d] != b->box.cnt[d])
            return 0;
    return 1;
}

static int layouts_checked;

static void check_layout(const mps_config *cfg, const mps_layout *L)
{
    layouts_checked++;
    int world = mps_layout_world(L);
    unsigned kinds = 0xf; /* param, master, adam_m, adam_v */
    mps_owners *owners;
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_owners_build(cfg, L, kinds, &owners, &err) == 0);
    int64_t owned_total = 0, numel_total = 0;
    for (int k = 0; k < MPS_KIND_COUNT; k++) {
        for (int t = 0; t < mps_tensor_count(cfg); t++) {
            mps_tensor_spec s;
            mps_tensor_spec_get(cfg, t, &s);
            int64_t n = mps_tensor_numel(&s);
            uint8_t *stored = calloc((size_t)n, 1), *held = calloc((size_t)n, 1);
            /* what every rank holds, from the geometry function itself */
            for (int r = 0; r < world; r++) {
                mps_piece p;
                mps_geometry(cfg, L, r, (mps_kind)k, t, &p);
                if (p.held) {
                    CHECK(p.flat_begin >= 0 && p.flat_begin <= p.flat_end && p.flat_end <= mps_box_numel(&p.box));
                    mark(held, &s, &p);
                }
            }
            int64_t want = expected_holders(cfg, L, (mps_kind)k, &s);
            int64_t bad = 0;
            for (int64_t i = 0; i < n; i++)
                bad += held[i] != want;
            CHECK_MSG(bad == 0, "%s %s: %lld elements not held by %lld ranks", s.name, mps_kind_name((mps_kind)k),
                      (long long)bad, (long long)want);
            if (k != MPS_KIND_GRAD) {
                /* stored pieces: distinct pieces, each by an owner that really holds it */
                int np = mps_piece_count(cfg, L, (mps_kind)k, t);
                for (int id = 0; id < np; id++) {
                    mps_piece p, q;
                    mps_piece_by_id(cfg, L, (mps_kind)k, t, id, &p);
                    int owner = mps_owner_of(owners, (mps_kind)k, t, id);
                    CHECK(owner >= 0 && owner < world);
                    mps_geometry(cfg, L, owner, (mps_kind)k, t, &q);
                    CHECK_MSG(pieces_equal(&p, &q), "%s: owner %d does not hold piece %d", s.name, owner, id);
                    CHECK(mps_piece_id(cfg, L, (mps_kind)k, t, &q) == id);
                    mark(stored, &s, &p);
                    owned_total += p.flat_end - p.flat_begin;
                }
                bad = 0;
                for (int64_t i = 0; i < n; i++)
                    bad += stored[i] != 1;
                CHECK_MSG(bad == 0, "%s %s: %lld elements not stored exactly once", s.name, mps_kind_name((mps_kind)k),
                          (long long)bad);
                numel_total += n;
            }
            free(stored);
            free(held);
        }
    }
    /* the owners' byte totals add up to one copy of every stored kind */
    int64_t sum = 0;
    for (int r = 0; r < world; r++)
        sum += mps_owner_bytes(owners, r);
    CHECK(sum == owned_total * 4 && owned_total == numel_total);
    mps_owners_free(owners);
}

static void sweep(const mps_config *cfg, int max_dp)
{
    for (int dp = 1; dp <= max_dp; dp++)
        for (int pp = 1; pp <= 4; pp++)
            for (int tp = 1; tp <= 4; tp++)
                for (int zero = 0; zero <= 3; zero++) {
                    char text[128];
                    snprintf(text, sizeof text, "dp=%d,pp=%d,tp=%d,zero=%d", dp, pp, tp, zero);
                    mps_layout L;
                    mps_err err;
                    mps_err_clear(&err);
                    if (mps_layout_parse(text, cfg, &L, &err) != 0) {
                        /* only invalid for a reason the model gives */
                        CHECK_MSG(pp > cfg->n_layer || cfg->n_head % tp != 0, "%s refused: %s", text, err.msg);
                        continue;
                    }
                    check_layout(cfg, &L);
                }
}

static void test_layout_parsing(void)
{
    mps_config cfg = { .n_layer = 3, .n_embd = 96, .n_head = 6, .n_positions = 64, .vocab = 1000, .padded_vocab = 1024 };
    mps_layout L;
    mps_err err;
    mps_err_clear(&err);
    CHECK(mps_layout_parse("tp=3,zero=2,dp=2", &cfg, &L, &err) == 0 && L.dp == 2 && L.tp == 3 && L.pp == 1 && L.zero == 2);
    CHECK(mps_layout_parse("pp=2", &cfg, &L, &err) == 0 && L.stage_first[0] == 0 && L.stage_first[1] == 2 &&
          L.stage_first[2] == 3);
    CHECK(mps_layout_parse("pp=2,stages=1:2", &cfg, &L, &err) == 0 && L.stage_first[1] == 1);
    CHECK(mps_layout_parse("stages=1:1:1", &cfg, &L, &err) == 0 && L.pp == 3);
    char buf[128];
    mps_layout_format(&L, buf, sizeof buf);
    CHECK(strcmp(buf, "dp=1,pp=3,tp=1,zero=0,stages=1:1:1") == 0);
    static const char *bad[][2] = {
        { "tp=4", "n_head" }, { "pp=4", "n_layer" }, { "dq=2", "unknown key 'dq'" }, { "zero=4", "zero=4" },
        { "dp=0", "dp=0" }, { "dp=2,dp=3", "twice" }, { "dp", "key=value" }, { "pp=2,stages=1:1", "add up" },
        { "pp=3,stages=1:2", "lists 2 stages" }, { "dp=x", "not an integer" },
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        mps_err_clear(&err);
        CHECK_MSG(mps_layout_parse(bad[i][0], &cfg, &L, &err) != 0 && err.code == MPS_EUSAGE &&
                      strstr(err.msg, bad[i][1]) != NULL,
                  "layout '%s' gave '%s'", bad[i][0], err.msg);
    }
}

static void test_chunk_grid(void)
{
    /* every chunk is one contiguous run, chunks tile the dataset in order, chunk_of agrees */
    int64_t shapes[][4] = { { 3, 96, 96, 0 }, { 1000, 96, 0, 0 }, { 7, 0, 0, 0 }, { 5, 3, 7, 11 }, { 1, 1, 1, 0 } };
    int ndims[] = { 3, 2, 1, 4, 3 };
    int64_t targets[] = { 1, 5, 96, 100, 1000, 1 << 20 };
    for (size_t si = 0; si < 5; si++)
        for (size_t ti = 0; ti < 6; ti++) {
            mps_chunk_grid g, h;
            mps_chunk_grid_plan(&g, ndims[si], shapes[si], targets[ti]);
            CHECK(g.chunk_elems <= (targets[ti] > 0 ? targets[ti] : 1) || g.chunk_elems == 1);
            int64_t next = 0, off[4];
            for (int64_t c = 0; c < g.nchunks; c++) {
                int64_t b, e;
                mps_chunk_range(&g, c, &b, &e, off);
                CHECK(b == next && e > b && e - b <= g.chunk_elems);
                CHECK(mps_chunk_of(&g, b) == c && mps_chunk_of(&g, e - 1) == c);
                next = e;
            }
            CHECK(next == g.numel);
            mps_err err;
            mps_err_clear(&err);
            CHECK(mps_chunk_grid_load(&h, g.ndim, g.dims, g.chunk, &err) == 0 && h.nchunks == g.nchunks && h.k == g.k);
        }
}

int main(void)
{
    test_layout_parsing();
    test_chunk_grid();
    mps_config small = { .n_layer = 3, .n_embd = 96, .n_head = 6, .n_positions = 64, .vocab = 1000, .padded_vocab = 1024 };   /* sizes that do not divide evenly */
    mps_config wide = { .n_layer = 4, .n_embd = 48, .n_head = 12, .n_positions = 16, .vocab = 1000, .padded_vocab = 1024 };   /* tp=4 and pp=4 valid */
    mps_config tiny = { .n_layer = 2, .n_embd = 4, .n_head = 2, .n_positions = 3, .vocab = 10, .padded_vocab = 10 };          /* dp larger than dimensions: empty pieces */
    sweep(&small, 4);
    sweep(&wide, 3);
    sweep(&tiny, 7);
    /* 5, 6, 7 and 8 way splits */
    mps_config odd = { .n_layer = 7, .n_embd = 280, .n_head = 70, .n_positions = 8, .vocab = 1001, .padded_vocab = 1001 };
    static const char *layouts[] = { "tp=5,dp=3,zero=3", "tp=7,pp=7,zero=1", "dp=6,tp=2,pp=5,zero=2",
                                     "dp=8,tp=7,zero=3", "dp=5,pp=3,tp=5,zero=3" };
    for (size_t i = 0; i < sizeof layouts / sizeof layouts[0]; i++) {
        mps_layout L;
        mps_err err;
        mps_err_clear(&err);
        CHECK_MSG(mps_layout_parse(layouts[i], &odd, &L, &err) == 0, "%s", err.msg);
        check_layout(&odd, &L);
    }
    printf("%d layouts checked\n", layouts_checked);
    CHECK(layouts_checked > 200);
    TEST_DONE();
}
