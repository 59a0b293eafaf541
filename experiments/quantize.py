"""Quantize a trained model for inference and compare it with the float model.

    python -m experiments.quantize --ckpt RUN/checkpoints/best.ckpt --method int8-dynamic

Builds the task and data from the run's ``config.yaml`` (``RUN`` = the checkpoint's run
directory; ``--config`` to give others), loads the checkpoint, and measures on CPU for the float
model and for the quantized one: the task's test metrics (``trainer.test`` on the test split),
the size of the model's weights on disk (``torch.save`` of its state dict), and the median
latency of one test batch (``predict_step``). Writes ``quantization.json`` and
``quantization.md`` into the run directory (rows accumulate over methods) and the quantized
weights into ``RUN/quantized/<method>.pt``.

Methods: ``int8-dynamic``, ``int8-weight-only``, ``int4-weight-only`` (see
:mod:`mm_lightning.quantization` for torchao's config of each). A model
trained with ``presets/qat.yaml`` is quantized the same way, with the method it trained for.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from experiments.common import load_task_and_data
from mm_lightning.quantization import METHODS, QuantizationUnavailable, quantize_model


def run_dir_of(ckpt: Path) -> Path:
    """``RUN`` for ``RUN/checkpoints/x.ckpt`` (else the checkpoint's folder)."""
    parent = ckpt.resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def load_checkpoint(task: nn.Module, ckpt: Path) -> None:
    """Load a Lightning checkpoint file's ``state_dict`` into ``task`` (strict)."""
    if ckpt.is_dir():
        raise SystemExit(
            f"error: --ckpt {ckpt} is a distributed (sharded) checkpoint folder: convert it to one file with"
            f" `python -m lightning.pytorch.utilities.consolidate_checkpoint {ckpt}`, or train with"
            " save_distributed_checkpoint: false"
        )
    if not ckpt.is_file():
        raise SystemExit(f"error: --ckpt {ckpt}: no such checkpoint file")
    from mm_lightning.checkpoint import UnsafeCheckpointError, state_dict_of

    try:
        task.load_state_dict(state_dict_of(ckpt, "--ckpt"))
    except (UnsafeCheckpointError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None


def inference_module(task: nn.Module) -> nn.Module:
    """The module whose weights a deployment ships: the EMA weights when the task evaluates them, else the trained module."""
    eval_model = getattr(task, "_eval_model", None)
    if callable(eval_model):
        return eval_model()
    trained = getattr(task, "optimized_module", None)
    return trained() if callable(trained) else task


def size_on_disk(module: nn.Module, path: Path | None = None) -> int:
    """Bytes of ``torch.save(module.state_dict())`` (written to ``path`` when given)."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer.getvalue())
    return buffer.tell()


def _predict(task: Any, batch: dict[str, Any]) -> Any:
    try:
        return task.predict_step(batch, 0)
    except (NotImplementedError, TypeError, KeyError):
        return task(batch["image"])


@torch.inference_mode()
def interleaved_latency(tasks: list[Any], batch: dict[str, Any], repeats: int = 20, warmup: int = 3) -> list[float]:
    """Median seconds of ``predict_step`` (or ``task(batch["image"])``) on one batch for each task, timed in
    turns (A B A B ...) so that a change in the machine's load affects all of them alike."""
    for task in tasks:
        task.eval()
        for _ in range(warmup):
            _predict(task, batch)
    times: list[list[float]] = [[] for _ in tasks]
    for _ in range(repeats):
        for i, task in enumerate(tasks):
            start = time.perf_counter()
            _predict(task, batch)
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def test_metrics(task: Any, data: Any, root: Path) -> dict[str, float]:
    """The task's own test metrics from ``trainer.test`` on CPU."""
    import lightning as L

    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(root),
    )
    results = trainer.test(task, datamodule=data, verbose=False)
    return {k: float(v) for k, v in (results[0] if results else {}).items()}


def headline_metric(task: Any, metrics: dict[str, float]) -> str:
    """The test counterpart of the task's monitored metric (``val/acc`` -> ``test/acc``), else the first test metric."""
    monitor = getattr(task, "monitor", None) or ""
    name = monitor.replace("val/", "test/", 1)
    if name in metrics:
        return name
    return next((k for k in sorted(metrics) if k.startswith("test/") and "loss" not in k), next(iter(metrics), ""))


def build_variant(configs: list[str], ckpt: Path, method: str | None, args: argparse.Namespace) -> tuple[Any, Any, str]:
    """The task loaded from ``ckpt`` (quantized with ``method`` unless None), its data module, and the backend."""
    task, data, _ = load_task_and_data(configs, args.set)
    load_checkpoint(task, ckpt)
    task.activation_checkpointing = False  # inference: no training-time switches
    task.torch_compile = False
    backend = "float"
    if method is not None:
        backend = quantize_model(task, method, args.backend, group_size=args.group_size, device="cpu")
    if args.compile:
        inference_module(task).compile()
    return task, data, backend


def compare(configs: list[str], ckpt: Path, method: str, args: argparse.Namespace, out: Path) -> dict[str, dict[str, Any]]:
    """Float and ``method`` rows: test metrics, size on disk, latency per batch (timed in turns)."""
    variants = {"float": build_variant(configs, ckpt, None, args), method: build_variant(configs, ckpt, method, args)}
    data = variants["float"][1]
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    batch.pop("skipped", None)
    latencies = interleaved_latency([v[0] for v in variants.values()], batch, repeats=args.repeats)
    rows = {}
    for (name, (task, task_data, backend)), latency in zip(variants.items(), latencies):
        size = size_on_disk(inference_module(task), out / "quantized" / f"{name}.pt" if name != "float" else None)
        metrics = test_metrics(task, task_data, out / "quantized" / name)
        rows[name] = {
            "method": name, "backend": backend, "size_bytes": size, "latency_s": latency,
            "batch_size": int(batch["image"].shape[0]) if "image" in batch else None,
            "metrics": metrics, "headline": headline_metric(task, metrics), "threads": torch.get_num_threads(),
        }
    reference = rows["float"]  # what this method was measured against (rows of earlier calls keep theirs)
    rows[method]["reference"] = {k: reference[k] for k in ("size_bytes", "latency_s", "metrics")}
    return rows


def markdown_table(rows: dict[str, dict[str, Any]]) -> str:
    """One row per variant, each against the float model it was measured with."""
    lines = [
        "| method | backend | metric | value | vs float | size (MB) | smaller | latency / batch (ms) | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        base = row.get("reference") or rows.get("float") or row
        metric = row["headline"]
        value = row["metrics"].get(metric, float("nan"))
        delta = value - base["metrics"].get(metric, float("nan"))
        smaller = base["size_bytes"] / row["size_bytes"]
        speed = base["latency_s"] / row["latency_s"]
        lines.append(
            f"| {name} | {row['backend']} | {metric} | {value:.4f} | {delta:+.4f} | {row['size_bytes'] / 1e6:.3f} |"
            f" {smaller:.2f}x | {row['latency_s'] * 1e3:.1f} | {speed:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a Lightning checkpoint file, e.g. RUN/checkpoints/best.ckpt")
    parser.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}")
    parser.add_argument("--backend", default="auto", choices=("auto", "torchao"), help="torchao (the only backend)")
    parser.add_argument("--config", action="append", default=None, help="config YAML(s); default RUN/config.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. data.eval_batch_size=64")
    parser.add_argument("--group-size", type=int, default=32, help="input features per scale for int4-weight-only")
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions of the latency batch")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model before timing (torchao's CPU kernels need it)")
    parser.add_argument("--out", default=None, help="where to write the table (default: the run directory)")
    args = parser.parse_args(argv)

    ckpt = Path(args.ckpt)
    run = run_dir_of(ckpt)
    configs = args.config or [str(run / "config.yaml")]
    for path in configs:
        if not os.path.isfile(path):
            raise SystemExit(f"error: no config {path}: pass the run's config with --config")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else run
    try:
        from mm_lightning.quantization import resolve_backend

        resolve_backend(args.method, args.backend, "cpu")  # fail before any work
        fresh = compare(configs, ckpt, args.method, args, out)
    except QuantizationUnavailable as e:
        raise SystemExit(f"error: {e}") from None
    table_path = out / "quantization.json"
    rows: dict[str, Any] = json.loads(table_path.read_text()) if table_path.is_file() else {}
    rows = {"float": fresh["float"], **{k: v for k, v in rows.items() if k != "float"}, args.method: fresh[args.method]}
    rows["float"]["checkpoint_bytes"] = ckpt.stat().st_size
    out.mkdir(parents=True, exist_ok=True)
    table_path.write_text(json.dumps(rows, indent=2) + "\n")
    table = markdown_table(rows)
    (out / "quantization.md").write_text(f"# Quantization of {ckpt}\n\n{table}")
    print(table)
    print(f"Table: {out / 'quantization.md'} and {table_path}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
