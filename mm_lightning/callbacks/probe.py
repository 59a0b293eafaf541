"""Judge a representation with labels it never trained on: a linear probe and a weighted kNN classifier.

Works for any task that exposes ``embed(images) -> (B, F)`` (SimCLR, MoCo, metric learning,
CLIP, a classifier's pooled features) and labelled batches (``image``/``view1`` + ``label``).

During ``fit`` (cheap, online, as solo-learn does):

* **Online linear probe**: a linear classifier (behind a non-affine BatchNorm) trained on the
  *detached* features of every training batch with its own AdamW optimizer. It lives in this
  callback, not in the task, so the task's optimizer never sees it, and no gradient reaches the
  backbone (features come from the training step's ``outputs["features"]``, already detached,
  or from ``embed`` under ``torch.no_grad``). Evaluated on the validation images:
  ``val/linear_probe_acc``.
* **Weighted kNN** (Wu et al. 2018, k=20, T=0.07): the bank holds the features and labels of
  the epoch's training batches; each validation image votes with its k nearest bank entries
  (cosine similarity s), weight ``exp(s / T)``: ``val/knn_acc``.

At ``test`` (the numbers to report), a fixed protocol on clean features (eval mode, no
augmentation) of whole splits, read with the data module's own pipeline:

* ``test/linear_probe_acc``: a fresh multinomial logistic regression on PCA-whitened features
  (:class:`LogisticProbe`, full-batch L-BFGS to convergence) fit on the training split; its L2
  strength is chosen from ``probe_l2`` by accuracy on the validation split (or on a fixed 20%
  hold-out of the training split when there is none); accuracy on the test split. The online
  probe is *not* used for the test number: its result depends on the training trajectory, while
  this one depends on the final weights alone, so it applies identically to any weights.
* ``test/knn_acc``: the weighted kNN with the whole training split as bank, on the test split.
* ``test/random_init_probe_acc`` and ``test/random_init_knn_acc`` (``random_init=True``): the
  same two procedures, on the same splits, for the same model at its random initialisation,
  the floor a learned representation must beat. The initial weights are the task's weights
  when this callback is first set up: before training in ``fit`` and, in a separate ``test``
  run, before the checkpoint is loaded, which the CLI builds from the same seed
  (``seed_everything``), so both see the same initial weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

from mm_lightning.distributed import all_gather_no_grad, all_reduce_sum, is_distributed


class MissingLabelsError(KeyError):
    """The data the probe reads carries no labels."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "no labels"


@torch.no_grad()
def weighted_knn_predict(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Weighted kNN classification (Wu et al. 2018; as in solo-learn and DINO).

    With cosine similarities ``s_qj = normalize(q) . normalize(b_j)`` and ``N_k(q)`` the ``k``
    bank entries most similar to ``q``::

        score_c(q) = sum_{j in N_k(q), y_j = c} exp(s_qj / T)
        prediction(q) = argmax_c score_c(q)

    Returns the predicted labels ``(Q,)``.
    """
    if bank.shape[0] == 0:
        raise ValueError("the kNN bank is empty")
    bank = F.normalize(bank.float(), dim=1)
    bank_labels = bank_labels.to(bank.device).long()
    k = min(k, bank.shape[0])
    preds = []
    for start in range(0, queries.shape[0], chunk_size):
        q = F.normalize(queries[start : start + chunk_size].float().to(bank.device), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        scores = torch.zeros(q.shape[0], num_classes, device=bank.device)
        scores.scatter_add_(1, bank_labels[idx], weights)
        preds.append(scores.argmax(1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


class LogisticProbe:
    """Multinomial logistic regression on whitened features (the test-time linear probe).

    ``x`` is centred and PCA-whitened with the training features' mean ``mu`` and covariance
    ``C = U diag(s) U^T``: ``w(x) = (x - mu) U diag(max(s, 1e-6 max(s)))^(-1/2)``. Then
    ``mean_i CE(W w(x_i) + b, y_i) + l2 / 2 * ||W||^2`` is minimised by full-batch L-BFGS.
    Whitening changes nothing about the linear function class, but makes the problem well
    conditioned: L-BFGS reaches the optimum in ~100 evaluations on features that are strongly
    correlated (as a random network's are), where on merely standardised features it stops far
    from it after hundreds of iterations and understates what a linear read-out can do.
    """

    def __init__(self, mean: torch.Tensor, project: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, l2: float):
        self.mean, self.project, self.weight, self.bias, self.l2 = mean, project, weight, bias, l2

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - self.mean) @ self.project) @ self.weight + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(1)


def fit_linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    select_x: torch.Tensor,
    select_y: torch.Tensor,
    num_classes: int,
    l2s: Iterable[float] = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6),
    max_iter: int = 500,
) -> LogisticProbe:
    """Fit :class:`LogisticProbe` for each L2 strength in ``l2s`` (warm-started from the previous one) and keep
    the one most accurate on the selection set (``select_x``, ``select_y``)."""
    # evaluation loops run under inference mode: leave it, and copy the inputs out of it
    with torch.inference_mode(False), torch.enable_grad():
        return _fit_linear_probe(train_x.clone(), train_y.clone(), select_x.clone(), select_y.clone(), num_classes,
                                 list(l2s), max_iter)


def _fit_linear_probe(train_x, train_y, select_x, select_y, num_classes, l2s, max_iter) -> LogisticProbe:
    if not l2s:
        raise ValueError("probe_l2 is empty: give at least one L2 strength")
    x = train_x.float()
    y = train_y.long()
    mean = x.mean(0)
    eigval, eigvec = torch.linalg.eigh(torch.cov((x - mean).T.double()).reshape(x.shape[1], x.shape[1]))
    eigval = eigval.clamp_min(1e-6 * float(eigval.max().clamp_min(1e-12)))
    project = (eigvec / eigval.sqrt()).float()
    xw = (x - mean) @ project
    weight = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    best, best_acc = None, -1.0
    for l2 in sorted(l2s, reverse=True):  # strong to weak regularisation: each warm-starts the next
        opt = torch.optim.LBFGS(
            [weight, bias], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
            tolerance_grad=1e-7, tolerance_change=1e-12,
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(xw @ weight + bias, y) + 0.5 * l2 * weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        probe = LogisticProbe(mean, project, weight.detach().clone(), bias.detach().clone(), l2)
        acc = float((probe.predict(select_x) == select_y.long()).float().mean()) if len(select_y) else 0.0
        if acc > best_acc:
            best, best_acc = probe, acc
    return best


@torch.no_grad()
def embed_eval(module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``module.embed(images)`` in eval mode and without gradient (no BatchNorm statistics move), float32;
    every submodule's train/eval mode is restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        device = next(module.parameters()).device
        return module.embed(images.to(device)).float()
    finally:
        for m, training in modes:
            m.training = training


def _image(batch: dict[str, Any]) -> torch.Tensor | None:
    for key in ("image", "view1"):
        if key in batch:
            return batch[key]
    return None


def _data_classes(dm: Any) -> int | None:
    """The number of classes the data module holds the labels to (WebDataModule.label_classes), if it knows."""
    count = getattr(dm, "label_classes", None) if dm is not None else None
    return count if isinstance(count, int) else None


class Probe(L.Callback):
    """Online linear probe and weighted kNN during fit; a fixed linear-probe/kNN protocol and the
    random-initialisation floor at test (see the module docstring for the exact procedures).

    Args:
        num_classes: number of classes; declared to the data module, which skips (and counts) a sample whose label
            lies outside (default: the data module's label range, from ``data.num_classes``, the shards' manifest or
            the task's ``num_classes``; else the largest label of the first batch).
        linear: run the linear probe (online at val, refit at test).
        knn: run the weighted kNN classifier.
        k: neighbours of the kNN classifier.
        knn_temperature: temperature ``T`` of the kNN vote weights ``exp(s / T)``.
        knn_bank_size: training features kept for the kNN bank during fit (the most recent).
        probe_lr: learning rate of the online probe's AdamW.
        probe_weight_decay: weight decay of the online probe's AdamW.
        probe_l2: L2 strengths tried by the test-time logistic regression (chosen on the validation split).
        random_init: also probe the model at its random initialisation at test.
        max_train_samples: use at most this many training samples for the test-time probe and kNN bank.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        linear: bool = True,
        knn: bool = True,
        k: int = 20,
        knn_temperature: float = 0.07,
        knn_bank_size: int = 16384,
        probe_lr: float = 1e-3,
        probe_weight_decay: float = 0.0,
        probe_l2: list[float] = [1e-2, 1e-3, 1e-4, 1e-5, 1e-6],  # noqa: B006 (jsonargparse shows the default)
        random_init: bool = True,
        max_train_samples: int | None = None,
    ) -> None:
        if k < 1:
            raise ValueError(f"Probe k must be >= 1, got {k}")
        if knn_temperature <= 0:
            raise ValueError(f"Probe knn_temperature must be > 0, got {knn_temperature}")
        if not probe_l2:
            raise ValueError("Probe probe_l2 must list at least one L2 strength")
        self.num_classes = num_classes
        self.linear = linear
        self.knn = knn
        self.k = k
        self.knn_temperature = knn_temperature
        self.knn_bank_size = knn_bank_size
        self.probe_lr = probe_lr
        self.probe_weight_decay = probe_weight_decay
        self.probe_l2 = [float(v) for v in probe_l2]
        self.random_init = random_init
        self.max_train_samples = max_train_samples
        self.head: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending_state: dict[str, Any] | None = None
        self.initial_state: dict[str, torch.Tensor] | None = None
        self._bank: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._warned = False

    # ------------------------------------------------------------- helpers
    def _classes(self, trainer: L.Trainer, labels: torch.Tensor | None = None) -> int:
        if self.num_classes:
            return self.num_classes
        known = _data_classes(trainer.datamodule)
        if known:
            return known
        names = getattr(trainer.datamodule, "class_names", None) if trainer.datamodule is not None else None
        if names:
            return len(names)
        if labels is not None and labels.numel():
            return int(labels.max()) + 1
        raise ValueError("Probe cannot tell the number of classes: set its num_classes (or give the shards a manifest)")

    def _check_embed(self, pl_module: L.LightningModule) -> None:
        if not callable(getattr(pl_module, "embed", None)):
            raise TypeError(f"Probe needs a task with embed(images); {type(pl_module).__name__} has none")

    def _embed_eval(self, pl_module: L.LightningModule, images: torch.Tensor) -> torch.Tensor:
        return embed_eval(pl_module, images)

    def _make_head(self, dim: int, num_classes: int, device: torch.device) -> None:
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, num_classes)).to(device)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=self.probe_lr, weight_decay=self.probe_weight_decay)
        if self._pending_state is not None:
            self.head.load_state_dict(self._pending_state["head"])
            self.optimizer.load_state_dict(self._pending_state["optimizer"])
            self._pending_state = None

    def _grow_head(self, num_classes: int) -> None:
        """Widen the online probe to ``num_classes`` outputs, keeping the rows it has learned (only when no class
        count was configured; a configured one makes the data module skip labels outside it)."""
        old = self.head[-1]
        new = nn.Linear(old.in_features, num_classes).to(old.weight.device)
        with torch.no_grad():
            new.weight.zero_()
            new.bias.zero_()
            new.weight[: old.out_features] = old.weight
            new.bias[: old.out_features] = old.bias
        self.head[-1] = new
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=self.probe_lr, weight_decay=self.probe_weight_decay)

    def _skip_unlabelled(self) -> None:
        if not self._warned:
            warnings.warn("Probe: batches carry no 'label'; the linear probe and kNN are skipped")
            self._warned = True

    # --------------------------------------------------------------- hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._check_embed(pl_module)
        declare = getattr(trainer.datamodule, "declare_label_classes", None)
        if self.num_classes and callable(declare):  # the data module skips a label outside them (WebDataModule)
            declare(self.num_classes, "the Probe callback's num_classes")
        if self.random_init and self.initial_state is None:  # before any training or checkpoint loading
            self.initial_state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._bank = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if "label" not in batch:
            self._skip_unlabelled()
            return
        features = outputs.get("features") if isinstance(outputs, dict) else None
        if features is None:
            features = self._embed_eval(pl_module, _image(batch))
        features, labels = features.detach().float(), batch["label"]
        if is_distributed():  # every rank trains the same probe on the global batch
            features, labels = all_gather_no_grad(features.contiguous()), all_gather_no_grad(labels.contiguous())
        if self.knn:
            self._bank.append((features, labels))
            while sum(len(f) for f, _ in self._bank) - len(self._bank[0][0]) >= self.knn_bank_size:
                self._bank.pop(0)
        if self.linear:
            if self.head is None:
                self._make_head(features.shape[1], self._classes(trainer, labels), features.device)
            if labels.numel() and int(labels.max()) >= self.head[-1].out_features:
                self._grow_head(int(labels.max()) + 1)  # nothing fixed the classes: a larger label is a new class
            with torch.enable_grad():
                self.head.train()
                loss = F.cross_entropy(self.head(features), labels)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
            pl_module.log("train/linear_probe_loss", loss.detach(), on_step=True, on_epoch=False, batch_size=len(labels))

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val = []

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking:
            return
        if "label" not in batch or _image(batch) is None:
            self._skip_unlabelled()
            return
        self._val.append((self._embed_eval(pl_module, _image(batch)), batch["label"]))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self._val:
            return
        features = torch.cat([f for f, _ in self._val])
        labels = torch.cat([y for _, y in self._val]).to(features.device)
        self._val = []
        if self.linear and self.head is None and self._pending_state is not None:  # restored, not yet trained
            weight = self._pending_state["head"]["1.weight"]
            self._make_head(weight.shape[1], weight.shape[0], features.device)
        if self.linear and self.head is not None:
            self.head.eval()
            with torch.no_grad():
                correct = (self.head(features).argmax(1) == labels).sum()
            pl_module.log("val/linear_probe_acc", _global_ratio(correct, len(labels), features.device))
        if self.knn and self._bank:
            bank = torch.cat([f for f, _ in self._bank])
            bank_labels = torch.cat([y for _, y in self._bank])
            preds = weighted_knn_predict(
                bank, bank_labels, features, self._classes(trainer, bank_labels), self.k, self.knn_temperature
            )
            correct = (preds.to(labels.device) == labels).sum()
            pl_module.log("val/knn_acc", _global_ratio(correct, len(labels), features.device))

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (self.linear or self.knn):
            return
        dm = trainer.datamodule
        specs = getattr(dm, "specs", None)
        if specs is None or specs.get("train") is None or specs.get("test") is None:
            warnings.warn("Probe: the test-time probe needs a WebDataModule with data.train and data.test; skipped")
            return
        try:
            results = self.evaluate(pl_module, dm, "")
        except MissingLabelsError as e:
            warnings.warn(f"{e}; the test-time probe and kNN are skipped")
            return
        if self.random_init and self.initial_state is not None:
            trained = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            pl_module.load_state_dict(self.initial_state)
            try:
                results.update(self.evaluate(pl_module, dm, "random_init_"))
            finally:
                pl_module.load_state_dict(trained)
        for name, value in results.items():
            pl_module.log(name, value, sync_dist=False)

    # ------------------------------------------------------- test protocol
    def split_features(
        self, pl_module: L.LightningModule, dm: Any, split: str, limit: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean features and labels (on the CPU) of a whole split; every rank reads all of it."""
        from mm_lightning.data.datamodule import WebDataModule

        reader = WebDataModule(
            test=dm.specs[split], pipeline=dm.pipeline, batch_size=dm.eval_batch_size, num_workers=dm.num_workers,
            pin_memory=False,
        )
        label_range = dm.label_range() if callable(getattr(dm, "label_range", None)) else None
        if label_range:  # skip the samples the run's data module skips
            reader.declare_label_classes(*label_range)
        reader.setup("test")
        feats, labels, seen = [], [], 0
        for batch in reader.test_dataloader():
            if "label" not in batch:
                raise MissingLabelsError(f"Probe: data.{split} batches have no 'label' (shards without .cls?)")
            feats.append(self._embed_eval(pl_module, batch["image"]).cpu())
            labels.append(batch["label"].cpu())
            seen += len(batch["label"])
            if limit is not None and seen >= limit:
                break
        x, y = torch.cat(feats), torch.cat(labels).long()
        return (x[:limit], y[:limit]) if limit is not None else (x, y)

    def evaluate(self, pl_module: L.LightningModule, dm: Any, prefix: str) -> dict[str, float]:
        """The test protocol for the module's current weights: ``test/linear_probe_acc`` and ``test/knn_acc``,
        or ``test/<prefix>probe_acc`` and ``test/<prefix>knn_acc`` with a prefix."""
        train_x, train_y = self.split_features(pl_module, dm, "train", self.max_train_samples)
        test_x, test_y = self.split_features(pl_module, dm, "test")
        num_classes = self.num_classes or _data_classes(dm) or int(max(train_y.max(), test_y.max())) + 1
        out: dict[str, float] = {}
        if self.linear:
            if dm.specs.get("val") is not None:
                fit_x, fit_y = train_x, train_y
                sel_x, sel_y = self.split_features(pl_module, dm, "val")
            else:  # a fixed 20% hold-out of the training split chooses the L2 strength
                order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))
                cut = max(1, len(order) // 5)
                sel_x, sel_y = train_x[order[:cut]], train_y[order[:cut]]
                fit_x, fit_y = train_x[order[cut:]], train_y[order[cut:]]
            probe = fit_linear_probe(fit_x, fit_y, sel_x, sel_y, num_classes, self.probe_l2)
            acc = float((probe.predict(test_x) == test_y).float().mean())
            out["test/linear_probe_acc" if not prefix else f"test/{prefix}probe_acc"] = acc
            out["test/linear_probe_l2" if not prefix else f"test/{prefix}probe_l2"] = probe.l2
        if self.knn:
            preds = weighted_knn_predict(train_x, train_y, test_x, num_classes, self.k, self.knn_temperature)
            out[f"test/{prefix}knn_acc"] = float((preds == test_y).float().mean())
        return out

    # ---------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        if self.head is None or self.optimizer is None:
            return {}
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._pending_state = state_dict
            if self.head is not None:
                self._make_head(self.head[1].in_features, self.head[1].out_features, next(self.head.parameters()).device)


def _global_ratio(correct: torch.Tensor, total: int, device: torch.device) -> torch.Tensor:
    """``correct / total`` summed over ranks (validation shards differ in size across ranks)."""
    counts = all_reduce_sum(torch.tensor([float(correct), float(total)], device=device))
    return counts[0] / counts[1].clamp_min(1.0)
