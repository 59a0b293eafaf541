"""The 2-process DDP run of tests/test_ddp.py, and the pieces its 1-process references share.

Launched as ``torchrun --nproc_per_node 2 tests/dist_ddp.py OUT_DIR SHARD_SPEC`` (gloo): Lightning's DDP
strategy on 2 CPU processes trains a tiny ViT for :data:`EPOCHS` epochs on the real WebDataModule reading
SHARD_SPEC (shards the test wrote with the project's writer), per-rank batch :data:`GLOBAL_BATCH` / 2.
Each rank writes ``OUT_DIR/rank<r>.pt``: per step, the keys, images and labels of the batch it trained on,
its local loss and the learning rate it applied, and the model's weights before and after training.

Float64 (``precision="64-true"``): the run checks identities (DDP's averaged gradients == the gradient of the
global batch), and in float64 the 2-process and 1-process steps agree to ~1e-13, so the test's tolerance
(:data:`LOSS_ATOL`) sits far below what a real difference (one sample, one step of lr) makes.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script by torchrun

import lightning as L  # noqa: E402
import torch  # noqa: E402

from mm_lightning.data.samples import ClassificationPipeline  # noqa: E402

GLOBAL_BATCH = 32
EPOCHS = 2
NUM_WORKERS = 2  # loader workers per rank: the split by worker is exercised along with the split by rank
SHUFFLE_BUFFER = 50
LOSS_ATOL = 1e-9  # float64; a real difference is > 1e-4 (see the test)


class KeyedPipeline(ClassificationPipeline):
    """ClassificationPipeline that keeps each sample's ``__key__`` (batch key ``key``: a list of strings),
    so a test can see which samples a rank trained on. 16 px, no augmentation."""

    def __init__(self) -> None:
        super().__init__(16, (1.0, 1.0), False, (0.5,) * 3, (0.5,) * 3)

    def decode(self, sample: dict[str, Any], training: bool) -> dict[str, Any]:
        return {**super().decode(sample, training), "key": sample["__key__"]}


def make_datamodule(spec: str, batch_size: int):
    from mm_lightning.data.datamodule import WebDataModule

    return WebDataModule(train=spec, pipeline=KeyedPipeline(), batch_size=batch_size, num_workers=NUM_WORKERS,
                         shuffle_buffer=SHUFFLE_BUFFER, seed=3)


def make_task():
    """A tiny ViT (LayerNorm only, no dropout), warmup + cosine so the lr changes at every step; the same
    weights on every call (seeded)."""
    from mm_lightning.tasks.classification import ImageClassifier

    L.seed_everything(7, verbose=False)
    return ImageClassifier(
        backbone="vit_tiny_patch16_224",
        backbone_kwargs={"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0},
        num_classes=4, lr=3e-3, weight_decay=0.05, warmup_steps=3, schedule="cosine",
    )


def trainer_kwargs() -> dict[str, Any]:
    return {"accelerator": "cpu", "precision": "64-true", "max_epochs": EPOCHS, "logger": False,
            "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
            "num_sanity_val_steps": 0, "limit_val_batches": 0}


class StepRecorder(L.Callback):
    """Per step on this rank: the batch (keys, images, labels), the lr the optimizer applies, the local loss;
    the weights before the first and after the last step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.initial: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.initial = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.steps.append({
            "epoch": trainer.current_epoch, "keys": list(batch.get("key", [])), "image": batch["image"].detach().clone(),
            "label": batch["label"].detach().clone(), "lr": trainer.optimizers[0].param_groups[0]["lr"],
        })

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.steps[-1]["loss"] = float(outputs["loss"].detach())

    def result(self, pl_module: L.LightningModule) -> dict[str, Any]:
        return {"steps": self.steps, "initial": self.initial,
                "final": {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}}


class LrPerRank(L.Callback):
    """For the CLI run: the lr each rank's optimizer applies at every step (one per parameter group), written
    at the end of fit to ``<run dir>/lr-rank<r>.json`` (the loggers write rank 0's only)."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.lrs.append([group["lr"] for group in trainer.optimizers[0].param_groups])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = Path(trainer.default_root_dir) / f"lr-rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"world_size": trainer.world_size, "lrs": self.lrs}))


def main() -> None:
    warnings.filterwarnings("ignore")
    out, spec = Path(sys.argv[1]), sys.argv[2]
    out.mkdir(parents=True, exist_ok=True)
    task, recorder = make_task(), StepRecorder()
    trainer = L.Trainer(devices=2, strategy="ddp", callbacks=[recorder], **trainer_kwargs())
    trainer.fit(task, datamodule=make_datamodule(spec, GLOBAL_BATCH // 2))
    torch.save({"world_size": trainer.world_size, **recorder.result(task)}, out / f"rank{trainer.global_rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    print(f"rank {os.environ.get('RANK')} done", flush=True)


if __name__ == "__main__":
    main()
