"""Training throughput: samples/s, tokens/s, step time, peak memory and model FLOPs utilisation.

Nothing here synchronises the host with the device per step: batch sizes come from tensor
shapes (host metadata), token counts are summed on the device and read once per logging
window, and the clock is read at window boundaries (after one ``torch.cuda.synchronize()``
per window on GPUs, so the window's time covers the queued work).
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import lightning as L
import torch
from torch.utils.flop_counter import FlopCounterMode


def batch_size_of(batch: Any) -> int:
    """Samples in a batch dict: the leading size of ``image``, ``input_ids``, ``view1``... (first tensor found)."""
    if isinstance(batch, dict):
        for key in ("image", "input_ids", "view1", "chosen_input_ids", "label"):
            value = batch.get(key)
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                return int(value.shape[0])
        values = batch.values()
    elif isinstance(batch, (list, tuple)):
        values = batch
    else:
        values = [batch]
    for value in values:
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
        if isinstance(value, (dict, list, tuple)):
            n = batch_size_of(value)
            if n:
                return n
    return 0


def tokens_of(batch: Any) -> torch.Tensor | None:
    """Real (unpadded) tokens of a batch as a device scalar: ``attention_mask`` (and ``chosen_``/``rejected_``) sums."""
    if not isinstance(batch, dict):
        return None
    total = None
    for key in ("attention_mask", "chosen_attention_mask", "rejected_attention_mask"):
        mask = batch.get(key)
        if isinstance(mask, torch.Tensor):
            count = mask.sum()
            total = count if total is None else total + count
    return total


def reset_peak_memory(device: torch.device) -> None:
    """Restart the peak-memory counter: CUDA's allocator peak, or on Linux the process's peak resident size
    (``/proc/self/clear_refs``), so the peak measures training rather than imports and set-up."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process since :func:`reset_peak_memory`: the CUDA allocator's peak on GPUs, the peak
    resident set size (``VmHWM``; ``ru_maxrss`` where /proc is missing) on CPUs."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class ThroughputMonitor(L.Callback):
    """Logs training speed per logging window (``trainer.log_every_n_steps`` optimizer steps).

    Metrics (global over data-parallel ranks):

    - ``perf/samples_per_s`` and, for batches with an ``attention_mask``, ``perf/tokens_per_s``;
    - ``perf/step_time``: seconds per optimizer step;
    - ``perf/max_memory_gb``: peak device memory (GPU) or resident memory (CPU) of rank 0 since training started;
    - ``perf/mfu``: model FLOPs utilisation, on GPUs whose peak FLOPs Lightning knows
      (``lightning.fabric.utilities.throughput.get_available_flops``) for the trainer's precision.

    The FLOPs of one training batch are counted once, on the first batch after ``warmup_steps``,
    with torch's ``FlopCounterMode`` around the real forward and backward (what Lightning's
    ``measure_flops`` does), or taken from ``pl_module.flops_per_batch`` when the task sets it.
    At the end of each epoch ``perf/epoch_samples_per_s`` averages the whole epoch after warm-up.

    Args:
        warmup_steps: optimizer steps left out of the timing at the start (compilation, allocator warm-up).
        window: optimizer steps per measurement; default ``trainer.log_every_n_steps``.
        measure_flops: count FLOPs for ``perf/mfu`` (only where a peak is known, i.e. on GPUs).
    """

    def __init__(self, warmup_steps: int = 2, window: int | None = None, measure_flops: bool = True) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.warmup_steps = warmup_steps
        self.window = window
        self.measure_flops = measure_flops
        self.flops_per_batch: float | None = None
        self.peak_flops: float | None = None
        self._counter: FlopCounterMode | None = None
        self._reset_window()
        self._epoch_start: float | None = None
        self._epoch_samples = 0

    # ------------------------------------------------------------------ helpers
    def _reset_window(self) -> None:
        self._t0: float | None = None
        self._steps = 0
        self._batches = 0
        self._samples = 0
        self._tokens: torch.Tensor | None = None

    @staticmethod
    def _dp_size(trainer: L.Trainer) -> int:
        try:
            return int(trainer.strategy.distributed_sampler_kwargs.get("num_replicas", trainer.world_size))
        except Exception:
            return trainer.world_size

    @staticmethod
    def _sync(trainer: L.Trainer) -> None:
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        device = trainer.strategy.root_device
        if device.type == "cuda":
            from lightning.fabric.utilities.throughput import get_available_flops
            from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype

            dtype = _plugin_to_compute_dtype(trainer.precision_plugin)
            fsdp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(getattr(trainer.strategy, "mixed_precision", ""))
            self.peak_flops = get_available_flops(device, fsdp_dtype or dtype)  # FSDP2 mixed precision computes in it
        given = getattr(pl_module, "flops_per_batch", None)
        if given:
            self.flops_per_batch = float(given)

    # -------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        reset_peak_memory(trainer.strategy.root_device)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = None
        self._epoch_samples = 0
        self._last_step = trainer.global_step
        self._reset_window()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if (
            self.measure_flops
            and self.peak_flops
            and self.flops_per_batch is None
            and self._counter is None
            and trainer.global_step >= self.warmup_steps
        ):
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            flops = self._counter.get_total_flops()
            self._counter = None
            tp = 1
            mesh = getattr(trainer.strategy, "_device_mesh", None)
            if mesh is not None and "tensor_parallel" in (mesh.mesh_dim_names or ()):
                tp = mesh["tensor_parallel"].size()  # DTensor ops count the whole TP group's work
            self.flops_per_batch = flops / tp
        stepped = trainer.global_step != self._last_step  # an optimizer step ended with this batch
        self._last_step = trainer.global_step
        if self._t0 is None:
            # the clock starts at an optimizer-step boundary once the warm-up steps are done
            if stepped and trainer.global_step >= max(1, self.warmup_steps):
                self._sync(trainer)
                self._t0 = time.perf_counter()
                if self._epoch_start is None:
                    self._epoch_start = self._t0
            return
        n = batch_size_of(batch)
        self._batches += 1
        self._samples += n
        self._epoch_samples += n
        tokens = tokens_of(batch)
        if tokens is not None:
            tokens = tokens.detach()
            self._tokens = tokens if self._tokens is None else self._tokens + tokens
        if stepped:
            self._steps += 1
            window = self.window or max(1, trainer.log_every_n_steps)
            if trainer.global_step % window == 0:
                self._log(trainer, pl_module)

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync(trainer)
        now = time.perf_counter()
        elapsed = max(now - (self._t0 or now), 1e-9)
        dp = self._dp_size(trainer)
        metrics = {
            "perf/samples_per_s": self._samples * dp / elapsed,
            "perf/step_time": elapsed / self._steps,
            "perf/max_memory_gb": peak_memory_gb(trainer.strategy.root_device),
        }
        if self._tokens is not None:
            metrics["perf/tokens_per_s"] = float(self._tokens.item()) * dp / elapsed
        if self.flops_per_batch and self.peak_flops:
            metrics["perf/mfu"] = self.flops_per_batch * (self._batches / elapsed) / self.peak_flops
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, rank_zero_only=True, batch_size=1)
        self._reset_window()
        self._t0 = now  # the next window starts where this one ended

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._epoch_start is None or not self._epoch_samples:
            return
        self._sync(trainer)
        elapsed = max(time.perf_counter() - self._epoch_start, 1e-9)
        value = self._epoch_samples * self._dp_size(trainer) / elapsed
        pl_module.log("perf/epoch_samples_per_s", value, on_step=False, on_epoch=True, rank_zero_only=True, batch_size=1)
