#include "layout.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int parse_int(const char *s, long *out)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (end == s || *end != '\0')
        return -1;
    *out = v;
    return 0;
}

static int parse_stages(const char *text, mps_layout *L, int *count, mps_err *err)
{
    char buf[2048];
    if (strlen(text) >= sizeof buf)
        return mps_fail(err, MPS_EUSAGE, "--layout: stages= list too long");
    strcpy(buf, text);
    int n = 0, first = 0;
    for (char *save = NULL, *tok = strtok_r(buf, ":", &save); tok; tok = strtok_r(NULL, ":", &save)) {
        long v;
        if (parse_int(tok, &v) != 0 || v < 1 || v > 1000000)
            return mps_fail(err, MPS_EUSAGE, "--layout: stages=%s: '%s' is not a layer count >= 1", text, tok);
        if (n >= MPS_MAX_PP)
            return mps_fail(err, MPS_EUSAGE, "--layout: stages=%s: more than %d stages", text, MPS_MAX_PP);
        L->stage_first[n++] = first;
        first += (int)v;
    }
    L->stage_first[n] = first;
    *count = n;
    return 0;
}

int mps_layout_parse(const char *text, const mps_config *cfg, mps_layout *out, mps_err *err)
{
    memset(out, 0, sizeof *out);
    out->dp = out->pp = out->tp = 1;
    char buf[4096];
    if (strlen(text) >= sizeof buf)
        return mps_fail(err, MPS_EUSAGE, "--layout: string too long");
    strcpy(buf, text);
    int seen[5] = { 0 }, stage_count = 0;
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(tok, '=');
        if (eq == NULL)
            return mps_fail(err, MPS_EUSAGE, "--layout %s: '%s' is not key=value (keys: dp, pp, tp, zero, stages)", text, tok);
        *eq = '\0';
        const char *key = tok, *val = eq + 1;
        static const char *const keys[5] = { "dp", "pp", "tp", "zero", "stages" };
        int k = -1;
        for (int i = 0; i < 5; i++)
            if (strcmp(key, keys[i]) == 0)
                k = i;
        if (k < 0)
            return mps_fail(err, MPS_EUSAGE, "--layout %s: unknown key '%s' (keys: dp, pp, tp, zero, stages)", text, key);
        if (seen[k]++)
            return mps_fail(err, MPS_EUSAGE, "--layout %s: key '%s' given twice", text, key);
        if (k == 4) {
            if (parse_stages(val, out, &stage_count, err) != 0)
                return -1;
            out->explicit_stages = 1;
            continue;
        }
        long v;
        if (parse_int(val, &v) != 0)
            return mps_fail(err, MPS_EUSAGE, "--layout %s: %s='%s' is not an integer", text, key, val);
        if (k == 3) {
            if (v < 0 || v > 3)
                return mps_fail(err, MPS_EUSAGE, "--layout %s: zero=%ld must be 0, 1, 2 or 3", text, v);
            out->zero = (int)v;
        } else {
            if (v < 1 || v > MPS_MAX_PAR)
                return mps_fail(err, MPS_EUSAGE, "--layout %s: %s=%ld must be between 1 and %d", text, key, v, MPS_MAX_PAR);
            if (k == 0) out->dp = (int)v;
            if (k == 1) out->pp = (int)v;
            if (k == 2) out->tp = (int)v;
        }
    }
    if (out->explicit_stages && stage_count != out->pp) {
        if (seen[1])
            return mps_fail(err, MPS_EUSAGE, "--layout %s: stages= lists %d stages but pp=%d", text, stage_count, out->pp);
        out->pp = stage_count;
    }
    if (mps_layout_validate(out, cfg, err) != 0)
        return mps_wrap(err, "--layout %s", text);
    return 0;
}

int mps_layout_validate(mps_layout *L, const mps_config *cfg, mps_err *err)
{
    if (L->dp < 1 || L->pp < 1 || L->tp < 1 || L->dp > MPS_MAX_PAR || L->tp > MPS_MAX_PAR)
        return mps_fail(err, MPS_EUSAGE, "dp, pp and tp must be >= 1");
    if (L->zero < 0 || L->zero > 3)
        return mps_fail(err, MPS_EUSAGE, "zero=%d must be 0..3", L->zero);
    if ((long long)L->dp * L->pp * L->tp > (1 << 24))
        return mps_fail(err, MPS_EUSAGE, "world size dp*pp*tp=%lld is too large", (long long)L->dp * L->pp * L->tp);
    if (L->pp > MPS_MAX_PP)
        return mps_fail(err, MPS_EUSAGE, "pp=%d exceeds the supported maximum %d", L->pp, MPS_MAX_PP);
    if (L->pp > cfg->n_layer)
        return mps_fail(err, MPS_EUSAGE, "pp=%d exceeds the model's n_layer=%d (every stage needs a layer)", L->pp, cfg->n_layer);
    if (cfg->n_head % L->tp != 0)
        return mps_fail(err, MPS_EUSAGE, "tp=%d must divide the model's n_head=%d", L->tp, cfg->n_head);
    /* each TP rank holds whole kv heads and the query heads that use them; replicating kv heads
     * over ranks (tp > n_kv_head) is not implemented */
    if (mps_cfg_kv_heads(cfg) % L->tp != 0)
        return mps_fail(err, MPS_EUSAGE, "tp=%d must divide the model's %d key/value heads (n_kv_head; %d query heads)%s",
                        L->tp, mps_cfg_kv_heads(cfg), cfg->n_head,
                        L->tp > mps_cfg_kv_heads(cfg) ? ": tp above n_kv_head would need kv-head replication" : "");
    if (L->explicit_stages) {
        if (L->stage_first[L->pp] != cfg->n_layer)
            return mps_fail(err, MPS_EUSAGE, "stages= add up to %d layers but the model has n_layer=%d",
                            L->stage_first[L->pp], cfg->n_layer);
        for (int s = 0; s < L->pp; s++)
            if (L->stage_first[s + 1] <= L->stage_first[s])
                return mps_fail(err, MPS_EUSAGE, "stage %d has no layer", s);
    } else {
        int base = cfg->n_layer / L->pp, extra = cfg->n_layer % L->pp, first = 0;
        for (int s = 0; s < L->pp; s++) {
            L->stage_first[s] = first;
            first += base + (s < extra ? 1 : 0);
        }
        L->stage_first[L->pp] = first;
    }
    return 0;
}

void mps_layout_format(const mps_layout *L, char *buf, size_t size)
{
    int n = snprintf(buf, size, "dp=%d,pp=%d,tp=%d,zero=%d", L->dp, L->pp, L->tp, L->zero);
    if (L->pp > 1 && n > 0 && (size_t)n < size) {
        n += snprintf(buf + n, size - n, ",stages=");
        for (int s = 0; s < L->pp && n > 0 && (size_t)n < size; s++)
            n += snprintf(buf + n, size - n, "%s%d", s ? ":" : "", L->stage_first[s + 1] - L->stage_first[s]);
    }
}

int mps_layout_stage_of_layer(const mps_layout *L, int layer)
{
    int lo = 0, hi = L->pp - 1; /* binary search: stage_first is increasing */
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (L->stage_first[mid] <= layer)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}
