"""Magnitude pruning during training with Lightning's ``ModelPruning``, on a schedule that hits a target sparsity."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import ModelCheckpoint, ModelPruning


def sparsity_schedule(
    target: float, start_epoch: int, end_epoch: int, kind: Literal["cubic", "linear", "once"] = "cubic"
) -> dict[int, float]:
    """Per-epoch pruning amounts that take the sparsity from 0 to ``target`` at ``end_epoch``.

    Cumulative sparsity after the k-th of n pruning epochs: cubic (Zhu & Gupta, 2017)
    ``s_k = S (1 - (1 - k/n)^3)``, linear ``s_k = S k / n``, once ``s_n = S``. PyTorch's pruning
    removes a fraction of the *remaining* weights each call, so epoch k prunes
    ``a_k = (s_k - s_{k-1}) / (1 - s_{k-1})``. Returns ``{epoch: a_k}``.
    """
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target_sparsity must be in [0, 1), got {target}")
    if end_epoch < start_epoch:
        raise ValueError(f"pruning end_epoch={end_epoch} is before start_epoch={start_epoch}")
    if kind == "once":
        return {end_epoch: target}
    n = end_epoch - start_epoch + 1
    amounts: dict[int, float] = {}
    prev = 0.0
    for k in range(1, n + 1):
        cur = target * (1 - (1 - k / n) ** 3) if kind == "cubic" else target * k / n
        amounts[start_epoch + k - 1] = (cur - prev) / (1 - prev)
        prev = cur
    return amounts


class MagnitudePruning(ModelPruning):
    """Prune the smallest-magnitude weights of the linear (and optionally conv) layers while training.

    Lightning's ``ModelPruning`` with a fixed ``amount`` prunes that fraction of the *remaining*
    weights every epoch (two epochs of 0.5 leave 25%); here ``amount`` follows
    :func:`sparsity_schedule`, so the sparsity reaches ``target_sparsity`` at ``end_epoch`` and stays
    there while the last epochs fine-tune the survivors. Pruning runs at the *start* of a training
    epoch, so that epoch's training adapts to the new mask and its validation (and checkpoint)
    measure the pruned model; masks are made permanent in every saved checkpoint and at the end
    of training. ``train/sparsity`` (the zero fraction of the pruned weights) is logged each epoch.

    Checkpoints saved before the target is reached are denser than the final model; with
    ``reset_best_checkpoint`` the best-checkpoint tracking restarts at each pruning step, so
    ``best.ckpt`` is a model at the target sparsity.

    Args:
        target_sparsity: fraction of the pruned weights that are zero at the end.
        start_epoch: first epoch that starts with a pruning step (epoch 0 would prune the random init).
        end_epoch: epoch that starts at the target sparsity; default ``max_epochs - 2`` (two epochs at the target).
        schedule: ``cubic`` (prune fast early, gently late), ``linear`` or ``once``.
        pruning_fn: a ``torch.nn.utils.prune`` method name, e.g. ``l1_unstructured`` or ``random_unstructured``.
        use_global_unstructured: rank weights across all layers together (else each layer alone).
        include_conv: prune convolution weights too (ResNets, patch embeddings).
        exclude: substrings of module names (relative to the trained module) to leave dense, e.g. ``head``.
        reset_best_checkpoint: restart best-checkpoint tracking after each pruning step.
        verbose: 0 silent, 1 overall sparsity per pruning step, 2 per layer.
    """

    def __init__(
        self,
        target_sparsity: float = 0.5,
        start_epoch: int = 1,
        end_epoch: int | None = None,
        schedule: Literal["cubic", "linear", "once"] = "cubic",
        pruning_fn: str = "l1_unstructured",
        use_global_unstructured: bool = True,
        include_conv: bool = False,
        exclude: list[str] | None = None,
        reset_best_checkpoint: bool = True,
        verbose: int = 0,
    ) -> None:
        sparsity_schedule(target_sparsity, start_epoch, end_epoch if end_epoch is not None else start_epoch, schedule)
        super().__init__(
            pruning_fn=pruning_fn,
            parameters_to_prune=(),
            amount=self._amount,
            use_global_unstructured=use_global_unstructured,
            make_pruning_permanent=True,
            use_lottery_ticket_hypothesis=False,  # Lightning's default resets the survivors to their init
            verbose=verbose,
            prune_on_train_epoch_end=True,
        )
        self.target_sparsity = target_sparsity
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.schedule_kind = schedule
        self.include_conv = include_conv
        self.exclude = list(exclude or [])
        self.reset_best_checkpoint = reset_best_checkpoint
        self.amounts: dict[int, float] = {}
        self._trainer: L.Trainer | None = None

    def _amount(self, epoch: int) -> float:
        return self.amounts.get(epoch, 0.0)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        end = self.end_epoch
        if end is None:
            max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
            if max_epochs is None:
                raise ValueError("MagnitudePruning needs trainer.max_epochs or an explicit end_epoch")
            end = max(self.start_epoch, max_epochs - 2)
        self.amounts = sparsity_schedule(self.target_sparsity, self.start_epoch, end, self.schedule_kind)
        if not self._parameters_to_prune:
            self._parameters_to_prune = self.select_parameters(pl_module)
            if not self._parameters_to_prune:
                raise ValueError(f"MagnitudePruning found no linear layers to prune in {type(pl_module).__name__}")
        super().setup(trainer, pl_module, stage)

    def select_parameters(self, pl_module: L.LightningModule) -> list[tuple[nn.Module, str]]:
        """``(module, "weight")`` of the trained module's ``nn.Linear`` (and conv) layers, minus ``exclude``."""
        root = pl_module.optimized_module() if hasattr(pl_module, "optimized_module") else pl_module
        kinds: tuple[type, ...] = (nn.Linear,) + ((nn.Conv1d, nn.Conv2d, nn.Conv3d) if self.include_conv else ())
        chosen = []
        for name, module in root.named_modules():
            if isinstance(module, kinds) and not any(pattern in name for pattern in self.exclude):
                chosen.append((module, "weight"))
        return chosen

    def sparsity(self) -> float:
        """Fraction of zeros in the pruned weights (the masked values while a mask is attached)."""
        zeros = total = 0
        for module, name in self._parameters_to_prune:
            mask = getattr(module, f"{name}_mask", None)
            weight = mask if mask is not None else getattr(module, name)
            zeros += int((weight == 0).sum())
            total += weight.numel()
        return zeros / max(1, total)

    def apply_pruning(self, amount: int | float) -> None:
        super().apply_pruning(amount)
        trainer = self._trainer
        if self.reset_best_checkpoint and trainer is not None:
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint) and callback.monitor is not None:
                    callback.best_k_models = {}
                    callback.kth_best_model_path = ""
                    callback.kth_value = torch.tensor(float("inf") if callback.mode == "min" else -float("inf"))
                    callback.best_model_score = None
                    callback.best_model_path = ""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run_pruning(pl_module.current_epoch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # (ModelPruning would prune here; this callback prunes at the epoch's start instead)
        pl_module.log("train/sparsity", self.sparsity(), on_step=False, on_epoch=True, batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        return {"target_sparsity": self.target_sparsity, "amounts": dict(self.amounts)}
