"""Write ``summary.json``: the final metrics of a run as one flat ``{"name": value}`` file."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import lightning as L
import torch


def _number(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


class RunSummary(L.Callback):
    """Keeps the last value of every logged scalar and writes ``<run_dir>/summary.json``.

    Written at the end of ``fit`` (train/val metrics, ``epochs``, ``steps``, ``wall_time_s``)
    and again after ``test``/``validate`` with their metrics merged in, so scripts and sweeps
    read results without a logger.

    Args:
        path: where to write; by default ``summary.json`` in the trainer's ``default_root_dir``.
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.metrics: dict[str, float] = {}
        self._start = time.monotonic()

    def _write(self, trainer: L.Trainer) -> None:
        for name, value in trainer.callback_metrics.items():
            number = _number(value)
            if number is not None:
                self.metrics[name] = number
        if not trainer.is_global_zero:
            return
        path = self.path or os.path.join(trainer.default_root_dir, "summary.json")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(sorted(self.metrics.items())), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.monotonic()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.metrics.update(
            epochs=float(trainer.current_epoch),
            steps=float(trainer.global_step),
            wall_time_s=round(time.monotonic() - self._start, 2),
        )
        self._write(trainer)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._write(trainer)
