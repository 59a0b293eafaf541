"""Reliability and security (issue 10): no code runs from a checkpoint, no run is overwritten, no failure
exits 0, no bad sample goes uncounted. Each test names the fault it shows; docs/reliability.md lists them."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.run_dir import RunDirClaim, RunDirInUse, new_run_dir_name, run_state
from mm_lightning.checkpoint import SAFE_GLOBALS, UnsafeCheckpointError, load_checkpoint
from mm_lightning.checkpoint_io import CheckpointSaveError, atomic_torch_save
from mm_lightning.data.datamodule import BadSampleError, WebDataModule
from mm_lightning.data.samples import ClassificationPipeline
from mm_lightning.data.shards import count_tar_samples, read_sizes, write_shards
from tests.conftest import REPO, colour_image, png_bytes
from tests.test_datamodule import whole_samples_before
from tests.test_run import TINY, data_flags, run_cli

PIPE = ClassificationPipeline(16, (1.0, 1.0), False, (0.5,) * 3, (0.5,) * 3)
MARKER_NAME = "PWNED"


# ----------------------------------------------------------------------------------------- helpers
class _RunsCode:
    """Unpickling this runs ``os.system``: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_checkpoint(directory: Path) -> tuple[Path, Path]:
    """A Lightning-looking checkpoint whose unpickling writes a marker file; returns (checkpoint, marker)."""
    marker = directory / MARKER_NAME
    path = directory / "crafted.ckpt"
    torch.save({"epoch": 0, "global_step": 0, "state_dict": {}, "hyper_parameters": {}, "x": _RunsCode(marker)}, path)
    return path, marker


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The last stderr line; the test also requires that no traceback was printed."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _dm(**kw) -> WebDataModule:
    kw.setdefault("pipeline", PIPE)
    kw.setdefault("num_workers", 0)
    kw.setdefault("batch_size", 8)
    return WebDataModule(**kw)


def _good(i: int, rng: np.random.Generator, label: int | None = None) -> dict:
    return {"__key__": f"good{i:04d}", "png": png_bytes(colour_image(i % 4, rng)), "cls": i % 4 if label is None else label}


def _eval(dm: WebDataModule, split: str = "test") -> tuple[int, list[str]]:
    """(samples seen, warning messages) of one evaluation pass, skip counts summed as the trainer does."""
    import warnings

    from types import SimpleNamespace

    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=0, training=False, validating=split == "val",
                                 sanity_checking=False, testing=split == "test")
    dm.setup("test" if split == "test" else "validate")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loader = dm.test_dataloader() if split == "test" else dm.val_dataloader()
        seen = sum(len(dm.on_before_batch_transfer(b, 0)["label"]) for b in loader)
    return seen, [str(w.message) for w in record]


# ------------------------------------------------------------------- 1. code execution from a checkpoint
def test_no_weights_only_false_and_no_trust_remote_code_in_the_code():
    offenders = []
    for folder in ("mm_lightning", "experiments", "data"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            for needle in ("weights_only=False", "trust_remote_code=True"):
                if needle in text:
                    offenders.append(f"{path.relative_to(REPO)}: {needle}")
    assert offenders == []


def test_crafted_checkpoint_is_refused_naming_the_file_and_runs_nothing(tmp_path, colour_shards):
    """The safe loader, and the run's checkpoint-io plugin, refuse it; a real checkpoint of ours loads without
    any allow-listed type (SAFE_GLOBALS is empty: nothing beyond tensors and plain containers is needed)."""
    from mm_lightning.checkpoint_io import SafeCheckpointIO

    path, marker = crafted_checkpoint(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match=r"crafted\.ckpt.*refused.*posix\.system"):
        load_checkpoint(path, "--ckpt_path")
    with pytest.raises(UnsafeCheckpointError, match="crafted"):
        SafeCheckpointIO().load_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError, match="not weights-only is refused"):
        SafeCheckpointIO().load_checkpoint(path, weights_only=False)
    assert not marker.exists()
    assert SAFE_GLOBALS == []


@pytest.mark.slow
def test_crafted_checkpoint_is_refused_through_every_path_that_loads_one(tmp_path, colour_shards):
    """fit --ckpt_path, test --ckpt_path, CLIP's --model.init_args.image_init, experiments.quantize --ckpt:
    non-zero exit, one line naming the file, the marker never written, nothing written into the run dir."""
    from data.prepare import main as prepare
    from tests.test_clip import CONFIG, write_img2dataset_shards

    path, marker = crafted_checkpoint(tmp_path)
    runs = tmp_path / "runs"
    fit = run_cli("fit", "--config", TINY, *data_flags(colour_shards), f"--trainer.default_root_dir={runs / 'fit'}",
                  f"--ckpt_path={path}", check=False)
    test = run_cli("test", "--config", TINY, f"--data.test={colour_shards['test']}", f"--ckpt_path={path}",
                   f"--trainer.default_root_dir={runs / 'test'}", check=False)
    train = write_img2dataset_shards(tmp_path / "i2d", 2, 16, seed=1)
    tokenizer = tmp_path / "tokenizer.json"
    prepare(["tokenizer", "--shards", train, "--out", str(tokenizer), "--vocab-size", "300"])
    config = tmp_path / "clip.yaml"
    config.write_text(CONFIG.replace("TOKENIZER", str(tokenizer)))
    clip = run_cli("fit", "--config", str(config), f"--data.train={train}", "--trainer.max_epochs=1",
                   f"--model.init_args.image_init={path}", f"--trainer.default_root_dir={runs / 'clip'}", check=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    quant = subprocess.run([sys.executable, "-m", "experiments.quantize", "--ckpt", str(path), "--method", "int8-dynamic",
                            "--config", TINY, "--out", str(runs / "quant")], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
    for name, proc in (("fit", fit), ("test", test), ("clip image_init", clip), ("quantize", quant)):
        assert proc.returncode != 0, name
        line = error_line(proc)
        assert line.startswith("error:") and str(path) in line and "refused" in line, (name, line)
    assert not marker.exists()
    assert not (runs / "fit").exists() and not (runs / "test").exists()  # refused before the directory was made


# --------------------------------------------------------------------- 2. a failing checkpoint save
def test_atomic_save_raises_naming_the_path_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "ck" / "last.ckpt"
    atomic_torch_save({"w": torch.ones(3)}, target)
    before = target.read_bytes()
    os.chmod(target.parent, 0o555)
    try:
        if os.access(target.parent, os.W_OK):  # root ignores the mode: make the write itself fail, as on a full disk
            real_open = open

            def full_disk(file, mode="r", *args, **kwargs):
                handle = real_open(file, mode, *args, **kwargs)
                if "x" in mode:
                    handle.write = lambda data: (_ for _ in ()).throw(OSError(28, "No space left on device"))
                return handle

            monkeypatch.setattr("builtins.open", full_disk)
        with pytest.raises(CheckpointSaveError, match=rf"could not save checkpoint {target}: .*errno"):
            atomic_torch_save({"w": torch.zeros(3)}, target)
    finally:
        monkeypatch.undo()
        os.chmod(target.parent, 0o755)
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


def _unprivileged() -> list[str]:
    """A prefix that runs a command without root's power to write into read-only directories."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a read-only directory cannot be made to refuse writes")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["readonly", "full"])
def test_failed_checkpoint_save_stops_the_run_naming_the_path(mode, colour_shards, tmp_path):
    """After epoch 0's checkpoints, the checkpoint directory turns read-only (``readonly``) or writes beyond
    64 KiB fail as on a full disk (``full``): the save at the end of epoch 1 stops the run, exit 1, naming the
    path; epoch 0's checkpoints are untouched; no temporary file is left, in the run or in $TMPDIR."""
    run, tmp = tmp_path / "run", tmp_path / "tmpdir"
    tmp.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)}
    cmd = [*_unprivileged(), sys.executable, "-m", "experiments.run", "fit", "--config", TINY, *data_flags(colour_shards),
           "--trainer.max_epochs=3", "--trainer.callbacks+=tests.reliability_helpers.BreakCheckpointDir",
           "--trainer.callbacks.after_step=10", f"--trainer.callbacks.mode={mode}", f"--trainer.default_root_dir={run}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    ckpts = run / "checkpoints"
    line = error_line(proc)
    assert line.startswith(f"error: could not save checkpoint {ckpts}/") and "the previous checkpoint is kept" in line
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt"]
    for name in ("best.ckpt", "last.ckpt"):
        assert load_checkpoint(ckpts / name)["global_step"] == 8  # epoch 0's, intact
    big = [p for p in tmp.rglob("*") if p.is_file() and p.stat().st_size > 100_000]
    assert big == []
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and str(ckpts) in summary["error"]


# ------------------------------------------------------------------------------- 3. non-finite loss
@pytest.mark.slow
def test_non_finite_loss_stops_the_run_or_is_skipped_and_counted(colour_shards, tmp_path):
    """Batches 2 and 5 of every epoch give a NaN loss. Default: exit 1 at the first, naming epoch, step and
    batch; no checkpoint; summary.json holds ``"nan"`` (valid JSON). ``--on_nonfinite_loss skip``: exactly
    3 x 2 updates skipped in 3 epochs, the run still learns (test/acc >= 0.5, chance 0.25; one NaN update
    would leave NaN weights and chance accuracy) and exits 0."""
    model = ["--model.class_path=tests.reliability_helpers.NanLossOnBatches", "--model.init_args.nan_batches=[2, 5]"]
    stop = run_cli("fit", "--config", TINY, *model, *data_flags(colour_shards),
                   f"--trainer.default_root_dir={tmp_path / 'stop'}", check=False)
    assert stop.returncode == 1
    assert error_line(stop).startswith("error: non-finite training loss (nan) at epoch 0, step 2, batch 2 of the epoch")
    assert not (tmp_path / "stop" / "checkpoints").exists()
    text = (tmp_path / "stop" / "summary.json").read_text()
    summary = json.loads(text)  # strict JSON: no bare NaN
    assert summary["status"] == "failed" and summary["train/returned_loss"] == "nan" and "NaN" not in text
    skip = run_cli("fit", "--config", TINY, *model, *data_flags(colour_shards), "--on_nonfinite_loss=skip",
                   "--trainer.max_epochs=3", f"--trainer.default_root_dir={tmp_path / 'skip'}")
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["train/nonfinite_skipped"] == 6 and summary["status"] == "finished"
    assert summary["test/acc"] >= 0.5, summary
    assert "skipped the update of a non-finite training loss" in skip.stderr


@pytest.mark.slow
def test_a_non_finite_model_is_never_saved_as_best_or_last(colour_shards, tmp_path):
    """Weights turned NaN before the first step, updates skipped: the first validation gives a finite val/acc
    (chance) but a NaN val/loss, and Lightning saved that model as best.ckpt and last.ckpt. Here: not as best
    (a non-finite validation metric), and, without validation (no monitor: every epoch is "best"), not at all
    (NaN weights); the run stops after 10 non-finite steps in a row, exit 1."""
    poison = ["--on_nonfinite_loss=skip", "--trainer.callbacks+=tests.reliability_helpers.PoisonWeights"]
    for name, data in (("val", data_flags(colour_shards)), ("noval", [f"--data.train={colour_shards['train']}"])):
        run = tmp_path / name
        proc = run_cli("fit", "--config", TINY, *data, *poison, f"--trainer.default_root_dir={run}", check=False)
        assert proc.returncode == 1 and "non-finite steps in a row" in error_line(proc), name
        assert not (run / "checkpoints" / "best.ckpt").exists() and not (run / "checkpoints" / "last.ckpt").exists()
        expected = "val/loss=nan: this checkpoint is not taken as the best" if name == "val" else "is not overwritten"
        assert expected in proc.stderr, name


# ---------------------------------------------------------------------------- 4. runs get overwritten
def _files(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_runs_are_never_overwritten_and_a_refused_resume_writes_nothing(colour_shards, tmp_path):
    """(a) fit --ckpt_path A/last.ckpt into B, a finished run: refused, B unchanged. (c) resuming B with fewer
    max_epochs than its checkpoint's epoch: refused before config.yaml is rewritten. Resuming B in place works."""
    a, b = tmp_path / "A", tmp_path / "B"
    for root in (a, b):
        run_cli("fit", "--config", TINY, *data_flags(colour_shards), "--trainer.max_epochs=2",
                f"--trainer.default_root_dir={root}", "--test_after_fit=false")
    assert load_checkpoint(b / "checkpoints" / "last.ckpt")["epoch"] == 1
    before = _files(b)
    other = run_cli("fit", "--config", TINY, *data_flags(colour_shards), f"--ckpt_path={a}/checkpoints/last.ckpt",
                    f"--trainer.default_root_dir={b}", check=False)
    assert other.returncode == 2 and "already holds a run" in error_line(other) and "is not one of its" in error_line(other)
    resume = run_cli("fit", "--config", TINY, *data_flags(colour_shards), "--ckpt_path=last", "--trainer.max_epochs=0",
                     f"--trainer.default_root_dir={b}", check=False)
    assert resume.returncode == 2 and "is at epoch 1, beyond --trainer.max_epochs=0" in error_line(resume)
    assert _files(b) == before  # nothing written: not config.yaml, not summary.json, not a checkpoint
    # refused at restore time, by Lightning: B's own checkpoint, its hyper-parameters edited to a wider ViT, so the
    # model built from them does not fit its weights (the early checks read only the epoch and the hyper-parameters)
    ckpt = load_checkpoint(b / "checkpoints" / "last.ckpt")
    ckpt["hyper_parameters"]["backbone_kwargs"] = {**ckpt["hyper_parameters"]["backbone_kwargs"], "embed_dim": 48}
    torch.save(ckpt, b / "checkpoints" / "misfit.ckpt")
    before = _files(b)
    misfit = run_cli("fit", "--config", TINY, *data_flags(colour_shards), f"--ckpt_path={b}/checkpoints/misfit.ckpt",
                     "--trainer.max_epochs=3", f"--trainer.default_root_dir={b}", check=False)
    assert misfit.returncode != 0 and "size mismatch" in misfit.stderr, misfit.stderr[-2000:]
    after = _files(b)
    assert after.pop(".run.lock") != before.pop(".run.lock")  # it did claim B (its own checkpoint) ...
    assert after == before  # ... and wrote nothing else: config.yaml is written only once training starts
    (b / "checkpoints" / "misfit.ckpt").unlink()
    run_cli("fit", "--config", TINY, *data_flags(colour_shards), "--ckpt_path=last", "--trainer.max_epochs=3",
            f"--trainer.default_root_dir={b}", "--test_after_fit=false")
    assert json.loads((b / "summary.json").read_text())["steps"] == 24


def _claim_default(args: tuple[str, str, object]) -> str:
    base, name, barrier = args
    barrier.wait()  # all processes pick their name in the same instant
    path = new_run_dir_name(base, name)
    claim = RunDirClaim(path, new=True)
    time.sleep(0.5)
    claim.release()
    return path


def _claim_explicit(args: tuple[str, object]) -> str:
    root, barrier = args
    barrier.wait()
    try:
        claim = RunDirClaim(root)
    except RunDirInUse:
        return "refused"
    time.sleep(1.0)  # hold it while the others try
    claim.release()
    return "claimed"


def test_runs_started_together_never_share_a_directory(tmp_path):
    """(b) three runs with default directories get three; three runs into one directory: one runs, two refused.
    A claim dies with its process (flock), so a killed run never blocks its directory."""
    ctx = mp.get_context("fork")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(3)
        with ctx.Pool(3) as pool:
            paths = pool.map(_claim_default, [(str(tmp_path / "runs"), "exp", barrier)] * 3)
        assert len(set(paths)) == 3 and all(Path(p).is_dir() for p in paths)
        barrier = manager.Barrier(3)
        with ctx.Pool(3) as pool:
            outcomes = pool.map(_claim_explicit, [(str(tmp_path / "one"), barrier)] * 3)
    assert sorted(outcomes) == ["claimed", "refused", "refused"]
    with pytest.raises(RunDirInUse):  # a new run's directory is created exclusively, never entered
        RunDirClaim(paths[0], new=True)
    killed = ctx.Process(target=lambda: (RunDirClaim(str(tmp_path / "k")), time.sleep(60)))
    killed.start()
    deadline = time.monotonic() + 30
    while not (tmp_path / "k" / ".run.lock").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    with pytest.raises(RunDirInUse, match="in use by another run"):
        RunDirClaim(str(tmp_path / "k"))
    os.kill(killed.pid, signal.SIGKILL)
    killed.join()
    RunDirClaim(str(tmp_path / "k")).release()


def test_what_holds_a_run(tmp_path):
    assert not run_state(str(tmp_path)).holds_run
    (tmp_path / "config.yaml").write_text("x: 1\n")  # killed before its first checkpoint: may start over
    (tmp_path / "summary.json").write_text('{"status": "failed"}')
    assert not run_state(str(tmp_path)).holds_run
    (tmp_path / "summary.json").write_text('{"test/acc": 1.0}')  # a summary from before status existed
    assert run_state(str(tmp_path)).holds_run
    (tmp_path / "summary.json").unlink()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert run_state(str(tmp_path)).holds_run


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_restarts_in_place(colour_shards, tmp_path):
    run = tmp_path / "run"
    args = ["fit", "--config", TINY, *data_flags(colour_shards), "--trainer.max_epochs=1",
            "--trainer.callbacks+=tests.helpers.SlowSteps", "--trainer.callbacks.seconds=1.0",
            f"--trainer.default_root_dir={run}", "--test_after_fit=false"]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "experiments.run", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (run / "config.yaml").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert (run / "config.yaml").exists() and not (run / "checkpoints").exists()
    last = run_cli(*args[:-1], "--ckpt_path=last", check=False)
    assert last.returncode == 2 and "rerun without --ckpt_path to start it over in place" in error_line(last)
    run_cli(*args[:4], "--trainer.max_epochs=1", f"--trainer.default_root_dir={run}", "--test_after_fit=false")
    assert json.loads((run / "summary.json").read_text())["steps"] == 8


# ------------------------------------------------------------------ 5. shards without sizes.json
def _broken_shards(directory: Path) -> tuple[str, int]:
    """Three shards without sizes.json: 12 good samples, a zero-byte shard, and 12 samples cut inside the 8th
    sample's image. Returns (spec, readable sample count)."""
    rng = np.random.default_rng(0)
    write_shards([_good(i, rng) for i in range(12)], directory, "a", max_count=100)
    write_shards([_good(i, rng) for i in range(100, 112)], directory, "c", max_count=100)
    (directory / "b-000000.tar").write_bytes(b"")
    cut_tar = directory / "c-000000.tar"
    data = cut_tar.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        png = next(m for m in tar.getmembers() if m.name == "good0107.png")
    cut = png.offset_data + png.size // 2
    cut_tar.write_bytes(data[:cut])
    (directory / "sizes.json").unlink()
    return str(directory / "*.tar"), 12 + whole_samples_before(data, cut)


def test_zero_byte_and_truncated_shards_without_sizes_are_counted_skipped_and_named(tmp_path):
    spec, readable = _broken_shards(tmp_path)
    assert readable == 12 + 7
    assert [count_tar_samples(str(tmp_path / n)) for n in ("a-000000.tar", "b-000000.tar", "c-000000.tar")] == [12, 0, 7]
    dm = _dm(test=spec)
    seen, messages = _eval(dm)
    assert seen == readable and dm.num_skipped["test"] == 2  # the empty shard, the cut sample
    assert any("b-000000.tar" in m and "not a readable tar" in m for m in messages)
    assert any("c-000000.tar" in m and "good0107" in m and "good0107.png" in m for m in messages)
    train = _dm(train=spec, batch_size=4, num_workers=0)
    train.trainer = type("T", (), {"global_rank": 0, "world_size": 1, "current_epoch": 0, "training": True})()
    train.setup("fit")
    assert len(train.train_dataloader()) == readable // 4
    with pytest.raises(BadSampleError, match=r"b-000000\.tar holds no readable sample"):
        _dm(test=spec, strict=True).test_dataloader()


def test_img2dataset_stats_give_the_size_of_a_shard(tmp_path):
    from tests.test_clip import write_img2dataset_shards

    write_img2dataset_shards(tmp_path, 2, 5, seed=0)
    (tmp_path / "00001_stats.json").write_text(json.dumps({"count": 9, "successes": 7}))  # read, not counted
    assert read_sizes([str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]) == {
        str(tmp_path / "00000.tar"): 5, str(tmp_path / "00001.tar"): 7}


@pytest.mark.slow
def test_broken_train_and_test_shards_do_not_crash_a_run(tmp_path):
    """Shards without sizes.json, one zero-byte and one truncated in train and in test: the run trains, tests,
    and counts them (the zero-byte shard and the cut sample: 2 a pass), exit 0."""
    train, _ = _broken_shards(tmp_path / "train")
    test, readable = _broken_shards(tmp_path / "test")
    run = tmp_path / "run"
    proc = run_cli("fit", "--config", TINY, f"--data.train={train}", f"--data.val={test}", f"--data.test={test}",
                   "--data.batch_size=4", "--trainer.max_epochs=2", f"--trainer.default_root_dir={run}")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test/data_skipped"] == 2 and summary["val/data_skipped"] == 2
    assert summary["data/skipped"] == 2 and summary["data/skipped_total"] == 4  # per epoch; both epochs
    assert "b-000000.tar" in proc.stderr and "good0107" in proc.stderr


# --------------------------------------------------------------------------- 6. bad-data accounting
@pytest.mark.parametrize("cut", [-1, -2], ids=["in the last member", "in the first member of the last sample"])
def test_a_tar_cut_in_its_last_member_keeps_the_sample_before_and_names_the_cut_one(cut, tmp_path):
    """Cut inside good0004.png (good0003 was complete when good0004.cls was read), or inside good0004.cls (the
    cut member starts the next sample: good0003 is complete and must still be yielded)."""
    rng = np.random.default_rng(1)
    write_shards([_good(i, rng) for i in range(5)], tmp_path, "t", max_count=100)
    tar = tmp_path / "t-000000.tar"
    data = tar.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        member = t.getmembers()[cut]  # good0004.png, good0004.cls
    assert member.name == ("good0004.png" if cut == -1 else "good0004.cls")
    tar.write_bytes(data[: member.offset_data + min(10, member.size - 1)])  # the .cls holds 1 byte: cut before it
    seen, messages = _eval(_dm(test=str(tar)))
    assert seen == 4  # good0000-good0003, good0003 included
    assert any("sample 'good0004'" in m and f"member {member.name}" in m for m in messages), messages


def test_a_skip_after_the_last_batch_is_counted(tmp_path):
    """The last samples of a stream are bad: no batch follows to carry the count (it was 0). Two shards, the second
    all bad: with two workers the second worker yields no batch at all, only its count."""
    rng = np.random.default_rng(2)
    samples = [_good(i, rng) for i in range(16)]
    samples += [{"__key__": f"bad{i}", "png": b"not a png", "cls": 0} for i in range(3)]
    write_shards(samples, tmp_path, "s", max_count=16)
    assert sorted(p.name for p in tmp_path.glob("s-*.tar")) == ["s-000000.tar", "s-000001.tar"]
    for workers in (0, 1, 2):
        dm = _dm(test=str(tmp_path / "s-*.tar"), batch_size=8, num_workers=workers)
        seen, _ = _eval(dm)
        assert (seen, dm.num_skipped["test"]) == (16, 3), workers


def test_a_label_outside_the_classes_is_skipped_naming_shard_key_and_classes(tmp_path):
    from mm_lightning.data.shards import write_manifest

    rng = np.random.default_rng(3)
    samples = [_good(i, rng) for i in range(10)]
    samples[4] = _good(4, rng, label=9)
    write_shards(samples, tmp_path, "l", max_count=100)
    write_manifest(tmp_path, classes=["red", "green", "blue", "yellow"])
    dm = _dm(test=str(tmp_path / "l-*.tar"))
    seen, messages = _eval(dm)
    assert (seen, dm.num_skipped["test"]) == (9, 1)
    assert any("l-000000.tar" in m and "good0004" in m and "label 9" in m and "4 classes" in m for m in messages)
    strict = _dm(test=str(tmp_path / "l-*.tar"), strict=True)
    strict.setup("test")
    with pytest.raises(BadSampleError, match=r"l-000000\.tar, sample 'good0004'.*label 9 is outside \[0, 4\)"):
        list(strict.test_dataloader())


# Shards as another tool writes them (no manifest.json): 4 colours, one `.cls` of 9 in each split (sample 5).
LABEL_TASKS = {
    "classification": ("tiny_vit", [], "model.init_args.num_classes"),
    "metric learning": ("metric", ["--model.init_args.num_classes=4"], "model.init_args.num_classes"),
    "zero-shot class names": ("clip", [], "the ZeroShotClassification callback's 4 class_names"),
}


def _label9_shards(directory: Path, bad: int = 5) -> list[str]:
    """train 33 samples (32 good: 4 batches of 8 in one pass), val and test 16; sample ``bad`` of each has label 9."""
    rng = np.random.default_rng(4)
    names = ["red", "green", "blue", "yellow"]
    for split, n in (("train", 33), ("val", 16), ("test", 16)):
        samples = []
        for i in range(n):
            label = 9 if i == bad else i % 4
            samples.append({"__key__": f"{split}{i:04d}", "png": png_bytes(colour_image(i % 4, rng)), "cls": label,
                            "txt": f"a photo of a {names[i % 4]} square"})
        write_shards(samples, directory, split, max_count=100)
    assert not (directory / "manifest.json").exists()
    return [f"--data.{split}={directory}/{split}-*.tar" for split in ("train", "val", "test")]


def _label_task_config(task: str, tmp_path: Path) -> str:
    import yaml

    if task == "tiny_vit":
        return TINY
    if task == "clip":
        from mm_lightning.data.tokenizer import train_bpe_tokenizer
        from tests.test_clip import CONFIG

        tokenizer = tmp_path / "tokenizer.json"
        captions = [f"a photo of a {c} square" for c in ("red", "green", "blue", "yellow")]
        train_bpe_tokenizer(captions * 4, vocab_size=300).save(str(tokenizer))
        text = CONFIG.replace("TOKENIZER", str(tokenizer))
    else:
        config = yaml.safe_load(Path(TINY).read_text())
        config["model"] = {"class_path": "mm_lightning.tasks.metric.MetricLearner",
                           "init_args": {"backbone": "vit_tiny_patch16_224", "embed_dim": 16, "lr": 3e-3,
                                         "backbone_kwargs": config["model"]["init_args"]["backbone_kwargs"]}}
        config["trainer"]["callbacks"] = [{"class_path": "mm_lightning.callbacks.probe.Probe",
                                           "init_args": {"probe_l2": [1e-3], "random_init": False}}]
        text = yaml.safe_dump(config)
    path = tmp_path / f"{task}.yaml"
    path.write_text(text)
    return str(path)


def _main(args: list[str], capsys) -> tuple[int, str]:
    """``experiments.run.main(args)`` in this process: (exit status, the last stderr line)."""
    from experiments.run import main

    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as exit:
        code = exit.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.strip().splitlines() if line.strip()]
    return code, lines[-1] if lines else ""


@pytest.mark.parametrize("task", list(LABEL_TASKS))
def test_a_label_outside_the_task_classes_without_a_manifest_is_skipped_or_named(task, tmp_path, capsys):
    """The task's class count (model.init_args.num_classes; the zero-shot callback's class names) reaches the data
    module: label 9 of 4 classes in manifest-less shards is skipped and counted once a pass (it crashed the run with
    `IndexError: Target 9 is out of bounds`), and with data.strict the run stops naming shard, key and count."""
    config, flags, source = LABEL_TASKS[task]
    args = ["fit", "--config", _label_task_config(config, tmp_path), *_label9_shards(tmp_path / "shards"), *flags,
            "--trainer.max_epochs=1", "--data.batch_size=8", "--data.shuffle_buffer=1"]
    code, last = _main([*args, f"--trainer.default_root_dir={tmp_path / 'run'}"], capsys)
    assert code == 0, last
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    counts = {k: summary[k] for k in ("data/skipped", "data/skipped_total", "val/data_skipped", "test/data_skipped")}
    assert counts == {"data/skipped": 1, "data/skipped_total": 1, "val/data_skipped": 1, "test/data_skipped": 1}
    assert summary["steps"] == 4  # 32 good training samples, 8 a batch
    code, last = _main([*args, f"--trainer.default_root_dir={tmp_path / 'strict'}", "--data.strict=true"], capsys)
    assert code == 2
    assert last == (f"error: bad data in shard {tmp_path}/shards/val-000000.tar, sample 'val0005': ValueError: label 9 "
                    f"is outside [0, 4): 4 classes, from {source} (strict mode; set data.strict: false to skip it)")


def test_without_a_class_count_label_9_is_a_class_of_its_own(tmp_path, capsys):
    """Metric learning with no count anywhere (no manifest, no num_classes): nothing is skipped, and the Probe's
    online classifier, sized 4 by the first batches, widens when label 9 comes in the second (it raised IndexError)."""
    args = ["fit", "--config", _label_task_config("metric", tmp_path), *_label9_shards(tmp_path / "shards", bad=13),
            "--trainer.max_epochs=1", "--data.batch_size=8", "--data.shuffle_buffer=1", "--test_after_fit=false",
            f"--trainer.default_root_dir={tmp_path / 'run'}"]
    code, last = _main(args, capsys)
    assert code == 0, last
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["data/skipped"], summary["val/data_skipped"], summary["steps"]) == (0, 0, 4)
    assert "val/linear_probe_acc" in summary


def test_the_number_of_classes_is_set_once(tmp_path, capsys):
    """data.num_classes equal to the model's works; different is a one-line error naming both; so is a manifest
    that lists more classes than the model has."""
    args = ["fit", "--config", TINY, *_label9_shards(tmp_path / "shards"), "--trainer.max_epochs=1",
            "--data.batch_size=8", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
            "--test_after_fit=false"]
    assert _main([*args, "--data.num_classes=4", f"--trainer.default_root_dir={tmp_path / 'same'}"], capsys)[0] == 0
    code, last = _main([*args, "--data.num_classes=10", f"--trainer.default_root_dir={tmp_path / 'r'}"], capsys)
    assert (code, last) == (2, "error: data.num_classes is 10 but model.init_args.num_classes is 4: the number "
                               "of classes is set twice and differs; set it once (or make both agree)")
    from mm_lightning.data.shards import write_manifest

    write_manifest(tmp_path / "shards", classes=[str(i) for i in range(10)])
    code, last = _main([*args, f"--trainer.default_root_dir={tmp_path / 'm'}"], capsys)
    assert (code, last) == (2, "error: the shards' manifest.json lists 10 classes but model.init_args.num_classes is "
                               "4: set model.init_args.num_classes to 10")
    assert not (tmp_path / "r").exists() and not (tmp_path / "m" / "checkpoints").exists()


# ------------------------------------------------------------------------------------------ 7. signals
def _run_until_mid_epoch(args: list[str], run: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "experiments.run", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(1.0)  # a few steps into epoch 1
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_last_between_steps_and_exits_non_zero(signum, code, colour_shards, tmp_path):
    """SIGTERM (docker stop, kill, schedulers) and SIGINT: last.ckpt saved at a step inside epoch 1, exit
    128 + signal, summary.json says interrupted; the run then resumes and takes exactly its planned steps."""
    run = tmp_path / "run"
    args = ["fit", "--config", TINY, *data_flags(colour_shards), f"--trainer.default_root_dir={run}",
            "--trainer.max_epochs=3", "--data.batch_size=16",
            "--trainer.callbacks+=tests.helpers.SlowSteps", "--trainer.callbacks.seconds=0.15"]
    proc = _run_until_mid_epoch(args, run)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    assert f"interrupted by {signal.Signals(signum).name}: saved {run}/checkpoints/last.ckpt" in err
    step = load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"]
    assert 16 < step < 48 and step % 16 != 0  # inside epoch 1 or 2, not an epoch's checkpoint
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == step
    assert summary["error"] == f"interrupted by {signal.Signals(signum).name}"
    run_cli(*args[:-2], "--ckpt_path=last", "--test_after_fit=false")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs"] == 3 and summary["steps"] == 3 * 16


# ------------------------------------------------------------------------------ 8. user errors, one line
USER_ERRORS = [
    ("missing directory", ["--data.train={tmp}/nowhere"], "{tmp}/nowhere"),
    ("empty directory", ["--data.train={tmp}/empty"], "{tmp}/empty"),
    ("brace pattern matching nothing", ["--data.train={tmp}/x-{{000000..000003}}.tar"], "x-000000.tar"),
    ("8 workers for 2 shards", ["--data.train={shards}", "--data.num_workers=8"], "1 x 8"),
    ("negative batch size", ["--data.train={shards}", "--data.batch_size=-3"], "data.batch_size"),
    ("unknown timm model", ["--data.train={shards}", "--model.init_args.backbone=vit_nope"], "vit_nope"),
    ("misspelt key", ["--data.train={shards}", "--model.init_args.lrr=0.1"], "lrr"),
    ("missing checkpoint", ["--data.train={shards}", "--ckpt_path={tmp}/none.ckpt"], "none.ckpt"),
    ("YAML syntax error in a stacked config", ["--config={tmp}/bad.yaml"], "{tmp}/bad.yaml"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case, flags, named", USER_ERRORS, ids=[c[0] for c in USER_ERRORS])
def test_user_errors_are_one_line_naming_what_was_wrong(case, flags, named, colour_shards, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.yaml").write_text("data:\n  batch_size: [8\n")
    fill = {"tmp": tmp_path, "shards": colour_shards["val"]}  # 2 shards
    proc = run_cli("fit", "--config", TINY, *(f.format(**fill) for f in flags),
                   f"--trainer.default_root_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2
    line = error_line(proc)
    assert line.startswith("error: ") and named.format(**fill) in line, line
    assert not (tmp_path / "run").exists() or case == "8 workers for 2 shards"  # no directory for a run that never ran
    debug = subprocess.run([sys.executable, "-m", "experiments.run", "fit", "--config", TINY,
                            *(f.format(**fill) for f in flags), f"--trainer.default_root_dir={tmp_path / 'run2'}"],
                           cwd=REPO, env={**os.environ, "MM_DEBUG": "1", "OMP_NUM_THREADS": "1"}, capture_output=True,
                           text=True, timeout=300) if case == "negative batch size" else None
    if debug is not None:
        assert debug.returncode != 0 and "Traceback" in debug.stderr  # the debug switch shows where it came from


# ----------------------------------------------------------------------------- 10. foreign shards
def test_missing_tokenizer_hint_fits_img2dataset_shards_and_works(tmp_path):
    from data.prepare import main as prepare
    from mm_lightning.data.tokenizer import TextTokenizer
    from tests.test_clip import write_img2dataset_shards

    write_img2dataset_shards(tmp_path, 2, 6, seed=0)  # 00000.tar, 00001.tar
    path = tmp_path / "tokenizer.json"
    with pytest.raises(FileNotFoundError) as err:
        TextTokenizer(path).vocab_size
    message = str(err.value)
    command = message[message.index("`python -m data.prepare tokenizer") + 1 : message.rindex("`;")]
    assert f"--shards {tmp_path} --out {path}" in command
    prepare(command.split()[3:] + ["--vocab-size", "300"])  # the hinted command, as given
    assert TextTokenizer(path).vocab_size > 256
