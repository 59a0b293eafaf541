"""Pipeline-parallel training of the ViT classifier with ``torch.distributed.pipelining``.

Lightning has no pipeline strategy (its training step assumes one module computes the whole
loss), so this is a separate entry point that uses the same pieces as ``experiments.run``: the
task and data from the same config files (``ImageClassifier`` builds the timm ViT, ``WebDataModule``
reads the shards), the task's AdamW weight-decay groups and its warmup + cosine schedule.

Each of the N processes holds a contiguous slice of the transformer blocks (stage 0 also the
patch embedding, the last stage also the final norm and head and computes the loss).
A batch is cut into micro-batches that flow through the stages with the GPipe schedule (all
forwards, then all backwards) or 1F1B (one forward, one backward: fewer activations alive);
gradients average over micro-batches, so a step equals one step on the whole batch.

    torchrun --nproc_per_node 2 -m experiments.pipeline --config experiments/configs/vit_shapes.yaml \\
        --steps 200 --microbatches 4 --schedule 1f1b [--out runs/pipeline]

On CPU it runs with gloo; on GPUs with NCCL, one GPU per stage. At the end rank 0 gathers the
stages into one model, evaluates the validation (and test) split and writes ``summary.json`` and
``model.pt`` (the timm model's state dict, loadable into ``ImageClassifier.model``) into ``--out``.
With one process it trains the unsplit model with the same loop (the reference).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from experiments.common import load_task_and_data
from mm_lightning.tasks.base import param_groups, warmup_cosine


class ViTStage(nn.Module):
    """One pipeline stage of a timm ``VisionTransformer``: blocks ``[start, end)`` plus, on the first
    stage, the patch and position embeddings, and on the last the final norm and classification head.

    The parts a stage does not run are removed from its copy of the model, so each process holds
    only its own parameters.
    """

    def __init__(self, vit: nn.Module, start: int, end: int, first: bool, last: bool) -> None:
        super().__init__()
        blocks = list(vit.blocks)
        if not 0 <= start < end <= len(blocks):
            raise ValueError(f"stage blocks [{start}, {end}) outside the model's {len(blocks)} blocks")
        vit.blocks = nn.Sequential(*blocks[start:end])
        if not first:
            vit.patch_embed = nn.Identity()
            for name in ("cls_token", "reg_token", "pos_embed"):
                if getattr(vit, name, None) is not None:
                    setattr(vit, name, None)
        if not last:
            for name in ("norm", "fc_norm", "head_drop", "head"):
                if isinstance(getattr(vit, name, None), nn.Module):
                    setattr(vit, name, nn.Identity())
            if getattr(vit, "attn_pool", None) is not None:
                vit.attn_pool = None
        self.vit = vit
        self.start, self.end, self.first, self.last = start, end, first, last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        if self.first:
            x = vit.patch_embed(x)
            x = vit._pos_embed(x)
            x = vit.patch_drop(x)
            x = vit.norm_pre(x)
        x = vit.blocks(x)
        if self.last:
            x = vit.norm(x)
            x = vit.forward_head(x)
        return x

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """This stage's parameters under the names of the unsplit model (``blocks.{start + i}...``)."""
        out = {}
        for name, value in self.vit.state_dict().items():
            if name.startswith("blocks."):
                index, rest = name[len("blocks."):].split(".", 1)
                name = f"blocks.{self.start + int(index)}.{rest}"
            out[name] = value.detach().cpu()
        return out


def stage_bounds(depth: int, stages: int) -> list[tuple[int, int]]:
    """Split ``depth`` blocks into ``stages`` contiguous slices as evenly as possible."""
    if stages > depth:
        raise ValueError(f"{stages} pipeline stages need at least {stages} transformer blocks, the model has {depth}")
    bounds, start = [], 0
    for s in range(stages):
        size = depth // stages + (1 if s < depth % stages else 0)
        bounds.append((start, start + size))
        start += size
    return bounds


def _batches(loader: Iterable[dict[str, Any]], steps: int) -> Iterator[dict[str, Any]]:
    done = 0
    while done < steps:
        for batch in loader:
            yield batch
            done += 1
            if done >= steps:
                return


def build_stage(model: nn.Module) -> ViTStage:
    """This rank's :class:`ViTStage` of a timm ViT (the whole model with one process), on this rank's device."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    start, end = stage_bounds(len(model.blocks), world)[rank]
    return ViTStage(model, start, end, first=rank == 0, last=rank == world - 1).to(device)


def train_pipeline(
    stage_module: ViTStage,
    loader: Iterable[dict[str, Any]],
    steps: int,
    lr: float,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.999),
    microbatches: int = 4,
    schedule: str = "1f1b",
    lr_lambda: Callable[[int], float] | None = None,
    label_smoothing: float = 0.0,
    log_every: int = 0,
) -> list[float]:
    """Train this rank's stage (from :func:`build_stage`) for ``steps`` batches, pipelined over all processes.

    Every process must build the same model (same seed) and read the same batches (``image``,
    ``label``). With one process (or none initialized) the unsplit model trains with the same loss,
    optimizer (AdamW with the task's weight-decay groups) and schedule. Returns the per-step mean
    loss, identical on every rank. :func:`gather_full_state_dict` reassembles the trained model.
    """
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = next(stage_module.parameters()).device
    optimizer = torch.optim.AdamW(param_groups(stage_module, weight_decay), lr=lr, betas=betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda or (lambda step: 1.0))

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, label_smoothing=label_smoothing)

    runner = None
    if world > 1:
        if schedule not in ("gpipe", "1f1b"):
            raise ValueError(f"--schedule must be gpipe or 1f1b, got {schedule!r}")
        stage = PipelineStage(stage_module, rank, world, device)
        cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        runner = cls(stage, n_microbatches=microbatches, loss_fn=loss_fn)
    losses: list[float] = []
    started = time.perf_counter()
    stage_module.train()
    for step, batch in enumerate(_batches(loader, steps)):
        image, label = batch["image"].to(device), batch["label"].to(device)
        if image.shape[0] % microbatches and runner is not None:
            raise ValueError(f"batch of {image.shape[0]} does not split into --microbatches {microbatches}")
        optimizer.zero_grad(set_to_none=True)
        if runner is None:
            loss = loss_fn(stage_module(image), label)
            loss.backward()
            value = loss.detach()
        else:
            mb_losses: list[torch.Tensor] = []
            if rank == 0:
                runner.step(image)
            elif rank == world - 1:
                runner.step(target=label, losses=mb_losses)
            else:
                runner.step()
            value = torch.stack(mb_losses).mean().detach() if mb_losses else torch.zeros((), device=device)
            dist.broadcast(value, src=world - 1)
        optimizer.step()
        scheduler.step()
        losses.append(float(value))
        if log_every and rank == 0 and (step + 1) % log_every == 0:
            rate = (step + 1) * image.shape[0] / (time.perf_counter() - started)
            print(f"step {step + 1}/{steps}  loss {losses[-1]:.4f}  {rate:.1f} samples/s", flush=True)
    return losses


def gather_full_state_dict(stage: ViTStage) -> dict[str, torch.Tensor] | None:
    """The unsplit model's state dict on rank 0 (``None`` on the other ranks), gathered from the stages."""
    mine = stage.full_state_dict()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return mine
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    if dist.get_rank() != 0:
        return None
    full: dict[str, torch.Tensor] = {}
    for part in parts:
        for name, value in part.items():
            if name in full:
                raise RuntimeError(f"two pipeline stages hold {name}")
            full[name] = value
    return full


# ------------------------------------------------------------------------------------- CLI
@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` over a loader of ``image``/``label`` batches."""
    model.eval()
    correct = total = 0
    loss = 0.0
    for batch in loader:
        logits = model(batch["image"])
        loss += float(F.cross_entropy(logits, batch["label"], reduction="sum"))
        correct += int((logits.argmax(-1) == batch["label"]).sum())
        total += int(batch["label"].numel())
    return {"acc": correct / max(1, total), "loss": loss / max(1, total)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True, help="experiment YAML (repeatable, stacked)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the config's epochs)")
    parser.add_argument("--microbatches", type=int, default=4, help="micro-batches per batch (>= stages)")
    parser.add_argument("--schedule", choices=("gpipe", "1f1b"), default="1f1b")
    parser.add_argument("--out", default=None, help="output directory (default runs/pipeline/<timestamp>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model/data setting, e.g. --set data.batch_size=64")
    args = parser.parse_args(argv)
    if "RANK" in os.environ and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    # the CLI seeds with the config's seed_everything before building: the same weights on every rank
    task, data, merged = load_task_and_data(args.config, args.set)
    if not hasattr(task, "model") or not hasattr(task.model, "blocks"):
        raise SystemExit("error: experiments.pipeline supports timm ViT classifiers (model.init_args.backbone: vit_*)")
    trainer_cfg = merged.get("trainer", {}) or {}
    data.setup("fit")
    train = data.train_dataloader()
    steps = args.steps or len(train) * int(trainer_cfg.get("max_epochs") or 1)
    warmup = task.warmup_steps or int(task.warmup_epochs * len(train))
    lam = (lambda s: 1.0) if task.schedule == "constant" else (lambda s: warmup_cosine(s, warmup, steps, task.min_lr_ratio))
    out = Path(args.out or os.path.join("runs", "pipeline", time.strftime("%Y%m%d-%H%M%S")))
    stage = build_stage(task.model)
    started = time.perf_counter()
    losses = train_pipeline(
        stage, train, steps=steps, lr=task.lr, weight_decay=task.weight_decay, betas=task.betas,
        microbatches=args.microbatches, schedule=args.schedule, lr_lambda=lam,
        label_smoothing=getattr(task, "label_smoothing", 0.0), log_every=20,
    )
    wall = time.perf_counter() - started
    full = gather_full_state_dict(stage)
    if rank == 0:
        fresh, fresh_data, _ = load_task_and_data(args.config, args.set)
        fresh.model.load_state_dict(full)
        summary: dict[str, float] = {"train/loss": losses[-1], "steps": float(steps), "wall_time_s": round(wall, 2)}
        for split in ("val", "test"):
            if fresh_data.specs.get(split) is not None:
                fresh_data.setup("validate" if split == "val" else "test")
                loader = fresh_data.val_dataloader() if split == "val" else fresh_data.test_dataloader()
                summary.update({f"{split}/{k}": v for k, v in evaluate(fresh.model, loader).items()})
        out.mkdir(parents=True, exist_ok=True)
        torch.save(full, out / "model.pt")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary, indent=2))
        print(f"Run directory: {out}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
