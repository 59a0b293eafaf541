"""What every task shares: AdamW with sensible weight-decay groups and a warmup + cosine schedule.

A task holds its network as ``self.model``, a plain ``nn.Module`` from :mod:`mm_lightning.models` that
runs without Lightning; its checkpoints carry the network's spec, so
:func:`mm_lightning.models.load_model` rebuilds it from a run's checkpoint alone.

Tasks subclass :class:`Task` and pass their optimizer arguments through ``**kwargs``, so
``--model.lr``, ``--model.weight_decay``, ``--model.warmup_epochs`` ... mean the same in
every config.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup from 0 to 1 over ``warmup_steps``, then cosine to ``min_lr_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def no_decay_names(module: nn.Module) -> set[str]:
    """Parameter names exempt from weight decay: norms, biases (ndim <= 1), and what timm models
    declare in ``no_weight_decay()`` (position embeddings, class tokens), at any depth."""
    names = {n for n, p in module.named_parameters() if p.ndim <= 1}
    for prefix, sub in module.named_modules():
        declared = getattr(sub, "no_weight_decay", None)
        if callable(declared):
            for name in declared():
                names.add(f"{prefix}.{name}" if prefix else name)
    return names


def param_groups(module: nn.Module, weight_decay: float, extra_no_decay: Iterable[str] = ()) -> list[dict]:
    """Two AdamW groups: decayed weights and the exempt parameters (see :func:`no_decay_names`)."""
    exempt = no_decay_names(module) | set(extra_no_decay)
    decay, keep = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (keep if name in exempt else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": keep, "weight_decay": 0.0},
    ]


class Task(L.LightningModule):
    """Base LightningModule: optimizer and schedule configuration shared by all tasks.

    Args:
        lr: peak learning rate of AdamW.
        weight_decay: decoupled weight decay on weight matrices (never norms, biases,
            position embeddings, class tokens or temperatures).
        betas: AdamW's betas.
        eps: AdamW's epsilon (open_clip trains CLIP with 1e-6; torch's default 1e-8).
        warmup_epochs: linear warmup length in epochs (fractions allowed).
        warmup_steps: warmup length in optimizer steps; overrides ``warmup_epochs`` when > 0.
        min_lr_ratio: the cosine schedule ends at ``lr * min_lr_ratio``.
        schedule: ``cosine`` (after warmup) or ``constant``.
        activation_checkpointing: recompute the activations of each transformer block in the
            backward pass instead of storing them (less memory, ~30% more compute), through the
            network's own switches (timm's ``set_grad_checkpointing``, Hugging Face's
            ``activation_checkpointing_enable``; :func:`mm_lightning.parallel.apply_activation_checkpointing`).
        compile: ``torch.compile`` each transformer block (or the whole trained module when it
            has none) in place; checkpoints keep their parameter names.
    """

    #: metric that picks the best checkpoint, and whether higher is better
    monitor: str | None = None
    monitor_mode: str = "max"
    #: the run's one tokenizer (:class:`mm_lightning.data.tokenizer.Tokenizer`), or ``None`` for image-only
    #: tasks. Tasks with text take it as their ``tokenizer`` init argument (the CLI links the config's
    #: top-level ``tokenizer:`` into it) and keep it out of their hyper-parameters; callbacks read it here.
    tokenizer: Any = None

    def __init__(
        self,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup_epochs: float = 0.0,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        schedule: str = "cosine",
        activation_checkpointing: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"model.schedule must be 'cosine' or 'constant', got {schedule!r}")
        self.lr = lr
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        if not eps > 0:
            raise ValueError(f"model.eps must be > 0, got {eps}")
        self.eps = float(eps)
        self.warmup_epochs = warmup_epochs
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.schedule = schedule
        self.activation_checkpointing = activation_checkpointing
        self.torch_compile = compile
        self._model_configured = False

    # --------------------------------------------------------------- the network (mm_lightning.models)
    def model_spec(self) -> dict[str, Any] | None:
        """How to rebuild ``self.model`` without Lightning (:func:`mm_lightning.models.load_model`): every
        checkpoint carries it as ``checkpoint["model_spec"]``. ``None`` for a task without ``self.model``."""
        from mm_lightning.models.loading import model_spec

        model = getattr(self, "model", None)
        return model_spec(model) if isinstance(model, nn.Module) else None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        spec = self.model_spec()
        if spec is not None:
            from mm_lightning.models.loading import SPEC_KEY

            checkpoint[SPEC_KEY] = spec

    def no_weight_decay_extra(self) -> set[str]:
        """Names (relative to the task) of further parameters to exempt from weight decay."""
        return set()

    def optimized_module(self) -> nn.Module:
        """The module whose parameters the main optimizer trains (the whole task by default)."""
        return self

    # --------------------------------------------------- efficient training (mm_lightning.parallel)
    def transformer_blocks(self) -> list[nn.Module]:
        """The repeated blocks that FSDP shards, tensor parallelism splits and compile compiles one by one.

        By default found in :meth:`optimized_module` by
        :func:`mm_lightning.parallel.find_transformer_blocks` (timm ViT blocks, ``nn.TransformerEncoderLayer``,
        Hugging Face ``_no_split_modules``, else the most repeated module of a ``ModuleList``/``Sequential``).
        Override to choose others.
        """
        from mm_lightning.parallel import find_transformer_blocks

        return find_transformer_blocks(self.optimized_module())

    def tensor_parallel_plan(self, block: nn.Module, tp_size: int) -> dict[str, Any] | None:
        """The tensor-parallel plan of one block (see :func:`mm_lightning.parallel.tensor_parallel_plan`)."""
        from mm_lightning.parallel import tensor_parallel_plan

        return tensor_parallel_plan(block, tp_size)

    def parallel_roots(self) -> list[nn.Module]:
        """Modules that FSDP2 shards as roots (after the blocks): :meth:`optimized_module`, or else every
        child with trainable parameters (torchmetrics metrics excluded)."""
        from torchmetrics import Metric

        trained = self.optimized_module()
        if trained is not self:
            return [trained]
        return [
            child
            for child in self.children()
            if not isinstance(child, Metric) and any(p.requires_grad for p in child.parameters())
        ]

    def configure_model(self) -> None:
        """Apply the efficient-training switches once, before the optimizer is built.

        Under Lightning's ``ModelParallelStrategy`` (and :class:`mm_lightning.parallel.ModelParallel`):
        tensor parallelism of the blocks when the mesh's ``tensor_parallel`` axis is > 1, activation
        checkpointing, compile, then FSDP2 over the ``data_parallel`` axis. Under any other strategy:
        activation checkpointing and compile. Subclasses that override this call ``super().configure_model()``.
        """
        from mm_lightning import distributed

        strategy = self._model_parallel_strategy()
        # losses and evaluation callbacks gather over the data-parallel ranks only (see mm_lightning.distributed)
        mesh = getattr(strategy, "_device_mesh", None)
        distributed.set_data_parallel_group(mesh["data_parallel"].get_group() if mesh is not None else None)
        if self._model_configured:  # Lightning calls this hook again for each trainer.fit/test/...
            return
        self._model_configured = True
        if not (self.activation_checkpointing or self.torch_compile or strategy is not None):
            return
        from mm_lightning import parallel

        blocks = self.transformer_blocks()
        if strategy is not None:
            parallel.parallelize_task(
                self,
                strategy,
                blocks,
                self.parallel_roots(),
                activation_checkpointing=self.activation_checkpointing,
                compile_blocks=self.torch_compile and bool(blocks),
                plan_fn=self.tensor_parallel_plan,
            )
            if self.torch_compile and not blocks:
                self.optimized_module().compile()
            return
        if self.activation_checkpointing and not parallel.apply_activation_checkpointing(self.optimized_module()):
            raise ValueError(
                f"model.activation_checkpointing: {type(self).__name__}'s network has no part with a checkpointing "
                "switch (timm's set_grad_checkpointing, Hugging Face's activation_checkpointing_enable)"
            )
        if self.torch_compile:
            parallel.compile_modules(blocks or [self.optimized_module()])

    def data_parallel_size(self) -> int:
        """Ranks that read different data: the trainer's world size divided by the model-parallel degree."""
        trainer = self._trainer
        if trainer is None:
            return 1
        try:
            return int((trainer.strategy.distributed_sampler_kwargs or {}).get("num_replicas", trainer.world_size))
        except (AttributeError, RuntimeError, AssertionError):
            return trainer.world_size

    def _model_parallel_strategy(self) -> Any:
        from lightning.pytorch.strategies import ModelParallelStrategy

        trainer = self._trainer
        strategy = trainer.strategy if trainer is not None else None
        return strategy if isinstance(strategy, ModelParallelStrategy) else None

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: dict[str, Any], split: str) -> Any:
        """One evaluation batch of split ``"val"`` or ``"test"`` (logs ``{split}/...``); tasks implement it."""
        raise NotImplementedError(f"{type(self).__name__} does not evaluate: implement _eval_step(batch, split)")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """``{"features": embed(images)}``; tasks with other outputs override it."""
        return {"features": self.embed(batch["image"])}

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        """AdamW's parameter groups (:func:`param_groups` of :meth:`optimized_module`); a task with several
        parts at their own learning rates overrides it (groups may carry ``lr`` and ``name``)."""
        return param_groups(self.optimized_module(), self.weight_decay, self.no_weight_decay_extra())

    def configure_optimizers(self):
        groups = self.optimizer_param_groups()
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, eps=self.eps)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = self.warmup_steps
        if warmup <= 0 and self.warmup_epochs > 0:
            warmup = int(self.warmup_epochs * total / max(1, self.trainer.max_epochs or 1))
        if self.schedule == "constant":
            lam = lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0  # noqa: E731
        else:
            lam = lambda step: warmup_cosine(step, warmup, total, self.min_lr_ratio)  # noqa: E731
        scheduler = LambdaLR(optimizer, lam)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
