"""2-process (gloo) checks of gathers over the data-parallel group under tensor parallelism, run by
tests/test_distributed.py.

Launched as ``torchrun --nproc_per_node 2 tests/dist_tp.py OUT_DIR``. The two ranks form one
tensor-parallel group of 2 (mesh ``(data_parallel=1, tensor_parallel=2)``): both hold the same batch,
so every loss over the "global" batch must equal the 1-process loss of that batch, with the same
gradients. Gathering over the whole world instead (the bug) would see every sample twice.

1. ``clip`` / ``ntxent``: a CLIP model and an SSL encoder (float64) with their transformer blocks
   sharded by :func:`mm_lightning.parallel.apply_tensor_parallel`, the data-parallel group set from the
   mesh; loss and every parameter gradient (sharded ones gathered with ``full_tensor``) against a
   1-process copy. Then the bug on purpose (group = the whole world) must change the loss.
2. ``lightning_clip`` / ``lightning_simclr``: CLIPTask and SimCLR trained 3 steps under
   :class:`mm_lightning.parallel.ModelParallel` (data_parallel_size=1, tensor_parallel_size=2), where
   ``Task.configure_model`` sets the group; rank 0 writes the per-step losses to ``OUT_DIR/<name>.json``
   for the test to compare with a 1-process run of the same code (:func:`lightning_run`).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

STEPS = 3
N = 8  # the global batch (every rank of the TP group holds all of it)
VIT = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0}
TEXT = {"vocab_size": 50, "context_length": 8, "text_width": 32, "text_layers": 1, "text_heads": 2}


def clip_batch(seed: int = 1, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (N,), generator=g)
    mask = (torch.arange(8)[None, :] < lengths[:, None]).long()
    return {"image": torch.randn(N, 3, 16, 16, generator=g).to(dtype),
            "input_ids": torch.randint(3, 50, (N, 8), generator=g) * mask, "attention_mask": mask}


def view_batch(seed: int = 2, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(N, 3, 16, 16, generator=g).to(dtype)
    return {"view1": image, "view2": image.flip(-1) + 0.1 * torch.randn(image.shape, generator=g).to(dtype)}


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in module.named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            out[name] = g.detach().clone()
    return out


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-9) -> bool:
    """Relative agreement in float64 (~1e-16 per operation; 1e-9 leaves room for sums in another order and the
    sharded matrix products' partial sums)."""
    return bool((a - b).abs().max() <= rtol * max(float(b.abs().max()), 1e-30))


def check_losses(mesh, report: dict) -> None:
    from mm_lightning import distributed
    from mm_lightning.losses.clip import clip_loss
    from mm_lightning.losses.contrastive import nt_xent_loss
    from mm_lightning.models.clip import CLIP
    from mm_lightning.models.ssl import SSLEncoder
    from mm_lightning.parallel import apply_tensor_parallel, find_transformer_blocks

    def clip_case():
        torch.manual_seed(0)
        model = CLIP(image_backbone="vit_tiny_patch16_224", image_backbone_kwargs=VIT, embed_dim=16, **TEXT,
                     init_logit_scale=1.5).double()
        batch = clip_batch(dtype=torch.float64)
        return model, lambda m, gather: clip_loss(*m(batch["image"], batch["input_ids"], batch["attention_mask"]),
                                                  m.logit_scale.exp(), gather=gather)

    def ntxent_case():
        torch.manual_seed(0)
        model = SSLEncoder("vit_tiny_patch16_224", VIT, proj_hidden_dim=16, proj_dim=8).double()
        batch = view_batch(dtype=torch.float64)

        def loss(m, gather):
            z1, z2 = m(torch.cat([batch["view1"], batch["view2"]])).chunk(2)
            return nt_xent_loss(z1, z2, 0.2, gather=gather)

        return model, loss

    for name, case in (("clip", clip_case), ("ntxent", ntxent_case)):
        model, loss_fn = case()
        reference = copy.deepcopy(model)
        ref_loss = loss_fn(reference, False)  # one process, the whole batch
        ref_loss.backward()
        ref_grads = _grads(reference)
        blocks = find_transformer_blocks(model)
        assert apply_tensor_parallel(blocks, mesh["tensor_parallel"]) == len(blocks) >= 1, name
        distributed.set_data_parallel_group(mesh["data_parallel"].get_group())
        assert distributed.world_size() == 1, name
        loss = loss_fn(model, True)  # what a training step computes: gathered over the data-parallel group
        loss.backward()
        grads = _grads(model)
        assert set(grads) == set(ref_grads) and len(grads) == sum(p.requires_grad for p in model.parameters()), name
        assert _close(loss.detach(), ref_loss.detach()), (name, float(loss), float(ref_loss))
        # errors relative to the largest gradient of the model (a gradient that is 0 in exact arithmetic comes
        # out at rounding level, ~1e-16, and has no scale of its own)
        scale = max(float(g.abs().max()) for g in ref_grads.values())
        worst = max(float((grads[k] - ref_grads[k]).abs().max()) for k in grads) / scale
        for key, grad in grads.items():
            error = float((grad - ref_grads[key]).abs().max()) / scale
            assert error <= 1e-9, (name, key, error)
        sharded = sum(type(p).__name__ == "DTensor" for p in model.parameters())
        assert sharded > 0, name  # the model really is tensor parallel
        # the bug, on purpose: gathering over the whole world duplicates every sample
        distributed.set_data_parallel_group(None)
        with torch.no_grad():
            wrong = loss_fn(model, True)
        report[name] = {"loss": float(loss), "reference": float(ref_loss), "grad_rel_error": worst,
                        "sharded_params": sharded, "world_gather_loss": float(wrong)}
        assert abs(float(wrong) - float(ref_loss)) > 1e-3, (name, float(wrong), float(ref_loss))


def check_gathers(mesh, report: dict) -> None:
    """The evaluation gathers (uneven rows, summed counts) see the data-parallel group only."""
    from mm_lightning import distributed

    rank = torch.distributed.get_rank()
    rows = torch.arange(6.0).reshape(3, 2) if rank == 0 else torch.zeros(0, 0)
    distributed.set_data_parallel_group(mesh["data_parallel"].get_group())
    assert torch.equal(distributed.gather_uneven(rows), rows)
    assert int(distributed.all_reduce_sum(torch.tensor(5))) == 5
    distributed.set_data_parallel_group(None)
    assert torch.equal(distributed.gather_uneven(rows), torch.arange(6.0).reshape(3, 2))  # both ranks: rank 0's rows
    assert int(distributed.all_reduce_sum(torch.tensor(5))) == 10
    report["gathers"] = "ok"


def make_task(kind: str):
    """The 1-process reference and the TP run build this same task (same seed)."""
    import lightning as L

    L.seed_everything(7, verbose=False)
    if kind == "clip":
        from mm_lightning.tasks.clip import CLIPTask

        return CLIPTask(image_backbone="vit_tiny_patch16_224", image_backbone_kwargs=VIT, embed_dim=16, **TEXT,
                        lr=3e-3, schedule="constant", weight_decay=0.0)
    from mm_lightning.tasks.simclr import SimCLR

    return SimCLR(backbone="vit_tiny_patch16_224", backbone_kwargs=VIT, proj_hidden_dim=16, proj_dim=8,
                  temperature=0.2, lr=3e-3, schedule="constant", weight_decay=0.0)


def lightning_run(kind: str, strategy=None, devices: int = 1) -> list[float]:
    """Per-step training losses of ``STEPS`` steps on fixed batches (every rank gets all of them)."""
    import lightning as L
    from torch.utils.data import DataLoader

    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            losses.append(float(loss.detach()))

    batches = [clip_batch(seed=10 + i) if kind == "clip" else view_batch(seed=10 + i) for i in range(STEPS)]
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy or "auto", max_steps=STEPS, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False,
                        callbacks=[Record()])
    trainer.fit(make_task(kind), train_dataloaders=DataLoader(batches, batch_size=None))
    return losses


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    from torch.distributed.device_mesh import init_device_mesh

    from mm_lightning.parallel import ModelParallel

    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("data_parallel", "tensor_parallel"))
    report: dict = {}
    check_losses(mesh, report)
    check_gathers(mesh, report)
    for kind in ("clip", "simclr"):
        losses = lightning_run(kind, ModelParallel(data_parallel_size=1, tensor_parallel_size=2), devices=2)
        report[f"lightning_{kind}"] = losses
    if torch.distributed.get_rank() == 0:
        (out / "report.json").write_text(json.dumps(report, indent=1))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    print(f"rank {os.environ.get('RANK')} done", flush=True)


if __name__ == "__main__":
    main()
