"""experiments.run end to end: run directory, summary, learning, bad data, config errors, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mm_lightning.checkpoint import load_checkpoint
from tests.conftest import REPO
from tests.test_datamodule import _corrupt_shards

TINY = str(REPO / "tests" / "configs" / "tiny_vit.yaml")


def run_cli(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.run", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}")
    return proc


def data_flags(shards: dict[str, str]) -> list[str]:
    return [f"--data.{split}={spec}" for split, spec in shards.items()]


def test_fit_writes_run_directory_learns_and_tests_best_checkpoint(colour_shards, tmp_path):
    run = tmp_path / "run"
    proc = run_cli("fit", "--config", TINY, *data_flags(colour_shards), f"--trainer.default_root_dir={run}", "--logger=wandb")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test/acc"] >= 0.9, summary  # chance is 0.25
    assert summary["epochs"] == 2 and summary["steps"] == 2 * 256 // 32
    assert summary["data/skipped"] == 0
    for name in ("config.yaml", "checkpoints/last.ckpt", "checkpoints/best.ckpt", "confusion_matrix.png"):
        assert (run / name).exists(), name
    assert list((run / "wandb").glob("offline-run-*")), "W&B offline run missing"
    assert f"Run directory: {run}" in proc.stdout and "test/acc:" in proc.stdout
    # the best checkpoint is what was tested
    best = load_checkpoint(run / "checkpoints" / "best.ckpt")  # our checkpoints load weights-only
    assert "val/acc" in str(best["callbacks"])


def test_corrupt_data_is_skipped_and_reported(colour_shards, tmp_path):
    spec = _corrupt_shards(tmp_path / "bad")
    run = tmp_path / "run"
    run_cli("fit", "--config", TINY, *data_flags({**colour_shards, "test": spec}), f"--trainer.default_root_dir={run}",
            "--trainer.max_epochs=1")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test/data_skipped"] == 3  # garbage image, missing label, the truncated shard's cut
    proc = run_cli("test", "--config", TINY, f"--data.test={spec}", "--data.strict=true",
                   f"--ckpt_path={run}/checkpoints/last.ckpt", f"--trainer.default_root_dir={tmp_path / 'strict'}",
                   check=False)
    assert proc.returncode != 0
    assert "bad-a-000000.tar" in proc.stderr and "garbage0003" in proc.stderr


def test_misspelt_config_key_fails_naming_it(colour_shards, tmp_path):
    proc = run_cli("fit", "--config", TINY, *data_flags(colour_shards), "--model.init_args.lrr=0.1",
                   f"--trainer.default_root_dir={tmp_path}", check=False)
    assert proc.returncode != 0 and "lrr" in proc.stderr
    bad = tmp_path / "typo.yaml"
    bad.write_text("data:\n  bach_size: 8\n")
    proc = run_cli("fit", "--config", TINY, "--config", str(bad), check=False)
    assert proc.returncode != 0 and "bach_size" in proc.stderr


def test_missing_shards_fail_before_training_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere-*.tar"
    proc = run_cli("fit", "--config", TINY, f"--data.train={missing}", f"--trainer.default_root_dir={tmp_path / 'r'}",
                   check=False)
    assert proc.returncode != 0 and str(missing) in proc.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_existing_run_is_not_overwritten(colour_shards, tmp_path):
    run = tmp_path / "run"
    run_cli("fit", "--config", TINY, *data_flags(colour_shards), f"--trainer.default_root_dir={run}", "--trainer.max_epochs=1")
    before = (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    proc = run_cli("fit", "--config", TINY, *data_flags(colour_shards), f"--trainer.default_root_dir={run}", check=False)
    assert proc.returncode != 0 and "already holds a run" in proc.stderr
    assert (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns == before


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_from_last_completes(colour_shards, tmp_path):
    run = tmp_path / "run"
    args = ["fit", "--config", TINY, *data_flags(colour_shards), f"--trainer.default_root_dir={run}",
            "--trainer.max_epochs=3", "--checkpoint_every_n_steps=3", "--data.batch_size=16",
            "--trainer.callbacks+=tests.helpers.SlowSteps", "--trainer.callbacks.seconds=0.15"]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "experiments.run", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    killed_at = None
    while time.monotonic() < deadline and proc.poll() is None:
        if last.exists():
            try:
                ckpt = load_checkpoint(last)
            except Exception:  # being written
                time.sleep(0.05)
                continue
            if ckpt["epoch"] >= 1 and ckpt["global_step"] % 16 != 0:  # inside epoch 2 (16 steps an epoch)
                killed_at = ckpt["global_step"]
                os.killpg(proc.pid, signal.SIGKILL)
                break
        time.sleep(0.05)
    proc.wait(timeout=30)
    assert killed_at is not None, "the run ended before it could be killed mid-epoch"
    assert not (run / "summary.json").exists()
    run_cli(*args[:-2], "--ckpt_path=last")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["steps"] == 3 * 16
    assert summary["test/acc"] >= 0.9
