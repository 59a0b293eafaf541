"""FSDP2 (``torch.distributed.fsdp.fully_shard``) of a model's blocks and roots, and replicated-gradient sync."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn as nn

Sharding = Literal["full", "hybrid", "no-reshard"]

_FORWARD_METHODS = ("forward_features", "forward_head", "encode_image", "encode_text", "embed", "generate")


def apply_fsdp(
    roots: Iterable[nn.Module],
    blocks: Iterable[nn.Module],
    mesh: Any,
    sharding: Sharding = "full",
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    cpu_offload: bool = False,
) -> None:
    """FSDP2: ``fully_shard`` every block, then each root module (the rest of the parameters).

    Args:
        roots: modules whose forward is called from outside (e.g. a task's backbone); other
            methods called from outside (``forward_features``, ``encode_text``...) are registered
            so they gather parameters too.
        blocks: the transformer blocks (inside the roots), one FSDP unit each.
        mesh: the data-parallel mesh: 1-D to shard, 2-D ``(replicate, shard)`` for ``hybrid``.
        sharding: ``full`` (ZeRO-3: parameters re-sharded after forward), ``no-reshard`` (ZeRO-2
            like: kept gathered between forward and backward, more memory, less communication),
            ``hybrid`` (HSDP: shard within a node, replicate across nodes; needs a 2-D mesh).
        param_dtype: compute dtype of gathered parameters (FSDP2 mixed precision), e.g. bfloat16.
        reduce_dtype: dtype of the gradient reduction (float32 keeps it exact).
        cpu_offload: keep sharded parameters, gradients and optimizer state in host memory.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if sharding == "hybrid" and mesh.ndim != 2:
        raise ValueError("sharding='hybrid' needs a 2-D (replicate, shard) mesh: use mm_lightning.parallel.ModelParallel")
    if sharding not in ("full", "hybrid", "no-reshard"):
        raise ValueError(f"sharding must be 'full', 'hybrid' or 'no-reshard', got {sharding!r}")
    kwargs: dict[str, Any] = {
        "mesh": mesh,
        "reshard_after_forward": sharding != "no-reshard",
        "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
        "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
    }
    for block in blocks:
        fully_shard(block, **kwargs)
    from torch.distributed.fsdp import register_fsdp_forward_method

    for root in roots:
        # the root's parameters are needed again right at the start of backward: keep them gathered
        fully_shard(root, **{**kwargs, "reshard_after_forward": False})
        for name in _FORWARD_METHODS:
            if callable(getattr(root, name, None)):
                register_fsdp_forward_method(root, name)


def sync_replicated_grads(params: Iterable[nn.Parameter], group: Any = None) -> None:
    """Average the gradients of parameters that no FSDP unit manages over ``group`` (after backward).

    Registers a post-accumulate-grad hook per parameter, so ranks keep identical copies of
    parameters held directly by a task (a CLIP temperature, say).
    """
    for p in params:
        if not p.requires_grad:
            continue

        def hook(param: torch.Tensor) -> None:
            if param.grad is not None and dist.is_initialized():
                dist.all_reduce(param.grad, op=dist.ReduceOp.SUM, group=group)
                param.grad.div_(dist.get_world_size(group))

        p.register_post_accumulate_grad_hook(hook)
