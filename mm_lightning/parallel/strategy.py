"""The Lightning side: :class:`ModelParallel` (Lightning's ``ModelParallelStrategy`` with FSDP2 settings) and
:func:`parallelize_task`, which :meth:`mm_lightning.tasks.base.Task.configure_model` calls under it."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn as nn
from lightning.pytorch.strategies import ModelParallelStrategy

from mm_lightning.parallel.checkpointing import apply_activation_checkpointing, compile_modules
from mm_lightning.parallel.fsdp import Sharding, apply_fsdp, sync_replicated_grads
from mm_lightning.parallel.tensor_parallel import apply_tensor_parallel

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ModelParallel(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2 x tensor parallel) with mm-lightning's FSDP settings.

    Every :class:`~mm_lightning.tasks.base.Task` parallelizes itself in ``configure_model``:
    tensor parallel over the ``tensor_parallel`` mesh axis when its size is > 1, then FSDP2 over the
    ``data_parallel`` axis. Runs on GPUs (NCCL) and on CPUs (gloo).

    Args:
        data_parallel_size: ranks that shard the model (FSDP); ``auto``: all devices of all nodes
            divided by ``tensor_parallel_size``.
        tensor_parallel_size: ranks that split each layer (tensor parallel); 1 disables it.
        sharding: ``full`` (ZeRO-3), ``no-reshard`` (ZeRO-2 like: parameters stay gathered from
            forward to backward) or ``hybrid`` (shard within ``replicate_size`` groups, replicate across).
        replicate_size: replicas for ``hybrid`` (default: the number of nodes).
        mixed_precision: FSDP2 mixed precision: ``bf16``/``fp16`` compute with fp32 gradient reduction;
            ``none`` leaves precision to the trainer's ``precision`` setting.
        cpu_offload: keep sharded parameters, gradients and optimizer state in host memory.
        save_distributed_checkpoint: save one shard per rank (a folder) instead of one full file on
            rank 0. One file (``false``) is what ``experiments.quantize`` and single-GPU runs load.
        process_group_backend: ``nccl``/``gloo``; default by device.
    """

    def __init__(
        self,
        data_parallel_size: int | Literal["auto"] = "auto",
        tensor_parallel_size: int = 1,
        sharding: Sharding = "full",
        replicate_size: int | None = None,
        mixed_precision: Literal["none", "bf16", "fp16"] = "none",
        cpu_offload: bool = False,
        save_distributed_checkpoint: bool = False,
        process_group_backend: str | None = None,
    ) -> None:
        if sharding not in ("full", "hybrid", "no-reshard"):
            raise ValueError(f"strategy sharding must be 'full', 'hybrid' or 'no-reshard', got {sharding!r}")
        if isinstance(tensor_parallel_size, int) and tensor_parallel_size < 1:
            raise ValueError(f"strategy tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )
        self.sharding = sharding
        self.replicate_size = replicate_size
        self.mixed_precision = mixed_precision
        self.cpu_offload = cpu_offload

    def setup_environment(self) -> None:
        world = self.num_nodes * self.num_processes
        tp = self._tensor_parallel_size
        if self._data_parallel_size == "auto":
            if world % tp:
                raise ValueError(f"tensor_parallel_size={tp} does not divide the {world} devices")
            self._data_parallel_size = world // tp
        super().setup_environment()
        if self.sharding == "hybrid":
            from torch.distributed.device_mesh import init_device_mesh

            dp = int(self._data_parallel_size)
            replicas = self.replicate_size or self.num_nodes
            if dp % replicas:
                raise ValueError(f"replicate_size={replicas} does not divide data_parallel_size={dp}")
            mesh = init_device_mesh(
                self.root_device.type,
                (replicas, dp // replicas, tp),
                mesh_dim_names=("dp_replicate", "dp_shard", "tensor_parallel"),
            )
            mesh["dp_replicate", "dp_shard"]._flatten("data_parallel")
            self._device_mesh = mesh
            self.lightning_module._device_mesh = mesh

    def fsdp_mesh(self) -> Any:
        """The mesh FSDP shards over: 1-D ``data_parallel``, or 2-D ``(dp_replicate, dp_shard)`` for hybrid."""
        if self.sharding == "hybrid":
            return self.device_mesh["dp_replicate", "dp_shard"]
        return self.device_mesh["data_parallel"]

    def fsdp_kwargs(self) -> dict[str, Any]:
        """Arguments of :func:`apply_fsdp` from this strategy's settings."""
        dtype = _DTYPES.get(self.mixed_precision)
        return {
            "sharding": self.sharding,
            "param_dtype": dtype,
            "reduce_dtype": torch.float32 if dtype is not None else None,
            "cpu_offload": self.cpu_offload,
        }


def parallelize_task(
    task: nn.Module,
    strategy: ModelParallelStrategy,
    blocks: list[nn.Module],
    roots: list[nn.Module],
    activation_checkpointing: bool,
    compile_blocks: bool,
    plan_fn: Callable[[nn.Module, int], dict[str, Any] | None] | None = None,
) -> list[nn.Module]:
    """Apply TP, activation checkpointing, compile and FSDP2 (in torchtitan's order) to a task.

    Activation checkpointing uses the models' own switches (:func:`apply_activation_checkpointing` on
    each root, before FSDP wraps the blocks). Returns the blocks. Parameters of ``task`` outside ``roots`` get their
    gradients averaged over the data-parallel group by :func:`sync_replicated_grads`.
    """
    mesh = strategy.device_mesh
    tp_size = mesh["tensor_parallel"].size()
    if tp_size > 1:
        apply_tensor_parallel(blocks, mesh["tensor_parallel"], plan_fn)
    if activation_checkpointing:
        for root in roots:
            if not apply_activation_checkpointing(root):
                raise ValueError(
                    f"model.activation_checkpointing: {type(root).__name__} has no part with a checkpointing switch "
                    "(timm's set_grad_checkpointing, Hugging Face's activation_checkpointing_enable)"
                )
    if compile_blocks:
        compile_modules(blocks)
    dp_mesh = strategy.fsdp_mesh() if isinstance(strategy, ModelParallel) else mesh["data_parallel"]
    kwargs = strategy.fsdp_kwargs() if isinstance(strategy, ModelParallel) else {}
    managed: set[int] = set()
    if dp_mesh.size() > 1 or kwargs.get("param_dtype") is not None or kwargs.get("cpu_offload"):
        apply_fsdp(roots, blocks, dp_mesh, **kwargs)
        managed = {id(p) for r in roots for p in r.parameters()}
    elif tp_size == 1:
        warnings.warn("ModelParallel with one data-parallel rank and tensor_parallel_size=1 leaves the model as is")
    loose = [p for p in task.parameters() if id(p) not in managed and p.requires_grad]
    if loose and dp_mesh.size() > 1:
        sync_replicated_grads(loose, group=mesh["data_parallel"].get_group())
    return blocks
