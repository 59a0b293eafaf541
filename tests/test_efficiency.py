"""Gradient accumulation, throughput monitor, pruning, QAT and quantization (fast, in one process)."""

from __future__ import annotations

import importlib.util
import io
import json

import lightning as L
import pytest
import torch
import torch.nn as nn

from mm_lightning.callbacks.pruning import MagnitudePruning, sparsity_schedule
from mm_lightning.callbacks.throughput import ThroughputMonitor, batch_size_of, tokens_of
from mm_lightning.quantization import QuantizationUnavailable, quantize_model, resolve_backend
from tests.conftest import REPO
from tests.parallel_common import TinyImages, make_task
from tests.test_run import run_cli

HAS_TORCHAO = importlib.util.find_spec("torchao") is not None


def quiet_trainer(**kwargs) -> L.Trainer:
    base = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0)
    return L.Trainer(**{**base, **kwargs})


def loader(batch_size: int, n: int = 64) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(TinyImages(n), batch_size=batch_size, shuffle=False)


class GradCapture(L.Callback):
    """The gradients the optimizer is about to apply."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {n: p.grad.clone() for n, p in pl_module.model.named_parameters()}


def test_accumulating_four_batches_equals_one_step_on_a_4x_batch():
    """accumulate_grad_batches=4 at batch 8 == batch 32: same gradient, and the same loss after one optimizer step."""
    results = []
    for batch_size, accumulate in ((8, 4), (32, 1)):
        task = make_task()  # a ViT: LayerNorm only, no batch norm
        capture = GradCapture()
        quiet_trainer(max_steps=1, accumulate_grad_batches=accumulate, limit_val_batches=0, callbacks=[capture]).fit(
            task, train_dataloaders=loader(batch_size, n=32))
        images = TinyImages(32)
        with torch.no_grad():
            loss = nn.functional.cross_entropy(task(images.images), images.labels)
        results.append((loss, capture.grads, {k: v.clone() for k, v in task.model.state_dict().items()}))
    (loss_acc, g_acc, w_acc), (loss_big, g_big, w_big) = results
    torch.testing.assert_close(loss_acc, loss_big, atol=1e-6, rtol=0)
    for name in g_big:
        torch.testing.assert_close(g_acc[name], g_big[name], atol=1e-7, rtol=1e-5, msg=name)
    # Adam divides by |g|: for gradients at rounding level (the key bias's is 0 in exact arithmetic) the first
    # update amplifies float noise, so the weights agree to the step size's scale only
    for name in w_big:
        torch.testing.assert_close(w_acc[name], w_big[name], atol=1e-4, rtol=0, msg=name)
    assert not torch.equal(w_big["head.weight"], make_task().model.state_dict()["head.weight"])  # a step happened


def _vm_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def test_throughput_monitor_logs_speed_and_memory(tmp_path):
    """Batch 8, 13 steps, warm-up 1, window 4: logged at steps 4, 8 and 12; in every window samples/s x seconds/step
    is the batch size (8 samples per step, exactly), the window's time lies between the bounds an independent clock
    at the same hook sets, and the peak memory lies between this process's resident size before training and its
    high-water mark after."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    from experiments.benchmark_timing import StepClock  # an independent clock at the same hook, called right before the monitor's

    monitor, clock = ThroughputMonitor(warmup_steps=1, window=4), StepClock(torch.device("cpu"))
    trainer = quiet_trainer(max_steps=13, limit_val_batches=0, callbacks=[clock, monitor], log_every_n_steps=4,
                            logger=CSVLogger(tmp_path, name="", version=""))
    rss_before = _vm_kb("VmRSS") / 2**20
    trainer.fit(make_task(), train_dataloaders=loader(8))
    peak_after = _vm_kb("VmHWM") / 2**20
    rows = [r for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r.get("perf/samples_per_s")]
    assert [int(r["step"]) for r in rows] == [3, 7, 11]  # Lightning logs step k-1 for optimizer step k
    for row in rows:
        # both logged as float32 (relative rounding 6e-8 each)
        assert float(row["perf/samples_per_s"]) * float(row["perf/step_time"]) == pytest.approx(8.0, rel=1e-6)
        assert 0.9 * rss_before <= float(row["perf/max_memory_gb"]) <= peak_after
    # A window runs from the end of the step that closed the one before (the warm-up step, 1, for the first) to
    # step k. One batch per step: clock.ends[i] is the end of step i + 1, read right before the monitor reads its
    # own clock at that step, so each of the monitor's two readings lies between the clock's reading at its step
    # and at the next: the window's time is within (ends[k-1] - ends[start]) .. (ends[k] - ends[start-1]), however
    # long the process waits between the two callbacks on a loaded machine (a bound, not a tolerance; a
    # relative tolerance of 10% failed once in 3 suite runs under load). A clock reading double puts a window of
    # n steps at 2n, outside its bound of n + 1 steps.
    for start, row in zip([1, 4, 8], rows):
        k = int(row["step"]) + 1
        seconds = float(row["perf/step_time"]) * (k - start)  # the window holds steps start+1 .. k
        assert clock.ends[k - 1] - clock.ends[start] <= seconds * (1 + 1e-6), (start, k)
        assert seconds <= (clock.ends[k] - clock.ends[start - 1]) * (1 + 1e-6), (start, k)
    assert "perf/mfu" not in trainer.callback_metrics  # no known peak FLOPs on a CPU
    assert monitor.flops_per_batch is None


def test_batch_and_token_counts():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert batch_size_of({"image": torch.zeros(5, 3, 2, 2), "label": torch.zeros(5)}) == 5
    assert batch_size_of({"input_ids": torch.zeros(2, 3), "attention_mask": mask}) == 2
    assert int(tokens_of({"attention_mask": mask})) == 3
    assert int(tokens_of({"chosen_attention_mask": mask, "rejected_attention_mask": mask})) == 6
    assert tokens_of({"image": torch.zeros(1)}) is None


@pytest.mark.parametrize("kind", ["cubic", "linear", "once"])
def test_sparsity_schedule_reaches_the_target(kind):
    amounts = sparsity_schedule(0.8, 1, 4, kind)
    remaining = 1.0
    for epoch in sorted(amounts):
        assert 0 <= amounts[epoch] < 1
        remaining *= 1 - amounts[epoch]
    assert 1 - remaining == pytest.approx(0.8)
    assert max(amounts) == 4 and (min(amounts) == 1 or kind == "once")
    with pytest.raises(ValueError, match="target_sparsity"):
        sparsity_schedule(1.0, 0, 1)


def test_magnitude_pruning_hits_target_and_is_permanent(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    val = loader(32)
    pruning = MagnitudePruning(target_sparsity=0.6, start_epoch=1, end_epoch=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val/acc", mode="max",
                                 enable_version_counter=False)
    task = make_task()
    trainer = quiet_trainer(max_epochs=4, callbacks=[pruning, checkpoint], enable_checkpointing=True)
    trainer.fit(task, train_dataloaders=loader(16), val_dataloaders=val)
    assert float(trainer.callback_metrics["train/sparsity"]) == pytest.approx(0.6, abs=0.005)
    linears = [m for m in task.model.modules() if isinstance(m, nn.Linear)]
    assert not any(hasattr(m, "weight_orig") for m in linears)  # made permanent
    zeros = sum(int((m.weight == 0).sum()) for m in linears)
    assert zeros / sum(m.weight.numel() for m in linears) == pytest.approx(0.6, abs=0.005)
    # best.ckpt is from after the last pruning step and loads into a plain model
    state = torch.load(tmp_path / "best.ckpt", map_location="cpu", weights_only=False)
    assert state["epoch"] >= 2  # not a denser checkpoint from before the target was reached
    fresh = make_task()
    fresh.load_state_dict(state["state_dict"])
    w = [m.weight for m in fresh.model.modules() if isinstance(m, nn.Linear)]
    assert sum(int((x == 0).sum()) for x in w) / sum(x.numel() for x in w) == pytest.approx(0.6, abs=0.005)


@pytest.mark.skipif(not HAS_TORCHAO, reason="needs torchao (the quant extra)")
def test_quantization_aware_training_prepares_and_converts(tmp_path):
    from mm_lightning.callbacks.qat import QuantizationAwareTraining

    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(type(pl_module.model.blocks[0].mlp.fc1).__name__)

    task = make_task()
    keys = list(task.state_dict())
    quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[QuantizationAwareTraining("int8-dynamic"), Spy()]).fit(
        task, train_dataloaders=loader(16))
    assert seen == ["FakeQuantizedLinear"] * 2
    assert type(task.model.blocks[0].mlp.fc1) is nn.Linear and list(task.state_dict()) == keys
    with pytest.raises(ValueError, match="QAT method"):
        QuantizationAwareTraining("int2")  # type: ignore[arg-type]


def _size(module: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.tell()


@pytest.mark.skipif(not HAS_TORCHAO, reason="needs torchao (the quant extra)")
@pytest.mark.parametrize("method", ["int8-dynamic", "int8-weight-only", "int4-weight-only"])
def test_quantize_model_keeps_predictions(method):
    backend = "torchao"
    task = make_task()
    task.eval()
    images = TinyImages(32).images
    with torch.no_grad():
        before = task(images)
    float_size = _size(task.model)
    assert quantize_model(task, method, backend) == backend
    with torch.no_grad():
        after = task(images)
    error = (after - before).norm() / before.norm()  # relative error of the logits
    assert error < (0.05 if method.startswith("int8") else 0.25), error
    assert _size(task.model) < float_size


def test_quantization_errors_name_the_method():
    with pytest.raises(QuantizationUnavailable, match="load_causal_lm_nf4"):
        resolve_backend("nf4")
    with pytest.raises(QuantizationUnavailable, match="--backend 'pytorch'.*deprecated"):
        resolve_backend("int8-dynamic", "pytorch")
    if HAS_TORCHAO:
        assert resolve_backend("int8-dynamic", "auto", "cpu") == "torchao"


# ------------------------------------------------------------------------------------ GPU only
CUDA = torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="Lightning's DeepSpeed strategy runs on CUDA only (refuses CPU)")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_on_cuda(stage, tmp_path):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed not installed (pip install 'mm-lightning[deepspeed]')")
    from lightning.pytorch.strategies import DeepSpeedStrategy as DeepSpeed

    task = make_task()
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    trainer = L.Trainer(accelerator="gpu", devices=1, strategy=DeepSpeed(stage=stage), precision="bf16-mixed",
                        max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(task, train_dataloaders=loader(16))
    assert trainer.global_step == 4
    trainer.save_checkpoint(tmp_path / "ds.ckpt")
    assert (tmp_path / "ds.ckpt").exists()
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    if stage == 2:  # ZeRO-3 partitions parameters: the module's own tensors are placeholders
        after = task.model.state_dict()
        assert any(not torch.equal(before[k], after[k].cpu()) for k in before)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="MFU needs a GPU with known peak FLOPs")
def test_throughput_monitor_reports_mfu_on_gpu():
    monitor = ThroughputMonitor(warmup_steps=1, window=2)
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=6, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0, callbacks=[monitor],
                        log_every_n_steps=2)
    trainer.fit(make_task(), train_dataloaders=loader(16))
    if monitor.peak_flops is None:
        pytest.skip(f"Lightning does not know the peak FLOPs of {torch.cuda.get_device_name()}")
    assert monitor.flops_per_batch and monitor.flops_per_batch > 0
    assert 0 < float(trainer.callback_metrics["perf/mfu"]) < 1


# ------------------------------------------------ CLI runs of the main config (shrunk), shared by the checks
VIT = str(REPO / "experiments" / "configs" / "vit_shapes.yaml")
PRESETS = REPO / "experiments" / "configs" / "presets"
BATCH = 64
#: vit_shapes.yaml's model, data and optimizer for 96 steps instead of its full schedule: fewer samples, a smaller
#: batch, and a learning rate and warmup that learn in so few steps (the rest is read from the file)
SHRINK = ["--data.samples_per_epoch=2048", "--trainer.max_epochs=3", f"--data.batch_size={BATCH}",
          "--model.init_args.lr=3e-3", "--model.init_args.warmup_epochs=0.1", "--data.eval_batch_size=500",
          "--data.num_workers=1", "--trainer.log_every_n_steps=4", "--trainer.enable_progress_bar=false",
          "--trainer.enable_model_summary=false", "--logger=csv", "--trainer.accelerator=cpu"]


def summary_of(run) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory):
    """One process, the config's batch: the reference of the pruning and quantization checks."""
    run = tmp_path_factory.mktemp("vit") / "run"
    run_cli("fit", "--config", VIT, *SHRINK, f"--trainer.default_root_dir={run}", timeout=900)
    return run


@pytest.mark.slow
def test_pruning_reaches_the_sparsity_and_keeps_accuracy(baseline_run, tmp_path):
    run = tmp_path / "pruned"
    run_cli("fit", "--config", VIT, "--config", str(PRESETS / "pruning.yaml"), *SHRINK,
            f"--trainer.default_root_dir={run}", timeout=900)
    pruned, dense = summary_of(run), summary_of(baseline_run)
    target = 0.5  # presets/pruning.yaml
    assert pruned["train/sparsity"] == pytest.approx(target, abs=0.002)
    state = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    weights = [v for k, v in state.items() if k.startswith("model.") and k.endswith(".weight") and v.ndim == 2]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(target, abs=0.002)  # the tested checkpoint is the pruned model
    # 3 sd of the difference of two accuracies near 0.4 on the 2,000 test images (~0.015 each way): pruning that
    # broke the model falls to chance (1/6), far below
    assert pruned["test/acc"] >= dense["test/acc"] - 0.045, (dense["test/acc"], pruned["test/acc"])


@pytest.mark.slow
def test_int8_quantization_keeps_accuracy_and_shrinks_the_model(baseline_run):
    from experiments.quantize import main as quantize

    rows = quantize(["--ckpt", str(baseline_run / "checkpoints" / "best.ckpt"), "--method", "int8-dynamic", "--repeats", "3"])
    floating, int8 = rows["float"], rows["int8-dynamic"]
    assert int8["headline"] == "test/acc"
    assert abs(int8["metrics"]["test/acc"] - floating["metrics"]["test/acc"]) <= 0.01
    assert floating["size_bytes"] / int8["size_bytes"] >= 3.0
    assert floating["checkpoint_bytes"] / int8["size_bytes"] >= 3.0
    assert (baseline_run / "quantization.md").read_text().count("| int8-dynamic |") == 1
    assert (baseline_run / "quantized" / "int8-dynamic.pt").is_file()
