"""Write ``summary.json``: the final metrics of a run as one flat ``{"name": value}`` file."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from typing import Any

import lightning as L
import torch

from mm_lightning.callbacks.guards import SignalGuard, is_interruption


def summary_value(value: Any) -> float | str | None:
    """A scalar as JSON: a float, or ``"nan"`` / ``"inf"`` / ``"-inf"`` for non-finite values (valid JSON,
    unlike ``NaN``); ``None`` for what is not a scalar number."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    value = float(value)
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


class RunSummary(L.Callback):
    """Keeps the last value of every logged scalar and writes ``<run_dir>/summary.json``.

    Written at the end of ``fit`` (train/val metrics, ``epochs``, ``steps``, ``wall_time_s``)
    and again after ``test``/``validate`` with their metrics merged in, so scripts and sweeps
    read results without a logger. ``status`` says how the run ended: ``finished``,
    ``interrupted`` (a signal; ``error`` names it) or ``failed`` (``error`` holds the message).
    A non-finite metric is written as the string ``"nan"``, ``"inf"`` or ``"-inf"``, never dropped.

    Args:
        path: where to write; by default ``summary.json`` in the trainer's ``default_root_dir``.
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.metrics: dict[str, float | str] = {}
        self._start = time.monotonic()
        self._first_step: int | None = None

    def _path(self, trainer: L.Trainer) -> str:
        return self.path or os.path.join(trainer.default_root_dir, "summary.json")

    def _write(self, trainer: L.Trainer, status: str = "finished") -> None:
        for name, value in trainer.callback_metrics.items():
            converted = summary_value(value)
            if converted is not None:
                self.metrics[name] = converted
        self.metrics["status"] = status
        if not trainer.is_global_zero:
            return
        path = self._path(trainer)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(sorted(self.metrics.items())), f, indent=2, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)

    def _progress(self, trainer: L.Trainer) -> None:
        self.metrics.update(
            epochs=float(trainer.current_epoch),
            steps=float(trainer.global_step),
            wall_time_s=round(time.monotonic() - self._start, 2),
        )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.monotonic()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._first_step = trainer.global_step  # after a resume: the step the checkpoint was at

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._progress(trainer)
        self._write(trainer)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._write(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Record how the run ended, unless that would replace an earlier summary with one of a run that
        trained nothing here (e.g. a resume refused at restore time)."""
        trained = self._first_step is not None and trainer.global_step > self._first_step
        if os.path.exists(self._path(trainer)) and not trained:
            return
        if trainer.state.fn == "fit":
            self._progress(trainer)
        message = str(exception).strip().splitlines()
        signum = next((c.signum for c in trainer.callbacks if isinstance(c, SignalGuard) and c.signum), None)
        if is_interruption(exception) and signum is not None:
            message = [f"interrupted by {signal.Signals(signum).name}"]
        self.metrics["error"] = (message[0] if message else type(exception).__name__)[:500]
        self._write(trainer, "interrupted" if is_interruption(exception) else "failed")
