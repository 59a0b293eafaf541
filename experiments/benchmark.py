"""Benchmarks of the training path for every task: framework overhead, data path, start-up, presets.

    python -m experiments.benchmark [--experiments vit_shapes clip_shapes ...] [--baseline DIR] [--out DIR]

(a) **Overhead**, per task (classification ``vit_shapes``, CLIP ``clip_shapes``, SimCLR ``simclr_shapes``,
    MoCo ``moco_shapes``, metric learning ``triplet_digits``). The config's network (``task.model``),
    optimizer (AdamW with the task's weight-decay groups, warmup + cosine schedule) and loss, on the same
    in-memory batches of the config's batch size, trained by a bare PyTorch loop (:class:`BareLoop`: the
    task's step written out with the plain ``nn.Module`` and the loss functions) and by the task in
    Lightning's Trainer with ``experiments.run``'s default callbacks and logger (checkpointing, data monitor,
    run summary, learning-rate monitor, W&B offline or CSV) plus the throughput monitor. The two alternate
    step by step in one process (the Trainer's data set runs one bare step before handing over each
    batch), so load changes on a shared machine hit both alike; the ratio (Trainer time / bare time) is the
    median over blocks of steps.
(b) **Data path**, per task: the config's training shards through ``WebDataModule`` and its sample
    pipeline (read, decode, augment, collate) with 0, 1 and 2 workers, in samples/s and samples/s per
    worker; with ``--baseline DIR`` (a checkout of older code) the same for that code, alternating with
    this one in fresh processes.
(c) **Start-up**: seconds from launching ``python -m experiments.run fit`` to the first training step
    (and to the moment the run's modules are imported), for this code and ``--baseline``, alternated.
(d) **Presets**: ``python -m experiments.run fit`` with each preset of ``experiments/configs/presets``
    stacked on the first experiment for a few steps; samples/s and peak memory from ``summary.json``.

Prints the tables and writes ``benchmark.json`` and ``benchmark.md`` into ``--out``. Not a test: timings
depend on the machine and its load; read the ratios.
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

from experiments.benchmark_timing import Interleaved, StepClock, default_callbacks, pick_device, step_times
from experiments.common import load_task_and_data
from mm_lightning.tasks.base import param_groups, warmup_cosine

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "experiments" / "configs"
PRESETS = CONFIGS / "presets"
EXPERIMENTS = ("vit_shapes", "clip_shapes", "simclr_shapes", "moco_shapes", "triplet_digits")


def config_path(name: str) -> str:
    """An experiment name (``clip_shapes``) or a path to a config file."""
    path = Path(name)
    return str(path if path.suffix in (".yaml", ".yml") else CONFIGS / f"{name}.yaml")


def task_kind(task: Any) -> str:
    return {"ImageClassifier": "classification", "CLIPTask": "clip", "SimCLR": "simclr", "MoCo": "moco",
            "MetricLearner": "metric"}.get(type(task).__name__, type(task).__name__)


def make_batches(task: Any, data: Any, count: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """``count`` random batches in the task's batch format, of the config's batch and image size."""
    size = getattr(data.pipeline, "image_size", 224)
    n, kind = data.batch_size, task_kind(task)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        image = torch.randn(n, 3, size, size, generator=g)
        if kind in ("simclr", "moco"):
            batch = {"view1": image, "view2": torch.randn(n, 3, size, size, generator=g)}
        elif kind == "clip":
            tok = task.tokenizer
            lengths = torch.randint(5, 13, (n,), generator=g).clamp(max=tok.context_length)
            mask = (torch.arange(tok.context_length)[None] < lengths[:, None]).long()
            ids = torch.randint(3, tok.vocab_size, (n, tok.context_length), generator=g) * mask
            batch = {"image": image, "input_ids": ids, "attention_mask": mask}
        else:
            classes = getattr(task, "num_classes", None) or 10  # a metric learner may leave it unset
            batch = {"image": image, "label": torch.randint(0, classes, (n,), generator=g)}
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


class BareLoop:
    """The bare PyTorch training loop of a task, one step per call: its ``task.model`` (a copy), AdamW groups,
    schedule and loss, written out without Lightning (the reference the Trainer is compared with)."""

    def __init__(self, task: Any, batches: list, total: int, device: torch.device) -> None:
        self.task, self.kind = task, task_kind(task)
        self.model = copy.deepcopy(task.model).to(device).train()
        groups = param_groups(self.model, task.weight_decay, task.no_weight_decay_extra())
        self.optimizer = torch.optim.AdamW(groups, lr=task.lr, betas=task.betas)
        warm = task.warmup_steps or int(task.warmup_epochs * total)  # as Task.configure_optimizers with max_steps only
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, warm, total, task.min_lr_ratio)
        )
        if self.kind == "moco":
            self.key_model = copy.deepcopy(task.key_model).to(device)
            self.queue, self.ptr = task.queue.detach().clone().to(device), 0
        self.batches, self.total, self.device, self.steps = batches, total, device, 0

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        task, model = self.task, self.model
        if self.kind == "classification":
            return F.cross_entropy(model(batch["image"]), batch["label"], label_smoothing=task.label_smoothing)
        if self.kind == "clip":
            from mm_lightning.losses.clip import clip_loss, siglip_loss

            image, text = model(batch["image"], batch["input_ids"], batch["attention_mask"])
            if task.loss_name == "siglip":
                return siglip_loss(image, text, model.logit_scale.exp(), model.logit_bias, task.gather_with_grad)
            return clip_loss(image, text, model.logit_scale.exp(), task.local_loss, task.gather_with_grad)
        if self.kind == "simclr":
            from mm_lightning.losses.contrastive import nt_xent_loss

            z1, z2 = model.projector(model.backbone(torch.cat([batch["view1"], batch["view2"]]))).chunk(2)
            return nt_xent_loss(z1, z2, task.temperature, gather=task.gather)
        if self.kind == "moco":
            from mm_lightning.losses.contrastive import moco_loss

            v1, v2, n = batch["view1"], batch["view2"], batch["view1"].shape[0]
            q = model.projector(model.backbone(torch.cat([v1, v2]) if task.symmetric else v1))
            with torch.no_grad():
                k2 = F.normalize(self.key_model(v2), dim=1)
                k1 = F.normalize(self.key_model(v1), dim=1) if task.symmetric else None
            queue = self.queue.clone()
            loss = moco_loss(q[:n], k2, queue, task.temperature)
            keys = k2
            if task.symmetric:
                loss = 0.5 * (loss + moco_loss(q[n:], k1, queue, task.temperature))
                keys = torch.cat([k1, k2])
            self.queue[self.ptr : self.ptr + len(keys)] = keys
            self.ptr = (self.ptr + len(keys)) % len(self.queue)
            return loss
        if self.kind == "metric":
            return task.compute_loss(model(batch["image"]), batch["label"])  # the pure loss functions
        raise ValueError(f"no bare loop for {type(task).__name__}")

    def step(self, i: int) -> None:
        loss = self.loss(self.batches[i % len(self.batches)])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.steps += 1
        if self.kind == "clip":
            self.model.clamp_logit_scale(self.task.max_logit_scale)
        elif self.kind == "moco":
            from mm_lightning.tasks.moco import cosine_momentum

            m = cosine_momentum(self.steps - 1, self.total, self.task.base_momentum, self.task.final_momentum)
            with torch.no_grad():
                for q, k in zip(self.model.parameters(), self.key_model.parameters()):
                    k.mul_(m).add_(q.detach(), alpha=1.0 - m)


def overhead(config: str, args: argparse.Namespace) -> dict[str, Any]:
    """(a) for one experiment: the bare loop and the Trainer alternate step by step; per-block time ratios.

    One Trainer fit of ``warmup + rounds * steps`` batches. Its dataset runs one bare-loop step (on its own
    copy of the same initial network, same batch) before yielding each batch, so a bare step and a Trainer
    step always run back to back. The Trainer's time for batch i is the time between the ends of batches
    i-1 and i minus the bare step run in between. Blocks of ``steps`` batches (by default the config's
    logging interval, so each block holds its share of logging) give one ratio each; the median is reported.
    """
    task, data, resolved = load_task_and_data([config], args.set)
    device = pick_device()
    task.to(device)
    trainer_cfg = resolved.get("trainer") or {}
    precision = str(trainer_cfg.get("precision") or "32-true")
    log_every = int(trainer_cfg.get("log_every_n_steps") or 50)
    steps = args.steps or log_every
    total = args.warmup + args.rounds * steps
    batches = make_batches(task, data, 8, device)
    bare = BareLoop(task, batches, total, device)
    dataset = Interleaved(bare, total)
    clock = StepClock(device)
    with tempfile.TemporaryDirectory() as root:
        callbacks, logger = default_callbacks(root, args.logger)
        trainer = L.Trainer(
            accelerator=device.type, devices=1, max_steps=total, precision=precision, logger=logger,
            callbacks=[*callbacks, clock], default_root_dir=root, log_every_n_steps=log_every,
            num_sanity_val_steps=0, limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
        )
        trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(dataset, batch_size=None))
        if args.logger == "wandb" and importlib.util.find_spec("wandb") is not None:
            import wandb

            wandb.finish()
    trainer_steps, bare_steps = step_times(clock, dataset, args.warmup, total)
    rounds = []
    for r in range(args.rounds):
        block = slice(r * steps, (r + 1) * steps)
        t, b = sum(trainer_steps[block]), sum(bare_steps[block])
        rounds.append({"trainer": t, "bare": b, "ratio": t / b})
    bare_step = statistics.median(bare_steps)
    result = {
        "task": type(task).__name__, "device": str(device), "steps_per_round": steps, "warmup": args.warmup,
        "batch_size": data.batch_size, "precision": precision, "logger": args.logger, "log_every_n_steps": log_every,
        "rounds": rounds, "ratio_median": statistics.median(r["ratio"] for r in rounds),
        "ratio_of_totals": sum(trainer_steps) / sum(bare_steps),
        # robust to load spikes, but blind to the occasional logging step's cost: a lower bound
        "ratio_paired_step_median": statistics.median(t / b for t, b in zip(trainer_steps, bare_steps)),
        "bare_step_s": bare_step, "model_samples_per_s": data.batch_size / bare_step,
    }
    print(f"  {Path(config).stem} ({result['task']}): bare {bare_step * 1e3:.1f} ms/step, median ratio "
          f"{result['ratio_median']:.4f} (blocks {', '.join(format(r['ratio'], '.3f') for r in rounds)})", flush=True)
    return result


# ---------------------------------------------------------------------------- (b) and (c): fresh processes
_DATA_PATH = r"""
import json, sys, time
from experiments.common import load_task_and_data
config, workers, batches, overrides = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
_, data, _ = load_task_and_data([config], overrides + [f"data.num_workers={workers}"])
data.setup("fit")
it = iter(data.train_dataloader())
next(it)  # worker start-up and the first shard open
count, start = 0, time.perf_counter()
for _ in range(batches):
    try:
        batch = next(it)
    except StopIteration:
        break
    count += int((batch.get("image") if "image" in batch else batch["view1"]).shape[0])
print("RESULT " + json.dumps({"samples_per_s": count / (time.perf_counter() - start), "samples": count}))
"""

_CLOCK = '''"""Start-up clock for experiments.benchmark: when the run's modules were imported and when its first step began."""
import json, os, time

import lightning as L

IMPORTED = time.time()


class FirstStepClock(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0 and trainer.global_step == 0:
            with open(os.environ["STARTUP_CLOCK_OUT"], "w") as f:
                json.dump({"imported": IMPORTED, "first_step": time.time()}, f)
'''


def _code_env(root: Path, extra_path: str | None = None) -> dict[str, str]:
    path = [str(root)] + ([extra_path] if extra_path else [])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline",
            "WANDB_SILENT": "true"}


def _versions(args: argparse.Namespace) -> list[tuple[str, Path]]:
    return [("current", REPO)] + ([("baseline", Path(args.baseline).resolve())] if args.baseline else [])


def data_path(experiment: str, args: argparse.Namespace, consumption: float | None) -> list[dict[str, Any]]:
    """(b) for one experiment: training samples/s through WebDataModule for each worker count and code version,
    each measurement a fresh process, versions alternating ``--repeats`` times (median reported)."""
    rates: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.repeats):
        for version, root in _versions(args):
            for workers in args.workers:
                cfg = str(Path(root) / "experiments" / "configs" / Path(config_path(experiment)).name)
                proc = subprocess.run(
                    [sys.executable, "-c", _DATA_PATH, cfg, str(workers), str(args.data_batches), json.dumps(args.set)],
                    cwd=root, env=_code_env(root), capture_output=True, text=True, timeout=1200,
                )
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    raise RuntimeError(f"data path of {experiment} ({version}, {workers} workers) failed:\n{proc.stderr[-2000:]}")
                rates.setdefault((version, workers), []).append(json.loads(line[7:])["samples_per_s"])
    rows = []
    for (version, workers), values in rates.items():
        rate = statistics.median(values)
        row = {"experiment": experiment, "code": version, "num_workers": workers, "samples_per_s": rate,
               "samples_per_s_per_worker": rate / max(1, workers), "runs": values}
        if consumption:
            row["x_model_consumption"] = rate / consumption
        rows.append(row)
        print(f"  {experiment} data path ({version}), {workers} worker(s): {rate:.0f} samples/s "
              f"({rate / max(1, workers):.0f} per worker)", flush=True)
    return rows


def startup(experiment: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """(c) for one experiment: seconds from launching ``experiments.run fit`` to its first training step, and to
    the end of its imports, for each code version, alternating ``--repeats`` times (medians reported)."""
    times: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "startup_clock.py").write_text(_CLOCK)
        for r in range(args.repeats):
            for version, root in _versions(args):
                out = Path(tmp) / f"{version}{r}.json"
                cfg = str(Path(root) / "experiments" / "configs" / Path(config_path(experiment)).name)
                cmd = [sys.executable, "-m", "experiments.run", "fit", "--config", cfg, "--trainer.max_steps=1",
                       "--trainer.callbacks+=startup_clock.FirstStepClock", "--test_after_fit=false",
                       "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp}/{version}{r}"]
                env = {**_code_env(root, tmp), "STARTUP_CLOCK_OUT": str(out)}
                launched = time.time()
                proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1200)
                if not out.is_file():
                    raise RuntimeError(f"start-up of {experiment} ({version}) failed:\n{proc.stderr[-2000:]}")
                clock = json.loads(out.read_text())
                times.setdefault(version, []).append((clock["imported"] - launched, clock["first_step"] - launched))
    rows = []
    for version, values in times.items():
        row = {"experiment": experiment, "code": version, "imports_s": statistics.median(v[0] for v in values),
               "first_step_s": statistics.median(v[1] for v in values), "runs": values}
        rows.append(row)
        print(f"  {experiment} start-up ({version}): first step after {row['first_step_s']:.1f} s "
              f"(imports done after {row['imports_s']:.1f} s)", flush=True)
    return rows


def preset_runs(configs: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """(d): a short experiments.run fit per preset; throughput and peak memory from summary.json."""
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
    lines: list[str] = []
    fmt = lambda v, f: format(v, f) if isinstance(v, (int, float)) else ""  # noqa: E731
    if result.get("overhead"):
        lines += ["### Framework overhead", "",
                  "Bare PyTorch loop vs the task in the Trainer (`experiments.run`'s callbacks and logger, throughput "
                  "monitor), steps alternating; ratio = Trainer time / bare time, median over blocks.", "",
                  "| experiment | task | batch | bare ms/step | block ratios | median ratio | ratio of totals |",
                  "|---|---|---|---|---|---|---|"]
        for name, o in result["overhead"].items():
            blocks = ", ".join(f"{r['ratio']:.3f}" for r in o["rounds"])
            lines.append(f"| {name} | {o['task']} | {o['batch_size']} | {o['bare_step_s'] * 1e3:.1f} | {blocks} | "
                         f"**{o['ratio_median']:.4f}** | {o['ratio_of_totals']:.4f} |")
        first = next(iter(result["overhead"].values()))
        lines += ["", f"{first['device']}, {len(first['rounds'])} blocks of the config's logging interval after "
                      f"{first['warmup']} warm-up steps, logger {first['logger']}.", ""]
    if result.get("data_path"):
        lines += ["### Data path", "", "| experiment | code | workers | samples/s | per worker | x model consumption |",
                  "|---|---|---|---|---|---|"]
        for r in result["data_path"]:
            lines.append(f"| {r['experiment']} | {r['code']} | {r['num_workers']} | {r['samples_per_s']:.0f} | "
                         f"{r['samples_per_s_per_worker']:.0f} | {fmt(r.get('x_model_consumption'), '.1f')} |")
        lines.append("")
    if result.get("startup"):
        lines += ["### Start-up to the first training step", "", "| experiment | code | imports done (s) | first step (s) |",
                  "|---|---|---|---|"]
        for r in result["startup"]:
            lines.append(f"| {r['experiment']} | {r['code']} | {r['imports_s']:.2f} | {r['first_step_s']:.2f} |")
        lines.append("")
    if result.get("presets"):
        lines += ["### Presets", "", "| preset | samples/s | step time (s) | peak memory (GB) | MFU | note |", "|---|---|---|---|---|---|"]
        for r in result["presets"]:
            if "skipped" in r or "failed" in r:
                lines.append(f"| {r['preset']} | | | | | {r.get('skipped') or 'failed: ' + r['failed']} |")
                continue
            lines.append(f"| {r['preset']} | {fmt(r['samples_per_s'], '.1f')} | {fmt(r['step_time_s'], '.3f')} | "
                         f"{fmt(r['peak_memory_gb'], '.2f')} | {fmt(r['mfu'], '.3f')} | |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from experiments import benchmark_dpo, benchmark_vlm  # the MLLM/DPO parts (both use experiments.benchmark_timing)

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS),
                        help="experiment configs (names in experiments/configs or paths; default: one per task)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. data.batch_size=64")
    parser.add_argument("--parts", default="overhead,data,startup,presets", help="comma-separated: overhead, data, startup, presets, vlm (per MLLM connector), dpo")
    parser.add_argument("--rounds", type=int, default=5, help="blocks of steps, one ratio each (a)")
    parser.add_argument("--steps", type=int, default=None, help="steps per block (a); default the config's logging interval")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start (a)")
    parser.add_argument("--logger", default="wandb", choices=("wandb", "csv"), help="the Trainer's logger in (a), as experiments.run")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader workers to try (b)")
    parser.add_argument("--data-batches", type=int, default=20, help="batches timed per measurement (b)")
    parser.add_argument("--baseline", default=None, help="a checkout of older code to measure beside this one (b, c)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating measurements per code version (b, c)")
    parser.add_argument("--startup-experiments", nargs="+", default=["clip_shapes"], help="experiments timed in (c)")
    parser.add_argument("--presets", nargs="*", default=None, help="presets to run (d); default all")
    parser.add_argument("--preset-steps", type=int, default=25, help="steps per preset run (d)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--dpo-configs", nargs="+", default=[str(REPO / "experiments/configs/mllm_mlp_shapes.yaml"),
                        str(REPO / "experiments/configs/stages/dpo_shapes.yaml")], help="stacked DPO configs (dpo)")
    for flag, value in benchmark_dpo.DEFAULTS.items():
        parser.add_argument(f"--{flag.replace('_', '-')}", type=int, default=value, help="see experiments.benchmark_dpo")
    parser.add_argument("--out", default=None, help="output directory (default runs/benchmark/<timestamp>)")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    result: dict[str, Any] = {"experiments": args.experiments, "torch": torch.__version__, "threads": torch.get_num_threads(),
                              "baseline": args.baseline}
    if torch.cuda.is_available():
        result["gpu"] = torch.cuda.get_device_name()
    consumption: dict[str, float] = {}
    if "overhead" in parts:
        print("(a) framework overhead: bare PyTorch loop vs Trainer, alternated", flush=True)
        result["overhead"] = {}
        for name in args.experiments:
            result["overhead"][Path(name).stem] = overhead(config_path(name), args)
            consumption[Path(name).stem] = result["overhead"][Path(name).stem]["model_samples_per_s"]
    if "data" in parts:
        print("(b) data path: shard reading + decoding", flush=True)
        result["data_path"] = [row for name in args.experiments
                               for row in data_path(Path(name).stem, args, consumption.get(Path(name).stem))]
    if "startup" in parts:
        print("(c) start-up to the first training step", flush=True)
        result["startup"] = [row for name in args.startup_experiments for row in startup(name, args)]
    if "presets" in parts:
        print("(d) presets and precisions", flush=True)
        result["presets"] = preset_runs([config_path(args.experiments[0])], args)
    if "vlm" in parts:  # experiments/benchmark_vlm.py: the same overhead ratio, per MLLM connector
        print("(e) multimodal LLM: bare PyTorch loop vs Trainer, per connector", flush=True)
        vlm_args = argparse.Namespace(**{**vars(args), "steps": args.steps or 20})
        result["vlm"] = [benchmark_vlm.vlm_overhead(c, vlm_args, args.set) for c in benchmark_vlm.CONFIGS]
    if "dpo" in parts:  # experiments/benchmark_dpo.py: live vs precomputed reference log-probs
        print("(f) DPO: tokens/s with the live and the precomputed reference", flush=True)
        result["dpo"] = benchmark_dpo.dpo_efficiency(args.dpo_configs, args)
    out = Path(args.out or REPO / "runs" / "benchmark" / time.strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    if "vlm" in result:
        table += "\n" + benchmark_vlm.markdown(result["vlm"])
    if "dpo" in result:
        table += "\n" + "\n".join(benchmark_dpo.dpo_markdown(result["dpo"])) + "\n"
    (out / "benchmark.md").write_text(table)
    print("\n" + table)
    print(f"Results: {out / 'benchmark.json'}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
