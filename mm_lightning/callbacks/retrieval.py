"""Image-text retrieval over the whole validation (and test) set: recall at k and median rank.

After the epoch the image features and the caption features of all ranks are gathered; every
image ranks the captions (image-to-text, ``i2t``) and every caption ranks the images
(text-to-image, ``t2i``). An image may own several reference captions (COCO's protocol, as
open_clip's retrieval benchmark runs it): batches that carry ``caption_input_ids`` and
``caption_owner`` (:class:`~mm_lightning.data.samples.ImageTextPipeline` with a ``.json`` listing
``captions``) are scored against all of them; otherwise each image owns the one caption of its
sample. Captions that are the same string are the same caption: the ``i2t`` gallery holds each
distinct caption once (scored by its best-scored copy), correct for every image that owns it; a
``t2i`` query (every caption row) is answered correctly by every image that owns that string.
Identity is decided on the token ids the model sees (the same string, after the tokenizer's
normalisation and truncation to the context length).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn

from mm_lightning.distributed import is_distributed, rank, world_size


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


def ranks_from_mask(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    correct: Callable[[slice], torch.Tensor],
    chunk_size: int = 1024,
    gallery_groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """1-based rank of the best-scored correct gallery item for every query.

    Scores are dot products (cosine similarity for normalised features). With ``gallery_groups``
    the gallery items are the groups (distinct captions), each scored by its best-scored row.
    ``correct(rows)`` returns the boolean ``(len(rows), gallery items)`` matrix of correct items for
    a slice of the queries. The rank is one plus the number of gallery items scored strictly higher
    than the best correct one (ties go to the query).
    """
    ranks = []
    for start in range(0, queries.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        scores = queries[rows] @ gallery.T
        if gallery_groups is not None:
            num_groups = int(gallery_groups.max()) + 1 if gallery_groups.numel() else 0
            index = gallery_groups[None, :].expand(scores.shape[0], -1)
            scores = scores.new_full((scores.shape[0], num_groups), float("-inf")).scatter_reduce(
                1, index, scores, reduce="amax"
            )
        ok = correct(rows)
        if not bool(ok.any(1).all()):
            raise ValueError("a retrieval query has no correct item in the gallery")
        best = scores.masked_fill(~ok, float("-inf")).amax(1, keepdim=True)
        ranks.append((scores > best).sum(1) + 1)
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long, device=queries.device)


def retrieval_ranks(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    query_groups: torch.Tensor,
    gallery_groups: torch.Tensor,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """:func:`ranks_from_mask` where gallery item ``j`` is correct for query ``i`` when
    ``gallery_groups[j] == query_groups[i]``."""
    return ranks_from_mask(
        queries, gallery, lambda rows: query_groups[rows, None] == gallery_groups[None, :], chunk_size
    )


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    input_ids: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    owner: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """``i2t_R@k``, ``t2i_R@k`` (fractions of queries whose first correct item ranks within k) and
    ``i2t_median_rank``, ``t2i_median_rank``.

    ``owner[j]`` is the image whose reference caption text row ``j`` is (several rows may share an
    image); without it the features are paired (row ``i`` of each is pair ``i``). Identical token
    rows of ``input_ids`` are one caption (see the module docstring).
    """
    if owner is None:
        if text_features.shape[0] != image_features.shape[0]:
            raise ValueError("paired retrieval needs as many captions as images; pass owner for several per image")
        owner = torch.arange(image_features.shape[0], device=image_features.device)
    owner = owner.to(image_features.device).long()
    if owner.numel() and (int(owner.min()) < 0 or int(owner.max()) >= image_features.shape[0]):
        raise ValueError("caption owner index out of range of the images")
    groups = caption_groups(input_ids).to(image_features.device)
    num_groups = int(groups.max()) + 1 if groups.numel() else 0
    owns = torch.zeros(image_features.shape[0], num_groups, dtype=torch.bool, device=image_features.device)
    owns[owner, groups] = True  # owns[i, g]: image i has caption g
    i2t = ranks_from_mask(image_features, text_features, lambda rows: owns[rows], chunk_size, gallery_groups=groups)
    t2i = ranks_from_mask(text_features, image_features, lambda rows: owns[:, groups[rows]].T, chunk_size)
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

    Needs a task with ``encode_image`` / ``encode_text``
    (:class:`~mm_lightning.tasks.clip.CLIPTask`), or one whose ``validation_step`` /
    ``test_step`` return ``{"image_features", "text_features"}`` (normalised) when batches carry
    one caption per image. Batches with ``caption_input_ids`` / ``caption_owner`` are scored
    against all of an image's reference captions (module docstring). Works under DDP: features are
    gathered from all ranks before ranking. With a
    :class:`~lightning.pytorch.loggers.WandbLogger` it also logs a table of the first
    ``num_examples`` images with their (first) caption and top-3 retrieved distinct captions.

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
        self.owner: list[torch.Tensor] = []
        self.num_images = 0
        self.examples: list[torch.Tensor] = []

    # ------------------------------------------------------------- collection
    def _collect(self, pl_module: L.LightningModule, outputs: Any, batch: dict[str, Any]) -> None:
        if not isinstance(batch, dict) or "input_ids" not in batch or "image" not in batch:
            return
        many = "caption_input_ids" in batch and "caption_owner" in batch
        with torch.no_grad():
            if isinstance(outputs, dict) and "image_features" in outputs:
                image_features = outputs["image_features"]
            else:
                image_features = pl_module.encode_image(batch["image"])
            if many:
                ids, owner = batch["caption_input_ids"], batch["caption_owner"]
                text_features = pl_module.encode_text(ids, batch.get("caption_attention_mask"))
            else:
                ids = batch["input_ids"]
                owner = torch.arange(ids.shape[0], device=ids.device)
                if isinstance(outputs, dict) and "text_features" in outputs:
                    text_features = outputs["text_features"]
                else:
                    text_features = pl_module.encode_text(ids, batch.get("attention_mask"))
        self.image_features.append(image_features.detach().float())
        self.text_features.append(text_features.detach().float())
        self.input_ids.append(ids.detach())
        self.owner.append(owner.detach().long() + self.num_images)
        self.num_images += image_features.shape[0]
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
    def gathered(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image features, caption features, caption token ids and caption owners of all ranks, with
        owners indexing the gathered images (rank ``r``'s images follow those of ranks ``< r``)."""

        def local(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
            return torch.cat(parts).to(device) if parts else torch.zeros(0, 0, dtype=dtype, device=device)

        counts = gather_rows(torch.tensor([[self.num_images]], device=device)).flatten()
        offset = int(counts[: rank()].sum()) if is_distributed() else 0
        owner = local([o[:, None] for o in self.owner], torch.long)
        return (
            gather_rows(local(self.image_features, torch.float32)),
            gather_rows(local(self.text_features, torch.float32)),
            gather_rows(local(self.input_ids, torch.long)),
            gather_rows(owner + offset).flatten(),
        )

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> None:
        images, texts, ids, owner = self.gathered(pl_module.device)
        if images.shape[0] == 0:
            rank_zero_warn(f"{split}: no image-text batches (input_ids and image) to evaluate retrieval on")
            self._reset()
            return
        metrics = retrieval_metrics(images, texts, ids, self.ks, owner=owner, chunk_size=self.chunk_size)
        for name, value in metrics.items():
            pl_module.log(f"{split}/{name}", value, sync_dist=True, prog_bar=name == "i2t_R@1")
        if trainer.is_global_zero and self.num_examples and self.examples:
            self._log_table(trainer, pl_module, split, images, texts, ids, owner)
        self._reset()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._finish(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module, "test")

    # ------------------------------------------------------------------ table
    def example_rows(
        self,
        pl_module: Any,
        images: torch.Tensor,
        texts: torch.Tensor,
        ids: torch.Tensor,
        owner: torch.Tensor | None = None,
    ) -> list[list[Any]]:
        """``[image (H, W, 3) uint8, caption, top-1, top-2, top-3 retrieved captions]`` for the first
        images of rank 0 (which come first in the gathered order): the image's first reference
        caption and the best-scored distinct captions, decoded by ``pl_module.tokenizer``."""
        decode = _caption_decoder(pl_module)
        owner = torch.arange(ids.shape[0]) if owner is None else owner.cpu()
        unique, first = _first_of_each(ids)
        gallery = texts[first]
        pictures = torch.cat(self.examples)[: self.num_examples]
        rows = []
        for i, picture in enumerate(pictures):
            own = (owner == i).nonzero().flatten()
            caption = decode(ids[int(own[0])]) if len(own) else ""
            top = (images[i] @ gallery.T).topk(min(3, len(first))).indices.tolist()
            rows.append([_display(picture), caption] + [decode(unique[j]) for j in top])
        return rows

    def _log_table(self, trainer: L.Trainer, pl_module: Any, split: str, images, texts, ids, owner=None) -> None:
        from lightning.pytorch.loggers import WandbLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        import wandb

        rows = self.example_rows(pl_module, images, texts, ids, owner)
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


def _caption_decoder(pl_module: Any) -> Any:
    """The run's tokenizer's ``decode`` (``pl_module.tokenizer``), else the ids joined by spaces."""
    tokenizer = getattr(pl_module, "tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer, "decode"):
        return tokenizer.decode
    return lambda row: " ".join(str(t) for t in row.tolist() if t)
