/* Token files (train/data.h): a shard set read through a glob pattern is the same stream as one
 * file holding the same sequences; sequence indices wrap; bad files and patterns are refused
 * with a message naming them. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "data.h"
#include "testutil.h"

/* An llm.c token file of tokens[0..n). */
static int write_tokens(const char *path, const uint16_t *tokens, int64_t n, int32_t claimed)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        return -1;
    int32_t h[256] = { 20240520, 1, claimed };
    int ok = fwrite(h, sizeof h, 1, f) == 1 && fwrite(tokens, 2, (size_t)n, f) == (size_t)n;
    return fclose(f) == 0 && ok ? 0 : -1;
}

int main(void)
{
    const char *dir = test_tmpdir("data");
    CHECK(dir != NULL);
    enum { T = 8, N = 1 + 40 * T, VOCAB = 500 };
    static uint16_t all[N];
    for (int i = 0; i < N; i++)
        all[i] = (uint16_t)((i * 7919u + 13) % VOCAB);
    char one[1200], a[1200], b[1200], c[1200], pattern[1200];
    snprintf(one, sizeof one, "%s/all.bin", dir);
    CHECK(write_tokens(one, all, N, N) == 0);
    /* three shards of 10, 25 and 5 sequences: each ends with the token the next one starts with,
     * so that their sequences are exactly those of the single file */
    snprintf(a, sizeof a, "%s/shard_000.bin", dir);
    snprintf(b, sizeof b, "%s/shard_001.bin", dir);
    snprintf(c, sizeof c, "%s/shard_002.bin", dir);
    CHECK(write_tokens(a, all, 10 * T + 1, 10 * T + 1) == 0);
    CHECK(write_tokens(b, all + 10 * T, 25 * T + 1, 25 * T + 1) == 0);
    CHECK(write_tokens(c, all + 35 * T, 5 * T + 1, 5 * T + 1) == 0);
    snprintf(pattern, sizeof pattern, "%s/shard_*.bin", dir);
    mps_err err;
    mps_err_clear(&err);
    mps_tokens *single = NULL, *set = NULL;
    CHECK(mps_tokens_open(one, T, VOCAB, &single, &err) == 0);
    CHECK_MSG(mps_tokens_open(pattern, T, VOCAB, &set, &err) == 0, "%s", err.msg);
    if (single && set) {
        CHECK(mps_tokens_sequences(single) == 40 && mps_tokens_sequences(set) == 40);
        int same = 1;
        for (int64_t seq = 0; seq < 100; seq++) { /* past the end: the stream repeats */
            int32_t xi[T], xt[T], yi[T], yt[T];
            CHECK(mps_tokens_read(single, seq, xi, xt, &err) == 0);
            CHECK(mps_tokens_read(set, seq, yi, yt, &err) == 0);
            same &= memcmp(xi, yi, sizeof xi) == 0 && memcmp(xt, yt, sizeof xt) == 0;
            same &= xi[0] == all[(seq % 40) * T] && xt[T - 1] == all[(seq % 40) * T + T];
        }
        CHECK_MSG(same, "the shard set reads other sequences than the single file");
    }
    mps_tokens_close(single);
    mps_tokens_close(set);

    /* a pattern that matches nothing; a bad shard among good ones, named; an id beyond the vocabulary */
    char none[1200];
    snprintf(none, sizeof none, "%s/nothing_*.bin", dir);
    mps_err_clear(&err);
    CHECK(mps_tokens_open(none, T, VOCAB, &set, &err) != 0 && err.code == MPS_EUSAGE &&
          strstr(err.msg, "no token file matches"));
    CHECK(write_tokens(b, all + 10 * T, 25 * T + 1, 25 * T + 5) == 0); /* claims 4 tokens it lacks */
    mps_err_clear(&err);
    CHECK(mps_tokens_open(pattern, T, VOCAB, &set, &err) != 0 && err.code == MPS_ECORRUPT &&
          strstr(err.msg, "shard_001.bin: header says"));
    CHECK(write_tokens(b, all + 10 * T, 25 * T + 1, 25 * T + 1) == 0);
    mps_err_clear(&err);
    CHECK(mps_tokens_open(pattern, T, 100, &set, &err) == 0);
    int32_t in[T], tg[T];
    int bad = 0;
    for (int64_t seq = 0; seq < 40 && !bad; seq++)
        bad = mps_tokens_read(set, seq, in, tg, &err) != 0;
    CHECK(bad && err.code == MPS_ECORRUPT && strstr(err.msg, "beyond the model's vocabulary of 100"));
    mps_tokens_close(set);

    /* version 2 (uint32 tokens, Llama 3's vocabulary of 128256): the ids read back exactly; one
     * at or above the model's vocabulary names the file and the token's place in it */
    static uint32_t wide[N];
    for (int i = 0; i < N; i++)
        wide[i] = (uint32_t)((i * 7919u + 13) % 128256u);
    wide[3 * T + 2] = 128256; /* sequence 3, token 2 */
    char v2[1200];
    snprintf(v2, sizeof v2, "%s/v2.bin", dir);
    FILE *f = fopen(v2, "wb");
    int32_t h2[256] = { 20240520, 2, N };
    CHECK(f && fwrite(h2, sizeof h2, 1, f) == 1 && fwrite(wide, 4, N, f) == (size_t)N && fclose(f) == 0);
    mps_err_clear(&err);
    CHECK_MSG(mps_tokens_open(v2, T, 128256, &set, &err) == 0, "%s", err.msg);
    if (set) {
        CHECK(mps_tokens_sequences(set) == 40);
        CHECK(mps_tokens_read(set, 1, in, tg, &err) == 0);
        int same = 1;
        for (int i = 0; i < T; i++)
            same &= in[i] == (int32_t)wide[T + i] && tg[i] == (int32_t)wide[T + i + 1];
        CHECK_MSG(same, "version 2 tokens read back other ids");
        CHECK(wide[T + 1] > 65535 || wide[T + 2] > 65535 || wide[T + 3] > 65535);
        mps_err_clear(&err);
        CHECK(mps_tokens_read(set, 3, in, tg, &err) != 0 && err.code == MPS_ECORRUPT);
        char want[1400];
        snprintf(want, sizeof want, "%s: token 26 is id 128256, beyond the model's vocabulary of 128256", v2);
        CHECK_MSG(strcmp(err.msg, want) == 0, "%s", err.msg);
        mps_tokens_close(set);
    }
    /* the synthetic writer: version 2 above 65535 ids, version 1 up to them */
    const int64_t vocabs[2] = { 65535, 65536 };
    for (int k = 0; k < 2; k++) {
        mps_err_clear(&err);
        CHECK(mps_tokens_write_synthetic(v2, 1000, vocabs[k], 3, &err) == 0);
        int32_t hdr[3] = { 0, 0, 0 };
        f = fopen(v2, "rb");
        CHECK(f && fread(hdr, sizeof hdr, 1, f) == 1 && fclose(f) == 0);
        CHECK(hdr[0] == 20240520 && hdr[1] == 1 + k && hdr[2] == 1000);
        CHECK(mps_tokens_open(v2, T, vocabs[k], &set, &err) == 0);
        if (set) {
            CHECK(mps_tokens_read(set, 5, in, tg, &err) == 0);
            mps_tokens_close(set);
        }
    }
    TEST_DONE();
}
