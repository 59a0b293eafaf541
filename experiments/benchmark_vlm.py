"""Benchmark of the multimodal LLM per connector: tokens/s, parameters and the framework's overhead.

    python -m experiments.benchmark_vlm [--config experiments/configs/mllm_mlp_shapes.yaml ...] [--out DIR]

For each config (by default the three shapes configs: mlp, qformer, xattn), the task's training
step (instruct stage: frozen tower, connector + LM) on the same in-memory training batches is run
by a bare PyTorch loop (a copy of the task: its ``forward``, its AdamW groups and schedule) and by
Lightning's Trainer with ``experiments.run``'s default callbacks and logger, alternating step by
step exactly as ``experiments.benchmark``'s overhead part does (its ``Interleaved`` / ``StepClock``).
Reported per connector: LM tokens per training step (non-padding, image tokens included), tokens/s
of the bare loop and of the Trainer, parameters (total / trainable) and the overhead ratio (Trainer
time / bare time, median over blocks of steps). ``experiments.benchmark --parts vlm`` calls
:func:`vlm_overhead` too.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from mm_lightning.tasks.base import warmup_cosine

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [str(REPO / "experiments" / "configs" / f"mllm_{k}_shapes.yaml") for k in ("mlp", "qformer", "xattn")]


def training_batches(data: Any, count: int, device: torch.device) -> list[dict[str, Any]]:
    """The first ``count`` training batches of the config's data module, held in memory on ``device``."""
    data.setup("fit")
    batches = []
    for batch in data.train_dataloader():
        batch.pop("skipped", None)
        batches.append({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        if len(batches) == count:
            break
    return batches


class BareVLMLoop:
    """The bare PyTorch loop on a copy of the task: ``task(batch).loss``, backward, AdamW step, schedule."""

    def __init__(self, task: Any, batches: list[dict[str, Any]], total: int, device: torch.device) -> None:
        self.task = copy.deepcopy(task).to(device)
        self.task.train()
        groups = self.task.optimizer_param_groups()
        self.optimizer = torch.optim.AdamW(groups, lr=task.lr, betas=task.betas)
        warm = task.warmup_steps or int(task.warmup_epochs * total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, warm, total, task.min_lr_ratio)
        )
        self.batches = batches
        self.device = device

    def step(self, i: int) -> None:
        loss = self.task(self.batches[i % len(self.batches)]).loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()


def vlm_overhead(config: str, args: argparse.Namespace, overrides: list[str] | None = None) -> dict[str, Any]:
    """One connector's row: parameters, tokens/s of the bare loop and of the Trainer, and the overhead ratio."""
    from experiments.benchmark_timing import Interleaved, StepClock, default_callbacks, pick_device, step_times
    from experiments.common import load_task_and_data

    L.seed_everything(0, verbose=False)
    task, data, merged = load_task_and_data([config], overrides or [])
    device = pick_device()
    task.to(device)
    batches = training_batches(data, 8, device)
    tokens = statistics.mean(float(b["attention_mask"].sum()) for b in batches)
    precision = str((merged.get("trainer") or {}).get("precision", "32-true"))
    log_every = int((merged.get("trainer") or {}).get("log_every_n_steps", 50))
    steps = args.steps or log_every  # experiments.benchmark's default: the config's logging interval
    total = args.warmup + args.rounds * steps
    bare = BareVLMLoop(task, batches, total, device)
    dataset = Interleaved(bare, total)
    clock = StepClock(device)
    with tempfile.TemporaryDirectory() as root:
        callbacks, logger = default_callbacks(root, args.logger)
        trainer = L.Trainer(
            accelerator=device.type, devices=1, max_steps=total, precision=precision, logger=logger,
            callbacks=[*callbacks, clock], default_root_dir=root, log_every_n_steps=log_every,
            num_sanity_val_steps=0, limit_val_batches=0, enable_progress_bar=False,
        )
        trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(dataset, batch_size=None, collate_fn=lambda b: b))
        if args.logger == "wandb":
            import wandb

            wandb.finish()
    trainer_steps, bare_steps = step_times(clock, dataset, args.warmup, total)
    ratios = []
    for r in range(args.rounds):
        block = slice(r * steps, (r + 1) * steps)
        ratios.append(sum(trainer_steps[block]) / sum(bare_steps[block]))
    counts = task.parameter_counts()
    row = {
        "config": Path(config).name, "connector": task.hparams["connector"], "image_tokens": task.num_image_tokens,
        "batch_size": data.batch_size, "tokens_per_step": tokens, "params_total": counts["total"],
        "params_trainable": counts["trainable"], "bare_tokens_per_s": tokens / statistics.median(bare_steps),
        "trainer_tokens_per_s": tokens / statistics.median(trainer_steps), "ratio_median": statistics.median(ratios),
        "ratios": ratios, "precision": precision, "device": str(device),
    }
    print(f"  {row['connector']}: {row['trainer_tokens_per_s']:.0f} tokens/s (bare {row['bare_tokens_per_s']:.0f}), "
          f"params {counts['total']:,} / trainable {counts['trainable']:,}, overhead ratio {row['ratio_median']:.4f}",
          flush=True)
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["### Multimodal LLM per connector", "",
             "| connector | image tokens | tokens/step | tokens/s (Trainer) | tokens/s (bare) | params total | trainable | overhead ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['connector']} | {r['image_tokens']} | {r['tokens_per_step']:.0f} | {r['trainer_tokens_per_s']:.0f} | "
                     f"{r['bare_tokens_per_s']:.0f} | {r['params_total']:,} | {r['params_trainable']:,} | {r['ratio_median']:.4f} |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=5, help="blocks of steps, one ratio each")
    parser.add_argument("--steps", type=int, default=None, help="steps per block (default: the config's logging interval)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start")
    parser.add_argument("--logger", default="wandb", choices=("wandb", "csv"), help="the Trainer's logger, as experiments.run")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    import os

    parser = argparse.ArgumentParser(prog="python -m experiments.benchmark_vlm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", default=None, help="MLLM config(s) (default: the three shapes configs)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every config")
    parser.add_argument("--out", default=None, help="output directory (default runs/benchmark_vlm/<timestamp>)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    print("multimodal LLM: bare PyTorch loop vs Trainer, alternated, per connector", flush=True)
    rows = [vlm_overhead(c, args, args.set) for c in (args.config or CONFIGS)]
    out = Path(args.out or REPO / "runs" / "benchmark_vlm" / time.strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark_vlm.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = markdown(rows)
    (out / "benchmark_vlm.md").write_text(table)
    print("\n" + table + f"Results: {out / 'benchmark_vlm.json'}")
    return rows


if __name__ == "__main__":
    main()
