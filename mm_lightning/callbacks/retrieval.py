"""Image-text retrieval over the whole validation (and test) set: recall at k and median rank.

Each evaluation sample is one image and its caption. After the epoch the image and text
features of all ranks are gathered and every image ranks every caption (image-to-text, ``i2t``)
and every caption ranks every image (text-to-image, ``t2i``). Captions that are the same string
are the same caption: an image's ground truth is every text identical to its own caption, a
caption's ground truth is every image whose caption is identical to it. Identity is decided on
the token ids the model sees (the same string, after the tokenizer's normalisation and
truncation to the context length).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn

from mm_lightning.distributed import is_distributed, world_size


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate 2-d tensors over ranks along dim 0 when ranks hold different numbers of rows
    (evaluation shards split unevenly); a rank with no rows passes a ``(0, 0)`` tensor. No gradient."""
    if not is_distributed():
        return x
    shape = torch.tensor(list(x.shape), device=x.device, dtype=torch.long)
    shapes = [torch.zeros_like(shape) for _ in range(world_size())]
    dist.all_gather(shapes, shape)
    rows = [int(s[0]) for s in shapes]
    width = max(int(s[1]) for s in shapes)
    padded = torch.zeros(max(rows + [1]), width, dtype=x.dtype, device=x.device)
    if x.shape[0]:
        padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(out, padded.contiguous())
    return torch.cat([o[:n] for o, n in zip(out, rows)], dim=0)


def caption_groups(input_ids: torch.Tensor) -> torch.Tensor:
    """An id per caption such that identical token rows (identical captions) share it."""
    return torch.unique(input_ids, dim=0, return_inverse=True)[1]


def retrieval_ranks(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    query_groups: torch.Tensor,
    gallery_groups: torch.Tensor,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """1-based rank of the best-scored correct gallery item for every query.

    Gallery item ``j`` is correct for query ``i`` when ``gallery_groups[j] == query_groups[i]``;
    the rank is one plus the number of gallery items scored strictly higher than the best correct
    one (ties go to the query). Scores are dot products (cosine similarity for normalised features).
    """
    ranks = []
    for start in range(0, queries.shape[0], chunk_size):
        scores = queries[start : start + chunk_size] @ gallery.T
        correct = query_groups[start : start + chunk_size, None] == gallery_groups[None, :]
        if not bool(correct.any(1).all()):
            raise ValueError("a retrieval query has no correct item in the gallery")
        best = scores.masked_fill(~correct, float("-inf")).amax(1, keepdim=True)
        ranks.append((scores > best).sum(1) + 1)
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long, device=queries.device)


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    input_ids: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """``i2t_R@k``, ``t2i_R@k`` (fractions of queries whose first correct item ranks within k) and
    ``i2t_median_rank``, ``t2i_median_rank`` of paired features (row ``i`` of each is pair ``i``)."""
    groups = caption_groups(input_ids)
    i2t = retrieval_ranks(image_features, text_features, groups, groups)
    t2i = retrieval_ranks(text_features, image_features, groups, groups)
    out: dict[str, float] = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_R@{k}"] = float((ranks <= k).float().mean())
        out[f"{name}_median_rank"] = float(ranks.float().median())
    return out


def _display(image: torch.Tensor) -> Any:
    """A normalised ``(3, H, W)`` image stretched to uint8 ``(H, W, 3)`` for display."""
    lo, hi = image.amin(), image.amax()
    scaled = (image - lo) / (hi - lo).clamp(min=1e-6)
    return (scaled * 255).round().byte().permute(1, 2, 0).cpu().numpy()


class RetrievalEvaluation(L.Callback):
    """Logs ``{val,test}/i2t_R@k``, ``{val,test}/t2i_R@k`` and the median ranks of image-text retrieval.

    Needs a task whose ``validation_step`` / ``test_step`` return ``{"image_features",
    "text_features"}`` (normalised), or that has ``encode_image`` / ``encode_text``
    (:class:`~mm_lightning.tasks.clip.CLIPTask`). Works under DDP: features are gathered from all
    ranks before ranking. With a :class:`~lightning.pytorch.loggers.WandbLogger` it also logs a
    table of the first ``num_examples`` images with their caption and top-3 retrieved captions.

    Args:
        ks: the k of recall at k.
        num_examples: rows of the W&B table (0 disables it).
        chunk_size: query rows scored at once (bounds memory on large evaluation sets).
    """

    def __init__(self, ks: list[int] = [1, 5, 10], num_examples: int = 8, chunk_size: int = 1024) -> None:  # noqa: B006
        if not ks or min(ks) < 1:
            raise ValueError(f"ks must be positive integers, got {ks}")
        self.ks = sorted(set(int(k) for k in ks))
        self.num_examples = num_examples
        self.chunk_size = chunk_size
        self._reset()

    def _reset(self) -> None:
        self.image_features: list[torch.Tensor] = []
        self.text_features: list[torch.Tensor] = []
        self.input_ids: list[torch.Tensor] = []
        self.examples: list[torch.Tensor] = []

    # ------------------------------------------------------------- collection
    def _collect(self, pl_module: L.LightningModule, outputs: Any, batch: dict[str, Any]) -> None:
        if not isinstance(batch, dict) or "input_ids" not in batch or "image" not in batch:
            return
        if isinstance(outputs, dict) and "image_features" in outputs and "text_features" in outputs:
            image_features, text_features = outputs["image_features"], outputs["text_features"]
        else:
            with torch.no_grad():
                image_features = pl_module.encode_image(batch["image"])
                text_features = pl_module.encode_text(batch["input_ids"], batch.get("attention_mask"))
        self.image_features.append(image_features.detach().float())
        self.text_features.append(text_features.detach().float())
        self.input_ids.append(batch["input_ids"].detach())
        room = self.num_examples - sum(len(e) for e in self.examples)
        if room > 0:
            self.examples.append(batch["image"][:room].detach().cpu())

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._collect(pl_module, outputs, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(pl_module, outputs, batch)

    # ------------------------------------------------------------- evaluation
    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> None:
        device = pl_module.device

        def local(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
            return torch.cat(parts).to(device) if parts else torch.zeros(0, 0, dtype=dtype, device=device)

        images = gather_rows(local(self.image_features, torch.float32))
        texts = gather_rows(local(self.text_features, torch.float32))
        ids = gather_rows(local(self.input_ids, torch.long))
        if images.shape[0] == 0:
            rank_zero_warn(f"{split}: no image-text batches (input_ids and image) to evaluate retrieval on")
            self._reset()
            return
        metrics = retrieval_metrics(images, texts, ids, self.ks)
        for name, value in metrics.items():
            pl_module.log(f"{split}/{name}", value, sync_dist=True, prog_bar=name == "i2t_R@1")
        if trainer.is_global_zero and self.num_examples and self.examples:
            self._log_table(trainer, split, images, texts, ids)
        self._reset()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._finish(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module, "test")

    # ------------------------------------------------------------------ table
    def example_rows(
        self, trainer: L.Trainer, images: torch.Tensor, texts: torch.Tensor, ids: torch.Tensor
    ) -> list[list[Any]]:
        """``[image (H, W, 3) uint8, caption, top-1, top-2, top-3 retrieved captions]`` for the first
        images of rank 0 (which come first in the gathered order). Distinct captions only."""
        decode = _caption_decoder(trainer)
        unique, first = _first_of_each(ids)
        gallery = texts[first]
        pictures = torch.cat(self.examples)[: self.num_examples]
        rows = []
        for i, picture in enumerate(pictures):
            top = (images[i] @ gallery.T).topk(min(3, len(first))).indices.tolist()
            rows.append([_display(picture), decode(ids[i])] + [decode(unique[j]) for j in top])
        return rows

    def _log_table(self, trainer: L.Trainer, split: str, images, texts, ids) -> None:
        from lightning.pytorch.loggers import WandbLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        import wandb

        rows = self.example_rows(trainer, images, texts, ids)
        data = [[wandb.Image(r[0])] + r[1:] + [""] * (5 - len(r)) for r in rows]
        for logger in loggers:
            logger.log_table(
                key=f"{split}/retrieval_examples",
                columns=["image", "caption", "top1", "top2", "top3"],
                data=data,
                step=trainer.global_step,
            )


def _first_of_each(ids: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Distinct token rows and, for each, the index of its first occurrence."""
    unique, inverse = torch.unique(ids, dim=0, return_inverse=True)
    first = [0] * unique.shape[0]
    seen = set()
    for idx, g in enumerate(inverse.tolist()):
        if g not in seen:
            seen.add(g)
            first[g] = idx
    return unique, first


def _caption_decoder(trainer: L.Trainer) -> Any:
    tokenizer = getattr(getattr(getattr(trainer, "datamodule", None), "pipeline", None), "tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer, "decode"):
        return tokenizer.decode
    return lambda row: " ".join(str(t) for t in row.tolist() if t)
