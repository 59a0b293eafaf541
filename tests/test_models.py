"""mm_lightning.models: every task's network is a plain nn.Module (task.model), rebuilt from a run's checkpoint
without Lightning; the shapes ViT is one registered timm model."""

from __future__ import annotations

import json
import subprocess
import sys

import lightning as L
import pytest
import torch

from mm_lightning.models import CLIP, MetricEmbedder, SSLEncoder, create_backbone, load_model
from mm_lightning.models.vision import VIT_SHAPES
from tests.conftest import REPO

VIT = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}


def _tasks() -> dict[str, L.LightningModule]:
    from mm_lightning.tasks.classification import ImageClassifier
    from mm_lightning.tasks.clip import CLIPTask
    from mm_lightning.tasks.metric import MetricLearner
    from mm_lightning.tasks.moco import MoCo
    from mm_lightning.tasks.simclr import SimCLR

    ssl = dict(backbone="vit_tiny_patch16_224", backbone_kwargs=VIT, proj_hidden_dim=16, proj_dim=8)
    torch.manual_seed(0)
    return {
        "classification": ImageClassifier(backbone="vit_tiny_patch16_224", backbone_kwargs=VIT, num_classes=4),
        "clip": CLIPTask(image_backbone_kwargs=VIT, embed_dim=16, vocab_size=50, context_length=8, text_width=32,
                         text_layers=1, text_heads=2),
        "simclr": SimCLR(**ssl),
        "moco": MoCo(**ssl, queue_size=16),
        "metric": MetricLearner(backbone="vit_tiny_patch16_224", backbone_kwargs=VIT, embed_dim=8),
    }


def _batch(kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    image = torch.randn(4, 3, 16, 16, generator=g)
    if kind in ("simclr", "moco"):
        return {"view1": image, "view2": image.flip(-1)}
    if kind == "clip":
        return {"image": image, "input_ids": torch.randint(3, 50, (4, 8), generator=g),
                "attention_mask": torch.ones(4, 8, dtype=torch.long)}
    return {"image": image, "label": torch.tensor([0, 1, 2, 3])}


def test_every_task_holds_a_plain_model():
    expected = {"clip": CLIP, "simclr": SSLEncoder, "moco": SSLEncoder, "metric": MetricEmbedder}
    for kind, task in _tasks().items():
        assert isinstance(task.model, expected.get(kind, torch.nn.Module)) and not isinstance(task.model, L.LightningModule)
        assert task.optimized_module() is task.model, kind
        trained = {id(p) for p in task.parameters() if p.requires_grad}
        assert trained == {id(p) for p in task.model.parameters() if p.requires_grad}, kind  # nothing trains outside it


def test_models_load_from_a_run_checkpoint_without_lightning(tmp_path):
    """A checkpoint saved by each task's Trainer rebuilds its network in a fresh process that never imports
    Lightning, with the same outputs as the trained task's network."""
    from torch.utils.data import DataLoader

    for kind, task in _tasks().items():
        trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(task, train_dataloaders=DataLoader([_batch(kind)], batch_size=None))
        trainer.save_checkpoint(tmp_path / f"{kind}.ckpt")
        task.eval()
        with torch.no_grad():
            batch = _batch(kind)
            out = task.model(batch["image"], batch["input_ids"], batch["attention_mask"])[1] if kind == "clip" else \
                task.model(batch.get("image", batch.get("view1")))
        torch.save({"batch": batch, "out": out}, tmp_path / f"{kind}.expected.pt")
    script = f"""
import json, sys, torch
from mm_lightning.models import load_model
kinds = {sorted(_tasks())!r}
result = {{}}
for kind in kinds:
    model = load_model({str(tmp_path)!r} + f"/{{kind}}.ckpt")
    expected = torch.load({str(tmp_path)!r} + f"/{{kind}}.expected.pt", weights_only=True)
    batch = expected["batch"]
    with torch.no_grad():
        out = model(batch["image"], batch["input_ids"], batch["attention_mask"])[1] if kind == "clip" else \\
            model(batch.get("image", batch.get("view1")))
    result[kind] = [type(model).__name__, float((out - expected["out"]).abs().max())]
result["lightning_imported"] = any(m == "lightning" or m.startswith(("lightning.", "pytorch_lightning")) for m in sys.modules)
print(json.dumps(result))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result.pop("lightning_imported") is False
    assert {k: v[0] for k, v in result.items()} == {"classification": "VisionTransformer", "clip": "CLIP",
                                                     "metric": "MetricEmbedder", "moco": "SSLEncoder",
                                                     "simclr": "SSLEncoder"}
    for kind, (_, error) in result.items():
        assert error == 0.0, (kind, error)  # the same weights, the same float32 kernels: identical outputs


def test_load_model_names_what_is_wrong(tmp_path):
    torch.save({"state_dict": {"model.w": torch.zeros(1)}}, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="plain.ckpt.*holds no 'model_spec'"):
        load_model(tmp_path / "plain.ckpt")
    spec = {"class": "SSLEncoder", "config": {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": VIT,
                                              "proj_hidden_dim": 16, "proj_dim": 8}}
    torch.save({"state_dict": {"model.w": torch.zeros(1)}, "model_spec": spec}, tmp_path / "wrong.ckpt")
    with pytest.raises(ValueError, match="wrong.ckpt.*do not fit its model spec"):
        load_model(tmp_path / "wrong.ckpt")
    with pytest.raises(ValueError, match="holds no weights under 'ema.module.'"):
        load_model(tmp_path / "wrong.ckpt", prefix="ema.module.")


def test_vit_shapes_is_the_configs_former_vit():
    """The registered vit_shapes equals vit_tiny_patch16_224 with the six configs' former kwargs, weight for weight."""
    torch.manual_seed(0)
    named = create_backbone("vit_shapes", num_classes=6)
    torch.manual_seed(0)
    spelled = create_backbone("vit_tiny_patch16_224", num_classes=6, **VIT_SHAPES)
    a, b = named.state_dict(), spelled.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert sum(p.numel() for p in named.parameters()) == sum(p.numel() for p in spelled.parameters())
    pooled = create_backbone("vit_shapes", global_pool="max", class_token=False)  # kwargs still override
    assert pooled.cls_token is None and pooled(torch.randn(2, 3, 32, 32)).shape == (2, 96)
    with pytest.raises(RuntimeError, match="No pretrained weights"):
        create_backbone("vit_shapes", pretrained=True)
    json.dumps(VIT_SHAPES)  # plain values: a config and a model spec can hold them


def test_the_weight_ema_moves_once_per_optimizer_step_under_gradient_accumulation():
    """timm's EMA follows optimizer steps: 16 micro-batches accumulated 4 at a time are 4 steps, so the average equals
    four updates (at timm's decay for steps 1..4) from the start weights towards the weights after each step."""
    from mm_lightning.tasks.classification import ImageClassifier

    torch.manual_seed(0)
    task = ImageClassifier(backbone="vit_tiny_patch16_224", backbone_kwargs=VIT, num_classes=4, ema_decay=0.5)
    start = {k: v.clone() for k, v in task.model.state_dict().items()}
    after_steps: list[dict[str, torch.Tensor]] = []

    class Record(L.Callback):  # the weights after each optimizer step
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step > len(after_steps):
                after_steps.append({k: v.clone() for k, v in pl_module.model.state_dict().items()})

    g = torch.Generator().manual_seed(1)
    batches = [{"image": torch.randn(4, 3, 16, 16, generator=g), "label": torch.randint(0, 4, (4,), generator=g)}
               for _ in range(16)]
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", accumulate_grad_batches=4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Record()])
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert trainer.global_step == 4 and len(after_steps) == 4
    key = "blocks.0.mlp.fc1.weight"
    expected = start[key]
    for step, weights in enumerate(after_steps, start=1):
        decay = task.ema.get_decay(step)
        expected = decay * expected + (1 - decay) * weights[key]
    torch.testing.assert_close(task.ema.module.state_dict()[key], expected)
