"""Watch a representation: a collapse monitor while training and a 2-D map of the test embeddings."""

from __future__ import annotations

import os
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from mm_lightning.callbacks.probe import embed_eval


def embedding_std(features: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the per-dimension standard deviation of the L2-normalised embeddings.

    ``std = mean_d std_i( z_id )`` with ``z_i = x_i / ||x_i||``. Embeddings spread over the unit
    sphere give about ``1 / sqrt(D)``; a collapsed representation (every input mapped to one
    point) gives 0 (SimSiam, Chen and He 2021).
    """
    z = F.normalize(features.detach().float(), dim=1)
    return z.std(dim=0).mean()


class EmbeddingMonitor(L.Callback):
    """Log ``train/embedding_std`` (collapse monitor) and, at test, plot the embeddings in 2-D.

    For any task with ``embed(images)``. While training the features come from the training
    step's ``outputs["features"]`` when it returns them (free, every step), else from ``embed``
    (eval mode, no gradient) on the batch every ``every_n_steps`` steps. At test, the embeddings
    of (rank 0's) test images, up to ``max_points``, are projected to 2-D with PCA or t-SNE,
    coloured by label, saved as ``embeddings_<method>.png`` in the run directory and logged to
    W&B as ``test/embeddings``.

    Args:
        every_n_steps: when the task returns no features, embed a training batch every this many batches.
        method: ``pca`` or ``tsne`` for the test plot.
        max_points: at most this many test embeddings in the plot.
        plot: draw the test plot at all.
    """

    def __init__(
        self, every_n_steps: int = 10, method: Literal["pca", "tsne"] = "pca", max_points: int = 2000, plot: bool = True
    ) -> None:
        if method not in ("pca", "tsne"):
            raise ValueError(f"EmbeddingMonitor method must be 'pca' or 'tsne', got {method!r}")
        if every_n_steps < 1:
            raise ValueError(f"EmbeddingMonitor every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.method = method
        self.max_points = max_points
        self.plot = plot
        self._features: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self.plot_path: str | None = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        features = outputs.get("features") if isinstance(outputs, dict) else None
        if features is None:  # not handed over by the task: embed, but only every few steps
            if batch_idx % self.every_n_steps:
                return
            image = batch.get("image", batch.get("view1")) if isinstance(batch, dict) else None
            if image is None or not callable(getattr(pl_module, "embed", None)):
                return
            features = embed_eval(pl_module, image)
        pl_module.log("train/embedding_std", embedding_std(features), on_step=True, on_epoch=False,
                      batch_size=features.shape[0])

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._features, self._labels = [], []

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self.plot or not trainer.is_global_zero or not isinstance(batch, dict) or "image" not in batch:
            return
        if not callable(getattr(pl_module, "embed", None)):
            return
        if sum(len(f) for f in self._features) >= self.max_points:
            return
        with torch.no_grad():
            self._features.append(pl_module.embed(batch["image"]).float().cpu())
        label = batch.get("label")
        self._labels.append(label.cpu() if label is not None else torch.zeros(len(batch["image"]), dtype=torch.long))

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.plot or not trainer.is_global_zero or not self._features:
            return
        x = torch.cat(self._features)[: self.max_points].numpy()
        y = torch.cat(self._labels)[: self.max_points].numpy()
        self._features, self._labels = [], []
        names = getattr(trainer.datamodule, "class_names", None) if trainer.datamodule is not None else None
        self.plot_path = save_embedding_plot(x, y, names, trainer.default_root_dir, self.method)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="test/embeddings", images=[self.plot_path])


def project_2d(x: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """2-D coordinates of the rows of ``x`` by PCA or t-SNE (scikit-learn)."""
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(max(2, min(30, (len(x) - 1) // 3)))
        return TSNE(2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(x)
    from sklearn.decomposition import PCA

    return PCA(2, random_state=seed).fit_transform(x)


def save_embedding_plot(
    x: np.ndarray, y: np.ndarray, names: list[str] | None, directory: str, method: str = "pca"
) -> str:
    """Scatter the 2-D projection of ``x`` coloured by ``y``; save ``<directory>/embeddings_<method>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xy = project_2d(x, method)
    fig, ax = plt.subplots(figsize=(6, 5))
    classes = np.unique(y)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for i, c in enumerate(classes):
        mask = y == c
        label = names[int(c)] if names and 0 <= int(c) < len(names) else str(int(c))
        ax.scatter(xy[mask, 0], xy[mask, 1], s=6, alpha=0.7, color=cmap(i % cmap.N), label=label)
    ax.legend(markerscale=3, fontsize=8, loc="best")
    ax.set_title(f"test embeddings ({method.upper()}, {len(y)} points)")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"embeddings_{method}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
