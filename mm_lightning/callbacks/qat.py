"""Quantization-aware training with torchao: train with fake-quantized linear layers, quantize afterwards."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
import torch.nn as nn

QATMethod = Literal["int8-dynamic", "int8-weight-only", "int4-weight-only"]


def require_torchao() -> None:
    """Raise a clear error when torchao (the ``quant`` extra) is missing."""
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        raise ModuleNotFoundError("quantization-aware training needs torchao: pip install 'mm-lightning[quant]'")


def fake_quantize_configs(method: QATMethod, group_size: int = 32) -> tuple[Any, Any]:
    """torchao ``(activation, weight)`` fake-quantization configs that simulate ``method`` in training.

    ``int8-dynamic``: int8 per-token asymmetric activations and int8 per-channel symmetric weights;
    ``int8-weight-only``: int8 per-channel weights; ``int4-weight-only``: int4 weights in groups of
    ``group_size`` input features. The same names select the post-training conversion in
    ``python -m experiments.quantize --method``.
    """
    require_torchao()
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    if method == "int8-dynamic":
        return (
            IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
            IntxFakeQuantizeConfig(torch.int8, "per_channel"),
        )
    if method == "int8-weight-only":
        return None, IntxFakeQuantizeConfig(torch.int8, "per_channel")
    if method == "int4-weight-only":
        return None, IntxFakeQuantizeConfig(torch.int4, group_size=group_size)
    raise ValueError(f"QAT method must be int8-dynamic, int8-weight-only or int4-weight-only, got {method!r}")


class QuantizationAwareTraining(L.Callback):
    """Fake-quantize the trained module's ``nn.Linear`` layers for the whole fit (torchao QAT).

    ``setup`` (before the optimizer exists) swaps each linear layer for torchao's
    ``FakeQuantizedLinear`` (same parameters, same state-dict keys), so the weights learn to
    survive rounding; ``on_fit_end`` swaps them back to plain ``nn.Linear``. Checkpoints load
    into the float model, and ``python -m experiments.quantize --ckpt ... --method <same method>``
    produces the quantized model.

    Args:
        method: the quantization the model will get after training.
        group_size: input features per scale for ``int4-weight-only`` (must divide each layer's input width).
        exclude: substrings of module names (relative to the trained module) to keep in float, e.g. ``head``.
    """

    def __init__(self, method: QATMethod = "int8-dynamic", group_size: int = 32, exclude: list[str] | None = None) -> None:
        self.activation_config, self.weight_config = fake_quantize_configs(method, group_size)
        self.method = method
        self.group_size = group_size
        self.exclude = list(exclude or [])
        self.prepared = False

    def _root(self, pl_module: L.LightningModule) -> nn.Module:
        return pl_module.optimized_module() if hasattr(pl_module, "optimized_module") else pl_module

    def _filter(self, module: nn.Module, name: str) -> bool:
        if not isinstance(module, nn.Linear) or any(p in name for p in self.exclude):
            return False
        if self.method == "int4-weight-only" and module.in_features % self.group_size:
            return False  # a layer whose width the group size does not divide stays in float
        return True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.prepared:
            return
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig

        config = QATConfig(activation_config=self.activation_config, weight_config=self.weight_config, step="prepare")
        quantize_(self._root(pl_module), config, filter_fn=self._filter)
        self.prepared = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.prepared:
            return
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig

        quantize_(self._root(pl_module), QATConfig(step="convert"))  # back to nn.Linear, trained weights kept
        self.prepared = False
