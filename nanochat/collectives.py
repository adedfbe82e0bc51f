"""
The two collectives the sharded optimizers (DistMuon in muon.py, DistAdamW in adamw.py) are built on:
start a reduce-scatter of summed gradients, start an all-gather of updated rows. Both return the
async work handle so that communication overlaps the optimizer's arithmetic.

Sum-then-divide is used instead of ReduceOp.AVG, which older gloo builds reject.
reduce_scatter_tensor is missing from gloo in some PyTorch versions: on the first failure we switch,
for the rest of the process, to all_reduce of the whole buffer followed by taking this rank's slice.
That moves world_size times more data but gives the same numbers. (PyTorch 2.13's gloo has both.)
"""

import torch
import torch.distributed as dist
from torch import Tensor

from nanochat.common import print0

_native_reduce_scatter = True


def _reduce_scatter_fn():
    # PyTorch >= 2.10 renamed reduce_scatter_tensor -> reduce_scatter_single (the old name warns)
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_gather_fn():
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def start_reduce_scatter_sum(full: Tensor, world_size: int, rank: int):
    """
    Start summing `full` (world_size * n, ...) over ranks; rank r receives rows [r*n, (r+1)*n).
    Returns (work, shard): shard holds the summed rows once work.wait() has returned.
    """
    global _native_reduce_scatter
    n = full.size(0) // world_size
    if _native_reduce_scatter:
        shard = torch.empty_like(full[:n])
        try:
            return _reduce_scatter_fn()(shard, full, op=dist.ReduceOp.SUM, async_op=True), shard
        except (RuntimeError, NotImplementedError, ValueError) as e:
            _native_reduce_scatter = False
            print0(f"reduce_scatter is not supported here ({type(e).__name__}: {e}); using all_reduce + slice")
    work = dist.all_reduce(full, op=dist.ReduceOp.SUM, async_op=True)
    return work, full[rank * n:(rank + 1) * n]


def start_all_gather(out: Tensor, shard: Tensor):
    """Start gathering every rank's `shard` into `out` (world_size * len(shard), ...), in rank order."""
    return _all_gather_fn()(out, shard, async_op=True)
