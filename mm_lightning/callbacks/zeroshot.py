"""Zero-shot classification with an image-text model: class names in prompt templates become the classifier.

For every class, each template (``"a photo of a {}"``) is filled with the class name, the texts
are encoded and L2-normalised, averaged over the templates and normalised again (CLIP's prompt
ensembling). An image's prediction is the class whose prompt embedding is closest to its own.
The class names come from the data module (the shards' ``manifest.json``) or the callback's
``class_names``, which it declares to the data module: a sample whose label has no class name is
bad data there (skipped and counted, or named with ``data.strict``). The labels come from the
batches' ``label`` (samples without one, label -1, are left out).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn

from mm_lightning.distributed import all_reduce_sum, data_parallel_group

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a picture of a {}",
    "an image of a {}",
    "a photo of the {}",
    "a {}",
)


def fill_template(template: str, name: str) -> str:
    """``template`` with ``{}`` replaced by ``name`` and "a" turned into "an" before a vowel."""
    return re.sub(r"\ba ([aeiouAEIOU])", r"an \1", template.replace("{}", name))


@torch.no_grad()
def zeroshot_classifier(
    encode_text: Callable[..., torch.Tensor],
    tokenize: Callable[[Sequence[str]], dict[str, torch.Tensor]],
    class_names: Sequence[str],
    templates: Sequence[str],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``(num_classes, D)`` class embeddings: per class, the normalised mean of the normalised
    embeddings of its filled templates."""
    weights = []
    for name in class_names:
        tokens = {k: v.to(device) for k, v in tokenize([fill_template(t, name) for t in templates]).items()}
        features = F.normalize(encode_text(tokens["input_ids"], tokens.get("attention_mask")), dim=-1)
        weights.append(F.normalize(features.mean(0), dim=-1))
    return torch.stack(weights)


class ZeroShotClassification(L.Callback):
    """Logs ``{val,test}/zeroshot_top1`` and ``{val,test}/zeroshot_top5`` of prompt-ensembled zero-shot classification.

    Needs a task with ``encode_text(input_ids, attention_mask)`` and image features from its
    evaluation step outputs (``image_features``) or ``encode_image`` (:class:`~mm_lightning.tasks.clip.CLIPTask`),
    and the run's tokenizer, which it reads from ``pl_module.tokenizer`` (the config's top-level
    ``tokenizer:``; see :mod:`mm_lightning.data.tokenizer`). Top-k accuracy is torchmetrics'
    ``MulticlassAccuracy`` (micro), synchronised over the data-parallel ranks.

    Args:
        templates: prompt templates, ``{}`` standing for the class name.
        class_names: class names in label order; by default the data module's ``class_names``. Given here, their
            number is the labels' range: the data module skips (and counts) a sample whose label lies outside.
    """

    def __init__(self, templates: list[str] | None = None, class_names: list[str] | None = None) -> None:
        self.templates = list(templates or DEFAULT_TEMPLATES)
        bad = [t for t in self.templates if "{}" not in t]
        if bad:
            raise ValueError(f"zero-shot templates need a '{{}}' for the class name: {bad}")
        self.class_names = list(class_names) if class_names else None
        self.classifier: torch.Tensor | None = None
        self.accuracy: dict[int, Any] = {}  # top-k -> torchmetrics MulticlassAccuracy
        self.seen = 0  # labelled samples of this rank
        self._warned = False

    def _names(self, trainer: L.Trainer) -> list[str] | None:
        return self.class_names or getattr(getattr(trainer, "datamodule", None), "class_names", None)

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.classifier, self.accuracy, self.seen = None, {}, 0
        names, tokenize = self._names(trainer), getattr(pl_module, "tokenizer", None)
        if not names or tokenize is None:
            if not self._warned:
                what = ("class names (data manifest 'classes' or class_names)" if not names
                        else "tokenizer on the task (the config's top-level `tokenizer:` section)")
                rank_zero_warn(f"ZeroShotClassification: no {what}; zero-shot evaluation is skipped")
                self._warned = True
            return
        from torchmetrics.classification import MulticlassAccuracy

        self.classifier = zeroshot_classifier(pl_module.encode_text, tokenize, names, self.templates, pl_module.device)
        group = data_parallel_group()  # summed over the data-parallel ranks, not a tensor-parallel group's copies
        self.accuracy = {k: MulticlassAccuracy(len(names), top_k=min(k, len(names)), average="micro",
                                               process_group=group).to(pl_module.device) for k in (1, 5)}

    def _update(self, pl_module: L.LightningModule, outputs: Any, batch: dict[str, Any]) -> None:
        if self.classifier is None or not isinstance(batch, dict) or "label" not in batch:
            return
        labels = batch["label"]
        keep = labels >= 0
        if not bool(keep.any()):
            return
        if isinstance(outputs, dict) and "image_features" in outputs:
            features = outputs["image_features"]
        else:
            with torch.no_grad():
                features = pl_module.encode_image(batch["image"])
        logits = F.normalize(features[keep].float(), dim=-1) @ self.classifier.T
        labels = labels[keep]
        if int(labels.max()) >= self.classifier.shape[0]:
            raise ValueError(
                f"label {int(labels.max())} but only {self.classifier.shape[0]} class names for zero-shot classification"
            )
        for metric in self.accuracy.values():
            metric.update(logits, labels)
        self.seen += labels.numel()

    def _finish(self, pl_module: L.LightningModule, split: str) -> None:
        if not self.accuracy:
            return
        # every rank calls compute (it syncs); a rank without labelled samples contributes zero counts
        seen = all_reduce_sum(torch.tensor(self.seen, device=self.classifier.device))
        if int(seen) == 0:
            rank_zero_warn(f"ZeroShotClassification: no labelled {split} samples (label >= 0); nothing to log")
            self.accuracy = {}
            return
        top1, top5 = self.accuracy[1].compute(), self.accuracy[5].compute()
        pl_module.log(f"{split}/zeroshot_top1", top1, prog_bar=True)
        pl_module.log(f"{split}/zeroshot_top5", top5)
        self.classifier, self.accuracy = None, {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        declare = getattr(getattr(trainer, "datamodule", None), "declare_label_classes", None)
        if self.class_names and callable(declare):  # WebDataModule: labels without a name are skipped and counted
            declare(len(self.class_names), f"the ZeroShotClassification callback's {len(self.class_names)} class_names")

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._start(trainer, pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._update(pl_module, outputs, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update(pl_module, outputs, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._finish(pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(pl_module, "test")
