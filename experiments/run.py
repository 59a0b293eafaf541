"""Run an experiment: ``python -m experiments.run {fit,validate,test,predict} --config X.yaml [...]``.

LightningCLI (jsonargparse) parses stacked ``--config`` files and flags; a misspelt key
fails at parse time naming it. Each run writes one directory (``--trainer.default_root_dir``,
by default ``runs/<run_name>/<timestamp>``) holding the resolved ``config.yaml``,
``checkpoints/{last,best}.ckpt``, the logger's files and ``summary.json``. After ``fit``
the test split, when configured, is evaluated on the best checkpoint.
"""

from __future__ import annotations

import fcntl
import glob
import os
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from mm_lightning.callbacks.data_monitor import DataMonitor
from mm_lightning.callbacks.run_summary import RunSummary
from mm_lightning.data.datamodule import WebDataModule
from mm_lightning.data.tokenizer import Tokenizer

RUN_DIR_ENV = "MM_RUN_DIR"  # lets processes started by a launcher (DDP, SLURM) agree on one run directory


class UsageError(SystemExit):
    """A user mistake found before training; exits with status 2 and a message naming the flag or file."""

    def __init__(self, message: str) -> None:
        super().__init__(f"error: {message}")


class RunConfigSaver(SaveConfigCallback):
    """Writes the resolved configuration to ``<run_dir>/config.yaml`` (rank 0)."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        os.makedirs(trainer.default_root_dir, exist_ok=True)
        path = os.path.join(trainer.default_root_dir, self.config_filename)
        with warnings.catch_warnings():  # skip_none=False keeps explicit nulls; its rename is not out yet
            warnings.simplefilter("ignore")
            self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=False)


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_builtin_data(specs: list[Any]) -> None:
    """Write the built-in data sets (shapes, digits) on first use when a config points at them.

    Complete ones are only read (no lock file, nothing written), so a read-only shards volume works.
    """
    from data.prepare import ensure_builtin, pending_builtin  # repo-level package: only the runner uses it

    for spec in specs:
        if spec is None or not pending_builtin(spec):
            continue
        try:
            with _file_lock(Path("data/shards/.prepare.lock")):  # ranks started together prepare once
                ensure_builtin(spec)
        except OSError as err:  # e.g. a read-only shards volume without the data set
            raise UsageError(f"{spec}: the built-in data set is missing and cannot be written ({err.strerror}: "
                             f"{err.filename}); write it first (python -m data.prepare) or make data/shards writable") from None


class MMLightningCLI(LightningCLI):
    """LightningCLI with mm-lightning's run directory, default callbacks and logger."""

    def __init__(self, args: Any = None, run: bool = True) -> None:
        super().__init__(
            model_class=L.LightningModule,
            subclass_mode_model=True,
            datamodule_class=WebDataModule,
            save_config_callback=RunConfigSaver,
            save_config_kwargs={"save_to_log_dir": False},
            seed_everything_default=0,
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_name", type=str | None, default=None, help="Name of the run (default: the first config's file name).")
        parser.add_argument(
            "--logger",
            type=Literal["wandb", "csv", "tensorboard", "none"],
            default="wandb",
            help="Logger when --trainer.logger is not given. W&B runs offline unless WANDB_MODE=online.",
        )
        parser.add_argument("--wandb_project", type=str, default="mm-lightning", help="W&B project.")
        parser.add_argument("--checkpoint_every_n_steps", type=int | None, default=None, help="Also save last.ckpt every N optimizer steps.")
        parser.add_argument("--test_after_fit", type=bool, default=True, help="Evaluate the test split on the best checkpoint after fit.")
        parser.add_argument("--prepare_data", type=bool, default=True, help="Write the built-in shapes/digits shards if missing.")
        # The run's one tokenizer, instantiated once and handed to the pipeline and the task that declare a
        # `tokenizer` argument (contract: mm_lightning/data/tokenizer.py); callbacks read pl_module.tokenizer.
        parser.add_subclass_arguments(Tokenizer, "tokenizer", required=False, help="The run's tokenizer (text tasks).")
        parser.link_arguments("tokenizer", "data.pipeline.init_args.tokenizer", apply_on="instantiate")
        parser.link_arguments("tokenizer", "model.init_args.tokenizer", apply_on="instantiate")
        # The multimodal LLM's connector fixes how many <image> tokens stand for an image: the task (built
        # first) hands its num_image_tokens to a pipeline that declares the argument (others get nothing).
        parser.link_arguments(
            "model", "data.pipeline.init_args.num_image_tokens", compute_fn=_num_image_tokens, apply_on="instantiate"
        )

    # ------------------------------------------------------------------ setup
    def _cfg(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        cfg = self._cfg()
        configs = cfg.get("config") or []
        first = str(configs[0]) if configs else "run"
        cfg.run_name = cfg.run_name or Path(first).stem
        root = cfg.trainer.default_root_dir
        if root is None:
            root = os.environ.get(RUN_DIR_ENV) or os.path.join("runs", cfg.run_name, time.strftime("%Y%m%d-%H%M%S"))
            cfg.trainer.default_root_dir = root
        os.environ[RUN_DIR_ENV] = root
        if self.subcommand == "fit":
            self._check_resume(cfg, root)
        if cfg.prepare_data:
            data = cfg.data
            splits = {"fit": ("train", "val", "test"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
            prepare_builtin_data([data.get(s) for s in splits.get(self.subcommand, ())])

    def _check_resume(self, cfg: Any, root: str) -> None:
        ckpt = cfg.get("ckpt_path")
        if ckpt == "last":
            last = os.path.join(root, "checkpoints", "last.ckpt")
            if not os.path.isfile(last):
                raise UsageError(f"--ckpt_path last: no {last} (is --trainer.default_root_dir the run to resume?)")
            cfg.ckpt_path = last
        elif ckpt and not os.path.isfile(ckpt) and ckpt not in ("best", "hpc"):
            raise UsageError(f"--ckpt_path {ckpt}: no such checkpoint file")
        requeued = glob.glob(os.path.join(root, "hpc_ckpt_*.ckpt"))
        if int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:  # a requeued SLURM job: resume its own run
            last = os.path.join(root, "checkpoints", "last.ckpt")
            candidates = requeued + ([last] if os.path.isfile(last) else [])
            newest = max(candidates, key=os.path.getmtime, default=None)  # what the preempted job saved last
            cfg.ckpt_path = newest or cfg.ckpt_path  # none yet: start over in the same directory
            return
        if not ckpt and not requeued and os.path.exists(os.path.join(root, "config.yaml")) and _is_rank_zero():
            raise UsageError(
                f"{root} already holds a run: resume it with --ckpt_path last, or choose another --trainer.default_root_dir"
            )

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        root = cfg.trainer.default_root_dir
        task = self.model
        monitor = getattr(task, "monitor", None) if self.datamodule.specs.get("val") is not None else None
        checkpoint = ModelCheckpoint(
            dirpath=os.path.join(root, "checkpoints"),
            filename="best",
            monitor=monitor,
            mode=getattr(task, "monitor_mode", "max"),
            save_top_k=1,
            save_last=True,
            every_n_train_steps=cfg.checkpoint_every_n_steps,
            enable_version_counter=False,
            auto_insert_metric_name=False,
        )
        user_callbacks = list(cfg.trainer.get("callbacks") or [])
        ours: list[L.Callback] = [checkpoint, DataMonitor(), RunSummary()]
        if cfg.trainer.get("logger") in (None, True) and cfg.logger != "none":
            kwargs["logger"] = self._make_logger(cfg, root)
            ours.append(LearningRateMonitor(logging_interval="step"))
        elif cfg.trainer.get("logger") in (None, True):
            kwargs["logger"] = False
        kwargs["callbacks"] = user_callbacks + ours
        return super().instantiate_trainer(**kwargs)

    def _make_logger(self, cfg: Any, root: str) -> Any:
        if cfg.logger == "csv":
            from lightning.pytorch.loggers import CSVLogger

            return CSVLogger(save_dir=root, name="csv")  # version_N per (re)start: nothing overwritten
        if cfg.logger == "tensorboard":
            from lightning.pytorch.loggers import TensorBoardLogger

            return TensorBoardLogger(save_dir=root, name="tensorboard")
        from lightning.pytorch.loggers import WandbLogger

        online = os.environ.get("WANDB_MODE", "offline") == "online"
        os.makedirs(root, exist_ok=True)  # W&B resolves its git root (commit, diff) from an existing save_dir
        return WandbLogger(
            save_dir=os.path.abspath(root),
            project=cfg.wandb_project, name=cfg.run_name, group=cfg.run_name, offline=not online,
        )

    # -------------------------------------------------------------- after runs
    def after_fit(self) -> None:
        cfg = self._cfg()
        trainer = self.trainer
        if cfg.test_after_fit and self.datamodule.specs.get("test") is not None and not trainer.interrupted:
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)
        self._report()

    def after_test(self) -> None:
        self._report()

    def after_validate(self) -> None:
        self._report()

    def _report(self) -> None:
        if not self.trainer.is_global_zero:
            return
        summary = next((c for c in self.trainer.callbacks if isinstance(c, RunSummary)), None)
        root = self.trainer.default_root_dir
        print(f"\nRun directory: {root}")
        if summary is not None:
            for name in sorted(summary.metrics):
                if name.startswith(("test/", "val/")) or name in ("epochs", "steps", "wall_time_s", "data/skipped"):
                    print(f"  {name}: {summary.metrics[name]:.4f}")
            print(f"Summary: {os.path.join(root, 'summary.json')}")
        sys.stdout.flush()


def _num_image_tokens(model: Any) -> int | None:
    return getattr(model, "num_image_tokens", None)


def _is_rank_zero() -> bool:
    return all(os.environ.get(v, "0") == "0" for v in ("LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "RANK"))


def main(args: Any = None) -> None:
    previous = os.environ.get(RUN_DIR_ENV)
    try:
        MMLightningCLI(args=args)
    finally:  # an in-process caller's next run must not reuse this run directory
        if previous is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous


if __name__ == "__main__":
    main()
