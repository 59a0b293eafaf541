"""VQA exact match of an alignment task's frozen reference: the starting model, on the same held-out questions.

:class:`ReferenceVQAEvaluation` is :class:`~mm_lightning.callbacks.vqa.VQAEvaluation` answering with
:meth:`~mm_lightning.tasks.alignment.AlignmentTask.reference_answer` instead of the policy, logged as
``{split}/reference_vqa_exact_match`` (and per question type). Stack it beside ``VQAEvaluation`` in an
alignment config: the test summary then holds ``test/vqa_exact_match`` (after alignment) and
``test/reference_vqa_exact_match`` (before), from the same batches. The reference does not change
during training, so by default it answers the test split only.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from mm_lightning.callbacks.vqa import VQAEvaluation


class ReferenceVQAEvaluation(VQAEvaluation):
    """Exact match of the reference's greedy answers (see the module docstring).

    Args:
        num_examples: rows of the W&B table.
        max_new_tokens: longest answer (default: the task's ``max_new_tokens``).
        during_validation: also score the validation split every epoch (the same number each time).
    """

    answer_method = "reference_answer"
    metric = "reference_vqa_exact_match"
    table = "reference_vqa_examples"

    def __init__(self, num_examples: int = 16, max_new_tokens: int | None = None, during_validation: bool = False) -> None:
        super().__init__(num_examples=num_examples, max_new_tokens=max_new_tokens)
        self.during_validation = during_validation

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.during_validation:
            super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.during_validation:
            super().on_validation_epoch_end(trainer, pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Nothing: predictions are the policy's (written by ``VQAEvaluation``)."""

    def on_predict_batch_end(self, *args: Any, **kwargs: Any) -> None:
        """Nothing (see :meth:`on_predict_start`)."""

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Nothing (see :meth:`on_predict_start`)."""
