"""Every preset in experiments/configs/presets parses, stacks on an experiment config and builds its trainer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

from mm_lightning.parallel import ModelParallel
from tests.conftest import REPO

PRESETS = sorted((REPO / "experiments" / "configs" / "presets").glob("*.yaml"))
VIT = str(REPO / "experiments" / "configs" / "vit_shapes.yaml")
CUDA = torch.cuda.is_available()


def build(tmp_path: Path, *configs: str, extra: tuple[str, ...] = ()):
    """Parse the stacked configs with experiments.run's CLI and instantiate model, data and trainer (no run)."""
    from experiments.run import MMLightningCLI

    args = []
    for config in (VIT, *configs):
        args += ["--config", config]
    args += ["--logger=none", f"--trainer.default_root_dir={tmp_path / 'run'}", "--prepare_data=false", *extra]
    return MMLightningCLI(args=args, run=False)


def test_presets_exist():
    names = {p.stem for p in PRESETS}
    for required in ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload", "tensor_parallel",
                     "bf16_mixed", "fp16_mixed", "bf16_true", "fp8_transformer_engine", "grad_accum",
                     "activation_checkpointing", "compile", "pruning", "qat", "throughput"):
        assert required in names, required


def expect_error(capsys: pytest.CaptureFixture, pattern: str, *configs: str, extra: tuple[str, ...] = (), tmp_path: Path) -> None:
    """Building fails, with ``pattern`` in the error (raised, or printed by the CLI before it exits)."""
    import re

    with pytest.raises((Exception, SystemExit)) as info:
        build(tmp_path, *configs, extra=extra)
    text = str(info.value) + capsys.readouterr().err
    assert re.search(pattern, text), text[-2000:]


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_parses_and_builds(preset: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    name = preset.stem
    text = preset.read_text()
    if name.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        expect_error(capsys, r"must have DeepSpeed installed", str(preset), extra=("--trainer.accelerator=cpu",),
                     tmp_path=tmp_path)
        return
    if "accelerator: gpu" in text and not CUDA:
        # Lightning refuses a GPU accelerator without CUDA: the preset still parses, and the error names what is missing
        expect_error(capsys, "(?i)gpu|cuda|transformer_engine", str(preset), tmp_path=tmp_path)
        return
    if name == "qat" and importlib.util.find_spec("torchao") is None:
        expect_error(capsys, r"mm-lightning\[quant\]", str(preset), tmp_path=tmp_path)
        return
    cli = build(tmp_path, str(preset))
    trainer, model = cli.trainer, cli.model
    callbacks = {type(c).__name__ for c in trainer.callbacks}
    expected_precision = {"bf16_mixed": "bf16-mixed", "bf16_true": "bf16-true"}
    if name == "ddp":
        assert isinstance(trainer.strategy, DDPStrategy)
    elif name in ("fsdp", "tensor_parallel"):
        assert isinstance(trainer.strategy, ModelParallel)
        assert trainer.strategy._tensor_parallel_size == (2 if name == "tensor_parallel" else 1)
        assert trainer.strategy.sharding == "full"
    elif name in expected_precision:
        assert trainer.precision == expected_precision[name]
    elif name == "fp16_mixed":
        assert trainer.precision in ("16-mixed", "bf16-mixed")  # Lightning uses bf16 autocast on CPU
    elif name == "grad_accum":
        assert trainer.accumulate_grad_batches == 4
    elif name == "activation_checkpointing":
        assert model.activation_checkpointing is True
    elif name == "compile":
        assert model.torch_compile is True
    elif name == "pruning":
        assert "MagnitudePruning" in callbacks
    elif name == "qat":
        assert "QuantizationAwareTraining" in callbacks
    elif name == "throughput":
        assert "ThroughputMonitor" in callbacks
    else:
        pytest.fail(f"preset {name} has no check in this test")


def test_presets_stack(tmp_path: Path):
    presets = REPO / "experiments" / "configs" / "presets"
    cli = build(
        tmp_path,
        str(presets / "fsdp.yaml"),
        str(presets / "activation_checkpointing.yaml"),
        str(presets / "bf16_mixed.yaml"),
        str(presets / "pruning.yaml"),
        str(presets / "throughput.yaml"),
        extra=("--trainer.strategy.init_args.sharding=no-reshard",),
    )
    assert isinstance(cli.trainer.strategy, ModelParallel) and cli.trainer.strategy.sharding == "no-reshard"
    assert cli.model.activation_checkpointing is True
    assert cli.trainer.precision == "bf16-mixed"
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert "MagnitudePruning" in names and "ThroughputMonitor" in names  # callback presets append


def test_bad_sharding_names_the_choice(tmp_path: Path, capsys: pytest.CaptureFixture):
    expect_error(capsys, "zero9", str(REPO / "experiments" / "configs" / "presets" / "fsdp.yaml"),
                 extra=("--trainer.strategy.init_args.sharding=zero9",), tmp_path=tmp_path)
    with pytest.raises(ValueError, match="sharding"):
        ModelParallel(sharding="zero9")  # type: ignore[arg-type]
