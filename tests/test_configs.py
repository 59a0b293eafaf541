"""Every shipped experiment config parses and builds its model, data module and trainer (no training)."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest

from experiments.run import MMLightningCLI
from mm_lightning.data.datamodule import WebDataModule
from tests.conftest import REPO

CONFIGS = sorted((REPO / "experiments" / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def builtin_data(tmp_path_factory) -> Path:
    """Small built-in data sets at their default relative locations (data/shards/...) under a tmp dir."""
    from data.prepare import prepare_digits, prepare_shapes

    root = tmp_path_factory.mktemp("builtin")
    prepare_shapes(out_dir=root / "data/shards/shapes", train=64, val=16, test=16, progress=False)
    prepare_digits(out_dir=root / "data/shards/digits", progress=False)
    return root


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_shipped_config_builds(config: Path, builtin_data: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(builtin_data)
    monkeypatch.setattr(sys, "argv", ["experiments.run"])
    monkeypatch.setenv("MM_RUN_DIR", str(tmp_path))  # restored after the test; the CLI sets it in-process
    cli = MMLightningCLI(
        args=["--config", str(config), "--prepare_data=false", "--logger=none", f"--trainer.default_root_dir={tmp_path}"],
        run=False,
    )
    assert isinstance(cli.model, L.LightningModule)
    assert isinstance(cli.datamodule, WebDataModule)
    assert isinstance(cli.trainer, L.Trainer)
    for split in ("train", "val", "test"):
        if cli.datamodule.specs[split] is not None:
            assert cli.datamodule.shard_list(split), split


def test_there_are_configs() -> None:
    assert {"vit_shapes", "vit_digits", "resnet_digits"} <= {c.stem for c in CONFIGS}
