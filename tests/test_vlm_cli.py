"""The multimodal LLM through experiments.run and experiments.recipe: 2-process DDP, stage hand-over, skip and resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from experiments.recipe import stage_command
from tests.conftest import REPO
from tests.test_run import run_cli
from tests.vlm_fixtures import write_shapes

TINY = str(REPO / "tests" / "configs" / "tiny_vlm.yaml")
LM_STAGE = str(REPO / "experiments" / "configs" / "stages" / "mllm_lm.yaml")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], str]:
    directory = tmp_path_factory.mktemp("cli_shapes")
    shards = write_shapes(directory, train=64, val=16, test=30, samples_per_shard=8)  # 30 test samples: uneven
    return shards, str(directory / "chat_tokenizer")


def flags(shapes: tuple[dict[str, str], str]) -> list[str]:
    shards, tokenizer = shapes
    return [f"--data.{s}={spec}" for s, spec in shards.items()] + [f"--tokenizer.init_args.path={tokenizer}"]


@pytest.mark.slow
def test_two_ddp_ranks_train_and_evaluate_every_question_once(shapes, tmp_path) -> None:
    run = tmp_path / "ddp"
    run_cli("fit", "--config", TINY, *flags(shapes), f"--trainer.default_root_dir={run}", "--trainer.devices=2",
            "--trainer.strategy=ddp", timeout=900)
    ddp = json.loads((run / "summary.json").read_text())
    assert ddp["steps"] == 64 // (2 * 8)  # each rank takes half of every epoch
    assert ddp["test/vqa_questions"] == 30 and ddp["val/vqa_questions"] == 16  # counts summed over both ranks
    # The pipeline's num_image_tokens (default 1) is linked from the connector (16) at instantiation, so it is not in
    # config.yaml; a wrong count would stop the run at the model's per-sample image-token check.
    single = tmp_path / "single"  # one process on the same checkpoint: the same questions, the same scores
    run_cli("test", "--config", TINY, *flags(shapes), f"--ckpt_path={run}/checkpoints/best.ckpt",
            f"--trainer.default_root_dir={single}", timeout=600)
    one = json.loads((single / "summary.json").read_text())
    for name in [k for k in ddp if k.startswith("test/vqa_exact_match")]:
        assert one[name] == pytest.approx(ddp[name]), name


RECIPES = sorted((REPO / "experiments" / "recipes").glob("*.yaml"))
RECIPE_STAGES = [(r, s["name"]) for r in RECIPES for s in yaml.safe_load(r.read_text())["stages"]]


@pytest.fixture(scope="module")
def builtin_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in shapes world (shards + chat tokenizer) at its default relative location under a tmp dir."""
    from data.prepare import prepare_shapes

    root = tmp_path_factory.mktemp("builtin")
    prepare_shapes(out_dir=root / "data/shards/shapes", train=64, val=16, test=16, progress=False)
    return root


def _stage_cli(recipe: Path, stage: dict, out: Path, exports: frozenset[str]):
    """The MMLightningCLI of a training stage, built (not run) from the recipe's own command line for it."""
    from experiments.run import MMLightningCLI

    cmd = stage_command({**stage, "configs": [str(REPO / c) for c in stage["configs"]]}, out, [], [], exports)
    args = cmd[cmd.index("fit") + 1:]
    return MMLightningCLI(args=[*args, "--prepare_data=false", "--logger=none", f"--trainer.default_root_dir={out}"],
                          run=False)


def _materialise(recipe: Path, name: str, out: Path, exports: frozenset[str]) -> None:
    """What stage ``name`` hands on, made for real: a training stage's checkpoint (its task as built, saved with the
    task's own hook), an export stage's directory (experiments.export of the checkpoint it names)."""
    import torch

    from experiments.export import export

    stages = {s["name"]: s for s in yaml.safe_load(recipe.read_text())["stages"]}
    stage = stages[name]
    if "export" in stage:
        source = stage["export"]["from"]
        _materialise(recipe, source, out, exports)
        export(str(out / source / "checkpoints" / "best.ckpt"), stage["export"]["to"], str(out / name))
        return
    for earlier in set((stage.get("inputs") or {}).values()):
        if not (out / earlier).exists():
            _materialise(recipe, earlier, out, exports)
    task = _stage_cli(recipe, stage, out, exports).model
    ckpt = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(ckpt)
    (out / name / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, out / name / "checkpoints" / "best.ckpt")


@pytest.mark.parametrize(("recipe", "name"), RECIPE_STAGES, ids=[f"{r.stem}-{n}" for r, n in RECIPE_STAGES])
def test_every_stage_of_a_shipped_recipe_builds(recipe: Path, name: str, builtin_shapes: Path, tmp_path: Path,
                                                monkeypatch) -> None:
    """Each stage's stacked configs (stage fragments such as stages/mllm_lm.yaml on a connector config) and
    flags parse and build model, data and trainer. Checkpoint inputs are read only at fit (empty files stand in);
    an export stage's directory is read when the model is built, so it is made for real: the stage it exports is
    built, saved and exported by experiments.export. An export stage's own command is the export's."""
    import lightning as L

    stages = yaml.safe_load(recipe.read_text())["stages"]
    stage = next(s for s in stages if s["name"] == name)
    exports = frozenset(s["name"] for s in stages if "export" in s)
    monkeypatch.chdir(builtin_shapes)
    monkeypatch.setattr(sys, "argv", ["experiments.run"])
    monkeypatch.setenv("MM_RUN_DIR", str(tmp_path))
    if "export" in stage:
        (tmp_path / stage["export"]["from"] / "checkpoints").mkdir(parents=True)
        (tmp_path / stage["export"]["from"] / "checkpoints" / "best.ckpt").touch()
        cmd = stage_command(stage, tmp_path, [], [], exports)
        assert cmd[1:] == ["-m", "experiments.export",
                           f"--ckpt={tmp_path / stage['export']['from'] / 'checkpoints' / 'best.ckpt'}",
                           f"--to={stage['export']['to']}", f"--out={tmp_path / name}"]
        return
    for source in (stage.get("inputs") or {}).values():
        if source in exports:
            if not (tmp_path / source).exists():
                _materialise(recipe, source, tmp_path, exports)
        else:  # the earlier stages' checkpoints, read only at fit
            (tmp_path / source / "checkpoints").mkdir(parents=True, exist_ok=True)
            (tmp_path / source / "checkpoints" / "best.ckpt").touch()
    cli = _stage_cli(recipe, stage, tmp_path, exports)
    assert isinstance(cli.model, L.LightningModule) and isinstance(cli.trainer, L.Trainer)
    assert cli.datamodule.shard_list("train")
    if name in ("lm", "align"):  # the fragment took effect: its stage and its pipeline
        assert cli.model.stage == name
        pipeline = {"lm": "TextPipeline", "align": "CaptionPipeline"}[name]
        assert type(cli.datamodule.pipeline).__name__ == pipeline
    for flag, source in (stage.get("inputs") or {}).items():  # an exported directory is what the stage loaded
        if source in exports and flag == "model.init_args.vision":
            assert type(cli.model.model.vision.model).__name__ == "SiglipVisionModel"
        if source in exports and flag == "model.init_args.lm":  # from_pretrained records where it read from
            assert cli.model.model.lm.config._name_or_path == str(tmp_path / source)


def recipe_file(tmp_path: Path) -> Path:
    recipe = {
        "stages": [
            {"name": "lm", "configs": [TINY, LM_STAGE], "args": ["--trainer.max_epochs=1", "--data.batch_size=16"]},
            {"name": "instruct", "configs": [TINY], "inputs": {"model.init_args.init": "lm"}},
        ]
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_recipe(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "experiments.recipe", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_recipe_hands_checkpoints_on_skips_complete_stages_and_resumes(shapes, tmp_path) -> None:
    recipe, out = recipe_file(tmp_path), tmp_path / "out"
    common = ["--out", str(out), *[f"--override=*:{f}" for f in flags(shapes)]]
    proc = run_recipe(str(recipe), *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "recipe.summary.json").read_text())  # named after recipe.yaml
    assert summary["test/vqa_questions"] == 30  # the final stage's metrics, flat
    assert summary["lm"]["steps"] == 64 // 16 and "test/loss" in summary["lm"] and "test/vqa_questions" not in summary["lm"]
    assert summary["instruct"]["steps"] == 64 // 8 and summary["instruct"]["stage_wall_time_s"] > 0
    instruct = yaml.safe_load((out / "instruct" / "config.yaml").read_text())
    assert instruct["model"]["init_args"]["init"] == str(out / "lm" / "checkpoints" / "best.ckpt")
    again = run_recipe(str(recipe), *common)  # everything complete: nothing runs again
    assert again.returncode == 0 and again.stdout.count(", skipped\n") == 2, again.stdout  # not test/data_skipped
    (out / "instruct" / "stage.json").unlink()  # as if the process had died after its last checkpoint
    resumed = run_recipe(str(recipe), *common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming the interrupted run" in resumed.stdout and "--ckpt_path last" in resumed.stdout
    changed = run_recipe(str(recipe), *common, "--override=instruct:--model.init_args.lr=0.1")
    assert changed.returncode == 2 and "complete in" in changed.stderr and "another command" in changed.stderr


def test_recipe_errors_name_the_stage_and_key(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"stages": [{"name": "a", "configs": [TINY], "inputs": {"model.init_args.init": "b"}}]}))
    proc = run_recipe(str(bad), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "stage 'a': input model.init_args.init comes from 'b'" in proc.stderr
    bad.write_text(yaml.safe_dump({"stages": [{"name": "a", "configs": ["nope.yaml"]}]}))
    proc = run_recipe(str(bad), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "config nope.yaml: no such file" in proc.stderr
    bad.write_text(yaml.safe_dump({"stages": [{"name": "a", "configs": [TINY], "config": 1}]}))
    proc = run_recipe(str(bad), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "unknown key(s) config" in proc.stderr
