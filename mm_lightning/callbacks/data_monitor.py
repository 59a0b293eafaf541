"""Log how many bad samples the data module skipped, per epoch and in total."""

from __future__ import annotations

import lightning as L


class DataMonitor(L.Callback):
    """Logs the skipped samples of each split at the end of its epoch.

    The counts come from :class:`~mm_lightning.data.datamodule.WebDataModule`, which sums what its
    workers report with each batch (a bad shard's unreadable rest counts as one). Logged, summed
    over ranks:

    * ``data/skipped``: training samples skipped in this epoch; ``data/skipped_total``: in all
      epochs of the run so far (the same bad sample counts once per epoch it was met);
    * ``val/data_skipped``: in this validation pass; ``test/data_skipped``: in the test pass.
    """

    def __init__(self) -> None:
        self._at_start: dict[str, int] = {}

    def _counts(self, trainer: L.Trainer) -> dict[str, int] | None:
        return getattr(trainer.datamodule, "num_skipped", None)

    def _mark(self, trainer: L.Trainer, split: str) -> None:
        counts = self._counts(trainer)
        if counts is not None:
            self._at_start[split] = counts[split]

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str, name: str, total: str | None = None) -> None:
        counts = self._counts(trainer)
        if counts is None:
            return
        this_epoch = counts[split] - self._at_start.get(split, 0)
        kwargs = {"on_step": False, "on_epoch": True, "sync_dist": True, "reduce_fx": "sum", "batch_size": 1}
        pl_module.log(name, float(this_epoch), **kwargs)
        if total:
            pl_module.log(total, float(counts[split]), **kwargs)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark(trainer, "train")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "train", "data/skipped", "data/skipped_total")

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark(trainer, "val")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module, "val", "val/data_skipped")

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark(trainer, "test")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "test", "test/data_skipped")
