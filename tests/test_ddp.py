"""DDP on 2 CPU processes (gloo) against 1 process, with checks that are exact:

(a) the ranks' training samples in an epoch are disjoint and together are the 1-process epoch (the
    WebDataModule's split by rank as DDP sets it, in-process; and under a real 2-process DDP run);
(b) the per-step losses and final weights of a 2-process DDP run equal those of 1 process fed the same global
    batches (float64: they agree to ~1e-13);
(c) a CLI run with ``--trainer.devices 2`` and presets/ddp.yaml applies, on both ranks, the same lr at every
    step as the 1-process run, and logs it.

No accuracy is compared: two runs that see their samples in different orders end at different accuracies
after a short run (0.36 vs 0.26 on vit_shapes after 96 steps, within the seed-to-seed spread), while (b) shows
that a DDP step is the 1-process step on the same global batch.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from tests import dist_ddp
from tests.conftest import REPO, write_colour_shards
from tests.test_run import run_cli

SAMPLES, PER_SHARD = 256, 32  # 8 equal shards: 2 ranks x 2 workers hold 64 samples each, 4 batches of 16


def _shards(directory: Path) -> tuple[str, list[str]]:
    """Training shards written with the project's writer; their glob and every sample's key."""
    write_colour_shards(directory, "d-train", SAMPLES, PER_SHARD, seed=1)
    return str(directory / "d-train-*.tar"), [f"d-train{i:06d}" for i in range(SAMPLES)]


def epoch_batches(spec: str, rank: int, world: int, epoch: int, batch_size: int) -> list[list[str]]:
    """The keys of each training batch the WebDataModule serves rank ``rank`` of ``world`` in ``epoch``; the
    trainer is a stand-in carrying the split DDP sets (``DDPStrategy.distributed_sampler_kwargs``)."""
    dm = dist_ddp.make_datamodule(spec, batch_size)
    dm.trainer = SimpleNamespace(
        global_rank=rank, world_size=world, current_epoch=epoch, training=True, validating=False,
        sanity_checking=False, testing=False,
        strategy=SimpleNamespace(distributed_sampler_kwargs={"num_replicas": world, "rank": rank}),
    )
    dm.setup("fit")
    return [list(b["key"]) for b in dm.train_dataloader()]


def _flat(batches: list[list[str]]) -> list[str]:
    return [k for b in batches for k in b]


def assert_partition(halves: list[list[str]], one: list[str], where: str) -> None:
    """The two ranks' keys are disjoint and, as multisets, are the 1-process epoch's keys."""
    overlap = set(halves[0]) & set(halves[1])
    assert not overlap, f"{where}: both ranks trained on {len(overlap)} samples, e.g. {sorted(overlap)[:3]}"
    assert sorted(halves[0] + halves[1]) == sorted(one), where


def test_ranks_split_every_epoch_into_disjoint_halves_as_ddp_sets_them(tmp_path):
    spec, keys = _shards(tmp_path)
    batch = dist_ddp.GLOBAL_BATCH
    for epoch in range(dist_ddp.EPOCHS):
        one = epoch_batches(spec, 0, 1, epoch, batch)
        assert sorted(_flat(one)) == keys  # one process reads each sample once an epoch
        ranks = [epoch_batches(spec, r, 2, epoch, batch // 2) for r in range(2)]
        assert len(ranks[0]) == len(ranks[1]) == len(one)  # same steps; each step's global batch is `batch`
        assert all(len(b) == batch // 2 for b in ranks[0] + ranks[1])
        assert_partition([_flat(r) for r in ranks], _flat(one), f"epoch {epoch}")


# ------------------------------------------------------------------ a real 2-process DDP run (torchrun, gloo)
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("ddp")
    spec, keys = _shards(root / "shards")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "dist_ddp.py"), str(root / "out"), spec]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [torch.load(root / "out" / f"rank{r}.pt", map_location="cpu", weights_only=False) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    return SimpleNamespace(spec=spec, keys=keys, ranks=ranks)


@pytest.mark.slow
def test_two_process_ddp_ranks_train_on_disjoint_halves_of_every_epoch(ddp_run):
    steps_per_epoch = SAMPLES // dist_ddp.GLOBAL_BATCH
    for epoch in range(dist_ddp.EPOCHS):
        halves = [[s["keys"] for s in r["steps"] if s["epoch"] == epoch] for r in ddp_run.ranks]
        assert len(halves[0]) == len(halves[1]) == steps_per_epoch, epoch
        one = _flat(epoch_batches(ddp_run.spec, 0, 1, epoch, dist_ddp.GLOBAL_BATCH))
        assert sorted(one) == ddp_run.keys
        assert_partition([_flat(h) for h in halves], one, f"epoch {epoch}")


def reference_run(global_batches: list[dict[str, torch.Tensor]]) -> tuple[dist_ddp.StepRecorder, dict]:
    """1 process, the same task and trainer settings, fed ``global_batches`` in order: one epoch of all the
    steps (the same number of optimizer steps, so the same warmup + cosine schedule)."""
    task, recorder = dist_ddp.make_task(), dist_ddp.StepRecorder()
    trainer = L.Trainer(devices=1, callbacks=[recorder], **{**dist_ddp.trainer_kwargs(), "max_epochs": 1})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run; 2 threads on a loaded 2-core machine were ~40x slower here
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*no `val_dataloader`")
            trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(global_batches, batch_size=None))
    finally:
        torch.set_num_threads(threads)
    return recorder, recorder.result(task)


@pytest.mark.slow
def test_two_process_ddp_losses_and_weights_equal_one_process_on_the_same_global_batches(ddp_run):
    r0, r1 = (r["steps"] for r in ddp_run.ranks)
    assert len(r0) == len(r1) == dist_ddp.EPOCHS * SAMPLES // dist_ddp.GLOBAL_BATCH
    global_batches = [{"image": torch.cat([a["image"], b["image"]]), "label": torch.cat([a["label"], b["label"]])}
                      for a, b in zip(r0, r1)]
    recorder, ref = reference_run(global_batches)
    ref_steps = recorder.steps
    assert len(ref_steps) == len(r0)
    for name, value in ref["initial"].items():  # the same start (DDP broadcasts rank 0's weights)
        for rank in ddp_run.ranks:
            assert torch.equal(rank["initial"][name], value), name
    lrs = [s["lr"] for s in ref_steps]
    assert len(set(lrs)) > len(lrs) // 2  # warmup + cosine: the check below sees a changing lr
    assert [s["lr"] for s in r0] == lrs and [s["lr"] for s in r1] == lrs
    # DDP averages the ranks' gradients of their local mean losses: the gradient of the global batch's mean loss,
    # whose value is the mean of the two local losses
    ddp_losses = torch.tensor([(a["loss"] + b["loss"]) / 2 for a, b in zip(r0, r1)], dtype=torch.float64)
    ref_losses = torch.tensor([s["loss"] for s in ref_steps], dtype=torch.float64)
    assert ref_losses[-1] < ref_losses[0] - 0.1  # it trained
    torch.testing.assert_close(ddp_losses, ref_losses, atol=dist_ddp.LOSS_ATOL, rtol=0)
    for name, value in ref["final"].items():
        for r, rank in enumerate(ddp_run.ranks):
            torch.testing.assert_close(rank["final"][name], value, atol=dist_ddp.LOSS_ATOL, rtol=0,
                                       msg=f"rank {r}: {name}")


# ------------------------------------------------------------------ the CLI, 1 process against 2 (DDP preset)
TINY = str(REPO / "tests" / "configs" / "tiny_vit.yaml")
DDP_PRESET = str(REPO / "experiments" / "configs" / "presets" / "ddp.yaml")


def _logged_lrs(run: Path) -> list[tuple[int, float]]:
    """(step, lr) of every row of the CSV log that holds the lr (LearningRateMonitor, logged every step)."""
    (metrics,) = run.glob("csv/version_*/metrics.csv")
    rows = list(csv.DictReader(open(metrics)))
    column = next(c for c in rows[0] if c.startswith("lr-"))
    return [(int(r["step"]), float(r[column])) for r in rows if r[column]]


@pytest.mark.slow
def test_two_process_ddp_from_the_cli_applies_and_logs_the_same_lr_at_every_step(tmp_path):
    """tiny_vit.yaml (warmup half an epoch, then cosine) for 2 epochs of 8 steps, once on 1 process at batch 32,
    once with presets/ddp.yaml on 2 processes at batch 16 each: the same steps and epochs, and at every step
    the lr each rank's optimizer applied and the lr the run logged equal the 1-process run's."""
    spec, _ = _shards(tmp_path / "shards")
    common = ["--config", TINY, f"--data.train={spec}", "--data.num_workers=1", "--trainer.max_epochs=2",
              "--model.init_args.warmup_epochs=0.5", "--trainer.callbacks+=tests.dist_ddp.LrPerRank"]
    one, two = tmp_path / "one", tmp_path / "two"
    with ThreadPoolExecutor(2) as pool:  # the two runs side by side: most of their time is imports
        runs = [pool.submit(run_cli, "fit", *common, f"--data.batch_size={dist_ddp.GLOBAL_BATCH}",
                            f"--trainer.default_root_dir={one}", timeout=600),
                pool.submit(run_cli, "fit", *common, "--config", DDP_PRESET, "--trainer.devices=2",
                            f"--data.batch_size={dist_ddp.GLOBAL_BATCH // 2}", f"--trainer.default_root_dir={two}",
                            timeout=600)]
        for run in runs:
            run.result()
    summaries = [json.loads((run / "summary.json").read_text()) for run in (one, two)]
    steps = 2 * SAMPLES // dist_ddp.GLOBAL_BATCH
    assert summaries[0]["steps"] == summaries[1]["steps"] == steps
    assert summaries[0]["epochs"] == summaries[1]["epochs"] == 2
    ref = json.loads((one / "lr-rank0.json").read_text())
    assert ref["world_size"] == 1 and len(ref["lrs"]) == steps
    assert len({lr for step in ref["lrs"] for lr in step}) > len(ref["lrs"]) // 2  # the lr changes
    for rank in range(2):
        got = json.loads((two / f"lr-rank{rank}.json").read_text())
        assert got["world_size"] == 2
        assert got["lrs"] == ref["lrs"], f"rank {rank}: {got['lrs']} != {ref['lrs']}"
    logged = _logged_lrs(one)
    assert [step for step, _ in logged] == list(range(steps))
    assert _logged_lrs(two) == logged
