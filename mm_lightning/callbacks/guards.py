"""Guards that stop a run loudly instead of letting it go wrong quietly.

* :class:`NonFiniteLossGuard`: a NaN/inf training loss stops the run naming epoch, step and batch
  (default), or with ``action="skip"`` the batch's update is skipped and counted.
* :class:`GuardedModelCheckpoint`: Lightning's ``ModelCheckpoint`` that never saves a model with
  non-finite weights, never takes a non-finite monitored value as the best, and saves
  ``last.ckpt`` when a signal stops the run between steps.
* :class:`SignalGuard`: SIGTERM and SIGINT stop a run at the next step boundary (Lightning's own
  cooperative stop), and the runner exits ``128 + signal`` (143, 130) instead of 0.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
import warnings
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException


class NonFiniteLossError(RuntimeError):
    """The training loss was NaN or infinite (the run stops without saving)."""


class RunInterrupted(BaseException):
    """A signal arrived outside the training loop (setup, evaluation): the run stops at once."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def is_interruption(exception: BaseException) -> bool:
    """Whether ``exception`` is how a signal stops a run (Lightning's SIGTERM stop, ours, or Ctrl+C)."""
    return isinstance(exception, (SIGTERMException, RunInterrupted, KeyboardInterrupt))


def _all_finite(tensors: Any) -> bool:
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t  # DTensor shards (FSDP2, tensor parallel)
        if local.is_floating_point() and not bool(torch.isfinite(local).all()):
            return False
    return True


def model_is_finite(trainer: L.Trainer, module: L.LightningModule) -> bool:
    """Every floating-point parameter and buffer of ``module`` is finite, on every rank."""
    finite = _all_finite(module.parameters()) and _all_finite(module.buffers())
    return bool(trainer.strategy.reduce_boolean_decision(finite, all=True))


class NonFiniteLossGuard(L.Callback):
    """Stops the run at a NaN/inf training loss, or skips that optimizer step and counts it.

    The check runs before the optimizer step (the loss of every micro-batch since the last step),
    so the weights never take a step with non-finite gradients. With several ranks the decision is
    shared (one tiny all-reduce a step), so every rank stops or skips together.

    Args:
        action: ``"stop"`` raises :class:`NonFiniteLossError` naming epoch, step and batch;
            ``"skip"`` drops the step's gradients (the optimizer leaves every weight as it was) and
            counts it in ``train/nonfinite_skipped``.
        max_consecutive_skips: with ``"skip"``, stop anyway after this many non-finite steps in a row
            (the weights themselves are then broken; skipping would train nothing).
    """

    def __init__(self, action: Literal["stop", "skip"] = "stop", max_consecutive_skips: int = 10) -> None:
        if action not in ("stop", "skip"):
            raise ValueError(f"action must be 'stop' or 'skip', got {action!r}")
        self.action = action
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped = 0
        self._consecutive = 0
        self._batch_idx = 0
        self._bad_value: torch.Tensor | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        loss = loss.detach()
        if self._bad_value is None or bool(torch.isfinite(self._bad_value).all()):
            self._bad_value = loss  # the first non-finite loss since the last step is the one reported

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        value, self._bad_value = self._bad_value, None
        bad = value is not None and not bool(torch.isfinite(value).all())
        if trainer.world_size > 1:
            bad = bool(trainer.strategy.reduce_boolean_decision(bad, all=False))
        if not bad:
            self._consecutive = 0
            return
        shown = float(value.float().mean()) if value is not None else float("nan")
        where = (f"epoch {trainer.current_epoch}, step {trainer.global_step}, batch {self._batch_idx} of the epoch")
        self._consecutive += 1
        if self.action == "stop" or self._consecutive > self.max_consecutive_skips:
            why = ("" if self.action == "stop" else
                   f" ({self._consecutive} non-finite steps in a row: the weights no longer give a finite loss)")
            raise NonFiniteLossError(
                f"non-finite training loss ({shown}) at {where}{why}: the run stops without saving this state "
                "(lower model.lr, or skip such batches with --on_nonfinite_loss skip)"
            )
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None  # torch optimizers leave a parameter without a gradient untouched
        self.skipped += 1
        warnings.warn(f"skipped the update of a non-finite training loss ({shown}) at {where}")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.action == "skip":
            pl_module.log("train/nonfinite_skipped", float(self.skipped), on_step=False, on_epoch=True, batch_size=1,
                          reduce_fx="max")

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


class GuardedModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is the latest state at every save point (Lightning 2.6 updates
    it only beside a new best) and that keeps the last good checkpoint: a model with non-finite weights is never
    saved (neither as best nor as last), a non-finite monitored value (or any non-finite ``val/`` metric)
    never counts as the best, and a
    signal that stops a one-process run between steps saves ``last.ckpt`` first."""

    def check_monitor_top_k(self, trainer: L.Trainer, current: torch.Tensor | None = None) -> bool:
        bad = {name: float(value) for name, value in trainer.callback_metrics.items()
               if (name == self.monitor or name.startswith("val/")) and isinstance(value, torch.Tensor)
               and value.numel() == 1 and not math.isfinite(float(value))}
        if current is not None and not math.isfinite(float(current)):
            bad[str(self.monitor)] = float(current)
        if bad:  # the same on every rank: validation metrics are synchronised
            shown = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
            warnings.warn(f"step {trainer.global_step}: {shown}: this checkpoint is not taken as the best")
            return False
        return super().check_monitor_top_k(trainer, current)

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        super()._save_topk_checkpoint(trainer, monitor_candidates)
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            # Lightning 2.6 writes last.ckpt only beside a new best: without this, last.ckpt stays at the
            # last improvement and a resume from it repeats every epoch since
            self._save_last_checkpoint(trainer, monitor_candidates)

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        if getattr(self, "_last_saved_step", None) == trainer.global_step and self.last_model_path:
            return  # written a moment ago, at this very step
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self._last_global_step_saved == trainer.global_step:
            self._last_saved_step = trainer.global_step

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if not model_is_finite(trainer, trainer.lightning_module):
            warnings.warn(f"the model holds NaN/inf weights at step {trainer.global_step}: {filepath} is not "
                          "overwritten (the previous checkpoint is kept)")
            return
        super()._save_checkpoint(trainer, filepath)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.interrupt_save = None
        if not (is_interruption(exception) and self.save_last and _can_save_on_signal(trainer)):
            return
        if self._last_global_step_saved == trainer.global_step and self.last_model_path:
            self.interrupt_save = self.last_model_path  # already saved at this very step
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if self._last_global_step_saved == trainer.global_step:
            self.interrupt_save = self.last_model_path


def _can_save_on_signal(trainer: L.Trainer) -> bool:
    """Between two training steps of a one-process fit, outside validation, and not after Lightning's
    SLURM requeue handler saved its own ``hpc_ckpt`` (that requeue path stays as Lightning made it)."""
    from lightning.pytorch.trainer.states import TrainerFn

    if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or trainer.validating:
        return False
    if trainer.world_size > 1:  # ranks may have seen the signal at different steps: a collective save could hang
        return False
    root = trainer.default_root_dir
    started = SignalGuard.process_start
    with contextlib.suppress(OSError):
        for name in os.listdir(root):
            if name.startswith("hpc_ckpt_") and os.path.getmtime(os.path.join(root, name)) >= started:
                return False
    return True


class SignalGuard(L.Callback):
    """Turns SIGTERM and SIGINT into a stop at the next training step boundary.

    :meth:`install` (the runner does it once) replaces the two handlers; while a trainer is in its
    training loop a signal sets Lightning's own stop flag (``received_sigterm``), which ends the run
    between steps (and across ranks: rank 0's flag is broadcast every step); elsewhere the run stops
    at once with :class:`RunInterrupted`. A second signal stops at once too. :attr:`signum` tells
    the runner which signal came, to exit with ``128 + signum``.
    """

    process_start = time.time()

    def __init__(self) -> None:
        self.signum: int | None = None
        self._trainer: L.Trainer | None = None
        self._training = False
        self._started = False
        self._pid = os.getpid()
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: behave as if no handler were set
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        first = self.signum is None
        self.signum = self.signum or signum
        trainer = self._trainer
        if first and self._training and trainer is not None:
            trainer._signal_connector.received_sigterm = True  # Lightning stops between steps
            return
        raise RunInterrupted(signum)

    @property
    def training_started(self) -> bool:
        """Whether a training step has begun in this process (errors before it are setup errors)."""
        return self._started

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainer, self._training, self._started = trainer, True, True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._training = False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._training = False
