"""VQA evaluation of a multimodal LLM: greedy answers to held-out questions, scored by exact match.

On every validation / test batch that carries the last question of its conversations
(``prompt_input_ids`` / ``prompt_attention_mask`` left-padded, ``answers``, ``question_types``;
see :class:`~mm_lightning.data.conversations.ConversationPipeline`), the task generates greedy
answers in one batch (:meth:`~mm_lightning.tasks.vlm.VisionLanguageTask.answer`, KV cache), and each
is scored with the data side's ``exact_match`` (answers normalised: case, punctuation, articles,
number words). Logged at the end of the epoch, summed over ranks:

- ``{split}/vqa_exact_match``: the fraction answered exactly, over all questions;
- ``{split}/vqa_exact_match/<type>``: the same per question type (shape, colour, count, size, position);
- ``{split}/vqa_questions``: how many questions were answered (all ranks);
- with a W&B logger, a table ``{split}/vqa_examples`` of image, question, reference and prediction.

``predict`` writes one JSON line per question (key, type, question, reference, prediction and,
with a reference, ``correct``) to ``predictions_file`` in the run directory.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any

import lightning as L
import torch


def _exact_match(prediction: str, reference: str) -> bool:
    from mm_lightning.data.vqa import exact_match

    return bool(exact_match(prediction, reference))


class VQAEvaluation(L.Callback):
    """Exact-match VQA accuracy of generated answers, overall and per question type (see the module docstring).

    Args:
        num_examples: rows of the W&B table (the first questions of the split).
        max_new_tokens: longest answer (default: the task's ``max_new_tokens``).
        predictions_file: file name (in the run directory) that ``predict`` writes; with several
            ranks each writes ``<name>.rank<N>.jsonl``.
        during_sanity_check: also answer during Lightning's sanity check (off: it only costs time).
    """

    #: the task method that answers (``answer(image, prompt_input_ids, prompt_attention_mask, max_new_tokens)``), the
    #: metric and the table it logs: a subclass scores another model of the task (the alignment reference)
    answer_method = "answer"
    metric = "vqa_exact_match"
    table = "vqa_examples"

    def __init__(
        self,
        num_examples: int = 16,
        max_new_tokens: int | None = None,
        predictions_file: str = "predictions.jsonl",
        during_sanity_check: bool = False,
    ) -> None:
        self.num_examples = num_examples
        self.max_new_tokens = max_new_tokens
        self.predictions_file = predictions_file
        self.during_sanity_check = during_sanity_check
        self._reset()

    def _reset(self) -> None:
        self.correct: dict[str, int] = defaultdict(int)
        self.total: dict[str, int] = defaultdict(int)
        self.examples: list[list[Any]] = []

    # ------------------------------------------------------------------- evaluation
    def _score_batch(self, pl_module: L.LightningModule, batch: dict[str, Any]) -> None:
        if "prompt_input_ids" not in batch or "answers" not in batch:
            return
        predictions = getattr(pl_module, self.answer_method)(
            batch.get("image"), batch["prompt_input_ids"], batch["prompt_attention_mask"], self.max_new_tokens
        )
        types = batch.get("question_types") or ["unknown"] * len(predictions)
        questions = batch.get("questions") or [""] * len(predictions)
        for i, (prediction, reference) in enumerate(zip(predictions, batch["answers"])):
            ok = _exact_match(prediction, reference)
            self.correct[types[i]] += int(ok)
            self.total[types[i]] += 1
            if len(self.examples) < self.num_examples:
                image = batch["image"][i].detach().float().cpu() if "image" in batch else None
                self.examples.append([image, types[i], questions[i], reference, prediction, ok])

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking and not self.during_sanity_check:
            return
        self._score_batch(pl_module, batch)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._score_batch(pl_module, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking and not self.during_sanity_check:
            return
        self._log(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "test")

    def scores(self, trainer: L.Trainer | None = None, device: torch.device | None = None) -> tuple[int, dict[str, float]]:
        """``(questions, {"all": exact match, "<type>": exact match, ...})`` so far, summed over ranks when
        ``trainer`` is given (``{}`` before any question)."""
        from mm_lightning.data.synthetic import QUESTION_TYPES

        names = list(QUESTION_TYPES) + sorted(set(self.total) - set(QUESTION_TYPES) - {"unknown"}) + ["unknown"]
        counts = torch.tensor([[self.correct[n], self.total[n]] for n in names], dtype=torch.float64, device=device)
        if trainer is not None and trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        correct, total = counts[:, 0].sum().item(), counts[:, 1].sum().item()
        if not total:
            return 0, {}
        out = {"all": correct / total}
        for name, (c, t) in zip(names, counts.tolist()):
            if t:
                out[name] = c / t
        return int(total), out

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> None:
        questions, scores = self.scores(trainer, pl_module.device)
        if not questions:
            return
        pl_module.log(f"{split}/{self.metric}", scores.pop("all"), prog_bar=split == "val", sync_dist=False)
        pl_module.log(f"{split}/vqa_questions", float(questions), sync_dist=False)
        for name, value in scores.items():
            pl_module.log(f"{split}/{self.metric}/{name}", value, sync_dist=False)
        self._log_table(trainer, split)

    def _log_table(self, trainer: L.Trainer, split: str) -> None:
        from lightning.pytorch.loggers import WandbLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers or not self.examples or not trainer.is_global_zero:
            return
        import wandb

        rows = []
        for image, qtype, question, reference, prediction, ok in self.examples:
            picture = None
            if image is not None:
                low, high = image.min(), image.max()
                picture = wandb.Image(((image - low) / (high - low + 1e-8)).permute(1, 2, 0).numpy())
            rows.append([picture, qtype, question, reference, prediction, ok])
        for logger in loggers:
            logger.log_table(key=f"{split}/{self.table}",
                             columns=["image", "type", "question", "reference", "prediction", "correct"], data=rows)

    # ---------------------------------------------------------------------- predict
    def _predictions_path(self, trainer: L.Trainer) -> str:
        name = self.predictions_file
        if trainer.world_size > 1:
            stem, ext = os.path.splitext(name)
            name = f"{stem}.rank{trainer.global_rank}{ext or '.jsonl'}"
        return os.path.join(trainer.default_root_dir, name)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self._predictions_path(trainer)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if os.path.exists(path):
            raise FileExistsError(f"{path} exists already: predict into another --trainer.default_root_dir")
        self._out = open(path, "w")

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        for i, prediction in enumerate(outputs["predictions"]):
            row = {"key": outputs["keys"][i], "type": outputs["question_types"][i], "question": outputs["questions"][i],
                   "reference": outputs["answers"][i], "prediction": prediction}
            if row["reference"] is not None:
                row["correct"] = _exact_match(prediction, row["reference"])
            self._out.write(json.dumps(row) + "\n")
        self._out.flush()

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = getattr(self, "_out", None)
        if out is not None:
            out.close()
            print(f"Predictions: {out.name}")
