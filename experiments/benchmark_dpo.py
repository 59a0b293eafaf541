"""DPO step throughput, and the share of it the reference forward takes, with and without precomputed reference
log-probs::

    python -m experiments.benchmark_dpo --config experiments/configs/mllm_mlp_shapes.yaml \\
        --config experiments/configs/stages/dpo_shapes.yaml --set model.init_args.init=RUNS/sft_noisy/checkpoints/best.ckpt

(standalone for now: ``experiments.benchmark`` is being reworked; ``dpo_efficiency(configs, args)`` is the
function to hook into it as a part ``dpo``).

The configs' DPO task and training batches (moved to the device once, so the data path is not timed). Two
ways to get the reference log-probs run step by step alternately on the same batches, so load changes on a
shared machine hit both alike: ``live`` (the frozen reference's forward in every step, as
``precompute_reference: false``) and ``precomputed`` (a table filled by one pass before training, as
``precompute_reference: true``; that pass's time per pair is reported too). A step is the policy's
concatenated forward over chosen and rejected, the reference log-probs, the loss, backward and AdamW.
Tokens/s counts the attended tokens of the chosen and rejected rows (image tokens included: the LM runs
them). Reported per mode: median step time, tokens/s, and the median share of the step spent on the
reference (its forward, or the table lookup).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from experiments.benchmark_timing import sync
from experiments.common import load_task_and_data
from mm_lightning.data.preferences import concatenated
from mm_lightning.losses.preference import completion_lengths, dpo_loss


DEFAULTS = {"dpo_steps": 20, "dpo_warmup": 2, "dpo_batches": 4}


def _autocast(device: torch.device, precision: str) -> Any:
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision.startswith("16") and device.type == "cuda":
        return torch.autocast(device.type, dtype=torch.float16)
    return torch.autocast(device.type, enabled=False)


def dpo_efficiency(configs: list[str], args: Any) -> dict[str, Any]:
    """Time DPO steps with the live and the precomputed reference, alternating (see the module docstring)."""
    from mm_lightning.tasks.dpo import DPOTask

    task, data, merged = load_task_and_data(configs, list(args.set) + ["data.num_workers=0"])
    if not isinstance(task, DPOTask):
        raise SystemExit(f"error: --parts dpo needs a DPO config (model.class_path mm_lightning.tasks.dpo.DPOTask), "
                         f"got {type(task).__name__}")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    precision = str((merged.get("trainer") or {}).get("precision") or "32-true")
    task.setup("fit")  # earlier stages (init) and the reference
    task.to(device)
    task.train()
    data.setup("fit")
    batches = []
    for batch in data.train_dataloader():
        batch.pop("skipped", None)
        batches.append(task.transfer_batch_to_device(batch, device, 0))
        if len(batches) >= getattr(args, "dpo_batches", DEFAULTS["dpo_batches"]):
            break
    steps, warmup = getattr(args, "dpo_steps", DEFAULTS["dpo_steps"]), getattr(args, "dpo_warmup", DEFAULTS["dpo_warmup"])
    optimizer = torch.optim.AdamW(task.optimizer_param_groups(), lr=task.lr)

    def reference(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = concatenated(batch)
        with _autocast(device, precision):
            logps = task.reference_logprobs(inputs["image"], inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
        n = batch["chosen_input_ids"].shape[0]
        return logps[:n].float(), logps[n:].float()

    sync(device)
    start = time.perf_counter()
    table = [reference(b) for b in batches]  # what precompute_reference's pass computes, per batch
    sync(device)
    pairs = sum(b["chosen_input_ids"].shape[0] for b in batches)
    precompute_s = time.perf_counter() - start

    def step(batch: dict[str, Any], index: int, mode: str) -> tuple[float, float, int]:
        sync(device)
        t0 = time.perf_counter()
        inputs = concatenated(batch)
        n = batch["chosen_input_ids"].shape[0]
        with _autocast(device, precision):
            logps = task.model.sequence_logprobs(inputs["image"], inputs["input_ids"], inputs["attention_mask"],
                                                 inputs["labels"])
        sync(device)
        t1 = time.perf_counter()
        ref_c, ref_r = reference(batch) if mode == "live" else table[index]
        sync(device)
        t2 = time.perf_counter()
        losses, _, _ = dpo_loss(logps[:n].float(), logps[n:].float(), ref_c, ref_r, task.beta, task.loss_type,
                                task.label_smoothing, chosen_lengths=completion_lengths(batch["chosen_labels"]),
                                rejected_lengths=completion_lengths(batch["rejected_labels"]))
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        t3 = time.perf_counter()
        return t3 - t0, t2 - t1, int(inputs["attention_mask"].sum())

    rows: dict[str, list[tuple[float, float, int]]] = {"live": [], "precomputed": []}
    for i in range(warmup + steps):
        index = i % len(batches)
        order = ("live", "precomputed") if i % 2 == 0 else ("precomputed", "live")
        for mode in order:
            timing = step(batches[index], index, mode)
            if i >= warmup:
                rows[mode].append(timing)
    result: dict[str, Any] = {
        "device": str(device), "precision": precision, "batch_size": data.batch_size, "steps": steps,
        "reference_kind": task.reference_kind, "precompute_s_per_pair": precompute_s / max(1, pairs),
    }
    for mode, timings in rows.items():
        step_s = statistics.median(t for t, _, _ in timings)
        result[mode] = {
            "step_s": step_s,
            "tokens_per_s": statistics.median(n / t for t, _, n in timings),
            "reference_share": statistics.median(r / t for t, r, _ in timings),
        }
    result["speedup"] = result["live"]["step_s"] / result["precomputed"]["step_s"]
    for mode in rows:
        r = result[mode]
        print(f"  dpo, {mode} reference: {r['step_s'] * 1e3:.1f} ms/step, {r['tokens_per_s']:.0f} tokens/s, "
              f"reference {r['reference_share']:.1%} of the step", flush=True)
    print(f"  precomputed is {result['speedup']:.2f}x faster per step; the pass costs "
          f"{result['precompute_s_per_pair'] * 1e3:.2f} ms per pair once", flush=True)
    return result


def dpo_markdown(r: dict[str, Any]) -> list[str]:
    """The benchmark's DPO table (markdown lines)."""
    lines = ["### DPO reference", "",
             f"{r['device']}, {r['precision']}, batch {r['batch_size']} pairs, reference {r['reference_kind']}, "
             f"{r['steps']} steps per mode, alternating.", "",
             "| reference log-probs | ms/step | tokens/s | reference share of the step |", "|---|---|---|---|"]
    for mode in ("live", "precomputed"):
        m = r[mode]
        lines.append(f"| {mode} | {m['step_s'] * 1e3:.1f} | {m['tokens_per_s']:.0f} | {m['reference_share']:.1%} |")
    lines += ["", f"Precomputed: {r['speedup']:.2f}x faster per step, after a one-off pass of "
              f"{r['precompute_s_per_pair'] * 1e3:.2f} ms per pair.", ""]
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m experiments.benchmark_dpo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, help="experiment configs, stacked (a DPO task)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. data.batch_size=16")
    parser.add_argument("--dpo-steps", type=int, default=DEFAULTS["dpo_steps"], help="timed steps per reference mode")
    parser.add_argument("--dpo-warmup", type=int, default=DEFAULTS["dpo_warmup"], help="untimed steps per reference mode")
    parser.add_argument("--dpo-batches", type=int, default=DEFAULTS["dpo_batches"], help="training batches cycled through")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="output directory (default runs/benchmark/dpo-<timestamp>)")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"configs": args.config, "torch": torch.__version__, "threads": torch.get_num_threads(),
              **dpo_efficiency(args.config, args)}
    out = Path(args.out or Path("runs") / "benchmark" / time.strftime("dpo-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark_dpo.json").write_text(json.dumps(result, indent=2) + "\n")
    table = "\n".join(dpo_markdown(result))
    (out / "benchmark_dpo.md").write_text(table)
    print("\n" + table + f"\nResults: {out / 'benchmark_dpo.json'}")
    return result


if __name__ == "__main__":
    main()
