"""All-gather of per-rank slices that a strided split made uneven, back into dataset order.

The distributed kNN evaluation gives rank r the dataset positions r, r + W, r + 2W, ... (no padding, so the
ranks' counts differ by at most one). Every rank then needs the whole bank in the order one process sees it:
top-k ties break by position, so the order is part of the result.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def gather_strided(local: torch.Tensor, world_size: int) -> torch.Tensor:
    """The full tensor on every rank, in dataset order: row i is row i // W of rank i % W's ``local``.

    Every rank passes the same trailing shape and dtype, on the device its backend gathers (CPU for gloo, the
    rank's GPU for nccl). all_gather needs equal shapes, so each slice is padded to the longest and the true
    lengths are gathered first. One process (W = 1, or no process group) gets ``local`` back as it is.
    """
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return local
    lengths = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(world_size)]
    dist.all_gather(lengths, torch.tensor([local.shape[0]], device=local.device))
    counts = [int(n) for n in torch.cat(lengths).tolist()]
    total = sum(counts)
    strided = [len(range(rank, total, world_size)) for rank in range(world_size)]
    if counts != strided:  # another split would interleave into the wrong order without a sound
        raise ValueError(f"rows per rank {counts} are not a strided split of {total} rows (expected {strided})")
    padded = local.new_zeros((counts[0], *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return torch.stack(parts, dim=1).flatten(0, 1)[:total]  # (longest, W, ...): row j of rank r is j * W + r
