"""Self-supervised and metric-learning tasks: two-view pipeline, MoCo's queue and momentum encoder,
the probe / kNN / collapse callbacks, and the tasks end to end through the CLI."""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from mm_lightning.callbacks.embedding_monitor import EmbeddingMonitor, embedding_std, save_embedding_plot
from mm_lightning.callbacks.probe import Probe, fit_linear_probe, weighted_knn_predict
from mm_lightning.data.datamodule import WebDataModule
from mm_lightning.data.samples import TwoViewPipeline
from mm_lightning.tasks.base import param_groups
from mm_lightning.tasks.metric import MetricLearner, recall_at_1
from mm_lightning.tasks.moco import MoCo, cosine_momentum
from mm_lightning.tasks.simclr import SimCLR
from tests.conftest import REPO, colour_image, png_bytes
from tests.test_run import data_flags, run_cli

TINY_VIT = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}
NORM = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def _pipeline(**kwargs) -> TwoViewPipeline:
    return TwoViewPipeline(image_size=16, crop_scale=(0.5, 1.0), blur=0.0, **NORM, **kwargs)


def _moco(**kwargs) -> MoCo:
    torch.manual_seed(0)
    args = dict(backbone="vit_tiny_patch16_224", backbone_kwargs=TINY_VIT, proj_hidden_dim=32, proj_dim=16,
                queue_size=64, lr=1e-3)
    return MoCo(**{**args, **kwargs})


def _trainer(**kwargs) -> L.Trainer:
    args = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return L.Trainer(**{**args, **kwargs})


# ------------------------------------------------------------------ pipeline
def test_two_view_pipeline_views_and_label():
    rng = np.random.default_rng(0)
    sample = {"png": png_bytes(colour_image(2, rng)), "cls": b"2"}
    out = _pipeline().decode(sample, training=True)
    assert set(out) == {"view1", "view2", "label"} and out["label"] == 2
    assert out["view1"].shape == (3, 16, 16) and out["view1"].dtype == torch.float32
    assert not torch.equal(out["view1"], out["view2"])  # independently augmented
    evaluation = _pipeline().decode(sample, training=False)
    assert set(evaluation) == {"image", "label"}
    assert set(_pipeline(eval_views=True).decode(sample, training=False)) == {"image", "view1", "view2", "label"}
    assert set(_pipeline().decode({"png": sample["png"]}, training=True)) == {"view1", "view2"}  # no .cls
    grey = _pipeline(grayscale=1.0).decode(sample, training=True)["view1"]
    assert torch.allclose(grey[0], grey[1]) and torch.allclose(grey[1], grey[2])
    with pytest.raises(ValueError, match="grayscale"):
        _pipeline(grayscale=1.5)


# -------------------------------------------------------------------- MoCo
def test_moco_queue_enqueues_and_wraps():
    task = _moco(queue_size=8, proj_dim=4)
    batches = [torch.full((4, 4), float(i)) for i in (1, 2, 3)]
    task.enqueue(batches[0])
    assert int(task.queue_ptr) == 4 and torch.equal(task.queue[:4], batches[0])
    task.enqueue(batches[1])
    assert int(task.queue_ptr) == 0 and torch.equal(task.queue[4:], batches[1])
    task.enqueue(batches[2])  # wraps: the oldest keys (batch 1) are replaced first
    assert int(task.queue_ptr) == 4
    assert torch.equal(task.queue[:4], batches[2]) and torch.equal(task.queue[4:], batches[1])
    with pytest.raises(ValueError, match="model.queue_size=8"):
        task.enqueue(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"model.queue_size=8 .*data.batch_size=3 x 1 rank\(s\) x 2 views"):
        task.check_queue_size(3, 1)
    task.check_queue_size(2, 2)  # 2 x 2 ranks x 2 views = 8 keys a step: fine


def test_moco_key_encoder_gets_no_gradient_and_follows_by_momentum():
    task = _moco()
    batch = {"view1": torch.randn(8, 3, 16, 16), "view2": torch.randn(8, 3, 16, 16)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        task.training_step(batch, 0)["loss"].backward()
    key_params = list(task.key_model.parameters())
    assert all(not p.requires_grad and p.grad is None for p in key_params)
    assert any(p.grad is not None for p in task.model.backbone.parameters())
    optimized = {id(p) for group in param_groups(task, 0.05) for p in group["params"]}
    assert not optimized & {id(p) for p in key_params}  # the optimizer never touches the key encoder
    # theta_k <- m theta_k + (1 - m) theta_q with the cosine schedule
    task.total_steps = 10
    with torch.no_grad():
        for q, k in task.query_params():
            q.fill_(1.0)
            k.fill_(0.0)
    m0 = task.momentum_update()
    assert m0 == pytest.approx(0.99)
    assert all(torch.allclose(k, torch.full_like(k, 0.01)) for _, k in task.query_params())
    m1 = task.momentum_update()
    assert m1 == pytest.approx(1 - 0.01 * (1 + math.cos(math.pi * 0.1)) / 2)
    assert all(torch.allclose(k, torch.full_like(k, m1 * 0.01 + (1 - m1))) for _, k in task.query_params())
    assert cosine_momentum(10, 10, 0.99) == 1.0 and cosine_momentum(5, 10, 0.9) == pytest.approx(0.95)


class _CountSteps(L.Callback):
    def __init__(self) -> None:
        self.optimizer_steps = 0
        self.batches = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.optimizer_steps += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1


def test_moco_momentum_update_once_per_optimizer_step_with_accumulation(colour_shards):
    task = _moco(queue_size=64)  # 16 samples x 2 views = 32 keys a step
    keys_before = copy.deepcopy(task.key_model.state_dict())
    counter = _CountSteps()
    dm = WebDataModule(train=colour_shards["train"], pipeline=_pipeline(), batch_size=16, num_workers=0)
    trainer = _trainer(limit_train_batches=4, accumulate_grad_batches=2, callbacks=[counter])
    trainer.fit(task, datamodule=dm)
    assert counter.batches == 4 and counter.optimizer_steps == 2 == trainer.global_step
    assert int(task.momentum_updates) == 2  # not 4: one update per optimizer step
    assert int(task.queue_ptr) == (4 * 32) % 64  # but every batch enqueued its keys
    moved = [not torch.equal(a, b) for a, b in zip(keys_before.values(), task.key_model.state_dict().values())]
    assert any(moved)
    # a queue that the global batch does not divide fails before training, naming the flag
    bad = _moco(queue_size=100)
    with pytest.raises(ValueError, match="model.queue_size=100"):
        _trainer(limit_train_batches=1).fit(bad, datamodule=WebDataModule(
            train=colour_shards["train"], pipeline=_pipeline(), batch_size=16, num_workers=0))


# ------------------------------------------------------------------- probes
def test_weighted_knn_matches_formula():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.7, 0.7]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    queries = torch.tensor([[1.0, 0.2], [0.6, 0.8]])
    k, t = 3, 0.5
    expected = []
    for q in queries:
        sims = torch.nn.functional.normalize(bank, dim=1) @ (q / q.norm())
        top = sims.topk(k)
        scores = [0.0, 0.0]
        for s, i in zip(top.values.tolist(), top.indices.tolist()):
            scores[int(labels[i])] += math.exp(s / t)
        expected.append(int(np.argmax(scores)))
    assert weighted_knn_predict(bank, labels, queries, 2, k=k, temperature=t).tolist() == expected


def test_linear_probe_fits_separable_features():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (300,), generator=g)
    x = torch.randn(300, 8, generator=g) * 0.3 + torch.nn.functional.one_hot(y, 8).float() * 3
    probe = fit_linear_probe(x[:200], y[:200], x[200:], y[200:], 3, l2s=[1e-2, 1e-4])
    assert (probe.predict(x[200:]) == y[200:]).float().mean() == 1.0
    assert probe.l2 in (1e-2, 1e-4)


def test_recall_at_1_is_leave_one_out_nearest_neighbour():
    e = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0], [0.05, 0.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    # nearest other items: 0->4, 1->4, 2->3, 3->2, 4->0 (itself excluded): 2 of 5 share the label
    assert recall_at_1(e, labels).item() == pytest.approx(0.4)


def test_embedding_std_detects_collapse(tmp_path):
    assert embedding_std(torch.ones(64, 16) * 3).item() == pytest.approx(0.0, abs=1e-6)
    spread = embedding_std(torch.randn(4096, 16)).item()
    assert spread == pytest.approx(1 / math.sqrt(16), rel=0.05)
    path = save_embedding_plot(np.random.randn(50, 8), np.arange(50) % 3, ["a", "b", "c"], str(tmp_path))
    assert Path(path).name == "embeddings_pca.png" and Path(path).stat().st_size > 0


def _view_batches(n_batches: int = 4, size: int = 32) -> list[dict[str, torch.Tensor]]:
    """Fixed labelled two-view batches (no augmentation, so two runs see the same data with any RNG state)."""
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(n_batches):
        labels = rng.integers(0, 4, size)
        images = torch.stack([torch.from_numpy(colour_image(int(y), rng)).permute(2, 0, 1).float() / 127.5 - 1
                              for y in labels])
        batches.append({"view1": images, "view2": images.flip(-1), "image": images, "label": torch.from_numpy(labels)})
    return batches


def test_probe_never_updates_the_backbone(tmp_path):
    """The task trains (lr > 0); with the probe and the collapse monitor attached its weights end exactly where
    they end without them, while the probe's own head trains with an optimizer that holds nothing else."""
    from torch.utils.data import DataLoader

    def run(callbacks):
        L.seed_everything(0, verbose=False)
        task = SimCLR(backbone="vit_tiny_patch16_224", backbone_kwargs=TINY_VIT, proj_hidden_dim=32, proj_dim=16,
                      lr=3e-3, warmup_steps=0)
        before = copy.deepcopy(task.model.state_dict())
        trainer = _trainer(default_root_dir=str(tmp_path), callbacks=callbacks, max_epochs=2)
        batches = _view_batches()
        trainer.fit(task, train_dataloaders=DataLoader(batches, batch_size=None),
                    val_dataloaders=DataLoader(batches[:1], batch_size=None))
        return task, trainer, before

    probe, monitor = Probe(num_classes=4, probe_l2=[1e-3]), EmbeddingMonitor(every_n_steps=1)
    task, trainer, before = run([probe, monitor])
    reference, _, _ = run([])
    after, plain = task.model.state_dict(), reference.model.state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in after)  # the task did train
    for name in after:
        assert torch.equal(after[name], plain[name]), name
    head_params = {id(p) for p in probe.head.parameters()}
    assert {id(p) for g in probe.optimizer.param_groups for p in g["params"]} == head_params
    assert int(probe.optimizer.state_dict()["state"][0]["step"]) == 8  # the probe trained on all 2 x 4 batches
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & head_params
    for name in ("val/linear_probe_acc", "val/knn_acc", "train/embedding_std"):
        assert name in trainer.callback_metrics, name


def test_random_init_floor_uses_the_same_protocol(colour_shards, tmp_path):
    """Tested before any training, the model is its random init: the trained and random-init numbers come out of
    one procedure, so they agree exactly; both beat chance (0.25) on colour squares."""
    torch.manual_seed(0)
    task = SimCLR(backbone="vit_tiny_patch16_224", backbone_kwargs=TINY_VIT, proj_hidden_dim=32, proj_dim=16)
    dm = WebDataModule(**colour_shards, pipeline=_pipeline(), batch_size=32, num_workers=0)
    trainer = _trainer(default_root_dir=str(tmp_path), callbacks=[Probe(probe_l2=[1e-3]), EmbeddingMonitor()])
    trainer.test(task, datamodule=dm)
    metrics = trainer.callback_metrics
    assert metrics["test/linear_probe_acc"] == metrics["test/random_init_probe_acc"]
    assert metrics["test/knn_acc"] == metrics["test/random_init_knn_acc"]
    assert metrics["test/knn_acc"] > 0.25
    assert (tmp_path / "embeddings_pca.png").exists()


# ---------------------------------------------------------------- end to end
def _config(tmp_path: Path, model: dict, pipeline: dict, epochs: int = 2, batch_size: int = 32) -> str:
    config = {
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": epochs, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "callbacks": [{"class_path": "mm_lightning.callbacks.probe.Probe", "init_args": {"probe_l2": [1e-3]}},
                                  {"class_path": "mm_lightning.callbacks.embedding_monitor.EmbeddingMonitor"}]},
        "model": model,
        "data": {"batch_size": batch_size, "num_workers": 0, "pipeline": pipeline},
        "logger": "csv",
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def small_shapes(tmp_path_factory) -> dict[str, str]:
    """A small shapes world (6 shape classes, colour and count vary): a random ViT's features do not separate it."""
    from data.prepare import prepare_shapes

    out = tmp_path_factory.mktemp("shapes") / "shapes"
    prepare_shapes(out, train=2048, val=256, test=512, progress=False)
    return {split: str(out / f"shapes-{split}-*.tar") for split in ("train", "val", "test")}


@pytest.mark.slow
def test_simclr_cli_beats_its_random_init_floor(small_shapes, tmp_path):
    """SimCLR through the CLI reports the probe, kNN and their random-init floor, and its representation of shape
    beats the floor (measured: kNN 0.316 vs 0.225, probe 0.357 vs 0.289 after 64 steps; chance 1/6)."""
    vit = {"img_size": 32, "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 3, "mlp_ratio": 2.0,
           "global_pool": "avg"}
    model = {"class_path": "mm_lightning.tasks.simclr.SimCLR",
             "init_args": {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": vit, "proj_hidden_dim": 64,
                           "proj_dim": 32, "temperature": 0.2, "lr": 3e-3}}
    pipeline = {"class_path": "mm_lightning.data.samples.TwoViewPipeline",
                "init_args": {"image_size": 32, "crop_scale": [0.3, 1.0], "blur": 0.0, "jitter": 0.8,
                              "jitter_strength": [0.4, 0.4, 0.4, 0.4], "grayscale": 0.3, "eval_views": True, **NORM}}
    run = tmp_path / "run"
    run_cli("fit", "--config", _config(tmp_path, model, pipeline, epochs=4, batch_size=128), *data_flags(small_shapes),
            f"--trainer.default_root_dir={run}", timeout=1200)
    summary = json.loads((run / "summary.json").read_text())
    for name in ("val/linear_probe_acc", "val/knn_acc", "val/loss", "test/loss", "train/embedding_std"):
        assert name in summary, name
    assert (run / "embeddings_pca.png").exists()
    floor_knn, floor_probe = summary["test/random_init_knn_acc"], summary["test/random_init_probe_acc"]
    assert 1 / 6 < floor_knn < 0.5 and 1 / 6 < floor_probe < 0.5, summary  # a floor with room above it
    assert summary["test/knn_acc"] >= floor_knn + 0.04, summary
    # the probe's gain is smaller and noisier (0.068 and 0.010 in two runs; on 512 test images a difference of two
    # accuracies has an sd of ~0.028): it must not fall below the floor; kNN above carries the margin
    assert summary["test/linear_probe_acc"] >= floor_probe, summary


@pytest.mark.slow
def test_triplet_cli_learns_a_metric(colour_shards, tmp_path):
    model = {"class_path": "mm_lightning.tasks.metric.MetricLearner",
             "init_args": {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": TINY_VIT, "embed_dim": 16,
                           "mining": "semi_hard", "lr": 3e-3}}
    pipeline = {"class_path": "mm_lightning.data.samples.ClassificationPipeline",
                "init_args": {"image_size": 16, "crop_scale": [1.0, 1.0], "hflip": False, **NORM}}
    run = tmp_path / "run"
    run_cli("fit", "--config", _config(tmp_path, model, pipeline, epochs=3), *data_flags(colour_shards),
            f"--trainer.default_root_dir={run}", "--model.init_args.normalize=true")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test/knn_acc"] >= 0.9, summary  # 4 colours; chance is 0.25
    assert summary["test/linear_probe_acc"] >= 0.9, summary
    assert summary["test/recall_at_1"] >= 0.9, summary


@pytest.mark.parametrize("name", ["simclr_shapes", "simclr_shapes_resnet", "moco_shapes", "triplet_digits"])
def test_experiment_configs_build(name, tmp_path, monkeypatch):
    from experiments.run import RUN_DIR_ENV, MMLightningCLI

    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path))  # the CLI sets it; restored after the test

    cli = MMLightningCLI(args=["--config", str(REPO / "experiments" / "configs" / f"{name}.yaml"),
                               "--prepare_data=false", "--logger=none", f"--trainer.default_root_dir={tmp_path}"],
                         run=False)
    assert callable(getattr(cli.model, "embed", None))
    assert any(isinstance(c, Probe) for c in cli.trainer.callbacks)
    if isinstance(cli.model, MoCo):
        cli.model.check_queue_size(cli.datamodule.batch_size, 1)
    assert isinstance(cli.model, (SimCLR, MoCo, MetricLearner))
