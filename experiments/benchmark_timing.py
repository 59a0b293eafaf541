"""The timing kit the benchmarks share (``experiments.benchmark``, ``experiments.benchmark_vlm``,
``experiments.benchmark_dpo``): device choice and sync, the bare-loop / Trainer interleaving, the step clock,
per-step times, and ``experiments.run``'s default callbacks and logger.
"""

from __future__ import annotations

import importlib.util
import os
import time
from typing import Any

import lightning as L
import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pick_device() -> torch.device:
    """CUDA when there is a GPU, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class Interleaved(torch.utils.data.IterableDataset):
    """Yields the Trainer's batches and runs one bare-loop step (timed) before each: the two alternate step by step.

    ``bare`` has ``device``, ``batches`` and ``step(i)`` (``experiments.benchmark.BareLoop`` and the MLLM one).
    """

    def __init__(self, bare: Any, total: int) -> None:
        self.bare, self.total = bare, total
        self.intervals: list[tuple[float, float]] = []

    def __iter__(self):
        for i in range(self.total):
            sync(self.bare.device)
            start = time.perf_counter()
            self.bare.step(i)
            sync(self.bare.device)
            self.intervals.append((start, time.perf_counter()))
            yield self.bare.batches[i % len(self.bare.batches)]

    def __len__(self) -> int:
        return self.total


class StepClock(L.Callback):
    """The time at the end of every training batch (after a device sync)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        sync(self.device)
        self.ends.append(time.perf_counter())


def step_times(clock: StepClock, dataset: Interleaved, warmup: int, total: int) -> tuple[list[float], list[float]]:
    """Per step after ``warmup``: the Trainer's time (between two step ends, less the bare steps run inside that
    window while the loader fetched) and the bare loop's time for the same batch."""
    ends, intervals = clock.ends, dataset.intervals
    trainer_steps, bare_steps = [], []
    for i in range(warmup, total):
        window = (ends[i - 1], ends[i])
        inside = sum(b - a for a, b in intervals if a >= window[0] and b <= window[1])
        trainer_steps.append(window[1] - window[0] - inside)
        bare_steps.append(intervals[i][1] - intervals[i][0])
    return trainer_steps, bare_steps


def default_callbacks(root: str, logger: str) -> tuple[list[L.Callback], Any]:
    """``experiments.run``'s default callbacks and logger (with the throughput monitor)."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from mm_lightning.callbacks.data_monitor import DataMonitor
    from mm_lightning.callbacks.run_summary import RunSummary
    from mm_lightning.callbacks.throughput import ThroughputMonitor

    callbacks = [
        ModelCheckpoint(dirpath=os.path.join(root, "checkpoints"), filename="best", save_last=True, monitor=None),
        DataMonitor(),
        RunSummary(),
        LearningRateMonitor(logging_interval="step"),
        ThroughputMonitor(),
    ]
    if logger == "wandb" and importlib.util.find_spec("wandb") is not None:
        from lightning.pytorch.loggers import WandbLogger

        return callbacks, WandbLogger(save_dir=root, project="mm-lightning-benchmark", offline=True)
    from lightning.pytorch.loggers import CSVLogger

    return callbacks, CSVLogger(save_dir=root, name="", version="")
