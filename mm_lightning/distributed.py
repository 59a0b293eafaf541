"""Gathers over the data-parallel group (with or without gradient) and the data-parallel rank helpers.

Losses over the global batch (CLIP, SigLIP, NT-Xent), MoCo's queue, and the evaluation callbacks
(retrieval, zero-shot, probes) combine the samples of every *data-parallel* rank. Under tensor (or
other model) parallelism that is not the whole world: the ranks of one tensor-parallel group hold
the same samples (the data module splits data over the data-parallel ranks only), and gathering over
the world would count each sample once per tensor-parallel rank (and break CLIP's ``arange`` labels).

The group is the default (whole) group unless :func:`set_data_parallel_group` names another;
:meth:`mm_lightning.tasks.base.Task.configure_model` sets it from the ``data_parallel`` axis of a
``ModelParallelStrategy``'s device mesh at the start of every ``fit`` / ``validate`` / ``test``, and
back to the whole group under any other strategy.

Built on ``torch.distributed._functional_collectives.all_gather_tensor_autograd`` (differentiable: its
backward reduce-scatters, summing the gradients every rank computed for a slice and handing each rank its
own; it replaces ``torch.distributed.nn.functional.all_gather``, deprecated in torch 2.14) and torchmetrics'
``gather_all_tensors`` (tensors whose sizes differ between ranks).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

_DATA_PARALLEL_GROUP: Any = None  # None: the default group (every rank)


def set_data_parallel_group(group: Any = None) -> None:
    """Gather over ``group`` from now on (a ``ProcessGroup``; ``None``: every rank)."""
    global _DATA_PARALLEL_GROUP
    _DATA_PARALLEL_GROUP = group


def data_parallel_group() -> Any:
    """The process group the gathers run over (``None`` stands for the default group)."""
    return _DATA_PARALLEL_GROUP


def is_distributed() -> bool:
    """True inside an initialised process group whose data-parallel group has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(_DATA_PARALLEL_GROUP) > 1


def rank() -> int:
    """This process's rank in the data-parallel group (0 outside distributed runs)."""
    return dist.get_rank(_DATA_PARALLEL_GROUP) if is_distributed() else 0


def world_size() -> int:
    """Ranks in the data-parallel group (1 outside distributed runs)."""
    return dist.get_world_size(_DATA_PARALLEL_GROUP) if is_distributed() else 1


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (shape ``(n, ...)``, same ``n`` on every rank) over the data-parallel ranks along dim 0,
    differentiably: with DDP's gradient averaging, a loss over the gathered batch trains exactly like the same
    loss on one process holding the whole batch. The identity on a single process."""
    if not is_distributed():
        return x
    from torch.distributed._functional_collectives import all_gather_tensor_autograd

    group = _DATA_PARALLEL_GROUP if _DATA_PARALLEL_GROUP is not None else dist.group.WORLD
    return all_gather_tensor_autograd(x.contiguous(), gather_dim=0, group=group)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` over the data-parallel ranks along dim 0 without gradient (queues, negatives)."""
    if not is_distributed():
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.detach().contiguous(), group=_DATA_PARALLEL_GROUP)
    return torch.cat(out, dim=0)


def gather_uneven(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` over the data-parallel ranks along dim 0 when ranks hold different numbers of rows
    (evaluation shards split unevenly; every dim may differ, a rank with nothing passes e.g. ``(0, 0)``).
    No gradient."""
    if not is_distributed():
        return x
    from torchmetrics.utilities.distributed import gather_all_tensors

    parts = gather_all_tensors(x.detach(), group=_DATA_PARALLEL_GROUP)
    width = [p for p in parts if p.numel()]
    if x.ndim == 2 and width:  # rows of a rank without any are (0, 0): give them the others' width
        parts = [p if p.numel() else p.new_zeros(0, width[0].shape[1]) for p in parts]
    return torch.cat(parts, dim=0)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over the data-parallel ranks, in place (counts of evaluation callbacks)."""
    if is_distributed():
        dist.all_reduce(x, group=_DATA_PARALLEL_GROUP)
    return x
