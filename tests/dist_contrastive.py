"""Workers for the 2-process (gloo) tests of the contrastive losses and the MoCo queue.

Started by ``tests/test_contrastive_losses.py`` with ``torch.multiprocessing.spawn``; each rank
writes what it computed to ``<out>/rank<r>.pt`` for the parent to compare with one process.

Inputs, weights and the MoCo task are float64: the tests check identities, and float32 kernels
differ between CPUs and between 1 and 2 processes; in float64 the two sides agree to ~1e-15, and
the tolerance :data:`RTOL`/:data:`ATOL` sits far above that and far below a real error (> 1e-4).
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from mm_lightning.losses.contrastive import nt_xent_loss

WORLD = 2
N_LOCAL = 3  # samples per rank
DIM = 5
RTOL, ATOL = 1e-9, 1e-12


def make_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """The global batch and a tiny projection both the reference and the ranks use."""
    g = torch.Generator().manual_seed(seed)
    return {
        "x1": torch.randn(WORLD * N_LOCAL, DIM, generator=g, dtype=torch.float64),
        "x2": torch.randn(WORLD * N_LOCAL, DIM, generator=g, dtype=torch.float64),
        "weight": torch.randn(4, DIM, generator=g, dtype=torch.float64),
    }


def reference(temperature: float) -> dict[str, torch.Tensor]:
    """One process, whole batch: loss, input gradients, and the projection's weight gradient."""
    data = make_inputs()
    z1 = data["x1"].clone().requires_grad_(True)
    z2 = data["x2"].clone().requires_grad_(True)
    loss = nt_xent_loss(z1, z2, temperature)
    loss.backward()
    proj = torch.nn.Linear(DIM, 4, bias=False, dtype=torch.float64)
    with torch.no_grad():
        proj.weight.copy_(data["weight"])
    nt_xent_loss(proj(data["x1"]), proj(data["x2"]), temperature).backward()
    return {"loss": loss.detach(), "grad1": z1.grad, "grad2": z2.grad, "weight_grad": proj.weight.grad}


def _init(rank: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


def nt_xent_worker(rank: int, port: int, out: str, temperature: float) -> None:
    """Rank ``rank`` holds rows ``rank*N_LOCAL ...`` of the global batch; NT-Xent with gathered negatives."""
    _init(rank, port)
    try:
        data = make_inputs()
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        z1 = data["x1"][rows].clone().requires_grad_(True)
        z2 = data["x2"][rows].clone().requires_grad_(True)
        loss = nt_xent_loss(z1, z2, temperature, gather=True)
        loss.backward()
        # the same through DDP, which averages parameter gradients over ranks
        proj = torch.nn.Linear(DIM, 4, bias=False, dtype=torch.float64)
        with torch.no_grad():
            proj.weight.copy_(data["weight"])
        ddp = DistributedDataParallel(proj)
        nt_xent_loss(ddp(data["x1"][rows]), ddp(data["x2"][rows]), temperature, gather=True).backward()
        torch.save(
            {"loss": loss.detach(), "grad1": z1.grad, "grad2": z2.grad, "weight_grad": proj.weight.grad},
            os.path.join(out, f"rank{rank}.pt"),
        )
        # both ranks done, and DDP's reducer (which holds the process group) gone before the group is
        # destroyed: otherwise its gloo threads could abort the process at exit ("terminate called ...")
        dist.barrier()
        del ddp
    finally:
        dist.destroy_process_group()


def moco_queue_worker(rank: int, port: int, out: str) -> None:
    """One MoCo training step per rank: the keys of both ranks must land in every rank's queue."""
    _init(rank, port)
    try:
        from mm_lightning.tasks.moco import MoCo

        torch.manual_seed(0)  # identical initial weights on every rank, as the CLI's seed_everything gives
        task = MoCo(
            backbone="vit_tiny_patch16_224",
            backbone_kwargs={"img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2},
            proj_hidden_dim=16, proj_dim=8, queue_size=16, symmetric=False,
        ).double()
        torch.manual_seed(100 + rank)  # different data on each rank
        batch = {"view1": torch.randn(4, 3, 16, 16, dtype=torch.float64),
                 "view2": torch.randn(4, 3, 16, 16, dtype=torch.float64)}
        keys = task.keys(batch["view2"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log without a trainer
            task.training_step(batch, 0)
        torch.save({"keys": keys, "queue": task.queue.clone(), "ptr": int(task.queue_ptr)},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
