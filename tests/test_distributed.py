"""mm_lightning.distributed: gathers over the data-parallel group. One process (identities), and 2 processes
forming one tensor-parallel group of 2 (tests/dist_tp.py) that must give the 1-process CLIP / NT-Xent losses
and gradients."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mm_lightning import distributed
from tests import dist_tp
from tests.conftest import REPO


def test_single_process_gathers_are_identities():
    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.world_size() == 1 and distributed.rank() == 0 and not distributed.is_distributed()
    assert distributed.all_gather_with_grad(x) is x
    assert torch.equal(distributed.all_gather_no_grad(x), x) and torch.equal(distributed.gather_uneven(x), x)
    assert int(distributed.all_reduce_sum(torch.tensor(4))) == 4
    assert distributed.data_parallel_group() is None


@pytest.mark.slow
def test_two_process_tensor_parallel_group_gives_the_one_process_losses_and_gradients(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "dist_tp.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    report = json.loads((tmp_path / "report.json").read_text())
    for name in ("clip", "ntxent"):  # checked on the ranks (float64): loss and gradients equal within 1e-9 relative
        assert report[name]["grad_rel_error"] <= 1e-9 and report[name]["sharded_params"] > 0, report[name]
        assert abs(report[name]["world_gather_loss"] - report[name]["reference"]) > 1e-3, report[name]
    assert report["gathers"] == "ok"
    # through Lightning's ModelParallel (dp 1 x tp 2): Task.configure_model sets the group, so the training
    # losses are the 1-process run's. float32, 3 Adam steps: agreement to 1e-4 relative (rounding is ~1e-6)
    for kind in ("clip", "simclr"):
        reference = dist_tp.lightning_run(kind)
        assert len(reference) == dist_tp.STEPS and reference[0] != reference[-1]
        torch.testing.assert_close(torch.tensor(report[f"lightning_{kind}"]), torch.tensor(reference), rtol=1e-4,
                                   atol=0, msg=kind)
