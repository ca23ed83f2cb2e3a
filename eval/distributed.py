"""Per-item rows computed by the processes of a torch.distributed group: whole batches each, gathered in item order.

Every process takes whole batches (batch b goes to process b mod world), so each batch holds exactly the items a
single process would batch together, and the gathered rows equal one process's to the last digit. The gathering is
torchmetrics' state synchronisation. Without a group everything runs in this process.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def process_group() -> tuple[int, int]:
    """(rank, world size) of the initialised torch.distributed group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every process of the group (nothing without one)."""
    import torch.distributed as dist

    if process_group()[1] > 1:
        dist.barrier()


def owned_items(count: int, batch_size: int, rank: int, world: int) -> list[int]:
    """Indices of the batches (of `batch_size` consecutive items) numbered rank, rank + world, … in order."""
    batches = range(rank, math.ceil(count / batch_size), world)
    return [i for b in batches for i in range(b * batch_size, min(count, (b + 1) * batch_size))]


class _OrderedRows(Metric):
    """Rows computed by several processes, gathered with torchmetrics' state sync and put back in item order."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("rows", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    def update(self, rows: torch.Tensor, index: torch.Tensor) -> None:
        self.rows.append(rows)
        self.index.append(index)

    def compute(self) -> torch.Tensor:
        rows, index = dim_zero_cat(self.rows), dim_zero_cat(self.index)
        return rows[torch.argsort(index)]


def shared_rows(compute: Callable[[list[int]], np.ndarray], count: int, batch_size: int, device: str) -> np.ndarray:
    """`compute(items)` over all `count` items, split across the processes of a torch.distributed group."""
    rank, world = process_group()
    if world == 1:
        return compute(list(range(count)))
    import torch.distributed as dist

    mine = owned_items(count, batch_size, rank, world)
    rows = compute(mine or [0])  # a process without a batch computes one item to learn the row shape, keeps none
    rows = rows if mine else rows[:0]
    on = torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")
    metric = _OrderedRows().to(on)
    metric.update(
        torch.from_numpy(np.ascontiguousarray(rows)).to(on), torch.tensor(mine, dtype=torch.int64, device=on)
    )
    return metric.compute().cpu().numpy()
