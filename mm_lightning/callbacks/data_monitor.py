"""Log how many bad samples the data module skipped (``data/skipped``)."""

from __future__ import annotations

import lightning as L


class DataMonitor(L.Callback):
    """Logs the running count of skipped samples of each split at the end of its epoch.

    The count comes from :class:`~mm_lightning.data.datamodule.WebDataModule`, which sums
    what its workers report with each batch; ``data/skipped`` is the training count,
    ``val/data_skipped`` and ``test/data_skipped`` the evaluation ones.
    """

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str, name: str) -> None:
        counts = getattr(trainer.datamodule, "num_skipped", None)
        if counts is None:
            return
        pl_module.log(name, float(counts[split]), on_step=False, on_epoch=True, sync_dist=True, reduce_fx="sum")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "train", "data/skipped")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module, "val", "val/data_skipped")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "test", "test/data_skipped")
