"""Benchmarks of the training path: framework overhead, data path, presets and precisions.

    python -m experiments.benchmark [--config experiments/configs/vit_shapes.yaml] [--out DIR]

(a) **Overhead.** The config's model, optimizer (AdamW with the task's weight-decay groups and
    warmup + cosine schedule), batch size and the same in-memory batches, trained by a bare PyTorch
    loop and by our task in Lightning's Trainer with ``experiments.run``'s default callbacks and
    logger (checkpointing, data monitor, run summary, learning-rate monitor, W&B offline or CSV) plus
    the throughput monitor. The two alternate step by step in one process (the Trainer's data set
    runs one bare step before handing over each batch), so load changes on a shared machine hit both
    alike; the reported ratio (Trainer time / bare time) is the median over blocks of steps.
(b) **Data path.** The config's training shards through ``WebDataModule`` and its sample pipeline
    (read, decode, augment, collate) with 0, 1 and 2 workers, in samples/s, against the model's
    consumption (batch size / bare step time).
(c) **Presets.** ``python -m experiments.run fit`` with each preset of ``experiments/configs/presets``
    stacked on the config for a few steps; samples/s and peak memory come from the run's
    ``summary.json`` (``ThroughputMonitor``). Presets that cannot run here (DeepSpeed and
    Transformer Engine without CUDA) are listed with the reason.

Prints the tables and writes ``benchmark.json`` and ``benchmark.md`` into ``--out``. Not a test:
timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from experiments.common import load_task_and_data
from mm_lightning.tasks.base import param_groups, warmup_cosine

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "experiments" / "configs" / "presets"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def make_batches(task: Any, data: Any, count: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """``count`` random image batches of the config's batch and image size, on ``device``."""
    size = getattr(data.pipeline, "image_size", 224)
    classes = getattr(task, "num_classes", 10)
    g = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.randn(data.batch_size, 3, size, size, generator=g).to(device),
            "label": torch.randint(0, classes, (data.batch_size,), generator=g).to(device),
        }
        for _ in range(count)
    ]


class BareLoop:
    """The bare PyTorch training loop, one step per call: the task's model, AdamW groups and schedule."""

    def __init__(self, task: Any, init: dict[str, torch.Tensor], batches: list, total: int, device: torch.device) -> None:
        self.model = copy.deepcopy(task.model).to(device)
        self.model.load_state_dict(init)
        self.model.train()
        self.optimizer = torch.optim.AdamW(param_groups(self.model, task.weight_decay), lr=task.lr, betas=task.betas)
        warm = task.warmup_steps or int(task.warmup_epochs * total)  # as Task.configure_optimizers with max_steps only
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, warm, total, task.min_lr_ratio)
        )
        self.smoothing = getattr(task, "label_smoothing", 0.0)
        self.batches = batches
        self.device = device

    def step(self, i: int) -> None:
        batch = self.batches[i % len(self.batches)]
        loss = F.cross_entropy(self.model(batch["image"]), batch["label"], label_smoothing=self.smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()


class Interleaved(torch.utils.data.IterableDataset):
    """Yields the Trainer's batches and runs one bare-loop step (timed) before each: the two alternate step by step."""

    def __init__(self, bare: BareLoop, total: int) -> None:
        self.bare, self.total = bare, total
        self.intervals: list[tuple[float, float]] = []

    def __iter__(self):
        for i in range(self.total):
            _sync(self.bare.device)
            start = time.perf_counter()
            self.bare.step(i)
            _sync(self.bare.device)
            self.intervals.append((start, time.perf_counter()))
            yield self.bare.batches[i % len(self.bare.batches)]

    def __len__(self) -> int:
        return self.total


class StepClock(L.Callback):
    """The time at the end of every training batch (after a device sync)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        _sync(self.device)
        self.ends.append(time.perf_counter())


def default_callbacks(root: str, logger: str) -> tuple[list[L.Callback], Any]:
    """``experiments.run``'s default callbacks and logger (with the throughput monitor)."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from mm_lightning.callbacks.data_monitor import DataMonitor
    from mm_lightning.callbacks.run_summary import RunSummary
    from mm_lightning.callbacks.throughput import ThroughputMonitor

    callbacks = [
        ModelCheckpoint(dirpath=os.path.join(root, "checkpoints"), filename="best", save_last=True, monitor=None),
        DataMonitor(),
        RunSummary(),
        LearningRateMonitor(logging_interval="step"),
        ThroughputMonitor(),
    ]
    if logger == "wandb" and importlib.util.find_spec("wandb") is not None:
        from lightning.pytorch.loggers import WandbLogger

        return callbacks, WandbLogger(save_dir=root, project="mm-lightning-benchmark", offline=True)
    from lightning.pytorch.loggers import CSVLogger

    return callbacks, CSVLogger(save_dir=root, name="", version="")


def overhead(configs: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """(a): the bare loop and the Trainer alternate step by step; per-block time ratios.

    One Trainer fit of ``warmup + rounds * steps`` batches. Its dataset runs one bare-loop step
    (on its own copy of the same initial weights, same batch) before yielding each batch, so a
    bare step and a Trainer step always run back to back. The Trainer's time for batch i is the
    time between the ends of batches i-1 and i minus the bare step(s) run in between. Blocks of
    ``steps`` batches (a multiple of the logging interval, so each holds its share of logging)
    give one ratio each; the median over blocks is reported.
    """
    L.seed_everything(0, verbose=False)
    task, data, merged = load_task_and_data(configs, args.set)
    device = _device()
    init = {k: v.detach().clone() for k, v in task.model.state_dict().items()}
    task.to(device)
    batches = make_batches(task, data, 8, device)
    precision = str((merged.get("trainer") or {}).get("precision") or "32-true")
    log_every = int((merged.get("trainer") or {}).get("log_every_n_steps") or 50)
    total = args.warmup + args.rounds * args.steps
    bare = BareLoop(task, init, batches, total, device)
    dataset = Interleaved(bare, total)
    clock = StepClock(device)
    with tempfile.TemporaryDirectory() as root:
        callbacks, logger = default_callbacks(root, args.logger)
        trainer = L.Trainer(
            accelerator=device.type, devices=1, max_steps=total, precision=precision, logger=logger,
            callbacks=[*callbacks, clock], default_root_dir=root, log_every_n_steps=log_every,
            num_sanity_val_steps=0, limit_val_batches=0,
        )
        trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(dataset, batch_size=None))
        if args.logger == "wandb" and importlib.util.find_spec("wandb") is not None:
            import wandb

            wandb.finish()
    ends, intervals = clock.ends, dataset.intervals
    trainer_steps, bare_steps = [], []
    for i in range(args.warmup, total):
        window = (ends[i - 1], ends[i])
        inside = sum(b - a for a, b in intervals if a >= window[0] and b <= window[1])
        trainer_steps.append(window[1] - window[0] - inside)
        bare_steps.append(intervals[i][1] - intervals[i][0])
    rounds = []
    for r in range(args.rounds):
        block = slice(r * args.steps, (r + 1) * args.steps)
        t, b = sum(trainer_steps[block]), sum(bare_steps[block])
        rounds.append({"trainer": t, "bare": b, "ratio": t / b})
        print(f"  block {r + 1}/{args.rounds}: bare {b / args.steps * 1e3:.1f} ms/step, "
              f"trainer {t / args.steps * 1e3:.1f} ms/step, ratio {t / b:.4f}", flush=True)
    bare_step = statistics.median(bare_steps)
    return {
        "device": str(device), "steps_per_round": args.steps, "warmup": args.warmup, "batch_size": data.batch_size,
        "precision": precision, "logger": args.logger, "log_every_n_steps": log_every, "rounds": rounds,
        "ratio_median": statistics.median(r["ratio"] for r in rounds),
        "ratio_of_totals": sum(trainer_steps) / sum(bare_steps),
        # robust to load spikes, but blind to the occasional logging step's cost: a lower bound
        "ratio_paired_step_median": statistics.median(t / b for t, b in zip(trainer_steps, bare_steps)),
        "bare_step_s": bare_step, "model_samples_per_s": data.batch_size / bare_step,
    }


def data_path(configs: list[str], args: argparse.Namespace, consumption: float | None) -> list[dict[str, Any]]:
    """(b): training batches per second through WebDataModule for 0/1/2 workers."""
    rows = []
    for workers in args.workers:
        _, data, _ = load_task_and_data(configs, args.set + [f"data.num_workers={workers}"])
        data.setup("fit")
        loader = data.train_dataloader()
        it = iter(loader)
        next(it)  # worker start-up and the first shard open
        count = 0
        start = time.perf_counter()
        for _ in range(args.data_batches):
            try:
                batch = next(it)
            except StopIteration:
                break
            count += int(batch["image"].shape[0]) if "image" in batch else data.batch_size
        elapsed = time.perf_counter() - start
        rate = count / max(elapsed, 1e-9)
        row = {"num_workers": workers, "samples_per_s": rate, "samples": count}
        if consumption:
            row["x_model_consumption"] = rate / consumption
        rows.append(row)
        print(f"  data path, {workers} worker(s): {rate:.0f} samples/s" + (f" = {rate / consumption:.1f}x the model" if consumption else ""), flush=True)
        del it, loader
    return rows


def preset_runs(configs: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """(c): a short experiments.run fit per preset; throughput and peak memory from summary.json."""
    cuda = torch.cuda.is_available()
    two = [] if cuda else ["--trainer.devices=2"]
    plan: list[tuple[str, list[str], list[str]]] = [
        ("32-true (config)", [], []),
        ("bf16_mixed", ["bf16_mixed.yaml"], []),
        ("fp16_mixed", ["fp16_mixed.yaml"], []),
        ("bf16_true", ["bf16_true.yaml"], []),
        ("fp8_transformer_engine", ["fp8_transformer_engine.yaml"], []),
        ("grad_accum", ["grad_accum.yaml"], []),
        ("activation_checkpointing", ["activation_checkpointing.yaml"], []),
        ("compile", ["compile.yaml"], []),
        ("ddp", ["ddp.yaml"], two),
        ("fsdp", ["fsdp.yaml"], two),
        ("tensor_parallel", ["tensor_parallel.yaml"], ["--trainer.devices=2", "--model.init_args.backbone_kwargs.num_heads=2"]),
        ("deepspeed_zero2", ["deepspeed_zero2.yaml"], []),
        ("deepspeed_zero3", ["deepspeed_zero3.yaml"], []),
    ]
    if args.presets:
        plan = [p for p in plan if p[0] in args.presets or p[0].split(" ")[0] in args.presets]
    rows = []
    for name, presets, extra in plan:
        reason = None
        if name.startswith("deepspeed") and not cuda:
            reason = "Lightning runs DeepSpeed on CUDA only"
        elif name.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
            reason = "deepspeed not installed"
        elif name == "fp8_transformer_engine" and (not cuda or importlib.util.find_spec("transformer_engine") is None):
            reason = "needs CUDA and transformer_engine"
        elif name == "tensor_parallel" and cuda and torch.cuda.device_count() < 2:
            reason = "needs 2 GPUs"
        if reason:
            rows.append({"preset": name, "skipped": reason})
            print(f"  {name}: skipped ({reason})", flush=True)
            continue
        with tempfile.TemporaryDirectory() as root:
            cmd = [sys.executable, "-m", "experiments.run", "fit"]
            for c in configs:
                cmd += ["--config", c]
            for p in presets:
                cmd += ["--config", str(PRESETS / p)]
            cmd += ["--config", str(PRESETS / "throughput.yaml"), f"--trainer.max_steps={args.preset_steps}",
                    "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--test_after_fit=false",
                    "--logger=csv", "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=5",
                    f"--trainer.default_root_dir={root}/run", *extra, *[f"--{s}" if not s.startswith("--") else s for s in args.set]]
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            wall = time.perf_counter() - start
            summary_path = Path(root) / "run" / "summary.json"
            if proc.returncode != 0 or not summary_path.is_file():
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                rows.append({"preset": name, "failed": tail[0][:300]})
                print(f"  {name}: FAILED {tail[0][:300]}", flush=True)
                continue
            summary = json.loads(summary_path.read_text())
        rate = summary.get("perf/epoch_samples_per_s") or summary.get("perf/samples_per_s")
        row = {
            "preset": name, "samples_per_s": rate, "step_time_s": summary.get("perf/step_time"),
            "peak_memory_gb": summary.get("perf/max_memory_gb"), "mfu": summary.get("perf/mfu"),
            "train_loss": summary.get("train/loss"), "wall_s": round(wall, 1),
        }
        rows.append(row)
        mfu = f", MFU {row['mfu']:.3f}" if row["mfu"] else ""
        print(f"  {name}: {rate or float('nan'):.1f} samples/s, peak {row['peak_memory_gb'] or float('nan'):.2f} GB{mfu}", flush=True)
    return rows


def markdown(result: dict[str, Any]) -> str:
    lines = []
    if "overhead" in result:
        o = result["overhead"]
        lines += [
            "### Framework overhead", "",
            f"{o['device']}, batch {o['batch_size']}, {o['precision']}, bare and Trainer steps alternating, "
            f"{len(o['rounds'])} blocks of {o['steps_per_round']} steps (after {o['warmup']} warm-up steps), "
            f"logger {o['logger']} every {o['log_every_n_steps']} steps.", "",
            "| block | bare ms/step | Trainer ms/step | ratio |", "|---|---|---|---|",
        ]
        for i, r in enumerate(o["rounds"]):
            lines.append(f"| {i + 1} | {r['bare'] / o['steps_per_round'] * 1e3:.1f} | {r['trainer'] / o['steps_per_round'] * 1e3:.1f} | {r['ratio']:.4f} |")
        lines += ["", f"**Median ratio {o['ratio_median']:.4f}** (ratio of totals {o['ratio_of_totals']:.4f}, median of "
                  f"per-step pairs {o.get('ratio_paired_step_median', float('nan')):.4f}); the model consumes "
                  f"{o['model_samples_per_s']:.0f} samples/s.", ""]
    if "data_path" in result:
        lines += ["### Data path", "", "| workers | samples/s | x model consumption |", "|---|---|---|"]
        for r in result["data_path"]:
            x = r.get("x_model_consumption")
            lines.append(f"| {r['num_workers']} | {r['samples_per_s']:.0f} | {x:.1f}x |" if x else f"| {r['num_workers']} | {r['samples_per_s']:.0f} | |")
        lines.append("")
    if "presets" in result:
        lines += ["### Presets", "", "| preset | samples/s | step time (s) | peak memory (GB) | MFU | note |", "|---|---|---|---|---|---|"]
        for r in result["presets"]:
            if "skipped" in r or "failed" in r:
                lines.append(f"| {r['preset']} | | | | | {r.get('skipped') or 'failed: ' + r['failed']} |")
                continue
            fmt = lambda v, f: format(v, f) if isinstance(v, (int, float)) else ""  # noqa: E731
            lines.append(f"| {r['preset']} | {fmt(r['samples_per_s'], '.1f')} | {fmt(r['step_time_s'], '.3f')} | "
                         f"{fmt(r['peak_memory_gb'], '.2f')} | {fmt(r['mfu'], '.3f')} | |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=None, help="experiment config(s) (default vit_shapes.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. data.batch_size=64")
    parser.add_argument("--parts", default="overhead,data,presets", help="comma-separated: overhead, data, presets, vlm")
    parser.add_argument("--rounds", type=int, default=5, help="blocks of steps, one ratio each (a)")
    parser.add_argument("--steps", type=int, default=20, help="steps per block; a multiple of the logging interval (a)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start (a)")
    parser.add_argument("--logger", default="wandb", choices=("wandb", "csv"), help="the Trainer's logger in (a), as experiments.run")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader workers to try (b)")
    parser.add_argument("--data-batches", type=int, default=30, help="batches timed per worker setting (b)")
    parser.add_argument("--presets", nargs="*", default=None, help="presets to run (c); default all")
    parser.add_argument("--preset-steps", type=int, default=25, help="steps per preset run (c)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="output directory (default runs/benchmark/<timestamp>)")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = args.config or [str(REPO / "experiments" / "configs" / "vit_shapes.yaml")]
    parts = set(args.parts.split(","))
    result: dict[str, Any] = {"configs": configs, "torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        result["gpu"] = torch.cuda.get_device_name()
    consumption = None
    if "overhead" in parts:
        print("(a) framework overhead: bare PyTorch loop vs Trainer, alternated", flush=True)
        result["overhead"] = overhead(configs, args)
        consumption = result["overhead"]["model_samples_per_s"]
    if "data" in parts:
        print("(b) data path: shard reading + decoding", flush=True)
        result["data_path"] = data_path(configs, args, consumption)
    if "presets" in parts:
        print("(c) presets and precisions", flush=True)
        result["presets"] = preset_runs(configs, args)
    if "vlm" in parts:  # the multimodal LLM per connector (experiments/benchmark_vlm.py)
        from experiments import benchmark_vlm

        print("(d) multimodal LLM per connector: bare PyTorch loop vs Trainer, alternated", flush=True)
        result["vlm"] = [benchmark_vlm.vlm_overhead(c, args, args.set) for c in (args.config or benchmark_vlm.CONFIGS)]
    out = Path(args.out or REPO / "runs" / "benchmark" / time.strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    if "vlm" in result:
        from experiments.benchmark_vlm import markdown as vlm_markdown

        table += "\n" + vlm_markdown(result["vlm"])
    (out / "benchmark.md").write_text(table)
    print("\n" + table)
    print(f"Results: {out / 'benchmark.json'}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
