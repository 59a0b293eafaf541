"""Every shipped experiment config parses and builds its model, data module and trainer (no training)."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest

from experiments.run import MMLightningCLI
from mm_lightning.data.datamodule import WebDataModule
from tests.conftest import REPO

CONFIGS_DIR = REPO / "experiments" / "configs"
# stage overlays (experiments/configs/stages/) change a connector config's stage and have no model class of their
# own: each is built stacked on a connector config, as the recipes stack them
STAGE_BASE = CONFIGS_DIR / "mllm_mlp_shapes.yaml"
CONFIGS = sorted(CONFIGS_DIR.glob("*.yaml")) + sorted((CONFIGS_DIR / "stages").glob("*.yaml"))


def stacked(config: Path) -> list[str]:
    """``--config`` arguments that build ``config``: a stage overlay comes after its connector config."""
    return (["--config", str(STAGE_BASE)] if config.parent.name == "stages" else []) + ["--config", str(config)]


@pytest.fixture(scope="module")
def builtin_data(tmp_path_factory) -> Path:
    """Small built-in data sets at their default relative locations (data/shards/...) under a tmp dir."""
    from data.prepare import prepare_digits, prepare_shapes

    root = tmp_path_factory.mktemp("builtin")
    prepare_shapes(out_dir=root / "data/shards/shapes", train=64, val=16, test=16, progress=False)
    prepare_digits(out_dir=root / "data/shards/digits", progress=False)
    return root


@pytest.mark.parametrize("config", CONFIGS, ids=[f"{c.parent.name}/{c.stem}" if c.parent.name == "stages" else c.stem for c in CONFIGS])
def test_shipped_config_builds(config: Path, builtin_data: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(builtin_data)
    monkeypatch.setattr(sys, "argv", ["experiments.run"])
    monkeypatch.setenv("MM_RUN_DIR", str(tmp_path))  # restored after the test; the CLI sets it in-process
    cli = MMLightningCLI(
        args=[*stacked(config), "--prepare_data=false", "--logger=none", f"--trainer.default_root_dir={tmp_path}"],
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


def test_the_tokenizer_is_configured_once_and_handed_to_pipeline_and_task(builtin_data: Path, tmp_path: Path,
                                                                          monkeypatch) -> None:
    """clip_shapes.yaml's top-level tokenizer is one object in the pipeline and the task (callbacks read the task's);
    the resolved config names it once; image-only configs have none."""
    import yaml

    monkeypatch.chdir(builtin_data)
    monkeypatch.setenv("MM_RUN_DIR", str(tmp_path))

    def build(name: str, *extra: str) -> MMLightningCLI:
        return MMLightningCLI(args=["--config", str(REPO / "experiments" / "configs" / f"{name}.yaml"),
                                    "--prepare_data=false", "--logger=none", *extra], run=False)

    cli = build("clip_shapes")
    tokenizer = cli.model.tokenizer
    assert tokenizer is not None and cli.datamodule.pipeline.tokenizer is tokenizer
    assert "tokenizer" not in cli.model.hparams  # never pickled into checkpoints
    text = cli.model.model.text_encoder
    assert (text.vocab_size, text.context_length) == (tokenizer.vocab_size, tokenizer.context_length) == (
        tokenizer.vocab_size, 32)
    dumped = yaml.safe_load(cli.parser.dump(cli.config))
    assert dumped["tokenizer"]["init_args"]["path"] == "data/shards/shapes/tokenizer.json"
    assert "tokenizer" not in dumped["model"]["init_args"] and "tokenizer" not in dumped["data"]["pipeline"]["init_args"]
    with pytest.raises(ValueError, match="model.vocab_size: read from the tokenizer"):
        build("clip_shapes", "--model.init_args.vocab_size=500")
    assert build("vit_shapes").model.tokenizer is None
