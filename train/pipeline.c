/* Pipeline peers and channels (pipeline.h). */
#include "pipeline.h"

int mps_pipe_channel(const mps_layout *L, int sender, int receiver)
{
    const int up = receiver > sender ? 0 : 1;
    return 2 * up + mps_layout_coords(L, sender).pp % 2;
}

int mps_pipe_peers(const mps_layout *L, int rank, int *peers)
{
    const mps_coords c = mps_layout_coords(L, rank);
    const int tied = c.pp == 0 ? L->pp - 1 : c.pp == L->pp - 1 ? 0 : -1;
    const int stages[MPS_PIPE_MAX_PEERS] = { c.pp - 1, c.pp + 1, tied };
    int n = 0;
    for (int i = 0; i < MPS_PIPE_MAX_PEERS; i++) {
        const int s = stages[i];
        if (s < 0 || s >= L->pp || s == c.pp || (i == 2 && (s == stages[0] || s == stages[1])))
            continue;
        peers[n++] = mps_layout_rank(L, s, c.dp, c.tp);
    }
    return n;
}
