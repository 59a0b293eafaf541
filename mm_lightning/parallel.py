"""Model parallelism for every task: FSDP2, tensor parallelism, activation checkpointing, torch.compile.

Everything here works on the *transformer blocks* of a model, found generically by
:func:`find_transformer_blocks` (a task can override the choice with its
``transformer_blocks()`` hook):

- :func:`apply_activation_checkpointing` makes each block recompute its activations in the
  backward pass (parameter names and state-dict keys unchanged).
- :func:`apply_tensor_parallel` shards each block's attention and MLP projections over the
  tensor-parallel mesh: column-wise the input projections (``qkv``/``q_proj``/``fc1``/...),
  row-wise the output projections (``proj``/``o_proj``/``fc2``/...), so each block needs one
  all-reduce in attention and one in the MLP (Megatron-LM's layout).
- :func:`apply_fsdp` shards parameters, gradients and optimizer state with FSDP2
  (``torch.distributed.fsdp.fully_shard``) per block, then the rest of the model.
- :class:`ModelParallel` is Lightning's ``ModelParallelStrategy`` with the FSDP2 settings
  (sharding ``full`` / ``hybrid`` / ``no-reshard``, mixed precision, CPU offload) that
  :meth:`mm_lightning.tasks.base.Task.configure_model` applies; :class:`DeepSpeed` is
  Lightning's DeepSpeed strategy with an install hint.

This module imports Lightning only for the strategies; the functions work on plain modules.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn as nn
from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy

#: block classes found first, before the generic search (extend with :func:`register_block_type`)
_BLOCK_TYPES: list[type[nn.Module]] = []


def register_block_type(cls: type[nn.Module]) -> type[nn.Module]:
    """Declare ``cls`` a transformer block (usable as a class decorator)."""
    if cls not in _BLOCK_TYPES:
        _BLOCK_TYPES.append(cls)
    return cls


def _default_block_types() -> tuple[type[nn.Module], ...]:
    import timm.models.vision_transformer as vt

    names = ("Block", "ResPostBlock", "ParallelScalingBlock", "ParallelThingsBlock")
    torch_layers = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)  # e.g. our CLIP text tower
    return tuple(getattr(vt, n) for n in names if hasattr(vt, n)) + torch_layers + tuple(_BLOCK_TYPES)


def _outermost(modules: list[nn.Module]) -> list[nn.Module]:
    """Drop modules nested inside another module of the list (keeps the order)."""
    inner: set[int] = set()
    for m in modules:
        for sub in m.modules():
            if sub is not m:
                inner.add(id(sub))
    return [m for m in modules if id(m) not in inner]


def find_transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``module``, in forward order: the units for FSDP, TP and checkpointing.

    Looked up in this order:

    1. Hugging Face models: the classes named in ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``).
    2. timm's ViT blocks, ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` (the CLIP
       text tower) and classes added with :func:`register_block_type`.
    3. Generically: the module class that occurs most often (by parameter count) as an element of an
       ``nn.ModuleList`` / ``nn.Sequential`` (a ResNet's ``BasicBlock``, a text encoder's layers).

    Returns an empty list when nothing repeats.
    """
    no_split: set[str] = set()
    for sub in module.modules():
        names = getattr(sub, "_no_split_modules", None)
        if names:
            no_split.update(names)
    if no_split:
        found = [m for m in module.modules() if type(m).__name__ in no_split]
        if found:
            return _outermost(found)
    known = _default_block_types()
    found = [m for m in module.modules() if isinstance(m, known)]
    if found:
        return _outermost(found)
    weight: dict[type, int] = {}
    members: dict[type, list[nn.Module]] = {}
    for container in module.modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            continue
        for child in container:
            n = sum(p.numel() for p in child.parameters())
            if n == 0 or isinstance(child, (nn.ModuleList, nn.Sequential)):
                continue
            cls = type(child)
            members.setdefault(cls, []).append(child)
            weight[cls] = weight.get(cls, 0) + n
    repeated = [c for c in members if len(members[c]) >= 2]
    if not repeated:
        return []
    best = max(repeated, key=lambda c: weight[c])
    return _outermost(members[best])


# ------------------------------------------------------------------ activation checkpointing
class ActivationCheckpointed:
    """Mixin for a block class: ``forward`` runs under ``torch.utils.checkpoint`` (non-reentrant).

    Swapping a block's class (as FSDP2's ``fully_shard`` does) rather than wrapping it keeps every
    parameter name, so checkpoints, optimizers and Lightning's checkpoint loaders see the same model.
    """

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)


_CHECKPOINTED: dict[type, type] = {}


def apply_activation_checkpointing(blocks: Iterable[nn.Module]) -> list[nn.Module]:
    """Recompute each block's activations in the backward pass instead of storing them; returns the blocks.

    Activations inside a block are not kept for backward but recomputed, trading ~30% more
    compute for activation memory that no longer grows with depth. The blocks keep their names,
    parameters and state-dict keys (their class becomes ``Checkpointed<Class>``).
    """
    blocks = list(blocks)
    for block in blocks:
        if isinstance(block, ActivationCheckpointed):
            continue
        cls = type(block)
        if cls not in _CHECKPOINTED:
            name = f"Checkpointed{cls.__name__}"
            new = type(name, (ActivationCheckpointed, cls), {"__module__": __name__, "__qualname__": name})
            globals().setdefault(name, new)  # importable by name, as pickle needs
            _CHECKPOINTED[cls] = new
        block.__class__ = _CHECKPOINTED[cls]
    return blocks


def compile_modules(modules: Iterable[nn.Module], **kwargs: Any) -> None:
    """``torch.compile`` each module in place (``nn.Module.compile``: names and state dict unchanged).

    Compiling block by block (as torchtitan does) reuses one compiled graph for all blocks of a
    shape, keeps FSDP's per-block hooks outside the graphs, and compiles faster than the whole model.
    """
    for module in modules:
        module.compile(**kwargs)


# ------------------------------------------------------------------------- tensor parallel
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


# ------------------------------------------------------------------------------------ FSDP2
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


# ----------------------------------------------------------------------- Lightning strategies
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


def require_deepspeed() -> None:
    """Raise a clear error when DeepSpeed is not installed (it is an optional extra)."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise ModuleNotFoundError(
            "the DeepSpeed presets need the deepspeed package: pip install 'mm-lightning[deepspeed]'"
            " (Lightning runs DeepSpeed on CUDA GPUs only; on CPU use presets/fsdp.yaml)"
        )


class DeepSpeed(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` (ZeRO stages 1-3, CPU offload) that names the extra to install.

    Takes every argument of ``lightning.pytorch.strategies.DeepSpeedStrategy`` (``stage``,
    ``offload_optimizer``, ``offload_parameters``, ``config``, ...). Lightning runs it on CUDA only.
    """

    def __init__(self, **kwargs: Any) -> None:
        require_deepspeed()
        super().__init__(**kwargs)


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

    Returns the (possibly wrapped) blocks. Parameters of ``task`` outside ``roots`` get their
    gradients averaged over the data-parallel group by :func:`sync_replicated_grads`.
    """
    mesh = strategy.device_mesh
    tp_size = mesh["tensor_parallel"].size()
    if tp_size > 1:
        apply_tensor_parallel(blocks, mesh["tensor_parallel"], plan_fn)
    if activation_checkpointing:
        blocks = apply_activation_checkpointing(blocks)
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
