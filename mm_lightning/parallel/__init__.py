"""What Lightning leaves to the model for parallel and memory-efficient training, one concern a module.

Lightning's strategies (DDP, FSDP, DeepSpeed: ``lightning.pytorch.strategies.DeepSpeedStrategy``
directly, ModelParallel) run the processes, the collectives and the checkpoints; what depends on the
model's structure is here, applied by :meth:`mm_lightning.tasks.base.Task.configure_model`:

- :mod:`~mm_lightning.parallel.blocks`: :func:`find_transformer_blocks`, the repeated units of a model.
- :mod:`~mm_lightning.parallel.checkpointing`: :func:`apply_activation_checkpointing` through the models'
  own switches (timm's ``set_grad_checkpointing``, Hugging Face's ``activation_checkpointing_enable``),
  :func:`compile_modules` (per-block ``torch.compile``).
- :mod:`~mm_lightning.parallel.tensor_parallel`: :func:`tensor_parallel_plan` and
  :func:`apply_tensor_parallel` (column-wise input, row-wise output projections).
- :mod:`~mm_lightning.parallel.fsdp`: :func:`apply_fsdp` (FSDP2 per block, then the roots) and
  :func:`sync_replicated_grads`.
- :mod:`~mm_lightning.parallel.strategy`: :class:`ModelParallel` (Lightning's ``ModelParallelStrategy``
  with FSDP2's sharding, mixed precision and offload settings) and :func:`parallelize_task`.
"""

from mm_lightning.parallel.blocks import find_transformer_blocks, register_block_type
from mm_lightning.parallel.checkpointing import apply_activation_checkpointing, compile_modules
from mm_lightning.parallel.fsdp import Sharding, apply_fsdp, sync_replicated_grads
from mm_lightning.parallel.strategy import ModelParallel, parallelize_task
from mm_lightning.parallel.tensor_parallel import COLWISE, HEAD_ATTRS, ROWWISE, apply_tensor_parallel, tensor_parallel_plan

__all__ = [
    "COLWISE",
    "HEAD_ATTRS",
    "ROWWISE",
    "ModelParallel",
    "Sharding",
    "apply_activation_checkpointing",
    "apply_fsdp",
    "apply_tensor_parallel",
    "compile_modules",
    "find_transformer_blocks",
    "parallelize_task",
    "register_block_type",
    "sync_replicated_grads",
    "tensor_parallel_plan",
]
