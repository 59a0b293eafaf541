"""Tensor parallelism of transformer blocks (Megatron-LM's layout) with ``torch.distributed.tensor.parallel``.

Each block's attention and MLP input projections (``qkv``/``q_proj``/``fc1``/...) are sharded
column-wise, the output projections (``proj``/``o_proj``/``fc2``/...) row-wise, so each block needs
one all-reduce in attention and one in the MLP.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch.nn as nn

#: input projections, sharded column-wise (output features); value = chunks fused in the weight
COLWISE: dict[str, int] = {
    "qkv": 3, "in_proj": 3, "gate_up_proj": 2,  # fused
    "q_proj": 1, "k_proj": 1, "v_proj": 1, "query": 1, "key": 1, "value": 1, "wq": 1, "wk": 1, "wv": 1,
    "fc1": 1, "gate_proj": 1, "up_proj": 1, "w1": 1, "w3": 1, "c_fc": 1, "lin1": 1, "linear1": 1,
}  # fmt: skip
#: output projections, sharded row-wise (input features)
ROWWISE: tuple[str, ...] = ("proj", "o_proj", "out_proj", "wo", "fc2", "down_proj", "w2", "c_proj", "lin2", "linear2")
#: integer attributes of an attention module that count heads (or their width) and shrink under TP
HEAD_ATTRS: tuple[str, ...] = ("num_heads", "num_attention_heads", "num_key_value_heads", "attn_dim", "all_head_size")


def _packed_colwise(chunks: int):
    """Column-wise sharding of a fused projection ``[q; k; v]``: every rank gets its share of each chunk.

    Plain ``ColwiseParallel`` would give rank 0 all of ``q`` and half of ``k``; a
    ``_StridedShard`` placement gives it the first half of ``q``, ``k`` and ``v`` each, so the
    module's own reshape into heads stays correct and ``full_tensor()`` returns the original
    layout (checkpoints match the unsharded model).
    """
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel
    from torch.distributed.tensor.placement_types import _StridedShard

    class PackedColwiseParallel(ColwiseParallel):
        def __init__(self) -> None:
            super().__init__()
            self.output_layouts = (_StridedShard(-1, split_factor=chunks),)

        def _partition_linear_fn(self, name, module, device_mesh):  # noqa: ANN001
            for pname, param in module.named_parameters():
                dparam = nn.Parameter(
                    distribute_tensor(param, device_mesh, [_StridedShard(0, split_factor=chunks)]),
                    requires_grad=param.requires_grad,
                )
                module.register_parameter(pname, dparam)

    return PackedColwiseParallel()


def tensor_parallel_plan(block: nn.Module, tp_size: int) -> dict[str, Any]:
    """The tensor-parallel plan of one block: ``{"attn.qkv": colwise, "attn.proj": rowwise, ...}``.

    Every module of the block with column-wise input projections (``COLWISE`` names) and exactly one
    row-wise output projection (``ROWWISE`` names), all ``nn.Linear``, gets sharded; its head-count
    attributes (``HEAD_ATTRS``) are divided by ``tp_size`` in :func:`apply_tensor_parallel`.
    Raises when a width is not divisible by ``tp_size``.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan: dict[str, Any] = {}
    for prefix, parent in block.named_modules():
        children = dict(parent.named_children())
        cols = {n: m for n, m in children.items() if n in COLWISE and isinstance(m, nn.Linear)}
        rows = {n: m for n, m in children.items() if n in ROWWISE and isinstance(m, nn.Linear)}
        if not cols or len(rows) != 1:
            continue
        for name, lin in cols.items():
            width = lin.out_features // COLWISE[name]
            if lin.out_features % COLWISE[name] or width % tp_size:
                raise ValueError(
                    f"{type(parent).__name__}.{name} has {lin.out_features} output features: its width per chunk must"
                    f" be divisible by tensor_parallel_size={tp_size}"
                )
        for attr in HEAD_ATTRS:
            value = getattr(parent, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value % tp_size:
                raise ValueError(
                    f"{type(parent).__name__}.{attr}={value} is not divisible by tensor_parallel_size={tp_size}:"
                    " choose a head count (model num_heads) that is"
                )
        dot = f"{prefix}." if prefix else ""
        for name in cols:
            plan[dot + name] = ColwiseParallel() if COLWISE[name] == 1 else _packed_colwise(COLWISE[name])
        plan[dot + next(iter(rows))] = RowwiseParallel()
    return plan


def apply_tensor_parallel(
    blocks: Iterable[nn.Module],
    tp_mesh: Any,
    plan_fn: Callable[[nn.Module, int], dict[str, Any] | None] | None = None,
) -> int:
    """Shard each block over the 1-D ``tp_mesh`` with its plan (:func:`tensor_parallel_plan` by default).

    Every rank of the tensor-parallel group must see the same inputs (same batch, same seed).
    Returns the number of blocks sharded; raises if a block has nothing to shard.
    """
    from torch.distributed.tensor.parallel import parallelize_module

    tp = tp_mesh.size()
    count = 0
    for block in blocks:
        plan = (plan_fn or tensor_parallel_plan)(block, tp)
        if not plan:
            raise ValueError(
                f"no tensor-parallel plan for {type(block).__name__}: none of its modules has column-wise"
                f" ({', '.join(sorted(COLWISE))}) and row-wise ({', '.join(ROWWISE)}) nn.Linear projections;"
                " give the task a tensor_parallel_plan(block, tp_size) method"
            )
        parents = {name.rsplit(".", 1)[0] if "." in name else "" for name in plan}
        for prefix in parents:
            parent = block.get_submodule(prefix) if prefix else block
            for attr in HEAD_ATTRS:
                value = getattr(parent, attr, None)
                if isinstance(value, int) and not isinstance(value, bool):
                    setattr(parent, attr, value // tp)
        parallelize_module(block, tp_mesh, plan)
        count += 1
    return count
