"""Run an experiment: ``python -m experiments.run {fit,validate,test,predict} --config X.yaml [...]``.

LightningCLI (jsonargparse) parses stacked ``--config`` files and flags; a misspelt key
fails at parse time naming it. Each run writes one directory (``--trainer.default_root_dir``,
by default ``runs/<run_name>/<timestamp>-<random>``) holding the resolved ``config.yaml``,
``checkpoints/{last,best}.ckpt``, the logger's files and ``summary.json``. After ``fit``
the test split, when configured, is evaluated on the best checkpoint.

A run claims its directory before it writes anything there (:mod:`experiments.run_dir`) and
never takes one that holds another run's checkpoints or finished summary, unless it resumes
that run's own checkpoint; ``--ckpt_path`` files are read weights-only and checked (epoch
against ``--trainer.max_epochs``) before anything is written. Exit status: 0 finished, 2 a
user error (one line naming the flag, file, shard or key; ``MM_DEBUG=1`` shows the traceback),
1 a failed run (non-finite loss, a checkpoint that could not be saved, a bug), 128 + signal
for SIGTERM (143) and SIGINT (130), after saving ``last.ckpt`` between two steps.
"""

from __future__ import annotations

import fcntl
import glob
import os
import re
import signal
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning as L
import yaml
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from experiments.run_dir import RunDirClaim, RunDirInUse, new_run_dir_name, run_state
from mm_lightning.callbacks.data_monitor import DataMonitor
from mm_lightning.callbacks.guards import GuardedModelCheckpoint, NonFiniteLossError, NonFiniteLossGuard, SignalGuard
from mm_lightning.callbacks.run_summary import RunSummary
from mm_lightning.checkpoint import UnreadableCheckpointError, UnsafeCheckpointError, load_checkpoint
from mm_lightning.checkpoint_io import CheckpointSaveError, SafeCheckpointIO
from mm_lightning.data.datamodule import BadSampleError, WebDataModule
from mm_lightning.data.shards import ShardSpecError
from mm_lightning.data.tokenizer import Tokenizer
from mm_lightning.models.hub import PretrainedError

RUN_DIR_ENV = "MM_RUN_DIR"  # lets processes started by a launcher (DDP, SLURM) agree on one run directory
DEBUG_ENV = "MM_DEBUG"  # MM_DEBUG=1: user errors show their traceback too
_CLAIMS: list[RunDirClaim] = []  # run directories this process holds; main() releases them when the run ends


class UsageError(SystemExit):
    """A user mistake, as one line naming the flag or file (``.message``).

    :func:`main` prints it and exits with status 2; raised elsewhere (an entry point building from the CLI)
    Python prints it and exits with status 1.
    """

    def __init__(self, message: str) -> None:
        self.message = f"error: {_one_line(message)}"
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


def _one_line(message: str) -> str:
    """A multi-line error message (jsonargparse's, a DataLoader worker's) as one line: the informative parts."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if any(line.startswith("Original Traceback") for line in lines):  # re-raised from a DataLoader worker
        lines = lines[-1:]
        lines = [re.sub(r"^[\w.]+(Error|Exception): ", "", lines[0])] if lines else lines
    noise = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value",
             "- Expected a <class 'NoneType'>", "Check the documentation")
    kept = [re.sub(r"^- ", "", line) for line in lines if not line.startswith(noise)]
    out = ""
    for line in kept:
        out += line if not out else (" " if out.endswith(":") else ": ") + line
    return out or str(message).strip()


class MMArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose parse errors are one line (no usage block); ``MM_DEBUG=1`` keeps jsonargparse's."""

    def error(self, message: str, ex: Exception | None = None) -> Any:
        if not self.exit_on_error or os.environ.get(DEBUG_ENV):
            return super().error(message, ex)
        prog = self.prog.replace(" [options]", "").replace("run.py", "python -m experiments.run")
        raise UsageError(f"{_one_line(message)} (see `{prog} --help`)")


def check_config_files(argv: list[str]) -> None:
    """Read every ``--config``/``-c`` YAML of ``argv`` first, so a syntax error names its file (jsonargparse's does not)."""
    for i, arg in enumerate(argv):
        path = None
        if arg in ("--config", "-c") and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        if path is None or path.lstrip().startswith(("{", "[")) or "\n" in path:
            continue  # an inline YAML string, parsed by jsonargparse
        if not os.path.isfile(path):
            raise UsageError(f"--config {path}: no such file")
        try:
            with open(path) as f:
                yaml.safe_load(f)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise UsageError(f"--config {path}: YAML syntax error at{where or ' ?'}: {problem}") from None
        except OSError as err:
            raise UsageError(f"--config {path}: {err.strerror}") from None


class RunConfigSaver(SaveConfigCallback):
    """Writes the resolved configuration to ``<run_dir>/config.yaml`` (rank 0) once the run is under way:
    when training starts (after any checkpoint was restored) or an evaluation starts, so a run refused at
    setup or restore time leaves the directory's earlier config as it was."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stage = stage  # written later, see the class docstring

    def _save_now(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.already_saved:
            return
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, getattr(self, "_stage", "fit"))
        self.already_saved = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_now(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "validate":
            self._save_now(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_now(trainer, pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_now(trainer, pl_module)

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
    from data.builtin import ensure_builtin, pending_builtin  # repo-level package: only the runner uses it

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
    """LightningCLI with mm-lightning's run directory, default callbacks and logger.

    Args:
        args: the command line (default ``sys.argv[1:]``).
        run: run the subcommand (``False``: only build model, data and trainer).
        signal_guard: the :class:`~mm_lightning.callbacks.guards.SignalGuard` that :func:`main` installed;
            a fresh, uninstalled one by default.
    """

    def __init__(self, args: Any = None, run: bool = True, signal_guard: SignalGuard | None = None) -> None:
        self.signal_guard = signal_guard or SignalGuard()
        self.claim: RunDirClaim | None = None
        self._to_claim: tuple[str, str, str | None, bool, bool] | None = None
        if args is None or isinstance(args, (list, tuple)):
            check_config_files(list(sys.argv[1:] if args is None else args))
        super().__init__(
            model_class=L.LightningModule,
            subclass_mode_model=True,
            datamodule_class=WebDataModule,
            save_config_callback=RunConfigSaver,
            save_config_kwargs={"save_to_log_dir": False},
            parser_class=MMArgumentParser,
            seed_everything_default=0,
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )

    def add_default_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_default_arguments_to_parser(parser)
        parser.add_argument(
            "--on_nonfinite_loss",
            type=Literal["stop", "skip"],
            default="stop",
            help="A NaN/inf training loss stops the run naming epoch, step and batch (stop), or its update is "
            "skipped and counted in train/nonfinite_skipped (skip).",
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
        # Its vision tower fixes the image size and normalisation: the task's `preprocessing` goes to a pipeline that
        # declares `tower_preprocessing` (explicit mean/std in the config still win; another image_size is an error).
        parser.link_arguments(
            "model", "data.pipeline.init_args.tower_preprocessing", compute_fn=_tower_preprocessing,
            apply_on="instantiate",
        )
        # A task that classifies into a fixed number of classes (model.init_args.num_classes) hands that count to
        # the data module: a label outside it is then bad data, skipped and counted (or named, with data.strict)
        # before it reaches the loss, also in shards without manifest.json. Callbacks that take labels (Probe,
        # ZeroShotClassification) declare theirs at setup (WebDataModule.declare_label_classes).
        parser.link_arguments("model", "data.task_num_classes", compute_fn=_num_classes, apply_on="instantiate")

    # ------------------------------------------------------------------ setup
    def _cfg(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def _parse_ckpt_path(self) -> None:
        """Decide the run directory, check ``--ckpt_path`` (weights-only, resumable here) and claim the
        directory, all before anything is written; then apply the checkpoint's hyper-parameters to the
        model's config as LightningCLI does."""
        subcommand = self.config.get("subcommand")
        cfg = self.config[subcommand] if subcommand else self.config
        configs = cfg.get("config") or []
        cfg.run_name = cfg.run_name or (Path(str(configs[0])).stem if configs else "run")
        if not subcommand:  # run=False: build only; the trainer gets a directory name, nothing is created
            if cfg.trainer.default_root_dir is None:
                cfg.trainer.default_root_dir = os.environ.get(RUN_DIR_ENV) or new_run_dir_name("runs", cfg.run_name)
            return
        if cfg.get("weights_only") is False:
            raise UsageError("--weights_only false: refused, unpickling a checkpoint's objects can run code; "
                             "checkpoints load weights-only")
        if "weights_only" in cfg:
            cfg.weights_only = True
        root = cfg.trainer.default_root_dir or os.environ.get(RUN_DIR_ENV)
        requeued = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0 and root is not None
        ckpt = self._resolve_ckpt_path(cfg, subcommand, root, requeued)
        meta = _read_checkpoint(ckpt) if ckpt and os.path.isfile(ckpt) else None
        if meta is not None and subcommand == "fit":
            _check_resumable(ckpt, meta, cfg.trainer.get("max_epochs"))
        if _is_rank_zero():
            new = root is None
            if new:
                root = new_run_dir_name("runs", cfg.run_name)  # unique; created when claimed
            else:
                self._check_allowed(root, subcommand, ckpt, requeued)  # read only: a refusal writes nothing
            self._to_claim = (root, subcommand, ckpt, requeued, new)
        elif root is None:
            raise UsageError("this process is not rank 0 and has no run directory: start every rank with the same "
                             f"--trainer.default_root_dir (or {RUN_DIR_ENV})")
        cfg.trainer.default_root_dir = root
        os.environ[RUN_DIR_ENV] = root
        hparams = dict((meta or {}).get("hyper_parameters") or {})
        del meta
        hparams.pop("_instantiator", None)
        hparams.pop("tokenizer", None)  # the config names the run's tokenizer, never a checkpoint (data/tokenizer.py)
        if hparams:
            if "_class_path" in hparams:
                hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
            try:
                self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
            except UsageError as err:
                raise UsageError(f"--ckpt_path {ckpt}: its hyper-parameters do not fit the model's config: "
                                 f"{err.message.removeprefix('error: ')}") from None

    @staticmethod
    def _check_resume(self: Any, cfg: Any, root: str) -> None:
        """The fit-time rules for ``root`` and ``cfg.ckpt_path`` (a requeued SLURM job takes its newest checkpoint;
        a directory holding a run is refused unless resumed from its own), without loading anything."""
        requeued = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
        ckpt = MMLightningCLI._resolve_ckpt_path(cfg, "fit", root, requeued)
        MMLightningCLI._check_allowed(root, "fit", ckpt, requeued)

    @staticmethod
    def _resolve_ckpt_path(cfg: Any, subcommand: str, root: str | None, requeued: bool) -> str | None:
        """``--ckpt_path`` as a file: ``last``/``best`` in the run directory, ``hpc`` (Lightning's SLURM
        checkpoint), or the newest checkpoint of a requeued SLURM job."""
        ckpt = cfg.get("ckpt_path")
        if subcommand == "fit" and requeued:  # a requeued SLURM job resumes its own run
            hpc = glob.glob(os.path.join(root, "hpc_ckpt_*.ckpt"))
            last = os.path.join(root, "checkpoints", "last.ckpt")
            candidates = hpc + ([last] if os.path.isfile(last) else [])
            newest = max(candidates, key=os.path.getmtime, default=None)  # what the preempted job saved last
            cfg.ckpt_path = newest or ckpt  # none yet: start over in the same directory
            return cfg.ckpt_path
        if ckpt in ("last", "best", "hpc"):
            if root is None:
                raise UsageError(f"--ckpt_path {ckpt}: give the run with --trainer.default_root_dir RUN (or the file)")
            if ckpt == "hpc":
                found = sorted(glob.glob(os.path.join(root, "hpc_ckpt_*.ckpt")), key=os.path.getmtime)
                path = found[-1] if found else os.path.join(root, "hpc_ckpt_<n>.ckpt")
            else:
                path = os.path.join(root, "checkpoints", f"{ckpt}.ckpt")
            if not os.path.isfile(path):
                hint = ""
                if ckpt == "last" and os.path.isdir(root) and not run_state(root).holds_run:
                    hint = f": {root} has no checkpoint yet; rerun without --ckpt_path to start it over in place"
                raise UsageError(f"--ckpt_path {ckpt}: no {path}{hint or ' (is --trainer.default_root_dir the run?)'}")
            cfg.ckpt_path = path
            return path
        if ckpt and not os.path.exists(ckpt):
            raise UsageError(f"--ckpt_path {ckpt}: no such checkpoint file")
        return ckpt

    def after_instantiate_classes(self) -> None:
        """Check the configured shards exist, then claim the run directory (rank 0): a run that cannot start
        leaves no directory behind, and nothing is written into one before it is claimed."""
        if self._to_claim is None:
            return
        root, subcommand, ckpt, requeued, new = self._to_claim
        self._to_claim = None
        for split, spec in self.datamodule.specs.items():
            if spec is not None:
                self.datamodule.shard_list(split)  # ShardSpecError names the split and the path
        try:
            self.claim = RunDirClaim(root, wait_s=60.0 if requeued else 0.0, new=new)  # a requeued job's old self may linger
        except RunDirInUse as err:
            raise UsageError(f"{err}: choose another --trainer.default_root_dir") from None
        except OSError as err:
            raise UsageError(f"--trainer.default_root_dir {root}: cannot create it ({err.strerror})") from None
        _CLAIMS.append(self.claim)
        self._check_allowed(root, subcommand, ckpt, requeued)  # again, under the lock

    @staticmethod
    def _check_allowed(root: str, subcommand: str, ckpt: str | None, requeued: bool) -> None:
        if not os.path.isdir(root):
            return
        state = run_state(root)
        if not state.holds_run:
            return  # empty, or a run that ended before its first checkpoint: start (over) in place
        own = ckpt is not None and _is_inside(ckpt, root)
        if subcommand == "fit" and (requeued or own):
            return
        what = f"{len(state.checkpoints)} checkpoint(s)" if state.checkpoints else "a finished summary.json"
        if subcommand == "fit" and ckpt:
            raise UsageError(
                f"{root} already holds a run ({what}) and --ckpt_path {ckpt} is not one of its checkpoints: resume "
                f"{root} with --ckpt_path last, or continue {ckpt} in a new --trainer.default_root_dir"
            )
        if subcommand == "fit":
            raise UsageError(
                f"{root} already holds a run ({what}): resume it with --ckpt_path last, or choose another "
                "--trainer.default_root_dir"
            )
        raise UsageError(
            f"{root} already holds a run ({what}): {subcommand} writes its own run directory; leave "
            "--trainer.default_root_dir unset (or choose a new one) and pass --ckpt_path RUN/checkpoints/best.ckpt"
        )

    def before_instantiate_classes(self) -> None:
        cfg = self._cfg()
        if cfg.prepare_data:
            data = cfg.data
            splits = {"fit": ("train", "val", "test"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
            # built without a sub-command (experiments.common: the benchmark, quantize): the data a fit reads
            prepare_builtin_data([data.get(s) for s in splits.get(self.subcommand or "fit", ())])

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        root = cfg.trainer.default_root_dir
        task = self.model
        monitor = getattr(task, "monitor", None) if self.datamodule.specs.get("val") is not None else None
        checkpoint = GuardedModelCheckpoint(
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
        ours: list[L.Callback] = [checkpoint, DataMonitor(), RunSummary(), self.signal_guard]
        if not any(isinstance(c, NonFiniteLossGuard) for c in user_callbacks):
            ours.append(NonFiniteLossGuard(action=cfg.get("on_nonfinite_loss") or "stop"))
        if cfg.trainer.get("logger") in (None, True) and cfg.logger != "none":
            kwargs["logger"] = self._make_logger(cfg, root)
            ours.append(LearningRateMonitor(logging_interval="step"))
        elif cfg.trainer.get("logger") in (None, True):
            kwargs["logger"] = False
        kwargs["callbacks"] = user_callbacks + ours
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # the default: a failed save must not pass
            trainer.strategy.checkpoint_io = SafeCheckpointIO()
        return trainer

    def _make_logger(self, cfg: Any, root: str) -> Any:
        if cfg.logger == "csv":
            from lightning.pytorch.loggers import CSVLogger

            return CSVLogger(save_dir=root, name="csv")  # version_N per (re)start: nothing overwritten
        if cfg.logger == "tensorboard":
            from lightning.pytorch.loggers import TensorBoardLogger

            return TensorBoardLogger(save_dir=root, name="tensorboard")
        from lightning.pytorch.loggers import WandbLogger

        online = os.environ.get("WANDB_MODE", "offline") == "online"
        # W&B resolves its git root (commit, diff) from an existing save_dir: it starts lazily, at the first log,
        # by when the run directory is claimed (created); making it here would fail the claim of a new one
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
                shown = ("epochs", "steps", "wall_time_s", "data/skipped", "data/skipped_total", "train/nonfinite_skipped")
                if name.startswith(("test/", "val/")) or name in shown:
                    value = summary.metrics[name]
                    print(f"  {name}: {value:.4f}" if isinstance(value, float) else f"  {name}: {value}")
            print(f"Summary: {os.path.join(root, 'summary.json')}")
        sys.stdout.flush()


def _num_image_tokens(model: Any) -> int | None:
    return getattr(model, "num_image_tokens", None)


def _tower_preprocessing(model: Any) -> dict[str, Any] | None:
    return getattr(model, "preprocessing", None)


def _num_classes(model: Any) -> int | None:
    count = getattr(model, "num_classes", None)
    return count if isinstance(count, int) and not isinstance(count, bool) else None


def _is_rank_zero() -> bool:
    return all(os.environ.get(v, "0") == "0" for v in ("LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "RANK"))


def _is_inside(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([path, root]) == root


def _read_checkpoint(path: str) -> dict[str, Any]:
    """The checkpoint at ``path``, weights-only and memory-mapped (cheap); a refusal is a usage error."""
    try:
        ckpt = load_checkpoint(path, "--ckpt_path", mmap=True)
    except (FileNotFoundError, UnsafeCheckpointError, UnreadableCheckpointError) as err:
        raise UsageError(str(err)) from None
    if not isinstance(ckpt, dict):
        raise UsageError(f"--ckpt_path {path!r} is not a Lightning checkpoint (it holds a {type(ckpt).__name__})")
    return ckpt


def _check_resumable(path: str, ckpt: dict[str, Any], max_epochs: int | None) -> None:
    """What Lightning would refuse only after setup (and after writing into the run directory)."""
    epoch = ckpt.get("epoch")
    if isinstance(max_epochs, int) and max_epochs != -1 and isinstance(epoch, int) and epoch > max_epochs:
        raise UsageError(
            f"--ckpt_path {path} is at epoch {epoch}, beyond --trainer.max_epochs={max_epochs}: "
            f"give --trainer.max_epochs {epoch} or more to continue it"
        )


def _root_message(err: BaseException) -> str:
    """The innermost cause of an error (e.g. a constructor's, wrapped by jsonargparse while building the model,
    data or trainer) as one line, prefixed by the config section when the wrapper names it."""
    inner = err
    # descend through wrappers, but stop at an error of ours that names what was wrong (a shard and key,
    # a checkpoint path): its own cause (e.g. the image decoder's message) names neither
    while not isinstance(inner, USER_ERRORS + RUN_FAILURES) and (
            inner.__cause__ is not None or (inner.__context__ is not None and not inner.__suppress_context__)):
        inner = inner.__cause__ or inner.__context__
    section = re.search(r'Parser key "([\w.]+)"', str(err)) if inner is not err else None
    message = _one_line(str(inner).strip() or type(inner).__name__)
    if section and not message.startswith(section.group(1)):
        return f"{section.group(1)}: {message}"
    return message


#: errors that name what the user gave (a flag, file, shard, key): one line, exit 2, at any time
USER_ERRORS: tuple[type[BaseException], ...] = (
    ShardSpecError, BadSampleError, UnsafeCheckpointError, UnreadableCheckpointError, PretrainedError,
    FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
)
#: a run that cannot go on: one line, exit 1
RUN_FAILURES: tuple[type[BaseException], ...] = (NonFiniteLossError, CheckpointSaveError)


def exit_status(err: BaseException, guard: SignalGuard) -> tuple[int, str | None]:
    """``(exit status, one-line message or None for a traceback)`` of an error that ended a run."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    if guard.signum is not None:
        name = signal.Signals(guard.signum).name
        trainer = guard._trainer
        callback = trainer.checkpoint_callback if trainer is not None else None
        saved = getattr(callback, "interrupt_save", None)
        what = f"saved {saved} (resume with --ckpt_path last)" if saved else "the last checkpoint is kept as it was"
        return 128 + guard.signum, f"interrupted by {name}: {what}"
    if isinstance(err, UsageError):
        return 2, err.message
    if isinstance(err, SystemExit):
        return (err.code if isinstance(err.code, int) else 1), None
    message = f"error: {_root_message(err)}"  # a constructor's error wrapped by jsonargparse: its cause
    if isinstance(err, RUN_FAILURES):
        return 1, message
    if isinstance(err, USER_ERRORS):
        return 2, message
    if not guard.training_started and isinstance(err, (ValueError, TypeError, MisconfigurationException)):
        return 2, message  # a setup error: the configuration or the data the user gave
    return 1, None


def main(args: Any = None) -> None:
    """Run the CLI; errors end it with :func:`exit_status` (a one-line message, ``MM_DEBUG=1`` for the traceback)."""
    previous = os.environ.get(RUN_DIR_ENV)
    guard = SignalGuard()
    guard.install()
    claims_before = len(_CLAIMS)
    try:
        MMLightningCLI(args=args, signal_guard=guard)
    except BaseException as err:  # noqa: BLE001 - every way out gets its exit status
        code, message = exit_status(err, guard)
        if message is None or os.environ.get(DEBUG_ENV):
            if message is not None:
                print(message, file=sys.stderr)
            raise
        print(message, file=sys.stderr)
        sys.stderr.flush()
        raise SystemExit(code) from None
    finally:  # an in-process caller's next run must not reuse this run directory, nor its handlers
        guard.uninstall()
        while len(_CLAIMS) > claims_before:
            _CLAIMS.pop().release()
        if previous is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous
    if guard.signum is not None:  # a signal that Lightning turned into a clean stop: still not a finished run
        code, message = exit_status(RuntimeError(), guard)
        print(message, file=sys.stderr)
        raise SystemExit(code)


if __name__ == "__main__":
    main()
