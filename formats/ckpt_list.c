#include "ckpt_list.h"

#include <stdio.h>

#include "ckpt_internal.h"

int mps_ckpt_list(mps_ckpt *c, int tensor, int kind, mps_piece_fn fn, void *ctx, mps_err *err)
{
    const mps_manifest *m = &c->m;
    int nt = mps_tensor_count(&m->cfg), listed = 0;
    for (int k = 0; k < MPS_KIND_COUNT; k++) {
        if (!(m->kinds & (1u << k)) || (kind >= 0 && k != kind))
            continue;
        for (int t = 0; t < nt; t++) {
            if (tensor >= 0 && t != tensor)
                continue;
            mps_tensor_spec spec;
            mps_tensor_spec_get(&m->cfg, t, &spec);
            int np = mps_piece_count(&m->cfg, &m->layout, (mps_kind)k, t);
            for (int id = 0; id < np; id++) {
                mps_piece p;
                mps_piece_by_id(&m->cfg, &m->layout, (mps_kind)k, t, id, &p);
                if (p.flat_end == p.flat_begin)
                    continue; /* empty pieces are not stored */
                mps_listed_piece lp = { .kind = (mps_kind)k, .tensor = t, .spec = &spec, .box = p.box,
                                        .flat_begin = p.flat_begin, .flat_end = p.flat_end,
                                        .whole_box = p.flat_begin == 0 && p.flat_end == mps_box_numel(&p.box),
                                        .bytes = (p.flat_end - p.flat_begin) * (int64_t)sizeof(float) };
                lp.rank = mps_owner_of(c->owners, (mps_kind)k, t, id);
                mps_shard_file_name(lp.rank, lp.file, sizeof lp.file);
                snprintf(lp.dataset, sizeof lp.dataset, "/%s/%s", mps_kind_name((mps_kind)k), spec.name);
                if (fn(ctx, &lp, err) != 0)
                    return -1;
                listed++;
            }
        }
    }
    return listed;
}
