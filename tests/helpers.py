"""Test-only callbacks, importable by class path from the CLI (``tests.helpers.X``)."""

from __future__ import annotations

import time

import lightning as L


class SlowSteps(L.Callback):
    """Sleeps after every training batch so a test can interrupt a run mid-epoch."""

    def __init__(self, seconds: float = 0.1) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)
