"""2-process checks of FSDP2, tensor parallel and pipeline parallel, run by tests/test_parallel.py.

Launched as ``torchrun --nproc_per_node 2 tests/dist_parallel.py OUT_DIR CHECK...`` (gloo). One
launch runs every check in the same two processes (imports cost ~8 s per process), and rank 0
writes ``OUT_DIR/<check>.json`` with the per-step losses (averaged over data-parallel ranks)
and ``OUT_DIR/<check>.ckpt`` with the full weights after training. The test compares them
with a 1-process run of the same code.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from tests.parallel_common import STEPS, LossRecorder, make_loader, make_task, trainer_kwargs  # noqa: E402


def run_lightning(check: str, out: Path) -> None:
    import lightning as L

    from mm_lightning.parallel import ModelParallel

    settings = {
        "fsdp": {"data_parallel_size": 2, "tensor_parallel_size": 1, "sharding": "full"},
        "fsdp_noreshard_ac": {"data_parallel_size": 2, "tensor_parallel_size": 1, "sharding": "no-reshard"},
        "hsdp": {"data_parallel_size": 2, "tensor_parallel_size": 1, "sharding": "hybrid", "replicate_size": 2},
        "tp": {"data_parallel_size": 1, "tensor_parallel_size": 2},
    }[check]
    dp = settings["data_parallel_size"]
    task = make_task(activation_checkpointing=check.endswith("_ac"))
    recorder = LossRecorder()
    strategy = ModelParallel(**settings, save_distributed_checkpoint=False)
    trainer = L.Trainer(devices=2, strategy=strategy, callbacks=[recorder], **trainer_kwargs())
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else int(os.environ["RANK"])
    dp_rank = rank if dp > 1 else 0
    trainer.fit(task, train_dataloaders=make_loader(per_rank_batch=16 // dp, rank=dp_rank, replicas=dp))
    trainer.save_checkpoint(out / f"{check}.ckpt")
    if trainer.is_global_zero:
        (out / f"{check}.json").write_text(json.dumps({"losses": recorder.losses}))


def run_pipeline(check: str, out: Path) -> None:
    from experiments.pipeline import train_pipeline

    schedule = "1f1b" if check == "pipeline_1f1b" else "gpipe"
    task = make_task()
    from experiments.pipeline import build_stage

    losses = train_pipeline(build_stage(task.model), make_loader(per_rank_batch=16), steps=STEPS, lr=task.lr,
                            weight_decay=task.weight_decay, microbatches=4, schedule=schedule)
    if torch.distributed.get_rank() == 0:
        (out / f"{check}.json").write_text(json.dumps({"losses": losses}))


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for check in sys.argv[2:]:
        if check.startswith("pipeline"):
            run_pipeline(check, out)
        else:
            run_lightning(check, out)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    print(f"rank {os.environ.get('RANK')} done", flush=True)


if __name__ == "__main__":
    main()
