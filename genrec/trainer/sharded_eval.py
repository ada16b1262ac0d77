"""Full-catalog top-k that scales: each rank scores 1/W of the catalog, the top-k are merged.

`model.top_k` scores the whole catalog on every rank: at T-ECD size (30M items, 64 ranks)
that is ~473 sharded lookups of 65,536 ids per eval step, repeated on all 64 ranks.
`sharded_top_k` gives the same result (same ids and scores per target position) at 1/W of
the lookups per rank:

  1. every rank's user states [P_r, D] (and its history exclusions) are gathered: [P, D];
  2. rank r scores all P states against its slice of the catalog, rows [r*m, (r+1)*m) with
     m = ceil(N / W) (the last slice padded with masked ids, so every rank makes the same
     number of equally sized lookups, a collective), keeping a running top-k [P, k];
  3. the W local top-k are gathered ([W, P, k]) and merged by one topk; rank r keeps its
     own P_r rows.

Per rank and eval step: N/W item lookups (T-ECD, W=64: 469k ids, 8 blocks instead of 473),
P*N/W scores (the same flops as P_r*N), and W*P*k gathered (64 ranks x 128 sequences x
~20 targets x 10 x 12 B: 20 MB). Collectives go where distributed.py says: device tensors
on the default group, host (CPU) tensors on the host group.
"""

from __future__ import annotations

import torch

from genrec.data_pipeline.batch import Batch
from genrec.models.retrieval import blocked_top_k, history_columns, target_events
from genrec.trainer.distributed import all_gather_rows, all_gather_same, world


@torch.no_grad()
def sharded_top_k(
    module,
    batch: Batch,
    catalog_ids: torch.Tensor,
    k: int,
    exclude_history: bool = True,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`module.top_k`'s result — (ids [P_r, k], scores, targets [P_r]) for this rank's
    target positions over the full catalog — from 1/W of the catalog per rank."""
    rank, w = world()
    block = block or module.rcfg.top_k_block
    n = int(catalog_ids.numel())
    k = min(k, n)
    states, targets, rows = module.user_states(batch)
    all_states, sizes = all_gather_rows(states, with_sizes=True)
    first = int(sum(sizes[:rank]))
    if exclude_history:
        tgt, _ = target_events(batch)
        seen_p, seen_col = history_columns(batch, tgt, rows, catalog_ids)
        pairs = all_gather_rows(torch.stack([seen_p + first, seen_col], dim=1))
        seen_p, seen_col = pairs[:, 0], pairs[:, 1]
    m = -(-n // w)  # slice length
    lo = rank * m
    cols = torch.arange(lo, lo + m, device=catalog_ids.device)
    real = cols < n
    ids = catalog_ids[cols.clamp_max(n - 1)]
    best_i, best_s = blocked_top_k(
        all_states,
        ids,
        module.item_embeddings,
        k,
        block,
        seen_p if exclude_history else None,
        seen_col if exclude_history else None,
        first_col=lo,
        valid=real,
    )
    # merge: every rank's top-k of every position, best k of the W * k
    merged_s = torch.cat(all_gather_same(best_s), dim=1)
    merged_i = torch.cat(all_gather_same(best_i), dim=1)
    top_s, top = torch.topk(merged_s, k, dim=1)
    top_i = torch.gather(merged_i, 1, top)
    own = slice(first, first + states.shape[0])
    return top_i[own], top_s[own], targets
