"""MoCo v2: a query encoder, a momentum key encoder and a FIFO queue of negative keys."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F

from mm_lightning.distributed import all_gather_no_grad
from mm_lightning.losses.contrastive import moco_loss
from mm_lightning.models.ssl import SSLEncoder
from mm_lightning.tasks.base import Task


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """Momentum after ``step`` of ``total_steps`` optimizer steps, rising from ``base`` to ``final`` along a cosine
    (BYOL's schedule): ``m = final - (final - base) * (1 + cos(pi * step / total_steps)) / 2``."""
    progress = min(1.0, step / max(1, total_steps))
    return final - (final - base) * (1.0 + math.cos(math.pi * progress)) / 2.0


class MoCo(Task):
    """MoCo v2 (He et al. 2020; Chen et al. 2020): InfoNCE between queries and momentum-encoded keys.

    The query encoder (backbone + projection MLP, :class:`mm_lightning.models.ssl.SSLEncoder`, ``task.model``)
    is trained; the key encoder (``task.key_model``) is a copy whose
    weights follow it as an exponential moving average ``theta_k <- m theta_k + (1 - m) theta_q``
    and receive no gradient. The update runs once per *optimizer* step (in
    :meth:`optimizer_step`), so ``accumulate_grad_batches`` does not change how often the key
    encoder moves; ``m`` follows :func:`cosine_momentum` from ``base_momentum`` to
    ``final_momentum`` over the run. Each batch's keys are gathered from all ranks and written
    into a FIFO queue of ``queue_size`` negatives, which must be a multiple of the keys enqueued
    per step (global batch, times 2 with ``symmetric``), so the queue wraps exactly.

    Args:
        backbone: timm model name, e.g. ``vit_tiny_patch16_224`` or ``resnet18``.
        backbone_kwargs: extra arguments for ``timm.create_model``.
        pretrained: load timm's pretrained weights (downloads; off by default).
        proj_hidden_dim: hidden width of the projection MLP.
        proj_dim: output width of the projection MLP (the key/query space and queue width).
        proj_layers: linear layers in the projection MLP (MoCo v2: 2).
        proj_batch_norm: BatchNorm1d in the projection MLP's hidden layers (MoCo v2: no).
        temperature: InfoNCE temperature (MoCo v2: 0.2).
        queue_size: number of negative keys kept (a multiple of the keys enqueued per step).
        base_momentum: key-encoder momentum at the first optimizer step.
        final_momentum: key-encoder momentum at the last optimizer step.
        symmetric: also contrast view2's queries against view1's keys (loss averaged, both keys enqueued).
        **kwargs: optimizer settings of :class:`~mm_lightning.tasks.base.Task` (``lr``, ``weight_decay``, ...).
    """

    monitor = None  # self-supervised: keep the last checkpoint

    def __init__(
        self,
        backbone: str = "vit_tiny_patch16_224",
        backbone_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        proj_hidden_dim: int = 512,
        proj_dim: int = 128,
        proj_layers: int = 2,
        proj_batch_norm: bool = False,
        temperature: float = 0.2,
        queue_size: int = 4096,
        base_momentum: float = 0.99,
        final_momentum: float = 1.0,
        symmetric: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if temperature <= 0:
            raise ValueError(f"model.temperature must be > 0, got {temperature}")
        if queue_size < 1:
            raise ValueError(f"model.queue_size must be >= 1, got {queue_size}")
        if not 0.0 <= base_momentum <= final_momentum <= 1.0:
            raise ValueError(
                f"need 0 <= model.base_momentum <= model.final_momentum <= 1, got {base_momentum} and {final_momentum}"
            )
        self.model = SSLEncoder(backbone, backbone_kwargs, pretrained, proj_hidden_dim, proj_dim, proj_layers,
                                proj_batch_norm)
        self.key_model = copy.deepcopy(self.model).requires_grad_(False)
        self.temperature = temperature
        self.queue_size = queue_size
        self.base_momentum = base_momentum
        self.final_momentum = final_momentum
        self.symmetric = symmetric
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("momentum_updates", torch.zeros((), dtype=torch.long))
        self.total_steps: int | None = None

    # ----------------------------------------------------------------- model
    def optimized_module(self) -> torch.nn.Module:
        return self.model

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """The representation: pooled features of the query backbone ``(B, num_features)``."""
        return self.model.embed(image)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)

    @torch.no_grad()
    def keys(self, image: torch.Tensor) -> torch.Tensor:
        """L2-normalised keys from the momentum encoder (no gradient)."""
        return F.normalize(self.key_model(image), dim=1)

    def query_params(self) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
        """(query, key) parameter pairs of ``model`` and ``key_model``."""
        return list(zip(self.model.parameters(), self.key_model.parameters()))

    # ------------------------------------------------------------- momentum
    def current_momentum(self) -> float:
        total = self.total_steps
        if total is None:
            total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        return cosine_momentum(int(self.momentum_updates), total, self.base_momentum, self.final_momentum)

    @torch.no_grad()
    def momentum_update(self) -> float:
        """``theta_k <- m theta_k + (1 - m) theta_q`` with the scheduled ``m``; returns ``m``."""
        m = self.current_momentum()
        for q, k in self.query_params():
            k.mul_(m).add_(q.detach(), alpha=1.0 - m)
        self.momentum_updates += 1
        return m

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Step the optimizer, then move the key encoder: once per optimizer step, whatever the accumulation."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.momentum_update()

    # ----------------------------------------------------------------- queue
    def keys_per_step(self, batch_size: int, world: int) -> int:
        return batch_size * world * (2 if self.symmetric else 1)

    def check_queue_size(self, batch_size: int, world: int) -> None:
        per_step = self.keys_per_step(batch_size, world)
        if self.queue_size % per_step:
            views = " x 2 views (model.symmetric)" if self.symmetric else ""
            raise ValueError(
                f"model.queue_size={self.queue_size} must be a multiple of the keys enqueued per step, "
                f"data.batch_size={batch_size} x {world} rank(s){views} = {per_step}, so the FIFO queue wraps exactly; "
                f"e.g. model.queue_size={max(1, self.queue_size // per_step) * per_step}"
            )

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (already gathered from every rank) over the oldest entries of the queue."""
        n = keys.shape[0]
        if self.queue_size % n:
            raise ValueError(
                f"model.queue_size={self.queue_size} is not a multiple of the {n} keys enqueued this step "
                "(data.batch_size x ranks, x 2 with model.symmetric)"
            )
        ptr = int(self.queue_ptr)
        self.queue[ptr : ptr + n] = keys.to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + n) % self.queue_size)

    # ------------------------------------------------------------- training
    def setup(self, stage: str) -> None:
        if stage == "fit" and self._trainer is not None:
            batch_size = getattr(self.trainer.datamodule, "batch_size", None)
            if batch_size:  # keys come from the data-parallel ranks (a tensor-parallel group shares its batch)
                self.check_queue_size(int(batch_size), self.data_parallel_size())

    def on_fit_start(self) -> None:
        self.total_steps = int(self.trainer.estimated_stepping_batches)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        v1, v2 = batch["view1"], batch["view2"]
        n = v1.shape[0]
        h = self.model.backbone(torch.cat([v1, v2]) if self.symmetric else v1)
        q = self.model.projector(h)
        k2 = self.keys(v2)
        queue = self.queue.clone()  # enqueued below, before backward needs it
        loss = moco_loss(q[:n], k2, queue, self.temperature)
        new_keys = [k2]
        if self.symmetric:
            k1 = self.keys(v1)
            loss = 0.5 * (loss + moco_loss(q[n:], k1, queue, self.temperature))
            new_keys.insert(0, k1)
        self.enqueue(all_gather_no_grad(torch.cat(new_keys)))
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/momentum", self.current_momentum(), batch_size=n)
        return {"loss": loss, "features": h[:n].detach()}

    def _eval_step(self, batch: dict[str, Any], split: str) -> None:
        if "view1" in batch:  # a loss against the current queue; the queue is left as it is
            q = self.model(batch["view1"])
            loss = moco_loss(q, self.keys(batch["view2"]), self.queue, self.temperature)
            self.log(f"{split}/loss", loss, batch_size=q.shape[0], sync_dist=True)
